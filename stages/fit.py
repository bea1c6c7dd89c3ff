"""Stage `fit@<name>`: fit one aligner from the two activation stores (no model is loaded).

Writes data/aligners/<name>/ and its record, data/details/ and data/metrics/fit-<name>.json, together
(pipeline.fitting)."""

from __future__ import annotations

from pipeline.config import Params


def run(params: Params, name: str, force: bool = False, log=None):
    from pipeline.fitting import fit_from_stores

    return fit_from_stores(params, name, force=force, log=log)
