"""The learned fuser (pipeline/fuser.py, trained by `xmodel fuse`): A's per-token states through a
trained per-layer gated map into B's key/value prefix; one variant per fuser listed in
evaluate.aligners (a folder such as data/fusers/task)."""

from __future__ import annotations

from typing import Any, Iterator

from pipeline.evaluation.methods.base import Context
from pipeline.evaluation.methods.latent import LatentMethod, Variant
from pipeline.evaluation.methods.mapped_kv import prefix_sender


class LearnedFuser(LatentMethod):
    name, family, needs = "fuser", "fuser", ("tokens",)
    requires = "a fuser trained on these models (`xmodel fuse task|prose`, listed in evaluate.aligners)"
    summary = "A's per-token states through a trained, gated per-layer map into B's key/value prefix (B frozen)"

    def check(self, ctx: Context) -> None:
        from pipeline.errors import UserError

        if not _fusers(ctx):
            raise UserError("method fuser needs a trained fuser: run `xmodel fuse task` (or prose) and list its "
                            "folder (data/fusers/task) in evaluate.aligners")

    def variants(self, ctx: Context) -> Iterator[Variant]:
        for name, fuser in _fusers(ctx).items():
            sent = ctx.a_tokens(fuser.a_layers)
            states = {la: sent.states[la] for la in fuser.a_layers}
            cache = fuser.cache(ctx.pair.model_b, states)
            sizes = [sum(states[la][i].numel() * states[la][i].element_size() for la in fuser.a_layers)
                     for i in range(ctx.n)]
            rank = int(fuser.net["u"].shape[-1])
            map_flops = 2.0 * sent.tokens * rank * (ctx.pair.width_a + ctx.pair.width_b) * len(fuser.b_layers)
            yield Variant(f"fuser_{name}", list(cache.entries),
                          prefix_sender(ctx, cache, fuser.b_layers, fuser.a_layers, sent, map_flops), sizes, "fuser")


def _fusers(ctx: Context) -> dict[str, Any]:
    from pipeline.fuser import Fuser

    return {name: a for name, a in ctx.aligners.items() if isinstance(a, Fuser)}
