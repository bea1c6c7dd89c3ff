"""The one place that knows where things are inside a causal LM, per model family.

A family is a row of FAMILIES, keyed by the config's `model_type` and pinned to transformers'
config class for it (nnsight/nnterp rename modules the same way): where the text decoder sits in
the loaded model, the names of its embeddings, decoder blocks, final norm and rotary embedding, of
each block's input layernorm and attention, of the attention's q/k/v/o projections and q/k norms,
and how its rotary embedding is called. Widths, depths, head counts and head dims are read from the
text config (the `text_config` of a multimodal config, else the config itself) here and nowhere else.

    arch = architecture(model)        # UserError (one line) on an unknown or mismatching architecture
    arch.layers, arch.n_layers, arch.width, arch.head_dim, arch.full_attention
    keys, values = arch.keys_values(l, hidden, position_ids)   # what block l's attention caches

A model of an unknown family is refused rather than guessed at: a new family is a new row (and a
tiny model of it in tests/test_architecture.py, which checks every row against a real forward).
Heavy imports stay inside functions.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

from pipeline.errors import UserError


@dataclass(frozen=True)
class Family:
    model_type: str  # config.model_type
    config_class: str  # transformers' config class of that model type (a remote-code class reusing the name is refused)
    decoder: str = "model"  # dotted path from the loaded model to its text decoder (embeddings, blocks, final norm)
    text_config: bool = False  # the text settings are config.text_config (multimodal configs)
    embed: str = "embed_tokens"  # its output is layer 0 (Gemma's sqrt(width) scale is inside it)
    layers: str = "layers"
    norm: str = "norm"  # the final norm, after the last block
    rotary: str | None = "rotary_emb"  # None: no rotary position embeddings
    rotary_by_layer_type: bool = False  # rotary(x, positions, layer_type): one rope per attention kind (Gemma-3)
    rotary_fn: str = "apply_rotary_pos_emb"  # in the attention module's modeling module
    input_norm: str = "input_layernorm"
    attention: str = "self_attn"
    q_proj: str = "q_proj"
    k_proj: str = "k_proj"
    v_proj: str = "v_proj"
    o_proj: str = "o_proj"
    q_norm: str | None = None  # per-head RMSNorm of queries/keys before rotary (Qwen-3, Gemma-3)
    k_norm: str | None = None
    window_everywhere: bool = False  # config.sliding_window, when set, applies to every layer (Mistral)
    # each block is x + o(attn(rope(q, k), v)) of input_norm(x), then + down(act(gate) * up) of
    # post_attention_layernorm(x), with mlp.gate_proj/up_proj/down_proj/act_fn: pipeline/fastpath.py
    # may run it with fused q/k/v and gate/up weights
    plain_blocks: bool = False


_QK = dict(q_norm="q_norm", k_norm="k_norm")
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "LlamaConfig", plain_blocks=True),
    Family("mistral", "MistralConfig", window_everywhere=True, plain_blocks=True),
    Family("qwen2", "Qwen2Config", plain_blocks=True),
    Family("qwen3", "Qwen3Config", plain_blocks=True, **_QK),
    Family("gemma", "GemmaConfig"),
    Family("gemma2", "Gemma2Config"),
    Family("gemma3_text", "Gemma3TextConfig", rotary_by_layer_type=True, **_QK),
    Family("gemma3", "Gemma3Config", decoder="model.language_model", text_config=True, rotary_by_layer_type=True,
           **_QK),
)}

FULL, SLIDING = "full_attention", "sliding_attention"


class KvParts(NamedTuple):
    """What a key/value builder needs of decoder block l (keys_values composes them):
    keys = rotate(k_norm(k_proj(input_norm(h)) per head)), values = v_proj(input_norm(h)) per head."""

    input_norm: Any
    k_proj: Any
    v_proj: Any
    k_norm: Any  # None where the family has no key norm
    rotary: Any  # rotary(hidden, position_ids) -> (cos, sin) for this block's attention kind
    rotate: Any  # rotate(x, cos, sin) -> x with the rotary embedding applied, x (batch, heads, tokens, head_dim)
    n_kv_heads: int
    head_dim: int


def family_of(config: Any) -> Family:
    """The row of a config (a model's `config`), or one line naming the model type and the fix."""
    model_type = getattr(config, "model_type", None)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UserError(f"model type {model_type!r} ({type(config).__name__}) is not a known architecture; known: "
                        f"{', '.join(sorted(FAMILIES))}: use a model of one of these, or add its row to "
                        "pipeline/architecture.py FAMILIES")
    if type(config).__name__ != family.config_class:
        raise UserError(f"model type {model_type!r} is ambiguous here: its config is {type(config).__name__} (remote "
                        f"code?), not transformers' {family.config_class}, so its layout is unknown: load it without "
                        f"trust_remote_code, or add a row for it to pipeline/architecture.py FAMILIES")
    return family


def text_config(config: Any) -> Any:
    """The config holding the text model's settings (the one place the text_config fallback is written)."""
    return config.text_config if family_of(config).text_config else config


class Architecture:
    """A loaded model seen through its family's row: its modules, sizes and attention kinds."""

    def __init__(self, model: Any):
        import torch.nn as nn

        self.model = model
        self.family = family = family_of(model.config)
        self.config = text_config(model.config)
        self.decoder = self._find(model, family.decoder, "text decoder")
        self.embed = self._find(self.decoder, family.embed, "embeddings")
        self.layers = self._find(self.decoder, family.layers, "decoder blocks")
        self.final_norm = self._find(self.decoder, family.norm, "final norm")
        self.rotary = None if family.rotary is None else self._find(self.decoder, family.rotary, "rotary embedding")
        if not isinstance(self.layers, nn.ModuleList) or len(self.layers) != self.n_layers:
            found = len(self.layers) if isinstance(self.layers, nn.ModuleList) else type(self.layers).__name__
            raise UserError(f"{self._what()}: {family.decoder}.{family.layers} holds {found} blocks but the config says "
                            f"{self.n_layers}: fix the model's config.json or its row in pipeline/architecture.py")
        for block in self.layers:  # every block has the parts the row names (a mismatch is one line, not a guess)
            attention = self._find(block, family.attention, "attention")
            self._find(block, family.input_norm, "input layernorm")
            for part in (family.q_proj, family.k_proj, family.v_proj, family.o_proj, family.q_norm, family.k_norm):
                if part is not None:
                    self._find(attention, part, "attention part")

    def _what(self) -> str:
        return f"model {type(self.model).__name__} (model type {self.family.model_type!r})"

    def _find(self, root: Any, path: str, what: str) -> Any:
        module = root
        for name in path.split("."):
            module = getattr(module, name, None)
            if module is None:
                raise UserError(f"{self._what()} has no {what} at {path!r} where its family's row puts it: the "
                                "checkpoint is not of this family's layout; fix its row in pipeline/architecture.py")
        return module

    # --- sizes ----------------------------------------------------------------------------------

    @property
    def model_type(self) -> str:
        return self.family.model_type

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def width(self) -> int:
        """The residual stream's width (hidden_size)."""
        return int(self.config.hidden_size)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def n_kv_heads(self) -> int:
        return int(getattr(self.config, "num_key_value_heads", None) or self.n_heads)

    @property
    def head_dim(self) -> int:
        return int(getattr(self.config, "head_dim", None) or self.width // self.n_heads)

    @property
    def context(self) -> int | None:
        """Longest sequence the positions cover (max_position_embeddings), where the config says."""
        context = getattr(self.config, "max_position_embeddings", None)
        return int(context) if context else None

    @property
    def rope(self) -> str:
        """The rotary settings as one comparable string (two caches fit one attention only if equal)."""
        config = self.config
        rope = getattr(config, "rope_parameters", None) or {"rope_theta": getattr(config, "rope_theta", None),
                                                            "rope_scaling": getattr(config, "rope_scaling", None)}
        return ",".join(f"{k}={rope[k]}" for k in sorted(rope)) if isinstance(rope, dict) else str(rope)

    # --- attention kinds ------------------------------------------------------------------------

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Per decoder block 1..L (index l-1): "full_attention" or "sliding_attention"."""
        types = getattr(self.config, "layer_types", None)
        if types:
            return tuple(types)
        windowed = self.family.window_everywhere and getattr(self.config, "sliding_window", None)
        windowed = windowed or getattr(self.config, "use_sliding_window", False)
        return (SLIDING if windowed else FULL,) * self.n_layers

    @property
    def full_attention(self) -> bool:
        """Every block attends to the whole past (no sliding window anywhere)."""
        return all(t == FULL for t in self.layer_types)

    @property
    def attn_implementation(self) -> str:
        """The attention kernel the blocks call (sdpa, eager, ...), as the text config holds it."""
        return getattr(self.config, "_attn_implementation", None) or "eager"

    # --- one block ------------------------------------------------------------------------------

    def block(self, l: int) -> Any:
        """Decoder block l, 1..L (the project's layer convention: layer l is its output)."""
        if not 1 <= l <= self.n_layers:
            raise ValueError(f"block {l} is out of range 1..{self.n_layers}")
        return self.layers[l - 1]

    def attention(self, l: int) -> Any:
        return getattr(self.block(l), self.family.attention)

    def input_norm(self, l: int) -> Any:
        return getattr(self.block(l), self.family.input_norm)

    def projections(self, l: int) -> dict[str, Any]:
        """{"q", "k", "v", "o", "q_norm", "k_norm"} modules of block l's attention (norms None where absent)."""
        attention, f = self.attention(l), self.family
        return {key: getattr(attention, name) if name else None for key, name in
                (("q", f.q_proj), ("k", f.k_proj), ("v", f.v_proj), ("o", f.o_proj), ("q_norm", f.q_norm),
                 ("k_norm", f.k_norm))}

    def position_embeddings(self, hidden: Any, position_ids: Any, l: int) -> tuple[Any, Any]:
        """(cos, sin) that block l's attention rotates with, for tokens at position_ids (batch, tokens)."""
        if self.rotary is None:
            raise ValueError(f"{self._what()} has no rotary embedding")
        if self.family.rotary_by_layer_type:
            return self.rotary(hidden, position_ids, self.layer_types[l - 1])
        return self.rotary(hidden, position_ids)

    def rotate(self, x: Any, cos: Any, sin: Any) -> Any:
        """x (batch, heads, tokens, head_dim) rotated as the family's attention rotates its keys."""
        apply = getattr(sys.modules[type(self.attention(1)).__module__], self.family.rotary_fn)
        return apply(x, x, cos, sin)[1]

    def kv_parts(self, l: int) -> KvParts:
        p = self.projections(l)
        return KvParts(self.input_norm(l), p["k"], p["v"], p["k_norm"],
                       lambda hidden, positions: self.position_embeddings(hidden, positions, l), self.rotate,
                       self.n_kv_heads, self.head_dim)

    def keys_values(self, l: int, hidden: Any, position_ids: Any) -> tuple[Any, Any]:
        """The keys and values block l's attention computes (and caches) from its input `hidden`
        (batch, tokens, width: the residual state at layer l-1) at `position_ids` (batch, tokens):
        each (batch, kv_heads, tokens, head_dim), as in an HF cache layer."""
        parts = self.kv_parts(l)
        x = parts.input_norm(hidden)
        shape = (*x.shape[:-1], parts.n_kv_heads, parts.head_dim)
        keys = parts.k_proj(x).view(shape)
        if parts.k_norm is not None:
            keys = parts.k_norm(keys)
        keys = keys.transpose(1, 2)
        values = parts.v_proj(x).view(shape).transpose(1, 2)
        if self.rotary is not None:
            keys = parts.rotate(keys, *parts.rotary(hidden, position_ids))
        return keys, values


def architecture(model: Any) -> Architecture:
    """The model seen through its family's row; UserError (one line) if there is none or it does not fit."""
    return Architecture(model)
