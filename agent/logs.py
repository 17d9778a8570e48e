"""Logging for the agent: JSON lines for machines, one readable line per record on a terminal,
secrets masked on the way out, and a rate limiter for warnings that could otherwise flood the log.

JSON line: ``{"ts": "2026-11-25T12:00:00.123Z", "level": "info", "logger": "agent.spool", "msg": ...,
<extra fields>, "exc": <traceback>}``. Text line: ``2026-11-25T12:00:00.123Z INFO agent.spool: msg k=v``.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from datetime import datetime, timezone
from typing import Any, TextIO

import orjson

MASK = "***"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "taskName",
}
_SECRET_KEY = re.compile(r"token|passw(or)?d|secret|authorization|api[_-]?key|cookie", re.IGNORECASE)
_TEXT_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization: Bearer x / "authorization": "Basic x" / authorization=x
    (re.compile(r"""(?i)(authorization["']?\s*[:=]\s*["']?)(?:(?:bearer|basic|token)\s+)?[^\s"',;}]+"""),
     rf"\g<1>{MASK}"),
    (re.compile(r"(?i)\b(bearer\s+)[\w.~+/=-]+"), rf"\g<1>{MASK}"),
    (re.compile(r"\b(Basic\s+)[A-Za-z0-9+/=]{4,}"), rf"\g<1>{MASK}"),
    # token=x, "password": "x", MLFLOW_TRACKING_PASSWORD=x, ?api_key=x
    (re.compile(r"""(?i)([\w-]*(?:token|passw(?:or)?d|secret|api[_-]?key)(?:\s*=\s*|["']\s*[:=]\s*)["']?)"""
                r"""(?!\*\*\*)[^\s"'&,;}]+"""), rf"\g<1>{MASK}"),
    (re.compile(r"(://[^/\s:@]+:)[^/\s@]+@"), rf"\g<1>{MASK}@"),  # https://user:password@host
)

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_HANDLER_MARK = "_mlflow_agent_handler"


def register_secret(value: str | None) -> None:
    """Mask every later occurrence of ``value`` (e.g. a token the agent holds) in log output."""
    if value:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    """``text`` with registered secrets, auth headers and ``token=...``-style values masked."""
    for secret in sorted(_secrets, key=len, reverse=True):
        text = text.replace(secret, MASK)
    for pattern, replacement in _TEXT_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _redact_value(key: str, value: object) -> object:
    if isinstance(value, str | bytes) and _SECRET_KEY.search(key):
        return MASK
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, Mapping):
        return {k: _redact_value(str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(key, v) for v in value]
    return value


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class Redactor(logging.Filter):
    """Handler filter: rewrites each record so that no secret reaches any output (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad %-format: keep the raw text rather than lose the record
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact(message), None
        for key, value in _extras(record).items():
            setattr(record, key, _redact_value(key, value))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _timestamp(record: logging.LogRecord) -> str:
    when = datetime.fromtimestamp(record.created, tz=timezone.utc)
    return f"{when:%Y-%m-%dT%H:%M:%S}.{int(record.msecs):03d}Z"


def _jsonable(value: object) -> object:
    try:
        orjson.dumps(value)
    except TypeError:
        return str(value)
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            line.setdefault(key, _jsonable(value))
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return orjson.dumps(line).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, f"{record.name}:", record.getMessage()]
        parts.extend(f"{key}={_text_value(value)}" for key, value in _extras(record).items())
        text = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        return text


def _text_value(value: object) -> str:
    if isinstance(value, str) and value and not re.search(r"[\s\"'=]", value):
        return value
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return orjson.dumps(str(value)).decode()


def configure_logging(level: str, fmt: str, *, stream: TextIO | None = None) -> None:
    """Send the root logger to ``stream`` (stderr) as JSON or text; ``fmt="auto"``: text on a TTY.

    Calling it again replaces the handler it installed before (and leaves other handlers alone).
    """
    if level.lower() not in LEVELS or fmt not in ("auto", "json", "text"):
        raise ValueError(f"bad log level {level!r} or format {fmt!r}")
    stream = sys.stderr if stream is None else stream
    if fmt == "auto":
        isatty = getattr(stream, "isatty", None)
        fmt = "text" if callable(isatty) and isatty() else "json"
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TextFormatter() if fmt == "text" else JsonFormatter())
    handler.addFilter(Redactor())
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _HANDLER_MARK, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(LEVELS[level.lower()])
    debug = level.lower() == "debug"
    logging.getLogger("aiohttp.access").setLevel(logging.NOTSET if debug else logging.WARNING)
    logging.captureWarnings(True)


class RateLimiter:
    """Lets a message through at most once per ``interval_s`` per key, counting what it holds back."""

    _MAX_KEYS = 4096

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._state: dict[Hashable, list[float]] = {}  # key -> [last emitted at, interval, suppressed]

    def allow(self, key: Hashable, interval_s: float) -> int | None:
        """The number suppressed since the last emission if this one may go out now, else None."""
        now = self._clock()
        with self._lock:
            state = self._state.get(key)
            if state is not None and now - state[0] < interval_s:
                state[2] += 1
                return None
            if state is None and len(self._state) >= self._MAX_KEYS:
                self._state = {k: s for k, s in self._state.items() if now - s[0] < s[1]}
            self._state[key] = [now, interval_s, 0]
            return 0 if state is None else int(state[2])

    def log(self, logger: logging.Logger, key: Hashable, interval_s: float, msg: str, *args: object,
            level: int = logging.WARNING, extra: Mapping[str, object] | None = None,
            stacklevel: int = 1) -> bool:
        """Log ``msg % args`` unless the same key was logged less than ``interval_s`` ago."""
        if not logger.isEnabledFor(level):
            return False
        suppressed = self.allow((logger.name, key), interval_s)
        if suppressed is None:
            return False
        text = msg % args if args else msg
        fields = dict(extra or {})
        if suppressed:
            text += f" ({suppressed} similar messages suppressed)"
            fields["suppressed"] = suppressed
        logger.log(level, "%s", text, extra=fields, stacklevel=stacklevel + 1)
        return True


_default_limiter = RateLimiter()


def warn_every(logger: logging.Logger, key: Hashable, interval_s: float, msg: str, *args: object,
               limiter: RateLimiter | None = None, extra: Mapping[str, object] | None = None) -> bool:
    """Warn at most once per ``interval_s`` per ``key``; the next warning says how many were held back.

    Returns whether the warning was emitted. Pass ``limiter=RateLimiter(clock=...)`` to fake time.
    """
    limiter = _default_limiter if limiter is None else limiter
    return limiter.log(logger, key, interval_s, msg, *args, extra=extra, stacklevel=2)
