"""Activation communication on tiny real models: exactly what changes, when, and where.

A = tiny Llama (64 wide, 3 blocks, BOS), B = tiny Qwen2 (48 wide, 4 blocks, no BOS), different
tokenizers. The references here are independent of pipeline/injection.py: HF output_hidden_states,
HF generate from edited input embeddings, and a cache-free decoder that reruns the whole sequence
every step with the edit pinned to the prompt's last position.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch

from pipeline.architecture import architecture
from pipeline.errors import UserError
from pipeline.generation import Decoding, generate
from pipeline.injection import (Graft, combine, communicate, inject, map_vectors, prefill, sender_states)
from pipeline.layers import capture, run_captured

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Hello", "A module is a file containing Python definitions.",
         "Names are bound to objects; the assignment statement binds a name."]


@pytest.fixture(scope="module")
def models(tiny_models, tmp_path_factory):
    from pipeline.models import load_model, resolve_model

    cache = tmp_path_factory.mktemp("cache")
    out = {}
    for name, path in tiny_models.items():
        out[name] = load_model(resolve_model(str(path), cache), device="cpu", dtype="float32")
    return out


@pytest.fixture(scope="module")
def aligner(models):
    """A fitted Procrustes map from A's width (64) to B's (48), on random rows."""
    from pipeline.aligners.registry import get_aligner

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 64)).astype(np.float32)
    y = x @ rng.normal(size=(64, 48)).astype(np.float32) / 8
    return get_aligner("procrustes")().fit(x, y)


def ids(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


def hf_states(model, prompt):
    """HF's hidden_states for one unpadded prompt; index L is replaced by the pre-norm output."""
    with torch.no_grad():
        hs = model(input_ids=torch.tensor([prompt]), output_hidden_states=True).hidden_states
    pre_norm = run_captured(model, [architecture(model).n_layers], input_ids=torch.tensor([prompt]))[architecture(model).n_layers]
    return [h[0] for h in hs[:-1]] + [pre_norm[0]]


def all_positions(model, tok, prompts, layers, **graft):
    """States at every position after `layers`, for a left-padded batch, optionally with a graft."""
    from pipeline.generation import left_pad

    x, mask, pos = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        ctx = inject(model, **graft) if graft else _null()
        with ctx, capture(model, layers, stop=False) as got:
            model(input_ids=x, attention_mask=mask, position_ids=pos, use_cache=False)
    return {l: got[l].clone() for l in layers}, mask


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


# --- where the graft lands ---------------------------------------------------------------------------

@pytest.mark.parametrize("j", [0, 2, 4])
def test_replace_sets_exactly_the_mapped_vector_and_nothing_else(models, aligner, j):
    (ma, ta), (mb, tb) = models["llama"], models["qwen"]
    k = 2
    pa, pb = ids(ta, TEXTS), ids(tb, TEXTS[::-1])
    sent = sender_states(ma, ta, pa, k, batch_size=3)
    v = map_vectors(sent.vectors, aligner, 48)
    layers = sorted({j, min(j + 1, 4), 4} | ({j - 1} if j else set()))
    plain, mask = all_positions(mb, tb, pb, layers)
    grafted, _ = all_positions(mb, tb, pb, layers, layer=j, vectors=v, mode="replace")
    assert torch.equal(grafted[j][:, -1], v)  # exactly the mapped A vector
    for l in layers:  # every other position at every layer is bit-identical to B's plain run
        assert torch.equal(grafted[l][:, :-1][mask[:, :-1].bool()], plain[l][:, :-1][mask[:, :-1].bool()])
    if j >= 1:  # the edit is after block j, not before it: layer j-1 is untouched at the last token too
        assert torch.equal(grafted[j - 1], plain[j - 1])
    if j < 4:  # and it propagates into the later blocks
        assert not torch.allclose(grafted[4][:, -1], plain[4][:, -1])


