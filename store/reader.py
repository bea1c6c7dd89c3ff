"""Reading an activation store: numpy slices, dask arrays on shard boundaries, torch batches.

Every reader widens stored values to float32 (bfloat16 bits included), so callers never see the
storage dtype (except inside `stored_values`, for a caller that widens elsewhere). Opening refuses a store that was not finalized (unless allow_incomplete is set) or
that fails the cheap check of `store.check.scan` (a unit marker or a shard file missing). Reads go
through a file store that raises on a missing chunk file, where zarr would return the fill value:
a deleted shard can never read as zeros. A chunk failing its checksum is one line too.

Rows of the arrays our writer lays out (sharded, each inner chunk raw little-endian bytes plus a
crc32c) are read straight from the shard files by `_ShardReader`, every chunk's checksum verified:
zarr's own read path costs ~2.5x the CPU and runs its codecs on zarr's one event-loop thread under
the GIL, which capped streamed training at ~0.7 GB/s of rows on a 16-core host (issue 21, item 6).
Any other array is read through zarr.
"""

from __future__ import annotations

import contextvars
import json
import os
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np

from store.check import arrays, is_store, read_attrs, scan, shard_file, shard_rows
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
                raise _missing_chunk(Path(self.root), key)
            return buf

    return StrictLocalStore


def _missing_chunk(root: Path, key: str) -> UserError:
    return UserError(f"{root / key}: chunk file missing, the store is damaged; {repair_hint(root, read_attrs(root) or {})}")


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
        self._shard_readers: dict[str, _ShardReader | None] = {}
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
        if name not in self._shard_readers:
            self._shard_readers[name] = _ShardReader.of(self.path, name, arr)
        direct = self._shard_readers[name]
        try:
            if direct is not None:
                block = direct.read(rows)
            else:
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
        block = self.store.read(self.name, rows)
        if not _STORED.get():
            block = widen(block, self.store.store_dtype)
        return block[(slice(None), *key[1:])] if isinstance(key, tuple) and len(key) > 1 else block


_STORED = contextvars.ContextVar("xmodel_stored_values", default=False)


@contextmanager
def stored_values():
    """Inside, the store's dask arrays computed on this thread (dask's scheduler="sync"; other
    schedulers run elsewhere and widen) give the stored values instead of float32: float16 as is,
    bfloat16 as its uint16 bits (`store.layout.widen_tensor` widens either). Streamed training
    widens on the GPU: the host then copies, caches and uploads half the bytes."""
    token = _STORED.set(True)
    try:
        yield
    finally:
        _STORED.reset(token)


_SHARD_CODECS = [{"name": "bytes", "configuration": {"endian": "little"}}, {"name": "crc32c"}]
_EMPTY = 2**64 - 1  # a shard index entry (offset and size) for a chunk that was never written


