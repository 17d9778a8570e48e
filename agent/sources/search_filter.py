"""MLflow search filters and order_by clauses, evaluated in memory on runs and logged models in REST JSON.

The agent answers ``runs/search`` and ``logged-models/search`` for entities it holds but has not uploaded,
so it must select and order them as MLflow 3.17.2 does. The reference is MLflow's in-memory path (what the
FileStore and MLflow's own tests use): ``SearchUtils.filter`` / ``sort`` and ``SearchLoggedModelsUtils
.filter_logged_models`` / ``sort`` in ``mlflow/utils/search_utils.py``. MLflow tokenises filters with sqlparse;
the lexer here is sqlparse 0.6's own rule list (same regular expressions, same order), and the grouping is
that of the token shapes a filter MLflow accepts can contain. Pure functions; errors are ``SearchFilterError``.

Accepted, as MLflow accepts them: clauses joined by ``AND`` (any case; repeated, leading, trailing or, between
two clauses where sqlparse keeps them apart, left out); ``metric(s).``, ``param(s).``/``parameter(s).``,
``tag(s).``, ``attribute(s).``/``attr.``/``run.`` and ``dataset(s).`` prefixes, optionally backticked; keys bare,
backticked, double- or single-quoted, dotted (``tags.mlflow.runName``); ``=``, ``!=``, ``<``, ``<=``, ``>``,
``>=``, ``LIKE``, ``ILIKE``, ``IN (...)``, ``NOT IN (...)``, ``IS [NOT] NULL``, each only where MLflow allows
it; the run attributes run_id, run_name ("run name", "Run Name", ...), status, user_id, artifact_uri,
start_time (created), end_time, and the dataset keys name, digest, context. Lists are read with
``ast.literal_eval`` as MLflow reads them. Quirks kept: quotes are trimmed, never unescaped (``'it''s'`` is
``it''s``); tag, param and metric keys named created or "run name" are renamed start_time / run_name, as
``translate_key_alias`` renames every key; ``run_id = ('a', 'b')`` never matches and ``!=`` always does.

Deliberate differences (all ``SearchFilterError``):

* Comparators are checked when the filter is parsed. ``SearchUtils`` checks a clause only when it evaluates
  it, so ``datasets.name > 'a'`` passes when no run reaches that clause; the SQL store (what an upstream
  server runs) checks every clause first, as here.
* Refused with "... is not supported for runs (logged models) the agent holds locally": shapes MLflow accepts
  only because sqlparse groups tokens into one identifier: a key followed by ``(...)``, ``[...]``, ``::``,
  ``AS`` or another identifier; a clause followed, without ``AND``, by an ``IS``/``IN`` clause (sqlparse merges
  the two: ``tags.a = 'x' tags.b IS NULL`` tests the tag "a = 'x' tags.b"); a bare word after a dot and
  whitespace (``tags. x``: whether sqlparse keeps it needs its 800-word keyword table).
* Where MLflow fails with an exception other than MlflowException (a 500 from a server): shlex errors in
  order_by, lists ``ast.literal_eval`` cannot read, LIKE against a list, unknown comparators and the
  attributes ``creation_time`` (filters) / ``last_updated_time`` of logged models, which ``getattr`` does not
  find. ``creation_time`` in a logged-model filter is read as ``creation_timestamp``, as the SQL store does and
  as ``SearchLoggedModelsUtils`` already does in order_by.
* Sorting logged models ascending by model_type or source_run_id, which may be null: MLflow compares None
  with a string and raises TypeError; here null sorts last, as it does for a descending sort.

Absent JSON fields read as MLflow's entity had them before ``to_proto`` left them out: run_name, end_time
(also 0), model_type and source_run_id are null; other strings are "", numbers 0, a run's status RUNNING and a
model's UNSPECIFIED. The SQL store differs elsewhere, and this module follows ``SearchUtils``: it compares
metrics and orders NULLs in SQL, ignores the key aliases for tags and params, and parses logged-model filters
with its own parser (``search_logged_model_utils``: only ``metrics.``/``params.``/``tags.``/``attributes.``,
and a metric clause matches any logged value, not the first).
"""

from __future__ import annotations

import ast
import math
import operator
import re
import shlex
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

__all__ = [
    "ModelFilter",
    "RunFilter",
    "SearchFilterError",
    "parse_model_filter",
    "parse_run_filter",
    "sort_models",
    "sort_runs",
]


class SearchFilterError(ValueError):
    """A filter or order_by MLflow would refuse (the agent answers 400 INVALID_PARAMETER_VALUE with str(exc))."""


# ---------------------------------------------------------------------------------------------------------
# Lexer: sqlparse 0.6.1's SQL_REGEX, in order, each rule mapped to the one token kind the parser needs.

_WS: Final = "ws"
_COMMENT: Final = "comment"
_NAME: Final = "name"  # backticked, bracketed, @name, builtin type, or a word sqlparse cannot take as keyword
_WORD: Final = "word"  # a word whose kind sqlparse decides with its keyword table (here: a name)
_SYMBOL: Final = "symbol"  # "double quoted"
_STRING: Final = "string"  # 'single quoted'
_INT: Final = "int"
_FLOAT: Final = "float"
_HEX: Final = "hex"
_KEYWORD: Final = "keyword"
_ORDER: Final = "order"  # ASC, DESC
_CMP: Final = "cmp"
_PUNCT: Final = "punct"
_WILDCARD: Final = "wildcard"
_TYPECAST: Final = "typecast"
_OTHER: Final = "other"
_PAREN: Final = "paren"  # a balanced (...) group, made after lexing
_IDENT: Final = "ident"  # an identifier used as a value

