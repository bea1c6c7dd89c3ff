"""The DVC graph end to end, in a throwaway git + DVC repo: what goes stale when something changes.

One `dvc repro` of the whole DAG on the tiny profile (shrunk further below) is shared by every
test of this module; model A is a local directory, the corpus a local .txt and SQuAD a local
.json, so every kind of input is there to change. The staleness matrix changes one thing at a time
(a stage's code file, the corpus file, model A's weights, the SQuAD file, one params key per stage),
checks that exactly the stages reading it are stale, and puts it back. A few changes are also
reproduced for real. The project's code is copied in (not linked) so DVC hashes it like in a
checkout and a concurrent edit of the working tree cannot change the code under a running test.
Offline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import pytest
import yaml

from tests.helpers import ROOT

# Sizes below the tiny profile: every stage still runs on real (synthetic) models, in seconds.
SHRINK = {
    "corpus": {"n": 64},
    "extract": {"unit_size": 32, "max_tokens": 32, "tokens_per_seq": 8},
    # no layer maps (the kvmaps stage and mapped KV run in CI's tiny repro, not in this staleness matrix)
    "fit": {"aligners": {"procrustes": {},
                         "linear": {"loss": "mse", "lr": 0.001, "batch_size": 16, "epochs": 2, "patience": 2}},
            "layer_maps": []},
    "evaluate": {"tasks": ["squad", "gsm8k", "similarity"], "aligners": ["procrustes", "linear"], "n_boot": 50,
                 "methods": ["b_alone", "a_alone", "nl", "ac", "mv_ac", "skyline"],
                 "squad": {"n": 2, "max_new_tokens": 4}, "gsm8k": {"n": 2, "max_new_tokens": 4},
                 "similarity": {"n": 4}},
}
EVALUATE = {"evaluate@squad", "evaluate@gsm8k", "evaluate@similarity"}
DOWNSTREAM_OF_ALIGNERS = {"grid", *EVALUATE, "report"}
UPSTREAM = {"prepare@a", "prepare@b", "extract@a", "extract@b"}
FITS = {"fit@procrustes", "fit@linear"}
ALWAYS = {"inputs"}  # always_changed: hashes the local input files on every repro
# stage -> the stages that read its outputs (dvc.yaml)
READERS = {"inputs": UPSTREAM | EVALUATE, "prepare@a": {"extract@a", *EVALUATE, "report"},
           "prepare@b": {"extract@b", *EVALUATE, "report"}, "extract@a": FITS | {"grid", "report"},
           "extract@b": FITS | {"grid", "report"}, **{f: {"grid", *EVALUATE, "report"} for f in FITS},
           "grid": {"report"}, **{e: {"report"} for e in EVALUATE}, "report": set()}


def downstream(stages: set[str]) -> set[str]:
    out, todo = set(), list(stages)
    while todo:
        for reader in READERS[todo.pop()] - out:
            out.add(reader)
            todo.append(reader)
    return out


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

    def repro(self, *args: str) -> set[str]:
        """Run `dvc repro`; the names of the stages it reproduced, by running them or by restoring
        the outputs of an earlier run of the same inputs from DVC's run cache (`inputs` runs every
        time: left out)."""
        out = self.dvc("repro", *args).stdout
        return set(re.findall(r"(?:Running stage|Stage) '([^']+)'(?=:| is cached)", out)) - ALWAYS

    def status(self) -> dict:
        """`dvc status`, less the always-changed `inputs` stage (it runs on every repro, whatever changed:
        its code deps, which include every aligner it checks, only say what it imports)."""
        status = json.loads(self.dvc("status", "--json").stdout or "{}")
        return {k: v for k, v in status.items() if k not in ALWAYS}

    def stale(self, inputs: bool) -> set[str]:
        """The stale stages; with `inputs`, once that stage has hashed the input files again (as
        `dvc repro` would first)."""
        if inputs:
            self.dvc("repro", "--single-item", "inputs")
        return set(self.status())

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def set_params(self, raw: dict) -> None:
        (self.path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def data(self, *parts: str) -> Path:
        return self.path.joinpath("data", *parts)


@pytest.fixture(scope="module")
def repo(tmp_path_factory, tiny_models) -> Repo:
    from pipeline.config import merged_params
    from pipeline.data import pydoc_sentences
    from pipeline.tasks.squad import generate_items, write_squad_json

    root = tmp_path_factory.mktemp("dvcrepo")
    r = Repo(root / "repo", root / "cache")
    r.path.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pipeline", "stages", "store"):
        shutil.copytree(ROOT / name, r.path / name, ignore=ignore)
    shutil.copy(ROOT / "dvc.yaml", r.path / "dvc.yaml")
    # inputs outside the repo, named by params: a local model directory, corpus file and task file
    inputs = root / "inputs"
    shutil.copytree(tiny_models["llama"], inputs / "model-a")
    (inputs / "corpus.txt").write_text("\n".join(pydoc_sentences()[:400]) + "\n")
    write_squad_json(generate_items(8, seed=5), inputs / "squad.json")
    raw = merged_params(ROOT / "params.yaml", overlays=[ROOT / "profiles" / "tiny.yaml"])
    raw["models"]["a"] = str(inputs / "model-a")
    raw["corpus"]["source"] = str(inputs / "corpus.txt")
    raw["evaluate"]["squad"]["source"] = str(inputs / "squad.json")
    r.set_params(_merge(raw, SHRINK))
    r.inputs = inputs
    (r.path / ".gitignore").write_text("/data/\n")
    r.run("git", "init", "-q")
    r.dvc("init", "-q")
    r.run("git", "add", "-A")
    r.run("git", "commit", "-qm", "tiny pipeline")
    ran = r.repro()
    assert UPSTREAM | FITS | DOWNSTREAM_OF_ALIGNERS <= ran
    return r


def _mtimes(paths: list[Path]) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in paths}


def _kept_outputs(repo: Repo, aligner: str) -> list[Path]:
    """Outputs that must not be rewritten when only another aligner changes: stores (their unit
    markers included), model manifests, and the other aligner's weights and record."""
    stores = [p for role in ("a", "b") for p in repo.data("stores", f"{role}.zarr").rglob("*") if p.is_file()]
    return stores + [repo.data("models", "a.json"), repo.data("models", "b.json"),
                     repo.data("metrics", "extract-a.json"), repo.data("details", "extract-a.json"),
                     repo.data("aligners", aligner, "weights.safetensors"),
                     repo.data("details", f"fit-{aligner}.json"), repo.data("metrics", f"fit-{aligner}.json")]


