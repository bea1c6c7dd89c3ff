"""Shards of large units encoded and written by worker processes.

zarr encodes a shard in Python, inner chunk by inner chunk (an all-fill check, crc32c, the shard
index), holding the GIL for much of it. Threads doing that beside an extraction's main thread took
the GIL from it between kernel launches: on an H200, 8 writer threads slowed the model's compute
2.3x while writing only 1.5x faster than one. Worker processes have their own GIL: a unit's arrays
are copied once into shared memory and each worker writes whole shards from there. The segments
are kept for the next unit (a fresh one costs a page fault per 4 kB on first touch, which made the
copy slower than the writes), and each array's pieces are submitted as soon as it is copied.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing import get_context
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np

SHM_DIR = "/dev/shm"  # where SharedMemory segments live on Linux (a container may make it small)


class ShardPool:
    def __init__(self, processes: int):
        # spawn: the parent holds CUDA state, which a forked child must not touch
        self.pool = ProcessPoolExecutor(max_workers=processes, mp_context=get_context("spawn"))
        self._segments: dict[str, SharedMemory] = {}  # array name -> its segment, reused unit after unit

    @staticmethod
    def fits(nbytes: int) -> bool:
        """Whether shared memory has room for a unit of nbytes (and the next one, queued)."""
        try:
            return shutil.disk_usage(SHM_DIR).free >= 2 * nbytes
        except OSError:
            return False

    def submit(self, root: Path, pieces: list[tuple[str, int, int, int]], arrays: dict[str, np.ndarray]
               ) -> list[Future]:
        """Futures of writing each (array name, first store row, stop row, first row in
        arrays[name]) piece, in order. The segments are reused by the next call: wait for (or
        cancel) every future first."""
        futures = []
        for name, data in arrays.items():
            shm = self._segment(name, max(1, data.nbytes))
            np.ndarray(data.shape, data.dtype, buffer=shm.buf)[...] = data
            where = (shm.name, data.shape, data.dtype.str)
            futures += [self.pool.submit(_write_rows, str(root / name), *where, start, lo, hi)
                        for piece_name, lo, hi, start in pieces if piece_name == name]
        return futures

    def _segment(self, name: str, nbytes: int) -> SharedMemory:
        shm = self._segments.get(name)
        if shm is None or shm.size < nbytes:
            if shm is not None:
                shm.close()
                shm.unlink()
            shm = self._segments[name] = SharedMemory(create=True, size=nbytes)
        return shm

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        for shm in self._segments.values():
            shm.close()
            shm.unlink()
        self._segments = {}


_ATTACHED: dict[str, SharedMemory] = {}  # in a worker: segments mapped so far (they live as long as the pool)


def _write_rows(path: str, segment: str, shape: tuple[int, ...], dtype: str, start: int, lo: int, hi: int) -> None:
    """In a worker: rows [start, start + hi - lo) of the segment's array into store rows [lo, hi)."""
    import zarr

    if segment not in _ATTACHED:
        _ATTACHED[segment] = SharedMemory(name=segment)
    data = np.ndarray(shape, np.dtype(dtype), buffer=_ATTACHED[segment].buf)
    # write_empty_chunks: see StoreWriter (every shard file must exist)
    zarr.open_array(path, mode="r+", config={"write_empty_chunks": True})[lo:hi] = data[start:start + hi - lo]
