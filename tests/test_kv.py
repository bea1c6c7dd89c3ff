"""Key-value communication on tiny real models (fp32, CPU): B reading A's cache of prompt_a.

References are independent of pipeline/evaluation/kv.py: B run on the concatenated token stream
(prompt_a then prompt_b, the skyline), B alone, and HF's own attention weights (eager) on the
concatenated stream. A = B throughout except for the mismatch tests.
"""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

from pipeline.errors import UserError
from pipeline.evaluation import kv
from pipeline.generation import Decoding, generate

TEXTS_A = ["Alice is at the Louvre museum in the city of lights.", "Bob",
           "The quick brown fox jumps over the lazy dog again and again, and then rests.",
           "A module is a file containing Python definitions and statements."]
TEXTS_B = ["Where is Alice?", "Which country is Bob in, and why would he go there at all?", "Fox?",
           "Name the file."]
GREEDY = Decoding(max_new_tokens=6)
NUCLEUS = Decoding(max_new_tokens=6, sampling="nucleus", top_p=0.9, seed=3)


@pytest.fixture(scope="module")
def models(tiny_loaded):
    return tiny_loaded


def ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


@contextmanager
def attention(model, impl):
    old = model.config._attn_implementation
    model.set_attn_implementation(impl)
    try:
        yield
    finally:
        model.set_attn_implementation(old)


@pytest.mark.parametrize("name", ["llama", "qwen"])
@pytest.mark.parametrize("batch", [1, 4])
def test_all_layers_shared_is_the_concatenated_prompt(models, name, batch):
    model, tok = models[name]
    pa, pb = ids(tok, TEXTS_A), ids(tok, TEXTS_B)
    cache = kv.a_cache(model, tok, pa, batch_size=3)
    got = kv.kv_generate(model, tok, pb, cache, list(range(1, kv.cache_shape(model, "B").layers + 1)), GREEDY,
                         batch_size=batch, keep_first_logits=True)
    sky = generate(model, tok, [a + b for a, b in zip(pa, pb)], GREEDY, batch_size=batch, keep_first_logits=True)
    assert got.tokens == sky.tokens
    torch.testing.assert_close(got.first_logits, sky.first_logits, atol=1e-4, rtol=1e-4)
    assert got.extra["kv_layers"] == list(range(1, kv.cache_shape(model, "B").layers + 1))


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("batch", [1, 4])
def test_no_layer_shared_is_b_alone(models, impl, batch):
    """Prefill and every decoding step: the prefix is hidden at unshared layers (batch 1 has no
    padding, so HF hands decoding steps no mask at all and the hook builds one)."""
    model, tok = models["qwen"]
    pa, pb = ids(tok, TEXTS_A), ids(tok, TEXTS_B)
    cache = kv.a_cache(model, tok, pa)
    with attention(model, impl):
        got = kv.kv_generate(model, tok, pb, cache, [], GREEDY, batch_size=batch, keep_first_logits=True)
        alone = generate(model, tok, pb, GREEDY, batch_size=batch, keep_first_logits=True)
    assert got.tokens == alone.tokens
    torch.testing.assert_close(got.first_logits, alone.first_logits, atol=1e-4, rtol=1e-4)


def test_the_shared_layers_matter(models):
    """Sharing some layers is neither B alone nor the skyline, and which layers is not ignored."""
    model, tok = models["qwen"]
    pa, pb = ids(tok, TEXTS_A), ids(tok, TEXTS_B)
    cache = kv.a_cache(model, tok, pa)
    first = {tuple(s): kv.kv_generate(model, tok, pb, cache, s, GREEDY, keep_first_logits=True).first_logits
             for s in ([], [2], [3], [1, 2, 3, 4])}
    keys = list(first)
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            assert (first[a] - first[b]).abs().max() > 1e-3, (a, b)


