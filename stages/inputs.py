"""Stage `inputs`: the content hashes of the local files params names (see pipeline/inputs.py).

DVC runs it on every `dvc repro` (always_changed): it rewrites data/inputs/<name>.json, byte for
byte the same unless an input's content changed, so only the stages reading a changed input rerun.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params

# params this stage reads, as dvc.yaml declares them (tests/test_imports.py checks): none, as it
# runs on every repro (always_changed) and hands what it reads on as data/inputs/*.json
PARAMS: tuple[str, ...] = ()


def run(params: Params) -> list[Path]:
    from pipeline.artifacts import Outputs, layout
    from pipeline.fitting import check_aligners
    from pipeline.inputs import HashCache, manifests

    check_aligners(params.fit)  # the first stage of every repro: a bad aligner entry stops it here

    hashes = HashCache(params.paths.cache_dir() / "input-hashes.json")
    where = layout(params)
    with Outputs() as out:  # all or none: a failed hash leaves the previous manifests
        written = [out.json(where.inputs(name), value, sort_keys=True)
                   for name, value in manifests(params, hashes).items()]
    hashes.save()
    return written
