"""The cross-model methods on the fast decoder, next to AC and B alone, A and B of different shapes.

Every method runs on the same items: A's private prompt (prose, --prompt-a-tokens/2..--prompt-a-tokens
tokens) and B's prompt (--prompt-tokens/2..--prompt-tokens), greedy, exactly --new-tokens new tokens
per item (random weights never stop early; speed does not depend on weight values). Each run is
timed whole: A's pass, building the message, B's prefill and decoding (the prefix methods sync the GPU
before and after the build, so that its seconds are its GPU time, not its launches).
- B alone; AC: A's last-token state at k through a fixed random map into B at j (replace);
- multi-vector AC (mv_ac) with m = 4 and 16: A's last m states at k, B's prompt with m - 1
  placeholders (pipeline.injection.communicate_rows);
- mapped KV: A's per-token states at every layer B's KV layers read (fuser.layer_sources), random
  affine maps into B's residual stream, B's own k/v projections (pipeline.evaluation.mapped_kv);
  also on the eager dynamic decoder (the path gold scoring forced before) for comparison;
- the learned fuser: a rank-64 gated map per B layer with random weights (pipeline.fuser).
The decoders are each method's default (static cache, compiled and graphed on CUDA).
  python bench/methods.py --shape-a tiny-llama --shape-b tiny-qwen                 # CPU check
  python bench/methods.py --shape-a llama-3.2-3b --shape-b llama-3.1-8b --n 64 --batch 32 \\
      --prompt-a-tokens 256 --prompt-tokens 64 --new-tokens 32 --repeat 2          # GPU
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from kv import _evaluate_bench  # noqa: E402  (bench/evaluate.py's prompts and device sync)


def main() -> None:
    bench = _evaluate_bench()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape-a", default="smollm2-135m")
    ap.add_argument("--shape-b", default="smollm2-135m")
    bench.common_options(ap, prompt_tokens=48)
    ap.add_argument("--prompt-a-tokens", type=int, default=128, help="A's longest prompt (shortest is half)")
    ap.add_argument("--rank", type=int, default=64, help="the fuser's rank")
    ap.add_argument("--only", default="", help="comma list of rows to run besides B alone and AC: mv4, mv16, "
                    "mapped, fuser, dynamic (default all)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from pipeline.architecture import architecture
    from pipeline.evaluation.kv import kv_generate
    from pipeline.evaluation.mapped_kv import LayerMaps, mapped_cache
    from pipeline.fuser import Fuser, build_net, layer_sources
    from pipeline.generation import Decoding, generate
    from pipeline.injection import (communicate, communicate_rows, placeholder_id, sender_states, token_states,
                                    with_placeholders)
    from pipeline.layers import resolve_layers
    from pipeline.models import pick_device, pick_dtype
    from pipeline.synthetic import random_model, train_tokenizer

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    cuda = device.type == "cuda"
    tokenizer = train_tokenizer(4096, bos=True)
    tokenizer.eos_token = None  # random weights: decode exactly --new-tokens for every item
    model_a = random_model(args.shape_a, dtype=dtype, device=device, seed=0)
    model_b = random_model(args.shape_b, dtype=dtype, device=device, seed=1)
    model_b.generation_config.eos_token_id = None
    arch_a, arch_b = architecture(model_a), architecture(model_b)
    k = resolve_layers([args.k], arch_a.n_layers)[0]
    j = resolve_layers([args.j], arch_b.n_layers)[0]
    items_a = bench.prompts(tokenizer, args.n, args.prompt_a_tokens, seed=1)
    items_b = bench.prompts(tokenizer, args.n, args.prompt_tokens, seed=2)
    decoding = Decoding(max_new_tokens=args.new_tokens)
    d_a, d_b = arch_a.width, arch_b.width
    g = torch.Generator(device="cpu").manual_seed(0)
    w = (torch.randn(d_a, d_b, generator=g) / d_a ** 0.5).to(device)  # stands in for a fitted aligner
    b = args.batch
    sources = layer_sources(arch_a.n_layers, arch_b.n_layers)
    maps = LayerMaps({l: s for l, s in enumerate(sources, start=1)},
                     {l: (torch.randn(d_a, d_b, generator=g) / d_a ** 0.5).to(device) for l in range(1, len(sources) + 1)},
                     {l: torch.zeros(d_b, device=device) for l in range(1, len(sources) + 1)})
    net = build_net(arch_b.n_layers, d_a, d_b, args.rank)
    with torch.no_grad():
        net["u"].normal_(0, d_a ** -0.5, generator=g)
        net["v"].normal_(0, args.rank ** -0.5, generator=g)
        net["sd"].fill_(1.0)
    fuser = Fuser(net.to(device).requires_grad_(False), {"sources": sources, "d_a": d_a, "d_b": d_b})
    hole = placeholder_id(tokenizer)

    def timed_parts(gen, a_seconds: float, build_seconds: float):
        gen.extra.update(a_seconds=a_seconds, build_seconds=build_seconds)
        return gen

    def b_alone():
        return timed_parts(generate(model_b, tokenizer, items_b, decoding, batch_size=b), 0.0, 0.0)

    def ac():
        sent = sender_states(model_a, tokenizer, items_a, k, batch_size=b)
        t0 = time.perf_counter()
        vectors = (sent.vectors.to(device) @ w).to(dtype)
        built = time.perf_counter() - t0
        return timed_parts(communicate(model_b, tokenizer, items_b, j, vectors, "replace", decoding, batch_size=b),
                           sent.seconds, built)

    def mv(m: int):
        sent = token_states(model_a, tokenizer, items_a, [k], batch_size=b, keep=device)
        t0 = time.perf_counter()
        messages = [(s[-m:].to(device) @ w).to(dtype) for s in sent.states[k]]
        prompts = [with_placeholders(p, msg.shape[0], hole) for p, msg in zip(items_b, messages)]
        built = time.perf_counter() - t0
        return timed_parts(communicate_rows(model_b, tokenizer, prompts, j, messages, "replace", decoding,
                                            batch_size=b), sent.seconds, built)

    def prefix(build, cache_kind: str = "auto"):
        def run():
            sent = token_states(model_a, tokenizer, items_a, sorted(set(sources)), batch_size=b, keep=device)
            bench.sync(device)  # A's pass is not the build's: its queued kernels finish first
            t0 = time.perf_counter()
            cache, layers = build(sent.states)
            bench.sync(device)  # the build's own GPU time, not only its launches (two syncs per run)
            built = time.perf_counter() - t0
            return timed_parts(kv_generate(model_b, tokenizer, items_b, cache, layers, decoding, batch_size=b,
                                           cache_kind=cache_kind), sent.seconds, built)
        return run

    def mapped(states):
        return mapped_cache(model_b, maps, states), maps.b_layers

    def fused(states):
        return fuser.cache(model_b, states), fuser.b_layers

    runs = [("alone", f"B alone x{b}", b_alone), ("ac", f"AC x{b} (k={k}, j={j}, replace)", ac),
            ("mv4", f"mv_ac m=4 x{b}", lambda: mv(4)), ("mv16", f"mv_ac m=16 x{b}", lambda: mv(16)),
            ("mapped", f"mapped_kv, all {arch_b.n_layers} layers x{b}", prefix(mapped)),
            ("fuser", f"fuser rank {args.rank}, all {arch_b.n_layers} layers x{b}", prefix(fused))]
    if cuda:
        runs.append(("dynamic", f"mapped_kv x{b}, dynamic decoder (before)", prefix(mapped, "dynamic")))
    only = {key for key in args.only.split(",") if key} | {"alone", "ac"}
    runs = [(name, fn) for key, name, fn in runs if not args.only or key in only]
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), {dtype}, torch {torch.__version__}; A {args.shape_a} ({arch_a.n_layers} layers) "
          f"-> B {args.shape_b} ({arch_b.n_layers}); {args.n} items, A's prompts {args.prompt_a_tokens // 2}-"
          f"{args.prompt_a_tokens} tokens ({sum(map(len, items_a))} in all), B's {args.prompt_tokens // 2}-"
          f"{args.prompt_tokens} ({sum(map(len, items_b))}), {args.new_tokens} new each", flush=True)
    print(f"{'method':<44} {'A s':>6} {'build s':>8} {'total s':>8} {'new tok/s':>10} {'x AC':>6} {'x B alone':>9} decoder",
          flush=True)
    seconds: list[float] = []  # B alone's, then AC's: each row is printed when it is measured
    with torch.no_grad():
        for name, fn in runs:
            fn()  # warm-up: the compiled and captured decoder of its layout
            best, gen = float("inf"), None
            for _ in range(args.repeat):
                bench.sync(device)
                t0 = time.perf_counter()
                out = fn()
                bench.sync(device)
                if time.perf_counter() - t0 < best:
                    best, gen = time.perf_counter() - t0, out
            seconds.append(best)
            new = sum(gen.new_tokens)
            ac_s = seconds[1] if len(seconds) > 1 else float("nan")
            print(f"{name:<44} {gen.extra['a_seconds']:>6.2f} {gen.extra['build_seconds']:>8.2f} {best:>8.2f} "
                  f"{new / best:>10.1f} {ac_s / best:>6.2f} {seconds[0] / best:>9.2f} {gen.extra.get('decoder', '')}",
                  flush=True)

if __name__ == "__main__":
    main()
