"""One Markdown report of a pipeline run, built only from the files the stages wrote.

Reads data/models/*.json, the stores' zarr.json attributes, data/details/*.json (each stage's
full record; data/metrics/ holds only their headline numbers, for DVC) and links data/plots/*.png;
it never imports model or evaluation code and never loads a model, so it takes
well under a second and works on a copy of data/ without the stores' arrays. An upstream output
that is missing (a task that was not run) makes its section say "not run"; no details at all is a
UserError, since a report of nothing is a mistake (wrong data dir, or `dvc repro` not run yet).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config_tasks import TASK_SECTIONS as TASKS  # the task names, from params' types (no task code)
from pipeline.errors import UserError
from pipeline.headlines import best, best_of_family, comparison, control_test  # the family rule (plain AC, AC (W), KV), one owner

ROLES = ("a", "b")
NOT_RUN = "_not run_"
REPORT_FILES = ("report.md", "report.html")  # all the report folder holds: anything else there is not ours
_NONFINITE: set[str] = set()  # files read by this report that hold NaN or infinities


@dataclass(frozen=True)
class ReportConfig:
    data: Path  # the pipeline's data dir (params paths.data)
    aligners: tuple[str, ...]  # params fit.aligners, in params order
    facts: dict[str, Any]  # params shown under "What was run" (corpus, layers, split, ...)
    fingerprint: str  # of every params section that decides the results
    html: bool = True  # also report.html when a Markdown renderer is installed

    @property
    def layout(self):
        from pipeline.artifacts import Layout  # the one owner of the data dir's paths

        return Layout(self.data)

    @property
    def out_dir(self) -> Path:
        return self.layout.report_dir

    def details(self, name: str) -> Path:
        return self.layout.details(name)

    def plot(self, name: str) -> Path:
        return self.layout.plot(name)


def config_from_params(params: Any) -> ReportConfig:
    from dataclasses import asdict

    from pipeline.config import fingerprint

    sections = {s: getattr(params, s) for s in ("models", "corpus", "extract", "fit", "grid", "evaluate")}
    ev = params.evaluate
    facts = {"corpus": asdict(params.corpus), "extract_layers": list(params.extract.layers),
             "max_tokens": params.extract.max_tokens, "fit_kind": params.fit.kind,
             "fit_layers": list(params.fit.layers), "heldout_frac": params.fit.heldout_frac,
             "split_seed": params.fit.seed, "evaluate_layers": [ev.layer_a, ev.layer_b]}
    return ReportConfig(data=Path(params.paths.data), aligners=tuple(params.fit.aligners), facts=facts,
                        fingerprint=fingerprint({k: asdict(v) if hasattr(v, "__dataclass_fields__") else v
                                                 for k, v in sections.items()}))


def write_report(cfg: ReportConfig) -> dict[str, Path]:
    """Write report.md (and report.html if possible) under <data>/report; returns the paths written."""
    from pipeline.artifacts import write_folder

    text = build_report(cfg)
    html = _html(text) if cfg.html else None
    files = {"report.md": text} | ({"report.html": html} if html is not None else {})
    # the folder is replaced whole: never an HTML of an older run beside the new Markdown, never half
    write_folder(cfg.out_dir, files, "report folder", allowed=REPORT_FILES)
    out = {"markdown": cfg.out_dir / "report.md"}
    if html is not None:
        out["html"] = cfg.out_dir / "report.html"
    return out


def build_report(cfg: ReportConfig) -> str:
    from contextlib import ExitStack

    from pipeline.artifacts import aligner_lock, settle, shared

    _check_inputs(cfg)
    with ExitStack() as held:
        for name in cfg.aligners:  # the readers' side of each aligner's lock: no fit commits while this reads
            directory = cfg.layout.aligner(name)
            held.enter_context(shared(aligner_lock(directory), directory))
        settle(cfg.layout)  # a stage killed between the renames of its outputs is finished first
        return _build(cfg)


def _build(cfg: ReportConfig) -> str:
    _NONFINITE.clear()
    parts = [_header(cfg), _answer_section(cfg), _run_section(cfg), _cka_section(cfg), _aligner_section(cfg)]
    parts += [_task_section(cfg, task) for task in TASKS]
    parts += [_similarity_section(cfg), _sweep_section(cfg)]
    if _NONFINITE:  # a NaN is a failure, never a score: say so at the top
        parts.insert(1, f"**Warning: non-finite values (NaN/inf) in {', '.join(f'`{p}`' for p in sorted(_NONFINITE))}**: "
                        "they are shown as — and never count as a best score; rerun the stage that wrote them.")
    parts[1:1] = [f"**Warning: {line}**" for line in changed_aligners(cfg.layout)]
    return "\n\n".join(p.rstrip() for p in parts) + "\n"


def changed_aligners(layout) -> list[str]:
    """One line per evaluation record whose aligner has changed (refitted or removed) since it ran:
    its scores are not the aligner's now in data/aligners/."""
    from pipeline.artifacts import aligner_lock, folder_hash, shared

    out = []
    for record in sorted(layout.details_dir.glob("evaluate-*.json")):
        used = (_read(record) or {}).get("aligners_used")
        for key, u in (used.items() if isinstance(used, dict) else ()):
            if not isinstance(u, dict) or not isinstance(u.get("path"), str):
                continue
            directory = layout.data / u["path"]  # relative to the data dir, or absolute
            with shared(aligner_lock(directory), directory):
                now = folder_hash(directory)
            if now != u.get("fingerprint"):
                how = "been removed" if now is None else "been refitted"
                task = record.stem.removeprefix("evaluate-")
                out.append(f"`{record.stem}` used aligner `{key}` ({str(u.get('fingerprint'))[:12]}), which has since "
                           f"{how} ({directory}): its scores are not the current aligner's; rerun `xmodel evaluate {task}`")
    return out


