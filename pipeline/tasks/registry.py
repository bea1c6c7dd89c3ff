"""The task registry: the one place that names the evaluation tasks.

A task is a `pipeline.tasks.base.Task` (its params section, its items as prompts, its scores and
report columns). Adding one: write its module, add it to `TASKS` below; the `evaluate.<name>`
params section, the `evaluate@<name>` DVC stage (through `evaluate.tasks`), `xmodel evaluate
<name>`, the sweep and the report follow from this entry.
"""

from __future__ import annotations

from pipeline.errors import UserError
from pipeline.tasks import games, gsm8k, squad
from pipeline.tasks.base import Task

TASKS: dict[str, Task] = {t.name: t for t in (squad.TASK, gsm8k.TASK, games.COUNTRIES, games.TIPSHEETS)}
PROBES = ("similarity",)  # evaluations that are not item tasks: they have their own stage and section
ABOUT = {  # one line each for the CLI help: the probes, and the sweep `xmodel evaluate` also runs
    "similarity": "probe: how close a grafted B's next-token distribution comes to B's own, per aligner and f, "
                  "on held-out sentences",
    "sweep": "plain AC at every (k, j) of evaluate.sweep on items apart from the evaluation's (run by hand)",
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}: use one of {', '.join(TASKS)}")
    return TASKS[name]
