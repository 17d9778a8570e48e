"""Classifying upstream answers: which errors are retried, which renew credentials, which are final."""

from __future__ import annotations

import email.utils
import time
from collections.abc import Iterator

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from agent.ops.metrics import AgentMetrics
from agent.upstream.rest import (
    AuthError,
    PermanentError,
    TransientError,
    UpstreamError,
    UpstreamHealth,
    classify,
    parse_retry_after,
)

NOW = 1_700_000_000.0

EXPECTED: dict[int, type[UpstreamError]] = {
    400: PermanentError,
    401: AuthError,
    403: AuthError,
    404: PermanentError,
    408: TransientError,
    429: TransientError,
    500: TransientError,
    501: PermanentError,
    502: TransientError,
    503: TransientError,
    504: TransientError,
}


# --- classify ------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", sorted(EXPECTED))
def test_classify_with_an_mlflow_error_body(status: int) -> None:
    body = orjson.dumps({"error_code": "SOME_CODE", "message": "what went wrong", "details": []})
    exc = classify(status, body, CIMultiDict())
    assert type(exc) is EXPECTED[status]
    assert exc.status == status
    assert exc.error_code == "SOME_CODE"
    assert str(exc) == f"HTTP {status} SOME_CODE: what went wrong"  # for logs
    assert exc.message == "what went wrong"  # the upstream's own words, for clients
    assert exc.retry_after is None


@pytest.mark.parametrize("status", sorted(EXPECTED))
def test_classify_with_a_body_that_is_not_json(status: int) -> None:
    exc = classify(status, b"<html>Bad Gateway</html>", CIMultiDict())
    assert type(exc) is EXPECTED[status]
    assert exc.status == status
    assert exc.error_code is None
    assert str(exc) == f"HTTP {status}: <html>Bad Gateway</html>"
    assert exc.message == "<html>Bad Gateway</html>"


@pytest.mark.parametrize("status", sorted(EXPECTED))
@pytest.mark.parametrize("header", ["7", "7.0", " 7 "])
def test_classify_takes_retry_after_seconds(status: int, header: str) -> None:
    exc = classify(status, b"", CIMultiDict({"retry-after": header}))  # header names are case-insensitive
    assert type(exc) is EXPECTED[status]
    # credentials are renewed and retried at once: a Retry-After on 401/403 is not kept
    assert exc.retry_after == (None if exc.status in (401, 403) else 7.0)


@pytest.mark.parametrize("status", [429, 503])
def test_classify_takes_retry_after_as_an_http_date(status: int) -> None:
    header = email.utils.formatdate(time.time() + 120, usegmt=True)
    exc = classify(status, orjson.dumps({"error_code": "REQUEST_LIMIT_EXCEEDED", "message": "slow down"}),
                   CIMultiDict({"Retry-After": header}))
    assert isinstance(exc, TransientError)
    assert exc.retry_after is not None and 115.0 <= exc.retry_after <= 121.0
    assert exc.error_code == "REQUEST_LIMIT_EXCEEDED"


@pytest.mark.parametrize(
    ("body", "code", "message"),
    [
        (b"", None, ""),
        (b"[1, 2]", None, "[1, 2]"),  # JSON, but not an object
        (b'{"error_code": 5, "message": "m"}', None, "m"),  # a code that is not a string is ignored
        (b'{"error_code": "X", "message": 7}', "X", '{"error_code": "X", "message": 7}'),
        (b'{"message": "only a message"}', None, "only a message"),
        (b"\xff\xfe broken utf-8", None, "\ufffd\ufffd broken utf-8"),
    ],
)
def test_classify_odd_bodies(body: bytes, code: str | None, message: str) -> None:
    exc = classify(400, body, CIMultiDict())
    assert isinstance(exc, PermanentError)
    assert exc.error_code == code
    assert exc.message == message
    assert str(exc) == f"HTTP 400{' ' + code if code else ''}: {message}"


