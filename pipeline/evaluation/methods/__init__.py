"""Communication methods on the same items: the registry (registry.py), what a method is
(base.py), the runner and a task's result (run.py)."""

from pipeline.evaluation.methods.base import MethodRun, score_all
from pipeline.evaluation.methods.run import TaskResult, evaluate_task, run_methods

__all__ = ["MethodRun", "TaskResult", "evaluate_task", "run_methods", "score_all"]
