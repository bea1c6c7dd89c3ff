"""`xmodel report`: one Markdown file from the files the stages wrote; nothing is loaded or recomputed.

The inputs are written here in the stages' formats (the keys of data/details/: extract-*.json,
fit-*.json, grid.json, evaluate-*.json, and the stores' zarr.json attributes), so the report is checked
against known numbers without running the pipeline (tests/test_dvc.py runs it for real).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT, run_cli, write_params


def _write(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def _interval(mean, lo, hi, how=None):
    return {"mean": mean, "lo": lo, "hi": hi, **({"interval": how} if how else {})}


def _method(n, em, f1, seconds):
    return {"n": n, "em": _interval(*em, "wilson"), "f1": _interval(*f1, "bootstrap"),
            "compute": {"a_tokens": 120, "a_blocks": 2, "b_tokens": 340, "a_new_tokens": 0, "b_new_tokens": 16,
                        "flops": 2.5e9, "seconds": seconds}}


@pytest.fixture
def outputs(tmp_path) -> Path:
    """params.yaml plus a data dir as `dvc repro` leaves it, without evaluate@gsm8k and the sweep."""
    data = tmp_path / "data"
    for role, (spec, width, depth, layers) in {"a": ("synthetic:tiny-llama", 64, 3, [0, 2, 3]),
                                               "b": ("synthetic:tiny-qwen", 48, 4, [0, 2, 4])}.items():
        _write(data / "models" / f"{role}.json", {"spec": spec, "model_id": spec, "revision": None,
                                                  "path": "/nowhere", "sha": "ab" * 32, "source": "synthetic"})
        _write(data / "stores" / f"{role}.zarr" / "zarr.json",
               {"zarr_format": 3, "node_type": "group",
                "attributes": {"width": width, "num_layers": depth, "layers": layers, "model_spec": spec}})
        _write(data / "details" / f"extract-{role}.json",
               {"n_seq": 160, "n_tok": 2560, "layers": layers, "bytes_on_disk": 3 * 2**20, "tokens_per_s": 900.0})
    _write(data / "details" / "fit-procrustes.json",
           {"aligner": "procrustes", "activation_kind": "last", "layer_a": 2, "layer_b": 2, "train_rows": 120,
            "heldout_rows": 40, "d_source": 64, "d_target": 48, "fit_seconds": 0.1, "mse": 0.1937, "r2": -2.991,
            "cka": 0.0362, "alignment": 1.458, "retrieval_top1": 0.175, "retrieval_top5": 0.275, "infonce": 4.267,
            "uniformity": -3.168, "uniformity_target": -1.2, "pairwise_rows": 40})
    _write(data / "details" / "fit-linear.json",
           {"aligner": "linear", "activation_kind": "last", "layer_a": 2, "layer_b": 2, "train_rows": 120,
            "heldout_rows": 40, "d_source": 64, "d_target": 48, "fit_seconds": 1.4, "mse": 0.05842, "r2": None,
            "cka": -0.004, "alignment": 1.903, "retrieval_top1": 0.025, "retrieval_top5": 0.175, "infonce": 4.94,
            "uniformity": -3.367, "uniformity_target": -1.2, "pairwise_rows": 40, "epochs_run": 5, "best_epoch": 4,
            "stopped_early": False})
    _write(data / "details" / "grid.json",
           {"activation_kind": "last", "rows": 40, "knn_k": 10, "layers_a": [0, 2], "layers_b": [0, 4],
            "cka": {"a0": {"b0": 0.3612, "b4": 0.0701}, "a2": {"b0": 0.2451, "b4": None}},
            "mutual_knn": {"a0": {"b0": 0.335, "b4": 0.305}, "a2": {"b0": 0.302, "b4": 0.275}}, "aligners": {}})
    b_alone = _method(8, (0.125, 0.0224, 0.4709), (0.25, 0.05, 0.5), 1.1)
    ac = _method(8, (0.5, 0.2152, 0.7848), (0.6, 0.3, 0.9), 0.7)
    ac["vs_b_alone"] = {"em": {"paired_bootstrap": {"diff": 0.375, "lo": 0.0, "hi": 0.75, "p_value": 0.04},
                               "mcnemar": {"only_x": 3, "only_y": 0, "p_value": 0.25}}}
    _write(data / "details" / "evaluate-squad.json",
           {"task": "squad", "setting": "private", "layers": {"k": 2, "j": 2}, "primary": "em",
            "methods": {"b_alone": b_alone, "ac_procrustes_replace": ac}, "n_items": 8,
            "models": {"a": "synthetic:tiny-llama", "b": "synthetic:tiny-qwen"},
            "decoding": {"max_new_tokens": 6, "sampling": "greedy"}})
    game = {name: {"n": 100, "em": _interval(em, lo, hi, "wilson"), "compute": {},
                   "diagnostics": {"agree_skyline": _interval(agree, 0, 1, "wilson")}}
            for name, em, lo, hi, agree in (("b_alone", 0.01, 0.002, 0.054, 0.05), ("nl", 0.40, 0.31, 0.5, 0.6),
                                            ("ac_replace", 0.20, 0.13, 0.29, 0.3), ("ac_sum", 0.28, 0.2, 0.38, 0.4),
                                            ("skyline", 0.28, 0.2, 0.38, 1.0))}
    game["ac_sum"]["vs_b_alone"] = {"em": {"paired_bootstrap": {"diff": 0.27, "p_value": 0.0002},
                                           "mcnemar": {"p_value": 1.5e-8}}}
    game["ac_replace"]["vs_b_alone"] = {"em": {"paired_bootstrap": {"diff": 0.19, "p_value": 0.0002},
                                               "mcnemar": {"p_value": 1e-5}}}
    _write(data / "details" / "evaluate-countries.json",
           {"task": "countries", "setting": "private", "layers": {"k": 22, "j": 22}, "primary": "em",
            "columns": ["em"], "methods": game, "n_items": 100, "models": {"a": "qwen-0.5b", "b": "qwen-0.5b"}})
    kl = {"kl": _interval(0.099, 0.088, 0.108), "cosine": _interval(0.668, 0.634, 0.707)}
    _write(data / "details" / "evaluate-similarity.json",
           {"k": 2, "j": 2, "n": 16, "variants": {"procrustes": {
               "vector_cosine": _interval(0.538, 0.491, 0.579), "vector_rel_sq_error": _interval(1.684, 1.487, 1.879),
               "replace/matched": kl, "replace/shuffled": {"kl": _interval(0.112, 0.1, 0.12),
                                                           "cosine": _interval(0.629, 0.6, 0.66)}}}})
    (data / "plots").mkdir()
    (data / "plots" / "cka.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # only linked, never read
    write_params(tmp_path, {"a": "synthetic:tiny-llama", "b": "synthetic:tiny-qwen"},
                 fit={"aligners": {"procrustes": {}, "linear": {"lr": 0.001}, "lora": {}}})
    return tmp_path


def test_report_sections_and_numbers(outputs, capsys):
    code, out, err = run_cli(capsys, "--params", str(outputs / "params.yaml"), "report")
    assert code == 0, err
    md = (outputs / "data" / "report" / "report.md").read_text()
    assert "data/report/report.md" in out
    for header in ("# xmodel report", "## What was run", "## Layer similarity (CKA)", "## Aligners",
                   "## Evaluation: squad", "## Evaluation: gsm8k", "## Similarity probe", "## Layer sweep (k, j)"):
        assert f"\n{header}\n" in f"\n{md}", header
    sections = {s.split("\n", 1)[0]: s for s in md.split("\n## ")}
    run = sections["What was run"]
    assert "| A | `synthetic:tiny-llama` |" in run and "| 64 | 3 | 0, 2, 3 | 160 | 2560 | 3.0 |" in run
    assert "| 48 | 4 | 0, 2, 4 |" in run
    cka = sections["Layer similarity (CKA)"]
    assert "![CKA heatmap](../plots/cka.png)" in cka
    assert "| A L0 | 0.361 | 0.070 |" in cka and "| A L2 | 0.245 | — |" in cka  # null (undefined) CKA is a dash
    aligners = sections["Aligners"]
    assert "| `procrustes` | 64→48, L2→L2 | 120 / 40 | 0.175 | 0.275 | 0.1937 | -2.991 |" in aligners
    assert "| `linear` |" in aligners and "| 5 (best 4) | 1.4 |" in aligners
    assert "| `lora` | _not run_ |" in aligners  # in params, never fitted
    assert "Best held-out top-1: `procrustes` (0.175); lowest MSE: `linear` (0.05842)." in aligners
    squad = sections["Evaluation: squad"]
    assert "| `b_alone` | 8 | 12.5 [2.2, 47.1] | 25.0 [5.0, 50.0] | — |" in squad
    assert ("| `ac_procrustes_replace` | 8 | 50.0 [21.5, 78.5] | 60.0 [30.0, 90.0] | +37.5 (p 0.25) | — | 120 | 340 | 2.50 |"
            in squad)
    assert "evaluate-squad.png" in squad and "_not run_" in squad  # the plot file is missing, the table is not
    assert "_not run_ (`dvc repro evaluate@gsm8k`" in sections["Evaluation: gsm8k"]
    sim = sections["Similarity probe"]
    assert "| `procrustes` | replace | 0.099 [0.088, 0.108] | 0.112 | 0.668 [0.634, 0.707] | 0.629 |" in sim
    assert "_not run_" in sections["Layer sweep (k, j)"]
    answer = sections["Does AC carry the information here?"]
    # the best plain f (sum), its p doubled for picking it from two; the aligner-only task has no plain AC
    assert ("| `countries` | qwen-0.5b → qwen-0.5b | 22 → 22 | 100 | em | 1.0 [0.2, 5.4] | 40.0 [31.0, 50.0] | "
            "28.0 [20.0, 38.0] `ac_sum` (p 3e-08) | — | — | — | 28.0 [20.0, 38.0] | 40 / 5 | paper, LLaMA-3.2-3B") in answer
    assert "`countries`, qwen-0.5b → qwen-0.5b: Plain AC carries information here: `ac_sum` is +27.0 points" in answer
    assert "100% of the way from B alone to the skyline" in answer and "cannot use the information" not in answer
    # the squad run has AC only through an aligner: its p (0.25) is no evidence
    assert ("| `squad` | synthetic:tiny-llama → synthetic:tiny-qwen | 2 → 2 | 8 | em | 12.5 [2.2, 47.1] | — | — | "
            "50.0 [21.5, 78.5] `ac_procrustes_replace` (p 0.25) |") in answer
    assert ("`squad`, synthetic:tiny-llama → synthetic:tiny-qwen: AC through an aligner does not carry it detectably: "
            "`ac_procrustes_replace` is +37.5 points from B alone (p 0.25).") in answer


def test_report_html_when_a_renderer_is_installed(outputs, capsys):
    code, _, err = run_cli(capsys, "--params", str(outputs / "params.yaml"), "report")
    assert code == 0, err
    html = outputs / "data" / "report" / "report.html"
    try:
        import markdown_it  # noqa: F401
    except ImportError:
        assert not html.exists()
        return
    text = html.read_text()
    assert "<table>" in text and '<img src="../plots/cka.png"' in text


def test_report_without_outputs_is_one_line(tmp_path, capsys):
    params = write_params(tmp_path, {"a": "synthetic:tiny-llama", "b": "synthetic:tiny-qwen"})
    code, out, err = run_cli(capsys, "--params", str(params), "report")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "does not exist" in err and "dvc repro" in err
    # a data dir with headline numbers but no details: they are not what the report reads
    (tmp_path / "data" / "metrics").mkdir(parents=True)
    (tmp_path / "data" / "metrics" / "evaluate-squad.json").write_text('{"n": 8, "b_alone": 0.1}')
    code, _, err = run_cli(capsys, "--params", str(params), "report")
    assert code == 2 and err.count("\n") == 1 and f"no stage records in {tmp_path / 'data' / 'details'}" in err


def test_report_names_a_corrupt_details_file(outputs, capsys):
    bad = outputs / "data" / "details" / "grid.json"
    bad.write_text('{"cka": ')
    code, _, err = run_cli(capsys, "--params", str(outputs / "params.yaml"), "report")
    assert code == 2 and err.count("\n") == 1 and str(bad) in err and "rerun the stage" in err


def test_report_loads_no_model_code(outputs):
    """The report only reads files: a whole run imports neither torch, transformers nor zarr."""
    code = ("import sys; from pipeline.cli import cli; "
            f"cli.main(['--params', {str(outputs / 'params.yaml')!r}, 'report', '--quiet'], standalone_mode=False); "
            "print([m for m in ('torch', 'transformers', 'zarr') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=outputs, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
    assert (outputs / "data" / "report" / "report.md").exists()


# -- non-finite inputs are flagged, the report folder is written whole, and only xmodel's (issue 12) --


def test_a_non_finite_aligner_is_flagged_and_never_named_best(outputs, capsys):
    # as old code wrote an all-NaN aligner: retrieval 1.0 (NaN rows "ranked first"), MSE NaN
    (outputs / "data" / "details" / "fit-lora.json").write_text(
        '{"aligner": "lora", "d_source": 64, "d_target": 48, "retrieval_top1": 1.0, "retrieval_top5": 1.0, '
        '"mse": NaN, "r2": NaN, "cka": NaN}')
    code, _, err = run_cli(capsys, "--params", str(outputs / "params.yaml"), "report")
    assert code == 0, err
    text = (outputs / "data" / "report" / "report.md").read_text()
    assert "Best held-out top-1: `procrustes` (0.175)" in text
    assert "| `lora` ⚠ non-finite (MSE) |" in text
    assert "**Warning: non-finite values (NaN/inf) in" in text and "fit-lora.json" in text
    # a file written by the fit stage itself: NaN is null, and nonfinite_rows says why
    (outputs / "data" / "details" / "fit-lora.json").write_text(json.dumps(
        {"aligner": "lora", "retrieval_top1": 0.9, "retrieval_top5": 1.0, "mse": 0.01, "nonfinite_rows": 3}))
    assert run_cli(capsys, "--params", str(outputs / "params.yaml"), "report")[0] == 0
    text = (outputs / "data" / "report" / "report.md").read_text()
    assert "Best held-out top-1: `procrustes`" in text and "| `lora` ⚠ non-finite (3 rows) |" in text


def test_report_folder_is_replaced_whole_and_only_when_ours(outputs, capsys, monkeypatch):
    from collections import Counter

    import pipeline.faults

    params = str(outputs / "params.yaml")
    assert run_cli(capsys, "--params", params, "report")[0] == 0
    folder = outputs / "data" / "report"
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    (outputs / "data" / "details" / "fit-linear.json").unlink()  # the next report differs
    for after in (1, 2):  # report.md, report.html
        monkeypatch.setattr(pipeline.faults, "_passed", Counter())
        monkeypatch.setenv("XMODEL_FAULT", f"ioerror_after_writes:{after}")
        code, _, err = run_cli(capsys, "--params", params, "report")
        assert code == 2 and err.count("\n") == 1 and "No space left on device" in err and str(folder) in err, err
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
        assert sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(".report")) == []
    monkeypatch.delenv("XMODEL_FAULT")
    (folder / "my-notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "--params", params, "report")
    assert code == 2 and "is not a report folder written by xmodel" in err, err
    assert (folder / "my-notes.txt").read_text() == "mine" and (folder / "report.md").read_bytes() == before["report.md"]


def test_answer_table_of_several_data_dirs(outputs, tmp_path, capsys):
    data = str(outputs / "data")
    code, out, err = run_cli(capsys, "--params", str(outputs / "params.yaml"), "report", "--answer", data,
                             "--answer", data)
    assert code == 0, err
    assert out.count("| `countries` | qwen-0.5b → qwen-0.5b [data] | 22 → 22 | 100 |") == 2 and "| `squad` |" in out
    assert "Plain AC carries information here: `ac_sum`" in out
    assert not (outputs / "data" / "report").exists()  # prints only, writes nothing
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, err = run_cli(capsys, "report", "--answer", str(empty))
    assert code == 2 and err.count("\n") == 1 and "no evaluated task" in err


def test_answer_says_when_b_cannot_use_the_information_at_all():
    from pipeline.report import answer_rows

    def method(mean, diff=None, p=None):
        e = {"n": 100, "option": _interval(mean, mean - 0.1, mean + 0.1, "wilson")}
        if diff is not None:
            e["vs_b_alone"] = {"option": {"paired_bootstrap": {"diff": diff}, "mcnemar": {"p_value": p}}}
        return e

    m = {"task": "tipsheets", "primary": "option", "n_items": 100, "layers": {"k": 22, "j": 22},
         "methods": {"b_alone": method(0.47), "ac_replace": method(0.43, -0.04, 0.45),
                     "skyline": method(0.36, -0.11, 0.0074)}}
    row, sentence = answer_rows("q → q", m)
    assert sentence.startswith("B reading A's information itself (the skyline) is -11.0 points from B alone (p 0.0074)")
    assert "Plain AC does not carry it detectably: `ac_replace` is -4.0 points" in sentence
    m["methods"]["skyline"] = method(0.9, 0.43, 1e-9)
    assert "cannot use" not in answer_rows("q → q", m)[1]


# -- what DVC shows: a few headline numbers per record, named alike across stages (issue 13) --


def test_metrics_files_hold_a_few_shared_headline_numbers(outputs):
    from pipeline import headlines

    details = outputs / "data" / "details"
    read = lambda name: json.loads((details / f"{name}.json").read_text())  # noqa: E731
    countries = headlines.evaluation(read("evaluate-countries"))
    # the best plain f (sum) is `ac`; its p is McNemar's, doubled for picking it from two f's
    assert countries == {"n": 100, "b_alone": 0.01, "nl": 0.4, "skyline": 0.28, "ac": 0.28, "p": 3e-08}
    assert headlines.evaluation(read("evaluate-squad")) == {"n": 8, "b_alone": 0.125, "ac_w": 0.5}
    assert headlines.similarity(read("evaluate-similarity")) == {"n": 16, "kl_w": 0.099}
    assert headlines.fit(read("fit-procrustes")) == {"n": 40, "top1": 0.175, "r2": -2.991, "cka": 0.0362}
    assert headlines.fit(read("fit-linear"))["n"] == 40 and "r2" not in headlines.fit(read("fit-linear"))  # null
    assert headlines.grid(read("grid")) == {"n": 40, "cka": 0.3612}
    assert headlines.extract(read("extract-a")) == {"n": 160, "tokens_per_s": 900.0}
    # more methods, aligners and kv variants add no key: the columns of `dvc metrics show` stay put
    many = read("evaluate-countries")
    for i in range(40):
        many["methods"][f"ac_aligner{i}_mean"] = many["methods"]["ac_sum"]
        many["methods"][f"kv_L{i}"] = many["methods"]["ac_replace"]
    wide = headlines.evaluation(many)
    assert set(wide) == {"n", "b_alone", "nl", "skyline", "ac", "ac_w", "kv", "p"} and len(wide) <= headlines.MAX_KEYS
    assert wide["kv"] == 0.2 and wide["p"] == countries["p"]


def test_answer_of_a_records_folder(capsys):
    """results/<run>/ holds the records flat (evaluate-<task>.json): README's table is
    `xmodel report --answer results/same05 ...`, with the numbers those files hold."""
    code, out, err = run_cli(capsys, "report", "--answer", str(ROOT / "results" / "same05"))
    assert code == 0, err
    assert "| 0.0 [0.0, 3.7] | 44.0 [34.7, 53.8] | 9.0 [4.8, 16.2] `ac_replace` (p 0.0039) | — | " \
           "77.0 [67.8, 84.2] `kv_all` (p 1.3e-23) | — | 79.0 [70.0, 85.8] | 87 / 22 |" in out
    assert out.count("\n| `") == 3  # squad, countries, tipsheets


def test_the_answer_says_when_a_method_hurts(capsys):
    """A method significantly below B alone is reported as hurting, not as a null (the cross-family
    pair's Tip Sheets record: AC replace 21 against B alone's 47)."""
    code, out, err = run_cli(capsys, "report", "--answer", str(ROOT / "results" / "cross-family"))
    assert code == 0, err
    tipsheets = next(line for line in out.splitlines() if line.startswith("- `tipsheets`"))
    assert "Plain AC hurts here: `ac_replace` is -26.0 points below B alone (p 6.2e-06)." in tipsheets
    squad = next(line for line in out.splitlines() if line.startswith("- `squad`"))
    assert "Plain AC does not carry it detectably" in squad and "hurts" not in squad


@pytest.mark.parametrize("foreign", [{"hello": 1}, {"methods": [1, 2]}, {"methods": {"b_alone": 3}, "primary": "em"},
                                     {"models": "x", "methods": {}, "primary": "em"}, [1, 2]])
def test_answer_over_foreign_json_is_one_line(tmp_path, capsys, foreign):
    _write(tmp_path / "run" / "evaluate-squad.json", foreign)
    code, out, err = run_cli(capsys, "report", "--answer", str(tmp_path / "run"))
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "evaluate-squad.json" in err, err


def test_report_flags_an_evaluation_whose_aligner_changed_since(outputs, capsys):
    """An evaluation record names the fingerprint of each aligner it used; refitting (or removing)
    the aligner afterwards makes the report say that record's scores are not the current aligner's."""
    from pipeline.artifacts import folder_hash

    data = outputs / "data"
    aligner = data / "aligners" / "procrustes"
    aligner.mkdir(parents=True)
    (aligner / "aligner.json").write_text('{"kind": "procrustes"}')
    (aligner / "weights.safetensors").write_bytes(b"old weights")
    record = json.loads((data / "details" / "evaluate-squad.json").read_text())
    record["aligners_used"] = {"procrustes": {"path": "aligners/procrustes", "fingerprint": folder_hash(aligner)}}
    _write(data / "details" / "evaluate-squad.json", record)
    args = ("--params", str(outputs / "params.yaml"), "report", "--quiet")
    assert run_cli(capsys, *args)[0] == 0
    assert "has since been" not in (data / "report" / "report.md").read_text()
    (aligner / "weights.safetensors").write_bytes(b"new weights")  # what `xmodel fit procrustes --force` does
    assert run_cli(capsys, *args)[0] == 0
    text = (data / "report" / "report.md").read_text()
    assert ("**Warning: `evaluate-squad` used aligner `procrustes` (" in text and "has since been refitted" in text
            and "rerun `xmodel evaluate squad`" in text), text


def test_published_numbers_name_their_score_beside_ours_on_it(outputs, capsys):
    """KVComm reports F1 and the paper accuracy (our `contains` on Countries): each published number
    is shown with its score and beside ours on that score, not beside our primary (EM)."""
    path = outputs / "data" / "details" / "evaluate-countries.json"
    m = json.loads(path.read_text())
    for name, contained, f1 in (("b_alone", 0.05, 0.02), ("nl", 0.55, 0.45), ("ac_replace", 0.2, 0.2),
                                ("ac_sum", 0.33, 0.31), ("skyline", 0.6, 0.5)):
        m["methods"][name]["contains"] = _interval(contained, 0, 1, "wilson")
        m["methods"][name]["f1"] = _interval(f1, 0, 1, "bootstrap")
    path.write_text(json.dumps(m))
    code, out, err = run_cli(capsys, "report", "--answer", str(outputs / "data"))
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("| `countries`"))
    # AC is the family's best on the primary (ac_sum), shown on each published score
    assert ("paper, LLaMA-3.2-3B ×2, contains: B alone 0, NL 69, AC 78, skyline 84 "
            "(ours: B alone 5.0, NL 55.0, AC 33.0, skyline 60.0)") in row
    assert "KVComm, LLaMA-3.1-8B-Instruct ×2, f1: B alone 0, NL 58, AC 0 (ours: B alone 2.0, NL 45.0, AC 31.0)" in row
    code, out, err = run_cli(capsys, "report", "--answer", str(ROOT / "results" / "same05"))  # older records
    assert "contains: B alone 0, NL 69, AC 78, skyline 84 (ours: contains not recorded)" in out
    assert "tipsheets` |" in out and "paper, LLaMA-3.1-8B ×2, option: B alone 54.3, NL 85.7, AC 95.7 (ours: B alone 47.0" in out


def test_report_says_which_items_a_number_comes_from(outputs, capsys):
    """Countries scored on evaluation places (never seen by an in-task aligner) say so in the answer
    table; the task section names the items' source, file layout or split."""
    path = outputs / "data" / "details" / "evaluate-countries.json"
    m = json.loads(path.read_text())
    path.write_text(json.dumps({**m, "items": {"source": "generate", "places": "eval"}}))
    squad = outputs / "data" / "details" / "evaluate-squad.json"
    squad.write_text(json.dumps({**json.loads(squad.read_text()), "items": {
        "source": "/x/dev.jsonl", "file": "/x/dev.jsonl", "layout": "squad", "fields": {}, "rows": 40}}))
    code, out, err = run_cli(capsys, "report", "--answer", str(outputs / "data"))
    assert code == 0, err
    assert "| `countries` (eval places) | qwen-0.5b → qwen-0.5b |" in out
    assert run_cli(capsys, "--params", str(outputs / "params.yaml"), "report", "--quiet")[0] == 0
    md = (outputs / "data" / "report" / "report.md").read_text()
    assert "Items: `/x/dev.jsonl` (40 rows, layout `squad`)." in md


