"""Every method on the same items (B alone, A alone, NL, AC with each f and aligner, skyline), with
the compute each one used."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from pipeline.evaluation.compute import Compute
from pipeline.evaluation.config import EvaluateConfig
from pipeline.evaluation.diagnostics import graft_geometry, skyline_closeness
from pipeline.evaluation.pair import Pair, resolve_ks
from pipeline.evaluation.prompts import encode, task_prompts
from pipeline.evaluation.results import format_table, summarize
from pipeline.generation import Decoding, Generation, generate
from pipeline.injection import Graft, communicate, map_vectors, sender_states
from pipeline.tasks.base import TaskPrompts


@dataclass
class MethodRun:
    name: str
    texts: list[str]
    scores: dict[str, list[float]]
    compute: Compute
    diagnostics: dict[str, list[float]] = field(default_factory=dict)  # per item (pipeline/evaluation/diagnostics.py)
    details: dict[str, Any] = field(default_factory=dict)  # method-specific facts (kv: layers shared, memory)


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
    if "kv" in cfg.methods:  # a pair KV cannot run is refused before any method spends time
        from pipeline.evaluation.kv import cache_shape, check_attention, check_pair

        check_attention(pair.model_b)
        check_pair(cache_shape(pair.model_a, "A"), cache_shape(pair.model_b, "B"))
    bs, chat, n = cfg.batch_size, cfg.chat, len(prompts.ids)
    seeds = list(range(n))
    enc_a = [encode(pair.tok_a, t, chat, prompts.cue) for t in prompts.a]
    enc_b = [encode(pair.tok_b, t, chat, prompts.cue) for t in prompts.b]
    runs: dict[str, MethodRun] = {}
    sky_logits = sky_ids = sky_gen = None

    def gen_b(ids, keep_first_logits: bool = False) -> Generation:
        return generate(pair.model_b, pair.tok_b, ids, decoding, batch_size=bs, seeds=seeds,
                        keep_first_logits=keep_first_logits or sky_logits is not None)

    def closeness(gen: Generation) -> dict[str, list[float]]:
        return skyline_closeness(gen.first_logits, sky_logits)

    def add(name, gen, compute, diagnostics=None):
        runs[name] = MethodRun(name, gen.texts, _score_all(prompts, gen.texts), compute, diagnostics or {})
        primary = runs[name].scores[prompts.primary]
        agree = runs[name].diagnostics.get("agree_skyline")
        log(f"{name}: {prompts.primary} {sum(primary) / max(1, n):.3f}"
            + (f", first token = skyline's {sum(agree) / max(1, n):.2f}" if agree else "")
            + f" ({compute.seconds:.1f}s)")

    if "skyline" in cfg.methods and prompts.skyline is not None:
        sky_ids = [encode(pair.tok_b, t, chat, prompts.cue) for t in prompts.skyline]
        gen = sky_gen = gen_b(sky_ids, keep_first_logits=True)
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
        if pair.same_model and sky_ids == enc_a:
            # A = B reading the skyline's prompt (SQuAD's private setting) is the skyline's run: same
            # weights, ids, seeds and decoding; it is still charged to A below
            a_gen = sky_gen
        else:
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
    if "kv" in cfg.methods:
        for name, gen, c, details in _kv_runs(pair, enc_a, enc_b, cfg, decoding, seeds, sky_logits is not None):
            add(name, gen, c, closeness(gen))
            runs[name].details = details
    order = ["b_alone", "a_alone", "nl"] + [r for r in runs if r.startswith(("ac_", "kv_"))] + ["skyline"]
    return [runs[name] for name in order if name in runs]


def _kv_runs(pair: Pair, enc_a, enc_b, cfg: EvaluateConfig, decoding: Decoding, seeds: list[int], keep_first: bool):
    """KV-cache communication for each evaluate.kv.layers choice: A's cache computed once, reused by all."""
    from pipeline.evaluation.kv import a_cache, kv_compute, kv_generate, select_layers

    bs = cfg.batch_size
    configs = cfg.kv.configs()
    cache = a_cache(pair.model_a, pair.tok_a, enc_a, batch_size=bs)
    for kc in configs:
        choice = select_layers(kc, pair.model_b, pair.tok_b, enc_b, cache, batch_size=bs)
        gen = kv_generate(pair.model_b, pair.tok_b, enc_b, cache, choice.layers, decoding, batch_size=bs, seeds=seeds,
                          keep_first_logits=keep_first)
        work = kv_compute(cache, gen, choice.layers, pair.model_a, pair.model_b)
        c = Compute()
        c.add_run(pair.model_b, "b", gen)
        c.a_tokens, c.a_blocks = work.a_tokens, work.a_blocks  # A's prefill, up to the deepest shared layer
        c.flops += work.a_flops + work.b_extra_attention_flops
        c.seconds += work.a_seconds + choice.seconds
        label = kc.layers if isinstance(kc.layers, str) else "L" + "-".join(str(l) for l in choice.layers)
        yield f"kv_{label}", gen, c, {"layers": choice.layers, "cache_bytes": work.cache_bytes,
                                      "cache_bytes_all": work.cache_bytes_all,
                                      "b_extra_attention_flops": work.b_extra_attention_flops}


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
