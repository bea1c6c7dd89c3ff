"""Orthogonal Procrustes, fitted out of core: one streaming pass accumulates the cross-covariance
(plus means and source second moments) over row blocks, then one small SVD.

procrustes         y = Q x                    (no centering)
procrustes-affine  y = s·Q (x − x̄) + ȳ        (translation + isotropic scale)

Q (d_B × d_A) is semi-orthogonal: orthonormal columns when d_B ≥ d_A (an isometric embedding),
orthonormal rows when d_B < d_A (an orthogonal projection). Q = U Vᵀ from M = U Σ Vᵀ, the SVD of the
target×source cross-(co)variance, maximizes tr(Qᵀ M).

That is the least-squares solution whenever QᵀQ = I (d_B ≥ d_A, the default model pair). When
d_B < d_A, ‖Q x‖ depends on Q and the SVD solution is only the maximal-correlation projection, not
the least-squares one ("unbalanced" Procrustes, no closed form); `refine_iters` > 0 then runs the
majorization of Kiers / Koschat & Swayne from the SVD start, which lowers the squared error
monotonically using only the accumulated d_A × d_A source moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from pipeline.aligners.registry import register
from pipeline.aligners.base import Aligner, check_fields, require
from pipeline.metrics import Moments, iter_row_blocks


@dataclass(frozen=True)
class ProcrustesParams:
    refine_iters: int = 0  # least-squares refinement steps; only used when d_target < d_source
    refine_tol: float = 1e-10  # stop refining when Q moves less than this (Frobenius)

    def __post_init__(self):
        check_fields(self)
        require(self.refine_iters >= 0, f"refine_iters = {self.refine_iters} must be 0 or more")


def accumulate(blocks) -> Moments:
    """Moments Procrustes needs, from an iterable of (x, y) numpy blocks."""
    m = Moments(xx=True, yy=False)
    for x, y in blocks:
        m.update(x, y)
    return m


def polar(m: np.ndarray) -> np.ndarray:
    """The semi-orthogonal factor U Vᵀ of m = U Σ Vᵀ."""
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    return u @ vt


def solve(m: Moments, affine: bool, refine_iters: int = 0, refine_tol: float = 1e-10
          ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """(weight d_B×d_A, bias or None, info) minimizing Σ‖s·Q x_i + b − y_i‖² over semi-orthogonal Q
    (s = 1 and b = 0 unless affine)."""
    if affine:
        cross, c_xx, ss_y = m.cov_xy().T, m.cov_xx(), m.ss_y()
    else:
        cross, c_xx, ss_y = m.raw_xy().T, m.raw_xx(), m.ss_y(centered=False)
    q = polar(cross)
    scale = _scale(q, cross, c_xx) if affine else 1.0
    iters = 0
    if refine_iters and q.shape[0] < q.shape[1]:
        rho = np.linalg.eigvalsh(c_xx)[-1]  # majorizer: ρI ⪰ C_xx
        d = rho * np.eye(len(c_xx)) - c_xx
        for iters in range(1, refine_iters + 1):
            # tr(Q C Qᵀ) ≤ ρ·d_B − tr(Q D Qᵀ) is linearized at the current Q; the bound's minimizer is a polar factor
            q_new = polar(cross + scale * q @ d)
            moved = np.linalg.norm(q_new - q)
            q = q_new
            if affine:
                scale = _scale(q, cross, c_xx)
            if moved < refine_tol:
                break
    weight = scale * q
    # residual Σ‖W x + b − y‖² from the moments: tr(W C Wᵀ) − 2 tr(W M̃ᵀ) + Σ‖ỹ‖²
    ss_res = float(np.sum((weight @ c_xx) * weight) - 2 * np.sum(weight * cross) + ss_y)
    bias = m.mean_y - weight @ m.mean_x if affine else None
    info = {"n": m.n, "scale": float(scale), "refine_iters_run": iters,
            "train_r2": float(1 - ss_res / m.ss_y()) if m.ss_y() > 0 else float("nan")}
    return weight, bias, info


def _scale(q: np.ndarray, cross: np.ndarray, c_xx: np.ndarray) -> float:
    """Least-squares isotropic scale for a fixed Q: tr(Q Mᵀ) / tr(Q C Qᵀ)."""
    denom = float(np.sum((q @ c_xx) * q))
    return float(np.sum(q * cross)) / denom if denom > 0 else 0.0


def linear_module(weight: np.ndarray, bias: np.ndarray | None) -> Any:
    """A frozen torch Linear holding the given float64 weights as float32."""
    import torch

    net = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        net.weight.copy_(torch.from_numpy(weight))
        if bias is not None:
            net.bias.copy_(torch.from_numpy(bias))
    return net.requires_grad_(False)


@register("procrustes")
class Procrustes(Aligner):
    """Orthogonal (semi-orthogonal across widths) map y = Q x, fitted in one streaming pass."""

    Params = ProcrustesParams
    affine: ClassVar[bool] = False

    def build_net(self, d_source: int, d_target: int) -> Any:
        return linear_module(np.zeros((d_target, d_source)), np.zeros(d_target) if self.affine else None)

    def fit(self, source: Any, target: Any, block_rows: int | None = None) -> Procrustes:
        m = accumulate(iter_row_blocks(source, target, block_rows=block_rows))
        weight, bias, self.fit_info = solve(m, self.affine, self.params.refine_iters, self.params.refine_tol)
        self.d_target, self.d_source = weight.shape
        self.net = linear_module(weight, bias)
        return self


@register("procrustes-affine")
class ProcrustesAffine(Procrustes):
    """y = s·Q (x − x̄) + ȳ: Procrustes on centered data with the least-squares isotropic scale."""

    affine = True