def test_a_gain_its_mismatched_control_matches_is_a_nudge_not_information():
    """Above B alone, but another item's message does as well: not counted as carrying information."""
    from pipeline.report import answer_rows

    def entry(mean, family, **vs):
        return {"em": {"mean": mean, "lo": 0.0, "hi": 1.0}, "family": family,
                **{f"vs_{k}": {"em": {"paired_bootstrap": {"diff": d, "p_value": p}, "mcnemar": {"p_value": p}}}
                   for k, (d, p) in vs.items()}}

    m = {"task": "countries", "primary": "em", "n_items": 100, "methods": {
        "b_alone": entry(0.0, "reference"),
        "mkv_kvmaps": entry(0.2, "mapped_kv", b_alone=(0.2, 1e-5), mismatched=(0.01, 0.9)),
        "mkv_kvmaps~mismatched": entry(0.19, "control", b_alone=(0.19, 1e-5)),
        "fuser_task": entry(0.3, "fuser", b_alone=(0.3, 1e-8), mismatched=(0.25, 1e-6))}}
    row, sentence = answer_rows("s → q", m)
    assert "`fuser_task`" in " ".join(row)  # the best latent method; a control is never picked
    assert "The best cross-model latent method carries information here: `fuser_task`" in sentence
    m["methods"].pop("fuser_task")
    row, sentence = answer_rows("s → q", m)
    assert "moves B but carries no information detectably: `mkv_kvmaps`" in sentence
    assert "from its mismatched control (p 0.9)" in sentence


