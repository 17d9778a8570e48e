"""Training script for the token-source tests: the plain MLflow client, paced like a real training loop.

Usage: python token_train.py EXPERIMENT OUT_JSON [--steps N] [--sleep SECONDS] [--child-at STEP]

A parent run with params and tags, ``--steps`` steps of ``log_metrics`` (explicit timestamps, so the
test knows every row exactly) with ``--sleep`` seconds between steps, a nested child run (params, a
tag, 30 metric rows) started at step ``--child-at``, a param logged at the end, and ``end_run``.
OUT_JSON gets the run ids the client was given, the params, tags and metric rows logged per run, and
the latency of every MLflow call as ``[name, seconds, unix time at its start]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import mlflow

T = TypeVar("T")
BASE_TS = 1_730_000_000_000


class Timer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float, float]] = []

    def __call__(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        wall = time.time()
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.calls.append((name, time.perf_counter() - started, wall))
        return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("experiment")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--sleep", type=float, default=0.05)
    parser.add_argument("--child-at", type=int, default=100)
    args = parser.parse_args()

    timed = Timer()
    runs: dict[str, dict[str, Any]] = {
        "parent": {
            "name": "token-parent",
            "params": {"optimizer": "adam", "lr": "0.001", "steps": str(args.steps)},
            "tags": {"phase": "train", "purpose": "token-sources"},
            "metrics": [],
        },
        "child": {
            "name": "token-child",
            "params": {"fold": "3", "seed": "11"},
            "tags": {"role": "child"},
            "metrics": [],
        },
    }
    parent, child = runs["parent"], runs["child"]
    timed("set_experiment", mlflow.set_experiment, args.experiment)
    run = timed("start_run", mlflow.start_run, run_name=parent["name"])
    parent["run_id"] = run.info.run_id
    timed("log_params", mlflow.log_params, {"optimizer": "adam", "lr": 0.001})
    timed("log_param", mlflow.log_param, "steps", args.steps)
    timed("set_tags", mlflow.set_tags, parent["tags"])
    for step in range(args.steps):
        values = {"loss": 5.0 / (step + 1), "acc": step / args.steps, "lr": 0.001 * 0.99**step}
        timestamp = BASE_TS + step * 10
        timed("log_metrics", mlflow.log_metrics, values, step=step, timestamp=timestamp)
        parent["metrics"].extend([k, v, step, timestamp] for k, v in values.items())
        if step == args.child_at:
            nested = timed("start_run(nested)", mlflow.start_run, run_name=child["name"], nested=True)
            child["run_id"] = nested.info.run_id
            timed("log_params", mlflow.log_params, {"fold": 3, "seed": 11})
            timed("set_tag", mlflow.set_tag, "role", "child")
            for s in range(30):
                ts = BASE_TS + 5 + s * 10
                timed("log_metric", mlflow.log_metric, "child_loss", 1.0 - s / 64, step=s, timestamp=ts)
                child["metrics"].append(["child_loss", 1.0 - s / 64, s, ts])
            timed("end_run", mlflow.end_run)
        time.sleep(args.sleep)
    timed("log_param", mlflow.log_param, "finished", "yes")
    parent["params"]["finished"] = "yes"
    timed("end_run", mlflow.end_run)

    Path(args.out).write_text(json.dumps({"runs": runs, "calls": timed.calls}))
    print(f"done: {len(timed.calls)} calls", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
