"""`xmodel store info` and `xmodel store verify`: what a store holds, and whether it is intact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from store.check import scan
from store.reader import ActivationStore, extract_command, repair_hint


def _disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def store_info(path: Path) -> dict[str, Any]:
    store = ActivationStore(path, allow_incomplete=True)
    arrays = {name: {"shape": list(a.shape), "dtype": str(a.dtype), "chunks": list(a.chunks),
                     "shards": list(a.shards or a.chunks), "bytes_on_disk": _disk_bytes(Path(path) / name)}
              for name, a in sorted(store.arrays().items())}
    return {"path": str(path), "complete": bool(store.attrs.get("complete")), "bytes_on_disk": _disk_bytes(Path(path)),
            "arrays": arrays, "attrs": store.attrs}


def verify_store(path: Path) -> list[str]:
    """Every problem found, one line each naming the array, shard and unit, and the fix; empty when intact."""
    path = Path(path)
    store = ActivationStore(path, allow_incomplete=True)
    problems = scan(path, store.root, store.attrs, deep=True, read=lambda name, arr, lo, hi: store.read(name, slice(lo, hi)))
    lines = [f"{p.text}; {_fix(p, path, store.attrs)}" for p in problems]
    if not store.attrs.get("complete"):
        lines.append(f"store incomplete: not finalized; rerun `{extract_command(path, store.attrs, force=False)}` to finish it")
    return lines


def _fix(problem, path: Path, attrs: dict[str, Any]) -> str:
    """The one command that repairs it (every hint of one store is the same command)."""
    if problem.unit is None:
        return f"rerun `{extract_command(path, attrs, force=True)}` to rebuild the store"
    if problem.text.endswith("(no marker)") and not attrs.get("complete"):
        return f"rerun `{extract_command(path, attrs, force=False)}` to finish the store"
    return repair_hint(path, attrs)
