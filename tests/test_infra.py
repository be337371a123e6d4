"""infra/: manifests validate without a cluster (Kubernetes' schemas, KubeRay's CRD schemas,
Ray's own), names and GPU counts agree across files and docs, and the defaults are safe
(localhost binds or authentication, no credentials in files)."""

import configparser
import copy
import importlib
import importlib.util
import json
import re
import shlex
from functools import cache
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
CRD_SCHEMAS = ROOT / "tests" / "fixtures" / "kuberay"
KUBERNETES_VERSION = "1.30"  # the oldest still in common use; newer ones accept these too
# The ports of the head Service KubeRay makes for a RayCluster NAME, NAME-head-svc
# (ray-operator/controllers/ray/utils/constant.go: GCS, dashboard, client, metrics).
HEAD_SERVICE_PORTS = {6379, 8265, 10001, 8080}


def load(name: str):
    return yaml.safe_load((INFRA / name).read_text())


def k8s_files() -> list[str]:
    return sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@cache
def k8s_objects() -> tuple[dict, ...]:
    """Every object of infra/k8s/ (what `kubectl apply -k infra/k8s` applies)."""
    return tuple(d for f in k8s_files() for d in yaml.safe_load_all((K8S / f).read_text()) if d)


def of_kind(kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == kind}


def pod_specs() -> list[dict]:
    """The pod specs of every workload here and of the KubeRay manifests."""
    specs = [
        o["spec"]["template"]["spec"] for o in k8s_objects() if "template" in o.get("spec", {})
    ]
    cluster, job = load("kuberay/raycluster.yaml"), load("kuberay/rayjob-sweep.yaml")
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        specs += [g["template"]["spec"] for g in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]]
    return specs


def container_env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_ray_up_config_passes_rays_own_schema():
    from ray.autoscaler._private.commands import prepare_config
    from ray.autoscaler._private.util import validate_config

    config = load("ray/cluster.yaml")
    validate_config(prepare_config(config))  # what `ray up` checks; raises on a violation
    gpu = config["available_node_types"]["gpu_worker"]["node_config"]["InstanceType"]
    assert gpu.startswith("p4d") and "--dashboard-host=127.0.0.1" in " ".join(
        config["head_start_ray_commands"]
    )


