from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from agent import config
from agent.config import (
    SETTINGS,
    ConfigError,
    HostPort,
    Settings,
    add_arguments,
    load_settings,
    parse_duration,
    parse_hostport,
    parse_size,
)

OFFLINE = {"MLFLOW_AGENT_UPSTREAM": "none"}


def parse_args(*argv: str, include: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, include=include)
    return parser.parse_args(list(argv))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


# ---- value parsers ----

@pytest.mark.parametrize(("text", "expected"), [
    (0, 0), (1234, 1234), ("1234", 1234), ("64KiB", 64 * 1024), ("512MiB", 512 << 20),
    ("1GiB", 1 << 30), ("2TiB", 2 << 40), ("100MB", 100_000_000), ("1kb", 1000), ("3 gb", 3 * 10**9),
    ("7B", 7), (" 5mib ", 5 << 20),
])
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["lots", "1e9", "1.5GiB", "-1", -1, "", "GiB", "10 XB", True])
def test_parse_size_rejects(text: str | int) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_size(text)


@pytest.mark.parametrize(("text", "expected"), [
    (2, 2.0), (0.25, 0.25), ("2", 2.0), ("2s", 2.0), ("500ms", 0.5), ("1.5m", 90.0), ("1h", 3600.0),
    (".5s", 0.5), ("0", 0.0), (" 3 S ", 3.0),
])
def test_parse_duration(text: str | float, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("text", ["soon", "-1s", -1, float("inf"), float("nan"), "1d", "", "1e3", True])
def test_parse_duration_rejects(text: str | float) -> None:
    with pytest.raises(ValueError, match="expected a duration"):
        parse_duration(text)


@pytest.mark.parametrize(("text", "host", "port", "loopback", "shown"), [
    ("127.0.0.1:5050", "127.0.0.1", 5050, True, "127.0.0.1:5050"),
    ("127.9.9.9:1", "127.9.9.9", 1, True, "127.9.9.9:1"),
    ("localhost:0", "localhost", 0, True, "localhost:0"),
    ("[::1]:5050", "::1", 5050, True, "[::1]:5050"),
    ("[::]:80", "::", 80, False, "[::]:80"),
    ("0.0.0.0:65535", "0.0.0.0", 65535, False, "0.0.0.0:65535"),
    ("agent.example.com:8080", "agent.example.com", 8080, False, "agent.example.com:8080"),
])
def test_parse_hostport(text: str, host: str, port: int, loopback: bool, shown: str) -> None:
    hp = parse_hostport(text)
    assert (hp.host, hp.port, hp.is_loopback, str(hp)) == (host, port, loopback, shown)


@pytest.mark.parametrize("text", ["5050", "127.0.0.1", "::1:5050", "[nope]:1", "h:65536", "h:-1", ":5050"])
def test_parse_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_hostport(text)


# ---- defaults and precedence ----

def test_defaults(tmp_path: Path) -> None:
    s = load_settings(env={**OFFLINE, "XDG_STATE_HOME": str(tmp_path)})
    assert s.upstream is None and s.offline
    assert s.http == HostPort("127.0.0.1", 5050)
    assert s.spool_dir == tmp_path / "mlflow-agent"
    assert (s.spool_max_bytes, s.max_request_bytes) == (1 << 30, 64 << 20)
    assert (s.overflow_policy, s.spool_sync) == ("drop_oldest", "normal")
    assert (s.log_level, s.log_format) == ("info", "auto")
    assert (s.drain_timeout, s.create_run_timeout, s.request_timeout) == (20.0, 2.0, 30.0)
    assert (s.upload_linger, s.retry_initial_backoff, s.retry_max_backoff) == (0.2, 0.5, 30.0)
    assert s.retry_deadline is None and s.upload_max_in_flight == 8
    assert s.ingest_token is None and s.allow_unauthenticated_bind is False


def test_direct_construction_matches_loaded_defaults() -> None:
    loaded = load_settings(env=OFFLINE)
    assert Settings(spool_dir=loaded.spool_dir) == loaded


def test_spool_dir_defaults() -> None:
    assert load_settings(env={**OFFLINE, "STATE_DIRECTORY": "/var/lib/x:/other", "XDG_STATE_HOME": "/s"}) \
        .spool_dir == Path("/var/lib/x")
    home = load_settings(env=OFFLINE).spool_dir
    assert home == Path("~/.local/state/mlflow-agent").expanduser()
    tilde = load_settings(env={**OFFLINE, "MLFLOW_AGENT_SPOOL_DIR": "~/spool"}).spool_dir
    assert tilde == Path.home() / "spool"


def test_precedence_default_toml_env_flag(tmp_path: Path) -> None:
    path = write(tmp_path, 'upstream = "none"\ndrain_timeout = "5s"\nspool_sync = "full"\n'
                           'log_level = "DEBUG"\n')
    env = {"MLFLOW_AGENT_SPOOL_SYNC": "normal", "MLFLOW_AGENT_LOG_LEVEL": "warning"}
    s = load_settings(parse_args("--config", str(path), "--log-level", "error"), env=env)
    assert s.drain_timeout == 5.0  # toml over default
    assert s.spool_sync == "normal"  # env over toml
    assert s.log_level == "error"  # flag over env and toml
    assert s.request_timeout == 30.0  # default


def test_toml_native_types(tmp_path: Path) -> None:
    path = write(tmp_path, 'upstream = "none"\nspool_max_bytes = 2097152\nupload_linger = 0.05\n'
                           "upload_max_in_flight = 3\nallow_unauthenticated_bind = true\n"
                           'http = "0.0.0.0:0"\n')
    s = load_settings(env={}, config_file=path)
    assert (s.spool_max_bytes, s.upload_linger, s.upload_max_in_flight) == (2 << 20, 0.05, 3)
    assert s.allow_unauthenticated_bind and s.http == HostPort("0.0.0.0", 0)


def test_config_file_from_env(tmp_path: Path) -> None:
    path = write(tmp_path, 'upstream = "https://mlflow.example.com/"\n')
    s = load_settings(env={"MLFLOW_AGENT_CONFIG": str(path)})
    assert s.upstream == "https://mlflow.example.com" and not s.offline


def test_mapping_args_and_typos() -> None:
    s = load_settings({"upstream": "http://h:5000", "upload_max_in_flight": "16", "http": None}, env={})
    assert (s.upstream, s.upload_max_in_flight, s.http.port) == ("http://h:5000", 16, 5050)
    with pytest.raises(ConfigError, match="did you mean upstream"):
        load_settings({"upstreem": "none"}, env={})


def test_bool_spellings() -> None:
    spellings = [("yes", True), ("ON", True), ("1", True), ("false", False), ("off", False), ("0", False)]
    for text, expected in spellings:
        env = {**OFFLINE, "MLFLOW_AGENT_ALLOW_UNAUTHENTICATED_BIND": text}
        assert load_settings(env=env).allow_unauthenticated_bind is expected
    assert load_settings(parse_args("--allow-unauthenticated-bind"), env=OFFLINE).allow_unauthenticated_bind
    with pytest.raises(ConfigError, match="expected true or false"):
        load_settings(env={**OFFLINE, "MLFLOW_AGENT_ALLOW_UNAUTHENTICATED_BIND": "maybe"})


def test_retry_deadline_none_and_zero() -> None:
    for text, expected in [("none", None), ("0", None), ("10m", 600.0), ("NONE", None)]:
        assert load_settings(env={**OFFLINE, "MLFLOW_AGENT_RETRY_DEADLINE": text}).retry_deadline == expected


def test_empty_env_counts_as_unset() -> None:
    assert load_settings(env={**OFFLINE, "MLFLOW_AGENT_LOG_LEVEL": ""}).log_level == "info"


# ---- upstream ----

@pytest.mark.parametrize(("text", "expected"), [
    ("http://mlflow:5000", "http://mlflow:5000"),
    ("https://mlflow.example.com/prefix/", "https://mlflow.example.com/prefix"),
    ("HTTPS://[2001:db8::1]:8443", "HTTPS://[2001:db8::1]:8443"),
    ("azureml://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/s/resourceGroups/r/providers/"
     "Microsoft.MachineLearningServices/workspaces/w",
     "azureml://westeurope.api.azureml.ms/mlflow/v1.0/subscriptions/s/resourceGroups/r/providers/"
     "Microsoft.MachineLearningServices/workspaces/w"),
    ("None", None),
])
def test_upstream_values(text: str, expected: str | None) -> None:
    assert load_settings(parse_args("--upstream", text), env={}).upstream == expected


@pytest.mark.parametrize("text", ["ftp://h", "mlflow:5000", "http://", "file:///tmp/mlruns", "http://h:99999",
                                  "http://h/?a=1", "databricks"])
def test_upstream_rejects(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(parse_args("--upstream", text), env={})
    assert (info.value.setting, info.value.source) == ("upstream", "--upstream")


def test_upstream_credentials_rejected_without_leaking_them() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={"MLFLOW_AGENT_UPSTREAM": "https://alice:hunter2@mlflow.example.com"})
    assert "MLFLOW_TRACKING_USERNAME" in str(info.value)
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(info.value)


def test_upstream_falls_back_to_tracking_uri() -> None:
    s = load_settings(env={"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000/"})
    assert s.upstream == "http://mlflow.internal:5000"


@pytest.mark.parametrize("uri", [None, "", "file:///tmp/mlruns", "databricks", "http://127.0.0.1:5050",
                                 "http://localhost:5050/"])
def test_upstream_missing(uri: str | None) -> None:
    env = {} if uri is None else {"MLFLOW_TRACKING_URI": uri}
    with pytest.raises(ConfigError) as info:
        load_settings(env=env)
    assert info.value.setting == "upstream"
    assert "--upstream URI" in str(info.value) and "--upstream none" in str(info.value)


def test_tracking_uri_pointing_elsewhere_on_loopback_is_used() -> None:
    env = {"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000", "MLFLOW_AGENT_HTTP": "127.0.0.1:5050"}
    assert load_settings(env=env).upstream == "http://127.0.0.1:5000"


# ---- errors ----

def test_error_message_shape() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={**OFFLINE, "MLFLOW_AGENT_SPOOL_MAX_BYTES": "lots"})
    assert str(info.value) == ("invalid setting 'spool_max_bytes' (from MLFLOW_AGENT_SPOOL_MAX_BYTES): "
                               "expected a size such as 512MiB, got 'lots'")
    assert (info.value.setting, info.value.source) == ("spool_max_bytes", "MLFLOW_AGENT_SPOOL_MAX_BYTES")


