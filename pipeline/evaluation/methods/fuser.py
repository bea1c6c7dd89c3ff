"""The learned fuser (pipeline/fuser.py, trained by `xmodel fuse`): A's per-token states through a
trained per-layer gated map into B's key/value prefix; one variant per fuser listed in
evaluate.aligners (a folder such as data/fusers/task)."""

from __future__ import annotations

from typing import Any

from pipeline.evaluation.methods.base import Context
from pipeline.evaluation.methods.mapped_kv import PrefixMethod


class LearnedFuser(PrefixMethod):
    name, family, needs, prefix = "fuser", "fuser", ("tokens",), "fuser"
    requires = "a fuser trained on these models (`xmodel fuse task|prose`, listed in evaluate.aligners)"
    summary = "A's per-token states through a trained, gated per-layer map into B's key/value prefix (B frozen)"
    missing = "a trained fuser: run `xmodel fuse task` (or prose) and list its folder (data/fusers/task) in evaluate.aligners"

    def kinds(self) -> type:
        from pipeline.fuser import Fuser

        return Fuser

    def build(self, ctx: Context, artifact: Any, states: dict[int, list[Any]], sent: Any) -> Any:
        return artifact.cache(ctx.pair.model_b, states)

    def map_flops(self, ctx: Context, artifact: Any, tokens: int) -> float:
        return tokens * artifact.flops_per_a_token(ctx.pair.model_b)
