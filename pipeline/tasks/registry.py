"""The task registry: each evaluation task's name, with how its items are built.

A task is a `pipeline.tasks.base.Task` (its params section, its items as prompts, its scores and
report columns). Adding one: write its module, give its `evaluate.<name>` section's type a line in
pipeline/config_tasks.py's TASK_SECTIONS (the typed params read it without importing task code), and
add it to `TASKS` below; the `evaluate@<name>` DVC stage (through `evaluate.tasks`), `xmodel evaluate
<name>`, the sweep and the report follow from these two entries, which must name the same tasks.
"""

from __future__ import annotations

from pipeline.config_tasks import PROBES, TASK_SECTIONS
from pipeline.errors import UserError
from pipeline.tasks import games, gsm8k, squad
from pipeline.tasks.base import Task

__all__ = ["PROBES", "TASKS", "get_task"]

TASKS: dict[str, Task] = {t.name: t for t in (squad.TASK, gsm8k.TASK, games.COUNTRIES, games.TIPSHEETS)}
if {name: t.config for name, t in TASKS.items()} != TASK_SECTIONS or list(TASKS) != list(TASK_SECTIONS):
    raise RuntimeError("pipeline/tasks/registry.py TASKS and pipeline/config_tasks.py TASK_SECTIONS must name the "
                       "same tasks, in the same order, with the same section types")
ABOUT = {  # one line each for the CLI help: the probes, and the sweep `xmodel evaluate` also runs
    "similarity": "probe: how close a grafted B's next-token distribution comes to B's own, per aligner and f, "
                  "on held-out sentences",
    "sweep": "plain AC at every (k, j) of evaluate.sweep on items apart from the evaluation's (run by hand)",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}: use one of {', '.join(TASKS)}")
    return TASKS[name]
