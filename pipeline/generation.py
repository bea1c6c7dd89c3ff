"""Batched generation on top of the HF forward pass with a KV cache (no `model.generate`).

Prompts are token-id lists, left-padded into batches so the last prompt token sits at position -1
of every row; position ids follow the attention mask, so a padded row computes what it computes
alone (to float rounding). Decoding is greedy or nucleus (top-p) sampling. Sampling draws from one
generator per item, seeded by the item's own seed, so an item's sample does not depend on which
other items share its batch: batched and one-at-a-time runs agree for sampling too. The draws are
made up front (one uniform per item and step) and turned into tokens on the device by inverting
the nucleus CDF, so choosing a token never waits for the host.

The prefill step is the only forward pass that runs inside `prefill_hook` (a context manager
factory given the batch's row indices): that is where activation communication edits B's hidden
state (pipeline/injection.py). Decoding steps never see the hook.

Two decoders share one device-side state (`_State`: the fed token, positions, chosen tokens, done
flags, all updated in place):
- dynamic: HF's DynamicCache and a growing 2-D mask, one eager forward per step (CPU, and any run
  with a `prefix` or `session_hook`);
- static: a pre-allocated StaticCache and a 4-D boolean mask over its whole length, so every
  decoding step has the same shapes and addresses; on CUDA the step (forward + token choice +
  state update) is captured once as a CUDA graph and replayed. Stop conditions are read back only
  every `check_every` steps (16 on CUDA), so the GPU runs steps back to back. A `LayerPrefix` (KV
  communication) gives the blocks that read it extra cache columns after B's own, and the others
  none: a one-token query's attention costs each block only the columns it holds.

Within pipeline.distributed.generation_across (evaluation under torchrun) the length batches are
dealt out among the ranks (batch b to rank b mod world) and every rank gets every item's result:
each batch is the one a single process runs, so the tokens are too.

Heavy imports stay inside functions.
"""

from __future__ import annotations

import os
import time
import weakref
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple, Sequence

from pipeline.attention import packed_attention
from pipeline.config_tasks import SAMPLING  # the params' vocabulary (a leaf)
from pipeline.distributed import generation_ranks
from pipeline.errors import UserError

CACHES = ("auto", "dynamic", "static")
CUDA_GRAPHS = True  # the static decoder replays a captured step on CUDA; bench/evaluate.py turns it off to compare
# the captured step is first compiled (kernel fusion: norms, rotary, activations); XMODEL_COMPILE=0 turns it off
COMPILE = os.environ.get("XMODEL_COMPILE", "1") != "0"
RECOMPILE_LIMIT = 256  # compiled decoders a process may make (dynamo's default is 8)
KEEP_RUNNERS = 2  # per model: graphed decoders kept across calls (each holds a KV cache), least recent dropped
_RUNNERS: "weakref.WeakKeyDictionary[Any, OrderedDict]" = weakref.WeakKeyDictionary()


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


class Prefix(NamedTuple):
    """What prefix(rows) returns, a past that a batch continues from: `cache` (an HF Cache already
    holding its keys/values), `mask` (rows, P) 1 where a past column is real, `offsets` (rows,)
    each row's real past length (the position of its first prompt token)."""

    cache: Any
    mask: Any
    offsets: Any


