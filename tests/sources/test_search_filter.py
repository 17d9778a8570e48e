"""Search filters and order_by (agent.sources.search_filter) against MLflow 3.17.2 itself.

MLflow's side is its in-memory path on its own entities: ``SearchUtils.filter`` / ``sort`` on ``Run`` objects
and ``SearchLoggedModelsUtils.filter_logged_models`` / ``sort`` on ``LoggedModel`` objects. The agent's side
sees the same entities as MLflow's REST API writes them (``message_to_json(entity.to_proto())``).

``SearchUtils`` checks a clause's comparator only when it evaluates the clause, and the agent checks them all
when it parses (as the SQL store does). So "MLflow rejects" means here: parsing fails, or evaluating some clause
on ``PROBE_RUN`` / ``PROBE_MODEL`` (entities with every field set) fails. Where the agent refuses something
MLflow accepts, the module documents it and its message says "not supported for".
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from mlflow.entities import (
    Dataset,
    DatasetInput,
    InputTag,
    LoggedModel,
    LoggedModelStatus,
    Metric,
    Param,
    Run,
    RunData,
    RunInfo,
    RunInputs,
    RunTag,
)
from mlflow.protos.service_pb2 import Run as ProtoRun
from mlflow.utils.proto_json_utils import message_to_json, parse_dict
from mlflow.utils.search_utils import SearchLoggedModelsUtils, SearchUtils

from agent.sources.search_filter import (
    SearchFilterError,
    parse_model_filter,
    parse_run_filter,
    sort_models,
    sort_runs,
)

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNSUPPORTED = "not supported for"

# Keys that need quoting, collide with MLflow's aliases (created, run name), are SQL keywords or LIKE wildcards;
# few of them, so that filters often meet the keys runs have.
KEYS = ["a", "a b", "created", "a.b", "x-y", "50%_off", "é", "1a", "select", "Run Name", "it's"]
STRINGS = ["", "a", "A", "abc", "a%", "a_c", "it's", 'say "hi"', "x\ny", "it''s", "50%_off"]
FLOATS = [0.0, -0.0, 1.0, 1.5, -1.0, 1e3, math.nan, math.inf, -math.inf]
NUMBERS = ["0", "1", "-1", "1.5", "-0.5", ".5", "5.", "1e3", "1E-3", "2.5e1", "1e400", "-1e400", "-0"]
BAD_NUMBERS = ["0x1F", "'1'", "1E+5", "abc", "NULL"]
STATUSES = ["RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED"]
RUN_NAMES = ["", "a", "run-1", "Run_1", "big run"]
NUMERIC_COMPARATORS = ["=", "!=", "<", "<=", ">", ">="]
STRING_COMPARATORS = ["=", "!=", "LIKE", "like", "ILIKE", "ilike"]
COMPARATORS = NUMERIC_COMPARATORS + STRING_COMPARATORS + ["==", "<>", "NOT LIKE", "RLIKE", "IN"]
LISTS = ["'a'", "'a', 'b'", "'a',", "'r1x', 'r2y'", "'train', 'eval'", "('r1x'), 'ds'", "'r2y' 'x'", '"r1x"']
BAD_LISTS = ["", "1, 2", "'a', 1", "['a']", "'a' + 'b'"]


def loads(entity: Any) -> dict[str, Any]:
    parsed: dict[str, Any] = json.loads(message_to_json(entity.to_proto()))
    return parsed


def quoted(text: str, quote: str) -> str:
    return f"{quote}{text}{quote}"


def mostly(draw: st.DrawFn, good: Sequence[str], bad: Sequence[str]) -> str:
    """One of ``good`` four times in five, else one of ``bad`` (or of ``good``)."""
    return draw(st.sampled_from(good if draw(st.integers(0, 4)) else [*good, *bad]))


# The first few keys and values most of the time, so that filters meet what runs hold.
hot_keys = st.sampled_from(KEYS[:4]) | st.sampled_from(KEYS)
hot_strings = st.sampled_from(STRINGS[:5]) | st.sampled_from(STRINGS)


# ---------------------------------------------------------------------------------------------------------
# Runs.

def make_run(
    run_id: str, start_time: int = 0, *, end_time: int | None = None, status: str = "FINISHED",
    run_name: str | None = "run", user_id: str = "u", artifact_uri: str = "s3://b/a",
    metrics: Sequence[tuple[str, float]] = (), params: Sequence[tuple[str, str]] = (),
    tags: Sequence[tuple[str, str]] = (), datasets: Sequence[tuple[str, str, str | None]] = (),
) -> Run:
    info = RunInfo(run_id=run_id, experiment_id="0", user_id=user_id, status=status, start_time=start_time,
                   end_time=end_time, lifecycle_stage="active", artifact_uri=artifact_uri, run_name=run_name)
    data = RunData(metrics=[Metric(k, v, 1, 0) for k, v in metrics], params=[Param(k, v) for k, v in params],
                   tags=[RunTag(k, v) for k, v in tags])
    inputs = RunInputs([
        DatasetInput(Dataset(name, digest, "local", "src"),
                     [InputTag("note", "eval")] + ([InputTag("mlflow.data.context", c)] if c is not None else []))
        for name, digest, c in datasets
    ])
    return Run(info, data, inputs)


PROBE_RUN = make_run("probe", 1, end_time=2, datasets=[("ds", "d1", "train")])


@st.composite
def runs(draw: st.DrawFn, min_size: int = 0) -> list[Run]:
    count = draw(st.integers(min_size, 5))
    keys, strings = hot_keys, hot_strings
    return [
        make_run(
            f"r{i}{draw(st.sampled_from(['x', 'y']))}",
            draw(st.integers(0, 3)),
            end_time=draw(st.none() | st.integers(1, 3)),
            status=draw(st.sampled_from(STATUSES)),
            run_name=draw(st.none() | st.sampled_from(RUN_NAMES)),
            user_id=draw(st.sampled_from(["", "alice", "Alice"])),
            artifact_uri=draw(st.sampled_from(["", "s3://b/x", "file:///t/a_b"])),
            metrics=draw(st.lists(st.tuples(keys, st.sampled_from(FLOATS)), min_size=1, max_size=4)),
            params=draw(st.lists(st.tuples(keys, strings), min_size=1, max_size=3)),
            tags=draw(st.lists(st.tuples(keys, strings), min_size=1, max_size=3)),
            datasets=draw(st.lists(st.tuples(st.sampled_from(["ds", "DS", "train_ds"]), st.sampled_from(["d1", "abc"]),
                                             st.none() | st.sampled_from(["train", "eval", ""])), max_size=2)),
        )
        for i in range(count)
    ]


@st.composite
def key_refs(draw: st.DrawFn) -> str:
    """A key as a filter writes it: bare where that can work, else backticked or quoted (sometimes wrongly)."""
    key = draw(hot_keys)
    forms = ["`", '"', "'"] + (["", ""] if re.fullmatch(r"[\w.-]+", key) else [])
    return quoted(key, draw(st.sampled_from(forms)))


@st.composite
def string_values(draw: st.DrawFn) -> str:
    pattern = draw(st.sampled_from(["{}", "{}", "{}%", "%{}", "%{}%", "_{}"]))
    return quoted(pattern.format(draw(hot_strings)), draw(st.sampled_from(["'", "'", '"'])))


@st.composite
def run_clauses(draw: st.DrawFn) -> tuple[str, str]:
    """(clause, form): form "cmp" for ``x op v``, else "is" / "in"."""
    kind = draw(st.sampled_from(["metric", "param", "tag", "attribute", "dataset"]))
    if kind == "metric":
        prefix = draw(st.sampled_from(["metrics.", "metric.", "`metrics`."]))
        comparator = mostly(draw, NUMERIC_COMPARATORS, COMPARATORS)
        return f"{prefix}{draw(key_refs())} {comparator} {mostly(draw, NUMBERS, BAD_NUMBERS)}", "cmp"
    if kind in ("param", "tag"):
        prefixes = ["params.", "param.", "parameter.", "parameters."] if kind == "param" else ["tags.", "tag."]
        identifier = draw(st.sampled_from(prefixes)) + draw(key_refs())
        shape = mostly(draw, ["cmp", "cmp", "cmp", "is"], ["in"])
        if shape == "is":
            return f"{identifier} {draw(st.sampled_from(['IS NULL', 'IS NOT NULL', 'is not null', 'is null']))}", "is"
        if shape == "in":
            return f"{identifier} IN ({draw(st.sampled_from(LISTS))})", "in"
        return f"{identifier} {mostly(draw, STRING_COMPARATORS, COMPARATORS)} {draw(string_values())}", "cmp"
    if kind == "dataset":
        identifier = draw(st.sampled_from(["datasets.", "dataset."])) + mostly(
            draw, ["name", "digest", "context", "`name`"], ["foo"])
        value = draw(st.sampled_from(["'ds'", "'DS'", "'d%'", "'train'", "'%a%'", "'abc'", "''", '"eval"']))
        comparators = STRING_COMPARATORS
    else:
        prefix = draw(st.sampled_from(["", "", "attributes.", "attr.", "run.", "attribute."]))
        key = mostly(draw, ["run_id", "run_name", "status", "user_id", "artifact_uri", "start_time", "end_time",
                            "created", "Created", "`run name`", '"Run Name"'], ["lifecycle_stage", "experiment_id"])
        identifier = prefix + key
        if key in ("start_time", "end_time", "created", "Created"):
            value = mostly(draw, ["0", "1", "2", "2.5", "-1", "1e0"], ["'2'", "('1')"])
            comparators = NUMERIC_COMPARATORS
        else:
            value = draw(st.sampled_from(["'r1x'", "'r2y'", "'r%'", "'FINISHED'", "'finished'", "'%ING'", "'alice'",
                                          "'run-1'", "''", "'s3://b/x'", "'%_b'", "1", "('r1x')"]))
            comparators = STRING_COMPARATORS
        if "run_id" not in key and draw(st.integers(0, 3)):
            return f"{identifier} {mostly(draw, comparators, COMPARATORS)} {value}", "cmp"
    shape = mostly(draw, ["cmp", "cmp", "in", "not in"], ["is"])
    if shape == "is":
        return f"{identifier} IS NULL", "is"
    if shape in ("in", "not in"):
        return f"{identifier} {shape.upper()} ({mostly(draw, LISTS, BAD_LISTS)})", "in"
    return f"{identifier} {mostly(draw, comparators, COMPARATORS)} {value}", "cmp"


def joined(draw: st.DrawFn, clauses: Sequence[tuple[str, str]]) -> str:
    """Clauses joined by AND in any case and spacing, or by nothing where sqlparse keeps them apart."""
    text = draw(st.sampled_from(["", "", " ", "AND ", "  and "]))
    for index, (clause, form) in enumerate(clauses):
        if index:
            glue = [" AND ", " and ", "\nAND\t", " AND AND "] + ([" "] if form == "cmp" else [])
            text += draw(st.sampled_from(glue))
        text += clause
    return text + draw(st.sampled_from(["", "", " ", " AND", "\n"]))


@st.composite
def run_filters(draw: st.DrawFn) -> str:
    return joined(draw, draw(st.lists(run_clauses(), min_size=1, max_size=2)))


@st.composite
def mutated(draw: st.DrawFn, filters: st.SearchStrategy[str]) -> str:
    """A generated filter with fragments inserted, characters deleted or replaced at random places."""
    text = draw(filters)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        fragment = draw(st.sampled_from(FRAGMENTS))
        action = draw(st.sampled_from(["insert", "delete", "replace"]))
        if action == "insert":
            text = text[:at] + fragment + text[at:]
        elif action == "delete":
            text = text[:at] + text[at + draw(st.integers(1, 3)):]
        else:
            text = text[:at] + fragment + text[at + len(fragment):]
    return text


def mlflow_selects(runs: list[Run], filter_string: str) -> list[int] | None:
    """The indices of the runs MLflow keeps, or None where it rejects the filter (see the module docstring)."""
    try:
        for clause in SearchUtils.parse_search_filter(filter_string):
            SearchUtils._does_run_match_clause(PROBE_RUN, clause)
        kept = SearchUtils.filter(runs, filter_string)
    except Exception:
        return None
    return [i for i, run in enumerate(runs) if any(run is k for k in kept)]


def agent_selects(runs: list[dict[str, Any]], filter_string: str) -> list[int] | None:
    try:
        run_filter = parse_run_filter(filter_string)
    except SearchFilterError:
        return None
    return [i for i, run in enumerate(runs) if run_filter.matches(run)]


def agent_error(parse: Callable[[str], Any], filter_string: str) -> str | None:
    try:
        parse(filter_string)
    except SearchFilterError as exc:
        return str(exc)
    return None


@SETTINGS
@given(runs(), run_filters())
def test_run_filters_select_what_mlflow_selects(entities: list[Run], filter_string: str) -> None:
    note(f"filter: {filter_string!r}")
    expected = mlflow_selects(entities, filter_string)
    assert agent_selects([loads(run) for run in entities], filter_string) == expected


# Fragments of filters, right and wrong, to mutate filters with: everything MLflow rejects must be rejected,
# and what MLflow accepts must select the same runs or be one of the documented refusals.
FRAGMENTS = [
    " ", " ", "  ", "\n", "\t", "metrics.", "params.", "tags.", "attributes.", "datasets.", "metric.", "parameter.",
    "a", "loss", "x", "1a", "_k", "select", "in", "status", "run_id", "start_time", "created", "name", "context",
    "`a b`", '"a b"', "'a'", "'r1x'", "'FINISHED'", "'%'", "'ds'", "''", '""', "'it''s'", ".", "..", "=", "!=",
    ">", ">=", "<", "==", "LIKE", "ILIKE", "NOT", "IN", "IS", "NULL", "NOT NULL", "AND", "and", "OR", "(", ")",
    ",", "('a')", "('a', 'b')", "()", "1", "-1", "1.5", ".5", "1e3", "0x1", "desc", "ASC", "::", "[", "]", ";",
    "-- c\n", "# c\n", "$", "$$", "/*", "*/", "*", "-", "+", "´a´", "[a]", "@x", "AS", "GO", "NULLS FIRST",
]


@SETTINGS
@given(runs(), mutated(run_filters()))
def test_mutated_run_filters_are_accepted_and_rejected_as_mlflow_does(entities: list[Run], filter_string: str) -> None:
    note(f"filter: {filter_string!r}")
    expected = mlflow_selects(entities, filter_string)
    got = agent_selects([loads(run) for run in entities], filter_string)
    if expected is not None and got is None:
        message = agent_error(parse_run_filter, filter_string)
        assert message is not None and UNSUPPORTED in message, message
    else:
        assert got == expected


# Filters MLflow refuses: each must be refused here too (and the other way round: they are all refused).
MALFORMED = [
    "   ", "\n", "metrics.acc", "metrics.acc >", "> 1", "metrics.acc > 1 OR metrics.b > 2", "metrics.acc > 1;",
    "metrics.a > 1; metrics.b > 2", "(metrics.acc > 1)", "metrics.acc > 1 AND (metrics.b > 2)", "metrics.acc > 'x'",
    "metrics.acc > 0x1F", "metrics.acc > 1E+5", "metrics.acc > 1.e5", "metrics.acc > .5e5", "metrics.acc > - 5",
    "metrics.acc > 1 2", "metrics.acc = = 1", "metrics.acc LIKE 1", "metrics.acc IS NULL", "metrics.acc IN (1)",
    "metrics.in > 1", "metrics.from > 1", "metrics.as > 1", "metrics.1 > 1", "metrics . a > 1", "Metrics.a > 1",
    "`metrics.a` > 1", "\"metrics\".a > 1", "params.p = 1", "params.p = abc", "params.p = NULL", "params.p > 'a'",
    "params.p NOT LIKE 'a'", "params.p RLIKE 'a'", "params.p IN ('a')", "params.p IS NOT  NULL",
    "params.p IS NOT\tNULL", "params.p IS", "params.p NOT IN", "params.p = 'a", "params.p = \"a", "params.p = 'a'.b",
    "params.p = \"a\".b", "params.p = 'a' 'b'", "params.p = \"a\" desc", "parameter.1a = 'a'", "tags.t > 'a'",
    "tags.a-b = 'x'", "tags.'x'.y = 'a'", "tags.*.x = 'a'", "tags.x = 'a' -- c", "tags.x = 'a' /* c */",
    "tags.x = 'a' # c", "tags.x = $$a$$", "tags.$x = 'a'", "tags.x$y = 'a'", "tags.x = 'a' &&", "tags.x = 'a' OR",
    "lifecycle_stage = 'active'", "experiment_id = '0'", "run name = 'x'", "'run_id' = 'x'", "run_id IS NULL",
    "run_id > 'a'", "run_id IN 'a'", "run_id IN ()", "run_id IN (1, 2)", "run_id IN (\"a\".\"b\")",
    "run_id IN ('a' + 'b')", "run_id IN ['a']", "run_id NOTIN ('a')", "run_id IN ('a') run_id IN ('b')",
    "run_id IN ('a') tags.t IS NULL", "run_id LIKE ('a')", "status IN ('FINISHED')", "run_name IN ('a')",
    "start_time > '1'", "start_time IN (1)", "start_time LIKE 1", "created != 'x'", "end_time IS NULL",
    "datasets.foo = 'a'", "datasets.name > 'a'", "datasets.name IS NULL", "datasets.context = 1",
    "datasets.digest LIKE ('a')", "AND OR", "metrics.acc>1AND metrics.b>2", "tags.x = 'a' GO",
]


@pytest.mark.parametrize("filter_string", MALFORMED)
def test_filters_mlflow_rejects_are_rejected(filter_string: str) -> None:
    assert mlflow_selects([PROBE_RUN], filter_string) is None
    assert agent_error(parse_run_filter, filter_string) is not None


# Accepted by MLflow only because sqlparse groups the tokens into one identifier: refused, as documented.
REFUSED = {
    "tags.x::int = 'a'": "x::int",
    "tags.x(1) = 'a'": "x(1)",
    "tags.x ('a') = 'b'": "x ('a')",
    "tags.x[0] = 'a'": "x[0]",
    "tags. x = 'a'": " x",
    "metrics.x . y > 1": "x . y",
    "tags.a tags.b IS NULL": "a tags.b",
    "params.p = 'a' tags.t IS NULL": "p = 'a' tags.t",
    "tags.t AS u IS NULL": "t AS u",
    "params.p = \"a\"::\"b\"": "p",
}


@pytest.mark.parametrize(("filter_string", "mlflow_key"), REFUSED.items())
def test_identifier_accidents_are_refused(filter_string: str, mlflow_key: str) -> None:
    assert mlflow_selects([PROBE_RUN], filter_string) is not None
    assert SearchUtils.parse_search_filter(filter_string)[-1]["key"] == mlflow_key
    message = agent_error(parse_run_filter, filter_string)
    assert message is not None and UNSUPPORTED in message


# Accepted by both, with MLflow's reading of quotes, dots and keywords (a regression net for the parser).
ACCEPTED = [
    "metrics.select > 1", "metrics.like > 1", "metrics.1a > 1", "metrics._a > 1", "metrics.a.b > 1",
    "metrics.`a.b` > 1", "metrics.'a b' > 1", "metrics. > 1", "metrics..x > 1", "metrics.x. > 1",
    "metrics.x .y > 1", "tags.mlflow.runName = 'x'", "tags.\"x\".y = 'a'", "tags.`x`.y = 'a'", "tags.* = 'a'",
    "tags.x.* = 'a'", "tags.[a b] = 'a'", "tags.´a b´ = 'a'", "tags.@ab = 'a'", "tags. \"x\" = 'a'",
    "tags. _x = 'a'", "tags._x$y = 'a'", "tags.x desc = 'a'", "tags.x asc nulls first = 'a'", "`tags`.`x` = 'a'",
    "params.p = 'it''s'", "params.p = 'a\\'b'", "params.p = \"a\".\"b\"", "params.p like 'a%'", "params.p IS\nNULL",
    "tags.x IS NULL tags.y IS NULL", "tags.y IS NULL metrics.x > 1", "tags.x IS NOT NULL run_id IN ('a')",
    "run_id IN ('a') tags.y = 'b'", "metrics.x > 1 metrics.y < 2", "AND", " AND ", "and and", "AND metrics.x > 1",
    "metrics.x > 1 AND", "run_id IN('a')", "run_id not in ('a',)", "run_id IN (('a'), 'b')", "run_id IN ('a' 'b')",
    "run_id IN (\"a\\n\")", "run_id IN ('a' # c\n)", "run_id = ('a', 'b')", "run_id != ('a',)", "attr.status = 'x'",
    "run.status = 'x'", "`attributes`.`status` = 'x'", "attributes.'run name' = 'x'", "\"Run Name\" = 'x'",
    "Created > 1", "start_time > 1.5", "metrics.x > 1e400", "metrics.x >= -1.5E-3", "metrics.x > 5.",
    "datasets.name = ('ds', 'DS')", "datasets.context NOT IN ('train')", "tags.created = 'x'",
    "metrics.x > ٣", "tags.x = 'a'\tAND\ntags.y = 'b'", "  tags.x = 'a'  ",
]


@pytest.mark.parametrize("filter_string", ACCEPTED)
def test_filters_mlflow_accepts_are_accepted_alike(filter_string: str) -> None:
    entities = [make_run("r1x", metrics=[("x", 2.0), ("", 3.0)], tags=[("x", "a"), ("mlflow.runName", "x")]),
                make_run("r2y", run_name="x", params=[("p", "it''s")], datasets=[("ds", "d1", "train")]), PROBE_RUN]
    expected = mlflow_selects(entities, filter_string)
    assert expected is not None
    assert agent_selects([loads(run) for run in entities], filter_string) == expected


def test_parser_limits_are_sqlparse_limits() -> None:
    def nested(depth: int, inner: str = "'r1x'") -> str:
        return "(" * depth + inner + ")" * depth

    cases = [
        "run_id IN " + nested(100), "run_id IN " + nested(101), "run_id IN " + nested(100, "'r1x' # c\n"),
        "run_id IN " + nested(99, "'r1x' # c\n"), "run_id IN " + nested(100, '"r1x"'), "run_id = " + nested(99),
        "run_id = " + nested(100), "tags.x = 'a'" + " " * 9993, "tags.x = 'a'" + " " * 9994,
    ]
    entities = [make_run("r1x")]
    for filter_string in cases:
        expected = mlflow_selects(entities, filter_string)
        assert agent_selects([loads(run) for run in entities], filter_string) == expected, filter_string[:40]
    assert [mlflow_selects(entities, f) is None for f in cases] == [False, True, True, False, True, False, True,
                                                                     False, True]


def test_run_semantics_worth_knowing() -> None:
    """A few of MLflow's answers, spelled out."""
    nan_run = make_run("n", 1, metrics=[("m", math.nan)], params=[("p", "x\n")], tags=[("start_time", "t")])
    inf_run = make_run("i", 2, metrics=[("m", math.inf)], run_name=None, tags=[("run_name", "t")])
    entities = [nan_run, inf_run]
    docs = [loads(run) for run in entities]

    def both(filter_string: str) -> list[int] | None:
        expected = mlflow_selects(entities, filter_string)
        assert agent_selects(docs, filter_string) == expected
        return expected

    assert both("metrics.m != 1") == [0, 1]  # NaN differs from everything
    assert both("metrics.m > 1e308") == [1]
    assert both("metrics.m = 1e400") == [1]  # 1e400 is read as infinity
    assert both("params.p LIKE 'x'") == [0]  # "$" matches before a final newline
    assert both("params.p LIKE 'x_'") == []  # "_" does not match a newline
    assert both("params.p LIKE ''") == []  # anchored at both ends
    assert both("params.p ILIKE 'X%'") == [0]
    assert both("tags.created = 't'") == [0]  # the key is renamed start_time, for tags too
    assert both("tags.`Run Name` = 't'") == [1]
    assert both("run_name != 'x'") == [0]  # a run without a name matches no comparison
    assert both("params.p IS NULL") == [1]


