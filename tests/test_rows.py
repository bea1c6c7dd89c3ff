"""Users' own files: layouts recognised (the KVComm games' published layout, SQuAD- and GSM8K-style
rows) or mapped by `evaluate.<task>.fields`, in every format datasets reads; every bad row one line
naming file:line; gold answers that an empty reply would match refused."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import UserError
from pipeline.tasks.games import GameConfig
from pipeline.tasks.gsm8k import Gsm8kConfig
from pipeline.tasks.registry import get_task
from pipeline.tasks.squad import SquadConfig

# The KVComm project's published game files (the only public files of the paper's games), rebuilt
# field for field from their layout: Countries rows hold person, landmark, country, prompt_A,
# prompt_B and the answer sentence y; Tip Sheets rows hold prompt_A, prompt_B, options, label, attitudes.
KVCOMM_COUNTRIES = [
    {"person": "Uma", "landmark": "the Statue of Liberty", "country": "United States",
     "prompt_A": "Uma is at the Statue of Liberty.", "prompt_B": "Which country is Uma located in?",
     "y": "Uma is located in the United States."},
    {"person": "Ravi", "landmark": "the Eiffel Tower", "country": "France",
     "prompt_A": "Ravi is at the Eiffel Tower.", "prompt_B": "Which country is Ravi located in?",
     "y": "Ravi is located in France."},
]
KVCOMM_TIPSHEETS = [
    {"prompt_A": "Tips: Zorbex Corp doubled its profits. Quilla Labs is being investigated for fraud. "
                 "Marnix Foods moved offices.",
     "prompt_B": "Invest in exactly one of Zorbex Corp, Quilla Labs or Marnix Foods. Which one?",
     "options": ["Zorbex Corp", "Quilla Labs", "Marnix Foods"], "label": "Zorbex Corp",
     "attitudes": ["positive", "negative", "neutral"]},
    {"prompt_A": "Tips: Pell Energy lost its biggest customer. Dravo Systems won a contract. Kest Labs held a meeting.",
     "prompt_B": "Invest in exactly one of Pell Energy, Dravo Systems or Kest Labs. Which one?",
     "options": ["Pell Energy", "Dravo Systems", "Kest Labs"], "label": "Dravo Systems",
     "attitudes": ["negative", "positive", "neutral"]},
]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_kvcomm_countries_loads_unchanged_and_scores_f1_and_contained(tmp_path):
    path = _jsonl(tmp_path / "countries.jsonl", KVCOMM_COUNTRIES)
    prompts = get_task("countries").prompts(GameConfig(source=str(path), n=2, seed=0))
    assert prompts.source["layout"] == "kvcomm-countries" and prompts.source["file"] == str(path)
    i = prompts.a.index("Uma is at the Statue of Liberty.")
    assert prompts.b[i] == "Which country is Uma located in?" and prompts.golds[i] == ["Uma is located in the United States."]
    short = prompts.score(i, "the United States")  # KVComm scores F1 against the sentence y
    assert short["em"] == 0.0 and short["f1"] == 0.5 and short["contains"] == 1.0
    assert prompts.score(i, "Uma is located in the United States.")["em"] == 1.0
    assert prompts.score(i, "France") == {"em": 0.0, "f1": 0.0, "contains": 0.0}
    assert "option" not in prompts.columns  # no options in this layout


@pytest.mark.parametrize("label", ["text", "index"])
def test_kvcomm_tipsheets_loads_unchanged_with_options(tmp_path, label):
    rows = [dict(r, label=r["label"] if label == "text" else r["options"].index(r["label"])) for r in KVCOMM_TIPSHEETS]
    path = _jsonl(tmp_path / "tipsheets.jsonl", rows)
    prompts = get_task("tipsheets").prompts(GameConfig(source=str(path), n=2))
    assert prompts.source["layout"] == "kvcomm-tipsheets" and prompts.primary == "option"
    i = prompts.a.index(KVCOMM_TIPSHEETS[1]["prompt_A"])
    assert prompts.score(i, "Dravo Systems")["option"] == 1.0 and prompts.score(i, "Kest Labs")["option"] == 0.0


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "csv"])
def test_every_format_datasets_reads(tmp_path, fmt):
    rows = [{"prompt_a": f"P{i} is at the Louvre.", "prompt_b": f"Which country is P{i} in?", "answer": "France"}
            for i in range(3)]
    path = tmp_path / f"g.{fmt}"
    if fmt == "jsonl":
        _jsonl(path, rows)
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    else:
        import datasets

        ds = datasets.Dataset.from_list(rows)
        ds.to_parquet(str(path)) if fmt == "parquet" else ds.to_csv(str(path), index=False)
    prompts = get_task("countries").prompts(GameConfig(source=str(path), n=3))
    assert sorted(prompts.a) == sorted(r["prompt_a"] for r in rows) and prompts.source["layout"] == "xmodel"


def test_squad_and_gsm8k_style_rows(tmp_path):
    squad = _jsonl(tmp_path / "squad.jsonl", [
        {"id": "q1", "title": "T", "context": "Ann was born in Paris in 1901.", "question": "Where was Ann born?",
         "answers": {"text": ["Paris", "Paris"], "answer_start": [16, 16]}},
        {"id": "q2", "title": "T", "context": "Bo lives in Rome.", "question": "Where does Bo live?", "answers": ["Rome"]}])
    prompts = get_task("squad").prompts(SquadConfig(source=str(squad), n=2))
    assert sorted(prompts.ids) == ["q1", "q2"] and prompts.source["layout"] == "squad"
    assert "contains" in prompts.columns
    import datasets

    gsm = tmp_path / "gsm.parquet"
    datasets.Dataset.from_list([{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}]).to_parquet(str(gsm))
    prompts = get_task("gsm8k").prompts(Gsm8kConfig(source=str(gsm), n=1))
    assert prompts.golds == ["5"] and prompts.source["layout"] == "gsm8k"


def test_field_map_and_a_file_of_no_layout(tmp_path):
    path = _jsonl(tmp_path / "mine.jsonl", [{"secret": "Ann is at the Louvre.", "ask": "Which country is Ann in?",
                                             "gold": "France", "notes": "x"}])
    with pytest.raises(UserError) as e:
        get_task("countries").prompts(GameConfig(source=str(path), n=1))
    msg = str(e.value)
    assert msg.startswith(f"{path}:1: fields ask, gold, notes, secret match no countries layout") and "\n" not in msg
    assert "missing prompt_a, prompt_b, answer" in msg and "evaluate.countries.fields" in msg
    fields = {"prompt_a": "secret", "prompt_b": "ask", "answer": "gold"}
    with pytest.raises(UserError, match=r"mine.jsonl:1: unknown field 'notes'.*evaluate.countries.fields.ignore"):
        get_task("countries").prompts(GameConfig(source=str(path), n=1, fields=fields))
    prompts = get_task("countries").prompts(GameConfig(source=str(path), n=1, fields={**fields, "ignore": ["notes"]}))
    assert prompts.a == ["Ann is at the Louvre."] and prompts.source["layout"] == "fields"
    with pytest.raises(UserError, match="'answr' is none of countries's fields"):
        get_task("countries").prompts(GameConfig(source=str(path), n=1, fields={"answr": "gold"}))


@pytest.mark.parametrize("row, message", [
    ({"answr": "France"}, "g.jsonl:2: unknown field 'answr'"),  # a typo never silently drops a field
    ({"options": ["x", "x"], "answer": "x"}, "g.jsonl:2: option 'x' and 'x' are the same once normalized"),
    ({"options": ["Paris", "paris."], "answer": "Paris"}, "are the same once normalized"),
    ({"answer": "The"}, "g.jsonl:2: answer 'The' is empty once normalized"),
    ({"answer": "!!!"}, "g.jsonl:2: answer '!!!' is empty once normalized"),
    ({"answer": ["France", "france"]}, "are the same once normalized"),
    ({"options": ["the", "Paris"], "answer": "Paris"}, "option 'the' is empty once normalized"),
])
def test_game_rows_that_would_score_wrongly_are_refused(tmp_path, row, message):
    good = {"prompt_a": "Ann is at the Louvre.", "prompt_b": "Which country?", "answer": "France"}
    bad = {**good, **row}
    path = _jsonl(tmp_path / "g.jsonl", [good, bad])
    with pytest.raises(UserError, match=message) as e:
        get_task("countries").prompts(GameConfig(source=str(path), n=2))
    assert "\n" not in str(e.value)


def test_letter_options_never_score_an_empty_reply(tmp_path):
    row = {"prompt_a": "The answer is the first.", "prompt_b": "Pick A, B, C or D.", "answer": "A",
           "options": ["A", "B", "C", "D"]}
    path = _jsonl(tmp_path / "letters.jsonl", [row])
    prompts = get_task("tipsheets").prompts(GameConfig(source=str(path), n=1))
    for reply in ("", "...", "The", "a", "A dog", "B", "(C)"):
        assert prompts.score(0, reply)["option"] == 0.0 and prompts.score(0, reply)["contains"] == 0.0, reply
        assert prompts.score(0, reply)["em"] == (1.0 if reply == "a" else 0.0), reply
    for reply in ("A", "A.", "A) first", "(A)", "Answer: A", "The answer is A"):
        assert prompts.score(0, reply)["option"] == 1.0, reply
        assert prompts.score(0, reply)["em"] == (0.0 if reply == "A) first" else 1.0), reply


def test_squad_answers_that_say_nothing_are_refused(tmp_path):
    path = _jsonl(tmp_path / "s.jsonl", [{"context": "The cat sat.", "question": "Who sat?", "answers": ["The"]}])
    with pytest.raises(UserError, match=r"s.jsonl:1: answer 'The' is empty once normalized"):
        get_task("squad").prompts(SquadConfig(source=str(path), n=1))


def test_a_huge_line_is_refused_by_size_unread(tmp_path, monkeypatch):
    from pipeline.tasks import rows as rows_mod

    monkeypatch.setattr(rows_mod, "MAX_ROW_BYTES", 4096)
    big = {"prompt_a": "x" * 5000, "prompt_b": "q", "answer": "France"}
    path = _jsonl(tmp_path / "big.jsonl", [{"prompt_a": "p", "prompt_b": "q", "answer": "France"}, big])
    monkeypatch.setattr(json, "loads", _refuse_second_parse(json.loads))
    with pytest.raises(UserError, match=r"big.jsonl:2: a line over 4,096 bytes, the most a row may hold"):
        get_task("countries").prompts(GameConfig(source=str(path), n=2))


def _refuse_second_parse(loads):
    calls = []

    def guarded(text, *a, **k):
        calls.append(len(text))
        assert len(text) <= 4096, "the huge line was parsed"
        return loads(text, *a, **k)
    return guarded


def test_primary_score_is_a_choice_and_every_score_is_recorded(tmp_path):
    from pipeline.config_evaluate import config_from_dict

    cfg = config_from_dict({"countries": {"primary": "contains", "n": 3}, "tipsheets": {"primary": "f1"}})
    prompts = get_task("countries").prompts(cfg.countries)
    assert prompts.primary == "contains" and prompts.columns == ("contains", "em", "f1")
    assert set(prompts.score(0, "France")) == {"em", "f1", "contains"}  # every score, whichever is primary
    assert get_task("tipsheets").prompts(cfg.tipsheets).columns == ("f1", "option", "em", "contains")
    with pytest.raises(UserError, match="evaluate.countries.primary = 'bleu' is not one of em, f1, contains, option"):
        config_from_dict({"countries": {"primary": "bleu"}})
    with pytest.raises(UserError, match="evaluate.countries.primary = 'option', but these items are scored by em, f1"):
        get_task("countries").prompts(GameConfig(primary="option", n=2))  # generated Countries have no options


def test_a_file_opening_with_a_byte_order_mark_loads(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt_a": "Ann is at the Louvre.", "prompt_b": "Which country?",
                                                   "answer": "France"}).encode() + b"\r\n")
    assert get_task("countries").prompts(GameConfig(source=str(path), n=1)).a == ["Ann is at the Louvre."]
