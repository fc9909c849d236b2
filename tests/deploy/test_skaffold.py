"""skaffold.yaml against skaffold's own published JSON schema (vendored in schemas/), and
against the repository: the files it names, the image it builds, the ports it forwards.

No skaffold binary or cluster is needed. The schema (draft-07, `anyOf` everywhere, closed
objects) catches misspelt or misplaced keys; a test feeds it broken configs to show that it
does fail. The apiVersion, which the schema leaves free, is checked against the schema's
version. Each profile's patches are applied as skaffold applies them, and the result is
validated too, so `skaffold dev -p cpu` and `-p gpu` get a config skaffold accepts, with the
values files, build arguments and Dockerfile that exist here.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import dockerfile
import jsonschema
import pytest
import yaml

from wicore.config import GatewayConfig

ROOT = Path(__file__).resolve().parents[2]
SKAFFOLD = ROOT / "skaffold.yaml"
SCHEMA = Path(__file__).resolve().parent / "schemas" / "skaffold-v4beta14.json"
API_VERSION = "skaffold/" + SCHEMA.stem.removeprefix("skaffold-")
CHART = "deploy/helm/wicore"
INDEX = {"cpu": "https://download.pytorch.org/whl/cpu", "gpu": "https://download.pytorch.org/whl/cu128"}


def load_config() -> dict[str, Any]:
    config = yaml.safe_load(SKAFFOLD.read_text())
    assert isinstance(config, dict)
    return config


def validator() -> jsonschema.Draft7Validator:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def problems(config: dict[str, Any]) -> list[str]:
    """Schema errors, plus what the schema leaves free: the config's version and kind."""
    found = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator().iter_errors(config)]
    if config.get("apiVersion") != API_VERSION:
        found.append(f"apiVersion {config.get('apiVersion')!r}, the vendored schema is {API_VERSION!r}")
    if config.get("kind") != "Config":
        found.append(f"kind {config.get('kind')!r}, expected 'Config'")
    return found


def drop_empty(node: Any) -> Any:
    """Skaffold patches its re-serialised config, where empty lists and maps are left out."""
    if isinstance(node, dict):
        return {k: drop_empty(v) for k, v in node.items() if v not in ({}, [], None)}
    if isinstance(node, list):
        return [drop_empty(v) for v in node]
    return node


def apply_patches(config: dict[str, Any], profile: str) -> dict[str, Any]:
    """The config `skaffold -p PROFILE` sees: the profile's JSON patches (add and replace;
    replace needs an existing target) applied in order."""
    (chosen,) = [p for p in config["profiles"] if p["name"] == profile]
    doc = drop_empty(copy.deepcopy(config))
    for patch in chosen.get("patches", []):
        op = patch.get("op", "replace")
        *parents, leaf = [p.replace("~1", "/").replace("~0", "~") for p in patch["path"].split("/")[1:]]
        node = doc
        for part in parents:
            exists = int(part) < len(node) if isinstance(node, list) else part in node
            assert exists, f"profile {profile}: {op} {patch['path']}: no {part!r} (skaffold fails too)"
            node = node[int(part)] if isinstance(node, list) else node[part]
        value = copy.deepcopy(patch["value"])
        if op == "replace":
            if isinstance(node, list):
                node[int(leaf)] = value
            else:
                assert leaf in node, f"profile {profile}: replace {patch['path']}: no such key"
                node[leaf] = value
        elif op == "add":
            if isinstance(node, list):
                node.insert(len(node) if leaf == "-" else int(leaf), value)
            else:
                node[leaf] = value
        else:
            raise AssertionError(f"profile {profile}: op {op!r} is not checked here")
    return doc


def artifact(config: dict[str, Any]) -> dict[str, Any]:
    (only,) = config["build"]["artifacts"]
    return only


def release(config: dict[str, Any]) -> dict[str, Any]:
    (only,) = config["deploy"]["helm"]["releases"]
    return only


