"""A training loop that logs 10 metrics per step with the unmodified mlflow client; prints JSON timings.

    MLFLOW_TRACKING_URI=... python bench/train_loop.py STEPS {log_metric|log_metrics}
"""

from __future__ import annotations

import json
import sys
import time

import mlflow


def main(steps: int, mode: str) -> None:
    mlflow.set_experiment("bench-train-loop")
    per_step: list[float] = []
    with mlflow.start_run():
        for step in range(steps):
            values = {f"m{i}": step * 0.001 + i for i in range(10)}
            t0 = time.perf_counter()
            if mode == "log_metric":
                for key, value in values.items():
                    mlflow.log_metric(key, value, step=step)
            else:
                mlflow.log_metrics(values, step=step)
            per_step.append(time.perf_counter() - t0)
    per_step.sort()
    print(json.dumps({
        "steps": steps,
        "median_ms": per_step[len(per_step) // 2] * 1000,
        "p99_ms": per_step[min(len(per_step) - 1, int(len(per_step) * 0.99))] * 1000,
    }))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
