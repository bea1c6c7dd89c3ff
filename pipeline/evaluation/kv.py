"""Key-value communication (after KVComm, Shi et al., ICLR 2026): B attends to the keys and values
that A computed for `prompt_a`, at a chosen set of layers, instead of receiving one hidden state.

    cache = a_cache(A, tok_A, prompts_A)                        # A's prefill, every block, once per item
    choice = select_layers(KvConfig(layers="top", top_m=0.3), B, tok_B, prompts_B, cache)
    gen = kv_generate(B, tok_B, prompts_B, cache, choice.layers, decoding)
    work = kv_compute(cache, gen, choice.layers, A, B)             # A's prefill tokens x layers, B's extra attention

Layer numbers follow the project's convention (pipeline/layers.py: layer l is the output of decoder
block l): KV layer l in 1..L is the attention of decoder block l, whose keys/values are computed
from layer l-1. Floats are relative depths, rounded half up, at least 1.

Positions: A's prefix takes positions 0..P-1 (where A computed it: its keys already carry those
rotary angles) and B's prompt continues from P, exactly as if B read prompt_a followed by its own
prompt. So with A = B and every layer shared, B computes what it computes on the concatenated
prompt (the skyline's token stream), to float rounding; any other offset would put A's keys at
relative distances B never saw between a context and what follows it.

Unshared layers see only B's own prompt. On the static decoder (the default on CUDA, compiled and
graphed there; pipeline.generation.LayerPrefix) they hold no prefix at all: shared layers get the
prefix in extra cache columns after B's own, so sharing m layers costs m layers' attention to it.
On the eager dynamic decoder (CPU, and models not on sdpa attention) every layer of an HF cache has
one length, so the prefix sits in every layer's slots and a forward pre-hook on the unshared
layers' attention hides its columns, at prefill and at every decoding step: that path spends the
masked attention too. `kv_compute` charges only what sharing the chosen layers costs. Rotary position embeddings make attention
depend on relative positions only, so with no layer shared B computes what B alone computes, to
float rounding, although its tokens sit at positions P.. instead of 0.. (pinned by a test). Models
without rotary embeddings, with sliding-window layers, or attention other than sdpa/eager are
refused with one line.

Pairs: A's cache must fit B's attention: same architecture, depth, key/value heads, head width and
rotary settings (A = B, or two checkpoints of one architecture). Any other pair is one UserError
line naming what differs.

Batching: B's batches are left-padded as in AC (pipeline/generation.py); each batch's prefixes are
left-padded to the longest one, pad columns masked, so a row computes what it computes alone.

Top-m rule (our reading of KVComm's selection: attention importance combined with a Gaussian prior
over depth, the top m layers kept). On calibration items, B reads A's prefix at every layer
(eager attention, so the weights are visible); a layer's importance is the attention mass that B's
own prompt tokens put on the prefix columns, averaged over heads, B's real tokens and the items,
then divided by the largest layer's. The prior is exp(-(l - mu)^2 / (2 sigma^2)) with mu the middle
block ((L + 1) / 2) and sigma = L / 4 (our choice of constants; KVComm motivates the prior by
middle layers carrying the most transferable semantics). score = (1 - w) * importance + w * prior
with w = prior_weight; the m highest scores are kept, ties to the shallower layer, returned in
increasing order. Deterministic for given models and items.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from pipeline.config_evaluate import KvConfig  # params' type for one choice of layers (a leaf)
from pipeline.errors import UserError
from pipeline.generation import (CACHES, Decoding, Generation, LayerPrefix, Prefix, generate, left_pad,
                                 length_batches)

ATTENTION = ("sdpa", "eager")  # the mask formats the prefix-hiding hook knows (bool/None and additive float)
PRIOR_SIGMA = 0.25  # prior width as a fraction of the depth


@dataclass(frozen=True)
class CacheShape:
    """What B's attention needs of A's cache, and how it is named in a mismatch message."""

    model_type: str
    layers: int
    kv_heads: int
    head_dim: int
    rope: str

    def describe(self) -> str:
        return f"{self.model_type}, {self.layers} layers x {self.kv_heads} KV heads x {self.head_dim}, rope {self.rope}"


def cache_shape(model: Any, role: str) -> CacheShape:
    """The model's cache shape; refuses what this method cannot place consistently (one line)."""
    from pipeline.architecture import architecture

    arch = architecture(model)
    if not arch.full_attention:
        raise UserError(f"kv communication: model {role} ({arch.model_type}) has {sorted(set(arch.layer_types))} "
                        "attention layers, i.e. a sliding window; only full attention is supported: use AC or NL "
                        "for this pair")
    if arch.rotary is None:
        raise UserError(f"kv communication: model {role} ({arch.model_type}) has no rotary position embeddings, "
                        "so unshared layers could not see B's prompt as B alone does: use AC or NL for this pair")
    return CacheShape(arch.model_type, arch.n_layers, arch.n_kv_heads, arch.head_dim, arch.rope)


