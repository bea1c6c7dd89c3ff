"""Reading an activation store: numpy slices, dask arrays on shard boundaries, torch batches.

Every reader widens stored values to float32 (bfloat16 bits included), so callers never see the
storage dtype. Opening refuses a store that was not finalized (unless allow_incomplete is set) or
that fails the cheap check of `store.check.scan` (a unit marker or a shard file missing). Reads go
through a file store that raises on a missing chunk file, where zarr would return the fill value:
a deleted shard can never read as zeros. A chunk failing its checksum is one line too.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from store.check import arrays, is_store, read_attrs, scan, shard_rows
from store.errors import UserError
from store.layout import widen

if TYPE_CHECKING:
    import torch


def extract_command(path: Path, attrs: dict[str, Any], force: bool) -> str:
    """The extraction that writes this store: plain, it finishes the units not written; with
    --force (what DVC's extract stage runs) it also reads every shard and rewrites the damaged units,
    or rebuilds a store damaged beyond its units."""
    return f"xmodel extract --model {attrs.get('role') or 'ROLE'} --out {path}" + (" --force" if force else "")


def repair_hint(path: Path, attrs: dict[str, Any]) -> str:
    return f"rerun `{extract_command(path, attrs, force=True)}` (or `dvc repro`) to rewrite the damaged units"


@lru_cache(maxsize=1)
def _strict_store_class():
    from zarr.storage import LocalStore

    class StrictLocalStore(LocalStore):
        """A LocalStore for which a missing chunk file is an error, not the array's fill value."""

        async def get(self, key, prototype=None, byte_range=None):
            buf = await super().get(key, prototype, byte_range)
            if buf is None and "c" in key.split("/")[:-1]:
                raise UserError(f"{Path(self.root) / key}: chunk file missing, the store is damaged; "
                                f"{repair_hint(Path(self.root), read_attrs(Path(self.root)) or {})}")
            return buf

    return StrictLocalStore


def open_strict(path: Path, mode: str = "r", use_consolidated: bool | None = None):
    """The store's zarr group, read through a file store that raises on a missing chunk file."""
    import zarr

    return zarr.open_group(store=_strict_store_class()(str(path), read_only=mode == "r"), mode=mode,
                           use_consolidated=use_consolidated)


class ActivationStore:
    def __init__(self, path: Path | str, allow_incomplete: bool = False):
        self.path = Path(path)
        attrs = read_attrs(self.path)
        if attrs is None or not is_store(self.path):
            raise UserError(f"{self.path} is not an activation store: run `xmodel extract` first or fix the path")
        if not attrs.get("complete") and not allow_incomplete:
            raise UserError(f"store incomplete: {self.path} is still being written or was interrupted; rerun "
                            f"`{extract_command(self.path, attrs, force=False)}` to finish it")
        self.attrs: dict[str, Any] = attrs
        self._identity = _folder_identity(self.path)
        # the consolidated metadata when there is some (a `complete` set by hand has none)
        self.root = open_strict(self.path, use_consolidated=None if attrs.get("complete") else False)
        if not allow_incomplete:
            problems = scan(self.path, self.root, attrs, deep=False)
            if problems:
                more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
                raise UserError(f"{self.path} is damaged: {problems[0].text}{more}; {repair_hint(self.path, attrs)}")

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

    def arrays(self) -> dict[str, Any]:
        return arrays(self.root)

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
        name = self._name(kind, layer)
        return widen(self.read(name, rows), self.store_dtype)

    def read(self, name: str, rows: slice | np.ndarray = slice(None)) -> np.ndarray:
        """Raw stored rows of array `name`; a chunk that fails its checksum (or a truncated shard)
        is one line naming the array and the fix, never a traceback from the codec."""
        arr = self.array(name)
        try:
            block = arr.oindex[rows] if isinstance(rows, np.ndarray) else arr[rows]
        except UserError:
            self._check_not_replaced()
            raise
        except (ValueError, OSError) as e:
            self._check_not_replaced()
            raise UserError(f"{self.path / name}: unreadable ({e.__class__.__name__}: {str(e)[:80]}), the store is "
                            f"damaged; {repair_hint(self.path, self.attrs)}") from None
        self._check_not_replaced()  # rows of two stores must never mix, even where every read succeeds
        return block

    def _check_not_replaced(self) -> None:
        if _folder_identity(self.path) != self._identity:
            raise UserError(f"{self.path} was replaced while this run was reading it (by `xmodel extract --force` or "
                            "another program): nothing read from it is used; rerun once the new store is complete")

    def dask(self, kind: str, layer: int):
        """A lazy float32 dask array chunked on shard boundaries (one task per shard)."""
        import dask.array as da

        name = self._name(kind, layer)
        arr = self.array(name)
        return da.from_array(_Widened(self, name, arr), chunks=(shard_rows(arr), arr.shape[1]), asarray=False,
                             name=f"xmodel-{self.path.resolve()}-{name}", meta=np.empty((0, 0), np.float32))

    def seq_tokens(self, layer: int, seq: int) -> np.ndarray:
        """Per-token states (seq_len[seq], d) of one sequence."""
        start, n = int(self.read("seq_start", slice(seq, seq + 1))[0]), int(self.read("seq_len", slice(seq, seq + 1))[0])
        return self.numpy("tokens", layer, slice(start, start + n))

    def token_rows(self) -> np.ndarray:
        """Row of every stored token in the token arrays (padding rows excluded), in sequence order."""
        start, n = self.read("seq_start"), self.read("seq_len")
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


def _folder_identity(path: Path) -> tuple[int, int] | None:
    # a store replaced by another (a rename into place, or deleted and copied) is another folder
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


class _Widened:
    """Array-like rows of one stored array, widened to float32, for dask.array.from_array."""

    def __init__(self, store: ActivationStore, name: str, arr):
        self.store, self.name = store, name
        self.shape, self.ndim, self.dtype = tuple(arr.shape), arr.ndim, np.dtype(np.float32)

    def __getitem__(self, key):
        rows = key[0] if isinstance(key, tuple) else key
        block = widen(self.store.read(self.name, rows), self.store.store_dtype)
        return block[(slice(None), *key[1:])] if isinstance(key, tuple) and len(key) > 1 else block
