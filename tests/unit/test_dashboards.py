"""The Grafana dashboards (cluster/dashboards/*.json) and `mars-serve dashboards`.

The dashboards' queries are parsed with `promql-parser` (a port of
Prometheus's own parser) and every metric and label they name is checked
against the metrics cluster/metrics.py declares (as Ray exports them), an
explicit allow-list of vLLM's metrics (as Ray exports them, checked against
the installed vLLM's source), or a planned metric whose panel says so. No
Prometheus runs in these tests: whether each query returns series on a live
cluster is not checked here.

The upload is tested against `GrafanaTestDouble`, a TEST DOUBLE OF GRAFANA'S
HTTP API written for these tests (no Grafana server can be installed on the
development machines or in CI): a local HTTP server that implements only what
`grafana-client` calls for a push (folder search, folder creation, dashboard
upload), with Grafana's status codes for a bad token (401) and a token
without the Editor role (403). It checks the protocol, not Grafana itself.
"""

from __future__ import annotations

import importlib.util
import json
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock
from urllib.parse import parse_qs, urlsplit

import promql_parser
import pytest

from cluster import metrics
from cluster.cli import main
from cluster.dashboards import (
    DEFAULT_FOLDER,
    DashboardError,
    configmap_yaml,
    load_dashboards,
    push_dashboards,
)
from cluster.ports import free_port

SERVE_TAGS = {"deployment", "replica", "application"}
"""Tags `ray.serve.metrics` adds to every metric of cluster/metrics.py."""

VLLM_METRICS: dict[str, str] = {
    "ray_vllm_num_requests_running": "vllm:num_requests_running",
    "ray_vllm_num_requests_waiting": "vllm:num_requests_waiting",
    "ray_vllm_kv_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "ray_vllm_prefix_cache_hits_total": "vllm:prefix_cache_hits",
    "ray_vllm_prefix_cache_queries_total": "vllm:prefix_cache_queries",
    "ray_vllm_prompt_tokens_total": "vllm:prompt_tokens",
    "ray_vllm_generation_tokens_total": "vllm:generation_tokens",
    "ray_vllm_num_preemptions_total": "vllm:num_preemptions",
    "ray_vllm_time_to_first_token_seconds_bucket": "vllm:time_to_first_token_seconds",
    "ray_vllm_inter_token_latency_seconds_bucket": "vllm:inter_token_latency_seconds",
    "ray_vllm_request_queue_time_seconds_bucket": "vllm:request_queue_time_seconds",
}
"""vLLM metrics the dashboards may name: the exported name (vLLM's Ray stat
logger turns ``:`` into ``_``, Ray adds ``ray_``, and ``_total`` to counters)
and vLLM's own name. Not exported by mars-serve's engines yet."""
VLLM_LABELS = {"model_name", "engine", "ReplicaId"}
NEEDS_VLLM_WIRING = "Needs vLLM stat logger wiring"

PLANNED_METRICS: dict[str, tuple[str, set[str]]] = {}
"""Metrics a panel queries before they exist: the issue that adds each, and
its planned labels. Its panel must say that it does not exist yet."""

GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


# --------------------------------------------------------------------------
# the metric catalogue


@dataclass(frozen=True)
class Declared:
    kind: str
    name: str
    tags: tuple[str, ...]


def _declared_metrics() -> list[Declared]:
    """Every metric cluster/metrics.py's recorders create, captured by
    replacing Ray's metric classes while the recorders are built."""
    declared: list[Declared] = []

    def recorder(kind: str) -> Any:
        def make(name: str, description: str = "", tag_keys: tuple[str, ...] = (), **_: Any):
            declared.append(Declared(kind, name, tuple(tag_keys)))
            return mock.Mock()

        return make

    with mock.patch.multiple(
        metrics,
        Histogram=recorder("histogram"),
        Counter=recorder("counter"),
        Gauge=recorder("gauge"),
    ):
        metrics.IngressMetrics("mars")
        metrics.DispatchMetrics("mars_aware")
        metrics.EngineMetrics("default-0")
    return declared


def _exported() -> dict[str, set[str]]:
    """Every series name Ray exports for cluster/metrics.py, with its labels."""
    series: dict[str, set[str]] = {}
    for m in _declared_metrics():
        labels = set(m.tags) | SERVE_TAGS
        name = f"ray_{m.name}"
        if m.kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_count"] = labels
            series[f"{name}_sum"] = labels
        elif m.kind == "counter":
            series[f"{name}_total"] = labels
        else:
            series[name] = labels
    return series


