"""Params files: params.yaml is the one set of defaults (the dataclasses agree with it), profiles are
overlays holding only their differences, and every shipped combination is valid: strict keys and
types, known aligners and tasks, and the fit layers among the extracted ones."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import Params, load_params, merge_params

ROOT = Path(__file__).resolve().parent.parent
PARAMS = ROOT / "params.yaml"
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


def _xmodel(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, capture_output=True, text=True,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, timeout=120)


@pytest.mark.parametrize("overlay", [None, *PROFILES], ids=lambda p: p.name if p else "params.yaml")
def test_params_file_is_valid(overlay):
    from pipeline.aligners.registry import get_aligner

    params = load_params(PARAMS, overlays=[overlay] if overlay else [])
    for name in params.fit.aligners:
        get_aligner(name)  # a registered name (a DVC stage cannot be named module:Class)
    for layer in params.fit.layers:  # fitting reads only stored layers
        assert layer in params.extract.layers, f"fit layer {layer} is not extracted"
    assert params.evaluate.tasks, "no evaluate tasks"


def test_the_dataclass_defaults_are_params_yaml(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert Params() == load_params(PARAMS) == load_params(tmp_path / "none.yaml", overlays=[tmp_path / "empty.yaml"])


def _differences(base: dict, overlay: dict, where: str = "") -> list[str]:
    """Keys of `overlay` whose value is the same as params.yaml's (so need not be there)."""
    same = []
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            same += _differences(base[key], value, f"{where}{key}.")
        elif key in base and base[key] == value:
            same.append(where + key)
    return same


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_profiles_hold_only_their_differences(profile):
    assert _differences(yaml.safe_load(PARAMS.read_text()), yaml.safe_load(profile.read_text())) == []


def test_overlays_merge_over_params_yaml_in_order(tmp_path):
    base = tmp_path / "params.yaml"
    base.write_text(yaml.safe_dump({"corpus": {"n": 64, "seed": 3}, "extract": {"layers": [0, 1, 2]},
                                    "fit": {"aligners": {"procrustes": {}, "linear": {"lr": 0.01, "epochs": 2}}}}))
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(yaml.safe_dump({"corpus": {"n": 32}, "extract": {"layers": [1]},
                                     "fit": {"aligners": {"linear": {"epochs": 5}}}}))
    second.write_text(yaml.safe_dump({"corpus": {"n": 16}, "fit": {"aligners": {"procrustes": None}}}))
    params = load_params(base, overlays=[first, second])
    assert params.corpus.n == 16 and params.corpus.seed == 3  # the later file wins; untouched keys stay
    assert params.extract.layers == [1]  # a list is replaced, not merged
    assert params.fit.aligners == {"linear": {"lr": 0.01, "epochs": 5}}  # null removes procrustes
    assert load_params(base, overlays=[second, first]).corpus.n == 32


def test_merge_changes_neither_input():
    base, overlay = {"a": {"b": 1, "c": [1]}}, {"a": {"b": 2, "c": None}}
    assert merge_params(base, overlay) == {"a": {"b": 2}}
    assert base == {"a": {"b": 1, "c": [1]}} and overlay == {"a": {"b": 2, "c": None}}


def test_a_mistyped_params_path_is_an_error_not_the_defaults(tmp_path):
    done = _xmodel("--params", "profiles/tinny.yaml", "inputs", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stderr.count("\n") == 1 and "'profiles/tinny.yaml' does not exist" in done.stderr
    assert not (tmp_path / "data").exists()


def test_profile_command_writes_what_the_overlay_loads(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "tiny.yaml").write_text((ROOT / "profiles" / "tiny.yaml").read_text())
    done = _xmodel("-S", "corpus.n=40", "profile", "tiny", "--out", "params.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    expected = load_params(PARAMS, {"corpus.n": 40}, overlays=[ROOT / "profiles" / "tiny.yaml"])
    assert load_params(tmp_path / "params.yaml") == expected
    # a bad result is refused before the file is touched
    before = (tmp_path / "params.yaml").read_bytes()
    done = _xmodel("-S", "corpus.n=oops", "profile", "tiny", "--out", "params.yaml", cwd=tmp_path)
    assert done.returncode == 2 and "corpus.n" in done.stderr
    assert (tmp_path / "params.yaml").read_bytes() == before
