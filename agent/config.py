"""The agent's settings: one table (``SETTINGS``) drives the ``Settings`` dataclass, the command-line
flags, the ``MLFLOW_AGENT_*`` environment variables and the keys of the TOML file.

Precedence, lowest first: built-in default < TOML file (``--config FILE``, else ``$MLFLOW_AGENT_CONFIG``;
flat ``name = value`` keys at top level) < ``MLFLOW_AGENT_<NAME>`` environment variable (an empty
variable counts as unset) < ``--<name-with-dashes>`` flag. Unknown TOML keys and unknown
``MLFLOW_AGENT_*`` variables are errors, so a typo is never silently ignored.

=============================  ===================  ===================================================
setting (TOML key)             default              meaning
=============================  ===================  ===================================================
upstream                       $MLFLOW_TRACKING_URI MLflow server: http(s)://host[:port][/prefix],
                                                    azureml://..., or ``none`` to run offline
http                           127.0.0.1:5050       HOST:PORT to serve on ([::1]:5050 for IPv6; port 0 =
                                                    any free port)
udp                            127.0.0.1:5051       UDP datagram endpoint HOST:PORT, or ``none``
ops_http                       (none)               extra HOST:PORT serving only /healthz, /readyz and
                                                    /metrics (probes, scraping)
uds                            (none)               Unix datagram socket path
uds_mode                       0600                 permissions of the Unix socket (0600 or 0660)
udp_rcvbuf                     8MiB                 receive buffer asked of the kernel for datagrams
azureml_config                 (none)               an Azure ML workspace's config.json (instead of
                                                    ``upstream``); its host is found through ARM once
azure_credential               default              Azure credential outside jobs: default
                                                    (azure-identity) or azureml-core
azure_arm_endpoint             https://management.azure.com
                                                    Azure Resource Manager (sovereign clouds differ)
token_file                     (none)               file holding the upstream's bearer token (re-read on change)
token_command                  (none)               command printing the upstream's bearer token and expiry
spool_dir                      (see below)          spool directory: $STATE_DIRECTORY, else
                                                    $XDG_STATE_HOME/mlflow-agent, else
                                                    ~/.local/state/mlflow-agent
spool_max_bytes                1GiB                 spool size cap (at least 1MiB)
overflow_policy                drop_oldest          when the spool is full: drop_oldest or reject
spool_sync                     normal               SQLite synchronous mode: normal or full
artifact_max_bytes             10GiB                disk budget for artifacts waiting for upload
drain_timeout                  20s                  how long shutdown waits to upload what is spooled
create_run_timeout             2s                   how long create-run waits for the server's run id
request_timeout                30s                  timeout of one upstream HTTP request (> 0)
upload_linger                  0.2s                 how long the uploader waits to fill a batch
retry_initial_backoff          0.5s                 first retry delay
retry_max_backoff              30s                  largest retry delay
retry_deadline                 none                 give up on an upload after this long (none/0 = never)
upload_max_in_flight           8                    concurrent upstream requests (1..256)
max_request_bytes              64MiB                largest request body accepted from clients
log_level                      info                 debug, info, warning or error
log_format                     auto                 auto (JSON unless stderr is a TTY), json or text
ingest_token                   (none)               SECRET bearer token clients must send; only from
                                                    $MLFLOW_AGENT_INGEST_TOKEN, the TOML file or
                                                    ``--ingest-token-file PATH``
allow_unauthenticated_bind     false                allow a non-loopback ``http`` without ingest_token
=============================  ===================  ===================================================

Sizes are integers with an optional unit: B, KB/MB/GB/TB (powers of 1000), KiB/MiB/GiB/TiB (powers of
1024). Durations are seconds, or a number with ms/s/m/h. Booleans: true/false/1/0/yes/no/on/off.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ENV_PREFIX = "MLFLOW_AGENT_"
CONFIG_ENV = "MLFLOW_AGENT_CONFIG"
MASK = "***"


class ConfigError(Exception):
    """A bad setting; ``str()`` is one line naming the setting and where its value came from."""

    def __init__(self, setting: str, message: str, source: str = "") -> None:
        self.setting, self.source, self.message = setting, source, " ".join(message.split())
        where = f" (from {source})" if source else ""
        super().__init__(f"invalid setting '{setting}'{where}: {self.message}")


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host.lower() == "localhost":
            return True
        try:
            ip = ipaddress.ip_address(self.host)
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            return ip.ipv4_mapped.is_loopback
        return ip.is_loopback


# ---- value parsers: each takes a TOML/env/flag value and raises ValueError("expected ...") ----

_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]i?b|b)?\s*", re.IGNORECASE)
_SIZE_UNITS: dict[str, int] = {"b": 1} | {
    f"{p}{i}b": (1024 if i else 1000) ** (n + 1) for n, p in enumerate("kmgt") for i in ("", "i")
}
_DURATION = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?\s*", re.IGNORECASE)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_HOSTPORT = re.compile(r"\s*(?:\[([0-9A-Fa-f:.]+)\]|([A-Za-z0-9._-]+)):(\d{1,5})\s*")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_size(text: str | int) -> int:
    """``"512MiB"`` -> 536870912; a bare integer is bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    m = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError("expected a size such as 512MiB")
    return int(m[1]) * _SIZE_UNITS[(m[2] or "b").lower()]


