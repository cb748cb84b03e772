"""TGR's task space: embed teachers by a probe's diagonal Fisher, compare them, group dissimilar ones.

Pipeline (run once before training, optionally again every R rounds; the groups are cached as JSON
in the run directory)::

    probe = make_probe(seed)                                  # offline: nothing is downloaded
    E = torch.stack([fisher_embedding(probe, rec_i.images, rec_i.labels, mean, std) for each teacher i])
    S = task_similarity(E)                                    # [M, M], Task2Vec's normalised cosine
    groups = heterogeneous_groups(S, n_groups, seed)          # spectral clustering of 1 - S, ALL teachers
    save_groups(run_dir / "tgr_groups.json", groups, teacher_ids=ids)

**Probe.** TGR used torchvision's ImageNet ResNet-34 (downloaded weights) with its 1000-way head
against labels 0-4 and squared *batch* gradients of 5 batches (bug B17: an untrained, mismatched
head and a very noisy estimate). Here the probe is an offline network: ``make_probe(seed)``, a
seeded random Conv4, or any zoo teacher passed in. ``fisher_embedding`` works on a private copy:

1. BN statistics are calibrated on the teacher's recovered images (then fixed), so the network is a
   per-image function and per-sample gradients are exact (``vmap``);
2. a fresh ``way``-way head (seeded) is fitted for ``head_steps`` (50) Adam steps with the body
   frozen (Task2Vec's recipe). This makes the embedding follow the *class set*, not the teacher's
   head order: with a random head, the same classes in another label order give another Fisher;
3. the empirical Fisher ``mean_k (∇ℓ_k)²`` over samples (Task2Vec's per-sample estimator; TGR's
   batch form with ``per_sample=False``) of the body's parameters, every coordinate (``reduce``).

Measured on the test universe (10 blob classes, 16 px; teachers 0/1 on classes 0-4 in different
head orders, 2/3 on 5-9; 30 teacher-labelled images per class; gap = min S(same class set) -
max S(disjoint)), two data draws each:

- random probes (3 seeds), head_steps 10 / 30 / 50 / 100 / 200: gap -0.01..0.05 / 0.05..0.11 /
  0.065..0.105 / 0.05..0.09 / 0.03..0.08; a trained teacher on other classes as the probe:
  0.14 / 0.10..0.14 / 0.08..0.11 / 0.03..0.07 / 0.03..0.07. Too short a fit leaves the head's
  randomness in; a long one makes most per-sample gradients vanish (confident predictions).
- per-sample vs batch Fisher (2 batches): per-sample is clearly better (batch gaps mostly <= 0.03);
  filter-averaged Fisher (Task2Vec's ``reduce="filter"``) was *worse* than every coordinate here.
- with 20 images per class the gaps roughly halve; on an earlier version of the data (uniformly random
  backgrounds, smaller blobs: the background dominated the image statistics) no configuration
  separated the class sets reliably: the embedding can only see what distinguishes the data.

So both probes work; a zoo teacher is the stronger one when the pool has one to spare (it must be
the same network for every teacher), a random Conv4 is the fully offline default.

**Similarity.** ``S_ij = cos(F_i / (F_i + F_j + eps), F_j / (F_i + F_j + eps))`` over all
coordinates (or averaged over parameter tensors, TGR's variant, with ``segments``). The pairwise
denominator rules out a plain matmul, so the three sums it needs are accumulated with chunked
broadcasting over all pairs at once (memory ``M^2 * chunk``), on the embeddings' device.

**Groups.** ``SpectralClustering(affinity="precomputed")`` fitted on the *dissimilarity*
``D = 1 - S`` as the affinity: dissimilar teachers are strongly linked, so each cluster mixes
dissimilar teachers (TGR's heterogeneous groups), over *all* teachers of the pool (TGR clustered
only the first 100 of 300 in md/ma: bug B3).
"""
from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..models import build_model
from ..synthesis.base import cpu_generator, make_normalizer, module_device

HEAD = "classifier."


# ------------------------------------------------------------------------------------------- probe

