"""How a rollout ended: a closed set of exit statuses and what each means for training."""

from __future__ import annotations

from enum import Enum


class ExitStatus(str, Enum):
    """Why a trajectory ended. Recorded on every trajectory."""

    SUBMITTED = "submitted"  # the agent submitted (patch may still be empty or wrong)
    STEP_LIMIT = "step_limit"  # agent's step limit reached
    CONTEXT_LIMIT = "context_limit"  # response budget / context window exhausted
    ROLLOUT_TIMEOUT = "rollout_timeout"  # whole-rollout wall-clock limit
    AGENT_ERROR = "agent_error"  # the agent crashed or gave up (e.g. repeated format errors)
    SANDBOX_ERROR = "sandbox_error"  # the sandbox could not be made or the task is broken
    PROXY_ERROR = "proxy_error"  # the model proxy / generation backend failed
    REWARD_ERROR = "reward_error"  # grading itself failed (not the patch)

    @property
    def is_limit(self) -> bool:
        """Ended by a budget rather than by the agent's choice (DeepSWE masks these)."""
        return self in (ExitStatus.STEP_LIMIT, ExitStatus.CONTEXT_LIMIT, ExitStatus.ROLLOUT_TIMEOUT)

    @property
    def is_infra_failure(self) -> bool:
        """Our infrastructure failed; the policy is not to blame, so it never reaches the loss."""
        return self in (ExitStatus.SANDBOX_ERROR, ExitStatus.PROXY_ERROR, ExitStatus.REWARD_ERROR)


# mini-swe-agent's exit_status strings (its exception class names) -> ours.
_MINI_SWE_AGENT_STATUS = {
    "Submitted": ExitStatus.SUBMITTED,
    "LimitsExceeded": ExitStatus.STEP_LIMIT,
    "TimeExceeded": ExitStatus.ROLLOUT_TIMEOUT,
    "ContextWindowExceededError": ExitStatus.CONTEXT_LIMIT,
    "RepeatedFormatError": ExitStatus.AGENT_ERROR,
    "APIConnectionError": ExitStatus.PROXY_ERROR,
    "InternalServerError": ExitStatus.PROXY_ERROR,
    "ServiceUnavailableError": ExitStatus.PROXY_ERROR,
    "Timeout": ExitStatus.PROXY_ERROR,
    "APIError": ExitStatus.PROXY_ERROR,
}


def from_mini_swe_agent(exit_status: str) -> ExitStatus:
    """Map a mini-swe-agent ``exit_status`` (see ``minisweagent.exceptions``) to ours.

    Unknown statuses (an uncaught exception's class name) are agent errors.
    """
    return _MINI_SWE_AGENT_STATUS.get(exit_status, ExitStatus.AGENT_ERROR)
