"""The CPU thread policy (pipeline/threads.py) is in the environment before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.helpers import ROOT

PROBE = """
import os, sys
from pipeline.cli import main
sys.argv = ["xmodel", "--help"]
try:
    main()
except SystemExit:
    pass
print(os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules)
"""


def _probe(**env: str) -> str:
    base = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**base, "PYTHONPATH": str(ROOT), **env},
                         capture_output=True, text=True, check=True, cwd=ROOT, timeout=120)
    return out.stdout.strip().splitlines()[-1]


def test_cli_sets_passive_wait_before_torch_loads():
    assert _probe() == "PASSIVE False"  # set, and torch not yet imported when it was


def test_a_policy_the_user_chose_is_kept():
    from pipeline.threads import apply

    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert apply(env) == {} and env == {"OMP_WAIT_POLICY": "ACTIVE"}
    assert _probe(OMP_WAIT_POLICY="ACTIVE") == "ACTIVE False"
