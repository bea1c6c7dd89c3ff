"""The DVC graph end to end, in a throwaway git + DVC repo: what goes stale when params change.

One `dvc repro` of the whole DAG on the tiny profile (shrunk further below) is shared by every
test of this module; the tests then change params and check that only the stages that read the
change rerun. The project's code is copied in (not linked) so DVC hashes it like in a checkout and
a concurrent edit of the working tree cannot change the code under a running test. Offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

# Sizes below the tiny profile: every stage still runs on real (synthetic) models, in seconds.
SHRINK = {
    "corpus": {"n": 64},
    "extract": {"unit_size": 32, "max_tokens": 32, "tokens_per_seq": 8},
    "fit": {"aligners": {"procrustes": {},
                         "linear": {"loss": "mse", "lr": 0.001, "batch_size": 16, "epochs": 2, "patience": 2}}},
    "evaluate": {"aligners": ["procrustes", "linear"], "n_boot": 50,
                 "squad": {"n": 2, "max_new_tokens": 4}, "gsm8k": {"n": 2, "max_new_tokens": 4},
                 "similarity": {"n": 4}},
}
DOWNSTREAM_OF_ALIGNERS = {"grid", "evaluate@squad", "evaluate@gsm8k", "evaluate@similarity", "report"}
UPSTREAM = {"prepare@a", "prepare@b", "extract@a", "extract@b"}


def _merge(base: dict, extra: dict) -> dict:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "aligners":
            _merge(base[key], value)
        else:
            base[key] = value  # fit.aligners is replaced whole: the test decides which fit stages exist
    return base


class Repo:
    def __init__(self, path: Path, cache: Path):
        self.path = path
        bin_dir = str(Path(sys.executable).parent)  # `xmodel` (dvc.yaml's cmd) lives beside this python
        self.env = {**os.environ, "PYTHONPATH": str(path), "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "XMODEL_CACHE": str(cache), "XMODEL_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
                    "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
                    "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run(cmd, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=900)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done

    def dvc(self, *args: str) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args)

    def repro(self) -> set[str]:
        """Run `dvc repro`; the names of the stages it ran."""
        out = self.dvc("repro").stdout
        return set(re.findall(r"Running stage '([^']+)'", out))

    def status(self) -> dict:
        return json.loads(self.dvc("status", "--json").stdout or "{}")

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_params(self, raw: dict) -> None:
        (self.path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def data(self, *parts: str) -> Path:
        return self.path.joinpath("data", *parts)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Repo:
    root = tmp_path_factory.mktemp("dvcrepo")
    r = Repo(root / "repo", root / "cache")
    r.path.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pipeline", "stages", "store"):
        shutil.copytree(ROOT / name, r.path / name, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", r.path / "dvc.yaml")
    r.set_params(_merge(yaml.safe_load((ROOT / "profiles" / "tiny.yaml").read_text()), SHRINK))
    (r.path / ".gitignore").write_text("/data/\n")
    r.run("git", "init", "-q")
    r.dvc("init", "-q")
    r.run("git", "add", "-A")
    r.run("git", "commit", "-qm", "tiny pipeline")
    ran = r.repro()
    assert UPSTREAM | {"fit@procrustes", "fit@linear"} | DOWNSTREAM_OF_ALIGNERS <= ran
    return r


def _mtimes(paths: list[Path]) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


def _kept_outputs(repo: Repo, aligner: str) -> list[Path]:
    """Outputs that must not be rewritten when only another aligner changes: stores (their unit
    markers included), model manifests, and the other aligner's weights and metrics."""
    stores = [p for role in ("a", "b") for p in repo.data("stores", f"{role}.zarr").rglob("*") if p.is_file()]
    return stores + [repo.data("models", "a.json"), repo.data("models", "b.json"),
                     repo.data("metrics", "extract-a.json"), repo.data("aligners", aligner, "weights.safetensors"),
                     repo.data("metrics", f"fit-{aligner}.json")]


