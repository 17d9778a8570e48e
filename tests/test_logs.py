from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from agent.logs import RateLimiter, configure_logging, redact, register_secret, warn_every

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    access_level = logging.getLogger("aiohttp.access").level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(access_level)


def setup(level: str = "info", fmt: str = "json") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level, fmt, stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_shape() -> None:
    stream = setup()
    logging.getLogger("agent.spool").info("stored %d rows", 3, extra={"run": "r1", "n": 3, "obj": object()})
    (line,) = lines(stream)
    assert set(line) == {"ts", "level", "logger", "msg", "run", "n", "obj"}
    assert TS.match(str(line["ts"]))
    assert (line["level"], line["logger"], line["msg"]) == ("info", "agent.spool", "stored 3 rows")
    assert (line["run"], line["n"]) == ("r1", 3)
    assert str(line["obj"]).startswith("<object object at")


def test_json_exception() -> None:
    stream = setup()
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("agent.upload").exception("upload failed")
    (line,) = lines(stream)
    assert line["level"] == "error" and line["msg"] == "upload failed"
    assert "Traceback" in str(line["exc"]) and "ValueError: boom" in str(line["exc"])


def test_auto_format_follows_tty() -> None:
    stream = io.StringIO()
    configure_logging("info", "auto", stream=stream)
    logging.getLogger("agent").info("hello")
    assert json.loads(stream.getvalue())["msg"] == "hello"
    tty = FakeTTY()
    configure_logging("info", "auto", stream=tty)
    logging.getLogger("agent.spool").warning("disk %s", "full", extra={"free": 0, "path": "/a b"})
    assert re.fullmatch(r'\S+Z WARNING agent\.spool: disk full free=0 path="/a b"\n', tty.getvalue())


def test_text_exception_follows_line() -> None:
    stream = setup(fmt="text")
    try:
        raise KeyError("k")
    except KeyError:
        logging.getLogger("agent").error("failed", exc_info=True)
    first, *rest = stream.getvalue().splitlines()
    assert first.endswith("ERROR agent: failed") and TS.match(first.split()[0])
    assert rest[0] == "Traceback (most recent call last):"


def test_levels_and_reconfigure() -> None:
    stream = setup("warning")
    logging.getLogger("agent").info("hidden")
    logging.getLogger("agent").warning("shown")
    assert [line["msg"] for line in lines(stream)] == ["shown"]
    assert logging.getLogger("aiohttp.access").getEffectiveLevel() == logging.WARNING
    stream2 = setup("debug")  # replaces the first handler instead of adding a second
    logging.getLogger("agent").debug("debug now")
    assert [line["msg"] for line in lines(stream)] == ["shown"]
    assert [line["msg"] for line in lines(stream2)] == ["debug now"]
    assert logging.getLogger("aiohttp.access").getEffectiveLevel() == logging.DEBUG
    with pytest.raises(ValueError):
        configure_logging("verbose", "json")


# ---- redaction ----

def test_registered_secret_is_masked_everywhere() -> None:
    secret = "tok-5f1c0e9a2b"
    register_secret(secret)
    register_secret(None)
    register_secret("")
    stream = setup()
    log = logging.getLogger("agent.sources")
    log.info("client sent %s", secret, extra={"detail": f"x{secret}y", "items": [secret]})
    try:
        raise RuntimeError(f"upstream said {secret}")
    except RuntimeError:
        log.exception("failed")
    output = stream.getvalue()
    assert secret not in output
    first, second = lines(stream)
    assert (first["msg"], first["detail"], first["items"]) == ("client sent ***", "x***y", ["***"])
    assert "upstream said ***" in str(second["exc"])


def test_bearer_and_auth_headers_are_masked() -> None:
    stream = setup(fmt="text")
    log = logging.getLogger("agent.upstream")
    log.warning("sent Bearer abc upstream")
    log.warning("headers %s", {"Authorization": "Basic dXNlcjpwYXNz", "Accept": "application/json"})
    log.warning("retrying", extra={"ingest_token": "t0p", "password": "pw", "authorization": "Bearer q"})
    out = stream.getvalue()
    for leaked in ("abc", "dXNlcjpwYXNz", "t0p", "pw\"", "Bearer q"):
        assert leaked not in out
    assert "Bearer ***" in out and "application/json" in out
    assert 'ingest_token=*** password=*** authorization=***' in out


@pytest.mark.parametrize(("text", "expected"), [
    ("Authorization: Bearer abc.def", "Authorization: ***"),
    ("bearer xyz", "bearer ***"),
    ("GET /?token=abc&x=1", "GET /?token=***&x=1"),
    ("MLFLOW_TRACKING_PASSWORD=hunter2 set", "MLFLOW_TRACKING_PASSWORD=*** set"),
    ('{"api_key": "k1"}', '{"api_key": "***"}'),
    ("https://alice:hunter2@mlflow.example.com/api", "https://alice:***@mlflow.example.com/api"),
    ("basic setup done", "basic setup done"),
    ("missing ingest token: check the config", "missing ingest token: check the config"),
    ("nothing to hide", "nothing to hide"),
])
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


# ---- rate limiting ----

def test_warn_every_with_fake_clock(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    log = logging.getLogger("agent.upload")
    caplog.set_level(logging.WARNING, logger="agent.upload")

    assert warn_every(log, "retry", 60, "upstream down: %s", "503", limiter=limiter)
    clock.now += 10
    assert not warn_every(log, "retry", 60, "upstream down: %s", "503", limiter=limiter)
    assert not warn_every(log, "retry", 60, "upstream down: %s", "503", limiter=limiter)
    assert warn_every(log, "other", 60, "spool full", limiter=limiter)  # keys are independent
    clock.now += 50
    assert warn_every(log, "retry", 60, "upstream down: %s", "502", limiter=limiter)
    clock.now += 61
    assert warn_every(log, "retry", 60, "100% broken", limiter=limiter)

    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "upstream down: 503",
        "spool full",
        "upstream down: 502 (2 similar messages suppressed)",
        "100% broken",
    ]
    assert [getattr(r, "suppressed", 0) for r in caplog.records] == [0, 0, 2, 0]
    assert all(r.levelno == logging.WARNING for r in caplog.records)
    assert caplog.records[0].funcName == "test_warn_every_with_fake_clock"


def test_rate_limiter_log_directly(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    limiter = RateLimiter(clock=clock)
    log = logging.getLogger("agent.x")
    caplog.set_level(logging.INFO, logger="agent.x")
    assert limiter.log(log, "k", 1.0, "a", level=logging.INFO, extra={"run": "r"})
    assert not limiter.log(log, "k", 1.0, "a", level=logging.INFO)
    (record,) = caplog.records
    assert record.funcName == "test_rate_limiter_log_directly" and getattr(record, "run", None) == "r"
    assert limiter.allow("fresh", 5.0) == 0 and limiter.allow("fresh", 5.0) is None
    clock.now += 5
    assert limiter.allow("fresh", 5.0) == 1