def test_full_repro_is_up_to_date_and_reported(repo):
    assert repo.status() == {}
    report = repo.data("report", "report.md").read_text()
    linear = json.loads(repo.data("details", "fit-linear.json").read_text())
    row = next(line for line in report.splitlines() if line.startswith("| `linear` |"))
    assert f"| {linear['retrieval_top1']:.3f} | {linear['retrieval_top5']:.3f} |" in row
    for task in ("squad", "gsm8k"):  # registered tasks not in evaluate.tasks are "not run"
        section = report.split(f"## Evaluation: {task}\n")[1].split("\n## ")[0]
        assert "_not run_" not in section, task


def test_metrics_are_a_few_headline_numbers_and_the_report_reads_the_details(repo):
    """Every metrics file DVC shows holds at most MAX_KEYS numbers, named alike across stages (so
    `dvc metrics show` stays one readable table), and its full record is beside it in data/details/,
    where the report finds what it prints."""
    from pipeline.headlines import MAX_KEYS

    shown = json.loads(repo.dvc("metrics", "show", "--json").stdout)
    files = {path: value["data"] for rev in shown.values() for path, value in rev["data"].items()}
    assert len(files) == len(list(repo.data("metrics").glob("*.json"))) == 8, sorted(files)  # extract ×2, fit ×2, grid, evaluate ×3

    def flat(d: dict, prefix: str = "") -> dict:
        return {k2: v2 for k, v in d.items()
                for k2, v2 in (flat(v, f"{prefix}{k}.").items() if isinstance(v, dict) else [(prefix + k, v)])}

    columns = set()
    for path, values in files.items():
        keys = flat(values)
        assert 0 < len(keys) <= MAX_KEYS, (path, sorted(keys))
        assert all(isinstance(v, (int, float)) for v in keys.values()), (path, keys)
        columns |= set(keys)
        assert repo.path.joinpath(path.replace("metrics", "details", 1)).is_file(), path
    assert len(columns) <= 16, sorted(columns)  # shared names: the table does not grow with methods or aligners
    table = repo.dvc("metrics", "show").stdout
    assert max(len(line) for line in table.splitlines()) <= 200, table
    details = json.loads(repo.data("details", "evaluate-squad.json").read_text())
    headline = json.loads(repo.data("metrics", "evaluate-squad.json").read_text())
    assert headline["n"] == details["n_items"] and headline["b_alone"] == details["methods"]["b_alone"]["em"]["mean"]
    squad = repo.data("report", "report.md").read_text().split("## Evaluation: squad\n")[1].split("\n## ")[0]
    assert all(f"| `{method}` |" in squad for method in details["methods"]), squad


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
    kept = _mtimes(_kept_outputs(repo, "linear") + _kept_outputs(repo, "procrustes")[-3:])

    assert "fit@procrustes-affine" in repo.status()
    ran = repo.repro()
    # evaluate@* rerun too: they depend on the whole data/aligners folder (see dvc.yaml)
    assert ran == {"fit@procrustes-affine"} | DOWNSTREAM_OF_ALIGNERS
    assert _mtimes(list(kept)) == kept
    assert repo.data("aligners", "procrustes-affine", "weights.safetensors").exists()
    details = json.loads(repo.data("details", "fit-procrustes-affine.json").read_text())
    assert details["aligner"] == "procrustes-affine"
    grid = json.loads(repo.data("details", "grid.json").read_text())
    assert "procrustes-affine" in grid["aligners"]
    assert "| `procrustes-affine` |" in repo.data("report", "report.md").read_text()
    assert repo.status() == {}


