"""Training script for the flapping-upstream test: the plain MLflow client, several runs.

Usage: python flapping_train.py EXPERIMENT OUT_JSON [--steps N]

Two top-level runs; the first has a nested child, the second a child with a grandchild. Params, tags,
``--steps`` steps of ``log_metrics`` in the first run, fewer in the others, all with explicit
timestamps. OUT_JSON gets, per run label: the id the client was given, its name, parent label,
params, tags and every metric row logged, plus the latency of every MLflow call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import mlflow

BASE_TS = 1_720_000_000_000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("experiment")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=1000)
    args = parser.parse_args()

    runs: dict[str, dict[str, Any]] = {}
    calls: list[float] = []

    def timed_metrics(values: dict[str, float], step: int, ts: int) -> None:
        started = time.perf_counter()
        mlflow.log_metrics(values, step=step, timestamp=ts)
        calls.append(time.perf_counter() - started)

    def begin(label: str, parent: str | None, params: dict[str, Any], tags: dict[str, str]) -> dict[str, Any]:
        run = mlflow.start_run(run_name=f"flap-{label}", nested=parent is not None)
        mlflow.log_params(params)
        mlflow.set_tags(tags)
        mlflow.set_tag("label", label)
        entry: dict[str, Any] = {
            "run_id": run.info.run_id,
            "name": f"flap-{label}",
            "parent": parent,
            "params": {k: str(v) for k, v in params.items()},
            "tags": {**tags, "label": label},
            "metrics": [],
        }
        runs[label] = entry
        return entry

    def log_steps(entry: dict[str, Any], steps: range, keys: tuple[str, ...], slot: int) -> None:
        for step in steps:
            values = {k: step * (i + 1) * 0.5 - 7.0 for i, k in enumerate(keys)}
            ts = BASE_TS + step * 10 + slot
            timed_metrics(values, step, ts)
            entry["metrics"].extend([k, v, step, ts] for k, v in values.items())

    mlflow.set_experiment(args.experiment)

    a = begin("a", None, {"lr": 0.1, "batch": 32, "model": "resnet"}, {"team": "flaky", "stage": "dev"})
    half = args.steps // 2
    log_steps(a, range(half), ("loss", "acc", "lr", "gnorm"), 0)
    child = begin("a-child", "a", {"fold": 0, "seed": 7}, {"role": "fold"})
    log_steps(child, range(150), ("fold_loss",), 1)
    mlflow.end_run()
    log_steps(a, range(half, args.steps), ("loss", "acc", "lr", "gnorm"), 0)
    mlflow.log_param("finished_steps", args.steps)
    a["params"]["finished_steps"] = str(args.steps)
    mlflow.end_run()

    b = begin("b", None, {"lr": 0.2, "batch": 64}, {"team": "flaky", "stage": "prod"})
    log_steps(b, range(200), ("b_loss", "b_acc"), 2)
    b_child = begin("b-child", "b", {"depth": 1}, {"role": "inner"})
    log_steps(b_child, range(100), ("c_loss",), 3)
    grandchild = begin("b-grandchild", "b-child", {"depth": 2}, {"role": "innermost"})
    log_steps(grandchild, range(100), ("g_loss",), 4)
    mlflow.end_run()
    mlflow.end_run()
    mlflow.end_run()

    Path(args.out).write_text(json.dumps({"runs": runs, "calls": calls}))
    print(f"done: {len(runs)} runs, {len(calls)} log_metrics calls", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