def test_full_repro_is_up_to_date_and_reported(repo):
    assert repo.status() == {}
    report = repo.data("report", "report.md").read_text()
    linear = json.loads(repo.data("metrics", "fit-linear.json").read_text())
    row = next(line for line in report.splitlines() if line.startswith("| `linear` |"))
    assert f"| {linear['retrieval_top1']:.3f} | {linear['retrieval_top5']:.3f} |" in row
    assert "## Evaluation: squad" in report and "_not run_" not in report.split("## Layer sweep")[0]


def test_aligner_param_change_reruns_only_its_fit_and_downstream(repo):
    raw = repo.params()
    raw["fit"]["aligners"]["linear"]["lr"] = 0.003
    repo.set_params(raw)
    kept = _mtimes(_kept_outputs(repo, "procrustes"))

    stale = repo.status()
    assert "fit@linear" in stale
    assert not (set(stale) & (UPSTREAM | {"fit@procrustes"})), stale

    ran = repo.repro()
    assert ran == {"fit@linear"} | DOWNSTREAM_OF_ALIGNERS
    assert _mtimes(list(kept)) == kept
    saved = json.loads(repo.data("aligners", "linear", "aligner.json").read_text())
    assert saved["params"]["lr"] == 0.003
    assert repo.status() == {}


def test_new_aligner_is_fitted_from_the_existing_stores(repo):
    raw = repo.params()
    raw["fit"]["aligners"]["procrustes-affine"] = {}
    repo.set_params(raw)
    kept = _mtimes(_kept_outputs(repo, "linear") + _kept_outputs(repo, "procrustes")[-2:])

    assert "fit@procrustes-affine" in repo.status()
    ran = repo.repro()
    # evaluate@* rerun too: they depend on the whole data/aligners folder (see dvc.yaml)
    assert ran == {"fit@procrustes-affine"} | DOWNSTREAM_OF_ALIGNERS
    assert _mtimes(list(kept)) == kept
    assert repo.data("aligners", "procrustes-affine", "weights.safetensors").exists()
    metrics = json.loads(repo.data("metrics", "fit-procrustes-affine.json").read_text())
    assert metrics["aligner"] == "procrustes-affine"
    grid = json.loads(repo.data("metrics", "grid.json").read_text())
    assert "procrustes-affine" in grid["aligners"]
    assert "| `procrustes-affine` |" in repo.data("report", "report.md").read_text()
    assert repo.status() == {}


@pytest.mark.parametrize("name", ["procrustes", "linear"])
def test_stage_alone_writes_what_the_dvc_stage_wrote(repo, name, tmp_path):
    """`xmodel fit NAME` by hand (the dvc.yaml command) refits to the same bytes and scores."""
    directory, metrics = repo.data("aligners", name), repo.data("metrics", f"fit-{name}.json")
    shutil.move(directory, tmp_path / "aligner")  # gone, so the command really refits
    shutil.move(metrics, tmp_path / "metrics.json")
    try:
        repo.run(sys.executable, "-m", "pipeline", "fit", name, "--quiet", "--force")
        for file in ("weights.safetensors", "aligner.json"):
            assert (directory / file).read_bytes() == (tmp_path / "aligner" / file).read_bytes(), file
        assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in (tmp_path / "aligner").iterdir())
        timing = {"fit_seconds"}
        by_hand, by_dvc = (json.loads(p.read_text()) for p in (metrics, tmp_path / "metrics.json"))
        assert {k: v for k, v in by_hand.items() if k not in timing} == {k: v for k, v in by_dvc.items() if k not in timing}
    finally:  # put DVC's outputs back (fit_seconds differs) so the other tests see an up-to-date repo
        shutil.rmtree(directory, ignore_errors=True)
        shutil.move(tmp_path / "aligner", directory)
        shutil.move(tmp_path / "metrics.json", metrics)
    assert repo.status() == {}
