"""Rows of an outside method (results/cross-model/avp_rows.py: avp's) beside a recorded evaluation,
on the tiny real models, without the outside package: the record read back item by item is the
record (its summary recomputed equals the one written), a record of other items or scored by other
code is refused, and an outside row is cut, scored and tested against the recorded B alone and NL
by xmodel's own functions, in a record that `xmodel report --methods` reads."""

from __future__ import annotations

import json
import shutil

import pytest

from pipeline.config_evaluate import EvaluateConfig
from pipeline.config_tasks import CountriesConfig
from pipeline.errors import UserError


def _cfg(**countries):
    return EvaluateConfig(layer_a=2, layer_b=3, batch_size=4, n_boot=200, controls=[], aligners=[],
                          methods=["b_alone", "nl", "skyline"],
                          countries=CountriesConfig(**{"n": 6, "max_new_tokens": 4, "places": "eval", **countries}))


@pytest.fixture(scope="module")
def recorded(tiny_models, tiny_pair, tmp_path_factory):
    """(data dir, cfg) of a real evaluation of the tiny pair: b_alone, nl and the skyline on 6 Countries items."""
    from pipeline.config import load_params
    from stages import evaluate as stage
    from tests.helpers import write_params

    tmp = tmp_path_factory.mktemp("recorded")
    params = load_params(write_params(tmp, {"a": tiny_models["llama"], "b": tiny_models["qwen"]},
                                      paths={"data": str(tmp / "data")}))
    cfg = _cfg()
    stage.run(params, "countries", cfg, pair=tiny_pair)
    return tmp / "data", cfg


def _rounded(x):
    """x with every float rounded to 9 digits (a summary read back equals the written one to rounding)."""
    if isinstance(x, float):
        return round(x, 9)
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_rounded(v) for v in x]
    return x


def _items(cfg):
    from pipeline.evaluation.prompts import task_prompts

    return task_prompts("countries", cfg)


def test_a_record_read_back_item_by_item_is_the_record(recorded, tiny_pair):
    from pipeline.evaluation.external import recorded_runs
    from pipeline.evaluation.results import summarize

    data, cfg = recorded
    prompts, decoding = _items(cfg)
    rec = recorded_runs(data, "countries", prompts, decoding, (tiny_pair.name_a, tiny_pair.name_b))
    assert list(rec.runs) == ["b_alone", "nl", "skyline"]
    written = json.loads((data / "details" / "evaluate-countries.json").read_text())["methods"]
    again = json.loads(json.dumps(summarize(prompts, list(rec.runs.values()), n_boot=cfg.n_boot)))
    for name in rec.runs:  # intervals, paired tests, compute, diagnostics, bytes: as the evaluation wrote them
        assert _rounded(again[name]) == _rounded(written[name]), name
    assert rec.runs["nl"].bytes_sent == [json.loads(line)["nl"]["bytes_sent"]
                                         for line in (data / "evaluate" / "countries" / "predictions.jsonl").open()]


