"""Tasks and scoring: the SQuAD generator and loaders, GSM8K loaders, EM/F1 and final numbers."""

from __future__ import annotations

import json
from fractions import Fraction

import pytest

from pipeline.errors import UserError
from pipeline.tasks.gsm8k import gold_number, load_gsm8k, read_jsonl
from pipeline.tasks.scoring import (clean_prediction, exact_match, extract_number, f1, gsm8k_correct,
                                    normalize_answer, squad_scores)
from pipeline.tasks.squad import generate_items, load_squad, read_squad_json, write_squad_json


# --- SQuAD generator and loaders -------------------------------------------------------------------

def test_generator_is_deterministic_by_seed_and_answers_are_spans():
    a, b, c = generate_items(60, seed=7), generate_items(60, seed=7), generate_items(60, seed=8)
    assert a == b and a != c
    assert len({it.id for it in a}) == 60 and len({it.context for it in a}) == 60
    kinds = {it.title.split(":")[0] for it in a}
    assert kinds == {"biography", "country"}
    questions = set()
    for it in a:
        (answer,), (start,) = it.answers, it.answer_starts
        assert it.context[start:start + len(answer)] == answer  # a span, at its recorded offset
        assert answer and answer == answer.strip()
        questions.add(it.question.split()[0])
    assert len(questions) >= 4  # several kinds of questions, not one template
    assert load_squad("generate", 5, seed=7) == a[:5]


def test_squad_json_round_trip_and_sampling(tmp_path):
    items = generate_items(30, seed=1)
    path = write_squad_json(items, tmp_path / "dev.json")
    assert read_squad_json(path) == sorted(items, key=lambda it: [x.title for x in items].index(it.title))
    picked = load_squad(str(path), 10, seed=3)
    assert len(picked) == 10 and picked == load_squad(str(path), 10, seed=3)
    assert {it.id for it in picked} <= {it.id for it in items}


