"""The built-in task: a small byte-level GPT trained on Python's own source code.

Every machine with Python has the corpus, the standard library's `*.py`
files, so a swarm can train something real with no download. The model reads
bytes (vocabulary 256): no tokenizer to ship or agree on.

This module is written exactly as a task of your own would be; copy it. A
task is a module with a function that takes keyword overrides and returns a
`peerlearn.tasks.Task`:

    # mytask.py
    import torch
    from peerlearn.tasks import Task, adamw

    def task(seed=0, lr=1e-3):
        torch.manual_seed(seed)           # initial parameters: a function of the seed
        model = ...
        return Task(name="mytask", model=model,
                    inner_optimizer=lambda params: adamw(params, lr=lr),
                    batches=..., loss=..., evaluate=..., tokens_per_batch=...)

and `peerlearn.tasks.load("mytask.py:task", lr=3e-4)` builds it on every peer.
Here: `load("bytelm", n_layer=2)` or `task(n_layer=2)`.

Peers of one swarm must run the same Python (minor version and build): other
versions ship other stdlib files, hence other data. `Task.fingerprint` hashes
the corpus so a trainer can check that peers agree before training together.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from peerlearn.tasks.base import Task, TaskError, adamw, warmup_cosine

VOCAB = 256  # bytes


@dataclass(frozen=True)
class Config:
    """The settings `task(**overrides)` accepts. Defaults train visibly in a few
    minutes on two CPU cores."""

    seed: int = 0              # initial parameters are a pure function of it
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128      # context length, in bytes
    batch_size: int = 16
    lr: float = 1e-3           # DiLoCo's 4e-4 is for 150M+ models; a tiny one takes more
    weight_decay: float = 0.1
    schedule: str = "cosine"   # 5 % warmup, cosine to 10 % of lr (the papers); or "constant"
    corpus_bytes: int = 8 << 20  # read at most this much of the stdlib: startup stays fast
    val_every: int = 20        # about one file in val_every goes to validation
    init: str = ""             # a state_dict file (torch.save) to start from: a warm start


# --- Model -------------------------------------------------------------------


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.out = nn.Linear(4 * cfg.n_embd, cfg.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, 3C) -> three (B, n_head, T, head_dim) tensors
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.qkv(self.ln1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class ByteLM(nn.Module):
    """Decoder-only transformer over bytes: (B, T) int64 -> (B, T, 256) logits.

    The output head is the byte embedding itself (weight tying), applied with
    F.linear rather than a second Linear sharing the tensor, so every parameter
    has exactly one name in `state_dict()`: what the runtime ships is what
    the optimizer steps.
    """

    def __init__(self, cfg: Config):
        super().__init__()
        self.block_size = cfg.block_size
        self.wte = nn.Embedding(VOCAB, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        T = idx.shape[1]
        if T > self.block_size:
            raise ValueError(f"sequence of {T} bytes is longer than the context {self.block_size}")
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def _uniform(shape: torch.Size, std: float, g: torch.Generator) -> torch.Tensor:
    """U(-a, a) with standard deviation `std`, bit-identical on every CPU.

    Why not `normal_`: torch draws normals with Box-Muller in float32 and
    takes a vectorised AVX2 path (other log/cos) on some CPUs and a scalar one
    on others, so two peers may disagree in the last bit. Here the only
    randomness is integers from the generator; one exact subtraction and one
    IEEE multiply in float64, then one rounding to float32, give the same bytes
    on any machine with the same torch.
    """
    a = std * math.sqrt(3.0)
    ints = torch.randint(0, 1 << 24, shape, generator=g, dtype=torch.int64)
    return ((ints.double() - ((1 << 23) - 0.5)) * (a / (1 << 23))).float()


@torch.no_grad()
def init_parameters(model: ByteLM, seed: int, n_layer: int) -> None:
    """GPT-2 initialisation (std 0.02, residual projections scaled down by
    sqrt(2 * n_layer) so the residual stream does not grow with depth), drawn in
    `named_parameters()` order from one generator seeded with `seed`."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            p.zero_()
        elif p.dim() == 1:  # LayerNorm gain
            p.fill_(1.0)
        else:
            residual = name.endswith(("proj.weight", "out.weight"))
            p.copy_(_uniform(p.shape, 0.02 / math.sqrt(2 * n_layer) if residual else 0.02, g))


