"""Stage `fuse@<variant>`: train the learned fuser (pipeline/fuser.py) with B frozen in the loop.

Writes data/fusers/<variant>/ and its record, data/details/ and data/metrics/fuse-<variant>.json,
together (pipeline.fusing)."""

from __future__ import annotations

from pipeline.config import Params


def run(params: Params, variant: str, force: bool = False, log=None):
    from pipeline.fusing import fuse

    return fuse(params, variant, force=force, log=log)
