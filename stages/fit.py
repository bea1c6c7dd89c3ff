"""Stage `fit@<name>`: fit one aligner from the two activation stores (no model is loaded).

Writes data/aligners/<name>/ and its record, data/details/ and data/metrics/fit-<name>.json, together
(pipeline.fitting)."""

from __future__ import annotations

from pipeline.config import Params

# params this stage reads, as dvc.yaml declares them (tests/test_imports.py checks); fit.threads and
# fit.device change only the speed
PARAMS = ("fit.kind", "fit.layers", "fit.heldout_frac", "fit.seed", "fit.pairwise_rows", "fit.temperature",
          "fit.aligners.${key}")


def run(params: Params, name: str, force: bool = False, log=None):
    from pipeline.artifacts import layout
    from pipeline.fitting import fit_from_stores

    paths = layout(params)
    return fit_from_stores(name, params.fit, paths.stores, paths, force=force, log=log)