def test_squad_v2_impossible_questions_are_skipped(tmp_path):
    data = {"data": [{"title": "t", "paragraphs": [{"context": "Paris is in France.", "qas": [
        {"id": "1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "2", "question": "Where is Rome?", "answers": [], "is_impossible": True}]}]}]}
    (tmp_path / "v2.json").write_text(json.dumps(data))
    assert [it.id for it in read_squad_json(tmp_path / "v2.json")] == ["1"]


@pytest.mark.parametrize("source", ["nope.json", "file.txt"])
def test_bad_squad_source_is_one_clear_error(tmp_path, source):
    with pytest.raises(UserError, match="SQuAD source"):
        load_squad(str(tmp_path / source), 3)


def test_malformed_squad_json_is_one_clear_error(tmp_path):
    (tmp_path / "bad.json").write_text('{"data": [{"paragraphs": [{"qas": [{"id": "1"}]}]}]}')
    with pytest.raises(UserError, match="not a readable SQuAD"):
        read_squad_json(tmp_path / "bad.json")


# --- GSM8K ----------------------------------------------------------------------------------------

def test_reasoning_gym_items_are_seeded_and_clean():
    a, b = load_gsm8k("reasoning-gym", 5, seed=2), load_gsm8k("reasoning-gym", 5, seed=2)
    assert a == b and a != load_gsm8k("reasoning-gym", 5, seed=3)
    for it in a:
        assert "final answer" not in it.question.lower()
        assert it.question.endswith("?") or it.question.endswith(".")
        assert gold_number(it.answer) == it.answer


def test_gsm8k_jsonl_loader(tmp_path):
    rows = [{"question": "Q1?", "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 1,250"},
            {"question": "Q2?", "answer": "-3"}, {"question": "Q3?", "answer": 7}]
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = read_jsonl(path)
    assert [it.answer for it in items] == ["1250", "-3", "7"]
    assert len(load_gsm8k(str(path), 2, seed=0)) == 2
    path.write_text('{"question": "Q?", "answer": "no number here"}\n')
    with pytest.raises(UserError, match=r"test.jsonl:1"):
        read_jsonl(path)


# --- SQuAD scoring --------------------------------------------------------------------------------

@pytest.mark.parametrize("raw,norm", [
    ("The Cat!", "cat"), ("  a  big   DOG. ", "big dog"), ("an apple, the pear", "apple pear"),
    ("Théâtre", "théâtre"), ("U.S.A.", "usa"), ("", ""), ("the", ""), ("another", "another"),
])
def test_official_normalization(raw, norm):
    assert normalize_answer(raw) == norm


def test_exact_match_and_f1_values():
    assert exact_match("The Eiffel Tower.", "eiffel tower") == 1.0
    assert exact_match("Eiffel", "Eiffel Tower") == 0.0
    assert f1("the big cat", "a big dog") == pytest.approx(0.5)
    assert f1("big big cat", "big cat cat") == pytest.approx(2 / 3)  # bag of tokens: min counts
    assert f1("", "Paris") == 0.0 and f1("Paris", "") == 0.0
    assert f1("in 1843 in Brandvik", "1843") == pytest.approx(0.4)  # precision 1/4, recall 1


@pytest.mark.parametrize("text,clean", [
    ("Answer: Paris\nBecause it is.", "Paris"), ("\n\n  law  \n", "law"), ("The answer is: 84 million", "84 million"),
    ("answer - blue", "blue"), ("", ""), ("\x00��", "\x00��"), ("Answering machines", "Answering machines"),
])
def test_clean_prediction(text, clean):
    assert clean_prediction(text) == clean


def test_squad_scores_take_the_best_gold_and_survive_garbage():
    assert squad_scores("Answer: the Velmar bridge\nmore text", ["Velmar Bridge", "bridge"]) == (1.0, 1.0)
    em, f = squad_scores("Velmar", ["Velmar Bridge", "a bridge"])
    assert em == 0.0 and f == pytest.approx(2 / 3)
    assert squad_scores("", ["x"]) == (0.0, 0.0)
    assert squad_scores("\ufffd\ufffd <|im_end|>", ["x"]) == (0.0, 0.0)
    with pytest.raises(ValueError):
        squad_scores("x", [])


# --- GSM8K answer extraction -----------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [
    ("She pays 5 * 3 = 15 dollars.\n#### 15", 15),
    ("#### 1,234", 1234),
    ("So the total is $18.", 18),
    ("The answer is: $1,000.50", Fraction("1000.50")),
    ("Answer: -7", -7),
    ("\\boxed{42} and then 43", 42),
    ("Answer: 12\n\nNext question: 5 + 5 = 10", 12),
    ("**Final Answer:** 0.5 liters", Fraction(1, 2)),
    ("3 apples and 4 pears make 7.", 7),
    ("it is 1,2,3", 3),
    ("x = 10-4 = 6", 6),
    ("I cannot solve this.", None),
    ("", None),
    ("\ufffd\ufffd<|endoftext|>", None),
    ("Answer: (unknown), but maybe 5", 5),
    ("Answer: 10 - 4 = 6 liters", 6),
    ("#### 3 + 4 = 7", 7),
    ("\\boxed{16630}", 16630),
])
def test_extract_number(text, value):
    got = extract_number(text)
    assert got == (None if value is None else Fraction(value))


def test_gsm8k_correct():
    assert gsm8k_correct("... so 2.50 in total. Answer: 2.50", "2.5") == 1.0
    assert gsm8k_correct("Answer: 1,250", "1250") == 1.0
    assert gsm8k_correct("Answer: 1250.0", "1250") == 1.0
    assert gsm8k_correct("Answer: 125", "1250") == 0.0
    assert gsm8k_correct("no idea", "3") == 0.0
    assert gsm8k_correct("The answer is 18 and then I kept talking about 20 things", "18") == 1.0
    assert gold_number("blah #### -3") == "-3" and gold_number("2.50") == "2.5"
    with pytest.raises(ValueError):
        gsm8k_correct("5", "five")


def test_squad_json_without_answerable_questions(tmp_path):
    (tmp_path / "empty.json").write_text('{"data": [{"paragraphs": [{"context": "x", "qas": []}]}]}')
    with pytest.raises(UserError, match="no answerable question"):
        read_squad_json(tmp_path / "empty.json")
