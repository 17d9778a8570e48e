"""The demo's training loop: plain ``mlflow`` calls, nothing agent-specific but the tracking URI.

Run by ``python -m agent demo`` in a subprocess with MLFLOW_TRACKING_URI pointing at the agent. At
half time it prints a marker and waits for a line on stdin, so the demo can stop the upstream
server there: the second half is logged during an outage.
"""

from __future__ import annotations

import math
import random
import sys
import time

import mlflow


def log_a_model() -> None:
    """An sklearn model fitted on synthetic data, logged as MLflow 3 does (a logged model and its files)."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    features = np.random.default_rng(0).normal(size=(200, 4))
    labels = (features[:, 0] + features[:, 1] > 0).astype(int)
    mlflow.sklearn.log_model(LogisticRegression().fit(features, labels), name="model", input_example=features[:2])


def main(steps: int) -> None:
    mlflow.set_experiment("mlflow-agent-demo")
    durations: dict[str, list[float]] = {"upstream up": [], "upstream down": []}
    phase = "upstream up"
    with mlflow.start_run(run_name="demo-train") as run:
        mlflow.log_params({"lr": 0.01, "batch_size": 64, "optimizer": "adam", "steps": steps})
        mlflow.set_tags({"team": "demo", "dataset": "synthetic"})
        loss = 2.5
        for step in range(steps):
            if step == steps // 2:
                print("DEMO-HALFWAY", flush=True)
                sys.stdin.readline()  # the demo stops the upstream, then lets us go on
                phase = "upstream down"
            loss = loss * 0.99 + random.uniform(-0.01, 0.01)
            t0 = time.perf_counter()
            mlflow.log_metrics(
                {
                    "train/loss": loss,
                    "train/accuracy": 1 - loss / 3,
                    "train/lr": 0.01 * math.cos(step / steps),
                    "train/grad_norm": abs(random.gauss(1, 0.2)),
                    "train/tokens_per_s": random.uniform(9000, 11000),
                },
                step=step,
            )
            durations[phase].append(time.perf_counter() - t0)
            time.sleep(0.005)  # the "training" itself
        with mlflow.start_run(run_name="demo-eval", nested=True):
            mlflow.log_metric("eval/accuracy", 1 - loss / 3)
        # Still during the outage: a file and a model, both kept by the agent until the server is back.
        mlflow.log_dict({"lr": 0.01, "batch_size": 64, "final_loss": loss}, "config/summary.json")
        log_a_model()
    for name, values in durations.items():
        if values:
            values.sort()
            p50 = values[len(values) // 2] * 1000
            p99 = values[min(len(values) - 1, int(len(values) * 0.99))] * 1000
            print(f"DEMO-TIMING {name}: {len(values)} steps, log_metrics p50 {p50:.2f} ms, p99 {p99:.2f} ms",
                  flush=True)
    print(f"DEMO-RUN {run.info.run_id}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
