"""Similarity metrics over row-aligned activation arrays (numpy, dask, or anything row-sliceable).

Two kinds of work, two memory bounds:
- Streaming statistics (CKA, alignment, MSE/R², and the moments Procrustes fits from) read the
  arrays block by block and keep only O(d²) float64 accumulators, whatever n is.
- Pairwise metrics (retrieval, mutual k-NN, InfoNCE, uniformity) need every pair of rows: they hold
  the L2-normalized n×d rows (refused beyond `max_bytes`) and walk the n×n similarity matrix in
  PAIR_BLOCK × PAIR_BLOCK tiles, never holding it.

Non-finite rows (NaN, ±inf) are failures, never good scores: a retrieval query or key that is not
finite is a miss, a non-finite row has no k-NN neighbours and is nobody's; every other score (CKA,
MSE, R², alignment, InfoNCE, uniformity) comes out NaN, which the writers store as null and the
report flags (`nonfinite_rows` counts them).

Debiased linear CKA in feature space. Unbiased HSIC (Song et al. 2012) on Gram matrices K, L with
zeroed diagonals K̃, L̃ is  [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1/((n-1)(n-2)) − 2/(n-2)·1ᵀK̃L̃1] / (n(n-3)), and it
is unchanged by translating X or Y. So take column-centered X, Y (K1 = 0) with row norms
a_i = ‖x_i‖², b_i = ‖y_i‖²: then tr(K̃L̃) = ‖XᵀY‖²_F − aᵀb, 1ᵀK̃1 = −Σa, K̃1 = −a, giving
    n(n-3)·HSIC_u = ‖XᵀY‖²_F − n/(n-2)·aᵀb + Σa·Σb/((n-1)(n-2)).
aᵀb needs the global means, which a single pass does not know in advance; expanding
‖x_i − μ‖² = p_i − 2x_iᵀμ + ‖μ‖² (p_i the raw squared norm) turns it into raw sums Σp_iq_i, Σp_i y_i,
Σq_i x_i, XᵀY (see `_centered_norm_products`), all accumulated per block.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from pipeline.errors import UserError

ArrayLike = Any  # numpy array, dask array, zarr array: anything with .shape and row slicing

BLOCK_ELEMENTS = 1 << 22  # streamed block size (all arrays together): 32 MiB of float64
PAIR_BLOCK = 2048  # tile side for n×n similarity work: 32 MiB of float64 per tile
PAIRWISE_MAX_BYTES = 4 << 30  # normalized rows a pairwise metric may hold


def is_dask(x: Any) -> bool:
    da = sys.modules.get("dask.array")  # a dask array exists only if dask was imported
    return da is not None and isinstance(x, da.Array)


# ---------------------------------------------------------------------------------------------
# Row-block streaming


class RowBlocks:
    """Row blocks of several arrays with the same number of rows, loaded together as numpy.

    Block boundaries follow the first dask array's row chunks (the store's shards), coalesced up to
    ~BLOCK_ELEMENTS, so a block never cuts a shard in two and each shard is read once per pass.
    """

    def __init__(self, *arrays: ArrayLike, block_rows: int | None = None):
        if not arrays:
            raise ValueError("RowBlocks needs at least one array")
        for a in arrays:
            if len(a.shape) != 2:
                raise UserError(f"expected 2-D (rows, features) arrays, got shape {tuple(a.shape)}")
        n = arrays[0].shape[0]
        if any(a.shape[0] != n for a in arrays):
            shapes = ", ".join(str(tuple(a.shape)) for a in arrays)
            raise UserError(f"arrays are not row-aligned ({shapes}): source and target must hold the same sequences")
        self.arrays = arrays
        self.n = int(n)
        self.widths = tuple(int(a.shape[1]) for a in arrays)
        rows = block_rows or max(1, BLOCK_ELEMENTS // max(1, sum(self.widths)))
        chunks = next((a.chunks[0] for a in arrays if is_dask(a)), None)
        self.bounds = _coalesce(chunks if chunks is not None else (), self.n, rows)

    def __len__(self) -> int:
        return len(self.bounds)

    def load(self, i: int, scheduler: str | None = None, shared: bool = False) -> tuple[np.ndarray, ...]:
        """Block i of every array as numpy; dask parts computed with `scheduler` (default dask's).
        shared: a block may be a view of an array held elsewhere (a dask chunk's, without the copy
        dask makes of a one-chunk result), for a caller that never writes into it."""
        start, stop = self.bounds[i]
        parts = [a[start:stop] for a in self.arrays]
        lazy = [j for j, p in enumerate(parts) if is_dask(p)]
        if lazy:
            import dask

            if shared:
                grids = dask.compute(*(parts[j].to_delayed().tolist() for j in lazy), scheduler=scheduler)
                values = [g[0][0] if len(g) == 1 and len(g[0]) == 1 else np.block(g) for g in grids]
            else:
                values = dask.compute(*(parts[j] for j in lazy), scheduler=scheduler)
            for j, value in zip(lazy, values):
                parts[j] = value
        return tuple(np.asarray(p) for p in parts)

    def iter(self, order: Sequence[int] | None = None) -> Iterator[tuple[int, int, tuple[np.ndarray, ...]]]:
        """Yield (start, stop, blocks) in `order` (default: natural), reading one block ahead."""
        order = range(len(self)) if order is None else order
        if not any(is_dask(a) for a in self.arrays):
            for i in order:
                yield (*self.bounds[i], self.load(i))
            return
        yield from _prefetched(self.load, order, lambda i: self.bounds[i])


def _prefetched(load, keys, label) -> Iterator:
    """Yield (*label(k), load(k)) for each key, loading the next key on a thread meanwhile, so
    reading and decompressing a shard overlaps the maths on the previous one."""
    from concurrent.futures import ThreadPoolExecutor

    keys = list(keys)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, keys[0]) if keys else None
        for i, key in enumerate(keys):
            value = pending.result()
            pending = pool.submit(load, keys[i + 1]) if i + 1 < len(keys) else None
            yield (*label(key), value)


def _coalesce(chunks: Sequence[int], n: int, rows: int) -> list[tuple[int, int]]:
    """Block bounds of about `rows` rows, on chunk edges when chunks are given."""
    if not chunks:
        return [(s, min(s + rows, n)) for s in range(0, n, rows)]
    bounds, start, size = [], 0, 0
    for c in chunks:
        size += c
        if size >= rows:
            bounds.append((start, start + size))
            start, size = start + size, 0
    if size:
        bounds.append((start, start + size))
    return bounds


def iter_row_blocks(*arrays: ArrayLike, block_rows: int | None = None) -> Iterator[tuple[np.ndarray, ...]]:
    """Aligned numpy row blocks of the arrays, in row order."""
    for _, _, blocks in RowBlocks(*arrays, block_rows=block_rows).iter():
        yield blocks


# ---------------------------------------------------------------------------------------------
# Streaming moments (shared by CKA and Procrustes)


class Moments:
    """Float64 sufficient statistics of row-aligned X (n×p) and Y (n×q), accumulated per block.

    Rows are shifted by a fixed reference (the first block's column means) before accumulating:
    centered statistics are shift-invariant, and without the shift the large means of LLM residual
    streams would make "raw moment − n·μμᵀ" cancel catastrophically.
    """

    def __init__(self, xx: bool = True, yy: bool = True, norms: bool = False):
        self.want_xx, self.want_yy, self.want_norms = xx, yy, norms
        self.n = 0

    def update(self, x: ArrayLike, y: ArrayLike) -> Moments:
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(y, dtype=np.float64)
        if len(x) != len(y):
            raise UserError(f"blocks are not row-aligned: {len(x)} vs {len(y)} rows")
        if len(x) == 0:
            return self
        if self.n == 0:
            self._start(x, y)
        x, y = x - self.ref_x, y - self.ref_y
        self.n += len(x)
        self.sx += x.sum(0)
        self.sy += y.sum(0)
        self.xty += x.T @ y
        if self.want_xx:
            self.xtx += x.T @ x
        if self.want_yy:
            self.yty += y.T @ y
        p, q = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)
        self.sp += p.sum()
        self.sq += q.sum()
        if self.want_norms:
            self.spq += p @ q
            self.spp += p @ p
            self.sqq += q @ q
            self.px += p @ x
            self.qx += q @ x
            self.py += p @ y
            self.qy += q @ y
        return self

    def _start(self, x: np.ndarray, y: np.ndarray) -> None:
        p, q = x.shape[1], y.shape[1]
        self.ref_x, self.ref_y = x.mean(0), y.mean(0)
        self.sx, self.sy = np.zeros(p), np.zeros(q)
        self.xty = np.zeros((p, q))
        self.xtx = np.zeros((p, p)) if self.want_xx else None
        self.yty = np.zeros((q, q)) if self.want_yy else None
        self.sp = self.sq = self.spq = self.spp = self.sqq = 0.0
        self.px, self.qx, self.py, self.qy = np.zeros(p), np.zeros(p), np.zeros(q), np.zeros(q)

    def _need(self, n_min: int = 1) -> None:
        if self.n < n_min:
            raise UserError(f"need at least {n_min} rows, got {self.n}")

    @property
    def mean_x(self) -> np.ndarray:
        self._need()
        return self.ref_x + self.sx / self.n

    @property
    def mean_y(self) -> np.ndarray:
        self._need()
        return self.ref_y + self.sy / self.n

    def cov_xy(self) -> np.ndarray:
        """Σ (x_i − x̄)(y_i − ȳ)ᵀ (not divided by n)."""
        self._need()
        return self.xty - np.outer(self.sx, self.sy) / self.n

    def cov_xx(self) -> np.ndarray:
        self._need()
        return self.xtx - np.outer(self.sx, self.sx) / self.n

    def cov_yy(self) -> np.ndarray:
        self._need()
        return self.yty - np.outer(self.sy, self.sy) / self.n

    def raw_xy(self) -> np.ndarray:
        """Σ x_i y_iᵀ of the unshifted rows."""
        return self.cov_xy() + self.n * np.outer(self.mean_x, self.mean_y)

    def raw_xx(self) -> np.ndarray:
        return self.cov_xx() + self.n * np.outer(self.mean_x, self.mean_x)

    def ss_x(self, centered: bool = True) -> float:
        """Σ‖x_i − x̄‖² (or Σ‖x_i‖² when not centered)."""
        self._need()
        c = self.sp - self.sx @ self.sx / self.n
        return float(c if centered else c + self.n * self.mean_x @ self.mean_x)

    def ss_y(self, centered: bool = True) -> float:
        self._need()
        c = self.sq - self.sy @ self.sy / self.n
        return float(c if centered else c + self.n * self.mean_y @ self.mean_y)

    def cka(self, debiased: bool = True) -> float:
        """Linear CKA from the accumulated statistics (needs xx, yy, and norms when debiased)."""
        if not (self.want_xx and self.want_yy and (self.want_norms or not debiased)):
            raise ValueError("Moments was created without the statistics CKA needs")
        self._need(4 if debiased else 2)
        n = self.n
        mx, my = self.sx / n, self.sy / n  # means of the shifted rows
        cxy, cxx, cyy = self.cov_xy(), self.cov_xx(), self.cov_yy()

        def hsic(c_uv, ab, tr_u, tr_v):
            # n(n-3)·HSIC_u; the common factor cancels in the ratio
            value = np.sum(c_uv * c_uv)
            if debiased:
                value += -n / (n - 2) * ab + tr_u * tr_v / ((n - 1) * (n - 2))
            return value

        tx, ty = np.trace(cxx), np.trace(cyy)
        ab = aa = bb = 0.0
        if debiased:
            ab = _centered_norm_products(n, self.spq, self.py, self.qx, self.sp, self.sq, self.xty, mx, my)
            aa = _centered_norm_products(n, self.spp, self.px, self.px, self.sp, self.sp, self.xtx, mx, mx)
            bb = _centered_norm_products(n, self.sqq, self.qy, self.qy, self.sq, self.sq, self.yty, my, my)
        h_xy = hsic(cxy, ab, tx, ty)
        h_xx, h_yy = hsic(cxx, aa, tx, tx), hsic(cyy, bb, ty, ty)
        if h_xx <= 0 or h_yy <= 0:
            return float("nan")  # a constant (or, debiased and tiny n, degenerate) representation
        return float(h_xy / math.sqrt(h_xx * h_yy))


def _centered_norm_products(n, s_pq, s_p_v, s_q_u, s_p, s_q, utv, mu_u, mu_v) -> float:
    """Σ_i ‖u_i − μ_u‖²·‖v_i − μ_v‖² from raw sums, with p_i = ‖u_i‖², q_i = ‖v_i‖².

    Expanding (p_i − 2u_iᵀμ_u + c_u)(q_i − 2v_iᵀμ_v + c_v) with c = ‖μ‖² and Σu_i = nμ_u:
    Σpq − 2μ_vᵀΣp_i v_i − 2μ_uᵀΣq_i u_i + 4μ_uᵀ(UᵀV)μ_v + c_vΣp + c_uΣq − 3n·c_u·c_v.
    """
    cu, cv = mu_u @ mu_u, mu_v @ mu_v
    return float(s_pq - 2 * s_p_v @ mu_v - 2 * s_q_u @ mu_u + 4 * mu_u @ utv @ mu_v
                 + cv * s_p + cu * s_q - 3 * n * cu * cv)


def cka(x: ArrayLike, y: ArrayLike, debiased: bool = True, block_rows: int | None = None) -> float:
    """Linear CKA of row-aligned x (n×p) and y (n×q), streamed over row blocks in O(p² + q² + pq)
    memory. debiased=True uses the unbiased HSIC estimator (equal to `cka_gram`)."""
    m = Moments(norms=debiased)
    for xb, yb in iter_row_blocks(x, y, block_rows=block_rows):
        m.update(xb, yb)
    return m.cka(debiased)


def cka_gram(x: ArrayLike, y: ArrayLike, debiased: bool = True) -> float:
    """Reference linear CKA from n×n Gram matrices (Kornblith et al. 2019; debiased: Song et al.
    2012 unbiased HSIC as used by Nguyen, Raghu & Kornblith 2021). Small n only: for tests."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)

    def hsic(k, l):
        if not debiased:
            h = np.eye(n) - 1.0 / n
            return np.trace(k @ h @ l @ h) / (n - 1) ** 2
        k, l = k.copy(), l.copy()
        np.fill_diagonal(k, 0.0)
        np.fill_diagonal(l, 0.0)
        return (np.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * k.sum(0) @ l.sum(0)) / (n * (n - 3))

    k, l = x @ x.T, y @ y.T
    return float(hsic(k, l) / math.sqrt(hsic(k, k) * hsic(l, l)))


# ---------------------------------------------------------------------------------------------
# Regression quality of a mapping


class RegressionScores:
    """Streaming MSE (mean over all elements) and pooled R² = 1 − SS_res / Σ‖t_i − t̄‖²."""

    def __init__(self):
        self.n, self.ss_res = 0, 0.0

    def update(self, pred: ArrayLike, target: ArrayLike) -> RegressionScores:
        p, t = np.asarray(pred, dtype=np.float64), np.asarray(target, dtype=np.float64)
        if p.shape != t.shape:
            raise UserError(f"mapped rows {p.shape} and target rows {t.shape} differ in shape: map into the target's space first")
        if len(t) == 0:
            return self
        if self.n == 0:
            self.ref, self.st, self.stt = t.mean(0), np.zeros(t.shape[1]), 0.0  # shift: see Moments
        self.ss_res += float(np.sum((p - t) ** 2))
        t = t - self.ref
        self.n += len(t)
        self.st += t.sum(0)
        self.stt += float(np.sum(t * t))
        return self

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise UserError("no rows to score")
        ss_tot = self.stt - self.st @ self.st / self.n
        return {"mse": self.ss_res / (self.n * len(self.st)),
                "r2": float(1.0 - self.ss_res / ss_tot) if ss_tot > 0 else float("nan")}


def regression_scores(pred: ArrayLike, target: ArrayLike, block_rows: int | None = None) -> dict[str, float]:
    """{"mse", "r2"} of a mapping's outputs `pred` against `target`, streamed."""
    acc = RegressionScores()
    for p, t in iter_row_blocks(pred, target, block_rows=block_rows):
        acc.update(p, t)
    return acc.result()


def mse(pred: ArrayLike, target: ArrayLike) -> float:
    return regression_scores(pred, target)["mse"]


def r2(pred: ArrayLike, target: ArrayLike) -> float:
    return regression_scores(pred, target)["r2"]


# ---------------------------------------------------------------------------------------------
# Contrastive / geometric metrics (Wang & Isola 2020; Huh et al. 2024)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def alignment(x: ArrayLike, y: ArrayLike, alpha: float = 2.0) -> float:
    """Mean ‖u_i − v_i‖^α over positive pairs of L2-normalized rows (lower = better aligned)."""
    total, n = 0.0, 0
    for xb, yb in iter_row_blocks(x, y):
        u, v = _unit(xb.astype(np.float64)), _unit(yb.astype(np.float64))
        if u.shape != v.shape:
            raise UserError(f"alignment needs rows in one space: got widths {u.shape[1]} and {v.shape[1]}")
        total += float(np.sum(np.linalg.norm(u - v, axis=1) ** alpha))
        n += len(u)
    return total / n


def _unit_rows(x: ArrayLike, max_bytes: int) -> np.ndarray:
    n, d = int(x.shape[0]), int(x.shape[1])
    if n * d * 8 > max_bytes:
        raise UserError(f"pairwise metric over {n}×{d} rows needs {n * d * 8 / 2**30:.1f} GiB: "
                        f"score a row subset (e.g. x[:50000]) or raise max_bytes")
    out = np.empty((n, d), dtype=np.float64)
    for start, stop, (block,) in RowBlocks(x).iter():
        out[start:stop] = block
    return _unit(out)


def _pair(a: ArrayLike, b: ArrayLike, max_bytes: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    if a.shape != b.shape:
        raise UserError(f"{what} needs row-aligned vectors in one space: got {tuple(a.shape)} and {tuple(b.shape)} "
                        "(map source vectors into the target space first)")
    return _unit_rows(a, max_bytes), _unit_rows(b, max_bytes)


def _spans(n: int) -> list[tuple[int, int]]:
    return [(s, min(s + PAIR_BLOCK, n)) for s in range(0, n, PAIR_BLOCK)]


def _tiles(q: np.ndarray, k: np.ndarray) -> Iterator[tuple[int, int, Iterator[tuple[int, int, np.ndarray]]]]:
    """For each query span, the cosine tiles q[span] @ k[kspan]ᵀ over all key spans."""
    for qs, qe in _spans(len(q)):
        yield qs, qe, ((ks, ke, q[qs:qe] @ k[ks:ke].T) for ks, ke in _spans(len(k)))


def _self_entries(qs: int, qe: int, ks: int, ke: int) -> tuple[np.ndarray, np.ndarray]:
    """Tile coordinates of the diagonal i == j inside tile [qs:qe] × [ks:ke]."""
    idx = np.arange(max(qs, ks), min(qe, ke))
    return idx - qs, idx - ks


def retrieval_topk(queries: ArrayLike, keys: ArrayLike, ks: Sequence[int] = (1, 5),
                   max_bytes: int = PAIRWISE_MAX_BYTES) -> dict[str, float]:
    """Fraction of queries (mapped A vectors) whose own key (row i of B) is among the top-k keys by
    cosine. Ties count against the query, so a collapsed mapping cannot score well."""
    q, k = _pair(queries, keys, max_bytes, "retrieval")
    correct = np.einsum("ij,ij->i", q, k)
    rank = np.zeros(len(q), dtype=np.int64)  # number of other keys at least as close
    for qs, qe, tiles in _tiles(q, k):
        for ks_, ke_, sim in tiles:
            beats = sim >= correct[qs:qe, None] - 1e-12
            beats[_self_entries(qs, qe, ks_, ke_)] = False
            rank[qs:qe] += beats.sum(1)
    # a NaN compares false with everything, so a non-finite query would "beat" no key and rank
    # first: a query or key that is not finite is a miss (and a non-finite key outranks nobody)
    rank[~(_finite_rows(q) & _finite_rows(k))] = np.iinfo(np.int64).max
    return {f"top{t}": float(np.mean(rank < t)) for t in ks}


def _finite_rows(x: np.ndarray) -> np.ndarray:
    return np.isfinite(x).all(axis=1)


def nonfinite_rows(x: ArrayLike) -> int:
    """How many rows hold a NaN or an infinity (streamed)."""
    return sum(int((~_finite_rows(b.astype(np.float64, copy=False))).sum()) for (b,) in iter_row_blocks(x))


def mutual_knn(x: ArrayLike, y: ArrayLike, k: int = 10, max_bytes: int = PAIRWISE_MAX_BYTES) -> float:
    """Mutual k-NN alignment (Huh et al. 2024): mean over rows of |kNN_x(i) ∩ kNN_y(i)| / k, with
    neighbours by cosine within each space, excluding the row itself. Widths may differ."""
    if x.shape[0] != y.shape[0]:
        raise UserError(f"mutual k-NN needs row-aligned arrays: {x.shape[0]} vs {y.shape[0]} rows")
    return knn_overlap(knn_indices(x, k, max_bytes), knn_indices(y, k, max_bytes))


def knn_indices(x: ArrayLike, k: int, max_bytes: int = PAIRWISE_MAX_BYTES) -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows by cosine (for `knn_overlap`, so a grid of
    layer pairs computes each layer's neighbours once)."""
    if not 0 < k < x.shape[0]:
        raise UserError(f"mutual k-NN: k = {k} must be between 1 and n - 1 = {x.shape[0] - 1}")
    return _knn(_unit_rows(x, max_bytes), k)


def knn_overlap(nx: np.ndarray, ny: np.ndarray) -> float:
    """Mean over rows of |nx[i] ∩ ny[i]| / k for two (n, k) neighbour index arrays (-1: no neighbour,
    as `knn_indices` gives a non-finite row: it shares nothing)."""
    shared = np.zeros(len(nx), dtype=np.int64)
    for s, e in _spans(len(nx)):
        shared[s:e] = ((nx[s:e, :, None] == ny[s:e, None, :]) & (nx[s:e, :, None] >= 0)).any(2).sum(1)
    return float(shared.mean() / nx.shape[1])


def _knn(u: np.ndarray, k: int) -> np.ndarray:
    """Indices of each row's k nearest other rows (cosine), by a running top-k over tiles. A
    non-finite row is nobody's neighbour and has none (-1)."""
    out = np.empty((len(u), k), dtype=np.int64)
    finite = _finite_rows(u)
    for qs, qe, tiles in _tiles(u, u):
        best_v = np.full((qe - qs, k), -np.inf)
        best_i = np.full((qe - qs, k), -1, dtype=np.int64)
        for ks, ke, sim in tiles:
            sim[_self_entries(qs, qe, ks, ke)] = -np.inf
            sim[:, ~finite[ks:ke]] = -np.inf
            cand_v = np.concatenate([best_v, sim], axis=1)
            cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(ks, ke), sim.shape)], axis=1)
            top = np.argpartition(-cand_v, k - 1, axis=1)[:, :k]
            best_v, best_i = np.take_along_axis(cand_v, top, 1), np.take_along_axis(cand_i, top, 1)
        best_i[best_v == -np.inf] = -1
        out[qs:qe] = best_i
    out[~finite] = -1
    return out


def infonce(queries: ArrayLike, keys: ArrayLike, temperature: float = 0.07, symmetric: bool = False,
            max_bytes: int = PAIRWISE_MAX_BYTES) -> float:
    """InfoNCE over all n rows: mean_i −log softmax_j(cos(q_i, k_j)/τ)[i]; symmetric averages the
    query→key and key→query directions. Note it grows with n (log n at chance)."""
    if temperature <= 0:
        raise UserError(f"infonce: temperature = {temperature} must be > 0")
    q, k = _pair(queries, keys, max_bytes, "InfoNCE")
    loss = _infonce_one_way(q, k, temperature)
    return (loss + _infonce_one_way(k, q, temperature)) / 2 if symmetric else loss


def _infonce_one_way(q: np.ndarray, k: np.ndarray, t: float) -> float:
    lse = np.empty(len(q))
    for qs, qe, tiles in _tiles(q, k):
        m, s = np.full(qe - qs, -np.inf), np.zeros(qe - qs)  # running log-sum-exp per row
        for _, _, sim in tiles:
            logits = sim / t
            m_new = np.maximum(m, logits.max(1))
            s = s * np.exp(m - m_new) + np.exp(logits - m_new[:, None]).sum(1)
            m = m_new
        lse[qs:qe] = m + np.log(s)
    return float(np.mean(lse - np.einsum("ij,ij->i", q, k) / t))


def uniformity(x: ArrayLike, t: float = 2.0, max_bytes: int = PAIRWISE_MAX_BYTES) -> float:
    """log mean_{i≠j} exp(−t‖u_i − u_j‖²) of L2-normalized rows (lower = more uniform)."""
    u = _unit_rows(x, max_bytes)
    n = len(u)
    if n < 2:
        raise UserError("uniformity needs at least 2 rows")
    total = 0.0  # exponents lie in [−4t, 0]: a plain float64 sum neither overflows nor underflows
    for qs, qe, tiles in _tiles(u, u):
        for ks, ke, sim in tiles:
            e = np.exp(-t * np.maximum(2.0 - 2.0 * sim, 0.0))
            e[_self_entries(qs, qe, ks, ke)] = 0.0
            total += float(e.sum())
    return float(np.log(total / (n * (n - 1))))
