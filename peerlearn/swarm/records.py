"""What a peer keeps in its data dir besides its identity: the applied record
(`applied.json`: which view it is in and which step it reached) and the
checkpoint of the shared state (`state.ckpt`). Both are written atomically.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from peerlearn.state import checkpoint
from peerlearn.state.atomic import write_atomic
from peerlearn.state.shared import SharedState
from peerlearn.swarm.actions import Applied
from peerlearn.wire import control as m

log = logging.getLogger("peerlearn.peer")

CHECKPOINT_FILE = "state.ckpt"
RECORD_FILE = "applied.json"


def load_record(data_dir: Path) -> Applied | None:
    """The applied record (see actions.Applied) this data dir holds, if any;
    a damaged one is logged and ignored."""
    path = data_dir / RECORD_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_bytes())
        members = tuple(m.PeerInfo.from_wire(p) for p in raw["members"])
        departed = raw.get("departed", False)
        if not isinstance(departed, bool):
            raise ValueError("departed must be true or false")
        return Applied(int(raw["epoch"]), members, int(raw["max_round_id"]),
                       int(raw["term"]), int(raw["step"]), bytes.fromhex(raw["state_hash"]),
                       departed)
    except (OSError, ValueError, KeyError, TypeError, m.MessageError) as e:
        log.warning("ignoring %s: %s", RECORD_FILE, e)
        return None


def save_record(data_dir: Path, rec: Applied) -> bool:
    """Small and atomic; False (logged) if it could not be written."""
    body = {"epoch": rec.epoch, "members": [p.to_wire() for p in rec.members],
            "max_round_id": rec.max_round_id, "term": rec.term, "step": rec.step,
            "state_hash": rec.state_hash.hex(), "departed": rec.departed}
    try:
        write_atomic(data_dir / RECORD_FILE, [json.dumps(body).encode()], mode=0o600)
        return True
    except OSError as e:
        log.warning("could not write %s: %s", RECORD_FILE, e)
        return False


def load_checkpoint(data_dir: Path) -> SharedState | None:
    path = data_dir / CHECKPOINT_FILE
    if not path.exists():
        return None
    try:
        return checkpoint.load(path)
    except checkpoint.CheckpointError as e:
        log.warning("ignoring checkpoint: %s", e)
        return None
