"""Activation communication (Ramesh & Li 2025, §3.1): graft A's layer-k state into B at layer j.

Layer convention (pipeline/layers.py): layer 0 is the embedding output, layer l >= 1 the output
of decoder block l (the residual stream after l blocks, before the final norm). "After layer j" is
therefore the output of block j (for j = 0 the embedding output): `layers.at_layer` edits it.

    a = sender_states(A, tok_A, prompts_A, k)              # partial forward of A, stopped after layer k
    v = map_vectors(a, aligner)                            # W a, or a itself (no aligner)
    gen = communicate(B, tok_B, prompts_B, j, v, "replace", decoding)

Only B's last prompt token (position -1 of every left-padded row) changes, once, in the prefill
pass: b <- f(v, b) with f in {replace: v, sum: v + b, mean: (v + b) / 2}. Decoding runs on B's KV
cache, which carries the change; no decoding step is touched. Without an aligner and with
d_A != d_B, only the last min(d_A, d_B) coordinates are combined (the paper's footnote 1): the
others keep B's values.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from pipeline.config_evaluate import MODES  # the params' vocabulary of f (a leaf)
from pipeline.errors import UserError
from pipeline.generation import Decoding, Generation, generate, left_pad, length_batches


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise UserError(f"combination f = {mode!r} is not one of {', '.join(MODES)}")
    return mode


def combine(a: Any, b: Any, mode: str) -> Any:
    """f(a, b) on the last axis; with different widths only the last min(d_a, d_b) coordinates of b
    change (a's last coordinates are used), the rest of b is kept."""
    check_mode(mode)
    a = a.to(b.dtype)
    if a.shape[-1] != b.shape[-1]:
        m = min(a.shape[-1], b.shape[-1])
        out = b.clone()
        out[..., -m:] = combine(a[..., -m:], b[..., -m:], mode)
        return out
    if mode == "replace":
        return a.clone()
    if mode == "sum":
        return a + b
    return (a + b) / 2


def check_layer(model: Any, layer: int, what: str, role: str) -> None:
    """One line unless `layer` is one of the model's layers 0..L (the convention of pipeline/layers.py)."""
    from pipeline.architecture import architecture

    n_layers = architecture(model).n_layers
    if not 0 <= layer <= n_layers:
        raise UserError(f"{what} {layer} is out of range: model {role} has layers 0..{n_layers}")


def layer_states(model: Any, layers: Sequence[int], prompts: Sequence[Sequence[int]], pad_id: int, device: Any
                 ) -> dict[int, Any]:
    """The hidden states after `layers` of a batch of prompts, (rows, width, d) left-padded (pad
    slots hold no state anyone reads), from one forward pass stopped after the deepest: packed
    where pipeline.fastpath.packs says, else on the padded batch."""
    from pipeline.fastpath import Packing, packed, packs
    from pipeline.layers import run_captured

    if packs(model, device):
        packing = Packing([len(p) for p in prompts], device)
        with packed(model, packing):
            return run_captured(model, list(layers), **packing.inputs(prompts))
    ids, mask, pos = left_pad(prompts, pad_id, device)
    return run_captured(model, list(layers), input_ids=ids, attention_mask=mask, position_ids=pos)


@dataclass
class SenderStates:
    vectors: Any  # (n, d_A) float32 on CPU: A's last-token state after layer k
    layer: int
    tokens: int  # prompt tokens A processed (k of its blocks each)
    seconds: float


def sender_states(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], layer: int, *,
                  batch_size: int = 8) -> SenderStates:
    """A's last-token states after `layer`, from a forward pass stopped there (no later block, no
    final norm, no LM head; packed where pipeline.fastpath.packs says). In the left-padded layout
    every prompt's last token is at position -1."""
    import torch

    from pipeline.architecture import architecture

    check_layer(model, layer, "sender layer k =", "A")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[Any] = [None] * len(prompts)
    start = time.perf_counter()
    with torch.no_grad():
        for rows in length_batches([len(p) for p in prompts], batch_size):
            states = layer_states(model, [layer], [prompts[i] for i in rows], pad_id, device)[layer]
            last = states[:, -1].float().cpu()
            for r, i in enumerate(rows):
                out[i] = last[r]
    vectors = torch.stack(out) if out else torch.zeros(0, architecture(model).width)
    return SenderStates(vectors, layer, sum(len(p) for p in prompts), time.perf_counter() - start)


