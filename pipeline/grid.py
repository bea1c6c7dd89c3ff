"""The layer grid: raw similarity (debiased linear CKA, mutual k-NN) of every stored layer of A
with every stored layer of B on the held-out texts, plus each fitted aligner's held-out scores at
its own layer pair. Sequence rows only (pooled or last): one row per text, so k-NN is over texts.

The raw metrics use the first `fit.pairwise_rows` held-out rows of every layer, loaded once, and
each layer's neighbour lists are computed once for all pairs it is in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from pipeline.config import FitConfig, GridConfig
from pipeline.errors import UserError


def layer_grid(cfg: GridConfig, fit: FitConfig, stores: tuple[Path, Path], paths: Any,
               warn: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The grid of the stores `stores` (A's, B's) on fit's held-out split (fit.seed, fit.heldout_frac,
    its first fit.pairwise_rows rows), with the held-out scores of the aligners fit.aligners names,
    read from where `paths` (a pipeline.artifacts.Layout) places them."""
    from contextlib import ExitStack

    from pipeline.fitting import read_stores

    with ExitStack() as held:  # the readers' side of both stores' locks, for the whole grid
        return _grid(cfg, fit, paths, *read_stores(stores, held), warn)


def _grid(cfg: GridConfig, fit: FitConfig, paths: Any, a, b, warn: Callable[[str], None] | None) -> dict[str, Any]:
    from pipeline import metrics as M
    from pipeline.fitting import split_pairs

    kind = cfg.kind
    _, held = split_pairs(a, b, kind, fit.seed, fit.heldout_frac)
    rows = held.subset(slice(0, fit.pairwise_rows))
    xa = {la: a.numpy(kind, la, rows.rows_a) for la in a.layers}
    xb = {lb: b.numpy(kind, lb, rows.rows_b) for lb in b.layers}
    k = min(cfg.knn_k, len(rows) - 1)  # a tiny held-out set cannot have k neighbours
    if k < 1 or len(rows) < 4:
        raise UserError(f"{len(rows)} held-out texts are too few for the grid (CKA needs 4): raise corpus.n or fit.heldout_frac")
    knn_a = {la: M.knn_indices(x, k) for la, x in xa.items()}
    knn_b = {lb: M.knn_indices(x, k) for lb, x in xb.items()}
    return {
        "activation_kind": kind, "rows": len(rows), "knn_k": k,
        "models": {"a": a.identity.get("model_id"), "b": b.identity.get("model_id")},
        "layers_a": a.layers, "layers_b": b.layers,
        "depth_a": [round(la / a.attrs["num_layers"], 3) for la in a.layers],
        "depth_b": [round(lb / b.attrs["num_layers"], 3) for lb in b.layers],
        "cka": {f"a{la}": {f"b{lb}": M.cka(xa[la], xb[lb]) for lb in b.layers} for la in a.layers},
        "mutual_knn": {f"a{la}": {f"b{lb}": M.knn_overlap(knn_a[la], knn_b[lb]) for lb in b.layers} for la in a.layers},
        "aligners": fitted_aligner_scores(fit, paths, a, b, warn or (lambda message: None)),
    }


def fitted_aligner_scores(fit: FitConfig, paths: Any, a, b, warn: Callable[[str], None]) -> dict[str, Any]:
    """Held-out scores of the aligners fit.aligners names (in their folders under `paths`, a
    pipeline.artifacts.Layout), fitted on these stores and split."""
    from pipeline.artifacts import aligner_lock, recover, shared
    from pipeline.fitting import Paired, heldout_metrics

    out = {}
    stores = {"a": a.attrs.get("params_hash"), "b": b.attrs.get("params_hash")}
    split = {"seed": fit.seed, "heldout_frac": fit.heldout_frac}
    for name in sorted(fit.aligners):  # the grid stage's declared deps
        directory = paths.aligner(name)
        with shared(aligner_lock(directory), directory):  # a fit writing it refuses the grid at once
            recover(directory)  # a fit killed mid-commit is finished first
            aligner = _saved_aligner(directory, name, warn)
        if aligner is None:
            continue
        inputs = aligner.meta.get("inputs", {})
        if inputs.get("stores") != stores or inputs.get("split") != split:
            warn(f"grid: skipped {directory}: fitted on other stores or another held-out split (refit it)")
            continue
        kind, layers = inputs["activation_kind"], inputs["layers"]
        paired = Paired.build(a, b, kind, layers["a"], layers["b"], fit.seed, fit.heldout_frac)
        scores = heldout_metrics(aligner, *paired.arrays(paired.heldout), fit.pairwise_rows, fit.temperature)
        out[directory.name] = {**paired.describe(), **scores}
    return out


def _saved_aligner(directory: Path, name: str, warn: Callable[[str], None]):
    """The aligner saved in `directory`, or None (and a warning) if there is none or it cannot be read."""
    from pipeline.aligners.registry import load_aligner

    if not (directory / "aligner.json").exists():
        warn(f"grid: no fitted aligner in {directory}: run `xmodel fit {name}`")
        return None
    try:
        return load_aligner(directory, trust=name)  # params name it: its module may be imported
    except UserError as e:
        warn(f"grid: skipped {directory}: {e}")
        return None


def cka_matrix(result: dict[str, Any]) -> np.ndarray:
    """CKA as a (len(layers_a), len(layers_b)) array (NaN where undefined)."""
    cka = result["cka"]
    return np.array([[np.nan if cka[f"a{la}"][f"b{lb}"] is None else cka[f"a{la}"][f"b{lb}"]
                      for lb in result["layers_b"]] for la in result["layers_a"]], dtype=float)


def heatmap(result: dict[str, Any], path: Path) -> Path:
    """A PNG heatmap of CKA over A layers (rows) × B layers (columns), values written in the cells."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from pipeline.artifacts import save_figure

    m = cka_matrix(result)
    la, lb = result["layers_a"], result["layers_b"]
    fig = Figure(figsize=(2.0 + 0.9 * len(lb), 1.6 + 0.6 * len(la)))
    FigureCanvasAgg(fig)  # Agg canvas attached to this figure only: no global backend switch
    ax = fig.add_subplot()
    image = ax.imshow(m, origin="lower", cmap="viridis", vmin=min(0.0, float(np.nanmin(m, initial=0.0))), vmax=1.0,
                      aspect="auto")
    for i in range(len(la)):
        for j in range(len(lb)):
            if np.isfinite(m[i, j]):
                ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if m[i, j] > 0.6 else "white")
    ax.set_xticks(range(len(lb)), [str(x) for x in lb])
    ax.set_yticks(range(len(la)), [str(x) for x in la])
    models = result.get("models", {})
    ax.set_xlabel(f"B layer ({models.get('b')})")
    ax.set_ylabel(f"A layer ({models.get('a')})")
    ax.set_title(f"debiased linear CKA, {result['activation_kind']} states, {result['rows']} held-out texts", fontsize=9)
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path, dpi=120, bbox_inches="tight")