_RULES: Final = tuple(
    (re.compile(pattern, re.IGNORECASE | re.UNICODE).match, kind)
    for pattern, kind in (
        (r"(--|# )\+.*?(\r\n|\r|\n|$)", _COMMENT),
        (r"(--|# ).*?(\r\n|\r|\n|$)", _COMMENT),
        (r"(\r\n|\r|\n)", _WS),
        (r"\s+?", _WS),
        (r":=", _OTHER),
        (r"::", _TYPECAST),
        (r"\*", _WILDCARD),
        (r"`(``|[^`])*`", _NAME),
        (r"´(´´|[^´])*´", _NAME),
        (r"\?", _OTHER),
        (r"%(\(\w+\))?s", _OTHER),
        (r"(?<!\w)[$:?]\w+", _OTHER),
        (r"\\\w+", _OTHER),
        (r"(CASE|IN|VALUES|USING|FROM|AS)\b", _KEYWORD),
        (r"(@|##|#)[A-ZÀ-Ü]\w+", _NAME),
        (r"[A-ZÀ-Ü]\w*(?=\s*\.(?!\d))", _NAME),
        (r"(?<=\.)[A-ZÀ-Ü]\w*", _NAME),
        (r"[A-ZÀ-Ü]\w*(?=\()", _NAME),
        (r"-?0x[\dA-F]+", _HEX),
        (r"-?\d+(\.\d+)?E-?\d+", _FLOAT),
        (r"(?![_A-ZÀ-Ü])-?(\d+(\.\d*)|\.\d+)(?![_A-ZÀ-Ü])", _FLOAT),
        (r"(?![_A-ZÀ-Ü])-?\d+(?![_A-ZÀ-Ü])", _INT),
        (r"'(''|\\'|[^'])*'", _STRING),
        (r'"(""|\\"|[^"])*"', _SYMBOL),
        (r'(""|".*?[^\\]")', _SYMBOL),
        (r"(?<![\w\])])(\[[^\]\[]+\])", _NAME),
        (r"((LEFT\s+|RIGHT\s+|FULL\s+)?(INNER\s+|OUTER\s+|STRAIGHT\s+)?|(CROSS\s+|NATURAL\s+)?)?JOIN\b", _KEYWORD),
        (r"END(\s+IF|\s+LOOP|\s+WHILE|\s+FOR|\s+CASE)?\b", _KEYWORD),
        (r"IF\s+(NOT\s+)?EXISTS\b", _KEYWORD),
        (r"NOT\s+NULL\b", _KEYWORD),
        (r"(ASC|DESC)(\s+NULLS\s+(FIRST|LAST))?\b", _ORDER),
        (r"(ASC|DESC)\b", _ORDER),
        (r"NULLS\s+(FIRST|LAST)\b", _ORDER),
        (r"UNION\s+ALL\b", _KEYWORD),
        (r"CREATE(\s+OR\s+REPLACE)?\b", _KEYWORD),
        (r"DOUBLE\s+PRECISION\b", _NAME),
        (r"GROUP\s+BY\b", _KEYWORD),
        (r"ORDER\s+BY\b", _KEYWORD),
        (r"PRIMARY\s+KEY\b", _KEYWORD),
        (r"HANDLER\s+FOR\b", _KEYWORD),
        (r"GO(\s\d+)\b", _KEYWORD),
        (r"(LATERAL\s+VIEW\s+)(EXPLODE|INLINE|PARSE_URL_TUPLE|POSEXPLODE|STACK)\b", _KEYWORD),
        (r"(AT|WITH')\s+TIME\s+ZONE\s+'[^']+'", _TYPECAST),
        (r"(NOT\s+)?(LIKE|ILIKE|RLIKE)\b", _CMP),
        (r"(NOT\s+)?(REGEXP)(\s+(BINARY))?\b", _CMP),
        (r"\w[$#\w]*", _WORD),
        (r"[;:()\[\],\.]", _PUNCT),
        (r"(\->>?|#>>?|@>|<@|\?\|?|\?&|\-|#\-)", _OTHER),
        (r"[<>=~!]+", _CMP),
        (r"[+/@#%^&|^-]+", _OTHER),
    )
)

# The words of sqlparse's keyword table a filter MLflow accepts can meet where the table decides: every other
# word is a name in those places (no keyword starts with a digit or "_", the entity and attribute names are
# not keywords, except parameter(s), which is why ``parameter.1a`` fails while ``params.1a`` works).
_KEYWORDS: Final = frozenset({"AND", "OR", "NOT", "IS", "NULL", "PARAMETER", "PARAMETERS"})

# sqlparse gives up beyond these (MAX_GROUPING_TOKENS, MAX_GROUPING_DEPTH) and MLflow reports a parse error.
_MAX_TOKENS: Final = 10000
_MAX_DEPTH: Final = 100


class _Token(NamedTuple):
    kind: str
    text: str
    depth: int = 0  # for a (...) group: how deep sqlparse nests groups inside it


