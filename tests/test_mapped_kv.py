"""Mapped KV: per-layer maps from the store, A's states through them into B's keys and values."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.config_evaluate import EvaluateConfig, KvSection
from pipeline.evaluation.mapped_kv import LayerMaps
from pipeline.kvmaps import layer_pairs
from pipeline.evaluation.methods.run import evaluate_task
from pipeline.evaluation.pair import Pair
from pipeline.tasks.games import GameConfig
from tests.helpers import run_cli, write_params


def test_identity_maps_with_a_equal_to_b_are_kv_all(tiny_pair):
    """A = B, every layer read from the layer below unchanged: B's keys/values of A's prompt are A's
    own cache, so mapped KV is kv_all: the same answers and first-token logits."""
    model, tok = tiny_pair.model_b, tiny_pair.tok_b
    same = Pair(model, tok, model, tok, "tiny-qwen", "tiny-qwen")
    from pipeline.architecture import architecture

    arch = architecture(model)
    maps = LayerMaps.identity(arch.n_layers, arch.width)
    cfg = EvaluateConfig(layer_a=2, layer_b=2, batch_size=3, n_boot=100, controls=[], methods=["kv", "mapped_kv"],
                         kv=KvSection(layers=["all"]), countries=GameConfig(n=5, max_new_tokens=4))
    runs = {r.name: r for r in evaluate_task("countries", same, cfg, {"ident": maps}).runs}
    assert runs["mkv_ident"].texts == runs["kv_all"].texts
    assert runs["mkv_ident"].diagnostics["gold_logprob"] == pytest.approx(runs["kv_all"].diagnostics["gold_logprob"],
                                                                          abs=1e-4)
    assert runs["mkv_ident"].family == "mapped_kv"


def test_layer_pairs_by_relative_depth():
    # B of 4 blocks stores layers 0..4; A of 8 stores even layers: block l reads B layer l-1 at depth (l-1)/4
    assert layer_pairs([0, 2, 4, 6, 8], [0, 1, 2, 3, 4], 8, 4) == {1: 0, 2: 2, 3: 4, 4: 6}
    assert layer_pairs([0, 3], [3, 4], 3, 4) == {4: 3}  # the last layer feeds no block; nearest stored A layer


def test_cross_tokenizer_mapped_kv_end_to_end(tiny_models, tmp_path, capsys):
    """tiny-llama → tiny-qwen (two tokenizers, widths and depths): extract every layer, fit the maps
    from the stores alone, evaluate with them beside B alone and a mismatched control."""
    params = write_params(tmp_path, {"a": tiny_models["llama"], "b": tiny_models["qwen"]},
                          extract={"layers": [0.0, 0.25, 0.5, 0.75, 1.0]},
                          evaluate={"tasks": ["countries"], "layer_a": 2, "layer_b": 2, "aligners": ["kvmaps"],
                                    "methods": ["b_alone", "mapped_kv", "skyline"], "batch_size": 4, "n_boot": 100,
                                    "countries": {"n": 6, "max_new_tokens": 3, "places": "eval"}})
    p = ["--params", str(params)]
    for role in ("a", "b"):
        assert run_cli(capsys, *p, "extract", "--model", role, "--quiet")[0] == 0
    code, out, err = run_cli(capsys, *p, "kvmaps")
    assert code == 0, err
    meta = json.loads((tmp_path / "data" / "aligners" / "kvmaps" / "kvmaps.json").read_text())
    assert meta["d_a"] == 64 and meta["d_b"] == 48 and meta["sources"] and meta["heldout_rows"] > 0
    code, out, err = run_cli(capsys, *p, "evaluate", "countries")
    assert code == 0, err
    details = json.loads((tmp_path / "data" / "details" / "evaluate-countries.json").read_text())
    methods = details["methods"]
    assert {"b_alone", "mkv_kvmaps", "mkv_kvmaps~mismatched", "skyline"} <= set(methods)
    assert "vs_mismatched" in methods["mkv_kvmaps"] and methods["mkv_kvmaps"]["bytes_sent"] > 0
    # maps fitted on other models are refused with one line
    (tmp_path / "other").mkdir()
    other = write_params(tmp_path / "other", {"a": tiny_models["qwen"], "b": tiny_models["qwen"]},
                         evaluate={"aligners": [str(tmp_path / "data" / "aligners" / "kvmaps")],
                                   "methods": ["mapped_kv"], "countries": {"n": 2}})
    code, out, err = run_cli(capsys, "--params", str(other), "evaluate", "countries")
    assert code == 2 and "refit" in err
    # a listed maps folder that does not exist: one line naming it
    gone = write_params(tmp_path / "other", {"a": tiny_models["llama"], "b": tiny_models["qwen"]},
                        evaluate={"aligners": [str(tmp_path / "nowhere" / "kvmaps")], "methods": ["mapped_kv"],
                                  "countries": {"n": 2}})
    code, out, err = run_cli(capsys, "--params", str(gone), "evaluate", "countries")
    assert code == 2 and "nowhere/kvmaps" in err and len(err.strip().splitlines()) == 1


def test_the_fuser_method_through_an_identity_fuser_is_kv_all(tiny_pair):
    """The registry's fuser method runs B on the fuser's prefix: with A = B and an identity fuser it
    is kv_all, and its mismatched control runs beside it."""
    from tests.test_fuser import identity_fuser

    model, tok = tiny_pair.model_b, tiny_pair.tok_b
    same = Pair(model, tok, model, tok, "tiny-qwen", "tiny-qwen")
    cfg = EvaluateConfig(layer_a=2, layer_b=2, batch_size=3, n_boot=100, methods=["kv", "fuser"],
                         kv=KvSection(layers=["all"]), countries=GameConfig(n=5, max_new_tokens=4))
    runs = {r.name: r for r in evaluate_task("countries", same, cfg, {"ident": identity_fuser(model)}).runs}
    assert runs["fuser_ident"].texts == runs["kv_all"].texts and runs["fuser_ident"].family == "fuser"
    assert runs["fuser_ident~mismatched"].control_of == "fuser_ident"


def test_a_runs_once_for_every_method_reading_its_token_states(tiny_pair, monkeypatch):
    """Multi-vector AC reads A's layer k, mapped KV every layer: one pass of A serves both."""
    import pipeline.injection as injection

    model, tok = tiny_pair.model_b, tiny_pair.tok_b
    same = Pair(model, tok, model, tok, "tiny-qwen", "tiny-qwen")
    from pipeline.architecture import architecture

    arch = architecture(model)
    calls = []
    real = injection.token_states
    monkeypatch.setattr(injection, "token_states", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    cfg = EvaluateConfig(layer_a=2, layer_b=2, batch_size=3, n_boot=100, controls=[], methods=["mv_ac", "mapped_kv"],
                         countries=GameConfig(n=3, max_new_tokens=2))
    evaluate_task("countries", same, cfg, {"ident": LayerMaps.identity(arch.n_layers, arch.width)})
    assert calls == [[0, 1, 2, 3]]  # layer k = 2 and the maps' A layers 0..3, in one pass


@pytest.mark.parametrize("kind", ["maps", "fuser"])
def test_packed_build_equals_each_item_alone(tiny_pair, kind):
    """The build maps every item's rows of a layer in one product and runs B's norm, projections and
    rotary once over all of them (statekv.packed_cache): each item's keys/values equal its own
    states mapped and turned into B's keys/values alone (positions 0..P_i-1), every layer, fp32;
    the fuser's training path keeps its gradients."""
    from pipeline.architecture import architecture
    from pipeline.evaluation.mapped_kv import mapped_cache
    from pipeline.evaluation.statekv import block_kv
    from pipeline.fuser import Fuser, build_net, layer_sources
    from pipeline.injection import token_states

    ma, mb, tok = tiny_pair.model_a, tiny_pair.model_b, tiny_pair.tok_a
    la, lb, d_a, d_b = (architecture(ma).n_layers, architecture(mb).n_layers, architecture(ma).width,
                        architecture(mb).width)
    sources = layer_sources(la, lb)
    g = torch.Generator().manual_seed(0)
    if kind == "maps":
        built = LayerMaps({l: s for l, s in enumerate(sources, 1)},
                          {l: torch.randn(d_a, d_b, generator=g) / d_a ** 0.5 for l in range(1, lb + 1)},
                          {l: torch.randn(d_b, generator=g) for l in range(1, lb + 1)})
        build, one, scale = (lambda s: mapped_cache(mb, built, s)), built.apply, [1.0] * lb
    else:
        net = build_net(lb, d_a, d_b, 8)
        with torch.no_grad():
            for name in ("u", "v", "c", "mu", "gate"):
                net[name].normal_(generator=g)
            net["sd"].uniform_(0.5, 2.0, generator=g)
        built = Fuser(net, {"sources": sources, "d_a": d_a, "d_b": d_b})
        build, one, scale = (lambda s: built.cache(mb, s)), built.mapped, torch.sigmoid(net["gate"]).tolist()
    prompts = [tok(t)["input_ids"] for t in ["Alice is at the Louvre.", "Bob", "A module is a file of Python."]]
    states = token_states(ma, tok, prompts, sorted(set(sources)), batch_size=2).states
    cache = build(states)
    assert cache.lengths == [len(p) for p in prompts] and cache.tokens == sum(map(len, prompts))
    with torch.no_grad():
        for i in range(len(prompts)):
            for l, src in enumerate(sources, 1):
                keys, values = block_kv(mb, l, one(l, states[src][i])[None])
                torch.testing.assert_close(cache.entries[i][l - 1, 0], keys[0], atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(cache.entries[i][l - 1, 1], values[0] * scale[l - 1], atol=1e-5, rtol=1e-5)
    if kind == "fuser":  # training: gradients reach every tensor that learns
        net.requires_grad_(True)
        for name in ("mu", "sd"):
            net[name].requires_grad_(False)
        sum(e.square().sum() for e in built.cache(mb, states, grad=True).entries).backward()
        assert all(net[name].grad is not None and net[name].grad.abs().sum() > 0 for name in ("u", "v", "c", "gate"))
