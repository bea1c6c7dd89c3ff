"""Stage `grid`: raw similarity of every stored layer pair, and each fitted aligner's held-out scores.

Writes data/metrics/grid.json and data/plots/cka.png together, or neither (pipeline.artifacts)."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params


def metrics_path(params: Params) -> Path:
    return params.paths.metrics("grid")


def plot_path(params: Params) -> Path:
    from pipeline.artifacts import layout

    return layout(params).plot("cka")


def run(params: Params, warn=None) -> dict:
    from pipeline.artifacts import Outputs
    from pipeline.grid import heatmap, layer_grid

    result = layer_grid(params, warn=warn)
    with Outputs() as out:
        out.json(metrics_path(params), result)
        heatmap(result, plot_path(params))  # joins `out`
    return result
