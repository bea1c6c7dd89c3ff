"""Stage `fuse@<variant>`: train the learned fuser (pipeline/fuser.py) with B frozen in the loop.

Writes data/fusers/<variant>/ and its record, data/details/ and data/metrics/fuse-<variant>.json,
together (pipeline.fusing)."""

from __future__ import annotations

from pipeline.config import Params

# params this stage reads, as dvc.yaml declares them (tests/test_imports.py checks): the task variant's
# items are evaluate.<fuse.task>'s, in evaluate.chat's prompt format
PARAMS = ("models", "corpus", "evaluate.chat", "evaluate.${fuse.task}", "fuse")


def run(params: Params, variant: str, force: bool = False, log=None):
    from pipeline.artifacts import layout
    from pipeline.fusing import fuse

    return fuse(variant, params.fuse, params.model_specs(), params.paths.cache_dir(), params.evaluate, params.corpus,
                layout(params), force=force, log=log)
