"""Extraction: one model over the corpus into an activation store, resumable, on 1..N ranks.

Batches are grouped by length inside each unit; the forward pass stops after the deepest requested
layer; pooled/last/per-token states are gathered into per-unit buffers on the device, copied to
host asynchronously and written by a background thread while the next unit computes.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import __version__
from pipeline.config import Params, fingerprint
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
    phases: dict[str, float] | None = None  # seconds: prepare (tokenize, lay out), compute, drain (last writes), finalize


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


def store_path(params: Params, role: str, out: Path | None) -> Path:
    return Path(out) if out else params.paths.store(role)


def run_extract(params: Params, role: str, out: Path | None = None, force: bool = False,
                quiet: bool = False) -> ExtractResult:
    """The extract stage: resolve and load the model of `role`, then `extract_model`."""
    from pipeline.data import load_corpus
    from pipeline.distributed import close_dist, init_dist
    from pipeline.models import load_model, resolve_model

    spec = params.model_spec(role)
    dist = init_dist(params.extract.device)
    try:
        corpus = load_corpus(params.corpus)
        # Rank 0 fetches/converts first so ranks never race on the model cache.
        if dist.is_main:
            resolved = resolve_model(spec, params.paths.cache_dir())
        dist.barrier()
        if not dist.is_main:
            resolved = resolve_model(spec, params.paths.cache_dir())
        model, tokenizer = load_model(resolved, device=_rank_device(params.extract.device, dist),
                                      dtype=params.extract.dtype)
        source = {"model_id": resolved.model_id, "revision": resolved.revision, "model_sha": resolved.sha}
        return extract_model(model, tokenizer, source, corpus, params.extract, store_path(params, role, out),
                             dist, force=force, quiet=quiet,
                             attrs={"model_spec": spec, "role": role, "requested_layers": list(params.extract.layers)})
    finally:
        close_dist(dist)


def extract_model(model, tokenizer, source: dict, corpus, cfg, path: Path, dist, force: bool = False,
                  quiet: bool = False, attrs: dict | None = None) -> ExtractResult:
    """Run a loaded model over `corpus` into the store at `path` (create, resume, or nothing to do).

    source: {"model_id", "revision", "model_sha"}, the model's identity recorded in the store.
    """
    from pipeline.layers import num_layers, resolve_layers
    from pipeline.models import tokenizer_hash
    from store.layout import StoreLayout
    from store.writer import StoreWriter, check_existing

    t0 = time.perf_counter()
    n_layers = num_layers(model)
    layers = resolve_layers(list(cfg.layers), n_layers)
    context = getattr(model.config, "max_position_embeddings", None)
    if context and cfg.max_tokens > context:
        raise UserError(f"extract.max_tokens = {cfg.max_tokens} exceeds the model's context ({context} tokens): lower it")
    compute_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    store_dtype = compute_dtype if cfg.store_dtype == "auto" else cfg.store_dtype
    tok = tokenize(tokenizer, corpus.texts, cfg.max_tokens)
    if (tok.lengths == 0).any():
        bad = int(np.flatnonzero(tok.lengths == 0)[0])
        raise UserError(f"text {corpus.index[bad]} of corpus {corpus.source!r} gives no tokens: remove it from the corpus")
    layout = StoreLayout(np.minimum(tok.lengths, cfg.tokens_per_seq), cfg.unit_size, layers, int(model.config.hidden_size))
    identity = {
        **source, "tokenizer_hash": tokenizer_hash(tokenizer), "layers": layers, "compute_dtype": compute_dtype,
        "store_dtype": store_dtype, "corpus_fingerprint": corpus.fingerprint, "max_tokens": cfg.max_tokens,
        "tokens_per_seq": cfg.tokens_per_seq, "unit_size": cfg.unit_size, "layer_convention": LAYER_CONVENTION,
    }
    writer = StoreWriter(path, layout, store_dtype, identity)
    status = check_existing(path, identity, force)  # every rank checks before anyone writes
    dist.barrier()
    if status == "complete":
        return ExtractResult(path, "complete", 0, 0, 0.0)
    if dist.is_main and status == "new":
        writer.create({"params_hash": fingerprint(identity), "created_with": f"xmodel {__version__}",
                       "num_layers": n_layers, "corpus_source": corpus.source, **(attrs or {})})
    dist.barrier()
    pending = writer.pending_units(dist.rank, dist.world)
    phases = {"prepare": time.perf_counter() - t0}
    tokens = _extract_units(model, tok, corpus.index, layout, layers, pending, writer, cfg.batch_tokens,
                            store_dtype, quiet or not dist.is_main, desc=f"extract {path.stem}", phases=phases)
    seconds = phases["compute"] + phases["drain"]
    t1 = time.perf_counter()
    dist.barrier()
    if dist.is_main:
        writer.finalize()
    phases["finalize"] = time.perf_counter() - t1
    return ExtractResult(path, "written", len(pending), tokens, seconds, phases)


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

    device = next(model.parameters()).device
    lengths = tok.lengths
    total = int(sum(lengths[u.seq[0]:u.seq[1]].sum() for u in pending))
    sink = _AsyncUnitWriter(writer)
    bar = tqdm(total=total, desc=desc, unit="tok", unit_scale=True, disable=quiet, dynamic_ncols=True)
    pad_id = 0
    t_start = time.perf_counter()
    try:
        with torch.inference_mode():
            for span in pending:
                lo, hi = span.seq
                bufs = _UnitBuffers(layout, span, layers, device, next(model.parameters()).dtype)
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
                    ids_t, mask_t = _to_device(ids, device), _to_device(mask, device)
                    states = run_captured(model, layers, input_ids=ids_t, attention_mask=mask_t)
                    bufs.add(states, batch, lens, width, local_start[batch], layout.seq_len[rows], mask_t)
                    bar.update(int(lens.sum()))
                host = bufs.finish(store_dtype, text_index, tok, layout)
                sink.put(span, host)
            t_drain = time.perf_counter()
            phases["compute"] = t_drain - t_start
        sink.close()
        phases["drain"] = time.perf_counter() - t_drain
    finally:
        sink.abort()
        bar.close()
    return total


class _UnitBuffers:
    """Device-side buffers for one unit, filled batch by batch by index_copy (no host sync)."""

    def __init__(self, layout, span, layers, device, dtype):
        import torch

        n = span.seq[1] - span.seq[0]
        t = span.tok[1] - span.tok[0]
        d = layout.width
        self.span, self.layers, self.device = span, layers, device
        self.pooled = {l: torch.zeros(n, d, dtype=torch.float32, device=device) for l in layers}
        self.last = {l: torch.zeros(n, d, dtype=dtype, device=device) for l in layers}
        self.tokens = {l: torch.zeros(t, d, dtype=dtype, device=device) for l in layers} if t else {}

    def add(self, states, batch, lens, width, tok_start, keep, mask_t) -> None:
        import torch

        dev = self.device
        rows = _to_device(batch, dev)
        last_pos = _to_device(lens - 1, dev)
        arange = torch.arange(len(batch), device=dev)
        maskf = mask_t.to(torch.float32).unsqueeze(-1)
        denom = _to_device(lens.astype(np.float32), dev).unsqueeze(-1)
        if self.tokens:
            # flat source rows (b * width + t) of kept tokens and their rows in the unit's token block
            src = np.concatenate([b * width + np.arange(k) for b, k in enumerate(keep)])
            dst = np.concatenate([s + np.arange(k) for s, k in zip(tok_start, keep)])
            src_t, dst_t = _to_device(src, dev), _to_device(dst, dev)
        for l in self.layers:
            h = states[l]
            self.pooled[l].index_copy_(0, rows, (h.float() * maskf).sum(1) / denom)
            self.last[l].index_copy_(0, rows, h[arange, last_pos])
            if self.tokens:
                self.tokens[l].index_copy_(0, dst_t, h.reshape(-1, h.shape[-1]).index_select(0, src_t))

    def finish(self, store_dtype: str, text_index, tok: Tokenized, layout) -> dict[str, object]:
        """Cast to the store dtype and start the copy to host on a side stream, without waiting:
        the finite-check flags travel with the unit and are read by the writer thread."""
        import torch

        lo, hi = self.span.seq
        device_out: dict[str, object] = {}
        for kind, bufs in (("pooled", self.pooled), ("last", self.last), ("tokens", self.tokens)):
            for l, buf in bufs.items():
                device_out[f"{kind}/L{l}"] = _to_store_dtype(buf, store_dtype if kind != "pooled" else "float32")
        flags = torch.stack([torch.isfinite(_as_float(t)).all() for t in device_out.values()])
        device_out["_finite"] = flags
        cuda = self.device.type == "cuda"
        stream = _copy_stream(self.device) if cuda else None
        if cuda:
            stream.wait_stream(torch.cuda.current_stream(self.device))
        out: dict[str, object] = {}
        with torch.cuda.stream(stream) if cuda else _nullcontext():
            for name, t in device_out.items():
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=cuda)
                host.copy_(t, non_blocking=cuda)
                if cuda:
                    t.record_stream(stream)  # keep the device buffer alive until the copy is done
                out[name] = host
            if cuda:
                out["_event"] = torch.cuda.Event()
                out["_event"].record(stream)
        tok_lo = self.span.tok[0]
        t = self.span.tok[1] - tok_lo
        token_ids = np.zeros(t, dtype=np.int32)
        char_end = np.zeros(t, dtype=np.int32)
        for i in range(lo, hi):
            s, k = layout.seq_start[i] - tok_lo, layout.seq_len[i]
            token_ids[s:s + k] = tok.ids[i][:k]
            char_end[s:s + k] = tok.char_end[i][:k]
        out.update({"seq_start": layout.seq_start[lo:hi], "seq_len": layout.seq_len[lo:hi],
                    "text_index": np.asarray(text_index[lo:hi], dtype=np.int64),
                    "token_ids": token_ids, "char_end": char_end,
                    "_where": f"texts {text_index[lo]}..{text_index[hi - 1]}", "_store_dtype": store_dtype})
        return out


_COPY_STREAMS: dict = {}


def _copy_stream(device):
    import torch

    if device not in _COPY_STREAMS:
        _COPY_STREAMS[device] = torch.cuda.Stream(device)
    return _COPY_STREAMS[device]


def _nullcontext():
    from contextlib import nullcontext

    return nullcontext()


def _to_device(array: np.ndarray, device):
    """Host array to device without blocking: pinned staging makes the copy truly asynchronous
    (a pageable copy would wait for all queued GPU work and stall the launch pipeline)."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(array))
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