# ---------------------------------------------------------------------------------------------------------
# Sorting runs.

@st.composite
def run_order_bys(draw: st.DrawFn) -> list[str]:
    def clause() -> str:
        entity = mostly(draw, ["metrics.", "metric.", "params.", "tags.", "", "attributes.", "run.", "`metrics`."],
                        ["datasets."])
        if entity in ("", "attributes.", "run."):
            key = mostly(draw, ["start_time", "end_time", "created", "Created", "run_id", "run_name", "status",
                                "user_id", "artifact_uri"], ["`run name`", "lifecycle_stage"])
        elif entity == "datasets.":
            key = "name"
        else:
            key = draw(key_refs())
        direction = mostly(draw, ["", "", " ASC", " DESC", " desc", " Asc", "\tDESC", "  DESC"],
                           [" DESC NULLS LAST", " DESC DESC", " up", " "])
        return entity + key + direction

    return [clause() for _ in range(draw(st.integers(0, 3)))]


def mlflow_sorts(entities: list[Run], order_by: list[str]) -> list[int] | None:
    try:
        ordered = SearchUtils.sort(entities, order_by)
    except Exception:
        return None
    return [next(i for i, run in enumerate(entities) if run is r) for r in ordered]


def agent_sorts(docs: list[dict[str, Any]], order_by: list[str]) -> list[int] | None:
    try:
        ordered = sort_runs(docs, order_by)
    except SearchFilterError:
        return None
    return [next(i for i, doc in enumerate(docs) if doc is d) for d in ordered]