def parse_duration(text: str | float) -> float:
    """``"500ms"`` -> 0.5, ``"1.5m"`` -> 90.0; a bare number is seconds. Never negative."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if math.isfinite(text) and text >= 0:
            return float(text)
        raise ValueError("expected a duration of 0 or more seconds")
    m = _DURATION.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError("expected a duration such as 2s, 500ms, 1.5m or 1h")
    return float(m[1]) * _DURATION_UNITS[(m[2] or "s").lower()]


def parse_hostport(text: str) -> HostPort:
    """``"127.0.0.1:5050"`` or ``"[::1]:5050"``; port 0 means "pick a free port"."""
    m = _HOSTPORT.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ValueError("expected HOST:PORT such as 127.0.0.1:5050 or [::1]:5050")
    if m[1] is not None:
        try:
            ipaddress.IPv6Address(m[1])
        except ValueError:
            raise ValueError("expected an IPv6 address inside [...]") from None
    if int(m[3]) > 65535:
        raise ValueError("expected a port in 0..65535")
    return HostPort(m[1] or m[2], int(m[3]))


def _parse_upstream(value: object) -> str | None:
    text = value.strip() if isinstance(value, str) else ""
    if text.lower() == "none":
        return None
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "azureml") or not parts.netloc:
        raise ValueError("expected an http(s):// or azureml:// URL of an MLflow server, or 'none'")
    if "@" in parts.netloc:
        raise ValueError("credentials in the URL are not allowed; set MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
    if not parts.hostname:
        raise ValueError("expected a host in the URL")
    if scheme != "azureml":
        try:
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            raise ValueError("expected a port in 1..65535 in the URL") from None
        if parts.query or parts.fragment:
            raise ValueError("expected a URL without ?query or #fragment")
    else:
        # Old azureml-mlflow URIs carried an ARM token in the query: never keep (or log) it.
        text = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return text.rstrip("/")


def _choice(*options: str) -> Callable[[object], str]:
    def parse(value: object) -> str:
        if isinstance(value, str) and value.strip().lower() in options:
            return value.strip().lower()
        raise ValueError(f"expected one of {', '.join(options)}")

    return parse


def _size(minimum: int, shown: str) -> Callable[[object], int]:
    def parse(value: object) -> int:
        n = parse_size(value)  # type: ignore[arg-type]
        if n < minimum:
            raise ValueError(f"expected a size of at least {shown}")
        return n

    return parse


def _duration(*, positive: bool = False) -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = parse_duration(value)  # type: ignore[arg-type]
        if positive and seconds <= 0:
            raise ValueError("expected a duration greater than 0")
        return seconds

    return parse


def _optional_duration(value: object) -> float | None:
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    return parse_duration(value) or None  # type: ignore[arg-type]


def _int_range(lo: int, hi: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
            return value
        raise ValueError(f"expected an integer in {lo}..{hi}")

    return parse


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower() if isinstance(value, str | int) else ""
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError("expected true or false (or 1/0, yes/no, on/off)")


def _path(value: object) -> Path:
    if isinstance(value, str | Path) and str(value).strip():
        return Path(os.path.expanduser(str(value).strip()))
    raise ValueError("expected a directory path")


def _optional_hostport(value: object) -> HostPort | None:
    if isinstance(value, str) and value.strip().lower() in ("none", "off", ""):
        return None
    if not isinstance(value, str):
        raise ValueError("expected HOST:PORT or none")
    return parse_hostport(value)


def _optional_path(value: object) -> Path | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    if isinstance(value, str | Path):
        return Path(os.path.expanduser(str(value).strip()))
    raise ValueError("expected a path or none")


def _file_mode(value: object) -> int:
    text = str(value).strip()
    if re.fullmatch(r"0?[0-7]{3}", text):
        mode = int(text, 8)
        if mode & 0o077 & ~0o070 == 0:  # owner and group only: never world-writable
            return mode
    raise ValueError("expected an octal mode for owner and group only, such as 0600 or 0660")


def _optional_text(value: object) -> str | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "")):
        return None
    if isinstance(value, str):
        return value.strip()
    raise ValueError("expected a command line")


def _https_url(value: object) -> str:
    text = value.strip().rstrip("/") if isinstance(value, str) else ""
    parts = urlsplit(text)
    if parts.scheme.lower() != "https" or not parts.hostname or parts.path or parts.query or "@" in parts.netloc:
        raise ValueError("expected an https://host[:port] URL without a path")
    return text


def _token(value: object) -> str:
    if isinstance(value, str) and value.strip() and not any(c.isspace() for c in value.strip()):
        return value.strip()
    raise ValueError("expected a non-empty token without whitespace")


def _default_spool_dir(env: Mapping[str, str]) -> str:
    if env.get("STATE_DIRECTORY"):  # systemd StateDirectory=; may list several, ':'-separated
        return env["STATE_DIRECTORY"].split(":")[0]
    if env.get("XDG_STATE_HOME"):
        return str(Path(env["XDG_STATE_HOME"]) / "mlflow-agent")
    return "~/.local/state/mlflow-agent"


@dataclass(frozen=True)
class SettingDef:
    name: str
    parse: Callable[[Any], Any]
    default: Any  # a raw value (parsed like any other), a callable(env) giving one, or None for "unset"
    metavar: str
    help: str
    secret: bool = False

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        """Secrets never travel on the command line: their flag names a file holding the value."""
        return "--" + self.name.replace("_", "-") + ("-file" if self.secret else "")

    @property
    def default_text(self) -> str:
        if self.name == "upstream":
            return "$MLFLOW_TRACKING_URI if http(s), else required"
        if callable(self.default):
            return "$STATE_DIRECTORY, $XDG_STATE_HOME/mlflow-agent or ~/.local/state/mlflow-agent"
        return "none" if self.default is None else str(self.default).replace("False", "false")


_S, _DUR = SettingDef, "DURATION"
SETTINGS: tuple[SettingDef, ...] = (
    _S("upstream", _parse_upstream, None, "URI",
       "MLflow server URL (http(s)://host[:port][/prefix] or azureml://...), or 'none' (offline)"),
    _S("http", parse_hostport, "127.0.0.1:5050", "HOST:PORT", "address to serve on; port 0 = any free port"),
    _S("udp", _optional_hostport, "127.0.0.1:5051", "HOST:PORT", "UDP datagram endpoint, or 'none'"),
    _S("ops_http", _optional_hostport, None, "HOST:PORT",
       "also serve /healthz, /readyz and /metrics here (no data, no /status), e.g. 0.0.0.0:9090"),
    _S("uds", _optional_path, None, "PATH", "Unix datagram socket path (none by default)"),
    _S("uds_mode", _file_mode, "0600", "MODE", "permissions of the Unix socket: 0600 or 0660"),
    _S("udp_rcvbuf", _size(4096, "4KiB"), "8MiB", "SIZE", "receive buffer asked of the kernel for datagrams"),
    _S("azureml_config", _optional_path, None, "PATH",
       "Azure ML workspace config.json (or a directory holding it) instead of --upstream"),
    _S("azure_credential", _choice("default", "azureml-core"), "default", "SOURCE",
       "Azure credential outside Azure ML jobs: default (azure-identity) or azureml-core"),
    _S("azure_arm_endpoint", _https_url, "https://management.azure.com", "URL",
       "Azure Resource Manager endpoint (its /.default is the token scope)"),
    _S("token_file", _optional_path, None, "PATH", "file holding the upstream bearer token; re-read when it changes"),
    _S("token_command", _optional_text, None, "CMD", "command printing the upstream bearer token (and its expiry)"),
    _S("spool_dir", _path, _default_spool_dir, "DIR", "directory of the SQLite spool"),
    _S("spool_max_bytes", _size(1 << 20, "1MiB"), "1GiB", "SIZE", "spool size cap, e.g. 512MiB"),
    _S("overflow_policy", _choice("drop_oldest", "reject"), "drop_oldest", "POLICY",
       "when the spool is full: drop_oldest or reject"),
    _S("spool_sync", _choice("normal", "full"), "normal", "MODE", "SQLite synchronous mode: normal or full"),
    _S("artifact_max_bytes", _size(1 << 20, "1MiB"), "10GiB", "SIZE",
       "disk budget for artifacts waiting for upload; over it an upload is refused (413)"),
    _S("drain_timeout", _duration(), "20s", _DUR, "how long shutdown waits to upload what is spooled"),
    _S("create_run_timeout", _duration(), "2s", _DUR, "how long create-run waits for the server's run id"),
    _S("request_timeout", _duration(positive=True), "30s", _DUR, "timeout of one upstream request"),
    _S("upload_linger", _duration(), "200ms", _DUR, "how long the uploader waits to fill a batch"),
    _S("retry_initial_backoff", _duration(), "500ms", _DUR, "first retry delay"),
    _S("retry_max_backoff", _duration(), "30s", _DUR, "largest retry delay"),
    _S("retry_deadline", _optional_duration, None, _DUR, "give up on an upload after this; none/0 = never"),
    _S("upload_max_in_flight", _int_range(1, 256), 8, "N", "concurrent upstream requests (1..256)"),
    _S("max_request_bytes", _size(1, "1B"), "64MiB", "SIZE", "largest request body accepted from clients"),
    _S("log_level", _choice("debug", "info", "warning", "error"), "info", "LEVEL", "how much the agent logs"),
    _S("log_format", _choice("auto", "json", "text"), "auto", "FORMAT",
       "auto (JSON unless stderr is a TTY), json or text"),
    _S("ingest_token", _token, None, "PATH",
       f"file holding the bearer token clients must send (or {ENV_PREFIX}INGEST_TOKEN)", secret=True),
    _S("allow_unauthenticated_bind", _bool, False, "", "allow a non-loopback --http without an ingest token"),
)
_BY_NAME = {d.name: d for d in SETTINGS}


def _default(name: str) -> Any:
    d = _BY_NAME[name]
    raw = d.default(os.environ) if callable(d.default) else d.default
    return None if raw is None else d.parse(raw)


_DEFAULTS: dict[str, Any] = {d.name: _default(d.name) for d in SETTINGS if not callable(d.default)}


@dataclass(frozen=True, repr=False)
class Settings:
    """Built by ``load_settings``; constructing it directly gives the defaults (and offline mode)."""

    upstream: str | None = None
    http: HostPort = _DEFAULTS["http"]
    udp: HostPort | None = _DEFAULTS["udp"]
    ops_http: HostPort | None = None
    uds: Path | None = None
    uds_mode: int = _DEFAULTS["uds_mode"]
    udp_rcvbuf: int = _DEFAULTS["udp_rcvbuf"]
    azureml_config: Path | None = None
    azure_credential: str = _DEFAULTS["azure_credential"]
    azure_arm_endpoint: str = _DEFAULTS["azure_arm_endpoint"]
    token_file: Path | None = None
    token_command: str | None = None
    spool_dir: Path = field(default_factory=lambda: _default("spool_dir"))
    spool_max_bytes: int = _DEFAULTS["spool_max_bytes"]
    overflow_policy: str = _DEFAULTS["overflow_policy"]
    spool_sync: str = _DEFAULTS["spool_sync"]
    artifact_max_bytes: int = _DEFAULTS["artifact_max_bytes"]
    drain_timeout: float = _DEFAULTS["drain_timeout"]
    create_run_timeout: float = _DEFAULTS["create_run_timeout"]
    request_timeout: float = _DEFAULTS["request_timeout"]
    upload_linger: float = _DEFAULTS["upload_linger"]
    retry_initial_backoff: float = _DEFAULTS["retry_initial_backoff"]
    retry_max_backoff: float = _DEFAULTS["retry_max_backoff"]
    retry_deadline: float | None = _DEFAULTS["retry_deadline"]
    upload_max_in_flight: int = _DEFAULTS["upload_max_in_flight"]
    max_request_bytes: int = _DEFAULTS["max_request_bytes"]
    log_level: str = _DEFAULTS["log_level"]
    log_format: str = _DEFAULTS["log_format"]
    ingest_token: str | None = None
    allow_unauthenticated_bind: bool = _DEFAULTS["allow_unauthenticated_bind"]

    @property
    def offline(self) -> bool:
        return self.upstream is None and self.azureml_config is None

    @property
    def azureml(self) -> bool:
        """Whether the upstream is an Azure ML workspace (by URI or by config.json)."""
        return self.azureml_config is not None or (self.upstream or "").lower().startswith("azureml://")

    @property
    def upstream_text(self) -> str:
        """The upstream as operators know it (for logs and status)."""
        if self.azureml_config is not None:
            return f"Azure ML workspace from {self.azureml_config}"
        return self.upstream or "none (offline)"

    def describe(self) -> dict[str, object]:
        """Every setting, JSON-friendly, secrets masked: for the start-up log line."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if _BY_NAME[f.name].secret and value is not None:
                value = MASK
            out[f.name] = str(value) if isinstance(value, HostPort | Path) else value
        return out

    def __repr__(self) -> str:
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in self.describe().items()) + ")"

    __str__ = __repr__