def _known_series() -> dict[str, set[str]]:
    known = _exported()
    for name in VLLM_METRICS:
        known[name] = VLLM_LABELS | ({"le"} if name.endswith("_bucket") else set())
    for name, (_, labels) in PLANNED_METRICS.items():
        known[name] = labels
    return known


def test_every_recorder_of_cluster_metrics_is_in_the_catalogue() -> None:
    """A new recorder class must be added to `_declared_metrics`, or its
    metrics would escape the dashboard checks."""
    recorders = {
        n for n in vars(metrics) if n.endswith("Metrics") and isinstance(getattr(metrics, n), type)
    }
    # MigrationMetrics is built by IngressMetrics (and the global scheduler)
    assert recorders == {"IngressMetrics", "DispatchMetrics", "EngineMetrics", "MigrationMetrics"}
    assert {d.name for d in _declared_metrics()} >= set(metrics.INSTANCE_GAUGES)


def test_planned_metrics_do_not_exist_yet() -> None:
    """When a planned metric is added, move it from PLANNED_METRICS to the
    catalogue and say in its panel that it exists."""
    assert not set(PLANNED_METRICS) & set(_exported())


def test_vllm_allow_list_names_metrics_of_the_installed_vllm() -> None:
    spec = importlib.util.find_spec("vllm")  # located, not imported: vLLM's import takes seconds
    if spec is None or spec.origin is None:
        pytest.skip("vLLM is not installed")
    source = (Path(spec.origin).parent / "v1" / "metrics" / "loggers.py").read_text()
    defined = set(re.findall(r'name="(vllm:\w+)"', source))
    assert set(VLLM_METRICS.values()) <= defined
    for exported, own in VLLM_METRICS.items():
        stem = "ray_" + own.replace(":", "_")
        assert exported in (stem, f"{stem}_total", f"{stem}_bucket")


# --------------------------------------------------------------------------
# the dashboards


