"""The nightly scoring CronJob's script (cluster/kuberay/score-nightly.sh), run for real with bash
against a fake `kubectl` (tests/nightly/kubectl, first on PATH) that plays a KubeRay cluster: the
RayJob's states come from a scenario, and every call is logged so each case can check the exact kubectl
calls the script made. The static checks at the end read the manifests: the CronJob mounts the script
from the ConfigMap kustomize generates from it, and runs it."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
KUBERAY = REPO / "cluster" / "kuberay"
MANIFEST = KUBERAY / "score-nightly.yaml"
SCRIPT = KUBERAY / "score-nightly.sh"
FAKE_BIN = Path(__file__).resolve().parent / "nightly"  # holds the fake `kubectl`
DT = "2024-05-01"
NAME = f"binllm-score-{DT}"
SELECTOR = "app.kubernetes.io/name=binllm,app.kubernetes.io/component=score"


def manifest_docs() -> list[dict]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def cronjob() -> dict:
    return next(doc for doc in manifest_docs() if doc["kind"] == "CronJob")


def container() -> dict:
    return cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]


def template_text() -> str:
    configmap = next(doc for doc in manifest_docs() if doc["kind"] == "ConfigMap")
    return configmap["data"]["rayjob.yaml"]


def container_env() -> dict[str, str]:
    return {item["name"]: item["value"] for item in container()["env"]}


@dataclass
class Run:
    rc: int
    out: str
    calls: list[list[str]]
    created: list[str]
    seconds: float

    def verbs(self) -> list[list[str]]:
        """The calls without the --request-timeout that every call carries."""
        return [[a for a in call if not a.startswith("--request-timeout")] for call in self.calls]

    def status_reads(self) -> int:
        return sum(1 for call in self.verbs() if call[:3] == ["get", "rayjob", NAME] and "-o" in call
                   and "--ignore-not-found" not in call)


def status(dep="", job="", reason="", message="", failed=None) -> dict:
    st = {"jobDeploymentStatus": dep, "jobStatus": job, "reason": reason, "message": message}
    if failed is not None:
        st["failed"] = failed
    return {"status": {k: v for k, v in st.items() if v != ""}}


def prepare(tmp_path: Path, scenario: dict, **env: str) -> tuple[list[str], dict[str, str], Path]:
    """`bash score-nightly.sh` with the environment Kubernetes would give the CronJob's container (the
    env from the YAML, the template from the ConfigMap), the fake kubectl first on PATH (then this
    Python's folder, for the fake's `#!/usr/bin/env python3`) and no sleeps unless `env` asks for them;
    returns (argv, environment, the fake's state folder)."""
    state = tmp_path / "state"
    state.mkdir(parents=True)
    (state / "scenario.json").write_text(json.dumps(scenario))
    template = tmp_path / "rayjob.yaml"
    template.write_text(template_text())
    full_env = {
        "PATH": os.pathsep.join([str(FAKE_BIN), str(Path(sys.executable).parent), os.environ["PATH"]]),
        "FAKE_KUBECTL_STATE": str(state),
        "TMPDIR": str(tmp_path),
        **container_env(),
        "HOME": str(tmp_path),
        "SCORE_DT": DT,
        "TEMPLATE": str(template),
        "POLL_SECONDS": "0",
        "KUBECTL_RETRY_DELAY_SECONDS": "0",
        **env,
    }
    return ["bash", str(SCRIPT)], full_env, state


def run_script(tmp_path: Path, scenario: dict, timeout: float = 60, as_the_pod: bool = False, **env: str) -> Run:
    """Runs the script to its end; `as_the_pod` runs the file itself, by its #! line, as the CronJob does."""
    argv, full_env, state = prepare(tmp_path, scenario, **env)
    if as_the_pod:
        argv = [str(SCRIPT)]
    start = time.monotonic()
    proc = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - start
    calls_file = state / "calls.jsonl"
    calls = [json.loads(line) for line in calls_file.read_text().splitlines()] if calls_file.exists() else []
    created = [p.read_text() for p in sorted(state.glob("created-*.yaml"))]
    return Run(proc.returncode, proc.stdout + proc.stderr, calls, created, seconds)


def created_rayjob(run: Run) -> dict:
    assert len(run.created) == 1, run.out
    return yaml.safe_load(run.created[0])


def rayjob_images(rayjob: dict) -> list[str]:
    spec = rayjob["spec"]
    pods = [spec["submitterPodTemplate"], spec["rayClusterSpec"]["headGroupSpec"]["template"]]
    pods += [group["template"] for group in spec["rayClusterSpec"]["workerGroupSpecs"]]
    return [c["image"] for pod in pods for c in pod["spec"]["containers"]]


SETUP_CALLS = [
    ["get", "rayjobs", "-l", SELECTOR, "-o"],
    ["delete", "rayjob", NAME, "--ignore-not-found", "--wait=false"],
    ["get", "rayjob", NAME, "--ignore-not-found", "-o", "name"],
    ["create", "-f"],
]


def assert_setup_calls(run: Run) -> None:
    """Prune listing, deletion of the date's old RayJob, the wait for it to be gone, the create."""
    assert all(any(a.startswith("--request-timeout=") for a in call) for call in run.calls), run.calls
    verbs = run.verbs()
    assert [call[:len(expected)] for call, expected in zip(verbs, SETUP_CALLS)] == SETUP_CALLS, verbs


# ------------------------------------------------------------------------------------------- cases


def test_succeeded(tmp_path):
    run = run_script(tmp_path, {"status": [
        status(), status("Initializing", "PENDING"), status("Running", "RUNNING"),
        status("Complete", "SUCCEEDED"),
    ]}, as_the_pod=True)
    assert run.rc == 0, run.out
    assert f"{NAME}: SUCCEEDED" in run.out
    assert_setup_calls(run)
    assert run.status_reads() == 4
    assert len(run.verbs()) == len(SETUP_CALLS) + 4  # nothing deleted afterwards
    assert all(call[:3] == ["get", "rayjob", NAME] for call in run.verbs()[len(SETUP_CALLS):])

    rayjob = created_rayjob(run)
    assert rayjob["metadata"]["name"] == NAME
    assert rayjob["metadata"]["labels"]["binllm/score-dt"] == DT
    assert rayjob["spec"]["entrypoint"].endswith(f"--set score.dt={DT}")
    assert set(rayjob_images(rayjob)) == {container_env()["BINLLM_IMAGE"]}
    assert "@" not in run.created[0].replace(container_env()["BINLLM_IMAGE"], "")

    # The RayJob's attempts, with KubeRay's teardown between them, end before the CronJob's Job is killed.
    job_deadline = cronjob()["spec"]["jobTemplate"]["spec"]["activeDeadlineSeconds"]
    attempt = rayjob["spec"]["activeDeadlineSeconds"]
    retries = rayjob["spec"]["backoffLimit"]
    assert isinstance(attempt, int) and attempt >= 1800
    assert (retries + 1) * attempt + retries * 300 + 900 <= job_deadline


def test_image_by_digest_is_filled_in_everywhere(tmp_path):
    image = "registry.example.com:5000/ml/binllm@sha256:" + "0123456789abcdef" * 4
    run = run_script(tmp_path, {"status": [status("Complete", "SUCCEEDED")]}, BINLLM_IMAGE=image)
    assert run.rc == 0, run.out
    assert set(rayjob_images(created_rayjob(run))) == {image}


def test_failed_after_retry(tmp_path):
    run = run_script(tmp_path, {"status": [
        status("Running", "RUNNING"),
        status("Retrying", "FAILED", "AppFailed", failed=1),
        status("Initializing", "PENDING", failed=1),
        status("Running", "RUNNING", failed=1),
        status("Failed", "FAILED", "AppFailed", "Job entrypoint command failed with exit code 1", failed=2),
    ]})
    assert run.rc == 1, run.out
    assert "attempt 1 failed (AppFailed); KubeRay retries on a new RayCluster" in run.out
    assert f"{NAME}: Failed after 2 attempt(s): AppFailed: Job entrypoint command failed with exit code 1" in run.out
    assert_setup_calls(run)
    assert run.status_reads() == 5
    assert not any(call[0] == "delete" for call in run.verbs()[len(SETUP_CALLS):])  # left for inspection


def test_validation_failed(tmp_path):
    message = "The RayJob spec is invalid: activeDeadlineSeconds must be a positive integer"
    run = run_script(tmp_path, {"status": [status("ValidationFailed", "", "ValidationFailed", message)]})
    assert run.rc == 2, run.out
    assert f"{NAME}: ValidationFailed: KubeRay rejected the RayJob: {message}" in run.out
    assert_setup_calls(run)
    assert run.status_reads() == 1


def test_transient_kubectl_failures_are_retried(tmp_path):
    run = run_script(tmp_path, {"status": [
        {"error": "Unable to connect to the server: dial tcp 10.96.0.1:443: i/o timeout"},
        {"error": "Error from server (ServiceUnavailable): the server is currently unable to handle the request"},
        status("Running", "RUNNING"),
        status("Complete", "SUCCEEDED"),
    ]}, KUBECTL_RETRY_DELAY_SECONDS="1", KUBECTL_RETRY_MAX_DELAY_SECONDS="1")
    assert run.rc == 0, run.out
    assert "i/o timeout (try 1 of 8, again in 1s)" in run.out
    assert "(ServiceUnavailable)" in run.out and "(try 2 of 8, again in 1s)" in run.out
    assert run.status_reads() == 4
    assert_setup_calls(run)


def test_kubectl_failing_for_good_gives_up_after_bounded_tries(tmp_path):
    run = run_script(tmp_path, {"status": [{"error": "Unable to connect to the server: connection refused"}]},
                     KUBECTL_ATTEMPTS="3")
    assert run.rc == 5, run.out
    assert "failed 3 times" in run.out and "it may still be running" in run.out
    assert run.status_reads() == 3


def test_rayjob_deleted_while_running_is_not_retried(tmp_path):
    run = run_script(tmp_path, {"status": [
        status("Running", "RUNNING"),
        {"error": f'Error from server (NotFound): rayjobs.ray.io "{NAME}" not found'},
    ]})
    assert run.rc == 5, run.out
    assert "the RayJob was deleted before it finished" in run.out
    assert run.status_reads() == 2


def test_time_budget_runs_out(tmp_path):
    run = run_script(tmp_path, {"status": [status("Running", "RUNNING")]}, DEADLINE_SECONDS="3",
                     RESERVE_SECONDS="0", RAYJOB_RETRY_OVERHEAD_SECONDS="0", RAYJOB_MIN_DEADLINE_SECONDS="1",
                     POLL_SECONDS="1")
    assert run.rc == 4, run.out
    assert f"{NAME}: out of time" in run.out
    assert run.verbs()[-1] == ["delete", "rayjob", NAME, "--ignore-not-found", "--wait=false"]
    assert 2 <= run.seconds < 15
    rayjob = created_rayjob(run)  # 3 s over 1 + backoffLimit attempts
    assert 1 <= rayjob["spec"]["activeDeadlineSeconds"] * (rayjob["spec"]["backoffLimit"] + 1) <= 3


def test_budget_too_small_creates_nothing(tmp_path):
    run = run_script(tmp_path, {"status": [status("Running", "RUNNING")]}, DEADLINE_SECONDS="3600")
    assert run.rc == 6, run.out
    assert "cannot give 2 attempt(s) 1800s each" in run.out
    assert not run.created


def test_prunes_finished_rayjobs_older_than_n_days(tmp_path):
    now = datetime.now(timezone.utc)

    def item(name, days, dep):
        created = (now - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%SZ")
        return {"metadata": {"name": name, "creationTimestamp": created},
                "status": {"jobDeploymentStatus": dep}}

    listing = [
        item("binllm-score-2024-04-01", 30, "ValidationFailed"),
        item("binllm-score-2024-04-20", 10, "Complete"),
        item("binllm-score-2024-04-22", 8, "Failed"),
        item("binllm-score-2024-04-21", 9, "Running"),      # still running: kept
        item("binllm-score-2024-04-23", 9, "Suspended"),    # not finished: kept
        item("binllm-score-2024-04-29", 1, "Complete"),     # younger than 7 days: kept
        item(NAME, 12, "Complete"),                          # the date being rerun: deleted as such
    ]
    run = run_script(tmp_path, {"list": listing, "old_rayjob_polls": 2,
                                "status": [status("Complete", "SUCCEEDED")]})
    assert run.rc == 0, run.out
    assert "pruning 3 finished RayJob(s)" in run.out
    verbs = run.verbs()
    assert verbs[0][:4] == ["get", "rayjobs", "-l", SELECTOR]
    assert verbs[1] == ["delete", "rayjob", "binllm-score-2024-04-01", "binllm-score-2024-04-20",
                        "binllm-score-2024-04-22", "--ignore-not-found", "--wait=false"]
    assert verbs[2] == ["delete", "rayjob", NAME, "--ignore-not-found", "--wait=false"]
    # the rerun date's old RayJob is waited for until it is gone, then the new one is created
    assert [call[:3] for call in verbs[3:6]] == [["get", "rayjob", NAME]] * 3
    assert verbs[6][0] == "create"


def test_pruning_off_and_list_failure_never_fail_the_night(tmp_path):
    off = run_script(tmp_path / "off", {"status": [status("Complete", "SUCCEEDED")]}, PRUNE_AFTER_DAYS="0")
    assert off.rc == 0, off.out
    assert not any(call[:2] == ["get", "rayjobs"] for call in off.verbs())
    forbidden = run_script(tmp_path / "forbidden", {
        "list_error": 'Error from server (Forbidden): rayjobs.ray.io is forbidden: User "x" cannot list',
        "status": [status("Complete", "SUCCEEDED")]})
    assert forbidden.rc == 0, forbidden.out
    assert "prune skipped: cannot list RayJobs: Error from server (Forbidden)" in forbidden.out
    assert sum(call[:2] == ["get", "rayjobs"] for call in forbidden.verbs()) == 1  # not retried


@pytest.mark.parametrize(("dep", "job", "reason", "rc", "says"), [
    ("Complete", "SUCCEEDED", "", 0, "SUCCEEDED"),
    ("Complete", "STOPPED", "", 3, "the Ray job was STOPPED"),
    ("Complete", "FAILED", "", 1, "the Ray job FAILED"),
    ("Failed", "FAILED", "AppFailed", 1, "Failed after 1 attempt(s): AppFailed"),
    ("Failed", "FAILED", "SubmissionFailed", 1, "Failed after 1 attempt(s): SubmissionFailed"),
    ("Failed", "RUNNING", "DeadlineExceeded", 4, "Failed: DeadlineExceeded"),
    ("Failed", "PENDING", "PreRunningDeadlineExceeded", 4, "Failed: PreRunningDeadlineExceeded"),
    ("ValidationFailed", "", "ValidationFailed", 2, "ValidationFailed"),
])
def test_every_terminal_state_has_its_exit_code(tmp_path, dep, job, reason, rc, says):
    run = run_script(tmp_path, {"status": [status("Suspended"), status(dep, job, reason, failed=1)]})
    assert run.rc == rc, run.out
    assert says in run.out
    assert "Suspended (spec.suspend is set" in run.out


def test_never_picked_up_by_kuberay(tmp_path):
    run = run_script(tmp_path, {"status": [status()]}, PICKUP_TIMEOUT_SECONDS="0")
    assert run.rc == 5, run.out
    assert "KubeRay has not picked the RayJob up" in run.out


def test_create_errors(tmp_path):
    exists = run_script(tmp_path / "exists", {
        "create_error": f'Error from server (AlreadyExists): rayjobs.ray.io "{NAME}" already exists',
        "status": [status("Complete", "SUCCEEDED")]})
    assert exists.rc == 0 and "already exists" in exists.out, exists.out
    invalid = run_script(tmp_path, {
        "create_error": 'Error from server (BadRequest): error when creating: strict decoding error: '
                        'unknown field "spec.backoffLimit"',
        "status": [status("Complete", "SUCCEEDED")]})
    assert invalid.rc == 2, invalid.out
    assert "is KubeRay v1.2 or newer installed?" in invalid.out
    assert invalid.status_reads() == 0


def test_sigterm_ends_the_wait_at_once(tmp_path):
    """The kubelet's SIGTERM (Job deadline, deleted pod) stops the script without waiting out a poll."""
    argv, env, state = prepare(tmp_path, {"status": [status("Running", "RUNNING")]}, POLL_SECONDS="60")
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        calls = state / "calls.jsonl"
        deadline = time.monotonic() + 30
        while not calls.exists() or len(calls.read_text().splitlines()) <= len(SETUP_CALLS):
            assert time.monotonic() < deadline, "the script never read the RayJob's status"
            time.sleep(0.1)
        time.sleep(0.5)  # now in its 60 s poll sleep
        proc.terminate()
        rc = proc.wait(timeout=5)
    finally:
        proc.kill()
    out = proc.stdout.read()
    assert rc == 143, out
    assert "terminated by SIGTERM; the RayJob is left as it is" in out


def test_sigterm_during_a_kubectl_call_after_a_wait(tmp_path):
    """A SIGTERM that comes while kubectl runs, after an earlier poll's sleep has ended, still ends the
    script with 143 and its message (the trap's kill of that finished sleep fails, and must not end it)."""
    argv, env, state = prepare(tmp_path, {"status": [status("Running", "RUNNING"),
                                                     {**status("Running", "RUNNING"), "sleep": 2}]})
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        calls = state / "calls.jsonl"
        deadline = time.monotonic() + 30
        while not calls.exists() or len(calls.read_text().splitlines()) <= len(SETUP_CALLS) + 1:
            assert time.monotonic() < deadline, "the script never read the RayJob's status twice"
            time.sleep(0.1)
        proc.terminate()  # bash runs the trap when this kubectl call returns
        rc = proc.wait(timeout=30)
    finally:
        proc.kill()
    out = proc.stdout.read()
    assert rc == 143, out
    assert "terminated by SIGTERM; the RayJob is left as it is" in out


@pytest.mark.parametrize(("env", "says"), [
    ({"SCORE_DT": "2024-5-1"}, "SCORE_DT must be YYYY-MM-DD"),
    ({"SCORE_DT": "2024-05-01/../x"}, "SCORE_DT must be YYYY-MM-DD"),
    ({"BINLLM_IMAGE": ""}, "BINLLM_IMAGE must be an image reference"),
    ({"BINLLM_IMAGE": "binllm:1|x"}, "BINLLM_IMAGE must be an image reference"),
    ({"POLL_SECONDS": "30s"}, "poll_s must be a whole number"),
    ({"KUBECTL_ATTEMPTS": "0"}, "KUBECTL_ATTEMPTS must be at least 1"),
    ({"TEMPLATE": "/nonexistent/rayjob.yaml"}, "no RayJob template at /nonexistent/rayjob.yaml"),
])
def test_bad_configuration_makes_no_kubectl_call(tmp_path, env, says):
    run = run_script(tmp_path, {"status": [status("Complete", "SUCCEEDED")]}, **env)
    assert run.rc == 6, run.out
    assert says in run.out
    assert run.calls == []


# -------------------------------------------------------------------------------- static checks


def test_deadlines_agree():
    job_spec = cronjob()["spec"]["jobTemplate"]["spec"]
    assert int(container_env()["DEADLINE_SECONDS"]) == job_spec["activeDeadlineSeconds"]
    assert job_spec["backoffLimit"] == 0
    template = yaml.safe_load(template_text().replace("@SCORE_DT@", DT))
    assert template["spec"]["activeDeadlineSeconds"] == "@RAYJOB_DEADLINE_SECONDS@"
    assert re.search(r"^  backoffLimit: \d+$", template_text(), re.M)  # what the script reads


def test_pods_are_restricted_and_have_shm():
    template = yaml.safe_load(template_text().replace("@SCORE_DT@", DT))
    cluster = template["spec"]["rayClusterSpec"]
    ray_pods = [cluster["headGroupSpec"]["template"]["spec"]]
    ray_pods += [group["template"]["spec"] for group in cluster["workerGroupSpecs"]]
    for pod in ray_pods + [template["spec"]["submitterPodTemplate"]["spec"]]:
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
            assert c["image"] == "@BINLLM_IMAGE@" and c["imagePullPolicy"] == "IfNotPresent"
    for pod in ray_pods:
        shm = [v for v in pod["volumes"] if v["name"] == "dshm"]
        assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
        assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    submit_pod = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert submit_pod["securityContext"]["runAsNonRoot"] is True
    assert container()["securityContext"]["readOnlyRootFilesystem"] is True


def kustomization() -> dict:
    return yaml.safe_load((KUBERAY / "kustomization.yaml").read_text())


def script_generator() -> tuple[dict, str]:
    """kustomization.yaml's configMapGenerator entry made from score-nightly.sh, and the script's key
    in that ConfigMap (`files: [KEY=PATH]`, or the file's name)."""
    found = []
    for entry in kustomization().get("configMapGenerator", []):
        for item in entry.get("files", []):
            key, _, path = item.rpartition("=")
            if (KUBERAY / path).resolve() == SCRIPT:
                found.append((entry, key or Path(path).name))
    assert len(found) == 1, f"kustomization.yaml should generate one ConfigMap from {SCRIPT.name}: {found}"
    return found[0]


@functools.cache
def kustomize_build() -> tuple[str, list[dict]]:
    """`kubectl kustomize cluster/kuberay`: its text and its objects (the test skips without kubectl)."""
    if not shutil.which("kubectl"):
        pytest.skip("kubectl (with kustomize built in) is not installed")
    built = subprocess.run(["kubectl", "kustomize", str(KUBERAY)], capture_output=True, text=True, timeout=120)
    if built.returncode != 0 and "unknown command" in built.stderr:
        pytest.skip("this kubectl has no kustomize")
    assert built.returncode == 0, built.stderr
    return built.stdout, [doc for doc in yaml.safe_load_all(built.stdout) if doc]


def test_cronjob_mounts_the_script_and_runs_it():
    """The files as kustomize combines them: the CronJob mounts the ConfigMap generated from
    score-nightly.sh (same name, so kustomize's name reference rewrites it to the hashed one), executable,
    and runs the file it mounts; the generated ConfigMap carries the score-nightly labels, so that
    `kubectl apply -k cluster/kuberay -l app.kubernetes.io/component=score-nightly` applies it too."""
    assert MANIFEST.name in kustomization()["resources"]
    entry, key = script_generator()
    labels = cronjob()["metadata"]["labels"]
    assert labels["app.kubernetes.io/component"] == "score-nightly"
    assert entry.get("options", {}).get("labels", {}).items() >= labels.items(), entry
    assert not entry.get("options", {}).get("disableNameSuffixHash"), "a changed script must get a new name"

    pod = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == entry["name"]]
    assert volume["configMap"].get("defaultMode") == 0o755
    assert "items" not in volume["configMap"]
    (mount,) = [m for m in container()["volumeMounts"] if m["name"] == volume["name"]]
    assert mount.get("readOnly") is True and "subPath" not in mount
    assert container()["command"] == [f"{mount['mountPath']}/{key}"]
    assert not container().get("args")

    text = SCRIPT.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.M)
    assert os.access(SCRIPT, os.X_OK), f"{SCRIPT} is not executable"

    # The script's default template is the RayJob template the CronJob mounts, and it reads every
    # variable the CronJob sets.
    (default,) = re.findall(r'template="\$\{TEMPLATE:-([^}]+)\}"', text)
    (templates,) = [v for v in pod["volumes"] if v.get("configMap", {}).get("name") == "binllm-score-rayjob"]
    (templates_mount,) = [m for m in container()["volumeMounts"] if m["name"] == templates["name"]]
    assert default == f"{templates_mount['mountPath']}/rayjob.yaml"
    template_text()  # the ConfigMap has the key rayjob.yaml
    for name in container_env():
        assert name == "HOME" or "${" + name in text, f"the script does not read {name}"