@SETTINGS
@given(runs(min_size=1), run_order_bys())
def test_runs_sort_as_mlflow_sorts_them(entities: list[Run], order_by: list[str]) -> None:
    note(f"order_by: {order_by!r}")
    expected = mlflow_sorts(entities, order_by)
    assert agent_sorts([loads(run) for run in entities], order_by) == expected


ORDER_BY_EDGES = [
    "metrics.`a b` DESC", "metrics.\"a b\" DESC", "metrics.'a b' DESC", "`metrics`.x", "\"metrics\".x",
    "metrics.`x`desc", "metrics.\"a\\\"b\"", "metrics.`a'b`", "metrics.`a\"b`", "metrics.x\nDESC", "metrics.",
    "metrics. x", "metrics..x", "metrics.1a", "metrics.1", "metrics.in", "metrics.*", "tags.'a''b'", "tags.`a``b`",
    " metrics.x", "metrics.x ", "", "   ", "metrics.x;", "metrics.x, metrics.y", "timestamp", "timestamp DESC",
    "`run name`", "run name", "metrics.x foo", "metrics.a\\ b", "metrics.x\\", "datasets.name", "metrics.x DESC DESC",
    "metrics.x DESC NULLS LAST", "metrics.x asc nulls first", "start_time desc", "attributes.`run_id` DESC",
]