class LayerPrefix(NamedTuple):
    """Keys/values that some decoder blocks read before the prompt, on the static decoder (KV
    communication, pipeline/evaluation/kv.py). Blocks in `layers` (0-based) get `width` cache columns
    after B's own (prompt and new tokens), filled for each batch; the other blocks get none.
    fill(rows) -> (kv (len(layers), 2, rows, kv_heads, w, head_dim) with w <= width, each row's
    prefix at the end (left-padded); mask (rows, w), 1 where a column is real; offsets (rows,), each
    row's real prefix length, the position of its first prompt token)."""

    layers: tuple[int, ...]
    width: int
    fill: Callable[[list[int]], tuple[Any, Any, Any]]


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
             progress: Callable[[int], None] | None = None, cache: str = "auto",
             prefix: Callable[[list[int]], tuple[Any, Any, Any]] | None = None,
             session_hook: Callable[[list[int]], Any] | None = None, layer_prefix: LayerPrefix | None = None,
             check_every: int | None = None, gold: Sequence[Sequence[int]] | None = None) -> Generation:
    """Generate for every prompt (token-id lists), batched by length with left padding.

    prefill_hook(rows) returns a context manager entered around the prefill forward pass of the
    batch holding items `rows` (indices into prompts); decoding steps run outside it.
    cache: "static" (pre-allocated cache; CUDA graphs on CUDA), "dynamic" (eager), or "auto"
    (static on CUDA, dynamic elsewhere). The eager dynamic decoder also takes
    prefix(rows) -> (a cache already holding a prefix, that prefix's (rows, P) attention-mask
    columns, a position offset: int or (rows,)) and session_hook(rows), a context manager entered
    around the prefill and every decoding step of the batch. The static decoder takes layer_prefix
    (some blocks read a key/value prefix; the model must use sdpa attention).
    check_every: decoding steps between reads of the stop conditions (default 16 on CUDA, 1 elsewhere).
    gold: per item, token ids of a reference answer: B's log-likelihood of it under the same
    conditioning (the prefill's hook, prefix and session) is returned in extra["gold_logprob"]
    (nats, summed over its tokens), scored teacher-forced on a branch of the prefill's cache that
    is cut off again before decoding (either decoder).
    """
    import torch

    n = len(prompts)
    seeds = list(range(n)) if seeds is None else list(seeds)
    if len(seeds) != n:
        raise ValueError(f"{len(seeds)} seeds for {n} prompts")
    device = next(model.parameters()).device
    static = _use_static(model, device, cache, prefix is not None or session_hook is not None)
    if layer_prefix is not None and not static:
        raise ValueError("layer_prefix needs the static decoder (cache='static', or 'auto' on CUDA)")
    if gold is not None and len(gold) != n:
        raise ValueError(f"{len(gold)} gold answers for {n} prompts")
    gold_logprob: list[float] = [float("nan")] * n
    every = check_every or (16 if device.type == "cuda" else 1)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    stops = eos_ids(model, tokenizer)
    # rounded up so that calls with similar prompts reuse one graphed decoder; the columns after the
    # prompt hold the new tokens, and before decoding a gold answer's teacher-forced pass
    after = max([decoding.max_new_tokens] + [len(g) for g in gold or ()])
    length = -(-(max((len(p) for p in prompts), default=0) + after) // 64) * 64
    runners: dict[int, _StaticRunner] = {}  # one cache, state and graph per batch size, reused by its batches
    tokens: list[list[int]] = [[] for _ in range(n)]
    first_logits: list[Any] = [None] * n
    timing = {"prefill_seconds": 0.0, "decode_seconds": 0.0, "steps": 0}  # steps: decoding forwards, all batches
    start = time.perf_counter()
    batches = length_batches([len(p) for p in prompts], batch_size)
    ranks = generation_ranks()
    for rows in batches if ranks is None else batches[ranks.rank::ranks.world]:
        if static:
            if len(rows) not in runners:
                runners[len(rows)] = _static_runner(model, len(rows), length, decoding, stops, device, layer_prefix)
            runner = runners[len(rows)]
            runner.batch_prefix = layer_prefix.fill(rows) if layer_prefix else None
        else:
            runner = _DynamicRunner(model, _State(len(rows), decoding, stops, device), prefix(rows) if prefix else None)
        with session_hook(rows) if session_hook else nullcontext():
            new, logits0, phases = _generate_batch(
                runner, tokenizer, [prompts[i] for i in rows], decoding, pad_id, stops, [seeds[i] for i in rows],
                device, prefill_hook(rows) if prefill_hook else nullcontext(), keep_first_logits, every,
                None if gold is None else [gold[i] for i in rows])
            for r, i in enumerate(rows):
                if "gold_logprob" in phases:
                    gold_logprob[i] = phases["gold_logprob"][r]
            phases.pop("gold_logprob", None)
        for key, value in phases.items():
            timing[key] += value
        for r, i in enumerate(rows):
            tokens[i] = new[r]
            if keep_first_logits:
                first_logits[i] = logits0[r]
        if progress:
            progress(len(rows))
    graphed = any(r.graph is not None for r in runners.values())
    if ranks is not None:  # every rank's batches, on every rank (each batch as one process would have run it)
        done = [i for rows in batches[ranks.rank::ranks.world] for i in rows]
        gathered = ranks.gather_all(({i: (tokens[i], first_logits[i], gold_logprob[i]) for i in done}, timing, graphed))
        timing = {key: sum(t[key] for _, t, _ in gathered) for key in timing}  # work done, all ranks together
        graphed = any(g for _, _, g in gathered)
        for theirs, _, _ in gathered:
            for i, (tok, logits, logprob) in theirs.items():
                tokens[i], first_logits[i], gold_logprob[i] = tok, logits, logprob
    texts = [cut_at_stops(tokenizer.decode(t, skip_special_tokens=True), decoding.stop_strings) for t in tokens]
    return Generation(tokens=tokens, texts=texts, prompt_tokens=[len(p) for p in prompts],
                      seconds=time.perf_counter() - start,
                      first_logits=torch.stack(first_logits) if keep_first_logits and n else None,
                      extra={"decoder": "static+cuda-graph" if graphed else "static" if static else "dynamic",
                             **timing, **({"gold_logprob": gold_logprob} if gold is not None else {})})


def _use_static(model: Any, device: Any, cache: str, eager_only: bool) -> bool:
    if cache not in CACHES:
        raise UserError(f"cache {cache!r} is not one of {', '.join(CACHES)}")
    from pipeline.architecture import architecture

    arch = architecture(model)
    full = arch.full_attention  # the static cache's 4-D mask assumes every layer attends to the whole past
    if cache == "static":
        if eager_only:
            raise ValueError("a prefix or session_hook needs cache='dynamic' (the eager decoder)")
        if not full:
            raise UserError(f"cache 'static' needs full attention in every layer; {arch.model_type} has "
                            "sliding-window layers: use cache 'dynamic'")
        return True
    return cache == "auto" and device.type == "cuda" and full and not eager_only


def cut_at_stops(text: str, stop_strings: Sequence[str]) -> str:
    """The text up to the first stop string that follows some content (leading whitespace, a
    newline included, is not a stop: models often open an answer with one). Where a reply ends,
    for B's generations and for replies of an outside method scored on the same items
    (pipeline/evaluation/external.py)."""
    lead = len(text) - len(text.lstrip())
    for s in stop_strings:
        if s and s in text[lead:]:
            text = text[:lead + text[lead:].index(s)]
    return text


class _State:
    """One batch's decoding state on the device, only ever updated in place: a captured CUDA
    graph replays on these very tensors."""

    def __init__(self, rows: int, decoding: Decoding, stops: set[int], device: Any):
        import torch

        self.decoding = decoding
        self.tok = torch.zeros(rows, dtype=torch.long, device=device)  # the token fed next
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)  # position of the last token fed
        self.step = torch.zeros(1, dtype=torch.long, device=device)  # tokens chosen so far
        self.out = torch.zeros(rows, decoding.max_new_tokens, dtype=torch.long, device=device)
        self.done = torch.zeros(rows, dtype=torch.bool, device=device)  # chose an EOS
        self.eos = torch.tensor(sorted(stops), dtype=torch.long, device=device)
        self.u = (None if decoding.sampling == "greedy" else
                  torch.zeros(rows, decoding.max_new_tokens, dtype=torch.float32, device=device))

    def reset(self, last_positions: Any, uniforms: Any) -> None:
        self.pos.copy_(last_positions)
        self.step.zero_()
        self.out.zero_()
        self.done.zero_()
        if self.u is not None:
            self.u.copy_(uniforms)

    def advance(self, logits: Any) -> None:
        """Choose this step's tokens from (rows, vocab) logits and record them."""
        import torch

        at = self.step.view(1, 1).expand(self.out.shape[0], 1)
        u = None if self.u is None else self.u.gather(1, at)[:, 0]
        chosen = _choose(logits.float(), u, self.decoding)
        self.out.scatter_(1, at, chosen[:, None])
        if self.eos.numel():
            self.done.logical_or_(torch.isin(chosen, self.eos))
        self.tok.copy_(chosen)
        self.step.add_(1)


