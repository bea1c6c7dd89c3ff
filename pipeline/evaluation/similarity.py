"""The text-similarity probe: B with A's grafted (mapped) state against B's own run on the same text."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from pipeline.errors import UserError
from pipeline.config_evaluate import SimilarityConfig
from pipeline.evaluation.pair import Pair
from pipeline.injection import map_vectors, prefill, sender_states


def similarity_texts(cfg: SimilarityConfig, exclude: Sequence[str] = ()) -> list[str]:
    """n held-out sentences: a seeded sample of the source, minus every text in `exclude`
    (the corpus the aligners were fitted on)."""
    from pipeline.config import CorpusConfig
    from pipeline.data import load_corpus

    excluded = set(exclude)
    corpus = load_corpus(CorpusConfig(source=cfg.source, n=cfg.n + len(excluded), seed=cfg.seed,
                                      min_chars=cfg.min_chars, max_chars=cfg.max_chars))
    texts = [t for t in corpus.texts if t not in excluded][:cfg.n]
    if len(texts) < cfg.n:
        raise UserError(f"similarity probe: only {len(texts)} held-out sentences left in {cfg.source!r} "
                        f"(asked for {cfg.n}): lower evaluate.similarity.n")
    return texts


def similarity_probe(pair: Pair, texts: Sequence[str], k: int, j: int, modes: Sequence[str],
                     aligners: dict[str, Any] | None = None, batch_size: int = 16, n_boot: int = 10_000,
                     seed: int = 0, aligner_modes: Sequence[str] | None = None) -> dict[str, Any]:
    """How close B's run with A's grafted (mapped) state is to B's own run on the same text.

    For each variant (no aligner with each f in `modes`, each aligner with each f in `aligner_modes`,
    default `modes`): KL(p_B || p_graft) of the next-token
    distributions at the last token, cosine of B's last hidden state (layer L, pre final norm) with
    and without the graft, both as means with bootstrap intervals; the same with the vectors of
    other sentences (a fixed derangement) as a control; and how close the mapped vector itself is
    to B's own layer-j state (cosine, relative squared error)."""
    import torch

    from pipeline.architecture import architecture
    from pipeline.stats import bootstrap_mean

    aligners = aligners or {}
    n = len(texts)
    if n < 2:
        raise UserError("the similarity probe needs at least 2 sentences (the control shuffles them)")
    ids_a = [pair.tok_a(t, add_special_tokens=True)["input_ids"] for t in texts]
    ids_b = [pair.tok_b(t, add_special_tokens=True)["input_ids"] for t in texts]
    n_b = architecture(pair.model_b).n_layers
    sent = sender_states(pair.model_a, pair.tok_a, ids_a, k, batch_size=batch_size)
    own = prefill(pair.model_b, pair.tok_b, ids_b, layers=sorted({j, n_b}), batch_size=batch_size)
    logp_own = torch.log_softmax(own["logits"], -1)
    h_own, b_j = own["states"][n_b], own["states"][j]
    perm = torch.roll(torch.arange(n), 1)  # every sentence gets another sentence's vector

    def interval(x):
        x = [float(v) for v in x]
        lo, hi = bootstrap_mean(x, n_boot=n_boot, seed=seed)
        return {"mean": sum(x) / len(x), "lo": lo, "hi": hi}

    out: dict[str, Any] = {}
    variants = [("none", None)] + list(aligners.items())
    for name, aligner in variants:
        v = map_vectors(sent.vectors, aligner, pair.width_b).float()
        m = min(v.shape[-1], b_j.shape[-1])
        vv, bb = v[:, -m:], b_j[:, -m:]
        entry: dict[str, Any] = {
            "vector_cosine": interval(torch.nn.functional.cosine_similarity(vv, bb, dim=-1)),
            "vector_rel_sq_error": interval(((vv - bb) ** 2).sum(-1) / (bb ** 2).sum(-1).clamp_min(1e-12))}
        for f in (modes if aligner is None or aligner_modes is None else aligner_modes):
            for label, vecs in (("matched", v), ("shuffled", v[perm])):
                run = prefill(pair.model_b, pair.tok_b, ids_b, layers=[n_b], inject_layer=j, vectors=vecs, mode=f,
                              batch_size=batch_size)
                logp = torch.log_softmax(run["logits"], -1)
                kl = (logp_own.exp() * (logp_own - logp)).sum(-1)
                cos = torch.nn.functional.cosine_similarity(run["states"][n_b], h_own, dim=-1)
                entry[f"{f}/{label}"] = {"kl": interval(kl), "cosine": interval(cos)}
        out[name] = entry
    return {"k": k, "j": j, "n": n, "variants": out}


def similarity_table(result: dict[str, Any]) -> str:
    lines = ["| aligner | f | KL matched [95% CI] | KL shuffled | cos matched [95% CI] | cos shuffled | vector cos |",
             "|---|---|---|---|---|---|---|"]
    for name, e in result["variants"].items():
        for key in e:
            if not key.endswith("/matched"):
                continue
            f = key.split("/")[0]
            m, s = e[key], e[f"{f}/shuffled"]
            lines.append(f"| {name} | {f} | {m['kl']['mean']:.3f} [{m['kl']['lo']:.3f}, {m['kl']['hi']:.3f}] | "
                         f"{s['kl']['mean']:.3f} | {m['cosine']['mean']:.3f} [{m['cosine']['lo']:.3f}, "
                         f"{m['cosine']['hi']:.3f}] | {s['cosine']['mean']:.3f} | {e['vector_cosine']['mean']:.3f} |")
    return "\n".join(lines)


def plot_similarity(result: dict[str, Any], path: Path) -> Path:
    """KL(p_B || p_graft) per aligner and f, matched against shuffled vectors, with 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.artifacts import save_figure

    labels, bars = [], {"matched": [], "shuffled": []}
    for name, e in result["variants"].items():
        for key in e:
            if key.endswith("/matched"):
                f = key.split("/")[0]
                labels.append(f"{name}/{f}")
                for which in bars:
                    kl = e[f"{f}/{which}"]["kl"]
                    bars[which].append((kl["mean"], max(0.0, kl["mean"] - kl["lo"]), max(0.0, kl["hi"] - kl["mean"])))
    fig, ax = plt.subplots(figsize=(max(5, 0.7 * len(labels) + 2), 3.6))
    width = 0.4
    for i, (which, vals) in enumerate(bars.items()):
        xs = [x + (i - 0.5) * width for x in range(len(labels))]
        ax.bar(xs, [v[0] for v in vals], width, yerr=[[v[1] for v in vals], [v[2] for v in vals]], capsize=3,
               label=f"{which} vectors")
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set_ylabel("KL(B's own || B with graft), nats")
    ax.set_title(f"similarity probe, k={result['k']} j={result['j']}, n={result['n']}")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path, dpi=120)  # atomic; joins the stage's artifacts.Outputs
    plt.close(fig)
    return path
