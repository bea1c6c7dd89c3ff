"""What an evaluation task is: its params section (`evaluate.<name>`), and the prompts, scores and
report columns it hands to the evaluation harness. The registry (pipeline/tasks/registry.py) maps
names to `Task`s; nothing else in the project lists task names.

Light on purpose: the typed params import this module, so it imports no torch and no task data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipeline.errors import UserError


@dataclass(frozen=True)
class TaskConfig:
    """The fields every `evaluate.<task>` section has; a task subclasses it to add its own (and to
    change defaults)."""

    source: str = "generate"  # where items come from; each task says which sources it knows
    n: int = 100
    seed: int = 0
    max_new_tokens: int = 16
    sampling: str = "greedy"  # greedy | nucleus
    top_p: float = 0.9
    temperature: float = 1.0

    def check(self, name: str) -> None:
        """One clear line for a bad value (called when the params are loaded)."""
        from pipeline.generation import SAMPLING

        if self.sampling not in SAMPLING:
            raise UserError(f"evaluate.{name}.sampling = {self.sampling!r} is not one of {', '.join(SAMPLING)}")
        for key in ("n", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise UserError(f"evaluate.{name}.{key} = {getattr(self, key)} must be at least 1")


@dataclass
class TaskPrompts:
    """Texts for one task's items: what A reads, what B reads, the skyline, B's prompt with A's
    message, how an answer is scored, and which scores the tables show."""

    name: str
    ids: list[str]
    a: list[str]
    b: list[str]
    skyline: list[str] | None  # B reading what A read and its own prompt; None where both see the same
    with_message: Callable[[int, str], str]
    score: Callable[[int, str], dict[str, float]]
    primary: str  # the score reported first
    binary: tuple[str, ...]  # scores that are 0/1 per item (Wilson intervals, McNemar tests)
    cue: str  # the answer cue when a tokenizer has no chat template
    stop_strings: tuple[str, ...]
    golds: list[Any]
    columns: tuple[str, ...] = ()  # scores in tables and the report, primary first (default: primary only)
    setting: str = "shared"  # private: only A sees the information B needs | shared: both see it

    def __post_init__(self):
        self.columns = tuple(self.columns) or (self.primary,)


def disjoint(load: Callable[[int], list], n: int, exclude: frozenset[str], a_prompt: Callable[[Any], str]) -> list:
    """n items whose A prompt is not in `exclude`: load(n + len(exclude)) items (so that enough are
    left after dropping every excluded one) and keep the first n of the others."""
    return [it for it in load(n + len(exclude)) if a_prompt(it) not in exclude][:n]


@dataclass(frozen=True)
class Task:
    """One registry entry: the name is the `evaluate@<name>` stage and the `evaluate.<name>` section."""

    name: str
    config: type[TaskConfig]
    build: Callable[[Any, int | None, frozenset[str]], TaskPrompts]  # (section, n, exclude) -> prompts
    about: str  # one line for the CLI help and the docs

    def prompts(self, section: TaskConfig, n: int | None = None, exclude: frozenset[str] = frozenset()) -> TaskPrompts:
        """The task's items as prompts: `n` (default section.n) items from its source, skipping items
        whose A prompt is in `exclude` (training items disjoint from the evaluation items)."""
        return self.build(section, n, exclude)
