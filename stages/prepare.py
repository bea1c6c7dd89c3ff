"""Stage `prepare@<role>`: resolve a model spec (fetch, check, convert, cache) and write its manifest."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params

# params this stage reads, as dvc.yaml declares them (tests/test_imports.py checks)
PARAMS = ("models.${item}",)


def run(params: Params, role: str) -> Path:
    from pipeline.models import resolve_model

    from pipeline.artifacts import write_json

    resolved = resolve_model(params.model_spec(role), params.paths.cache_dir())
    # The manifest names the weights by content (sha), so a changed model makes extract stale in DVC.
    return write_json(params.paths.manifest(role), resolved.to_json())
