"""Every shipped params file (the embedded default and the profiles) is valid: strict keys and
types, known aligners and tasks, and the fit layers among the extracted ones."""

from pathlib import Path

import pytest

from pipeline.config import load_params

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "params.yaml", *sorted((ROOT / "profiles").glob("*.yaml"))]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_params_file_is_valid(path):
    from pipeline.aligners import get_aligner

    params = load_params(path)
    for name in params.fit.aligners:
        get_aligner(name)  # a registered name (a DVC stage cannot be named module:Class)
    for layer in params.fit.layers:  # fitting reads only stored layers
        assert layer in params.extract.layers, f"{path.name}: fit layer {layer} is not extracted"
    assert params.evaluate.tasks, f"{path.name}: no evaluate tasks"