def test_sender_is_a_partial_forward_at_layer_k(models):
    ma, ta = models["llama"]
    pa = ids(ta, TEXTS)
    seen = []
    handles = [b.register_forward_hook(lambda m, a, o, i=i: seen.append(i)) for i, b in enumerate(architecture(ma).layers)]
    head = ma.get_output_embeddings().register_forward_hook(lambda m, a, o: seen.append("head"))
    try:
        sent = sender_states(ma, ta, pa, 2, batch_size=4)
    finally:
        for h in handles + [head]:
            h.remove()
    assert seen == [0, 1]  # blocks 1 and 2 ran (indices 0, 1); block 3 and the LM head never did
    assert sent.tokens == sum(len(p) for p in pa)
    for i, p in enumerate(pa):  # left padding: the last token is each prompt's own last token
        assert torch.allclose(sent.vectors[i], hf_states(ma, p)[2][-1], atol=1e-5)


def test_layer_convention_is_output_of_block_j(models):
    """j = 0 is the embedding output, j = l the output of block l (HF hidden_states[l]), j = L pre-norm."""
    mb, tb = models["qwen"]
    prompt = ids(tb, TEXTS[:1])
    ref = hf_states(mb, prompt[0])
    for j in range(architecture(mb).n_layers + 1):
        rec = Graft()
        v = torch.zeros(1, 48)
        with inject(mb, j, v, "sum", rec):
            mb(input_ids=torch.tensor(prompt))
        assert rec.calls == 1
        assert torch.allclose(rec.before[0], ref[j][-1], atol=1e-5), j
    with pytest.raises(UserError, match="out of range"):
        with inject(mb, 5, torch.zeros(1, 48), "replace"):
            pass


# --- sum, mean, and widths ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_sum_and_mean_arithmetic(models, aligner, mode):
    (ma, ta), (mb, tb) = models["llama"], models["qwen"]
    pb = ids(tb, TEXTS)
    v = map_vectors(sender_states(ma, ta, ids(ta, TEXTS), 3).vectors, aligner, 48)
    plain = prefill(mb, tb, pb, layers=[2])["states"][2]
    got = prefill(mb, tb, pb, layers=[2], inject_layer=2, vectors=v, mode=mode)["states"][2]
    want = plain + v if mode == "sum" else (plain + v) / 2
    assert torch.allclose(got, want, atol=1e-6)


def test_width_rule_without_aligner_uses_last_min_coordinates():
    a, b = torch.arange(1.0, 5.0)[None], torch.full((1, 6), 10.0)  # d_A = 4 < d_B = 6
    assert combine(a, b, "replace").tolist() == [[10, 10, 1, 2, 3, 4]]
    assert combine(a, b, "sum").tolist() == [[10, 10, 11, 12, 13, 14]]
    assert combine(a, b, "mean").tolist() == [[10, 10, 5.5, 6, 6.5, 7]]
    a, b = torch.arange(1.0, 7.0)[None], torch.zeros(1, 4)  # d_A = 6 > d_B = 4: A's last 4 coordinates
    assert combine(a, b, "replace").tolist() == [[3, 4, 5, 6]]
    with pytest.raises(UserError, match="not one of"):
        combine(a, b, "max")


def test_cross_width_graft_without_aligner(models):
    (ma, ta), (mb, tb) = models["llama"], models["qwen"]
    a = sender_states(ma, ta, ids(ta, TEXTS), 1).vectors  # 64 wide, B is 48
    plain = prefill(mb, tb, ids(tb, TEXTS), layers=[1])["states"][1]
    got = prefill(mb, tb, ids(tb, TEXTS), layers=[1], inject_layer=1, vectors=a, mode="replace")["states"][1]
    assert torch.equal(got, a[:, -48:])
    (mq, tq) = models["qwen"]  # and 48 → 64: only B's last 48 coordinates change
    a = sender_states(mq, tq, ids(tq, TEXTS), 1).vectors
    plain = prefill(ma, ta, ids(ta, TEXTS), layers=[2])["states"][2]
    got = prefill(ma, ta, ids(ta, TEXTS), layers=[2], inject_layer=2, vectors=a, mode="sum")["states"][2]
    assert torch.equal(got[:, :16], plain[:, :16])
    assert torch.allclose(got[:, 16:], plain[:, 16:] + a, atol=1e-6)


