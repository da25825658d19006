"""Static checks of cluster/: every YAML parses, every job it names exists and accepts its arguments,
the Ray launcher config passes Ray's own schema, the KubeRay manifests ask for GPUs, the cron is valid."""

import re
import shlex
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
# The KubeRay manifests mount the ConfigMap made from this file (see cluster/README.md) at this path.
MOUNTED_CONFIG = "/home/ray/config/ray_config.yaml"
CLUSTER_CONFIG = CLUSTER / "ray_config.cluster.yaml"
SAMPLE_DT = "2024-05-01"

JOB_REFERENCE = re.compile(r"python -m jobs\.(\w+)|\bjobs/(\w+)\.py\b")
JOB_COMMAND = re.compile(r"python -m jobs\.\w+[^\n`\"']*")


def cluster_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def yaml_files() -> list[Path]:
    return sorted(CLUSTER.rglob("*.yaml"))


def load_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def kube_objects() -> list[tuple[str, dict]]:
    """Every Kubernetes object in cluster/, including RayJob templates kept inside ConfigMaps."""
    objects = []
    for path in yaml_files():
        for doc in load_documents(path):
            if "apiVersion" not in doc:
                continue
            objects.append((path.name, doc))
            if doc["kind"] == "ConfigMap":
                for key, text in doc.get("data", {}).items():
                    if key.endswith(".yaml"):
                        for inner in yaml.safe_load_all(text.replace("@SCORE_DT@", SAMPLE_DT)):
                            objects.append((f"{path.name}:{key}", inner))
    return objects


def referenced_jobs(text: str) -> set[str]:
    return {a or b for a, b in JOB_REFERENCE.findall(text)}


def job_commands(text: str) -> list[list[str]]:
    joined = text.replace("\\\n", " ")
    return [shlex.split(match.replace("@SCORE_DT@", SAMPLE_DT)) for match in JOB_COMMAND.findall(joined)]


def valid_cron(expression: str) -> bool:
    fields = expression.split()
    bounds = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
    if len(fields) != 5:
        return False
    for field, (low, high) in zip(fields, bounds):
        for part in field.split(","):
            match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            if not match:
                return False
            start, end, step = match.group(2), match.group(3), match.group(4)
            if step is not None and int(step) == 0:
                return False
            if start is not None:
                first, last = int(start), int(end if end is not None else start)
                if not (low <= first <= last <= high):
                    return False
    return True


def test_extractors_find_what_they_should():
    text = "run `python -m jobs.score --config c.yaml --set score.dt=@SCORE_DT@` or jobs/demo.py\n" \
           "  python -m jobs.tune_lora \\\n    --config ray_config.yaml\n"
    assert referenced_jobs(text) == {"score", "demo", "tune_lora"}
    assert job_commands(text) == [
        ["python", "-m", "jobs.score", "--config", "c.yaml", "--set", f"score.dt={SAMPLE_DT}"],
        ["python", "-m", "jobs.tune_lora", "--config", "ray_config.yaml"],
    ]
    assert valid_cron("30 2 * * *") and valid_cron("*/15 0-6,22 1 */2 1-5")
    assert not valid_cron("30 2 * *") and not valid_cron("61 2 * * *") and not valid_cron("0 0 * * * *")
    assert not valid_cron("0 0 0 * *") and not valid_cron("*/0 * * * *") and not valid_cron("@daily")


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_every_yaml_parses(path):
    assert load_documents(path), f"{path} holds no YAML document"


def test_every_referenced_job_exists():
    referenced = {}
    for path in cluster_files():
        for job in referenced_jobs(path.read_text(errors="replace")):
            referenced.setdefault(job, []).append(str(path.relative_to(REPO)))
    assert {"pretrain_encoder", "tune_lora", "score"} <= set(referenced)
    missing = {job: files for job, files in referenced.items() if not (REPO / "jobs" / f"{job}.py").is_file()}
    assert not missing, f"jobs named in cluster/ but missing from jobs/: {missing}"


