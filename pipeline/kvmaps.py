"""Fitting mapped KV's per-layer maps (pipeline/evaluation/mapped_kv.py) from the two activation
stores alone: layer pairs by relative depth, affine ridge maps on per-token rows paired by
character offset, held-out R² per layer (see that module's doc for the method)."""

from __future__ import annotations

import time
from typing import Any, Sequence

from pipeline.errors import UserError
from pipeline.evaluation.mapped_kv import LayerMaps

RIDGE = 1e-3  # times the mean eigenvalue of the centred XᵀX: fixed before any run
MAX_ROWS = 60_000  # training rows per layer (a seeded subset beyond): the solve is d_A² memory, rows x d_A time


def layer_pairs(layers_a: Sequence[int], layers_b: Sequence[int], depth_a: int, depth_b: int) -> dict[int, int]:
    """B KV layer l -> the stored A layer nearest (l - 1)/L_B of A's depth, for each stored B layer
    l - 1 < L_B (the last layer feeds no block)."""
    out = {}
    for lb in sorted(layers_b):
        if lb >= depth_b:
            continue
        want = lb / depth_b * depth_a
        out[lb + 1] = min(layers_a, key=lambda la: (abs(la - want), la))
    return out


def fit_layer_maps(a: Any, b: Any, seed: int = 0, heldout_frac: float = 0.1, log=lambda s: None) -> LayerMaps:
    """Ridge maps for every B KV layer the stores allow (module doc), from paired per-token rows."""
    import numpy as np
    import torch

    from pipeline.fitting import provenance, split_pairs

    depth_a, depth_b = (int(s.attrs.get("num_layers", max(s.layers))) for s in (a, b))
    pairs = layer_pairs(a.layers, b.layers, depth_a, depth_b)
    if not pairs:
        raise UserError(f"store {b.path} holds no layer below B's last ({b.layers}): extract layers at depths "
                        "below 1.0 to fit KV maps")
    train, held = split_pairs(a, b, "tokens", seed, heldout_frac)
    if len(train) > MAX_ROWS:
        keep = np.sort(np.random.default_rng(seed).choice(len(train), MAX_ROWS, replace=False))
        train = train.subset(np.isin(np.arange(len(train)), keep))
    weights, biases, r2 = {}, {}, {}
    start = time.perf_counter()
    for l, la in pairs.items():
        x = torch.from_numpy(a.numpy("tokens", la, train.rows_a)).double()
        y = torch.from_numpy(b.numpy("tokens", l - 1, train.rows_b)).double()
        mx, my = x.mean(0), y.mean(0)
        xc, yc = x - mx, y - my
        gram = xc.T @ xc
        gram += RIDGE * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
        w = torch.linalg.solve(gram, xc.T @ yc)
        weights[l], biases[l] = w.float(), (my - mx @ w).float()
        hx = torch.from_numpy(a.numpy("tokens", la, held.rows_a)).double()
        hy = torch.from_numpy(b.numpy("tokens", l - 1, held.rows_b)).double()
        resid = ((hx @ w + (my - mx @ w) - hy) ** 2).sum()
        r2[l] = float(1 - resid / ((hy - hy.mean(0)) ** 2).sum())
        log(f"KV layer {l} <- A layer {la}: held-out R² {r2[l]:.3f}")
    meta = {"kind": "kvmaps", "ridge": RIDGE, "train_rows": len(train), "heldout_rows": len(held),
            "d_a": int(a.attrs["width"]), "d_b": int(b.attrs["width"]),
            "depth_a": depth_a, "depth_b": depth_b, "heldout_r2": {str(l): v for l, v in r2.items()},
            "models": provenance(a, b),
            "seconds": time.perf_counter() - start, "seed": seed, "heldout_frac": heldout_frac}
    return LayerMaps(pairs, weights, biases, meta)


