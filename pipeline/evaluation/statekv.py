"""Residual-stream states → the key/value prefix B attends to, through B's own weights.

    keys, values = block_kv(B, l, h)                 # h (n, P, d_B): B's residual entering block l
    cache = states_cache(B, {l: [h_i, ...], ...})    # a pipeline.evaluation.kv.KvCache for B
    cache = packed_cache(B, lengths, layers, rows)   # the same from rows(l) (sum P_i, d_B), items end to end
    gen = kv_generate(B, tok_B, prompts_B, cache, sorted(states), decoding)

Layer numbers follow kv.py: KV layer l in 1..L is the attention of decoder block l, whose input is
the residual stream after layer l-1 (pipeline/layers.py). `block_kv` computes what that attention
computes for its keys and values: input norm → k_proj / v_proj → kv heads → k_norm (families that
have one: Qwen3, Gemma3) → rotary on the keys at positions 0..P-1 (values are not rotated). Fed B's
own residual states of a prompt it is exactly B's cache of that prompt, so with A = B and identity
maps a prefix built here is kv_all's prefix (pinned by a test).

The build is batched over items: every item's states of a layer are one (sum P_i, d) matrix, so a
layer costs one pass of B's norm and projections however many items there are (one product per
item and layer, and a tensor per item and layer, cost mapped KV 0.24-0.38 s per 64 items on an
H200, as much as B's decoding). Callers that map A's states (mapped KV, the fuser) map those packed
rows too, one layer at a time (packed_rows, packed_cache).

Everything is plain torch on B's parameters, so gradients flow through h (the fuser trains through
it); B's weights are used, never changed. Callers that only evaluate wrap it in torch.no_grad().

The model-internals lookups (input norm, projections, k_norm, rotary) are pipeline/architecture.py's
(Architecture.keys_values, per family).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence


def block_kv(model: Any, layer: int, h: Any, positions: Any = None) -> tuple[Any, Any]:
    """Keys (rotated) and values of KV layer `layer` (1..L) for states h (n, P, d) standing for the
    residual stream entering that block: each (n, kv_heads, P, head_dim), in the model's dtype,
    differentiable in h. positions (n, P): each state's position, default 0..P-1 in every row
    (packed rows of several items pass each item's own 0..P_i-1)."""
    import torch

    from pipeline.architecture import architecture

    arch = architecture(model)
    if arch.rotary is None:
        from pipeline.errors import UserError

        raise UserError(f"states → KV: {arch.model_type} has no rotary position embeddings; use AC or NL for this model")
    weight = arch.kv_parts(layer).k_proj.weight
    h = h.to(device=weight.device, dtype=weight.dtype)
    n, p = h.shape[:2]
    if positions is None:
        positions = torch.arange(p, device=h.device)[None].expand(n, p)
    return arch.keys_values(layer, h, positions)


def kv_flops_per_token(model: Any) -> float:
    """Matmul FLOPs block_kv spends per token and layer: B's key and value projections of one state."""
    from pipeline.architecture import architecture

    arch = architecture(model)
    return 2.0 * arch.width * 2 * arch.n_kv_heads * arch.head_dim


def item_lengths(states: Mapping[int, Sequence[Any]]) -> list[int]:
    """Each item's token count (P_i) in per-item states {layer: [(P_i, d) per item]}, the same at
    every layer (ValueError naming the first layer that differs)."""
    layers = sorted(states)
    if not layers:
        raise ValueError("states_cache needs the states of at least one layer")
    lengths = [int(s.shape[0]) for s in states[layers[0]]]
    for l in layers:
        if [int(s.shape[0]) for s in states[l]] != lengths:
            raise ValueError(f"layer {l}'s states have lengths {[int(s.shape[0]) for s in states[l]]}, "
                             f"layer {layers[0]}'s {lengths}: every layer must cover the same tokens")
    return lengths


def packed_rows(states: Mapping[int, Sequence[Any]]) -> Callable[[int], Any]:
    """rows(layer): every item's states at `layer` end to end, (sum P_i, d), item i's after those of
    items < i (packed_cache's layout). The last layer asked for is kept, so consecutive B layers
    reading one A layer (relative depth pairs several B layers with each A layer) concatenate it once
    and no more than one layer's rows are held."""
    import torch

    last: dict[int, Any] = {}

    def rows(layer: int) -> Any:
        if layer not in last:
            last.clear()
            last[layer] = torch.cat(list(states[layer]))
        return last[layer]
    return rows


@contextmanager
def map_precision(model: Any) -> Iterator[None]:
    """Inside: float32 products (the layer maps, the fuser's) at TF32 precision when B computes in
    16 bits on CUDA. Their output is rounded to B's dtype before B's projections read it (bf16 keeps
    8 significant bits, TF32's products 11), and at full float32 the maps of mapped KV are the build's
    largest cost: 9.8 TFLOP per 64 items of bench/methods.py's 3B -> 8B shapes (32 d_A x d_B maps),
    about 0.15 s at an H200's float32 rate against about 0.02 s in TF32 (estimated from the peaks).
    A float32 B (the CPU, the tests) keeps full float32."""
    import torch

    weight = next(model.parameters())
    if weight.device.type != "cuda" or weight.dtype == torch.float32:
        yield
        return
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def packed_cache(model: Any, lengths: Sequence[int], layers: Sequence[int], rows: Callable[[int], Any], *,
                 value_scale: Any = None, a_tokens: int | None = None, seconds: float = 0.0) -> Any:
    """A KvCache for `model` (B) from every item's states packed end to end: rows(l) is (T, d_B),
    T = sum(lengths), B's residual stream entering block l for each token of each item (item i's
    P_i rows after those of items < i), for each KV layer l in `layers` (1..L). rows is called once
    per layer, in increasing order, so a caller can map one layer at a time and hold no more.

    Each layer is one pass of B's input norm, k/v projections and rotary over all T rows (each
    token's keys/values depend on that token and its position only, so packing changes nothing;
    one product per layer instead of one per item). The cache is one (L, 2, kv_heads, T, head_dim)
    tensor; entry i is a view of item i's columns. Layers not in `layers` hold zeros: share only
    those with kv_generate (its other layers hide the prefix). value_scale: (L,) factors, layer l's
    values times value_scale[l - 1] (the fuser's gates). Differentiable in the rows and value_scale.

    a_tokens: what A spent to produce the states (its prefill tokens; default sum of P_i), for kv_compute."""
    import torch

    from pipeline.evaluation.kv import KvCache, cache_shape

    shape = cache_shape(model, "B")
    start = time.perf_counter()
    layers = sorted(layers)
    if not layers:
        raise ValueError("states_cache needs the states of at least one layer")
    bad = [l for l in layers if not 1 <= l <= shape.layers]
    if bad:
        raise ValueError(f"KV layers {bad} are out of range 1..{shape.layers}")
    weight = next(model.parameters())
    total = sum(lengths)
    # each token's position in its own item: 0..P_i-1, built on the host and copied without a sync
    positions = torch.cat([torch.arange(p) for p in lengths]).to(weight.device, non_blocking=True)[None]
    out = weight.new_empty((shape.layers, 2, shape.kv_heads, total, shape.head_dim))
    shared = set(layers)
    for l in range(1, shape.layers + 1):
        if l not in shared:
            out[l - 1].zero_()
            continue
        h = rows(l)
        if h.shape[0] != total:
            raise ValueError(f"layer {l}'s states have {h.shape[0]} rows for items of {total} tokens")
        keys, values = block_kv(model, l, h[None], positions)
        out[l - 1, 0] = keys[0]
        out[l - 1, 1] = values[0] if value_scale is None else values[0] * value_scale[l - 1].to(values)
    entries = list(out.split(list(lengths), dim=3))  # (L, 2, kv_heads, P_i, head_dim) each
    return KvCache(entries, shape, total if a_tokens is None else a_tokens, time.perf_counter() - start + seconds)


def states_cache(model: Any, states: Mapping[int, Sequence[Any]], *, a_tokens: int | None = None,
                 seconds: float = 0.0) -> Any:
    """A KvCache for `model` (B) from per-item states: states[l][i] is (P_i, d_B), B's residual stream
    entering block l (1..L) for item i. Layers not in `states` hold zeros: share only sorted(states)
    with kv_generate (its other layers hide the prefix). The items are packed end to end into one
    batch per layer (packed_cache). Differentiable in the states.

    a_tokens: what A spent to produce the states (its prefill tokens; default sum of P_i), for kv_compute."""
    return packed_cache(model, item_lengths(states), sorted(states), packed_rows(states), a_tokens=a_tokens,
                        seconds=seconds)
