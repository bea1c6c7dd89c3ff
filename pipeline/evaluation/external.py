"""Rows of a method that runs outside xmodel (another package's communication, e.g. avp's: see
results/cross-model/avp_rows.py), on the items of a recorded xmodel evaluation: the same prompts, the
same cut and scores, and paired tests against the recorded runs of those very items (B alone, NL,
the skyline), so that an outside row is read exactly like one of xmodel's.

  recorded_runs   the runs a record holds, item by item, checked to be these items: the task, models,
                  decoding and item source the record names, its item ids and golds, and its replies
                  scored anew giving its scores (a record of other items, or scored otherwise, is refused)
  external_run    a MethodRun of an outside method's replies (cut at the task's stop strings, scored)
  external_result the TaskResult of the recorded and the outside runs: summary with Wilson intervals and
                  exact McNemar tests against b_alone and nl (pipeline/evaluation/results.summarize);
                  without a record yet, the outside rows alone (paired later: their own result reads
                  back through recorded_runs)
  write_result    its record, predictions and table in the flat layout of results/ (RESULT_FILES), which
                  `xmodel report --methods DIR` reads like any evaluation record

A record is a data dir (details/evaluate-<task>.json, evaluate/<task>/predictions.jsonl) or a results
folder holding the same files flat.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import UserError
from pipeline.evaluation.compute import Compute
from pipeline.evaluation.methods.base import MethodRun, score_all
from pipeline.generation import Decoding
from pipeline.tasks.base import TaskPrompts

# a results folder's flat copy of one evaluation (what results/cross-model/<run>/ holds)
RESULT_FILES = {"details": "evaluate-{task}.json", "predictions": "{task}.predictions.jsonl", "table": "{task}.table.md"}
REQUIRED = ("b_alone", "nl")  # every outside row is tested against these (summarize's references)


def record_paths(folder: Path | str, task: str) -> tuple[Path, Path]:
    """(details, predictions) of the evaluation of `task` recorded in `folder` (module doc)."""
    from pipeline.artifacts import Layout

    folder = Path(folder)
    layout = Layout(folder)
    for details, predictions in ((layout.details(f"evaluate-{task}"), layout.evaluate_dir(task) / "predictions.jsonl"),
                                 (folder / RESULT_FILES["details"].format(task=task),
                                  folder / RESULT_FILES["predictions"].format(task=task))):
        if details.is_file() and predictions.is_file():
            return details, predictions
    raise UserError(f"--record {folder}: no evaluation of {task} there (neither details/evaluate-{task}.json with "
                    f"evaluate/{task}/predictions.jsonl, nor evaluate-{task}.json with {task}.predictions.jsonl): "
                    "point it at the data dir or results folder of an `xmodel evaluate` run of these items")


@dataclass
class Recorded:
    details_path: Path
    details: dict[str, Any]
    runs: dict[str, MethodRun]  # per method, rebuilt item by item from the predictions


def _same(x: Any, y: Any) -> bool:
    """Equal as JSON data (tuples read back as lists), floats to rounding."""
    from pipeline.artifacts import to_json

    x, y = to_json(x), to_json(y)
    if isinstance(x, float) or isinstance(y, float):
        return isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(x, list) and isinstance(y, list):
        return len(x) == len(y) and all(_same(a, b) for a, b in zip(x, y))
    if isinstance(x, dict) and isinstance(y, dict):
        return x.keys() == y.keys() and all(_same(x[k], y[k]) for k in x)
    return x == y


def recorded_runs(folder: Path | str, task: str, prompts: TaskPrompts, decoding: Decoding,
                  models: tuple[str, str], methods: Sequence[str] | None = ("b_alone", "nl", "skyline"),
                  required: Sequence[str] = REQUIRED) -> Recorded:
    """The runs of `methods` (None: every one) the record in `folder` holds (those of `required` must be
    there; the others where recorded), refused in one line unless the record is of these items, models
    and decoding. An outside method's own result (write_result) reads back the same way."""
    import json
    from dataclasses import asdict

    details_path, predictions_path = record_paths(folder, task)
    details = json.loads(details_path.read_text())
    rows = [json.loads(line) for line in predictions_path.read_text().splitlines() if line.strip()]

    def refuse(what: str, recorded: Any, ours: Any) -> UserError:
        return UserError(f"record {details_path}: its {what} is {recorded!r} but these items' is {ours!r}: give the "
                         "params (-S) that record was evaluated with, or point --record at an evaluation of these items")

    for what, recorded, ours in (("task", details.get("task"), task),
                                 ("models", details.get("models"), {"a": models[0], "b": models[1]}),
                                 ("decoding", details.get("decoding"), asdict(decoding)),
                                 ("item source", details.get("items"), prompts.source),
                                 ("item ids", [r.get("id") for r in rows], prompts.ids),
                                 ("golds", [r.get("gold") for r in rows], prompts.golds)):
        if not _same(recorded, ours):
            raise refuse(what, recorded, ours)
    missing = [m for m in required if m not in details.get("methods", {}) or any(m not in r for r in rows)]
    if missing:
        raise UserError(f"record {details_path} has no {', '.join(missing)} run: an outside row is tested against "
                        f"{' and '.join(required)} of the same items; evaluate them there (evaluate.methods)")
    compute_fields = {f.name for f in fields(Compute)}
    runs = {}
    for name in details.get("methods", {}) if methods is None else methods:
        entry = details.get("methods", {}).get(name)
        if entry is None or any(name not in r for r in rows):
            continue
        texts = [r[name]["text"] for r in rows]
        scores = score_all(prompts, texts)
        for key, values in scores.items():  # the record's replies, scored here, give the record's scores
            recorded = [r[name].get(key) for r in rows]
            if not _same(recorded, values):
                i = next(i for i, (a, b) in enumerate(zip(recorded, values)) if not _same(a, b))
                raise UserError(f"record {details_path}: {name}'s {key} of item {prompts.ids[i]} is {recorded[i]!r}, "
                                f"but its reply {texts[i]!r} scores {values[i]!r} here: the record was scored by "
                                "other code; evaluate the items again with this checkout")
        diagnostics = {key: [r[name][key] for r in rows] for key in rows[0][name]
                       if key not in ("text", "bytes_sent", *scores) and all(key in r[name] for r in rows)}
        runs[name] = MethodRun(name, texts, scores,
                               Compute(**{k: v for k, v in entry.get("compute", {}).items() if k in compute_fields}),
                               diagnostics, entry.get("details", {}), entry.get("family", "reference"),
                               [r[name].get("bytes_sent", 0) for r in rows], entry.get("control_of"), entry.get("control"))
    return Recorded(details_path, details, runs)