class _DynamicRunner:
    """Eager decoding on HF's DynamicCache (or a prefix cache handed in), the mask growing a column a step."""

    graph = None

    def __init__(self, model: Any, state: _State, prefix: tuple[Any, Any, Any] | None):
        self.model, self.state, self.prefix = model, state, prefix
        self.cache = self.mask = None

    def start(self, prompts, ids, mask, positions, hook_ctx, uniforms):
        import torch
        from transformers import DynamicCache

        cache, prefix_mask, offset = self.prefix or (DynamicCache(config=self.model.config), None, 0)
        if prefix_mask is not None:
            mask = torch.cat([prefix_mask.to(device=mask.device, dtype=mask.dtype), mask], dim=1)
        if not isinstance(offset, int):
            offset = torch.as_tensor(offset, device=positions.device).view(-1, 1)
        positions = positions + offset
        with hook_ctx:
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                             logits_to_keep=1)
        self.cache, self.mask = cache, mask
        self.state.reset(positions[:, -1:], uniforms)
        return out.logits[:, -1].float()

    def score(self, first_logits: Any, gold: Sequence[Sequence[int]]) -> list[float]:
        return _gold_logprob(first_logits, gold, self._teacher_forced)

    def _teacher_forced(self, ids: Any, real: Any) -> Any:
        """Logits of a pass over ids (rows, w) after the prefill, the cache cut back to the prefill after it."""
        import torch

        positions = self.state.pos + 1 + torch.arange(ids.shape[1], device=ids.device)[None]
        self.cache.activate_past_recording()  # sliding-window layers keep what the crop below rolls back
        logits = self.model(input_ids=ids, attention_mask=torch.cat([self.mask, real.to(self.mask.dtype)], dim=1),
                            position_ids=positions, cache=self.cache, use_cache=True).logits.float()
        self.cache.crop(-ids.shape[1])  # back to the prefill: decoding continues as if this pass never ran
        return logits

    def step(self) -> None:
        import torch

        st = self.state
        st.pos.add_(1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        out = self.model(input_ids=st.tok[:, None], attention_mask=self.mask, position_ids=st.pos, cache=self.cache,
                         use_cache=True)
        st.advance(out.logits[:, -1])


def _static_runner(model: Any, rows: int, length: int, decoding: Decoding, stops: set[int], device: Any,
                   layer_prefix: LayerPrefix | None = None):
    """A static decoder for this shape; on CUDA one kept from an earlier call when the shape, the
    decoding rule, the prefix's layout and the weights' addresses (which a graph has baked in) are the same."""
    from pipeline import fastpath

    layout = (tuple(layer_prefix.layers), layer_prefix.width) if layer_prefix else ((), 0)
    fused = fastpath.fuse(model)  # before any capture: it moves the q/k/v and gate/up weights
    if device.type != "cuda" or not CUDA_GRAPHS:
        return _StaticRunner(model, rows, length, decoding, stops, device, *layout)
    params = list(model.parameters())
    key = (rows, length, decoding.max_new_tokens, decoding.sampling, decoding.top_p, decoding.temperature,
           tuple(sorted(stops)), COMPILE, fused, fastpath.PACKED, len(params), layout,
           *(p.data_ptr() for p in (params[0], params[1], params[-1])))
    kept = _RUNNERS.setdefault(model, OrderedDict())
    if key not in kept:
        kept[key] = _StaticRunner(model, rows, length, decoding, stops, device, *layout)
        while len(kept) > KEEP_RUNNERS:
            kept.popitem(last=False)
    kept.move_to_end(key)
    return kept[key]


class _StaticRunner:
    """Decoding on a pre-allocated StaticCache with a 4-D boolean mask over its whole length: every
    step has the same shapes and tensor addresses, so on CUDA it is captured once as a graph (after
    WARM eager steps) and replayed; batches of the same size reuse the cache, state and graph.
    Plain blocks (pipeline/fastpath.py) decode with fused q/k/v and gate/up products, and without a
    LayerPrefix their prefill runs packed: the prompts end to end, no padding, each one's keys and
    values written into its row of the cache where left padding puts them."""

    WARM = 2  # eager steps before capture: cuBLAS handles and the allocator settle first

    def __init__(self, model: Any, rows: int, length: int, decoding: Decoding, stops: set[int], device: Any,
                 prefix_layers: Sequence[int] = (), prefix_width: int = 0):
        import torch
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        self.model, self.device = model, device
        self.cache = StaticCache(config=model.config, max_cache_len=length)
        # blocks that read a prefix hold it in columns length.. (the mask's last ones); the others
        # hold B's own columns only and see the mask's first `length` (packed_gqa_attention cuts it)
        for l in prefix_layers:
            self.cache.layers[l] = StaticLayer(max_cache_len=length + prefix_width)
        self.prefix_layers, self.batch_prefix = tuple(prefix_layers), None
        from pipeline import fastpath

        self.packs = not self.prefix_layers and fastpath.packs(model, device)
        self.width = 0  # the batch's prompt columns (its longest prompt)
        width = length + (prefix_width if prefix_layers else 0)
        self.kv = torch.zeros(rows, 1, 1, width, dtype=torch.bool, device=device)  # key columns a query may see
        self.cur = torch.zeros(1, dtype=torch.long, device=device)  # the cache column the next token goes to
        self.state = _State(rows, decoding, stops, device)
        self.use_graph = device.type == "cuda" and CUDA_GRAPHS
        self.graph: Any = None
        self.eager_steps = 0
        self.step_fn = torch.compile(self._step, dynamic=False) if self.use_graph and COMPILE else self._step
        if self.step_fn is not self._step:
            # every decoder is its own compiled variant of _step (its cache tensors are static
            # addresses, guarded by identity); an evaluation makes one per batch size, length and
            # prefix layout, and past dynamo's default of 8 the step would silently run uncompiled
            # (seen: 8.5 ms/step against 5.7)
            import torch._dynamo

            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)

    def start(self, prompts, ids, mask, positions, hook_ctx, uniforms):
        import torch

        self.cache.reset()  # also rewinds its write position to column 0
        rows, width = ids.shape
        self.width = width
        real = mask.bool()
        self.kv.zero_()
        self.kv[:, 0, 0, :width] = real
        if self.batch_prefix is not None:
            positions = positions + self._place_prefix(*self.batch_prefix).to(positions.device).view(-1, 1)
        if self.packs:
            logits = self._packed_prefill(prompts, hook_ctx)
        else:
            q = torch.arange(width, device=ids.device)
            causal = q[None, :] <= q[:, None]
            # a padding query sees itself, so no row of the mask is empty (an empty row gives NaN)
            allowed = causal[None] & (real[:, None, :] | torch.eye(width, dtype=torch.bool, device=ids.device)[None])
            full = self.kv.expand(rows, 1, width, self.kv.shape[-1]).clone()
            full[:, 0, :, :width] = allowed
            with hook_ctx, packed_attention(self.model):
                logits = self.model(input_ids=ids, attention_mask=full, position_ids=positions, cache=self.cache,
                                    use_cache=True, logits_to_keep=1).logits[:, -1]
        self.cur.fill_(width)
        self.state.reset(positions[:, -1:], uniforms)
        return logits.float()

    def _packed_prefill(self, prompts, hook_ctx):
        """The prefill with the prompts packed (fastpath): each block's keys/values go into the
        cache rows at their left-padded columns; the last prompt token's logits, (rows, vocab)."""
        from pipeline import fastpath

        layers = self.cache.layers

        def sink(l, keys, values):
            layer = layers[l]
            if not layer.is_initialized:
                layer.lazy_initialization(keys.new_empty((len(prompts), keys.shape[1], 1, keys.shape[2])),
                                          values.new_empty((len(prompts), values.shape[1], 1, values.shape[2])))
            layer.keys[packing.row, :, packing.col] = keys
            layer.values[packing.row, :, packing.col] = values

        packing = fastpath.Packing([len(p) for p in prompts], self.device, sink)
        with hook_ctx, fastpath.packed(self.model, packing):
            logits = self.model(**packing.inputs(prompts), use_cache=False, logits_to_keep=packing.last).logits[0]
        for layer in layers:
            layer.cumulative_length.fill_(packing.width)  # where decoding writes next
        return logits

    def score(self, first_logits, gold):
        return _gold_logprob(first_logits, gold, self._teacher_forced)

    def _teacher_forced(self, ids, real):
        """Logits of a pass over ids (rows, w) after the prefill. It writes the cache columns after
        the prompt, which decoding overwrites before its mask opens them; the write position is
        rewound after it."""
        import torch

        rows, width = ids.shape
        steps = torch.arange(width, device=ids.device)
        mask = self.kv.expand(rows, 1, width, self.kv.shape[-1]).clone()
        mask[:, 0, :, self.width:self.width + width] = steps[None, :] <= steps[:, None]
        with packed_attention(self.model):
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=self.state.pos + 1 + steps[None],
                                cache=self.cache, use_cache=True).logits.float()
        self.cache.crop(-width)
        return logits

    def _place_prefix(self, kv: Any, mask: Any, offsets: Any) -> Any:
        """Writes a batch's prefix into the last columns of its blocks' caches (and the mask); returns the offsets."""
        w = kv.shape[-2]
        end = self.kv.shape[-1]
        for s, l in enumerate(self.prefix_layers):
            layer = self.cache.layers[l]
            if not layer.is_initialized:
                layer.lazy_initialization(kv[s, 0], kv[s, 1])
            layer.keys[:, :, end - w:] = kv[s, 0]
            layer.values[:, :, end - w:] = kv[s, 1]
        if self.prefix_layers:
            self.kv[:, 0, 0, end - w:] = mask.bool()
        return offsets

    def _step(self) -> None:
        st = self.state
        st.pos.add_(1)
        self.kv.index_fill_(3, self.cur, True)
        out = self.model(input_ids=st.tok[:, None], attention_mask=self.kv, position_ids=st.pos, cache=self.cache,
                         use_cache=True, logits_to_keep=1)
        self.cur.add_(1)
        st.advance(out.logits[:, -1])

    def _warm_step(self) -> None:
        """An eager step through the compiled function (compiling it on the first call)."""
        if self.step_fn is self._step:
            self._step()
            return
        try:
            self.step_fn()
        except Exception as e:  # no compiler here (or it failed): the uncompiled step is equally correct
            import warnings

            warnings.warn(f"decoding step could not be compiled ({type(e).__name__}: {e}); capturing it uncompiled")
            self.step_fn = self._step
            self._step()

    def step(self) -> None:
        import torch

        from pipeline.fastpath import fast_blocks

        if self.graph is not None:
            self.graph.replay()
            return
        if not self.use_graph:
            with packed_attention(self.model), fast_blocks(self.model):
                self._step()
            return
        with torch.cuda.device(self.device), packed_attention(self.model), fast_blocks(self.model):
            if self.eager_steps < self.WARM:  # on a side stream, as graph capture wants its warm-up
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    self._warm_step()
                torch.cuda.current_stream().wait_stream(side)
                self.eager_steps += 1
                return
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self.step_fn()  # recorded, not run
            except Exception as e:  # an op that cannot be captured (or compiled): stay correct, decode eagerly
                import warnings

                warnings.warn(f"decoding step could not be captured as a CUDA graph ({e}); decoding eagerly")
                self.use_graph = False
                self._step()
                return
            self.graph = graph
            graph.replay()


