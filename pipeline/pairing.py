"""Pairing the rows of two activation stores (models A and B over one corpus) by text.

Sequence rows (pooled, last) pair by `text_index`. Per-token rows pair by character position: two
tokenizers cut a text differently, but where a token of A and a token of B end at the same
character, both have read exactly the same prefix of the text. Tokens that cover no text
(char_end 0: BOS and other specials) are never paired; where several tokens of one model end at
the same character (pieces of one multi-byte character) the last one, which has read it whole,
stands for them.

Every function returns row index arrays (ascending in A's rows) usable with
`ActivationStore.numpy(kind, layer, rows)` or to index its dask arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import UserError


@dataclass(frozen=True)
class Pairs:
    rows_a: np.ndarray  # int64 rows of A's arrays of the paired kind
    rows_b: np.ndarray  # the matching rows of B's
    text: np.ndarray  # corpus row (text_index) of each pair: the key of the held-out split

    def __len__(self) -> int:
        return len(self.rows_a)

    def subset(self, mask: np.ndarray) -> Pairs:
        return Pairs(self.rows_a[mask], self.rows_b[mask], self.text[mask])


@dataclass(frozen=True)
class TokenIndex:
    """The CSR index of a store's per-token rows."""

    seq_start: np.ndarray  # (n_seq,) first token row of each sequence
    seq_len: np.ndarray  # (n_seq,) token rows kept per sequence
    char_end: np.ndarray  # (n_tok,) end character offset of each token row

    @classmethod
    def of(cls, store) -> TokenIndex:
        # through the store's reader: a checksum mismatch is one line naming the array and the fix
        return cls(store.read("seq_start").astype(np.int64), store.read("seq_len").astype(np.int64),
                   store.read("char_end"))

    def rows(self, seqs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(token rows of the given sequences, the position in `seqs` of each row's sequence)."""
        lens = self.seq_len[seqs]
        owner = np.repeat(np.arange(len(seqs)), lens)
        first = np.repeat(np.cumsum(lens) - lens, lens)
        return np.repeat(self.seq_start[seqs], lens) + np.arange(int(lens.sum())) - first, owner


def check_same_corpus(a, b) -> None:
    """Refuse two stores whose corpora differ (their rows would pair unrelated texts)."""
    fa, fb = (s.identity.get("corpus_fingerprint") for s in (a, b))
    if fa is None or fa != fb:
        raise UserError(f"stores were extracted from different corpora; rerun extract ({a.path}: {fa}, {b.path}: {fb})")


def pair_sequences(text_a: np.ndarray, text_b: np.ndarray) -> Pairs:
    """Sequence rows of A and B holding the same corpus row."""
    text, rows_a, rows_b = np.intersect1d(text_a, text_b, assume_unique=True, return_indices=True)
    order = np.argsort(rows_a, kind="stable")
    return Pairs(rows_a[order].astype(np.int64), rows_b[order].astype(np.int64), text[order].astype(np.int64))


def pair_tokens(a: TokenIndex, b: TokenIndex, seqs: Pairs) -> Pairs:
    """Token rows of A and B in paired sequences whose end offsets coincide (see module doc)."""
    stride = int(max(a.char_end.max(initial=0), b.char_end.max(initial=0))) + 1
    keys_a, rows_a = _token_keys(a, seqs.rows_a, stride)
    keys_b, rows_b = _token_keys(b, seqs.rows_b, stride)
    _, ia, ib = np.intersect1d(keys_a, keys_b, assume_unique=True, return_indices=True)
    order = np.argsort(rows_a[ia], kind="stable")
    ia, ib = ia[order], ib[order]
    return Pairs(rows_a[ia], rows_b[ib], seqs.text[keys_a[ia] // stride])


def _token_keys(index: TokenIndex, seqs: np.ndarray, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Unique keys (pair number · stride + char_end) of the text-covering tokens, and their rows."""
    rows, owner = index.rows(seqs)
    ends = index.char_end[rows].astype(np.int64)
    keep = ends > 0
    rows, keys = rows[keep], owner[keep] * stride + ends[keep]
    # keys ascend within a sequence only loosely; keep the last row of each repeated key
    last = len(keys) - 1 - np.unique(keys[::-1], return_index=True)[1]
    return keys[last], rows[last]


def pair_rows(a, b, kind: str) -> Pairs:
    """Paired rows of stores a and b for an activation kind (pooled, last or tokens)."""
    check_same_corpus(a, b)
    seqs = pair_sequences(a.read("text_index"), b.read("text_index"))
    if kind in ("pooled", "last"):
        return seqs
    if kind != "tokens":
        raise UserError(f"unknown activation kind {kind!r}: use pooled, last or tokens")
    views = [s.identity.get("corpus_view") for s in (a, b)]
    if views[0] != views[1]:  # a task corpus (pipeline.task_corpus): A and B read different prompts
        raise UserError(f"per-token rows cannot pair across a task corpus's views (A read {views[0]}, B {views[1]}: "
                        "different texts): fit on fit.kind = last or pooled")
    ta, tb = TokenIndex.of(a), TokenIndex.of(b)
    if not len(ta.char_end) or not len(tb.char_end):
        raise UserError("a store holds no per-token rows (extract.tokens_per_seq = 0): fit on pooled or last")
    return pair_tokens(ta, tb, seqs)
