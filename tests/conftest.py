"""Tiny real models for tests: configs of real architectures, tokenizers trained here, saved and
reloaded through the same loading code users hit. Nothing touches the network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("XMODEL_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """{"llama": dir, "qwen": dir}: two tiny models of different width, depth and tokenizer."""
    from pipeline.synthetic import save_tiny_model

    root = tmp_path_factory.mktemp("tiny_models")
    return {"llama": save_tiny_model("tiny-llama", root / "llama"), "qwen": save_tiny_model("tiny-qwen", root / "qwen")}


@pytest.fixture(scope="session")
def tiny_pair(tiny_models, tmp_path_factory):
    """pipeline.evaluation.pair.Pair of the two tiny models (A: llama, 64 wide; B: qwen, 48 wide), fp32 CPU."""
    from pipeline.evaluation.pair import Pair
    from pipeline.models import load_model, resolve_model

    cache = tmp_path_factory.mktemp("pair_cache")
    (ma, ta), (mb, tb) = (load_model(resolve_model(str(tiny_models[n]), cache), device="cpu", dtype="float32")
                          for n in ("llama", "qwen"))
    return Pair(ma, ta, mb, tb, "tiny-llama", "tiny-qwen")


@pytest.fixture(scope="session")
def tiny_loaded(tiny_models, tmp_path_factory) -> dict[str, tuple]:
    """{"llama": (model, tokenizer), "qwen": ...}: the tiny models loaded (fp32, CPU) through the
    same code users hit, once per session. Tests that change a model's settings restore them."""
    from pipeline.models import load_model, resolve_model

    cache = tmp_path_factory.mktemp("cache")
    return {name: load_model(resolve_model(str(path), cache), device="cpu", dtype="float32")
            for name, path in tiny_models.items()}