def test_classify_keeps_only_the_start_of_a_long_body() -> None:
    exc = classify(502, b"x" * 5000, CIMultiDict())
    assert exc.message == "x" * 500
    assert str(exc) == "HTTP 502: " + "x" * 500


@given(status=st.integers(400, 599), body=st.binary(max_size=300), header=st.none() | st.text(max_size=40))
def test_classify_never_fails(status: int, body: bytes, header: str | None) -> None:
    headers: CIMultiDict[str] = CIMultiDict() if header is None else CIMultiDict({"Retry-After": header})
    exc = classify(status, body, headers)
    assert exc.status == status
    assert isinstance(exc, AuthError) == (status in (401, 403))
    assert isinstance(exc, TransientError) == (status in (408, 429) or (status >= 500 and status != 501))
    assert exc.retry_after is None or 0.0 <= exc.retry_after <= 600.0


# --- Retry-After ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("   ", None),
        ("0", 0.0),
        ("5", 5.0),
        (" 2.5 ", 2.5),
        ("-3", 0.0),  # never negative
        ("100000", 600.0),  # capped
        ("inf", 600.0),
        ("nan", None),
        ("soon", None),
        ("Tue, 99 Foo 2024 25:61:61 GMT", None),
    ],
)
def test_parse_retry_after_seconds(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def http_date(t: float, style: str) -> str:
    formats = {
        "imf": "%a, %d %b %Y %H:%M:%S GMT",  # the preferred format
        "rfc850": "%A, %d-%b-%y %H:%M:%S GMT",  # obsolete, but recipients must accept it
        "asctime": "%a %b %e %H:%M:%S %Y",  # obsolete, always GMT, no zone written
    }
    return time.strftime(formats[style], time.gmtime(t))


@pytest.fixture
def local_zone(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run the test with the process's local time zone set to ``request.param``."""
    zone: str = request.param
    monkeypatch.setenv("TZ", zone)
    time.tzset()
    try:
        yield zone
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("style", ["imf", "rfc850", "asctime"])
@pytest.mark.parametrize("local_zone", ["UTC", "Etc/GMT+5", "Asia/Tokyo"], indirect=True)
def test_parse_retry_after_dates_are_gmt_whatever_the_local_zone(style: str, local_zone: str) -> None:
    assert parse_retry_after(http_date(NOW + 120, style), now=NOW) == 120.0
    assert parse_retry_after(http_date(NOW - 120, style), now=NOW) == 0.0  # in the past: at once
    assert parse_retry_after(http_date(NOW + 86400, style), now=NOW) == 600.0


# --- health --------------------------------------------------------------------------------------


def test_upstream_health_follows_answers() -> None:
    metrics = AgentMetrics()
    health = UpstreamHealth(metrics)
    assert health.up is None and not health.known_down
    health.failed("connection refused")
    assert health.known_down and health.last_error == "connection refused"
    assert metrics.registry.get_sample_value("mlflow_agent_upstream_up") == 0
    changed = health.changed_at
    health.failed("still refused")
    assert health.changed_at == changed and health.last_error == "still refused"
    health.answered()
    assert health.up is True and health.last_error is None and not health.known_down
    assert metrics.registry.get_sample_value("mlflow_agent_upstream_up") == 1


def test_azure_error_envelope_gives_code_message_and_correlation() -> None:
    body = (b'{"error": {"code": "UserError", "message": "FieldName=Parameters, Limit=200, Size=210"},'
            b' "correlation": {"operation": "op-1", "request": "req-2"}}')
    error = classify(400, body, {})
    assert isinstance(error, PermanentError)
    assert error.error_code == "UserError"
    assert error.message == "FieldName=Parameters, Limit=200, Size=210"
    assert "operation=op-1" in str(error) and "request=req-2" in str(error)
    throttled = classify(429, b'{"error": {"code": "TooManyRequests", "message": "slow down"}}',
                         {"Retry-After": "3", "x-ms-request-id": "abc"})
    assert isinstance(throttled, TransientError) and throttled.retry_after == 3.0
    assert "x-ms-request-id=abc" in str(throttled)
