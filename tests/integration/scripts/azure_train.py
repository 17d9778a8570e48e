"""Training script for the Azure ML tests: the plain MLflow client, paced like a real training loop.

Usage: python azure_train.py EXPERIMENT OUT_JSON [--seconds S] [--interval S] [--child-at-seconds S]
                             [--read-every S] [--job]

A parent run with params and tags, then ``log_metrics`` of three keys every ``--interval`` seconds
(explicit steps and timestamps, so the test knows every row exactly) for ``--seconds`` seconds; at
``--child-at-seconds`` a nested child run (params, a tag, 30 metric rows, ``end_run``); every
``--read-every`` seconds (0: never) a read the agent passes through to the upstream (the parent's full
``loss`` history, paged, and a run search); a last param; ``end_run``.

With ``--job`` the script behaves as code inside an Azure ML job: ``mlflow.start_run()`` with no
experiment set picks up the job's run from ``MLFLOW_RUN_ID``; EXPERIMENT is ignored and no child run is
started. OUT_JSON gets the run ids the client was given, the params, tags and metric rows logged per
run, how many reads were made and the slowest call.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

BASE_TS = 1_740_000_000_000


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("experiment")
    parser.add_argument("out")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.1)
    parser.add_argument("--child-at-seconds", type=float, default=20.0)
    parser.add_argument("--read-every", type=float, default=0.0)
    parser.add_argument("--job", action="store_true")
    args = parser.parse_args()

    client = MlflowClient()
    parent: dict[str, Any] = {
        "name": "azure-parent",
        "params": {"optimizer": "adamw", "lr": "0.0003", "batch_size": "64"},
        "tags": {"phase": "train", "purpose": "azureml"},
        "metrics": [],
    }
    child: dict[str, Any] = {
        "name": "azure-child",
        "params": {"fold": "2", "seed": "7"},
        "tags": {"role": "child"},
        "metrics": [],
    }
    runs = {"parent": parent}
    slowest = ("", 0.0)

    def timed(name: str, fn: Any, *a: Any, **kw: Any) -> Any:
        nonlocal slowest
        started = time.perf_counter()
        result = fn(*a, **kw)
        took = time.perf_counter() - started
        if took > slowest[1]:
            slowest = (name, took)
        return result

    if args.job:
        run = timed("start_run", mlflow.start_run)  # the job's run, from MLFLOW_RUN_ID
        parent["name"] = run.info.run_name
    else:
        timed("set_experiment", mlflow.set_experiment, args.experiment)
        run = timed("start_run", mlflow.start_run, run_name=parent["name"])
    parent["run_id"] = run.info.run_id
    experiment_id = run.info.experiment_id
    timed("log_params", mlflow.log_params, {"optimizer": "adamw", "lr": 0.0003, "batch_size": 64})
    timed("set_tags", mlflow.set_tags, parent["tags"])

    started = time.monotonic()
    step = 0
    reads = 0
    child_done = args.job or args.child_at_seconds < 0
    next_read = args.read_every if args.read_every > 0 else float("inf")
    while time.monotonic() - started < args.seconds:
        values = {"loss": 4.0 / (step + 1), "acc": 1.0 - 1.0 / (step + 2), "lr": 0.0003 * 0.999**step}
        timestamp = BASE_TS + step * 10
        timed("log_metrics", mlflow.log_metrics, values, step=step, timestamp=timestamp)
        parent["metrics"].extend([k, v, step, timestamp] for k, v in values.items())
        elapsed = time.monotonic() - started
        if not child_done and elapsed >= args.child_at_seconds:
            child_done = True
            nested = timed("start_run(nested)", mlflow.start_run, run_name=child["name"], nested=True)
            child["run_id"] = nested.info.run_id
            runs["child"] = child
            timed("log_params", mlflow.log_params, {"fold": 2, "seed": 7})
            timed("set_tag", mlflow.set_tag, "role", "child")
            for s in range(30):
                ts = BASE_TS + 5 + s * 10
                timed("log_metric", mlflow.log_metric, "child_loss", 1.0 - s / 64, step=s, timestamp=ts)
                child["metrics"].append(["child_loss", 1.0 - s / 64, s, ts])
            timed("end_run(nested)", mlflow.end_run)
        if elapsed >= next_read:
            next_read += args.read_every
            history = timed("get_metric_history", client.get_metric_history, parent["run_id"], "loss")
            if len(history) > step + 1:
                raise AssertionError(f"{len(history)} loss rows read back after {step + 1} steps")
            timed("search_runs", client.search_runs, [experiment_id], max_results=10)
            reads += 1
        step += 1
        time.sleep(max(0.0, started + step * args.interval - time.monotonic()))
    timed("log_param", mlflow.log_param, "finished", "yes")
    parent["params"]["finished"] = "yes"
    timed("end_run", mlflow.end_run)

    Path(args.out).write_text(json.dumps({"runs": runs, "steps": step, "reads": reads, "slowest": slowest}))
    print(f"done: {step} steps, {reads} reads, slowest call {slowest[0]} {slowest[1]:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
