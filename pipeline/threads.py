"""CPU thread policy for torch, applied by the CLI (and so by every DVC stage) before torch loads.

torch runs its CPU kernels on an OpenMP team of one thread per core, and by default a thread that
finishes its share early spins, waiting for the others. When another process holds one of the
cores, the thread that shares it gets a fraction of its time slices, and every parallel region
waits for it while the spinning threads compete for the same cores: runs on a 2-core machine with
other work on it became 4-13x slower than idle (issue 14). OMP_WAIT_POLICY=PASSIVE makes a waiting
thread sleep at once, so the one that is behind gets the core. OpenMP reads it once, when its
library loads with `import torch`: it has to be in the environment before that, which is why this
module imports nothing heavy and the CLI calls apply() first. A value the user set is kept.
bench/cpu_load.py measures the policy idle and with a busy loop pinned to one core.
"""

from __future__ import annotations

import os
from typing import MutableMapping

POLICY = {"OMP_WAIT_POLICY": "PASSIVE"}


def apply(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put the policy into the environment where the user has not chosen; returns what it set."""
    env = os.environ if environ is None else environ
    chosen = {key: value for key, value in POLICY.items() if key not in env}
    env.update(chosen)
    return chosen
