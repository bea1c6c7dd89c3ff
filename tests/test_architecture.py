"""The architecture table (pipeline/architecture.py) checked row by row against real forward passes
of tiny models of every family: the blocks, the final norm, the layer-0 state, and the keys and
values each block's attention puts in HF's cache, recomputed from the residual stream."""

from __future__ import annotations

import pytest
import torch

from pipeline.architecture import FAMILIES, architecture
from pipeline.errors import UserError
from pipeline.layers import capture

TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=96, max_position_embeddings=64)
# per family: what makes its tiny model exercise the row (sliding layers, a head width that is not
# hidden / heads, q/k norms come with the family)
EXTRA = {
    "llama": {}, "qwen2": {}, "qwen3": dict(head_dim=16), "mistral": dict(sliding_window=5),
    "gemma": dict(head_dim=16), "gemma2": dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=16),
    "gemma3_text": dict(head_dim=16, sliding_window=5, query_pre_attn_scalar=16,
                        layer_types=["sliding_attention", "full_attention"] * 2),
}


def tiny(model_type: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    if model_type == "gemma3":  # the multimodal Gemma-3: text decoder under model.language_model
        from transformers import Gemma3Config

        config = Gemma3Config(text_config={**TEXT, **EXTRA["gemma3_text"]}, mm_tokens_per_image=4,
                              # as deep as the text model: a block list guessed by its length is the vision tower's
                              vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4,
                                                 num_attention_heads=2, image_size=28, patch_size=14))
    else:
        config = AutoConfig.for_model(model_type, **TEXT, **EXTRA[model_type])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights than the default init, so that a wrong part shows
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
    return model


def test_every_row_is_tested():
    assert set(FAMILIES) == {*EXTRA, "gemma3"}


@torch.no_grad()
@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_row_matches_the_model(model_type):
    model = tiny(model_type)
    arch = architecture(model)
    assert (arch.model_type, arch.n_layers, arch.width) == (model_type, 4, 32)
    ids = torch.tensor([[5, 9, 2, 7, 11, 3, 8, 1], [0, 0, 4, 6, 10, 12, 2, 9]])
    mask = (ids != 0).long()
    mask[0] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    with capture(model, list(range(5)), stop=False) as states:
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                    output_hidden_states=True)
    hidden = out.hidden_states
    # the embeddings (their output is layer 0) and the final norm where the row says
    assert torch.allclose(arch.final_norm(states[4]), hidden[4], atol=1e-5)
    assert torch.equal(states[0], hidden[0]) and torch.equal(arch.embed(ids), states[0])
    # every block's keys and values, recomputed from the residual stream at the layer before it
    for l in range(1, 5):
        keys, values = arch.keys_values(l, states[l - 1], positions)
        cached = cache.layers[l - 1]
        n = cached.keys.shape[-2]  # a sliding layer keeps only its window
        assert keys.shape[1:] == (arch.n_kv_heads, 8, arch.head_dim) and n <= 8
        assert torch.allclose(keys[..., -n:, :], cached.keys, atol=1e-5), (model_type, l)
        assert torch.allclose(values[..., -n:, :], cached.values, atol=1e-5), (model_type, l)
    sliding = model_type in ("mistral", "gemma2", "gemma3_text", "gemma3")
    assert arch.full_attention is not sliding
    assert arch.head_dim == EXTRA.get(model_type, EXTRA["gemma3_text"]).get("head_dim", 8)


@torch.no_grad()
def test_a_wrong_part_in_a_row_is_caught():
    """The keys/values check above is not vacuous: without the key norm, Qwen-3's keys differ."""
    from dataclasses import replace

    from pipeline import architecture as module

    model = tiny("qwen3")
    hidden = torch.randn(1, 5, 32)
    positions = torch.arange(5)[None]
    right, _ = architecture(model).keys_values(2, hidden, positions)
    rows = dict(FAMILIES, qwen3=replace(FAMILIES["qwen3"], k_norm=None))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "FAMILIES", rows)
        wrong, _ = architecture(model).keys_values(2, hidden, positions)
    assert not torch.allclose(right, wrong, atol=1e-3)


@torch.no_grad()
def test_a_multimodal_model_is_hooked_and_decoded_as_its_text_decoder():
    """Gemma-3 4B and up load as Gemma3ForConditionalGeneration: the text blocks sit under
    model.language_model, next to a vision tower of its own blocks, and the sliding-window layer
    types are in config.text_config."""
    from pipeline.generation import Decoding, generate
    from pipeline.layers import run_captured

    model = tiny("gemma3")
    ids = torch.tensor([[5, 9, 2, 7, 11, 3, 8, 1]])
    hf = model(input_ids=ids, output_hidden_states=True).hidden_states
    states = run_captured(model, [0, 1, 2, 3], input_ids=ids)
    for l in range(4):
        assert torch.equal(states[l], hf[l]), l

    class Tok:  # generate needs only these of a tokenizer
        pad_token_id, eos_token_id = 0, 1

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(map(str, ids))

    with pytest.raises(UserError, match="cache 'static' needs full attention in every layer; gemma3 has sliding"):
        generate(model, Tok(), [[5, 9, 2]], Decoding(max_new_tokens=2), cache="static")


