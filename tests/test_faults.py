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
        metrics = json.loads((tmp / "data" / "metrics" / "fit-linear.json").read_text())
        runs[name] = {k: v for k, v in metrics.items() if not k.endswith("seconds") and k != "resumed_from_step"}
        fit_report = json.loads((tmp / "data" / "aligners" / "linear" / "aligner.json").read_text())["fit"]
        assert (fit_report["resumed_from_step"] > 0) == bool(fault)  # the rerun did resume, not restart
    assert runs["killed"] == runs["whole"]


def test_missing_upstream_stage_output(tmp_path, tiny_models, capsys):
    params = write_params(tmp_path, {"a": tiny_models["llama"], "b": tiny_models["qwen"]})
    code, _, err = run_cli(capsys, "--params", str(params), "fit", "procrustes", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "xmodel extract" in err and "a.zarr" in err, err
