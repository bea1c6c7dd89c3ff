"""The `evaluate` params section as typed dataclasses, validated on construction.

A leaf of the typed params (pipeline/config.py), like pipeline/config_tasks.py: it imports no
evaluation, task or model code, so it owns the vocabularies params are checked against (methods,
combinations f, KV layer choices) and the code that runs them imports them from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

from pipeline.config_tasks import PROBES, TASK_SECTIONS, check_depths
from pipeline.errors import UserError

# the communication methods (pipeline/evaluation/methods/registry.py, whose keys a test holds equal
# to these): "ac" = every f and aligner; "mv_ac" = every m of evaluate.mv; "kv" = every kv.layers choice
METHODS = ("b_alone", "a_alone", "nl", "ac", "mv_ac", "kv", "mapped_kv", "fuser", "skyline")
MODES = ("replace", "sum", "mean")  # AC's combination f of A's state with B's (pipeline/injection.py)
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
class KvConfig:
    """Which of B's layers read A's cache: "all", "top" (the top-m rule), or a list of layers
    (ints 1..L, or floats as relative depths). top_m: a count (int >= 1) or a fraction of the
    depth (float in (0, 1]). calib_items: how many items the top-m rule scores on (the first ones)."""

    layers: str | list[int | float] = "all"
    top_m: int | float = 0.3
    prior_weight: float = 0.5
    calib_items: int = 16

    def __post_init__(self):
        if isinstance(self.layers, str):
            if self.layers not in ("all", "top"):
                raise UserError(f"kv layers {self.layers!r} is not one of: all, top, or a list of layers (e.g. [4, 0.5])")
        elif isinstance(self.layers, (list, tuple)):
            if not self.layers:
                raise UserError("kv layers [] shares nothing (that is b_alone): give all, top, or at least one layer")
            for item in self.layers:
                if isinstance(item, bool) or not isinstance(item, (int, float)):
                    raise UserError(f"kv layer {item!r} is neither a block index (int >= 1) nor a relative depth (float)")
            object.__setattr__(self, "layers", list(self.layers))
        else:
            raise UserError(f"kv layers {self.layers!r} must be all, top, or a list of layers")
        m = self.top_m
        if isinstance(m, bool) or not isinstance(m, (int, float)) or (isinstance(m, int) and m < 1) or (
                isinstance(m, float) and not 0.0 < m <= 1.0):
            raise UserError(f"kv top_m = {m!r} must be a layer count (int >= 1) or a fraction of the depth (float in (0, 1])")
        if isinstance(self.prior_weight, bool) or not isinstance(self.prior_weight, (int, float)) or not (
                0.0 <= self.prior_weight <= 1.0):
            raise UserError(f"kv prior_weight = {self.prior_weight!r} must be in [0, 1] (0: attention only, 1: prior only)")
        if isinstance(self.calib_items, bool) or not isinstance(self.calib_items, int) or self.calib_items < 1:
            raise UserError(f"kv calib_items = {self.calib_items!r} must be an int >= 1")

    @property
    def name(self) -> str:
        """The method's name in results: kv_all, kv_top0.3 / kv_top4, kv_L2_5."""
        if self.layers == "all":
            return "kv_all"
        if self.layers == "top":
            return f"kv_top{self.top_m}"
        return "kv_L" + "_".join(str(x) for x in self.layers)


@dataclass(frozen=True)
class KvSection:
    """KV-cache communication (pipeline/evaluation/kv.py): one method per entry of `layers`."""

    layers: list[str | list[int | float]] = field(default_factory=lambda: ["all"])  # all | top | [layers]
    top_m: int | float = 0.3  # the top-m rule keeps this many layers (int) or this share of the depth (float)
    prior_weight: float = 0.5  # weight of the depth prior against the importance (B's attention on A's cache)
    calib_items: int = 16  # items the top-m rule scores layers on

    def configs(self) -> list[KvConfig]:
        """One validated KvConfig per choice (one clear line for a bad one)."""
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
    gold_logprob: bool = True  # B's log-likelihood of the gold answer under every method (either decoder)
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


# what every evaluate@<task> stage reads besides its own section `evaluate.<task>`: the keys above but
# the list of stages and the sections of the probe and of the sweep (stages/evaluate.py's PARAMS)
SHARED_KEYS = tuple(f.name for f in fields(_Shared) if f.name not in ("tasks", *PROBES, "sweep"))


# evaluate.<task> for every registered task: typed, with the task's defaults (cfg.squad, cfg.countries, ...)
EvaluateConfig = make_dataclass("EvaluateConfig", [(name, config, field(default_factory=config))
                                                   for name, config in TASK_SECTIONS.items()],
                                bases=(_Shared,), frozen=True)
EvaluateConfig.__module__ = __name__  # pickling and reprs name this module
EvaluateConfig.__doc__ = "The `evaluate` params section: the shared keys, the probes, and one section per task."


def validate(cfg: _Shared) -> None:
    for key, values, allowed in (("modes", cfg.modes, AC_MODES), ("aligner_modes", cfg.aligner_modes, AC_MODES),
                                 ("methods", cfg.methods, METHODS), ("tasks", cfg.tasks, (*TASK_SECTIONS, *PROBES)),
                                 ("controls", cfg.controls, CONTROLS), ("mv.mode", [cfg.mv.mode], AC_MODES)):
        for v in values:
            if v not in allowed:
                raise UserError(f"evaluate.{key}: {v!r} is not one of {', '.join(allowed)}")
    check_depths("evaluate.layer_a", [cfg.layer_a])
    check_depths("evaluate.layer_b", [cfg.layer_b])
    for key in ("layers_a", "layers_b"):
        if isinstance(getattr(cfg.sweep, key), str) and getattr(cfg.sweep, key) != "all":
            raise UserError(f"evaluate.sweep.{key} = {getattr(cfg.sweep, key)!r}: give a list of layers or 'all'")
        if not isinstance(getattr(cfg.sweep, key), str):
            check_depths(f"evaluate.sweep.{key}", getattr(cfg.sweep, key))
    if cfg.sweep.mode not in MODES:
        raise UserError(f"evaluate.sweep.mode = {cfg.sweep.mode!r} is not one of {', '.join(MODES)}")
    if cfg.sweep.task not in TASK_SECTIONS:
        raise UserError(f"evaluate.sweep.task = {cfg.sweep.task!r} is not one of {', '.join(TASK_SECTIONS)}")
    for name in TASK_SECTIONS:
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
