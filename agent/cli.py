"""``python -m agent run|sync|status|demo|version`` (also installed as ``mlflow-agent``)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from agent import __version__
from agent.config import ConfigError, Settings, add_arguments, load_settings, parse_hostport
from agent.logs import configure_logging
from agent.records import queued_model
from agent.spool.store import SpoolLocked, SpoolUnavailable

log = logging.getLogger("agent")

_SYNC_SETTINGS = (
    "upstream", "spool_dir", "request_timeout", "retry_initial_backoff", "retry_max_backoff",
    "retry_deadline", "upload_max_in_flight", "log_level", "log_format",
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "version":
        print(f"mlflow-agent {__version__}")
        return 0
    if args.command == "demo":
        from agent.demo import run_demo

        return run_demo(keep=args.keep, steps=args.steps)
    if args.command == "status":
        return _status(args)
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"mlflow-agent: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    try:
        if args.command == "run":
            return _run(settings)
        return asyncio.run(_sync(settings, timeout=args.timeout, progress_every=args.progress_interval))
    except SpoolUnavailable as exc:
        print(f"mlflow-agent: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # typically a port or socket path already in use
        print(f"mlflow-agent: cannot start: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlflow-agent", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run", help="serve the MLflow API locally and upload to the upstream")
    add_arguments(run)
    sync = sub.add_parser("sync", help="upload a spool left behind, then exit")
    add_arguments(sync, include=_SYNC_SETTINGS)
    sync.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    sync.add_argument("--progress-interval", type=float, default=2.0, help="seconds between progress lines")
    status = sub.add_parser("status", help="what a running agent holds (or a spool, with --spool-dir)")
    status.add_argument("--http", default="127.0.0.1:5050", help="the agent's HOST:PORT")
    status.add_argument("--spool-dir", type=Path, default=None, help="read this spool directly instead")
    status.add_argument("--json", action="store_true", help="print the raw JSON")
    demo = sub.add_parser("demo", help="local MLflow server + agent + a training loop, then a summary")
    demo.add_argument("--steps", type=int, default=300, help="training steps to log")
    demo.add_argument("--keep", action="store_true", help="keep the MLflow server running until Ctrl-C")
    sub.add_parser("version", help="print the version")
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    values = {k: v for k, v in vars(args).items() if k not in ("command", "timeout", "progress_interval")}
    settings = load_settings(values if args.command == "sync" else args)
    if args.command == "sync" and settings.offline:
        raise ConfigError("upstream", "sync needs an upstream to upload to, not 'none'", "--upstream")
    if settings.azureml:
        _check_azure(settings)
    return settings


def _check_azure(settings: Settings) -> None:
    """Configuration errors an Azure upstream can show before start: bad URI or file, a missing extra."""
    from agent.upstream.azureml import in_azureml_job, parse_azureml_uri, require_azure_identity
    from agent.upstream.azureml_core import require_azureml_core
    from agent.upstream.workspace import read_workspace_config

    name, source = ("azureml_config", "--azureml-config") if settings.azureml_config else ("upstream", "--upstream")
    try:
        if settings.azureml_config is not None:
            read_workspace_config(settings.azureml_config)
            in_job = False  # a job's run token cannot call ARM
        else:
            assert settings.upstream is not None
            parse_azureml_uri(settings.upstream)
            in_job = in_azureml_job(os.environ)
        if settings.token_file is None and settings.token_command is None and not in_job:
            if settings.azure_credential == "azureml-core":
                name, source = "azure_credential", "--azure-credential"
                require_azureml_core()
            else:
                require_azure_identity()
    except ValueError as exc:
        raise ConfigError(name, str(exc), source) from None


def _run(settings: Settings) -> int:
    from agent.service import Agent

    log.info("mlflow-agent %s starting", __version__, extra={"settings": settings.describe()})
    _use_uvloop()
    return asyncio.run(Agent(settings).run_until_signalled())


def _use_uvloop() -> None:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _sync(settings: Settings, *, timeout: float | None, progress_every: float) -> int:
    from agent.service import Agent

    agent = Agent(settings, ingest=False)
    await agent.start()
    started = time.monotonic()
    total = agent.ledger.total_items()
    print(f"sync: {total} record(s) pending in {len(agent.ledger.runs())} run(s) -> {settings.upstream_text}")
    last_print = started
    try:
        while agent.ledger.total_items() > 0 or agent.catalog.pending_experiments() or (
                agent.artifact_uploader is not None and agent.artifacts.pending()):
            if timeout is not None and time.monotonic() - started > timeout:
                break
            await asyncio.sleep(0.2)
            if time.monotonic() - last_print >= progress_every:
                last_print = time.monotonic()
                print(f"sync: {agent.ledger.total_items()} pending, upstream "
                      f"{'up' if agent.rest and agent.rest.health.up else 'not answering'}")
    finally:
        totals = (await agent.status())["totals"]
        left = agent.ledger.total_items() + len(agent.artifacts.pending())
        await agent.stop()
    print(f"sync: done in {time.monotonic() - started:.1f}s: uploaded {int(totals.get('uploaded', 0))}, "
          f"dead-lettered {int(totals.get('dead_lettered', 0))}, left in spool {left}")
    return 0 if left == 0 else 1


def _status(args: argparse.Namespace) -> int:
    if args.spool_dir is not None:
        from agent.spool.store import DB_NAME

        if not (args.spool_dir / DB_NAME).is_file():
            print(f"mlflow-agent: no spool at {args.spool_dir} ({DB_NAME} not found)", file=sys.stderr)
            return 1
        try:
            status = asyncio.run(_offline_status(args.spool_dir))
        except SpoolUnavailable as exc:
            hint = "; ask it instead: status --http HOST:PORT" if isinstance(exc, SpoolLocked) else ""
            print(f"mlflow-agent: {exc}{hint}", file=sys.stderr)
            return 1
    else:
        hp = parse_hostport(args.http)
        url = f"http://{hp.host if ':' not in hp.host else f'[{hp.host}]'}:{hp.port}/status"
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                status = orjson.loads(resp.read())
        except (urllib.error.URLError, OSError) as exc:
            print(f"mlflow-agent: no agent answering at {url} ({exc}); "
                  "use --spool-dir DIR to read a spool directly", file=sys.stderr)
            return 1
    if args.json:
        print(orjson.dumps(status, option=orjson.OPT_INDENT_2).decode())
    else:
        print(_render_status(status))
    return 0


async def _offline_status(spool_dir: Path) -> dict[str, Any]:
    from agent.spool.artifacts import ArtifactStore
    from agent.spool.store import Spool

    spool = Spool(spool_dir, max_bytes=1 << 62)
    loaded = await spool.open()
    try:
        dead = await spool.dead_letters(20)
        artifacts = ArtifactStore(spool_dir, max_bytes=1 << 62)
        await artifacts.open()  # under the spool's lock: no agent is using the directory
    finally:
        await spool.close()
    runs: dict[str, dict[str, int]] = {}
    for p in loaded.pending:
        runs.setdefault(p.run, {})
        runs[p.run][p.kind.label] = runs[p.run].get(p.kind.label, 0) + p.items
    models = {m.id: m for m in loaded.models}
    return {
        "spool": {"path": str(spool.path), "charged_bytes": sum(p.size for p in loaded.pending)},
        "buffered_records": sum(p.items for p in loaded.pending),
        "runs": [{"run_id": r, "pending": k} for r, k in sorted(runs.items()) if queued_model(r) is None],
        "models": [{"model_id": m, "pending": k, "name": models[m].info.get("name") if m in models else None,
                    "provisional": m in models and models[m].provisional,
                    "upstream_id": models[m].upstream_id if m in models else None}
                   for r, k in sorted(runs.items()) if (m := queued_model(r)) is not None],
        "dead_letters": {"total": loaded.dead_letters, "recent": dead},
        "artifacts": {"waiting": len(artifacts.pending()), "bytes": artifacts.charged_bytes},
    }


def _render_status(status: dict[str, Any]) -> str:
    lines = []
    upstream = status.get("upstream")
    if upstream:
        state = "offline" if upstream.get("offline") else ("up" if upstream.get("up") else "DOWN")
        lines.append(f"upstream:  {upstream.get('url') or 'none'} ({state})")
        if upstream.get("last_error"):
            lines.append(f"           last error: {upstream['last_error']}")
        credential = upstream.get("credential")
        if credential:
            expires = credential.get("expires_at")
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(expires)) if expires else "not stated"
            valid = "valid" if credential.get("valid") else "NONE VALID"
            lines.append(f"credential: {credential.get('source')}, {valid}, expires {when}")
            if credential.get("last_error"):
                lines.append(f"           last error: {credential['last_error']}")
            workspace = credential.get("workspace")
            if workspace and not workspace.get("resolved"):
                lines.append(f"workspace: NOT FOUND YET: {workspace.get('last_error') or 'looking it up'}")
    spool = status.get("spool", {})
    lines.append(f"spool:     {spool.get('path')} ({spool.get('charged_bytes', 0)} bytes charged)")
    age = status.get("oldest_buffered_age_seconds")
    lines.append(f"buffered:  {status.get('buffered_records', 0)} record(s)"
                 + (f", oldest waiting {age:.1f}s" if age else ""))
    for run in status.get("runs", []):
        pending = ", ".join(f"{v} {k}" for k, v in sorted(run.get("pending", {}).items())) or "nothing waiting"
        name = f" ({run['run_name']})" if run.get("run_name") else ""
        records = run.get("records")
        done = (f"; uploaded {records['uploaded']}, dead-lettered {records['dead_lettered']}, dropped "
                f"{records['dropped']}") if records else ""
        lines.append(f"  run {run['run_id']}{name}: {pending}{done}")
    if status.get("runs_omitted"):
        lines.append(f"  ... and {status['runs_omitted']} more idle run(s) (see --json)")
    for model in status.get("models", []):
        pending = ", ".join(f"{v} {k}" for k, v in sorted(model.get("pending", {}).items()))
        name = f" ({model['name']})" if model.get("name") else ""
        state = "not created upstream yet" if model.get("provisional") and not model.get("upstream_id") else \
            f"upstream {model.get('upstream_id')}"
        lines.append(f"  logged model {model['model_id']}{name}: {pending}; {state}")
    artifacts = status.get("artifacts")
    if artifacts and artifacts.get("waiting"):
        lines.append(f"artifacts: {artifacts['waiting']} file(s), {artifacts.get('bytes', 0)} bytes waiting for upload")
    totals = status.get("totals")
    if totals:
        lines.append("totals:    " + ", ".join(f"{k} {int(v)}" for k, v in sorted(totals.items())))
    dead = status.get("dead_letters", {}).get("recent", [])
    if dead:
        lines.append(f"dead letters (latest {len(dead)}):")
        for d in dead:
            lines.append(f"  run {d['run_id']}: {d['records']} {d['kind']} record(s): {d['message']}")
    return "\n".join(lines)
