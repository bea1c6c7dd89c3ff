"""The coordination games: generators, the .jsonl loader, option scoring, the registry, and the
graft diagnostics with the A = B, k = j = L invariant on a tiny real model."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import UserError
from pipeline.tasks import games
from pipeline.tasks.games import (COUNTRY_ALIASES, PLACE_ALIASES, PLACES, TIPS, GameConfig, countries_items,
                                  load_game, option_choice, read_games_jsonl, tipsheets_items)
from pipeline.tasks.registry import TASKS, get_task


def test_country_table_is_checked():
    places = [p for p, _ in PLACES]
    assert len(places) == len(set(places)) and len(PLACES) >= 80
    for place, country in PLACES:
        for name in (country, *COUNTRY_ALIASES.get(country, ()), *PLACE_ALIASES.get(place, ())):
            assert name.lower() not in place.lower(), f"{place} names its answer {name}"
    assert len({c for _, c in PLACES}) >= 40  # many countries: guessing one is not a strategy


@pytest.mark.parametrize("make", [countries_items, tipsheets_items])
def test_generators_are_seeded_and_deterministic(make):
    a, b, c = make(50, 0), make(50, 0), make(50, 1)
    assert a == b and a != c and len(a) == 50 and len({it.id for it in a}) == 50
    assert len({it.prompt_a for it in a}) == 50  # no repeated item


def test_countries_answer_follows_from_prompt_a_only():
    table = dict(PLACES)
    for it in countries_items(200, 3):
        person, place = it.prompt_a.removesuffix(".").split(" is at ", 1)
        assert it.answers[0] == table[place]
        assert person in it.prompt_b and place not in it.prompt_b and it.answers[0] not in it.prompt_b


def test_tipsheets_answer_is_the_company_with_the_good_tip():
    positive = [t.split("{c}") for t in TIPS["positive"]]
    for it in tipsheets_items(100, 5):
        assert len(it.options) == 3 and it.answers[0] in it.options
        good = [line for line in it.prompt_a.splitlines()[1:]
                if any(line[2:].startswith(pre) and line.endswith(post) for pre, post in positive)]
        assert len(good) == 1 and it.answers[0] in good[0]
        for other in set(it.options) - {it.answers[0]}:  # B's prompt names all three, A's tips decide
            assert other in it.prompt_b and other not in good[0]
    first = [it.options.index(it.answers[0]) for it in tipsheets_items(300, 0)]
    assert all(first.count(k) > 60 for k in range(3))  # the answer's position in B's list is not a cue


def test_option_choice_and_scores():
    opts = ("Vorlex Corp", "Vor Labs", "Pex Systems")
    assert option_choice("I would invest in Vorlex Corp.", opts) == "Vorlex Corp"
    assert option_choice("Pex Systems, not Vorlex Corp", opts) == "Pex Systems"
    assert option_choice("Vor Labs", opts) == "Vor Labs" and option_choice("none of them", opts) is None
    prompts = get_task("tipsheets").prompts(GameConfig(n=3))
    gold = prompts.golds[0][0]
    assert prompts.score(0, gold) == {"em": 1.0, "f1": 1.0, "option": 1.0, "contains": 1.0}
    assert prompts.score(0, f"Answer: {gold}.\nBecause...")["option"] == 1.0
    wrong = next(o for o in prompts.b[0].split(": ")[1].split(". ")[0].replace(" or ", ", ").split(", ") if o != gold)
    assert prompts.score(0, wrong)["option"] == 0.0 and prompts.primary == "option"
    assert prompts.setting == "private" and prompts.skyline[0].startswith(prompts.a[0])


def test_jsonl_loader_reads_published_shape(tmp_path):
    path = tmp_path / "countries.jsonl"
    rows = [{"prompt_a": "Ann is at the Louvre.", "prompt_b": "Which country is Ann in?", "answer": "France"},
            {"id": "x", "prompt_a": "Tips...", "prompt_b": "Pick one.", "answer": ["Acme"], "options": ["Acme", "Bolt"]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = read_games_jsonl(path)
    assert [it.id for it in items] == ["countries-1", "x"] and items[1].options == ("Acme", "Bolt")
    assert load_game("countries", str(path), 1, 0)[0][0] in items
    prompts = get_task("countries").prompts(GameConfig(source=str(path), n=5))
    assert prompts.ids == ["countries-1", "x"] and prompts.primary == "em"  # options on some items only


@pytest.mark.parametrize("line, message", [
    ("not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"prompt_b": "q", "answer": "a"}', "no field 'prompt_a'"),
    ('{"prompt_a": 3, "prompt_b": "q", "answer": "a"}', "'prompt_a' must be a non-empty string"),
    ('{"prompt_a": "p", "prompt_b": "  ", "answer": "a"}', "'prompt_b' must be a non-empty string"),
    ('{"prompt_a": "p", "prompt_b": "q"}', "no field 'answer'"),
    ('{"prompt_a": "p", "prompt_b": "q", "answer": [1]}', "'answer' must be"),
    ('{"prompt_a": "p", "prompt_b": "q", "answer": "a", "options": "a,b"}', "'options' must be a list"),
    ('{"prompt_a": "p", "prompt_b": "q", "answer": "a", "options": ["b", "c"]}', "the answer 'a' among them"),
    ('{"prompt_a": "p", "prompt_b": "q", "answer": "a", "options": ["a"]}', "at least two choices"),
])
def test_jsonl_loader_bad_lines_are_one_clear_line(tmp_path, line, message):
    path = tmp_path / "g.jsonl"
    path.write_text('{"prompt_a": "p", "prompt_b": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(UserError, match=message) as e:
        read_games_jsonl(path)
    assert str(e.value).startswith(f"{path}:2: ") and "\n" not in str(e.value)


def test_jsonl_loader_file_level_errors(tmp_path):
    dup = tmp_path / "d.jsonl"
    dup.write_text('{"id": 1, "prompt_a": "p", "prompt_b": "q", "answer": "a"}\n' * 2)
    with pytest.raises(UserError, match="id '1' appears twice"):
        read_games_jsonl(dup)
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(UserError, match="holds no item"):
        read_games_jsonl(tmp_path / "e.jsonl")
    with pytest.raises(UserError, match="expected 'generate' or an existing file"):
        load_game("countries", str(tmp_path / "missing.jsonl"), 5)


def test_registry_is_the_one_list_of_tasks():
    from pipeline.config_evaluate import EvaluateConfig, config_from_dict
    from stages.evaluate import evaluations

    assert set(TASKS) == {"squad", "gsm8k", "countries", "tipsheets"}
    cfg = config_from_dict({"tasks": ["countries", "tipsheets"], "countries": {"n": 7}})
    assert cfg.countries.n == 7 and isinstance(EvaluateConfig().tipsheets, GameConfig)
    assert set(evaluations()) == {*TASKS, "similarity", "sweep"}
    with pytest.raises(UserError, match="unknown task 'chess'"):
        get_task("chess")
    # items disjoint from the evaluation items, for aligners trained in the task's own format
    evaluation = get_task("countries").prompts(GameConfig(n=30))
    train = get_task("countries").prompts(GameConfig(n=30, seed=1), exclude=frozenset(evaluation.a))
    assert len(train.a) == 30 and not set(train.a) & set(evaluation.a)


def test_game_task_runs_every_method_with_diagnostics(tiny_pair):
    from pipeline.config_evaluate import EvaluateConfig
    from pipeline.evaluation.methods.run import evaluate_task

    cfg = EvaluateConfig(layer_a=2, layer_b=3, batch_size=4, n_boot=100, modes=["replace", "sum", "mean"],
                         methods=["b_alone", "a_alone", "nl", "ac", "skyline"],  # two architectures: no kv
                         tipsheets=GameConfig(n=4, max_new_tokens=3))
    result = evaluate_task("tipsheets", tiny_pair, cfg)
    runs = {r.name: r for r in result.runs}
    # every latent variant runs beside its mismatched control (the default), on the same items
    assert list(runs) == ["b_alone", "a_alone", "nl", "ac_replace", "ac_replace~mismatched", "ac_sum",
                          "ac_sum~mismatched", "ac_mean", "ac_mean~mismatched", "skyline"]
    control = result.summary["ac_sum~mismatched"]
    assert control["family"] == "control" and control["control_of"] == "ac_sum"
    assert "vs_mismatched" in result.summary["ac_sum"] and "vs_mismatched" not in result.summary["nl"]
    assert result.summary["ac_sum"]["family"] == "ac" and result.summary["nl"]["bytes_sent"] > 0
    assert result.setting == "private" and result.prompts.columns == ("option", "em", "f1", "contains")
    for name in ("ac_replace", "ac_sum", "ac_mean"):
        d = runs[name].diagnostics
        assert set(d) == {"norm_ratio", "cosine", "kl_skyline", "agree_skyline", "gold_logprob"} and len(d["cosine"]) == 4
        assert all(r > 0 for r in d["norm_ratio"]) and all(-1 <= c <= 1 for c in d["cosine"])
    assert set(runs["b_alone"].diagnostics) == {"kl_skyline", "agree_skyline", "gold_logprob"}
    assert set(runs["skyline"].diagnostics) == {"gold_logprob"}
    s = result.summary["ac_replace"]["diagnostics"]
    assert s["agree_skyline"]["n"] == 4 and s["kl_skyline"]["mean"] >= 0
    row = result.predictions()[0]["ac_sum"]
    assert {"text", "option", "em", "f1", "norm_ratio", "kl_skyline"} <= set(row)
    assert "first token = skyline's" in result.table() and "option [95% CI]" in result.table()


def test_same_model_last_layer_replace_gives_the_skyline_first_token(tiny_pair):
    check_last_layer_graft_is_the_skyline(tiny_pair.model_b, tiny_pair.tok_b)


def check_last_layer_graft_is_the_skyline(model, tok, n: int = 5, atol: float = 1e-4) -> None:
    """A = B, k = j = L, f = replace, and A reading the skyline prompt: B's last-token state after the
    last block is the skyline's own, so its first-token distribution is the skyline's (KL 0, same
    top token); the diagnostics see exactly that. B's own state (norm ratio 1, cosine 1) likewise.
    One layer lower it is no longer the skyline's. (tests/test_games_slow.py: the same on real weights.)"""
    import torch

    from pipeline.evaluation.diagnostics import graft_geometry, skyline_closeness
    from pipeline.encoding import encode
    from pipeline.generation import Decoding, generate
    from pipeline.injection import communicate, sender_states
    from pipeline.architecture import architecture

    prompts = get_task("countries").prompts(GameConfig(n=n))
    sky = [encode(tok, t) for t in prompts.skyline]
    own = [encode(tok, t) for t in prompts.b]
    L = architecture(model).n_layers
    decoding = Decoding(max_new_tokens=1)
    sky_logits = generate(model, tok, sky, decoding, batch_size=2, keep_first_logits=True).first_logits
    sent = sender_states(model, tok, sky, L, batch_size=2)
    records = []
    gen = communicate(model, tok, own, L, sent.vectors, "replace", decoding, batch_size=2, keep_first_logits=True,
                      records=records)
    close = skyline_closeness(gen.first_logits, sky_logits)
    assert max(close["kl_skyline"]) < 1e-6 and close["agree_skyline"] == [1.0] * n
    other = communicate(model, tok, own, L - 1, sent.vectors, "replace", decoding, batch_size=2,
                        keep_first_logits=True)  # one layer lower is no longer the skyline
    assert max(skyline_closeness(other.first_logits, sky_logits)["kl_skyline"]) > 1e-4
    own_state = sender_states(model, tok, own, L, batch_size=2).vectors
    geo = graft_geometry(own_state, records)
    assert geo["norm_ratio"] == pytest.approx([1.0] * n, abs=1e-5) and geo["cosine"] == pytest.approx([1.0] * n, abs=1e-5)
    assert torch.allclose(gen.first_logits, sky_logits, atol=atol)


