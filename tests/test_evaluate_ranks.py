"""`xmodel evaluate TASK` under torchrun: the ranks share the generation batches and rank 0 writes
exactly what one process writes (CPU, 2 gloo ranks, tiny real models, float32)."""

from __future__ import annotations

import json

from tests.helpers import write_params, xmodel_process

TIMES = ("seconds", "wall")  # keys holding timings, which differ between any two runs


def untimed(value):
    """The record without its timings (and rates derived from them)."""
    if isinstance(value, dict):
        return {k: untimed(v) for k, v in value.items()
                if not any(t in k for t in TIMES) and not k.endswith("per_s") and "flop_s" not in k}
    if isinstance(value, list):
        return [untimed(v) for v in value]
    return value


def test_two_ranks_write_the_one_process_result(tmp_path, tiny_models):
    """A = B (so AC without an aligner and KV run), every reference and latent method, the
    mismatched and noise controls (which read other items' messages), nucleus sampling (seeded per
    item), 7 items in batches of 2 (4 batches: rank 0 runs 2, rank 1 runs 2, the last batch short)."""
    runs = {}
    for nproc in (1, 2):
        folder = tmp_path / f"p{nproc}"
        folder.mkdir()
        evaluate = {"tasks": ["squad"], "methods": ["b_alone", "a_alone", "nl", "ac", "kv", "skyline"],
                    "controls": ["mismatched", "noise"], "aligners": [], "batch_size": 2, "n_boot": 200,
                    "device": "cpu", "dtype": "float32", "layer_a": 2, "layer_b": 2,
                    "squad": {"n": 7, "max_new_tokens": 4, "sampling": "nucleus"}}
        params = write_params(folder, {"a": tiny_models["qwen"], "b": tiny_models["qwen"]}, evaluate=evaluate)
        done = xmodel_process(params, "evaluate", "squad", "--quiet", nproc=nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        data = folder / "data"
        runs[nproc] = {"predictions": (data / "evaluate" / "squad" / "predictions.jsonl").read_text(),
                       "samples": (data / "evaluate" / "squad" / "samples.jsonl").read_text(),
                       "details": json.loads((data / "details" / "evaluate-squad.json").read_text())}
    one, two = runs[1], runs[2]
    assert one["details"]["ranks"] == 1 and two["details"]["ranks"] == 2
    assert len(one["predictions"].splitlines()) == 7
    assert {"ac_replace~mismatched", "kv_all~noise"} <= set(one["details"]["methods"])
    assert two["predictions"] == one["predictions"] and two["samples"] == one["samples"]  # the table has timings
    assert untimed(two["details"]) == {**untimed(one["details"]), "ranks": 2}


def test_the_probe_and_the_sweep_refuse_torchrun_in_one_line(tmp_path, tiny_models):
    params = write_params(tmp_path, {"a": tiny_models["qwen"], "b": tiny_models["qwen"]},
                          evaluate={"aligners": [], "device": "cpu", "dtype": "float32"})
    done = xmodel_process(params, "evaluate", "sweep", "--quiet", nproc=2)
    assert done.returncode != 0
    assert "error: evaluate sweep runs in one process: run it without torchrun" in done.stderr
    assert not (tmp_path / "data" / "details").exists()