def test_methods_table_and_bandwidth_curve_of_a_records_folder(tmp_path, capsys):
    """`xmodel report --methods DIR`: one row per method with its paired tests, and the bandwidth plot."""
    code, out, err = run_cli(capsys, "report", "--methods", str(ROOT / "results" / "same05"),
                             "--bandwidth", str(tmp_path / "bw.png"))
    assert code == 0, err
    assert "| `kv_all` | — | 100 | 77.0 [67.8, 84.2] | +77.0 (p 1.3e-23) |" in out  # an older record: no family
    assert "Δ vs mismatched (p)" in out and (tmp_path / "bw.png").stat().st_size > 0


def test_bandwidth_curve_is_one_panel_per_task_split_and_pair_whatever_run_a_method_came_from():
    """A table split over runs is one curve: the repeated B alone once, two runs' same-named aligner
    both (each named with its run), another pair or place split its own panel."""
    from pipeline.report import _bandwidth_panels

    def record(b, places, methods):
        return {"task": "countries", "primary": "em", "models": {"a": "s", "b": b}, "items": {"places": places},
                "methods": {name: {"family": family, "em": {"mean": 0.1}} for name, family in methods}}

    runs = [("s → q [one]", record("q", "eval", [("b_alone", "reference"), ("ac_lora_replace", "ac_w")])),
            ("s → q [two]", record("q", "eval", [("b_alone", "reference"), ("ac_lora_replace", "ac_w")])),
            ("s → q [seen]", record("q", "train", [("b_alone", "reference")])),
            ("s → r [other]", record("r", "eval", [("nl", "text")]))]
    panels = _bandwidth_panels(runs)
    assert list(panels) == ["countries (eval places): s → q", "countries (train places): s → q",
                            "countries (eval places): s → r"]
    assert list(panels["countries (eval places): s → q"]) == ["b_alone", "ac_lora_replace", "ac_lora_replace [two]"]