def map_vectors(vectors: Any, aligner: Any = None, d_target: int | None = None) -> Any:
    """Apply a fitted aligner (A's layer-k space → B's layer-j space) or pass the vectors through."""
    if aligner is None:
        return vectors
    if vectors.shape[-1] != aligner.d_source:
        raise UserError(f"aligner {aligner.kind_name()} maps width {aligner.d_source}, but A's states have width "
                        f"{vectors.shape[-1]}: use an aligner fitted on this model A")
    if d_target is not None and aligner.d_target != d_target:
        raise UserError(f"aligner {aligner.kind_name()} maps to width {aligner.d_target}, but model B has width "
                        f"{d_target}: use an aligner fitted on this model B")
    return aligner.transform(vectors.float())


@dataclass
class Graft:
    """Per-batch record of what the hook saw and wrote (tests and the similarity probe use it)."""

    before: Any = None  # (rows, d_B) B's own state after layer j at the last prompt token
    after: Any = None  # (rows, d_B) the state B continued with
    calls: int = 0  # how many forward passes the hook edited (1: prefill only)
    rows: list[int] | None = None  # which items (indices into the prompts) the batch held


@contextmanager
def inject(model: Any, layer: int, vectors: Any, mode: str, record: Graft | None = None) -> Iterator[Graft]:
    """Within the block, the first forward pass of `model` has its last-position state after
    `layer` replaced by combine(vectors, state, mode); later passes are left alone. vectors: (rows, d)."""
    import torch

    from pipeline.layers import at_layer

    check_mode(mode)
    check_layer(model, layer, "receiver layer j =", "B")
    record = record if record is not None else Graft()

    def edit(hidden: Any) -> Any:
        if record.calls:
            return None  # prefill only: the KV cache carries the change into decoding
        if hidden.shape[0] != vectors.shape[0]:
            raise ValueError(f"{vectors.shape[0]} vectors for a batch of {hidden.shape[0]} rows")
        out = hidden.clone()
        b = hidden[:, -1]
        out[:, -1] = combine(vectors.to(device=hidden.device), b, mode)
        record.before, record.after = b.detach().float().cpu(), out[:, -1].detach().float().cpu()
        record.calls += 1
        return out

    with at_layer(model, layer, edit), torch.no_grad():
        yield record


def communicate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], layer: int, vectors: Any, mode: str,
                decoding: Decoding, *, batch_size: int = 8, seeds: Sequence[int] | None = None,
                keep_first_logits: bool = False, records: list[Graft] | None = None,
                gold: Sequence[Sequence[int]] | None = None) -> Generation:
    """B generates for its prompts with vectors[i] grafted into item i at layer j (once, in prefill)."""
    check_mode(mode)
    if len(vectors) != len(prompts):
        raise ValueError(f"{len(vectors)} vectors for {len(prompts)} prompts")

    def hook(rows: list[int]):
        rec = Graft(rows=list(rows))
        if records is not None:
            records.append(rec)
        return inject(model, layer, vectors[rows], mode, rec)

    return generate(model, tokenizer, prompts, decoding, batch_size=batch_size, seeds=seeds, prefill_hook=hook,
                    keep_first_logits=keep_first_logits, gold=gold)


def prefill(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], *, layers: Sequence[int] = (),
            inject_layer: int | None = None, vectors: Any = None, mode: str = "replace",
            batch_size: int = 8) -> dict[str, Any]:
    """One full forward pass (no decoding) per prompt, optionally with a graft: next-token logits at
    the last prompt token and the last-token states after `layers`, each (n, ...) float32 on CPU."""
    import torch

    from pipeline.layers import capture

    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    logits: list[Any] = [None] * len(prompts)
    states: dict[int, list[Any]] = {l: [None] * len(prompts) for l in layers}
    with torch.no_grad():
        for rows in length_batches([len(p) for p in prompts], batch_size):
            ids, mask, pos = left_pad([prompts[i] for i in rows], pad_id, device)
            graft = (inject(model, inject_layer, vectors[rows], mode) if inject_layer is not None
                     else _null())
            with graft, capture(model, list(layers) or [0], stop=False) as got:
                out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, logits_to_keep=1)
            last = out.logits[:, -1].float().cpu()
            for r, i in enumerate(rows):
                logits[i] = last[r]
                for l in layers:
                    states[l][i] = got[l][r, -1].float().cpu()
    return {"logits": torch.stack(logits), "states": {l: torch.stack(v) for l, v in states.items()}}


@contextmanager
def _null():
    yield None


# Multi-vector AC: the bandwidth axis ---------------------------------------------------------------
#
# A sends the states of the last m tokens of prompt_a after layer k (m = 1 is plain AC). B's prompt
# gets m - 1 placeholder tokens inserted just before its last token, and at layer j the m message
# vectors, in order, combine with the states of B's last m positions: the placeholders and the last
# token itself, so A's last token always lands on B's last token as in plain AC. With m = 1 nothing
# is inserted and the edit is exactly `inject`'s (tested). Layers after j read the m positions as
# context; the placeholders' own token (B's pad token, or EOS) is never seen there, since their
# states are replaced.


