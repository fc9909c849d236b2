"""The Helm chart (deploy/helm/wicore) rendered offline, and what the tests ask of a render.

`render` runs Helm's own template engine (helm-python-sdk, Helm's Go library; no cluster, no
`helm` binary), which applies values.schema.json to the merged values first, as `helm
install` does. A `Render` holds the manifests as dicts and answers the questions the tests
ask: which pods a selector picks, what a container's environment resolves to in a running
pod (downward API and Secrets given plausible values), and the WiCore config that container
would load, through the services' own loader.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dockerfile
import helm_python as helm
import yaml

from wicore.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "wicore"
DOCKERFILE = ROOT / "deploy" / "docker" / "Dockerfile"
RELEASE = "wicore"
NAMESPACE = "llm"

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet"}
WICORE_SERVICES = ("gateway", "scheduler", "worker", "tier")  # container name = service = first arg
CONFIG_PATH = "/etc/wicore/config.yaml"

# What the downward API and Secrets hand a running pod, for resolving its environment.
FIELD_VALUES = {
    "status.podIP": "10.244.3.17",
    "status.hostIP": "192.168.40.12",
    "spec.nodeName": "node-a.cluster.example",
    "metadata.name": "pod-0",
    "metadata.namespace": NAMESPACE,
}
ENV_REF = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def values_file(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / name).read_text()) or {}


def render_text(values: Mapping[str, Any]) -> dict[str, str]:
    """Template path -> rendered text (HelmValuesError on a schema failure, HelmRenderError on a
    template's `fail`)."""
    with helm.Chart.load(CHART) as chart:
        return chart.render(dict(values), name=RELEASE, namespace=NAMESPACE)


def render(values: Mapping[str, Any]) -> Render:
    texts = render_text(values)
    docs: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(texts.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return Render(dict(values), docs, notes)


def image_env() -> dict[str, str]:
    """The WICORE_* environment the image sets (ENV in the Dockerfile's last stage)."""
    env: dict[str, str] = {}
    for cmd in dockerfile.parse_file(str(DOCKERFILE)):
        if cmd.cmd == "FROM":
            env = {}
        elif cmd.cmd == "ENV":
            pairs = list(cmd.value)
            env.update(zip(pairs[::2], pairs[1::2], strict=True))
    return {k: v for k, v in env.items() if k.startswith("WICORE_")}


def selector_matches(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """A LabelSelector (matchLabels/matchExpressions) or a Service's plain selector map."""
    if "matchLabels" in selector or "matchExpressions" in selector:
        plain = selector.get("matchLabels") or {}
        expressions = selector.get("matchExpressions") or []
    else:
        plain, expressions = selector, []
    if any(labels.get(k) != v for k, v in plain.items()):
        return False
    for expr in expressions:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return bool(plain or expressions)


@dataclass
class Pod:
    """One workload's pod template."""

    workload: dict[str, Any]

    @property
    def kind(self) -> str:
        return str(self.workload["kind"])

    @property
    def name(self) -> str:
        return str(self.workload["metadata"]["name"])

    @property
    def template(self) -> dict[str, Any]:
        return dict(self.workload["spec"]["template"])

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.template["spec"])

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.template["metadata"].get("labels") or {})

    @property
    def component(self) -> str:
        return self.labels.get("app.kubernetes.io/component", "")

    def containers(self) -> list[dict[str, Any]]:
        return [*self.spec.get("initContainers", []), *self.spec["containers"]]

    def volume(self, name: str) -> dict[str, Any]:
        (found,) = [v for v in self.spec.get("volumes", []) if v["name"] == name]
        return dict(found)


def is_wicore(container: Mapping[str, Any]) -> bool:
    args = container.get("args") or []
    return bool(args) and args[0] in WICORE_SERVICES and CONFIG_PATH in args


@dataclass
class Render:
    values: dict[str, Any]
    docs: list[dict[str, Any]]
    notes: str
    _env_cache: dict[int, dict[str, str]] = field(default_factory=dict, repr=False)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]

    def one(self, kind: str, name: str) -> dict[str, Any]:
        (found,) = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        return found

    def pods(self) -> list[Pod]:
        return [Pod(d) for d in self.docs if d["kind"] in WORKLOAD_KINDS]

    def pods_of(self, component: str) -> list[Pod]:
        return [p for p in self.pods() if p.component == component]

    def wicore_containers(self) -> Iterator[tuple[Pod, dict[str, Any]]]:
        for pod in self.pods():
            for container in pod.containers():
                if is_wicore(container):
                    yield pod, container

    def selected_pods(self, selector: Mapping[str, Any]) -> list[Pod]:
        return [p for p in self.pods() if selector_matches(selector, p.labels)]

    def config_text(self) -> str:
        (cm,) = [d for d in self.of_kind("ConfigMap") if "config.yaml" in (d.get("data") or {})]
        return str(cm["data"]["config.yaml"])

    def config_map_name(self) -> str:
        (cm,) = [d for d in self.of_kind("ConfigMap") if "config.yaml" in (d.get("data") or {})]
        return str(cm["metadata"]["name"])

    def container_env(self, container: Mapping[str, Any]) -> dict[str, str]:
        """The container's environment in a running pod: the image's, then its own, with
        valueFrom and $(VAR) references resolved as the kubelet does."""
        env = image_env()
        for var in container.get("env") or []:
            if "valueFrom" in var:
                source = var["valueFrom"]
                if "fieldRef" in source:
                    env[var["name"]] = FIELD_VALUES[source["fieldRef"]["fieldPath"]]
                elif "secretKeyRef" in source:
                    ref = source["secretKeyRef"]
                    env[var["name"]] = f"from-secret-{ref['name']}-{ref['key']}"
                else:
                    raise AssertionError(f"{var['name']}: unexpected valueFrom {source}")
            else:
                value = str(var.get("value", ""))
                env[var["name"]] = ENV_REF.sub(lambda m: env.get(m.group(1), m.group(0)), value)
        return env

    def load_config(self, container: Mapping[str, Any], tmp: Path) -> Config:
        """The WiCore config this container's service would run with (the real loader)."""
        path = tmp / f"config-{container['name']}.yaml"
        path.write_text(self.config_text())
        return load_config(path, self.container_env(container), {})


