"""Shared test utilities: params for tiny models, running the CLI in-process, comparing stores."""

from __future__ import annotations

import os
import subprocess
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


ROOT = Path(__file__).resolve().parents[1]


def xmodel_process(params: Path, *args: str, env: dict | None = None, nproc: int = 1) -> subprocess.CompletedProcess:
    """`xmodel` in a fresh process (torchrun when nproc > 1), single-threaded for exact equality."""
    cmd = [sys.executable, "-m", "pipeline"] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "pipeline"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([*cmd, "--params", str(params), *args], capture_output=True, text=True, env=full_env,
                          cwd=params.parent, timeout=600)


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
