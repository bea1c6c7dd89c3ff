"""Reading a store's rows straight from its shard files (store.reader._ShardReader)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import UserError
from tests.test_store import _unit_arrays


def test_shard_files_read_directly_give_zarr_values_and_refuse_damage(tmp_path):
    """Rows read straight from the shard files (the streamed training's reader) equal zarr's read of
    every array, for slices, row lists and masks, a partial last shard and bf16 bits included; as
    dask arrays inside `stored_values` they are the stored values; a flipped byte in a chunk or in
    a shard's index is one line naming the array."""
    import dask

    from store.layout import StoreLayout, widen
    from store.reader import ActivationStore, _ShardReader, stored_values
    from store.writer import StoreWriter
    from tests.helpers import store_arrays

    layout = StoreLayout(np.full(300, 10), 128, [0], 8)  # 3 units of 2 inner chunks, the last 44 rows
    w = StoreWriter(tmp_path / "s.zarr", layout, "bfloat16", {"k": 1}, writers=1)
    w.create({})
    rng = np.random.default_rng(3)
    for span in layout.units:
        w.write_unit(span, _unit_arrays(layout, span, rng))
    w.close()
    w.finalize()
    store, reference = ActivationStore(w.path), store_arrays(w.path)
    for name, ref in reference.items():
        assert _ShardReader.of(store.path, name, store.array(name)) is not None, name
        n = len(ref)
        for rows in (slice(None), slice(5, 5), slice(3, n - 7), slice(n - 70, None), slice(1, n, 3),
                     rng.integers(0, n, 40), np.array([n - 1, 0, 5, 5, -1]), rng.random(n) > 0.5):
            got = store.read(name, rows)
            assert got.dtype == ref.dtype and np.array_equal(got, ref[rows]), (name, rows)
    x = store.dask("last", 0)[[7, 299, 3]]
    with stored_values():
        raw = dask.compute(x, scheduler="sync")[0]
    assert raw.dtype == np.uint16 and np.array_equal(widen(raw, "bfloat16"), x.compute())
    for where in ("chunk", "index"):
        shard = w.path / "last" / "L0" / "c" / "1" / "0"
        good = bytearray(shard.read_bytes())
        bad = bytearray(good)
        bad[100 if where == "chunk" else len(bad) - 10] ^= 0x10
        shard.write_bytes(bytes(bad))
        with pytest.raises(UserError) as e:
            store.read("last/L0", slice(0, 300))
        assert "\n" not in str(e.value) and "last/L0" in str(e.value) and "checksum" in str(e.value), e.value
        shard.write_bytes(bytes(good))
