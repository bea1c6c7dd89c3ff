"""Where the end-to-end AC time goes, and what the candidate kernels would give (GPU).

Profiles, on the bench/evaluate.py workload (random-weight models of real shapes, same prompts and
batches), three phases apart: A's partial pass (sender_states), B's prefill (generate with one new
token, the graft included) and B's decoding (the rest), each as kernel time by kind (matrix
products, attention, the rest) against its wall time. Then times the candidates on the same
shapes, each against what the code does now, in the same run:
- varlen: causal attention over the batch's prompts packed end to end (torch.nn.attention.varlen)
  against the padded batch with its 4-D mask (what the prefill runs now), and its error;
- fused: the decoding step's q/k/v (and gate/up) as one matrix product against separate ones, at
  the decoding batch (weights rotated so that none is served from L2);
- decode attention: one query token per row against a masked static cache, as the decoder runs it
  now (SDPA, query heads packed onto their KV head), against the same SDPA without a mask (a lower
  bound for any masked kernel) and a compiled matmul-softmax-matmul.
  python bench/parts.py --shape-a llama-3.2-3b --shape-b llama-3.1-8b --n 64 --batch 32 --prompt-tokens 256 --new-tokens 64
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from kv import _evaluate_bench  # noqa: E402  (bench/evaluate.py's prompts)


def kind(name: str) -> str:
    n = name.lower()
    if any(s in n for s in ("gemm", "nvjet", "cutlass", "xmma", "cublas", "splitk")):
        return "matmul"
    if any(s in n for s in ("flash", "fmha", "attention", "attn", "cudnn")):
        return "attention"
    return "other"


def profiled(fn, device) -> tuple[float, dict[str, float], list[tuple[str, float]]]:
    """(wall s, kernel s by kind, the 8 costliest kernels) of one call of fn."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - t0
    by: dict[str, float] = {}
    top = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None)
        if us is None:
            us = e.self_cuda_time_total
        if us <= 0 or e.key.startswith("aten::"):
            continue
        by[kind(e.key)] = by.get(kind(e.key), 0.0) + us / 1e6
        top.append((e.key[:70], us / 1e6, e.count))
    top.sort(key=lambda t: -t[1])
    return wall, by, top[:8]


