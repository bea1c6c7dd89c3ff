"""What is wrong with a store, and which unit's rewrite fixes each problem.

One scan serves three callers: opening a store for reading (cheap: success marker, unit markers,
a stat of every shard file), `xmodel store verify` and `xmodel extract --force` on an existing
store (deep: every shard is also read, so a checksum mismatch or a NaN is found). Every problem
names the unit that owns it, so extraction can rewrite just those units; `unit=None` means no
unit rewrite fixes it (e.g. an array's metadata is gone) and the store must be rebuilt.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from store.errors import UserError
from store.layout import widen

UNITS_DIR = "_units"
TOKEN_ARRAYS = ("token_ids", "char_end")


@dataclass(frozen=True)
class Problem:
    unit: int | None  # the unit whose rewrite fixes it; None: only a rebuild does
    text: str


def read_attrs(path: Path) -> dict[str, Any] | None:
    """The group attributes at path, or None where there is no zarr group."""
    meta = Path(path) / "zarr.json"
    if not meta.exists():
        return None
    try:
        return json.loads(meta.read_text()).get("attributes", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        # unreadable, it cannot be recognised as a store xmodel wrote, so --force must not remove it either
        raise UserError(f"{meta} is unreadable: {path} is damaged beyond repair; move it away and rerun "
                        "`xmodel extract`") from None


def is_store(path: Path) -> bool:
    """Whether path holds an activation store xmodel wrote: a zarr group whose attributes carry the
    store schema version and identity (a sub-group of a store, or any other zarr group, does not)."""
    try:
        attrs = read_attrs(path)
    except UserError:
        return False
    return isinstance(attrs, dict) and "schema_version" in attrs and isinstance(attrs.get("identity"), dict)


# Every file xmodel (and zarr, for it) writes in a store, relative to it; zarr writes through
# `<name>.<uuid hex>.partial`, which a kill can leave behind
_PARTIAL = r"(\.[0-9a-f]{32}\.partial)?"
_OURS = re.compile(
    rf"zarr(\.json|\.json\.tmp|\.[0-9a-f]{{32}}\.partial)"
    rf"|{UNITS_DIR}/u\d{{6}}\.(json|tmp)"
    rf"|(pooled|last|tokens)/zarr(\.json|\.[0-9a-f]{{32}}\.partial)"
    rf"|((pooled|last|tokens)/L\d+|seq_start|seq_len|text_index|{'|'.join(TOKEN_ARRAYS)})"
    rf"/(zarr(\.json|\.[0-9a-f]{{32}}\.partial)|c(/\d+)+{_PARTIAL})")


def foreign_files(path: Path) -> list[str]:
    """Files (and links) in the store folder `path` that xmodel did not write: replacing the store
    (--force, a rebuild) would delete them, so it is refused while there are any."""
    path = Path(path)
    out = []
    for folder, dirs, files in os.walk(path):
        rel = Path(folder).relative_to(path)
        out += [str(rel / f) for f in files if not _OURS.fullmatch((rel / f).as_posix())
                or os.path.islink(os.path.join(folder, f))]
        out += [str(rel / d) for d in dirs if os.path.islink(os.path.join(folder, d))]
    return sorted(out)


def marker_path(path: Path, unit: int) -> Path:
    return Path(path) / UNITS_DIR / f"u{unit:06d}.json"


def is_token_array(name: str) -> bool:
    return name.startswith("tokens/") or name in TOKEN_ARRAYS


def arrays(root) -> dict[str, Any]:
    """Every array of a store group by name (`last/L3`, `token_ids`, ...)."""
    with warnings.catch_warnings():  # unconsolidated, zarr notes that our _units folder is no zarr node
        warnings.simplefilter("ignore", UserWarning)
        return {name: arr for name, arr in root.arrays()} | {
            f"{g}/{name}": arr for g, grp in root.groups() for name, arr in grp.arrays()}


def shard_rows(arr) -> int:
    return int(arr.shards[0] if arr.shards else arr.chunks[0])


def shard_file(path: Path | str, name: str, shard: int, ndim: int) -> str:
    """The file of shard `shard` of array `name` (zarr v3 default chunk key encoding). A string, not
    a Path: opening a store stats every shard file, and pathlib's parsing was most of that time."""
    return f"{path}/{name}/c/{shard}" + "/0" * (ndim - 1)


