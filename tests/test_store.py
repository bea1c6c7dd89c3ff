"""Store robustness: multi-rank equality, resume after SIGKILL, verify, refusing foreign stores."""

from __future__ import annotations

import json
import signal

import numpy as np
import pytest

from pipeline.config import load_params
from pipeline.errors import UserError
from stages.extract import run as run_extract
from store.verify import verify_store
from tests.helpers import assert_same_store, run_cli, write_params, xmodel_process

@pytest.fixture
def params_file(tmp_path, tiny_models):
    return write_params(tmp_path, {"a": tiny_models["llama"], "b": tiny_models["qwen"]},
                        corpus={"n": 80}, extract={"unit_size": 8})


def test_two_rank_torchrun_equals_one_process(tmp_path, params_file):
    one = xmodel_process(params_file, "extract", "--model", "b", "--quiet", "--out", str(tmp_path / "one.zarr"))
    assert one.returncode == 0, one.stderr
    two = xmodel_process(params_file, "extract", "--model", "b", "--quiet", "--out", str(tmp_path / "two.zarr"), nproc=2)
    assert two.returncode == 0, two.stderr
    markers = [json.loads(p.read_text()) for p in (tmp_path / "two.zarr" / "_units").glob("*.json")]
    assert len(markers) == 10
    assert_same_store(tmp_path / "one.zarr", tmp_path / "two.zarr")