def make_probe(seed: int = 0, *, arch: str = "conv4", image_size: int = 32, width: float = 1.0,
               adaptive_pool: bool = False, way: int = 5) -> nn.Module:
    """A seeded random probe network with batch-statistic BN (no running buffers).

    The init is a function of ``seed`` only (the global RNG is untouched), so every process that
    embeds teachers builds the same probe. ``adaptive_pool=True`` accepts mixed input sizes (md).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build_model(arch, num_classes=way, image_size=image_size, width=width, track_bn_stats=False,
                           adaptive_pool=adaptive_pool)


def _fisher_params(net: nn.Module, include_head: bool) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in net.named_parameters() if include_head or not n.startswith(HEAD)]


REDUCE = ("filter", "none")


def _reduced(t: Tensor, reduce: str) -> Tensor:
    """Task2Vec's filter averaging: a weight [C_out, ...] becomes its per-output-channel mean."""
    if reduce == "filter" and t.dim() >= 2:
        return t.flatten(1).mean(1)
    return t.flatten()


def fisher_segments(probe: nn.Module, include_head: bool = False, reduce: str = "none") -> list[int]:
    """Sizes of the parameter tensors' blocks in ``fisher_embedding``'s output (for per-tensor similarity)."""
    return [_reduced(p.detach(), reduce).numel() for _, p in _fisher_params(probe, include_head)]


def _calibrated(probe: nn.Module, batches: list[Tensor]) -> nn.Module:
    """A copy of ``probe`` in eval mode whose BN statistics are the averages over ``batches``.

    Every BN layer gets fresh running buffers (also a probe built without them), accumulated with
    ``momentum=None`` (an equal-weight average over the batches) from these images. With fixed
    statistics BN is a per-sample affine map, so the network is one function of each image, whatever
    batch it sits in, and per-sample gradients are exact and cheap (``vmap``). A random probe has no
    meaningful statistics of its own; a zoo teacher's would describe its own training data.
    """
    net = copy.deepcopy(probe)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            dev = m.weight.device if m.weight is not None else batches[0].device
            m.track_running_stats, m.momentum = True, None
            m.register_buffer("running_mean", torch.zeros(m.num_features, device=dev))
            m.register_buffer("running_var", torch.ones(m.num_features, device=dev))
            m.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=dev))
    net.train()
    with torch.no_grad():
        for xb in batches:
            net(xb)
    return net.eval()


