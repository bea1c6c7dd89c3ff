"""The (k, j) layer sweep of plain AC on a small subset, drawn as a heatmap (the paper's Fig. 2)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.evaluation.methods import _score_all
from pipeline.evaluation.pair import Pair
from pipeline.evaluation.prompts import TaskPrompts, encode
from pipeline.generation import Decoding, generate
from pipeline.injection import communicate, sender_states


def layer_sweep(pair: Pair, prompts: TaskPrompts, decoding: Decoding, layers_a: Sequence[int], layers_b: Sequence[int],
                mode: str = "replace", batch_size: int = 16, chat: bool = True,
                log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Plain AC (no aligner; the last-min(d_A, d_B)-coordinates rule) for every (k, j) in the grid,
    on the same items; plus B alone for reference. Grid of the primary score, rows k, columns j."""
    log = log or (lambda s: None)
    n = len(prompts.ids)
    seeds = list(range(n))
    enc_a = [encode(pair.tok_a, t, chat, prompts.cue) for t in prompts.a]
    enc_b = [encode(pair.tok_b, t, chat, prompts.cue) for t in prompts.b]
    base = generate(pair.model_b, pair.tok_b, enc_b, decoding, batch_size=batch_size, seeds=seeds)
    base_score = _mean(_score_all(prompts, base.texts)[prompts.primary])
    grid = [[math.nan] * len(layers_b) for _ in layers_a]
    for r, k in enumerate(layers_a):
        sent = sender_states(pair.model_a, pair.tok_a, enc_a, k, batch_size=batch_size)
        for c, j in enumerate(layers_b):
            gen = communicate(pair.model_b, pair.tok_b, enc_b, j, sent.vectors, mode, decoding,
                              batch_size=batch_size, seeds=seeds)
            grid[r][c] = _mean(_score_all(prompts, gen.texts)[prompts.primary])
            log(f"k={k} j={j}: {prompts.primary} {grid[r][c]:.3f}")
    return {"layers_a": list(layers_a), "layers_b": list(layers_b), "mode": mode, "n": n, "metric": prompts.primary,
            "grid": grid, "b_alone": base_score}


def _mean(x: Sequence[float]) -> float:
    return sum(x) / len(x) if len(x) else math.nan


def plot_sweep(result: dict[str, Any], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from pipeline.artifacts import save_figure

    grid = 100 * np.asarray(result["grid"], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * grid.shape[1] + 1.5, 1.0 + 0.5 * grid.shape[0]))
    im = ax.imshow(grid, origin="lower", cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(grid.shape[1]), result["layers_b"])
    ax.set_yticks(range(grid.shape[0]), result["layers_a"])
    ax.set_xlabel("j (B's layer)")
    ax.set_ylabel("k (A's layer)")
    for (r, c), v in np.ndenumerate(grid):
        ax.text(c, r, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k", fontsize=8)
    fig.colorbar(im, ax=ax, label=f"{result['metric']} (%)  (B alone {100 * result['b_alone']:.0f})")
    ax.set_title(title or f"AC {result['mode']}, n = {result['n']}")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)  # atomic; joins the stage's artifacts.Outputs
    plt.close(fig)
    return path
