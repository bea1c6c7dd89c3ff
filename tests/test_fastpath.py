"""pipeline/fastpath.py on tiny real models, float32 on CPU (the CUDA tests run where a GPU is).

Fused blocks must compute HF's blocks; a packed pass must give the padded pass's states, logits,
grafts and tokens; the static decoder with a packed prefill must give the eager dynamic decoder's
tokens; gold log-likelihoods on the static decoder must equal the dynamic decoder's.
"""

from __future__ import annotations

import pytest
import torch

from pipeline import fastpath
from pipeline.generation import Decoding, generate, left_pad
from pipeline.injection import layer_states

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "A module is a file containing Python definitions.",
         "Names are bound to objects; the assignment statement binds a name.", "Import it"]


@pytest.fixture
def models(tiny_loaded):
    return tiny_loaded


@pytest.fixture
def packed_on_cpu(monkeypatch):
    """Packed passes on the CPU too (their reference attention: one SDPA per prompt)."""
    monkeypatch.setattr(fastpath, "PACKED_DEVICES", ("cuda", "cpu"))


def ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def qwen3():
    """A tiny Qwen-3 (q/k norms before rotary), random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen3", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=300)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("name", ["llama", "qwen", "qwen3"])
def test_fused_blocks_compute_hf_blocks(models, name):
    """Fused q/k/v and gate/up (with biases: qwen) give HF's logits; the projections become views
    of the fused weights (no copy), the state dict is unchanged, and another fuse() is a no-op."""
    model = qwen3() if name == "qwen3" else models[name][0]
    prompts = [[5, 9, 17, 33, 2], [7, 8], [40, 41, 42, 43, 44, 45, 46]]
    batch, mask, pos = left_pad(prompts, 0)
    keys = sorted(model.state_dict())
    with torch.no_grad():
        ref = model(input_ids=batch, attention_mask=mask, position_ids=pos).logits
        with fastpath.fast_blocks(model) as fast:
            got = model(input_ids=batch, attention_mask=mask, position_ids=pos).logits
    assert fast
    torch.testing.assert_close(got[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-5)
    block = model.model.layers[0]
    weight, _, sizes = block._xmodel_qkv
    assert block.self_attn.k_proj.weight.data_ptr() == weight[sizes[0]:].data_ptr()
    assert block.mlp.up_proj.weight.data_ptr() == block._xmodel_gate_up[0][model.config.intermediate_size:].data_ptr()
    assert sorted(model.state_dict()) == keys
    fastpath.fuse(model)
    assert block._xmodel_qkv[0] is weight


def test_fuse_declines_what_it_cannot_fuse(models):
    """A projection that is not a plain nn.Linear (a wrapper, as LoRA puts there) keeps HF's blocks."""
    import copy

    model = copy.deepcopy(models["llama"][0])

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    attn = model.model.layers[1].self_attn
    attn.v_proj = Wrapped(attn.v_proj)
    assert not fastpath.fuse(model)
    with fastpath.fast_blocks(model) as fast:
        assert not fast and "forward" not in vars(model.model.layers[0])


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_packed_states_equal_padded(models, name, packed_on_cpu):
    """A's passes packed give the padded pass's states at every real token, its last-token states
    (AC's message) and its per-token states (multi-vector AC, mapped KV)."""
    from pipeline.injection import sender_states, token_states

    model, tok = models[name]
    prompts = ids(tok, TEXTS)
    spy = []
    real_packing = fastpath.Packing

    class Spy(real_packing):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            spy.append(self.total)

    fastpath.Packing = Spy
    try:
        packed = layer_states(model, [0, 1, 2], prompts, 0, torch.device("cpu"))
        sent = sender_states(model, tok, prompts, 2, batch_size=3)
        toks = token_states(model, tok, prompts, [1, 2], batch_size=3)
    finally:
        fastpath.Packing = real_packing
    assert spy and spy[0] == sum(map(len, prompts))  # the packed pass ran, over the real tokens only
    _, mask, _ = left_pad(prompts, 0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fastpath, "PACKED", False)
        padded = layer_states(model, [0, 1, 2], prompts, 0, torch.device("cpu"))
        sent_ref = sender_states(model, tok, prompts, 2, batch_size=3)
        toks_ref = token_states(model, tok, prompts, [1, 2], batch_size=3)
    for layer in (0, 1, 2):
        torch.testing.assert_close(packed[layer][mask.bool()], padded[layer][mask.bool()], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sent.vectors, sent_ref.vectors, atol=1e-5, rtol=1e-5)
    for layer in (1, 2):
        for a, b in zip(toks.states[layer], toks_ref.states[layer]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama", "qwen"])
@pytest.mark.parametrize("sampling", ["greedy", "nucleus"])
def test_packed_prefill_decodes_as_the_dynamic_decoder(models, name, sampling, packed_on_cpu):
    """The static decoder with a packed prefill, a graft at layer 1 (plain AC) and one on the last
    three positions (multi-vector AC) gives the eager dynamic decoder's tokens and first logits."""
    from pipeline.injection import inject, inject_rows

    model, tok = models[name]
    prompts = ids(tok, TEXTS)
    d = Decoding(max_new_tokens=7, sampling=sampling, top_p=0.9, seed=2)
    g = torch.Generator().manual_seed(1)
    vectors = torch.randn(len(prompts), model.config.hidden_size, generator=g)
    messages = [torch.randn(min(3, len(p)), model.config.hidden_size, generator=g) for p in prompts]
    hooks = {"ac": lambda rows: inject(model, 1, vectors[rows], "replace"),
             "mv": lambda rows: inject_rows(model, 2, [messages[i] for i in rows], "sum")}
    for label, hook in hooks.items():
        runs = {c: generate(model, tok, prompts, d, batch_size=3, cache=c, prefill_hook=hook, keep_first_logits=True)
                for c in ("dynamic", "static")}
        assert runs["static"].tokens == runs["dynamic"].tokens, label
        torch.testing.assert_close(runs["static"].first_logits, runs["dynamic"].first_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("packed", [False, True])
def test_gold_logprob_on_the_static_decoder(models, packed, monkeypatch):
    """Gold log-likelihoods on the static decoder equal the dynamic decoder's, and scoring them
    leaves the tokens as they are without it (the teacher-forced columns are overwritten)."""
    if packed:
        monkeypatch.setattr(fastpath, "PACKED_DEVICES", ("cuda", "cpu"))
    model, tok = models["qwen"]
    prompts = ids(tok, TEXTS)
    gold = ids(tok, ["Paris", "a longer gold answer of several tokens", "x", "Berlin is", "y z"])
    d = Decoding(max_new_tokens=4)
    runs = {c: generate(model, tok, prompts, d, batch_size=3, cache=c, gold=gold) for c in ("dynamic", "static")}
    plain = generate(model, tok, prompts, d, batch_size=3, cache="static")
    assert runs["static"].extra["decoder"] == "static"
    assert runs["static"].tokens == runs["dynamic"].tokens == plain.tokens
    torch.testing.assert_close(torch.tensor(runs["static"].extra["gold_logprob"]),
                               torch.tensor(runs["dynamic"].extra["gold_logprob"]), atol=1e-4, rtol=1e-5)


def test_kv_static_decoder_scores_gold(models):
    """KV communication keeps the static decoder when gold answers are scored, with the eager one's scores."""
    from pipeline.evaluation import kv

    model, tok = models["llama"]
    pa, pb = ids(tok, TEXTS[:4]), ids(tok, TEXTS[1:])
    cache = kv.a_cache(model, tok, pa, batch_size=4)
    gold = ids(tok, ["one", "two words", "three more words", "four"])
    runs = {c: kv.kv_generate(model, tok, pb, cache, [2, 3], Decoding(max_new_tokens=3), batch_size=2, gold=gold,
                              cache_kind=c) for c in ("dynamic", "static")}
    assert runs["static"].extra["decoder"] == "static"
    assert runs["static"].tokens == runs["dynamic"].tokens
    torch.testing.assert_close(torch.tensor(runs["static"].extra["gold_logprob"]),
                               torch.tensor(runs["dynamic"].extra["gold_logprob"]), atol=1e-4, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fast_path_equals_the_eager_decoder(models, dtype):
    """On CUDA: the compiled packed blocks (float32: the per-prompt reference attention; bfloat16:
    flash's variable-length kernel) give the padded pass's states, and in float32 the graphed
    decoder with its packed prefill, fused blocks and lagged stop checks (EOS and a stop string)
    gives the eager dynamic decoder's tokens."""
    import copy

    from pipeline.injection import inject

    model, tok = models["llama"]
    model = copy.deepcopy(model).to("cuda", dtype)
    prompts = ids(tok, TEXTS)
    device = torch.device("cuda")
    _, mask, _ = left_pad(prompts, 0)
    with torch.no_grad():
        packed = layer_states(model, [1, 3], prompts, 0, device)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(fastpath, "PACKED", False)
            padded = layer_states(model, [1, 3], prompts, 0, device)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for layer in (1, 3):
        a, b = packed[layer][mask.bool().cuda()].float(), padded[layer][mask.bool().cuda()].float()
        assert float((a - b).norm() / b.norm()) < tol
    if dtype != torch.float32:
        return
    vectors = torch.randn(len(prompts), model.config.hidden_size, device=device)
    free = generate(model, tok, prompts, Decoding(max_new_tokens=40), batch_size=5, cache="dynamic")
    eos = free.tokens[0][20]
    stop = tok.decode(free.tokens[1][:18], skip_special_tokens=True).strip()[-2:]
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    try:
        for d in (Decoding(max_new_tokens=40), Decoding(max_new_tokens=40, stop_strings=(stop,))):
            eager = generate(model, tok, prompts, d, batch_size=5, cache="dynamic",
                             prefill_hook=lambda rows: inject(model, 2, vectors[rows], "replace"))
            fast = generate(model, tok, prompts, d, batch_size=5,
                            prefill_hook=lambda rows: inject(model, 2, vectors[rows], "replace"))
            assert fast.extra["decoder"] == "static+cuda-graph"
            assert fast.tokens == eager.tokens and fast.texts == eager.texts
    finally:
        model.generation_config.eos_token_id = old


@pytest.mark.parametrize("method", ["mapped_kv", "fuser"])
def test_cross_model_prefixes_on_the_static_decoder(models, method):
    """Mapped KV and the fuser (A = tiny llama, B = tiny qwen, random maps) on the static decoder
    give the eager dynamic decoder's tokens, first logits and gold log-likelihoods (multi-vector
    AC: test_packed_prefill_decodes_as_the_dynamic_decoder)."""
    from pipeline.evaluation.kv import kv_generate
    from pipeline.evaluation.mapped_kv import LayerMaps, mapped_cache
    from pipeline.fuser import Fuser, build_net, layer_sources
    from pipeline.injection import token_states

    (model_a, tok_a), (model_b, tok_b) = models["llama"], models["qwen"]
    d_a, d_b = model_a.config.hidden_size, model_b.config.hidden_size
    sources = layer_sources(model_a.config.num_hidden_layers, model_b.config.num_hidden_layers)
    states = token_states(model_a, tok_a, ids(tok_a, TEXTS), sorted(set(sources)), batch_size=2).states
    g = torch.Generator().manual_seed(3)
    if method == "mapped_kv":
        maps = LayerMaps({l: s for l, s in enumerate(sources, start=1)},
                         {l: torch.randn(d_a, d_b, generator=g) / d_a ** 0.5 for l in range(1, len(sources) + 1)},
                         {l: torch.zeros(d_b) for l in range(1, len(sources) + 1)})
        cache, layers = mapped_cache(model_b, maps, states), maps.b_layers[1:]  # one layer unshared
    else:
        net = build_net(len(sources), d_a, d_b, 4)
        with torch.no_grad():
            net["u"].normal_(0, 0.3, generator=g)
            net["v"].normal_(0, 0.5, generator=g)
            net["sd"].fill_(1.0)
        fuser = Fuser(net.requires_grad_(False), {"sources": sources, "d_a": d_a, "d_b": d_b})
        cache, layers = fuser.cache(model_b, states), fuser.b_layers
    prompts = ids(tok_b, TEXTS[::-1])
    gold = ids(tok_b, ["an answer", "b", "the third one", "d e f", "g"])
    runs = {c: kv_generate(model_b, tok_b, prompts, cache, layers, Decoding(max_new_tokens=5), batch_size=3,
                           keep_first_logits=True, gold=gold, cache_kind=c) for c in ("dynamic", "static")}
    assert runs["static"].extra["decoder"] == "static" and runs["dynamic"].extra["decoder"] == "dynamic"
    assert runs["static"].tokens == runs["dynamic"].tokens
    torch.testing.assert_close(runs["static"].first_logits, runs["dynamic"].first_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(torch.tensor(runs["static"].extra["gold_logprob"]),
                               torch.tensor(runs["dynamic"].extra["gold_logprob"]), atol=1e-4, rtol=1e-5)
