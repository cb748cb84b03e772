"""Small shared helpers: seeding, device resolution, hashing, atomic writes."""
from __future__ import annotations

import hashlib
import os
import random
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) RNGs."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def task_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (experiment seed, round, teacher, ...), stable across processes."""
    import numpy as np

    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint64)[0] >> 1)


def resolve_device(device: str = "auto"):
    """``auto`` -> CUDA when present, else CPU; ``cuda`` without a GPU is a user error."""
    import torch  # imported here so light CLIs (filelist, glyphs) start fast

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: no CUDA device is available on this machine (use auto or cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device {device}: expected auto, cpu or cuda[:N]")
    return torch.device(device)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary sibling path; rename it onto ``path`` only if the block succeeds.

    Outputs therefore never exist half-written under their final name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        fsync_file(tmp)               # the bytes are on disk before the name points at them
        os.replace(tmp, path)
        fsync_dir(path.parent)        # ... and so is the rename
    finally:
        if tmp.exists():
            tmp.unlink()


def fsync_file(path: str | os.PathLike) -> None:
    if Path(path).is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:                   # (platforms without directory fds)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` intra-op CPU threads, then restore the count. CPU results of a
    multi-threaded reduction (a convolution's weight gradient) depend on the number of threads, so work
    that must be bit-identical wherever it runs (a teacher's training) fixes it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def exclusive_lock(path: str | os.PathLike, what: str):
    """Hold an exclusive ``flock`` on ``path`` (created if needed) for the block; another process gets a
    one-line UserError naming ``what`` and the holder's pid. The kernel releases it if the holder dies."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UserError(f"{what}: another process ({holder}) is writing it; wait for it to finish") from None
    try:
        import socket

        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