@pytest.mark.parametrize(("argv", "setting", "needle"), [
    (["--spool-max-bytes", "512KiB"], "spool_max_bytes", "at least 1MiB"),
    (["--overflow-policy", "block"], "overflow_policy", "drop_oldest, reject"),
    (["--spool-sync", "off"], "spool_sync", "normal, full"),
    (["--request-timeout", "0"], "request_timeout", "greater than 0"),
    (["--drain-timeout=-1s"], "drain_timeout", "expected a duration"),
    (["--upload-max-in-flight", "0"], "upload_max_in_flight", "1..256"),
    (["--upload-max-in-flight", "257"], "upload_max_in_flight", "1..256"),
    (["--log-level", "trace"], "log_level", "debug, info, warning, error"),
    (["--log-format", "xml"], "log_format", "auto, json, text"),
    (["--http", "nowhere"], "http", "HOST:PORT"),
])
def test_flag_errors(argv: list[str], setting: str, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(parse_args(*argv), env=OFFLINE)
    flag = argv[0].split("=")[0]
    assert (info.value.setting, info.value.source) == (setting, flag)
    assert needle in str(info.value) and f"(from {flag})" in str(info.value)
    assert "\n" not in str(info.value)


def test_unknown_toml_key_names_key_and_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'upstream = "none"\nspool_max_byte = "1GiB"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, config_file=path)
    assert info.value.setting == "spool_max_byte" and info.value.source == str(path)
    assert str(path) in str(info.value) and "spool_max_bytes" in str(info.value)


def test_nested_toml_table_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown key"):
        load_settings(env={}, config_file=write(tmp_path, '[agent]\nupstream = "none"\n'))


def test_bad_toml_value_names_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'upstream = "none"\nupload_linger = "forever"\n')
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, config_file=path)
    assert (info.value.setting, info.value.source) == ("upload_linger", str(path))