def external_run(prompts: TaskPrompts, decoding: Decoding, name: str, replies: Sequence[str], bytes_sent: Sequence[int],
                 compute: Compute, family: str, details: dict[str, Any] | None = None,
                 control_of: str | None = None, control: str | None = None) -> MethodRun:
    """An outside method's replies (one per item, in the items' order) as a MethodRun: each cut where
    B's generation would have stopped (the task's stop strings) and scored by the task."""
    from pipeline.generation import cut_at_stops

    if len(replies) != len(prompts.ids) or len(bytes_sent) != len(prompts.ids):
        raise ValueError(f"{name}: {len(replies)} replies and {len(bytes_sent)} byte counts for {len(prompts.ids)} items")
    texts = [cut_at_stops(r, decoding.stop_strings) for r in replies]
    return MethodRun(name, texts, score_all(prompts, texts), compute, {}, details or {}, family,
                     [int(b) for b in bytes_sent], control_of, control)


def external_result(task: str, prompts: TaskPrompts, decoding: Decoding, recorded: Recorded | None,
                    runs: Sequence[MethodRun], info: dict[str, Any], models: tuple[str, str],
                    n_boot: int = 10_000) -> Any:
    """The TaskResult (pipeline/evaluation/methods/run.py) of the recorded runs (the references first,
    the skyline last, as in xmodel's tables) and the outside ones, summarized together: every outside
    row gets its Wilson interval and exact McNemar tests against the recorded b_alone and nl. Without a
    record (not evaluated yet) the outside rows alone, each against its controls; `recorded` says so."""
    from dataclasses import asdict

    from pipeline.evaluation.methods.run import REFERENCE_FIRST, TaskResult
    from pipeline.evaluation.results import summarize

    have = recorded.runs if recorded is not None else {}
    clash = [r.name for r in runs if r.name in have]
    if clash:
        raise ValueError(f"outside runs named like recorded ones: {clash}")
    ref = [have[n] for n in REFERENCE_FIRST if n in have]
    rest = [r for n, r in have.items() if n not in (*REFERENCE_FIRST, "skyline")]
    sky = [have["skyline"]] if "skyline" in have else []
    all_runs = [*ref, *rest, *runs, *sky]
    summary = summarize(prompts, all_runs, n_boot=n_boot)
    layers = (recorded.details.get("layers") if recorded is not None else None) or {}
    base = {"n_items": len(prompts.ids), "models": {"a": models[0], "b": models[1]}, "decoding": asdict(decoding),
            "items": prompts.source,
            "recorded": ({"record": str(recorded.details_path), "methods": list(have)} if recorded is not None
                         else None)}
    return TaskResult(task, layers.get("k"), layers.get("j"), summary, all_runs, prompts, {**base, **info})


def write_result(folder: Path | str, result: Any) -> dict[str, Path]:
    """The result's record, predictions and table under `folder` (RESULT_FILES), together or none."""
    from pipeline.artifacts import Outputs, dumps

    folder = Path(folder)
    paths = {k: folder / v.format(task=result.task) for k, v in RESULT_FILES.items()}
    with Outputs() as out:
        out.json(paths["details"], result.metrics())
        out.text(paths["predictions"], "".join(dumps(row, indent=None) + "\n" for row in result.predictions()))
        out.text(paths["table"], result.table() + "\n")
    return paths
