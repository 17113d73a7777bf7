"""The deployment files: prefect.yaml names real flows with valid parameters; compose, Dockerfile
and the Kubernetes template reference files that exist; no file under infra/ holds a secret."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect import Flow
from prefect.flows import load_flow_from_entrypoint

from tests.infra.support import REPO

INFRA = REPO / "infra"
PREFECT_YAML = yaml.safe_load((INFRA / "prefect.yaml").read_text())
COMPOSE = yaml.safe_load((INFRA / "compose.yaml").read_text())
SECRET_NAME = re.compile(r"password|secret|token|auth_string", re.IGNORECASE)
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:[^@\s/'\"]+@")
PROCESS_POOLS = {"atp-scoring", "atp-training"}
GPU_POOL = "atp-gpu"


def deployments() -> list[dict[str, Any]]:
    return list(PREFECT_YAML["deployments"])


@pytest.mark.parametrize("deployment", deployments(), ids=lambda d: d["name"])
def test_each_deployment_names_a_flow_that_accepts_its_parameters(
    deployment: dict[str, Any],
) -> None:
    path, _, function = deployment["entrypoint"].partition(":")
    assert (REPO / path).is_file(), deployment["entrypoint"]
    flow = load_flow_from_entrypoint(f"{REPO / path}:{function}")
    assert isinstance(flow, Flow)
    flow.validate_parameters(deployment.get("parameters") or {})
    assert deployment["work_pool"]["name"] in PROCESS_POOLS | {GPU_POOL}


def test_deployment_names_are_unique_and_scoring_is_scheduled_once_at_a_time() -> None:
    names = [d["name"] for d in deployments()]
    assert len(names) == len(set(names))
    score = next(d for d in deployments() if d["name"] == "score")
    assert score["schedules"] and score["concurrency_limit"] == 1


def test_every_process_pool_has_a_compose_worker_and_the_gpu_pool_a_job_template() -> None:
    used = {d["work_pool"]["name"] for d in deployments()}
    commands = [service.get("command", []) for service in COMPOSE["services"].values()]
    served = {c[c.index("--pool") + 1] for c in commands if "--pool" in c}
    assert used - {GPU_POOL} <= served
    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    manifest = template["job_configuration"]["job_manifest"]
    container = manifest["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    placeholders = set(re.findall(r"{{ (\w+) }}", json.dumps(template["job_configuration"])))
    assert placeholders <= set(template["variables"]["properties"])


def test_compose_builds_and_mounts_files_that_exist() -> None:
    for name, service in COMPOSE["services"].items():
        build = service.get("build")
        if build:
            assert (INFRA / build["context"] / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (INFRA / source).exists(), f"{name}: {source}"
        for secret in service.get("secrets", []):
            assert secret in COMPOSE["secrets"], f"{name}: undeclared secret {secret}"


def test_dockerfile_copies_files_that_exist_and_takes_the_torch_build_as_an_argument() -> None:
    text = (INFRA / "Dockerfile").read_text()
    for line in re.findall(r"^COPY (?:--\S+ )*(.+)$", text, re.MULTILINE):
        for source in line.split()[:-1]:
            assert (REPO / source).exists(), source
    assert "ARG TORCH_VARIANT=cpu" in text
    assert {"mlflow-server", "pipeline"} <= set(re.findall(r"^FROM \S+ AS (\S+)$", text, re.M))


def string_items(node: Any, key: str = "") -> Iterator[tuple[str, str]]:
    """Every (key, string value) of a nested YAML/JSON document; list items keep their key."""
    if isinstance(node, dict):
        for name, value in node.items():
            yield from string_items(value, str(name))
    elif isinstance(node, list):
        for value in node:
            yield from string_items(value, key)
    elif isinstance(node, str):
        yield key, node


def test_secrets_arrive_only_as_files_or_templates() -> None:
    """A setting named like a secret holds a secret file's path, a template or a secret's name."""
    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    for document in (PREFECT_YAML, COMPOSE, template):
        for key, value in string_items(document):
            if SECRET_NAME.search(key) and value not in COMPOSE["secrets"]:
                assert value.startswith(("/run/secrets/", "{{")), f"{key}: {value}"
    for name, value in COMPOSE["secrets"].items():
        assert value["file"] == f"./secrets/{name}"
    assert (INFRA / "secrets" / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]


def infra_text_files() -> list[Path]:
    return [p for p in INFRA.rglob("*") if p.is_file() and p.parent.name != "secrets"]


def test_no_file_under_infra_holds_a_literal_password() -> None:
    for path in infra_text_files():
        text = path.read_text()
        assert not URL_WITH_PASSWORD.search(text), f"{path}: a URL with a password"
        assert not re.search(r"PASSWORD\s+'", text), f"{path}: a literal SQL password"
        literal = re.search(r"^\s*\w*password\w*\s*=\s*(?![\"']?\$)\S", text, re.I | re.M)
        assert not literal, f"{path}: {literal and literal.group()}"
