"""Dataset quantization (DQ, Zhou et al. ICCV 2023): GraphCut bins, then uniform sampling.

Pure torch, no Lightning: the :class:`ld3m.modules.DQ` method embeds the images and calls
:func:`quantize`.

Per class, with ``s_ij`` the cosine similarity of the samples' features:

1. **Bins.** The class is split into ``K`` non-overlapping bins whose sizes differ by at most
   one (so together they are exactly the class). Bin ``k`` greedily picks its samples from the
   pool ``V_k`` that bins ``0 .. k-1`` left, maximising the GraphCut function

   ``f(S) = sum_{i in V_k, j in S} s_ij - lam * sum_{i, j in S} s_ij``,

   whose marginal gain is ``f(S + j) - f(S) = c_j - lam * (2 r_j + s_jj)`` with the coverage
   ``c_j = sum_{i in V_k} s_ij`` and ``r_j = sum_{i in S} s_ij``. Early bins are therefore
   representative of the class, later ones diverse. The last bin is what the others left.
2. **Sampling.** The same fraction is drawn uniformly (a ``torch.Generator``, never the global
   RNG) from every bin, so that exactly ``ipc`` samples of the class are kept.

The ground set ``V_k`` is the *remaining* pool, as in the authors' code (``quantize_sample.py``
rebuilds the training set from the indices earlier bins left, and their ``GraphCut`` sums
similarities over that set). Their gain is written ``lam * c_j - 2 r_j`` (``lam`` weighting
coverage); this module follows the paper (``lam`` weighting the pairwise
term) and includes the constant self-similarity ``s_jj``: for ``lam = 1`` the two rank every
candidate identically.

Efficiency. Greedy selection keeps ``c`` and ``r`` as vectors over the pool: a pick costs one
similarity row and a vectorised argmax (ties go to the lowest index). The coverage of the next
pool is ``c - r`` restricted to what is left, so it is computed once per class, from the
factorised form ``c = U (U^T 1)`` (no ``n x n`` matrix). When the class's ``n x n`` similarity
matrix fits in ``max_matrix_bytes`` it is computed once and a row is a lookup; otherwise each
row is computed on the fly (``O(n D)`` memory). Everything runs in float64 so that both paths
make the same choices.

Features may be one ``(n, D)`` tensor or a pair ``(A, B)`` standing for the rows of their
Kronecker products ``a_i (x) b_i`` (e.g. last-layer gradients, ``(p - y) (x) [h, 1]``): the
cosine similarity of such rows is ``cos(a_i, a_j) * cos(b_i, b_j)``, so the (large) products
are never built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

#: One feature matrix ``(n, D)`` or two whose row-wise Kronecker products are the features.
Features = torch.Tensor | tuple[torch.Tensor, torch.Tensor]

#: Largest ``n x n`` similarity matrix (bytes) held in memory by default: a float64 class of
#: up to 8,192 samples. Larger classes compute similarity rows on the fly.
DEFAULT_MATRIX_BYTES = 512 * 2**20

_EPS = 1e-12


def _factors(features: Features) -> tuple[torch.Tensor, ...]:
    factors = (features,) if isinstance(features, torch.Tensor) else tuple(features)
    if not 1 <= len(factors) <= 2 or not all(isinstance(f, torch.Tensor) for f in factors):
        raise ValueError("features must be an (n, D) tensor or a pair of (n, D_a), (n, D_b) tensors")
    for f in factors:
        if f.dim() != 2 or f.shape[1] < 1:
            raise ValueError(f"features must be 2-D (n, D) with D >= 1, got shape {tuple(f.shape)}")
    if len({f.shape[0] for f in factors}) != 1:
        raise ValueError(f"the feature factors have different numbers of rows: "
                         f"{[tuple(f.shape) for f in factors]}")
    return factors


def feature_rows(features: Features) -> int:
    """Number of samples ``n`` in ``features`` (checking their shapes)."""
    return _factors(features)[0].shape[0]


def take_rows(features: Features, index: torch.Tensor) -> Features:
    """The rows ``index`` of ``features`` (of every factor)."""
    factors = _factors(features)
    index = index.to(factors[0].device)
    return factors[0][index] if len(factors) == 1 else (factors[0][index], factors[1][index])


class CosineSimilarity:
    """Cosine similarity between the rows of ``features`` (one class), in float64.

    Args:
        features: ``(n, D)`` features, or a pair whose row-wise Kronecker products are them.
        max_matrix_bytes: Hold the whole ``n x n`` matrix when it fits in this many bytes;
            otherwise compute rows on demand (0: always on demand).
    """

    def __init__(self, features: Features, max_matrix_bytes: int = DEFAULT_MATRIX_BYTES) -> None:
        factors = _factors(features)
        if max_matrix_bytes < 0:
            raise ValueError(f"max_matrix_bytes must be >= 0, got {max_matrix_bytes}")
        if not all(torch.isfinite(f).all() for f in factors):
            raise ValueError("features contain NaN or infinite values")
        # zero rows stay zero (similarity 0 to everything, themselves included)
        self.factors = [F.normalize(f.detach().to(torch.float64), dim=1, eps=_EPS) for f in factors]
        self.n = factors[0].shape[0]
        self.matrix: torch.Tensor | None = None
        if self.n * self.n * 8 <= max_matrix_bytes:
            everything = torch.arange(self.n, device=self.device)
            self.matrix = self.block(everything, everything)

    @property
    def device(self) -> torch.device:
        return self.factors[0].device

    def block(self, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``s[rows][:, cols]``, computed from the features."""
        out = None
        for f in self.factors:
            part = f[rows] @ f[cols].T
            out = part if out is None else out * part
        return out

    def row(self, i: int | torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """``s[i, cols]``: a lookup in the matrix, or computed on the fly (``i`` may be a 0-dim
        tensor on the device: no read back to the host)."""
        if not isinstance(i, torch.Tensor):
            return self.matrix[i, cols] if self.matrix is not None else self.block(
                torch.tensor([i], device=self.device), cols)[0]
        rows = i.reshape(1)  # a 1-element index: a 0-dim one would be read back as an int
        if self.matrix is not None:
            return self.matrix.index_select(0, rows)[0, cols]
        return self.block(rows, cols)[0]

    def diagonal(self, index: torch.Tensor) -> torch.Tensor:
        """``s_jj`` for ``j`` in ``index`` (1, or 0 for a zero feature)."""
        out = None
        for f in self.factors:
            part = (f[index] ** 2).sum(1)
            out = part if out is None else out * part
        return out

    def coverage(self, index: torch.Tensor) -> torch.Tensor:
        """``c_j = sum_{i in index} s_ij`` for ``j`` in ``index``, without an ``n x n`` matrix."""
        if len(self.factors) == 1:
            u = self.factors[0][index]
            return u @ u.sum(0)
        a, b = (f[index] for f in self.factors)
        return ((a @ (a.T @ b)) * b).sum(1)  # a_j^T (sum_i a_i b_i^T) b_j


class GraphCut:
    """Greedy maximisation of ``f(S) = sum_{i in V, j in S} s_ij - lam sum_{i, j in S} s_ij``.

    Candidates are the members of the ground set ``V``; positions below are positions in
    ``ground``.

    Args:
        similarity: The class's similarity.
        ground: Indices (rows of ``similarity``) of the ground set ``V``.
        lam: Weight of the pairwise (diversity) term, ``>= 0``.
        coverage: ``sum_{i in V} s_ij`` for every ``j`` in ``V`` if already known.
    """

    def __init__(self, similarity: CosineSimilarity, ground: torch.Tensor, lam: float,
                 coverage: torch.Tensor | None = None) -> None:
        self.similarity = similarity
        self.ground = ground.to(similarity.device)
        self.lam = float(lam)
        self.coverage = similarity.coverage(self.ground) if coverage is None else coverage
        self.self_similarity = similarity.diagonal(self.ground)
        self.selected_sum = torch.zeros_like(self.coverage)  # r_j = sum_{i in S} s_ij
        self.available = torch.ones(len(self.ground), dtype=torch.bool, device=similarity.device)
        self.order: list[int | torch.Tensor] = []

    def gains(self) -> torch.Tensor:
        """``f(S + j) - f(S)`` for every candidate (``-inf`` for those already in ``S``)."""
        gain = self.coverage - self.lam * (2 * self.selected_sum + self.self_similarity)
        return gain.masked_fill(~self.available, -math.inf)

    def add(self, position: int | torch.Tensor) -> None:
        """Put ``ground[position]`` into ``S`` (a 0-dim tensor ``position`` is trusted to be
        available: checking it would read it back to the host)."""
        if not isinstance(position, torch.Tensor) and not self.available[position]:
            raise ValueError(f"position {position} is already selected")
        # a tensor position is used as a 1-element index (a 0-dim one would be read as an int)
        where = position.reshape(1) if isinstance(position, torch.Tensor) else position
        self.available[where] = False
        self.selected_sum += self.similarity.row(self.ground[where], self.ground)
        self.order.append(position)

    def pick(self) -> torch.Tensor:
        """Add the candidate of largest gain (the lowest position among equals); its position,
        a 0-dim tensor where the features are: on a GPU the greedy loop never waits for it."""
        position = torch.argmax(self.gains())
        self.add(position)
        return position

    def selected(self) -> torch.Tensor:
        """Indices of ``S`` in the order they were picked."""
        device = self.ground.device
        order = [torch.as_tensor(p, device=device).view(()) for p in self.order]
        return self.ground[torch.stack(order)] if order else self.ground[:0]

    def leftover(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates not in ``S`` and their coverage of themselves: ``c_j - r_j``."""
        return self.ground[self.available], (self.coverage - self.selected_sum)[self.available]


def bin_sizes(n: int, bins: int) -> list[int]:
    """``bins`` sizes summing to ``n`` that differ by at most one (the larger ones first)."""
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    if bins > n:
        raise ValueError(f"cannot split {n} samples into {bins} non-empty bins")
    return [n // bins + (1 if k < n % bins else 0) for k in range(bins)]


def _check_lam(lam: float) -> None:
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")


def graphcut_bins(features: Features, bins: int = 10, lam: float = 1.0,
                  max_matrix_bytes: int = DEFAULT_MATRIX_BYTES) -> list[torch.Tensor]:
    """Split one class into ``bins`` non-overlapping bins by recursive greedy GraphCut.

    Args:
        features: The class's features, ``(n, D)`` or a Kronecker pair (see the module).
        bins: Number of bins ``K`` (``1 <= K <= n``).
        lam: Weight of the pairwise term of GraphCut (``>= 0``).
        max_matrix_bytes: Memory allowed for the ``n x n`` similarity matrix (see
            :class:`CosineSimilarity`); the result is the same either way.

    Returns:
        ``K`` tensors of row indices (CPU, int64), in bin order; each greedy bin lists its
        samples in the order they were picked, the last bin in ascending order.
    """
    _check_lam(lam)
    n = feature_rows(features)
    sizes = bin_sizes(n, bins)
    similarity = CosineSimilarity(features, max_matrix_bytes)
    pool = torch.arange(n, device=similarity.device)
    coverage = None
    out = []
    for size in sizes[:-1]:
        cut = GraphCut(similarity, pool, lam, coverage)
        for _ in range(size):
            cut.pick()
        out.append(cut.selected().cpu())
        pool, coverage = cut.leftover()
    out.append(pool.cpu())
    return out


def allocate(sizes: list[int], count: int, generator: torch.Generator) -> list[int]:
    """How many of ``count`` samples to draw from bins of ``sizes``: the same fraction of each.

    Every bin gets ``floor(count * size / total)``; the remaining samples go one each to the
    bins with the largest fractional parts, ties in a random order drawn from ``generator``
    (e.g. IPC 1 from 10 equal bins: one bin chosen uniformly at random).
    """
    total = sum(sizes)
    if not 0 <= count <= total:
        raise ValueError(f"cannot draw {count} samples from bins holding {total}")
    base = [count * s // total for s in sizes]
    remainders = [count * s - b * total for s, b in zip(sizes, base, strict=True)]
    order = torch.randperm(len(sizes), generator=generator).tolist()
    order.sort(key=lambda k: -remainders[k])  # stable: random order among equal remainders
    for k in order[:count - sum(base)]:
        base[k] += 1
    return base


def sample_bins(bins: list[torch.Tensor], count: int,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``count`` members uniformly, the same fraction from every bin.

    Returns:
        The drawn members (bin by bin) and the bin number of each.
    """
    return draw_from_bins(bins, allocate([len(b) for b in bins], count, generator), generator)


def draw_from_bins(bins: list[torch.Tensor], counts: list[int],
                   generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``counts[k]`` members of bin ``k`` uniformly, without replacement.

    Returns:
        The drawn members (bin by bin) and the bin number of each.
    """
    picked, which = [], []
    for k, (members, m) in enumerate(zip(bins, counts, strict=True)):
        chosen = torch.randperm(len(members), generator=generator)[:m]
        picked.append(members.cpu()[chosen])
        which.append(torch.full((m,), k, dtype=torch.long))
    return torch.cat(picked), torch.cat(which)


@dataclass
class Quantization:
    """The result of :func:`quantize`.

    Attributes:
        indices: ``(classes * ipc,)`` selected dataset indices, class-major.
        bins: ``(classes * ipc,)`` the bin each selected sample was drawn from.
        class_bins: Per class, the ``K`` bins as dataset indices.
    """

    indices: torch.Tensor
    bins: torch.Tensor
    class_bins: list[list[torch.Tensor]]


def quantize(features: Features, labels: torch.Tensor, ipc: int, bins: int = 10,
             lam: float = 1.0, generator: torch.Generator | None = None,
             num_classes: int | None = None,
             max_matrix_bytes: int = DEFAULT_MATRIX_BYTES) -> Quantization:
    """Dataset quantization of a labelled set: ``ipc`` samples per class.

    Args:
        features: ``(N, D)`` features of every sample (or a Kronecker pair, see the module).
        labels: ``(N,)`` integer class labels.
        ipc: Samples kept per class.
        bins: Bins per class ``K``.
        lam: Weight of GraphCut's pairwise term.
        generator: Source of the uniform sampling (default: a generator seeded with 0).
        num_classes: Number of classes (default: ``labels.max() + 1``); every class must have
            at least ``max(ipc, bins)`` samples.
        max_matrix_bytes: Memory allowed for one class's similarity matrix.

    Raises:
        ValueError: on inconsistent shapes, ``ipc < 1``, ``bins < 1``, ``lam < 0`` or a class
            with fewer than ``ipc`` (or ``bins``) samples.
    """
    n = feature_rows(features)
    if labels.dim() != 1 or len(labels) != n:
        raise ValueError(f"labels must have shape ({n},) to match the features, got "
                         f"{tuple(labels.shape)}")
    if ipc < 1:
        raise ValueError(f"ipc must be at least 1, got {ipc}")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    _check_lam(lam)
    labels = labels.detach().cpu().long()
    num_classes = int(labels.max()) + 1 if num_classes is None else num_classes
    members = [torch.nonzero(labels == c).flatten() for c in range(num_classes)]
    for c, m in enumerate(members):
        if ipc > len(m):
            raise ValueError(f"ipc={ipc} is larger than class {c}, which has {len(m)} samples")
        if bins > len(m):
            raise ValueError(f"bins={bins} is larger than class {c}, which has {len(m)} samples")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    return bin_and_sample(features, members, bins, lam, max_matrix_bytes,
                          lambda local: sample_bins(local, ipc, generator))


def bin_and_sample(features: Features, members: list[torch.Tensor], bins: int, lam: float,
                   max_matrix_bytes: int,
                   sample: Callable[[list[torch.Tensor]], tuple[torch.Tensor, torch.Tensor]],
                   ) -> Quantization:
    """Split every class (``members[c]``: its dataset indices) into ``bins`` GraphCut bins of
    its ``features`` and keep what ``sample(bins)`` draws from them (positions within the class
    and their bin numbers, as :func:`sample_bins`), class by class."""
    indices, which, class_bins = [], [], []
    for m in members:
        local = graphcut_bins(take_rows(features, m), bins, lam, max_matrix_bytes)
        chosen, k = sample(local)
        indices.append(m[chosen])
        which.append(k)
        class_bins.append([m[b] for b in local])
    return Quantization(torch.cat(indices), torch.cat(which), class_bins)
