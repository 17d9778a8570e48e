"""The retry policy for upstream calls, built on tenacity.

Exponential backoff with full jitter, capped; no give-up deadline unless configured (data waits for
the upstream). A Retry-After from the upstream (429/503) is honoured as given. On 401/403 the
credential provider is asked to renew, and the first retry after that goes at once.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_delay,
    stop_never,
    wait_random_exponential,
)
from tenacity.stop import StopBaseT

from agent.logs import RateLimiter
from agent.ops.metrics import AgentMetrics
from agent.upstream.rest import AuthError, TransientError, UpstreamError

_RETRY_LOGS = RateLimiter()
log = logging.getLogger("agent.upload")

T = TypeVar("T")


class RetryPolicy:
    def __init__(
        self,
        metrics: AgentMetrics,
        *,
        initial: float,
        maximum: float,
        deadline: float | None,
        on_auth_error: Callable[[AuthError], Awaitable[object]],
    ) -> None:
        self._metrics = metrics
        self._jitter = wait_random_exponential(multiplier=initial, max=maximum)
        self._maximum = maximum
        self._deadline = deadline
        self._on_auth_error = on_auth_error

    def wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, UpstreamError) and exc.retry_after is not None:
            delay = exc.retry_after
        elif isinstance(exc, AuthError) and state.attempt_number == 1:
            delay = 0.0  # fresh credentials: try again at once
        else:
            delay = float(self._jitter(state))
        if self._deadline:
            # One last attempt at the deadline rather than a sleep far past it.
            elapsed = state.seconds_since_start or 0.0
            delay = min(delay, max(0.0, self._deadline - elapsed))
        return delay

    def stop(self) -> StopBaseT:
        return stop_after_delay(self._deadline) if self._deadline else stop_never

    async def run(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Call ``fn`` until it succeeds, fails permanently, or the deadline passes (re-raising)."""
        retrying = AsyncRetrying(
            retry=retry_if_exception_type((TransientError, AuthError)),
            wait=self.wait,
            stop=self.stop(),
            before_sleep=lambda state: self._before_sleep(what, state),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                try:
                    return await fn()
                except AuthError as exc:
                    await self._on_auth_error(exc)
                    raise
        raise AssertionError("unreachable: tenacity re-raises the last error")

    def _before_sleep(self, what: str, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, AuthError):
            reason = "auth"
        elif isinstance(exc, UpstreamError) and exc.status is not None:
            reason = str(exc.status)
        else:
            reason = "network"
        self._metrics.upload_retries.labels(reason=reason).inc()
        sleep = state.next_action.sleep if state.next_action is not None else 0.0
        # During an outage every run's worker retries: one line per reason every 10 s says it all (the
        # line counts the ones held back); the rest go to debug.
        message = "%s failed (attempt %d, retry in %.1fs): %s"
        args = (what, state.attempt_number, sleep, exc)
        if not _RETRY_LOGS.log(log, ("retry", reason), 10.0, message, *args, level=logging.INFO):
            log.debug(message, *args)