def test_invalid_and_missing_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={}, config_file=write(tmp_path, "upstream = \n"))
    assert info.value.setting == "config" and "not valid TOML" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(parse_args("--config", str(tmp_path / "absent.toml")), env={})
    assert info.value.setting == "config" and "absent.toml" in str(info.value)


def test_unknown_env_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env={**OFFLINE, "MLFLOW_AGENT_SPOOL_DIRR": "/x"})
    assert info.value.setting == "MLFLOW_AGENT_SPOOL_DIRR"
    assert "did you mean MLFLOW_AGENT_SPOOL_DIR" in str(info.value)


def test_unrelated_env_is_ignored() -> None:
    assert load_settings(env={**OFFLINE, "MLFLOW_TRACKING_TOKEN": "x", "AGENT_FOO": "y"}).offline


# ---- the ingest token and the bind rule ----

SECRET = "s3cr3t-t0ken-value"


def test_token_from_env_is_masked_everywhere() -> None:
    s = load_settings(env={**OFFLINE, "MLFLOW_AGENT_INGEST_TOKEN": SECRET})
    assert s.ingest_token == SECRET
    assert SECRET not in repr(s) and SECRET not in str(s) and "ingest_token='***'" in repr(s)
    assert s.describe()["ingest_token"] == "***"