def _check_inputs(cfg: ReportConfig) -> None:
    details = cfg.layout.details_dir
    if not cfg.data.is_dir():
        raise UserError(f"report: data dir {cfg.data} does not exist: run `dvc repro` first, or set paths.data")
    if not details.is_dir() or not any(details.glob("*.json")):
        raise UserError(f"report: no stage records in {details}: run `dvc repro` (or the stages) first")


# --- reading --------------------------------------------------------------------------------------------

def _read(path: Path) -> dict[str, Any] | None:
    """The JSON object in `path`, or None if the file does not exist (its stage was not run)."""
    def nonfinite(constant: str) -> None:  # NaN, Infinity, -Infinity: Python's json reads them, JSON has none
        _NONFINITE.add(str(path))

    try:
        data = json.loads(path.read_text(), parse_constant=nonfinite)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"report: {path} is not valid JSON ({e}): rerun the stage that writes it") from None
    if not isinstance(data, dict):
        raise UserError(f"report: {path} holds a {type(data).__name__}, expected a JSON object: rerun its stage")
    return data


def _store_attrs(cfg: ReportConfig, role: str) -> dict[str, Any]:
    # zarr.json is plain JSON: width and depth without opening the store (or importing zarr)
    meta = _read(cfg.layout.store(role) / "zarr.json") or {}
    return meta.get("attributes", {})


# --- formatting -----------------------------------------------------------------------------------------

def _num(value: Any, fmt: str = ".3f") -> str:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return "—" if value is None else str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "—"
    if fmt == "d" and isinstance(value, float):
        fmt = ".0f"
    return format(value, fmt)


def _pct_ci(s: dict[str, Any] | None) -> str:
    """A mean and its 95% interval, in percent."""
    if not s:
        return "—"
    return f"{_num(_scaled(s.get('mean')), '.1f')} [{_num(_scaled(s.get('lo')), '.1f')}, {_num(_scaled(s.get('hi')), '.1f')}]"


def _ci(s: dict[str, Any] | None, fmt: str = ".3f") -> str:
    if not s:
        return "—"
    return f"{_num(s.get('mean'), fmt)} [{_num(s.get('lo'), fmt)}, {_num(s.get('hi'), fmt)}]"


def _scaled(v: Any) -> Any:
    return 100 * v if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _plot_link(cfg: ReportConfig, name: str, alt: str) -> str:
    # relative to data/report/, so the report and its HTML render anywhere data/ is copied
    return f"![{alt}](../plots/{name}.png)" if cfg.plot(name).exists() else f"(plot {cfg.plot(name)}: {NOT_RUN})"


# --- sections -------------------------------------------------------------------------------------------

def _header(cfg: ReportConfig) -> str:
    from datetime import datetime, timezone

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = _git_commit()
    return "\n".join([
        "# xmodel report", "",
        f"Generated {when}" + (f" at git commit `{commit}`" if commit else "")
        + f"; params fingerprint `{cfg.fingerprint}` (models, corpus, extract, fit, grid, evaluate)."])


def _git_commit() -> str | None:
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:  # not a git checkout (e.g. a copied data dir's report)
        return None
    return done.stdout.strip() or None


