"""deploy/helm/wicore, rendered offline by Helm's own Go library (helm-python-sdk) and checked
without a cluster: each test is one property that would break a deployment if it slipped.

The chart is rendered once per value set: its defaults, values-cpu.yaml, values-gpu.yaml and
variants that switch on what the defaults leave off (Jaeger, an external Redis with a
password and TLS, a TLS gateway with API keys, mTLS, HPA and PDB, no NetworkPolicy and no
tier). Every manifest is validated against the Kubernetes API schema of KUBE_VERSION
(kubernetes-validate, strict: unknown fields fail), and the config file the chart renders is
loaded by the services' own loader (wicore.config.load_config) with each container's real
environment, so a port, host or path the chart and the services disagree on fails here.
Values that must not install fail the chart's schema (or its template checks) with a message
naming the key.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from helm_render import (
    CHART,
    NAMESPACE,
    ROOT,
    Pod,
    Render,
    is_wicore,
    merged,
    mounted_at,
    render,
    secret_file,
    selector_matches,
    values_file,
)

from wicore.config import Config

KUBE_VERSION = "1.33.0"

GATEWAY_TLS = {
    "gateway": {
        "tls": {"enabled": True, "existingSecret": "wicore-gateway-tls"},
        "apiKeys": {"existingSecret": "wicore-api-keys", "key": "keys.yaml"},
    }
}
VALUE_SETS: dict[str, dict[str, Any]] = {
    "default": {},
    "cpu": values_file("values-cpu.yaml"),
    "gpu": values_file("values-gpu.yaml"),
    "jaeger": {"jaeger": {"enabled": True}},
    "external-redis": {
        "redis": {
            "enabled": False,
            "url": "rediss://redis.example.internal:6380/0",
            "cluster": True,
            "auth": {"enabled": True, "existingSecret": "wicore-redis", "existingSecretKey": "password"},
            "tls": {"existingSecret": "wicore-redis-tls", "clientCert": True},
        },
        "internal": {"existingSecret": "wicore-internal", "existingSecretKey": "internal-token"},
    },
    "gateway-tls": GATEWAY_TLS,
    "gateway-mtls": merged(GATEWAY_TLS, {"gateway": {"tls": {"mtls": True}}}),
    "hpa-pdb": {  # also every port moved: a port the chart hard-codes shows up here
        "config": {
            "gateway": {"port": 7051, "http_port": 7080},
            "scheduler": {"port": 7052},
            "worker": {"port": 7060},
            "tier": {"port": 7053},
            "observability": {"metrics_port": 7400},
        },
        "gateway": {"autoscaling": {"enabled": True}, "pdb": {"enabled": True}},
        "metrics": {"serviceMonitor": {"enabled": True}},
        "model": {"source": "hostPath", "path": "/models/qwen", "hostPath": {"path": "/srv/models"}},
        "tier": {"nvme": {"existingClaim": "wicore-nvme"}},
        "redis": {"auth": {"enabled": True}},
        "networkPolicy": {
            "metricsFrom": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ]
        },
    },
    "no-netpol": {
        "networkPolicy": {"enabled": False},
        "grafana": {"dashboard": {"enabled": False}},
        "tier": {"enabled": False},
    },
}
TLS_GATEWAY_SETS = {"gateway-tls", "gateway-mtls"}
TIER_SETS = [name for name, values in VALUE_SETS.items() if values.get("tier", {}).get("enabled", True)]
MODEL_VOLUME_SETS = ["gpu", "hpa-pdb"]  # model.source pvc and hostPath

# Values `helm install` must refuse at the schema, and the key its message names.
HOSTILE: dict[str, tuple[dict[str, Any], str]] = {
    "negative-replicas": ({"gateway": {"replicas": -1}}, "/gateway/replicas"),
    "negative-worker-replicas": (
        {"workers": [{"name": "cpu", "replicas": -2, "device": "cpu"}]},
        "/workers/0/replicas",
    ),
    "string-replicas": ({"gateway": {"replicas": "2"}}, "/gateway/replicas"),
    "device-tpu": ({"workers": [{"name": "tpu", "replicas": 1, "device": "tpu"}]}, "/workers/0/device"),
    "dtype-alias": (
        {"workers": [{"name": "gpu", "replicas": 1, "device": "gpu:0", "dtype": "bf16"}]},
        "/workers/0/dtype",
    ),
    "unknown-class-key": (
        {"workers": [{"name": "gpu", "replicas": 1, "device": "gpu:0", "gpus": 2}]},
        "gpus",
    ),
    "unknown-top-level": ({"replicaCount": 3}, "replicaCount"),
    "model-s3": ({"model": {"source": "s3"}}, "/model/source"),
    "port-70000": ({"config": {"gateway": {"port": 70000}}}, "/config/gateway/port"),
    "unknown-config-section": ({"config": {"gatewy": {"port": 1}}}, "gatewy"),
    "service-monitor-yes": (
        {"metrics": {"serviceMonitor": {"enabled": "yes"}}},
        "/metrics/serviceMonitor/enabled",
    ),
    "root-user": ({"securityContext": {"runAsUser": 0}}, "/securityContext/runAsUser"),
    "numeric-image-tag": ({"image": {"tag": 1.5}}, "/image/tag"),
    "redis-http-url": ({"redis": {"enabled": False, "url": "http://redis:6379"}}, "/redis/url"),
}
# Values that pass the schema but that the chart's own checks refuse, and what the message names.
REFUSED: dict[str, tuple[dict[str, Any], str]] = {
    "owned-config-key": ({"config": {"worker": {"port": 50060, "model": "/x"}}}, "config.worker.model"),
    "password-in-config": ({"config": {"redis": {"password": "hunter2"}}}, "config.redis.password"),
    "token-in-config": ({"config": {"internal": {"token": "x" * 32}}}, "config.internal.token"),
    "owned-key-in-extra-config": (
        {
            "workers": [
                {
                    "name": "cpu",
                    "replicas": 1,
                    "device": "cpu",
                    "extraConfig": {"worker": {"device": "gpu:0"}},
                }
            ]
        },
        "workers[0].extraConfig.worker.device",
    ),
    "gpu-on-cpu-class": (
        {
            "workers": [
                {
                    "name": "cpu",
                    "replicas": 1,
                    "device": "cpu",
                    "resources": {"limits": {"nvidia.com/gpu": 1}},
                }
            ]
        },
        "workers[0].resources",
    ),
    "duplicate-class": (
        {
            "workers": [
                {"name": "a", "replicas": 1, "device": "cpu"},
                {"name": "a", "replicas": 1, "device": "cpu"},
            ]
        },
        "workers[1].name",
    ),
    "external-redis-without-url": ({"redis": {"enabled": False}}, "redis.url"),
    "pvc-without-claim": ({"model": {"source": "pvc", "path": "/models/m"}}, "model.pvc.claimName"),
    "model-outside-mount": (
        {"model": {"source": "pvc", "path": "/data/m", "pvc": {"claimName": "c"}}},
        "model.path",
    ),
    "tls-without-secret": ({"gateway": {"tls": {"enabled": True}}}, "gateway.tls.existingSecret"),
}

PLAIN_SECRET_ENV = re.compile(r"(PASSWORD|SECRET|_TOKEN$|_KEY$|APIKEY|API_KEY|AUTH$)")


@functools.cache
def rendered(name: str) -> Render:
    return render(VALUE_SETS[name])


@pytest.fixture(scope="module", params=list(VALUE_SETS))
def r(request: pytest.FixtureRequest) -> Render:
    return rendered(request.param)


def containers(render_: Render) -> list[tuple[Pod, dict[str, Any]]]:
    return [(pod, c) for pod in render_.pods() for c in pod.containers()]


def container_ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container.get("ports") or []}


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    ports = container_ports(container)
    if isinstance(port, str):
        assert port in ports, f"{container['name']}: no containerPort named {port!r} ({ports})"
        return ports[port]
    assert port in ports.values(), f"{container['name']}: {port} is not a containerPort ({ports})"
    return port


def probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {k: container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe") if k in container}


def probe_port(probe: dict[str, Any]) -> int | str | None:
    for kind in ("grpc", "httpGet", "tcpSocket"):
        if kind in probe:
            return probe[kind]["port"]
    return None


# ---- the chart as Helm sees it ------------------------------------------------------------


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_lint_passes_strict(name: str) -> None:
    report = helm.lint(CHART, VALUE_SETS[name], strict=True, kube_version=f"v{KUBE_VERSION}")
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], report


def test_chart_metadata_and_default_image() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["name"] == "wicore"
    images = {c["image"] for _, c in rendered("default").wicore_containers()}
    assert images == {f"wicore:{meta['appVersion']}"}


def test_image_tag_may_carry_a_digest() -> None:
    tag = "v1@sha256:" + "ab" * 32
    out = render({"image": {"repository": "registry.example/wicore", "tag": tag}})
    images = {c["image"] for _, c in out.wicore_containers()}
    assert images == {f"registry.example/wicore:{tag}"}


def test_manifests_validate_against_kubernetes_schema(r: Render) -> None:
    kinds = set()
    for doc in r.docs:
        kinds.add(doc["kind"])
        if doc["kind"] == "ServiceMonitor":
            continue  # a CRD: test_service_monitor checks it
        try:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")
    assert {"Deployment", "StatefulSet", "Service", "ConfigMap"} <= kinds


def test_every_object_has_the_standard_labels(r: Render) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for doc in r.docs:
        labels = doc["metadata"].get("labels") or {}
        where = f"{doc['kind']}/{doc['metadata']['name']}"
        assert labels.get("app.kubernetes.io/name") == "wicore", where
        assert labels.get("app.kubernetes.io/instance") == "wicore", where
        assert labels.get("app.kubernetes.io/managed-by") == "Helm", where
        assert labels.get("app.kubernetes.io/version") == chart["appVersion"], where
        assert labels.get("helm.sh/chart") == f"wicore-{chart['version']}", where
        assert labels.get("app.kubernetes.io/component"), where


# ---- selectors and ports ------------------------------------------------------------------


def test_service_selectors_pick_pods(r: Render) -> None:
    for svc in r.of_kind("Service"):
        picked = r.selected_pods(svc["spec"]["selector"])
        assert picked, f"Service {svc['metadata']['name']} selects no pod"
        component = svc["metadata"]["labels"]["app.kubernetes.io/component"]
        assert {p.component for p in picked} == {component}, svc["metadata"]["name"]


def test_workload_selectors_match_their_own_pods(r: Render) -> None:
    for pod in r.pods():
        assert selector_matches(pod.workload["spec"]["selector"], pod.labels), pod.name
        others = [p.name for p in r.selected_pods(pod.workload["spec"]["selector"]) if p.name != pod.name]
        assert not others, f"{pod.name}'s selector also takes {others}"


def test_network_policies_select_workloads(r: Render) -> None:
    for policy in r.of_kind("NetworkPolicy"):
        assert r.selected_pods(policy["spec"]["podSelector"]), policy["metadata"]["name"]
        for rule in policy["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if set(peer) == {"podSelector"}:
                    assert r.selected_pods(peer["podSelector"]), policy["metadata"]["name"]


def test_service_ports_target_container_ports(r: Render) -> None:
    for svc in r.of_kind("Service"):
        for pod in r.selected_pods(svc["spec"]["selector"]):
            (container,) = pod.spec["containers"]
            for port in svc["spec"]["ports"]:
                number = resolve_port(container, port.get("targetPort", port["port"]))
                assert port["port"] == number, (svc["metadata"]["name"], port)


def test_probe_ports_are_container_ports(r: Render) -> None:
    for pod, container in containers(r):
        for kind, probe in probes(container).items():
            port = probe_port(probe)
            if port is not None:
                resolve_port(container, port)
            else:
                assert "exec" in probe, (pod.name, kind)


def test_container_ports_are_what_the_loaded_config_listens_on(r: Render, tmp_path: Path) -> None:
    for pod, container in r.wicore_containers():
        config = r.load_config(container, tmp_path)
        service = container["args"][0]
        section = getattr(config, service)
        ports = container_ports(container)
        assert section.host == "0.0.0.0", (pod.name, section.host)
        assert ports["grpc"] == section.port, pod.name
        assert config.observability.metrics_host == "0.0.0.0"
        assert ports["metrics"] == config.observability.metrics_port, pod.name
        if service == "gateway":
            assert ports.get("http", 0) == config.gateway.http_port, pod.name


def test_config_loads_for_every_container(r: Render, tmp_path: Path) -> None:
    """The real loader accepts the rendered file with each container's environment."""
    loaded = [r.load_config(c, tmp_path) for _, c in r.wicore_containers()]
    assert len(loaded) >= 3  # gateway, scheduler, workers (and the tier when on)