@pytest.mark.parametrize("clause", ORDER_BY_EDGES)
def test_order_by_edges_as_mlflow(clause: str) -> None:
    entities = [make_run("r1x", 1, metrics=[("a b", 1.0), ("x", 2.0), ("", 1.0)]), make_run("r2y", 1)]
    expected = mlflow_sorts(entities, [clause])
    assert agent_sorts([loads(run) for run in entities], [clause]) == expected


def test_order_by_refusals() -> None:
    for clause in ("metrics.x \"desc\"", "metrics.x::int", "metrics.x[0]", "metrics.x(1)"):
        assert mlflow_sorts([make_run("r")], [clause]) is not None
        with pytest.raises(SearchFilterError, match=UNSUPPORTED):
            sort_runs([loads(make_run("r"))], [clause])


def from_json(doc: dict[str, Any]) -> Run:
    message = ProtoRun()
    parse_dict(doc, message)
    return Run.from_proto(message)


HAND_BUILT_RUNS: list[dict[str, Any]] = [
    {"info": {"run_id": "b", "run_name": "b", "start_time": "7"}},
    {"info": {"run_id": "e", "run_name": "e", "start_time": 7, "end_time": 0, "status": "KILLED"},
     "data": {"params": [{"key": "p", "value": "1"}, {"key": "p", "value": "2"}],
              "tags": [{"key": "t", "value": "x"}, {"key": "t", "value": "y"}],
              "metrics": [{"key": "m", "value": 1, "timestamp": "1", "step": "0"}, {"key": "m", "value": "NaN"}]}},
    {"info": {"run_id": "h", "run_name": "h", "start_time": 2**53 + 1}},
    {"info": {"run_id": "d", "run_name": "", "user_id": "u", "end_time": "3", "artifact_uri": "s3://x"},
     "data": {"metrics": [{"key": "m", "value": "-Infinity"}]},
     "inputs": {"dataset_inputs": [{"dataset": {"name": "ds"}, "tags": [{"key": "note", "value": "train"}]},
                                   {"dataset": {"digest": "d1"}}]}},
]
HAND_BUILT_FILTERS = [
    "end_time < 5", "end_time > 1", "start_time = 7", "start_time = 0", "params.p = '2'", "params.p = '1'",
    "tags.t = 'y'", "metrics.m = 1", "metrics.m != 1", "metrics.m < 0", "status = 'RUNNING'", "status = 'KILLED'",
    "artifact_uri = ''", "user_id = ''", "run_name = ''", "datasets.context = 'train'", "datasets.digest = ''",
    "datasets.name = ''", "datasets.name != 'ds'", "params.p IS NULL", "start_time = 9007199254740993",
    "start_time > 9007199254740992",
]


