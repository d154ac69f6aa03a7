"""The runtime on a plain `pip install .`: no numpy. Each check runs in a child
interpreter where importing numpy fails, as it does without the test extras."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_NO_NUMPY = "import sys\nsys.modules['numpy'] = None  # `import numpy` now raises ImportError\n"


def run_without_numpy(code: str, tmp_path) -> str:
    script = tmp_path / "child.py"
    script.write_text(_NO_NUMPY + textwrap.dedent(code))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_numpy_is_really_unimportable_in_the_child(tmp_path):
    out = run_without_numpy("""
        try:
            import numpy  # noqa: F401
            print("imported")
        except ImportError:
            print("blocked")
    """, tmp_path)
    assert out.strip() == "blocked"


def test_links_greetings_and_a_transfer_work_without_numpy(tmp_path):
    out = run_without_numpy("""
        import threading
        import torch
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from peerlearn.state.identity import Identity
        from peerlearn.swarm.datalinks import PeerLinks

        key = b"k" * 32
        a, b = (Identity(Ed25519PrivateKey.generate()) for _ in range(2))
        la = PeerLinks(a.peer_id, "127.0.0.1", 0, key, 2, identity=a)
        lb = PeerLinks(b.peer_id, "127.0.0.1", 0, key, 2, identity=b)
        got = torch.zeros(1000)
        t = threading.Thread(target=lb.recv_into, args=(a.peer_id, got, 3),
                             kwargs=dict(channel=0, timeout=10))
        t.start()
        la.outgoing(b.peer_id, f"127.0.0.1:{lb.port}").send(torch.ones(1000), 3, timeout=10)
        t.join(10)
        assert torch.equal(got, torch.ones(1000)), got
        la.close()
        lb.close()
        print("ok")
    """, tmp_path)
    assert out.strip().endswith("ok")


def test_checkpoints_and_the_codec_bench_work_without_numpy(tmp_path):
    out = run_without_numpy("""
        import json
        import torch
        from peerlearn.bench import codec
        from peerlearn.state import checkpoint
        from peerlearn.state.shared import SharedState

        state = SharedState(step=7)
        state.register("w", torch.arange(10, dtype=torch.float32))
        state.register("b", torch.ones(3, dtype=torch.bfloat16))
        digest = checkpoint.save(state, "ck.bin")
        back = checkpoint.load("ck.bin")
        assert back.step == 7 and back.state_hash() == digest
        assert torch.equal(back.tensors["w"], state.tensors["w"])

        report = codec.run(numel=4096, repeat=1, torch_repeat=1, codecs=[3, 5])
        assert report["codecs"]["INT8_ABSMAX"]["torch_encode_gbps"] > 0, report
        print(json.dumps(report["numpy_available"]))
    """, tmp_path)
    assert out.strip() == "false"
