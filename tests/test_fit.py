"""`xmodel fit` and `xmodel grid` from tiny stores: no model is loaded, outputs, refusals, resume."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from pipeline.aligners.registry import Aligner, load_aligner
from pipeline.aligners.procrustes import linear_module
from pipeline.config import load_params
from pipeline.errors import UserError
from pipeline.metrics import Moments, iter_row_blocks
from tests.helpers import run_cli
from tests.test_pairing import tiny_stores

QUICK = {"epochs": 2, "batch_size": 16}
FIT = {"layers": [0.5, 0.5], "heldout_frac": 0.25,
       "aligners": {"procrustes": {}, "linear": QUICK, "affine": QUICK, "lora": {**QUICK, "rank": 4}, "projection": QUICK,
                    "tests.test_fit:Ridge": {"ridge": 0.5}}}


@dataclass(frozen=True)
class RidgeParams:
    ridge: float = 1.0


class Ridge(Aligner):
    """An aligner unknown to the registry: ridge regression y = W x + b in one streaming pass."""

    Params = RidgeParams

    def build_net(self, d_source, d_target):
        return linear_module(np.zeros((d_target, d_source)), np.zeros(d_target))

    def fit(self, source, target):
        m = Moments(yy=False)
        for x, y in iter_row_blocks(source, target):
            m.update(x, y)
        w = np.linalg.solve(m.cov_xx() + self.params.ridge * np.eye(m.cov_xx().shape[0]), m.cov_xy()).T
        self.d_target, self.d_source = w.shape
        self.net = linear_module(w, m.mean_y - w @ m.mean_x)
        return self


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: a second OpenMP thread only spin-waits on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def params_path(tmp_path_factory, tiny_models, tmp_path):
    """A fresh data dir (aligners, metrics) over the shared tiny stores."""
    shared = tiny_stores(tmp_path_factory.getbasetemp(), tiny_models, fit=FIT, grid={"knn_k": 5})
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "stores").symlink_to(shared.parent / "data" / "stores", target_is_directory=True)
    raw = shared.read_text().replace(str(shared.parent / "data"), str(tmp_path / "data"))
    path = tmp_path / "params.yaml"
    path.write_text(raw)
    return path


def fit(capsys, params_path, name, *extra):
    return run_cli(capsys, "--params", str(params_path), *extra, "fit", name, "--quiet")


def no_model_loading(monkeypatch):
    import transformers

    import pipeline.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(pipeline.models, "load_model", refuse)
    monkeypatch.setattr(pipeline.models, "resolve_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_new_aligner_class_fits_from_the_store_without_loading_a_model(capsys, params_path, monkeypatch):
    no_model_loading(monkeypatch)
    code, _, err = fit(capsys, params_path, "tests.test_fit:Ridge")
    assert code == 0, err
    params = load_params(params_path)
    directory = params.paths.aligner("tests.test_fit:Ridge")
    saved = json.loads((directory / "aligner.json").read_text())
    assert saved["kind"] == "tests.test_fit:Ridge" and saved["params"] == {"ridge": 0.5}
    aligner = load_aligner(directory)
    # the saved map is the closed form on exactly the training rows the meta describes
    from pipeline.fitting import paired_for_fit, read_stores

    paired = paired_for_fit(*read_stores(params.paths.layout.stores), params.fit)
    x, y = (np.asarray(v, dtype=np.float64) for v in paired.arrays(paired.train))
    xc, yc = x - x.mean(0), y - y.mean(0)
    w = np.linalg.solve(xc.T @ xc + 0.5 * np.eye(x.shape[1]), xc.T @ yc).T
    np.testing.assert_allclose(aligner.net.weight.numpy(), w, rtol=1e-4, atol=1e-5)
    assert aligner.meta["train_rows"] == len(x)
    metrics = json.loads(params.paths.layout.details("fit-tests.test_fit:Ridge").read_text())
    assert metrics["heldout_rows"] == len(paired.heldout) and 0 <= metrics["retrieval_top1"] <= 1


@pytest.mark.parametrize("name", ["procrustes", "linear", "affine", "lora", "projection"])
def test_builtin_aligner_writes_its_directory_and_metrics(capsys, params_path, name):
    code, _, err = fit(capsys, params_path, name)
    assert code == 0, err
    params = load_params(params_path)
    aligner = load_aligner(params.paths.aligner(name))
    a_store = params.paths.store("a")
    assert (aligner.d_source, aligner.d_target) == (64, 48)  # tiny-llama → tiny-qwen
    inputs = aligner.meta["inputs"]
    assert inputs["activation_kind"] == "last" and inputs["layers"] == {"a": 2, "b": 2}
    assert inputs["stores"]["a"] == json.loads((a_store / "zarr.json").read_text())["attributes"]["params_hash"]
    metrics = json.loads(params.paths.layout.details(f"fit-{name}").read_text())
    for key in ("retrieval_top1", "retrieval_top5", "mse", "r2", "cka", "infonce", "alignment", "uniformity"):
        assert key in metrics, key
    assert metrics["retrieval_top5"] >= metrics["retrieval_top1"]
    assert not (params.paths.aligner(name) / "ckpt").exists()  # kept only while a fit is unfinished


def test_per_token_fit_pairs_tokens_by_offset(capsys, params_path):
    code, _, err = fit(capsys, params_path, "procrustes", "-S", "fit.kind=tokens")
    assert code == 0, err
    metrics = json.loads(load_params(params_path).paths.layout.details("fit-procrustes").read_text())
    assert metrics["activation_kind"] == "tokens" and metrics["train_rows"] > 96


def test_interrupted_fit_resumes_from_its_checkpoint(params_path):
    from stages import fit as stage

    params = load_params(params_path, {"fit.aligners.linear": {"epochs": 3, "batch_size": 16, "patience": 0}})
    whole = stage.run(params, "linear").aligner.net.weight.clone()
    directory = params.paths.aligner("linear")
    shutil.rmtree(directory)

    def stop_in_epoch_2(entry):
        if entry["epoch"] == 2:
            raise KeyboardInterrupt  # after epoch 2's last batch, before its checkpoint

    with pytest.raises(KeyboardInterrupt):
        stage.run(params, "linear", log=stop_in_epoch_2)
    assert json.loads((directory / "ckpt" / "state.json").read_text())["state"]["epoch"] == 1
    # a checkpoint of other inputs (here: another store A) is refused, not resumed
    inputs = directory / "ckpt" / "inputs.json"
    saved = inputs.read_text()
    inputs.write_text(saved.replace(json.loads(saved)["stores"]["a"], "0123456789abcdef"))
    with pytest.raises(UserError, match=r"ckpt holds a checkpoint of other inputs \(stores.a: '0123456789abcdef' -> "):
        stage.run(params, "linear")
    inputs.write_text(saved)
    seen = []
    resumed = stage.run(params, "linear", log=seen.append).aligner
    assert [e["epoch"] for e in seen] == [2, 3]
    torch.testing.assert_close(resumed.net.weight, whole, rtol=0, atol=0)


def test_grid_writes_json_and_heatmap_of_every_layer_pair(capsys, params_path):
    assert fit(capsys, params_path, "procrustes")[0] == 0
    code, out, err = run_cli(capsys, "--params", str(params_path), "grid")
    assert code == 0, err
    params = load_params(params_path)
    grid = json.loads(params.paths.layout.details("grid").read_text())
    assert grid["layers_a"] == [0, 2, 3] and grid["layers_b"] == [0, 2, 4]
    for table in ("cka", "mutual_knn"):
        assert sorted(grid[table]) == ["a0", "a2", "a3"]
        assert all(sorted(row) == ["b0", "b2", "b4"] for row in grid[table].values())
    fitted = json.loads(params.paths.layout.details("fit-procrustes").read_text())
    assert grid["aligners"]["procrustes"]["mse"] == pytest.approx(fitted["mse"], rel=1e-6)
    png = params.paths.data + "/plots/cka.png"
    from matplotlib.image import imread

    assert imread(png).ndim == 3 and "A3" in out


def test_bad_inputs_exit_2_with_one_line(capsys, params_path, tmp_path_factory, tiny_models):
    def refused(*args, match):
        capsys.readouterr()  # drop what fixtures printed (progress bars of model loading)
        code, _, err = run_cli(capsys, "--params", str(params_path), *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err

    refused("fit", "no-such-aligner", match="unknown aligner 'no-such-aligner'")
    refused("-S", "fit.aligners.linear.learning_rate=0.1", "fit", "linear",
            match="params fit.aligners.linear: linear: unknown hyper-parameter(s) ['learning_rate']")
    refused("-S", "fit.layers=[2, 3]", "fit", "procrustes", match="layer 3 of")  # B layer 3 is not stored
    refused("-S", "fit.device=tpu", "fit", "linear", match="device 'tpu' is not valid")

    # an aligner directory fitted on another store pair: refused, replaced with --force
    assert fit(capsys, params_path, "linear")[0] == 0
    path = load_params(params_path).paths.aligner("linear") / "aligner.json"
    raw = json.loads(path.read_text())
    raw["meta"]["inputs"]["stores"]["a"] = "0123456789abcdef"
    path.write_text(json.dumps(raw))
    refused("fit", "linear", match="holds an aligner fitted on other inputs (stores.a: '0123456789abcdef' -> ")
    code, _, err = run_cli(capsys, "--params", str(params_path), "fit", "linear", "--quiet", "--force")
    assert code == 0, err

    # stores of another corpus
    other = tiny_stores(tmp_path_factory.getbasetemp(), tiny_models, name="other-corpus", corpus={"n": 96, "seed": 1})
    stores = params_path.parent / "data" / "stores"
    a_store = (stores / "a.zarr").resolve()
    stores.unlink()
    stores.mkdir()
    (stores / "a.zarr").symlink_to(a_store)
    (stores / "b.zarr").symlink_to(load_params(other).paths.store("b"))
    refused("fit", "procrustes", match="stores were extracted from different corpora; rerun extract")


def test_fit_under_torchrun_trains_with_ddp_and_refuses_on_every_rank(params_path):
    import os
    import subprocess
    import sys

    def torchrun(*args):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "pipeline", "--params", str(params_path), "fit", "linear", "--quiet", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})

    proc = torchrun()
    assert proc.returncode == 0, proc.stderr[-2000:]
    directory = load_params(params_path).paths.aligner("linear")
    assert load_aligner(directory).fit_info["steps"] > 0
    # rank 0 refuses an aligner of other inputs; rank 1 must stop too, not wait at a barrier
    raw = json.loads((directory / "aligner.json").read_text())
    raw["meta"]["inputs"]["layers"]["a"] = 0
    (directory / "aligner.json").write_text(json.dumps(raw))
    proc = torchrun()
    assert proc.returncode != 0 and "holds an aligner fitted on other inputs (layers.a: 0 -> 2)" in proc.stderr


# -- outputs whole or not at all, only xmodel's folders replaced, one writer (issue 12) -----------


def _snapshot(directory):
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def _frac_holding_one_text(params) -> float:
    """A fit.heldout_frac that holds out exactly one of the stores' texts."""
    from pipeline.aligners.base import hashed_heldout
    from pipeline.fitting import read_stores
    from pipeline.pairing import pair_rows

    texts = pair_rows(*read_stores(params.paths.layout.stores), "last").text
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if hashed_heldout(texts, params.fit.seed, mid).sum() < 1 else (lo, mid)
    return hi


