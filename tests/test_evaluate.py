"""The evaluation on tiny real models: every method on the same items, the summaries, the probe,
the layer sweep and the stage's outputs. Scores of random models mean nothing; the plumbing does."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from pipeline.errors import UserError
from pipeline.config_evaluate import (EvaluateConfig, SimilarityConfig, SweepConfig,
                                        config_from_dict)
from pipeline.evaluation.methods.run import evaluate_task
from pipeline.evaluation.pair import Pair, load_aligners
from pipeline.evaluation.prompts import task_prompts
from pipeline.evaluation.similarity import similarity_probe, similarity_texts
from pipeline.evaluation.sweep import layer_sweep
from pipeline.tasks.games import GameConfig
from pipeline.tasks.gsm8k import Gsm8kConfig
from pipeline.tasks.squad import SquadConfig

FAST = dict(batch_size=4, n_boot=200, controls=[], squad=SquadConfig(n=4, max_new_tokens=3),
            gsm8k=Gsm8kConfig(n=3, max_new_tokens=4), countries=GameConfig(n=4, max_new_tokens=3),
            tipsheets=GameConfig(n=3, max_new_tokens=3), similarity=SimilarityConfig(n=6),
            sweep=SweepConfig(n=3, layers_a=[0, 3], layers_b=[2, 4], max_new_tokens=2))
NO_KV = ["b_alone", "a_alone", "nl", "ac", "skyline"]  # the tiny pair is two architectures: kv refuses it


@pytest.fixture(scope="module")
def pair(tiny_pair):
    return tiny_pair


@pytest.fixture(scope="module")
def aligner_dir(tmp_path_factory):
    """data/aligners/procrustes fitted on random rows 64 → 48, recorded as layers (2, 3)."""
    from pipeline.aligners.registry import get_aligner

    data = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 64)).astype(np.float32)
    aligner = get_aligner("procrustes")().fit(x, x[:, :48] + 0.1 * rng.normal(size=(100, 48)).astype(np.float32))
    aligner.meta = {"layer_a": 2, "layer_b": 3}
    aligner.save(data / "aligners" / "procrustes")
    return data


def test_squad_private_every_method_on_the_same_items(pair, aligner_dir):
    cfg = EvaluateConfig(layer_a=2, layer_b=3, aligners=["procrustes"], modes=["replace", "sum", "mean"],
                         methods=NO_KV, **FAST)
    aligners = load_aligners(cfg.aligners, aligner_dir, pair, 2, 3)
    result = evaluate_task("squad", pair, cfg, aligners)
    names = [r.name for r in result.runs]
    assert names == ["b_alone", "a_alone", "nl", "ac_replace", "ac_sum", "ac_mean", "ac_procrustes_replace", "skyline"]
    assert all(len(r.texts) == 4 and len(r.scores["em"]) == 4 and len(r.scores["f1"]) == 4 for r in result.runs)
    s = result.summary
    for name in names:
        assert s[name]["em"]["interval"] == "wilson" and s[name]["f1"]["interval"] == "bootstrap"
        assert 0 <= s[name]["em"]["lo"] <= s[name]["em"]["mean"] <= s[name]["em"]["hi"] <= 1
    assert "vs_b_alone" not in s["b_alone"] and "mcnemar" in s["ac_replace"]["vs_b_alone"]["em"]
    assert "vs_nl" in s["ac_sum"] and "vs_nl" not in s["nl"]
    # compute: AC charges A's prompt through k blocks only; NL charges A's generation and B's reading
    comp = {n: s[n]["compute"] for n in names}
    prompt_a = comp["a_alone"]["a_tokens"] - comp["a_alone"]["a_new_tokens"]
    assert comp["ac_replace"]["a_tokens"] == prompt_a and comp["ac_replace"]["a_blocks"] == 2
    assert comp["ac_replace"]["a_new_tokens"] == 0 and comp["a_alone"]["a_blocks"] == 3
    assert comp["nl"]["a_tokens"] == comp["a_alone"]["a_tokens"] and comp["nl"]["b_tokens"] > comp["b_alone"]["b_tokens"]
    assert comp["skyline"]["b_tokens"] > comp["b_alone"]["b_tokens"] and comp["b_alone"]["a_tokens"] == 0
    assert all(c["seconds"] > 0 for c in comp.values())
    rows = result.predictions()
    assert len(rows) == 4 and set(names) <= set(rows[0]) and rows[0]["gold"]
    json.dumps(result.metrics())
    table = result.table()
    assert table.count("\n") == len(names) + 1 and "ac_procrustes_replace" in table


def test_shared_setting_has_no_skyline_and_gsm8k_scores_accuracy(pair):
    cfg = EvaluateConfig(layer_a=1.0, layer_b=0.5, methods=["b_alone", "ac", "skyline"], modes=["mean"],
                         **{**FAST, "squad": replace(FAST["squad"], setting="shared")})
    result = evaluate_task("squad", pair, cfg)
    assert [r.name for r in result.runs] == ["b_alone", "ac_mean"] and (result.k, result.j) == (3, 2)
    result = evaluate_task("gsm8k", pair, cfg)
    assert result.summary["ac_mean"]["accuracy"]["interval"] == "wilson"
    assert "accuracy [95% CI]" in result.table()


def test_prompts_private_and_shared():
    cfg = EvaluateConfig(squad=SquadConfig(n=2))
    prompts, decoding = task_prompts("squad", cfg)
    assert decoding.sampling == "greedy" and decoding.stop_strings == ("\n",)
    assert prompts.skyline == prompts.a and prompts.b[0] != prompts.a[0]
    it_context = prompts.a[0].split("Passage: ")[1].split("\n")[0]
    assert it_context not in prompts.b[0] and it_context not in prompts.with_message(0, "msg")
    assert "msg" in prompts.with_message(0, "msg")
    prompts, decoding = task_prompts("gsm8k", replace(cfg, gsm8k=Gsm8kConfig(n=2)))
    assert decoding.sampling == "nucleus" and decoding.top_p == 0.9 and prompts.a == prompts.b


def test_with_a_equal_to_b_a_reading_the_skyline_prompt_reuses_the_skyline_run(pair, monkeypatch):
    import copy

    import pipeline.evaluation.methods.base as methods

    calls = []
    real = methods.generate
    monkeypatch.setattr(methods, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = EvaluateConfig(layer_a=2, layer_b=2, methods=["a_alone", "nl", "skyline"], **FAST)
    same = Pair(pair.model_b, pair.tok_b, pair.model_b, pair.tok_b, "b", "b")
    runs = {r.name: r for r in evaluate_task("squad", same, cfg).runs}
    assert len(calls) == 2  # the skyline and NL's B: A's answer is the skyline's (squad private: one prompt)
    assert runs["a_alone"].texts == runs["skyline"].texts
    assert runs["a_alone"].compute.a_tokens == runs["skyline"].compute.b_tokens > 0  # still charged to A
    # two model objects that are not known to be one model (no content hash given): A runs on its own
    calls.clear()
    evaluate_task("squad", Pair(pair.model_b, pair.tok_b, copy.deepcopy(pair.model_b), pair.tok_b), cfg)
    assert len(calls) == 3


def test_aligners_are_checked_against_models_and_layers(pair, aligner_dir):
    assert set(load_aligners(["procrustes"], aligner_dir, pair, 2, 3)) == {"procrustes"}
    with pytest.raises(UserError, match="fitted on layers"):
        load_aligners(["procrustes"], aligner_dir, pair, 2, 4)
    swapped = Pair(pair.model_b, pair.tok_b, pair.model_a, pair.tok_a)
    with pytest.raises(UserError, match="refit it on these models"):
        load_aligners(["procrustes"], aligner_dir, swapped, 2, 3)
    with pytest.raises(UserError, match="no finished aligner"):
        load_aligners(["missing"], aligner_dir, pair, 2, 3)


def test_similarity_probe(pair, aligner_dir):
    from pipeline.data import pydoc_sentences

    texts = similarity_texts(SimilarityConfig(n=6), exclude=pydoc_sentences()[:50])
    assert len(texts) == 6 and not set(texts) & set(pydoc_sentences()[:50])
    aligners = load_aligners(["procrustes"], aligner_dir, pair, 2, 3)
    result = similarity_probe(pair, texts, 2, 3, ["replace", "sum"], aligners, batch_size=4, n_boot=100)
    assert set(result["variants"]) == {"none", "procrustes"}
    for entry in result["variants"].values():
        for key in ("replace/matched", "replace/shuffled", "sum/matched", "sum/shuffled"):
            assert entry[key]["kl"]["mean"] >= 0 and -1 <= entry[key]["cosine"]["mean"] <= 1
    # B's own state grafted back is B's own run: KL 0, cosine 1 (the probe's zero point)
    own = Pair(pair.model_b, pair.tok_b, pair.model_b, pair.tok_b)
    zero = similarity_probe(own, texts, 3, 3, ["replace"], batch_size=4, n_boot=100)["variants"]["none"]
    assert zero["replace/matched"]["kl"]["mean"] == pytest.approx(0, abs=1e-6)
    assert zero["replace/matched"]["cosine"]["mean"] == pytest.approx(1, abs=1e-5)
    assert zero["replace/shuffled"]["kl"]["mean"] > 1e-4


def test_layer_sweep_grid(pair):
    cfg = EvaluateConfig(**FAST)
    prompts, decoding = task_prompts("squad", cfg, 3)
    result = layer_sweep(pair, prompts, replace(decoding, max_new_tokens=2), [0, 3], [2, 4], batch_size=4)
    assert np.asarray(result["grid"]).shape == (2, 2) and result["metric"] == "em"
    # every score of the task, and how often B's first token is the skyline's, per (k, j) cell
    assert set(result["grids"]) == {"em", "f1", "contains", "kl_skyline", "agree_skyline"}
    assert set(result["reference"]) == {"b_alone", "skyline"} and result["reference"]["skyline"]["em"] >= 0
    assert all(0 <= v <= 1 for row in result["grids"]["agree_skyline"] for v in row)
    assert result["grid"] == result["grids"]["em"]


def test_config_from_params_mapping():
    cfg = config_from_dict({"layer_a": 3, "modes": ["replace"], "squad": {"n": 5, "setting": "shared"}})
    assert cfg.squad.n == 5 and cfg.layer_a == 3 and cfg.gsm8k.n == 100
    with pytest.raises(UserError, match="unknown key"):
        config_from_dict({"squad": {"n_items": 5}})
    with pytest.raises(UserError, match="not one of"):
        config_from_dict({"modes": ["max"]})
    with pytest.raises(UserError, match="private or shared"):
        config_from_dict({"squad": {"setting": "open"}})
    with pytest.raises(UserError, match="evaluate.tasks: 'mmlu' is not one of squad, gsm8k, countries, tipsheets, similarity"):
        config_from_dict({"tasks": ["squad", "mmlu"]})


def test_stage_writes_details_metrics_table_predictions_and_plots(pair, aligner_dir, tmp_path, tiny_models):
    from stages import evaluate as stage
    from tests.helpers import write_params

    from pipeline.config import load_params

    models = {"a": tiny_models["llama"], "b": tiny_models["qwen"]}
    params = load_params(write_params(tmp_path, models, paths={"data": str(aligner_dir)}))
    cfg = EvaluateConfig(layer_a=2, layer_b=3, aligners=["procrustes"], methods=["b_alone", "ac"], modes=["replace"],
                         **FAST)
    out = stage.run(params, "squad", cfg, pair=pair)
    details = json.loads(out["details"].read_text())
    assert set(details["methods"]) == {"b_alone", "ac_replace", "ac_procrustes_replace"}
    assert details["items"] == {"source": "generate", "passages": "generated, seed 0"}  # which items, named
    # the metrics file DVC shows: the headline numbers only
    assert set(json.loads(out["metrics"].read_text())) == {"n", "b_alone", "ac", "ac_w", "p"}
    assert len(out["predictions"].read_text().splitlines()) == 4
    assert out["plot"].stat().st_size > 1000 and "| ac_replace |" in out["table"].read_text()
    out = stage.run(params, "similarity", cfg, pair=pair)
    assert "procrustes" in json.loads(out["details"].read_text())["variants"]
    assert set(json.loads(out["metrics"].read_text())) == {"n", "kl", "kl_w"}
    assert out["plot"].stat().st_size > 1000 and "| procrustes | replace |" in out["table"].read_text()
    out = stage.run(params, "sweep", cfg, pair=pair)
    sweep = json.loads(out["details"].read_text())  # run by hand, not a DVC stage: details only
    assert np.asarray(sweep["grid"]).shape == (2, 2)
    evaluation, _ = task_prompts("squad", cfg)  # the sweep's items are not the evaluation's
    sweep_items, _ = task_prompts("squad", replace(cfg, squad=replace(cfg.squad, seed=cfg.sweep.seed)), 3,
                                  exclude=frozenset(evaluation.a))
    assert sweep["n"] == 3 and not set(sweep_items.a) & set(evaluation.a)
    out = stage.run(params, "sweep", replace(cfg, sweep=replace(cfg.sweep, layers_a="all", layers_b=[4])), pair=pair)
    assert json.loads(out["details"].read_text())["layers_a"] == [1, 2, 3]  # every block of A
    assert out["plot"].stat().st_size > 1000
    with pytest.raises(UserError, match="unknown evaluation"):
        stage.run(params, "mmlu", cfg, pair=pair)


def test_plots_survive_rounding_at_the_interval_edge(tmp_path):
    from pipeline.evaluation.results import plot_scores
    from pipeline.evaluation.similarity import plot_similarity

    summary = {"m": {"em": {"mean": 0.38, "lo": 0.38 + 1e-17, "hi": 0.4}}, "z": {"em": {"mean": 0, "lo": 0, "hi": 0.04}}}
    assert plot_scores(summary, "em", tmp_path / "a.png").stat().st_size > 1000
    kl = {"kl": {"mean": 0.1, "lo": 0.1 + 1e-17, "hi": 0.2}, "cosine": {"mean": 1, "lo": 1, "hi": 1}}
    result = {"k": 1, "j": 2, "n": 3, "variants": {"none": {"replace/matched": kl, "replace/shuffled": kl}}}
    assert plot_similarity(result, tmp_path / "b.png").stat().st_size > 1000


def test_the_record_names_each_aligner_by_fingerprint_and_no_fit_writes_it_meanwhile(pair, aligner_dir, tmp_path,
                                                                                      tiny_models):
    """Issue 23, item 2: the evaluation record names the hash of the weights and aligner.json it
    loaded, and an aligner that `xmodel fit` is rewriting is not read (refused at once, naming the fit)."""
    import os

    from pipeline.artifacts import aligner_lock, exclusive, folder_hash
    from pipeline.config import load_params
    from stages import evaluate as stage
    from tests.helpers import write_params

    params = load_params(write_params(tmp_path, {"a": tiny_models["llama"], "b": tiny_models["qwen"]},
                                      paths={"data": str(aligner_dir)}))
    cfg = EvaluateConfig(layer_a=2, layer_b=3, aligners=["procrustes"], methods=["b_alone", "ac"], modes=["replace"],
                         **FAST)
    directory = aligner_dir / "aligners" / "procrustes"
    out = stage.run(params, "squad", cfg, pair=pair)
    used = json.loads(out["details"].read_text())["aligners_used"]
    assert used == {"procrustes": {"path": "aligners/procrustes", "fingerprint": folder_hash(directory)}}
    before = out["details"].read_bytes()
    with exclusive(aligner_lock(directory), directory):  # what a running `xmodel fit procrustes --force` holds
        with pytest.raises(UserError, match=f"is being written by pid {os.getpid()} ") as e:
            stage.run(params, "squad", cfg, pair=pair)
    assert "\n" not in str(e.value) and out["details"].read_bytes() == before
