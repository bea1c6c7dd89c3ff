"""`xmodel kvmaps`: the per-layer maps of mapped KV (pipeline/evaluation/mapped_kv.py), fitted from
the two activation stores alone (per-token rows paired by character offset; no model is loaded).

Writes data/aligners/NAME/ (weights.safetensors + kvmaps.json: layer pairs, held-out R² per layer,
the models' identities), data/details/fit-NAME.json and its headline data/metrics/fit-NAME.json; evaluate lists `kvmaps` in
evaluate.aligners to run method mapped_kv through them."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

NAME = "kvmaps"
# params this stage reads, as dvc.yaml declares them (tests/test_imports.py checks)
PARAMS = ("fit.heldout_frac", "fit.seed")


def run(params: Any, name: str = NAME, log: Callable[[str], None] | None = None) -> Path:
    from pipeline.artifacts import Outputs, layout, write_record
    from pipeline.headlines import layer_maps
    from pipeline.kvmaps import fit_layer_maps
    from pipeline.fitting import read_stores
    from pipeline.pairing import check_same_corpus

    paths = layout(params)
    a, b = read_stores(paths.stores)
    check_same_corpus(a, b)
    maps = fit_layer_maps(a, b, params.fit.seed, params.fit.heldout_frac, log or (lambda s: None))
    target = paths.aligner(name)
    with Outputs():  # the maps and their record appear together
        maps.save(target)
        write_record(paths, f"fit-{name}", maps.meta, layer_maps)
    return target
