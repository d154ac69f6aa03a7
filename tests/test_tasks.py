"""The task interface, the built-in byte-level LM and the task loader."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from peerlearn.tasks import Task, TaskError, adamw, load, warmup_cosine
from peerlearn.tasks import bytelm

# Small enough that a step takes a few milliseconds; the corpus is read once per process.
SMALL = dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=8)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny matmuls on a shared 2-core box: a second intra-op thread spins against
    # other processes and makes steps ~20x slower, not faster.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def params_digest(model: torch.nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(bytes(t.detach().contiguous().view(torch.uint8).reshape(-1).tolist()))
    return h.hexdigest()


def batch_bytes(batch) -> list[bytes]:
    x, y = batch
    rows = torch.cat([x, y[:, -1:]], dim=1).to(torch.uint8)  # the full window each row came from
    return [bytes(r.tolist()) for r in rows]


# --- Model --------------------------------------------------------------------


def test_same_seed_gives_byte_identical_parameters_and_other_seeds_differ():
    a, b, c = (bytelm.task(seed=s, **SMALL) for s in (7, 7, 8))
    assert params_digest(a.model) == params_digest(b.model)
    assert params_digest(a.model) != params_digest(c.model)
    # Every matrix differs, not only the first one drawn.
    for (name, p), q in zip(a.model.named_parameters(), c.model.parameters()):
        if p.dim() >= 2:
            assert not torch.equal(p, q), name


def test_building_a_task_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    bytelm.task(**SMALL)
    assert torch.equal(torch.rand(4), expected)


def test_init_file_is_a_warm_start_and_a_mismatched_file_is_refused(tmp_path):
    trained = bytelm.task(**SMALL, seed=3).model
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.5)  # anything the seeded initialisation would not give
    path = tmp_path / "warm.pt"
    torch.save(trained.state_dict(), path)
    warm = bytelm.task(**SMALL, seed=0, init=str(path)).model
    assert params_digest(warm) == params_digest(trained)
    assert params_digest(warm) != params_digest(bytelm.task(**SMALL, seed=0).model)

    with pytest.raises(TaskError, match="does not exist"):
        bytelm.task(**SMALL, init=str(tmp_path / "missing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TaskError, match="not a saved state_dict"):
        bytelm.task(**SMALL, init=str(tmp_path / "junk.pt"))
    other = dict(SMALL, n_embd=32)
    with pytest.raises(TaskError, match="wrong shape"):
        bytelm.task(**other, init=str(path))


def test_head_is_tied_and_every_parameter_has_one_name():
    t = bytelm.task(**SMALL)
    names = list(t.model.state_dict())
    assert len(names) == len(list(t.model.parameters()))
    assert not any("head" in n for n in names)
    logits = t.model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 256)


def test_init_statistics_follow_gpt2():
    t = bytelm.task(seed=0, n_layer=4, n_embd=128, n_head=4)
    p = dict(t.model.named_parameters())
    assert abs(p["wte.weight"].std().item() - 0.02) < 0.001
    assert abs(p["blocks.0.proj.weight"].std().item() - 0.02 / 8 ** 0.5) < 0.0005
    assert torch.equal(p["ln_f.weight"], torch.ones(128))
    assert torch.equal(p["blocks.0.qkv.bias"], torch.zeros(3 * 128))


# --- Data ---------------------------------------------------------------------


def test_shards_are_disjoint_and_deterministic():
    t = bytelm.task(**SMALL)
    seen = {}
    for rank in range(4):
        it = t.batches(rank, 4, 11)
        first = [b for _, b in zip(range(3), it)]
        again = [b for _, b in zip(range(3), t.batches(rank, 4, 11))]
        other_seed = next(t.batches(rank, 4, 12))
        rows = [r for b in first for r in batch_bytes(b)]
        assert rows == [r for b in again for r in batch_bytes(b)]
        assert batch_bytes(other_seed) != batch_bytes(first[0])
        seen[rank] = set(rows)
        assert first[0][0].shape == (8, 64) and first[0][0].dtype == torch.long
    for r in range(4):
        for s in range(r + 1, 4):
            assert not seen[r] & seen[s], (r, s)


def test_sharding_covers_each_window_once_per_epoch():
    # Windows numbered 0..n-1 (first byte = number) make overlaps exact, not probabilistic.
    n, world, bs = 250, 4, 5
    windows = torch.arange(n, dtype=torch.uint8).view(n, 1).repeat(1, 3)
    batches = bytelm.make_batches(windows, bs)
    owned = []
    for rank in range(world):
        shard = (n - rank + world - 1) // world  # windows rank, rank+world, ...
        per_epoch = shard // bs
        it = batches(rank, world, 0)
        epoch0 = torch.cat([next(it)[0][:, 0] for _ in range(per_epoch)]).tolist()
        epoch1 = torch.cat([next(it)[0][:, 0] for _ in range(per_epoch)]).tolist()
        assert len(set(epoch0)) == len(epoch0) and all(i % world == rank for i in epoch0)
        assert epoch0 != epoch1 and set(epoch1) <= set(range(rank, n, world))
        owned.append(set(epoch0))
    assert sum(len(s) for s in owned) == len(set().union(*owned))
    with pytest.raises(ValueError):
        next(batches(4, 4, 0))


def test_validation_files_never_appear_in_training():
    c = bytelm.load_corpus(bytelm.stdlib_root(), bytelm.Config.corpus_bytes,
                           bytelm.Config.val_every)
    assert c.val_files and len(c.train_files) > 10 * len(c.val_files)
    assert not set(c.train_files) & set(c.val_files)
    assert all(bytelm._is_val(f, 20) for f in c.val_files)
    assert not any(bytelm._is_val(f, 20) for f in c.train_files)
    assert not any(part in ("test", "tests") for f in c.train_files + c.val_files
                   for part in f.split("/"))
    # The streams are exactly those files' bytes, in order: nothing else leaks in.
    def read(files):
        return b"".join(open(os.path.join(c.root, f), "rb").read() for f in files)
    assert c.train == read(c.train_files) and c.val == read(c.val_files)
    assert len(c.train) + len(c.val) <= bytelm.Config.corpus_bytes
    assert len(c.fingerprint) == 64


def test_corpus_cap_and_fingerprint():
    small = bytelm.load_corpus(bytelm.stdlib_root(), 1 << 20, 20)
    assert len(small.train) + len(small.val) <= 1 << 20
    full = bytelm.load_corpus(bytelm.stdlib_root(), 8 << 20, 20)
    assert small.fingerprint != full.fingerprint
    # The cap takes a prefix of the sorted file list; the split rule is per file.
    assert full.train_files[:len(small.train_files)] == small.train_files


# --- Training and evaluation -------------------------------------------------


def test_thirty_adamw_steps_lower_the_training_loss():
    torch.manual_seed(0)
    t = bytelm.task(seed=0, **SMALL)
    opt = t.inner_optimizer(t.model.parameters())
    it = t.batches(0, 4, 0)
    probe = next(it)
    with torch.no_grad():
        before = t.loss(t.model, probe).item()
    for _ in range(30):
        loss = t.loss(t.model, next(it))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = t.loss(t.model, probe).item()
    assert after < 0.9 * before, (before, after)


def test_evaluate_is_deterministic_and_keeps_the_mode():
    a, b = bytelm.task(seed=3, **SMALL), bytelm.task(seed=3, **SMALL)
    a.model.train()
    first = a.evaluate(a.model, 3)
    assert a.model.training
    assert a.evaluate(a.model, 3) == first == b.evaluate(b.model, 3)
    assert 4.0 < first < 6.0  # about ln 256 before training
    # max_batches past the split's end evaluates the whole split (here 2 batches of 8).
    evaluate = bytelm.make_evaluate(torch.randint(0, 256, (20, 65), dtype=torch.uint8), 8)
    assert evaluate(a.model, 10 ** 9) == evaluate(a.model, 2) != evaluate(a.model, 1)
    with pytest.raises(ValueError):
        a.evaluate(a.model, 0)


def test_task_fields():
    t = bytelm.task(**SMALL)
    assert isinstance(t, Task) and t.name == "bytelm"
    assert t.tokens_per_batch == 8 * 64
    assert t.config["n_layer"] == 2 and t.config["seed"] == 0
    with pytest.raises(TypeError):
        t.config["n_layer"] = 3
    with pytest.raises(AttributeError):
        t.name = "other"
    opt = t.inner_optimizer(t.model.parameters())
    assert isinstance(opt, torch.optim.AdamW)
    assert {g["weight_decay"] for g in opt.param_groups} == {0.1, 0.0}
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_warmup_cosine_schedule():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = adamw([p], lr=1.0)
    sched = warmup_cosine(opt, warmup_steps=10, total_steps=110, min_ratio=0.1)
    lrs = []
    for _ in range(120):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55) and lrs[115] == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[9:], lrs[10:]))


# --- Loader -------------------------------------------------------------------

USER_TASK = """
import itertools
import torch
from peerlearn.tasks import Task, adamw