def _gold_logprob(first_logits: Any, gold: Sequence[Sequence[int]], forward: Callable[[Any, Any], Any]) -> list[float]:
    """Per row, the log-likelihood of its gold tokens after the prefill: the first from the
    prefill's logits, the rest from forward(ids, real), one teacher-forced pass of the runner on a
    branch of its cache (ids right-padded: a row's padding follows its tokens, so they never see
    it; real 1 where a token is). An empty gold scores 0."""
    import torch

    logp = torch.log_softmax(first_logits.float(), dim=-1)
    out = [float(logp[r, g[0]]) if len(g) else 0.0 for r, g in enumerate(gold)]
    width = max((len(g) for g in gold), default=0) - 1
    if width < 1:
        return out
    ids = torch.zeros(len(gold), width, dtype=torch.long, device=first_logits.device)
    real = torch.zeros(len(gold), width, dtype=torch.long, device=first_logits.device)
    for r, g in enumerate(gold):
        ids[r, :len(g) - 1] = torch.as_tensor(list(g[:-1]), dtype=torch.long)
        real[r, :len(g) - 1] = 1
    logp = torch.log_softmax(forward(ids, real), dim=-1)
    for r, g in enumerate(gold):
        out[r] += float(sum(logp[r, t, g[t + 1]] for t in range(len(g) - 1)))
    return out


