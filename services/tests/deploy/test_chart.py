"""The Helm chart (deploy/helm/parley), rendered offline with helm-python-sdk (Helm's Go
SDK) with its defaults and every ci/*-values.yaml, linted, validated strictly against the
two newest Kubernetes versions kubernetes-validate knows, and checked for the properties
an ops team relies on. No Django, no cluster."""

from __future__ import annotations

import json
from urllib.parse import urlsplit

import pytest

from . import manifests as m

VALUE_SETS = [None, *m.CI_VALUES]
IDS = ["defaults", *(p.name.removesuffix("-values.yaml") for p in m.CI_VALUES)]


@pytest.fixture(scope="module", params=VALUE_SETS, ids=IDS)
def case(request):
    values = m.values_of(request.param)
    return values, m.render(values)


def test_ci_value_sets_cover_the_promised_cases():
    names = {p.name for p in m.CI_VALUES}
    assert {
        "minimal-values.yaml",
        "production-values.yaml",
        "ingress-values.yaml",
        "no-ingress-values.yaml",
        "gateway-values.yaml",
        "loadtest-values.yaml",
    } <= names


@pytest.mark.parametrize("values_file", VALUE_SETS, ids=IDS)
def test_lint_is_clean(values_file):
    import helm_python

    report = helm_python.lint(m.CHART, m.values_of(values_file), strict=True, namespace=m.NAMESPACE)
    serious = [msg for msg in report["messages"] if msg["severity"] >= 2]
    assert not report["errors"] and not serious, report


def test_objects_validate_strictly(case):
    _, objects = case
    assert m.problems_schema(objects) == []


def test_workloads_are_restricted_probed_spread_and_drained(case):
    _, objects = case
    assert m.problems_all(objects) == []


def test_network_policies_select_every_component(case):
    values, objects = case
    if values.get("networkPolicy", {}).get("enabled", True):
        assert m.problems_network_policies(objects) == []
    else:
        assert m.of_kind(objects, "NetworkPolicy") == []


def test_every_component_runs(case):
    _, objects = case
    components = {m.component(meta) for _, meta, _ in m.workloads(objects)}
    assert {"web", "realtime", "worker"} <= components
    for name, args in (("web", "web"), ("realtime", "realtime"), ("worker", "worker")):
        deployment = m.named(objects, "Deployment", f"parley-{name}")
        assert deployment["spec"]["template"]["spec"]["containers"][0]["args"][0] == args


def test_migrations_run_before_the_new_version_serves(case):
    values, objects = case
    jobs = [j for j in m.of_kind(objects, "Job") if m.component(j["metadata"]) == "migrate"]
    if values.get("migrations", {}).get("mode") == "initContainer":
        assert jobs == []
        for deployment in m.of_kind(objects, "Deployment"):
            init = deployment["spec"]["template"]["spec"].get("initContainers", [])
            assert [c["args"][0] for c in init] == ["migrate"], deployment["metadata"]["name"]
        return
    (job,) = jobs
    assert job["spec"]["template"]["spec"]["containers"][0]["args"][0] == "migrate"
    in_cluster_db = values.get("postgresql", {}).get("enabled", False)
    # The in-cluster Postgres only exists after install, so its first migration is post-install.
    first = "post-install" if in_cluster_db else "pre-install"
    assert m.hook(job) == {first, "pre-upgrade"}
    # What the hook's pod needs exists before it: hooks of the same phase, created earlier.
    weight = int(job["metadata"]["annotations"]["helm.sh/hook-weight"])
    pod = job["spec"]["template"]["spec"]
    needed = {("ServiceAccount", pod["serviceAccountName"])}
    for c in pod["containers"]:
        needed |= {
            ("ConfigMap", s["configMapRef"]["name"])
            for s in c.get("envFrom", [])
            if "configMapRef" in s
        }
        needed |= {
            ("Secret", v["valueFrom"]["secretKeyRef"]["name"])
            for v in c.get("env", [])
            if "secretKeyRef" in v.get("valueFrom", {})
        }
    existing = {
        ("Secret", n)
        for n in (
            values.get(k, {}).get("existingSecret")
            for k in ("secretKey", "externalDatabase", "externalRedis", "email")
        )
        if n
    }
    for kind, name in needed - existing:
        if kind == "ServiceAccount" and not values.get("serviceAccount", {}).get("create", True):
            continue
        obj = m.named(objects, kind, name)
        assert m.hook(obj) == m.hook(job), f"{kind}/{name} is not created before the hook runs"
        assert int(obj["metadata"]["annotations"]["helm.sh/hook-weight"]) < weight


