"""Stage `prepare@<role>`: resolve a model spec (fetch, check, convert, cache) and write its manifest."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.config import Params


def run(params: Params, role: str) -> Path:
    from pipeline.models import resolve_model

    resolved = resolve_model(params.model_spec(role), params.paths.cache_dir())
    manifest = params.paths.manifest(role)
    manifest.parent.mkdir(parents=True, exist_ok=True)
    # The manifest names the weights by content (sha), so a changed model makes extract stale in DVC.
    manifest.write_text(json.dumps(resolved.to_json(), indent=2, default=str) + "\n")
    return manifest