def _markers(path: Path, n_units: int) -> dict[int, dict]:
    out = {}
    for u in range(n_units):
        try:
            out[u] = json.loads(marker_path(path, u).read_text())
        except FileNotFoundError:
            continue
        except (OSError, json.JSONDecodeError):
            out[u] = None  # torn or unreadable: the unit counts as not written
    return out


def scan(path: Path, root, attrs: dict[str, Any], deep: bool, read=None) -> list[Problem]:
    """Every problem of the store at `path` (its group `root`, attributes `attrs`), one line each.

    deep: also read every shard (`read(name, arr, lo, hi)` returns raw rows or raises), for
    checksum mismatches and NaN/inf values. Shards of units that have no marker are not listed
    separately: that unit is rewritten anyway."""
    path = Path(path)
    problems: list[Problem] = []
    n_units = int(attrs["n_units"])
    markers = _markers(path, n_units)
    for u in range(n_units):
        if markers.get(u) is None:
            problems.append(Problem(u, f"unit {u}: not written (no marker)"))
    done = {u for u, m in markers.items() if m is not None}
    old_fill = int(attrs.get("schema_version", 1)) < 2
    tok_spans = sorted((markers[u]["tok"][0], markers[u]["tok"][1], u) for u in done)
    for name, arr in sorted(arrays(root).items()):
        bad = _metadata_problem(path / name / "zarr.json")
        if bad:
            problems.append(Problem(None, f"{name}: array metadata (zarr.json) {bad}"))
            continue
        rows = shard_rows(arr)
        for shard, unit in _shard_units(name, arr, rows, tok_spans, done):
            where = f"{name} shard {shard} (unit {unit})"
            if not os.path.exists(shard_file(path, name, shard, arr.ndim)):
                # before schema 2 an all-zero shard was legitimately absent, and a rewrite leaves it
                # absent again: only a rebuild (unit None) gives such a store its files
                problems.append(Problem(None if old_fill else unit, f"{where}: shard file missing"))
                continue
            if deep:
                problems.extend(Problem(unit, f"{where}: {line}") for line in _read_problems(name, arr, shard, rows, attrs, read))
    return problems


def _metadata_problem(meta: Path) -> str | None:
    # a reader of the consolidated metadata never opens it, but every other reader (xarray, zarr) does
    try:
        doc = json.loads(meta.read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError):
        return "unreadable"
    return None if isinstance(doc, dict) and doc.get("node_type") == "array" else "not an array's"


def _shard_units(name: str, arr, rows: int, tok_spans: list[tuple[int, int, int]],
                 done: set[int]) -> Iterator[tuple[int, int]]:
    """(shard, owning unit) for every shard of a written unit. Sequence shards are units (a unit
    owns one shard of each sequence array); a token shard belongs to the unit whose token rows
    (whole shards, from its marker) contain it."""
    starts = [lo for lo, _, _ in tok_spans]
    for shard in range(-(-arr.shape[0] // rows)):
        if not is_token_array(name):
            unit = shard
        else:
            i = bisect.bisect_right(starts, shard * rows) - 1
            unit = tok_spans[i][2] if i >= 0 and shard * rows < tok_spans[i][1] else None
        if unit in done:
            yield shard, unit


def _read_problems(name: str, arr, shard: int, rows: int, attrs: dict[str, Any], read) -> list[str]:
    try:
        block = read(name, arr, shard * rows, (shard + 1) * rows)
    except UserError as e:  # a checksum mismatch or a truncated shard, as the reader words it
        return [str(e).split(": ", 1)[-1].split(";")[0]]
    kind = name.split("/")[0]
    if kind in ("pooled", "last", "tokens") and block.dtype.kind in "fu":
        values = widen(block, attrs["store_dtype"] if kind != "pooled" else "float32")
        bad = int((~np.isfinite(values)).sum())
        if bad:
            return [f"{bad} NaN/inf values"]
    return []
