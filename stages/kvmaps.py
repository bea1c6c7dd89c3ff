"""`xmodel kvmaps`: the per-layer maps of mapped KV (pipeline/evaluation/mapped_kv.py), fitted from
the two activation stores alone (per-token rows paired by character offset; no model is loaded).

Writes data/aligners/kvmaps/ (weights.safetensors + kvmaps.json: layer pairs, held-out R² per layer,
the models' identities) and data/details/fit-kvmaps.json; evaluate lists `kvmaps` in
evaluate.aligners to run method mapped_kv through them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

NAME = "kvmaps"


def run(params: Any, log: Callable[[str], None] | None = None) -> Path:
    from pipeline.artifacts import Outputs, layout, write_json
    from pipeline.evaluation.mapped_kv import fit_layer_maps
    from pipeline.fitting import open_stores
    from pipeline.pairing import check_same_corpus

    a, b = open_stores(params)
    check_same_corpus(a, b)
    maps = fit_layer_maps(a, b, params.fit.seed, params.fit.heldout_frac, log or (lambda s: None))
    paths = layout(params)
    target = paths.aligner(NAME)
    with Outputs():  # the maps and their record appear together
        maps.save(target)
        write_json(paths.details(f"fit-{NAME}"), maps.meta)
    return target