def test_a_failed_fit_leaves_the_previous_aligner_and_metrics_untouched(capsys, params_path):
    assert fit(capsys, params_path, "procrustes")[0] == 0
    params = load_params(params_path)
    directory, metrics = params.paths.aligner("procrustes"), params.paths.metrics("fit-procrustes")
    before, metrics_before = _snapshot(directory), metrics.read_bytes()
    for setting, match in (("fit.pairwise_rows=1", "fit.pairwise_rows = 1"),
                           (f"fit.heldout_frac={_frac_holding_one_text(params)}", "1 held-out row(s) cannot score")):
        code, _, err = run_cli(capsys, "--params", str(params_path), "-S", setting, "fit", "procrustes", "--quiet", "--force")
        assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
        assert _snapshot(directory) == before and metrics.read_bytes() == metrics_before
    # nothing was ever there: a failed fit leaves no finished-looking aligner behind
    code, _, err = run_cli(capsys, "--params", str(params_path), "-S", "fit.pairwise_rows=1", "fit", "affine", "--quiet")
    assert code == 2 and not params.paths.aligner("affine").exists() and not params.paths.metrics("fit-affine").exists()


@pytest.mark.parametrize("lr, match", [
    ("nan_step", "training diverged: the "),  # weights a step made NaN (what an exploding training does)
    ("1.0e+30", "lr = 1e+30 must be in (0, 10]"),  # beyond Adam's float32 step: refused before training
    (".inf", "is not a finite number"),
])
def test_diverging_training_stops_with_one_line_and_saves_nothing(capsys, params_path, monkeypatch, lr, match):
    import torch

    assert fit(capsys, params_path, "linear")[0] == 0
    params = load_params(params_path)
    directory = params.paths.aligner("linear")
    before, metrics_before = _snapshot(directory), params.paths.metrics("fit-linear").read_bytes()
    if lr == "nan_step":  # lr in range cannot blow up these activations: make Adam's step do it
        step = torch.optim.Adam.step

        def exploding(self, *args, **kwargs):
            out = step(self, *args, **kwargs)
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
            return out

        monkeypatch.setattr(torch.optim.Adam, "step", exploding)
        lr = "0.001"
    code, _, err = run_cli(capsys, "--params", str(params_path), "-S", f"fit.aligners.linear.lr={lr}",
                           "fit", "linear", "--quiet", "--force")
    assert code == 2 and len(err.strip().splitlines()) == 1 and match in err, err
    assert _snapshot(directory) == before and params.paths.metrics("fit-linear").read_bytes() == metrics_before
    assert np.isfinite(load_aligner(directory).net.weight.detach().numpy()).all()


