"""Moving one unit of activations from the device to the store without stalling compute.

UnitBuffers gathers a unit's pooled/last/per-token states on the device (index_copy, no host
sync), casts them to the store dtype and starts the copy to pinned host memory on a side stream.
AsyncUnitWriter writes finished units from a background thread while the next unit computes.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np

from pipeline.errors import UserError


class UnitBuffers:
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
        rows = to_device(batch, dev)
        last_pos = to_device(lens - 1, dev)
        arange = torch.arange(len(batch), device=dev)
        maskf = mask_t.to(torch.float32).unsqueeze(-1)
        denom = to_device(lens.astype(np.float32), dev).unsqueeze(-1)
        if self.tokens:
            # flat source rows (b * width + t) of kept tokens and their rows in the unit's token block
            src = np.concatenate([b * width + np.arange(k) for b, k in enumerate(keep)])
            dst = np.concatenate([s + np.arange(k) for s, k in zip(tok_start, keep)])
            src_t, dst_t = to_device(src, dev), to_device(dst, dev)
        for l in self.layers:
            h = states[l]
            self.pooled[l].index_copy_(0, rows, (h.float() * maskf).sum(1) / denom)
            self.last[l].index_copy_(0, rows, h[arange, last_pos])
            if self.tokens:
                self.tokens[l].index_copy_(0, dst_t, h.reshape(-1, h.shape[-1]).index_select(0, src_t))

    def finish(self, store_dtype: str) -> dict[str, object]:
        """Cast to the store dtype and start the copy to host on a side stream, without waiting:
        the finite-check flags travel with the unit and are read by the writer thread."""
        import torch

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
        out["_store_dtype"] = store_dtype
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


def to_device(array: np.ndarray, device):
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


class AsyncUnitWriter:
    """A background thread writing finished units, so Zarr I/O overlaps the next unit's compute."""

    def __init__(self, writer, depth: int = 2):
        self.writer = writer
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.busy = 0.0  # seconds spent writing units (compared with compute, it says who waits)
        self.closing = False  # set by close(): no more compute beside the writes still queued
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
                t0 = time.perf_counter()
                self.writer.write_unit(span, arrays, alone=self.closing)
                self.busy += time.perf_counter() - t0
            except BaseException as e:  # surfaced on the main thread at the next put/close
                self.error = e

    def put(self, span, host) -> None:
        self._raise()
        self.q.put((span, host))

    def close(self) -> None:
        self.closing = True
        self.q.put(None)
        self.thread.join()
        self.writer.close()
        self._raise()

    def abort(self) -> None:
        if self.thread.is_alive():
            self.q.put(None)
            self.thread.join()
        self.writer.close()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
