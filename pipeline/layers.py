"""The layer-index convention, and capturing hidden states at chosen layers.

Convention (pinned by tests): layer 0 is the embedding output (the input of decoder block 1);
layer l >= 1 is the output of decoder block l, i.e. the residual stream after l blocks, before any
final norm. For l < L this is HF's `output_hidden_states[l]`; HF's `hidden_states[L]` has the
final norm applied, ours does not, so every layer means the same thing. Injection uses the same
convention: "after layer j" is the output of block j.
"""

from __future__ import annotations

import math
import weakref
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

from pipeline.errors import UserError

_LAYOUTS: "weakref.WeakKeyDictionary[Any, Any]" = weakref.WeakKeyDictionary()  # model -> its packed pass's layout


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
def at_layer(model, layer: int, fn: Callable[[Any], Any]) -> Iterator[None]:
    """The one hook on a layer's hidden state: inside the block, every forward pass of `model` calls
    fn(hidden) with the state at `layer` (the convention above), and fn reads it (returns None),
    edits it (returns the tensor the model continues with), or stops the pass (raises).

    Layer 0 is the embedding output, i.e. the input of block 1: a forward pre-hook on block 1 that
    sees (and may replace) its hidden-states argument. Layer l >= 1 is the output of block l: a
    forward hook on it. Hooks on the same layer run in the order their blocks were entered, each
    seeing the previous one's edit.

    In a packed pass (pipeline/fastpath.py, `packed_layout`) fn still sees (rows, width, d), the
    batch left-padded, and what it returns is packed back: a graft or a capture is the same code.
    """
    from pipeline.architecture import architecture

    blocks = architecture(model).layers
    if not 0 <= layer <= len(blocks):
        raise ValueError(f"layer {layer} is out of range 0..{len(blocks)}")

    def call(hidden):
        layout = _LAYOUTS.get(model)
        if layout is None:
            return fn(hidden)
        new = fn(layout.padded(hidden))
        return None if new is None else layout.packed(new)

    if layer == 0:
        def pre_hook(module, args, kwargs):
            if args:
                new = call(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = call(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})
        handle = blocks[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def hook(module, args, output):
            new = call(output[0] if isinstance(output, tuple) else output)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new
        handle = blocks[layer - 1].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def packed_layout(model, layout: Any) -> Iterator[None]:
    """Within the block, at_layer's functions on `model` see its states through `layout`
    (padded(hidden) -> (rows, width, d), packed(padded) -> hidden)."""
    _LAYOUTS[model] = layout
    try:
        yield
    finally:
        del _LAYOUTS[model]


@contextmanager
def capture(model, layers: list[int], stop: bool = True) -> Iterator[dict[int, object]]:
    """Record the hidden states at `layers` during forward passes inside the block.

    With stop=True the forward pass is cut right after the deepest layer; call it through
    `run_captured` so the early exit is absorbed.
    """
    states: dict[int, object] = {}
    deepest = max(layers)

    def record(layer: int):
        def read(hidden):
            states[layer] = hidden
            if stop and layer == deepest:
                raise _StopForward
        return read

    with ExitStack() as hooks:
        for layer in layers:
            hooks.enter_context(at_layer(model, layer, record(layer)))
        yield states


def run_captured(model, layers: list[int], **inputs) -> dict[int, object]:
    """Text-decoder forward (no LM head) stopped after the deepest of `layers`; returns {layer: states}."""
    from pipeline.architecture import architecture

    decoder = architecture(model).decoder
    with capture(model, layers) as states:
        try:
            decoder(**inputs, use_cache=False)
        except _StopForward:
            pass
    missing = set(layers) - set(states)
    if missing:
        raise RuntimeError(f"layers {sorted(missing)} were not reached by the forward pass")
    return dict(states)
