"""The Kubernetes example (deploy/kubernetes/) and the scaling guide, checked without a cluster.

No cluster is at hand where the tests run, so these read the manifests and check what a typo
would break silently: every variable is a setting the daemon reads, secrets reach it only as
files, the worker identity is the stable pod name, the probes and the grace period fit the
daemon's own settings, the pods run as the image's user, and the retire Job uses the names the
StatefulSet gives. The guide's links must lead somewhere.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from ingest.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
GUIDE = ROOT / "deploy" / "running-at-scale.md"
README = ROOT / "README.md"

SETTINGS = {str(f.metadata["env"]): f for f in fields(Settings)}
SECRET = {env for env, f in SETTINGS.items() if f.metadata["secret"]}
SECRET_URL = {env for env, f in SETTINGS.items() if f.metadata["secret_url"]}
IMAGE_UID = 10001  # the Dockerfile's USER


def _documents(name: str) -> dict[str, dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((KUBERNETES / name).read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


@pytest.fixture(scope="module")
def ingest() -> dict[str, dict[str, Any]]:
    return _documents("ingest.yaml")


@pytest.fixture(scope="module")
def statefulset(ingest: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return ingest["StatefulSet/ingest"]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    return pod


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    (container,) = _pod(workload)["containers"]
    assert isinstance(container, dict)
    return container


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _setting_name(variable: str) -> str | None:
    """The setting ``variable`` gives, directly or as INGEST_<NAME>_FILE; None when none."""
    if variable in SETTINGS:
        return variable
    if variable.endswith("_FILE") and variable.removesuffix("_FILE") in SETTINGS:
        return variable.removesuffix("_FILE")
    return None


def _workloads(ingest: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [ingest["StatefulSet/ingest"], *_documents("retire-sessions.yaml").values()]


def test_every_variable_is_a_setting_and_secrets_come_from_files(
    ingest: dict[str, dict[str, Any]],
) -> None:
    for workload in _workloads(ingest):
        for name, entry in _env(_container(workload)).items():
            if not name.startswith("INGEST_"):
                continue
            setting = _setting_name(name)
            assert setting is not None, f"{name} is not a setting the daemon reads"
            if setting in SECRET:
                assert name.endswith("_FILE"), f"{setting} must come from a mounted file"
            if setting in SECRET_URL and name == setting:
                # A URL in the pod spec is fine only without a password in it.
                assert urlsplit(entry["value"]).password is None, name


def test_secret_files_are_mounted_from_the_secret(ingest: dict[str, dict[str, Any]]) -> None:
    keys = set(ingest["Secret/ingest"]["stringData"])
    for workload in _workloads(ingest):
        pod, container = _pod(workload), _container(workload)
        (volume,) = [v for v in pod["volumes"] if "secret" in v]
        assert volume["secret"]["secretName"] == "ingest"
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        for name, entry in _env(container).items():
            if name.endswith("_FILE"):
                path = Path(entry["value"])
                assert path.parent == Path(mount["mountPath"]), name
                assert path.name in keys, f"{name}: no key {path.name!r} in the Secret"
        # Readable by the image's user through its group, by nobody else.
        assert volume["secret"]["defaultMode"] == 0o440
        assert pod["securityContext"]["fsGroup"] == IMAGE_UID


def test_worker_identity_is_the_stable_pod_name(statefulset: dict[str, Any]) -> None:
    env = _env(_container(statefulset))
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["INGEST_CLIENT_ID"]["value"] == "$(POD_NAME)"
    # Kubernetes expands $(VAR) only for variables defined earlier in the list.
    names = list(env)
    assert names.index("POD_NAME") < names.index("INGEST_CLIENT_ID")
    assert env["INGEST_SHARE_GROUP"]["value"]


def test_probes_and_grace_period_fit_the_daemon(statefulset: dict[str, Any]) -> None:
    container = _container(statefulset)
    env = _env(container)
    port = int(env["INGEST_METRICS_PORT"]["value"])
    assert env["INGEST_METRICS_HOST"]["value"] == "0.0.0.0"
    (named,) = [p for p in container["ports"] if p["name"] == "metrics"]
    assert named["containerPort"] == port
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    shutdown = SETTINGS["INGEST_SHUTDOWN_TIMEOUT"].default
    assert _pod(statefulset)["terminationGracePeriodSeconds"] > shutdown
    assert container["args"] == ["run", "--no-migrate"]


def test_pods_run_as_the_image_user(ingest: dict[str, dict[str, Any]]) -> None:
    for workload in _workloads(ingest):
        context = _pod(workload)["securityContext"]
        assert context["runAsNonRoot"] is True
        assert context["runAsUser"] == IMAGE_UID
        assert _container(workload)["securityContext"]["allowPrivilegeEscalation"] is False


def test_retire_job_names_pods_the_statefulset_removes(statefulset: dict[str, Any]) -> None:
    (job,) = _documents("retire-sessions.yaml").values()
    args = _container(job)["args"]
    assert args[:2] == ["sessions", "retire"]
    names = [a for a in args[2:] if not a.startswith("--") and not a.isdigit()]
    prefix = statefulset["metadata"]["name"]
    assert names and all(re.fullmatch(rf"{prefix}-\d+", n) for n in names), names
    ordinals = sorted(int(n.rsplit("-", 1)[1]) for n in names)
    assert ordinals[0] >= statefulset["spec"]["replicas"], "it would retire a pod still running"
    job_env, pod_env = _env(_container(job)), _env(_container(statefulset))
    for name in ("INGEST_SHARE_GROUP", "INGEST_MQTT_URL", "INGEST_DATABASE_URL_FILE"):
        assert job_env[name]["value"] == pod_env[name]["value"], name


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {_slug(line.lstrip("#")) for line in path.read_text().splitlines() if line[:1] == "#"}


@pytest.mark.parametrize("doc", [GUIDE, README], ids=lambda p: p.name)
def test_scaling_links_lead_somewhere(doc: Path) -> None:
    text = doc.read_text()
    if doc == README:
        start = text.index("## Running at scale")
        text = text[start : text.index("\n## ", start + 1)]
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        if link.startswith("http"):
            continue
        target, _, anchor = link.partition("#")
        path = (doc.parent / target).resolve() if target else doc
        assert path.exists(), f"{doc.name}: {link} leads nowhere"
        if anchor:
            assert anchor in _anchors(path), f"{doc.name}: no heading for #{anchor}"
