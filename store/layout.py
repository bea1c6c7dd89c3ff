"""Where every value lives in an activation store, computed from the sequence lengths alone.

One store = one model over one corpus. Rows of the sequence arrays follow corpus order. Work is cut
into units of `unit_size` sequences; unit u owns shard u of every sequence array and a run of whole
shards of every token array (its token rows start on a shard boundary, the tail of its last shard is
padding that no CSR offset points into). So a unit is written by one rank, shard by shard, and never
shares a shard with another unit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SCHEMA_VERSION = 2  # 2: fill values that no written value takes (FILL), named dimensions, value_dtype per array
SEQ_CHUNK = 64  # rows per inner chunk of sequence arrays (read granularity)
TOKEN_CHUNK = 256  # rows per inner chunk of token arrays
TOKEN_SHARD_CHUNKS = 8  # inner chunks per token shard
KINDS = ("pooled", "last", "tokens")


@dataclass(frozen=True)
class UnitSpan:
    unit: int
    seq: tuple[int, int]  # [start, stop) rows of sequence arrays
    tok: tuple[int, int]  # [start, stop) rows of token arrays, whole shards (padding included)


class StoreLayout:
    def __init__(self, token_counts: np.ndarray, unit_size: int, layers: list[int], width: int):
        self.unit_size = unit_size
        self.layers = list(layers)
        self.width = width
        self.seq_len = np.asarray(token_counts, dtype=np.int64)  # per-token rows kept per sequence
        self.n_seq = len(self.seq_len)
        self.n_units = -(-self.n_seq // unit_size)
        self.seq_chunk = SEQ_CHUNK if unit_size % SEQ_CHUNK == 0 else unit_size
        self.token_shard = TOKEN_CHUNK * TOKEN_SHARD_CHUNKS
        self.seq_start = np.zeros(self.n_seq, dtype=np.int64)
        self.units: list[UnitSpan] = []
        cursor = 0
        for u in range(self.n_units):
            lo, hi = u * unit_size, min((u + 1) * unit_size, self.n_seq)
            lens = self.seq_len[lo:hi]
            self.seq_start[lo:hi] = cursor + np.concatenate(([0], np.cumsum(lens)[:-1]))
            shards = -(-int(lens.sum()) // self.token_shard)
            self.units.append(UnitSpan(u, (lo, hi), (cursor, cursor + shards * self.token_shard)))
            cursor += shards * self.token_shard
        self.n_tok = cursor

    def array_specs(self, store_dtype: str) -> dict[str, tuple[tuple[int, ...], str, tuple[int, ...], tuple[int, ...]]]:
        """name -> (shape, zarr dtype, inner chunk, shard) for every array of the store."""
        d, n, t = self.width, self.n_seq, self.n_tok
        seq = (self.seq_chunk,), (self.unit_size,)
        tok = (TOKEN_CHUNK,), (self.token_shard,)
        specs = {
            "seq_start": ((n,), "int64", *seq),
            "seq_len": ((n,), "int64", *seq),
            "text_index": ((n,), "int64", *seq),
            "token_ids": ((t,), "int32", *tok),
            "char_end": ((t,), "int32", *tok),
        }
        raw = zarr_dtype(store_dtype)
        for layer in self.layers:
            # Pooled values are means computed in float32: kept in float32 so no precision is lost.
            specs[f"pooled/L{layer}"] = ((n, d), "float32", (self.seq_chunk, d), (self.unit_size, d))
            specs[f"last/L{layer}"] = ((n, d), raw, (self.seq_chunk, d), (self.unit_size, d))
            if self.n_tok:
                specs[f"tokens/L{layer}"] = ((t, d), raw, (TOKEN_CHUNK, d), (self.token_shard, d))
        return specs


# Fill values no written value can take: zarr writes no file for a shard that holds only the fill
# value (write_empty_chunks or not), so with a fill of 0 an all-zero shard (seq_len when
# tokens_per_seq = 0) would look deleted; and a chunk that is somehow read unwritten shows as NaN
# (refused as non-finite, never stored) or -1 (no index or id is negative), not as plausible zeros.
FILL = {"int64": -1, "int32": -1, "float32": float("nan"), "float16": float("nan"), "uint16": 0x7FC0}  # bf16 NaN bits


def zarr_dtype(store_dtype: str) -> str:
    # Zarr v3 has no bfloat16: its bits are kept losslessly as uint16 and widened on read.
    return {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}[store_dtype]


def widen(raw: np.ndarray, store_dtype: str) -> np.ndarray:
    """Stored values as float32 (bfloat16 is kept as its raw uint16 bits on disk)."""
    if store_dtype == "bfloat16" and raw.dtype == np.uint16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def widen_tensor(raw, out=None):
    """Stored values (a torch tensor: float16 or float32, or uint16 holding bfloat16 bits, as
    `store.reader.stored_values` reads them) as float32 where they are, into `out` when given: on a
    GPU the widening is free, where on the host it costs as much as decoding the store."""
    import torch

    src = raw.view(torch.bfloat16) if raw.dtype == torch.uint16 else raw
    if out is None:
        return src.float()
    return out.copy_(src)
