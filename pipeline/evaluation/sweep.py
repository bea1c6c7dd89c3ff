"""The (k, j) layer sweep of plain AC on a small subset, drawn as a heatmap (the paper's Fig. 2)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.encoding import encode
from pipeline.evaluation.diagnostics import skyline_closeness
from pipeline.evaluation.methods.base import score_all as _score_all
from pipeline.evaluation.pair import Pair
from pipeline.generation import Decoding, generate
from pipeline.injection import communicate, sender_states
from pipeline.tasks.base import TaskPrompts


def layer_sweep(pair: Pair, prompts: TaskPrompts, decoding: Decoding, layers_a: Sequence[int], layers_b: Sequence[int],
                mode: str = "replace", batch_size: int = 16, chat: bool = True,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Plain AC (no aligner; the last-min(d_A, d_B)-coordinates rule) for every (k, j) in the grid,
    on the same items, with B alone and the skyline for reference. A's states are computed once per
    k and reused across every j. Grids (rows k, columns j) of every score of the task and of the
    first-token agreement with the skyline (and the KL to it), when the task has a skyline."""
    log = log or (lambda s: None)
    n = len(prompts.ids)
    seeds = list(range(n))
    enc_a = [encode(pair.tok_a, t, chat, prompts.cue) for t in prompts.a]
    enc_b = [encode(pair.tok_b, t, chat, prompts.cue) for t in prompts.b]
    sky_logits, reference = None, {}
    if prompts.skyline is not None:
        sky = generate(pair.model_b, pair.tok_b, [encode(pair.tok_b, t, chat, prompts.cue) for t in prompts.skyline],
                       decoding, batch_size=batch_size, seeds=seeds, keep_first_logits=True)
        sky_logits = sky.first_logits
        reference["skyline"] = _means(_score_all(prompts, sky.texts))
    base = generate(pair.model_b, pair.tok_b, enc_b, decoding, batch_size=batch_size, seeds=seeds,
                    keep_first_logits=sky_logits is not None)
    reference["b_alone"] = _means(_score_all(prompts, base.texts), skyline_closeness(base.first_logits, sky_logits))
    keys = list(reference["b_alone"])
    grids = {key: [[math.nan] * len(layers_b) for _ in layers_a] for key in keys}
    for r, k in enumerate(layers_a):
        sent = sender_states(pair.model_a, pair.tok_a, enc_a, k, batch_size=batch_size)
        for c, j in enumerate(layers_b):
            gen = communicate(pair.model_b, pair.tok_b, enc_b, j, sent.vectors, mode, decoding,
                              batch_size=batch_size, seeds=seeds, keep_first_logits=sky_logits is not None)
            cell = _means(_score_all(prompts, gen.texts), skyline_closeness(gen.first_logits, sky_logits))
            for key in keys:
                grids[key][r][c] = cell[key]
            log(f"k={k} j={j}: " + ", ".join(f"{key} {v:.3f}" for key, v in cell.items()))
    return {"layers_a": list(layers_a), "layers_b": list(layers_b), "mode": mode, "n": n, "metric": prompts.primary,
            "grid": grids[prompts.primary], "grids": grids, "b_alone": reference["b_alone"][prompts.primary],
            "reference": reference}


def _means(*score_dicts: dict[str, list[float]]) -> dict[str, float]:
    return {key: _mean(v) for d in score_dicts for key, v in d.items()}


def _mean(x: Sequence[float]) -> float:
    return sum(x) / len(x) if len(x) else math.nan


def plot_sweep(result: dict[str, Any], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pipeline.artifacts import save_figure
    from pipeline.evaluation.results import fill

    grids = result.get("grids") or {result["metric"]: result["grid"]}
    panels = [result["metric"]] + [k for k in ("agree_skyline",) if k in grids]  # what B says; what it starts with
    first = np.asarray(grids[panels[0]], dtype=float)
    cell = 0.6 if first.shape[1] <= 12 else 0.3  # every layer pair of a deep model: smaller cells, no numbers
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=(len(panels) * (2.5 + cell * first.shape[1]), 1.6 + cell * 0.85 * first.shape[0]))
    reference = result.get("reference", {}).get("b_alone", {result["metric"]: result.get("b_alone")})
    for ax, key in zip(axes[0], panels):
        grid = 100 * np.asarray(grids[key], dtype=float)
        im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=100, aspect="auto")
        ax.set_xticks(range(grid.shape[1]), result["layers_b"], fontsize=7 if cell < 0.6 else 9)
        ax.set_yticks(range(grid.shape[0]), result["layers_a"], fontsize=7 if cell < 0.6 else 9)
        ax.set_xlabel("j (B's layer)")
        ax.set_ylabel("k (A's layer)")
        if cell >= 0.6:
            for (r, c), v in np.ndenumerate(grid):
                ax.text(c, r, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
        base = reference.get(key)
        label = "first token = skyline's" if key == "agree_skyline" else key
        fig.colorbar(im, ax=ax, label=f"{label} (%)" + (f", B alone {100 * base:.0f}" if base is not None else ""))
    fig.suptitle(fill(title or f"AC {result['mode']}, n = {result['n']}", fig), fontsize=10)
    fig.tight_layout()
    save_figure(fig, path, dpi=120)  # atomic; joins the stage's artifacts.Outputs
    plt.close(fig)
    return path
