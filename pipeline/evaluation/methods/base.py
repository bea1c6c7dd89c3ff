"""What a communication method is, and what every method of one evaluation shares.

A method (`Method`) is a name in `evaluate.methods`, a family (how the report and
pipeline/headlines.py group it), what it needs of A, and `runs(ctx)`: the MethodRun of each of
its variants (plain AC runs one per f, KV one per layer choice, ...). `Context` holds the items,
both models and what A computed for them: A's answer, A's layer-k last-token states, A's
key/value cache, A's per-token states. Each is computed on first use and then shared by every
method that needs it (each method is still charged for it in its Compute).

A latent method (one that sends B something other than text, pipeline/evaluation/methods/latent.py)
also names its message: per item, the tensor(s) that reach B (`Variant.message`). Its controls run
the same method on transformed messages: another item's (mismatched), norm-matched Gaussian noise,
or zeros, so that a gain can be told from a nudge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable, Iterator, Sequence

from pipeline.evaluation.compute import Compute
from pipeline.generation import Decoding, Generation, generate
from pipeline.tasks.base import TaskPrompts

FAMILIES = ("reference", "text", "ac", "ac_w", "mv_ac", "kv", "mapped_kv", "fuser", "control")


@dataclass
class MethodRun:
    name: str
    texts: list[str]
    scores: dict[str, list[float]]
    compute: Compute
    diagnostics: dict[str, list[float]] = field(default_factory=dict)  # per item (pipeline/evaluation/diagnostics.py)
    details: dict[str, Any] = field(default_factory=dict)  # method-specific facts (kv: layers shared, memory)
    family: str = "reference"  # of FAMILIES: how the report and headlines group it
    bytes_sent: list[int] = field(default_factory=list)  # per item: what A sent B (text bytes, vectors, caches)
    control_of: str | None = None  # a control run: the method whose message it transformed
    control: str | None = None  # which control (mismatched, noise, zero)


def score_all(prompts: TaskPrompts, texts: Sequence[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for i, t in enumerate(texts):
        for key, value in prompts.score(i, t).items():
            out.setdefault(key, []).append(value)
    return out


@dataclass
class Context:
    """One evaluation's items, models, layers and settings, and A's outputs for them (computed once)."""

    pair: Any  # pipeline.evaluation.pair.Pair
    prompts: TaskPrompts
    decoding: Decoding
    cfg: Any  # EvaluateConfig
    k: int
    j: int
    aligners: dict[str, Any] = field(default_factory=dict)
    log: Callable[[str], None] = lambda s: None
    sky_logits: Any = None  # the skyline's first-token logits, once it ran
    sky_gen: Generation | None = None
    sky_ids: list[list[int]] | None = None
    tokens_cache: Any = field(default=None, repr=False)  # A's per-token states so far (a_tokens)
    token_layers: set[int] = field(default_factory=set)  # every layer the chosen methods read (run_methods)

    @property
    def n(self) -> int:
        return len(self.prompts.ids)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.n))

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size

    @cached_property
    def enc_a(self) -> list[list[int]]:
        from pipeline.encoding import encode

        return [encode(self.pair.tok_a, t, self.cfg.chat, self.prompts.cue) for t in self.prompts.a]

    @cached_property
    def enc_b(self) -> list[list[int]]:
        from pipeline.encoding import encode

        return [encode(self.pair.tok_b, t, self.cfg.chat, self.prompts.cue) for t in self.prompts.b]

    def encode_b(self, texts: Sequence[str]) -> list[list[int]]:
        from pipeline.encoding import encode

        return [encode(self.pair.tok_b, t, self.cfg.chat, self.prompts.cue) for t in texts]

    def gen_b(self, ids: Sequence[Sequence[int]], keep_first_logits: bool = False) -> Generation:
        """B generates for `ids` (first-token logits kept whenever there is a skyline to compare with)."""
        return generate(self.pair.model_b, self.pair.tok_b, ids, self.decoding, **self.b_options(keep_first_logits))

    def b_options(self, keep_first_logits: bool = False) -> dict[str, Any]:
        """What every generation of B takes: batch size, seeds, first-token logits whenever there is a
        skyline to compare with, and the gold answers to score B's log-likelihood of."""
        return {"batch_size": self.batch_size, "seeds": self.seeds,
                "keep_first_logits": keep_first_logits or self.sky_logits is not None, "gold": self.gold_ids}

    @cached_property
    def gold_ids(self) -> list[list[int]] | None:
        """B's tokens of each item's (first) gold answer, as B would write it (evaluate.gold_logprob)."""
        if not self.cfg.gold_logprob:
            return None
        golds = [g[0] if isinstance(g, (list, tuple)) and g else g for g in self.prompts.golds]
        return [list(self.pair.tok_b(str(g), add_special_tokens=False)["input_ids"]) for g in golds]

    def closeness(self, gen: Generation) -> dict[str, list[float]]:
        from pipeline.evaluation.diagnostics import skyline_closeness

        return skyline_closeness(gen.first_logits, self.sky_logits)

    # A's outputs, each computed once ------------------------------------------------------------

    @cached_property
    def a_answer(self) -> Generation:
        """A's own answer to prompt_a (what NL sends; a_alone's run)."""
        if self.pair.same_model and self.sky_ids == self.enc_a and self.sky_gen is not None:
            # A = B reading the skyline's prompt (SQuAD's private setting) is the skyline's run: same
            # weights, ids, seeds and decoding; it is still charged to A by the methods using it
            return self.sky_gen
        return generate(self.pair.model_a, self.pair.tok_a, self.enc_a, self.decoding, batch_size=self.batch_size,
                        seeds=self.seeds)

    @cached_property
    def a_last(self) -> Any:
        """A's layer-k last-token states (pipeline.injection.SenderStates)."""
        from pipeline.injection import sender_states

        return sender_states(self.pair.model_a, self.pair.tok_a, self.enc_a, self.k, batch_size=self.batch_size)

    @cached_property
    def a_cache(self) -> Any:
        """A's key/value cache of prompt_a, every layer (pipeline.evaluation.kv.KvCache)."""
        from pipeline.evaluation.kv import a_cache

        return a_cache(self.pair.model_a, self.pair.tok_a, self.enc_a, batch_size=self.batch_size)

    def a_tokens(self, layers: Sequence[int]) -> Any:
        """A's per-token states of prompt_a after each of `layers` (pipeline.injection.TokenStates):
        one pass for every layer the chosen methods read (`token_layers`), so a method asking for
        other layers after another one's does not make A run again."""
        from pipeline.injection import token_states

        have = self.tokens_cache
        if have is None or not set(layers) <= set(have.layers):
            union = sorted(set(layers) | self.token_layers | set(have.layers if have is not None else ()))
            device = next(self.pair.model_a.parameters()).device  # kept where A ran: every reader is on a device
            self.tokens_cache = token_states(self.pair.model_a, self.pair.tok_a, self.enc_a, union,
                                             batch_size=self.batch_size, keep=device)
        return self.tokens_cache