def test_aligner_width_mismatch_is_one_clear_error(models, aligner):
    with pytest.raises(UserError, match="source width|A's states have width"):
        map_vectors(torch.zeros(2, 48), aligner, 48)
    with pytest.raises(UserError, match="model B has width"):
        map_vectors(torch.zeros(2, 64), aligner, 64)


# --- decoding: the KV cache carries the change; nothing else is touched --------------------------------

def recompute_decode(model, prompt, j, vector, mode, steps):
    """Greedy decoding without a KV cache: every step reruns the whole sequence, the edit pinned to
    the prompt's last position (so new tokens are never edited), written here independently."""
    p = len(prompt)
    blocks = architecture(model).layers

    def edit(h):
        h = h.clone()
        h[0, p - 1] = combine(vector, h[0, p - 1], mode)
        return h

    if j == 0:
        handle = blocks[0].register_forward_pre_hook(lambda m, a: (edit(a[0]), *a[1:]))
    else:
        handle = blocks[j - 1].register_forward_hook(lambda m, a, o: edit(o[0] if isinstance(o, tuple) else o))
    seq, first = list(prompt), None
    try:
        with torch.no_grad():
            for _ in range(steps):
                logits = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
                first = logits if first is None else first
                seq.append(int(logits.argmax()))
    finally:
        handle.remove()
    return seq[p:], first


def _agrees(tokens, ref, eos):
    """Our tokens stop at EOS; the reference keeps going."""
    return tokens == ref[:len(tokens)] and (len(tokens) == len(ref) or ref[len(tokens)] in eos)


@pytest.mark.parametrize("j,mode", [(0, "replace"), (2, "mean"), (4, "replace")])
def test_decoding_matches_a_cache_free_recompute(models, aligner, j, mode):
    (ma, ta), (mb, tb) = models["llama"], models["qwen"]
    pb = ids(tb, TEXTS)
    v = map_vectors(sender_states(ma, ta, ids(ta, TEXTS), 2).vectors, aligner, 48)
    records: list[Graft] = []
    gen = communicate(mb, tb, pb, j, v, mode, Decoding(max_new_tokens=6), batch_size=4, keep_first_logits=True,
                      records=records)
    assert [r.calls for r in records] == [1]  # edited once: the prefill; never a decoding step
    for i, p in enumerate(pb):
        ref, first = recompute_decode(mb, p, j, v[i], mode, 6)
        assert _agrees(gen.tokens[i], ref, {tb.eos_token_id}), i
        assert torch.allclose(gen.first_logits[i], first, atol=1e-4)


def test_j0_graft_equals_hf_generate_from_edited_embeddings(models, aligner):
    """At j = 0 the graft is an edit of the input embeddings: HF's own generate is a reference."""
    (ma, ta), (mb, tb) = models["llama"], models["qwen"]
    pb = ids(tb, TEXTS[:2])
    v = map_vectors(sender_states(ma, ta, ids(ta, TEXTS[:2]), 3).vectors, aligner, 48)
    gen = communicate(mb, tb, pb, 0, v, "sum", Decoding(max_new_tokens=5), batch_size=2)
    for i, p in enumerate(pb):
        with torch.no_grad():
            emb = mb.get_input_embeddings()(torch.tensor([p]))
            emb[0, -1] = emb[0, -1] + v[i]
            out = mb.generate(inputs_embeds=emb, attention_mask=torch.ones(1, len(p), dtype=torch.long),
                              max_new_tokens=5, do_sample=False, pad_token_id=tb.pad_token_id)
        assert _agrees(gen.tokens[i], out[0].tolist(), {tb.eos_token_id}), i