def test_fit_never_replaces_a_folder_xmodel_did_not_write(capsys, params_path):
    directory = load_params(params_path).paths.aligner("procrustes")
    directory.mkdir(parents=True)
    (directory / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "--params", str(params_path), "fit", "procrustes", "--quiet", "--force")
    assert code == 2 and "is not a aligner directory written by xmodel" in err, err
    assert [p.name for p in directory.iterdir()] == ["notes.txt"] and (directory / "notes.txt").read_text() == "mine"


def test_a_second_writer_of_an_aligner_is_refused_naming_the_holder(capsys, params_path):
    import os

    from pipeline.artifacts import exclusive

    params = load_params(params_path)
    directory = params.paths.aligner("procrustes")
    with exclusive(params.paths.layout.lock("aligners/procrustes"), directory):
        code, _, err = fit(capsys, params_path, "procrustes")
    assert code == 2 and f"pid {os.getpid()}" in err and "is being written by" in err, err
    assert not directory.exists()
    assert fit(capsys, params_path, "procrustes")[0] == 0  # released: the next run goes ahead


def test_disk_full_at_aligner_save_is_one_line_and_keeps_the_old_aligner(capsys, params_path, monkeypatch):
    from collections import Counter

    import pipeline.faults

    assert fit(capsys, params_path, "procrustes")[0] == 0
    params = load_params(params_path)
    directory = params.paths.aligner("procrustes")
    before, metrics_before = _snapshot(directory), params.paths.metrics("fit-procrustes").read_bytes()
    for after in (1, 2, 3, 4):  # the weights, aligner.json, the metrics file, the details
        monkeypatch.setattr(pipeline.faults, "_passed", Counter())
        monkeypatch.setenv("XMODEL_FAULT", f"ioerror_after_writes:{after}")
        code, _, err = run_cli(capsys, "--params", str(params_path), "-S", "fit.aligners.procrustes.refine_iters=3",
                               "fit", "procrustes", "--quiet", "--force")
        assert code == 2 and len(err.strip().splitlines()) == 1 and "No space left on device" in err, err
        assert any(str(p) in err for p in (directory, params.paths.metrics("fit-procrustes"),
                                           params.paths.layout.details("fit-procrustes"))), err
        assert _snapshot(directory) == before and params.paths.metrics("fit-procrustes").read_bytes() == metrics_before
        assert sorted(p.name for p in directory.parent.iterdir()) == ["procrustes"]  # no temporaries left
    monkeypatch.delenv("XMODEL_FAULT")
    load_aligner(directory)
    assert run_cli(capsys, "--params", str(params_path), "-S", "fit.aligners.procrustes.refine_iters=3",
                   "fit", "procrustes", "--quiet", "--force")[0] == 0
    assert _snapshot(directory) != before  # the same command, with space, does replace it