@pytest.mark.parametrize("filter_string", HAND_BUILT_FILTERS)
def test_hand_built_json_reads_as_mlflow_reads_it(filter_string: str) -> None:
    """JSON the agent builds may leave fields out, repeat keys, or carry int64 numbers as strings: MLflow's own
    ``Run.from_proto`` (what a client makes of the JSON) is the reference."""
    entities = [from_json(doc) for doc in HAND_BUILT_RUNS]
    assert agent_selects(HAND_BUILT_RUNS, filter_string) == mlflow_selects(entities, filter_string)


def test_hand_built_json_sorts_as_mlflow_sorts_it() -> None:
    entities = [from_json(doc) for doc in HAND_BUILT_RUNS]
    for order_by in ([], ["end_time"], ["metrics.m DESC"], ["params.p", "run_id DESC"], ["tags.t"]):
        assert agent_sorts(HAND_BUILT_RUNS, order_by) == mlflow_sorts(entities, order_by)


def test_missing_fields_and_strings_for_numbers() -> None:
    """Repeated fields may be absent (proto2 JSON) and int64 fields may be strings."""
    bare = {"info": {"run_id": "b", "start_time": "7"}}
    full = loads(make_run("f", 3, metrics=[("m", 1.0)], params=[("p", "v")]))
    assert parse_run_filter("params.p IS NULL").matches(bare)
    assert not parse_run_filter("metrics.m > 0").matches(bare)
    assert parse_run_filter("start_time > 6 AND status = 'RUNNING' AND run_name != 'x'").matches(bare) is False
    assert parse_run_filter("start_time > 6 AND status = 'RUNNING' AND artifact_uri = ''").matches(bare)
    assert not parse_run_filter("end_time > 0").matches(bare)
    assert parse_run_filter(None).matches(bare) and parse_run_filter("").matches(bare)
    assert sort_runs([full, bare], None) == [bare, full]
    assert sort_runs([bare, full], ["metrics.m DESC"]) == [full, bare]


