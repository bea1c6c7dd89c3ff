"""Attention kernels the decoders swap into a model (transformers' AttentionInterface), one owner.

`packed_attention(model)` makes a model on HF's sdpa attention run `packed_gqa_attention` within
the block: the same math, with a one-token query of grouped KV heads always packed and the mask cut
to the keys a block holds (pipeline/generation.py's static decoder: blocks without a LayerPrefix
hold fewer columns than the mask). Heavy imports stay inside functions.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

PACKED_ATTENTION = "xmodel_packed_sdpa"  # the name it is registered under


def packed_gqa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """HF's sdpa attention, except that a one-token query of grouped KV heads always runs packed
    (each KV head's query heads as its query rows). HF does that eagerly but not under torch.compile,
    where it copies K and V out to every query head instead (repeat_kv): twice the attention time."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.shape[-1] != key.shape[-2]:
        attention_mask = attention_mask[..., :key.shape[-2]]  # a block without the prefix's columns (LayerPrefix)
    groups = getattr(module, "num_key_value_groups", 1)
    if query.shape[2] != 1 or groups == 1 or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    rows, heads, _, dim = query.shape
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(rows, heads // groups, groups, dim), key,
                                                           value, attn_mask=attention_mask, scale=scaling)
    return out.reshape(rows, 1, heads, value.shape[-1]), None


@contextmanager
def packed_attention(model: Any):
    """Within the block, a model on HF's sdpa attention uses packed_gqa_attention (the same math)."""
    from pipeline.architecture import architecture

    arch = architecture(model)
    if arch.attn_implementation != "sdpa":
        yield
        return
    from transformers import AttentionInterface

    AttentionInterface.register(PACKED_ATTENTION, packed_gqa_attention)
    arch.config._attn_implementation = PACKED_ATTENTION
    try:
        yield
    finally:
        arch.config._attn_implementation = "sdpa"