def _generate_batch(runner, tokenizer, rows, decoding: Decoding, pad_id, stops, seeds, device, hook_ctx, keep_first,
                    every: int, gold=None):
    import torch

    ids, mask, positions = left_pad(rows, pad_id, device)
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = runner.start(rows, ids, mask, positions, hook_ctx, _uniforms(decoding, seeds, device))
        first = logits.cpu() if keep_first else None
        scored = runner.score(logits, gold) if gold is not None else None
        runner.state.advance(logits)
        _sync(device)  # one sync a batch, so the phases can be timed apart
        t1 = time.perf_counter()
        chosen, stopped = 1, set()
        can_stop = bool(stops or decoding.stop_strings)  # else every row decodes max_new_tokens: no check
        lagged = device.type == "cuda"
        pending = None
        while chosen < decoding.max_new_tokens:
            if can_stop and chosen % every == 0:
                snap = _Snapshot(runner.state, chosen, bool(decoding.stop_strings), lagged)
                if lagged:  # read the one taken a period ago: the GPU keeps a period of steps queued
                    snap, pending = pending, snap
                if snap is not None and _finished(snap, tokenizer, decoding, stops, stopped):
                    break
            runner.step()
            chosen += 1
        out = runner.state.out[:, :chosen].cpu().tolist()
    phases = {"prefill_seconds": t1 - t0, "decode_seconds": time.perf_counter() - t1, "steps": chosen - 1,
              **({"gold_logprob": scored} if scored is not None else {})}
    return [_row_tokens(o, stops, tokenizer, decoding.stop_strings) for o in out], first, phases


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Snapshot:
    """What the stop conditions read (done flags; the tokens so far where stop strings are checked),
    copied to the host. lagged (CUDA): copied without waiting, into pinned memory behind an event,
    and read a check period later, so the host never waits for the step it just queued: the one
    wait of decoding is on steps a period old."""

    def __init__(self, state: _State, chosen: int, tokens: bool, lagged: bool):
        import torch

        self.event = None
        parts = [state.done] + ([state.out[:, :chosen]] if tokens else [])
        if lagged:
            self.parts = [torch.empty(p.shape, dtype=p.dtype, pin_memory=True).copy_(p, non_blocking=True)
                          for p in parts]
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.parts = [p.cpu() for p in parts]

    def read(self) -> list[list]:
        if self.event is not None:
            self.event.synchronize()
        return [p.tolist() for p in self.parts]