def add_arguments(parser: argparse.ArgumentParser, *, include: Iterable[str] | None = None) -> None:
    """Add ``--config FILE`` and one flag per setting (all ``default=None``: "not given")."""
    names = list(_BY_NAME) if include is None else list(include)
    if unknown := [n for n in names if n not in _BY_NAME]:
        raise ValueError(f"unknown settings: {', '.join(unknown)}")
    group = parser.add_argument_group("settings", f"also {ENV_PREFIX}<NAME> variables or --config keys")
    group.add_argument("--config", metavar="FILE", default=None, help=f"TOML settings file (or {CONFIG_ENV})")
    for name in names:
        d = _BY_NAME[name]
        text = f"{d.help} [env {d.env}; default {d.default_text}]"
        if d.parse is _bool:
            action = argparse.BooleanOptionalAction
            group.add_argument(d.flag, dest=name, default=None, action=action, help=text)
        else:
            dest = f"{name}_file" if d.secret else name
            group.add_argument(d.flag, dest=dest, default=None, metavar=d.metavar, help=text)
        if d.secret:  # catch the value itself on the command line (and stop argparse's prefix matching)
            group.add_argument(d.flag.removesuffix("-file"), dest=f"{name}_cli", help=argparse.SUPPRESS)


def load_settings(
    args: argparse.Namespace | Mapping[str, object] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    config_file: Path | None = None,
) -> Settings:
    env = os.environ if env is None else env
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else args or {})
    if not isinstance(args, argparse.Namespace):  # a plain mapping: typos are errors, as elsewhere
        allowed = {*_BY_NAME, "config"}
        allowed |= {f"{d.name}_{x}" for d in SETTINGS if d.secret for x in ("file", "cli")}
        for key in given:
            if key not in allowed:
                raise ConfigError(key, "unknown setting" + _suggest(key, allowed), "arguments")
    raw: dict[str, tuple[object, str]] = {
        d.name: (d.default(env) if callable(d.default) else d.default, "default") for d in SETTINGS
    }

    path = config_file or given.get("config") or env.get(CONFIG_ENV) or None
    if path is not None:
        path = Path(os.path.expanduser(str(path)))
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except OSError as e:
            raise ConfigError("config", f"cannot read the file: {e.strerror or e}", str(path)) from None
        except tomllib.TOMLDecodeError as e:
            raise ConfigError("config", f"not valid TOML: {e}", str(path)) from None
        for key, value in data.items():
            if key not in _BY_NAME:
                raise ConfigError(key, "unknown key in the config file" + _suggest(key, _BY_NAME), str(path))
            raw[key] = (value, str(path))

    known_env = {d.env for d in SETTINGS} | {CONFIG_ENV}
    for var, value in env.items():
        if var.startswith(ENV_PREFIX) and var not in known_env:
            raise ConfigError(var, "unknown environment variable" + _suggest(var, known_env), "environment")
        if var != CONFIG_ENV and var in known_env and value != "":
            raw[var[len(ENV_PREFIX):].lower()] = (value, var)

    for d in SETTINGS:
        if given.get(d.name) is not None:
            raw[d.name] = (given[d.name], d.flag if not d.secret else "arguments")
        if d.secret and given.get(f"{d.name}_cli") is not None:
            raise ConfigError(d.name, f"refusing a secret on the command line (other users can see it); "
                              f"use {d.flag} or {d.env}", d.flag.removesuffix("-file"))
        if d.secret and given.get(f"{d.name}_file") is not None:
            try:
                raw[d.name] = (Path(str(given[f"{d.name}_file"])).read_text().strip(), d.flag)
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(d.name, f"cannot read {given[f'{d.name}_file']}: {e}", d.flag) from None

    values: dict[str, Any] = {d.name: _parse(d, *raw[d.name]) for d in SETTINGS}
    http: HostPort = values["http"]
    if values["azureml_config"] is not None:
        if raw["upstream"][1] != "default" and values["upstream"] is not None:
            raise ConfigError("azureml_config", "set upstream or azureml_config, not both", raw["azureml_config"][1])
    elif raw["upstream"][1] == "default":
        uri = env.get("MLFLOW_TRACKING_URI", "").strip()
        # Inside an Azure ML job the agent's own MLFLOW_TRACKING_URI is the workspace's azureml:// URI.
        if not uri.lower().startswith(("http://", "https://", "azureml://")) or _points_at(uri, http):
            raise ConfigError("upstream", f"no MLflow server configured: pass --upstream URI (or set "
                              f"{ENV_PREFIX}UPSTREAM), or --upstream none to run offline")
        values["upstream"] = _parse(_BY_NAME["upstream"], uri, "MLFLOW_TRACKING_URI")
    if values["token_file"] is not None and values["token_command"] is not None:
        raise ConfigError("token_command", "set token_file or token_command, not both", raw["token_command"][1])
    udp: HostPort | None = values["udp"]
    if udp is not None and not udp.is_loopback and not values["allow_unauthenticated_bind"]:
        raise ConfigError("udp", f"binding datagrams to {udp} (not loopback) accepts data from anyone: datagrams "
                          "carry no token; set allow_unauthenticated_bind = true to do it anyway", raw["udp"][1])
    if not http.is_loopback and values["ingest_token"] is None and not values["allow_unauthenticated_bind"]:
        raise ConfigError("http", f"binding to {http} (not loopback) needs an ingest token "
                          f"({ENV_PREFIX}INGEST_TOKEN) or allow_unauthenticated_bind = true", raw["http"][1])
    return Settings(**values)


def _parse(d: SettingDef, value: object, source: str) -> Any:
    if value is None:
        return None
    try:
        return d.parse(value)
    except ValueError as e:
        shown = MASK if d.secret else re.sub(r"://[^/@\s]*@", f"://{MASK}@", repr(value))
        raise ConfigError(d.name, f"{e}, got {shown}", source) from None


def _points_at(uri: str, http: HostPort) -> bool:
    """Whether ``uri`` is the agent's own address (a client's MLFLOW_TRACKING_URI leaking into ours)."""
    try:
        parts = urlsplit(uri)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError:
        return False
    host = HostPort(parts.hostname or "", port)
    wildcard = http.host in ("0.0.0.0", "::")
    return port == http.port and (
        host.host == http.host.lower() or (host.is_loopback and (http.is_loopback or wildcard))
    )


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]}?)" if close else ""
