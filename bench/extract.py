"""Extraction throughput: our extractor against a plain HF loop and a bare base-model forward.

All three run over the same batches (batch x seq tokens, every text truncated to exactly seq
tokens) of the same random-weight model of a real shape, in one process, one after the other:
  hf-loop  model(..., output_hidden_states=True) with the LM head, the requested layers copied to
           CPU and saved with torch.save every batch (what research code usually does)
  bare     model.model(...) over all layers, nothing kept: the compute floor
  xmodel   extract_model into a Zarr store on local disk (pooled + last + per-token states), with
           the store's default number of shard writers (processes for large units), and with each
           count in --writers
  disk     (with --disk) the same bytes as the store, in files of its files' sizes, written with
           plain writes from as many threads as the store has writers, each file fsync'ed: the
           disk's own write rate; "page cache" is the same without fsync
Prints tokens/s, store GB/s, ratios and achieved TFLOP/s. xmodel+sync adds an os.sync() after the
run (the store's bytes on the disk, as the fsync'ed baseline's are). Example (GPU):
  python bench/extract.py --shape llama-3.2-3b --batch 32 --seq 512 --batches 24
Per-token heavy, against the disk (all tokens kept):
  python bench/extract.py --shape llama-3.2-3b --batch 32 --seq 512 --batches 32 --tokens-per-seq 512 \
      --skip-hf --disk --writers 1 --store-dir /tmp/bench-store
Under torchrun only xmodel runs (every rank writes its units into one store; the time is from a
barrier before to a barrier after), for comparison with a one-GPU run of the same arguments:
  torchrun --nproc-per-node 2 bench/extract.py --shape llama-3.2-3b --batch 32 --seq 512 --batches 64 \\
      --store-dir /tmp/bench-store
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def long_texts(n: int, chars: int) -> list[str]:
    from pipeline.data import pydoc_sentences

    prose = " ".join(pydoc_sentences())
    prose = prose * (1 + 2 * chars // max(1, len(prose)))  # some Python builds ship little pydoc prose
    return [prose[(i * 997) % (len(prose) - chars):][:chars] for i in range(n)]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def file_sizes(path: Path) -> list[int]:
    return [f.stat().st_size for f in path.rglob("*") if f.is_file()]


def write_files(directory: Path, sizes: list[int], threads: int, fsync: bool) -> float:
    """Seconds to write files of these sizes with plain writes from `threads` threads (each fsync'ed
    when asked); the files are removed after, untimed."""
    import numpy as np

    directory.mkdir(parents=True, exist_ok=True)
    data = memoryview(np.random.default_rng(0).integers(0, 256, max(sizes), dtype=np.uint8).tobytes())

    def one(i: int) -> None:
        with open(directory / str(i), "wb") as f:
            f.write(data[:sizes[i]])
            if fsync:
                f.flush()
                os.fsync(f.fileno())

    os.sync()
    t = time.perf_counter()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(one, range(len(sizes))))
    seconds = time.perf_counter() - t
    shutil.rmtree(directory)
    os.sync()
    return seconds


def flops_per_token(model, seq: int) -> float:
    cfg = model.config
    n_embed = cfg.vocab_size * cfg.hidden_size
    params = sum(p.numel() for p in model.model.parameters()) - n_embed
    return 2 * params + 2 * cfg.num_hidden_layers * seq * cfg.hidden_size  # matmuls + causal attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--layers", default="0.25,0.5,0.75,1.0")
    ap.add_argument("--tokens-per-seq", type=int, default=32)
    ap.add_argument("--unit-size", type=int, default=0, help="sequences per unit (default 8 batches)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--store-dir", default=None, help="where the store goes (default: a temp dir)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--writers", default="", help="also time xmodel with these numbers of shard writers (1: one at a time)")
    ap.add_argument("--disk", action="store_true", help="also measure the disk's write rate with the store's bytes")
    args = ap.parse_args()

    import torch

    from pipeline.config import ExtractConfig
    from pipeline.data import Corpus
    from pipeline.distributed import close_dist, init_dist, is_main
    from pipeline.extract import extract_model, tokenize
    from pipeline.layers import resolve_layers
    from pipeline.models import pick_device, pick_dtype
    from pipeline.synthetic import random_model, train_tokenizer
    from store import writer as store_writer

    dist = init_dist(args.device)
    if dist.world > 1 and not args.store_dir:
        raise SystemExit("under torchrun pass --store-dir: every rank must write into the same store")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    tokenizer = train_tokenizer(4096, bos=True)
    model = random_model(args.shape, tokenizer, dtype=dtype, device=device)
    n = args.batch * args.batches
    chars = args.seq * 4
    while True:  # lengthen the texts until every one fills --seq tokens
        corpus = Corpus(texts=long_texts(n, chars), index=list(range(n)), source="bench")
        tok = tokenize(tokenizer, corpus.texts, args.seq)
        if (tok.lengths == args.seq).all():
            break
        chars = int(chars * 1.25)  # small steps: tokenizing far more text than is kept costs time
    requested = [float(x) if "." in x else int(x) for x in args.layers.split(",")]
    layers = resolve_layers(requested, model.config.num_hidden_layers)
    ids = torch.from_numpy(__import__("numpy").stack(tok.ids)).long()
    batches = [ids[i:i + args.batch] for i in range(0, n, args.batch)]
    tokens = n * args.seq
    work = Path(args.store_dir or tempfile.mkdtemp(prefix="xmodel-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    def timed(fn) -> float:
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t

    def bare():
        with torch.inference_mode():
            for b in batches:
                x = b.to(device, non_blocking=True)
                model.model(input_ids=x, attention_mask=torch.ones_like(x), use_cache=False)

    def hf_loop():
        out_dir = work / "hf"
        out_dir.mkdir(exist_ok=True)
        with torch.inference_mode():
            for i, b in enumerate(batches):
                x = b.to(device)
                out = model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True)
                torch.save({l: out.hidden_states[l].cpu() for l in layers}, out_dir / f"{i}.pt")

    phases: dict[str, dict] = {}
    runs: list[Path] = []
    default_threads = store_writer.WRITERS
    sizes: dict[str, list[int]] = {}

    def ours(name: str, threads: int):
        def run():
            store_writer.WRITERS = threads
            cfg = ExtractConfig(layers=requested, max_tokens=args.seq, tokens_per_seq=args.tokens_per_seq,
                                unit_size=args.unit_size or 8 * args.batch, batch_tokens=args.batch * args.seq)
            runs.append(work / f"store-{len(runs)}.zarr")  # a fresh path: deleting the last store is not timed
            phases[name] = extract_model(model, tokenizer, {"model_id": args.shape, "revision": None, "model_sha": "random"},
                                         corpus, cfg, runs[-1], dist, quiet=True).phases
        return run

    def cleared(fn):
        """Before a store run (untimed): the previous stores removed, dirty pages flushed."""
        for old in runs:
            if is_main():
                shutil.rmtree(old, ignore_errors=True)
        os.sync()
        return fn

    with torch.inference_mode():  # warm-up: kernels, allocator
        x = batches[0].to(device)
        model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True)
    stores = {"xmodel": default_threads} | {f"xmodel w{k}": int(k) for k in args.writers.split(",") if k}
    methods = {"bare": bare} | {name: ours(name, k) for name, k in stores.items()} | \
        ({} if args.skip_hf else {"hf-loop": hf_loop})
    if dist.world > 1:  # the baselines are one-GPU loops: compare with a one-GPU run instead
        methods = {name: ours(name, k) for name, k in stores.items()}
    best: dict[str, float] = {}
    for _ in range(args.repeat):  # interleaved repeats, best of each: order and warm-up effects cancel
        for name, fn in methods.items():
            fn = cleared(fn) if name in stores else fn
            dist.barrier()
            seconds = timed(fn)
            dist.barrier()
            if name in stores and is_main():
                t = time.perf_counter()
                os.sync()  # what the page cache still held of this store
                seconds_synced = seconds + time.perf_counter() - t
                best[f"{name}+sync"] = min(best.get(f"{name}+sync", float("inf")), seconds_synced)
                sizes[name] = file_sizes(runs[-1])
            best[name] = min(best.get(name, float("inf")), seconds)
    close_dist(dist)
    if not is_main():
        return
    for old in runs:
        shutil.rmtree(old, ignore_errors=True)
    stored = sum(sizes.get("xmodel", [0]))  # bytes of one store (the same for every thread count)
    if args.disk and dist.world == 1:
        for _ in range(args.repeat):
            for name, fsync in (("disk", True), ("page cache", False)):
                best[name] = min(best.get(name, float("inf")),
                                 write_files(work / "disk", sizes["xmodel"], default_threads, fsync))
    results = {name: tokens / s for name, s in best.items()}
    gbps = {name: stored / s / 1e9 for name, s in best.items() if name not in ("bare", "hf-loop")}
    fpt = flops_per_token(model, args.seq)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{args.shape}  {card} x {dist.world}  {dtype}  batch {args.batch} x {args.seq}  {n} seqs  layers {layers}  "
          f"tokens/seq kept {args.tokens_per_seq}  store {stored / 1e9:.2f} GB in {len(sizes.get('xmodel', []))} files  "
          f"shard writers {default_threads} (default)")
    print(f"{'method':<18}{'tokens/s':>12}{'TFLOP/s':>10}{'vs bare':>9}{'vs hf-loop':>12}{'GB/s':>8}{'vs disk':>9}")
    for name, rate in results.items():
        hf, disk = results.get("hf-loop"), gbps.get("disk")
        g = gbps.get(name)
        tflops = f"{rate * fpt / 1e12:>10.2f}" if name not in ("disk", "page cache") else f"{'-':>10}"
        print(f"{name:<18}{rate:>12,.0f}{tflops}{rate / results.get('bare', float('nan')):>9.2f}"
              f"{(rate / hf if hf else float('nan')):>12.2f}{(g or float('nan')):>8.2f}"
              f"{(g / disk if g and disk else float('nan')):>9.2f}")
    for name, ph in phases.items():
        print(f"{name} phases (s, last run): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()))
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"extract-{args.shape}-b{args.batch}x{args.seq}-t{args.tokens_per_seq}-g{dist.world}.json"
             ).write_text(json.dumps(
            {"shape": args.shape, "card": card, "dtype": str(dtype), "batch": args.batch, "seq": args.seq,
             "tokens": tokens, "gpus": dist.world, "layers": layers, "tokens_per_seq": args.tokens_per_seq, "tokens_per_s": results,
             "store_bytes": stored, "gb_per_s": gbps, "phases": phases, "write_threads": default_threads,
             "flops_per_token": fpt}, indent=2))
    if not args.store_dir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
