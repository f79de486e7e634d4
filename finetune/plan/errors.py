"""What the planner raises. Both are permanent: retrying a run cannot change its sizes."""

from __future__ import annotations

from finetune.stage import PermanentError


class PlanError(PermanentError):
    """The planner cannot size this profile (unknown GPU type, unreadable model config)."""


class PlanDoesNotFit(PermanentError):
    """The profile's run needs more memory than its GPUs or hosts have; the message has the figures and the fixes."""
