"""What this peer runs: version, source revision, torch, codecs. Served as
`peerlearn_build_info` so an operator can tell the peers of a swarm apart by
what they run."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from peerlearn import __version__

REVISION_ENV = "PEERLEARN_BUILD_REVISION"  # the Dockerfile sets it from its GIT_REVISION arg


@functools.cache
def revision() -> str:
    """The source revision: set at image build ($PEERLEARN_BUILD_REVISION), else
    the git checkout this package runs from (an editable install), else
    "unknown" (a wheel installed from elsewhere knows none)."""
    if os.environ.get(REVISION_ENV):
        return os.environ[REVISION_ENV]
    src = Path(__file__).resolve().parent.parent
    if not (src / ".git").exists():
        return "unknown"
    try:
        out = subprocess.run(["git", "-C", str(src), "describe", "--always", "--dirty",
                              "--abbrev=12"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"


def info(codec: int | None) -> dict[str, str]:
    import torch

    from peerlearn.wire.codecs import CODEC_NAMES

    return {"version": __version__, "revision": revision(), "torch": torch.__version__,
            "codec": codec_name(codec), "codecs": ",".join(CODEC_NAMES)}


def codec_name(codec: int | None) -> str:
    from peerlearn.wire.codecs import CODEC_NAMES

    return next((n for n, c in CODEC_NAMES.items() if c == codec), f"id{codec}")