def check_pair(a: CacheShape, b: CacheShape) -> None:
    if a != b:
        what = [f for f in ("model_type", "layers", "kv_heads", "head_dim", "rope") if getattr(a, f) != getattr(b, f)]
        raise UserError(f"kv communication needs A and B of one architecture and cache shape, but A is "
                        f"{a.describe()} and B is {b.describe()} (differ in {', '.join(what)}): "
                        "use AC or NL for this pair")


def check_attention(model: Any, role: str = "B") -> None:
    from pipeline.architecture import architecture

    impl = architecture(model).attn_implementation
    if impl not in ATTENTION:
        raise UserError(f"kv communication: model {role} uses attention {impl!r}; load it with one of "
                        f"{', '.join(ATTENTION)} (evaluate.attention or attn_implementation)")


@dataclass
class KvCache:
    """A's keys and values of each item's prompt, every layer, on A's device in A's dtype:
    entries[i] is (L, 2, kv_heads, P_i, head_dim) for item i (its real tokens only)."""

    entries: list[Any]
    shape: CacheShape
    tokens: int  # A's prefill tokens (sum of P_i)
    seconds: float

    @property
    def lengths(self) -> list[int]:
        return [int(e.shape[3]) for e in self.entries]

    @property
    def bytes(self) -> int:
        """Memory held for all layers (what stays resident between layer choices)."""
        return sum(e.numel() * e.element_size() for e in self.entries)

    def bytes_for(self, layers: Sequence[int]) -> int:
        """What sharing `layers` sends: their share of the cache."""
        return self.bytes * len(set(layers)) // max(1, self.shape.layers)

    def subset(self, items: Sequence[int]) -> KvCache:
        return KvCache([self.entries[i] for i in items], self.shape, sum(self.lengths[i] for i in items), 0.0)


def a_cache(model_a: Any, tok_a: Any, prompts_a: Sequence[Sequence[int]], *, batch_size: int = 8) -> KvCache:
    """A's prefill over each prompt (batched, left-padded), keeping every layer's keys and values of
    the real tokens. Computed once per item and reused for every layer choice."""
    import torch
    from transformers import DynamicCache

    shape = cache_shape(model_a, "A")
    entries: list[Any] = [None] * len(prompts_a)
    start = time.perf_counter()
    with torch.no_grad():
        for rows, ids, mask, pos in _padded(model_a, tok_a, prompts_a, batch_size):
            cache = DynamicCache(config=model_a.config)
            model_a(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True,
                    logits_to_keep=1)
            kv = torch.stack([torch.stack([layer.keys, layer.values]) for layer in cache.layers])  # (L, 2, b, H, W, D)
            for r, i in enumerate(rows):
                entries[i] = kv[:, :, r, :, ids.shape[1] - len(prompts_a[i]):].clone()
    return KvCache(entries, shape, sum(len(p) for p in prompts_a), time.perf_counter() - start)


def _padded(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], batch_size: int) -> Iterator[tuple]:
    """(rows, input_ids, attention_mask, position_ids) of each length batch, left-padded, on the model's device."""
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for rows in length_batches([len(p) for p in prompts], batch_size):
        yield (rows, *left_pad([prompts[i] for i in rows], pad_id, device))


def resolve_kv_layers(layers: Sequence[int | float], n_layers: int) -> list[int]:
    """KV layers (decoder blocks 1..L): ints as given, floats as relative depth rounded half up (>= 1)."""
    from pipeline.layers import resolve_layers

    out = set()
    for item in layers:
        index = resolve_layers([item], n_layers)[0]
        if isinstance(item, float):
            index = max(1, index)  # depth 0 is the embeddings, which have no keys/values: take block 1
        elif index == 0:
            raise UserError(f"kv layer 0 is the embedding output, which has no keys/values: use blocks 1..{n_layers}")
        out.add(index)
    return sorted(out)


