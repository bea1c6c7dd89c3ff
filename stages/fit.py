"""Stage `fit@<name>`: fit one aligner from the two activation stores (no model is loaded)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from pipeline.config import Params


def metrics_path(params: Params, name: str) -> Path:
    return params.paths.metrics(f"fit-{name}")


def run(params: Params, name: str, force: bool = False, log=None):
    from pipeline.fitting import fit_from_stores

    result = fit_from_stores(params, name, force=force, log=log)
    if result.metrics:  # rank 0 only
        write_metrics(metrics_path(params, name), result.metrics)
    return result


def write_metrics(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # NaN is not JSON: null keeps the file readable by `dvc metrics show` and strict parsers
    path.write_text(json.dumps(_finite(data), indent=2) + "\n")


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