def test_schema_config_sections_are_wicore_config_sections() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    sections = set(schema["properties"]["config"]["properties"])
    owned = {"state_dir", "cache_dir"}
    assert sections == {f.name for f in dataclasses.fields(Config)} - owned


def test_the_others_reach_the_scheduler_at_its_service(r: Render, tmp_path: Path) -> None:
    """scheduler.host/port in the shared file is what the gateway and workers dial: the
    scheduler's Service name and port; the scheduler itself binds 0.0.0.0."""
    for pod, container in r.wicore_containers():
        config = r.load_config(container, tmp_path)
        if pod.component in ("gateway", "worker"):
            svc = r.one("Service", config.scheduler.host)
            assert {p.component for p in r.selected_pods(svc["spec"]["selector"])} == {"scheduler"}
            assert config.scheduler.port in {p["port"] for p in svc["spec"]["ports"]}


# ---- what each service needs --------------------------------------------------------------


def test_state_and_cache_dirs_are_writable_mounts(r: Render, tmp_path: Path) -> None:
    baked = r.values.get("model", {}).get("baked", False)
    for pod, container in r.wicore_containers():
        config = r.load_config(container, tmp_path)
        mount, volume = mounted_at(pod, container, config.state_dir)
        assert "emptyDir" in volume and not mount.get("readOnly"), pod.name
        assert mount["mountPath"] == config.state_dir
        if pod.component in ("gateway", "worker") and config.worker.model == "smollm2" and not baked:
            mount, volume = mounted_at(pod, container, config.cache_dir)
            assert "emptyDir" in volume and mount["mountPath"] == config.cache_dir, pod.name
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        mounted_at(pod, container, "/tmp")


