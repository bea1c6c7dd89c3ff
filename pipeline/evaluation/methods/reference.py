"""The reference methods: B alone, A alone, the skyline (B reading what A read), and natural
language (A writes its answer, B reads it)."""

from __future__ import annotations

from typing import Iterator

from pipeline.evaluation.compute import Compute
from pipeline.evaluation.methods.base import Context, Method, MethodRun


class Skyline(Method):
    name, family = "skyline", "reference"
    requires = "a task with a skyline prompt"
    summary = "B reads A's information and its own question (the upper reference)"

    def runs(self, ctx: Context) -> Iterator[MethodRun]:
        if ctx.prompts.skyline is None:
            return
        ctx.sky_ids = ctx.encode_b(ctx.prompts.skyline)
        gen = ctx.gen_b(ctx.sky_ids, keep_first_logits=True)
        c = Compute()
        c.add_run(ctx.pair.model_b, "b", gen)
        run = self.record(ctx, "skyline", gen, c, closeness=False)
        ctx.sky_gen, ctx.sky_logits = gen, gen.first_logits  # every later B run is compared with it
        yield run


class BAlone(Method):
    name, family = "b_alone", "reference"
    summary = "B answers its own prompt, nothing sent"

    def runs(self, ctx: Context) -> Iterator[MethodRun]:
        gen = ctx.gen_b(ctx.enc_b)
        c = Compute()
        c.add_run(ctx.pair.model_b, "b", gen)
        yield self.record(ctx, "b_alone", gen, c)


class AAlone(Method):
    name, family, needs = "a_alone", "reference", ("answer",)
    summary = "A answers from its own prompt"

    def runs(self, ctx: Context) -> Iterator[MethodRun]:
        gen = ctx.a_answer
        c = Compute()
        c.add_run(ctx.pair.model_a, "a", gen)
        yield self.record(ctx, "a_alone", gen, c, closeness=False)


class NaturalLanguage(Method):
    name, family, needs = "nl", "text", ("answer",)
    summary = "A writes its answer; B reads it beside its own prompt"

    def runs(self, ctx: Context) -> Iterator[MethodRun]:
        a_gen = ctx.a_answer
        enc = ctx.encode_b([ctx.prompts.with_message(i, a_gen.texts[i]) for i in range(ctx.n)])
        gen = ctx.gen_b(enc)
        c = Compute()
        c.add_run(ctx.pair.model_a, "a", a_gen)
        c.add_run(ctx.pair.model_b, "b", gen)
        yield self.record(ctx, "nl", gen, c, bytes_sent=[len(t.encode("utf-8")) for t in a_gen.texts])
