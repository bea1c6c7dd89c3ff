"""Every configured method on the same items, with the compute each one used, and the task's result."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

from pipeline.config_evaluate import EvaluateConfig
from pipeline.evaluation.methods.base import Context, MethodRun
from pipeline.evaluation.methods.latent import LatentMethod, controlled
from pipeline.evaluation.pair import Pair, resolve_ks
from pipeline.evaluation.prompts import task_prompts
from pipeline.evaluation.results import format_table, summarize
from pipeline.generation import Decoding
from pipeline.tasks.base import TaskPrompts

REFERENCE_FIRST = ("b_alone", "a_alone", "nl")  # the table's order: these, then the latent methods, the skyline last


def run_methods(pair: Pair, prompts: TaskPrompts, decoding: Decoding, cfg: EvaluateConfig, k: int, j: int,
                aligners: dict[str, Any] | None = None, log: Callable[[str], None] | None = None) -> list[MethodRun]:
    """Every method of cfg.methods (pipeline/evaluation/methods/registry.py) on the same items, in
    registry order; A's outputs are computed once and shared (each method is still charged for
    them). Every method checks the pair first: one it cannot serve is refused before any runs."""
    from pipeline.evaluation.methods.registry import METHODS, get_method

    chosen = [get_method(name) for name in cfg.methods]  # an unknown name: one line, before any work
    ctx = Context(pair, prompts, decoding, cfg, k, j, aligners or {}, log or (lambda s: None))
    for method in chosen:
        method.check(ctx)
        ctx.token_layers.update(method.reads_tokens(ctx))
    if "mismatched" in cfg.controls and ctx.n < 2 and any(isinstance(m, LatentMethod) for m in chosen):
        controlled([None], "mismatched")  # its one line, before any method runs
    runs: dict[str, MethodRun] = {}
    for method in (m for name, m in METHODS.items() if name in cfg.methods):
        for run in method.runs(ctx):
            runs[run.name] = run
            _log(ctx, run)
    order = [n for n in REFERENCE_FIRST if n in runs] + [n for n in runs if n not in (*REFERENCE_FIRST, "skyline")]
    return [runs[name] for name in order + (["skyline"] if "skyline" in runs else [])]


def _log(ctx: Context, run: MethodRun) -> None:
    n = max(1, ctx.n)
    primary = run.scores[ctx.prompts.primary]
    agree = run.diagnostics.get("agree_skyline")
    ctx.log(f"{run.name}: {ctx.prompts.primary} {sum(primary) / n:.3f}"
            + (f", first token = skyline's {sum(agree) / n:.2f}" if agree else "")
            + f" ({run.compute.seconds:.1f}s)")


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
                               **{k: v[i] for k, v in r.diagnostics.items()}, "bytes_sent": r.bytes_sent[i]}
            rows.append(row)
        return rows

    def table(self) -> str:
        return format_table(self.summary, self.prompts.columns)


def evaluate_task(task: str, pair: Pair, cfg: EvaluateConfig, aligners: dict[str, Any] | None = None,
                  log: Callable[[str], None] | None = None, n: int | None = None,
                  layers: tuple[int, int] | None = None) -> TaskResult:
    """`layers`: (k, j) as the caller resolved them for its aligners (the stage does it once);
    None resolves evaluate.layer_a/layer_b against the pair here."""
    prompts, decoding = task_prompts(task, cfg, n)
    k, j = layers or resolve_ks(pair, cfg.layer_a, cfg.layer_b)
    start = time.perf_counter()
    runs = run_methods(pair, prompts, decoding, cfg, k, j, aligners, log)
    summary = summarize(prompts, runs, n_boot=cfg.n_boot)
    info = {"n_items": len(prompts.ids), "models": {"a": pair.name_a, "b": pair.name_b},
            "decoding": asdict(decoding), "wall_seconds": time.perf_counter() - start}
    return TaskResult(task, k, j, summary, runs, prompts, info)
