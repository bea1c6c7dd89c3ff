"""Extraction: one model over the corpus into an activation store, resumable, on 1..N ranks.

Batches are grouped by length inside each unit; the forward pass stops after the deepest requested
layer; pooled/last/per-token states are gathered into per-unit buffers on the device, copied to
host asynchronously and written by a background thread while the next unit computes.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.config import ExtractConfig, fingerprint
from pipeline.errors import UserError

LAYER_CONVENTION = "0 = embedding output; l = output of decoder block l (pre final norm)"


@dataclass(frozen=True)
class Tokenized:
    ids: list[np.ndarray]  # token ids per sequence, truncated to max_tokens
    char_end: list[np.ndarray]  # end character offset of each token in its text

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], dtype=np.int64)


@dataclass(frozen=True)
class ExtractResult:
    path: Path
    status: str  # "complete" (already done), "written"
    units: int  # units written by this rank
    tokens: int  # tokens run through the model by this rank
    seconds: float  # model work and store writes of this rank
    # seconds: prepare (tokenize, lay out), compute, drain (last writes), finalize; writing: the writer thread's
    # time in write_unit (overlapping compute)
    phases: dict[str, float] | None = None


def tokenize(tokenizer, texts: list[str], max_tokens: int) -> Tokenized:
    """Token ids and end offsets, as `tokenizer(texts, truncation=True, max_length=max_tokens)` gives.

    Runs the Rust backend directly (a truncating copy of it): the same encodings without
    transformers' per-token Python conversion, which dominated on long corpora."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_padding()
    backend.enable_truncation(max_tokens)
    encodings = backend.encode_batch(texts, add_special_tokens=True)
    ids = [np.asarray(e.ids, dtype=np.int32) for e in encodings]
    ends = [np.asarray(e.offsets, dtype=np.int32).reshape(-1, 2)[:, 1] for e in encodings]
    return Tokenized(ids, ends)


def tokenize_shared(tokenizer, texts: list[str], max_tokens: int, dist) -> Tokenized:
    """`tokenize` with the texts dealt round-robin to the ranks and the results exchanged: every rank
    needs every length to lay out the store, and tokenizing is the one part of the work that would
    otherwise not shrink with more GPUs."""
    parts = dist.gather_all(tokenize(tokenizer, texts[dist.rank::dist.world], max_tokens))
    ids: list = [None] * len(texts)
    ends: list = [None] * len(texts)
    for r, part in enumerate(parts):
        ids[r::dist.world], ends[r::dist.world] = part.ids, part.char_end
    return Tokenized(ids, ends)


