"""Batched generation on top of the HF forward pass with a KV cache (no `model.generate`).

Prompts are token-id lists, left-padded into batches so the last prompt token sits at position -1
of every row; position ids follow the attention mask, so a padded row computes what it computes
alone (to float rounding). Decoding is greedy or nucleus (top-p) sampling. Sampling draws from one
generator per item, seeded by the item's own seed, so an item's sample does not depend on which
other items share its batch: batched and one-at-a-time runs agree for sampling too.

The prefill step is the only forward pass that runs inside `prefill_hook` (a context manager
factory given the batch's row indices): that is where activation communication edits B's hidden
state (pipeline/injection.py). Decoding steps never see the hook.

Two generic extensions serve key-value communication (pipeline/evaluation/kv.py): `prefix(rows)`
gives a batch a past to continue from (a cache already holding keys/values, its 2D mask and each
row's past length), so the prompt's tokens take the positions after it and attend to it; and
`session_hook(rows)` is a context manager entered around the batch's whole generation, prefill and
every decoding step (where per-layer attention edits must stay on).

Heavy imports stay inside functions.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from pipeline.errors import UserError

SAMPLING = ("greedy", "nucleus")


@dataclass(frozen=True)
class Decoding:
    """How B (or A) decodes. Paper: greedy for the coordination games, nucleus p = 0.9 for reasoning."""

    max_new_tokens: int = 32
    sampling: str = "greedy"  # greedy | nucleus
    top_p: float = 0.9
    temperature: float = 1.0  # nucleus only
    seed: int = 0  # nucleus only: item i draws from a generator seeded by (seed, item seed)
    stop_strings: tuple[str, ...] = ()  # a row stops once its text contains one (besides EOS)

    def __post_init__(self):
        if self.sampling not in SAMPLING:
            raise UserError(f"sampling {self.sampling!r} is not one of {', '.join(SAMPLING)}")
        if self.max_new_tokens < 1:
            raise UserError(f"max_new_tokens = {self.max_new_tokens} must be at least 1")
        if not 0.0 < self.top_p <= 1.0:
            raise UserError(f"top_p = {self.top_p} must be in (0, 1]")
        if self.temperature <= 0.0:
            raise UserError(f"temperature = {self.temperature} must be positive (use sampling: greedy for argmax)")


@dataclass
class Generation:
    """What a generation call produced, in the order of the prompts given."""

    tokens: list[list[int]]  # new token ids per item (EOS not included)
    texts: list[str]  # decoded new tokens, cut at the first stop string
    prompt_tokens: list[int]  # prompt length per item (no padding)
    seconds: float  # wall time of the whole call
    first_logits: Any = None  # (n, vocab) float32 logits of the prefill step, when keep_first_logits
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> list[int]:
        return [len(t) for t in self.tokens]


@dataclass
class Prefix:
    """A past that a batch continues from: `cache` (an HF Cache already holding its keys/values),
    `mask` (rows, P) 1 where a past column is real, `offsets` (rows,) each row's real past length
    (the position of its first prompt token)."""

    cache: Any
    mask: Any
    offsets: Any


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: Any = None) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids), left-padded; positions count real tokens from 0."""
    import torch

    if any(len(r) == 0 for r in rows):
        raise UserError("an empty prompt cannot be run: every prompt needs at least one token")
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, width - len(r):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), positions.to(device)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Item indices in batches of similar length (longest first), at most batch_size each."""
    if batch_size < 1:
        raise UserError(f"batch_size = {batch_size} must be at least 1")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if source is None:
            continue
        ids.update([source] if isinstance(source, int) else list(source))
    return ids


def nucleus_filter(logits: Any, top_p: float, temperature: float) -> Any:
    """Probabilities (float32) restricted to the smallest set of tokens whose mass reaches top_p."""
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = torch.where(mass_before < top_p, sorted_p, torch.zeros_like(sorted_p))  # top token always kept
    out = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return out / out.sum(-1, keepdim=True)


def generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], decoding: Decoding, *,
             batch_size: int = 8, seeds: Sequence[int] | None = None,
             prefill_hook: Callable[[list[int]], Any] | None = None, keep_first_logits: bool = False,
             progress: Callable[[int], None] | None = None, prefix: Callable[[list[int]], Prefix] | None = None,
             session_hook: Callable[[list[int]], Any] | None = None) -> Generation:
    """Generate for every prompt (token-id lists), batched by length with left padding.

    prefill_hook(rows) returns a context manager entered around the prefill forward pass of the
    batch holding items `rows` (indices into prompts); decoding steps run outside it.
    prefix(rows) gives the batch a past to continue from; session_hook(rows) returns a context
    manager entered around the batch's prefill and all its decoding steps.
    """
    import torch

    n = len(prompts)
    seeds = list(range(n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = eos_ids(model, tokenizer)
    tokens: list[list[int]] = [[] for _ in range(n)]
    first_logits: list[Any] = [None] * n
    start = time.perf_counter()
    for rows in length_batches([len(p) for p in prompts], batch_size):
        with session_hook(rows) if session_hook else nullcontext():
            new, logits0 = _generate_batch(model, tokenizer, [prompts[i] for i in rows], decoding, pad_id, stops,
                                           [seeds[i] for i in rows], device,
                                           prefill_hook(rows) if prefill_hook else nullcontext(), keep_first_logits,
                                           prefix(rows) if prefix else None)
        for i, t, l0 in zip(rows, new, logits0):
            tokens[i] = t
            if keep_first_logits:
                first_logits[i] = l0
        if progress:
            progress(len(rows))
    texts = [_cut(tokenizer.decode(t, skip_special_tokens=True), decoding.stop_strings) for t in tokens]
    return Generation(tokens=tokens, texts=texts, prompt_tokens=[len(p) for p in prompts],
                      seconds=time.perf_counter() - start,
                      first_logits=torch.stack(first_logits) if keep_first_logits and n else None)


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    """The text up to the first stop string that follows some content (leading whitespace, a
    newline included, is not a stop: models often open an answer with one)."""
    lead = len(text) - len(text.lstrip())
    for s in stop_strings:
        if s and s in text[lead:]:
            text = text[:lead + text[lead:].index(s)]
    return text


@dataclass
class _RowState:
    generator: Any
    done: bool = False


def _generate_batch(model, tokenizer, rows, decoding: Decoding, pad_id, stops, seeds, device, hook_ctx, keep_first,
                    past: Prefix | None = None):
    import torch
    from transformers import DynamicCache

    ids, mask, positions = left_pad(rows, pad_id, device)
    if past is None:
        cache = DynamicCache(config=model.config)
    else:  # the prompt continues the past: its tokens come after it in the mask and in position
        cache, mask = past.cache, torch.cat([past.mask.to(mask), mask], dim=1)
        positions = positions + past.offsets.to(positions)[:, None]
    with torch.no_grad():
        with hook_ctx:
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                        logits_to_keep=1)
        logits = out.logits[:, -1].float()
        first = logits.detach().cpu() if keep_first else [None] * len(rows)
        states = [_RowState(_row_generator(decoding, s)) for s in seeds]
        new: list[list[int]] = [[] for _ in rows]
        pos = positions[:, -1:]
        for step in range(decoding.max_new_tokens):
            chosen = _choose(logits, decoding, states)
            for r, st in enumerate(states):
                if st.done:
                    chosen[r] = pad_id
                    continue
                tok = int(chosen[r])
                if tok in stops:
                    st.done = True
                    continue
                new[r].append(tok)
                if decoding.stop_strings and _hits_stop(tokenizer, new[r], decoding.stop_strings):
                    st.done = True
            if all(st.done for st in states) or step == decoding.max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            out = model(input_ids=chosen[:, None].to(device), attention_mask=mask, position_ids=pos, cache=cache,
                        use_cache=True)
            logits = out.logits[:, -1].float()
    return new, list(first)


def _row_generator(decoding: Decoding, seed: int):
    import torch

    if decoding.sampling == "greedy":
        return None
    g = torch.Generator(device="cpu")
    g.manual_seed((decoding.seed * 1_000_003 + int(seed)) % (2**63 - 1))
    return g


def _choose(logits, decoding: Decoding, states: list[_RowState]):
    import torch

    if decoding.sampling == "greedy":
        return logits.argmax(-1).cpu()
    probs = nucleus_filter(logits, decoding.top_p, decoding.temperature).cpu()
    out = torch.empty(len(states), dtype=torch.long)
    for r, st in enumerate(states):  # one generator per item: its draws do not depend on the batch
        out[r] = torch.multinomial(probs[r], 1, generator=st.generator)[0]
    return out


def _hits_stop(tokenizer, new: list[int], stop_strings: Sequence[str]) -> bool:
    text = tokenizer.decode(new, skip_special_tokens=True).lstrip()
    return any(s in text for s in stop_strings)