def _run_section(cfg: ReportConfig) -> str:
    f = cfg.facts
    rows = []
    for role in ROLES:
        manifest = _read(cfg.layout.manifest(role)) or {}
        extract = _read(cfg.details(f"extract-{role}")) or {}
        attrs = _store_attrs(cfg, role)
        layers = extract.get("layers") or attrs.get("layers")
        depth = attrs.get("num_layers")
        rows.append([role.upper(), f"`{manifest.get('spec', attrs.get('model_spec', '—'))}`",
                     str(manifest.get("model_id") or attrs.get("identity", {}).get("model_id") or "—"),
                     f"`{str(manifest['sha'])[:12]}`" if manifest.get("sha") else "—",
                     _num(attrs.get("width"), "d"), _num(depth, "d"),
                     ", ".join(str(x) for x in layers) if layers else NOT_RUN,
                     _num(extract.get("n_seq"), "d") if extract else NOT_RUN,
                     _num(extract.get("n_tok"), "d") if extract else "—",
                     _num(extract["bytes_on_disk"] / 2**20, ".1f") if extract.get("bytes_on_disk") else "—"])
    corpus = f["corpus"]
    fit_a, fit_b = f["fit_layers"]
    lines = ["## What was run", "",
             _table(["model", "spec", "id", "sha", "width", "layers", "stored layers", "texts", "token rows", "store MiB"],
                    rows), "",
             f"- corpus: `{corpus['source']}`, {corpus['n']} texts asked for (seed {corpus['seed']}, "
             f"{corpus['min_chars']}–{corpus['max_chars']} characters), truncated to {f['max_tokens']} tokens",
             f"- extracted layers (params): {f['extract_layers']}",
             f"- aligners fitted on `{f['fit_kind']}` states of layers A {fit_a} → B {fit_b}; "
             f"{f['heldout_frac']:.0%} of the texts held out (seed {f['split_seed']}) for every score below",
             f"- evaluation grafts A's layer {f['evaluate_layers'][0]} into B's layer {f['evaluate_layers'][1]}"]
    return "\n".join(lines)


def _cka_section(cfg: ReportConfig) -> str:
    grid = _read(cfg.details("grid"))
    head = ["## Layer similarity (CKA)", ""]
    if grid is None:
        return "\n".join(head + [f"Grid {NOT_RUN} (`xmodel grid`)."])
    la, lb = grid.get("layers_a", []), grid.get("layers_b", [])
    out = head + [f"Debiased linear CKA of A's and B's `{grid.get('activation_kind')}` states on "
                  f"{grid.get('rows')} held-out texts; rows are A's layers, columns B's.", "",
                  _plot_link(cfg, "cka", "CKA heatmap"), ""]
    for key, title in (("cka", "CKA"), ("mutual_knn", f"mutual {grid.get('knn_k')}-NN overlap")):
        if key not in grid:
            continue
        rows = [[f"A L{a}"] + [_num(grid[key].get(f"a{a}", {}).get(f"b{b}")) for b in lb] for a in la]
        out += [f"{title}:", "", _table([""] + [f"B L{b}" for b in lb], rows), ""]
    return "\n".join(out)


ALIGNER_COLUMNS = (("retrieval_top1", "top-1", ".3f"), ("retrieval_top5", "top-5", ".3f"), ("mse", "MSE", ".4g"),
                   ("r2", "R²", ".3f"), ("cka", "CKA", ".3f"), ("infonce", "InfoNCE", ".3f"),
                   ("alignment", "alignment", ".3f"), ("uniformity", "uniformity", ".3f"))


def _aligner_section(cfg: ReportConfig) -> str:
    rows, scored = [], {}
    for name in cfg.aligners:
        m = _read(cfg.details(f"fit-{name}"))
        if m is None:
            rows.append([f"`{name}`", NOT_RUN] + ["—"] * (len(ALIGNER_COLUMNS) + 3))
            continue
        flagged = _nonfinite_scores(m)
        if not flagged:
            scored[name] = m
        epochs = f"{m['epochs_run']} (best {m.get('best_epoch')})" if "epochs_run" in m else "—"
        rows.append([f"`{name}`" + (f" ⚠ non-finite {flagged}" if flagged else ""), f"{m.get('d_source')}→{m.get('d_target')}, L{m.get('layer_a')}→L{m.get('layer_b')}",
                     f"{m.get('train_rows')} / {m.get('heldout_rows')}"]
                    + [_num(m.get(key), fmt) for key, _, fmt in ALIGNER_COLUMNS]
                    + [epochs, _num(m.get("fit_seconds"), ".1f")])
    out = ["## Aligners", "",
           "Held-out scores from `data/details/fit-NAME.json`: retrieval of each mapped A vector among the "
           "held-out B vectors (top-1, top-5), MSE and R² of the map, CKA of mapped vs target, InfoNCE, "
           "alignment and uniformity (Wang & Isola).", ""]
    if not cfg.aligners:
        return "\n".join(out + ["No aligners in params fit.aligners."])
    out.append(_table(["aligner", "dims, layers", "train / held-out rows"] + [c[1] for c in ALIGNER_COLUMNS]
                      + ["epochs", "fit s"], rows))
    best = _best(scored, "retrieval_top1", max), _best(scored, "mse", min)
    if best[0] and best[1]:
        out += ["", f"Best held-out top-1: `{best[0][0]}` ({best[0][1]:.3f}); lowest MSE: `{best[1][0]}` ({best[1][1]:.4g})."]
    return "\n".join(out)


