"""Out-of-core CKA and Procrustes over a large activation store, against in-memory numpy / scipy.

Builds (or reuses) two synthetic stores A and B of n_max rows × d through the store's own writer
(`last/L0` only, float16 on disk by default), with a planted relation y = Q·(s ⊙ x) + noise, Q a
random rotation. Then, each in a fresh subprocess so peak RSS is its own:
  stream-cka         pipeline.metrics.cka over the stores' dask arrays (shard by shard, float64 sums)
  stream-procrustes  Procrustes().fit over the same arrays (one pass, then one d×d SVD)
at several n (prefixes of the stores), and
  numpy-cka          all n rows read into float64 numpy, debiased CKA by the same feature-space formula
  scipy-procrustes   all n rows read into float64 numpy, scipy.linalg.orthogonal_procrustes
at the largest n that fits comfortably. Prints wall time, peak RSS, and RSS above the process's
baseline after imports ("work"), the ratios at the shared n, and the agreement of the values.
Example (about 15 minutes on 2 CPU cores):
  python bench/fit.py --dir /tmp/bench-fit
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UNIT = 4096  # rows per shard


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ---------------------------------------------------------------------------------------------
# The synthetic stores


def identity(n: int, d: int, seed: int, dtype: str, role: str) -> dict:
    return {"model_id": f"synthetic-{role}", "corpus_fingerprint": f"synthetic-{n}-{seed}", "n": n, "d": d,
            "seed": seed, "store_dtype": dtype, "relation": "y = Q (s * x) + 0.1 noise"}


def build_stores(directory: Path, n: int, d: int, seed: int, dtype: str, d_b: int | None = None) -> None:
    """Stores a (n x d) and b (n x d_b, default d) with y = W x + noise: W = Q diag(s), Q a random
    rotation, when the widths are equal; a random Gaussian map otherwise."""
    import numpy as np

    from store.layout import StoreLayout
    from store.writer import StoreWriter, check_existing

    d_b = d_b or d
    widths = {"a": d, "b": d_b}
    writers = {r: StoreWriter(directory / f"{r}.zarr", StoreLayout(np.zeros(n, dtype=np.int64), UNIT, [0], widths[r]),
                              dtype, identity(n, widths[r], seed, dtype, r)) for r in "ab"}
    layout = writers["a"].layout
    status = {r: check_existing(w.path, w.identity, force=True) for r, w in writers.items()}
    if all(s == "complete" for s in status.values()):
        print(f"reusing the stores in {directory}")
        return
    need = n * (d + d_b) * np.dtype(dtype).itemsize * 1.1
    free = shutil.disk_usage(directory).free
    if free < need:
        sys.exit(f"{directory}: {free / 2**30:.1f} GiB free, the stores need {need / 2**30:.1f} GiB: use --dir elsewhere or lower --n")
    for r, w in writers.items():
        if status[r] != "resume":
            w.create({"num_layers": 1, "role": r})
    rng = np.random.default_rng(seed)
    if d_b == d:
        q, _ = np.linalg.qr(rng.standard_normal((d, d)))
        w_true = (q * rng.uniform(0.5, 2.0, d)).astype(np.float32)  # y = W x + noise, W = Q diag(s)
    else:
        w_true = (rng.standard_normal((d_b, d)) / np.sqrt(d)).astype(np.float32)
    t0 = time.perf_counter()
    pending = {r: {u.unit for u in w.pending_units(0, 1)} for r, w in writers.items()}
    for span in layout.units:
        if span.unit not in pending["a"] | pending["b"]:
            continue
        lo, hi = span.seq
        g = np.random.default_rng([seed, span.unit])
        x = g.standard_normal((hi - lo, d), dtype=np.float32) + 0.5
        y = x @ w_true.T + 0.1 * g.standard_normal((hi - lo, d_b), dtype=np.float32)
        index = {"seq_start": np.zeros(hi - lo, np.int64), "seq_len": np.zeros(hi - lo, np.int64),
                 "text_index": np.arange(lo, hi, dtype=np.int64)}
        for r, values in (("a", x), ("b", y)):
            if span.unit in pending[r]:
                # pooled too: a store's open check wants every array's shards (the bench reads last)
                writers[r].write_unit(span, {**index, "last/L0": values.astype(dtype), "pooled/L0": values})
        if span.unit % 25 == 0:
            print(f"  wrote rows {hi:,} of {n:,} ({time.perf_counter() - t0:.0f} s)", flush=True)
    for w in writers.values():
        w.finalize()
    print(f"built the stores in {directory} in {time.perf_counter() - t0:.0f} s")


# ---------------------------------------------------------------------------------------------
# One measurement (run in a child process)


def numpy_cka(x, y) -> float:
    """Debiased linear CKA of in-memory float64 arrays (centered in place; the formula of
    pipeline.metrics, computed directly on the full arrays)."""
    import numpy as np

    n = len(x)
    x -= x.mean(0)
    y -= y.mean(0)
    a, b = np.einsum("ij,ij->i", x, x), np.einsum("ij,ij->i", y, y)

    def hsic(u, v, p, q):
        return np.sum((u.T @ v) ** 2) - n / (n - 2) * p @ q + p.sum() * q.sum() / ((n - 1) * (n - 2))

    return float(hsic(x, y, a, b) / np.sqrt(hsic(x, x, a, a) * hsic(y, y, b, b)))


def measure(task: str, directory: Path, n: int, out: Path) -> dict:
    import numpy as np
    import scipy.linalg  # noqa: F401  (imported before the baseline, like the other libraries)
    import torch  # noqa: F401

    from pipeline import metrics as M
    from pipeline.aligners.procrustes import Procrustes
    from store.reader import ActivationStore

    a, b = ActivationStore(directory / "a.zarr"), ActivationStore(directory / "b.zarr")
    base = peak_rss_mib()
    t0 = time.perf_counter()
    if task.startswith("stream"):
        x, y = a.dask("last", 0)[:n], b.dask("last", 0)[:n]
        if task == "stream-cka":
            value = M.cka(x, y)
        else:
            value = Procrustes().fit(x, y).net.weight.numpy().astype(np.float64)
    else:
        x = a.numpy("last", 0, slice(0, n)).astype(np.float64)
        y = b.numpy("last", 0, slice(0, n)).astype(np.float64)
        if task == "numpy-cka":
            value = numpy_cka(x, y)
        else:
            from scipy.linalg import orthogonal_procrustes

            value = orthogonal_procrustes(x, y)[0].T  # x R ≈ y, so y ≈ Rᵀ x
    seconds = time.perf_counter() - t0
    if isinstance(value, np.ndarray):
        np.save(out, value)
        value = str(out)
    return {"task": task, "n": n, "seconds": seconds, "peak_mib": peak_rss_mib(), "base_mib": base, "value": value}


# ---------------------------------------------------------------------------------------------


def run_child(task: str, directory: Path, n: int) -> dict:
    out = directory / f"{task}-{n}.npy"
    cmd = [sys.executable, __file__, "--child", task, "--dir", str(directory), "--n", str(n), "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        sys.exit(f"{task} n={n} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {task:<18} n={n:>9,}  {result['seconds']:8.1f} s  peak {result['peak_mib']:8.0f} MiB  "
          f"work {result['peak_mib'] - result['base_mib']:8.0f} MiB", flush=True)
    return result


def report(results: list[dict], n_mem: int) -> None:
    import numpy as np

    print("\n| method | n | wall s | peak RSS MiB | work MiB (peak - baseline) |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['task']} | {r['n']:,} | {r['seconds']:.1f} | {r['peak_mib']:.0f} | {r['peak_mib'] - r['base_mib']:.0f} |")
    by = {(r["task"], r["n"]): r for r in results}
    print()
    for what, ours, theirs in (("CKA", "stream-cka", "numpy-cka"), ("Procrustes", "stream-procrustes", "scipy-procrustes")):
        s, m = by.get((ours, n_mem)), by.get((theirs, n_mem))
        if not (s and m):
            continue
        if what == "CKA":
            agree = f"|ΔCKA| = {abs(s['value'] - m['value']):.2e} (CKA {s['value']:.6f})"
        else:
            ws, wm = np.load(s["value"]), np.load(m["value"])
            agree = f"max |ΔW| = {np.abs(ws - wm).max():.2e}"
        print(f"{what} at n={n_mem:,}: streaming / in-memory  time {s['seconds'] / m['seconds']:.2f}×, "
              f"work memory {(s['peak_mib'] - s['base_mib']) / max(1.0, m['peak_mib'] - m['base_mib']):.3f}×; {agree}")
    for task in ("stream-cka", "stream-procrustes"):
        rows = sorted((r for r in results if r["task"] == task), key=lambda r: r["n"])
        if len(rows) > 1:
            work = ", ".join(f"{r['n']:,}: {r['peak_mib'] - r['base_mib']:.0f}" for r in rows)
            print(f"{task} work MiB by n ({work}): growth {rows[-1]['n'] / rows[0]['n']:.0f}× rows → "
                  f"{(rows[-1]['peak_mib'] - rows[-1]['base_mib']) / max(1.0, rows[0]['peak_mib'] - rows[0]['base_mib']):.2f}× memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None, help="where the stores go (default: a temp dir, removed after)")
    ap.add_argument("--n", default="250000,500000,1000000", help="row counts for the streaming runs (the largest sizes the stores)")
    ap.add_argument("--n-mem", type=int, default=250000, help="rows for the in-memory numpy/scipy runs")
    ap.add_argument("--d", type=int, default=1024)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.dir, int(args.n), args.out)))
        return
    ns = sorted({int(float(v)) for v in args.n.split(",")} | {args.n_mem})
    temp = args.dir is None
    directory = Path(tempfile.mkdtemp(prefix="bench-fit-")) if temp else args.dir
    directory.mkdir(parents=True, exist_ok=True)
    try:
        build_stores(directory, max(ns), args.d, args.seed, args.dtype)
        print(f"measuring ({os.cpu_count()} CPUs); each line is a fresh process:")
        results = [run_child(task, directory, args.n_mem) for task in ("numpy-cka", "scipy-procrustes")]
        results += [run_child(task, directory, n) for n in ns for task in ("stream-cka", "stream-procrustes")]
        report(results, args.n_mem)
    finally:
        if temp:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
