"""Models and tokenizers built on the spot, with no download: tiny ones for the tests and the CI
profile, and real model shapes with random weights for speed benchmarks (speed does not depend on
weight values)."""

from __future__ import annotations

from pathlib import Path

# Real configurations (public config.json values) used for throughput work.
SHAPES = {
    "llama-3.2-3b": dict(model_type="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=True, rms_norm_eps=1e-5),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0,
                         max_position_embeddings=131072, tie_word_embeddings=False, rms_norm_eps=1e-5),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5),
    # tiny shapes for tests and the CI profile: two architectures, widths, depths and tokenizers; a
    # context that holds the tasks' prompts in the tiny tokenizers (a SQuAD prompt is ~320 tokens), which
    # evaluation checks before any method runs
    "tiny-llama": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    "tiny-qwen": dict(model_type="qwen2", hidden_size=48, intermediate_size=96, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048),
    # Gemma-3's text model: q/k norms, head width != hidden / heads, sliding-window layers (window 6,
    # shorter than the test prompts) between full ones
    "tiny-gemma3": dict(model_type="gemma3_text", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2,
                        max_position_embeddings=2048),
}


def train_tokenizer(vocab_size: int, bos: bool):
    """A byte-level BPE trained on the pydoc corpus, as a fast HF tokenizer (offsets work)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from pipeline.data import pydoc_sentences

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(pydoc_sentences(), trainer=trainer)
    if bos:  # Llama-style: BOS prepended; Qwen-style tokenizers add nothing
        tok.post_processor = processors.TemplateProcessing(
            single="<|bos|> $A", pair="<|bos|> $A $B", special_tokens=[("<|bos|>", tok.token_to_id("<|bos|>"))])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")


def random_model(shape: str, tokenizer=None, dtype=None, device=None, seed: int = 0, init_std: float | None = None):
    """A causal LM of a named shape with random weights (vocab taken from the shape, or the tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(SHAPES[shape])
    if tokenizer is not None:
        cfg.update(vocab_size=max(cfg.get("vocab_size", 0), len(tokenizer)), bos_token_id=tokenizer.bos_token_id,
                   eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    if init_std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() > 1:
                    p.normal_(0, init_std)
    return model.eval()


# tokenizer vocabulary, whether BOS is prepended (Llama-style) or not (Qwen-style), weight seed
TINY = {"tiny-llama": (384, True, 0), "tiny-qwen": (320, False, 1), "tiny-gemma3": (352, True, 2)}


def save_tiny_model(shape: str, out: Path) -> Path:
    """A tiny random model and its freshly trained tokenizer, saved as a HF directory (deterministic)."""
    vocab_size, bos, seed = TINY[shape]
    tokenizer = train_tokenizer(vocab_size, bos=bos)
    # A larger-than-default init so layers differ visibly (a test that mixes layers up can fail).
    model = random_model(shape, tokenizer, seed=seed, init_std=0.08)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return Path(out)
