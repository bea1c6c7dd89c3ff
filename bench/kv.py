"""Key-value communication throughput next to activation communication, with A = B (one model).

Every method runs on the same items: A's private prompt (prose, --prompt-a-tokens/2..--prompt-a-tokens
tokens) and B's prompt (--prompt-tokens/2..--prompt-tokens), greedy, exactly --new-tokens new tokens
per item (random weights never stop early; speed does not depend on weight values):
- AC batched: A's partial pass to k, B's prefill with the graft at j, B's decoding
  (pipeline.injection.communicate, the default decoder: static cache, CUDA graphs on CUDA);
- AC batched on the eager dynamic cache, on CUDA only;
- KV batched, every layer shared: A's prefill cache (pipeline.evaluation.kv.a_cache), then B
  reading it (kv_generate, its default decoder: static cache, unshared layers without the prefix,
  compiled and graphed on CUDA); and with --top of the layers shared (a fixed middle band: the
  generation cost does not depend on which layers the top-m rule picks); each also on the eager
  dynamic decoder (the previous path), on CUDA only;
- B on prompt_a + prompt_b (the concatenated prompt KV replaces), and B alone.
Prints tokens/s, the ratio of each method's time to AC's, A's cache memory, and whether KV with
every layer shared produced the concatenated prompt's tokens (it should, to rounding).
  python bench/kv.py --shape tiny-llama                                   # CPU check
  python bench/kv.py --shape llama-3.2-3b --n 64 --batch 32 --prompt-a-tokens 256 \\
      --prompt-tokens 64 --new-tokens 32                                  # GPU
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path


def _evaluate_bench():
    """bench/evaluate.py as a module (its prompt maker and device sync), without a package."""
    spec = importlib.util.spec_from_file_location("bench_evaluate", Path(__file__).with_name("evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="smollm2-135m", help="a pipeline.synthetic.SHAPES name (tiny-llama for a quick check)")
    bench = _evaluate_bench()
    bench.common_options(ap, prompt_tokens=48)
    ap.add_argument("--prompt-a-tokens", type=int, default=128, help="A's longest prompt (shortest is half)")
    ap.add_argument("--top", type=float, default=0.3, help="fraction of layers in the partial-sharing run")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from pipeline.evaluation import kv
    from pipeline.generation import Decoding, generate
    from pipeline.injection import communicate, inject, sender_states
    from pipeline.architecture import architecture
    from pipeline.layers import resolve_layers
    from pipeline.models import pick_device, pick_dtype
    from pipeline.synthetic import random_model, train_tokenizer

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    tokenizer = train_tokenizer(4096, bos=True)
    tokenizer.eos_token = None  # random weights: decode exactly --new-tokens for every item
    model = random_model(args.shape, dtype=dtype, device=device, seed=0)
    model.generation_config.eos_token_id = None
    n_layers = architecture(model).n_layers
    k = resolve_layers([args.k], n_layers)[0]
    j = resolve_layers([args.j], n_layers)[0]
    m = kv.top_count(args.top, n_layers)
    band = list(range((n_layers - m) // 2 + 1, (n_layers - m) // 2 + m + 1))  # the middle m blocks
    items_a = bench.prompts(tokenizer, args.n, args.prompt_a_tokens, seed=1)
    items_b = bench.prompts(tokenizer, args.n, args.prompt_tokens, seed=2)
    decoding = Decoding(max_new_tokens=args.new_tokens)
    b = args.batch

    def ac(cache: str = "auto"):
        sent = sender_states(model, tokenizer, items_a, k, batch_size=b)
        if cache == "auto":
            gen = communicate(model, tokenizer, items_b, j, sent.vectors, "replace", decoding, batch_size=b)
        else:  # what communicate() does, on the decoder KV communication uses
            gen = generate(model, tokenizer, items_b, decoding, batch_size=b, cache=cache,
                           prefill_hook=lambda rows: inject(model, j, sent.vectors[rows], "replace"))
        gen.extra["a_seconds"] = sent.seconds
        return gen

    def kv_run(layers, cache_kind: str = "auto"):
        cache = kv.a_cache(model, tokenizer, items_a, batch_size=b)
        gen = kv.kv_generate(model, tokenizer, items_b, cache, layers, decoding, batch_size=b, cache_kind=cache_kind)
        gen.extra.update(a_seconds=cache.seconds, cache_bytes=cache.bytes)
        return gen

    def plain(prompts):
        gen = generate(model, tokenizer, prompts, decoding, batch_size=b)
        gen.extra["a_seconds"] = 0.0
        return gen

    runs = [(f"AC batched x{b}", ac),
            (f"KV batched x{b}, all {n_layers} layers", lambda: kv_run(list(range(1, n_layers + 1)))),
            (f"KV batched x{b}, {m} middle layers", lambda: kv_run(band)),
            (f"B on prompt_a + prompt_b, x{b}", lambda: plain([a + p for a, p in zip(items_a, items_b)])),
            (f"B alone, x{b}", lambda: plain(items_b))]
    if cuda:
        runs[3:3] = [(f"KV batched x{b}, all {n_layers} layers, dynamic cache (old)",
                      lambda: kv_run(list(range(1, n_layers + 1)), "dynamic")),
                     (f"KV batched x{b}, {m} middle layers, dynamic cache (old)", lambda: kv_run(band, "dynamic"))]
        runs.insert(1, (f"AC batched x{b}, dynamic cache", lambda: ac("dynamic")))
    with torch.no_grad():
        ac()  # warm-up (allocator, kernels, the compiled and captured decoder of each layout)
        kv_run(list(range(1, n_layers + 1)))
        kv_run(band)
        results = {}
        peaks = {}
        for name, fn in runs:
            best, gen = float("inf"), None
            for _ in range(args.repeat):
                bench.sync(device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                out = fn()
                bench.sync(device)
                if time.perf_counter() - t0 < best:
                    best, gen = time.perf_counter() - t0, out
                peaks[name] = torch.cuda.max_memory_allocated(device) if cuda else 0
            results[name] = (best, gen)

    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), {dtype}, torch {torch.__version__}; A = B = {args.shape} ({n_layers} layers), "
          f"AC k={k} j={j} replace; {args.n} items, A's prompts {args.prompt_a_tokens // 2}-{args.prompt_a_tokens} "
          f"tokens ({sum(map(len, items_a))} in all), B's {args.prompt_tokens // 2}-{args.prompt_tokens} "
          f"({sum(map(len, items_b))}), {args.new_tokens} new each")
    ours = results[runs[0][0]][0]
    print(f"{'method':<44} {'A s':>6} {'total s':>8} {'new tok/s':>10} {'x AC time':>9} {'peak GB':>8} decoder")
    for name, (sec, gen) in results.items():
        new = sum(gen.new_tokens)
        print(f"{name:<44} {gen.extra['a_seconds']:>6.2f} {sec:>8.2f} {new / sec:>10.1f} {sec / ours:>8.2f}x "
              f"{peaks[name] / 1e9:>8.2f} {gen.extra.get('decoder', '')}")
    kv_all = results[runs[1 + cuda][0]][1]
    print(f"A's cache (all layers, {args.n} items): {kv_all.extra['cache_bytes'] / 1e6:.1f} MB; "
          f"KV all layers / AC time: {results[runs[1 + cuda][0]][0] / ours:.2f}")
    sky = results[f"B on prompt_a + prompt_b, x{b}"][1].tokens
    same = sum(x == y for x, y in zip(kv_all.tokens, sky))
    print(f"KV all layers vs B on the concatenated prompt: {same}/{args.n} items identical")
    for name in results:
        if name.startswith("KV"):
            print(f"{name}: {results[runs[0][0]][0] / results[name][0]:.2f} x AC's new tok/s")
    if cuda:
        for fast, old in ((runs[2][0], runs[4][0]), (runs[3][0], runs[5][0])):
            same = sum(x == y for x, y in zip(results[fast][1].tokens, results[old][1].tokens))
            print(f"{fast} vs its dynamic-cache run: {same}/{args.n} items identical")


if __name__ == "__main__":
    main()