def test_no_secret_carries_a_literal_default(case):
    """Generated secrets differ from one render to the next (kept across upgrades by
    `lookup`, which an offline render cannot reach); any value that does not is one the
    values file supplied."""
    values, first = case
    second = m.render(values)
    supplied = set()

    def collect(node):
        if isinstance(node, dict):
            for v in node.values():
                collect(v)
        elif isinstance(node, list):
            for v in node:
                collect(v)
            if all(isinstance(v, str) for v in node):
                supplied.add(",".join(node))
        elif isinstance(node, str):
            supplied.add(node)

    collect(values)
    for secret in m.of_kind(first, "Secret"):
        again = m.decoded(m.named(second, "Secret", secret["metadata"]["name"]))
        for key, value in m.decoded(secret).items():
            assert value != again[key] or value in supplied, f"{secret['metadata']['name']}.{key}"
            assert len(value) >= 32 or value in supplied, f"{key} is too short to be secret"


def test_generated_secrets_agree_within_one_render(case):
    """The hook's copy of the Secret and the pods' checksum see the same generated values."""
    _, objects = case
    secrets = {s["metadata"]["name"]: m.decoded(s) for s in m.of_kind(objects, "Secret")}
    if "parley-migrate" in secrets:
        for key, value in secrets["parley-migrate"].items():
            assert secrets["parley"][key] == value, key
    checksums = {
        meta["annotations"]["checksum/secret"]
        for obj, meta, _ in m.workloads(objects)
        if obj["kind"] == "Deployment"
    }
    assert len(checksums) == 1


SECRET_ENV = {
    "SECRET_KEY", "DATABASE_URL", "REDIS_URL", "EMAIL_URL", "CELERY_BROKER_URL",
    "CHANNEL_LAYER_URL", "CHANNEL_LAYER_SENTINEL_PASSWORD", "PGPASSWORD", "POSTGRES_PASSWORD",
    "REDIS_PASSWORD",
}  # fmt: skip


def test_secrets_are_referenced_not_inlined(case):
    """No container gets a secret as a literal value; every secretKeyRef names a Secret the
    chart renders or one the values say exists."""
    values, objects = case
    rendered = {s["metadata"]["name"]: m.decoded(s) for s in m.of_kind(objects, "Secret")}
    existing = set()

    def collect(node):
        if isinstance(node, dict):
            if node.get("existingSecret"):
                existing.add(node["existingSecret"])
            for v in node.values():
                collect(v)

    collect(values)
    for obj, _, spec in m.workloads(objects):
        for c in m.containers(spec):
            for var in c.get("env", []):
                if var["name"] not in SECRET_ENV:
                    continue
                where = f"{obj['metadata']['name']}: {var['name']}"
                if "value" in var:
                    # Only the in-cluster datastores' URLs are literal: the password comes
                    # from PGPASSWORD or a $(REDIS_PASSWORD) reference.
                    password = urlsplit(var["value"]).password
                    assert password is None or password.startswith("$("), where
                    continue
                ref = var["valueFrom"].get("secretKeyRef")
                assert ref, f"{where} is not from a Secret"
                if ref["name"] in rendered:
                    assert ref["key"] in rendered[ref["name"]], where
                else:
                    assert ref["name"] in existing, where