@pytest.mark.parametrize("name", ["procrustes", "linear"])
def test_stage_alone_writes_what_the_dvc_stage_wrote(repo, name, tmp_path):
    """`xmodel fit NAME` by hand (the dvc.yaml command) refits to the same bytes and scores."""
    directory = repo.data("aligners", name)
    record = {kind: repo.data(kind, f"fit-{name}.json") for kind in ("details", "metrics")}
    shutil.move(directory, tmp_path / "aligner")  # gone, so the command really refits
    for kind, path in record.items():
        shutil.move(path, tmp_path / kind)
    try:
        repo.run(sys.executable, "-m", "pipeline", "fit", name, "--quiet", "--force")
        for file in ("weights.safetensors", "aligner.json"):
            assert (directory / file).read_bytes() == (tmp_path / "aligner" / file).read_bytes(), file
        assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in (tmp_path / "aligner").iterdir())
        timing = {"fit_seconds", "seconds"}
        for kind, path in record.items():
            by_hand, by_dvc = (json.loads(p.read_text()) for p in (path, tmp_path / kind))
            assert {k: v for k, v in by_hand.items() if k not in timing} == {k: v for k, v in by_dvc.items() if k not in timing}
    finally:  # put DVC's outputs back (the seconds differ) so the other tests see an up-to-date repo
        shutil.rmtree(directory, ignore_errors=True)
        shutil.move(tmp_path / "aligner", directory)
        for kind, path in record.items():
            shutil.move(tmp_path / kind, path)
    assert repo.status() == {}


# --- the staleness matrix -------------------------------------------------------------------------


@contextmanager
def changed(path: Path, change: Callable[[bytes], bytes]) -> Iterator[None]:
    """`path` with its content changed inside the block, and byte for byte restored after it."""
    before = path.read_bytes()
    path.write_bytes(change(before))
    try:
        yield
    finally:
        path.write_bytes(before)


def _comment(data: bytes) -> bytes:
    return data + b"\n# an edit\n"


def _new_first_line(data: bytes) -> bytes:
    return b"A sentence that was not in the corpus before, long enough to be kept.\n" + data


def _set(key: str, value) -> Callable[[bytes], bytes]:
    def change(data: bytes) -> bytes:
        raw = yaml.safe_load(data)
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
        return yaml.safe_dump(raw, sort_keys=False).encode()
    return change


def _fits(repo: Repo) -> set[str]:
    """Every fit@<name> stage (earlier tests of this module add aligners)."""
    return {f"fit@{name}" for name in repo.params()["fit"]["aligners"]}


