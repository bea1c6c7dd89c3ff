"""Stage `report`: one Markdown report (and HTML when a renderer is installed) of what the stages wrote.

Reads params (paths.data, fit.aligners and the facts it prints) and the files under data/; writes
data/report/report.md (+ report.html). Loads no model: see pipeline/report.py.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params

# params this stage reads, as dvc.yaml declares them (tests/test_imports.py checks): the facts it
# prints and the fingerprint of every section
PARAMS = ("models", "corpus", "extract", "fit", "grid", "evaluate")


def run(params: Params) -> dict[str, Path]:
    from pipeline.report import config_from_params, write_report

    return write_report(config_from_params(params))
