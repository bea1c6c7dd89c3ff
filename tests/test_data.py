"""Corpora: pydoc prose, local .txt/.jsonl, seeded sampling, clear errors."""

from __future__ import annotations

import json

import pytest

from pipeline.config import CorpusConfig
from pipeline.data import load_corpus, pydoc_sentences
from pipeline.errors import UserError


def test_pydoc_prose_is_sentences_not_code():
    sentences = pydoc_sentences()
    assert len(sentences) > 2000
    assert not any(s.startswith((" ", "\t", "***", "===")) for s in sentences)


def test_sampling_is_deterministic_by_seed_and_keeps_corpus_order():
    a = load_corpus(CorpusConfig(n=50, seed=3))
    b = load_corpus(CorpusConfig(n=50, seed=3))
    c = load_corpus(CorpusConfig(n=50, seed=4))
    assert a == b and a.fingerprint == b.fingerprint
    assert a.index != c.index and a.fingerprint != c.fingerprint
    assert a.index == sorted(a.index) and all(40 <= len(t) <= 300 for t in a.texts)


def test_jsonl_and_txt_sources(tmp_path):
    rows = [f"Sentence number {i} is long enough to pass the filter." for i in range(10)]
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("\n".join(json.dumps({"body": r}) for r in rows) + "\n")
    txt = tmp_path / "c.txt"
    txt.write_text("\n\n".join(rows))
    from_jsonl = load_corpus(CorpusConfig(source=str(jsonl), n=4, text_field="body"))
    from_txt = load_corpus(CorpusConfig(source=str(txt), n=4))
    assert from_jsonl.texts == from_txt.texts and from_jsonl.index == from_txt.index
    assert len(from_txt.texts) == 4 and set(from_txt.texts) <= set(rows)


@pytest.mark.parametrize("content, name, expected", [
    ('{"text": "fine sentence that is long enough to keep"}\nnot json\n', "bad.jsonl", "bad.jsonl:2"),
    ('{"other": "x"}\n', "field.jsonl", "'text' field"),
    ("whatever", "corpus.csv", "expected 'pydoc', 'c4', or a .txt/.jsonl"),
    ('{"text": "fine sentence that is long enough to keep"}\n{"text": 12345678901234567890123456789012345678901}\n',
     "number.jsonl", "number.jsonl:2: field 'text' is a number"),
    ('{"text": ["a list of words is not a text", "at all"]}\n', "list.jsonl", "field 'text' is a list"),
    ('{"text": null}\n', "null.jsonl", "field 'text' is null"),
    ('[1, 2]\n', "array.jsonl", "not a JSON object"),
])
def test_bad_corpus_files(tmp_path, content, name, expected):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(UserError, match=None) as e:
        load_corpus(CorpusConfig(source=str(path)))
    assert expected in str(e.value) and "\n" not in str(e.value)


def test_missing_corpus_file(tmp_path):
    with pytest.raises(UserError) as e:
        load_corpus(CorpusConfig(source=str(tmp_path / "nope.txt")))
    assert "nope.txt" in str(e.value)