def _lex(text: str, what: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos, end = 0, len(text)
    while pos < end:
        # Dollar-quoted literals, block comments, placeholders: no filter MLflow accepts reaches one.
        if text[pos] == "$" or text.startswith("/*", pos):
            raise SearchFilterError(f"Invalid clause(s) in {what}: '{text[pos:pos + 2]}'")
        for match, kind in _RULES:
            m = match(text, pos)
            if m is None:
                continue
            value = m.group()
            tokens.append(_Token(_KEYWORD if kind == _WORD and value.upper() in _KEYWORDS else kind, value))
            pos = m.end()
            break
        else:
            tokens.append(_Token(_OTHER, text[pos]))
            pos += 1
    if len(tokens) > _MAX_TOKENS:
        raise SearchFilterError(f"Error on parsing {what} '{text}'")
    return tokens


def _group_parens(
    tokens: list[_Token], what: str, text: str, unsupported: Callable[[str], SearchFilterError]
) -> list[_Token]:
    """Balanced parentheses as one token each, as sqlparse groups them before anything else."""
    out: list[_Token] = []
    depth = deepest = start = 0
    for index, token in enumerate(tokens):
        if token.kind == _PUNCT and token.text in "[]":
            # sqlparse appends [...] to the identifier before it (``tags.x[0]`` is the tag "x[0]").
            raise unsupported(f"Square brackets ({token.text!r})")
        if token.kind == _PUNCT and token.text == "(":
            depth += 1
            if depth == 1:
                start, deepest = index, 0
            deepest = max(deepest, depth)
            continue
        if token.kind == _PUNCT and token.text == ")":
            if depth == 0:
                raise SearchFilterError(f"Invalid clause(s) in {what}: ')'")
            depth -= 1
            if depth == 0:
                out.append(_Token(_PAREN, "".join(t.text for t in tokens[start:index + 1]), deepest))
            continue
        if depth:
            # A comment or an identifier inside is a group of its own, one level below its parenthesis.
            deepest = max(deepest, depth + 1 if token.kind in (_COMMENT, _NAME, _WORD, _SYMBOL) else depth)
        else:
            out.append(token)
    if depth:
        raise SearchFilterError(f"Invalid clause(s) in {what}: '('")
    if any(t.depth > _MAX_DEPTH for t in out):
        raise SearchFilterError(f"Error on parsing {what} '{text}'")
    return out


def _skip_ws(tokens: Sequence[_Token], index: int) -> int:
    while index < len(tokens) and tokens[index].kind == _WS:
        index += 1
    return index


def _is_keyword(token: _Token | None, *words: str) -> bool:
    return token is not None and token.kind == _KEYWORD and token.text.upper() in words


def _identifier(
    tokens: Sequence[_Token], index: int, unsupported: Callable[[str], SearchFilterError], key: bool = True
) -> tuple[str, int]:
    """The text of the identifier sqlparse builds from ``tokens[index]`` (a name or "symbol"), and the index
    after it: ``a.b.c`` with whitespace kept (``tags.a .b`` is the tag "a .b"), a trailing dot kept when no
    name follows it (``metrics.`` is the metric ""), then any ASC/DESC (``tags.x desc`` is the tag "x desc").
    A key followed by another identifier is refused: sqlparse would merge the two; a value may be followed by
    the next clause."""
    end = index + 1
    extends = True  # sqlparse extends past a dot only after a name or "symbol" (not after 'x' or *)
    while True:
        dot = _skip_ws(tokens, end)
        if dot >= len(tokens) or tokens[dot] != _Token(_PUNCT, ".") or not extends:
            break
        nxt = _skip_ws(tokens, dot + 1)
        token = tokens[nxt] if nxt < len(tokens) else None
        if token is not None and token.kind in (_NAME, _WORD, _SYMBOL, _STRING, _WILDCARD):
            first = token.text.upper()[:1]
            if nxt > dot + 1 and token.kind == _WORD and first.isascii() and first.isalpha():
                raise unsupported(f"A word after a dot and whitespace ({token.text!r})")
            end, extends = nxt + 1, token.kind in (_NAME, _WORD, _SYMBOL)
        else:
            end, extends = dot + 1, True
    while (order := _skip_ws(tokens, end)) < len(tokens) and tokens[order].kind == _ORDER:
        end = order + 1
    after = _skip_ws(tokens, end)
    if after < len(tokens):
        token = tokens[after]
        merges = token.kind in (_PAREN, _TYPECAST) or _is_keyword(token, "AS")
        if merges or (key and token.kind in (_NAME, _WORD, _SYMBOL)):
            text = "".join(t.text for t in tokens[index:after + 1])
            raise unsupported(f"An identifier followed by {token.text!r} ({text!r})")
    return "".join(t.text for t in tokens[index:end]), end


class _Raw(NamedTuple):
    identifier: str
    comparator: str
    value: _Token | None  # None for IS [NOT] NULL


def _raw_clauses(filter_string: str, unsupported: Callable[[str], SearchFilterError]) -> list[_Raw]:
    what = "filter string"
    tokens = _group_parens(_lex(filter_string, "filter"), what, filter_string, unsupported)
    if all(t.kind == _WS for t in tokens):
        raise SearchFilterError(f"Invalid filter '{filter_string}'. Could not be parsed.")
    if any(t == _Token(_PUNCT, ";") for t in tokens):
        raise SearchFilterError(
            f"Search filter contained multiple expression {filter_string!r}. Provide AND-ed expression list.")

    def invalid(token: _Token) -> SearchFilterError:
        return SearchFilterError(f"Invalid clause(s) in {what}: '{token.text}'")

    clauses: list[_Raw] = []
    previous = ""  # the last clause's form when no AND followed it: sqlparse may merge it with the next
    index = _skip_ws(tokens, 0)
    while index < len(tokens):
        token = tokens[index]
        if _is_keyword(token, "AND"):
            previous = ""
            index = _skip_ws(tokens, index + 1)
            continue
        if token.kind not in (_NAME, _WORD, _SYMBOL):
            raise invalid(token)
        identifier, index = _identifier(tokens, index, unsupported)
        at = _skip_ws(tokens, index)
        word = tokens[at] if at < len(tokens) else None
        if word is None:
            raise invalid(token)
        form = "null" if _is_keyword(word, "IS") else "in" if _is_keyword(word, "IN", "NOT") else "cmp"
        if form != "cmp" and previous in ("cmp", "in"):
            raise unsupported(f"An IS or IN clause right after another clause, without AND ({identifier!r})")
        value_at = _skip_ws(tokens, at + 1)
        value = tokens[value_at] if value_at < len(tokens) else None
        if word.kind == _CMP:
            if value is None:
                raise invalid(word)
            if value.kind in (_NAME, _WORD, _SYMBOL):
                text, index = _identifier(tokens, value_at, unsupported, key=False)
                value = _Token(_IDENT, text)
            elif value.kind in (_INT, _FLOAT, _HEX, _STRING, _PAREN) or _is_keyword(value, "NULL"):
                if value.depth >= _MAX_DEPTH:  # inside a comparison, sqlparse nests it one level deeper
                    raise SearchFilterError(f"Error on parsing filter '{filter_string}'")
                index = value_at + 1
            else:
                raise invalid(word)
            clauses.append(_Raw(identifier, word.text, value))
        elif form == "null":
            if _is_keyword(value, "NULL"):
                clauses.append(_Raw(identifier, "IS NULL", None))
            elif value is not None and value.kind == _KEYWORD and value.text.upper() == "NOT NULL":
                clauses.append(_Raw(identifier, "IS NOT NULL", None))  # one space only: "NOT  NULL" fails
            else:
                raise invalid(word)
            index = value_at + 1
        elif form == "in" and _is_keyword(word, "IN") and value is not None and value.kind == _PAREN:
            clauses.append(_Raw(identifier, word.text, value))
            index = value_at + 1
        elif form == "in" and _is_keyword(word, "NOT") and _is_keyword(value, "IN"):
            paren_at = _skip_ws(tokens, value_at + 1)
            if paren_at >= len(tokens) or tokens[paren_at].kind != _PAREN:
                raise invalid(word)
            clauses.append(_Raw(identifier, "NOT IN", tokens[paren_at]))
            index = paren_at + 1
        else:
            raise invalid(word)
        previous = form
        index = _skip_ws(tokens, index)
    return clauses


# ---------------------------------------------------------------------------------------------------------
# Identifiers and values, as SearchUtils._get_identifier and _get_value read them.

_METRIC: Final = "metric"
_PARAM: Final = "parameter"
_TAG: Final = "tag"
_ATTRIBUTE: Final = "attribute"
_DATASET: Final = "dataset"
_ENTITY_TYPES: Final = {
    "metric": _METRIC, "metrics": _METRIC,
    "parameter": _PARAM, "parameters": _PARAM, "param": _PARAM, "params": _PARAM,
    "tag": _TAG, "tags": _TAG,
    "attribute": _ATTRIBUTE, "attributes": _ATTRIBUTE, "attr": _ATTRIBUTE, "run": _ATTRIBUTE,
    "dataset": _DATASET, "datasets": _DATASET,
}  # fmt: skip
_DATASET_KEYS: Final = frozenset({"name", "digest", "context"})
_KEY_ALIASES: Final = {"created": "start_time", "Created": "start_time",
                       "run name": "run_name", "Run name": "run_name", "Run Name": "run_name"}  # fmt: skip
_DATASET_CONTEXT_TAG: Final = "mlflow.data.context"

_NUMERIC_COMPARATORS: Final = frozenset({">", ">=", "!=", "=", "<", "<="})
_STRING_COMPARATORS: Final = frozenset({"!=", "=", "LIKE", "ILIKE", "IN", "NOT IN"})
_NULL_COMPARATORS: Final = frozenset({"IS NULL", "IS NOT NULL"})
_ALL_COMPARATORS: Final = _NUMERIC_COMPARATORS | _STRING_COMPARATORS


@dataclass(frozen=True, slots=True)
class _Dialect:
    """What differs between the run and the logged-model search (SearchUtils vs SearchLoggedModelsUtils)."""

    entity: str
    search_attributes: frozenset[str]
    numeric_attributes: frozenset[str]
    order_by_attributes: frozenset[str]
    list_keys: frozenset[str] | None  # attributes that take a (...) list; None: all
    param_tag_comparators: frozenset[str]


_RUNS: Final = _Dialect(
    entity="runs",
    search_attributes=frozenset({"run_id", "run_name", "status", "user_id", "artifact_uri", "start_time", "end_time",
                                 "created", "Created", "run name", "Run name", "Run Name"}),
    numeric_attributes=frozenset({"start_time", "end_time", "created", "Created"}),
    order_by_attributes=frozenset({"run_id", "run_name", "status", "user_id", "artifact_uri", "start_time",
                                   "end_time", "created", "Created"}),
    list_keys=frozenset({"run_id"}),
    param_tag_comparators=frozenset({"!=", "=", "LIKE", "ILIKE"}) | _NULL_COMPARATORS,
)
_MODELS: Final = _Dialect(
    entity="logged models",
    search_attributes=frozenset({"name", "model_id", "model_type", "status", "source_run_id", "creation_timestamp",
                                 "creation_time", "last_updated_timestamp", "last_updated_time"}),
    numeric_attributes=frozenset({"creation_timestamp", "creation_time", "last_updated_timestamp",
                                  "last_updated_time"}),
    order_by_attributes=frozenset({"name", "model_id", "model_type", "status", "source_run_id", "creation_timestamp",
                                   "creation_time", "last_updated_timestamp", "last_updated_time"}),
    list_keys=None,
    param_tag_comparators=frozenset({"!=", "=", "LIKE", "ILIKE"}),
)


def _unsupported_for(dialect: _Dialect) -> Callable[[str], SearchFilterError]:
    def unsupported(what: str) -> SearchFilterError:
        return SearchFilterError(f"{what} is not supported for {dialect.entity} the agent holds locally")

    return unsupported


def _is_quoted(value: str, quote: str) -> bool:
    return len(value) >= 2 and value.startswith(quote) and value.endswith(quote)


def _trim_backticks(value: str) -> str:
    return value[1:-1] if _is_quoted(value, "`") else value


def _strip_quotes(value: str, expect_quoted: bool = False) -> str:
    if _is_quoted(value, "'") or _is_quoted(value, '"'):
        return value[1:-1]
    if expect_quoted:
        raise SearchFilterError(
            "Parameter value is either not quoted or unidentified quote types used for string value "
            f"{value}. Use either single or double quotes.")
    return value


def _get_identifier(identifier: str, valid_attributes: frozenset[str]) -> tuple[str, str]:
    entity, key = identifier.split(".", 1) if "." in identifier else (_ATTRIBUTE, identifier)
    entity = _trim_backticks(entity)
    if entity not in _ENTITY_TYPES:
        raise SearchFilterError(
            f"Invalid entity type '{entity}'. Valid values are ['metric', 'parameter', 'tag', 'attribute', 'dataset']")
    kind = _ENTITY_TYPES[entity]
    key = _trim_backticks(_strip_quotes(key))
    if kind == _ATTRIBUTE and key not in valid_attributes:
        raise SearchFilterError(f"Invalid attribute key '{key}' specified. Valid keys are '{sorted(valid_attributes)}'")
    if kind == _DATASET and key not in _DATASET_KEYS:
        raise SearchFilterError(f"Invalid dataset key '{key}' specified. Valid keys are '{sorted(_DATASET_KEYS)}'")
    return kind, key


def _parse_list(text: str) -> tuple[str, ...]:
    try:
        parsed = ast.literal_eval(text)
    except Exception as exc:  # MLflow catches only SyntaxError; the rest is a 500 there
        raise SearchFilterError(
            "While parsing a list in the query, expected a non-empty list of string values, but got ill-formed list."
        ) from exc
    items = parsed if isinstance(parsed, tuple) else (parsed,)
    if not items:
        raise SearchFilterError(
            "While parsing a list in the query, expected a non-empty list of string values, but got empty list")
    if not all(isinstance(item, str) for item in items):
        raise SearchFilterError(
            "While parsing a list in the query, expected string value, punctuation, or whitespace, but got "
            f"different type in list: {items}")
    return items


def _get_value(kind: str, key: str, token: _Token, dialect: _Dialect) -> Any:
    quoted = token.kind in (_STRING, _IDENT)
    if kind == _METRIC:
        if token.kind not in (_INT, _FLOAT):
            raise SearchFilterError(f"Expected numeric value type for metric. Found {token.text}")
        return float(token.text)
    if kind in (_PARAM, _TAG):
        if quoted:
            return _strip_quotes(token.text, expect_quoted=True)
        raise SearchFilterError(
            f"Expected a quoted string value for {kind} (e.g. 'my-value'). Got value {token.text}")
    if kind == _ATTRIBUTE and key in dialect.numeric_attributes:
        if token.kind not in (_INT, _FLOAT):
            raise SearchFilterError(f"Expected numeric value type for numeric attribute: {key}. Found {token.text}")
        try:
            return int(token.text) if token.kind == _INT else float(token.text)
        except ValueError as exc:  # an integer beyond Python's 4300 digits
            raise SearchFilterError(f"Invalid numeric value {token.text[:20]}... for {key}") from exc
    if quoted:
        return _strip_quotes(token.text, expect_quoted=True)
    if token.kind == _PAREN:
        if kind == _ATTRIBUTE and dialect.list_keys is not None and key not in dialect.list_keys:
            raise SearchFilterError(
                f"Only {sorted(dialect.list_keys)} attributes support comparison with a list of quoted string values.")
        return _parse_list(token.text)
    what = "attributes" if kind == _ATTRIBUTE else "dataset attributes"
    raise SearchFilterError(f"Expected a quoted string value for {what}. Got value {token.text}")


def _like_regex(pattern: str, flags: int) -> re.Pattern[str]:
    """MLflow's _convert_like_pattern_to_regex, kept as it is: "." misses newlines and "$" matches before a
    final one, so 'abc' LIKE 'abc\\n' matches."""
    regex = re.escape(pattern).replace("%", ".*").replace("_", ".")
    if not pattern.startswith("%"):
        regex = "^" + regex
    if not pattern.endswith("%"):
        regex = regex + "$"
    return re.compile(regex, flags)


_OPERATORS: Final[dict[str, Callable[[Any, Any], Any]]] = {
    ">": operator.gt, ">=": operator.ge, "=": operator.eq, "!=": operator.ne, "<=": operator.le, "<": operator.lt,
}  # fmt: skip


def _comparison(comparator: str, value: Any) -> Callable[[Any], bool]:
    """``SearchUtils.get_comparison_func(comparator)`` bound to its right-hand side."""
    if comparator in ("LIKE", "ILIKE"):
        if not isinstance(value, str):
            raise SearchFilterError(f"{comparator} needs a quoted string value, not a list: {value}")
        regex = _like_regex(value, re.IGNORECASE if comparator == "ILIKE" else 0)
        return lambda lhs: regex.match(lhs) is not None
    if comparator == "IN":
        return lambda lhs: lhs in value
    if comparator == "NOT IN":
        return lambda lhs: lhs not in value
    if isinstance(value, tuple) and comparator not in ("=", "!="):
        raise SearchFilterError(f"Comparator '{comparator}' cannot compare with a list: {value}")
    compare = _OPERATORS[comparator]
    return lambda lhs: bool(compare(lhs, value))


@dataclass(frozen=True, slots=True)
class _Clause:
    kind: str
    key: str  # after MLflow's key aliases
    comparator: str  # upper case
    test: Callable[[Any], bool]


def _check_comparator(comparator: str, allowed: frozenset[str]) -> None:
    if comparator not in allowed:
        raise SearchFilterError(f"Invalid comparator '{comparator}' not one of '{sorted(allowed)}'")


def _compile(raw: _Raw, dialect: _Dialect) -> _Clause:
    kind, key = _get_identifier(raw.identifier, dialect.search_attributes)
    comparator = raw.comparator.upper()
    if raw.value is None:
        if kind not in (_TAG, _PARAM):
            raise SearchFilterError(
                f"IS NULL / IS NOT NULL is only supported for tags and params, not for '{kind}' '{key}'")
        _check_comparator(comparator, dialect.param_tag_comparators)
        return _Clause(kind, _KEY_ALIASES.get(key, key), comparator, lambda lhs: True)
    value = _get_value(kind, key, raw.value, dialect)
    numeric = kind == _ATTRIBUTE and key in dialect.numeric_attributes
    if kind == _METRIC or numeric:
        _check_comparator(comparator, _NUMERIC_COMPARATORS)
    elif kind in (_PARAM, _TAG):
        _check_comparator(comparator, dialect.param_tag_comparators)
    elif dialect is _RUNS:
        _check_comparator(comparator, _STRING_COMPARATORS)
    else:
        _check_comparator(comparator, _ALL_COMPARATORS)  # SearchLoggedModelsUtils leaves them unchecked
    key = _KEY_ALIASES.get(key, key)
    if dialect is _MODELS and numeric:
        if key == "last_updated_time":  # MLflow: AttributeError, LoggedModel has no such attribute
            raise _unsupported_for(dialect)("The attribute 'last_updated_time'")
        key = "creation_timestamp" if key == "creation_time" else key
    if dialect is _MODELS and kind == _DATASET and key != "name":  # MLflow: "Invalid logged model search key"
        raise SearchFilterError(f"Invalid logged model search key '{key}'")
    return _Clause(kind, key, comparator, _comparison(comparator, value))


def _parse(filter_string: str | None, dialect: _Dialect) -> tuple[_Clause, ...]:
    if filter_string is None or filter_string == "":
        return ()
    if not isinstance(filter_string, str):
        raise SearchFilterError(f"Error on parsing filter '{filter_string}'")
    unsupported = _unsupported_for(dialect)
    return tuple(_compile(raw, dialect) for raw in _raw_clauses(filter_string, unsupported))


# ---------------------------------------------------------------------------------------------------------
# Entities in REST JSON, read into what MLflow's entity objects hold.

_RUN_STATUSES: Final = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")
_MODEL_STATUSES: Final = {
    "LOGGED_MODEL_STATUS_UNSPECIFIED": "UNSPECIFIED", "LOGGED_MODEL_PENDING": "PENDING",
    "LOGGED_MODEL_READY": "READY", "LOGGED_MODEL_UPLOAD_FAILED": "FAILED",
    0: "UNSPECIFIED", 1: "PENDING", 2: "READY", 3: "FAILED",
}  # fmt: skip


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _items(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _float(value: Any) -> float:
    """A proto double as JSON carries it: a number, or "NaN" / "Infinity" / "-Infinity" (or a numeric string)."""
    if value is None:
        return 0.0
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def _int(value: Any, default: int | None) -> int | None:
    """An int64 as JSON carries it: a number or a numeric string."""
    if value is None or isinstance(value, bool):
        return default
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        try:
            return int(float(value))
        except (TypeError, ValueError, OverflowError):
            return default


def _str(value: Any, default: str | None = "") -> str | None:
    return value if isinstance(value, str) else default


def _text(value: Any) -> str:
    return "" if value is None else value if isinstance(value, str) else str(value)


def _pairs(items: Any) -> dict[str, str]:
    """Params or tags: the last value of a key wins, as in RunData and LoggedModel."""
    return {_text(item.get("key")): _text(item.get("value")) for item in _items(items)}


class _Dataset(NamedTuple):
    name: str
    digest: str
    contexts: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _RunView:
    attributes: dict[str, Any]
    metrics: dict[str, float]
    params: dict[str, str]
    tags: dict[str, str]
    datasets: tuple[_Dataset, ...]

    @classmethod
    def of(cls, run: Mapping[str, Any]) -> _RunView:
        info, data = _mapping(run.get("info")), _mapping(run.get("data"))
        status = info.get("status", "RUNNING")
        if isinstance(status, int) and not isinstance(status, bool) and 1 <= status <= len(_RUN_STATUSES):
            status = _RUN_STATUSES[status - 1]
        attributes = {
            "run_id": _str(info.get("run_id")),
            "run_name": _str(info.get("run_name"), None),
            "status": _str(status),
            "user_id": _str(info.get("user_id")),
            "artifact_uri": _str(info.get("artifact_uri")),
            "start_time": _int(info.get("start_time"), 0),
            "end_time": _int(info.get("end_time"), None) or None,  # RunInfo.from_proto: 0 is "not ended"
        }
        metrics = {_text(m.get("key")): _float(m.get("value")) for m in _items(data.get("metrics"))}
        datasets = tuple(
            _Dataset(
                _text(_mapping(item.get("dataset")).get("name")),
                _text(_mapping(item.get("dataset")).get("digest")),
                tuple(_text(t.get("value")) for t in _items(item.get("tags")) if t.get("key") == _DATASET_CONTEXT_TAG),
            )
            for item in _items(_mapping(run.get("inputs")).get("dataset_inputs"))
        )
        return cls(attributes, metrics, _pairs(data.get("params")), _pairs(data.get("tags")), datasets)


class _ModelMetric(NamedTuple):
    key: str
    value: float
    timestamp: int
    dataset_name: str | None
    dataset_digest: str | None


@dataclass(frozen=True, slots=True)
class _ModelView:
    attributes: dict[str, Any]
    metrics: tuple[_ModelMetric, ...]
    params: dict[str, str]
    tags: dict[str, str]

    @classmethod
    def of(cls, model: Mapping[str, Any]) -> _ModelView:
        info, data = _mapping(model.get("info")), _mapping(model.get("data"))
        status = info.get("status", 0)
        attributes = {
            "name": _str(info.get("name")),
            "model_id": _str(info.get("model_id")),
            "model_type": _str(info.get("model_type"), None),
            "status": _MODEL_STATUSES.get(status, status) if isinstance(status, str | int) else "UNSPECIFIED",
            "source_run_id": _str(info.get("source_run_id"), None),
            "creation_timestamp": _int(info.get("creation_timestamp_ms"), 0),
            "last_updated_timestamp": _int(info.get("last_updated_timestamp_ms"), 0),
        }
        metrics = tuple(
            _ModelMetric(
                _text(m.get("key")), _float(m.get("value")), _int(m.get("timestamp"), 0) or 0,
                _str(m.get("dataset_name"), None) or None, _str(m.get("dataset_digest"), None) or None,
            )
            for m in _items(data.get("metrics"))
        )
        return cls(attributes, metrics, _pairs(data.get("params")), _pairs(info.get("tags")))


# ---------------------------------------------------------------------------------------------------------
# Runs.


@dataclass(frozen=True, slots=True)
class RunFilter:
    """A parsed ``runs/search`` filter; an empty one matches every run."""

    clauses: tuple[_Clause, ...] = ()

    def matches(self, run: Mapping[str, Any]) -> bool:
        """Whether ``SearchUtils.filter`` keeps the run (``run``: a Run in MLflow's REST JSON)."""
        if not self.clauses:
            return True
        view = _RunView.of(run)
        return all(_run_clause_matches(view, clause) for clause in self.clauses)


def _run_clause_matches(view: _RunView, clause: _Clause) -> bool:
    if clause.kind == _DATASET:
        if clause.key == "context":
            return any(clause.test(context) for dataset in view.datasets for context in dataset.contexts)
        return any(clause.test(getattr(dataset, clause.key)) for dataset in view.datasets)
    lhs: Any
    if clause.kind == _METRIC:
        lhs = view.metrics.get(clause.key)
    elif clause.kind == _PARAM:
        lhs = view.params.get(clause.key)
    elif clause.kind == _TAG:
        lhs = view.tags.get(clause.key)
    else:
        lhs = view.attributes[clause.key]
    if clause.comparator in _NULL_COMPARATORS:
        return (lhs is None) == (clause.comparator == "IS NULL")
    return lhs is not None and clause.test(lhs)


def parse_run_filter(filter_string: str | None) -> RunFilter:
    """Parse a ``runs/search`` filter as MLflow's ``SearchUtils.parse_search_filter`` does, checking every
    clause's comparator as well (raises ``SearchFilterError``)."""
    return RunFilter(_parse(filter_string, _RUNS))


def _run_order_by(order_by: Any) -> tuple[str, str, bool]:
    """``SearchUtils.parse_order_by_for_search_runs``: the clause must be one sqlparse identifier (an optional
    ASC/DESC included); it is then split with shlex, backticks read as double quotes."""
    if not isinstance(order_by, str):
        raise SearchFilterError(f"Error on parsing order_by clause '{order_by}'")
    unsupported = _unsupported_for(_RUNS)
    tokens = _group_parens(_lex(order_by, "order_by clause"), "order_by clause", order_by, unsupported)
    if not tokens or tokens[0].kind not in (_NAME, _WORD, _SYMBOL):
        raise SearchFilterError(f"Invalid order_by clause '{order_by}'. Could not be parsed.")
    text, end = _identifier(tokens, 0, unsupported)
    if end != len(tokens):
        raise SearchFilterError(f"Invalid order_by clause '{order_by}'. Could not be parsed.")
    try:
        words = shlex.split(text.replace("`", '"'))
    except ValueError as exc:  # MLflow lets shlex's ValueError through: a 500
        raise SearchFilterError(f"Invalid order_by clause '{order_by}'. {exc}") from exc
    ascending = True
    if len(words) > 2:
        raise SearchFilterError(f"Invalid order_by clause '{order_by}'. Could not be parsed.")
    if len(words) == 2:
        if words[1].lower() not in ("asc", "desc"):
            raise SearchFilterError(f"Invalid ordering key in order_by clause '{order_by}'.")
        ascending = words[1].lower() == "asc"
        text = words[0]  # only then does the unquoted form replace the original (`a b` stays backticked)
    kind, key = _get_identifier(text.strip(), _RUNS.order_by_attributes)
    if kind == _DATASET:  # MLflow: "Invalid order_by entity type", once there is a run to sort
        raise SearchFilterError(f"Invalid order_by entity type '{kind}'")
    return kind, key, ascending


def _run_sort_value(view: _RunView, kind: str, key: str, ascending: bool) -> tuple[bool, Any]:
    """``SearchUtils._get_value_for_sort``: None and NaN last either way, NaN before None."""
    key = _KEY_ALIASES.get(key, key)
    value: Any
    if kind == _METRIC:
        value = view.metrics.get(key)
    elif kind == _PARAM:
        value = view.params.get(key)
    elif kind == _TAG:
        value = view.tags.get(key)
    else:
        value = view.attributes[key]
    is_none = value is None
    is_nan = isinstance(value, float) and math.isnan(value)
    fill = math.inf if ascending else -math.inf
    if is_none:
        value = fill
    elif is_nan:
        value = -fill
    missing = is_none or is_nan
    return (missing, value) if ascending else (not missing, value)


def sort_runs(runs: Sequence[Mapping[str, Any]], order_by: Sequence[str] | None) -> list[Mapping[str, Any]]:
    """``SearchUtils.sort``: start_time descending then run_id, then each order_by clause from the last to
    the first with a stable sort, so the first clause decides first (raises ``SearchFilterError``)."""
    parsed = [_run_order_by(clause) for clause in order_by or ()]
    views = [(_RunView.of(run), run) for run in runs]
    views.sort(key=lambda pair: (-pair[0].attributes["start_time"], pair[0].attributes["run_id"]))
    for kind, key, ascending in reversed(parsed):
        views.sort(key=lambda pair: _run_sort_value(pair[0], kind, key, ascending), reverse=not ascending)
    return [run for _, run in views]


# ---------------------------------------------------------------------------------------------------------
# Logged models.


@dataclass(frozen=True, slots=True)
class ModelFilter:
    """A parsed ``logged-models/search`` filter with its ``datasets``; an empty one matches every model."""

    clauses: tuple[_Clause, ...] = ()
    datasets: tuple[tuple[Any, Any], ...] = ()  # (dataset_name, dataset_digest or None)

    def matches(self, model: Mapping[str, Any]) -> bool:
        """Whether ``SearchLoggedModelsUtils.filter_logged_models`` keeps the model (REST JSON)."""
        if not self.clauses and not self.datasets:
            return True
        view = _ModelView.of(model)
        # Datasets without a metric clause: the model needs some metric on one of them.
        if (self.datasets and not any(c.kind == _METRIC for c in self.clauses)
                and not any(self._on_datasets(metric) for metric in view.metrics)):
            return False
        return all(self._clause_matches(view, clause) for clause in self.clauses)

    def _on_datasets(self, metric: _ModelMetric) -> bool:
        return any(
            metric.dataset_name == name and (digest is None or digest == metric.dataset_digest)
            for name, digest in self.datasets
        )

    def _clause_matches(self, view: _ModelView, clause: _Clause) -> bool:
        lhs: Any
        if clause.kind == _METRIC:
            matching = [m for m in view.metrics if m.key == clause.key]
            if self.datasets:
                matching = [m for m in matching if self._on_datasets(m)]
            lhs = matching[0].value if matching else None  # the first logged value, not the latest
        elif clause.kind == _PARAM:
            lhs = view.params.get(clause.key)
        elif clause.kind == _TAG:
            lhs = view.tags.get(clause.key)
        else:  # attributes, and datasets.name, which SearchLoggedModelsUtils reads as the model's name
            lhs = view.attributes[clause.key]
        return lhs is not None and clause.test(lhs)


def parse_model_filter(filter_string: str | None, datasets: Sequence[Mapping[str, Any]] | None = None) -> ModelFilter:
    """Parse a ``logged-models/search`` filter and its optional ``datasets`` (``[{"dataset_name",
    "dataset_digest"?}]``) as ``SearchLoggedModelsUtils`` does (raises ``SearchFilterError``)."""
    if datasets and not all(isinstance(d, Mapping) and d.get("dataset_name") for d in datasets):
        raise SearchFilterError("`dataset_name` in the `datasets` clause must be specified.")
    pairs = tuple((d.get("dataset_name"), d.get("dataset_digest")) for d in datasets or ())
    return ModelFilter(_parse(filter_string, _MODELS), pairs)


class _OrderBy(NamedTuple):
    field_name: str
    ascending: bool
    dataset_name: Any = None
    dataset_digest: Any = None


def _parse_model_order_by(order_by: Any) -> _OrderBy:
    """``SearchLoggedModelsUtils.parse_order_by_for_logged_models``."""
    if not isinstance(order_by, Mapping):
        raise SearchFilterError("`order_by` must be a list of dictionaries.")
    field_name = order_by.get("field_name")
    if field_name is None:
        raise SearchFilterError("`field_name` in the `order_by` clause must be specified.")
    if not isinstance(field_name, str):
        raise SearchFilterError(f"Invalid order by field name: {field_name}.")
    if "." in field_name:
        entity = field_name.split(".", 1)[0]
        if entity != "metrics":
            raise SearchFilterError(f"Invalid order by field name: {entity}, only `metrics.<name>` is allowed.")
    else:
        field_name = field_name.strip()
        if field_name not in _MODELS.order_by_attributes:
            raise SearchFilterError(f"Invalid order by field name: {field_name}.")
        if field_name == "last_updated_time":  # MLflow: AttributeError, LoggedModel has no such attribute
            raise _unsupported_for(_MODELS)("Ordering by 'last_updated_time'")
    ascending = order_by.get("ascending", True)
    if ascending not in (True, False):  # 1 and 0 pass, as in MLflow
        raise SearchFilterError(
            "Value of `ascending` in the `order_by` clause must be a boolean, got "
            f"{type(ascending)} for field {field_name}.")
    dataset_name, dataset_digest = order_by.get("dataset_name"), order_by.get("dataset_digest")
    if dataset_digest and not dataset_name:
        raise SearchFilterError("`dataset_digest` can only be specified if `dataset_name` is also specified.")
    field_name = "creation_timestamp" if field_name == "creation_time" else field_name
    return _OrderBy(field_name, bool(ascending), dataset_name, dataset_digest)


class _SortKey:
    """MLflow's ``_LoggedModelMetricComp`` (ascending) and ``_Reversor`` (descending): None sorts last."""

    __slots__ = ("obj", "reverse")

    def __init__(self, obj: Any, reverse: bool) -> None:
        self.obj = obj
        self.reverse = reverse

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _SortKey) and bool(other.obj == self.obj)

    def __hash__(self) -> int:
        return hash(self.obj)

    def __lt__(self, other: _SortKey) -> bool:
        if self.obj is None:
            return False
        if other.obj is None:
            return True
        return bool(other.obj < self.obj) if self.reverse else bool(self.obj < other.obj)


def _model_sort_key(view: _ModelView, order_by: _OrderBy) -> _SortKey:
    if "." in order_by.field_name:
        key = order_by.field_name.split(".", 1)[1]
        matching = sorted(
            (
                m for m in view.metrics
                if m.key == key
                and (not order_by.dataset_name or m.dataset_name == order_by.dataset_name)
                and (not order_by.dataset_digest or m.dataset_digest == order_by.dataset_digest)
            ),
            key=lambda m: m.timestamp,
            reverse=True,
        )  # fmt: skip
        return _SortKey(matching[0].value if matching else None, not order_by.ascending)
    # MLflow sorts ascending attributes by their raw value, which fails on None next to a string.
    return _SortKey(view.attributes[order_by.field_name], not order_by.ascending)


def sort_models(
    models: Sequence[Mapping[str, Any]], order_by: Sequence[Mapping[str, Any]] | None
) -> list[Mapping[str, Any]]:
    """``SearchLoggedModelsUtils.sort``: the order_by entries (REST ``{"field_name", "ascending"?,
    "dataset_name"?, "dataset_digest"?}``), then creation_timestamp descending and model_id, unless ordered by
    already. A metric sorts by its latest value (highest timestamp) on the dataset, if one is named."""
    parsed = [_parse_model_order_by(entry) for entry in order_by or ()]
    if not any(o.field_name == "creation_timestamp" for o in parsed):
        parsed.append(_OrderBy("creation_timestamp", False))
    if not any(o.field_name == "model_id" for o in parsed):
        parsed.append(_OrderBy("model_id", True))
    views = [(_ModelView.of(model), model) for model in models]
    views.sort(key=lambda pair: tuple(_model_sort_key(pair[0], o) for o in parsed))
    return [model for _, model in views]
