"""Building a teacher pool in parallel: plan class subsets, train teachers on Ray, write the manifest.

Each teacher is a ``way``-way classifier on a class subset of the dataset's meta-train split:
``disjoint`` gives contiguous blocks of class ids (PURER), ``random`` gives seeded random subsets that
may overlap (FREE / TGR / BiDf-MKD). Per class the first 80% of the images (in the split's sorted
CSV order) train the teacher and the last 20% are its held-out set.

Fixes against the seeds: the best held-out checkpoint is *copied* (the seeds alias the live tensors
and so save the last epoch); class subsets are sorted, so output j is always ``classes[j]``.
Deliberate deviation: learning rates follow a one-cycle schedule peaking at the seeds' value
(conv4 Adam 0.01; ResNets SGD 0.01 / momentum 0.9 / wd 5e-4), because plain Adam at 0.01 was
unstable on short CPU budgets (reference/glyph_probe.md).
"""
from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data.layout import ImageSplit, ensure_dataset, load_split
from ..data.registry import get_spec
from ..data.transforms import normalize
from ..errors import UserError
from ..models import BACKBONES, build_model
from ..utils import atomic_path, exclusive_lock, sha256_file
from .manifest import TeacherRecord, read_manifest, write_manifest
from .timing import BuildTimes, Stopwatch, TeacherTimes

POLICIES = ("disjoint", "random")
HELDOUT_FRACTION = 0.2


