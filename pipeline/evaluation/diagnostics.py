"""What a graft did, per item: how big and how aligned the sent vector is next to B's own state,
and how close B's first answer token comes to the skyline's (B reading what A read).

  norm_ratio     ‖v‖ / ‖b‖: v the vector sent (A's state, mapped by an aligner if any), b B's own
                 state after layer j at the last prompt token; on the coordinates f combined (the last
                 min(d_A, d_B) when the widths differ and no aligner maps them)
  cosine         cos(v, b) on the same coordinates
  kl_skyline     KL(p_skyline ‖ p) in nats, p B's first-token distribution of this method
  agree_skyline  1 when B's most likely first token equals the skyline's

The first two exist for grafts only; the last two for any method whose first-token logits were kept,
when the task has a skyline. They tell where the information stops: a graft of the right size and
direction that still leaves B's first token far from the skyline's did not carry the answer.
"""

from __future__ import annotations

from typing import Any, Sequence

GRAFT_KEYS = ("norm_ratio", "cosine")
SKYLINE_KEYS = ("kl_skyline", "agree_skyline")
BINARY = ("agree_skyline",)


def skyline_closeness(first_logits: Any, skyline_logits: Any) -> dict[str, list[float]]:
    """Per item: KL(skyline ‖ method) of the first-token distributions and top-1 agreement; nothing
    when the task has no skyline (skyline_logits None)."""
    import torch

    if skyline_logits is None:
        return {}

    logp = torch.log_softmax(first_logits.float(), dim=-1)
    logq = torch.log_softmax(skyline_logits.float(), dim=-1)
    kl = (logq.exp() * (logq - logp)).sum(-1)
    agree = (first_logits.argmax(-1) == skyline_logits.argmax(-1)).float()
    return {"kl_skyline": kl.tolist(), "agree_skyline": agree.tolist()}


def graft_geometry(vectors: Any, records: Sequence[Any]) -> dict[str, list[float]]:
    """Per item: ‖v‖/‖b‖ and cos(v, b), from the vectors sent and the hook's records of B's states
    (under generation_across, every rank's records)."""
    import torch

    from pipeline.distributed import generation_ranks

    n = len(vectors)
    ratio, cos = [float("nan")] * n, [float("nan")] * n
    for rec in records:
        if rec.rows is None or rec.before is None:
            continue
        b = rec.before.float()
        v = vectors[rec.rows].float().to(b.device)
        m = min(v.shape[-1], b.shape[-1])
        v, b = v[..., -m:], b[..., -m:]
        r = v.norm(dim=-1) / b.norm(dim=-1)
        c = torch.nn.functional.cosine_similarity(v, b, dim=-1)
        for k, i in enumerate(rec.rows):
            ratio[i], cos[i] = float(r[k]), float(c[k])
    ranks = generation_ranks()
    if ranks is not None:  # each rank recorded the grafts of the batches it ran (pipeline.generation)
        mine = {i: (ratio[i], cos[i]) for rec in records if rec.rows is not None and rec.before is not None
                for i in rec.rows}
        for theirs in ranks.gather_all(mine):
            for i, (r_i, c_i) in theirs.items():
                ratio[i], cos[i] = r_i, c_i
    return {"norm_ratio": ratio, "cosine": cos}


def summarize_diagnostics(values: dict[str, list[float]], n_boot: int = 10_000, seed: int = 0) -> dict[str, Any]:
    """Each diagnostic's mean with a 95% interval (Wilson for agreement, bootstrap otherwise); items
    with a non-finite value are counted, never averaged in."""
    import math

    from pipeline.stats import bootstrap_mean, wilson_interval

    out: dict[str, Any] = {}
    for key, vals in values.items():
        finite = [v for v in vals if math.isfinite(v)]
        entry: dict[str, Any] = {"n": len(finite), "non_finite": len(vals) - len(finite)}
        if finite:
            mean = sum(finite) / len(finite)
            lo, hi = (wilson_interval(int(round(sum(finite))), len(finite)) if key in BINARY
                      else bootstrap_mean(finite, n_boot=n_boot, seed=seed))
            entry.update(mean=mean, lo=lo, hi=hi)
        out[key] = entry
    return out