def test_vendored_schema_is_draft7() -> None:
    schema = json.loads(SCHEMA.read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    assert "SkaffoldConfig" in schema["definitions"]


def test_skaffold_yaml_is_valid() -> None:
    config = load_config()
    assert problems(config) == []
    assert config["metadata"]["name"] == "wicore"


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_each_profile_is_valid_after_its_patches(profile: str) -> None:
    assert problems(apply_patches(load_config(), profile)) == []


def wrong_key_in_release(c: dict[str, Any]) -> None:
    release(c)["chartPth"] = CHART


def wrong_top_level_key(c: dict[str, Any]) -> None:
    c["deployments"] = {}


def wrong_port_forward_type(c: dict[str, Any]) -> None:
    c["portForward"][0]["localPort"] = "50051"


def wrong_build_arg_type(c: dict[str, Any]) -> None:
    artifact(c)["docker"]["buildArgs"]["BAKE_MODEL"] = 1


def wrong_docker_key(c: dict[str, Any]) -> None:
    artifact(c)["docker"]["file"] = "Dockerfile"


def wrong_profile_key(c: dict[str, Any]) -> None:
    c["profiles"][0]["patch"] = c["profiles"][0].pop("patches")


def older_api_version(c: dict[str, Any]) -> None:
    c["apiVersion"] = "skaffold/v4beta13"


def wrong_kind(c: dict[str, Any]) -> None:
    c["kind"] = "Configuration"


@pytest.mark.parametrize(
    "breaking",
    [
        wrong_key_in_release,
        wrong_top_level_key,
        wrong_port_forward_type,
        wrong_build_arg_type,
        wrong_docker_key,
        wrong_profile_key,
        older_api_version,
        wrong_kind,
    ],
)
def test_a_broken_config_fails(breaking: Any) -> None:
    config = load_config()
    breaking(config)
    assert problems(config), f"{breaking.__name__} passed validation"


def test_api_version_is_the_vendored_schemas() -> None:
    assert load_config()["apiVersion"] == API_VERSION == "skaffold/v4beta14"


def test_image_is_built_from_the_dockerfile_locally() -> None:
    config = load_config()
    image = artifact(config)
    context = ROOT / image.get("context", ".")
    dockerfile_path = context / image["docker"]["dockerfile"]
    assert dockerfile_path.is_file(), dockerfile_path
    declared = {
        c.value[0].partition("=")[0] for c in dockerfile.parse_file(str(dockerfile_path)) if c.cmd == "ARG"
    }
    for profile in ("cpu", "gpu"):
        build_args = artifact(apply_patches(config, profile))["docker"]["buildArgs"]
        assert set(build_args) <= declared, f"{profile}: build args the Dockerfile lacks"
    assert config["build"]["local"]["push"] is False


def test_chart_is_there_and_gets_the_built_image() -> None:
    config = load_config()
    chart = release(config)
    assert (ROOT / chart["chartPath"]).resolve() == (ROOT / CHART).resolve()
    assert (ROOT / CHART / "Chart.yaml").is_file()
    # Skaffold's template names: the artifact's image with / - . : turned into _.
    name = re.sub(r"[/\-.:]", "_", artifact(config)["image"])
    templates = chart["setValueTemplates"]
    assert templates["image.repository"] == f"{{{{.IMAGE_REPO_{name}}}}}"
    assert templates["image.tag"] == f"{{{{.IMAGE_TAG_{name}}}}}@{{{{.IMAGE_DIGEST_{name}}}}}"
    values = yaml.safe_load((ROOT / CHART / "values.yaml").read_text())
    assert {"repository", "tag"} <= set(values["image"]), "the chart takes image.repository and image.tag"


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_profile_values_files_and_build_args(profile: str) -> None:
    config = apply_patches(load_config(), profile)
    values_files = release(config)["valuesFiles"]
    assert f"{CHART}/values-{profile}.yaml" in values_files
    for path in values_files:
        assert (ROOT / path).is_file(), f"profile {profile}: {path} does not exist"
    build_args = artifact(config)["docker"]["buildArgs"]
    assert build_args["TORCH_INDEX_URL"] == INDEX[profile]
    assert build_args.get("BAKE_MODEL", "0") == ("1" if profile == "cpu" else "0")


def test_port_forward_is_the_gateways_grpc_and_http() -> None:
    forwards = load_config()["portForward"]
    targets = {(f["resourceType"].lower(), f["resourceName"]) for f in forwards}
    assert targets == {("service", "wicore-gateway")}
    assert sorted(f["port"] for f in forwards) == [8000, 50051]
    assert all(f["localPort"] == f["port"] for f in forwards)
    # The same ports the gateway listens on by default.
    assert {GatewayConfig().port, GatewayConfig().http_port} == {50051, 8000}
