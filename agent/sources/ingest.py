"""What every source does with a validated write: the checks that need state (a changed param value,
a deleted run), one durable append to the spool, then the catalog brought up to date.

HTTP hands over one request at a time and awaits the commit before answering; the datagram source
hands over everything it read in one interval, so many datagrams share one commit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.catalog import Catalog, RunEntry
from agent.errors import MlflowApiError, invalid, run_not_active
from agent.records import Kind, Record
from agent.spool.ledger import Ledger
from agent.spool.store import CatalogWrite, ParamPut, Spool, TagPut
from agent.validation import LogBatch


@dataclass(slots=True)
class _Pending:
    """Records of one append, merged per run and kind in arrival order."""

    records: dict[tuple[str, Kind], list[list[Any]]] = field(default_factory=dict)
    writes: list[CatalogWrite] = field(default_factory=list)
    reserved: list[tuple[RunEntry, str]] = field(default_factory=list)
    accepted: list[tuple[RunEntry, LogBatch]] = field(default_factory=list)

    def add(self, run: str, kind: Kind, items: Sequence[list[Any]]) -> None:
        if items:
            self.records.setdefault((run, kind), []).extend(items)


class Ingest:
    def __init__(self, catalog: Catalog, spool: Spool, ledger: Ledger) -> None:
        self.catalog = catalog
        self.spool = spool
        self.ledger = ledger

    async def log(self, entry: RunEntry, lb: LogBatch, *, source: str, batch: bool) -> None:
        """One client request for a known run; raises MlflowApiError (nothing written) or spool errors."""
        errors = await self.log_many([(entry, lb)], source=source, batch=batch)
        if errors[0] is not None:
            raise errors[0]

    async def log_many(self, writes: Sequence[tuple[RunEntry, LogBatch]], *, source: str,
                       batch: bool = True) -> list[MlflowApiError | None]:
        """Append all acceptable writes in one commit. Returns, per write, why it was refused (or None).

        Raises SpoolFull or a storage error when the commit fails: then nothing was written.
        """
        pending = _Pending()
        errors: list[MlflowApiError | None] = []
        for entry, lb in writes:
            error = self._check(entry, lb, batch)
            errors.append(error)
            if error is not None:
                continue
            run = entry.run_id
            new_params = [(k, v) for k, v in lb.params if k not in entry.params]
            # Reserve params before the commit, so a concurrent write with another value is refused.
            for k, v in new_params:
                entry.params[k] = v
                pending.reserved.append((entry, k))
            pending.add(run, Kind.PARAMS, lb.params)
            pending.add(run, Kind.METRICS, lb.metrics)
            pending.add(run, Kind.TAGS, lb.tags)
            pending.writes.extend(ParamPut(run, k, v) for k, v in new_params)
            pending.writes.extend(TagPut(run, k, v) for k, v in lb.tags)
            pending.accepted.append((entry, lb))
        if not pending.records:
            return errors
        records = [Record(run, kind, items) for (run, kind), items in pending.records.items()]
        try:
            result = await self.spool.append(records, pending.writes, source=source)
        except BaseException:
            for entry, key in pending.reserved:
                entry.params.pop(key, None)
            raise
        self.ledger.appended(result)
        for entry, lb in pending.accepted:
            for k, v in lb.tags:
                entry.tags[k] = v
                if k == "mlflow.runName":
                    entry.info["run_name"] = v
            for item in lb.metrics:
                self.catalog.note_metric(entry, item[0], item[1], item[2], item[3])
        return errors

    @staticmethod
    def _check(entry: RunEntry, lb: LogBatch, batch: bool) -> MlflowApiError | None:
        if entry.deleted:
            return run_not_active(entry.run_id)
        conflicts = [(k, entry.params[k], v) for k, v in lb.params if k in entry.params and entry.params[k] != v]
        if conflicts:
            return invalid(param_conflict_message(entry.run_id, conflicts, batch))
        return None


def param_conflict_message(run_id: str, conflicts: list[tuple[str, str, str]], batch: bool) -> str:
    """MLflow's wording for a changed param value (single call and log-batch differ)."""
    if not batch and len(conflicts) == 1:
        key, old, new = conflicts[0]
        return (f"Changing param values is not allowed. Param with key='{key}' was already logged with "
                f"value='{old}' for run ID='{run_id}'. Attempted logging new value '{new}'.")
    listed = ", ".join(f"{{'key': '{k}', 'old_value': '{o}', 'new_value': '{n}'}}" for k, o, n in conflicts)
    return f"Changing param values is not allowed. Params were already logged='[{listed}]' for run ID='{run_id}'."


__all__ = ["Ingest", "MlflowApiError", "param_conflict_message"]