# ---------------------------------------------------------------------------------------------------------
# Logged models.

MODEL_KEYS = ["acc", "a b", "created", "p"]
MODEL_STATUSES = [LoggedModelStatus.PENDING, LoggedModelStatus.READY, LoggedModelStatus.FAILED,
                  LoggedModelStatus.UNSPECIFIED]
DATASET_PAIRS = [(None, None), ("ds", "d1"), ("ds", "d2"), ("eval", "e1")]


def make_model(
    model_id: str, *, name: str = "model", model_type: str | None = "agent", source_run_id: str | None = "r1",
    status: LoggedModelStatus = LoggedModelStatus.READY, created: int = 1, updated: int = 1,
    tags: Mapping[str, str] | None = None, params: Mapping[str, str] | None = None,
    metrics: Sequence[tuple[str, float, int, str | None, str | None]] = (),
) -> LoggedModel:
    return LoggedModel(
        experiment_id="0", model_id=model_id, name=name, artifact_location="a", creation_timestamp=created,
        last_updated_timestamp=updated, model_type=model_type, source_run_id=source_run_id, status=status,
        tags=dict(tags or {}), params=dict(params or {}),
        metrics=[Metric(k, v, ts, 0, model_id=model_id, dataset_name=dn, dataset_digest=dd)
                 for k, v, ts, dn, dd in metrics],
    )


PROBE_MODEL = make_model("m-probe", tags={"t": "v"}, params={"p": "v"}, metrics=[("acc", 1.0, 1, "ds", "d1")])


@st.composite
def models(draw: st.DrawFn, min_size: int = 0) -> list[LoggedModel]:
    keys, strings = st.sampled_from(MODEL_KEYS), st.sampled_from(STRINGS)
    result = []
    for i in range(draw(st.integers(min_size, 5))):
        metrics = [(k, v, ts, *pair) for k, v, ts, pair in draw(st.lists(
            st.tuples(keys, st.sampled_from(FLOATS), st.integers(0, 2), st.sampled_from(DATASET_PAIRS)), max_size=4))]
        result.append(make_model(
            f"m-{draw(st.sampled_from(['b', 'a']))}{i}",  # model_id order is not the list order
            name=draw(st.sampled_from(["model", "Model", "m_1", "big model"])),
            model_type=draw(st.none() | st.sampled_from(["agent", "", "llm"])),
            source_run_id=draw(st.none() | st.sampled_from(["r1", "r2"])),
            status=draw(st.sampled_from(MODEL_STATUSES)),
            created=draw(st.integers(0, 3)), updated=draw(st.integers(0, 3)),
            tags=draw(st.dictionaries(keys, strings, max_size=2)),
            params=draw(st.dictionaries(keys, strings, max_size=2)),
            metrics=metrics,
        ))
    return result