def test_kuberay_manifests_are_well_formed():
    cluster, job = load("kuberay/raycluster.yaml"), load("kuberay/rayjob-sweep.yaml")
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    # The dashboard takes jobs (runs code): on the RayCluster it stays on the pod's loopback; a
    # RayJob's operator reads it through the head Service, and a NetworkPolicy guards it there.
    assert cluster["spec"]["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    policy = of_kind("NetworkPolicy")["ray-head"]["spec"]
    assert policy["podSelector"]["matchLabels"] == {"ray.io/node-type": "head"}
    assert all(rule["from"] for rule in policy["ingress"])  # no rule admits everyone
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        gpu = next(g for g in spec["workerGroupSpecs"] if g["groupName"] == "gpu")
        (container,) = gpu["template"]["spec"]["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        assert container["image"].startswith("imf-pipeline")
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            mounts = group["template"]["spec"]["containers"][0]["volumeMounts"]
            assert any(m["mountPath"] == "/artifacts" for m in mounts)  # storage all nodes reach
    assert job["spec"]["entrypoint"].startswith("imf sweep table2_sizes --scale paper")


def test_prefect_deployments_point_at_real_flows():
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    config = load("prefect.yaml")
    pools = set()
    for deployment in config["deployments"]:
        # module paths: the image installs the package and holds no source tree
        flow = load_flow_from_entrypoint(deployment["entrypoint"], use_placeholder_flow=False)
        assert isinstance(flow, Flow), deployment["entrypoint"]
        assert set(deployment.get("parameters", {})) <= set(flow.parameters.properties)
        pools.add(deployment["work_pool"]["name"])
    assert pools == {"imf-cpu", "imf-gpu"}
    (nightly,) = [d for d in config["deployments"] if d.get("schedules")]
    assert nightly["schedules"][0]["cron"] == "0 2 * * *"


def test_services_bind_to_localhost_or_authenticate_and_hold_no_credentials():
    compose = load("docker-compose.yml")
    assert {"postgres", "minio", "mlflow", "prefect"} <= set(compose["services"])
    shared = set()
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert port.startswith(("127.0.0.1:", "${IMF_BIND:-127.0.0.1}:")), port
            if not port.startswith("127.0.0.1:"):
                shared.add(name)
    assert shared == {"mlflow", "prefect"}  # what cluster nodes need; MLflow proxies MinIO
    # Reachable beyond localhost means authenticated, with credentials from the environment.
    mlflow, prefect = compose["services"]["mlflow"], compose["services"]["prefect"]
    assert "--app-name basic-auth" in " ".join(mlflow["command"])
    for key in ("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_AUTH_ADMIN_PASSWORD"):
        assert mlflow["environment"][key].startswith("${MLFLOW_TRACKING_"), key
    assert prefect["environment"]["PREFECT_SERVER_API_AUTH_STRING"].startswith(
        "${PREFECT_API_AUTH_STRING:?"
    )
    auth = configparser.ConfigParser()
    auth.read_string(compose["configs"]["mlflow-auth"]["content"])
    assert auth["mlflow"]["database_uri"] == auth_config()["mlflow"]["database_uri"]
    text = "\n".join(p.read_text() for p in INFRA.rglob("*") if p.is_file())
    secret = r"(?<![{$\w])([A-Z_]*(?:PASSWORD|SECRET|ACCESS_KEY)[A-Z_]*)\s*[:=]\s*(\S+)"
    matches = list(re.finditer(secret, text))
    assert len(matches) >= 4  # the compose file's secrets are all seen ...
    for match in matches:
        assert match.group(2).startswith("${"), match.group(0)  # ... and come from the environment


# ---------------------------------------------------------------------------------------------
# Schemas: Kubernetes' (kubernetes-validate, bundled, offline) and KubeRay's CRDs (kept here)
# ---------------------------------------------------------------------------------------------


def strict(schema):
    """A CRD schema that refuses unknown fields: the API server silently prunes them, so a
    misspelt field would be dropped, not reported (the idea of kubeconform's --strict)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if (
        "properties" in schema
        and "additionalProperties" not in schema
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@cache
def crd_validator(kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((CRD_SCHEMAS / f"ray.io_{kind.lower()}s.v1.json").read_text())
    return jsonschema.Draft202012Validator(strict(schema))


def schema_errors(obj: dict) -> list[str]:
    """What the Kubernetes (or, for ray.io, KubeRay's) schema finds wrong with obj."""
    if obj["apiVersion"] == "ray.io/v1":
        return [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(obj["kind"]).iter_errors(obj)
        ]
    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        return [f"{'/'.join(map(str, e.path))}: {e.message}"]
    return []


def test_kustomization_applies_every_manifest_here():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == k8s_files()


@pytest.mark.parametrize(
    "name",
    [*(f"k8s/{f}" for f in k8s_files()), "kuberay/raycluster.yaml", "kuberay/rayjob-sweep.yaml"],
)
def test_manifest_passes_the_kubernetes_and_kuberay_schemas(name):
    for obj in yaml.safe_load_all((INFRA / name).read_text()):
        assert schema_errors(obj) == [], f"{obj['kind']}/{obj['metadata']['name']}"


def with_typo(obj: dict, path: str, typo: str) -> dict:
    """obj with the key at a dotted path (list indices as numbers) renamed to typo."""
    obj = copy.deepcopy(obj)
    *parents, key = [int(k) if k.isdigit() else k for k in path.split(".")]
    parent = obj
    for k in parents:
        parent = parent[k]
    parent[typo] = parent.pop(key)
    return obj


@pytest.mark.parametrize(
    "obj, path, typo",
    [
        (
            lambda: of_kind("Deployment")["mlflow"],
            "spec.template.spec.containers.0.readinessProbe",
            "readinesProbe",
        ),
        (
            lambda: of_kind("StatefulSet")["postgres"],
            "spec.volumeClaimTemplates",
            "volumeClaimTemplate",
        ),
        (
            lambda: load("kuberay/raycluster.yaml"),
            "spec.enableInTreeAutoscaling",
            "enableInTreeAutoScaling",
        ),
        # a pod template inside a RayJob: KubeRay's CRD embeds Kubernetes' pod schema
        (
            lambda: load("kuberay/rayjob-sweep.yaml"),
            "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.envFrom",
            "envfrom",
        ),
    ],
    ids=["Deployment", "StatefulSet", "RayCluster", "RayJob-pod"],
)
def test_schema_check_catches_a_misspelt_field(obj, path, typo):
    obj = obj()
    assert schema_errors(obj) == []
    errors = schema_errors(with_typo(obj, path, typo))
    assert len(errors) == 1 and repr(typo) in errors[0], errors


# ---------------------------------------------------------------------------------------------
# Names that must agree: Services, Secrets, ConfigMaps, volumes, work pools, docs
# ---------------------------------------------------------------------------------------------


def services() -> dict[str, set[int]]:
    """Every Service name in the manifests with its ports, KubeRay's head Service included."""
    found = {n: {p["port"] for p in s["spec"]["ports"]} for n, s in of_kind("Service").items()}
    found[load("kuberay/raycluster.yaml")["metadata"]["name"] + "-head-svc"] = HEAD_SERVICE_PORTS
    return found


def documented_secrets() -> dict[str, set[str]]:
    """The keys of each `kubectl create secret generic NAME --from-literal=KEY=...` in the
    README (the only place the Secrets' format is written)."""
    text = (K8S / "README.md").read_text().replace("\\\n", " ")
    return {
        m.group(1): set(re.findall(r"--from-literal=(\w+)=", m.group(2)))
        for m in re.finditer(r"kubectl create secret generic ([\w-]+)(.*)", text)
    }


def references(kind: str) -> set[tuple[str, str | None]]:
    """(name, key) of every reference to a Secret or ConfigMap in the pod specs (key None for
    a whole one taken with envFrom or mounted)."""
    ref, key_ref = {
        "Secret": ("secretRef", "secretKeyRef"),
        "ConfigMap": ("configMapRef", "configMapKeyRef"),
    }[kind]
    found = set()
    for spec in pod_specs():
        for c in spec["containers"]:
            found |= {(e[ref]["name"], None) for e in c.get("envFrom", []) if ref in e}
            for e in c.get("env", []):
                if key_ref in e.get("valueFrom", {}):
                    found.add((e["valueFrom"][key_ref]["name"], e["valueFrom"][key_ref]["key"]))
        if kind == "ConfigMap":
            found |= {
                (v["configMap"]["name"], None) for v in spec.get("volumes", []) if "configMap" in v
            }
            found |= {
                (v["configMap"]["name"], i["key"])
                for v in spec.get("volumes", [])
                for i in v.get("configMap", {}).get("items", [])
            }
    return found


def test_every_secret_configmap_and_volume_used_is_defined():
    secrets = documented_secrets()
    assert set(secrets) == {"imf-server", "imf-tracking"}
    used = references("Secret")
    assert {name for name, _ in used} == set(secrets)
    for name, keys in secrets.items():
        assert {k for n, k in used if n == name and k} <= keys, name
    # Clients take imf-tracking whole; the server-side keys stay out of it.
    assert secrets["imf-tracking"] == {
        "MLFLOW_TRACKING_USERNAME",
        "MLFLOW_TRACKING_PASSWORD",
        "PREFECT_API_AUTH_STRING",
    }
    assert {k for n, k in used if n == "imf-server"} == secrets["imf-server"]
    config_maps = of_kind("ConfigMap")
    for name, key in references("ConfigMap"):
        assert name in config_maps and (key is None or key in config_maps[name]["data"]), (
            name,
            key,
        )
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for s in pod_specs()
        for v in s.get("volumes", [])
        if "persistentVolumeClaim" in v
    }
    pvcs = of_kind("PersistentVolumeClaim")
    assert claims == set(pvcs) == {"imf-artifacts"}
    assert pvcs["imf-artifacts"]["spec"]["accessModes"] == ["ReadWriteMany"]  # every node mounts it


def test_every_pod_of_the_pipeline_reaches_the_services_and_the_artifacts():
    for spec in pod_specs():
        for c in spec["containers"]:
            if not c["image"].startswith("imf-pipeline") or c.get("command", [])[:2] in (
                ["mlflow", "server"],
                ["prefect", "server"],
            ):
                continue  # only the clients: Ray nodes and Prefect workers
            assert {"configMapRef": {"name": "imf-services"}} in c["envFrom"], c["name"]
            assert {"secretRef": {"name": "imf-tracking"}} in c["envFrom"], c["name"]
            assert any(m["mountPath"] == "/artifacts" for m in c["volumeMounts"]), c["name"]
    clients = of_kind("ConfigMap")["imf-services"]["data"]
    for url in (clients["MLFLOW_TRACKING_URI"], clients["PREFECT_API_URL"]):
        host, port = urlsplit(url).hostname, urlsplit(url).port
        assert port in services()[host], url
    assert clients["PREFECT_API_URL"].endswith("/api")


def test_a_prefect_worker_for_each_work_pool():
    pools = {d["work_pool"]["name"] for d in load("prefect.yaml")["deployments"]}
    workers = {}
    for deployment in of_kind("Deployment").values():
        (c,) = deployment["spec"]["template"]["spec"]["containers"]
        words = " ".join(c["command"]).split()
        if "worker" in words:
            workers[words[words.index("--pool") + 1]] = c
    assert set(workers) == pools == {"imf-cpu", "imf-gpu"}
    # The GPU pool's flows drive the RayCluster: its pod joins it as a node with no resources.
    (script,) = [w for w in workers["imf-gpu"]["command"] if "ray start" in w]
    head = load("kuberay/raycluster.yaml")["metadata"]["name"] + "-head-svc:6379"
    assert f"ray start --address={head} --num-cpus=0 --num-gpus=0" in script


def auth_config() -> configparser.ConfigParser:
    auth = configparser.ConfigParser()
    auth.read_string(of_kind("ConfigMap")["imf-database"]["data"]["basic_auth.ini"])
    return auth


def mlflow_security_utils():
    """MLflow's module of server checks, loaded alone: importing it the usual way runs
    mlflow.server's __init__ (the whole Flask app, ~5 s)."""
    spec = importlib.util.find_spec("mlflow")
    path = Path(spec.origin).parent / "server" / "security_utils.py"
    module_spec = importlib.util.spec_from_file_location("mlflow_security_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def test_servers_authenticate_and_their_databases_exist():
    (mlflow,) = of_kind("Deployment")["mlflow"]["spec"]["template"]["spec"]["containers"]
    (prefect,) = of_kind("Deployment")["prefect"]["spec"]["template"]["spec"]["containers"]
    command = " ".join(mlflow["command"])
    assert "--app-name basic-auth" in command and "--serve-artifacts" in command
    assert "--artifacts-destination /artifacts/mlflow" in command  # the shared volume
    env = container_env(mlflow)
    assert (
        env["MLFLOW_AUTH_ADMIN_PASSWORD"]["valueFrom"]["secretKeyRef"]["key"]
        == "MLFLOW_TRACKING_PASSWORD"
    )
    assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"] == "/etc/mlflow/basic_auth.ini"
    assert container_env(prefect)["PREFECT_SERVER_API_AUTH_STRING"]["valueFrom"][
        "secretKeyRef"
    ] == {"name": "imf-tracking", "key": "PREFECT_API_AUTH_STRING"}
    # The Host header clients send (the Service, short or qualified; a port-forward) passes
    # MLflow's own host check, which by default admits localhost and private IPs only.
    is_allowed_host_header = mlflow_security_utils().is_allowed_host_header
    allowed = env["MLFLOW_SERVER_ALLOWED_HOSTS"]["value"].split(",")
    for host in (
        "mlflow:5000",
        "mlflow.imf.svc.cluster.local:5000",
        "localhost:5000",
        "127.0.0.1:5000",
    ):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "evil.example:5000")
    # Every database URL names the PostgreSQL Service and a database its init creates; no
    # password in any of them (PGPASSWORD, from imf-server).
    database = of_kind("ConfigMap")["imf-database"]["data"]
    urls = [
        database["MLFLOW_BACKEND_STORE_URI"],
        database["PREFECT_API_DATABASE_CONNECTION_URL"],
        auth_config()["mlflow"]["database_uri"],
    ]
    (postgres,) = of_kind("StatefulSet")["postgres"]["spec"]["template"]["spec"]["containers"]
    created = {container_env(postgres)["POSTGRES_DB"]["value"]}
    created |= set(re.findall(r"CREATE DATABASE (\w+);", (INFRA / "postgres-init.sql").read_text()))
    for url in urls:
        parts = urlsplit(url)
        assert parts.password is None and parts.port in services()[parts.hostname], url
        assert parts.path.lstrip("/") in created, url
    assert len({urlsplit(u).path for u in urls}) == 3  # MLflow's and its auth app's tables apart
    for server in (mlflow, prefect):
        assert (
            container_env(server)["PGPASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "imf-server"
        )
    # compose and Kubernetes create the same databases
    init = of_kind("ConfigMap")["postgres-init"]["data"]["init.sql"]
    assert init == (INFRA / "postgres-init.sql").read_text()


HOST_PORT = re.compile(r"(?<![\w.-])((?:[A-Za-z<][\w<>.-]*)|(?:\d+\.\d+\.\d+\.\d+)):(\d+)\b")


def test_every_host_port_in_the_docs_is_a_service_or_localhost():
    known = services()
    seen = set()
    for doc in (ROOT / "docs" / "cluster.md", INFRA / "README.md", K8S / "README.md"):
        for host, port in HOST_PORT.findall(doc.read_text()):
            seen.add(host)
            if host not in ("localhost", "127.0.0.1"):
                assert int(port) in known.get(host, ()), f"{doc.name}: {host}:{port}"
    assert {"mlflow", "prefect", "imf-head-svc", "127.0.0.1"} <= seen


# ---------------------------------------------------------------------------------------------
# GPUs: what each cluster file provisions is what its job uses
# ---------------------------------------------------------------------------------------------


def overrides(command: str) -> dict[str, str]:
    return dict(w.split("=", 1) for w in shlex.split(command) if "=" in w and not w.startswith("-"))


def documented_command(name: str) -> str:
    """The `imf sweep` command in a cluster file's header comment (lines continued by \\)."""
    lines = [
        line[1:].strip() for line in (INFRA / name).read_text().splitlines() if line.startswith("#")
    ]
    start = next(i for i, line in enumerate(lines) if line.startswith("imf sweep"))
    command = []
    for line in lines[start:]:
        command.append(line.removesuffix("\\"))
        if not line.endswith("\\"):
            return " ".join(command)
    raise AssertionError(f"{name}: the command's last line ends with a backslash")


def gpus_used(command: str) -> int:
    keys = overrides(command)
    workers = int(keys["train.num_workers"])
    assert keys["train.use_gpu"] == "true"
    assert int(keys["eval.workers"]) * int(keys["eval.gpus_per_worker"]) == workers, command
    return workers


def gpu_pods(spec: dict, replicas: str) -> int:
    total = 0
    for group in spec["workerGroupSpecs"]:
        (c,) = group["template"]["spec"]["containers"]
        total += group[replicas] * int(c["resources"]["limits"].get("nvidia.com/gpu", 0))
    return total


def test_gpus_provisioned_equal_gpus_used():
    job = load("kuberay/rayjob-sweep.yaml")
    spec = job["spec"]["rayClusterSpec"]
    for group in spec["workerGroupSpecs"]:  # created for the job at its full size
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"]
    assert gpu_pods(spec, "replicas") == gpus_used(job["spec"]["entrypoint"]) == 32
    # autoscaled clusters: their ceiling is the command they document
    cluster = load("kuberay/raycluster.yaml")
    assert (
        gpu_pods(cluster["spec"], "maxReplicas")
        == gpus_used(documented_command("kuberay/raycluster.yaml"))
        == 32
    )
    ray_up = load("ray/cluster.yaml")
    provisioned = sum(
        t.get("max_workers", 0) * t["resources"].get("GPU", 0)
        for t in ray_up["available_node_types"].values()
    )
    assert provisioned == gpus_used(documented_command("ray/cluster.yaml")) == 32
    assert ray_up["max_workers"] >= sum(
        t.get("max_workers", 0) for t in ray_up["available_node_types"].values()
    )
