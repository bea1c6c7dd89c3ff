"""The A = B, k = j = L invariant of tests/test_games.py on real weights (Qwen2.5-Coder-0.5B-Instruct
from the offline catalog, fp32 CPU). Run with `pytest -m slow`."""

from __future__ import annotations

import pytest

from tests.test_games import check_last_layer_graft_is_the_skyline

pytestmark = pytest.mark.slow


def test_qwen_same_model_last_layer_replace_gives_the_skyline_first_token(monkeypatch):
    from pipeline.config import PathsConfig
    from pipeline.models import load_model, resolve_model

    monkeypatch.setenv("XMODEL_OFFLINE", "1")
    model, tok = load_model(resolve_model("qwen2.5-coder-0.5b-instruct", PathsConfig().cache_dir()),
                            device="cpu", dtype="float32")
    check_last_layer_graft_is_the_skyline(model, tok, n=4, atol=1e-3)