def _weights(repo: Repo) -> Path:
    return next((repo.inputs / "model-a").glob("*.safetensors"))


def _flip_last_byte(data: bytes) -> bytes:
    return data[:-1] + bytes([data[-1] ^ 1])


# what changes -> the stages it must make stale, and nothing else
MATRIX = {
    # a code file of each stage (code deps: tests/test_imports.py)
    # inputs reruns on every repro whatever changed (left out of the status); its outputs stay the same
    "code stages/inputs.py": (lambda r: r.path / "stages" / "inputs.py", _comment, set()),
    "code stages/prepare.py": (lambda r: r.path / "stages" / "prepare.py", _comment, {"prepare@a", "prepare@b"}),
    "code pipeline/staging.py": (lambda r: r.path / "pipeline" / "staging.py", _comment, {"extract@a", "extract@b"}),
    "code stages/fit.py": (lambda r: r.path / "stages" / "fit.py", _comment, lambda r: _fits(r)),
    "code pipeline/grid.py": (lambda r: r.path / "pipeline" / "grid.py", _comment, {"grid"}),
    "code pipeline/stats.py": (lambda r: r.path / "pipeline" / "stats.py", _comment, EVALUATE),
    "code pipeline/report.py": (lambda r: r.path / "pipeline" / "report.py", _comment, {"report"}),
    # the expensive mistakes: code that only some stages read (reading params imports none of it)
    "code the decoder": (lambda r: r.path / "pipeline" / "generation.py", _comment, EVALUATE),
    "code a task generator": (lambda r: r.path / "pipeline" / "tasks" / "games.py", _comment,
                              {"extract@a", "extract@b", *EVALUATE}),  # extract reads a task corpus (task:<name>)
    "code an aligner": (lambda r: r.path / "pipeline" / "aligners" / "adapters.py", _comment,
                        lambda r: _fits(r) | {"grid", *EVALUATE}),
    "code the store writer": (lambda r: r.path / "store" / "writer.py", _comment, {"extract@a", "extract@b"}),
    # input files, by content (stage `inputs`); the corpus is also held out of the similarity
    # probe, and every evaluate@* shares the dvc.yaml template
    "corpus file": (lambda r: r.inputs / "corpus.txt", _new_first_line, {"extract@a", "extract@b", *EVALUATE}),
    "model A's weights": (_weights, _flip_last_byte, {"prepare@a"}),
    "SQuAD file": (lambda r: r.inputs / "squad.json", lambda d: d.replace(b'"question": "', b'"question": "So, ', 1),
                   {"evaluate@squad"}),
    # one params key per stage (report reads every section)
    "models.b": (lambda r: r.path / "params.yaml", _set("models.b", "synthetic:tiny-llama"),
                 {"prepare@b", "extract@b", *EVALUATE, "report"}),
    "corpus.seed": (lambda r: r.path / "params.yaml", _set("corpus.seed", 7),
                    {"extract@a", "extract@b", *EVALUATE, "report"}),
    "extract.tokens_per_seq": (lambda r: r.path / "params.yaml", _set("extract.tokens_per_seq", 4),
                               {"extract@a", "extract@b", "report"}),
    # grid reads fit.aligners (the names it scores)
    "fit.aligners.linear.lr": (lambda r: r.path / "params.yaml", _set("fit.aligners.linear.lr", 0.01),
                               {"fit@linear", "grid", "report"}),
    "fit.heldout_frac": (lambda r: r.path / "params.yaml", _set("fit.heldout_frac", 0.3),
                         lambda r: _fits(r) | {"grid", "report"}),
    "grid.knn_k": (lambda r: r.path / "params.yaml", _set("grid.knn_k", 3), {"grid", "report"}),
    "evaluate.squad.n": (lambda r: r.path / "params.yaml", _set("evaluate.squad.n", 3), {"evaluate@squad", "report"}),
    "evaluate.gsm8k.n": (lambda r: r.path / "params.yaml", _set("evaluate.gsm8k.n", 3), {"evaluate@gsm8k", "report"}),
    "evaluate.n_boot": (lambda r: r.path / "params.yaml", _set("evaluate.n_boot", 60), EVALUATE | {"report"}),
}


