"""Stages `evaluate@<task>` (every task of pipeline/tasks/registry.py), `evaluate@similarity`, and
`xmodel evaluate sweep`.

Reads params (models, paths, corpus, and the `evaluate` section: pipeline.config_evaluate.EvaluateConfig),
loads both models and the fitted aligners, runs pipeline/evaluation/, writes:
  data/evaluate/<task>/predictions.jsonl   every method's output and score per item
  data/evaluate/<task>/samples.jsonl       the same in lm-evaluation-harness's per-sample layout (one line per
                                           method and item, `method` naming the run), with bytes sent per item
  data/evaluate/<task>/table.md            the Markdown table
  data/details/evaluate-<task>.json        scores with intervals, paired tests, compute, diagnostics (the report's)
  data/metrics/evaluate-<task>.json        its headline numbers (dvc metrics; pipeline/headlines.py)
  data/plots/evaluate-<task>.png           bar chart with 95% intervals (similarity: KL per aligner and f;
                                           sweep: the (k, j) heatmap)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from pipeline.config_evaluate import SHARED_KEYS

# params this stage reads, as dvc.yaml declares them (tests/test_imports.py checks): the models, the
# corpus (held out of the similarity probe), the keys of `evaluate` shared by every task, and the
# task's own section (so a change to another task's section, or to evaluate.tasks, leaves it alone)
PARAMS = ("models", "corpus", *(f"evaluate.{key}" for key in SHARED_KEYS), "evaluate.${item}")


def evaluate_config(params: Any):
    from pipeline.config_evaluate import EvaluateConfig

    cfg = getattr(params, "evaluate", None)
    return cfg if cfg is not None else EvaluateConfig()


def evaluations() -> tuple[str, ...]:
    """What `xmodel evaluate` runs: every registered task, the probes (each an evaluate@<name> stage
    when listed in evaluate.tasks), and the (k, j) sweep, run by hand."""
    from pipeline.tasks.registry import PROBES, TASKS

    return (*TASKS, *PROBES, "sweep")


EVALUATE_FILES = ("predictions.jsonl", "samples.jsonl", "table.md")  # all data/evaluate/<task>/ holds: anything else is not ours


def outputs(paths: Any, task: str) -> dict[str, Path]:
    """What evaluating `task` writes, placed by `paths` (a pipeline.artifacts.Layout)."""
    folder = paths.evaluate_dir(task)
    return {"predictions": folder / "predictions.jsonl", "samples": folder / "samples.jsonl", "table": folder / "table.md",
            "details": paths.details(f"evaluate-{task}"), "metrics": paths.metrics(f"evaluate-{task}"),
            "plot": paths.plot(f"evaluate-{task}")}


def _write_folder(out: dict[str, Path], files: dict[str, str]) -> None:
    from pipeline.artifacts import write_folder

    write_folder(out["table"].parent, files, "evaluation folder", allowed=EVALUATE_FILES)


def run(params: Any, task: str, cfg: Any = None, pair: Any = None, log: Callable[[str], None] | None = None
        ) -> dict[str, Path]:
    """Run one evaluation task end to end; returns the paths written. Under torchrun (a task, not
    the probe or the sweep) every rank loads A and B, the ranks share B's and A's generation batches
    (pipeline.distributed.generation_across), and rank 0 writes what one process would have written."""
    from pipeline.artifacts import layout
    from pipeline.distributed import close_dist, init_dist, is_main
    from pipeline.errors import UserError
    from pipeline.evaluation.pair import load_pair

    tasks = evaluations()
    if task not in tasks:
        raise UserError(f"unknown evaluation {task!r}: use one of {', '.join(tasks)}")
    cfg = cfg or evaluate_config(params)
    dist = init_dist(cfg.device)
    try:
        if dist.world > 1 and task in ("similarity", "sweep"):
            raise UserError(f"evaluate {task} runs in one process: run it without torchrun "
                            "(tasks are shared among ranks)")
        if pair is None:  # under torchrun rank 0 fetches/converts first, so ranks never race on the model cache
            if dist.world > 1 and not is_main():
                dist.barrier()
            pair = load_pair(params.model_specs(), params.paths.cache_dir(), cfg.device, cfg.dtype)
            if dist.world > 1 and is_main():
                dist.barrier()
        return _run(task, cfg, pair, layout(params), params.corpus, log if is_main() else None, dist)
    finally:
        close_dist(dist)


def _run(task: str, cfg: Any, pair: Any, paths: Any, corpus: Any, log: Callable[[str], None] | None, dist: Any
         ) -> dict[str, Path]:
    """Evaluate `task` on the loaded `pair` under `cfg`, with the aligners and outputs where `paths` (a
    pipeline.artifacts.Layout) places them; `corpus` (the CorpusConfig the aligners were fitted on) is
    held out of the similarity probe."""
    from pipeline.distributed import generation_across, is_main
    from pipeline.evaluation.pair import fingerprints, load_aligners, resolve_ks

    log = log or (lambda s: None)
    out = outputs(paths, task)
    if task == "sweep":
        return _sweep(cfg, pair, out, log)
    k, j = resolve_ks(pair, cfg.layer_a, cfg.layer_b)
    aligners = load_aligners(cfg.aligners, paths.data, pair, k, j)
    if task == "similarity":
        from pipeline.evaluation.pair import vector_aligners

        return _similarity(cfg, pair, vector_aligners(aligners), k, j, out, paths, corpus)

    from pipeline.evaluation.methods.run import evaluate_task
    from pipeline.artifacts import Outputs, dumps, write_record
    from pipeline.evaluation.prompts import check_context, task_prompts
    from pipeline.evaluation.results import harness_samples, plot_scores
    from pipeline.headlines import evaluation

    from pipeline.evaluation.methods.registry import get_method

    prompts, decoding = task_prompts(task, cfg)
    a_prefix = any("cache" in get_method(name).needs for name in cfg.methods)  # B reads A's cache, then its prompt
    check_context(pair, prompts, decoding, cfg.chat, cfg.methods, a_prefix)  # every prompt fits both models, before any method runs
    with generation_across(dist):
        result = evaluate_task(task, pair, cfg, aligners, log, layers=(k, j))  # resolved once, above
    if not is_main():
        return out
    predictions = result.predictions()

    def lines(rows):
        return "".join(dumps(row, indent=None) + "\n" for row in rows)

    with Outputs():  # the folder, the metrics and the plot appear together, or none of them changes
        _write_folder(out, {"predictions.jsonl": lines(predictions),
                            "samples.jsonl": lines(harness_samples(result.prompts, predictions, decoding)),
                            "table.md": result.table() + "\n"})
        # the record names where the items came from (file and layout, or generator and split) and
        # each aligner it used by fingerprint (the report flags one that has changed since)
        write_record(paths, f"evaluate-{task}",
                     {**result.metrics(), "items": result.prompts.source, "aligners_used": fingerprints(aligners),
                      "ranks": dist.world},
                     evaluation)
        plot_scores(result.summary, result.prompts.primary, out["plot"],
                    f"{task} ({result.setting}), {pair.name_a} → {pair.name_b}, k={k} j={j}, n={len(result.prompts.ids)}")
    return out


def _similarity(cfg, pair, aligners, k, j, out, paths, corpus) -> dict[str, Path]:
    from pipeline.artifacts import Outputs, write_record
    from pipeline.evaluation.pair import fingerprints
    from pipeline.data import load_corpus
    from pipeline.evaluation.similarity import plot_similarity, similarity_probe, similarity_table, similarity_texts
    from pipeline.headlines import similarity

    training = load_corpus(corpus).texts  # the aligners were fitted on these: hold them out
    texts = similarity_texts(cfg.similarity, exclude=training)
    result = similarity_probe(pair, texts, k, j, cfg.modes, aligners, batch_size=cfg.batch_size, n_boot=cfg.n_boot,
                              aligner_modes=cfg.aligner_modes)
    result["models"] = {"a": pair.name_a, "b": pair.name_b}
    result["aligners_used"] = fingerprints(aligners)
    with Outputs():
        _write_folder(out, {"table.md": similarity_table(result) + "\n"})
        write_record(paths, "evaluate-similarity", result, similarity)
        plot_similarity(result, out["plot"])
    return {k_: v for k_, v in out.items() if k_ in ("table", "details", "metrics", "plot")}


def _sweep(cfg, pair, out, log) -> dict[str, Path]:
    from dataclasses import replace

    from pipeline.artifacts import Outputs, write_json  # strict JSON (NaN as null), joins the block's Outputs
    from pipeline.evaluation.prompts import task_prompts
    from pipeline.evaluation.sweep import layer_sweep, plot_sweep
    from pipeline.architecture import architecture
    from pipeline.layers import resolve_layers

    s = cfg.sweep
    evaluation, _ = task_prompts(s.task, cfg)
    sweep_cfg = replace(cfg, **{s.task: replace(cfg.section(s.task), seed=s.seed)})
    prompts, decoding = task_prompts(s.task, sweep_cfg, s.n, exclude=evaluation.held_out())
    if s.max_new_tokens:
        decoding = replace(decoding, max_new_tokens=s.max_new_tokens)

    def layers(spec, model):
        depth = architecture(model).n_layers
        return list(range(1, depth + 1)) if spec == "all" else resolve_layers(list(spec), depth)

    layers_a, layers_b = layers(s.layers_a, pair.model_a), layers(s.layers_b, pair.model_b)
    result = layer_sweep(pair, prompts, decoding, layers_a, layers_b, s.mode, cfg.batch_size, cfg.chat, log)
    result.update(task=s.task, models={"a": pair.name_a, "b": pair.name_b})
    with Outputs():
        write_json(out["details"], result)  # run by hand, not a DVC stage: no metrics file
        plot_sweep(result, out["plot"], f"{s.task}: AC {s.mode}, {pair.name_a} → {pair.name_b}, n = {result['n']}")
    return {k_: v for k_, v in out.items() if k_ in ("details", "plot")}
