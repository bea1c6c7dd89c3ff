"""Stage `grid`: raw similarity of every stored layer pair, and each fitted aligner's held-out scores.

Writes data/details/grid.json (every layer pair, every aligner), data/metrics/grid.json (its headline:
pipeline/headlines.py) and data/plots/cka.png together, or none of them (pipeline.artifacts)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params

# params this stage reads, as dvc.yaml declares them (tests/test_imports.py checks): fit.aligners
# names the aligners it scores
PARAMS = ("grid", "fit.aligners", "fit.heldout_frac", "fit.seed", "fit.pairwise_rows", "fit.temperature")


def metrics_path(params: Params) -> Path:
    return params.paths.metrics("grid")


def plot_path(params: Params) -> Path:
    from pipeline.artifacts import layout

    return layout(params).plot("cka")


def run(params: Params, warn=None) -> dict:
    from pipeline.artifacts import Outputs, layout, write_record
    from pipeline.grid import heatmap, layer_grid
    from pipeline.headlines import grid

    paths = layout(params)
    result = layer_grid(params.grid, params.fit, paths.stores, paths, warn=warn)
    with Outputs():
        write_record(paths, "grid", result, grid)  # joins the block's outputs
        heatmap(result, plot_path(params))
    return result
