"""What a stage's DVC metrics file holds: a few headline numbers of its details, named alike across stages.

Every stage writes its full record (intervals, paired tests, compute, diagnostics, per-layer grids)
to `data/details/<name>.json`, which the report reads, and these few numbers to the metrics file
DVC shows, `data/metrics/<name>.json` (pipeline.artifacts.Layout owns both paths). A key means the
same wherever it appears and never depends on which methods, aligners or layers ran, so the
columns of `dvc metrics show` (the union of every file's keys) stay few whatever params ask for
(`dvc exp show` names a key that several files share `FILE:key`):

  n             what was measured: items (evaluate), held-out rows (fit, grid), texts (extract)
  b_alone, nl, skyline   those methods' primary score (evaluate)
  ac, ac_w, kv  the best plain AC, AC through an aligner, KV communication (primary score)
  latent        the best cross-model latent method: multi-vector AC, mapped KV, the learned fuser
  p             plain AC's best against B alone, Bonferroni-corrected for the f's it was picked from
  kl, kl_w      similarity probe: lowest KL(B ‖ B + graft) over f of the raw graft, over the aligners
  top1, r2, cka held-out retrieval top-1, R² and CKA of an aligner (fit); grid: best raw CKA, best top-1
  loss, loss_b_alone  the fuser's held-out loss per target token, and B alone's on the same targets (fuse)
  seconds, tokens_per_s  the speed of the extraction (extract)

A method that did not run is absent, never null. The one family rule (which method is plain AC,
AC through an aligner, KV) lives here, for these numbers and for the report's answer table alike.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

MAX_KEYS = 12  # per metrics file, once flattened: a DVC table a person reads
PLAIN_AC = ("ac_replace", "ac_sum", "ac_mean")
# the headline groups of the method families a record names (pipeline/evaluation/methods/base.py):
# one-vector AC plain and through an aligner, B reading A's own cache, and the cross-model latent
# methods (multi-vector AC, mapped KV, the learned fuser); references and controls are no group
GROUPS = {"ac": "ac", "ac_w": "ac_w", "kv": "kv", "mv_ac": "latent", "mapped_kv": "latent", "fuser": "latent"}


def family(method: str, entry: dict[str, Any] | None = None) -> str | None:
    """`ac` (plain AC, one f), `ac_w` (AC through an aligner), `kv`, `latent` (the cross-model
    methods), or None (a reference method or a control). Records name each method's family; older
    ones are read by name."""
    if entry and "family" in entry:
        return GROUPS.get(entry["family"])
    if "~" in method:  # a control run
        return None
    if method in PLAIN_AC:
        return "ac"
    if method.startswith("ac_"):
        return "ac_w"
    if method.startswith("kv_"):
        return "kv"
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def primary_mean(details: dict[str, Any], method: str) -> Any:
    """The primary score's mean of `method` in an evaluation's details (None when absent)."""
    return ((details.get("methods", {}).get(method) or {}).get(details.get("primary")) or {}).get("mean")


def comparison(entry: dict[str, Any], ref: str, score: str) -> tuple[Any, Any] | None:
    """(difference, p) of a method's entry against `ref` (b_alone, nl, or one of its controls) on
    `score`, as the record holds it: exact McNemar's p where recorded (binary scores), else the paired
    bootstrap's; None when that comparison was not made."""
    cmp = ((entry or {}).get(f"vs_{ref}") or {}).get(score)
    if not cmp:
        return None
    return cmp.get("paired_bootstrap", {}).get("diff"), (cmp.get("mcnemar") or cmp.get("paired_bootstrap", {})).get("p_value")


def best(details: dict[str, Any], names: Iterable[str]) -> tuple[str | None, float | None, float | None]:
    """The best of `names` with a finite primary score, its difference from B alone and its p against
    B alone multiplied by how many it was picked from (Bonferroni): picking the best is no evidence."""
    methods, primary = details.get("methods", {}), details.get("primary")
    names = [n for n in names if _finite(primary_mean(details, n))]
    if not names:
        return None, None, None
    name = max(names, key=lambda n: primary_mean(details, n))
    against = comparison(methods.get(name), "b_alone", primary)
    if against is None:
        return name, None, None
    diff, p = against
    return name, diff, None if p is None else min(1.0, p * len(names))


