"""The layer-index convention, and capturing hidden states at chosen layers.

Convention (pinned by tests): layer 0 is the embedding output (the input of decoder block 1);
layer l >= 1 is the output of decoder block l, i.e. the residual stream after l blocks, before any
final norm. For l < L this is HF's `output_hidden_states[l]`; HF's `hidden_states[L]` has the
final norm applied, ours does not, so every layer means the same thing. Injection uses the same
convention: "after layer j" is the output of block j.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

from pipeline.errors import UserError


def decoder_layers(model):
    """The ModuleList of decoder blocks of a causal LM (Llama, Qwen2, Gemma3, ... shapes)."""
    import torch.nn as nn

    n = num_layers(model)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def num_layers(model) -> int:
    config = getattr(model.config, "text_config", None) or model.config
    return int(config.num_hidden_layers)


def resolve_layers(requested: list[int | float], n_layers: int) -> list[int]:
    """Indices in [0, n_layers]: ints as given, floats as relative depth rounded half up."""
    out = []
    for item in requested:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            raise UserError(f"layer {item!r} is neither an index (int) nor a relative depth (float in [0, 1])")
        if isinstance(item, float):
            if not 0.0 <= item <= 1.0:
                raise UserError(f"relative depth {item} is outside [0, 1]: use a float in [0, 1] or an int index")
            index = math.floor(item * n_layers + 0.5)
        else:
            index = item
        if not 0 <= index <= n_layers:
            raise UserError(f"layer {item} is out of range: this model has layers 0..{n_layers} (0 = embeddings)")
        out.append(index)
    return sorted(set(out))


class _StopForward(Exception):
    """Raised by the hook after the deepest wanted layer: the rest of the model never runs."""


@contextmanager
def capture(model, layers: list[int], stop: bool = True) -> Iterator[dict[int, object]]:
    """Record the hidden states at `layers` during forward passes inside the block.

    With stop=True the forward pass is cut right after the deepest layer; call it through
    `run_captured` so the early exit is absorbed.
    """
    blocks = decoder_layers(model)
    states: dict[int, object] = {}
    handles = []
    deepest = max(layers)

    def after(layer: int):
        def hook(module, args, output):
            states[layer] = output[0] if isinstance(output, tuple) else output
            if stop and layer == deepest:
                raise _StopForward
        return hook

    def before_first(module, args, kwargs):
        states[0] = args[0] if args else kwargs["hidden_states"]
        if stop and deepest == 0:
            raise _StopForward

    try:
        for layer in layers:
            if layer == 0:
                handles.append(blocks[0].register_forward_pre_hook(before_first, with_kwargs=True))
            else:
                handles.append(blocks[layer - 1].register_forward_hook(after(layer)))
        yield states
    finally:
        for h in handles:
            h.remove()


def run_captured(model, layers: list[int], **inputs) -> dict[int, object]:
    """Base-model forward (no LM head) stopped after the deepest of `layers`; returns {layer: states}."""
    base = model.base_model
    with capture(model, layers) as states:
        try:
            base(**inputs, use_cache=False)
        except _StopForward:
            pass
    missing = set(layers) - set(states)
    if missing:
        raise RuntimeError(f"layers {sorted(missing)} were not reached by the forward pass")
    return dict(states)