def timed(fn, iters: int = 50) -> float:
    """Median seconds of fn() over iters runs, by CUDA events (after 5 warm-ups)."""
    import torch

    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def graphed(fn):
    """fn captured as a CUDA graph (after warm-up on a side stream); returns its replay."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def varlen_check(cfg, lengths, device, dtype) -> None:
    import torch
    import torch.nn.functional as F

    try:
        from torch.nn.attention import varlen
    except ImportError as e:
        print(f"varlen: not available ({e})")
        return
    sig = inspect.signature(varlen.varlen_attn)
    print(f"varlen_attn{sig}")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    total = sum(lengths)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    q = torch.randn(total, heads, d, device=device, dtype=dtype)
    k = torch.randn(total, kv_heads, d, device=device, dtype=dtype)
    v = torch.randn(total, kv_heads, d, device=device, dtype=dtype)
    causal = {"is_causal": True} if "is_causal" in sig.parameters else {"window_size": (-1, 0)}
    gqa = {"enable_gqa": True} if "enable_gqa" in sig.parameters else {}
    longest = max(lengths)

    def packed(kk=k, vv=v, extra=gqa):
        return varlen.varlen_attn(q, kk, vv, cu, cu, longest, longest, **causal, **extra)

    how = "native GQA"
    try:
        out = packed()
    except Exception as e:  # noqa: BLE001 - try the repeated heads
        print(f"varlen with {kv_heads} KV heads failed: {type(e).__name__}: {str(e)[:200]}")
        kr, vr = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        how = "KV heads repeated"
        out = packed(kr, vr, {})
        k_, v_ = kr, vr
    else:
        k_, v_ = k, v
    ref = torch.cat([F.scaled_dot_product_attention(
        q[s:e].transpose(0, 1)[None].float(), k[s:e].transpose(0, 1)[None].float(),
        v[s:e].transpose(0, 1)[None].float(), is_causal=True, enable_gqa=True)[0].transpose(0, 1)
        for s, e in zip(cu[:-1].tolist(), cu[1:].tolist())])
    err = float((out.float() - ref).norm() / ref.norm())
    t_var = timed(lambda: packed(k_, v_, gqa if how == "native GQA" else {}))
    # the padded batch as the prefill runs it now: (rows, heads, width, d), a 4-D boolean mask
    rows, width = len(lengths), longest
    qp = torch.randn(rows, heads, width, d, device=device, dtype=dtype)
    kp = torch.randn(rows, kv_heads, width, d, device=device, dtype=dtype)
    vp = torch.randn_like(kp)
    pos = torch.arange(width, device=device)
    real = pos[None] >= (width - torch.tensor(lengths, device=device))[:, None]
    mask = (pos[None, :] <= pos[:, None])[None] & (real[:, None, :] | torch.eye(width, dtype=torch.bool, device=device))
    mask = mask[:, None]
    t_pad = timed(lambda: F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=True))
    print(f"varlen ({how}): {total} tokens in {rows} rows of <= {width}: rel. error vs fp32 per-row SDPA {err:.2e}; "
          f"one layer {t_var * 1e6:.0f} us, padded masked SDPA {t_pad * 1e6:.0f} us ({t_pad / t_var:.2f}x)")


def fused_check(cfg, rows: int, device, dtype, copies: int = 8) -> None:
    import torch
    import torch.nn.functional as F

    d, inter = cfg.hidden_size, cfg.intermediate_size
    kvd = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    x = torch.randn(rows, d, device=device, dtype=dtype)

    def weights(*outs):
        return [[torch.randn(o, d, device=device, dtype=dtype) * 0.02 for o in outs] for _ in range(copies)]

    for label, outs in (("q/k/v", (d, kvd, kvd)), ("gate/up", (inter, inter))):
        sep = weights(*outs)
        fused = [torch.cat(ws) for ws in sep]
        nbytes = sum(o * d * 2 for o in outs)

        def run_sep():
            for ws in sep:
                for w in ws:
                    F.linear(x, w)

        def run_fused():
            for w in fused:
                F.linear(x, w)

        t_sep = timed(graphed(run_sep)) / copies
        t_fused = timed(graphed(run_fused)) / copies
        print(f"{label} at {rows} rows: separate {t_sep * 1e6:.1f} us ({nbytes / t_sep / 1e12:.2f} TB/s), fused "
              f"{t_fused * 1e6:.1f} us ({nbytes / t_fused / 1e12:.2f} TB/s): {t_sep / t_fused:.2f}x; x{cfg.num_hidden_layers} "
              f"layers saves {(t_sep - t_fused) * cfg.num_hidden_layers * 1e3:.3f} ms/step")
        del sep, fused


def decode_attention_check(cfg, rows: int, length: int, device, dtype, layers: int) -> None:
    import torch
    import torch.nn.functional as F

    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    d = cfg.hidden_size // heads
    g = heads // kv_heads
    ks = [torch.randn(rows, kv_heads, length, d, device=device, dtype=dtype) for _ in range(layers)]
    vs = [torch.randn_like(k) for k in ks]
    q = torch.randn(rows, kv_heads, g, d, device=device, dtype=dtype)
    start = torch.randint(0, length // 2, (rows,), device=device)
    cols = torch.arange(length, device=device)
    mask = (cols[None] >= start[:, None])[:, None, None, :]  # (rows, 1, 1, length)
    bias = torch.zeros(rows, 1, 1, length, device=device, dtype=dtype).masked_fill(~mask, float("-inf"))

    def sdpa_masked():
        for k, v in zip(ks, vs):
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def sdpa_plain():
        for k, v in zip(ks, vs):
            F.scaled_dot_product_attention(q, k, v)

    def manual_one(qq, k, v, b):
        s = (qq.float() @ k.float().transpose(-1, -2)) * d ** -0.5 + b
        return (s.softmax(-1) @ v.float()).to(dtype)

    compiled = torch.compile(manual_one, dynamic=False)

    def manual():
        for k, v in zip(ks, vs):
            compiled(q, k, v, bias)

    ref = manual_one(q, ks[0], vs[0], bias)
    got = F.scaled_dot_product_attention(q, ks[0], vs[0], attn_mask=mask)
    err = float((got.float() - ref.float()).norm() / ref.float().norm())
    nbytes = 2 * rows * kv_heads * length * d * 2
    out = []
    for label, fn in (("SDPA, boolean mask (now)", sdpa_masked), ("SDPA, no mask (bound)", sdpa_plain),
                      ("compiled matmul-softmax", manual)):
        try:
            t = timed(graphed(fn)) / layers
            out.append(f"{label} {t * 1e6:.1f} us ({nbytes / t / 1e12:.2f} TB/s)")
        except Exception as e:  # noqa: BLE001
            out.append(f"{label} FAILED {type(e).__name__}: {str(e)[:120]}")
    print(f"decode attention, {rows} rows x {length} columns, {kv_heads} KV heads x {g} queries: " + "; ".join(out)
          + f"; SDPA vs manual rel. diff {err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape-a", default="llama-3.2-3b")
    ap.add_argument("--shape-b", default="llama-3.1-8b")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--k", type=float, default=0.75)
    ap.add_argument("--j", type=float, default=0.75)
    args = ap.parse_args()

    import torch

    from pipeline.architecture import architecture
    from pipeline.generation import Decoding, generate, length_batches
    from pipeline.injection import inject, sender_states
    from pipeline.layers import resolve_layers
    from pipeline.synthetic import random_model, train_tokenizer

    bench = _evaluate_bench()
    device, dtype = torch.device("cuda"), torch.bfloat16
    tokenizer = train_tokenizer(4096, bos=True)
    tokenizer.eos_token = None
    model_a = random_model(args.shape_a, dtype=dtype, device=device, seed=0)
    model_b = random_model(args.shape_b, dtype=dtype, device=device, seed=1)
    model_b.generation_config.eos_token_id = None
    k = resolve_layers([args.k], architecture(model_a).n_layers)[0]
    j = resolve_layers([args.j], architecture(model_b).n_layers)[0]
    items = bench.prompts(tokenizer, args.n, args.prompt_tokens)
    d_a, d_b = model_a.config.hidden_size, model_b.config.hidden_size
    w = torch.randn(d_b, d_a, device=device) / d_a ** 0.5
    b = args.batch
    vectors = {}

    def a_pass():
        sent = sender_states(model_a, tokenizer, items, k, batch_size=b)
        vectors["v"] = (sent.vectors.to(device) @ w.T).to(dtype)

    def b_run(new: int):
        return generate(model_b, tokenizer, items, Decoding(max_new_tokens=new), batch_size=b,
                        prefill_hook=lambda rows: inject(model_b, j, vectors["v"][rows], "replace"))

    with torch.no_grad():
        a_pass()
        b_run(args.new_tokens)
        b_run(1)
        phases = {}
        phases["A's pass"] = profiled(a_pass, device)
        phases["B's prefill (1 new token)"] = profiled(lambda: b_run(1), device)
        full = profiled(lambda: b_run(args.new_tokens), device)
        wall, by, top = full
        pre_wall, pre_by, _ = phases["B's prefill (1 new token)"]
        phases[f"B's decoding ({args.new_tokens - 1} steps x batches)"] = (
            wall - pre_wall, {key: by.get(key, 0.0) - pre_by.get(key, 0.0) for key in by}, top)
    tokens = sum(map(len, items))
    padded = sum(b_ * max(len(items[i]) for i in rows) for rows in length_batches([len(p) for p in items], b)
                 for b_ in [len(rows)])
    print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}; A {args.shape_a} k={k}, B {args.shape_b} "
          f"j={j}; {args.n} items, {tokens} prompt tokens ({padded} padded), batch {b}, {args.new_tokens} new")
    for name, (wall, by, top) in phases.items():
        busy = sum(by.values())
        print(f"== {name}: wall {wall:.3f} s, kernels {busy:.3f} s (" +
              ", ".join(f"{key} {v:.3f}" for key, v in sorted(by.items(), key=lambda t: -t[1])) + ")")
        for key, sec, count in top:
            print(f"   {sec * 1e3:8.2f} ms  x{count:<5} {key}")
    lengths = [len(items[i]) for i in length_batches([len(p) for p in items], b)[0]]
    del model_a
    torch.cuda.empty_cache()
    with torch.no_grad():
        varlen_check(model_b.config, lengths, device, dtype)
        fused_check(model_b.config, b, device, dtype)
        length = -(-(args.prompt_tokens + args.new_tokens) // 64) * 64
        decode_attention_check(model_b.config, b, length, device, dtype, model_b.config.num_hidden_layers)


if __name__ == "__main__":
    main()
