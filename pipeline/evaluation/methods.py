"""Every method on the same items (B alone, A alone, NL, AC with each f and aligner, skyline), with
the compute each one used."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.diagnostics import graft_geometry, skyline_closeness
from pipeline.evaluation.pair import Pair, resolve_ks
from pipeline.evaluation.prompts import encode, task_prompts
from pipeline.evaluation.results import format_table, summarize
from pipeline.generation import Decoding, Generation, generate
from pipeline.injection import Graft, communicate, map_vectors, sender_states
from pipeline.tasks.base import TaskPrompts


def block_flops(model: Any) -> tuple[float, float]:
    """(FLOPs per token per decoder block, FLOPs of one LM-head row): 2 x parameters (matmuls only)."""
    from pipeline.layers import decoder_layers

    blocks = decoder_layers(model)
    per_block = 2.0 * sum(p.numel() for p in blocks[0].parameters())
    head = model.get_output_embeddings()
    return per_block, 2.0 * (head.weight.numel() if head is not None else 0)


@dataclass
class Compute:
    a_tokens: int = 0  # prompt + generated tokens A ran
    a_blocks: int = 0  # decoder blocks A ran per token (k for AC, all for a full pass)
    b_tokens: int = 0
    a_new_tokens: int = 0
    b_new_tokens: int = 0
    flops: float = 0.0  # estimate: 2 x params of the blocks run per token + LM-head rows computed
    seconds: float = 0.0

    def add_run(self, pair_model: Any, role: str, gen_or_states: Any, blocks: int | None = None) -> None:
        from pipeline.layers import num_layers

        per_block, head = block_flops(pair_model)
        n_blocks = num_layers(pair_model) if blocks is None else blocks
        if isinstance(gen_or_states, Generation):
            prompt, new = sum(gen_or_states.prompt_tokens), sum(gen_or_states.new_tokens)
            heads = len(gen_or_states.prompt_tokens) + new  # one row per prefill + one per decoding step
            seconds = gen_or_states.seconds
        else:  # SenderStates: a partial pass, no LM head
            prompt, new, heads, seconds = gen_or_states.tokens, 0, 0, gen_or_states.seconds
        self.flops += per_block * n_blocks * (prompt + new) + head * heads
        self.seconds += seconds
        if role == "a":
            self.a_tokens += prompt + new
            self.a_new_tokens += new
            self.a_blocks = max(self.a_blocks, n_blocks)
        else:
            self.b_tokens += prompt + new
            self.b_new_tokens += new


@dataclass
class MethodRun:
    name: str
    texts: list[str]
    scores: dict[str, list[float]]
    compute: Compute
    diagnostics: dict[str, list[float]] = field(default_factory=dict)  # per item (pipeline/evaluation/diagnostics.py)


def _score_all(prompts: TaskPrompts, texts: Sequence[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for i, t in enumerate(texts):
        for key, value in prompts.score(i, t).items():
            out.setdefault(key, []).append(value)
    return out


def run_methods(pair: Pair, prompts: TaskPrompts, decoding: Decoding, cfg: EvaluateConfig, k: int, j: int,
                aligners: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> list[MethodRun]:
    """Every configured method on the same items; A's answer and A's layer-k states are computed
    once and reused (each method is still charged for them). The skyline runs first when the task
    has one, so that every B run can be compared with its first-token distribution."""
    aligners = aligners or {}
    log = log or (lambda s: None)
    bs, chat, n = cfg.batch_size, cfg.chat, len(prompts.ids)
    seeds = list(range(n))
    enc_a = [encode(pair.tok_a, t, chat, prompts.cue) for t in prompts.a]
    enc_b = [encode(pair.tok_b, t, chat, prompts.cue) for t in prompts.b]
    runs: dict[str, MethodRun] = {}
    sky_logits = None

    def gen_b(ids, keep_first_logits: bool = False) -> Generation:
        return generate(pair.model_b, pair.tok_b, ids, decoding, batch_size=bs, seeds=seeds,
                        keep_first_logits=keep_first_logits or sky_logits is not None)

    def closeness(gen: Generation) -> dict[str, list[float]]:
        return skyline_closeness(gen.first_logits, sky_logits) if sky_logits is not None else {}

    def add(name, gen, compute, diagnostics=None):
        runs[name] = MethodRun(name, gen.texts, _score_all(prompts, gen.texts), compute, diagnostics or {})
        primary = runs[name].scores[prompts.primary]
        agree = runs[name].diagnostics.get("agree_skyline")
        log(f"{name}: {prompts.primary} {sum(primary) / max(1, n):.3f}"
            + (f", first token = skyline's {sum(agree) / max(1, n):.2f}" if agree else "")
            + f" ({compute.seconds:.1f}s)")

    if "skyline" in cfg.methods and prompts.skyline is not None:
        gen = gen_b([encode(pair.tok_b, t, chat, prompts.cue) for t in prompts.skyline], keep_first_logits=True)
        sky_logits = gen.first_logits
        c = Compute()
        c.add_run(pair.model_b, "b", gen)
        add("skyline", gen, c)

    if "b_alone" in cfg.methods:
        gen = gen_b(enc_b)
        c = Compute()
        c.add_run(pair.model_b, "b", gen)
        add("b_alone", gen, c, closeness(gen))

    a_gen = None
    if "a_alone" in cfg.methods or "nl" in cfg.methods:
        a_gen = generate(pair.model_a, pair.tok_a, enc_a, decoding, batch_size=bs, seeds=seeds)
        if "a_alone" in cfg.methods:
            c = Compute()
            c.add_run(pair.model_a, "a", a_gen)
            add("a_alone", a_gen, c)
    if "nl" in cfg.methods:
        enc_nl = [encode(pair.tok_b, prompts.with_message(i, a_gen.texts[i]), chat, prompts.cue) for i in range(n)]
        gen = gen_b(enc_nl)
        c = Compute()
        c.add_run(pair.model_a, "a", a_gen)
        c.add_run(pair.model_b, "b", gen)
        add("nl", gen, c, closeness(gen))

    if "ac" in cfg.methods:
        sent = sender_states(pair.model_a, pair.tok_a, enc_a, k, batch_size=bs)
        variants = [(f"ac_{f}", None, f) for f in cfg.modes]
        variants += [(f"ac_{name}_{f}", aligner, f) for name, aligner in aligners.items() for f in cfg.aligner_modes]
        for name, aligner, f in variants:
            t0 = time.perf_counter()
            vectors = map_vectors(sent.vectors, aligner, pair.width_b)
            map_s = time.perf_counter() - t0
            records: list[Graft] = []
            gen = communicate(pair.model_b, pair.tok_b, enc_b, j, vectors, f, decoding, batch_size=bs, seeds=seeds,
                              keep_first_logits=sky_logits is not None, records=records)
            c = Compute()
            c.add_run(pair.model_a, "a", sent, blocks=k)
            c.add_run(pair.model_b, "b", gen)
            c.seconds += map_s
            if aligner is not None:
                c.flops += 2.0 * n * pair.width_a * pair.width_b  # one matrix-vector product per item
            add(name, gen, c, {**graft_geometry(vectors, records), **closeness(gen)})
        del sent
    order = ["b_alone", "a_alone", "nl"] + [r for r in runs if r.startswith("ac_")] + ["skyline"]
    return [runs[name] for name in order if name in runs]


@dataclass
class TaskResult:
    task: str
    k: int
    j: int
    summary: dict[str, Any]
    runs: list[MethodRun]
    prompts: TaskPrompts
    info: dict[str, Any]

    @property
    def setting(self) -> str:
        return self.prompts.setting

    def metrics(self) -> dict[str, Any]:
        return {"task": self.task, "setting": self.setting, "layers": {"k": self.k, "j": self.j},
                "primary": self.prompts.primary, "columns": list(self.prompts.columns), "methods": self.summary,
                **self.info}

    def predictions(self) -> list[dict[str, Any]]:
        rows = []
        for i, item_id in enumerate(self.prompts.ids):
            row = {"id": item_id, "gold": self.prompts.golds[i]}
            for r in self.runs:
                row[r.name] = {"text": r.texts[i], **{k: v[i] for k, v in r.scores.items()},
                               **{k: v[i] for k, v in r.diagnostics.items()}}
            rows.append(row)
        return rows

    def table(self) -> str:
        return format_table(self.summary, self.prompts.columns)


def evaluate_task(task: str, pair: Pair, cfg: EvaluateConfig, aligners: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None, n: int | None = None) -> TaskResult:
    prompts, decoding = task_prompts(task, cfg, n)
    k, j = resolve_ks(pair, cfg.layer_a, cfg.layer_b)
    start = time.perf_counter()
    runs = run_methods(pair, prompts, decoding, cfg, k, j, aligners, log)
    summary = summarize(prompts, runs, n_boot=cfg.n_boot)
    info = {"n_items": len(prompts.ids), "models": {"a": pair.name_a, "b": pair.name_b},
            "decoding": asdict(decoding), "wall_seconds": time.perf_counter() - start}
    return TaskResult(task, k, j, summary, runs, prompts, info)
