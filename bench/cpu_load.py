"""CPU evaluation under load: a fixed evaluation slice, idle and with a busy loop pinned to one core.

The slice: A's partial pass to k and B's batched AC generation (the path every evaluate stage
takes), SmolLM2-135M shapes with random weights, float32, fixed prompts. Each measurement runs in a
fresh process, because the OpenMP policy is read when torch loads. Policies:
- old: torch's defaults (one thread per core, OpenMP's default spin-then-sleep wait);
- new: what the CLI applies (pipeline/threads.py);
- others given with --extra NAME=ENV,ENV (e.g. "passive-1=OMP_WAIT_POLICY=PASSIVE,OMP_NUM_THREADS=1").
"loaded" runs `taskset -c CORE python -c 'while True: pass'` beside the slice for its whole run.
Runs are interleaved (policy by policy, idle then loaded, --repeat times) and the fastest of each
kept, so drift in other load on a shared machine hits every cell alike. Prints seconds, the
loaded/idle ratio per policy and each cell against old idle. Example:
  python bench/cpu_load.py --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OMP_KEYS = ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")


def worker(args) -> None:
    """One timed slice in this process; prints a JSON line."""
    if args.apply:
        from pipeline.threads import apply

        apply()
    import importlib.util

    import torch

    from pipeline.generation import Decoding
    from pipeline.injection import communicate, sender_states
    from pipeline.synthetic import random_model, train_tokenizer

    spec = importlib.util.spec_from_file_location("bench_evaluate", ROOT / "bench" / "evaluate.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tokenizer = train_tokenizer(4096, bos=True)
    tokenizer.eos_token = None
    model_a = random_model(args.shape, seed=0)
    model_b = random_model(args.shape, seed=1)
    model_b.generation_config.eos_token_id = None
    items = bench.prompts(tokenizer, args.n, args.prompt_tokens)
    decoding = Decoding(max_new_tokens=args.new_tokens)
    k = j = model_a.config.num_hidden_layers * 3 // 4

    def slice_():
        sent = sender_states(model_a, tokenizer, items, k, batch_size=args.batch)
        return communicate(model_b, tokenizer, items, j, sent.vectors, "replace", decoding, batch_size=args.batch)

    with torch.no_grad():
        slice_()  # warm-up
        t0 = time.perf_counter()
        gen = slice_()
        seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads(), "new_tokens": sum(gen.new_tokens),
                      "wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)")}))


def measure(policy_env: dict[str, str], apply: bool, loaded: bool, args) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in OMP_KEYS}
    env.update(policy_env, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, __file__, "--worker", "--n", str(args.n), "--batch", str(args.batch),
           "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--shape", args.shape]
    busy = None
    if loaded:
        busy = subprocess.Popen(["taskset", "-c", str(args.core), sys.executable, "-c", "while True: pass"])
    try:
        out = subprocess.run(cmd + (["--apply"] if apply else []), env=env, capture_output=True, text=True,
                             check=True, cwd=ROOT)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--apply", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=96)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--core", type=int, default=0, help="the core the busy loop is pinned to")
    ap.add_argument("--extra", action="append", default=[], metavar="NAME=K=V,K=V", help="another policy to measure")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return

    policies: dict[str, tuple[dict[str, str], bool]] = {"old": ({}, False), "new": ({}, True)}
    for item in args.extra:
        name, _, spec = item.partition("=")
        policies[name] = (dict(kv.split("=", 1) for kv in spec.split(",") if kv), False)
    best: dict[tuple[str, bool], dict] = {}
    for _ in range(args.repeat):
        for name, (env, apply) in policies.items():
            for loaded in (False, True):
                got = measure(env, apply, loaded, args)
                print(f"{name} {'loaded' if loaded else 'idle'}: {got['seconds']:.2f} s", file=sys.stderr, flush=True)
                key = (name, loaded)
                if key not in best or got["seconds"] < best[key]["seconds"]:
                    best[key] = got

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{cores} cores, load average {load:.1f} at the end (other processes share this machine: compare "
          f"ratios); slice: AC, {args.shape} shape, {args.n} items, batch {args.batch}, prompts "
          f"{args.prompt_tokens // 2}-{args.prompt_tokens}, {args.new_tokens} new; fastest of {args.repeat}")
    base = best[("old", False)]["seconds"]
    print(f"{'policy':<12} {'threads':>7} {'wait':>10} {'idle s':>8} {'loaded s':>9} {'loaded/idle':>12} "
          f"{'idle vs old idle':>17} {'loaded vs old idle':>19}")
    for name in policies:
        idle, loaded = best[(name, False)], best[(name, True)]
        print(f"{name:<12} {idle['threads']:>7} {idle['wait_policy']:>10} {idle['seconds']:>8.2f} "
              f"{loaded['seconds']:>9.2f} {loaded['seconds'] / idle['seconds']:>11.2f}x "
              f"{idle['seconds'] / base:>16.2f}x {loaded['seconds'] / base:>18.2f}x")


if __name__ == "__main__":
    main()