@pytest.mark.parametrize("decoding", [GREEDY, NUCLEUS], ids=["greedy", "nucleus"])
def test_batched_equals_one_at_a_time(models, decoding):
    model, tok = models["llama"]
    pa, pb = ids(tok, TEXTS_A), ids(tok, TEXTS_B)
    cache = kv.a_cache(model, tok, pa, batch_size=4)
    alone = kv.a_cache(model, tok, pa, batch_size=1)
    for e, f in zip(cache.entries, alone.entries):
        torch.testing.assert_close(e, f, atol=1e-5, rtol=1e-5)
    before = [e.clone() for e in cache.entries]
    one = kv.kv_generate(model, tok, pb, cache, [2, 3], decoding, batch_size=1, keep_first_logits=True)
    many = kv.kv_generate(model, tok, pb, cache, [2, 3], decoding, batch_size=4, keep_first_logits=True)
    assert one.tokens == many.tokens
    torch.testing.assert_close(one.first_logits, many.first_logits, atol=1e-4, rtol=1e-4)
    assert all(torch.equal(e, b) for e, b in zip(cache.entries, before))  # reusable for the next layer choice


@pytest.mark.parametrize("name", ["llama", "qwen"])
@pytest.mark.parametrize("decoding", [GREEDY, NUCLEUS], ids=["greedy", "nucleus"])
def test_static_decoder_equals_the_eager_one(models, name, decoding):
    """The fast path (static cache, the one CUDA compiles and graphs; uncompiled here) gives the
    eager dynamic decoder's tokens for every sharing: all, some, none, one row and padded batches;
    and its unshared layers hold no prefix columns (their cache is B's own length)."""
    model, tok = models[name]
    pa, pb = ids(tok, TEXTS_A), ids(tok, TEXTS_B)
    cache = kv.a_cache(model, tok, pa, batch_size=4)
    n_layers = cache.shape.layers
    held: dict[int, set] = {}

    def lengths(module, args, kwargs):  # the cache length each block's attention reads in the static run
        past = kwargs.get("past_key_values", kwargs.get("cache"))
        if past is not None and hasattr(past.layers[module.layer_idx], "max_cache_len"):
            held.setdefault(module.layer_idx, set()).add(past.layers[module.layer_idx].max_cache_len)

    for layers in (list(range(1, n_layers + 1)), [2, 3], [1], []):
        for batch in (1, 4):
            eager = kv.kv_generate(model, tok, pb, cache, layers, decoding, batch_size=batch, keep_first_logits=True,
                                   cache_kind="dynamic")
            held.clear()
            handles = [blk.self_attn.register_forward_pre_hook(lengths, with_kwargs=True) for blk in model.model.layers]
            try:
                fast = kv.kv_generate(model, tok, pb, cache, layers, decoding, batch_size=batch,
                                      keep_first_logits=True, cache_kind="static")
            finally:
                for h in handles:
                    h.remove()
            assert fast.extra["decoder"] == "static" and eager.extra["decoder"] == "dynamic"
            assert fast.tokens == eager.tokens, (layers, batch)
            torch.testing.assert_close(fast.first_logits, eager.first_logits, atol=1e-4, rtol=1e-4)
            own = {min(v) for l, v in held.items() if l + 1 not in layers}
            longer = {min(v) for l, v in held.items() if l + 1 in layers}
            assert len(held) == n_layers and len(own) <= 1 and (not own or not longer or max(own) < min(longer))
            assert not longer or min(longer) - max(own or {0}) >= max(cache.lengths)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("decoding", [GREEDY, NUCLEUS], ids=["greedy", "nucleus"])