@dataclass(frozen=True)
class ZooConfig:
    dataset: str = "glyphs"
    arch: str = "conv4"
    num: int = 10
    way: int = 5
    policy: str = "random"
    seed: int = 0
    epochs: int = 5
    width: float = 1.0
    batch_size: int = 128
    image_size: int | None = None   # None: the dataset's own size
    # Teacher k's class subset is plan number ``plan_offset + k`` of (policy, seed): the zoos of one pool
    # (one per architecture) take consecutive plan numbers, so they do not all repeat the same subsets.
    plan_offset: int = 0
    # "seeds": conv4 Adam 0.01, ResNets SGD 0.01/0.9/5e-4 (the seeds' recipe, for long schedules);
    # "adam": Adam 0.01 for every architecture. Measured on glyphs, 4 epochs, width 0.25: resnet10
    # reached 0.34 held-out accuracy with the seeds' SGD, 0.90 with SGD at peak lr 0.1, 0.997 with Adam.
    optimizer: str = "seeds"

    def validate(self) -> None:
        if self.arch not in BACKBONES:
            raise UserError(f"--arch {self.arch!r}: unknown architecture; choose one of {', '.join(BACKBONES.names())}")
        if self.optimizer not in ("seeds", "adam"):
            raise UserError(f"--optimizer {self.optimizer!r}: choose seeds or adam")
        if self.policy not in POLICIES:
            raise UserError(f"--policy {self.policy!r}: choose disjoint or random")
        get_spec(self.dataset)
        for name in ("num", "way", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.width <= 0:
            raise UserError(f"--width must be positive, got {self.width}")


def teacher_seed(seed: int, teacher_id: int) -> int:
    return int(np.random.SeedSequence([seed, teacher_id]).generate_state(1)[0])


def plan_classes(cfg: ZooConfig, num_classes: int) -> list[tuple[int, ...]]:
    """Class subsets per teacher, sorted ids. Deterministic in (policy, seed, plan_offset)."""
    if cfg.way > num_classes:
        raise UserError(f"--way {cfg.way}: the meta-train split has only {num_classes} classes")
    if cfg.policy == "disjoint":
        blocks = num_classes // cfg.way
        if cfg.num > blocks:
            raise UserError(f"--num {cfg.num}: disjoint {cfg.way}-way blocks of {num_classes} classes allow at most "
                            f"{blocks} teachers (use --policy random for more)")
        first = cfg.plan_offset
        if first + cfg.num > blocks:
            raise UserError(f"--num {cfg.num}: disjoint {cfg.way}-way blocks of {num_classes} classes allow at most "
                            f"{blocks} teachers in the pool")
        return [tuple(range(k * cfg.way, (k + 1) * cfg.way)) for k in range(first, first + cfg.num)]
    plans = []
    for k in range(cfg.plan_offset, cfg.plan_offset + cfg.num):
        rng = np.random.default_rng([cfg.seed, k])
        plans.append(tuple(sorted(int(c) for c in rng.choice(num_classes, cfg.way, replace=False))))
    return plans


def split_rows(labels: np.ndarray, classes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train/held-out row indices and relative labels: first 80% of each class trains, last 20% is held out."""
    tr, tr_y, ho, ho_y = [], [], [], []
    for j, c in enumerate(classes):
        rows = np.flatnonzero(labels == c)
        n_ho = max(1, int(round(HELDOUT_FRACTION * len(rows))))
        if len(rows) - n_ho < 1:
            raise UserError(f"class id {c} has only {len(rows)} meta-train image(s); a teacher needs at least 2")
        tr.append(rows[:-n_ho]); tr_y.append(np.full(len(rows) - n_ho, j))
        ho.append(rows[-n_ho:]); ho_y.append(np.full(n_ho, j))
    return np.concatenate(tr), np.concatenate(tr_y), np.concatenate(ho), np.concatenate(ho_y)


def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 512) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / max(1, len(x))


def train_teacher(images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...], cfg: ZooConfig, seed: int,
                  device: torch.device | str = "cpu", times: TeacherTimes | None = None
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """Train one teacher; return the best-held-out state dict (a copy, on CPU) and its held-out accuracy.
    ``times``, if given, gets the seconds spent on its data, training and evaluation."""
    t0 = time.perf_counter()
    spec = get_spec(cfg.dataset)
    size = cfg.image_size or spec.image_size
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tr, tr_y, ho, ho_y = split_rows(labels, classes)
    x_tr = normalize(torch.from_numpy(np.ascontiguousarray(images[tr])), spec, device)
    y_tr = torch.as_tensor(tr_y, device=device)
    x_ho = normalize(torch.from_numpy(np.ascontiguousarray(images[ho])), spec, device)
    y_ho = torch.as_tensor(ho_y, device=device)
    data_s, train_s, eval_s = time.perf_counter() - t0, 0.0, 0.0

    t0 = time.perf_counter()            # a stretch of training begins (here, and after each evaluation)
    model = build_model(cfg.arch, num_classes=len(classes), image_size=size, width=cfg.width).to(device)
    steps_per_epoch = max(1, int(np.ceil(len(tr) / cfg.batch_size)))
    if cfg.arch == "conv4" or cfg.optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.01, total_steps=cfg.epochs * steps_per_epoch)

    best_acc, best_state = -1.0, None
    for _ in range(cfg.epochs):
        model.train()
        order = rng.permutation(len(tr))
        for i in range(0, len(order), cfg.batch_size):
            idx = torch.as_tensor(order[i:i + cfg.batch_size], device=device)
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 50.0)
            opt.step()
            sched.step()
        t1 = time.perf_counter()
        train_s += t1 - t0
        acc = _accuracy(model, x_ho, y_ho)
        if acc > best_acc:
            # A deep copy: the seeds kept a reference and so saved the last epoch (reference bug B5).
            best_acc, best_state = acc, copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
        t0 = time.perf_counter()
        eval_s += t0 - t1
    assert best_state is not None
    if times is not None:
        times.data, times.train, times.evaluate = data_s, train_s, eval_s
    return best_state, best_acc


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Have glibc's malloc in this process keep freed memory for reuse instead of handing it back to the
    kernel (no ``mmap`` for large blocks; up to ``trim_threshold`` bytes of free heap kept). True if set.

    Why: a conv4 step on a batch of 128 32-px images allocates activations of 33.5 MB each (128 x 64 x
    32 x 32 floats), just above glibc's largest mmap threshold (32 MB), and the held-out evaluation's
    batches of 512 four times that. Each such block was mmap'ed and munmap'ed within the step, and the
    kernel faulted in and zeroed fresh pages for it every time. On the glyph quick profile
    (``benchmarks/zoo_scaling.py --malloc-defaults``, docs/benchmarks.md) that was 0.3-0.8 million page
    faults and 0.4-1.0 s of kernel time per teacher of ~7 s on a Ray worker (in-process, up to 1.8
    million and 2.4 s), and page faults of two processes at once contend in the kernel (a loop of 33 MB
    allocate-touch-free took 1.7x the kernel time per fault with two processes running it at once). With
    this setting a teacher takes 0.02-0.04 million faults and 0.03-0.08 s of kernel time. Nothing
    computed changes (the same teacher files, byte for byte).

    It lasts for the process's life, so it is called only in the Ray workers that train teachers, never in
    the user's own interpreter: a worker then keeps what it freed for its next tasks (free heap beyond
    ``trim_threshold``, 1 GiB, still goes back to the kernel), so its memory stays near its peak. ``RAYDFML_KEEP_FREED_MEMORY=0`` in the
    workers' environment leaves glibc's defaults (``benchmarks/zoo_scaling.py --malloc-defaults``
    measures the difference). Elsewhere than glibc (macOS, musl) it does nothing.
    """
    if os.environ.get("RAYDFML_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))


def _train_task(images: np.ndarray, labels: np.ndarray, classes: tuple[int, ...], cfg: ZooConfig, seed: int,
                times: TeacherTimes):
    """Body of the Ray task: pick the device Ray gave us (one CPU thread, or a GPU share); the arrays
    are the split's, shared through the object store (read in place, not copied per task)."""
    from ..cluster import worker_device

    times.kept_freed_memory = keep_freed_memory()
    device = worker_device()
    with Stopwatch(times):
        state, acc = train_teacher(images, labels, classes, cfg, seed, device, times)
    return state, acc, times


def _plan_difference(rec: TeacherRecord, cfg: ZooConfig, classes: tuple[int, ...], size: int) -> str | None:
    """What differs between a manifest record and the teacher this build would train in its place."""
    want = {"dataset": cfg.dataset, "arch": cfg.arch, "width": cfg.width, "classes": classes,
            "epochs": cfg.epochs, "seed": cfg.seed, "image_size": size}
    for key, value in want.items():
        if getattr(rec, key) != value:
            return f"{key} {getattr(rec, key)!r} there, {value!r} in this plan"
    return None


def _reusable(rec: TeacherRecord, zoo_dir: Path, cfg: ZooConfig, classes: tuple[int, ...], size: int) -> bool:
    """True: the recorded teacher is this plan's; False: its file is missing (an interrupted build:
    train it). A teacher of another plan, or a file that no longer matches its checksum, is never
    retrained over: the user's files are not ours to overwrite (a one-line UserError says what to do)."""
    path = zoo_dir / rec.file
    diff = _plan_difference(rec, cfg, classes, size)
    if diff is not None and path.is_file():
        raise UserError(f"zoo {zoo_dir} holds teachers of another plan (teacher {rec.teacher_id}: {diff}); "
                        "choose another --zoo-dir, or delete that folder to rebuild it")
    if not path.is_file():
        return False
    if sha256_file(path) != rec.sha256:
        raise UserError(f"zoo {zoo_dir}: {rec.file} does not match the sha256 in manifest.csv (changed or "
                        "replaced since it was trained); restore it, or delete it to retrain that teacher")
    return True


def build_zoo(cfg: ZooConfig, zoo_dir: str | Path, data_root: str | Path, workers: int = 1,
              device: str = "auto", progress: bool = True, split: ImageSplit | None = None,
              times: BuildTimes | None = None) -> list[TeacherRecord]:
    """Train (or reuse) every teacher of ``cfg`` into ``zoo_dir``; returns the manifest records.

    Teachers whose file still matches its manifest checksum are skipped, so a re-run is a no-op and
    an interrupted build resumes. The manifest is rewritten after every finished teacher.
    ``workers=0`` trains in this process; ``workers>=1`` runs that many Ray tasks at once. Every
    teacher's training is seeded by (``cfg.seed``, its id) alone, so the weights do not depend on the
    number of workers. ``times`` (a ``BuildTimes``), if given, records where the time went.
    """
    cfg.validate()
    times = times if times is not None else BuildTimes()
    times.workers, times.start = max(0, workers), time.time()
    zoo_dir = Path(zoo_dir).resolve()
    zoo_dir.mkdir(parents=True, exist_ok=True)
    # A zoo that is already complete is only read, without the lock: runs sharing one data root (a sweep,
    # several experiments at once) then use it side by side; only training a teacher takes the lock.
    records, split = _build_zoo(cfg, zoo_dir, data_root, workers, device, progress, split, times, may_train=False)
    if records is None:
        with exclusive_lock(zoo_dir / ".lock", f"zoo {zoo_dir}"):      # two builds never interleave manifests
            records, _ = _build_zoo(cfg, zoo_dir, data_root, workers, device, progress, split, times)
    times.total = time.time() - times.start
    return records


def _build_zoo(cfg: ZooConfig, zoo_dir: Path, data_root, workers: int, device: str, progress: bool,
               split: ImageSplit | None, times: BuildTimes, may_train: bool = True
               ) -> tuple[list[TeacherRecord] | None, ImageSplit | None]:
    """The zoo's records and the split read for them; with ``may_train=False``, ``None`` instead of the
    records when a teacher would have to be trained (nothing is written then)."""
    spec = get_spec(cfg.dataset)
    size = cfg.image_size or spec.image_size
    manifest = read_manifest(zoo_dir, missing_ok=True)
    imported = bool(manifest) and all(r.seed == -1 and r.epochs == 0 for r in manifest)
    if imported:
        return sorted(manifest, key=lambda r: r.teacher_id), split     # imported teachers: used as they are
    if not may_train and len(manifest) < cfg.num:
        return None, split
    if workers > 0 and len(manifest) < cfg.num:
        _warm_workers(workers, times)       # teachers to train: workers start while the split is read
    if split is None:
        t0 = time.perf_counter()
        ensure_dataset(data_root, cfg.dataset, progress)
        split = load_split(data_root, cfg.dataset, "meta_train", image_size=size)
        times.data = time.perf_counter() - t0
    plans = plan_classes(cfg, split.num_classes)
    existing = {r.teacher_id: r for r in manifest}
    records: dict[int, TeacherRecord] = {}
    todo = []
    for tid, classes in enumerate(plans):
        rec = existing.get(tid)
        if rec is not None and _reusable(rec, zoo_dir, cfg, classes, size):
            records[tid] = rec
        else:
            todo.append((tid, classes))
    if todo and not may_train:
        return None, split
    # Records beyond this plan (a zoo built with a larger --num) are kept; they stay valid teachers.
    for tid, rec in existing.items():
        if tid >= len(plans):
            records[tid] = rec

    def finish(tid: int, classes: tuple[int, ...], state: dict, acc: float) -> None:
        t0 = time.perf_counter()
        fname = f"teacher_{tid:04d}.pt"
        with atomic_path(zoo_dir / fname) as tmp:
            torch.save(state, tmp)
        records[tid] = TeacherRecord(tid, cfg.dataset, cfg.arch, cfg.width, size, classes, round(acc, 6),
                                     cfg.seed, cfg.epochs, fname, sha256_file(zoo_dir / fname))
        write_manifest(zoo_dir, list(records.values()))
        times.write += time.perf_counter() - t0

    bar = tqdm(total=len(plans), initial=len(plans) - len(todo), desc=f"teachers ({cfg.arch})", unit="teacher",
               disable=not progress)
    if workers <= 0:
        from ..utils import resolve_device, torch_threads

        dev = resolve_device(device)
        for tid, classes in todo:
            teacher_times = TeacherTimes(tid, queued=time.time())
            # One CPU thread, as a Ray worker trains (worker_device): a ResNet teacher trained with 2 threads
            # differs in its weights from one trained with 1, so the zoo would depend on where it was built.
            with torch_threads(1 if dev.type == "cpu" else torch.get_num_threads()), Stopwatch(teacher_times):
                state, acc = train_teacher(split.images, split.labels, classes, cfg, teacher_seed(cfg.seed, tid), dev,
                                           teacher_times)
            times.teachers.append(teacher_times)
            finish(tid, classes, state, acc)
            bar.update(1)
            bar.set_postfix(last_acc=f"{acc:.3f}")
    elif todo:
        _build_on_ray(cfg, split, todo, workers, finish, bar, times)
    bar.close()
    return [records[k] for k in sorted(records)], split


def _warm_up() -> int:
    """A Ray task that does nothing but exist: running it makes a worker import this module (torch,
    the models) and set its allocator, the ~2 s a worker otherwise spends before its first teacher."""
    keep_freed_memory()
    return os.getpid()


def _warm_workers(workers: int, times: BuildTimes) -> list:
    """Start Ray and one warm-up task per worker, without waiting for them: the workers' start-up
    then overlaps with the driver reading the split, instead of following it (docs/benchmarks.md,
    "Workers that start warm")."""
    import ray

    from ..cluster import ensure_ray, gpu_fraction

    t0 = time.perf_counter()
    ensure_ray()
    times.ray_start = time.perf_counter() - t0
    task = ray.remote(_warm_up).options(num_cpus=1, num_gpus=gpu_fraction(workers))
    return [task.remote() for _ in range(workers)]      # nobody waits for them


def _build_on_ray(cfg, split, todo, workers, finish, bar, times: BuildTimes) -> None:
    """Each teacher is an independent Ray task; ``workers`` of them run at once and the next starts as
    soon as any finishes (results are taken as they complete, not in teacher order). The split goes
    into the object store once and every task reads it there."""
    import ray

    from ..cluster import ensure_ray, gpu_fraction

    t0 = time.perf_counter()
    ensure_ray()
    times.ray_start += time.perf_counter() - t0
    task = ray.remote(_train_task).options(num_cpus=1, num_gpus=gpu_fraction(workers), max_retries=1)
    t0 = time.perf_counter()
    images_ref, labels_ref = ray.put(split.images), ray.put(split.labels)
    times.put = time.perf_counter() - t0
    pending: dict = {}
    queue = list(todo)
    while queue or pending:
        while queue and len(pending) < workers:
            tid, classes = queue.pop(0)
            ref = task.remote(images_ref, labels_ref, classes, cfg, teacher_seed(cfg.seed, tid),
                              TeacherTimes(tid, queued=time.time()))
            pending[ref] = (tid, classes)
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            tid, classes = pending.pop(ref)
            state, acc, teacher_times = ray.get(ref)
            times.teachers.append(teacher_times)
            finish(tid, classes, state, acc)
            bar.update(1)
            bar.set_postfix(last_acc=f"{acc:.3f}")


def default_zoo_dir(data_root: str | Path, cfg: ZooConfig) -> Path:
    width = "" if cfg.width == 1.0 else f"-w{cfg.width:g}"
    if cfg.optimizer != "seeds" and cfg.arch != "conv4":      # conv4 trains with Adam either way
        width += f"-{cfg.optimizer}"
    plans = f"-p{cfg.plan_offset}" if cfg.plan_offset else ""
    return Path(data_root) / "zoo" / (f"{get_spec(cfg.dataset).slug}-{cfg.arch}{width}-{cfg.way}way-{cfg.policy}-n{cfg.num}{plans}"
                                      f"-s{cfg.seed}-e{cfg.epochs}")