def top_count(top_m: int | float, n_layers: int) -> int:
    if isinstance(top_m, float):
        return max(1, math.floor(top_m * n_layers + 0.5))
    if top_m > n_layers:
        raise UserError(f"kv top_m = {top_m} exceeds the {n_layers} layers of the model: use at most {n_layers}")
    return top_m


@dataclass
class LayerChoice:
    layers: list[int]  # KV layers, 1..L, increasing
    scores: list[float] = field(default_factory=list)  # per layer 1..L (top-m rule only)
    importance: list[float] = field(default_factory=list)  # attention mass on the prefix, per layer
    calib_items: list[int] = field(default_factory=list)
    seconds: float = 0.0


def select_layers(cfg: KvConfig, model_b: Any, tok_b: Any, prompts_b: Sequence[Sequence[int]], cache: KvCache, *,
                  batch_size: int = 8) -> LayerChoice:
    """The layers B reads A's cache at: all of them, the given list, or the top-m rule (module doc)
    scored on the first cfg.calib_items items."""
    n_layers = cache.shape.layers
    if cfg.layers == "all":
        return LayerChoice(list(range(1, n_layers + 1)))
    if cfg.layers != "top":
        return LayerChoice(resolve_kv_layers(cfg.layers, n_layers))
    m = top_count(cfg.top_m, n_layers)
    start = time.perf_counter()
    items = list(range(min(cfg.calib_items, len(prompts_b))))
    importance = attention_importance(model_b, tok_b, [prompts_b[i] for i in items], cache.subset(items),
                                      batch_size=batch_size)
    scores = combine_scores(importance, cfg.prior_weight)
    order = sorted(range(n_layers), key=lambda l: (-scores[l], l))
    return LayerChoice(sorted(l + 1 for l in order[:m]), scores, importance, items, time.perf_counter() - start)


def combine_scores(importance: Sequence[float], prior_weight: float) -> list[float]:
    """(1 - w) * importance / max(importance) + w * Gaussian prior over depth (layers 1..L)."""
    n = len(importance)
    top = max(importance) if importance and max(importance) > 0 else 1.0
    mu, sigma = (n + 1) / 2, PRIOR_SIGMA * n
    prior = [math.exp(-((l - mu) ** 2) / (2 * sigma ** 2)) for l in range(1, n + 1)]
    return [(1 - prior_weight) * s / top + prior_weight * p for s, p in zip(importance, prior)]


def attention_importance(model_b: Any, tok_b: Any, prompts_b: Sequence[Sequence[int]], cache: KvCache, *,
                         batch_size: int = 8) -> list[float]:
    """Per layer 1..L: the attention mass B's real prompt tokens put on A's prefix when every layer
    is shared, averaged over heads, tokens and items. One prefill per batch, eager attention."""
    import torch

    from pipeline.architecture import architecture

    check_pair(cache.shape, cache_shape(model_b, "B"))
    arch = architecture(model_b)
    n_layers = arch.n_layers
    totals = [0.0] * n_layers
    weights: dict[int, Any] = {}

    def keep(l: int):
        def hook(module, args, output):
            weights[l] = output[1]
        return hook

    with _eager(model_b), torch.no_grad():
        handles = [attention.register_forward_hook(keep(l)) for l, attention in
                   enumerate(map(arch.attention, range(1, n_layers + 1)))]
        try:
            for rows, ids, mask, pos in _padded(model_b, tok_b, prompts_b, batch_size):
                past = _prefix(cache, rows, ids.device)
                mask = torch.cat([past.mask.to(mask), mask], dim=1)
                model_b(input_ids=ids, attention_mask=mask, position_ids=pos + past.offsets[:, None], cache=past.cache,
                        use_cache=True, logits_to_keep=1)
                width = past.mask.shape[1]
                for l in range(n_layers):
                    on_prefix = weights[l][..., :width].float().sum(-1).mean(1)  # (rows, query): mean over heads
                    for r, i in enumerate(rows):
                        own = on_prefix[r, ids.shape[1] - len(prompts_b[i]):]  # B's real tokens only
                        totals[l] += float(own.mean())
        finally:
            for h in handles:
                h.remove()
    return [t / max(1, len(prompts_b)) for t in totals]