def test_graphed_kv_equals_the_eager_one(models, decoding):
    """On CUDA (float32), KV's default decoder is the compiled, captured one and gives the eager
    dynamic decoder's tokens for every layer, some and one; a second call reuses the captured decoder."""
    import copy

    model, tok = models["llama"]
    model = copy.deepcopy(model).cuda()
    pa, pb = ids(tok, TEXTS_A), ids(tok, TEXTS_B)
    cache = kv.a_cache(model, tok, pa, batch_size=4)
    for layers in (list(range(1, cache.shape.layers + 1)), [2, 3], [1]):
        eager = kv.kv_generate(model, tok, pb, cache, layers, decoding, batch_size=4, cache_kind="dynamic")
        graphed = kv.kv_generate(model, tok, pb, cache, layers, decoding, batch_size=4)
        again = kv.kv_generate(model, tok, pb, cache, layers, decoding, batch_size=4)
        assert graphed.extra["decoder"] == again.extra["decoder"] == "static+cuda-graph"
        assert graphed.tokens == eager.tokens == again.tokens, layers


def test_static_kv_needs_sdpa_attention(models):
    model, tok = models["qwen"]
    cache = kv.a_cache(model, tok, ids(tok, TEXTS_A[:1]))
    with attention(model, "eager"), pytest.raises(UserError, match="needs sdpa attention") as e:
        kv.kv_generate(model, tok, ids(tok, TEXTS_B[:1]), cache, [1], GREEDY, cache_kind="static")
    assert "\n" not in str(e.value)


def hf_importance(model, tok, pa, pb):
    """Attention mass of B's tokens on the prefix per layer, from HF's eager weights on the
    concatenated stream: mean over heads and B's tokens, then over items."""
    total = None
    with attention(model, "eager"), torch.no_grad():
        for a, b in zip(pa, pb):
            att = model(input_ids=torch.tensor([a + b]), output_attentions=True).attentions
            mass = torch.stack([w[0, :, len(a):, :len(a)].sum(-1).mean() for w in att])
            total = mass if total is None else total + mass
    return (total / len(pa)).tolist()


def test_top_m_rule(models):
    model, tok = models["qwen"]
    pa, pb = ids(tok, TEXTS_A), ids(tok, TEXTS_B)
    cache = kv.a_cache(model, tok, pa)
    cfg = kv.KvConfig(layers="top", top_m=2, prior_weight=0.0, calib_items=3)
    choice = kv.select_layers(cfg, model, tok, pb, cache, batch_size=2)
    again = kv.select_layers(cfg, model, tok, pb, cache, batch_size=3)
    assert choice.layers == again.layers and choice.scores == pytest.approx(again.scores, abs=1e-6)
    ref = hf_importance(model, tok, pa[:3], pb[:3])
    assert choice.importance == pytest.approx(ref, abs=1e-5)
    assert choice.calib_items == [0, 1, 2]
    assert choice.layers == sorted(sorted(range(1, 5), key=lambda l: (-ref[l - 1], l))[:2])
    assert model.config._attn_implementation == "sdpa"  # eager only while scoring
    # prior only: the middle blocks (mu = 2.5 of 4; a tie broken towards the shallower layer)
    assert kv.select_layers(kv.KvConfig(layers="top", top_m=1, prior_weight=1.0), model, tok, pb, cache).layers == [2]
    assert kv.select_layers(kv.KvConfig(layers="top", top_m=0.5, prior_weight=1.0), model, tok, pb, cache).layers == [2, 3]


def test_layer_lists_and_all(models):
    model, tok = models["qwen"]  # 4 blocks
    cache = kv.a_cache(model, tok, ids(tok, TEXTS_A[:1]))
    pick = lambda layers: kv.select_layers(kv.KvConfig(layers=layers), model, tok, [[1]], cache).layers  # noqa: E731
    assert pick("all") == [1, 2, 3, 4]
    assert pick([3, 1, 3]) == [1, 3]
    assert pick([0.0, 0.5, 1.0]) == [1, 2, 4]
    assert kv.KvConfig(layers="top", top_m=0.3).name == "kv_top0.3"
    assert kv.KvConfig(layers=[2, 0.5]).name == "kv_L2_0.5"


