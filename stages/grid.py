"""Stage `grid`: raw similarity of every stored layer pair, and each fitted aligner's held-out scores."""

from __future__ import annotations

from pathlib import Path

from pipeline.config import Params


def metrics_path(params: Params) -> Path:
    return params.paths.metrics("grid")


def plot_path(params: Params) -> Path:
    return Path(params.paths.data) / "plots" / "cka.png"


def run(params: Params, warn=None) -> dict:
    from pipeline.grid import heatmap, layer_grid
    from stages.fit import write_metrics

    result = layer_grid(params, warn=warn)
    write_metrics(metrics_path(params), result)
    heatmap(result, plot_path(params))
    return result