@pytest.mark.parametrize("what", list(MATRIX))
def test_a_change_makes_exactly_its_readers_stale(repo, what):
    path, change, expected = MATRIX[what]
    expected = expected(repo) if callable(expected) else expected
    outside = not path(repo).is_relative_to(repo.path)  # an input file, seen through stage `inputs`
    assert repo.status() == {}
    with changed(path(repo), change):
        assert repo.stale(inputs=outside) == expected
    assert repo.stale(inputs=outside) == set()  # put back: nothing is stale


@pytest.mark.parametrize("what", ["SQuAD file", "code pipeline/grid.py"])
def test_a_change_reruns_its_readers_and_only_what_reads_their_outputs(repo, what):
    """For real: `dvc repro` runs the stale stages, and beyond them only stages whose inputs they
    rewrote (downstream in dvc.yaml); putting the change back reruns the same."""
    path, change, expected = MATRIX[what]
    with changed(path(repo), change):
        ran = repo.repro()
        assert expected <= ran <= expected | downstream(expected), ran
        assert repo.status() == {}
    ran = repo.repro()
    assert expected <= ran <= expected | downstream(expected), ran
    assert repo.status() == {}


# --- the input manifests, without DVC ------------------------------------------------------------


def test_inputs_name_local_files_by_content_and_other_sources_as_they_are(tmp_path, monkeypatch):
    from pipeline.config import params_from_dict
    from pipeline.inputs import HashCache, manifests, sha256_file

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    (tmp_path / "model" / "w.safetensors").write_bytes(b"weights")
    (tmp_path / "corpus.txt").write_text("a line\n")
    params = params_from_dict({"models": {"a": str(tmp_path / "model"), "b": "synthetic:tiny-qwen"},
                               "corpus": {"source": str(tmp_path / "corpus.txt")},
                               "evaluate": {"tasks": ["squad"], "squad": {"source": "generate"}}})
    hashes = HashCache(tmp_path / "hashes.json")
    got = manifests(params, hashes)
    assert got["corpus"] == {"source": str(tmp_path / "corpus.txt"), "sha256": sha256_file(tmp_path / "corpus.txt")}
    assert got["model-a"]["files"] == {"config.json": sha256_file(tmp_path / "model" / "config.json"),
                                       "w.safetensors": sha256_file(tmp_path / "model" / "w.safetensors")}
    assert got["model-b"] == {"source": "synthetic:tiny-qwen"} and got["evaluate-squad"] == {"source": "generate"}
    hashes.save()

    # an unchanged file is not read again (a large model directory costs one stat per file)
    reads = []
    monkeypatch.setattr("pipeline.inputs.sha256_file", lambda p: reads.append(p) or "x")
    assert manifests(params, HashCache(tmp_path / "hashes.json")) == got and reads == []
    (tmp_path / "corpus.txt").write_text("another line\n")  # new size: read again
    manifests(params, HashCache(tmp_path / "hashes.json"))
    assert reads == [tmp_path / "corpus.txt"]


def test_a_task_corpus_manifest_holds_what_extract_reads_of_evaluate(tmp_path):
    """extract over `task:<name>` reads evaluate.<name> (its items: source file, n and seed) and
    evaluate.chat, keys dvc.yaml cannot name: data/inputs/corpus.json carries them, so it changes
    with each of them (and with the task file's content), and not with another task's section."""
    from pipeline.config import params_from_dict
    from pipeline.inputs import HashCache, manifests
    from pipeline.tasks.squad import generate_items, write_squad_json

    write_squad_json(generate_items(6, seed=5), tmp_path / "squad.json")
    base = {"corpus": {"source": "task:squad", "n": 4},
            "evaluate": {"squad": {"source": str(tmp_path / "squad.json"), "n": 2}}}

    def corpus(**evaluate) -> dict:
        raw = _merge(json.loads(json.dumps(base)), {"evaluate": evaluate})
        return manifests(params_from_dict(raw), HashCache(None))["corpus"]

    before = corpus()
    assert corpus(gsm8k={"n": 5}) == before and corpus(n_boot=99) == before
    for changed_key in ({"squad": {"n": 3}}, {"squad": {"seed": 4}}, {"squad": {"setting": "shared"}}, {"chat": False}):
        assert corpus(**changed_key) != before, changed_key
    write_squad_json(generate_items(6, seed=6), tmp_path / "squad.json")
    assert corpus() != before
