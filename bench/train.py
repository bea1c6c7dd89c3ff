"""Adapter training throughput from an activation store, against the same training loop fed from
tensors already in GPU memory.

Builds two synthetic stores (n rows of last-token states, widths of the named model shapes, float16
on local disk, y = W x + noise) through the store's own writer, then for each adapter trains E
epochs through the library (`pipeline.aligners` fit, the path `xmodel fit` takes):
  store, on device   the default on a GPU: the training rows are read from the store once and held
                     in device memory; batches are gathered there
  store, streamed    the path for rows that do not fit (forced here with fit(rows_on_device=False)):
                     shuffled windows read from the store (blocks in parallel, windows ahead),
                     each gathered as stored (float16) into pinned memory, copied to the device
                     whole and widened there, batches gathered there; held-out rows read once and
                     kept on the device; blocks kept in host memory (as stored) after their first
                     read (they fit in its HOST_CACHE_FRACTION)
  streamed, no host cache   the same reading the store every epoch (a store larger than host memory)
  ceiling            the same module, optimizer and number of steps on random batches already on the
                     device (nothing read, no held-out passes): what the GPU can do alone
Prints one pass over the store as the streamed path reads it (GB/s of stored rows), samples/s over
the whole fit and over the epochs after the rows reached the device, the
ratio to the ceiling (the fraction of time the GPU is not waiting on data or on our bookkeeping),
and with --profile the GPU's busy fraction in the store runs (CUDA kernel time / wall time, from
torch.profiler). Example (GPU):
  python bench/train.py --dir /tmp/bench-train --n 131072 --shape-a llama-3.2-3b --shape-b llama-3.1-8b
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit import build_stores  # noqa: E402  (the synthetic stores of the fitting bench)

ADAPTERS = {  # name -> constructor arguments beyond the common ones
    "linear": {},
    "affine": {},
    "lora": {"rank": 32, "base": "identity"},
}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def busy_fraction(fn) -> tuple[float, float]:
    """(wall seconds, CUDA kernel seconds / wall) of fn() under torch.profiler."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        wall = time.perf_counter() - t0
    kernels = sum(e.device_time for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return wall, kernels / 1e6 / wall


def read_pass(x, y) -> tuple[float, int]:
    """(best seconds of 2, bytes) of reading every row block the way the streamed path does."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.aligners.training import READ_THREADS, RowSplit

    split, best, nbytes = RowSplit(x, y), float("inf"), 0
    for _ in range(2):
        t = time.perf_counter()
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            nbytes = sum(a.nbytes for block in split._blocks_in_order(pool, list(range(len(split.blocks))))
                         for a in block)
        best = min(best, time.perf_counter() - t)
    return best, nbytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", required=True, help="where the synthetic stores are built (reused if complete)")
    ap.add_argument("--n", type=int, default=131072, help="rows (texts)")
    ap.add_argument("--shape-a", default="llama-3.2-3b")
    ap.add_argument("--shape-b", default="llama-3.1-8b")
    ap.add_argument("--adapters", default="linear,lora")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--profile", action="store_true", help="also measure the GPU busy fraction (slower)")
    args = ap.parse_args()

    import torch

    from pipeline.aligners.registry import get_aligner
    from pipeline.aligners import training
    from pipeline.aligners.training import RowSplit, batch_loss
    from pipeline.models import pick_device
    from pipeline.synthetic import SHAPES
    from store.reader import ActivationStore

    device = pick_device(args.device)
    make_aligner = lambda name, hp: get_aligner(name)(**hp)  # noqa: E731
    d_a, d_b = SHAPES[args.shape_a]["hidden_size"], SHAPES[args.shape_b]["hidden_size"]
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    build_stores(directory, args.n, d_a, seed=0, dtype="float16", d_b=d_b)
    build_s = time.perf_counter() - t0
    x, y = ActivationStore(directory / "a.zarr").dask("last", 0), ActivationStore(directory / "b.zarr").dask("last", 0)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    read_s, read_bytes = read_pass(x, y)
    common = dict(loss="mse", batch_size=args.batch, epochs=args.epochs, patience=0, lr=1e-3)

    rows, ratios, waits = [], [], []
    host_cache = training.HOST_CACHE_FRACTION
    for name in args.adapters.split(","):
        hp = {**common, **ADAPTERS[name]}
        make_aligner(name, {**hp, "epochs": 1}).fit(x[:8192], y[:8192], device=device)  # warm-up
        results = {}
        feeds = (("store, on device", True),) if device.type == "cuda" else ()
        feeds += (("store, streamed", False), ("streamed, no host cache", False))
        for label, resident in feeds:
            # the second streamed run reads every epoch from the store (a store larger than host memory)
            training.HOST_CACHE_FRACTION = 0 if "no host" in label else host_cache
            aligner = make_aligner(name, hp)
            sync()
            t = time.perf_counter()
            aligner.fit(x, y, device=device, rows_on_device=resident)
            sync()
            wall = time.perf_counter() - t
            busy = busy_fraction(lambda: make_aligner(name, hp).fit(x, y, device=device, rows_on_device=resident))[1] \
                if args.profile and "no host" not in label else None
            training.HOST_CACHE_FRACTION = host_cache
            steps = aligner.fit_info["steps"]
            results[label] = (wall, steps, busy, aligner.fit_info.get("rows_to_device_seconds", 0.0))
            if "window_wait_seconds" in aligner.fit_info:
                waits.append((f"{name} {label}", aligner.fit_info["window_wait_seconds"], wall))
        # the ceiling: the same net and optimizer, the same steps, on batches already on the device
        split = RowSplit(x[:4096], y[:4096])
        net = make_aligner(name, hp).init_net(split, torch.Generator().manual_seed(0)).to(device)
        opt = torch.optim.Adam([q for q in net.parameters() if q.requires_grad], lr=1e-3)
        p = make_aligner(name, hp).params
        bx, by = torch.randn(args.batch, d_a, device=device), torch.randn(args.batch, d_b, device=device)

        def ceiling(steps):
            for _ in range(steps):
                opt.zero_grad(set_to_none=True)
                loss = batch_loss(net(bx), by, p)
                loss.backward()
                opt.step()

        ceiling(20)  # warm-up
        steps = next(iter(results.values()))[1]
        sync()
        t = time.perf_counter()
        ceiling(steps)
        sync()
        ceil_s = time.perf_counter() - t
        ceil_rate = steps * args.batch / ceil_s
        # FLOPs per sample (an upper estimate): forward 2 per weight; backward 4 per trained weight (its
        # gradient and its input's); frozen weights have no backward, as the store rows need no gradient
        every = sum(q.numel() for q in net.parameters())
        trained = sum(q.numel() for q in net.parameters() if q.requires_grad)
        flops_per_sample = 2 * every + 4 * trained
        on_device = results.get("store, on device")
        for label, (wall, steps, busy, load_s) in results.items():
            rate, after = steps * args.batch / wall, steps * args.batch / (wall - load_s)
            rows.append((name, label, steps, wall, load_s, rate, after, after / ceil_rate, busy,
                         after * flops_per_sample / 1e12))
            if on_device and "streamed" in label:  # the ratio: streamed / rows-on-GPU, whole fits
                ratios.append((f"{name} {label}", on_device[0] / wall, on_device[3] * args.epochs / wall))
        rows.append((name, "ceiling (batches on device)", steps, ceil_s, 0.0, ceil_rate, ceil_rate, 1.0, None,
                     ceil_rate * flops_per_sample / 1e12))

    print(f"\n{card}  rows {args.n:,} ({d_a} -> {d_b}, float16 store, built/reused in {build_s:.0f} s)  "
          f"batch {args.batch}  epochs {args.epochs}  (fit time includes held-out passes and scores)")
    print(f"one pass over the stores as training reads them ({training.READ_THREADS} threads, blocks as stored): "
          f"{read_s:.2f} s, {read_bytes / read_s / 1e9:.2f} GB/s (best of 2)")
    print(f"{'adapter':<8}{'feed':<30}{'steps':>7}{'seconds':>9}{'to device':>10}{'samples/s':>12}"
          f"{'after load':>12}{'vs ceiling':>12}{'GPU busy':>10}{'TFLOP/s':>9}")
    for name, label, steps, wall, load_s, rate, after, ratio, busy, tflops in rows:
        b = f"{busy:.2f}" if busy is not None else "-"
        print(f"{name:<8}{label:<30}{steps:>7}{wall:>9.2f}{load_s:>10.2f}{rate:>12,.0f}{after:>12,.0f}{ratio:>12.2f}"
              f"{b:>10}{tflops:>9.2f}")
    for name, wait, wall in waits:
        print(f"{name}: {wait:.2f} s of {wall:.2f} s waiting for windows (reads not hidden by the steps)")
    for name, ratio, read_share in ratios:
        print(f"{name}: streamed / rows on the GPU (whole fits) {ratio:.2f}; one store pass per epoch (the "
              f"on-device run's load time x epochs) is {read_share:.2f} of the streamed fit")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"train-{args.shape_a}-{args.shape_b}-b{args.batch}.json").write_text(json.dumps(
            {"card": card, "n": args.n, "d": [d_a, d_b], "batch": args.batch, "epochs": args.epochs,
             "read_pass": {"seconds": read_s, "bytes": read_bytes},
             "rows": [dict(zip(("adapter", "feed", "steps", "seconds", "to_device_seconds", "samples_per_s",
                                "samples_per_s_after_load", "vs_ceiling_after_load", "gpu_busy", "tflops_after_load"),
                               r))
                      for r in rows],
             "streamed_vs_on_device": {n: r for n, r, _ in ratios}}, indent=2))


if __name__ == "__main__":
    main()
