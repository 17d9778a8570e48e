"""Training script for the lost-create-answer test: the plain MLflow client, in two phases.

Usage: python lost_create_train.py EXPERIMENT OUT_JSON READY_FILE RESUME_FILE

Phase 1 (the upstream answers): set_experiment and a named warm-up run, ended. Then the script creates
READY_FILE and waits (untimed) for RESUME_FILE. Phase 2 (the test makes the upstream's answers get
lost): an unnamed run with a named nested child, then a named top-level run, each with params and
metrics. OUT_JSON gets, per run label: the id and the name the client was given, the parent label,
params and every metric row logged.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import mlflow

BASE_TS = 1_730_000_000_000


def main() -> int:
    experiment, out, ready, resume = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
    runs: dict[str, dict[str, Any]] = {}

    def begin(label: str, run_name: str | None, parent: str | None) -> dict[str, Any]:
        run = mlflow.start_run(run_name=run_name, nested=parent is not None)
        params = {"label": label, "seed": 11}
        mlflow.log_params(params)
        metrics = []
        for step in range(30):
            ts = BASE_TS + step * 10 + len(runs)
            mlflow.log_metrics({"m": step * 1.5, "n": -step * 1.0}, step=step, timestamp=ts)
            metrics.extend([["m", step * 1.5, step, ts], ["n", -step * 1.0, step, ts]])
        entry = {
            "run_id": run.info.run_id,
            "name": run.info.run_name,  # what the client was told
            "parent": parent,
            "params": {k: str(v) for k, v in params.items()},
            "metrics": metrics,
        }
        runs[label] = entry
        return entry

    mlflow.set_experiment(experiment)
    begin("warmup", "warmup", None)
    mlflow.end_run()

    ready.write_text("phase 1 done")
    deadline = time.monotonic() + 180
    while not resume.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{resume} did not appear")
        time.sleep(0.05)

    begin("unnamed", None, None)
    begin("child", "lost-child", "unnamed")
    mlflow.end_run()
    mlflow.end_run()
    begin("named", "lost-named", None)
    mlflow.end_run()

    out.write_text(json.dumps({"runs": runs}))
    print(f"done: {sorted((k, v['name']) for k, v in runs.items())}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