def test_secret_files_the_config_names_are_mounted(r: Render, tmp_path: Path) -> None:
    rendered_secrets = {s["metadata"]["name"]: s for s in r.of_kind("Secret")}
    for pod, container in r.wicore_containers():
        config = r.load_config(container, tmp_path)
        files = {"internal.token_file": config.internal.token_file}
        files |= {
            f"redis.{k}": getattr(config.redis, k) for k in ("tls_ca_file", "tls_cert_file", "tls_key_file")
        }
        if pod.component == "gateway":
            files |= {
                f"gateway.{k}": getattr(config.gateway, k) for k in ("api_keys_file", "tls_cert", "tls_key")
            }
            files["gateway.tls_client_ca"] = config.gateway.tls_client_ca
        assert files["internal.token_file"], pod.name
        for setting, path in files.items():
            if not path:
                continue
            name, key = secret_file(pod, container, path)
            if name in rendered_secrets:
                assert key in rendered_secrets[name]["data"], (setting, name, key)


def test_internal_token_file_holds_the_generated_or_existing_secret() -> None:
    default = rendered("default")
    (secret,) = default.of_kind("Secret")
    assert set(secret["data"]) == {"token"} and len(secret["data"]["token"]) >= 48
    external = rendered("external-redis")
    assert not external.of_kind("Secret")
    for pod, container in external.wicore_containers():
        path = f"/etc/wicore/internal/{VALUE_SETS['external-redis']['internal']['existingSecretKey']}"
        assert secret_file(pod, container, path) == ("wicore-internal", "internal-token")


