"""The plain manifests (k8s/): rendered from the chart, so they are checked to equal a
fresh render, and each overlay's `kubectl kustomize` output passes the same strict
validation and property checks as the chart."""

from __future__ import annotations

import shutil

import pytest

from . import manifests as m

pytestmark = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")


@pytest.fixture(scope="module", params=m.OVERLAYS, ids=[p.name for p in m.OVERLAYS])
def overlay(request):
    return request.param.name, m.kustomize(request.param)


def test_dev_and_prod_overlays_exist():
    assert {"dev", "prod"} <= {p.name for p in m.OVERLAYS}


def test_k8s_is_a_fresh_render_of_the_chart():
    render_k8s = m.load_script("render-k8s.py")
    assert render_k8s.diff(render_k8s.render()) == [], "run deploy/helm/render-k8s.py"


def test_overlay_validates_strictly(overlay):
    _, objects = overlay
    assert m.problems_schema(objects) == []


def test_overlay_properties(overlay):
    _, objects = overlay
    assert m.problems_all(objects) == []
    assert m.problems_network_policies(objects) == []


def test_overlay_migrates_before_serving(overlay):
    _, objects = overlay
    assert m.of_kind(objects, "Job") == []
    for deployment in m.of_kind(objects, "Deployment"):
        init = deployment["spec"]["template"]["spec"]["initContainers"]
        assert [c["args"][0] for c in init] == ["migrate"]


def test_overlay_ships_no_secret(overlay):
    """Secrets come from `parley-secrets`, which the operator creates (k8s/README.md)."""
    _, objects = overlay
    assert m.of_kind(objects, "Secret") == []
    for _, _, spec in m.workloads(objects):
        for c in m.containers(spec):
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["name"] == "parley-secrets"


def test_overlay_specifics(overlay):
    name, objects = overlay
    namespaces = {o["metadata"].get("namespace") for o in objects if o["kind"] != "Namespace"}
    replicas = m.expected_replicas(objects)
    if name == "dev":
        assert namespaces == {"parley-dev"}
        assert set(replicas.values()) == {1}
        assert {s["metadata"]["name"] for s in m.of_kind(objects, "StatefulSet")} == {
            "parley-postgresql",
            "parley-redis",
        }
        assert m.named(objects, "ConfigMap", "parley")["data"]["SECURE_SSL_REDIRECT"] == "false"
    if name == "prod":
        assert namespaces == {"parley"}
        assert len(m.of_kind(objects, "HorizontalPodAutoscaler")) == 3
        assert min(replicas.values()) >= 2
        assert m.of_kind(objects, "StatefulSet") == []
        for deployment in m.of_kind(objects, "Deployment"):
            assert "replicas" not in deployment["spec"]
    for ns in m.of_kind(objects, "Namespace"):
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
