"""Crash safety: random SIGKILLs of a 2-rank extraction, readers of half-written stores, bad params."""

from __future__ import annotations

import json
import random

import pytest

from pipeline.errors import UserError
from store.reader import ActivationStore
from store.verify import verify_store
from tests.helpers import assert_same_store, run_cli, write_params, xmodel_process

KILL_POINTS = 10


@pytest.fixture(scope="module")
def two_rank_setup(tmp_path_factory, tiny_models):
    tmp = tmp_path_factory.mktemp("faults")
    params = write_params(tmp, {"a": tiny_models["llama"]}, corpus={"n": 80}, extract={"unit_size": 8})
    ref = xmodel_process(params, "extract", "--model", "a", "--quiet", "--out", str(tmp / "ref.zarr"), nproc=2)
    assert ref.returncode == 0, ref.stderr
    return tmp, params


@pytest.mark.parametrize("point", range(KILL_POINTS))
def test_sigkill_at_random_point_then_rerun_is_bit_identical(two_rank_setup, point):
    tmp, params = two_rank_setup
    # each rank writes 5 units x 14 shard regions; kill one rank somewhere inside that
    shards = random.Random(point).randint(1, 65)
    out = tmp / f"killed-{point}.zarr"
    killed = xmodel_process(params, "extract", "--model", "a", "--quiet", "--out", str(out), nproc=2,
                            env={"XMODEL_FAULT": f"kill_after_shards:{shards}"})
    assert killed.returncode != 0
    assert not json.loads((out / "zarr.json").read_text())["attributes"]["complete"]
    with pytest.raises(UserError, match="store incomplete"):
        ActivationStore(out)  # a reader never sees a half-written store as usable
    rerun = xmodel_process(params, "extract", "--model", "a", "--quiet", "--out", str(out), nproc=2)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(tmp / "ref.zarr", out)
    assert verify_store(out) == []


def test_incomplete_store_is_reported_by_info_and_verify(two_rank_setup, capsys):
    tmp, params = two_rank_setup
    out = tmp / "half.zarr"
    killed = xmodel_process(params, "extract", "--model", "a", "--quiet", "--out", str(out),
                            env={"XMODEL_FAULT": "kill_after_shards:20"})
    assert killed.returncode == -9
    code, stdout, _ = run_cli(capsys, "store", "info", str(out))
    assert code == 0 and "INCOMPLETE" in stdout
    code, _, err = run_cli(capsys, "store", "verify", str(out))
    assert code == 1 and "store incomplete" in err and "unit 9: not written" in err