@pytest.mark.parametrize("kwargs, words", [
    (dict(layers="some"), "'some' is not one of"),
    (dict(layers=[]), "shares nothing"),
    (dict(layers=["2"]), "'2' is neither"),
    (dict(layers=7), "must be all, top"),
    (dict(top_m=0), "top_m = 0"),
    (dict(top_m=1.5), "top_m = 1.5"),
    (dict(prior_weight=2.0), "prior_weight = 2.0"),
    (dict(calib_items=0), "calib_items = 0"),
])
def test_bad_config_is_one_line(kwargs, words):
    with pytest.raises(UserError, match=words) as e:
        kv.KvConfig(**kwargs)
    assert "\n" not in str(e.value)


def test_bad_layers_for_the_model_are_one_line(models):
    model, tok = models["qwen"]
    cache = kv.a_cache(model, tok, ids(tok, TEXTS_A[:1]))
    for cfg, words in [(kv.KvConfig(layers=[0]), "layer 0 is the embedding"), (kv.KvConfig(layers=[5]), "out of range"),
                       (kv.KvConfig(layers="top", top_m=5), "exceeds the 4 layers")]:
        with pytest.raises(UserError, match=words) as e:
            kv.select_layers(cfg, model, tok, [[1]], cache)
        assert "\n" not in str(e.value)


def test_pair_of_other_architectures_is_one_line(models):
    (ma, ta), (mb, tb) = models["llama"], models["qwen"]
    cache = kv.a_cache(ma, ta, ids(ta, TEXTS_A[:2]))
    with pytest.raises(UserError, match=r"one architecture and cache shape.*differ in model_type, layers, head_dim") as e:
        kv.kv_generate(mb, tb, ids(tb, TEXTS_B[:2]), cache, [1], GREEDY)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="differ in"):
        kv.select_layers(kv.KvConfig(layers="top"), mb, tb, ids(tb, TEXTS_B[:2]), cache)


def test_unsupported_attention_is_one_line():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=32))
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UserError, match="uses attention 'flex_attention'") as e:
        kv.check_attention(model)
    assert "\n" not in str(e.value)


def test_compute_accounting(models):
    model, tok = models["qwen"]  # 4 heads of width 12
    pa, pb = ids(tok, TEXTS_A[:2]), ids(tok, TEXTS_B[:2])
    cache = kv.a_cache(model, tok, pa)
    gen = kv.kv_generate(model, tok, pb, cache, [1, 3], GREEDY)
    work = kv.kv_compute(cache, gen, [1, 3], model, model)
    per_block = 2.0 * sum(p.numel() for p in model.model.layers[0].parameters())
    assert work.a_tokens == len(pa[0]) + len(pa[1]) and work.a_blocks == 3
    assert work.a_flops == per_block * 3 * work.a_tokens
    pairs = sum((len(b) + n) * len(a) for a, b, n in zip(pa, pb, gen.new_tokens))
    assert work.b_extra_attention_flops == 4.0 * 4 * 12 * pairs * 2
    assert work.cache_bytes_all == sum(4 * 4 * 2 * 2 * len(a) * 12 for a in pa)  # fp32, 4 layers, K and V, 2 heads
    assert work.cache_bytes == work.cache_bytes_all // 2


@pytest.mark.parametrize("kind, words", [
    ("sliding", "sliding window; only full attention is supported"),
    ("mistral", "sliding window; only full attention is supported"),  # a window on every layer, no layer_types
    ("absolute", "model type 'gpt2' .* is not a known architecture"),
])
def test_models_this_method_cannot_place_are_one_line(kind, words):
    from transformers import AutoConfig, AutoModelForCausalLM

    if kind == "sliding":
        config = AutoConfig.for_model("qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                                      use_sliding_window=True, sliding_window=8, max_window_layers=1)
    elif kind == "mistral":
        config = AutoConfig.for_model("mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, vocab_size=64, sliding_window=8)
    else:
        config = AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=64)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UserError, match=words) as e:
        kv.cache_shape(model, "A")
    assert "\n" not in str(e.value)