def control_test(details: dict[str, Any], method: str, control: str = "mismatched") -> tuple[float, float] | None:
    """(difference, p) of `method` against its `control` run on the primary score, or None when that
    control did not run: a method carries information only where it beats its mismatched control."""
    against = comparison(details.get("methods", {}).get(method), control, details.get("primary"))
    return None if against is None or None in against else against


def best_of_family(details: dict[str, Any], fam: str) -> tuple[str | None, float | None, float | None]:
    return best(details, [n for n, e in details.get("methods", {}).items() if family(n, e) == fam])


def evaluation(details: dict[str, Any]) -> dict[str, Any]:
    """evaluate@<task>: n, each reference method's and each family's best primary score, plain AC's p."""
    out: dict[str, Any] = {"n": details.get("n_items")}
    for method in ("b_alone", "nl", "skyline"):
        out[method] = primary_mean(details, method)
    for fam in ("ac", "ac_w", "kv", "latent"):
        name = best_of_family(details, fam)[0]
        out[fam] = primary_mean(details, name) if name else None
    out["p"] = best_of_family(details, "ac")[2]
    return _headline(out)


def similarity(details: dict[str, Any]) -> dict[str, Any]:
    """evaluate@similarity: n, and the lowest matched KL over the f's of the raw graft and of the aligners."""
    def lowest(variants: Iterable[dict[str, Any]]) -> Any:
        kls = [v[key]["kl"]["mean"] for v in variants for key in v
               if key.endswith("/matched") and _finite(v[key].get("kl", {}).get("mean"))]
        return min(kls) if kls else None

    variants = details.get("variants", {})
    return _headline({"n": details.get("n"), "kl": lowest(v for name, v in variants.items() if name == "none"),
                      "kl_w": lowest(v for name, v in variants.items() if name != "none")})


def fit(details: dict[str, Any]) -> dict[str, Any]:
    """fit@<aligner>: held-out rows, retrieval top-1, R², CKA (no timing: every refit would show as a change)."""
    return _headline({"n": details.get("heldout_rows"), "top1": details.get("retrieval_top1"),
                      "r2": details.get("r2"), "cka": details.get("cka")})


def fuse(details: dict[str, Any]) -> dict[str, Any]:
    """fuse@<variant>: held-out items, the fuser's held-out loss (per target token), and B alone's on the same targets."""
    return _headline({"n": details.get("n_heldout"), "loss": details.get("heldout_loss"),
                      "loss_b_alone": details.get("heldout_loss_b_alone")})


def layer_maps(details: dict[str, Any]) -> dict[str, Any]:
    """kvmaps@<name>: held-out rows and the mean held-out R² over the mapped layers."""
    r2 = [v for v in (details.get("heldout_r2") or {}).values() if _finite(v)]
    return _headline({"n": details.get("heldout_rows"), "r2": sum(r2) / len(r2) if r2 else None})


def grid(details: dict[str, Any]) -> dict[str, Any]:
    """grid: held-out rows, the highest raw CKA of any layer pair, the best aligner's held-out top-1."""
    cka = [v for row in details.get("cka", {}).values() for v in row.values() if _finite(v)]
    top1 = [a.get("retrieval_top1") for a in details.get("aligners", {}).values() if _finite(a.get("retrieval_top1"))]
    return _headline({"n": details.get("rows"), "cka": max(cka) if cka else None, "top1": max(top1) if top1 else None})


def extract(details: dict[str, Any]) -> dict[str, Any]:
    """extract@<role>: texts stored, and the speed of the run that wrote them."""
    return _headline({"n": details.get("n_seq"), "tokens_per_s": details.get("tokens_per_s"),
                      "seconds": details.get("seconds")})


def _headline(values: dict[str, Any]) -> dict[str, Any]:
    """Finite numbers only (what did not run is absent), rounded to what a table shows."""
    return {k: _round(v) for k, v in values.items() if _finite(v)}


def _round(value: int | float) -> int | float:
    if isinstance(value, int) or value == 0:
        return value
    return float(f"{value:.4g}")  # four significant digits: a p of 3.3e-24 stays one
