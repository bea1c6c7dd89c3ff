"""What an evaluation writes for others to read (lm-evaluation-harness's per-sample layout, bytes sent
per item, which items it scored) and what it refuses before any method runs (prompts that do not fit
a model's context), on the tiny real models."""

from __future__ import annotations

import hashlib
import json

import pytest

from pipeline.errors import UserError
from pipeline.config_evaluate import EvaluateConfig
from pipeline.tasks.games import GameConfig


@pytest.fixture()
def params(tmp_path, tiny_models):
    from pipeline.config import load_params
    from tests.helpers import write_params

    return load_params(write_params(tmp_path, {"a": tiny_models["llama"], "b": tiny_models["qwen"]},
                                    paths={"data": str(tmp_path / "data")}))


def _cfg(**countries):
    return EvaluateConfig(layer_a=2, layer_b=3, batch_size=4, n_boot=100, controls=[], aligners=[],
                          methods=["b_alone", "a_alone", "nl", "ac", "skyline"], modes=["replace"],
                          countries=GameConfig(**{"n": 3, "max_new_tokens": 3, **countries}))


def test_samples_follow_the_harness_layout_with_bytes_sent(params, tiny_pair):
    from stages import evaluate as stage

    out = stage.run(params, "countries", _cfg(), pair=tiny_pair)
    samples = [json.loads(line) for line in out["samples"].read_text().splitlines()]
    predictions = [json.loads(line) for line in out["predictions"].read_text().splitlines()]
    methods = [m for m in predictions[0] if m not in ("id", "gold")]
    assert len(samples) == len(methods) * 3 and {s["method"] for s in samples} == set(methods)
    for s in samples:
        pred = predictions[s["doc_id"]][s["method"]]
        assert {"doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics",
                "doc_hash", "prompt_hash", "target_hash"} <= set(s)
        assert s["resps"] == [[pred["text"]]] and s["doc"]["id"] == predictions[s["doc_id"]]["id"]
        context, gen_kwargs = s["arguments"]["gen_args_0"]["arg_0"], s["arguments"]["gen_args_0"]["arg_1"]
        assert s["prompt_hash"] == hashlib.sha256(context.encode()).hexdigest()
        assert gen_kwargs["max_gen_toks"] == 3 and gen_kwargs["until"] == ["\n"] and not gen_kwargs["do_sample"]
        assert s["metrics"] == ["em", "f1", "contains"] and all(s[m] == pred[m] for m in s["metrics"])
        assert s["bytes_sent"] == pred["bytes_sent"]  # what A sent B for this item
    nl = next(s for s in samples if s["method"] == "nl")
    a_text = predictions[nl["doc_id"]]["a_alone"]["text"]
    assert nl["bytes_sent"] == len(a_text.encode()) and any(s["bytes_sent"] > 0 for s in samples if s["method"] == "ac_replace")
    details = json.loads(out["details"].read_text())
    assert details["items"]["source"] == "generate" and details["items"]["places"] == "all"


def test_prompts_longer_than_a_context_are_refused_before_any_method(params, tiny_pair, tmp_path, monkeypatch):
    from pipeline.evaluation.methods import run as methods_run
    from stages import evaluate as stage

    def no_method(*a, **k):
        raise AssertionError("a method ran")

    monkeypatch.setattr(methods_run, "evaluate_task", no_method)
    long = " ".join(["word"] * 3000)  # the tiny models have 2048 positions
    rows = [{"prompt_a": "Ann is at the Louvre.", "prompt_b": "Which country is Ann in?", "answer": "France", "id": "ok"},
            {"prompt_a": f"Bo is at the Louvre. {long}", "prompt_b": "Which country is Bo in?", "answer": "France",
             "id": "long-one"}]
    path = tmp_path / "g.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"item long-one: its prompt_a is \d+ tokens \(\+3 to generate\) but A "
                                         r"\(tiny-llama\) has a context of 2048 positions") as e:
        stage.run(params, "countries", _cfg(source=str(path), n=2), pair=tiny_pair)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "data" / "evaluate" / "countries").exists()  # nothing written

    from pipeline.evaluation import prompts as prompts_mod

    real = prompts_mod.encode

    def guarded(tokenizer, text, *a, **k):
        assert len(text) < 100_000, "a huge prompt was tokenized"
        return real(tokenizer, text, *a, **k)

    monkeypatch.setattr(prompts_mod, "encode", guarded)
    rows[1]["prompt_a"] = "Bo is at the Louvre. " + "x" * 500_000  # one huge line, under the row limit
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=r"item long-one: its prompt_a is 500,021 bytes, more than A \(tiny-llama\) "
                                         r"can read .* \(refused before tokenizing\)"):
        stage.run(params, "countries", _cfg(source=str(path), n=2), pair=tiny_pair)


def test_evaluate_help_lists_every_task_and_probe(capsys):
    from pipeline.tasks.registry import TASKS
    from tests.helpers import run_cli

    code, out, err = run_cli(capsys, "evaluate", "--help")
    assert code == 0, err
    for name, task in TASKS.items():
        assert name in out and task.about.split(":")[0] in out
    assert "similarity" in out and "sweep" in out and "Probes" in out


def test_a_cache_before_b_prompt_counts_against_b_context(tiny_loaded):
    """KV puts A's cache of prompt_a before B's prompt: the two together must fit B's context."""
    from pipeline.evaluation.pair import Pair
    from pipeline.encoding import encode
    from pipeline.evaluation.prompts import check_context
    from pipeline.generation import Decoding
    from pipeline.tasks.games import GameItem, game_prompts

    model, tok = tiny_loaded["qwen"]
    pair = Pair(model, tok, model, tok, "tiny-qwen", "tiny-qwen")
    item = GameItem("both-long", "Ann is at the Louvre. " + "word " * 380, "Which country is Ann in? " + "word " * 350,
                    ("France",))
    prompts = game_prompts("countries", [item])
    lengths = [len(encode(tok, t, True, prompts.cue)) for t in (prompts.a[0], prompts.b[0])]
    assert all(n + 3 < 2048 for n in lengths) and sum(lengths) + 3 > 2048  # each fits alone, not together
    check_context(pair, prompts, Decoding(max_new_tokens=3), methods=["b_alone", "kv"], a_prefix=False)
    with pytest.raises(UserError, match=rf"item both-long: its prompt_b is {lengths[1]} tokens \(\+{lengths[0] + 3} "
                                        r"of A's prompt_a before it and to generate\) but B \(tiny-qwen\) has a "
                                        r"context of 2048 positions"):
        check_context(pair, prompts, Decoding(max_new_tokens=3), methods=["b_alone", "kv"], a_prefix=True)