def _finished(snap: _Snapshot, tokenizer, decoding: Decoding, stops: set[int], stopped: set[int]) -> bool:
    """Whether every row had chosen EOS or (host side) hit a stop string when `snap` was taken."""
    done, *out = snap.read()
    if all(done):
        return True
    if not decoding.stop_strings:
        return False
    out = out[0]
    for r, row in enumerate(out):
        if not done[r] and r not in stopped and _hits_stop(tokenizer, _until_eos(row, stops), decoding.stop_strings):
            stopped.add(r)
    return all(d or r in stopped for r, d in enumerate(done))


def _until_eos(row: list[int], stops: set[int]) -> list[int]:
    for k, t in enumerate(row):
        if t in stops:
            return row[:k]
    return row


def _row_tokens(row: list[int], stops: set[int], tokenizer, stop_strings: Sequence[str]) -> list[int]:
    """A row's tokens up to its first EOS (excluded) or through the token that completed a stop
    string, as if decoding had stopped there: later steps only ran because the check is periodic."""
    row = _until_eos(row, stops)
    if stop_strings and _hits_stop(tokenizer, row, stop_strings):
        for k in range(1, len(row) + 1):
            if _hits_stop(tokenizer, row[:k], stop_strings):
                return row[:k]
    return row


def _row_generator(decoding: Decoding, seed: int):
    import torch

    g = torch.Generator(device="cpu")
    g.manual_seed((decoding.seed * 1_000_003 + int(seed)) % (2**63 - 1))
    return g


def _uniforms(decoding: Decoding, seeds: Sequence[int], device: Any) -> Any:
    """(rows, max_new_tokens) draws in (0, 1], each row from its own item's generator; None for greedy."""
    import torch

    if decoding.sampling == "greedy":
        return None
    draws = [1.0 - torch.rand(decoding.max_new_tokens, generator=_row_generator(decoding, s)) for s in seeds]
    return torch.stack(draws).to(device)


def _choose(logits, u, decoding: Decoding):
    """Greedy: argmax. Nucleus: the token where the row's draw u falls in the filtered CDF (u in
    (0, 1], so a token of zero probability is never chosen). All on the logits' device."""
    if decoding.sampling == "greedy":
        return logits.argmax(-1)
    probs = nucleus_filter(logits, decoding.top_p, decoding.temperature)
    cdf = probs.cumsum(-1)
    index = (cdf < u[:, None] * cdf[:, -1:]).sum(-1)
    return index.clamp_(max=probs.shape[-1] - 1)


def _hits_stop(tokenizer, new: list[int], stop_strings: Sequence[str]) -> bool:
    text = tokenizer.decode(new, skip_special_tokens=True).lstrip()
    return any(s in text for s in stop_strings)
