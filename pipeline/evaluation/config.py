"""The `evaluate` params section as typed dataclasses, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import UserError
from pipeline.evaluation.prompts import GSM8K_STYLES
from pipeline.generation import SAMPLING
from pipeline.injection import MODES

TASKS = ("squad", "gsm8k", "similarity")  # the evaluate@<task> stages; `xmodel evaluate sweep` runs by hand
METHODS = ("b_alone", "a_alone", "nl", "ac", "skyline")  # "ac" = every f and every aligner


@dataclass(frozen=True)
class SquadConfig:
    source: str = "generate"  # generate (offline, ours) | hub (rajpurkar/squad) | path to a SQuAD v1.1 .json
    n: int = 100
    seed: int = 0
    setting: str = "private"  # private: only A sees the context | shared: both see it
    max_new_tokens: int = 16  # answers are short; generation also stops at the first newline
    sampling: str = "greedy"  # the paper decodes its coordination games greedily
    top_p: float = 0.9
    temperature: float = 1.0


@dataclass(frozen=True)
class Gsm8kConfig:
    source: str = "reasoning-gym"  # reasoning-gym (offline gsm_symbolic) | hub (openai/gsm8k) | path to .jsonl
    n: int = 100
    seed: int = 0
    prompt: str = "debate"  # debate (Du et al.'s prompts, \\boxed{} answers) | brief (short solutions, for CPUs)
    max_new_tokens: int = 384
    sampling: str = "nucleus"  # the paper samples its reasoning benchmarks with p = 0.9
    top_p: float = 0.9
    temperature: float = 0.6  # Llama-3 instruct's generation_config default, which p = 0.9 also comes from


@dataclass(frozen=True)
class SimilarityConfig:
    source: str = "pydoc"  # held-out sentences: pydoc | c4 | .txt/.jsonl path (the training corpus is excluded)
    n: int = 200
    seed: int = 1
    min_chars: int = 40
    max_chars: int = 300


@dataclass(frozen=True)
class SweepConfig:
    task: str = "squad"  # squad (private setting) | gsm8k
    n: int = 24
    layers_a: list[int | float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    layers_b: list[int | float] = field(default_factory=lambda: [0.25, 0.5, 0.75, 1.0])
    mode: str = "replace"
    max_new_tokens: int = 0  # 0 = the task's own


@dataclass(frozen=True)
class EvaluateConfig:
    tasks: list[str] = field(default_factory=lambda: list(TASKS))  # which evaluate@<task> stages dvc.yaml has
    layer_a: int | float = 0.75  # k: A's layer (int index, or relative depth in [0, 1]); 0 = embeddings
    layer_b: int | float = 0.75  # j: B's layer, same convention; the graft edits the output of block j
    modes: list[str] = field(default_factory=lambda: list(MODES))  # f for plain AC
    aligners: list[str] = field(default_factory=list)  # fitted aligners: names under <data>/aligners/ or dirs
    aligner_modes: list[str] = field(default_factory=lambda: ["replace"])  # f for AC through an aligner
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    chat: bool = True  # wrap prompts in the model's chat template when it has one
    batch_size: int = 16
    device: str = "auto"
    dtype: str = "auto"
    n_boot: int = 10_000
    squad: SquadConfig = field(default_factory=SquadConfig)
    gsm8k: Gsm8kConfig = field(default_factory=Gsm8kConfig)
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def __post_init__(self):
        validate(self)


def validate(cfg: EvaluateConfig) -> None:
    for key, values, allowed in (("modes", cfg.modes, MODES), ("aligner_modes", cfg.aligner_modes, MODES),
                                 ("methods", cfg.methods, METHODS), ("tasks", cfg.tasks, TASKS)):
        for v in values:
            if v not in allowed:
                raise UserError(f"evaluate.{key}: {v!r} is not one of {', '.join(allowed)}")
    if cfg.sweep.mode not in MODES:
        raise UserError(f"evaluate.sweep.mode = {cfg.sweep.mode!r} is not one of {', '.join(MODES)}")
    if cfg.sweep.task not in ("squad", "gsm8k"):
        raise UserError(f"evaluate.sweep.task = {cfg.sweep.task!r} is not squad or gsm8k")
    if cfg.gsm8k.prompt not in GSM8K_STYLES:
        raise UserError(f"evaluate.gsm8k.prompt = {cfg.gsm8k.prompt!r} is not one of {', '.join(GSM8K_STYLES)}")
    if cfg.squad.setting not in ("private", "shared"):
        raise UserError(f"evaluate.squad.setting = {cfg.squad.setting!r} is not private or shared")
    for name, task in (("squad", cfg.squad), ("gsm8k", cfg.gsm8k)):
        if task.sampling not in SAMPLING:
            raise UserError(f"evaluate.{name}.sampling = {task.sampling!r} is not one of {', '.join(SAMPLING)}")
    positive = {"batch_size": cfg.batch_size, "squad.n": cfg.squad.n, "gsm8k.n": cfg.gsm8k.n,
                "similarity.n": cfg.similarity.n, "sweep.n": cfg.sweep.n, "n_boot": cfg.n_boot,
                "squad.max_new_tokens": cfg.squad.max_new_tokens, "gsm8k.max_new_tokens": cfg.gsm8k.max_new_tokens}
    for key, value in positive.items():
        if value < 1:
            raise UserError(f"evaluate.{key} = {value} must be at least 1")


def config_from_dict(raw: dict[str, Any]) -> EvaluateConfig:
    """The typed config from a params.yaml `evaluate` mapping (unknown keys refused)."""
    import dacite

    try:
        return dacite.from_dict(EvaluateConfig, raw or {}, config=dacite.Config(strict=True))
    except dacite.UnexpectedDataError as e:
        raise UserError(f"evaluate: unknown key(s) {sorted(e.keys)}: remove them or fix the spelling") from None
    except dacite.WrongTypeError as e:
        raise UserError(f"evaluate: {e.field_path} = {e.value!r} has the wrong type") from None
