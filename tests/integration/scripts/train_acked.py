"""A training loop for the fault tests: the unmodified mlflow client, plus a record of what it was told.

Run as a subprocess with ``MLFLOW_TRACKING_URI`` pointing at an agent::

    python train_acked.py --experiment NAME --run-name NAME --steps N --ack FILE [--child-run NAME]

It sets the experiment, creates a run, logs params and tags, then logs ``len(KEYS)`` metrics per step
with ``MlflowClient.log_batch`` (explicit, deterministic timestamps), and finally ends the run as
FINISHED (optionally after a nested child run). Every call that RETURNED (= was acknowledged) is
appended to the ack file as one JSON object per record, flushed right after the call returns::

    {"kind": "run", "run": "<run name>", "run_id": "...", "experiment_id": "...", "parent_id": null}
    {"kind": "param" | "tag", "run": "<run name>", "key": "...", "value": "..."}
    {"kind": "metric", "run": "<run name>", "key": "...", "value": 1.25, "step": 3, "timestamp": 1700000000030}
    {"kind": "status", "run": "<run name>", "status": "FINISHED"}

A call that raised is never recorded; the script then exits non-zero with the traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import IO, Any

import mlflow
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

KEYS = ("loss", "accuracy", "lr")
T0 = 1_700_000_000_000  # ms; metric timestamps are T0 + 10 * step: the same on every run of the script
PARAMS = {"lr": "0.01", "optimizer": "adam", "batch_size": "64"}
TAGS = {"team": "fault-tests", "dataset": "synthetic"}


def metric_value(step: int, index: int) -> float:
    """Exactly representable in binary, so the upstream stores exactly what was sent."""
    return step + index / 4 - 100.0


class Acks:
    def __init__(self, out: IO[str]) -> None:
        self.out = out

    def write(self, *records: dict[str, Any]) -> None:
        self.out.write("".join(json.dumps(r) + "\n" for r in records))
        self.out.flush()


def log_run(client: MlflowClient, acks: Acks, experiment_id: str, run_name: str, *, steps: int,
            step_sleep: float = 0.0, parent_id: str | None = None) -> str:
    tags = {"mlflow.parentRunId": parent_id} if parent_id else None
    run = client.create_run(experiment_id, run_name=run_name, tags=tags)
    run_id = str(run.info.run_id)
    acks.write({"kind": "run", "run": run_name, "run_id": run_id, "experiment_id": experiment_id,
                "parent_id": parent_id})
    print(f"RUN {run_name} {run_id}", flush=True)
    for key, value in PARAMS.items():
        client.log_param(run_id, key, value)
        acks.write({"kind": "param", "run": run_name, "key": key, "value": value})
    for key, value in TAGS.items():
        client.set_tag(run_id, key, value)
        acks.write({"kind": "tag", "run": run_name, "key": key, "value": value})
    for step in range(steps):
        timestamp = T0 + 10 * step
        metrics = [Metric(key, metric_value(step, i), timestamp, step) for i, key in enumerate(KEYS)]
        client.log_batch(run_id, metrics=metrics)
        acks.write(*({"kind": "metric", "run": run_name, "key": m.key, "value": m.value, "step": m.step,
                      "timestamp": m.timestamp} for m in metrics))
        if step_sleep:
            time.sleep(step_sleep)
    return run_id


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--experiment", required=True)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--ack", required=True, help="file to append acknowledged records to")
    parser.add_argument("--child-run", default=None, help="also log a nested child run of this name")
    parser.add_argument("--child-steps", type=int, default=20)
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds to sleep after each step")
    args = parser.parse_args(argv)

    client = MlflowClient()
    with open(args.ack, "a", encoding="utf-8") as out:
        acks = Acks(out)
        experiment = mlflow.set_experiment(args.experiment)
        print(f"EXPERIMENT {experiment.experiment_id}", flush=True)
        run_id = log_run(client, acks, experiment.experiment_id, args.run_name, steps=args.steps,
                         step_sleep=args.step_sleep)
        if args.child_run:
            child_id = log_run(client, acks, experiment.experiment_id, args.child_run, steps=args.child_steps,
                               parent_id=run_id)
            client.set_terminated(child_id, "FINISHED")
            acks.write({"kind": "status", "run": args.child_run, "status": "FINISHED"})
        client.set_terminated(run_id, "FINISHED")
        acks.write({"kind": "status", "run": args.run_name, "status": "FINISHED"})
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