def test_kustomize_build_mounts_the_generated_script():
    """`kubectl kustomize`: the script's ConfigMap gets a hashed name, the CronJob's volume names it,
    it holds the script as it is, and the score-nightly label selects it."""
    _, docs = kustomize_build()
    entry, key = script_generator()
    (configmap,) = [doc for doc in docs if doc["kind"] == "ConfigMap"
                    and doc["metadata"]["name"].startswith(entry["name"] + "-")]
    assert configmap["data"] == {key: SCRIPT.read_text()}
    assert configmap["metadata"]["labels"]["app.kubernetes.io/component"] == "score-nightly"
    (cron,) = [doc for doc in docs if doc["kind"] == "CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    names = [v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v]
    assert configmap["metadata"]["name"] in names and entry["name"] not in names, names
    assert [v["configMap"].get("defaultMode") for v in pod["volumes"]
            if v.get("configMap", {}).get("name") == configmap["metadata"]["name"]] == [0o755]
    selected = {(doc["kind"], doc["metadata"]["name"]) for doc in docs
                if doc["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "score-nightly"}
    assert selected == {("ServiceAccount", "binllm-score-scheduler"), ("Role", "binllm-score-scheduler"),
                        ("RoleBinding", "binllm-score-scheduler"), ("ConfigMap", "binllm-score-rayjob"),
                        ("ConfigMap", configmap["metadata"]["name"]), ("CronJob", "binllm-score-nightly")}


def test_kustomize_names_the_image_once():
    (entry,) = kustomization()["images"]
    expected = entry["newName"] + (f"@{entry['digest']}" if "digest" in entry else f":{entry['newTag']}")
    raw = "\n".join(p.read_text() for p in KUBERAY.glob("*.yaml") if p.name != "kustomization.yaml")
    assert expected not in raw and expected not in SCRIPT.read_text()
    built, docs = kustomize_build()
    images = []

    def collect(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers"):
                    images.extend(c["image"] for c in value)
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(docs)
    assert sorted(set(images)) == sorted({expected, "alpine/k8s:1.33.4"}), images
    assert images.count(expected) >= 7
    (cron,) = [doc for doc in docs if doc["kind"] == "CronJob"]
    env = {e["name"]: e.get("value") for e in
           cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BINLLM_IMAGE"] == expected
    assert not re.search(r"(?<![\w./-])binllm:", built)  # no unqualified name is left