def _nonfinite_scores(m: dict[str, Any]) -> str:
    """What makes an aligner's scores failures: mapped rows that are not finite, or a null/NaN
    retrieval or MSE (NaN is written as null; R² or CKA alone may be undefined for a constant
    target). Such an aligner is flagged and never named best."""
    if m.get("nonfinite_rows"):
        return f"({m['nonfinite_rows']} rows)"
    bad = [label for key, label, _ in ALIGNER_COLUMNS[:3]
           if not (isinstance(m.get(key), (int, float)) and math.isfinite(m[key]))]
    return f"({', '.join(bad)})" if bad else ""


def _best(scored: dict[str, dict], key: str, pick) -> tuple[str, float] | None:
    values = [(n, m[key]) for n, m in scored.items() if isinstance(m.get(key), (int, float)) and math.isfinite(m[key])]
    return pick(values, key=lambda nv: nv[1]) if values else None


# What the literature reports for the setting each task reproduces (../shared/PAPER.md), in percent,
# and on which of our scores (pipeline/tasks/scoring.py SCORES): KVComm reports token F1 (Table 8);
# the paper reports accuracy, which is our answer-contained accuracy on Countries (the country named in
# B's reply), option accuracy on Tip Sheets (the company B picks: a reply naming all three would
# "contain" the answer), and the final-number accuracy on GSM8K.
@dataclass(frozen=True)
class Published:
    source: str
    models: str
    score: str
    numbers: tuple[tuple[str, float], ...]  # (our method or family: b_alone, nl, ac, ac_w, skyline; percent)


LABELS = {"b_alone": "B alone", "nl": "NL", "ac": "AC", "ac_w": "AC(W)", "kv": "KV", "skyline": "skyline"}
PUBLISHED: dict[str, tuple[Published, ...]] = {
    "countries": (Published("paper", "LLaMA-3.2-3B ×2", "contains",
                            (("b_alone", 0), ("nl", 69), ("ac", 78), ("skyline", 84))),
                  Published("KVComm", "LLaMA-3.1-8B-Instruct ×2", "f1", (("b_alone", 0), ("nl", 58), ("ac", 0)))),
    "tipsheets": (Published("paper", "LLaMA-3.1-8B ×2", "option", (("b_alone", 54.3), ("nl", 85.7), ("ac", 95.7))),
                  Published("KVComm", "LLaMA-3.1-8B-Instruct ×2", "f1", (("b_alone", 5), ("nl", 87), ("ac", 36)))),
    "gsm8k": (Published("paper", "3.2-3B → 3.1-8B, both see the question", "accuracy",
                        (("b_alone", 60), ("nl", 75), ("ac", 64), ("ac_w", 66))),),
}


def published_cell(m: dict[str, Any]) -> str:
    """Each published number of the record's task, its score named, beside ours on that same score
    (a family's entry is its best method on the primary score, as in the answer table)."""
    task = m.get("task")
    if task not in PUBLISHED:
        return "not reported by the paper or KVComm" if task == "squad" else "—"
    methods = m.get("methods", {})
    picked = {fam: best_of_family(m, fam)[0] for fam in ("ac", "ac_w", "kv")}
    parts = []
    for pub in PUBLISHED[task]:
        theirs = ", ".join(f"{LABELS[k]} {v:g}" for k, v in pub.numbers)
        ours = []
        for k, _ in pub.numbers:
            name = picked.get(k, k)
            mean = ((methods.get(name) or {}).get(pub.score) or {}).get("mean") if name else None
            if isinstance(mean, (int, float)) and math.isfinite(mean):
                ours.append(f"{LABELS[k]} {100 * mean:.1f}")
        mine = f"ours: {', '.join(ours)}" if ours else f"ours: {pub.score} not recorded"
        parts.append(f"{pub.source}, {pub.models}, {pub.score}: {theirs} ({mine})")
    return "; ".join(parts)


def items_line(items: dict[str, Any]) -> str:
    """Where an evaluation's items came from, as its record says (pipeline/tasks/*: source, layout, split)."""
    if items.get("layout"):
        return f"`{items.get('file')}` ({items.get('rows')} rows, layout `{items['layout']}`)"
    extra = {"places": "places {}", "passages": "passages {}", "dataset": "{}", "split": "split {}"}
    return ", ".join([str(items.get("source"))] + [f.format(items[k]) for k, f in extra.items() if items.get(k)])


