"""Fast decoder blocks and packed (variable-length) passes, for models whose blocks are plain
(pipeline/architecture.py `Family.plain_blocks`: Llama, Mistral, Qwen-2, Qwen-3).

Fused projections. `fuse(model)` lays each block's q/k/v weights (and biases) out as one tensor
and its gate/up weights as another; the modules' own parameters become views of them, so the model
holds no extra memory and everything else (HF's forward, hooks, key/value builders, a state dict)
sees the same values. Inside `fast_blocks(model)` every block's forward is `block_forward`: HF's
block with one matrix product for q/k/v and one for gate/up (at a decoding batch the small k/v
products ran at a third of the memory bandwidth: bench/parts.py), the rest through the block's own
modules (norms, q/k norms, activation, o and down projections) and the model's attention
implementation. Hooks on blocks still run: only `forward` is replaced.

Packed passes. A batch's prompts run end to end as one row, (1, T) with T the real tokens, no
padding; positions restart at 0 for each prompt (plus an offset) and causal attention runs per
prompt (`torch.nn.attention.varlen` on CUDA in half precision, one SDPA per prompt elsewhere). The
prefill of the static decoder (pipeline/generation.py) writes each prompt's keys/values into its
row of the static cache at the columns left padding gives them, so decoding is unchanged; A's
passes (pipeline/injection.py) read states at their layers. Hooks through pipeline.layers.at_layer
see the batch in its left-padded layout (`Packing.padded`), so a graft or a capture is the same
code either way. On CUDA the blocks of a packed pass are compiled (norms, rotary, activation and
residual adds fused; the sequence length dynamic, the attention left out of the graph).

Heavy imports stay inside functions.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

FUSED = os.environ.get("XMODEL_FUSED", "1") != "0"  # bench/evaluate.py turns these off to compare
PACKED = os.environ.get("XMODEL_PACKED", "1") != "0"
PACKED_DEVICES = ("cuda",)  # where passes run packed by default (tests add "cpu" to pin the fallback)
VARLEN = "xmodel_varlen"  # the attention implementation of a packed pass
_QKV, _GATE_UP = "_xmodel_qkv", "_xmodel_gate_up"  # each block's fused tensors: (weight, bias or None, sizes)
_ACTIVE: list["Packing"] = []  # the packed pass in progress (its attention reads it)
_compiled: dict[str, Any] = {}


def plain(model: Any) -> bool:
    """Whether the model's blocks are plain (its family's row) and attend to the whole past."""
    from pipeline.architecture import architecture

    arch = architecture(model)
    return arch.family.plain_blocks and arch.full_attention


def fuse(model: Any) -> bool:
    """Lays out every block's q/k/v and gate/up weights as views of one tensor each (once; again
    after anything replaced them). False, and nothing changed, where the blocks are not plain or a
    projection is not a plain nn.Linear (a LoRA wrapper, a quantized layer)."""
    import torch
    import torch.nn as nn

    if not FUSED or not plain(model):
        return False
    from pipeline.architecture import architecture

    arch = architecture(model)
    blocks = [(block, _parts(arch, block)) for block in arch.layers]
    if not all(type(m) is nn.Linear for _, parts in blocks for group in parts for m in group):
        return False
    with torch.no_grad():
        for block, (qkv, gate_up) in blocks:
            for name, group in ((_QKV, qkv), (_GATE_UP, gate_up)):
                if not _intact(getattr(block, name, None), group):
                    setattr(block, name, _fused(group))
    return True


def _parts(arch: Any, block: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    attention = getattr(block, arch.family.attention)
    f = arch.family
    qkv = tuple(getattr(attention, name) for name in (f.q_proj, f.k_proj, f.v_proj))
    return qkv, (block.mlp.gate_proj, block.mlp.up_proj)


def _fused(group: Sequence[Any]) -> tuple[Any, Any, tuple[int, ...]]:
    """One weight (and bias) for the linears of `group`; each linear's parameters become views of it."""
    import torch
    import torch.nn as nn

    weight = torch.cat([m.weight for m in group])
    has_bias = [m.bias is not None for m in group]
    bias = torch.cat([m.bias for m in group]) if all(has_bias) else None
    if any(has_bias) and bias is None:
        raise ValueError("fused projections need a bias on all of them or none")
    sizes = tuple(int(m.weight.shape[0]) for m in group)
    start = 0
    for m, size in zip(group, sizes):
        m.weight = nn.Parameter(weight[start:start + size], requires_grad=m.weight.requires_grad)
        if bias is not None:
            m.bias = nn.Parameter(bias[start:start + size], requires_grad=m.bias.requires_grad)
        start += size
    return weight, bias, sizes


