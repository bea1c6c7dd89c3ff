"""KV-cache communication (pipeline/evaluation/kv.py): B attends to A's keys/values of prompt_a at
each evaluate.kv.layers choice; A's cache is computed once and shared by every choice."""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.evaluation.compute import Compute
from pipeline.evaluation.methods.base import Context
from pipeline.evaluation.methods.latent import LatentMethod, Sent, Variant


class KvCommunication(LatentMethod):
    name, family, needs = "kv", "kv", ("cache",)
    requires = "A and B of one architecture and cache shape (A = B, or two checkpoints of one model)"
    summary = "B attends to A's keys/values of prompt_a at each evaluate.kv.layers choice"

    def check(self, ctx: Context) -> None:
        from pipeline.evaluation.kv import cache_shape, check_attention, check_pair

        check_attention(ctx.pair.model_b)
        check_pair(cache_shape(ctx.pair.model_a, "A"), cache_shape(ctx.pair.model_b, "B"))

    def variants(self, ctx: Context) -> Iterator[Variant]:
        from pipeline.evaluation.kv import select_layers

        cache = ctx.a_cache
        for kc in ctx.cfg.kv.configs():
            choice = select_layers(kc, ctx.pair.model_b, ctx.pair.tok_b, ctx.enc_b, cache, batch_size=ctx.batch_size)
            label = kc.layers if isinstance(kc.layers, str) else "L" + "-".join(str(l) for l in choice.layers)
            share = len(set(choice.layers)) / max(1, cache.shape.layers)
            yield Variant(f"kv_{label}", list(cache.entries), kv_sender(ctx, cache, choice),
                          [int(e.numel() * e.element_size() * share) for e in cache.entries], "kv")


def kv_sender(ctx: Context, cache: Any, choice: Any):
    """B generating on a message of cache entries (A's own, or a control's) at `choice.layers`;
    `cache` (A's real one) prices the work: A's prefill up to the deepest shared layer, B's extra
    attention on the prefix."""
    def send(message: list[Any]) -> Sent:
        from dataclasses import replace

        from pipeline.evaluation.kv import kv_compute, kv_generate

        pair = ctx.pair
        gen = kv_generate(pair.model_b, pair.tok_b, ctx.enc_b, replace(cache, entries=list(message)), choice.layers,
                          ctx.decoding, **ctx.b_options())
        work = kv_compute(cache, gen, choice.layers, pair.model_a, pair.model_b)
        c = Compute()
        c.add_run(pair.model_b, "b", gen)
        c.a_tokens, c.a_blocks = work.a_tokens, work.a_blocks  # A's prefill, up to the deepest shared layer
        c.flops += work.a_flops + work.b_extra_attention_flops
        c.seconds += work.a_seconds + choice.seconds
        return Sent(gen, c, {}, {"layers": choice.layers, "cache_bytes": work.cache_bytes,
                                 "cache_bytes_all": work.cache_bytes_all,
                                 "b_extra_attention_flops": work.b_extra_attention_flops})
    return send
