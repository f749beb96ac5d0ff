"""Fault injection for the crash tests: kill this process at a named point of a run.

Set ``VLRM_KILL_AT`` to ``<point>:<step>`` (e.g. ``save:4``: inside the checkpoint of step 4,
after the policy is written and before the trainer state; ``step:3``: right after update 3
is logged). The process then sends itself SIGKILL there: no cleanup, no ``finally``, as a
preemption or the OOM killer would. Unset (always, outside tests) it does nothing.
"""

from __future__ import annotations

import os
import signal

ENV = "VLRM_KILL_AT"


def fault_point(point: str, step: int) -> None:
    """Die by SIGKILL if ``VLRM_KILL_AT`` names this point and step."""
    if os.environ.get(ENV) == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