def mounted_at(pod: Pod, container: Mapping[str, Any], path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The (volumeMount, volume) that holds `path` in this container: the deepest mount."""
    best: dict[str, Any] | None = None
    for mount in container.get("volumeMounts") or []:
        root = mount["mountPath"].rstrip("/")
        if (path == root or path.startswith(root + "/")) and (
            best is None or len(root) > len(best["mountPath"].rstrip("/"))
        ):
            best = mount
    if best is None:
        raise AssertionError(f"{pod.name}/{container['name']}: nothing is mounted at {path}")
    return best, pod.volume(best["name"])


def secret_file(pod: Pod, container: Mapping[str, Any], path: str) -> tuple[str, str]:
    """(Secret name, key) of a file in a mounted Secret volume."""
    mount, volume = mounted_at(pod, container, path)
    assert "secret" in volume, f"{path} is in volume {volume['name']}, not a Secret"
    assert mount.get("readOnly") is True, f"{path}: Secret mounted writable"
    relative = path[len(mount["mountPath"].rstrip("/")) + 1 :]
    items = volume["secret"].get("items")
    if items:
        (key,) = [i["key"] for i in items if i["path"] == relative]
    else:
        key = relative
    return str(volume["secret"]["secretName"]), str(key)


def merged(base: Mapping[str, Any], *overlays: Mapping[str, Any]) -> dict[str, Any]:
    """Deep-merges value overlays (dicts merge, everything else replaces), as `-f a -f b`."""
    out = copy.deepcopy(dict(base))
    for overlay in overlays:
        for key, value in overlay.items():
            if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
                out[key] = merged(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out
