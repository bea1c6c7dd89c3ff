"""States → KV prefix (pipeline/evaluation/statekv.py) on tiny real models, fp32 CPU.

The reference is B's own cache: B's residual states entering each block, turned into keys and
values by statekv, must be the keys and values B's attention stored for the same prompt
(kv.a_cache, HF's own forward), and a prefix built from them must make B generate what kv_all does.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pipeline.evaluation import kv, statekv
from pipeline.generation import Decoding

TEXTS = ["Alice is at the Louvre museum in the city of lights.", "Bob",
         "A module is a file containing Python definitions and statements."]
QUESTIONS = ["Where is Alice?", "Which country is Bob in?", "Name the file."]


def residuals(model, prompts):
    """Per item, {KV layer l: B's residual stream entering block l} from HF's hidden states
    (hidden_states[l - 1] is the output of block l - 1, before any final norm, for l <= L)."""
    out = []
    with torch.no_grad():
        for p in prompts:
            hs = model(input_ids=torch.tensor([p]), output_hidden_states=True).hidden_states
            out.append({l: hs[l - 1][0] for l in range(1, kv.cache_shape(model, "B").layers + 1)})
    return out


def qwen3_tiny():
    """A tiny Qwen3 (it has k_norm, which the other tiny models lack), random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=96,
                                  max_position_embeddings=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "k_norm" in name:
                p.uniform_(0.5, 1.5)  # not ones, so a k_norm applied or skipped differs visibly
    return model


@pytest.mark.parametrize("name", ["llama", "qwen", "qwen3"])
def test_own_states_give_own_cache(tiny_loaded, name):
    if name == "qwen3":
        model, tok = qwen3_tiny(), SimpleNamespace(pad_token_id=0)
        prompts = [[(7 * i + 3 * j) % 90 + 1 for j in range(n)] for i, n in enumerate([11, 1, 6])]
    else:
        model, tok = tiny_loaded[name]
        prompts = [tok(t)["input_ids"] for t in TEXTS]
    want = kv.a_cache(model, tok, prompts, batch_size=3)
    states = residuals(model, prompts)
    layers = sorted(states[0])
    with torch.no_grad():
        got = statekv.states_cache(model, {l: [s[l] for s in states] for l in layers})
    assert got.shape == want.shape and got.lengths == want.lengths
    for g, w in zip(got.entries, want.entries):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    # one block, one batch: the same numbers through block_kv directly
    keys, values = statekv.block_kv(model, 2, states[0][2][None])
    torch.testing.assert_close(keys[0], want.entries[0][1, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values[0], want.entries[0][1, 1], atol=1e-5, rtol=1e-5)


def test_prefix_from_own_states_generates_as_kv_all(tiny_loaded):
    model, tok = tiny_loaded["qwen"]
    pa, pb = [tok(t)["input_ids"] for t in TEXTS], [tok(t)["input_ids"] for t in QUESTIONS]
    states = residuals(model, pa)
    everything = list(range(1, 5))
    with torch.no_grad():
        built = statekv.states_cache(model, {l: [s[l] for s in states] for l in everything})
    decoding = Decoding(max_new_tokens=6)
    got = kv.kv_generate(model, tok, pb, built, everything, decoding, batch_size=2, keep_first_logits=True)
    ref = kv.kv_generate(model, tok, pb, kv.a_cache(model, tok, pa), everything, decoding, batch_size=2,
                         keep_first_logits=True)
    assert got.tokens == ref.tokens
    torch.testing.assert_close(got.first_logits, ref.first_logits, atol=1e-4, rtol=1e-4)


def test_some_layers_only_and_gradients(tiny_loaded):
    """Missing layers are zeros (kv_generate hides them); gradients reach the states, none the weights'
    values change."""
    model, tok = tiny_loaded["llama"]
    states = residuals(model, [tok(t)["input_ids"] for t in TEXTS[:2]])
    h = [s[2].clone().requires_grad_(True) for s in states]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cache = statekv.states_cache(model, {2: h})
    assert cache.entries[0].shape == (3, 2, 2, h[0].shape[0], 16)
    assert not cache.entries[0][[0, 2]].any() and cache.entries[0][1].abs().sum() > 0
    sum(e.square().sum() for e in cache.entries).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in h)
    model.zero_grad(set_to_none=True)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_ragged_layers_are_refused(tiny_loaded):
    model, _ = tiny_loaded["qwen"]
    with pytest.raises(ValueError, match="same tokens"):
        statekv.states_cache(model, {1: [torch.zeros(3, 48)], 2: [torch.zeros(4, 48)]})
    with pytest.raises(ValueError, match="out of range 1..4"):
        statekv.states_cache(model, {5: [torch.zeros(3, 48)]})
