"""mlflow-agent: a local sidecar between training code and an MLflow tracking server.

Data flows one way: ``sources`` (what the training process sends) -> ``spool`` (durable queue and
what the agent knows about runs) -> ``upload`` (batched, retried delivery) -> ``upstream``.
"""

__version__ = "0.1.0"