def test_kv_methods_run_beside_ac_on_the_same_items(tiny_pair, monkeypatch):
    from pipeline.config_evaluate import EvaluateConfig, KvSection
    from pipeline.evaluation.methods.run import evaluate_task
    from pipeline.evaluation.pair import Pair

    same = Pair(tiny_pair.model_b, tiny_pair.tok_b, tiny_pair.model_b, tiny_pair.tok_b, "tiny-qwen", "tiny-qwen")
    cfg = EvaluateConfig(layer_a=2, layer_b=2, batch_size=2, n_boot=100, methods=["b_alone", "ac", "kv", "skyline"], controls=[],
                         modes=["replace"], kv=KvSection(layers=["all", "top", [2]], top_m=2, calib_items=2),
                         countries=GameConfig(n=3, max_new_tokens=2))
    result = evaluate_task("countries", same, cfg)
    assert [r.name for r in result.runs] == ["b_alone", "ac_replace", "kv_all", "kv_top", "kv_L2", "skyline"]
    s = result.summary
    assert s["kv_all"]["details"]["layers"] == [1, 2, 3, 4] and s["kv_L2"]["details"]["layers"] == [2]
    assert len(s["kv_top"]["details"]["layers"]) == 2 and "vs_b_alone" in s["kv_top"]
    assert s["kv_L2"]["details"]["cache_bytes"] * 4 == s["kv_all"]["details"]["cache_bytes"]
    # A's prefill is charged (up to the deepest shared block), and B's extra attention on top of B alone
    assert s["kv_L2"]["compute"]["a_blocks"] == 2 and s["kv_all"]["compute"]["a_blocks"] == 4
    assert s["kv_all"]["compute"]["a_tokens"] > 0 and s["kv_all"]["compute"]["flops"] > s["b_alone"]["compute"]["flops"]
    assert "agree_skyline" in s["kv_all"]["diagnostics"]
    calls = []
    monkeypatch.setattr("pipeline.evaluation.methods.base.generate", lambda *a, **k: calls.append(1))
    with pytest.raises(UserError, match="one architecture"):  # a pair of two architectures: one line, before any work
        evaluate_task("countries", tiny_pair, cfg)
    assert calls == []
