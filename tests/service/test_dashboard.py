"""The Grafana dashboard (deploy/helm/wicore/dashboards/wicore-overview.json, shipped by the Helm
chart) against a real stack: every series a panel queries is one some service's /metrics exports.

The names are taken from each target's PromQL as written (`..._bucket`, `_sum`, `_count` and
`_total` included: those are the sample names Prometheus stores), then looked for among the
samples a running `wicore up` serves after a few requests, tracing on (to a collector that
is not there, so the span counters exist and the requests show a dead collector costs them
nothing)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from wicore.v1 import inference_pb2 as pb
from wicore.v1 import inference_pb2_grpc

from stack import free_port, start_stack

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "wicore"
DASHBOARD = CHART / "dashboards" / "wicore-overview.json"
# Prometheus names may hold digits (`wicore:e2e_request_latency_seconds`): [a-z_:] alone would cut them.
METRIC_NAME = re.compile(r"(?<![\w:])(?:wicore:[a-z0-9_:]+|process_[a-z0-9_]+)")
PANEL_TYPES = {"timeseries", "stat"}
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
CALL_TIMEOUT_S = 30.0
SCRAPE_TIMEOUT_S = 5.0
SETTLE_S = 10.0  # heartbeats and background spills: how long to wait for late series
PROMPTS = ["The quick brown fox", "WiCore serves language models", "The quick brown fox jumps"]


def load_dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def graph_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel that queries, rows' nested panels (a collapsed row keeps them) included."""
    found: list[dict[str, Any]] = []
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def dashboard_series(dashboard: dict[str, Any]) -> dict[str, set[str]]:
    """Metric name -> titles of the panels (or variables) whose queries use it."""
    used: dict[str, set[str]] = {}
    for panel in graph_panels(dashboard):
        for target in panel["targets"]:
            for name in METRIC_NAME.findall(target["expr"]):
                used.setdefault(name, set()).add(panel["title"])
    for variable in dashboard.get("templating", {}).get("list", []):
        for name in METRIC_NAME.findall(variable.get("definition", "")):
            used.setdefault(name, set()).add(f"${variable['name']}")
    return used


def test_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = load_dashboard()
    assert dashboard["title"] == "WiCore"
    assert dashboard["uid"] == "wicore-overview"
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    nested = [p for row in dashboard["panels"] if row.get("type") == "row" for p in row.get("panels", [])]
    ids = [p["id"] for p in [*dashboard["panels"], *nested]]
    assert len(set(ids)) == len(ids), "panel ids repeat"
    panels = graph_panels(dashboard)
    assert len(panels) >= 20
    for panel in panels:
        where = panel.get("title", panel)
        assert panel["type"] in PANEL_TYPES, where
        assert panel["title"], where
        assert panel["datasource"] == DATASOURCE, where
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys() and panel["gridPos"]["x"] + panel["gridPos"][
            "w"
        ] <= 24
        assert panel["targets"], where
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids), where
        for target in panel["targets"]:
            expr = target["expr"]
            assert target["datasource"] == DATASOURCE, where
            assert METRIC_NAME.search(expr), (where, expr)
            for open_, close in ("()", "{}", "[]"):
                assert expr.count(open_) == expr.count(close), (where, expr)
            assert expr.count('"') % 2 == 0, (where, expr)


def scrape(address: str) -> tuple[set[str], set[str]]:
    """(sample names, names of families declared with no sample yet) at http://address/metrics."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT_S) as reply:
        text = reply.read().decode()
    samples: set[str] = set()
    empty: set[str] = set()
    for family in text_string_to_metric_families(text):
        if family.samples:
            samples.update(s.name for s in family.samples)
        else:
            empty.add(family.name)
    return samples, empty


def exported(metrics: dict[str, str]) -> tuple[dict[str, set[str]], set[str], dict[str, str]]:
    """Per service its sample names; families declared with no sample; endpoints that did not answer."""
    by_service: dict[str, set[str]] = {}
    empty: set[str] = set()
    unreachable: dict[str, str] = {}
    for service, address in metrics.items():
        try:
            by_service[service], declared = scrape(address)
        except OSError as exc:  # URLError included: the service serves no /metrics (yet)
            unreachable[service] = f"http://{address}/metrics: {exc}"
            continue
        empty |= declared
    return by_service, empty, unreachable


def send_requests(address: str) -> None:
    """A few real requests: unary and streamed, one repeated prefix, one refused."""
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        for prompt in PROMPTS:
            request = pb.GenerateRequest(
                prompt=prompt, max_tokens=8, sampling=pb.SamplingParams(temperature=0.0)
            )
            assert stub.Generate(request, timeout=CALL_TIMEOUT_S).usage.completion_tokens > 0
        streamed = pb.GenerateRequest(prompt=PROMPTS[0] * 4, max_tokens=6, ignore_eos=True)
        assert [m for m in stub.GenerateStream(streamed, timeout=CALL_TIMEOUT_S)][-1].finish_reason
        with pytest.raises(grpc.RpcError) as refused:
            stub.Generate(pb.GenerateRequest(prompt=""), timeout=CALL_TIMEOUT_S)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_every_series_the_dashboard_queries_is_exported(
    tmp_path: Path, tiny_llama_dir: Path, redis_url: str
) -> None:
    wanted = dashboard_series(load_dashboard())
    dead_collector = f"127.0.0.1:{free_port()}"  # nothing listens there
    stack = start_stack(
        tmp_path,
        str(tiny_llama_dir),
        redis_url,
        settings={"observability.otlp_endpoint": dead_collector, "observability.sample_ratio": 1.0},
        ready_timeout_s=120.0,
    )
    try:
        assert set(stack.metrics) == {"gateway", "scheduler", "tier", "worker-0"}
        send_requests(stack.gateway)
        deadline = time.monotonic() + SETTLE_S
        while True:  # some series appear on a heartbeat or a background spill: wait a little for them
            by_service, declared_only, unreachable = exported(stack.metrics)
            names = set().union(*by_service.values())
            missing = sorted(set(wanted) - names)
            if (not missing and not unreachable) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    finally:
        code = stack.stop()
    assert code == 0, stack.log()[-3000:]
    problems = [f"  {service}: no answer at {why}" for service, why in sorted(unreachable.items())]
    problems += [  # every service: the process' own metrics
        f"  {service}: no process_resident_memory_bytes"
        for service, samples in sorted(by_service.items())
        if "process_resident_memory_bytes" not in samples
    ]
    if missing:
        problems.append(f"  {len(missing)} of {len(wanted)} series the dashboard queries are not exported:")
        problems += [
            f"    {name}  (panels: {', '.join(sorted(wanted[name]))})"
            + ("  [declared, no sample yet]" if _family_of(name) & declared_only else "")
            for name in missing
        ]
    if problems:
        pytest.fail("the dashboard asks for what the stack does not serve:\n" + "\n".join(problems))


def _family_of(sample: str) -> set[str]:
    """The family names a sample name can belong to (as the parser names families)."""
    names = {sample}
    for suffix in ("_total", "_bucket", "_sum", "_count", "_created"):
        if sample.endswith(suffix):
            names.add(sample.removesuffix(suffix))
    return names
