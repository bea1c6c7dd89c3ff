"""Cross-model KV from mapped states: A's per-token states, mapped into B's residual stream layer by
layer, become a key/value prefix through B's own norm and projections (statekv.py).

    maps = fit_layer_maps(store_a, store_b)        # pipeline/kvmaps.py: from the stores alone (xmodel kvmaps)
    cache = mapped_cache(B, maps, A_token_states)  # B-shaped KvCache of each item's prompt_a
    gen = kv_generate(B, tok_B, prompts_B, cache, maps.b_layers, decoding)

Layer pairs by relative depth: B's KV layer l (1..L_B) reads the residual stream entering block l,
B's layer l - 1; it is mapped from A's stored layer nearest to the same relative depth,
(l - 1) / L_B · L_A. Only B layers whose input layer is stored in B's store get a map (extract every
layer, e.g. extract.layers at depths i / L_B, for every KV layer); the others hide the prefix, as
kv's unshared layers do.

Each map is affine, y = x W + b, fitted by ridge regression on the stores' per-token rows paired by
character offset (pipeline/pairing.py: where tokens of the two tokenizers end at the same character
they have read the same text), the texts held out from every fit (fit.heldout_frac, fit.seed) kept
out; the ridge strength is pipeline.kvmaps.RIDGE times the mean eigenvalue of the centred XᵀX (fixed before any
run). Held-out R² per layer is recorded. Positions: the prefix takes A's token positions 0..P-1 and B's
prompt continues from P, as in kv.py; with A = B and identity maps it is kv_all (tested).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

META, WEIGHTS = "kvmaps.json", "weights.safetensors"


@dataclass
class LayerMaps:
    """Per B KV layer l: the A layer it reads and the affine map into B's layer l - 1."""

    sources: dict[int, int]  # B's KV layer l (1..L_B) -> A's layer
    weight: dict[int, Any]  # (d_A, d_B) float32
    bias: dict[int, Any]  # (d_B,)
    meta: dict[str, Any] = field(default_factory=dict)  # widths, depths, held-out R² per layer, stores

    @property
    def b_layers(self) -> list[int]:
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
        return x.to(device=w.device, dtype=w.dtype) @ w + self.bias[layer]

    def to(self, device: Any) -> LayerMaps:
        """The same maps on `device` (B's: the maps then run where B does, not on the host)."""
        return LayerMaps(self.sources, {l: w.to(device) for l, w in self.weight.items()},
                         {l: b.to(device) for l, b in self.bias.items()}, self.meta)

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


def mapped_cache(model_b: Any, maps: LayerMaps, states: dict[int, list[Any]]) -> Any:
    """B's KvCache from A's per-token states (states[A layer][item] (P_i, d_A)) through the maps:
    per B layer, one product of every item's rows (statekv.packed_cache)."""
    import torch

    from pipeline.evaluation.statekv import item_lengths, map_precision, packed_cache, packed_rows

    rows = packed_rows(states)
    with torch.no_grad(), map_precision(model_b):
        return packed_cache(model_b, item_lengths({la: states[la] for la in maps.a_layers}), maps.b_layers,
                            lambda l: maps.apply(l, rows(maps.sources[l])))