def answer_rows(label: str, m: dict[str, Any]) -> tuple[list[str], str]:
    """One row of "Does AC carry the information here?" for a task's details, and its sentence.

    Three families are each represented by their best method: plain AC (the f's that ran), AC through
    an aligner, and KV communication. Each one's p against B alone is multiplied by the number of
    methods it was picked from (Bonferroni), so picking the best does not pass for evidence."""
    methods, primary = m.get("methods", {}), m.get("primary")
    score = lambda name: (methods.get(name) or {}).get(primary) or {}  # noqa: E731
    agree = lambda name: (methods.get(name) or {}).get("diagnostics", {}).get("agree_skyline", {}).get("mean")  # noqa: E731

    def cell(name: str | None, p: float | None = None) -> str:
        if not name:
            return "—"
        tag = f" `{name}`" if name not in ("b_alone", "nl", "skyline") else ""
        return _pct_ci(score(name)) + tag + (f" (p {p:.2g})" if p is not None and tag else "")

    ac, diff, p = best_of_family(m, "ac")
    acw, diff_w, p_w = best_of_family(m, "ac_w")
    kv, diff_kv, p_kv = best_of_family(m, "kv")
    lat, diff_lat, p_lat = best_of_family(m, "latent")
    layers = m.get("layers", {})
    side = (m.get("items") or {}).get("places")
    row = [f"`{m.get('task')}`" + (f" ({side} places)" if side in ("train", "eval") else ""), label, f"{layers.get('k')} → {layers.get('j')}", _num(m.get("n_items"), "d"), primary,
           cell("b_alone" if "b_alone" in methods else None), cell("nl" if "nl" in methods else None), cell(ac, p),
           cell(acw, p_w), cell(kv, p_kv), cell(lat, p_lat), cell("skyline" if "skyline" in methods else None),
           f"{_num(_scaled(agree(ac)), '.0f')} / {_num(_scaled(agree('b_alone')), '.0f')}",
           published_cell(m)]
    b, sky = score("b_alone").get("mean"), score("skyline").get("mean")

    def verdict(what: str, name: str | None, d: float | None, q: float | None) -> str:
        if name is None or d is None:
            return ""
        control = control_test(m, name)
        if d > 0 and q is not None and q < 0.05 and control is not None and not (control[0] > 0 and control[1] < 0.05):
            # above B alone, but another item's message does as well: a nudge, not information
            return (f"{what} moves B but carries no information detectably: `{name}` is {100 * d:+.1f} points over B "
                    f"alone (p {q:.2g}) but {100 * control[0]:+.1f} from its mismatched control (p {control[1]:.2g}).")
        if d > 0 and q is not None and q < 0.05:
            share = (f", {100 * d / (sky - b):.0f}% of the way from B alone to the skyline"
                     if isinstance(sky, float) and isinstance(b, float) and sky > b else "")
            return f"{what} carries information here: `{name}` is {100 * d:+.1f} points over B alone (p {q:.2g}){share}."
        if d < 0 and q is not None and q < 0.05:  # a graft that misleads B is a finding, not a null
            return f"{what} hurts here: `{name}` is {100 * d:+.1f} points below B alone (p {q:.2g})."
        return f"{what} does not carry it detectably: `{name}` is {100 * d:+.1f} points from B alone (p {_num(q, '.2g')})."

    parts = [verdict("Plain AC", ac, diff, p), verdict("AC through an aligner", acw, diff_w, p_w),
             verdict("KV communication", kv, diff_kv, p_kv), verdict("The best cross-model latent method", lat,
                                                                     diff_lat, p_lat)]
    if ac is not None and diff is not None and not (diff > 0 and p is not None and p < 0.05):
        parts.append(f"B's first token equals the skyline's on {_num(_scaled(agree(ac)), '.0f')}% of items with "
                     f"plain AC, {_num(_scaled(agree('b_alone')), '.0f')}% alone.")
    _, diff_sky, p_sky = best(m, ["skyline"])
    if diff_sky is not None and not (diff_sky > 0 and p_sky is not None and p_sky < 0.05):
        parts.insert(0, f"B reading A's information itself (the skyline) is {100 * diff_sky:+.1f} points from B alone "
                        f"(p {_num(p_sky, '.2g')}): this B cannot use the information even when it reads it, so no "
                        "method can show it carried.")
    sentence = " ".join(x for x in parts if x) or "No communication method was run against B alone here."
    return row, sentence


