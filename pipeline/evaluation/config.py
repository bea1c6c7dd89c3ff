"""The `evaluate` params section as typed dataclasses, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, make_dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import UserError
from pipeline.injection import MODES
from pipeline.tasks.registry import PROBES, TASKS

# the communication methods (pipeline/evaluation/methods/registry.py, whose keys a test holds equal
# to these): "ac" = every f and aligner; "mv_ac" = every m of evaluate.mv; "kv" = every kv.layers choice
METHODS = ("b_alone", "a_alone", "nl", "ac", "mv_ac", "kv", "mapped_kv", "fuser", "skyline")
AC_MODES = (*MODES, "gated")  # gated: b + g·v, the gated residual (g = evaluate.gate)
CONTROLS = ("mismatched", "noise", "zero")  # of every latent method (pipeline/evaluation/methods/latent.py)


@dataclass(frozen=True)
class SimilarityConfig:
    source: str = "pydoc"  # held-out sentences: pydoc | c4 | .txt/.jsonl path (the training corpus is excluded)
    n: int = 100
    seed: int = 1
    min_chars: int = 40
    max_chars: int = 300


@dataclass(frozen=True)
class KvSection:
    """KV-cache communication (pipeline/evaluation/kv.py): one method per entry of `layers`."""

    layers: list[str | list[int | float]] = field(default_factory=lambda: ["all"])  # all | top | [layers]
    top_m: int | float = 0.3  # the top-m rule keeps this many layers (int) or this share of the depth (float)
    prior_weight: float = 0.5  # weight of the depth prior against the importance (B's attention on A's cache)
    calib_items: int = 16  # items the top-m rule scores layers on

    def configs(self) -> list[Any]:
        """One validated pipeline.evaluation.kv.KvConfig per choice (one clear line for a bad one)."""
        from pipeline.evaluation.kv import KvConfig

        return [KvConfig(layers=choice, top_m=self.top_m, prior_weight=self.prior_weight,
                         calib_items=self.calib_items) for choice in self.layers]


@dataclass(frozen=True)
class MultiVectorSection:
    """Multi-vector AC (method mv_ac): the states of A's last m tokens of prompt_a at layer k, each
    through each aligner (a per-token one, fit.kind: tokens; "none": raw), on B's last m positions."""

    m: list[int | str] = field(default_factory=lambda: [1, 4, 16, "all"])  # tokens sent, or "all" of prompt_a
    aligners: list[str] = field(default_factory=lambda: ["none"])  # "none" or names in evaluate.aligners
    mode: str = "replace"  # f on each of the m positions (of AC_MODES)


@dataclass(frozen=True)
class SweepConfig:
    task: str = "squad"  # any registered task
    n: int = 24
    seed: int = 1  # the sweep's items: drawn with this seed and disjoint from the evaluation's, so that a
    #                (k, j) picked from the sweep is not picked on the items it is then scored on
    layers_a: list[int | float] | str = field(default_factory=lambda: [0.5, 0.75, 0.93, 1.0])  # or "all": 1..L
    layers_b: list[int | float] | str = field(default_factory=lambda: [0.5, 0.75, 0.93, 1.0])
    mode: str = "replace"
    max_new_tokens: int = 0  # 0 = the task's own


@dataclass(frozen=True)
class _Shared:
    """The keys every evaluate@<task> stage reads; each task's own section is added from the registry."""

    tasks: list[str] = field(default_factory=lambda: ["squad", "similarity"])  # the evaluate@<task> stages dvc.yaml has
    layer_a: int | float = 0.93  # k: A's layer (int index, or relative depth in [0, 1]); 0 = embeddings
    layer_b: int | float = 0.93  # j: B's layer, same convention; the graft edits the output of block j
    modes: list[str] = field(default_factory=lambda: ["replace"])  # f for plain AC (of MODES)
    aligners: list[str] = field(default_factory=lambda: ["lora"])  # fitted aligners: names under <data>/aligners/ or dirs
    aligner_modes: list[str] = field(default_factory=lambda: ["replace"])  # f for AC through an aligner
    methods: list[str] = field(default_factory=lambda: ["b_alone", "nl", "ac", "kv", "skyline"])  # of METHODS
    controls: list[str] = field(default_factory=lambda: ["mismatched"])  # of CONTROLS, for every latent method
    gate: float = 0.5  # g of f = gated (b + g·v), fixed before any run
    gold_logprob: bool = True  # B's log-likelihood of the gold answer under every method (eager decoding)
    chat: bool = True  # wrap prompts in the model's chat template when it has one
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    n_boot: int = 10_000
    kv: KvSection = field(default_factory=KvSection)
    mv: MultiVectorSection = field(default_factory=MultiVectorSection)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self):
        validate(self)

    def section(self, task: str) -> Any:
        """The `evaluate.<task>` section of a registered task."""
        return getattr(self, task)