def length_batches(lengths: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Indices grouped longest first so that batch size x longest length stays within batch_tokens."""
    order = np.argsort(-lengths, kind="stable")
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[current[0]] > batch_tokens:
            batches.append(np.array(current))
            current = []
        current.append(int(i))
    if current:
        batches.append(np.array(current))
    return batches


def run_extract(spec: str, role: str, corpus, cfg: ExtractConfig, cache_dir: Path, path: Path, force: bool = False,
                quiet: bool = False) -> ExtractResult:
    """The extract stage's work: resolve model `spec` (fetched and converted into `cache_dir`), load it
    on cfg.device, then `extract_model` over `corpus` into the store at `path`, recording `role`."""
    from pipeline.distributed import close_dist, init_dist, is_main
    from pipeline.models import load_model, resolve_model

    dist = init_dist(cfg.device)
    try:
        # Rank 0 fetches/converts first so ranks never race on the model cache.
        if is_main():
            resolved = resolve_model(spec, cache_dir)
        dist.barrier()
        if not is_main():
            resolved = resolve_model(spec, cache_dir)
        model, tokenizer = load_model(resolved, device=_rank_device(cfg.device, dist), dtype=cfg.dtype)
        source = {"model_id": resolved.model_id, "revision": resolved.revision, "model_sha": resolved.sha}
        return extract_model(model, tokenizer, source, corpus, cfg, path, dist, force=force, quiet=quiet,
                             attrs={"model_spec": spec, "role": role, "requested_layers": list(cfg.layers)})
    finally:
        close_dist(dist)


def extract_model(model, tokenizer, source: dict, corpus, cfg, path: Path, dist, force: bool = False,
                  quiet: bool = False, attrs: dict | None = None) -> ExtractResult:
    """Run a loaded model over `corpus` into the store at `path` (create, resume, or nothing to do).

    source: {"model_id", "revision", "model_sha"}, the model's identity recorded in the store.
    """
    from pipeline.artifacts import exclusive, store_lock
    from pipeline.distributed import is_main
    from pipeline.faults import fault_point
    from pipeline.architecture import architecture
    from pipeline.layers import resolve_layers
    from pipeline.models import tokenizer_hash
    from pipeline.task_corpus import TaskCorpus
    from store.check import read_attrs
    from store.layout import StoreLayout
    from store.writer import StoreWriter, check_existing

    t0 = time.perf_counter()
    arch = architecture(model)
    n_layers = arch.n_layers
    layers = resolve_layers(list(cfg.layers), n_layers)
    context = arch.context
    if context and cfg.max_tokens > context:
        raise UserError(f"extract.max_tokens = {cfg.max_tokens} exceeds the model's context ({context} tokens): lower it")
    compute_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    store_dtype = compute_dtype if cfg.store_dtype == "auto" else cfg.store_dtype
    if isinstance(corpus, TaskCorpus):  # prompts encoded as evaluation encodes them (chat template), never cut
        tok = Tokenized(*corpus.tokenize(tokenizer, cfg.max_tokens))
    else:
        tok = tokenize_shared(tokenizer, corpus.texts, cfg.max_tokens, dist)
    _check_tokens(tok, tokenizer, corpus, cfg.max_tokens)
    layout = StoreLayout(np.minimum(tok.lengths, cfg.tokens_per_seq), cfg.unit_size, layers, arch.width)
    identity = {
        **source, "tokenizer_hash": tokenizer_hash(tokenizer), "layers": layers, "compute_dtype": compute_dtype,
        "store_dtype": store_dtype, "corpus_fingerprint": corpus.fingerprint, "max_tokens": cfg.max_tokens,
        "tokens_per_seq": cfg.tokens_per_seq, "unit_size": cfg.unit_size, "layer_convention": LAYER_CONVENTION,
    }
    if isinstance(corpus, TaskCorpus):  # both views share the corpus fingerprint; a store is one view
        identity["corpus_view"] = corpus.view
    writer = StoreWriter(path, layout, store_dtype, identity, on_write=fault_point)
    check_existing(path, identity, force)  # every rank checks (read-only) before anyone writes
    dist.barrier()
    # one writer per store: rank 0 holds the lock (beside the store, which --force replaces) for the run
    main = is_main()
    lock = exclusive(store_lock(path), path) if main else nullcontext()
    with lock:
        if main:
            # batch_tokens is recorded when the store is begun and used by every later run on it (see below)
            writer.prepare(force, {"params_hash": fingerprint(identity), "created_with": f"xmodel {__version__}",
                                   "num_layers": n_layers, "corpus_source": corpus.source,
                                   "batch_tokens": cfg.batch_tokens, **(attrs or {}),
                                   # a task corpus's items: its source and split beside the evaluation's
                                   **({"corpus_split": corpus.split} if isinstance(corpus, TaskCorpus) else {})})
        dist.barrier()
        state = read_attrs(path) or {}
        if state.get("complete"):
            return ExtractResult(path, "complete", 0, 0, 0.0)
        # Batch shapes change the last bits of the states (GEMM and attention reduction order), so a
        # store is computed with the batch_tokens it was begun with, whatever a resume asks: one store
        # is one computation, bit-identical to an uninterrupted run, and batch_tokens stays speed-only.
        batch_tokens = int(state.get("batch_tokens", cfg.batch_tokens))
        pending = writer.pending_units(dist.rank, dist.world)
        phases = {"prepare": time.perf_counter() - t0}
        tokens = _extract_units(model, tok, corpus.index, layout, layers, pending, writer, batch_tokens,
                                store_dtype, quiet or not main, desc=f"extract {path.stem}", phases=phases)
        seconds = phases["compute"] + phases["drain"]
        t1 = time.perf_counter()
        dist.barrier()
        if main:
            writer.finalize()
        phases["finalize"] = time.perf_counter() - t1
    return ExtractResult(path, "written", len(pending), tokens, seconds, phases)


def _check_tokens(tok: Tokenized, tokenizer, corpus, max_tokens: int) -> None:
    """Every text must give at least one token that is not a special token (BOS, EOS, ...): a
    sequence of specials only has the same states for every text."""
    if (tok.lengths == 0).any():
        bad = int(np.flatnonzero(tok.lengths == 0)[0])
        raise UserError(f"text {corpus.index[bad]} of corpus {corpus.source!r} gives no tokens: remove it from the corpus")
    special = np.asarray(sorted(set(tokenizer.all_special_ids)), dtype=np.int64)
    only = np.array([np.isin(ids, special).all() for ids in tok.ids])
    if only.all():
        raise UserError(f"extract.max_tokens = {max_tokens} keeps only special tokens of every text "
                        f"(e.g. {tokenizer.convert_ids_to_tokens(tok.ids[0].tolist())}): raise extract.max_tokens")
    if only.any():
        bad = int(np.flatnonzero(only)[0])
        raise UserError(f"text {corpus.index[bad]} of corpus {corpus.source!r} gives only special tokens: remove it from the corpus")


def _rank_device(device: str, dist) -> str:
    import torch

    if dist.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{dist.local_rank}"
    return device


def _extract_units(model, tok: Tokenized, text_index: list[int], layout, layers: list[int], pending, writer,
                   batch_tokens: int, store_dtype: str, quiet: bool, desc: str, phases: dict) -> int:
    import torch
    from tqdm import tqdm

    from pipeline.layers import run_captured
    from pipeline.staging import AsyncUnitWriter, UnitBuffers, to_device

    device = next(model.parameters()).device
    lengths = tok.lengths
    total = int(sum(lengths[u.seq[0]:u.seq[1]].sum() for u in pending))
    sink = AsyncUnitWriter(writer)
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=quiet, dynamic_ncols=True)
    pad_id = 0
    t_start = time.perf_counter()
    try:
        with torch.inference_mode():
            for span in pending:
                lo, hi = span.seq
                bufs = UnitBuffers(layout, span, layers, device, next(model.parameters()).dtype)
                local_start = layout.seq_start[lo:hi] - span.tok[0]
                for batch in length_batches(lengths[lo:hi], batch_tokens):
                    rows = batch + lo
                    lens = lengths[rows]
                    width = int(lens.max())
                    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
                    mask = np.zeros((len(rows), width), dtype=np.int64)
                    for r, i in enumerate(rows):
                        ids[r, : lens[r]] = tok.ids[i]
                        mask[r, : lens[r]] = 1
                    ids_t, mask_t = to_device(ids, device), to_device(mask, device)
                    states = run_captured(model, layers, input_ids=ids_t, attention_mask=mask_t)
                    bufs.add(states, batch, lens, width, local_start[batch], layout.seq_len[rows], mask_t)
                    bar.update(int(lens.sum()))
                host = bufs.finish(store_dtype)
                host.update(_index_arrays(span, text_index, tok, layout))
                sink.put(span, host)
            t_drain = time.perf_counter()
            phases["compute"] = t_drain - t_start
        sink.close()
        phases["drain"] = time.perf_counter() - t_drain
        phases["writing"] = sink.busy
    finally:
        sink.abort()
        bar.close()
    return total


def _index_arrays(span, text_index: list[int], tok: Tokenized, layout) -> dict[str, object]:
    """The host-side arrays of one unit: its CSR index, corpus rows, token ids and end offsets."""
    lo, hi = span.seq
    tok_lo = span.tok[0]
    t = span.tok[1] - tok_lo
    token_ids = np.zeros(t, dtype=np.int32)
    char_end = np.zeros(t, dtype=np.int32)
    for i in range(lo, hi):
        s, k = layout.seq_start[i] - tok_lo, layout.seq_len[i]
        token_ids[s:s + k] = tok.ids[i][:k]
        char_end[s:s + k] = tok.char_end[i][:k]
    return {"seq_start": layout.seq_start[lo:hi], "seq_len": layout.seq_len[lo:hi],
            "text_index": np.asarray(text_index[lo:hi], dtype=np.int64), "token_ids": token_ids, "char_end": char_end,
            "_where": f"texts {text_index[lo]}..{text_index[hi - 1]}"}
