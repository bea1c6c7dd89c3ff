"""Mini-batch training of an aligner's torch module from row-aligned (numpy or dask) arrays.

Data. `RowSplit` fixes a held-out split by hashing row ids with the seed (independent of chunking
and of the number of ranks) and plans each epoch from row ids alone: blocks (store shards) in a
seeded random order, grouped into windows of >= `shuffle_buffer` rows whose training rows are
shuffled together. Only the one or two windows that the current batch touches are in memory (the
next is read ahead on a thread), so memory is bounded by the buffer size, not by n.

Resuming. The plan of an epoch is a pure function of (seed, epoch, rank, world), so a checkpoint
needs only the weights, the optimizer state, the best weights so far and a few counters; resuming
skips the batches already taken (reading only the windows still needed) and reproduces the
uninterrupted run exactly.

Devices. On a GPU the training rows are copied to device memory once when they fit in half of
what is free (`RowSplit.to_device`); every epoch's batches are then gathered there in the same
order as the streamed path, so the GPU never waits on store reads after the first pass. Rows that
do not fit are streamed as above: a window's blocks are read READ_THREADS at a time, the window's
training rows are gathered into pinned host memory as stored (float16 stays float16), copied to the
device whole and widened there on a side stream (two windows read ahead), and batches are gathered
there, so no step copies from the host or waits for it. The held-out rows are read once and kept
on the device when they fit, else in host memory up to HELDOUT_CACHE_BYTES; the blocks read are kept
in host memory for the later epochs when they fit in HOST_CACHE_FRACTION of it. The loss is summed on
the device, so no step waits for the host.

DDP. When torch.distributed is initialized, each epoch's blocks are dealt round-robin to the ranks,
every rank takes the same number of steps (the smallest rank's count), gradients are averaged
with all_reduce, held-out sums are all-reduced (so every rank takes the same early-stopping
decision), and only rank 0 writes checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.aligners.base import (
    Aligner,
    atomic_write,
    check_fields,
    hashed_heldout,
    read_json,
    require,
)
from pipeline.distributed import group, is_main
from pipeline.errors import UserError
from pipeline.faults import fault_point
from pipeline.metrics import RegressionScores, RowBlocks, retrieval_topk

HELDOUT_CACHE_BYTES = 1 << 30  # held-out rows kept in host memory between evaluations when this small
HELDOUT_DEVICE_BUDGET = 0.25  # ... or on the GPU when they take at most this fraction of its free memory
READ_THREADS = 8  # row blocks read at once (file reads and numpy copies release the GIL)
WINDOWS_AHEAD = 2  # streamed windows read ahead of the one being consumed (assembled at the same time)
# Streaming to a GPU, row blocks read once are kept in host memory (as stored) for the later epochs
# when all of them (counted as float32) take at most this fraction of the machine's memory: a pass
# over the store costs far more host CPU than copying a kept block. 0: read every epoch from the store.
HOST_CACHE_FRACTION = 0.25
RETRIEVAL_ROWS = 2048  # held-out rows used for the final retrieval score (it is O(rows²))


@dataclass(frozen=True)
class TrainParams:
    """Hyper-parameters shared by trainable aligners (saved in aligner.json)."""

    loss: str = "mse"  # "mse" keeps scale (what injection needs); "infonce" matches direction only
    temperature: float = 0.07  # InfoNCE softmax temperature, in (0, 100]
    symmetric: bool = True  # InfoNCE: average source→target and target→source
    lr: float = 1e-3  # in (0, 10]
    weight_decay: float = 0.0  # in [0, 10]
    batch_size: int = 256
    epochs: int = 10
    patience: int = 3  # epochs without held-out improvement before stopping; 0 = run all epochs
    min_delta: float = 0.0  # >= 0: improvement smaller than this does not count
    heldout_frac: float = 0.1  # in [0, 1): rows held out (by hashed row id) for early stopping and scores
    seed: int = 0  # initialization, split and batch order
    shuffle_buffer: int = 8192  # rows shuffled together across blocks

    def __post_init__(self):
        check_fields(self)
        require(self.loss in ("mse", "infonce"), f"loss = {self.loss!r} must be 'mse' or 'infonce'")
        # ranges a training can use: beyond them Adam's step overflows float32 (lr 1e38 is a torch
        # RuntimeError, not a divergence) or the loss is meaningless
        require(0 < self.temperature <= 100, f"temperature = {self.temperature} must be in (0, 100]")
        require(0 < self.lr <= 10, f"lr = {self.lr} must be in (0, 10] (Adam's step size; 1e-3 is usual)")
        require(0 <= self.weight_decay <= 10, f"weight_decay = {self.weight_decay} must be in [0, 10]")
        require(self.min_delta >= 0, f"min_delta = {self.min_delta} must be 0 or more")
        require(self.batch_size >= 1, f"batch_size = {self.batch_size} must be at least 1")
        require(self.epochs >= 0, f"epochs = {self.epochs} must be 0 or more")
        require(self.patience >= 0, f"patience = {self.patience} must be 0 or more")
        require(0 <= self.heldout_frac < 1, f"heldout_frac = {self.heldout_frac} must be in [0, 1)")
        require(self.seed >= 0, f"seed = {self.seed} must be 0 or more")
        require(self.shuffle_buffer >= 1, f"shuffle_buffer = {self.shuffle_buffer} must be at least 1")


# ---------------------------------------------------------------------------------------------
# Data: held-out split and the per-epoch batch plan


def heldout_mask(start: int, stop: int, seed: int, frac: float) -> np.ndarray:
    """Whether each row id in [start, stop) is held out (see `hashed_heldout`)."""
    return hashed_heldout(np.arange(start, stop, dtype=np.uint64), seed, frac)


@dataclass
class _Window:
    blocks: list[int]  # block indices, ascending
    ids: np.ndarray  # their training row ids, ascending (the order rows are loaded in)
    order: np.ndarray  # the shuffled ids, as they are consumed
    start: int = 0  # position of order[0] in the epoch's row sequence


class RowSplit:
    """Training / held-out rows of row-aligned (source, target) arrays, read block by block."""

    def __init__(self, source: Any, target: Any, seed: int = 0, heldout_frac: float = 0.1,
                 shuffle_buffer: int = 8192, block_rows: int | None = None):
        self.blocks = RowBlocks(source, target, block_rows=block_rows)
        self.n = self.blocks.n
        self.d_source, self.d_target = self.blocks.widths
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.heldout = heldout_mask(0, self.n, seed, heldout_frac)
        self.n_heldout = int(self.heldout.sum())
        self.n_train = self.n - self.n_heldout
        if self.n_train < 1:
            raise UserError(f"no training rows: {self.n} rows with heldout_frac = {heldout_frac}")
        self._heldout_cache: tuple[np.ndarray, np.ndarray] | None = None
        self._resident: tuple[torch.Tensor, torch.Tensor] | None = None  # training rows on the device
        self._resident_heldout: tuple[torch.Tensor, torch.Tensor] | None = None
        self._heldout_device: torch.device | None = None  # where heldout_batches caches its first pass
        self.window_wait = 0.0  # seconds the streamed path waited for a window (reads not hidden)
        self._host_blocks: dict[int, tuple[np.ndarray, np.ndarray]] | None = None  # block -> rows, once read
        self._declared = [np.dtype(a.dtype) for a in self.blocks.arrays]

    def fits_on(self, device: torch.device, budget: float = 0.5, rows: int | None = None) -> bool:
        """Whether `rows` rows (default all; float32) take at most `budget` of the GPU's free memory.
        Never on the CPU, whose path keeps memory bounded by the shuffle buffer."""
        need = (self.n if rows is None else rows) * (self.d_source + self.d_target) * 4
        return device.type == "cuda" and need <= budget * torch.cuda.mem_get_info(device)[0]

    def keep_blocks_in_memory(self, fraction: float | None = None) -> bool:
        """Keep every block read in host memory from now on, when all rows (float32) take at most
        `fraction` (default HOST_CACHE_FRACTION, read now) of the machine's memory. Returns whether
        they will be kept."""
        fraction = HOST_CACHE_FRACTION if fraction is None else fraction
        need = self.n * (self.d_source + self.d_target) * 4
        if fraction > 0 and need <= fraction * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"):
            self._host_blocks = {} if self._host_blocks is None else self._host_blocks
        return self._host_blocks is not None

    def _load_block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Block b's (x, y) as stored (see `_stored`): widening waits until the held-out rows are
        dropped, and happens on the GPU when streaming to one."""
        if self._host_blocks is not None and b in self._host_blocks:
            return self._host_blocks[b]
        from store.reader import stored_values

        with stored_values():  # on this thread (scheduler "sync"), or dask's threads would widen
            blocks = self.blocks.load(b, scheduler="sync", shared=True)  # only ever read, never written
        rows = tuple(_stored(a, d) for a, d in zip(blocks, self._declared))
        if self._host_blocks is not None:
            self._host_blocks[b] = rows
        return rows

    def keep_heldout_on(self, device: torch.device) -> None:
        """Let the first held-out pass leave the held-out rows on `device` for the later ones."""
        self._heldout_device = device

    def _blocks_in_order(self, pool: ThreadPoolExecutor, blocks: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(x, y) of each block in order, READ_THREADS of them read and decompressed at once."""
        futures = [pool.submit(self._load_block, b) for b in blocks[:READ_THREADS]]
        for i in range(len(blocks)):
            if i + READ_THREADS < len(blocks):
                futures.append(pool.submit(self._load_block, blocks[i + READ_THREADS]))
            yield futures[i].result()
            futures[i] = None  # a consumed block is not kept alive by the list

    def to_device(self, device: torch.device) -> None:
        """Copy every row to `device` (float32, row-id order) in one pass over the store;
        train_batches then gathers batches there, in the same order as the streamed path, and
        heldout_batches slices the held-out rows there."""
        # filled block by block in place: no second copy of all rows (torch.cat) at the end
        rows = {w: int((self.heldout == w).sum()) for w in (False, True)}
        dest = {w: tuple(torch.empty((rows[w], d), dtype=torch.float32, device=device)
                         for d in (self.d_source, self.d_target)) for w in (False, True)}
        at = {False: 0, True: 0}
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            for b, block in enumerate(self._blocks_in_order(pool, list(range(len(self.blocks))))):
                held = self.heldout[slice(*self.blocks.bounds[b])]
                for which in (False, True):
                    keep = held == which
                    k = int(keep.sum())
                    for a, out in zip(block, dest[which]):
                        _upload_rows(_kept_rows([(a, keep)], device), out[at[which]:at[which] + k])
                    at[which] += k
        self._resident, self._resident_heldout = dest[False], dest[True]

    def _train_ids(self, block: int) -> np.ndarray:
        start, stop = self.blocks.bounds[block]
        return np.arange(start, stop)[~self.heldout[start:stop]]

    def plan(self, epoch: int, rank: int = 0, world: int = 1) -> list[_Window]:
        """This rank's windows for `epoch`: a pure function of (seed, epoch, rank, world)."""
        rng = np.random.default_rng([self.seed, epoch])
        mine = rng.permutation(len(self.blocks))[rank::world]
        rng = np.random.default_rng([self.seed, epoch, rank])
        windows, group, size, pos = [], [], 0, 0
        for i, b in enumerate(mine):
            group.append(int(b))
            size += len(self._train_ids(b))
            if size >= self.shuffle_buffer or i == len(mine) - 1:
                ids = np.concatenate([self._train_ids(g) for g in sorted(group)])
                windows.append(_Window(sorted(group), ids, rng.permutation(ids), pos))
                pos += len(ids)
                group, size = [], 0
        return windows

    def steps_per_epoch(self, epoch: int, batch_size: int, world: int = 1) -> int:
        """Batches every rank takes: the smallest rank's count, so all ranks step in lockstep."""
        rows = [sum(len(w.ids) for w in self.plan(epoch, r, world)) for r in range(world)]
        return min(math.ceil(r / batch_size) for r in rows)

    def _load_window(self, w: _Window, pool: ThreadPoolExecutor, device: torch.device | None = None) -> tuple:
        """The window's training rows (float32, in `w.ids` order), its blocks read in parallel. With
        a device: (x, y, position in x of each row of w.order) as tensors on it, so batches are
        gathered there with no copy from the host."""
        xs, ys = [], []
        for b, (x, y) in zip(w.blocks, self._blocks_in_order(pool, w.blocks)):
            keep = ~self.heldout[slice(*self.blocks.bounds[b])]
            xs.append((x, keep))
            ys.append((y, keep))
        if device is None:
            return _widened(_kept_rows(xs, None)), _widened(_kept_rows(ys, None))
        x, y = (_upload_rows(_kept_rows(parts, device), device=device) for parts in (xs, ys))
        return x, y, _upload(np.searchsorted(w.ids, w.order), device)

    def train_batches(self, epoch: int, batch_size: int, rank: int = 0, world: int = 1,
                      skip: int = 0, steps: int | None = None,
                      device: torch.device | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches `skip` … `steps`-1 of this rank's epoch as float32 tensors (on `device` when
        given, gathered there). A batch may straddle two windows (leftover rows carry over), so at
        most two windows are held, plus WINDOWS_AHEAD read ahead."""
        windows = self.plan(epoch, rank, world)
        seq = np.concatenate([w.order for w in windows])
        ends = np.cumsum([len(w.order) for w in windows])
        steps = math.ceil(len(seq) / batch_size) if steps is None else steps
        if self._resident is not None:  # the same rows in the same order, gathered on the device
            x_all, y_all = self._resident
            pos = torch.from_numpy(np.searchsorted(np.flatnonzero(~self.heldout), seq)).to(x_all.device)
            for k in range(skip, steps):
                rows = pos[k * batch_size:(k + 1) * batch_size]
                yield x_all.index_select(0, rows), y_all.index_select(0, rows)
            return
        loaded: dict[int, Any] = {}  # window index → future of its (x, y[, positions])
        # windows are assembled on one pool (the next ones while the current is consumed), their
        # blocks read on the other, first come first served: the current window's blocks go first
        with ThreadPoolExecutor(max_workers=1 + WINDOWS_AHEAD) as pool, ThreadPoolExecutor(max_workers=READ_THREADS) as reads:
            for k in range(skip, steps):
                lo, hi = k * batch_size, min((k + 1) * batch_size, len(seq))
                first, last = np.searchsorted(ends, lo, "right"), np.searchsorted(ends, hi - 1, "right")
                for w in list(loaded):
                    if w < first:
                        del loaded[w]  # fully consumed
                for w in range(first, min(last + 1 + WINDOWS_AHEAD, len(windows))):  # needed now, and ahead
                    if w not in loaded:
                        loaded[w] = pool.submit(self._load_window, windows[w], reads, device)
                xs, ys = [], []
                t0 = time.perf_counter()
                for w in range(first, last + 1):
                    loaded[w].result()
                self.window_wait += time.perf_counter() - t0
                for w in range(first, last + 1):
                    a, b = max(lo, windows[w].start), min(hi, int(ends[w]))
                    if device is None:
                        x, y = loaded[w].result()
                        rows = np.searchsorted(windows[w].ids, seq[a:b])
                        xs.append(x[rows])
                        ys.append(y[rows])
                    else:
                        x, y, pos = loaded[w].result()
                        rows = pos[a - windows[w].start:b - windows[w].start]
                        xs.append(x.index_select(0, rows))
                        ys.append(y.index_select(0, rows))
                if device is None:
                    yield torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
                else:
                    yield (xs[0], ys[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ys))

    def iter_train_blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Training rows block by block, in row order (for one-pass statistics such as a base map)."""
        for start, stop, (x, y) in self.blocks.iter():
            keep = ~self.heldout[start:stop]
            yield x[keep], y[keep]

    def heldout_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Held-out rows in row order, in batches of `batch_size` (the same on every rank and run)."""
        if self._resident_heldout is not None:
            x, y = self._resident_heldout
            for s in range(0, len(x), batch_size):
                yield x[s:s + batch_size], y[s:s + batch_size]
            return
        if self._heldout_cache is not None:
            x, y = self._heldout_cache
            for s in range(0, len(x), batch_size):
                yield torch.from_numpy(x[s:s + batch_size]), torch.from_numpy(y[s:s + batch_size])
            return
        on_device = self._heldout_device is not None and self.fits_on(self._heldout_device, HELDOUT_DEVICE_BUDGET,
                                                                      self.n_heldout)
        cache = on_device or self.n_heldout * (self.d_source + self.d_target) * 4 <= HELDOUT_CACHE_BYTES
        kept: list[tuple[np.ndarray, np.ndarray]] = []
        bx = by = None
        with ThreadPoolExecutor(max_workers=READ_THREADS) as pool:
            for b, (x, y) in enumerate(self._blocks_in_order(pool, list(range(len(self.blocks))))):
                keep = self.heldout[slice(*self.blocks.bounds[b])]
                x, y = _widened(_kept_rows([(x, keep)], None)), _widened(_kept_rows([(y, keep)], None))
                if cache:
                    kept.append((x, y))
                bx = x if bx is None else np.concatenate([bx, x])
                by = y if by is None else np.concatenate([by, y])
                while len(bx) >= batch_size:
                    yield torch.from_numpy(bx[:batch_size]), torch.from_numpy(by[:batch_size])
                    bx, by = bx[batch_size:], by[batch_size:]
        if bx is not None and len(bx):
            yield torch.from_numpy(bx), torch.from_numpy(by)
        if cache:
            x, y = np.concatenate([k[0] for k in kept]), np.concatenate([k[1] for k in kept])
            if on_device:
                self._resident_heldout = (_upload(x, self._heldout_device), _upload(y, self._heldout_device))
            else:
                self._heldout_cache = (x, y)


def _stored(a: np.ndarray, declared: np.dtype) -> np.ndarray:
    """A block as `store.layout.widen_tensor` takes it: float16 and float32 as they are, uint16 only
    where a store gave its bfloat16 bits (for an array that declares float32), anything else cast
    to float32 now."""
    if a.dtype in (np.float16, np.float32) or (a.dtype == np.uint16 and declared == np.float32):
        return a
    return a.astype(np.float32)


def _kept_rows(parts: list[tuple[np.ndarray, np.ndarray]], device: torch.device | None) -> torch.Tensor:
    """The `keep` rows of each (block, keep) of `parts`, concatenated as stored, in one host tensor:
    pinned when bound for a GPU, so its copy there is asynchronous and at full speed."""
    first = parts[0][0]
    n = sum(int(keep.sum()) for _, keep in parts)
    host = torch.empty((n, *first.shape[1:]), dtype=torch.from_numpy(first[:0]).dtype,
                       pin_memory=device is not None and device.type == "cuda")
    view, at = host.numpy(), 0
    for a, keep in parts:
        k = int(keep.sum())
        np.compress(keep, a, axis=0, out=view[at:at + k])  # straight into place: one copy
        at += k
    return host


def _widened(host: torch.Tensor) -> np.ndarray:
    from store.layout import widen_tensor

    return widen_tensor(host).numpy()


def _upload_rows(host: torch.Tensor, out: torch.Tensor | None = None, device: torch.device | None = None) -> torch.Tensor:
    """Stored rows (`_kept_rows`) widened to float32 on the device of `out` (or on `device`, new)."""
    from store.layout import widen_tensor

    device = out.device if out is not None else device
    if out is None:
        out = torch.empty(host.shape, dtype=torch.float32, device=device)
    if device.type != "cuda":
        return widen_tensor(host, out)
    # copied as stored (half the bytes for float16) and widened on the GPU, where it costs nothing
    return _on_side_stream(device, lambda: widen_tensor(host.to(device, non_blocking=True), out))


def _upload(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """A host array as a tensor on `device`."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if device.type != "cuda":
        return t.to(device)
    out = torch.empty(t.shape, dtype=t.dtype, device=device)
    return _on_side_stream(device, lambda: out.copy_(t))


def _on_side_stream(device: torch.device, copy: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Run `copy` (a copy to the GPU into memory allocated on the default stream) on a side stream
    and wait for it on this thread only, so a loader thread's copy overlaps the training steps; the
    steps use (and free) that memory on the default stream."""
    stream = _upload_stream(device)
    stream.wait_stream(torch.cuda.default_stream(device))  # the block may be one the steps just freed
    with torch.cuda.stream(stream):
        out = copy()
    stream.synchronize()
    return out


_UPLOAD_STREAMS: dict[torch.device, Any] = {}


def _upload_stream(device: torch.device):
    if device not in _UPLOAD_STREAMS:
        _UPLOAD_STREAMS[device] = torch.cuda.Stream(device)
    return _UPLOAD_STREAMS[device]


# ---------------------------------------------------------------------------------------------
# Losses


def info_nce(pred: torch.Tensor, target: torch.Tensor, temperature: float, symmetric: bool = True) -> torch.Tensor:
    """In-batch InfoNCE on cosine similarities: row i of pred should pick row i of target."""
    logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).T / temperature
    labels = torch.arange(len(logits), device=logits.device)
    loss = F.cross_entropy(logits, labels)
    return (loss + F.cross_entropy(logits.T, labels)) / 2 if symmetric else loss


def batch_loss(pred: torch.Tensor, target: torch.Tensor, p: TrainParams) -> torch.Tensor:
    if p.loss == "mse":
        return F.mse_loss(pred, target)
    return info_nce(pred, target, p.temperature, p.symmetric)


# ---------------------------------------------------------------------------------------------
# Checkpoints


@dataclass
class TrainState:
    """Counters a resumed run needs besides the tensors (saved as JSON)."""

    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0  # batches taken in the current epoch
    step: int = 0  # batches taken in all
    train_loss_sum: float = 0.0  # running sums of the current epoch (for its history entry)
    train_rows: int = 0
    best_loss: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    initial_heldout_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


class Checkpoint:
    """`state.json` (+ the name of its tensor file) over `ckpt-<step>.safetensors` holding the
    module, the best module so far, the Adam state and the torch RNG. The tensor file is written
    first and the JSON is swapped in after, so a kill at any point leaves a consistent pair."""

    STATE = "state.json"

    def __init__(self, directory: str | Path, fingerprint: str):
        self.dir, self.fingerprint = Path(directory), fingerprint

    def exists(self) -> bool:
        return (self.dir / self.STATE).exists()

    def save(self, net: torch.nn.Module, best: dict[str, torch.Tensor] | None,
             opt: torch.optim.Optimizer, st: TrainState) -> None:
        from safetensors.torch import save

        from pipeline.artifacts import raw_write

        self.dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"net.{k}": v for k, v in net.state_dict().items()}
        tensors.update({f"best.{k}": v for k, v in (best or {}).items()})
        opt_state = opt.state_dict()
        scalars: dict[str, Any] = {}
        for i, slots in opt_state["state"].items():
            for name, v in slots.items():
                if torch.is_tensor(v):
                    tensors[f"opt.{i}.{name}"] = v
                else:
                    scalars[f"{i}.{name}"] = v
        tensors["rng"] = torch.get_rng_state()
        name = f"ckpt-{st.step}.safetensors"
        blob = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()})
        atomic_write(self.dir / name, lambda p: raw_write(p, blob))
        state = {"fingerprint": self.fingerprint, "tensors": name, "state": asdict(st),
                 "param_groups": opt_state["param_groups"], "opt_scalars": scalars}
        atomic_write(self.dir / self.STATE, lambda p: raw_write(p, json.dumps(state, indent=1)))
        for old in self.dir.glob("ckpt-*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    def load(self, net: torch.nn.Module, opt: torch.optim.Optimizer) -> tuple[TrainState, dict[str, torch.Tensor] | None]:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        raw = read_json(self.dir / self.STATE, f"{self.dir}: no checkpoint")
        if raw.get("fingerprint") != self.fingerprint:
            raise UserError(f"{self.dir} holds a checkpoint of another run (other hyper-parameters or data): "
                            "delete it or use another checkpoint directory")
        try:
            tensors = load_file(str(self.dir / raw["tensors"]))
        except (SafetensorError, OSError, KeyError, TypeError) as e:
            raise UserError(f"{self.dir}: checkpoint damaged ({e}): delete {self.dir} and rerun") from None
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")} or None
        slots: dict[int, dict[str, Any]] = {}
        for key, v in tensors.items():
            if key.startswith("opt."):
                _, i, name = key.split(".", 2)
                slots.setdefault(int(i), {})[name] = v
        for key, v in raw["opt_scalars"].items():
            i, name = key.split(".", 1)
            slots.setdefault(int(i), {})[name] = v
        opt.load_state_dict({"state": slots, "param_groups": raw["param_groups"]})
        torch.set_rng_state(tensors["rng"])
        return TrainState(**raw["state"]), best


# ---------------------------------------------------------------------------------------------
# The loop


def _all_reduce_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


def _device_of(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def heldout_loss(net: torch.nn.Module, split: RowSplit, p: TrainParams) -> float | None:
    """Mean training loss over the held-out rows (batches dealt round-robin to ranks)."""
    if split.n_heldout == 0:
        return None
    rank, world = group()
    dev = _device_of(net)
    total, rows = torch.zeros((), dtype=torch.float64, device=dev), 0  # summed on the device: one sync
    for k, (x, y) in enumerate(split.heldout_batches(p.batch_size)):
        if k % world == rank:
            total += batch_loss(net(x.to(dev)), y.to(dev), p).double() * len(x)
            rows += len(x)
    total, rows = _all_reduce_sum([float(total), float(rows)], world)
    return total / rows


@torch.no_grad()
def heldout_scores(net: torch.nn.Module, split: RowSplit, p: TrainParams) -> dict[str, Any]:
    """Final held-out report: loss, MSE, R², and retrieval on the first RETRIEVAL_ROWS rows."""
    if split.n_heldout == 0:
        return {}
    reg, preds, targets = RegressionScores(), [], []
    dev = _device_of(net)
    for x, y in split.heldout_batches(p.batch_size):
        pred, y = net(x.to(dev)).cpu(), y.cpu()
        reg.update(pred.numpy(), y.numpy())
        if sum(len(t) for t in targets) < RETRIEVAL_ROWS:
            preds.append(pred.numpy())
            targets.append(y.numpy())
    pred, target = np.concatenate(preds)[:RETRIEVAL_ROWS], np.concatenate(targets)[:RETRIEVAL_ROWS]
    out = {"loss": heldout_loss(net, split, p), "rows": split.n_heldout, **reg.result()}
    if len(pred) >= 2:
        out.update({f"retrieval_{k}": v for k, v in retrieval_topk(pred, target).items()},
                   retrieval_rows=len(pred))
    return out


def train(net: torch.nn.Module, split: RowSplit, p: TrainParams, checkpoint: Checkpoint | None = None,
          checkpoint_every: int = 0, stop_after_steps: int | None = None,
          log: Callable[[dict[str, Any]], None] | None = None, device: Any = None,
          rows_on_device: bool | None = None) -> dict[str, Any]:
    """Train `net` in place with Adam on `device` (default: where net is); at the end it holds the
    weights of the best held-out epoch. rows_on_device: hold every training row on the device
    (True), stream them (False), or hold them when they fit (None).
    Returns the fit report (history, held-out scores). With `stop_after_steps` it checkpoints and
    returns early, marked interrupted (to test or to split a long run); a later call with the same
    checkpoint resumes."""
    rank, world = group()
    dev = torch.device(device) if device is not None else _device_of(net)
    net.to(dev)
    rows_on_device_s = None
    if split.fits_on(dev) if rows_on_device is None else rows_on_device:
        t0 = time.perf_counter()
        split.to_device(dev)
        rows_on_device_s = time.perf_counter() - t0
    elif dev.type == "cuda":
        split.keep_heldout_on(dev)
        split.keep_blocks_in_memory()
    stream_to = dev if dev.type == "cuda" else None  # streamed windows go to the GPU whole
    params = [q for q in net.parameters() if q.requires_grad]
    opt = torch.optim.Adam(params, lr=p.lr, weight_decay=p.weight_decay)
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)  # this epoch's, not yet in st
    st, best = TrainState(), None
    resumed_from = 0
    if checkpoint is not None and checkpoint.exists():
        st, best = checkpoint.load(net, opt)
        resumed_from = st.step
    elif p.epochs:
        st.initial_heldout_loss = heldout_loss(net, split, p)

    def save() -> None:
        st.train_loss_sum += float(loss_sum)  # the one host sync, at checkpoints and epoch ends
        loss_sum.zero_()
        check_finite(net, st, p)  # NaN weights are never checkpointed (the same on every rank)
        if checkpoint is not None and is_main():
            checkpoint.save(net, best, opt, st)
        if checkpoint is not None and world > 1:
            torch.distributed.barrier()

    while st.epoch < p.epochs and not st.stopped_early:
        steps = split.steps_per_epoch(st.epoch, p.batch_size, world)
        if steps == 0:
            raise UserError(f"{world} ranks but only {len(split.blocks)} row blocks: some rank gets no "
                            "training rows; use fewer ranks or smaller blocks (block_rows)")
        for x, y in split.train_batches(st.epoch, p.batch_size, rank, world, skip=st.step_in_epoch, steps=steps,
                                        device=stream_to):
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            loss = batch_loss(net(x), y, p)
            loss.backward()
            if world > 1:
                for q in params:
                    torch.distributed.all_reduce(q.grad)
                    q.grad /= world
            opt.step()
            st.step_in_epoch += 1
            st.step += 1
            loss_sum += loss.detach() * len(x)
            st.train_rows += len(x)
            fault_point("steps")
            if stop_after_steps is not None and st.step >= stop_after_steps:
                save()
                return {"interrupted": True, "step": st.step, "epoch": st.epoch}
            if checkpoint_every and st.step % checkpoint_every == 0:
                save()
        st.train_loss_sum += float(loss_sum)
        loss_sum.zero_()
        _end_epoch(net, split, p, st, world)
        check_finite(net, st, p, st.history[-1]["train_loss"], st.history[-1]["heldout_loss"])
        if st.best_epoch == st.epoch:  # this epoch improved (always true for the first)
            best = {k: v.detach().clone() for k, v in net.state_dict().items()}
        if log is not None and is_main():
            log(st.history[-1])
        save()

    if best is not None:
        net.load_state_dict(best)
    report = {"interrupted": False, "steps": st.step, "resumed_from_step": resumed_from, "epochs_run": st.epoch,
              "best_epoch": st.best_epoch, "stopped_early": st.stopped_early,
              "initial_heldout_loss": st.initial_heldout_loss, "history": st.history,
              "heldout": heldout_scores(net, split, p)}
    if rows_on_device_s is not None:
        report["rows_to_device_seconds"] = rows_on_device_s
    elif stream_to is not None:  # streamed to a GPU: how much of the reading the steps did not hide
        report["window_wait_seconds"] = split.window_wait
    return report


class Diverged(UserError):
    """Training produced a non-finite loss or weights: stopped, nothing saved."""


def check_finite(net: torch.nn.Module, st: TrainState, p: TrainParams, *losses: float | None) -> None:
    """Stop training at the first non-finite weight or loss (every rank decides alike: the weights
    are the same on all ranks, and the epoch losses are all-reduced)."""
    bad = [v for v in losses if v is not None and not math.isfinite(v)]
    if not bad and all(bool(q.isfinite().all()) for q in net.parameters()):
        return
    what = f"the loss became {bad[0]}" if bad else "the weights became non-finite"
    raise Diverged(f"training diverged: {what} in epoch {st.epoch + (0 if bad else 1)} (step {st.step}) with "
                   f"lr = {p.lr:g}: lower lr in this aligner's fit.aligners entry (or check the stores with "
                   "`xmodel store verify`); nothing was saved")


def _end_epoch(net: torch.nn.Module, split: RowSplit, p: TrainParams, st: TrainState, world: int) -> None:
    """History entry and early-stopping bookkeeping after an epoch's last batch."""
    loss_sum, rows = _all_reduce_sum([st.train_loss_sum, float(st.train_rows)], world)
    held = heldout_loss(net, split, p)
    st.epoch += 1
    st.history.append({"epoch": st.epoch, "step": st.step, "train_loss": loss_sum / max(rows, 1), "heldout_loss": held})
    st.step_in_epoch, st.train_loss_sum, st.train_rows = 0, 0.0, 0
    if held is None or st.best_loss is None or held < st.best_loss - p.min_delta:
        st.best_loss, st.best_epoch, st.bad_epochs = held, st.epoch, 0  # no held-out rows: the last epoch is best
    else:
        st.bad_epochs += 1
        st.stopped_early = p.patience > 0 and st.bad_epochs >= p.patience


# ---------------------------------------------------------------------------------------------
# Base class of trainable aligners


class TrainableAligner(Aligner):
    """An aligner whose torch module is trained by `train`. Subclasses implement `build_net`
    (structure) and may override `init_net` (initial weights; default: build_net as constructed)."""

    Params = TrainParams

    def init_net(self, split: RowSplit, generator: torch.Generator) -> torch.nn.Module:
        return self.build_net(split.d_source, split.d_target)

    def fit(self, source: Any, target: Any, *, checkpoint_dir: str | Path | None = None,
            checkpoint_every: int = 0, stop_after_steps: int | None = None, block_rows: int | None = None,
            log: Callable[[dict[str, Any]], None] | None = None, device: Any = None,
            rows_on_device: bool | None = None) -> TrainableAligner:
        """Train on (source, target), on `device` (default CPU). With `checkpoint_dir`, checkpoints at
        each epoch end (and every `checkpoint_every` steps) and resumes from a checkpoint found there.
        The fitted module is returned to the CPU, where transform and save expect it. rows_on_device:
        see `train` (None: automatic)."""
        p = self.params
        split = RowSplit(source, target, p.seed, p.heldout_frac, max(p.shuffle_buffer, p.batch_size), block_rows)
        self.d_source, self.d_target = split.d_source, split.d_target
        ckpt = Checkpoint(checkpoint_dir, self._fingerprint(split)) if checkpoint_dir else None
        if ckpt is not None and ckpt.exists():
            self.net = self.build_net(split.d_source, split.d_target)  # weights come from the checkpoint
        else:
            with torch.random.fork_rng(devices=[]):  # seeds modules that draw from the global generator
                torch.manual_seed(p.seed)
                self.net = self.init_net(split, torch.Generator().manual_seed(p.seed))
        self.net.train()
        self.fit_info = train(self.net, split, p, ckpt, checkpoint_every, stop_after_steps, log, device, rows_on_device)
        self.net.cpu().eval()
        return self

    def _fingerprint(self, split: RowSplit) -> str:
        from pipeline.config import fingerprint

        return fingerprint({"kind": self.kind_name(), "params": asdict(self.params), "n": split.n,
                            "dims": [split.d_source, split.d_target], "bounds": split.blocks.bounds})