def _dashboards() -> list[dict[str, Any]]:
    return [d.model for d in load_dashboards()]


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def _queries() -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(dashboard title, panel, target) for every query of every panel."""
    for dashboard in _dashboards():
        for panel in _panels(dashboard):
            for target in panel["targets"]:
                yield dashboard["title"], panel, target


def _variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def _as_promql(expr: str) -> str:
    """`expr` with Grafana's variables replaced by values, as Grafana does
    before it sends the query (ours only appear in regex matchers)."""
    return re.sub(
        r"\$\{?(\w+)\}?", lambda m: "1m" if m.group(1) in GRAFANA_BUILTINS else ".*", expr
    )


@dataclass
class _Names:
    series: list[str] = field(default_factory=list)
    labels: set[str] = field(default_factory=set)


def _names_in(expr: str) -> _Names:
    names = _Names()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            assert node.name, f"select metrics by name, not by matchers alone: {expr}"
            names.series.append(node.name)
            names.labels |= {m.name for m in node.matchers.matchers}
        elif isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            names.labels |= set(node.modifier.labels)
        elif isinstance(node, promql_parser.BinaryExpr) and node.modifier is not None:
            names.labels |= set(node.modifier.matching.labels if node.modifier.matching else [])

    promql_parser.walk(promql_parser.parse(_as_promql(expr)), visit)
    return names


def test_dashboards_have_fixed_unique_uids() -> None:
    uids = [d["uid"] for d in _dashboards()]
    assert len(uids) == len(set(uids)) == 2
    for dashboard in _dashboards():
        ids = [p["id"] for p in dashboard["panels"]]
        assert len(ids) == len(set(ids)), f"{dashboard['title']}: panel ids repeat"


@pytest.mark.parametrize("dashboard", _dashboards(), ids=lambda d: d["uid"])
def test_datasource_is_a_template_variable(dashboard: dict[str, Any]) -> None:
    variable = _variables(dashboard)["datasource"]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    for panel in _panels(dashboard):
        assert panel["datasource"] == DATASOURCE, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
    for variable in _variables(dashboard).values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]


@pytest.mark.parametrize("dashboard", _dashboards(), ids=lambda d: d["uid"])
def test_every_panel_is_titled_and_described(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard):
        assert panel["title"] and len(panel.get("description", "")) > 40, panel["title"]
        assert panel["targets"], panel["title"]


def test_every_query_parses_and_names_known_metrics_and_labels() -> None:
    known = _known_series()
    checked = 0
    for title, panel, target in _queries():
        where = f"{title} / {panel['title']} / {target['refId']}"
        try:
            names = _names_in(target["expr"])
        except ValueError as exc:  # promql-parser's parse error
            pytest.fail(f"{where}: PromQL does not parse ({exc}): {target['expr']}")
        for series in names.series:
            assert series in known, f"{where}: {series} is not a metric cluster/metrics.py defines"
            unknown = names.labels - known[series]
            assert not unknown, f"{where}: {series} has no label {sorted(unknown)}"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")))
        assert legend <= names.labels, f"{where}: legend names {legend - names.labels}"
        checked += 1
    assert checked >= 30


def test_a_broken_query_is_caught() -> None:
    with pytest.raises(ValueError):
        _names_in(
            'sum by (instance) (rate(ray_mars_ttft_seconds_bucket{instance=~"$instance"}[5m])'
        )
    assert _names_in("max by (instance) (ray_mars_kv_usage_ratio)").series == [
        "ray_mars_kv_usage_ratio"
    ]


@pytest.mark.parametrize("dashboard", _dashboards(), ids=lambda d: d["uid"])
def test_variables_are_defined_and_query_known_labels(dashboard: dict[str, Any]) -> None:
    variables = _variables(dashboard)
    known = _known_series()
    texts = [t["expr"] for p in _panels(dashboard) for t in p["targets"]]
    texts += [v["definition"] for v in variables.values() if v["type"] == "query"]
    used = {m for text in texts for m in re.findall(r"\$\{?(\w+)\}?", text)}
    assert used - GRAFANA_BUILTINS <= set(variables)
    for variable in variables.values():
        if variable["type"] != "query":
            continue
        (metric, label) = re.fullmatch(
            r"label_values\((\w+)(?:\{.*\})?, (\w+)\)", variable["definition"]
        ).groups()
        assert label in known[metric], f"{variable['name']}: {metric} has no label {label}"


def test_panels_of_missing_metrics_say_so() -> None:
    for _, panel, target in _queries():
        series = set(_names_in(target["expr"]).series)
        if series & set(VLLM_METRICS):
            assert panel["description"].startswith(NEEDS_VLLM_WIRING), panel["title"]
        for name in series & set(PLANNED_METRICS):
            issue, _ = PLANNED_METRICS[name]
            assert "does not exist yet" in panel["description"], panel["title"]
            assert issue in panel["description"], panel["title"]


def test_the_operations_issues_panels_are_there() -> None:
    series = {s for _, _, t in _queries() for s in _names_in(t["expr"]).series}
    for metric in (
        "ray_mars_paused_sessions",
        "ray_mars_requests_running",
        "ray_mars_requests_waiting",
        "ray_mars_ttft_seconds_bucket",
        "ray_mars_e2e_latency_seconds_bucket",
        "ray_mars_time_per_output_token_seconds_bucket",
        "ray_mars_kv_usage_ratio",
        "ray_mars_dispatch_decisions_total",
        "ray_mars_migrations_total",
    ):
        assert metric in series
    assert series & set(VLLM_METRICS) == set(VLLM_METRICS)


def test_a_broken_dashboard_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text('{"uid": "a", "title": "A"')
    with pytest.raises(DashboardError, match=r"a\.json: not valid JSON"):
        load_dashboards(tmp_path)
    (tmp_path / "a.json").write_text('{"title": "A"}')
    with pytest.raises(DashboardError, match=r"a\.json: `uid` must be a non-empty string"):
        load_dashboards(tmp_path)


def test_configmap_carries_each_file_verbatim() -> None:
    import yaml

    dashboards = load_dashboards()
    manifest = yaml.safe_load(configmap_yaml(dashboards))
    assert manifest["kind"] == "ConfigMap"
    assert manifest["data"] == {d.path.name: d.text for d in dashboards}


# --------------------------------------------------------------------------
# push, against a test double of Grafana's HTTP API

EDITOR_TOKEN = "glsa_editor"
VIEWER_TOKEN = "glsa_viewer"


class GrafanaTestDouble:
    """A TEST DOUBLE OF GRAFANA'S HTTP API (not Grafana): the endpoints a push
    calls, with Grafana's request and answer shapes and status codes.

    ``GET /api/search?type=dash-folder&query=``, ``POST /api/folders`` and
    ``POST /api/dashboards/db`` (overwrite by uid, version counted up, a 412
    without ``overwrite``). A Bearer token other than `EDITOR_TOKEN` or
    `VIEWER_TOKEN` gets 401; `VIEWER_TOKEN` gets 403 on every POST.
    """

    def __init__(self) -> None:
        self.folders: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.posts: list[tuple[str, dict[str, Any]]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> GrafanaTestDouble:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def add_folder(self, title: str, parent_uid: str | None = None) -> str:
        uid = f"f{len(self.folders) + 1}"
        self.folders[uid] = {"uid": uid, "title": title, "parentUid": parent_uid}
        return uid

    # -- HTTP

    def _answer(self, method: str, path: str, query: dict[str, list[str]], body: Any) -> Any:
        if method == "GET" and path == "/api/search":
            return 200, self._search(query)
        if method == "POST" and path == "/api/folders":
            return self._create_folder(body)
        if method == "POST" and path == "/api/dashboards/db":
            return self._save_dashboard(body)
        return 404, {"message": "Not found"}

    def _search(self, query: dict[str, list[str]]) -> list[dict[str, Any]]:
        if query.get("type") != ["dash-folder"]:
            return []
        text = query.get("query", [""])[0].lower()
        return [
            {
                "uid": f["uid"],
                "title": f["title"],
                "type": "dash-folder",
                **({"folderUid": f["parentUid"]} if f["parentUid"] else {}),
            }
            for f in self.folders.values()
            if text in f["title"].lower()
        ]

    def _create_folder(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if any(f["title"] == body["title"] and not f["parentUid"] for f in self.folders.values()):
            return 409, {"message": "a folder with the same name already exists"}
        uid = self.add_folder(body["title"])
        return 200, {"uid": uid, "title": body["title"], "url": f"/dashboards/f/{uid}/"}

    def _save_dashboard(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        model = body["dashboard"]
        uid = model["uid"]
        if body.get("folderUid") not in self.folders:
            return 400, {"message": "folder not found"}
        previous = self.dashboards.get(uid)
        if previous and not body.get("overwrite"):
            return 412, {"status": "name-exists", "message": "A dashboard with the same uid exists"}
        version = previous["version"] + 1 if previous else 1
        self.dashboards[uid] = {"model": model, "folderUid": body["folderUid"], "version": version}
        slug = re.sub(r"[^a-z0-9]+", "-", model["title"].lower()).strip("-")
        return 200, {
            "id": list(self.dashboards).index(uid) + 1,
            "uid": uid,
            "url": f"/d/{uid}/{slug}",
            "status": "success",
            "version": version,
            "slug": slug,
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        double = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self, method: str) -> None:
                parts = urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                token = self.headers.get("Authorization", "").removeprefix("Bearer ")
                if token not in (EDITOR_TOKEN, VIEWER_TOKEN):
                    status, answer = 401, {"message": "invalid API key"}
                elif method == "POST" and token == VIEWER_TOKEN:
                    status, answer = 403, {"message": "You'll need additional permissions"}
                else:
                    if method == "POST":
                        double.posts.append((parts.path, body))
                    status, answer = double._answer(method, parts.path, parse_qs(parts.query), body)
                payload = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler


@pytest.fixture()
def grafana_test_double() -> Iterator[GrafanaTestDouble]:
    with GrafanaTestDouble() as double:
        yield double


def test_push_creates_the_folder_and_every_dashboard(
    grafana_test_double: GrafanaTestDouble,
) -> None:
    dashboards = load_dashboards()
    pushed = push_dashboards(grafana_test_double.url, EDITOR_TOKEN, dashboards)
    (folder,) = grafana_test_double.folders.values()
    assert folder["title"] == DEFAULT_FOLDER
    assert {p.uid for p in pushed} == {d.uid for d in dashboards}
    for dashboard, result in zip(dashboards, pushed, strict=True):
        stored = grafana_test_double.dashboards[dashboard.uid]
        assert stored["folderUid"] == folder["uid"]
        assert stored["model"] == {**dashboard.model, "id": None}
        assert result.url.startswith(f"{grafana_test_double.url}/d/{dashboard.uid}/")
        assert result.version == 1
    uploads = [body for path, body in grafana_test_double.posts if path == "/api/dashboards/db"]
    assert all(body["overwrite"] is True for body in uploads)


def test_push_again_overwrites_in_place(grafana_test_double: GrafanaTestDouble) -> None:
    dashboards = load_dashboards()
    first = push_dashboards(grafana_test_double.url, EDITOR_TOKEN, dashboards)
    second = push_dashboards(grafana_test_double.url, EDITOR_TOKEN, dashboards)
    assert len(grafana_test_double.folders) == 1
    assert len(grafana_test_double.dashboards) == len(dashboards)
    assert [p.url for p in second] == [p.url for p in first]
    assert [p.version for p in second] == [2] * len(dashboards)


def test_push_reuses_the_top_level_folder_of_that_name(
    grafana_test_double: GrafanaTestDouble,
) -> None:
    parent = grafana_test_double.add_folder("team")
    grafana_test_double.add_folder("ops", parent_uid=parent)  # nested: not ours
    top = grafana_test_double.add_folder("ops")
    grafana_test_double.add_folder("ops-archive")
    push_dashboards(grafana_test_double.url, EDITOR_TOKEN, load_dashboards(), folder="ops")
    assert {d["folderUid"] for d in grafana_test_double.dashboards.values()} == {top}
    assert len(grafana_test_double.folders) == 4


def test_cli_push_prints_each_dashboards_url(
    grafana_test_double: GrafanaTestDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["dashboards", "push", "--url", grafana_test_double.url, "--token", EDITOR_TOKEN])
    lines = capsys.readouterr().out.splitlines()
    assert code == 0
    assert lines == [
        f"mars-serve: {grafana_test_double.url}/d/mars-serve-overview/mars-serve (version 1)",
        f"mars-serve: vLLM engines: {grafana_test_double.url}/d/mars-serve-vllm/"
        "mars-serve-vllm-engines (version 1)",
    ]


def test_cli_push_takes_the_token_from_the_environment(
    grafana_test_double: GrafanaTestDouble,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("GRAFANA_TOKEN", EDITOR_TOKEN)
    assert main(["dashboards", "push", "--url", grafana_test_double.url, "--folder", "x"]) == 0
    assert [f["title"] for f in grafana_test_double.folders.values()] == ["x"]
    monkeypatch.delenv("GRAFANA_TOKEN")
    assert main(["dashboards", "push", "--url", grafana_test_double.url]) == 2
    assert "needs --token (or GRAFANA_TOKEN" in capsys.readouterr().err


def test_a_refused_token_is_a_clear_error(
    grafana_test_double: GrafanaTestDouble, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["dashboards", "push", "--url", grafana_test_double.url, "--token", "wrong"])
    err = capsys.readouterr().err
    assert code == 2
    assert err == (
        f"mars-serve: error: Grafana at {grafana_test_double.url} refused the token "
        "(401 Unauthorized): give a valid service account token (--token or GRAFANA_TOKEN)\n"
    )
    assert not grafana_test_double.dashboards


def test_a_token_without_the_editor_role_is_a_clear_error(
    grafana_test_double: GrafanaTestDouble,
) -> None:
    with pytest.raises(DashboardError, match=r"403.*needs the Editor role"):
        push_dashboards(grafana_test_double.url, VIEWER_TOKEN, load_dashboards())


def test_a_url_that_is_not_grafana_is_a_clear_error(
    grafana_test_double: GrafanaTestDouble,
) -> None:
    with pytest.raises(DashboardError, match=r"404.*is --url the root of a Grafana server"):
        push_dashboards(f"{grafana_test_double.url}/nothing", EDITOR_TOKEN, load_dashboards())


def test_an_unreachable_server_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there: connection refused
    code = main(["dashboards", "push", "--url", url, "--token", EDITOR_TOKEN])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"mars-serve: error: cannot reach Grafana at {url}: ")
    assert err.endswith("Connection refused\n")  # the socket's error, not a retry summary


@pytest.mark.parametrize("url", ["grafana:3000", "ftp://grafana", "http://"])
def test_a_malformed_url_is_a_clear_error(url: str) -> None:
    with pytest.raises(DashboardError, match=r"--url must be http\(s\)://HOST"):
        push_dashboards(url, EDITOR_TOKEN, load_dashboards())
