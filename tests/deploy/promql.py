"""The metric names that Grafana dashboards query, read with a real PromQL parser.

``metric_names(expr)`` parses a PromQL expression with ``promql-parser`` (the Rust ``promql-parser``
crate's Python binding) after turning Grafana's templating into valid PromQL: ``$__rate_interval``
and other ``$var`` / ``${var}`` / ``[[var]]`` references outside quotes become a duration inside
``[...]`` and the number 1 elsewhere; inside quoted label values they are left alone (they are
just strings there). Grafana's variable queries ``label_values(metric, label)`` and
``query_result(expr)`` are understood too. ``dashboard_exprs(path)`` lists every query of a
dashboard: each panel target (panels nested in collapsed rows included) and each query variable.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

try:
    import promql_parser
except ImportError as e:  # pragma: no cover - a dev dependency
    raise ImportError("tests/deploy needs the dev dependency promql-parser (pip install promql-parser)") from e

# A Grafana variable reference: $name, ${name}, ${name:format}, [[name]], [[name:format]].
_VAR = r"\$\{[A-Za-z_][\w.]*(?::[^}]*)?\}|\$[A-Za-z_]\w*|\[\[[A-Za-z_][\w.]*(?::[^\]]*)?\]\]"
# Quoted strings (PromQL's three quote forms, escapes included) are copied through untouched.
_STR = r"\"(?:[^\"\\]|\\.)*\"|'(?:[^'\\]|\\.)*'|`[^`]*`"
_TOKEN = re.compile(rf"(?P<str>{_STR})|(?P<var>{_VAR})|(?P<open>\[)|(?P<close>\])")
_LABEL_VALUES = re.compile(r"^\s*label_values\s*\((?P<args>.*)\)\s*$", re.S)
_QUERY_RESULT = re.compile(r"^\s*query_result\s*\((?P<expr>.*)\)\s*$", re.S)


def substitute_variables(expr: str) -> str:
    """``expr`` with Grafana variables replaced by valid PromQL: durations in ``[...]``, ``1`` elsewhere."""
    out: list[str] = []
    depth = 0  # inside a range or subquery selector's brackets
    pos = 0
    for m in _TOKEN.finditer(expr):
        out.append(expr[pos : m.start()])
        pos = m.end()
        if m.group("var"):
            out.append("1m" if depth else "1")
        else:
            if m.group("open"):
                depth += 1
            elif m.group("close"):
                depth = max(0, depth - 1)
            out.append(m.group(0))
    out.append(expr[pos:])
    return "".join(out)


def _selector_name(sel: Any) -> str:
    if sel.name:
        return sel.name
    for m in sel.matchers.matchers:
        if m.name == "__name__":
            if str(m.op).rsplit(".", 1)[-1] != "Equal":
                raise ValueError(f"metric name given by a pattern ({m}): which metrics it reads is unknown")
            return m.value
    raise ValueError(f"a selector without a metric name: {sel}")


def metric_names(expr: str) -> set[str]:
    """Every metric name ``expr`` (PromQL, or a Grafana ``label_values``/``query_result`` query) reads.

    Raises ``ValueError`` when the expression does not parse or selects metrics by a name pattern.
    """
    if m := _QUERY_RESULT.match(expr):
        return metric_names(m.group("expr"))
    if m := _LABEL_VALUES.match(expr):
        args = m.group("args")
        # label_values(label) reads no particular metric; label_values(selector, label) reads the selector.
        if "," not in args:
            return set()
        return metric_names(args.rsplit(",", 1)[0])
    try:
        ast = promql_parser.parse(substitute_variables(expr))
    except ValueError as e:
        raise ValueError(f"invalid PromQL {expr!r}: {e}") from None
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            names.add(_selector_name(node))

    promql_parser.walk(ast, visit)
    return names


def _panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for p in panels:
        out.append(p)
        out.extend(_panels(p.get("panels", [])))  # a collapsed row holds its panels
    return out


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel of a dashboard, rows and the panels inside collapsed rows included."""
    return _panels(dashboard.get("panels", []))


def dashboard_exprs(path: str | Path) -> list[tuple[str, str]]:
    """(panel title, expr) of every panel target, then ("$variable", query) of every query variable."""
    d = json.loads(Path(path).read_text())
    out = []
    for p in panels(d):
        for t in p.get("targets", []):
            if t.get("expr"):
                out.append((p.get("title", ""), t["expr"]))
    for v in d.get("templating", {}).get("list", []):
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query") if isinstance(q, dict) else q
        if q:
            out.append((f"${v['name']}", q))
    return out


__all__ = ["dashboard_exprs", "metric_names", "panels", "substitute_variables"]