@contextmanager
def _eager(model: Any) -> Iterator[None]:
    """Eager attention inside the block (its modules return their weights); the old one after."""
    old = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(old)


def _prefix(cache: KvCache, rows: Sequence[int], device: Any) -> Prefix:
    """The rows' prefixes as one HF cache, every layer, left-padded to the longest (pad columns masked)."""
    from transformers import DynamicCache

    kv, mask, offsets = _padded_prefix(cache, rows, device)
    past = DynamicCache()
    for l in range(kv.shape[0]):
        past.update(kv[l, 0], kv[l, 1], l)
    return Prefix(past, mask, offsets)


def _padded_prefix(cache: KvCache, rows: Sequence[int], device: Any, layers: Sequence[int] | None = None) -> tuple:
    """(kv (layers, 2, rows, kv_heads, width, head_dim), mask (rows, width), offsets (rows,)): the rows'
    prefixes at the given layers (0-based; all when None), left-padded to the longest."""
    import torch

    layers = None if layers is None else list(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        layers = slice(layers[0], layers[-1] + 1)  # a run of layers (all of them, mostly): a view, no copy
    entries = [cache.entries[i] if layers is None else cache.entries[i][layers] for i in rows]
    width = max(int(e.shape[3]) for e in entries)
    first = entries[0]
    kv = first.new_zeros((first.shape[0], 2, len(rows), first.shape[2], width, first.shape[4]))
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, e in enumerate(entries):
        kv[:, :, r, :, width - e.shape[3]:] = e
        mask[r, width - e.shape[3]:] = 1
    offsets = torch.tensor([int(e.shape[3]) for e in entries])
    # non_blocking: a blocking copy from the host waits for the GPU's queue (the previous batch's work)
    return kv.to(device), mask.to(device, non_blocking=True), offsets.to(device, non_blocking=True)


def hide_prefix_columns(mask: Any, width: int, hidden: Any, kv_length: int) -> Any:
    """The attention mask an unshared layer uses: the given one with its first `width` key columns
    (the prefix) hidden. Keeps the mask's kind: boolean (sdpa, True = attend) or additive float
    (eager). None is sdpa's "plain causal, nothing padded" (eager always gets a float mask): built
    here as a boolean one."""
    import torch

    if mask is None:
        q = hidden.shape[1]
        cols = torch.arange(kv_length, device=hidden.device)
        rows = torch.arange(q, device=hidden.device)[:, None] + (kv_length - q)
        return ((cols <= rows) & (cols >= width))[None, None]
    out = mask.clone()
    if out.dtype == torch.bool:
        out[..., :width] = False
    else:
        out[..., :width] = torch.finfo(out.dtype).min
    return out


@contextmanager
def hide_prefix(model: Any, unshared: Sequence[int], width: int) -> Iterator[None]:
    """Within the block, the attention of each block in `unshared` (KV layers 1..L) cannot see the
    first `width` key positions (the prefix), in every forward pass."""
    from pipeline.architecture import architecture

    arch = architecture(model)
    last: list[Any] = []  # (mask given, sizes, mask made): every layer of one forward pass gets the same mask

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        past = kwargs.get("cache", kwargs.get("past_key_values"))
        sizes = (past.get_seq_length(module.layer_idx) + hidden.shape[1], hidden.shape[1])
        given = kwargs.get("attention_mask")
        if not (last and last[0] is given and last[1] == sizes):  # `last` holds `given`, so `is` is safe
            last[:] = [given, sizes, hide_prefix_columns(given, width, hidden, sizes[0])]
        return args, {**kwargs, "attention_mask": last[2]}

    handles = [attention.register_forward_pre_hook(pre_hook, with_kwargs=True) for attention in
               map(arch.attention, unshared)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def kv_generate(model_b: Any, tok_b: Any, prompts_b: Sequence[Sequence[int]], cache: KvCache, layers: Sequence[int],
                decoding: Decoding, *, batch_size: int = 8, seeds: Sequence[int] | None = None,
                keep_first_logits: bool = False, gold: Sequence[Sequence[int]] | None = None,
                cache_kind: str = "auto") -> Generation:
    """B generates for its prompts while reading item i's A-cache at `layers` (KV layers 1..L),
    placed before its prompt (positions 0..P_i-1, B's tokens from P_i); other layers see only B's
    prompt. Batched with left padding through pipeline.generation.generate. cache_kind: "static"
    (unshared layers hold no prefix; compiled and graphed on CUDA; needs sdpa attention), "dynamic"
    (eager), or "auto" (static on CUDA with sdpa, dynamic otherwise)."""
    check_attention(model_b)
    check_pair(cache.shape, cache_shape(model_b, "B"))
    if len(cache.entries) != len(prompts_b):
        raise ValueError(f"A's cache holds {len(cache.entries)} items for {len(prompts_b)} prompts")
    n_layers = cache.shape.layers
    shared = set(resolve_kv_layers(list(layers), n_layers)) if layers else set()
    unshared = [l for l in range(1, n_layers + 1) if l not in shared]
    device = next(model_b.parameters()).device
    lengths = cache.lengths
    if cache_kind not in CACHES:
        raise UserError(f"cache {cache_kind!r} is not one of {', '.join(CACHES)}")
    from pipeline.architecture import architecture

    impl = architecture(model_b).attn_implementation
    sdpa = impl == "sdpa"
    if cache_kind == "static" and not sdpa:
        raise UserError(f"kv communication on the static cache needs sdpa attention, not {impl!r}: load B with "
                        "sdpa or use cache 'dynamic'")
    if cache_kind == "static" or (cache_kind == "auto" and device.type == "cuda" and sdpa):
        held = [l - 1 for l in sorted(shared)]
        # rounded up, so that calls with similar prompts reuse one graphed decoder
        width = -(-max(lengths, default=0) // 64) * 64 if held else 0
        prefix = LayerPrefix(tuple(held), width, lambda rows: _padded_prefix(cache, rows, device, held))
        gen = generate(model_b, tok_b, prompts_b, decoding, batch_size=batch_size, seeds=seeds,
                       keep_first_logits=keep_first_logits, cache="static", layer_prefix=prefix, gold=gold)
        gen.extra["kv_layers"] = sorted(shared)
        return gen

    def session(rows: list[int]):
        return hide_prefix(model_b, unshared, max(lengths[i] for i in rows))

    gen = generate(model_b, tok_b, prompts_b, decoding, batch_size=batch_size, seeds=seeds,
                   keep_first_logits=keep_first_logits, prefix=lambda rows: _prefix(cache, rows, device),
                   session_hook=session, gold=gold, cache="dynamic")
    gen.extra["kv_layers"] = sorted(shared)
    return gen


@dataclass
class KvCompute:
    """What KV communication costs beyond B's own generation (which the caller charges as for B alone)."""

    a_tokens: int  # A's prefill tokens
    a_blocks: int  # blocks A must run: up to the deepest shared layer
    a_flops: float  # A's matmul FLOPs for those blocks (2 x params per token per block)
    b_extra_attention_flops: float  # B's queries x A's prefix keys at the shared layers (QK and AV)
    shared_layers: list[int]
    cache_bytes: int  # A's cache of the shared layers: what is sent
    cache_bytes_all: int  # what is held to reuse across layer choices
    a_seconds: float

    def as_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def kv_compute(cache: KvCache, gen: Generation, layers: Sequence[int], model_a: Any, model_b: Any) -> KvCompute:
    """A's prefill tokens x the blocks up to the deepest shared layer, and the attention B spends on
    the prefix: per shared layer, each token B runs (prompt and generated) against each prefix
    token, 4 x heads x head_dim FLOPs (QK^T and the weighted sum of V)."""
    from pipeline.architecture import architecture
    from pipeline.evaluation.compute import block_flops

    shared = sorted(set(layers))
    deepest = max(shared) if shared else 0
    per_block, _ = block_flops(model_a)
    per_pair = 4.0 * architecture(model_b).n_heads * cache.shape.head_dim
    pairs = sum((t + n) * p for t, n, p in zip(gen.prompt_tokens, gen.new_tokens, cache.lengths))
    return KvCompute(a_tokens=cache.tokens, a_blocks=deepest, a_flops=per_block * deepest * cache.tokens,
                     b_extra_attention_flops=per_pair * pairs * len(shared), shared_layers=shared,
                     cache_bytes=cache.bytes_for(shared), cache_bytes_all=cache.bytes, a_seconds=cache.seconds)
