"""Training script for the outage tests: the plain MLflow client, every call timed.

Usage: python outage_train.py EXPERIMENT OUT_JSON [--steps N] [--pause-after STEP --ready-file F
       --resume-file G] [--child-at STEP]

A parent run with params and tags, ``--steps`` steps of ``log_metrics`` (explicit timestamps, so the
test knows every row exactly), a nested child run started at step ``--child-at``, and ``end_run``.
With ``--pause-after``, after that step the script creates ``--ready-file`` and waits (untimed) for
``--resume-file`` before going on. OUT_JSON gets the run ids the client was given, what was logged
and the latency of every MLflow call.
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
BASE_TS = 1_710_000_000_000


class Timer:
    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []

    def __call__(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        self.calls.append((name, time.perf_counter() - started))
        return result


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear within {timeout}s")
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("experiment")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--child-at", type=int, default=100)
    parser.add_argument("--pause-after", type=int, default=None)
    parser.add_argument("--ready-file", type=Path, default=None)
    parser.add_argument("--resume-file", type=Path, default=None)
    args = parser.parse_args()

    timed = Timer()
    logged: dict[str, list[list[Any]]] = {"parent": [], "child": []}
    ids: dict[str, str] = {}
    timed("set_experiment", mlflow.set_experiment, args.experiment)
    parent = timed("start_run", mlflow.start_run, run_name="outage-parent")
    ids["parent"] = parent.info.run_id
    timed("log_param", mlflow.log_param, "optimizer", "sgd")
    timed("log_params", mlflow.log_params, {"lr": 0.01, "epochs": args.steps, "note": "outage"})
    timed("set_tag", mlflow.set_tag, "phase", "train")
    timed("set_tags", mlflow.set_tags, {"team": "infra", "purpose": "outage-test"})
    for step in range(args.steps):
        values = {"loss": 10.0 / (step + 1), "acc": step / args.steps, "step_sq": float(step * step)}
        timestamp = BASE_TS + step * 10
        timed("log_metrics", mlflow.log_metrics, values, step=step, timestamp=timestamp)
        logged["parent"].extend([k, v, step, timestamp] for k, v in values.items())
        if step == args.child_at:
            child = timed("start_run(nested)", mlflow.start_run, run_name="outage-child", nested=True)
            ids["child"] = child.info.run_id
            timed("log_params", mlflow.log_params, {"fold": 1})
            timed("set_tag", mlflow.set_tag, "role", "child")
            for s in range(50):
                timed(
                    "log_metric", mlflow.log_metric, "child_loss", 1.0 - s / 100, step=s, timestamp=BASE_TS + 5 + s * 10
                )
                logged["child"].append(["child_loss", 1.0 - s / 100, s, BASE_TS + 5 + s * 10])
            timed("end_run", mlflow.end_run)
        if args.pause_after is not None and step == args.pause_after:
            assert args.ready_file is not None and args.resume_file is not None
            args.ready_file.write_text(str(step))
            print(f"paused after step {step}", flush=True)
            wait_for(args.resume_file, 180)
            print("resumed", flush=True)
    timed("end_run", mlflow.end_run)

    Path(args.out).write_text(json.dumps({"ids": ids, "logged": logged, "calls": timed.calls}))
    print(f"done: {len(timed.calls)} calls", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
