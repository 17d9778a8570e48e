"""Where an artifact lives: the path the client uses, the upstream's path for it, and the artifact URIs
the client is given.

The client addresses artifacts through MLflow's artifact proxy (``/api/2.0/mlflow-artifacts/artifacts/
<path>``), under the artifact URI the agent gave it for the run or logged model, in the ids it knows::

    <experiment>/<run>/artifacts/<relative path>            a run's (MLflow's default layout)
    <experiment>/models/<model>/artifacts/<relative path>   a logged model's
    <anything>/<run>/artifacts/<relative path>              a run in an experiment with its own location

The owner (run or model) is the segment before the first ``artifacts``. Ids the agent minted
(provisional experiments, runs and models) become the upstream's ids on the way out; only the
segments before ``artifacts`` are ever translated, never the user's own file names.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

from agent.catalog import Catalog, ModelEntry, RunEntry

ARTIFACTS_SEGMENT = "artifacts"
PROXY_SCHEME = "mlflow-artifacts:"
_PROXY_API = "/api/2.0/mlflow-artifacts/artifacts/"
# Where a provisional owner's files go once it exists upstream: the path of its upstream artifact
# URI under the artifact proxy (kept in the run's or model's info when it is created upstream).
UPSTREAM_ROOT = "upstream_artifact_root"


@dataclass(frozen=True, slots=True)
class ArtifactOwner:
    """The run or logged model a client artifact path belongs to."""

    kind: str  # "run" or "model"
    id: str  # as the client knows it
    experiment: str | None  # the experiment segment of the default layouts, else None
    relative: str  # the path below the owner's artifacts root ("" for the root itself)


def owner_of(path: str) -> ArtifactOwner | None:
    """The owner named by a client path, or None for a path outside any run's or model's root."""
    segments = path.split("/")
    try:
        i = segments.index(ARTIFACTS_SEGMENT)
    except ValueError:
        return None
    if i == 0:
        return None
    relative = "/".join(segments[i + 1:])
    if i >= 3 and segments[i - 2] == "models":
        return ArtifactOwner("model", segments[i - 1], segments[i - 3], relative)
    return ArtifactOwner("run", segments[i - 1], segments[0] if i == 2 else None, relative)


def _entry(owner: ArtifactOwner, catalog: Catalog) -> RunEntry | ModelEntry | None:
    return catalog.model(owner.id) if owner.kind == "model" else catalog.run(owner.id)


def given_up_owner(path: str, catalog: Catalog) -> str | None:
    """The run or model of a client path whose creation upstream was refused for good (its records were
    dead-lettered), if it is one of those: its files can never go anywhere either."""
    owner = owner_of(path)
    if owner is None:
        return None
    entry = _entry(owner, catalog)
    if owner.kind == "model" and entry is not None and entry.info.get("azure_run"):
        entry = catalog.run(str(entry.info["azure_run"])) or entry
    if entry is not None and entry.upstream_id is None and entry.info.get("abandoned"):
        return owner.id
    return None


def upstream_artifact_path(path: str, catalog: Catalog) -> str | None:
    """The path to send to the upstream's artifact proxy for a client path; None while an id in it is
    not created upstream yet (the caller waits)."""
    segments = path.split("/")
    owner = owner_of(path)
    if owner is not None:
        entry = _entry(owner, catalog)
        if entry is not None and entry.provisional:
            if entry.upstream_id is None:
                return None
            root = entry.info.get(UPSTREAM_ROOT)
            if isinstance(root, str) and root:
                return f"{root}/{owner.relative}" if owner.relative else root
        cut = segments.index(ARTIFACTS_SEGMENT)
    else:
        cut = len(segments)
    out = []
    for segment in segments[:cut]:
        upstream = _upstream_id(segment, catalog)
        if upstream is None:
            return None
        out.append(upstream)
    return "/".join(out + segments[cut:])


def _upstream_id(segment: str, catalog: Catalog) -> str | None:
    run = catalog.runs.get(segment)
    if run is not None and run.provisional:
        return run.upstream_id
    model = catalog.models.get(segment)
    if model is not None and model.provisional:
        return model.upstream_id
    experiment = catalog.experiments.get(segment)
    if experiment is not None and experiment.provisional:
        return experiment.upstream_id
    return segment


def proxied_root(uri: str | None, upstream_base: str | None = None) -> str | None:
    """The path under the artifact proxy that an upstream artifact URI names, if it names one:
    ``mlflow-artifacts:[//host]/<path>``, or ``http(s)://<the upstream>/api/2.0/mlflow-artifacts/
    artifacts/<path>``. None for anything else (an object store the client writes to itself)."""
    if not uri:
        return None
    if uri.startswith(PROXY_SCHEME):
        rest = uri[len(PROXY_SCHEME):]
        if rest.startswith("//"):  # a netloc: the server's own address, which the client must not use
            rest = "/" + rest[2:].partition("/")[2]
        return rest.strip("/") or None
    if upstream_base is not None and uri.startswith(("http://", "https://")):
        parts, base = urlsplit(uri), urlsplit(upstream_base)
        if (parts.scheme, parts.netloc) == (base.scheme, base.netloc) and _PROXY_API in parts.path:
            return parts.path.split(_PROXY_API, 1)[1].strip("/") or None
    return None


def client_artifact_uri(uri: str | None, catalog: Catalog, upstream_base: str | None = None) -> str | None:
    """The artifact URI to give the client for an upstream one: through the agent (``mlflow-artifacts:``,
    no host, upstream ids of provisional owners replaced by the client's) when the upstream proxies
    artifacts; unchanged otherwise (``s3://`` and the like: the client writes there itself, as it would
    without the agent)."""
    root = proxied_root(uri, upstream_base)
    if root is None:
        return uri
    segments = root.split("/")
    cut = segments.index(ARTIFACTS_SEGMENT) if ARTIFACTS_SEGMENT in segments else len(segments)
    translated = [_client_id(s, catalog) for s in segments[:cut]] + segments[cut:]
    return PROXY_SCHEME + "/" + "/".join(translated)


def _client_id(segment: str, catalog: Catalog) -> str:
    for client in (catalog.client_run_id(segment), catalog.client_model_id(segment),
                   catalog.client_experiment_id(segment)):
        if client != segment:
            return client
    return segment


def default_run_uri(experiment: str, run: str) -> str:
    return f"{PROXY_SCHEME}/{experiment}/{run}/{ARTIFACTS_SEGMENT}"


def default_model_uri(experiment: str, model: str) -> str:
    return f"{PROXY_SCHEME}/{experiment}/models/{model}/{ARTIFACTS_SEGMENT}"


@dataclass(frozen=True, slots=True)
class AzureArtifactTarget:
    """Where Azure ML keeps a file: a run's artifacts in run history, at a path relative to the run."""

    experiment_id: str  # upstream ids
    run_id: str
    path: str  # "" for the run's root


class NotAnArtifactPath(ValueError):
    """A path outside any run's or logged model's artifacts: Azure ML has nowhere to keep it."""


def azure_artifact_target(path: str, catalog: Catalog) -> AzureArtifactTarget | None:
    """The Azure ML place of a client path; None while its run is not created upstream yet. A logged
    model's files go under its holder run, in the model's folder there (see ``agent.sources.models``).
    Raises NotAnArtifactPath for a path of another shape."""
    owner = owner_of(path)
    if owner is None:
        raise NotAnArtifactPath(f"{path[:200]!r} is not under a run's or a logged model's artifacts")
    relative = owner.relative
    run_id = owner.id
    if owner.kind == "model":
        model = catalog.model(owner.id)
        if model is None or not model.info.get("azure_run"):
            raise NotAnArtifactPath(f"{path[:200]!r} names logged model {owner.id}, which this agent did not create")
        run_id = str(model.info["azure_run"])
        folder = str(model.info.get("azure_dir") or model.info.get("name") or owner.id)
        relative = f"{folder}/{relative}" if relative else folder
    run = catalog.run(run_id)
    upstream_run = catalog.upstream_run_id(run_id)
    if upstream_run is None:
        return None
    experiment = run.info.get("experiment_id") if run is not None else None
    if not isinstance(experiment, str):
        experiment = owner.experiment
    if experiment is None:
        raise NotAnArtifactPath(f"the experiment of run {run_id} is not known")
    upstream_experiment = catalog.upstream_experiment_id(experiment)
    if upstream_experiment is None:
        return None
    return AzureArtifactTarget(upstream_experiment, upstream_run, relative)