def _intact(fused: Any, group: Sequence[Any]) -> bool:
    """The linears' weights (and biases) are still the views of `fused` that fuse() made."""
    if fused is None:
        return False
    weight, bias, sizes = fused
    start = 0
    for m, size in zip(group, sizes):
        if m.weight.data_ptr() != weight[start:start + size].data_ptr() or m.weight.shape != weight[start:start + size].shape:
            return False
        if (bias is None) != (m.bias is None) or (bias is not None and m.bias.data_ptr() != bias[start:].data_ptr()):
            return False
        start += size
    return len(group) == len(sizes)


def block_forward(block: Any, hidden_states: Any, attention_mask: Any = None, position_ids: Any = None,
                  cache: Any = None, use_cache: bool = False, position_embeddings: Any = None, **kwargs) -> Any:
    """A plain block (module doc) with its fused q/k/v and gate/up products; what HF's block computes."""
    import torch.nn.functional as F
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    attn = block.self_attn
    w, b, sizes = getattr(block, _QKV)
    x = hidden_states
    h = block.input_layernorm(x)
    q, k, v = F.linear(h, w, b).split(sizes, dim=-1)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q, k, v = q.view(shape), k.view(shape), v.view(shape)  # (batch, tokens, heads, head_dim)
    if getattr(attn, "q_norm", None) is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = _rotary(attn)(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, attn.layer_idx, kwargs=kwargs)
    attend = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, None)
    out, _ = attend(attn, q, k, v, attention_mask, dropout=0.0, scaling=attn.scaling, **kwargs)
    x = x + attn.o_proj(out.reshape(*h.shape[:-1], -1))
    h = block.post_attention_layernorm(x)
    w, b, sizes = getattr(block, _GATE_UP)
    gate, up = F.linear(h, w, b).split(sizes, dim=-1)
    return x + block.mlp.down_proj(block.mlp.act_fn(gate) * up)


def _rotary(attn: Any) -> Callable:
    import sys

    return sys.modules[type(attn).__module__].apply_rotary_pos_emb


def _packed_block_forward(block: Any, hidden_states: Any, position_embeddings: Any = None, **kwargs) -> Any:
    """block_forward compiled for packed passes: the token count is dynamic (one graph for every
    batch), the attention (a graph break) runs eagerly between the two compiled halves."""
    import torch

    compiled = _compiled.setdefault("packed", torch.compile(block_forward, dynamic=None))
    if compiled is not block_forward:
        for t in (hidden_states, *position_embeddings):
            if t.shape[1] > 1:
                torch._dynamo.maybe_mark_dynamic(t, 1)
        try:
            return compiled(block, hidden_states, position_embeddings=position_embeddings, **kwargs)
        except Exception as e:  # no compiler here (or it failed): the uncompiled block is equally correct
            import warnings

            warnings.warn(f"packed blocks could not be compiled ({type(e).__name__}: {e}); running them uncompiled")
            _compiled["packed"] = block_forward
    return block_forward(block, hidden_states, position_embeddings=position_embeddings, **kwargs)


@contextmanager
def fast_blocks(model: Any, compiled: bool = False) -> Iterator[bool]:
    """Within the block, every decoder block runs block_forward (compiled for packed passes when
    `compiled`); yields whether it does (False, nothing changed, where fuse() declines)."""
    import functools

    if not fuse(model):
        yield False
        return
    from pipeline.architecture import architecture

    blocks = architecture(model).layers
    forward = _packed_block_forward if compiled else block_forward
    for block in blocks:
        block.forward = functools.partial(forward, block)
    try:
        yield True
    finally:
        for block in blocks:
            del block.forward  # the class's forward again


# Packed passes --------------------------------------------------------------------------------


