"""Read-your-writes for ``runs/search``: the runs this agent holds writes for are part of the answer as
the client would see them once everything is uploaded.

Searches of experiments where the agent holds nothing, and knows no provisional id, go to the upstream
as they are. Otherwise the upstream's page (ids translated to the client's) is merged with the runs the
agent holds for those experiments — provisional runs not created upstream yet, and runs with records
waiting — each seen with its pending writes (``MlflowApi.merged_run``), filtered and ordered here as
MLflow would (``agent.sources.search_filter``). Held runs are always on the first page (a later page leaves them
out, so none shows twice). While the upstream does not answer, a search of experiments it holds gets
503 (retried by the client), never a partial answer; a search of experiments only the agent knows is
answered here in full.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from agent.catalog import RunEntry
from agent.errors import invalid, unavailable
from agent.sources import reads
from agent.sources.mlflow_api import MlflowApi, json_response
from agent.sources.search_filter import SearchFilterError, parse_run_filter, sort_runs

_VIEW_TYPES = {"ACTIVE_ONLY": ("active",), "DELETED_ONLY": ("deleted",), "ALL": ("active", "deleted")}


class RunSearch:
    def __init__(self, api: MlflowApi) -> None:
        self.api = api
        self.catalog = api.catalog
        self.ledger = api.ledger

    def add_routes(self, app: web.Application) -> None:
        for prefix in ("/api/2.0/mlflow/", "/ajax-api/2.0/mlflow/"):
            app.router.add_post(prefix + "runs/search", self.api.guard("runs/search", self.search))

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self.api.forward is None:
            raise unavailable("mlflow-agent runs offline and holds no runs of these experiments")
        return await self.api.forward(request)

    async def search(self, request: web.Request) -> web.StreamResponse:
        parsed = reads.search_request(await request.read())
        if parsed is None:
            return await self._forward(request)  # the upstream's to answer, malformed requests included
        body, ids = parsed
        if self.api.before_lifecycle is not None:
            await self.api.before_lifecycle()  # what this process sent as datagrams is part of what it reads
        wanted = set(ids)
        local_only = self.api.rest is None or all(self.catalog.upstream_experiment_id(i) is None for i in ids)
        held = [e for e in self.catalog.runs.values()
                if e.info.get("experiment_id") in wanted and not e.info.get("abandoned")
                and (e.upstream_id is None or self.ledger.run_items(e.run_id))]
        # Runs and experiments with provisional ids need their ids translated back in the answer, and Azure
        # ML's artifact URIs their form through the agent.
        translate = self.api.azureml or any(self.catalog.upstream_experiment_id(i) != i for i in ids) or any(
            e.provisional and e.info.get("experiment_id") in wanted for e in self.catalog.runs.values())
        if not held and not local_only and not translate:
            return await self._forward(request)
        stages = _VIEW_TYPES.get(str(body.get("run_view_type") or "ACTIVE_ONLY"))
        if stages is None:
            raise invalid(f"Invalid value {body.get('run_view_type')!r} for parameter 'run_view_type'")
        try:
            matcher = parse_run_filter(body.get("filter") if isinstance(body.get("filter"), str) else None)
            order_by = body.get("order_by") if isinstance(body.get("order_by"), list) else None
            upstream: list[dict[str, Any]] = []
            token: str | None = None
            if not local_only:
                upstream, token = await self._search_upstream(body, ids)
            by_id = {str(r["info"].get("run_id")): r for r in upstream}
            views = {e.run_id: await self._view(e, by_id.get(e.run_id)) for e in held}
            runs: list[Mapping[str, Any]] = [r for r in upstream if r["info"].get("run_id") not in views]
            if not body.get("page_token"):
                mine: list[Mapping[str, Any]] = [v for v in views.values()
                        if v["info"].get("lifecycle_stage", "active") in stages and matcher.matches(v)]
                runs = sort_runs(runs + mine, order_by)
        except SearchFilterError as exc:
            raise invalid(str(exc)) from exc
        answer: dict[str, Any] = {"runs": runs} if runs else {}
        if token:
            answer["next_page_token"] = token
        return json_response(answer)

    async def _search_upstream(self, body: dict[str, Any], ids: list[str]) -> tuple[list[dict[str, Any]], str | None]:
        upstream_ids = [u for u in (self.catalog.upstream_experiment_id(i) for i in ids) if u is not None]
        answer = await self.api.ask_upstream("POST", "runs/search", body=dict(body, experiment_ids=upstream_ids),
                                             timeout=self.api.read_timeout)
        if answer is None:
            raise unavailable("mlflow-agent: the upstream is unreachable and holds part of this search's answer")
        runs = [r for r in answer.get("runs") or [] if isinstance(r, dict) and isinstance(r.get("info"), dict)]
        for run in runs:
            info = run["info"]
            upstream_id = str(info.get("run_id") or info.get("run_uuid") or "")
            entry = self.catalog.run(self.catalog.client_run_id(upstream_id))
            if entry is not None:
                await self.api.merged_run(run, entry)
                continue
            if isinstance(info.get("experiment_id"), str):
                info["experiment_id"] = self.catalog.client_experiment_id(info["experiment_id"])
            info["artifact_uri"] = self.api.client_run_uri(info.get("artifact_uri"), info.get("experiment_id"),
                                                           upstream_id)
        token = answer.get("next_page_token")
        return runs, token if isinstance(token, str) and token else None

    async def _view(self, entry: RunEntry, found: dict[str, Any] | None) -> dict[str, Any]:
        """A held run as the search must judge it: the upstream's copy with what waits merged in (already
        done for runs on the upstream's page), the upstream's run read for one not on it, or, not created
        upstream yet, what the agent knows."""
        if found is not None:
            return found
        if entry.upstream_id is None or self.api.rest is None:
            return await self.api.local_run(entry)
        answer = await self.api.ask_upstream("GET", "runs/get", params={"run_id": entry.upstream_id})
        run = answer.get("run") if answer is not None else None
        if not isinstance(run, dict) or not isinstance(run.get("info"), dict):
            raise unavailable(f"mlflow-agent: the upstream did not answer for run {entry.run_id}, part of this search")
        await self.api.merged_run(run, entry)
        return run
