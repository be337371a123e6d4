"""infra/: manifests validate without a cluster, and the defaults are safe (localhost binds,
no credentials in files)."""

import re
from pathlib import Path

import yaml

INFRA = Path(__file__).resolve().parent.parent / "infra"


def load(name: str):
    return yaml.safe_load((INFRA / name).read_text())


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
    for spec in (cluster["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
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


def test_services_bind_to_localhost_and_hold_no_credentials():
    compose = load("docker-compose.yml")
    assert {"postgres", "minio", "mlflow", "prefect"} <= set(compose["services"])
    for service in compose["services"].values():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), port
    text = "\n".join(p.read_text() for p in INFRA.rglob("*") if p.is_file())
    secret = r"(?<![{$\w])([A-Z_]*(?:PASSWORD|SECRET|ACCESS_KEY)[A-Z_]*)\s*[:=]\s*(\S+)"
    matches = list(re.finditer(secret, text))
    assert len(matches) >= 4  # the compose file's secrets are all seen ...
    for match in matches:
        assert match.group(2).startswith("${"), match.group(0)  # ... and come from the environment
