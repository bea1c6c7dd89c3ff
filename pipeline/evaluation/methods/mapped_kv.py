"""Mapped KV (pipeline/evaluation/mapped_kv.py): A's per-token states, mapped layer by layer into B's
residual stream, become a key/value prefix through B's own weights; one variant per set of layer
maps listed in evaluate.aligners (`xmodel kvmaps` fits them from the store)."""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.evaluation.compute import Compute
from pipeline.evaluation.methods.base import Context
from pipeline.evaluation.methods.latent import LatentMethod, Sent, Variant


class MappedKV(LatentMethod):
    name, family, needs = "mapped_kv", "mapped_kv", ("tokens",)
    requires = "layer maps fitted on these models (`xmodel kvmaps`, listed in evaluate.aligners); B with rotary attention"
    summary = "A's per-token states mapped into B's residual stream at every mapped layer, read by B as a KV prefix"

    def check(self, ctx: Context) -> None:
        from pipeline.errors import UserError
        from pipeline.evaluation.kv import cache_shape, check_attention

        check_attention(ctx.pair.model_b)
        cache_shape(ctx.pair.model_b, "B")
        if not _maps(ctx):
            raise UserError("method mapped_kv needs layer maps: run `xmodel kvmaps` and list its folder (kvmaps) in "
                            "evaluate.aligners")

    def variants(self, ctx: Context) -> Iterator[Variant]:
        from pipeline.evaluation.mapped_kv import mapped_cache

        for name, maps in _maps(ctx).items():
            sent = ctx.a_tokens(maps.a_layers)
            states = {la: sent.states[la] for la in maps.a_layers}
            cache = mapped_cache(ctx.pair.model_b, maps, states, sent.tokens, sent.seconds)
            # what A sends: its states at the layers the maps read, every token of prompt_a
            sizes = [sum(states[la][i].numel() * states[la][i].element_size() for la in maps.a_layers)
                     for i in range(ctx.n)]
            map_flops = 2.0 * sent.tokens * ctx.pair.width_a * ctx.pair.width_b * len(maps.kv_layers)
            yield Variant(f"mkv_{name}", list(cache.entries),
                          prefix_sender(ctx, cache, maps.kv_layers, maps.a_layers, sent, map_flops), sizes, "mapped_kv")


def _maps(ctx: Context) -> dict[str, Any]:
    from pipeline.evaluation.mapped_kv import LayerMaps

    return {name: a for name, a in ctx.aligners.items() if isinstance(a, LayerMaps)}


def prefix_sender(ctx: Context, cache: Any, kv_layers: list[int], a_layers: list[int], sent: Any, map_flops: float):
    """B generating on a B-shaped key/value prefix built from A's per-token states (mapped KV, the
    fuser): A's pass up to the deepest layer read, the maps, B's extra attention on the prefix."""
    def send(message: list[Any]) -> Sent:
        from dataclasses import replace

        from pipeline.evaluation.compute import block_flops
        from pipeline.evaluation.kv import kv_compute, kv_generate

        pair = ctx.pair
        gen = kv_generate(pair.model_b, pair.tok_b, ctx.enc_b, replace(cache, entries=list(message)), kv_layers,
                          ctx.decoding, **ctx.b_options())
        work = kv_compute(cache, gen, kv_layers, pair.model_b, pair.model_b)
        c = Compute()
        c.add_run(pair.model_b, "b", gen)
        per_block, _ = block_flops(pair.model_a)
        c.a_tokens, c.a_blocks = sent.tokens, max(a_layers)
        c.flops += per_block * max(a_layers) * sent.tokens + map_flops + work.b_extra_attention_flops
        c.seconds += cache.seconds
        return Sent(gen, c, {}, {"layers": list(kv_layers), "a_layers": list(a_layers),
                                 "b_extra_attention_flops": work.b_extra_attention_flops})
    return send