def test_config_is_production_mode(case):
    values, objects = case
    config = m.named(objects, "ConfigMap", "parley")["data"]
    assert config["DEBUG"] == "false"
    hosts = values.get("config", {}).get("hosts", ["parley.local"])
    assert config["PARLEY_PUBLIC_HOSTS"].split(",")[: len(hosts)] == hosts
    web = m.named(objects, "Deployment", "parley-web")["spec"]["template"]["spec"]["containers"][0]
    # Probes and scrapes address the pod by IP.
    assert m.env_value(web, "ALLOWED_HOSTS") == "$(PARLEY_PUBLIC_HOSTS),$(POD_IP)"
    env_names = [v["name"] for v in web["env"]]
    assert env_names.index("POD_IP") < env_names.index("ALLOWED_HOSTS")
    node_id = next(v for v in web["env"] if v["name"] == "PARLEY_NODE_ID")
    assert node_id["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_in_cluster_redis_never_evicts():
    objects = m.render(m.values_of(m.CHART / "ci" / "minimal-values.yaml"))
    redis = m.named(objects, "StatefulSet", "parley-redis")
    args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--appendonly") + 1] == "yes"
    for name in ("parley-redis", "parley-postgresql"):
        obj = m.named(objects, "StatefulSet", name)
        assert obj["metadata"]["annotations"]["parley.io/not-for-production"] == "true"


def test_in_cluster_datastores_are_off_by_default():
    objects = m.render()
    assert m.of_kind(objects, "StatefulSet") == []


def test_realtime_autoscales_on_connections_when_asked():
    default = m.render({"realtime": {"autoscaling": {"enabled": True}}})
    hpa = m.named(default, "HorizontalPodAutoscaler", "parley-realtime")
    assert [x["type"] for x in hpa["spec"]["metrics"]] == ["Resource"]
    assert "replicas" not in m.named(default, "Deployment", "parley-realtime")["spec"]

    objects = m.render(m.values_of(m.CHART / "ci" / "production-values.yaml"))
    hpa = m.named(objects, "HorizontalPodAutoscaler", "parley-realtime")
    pods = [x["pods"] for x in hpa["spec"]["metrics"] if x["type"] == "Pods"]
    assert pods == [
        {
            "metric": {"name": "parley_ws_connections"},
            "target": {"type": "AverageValue", "averageValue": "3000"},
        }
    ]
    # Scaling in drains sockets: slowly.
    assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] >= 300


def test_sentinel_and_sharded_layer_reach_the_app():
    production = m.render(m.values_of(m.CHART / "ci" / "production-values.yaml"))
    config = m.named(production, "ConfigMap", "parley")["data"]
    assert config["CELERY_BROKER_SENTINEL_MASTER"] == "parley-broker"
    assert config["CHANNEL_LAYER_SENTINEL_MASTER"] == "parley-layer"
    assert len(config["CHANNEL_LAYER_SENTINELS"].split(",")) == 3
    worker = m.named(production, "Deployment", "parley-worker")["spec"]["template"]["spec"][
        "containers"
    ][0]
    refs = {
        v["name"]: v["valueFrom"]["secretKeyRef"]
        for v in worker["env"]
        if "valueFrom" in v and "secretKeyRef" in v["valueFrom"]
    }
    assert refs["CELERY_BROKER_URL"] == {"name": "parley-redis", "key": "broker-url"}
    assert refs["CHANNEL_LAYER_SENTINEL_PASSWORD"] == {
        "name": "parley-redis",
        "key": "layer-password",
    }

    sharded = m.render(m.values_of(m.CHART / "ci" / "ingress-values.yaml"))
    layer = m.decoded(m.named(sharded, "Secret", "parley"))["channel-layer-url"]
    assert len(layer.split(",")) == 2


