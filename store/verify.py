"""`xmodel store info` and `xmodel store verify`: what a store holds, and whether it is intact."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from store.reader import ActivationStore, widen
from store.writer import UNITS_DIR


def _arrays(store: ActivationStore) -> dict[str, Any]:
    return {name: arr for name, arr in store.root.arrays()} | {
        f"{g}/{name}": arr for g, grp in store.root.groups() for name, arr in grp.arrays()}


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_info(path: Path) -> dict[str, Any]:
    store = ActivationStore(path, allow_incomplete=True)
    arrays = {name: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks),
                     "shards": list(a.shards or a.chunks), "bytes_on_disk": _disk_bytes(Path(path) / name)}
              for name, a in sorted(_arrays(store).items())}
    return {"path": str(path), "complete": bool(store.attrs.get("complete")), "bytes_on_disk": _disk_bytes(Path(path)),
            "arrays": arrays, "attrs": store.attrs}


def _shard_key(name: str, index: int, ndim: int) -> str:
    return f"{name}/c/{index}" + "/0" * (ndim - 1)


def verify_store(path: Path) -> list[str]:
    """Every problem found, one line each naming the array, shard and unit; empty when intact."""
    path = Path(path)
    store = ActivationStore(path, allow_incomplete=True)
    problems: list[str] = []
    n_units = int(store.attrs["n_units"])
    markers = {}
    for u in range(n_units):
        f = path / UNITS_DIR / f"u{u:06d}.json"
        if f.exists():
            markers[u] = json.loads(f.read_text())
        else:
            problems.append(f"unit {u}: not written (no marker); rerun `xmodel extract` to finish the store")
    if not store.attrs.get("complete"):
        problems.append("store incomplete: not finalized; rerun `xmodel extract` to finish it")
    seq_shard_rows = int(store.attrs["unit_size"])
    tok_shard = _tok_shard(store)
    tok_unit = {s: u for u, m in markers.items() for s in range(m["tok"][0] // tok_shard, m["tok"][1] // tok_shard)}
    for name, arr in sorted(_arrays(store).items()):
        is_tok = name.startswith("tokens/") or name in ("token_ids", "char_end")
        rows = int(arr.shards[0] if arr.shards else arr.chunks[0])
        for shard in range(-(-arr.shape[0] // rows)):
            unit = tok_unit.get(shard, "?") if is_tok else shard if seq_shard_rows == rows else "?"
            where = f"{name} shard {shard} (unit {unit})"
            if not (path / _shard_key(name, shard, arr.ndim)).exists():
                problems.append(f"{where}: shard file missing; rerun `xmodel extract --force` to rebuild")
                continue
            try:
                block = arr[shard * rows:(shard + 1) * rows]
            except Exception as e:  # a crc32c mismatch or a truncated shard
                problems.append(f"{where}: unreadable ({e.__class__.__name__}: {str(e)[:80]}); rerun `xmodel extract --force`")
                continue
            if block.dtype.kind in "fu" and name.split("/")[0] in ("pooled", "last", "tokens"):
                values = widen(block, store.store_dtype if name.split("/")[0] != "pooled" else "float32")
                bad = int((~np.isfinite(values)).sum())
                if bad:
                    problems.append(f"{where}: {bad} NaN/inf values")
    return problems


def _tok_shard(store: ActivationStore) -> int:
    if "token_ids" not in store.root:
        return 1
    arr = store.root["token_ids"]
    return int(arr.shards[0] if arr.shards else arr.chunks[0])