class Method:
    """One communication method. Subclasses set `name`, `family`, `needs` and write `runs`."""

    name: str = ""
    family: str = "reference"
    needs: tuple[str, ...] = ()  # of A: "answer", "last", "cache", "tokens" (documentation and `xmodel methods`)
    requires: str = ""  # what the pair must be or have (one line for `xmodel methods`)
    summary: str = ""  # one line: how it conditions B

    def check(self, ctx: Context) -> None:
        """Refuse, before any method runs, a pair or config this method cannot serve (one UserError line)."""

    def reads_tokens(self, ctx: Context) -> Sequence[int]:
        """The layers of A's per-token states this method reads (none unless it `needs` "tokens")."""
        return ()

    def runs(self, ctx: Context) -> Iterator[MethodRun]:
        raise NotImplementedError

    def record(self, ctx: Context, name: str, gen: Generation, compute: Compute, *,
               diagnostics: dict[str, list[float]] | None = None, bytes_sent: Sequence[int] | None = None,
               details: dict[str, Any] | None = None, family: str | None = None, closeness: bool = True) -> MethodRun:
        """The MethodRun of one generation of B: scored, with the skyline closeness added."""
        diags = {**(diagnostics or {}), **(ctx.closeness(gen) if closeness else {})}
        if "gold_logprob" in gen.extra:  # B's log-likelihood of the gold answer: finer than EM
            diags["gold_logprob"] = gen.extra["gold_logprob"]
        return MethodRun(name, gen.texts, score_all(ctx.prompts, gen.texts), compute, diags, details or {},
                         family or self.family, list(bytes_sent) if bytes_sent is not None else [0] * ctx.n)