# evaluate.<task> for every registered task: typed, with the task's defaults (cfg.squad, cfg.countries, ...)
EvaluateConfig = make_dataclass("EvaluateConfig", [(name, t.config, field(default_factory=t.config))
                                                   for name, t in TASKS.items()],
                                bases=(_Shared,), frozen=True)
EvaluateConfig.__module__ = __name__  # pickling and reprs name this module
EvaluateConfig.__doc__ = "The `evaluate` params section: the shared keys, the probes, and one section per task."


def validate(cfg: _Shared) -> None:
    for key, values, allowed in (("modes", cfg.modes, AC_MODES), ("aligner_modes", cfg.aligner_modes, AC_MODES),
                                 ("methods", cfg.methods, METHODS), ("tasks", cfg.tasks, (*TASKS, *PROBES)),
                                 ("controls", cfg.controls, CONTROLS), ("mv.mode", [cfg.mv.mode], AC_MODES)):
        for v in values:
            if v not in allowed:
                raise UserError(f"evaluate.{key}: {v!r} is not one of {', '.join(allowed)}")
    for key in ("layers_a", "layers_b"):
        if isinstance(getattr(cfg.sweep, key), str) and getattr(cfg.sweep, key) != "all":
            raise UserError(f"evaluate.sweep.{key} = {getattr(cfg.sweep, key)!r}: give a list of layers or 'all'")
    if cfg.sweep.mode not in MODES:
        raise UserError(f"evaluate.sweep.mode = {cfg.sweep.mode!r} is not one of {', '.join(MODES)}")
    if cfg.sweep.task not in TASKS:
        raise UserError(f"evaluate.sweep.task = {cfg.sweep.task!r} is not one of {', '.join(TASKS)}")
    for name in TASKS:
        if hasattr(cfg, name):  # the base alone (no sections) is validated by the subclass's call
            cfg.section(name).check(name)
    cfg.kv.configs()
    for m in cfg.mv.m:
        if m != "all" and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise UserError(f"evaluate.mv.m: {m!r} is neither a token count (int >= 1) nor 'all'")
    for name in cfg.mv.aligners:
        if name != "none" and name not in [Path(a).name for a in cfg.aligners]:
            raise UserError(f"evaluate.mv.aligners: {name!r} is neither 'none' nor one of evaluate.aligners "
                            f"({', '.join(cfg.aligners) or 'none listed'}): add it there or remove it")
    if not (isinstance(cfg.gate, (int, float)) and not isinstance(cfg.gate, bool) and math.isfinite(cfg.gate)
            and 0.0 < cfg.gate <= 10.0):
        raise UserError(f"evaluate.gate = {cfg.gate!r} must be a finite number in (0, 10]")
    positive = {"batch_size": cfg.batch_size, "similarity.n": cfg.similarity.n, "sweep.n": cfg.sweep.n,
                "n_boot": cfg.n_boot}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"evaluate.{key} = {value} must be at least 1")


def config_from_dict(raw: dict[str, Any]) -> Any:
    """The typed config from a params.yaml `evaluate` mapping (unknown keys refused)."""
    import dacite

    try:
        return dacite.from_dict(EvaluateConfig, raw or {}, config=dacite.Config(strict=True))
    except dacite.UnexpectedDataError as e:
        raise UserError(f"evaluate: unknown key(s) {sorted(e.keys)}: remove them or fix the spelling") from None
    except dacite.WrongTypeError as e:
        raise UserError(f"evaluate: {e.field_path} = {e.value!r} has the wrong type") from None