def test_no_secret_comes_from_values_in_plain_text() -> None:
    """By default the only Secret is the generated internal token; existingSecret options
    render no Secret for what they name."""
    for name in VALUE_SETS:
        out = rendered(name)
        names = {s["metadata"]["name"] for s in out.of_kind("Secret")}
        allowed = {"wicore-internal-token", "wicore-redis"}
        assert names <= allowed, (name, names)
        for secret in out.of_kind("Secret"):
            assert "stringData" not in secret
            assert set(secret["data"]) in ({"token"}, {"redis-password"}), (name, secret["data"].keys())
        existing = {"wicore-redis-tls", "wicore-gateway-tls", "wicore-api-keys", "wicore-internal"}
        assert not names & existing
    assert {s["metadata"]["name"] for s in rendered("default").of_kind("Secret")} == {"wicore-internal-token"}
    assert not rendered("external-redis").of_kind("Secret")  # its password and token are the user's


def test_no_env_var_holds_a_secret_literally(r: Render) -> None:
    for pod, container in containers(r):
        for var in container.get("env") or []:
            if PLAIN_SECRET_ENV.search(var["name"]):
                assert "value" not in var and "secretKeyRef" in var["valueFrom"], (pod.name, var)


def test_redis_password_reaches_every_wicore_container_from_a_secret(tmp_path: Path) -> None:
    for name, secret in (
        ("external-redis", ("wicore-redis", "password")),
        ("hpa-pdb", ("wicore-redis", "redis-password")),
    ):
        out = rendered(name)
        for pod, container in out.wicore_containers():
            (var,) = [v for v in container["env"] if v["name"] == "WICORE_REDIS__PASSWORD"]
            ref = var["valueFrom"]["secretKeyRef"]
            assert (ref["name"], ref["key"]) == secret, pod.name
            assert out.load_config(container, tmp_path).redis.password, pod.name
    for pod, container in rendered("default").wicore_containers():
        assert "WICORE_REDIS__PASSWORD" not in {v["name"] for v in container["env"]}, pod.name


def test_external_redis_settings(tmp_path: Path) -> None:
    out = rendered("external-redis")
    assert not [p for p in out.pods() if p.component == "redis"]
    for _, container in out.wicore_containers():
        config = out.load_config(container, tmp_path)
        assert config.redis.url == "rediss://redis.example.internal:6380/0"
        assert config.redis.cluster is True
        assert config.redis.tls_ca_file.endswith("/ca.crt") and config.redis.tls_cert_file


