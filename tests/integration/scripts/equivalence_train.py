"""Training script for the equivalence test: the plain MLflow client and nothing else.

Usage: python equivalence_train.py EXPERIMENT_NAME OUT_JSON

Every run carries the user tag ``case=<id>`` so runs can be compared across servers even when MLflow
generated their names. Every metric point is logged with an explicit timestamp derived from its step,
so two executions of this script log identical (key, value, step, timestamp) rows. The script writes
what it logged (per case) and the run ids it was given to OUT_JSON.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

BASE_TS = 1_700_000_000_000
STEPS = 2000
FIRST_STEP = -40  # some negative steps
KEYS = ("loss", "acc", "lr", "grad_norm", "special")


def ts(step: int, slot: int = 0) -> int:
    """A deterministic timestamp (ms) for a step; ``slot`` separates calls that share a step."""
    return BASE_TS + (step - FIRST_STEP) * 10 + slot


def special_value(step: int) -> float:
    """Mostly ordinary numbers, with NaN, +Infinity and -Infinity sprinkled in."""
    if step % 97 == 0:
        return math.nan
    if step % 89 == 0:
        return math.inf
    if step % 83 == 0:
        return -math.inf
    return step * 0.25 - 3.0


class Recorder:
    def __init__(self) -> None:
        self.cases: dict[str, dict[str, Any]] = {}

    def case(self, case: str, run_id: str, parent: str | None, name: str | None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "run_id": run_id,
            "parent_case": parent,
            "run_name": name,
            "params": {},
            "tags": {"case": case},
            "metrics": [],
            "status": None,
        }
        self.cases[case] = entry
        return entry


def main() -> int:
    experiment, out_path = sys.argv[1], sys.argv[2]
    started = time.monotonic()
    rec = Recorder()
    client = MlflowClient()
    mlflow.set_experiment(experiment)

    # 1. A named run with everything, and a nested named child.
    with mlflow.start_run(run_name="main-run") as run:
        main = rec.case("main", run.info.run_id, None, "main-run")
        mlflow.set_tag("case", "main")
        mlflow.log_param("optimizer", "adam")
        mlflow.log_params({"lr": 0.001, "batch_size": 64, "layers": "3x128", "empty": ""})
        main["params"].update({"optimizer": "adam", "lr": "0.001", "batch_size": "64", "layers": "3x128", "empty": ""})
        mlflow.set_tag("stage", "dev")
        mlflow.set_tags({"team": "vision", "owner": "alice", "to_delete": "soon", "unicode": "héllo ✓"})
        main["tags"].update({"stage": "dev", "team": "vision", "owner": "alice", "unicode": "héllo ✓"})
        for step in range(FIRST_STEP, FIRST_STEP + STEPS):
            values = {
                "loss": 1.0 / (abs(step) + 1),
                "acc": step / STEPS,
                "lr": 0.001 * 0.999**step,
                "grad_norm": float(step % 13),
                "special": special_value(step),
            }
            mlflow.log_metrics(values, step=step, timestamp=ts(step))
            main["metrics"].extend([k, v, step, ts(step)] for k, v in values.items())
            if step == 100:
                with mlflow.start_run(run_name="child-run", nested=True) as child_run:
                    child = rec.case("child", child_run.info.run_id, "main", "child-run")
                    mlflow.set_tag("case", "child")
                    mlflow.log_params({"fold": 3, "seed": 42})
                    child["params"].update({"fold": "3", "seed": "42"})
                    for s in range(-5, 50):
                        mlflow.log_metric("child_loss", 2.0 - s * 0.01, step=s, timestamp=ts(s, 5))
                        child["metrics"].append(["child_loss", 2.0 - s * 0.01, s, ts(s, 5)])
                    child["status"] = "FINISHED"
        # Individual log_metric calls (fluent and client), including special values.
        for i, value in enumerate((0.5, math.nan, math.inf, -math.inf, -0.0, 1e-300, 1.7976931348623157e308)):
            mlflow.log_metric("single", value, step=-i, timestamp=ts(i, 1))
            main["metrics"].append(["single", value, -i, ts(i, 1)])
        for i in range(20):
            client.log_metric(run.info.run_id, "client_single", i * 1.5, timestamp=ts(i, 2), step=i - 10)
            main["metrics"].append(["client_single", i * 1.5, i - 10, ts(i, 2)])
        # log_batch with explicit timestamps: metrics, params and tags together.
        metrics = [Metric("batch_metric", float(i) if i % 7 else math.nan, ts(i, 3), -i) for i in range(300)]
        client.log_batch(
            run.info.run_id,
            metrics=metrics,
            params=[Param("batch_param_a", "x"), Param("batch_param_b", "y")],
            tags=[RunTag("batch_tag", "z"), RunTag("stage", "prod")],
        )
        main["metrics"].extend([m.key, m.value, m.step, m.timestamp] for m in metrics)
        main["params"].update({"batch_param_a": "x", "batch_param_b": "y"})
        main["tags"].update({"batch_tag": "z", "stage": "prod"})
        mlflow.delete_tag("to_delete")
        main["status"] = "FINISHED"

    # 2. An unnamed run (MLflow generates the name) with an unnamed nested child.
    run = mlflow.start_run()
    unnamed = rec.case("unnamed", run.info.run_id, None, None)
    mlflow.set_tags({"case": "unnamed", "kind": "anonymous"})
    unnamed["tags"]["kind"] = "anonymous"
    mlflow.log_param("alpha", 0.5)
    unnamed["params"]["alpha"] = "0.5"
    for step in range(0, 200):
        mlflow.log_metrics({"u1": step * 2.0, "u2": -step * 1.0}, step=step - 100, timestamp=ts(step, 4))
        unnamed["metrics"].extend(
            [["u1", step * 2.0, step - 100, ts(step, 4)], ["u2", -step * 1.0, step - 100, ts(step, 4)]]
        )
    child_run = mlflow.start_run(nested=True)
    uchild = rec.case("unnamed-child", child_run.info.run_id, "unnamed", None)
    mlflow.set_tag("case", "unnamed-child")
    mlflow.log_metric("inner", 7.0, step=0, timestamp=ts(0, 6))
    uchild["metrics"].append(["inner", 7.0, 0, ts(0, 6)])
    mlflow.end_run()
    uchild["status"] = "FINISHED"
    mlflow.end_run()
    unnamed["status"] = "FINISHED"

    # 3. A run that fails: the context manager ends it FAILED.
    try:
        with mlflow.start_run(run_name="failing-run") as run:
            failed = rec.case("failed", run.info.run_id, None, "failing-run")
            mlflow.set_tag("case", "failed")
            mlflow.log_param("will_fail", "yes")
            failed["params"]["will_fail"] = "yes"
            mlflow.log_metric("before_failure", 1.0, step=0, timestamp=ts(0, 7))
            failed["metrics"].append(["before_failure", 1.0, 0, ts(0, 7)])
            raise ValueError("training diverged")
    except ValueError:
        failed["status"] = "FAILED"

    # 4. A run ended explicitly as KILLED.
    run = mlflow.start_run(run_name="killed-run")
    killed = rec.case("killed", run.info.run_id, None, "killed-run")
    mlflow.set_tag("case", "killed")
    mlflow.end_run(status="KILLED")
    killed["status"] = "KILLED"

    elapsed = time.monotonic() - started
    with open(out_path, "w") as fh:
        json.dump({"elapsed": elapsed, "cases": rec.cases}, fh)
    print(f"done in {elapsed:.2f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
