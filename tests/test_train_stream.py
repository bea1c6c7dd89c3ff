"""The streamed training path's parallel reads, device-side gathering and held-out cache change
where rows are read and gathered, never which rows a batch holds or in what order."""

import dask.array as da
import numpy as np
import pytest
import torch

from pipeline.aligners.training import RowSplit


def _split(n=900, seed=5):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal((n, 12)).astype(np.float32), rng.standard_normal((n, 20)).astype(np.float32)
    return RowSplit(da.from_array(x, chunks=(70, 12)), da.from_array(y, chunks=(70, 20)), seed=1,
                    heldout_frac=0.2, shuffle_buffer=150, block_rows=70)


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(u[0].cpu(), v[0].cpu()) and torch.equal(u[1].cpu(), v[1].cpu())
                                    for u, v in zip(a, b))


# the CPU stands in for the device; on a GPU machine the real path runs too (pinned windows, the side
# stream's copies, widening on the device)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_windows_gathered_on_the_device_give_the_host_path_batches(device):
    """train_batches(device=...) (the GPU's streamed path: each window copied whole, batches
    gathered there) against the host path."""
    split = _split()
    dev = torch.device(device)
    for epoch, skip, steps in ((0, 0, None), (1, 4, None), (2, 1, 9)):
        host = list(split.train_batches(epoch, 32, skip=skip, steps=steps))
        gathered = list(split.train_batches(epoch, 32, skip=skip, steps=steps, device=dev))
        assert _same(host, gathered)
    ranks = [list(split.train_batches(0, 16, rank=r, world=2, device=dev)) for r in range(2)]
    assert _same(ranks[0], list(split.train_batches(0, 16, rank=0, world=2)))


def test_heldout_rows_stay_on_the_device_after_the_first_pass(monkeypatch):
    split, plain = _split(), _split()
    monkeypatch.setattr(RowSplit, "fits_on", lambda self, device, budget=0.5, rows=None: True)
    split.keep_heldout_on(torch.device("cpu"))
    first = list(split.heldout_batches(50))
    assert _same(first, list(plain.heldout_batches(50)))
    loads = []
    monkeypatch.setattr(split.blocks, "load", lambda b, **kw: loads.append(b))
    assert _same(list(split.heldout_batches(50)), first)
    assert not loads  # the second pass reads nothing from the store


def test_blocks_kept_in_host_memory_serve_later_epochs(monkeypatch):
    split, plain = _split(), _split()
    assert split.keep_blocks_in_memory() and not _split().keep_blocks_in_memory(fraction=0)
    cpu = torch.device("cpu")
    first = list(split.train_batches(0, 32, device=cpu))
    assert _same(first, list(plain.train_batches(0, 32)))
    loads = []
    monkeypatch.setattr(split.blocks, "load", lambda b, **kw: loads.append(b))
    assert _same(list(split.train_batches(1, 32, device=cpu)), list(plain.train_batches(1, 32)))
    assert _same(list(split.heldout_batches(40)), list(plain.heldout_batches(40)))
    assert not loads  # every block came from memory


@pytest.mark.parametrize("device", DEVICES)
def test_store_rows_read_as_stored_and_widened_late_give_the_float32_batches(tmp_path, device):
    """Rows of float16 and bfloat16 stores, read unwidened and widened after the held-out rows are
    dropped (on the device when streaming to one), give the batches of the same rows as float32
    arrays: host path, device path, rows held on the device and held-out passes alike."""
    from store.layout import StoreLayout
    from store.reader import ActivationStore
    from store.writer import StoreWriter

    n, rng = 300, np.random.default_rng(2)
    arrays = []
    for name, dtype, width in (("a", "float16", 12), ("b", "bfloat16", 20)):
        layout = StoreLayout(np.zeros(n, dtype=np.int64), 64, [0], width)
        w = StoreWriter(tmp_path / f"{name}.zarr", layout, dtype, {"k": name}, writers=1)
        w.create({})
        for span in layout.units:
            lo, hi = span.seq
            values = rng.standard_normal((hi - lo, width), dtype=np.float32)
            last = values.astype(np.float16) if dtype == "float16" else (values.view(np.uint32) >> 16).astype(np.uint16)
            w.write_unit(span, {"seq_start": np.zeros(hi - lo, np.int64), "seq_len": np.zeros(hi - lo, np.int64),
                                "text_index": np.arange(lo, hi, dtype=np.int64), "last/L0": last, "pooled/L0": values})
        w.finalize()
        arrays.append(ActivationStore(w.path).dask("last", 0))
    x, y = arrays
    stored = RowSplit(x, y, seed=1, heldout_frac=0.2, shuffle_buffer=100, block_rows=64)
    plain = RowSplit(da.from_array(x.compute(), chunks=x.chunks), da.from_array(y.compute(), chunks=y.chunks),
                     seed=1, heldout_frac=0.2, shuffle_buffer=100, block_rows=64)
    assert [a.dtype for a in stored._load_block(0)] == [np.float16, np.uint16]  # read as stored
    dev = torch.device(device)
    reference = list(plain.train_batches(1, 32))
    assert reference[0][0].dtype == torch.float32 and reference[0][0].abs().sum() > 0
    assert _same(list(stored.train_batches(1, 32)), reference)
    assert _same(list(stored.train_batches(1, 32, device=dev)), reference)
    assert _same(list(stored.heldout_batches(40)), list(plain.heldout_batches(40)))
    stored.to_device(dev)
    assert _same(list(stored.train_batches(1, 32)), reference)
    assert _same(list(stored.heldout_batches(40)), list(plain.heldout_batches(40)))


def test_blocks_loaded_shared_equal_the_copied_ones():
    """RowBlocks.load(shared=True) (no copy of a one-chunk block) gives the same blocks, for blocks
    of one chunk, of several row chunks and of column chunks."""
    from pipeline.metrics import RowBlocks

    x = np.arange(600, dtype=np.float32).reshape(100, 6)
    for chunks, rows in (((20, 6), 20), ((20, 6), 40), ((25, 3), 50)):
        blocks = RowBlocks(da.from_array(x, chunks=chunks), x, block_rows=rows)
        for i in range(len(blocks)):
            assert all(np.array_equal(a, b) for a, b in zip(blocks.load(i, shared=True), blocks.load(i)))