ANSWER_HEAD = ["task", "A → B", "k → j", "n", "score", "B alone", "NL", "AC (best f)", "AC (W)", "KV",
               "latent (multi-vector, mapped KV, fuser)", "skyline", "first token = skyline's, AC / B alone (%)", "published"]


def answer_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    """The answer table and one sentence per row, for (pair label, task details) pairs."""
    rows, sentences = [], []
    for label, m in runs:
        row, sentence = answer_rows(label, m)
        rows.append(row)
        sentences.append(f"- `{m.get('task')}`, {label}: {sentence}")
    return "\n".join([_table(ANSWER_HEAD, rows), "", *sentences])


def _answer_section(cfg: ReportConfig) -> str:
    head = ["## Does AC carry the information here?", "",
            "Per task: the primary score in percent with 95% intervals for B alone, natural language (A's "
            "message), AC with the best plain f and the best aligner, KV-cache communication, and the skyline "
            "(B reading what A read). p: each family's best method against B alone on the same items (McNemar or "
            "paired bootstrap), Bonferroni-corrected for picking the best of the family. Published numbers are for "
            "the paper's or KVComm's corresponding setting (other models), each with the score it is (KVComm: F1; the "
            "paper: accuracy, our `contains` on Countries and `option` on Tip Sheets) and ours on that same score.", ""]
    runs = task_details(cfg.data)
    if not runs:
        return "\n".join(head + [f"No task was evaluated ({NOT_RUN})."])
    return "\n".join(head + [answer_table(runs)])


def task_details(data: Path) -> list[tuple[str, dict[str, Any]]]:
    """(pair label, details) of every registered task evaluated in a data dir, in registry order. A
    records folder (results/<run>/) holds the same files flat: <dir>/evaluate-<task>.json."""
    from pipeline.artifacts import Layout

    runs = []
    for task in TASKS:
        name = f"evaluate-{task}"
        path = Layout(Path(data)).details(name)
        m = _read(path)
        if m is None:
            path = Path(data) / f"{name}.json"
            m = _read(path)
        if m is not None:
            runs.append(_evaluation_record(path, m))
    return runs


