"""The streamed training path's parallel reads, device-side gathering and held-out cache change
where rows are read and gathered, never which rows a batch holds or in what order."""

import dask.array as da
import numpy as np
import torch

from pipeline.aligners.training import RowSplit


def _split(n=900, seed=5):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, 12)).astype(np.float32), rng.standard_normal((n, 20)).astype(np.float32)
    return RowSplit(da.from_array(x, chunks=(70, 12)), da.from_array(y, chunks=(70, 20)), seed=1,
                    heldout_frac=0.2, shuffle_buffer=150, block_rows=70)


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b))


def test_windows_gathered_on_the_device_give_the_host_path_batches():
    """train_batches(device=...) (the GPU's streamed path: each window copied whole, batches
    gathered there) against the host path, with the CPU standing in for the device."""
    split = _split()
    cpu = torch.device("cpu")
    for epoch, skip, steps in ((0, 0, None), (1, 4, None), (2, 1, 9)):
        host = list(split.train_batches(epoch, 32, skip=skip, steps=steps))
        gathered = list(split.train_batches(epoch, 32, skip=skip, steps=steps, device=cpu))
        assert _same(host, gathered)
    ranks = [list(split.train_batches(0, 16, rank=r, world=2, device=cpu)) for r in range(2)]
    assert _same(ranks[0], list(split.train_batches(0, 16, rank=0, world=2)))


def test_heldout_rows_stay_on_the_device_after_the_first_pass(monkeypatch):
    split, plain = _split(), _split()
    monkeypatch.setattr(RowSplit, "fits_on", lambda self, device, budget=0.5, rows=None: True)
    split.keep_heldout_on(torch.device("cpu"))
    first = list(split.heldout_batches(50))
    assert _same(first, list(plain.heldout_batches(50)))
    loads = []
    monkeypatch.setattr(split.blocks, "load", lambda b: loads.append(b))
    assert _same(list(split.heldout_batches(50)), first)
    assert not loads  # the second pass reads nothing from the store


def test_blocks_kept_in_host_memory_serve_later_epochs(monkeypatch):
    split, plain = _split(), _split()
    assert split.keep_blocks_in_memory() and not _split().keep_blocks_in_memory(fraction=0)
    cpu = torch.device("cpu")
    first = list(split.train_batches(0, 32, device=cpu))
    assert _same(first, list(plain.train_batches(0, 32)))
    loads = []
    monkeypatch.setattr(split.blocks, "load", lambda b: loads.append(b))
    assert _same(list(split.train_batches(1, 32, device=cpu)), list(plain.train_batches(1, 32)))
    assert _same(list(split.heldout_batches(40)), list(plain.heldout_batches(40)))
    assert not loads  # every block came from memory
