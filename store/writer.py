"""Creating, resuming and finalizing an activation store.

Crash safety rests on one rule: a unit's marker file is written (atomically, by rename) only after
every shard of that unit is on disk. A rerun rewrites every unit without a marker, so a shard torn
by a kill is always rewritten, never trusted. Rank 0 finalizes once all markers exist.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError
from pipeline.faults import fault_point
from store.layout import SCHEMA_VERSION, StoreLayout, UnitSpan

UNITS_DIR = "_units"


def _marker(path: Path, unit: int) -> Path:
    return path / UNITS_DIR / f"u{unit:06d}.json"


def read_attrs(path: Path) -> dict[str, Any] | None:
    """The store's group attributes, or None where no store exists at path."""
    meta = path / "zarr.json"
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError):
        raise UserError(f"{path}/zarr.json is unreadable: the store is damaged; rerun with --force to rebuild it") from None


def check_existing(path: Path, identity: dict[str, Any], force: bool) -> str:
    """'new', 'resume' or 'complete' (read-only). A store made from other inputs is refused, or with
    force marked 'new' (to be replaced); a store of the same inputs is always resumed, never rebuilt."""
    if not path.exists():
        return "new"
    attrs = read_attrs(path)
    if attrs is None:
        if any(path.iterdir()) and not force:
            raise UserError(f"{path} exists and is not an activation store: choose another output path or remove it")
        return "new"
    theirs = attrs.get("identity", {})
    differ = sorted(k for k in set(identity) | set(theirs) if identity.get(k) != theirs.get(k))
    if differ and force:
        return "new"
    if differ:
        shown = ", ".join(f"{k}: {theirs.get(k)!r} -> {identity.get(k)!r}" for k in differ[:3])
        raise UserError(f"{path} was made from other inputs ({shown}): rerun with --force to overwrite it, or write to another path")
    return "complete" if attrs.get("complete") else "resume"


class StoreWriter:
    def __init__(self, path: Path, layout: StoreLayout, store_dtype: str, identity: dict[str, Any]):
        self.path = Path(path)
        self.layout = layout
        self.store_dtype = store_dtype
        self.identity = identity
        self._arrays: dict[str, Any] = {}

    def create(self, extra_attrs: dict[str, Any]) -> None:
        """Lay out an empty store (rank 0 only). Replaces whatever is at path."""
        import zarr
        from zarr.codecs import Crc32cCodec

        # Built beside the target and renamed into place: a kill mid-creation leaves no half store.
        tmp = self.path.with_name(self.path.name + ".creating")
        shutil.rmtree(tmp, ignore_errors=True)
        root = zarr.open_group(str(tmp), mode="w", zarr_format=3)
        for name, (shape, dtype, chunk, shard) in self.layout.array_specs(self.store_dtype).items():
            # crc32c on every inner chunk: `verify` finds a flipped byte and names the chunk.
            root.create_array(name, shape=shape, dtype=dtype, chunks=chunk, shards=shard,
                              compressors=[Crc32cCodec()], fill_value=0)
        (tmp / UNITS_DIR).mkdir()
        attrs = {"schema_version": SCHEMA_VERSION, "identity": self.identity, "complete": False,
                 "store_dtype": self.store_dtype, "layers": self.layout.layers, "width": self.layout.width,
                 "n_seq": self.layout.n_seq, "n_tok": self.layout.n_tok, "n_units": self.layout.n_units,
                 "unit_size": self.layout.unit_size, **extra_attrs}
        root.attrs.update(attrs)
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(tmp, self.path)

    def _array(self, name: str):
        import zarr

        if name not in self._arrays:
            # Empty chunks are written too: every shard file must exist for `verify` to find deletions.
            self._arrays[name] = zarr.open_array(str(self.path / name), mode="r+",
                                                 config={"write_empty_chunks": True})
        return self._arrays[name]

    def pending_units(self, rank: int, world: int) -> list[UnitSpan]:
        return [u for u in self.layout.units
                if u.unit % world == rank and not _marker(self.path, u.unit).exists()]

    def write_unit(self, span: UnitSpan, arrays: dict[str, np.ndarray]) -> None:
        """Write every shard of one unit, then its marker. arrays: name -> rows of this unit."""
        try:
            for name, data in arrays.items():
                lo, hi = span.tok if name.startswith("tokens/") or name in ("token_ids", "char_end") else span.seq
                if hi > lo:
                    self._array(name)[lo:hi] = data
                    fault_point("shards")
        except OSError as e:
            raise UserError(f"writing unit {span.unit} of {self.path} failed ({e.strerror or e}): free space or "
                            "fix the disk, then rerun to resume (finished units are kept)") from None
        marker = _marker(self.path, span.unit)
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"unit": span.unit, "seq": span.seq, "tok": span.tok}))
        os.replace(tmp, marker)

    def finalize(self) -> None:
        """Rank 0, after every rank is done: check markers, mark complete, consolidate metadata."""
        import zarr

        missing = [u.unit for u in self.layout.units if not _marker(self.path, u.unit).exists()]
        if missing:
            raise RuntimeError(f"{self.path}: units {missing[:5]} have no marker after all ranks finished")
        root = zarr.open_group(str(self.path), mode="r+")
        root.attrs["complete"] = True
        with warnings.catch_warnings():  # zarr notes our _units folder and that consolidation is v3-unofficial
            warnings.simplefilter("ignore", UserWarning)
            zarr.consolidate_metadata(str(self.path))