def _to_store_dtype(t, store_dtype: str):
    import torch

    if store_dtype == "bfloat16":
        return t.to(torch.bfloat16).view(torch.int16)  # raw bits, kept as uint16 in Zarr
    return t.to(getattr(torch, store_dtype))


def _as_float(t):
    import torch

    return t.view(torch.bfloat16) if t.dtype == torch.int16 else t


class _AsyncUnitWriter:
    """A background thread writing finished units, so Zarr I/O overlaps the next unit's compute."""

    def __init__(self, writer, depth: int = 2):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (item := self.q.get()) is not None:
            if self.error is not None:
                continue
            span, host = item
            try:
                event = host.pop("_event", None)
                if event is not None:
                    event.synchronize()
                where, store_dtype = host.pop("_where"), host.pop("_store_dtype")
                finite = host.pop("_finite").tolist()
                bad = [name for name, ok in zip(host, finite) if not ok]
                if bad:
                    raise UserError(f"non-finite activations in {bad[0]} ({where}): {store_dtype} overflowed; "
                                    "use extract.dtype/store_dtype float32 or bfloat16")
                arrays = {k: (v.numpy().view(np.uint16) if str(v.dtype) == "torch.int16" else
                              v.numpy() if hasattr(v, "numpy") else v) for k, v in host.items()}
                self.writer.write_unit(span, arrays)
            except BaseException as e:  # surfaced on the main thread at the next put/close
                self.error = e

    def put(self, span, host) -> None:
        self._raise()
        self.q.put((span, host))

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        self._raise()

    def abort(self) -> None:
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
