"""Key/value prefixes built from A's per-token states (PrefixMethod), and mapped KV
(pipeline/evaluation/mapped_kv.py): A's states, mapped layer by layer into B's residual stream,
become a key/value prefix through B's own weights; one variant per set of layer maps listed in
evaluate.aligners (`xmodel kvmaps` fits them from the store)."""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.evaluation.compute import Compute
from pipeline.evaluation.methods.base import Context
from pipeline.evaluation.methods.latent import LatentMethod, Sent, Variant


class PrefixMethod(LatentMethod):
    """A method whose message is a B-shaped key/value prefix made from A's per-token states by a
    fitted artifact of evaluate.aligners (layer maps, a fuser): one variant per artifact."""

    prefix: str = ""  # the runs' name prefix
    missing: str = ""  # the fix when none is listed

    def kinds(self) -> type:
        """The class of artifact it takes from evaluate.aligners."""
        raise NotImplementedError

    def check(self, ctx: Context) -> None:
        from pipeline.errors import UserError
        from pipeline.evaluation.kv import cache_shape, check_attention

        check_attention(ctx.pair.model_b)
        cache_shape(ctx.pair.model_b, "B")
        if not self.artifacts(ctx):
            raise UserError(f"method {self.name} needs {self.missing}")

    def reads_tokens(self, ctx: Context) -> list[int]:
        return sorted({la for artifact in self.artifacts(ctx).values() for la in artifact.a_layers})

    def artifacts(self, ctx: Context) -> dict[str, Any]:
        kind = self.kinds()
        return {name: a for name, a in ctx.aligners.items() if isinstance(a, kind)}

    def build(self, ctx: Context, artifact: Any, states: dict[int, list[Any]], sent: Any) -> Any:
        """B's KvCache from A's states at artifact.a_layers."""
        raise NotImplementedError

    def map_flops(self, ctx: Context, artifact: Any, tokens: int) -> float:
        raise NotImplementedError

    def variants(self, ctx: Context) -> Iterator[Variant]:
        for name, artifact in self.artifacts(ctx).items():
            a_layers, kv_layers = artifact.a_layers, artifact.b_layers  # A's layers read, B's KV layers built
            sent = ctx.a_tokens(a_layers)
            states = {la: sent.states[la] for la in a_layers}
            cache = self.build(ctx, artifact, states, sent)
            # what A sends: its states at the layers the artifact reads, every token of prompt_a
            sizes = [sum(states[la][i].numel() * states[la][i].element_size() for la in a_layers)
                     for i in range(ctx.n)]
            send = prefix_sender(ctx, cache, kv_layers, a_layers, sent, self.map_flops(ctx, artifact, sent.tokens))
            yield Variant(f"{self.prefix}_{name}", list(cache.entries), send, sizes, self.family)


class MappedKV(PrefixMethod):
    name, family, needs, prefix = "mapped_kv", "mapped_kv", ("tokens",), "mkv"
    requires = "layer maps fitted on these models (`xmodel kvmaps`, listed in evaluate.aligners); B with rotary attention"
    summary = "A's per-token states mapped into B's residual stream at every mapped layer, read by B as a KV prefix"
    missing = "layer maps: run `xmodel kvmaps` and list its folder (kvmaps) in evaluate.aligners"

    def kinds(self) -> type:
        from pipeline.evaluation.mapped_kv import LayerMaps

        return LayerMaps

    def build(self, ctx: Context, artifact: Any, states: dict[int, list[Any]], sent: Any) -> Any:
        from pipeline.evaluation.mapped_kv import mapped_cache

        return mapped_cache(ctx.pair.model_b, artifact, states)

    def map_flops(self, ctx: Context, artifact: Any, tokens: int) -> float:
        """Each mapped layer: A's state through its d_A x d_B map, then B's key/value projections."""
        from pipeline.evaluation.statekv import kv_flops_per_token

        per_layer = 2.0 * ctx.pair.width_a * ctx.pair.width_b + kv_flops_per_token(ctx.pair.model_b)
        return tokens * per_layer * len(artifact.b_layers)


def prefix_sender(ctx: Context, cache: Any, kv_layers: list[int], a_layers: list[int], sent: Any, map_flops: float):
    """B generating on a B-shaped key/value prefix built from A's per-token states (mapped KV, the
    fuser): A's pass up to the deepest layer read, the maps, B's extra attention on the prefix."""
    def send(message: list[Any]) -> Sent:
        from dataclasses import replace

        from pipeline.evaluation.kv import kv_compute, kv_generate

        pair = ctx.pair
        gen = kv_generate(pair.model_b, pair.tok_b, ctx.enc_b, replace(cache, entries=list(message)), kv_layers,
                          ctx.decoding, **ctx.b_options())
        work = kv_compute(cache, gen, kv_layers, pair.model_b, pair.model_b)
        c = Compute()
        c.add_run(pair.model_a, "a", sent, blocks=max(a_layers))  # A's pass up to the deepest layer read
        c.add_run(pair.model_b, "b", gen)
        c.flops += map_flops + work.b_extra_attention_flops
        c.seconds += cache.seconds  # building the prefix from the states
        return Sent(gen, c, {}, {"layers": list(kv_layers), "a_layers": list(a_layers),
                                 "b_extra_attention_flops": work.b_extra_attention_flops})
    return send