def test_token_from_file_and_toml(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(f"  {SECRET}\n")
    args = parse_args("--ingest-token-file", str(token_file))
    assert load_settings(args, env=OFFLINE).ingest_token == SECRET
    path = write(tmp_path, f'upstream = "none"\ningest_token = "{SECRET}"\n')
    assert load_settings(env={}, config_file=path).ingest_token == SECRET


@pytest.mark.parametrize("argv", [["--ingest-token", SECRET], ["--ingest-token=" + SECRET]])
def test_no_flag_carries_the_token_itself(argv: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(parse_args(*argv), env=OFFLINE)
    assert info.value.setting == "ingest_token" and "--ingest-token-file" in str(info.value)
    assert SECRET not in str(info.value)


def test_abbreviated_token_flag_is_not_read_as_a_file(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args("--ingest-tok", SECRET)  # ambiguous, rather than silently meaning --ingest-token-file
    assert SECRET not in capsys.readouterr().err


def test_bad_token_is_masked_in_errors(tmp_path: Path) -> None:
    bad = "has a space"
    with pytest.raises(ConfigError) as info:
        load_settings(env={**OFFLINE, "MLFLOW_AGENT_INGEST_TOKEN": bad})
    assert bad not in str(info.value) and "got ***" in str(info.value)
    with pytest.raises(ConfigError) as info:
        load_settings(parse_args("--ingest-token-file", str(tmp_path / "missing")), env=OFFLINE)
    assert (info.value.setting, info.value.source) == ("ingest_token", "--ingest-token-file")


def test_non_loopback_bind_needs_token() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(parse_args("--http", "0.0.0.0:5050"), env=OFFLINE)
    assert str(info.value) == (
        "invalid setting 'http' (from --http): binding to 0.0.0.0:5050 (not loopback) needs an ingest token "
        "(MLFLOW_AGENT_INGEST_TOKEN) or allow_unauthenticated_bind = true")
    env = {**OFFLINE, "MLFLOW_AGENT_HTTP": "[::]:5050"}
    assert load_settings(env={**env, "MLFLOW_AGENT_INGEST_TOKEN": SECRET}).http == HostPort("::", 5050)
    assert load_settings(env={**env, "MLFLOW_AGENT_ALLOW_UNAUTHENTICATED_BIND": "true"}).http.port == 5050
    assert load_settings(env={**OFFLINE, "MLFLOW_AGENT_HTTP": "[::1]:0"}).http.is_loopback


# ---- the table and the flags ----

def test_table_covers_dataclass_and_docs() -> None:
    names = [d.name for d in SETTINGS]
    assert names == list(Settings.__dataclass_fields__)
    doc = config.__doc__ or ""
    for d in SETTINGS:
        assert d.name in doc and d.help and d.default_text
        assert d.env == "MLFLOW_AGENT_" + d.name.upper()
    flags = {d.name: d.flag for d in SETTINGS}
    assert flags["spool_max_bytes"] == "--spool-max-bytes" and flags["ingest_token"] == "--ingest-token-file"
    assert [d.name for d in SETTINGS if d.secret] == ["ingest_token"]


def test_add_arguments_defaults_none_and_include() -> None:
    ns = parse_args()
    assert all(value is None for value in vars(ns).values())
    ns = parse_args("--upstream", "none", include=["upstream", "spool_dir"])
    assert set(vars(ns)) == {"config", "upstream", "spool_dir"}
    ns = parse_args(include=["ingest_token"])
    assert set(vars(ns)) == {"config", "ingest_token_file", "ingest_token_cli"}
    with pytest.raises(SystemExit):
        parse_args("--http", "127.0.0.1:1", include=["upstream"])
    with pytest.raises(ValueError):
        parse_args(include=["nonsense"])


def test_namespace_with_foreign_attributes() -> None:
    ns = argparse.Namespace(command="sync", verbose=True, upstream="none", config=None)
    assert load_settings(ns, env={}).offline
