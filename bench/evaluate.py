"""Activation-communication generation throughput against its limits and what a user would write.

Methods, all on the same prompts (prose, varied lengths) and random-weight models of real shapes
(speed does not depend on weight values), greedy, exactly --new-tokens new tokens per item (no EOS):
- AC batched: A's partial pass to k, B's prefill with the graft at j, then B's decoding on the
  default path (static cache; CUDA-graph steps on CUDA);
- AC batched on the eager dynamic cache, with the static cache but without graphs, without
  compiling the captured step, and (pipeline/fastpath.py) without fused q/k/v and gate/up products
  and packed passes (the path before them) or without packed passes only (on CUDA), to show where
  the speed comes from;
- AC one at a time (the reference for agreement), B alone batched (the graft's own cost);
- HF `generate` on B alone, batched the same way: its dynamic cache; its static cache as users get
  it (auto-compile on: the decoding step under torch.compile, mode "reduce-overhead"); the static
  cache with `model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)`
  (HF's documented recipe; its own auto-compile then off; the cache allocated before the compiled
  prefill, see forward_cache); and the static cache uncompiled. Each
  is run with one new token too, so its per-step time is (t(new) - t(1)) / (batches x (new - 1)).
  The static runs pass `max_cache_len` (longest prompt + new tokens, HF's own way to size one cache
  for calls of different lengths): without it every length batch gets its own cache length, and
  the compiled step recompiled and then crashed in SDPA on the second batch (issue 21). The call
  exactly as a user writes it (no max_cache_len) is run too, its failure reported, not fatal.
Prints the memory-bandwidth floor of one decoding step (B's weights read once per step), the limit
of the whole AC run (A's and B's prefill at the bf16 matmul rate measured in the run, plus every
decoding step at the bandwidth floor) and the fraction of it each run reaches, our ratio to every
baseline and to the strongest HF baseline that ran (per step and end to end), per-step times, and
how often batched tokens equal one-at-a-time tokens.
  python bench/evaluate.py                                            # CPU: SmolLM2-135M shapes
  python bench/evaluate.py --shape-a llama-3.2-3b --shape-b llama-3.1-8b --n 64 --batch 32 \\
      --prompt-tokens 256 --new-tokens 64 --repeat 2 --profile --hf-log hf.log  # GPU: the paper's pair
"""

from __future__ import annotations

import argparse
import time


HF_DYNAMIC = "HF generate, dynamic cache"
HF_STATIC = "HF generate, static cache, auto-compile (default)"
HF_FORWARD = "HF generate, static cache, forward compiled"
HF_EAGER = "HF generate, static cache, not compiled"
HF_AS_CALLED = "HF generate, static cache, default, per-call cache length"


def attempt(name: str, fn, log: str = "") -> dict[str, str]:
    """Runs fn; {} when it works, else {name: the error's last line} (the traceback appended to log)."""
    import traceback

    try:
        fn()
        return {}
    except Exception as e:  # a baseline that fails is reported, not fatal to the bench
        if log:
            with open(log, "a") as f:
                f.write(f"== {name}\n{traceback.format_exc()}\n")
        return {name: f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


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


def copy_bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy (read + write), the practical ceiling of a decoding step."""
    import torch

    if device.type != "cuda":
        return 0.0
    a = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    sync(device)
    return 2 * a.numel() * 10 / (time.perf_counter() - t0)


def matmul_rate(device) -> float:
    """FLOP/s of a bf16 8192^3 matrix product (random operands), the prefill's ceiling."""
    import torch

    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    return 2 * 8192 ** 3 * 10 / (time.perf_counter() - t0)


def consistency(model, items, tokens, device, count: int = 8) -> tuple[int, int, float]:
    """Greedy tokens checked against a cache-free forward over prompt + the tokens before them
    (teacher-forced, so each step is judged alone): (steps whose token is that forward's argmax,
    steps, largest logit gap to the argmax in units of the logits' std). Valid with random weights,
    where near-ties make batched and one-at-a-time tokens part early."""
    import torch

    hits = total = 0
    worst = 0.0
    for p, t in list(zip(items, tokens))[:count]:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + t], device=device), use_cache=False).logits[0].float()
        logits = logits[len(p) - 1:len(p) + len(t) - 1]
        best = logits.max(-1).values
        chosen = logits.gather(1, torch.tensor(t, device=device)[:, None])[:, 0]
        hits += int((chosen == best).sum())
        total += len(t)
        worst = max(worst, float(((best - chosen) / logits.std(-1)).max()))
    return hits, total, worst


