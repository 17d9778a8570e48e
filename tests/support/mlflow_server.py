"""A real ``mlflow server`` (uvicorn, SQLite backend) on a free loopback port."""

from __future__ import annotations

import atexit
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from tests.support.ports import LOOPBACK, free_port
from tests.support.processes import kill_process, log_tail, python_env, spawn, stop_process, wait_http_ok

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

START_TIMEOUT = 90.0

#: Environment for every server: no telemetry, and no job-execution runner (it forks half a dozen huey
#: consumers per server, which only cost CPU on a small test machine).
SERVER_ENV = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
}

_template_lock = threading.Lock()
_template_db: Path | None = None


def sqlite_uri(path: Path) -> str:
    """``sqlite:///`` URI of an absolute path."""
    return f"sqlite:///{path.resolve()}"


def template_db() -> Path:
    """A migrated, empty MLflow SQLite database, made once per test session (``mlflow db upgrade``).

    New servers start from a copy of it, which saves the several seconds the schema migrations take.
    """
    global _template_db
    with _template_lock:
        if _template_db is not None and _template_db.exists():
            return _template_db
        directory = Path(tempfile.mkdtemp(prefix="mlflow-template-db-"))
        atexit.register(shutil.rmtree, directory, True)
        building = directory / "building.db"
        result = subprocess.run(
            [sys.executable, "-m", "mlflow", "db", "upgrade", sqlite_uri(building)],
            env=python_env(SERVER_ENV),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"`mlflow db upgrade` failed with {result.returncode}:\n"
                f"{result.stdout.decode(errors='replace')}\n{result.stderr.decode(errors='replace')}"
            )
        final = directory / "mlflow.db"
        building.rename(final)
        _template_db = final
        return final


class MlflowServer:
    """One ``mlflow server`` process with its SQLite DB, artifact dir and log under ``base_dir``."""

    def __init__(
        self,
        base_dir: Path,
        port: int | None = None,
        *,
        use_template: bool = True,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.base_dir = Path(base_dir)
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.port = port if port is not None else free_port()
        self.db_path = self.base_dir / "mlflow.db"
        self.artifacts_dir = self.base_dir / "artifacts"
        self.log_path = self.base_dir / "server.log"
        self.use_template = use_template
        self.extra_args = list(extra_args)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: the tracking URI."""
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def tracking_uri(self) -> str:
        """Same as :attr:`url`."""
        return self.url

    @property
    def backend_store_uri(self) -> str:
        """``sqlite:///.../mlflow.db``."""
        return sqlite_uri(self.db_path)

    @property
    def pid(self) -> int:
        """Pid of the ``mlflow server`` process (it also leads the group of its uvicorn worker)."""
        if self.proc is None:
            raise RuntimeError("server not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def command(self) -> list[str]:
        """The command line that starts this server."""
        return [
            sys.executable, "-m", "mlflow", "server",
            "--host", LOOPBACK,
            "--port", str(self.port),
            "--workers", "1",
            "--backend-store-uri", self.backend_store_uri,
            "--artifacts-destination", str(self.artifacts_dir),
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = START_TIMEOUT) -> MlflowServer:
        """Start the server (from a copy of the template DB if it has none yet); wait for /health == 200."""
        if self.running:
            raise RuntimeError(f"mlflow server {self.url} is already running")
        if self.use_template and not self.db_path.exists():
            shutil.copyfile(template_db(), self.db_path)
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(self.command(), self.log_path, env=python_env(SERVER_ENV), cwd=self.base_dir)
        try:
            wait_http_ok(f"{self.url}/health", timeout, self.proc, log_path=self.log_path)
        except BaseException:
            kill_process(self.proc)
            raise
        return self

    def stop(self, timeout: float = 15) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after ``timeout`` s)."""
        if self.proc is not None:
            stop_process(self.proc, timeout=timeout)

    def kill(self) -> None:
        """SIGKILL the server and its workers at once (a crash)."""
        if self.proc is not None:
            kill_process(self.proc)

    def restart(self, timeout: float = START_TIMEOUT) -> MlflowServer:
        """Stop, then start again on the same port with the same DB and artifacts."""
        self.stop()
        return self.start(timeout=timeout)

    def client(self) -> MlflowClient:
        """An ``MlflowClient`` talking to this server."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def log_tail(self, lines: int = 60) -> str:
        """Last lines of ``server.log``."""
        return log_tail(self.log_path, lines)

    def __enter__(self) -> MlflowServer:
        return self.start() if not self.running else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MlflowServer(url={self.url!r}, base_dir={str(self.base_dir)!r}, running={self.running})"
