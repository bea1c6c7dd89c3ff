"""Scores with 95% intervals, paired comparisons, the Markdown table, the bar chart and JSON output."""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

from pipeline.tasks.base import TaskPrompts


def summarize(prompts: TaskPrompts, runs: Sequence[Any], n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Per method (runs: pipeline.evaluation.methods.MethodRun): each score with a 95% interval, the
    compute, the graft diagnostics, and paired comparisons against b_alone and nl (McNemar on binary
    scores, paired bootstrap on every score)."""
    from pipeline.evaluation.diagnostics import summarize_diagnostics
    from pipeline.stats import bootstrap_mean, mcnemar_exact, paired_bootstrap, wilson_interval

    by_name = {r.name: r for r in runs}
    out: dict[str, Any] = {}
    for r in runs:
        entry: dict[str, Any] = {"n": len(r.texts)}
        for key, values in r.scores.items():
            mean = sum(values) / len(values) if values else float("nan")
            if key in prompts.binary:
                lo, hi = wilson_interval(int(round(sum(values))), len(values))
                how = "wilson"
            else:
                lo, hi = bootstrap_mean(values, n_boot=n_boot, seed=seed)
                how = "bootstrap"
            entry[key] = {"mean": mean, "lo": lo, "hi": hi, "interval": how}
        entry["compute"] = asdict(r.compute)
        if r.diagnostics:
            entry["diagnostics"] = summarize_diagnostics(r.diagnostics, n_boot=n_boot, seed=seed)
        if r.details:
            entry["details"] = r.details
        entry["family"] = r.family
        if r.bytes_sent:
            entry["bytes_sent"] = sum(r.bytes_sent) / len(r.bytes_sent)  # per item, on average
        if r.control_of:
            entry["control_of"], entry["control"] = r.control_of, r.control
        refs = [(ref, by_name.get(ref)) for ref in ("b_alone", "nl")]
        # a latent method against each of its controls: information, not a nudge, is a gain over these
        refs += [(c.control, c) for c in runs if c.control_of == r.name]
        for ref, other_run in refs:
            if other_run is None or other_run is r:
                continue
            cmp: dict[str, Any] = {}
            for key, values in r.scores.items():
                other = other_run.scores[key]
                c = {"paired_bootstrap": paired_bootstrap(values, other, n_boot=n_boot, seed=seed).to_json()}
                if key in prompts.binary:
                    c["mcnemar"] = mcnemar_exact(values, other).to_json()
                cmp[key] = c
            mine, theirs = r.diagnostics.get("gold_logprob"), other_run.diagnostics.get("gold_logprob")
            if mine and theirs and all(math.isfinite(x) for x in [*mine, *theirs]):
                cmp["gold_logprob"] = {"paired_bootstrap": paired_bootstrap(mine, theirs, n_boot=n_boot,
                                                                            seed=seed).to_json()}
            entry[f"vs_{ref}"] = cmp
        out[r.name] = entry
    return out


# lm-evaluation-harness's per-sample log (its `--log_samples` samples_<task>.jsonl), so that its
# tools and others that read it can pair and compare runs item by item. One line per method and
# item; `method` names the run (the harness writes one file per model; filter a file by it).
def harness_samples(prompts: TaskPrompts, predictions: Sequence[dict[str, Any]], decoding: Any) -> list[dict[str, Any]]:
    """Per (method, item) of `predictions` (TaskResult.predictions(): {"id", "gold", <method>: {"text",
    scores..., "bytes_sent"?}}): doc_id, doc, target, arguments (B's own prompt and the decoding, as
    the harness's generate_until request; what A sent is counted in bytes_sent), resps, filtered_resps
    (the part of the reply the scores read), filter, metrics and each metric's value, and the harness's
    doc/prompt/target hashes (sha256)."""
    import hashlib
    import json

    def sha(text: str) -> str:
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    gen_kwargs = {"until": list(decoding.stop_strings), "max_gen_toks": decoding.max_new_tokens,
                  "do_sample": decoding.sampling != "greedy"}
    if decoding.sampling != "greedy":
        gen_kwargs.update(temperature=decoding.temperature, top_p=decoding.top_p)
    shown = prompts.shown or (lambda text: text)
    methods = [k for k in (predictions[0] if predictions else {}) if k not in ("id", "gold")]
    out = []
    for method in methods:
        for i, row in enumerate(predictions):
            pred = row[method]
            metrics = {k: pred[k] for k in prompts.columns if k in pred}
            context = prompts.skyline[i] if method == "skyline" and prompts.skyline is not None else prompts.b[i]
            doc = {"id": row["id"], "prompt_a": prompts.a[i], "prompt_b": prompts.b[i], "gold": row["gold"]}
            sample = {"doc_id": i, "doc": doc, "target": row["gold"],
                      "arguments": {"gen_args_0": {"arg_0": context, "arg_1": gen_kwargs}},
                      "resps": [[pred["text"]]], "filtered_resps": [shown(pred["text"])],
                      "filter": "none" if prompts.shown is None else "scored",
                      "metrics": list(metrics), "doc_hash": sha(json.dumps(doc, indent=2, ensure_ascii=False)),
                      "prompt_hash": sha(context), "target_hash": sha(str(row["gold"])), **metrics,
                      "method": method}
            if "bytes_sent" in pred:  # what A sent B for this item (text bytes, vectors, caches)
                sample["bytes_sent"] = pred["bytes_sent"]
            out.append(sample)
    return out


def format_table(summary: dict[str, Any], columns: Sequence[str]) -> str:
    """A Markdown table: each score [95% interval] (columns, primary first), p vs B alone and vs NL
    on the primary score, first-token agreement with the skyline, compute."""
    primary = columns[0]
    head = "| method | n |" + "".join(f" {c} [95% CI] |" for c in columns)
    head += " Δ vs B alone (p) | Δ vs NL (p) | first token = skyline's | A tokens | B tokens | GFLOP | seconds |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for name, e in summary.items():
        row = f"| {name} | {e['n']} |"
        for c in columns:
            s = e[c]
            row += f" {100 * s['mean']:.1f} [{100 * s['lo']:.1f}, {100 * s['hi']:.1f}] |"
        for ref in ("vs_b_alone", "vs_nl"):
            c = e.get(ref, {}).get(primary)
            if c is None:
                row += " — |"
                continue
            p = c.get("mcnemar", c["paired_bootstrap"])["p_value"]
            row += f" {100 * c['paired_bootstrap']['diff']:+.1f} ({p:.3g}) |"
        agree = e.get("diagnostics", {}).get("agree_skyline", {})
        row += f" {100 * agree['mean']:.0f}% |" if "mean" in agree else " — |"
        comp = e["compute"]
        row += f" {comp['a_tokens']} | {comp['b_tokens']} | {comp['flops'] / 1e9:.1f} | {comp['seconds']:.1f} |"
        lines.append(row)
    return "\n".join(lines)


def fill(title: str, fig: Any, points: float = 10.0) -> str:
    """The title wrapped to the figure's width, so that it is never cut off at the edges."""
    import textwrap

    width = fig.get_size_inches()[0] * 72 / (0.6 * points)  # characters of ~0.6 em per line
    return "\n".join(textwrap.wrap(title, max(20, int(width))))


def plot_scores(summary: dict[str, Any], key: str, path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.artifacts import save_figure

    names = list(summary)
    means = [100 * summary[m][key]["mean"] for m in names]
    # Wilson intervals always hold the mean; max() only absorbs rounding (matplotlib refuses a -1e-17)
    lo = [max(0.0, 100 * (summary[m][key]["mean"] - summary[m][key]["lo"])) for m in names]
    hi = [max(0.0, 100 * (summary[m][key]["hi"] - summary[m][key]["mean"])) for m in names]
    fig, ax = plt.subplots(figsize=(max(5, 0.8 * len(names) + 2), 3.6))
    ax.bar(range(len(names)), means, yerr=[lo, hi], capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylabel(f"{key} (%) with 95% CI")
    ax.set_ylim(0, 100)
    ax.set_title(fill(title, fig), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)  # atomic; joins the stage's artifacts.Outputs
    plt.close(fig)
    return path