def task(seed=0, width=4):
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Linear(width, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g))

    def batches(rank, world, seed):
        g = torch.Generator().manual_seed(seed * world + rank)
        for _ in itertools.count():
            x = torch.rand(8, width, generator=g)
            yield x, x.sum(1, keepdim=True)

    def loss(model, batch):
        x, y = batch
        return torch.nn.functional.mse_loss(model(x), y)

    def evaluate(model, max_batches):
        with torch.no_grad():
            return loss(model, next(batches(0, 1, 999))).item()

    return Task(name="linear", model=model, inner_optimizer=lambda p: adamw(p, lr=1e-2),
                batches=batches, loss=loss, evaluate=evaluate, tokens_per_batch=8)

def not_a_task():
    return 42

NOT_CALLABLE = 3
"""


def test_loader_resolves_the_builtin():
    for spec in (None, "bytelm", "peerlearn.tasks.bytelm:task"):
        t = load(spec, **SMALL)
        assert t.name == "bytelm" and t.config["n_embd"] == 64


def test_bytelm_settings_may_come_as_strings():
    t = load("bytelm", **{k: str(v) for k, v in SMALL.items()}, lr="3e-4")
    assert t.config["n_embd"] == 64 and t.config["lr"] == 3e-4
    assert t.tokens_per_batch == 8 * 64


def test_loader_resolves_a_file_and_a_module(tmp_path, monkeypatch):
    path = tmp_path / "mytask.py"
    path.write_text(USER_TASK)
    t = load(f"{path}:task", width=3)
    assert t.name == "linear" and t.model.in_features == 3
    assert t.evaluate(t.model, 1) >= 0
    monkeypatch.syspath_prepend(str(tmp_path))
    t2 = load("mytask:task", seed=0, width=3)
    assert torch.equal(t2.model.weight, t.model.weight)
    monkeypatch.chdir(tmp_path)
    assert load("mytask.py:task").model.in_features == 4  # a relative path


@pytest.mark.parametrize("spec, overrides, message", [
    ("nonsense", {}, "task spec 'nonsense' is not 'bytelm', 'module:function'"),
    (":task", {}, "task spec ':task' is not"),
    ("mytask:", {}, "task spec 'mytask:' is not"),
    ("no_such_module_xyz:task", {}, "no task module named 'no_such_module_xyz'"),
    ("{tmp}/missing.py:task", {}, "task file '{tmp}/missing.py' does not exist"),
    ("{tmp}/mytask.py:nope", {}, "task module '{tmp}/mytask.py' has no function 'nope'"),
    ("{tmp}/mytask.py:NOT_CALLABLE", {}, "is a int, not a function"),
    ("{tmp}/mytask.py:not_a_task", {}, "returned a int, not a peerlearn.tasks.Task"),
    ("{tmp}/mytask.py:task", {"depth": 2}, "does not accept these settings: TypeError"),
    ("{tmp}/broken.py:task", {}, "importing task file '{tmp}/broken.py' failed: ZeroDivisionError"),
    ("{tmp}/needs_dep.py:task", {}, "failed: ModuleNotFoundError: No module named 'dep_xyz'"),
    ("bytelm", {"n_layers": 2}, "bytelm has no setting 'n_layers'; known:"),
    ("bytelm", {"n_embd": 100, "n_head": 3}, "bytelm: n_embd 100 is not a multiple of n_head 3"),
    ("bytelm", {"n_layer": "two"}, "bytelm: n_layer='two' is not a int"),
    ("bytelm", {"lr": "fast"}, "bytelm: lr='fast' is not a float"),
    ("bytelm", {"n_layer": 2.5}, "bytelm: n_layer=2.5 is not a int"),
])
def test_loader_errors_are_one_line_task_errors(tmp_path, spec, overrides, message):
    (tmp_path / "mytask.py").write_text(USER_TASK)
    (tmp_path / "broken.py").write_text("x = 1 / 0\n")
    (tmp_path / "needs_dep.py").write_text("import dep_xyz\n")
    spec, message = spec.format(tmp=tmp_path), message.format(tmp=tmp_path)
    with pytest.raises(TaskError) as err:
        load(spec, **overrides)
    assert isinstance(err.value, ValueError)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_a_module_importing_a_missing_dependency_is_not_reported_missing(tmp_path, monkeypatch):
    (tmp_path / "uses_dep.py").write_text("import dep_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(TaskError, match="importing task module 'uses_dep' failed: Module"):
        load("uses_dep:task")


# --- Plain install -----------------------------------------------------------


def test_the_task_trains_without_numpy_and_builds_the_same_bytes_in_another_process(tmp_path):
    script = tmp_path / "child.py"
    script.write_text("import sys\nsys.modules['numpy'] = None  # `import numpy` now raises\n"
                      + textwrap.dedent(f"""
        import hashlib, torch
        from peerlearn.tasks import load
        torch.set_num_threads(1)
        t = load("bytelm", seed=5, **{SMALL!r})
        h = hashlib.blake2b(digest_size=16)
        for name, p in t.model.state_dict().items():
            h.update(name.encode())
            h.update(bytes(p.contiguous().view(torch.uint8).reshape(-1).tolist()))
        print(h.hexdigest())
        opt = t.inner_optimizer(t.model.parameters())
        it = t.batches(1, 2, 0)
        for _ in range(2):
            loss = t.loss(t.model, next(it))
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert t.evaluate(t.model, 1) > 0
        assert sys.modules["numpy"] is None
        print("ok")
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    digest, ok = done.stdout.split()
    assert ok == "ok"
    assert digest == params_digest(bytelm.task(seed=5, **SMALL).model)
