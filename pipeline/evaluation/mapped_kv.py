"""Cross-model KV from mapped states: A's per-token states, mapped into B's residual stream layer by
layer, become a key/value prefix through B's own norm and projections (statekv.py).

    maps = fit_layer_maps(store_a, store_b)        # from the activation store alone (xmodel kvmaps)
    cache = mapped_cache(B, maps, A_token_states)  # B-shaped KvCache of each item's prompt_a
    gen = kv_generate(B, tok_B, prompts_B, cache, maps.kv_layers, decoding)

Layer pairs by relative depth: B's KV layer l (1..L_B) reads the residual stream entering block l,
B's layer l - 1; it is mapped from A's stored layer nearest to the same relative depth,
(l - 1) / L_B · L_A. Only B layers whose input layer is stored in B's store get a map (extract every
layer, e.g. extract.layers at depths i / L_B, for every KV layer); the others hide the prefix, as
kv's unshared layers do.

Each map is affine, y = x W + b, fitted by ridge regression on the stores' per-token rows paired by
character offset (pipeline/pairing.py: where tokens of the two tokenizers end at the same character
they have read the same text), the texts held out from every fit (fit.heldout_frac, fit.seed) kept
out; the ridge strength is RIDGE times the mean eigenvalue of the centred XᵀX (fixed before any
run). Held-out R² per layer is recorded. Positions: the prefix takes A's token positions 0..P-1 and B's
prompt continues from P, as in kv.py; with A = B and identity maps it is kv_all (tested).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import UserError

RIDGE = 1e-3
MAX_ROWS = 60_000  # training rows per layer (a seeded subset beyond): the solve is d_A² memory, rows x d_A time
META, WEIGHTS = "kvmaps.json", "weights.safetensors"


@dataclass
class LayerMaps:
    """Per B KV layer l: the A layer it reads and the affine map into B's layer l - 1."""

    sources: dict[int, int]  # B's KV layer l (1..L_B) -> A's layer
    weight: dict[int, Any]  # (d_A, d_B) float32
    bias: dict[int, Any]  # (d_B,)
    meta: dict[str, Any] = field(default_factory=dict)  # widths, depths, held-out R² per layer, stores

    @property
    def kv_layers(self) -> list[int]:
        return sorted(self.sources)

    @property
    def a_layers(self) -> list[int]:
        return sorted(set(self.sources.values()))

    @classmethod
    def identity(cls, n_layers: int, width: int) -> LayerMaps:
        """A = B: layer l reads A's layer l - 1 unchanged (kv_all through the mapped path)."""
        import torch

        return cls({l: l - 1 for l in range(1, n_layers + 1)}, {l: torch.eye(width) for l in range(1, n_layers + 1)},
                   {l: torch.zeros(width) for l in range(1, n_layers + 1)}, {"identity": True})

    def apply(self, layer: int, x: Any) -> Any:
        w = self.weight[layer]
        return x.to(w.dtype) @ w + self.bias[layer]

    def save(self, directory: Path) -> Path:
        from safetensors.torch import save

        from pipeline.artifacts import write_folder

        tensors = {**{f"W{l}": w.contiguous() for l, w in self.weight.items()},
                   **{f"b{l}": b.contiguous() for l, b in self.bias.items()}}
        meta = {**self.meta, "sources": {str(l): a for l, a in self.sources.items()}}
        return write_folder(directory, {WEIGHTS: save(tensors), META: json.dumps(meta, indent=1, sort_keys=True)},
                            "layer maps")

    @classmethod
    def load(cls, directory: Path) -> LayerMaps:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / META).is_file() or not (directory / WEIGHTS).is_file():
            raise UserError(f"no fitted layer maps in {directory}: run `xmodel kvmaps` (it fits them from the "
                            "two activation stores) or point evaluate.mapped_kv.maps at a folder it wrote")
        meta = json.loads((directory / META).read_text())
        tensors = load_file(str(directory / WEIGHTS))
        sources = {int(l): int(a) for l, a in meta.pop("sources").items()}
        return cls(sources, {l: tensors[f"W{l}"] for l in sources}, {l: tensors[f"b{l}"] for l in sources}, meta)


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


def mapped_cache(model_b: Any, maps: LayerMaps, states: dict[int, list[Any]], a_tokens: int, seconds: float) -> Any:
    """B's KvCache from A's per-token states (states[A layer][item] (P_i, d_A)) through the maps."""
    import torch

    from pipeline.evaluation.statekv import states_cache

    with torch.no_grad():
        mapped = {l: [maps.apply(l, s) for s in states[la]] for l, la in maps.sources.items()}
        return states_cache(model_b, mapped, a_tokens=a_tokens, seconds=seconds)