@dataclass
class TokenStates:
    states: dict[int, list[Any]]  # layer -> per item (P_i, d_A) float32 (on `keep`'s device): prompt_a's tokens after the layer
    tokens: int  # prompt tokens A processed
    blocks: int  # blocks A ran per token (the deepest layer)
    seconds: float

    @property
    def layers(self) -> list[int]:
        return sorted(self.states)


def token_states(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], layers: Sequence[int], *,
                 batch_size: int = 8, keep: Any = "cpu") -> TokenStates:
    """A's states of every real token of each prompt after each of `layers`, from one forward pass
    stopped after the deepest (left padding removed; packed where pipeline.fastpath.packs says),
    kept on device `keep` (evaluation keeps them on the GPU: mapped KV and the fuser read every
    layer, and copying those to the host and back cost them 25x the decoding on an H200)."""
    import torch

    layers = sorted(set(int(l) for l in layers))
    for layer in layers:
        check_layer(model, layer, "sender layer", "A")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: dict[int, list[Any]] = {l: [None] * len(prompts) for l in layers}
    start = time.perf_counter()
    with torch.no_grad():
        for rows in length_batches([len(p) for p in prompts], batch_size):
            got = layer_states(model, layers, [prompts[i] for i in rows], pad_id, device)
            for l in layers:
                h = got[l].float().to(keep)
                for r, i in enumerate(rows):
                    out[l][i] = h[r, h.shape[1] - len(prompts[i]):].clone()
    return TokenStates(out, sum(len(p) for p in prompts), max(layers, default=0), time.perf_counter() - start)


def with_placeholders(prompt: Sequence[int], m: int, placeholder: int) -> list[int]:
    """B's prompt with m - 1 placeholder tokens before its last token (module section above)."""
    prompt = list(prompt)
    return prompt[:-1] + [placeholder] * (m - 1) + prompt[-1:]


def placeholder_id(tokenizer: Any) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


@contextmanager
def inject_rows(model: Any, layer: int, messages: Sequence[Any], mode: str, record: Graft | None = None
                ) -> Iterator[Graft]:
    """Within the block, the first forward pass of `model` has, in each row r, the states after
    `layer` of its last len(messages[r]) positions combined with messages[r] ((m_r, d), in order);
    later passes are left alone."""
    import torch

    from pipeline.layers import at_layer

    check_mode(mode)
    check_layer(model, layer, "receiver layer j =", "B")
    record = record if record is not None else Graft()

    def edit(hidden: Any) -> Any:
        if record.calls:
            return None
        if hidden.shape[0] != len(messages):
            raise ValueError(f"{len(messages)} messages for a batch of {hidden.shape[0]} rows")
        out = hidden.clone()
        for r, msg in enumerate(messages):
            m = msg.shape[0]
            out[r, -m:] = combine(msg.to(device=hidden.device), hidden[r, -m:], mode)
        record.before, record.after = hidden[:, -1].detach().float().cpu(), out[:, -1].detach().float().cpu()
        record.calls += 1
        return out

    with at_layer(model, layer, edit), torch.no_grad():
        yield record


def communicate_rows(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], layer: int,
                     messages: Sequence[Any], mode: str, decoding: Decoding, *, batch_size: int = 8,
                     seeds: Sequence[int] | None = None, keep_first_logits: bool = False,
                     records: list[Graft] | None = None,
                gold: Sequence[Sequence[int]] | None = None) -> Generation:
    """B generates for its prompts with item i's message ((m_i, d) states) placed on its last m_i
    positions at layer j, once, in prefill. The prompts must already hold the placeholders
    (`with_placeholders`)."""
    check_mode(mode)
    if len(messages) != len(prompts):
        raise ValueError(f"{len(messages)} messages for {len(prompts)} prompts")
    for i, (p, msg) in enumerate(zip(prompts, messages)):
        if msg.shape[0] > len(p):
            raise ValueError(f"item {i}: a message of {msg.shape[0]} states for a prompt of {len(p)} tokens")

    def hook(rows: list[int]):
        rec = Graft(rows=list(rows))
        if records is not None:
            records.append(rec)
        return inject_rows(model, layer, [messages[i] for i in rows], mode, rec)

    return generate(model, tokenizer, prompts, decoding, batch_size=batch_size, seeds=seeds, prefill_hook=hook,
                    keep_first_logits=keep_first_logits, gold=gold)
