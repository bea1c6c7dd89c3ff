"""The method registry: each method is what its primitive computes, names are checked, controls
are what they say, and multi-vector AC with m = 1 is plain AC."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.config_evaluate import EvaluateConfig, KvSection, MultiVectorSection
from pipeline.evaluation.methods.run import evaluate_task
from pipeline.evaluation.pair import Pair
from pipeline.evaluation.prompts import task_prompts
from pipeline.tasks.games import GameConfig

FAST = dict(batch_size=3, n_boot=100, controls=[], countries=GameConfig(n=5, max_new_tokens=3))


@pytest.fixture(scope="module")
def same(tiny_pair):
    """A = B (tiny qwen): every method can run, KV included."""
    return Pair(tiny_pair.model_b, tiny_pair.tok_b, tiny_pair.model_b, tiny_pair.tok_b, "tiny-qwen", "tiny-qwen")


def test_registry_names_are_the_config_vocabulary():
    from pipeline.config_evaluate import METHODS as VOCABULARY
    from pipeline.evaluation.methods.registry import METHODS

    from pipeline.evaluation.methods.base import FAMILIES
    from pipeline.headlines import GROUPS

    assert set(METHODS) == set(VOCABULARY)
    for name, method in METHODS.items():
        assert method.name == name and method.summary and method.family in FAMILIES
    assert set(GROUPS) <= set(FAMILIES)  # the headline groups name families a record can hold


def test_unknown_method_is_one_line_before_any_work(same, monkeypatch):
    from pipeline.evaluation.methods.run import run_methods

    with pytest.raises(UserError, match="not one of"):
        EvaluateConfig(methods=["b_alone", "telepathy"])
    calls = []
    monkeypatch.setattr("pipeline.evaluation.methods.base.generate", lambda *a, **k: calls.append(1))
    cfg = EvaluateConfig(layer_a=2, layer_b=2, **FAST)
    object.__setattr__(cfg, "methods", ["b_alone", "telepathy"])  # past the config, as a hand-built one could be
    prompts, decoding = task_prompts("countries", cfg)
    with pytest.raises(UserError, match="unknown communication method 'telepathy'"):
        run_methods(same, prompts, decoding, cfg, 2, 2)
    assert calls == []


def test_each_method_is_its_primitive(same):
    """The registry only orders and accounts: B alone, plain AC and KV equal direct calls of
    generate, communicate and kv_generate on the same items (the default report's numbers follow)."""
    from pipeline.evaluation.kv import a_cache, kv_generate
    from pipeline.encoding import encode
    from pipeline.generation import generate
    from pipeline.injection import communicate, sender_states

    cfg = EvaluateConfig(layer_a=2, layer_b=2, methods=["b_alone", "ac", "kv", "skyline"], **FAST)
    result = evaluate_task("countries", same, cfg)
    runs = {r.name: r for r in result.runs}
    prompts, decoding = task_prompts("countries", cfg)
    m, tok = same.model_b, same.tok_b
    enc_a = [encode(tok, t, cfg.chat, prompts.cue) for t in prompts.a]
    enc_b = [encode(tok, t, cfg.chat, prompts.cue) for t in prompts.b]
    seeds = list(range(len(enc_b)))
    kw = dict(batch_size=cfg.batch_size, seeds=seeds, keep_first_logits=True)
    assert runs["b_alone"].texts == generate(m, tok, enc_b, decoding, **kw).texts
    vectors = sender_states(m, tok, enc_a, 2, batch_size=cfg.batch_size).vectors
    assert runs["ac_replace"].texts == communicate(m, tok, enc_b, 2, vectors, "replace", decoding, **kw).texts
    cache = a_cache(m, tok, enc_a, batch_size=cfg.batch_size)
    assert runs["kv_all"].texts == kv_generate(m, tok, enc_b, cache, [1, 2, 3, 4], decoding, **kw).texts
    assert runs["b_alone"].bytes_sent == [0] * 5
    assert runs["ac_replace"].bytes_sent == [vectors.shape[1] * 4] * 5  # one float32 vector per item
    assert runs["kv_all"].bytes_sent == [e.numel() * e.element_size() for e in cache.entries]
    assert [runs[n].family for n in ("b_alone", "ac_replace", "kv_all", "skyline")] == ["reference", "ac", "kv",
                                                                                       "reference"]


def test_multi_vector_with_one_token_is_plain_ac(same):
    """m = 1 without an aligner, A = B: the same edit as ac_replace, so the same first-token logits
    and answers; more tokens send more bytes and change what B reads."""
    cfg = EvaluateConfig(layer_a=2, layer_b=2, methods=["ac", "mv_ac"], mv=MultiVectorSection(m=[1, 4, "all"]),
                         **FAST)
    runs = {r.name: r for r in evaluate_task("countries", same, cfg).runs}
    assert list(runs) == ["ac_replace", "mv1_replace", "mv4_replace", "mvall_replace"]
    assert runs["mv1_replace"].texts == runs["ac_replace"].texts
    assert runs["mv1_replace"].bytes_sent == runs["ac_replace"].bytes_sent
    assert runs["mv4_replace"].bytes_sent == [4 * b for b in runs["ac_replace"].bytes_sent]
    assert all(a > b for a, b in zip(runs["mvall_replace"].bytes_sent, runs["mv4_replace"].bytes_sent))


def test_multi_vector_one_token_edit_equals_plain_injection(same):
    from pipeline.encoding import encode
    from pipeline.injection import Graft, communicate, communicate_rows, with_placeholders
    from pipeline.generation import Decoding

    tok, m = same.tok_b, same.model_b
    prompts = [encode(tok, t) for t in ("Where is Ana?", "Ben is in Oslo.", "Say something")]
    vectors = torch.randn(3, m.config.hidden_size)
    dec = Decoding(max_new_tokens=3)
    one = communicate(m, tok, prompts, 2, vectors, "replace", dec, batch_size=2, keep_first_logits=True)
    rows = communicate_rows(m, tok, prompts, 2, [v[None] for v in vectors], "replace", dec, batch_size=2,
                            keep_first_logits=True)
    assert torch.equal(one.first_logits, rows.first_logits) and one.texts == rows.texts
    # m placeholders are inserted before the last token, and the last m positions are edited
    assert with_placeholders([5, 6, 7], 3, 0) == [5, 6, 0, 0, 7]
    records: list[Graft] = []
    msgs = [torch.randn(k, m.config.hidden_size) for k in (1, 3, 2)]
    placed = [with_placeholders(p, len(x), 0) for p, x in zip(prompts, msgs)]
    communicate_rows(m, tok, placed, 2, msgs, "replace", dec, batch_size=3, records=records)
    rec = records[0]
    assert rec.calls == 1 and torch.allclose(rec.after, torch.stack([msgs[i][-1] for i in rec.rows]))


def test_controls_transform_the_message():
    from pipeline.evaluation.methods.latent import controlled, derangement

    for n in (2, 3, 7, 50):
        sigma = derangement(n)
        assert sorted(sigma) == list(range(n)) and all(i != s for i, s in enumerate(sigma))
    msg = [torch.randn(4, 8) * (i + 1) for i in range(5)]
    mismatched = controlled(msg, "mismatched")
    assert all(any(torch.equal(x, y) for y in msg) and not torch.equal(x, msg[i]) for i, x in enumerate(mismatched))
    noise = controlled(msg, "noise")
    for x, y in zip(noise, msg):
        assert torch.allclose(x.norm(dim=-1), y.norm(dim=-1), rtol=1e-5) and not torch.allclose(x, y)
    assert all(not x.any() for x in controlled(msg, "zero"))


def test_controls_run_beside_each_latent_variant(same):
    cfg = EvaluateConfig(layer_a=2, layer_b=2, methods=["b_alone", "ac", "kv"], modes=["replace", "gated"],
                         kv=KvSection(layers=["all"]), **{**FAST, "controls": ["mismatched", "noise", "zero"]})
    result = evaluate_task("countries", same, cfg)
    names = [r.name for r in result.runs]
    for base in ("ac_replace", "ac_gated", "kv_all"):
        assert [f"{base}~{c}" for c in ("mismatched", "noise", "zero")] == names[names.index(base) + 1:
                                                                                 names.index(base) + 4]
        assert {"vs_mismatched", "vs_noise", "vs_zero", "vs_b_alone"} <= set(result.summary[base])
    runs = {r.name: r for r in result.runs}
    # gated = B's state plus g times A's: the geometry sees g·v
    g = cfg.gate
    assert runs["ac_gated"].diagnostics["norm_ratio"] == pytest.approx(
        [g * x for x in runs["ac_replace"].diagnostics["norm_ratio"]], rel=1e-4)


def test_gold_logprob_is_the_teacher_forced_likelihood_and_leaves_decoding_alone(same):
    from pipeline.encoding import encode
    from pipeline.generation import Decoding, generate

    tok, m = same.tok_b, same.model_b
    prompts = [encode(tok, t) for t in ("Where is Ana?", "Ben is in Oslo, Norway today.", "Say")]
    gold = [tok("Oslo, Norway", add_special_tokens=False)["input_ids"], tok("x", add_special_tokens=False)["input_ids"],
            tok("the capital city", add_special_tokens=False)["input_ids"]]
    dec = Decoding(max_new_tokens=4)
    plain = generate(m, tok, prompts, dec, batch_size=2)
    scored = generate(m, tok, prompts, dec, batch_size=2, gold=gold)
    assert scored.texts == plain.texts and scored.tokens == plain.tokens
    for p, g, got in zip(prompts, gold, scored.extra["gold_logprob"]):
        with torch.no_grad():
            logits = m(input_ids=torch.tensor([p + g])).logits[0].float()
        want = sum(float(torch.log_softmax(logits[len(p) - 1 + t], -1)[g[t]]) for t in range(len(g)))
        assert got == pytest.approx(want, abs=1e-3)


def test_every_method_records_the_gold_answers_likelihood(same):
    cfg = EvaluateConfig(layer_a=2, layer_b=2, methods=["b_alone", "nl", "ac", "kv", "skyline"],
                         **{**FAST, "controls": ["mismatched"]})
    result = evaluate_task("countries", same, cfg)
    for r in result.runs:
        assert len(r.diagnostics["gold_logprob"]) == 5 and all(x <= 0 for x in r.diagnostics["gold_logprob"])
    s = result.summary
    assert "mean" in s["kv_all"]["diagnostics"]["gold_logprob"]
    assert "gold_logprob" in s["ac_replace"]["vs_mismatched"] and "gold_logprob" in s["nl"]["vs_b_alone"]
    off = EvaluateConfig(layer_a=2, layer_b=2, methods=["b_alone"], gold_logprob=False, **FAST)
    assert "gold_logprob" not in evaluate_task("countries", same, off).runs[0].diagnostics


def test_xmodel_methods_lists_every_method_and_its_needs(capsys):
    from pipeline.evaluation.methods.registry import METHODS
    from tests.helpers import run_cli

    code, out, err = run_cli(capsys, "methods")
    assert code == 0
    for name, method in METHODS.items():
        assert f"{name} " in out and method.summary in out
    assert "one architecture" in out and "A's per-token states" in out


def test_a_mismatched_control_of_one_item_is_refused():
    from pipeline.evaluation.methods.latent import controlled

    with pytest.raises(UserError, match="at least 2 items"):
        controlled([torch.ones(3)], "mismatched")