def test_config_map_holds_no_secret(r: Render) -> None:
    config = yaml.safe_load(r.config_text())
    assert "token" not in config["internal"] and "password" not in config["redis"]
    for key in ("api_keys", "tls_key"):
        assert not str(config["gateway"].get(key, "")).startswith("-----BEGIN")


# ---- workers, tier, model -----------------------------------------------------------------


def gpu_requests(container: dict[str, Any]) -> set[str]:
    resources = container.get("resources") or {}
    return {where for where in ("limits", "requests") if "nvidia.com/gpu" in (resources.get(where) or {})}


def test_gpu_only_on_gpu_worker_classes() -> None:
    gpu = rendered("gpu")
    workers = gpu.pods_of("worker")
    assert workers
    for pod in workers:
        (container,) = pod.spec["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, pod.name
        assert {v["name"]: v.get("value") for v in container["env"]}["WICORE_WORKER__DEVICE"] == "gpu:0"
    for pod, container in containers(gpu):
        if pod.component != "worker":
            assert not gpu_requests(container), pod.name
    for name in ("default", "cpu"):
        for pod, container in containers(rendered(name)):
            assert not gpu_requests(container), (name, pod.name)


def test_mixed_worker_classes_get_gpus_by_class(tmp_path: Path) -> None:
    out = render(
        {
            "workers": [
                {"name": "a100", "replicas": 2, "device": "gpu:0", "dtype": "bfloat16"},
                {
                    "name": "cpu",
                    "replicas": 1,
                    "device": "cpu",
                    "extraConfig": {"worker": {"max_batch_size": 8}},
                },
            ]
        }
    )
    by_class = {p.labels["wicore/worker-class"]: p for p in out.pods_of("worker")}
    assert set(by_class) == {"a100", "cpu"}
    assert by_class["a100"].workload["spec"]["replicas"] == 2
    (gpu_container,) = by_class["a100"].spec["containers"]
    (cpu_container,) = by_class["cpu"].spec["containers"]
    assert gpu_requests(gpu_container) == {"limits"} and not gpu_requests(cpu_container)
    gpu_config = out.load_config(gpu_container, tmp_path)
    cpu_config = out.load_config(cpu_container, tmp_path)
    assert (gpu_config.worker.device, gpu_config.worker.dtype) == ("gpu:0", "bfloat16")
    assert (cpu_config.worker.device, cpu_config.worker.max_batch_size) == ("cpu", 8)
    services = {
        s["metadata"]["name"]: s for s in out.of_kind("Service") if s["spec"].get("clusterIP") == "None"
    }
    assert set(services) == {"wicore-worker-a100", "wicore-worker-cpu"}
    for pod in by_class.values():
        assert pod.workload["spec"]["serviceName"] in services


def test_workers_are_statefulsets_with_headless_services(r: Render) -> None:
    for pod in r.pods_of("worker"):
        assert pod.kind == "StatefulSet"
        svc = r.one("Service", pod.workload["spec"]["serviceName"])
        assert svc["spec"]["clusterIP"] == "None"


def env_source(container: dict[str, Any], name: str) -> dict[str, Any]:
    (var,) = [v for v in container["env"] if v["name"] == name]
    return var


@pytest.mark.parametrize("name", TIER_SETS)
def test_workers_advertise_pod_ip_and_use_their_nodes_tier(name: str, tmp_path: Path) -> None:
    out = rendered(name)
    (tier,) = out.pods_of("tier")
    assert tier.kind == "DaemonSet"
    (tier_container,) = tier.spec["containers"]
    (grpc,) = [p for p in tier_container["ports"] if p["name"] == "grpc"]
    assert grpc["hostPort"] == grpc["containerPort"]
    assert (
        env_source(tier_container, "WICORE_TIER__NODE")["valueFrom"]["fieldRef"]["fieldPath"]
        == "spec.nodeName"
    )
    tier_config = out.load_config(tier_container, tmp_path)
    assert tier_config.tier.node == "node-a.cluster.example"
    for pod in out.pods_of("worker"):
        (container,) = pod.spec["containers"]
        assert env_source(container, "POD_IP")["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
        assert env_source(container, "HOST_IP")["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP"
        config = out.load_config(container, tmp_path)
        assert config.worker.advertise_address == f"10.244.3.17:{config.worker.port}"
        assert config.worker.tier_address == f"192.168.40.12:{grpc['hostPort']}"
        assert config.worker.host == "0.0.0.0"


def test_without_the_tier_workers_do_not_offload(tmp_path: Path) -> None:
    out = rendered("no-netpol")
    assert not out.pods_of("tier")
    for _, container in out.wicore_containers():
        config = out.load_config(container, tmp_path)
        assert config.worker.kv_offload is False and config.scheduler.prefetch is False
        assert not config.worker.tier_address


def node_terms(pod: Pod) -> list[dict[str, Any]]:
    affinity = pod.spec.get("affinity", {}).get("nodeAffinity", {})
    return affinity.get("requiredDuringSchedulingIgnoredDuringExecution", {}).get("nodeSelectorTerms", [])


def test_tier_runs_where_the_workers_run() -> None:
    gpu = rendered("gpu")
    (tier,) = gpu.pods_of("tier")
    (worker,) = gpu.pods_of("worker")
    selector = worker.spec["nodeSelector"]
    assert node_terms(tier) == [
        {"matchExpressions": [{"key": k, "operator": "In", "values": [v]} for k, v in selector.items()]}
    ]
    assert tier.spec["tolerations"] == worker.spec["tolerations"]
    cpu = rendered("cpu")
    (tier,) = cpu.pods_of("tier")
    (worker,) = cpu.pods_of("worker")
    assert node_terms(tier) == node_terms(worker) != []
    (default_tier,) = rendered("default").pods_of("tier")
    assert "affinity" not in default_tier.spec  # workers may run anywhere: so does the tier


def test_tier_nvme_volume() -> None:
    (gpu_tier,) = rendered("gpu").pods_of("tier")
    assert gpu_tier.volume("nvme")["hostPath"] == {"path": "/mnt/nvme/wicore", "type": "DirectoryOrCreate"}
    (claim_tier,) = rendered("hpa-pdb").pods_of("tier")
    assert claim_tier.volume("nvme")["persistentVolumeClaim"]["claimName"] == "wicore-nvme"
    (container,) = claim_tier.spec["containers"]
    # One claim for all nodes: each tier keeps to its node's own directory.
    assert env_source(container, "WICORE_TIER__NVME_DIR")["value"].endswith("/$(NODE_NAME)")


@pytest.mark.parametrize("name", MODEL_VOLUME_SETS)
def test_model_volume_mounted_read_only(name: str, tmp_path: Path) -> None:
    out = rendered(name)
    pods = [*out.pods_of("worker"), *out.pods_of("gateway")]
    assert {p.component for p in pods} == {"worker", "gateway"}
    for pod in pods:
        (container,) = pod.spec["containers"]
        config = out.load_config(container, tmp_path)
        mount, volume = mounted_at(pod, container, config.worker.model)
        assert mount["readOnly"] is True, pod.name
        assert "persistentVolumeClaim" in volume or "hostPath" in volume, pod.name
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["readOnly"] is True


def test_bundled_model_is_smollm2(tmp_path: Path) -> None:
    for name in ("default", "cpu"):
        out = rendered(name)
        for pod, container in out.wicore_containers():
            assert out.load_config(container, tmp_path).worker.model == "smollm2"
            assert "model" not in {v["name"] for v in pod.spec["volumes"]}
    (worker,) = rendered("cpu").pods_of("worker")
    assert "cache" not in {v["name"] for v in worker.spec["volumes"]}  # baked: the image's cache dir


# ---- scheduler, probes, security ----------------------------------------------------------


def test_exactly_one_scheduler(r: Render) -> None:
    (scheduler,) = r.pods_of("scheduler")
    assert scheduler.kind == "Deployment"
    assert scheduler.workload["spec"]["replicas"] == 1
    assert scheduler.workload["spec"]["strategy"] == {"type": "Recreate"}


def test_probes_are_grpc_health_checks(r: Render, tmp_path: Path) -> None:
    tls_gateway = r.values.get("gateway", {}).get("tls", {}).get("enabled", False)
    for pod, container in r.wicore_containers():
        found = probes(container)
        assert {"livenessProbe", "readinessProbe"} <= set(found), pod.name
        if pod.component == "worker":
            assert found["startupProbe"]["failureThreshold"] * found["startupProbe"]["periodSeconds"] >= 600
        if pod.component == "gateway" and tls_gateway:
            assert not any("grpc" in p for p in found.values())
            continue
        port = r.load_config(container, tmp_path)
        for probe in found.values():
            assert set(probe["grpc"]) == {"port"}, pod.name  # no service name: the server's overall health
            assert probe["grpc"]["port"] == getattr(port, container["args"][0]).port


@pytest.mark.parametrize("name", sorted(TLS_GATEWAY_SETS))
def test_tls_gateway_probes(name: str) -> None:
    out = rendered(name)
    (gateway,) = out.pods_of("gateway")
    (container,) = gateway.spec["containers"]
    for probe in probes(container).values():
        if name == "gateway-mtls":  # the kubelet has no client certificate
            assert probe["tcpSocket"] == {"port": "grpc"}
        else:
            assert probe["httpGet"] == {"path": "/health", "port": "http", "scheme": "HTTPS"}


def test_tls_gateway_files(tmp_path: Path) -> None:
    for name in sorted(TLS_GATEWAY_SETS):
        out = rendered(name)
        (gateway,) = out.pods_of("gateway")
        (container,) = gateway.spec["containers"]
        config = out.load_config(container, tmp_path).gateway
        assert secret_file(gateway, container, config.tls_cert) == ("wicore-gateway-tls", "tls.crt")
        assert secret_file(gateway, container, config.tls_key) == ("wicore-gateway-tls", "tls.key")
        assert secret_file(gateway, container, config.api_keys_file) == ("wicore-api-keys", "keys.yaml")
        if name == "gateway-mtls":
            assert secret_file(gateway, container, config.tls_client_ca) == ("wicore-gateway-tls", "ca.crt")
        else:
            assert not config.tls_client_ca


def effective(pod: Pod, container: dict[str, Any], key: str) -> Any:
    return (container.get("securityContext") or {}).get(key, (pod.spec.get("securityContext") or {}).get(key))


def test_nothing_runs_as_root(r: Render) -> None:
    for pod, container in containers(r):
        where = f"{pod.name}/{container['name']}"
        assert effective(pod, container, "runAsNonRoot") is True, where
        user = effective(pod, container, "runAsUser")
        assert isinstance(user, int) and user > 0, where
        sc = container.get("securityContext") or {}
        assert sc.get("allowPrivilegeEscalation") is False, where
        assert not sc.get("privileged"), where
        assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
        assert sc.get("readOnlyRootFilesystem") is True, where
        assert pod.spec.get("automountServiceAccountToken") is False, where
        assert not pod.spec.get("hostNetwork") and not pod.spec.get("hostPID"), where
    for pod, container in r.wicore_containers():
        assert effective(pod, container, "runAsUser") == 10001


def test_gateway_autoscaling_and_disruption_budget() -> None:
    out = rendered("hpa-pdb")
    (gateway,) = out.pods_of("gateway")
    assert "replicas" not in gateway.workload["spec"]  # the HPA owns it
    (hpa,) = out.of_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": gateway.name,
    }
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    (pdb,) = out.of_kind("PodDisruptionBudget")
    assert out.selected_pods(pdb["spec"]["selector"]) == [gateway]
    default = rendered("default")
    assert not default.of_kind("HorizontalPodAutoscaler") and not default.of_kind("PodDisruptionBudget")


def test_gateway_service_ports() -> None:
    svc = rendered("default").one("Service", "wicore-gateway")
    assert svc["spec"]["type"] == "ClusterIP"
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 50051, "http": 8000}


# ---- network policies ---------------------------------------------------------------------


def test_network_policies_cover_every_pod(r: Render, tmp_path: Path) -> None:
    policies = r.of_kind("NetworkPolicy")
    if not r.values.get("networkPolicy", {}).get("enabled", True):
        assert not policies
        return
    covered = {p.name for policy in policies for p in r.selected_pods(policy["spec"]["podSelector"])}
    assert covered == {p.name for p in r.pods()}
    (gateway,) = r.pods_of("gateway")
    public = r.load_config(gateway.spec["containers"][0], tmp_path).gateway
    release = {"app.kubernetes.io/name": "wicore", "app.kubernetes.io/instance": "wicore"}
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        picked = {p.component for p in r.selected_pods(policy["spec"]["podSelector"])}
        open_rules = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
        if picked == {"gateway"}:
            (rule,) = open_rules  # the public ports only, from anywhere
            assert {p["port"] for p in rule["ports"]} == {public.port, public.http_port}
        else:
            assert not open_rules, policy["metadata"]["name"]
        for rule in policy["spec"]["ingress"]:
            if "from" in rule and "ports" not in rule:
                assert rule["from"] == [{"podSelector": {"matchLabels": release}}]


def test_metrics_from_opens_only_the_metrics_port() -> None:
    out = rendered("hpa-pdb")
    peer = VALUE_SETS["hpa-pdb"]["networkPolicy"]["metricsFrom"][0]
    for policy in out.of_kind("NetworkPolicy"):
        rules = [rule for rule in policy["spec"]["ingress"] if rule.get("from") == [peer]]
        metrics_port = VALUE_SETS["hpa-pdb"]["config"]["observability"]["metrics_port"]
        assert len(rules) == 1 and rules[0]["ports"] == [{"protocol": "TCP", "port": metrics_port}]


# ---- observability ------------------------------------------------------------------------


def test_jaeger_endpoint_is_the_jaeger_service(tmp_path: Path) -> None:
    for name in ("jaeger", "gpu"):
        out = rendered(name)
        (jaeger,) = out.pods_of("jaeger")
        svc = out.one("Service", "wicore-jaeger")
        assert out.selected_pods(svc["spec"]["selector"]) == [jaeger]
        for _, container in out.wicore_containers():
            endpoint = out.load_config(container, tmp_path).observability.otlp_endpoint
            assert endpoint == f"http://{svc['metadata']['name']}:4317"
            (otlp,) = [p for p in svc["spec"]["ports"] if p["port"] == 4317]
            (jaeger_container,) = jaeger.spec["containers"]
            assert resolve_port(jaeger_container, otlp["targetPort"]) == 4317
    for _, container in rendered("default").wicore_containers():
        assert not rendered("default").load_config(container, tmp_path).observability.otlp_endpoint


def test_explicit_otlp_endpoint_wins(tmp_path: Path) -> None:
    out = render(
        {"jaeger": {"enabled": True}, "config": {"observability": {"otlp_endpoint": "collector:4317"}}}
    )
    for _, container in out.wicore_containers():
        assert out.load_config(container, tmp_path).observability.otlp_endpoint == "collector:4317"


def test_service_monitor() -> None:
    assert not rendered("default").of_kind("ServiceMonitor")  # auto, and no such API offline
    out = rendered("hpa-pdb")
    (monitor,) = out.of_kind("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    spec = monitor["spec"]
    assert spec["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    (endpoint,) = spec["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    assert re.fullmatch(r"[0-9]+(ms|s|m|h)", endpoint["interval"])
    (relabel,) = endpoint["relabelings"]
    assert relabel["targetLabel"] == "job" and relabel["replacement"] == "wicore-$1"
    scraped = [
        svc
        for svc in out.of_kind("Service")
        if selector_matches(spec["selector"], svc["metadata"]["labels"])
        and "metrics" in {p["name"] for p in svc["spec"]["ports"]}
    ]
    components = {svc["metadata"]["labels"]["app.kubernetes.io/component"] for svc in scraped}
    assert components == set(WICORE_COMPONENTS)
    public = out.one("Service", "wicore-gateway")
    assert "metrics" not in {p["name"] for p in public["spec"]["ports"]}  # no unauthenticated port outside


WICORE_COMPONENTS = ("gateway", "scheduler", "worker", "tier")


def test_dashboard_config_map_is_the_charts_dashboard() -> None:
    source = CHART / "dashboards" / "wicore-overview.json"
    (cm,) = [
        d for d in rendered("default").of_kind("ConfigMap") if d["metadata"]["name"] == "wicore-dashboard"
    ]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["wicore-overview.json"]) == json.loads(source.read_text())
    assert json.loads(source.read_text())["uid"] == "wicore-overview"
    assert not (ROOT / "deploy" / "grafana").exists()
    assert not [
        d for d in rendered("no-netpol").of_kind("ConfigMap") if d["metadata"]["name"] == "wicore-dashboard"
    ]


# ---- values that must not install ---------------------------------------------------------


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_values_fail_the_schema(case: str) -> None:
    values, key = HOSTILE[case]
    with pytest.raises(helm.HelmValuesError) as failed:
        render(values)
    assert key in str(failed.value), str(failed.value)


@pytest.mark.parametrize("case", list(REFUSED))
def test_unworkable_values_fail_with_the_key(case: str) -> None:
    values, key = REFUSED[case]
    with pytest.raises(helm.HelmRenderError) as failed:
        render(values)
    assert key in str(failed.value), str(failed.value)


def test_notes_say_how_to_reach_the_gateway() -> None:
    notes = rendered("jaeger").notes
    assert "port-forward svc/wicore-gateway 50051:50051 8000:8000" in notes
    assert "port-forward svc/wicore-jaeger 16686:16686" in notes
    assert f"-n {NAMESPACE}" in notes


def test_every_wicore_container_runs_its_service_with_the_config() -> None:
    for name in VALUE_SETS:
        out = rendered(name)
        found = {c["args"][0] for _, c in out.wicore_containers()}
        tier = VALUE_SETS[name].get("tier", {}).get("enabled", True)
        assert found == set(WICORE_COMPONENTS) - (set() if tier else {"tier"}), name
        for pod, container in out.wicore_containers():
            # Service links would add WICORE_<SERVICE>_PORT=tcp://... variables to the
            # environment, whose prefix is the config loader's.
            assert pod.spec["enableServiceLinks"] is False, pod.name
            assert container["args"] == [container["name"], "--config", "/etc/wicore/config.yaml"]
            mount, volume = mounted_at(pod, container, "/etc/wicore/config.yaml")
            assert mount["readOnly"] is True and volume["configMap"]["name"] == out.config_map_name()
        others = [c["name"] for p in out.pods() for c in p.containers() if not is_wicore(c)]
        assert set(others) <= {"redis", "jaeger"}, others
