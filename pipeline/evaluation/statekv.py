"""Residual-stream states → the key/value prefix B attends to, through B's own weights.

    keys, values = block_kv(B, l, h)                 # h (n, P, d_B): B's residual entering block l
    cache = states_cache(B, {l: [h_i, ...], ...})    # a pipeline.evaluation.kv.KvCache for B
    gen = kv_generate(B, tok_B, prompts_B, cache, sorted(states), decoding)

Layer numbers follow kv.py: KV layer l in 1..L is the attention of decoder block l, whose input is
the residual stream after layer l-1 (pipeline/layers.py). `block_kv` computes what that attention
computes for its keys and values: input norm → k_proj / v_proj → kv heads → k_norm (families that
have one: Qwen3, Gemma3) → rotary on the keys at positions 0..P-1 (values are not rotated). Fed B's
own residual states of a prompt it is exactly B's cache of that prompt, so with A = B and identity
maps a prefix built here is kv_all's prefix (pinned by a test).

Everything is plain torch on B's parameters, so gradients flow through h (the fuser trains through
it); B's weights are used, never changed. Callers that only evaluate wrap it in torch.no_grad().

The model-internals lookups (input norm, projections, k_norm, rotary) are pipeline/architecture.py's
(Architecture.keys_values, per family).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence


def block_kv(model: Any, layer: int, h: Any) -> tuple[Any, Any]:
    """Keys (rotated, positions 0..P-1) and values of KV layer `layer` (1..L) for states h (n, P, d)
    standing for the residual stream entering that block: each (n, kv_heads, P, head_dim), in the
    model's dtype, differentiable in h."""
    import torch

    from pipeline.architecture import architecture

    arch = architecture(model)
    if arch.rotary is None:
        from pipeline.errors import UserError

        raise UserError(f"states → KV: {arch.model_type} has no rotary position embeddings; use AC or NL for this model")
    weight = arch.kv_parts(layer).k_proj.weight
    h = h.to(device=weight.device, dtype=weight.dtype)
    n, p = h.shape[:2]
    return arch.keys_values(layer, h, torch.arange(p, device=h.device)[None].expand(n, p))


def kv_flops_per_token(model: Any) -> float:
    """Matmul FLOPs block_kv spends per token and layer: B's key and value projections of one state."""
    from pipeline.architecture import architecture

    arch = architecture(model)
    return 2.0 * arch.width * 2 * arch.n_kv_heads * arch.head_dim


def states_cache(model: Any, states: Mapping[int, Sequence[Any]], *, a_tokens: int | None = None,
                 seconds: float = 0.0) -> Any:
    """A KvCache for `model` (B) from per-item states: states[l][i] is (P_i, d_B), B's residual stream
    entering block l (1..L) for item i. Layers not in `states` hold zeros: share only sorted(states)
    with kv_generate (its other layers hide the prefix). Items are right-padded per layer into one
    batch (each token's keys/values depend on that token and its position only, so padding changes
    nothing) and cut back to their length. Differentiable in the states.

    a_tokens: what A spent to produce the states (its prefill tokens; default sum of P_i), for kv_compute."""
    import torch

    from pipeline.evaluation.kv import KvCache, cache_shape

    shape = cache_shape(model, "B")
    start = time.perf_counter()
    layers = sorted(states)
    if not layers:
        raise ValueError("states_cache needs the states of at least one layer")
    bad = [l for l in layers if not 1 <= l <= shape.layers]
    if bad:
        raise ValueError(f"KV layers {bad} are out of range 1..{shape.layers}")
    n = len(states[layers[0]])
    lengths = [int(s.shape[0]) for s in states[layers[0]]]
    for l in layers:
        if [int(s.shape[0]) for s in states[l]] != lengths:
            raise ValueError(f"layer {l}'s states have lengths {[int(s.shape[0]) for s in states[l]]}, "
                             f"layer {layers[0]}'s {lengths}: every layer must cover the same tokens")
    weight = next(model.parameters())
    per_layer: dict[int, tuple[Any, Any]] = {}
    for l in layers:
        padded = torch.nn.utils.rnn.pad_sequence([s.to(weight.device) for s in states[l]], batch_first=True)
        per_layer[l] = block_kv(model, l, padded)
    entries = []
    for i in range(n):
        zero = None
        rows = []
        for l in range(1, shape.layers + 1):
            if l in per_layer:
                k, v = per_layer[l]
                rows.append(torch.stack([k[i, :, :lengths[i]], v[i, :, :lengths[i]]]))
            else:
                if zero is None:
                    zero = weight.new_zeros((2, shape.kv_heads, lengths[i], shape.head_dim))
                rows.append(zero)
        entries.append(torch.stack(rows))  # (L, 2, kv_heads, P_i, head_dim)
    return KvCache(entries, shape, sum(lengths) if a_tokens is None else a_tokens, time.perf_counter() - start + seconds)
