"""Activation-communication generation throughput: batched (left padding, one prefill with the
graft, KV-cache decoding) against the same code one item at a time, and plain batched generation
of B without a graft (the graft's own cost).

Both models have random weights of real shapes (speed does not depend on weight values); the
prompts are prose of varied lengths. Prints tokens/s and ratios, and whether the batched tokens
equal the one-at-a-time tokens (greedy). Examples:
  python bench/evaluate.py                                            # CPU: SmolLM2-135M shapes
  python bench/evaluate.py --shape-a llama-3.2-3b --shape-b llama-3.1-8b --n 64 --batch 32 \\
      --prompt-tokens 256 --new-tokens 64                             # GPU: the paper's pair
"""

from __future__ import annotations

import argparse
import time


def prompts(tokenizer, n: int, max_tokens: int, seed: int = 0) -> list[list[int]]:
    """n prompts of max_tokens/2..max_tokens tokens cut from pydoc prose."""
    import random

    from pipeline.data import pydoc_sentences

    text = " ".join(pydoc_sentences())
    ids = tokenizer(text[:200_000])["input_ids"]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(max(1, max_tokens // 2), max_tokens)
        start = rng.randrange(0, len(ids) - length)
        out.append(ids[start:start + length])
    return out


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape-a", default="smollm2-135m")
    ap.add_argument("--shape-b", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=16, help="items")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=96, help="longest prompt (shortest is half)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--k", type=float, default=0.75, help="A's layer (relative depth)")
    ap.add_argument("--j", type=float, default=0.75, help="B's layer (relative depth)")
    ap.add_argument("--mode", default="replace")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per method; the fastest is kept")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from pipeline.evaluation.methods import Compute
    from pipeline.generation import Decoding, generate
    from pipeline.injection import communicate, sender_states
    from pipeline.layers import num_layers, resolve_layers
    from pipeline.models import pick_device, pick_dtype
    from pipeline.synthetic import random_model, train_tokenizer

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    tokenizer = train_tokenizer(4096, bos=True)
    tokenizer.eos_token = None  # random weights: decode exactly --new-tokens for every item
    model_a = random_model(args.shape_a, dtype=dtype, device=device, seed=0)
    model_b = random_model(args.shape_b, dtype=dtype, device=device, seed=1)
    model_b.generation_config.eos_token_id = None
    k = resolve_layers([args.k], num_layers(model_a))[0]
    j = resolve_layers([args.j], num_layers(model_b))[0]
    items = prompts(tokenizer, args.n, args.prompt_tokens)
    decoding = Decoding(max_new_tokens=args.new_tokens)
    d_a, d_b = model_a.config.hidden_size, model_b.config.hidden_size
    # a fixed random map stands in for a fitted aligner when the widths differ
    w = torch.randn(d_b, d_a, device=device, dtype=torch.float32) / d_a ** 0.5

    def ac(batch: int):
        sent = sender_states(model_a, tokenizer, items, k, batch_size=batch)
        vectors = (sent.vectors.to(device) @ w.T).to(dtype) if d_a != d_b else sent.vectors
        gen = communicate(model_b, tokenizer, items, j, vectors, args.mode, decoding, batch_size=batch)
        gen.extra["a_seconds"] = sent.seconds
        work = Compute()  # the same FLOP estimate the evaluation reports (matmuls: 2 x parameters)
        work.add_run(model_a, "a", sent, blocks=k)
        work.add_run(model_b, "b", gen)
        gen.extra["flops"] = work.flops
        return gen

    def plain(batch: int):
        gen = generate(model_b, tokenizer, items, decoding, batch_size=batch)
        gen.extra["a_seconds"] = 0.0
        work = Compute()
        work.add_run(model_b, "b", gen)
        gen.extra["flops"] = work.flops
        return gen

    runs = [("AC, one at a time", lambda: ac(1)), (f"AC, batched x{args.batch}", lambda: ac(args.batch)),
            (f"B alone (no graft), batched x{args.batch}", lambda: plain(args.batch))]
    with torch.no_grad():
        ac(args.batch)  # warm-up (allocator, kernels)
        results = {}
        for name, fn in runs:
            best, gen = float("inf"), None
            for _ in range(args.repeat):
                sync(device)
                t0 = time.perf_counter()
                out = fn()
                sync(device)
                if time.perf_counter() - t0 < best:
                    best, gen = time.perf_counter() - t0, out
            results[name] = (best, gen)

    prompt_tokens = sum(len(p) for p in items)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), {dtype}; "
          f"A {args.shape_a} (k={k}) -> B {args.shape_b} (j={j}), f={args.mode}; {args.n} items, prompts "
          f"{args.prompt_tokens // 2}-{args.prompt_tokens} tokens ({prompt_tokens} in all), {args.new_tokens} new each")
    base = results[runs[0][0]][0]
    print(f"{'method':<40} {'A pass s':>9} {'B gen s':>9} {'total s':>9} {'new tok/s':>10} {'all tok/s':>10} "
          f"{'speed-up':>9}{'TFLOP/s':>9}")
    for name, (sec, gen) in results.items():
        new, a_s = sum(gen.new_tokens), gen.extra["a_seconds"]
        print(f"{name:<40} {a_s:>9.2f} {gen.seconds:>9.2f} {sec:>9.2f} {new / sec:>10.1f} "
              f"{(new + prompt_tokens) / sec:>10.1f} {base / sec:>8.2f}x{gen.extra['flops'] / sec / 1e12:>9.2f}")
    same = results[runs[0][0]][1].tokens == results[runs[1][0]][1].tokens
    agree = sum(a == b for a, b in zip(results[runs[0][0]][1].tokens, results[runs[1][0]][1].tokens))
    print(f"batched tokens equal one-at-a-time tokens: {same} ({agree}/{args.n} items identical)")


if __name__ == "__main__":
    main()