def fisher_embedding(probe: nn.Module, images01: Tensor, labels: Tensor, mean: Sequence[float],
                     std: Sequence[float], *, batch: int = 50, per_sample: bool = True, head_steps: int = 50,
                     head_lr: float = 1e-2, seed: int = 0, include_head: bool = False,
                     reduce: str = "none", dtype: torch.dtype = torch.float32) -> Tensor:
    """Diagonal empirical Fisher of ``probe`` on one teacher's recovered data, as one flat vector.

    ``images01``: [N, 3, S, S] in [0, 1] (any float dtype, e.g. ``Recovered.images``);
    ``labels``: relative labels 0..way-1. ``probe`` needs ``forward_features`` and a ``classifier``
    ``nn.Linear`` head (every backbone in ``raydfml.models``); it is not modified. A copy gets BN
    statistics calibrated on these images (``_calibrated``) and a fresh head (seeded), fitted for
    ``head_steps`` full-batch Adam steps at ``head_lr`` with the body frozen (see the module docstring).
    The Fisher is ``mean_k (∇ℓ_k)²`` over samples (``per_sample=True``, Task2Vec) or the mean over
    batches of the squared batch-mean gradient (``per_sample=False``, TGR), w.r.t. the body (plus the
    head with ``include_head``); ``reduce="filter"`` averages each weight tensor over its output
    channel (Task2Vec's filter-level embedding: far less noisy, and ~100x shorter), ``"none"`` keeps
    every coordinate (TGR). ``seed`` fixes the head init and the batch shuffle. The result is on the
    probe's device in ``dtype``: float32 by default; a 16-bit cache should be bfloat16 (squared
    gradients underflow float16).
    """
    if reduce not in REDUCE:
        raise ValueError(f"fisher_embedding: reduce must be one of {REDUCE}, got {reduce!r}")
    if images01.shape[0] != labels.shape[0] or images01.shape[0] == 0:
        raise ValueError(f"fisher_embedding: {images01.shape[0]} images but {labels.shape[0]} labels")
    head = getattr(probe, "classifier", None)
    if not isinstance(head, nn.Linear) or not hasattr(probe, "forward_features"):
        raise TypeError(f"the probe needs forward_features and an nn.Linear 'classifier'; "
                        f"{type(probe).__name__} has not")
    device = module_device(probe)
    x = make_normalizer(mean, std, device)(images01.detach().to(device, torch.float32))
    y = labels.detach().to(device, torch.int64)
    order = torch.randperm(len(y), generator=cpu_generator(seed)).to(device)
    batches = list(order.split(int(batch)))
    net = _calibrated(probe, [x[b] for b in batches]).requires_grad_(True)
    way = int(labels.max()) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net.classifier = nn.Linear(head.in_features, way).to(device)

    if head_steps > 0:
        with torch.no_grad():
            feats = net.forward_features(x)
        opt = torch.optim.Adam(net.classifier.parameters(), lr=head_lr)
        for _ in range(int(head_steps)):
            loss = F.cross_entropy(net.classifier(feats), y)
            grads = torch.autograd.grad(loss, list(net.classifier.parameters()))
            for p, g in zip(net.classifier.parameters(), grads):
                p.grad = g
            opt.step()

    names = [n for n, _ in _fisher_params(net, include_head)]
    params = {n: p.detach() for n, p in net.named_parameters()}
    buffers = dict(net.named_buffers())

    def loss_of(fisher_params: dict, xb: Tensor, yb: Tensor) -> Tensor:
        logits = functional_call(net, ({**params, **fisher_params}, buffers), (xb,))
        return F.cross_entropy(logits, yb)

    def sample_loss(fisher_params: dict, xk: Tensor, yk: Tensor) -> Tensor:
        return loss_of(fisher_params, xk[None], yk[None])

    wrt = {n: params[n] for n in names}
    fisher = {n: torch.zeros_like(params[n]) for n in names}
    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    for b in batches:
        if per_sample:
            for n, g in per_sample_grad(wrt, x[b], y[b]).items():
                fisher[n] += g.square().sum(0)
        else:
            for n, g in grad(loss_of)(wrt, x[b], y[b]).items():
                fisher[n] += g.square()
    count = len(y) if per_sample else len(batches)
    return torch.cat([_reduced(fisher[n], reduce) for n in names]).div_(count).to(dtype)


# -------------------------------------------------------------------------------------- similarity

