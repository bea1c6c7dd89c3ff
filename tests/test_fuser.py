"""The learned fuser (pipeline/fuser.py, stage fuse@<variant>) on the tiny pair: tiny-llama (A, 64
wide, 3 layers, BOS) -> tiny-qwen (B, 48 wide, 4 layers, another tokenizer), fp32 CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.errors import UserError
from pipeline.evaluation import kv
from pipeline.fuser import Fuser, build_net, layer_sources, load_fuser
from pipeline.generation import Decoding
from pipeline.injection import token_states
from tests.helpers import run_cli, write_params, xmodel_process

FUSE = {"n_train": 12, "n_heldout": 4, "epochs": 3, "patience": 0, "batch_size": 4, "rank": 8, "lr": 0.01,
        "answer_tokens": 6, "device": "cpu", "dtype": "float32"}
TEXTS_A = ["Alice is at the Louvre museum in the city of lights.", "Bob is at the Colosseum.", "Carol"]
TEXTS_B = ["Where is Alice?", "Which country is Bob in, and why?", "Name it."]


def params_for(tmp, tiny_models, **fuse):
    return write_params(tmp, {"a": tiny_models["llama"], "b": tiny_models["qwen"]}, fuse={**FUSE, **fuse},
                        evaluate={"countries": {"n": 6, "max_new_tokens": 6}}, corpus={"n": 16})


def identity_fuser(model) -> Fuser:
    """A = B, every map the identity, every gate open: the prefix is B's own cache of A's prompt."""
    from pipeline.architecture import architecture

    n, d = architecture(model).n_layers, architecture(model).width
    net = build_net(n, d, d, d)
    with torch.no_grad():
        net["u"].copy_(torch.eye(d).expand(n, d, d))
        net["v"].copy_(torch.eye(d).expand(n, d, d))
        net["sd"].fill_(1.0)
        net["gate"].fill_(50.0)  # sigmoid(50) is 1.0 in float32
    return Fuser(net, {"sources": layer_sources(n, n), "d_a": d, "d_b": d, "layers_a": n, "layers_b": n})


def test_identity_fuser_with_a_equals_b_is_kv_all(tiny_loaded):
    model, tok = tiny_loaded["qwen"]
    pa, pb = [tok(t)["input_ids"] for t in TEXTS_A], [tok(t)["input_ids"] for t in TEXTS_B]
    fuser = identity_fuser(model)
    assert fuser.a_layers == [0, 1, 2, 3] and fuser.b_layers == [1, 2, 3, 4]
    assert fuser.flops_per_a_token(model) == 4 * (2.0 * (48 * 48 * 2) + 2.0 * 48 * 2 * 2 * 12)  # 2 KV heads of 12
    built = fuser.cache(model, token_states(model, tok, pa, fuser.a_layers, batch_size=2).states)
    want = kv.a_cache(model, tok, pa)
    for g, w in zip(built.entries, want.entries):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    decoding = Decoding(max_new_tokens=5)
    got = kv.kv_generate(model, tok, pb, built, fuser.b_layers, decoding, keep_first_logits=True)
    ref = kv.kv_generate(model, tok, pb, want, fuser.b_layers, decoding, keep_first_logits=True)
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got.first_logits, ref.first_logits, atol=1e-4, rtol=1e-4)
    # a closed gate removes the prefix's content (its values), not its keys
    with torch.no_grad():
        fuser.net["gate"].fill_(-50.0)
    closed = fuser.cache(model, token_states(model, tok, pa, fuser.a_layers).states)
    for c, w in zip(closed.entries, want.entries):
        assert c[:, 1].abs().max() < 1e-12
        torch.testing.assert_close(c[:, 0], w[:, 0], atol=1e-5, rtol=1e-5)


def test_layer_sources_match_relative_depth():
    assert layer_sources(3, 4) == [0, 1, 2, 2]  # B block l reads depth (l - 1) / 4 of A's 3 layers
    assert layer_sources(24, 28)[0] == 0 and layer_sources(24, 28)[-1] == 23
    assert layer_sources(5, 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("variant", ["task", "prose"])
def test_trains_on_the_tiny_pair_and_lowers_the_heldout_loss(tmp_path, tiny_models, tiny_pair, capsys, variant):
    params = params_for(tmp_path, tiny_models)
    code, out, err = run_cli(capsys, "--params", str(params), "fuse", variant)
    assert code == 0, err
    data = tmp_path / "data"
    details = json.loads((data / "details" / f"fuse-{variant}.json").read_text())
    assert details["heldout_loss"] < details["heldout_loss_init"], details["history"]
    assert details["n_train"] == 12 and details["n_heldout"] == 4 and details["epochs_run"] == 3
    assert details["best_epoch"] >= 1 and details["heldout_loss"] == min(h["heldout_loss"] for h in details["history"])
    assert json.loads((data / "metrics" / f"fuse-{variant}.json").read_text())["loss"] == pytest.approx(
        details["heldout_loss"], rel=1e-3)
    assert sorted(p.name for p in (data / "fusers" / variant).iterdir()) == ["fuser.json", "weights.safetensors"]
    assert "held-out loss" in out
    # what the method registry calls: A's states -> B's KvCache -> B generates reading it
    fuser = load_fuser(variant, data)
    fuser.check(tiny_pair)
    pa = [tiny_pair.tok_a(t)["input_ids"] for t in TEXTS_A]
    pb = [tiny_pair.tok_b(t)["input_ids"] for t in TEXTS_B]
    cache = fuser.cache(tiny_pair.model_b, token_states(tiny_pair.model_a, tiny_pair.tok_a, pa, fuser.a_layers).states)
    assert cache.lengths == [len(p) for p in pa] and cache.shape == kv.cache_shape(tiny_pair.model_b, "B")
    gen = kv.kv_generate(tiny_pair.model_b, tiny_pair.tok_b, pb, cache, fuser.b_layers, Decoding(max_new_tokens=3),
                         keep_first_logits=True)
    alone = kv.kv_generate(tiny_pair.model_b, tiny_pair.tok_b, pb, cache, [], Decoding(max_new_tokens=3),
                           keep_first_logits=True)
    assert (gen.first_logits - alone.first_logits).abs().max() > 1e-3  # the prefix is read
    from pipeline.evaluation.pair import Pair

    swapped = Pair(tiny_pair.model_b, tiny_pair.tok_b, tiny_pair.model_a, tiny_pair.tok_a)
    with pytest.raises(UserError, match="trained for other models") as e:
        fuser.check(swapped)
    assert "\n" not in str(e.value)


def test_resumes_after_a_kill_to_the_uninterrupted_result(tmp_path_factory, tiny_models):
    """Killed in its second epoch (after the first epoch's checkpoint), rerun: the same weights and
    record as a run that was never interrupted."""
    runs = {}
    for name, fault in (("whole", None), ("killed", "kill_after_steps:5")):  # 3 steps an epoch
        tmp = tmp_path_factory.mktemp(name)
        params = params_for(tmp, tiny_models)
        if fault:
            killed = xmodel_process(params, "fuse", "task", "--quiet", env={"XMODEL_FAULT": fault})
            assert killed.returncode == -9, killed.stderr
            assert (tmp / "data" / "fusers" / "task" / "ckpt" / "state.json").is_file()
            assert not (tmp / "data" / "fusers" / "task" / "fuser.json").exists()
            assert not (tmp / "data" / "metrics" / "fuse-task.json").exists()
        done = xmodel_process(params, "fuse", "task", "--quiet")
        assert done.returncode == 0, done.stderr
        details = json.loads((tmp / "data" / "details" / "fuse-task.json").read_text())
        assert details["resumed_from_epoch"] == (1 if fault else 0)
        runs[name] = ({k: v for k, v in details.items() if k not in ("seconds", "resumed_from_epoch", "init")},
                      (tmp / "data" / "fusers" / "task" / "weights.safetensors").read_bytes())
        assert not (tmp / "data" / "fusers" / "task" / "ckpt").exists()
    assert runs["killed"][0] == runs["whole"][0]
    assert runs["killed"][1] == runs["whole"][1]


def test_a_non_finite_loss_is_refused_in_one_line(tmp_path, tiny_models, capsys):
    params = params_for(tmp_path, tiny_models, lr=1e30)
    code, _, err = run_cli(capsys, "--params", str(params), "fuse", "task", "--quiet")
    assert code == 2 and err.count("\n") == 1, err
    assert "loss became" in err and "lower fuse.lr" in err
    assert not (tmp_path / "data" / "fusers" / "task").exists()
    assert not (tmp_path / "data" / "metrics" / "fuse-task.json").exists()


def test_a_fuser_of_other_inputs_is_replaced_only_with_force(tmp_path, tiny_models, capsys):
    params = params_for(tmp_path, tiny_models, epochs=1)
    assert run_cli(capsys, "--params", str(params), "fuse", "task", "--quiet")[0] == 0
    weights = (tmp_path / "data" / "fusers" / "task" / "weights.safetensors").read_bytes()
    code, _, err = run_cli(capsys, "--params", str(params), "-S", "fuse.rank=4", "fuse", "task", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "--force" in err, err
    assert (tmp_path / "data" / "fusers" / "task" / "weights.safetensors").read_bytes() == weights
    code, _, err = run_cli(capsys, "--params", str(params), "-S", "fuse.rank=4", "fuse", "task", "--quiet", "--force")
    assert code == 0, err
    assert load_fuser("task", tmp_path / "data").meta["config"]["rank"] == 4


def test_task_items_are_train_places_and_never_an_evaluation_item(tiny_pair):
    """The task variant draws Countries items from the train places (the place split) and skips every
    item the evaluation reads; the target is B's greedy skyline answer."""
    from dataclasses import replace

    from pipeline.config import FuseConfig
    from pipeline.config_evaluate import EvaluateConfig
    from pipeline.fuser import task_examples
    from pipeline.tasks.games import place_split
    from pipeline.tasks.registry import get_task

    evaluate = EvaluateConfig()
    evaluate = replace(evaluate, countries=replace(evaluate.countries, n=40, places="all", max_new_tokens=3))
    cfg = FuseConfig(n_train=30, n_heldout=10, answer_tokens=2)
    examples = task_examples(cfg, evaluate, tiny_pair.model_b, tiny_pair.tok_a, tiny_pair.tok_b, lambda line: None)
    assert len(examples) == 40
    places = {e.a_text.split(" is at ", 1)[1].rstrip(".") for e in examples}
    assert places <= {place for place, _ in place_split("train")}, places
    evaluated = set(get_task("countries").prompts(evaluate.countries).a)
    assert not evaluated & {e.a_text for e in examples}
    assert all(len(e.target) <= 2 for e in examples) and any(e.target for e in examples)


def test_training_that_never_beats_the_least_squares_start_keeps_it(tmp_path, tiny_models, capsys):
    """Early stopping counts the least-squares start as epoch 0. With A = B at full rank and open gates
    the start is B's own cache of A's prompt (kv_all); an lr far too high (yet finite) only raises the
    held-out loss, and those epochs are not kept."""
    params = write_params(tmp_path, {"a": tiny_models["qwen"], "b": tiny_models["qwen"]},
                          fuse={**FUSE, "rank": 48, "ridge": 1e-6, "gate_init": 10.0, "lr": 1000.0, "epochs": 2},
                          evaluate={"countries": {"n": 6, "max_new_tokens": 6}})
    code, _, err = run_cli(capsys, "--params", str(params), "fuse", "task", "--quiet")
    assert code == 0, err
    details = json.loads((tmp_path / "data" / "details" / "fuse-task.json").read_text())
    assert all(h["heldout_loss"] > details["heldout_loss_init"] for h in details["history"]), details["history"]
    assert details["best_epoch"] == 0 and details["heldout_loss"] == details["heldout_loss_init"]
    assert details["gates"] == pytest.approx([1 / (1 + math.exp(-10.0))] * 4)  # the start's, untrained
