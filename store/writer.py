"""Creating, resuming and finalizing an activation store.

Crash safety rests on one rule: a unit's marker file is written (atomically, by rename) only after
every shard of that unit is on disk. A rerun rewrites every unit without a marker, so a shard torn
by a kill is always rewritten, never trusted. Rank 0 finalizes once all markers exist.

A unit's shards are written WRITERS at a time: by worker processes when the unit is large
(store/shardpool.py says why), else by threads, each shard encoded and written through zarr's async
API on the thread's own event loop (zarr's sync API runs every codec on its one event-loop thread).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import warnings
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Callable

import numpy as np

from store.check import UNITS_DIR, foreign_files, is_store, is_token_array, marker_path, read_attrs, scan
from store.errors import UserError
from store.layout import FILL, SCHEMA_VERSION, StoreLayout, UnitSpan
from store.owned import check_replaceable

__all__ = ["UNITS_DIR", "StoreWriter", "check_existing", "read_attrs"]

WRITERS = min(8, os.cpu_count() or 1)  # worker processes encoding and writing a large unit's shards at once
PROCESS_MIN_BYTES = 256 << 20  # units at least this large go to worker processes (starting them takes ~1 s)


def _store_or_empty(path: Path) -> bool:
    # an empty folder holds nothing to lose; a `.creating` folder gets its attributes first, so a
    # creation killed after its first write is still recognised
    return is_store(path) or not any(path.iterdir())


def check_only_ours(path: Path) -> None:
    """Refuse to replace a store folder holding anything xmodel did not write there: --force and a
    rebuild delete the whole folder, and no command deletes what xmodel did not create."""
    extra = foreign_files(path) if Path(path).is_dir() else []
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"{path} holds {extra[0]}{more}, which xmodel did not write: replacing the store would delete "
                        "it; move it out of the store (or write to another path) and rerun")


def check_existing(path: Path, identity: dict[str, Any], force: bool) -> str:
    """'new', 'resume' or 'complete' (read-only). A store made from other inputs is refused, or with
    force marked 'new' (to be replaced); a store of the same inputs is always resumed, never rebuilt.
    Only a folder that is an xmodel store (or empty) is ever marked for replacement, and never the
    current directory, the project or a folder containing them."""
    path = Path(path)
    if not path.exists():
        return "new"
    if not is_store(path):
        read_attrs(path)  # an unreadable zarr.json is its own one-line error
        if path.is_dir() and any(path.iterdir()) and not force:
            raise UserError(f"{path} exists and is not an activation store: choose another output path or move it away")
        check_replaceable(path, _store_or_empty, "store")
        return "new"
    attrs = read_attrs(path)
    theirs = attrs.get("identity", {})
    differ = sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))
    if differ and force:
        check_replaceable(path, is_store, "store")
        check_only_ours(path)
        return "new"
    if differ:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {identity.get(k)!r}" for k in differ[:3])
        raise UserError(f"{path} was made from other inputs ({shown}): rerun with --force to overwrite it, or write to another path")
    return "complete" if attrs.get("complete") else "resume"


def _set_complete(path: Path, value: bool) -> None:
    """Flip the success marker (the group attribute `complete`) in one atomic rename of zarr.json,
    keeping its consolidated metadata."""
    meta = path / "zarr.json"
    doc = json.loads(meta.read_text())
    doc.setdefault("attributes", {})["complete"] = value
    tmp = meta.with_name("zarr.json.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    os.replace(tmp, meta)


class StoreWriter:
    def __init__(self, path: Path, layout: StoreLayout, store_dtype: str, identity: dict[str, Any],
                 on_write: Callable[[str], None] | None = None, writers: int | None = None):
        """on_write(what) is called at each write point ("create", each shard written, "finalize"):
        the crash tests inject kills and I/O errors there. writers: worker processes for units of at
        least PROCESS_MIN_BYTES (default WRITERS, read when the writer is made; 1: none). Smaller
        units are written one shard at a time by one thread of this process."""
        self.path = Path(path)
        self.layout = layout
        self.store_dtype = store_dtype
        self.identity = identity
        self.on_write = on_write or (lambda what: None)
        self.writers = max(1, WRITERS if writers is None else writers)
        self._pool = None  # a ShardPool, started for the first large unit

    def prepare(self, force: bool, extra_attrs: dict[str, Any]) -> list[int]:
        """Rank 0, holding the store's lock: create the store, replace it (force, other inputs), or
        reopen the damaged units of a store of the same inputs. Every problem the cheap scan finds
        (a missing marker or shard file) is rewritten; with force, every shard is also read, so
        checksum mismatches and NaN/inf values are rewritten too (what `store verify` asks for).
        Returns the units reopened."""
        status = check_existing(self.path, self.identity, force)
        if status != "new":
            damaged = self._damaged_units(deep=force)
            if damaged is None:
                if not force:
                    raise UserError(f"{self.path} is damaged beyond its units (see `xmodel store verify {self.path}`): "
                                    "rerun with --force to rebuild it")
                status = "new"
            elif damaged:
                self._reopen(damaged)
                return damaged
        if status == "new":
            self.create(extra_attrs)
        return []

    def _damaged_units(self, deep: bool) -> list[int] | None:
        """Units that fail the scan (a lost marker too: a complete store's writer would otherwise
        never reopen that unit); None when some damage belongs to no unit."""
        from store.reader import ActivationStore

        store = ActivationStore(self.path, allow_incomplete=True)
        problems = scan(self.path, store.root, store.attrs, deep=deep, read=lambda name, arr, lo, hi: store.read(name, slice(lo, hi)))
        if any(p.unit is None for p in problems):
            return None
        return sorted({p.unit for p in problems})

    def _reopen(self, units: list[int]) -> None:
        # success marker first: a kill after it leaves an incomplete store that the rerun resumes
        _set_complete(self.path, False)
        for u in units:
            marker_path(self.path, u).unlink(missing_ok=True)

    def create(self, extra_attrs: dict[str, Any]) -> None:
        """Lay out an empty store (rank 0 only). Replaces the store at path, if any."""
        import zarr
        from zarr.codecs import Crc32cCodec

        # Built beside the target and renamed into place: a kill mid-creation leaves no half store.
        target = self.path.absolute()
        tmp = target.with_name(target.name + ".creating")
        check_replaceable(tmp, _store_or_empty, "half-created store")
        check_replaceable(self.path, _store_or_empty, "store")
        for folder in (tmp, self.path):
            check_only_ours(folder)
        attrs = {"schema_version": SCHEMA_VERSION, "identity": self.identity, "complete": False,
                 "store_dtype": self.store_dtype, "layers": self.layout.layers, "width": self.layout.width,
                 "n_seq": self.layout.n_seq, "n_tok": self.layout.n_tok, "n_units": self.layout.n_units,
                 "unit_size": self.layout.unit_size, **extra_attrs}
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            # attributes first: from its first file on, a `.creating` folder is recognisably ours
            root = zarr.create_group(str(tmp), zarr_format=3, attributes=attrs)
            for name, (shape, dtype, chunk, shard) in self.layout.array_specs(self.store_dtype).items():
                # crc32c on every inner chunk: `verify` finds a flipped byte and names the chunk.
                root.create_array(name, shape=shape, dtype=dtype, chunks=chunk, shards=shard,
                                  compressors=[Crc32cCodec()], fill_value=FILL[dtype],
                                  dimension_names=_dimension_names(name, len(shape)),
                                  attributes=_array_attrs(name, self.store_dtype))
            (tmp / UNITS_DIR).mkdir()
            self.on_write("create")
            if self.path.exists():
                shutil.rmtree(self.path)
            os.replace(tmp, self.path)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(f"creating store {self.path} failed ({e.strerror or e}): free space or fix the disk, "
                            "then rerun") from None

    def _pieces(self, span: UnitSpan, arrays: dict[str, np.ndarray]) -> list[tuple[str, int, int, int]]:
        """(array, first store row, stop row, first row in arrays[array]) of every shard of the unit,
        arrays in the given order."""
        pieces = []
        for name in arrays:
            lo, hi = span.tok if is_token_array(name) else span.seq
            step = self.layout.token_shard if is_token_array(name) else self.layout.unit_size
            pieces += [(name, a, min(a + step, hi), a - lo) for a in range(lo, hi, step)]
        return pieces

    def _shard_pool(self, nbytes: int):
        from store.shardpool import ShardPool

        if self._pool is None and self.writers > 1 and nbytes >= PROCESS_MIN_BYTES and ShardPool.fits(nbytes):
            self._pool = ShardPool(self.writers)
        return self._pool if self._pool is not None and ShardPool.fits(nbytes) else None

    def close(self) -> None:
        """Stop the worker processes, if any were started."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def _write_piece(self, name: str, lo: int, hi: int, data: np.ndarray) -> None:
        # A fresh event loop on this thread: the encoding runs here, beside the other threads'.
        asyncio.run(_set_rows(self.path / name, lo, hi, data))

    def pending_units(self, rank: int, world: int) -> list[UnitSpan]:
        return [u for u in self.layout.units
                if u.unit % world == rank and not marker_path(self.path, u.unit).exists()]

    def write_unit(self, span: UnitSpan, arrays: dict[str, np.ndarray], alone: bool = False) -> None:
        """Write every shard of one unit (`writers` at once), then its marker. arrays: name -> rows of
        this unit. alone: nothing else runs in this process (the compute loop has ended), so a unit
        written here may use `writers` threads."""
        pieces = self._pieces(span, arrays)
        pool = self._shard_pool(sum(a.nbytes for a in arrays.values()))
        # In this process, one shard at a time while the compute loop runs: zarr encodes under the GIL,
        # so more writer threads take time from the loop beside them (issue 21: 0.82 x bare with 8
        # threads, 0.93 with one). Once it has ended, the last units' writes are all that is left.
        threads = None if pool is not None else ThreadPoolExecutor(max_workers=self.writers if alone else 1)
        futures = []
        try:
            if pool is not None:
                futures = pool.submit(self.path, pieces, arrays)
            else:
                futures = [threads.submit(self._write_piece, name, lo, hi, arrays[name][at:at + hi - lo])
                           for name, lo, hi, at in pieces]
            for f in futures:  # in submission order, so a fault point's count means the same each run
                f.result()
                self.on_write("shards")
        except OSError as e:
            raise UserError(f"writing unit {span.unit} of {self.path} failed ({e.strerror or e}): free space or "
                            "fix the disk, then rerun to resume (finished units are kept)") from None
        finally:
            for f in futures:
                f.cancel()  # after a failure: no more shards; those in flight finish before the raise
            wait(futures)
            if threads is not None:
                threads.shutdown()
        marker = marker_path(self.path, span.unit)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"unit": span.unit, "seq": span.seq, "tok": span.tok}))
        os.replace(tmp, marker)

    def finalize(self) -> None:
        """Rank 0, after every rank is done: check markers, consolidate metadata, then set the success
        marker. Each step is one atomic rename, so a failure (disk full) leaves an incomplete store
        that a rerun finalizes."""
        import zarr

        missing = [u.unit for u in self.layout.units if not marker_path(self.path, u.unit).exists()]
        if missing:
            raise RuntimeError(f"{self.path}: units {missing[:5]} have no marker after all ranks finished")
        try:
            self.on_write("finalize")
            with warnings.catch_warnings():  # zarr notes our _units folder and that consolidation is v3-unofficial
                warnings.simplefilter("ignore", UserWarning)
                zarr.consolidate_metadata(str(self.path))
            self.on_write("finalize")
            _set_complete(self.path, True)
        except OSError as e:
            raise UserError(f"finalizing store {self.path} failed ({e.strerror or e}): free space or fix the disk, "
                            "then rerun (every unit is written; the rerun only finalizes)") from None


async def _set_rows(path: Path, lo: int, hi: int, data: np.ndarray) -> None:
    import zarr.api.asynchronous as za

    # Every shard file must exist for a deletion to be found: empty chunks are written, and no
    # shard is all fill value (layout.FILL), which zarr would not write at all.
    arr = await za.open_array(store=str(path), mode="r+", config={"write_empty_chunks": True})
    await arr.setitem(slice(lo, hi), data)


def _dimension_names(name: str, ndim: int) -> tuple[str, ...]:
    # named dimensions, so xarray.open_zarr reads every group of the store
    rows = "token" if is_token_array(name) else "seq"
    return (rows, "hidden")[:ndim]


def _array_attrs(name: str, store_dtype: str) -> dict[str, Any]:
    kind = name.split("/")[0]
    if kind in ("last", "tokens") and store_dtype == "bfloat16":
        # marked on the array itself, so an outside reader knows these uint16 values are bf16 bits
        return {"value_dtype": "bfloat16", "encoding": "bfloat16 bits as uint16: (x.astype(uint32) << 16).view(float32)"}
    return {"value_dtype": "float32" if kind == "pooled" else store_dtype} if kind in ("pooled", "last", "tokens") else {}