def test_disk_full_writing_the_lock_holder_is_one_line_and_keeps_the_old_aligner(capsys, params_path, monkeypatch):
    from collections import Counter

    import pipeline.faults

    assert fit(capsys, params_path, "procrustes")[0] == 0
    directory = load_params(params_path).paths.aligner("procrustes")
    before = _snapshot(directory)
    monkeypatch.setattr(pipeline.faults, "_passed", Counter())
    monkeypatch.setenv("XMODEL_FAULT", "ioerror_after_locks:1")
    code, _, err = run_cli(capsys, "--params", str(params_path), "-S", "fit.aligners.procrustes.refine_iters=3",
                           "fit", "procrustes", "--quiet", "--force")
    assert code == 2 and err.count("\n") == 1 and "No space left on device" in err and ".lock" in err, err
    assert _snapshot(directory) == before


_KILLED_FIT = """
import os, signal, sys
from pathlib import Path
target = Path(sys.argv[1]).absolute()
real = {"rename": os.rename, "replace": os.replace}
def killing(name):  # SIGKILL just before `target` is renamed into place
    def rename(src, dst, *args, **kwargs):
        if Path(dst).absolute() == target and ".tmp-" in Path(src).name:
            os.kill(os.getpid(), signal.SIGKILL)
        return real[name](src, dst, *args, **kwargs)
    return rename
os.rename, os.replace = killing("rename"), killing("replace")
from pipeline.cli import main
sys.argv = ["xmodel", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("killed", ["between the folder's two renames", "before the record's renames"])
def test_a_fit_killed_between_its_renames_is_finished_by_the_next_reader(capsys, params_path, killed):
    """A fit replaces the aligner folder and its record together: killed between any two of those
    renames, the next reader (here the report; evaluate and grid alike) finishes the commit, so the
    folder and the record are never one old and one new."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    assert fit(capsys, params_path, "procrustes")[0] == 0
    params = load_params(params_path)
    directory, record = params.paths.aligner("procrustes"), params.paths.layout.details("fit-procrustes")
    old_record = record.read_bytes()
    target = directory if killed.startswith("between") else params.paths.metrics("fit-procrustes")
    run = subprocess.run([sys.executable, "-c", _KILLED_FIT, str(target), "--params", str(params_path), "-S",
                          "fit.aligners.procrustes.refine_iters=3", "fit", "procrustes", "--quiet", "--force"],
                         capture_output=True, text=True, cwd=params_path.parent,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert run.returncode == -9, run.stderr
    code, _, err = run_cli(capsys, "--params", str(params_path), "report", "--quiet")
    assert code == 0, err
    assert json.loads((directory / "aligner.json").read_text())["params"]["refine_iters"] == 3  # the new folder
    assert record.read_bytes() != old_record  # and the new record with it
    assert not [p.name for d in (directory.parent, record.parent) for p in d.iterdir() if p.name.startswith(".")]


def test_grid_and_report_do_not_read_an_aligner_a_fit_is_writing(capsys, params_path):
    """Issue 23, item 2: the readers' side of the lock fit takes (evaluate: tests/test_evaluate.py)."""
    import os

    from pipeline.artifacts import aligner_lock, exclusive

    assert fit(capsys, params_path, "procrustes")[0] == 0
    directory = load_params(params_path).paths.aligner("procrustes")
    with exclusive(aligner_lock(directory), directory):  # what a running `xmodel fit procrustes --force` holds
        for stage in ("grid", "report"):
            code, _, err = run_cli(capsys, "--params", str(params_path), stage, "--quiet")
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            assert code == 2 and len(errors) == 1 and f"is being written by pid {os.getpid()} " in errors[0], err