class Packing:
    """A batch of prompts run end to end as one row: the layouts' index maps (on `device`)."""

    def __init__(self, lengths: Sequence[int], device: Any, sink: Callable[[int, Any, Any], None] | None = None):
        import torch

        self.lengths = [int(n) for n in lengths]
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError("a packed pass needs at least one prompt, each of at least one token")
        self.rows, self.width, self.total = len(self.lengths), max(self.lengths), sum(self.lengths)
        n = torch.tensor(self.lengths)
        ends = n.cumsum(0)
        self.cu = torch.cat([torch.zeros(1, dtype=torch.long), ends]).to(device=device, dtype=torch.int32)
        self.last = (ends - 1).to(device)  # each prompt's last token in the packed row
        row = torch.repeat_interleave(torch.arange(self.rows), n)
        col = torch.cat([torch.arange(self.width - k, self.width) for k in self.lengths])  # left-padded column
        self.row, self.col = row.to(device), col.to(device)
        self.flat = (row * self.width + col).to(device)  # packed token -> padded slot
        index = torch.full((self.rows * self.width,), self.total, dtype=torch.long)
        index[row * self.width + col] = torch.arange(self.total)
        self.index = index.to(device)  # padded slot -> packed token (padding -> a zero row)
        self.position = (col - (self.width - n[row])).to(device)  # each token's position within its prompt
        self.sink = sink  # sink(layer index, keys, values), each (T, kv_heads, head_dim): the static cache

    def inputs(self, prompts: Sequence[Sequence[int]], offsets: Any = None) -> dict[str, Any]:
        """input_ids and position_ids (1, T) of the prompts packed (positions from offsets[r], default 0)."""
        import torch

        ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long).to(self.row.device)
        positions = self.position if offsets is None else self.position + offsets.to(self.row.device)[self.row]
        return {"input_ids": ids[None], "position_ids": positions[None]}

    def padded(self, hidden: Any) -> Any:
        """(1, T, ...) -> (rows, width, ...), left-padded (padding slots zero)."""
        import torch

        flat = torch.cat([hidden[0], hidden.new_zeros((1, *hidden.shape[2:]))])
        return flat[self.index].view(self.rows, self.width, *flat.shape[1:])

    def packed(self, padded: Any) -> Any:
        """(rows, width, ...) -> (1, T, ...): the real slots, in packed order."""
        return padded.reshape(self.rows * self.width, *padded.shape[2:])[self.flat][None]


def packs(model: Any, device: Any) -> bool:
    """Whether passes of this model on `device` run packed."""
    return PACKED and device.type in PACKED_DEVICES and plain(model) and fuse(model)


@contextmanager
def packed(model: Any, packing: Packing, compiled: bool | None = None) -> Iterator[None]:
    """Within the block, a forward pass of `model` on packing.inputs(...) (no attention mask, no
    cache) runs the prompts packed: fast blocks, attention per prompt (each block's keys and values
    handed to packing.sink first), hooks through at_layer in the padded layout."""
    from transformers import AttentionInterface

    from pipeline.architecture import architecture
    from pipeline.layers import packed_layout

    arch = architecture(model)
    AttentionInterface.register(VARLEN, varlen_attention)
    old = arch.config._attn_implementation
    compiled = packing.cu.device.type == "cuda" if compiled is None else compiled
    with fast_blocks(model, compiled=compiled) as fast, packed_layout(model, packing):
        if not fast:
            raise ValueError("packed passes need plain blocks with fusable projections (fastpath.packs)")
        arch.config._attn_implementation = VARLEN  # no mask is built for it (HF skips unregistered kinds)
        _ACTIVE.append(packing)
        try:
            yield
        finally:
            _ACTIVE.pop()
            arch.config._attn_implementation = old


def varlen_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                     scaling: float | None = None, **kwargs) -> tuple[Any, None]:
    """The attention of a packed pass: (1, heads, T, d) in, (1, T, heads, d) out, causal per prompt."""
    return _varlen_attention(module, query, key, value, scaling)


def _varlen_attention(module: Any, query: Any, key: Any, value: Any, scaling: float | None) -> tuple[Any, None]:
    import torch

    packing = _ACTIVE[-1]
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, d)
    if packing.sink is not None:
        packing.sink(module.layer_idx, k, v)
    return causal_varlen(q, k, v, packing.cu, packing.width, scaling)[None], None


try:  # the attention is no part of a compiled block's graph (it reads the pass's Packing)
    import torch._dynamo as _dynamo

    _varlen_attention = _dynamo.disable(_varlen_attention)
except ImportError:  # pragma: no cover
    pass


def causal_varlen(q: Any, k: Any, v: Any, cu: Any, longest: int, scale: float | None) -> Any:
    """Causal attention within each sequence of a packed batch: q (T, heads, d), k/v (T, kv_heads, d)
    (grouped heads allowed), cu (n + 1,) int32 offsets; (T, heads, d). Flash's variable-length
    kernel on CUDA in half precision where it takes the head width (a multiple of 8, at most 256:
    it refuses others, e.g. a tiny test model's 12); one SDPA per sequence otherwise (the reference)."""
    import torch
    import torch.nn.functional as F

    head = q.shape[-1]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and head % 8 == 0 and head <= 256:
        import inspect

        from torch.nn.attention.varlen import varlen_attn

        causal = ({"is_causal": True} if "is_causal" in inspect.signature(varlen_attn).parameters
                  else {"window_size": (-1, 0)})
        return varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **causal)
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        out[s:e] = F.scaled_dot_product_attention(
            q[s:e].transpose(0, 1)[None], k[s:e].transpose(0, 1)[None], v[s:e].transpose(0, 1)[None],
            is_causal=True, scale=scale, enable_gqa=True)[0].transpose(0, 1)
    return out