def task_similarity(embeddings: Tensor, *, segments: Sequence[int] | None = None, eps: float = 1e-6,
                    max_elements: int = 1 << 22) -> Tensor:
    """Task2Vec's normalised cosine between every pair of rows of ``embeddings`` [M, P]: [M, M].

    ``S_ij = <a, b> / (|a| |b|)`` with ``a = F_i / (F_i + F_j + eps)``, ``b = F_j / (F_i + F_j + eps)``.
    With ``w = (F_i + F_j + eps)^-2`` the three sums are ``Σ F_i F_j w``, ``Σ F_i^2 w`` and
    ``Σ F_j^2 w``; the last is the transpose of the second, so two [M, M] accumulators suffice. They
    are accumulated over coordinate chunks of ``max_elements / M^2`` columns, each chunk a broadcast
    over all pairs (no Python loop over pairs). ``segments`` (sizes summing to P, e.g.
    ``fisher_segments``) averages the cosine over parameter tensors instead (TGR's form). Computed in
    float32 (float64 for float64 input) on the embeddings' device; symmetric, diagonal 1; a pair
    with an all-zero side gets 0.
    """
    if embeddings.dim() != 2:
        raise ValueError(f"task_similarity expects [M, P] embeddings, got shape {tuple(embeddings.shape)}")
    work = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    e = embeddings.detach().to(work)
    m, p = e.shape
    if (e < 0).any():
        raise ValueError("task_similarity: Fisher embeddings must be non-negative")
    sizes = [p] if segments is None else [int(s) for s in segments]
    if sum(sizes) != p or any(s <= 0 for s in sizes):
        raise ValueError(f"segments sum to {sum(sizes)} (all must be > 0), embeddings have {p} columns")
    chunk = max(1, int(max_elements) // max(1, m * m))
    total = torch.zeros(m, m, dtype=work, device=e.device)
    lo = 0
    for size in sizes:
        dot = torch.zeros(m, m, dtype=work, device=e.device)
        sq = torch.zeros(m, m, dtype=work, device=e.device)          # sq[i, j] = Σ F_i^2 w_ij = |a_ij|^2
        for c0 in range(lo, lo + size, chunk):
            a = e[:, c0:min(c0 + chunk, lo + size)]
            den = a[:, None, :] + a[None, :, :] + eps                              # [M, M, c]
            # Where both sides are 0 (possible with eps=0) the numerators are 0 too: weight 0, not 0/0.
            w = torch.where(den > 0, den.reciprocal().square(), torch.zeros((), dtype=work, device=e.device))
            dot += torch.einsum("ic,jc,ijc->ij", a, a, w)
            sq += torch.einsum("ic,ijc->ij", a.square(), w)
        total += dot / (sq * sq.T).sqrt().clamp_min(torch.finfo(work).tiny)
        lo += size
    s = total / len(sizes)
    s = (s + s.T) / 2
    s.fill_diagonal_(1.0)
    return s


# ----------------------------------------------------------------------------------------- groups

def heterogeneous_groups(similarity: Tensor | np.ndarray, n_groups: int, seed: int = 42, *,
                         n_init: int = 30, refine: bool = True) -> list[list[int]]:
    """Partition all M teachers into at most ``n_groups`` groups of mutually *dissimilar* teachers.

    ``SpectralClustering(n_clusters=n_groups, affinity="precomputed", n_init, random_state=seed)``
    (TGR's settings: n_init 30, seed 42) on ``D = 1 - S`` (clipped to [0, 1], zero diagonal,
    symmetrised) used as the affinity: strongly linked = dissimilar teachers share a group.

    ``refine`` (default on; TGR had no such step) then moves single teachers between groups while
    that lowers the normalised cut of ``D`` (the objective spectral clustering relaxes). Why: a pool
    of a few task families gives a nearly *multipartite* ``D`` (dissimilar pairs across families,
    small values within), for which every balanced mixing partition has the same normalised cut; the
    relaxation's eigenvectors are then degenerate and k-means on them often splits off a single
    teacher (measured: 19-72 of 300 random 4-teacher/2-family pools, depending on ``assign_labels``;
    0 after refining). Deterministic for a given ``seed``. Groups are sorted lists of row indices of
    ``similarity``, ordered by their first member; sizes are not constrained (TGR). Degenerate inputs
    (``n_groups`` 1 or M, or all teachers identical so that ``D`` has no edges) give the trivial
    partitions (one group / singletons / round-robin by index).
    """
    s = np.asarray(similarity.detach().cpu().double() if isinstance(similarity, Tensor) else similarity,
                   dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != s.shape[1]:
        raise ValueError(f"similarity must be square, got shape {s.shape}")
    m = s.shape[0]
    if not 1 <= n_groups <= m:
        raise ValueError(f"n_groups must be in 1..{m} (the number of teachers), got {n_groups}")
    if n_groups == 1:
        return [list(range(m))]
    if n_groups == m:
        return [[i] for i in range(m)]
    d = np.clip(1.0 - (s + s.T) / 2, 0.0, 1.0)
    np.fill_diagonal(d, 0.0)
    if not (d > 0).any():
        return [list(range(g, m, n_groups)) for g in range(n_groups)]
    from sklearn.cluster import SpectralClustering

    with warnings.catch_warnings():
        # A pool with some identical teachers gives a disconnected graph; the clustering still works.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = SpectralClustering(n_clusters=n_groups, affinity="precomputed", n_init=n_init,
                                    random_state=seed).fit_predict(d)
    labels = np.unique(labels, return_inverse=True)[1]
    if refine:
        labels = _refine_ncut(d, labels)
    groups = [sorted(int(i) for i in np.flatnonzero(labels == g)) for g in np.unique(labels)]
    return sorted(groups, key=lambda g: g[0])


def normalized_cut(affinity: np.ndarray, labels: np.ndarray) -> float:
    """``Σ_g cut(g, rest) / vol(g)`` of a partition (``labels[i]`` = group of row i) of a graph."""
    labels = np.asarray(labels)
    deg = affinity.sum(1)
    total = 0.0
    for g in np.unique(labels):
        inside = labels == g
        vol = deg[inside].sum()
        if vol > 0:
            total += affinity[np.ix_(inside, ~inside)].sum() / vol
    return float(total)


def _refine_ncut(d: np.ndarray, labels: np.ndarray, max_sweeps: int = 100) -> np.ndarray:
    """Greedy single-teacher moves that lower the normalised cut of ``d`` (no group is emptied).

    Each sweep applies the best improving move (ties: lowest teacher, then lowest group), so the
    result is deterministic. Uses ``Σ_g cut/vol = k - Σ_g assoc(g)/vol(g)``, updated per move in O(k).
    """
    labels = labels.copy()
    k = int(labels.max()) + 1
    deg = d.sum(1)
    for _ in range(max_sweeps * len(labels)):
        onehot = np.eye(k)[labels]                       # [M, k]
        links = d @ onehot                               # links[i, g] = Σ_{j in g} d_ij
        assoc = (onehot * links).sum(0)                  # assoc[g] = Σ_{i, j in g} d_ij
        vol = onehot.T @ deg
        sizes = onehot.sum(0)
        ratio = np.divide(assoc, vol, out=np.zeros(k), where=vol > 0)
        best, move = 1e-12, None
        for i in range(len(labels)):
            a = labels[i]
            if sizes[a] == 1:
                continue
            new_a_assoc, new_a_vol = assoc[a] - 2 * links[i, a], vol[a] - deg[i]
            ra = new_a_assoc / new_a_vol if new_a_vol > 0 else 0.0
            for b in range(k):
                if b == a:
                    continue
                new_b_assoc, new_b_vol = assoc[b] + 2 * links[i, b], vol[b] + deg[i]
                rb = new_b_assoc / new_b_vol if new_b_vol > 0 else 0.0
                gain = (ra + rb) - (ratio[a] + ratio[b])
                if gain > best:
                    best, move = gain, (i, b)
        if move is None:
            break
        labels[move[0]] = move[1]
    return labels


def _check_partition(groups: Sequence[Sequence[int]], m: int) -> None:
    members = sorted(int(i) for g in groups for i in g)
    if members != list(range(m)) or any(len(g) == 0 for g in groups):
        raise ValueError(f"groups must partition 0..{m - 1} into non-empty groups, got {groups}")


def save_groups(path: str | os.PathLike, groups: Sequence[Sequence[int]], *, teacher_ids: Sequence[int] | None = None,
                similarity: Tensor | np.ndarray | None = None, identity: dict | None = None, **meta) -> Path:
    """Write the groups (row indices) as JSON, atomically (temp file + rename: a killed run never
    leaves half a cache). ``teacher_ids`` (the pool's teacher ids in row order) lets ``load_groups``
    detect a cache from another pool; ``similarity`` (rounded to 6 decimals) and ``meta`` are kept
    for reports. ``identity`` (e.g. the teachers' checksums and the grouping options) must match on load."""
    m = len(teacher_ids) if teacher_ids is not None else sum(len(g) for g in groups)
    _check_partition(groups, m)
    doc = {"version": 1, "n_teachers": m, "groups": [[int(i) for i in g] for g in groups],
           "teacher_ids": None if teacher_ids is None else [int(t) for t in teacher_ids],
           "similarity": None if similarity is None else np.round(np.asarray(
               similarity.detach().cpu() if isinstance(similarity, Tensor) else similarity, dtype=float), 6).tolist(),
           "identity": identity, "meta": meta}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)
    return path


def load_groups(path: str | os.PathLike, teacher_ids: Sequence[int] | None = None,
                identity: dict | None = None) -> list[list[int]] | None:
    """The cached groups, or None when there is no cache or it belongs to another pool (its
    ``teacher_ids`` or ``identity`` differ from the given ones): then recompute and ``save_groups`` again."""
    path = Path(path)
    if not path.is_file():
        return None
    doc = json.loads(path.read_text())
    if teacher_ids is not None and doc.get("teacher_ids") != [int(t) for t in teacher_ids]:
        return None
    if identity is not None and doc.get("identity") != json.loads(json.dumps(identity)):
        return None
    groups = [[int(i) for i in g] for g in doc["groups"]]
    _check_partition(groups, int(doc["n_teachers"]))
    return groups


__all__ = ["fisher_embedding", "fisher_segments", "heterogeneous_groups", "load_groups", "make_probe",
           "normalized_cut", "save_groups", "task_similarity"]
