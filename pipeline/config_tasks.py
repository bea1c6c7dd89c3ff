"""The `evaluate.<task>` params sections, typed: one dataclass per kind of task, and the table of
which section each registered task has.

A leaf of the typed params (pipeline/config.py): it imports nothing but pipeline.errors, so reading
params never imports a task generator, the decoder or torch, and DVC stages that only read params do
not depend on task code. The task registry (pipeline/tasks/registry.py) pairs each name below with
how its items are built and refuses, on import, a name that is here and not there or back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pipeline.errors import UserError

def check_range(key: str, value: float, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    """One clear line when a number params gives is not in its stated range (NaN never is)."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise UserError(f"params: {key} = {value} must be in {span}")


def check_depths(key: str, layers: list) -> None:
    """Layers given as ints (indices, 0 = embeddings) or floats (relative depths in [0, 1])."""
    for layer in layers:
        if isinstance(layer, float) and not 0.0 <= layer <= 1.0:
            raise UserError(f"params: relative depth {layer} in {key} is outside [0, 1]: use a float in [0, 1] or an int index")
        elif isinstance(layer, int) and layer < 0:
            raise UserError(f"params: {key} = {layer}: a layer index is 0 (embeddings) or more")


SAMPLING = ("greedy", "nucleus")  # how a task's answers are decoded (pipeline.generation.Decoding)
SETTINGS = ("private", "shared")  # SQuAD: only A sees the passage | both see it
STYLES = ("debate", "brief")  # GSM8K prompts: Du et al.'s debate prompts | short solutions (for CPUs)
PLACE_SPLITS = ("all", "train", "eval")  # Countries' generated places: all, or one side of its fixed split


@dataclass(frozen=True)
class TaskConfig:
    """The fields every `evaluate.<task>` section has; a task subclasses it to add its own (and to
    change defaults)."""

    source: str = "generate"  # where items come from; each task says which sources it knows
    n: int = 100
    seed: int = 0
    max_new_tokens: int = 16
    sampling: str = "greedy"  # greedy | nucleus
    top_p: float = 0.9  # nucleus: in (0, 1]
    temperature: float = 1.0  # nucleus: in (0, 100]
    # a local file's field names when its layout is not recognised: the task's own name -> the file's,
    # plus `ignore: [fields]` (pipeline/tasks/rows.py); empty: recognise the layout
    fields: dict[str, Any] = field(default_factory=dict)
    primary: str = ""  # the score reported first (of `scores`); empty: the task's own choice

    scores: ClassVar[tuple[str, ...]] = ("em", "f1", "contains")  # what `primary` may name

    def check(self, name: str) -> None:
        """One clear line for a bad value (called when the params are loaded)."""
        if self.sampling not in SAMPLING:
            raise UserError(f"evaluate.{name}.sampling = {self.sampling!r} is not one of {', '.join(SAMPLING)}")
        for key in ("n", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise UserError(f"evaluate.{name}.{key} = {getattr(self, key)} must be at least 1")
        check_range(f"evaluate.{name}.top_p", self.top_p, 0.0, 1.0, low_open=True)
        check_range(f"evaluate.{name}.temperature", self.temperature, 0.0, 100.0, low_open=True)
        if self.primary and self.primary not in self.scores:
            raise UserError(f"evaluate.{name}.primary = {self.primary!r} is not one of {', '.join(self.scores)}")

    def training(self) -> "TaskConfig":
        """The section the task's in-task training items are drawn from (pipeline/task_corpus.py);
        a task whose items share what carries the answer says so here (Countries: its train places)."""
        return self

    def split(self) -> dict[str, Any]:
        """What a record says about which part of the task's items this section draws."""
        return {}


@dataclass(frozen=True)
class SquadConfig(TaskConfig):
    source: str = "generate"  # generate (offline, ours) | hub (rajpurkar/squad) | path to a SQuAD v1.1 .json
    setting: str = "private"  # private: only A sees the context | shared: both see it
    max_new_tokens: int = 16  # answers are short; generation also stops at the first newline

    def check(self, name: str) -> None:
        super().check(name)
        if self.setting not in SETTINGS:
            raise UserError(f"evaluate.{name}.setting = {self.setting!r} is not private or shared")


@dataclass(frozen=True)
class Gsm8kConfig(TaskConfig):
    source: str = "reasoning-gym"  # reasoning-gym (offline gsm_symbolic) | hub (openai/gsm8k) | path to .jsonl
    prompt: str = "debate"  # debate (Du et al.'s prompts, \\boxed{} answers) | brief (short solutions, for CPUs)
    max_new_tokens: int = 192
    sampling: str = "nucleus"  # the paper samples its reasoning benchmarks with p = 0.9
    temperature: float = 0.6  # Llama-3 instruct's generation_config default, which p = 0.9 also comes from

    scores = ("accuracy",)

    def check(self, name: str) -> None:
        super().check(name)
        if self.prompt not in STYLES:
            raise UserError(f"evaluate.{name}.prompt = {self.prompt!r} is not one of {', '.join(STYLES)}")


@dataclass(frozen=True)
class GameConfig(TaskConfig):
    source: str = "generate"  # generate (our seeded generator) | a local .jsonl/.json/.parquet/.csv (pipeline/tasks/rows.py)
    max_new_tokens: int = 12  # answers are a few words; generation also stops at the first newline

    scores = ("em", "f1", "contains", "option")


@dataclass(frozen=True)
class CountriesConfig(GameConfig):
    places: str = "all"  # generated items' places: all | train | eval (place_split: 30% of places, fixed seed)

    def check(self, name: str) -> None:
        super().check(name)
        if self.places not in PLACE_SPLITS:
            raise UserError(f"evaluate.{name}.places = {self.places!r} is not one of {', '.join(PLACE_SPLITS)}")

    def training(self) -> "CountriesConfig":
        from dataclasses import replace

        return replace(self, places="train")  # in-task corpora never draw an evaluation place


# task name -> its section's type, in the registry's order (the report's, the CLI's)
TASK_SECTIONS: dict[str, type[TaskConfig]] = {"squad": SquadConfig, "gsm8k": Gsm8kConfig,
                                              "countries": CountriesConfig, "tipsheets": GameConfig}
PROBES = ("similarity",)  # evaluations that are not item tasks: they have their own stage and section