def agreement(x: list[list[int]], y: list[list[int]]) -> tuple[int, float]:
    """(items identical, fraction of token positions equal)."""
    same = sum(a == b for a, b in zip(x, y))
    total = sum(max(len(a), len(b)) for a, b in zip(x, y))
    equal = sum(p == q for a, b in zip(x, y) for p, q in zip(a, b))
    return same, equal / max(1, total)


def common_options(ap, prompt_tokens: int = 96) -> None:
    """The options every generation bench takes (items, batch, lengths, layers, device, repeats)."""
    ap.add_argument("--n", type=int, default=16, help="items")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=prompt_tokens, help="(B's) longest prompt (shortest is half)")
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--k", type=float, default=0.75, help="A's layer for AC (relative depth)")
    ap.add_argument("--j", type=float, default=0.75, help="B's layer for AC (relative depth)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per method; the fastest is kept")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape-a", default="smollm2-135m")
    ap.add_argument("--shape-b", default="smollm2-135m")
    common_options(ap)
    ap.add_argument("--mode", default="replace")
    ap.add_argument("--no-hf", action="store_true", help="skip the HF generate baselines")
    ap.add_argument("--hf", default="dynamic,static,forward,eager",
                    help="which HF baselines (dynamic, static = auto-compile, forward = compiled forward, eager)")
    ap.add_argument("--hf-log", default="", help="file for the traceback of an HF baseline that fails")
    ap.add_argument("--hf-forward", action="store_true", help="the compiled-forward HF baseline on the CPU too")
    ap.add_argument("--profile", action="store_true", help="torch.profiler summary of one AC batched run")
    ap.add_argument("--quick", action="store_true",
                    help="only AC batched (with and without the fast blocks), B alone and the HF baselines")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import pipeline.fastpath as fastpath
    import pipeline.generation as generation
    from pipeline.evaluation.compute import Compute
    from pipeline.generation import Decoding, generate, left_pad, length_batches
    from pipeline.injection import inject, sender_states
    from pipeline.architecture import architecture
    from pipeline.layers import resolve_layers
    from pipeline.models import pick_device, pick_dtype
    from pipeline.synthetic import random_model, train_tokenizer

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    tokenizer = train_tokenizer(4096, bos=True)
    tokenizer.eos_token = None  # random weights: decode exactly --new-tokens for every item
    model_a = random_model(args.shape_a, dtype=dtype, device=device, seed=0)
    model_b = random_model(args.shape_b, dtype=dtype, device=device, seed=1)
    model_b.generation_config.eos_token_id = None
    k = resolve_layers([args.k], architecture(model_a).n_layers)[0]
    j = resolve_layers([args.j], architecture(model_b).n_layers)[0]
    items = prompts(tokenizer, args.n, args.prompt_tokens)
    decoding = Decoding(max_new_tokens=args.new_tokens)
    d_a, d_b = model_a.config.hidden_size, model_b.config.hidden_size
    # a fixed random map stands in for a fitted aligner when the widths differ
    w = torch.randn(d_b, d_a, device=device, dtype=torch.float32) / d_a ** 0.5
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def ac(batch: int, cache: str = "auto", graphs: bool = True, compiled: bool = True, fused: bool = True,
           packed: bool = True):
        generation.CUDA_GRAPHS, generation.COMPILE = graphs, compiled
        fastpath.FUSED, fastpath.PACKED = fused, packed
        try:
            sent = sender_states(model_a, tokenizer, items, k, batch_size=batch)
            vectors = (sent.vectors.to(device) @ w.T).to(dtype) if d_a != d_b else sent.vectors
            # what communicate() does, with the decoder chosen here
            gen = generate(model_b, tokenizer, items, decoding, batch_size=batch, cache=cache,
                           prefill_hook=lambda rows: inject(model_b, j, vectors[rows], args.mode))
        finally:
            generation.CUDA_GRAPHS, generation.COMPILE = True, compile_default
            fastpath.FUSED, fastpath.PACKED = fast_default
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

    longest = max(len(p) for p in items)
    caches: dict[int, object] = {}

    def forward_cache(rows: int):
        """One StaticCache per batch size, allocated eagerly and reset for each call: with the prefill
        under torch.compile too, a cache HF allocates lazily inside the compiled graph becomes one of
        its CUDA-graph outputs, overwritten by the next call (RuntimeError in generate)."""
        from transformers import StaticCache

        if rows not in caches:
            cfg = model_b.config
            caches[rows] = StaticCache(config=cfg, max_cache_len=longest + args.new_tokens)
            caches[rows].early_initialization(batch_size=rows, num_heads=cfg.num_key_value_heads,
                                              head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                                              dtype=dtype, device=device)
        caches[rows].reset()
        return caches[rows]

    def hf(batch: int, cache: str | None, new: int, how: str = "auto", sized: bool = True):
        """HF generate on B alone: the same length batches, left-padded the same way. how: "auto"
        (HF's auto-compile of the static-cache step, its default), "off", or "forward" (model.forward
        under torch.compile(mode="reduce-overhead", fullgraph=True), HF's auto-compile off). sized:
        the static cache sized once for every call (max_cache_len) instead of per call."""
        tokens: list[list[int]] = [[] for _ in items]
        kwargs = {"max_cache_len": longest + args.new_tokens} if cache == "static" and sized else {}
        forward = model_b.forward
        if how == "forward":
            if not hasattr(model_b, "_bench_compiled_forward"):
                model_b._bench_compiled_forward = torch.compile(forward, mode="reduce-overhead", fullgraph=True)
            model_b.forward = model_b._bench_compiled_forward
        start = time.perf_counter()
        try:
            for rows in length_batches([len(p) for p in items], batch):
                ids, mask, _ = left_pad([items[i] for i in rows], pad_id, device)
                if how == "forward":  # the cache made before the compiled prefill (HF's own would be made inside it)
                    kwargs = {"cache": forward_cache(len(rows))}
                out = model_b.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                       do_sample=False, pad_token_id=pad_id,
                                       cache_implementation=None if how == "forward" else cache,
                                       disable_compile=how != "auto", **kwargs)
                for r, i in enumerate(rows):
                    tokens[i] = out[r, ids.shape[1]:].tolist()
        finally:
            model_b.forward = forward
        return generation.Generation(tokens=tokens, texts=[], prompt_tokens=[len(p) for p in items],
                                     seconds=time.perf_counter() - start, extra={"a_seconds": 0.0, "flops": 0.0})

    compile_default = generation.COMPILE
    fast_default = fastpath.FUSED, fastpath.PACKED
    b = args.batch
    cuda = device.type == "cuda"
    runs = [("AC, one at a time", lambda: ac(1)),
            (f"AC, batched x{b}", lambda: ac(b)),
            (f"AC, batched x{b}, dynamic cache (old)", lambda: ac(b, cache="dynamic")),
            (f"B alone (no graft), batched x{b}", lambda: plain(b))]
    if cuda:
        runs[2:2] = [(f"AC, batched x{b}, fused, not packed", lambda: ac(b, packed=False)),
                     (f"AC, batched x{b}, not fused, not packed (before)", lambda: ac(b, fused=False, packed=False)),
                     (f"AC, batched x{b}, graphs, not compiled", lambda: ac(b, compiled=False)),
                     (f"AC, batched x{b}, static, no graphs", lambda: ac(b, graphs=False))]
    if args.quick:
        runs = [r for r in runs if "one at a time" not in r[0] and "graphs" not in r[0] and "dynamic" not in r[0]]
    hf_runs = [(HF_DYNAMIC, None, "auto"), (HF_STATIC, "static", "auto")]
    if cuda or args.hf_forward:  # HF compiles only on accelerators; on the CPU its static-cache run is uncompiled
        hf_runs += [(HF_FORWARD, "static", "forward"), (HF_EAGER, "static", "off")]
    kinds = {"dynamic": HF_DYNAMIC, "static": HF_STATIC, "forward": HF_FORWARD, "eager": HF_EAGER}
    wanted = {kinds[k.strip()] for k in args.hf.split(",") if k.strip()}
    hf_runs = [r for r in hf_runs if r[0] in wanted]
    if not args.no_hf:
        for label, cache, how in hf_runs:
            runs += [(f"{label}, x{b}", lambda c=cache, h=how: hf(b, c, args.new_tokens, h)),
                     (f"{label}, x{b}, 1 new token", lambda c=cache, h=how: hf(b, c, 1, h))]
    failed: dict[str, str] = {}
    with torch.no_grad():
        ac(b)  # warm-up (allocator, kernels)
        if not args.no_hf:
            for label, cache, how in hf_runs:  # compiled and captured outside the timed runs
                if how != "off" and cache == "static":
                    failed.update(attempt(label, lambda: hf(b, cache, 2, how), args.hf_log))
        results = {}
        for name, fn in runs:
            best, gen = float("inf"), None
            for _ in range(args.repeat):
                sync(device)
                t0 = time.perf_counter()
                if name.startswith("HF"):
                    box: list = []
                    error = attempt(name, lambda: box.append(fn()), args.hf_log)
                    if error:
                        failed.update(error)
                        break
                    out = box[0]
                else:
                    out = fn()
                sync(device)
                if time.perf_counter() - t0 < best:
                    best, gen = time.perf_counter() - t0, out
            if gen is not None:
                results[name] = (best, gen)
        if not args.no_hf and HF_STATIC in wanted:  # HF's call as users write it, after the timed runs: reported
            failed.update(attempt(HF_AS_CALLED, lambda: hf(b, "static", args.new_tokens, sized=False), args.hf_log))
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=acts) as prof:
                ac(b)
                sync(device)

    prompt_tokens = sum(len(p) for p in items)
    where = torch.cuda.get_device_name(device) if cuda else f"{torch.get_num_threads()} threads"
    print(f"device {device} ({where}), {dtype}, torch {torch.__version__}; "
          f"A {args.shape_a} (k={k}) -> B {args.shape_b} (j={j}), f={args.mode}; {args.n} items, prompts "
          f"{args.prompt_tokens // 2}-{args.prompt_tokens} tokens ({prompt_tokens} in all), {args.new_tokens} new each")
    weight_bytes = sum(p.numel() * p.element_size() for p in model_b.parameters())
    bandwidth = copy_bandwidth(device)
    if cuda:
        spec = 4.8e12 if "H200" in where else 3.35e12 if "H100" in where else bandwidth
        floor_ms = weight_bytes / spec * 1e3
        rows = min(b, args.n)
        print(f"B's weights {weight_bytes / 1e9:.1f} GB; copy bandwidth measured {bandwidth / 1e12:.2f} TB/s; "
              f"floor of one decoding step {floor_ms:.2f} ms at the datasheet's {spec / 1e12:.1f} TB/s "
              f"({weight_bytes / bandwidth * 1e3:.2f} ms at the measured copy rate) = "
              f"{rows / floor_ms * 1e3:,.0f} new tok/s at batch {rows}")
        # the limit of the AC run: both prefills' matrix products at the measured bf16 rate, every
        # decoding step at the bandwidth floor (the definition)
        peak = matmul_rate(device)
        blocks = lambda m, n: sum(p.numel() for blk in architecture(m).layers[:n] for p in blk.parameters())  # noqa: E731
        head = sum(p.numel() for p in model_b.get_output_embeddings().parameters())
        prefill_flops = 2.0 * prompt_tokens * (blocks(model_a, k) + blocks(model_b, architecture(model_b).n_layers))
        prefill_flops += 2.0 * args.n * head  # one token's logits per item
        n_steps = len(length_batches([len(p) for p in items], b)) * (args.new_tokens - 1)
        limit = prefill_flops / peak + n_steps * floor_ms / 1e3
        print(f"bf16 matmul measured {peak / 1e12:.0f} TFLOP/s; limit of the AC run: prefills {prefill_flops / 1e12:.1f} "
              f"TFLOP = {prefill_flops / peak:.3f} s + {n_steps} steps x {floor_ms:.2f} ms = {limit:.3f} s = "
              f"{args.n * args.new_tokens / limit:,.0f} new tok/s (0.75 of it: {0.75 * args.n * args.new_tokens / limit:,.0f})")
    ours = results[f"AC, batched x{b}"][0]
    base = results[runs[0][0]][0]
    print(f"{'method':<62} {'A s':>6} {'prefill s':>9} {'decode s':>9} {'total s':>8} {'ms/step':>8} "
          f"{'new tok/s':>10} {'decode tok/s':>12} {'ours is':>8} {'TFLOP/s':>8} decoder")
    steps: dict[str, float] = {}
    for name, (sec, gen) in results.items():
        new = sum(gen.new_tokens)
        x = gen.extra
        decoded = new - len(gen.tokens)  # tokens that came out of decoding steps (the first comes from prefill)
        if "decode_seconds" in x:
            step_ms = x["decode_seconds"] / max(1, x["steps"]) * 1e3
            decode_rate = decoded / max(1e-9, x["decode_seconds"])
            phases = f"{x['prefill_seconds']:>9.2f} {x['decode_seconds']:>9.2f}"
        else:  # HF: the decoding phase is the time over that of the same call with one new token
            one = results.get(f"{name}, 1 new token")
            decode_s = sec - one[0] if one else float("nan")
            step_ms = decode_s / max(1, len(length_batches(gen.prompt_tokens, b)) * (args.new_tokens - 1)) * 1e3
            decode_rate = decoded / decode_s if one else float("nan")
            phases = f"{'':>9} {'':>9}"
        steps[name] = step_ms
        print(f"{name:<62} {x['a_seconds']:>6.2f} {phases} {sec:>8.2f} {step_ms:>8.2f} {new / sec:>10.1f} "
              f"{decode_rate:>12.1f} {sec / ours:>7.2f}x {x['flops'] / sec / 1e12:>8.2f} {x.get('decoder', 'hf')}"
              + (f"  {limit / sec:.2f} of the limit" if cuda and name.startswith("AC, batched") else ""))
    batched = results[f"AC, batched x{b}"][1].tokens
    if "one at a time" in runs[0][0]:
        same, rate = agreement(results[runs[0][0]][1].tokens, batched)
        print(f"AC batched vs one at a time: {same}/{args.n} items identical, {rate:.3f} of token positions equal; "
              f"one at a time took {base / ours:.1f}x as long")
    for other in (f"AC, batched x{b}, graphs, not compiled", f"AC, batched x{b}, static, no graphs",
                  f"AC, batched x{b}, dynamic cache (old)", f"AC, batched x{b}, fused, not packed",
                  f"AC, batched x{b}, not fused, not packed (before)"):
        if other in results:
            same, rate = agreement(results[other][1].tokens, batched)
            print(f"AC batched vs {other[len(f'AC, batched x{b}, '):]}: {same}/{args.n} items identical, "
                  f"{rate:.3f} of token positions equal")
    for name, error in failed.items():
        print(f"FAILED {name}: {error}")
    alone = f"B alone (no graft), batched x{b}"
    full = [n for n in results if n.startswith("HF") and not n.endswith("1 new token")]
    if full:
        fastest = min(full, key=lambda n: results[n][0])
        stepped = [n for n in full if steps[n] == steps[n]]  # not NaN: its one-token run ran too
        print(f"strongest HF baseline end to end: {fastest} ({results[fastest][0]:.2f} s): B alone is "
              f"{results[fastest][0] / results[alone][0]:.2f}x faster, AC batched {results[fastest][0] / ours:.2f}x")
        if stepped:
            best_step = min(stepped, key=lambda n: steps[n])
            print(f"strongest HF baseline per step: {best_step} ({steps[best_step]:.2f} ms/step): B alone "
                  f"{steps[best_step] / steps[alone]:.2f}x faster per step, AC batched "
                  f"{steps[best_step] / steps[f'AC, batched x{b}']:.2f}x")
        same, rate = agreement(results[alone][1].tokens, results[fastest][1].tokens)
        print(f"B alone vs {fastest}: {same}/{args.n} items identical, {rate:.3f} of positions equal")
    checked = [(alone, 1)] + ([(fastest, 1)] if full else [])
    for name, _ in checked:
        hits, total, worst = consistency(model_b, items, results[name][1].tokens, device)
        print(f"{name}: {hits}/{total} tokens are the argmax of a cache-free forward (8 items); "
              f"largest gap {worst:.3f} logit std")
    if args.profile:
        key = "cuda_time_total" if cuda else "cpu_time_total"
        print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