def test_sigkill_mid_unit_then_rerun_equals_uninterrupted(tmp_path, params_file):
    ref = xmodel_process(params_file, "extract", "--model", "a", "--quiet", "--out", str(tmp_path / "ref.zarr"))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "killed.zarr"
    # 11 arrays per unit (5 index arrays + 3 layers x pooled/last/tokens... minus none): 25 falls inside unit 2
    killed = xmodel_process(params_file, "extract", "--model", "a", "--quiet", "--out", str(out),
                     env={"XMODEL_FAULT": "kill_after_shards:25"})
    assert killed.returncode == -signal.SIGKILL
    done = sorted(p.name for p in (out / "_units").glob("*.json"))
    assert 0 < len(done) < 10  # interrupted part way
    assert not json.loads((out / "zarr.json").read_text())["attributes"]["complete"]
    # the unit torn by the kill has some shards on disk but no marker: it must not count as done
    torn = f"u{len(done):06d}.json"
    assert torn not in done and (out / "pooled" / "L0" / "c" / str(len(done)) / "0").exists()
    rerun = xmodel_process(params_file, "extract", "--model", "a", "--quiet", "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(tmp_path / "ref.zarr", out)
    assert verify_store(out) == []


def test_injected_io_error_keeps_earlier_units_and_rerun_completes(tmp_path, params_file, capsys):
    out = tmp_path / "s.zarr"
    failed = xmodel_process(params_file, "extract", "--model", "a", "--quiet", "--out", str(out),
                     env={"XMODEL_FAULT": "ioerror_after_shards:30"})
    assert failed.returncode == 2 and failed.stderr.count("\n") == 1, failed.stderr
    assert failed.stderr.startswith("error: writing unit") and "No space left on device" in failed.stderr
    assert len(list((out / "_units").glob("*.json"))) >= 1
    rerun = xmodel_process(params_file, "extract", "--model", "a", "--quiet", "--out", str(out))
    assert rerun.returncode == 0, rerun.stderr
    assert verify_store(out) == []


def test_rerun_of_complete_store_does_nothing(tmp_path, params_file, capsys):
    params = load_params(params_file)
    first = run_extract(params, "a", quiet=True)
    stamp = {p: p.stat().st_mtime_ns for p in first.path.rglob("*") if p.is_file()}
    again = run_extract(params, "a", quiet=True)
    assert again.status == "complete"
    assert stamp == {p: p.stat().st_mtime_ns for p in first.path.rglob("*") if p.is_file()}


def test_store_from_other_params_is_refused_without_force(tmp_path, params_file, capsys):
    params = load_params(params_file)
    path = run_extract(params, "a", quiet=True).path
    capsys.readouterr()
    before = {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "--params", str(params_file), "-S", "extract.max_tokens=16",
                           "extract", "--model", "a", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "--force" in err and "max_tokens" in err
    assert before == {p: p.read_bytes() for p in path.rglob("*") if p.is_file()}
    code, _, err = run_cli(capsys, "--params", str(params_file), "-S", f"models.a={params.models['b']}",
                           "extract", "--model", "a", "--quiet")
    assert code == 2 and "model_id" in err and "--force" in err
    code, _, err = run_cli(capsys, "--params", str(params_file), "-S", "extract.max_tokens=16",
                           "extract", "--model", "a", "--quiet", "--force")
    assert code == 0, err
    assert load_params(params_file, {"extract.max_tokens": 16}) and verify_store(path) == []


def test_verify_finds_flipped_byte_and_deleted_shard(tmp_path, params_file, capsys):
    path = run_extract(load_params(params_file), "a", quiet=True).path
    code, out, _ = run_cli(capsys, "store", "verify", str(path))
    assert code == 0 and "ok" in out
    shard = path / "last" / "L2" / "c" / "3" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x10
    shard.write_bytes(bytes(data))
    (path / "tokens" / "L0" / "c" / "1" / "0").unlink()
    code, _, err = run_cli(capsys, "store", "verify", str(path))
    assert code == 1
    assert "last/L2 shard 3 (unit 3)" in err
    assert "tokens/L0 shard 1" in err and "missing" in err


def test_store_info_lists_arrays(tmp_path, params_file, capsys):
    path = run_extract(load_params(params_file), "a", quiet=True).path
    code, out, _ = run_cli(capsys, "store", "info", str(path))
    assert code == 0
    for name in ("pooled/L0", "last/L3", "tokens/L2", "token_ids", "char_end", "text_index", "seq_start"):
        assert name in out
    assert "80 sequences" in out and "complete" in out


@pytest.mark.parametrize("override, expected", [
    ("models.a=no-such-model", "no-such-model"),
    ("extract.layers=[0, 7]", "layer 7 is out of range"),
    ("extract.layers=[1.5]", "relative depth 1.5"),
    ("corpus.min_chars=100000", "no text of"),
    ("extract.max_tokens=100000", "exceeds the model's context"),
    ("extract.unit_size=0", "extract.unit_size = 0"),
    ("extract.dtype=float8", "extract.dtype = 'float8'"),
    ("extract.max_tokens=1", "extract.max_tokens = 1 keeps only special tokens"),  # tiny-llama prepends BOS
    ("corpus.n=true", "corpus.n = true is a boolean"),
])
def test_bad_input_one_line_nonzero_nothing_written(tmp_path, params_file, capsys, override, expected):
    code, _, err = run_cli(capsys, "--params", str(params_file), "-S", override, "extract", "--model", "a", "--quiet")
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "data" / "stores" / "a.zarr").exists()


def test_empty_corpus_file(tmp_path, params_file, capsys):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("\n\n")
    code, _, err = run_cli(capsys, "--params", str(params_file), "-S", f"corpus.source={corpus}", "extract", "--model", "a")
    assert code == 2 and "empty.txt" in err and err.count("\n") == 1


# -- what --force may replace (issue 12, item 1) ----------------------------------------------------

def _tree(path):
    """Every file under path and its bytes (lock files beside a store aside: they hold no data)."""
    return {p: p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file() and ".lock" not in p.name}


@pytest.mark.parametrize("case", ["user folder", "sub-group of a store", "cwd", "parent of cwd", "creating leftover"])
def test_force_replaces_only_a_store_xmodel_made(tmp_path, params_file, case):
    """--force (and the cleanup of `*.creating`) never removes a folder xmodel cannot recognise as a
    store of its own, nor the current directory or a folder containing it: one line, exit 2."""
    good = tmp_path / "good.zarr"
    assert xmodel_process(params_file, "extract", "--model", "a", "--quiet", "--out", str(good)).returncode == 0
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("precious")
    out = {"user folder": user, "sub-group of a store": good / "last", "cwd": ".", "parent of cwd": "..",
           "creating leftover": tmp_path / "new.zarr"}[case]
    if case == "creating leftover":
        user.rename(tmp_path / "new.zarr.creating")  # a user's folder that happens to bear the name
    before = _tree(tmp_path)
    run = xmodel_process(params_file, "extract", "--model", "a", "--quiet", "--force", "--out", str(out))
    assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, run.stderr
    assert _tree(tmp_path) == before
    assert verify_store(good) == []


# -- damaged stores (issue 12, item 3) -------------------------------------------------------------

def _follow_hint(capsys, params_file, message):
    """Run the `xmodel extract ...` command an error message tells the user to run."""
    hint = message.split("`xmodel ", 1)[1].split("`", 1)[0].split()
    return run_cli(capsys, "--params", str(params_file), *hint)


@pytest.mark.parametrize("damage", ["deleted shard", "flipped byte"])
def test_damaged_store_is_refused_and_its_hint_repairs_it(tmp_path, params_file, capsys, damage):
    """A store missing a shard file (or with a chunk failing its checksum) never reads as zeros:
    opening (or reading) it is one line naming the file and a command; that command, which is
    also what DVC's extract stage runs (--force), rewrites the damaged unit bit-identically."""
    from store.reader import ActivationStore
    from tests.helpers import store_arrays

    path = run_extract(load_params(params_file), "a", quiet=True).path
    reference = store_arrays(path)
    already_open = ActivationStore(path)
    shard = path / "last" / "L2" / "c" / "3" / "0"
    if damage == "deleted shard":
        shard.unlink()
    else:
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x10
        shard.write_bytes(bytes(data))
    with pytest.raises(UserError) as read_error:  # a store opened before the damage: the read itself refuses
        already_open.numpy("last", 2)
    if damage == "deleted shard":
        with pytest.raises(UserError) as open_error:
            ActivationStore(path)
        message = str(open_error.value)
        assert "shard 3 (unit 3): shard file missing" in message
    else:
        message = str(read_error.value)
    assert "\n" not in message and "last/L2" in message and "--force" in message, message
    code, _, err = run_cli(capsys, "store", "verify", str(path))
    assert code == 1 and "--force" in err
    code, _, err = _follow_hint(capsys, params_file, message)
    assert code == 0, err
    assert verify_store(path) == []
    repaired = store_arrays(path)
    assert all(np.array_equal(reference[k], repaired[k]) for k in reference)
    assert ActivationStore(path).numpy("last", 2).any()


def test_fit_refuses_a_store_with_a_deleted_shard(tmp_path, params_file, capsys):
    params = load_params(params_file)
    for role in "ab":
        run_extract(params, role, quiet=True)
    (tmp_path / "data" / "stores" / "b.zarr" / "pooled" / "L2" / "c" / "0" / "0").unlink()
    capsys.readouterr()
    fit = ("--params", str(params_file), "-S", "fit.layers=[0.5, 0.5]", "fit", "procrustes", "--quiet")
    code, _, err = run_cli(capsys, *fit)
    assert code == 2 and err.count("\n") == 1 and "b.zarr" in err and "shard file missing" in err, err
    assert not (tmp_path / "data" / "aligners" / "procrustes").exists()
    assert _follow_hint(capsys, params_file, err)[0] == 0
    code, _, err = run_cli(capsys, *fit)
    assert code == 0, err


# -- two writers (issue 12, item 5) ----------------------------------------------------------------

def test_second_writer_exits_naming_the_holder(tmp_path, params_file, capsys):
    import os

    from pipeline.artifacts import exclusive

    out = tmp_path / "s.zarr"
    with exclusive(tmp_path / ".s.zarr.lock", out):  # what a running `xmodel extract --out s.zarr` holds
        code, _, err = run_cli(capsys, "--params", str(params_file), "extract", "--model", "a", "--quiet",
                               "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and f"pid {os.getpid()}" in err and "s.zarr" in err, err
    assert not out.exists()
    assert run_cli(capsys, "--params", str(params_file), "extract", "--model", "a", "--quiet", "--out", str(out))[0] == 0


# -- outside readers (issue 13, item 5) ------------------------------------------------------------

def test_xarray_opens_every_group_with_named_dimensions(tmp_path, tiny_models):
    xr = pytest.importorskip("xarray")
    from store.reader import ActivationStore

    params = load_params(write_params(tmp_path, {"a": tiny_models["llama"]}, extract={"dtype": "bfloat16"}))
    path = run_extract(params, "a", quiet=True).path
    store = ActivationStore(path)
    root = xr.open_zarr(path)
    assert root["token_ids"].dims == ("token",) and root["text_index"].dims == ("seq",)
    np.testing.assert_array_equal(root["token_ids"].values, store.read("token_ids"))
    for kind in ("pooled", "last", "tokens"):
        group = xr.open_zarr(path, group=kind)
        var = group["L3"]
        assert var.dims == ("token" if kind == "tokens" else "seq", "hidden")
        assert var.attrs["value_dtype"] == ("float32" if kind == "pooled" else "bfloat16")
    bits = xr.open_zarr(path, group="last")["L3"].values
    assert bits.dtype == np.uint16
    np.testing.assert_array_equal((bits.astype(np.uint32) << 16).view(np.float32), store.numpy("last", 3))


def test_a_store_without_per_token_rows_opens_and_verifies(tmp_path, tiny_models):
    """tokens_per_seq = 0 makes seq_start and seq_len all zero: zarr writes no file for a shard that
    holds only the fill value, so the fill values are ones no written value takes, and such a store
    is not taken for one with deleted shards."""
    from store.reader import ActivationStore

    params = load_params(write_params(tmp_path, {"a": tiny_models["llama"]}, corpus={"n": 20}, extract={"tokens_per_seq": 0}))
    path = run_extract(params, "a", quiet=True).path
    store = ActivationStore(path)
    assert not store.read("seq_len").any() and verify_store(path) == []


def _unit_arrays(layout, span, rng):
    """Every array of one unit, random values of the store's dtypes (bf16 kept as uint16 bits)."""
    lo, hi = span.seq
    t = span.tok[1] - span.tok[0]
    out = {"seq_start": layout.seq_start[lo:hi], "seq_len": layout.seq_len[lo:hi],
           "text_index": np.arange(lo, hi, dtype=np.int64), "token_ids": rng.integers(0, 99, t).astype(np.int32),
           "char_end": rng.integers(1, 999, t).astype(np.int32)}
    for layer in layout.layers:
        out[f"pooled/L{layer}"] = rng.standard_normal((hi - lo, layout.width), dtype=np.float32)
        out[f"last/L{layer}"] = rng.integers(0, 0x7F00, (hi - lo, layout.width)).astype(np.uint16)
        out[f"tokens/L{layer}"] = rng.integers(0, 0x7F00, (t, layout.width)).astype(np.uint16)
    return out


@pytest.mark.parametrize("how", ["threads", "processes"])
def test_parallel_shard_writers_write_the_one_writer_bytes(tmp_path, monkeypatch, how):
    """Units whose token arrays span several shards, written by 3 threads (as once the compute loop
    has ended: `alone`) or 3 worker processes, give the same files byte for byte as one writer; an
    I/O error mid-unit leaves that unit unmarked (a rerun rewrites it)."""
    from store import writer as store_writer
    from store.layout import StoreLayout
    from store.writer import StoreWriter

    if how == "processes":
        monkeypatch.setattr(store_writer, "PROCESS_MIN_BYTES", 0)
    layout = StoreLayout(np.full(16, 700), 8, [0, 3], 24)  # 5600 token rows a unit: 3 token shards each
    assert all((u.tok[1] - u.tok[0]) // layout.token_shard == 3 for u in layout.units)
    files = {}
    for writers in (1, 3):
        w = StoreWriter(tmp_path / f"w{writers}.zarr", layout, "bfloat16", {"k": 1}, writers=writers)
        w.create({})
        rng = np.random.default_rng(7)
        for span in layout.units:
            w.write_unit(span, _unit_arrays(layout, span, rng), alone=how == "threads")
        assert (w._pool is not None) == (how == "processes" and writers > 1)
        w.close()
        w.finalize()
        files[writers] = {str(p.relative_to(w.path)): p.read_bytes() for p in sorted(w.path.rglob("*")) if p.is_file()}
    assert len(files[1]) > 30 and files[1] == files[3]
    assert verify_store(tmp_path / "w3.zarr") == []

    seen = []

    def fail_second_shard(what):
        if what == "shards" and len(seen) == 2:
            raise OSError(28, "No space left on device")
        seen.append(what)

    w = StoreWriter(tmp_path / "f.zarr", layout, "bfloat16", {"k": 1}, on_write=fail_second_shard, writers=3)
    w.create({})
    with pytest.raises(UserError, match="writing unit 0 .*No space left"):
        w.write_unit(layout.units[0], _unit_arrays(layout, layout.units[0], np.random.default_rng(7)), alone=how == "threads")
    w.close()
    assert w.pending_units(0, 1) == layout.units


# -- every damage `verify` reports has a repair that works (issues 22 and 23, item 5) ---------------

def _damage(path, damage):
    if damage == "missing marker":
        (path / "_units" / "u000001.json").unlink()
    elif damage == "missing shard":
        (path / "tokens" / "L0" / "c" / "1" / "0").unlink()
    elif damage == "bad checksum":
        shard = path / "last" / "L2" / "c" / "3" / "0"
        data = bytearray(shard.read_bytes())
        data[len(data) // 3] ^= 0x10
        shard.write_bytes(bytes(data))
    elif damage == "bad metadata":
        (path / "pooled" / "L2" / "zarr.json").write_text("{not json")


@pytest.mark.parametrize("damage", ["missing marker", "missing shard", "bad checksum", "bad metadata"])
def test_the_hint_of_every_damage_verify_reports_repairs_the_store(tmp_path, params_file, capsys, damage):
    """`store verify` names each problem and a command; running that command (a rerun of the
    extraction with --force) leaves a store that verifies, bit-identical to the original."""
    from tests.helpers import store_arrays

    path = run_extract(load_params(params_file), "a", quiet=True).path
    reference = store_arrays(path)
    _damage(path, damage)
    capsys.readouterr()
    code, _, err = run_cli(capsys, "store", "verify", str(path))
    assert code == 1 and "Traceback" not in err and "`xmodel extract" in err, err
    hints = {line.split("`xmodel ", 1)[1].split("`", 1)[0] for line in err.splitlines() if "`xmodel " in line}
    assert len(hints) == 1, hints  # one command repairs it all
    code, _, err = _follow_hint(capsys, params_file, err)
    assert code == 0, err
    assert verify_store(path) == []
    repaired = store_arrays(path)
    assert sorted(repaired) == sorted(reference) and all(np.array_equal(reference[k], repaired[k]) for k in reference)


def test_a_lost_marker_is_rewritten_by_a_plain_rerun_and_fit_then_accepts_the_store(tmp_path, params_file, capsys):
    params = load_params(params_file)
    path = run_extract(params, "a", quiet=True).path
    (path / "_units" / "u000001.json").unlink()
    again = run_extract(params, "a", quiet=True)
    assert again.status == "written" and again.units == 1  # not "already complete"
    assert verify_store(path) == []


def test_a_complete_flag_set_by_hand_is_one_line_everywhere_and_extract_finishes_the_store(
        tmp_path, params_file, capsys, monkeypatch):
    from collections import Counter

    import pipeline.faults

    params = load_params(params_file)
    monkeypatch.setattr(pipeline.faults, "_passed", Counter())
    monkeypatch.setenv("XMODEL_FAULT", "ioerror_after_shards:30")
    with pytest.raises(UserError, match="No space left"):
        run_extract(params, "a", quiet=True)
    monkeypatch.delenv("XMODEL_FAULT")
    run_extract(params, "b", quiet=True)
    path = params.paths.store("a")
    meta = json.loads((path / "zarr.json").read_text())
    meta["attributes"]["complete"] = True  # by hand: units are missing, metadata was never consolidated
    (path / "zarr.json").write_text(json.dumps(meta))
    capsys.readouterr()  # each below would raise (a traceback) before
    code, _, err = run_cli(capsys, "store", "verify", str(path))
    assert code == 1 and "not written" in err, err
    code, out, err = run_cli(capsys, "store", "info", str(path))
    assert code == 0 and "pooled/L0" in out, err
    code, _, err = run_cli(capsys, "--params", str(params_file), "-S", "fit.layers=[0.5, 0.5]", "fit", "procrustes", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "not written" in err, err
    code, _, err = run_cli(capsys, "--params", str(params_file), "extract", "--model", "a", "--quiet")
    assert code == 0, err
    assert verify_store(path) == []


@pytest.mark.parametrize("why", ["other inputs", "damaged beyond its units"])
def test_force_never_deletes_files_xmodel_did_not_write_inside_a_store(tmp_path, params_file, capsys, why):
    path = run_extract(load_params(params_file), "a", quiet=True).path
    (path / "last" / "my-notes.txt").write_text("precious")
    override = ["-S", "extract.max_tokens=16"] if why == "other inputs" else []
    if why == "damaged beyond its units":
        (path / "pooled" / "L2" / "zarr.json").unlink()
    before = _tree(path)
    code, _, err = run_cli(capsys, "--params", str(params_file), *override, "extract", "--model", "a", "--quiet", "--force")
    assert code == 2 and err.count("\n") == 1 and "my-notes.txt" in err, err
    assert _tree(path) == before


def test_a_checksum_mismatch_read_while_pairing_is_one_line(tmp_path, params_file):
    from pipeline.pairing import pair_rows
    from store.reader import ActivationStore

    params = load_params(params_file)
    a, b = (run_extract(params, role, quiet=True).path for role in "ab")
    for name in ("text_index", "char_end"):
        shard = b / name / "c" / "0"
        good = shard.read_bytes()
        data = bytearray(good)
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
        with pytest.raises(UserError) as e:
            pair_rows(ActivationStore(a), ActivationStore(b), "tokens")
        assert "\n" not in str(e.value) and name in str(e.value) and "--force" in str(e.value), e.value
        shard.write_bytes(good)


def test_a_store_replaced_under_a_reader_is_named_as_replaced(tmp_path, params_file):
    from store.reader import ActivationStore

    params = load_params(params_file)
    path = run_extract(params, "a", quiet=True).path
    other = run_extract(params, "a", out=tmp_path / "other.zarr", quiet=True).path
    store = ActivationStore(path)
    store.numpy("last", 2)
    path.rename(tmp_path / "moved.zarr")
    other.rename(path)  # what a `cp -r` or another tool's swap does under a running fit
    with pytest.raises(UserError, match="replaced while this run was reading it") as e:
        store.numpy("last", 2)
    assert "damaged" not in str(e.value)


def test_extract_force_waits_for_no_reader_of_the_store(tmp_path, params_file, capsys):
    """A running fit or grid holds the readers' side of a store's lock: `extract --force` (which
    would replace the store under it) is refused at once, and so is a fit while extract writes."""
    from pipeline.artifacts import exclusive, shared, store_lock

    params = load_params(params_file)
    path = run_extract(params, "a", quiet=True).path
    capsys.readouterr()
    before = _tree(path)
    with shared(store_lock(path), path):  # what a running fit holds
        code, _, err = run_cli(capsys, "--params", str(params_file), "-S", "extract.max_tokens=16",
                               "extract", "--model", "a", "--quiet", "--force")
    assert code == 2 and err.count("\n") == 1 and "being read" in err, err
    assert _tree(path) == before
    with exclusive(store_lock(path), path):  # what a running extract holds
        code, _, err = run_cli(capsys, "--params", str(params_file), "fit", "procrustes", "--quiet")
    assert code == 2 and err.count("\n") == 1 and "being written by pid" in err, err
