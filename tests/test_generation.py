"""The two decoders of pipeline/generation.py on tiny real models, float32 on CPU.

The static decoder (pre-allocated cache, 4-D mask, the path CUDA graphs replay) must give the
dynamic decoder's tokens; periodic stop checks must give per-step checks' tokens; a prefix cache
plus a suffix must give the whole prompt's tokens; a session hook sees prefill and every step.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.generation import Decoding, generate
from pipeline.injection import inject

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "A module is a file containing Python definitions.",
         "Names are bound to objects; the assignment statement binds a name.", "Import it"]


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    from pipeline.models import load_model, resolve_model

    cache = tmp_path_factory.mktemp("cache")
    return {name: load_model(resolve_model(str(path), cache), device="cpu", dtype="float32")
            for name, path in tiny_models.items()}


def ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("name", ["llama", "qwen"])
@pytest.mark.parametrize("sampling", ["greedy", "nucleus"])
def test_static_decoder_equals_dynamic(models, name, sampling):
    model, tok = models[name]
    prompts = ids(tok, TEXTS)
    d = Decoding(max_new_tokens=7, sampling=sampling, top_p=0.9, seed=2)
    vectors = torch.randn(len(prompts), model.config.hidden_size)

    def hook(rows):
        return inject(model, 1, vectors[rows], "replace")

    runs = {c: generate(model, tok, prompts, d, batch_size=3, cache=c, prefill_hook=hook, keep_first_logits=True)
            for c in ("dynamic", "static")}
    assert runs["static"].extra["decoder"] == "static" and runs["dynamic"].extra["decoder"] == "dynamic"
    assert runs["static"].tokens == runs["dynamic"].tokens
    assert torch.allclose(runs["static"].first_logits, runs["dynamic"].first_logits, atol=1e-4)
    single = generate(model, tok, prompts, d, batch_size=1, cache="static", prefill_hook=hook)
    assert single.tokens == runs["static"].tokens


def _with_eos(model, eos):
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = eos
    return old


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_periodic_stop_checks_give_the_per_step_tokens(models, cache):
    """EOS and stop strings are read back every N steps; rows that stopped in between are cut
    where they stopped, so the result equals checking after every token."""
    model, tok = models["llama"]
    prompts = ids(tok, TEXTS)
    free = generate(model, tok, prompts, Decoding(max_new_tokens=12), batch_size=5, cache=cache)
    eos = free.tokens[0][3]  # a token item 0 says at step 3: now it ends item 0 there
    stop = tok.decode(free.tokens[1][:5], skip_special_tokens=True).strip()[-2:]  # text item 1 reaches by step 5
    d = Decoding(max_new_tokens=12, stop_strings=(stop,))
    old = _with_eos(model, eos)
    try:
        every = generate(model, tok, prompts, d, batch_size=5, cache=cache, check_every=1)
        periodic = generate(model, tok, prompts, d, batch_size=5, cache=cache, check_every=5)
    finally:
        model.generation_config.eos_token_id = old
    assert periodic.tokens == every.tokens and periodic.texts == every.texts
    assert every.tokens[0] == free.tokens[0][:free.tokens[0].index(eos)]
    assert 0 < len(every.tokens[1]) <= 5 and stop in tok.decode(every.tokens[1], skip_special_tokens=True)


def test_prefix_cache_then_suffix_equals_the_whole_prompt(models):
    from transformers import DynamicCache

    model, tok = models["llama"]
    head = ids(tok, ["Context: a module is a file."])[0]
    tails = [ids(tok, [t])[0][1:] for t in TEXTS[:4]]  # no second BOS
    d = Decoding(max_new_tokens=6)

    def prefix(rows):
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(input_ids=torch.tensor([head] * len(rows)), cache=cache, use_cache=True)
        return cache, torch.ones(len(rows), len(head), dtype=torch.long), len(head)

    split = generate(model, tok, tails, d, batch_size=4, prefix=prefix, keep_first_logits=True)
    whole = generate(model, tok, [head + t for t in tails], d, batch_size=4, keep_first_logits=True)
    assert split.tokens == whole.tokens
    assert torch.allclose(split.first_logits, whole.first_logits, atol=1e-4)
    assert split.extra["decoder"] == "dynamic"


def test_session_hook_is_entered_around_prefill_and_every_step(models):
    from contextlib import contextmanager

    model, tok = models["qwen"]
    prompts = ids(tok, TEXTS[:4])
    calls: list[tuple[list[int], int]] = []

    @contextmanager
    def session(rows):
        seen = [0]
        handle = model.register_forward_hook(lambda *a: seen.__setitem__(0, seen[0] + 1))
        try:
            yield
        finally:
            handle.remove()
            calls.append((list(rows), seen[0]))

    old = _with_eos(model, None)  # random weights may say EOS early: decode all 5 steps
    try:
        generate(model, tok, prompts, Decoding(max_new_tokens=5), batch_size=2, session_hook=session)
    finally:
        model.generation_config.eos_token_id = old
    assert sorted(r for rows, _ in calls for r in rows) == [0, 1, 2, 3]
    assert [n for _, n in calls] == [5, 5]  # the prefill + 4 decoding steps, each inside the hook


def test_bad_cache_choice_is_one_clear_error(models):
    model, tok = models["llama"]
    with pytest.raises(UserError, match="cache 'paged'"):
        generate(model, tok, ids(tok, TEXTS[:1]), Decoding(max_new_tokens=2), cache="paged")
    with pytest.raises(ValueError, match="cache='dynamic'"):
        generate(model, tok, ids(tok, TEXTS[:1]), Decoding(max_new_tokens=2), cache="static",
                 session_hook=lambda rows: None)


def test_packed_gqa_attention_equals_hf_sdpa(models):
    """The one-token attention the CUDA graph captures: the same as HF's sdpa (4 query heads on 2 KV heads)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from pipeline.attention import packed_gqa_attention

    model, _ = models["qwen"]
    module = model.model.layers[0].self_attn
    assert module.num_key_value_groups == 2
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, h, n, 12, generator=g) for h, n in ((4, 1), (2, 9), (2, 9)))
    mask = torch.rand(3, 1, 1, 9, generator=g) > 0.3
    mask[:, ..., -1] = True
    ours, _ = packed_gqa_attention(module, q, k, v, mask, scaling=0.3)
    ref, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert ours.shape == ref.shape == (3, 1, 4, 12)
    assert torch.allclose(ours, ref, atol=1e-6)
    prefill, _ = packed_gqa_attention(module, torch.randn(3, 4, 9, 12, generator=g), k, v, None, scaling=0.3)
    assert prefill.shape == (3, 9, 4, 12)  # longer queries: HF's own path


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("sampling", ["greedy", "nucleus"])
def test_cuda_graph_decoder_equals_eager_decoder(models, sampling):
    """On CUDA (float32), the compiled and captured step gives the eager dynamic decoder's tokens,
    and a second call reuses the captured decoder."""
    import copy

    model, tok = models["llama"]
    model = copy.deepcopy(model).cuda()
    prompts = ids(tok, TEXTS)
    d = Decoding(max_new_tokens=12, sampling=sampling, top_p=0.9, seed=4)
    eager = generate(model, tok, prompts, d, batch_size=5, cache="dynamic")
    graphed = generate(model, tok, prompts, d, batch_size=5)
    again = generate(model, tok, prompts, d, batch_size=5)
    assert graphed.extra["decoder"] == again.extra["decoder"] == "static+cuda-graph"
    assert graphed.tokens == eager.tokens == again.tokens