def _evaluation_record(path: Path, m: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(pair label, m) of an evaluation record; one line naming the file if it is not one (JSON of
    another tool under the name: a row of it cannot be made)."""
    models = m.get("models")
    try:
        label = f"{models.get('a')} → {models.get('b')}"
        if not isinstance(m.get("primary"), str) or not isinstance(m.get("methods"), dict):
            raise TypeError("no primary score or methods")
        answer_rows(label, m)
    except (AttributeError, TypeError, KeyError, ValueError):
        raise UserError(f"report: {path} is not an evaluation record of xmodel's (its fields: "
                        f"{', '.join(sorted(m)[:8]) or 'none'}): rerun `xmodel evaluate` there, or point --answer at "
                        "another folder") from None
    return label, m


def _task_section(cfg: ReportConfig, task: str) -> str:
    m = _read(cfg.details(f"evaluate-{task}"))
    head = [f"## Evaluation: {task}", ""]
    if m is None:
        return "\n".join(head + [f"{NOT_RUN} (`dvc repro evaluate@{task}` or `xmodel evaluate {task}`)."])
    methods: dict[str, Any] = m.get("methods", {})
    primary = m.get("primary")
    first = next(iter(methods.values()), {})
    # the task's columns (primary first); older records: every entry carrying an interval
    keys = m.get("columns") or [primary] + [k for k, v in first.items()
                                            if k != primary and isinstance(v, dict) and "lo" in v]
    rows = []
    for name, e in methods.items():
        row = [f"`{name}`", _num(e.get("n"), "d")] + [_pct_ci(e.get(k)) for k in keys]
        row.append(_delta(e, "b_alone", primary, ".3g"))
        row.append(_pct_ci(e.get("diagnostics", {}).get("agree_skyline")))
        c = e.get("compute", {})
        row += [_num(c.get("a_tokens"), "d"), _num(c.get("b_tokens"), "d"),
                _num(c["flops"] / 1e9, ".2f") if isinstance(c.get("flops"), (int, float)) else "—",
                _num(c.get("seconds"), ".1f")]
        rows.append(row)
    layers, models = m.get("layers", {}), m.get("models", {})
    decoding = ", ".join(f"{k} {v}" for k, v in (m.get("decoding") or {}).items())
    out = head + [f"{m.get('n_items')} items, setting `{m.get('setting')}`, A `{models.get('a')}` layer k = "
                  f"{layers.get('k')} → B `{models.get('b')}` layer j = {layers.get('j')}"
                  + (f"; decoding: {decoding}" if decoding else "") + ".",
                  *([f"Items: {items_line(m['items'])}."] if isinstance(m.get("items"), dict) else []),
                  f"Scores in percent with 95% intervals (Wilson for binary scores, bootstrap otherwise); "
                  f"Δ vs B alone in points on `{primary}`, p from McNemar (binary) or a paired bootstrap.", "",
                  _table(["method", "n"] + [f"{k} [95% CI]" for k in keys]
                         + ["Δ vs B alone (p)", "first token = skyline's [95% CI]", "A tokens", "B tokens",
                            "GFLOP", "seconds"], rows), "",
                  _plot_link(cfg, f"evaluate-{task}", f"{task} accuracy per method")]
    if task in PUBLISHED:
        out += ["", f"Published (other models; each number's score named, ours on the same score): {published_cell(m)}."]
    return "\n".join(out)


def _similarity_section(cfg: ReportConfig) -> str:
    m = _read(cfg.details("evaluate-similarity"))
    head = ["## Similarity probe", ""]
    if m is None:
        return "\n".join(head + [f"{NOT_RUN} (`dvc repro evaluate@similarity` or `xmodel evaluate similarity`)."])
    rows = []
    for name, e in m.get("variants", {}).items():
        for key in e:
            if not key.endswith("/matched"):
                continue
            f = key.split("/")[0]
            matched, shuffled = e[key], e.get(f"{f}/shuffled", {})
            rows.append([f"`{name}`", f, _ci(matched.get("kl")), _num(shuffled.get("kl", {}).get("mean")),
                         _ci(matched.get("cosine")), _num(shuffled.get("cosine", {}).get("mean")),
                         _ci(e.get("vector_cosine")), _ci(e.get("vector_rel_sq_error"))])
    out = head + [f"On {m.get('n')} held-out sentences, A's layer-{m.get('k')} state grafted into B's layer "
                  f"{m.get('j')} (raw, or through each aligner): KL(B's own next-token distribution ‖ B with the "
                  "graft) and cosine of B's last hidden state with and without it, against the same with another "
                  "sentence's vector (shuffled); vector cos/error compare the mapped vector with B's own layer-j "
                  "state. Lower KL, higher cosine = closer to B's own run; 95% bootstrap intervals.", "",
                  _table(["aligner", "f", "KL matched", "KL shuffled", "cos matched", "cos shuffled",
                          "vector cos", "vector rel. sq. error"], rows), "",
                  _plot_link(cfg, "evaluate-similarity", "similarity probe")]
    return "\n".join(out)


def _sweep_section(cfg: ReportConfig) -> str:
    m = _read(cfg.details("evaluate-sweep"))
    head = ["## Layer sweep (k, j)", ""]
    if m is None:
        return "\n".join(head + [f"{NOT_RUN} (`xmodel evaluate sweep`; not a DVC stage)."])
    grids = m.get("grids") or {m.get("metric"): m.get("grid", [])}
    reference = (m.get("reference") or {}).get("b_alone", {m.get("metric"): m.get("b_alone")})
    out = head + [f"Plain AC ({m.get('mode')}) on {m.get('n')} `{m.get('task')}` items drawn apart from the "
                  "evaluation's, for every (k, j) below; in percent."]
    for key in (m.get("metric"), "agree_skyline"):
        if key not in grids:
            continue
        rows = [[f"k = {k}"] + [_num(_scaled(v), ".1f") for v in row] for k, row in zip(m.get("layers_a", []), grids[key])]
        label = "B's first token = the skyline's" if key == "agree_skyline" else f"`{key}`"
        out += ["", f"{label} (B alone: {_num(_scaled(reference.get(key)), '.1f')}):", "",
                _table([""] + [f"j = {j}" for j in m.get("layers_b", [])], rows)]
    out += ["", _plot_link(cfg, "evaluate-sweep", "layer sweep")]
    return "\n".join(out)


def _html(markdown_text: str) -> str | None:
    """report.html via markdown-it-py when it is installed (it usually is, through dvc's rich); else None."""
    try:
        from markdown_it import MarkdownIt
    except ImportError:
        return None
    body = MarkdownIt("commonmark").enable("table").render(markdown_text)
    style = ("body{font-family:sans-serif;max-width:80em;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>xmodel report</title>"
            f"<style>{style}</style></head>\n<body>\n{body}</body></html>\n")


# ---------------------------------------------------------------------------------------------
# Every method of a run, one row each (the cross-model table), and the bandwidth curve

METHOD_HEAD = ["task", "A → B", "method", "family", "n", "score [95% CI]", "Δ vs B alone (p)", "Δ vs NL (p)",
               "Δ vs mismatched (p)", "gold log-lik [95% CI]", "bytes sent / item", "GFLOP / item − NL's"]


def _delta(e: dict[str, Any], ref: str, primary: str, p_format: str = ".2g") -> str:
    """"+d (p P)": the entry's paired comparison with `ref` on the primary score, or — where none."""
    against = comparison(e, ref, primary)
    if against is None:
        return "—"
    return f"{_num(_scaled(against[0]), '+.1f')} (p {_num(against[1], p_format)})"


def method_rows(label: str, m: dict[str, Any]) -> list[list[str]]:
    """One row per method of a task's details: its score, paired tests against B alone, NL and its
    mismatched control, B's gold log-likelihood, what it sent and what it cost beyond NL."""
    methods, primary, n = m.get("methods", {}), m.get("primary"), m.get("n_items") or 1
    nl_flops = ((methods.get("nl") or {}).get("compute") or {}).get("flops")
    side = (m.get("items") or {}).get("places")
    task = f"`{m.get('task')}`" + (f" ({side} places)" if side in ("train", "eval") else "")
    rows = []
    for name, e in methods.items():
        gold = (e.get("diagnostics") or {}).get("gold_logprob") or {}
        gold_cell = (f"{gold['mean']:.2f} [{gold['lo']:.2f}, {gold['hi']:.2f}]" if "mean" in gold else "—")
        flops = (e.get("compute") or {}).get("flops")
        extra = (_num((flops - nl_flops) / n / 1e9, "+.2f") if isinstance(flops, (int, float))
                 and isinstance(nl_flops, (int, float)) else "—")
        rows.append([task, label, f"`{name}`", str(e.get("family", "—")), _num(e.get("n"), "d"),
                     _pct_ci(e.get(primary)), _delta(e, "b_alone", primary), _delta(e, "nl", primary),
                     _delta(e, "mismatched", primary), gold_cell, _num(e.get("bytes_sent"), ".0f"), extra])
    return rows


def method_table(runs: list[tuple[str, dict[str, Any]]]) -> str:
    return _table(METHOD_HEAD, [row for label, m in runs for row in method_rows(label, m)])


def _bandwidth_panels(runs: list[tuple[str, dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Panel title -> {method: entry}: one panel per task, place split and pair, whatever records its
    methods come from (a table split over several runs is one curve). A reference or text method seen
    again (b_alone, repeated as each run's paired baseline) keeps its first entry; another method
    seen again is another aligner or setting under the same name (two runs' `lora`), so it is kept
    too, named with its run. Every entry keeps its record's primary score."""
    panels: dict[str, dict[str, dict[str, Any]]] = {}
    for label, m in runs:
        models, side = m.get("models") or {}, (m.get("items") or {}).get("places")
        title = (f"{m.get('task')}" + (f" ({side} places)" if side in ("train", "eval") else "")
                 + f": {models.get('a')} → {models.get('b')}")
        panel = panels.setdefault(title, {})
        for name, e in (m.get("methods") or {}).items():
            if name in panel and e.get("family") not in ("reference", "text"):
                name = f"{name} [{label.rsplit(' [', 1)[-1].rstrip(']')}]"  # the run's folder where the CLI named it
            panel.setdefault(name, {**e, "primary": m.get("primary")})
    return {title: panel for title, panel in panels.items() if panel}


def plot_bandwidth(runs: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """Score against bytes sent per item (log scale), one panel per task, place split and pair: every
    method that sent something (controls left out), text beside the latent ones, B alone and the
    skyline as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.artifacts import save_figure

    panels = _bandwidth_panels(runs)
    cols = min(3, max(1, len(panels)))
    rows = max(1, -(-len(panels) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, methods) in zip(axes.flat, panels.items()):
        primary = next(iter(methods.values()))["primary"]
        for name, e in methods.items():
            s, b = e.get(primary) or {}, e.get("bytes_sent")
            if e.get("family") in ("control", "reference") or not b or "mean" not in s:
                continue
            # max(): a Wilson bound at the mean differs from it by rounding only (matplotlib refuses -1e-17)
            err = [[max(0.0, 100 * (s["mean"] - s["lo"]))], [max(0.0, 100 * (s["hi"] - s["mean"]))]]
            ax.errorbar([b], [100 * s["mean"]], yerr=err,
                        fmt="s" if e.get("family") == "text" else "o", capsize=3)
            ax.annotate(name, (b, 100 * s["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for ref, style in (("b_alone", ":"), ("skyline", "--")):
            if "mean" in (methods.get(ref) or {}).get(primary, {}):
                ax.axhline(100 * methods[ref][primary]["mean"], linestyle=style, color="grey", label=ref)
        ax.set_xscale("log")
        ax.set_xlabel("bytes sent per item (log)")
        ax.set_ylabel(f"{primary} (%) with 95% CI")
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, loc="upper left")
        ax.set_title(title, fontsize=8, wrap=True)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