def test_job_commands_use_existing_configs_and_known_keys():
    from binllm.config import load_config

    commands = [(path, cmd) for path in cluster_files() for cmd in job_commands(path.read_text(errors="replace"))]
    assert len(commands) >= 6
    for path, command in commands:
        args = command[3:]
        assert "--config" in args[:-1], f"{path.name}: {shlex.join(command)} names no --config FILE"
        config = args[args.index("--config") + 1]
        config_path = CLUSTER_CONFIG if config == MOUNTED_CONFIG else REPO / config
        assert config_path.is_file(), f"{path.name}: {shlex.join(command)}: {config_path} does not exist"
        overrides = [args[i + 1] for i, arg in enumerate(args) if arg == "--set"]
        load_config(config_path, overrides)


def test_ray_launcher_config_passes_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((CLUSTER / "aws-gpu.yaml").read_text())
    validate_config(prepare_config(config))
    node_types = config["available_node_types"]
    assert config["head_node_type"] in node_types
    gpu_types = [node["node_config"]["InstanceType"] for node in node_types.values()
                 if node["node_config"]["InstanceType"].split(".")[0] in {"g5", "g6", "p4d", "p5"}]
    assert gpu_types, "no GPU worker type"
    assert all(node.get("min_workers", 0) <= node.get("max_workers", 0)
               for name, node in node_types.items() if name != config["head_node_type"])
    assert any("pip install" in command and "/home/ray/binllm" in command for command in config["setup_commands"])
    assert "." in config["file_mounts"].values()


def test_runtime_env_is_a_valid_ray_runtime_env():
    from ray.runtime_env import RuntimeEnv

    runtime_env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**runtime_env)
    assert ".venv" in runtime_env["excludes"] and "runs" in runtime_env["excludes"]
    assert all(isinstance(value, str) for value in runtime_env["env_vars"].values())


def gpu_count(container: dict) -> int:
    resources = container.get("resources", {})
    return int(resources.get("limits", {}).get("nvidia.com/gpu", 0))


def test_kuberay_manifests_have_gpu_worker_groups():
    ray_objects = [(name, obj) for name, obj in kube_objects() if obj["kind"] in ("RayCluster", "RayJob")]
    kinds = {obj["kind"] for _, obj in ray_objects}
    assert kinds == {"RayCluster", "RayJob"}
    jobs_with_rayjobs = set()
    for name, obj in ray_objects:
        assert obj["apiVersion"] == "ray.io/v1", name
        spec = obj["spec"]
        if obj["kind"] == "RayJob":
            assert spec["entrypoint"].startswith("python -m jobs."), name
            assert spec["shutdownAfterJobFinishes"] is True, name
            assert spec["submissionMode"] in ("K8sJobMode", "HTTPMode"), name
            jobs_with_rayjobs |= referenced_jobs(spec["entrypoint"])
            spec = spec["rayClusterSpec"]
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert head["name"] == "ray-head", name
        gpu_groups = [group for group in spec["workerGroupSpecs"]
                      if any(gpu_count(c) > 0 for c in group["template"]["spec"]["containers"])]
        assert gpu_groups, f"{name}: no worker group asks for nvidia.com/gpu"
        for group in spec["workerGroupSpecs"]:
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], f"{name}: {group['groupName']}"
        for group in gpu_groups:
            container = group["template"]["spec"]["containers"][0]
            assert gpu_count(container) == int(container["resources"]["requests"]["nvidia.com/gpu"]), name
    assert jobs_with_rayjobs == {"pretrain_encoder", "tune_lora", "score"}


def test_nightly_cronjob_passes_the_date_to_score():
    cronjobs = [obj for _, obj in kube_objects() if obj["kind"] == "CronJob"]
    assert len(cronjobs) == 1
    cronjob = cronjobs[0]
    assert cronjob["apiVersion"] == "batch/v1"
    assert valid_cron(cronjob["spec"]["schedule"]), cronjob["spec"]["schedule"]
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    command = pod["containers"][0]["command"]
    assert command == ["/opt/binllm/score-nightly.sh"]  # mounted from kustomize's ConfigMap of the script
    script = (CLUSTER / "kuberay" / "score-nightly.sh").read_text()
    assert "kubectl create" in script and "@SCORE_DT@" in script
    templates = [obj for name, obj in kube_objects() if obj["kind"] == "RayJob" and ":" in name]
    assert [t["spec"]["entrypoint"].split("--set score.dt=")[1] for t in templates] == [SAMPLE_DT]
    assert templates[0]["metadata"]["name"] == f"binllm-score-{SAMPLE_DT}"
