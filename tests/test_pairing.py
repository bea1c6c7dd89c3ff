"""Pairing rows of two stores by text: sequences by text_index, tokens by coinciding end offsets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.config import load_params
from pipeline.errors import UserError
from pipeline.pairing import Pairs, TokenIndex, pair_rows, pair_sequences, pair_tokens
from tests.helpers import write_params


def tiny_stores(base: Path, models: dict[str, Path], name: str = "stores", **sections) -> Path:
    """params.yaml of a tiny A/B store pair under base/name, extracting the stores once: a later
    call with the same params finds them complete (only the tiny model is loaded again)."""
    from stages.extract import run as run_extract

    root = base / name
    root.mkdir(exist_ok=True)
    sections.setdefault("corpus", {"n": 96})
    path = write_params(root, {"a": models["llama"], "b": models["qwen"]}, **sections)
    params = load_params(path)
    for role in ("a", "b"):
        run_extract(params, role, quiet=True)
    return path


def open_pair(params_path: Path):
    from pipeline.fitting import read_stores

    return read_stores(load_params(params_path).paths.layout.stores)


def test_sequences_pair_by_text_index_whatever_the_order():
    pairs = pair_sequences(np.array([10, 11, 12, 14]), np.array([13, 12, 10, 11]))
    assert pairs.rows_a.tolist() == [0, 1, 2]
    assert pairs.rows_b.tolist() == [2, 3, 1]
    assert pairs.text.tolist() == [10, 11, 12]


def test_tokens_pair_by_coinciding_char_end_hand_checked():
    # text 10 "The cat sat."  A: <bos> The| cat| sat|.   B: The| c|at| sat.
    # text 11 "Voilà ici"     A: <bos> Voil|à(2 byte tokens, same end)| ici   B: Voi|là| ici  (ends 3, 5, 9)
    # A stores its sequences at rows 0 and 8 (rows 5..7 are shard padding, filled with decoys)
    a = TokenIndex(seq_start=np.array([0, 8]), seq_len=np.array([5, 5]),
                   char_end=np.array([0, 3, 7, 11, 12, 3, 5, 9, 0, 4, 5, 5, 9], dtype=np.int32))
    b = TokenIndex(seq_start=np.array([0, 4]), seq_len=np.array([4, 3]),
                   char_end=np.array([3, 5, 7, 12, 3, 5, 9], dtype=np.int32))
    pairs = pair_tokens(a, b, Pairs(np.array([0, 1]), np.array([0, 1]), np.array([10, 11])))
    # The↔The (3), cat↔at (7), .↔sat. (12); à (last of its two pieces, row 11)↔là (5), ici↔ici (9).
    # No partner: A's BOS (end 0), "sat" (11) and "Voil" (4), B's "c" (5) and "Voi" (3); B's "c" of
    # text 10 must not pair with A's "à" of text 11, which ends at the same offset.
    assert pairs.rows_a.tolist() == [1, 2, 4, 11, 12]
    assert pairs.rows_b.tolist() == [0, 2, 3, 5, 6]
    assert pairs.text.tolist() == [10, 10, 10, 11, 11]
    assert np.array_equal(a.char_end[pairs.rows_a], b.char_end[pairs.rows_b])


def test_token_pairs_of_real_tokenizers_match_an_independent_computation(tmp_path_factory, tiny_models):
    from transformers import AutoTokenizer

    from pipeline.data import load_corpus

    path = tiny_stores(tmp_path_factory.getbasetemp(), tiny_models)
    params = load_params(path)
    a, b = open_pair(path)
    seqs = pair_rows(a, b, "last")
    assert seqs.rows_a.tolist() == seqs.rows_b.tolist() == list(range(a.n_seq))
    pairs = pair_rows(a, b, "tokens")
    got = set(zip(pairs.rows_a.tolist(), pairs.rows_b.tolist()))

    k, max_len = params.extract.tokens_per_seq, params.extract.max_tokens
    starts = {"a": a.root["seq_start"][:], "b": b.root["seq_start"][:]}
    toks = {"a": AutoTokenizer.from_pretrained(tiny_models["llama"]), "b": AutoTokenizer.from_pretrained(tiny_models["qwen"])}
    expected = set()
    for i, text in enumerate(load_corpus(params.corpus).texts):
        last_row = {}  # per model: end offset -> row of the last kept token ending there
        for role, tok in toks.items():
            ends = tok(text, truncation=True, max_length=max_len, return_offsets_mapping=True)["offset_mapping"]
            last_row[role] = {end: starts[role][i] + j for j, (_, end) in enumerate(ends[:k]) if end > 0}
        expected |= {(last_row["a"][e], last_row["b"][e]) for e in last_row["a"].keys() & last_row["b"].keys()}
    assert got == expected and len(got) > a.n_seq  # several paired tokens per text
    assert np.array_equal(a.root["char_end"][:][pairs.rows_a], b.root["char_end"][:][pairs.rows_b])


def test_stores_of_different_corpora_are_refused(tmp_path_factory, tiny_models):
    base = tmp_path_factory.getbasetemp()
    a, _ = open_pair(tiny_stores(base, tiny_models))
    _, b = open_pair(tiny_stores(base, tiny_models, name="other-corpus", corpus={"n": 96, "seed": 1}))
    with pytest.raises(UserError, match="^stores were extracted from different corpora; rerun extract"):
        pair_rows(a, b, "last")