class _ShardReader:
    """Rows of one sharded array read from its shard files: each needed chunk's bytes in one read per
    shard, its crc32c checked, copied into the result. Only for the layout our writer creates
    (rows sharded, every chunk spanning the full width, raw little-endian bytes + crc32c, index of
    (offset, size) uint64 pairs + crc32c at the shard's end: zarr v3's sharding_indexed spec)."""

    def __init__(self, root: Path, name: str, arr, chunk_rows: int, shard_rows: int):
        self.root, self.name, self.ndim = root, name, arr.ndim
        self.n, self.row_shape = int(arr.shape[0]), tuple(int(s) for s in arr.shape[1:])
        self.dtype, self.fill = np.dtype(arr.dtype), arr.fill_value
        self.chunk_rows, self.per_shard = chunk_rows, shard_rows // chunk_rows
        self.chunk_bytes = chunk_rows * int(np.prod(self.row_shape, dtype=np.int64)) * self.dtype.itemsize
        self.index_bytes = self.per_shard * 16 + 4

    @classmethod
    def of(cls, root: Path, name: str, arr) -> _ShardReader | None:
        meta = json.loads(json.dumps(arr.metadata.to_dict()))  # tuples as lists
        codecs, grid = meta.get("codecs"), meta.get("chunk_grid", {}).get("configuration", {})
        if not (isinstance(codecs, list) and len(codecs) == 1 and codecs[0].get("name") == "sharding_indexed"):
            return None
        conf = codecs[0].get("configuration", {})
        chunk, shard = conf.get("chunk_shape"), grid.get("chunk_shape")
        dtype = np.dtype(arr.dtype)
        if (conf.get("codecs") != _SHARD_CODECS or conf.get("index_codecs") != _SHARD_CODECS
                or conf.get("index_location") != "end" or meta.get("chunk_grid", {}).get("name") != "regular"
                or meta.get("chunk_key_encoding") != {"name": "default", "configuration": {"separator": "/"}}
                or dtype.kind not in "iuf" or (dtype.byteorder == ">" and dtype.itemsize > 1)
                or not chunk or not shard or list(chunk[1:]) != list(arr.shape[1:])
                or list(shard[1:]) != list(arr.shape[1:]) or shard[0] % chunk[0]):
            return None
        return cls(root, name, arr, int(chunk[0]), int(shard[0]))

    def read(self, rows: slice | np.ndarray) -> np.ndarray:
        """Rows as zarr reads them: `rows` a slice, or an integer or boolean array (oindex)."""
        if isinstance(rows, slice) and rows.step in (None, 1):
            start, stop, _ = rows.indices(self.n)
            stop = max(start, stop)
            out = np.empty((stop - start, *self.row_shape), self.dtype)
            if stop == start:
                return out
            first = start // self.chunk_rows
            for c, values in self._chunks(np.arange(first, -(-stop // self.chunk_rows))):
                lo, hi = max(start, c * self.chunk_rows), min(stop, (c + 1) * self.chunk_rows)
                out[lo - start:hi - start] = values[lo - c * self.chunk_rows:hi - c * self.chunk_rows]
            return out
        idx = np.arange(self.n)[rows] if isinstance(rows, slice) else np.asarray(rows)
        if idx.dtype == bool:
            if idx.shape != (self.n,):
                raise IndexError(f"boolean selection of {idx.shape} rows for an array of {self.n}")
            idx = np.flatnonzero(idx)
        idx = np.where(idx < 0, idx + self.n, idx).astype(np.int64, copy=False).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"row index out of range for an array of {self.n} rows")
        order = np.argsort(idx, kind="stable")
        ordered = idx[order]
        out = np.empty((len(idx), *self.row_shape), self.dtype)
        chunk_of = ordered // self.chunk_rows
        needed = np.unique(chunk_of)
        bounds = np.append(np.searchsorted(chunk_of, needed), len(ordered))  # each chunk's run of `ordered`
        for k, (c, values) in enumerate(self._chunks(needed)):
            out[order[bounds[k]:bounds[k + 1]]] = values[ordered[bounds[k]:bounds[k + 1]] - c * self.chunk_rows]
        return out

    def _chunks(self, chunks: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
        """(chunk, its rows) for each chunk (ascending), one file read per shard."""
        import google_crc32c  # zarr's own crc32c dependency

        for shard in np.unique(chunks // self.per_shard):
            mine = chunks[chunks // self.per_shard == shard]
            path = shard_file(self.root, self.name, int(shard), self.ndim)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise _missing_chunk(self.root, path[len(str(self.root)) + 1:]) from None
            try:
                size = os.fstat(fd).st_size
                if size < self.index_bytes:
                    raise ValueError(f"shard {shard} is truncated ({size} bytes)")
                index = _pread(fd, self.index_bytes, size - self.index_bytes)
                _check_crc(index, google_crc32c, f"the index of shard {shard}")
                where = index[:-4].view("<u8").reshape(self.per_shard, 2)[mine - shard * self.per_shard]
                written = where[:, 0] != _EMPTY
                if written.any():
                    lo, hi = int(where[written, 0].min()), int((where[written, 0] + where[written, 1]).max())
                    if hi > size - self.index_bytes:
                        raise ValueError(f"shard {shard} is truncated ({size} bytes)")
                    data = _pread(fd, hi - lo, lo)
            finally:
                os.close(fd)
            for c, (offset, nbytes), ok in zip(mine, where, written):
                if not ok:
                    yield int(c), np.full((self.chunk_rows, *self.row_shape), self.fill, self.dtype)
                    continue
                if nbytes != self.chunk_bytes + 4:
                    raise ValueError(f"chunk {c} of shard {shard} holds {nbytes} bytes, not {self.chunk_bytes + 4}")
                raw = data[offset - lo:offset - lo + nbytes]
                _check_crc(raw, google_crc32c, f"chunk {c} of shard {shard}")
                yield int(c), raw[:-4].view(self.dtype.newbyteorder("<")).reshape(self.chunk_rows, *self.row_shape)


def _pread(fd: int, n: int, offset: int) -> np.ndarray:
    buf = np.empty(n, np.uint8)
    got = os.preadv(fd, [buf], offset)  # into the array: no bytes object, no extra copy
    if got != n:
        raise ValueError(f"short read ({got} of {n} bytes at {offset})")
    return buf


def _check_crc(data: np.ndarray, google_crc32c, what: str) -> None:
    # the crc32c codec's trailer: the checksum of the bytes before it, little-endian
    if google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:].tobytes(), "little"):
        raise ValueError(f"{what}: stored and computed checksum do not match")