# --- batching -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sampling", ["greedy", "nucleus"])
def test_batched_equals_one_at_a_time(models, aligner, sampling):
    (ma, ta), (mb, tb) = models["llama"], models["qwen"]
    decoding = Decoding(max_new_tokens=6, sampling=sampling, top_p=0.9, seed=3)
    pa, pb = ids(ta, TEXTS), ids(tb, TEXTS[::-1])
    batched_a = sender_states(ma, ta, pa, 2, batch_size=4).vectors
    single_a = sender_states(ma, ta, pa, 2, batch_size=1).vectors
    assert torch.allclose(batched_a, single_a, atol=1e-5)
    v = map_vectors(batched_a, aligner, 48)
    batched = communicate(mb, tb, pb, 3, v, "replace", decoding, batch_size=4, keep_first_logits=True)
    single = communicate(mb, tb, pb, 3, v, "replace", decoding, batch_size=1, keep_first_logits=True)
    assert batched.tokens == single.tokens
    assert torch.allclose(batched.first_logits, single.first_logits, atol=1e-4)
    plain_b = generate(mb, tb, pb, decoding, batch_size=4)
    plain_s = generate(mb, tb, pb, decoding, batch_size=1)
    assert plain_b.tokens == plain_s.tokens
    assert batched.tokens != plain_b.tokens  # the graft changed what B says


def test_nucleus_sampling_is_seeded(models):
    mb, tb = models["qwen"]
    pb = ids(tb, TEXTS)
    d = Decoding(max_new_tokens=8, sampling="nucleus", top_p=0.9, seed=0)
    a, b = generate(mb, tb, pb, d, batch_size=2), generate(mb, tb, pb, d, batch_size=2)
    c = generate(mb, tb, pb, Decoding(max_new_tokens=8, sampling="nucleus", top_p=0.9, seed=1), batch_size=2)
    assert a.tokens == b.tokens and a.tokens != c.tokens


def test_nucleus_filter_keeps_the_smallest_set_reaching_p():
    from pipeline.generation import nucleus_filter

    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    out = nucleus_filter(probs.log(), 0.8, 1.0)
    assert torch.allclose(out, torch.tensor([[0.625, 0.375, 0.0, 0.0]]))
    out = nucleus_filter(probs.log(), 0.81, 1.0)
    assert torch.allclose(out, torch.tensor([[0.5, 0.3, 0.15, 0.0]]) / 0.95)


# --- the grafted state carries information -----------------------------------------------------------

def test_graft_from_the_skyline_prompt_gives_the_skyline_answer(models):
    """A = B, k = j = L (the last block's output, pre-norm): B reading only the question, with its
    last-token state replaced by its own state from the prompt that holds the passage, predicts
    exactly the skyline's next-token distribution, so it starts the skyline's answer. Grafting the
    state of another item's passage does not."""
    from pipeline.tasks.squad import squad_prompts
    from pipeline.tasks.squad import generate_items

    mb, tb = models["llama"]
    L = architecture(mb).n_layers
    prompts = squad_prompts(generate_items(4, seed=5), "private")
    sky = [tb(t + "\nAnswer:")["input_ids"] for t in prompts.skyline]
    own = [tb(t + "\nAnswer:")["input_ids"] for t in prompts.b]
    d = Decoding(max_new_tokens=3)
    skyline = generate(mb, tb, sky, d, batch_size=4, keep_first_logits=True)
    alone = generate(mb, tb, own, d, batch_size=4, keep_first_logits=True)
    state = sender_states(mb, tb, sky, L, batch_size=4).vectors
    graft = communicate(mb, tb, own, L, state, "replace", d, batch_size=4, keep_first_logits=True)
    assert torch.allclose(graft.first_logits, skyline.first_logits, atol=1e-4)
    assert [t[:1] for t in graft.tokens] == [t[:1] for t in skyline.tokens]
    assert not torch.allclose(alone.first_logits, skyline.first_logits, atol=1e-2)
    wrong = communicate(mb, tb, own, L, state.roll(1, 0), "replace", d, batch_size=4, keep_first_logits=True)
    assert not torch.allclose(wrong.first_logits, skyline.first_logits, atol=1e-2)


def test_stop_strings_cut_after_content_only():
    from pipeline.generation import cut_at_stops as cut

    assert cut("Paris\nmore", ("\n",)) == "Paris"
    assert cut("\n\n Paris\nmore", ("\n",)) == "\n\n Paris"
    assert cut("\n", ("\n",)) == "\n" and cut("abc", ()) == "abc"
