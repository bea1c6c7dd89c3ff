"""Reading an activation store: numpy slices, dask arrays on shard boundaries, torch batches.

Every reader widens stored values to float32 (bfloat16 bits included), so callers never see the
storage dtype. A store that was not finalized is refused unless allow_incomplete is set.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from pipeline.errors import UserError
from store.writer import read_attrs

if TYPE_CHECKING:
    import torch


def widen(raw: np.ndarray, store_dtype: str) -> np.ndarray:
    if store_dtype == "bfloat16" and raw.dtype == np.uint16:
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


class ActivationStore:
    def __init__(self, path: Path | str, allow_incomplete: bool = False):
        import zarr

        self.path = Path(path)
        attrs = read_attrs(self.path)
        if attrs is None:
            raise UserError(f"{self.path} is not an activation store: run `xmodel extract` first or fix the path")
        if not attrs.get("complete") and not allow_incomplete:
            raise UserError(f"store incomplete: {self.path} is still being written or was interrupted; rerun `xmodel extract` to finish it")
        self.attrs: dict[str, Any] = attrs
        self.root = zarr.open_group(str(self.path), mode="r", use_consolidated=bool(attrs.get("complete")))

    # -- description -------------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return list(self.attrs["layers"])

    @property
    def width(self) -> int:
        return int(self.attrs["width"])

    @property
    def n_seq(self) -> int:
        return int(self.attrs["n_seq"])

    @property
    def identity(self) -> dict[str, Any]:
        return dict(self.attrs["identity"])

    @property
    def store_dtype(self) -> str:
        return self.attrs["store_dtype"]

    def array(self, name: str):
        if name not in self.root:
            raise UserError(f"{self.path} has no array {name!r}: stored layers are {self.layers}")
        return self.root[name]

    def _name(self, kind: str, layer: int) -> str:
        if kind not in ("pooled", "last", "tokens"):
            raise UserError(f"unknown activation kind {kind!r}: use pooled, last or tokens")
        if layer not in self.layers:
            raise UserError(f"layer {layer} is not in store {self.path}: stored layers are {self.layers}")
        return f"{kind}/L{layer}"

    # -- readers -------------------------------------------------------------------------------
    def numpy(self, kind: str, layer: int, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """float32 rows of pooled/last (sequence rows) or tokens (token rows)."""
        arr = self.array(self._name(kind, layer))
        raw = arr.oindex[rows] if isinstance(rows, np.ndarray) else arr[rows]
        return widen(raw, self.store_dtype)

    def dask(self, kind: str, layer: int):
        """A lazy float32 dask array chunked on shard boundaries (one task per shard)."""
        import dask.array as da

        arr = self.array(self._name(kind, layer))
        shard_rows = arr.shards[0] if arr.shards else arr.chunks[0]
        lazy = da.from_zarr(arr, chunks=(shard_rows, arr.shape[1]))
        dtype = self.store_dtype
        return lazy.map_blocks(widen, dtype, dtype=np.float32)

    def seq_tokens(self, layer: int, seq: int) -> np.ndarray:
        """Per-token states (seq_len[seq], d) of one sequence."""
        start, n = int(self.root["seq_start"][seq]), int(self.root["seq_len"][seq])
        return self.numpy("tokens", layer, slice(start, start + n))

    def token_rows(self) -> np.ndarray:
        """Row of every stored token in the token arrays (padding rows excluded), in sequence order."""
        start, n = self.root["seq_start"][:], self.root["seq_len"][:]
        return np.concatenate([s + np.arange(k) for s, k in zip(start, n)]) if len(n) else np.zeros(0, np.int64)

    def torch_batches(self, kind: str, layer: int, batch_size: int, rows: np.ndarray | None = None,
                      device: str = "cpu") -> Iterator["torch.Tensor"]:
        """float32 tensors of batch_size rows (in the given row order), read shard-wise."""
        import torch

        rows = np.arange(self.array(self._name(kind, layer)).shape[0]) if rows is None else np.asarray(rows)
        for lo in range(0, len(rows), batch_size):
            part = rows[lo:lo + batch_size]
            order = np.argsort(part, kind="stable")  # sorted reads touch each shard once
            block = np.empty((len(part), self.width), dtype=np.float32)
            block[order] = self.numpy(kind, layer, part[order])
            yield torch.from_numpy(block).to(device)
