"""Fault injection for the crash tests: XMODEL_FAULT=<action>_after_<what>:N, with action `kill`
(SIGKILL this process) or `ioerror` (fail like a full disk), fires once this process has passed N
fault points of that kind ("shards" written by the store, "steps" of aligner training, "writes" of
any artifact file through pipeline.artifacts, "commits": each rename of a stage's outputs into
place, "locks": a lock holder naming itself)."""

from __future__ import annotations

import os
from collections import Counter

_passed: Counter = Counter()


def fault_point(what: str) -> None:
    _passed[what] += 1
    fault = os.environ.get("XMODEL_FAULT", "")
    if not fault:
        return
    name, _, count = fault.partition(":")
    action, _, target = name.partition("_after_")
    if target != what or _passed[what] < int(count):
        return
    if action == "kill":
        import signal

        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "ioerror":
        import errno

        raise OSError(errno.ENOSPC, "No space left on device (injected by XMODEL_FAULT)")