def test_gold_likelihood_on_sliding_window_layers(tmp_path):
    """The teacher-forced gold pass runs past a sliding layer's window (6 here) and is cut back:
    its likelihood is a direct forward's, and decoding after it is decoding without it."""
    from pipeline.generation import Decoding, generate
    from pipeline.models import load_model, resolve_model
    from pipeline.synthetic import save_tiny_model

    model, tok = load_model(resolve_model(str(save_tiny_model("tiny-gemma3", tmp_path / "g")), tmp_path / "c"),
                            device="cpu", dtype="float32")
    prompts = [tok(t)["input_ids"] for t in ("Where is Ana, who left for the north last week?", "Say")]
    gold = [tok(t, add_special_tokens=False)["input_ids"] for t in ("Oslo, Norway, by the long fjord road", "x")]
    assert len(gold[0]) > 6 and len(prompts[0]) > 6
    dec = Decoding(max_new_tokens=8)
    plain = generate(model, tok, prompts, dec, batch_size=2)
    scored = generate(model, tok, prompts, dec, batch_size=2, gold=gold)
    assert scored.tokens == plain.tokens
    for p, g, got in zip(prompts, gold, scored.extra["gold_logprob"]):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + g])).logits[0].float()
        want = sum(float(torch.log_softmax(logits[len(p) - 1 + t], -1)[g[t]]) for t in range(len(g)))
        assert got == pytest.approx(want, abs=1e-3)


def test_a_model_of_an_unknown_architecture_is_refused_at_load(tiny_models, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from pipeline.models import load_model, resolve_model

    AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=400)
                                     ).save_pretrained(tmp_path / "gpt2")
    AutoTokenizer.from_pretrained(tiny_models["llama"]).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(UserError, match="model type 'gpt2' .* is not a known architecture") as e:
        load_model(resolve_model(str(tmp_path / "gpt2"), tmp_path / "cache"), device="cpu", dtype="float32")
    assert "\n" not in str(e.value)


def test_unknown_architecture_is_one_line():
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_embd=32, n_layer=2, n_head=2,
                                                                  vocab_size=64))
    with pytest.raises(UserError, match=r"model type 'gpt2' \(GPT2Config\) is not a known architecture; known: "
                                        r"gemma, gemma2, gemma3, gemma3_text, llama, .*add its row") as e:
        architecture(model)
    assert "\n" not in str(e.value)


def test_a_config_class_claiming_a_known_type_is_ambiguous():
    from transformers import LlamaConfig

    class CustomConfig(LlamaConfig):  # what trust_remote_code models often do
        model_type = "llama"

    model = tiny("llama")
    model.config = CustomConfig(**TEXT)
    with pytest.raises(UserError, match="model type 'llama' is ambiguous here: its config is CustomConfig") as e:
        architecture(model)
    assert "\n" not in str(e.value)


def test_a_model_that_does_not_fit_its_row_is_one_line():
    model = tiny("llama")
    del model.model.layers[3]
    with pytest.raises(UserError, match=r"model.layers holds 3 blocks but the config says 4"):
        architecture(model)
    model = tiny("qwen2")
    del model.model.layers[1].self_attn.k_proj
    with pytest.raises(UserError, match="has no attention part at 'k_proj'"):
        architecture(model)


def test_tiny_gemma3_end_to_end(tmp_path, capsys):
    """Gemma-3 (sliding-window layers, q/k norms, head width 16 != 32 / 4) through the table alone:
    extract both roles, fit an aligner from the stores, evaluate the AC methods; KV refuses it."""
    import json

    from pipeline.synthetic import save_tiny_model
    from tests.helpers import run_cli, write_params

    model = save_tiny_model("tiny-gemma3", tmp_path / "gemma3")
    evaluate = {"tasks": ["squad"], "layer_a": 0.5, "layer_b": 0.75, "aligners": ["procrustes"], "n_boot": 50,
                "methods": ["b_alone", "ac", "skyline"], "controls": [], "squad": {"n": 3, "max_new_tokens": 3}}
    params = write_params(tmp_path, {"a": model, "b": model}, corpus={"n": 32}, extract={"layers": [0.5, 0.75]},
                          fit={"layers": [0.5, 0.75], "aligners": {"procrustes": {}}}, evaluate=evaluate)
    for role in ("a", "b"):
        code, _, err = run_cli(capsys, "--params", str(params), "extract", "--model", role, "--quiet")
        assert code == 0, err
    code, _, err = run_cli(capsys, "--params", str(params), "fit", "procrustes", "--quiet")
    assert code == 0, err
    code, _, err = run_cli(capsys, "--params", str(params), "evaluate", "squad", "--quiet")
    assert code == 0, err
    details = json.loads((tmp_path / "data" / "details" / "evaluate-squad.json").read_text())
    assert {"b_alone", "ac_replace", "ac_procrustes_replace", "skyline"} <= set(details["methods"])
    assert details["layers"] == {"k": 2, "j": 3}  # depths 0.5 and 0.75 of 4 blocks
    kv = write_params(tmp_path, {"a": model, "b": model}, corpus={"n": 32},
                      evaluate={**evaluate, "methods": ["b_alone", "kv"]})
    code, _, err = run_cli(capsys, "--params", str(kv), "evaluate", "squad", "--quiet")
    assert code == 2 and "sliding window; only full attention is supported" in err
    assert len(err.strip().splitlines()) == 1
