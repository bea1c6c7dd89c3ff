"""One owner each: `layers.at_layer` is the only hook on a layer's hidden state (capture,
run_captured and injection all go through it), and `distributed.is_main` the only rank-0 test."""

from __future__ import annotations

import re

import pytest
import torch

from pipeline.architecture import architecture
from pipeline.layers import at_layer, capture, run_captured
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def model(tiny_models, tmp_path_factory):
    from pipeline.models import load_model, resolve_model

    m, _ = load_model(resolve_model(str(tiny_models["llama"]), tmp_path_factory.mktemp("cache")),
                      device="cpu", dtype="float32")
    return m


def _ids(model):
    return torch.arange(3, 10).unsqueeze(0) % model.config.vocab_size


@torch.no_grad()
def test_at_layer_reads_the_conventional_state_at_every_layer(model):
    ids = _ids(model)
    hf = model(input_ids=ids, output_hidden_states=True).hidden_states
    for layer in range(architecture(model).n_layers):  # HF's last entry is normed, ours is not
        seen = []
        with at_layer(model, layer, lambda h: seen.append(h.clone())):
            model(input_ids=ids)
        assert len(seen) == 1 and torch.equal(seen[0], hf[layer]), layer


@torch.no_grad()
@pytest.mark.parametrize("layer", [0, 2])
def test_at_layer_edits_and_later_hooks_see_the_edit(model, layer):
    ids = _ids(model)
    plain = model(input_ids=ids).logits
    with at_layer(model, layer, lambda h: h * 0.0), capture(model, [layer], stop=False) as got:
        edited = model(input_ids=ids).logits
    assert torch.count_nonzero(got[layer]) == 0  # capture, entered second, saw the edit
    assert not torch.allclose(plain, edited)
    assert torch.equal(model(input_ids=ids).logits, plain)  # the hook is gone after the block


@torch.no_grad()
def test_run_captured_stops_after_the_deepest_layer(model):
    ran = []
    handle = model.lm_head.register_forward_hook(lambda *a: ran.append("head"))
    try:
        states = run_captured(model, [0, 1], input_ids=_ids(model))
    finally:
        handle.remove()
    assert sorted(states) == [0, 1] and ran == []


def test_at_layer_refuses_a_layer_out_of_range(model):
    with pytest.raises(ValueError, match="out of range"):
        with at_layer(model, architecture(model).n_layers + 1, lambda h: None):
            pass


def _sources(*exclude: str):
    for package in ("pipeline", "stages", "store"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel not in exclude:
                yield rel, path.read_text()


def test_layer_hooks_have_one_owner():
    # attention-module hooks (KV communication) are not hidden-state hooks
    hook = re.compile(r"(?<!self_attn)(?<!attention)\.register_forward(_pre)?_hook\(")
    assert [rel for rel, text in _sources("pipeline/layers.py") if hook.search(text)] == []


def test_rank_zero_is_asked_in_one_place():
    asks = re.compile(r"get_rank\(\)|[\"']RANK[\"']|\brank == 0\b|\.is_main\b|dist_info")
    assert [rel for rel, text in _sources("pipeline/distributed.py") if asks.search(text)] == []


def test_is_main_follows_torchrun_rank_without_a_group(monkeypatch):
    from pipeline.distributed import group, is_main

    monkeypatch.setenv("RANK", "1")
    assert not is_main() and group() == (0, 1)
    monkeypatch.setenv("RANK", "0")
    assert is_main()
    monkeypatch.delenv("RANK")
    assert is_main()