def test_realtime_grace_below_the_drain_is_refused():
    import helm_python

    with pytest.raises(helm_python.HelmError, match="terminationGracePeriodSeconds"):
        m.render({"realtime": {"terminationGracePeriodSeconds": 20}})
    grace = m.named(
        m.render({"realtime": {"drain": {"hardLimitSeconds": 40}}}), "Deployment", "parley-realtime"
    )
    assert grace["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 5 + 40 + 5


def test_schema_rejects_typos_and_wrong_types():
    import helm_python

    with pytest.raises(helm_python.HelmError, match="replicaCont"):
        m.render({"web": {"replicaCont": 3}})
    with pytest.raises(helm_python.HelmError):
        m.render({"migrations": {"mode": "sometimes"}})


def test_helm_test_pod_checks_readiness_and_a_websocket_round_trip():
    (pod,) = [p for p in m.of_kind(m.render(), "Pod") if m.hook(p) == {"test"}]
    container = pod["spec"]["containers"][0]
    script = container["args"][-1]
    assert container["args"][:2] == ["manage", "shell"]
    compile(script, "helm-test", "exec")
    assert '"ping"' in script and '"pong"' in script
    assert m.env_value(container, "TEST_WS_URL") == "ws://parley-realtime:8001/ws/chat/"
    urls = m.env_value(container, "TEST_READYZ_URLS").split()
    assert urls == ["http://parley-web:8000/readyz", "http://parley-realtime:8001/readyz"]


def test_notes_print_the_urls():
    notes = m.render_raw(m.values_of(m.CHART / "ci" / "ingress-values.yaml"))[
        "parley/templates/NOTES.txt"
    ]
    assert "https://chat.example.org/" in notes and "wss://chat.example.org/ws/chat/" in notes
    minimal = m.render_raw(m.values_of(m.CHART / "ci" / "minimal-values.yaml"))[
        "parley/templates/NOTES.txt"
    ]
    assert "NOT FOR PRODUCTION" in minimal


def test_readme_and_schema_are_generated_from_the_values():
    docs = m.load_script("chart-docs.py")
    files, problems = docs.render()
    assert problems == []
    for path, expected in files.items():
        assert path.read_text() == expected, f"{path} is out of date: run deploy/helm/chart-docs.py"
    schema = json.loads((m.CHART / "values.schema.json").read_text())
    assert schema["additionalProperties"] is False


def test_kubernetes_validate_cli_accepts_the_default_render(tmp_path):
    """The same check through the command line an operator would run."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    manifest = tmp_path / "parley.yaml"
    manifest.write_text(yaml.safe_dump_all(m.render()))
    cli = Path(sys.executable).with_name("kubernetes-validate")
    for version in m.kube_versions():
        result = subprocess.run(
            [str(cli), "--strict", "--quiet", "-k", version, str(manifest)],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stdout + result.stderr


# --- the load test (loadtest.*): Locust as Jobs ----------------------------------------


def _loadtest(objects: list[dict]) -> list[dict]:
    return [o for o in objects if m.component(o["metadata"]) == "loadtest"]


def _container(job: dict) -> dict:
    (container,) = job["spec"]["template"]["spec"]["containers"]
    return container


def _option(args: list[str], name: str) -> str:
    assert args.count(name) == 1, f"{name} in {args}"
    return args[args.index(name) + 1]


def _service_url(objects: list[dict], name: str, scheme: str, path: str = "") -> str:
    service = m.named(objects, "Service", name)
    return f"{scheme}://{name}:{service['spec']['ports'][0]['port']}{path}"


@pytest.fixture(scope="module")
def distributed():
    return m.render({"loadtest": {"enabled": True, "workers": 2}})


def test_load_test_is_off_by_default():
    objects = m.render()
    assert _loadtest(objects) == []
    assert not any("loadtest" in o["metadata"]["name"] for o in objects)
    for name in ("parley-web", "parley-realtime"):
        assert "loadtest" not in json.dumps(m.named(objects, "NetworkPolicy", name))


def test_distributed_load_test_validates_and_lints(distributed):
    import helm_python

    assert {(o["kind"], o["metadata"]["name"]) for o in _loadtest(distributed)} == {
        ("Job", "parley-loadtest-master"),
        ("Job", "parley-loadtest-worker"),
        ("Service", "parley-loadtest-master"),
        ("NetworkPolicy", "parley-loadtest"),
        ("NetworkPolicy", "parley-loadtest-master"),
    }
    assert m.problems_schema(distributed) == []
    assert m.problems_all(distributed) == []
    assert m.problems_network_policies(distributed) == []
    values = {"loadtest": {"enabled": True, "workers": 2}}
    report = helm_python.lint(m.CHART, values, strict=True, namespace=m.NAMESPACE)
    assert not report["errors"] and all(x["severity"] < 2 for x in report["messages"]), report


def test_load_test_master_runs_the_scenario_against_the_release(distributed):
    master = m.named(distributed, "Job", "parley-loadtest-master")
    args = _container(master)["args"]
    assert {"--master", "--headless"} <= set(args) and "--worker" not in args
    assert _option(args, "--expect-workers") == "2"
    assert _option(args, "--users") == "100"
    assert _option(args, "--spawn-rate") == "10"
    assert _option(args, "--run-time") == "5m"
    assert _option(args, "--scenario") == "chat"
    assert _option(args, "--locustfile") == "/app/loadtests/locustfile.py"
    # The chart's own Services, by their rendered names and ports.
    assert _option(args, "--host") == _service_url(distributed, "parley-web", "http")
    assert _option(args, "--ws-url") == _service_url(
        distributed, "parley-realtime", "ws", "/ws/chat/"
    )
    # TLS ends at the ingress (config.tls): without the header Django redirects to https.
    assert _option(args, "--http-header") == "X-Forwarded-Proto: https"
    # The figures land on the emptyDir, the only writable path.
    assert _option(args, "--csv").startswith("/tmp/")
    assert _option(args, "--results-dir").startswith("/tmp/")
    assert _container(master)["image"] == "parley-loadtest:0.1.0"
    assert master["spec"]["backoffLimit"] == 0
    assert master["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    assert not m.hook(master), "a load test is started by install/upgrade, not as a hook"
    assert "parallelism" not in master["spec"]


def test_load_test_workers_find_the_master_through_its_service(distributed):
    workers = m.named(distributed, "Job", "parley-loadtest-worker")
    master = m.named(distributed, "Job", "parley-loadtest-master")
    assert workers["spec"]["parallelism"] == workers["spec"]["completions"] == 2
    args = _container(workers)["args"]
    assert "--worker" in args and "--master" not in args and "--headless" not in args
    service = m.named(distributed, "Service", _option(args, "--master-host"))
    assert service["spec"]["clusterIP"] == "None"
    (port,) = service["spec"]["ports"]
    assert int(_option(args, "--master-port")) == port["port"] == 5557
    master_ports = {p["name"]: p["containerPort"] for p in _container(master)["ports"]}
    assert master_ports[port["targetPort"]] == 5557
    assert int(_option(_container(master)["args"], "--master-bind-port")) == 5557
    # The Service selects the master's pod and not the workers'.
    selector = service["spec"]["selector"]
    assert m.selects({"matchLabels": selector}, m.pod_spec(master)[0]["labels"])
    assert not m.selects({"matchLabels": selector}, m.pod_spec(workers)[0]["labels"])


def test_load_test_pods_are_restricted(distributed):
    jobs = [o for o in _loadtest(distributed) if o["kind"] == "Job"]
    assert len(jobs) == 2
    assert m.problems_pod_security(jobs + m.of_kind(distributed, "ServiceAccount")) == []
    for job in jobs:
        spec = job["spec"]["template"]["spec"]
        security = {**spec["securityContext"], **_container(job)["securityContext"]}
        assert security["runAsUser"] == 10001 and security["runAsNonRoot"] is True
        assert spec["automountServiceAccountToken"] is False
        # No Parley setting or secret reaches the load generator.
        assert "env" not in _container(job) and "envFrom" not in _container(job)


def test_load_test_network_policies_admit_it_and_only_it(distributed):
    master = m.named(distributed, "Job", "parley-loadtest-master")
    workers = m.named(distributed, "Job", "parley-loadtest-worker")
    web = m.named(distributed, "Deployment", "parley-web")
    realtime = m.named(distributed, "Deployment", "parley-realtime")
    for pod in (master, workers):
        assert m.reachable(distributed, pod, web, 8000)
        assert m.reachable(distributed, pod, realtime, 8001)
    assert m.reachable(distributed, workers, master, 5557)
    # ... and nothing more: Parley's own pods cannot reach the master, the master does
    # not call its workers, and the load test reaches no other port of web.
    assert not m.reachable(distributed, web, master, 5557)
    assert not m.reachable(distributed, master, workers, 5557)
    assert not m.reachable(distributed, workers, web, 9808)
    # Without the load test, nothing of it is admitted (the policies check the labels).
    default = m.render()
    assert not m.reachable(default, workers, m.named(default, "Deployment", "parley-web"), 8000)


def test_standalone_load_test_is_one_job_without_a_service():
    objects = m.render({"loadtest": {"enabled": True, "workers": 0, "users": 20}})
    loadtest = _loadtest(objects)
    assert {(o["kind"], o["metadata"]["name"]) for o in loadtest} == {
        ("Job", "parley-loadtest"),
        ("NetworkPolicy", "parley-loadtest"),
    }
    job = m.named(objects, "Job", "parley-loadtest")
    args = _container(job)["args"]
    assert "--headless" in args and not {"--master", "--worker", "--expect-workers"} & set(args)
    assert _option(args, "--users") == "20"
    assert "parallelism" not in job["spec"] and "ports" not in _container(job)
    assert m.reachable(objects, job, m.named(objects, "Deployment", "parley-web"), 8000)
    assert m.reachable(objects, job, m.named(objects, "Deployment", "parley-realtime"), 8001)
    assert m.problems_schema(objects) == [] and m.problems_all(objects) == []


def test_load_test_against_an_external_url_needs_its_port_opened():
    cidr = "203.0.113.10/32"
    values = {
        "config": {"tls": False},
        "loadtest": {
            "enabled": True,
            "workers": 3,
            "host": "https://chat.example.com",
            "networkPolicy": {"to": [{"ipBlock": {"cidr": cidr}}]},
            "usersFile": {"existingSecret": "lt-users"},
        },
    }
    objects = m.render(values)
    master = m.named(objects, "Job", "parley-loadtest-master")
    args = _container(master)["args"]
    assert _option(args, "--host") == "https://chat.example.com"
    # The locustfile derives wss://chat.example.com/ws/chat/ from the host.
    assert "--ws-url" not in args and "--http-header" not in args
    egress = m.named(objects, "NetworkPolicy", "parley-loadtest")["spec"]["egress"]
    opened = {"ports": [{"port": 443, "protocol": "TCP"}], "to": [{"ipBlock": {"cidr": cidr}}]}
    assert opened in egress
    # Every pod reads the users file at the path the master names.
    path = _option(args, "--users-file")
    for name in ("parley-loadtest-master", "parley-loadtest-worker"):
        spec = m.named(objects, "Job", name)["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        (mount,) = [v for v in container["volumeMounts"] if v["name"] == "users"]
        assert path.startswith(mount["mountPath"] + "/") and mount["readOnly"] is True
        (volume,) = [v for v in spec["volumes"] if v["name"] == "users"]
        assert volume["secret"]["secretName"] == "lt-users"
    assert m.problems_schema(objects) == []


def test_load_test_values_are_checked():
    import helm_python

    for bad in (
        {"scenario": "soak"},
        {"duration": "five minutes"},
        {"workers": -1},
        {"host": "chat.example.com"},
    ):
        with pytest.raises(helm_python.HelmError):
            m.render({"loadtest": {"enabled": True, **bad}})
