"""What an evaluation task is: its params section (`evaluate.<name>`), and the prompts, scores and
report columns it hands to the evaluation harness. The registry (pipeline/tasks/registry.py) maps
names to `Task`s; nothing else in the project lists task names.

Each section's type lives with the typed params (pipeline/config_tasks.py), which import no task code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from pipeline.config_tasks import TaskConfig
from pipeline.errors import UserError


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
    source: dict[str, Any] = field(default_factory=dict)  # where the items came from (file, layout, split), for the record
    shown: Callable[[str], str] | None = None  # the part of a reply its scores read (the harness's filtered response)
    # per item, the text holding its answer that other items may share (SQuAD: the passage), which
    # items drawn apart from these (exclude=) must not share either; None: the A prompt alone
    carriers: list[str] | None = None

    def held_out(self) -> frozenset[str]:
        """What items drawn apart from these must not repeat (Task.prompts' `exclude`)."""
        return frozenset(self.a) | frozenset(self.carriers or ())

    def __post_init__(self):
        self.columns = tuple(self.columns) or (self.primary,)

    def choose(self, primary: str, task: str) -> "TaskPrompts":
        """These prompts with `primary` (one of their columns) reported first; "" keeps the task's choice."""
        if not primary:
            return self
        if primary not in self.columns:
            raise UserError(f"evaluate.{task}.primary = {primary!r}, but these items are scored by "
                            f"{', '.join(self.columns)} ({primary} needs items that have it, e.g. options)")
        columns = (primary, *(c for c in self.columns if c != primary))
        return replace(self, primary=primary, columns=columns)


def disjoint(load: Callable[[int], list], n: int, exclude: frozenset[str], a_prompt: Callable[[Any], str],
             carrier: Callable[[Any], str] | None = None) -> list:
    """n items whose A prompt (and carrier: the text that holds the answer, e.g. a SQuAD passage,
    which several items may share) is not in `exclude`: load(n + len(exclude)) items, and twice as
    many while fewer than n are left and the source has more, and keep the first n of the others."""
    k = n + len(exclude)
    while True:
        items = load(k)
        kept = [it for it in items if a_prompt(it) not in exclude and (carrier is None or carrier(it) not in exclude)]
        if len(kept) >= n or len(items) < k or not exclude:
            return kept[:n]
        k *= 2


@dataclass(frozen=True)
class Task:
    """One registry entry: the name is the `evaluate@<name>` stage and the `evaluate.<name>` section."""

    name: str
    config: type[TaskConfig]
    build: Callable[[Any, int | None, frozenset[str]], TaskPrompts]  # (section, n, exclude) -> prompts
    about: str  # one line for the CLI help and the docs

    def prompts(self, section: TaskConfig, n: int | None = None, exclude: frozenset[str] = frozenset()) -> TaskPrompts:
        """The task's items as prompts: `n` (default section.n) items from its source, skipping items
        whose A prompt or carrier is in `exclude` (training items disjoint from the evaluation items:
        pass TaskPrompts.held_out() of those)."""
        return self.build(section, n, exclude).choose(section.primary, self.name)
