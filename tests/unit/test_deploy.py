"""deploy/: the manifests parse, agree with the configs they ship, and the systemd unit verifies."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from relay.config import parse_config, split_host_port
from tests.support import require_peer
from tests.support.relay import REPO

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "kubernetes"


def _manifests() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def _admin_port(config_text: str) -> int:
    text = re.sub(r"\$\{\w+\}", "x" * 8, config_text).replace("/run/secrets/sc_batch", "/dev/null")
    return split_host_port(parse_config(text.replace("api_key_file: /dev/null", "api_key: x"),
                                        source="deploy").admin.listen)[1]


def test_kubernetes_manifests_are_well_formed_and_complete():
    manifests = [doc for doc in _manifests() if doc.get("kind") != "Kustomization"]
    for doc in manifests:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"], doc
    kinds = sorted(doc["kind"] for doc in manifests)
    assert kinds == ["ConfigMap", "Secret", "Service", "Service", "StatefulSet"]
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_kubernetes_probes_reach_the_admin_endpoint_the_configmap_opens():
    by_kind = {doc["kind"]: doc for doc in _manifests()}
    config_text = by_kind["ConfigMap"]["data"]["relay.yaml"]
    [container] = by_kind["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["admin"] == _admin_port(config_text)
    assert not split_host_port(yaml.safe_load(config_text)["admin"]["listen"])[0].startswith("127.")  # kubelet reaches it
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    # every ${VAR} the config needs comes from the Secret
    needed = set(re.findall(r"\$\{(\w+)\}", config_text))
    given = {env["name"] for env in container["env"]}
    assert needed <= given
    secret_keys = set(by_kind["Secret"]["stringData"])
    assert {env["valueFrom"]["secretKeyRef"]["key"] for env in container["env"]} <= secret_keys


def test_docker_and_compose_health_checks_use_the_sample_configs_admin_port():
    port = _admin_port((DEPLOY / "relay.yaml").read_text())
    url = f"http://127.0.0.1:{port}/healthz"
    assert f'"{url}"]' in (DEPLOY / "Dockerfile").read_text()
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    assert compose["services"]["relay"]["healthcheck"]["test"][-1] == url
    unit = (DEPLOY / "systemd" / "sendcloud-relay.service").read_text()
    assert f"RELAY_HEALTHCHECK_ADDRESS={url}" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_systemd_unit_verifies(tmp_path):
    """`systemd-analyze verify` in a scratch root: the host's unit library, and stand-ins for
    the programs the unit runs (they are installed only on the target machine)."""
    analyze = shutil.which("systemd-analyze")
    require_peer(analyze is not None and Path("/usr/lib/systemd/system").is_dir(), "systemd-analyze")
    unit = DEPLOY / "systemd" / "sendcloud-relay.service"
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(unit, root / "etc/systemd/system" / unit.name)
    for line in unit.read_text().splitlines():
        if re.match(r"Exec\w+=", line):
            program = root / shlex.split(line.split("=", 1)[1])[0].lstrip("-@!+").lstrip("/")
            program.parent.mkdir(parents=True, exist_ok=True)
            program.write_text("#!/bin/sh\n")
            program.chmod(0o755)
    result = subprocess.run([analyze, "verify", f"--root={root}", unit.name], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip() and not result.stdout.strip(), result.stderr


# -- the scale-out variant: deploy/kubernetes-scale-out/, a kustomize overlay of deploy/kubernetes/

SCALE_OUT = DEPLOY / "kubernetes-scale-out"


def _rendered_scale_out() -> dict[tuple[str, str], dict]:
    """The overlay as `kubectl kustomize` renders it (what `kubectl apply -k` would send)."""
    kubectl = shutil.which("kubectl")
    require_peer(kubectl is not None, "kubectl (kustomize)")
    out = subprocess.run([kubectl, "kustomize", str(SCALE_OUT)], capture_output=True, text=True, timeout=60, check=True).stdout
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(out) if doc}


def test_scale_out_overlay_replaces_the_statefulset_with_a_deployment_and_a_disruption_budget():
    rendered = _rendered_scale_out()
    assert sorted(rendered) == [
        ("ConfigMap", "sendcloud-relay"), ("Deployment", "sendcloud-relay"), ("PodDisruptionBudget", "sendcloud-relay"),
        ("Secret", "sendcloud-relay"), ("Secret", "sendcloud-relay-spool"),
        ("Service", "sendcloud-relay"), ("Service", "sendcloud-relay-headless"),
    ]
    deployment = rendered["Deployment", "sendcloud-relay"]["spec"]
    assert deployment["replicas"] >= 2
    assert deployment["strategy"]["rollingUpdate"]["maxUnavailable"] == 0  # a new pod is ready before an old one goes
    pod = deployment["template"]
    assert "volumeClaimTemplates" not in deployment
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    assert not [volume for volume in volumes.values() if "persistentVolumeClaim" in volume]  # nothing kept on disk
    assert "emptyDir" in volumes["spool"]  # spool.path's folder: only bodies in transit between processes
    budget = rendered["PodDisruptionBudget", "sendcloud-relay"]["spec"]
    assert budget["maxUnavailable"] == 1
    assert budget["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    for service in (rendered["Service", name]["spec"] for name in ("sendcloud-relay", "sendcloud-relay-headless")):
        assert service["selector"].items() <= pod["metadata"]["labels"].items()


def test_scale_out_pods_take_the_dsn_from_a_secret_migrate_first_and_are_ready_on_readyz():
    rendered = _rendered_scale_out()
    spec = rendered["Deployment", "sendcloud-relay"]["spec"]["template"]["spec"]
    config_text = rendered["ConfigMap", "sendcloud-relay"]["data"]["relay.yaml"]
    spool = yaml.safe_load(config_text)["spool"]
    assert spool["backend"] == "postgres" and spool["dsn"] == "${SPOOL_DSN}"
    [migrate] = spec["initContainers"]
    [relay] = spec["containers"]
    assert migrate["args"][0] == "migrate" and relay["args"][0] == "serve"
    assert migrate["image"] == relay["image"] and migrate["args"][1:] == relay["args"][1:]
    needed = set(re.findall(r"\$\{(\w+)\}", config_text))
    for container in (migrate, relay):
        refs = {env["name"]: env["valueFrom"]["secretKeyRef"] for env in container["env"]}
        assert needed <= set(refs), container["name"]
        for ref in refs.values():
            secret = rendered["Secret", ref["name"]]
            assert ref["key"] in secret["stringData"]
        assert refs["SPOOL_DSN"] == {"name": "sendcloud-relay-spool", "key": "SPOOL_DSN"}
        mounted = {mount["name"] for mount in container["volumeMounts"]}
        assert mounted <= {volume["name"] for volume in spec["volumes"]}
    ports = {port["name"]: port["containerPort"] for port in relay["ports"]}
    assert ports["admin"] == int(yaml.safe_load(config_text)["admin"]["listen"].rpartition(":")[2])
    assert relay["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}


def test_scale_out_keeps_the_single_node_config_and_container_except_the_spool():
    """The overlay repeats the base's relay.yaml and container (kustomize cannot edit inside a
    string or change a kind); this keeps the copies from drifting apart."""
    by_kind = {doc["kind"]: doc for doc in _manifests()}
    base_config = yaml.safe_load(by_kind["ConfigMap"]["data"]["relay.yaml"])
    patch = yaml.safe_load((SCALE_OUT / "configmap.yaml").read_text())
    scale_config = yaml.safe_load(patch["data"]["relay.yaml"])
    assert {**base_config, "spool": None} == {**scale_config, "spool": None}
    assert {k: v for k, v in base_config["spool"].items() if k != "backend"} == {
        k: v for k, v in scale_config["spool"].items() if k not in ("backend", "dsn", "lease")
    }
    [base] = by_kind["StatefulSet"]["spec"]["template"]["spec"]["containers"]
    [scale] = yaml.safe_load((SCALE_OUT / "deployment.yaml").read_text())["spec"]["template"]["spec"]["containers"]
    for key in ("name", "image", "args", "ports", "startupProbe", "readinessProbe", "livenessProbe", "securityContext"):
        assert scale[key] == base[key], key
    assert [env for env in scale["env"] if env["name"] != "SPOOL_DSN"] == base["env"]
    assert scale["volumeMounts"] == base["volumeMounts"]
    assert scale["resources"]["limits"] == base["resources"]["limits"]
