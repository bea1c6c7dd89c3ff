"""Extraction equals an independent HF computation; the layer convention is pinned."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline.config import load_params
from pipeline.data import load_corpus
from stages.extract import run as run_extract
from pipeline.layers import resolve_layers
from store.reader import ActivationStore
from tests.helpers import write_params


def test_relative_depth_convention():
    # 0 = embeddings, L = last block; relative depths round half up
    assert resolve_layers([0.0, 0.5, 1.0], 3) == [0, 2, 3]
    assert resolve_layers([0.25, 0.75], 30) == [8, 23]
    assert resolve_layers([2, 0.0, 2], 4) == [0, 2]


@pytest.mark.parametrize("role", ["a", "b"])
def test_store_equals_hf_hidden_states(tmp_path, tiny_models, role):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tiny_models["llama" if role == "a" else "qwen"]
    params = load_params(write_params(tmp_path, {"a": tiny_models["llama"], "b": tiny_models["qwen"]}))
    result = run_extract(params, role, quiet=True)
    store = ActivationStore(result.path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    n_layers = model.config.num_hidden_layers
    assert store.layers == [0, (n_layers + 1) // 2 if n_layers % 2 else n_layers // 2, n_layers]
    texts = load_corpus(params.corpus).texts
    assert store.n_seq == len(texts)
    seq_start = store.root["seq_start"][:]
    seq_len = store.root["seq_len"][:]
    token_ids = store.root["token_ids"][:]
    char_end = store.root["char_end"][:]
    for i, text in enumerate(texts):
        enc = tok(text, truncation=True, max_length=24, return_offsets_mapping=True, return_tensors="pt")
        with torch.no_grad():
            out = model(input_ids=enc["input_ids"], output_hidden_states=True)
        hs = [h[0].numpy() for h in out.hidden_states]
        k = min(enc["input_ids"].shape[1], 8)
        rows = slice(seq_start[i], seq_start[i] + seq_len[i])
        assert seq_len[i] == k
        assert np.array_equal(token_ids[rows], enc["input_ids"][0, :k].numpy())
        assert np.array_equal(char_end[rows], enc["offset_mapping"][0, :k, 1].numpy())
        for layer in store.layers:
            # HF's last hidden state has the final norm applied; our layer L is the block output before it.
            ref = hs[layer]
            if layer == n_layers:
                stored_last = torch.from_numpy(store.numpy("tokens", layer, rows)[None])
                normed = model.model.norm(stored_last)[0].detach().numpy()
                np.testing.assert_allclose(normed, ref[:k], rtol=1e-4, atol=1e-5)
                continue
            np.testing.assert_allclose(store.numpy("pooled", layer, slice(i, i + 1))[0], ref.mean(0), rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(store.numpy("last", layer, slice(i, i + 1))[0], ref[-1], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(store.numpy("tokens", layer, rows), ref[:k], rtol=1e-4, atol=1e-5)


def test_last_layer_is_block_output_before_final_norm(tmp_path, tiny_models):
    """Pins layer L to the output of block L (not HF's normed hidden_states[L])."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    params = load_params(write_params(tmp_path, {"a": tiny_models["llama"]}, extract={"layers": [3]}))
    store = ActivationStore(run_extract(params, "a", quiet=True).path)
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    text = load_corpus(params.corpus).texts[0]
    captured = {}
    model.model.layers[2].register_forward_hook(lambda m, a, o: captured.setdefault("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(**tok(text, truncation=True, max_length=24, return_tensors="pt"))
    np.testing.assert_allclose(store.numpy("last", 3, slice(0, 1))[0], captured["h"][0, -1].numpy(), rtol=1e-4, atol=1e-5)


def test_bfloat16_store_is_lossless(tmp_path, tiny_models):
    params = load_params(write_params(tmp_path, {"a": tiny_models["llama"]}, extract={"dtype": "bfloat16"}))
    store = ActivationStore(run_extract(params, "a", quiet=True).path)
    assert store.store_dtype == "bfloat16" and store.root["last/L3"].dtype == np.uint16
    values = store.numpy("last", 3)
    # widened bf16 has only 8 mantissa bits: the low 16 bits of every float32 are zero
    assert values.dtype == np.float32 and not (values.view(np.uint32) & 0xFFFF).any()
    assert np.isfinite(values).all() and np.abs(values).sum() > 0


def test_dask_and_torch_readers_agree(tmp_path, tiny_models):
    params = load_params(write_params(tmp_path, {"a": tiny_models["llama"]}))
    store = ActivationStore(run_extract(params, "a", quiet=True).path)
    full = store.numpy("pooled", 2)
    lazy = store.dask("pooled", 2)
    assert lazy.chunks[0][0] == params.extract.unit_size  # shard boundaries
    np.testing.assert_array_equal(lazy.compute(), full)
    rows = np.random.default_rng(0).permutation(store.n_seq)
    batches = list(store.torch_batches("pooled", 2, batch_size=10, rows=rows))
    np.testing.assert_array_equal(torch.cat(batches).numpy(), full[rows])


def test_float16_overflow_is_refused_with_one_line(tmp_path, tiny_models, capsys):
    """Activations beyond float16's range must not be stored as inf."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.helpers import run_cli

    loud = tmp_path / "loud"
    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(1e6)  # embeddings far past float16's 65504
    model.save_pretrained(loud)
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(loud)
    params_file = write_params(tmp_path, {"a": loud}, extract={"store_dtype": "float16"})
    capsys.readouterr()
    code, _, err = run_cli(capsys, "--params", str(params_file), "extract", "--model", "a", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "non-finite" in err and "float32" in err, err
    store = tmp_path / "data" / "stores" / "a.zarr"
    assert not list((store / "_units").glob("*.json"))  # no unit was taken as done


def test_complete_store_still_gets_its_metrics_file(tmp_path, tiny_models, capsys):
    """DVC declares data/metrics/ and data/details/extract-<role>.json: a rerun that finds the store
    complete (built earlier, e.g. under torchrun) writes them when one is missing and keeps the
    measured speed otherwise."""
    from tests.helpers import run_cli

    params_file = write_params(tmp_path, {"a": tiny_models["llama"]}, corpus={"n": 12})
    record = {kind: tmp_path / "data" / kind / "extract-a.json" for kind in ("details", "metrics")}
    args = ("--params", str(params_file), "extract", "--model", "a", "--quiet")
    assert run_cli(capsys, *args)[0] == 0
    first = {kind: json.loads(path.read_text()) for kind, path in record.items()}
    assert first["details"]["n_seq"] == 12 and first["details"]["tokens_per_s"] > 0 and first["details"]["seconds"] > 0
    assert set(first["metrics"]) == {"n", "tokens_per_s", "seconds"} and first["metrics"]["n"] == 12  # the headline
    assert run_cli(capsys, *args)[0] == 0
    assert {kind: json.loads(path.read_text()) for kind, path in record.items()} == first  # kept
    speed = {"tokens_per_s", "seconds"}
    for gone in record.values():
        gone.unlink()
        assert run_cli(capsys, *args)[0] == 0
        again = json.loads(record["details"].read_text())
        assert again["tokens_per_s"] is None and again["seconds"] is None
        assert {k: v for k, v in again.items() if k not in speed} == {k: v for k, v in first["details"].items() if k not in speed}
        assert json.loads(record["metrics"].read_text()) == {"n": 12}


def test_a_store_is_one_computation_whatever_batch_tokens_a_resume_asks(tmp_path, tiny_models, monkeypatch):
    """Batch shapes change the last bits of the states (GEMM and attention reduction order), so a
    store begun with one batch_tokens and resumed with another would mix two computations: the
    resume uses the value the store was begun with, and ends bit-identical to an uninterrupted run."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from pipeline.config import CorpusConfig, ExtractConfig
    from pipeline.distributed import init_dist
    from pipeline.extract import extract_model
    from pipeline.synthetic import SHAPES, random_model
    from tests.helpers import store_arrays

    # two heads of 64 and 48-token texts: a shape where batch composition shows in the last bits on CPU
    monkeypatch.setitem(SHAPES, "bt-probe", dict(SHAPES["tiny-llama"], hidden_size=128, intermediate_size=256,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1))
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    model = random_model("bt-probe", tokenizer, init_std=0.08)
    corpus = load_corpus(CorpusConfig(n=32, max_chars=300))
    source = {"model_id": "bt-probe", "revision": None, "model_sha": "random"}
    small = ExtractConfig(layers=[0, 1, 2], max_tokens=48, tokens_per_seq=4, unit_size=16, batch_tokens=48,
                          device="cpu", dtype="float32")
    large = replace(small, batch_tokens=1000)

    def run(cfg, path):
        extract_model(model, tokenizer, source, corpus, cfg, path, init_dist("cpu"), quiet=True)
        return store_arrays(path)

    ref = run(small, tmp_path / "small.zarr")
    other = run(large, tmp_path / "large.zarr")
    assert any(not np.array_equal(ref[k], other[k]) for k in ref)  # otherwise this test shows nothing
    # as a kill after unit 0 leaves it: unit 1 unmarked, the store not finalized
    path = tmp_path / "resumed.zarr"
    run(small, path)
    (path / "_units" / "u000001.json").unlink()
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["complete"] = False
    (path / "zarr.json").write_text(json.dumps(meta))
    resumed = run(large, path)
    for name in ref:
        assert np.array_equal(ref[name], resumed[name]), name