@st.composite
def model_clauses(draw: st.DrawFn) -> tuple[str, str]:
    kind = draw(st.sampled_from(["metric", "param", "tag", "attribute", "dataset"]))
    key = quoted(draw(st.sampled_from(MODEL_KEYS)), draw(st.sampled_from(["", "`", '"'])))
    if kind == "metric":
        prefix = draw(st.sampled_from(["metrics.", "metric."]))
        comparator = mostly(draw, NUMERIC_COMPARATORS, COMPARATORS)
        return f"{prefix}{key} {comparator} {mostly(draw, NUMBERS, BAD_NUMBERS)}", "cmp"
    if kind in ("param", "tag"):
        identifier = draw(st.sampled_from(["params.", "param."] if kind == "param" else ["tags.", "tag."])) + key
        if not draw(st.integers(0, 9)):
            return f"{identifier} IS NULL", "is"
        return f"{identifier} {mostly(draw, STRING_COMPARATORS, COMPARATORS)} {draw(string_values())}", "cmp"
    numeric = False
    if kind == "dataset":
        identifier = "datasets." + mostly(draw, ["name"], ["digest", "context"])
    else:
        key = mostly(draw, ["name", "model_id", "model_type", "status", "source_run_id", "creation_timestamp",
                            "last_updated_timestamp"], ["run_id"])
        identifier = draw(st.sampled_from(["", "attributes.", "attr."])) + key
        numeric = key.endswith("timestamp")
    if numeric:
        value = mostly(draw, ["0", "1", "2", "1.5"], ["'1'"])
        return f"{identifier} {mostly(draw, NUMERIC_COMPARATORS, COMPARATORS)} {value}", "cmp"
    shape = draw(st.sampled_from(["cmp", "cmp", "cmp", "in", "not in"]))
    if shape != "cmp":
        items = mostly(draw, [*LISTS, "'READY', 'model'", "'agent'", "'m-a1', 'm-b2'"], BAD_LISTS)
        return f"{identifier} {shape.upper()} ({items})", "in"
    value = draw(st.sampled_from(["'model'", "'Model'", "'%odel'", "'READY'", "'ready'", "'PEND%'", "'agent'", "''",
                                  "'r1'", "'m-a1'", "'m'", "('model', 'm_1')", '"llm"']))
    comparator = mostly(draw, [*STRING_COMPARATORS, *NUMERIC_COMPARATORS, "IN"], COMPARATORS)
    return f"{identifier} {comparator} {value}", "cmp"


@st.composite
def model_filters(draw: st.DrawFn) -> str | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    return joined(draw, draw(st.lists(model_clauses(), min_size=1, max_size=2)))


@st.composite
def dataset_filters(draw: st.DrawFn) -> list[dict[str, Any]] | None:
    if draw(st.booleans()):
        return None
    entries = []
    pairs = [("ds", None), ("ds", "d1"), ("ds", "d2"), ("eval", None), ("none", None), ("", None), ("ds", "")]
    for name, digest in draw(st.lists(st.sampled_from(pairs), min_size=1, max_size=2)):
        entries.append({"dataset_name": name} | ({} if digest is None else {"dataset_digest": digest}))
    return entries


def mlflow_selects_models(
    entities: list[LoggedModel], filter_string: str | None, datasets: list[dict[str, Any]] | None
) -> list[int] | None:
    try:
        if datasets and not all(d.get("dataset_name") for d in datasets):
            return None  # checked by both stores before they filter
        for clause in SearchLoggedModelsUtils.parse_search_filter(filter_string):
            SearchLoggedModelsUtils._does_logged_model_match_clause(PROBE_MODEL, clause, datasets)
        kept = SearchLoggedModelsUtils.filter_logged_models(entities, filter_string, datasets)
    except Exception:
        return None
    return [i for i, model in enumerate(entities) if any(model is k for k in kept)]


def agent_selects_models(
    docs: list[dict[str, Any]], filter_string: str | None, datasets: list[dict[str, Any]] | None
) -> list[int] | None:
    try:
        model_filter = parse_model_filter(filter_string, datasets)
    except SearchFilterError:
        return None
    return [i for i, doc in enumerate(docs) if model_filter.matches(doc)]


@SETTINGS
@given(models(), model_filters(), dataset_filters())
def test_model_filters_select_what_mlflow_selects(
    entities: list[LoggedModel], filter_string: str | None, datasets: list[dict[str, Any]] | None
) -> None:
    note(f"filter: {filter_string!r}, datasets: {datasets!r}")
    expected = mlflow_selects_models(entities, filter_string, datasets)
    assert agent_selects_models([loads(m) for m in entities], filter_string, datasets) == expected


