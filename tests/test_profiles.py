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


# --- bad params are one line, before anything runs or is written ----------------------------------

def _one_line(capsys, *args: str) -> str:
    from tests.helpers import run_cli

    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, (code, err)
    return err


@pytest.mark.parametrize("override, named", [
    ("fit.temperature=.inf", "fit.temperature = inf"), ("fit.temperature=.nan", "fit.temperature = nan"),
    ("fit.temperature=0.0", "fit.temperature = 0.0 must be in (0, 100]"),
    ("fit.temperature=1000.0", "fit.temperature = 1000.0 must be in (0, 100]"),
    ("fit.heldout_frac=1.0", "fit.heldout_frac = 1.0 must be in (0, 1)"),
    ("fit.layers=[0.5, .nan]", "fit.layers[1] = nan"), ("evaluate.layer_b=-.inf", "relative depth -inf in evaluate.layer_b"),
    ("evaluate.layer_a=1.5", "relative depth 1.5 in evaluate.layer_a"),
    ("evaluate.squad.top_p=.nan", "evaluate.squad.top_p = nan"),
    ("evaluate.gsm8k.temperature=.inf", "evaluate.gsm8k.temperature = inf"),
    ("evaluate.sweep.layers_a=[2.0]", "relative depth 2.0 in evaluate.sweep.layers_a"),
    ("fit.aligners.linear.lr=.inf", "fit.aligners.linear.lr = inf"),
    ("fit.aligners.linear.heldout_frac=.nan", "fit.aligners.linear.heldout_frac = nan"),
])
def test_every_float_param_refuses_nan_inf_and_values_outside_its_range(capsys, override, named):
    assert named in _one_line(capsys, "-S", override, "profile")


@pytest.mark.parametrize("override, named", [
    ("fit.aligners.linear.lr=1.0e+38", "lr = 1e+38 must be in (0, 10]"),  # Adam's step overflows float32
    ("fit.aligners.lora.weight_decay=1.0e+30", "weight_decay = 1e+30 must be in [0, 10]"),
    ("fit.aligners.linear.temperature=1.0e+9", "temperature = 1000000000.0 must be in (0, 100]"),
    ("fit.aligners.linear.symmetric=1", "symmetric = 1: expected bool"),
    ("fit.aligners.linear.epochs=true", "epochs = True: expected int"),
    ("fit.aligners.linear.lr=1e-4", "YAML reads 1e-4 as text"),  # YAML 1.1: no dot, no number
    ("fit.aligners.lroa={}", "unknown aligner 'lroa'"),
])
def test_aligner_entries_training_cannot_use_are_refused_when_params_are_read(capsys, override, named):
    """`xmodel profile` and the inputs stage (the first of every repro) check fit.aligners fully, so a
    typo or an unusable value is one line there, not a traceback or a refusal mid-repro."""
    assert named in _one_line(capsys, "-S", override, "profile")


def test_fitting_with_an_unusable_learning_rate_is_one_line(capsys):
    assert "lr = 1e+38 must be in (0, 10]" in _one_line(capsys, "-S", "fit.aligners.linear.lr=1.0e+38", "fit", "linear")


def test_profile_validates_fully_and_overwrites_only_a_params_file(tmp_path):
    (tmp_path / "params.yaml").write_text(PARAMS.read_text())
    (tmp_path / "dvc.yaml").write_text((ROOT / "dvc.yaml").read_text())
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for args in (["-S", "fit.aligners.linear.lr=1e-4"], ["-S", "fit.aligners.lroa={}"]):  # a string lr, a typo
        done = _xmodel(*args, "profile", "--out", "params.yaml", cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    done = _xmodel("-S", "corpus.n=40", "profile", "--out", "dvc.yaml", cwd=tmp_path)
    assert done.returncode == 2 and "dvc.yaml exists and is not a params file" in done.stderr, done.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # a params file is replaced; another file only with --force
    assert _xmodel("-S", "corpus.n=40", "profile", "--out", "params.yaml", cwd=tmp_path).returncode == 0
    assert load_params(tmp_path / "params.yaml").corpus.n == 40
    assert _xmodel("profile", "--out", "dvc.yaml", "--force", cwd=tmp_path).returncode == 0
    assert yaml.safe_load((tmp_path / "dvc.yaml").read_text()) == yaml.safe_load((tmp_path / "params.yaml").read_text())


def test_a_folder_without_params_yaml_runs_nothing(tmp_path):
    """The built-in defaults name real models: from the wrong folder a stage is refused, not run on them."""
    for command in (["inputs"], ["prepare", "--model", "a"], ["extract", "--model", "a"]):
        done = _xmodel(*command, cwd=tmp_path)
        assert done.returncode == 2 and "no params.yaml in" in done.stderr and done.stderr.count("\n") == 1, done.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, named", [
    (["-S", "corpus.n.x=1", "profile"], "corpus.n is 512, not a section"),
    (["fit", ".foo:Bar"], "'.foo:Bar' is not an absolute import path"),
    (["fit", ":Bar"], "':Bar' is not an absolute import path"),
])
def test_malformed_keys_and_names_are_one_line(capsys, args, named):
    assert named in _one_line(capsys, *args)
