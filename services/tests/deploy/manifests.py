"""Rendering the Helm chart and the kustomize overlays, strict schema validation, and the
properties every Parley deployment must have, shared by the chart and k8s/ tests.

Each `problems_*` function returns a list of human-readable problems (empty: fine), so a
failing test names every offending object at once.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[3]
CHART = REPO / "deploy" / "helm" / "parley"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
OVERLAYS = sorted(p for p in (REPO / "k8s" / "overlays").iterdir() if p.is_dir())
RELEASE = "parley"
NAMESPACE = "chat"

APP_COMPONENTS = {"web", "realtime", "worker", "migrate", "test"}
SERVING = {"web": 8000, "realtime": 8001}
# Custom resources: kubernetes-validate has no schema for them.
CRDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
}
WORKLOADS = {"Deployment", "StatefulSet", "Job", "Pod"}


def load_script(name: str):
    """A script under deploy/helm/ (its file name has a dash) as a module."""
    path = REPO / "deploy" / "helm" / name
    spec = importlib.util.spec_from_file_location(name.replace("-", "_").removesuffix(".py"), path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


# --- rendering -----------------------------------------------------------------------


def values_of(path: Path | None) -> dict:
    return (yaml.safe_load(path.read_text()) or {}) if path else {}


@functools.cache
def _chart():
    import helm_python

    return helm_python.Chart.load(CHART)


def render_raw(values: dict | None = None) -> dict[str, str]:
    return _chart().render(values or {}, name=RELEASE, namespace=NAMESPACE)


def render(values: dict | None = None) -> list[dict]:
    """The chart's objects (hooks and test pods included), NOTES.txt left out."""
    objects: list[dict] = []
    for path, text in sorted(render_raw(values).items()):
        if not path.endswith("NOTES.txt"):
            objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def kustomize(overlay: Path) -> list[dict]:
    out = subprocess.run(
        ["kubectl", "kustomize", str(overlay)], capture_output=True, text=True, check=True
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


# --- schema validation ---------------------------------------------------------------


@functools.cache
def kube_versions() -> tuple[str, str]:
    """The two newest Kubernetes minor versions kubernetes-validate has schemas for."""
    from kubernetes_validate.utils import all_versions
    from packaging.version import Version

    newest = sorted({Version(v) for v in all_versions()})[-2:]
    return tuple(f"{v.major}.{v.minor}.{v.micro}" for v in newest)


def problems_schema(objects: Iterable[dict]) -> list[str]:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    problems = []
    for obj in objects:
        name = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        if (obj.get("apiVersion"), obj.get("kind")) in CRDS:
            if not obj.get("metadata", {}).get("name") or not isinstance(obj.get("spec"), dict):
                problems.append(f"{name}: custom resource without name or spec")
            continue
        for version in kube_versions():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                problems.append(f"{name} (Kubernetes {version}): {path}: {exc.message}")
            except SchemaNotFoundError as exc:
                problems.append(f"{name}: {exc.message}")
    return problems


# --- reading objects -----------------------------------------------------------------


def of_kind(objects: Iterable[dict], kind: str) -> list[dict]:
    return [o for o in objects if o["kind"] == kind]


def named(objects: Iterable[dict], kind: str, name: str) -> dict:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(obj: dict) -> tuple[dict, dict]:
    """(pod metadata, pod spec) of a workload."""
    if obj["kind"] == "Pod":
        return obj["metadata"], obj["spec"]
    template = obj["spec"]["template"]
    return template.get("metadata", {}), template["spec"]


def workloads(objects: Iterable[dict]) -> Iterator[tuple[dict, dict, dict]]:
    """(object, pod metadata, pod spec) for every object that makes pods."""
    for obj in objects:
        if obj["kind"] in WORKLOADS:
            meta, spec = pod_spec(obj)
            yield obj, meta, spec


def component(meta: dict) -> str:
    return meta.get("labels", {}).get("app.kubernetes.io/component", "")


def containers(spec: dict, *, init: bool = True) -> list[dict]:
    return spec.get("containers", []) + (spec.get("initContainers", []) if init else [])


def env_value(container: dict, name: str) -> str | None:
    for var in container.get("env", []):
        if var["name"] == name:
            return var.get("value")
    return None


def selects(selector: dict, labels: dict) -> bool:
    """Whether a LabelSelector matches labels (matchLabels and matchExpressions)."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, vals = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in vals:
            return False
        if op == "NotIn" and labels.get(key) in vals:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def hook(obj: dict) -> set[str]:
    value = obj["metadata"].get("annotations", {}).get("helm.sh/hook", "")
    return {h.strip() for h in value.split(",") if h.strip()}


def decoded(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    return {**data, **(secret.get("stringData") or {})}


# --- properties ----------------------------------------------------------------------


def problems_pod_security(objects: list[dict]) -> list[str]:
    """Pod Security Standard "restricted", read-only root, /tmp on an emptyDir, no token."""
    problems = []
    accounts = {o["metadata"]["name"]: o for o in of_kind(objects, "ServiceAccount")}
    for obj, meta, spec in workloads(objects):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        pod_sc = spec.get("securityContext") or {}
        account = accounts.get(spec.get("serviceAccountName", "default"), {})
        if (
            spec.get("automountServiceAccountToken", account.get("automountServiceAccountToken"))
            is not False
        ):
            problems.append(f"{where}: mounts a service account token")
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            if spec.get(flag):
                problems.append(f"{where}: {flag}")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in containers(spec):
            at = f"{where} container {c['name']}"
            sc = c.get("securityContext") or {}
            merged = {**pod_sc, **sc}
            if merged.get("runAsNonRoot") is not True:
                problems.append(f"{at}: runAsNonRoot is not true")
            if merged.get("runAsUser", 0) == 0:
                problems.append(f"{at}: may run as root (runAsUser)")
            if component(meta) in APP_COMPONENTS and merged.get("runAsUser") != 10001:
                problems.append(f"{at}: Parley runs as uid 10001, not {merged.get('runAsUser')}")
            if sc.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{at}: allowPrivilegeEscalation is not false")
            if sc.get("privileged"):
                problems.append(f"{at}: privileged")
            if sc.get("readOnlyRootFilesystem") is not True:
                problems.append(f"{at}: root filesystem is writable")
            caps = sc.get("capabilities") or {}
            if "ALL" not in (caps.get("drop") or []) or caps.get("add"):
                problems.append(f"{at}: capabilities are not all dropped")
            if (merged.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{at}: seccompProfile is not RuntimeDefault")
            tmp = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            if not tmp or "emptyDir" not in volumes.get(tmp[0]["name"], {}):
                problems.append(f"{at}: no emptyDir at /tmp")
    return problems


def problems_probes_and_resources(objects: list[dict]) -> list[str]:
    """Long-running containers have startup, liveness and readiness probes; every container
    has requests and limits; HTTP probes name a port the container declares."""
    problems = []
    for obj, _meta, spec in workloads(objects):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        for c in containers(spec):
            at = f"{where} container {c['name']}"
            resources = c.get("resources") or {}
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(resources.get(part) or {}):
                    problems.append(f"{at}: no cpu and memory {part}")
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for c in containers(spec, init=False):
            at = f"{where} container {c['name']}"
            ports = {p.get("name") for p in c.get("ports", [])} | {
                p["containerPort"] for p in c.get("ports", [])
            }
            for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                handler = c.get(probe)
                if not handler:
                    problems.append(f"{at}: no {probe}")
                elif "httpGet" in handler and handler["httpGet"]["port"] not in ports:
                    problems.append(
                        f"{at}: {probe} targets undeclared port {handler['httpGet']['port']}"
                    )
    return problems


def expected_replicas(objects: list[dict]) -> dict[str, int]:
    """Deployment name -> replicas it runs at least (HPA minReplicas when autoscaled)."""
    replicas = {
        d["metadata"]["name"]: d["spec"].get("replicas", 1) for d in of_kind(objects, "Deployment")
    }
    for hpa in of_kind(objects, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]["name"]
        if target in replicas:
            replicas[target] = hpa["spec"].get("minReplicas", 1)
    return replicas


def problems_pdb(objects: list[dict]) -> list[str]:
    problems = []
    pdbs = of_kind(objects, "PodDisruptionBudget")
    minimum = expected_replicas(objects)
    for deployment in of_kind(objects, "Deployment"):
        name = deployment["metadata"]["name"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        if minimum[name] > 1 and not any(selects(p["spec"]["selector"], labels) for p in pdbs):
            problems.append(
                f"Deployment/{name} runs {minimum[name]} replicas without a PodDisruptionBudget"
            )
    for pdb in pdbs:
        if (
            pdb["spec"].get("minAvailable") not in (None, 0)
            and pdb["spec"].get("maxUnavailable") is None
        ):
            problems.append(
                f"PodDisruptionBudget/{pdb['metadata']['name']}: minAvailable can block node drains"
            )
    return problems


def _allows(rules: list[dict], port) -> bool:
    return any(
        not rule.get("ports") or any(p.get("port") in port for p in rule["ports"]) for rule in rules
    )


def problems_network_policies(objects: list[dict]) -> list[str]:
    """Default deny (ingress and egress) for every pod; DNS for every pod; web and realtime
    reachable on their port; Postgres/Redis egress for Parley's pods only; SMTP for the
    worker only; an in-cluster Postgres/Redis reachable from Parley's pods only."""
    policies = of_kind(objects, "NetworkPolicy")
    problems = []
    for obj, meta, _spec in workloads(objects):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        labels = meta.get("labels", {})
        mine = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        deny = [
            p for p in mine
            if {"Ingress", "Egress"} <= set(p["spec"].get("policyTypes", []))
            and not p["spec"].get("ingress") and not p["spec"].get("egress")
        ]  # fmt: skip
        if not deny:
            problems.append(f"{where}: no default-deny NetworkPolicy selects it")
        egress = [r for p in mine for r in p["spec"].get("egress") or []]
        ingress = [r for p in mine for r in p["spec"].get("ingress") or []]
        if not _allows([r for r in egress if r.get("to")], {53}):
            problems.append(f"{where}: no DNS egress")
        comp = component(meta)
        if comp in APP_COMPONENTS and not _allows(egress, {5432}):
            problems.append(f"{where}: cannot reach Postgres")
        if comp in {"web", "realtime", "worker"} and not _allows(egress, {6379}):
            problems.append(f"{where}: cannot reach Redis")
        if comp not in APP_COMPONENTS and _allows(egress, {5432, 6379}):
            problems.append(f"{where}: is not Parley but may reach Postgres or Redis")
        if comp == "worker" and not _allows(egress, {25, 465, 587}):
            problems.append(f"{where}: the worker cannot send email")
        if comp in {"web", "realtime", "migrate"} and _allows(egress, {25, 465, 587}):
            problems.append(f"{where}: only the worker may reach SMTP")
        if comp in SERVING and not _allows(ingress, {SERVING[comp], "http"}):
            problems.append(f"{where}: nothing may reach its port")
        if comp in {"postgresql", "redis"}:
            sources = [peer for rule in ingress for peer in rule.get("from", [])]
            for peer in sources:
                allowed = {c for c in APP_COMPONENTS}
                expr = (peer.get("podSelector") or {}).get("matchExpressions") or []
                if "namespaceSelector" in peer or "ipBlock" in peer or not expr:
                    problems.append(f"{where}: reachable from outside Parley: {peer}")
                elif not set(expr[0]["values"]) <= allowed:
                    problems.append(f"{where}: reachable from {expr[0]['values']}")
    return problems


def _peer_selects(peer: dict, labels: dict) -> bool:
    """Whether a NetworkPolicy peer admits a pod of the release's namespace."""
    if "ipBlock" in peer or "namespaceSelector" in peer:
        return False  # other namespaces or addresses: not the release's own pods
    return selects(peer.get("podSelector") or {}, labels)


def _port_matches(rule: dict, port: int, named: dict[str, int]) -> bool:
    if not rule.get("ports"):
        return True
    return any(
        (named.get(p["port"]) if isinstance(p.get("port"), str) else p.get("port")) == port
        for p in rule["ports"]
    )


def reachable(objects: list[dict], source: dict, target: dict, port: int) -> bool:
    """Whether the NetworkPolicies let a pod of workload `source` open a TCP connection to
    a pod of workload `target` on `port`: egress allowed on the source's side and ingress
    on the target's (a side no Egress/Ingress policy selects is open)."""
    policies = of_kind(objects, "NetworkPolicy")
    src_labels = pod_spec(source)[0].get("labels", {})
    dst_meta, dst_spec = pod_spec(target)
    dst_labels = dst_meta.get("labels", {})
    named = {
        p["name"]: p["containerPort"] for c in containers(dst_spec) for p in c.get("ports", [])
    }
    if port not in named.values():
        return False  # nothing listens there

    def side(labels: dict, kind: str, key: str, peers: str, other: dict) -> bool:
        mine = [
            p for p in policies
            if selects(p["spec"]["podSelector"], labels)
            and kind in p["spec"].get("policyTypes", [])
        ]  # fmt: skip
        if not mine:
            return True
        return any(
            _port_matches(rule, port, named)
            and (peers not in rule or any(_peer_selects(peer, other) for peer in rule[peers]))
            for p in mine
            for rule in p["spec"].get(key) or []
        )

    return side(src_labels, "Egress", "egress", "to", dst_labels) and side(
        dst_labels, "Ingress", "ingress", "from", src_labels
    )


def problems_drain(objects: list[dict]) -> list[str]:
    """The kubelet's SIGKILL must come after preStop + the app's own shutdown window."""
    problems = []
    for deployment in of_kind(objects, "Deployment"):
        spec = deployment["spec"]["template"]["spec"]
        comp = component(deployment["metadata"])
        container = spec["containers"][0]
        grace = spec.get("terminationGracePeriodSeconds", 30)
        pre_stop = (
            ((container.get("lifecycle") or {}).get("preStop") or {})
            .get("sleep", {})
            .get("seconds", 0)
        )
        if comp == "realtime":
            drain = int(env_value(container, "REALTIME_DRAIN_SECONDS") or 10)
            hard = int(env_value(container, "REALTIME_GRACE_SECONDS") or 25)
            if pre_stop < 3:
                problems.append(
                    f"realtime: preStop sleep {pre_stop}s is shorter than endpoint propagation"
                )
            if hard < drain:
                problems.append(f"realtime: hard limit {hard}s < drain {drain}s")
            shutdown = max(drain, hard)
            if grace <= pre_stop + shutdown:
                problems.append(f"realtime: grace {grace}s <= preStop {pre_stop}s + {shutdown}s")
        if comp == "worker" and grace <= 60:
            problems.append(f"worker: grace {grace}s <= the longest task's hard time limit (60 s)")
        if comp == "web":
            graceful = int(env_value(container, "WEB_GRACEFUL_TIMEOUT") or 20)
            if grace <= pre_stop + graceful:
                problems.append(
                    f"web: grace {grace}s <= preStop {pre_stop}s + gunicorn {graceful}s"
                )
    return problems


def problems_labels(objects: list[dict]) -> list[str]:
    problems = []
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/part-of",
        ):
            if key not in labels and obj["kind"] != "Namespace":
                problems.append(f"{obj['kind']}/{obj['metadata']['name']}: no {key} label")
    for obj, meta, spec in workloads(objects):
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if not component(meta):
            problems.append(f"{where}: pods without app.kubernetes.io/component")
        if obj["kind"] == "Deployment":
            if "checksum/config" not in (meta.get("annotations") or {}):
                problems.append(f"{where}: no checksum/config annotation")
            keys = {c["topologyKey"] for c in spec.get("topologySpreadConstraints", [])}
            if not {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= keys:
                problems.append(f"{where}: not spread across nodes and zones")
    return problems


def problems_routing(objects: list[dict]) -> list[str]:
    """/ws/ goes to realtime, the rest to web, on every host."""
    problems = []
    for ingress in of_kind(objects, "Ingress"):
        for rule in ingress["spec"]["rules"]:
            paths = {p["path"]: p["backend"]["service"]["name"] for p in rule["http"]["paths"]}
            if not paths.get("/ws/", "").endswith("-realtime") or not paths.get("/", "").endswith(
                "-web"
            ):
                problems.append(f"Ingress {rule.get('host')}: routes {paths}")
        annotations = ingress["metadata"].get("annotations") or {}
        for key in ("proxy-read-timeout", "proxy-send-timeout"):
            if int(annotations.get(f"nginx.ingress.kubernetes.io/{key}", 60)) < 3600:
                problems.append(f"Ingress: ingress-nginx {key} would cut idle WebSockets")
    for route in [o for o in objects if o["kind"] == "HTTPRoute"]:
        paths = {
            r["matches"][0]["path"]["value"]: r["backendRefs"][0]["name"]
            for r in route["spec"]["rules"]
        }
        if not paths.get("/ws/", "").endswith("-realtime") or not paths.get("/", "").endswith(
            "-web"
        ):
            problems.append(f"HTTPRoute: routes {paths}")
    return problems


def problems_all(objects: list[dict]) -> list[str]:
    return (
        problems_pod_security(objects)
        + problems_probes_and_resources(objects)
        + problems_pdb(objects)
        + problems_drain(objects)
        + problems_labels(objects)
        + problems_routing(objects)
    )