def test_model_filter_semantics_worth_knowing() -> None:
    first_low = make_model("m-1", name="x", metrics=[("acc", 0.1, 2, None, None), ("acc", 0.9, 1, None, None)])
    on_ds = make_model("m-2", name="y", metrics=[("acc", 0.9, 1, "ds", "d1")])
    entities = [first_low, on_ds]
    docs = [loads(m) for m in entities]

    def both(filter_string: str | None, datasets: list[dict[str, Any]] | None = None) -> list[int] | None:
        expected = mlflow_selects_models(entities, filter_string, datasets)
        assert agent_selects_models(docs, filter_string, datasets) == expected
        return expected

    assert both("metrics.acc > 0.5") == [1]  # the first logged value, not the latest or the best
    assert both(None, [{"dataset_name": "ds"}]) == [1]
    assert both("metrics.acc > 0", [{"dataset_name": "ds", "dataset_digest": "d2"}]) == []
    assert both("datasets.name = 'y'") == [1]  # datasets.name is the model's name here
    assert both("name > 'x'") == [1]  # string attributes take any comparator
    assert both("status IN ('READY')") == [0, 1]
    # MLflow fails with AttributeError on creation_time; the agent reads it as the SQL store does.
    assert parse_model_filter("creation_time > 0").matches(docs[0])
    assert [parse_model_filter("creation_timestamp > 0").matches(d) for d in docs] == [True, True]
    for refused in ("last_updated_time > 0", "datasets.digest = 'd1'", "tags.t IS NULL", "name == 'x'"):
        assert mlflow_selects_models(entities, refused, None) is None
        assert agent_error(parse_model_filter, refused) is not None
    with pytest.raises(SearchFilterError, match="dataset_name"):
        parse_model_filter(None, [{"dataset_digest": "d1"}])


# ---------------------------------------------------------------------------------------------------------
# Sorting logged models.

@st.composite
def model_order_bys(draw: st.DrawFn) -> list[dict[str, Any]] | None:
    if draw(st.integers(0, 9)) == 0:
        return None
    entries = []
    for _ in range(draw(st.integers(0, 3))):
        entry: dict[str, Any] = {"field_name": mostly(draw, [
            "name", "model_id", "status", "creation_timestamp", "creation_time", "last_updated_timestamp",
            "metrics.acc", "metrics.a b", "metrics.", " name ", "model_type", "source_run_id"], ["params.p", "bogus"])}
        ascending = draw(st.sampled_from([True, False, None, 1, 0, "yes"] if not draw(st.integers(0, 4))
                                         else [True, False, None]))
        if ascending is not None:
            entry["ascending"] = ascending
        name, digest = draw(st.sampled_from([(None, None), (None, None), ("ds", None), ("ds", "d1"), (None, "d1")]))
        if name is not None:
            entry["dataset_name"] = name
        if digest is not None:
            entry["dataset_digest"] = digest
        entries.append(entry)
    return entries


@SETTINGS
@given(models(min_size=1), model_order_bys())
def test_models_sort_as_mlflow_sorts_them(entities: list[LoggedModel], order_by: list[dict[str, Any]] | None) -> None:
    note(f"order_by: {order_by!r}")
    docs = [loads(m) for m in entities]
    try:
        ordered = SearchLoggedModelsUtils.sort(entities, order_by)
        expected: list[int] | None = [next(i for i, m in enumerate(entities) if m is o) for o in ordered]
    except TypeError:
        # Ascending by model_type or source_run_id with None next to a string: MLflow compares them and fails;
        # the agent sorts null last (the module's documented choice).
        assert any(o.get("field_name") in ("model_type", "source_run_id") and o.get("ascending", True)
                   for o in order_by or ())
        result = sort_models(docs, order_by)
        assert sorted(map(id, result)) == sorted(map(id, docs))
        return
    except Exception:
        expected = None
    try:
        got: list[int] | None = [next(i for i, d in enumerate(docs) if d is o) for o in sort_models(docs, order_by)]
    except SearchFilterError:
        got = None
    assert got == expected


def test_model_sort_by_a_metric_on_a_dataset() -> None:
    """The latest value (highest timestamp) of the metric among those logged on the named dataset."""
    entities = [
        make_model("m-1", metrics=[("acc", 0.9, 2, "eval", "e1"), ("acc", 0.1, 1, "ds", "d1")]),
        make_model("m-2", metrics=[("acc", 0.5, 1, "ds", "d2"), ("acc", 0.2, 3, "ds", "d1")]),
        make_model("m-3", metrics=[("loss", 0.5, 1, "ds", "d1")]),
    ]
    docs = [loads(m) for m in entities]
    for order_by in ([{"field_name": "metrics.acc"}], [{"field_name": "metrics.acc", "dataset_name": "ds"}],
                     [{"field_name": "metrics.acc", "dataset_name": "ds", "dataset_digest": "d2", "ascending": False}],
                     [{"field_name": "metrics.acc", "dataset_name": "eval", "ascending": False}]):
        expected = [m.model_id for m in SearchLoggedModelsUtils.sort(entities, order_by)]
        assert [d["info"]["model_id"] for d in sort_models(docs, order_by)] == expected
    on_ds = SearchLoggedModelsUtils.sort(entities, [{"field_name": "metrics.acc", "dataset_name": "ds"}])
    assert [m.model_id for m in on_ds] == ["m-1", "m-2", "m-3"]  # m-1's 0.1 is latest on ds, m-2's 0.2


def test_model_sort_nulls_and_refusals() -> None:
    typed, untyped = loads(make_model("m-1", model_type="llm")), loads(make_model("m-2", model_type=None))
    assert sort_models([untyped, typed], [{"field_name": "model_type"}]) == [typed, untyped]
    assert sort_models([untyped, typed], [{"field_name": "model_type", "ascending": False}]) == [typed, untyped]
    with pytest.raises(SearchFilterError, match=UNSUPPORTED):
        sort_models([typed], [{"field_name": "last_updated_time"}])
    for bad in ({"field_name": "metric.acc"}, {"field_name": None}, {"ascending": True}, ["name"],
                {"field_name": "name", "ascending": "no"}, {"field_name": "metrics.acc", "dataset_digest": "d"}):
        with pytest.raises(SearchFilterError):
            sort_models([typed], [bad])  # type: ignore[list-item]