def build_model(cfg: Config) -> ByteLM:
    # Construction runs torch's default init off the global RNG; fork it so
    # building a task never shifts the caller's random stream. All of those
    # values are overwritten by init_parameters.
    with torch.random.fork_rng(devices=[]):
        model = ByteLM(cfg)
    init_parameters(model, cfg.seed, cfg.n_layer)
    if cfg.init:
        load_init(model, cfg.init)
    return model


def load_init(model: ByteLM, path: str) -> None:
    """Overwrites the seeded parameters with a saved state_dict (a warm start:
    the DiLoCo paper starts its runs from a pretrained model). Loaded with
    weights_only, so the file holds tensors and nothing executable; a file that
    does not match the model's names and shapes is refused with TaskError."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise TaskError(f"bytelm: init file {path!r} does not exist") from None
    except Exception as e:  # torch raises several unrelated types for a bad file
        raise TaskError(f"bytelm: init file {path!r} is not a saved state_dict: {e}") from None
    own = model.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(own):
        raise TaskError(f"bytelm: init file {path!r} does not hold this model's parameters")
    for name, t in own.items():
        if not isinstance(saved[name], torch.Tensor) or saved[name].shape != t.shape:
            raise TaskError(f"bytelm: init file {path!r}: {name} has the wrong shape")
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(saved[name])


# --- Data --------------------------------------------------------------------

# Directory names never read: tests (huge, odd, often deliberately broken) and
# third-party packages, which differ from machine to machine.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                        "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    """The stdlib sources, split by file: no file has bytes in both splits.

    `train` and `val` are the files' bytes concatenated in path order.
    `fingerprint` is blake2b-256 (hex) over, for every file in path order, its
    relative path, a NUL byte and its bytes: equal fingerprints mean equal
    splits.
    """

    root: str
    train_files: tuple[str, ...]
    val_files: tuple[str, ...]
    train: bytes
    val: bytes
    fingerprint: str


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _is_val(relpath: str, val_every: int) -> bool:
    # A stable hash of the path, not its position: adding or dropping one file
    # (another patch release, a smaller cap) moves no other file across splits.
    h = hashlib.blake2b(relpath.encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % val_every == 0


@functools.lru_cache(maxsize=4)  # tests and repeated task() calls read the disk once
def load_corpus(root: str, max_bytes: int, val_every: int) -> Corpus:
    """Read `*.py` under `root` in sorted relative-path order (POSIX separators),
    skipping _SKIP_DIRS, symlinked directories and unreadable files, and stop
    before the first file that would take the total past `max_bytes`."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(root):  # does not follow symlinks
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for f in filenames:
            if f.endswith(".py"):
                full = os.path.join(dirpath, f)
                paths.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    paths.sort()
    train, val, train_files, val_files = [], [], [], []
    digest = hashlib.blake2b(digest_size=32)
    total = 0
    for rel, full in paths:
        try:
            with open(full, "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        if total + len(data) > max_bytes:
            break
        total += len(data)
        digest.update(rel.encode() + b"\0" + data)
        if _is_val(rel, val_every):
            val.append(data)
            val_files.append(rel)
        else:
            train.append(data)
            train_files.append(rel)
    return Corpus(root, tuple(train_files), tuple(val_files), b"".join(train), b"".join(val),
                  digest.hexdigest())


def _windows(stream: bytes, length: int) -> torch.Tensor:
    """Cut a byte stream into non-overlapping windows: (n, length) uint8. Each
    window is one example (input = window[:-1], target = window[1:]), so two
    different windows never share a byte."""
    n = len(stream) // length
    return torch.frombuffer(bytearray(stream[: n * length]), dtype=torch.uint8).view(n, length)


def _as_batch(windows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = windows.long()
    return w[:, :-1], w[:, 1:]


def _derive_seed(*parts: int) -> int:
    h = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 1  # manual_seed wants < 2**63 here, to be safe


def make_batches(windows: torch.Tensor, batch_size: int):
    """`batches(rank, world, seed)` over the training windows.

    Peer `rank` of `world` owns windows rank, rank + world, rank + 2*world, ...:
    disjoint across ranks, and each shard is spread over the whole corpus
    rather than one stretch of it. Each pass over the shard (epoch) is a fresh
    permutation seeded by (seed, rank, world, epoch); a trailing partial batch
    is dropped, so every batch is full.
    """

    def batches(rank: int, world: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in 0..{world - 1}")
        mine = torch.arange(rank, windows.shape[0], world)
        if mine.numel() < batch_size:
            raise TaskError(f"shard {rank}/{world} has {mine.numel()} examples, "
                            f"fewer than one batch of {batch_size}; raise corpus_bytes")
        epoch = 0
        while True:
            g = torch.Generator().manual_seed(_derive_seed(seed, rank, world, epoch))
            order = mine[torch.randperm(mine.numel(), generator=g)]
            for i in range(0, order.numel() - batch_size + 1, batch_size):
                yield _as_batch(windows[order[i:i + batch_size]])
            epoch += 1

    return batches


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Mean next-byte cross-entropy, in nats per byte (ln 256 = 5.55 at chance)."""
    x, y = batch
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))


def make_evaluate(windows: torch.Tensor, batch_size: int):
    """`evaluate(model, max_batches)`: mean loss over the first `max_batches`
    validation batches, in corpus order (no shuffling: every peer and every
    call sees the same examples)."""
    n_batches = windows.shape[0] // batch_size

    def evaluate(model: nn.Module, max_batches: int) -> float:
        if max_batches <= 0:
            raise ValueError("max_batches must be positive")
        count = min(max_batches, n_batches)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                total = sum(loss(model, _as_batch(windows[i * batch_size:(i + 1) * batch_size]))
                            .item() for i in range(count))
        finally:
            model.train(was_training)
        return total / count

    return evaluate


# --- The task ----------------------------------------------------------------


def task(**overrides) -> Task:
    """The built-in task; `overrides` are `Config` fields (e.g. n_layer=2, or
    n_layer="2" from a command line)."""
    defaults = {f.name: f.default for f in fields(Config)}
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TaskError(f"bytelm has no setting {unknown[0]!r}; known: {', '.join(defaults)}")
    # A command line hands settings over as strings ("n_layer=2"): convert to the
    # default's type, so a typo fails here with its name, not deep inside torch.
    for name, value in overrides.items():
        kind = type(defaults[name])
        try:
            overrides[name] = kind(value) if isinstance(value, str) else value
        except ValueError:
            raise TaskError(f"bytelm: {name}={value!r} is not a {kind.__name__}") from None
        if not isinstance(overrides[name], (int, float) if kind is float else kind):
            raise TaskError(f"bytelm: {name}={value!r} is not a {kind.__name__}")
    cfg = Config(**overrides)
    if cfg.n_embd % cfg.n_head:
        raise TaskError(f"bytelm: n_embd {cfg.n_embd} is not a multiple of n_head {cfg.n_head}")
    if min(cfg.n_layer, cfg.n_head, cfg.block_size, cfg.batch_size, cfg.val_every) <= 0:
        raise TaskError("bytelm: n_layer, n_head, block_size, batch_size, val_every must be > 0")

    corpus = load_corpus(stdlib_root(), cfg.corpus_bytes, cfg.val_every)
    train = _windows(corpus.train, cfg.block_size + 1)
    val = _windows(corpus.val, cfg.block_size + 1)
    if val.shape[0] < cfg.batch_size:
        raise TaskError(f"bytelm: validation split has {val.shape[0]} examples, fewer than "
                        f"one batch of {cfg.batch_size}; raise corpus_bytes")

    return Task(
        name="bytelm",
        model=build_model(cfg),
        inner_optimizer=lambda params: adamw(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
        batches=make_batches(train, cfg.batch_size),
        loss=loss,
        evaluate=make_evaluate(val, cfg.batch_size),
        tokens_per_batch=cfg.batch_size * cfg.block_size,
        fingerprint=corpus.fingerprint,
        config=asdict(cfg),
        schedule=_schedule(cfg.schedule),
    )


def _schedule(name: str):
    if name == "constant":
        return None
    if name == "cosine":
        return lambda opt, total: warmup_cosine(opt, max(1, total // 20), total)
    raise TaskError(f"bytelm: schedule must be 'cosine' or 'constant', not {name!r}")