@pytest.mark.parametrize("text, expected", [
    ("corpus:\n  n: many\n", "corpus.n = 'many' has the wrong type"),
    ("corpus: [1, 2\n", "not valid YAML"),
    ("corpus:\n  nn: 3\n", "unknown key(s) ['nn']"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_malformed_params_file(tmp_path, capsys, text, expected):
    params = tmp_path / "params.yaml"
    params.write_text(text)
    code, _, err = run_cli(capsys, "--params", str(params), "extract", "--model", "a")
    assert code == 2 and err.count("\n") == 1 and expected in err, err


def test_unreadable_corpus(tmp_path, tiny_models, capsys):
    corpus = tmp_path / "latin1.txt"
    corpus.write_bytes("caf\xe9 au lait is served in a bowl in the morning\n".encode("latin-1"))
    params = write_params(tmp_path, {"a": tiny_models["llama"]}, corpus={"source": str(corpus)})
    code, _, err = run_cli(capsys, "--params", str(params), "extract", "--model", "a", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "latin1.txt" in err and "UTF-8" in err, err


def test_adapter_training_killed_and_resumed_ends_with_the_same_heldout_metrics(tmp_path_factory, tiny_models):
    """SIGKILL `xmodel fit linear` mid-epoch; the rerun resumes from its checkpoint and ends exactly
    where an uninterrupted run with the same seed ends."""
    from tests.test_pairing import tiny_stores

    fit = {"layers": [0.5, 0.5], "heldout_frac": 0.25, "aligners": {"linear": {"epochs": 4, "batch_size": 8}}}
    shared = tiny_stores(tmp_path_factory.getbasetemp(), tiny_models, fit=fit)
    runs = {}
    for name, fault in (("whole", None), ("killed", "kill_after_steps:17")):
        tmp = tmp_path_factory.mktemp(name)
        (tmp / "data").mkdir()
        (tmp / "data" / "stores").symlink_to(shared.parent / "data" / "stores", target_is_directory=True)
        params = tmp / "params.yaml"
        params.write_text(shared.read_text().replace(str(shared.parent / "data"), str(tmp / "data")))
        if fault:
            killed = xmodel_process(params, "fit", "linear", "--quiet", env={"XMODEL_FAULT": fault})
            assert killed.returncode == -9
            assert (tmp / "data" / "aligners" / "linear" / "ckpt").is_dir()
            assert not (tmp / "data" / "metrics" / "fit-linear.json").exists()
        done = xmodel_process(params, "fit", "linear", "--quiet")
        assert done.returncode == 0, done.stderr
        metrics = json.loads((tmp / "data" / "details" / "fit-linear.json").read_text())
        runs[name] = {k: v for k, v in metrics.items() if not k.endswith("seconds") and k != "resumed_from_step"}
        fit_report = json.loads((tmp / "data" / "aligners" / "linear" / "aligner.json").read_text())["fit"]
        assert (fit_report["resumed_from_step"] > 0) == bool(fault)  # the rerun did resume, not restart
    assert runs["killed"] == runs["whole"]


def test_missing_upstream_stage_output(tmp_path, tiny_models, capsys):
    params = write_params(tmp_path, {"a": tiny_models["llama"], "b": tiny_models["qwen"]})
    code, _, err = run_cli(capsys, "--params", str(params), "fit", "procrustes", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "xmodel extract" in err and "a.zarr" in err, err


# -- artifacts (issue 12): every stage output whole or not at all, a full disk is one line -----------


def _fail_writes_after(monkeypatch, n: int) -> None:
    """XMODEL_FAULT for this process, counted from now (fault points are counted per process)."""
    from collections import Counter

    import pipeline.faults

    monkeypatch.setattr(pipeline.faults, "_passed", Counter())
    monkeypatch.setenv("XMODEL_FAULT", f"ioerror_after_writes:{n}")


def _artifact_bytes(*paths):
    return {p: p.read_bytes() if p.exists() else None for p in paths}


def test_disk_full_in_grid_keeps_its_metrics_and_plot_together(tmp_path_factory, tiny_models, capsys, monkeypatch):
    from pipeline.config import load_params
    from tests.test_pairing import tiny_stores

    shared = tiny_stores(tmp_path_factory.getbasetemp(), tiny_models, fit={"layers": [0.5, 0.5], "heldout_frac": 0.25},
                         grid={"knn_k": 5})
    tmp = tmp_path_factory.mktemp("grid")  # a data dir of its own over the shared stores
    (tmp / "data").mkdir()
    (tmp / "data" / "stores").symlink_to(shared.parent / "data" / "stores", target_is_directory=True)
    params = tmp / "params.yaml"
    params.write_text(shared.read_text().replace(str(shared.parent / "data"), str(tmp / "data")))
    paths = load_params(params).paths
    metrics, details, plot = paths.metrics("grid"), paths.layout.details("grid"), paths.layout.plot("cka")
    assert run_cli(capsys, "--params", str(params), "grid", "--quiet")[0] == 0
    before = _artifact_bytes(metrics, details, plot)
    for after in (1, 2, 3):  # metrics and details, then the heatmap: a new grid.json never pairs with an old plot
        _fail_writes_after(monkeypatch, after)
        code, _, err = run_cli(capsys, "--params", str(params), "-S", "grid.knn_k=3", "grid", "--quiet")
        errors = [line for line in err.splitlines() if line.startswith("error:")]  # besides warnings
        assert code == 2 and len(errors) == 1 and "No space left on device" in errors[0], err
        assert _artifact_bytes(metrics, details, plot) == before
        assert not [p for d in (metrics, details, plot) for p in d.parent.iterdir() if ".tmp-" in p.name]


def test_disk_full_in_evaluate_keeps_every_output_of_the_previous_run(tiny_models, tmp_path, monkeypatch):
    from dataclasses import replace

    from pipeline.config import load_params
    from pipeline.config_evaluate import config_from_dict
    from pipeline.evaluation.pair import Pair
    from pipeline.models import load_model, resolve_model
    from stages import evaluate as stage

    params = load_params(write_params(tmp_path, {"a": tiny_models["llama"], "b": tiny_models["qwen"]}))
    (ma, ta), (mb, tb) = (load_model(resolve_model(str(tiny_models[n]), tmp_path / "cache"), device="cpu",
                                     dtype="float32") for n in ("llama", "qwen"))
    pair = Pair(ma, ta, mb, tb, "tiny-llama", "tiny-qwen")
    cfg = config_from_dict({"methods": ["b_alone", "a_alone"], "aligners": [], "batch_size": 2, "n_boot": 20,
                            "squad": {"n": 2, "max_new_tokens": 2}})
    out = stage.run(params, "squad", cfg=cfg, pair=pair)
    before = _artifact_bytes(*out.values())
    assert all(before.values())
    for after in (1, 2, 3, 4, 5):  # predictions, table, metrics, details, plot
        _fail_writes_after(monkeypatch, after)
        with pytest.raises(UserError, match="No space left on device"):
            stage.run(params, "squad", cfg=replace(cfg, methods=["b_alone"]), pair=pair)
        assert _artifact_bytes(*out.values()) == before
    monkeypatch.delenv("XMODEL_FAULT")
    (out["table"].parent / "notes.md").write_text("mine")  # a file xmodel did not write: the folder is not replaced
    with pytest.raises(UserError, match="is not a evaluation folder written by xmodel"):
        stage.run(params, "squad", cfg=cfg, pair=pair)
    assert (out["table"].parent / "notes.md").read_text() == "mine" and _artifact_bytes(*out.values()) == before


def test_a_folder_swap_killed_between_its_renames_is_repaired_by_the_next_write(tmp_path):
    import subprocess
    import sys

    from pipeline.artifacts import holds_only, write_folder

    target = tmp_path / "report"
    write_folder(target, {"report.md": "old"}, allowed=["report.md"])
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()  # a pid that has exited: its leftovers are stale
    # as a writer SIGKILLed after moving the old folder aside and before renaming the new one in
    (tmp_path / f".report.old-{dead}-x").mkdir()
    target.rename(tmp_path / f".report.old-{dead}-x" / "dir")
    (tmp_path / f".report.tmp-{dead}-y").mkdir()  # and one killed while building
    from pipeline.artifacts import recover

    recover(target)
    assert (target / "report.md").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert holds_only(["report.md"])(target)
    write_folder(target, {"report.md": "new"}, allowed=["report.md"])
    assert (target / "report.md").read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["report"]


# -- inputs are what they claim (issue 12, item 8) -------------------------------------------------

def _int_fields(cls, prefix=""):
    """Dotted keys of every field of the typed config (nested sections included) that takes an int."""
    import typing
    from dataclasses import fields, is_dataclass

    from pipeline.config import _admits

    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        hint, key = hints[f.name], f"{prefix}{f.name}"
        if is_dataclass(hint):
            yield from _int_fields(hint, f"{key}.")
        elif _admits(hint, int) and not _admits(hint, bool):
            yield key


def test_a_boolean_is_refused_for_every_int_field():
    from pipeline.config import Params, params_from_dict

    keys = list(_int_fields(Params))
    assert {"corpus.n", "extract.max_tokens", "extract.batch_tokens", "fit.pairwise_rows", "evaluate.batch_size"} <= set(keys)
    for key in keys:
        raw: dict = {}
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = True
        with pytest.raises(UserError) as e:
            params_from_dict(raw)
        assert "\n" not in str(e.value), key
    with pytest.raises(UserError, match=r"corpus.n = true is a boolean: expected int"):
        params_from_dict({"corpus": {"n": True}})
    with pytest.raises(UserError, match=r"extract.layers\[1\] = true is a boolean"):
        params_from_dict({"extract": {"layers": [0, True]}})
    assert params_from_dict({"evaluate": {"chat": False}}).evaluate.chat is False  # a bool field takes a bool


# -- disk full outside a unit (issue 12, item 6) ---------------------------------------------------

def _files(path):
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_disk_full_while_creating_a_store_keeps_the_old_one(two_rank_setup):
    """`--force` over a store of other params, and the disk fills while the new one is laid out:
    one line naming the store and the fix, the old store untouched, no half-made folder left."""
    tmp, params = two_rank_setup
    out = tmp / "replace.zarr"
    first = xmodel_process(params, "-S", "extract.max_tokens=16", "extract", "--model", "a", "--quiet", "--out", str(out))
    assert first.returncode == 0, first.stderr
    before = _files(out)
    failed = xmodel_process(params, "extract", "--model", "a", "--quiet", "--out", str(out), "--force",
                            env={"XMODEL_FAULT": "ioerror_after_create:1"})
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert f"creating store {out} failed (No space left on device" in failed.stderr and "free space" in failed.stderr
    assert _files(out) == before and not (tmp / "replace.zarr.creating").exists()
    rerun = xmodel_process(params, "extract", "--model", "a", "--quiet", "--out", str(out), "--force")
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(tmp / "ref.zarr", out)


@pytest.mark.parametrize("point", [1, 2])  # before consolidating, and between consolidating and the success marker
def test_disk_full_while_finalizing_then_rerun_finalizes(two_rank_setup, point):
    tmp, params = two_rank_setup
    out = tmp / f"finalize-{point}.zarr"
    failed = xmodel_process(params, "extract", "--model", "a", "--quiet", "--out", str(out),
                            env={"XMODEL_FAULT": f"ioerror_after_finalize:{point}"})
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert f"finalizing store {out} failed" in failed.stderr and "rerun" in failed.stderr
    assert json.loads((out / "zarr.json").read_text())["attributes"]["complete"] is False  # whole, not torn
    with pytest.raises(UserError, match="store incomplete"):
        ActivationStore(out)
    rerun = xmodel_process(params, "extract", "--model", "a", "--quiet", "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(tmp / "ref.zarr", out)
    assert verify_store(out) == []


def test_artifacts_get_ordinary_permissions(tmp_path):
    """The atomic writer's temporaries are private (mkstemp, mkdtemp); what it renames into place
    is an ordinary file or folder, as the umask says."""
    import os

    from pipeline.artifacts import Outputs, write_folder

    old = os.umask(0o022)
    try:
        with Outputs() as out:
            out.json(tmp_path / "m.json", {"a": 1})
        write_folder(tmp_path / "f", {"t.md": "x"}, allowed=["t.md"])
    finally:
        os.umask(old)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o755 and (tmp_path / "f" / "t.md").stat().st_mode & 0o777 == 0o644


def test_an_error_between_the_renames_of_a_commit_is_finished_by_the_next_run(tmp_path):
    """A rename failing part way (after the folder is swapped in, before its record): one line, and
    the next xmodel process on these outputs finishes the commit: never a new folder beside an old record."""
    import os
    import subprocess
    import sys

    from pipeline.artifacts import Outputs, recover
    from tests.helpers import ROOT

    folder, record = tmp_path / "aligners" / "x", tmp_path / "details" / "x.json"
    with Outputs() as out:
        out.directory(folder, lambda tmp: (tmp / "w").write_text("old"), is_ours=lambda p: True)
        out.text(record, "old")
    child = f"""
from pathlib import Path
from pipeline.artifacts import Outputs
from pipeline.errors import UserError
try:
    with Outputs() as out:
        out.directory(Path({str(folder)!r}), lambda tmp: (tmp / "w").write_text("new"), is_ours=lambda p: True)
        out.text(Path({str(record)!r}), "new")
except UserError as e:
    print(e)
"""
    run = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "XMODEL_FAULT": "ioerror_after_commits:1"})
    assert run.stdout.startswith("renaming") and run.stdout.count("\n") == 1 and "rerun" in run.stdout, run
    assert (folder / "w").read_text() == "new" and record.read_text() == "old"  # part way
    recover(record)  # what the next reader or writer of these outputs does
    assert (folder / "w").read_text() == "new" and record.read_text() == "new"
    assert not [p.name for d in (folder.parent, record.parent) for p in d.iterdir() if p.name.startswith(".")]
