"""Exit codes of every Tetherlab command (``tetherlab``, ``tether``), defined once.

Scripts rely on them: ``0`` success; ``1`` the operation failed or was refused; ``2`` bad usage or
configuration; ``3`` the cluster (its quorum) could not be reached; ``4`` ``tether run``: the agent
was stopped by a verdict; ``5`` ``tether run``: it was stopped and its changes reverted (stashed).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    OK = 0
    FAILED = 1  # the operation failed or was refused (no leader, a refusal, a check that failed)
    USAGE = 2  # bad flags, a bad or missing configuration file
    UNAVAILABLE = 3  # no quorum-backed answer: the cluster could not be reached
    STOPPED = 4  # tether run: a verdict (or failing closed) stopped the agent
    REVERTED = 5  # tether run: the agent was stopped and its work stashed, the tree reset to its base


EXIT_OK = ExitCode.OK
EXIT_FAILED = ExitCode.FAILED
EXIT_USAGE = ExitCode.USAGE
EXIT_UNAVAILABLE = ExitCode.UNAVAILABLE
EXIT_STOPPED = ExitCode.STOPPED
EXIT_REVERTED = ExitCode.REVERTED
