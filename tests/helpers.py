"""Shared test utilities: params for tiny models, running the CLI in-process, comparing stores."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import yaml


def write_params(tmp: Path, models: dict[str, Path | str], **sections) -> Path:
    raw = {
        "models": {k: str(v) for k, v in models.items()},
        "corpus": {"source": "pydoc", "n": 48, "seed": 0, "min_chars": 40, "max_chars": 200},
        "extract": {"layers": [0, 0.5, 1.0], "max_tokens": 24, "tokens_per_seq": 8, "unit_size": 16,
                    "batch_tokens": 96, "device": "cpu", "dtype": "float32"},
        "paths": {"data": str(tmp / "data"), "cache": str(tmp / "cache")},
    }
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    """Run `xmodel ARGS` in this process; returns (exit code, stdout, stderr)."""
    from pipeline.cli import main

    old = sys.argv
    sys.argv = ["xmodel", *args]
    code = 0
    try:
        main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of a store, raw, by name."""
    import zarr

    root = zarr.open_group(str(path), mode="r")
    out = {name: arr[...] for name, arr in root.arrays()}
    for gname, grp in root.groups():
        out.update({f"{gname}/{name}": arr[...] for name, arr in grp.arrays()})
    return out


def assert_same_store(a: Path, b: Path) -> None:
    xa, xb = store_arrays(a), store_arrays(b)
    assert sorted(xa) == sorted(xb)
    for name in xa:
        assert xa[name].dtype == xb[name].dtype, name
        assert np.array_equal(xa[name], xb[name]), f"{name} differs"
