"""deploy/grafana/nextchar.json is a well-formed Grafana dashboard over the server's real metrics.

    .venv/bin/pytest -q tests/deploy/test_grafana.py

No Grafana runs here, so the dashboard is held to what Grafana's dashboard model requires
(a JSON schema of the fields Grafana reads, schemaVersion, unique panel ids, a 24-column grid
without overlaps, datasource references), every query is parsed by a PromQL parser after the
substitution Grafana makes, and every metric and label a query names exists in
server/metrics.py (or is one of the labels being added: `model`, `protocol`, `lane`; or a
label Prometheus adds when it scrapes). The issue's list of views is checked panel by panel.
Requests carry `protocol` (and method, code) but no `model`: per-model traffic is the model
calls' texts per second.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "nextchar.json"
promql = pytest.importorskip("promql_parser", reason="pip install -e '.[dev]' (promql-parser)")

# Labels on their way into server/metrics.py (issues 13 and 14): allowed on these metrics before
# its table documents them. Prometheus' scrape adds the others (kubernetes_sd relabelling gives
# namespace and pod).
COMING_LABELS = {
    "nextchar_requests_total": {"protocol"},
    "nextchar_request_duration_seconds": {"protocol"},
    "nextchar_queue_wait_seconds": {"model"},
    "nextchar_compute_seconds": {"model"},
    "nextchar_batch_size_texts": {"model"},
    "nextchar_queue_depth_texts": {"model", "lane"},
    "nextchar_active_streams": {"model"},
    "nextchar_model_info": {"model"},
    "nextchar_model_reloads_total": {"model"},
}
SCRAPE_LABELS = {"instance", "job", "namespace", "pod"}
GRAFANA_GLOBALS = {"__rate_interval": "1m", "__interval": "30s", "__range": "1h",
                   "__all": ".*"}
PANEL_TYPES = {"row", "timeseries", "stat", "table", "bargauge", "gauge", "text", "heatmap"}

REF = {"type": "object", "required": ["type", "uid"],
       "properties": {"type": {"const": "prometheus"}, "uid": {"type": "string"}}}
SCHEMA = {
    "type": "object",
    "required": ["title", "uid", "schemaVersion", "panels", "templating", "time"],
    "properties": {
        "title": {"type": "string", "minLength": 1},
        "uid": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,40}$"},
        "schemaVersion": {"type": "integer", "minimum": 36},
        "tags": {"type": "array", "items": {"type": "string"}},
        "time": {"type": "object", "required": ["from", "to"]},
        "refresh": {"type": "string"},
        "templating": {"type": "object", "required": ["list"], "properties": {"list": {
            "type": "array", "items": {"type": "object", "required": ["name", "type"],
                                       "properties": {"type": {"enum": ["query", "datasource", "custom", "constant", "interval", "textbox"]}}}}}},
        "panels": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["id", "type", "title", "gridPos"],
            "properties": {
                "id": {"type": "integer", "minimum": 1},
                "type": {"enum": sorted(PANEL_TYPES)},
                "gridPos": {"type": "object", "required": ["x", "y", "w", "h"], "properties": {
                    k: {"type": "integer", "minimum": 0} for k in "xywh"}},
                "datasource": REF,
                "targets": {"type": "array", "items": {
                    "type": "object", "required": ["refId", "expr"],
                    "properties": {"refId": {"type": "string"}, "expr": {"type": "string"},
                                   "datasource": REF}}},
            }}},
    },
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]


def interpolate(expr: str, variables: set[str]) -> str:
    """What Grafana sends: variables replaced (`.*` for All), `$__rate_interval` a duration."""
    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2)
        if name in GRAFANA_GLOBALS:
            return GRAFANA_GLOBALS[name]
        assert name in variables, f"${name} is not a dashboard variable"
        return ".*"
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", sub, expr)


def server_metrics() -> dict[str, set[str]]:
    """Series name -> label names: the metrics table in server/metrics.py's docstring (the
    documented contract), each of whose metrics the server's registry must really carry."""
    from nextchar.server import metrics as module

    documented: dict[str, tuple[str, set[str]]] = {}
    for line in (module.__doc__ or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("nextchar_"):
            documented[cells[0]] = (cells[1], {x.strip() for x in cells[2].split(",") if x.strip()})
    assert documented, "server/metrics.py has no metrics table"
    m = module.Metrics()
    try:
        families = {f.name for f in m.registry.collect()}
    finally:
        m.close()
    series: dict[str, set[str]] = {}
    for name, (kind, labels) in documented.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        family = family.removesuffix("_info") if kind == "info" else family
        assert family in families, f"{name} is documented but not registered"
        labels |= COMING_LABELS.get(name, set())
        if kind == "histogram":
            for suffix in ("_sum", "_count"):
                series[name + suffix] = labels
            series[name + "_bucket"] = labels | {"le"}
        else:
            series[name] = labels
    return series


def walk(node: Any) -> Any:
    """Every node of a promql_parser AST."""
    yield node
    for attr in ("expr", "lhs", "rhs", "param", "vector_selector"):
        child = getattr(node, attr, None)
        if child is not None and not isinstance(child, (int, float, str)):
            yield from walk(child)
    for arg in getattr(node, "args", None) or []:
        yield from walk(arg)


def test_schema(dashboard: dict[str, Any]) -> None:
    jsonschema.validate(dashboard, SCHEMA)


def test_panels_are_laid_out(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    taken: set[tuple[int, int]] = set()
    for p in dashboard["panels"]:
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24 and g["w"] >= 1 and g["h"] >= 1, p["title"]
        cells = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & taken, f"{p['title']} overlaps another panel"
        taken |= cells
        if p["type"] == "row":
            assert g["w"] == 24 and g["h"] == 1
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        assert p.get("fieldConfig", {}).get("defaults", {}).get("unit"), f"{p['title']}: no unit"


def test_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("instance", "model", "protocol", "method"):
        v = variables[name]
        # All must match series that lack the label too (a server before the label was added).
        assert v["includeAll"] and v["allValue"] == ".*", name
        promql.parse(interpolate(v["query"]["query"].removeprefix("label_values(")
                                 .rsplit(",", 1)[0], set(variables)))


def test_every_query_parses_and_names_real_series(dashboard: dict[str, Any]) -> None:
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    series = server_metrics()
    assert "nextchar_requests_total" in series and "nextchar_queue_depth_texts" in series
    for title, expr in queries(dashboard):
        ast = promql.parse(interpolate(expr, variables))
        for node in walk(ast):
            if isinstance(node, promql.VectorSelector):
                assert node.name in series, f"{title}: {node.name} is not a server metric"
                allowed = series[node.name] | SCRAPE_LABELS
                named = {m.name for m in node.matchers.matchers}
                assert named <= allowed, f"{title}: {node.name} has no label {named - allowed}"
            if isinstance(node, promql.AggregateExpr) and node.modifier is not None:
                grouped = set(node.modifier.labels)
                selectors = [n for n in walk(node.expr) if isinstance(n, promql.VectorSelector)]
                allowed = set().union(*(series[s.name] for s in selectors)) | SCRAPE_LABELS
                assert grouped <= allowed, f"{title}: groups by unknown {grouped - allowed}"


def test_shows_what_the_issue_asks(dashboard: dict[str, Any]) -> None:
    exprs = [e for _, e in queries(dashboard)]

    def some(*needles: str) -> bool:
        return any(all(n in e for n in needles) for e in exprs)

    assert some("nextchar_requests_total", "by (protocol, code)")                # requests
    assert some("nextchar_requests_total", 'code!~"OK|2.."', "protocol")        # errors
    for q in ("0.5", "0.99"):                                                    # p50 / p99
        assert some(f"histogram_quantile({q}", "nextchar_request_duration_seconds_bucket")
        assert some(f"histogram_quantile({q}", "nextchar_queue_wait_seconds_bucket", "model")
        assert some(f"histogram_quantile({q}", "nextchar_compute_seconds_bucket", "model")
    assert some("nextchar_batch_size_texts", "model")                            # batch size
    assert some("nextchar_queue_depth_texts", "lane", "model")                   # queue per lane
    assert some("nextchar_active_streams", "model")                              # streams
    assert some("nextchar_model_reloads_total", "model", "result")               # reloads
    # Per model: every query over a per-model series filters on the model variable.
    # Per model: every query over a series that has a `model` label filters on the variable.
    series = server_metrics()
    for title, e in queries(dashboard):
        names = re.findall(r"nextchar_\w+", e)
        per_model = [n for n in names if "model" in series.get(n, set())]
        assert e.count('model=~"$model"') == len(per_model), title


def test_a_broken_dashboard_fails(dashboard: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(dashboard))
    broken["panels"][1]["gridPos"].pop("h")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, SCHEMA)
    with pytest.raises(ValueError):
        promql.parse('sum by (code) (rate(nextchar_requests_total{code!~"OK"}[1m])')  # a ")"
    bad = {"panels": [{**dashboard["panels"][1], "targets": [
        {"refId": "A", "expr": "rate(nextchar_requests_count[1m])"}]}], "templating": {"list": []}}
    with pytest.raises(AssertionError, match="not a server metric"):
        test_every_query_parses_and_names_real_series(bad)
