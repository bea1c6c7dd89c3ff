"""Activation communication: A's layer-k last-token state grafted into B at layer j (plain, with
each f of evaluate.modes, and through each fitted aligner with each f of evaluate.aligner_modes),
and multi-vector AC (the states of A's last m tokens, pipeline/injection.py's bandwidth section).

f = gated is the gated residual b + g·v (g = evaluate.gate, fixed before any run): B keeps its own
state and receives the message on top, where replace overwrites what B had concentrated there.
"""

from __future__ import annotations

import time
from typing import Any, Iterator

from pipeline.evaluation.compute import Compute
from pipeline.evaluation.methods.base import Context
from pipeline.evaluation.methods.latent import LatentMethod, Sent, Variant
from pipeline.evaluation.pair import vector_aligners


def _combination(f: str, gate: float) -> tuple[str, float]:
    """(the injection mode, the scale of the message): gated is `sum` with the message scaled by g."""
    return ("sum", gate) if f == "gated" else (f, 1.0)


class ActivationCommunication(LatentMethod):
    name, family, needs = "ac", "ac", ("last",)
    requires = "any pair (without an aligner and of two widths: the last min(d_A, d_B) coordinates)"
    summary = "A's layer-k last-token state (raw or through each aligner) combined with B's at layer j"

    def variants(self, ctx: Context) -> Iterator[Variant]:
        from pipeline.injection import map_vectors

        cfg, pair = ctx.cfg, ctx.pair
        sent = ctx.a_last
        plain = [(f"ac_{f}", None, f) for f in cfg.modes]
        mapped = [(f"ac_{name}_{f}", aligner, f) for name, aligner in vector_aligners(ctx.aligners).items()
                  for f in cfg.aligner_modes]
        for name, aligner, f in plain + mapped:
            t0 = time.perf_counter()
            mode, scale = _combination(f, cfg.gate)
            vectors = map_vectors(sent.vectors, aligner, pair.width_b)
            if scale != 1.0:
                vectors = vectors * scale
            map_s = time.perf_counter() - t0
            yield Variant(name, list(vectors), self._sender(ctx, mode, aligner, map_s),
                          [vectors.shape[-1] * vectors.element_size()] * ctx.n,
                          "ac" if aligner is None else "ac_w")

    def _sender(self, ctx: Context, mode: str, aligner: Any, map_s: float):
        def send(message: list[Any]) -> Sent:
            import torch

            from pipeline.evaluation.diagnostics import graft_geometry
            from pipeline.injection import Graft, communicate

            pair = ctx.pair
            vectors = torch.stack(message)
            records: list[Graft] = []
            gen = communicate(pair.model_b, pair.tok_b, ctx.enc_b, ctx.j, vectors, mode, ctx.decoding,
                              records=records, **ctx.b_options())
            c = Compute()
            c.add_run(pair.model_a, "a", ctx.a_last, blocks=ctx.k)
            c.add_run(pair.model_b, "b", gen)
            c.seconds += map_s
            if aligner is not None:
                c.flops += 2.0 * ctx.n * pair.width_a * pair.width_b  # one matrix-vector product per item
            return Sent(gen, c, graft_geometry(vectors, records), {})
        return send


class MultiVectorAC(LatentMethod):
    name, family, needs = "mv_ac", "mv_ac", ("tokens",)
    requires = "any pair; across widths an aligner fitted on per-token states (fit.kind: tokens)"
    summary = "the states of A's last m tokens (evaluate.mv.m) placed on B's last m positions at layer j"

    def reads_tokens(self, ctx: Context) -> list[int]:
        return [ctx.k]

    def variants(self, ctx: Context) -> Iterator[Variant]:
        from pipeline.injection import map_vectors

        cfg, pair = ctx.cfg, ctx.pair
        states = ctx.a_tokens([ctx.k]).states[ctx.k]
        aligners: list[tuple[str, Any]] = [(name, None if name == "none" else ctx.aligners[name])
                                           for name in cfg.mv.aligners]
        for m in cfg.mv.m:
            for aligner_name, aligner in aligners:
                t0 = time.perf_counter()
                mode, scale = _combination(cfg.mv.mode, cfg.gate)
                message = [map_vectors(s[-m:] if m != "all" else s, aligner, pair.width_b) * scale for s in states]
                map_s = time.perf_counter() - t0
                name = f"mv{m}" + ("" if aligner is None else f"_{aligner_name}") + f"_{cfg.mv.mode}"
                yield Variant(name, message, self._sender(ctx, mode, aligner, map_s, m),
                              [t.numel() * t.element_size() for t in message], "mv_ac")

    def _sender(self, ctx: Context, mode: str, aligner: Any, map_s: float, m: int | str):
        def send(message: list[Any]) -> Sent:
            import torch

            from pipeline.evaluation.diagnostics import graft_geometry
            from pipeline.injection import Graft, communicate_rows, placeholder_id, with_placeholders

            pair = ctx.pair
            hole = placeholder_id(pair.tok_b)
            prompts = [with_placeholders(p, msg.shape[0], hole) for p, msg in zip(ctx.enc_b, message)]
            records: list[Graft] = []
            gen = communicate_rows(pair.model_b, pair.tok_b, prompts, ctx.j, message, mode, ctx.decoding,
                                   records=records, **ctx.b_options())
            sent = ctx.a_tokens([ctx.k])
            c = Compute()
            c.add_run(pair.model_a, "a", sent, blocks=ctx.k)
            c.add_run(pair.model_b, "b", gen)
            c.seconds += map_s
            rows = sum(t.shape[0] for t in message)
            if aligner is not None:
                c.flops += 2.0 * rows * pair.width_a * pair.width_b
            last = torch.stack([t[-1] for t in message])  # the geometry of the vector on B's last token
            return Sent(gen, c, graft_geometry(last, records), {"m": m, "vectors": rows})
        return send

