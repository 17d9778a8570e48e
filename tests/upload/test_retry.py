"""The retry policy: exponential backoff with jitter, Retry-After honoured, auth renewal, deadline."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from tenacity import AsyncRetrying, RetryCallState

from agent.ops.metrics import AgentMetrics
from agent.upload.retry import RetryPolicy
from agent.upstream.rest import AuthError, PermanentError, TransientError, UpstreamError


class Recorder:
    """An on_auth_error hook that records its calls."""

    def __init__(self) -> None:
        self.calls: list[AuthError] = []

    async def __call__(self, exc: AuthError) -> None:
        self.calls.append(exc)


def make_policy(*, initial: float = 0.001, maximum: float = 0.004, deadline: float | None = None,
                hook: Callable[[AuthError], Awaitable[object]] | None = None) -> tuple[RetryPolicy, AgentMetrics]:
    metrics = AgentMetrics()
    policy = RetryPolicy(metrics, initial=initial, maximum=maximum, deadline=deadline,
                         on_auth_error=hook or Recorder())
    return policy, metrics


def record_waits(policy: RetryPolicy, monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    real = policy.wait

    def wait(state: RetryCallState) -> float:
        waits.append(real(state))
        return waits[-1]

    monkeypatch.setattr(policy, "wait", wait)
    return waits


def failing_state(exc: BaseException, attempt: int) -> RetryCallState:
    state = RetryCallState(AsyncRetrying(), fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    state.set_exception((type(exc), exc, None))
    return state


class Flaky:
    """Raises the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


def retries(metrics: AgentMetrics, reason: str) -> float:
    return metrics.registry.get_sample_value("mlflow_agent_upload_retries_total", {"reason": reason}) or 0.0


# --- wait ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", [1, 2, 7])
def test_wait_is_the_retry_after_the_upstream_asked_for(attempt: int) -> None:
    policy, _ = make_policy(initial=100.0, maximum=200.0)
    exc = TransientError("HTTP 429", status=429, retry_after=3.5)
    assert policy.wait(failing_state(exc, attempt)) == 3.5
    # even beyond the backoff cap: the upstream knows best
    assert policy.wait(failing_state(TransientError("x", status=503, retry_after=400.0), attempt)) == 400.0


def test_wait_without_retry_after_is_jittered_and_capped() -> None:
    policy, _ = make_policy(initial=1.0, maximum=8.0)
    for attempt in range(1, 12):
        for _ in range(20):
            w = policy.wait(failing_state(TransientError("x", status=503), attempt))
            assert 0.0 <= w <= min(8.0, 2.0 ** (attempt - 1))
    # the jitter is random: not always the same value
    assert len({policy.wait(failing_state(TransientError("x"), 5)) for _ in range(20)}) > 1


def test_first_retry_after_an_auth_error_is_immediate() -> None:
    policy, _ = make_policy(initial=5.0, maximum=5.0)
    assert policy.wait(failing_state(AuthError("HTTP 401", status=401), 1)) == 0.0
    later = [policy.wait(failing_state(AuthError("HTTP 401", status=401), 2)) for _ in range(20)]
    assert all(0.0 <= w <= 5.0 for w in later) and max(later) > 0.0


# --- run -----------------------------------------------------------------------------------------


async def test_success_needs_no_retry() -> None:
    policy, metrics = make_policy()
    fn = Flaky()
    assert await policy.run("x", fn) == "ok"
    assert fn.calls == 1
    assert retries(metrics, "503") == 0


async def test_transient_errors_are_retried_honouring_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    policy, metrics = make_policy(initial=0.001, maximum=0.002)
    waits = record_waits(policy, monkeypatch)
    fn = Flaky(TransientError("HTTP 429", status=429, retry_after=0.02),
               TransientError("HTTP 503", status=503, retry_after=0.0),
               TransientError("connection reset"))
    started = time.monotonic()
    assert await policy.run("log-batch", fn) == "ok"
    assert fn.calls == 4
    assert waits[:2] == [0.02, 0.0] and 0.0 <= waits[2] <= 0.004
    assert time.monotonic() - started >= 0.02  # the Retry-After was actually waited
    assert (retries(metrics, "429"), retries(metrics, "503"), retries(metrics, "network")) == (1, 1, 1)


async def test_auth_error_renews_credentials_and_retries_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    hook = Recorder()
    policy, metrics = make_policy(initial=0.001, maximum=0.003, hook=hook)
    waits = record_waits(policy, monkeypatch)
    first, second = AuthError("HTTP 401", status=401), AuthError("HTTP 403", status=403)
    fn = Flaky(first, second)
    assert await policy.run("x", fn) == "ok"
    assert fn.calls == 3
    assert hook.calls == [first, second]  # the hook sees every auth failure
    assert waits[0] == 0.0 and 0.0 <= waits[1] <= 0.003
    assert retries(metrics, "auth") == 2


async def test_permanent_error_is_not_retried() -> None:
    hook = Recorder()
    policy, metrics = make_policy(hook=hook)
    refusal = PermanentError("HTTP 400", status=400, error_code="INVALID_PARAMETER_VALUE")
    fn = Flaky(refusal)
    with pytest.raises(PermanentError) as info:
        await policy.run("x", fn)
    assert info.value is refusal
    assert fn.calls == 1
    assert hook.calls == []
    assert sum(retries(metrics, r) for r in ("400", "auth", "network")) == 0


async def test_other_exceptions_are_not_retried() -> None:
    policy, _ = make_policy()
    fn = Flaky(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        await policy.run("x", fn)
    assert fn.calls == 1


async def test_deadline_stops_retrying_with_the_last_error() -> None:
    policy, metrics = make_policy(initial=0.001, maximum=0.002, deadline=0.05)
    last: list[UpstreamError] = []
    started = time.monotonic()

    async def always_down() -> Any:
        if time.monotonic() - started > 5.0:
            raise AssertionError("the deadline was not honoured")  # not retried: ends the test
        last.append(TransientError(f"down #{len(last)}", status=503))
        raise last[-1]

    with pytest.raises(TransientError) as info:
        await policy.run("x", always_down)
    elapsed = time.monotonic() - started
    assert info.value is last[-1]
    assert len(last) > 1
    assert 0.05 <= elapsed < 5.0
    assert retries(metrics, "503") == len(last) - 1


async def test_without_deadline_retries_go_on() -> None:
    for deadline in (None, 0.0):  # 0 means "never give up", as in the configuration
        policy, _ = make_policy(initial=0.0001, maximum=0.0001, deadline=deadline)
        fn = Flaky(*[TransientError("down", status=502) for _ in range(30)])
        assert await policy.run("x", fn) == "ok"
        assert fn.calls == 31
