"""Store robustness: multi-rank equality, resume after SIGKILL, verify, refusing foreign stores."""

from __future__ import annotations

import json
import signal

import pytest

from pipeline.config import load_params
from pipeline.extract import run_extract
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