def test_a_record_of_other_items_or_scored_otherwise_is_refused(recorded, tiny_pair, tmp_path):
    from pipeline.evaluation.external import recorded_runs

    data, cfg = recorded
    names = (tiny_pair.name_a, tiny_pair.name_b)
    for other, what in ((_cfg(places="train"), "item source"), (_cfg(n=5), "item ids"), (_cfg(seed=7), "decoding"),
                        (_cfg(max_new_tokens=5), "decoding")):
        prompts, decoding = _items(other)
        with pytest.raises(UserError, match=what):
            recorded_runs(data, "countries", prompts, decoding, names)
    prompts, decoding = _items(cfg)
    with pytest.raises(UserError, match="models"):
        recorded_runs(data, "countries", prompts, decoding, (tiny_pair.name_b, tiny_pair.name_a))
    # a reply whose recorded score is not what the task's scoring gives it now
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    path = copy / "evaluate" / "countries" / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[2]["nl"]["em"] = 1.0 - rows[2]["nl"]["em"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(UserError, match=f"nl's em of item {prompts.ids[2]}"):
        recorded_runs(copy, "countries", prompts, decoding, names)
    with pytest.raises(UserError, match="no evaluation of countries"):
        recorded_runs(tmp_path / "nothing", "countries", prompts, decoding, names)


def test_an_outside_row_is_cut_scored_and_tested_against_the_recorded_runs(recorded, tiny_pair, tmp_path):
    from pipeline.evaluation.compute import Compute
    from pipeline.evaluation.external import (RESULT_FILES, external_result, external_run, recorded_runs,
                                              write_result)
    from pipeline.report import method_table, task_details
    from pipeline.stats import mcnemar_exact, wilson_interval

    data, cfg = recorded
    prompts, decoding = _items(cfg)
    # the record in a results folder's flat layout (results/cross-model/<run>/) reads the same
    flat = tmp_path / "flat"
    flat.mkdir()
    shutil.copy(data / "details" / "evaluate-countries.json", flat / RESULT_FILES["details"].format(task="countries"))
    shutil.copy(data / "evaluate" / "countries" / "predictions.jsonl",
                flat / RESULT_FILES["predictions"].format(task="countries"))
    rec = recorded_runs(flat, "countries", prompts, decoding, (tiny_pair.name_a, tiny_pair.name_b))
    # an outside method that answers the first four items right, past the stop string, and the rest wrong
    replies = [f" {prompts.golds[i][0]}\nand more" if i < 4 else "Atlantis" for i in range(len(prompts.ids))]
    run = external_run(prompts, decoding, "outside", replies, [3584] * len(replies), Compute(), "avp")
    assert run.texts[:4] == [f" {prompts.golds[i][0]}" for i in range(4)]  # cut where B's generation stops
    assert run.scores["em"] == [1.0] * 4 + [0.0] * (len(replies) - 4)
    names = (tiny_pair.name_a, tiny_pair.name_b)
    result = external_result("countries", prompts, decoding, rec, [run], {"outside": {"steps": 20}}, names,
                             n_boot=cfg.n_boot)
    assert [r.name for r in result.runs] == ["b_alone", "nl", "outside", "skyline"]
    row = result.summary["outside"]
    lo, hi = wilson_interval(4, len(replies))
    assert (row["n"], row["em"]["mean"], row["em"]["lo"], row["em"]["hi"]) == (len(replies), 4 / len(replies), lo, hi)
    for ref in ("b_alone", "nl"):
        assert row[f"vs_{ref}"]["em"]["mcnemar"] == mcnemar_exact(run.scores["em"], rec.runs[ref].scores["em"]).to_json()
    assert row["bytes_sent"] == 3584 and row["family"] == "avp"
    with pytest.raises(ValueError, match="named like recorded"):
        external_result("countries", prompts, decoding, rec, [rec.runs["nl"]], {}, names)
    with pytest.raises(ValueError, match="3 replies"):
        external_run(prompts, decoding, "short", replies[:3], [0] * 3, Compute(), "avp")

    out = write_result(tmp_path / "out", result)
    written = json.loads(out["details"].read_text())
    assert written["outside"] == {"steps": 20} and written["recorded"]["methods"] == ["b_alone", "nl", "skyline"]
    assert written["items"] == prompts.source and written["models"] == rec.details["models"]
    predictions = [json.loads(line) for line in out["predictions"].read_text().splitlines()]
    assert [p["outside"]["text"] for p in predictions] == run.texts and [p["id"] for p in predictions] == prompts.ids
    assert "| outside |" in out["table"].read_text()
    # the report reads it like any evaluation record: one row per method, the outside one with its p values
    (label, details), = task_details(tmp_path / "out")
    table = method_table([(label, details)])
    assert "`outside`" in table and f"{tiny_pair.name_a} → {tiny_pair.name_b}" == label


def test_outside_rows_written_before_the_record_are_paired_once_it_is_there(recorded, tiny_pair, tmp_path):
    """The record of the items may come after the outside run: its rows alone are written (each
    against its control), and read back later they pair exactly as if paired at once."""
    from pipeline.evaluation.compute import Compute
    from pipeline.evaluation.external import external_result, external_run, recorded_runs, write_result

    data, cfg = recorded
    prompts, decoding = _items(cfg)
    names = (tiny_pair.name_a, tiny_pair.name_b)
    n = len(prompts.ids)
    replies = [prompts.golds[i][0] if i % 2 else "Atlantis" for i in range(n)]
    own = external_run(prompts, decoding, "outside", replies, [10] * n, Compute(), "avp", {"transfer": "rosetta"})
    control = external_run(prompts, decoding, "outside~mismatched", replies[::-1], [10] * n, Compute(), "control",
                           control_of="outside", control="mismatched")
    alone = external_result("countries", prompts, decoding, None, [own, control], {"outside": {"steps": 20}}, names,
                            n_boot=cfg.n_boot)
    assert alone.info["recorded"] is None and [r.name for r in alone.runs] == ["outside", "outside~mismatched"]
    assert "vs_b_alone" not in alone.summary["outside"] and "vs_mismatched" in alone.summary["outside"]
    write_result(tmp_path / "alone", alone)

    mine = recorded_runs(tmp_path / "alone", "countries", prompts, decoding, names, methods=None, required=())
    rec = recorded_runs(data, "countries", prompts, decoding, names)
    later = external_result("countries", prompts, decoding, rec, list(mine.runs.values()), {}, names, n_boot=cfg.n_boot)
    at_once = external_result("countries", prompts, decoding, rec, [own, control], {}, names, n_boot=cfg.n_boot)
    assert _rounded(json.loads(json.dumps(later.summary))) == _rounded(json.loads(json.dumps(at_once.summary)))
    assert later.runs[2].details == {"transfer": "rosetta"} and later.runs[3].control_of == "outside"
    with pytest.raises(UserError, match="has no b_alone, nl run"):  # the outside result is no record to pair with
        recorded_runs(tmp_path / "alone", "countries", prompts, decoding, names)
