"""A local Ray head and S3 server (moto) on 127.0.0.1, for trying the jobs and `ray job submit` here.

    python cluster/local_stack.py start     # starts both, prints the variables to export
    python cluster/local_stack.py env       # prints them again
    python cluster/local_stack.py stop      # stops exactly the processes `start` launched

Ray is started with the S3 variables in its environment, so every job driver and worker it runs reaches
the local S3 server without any configuration. Each server leads a session of its own;
`stop` signals the processes of those sessions only, never other Ray instances on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"
STATE_FILE = "stack.json"
S3_ACCESS_KEY = "testing"  # moto accepts any credentials
S3_REGION = "us-east-1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python cluster/local_stack.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--state-dir", type=Path, default=Path("runs/local-stack"),
                        help="pid files, logs and the env file (default: runs/local-stack)")
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("start", help="start the Ray head and the S3 server")
    start.add_argument("--ray-port", type=int, default=6379, help="GCS port of the Ray head")
    start.add_argument("--dashboard-port", type=int, default=8265, help="dashboard / job submission port")
    start.add_argument("--s3-port", type=int, default=0, help="S3 server port; 0 picks a free one")
    start.add_argument("--num-cpus", type=int, default=2)
    start.add_argument("--num-gpus", type=int, default=0)
    start.add_argument("--bucket", default="binllm", help="bucket created on the S3 server")
    start.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for each server")
    commands.add_parser("stop", help="stop what `start` launched")
    commands.add_parser("env", help="print the variables to export")
    args = parser.parse_args(argv)

    state_dir = args.state_dir.resolve()
    if args.command == "start":
        return start_stack(state_dir, args)
    if args.command == "stop":
        return stop_stack(state_dir)
    state = read_state(state_dir)
    if state is None:
        print(f"no local stack recorded in {state_dir}", file=sys.stderr)
        return 1
    print(format_exports(state["env"]))
    return 0


def start_stack(state_dir: Path, args: argparse.Namespace) -> int:
    state = read_state(state_dir)
    if state is not None and any(session_alive(state.get(key)) for key in ("ray_sid", "s3_sid")):
        print(f"a local stack is already running (see {state_dir / STATE_FILE}); stop it first", file=sys.stderr)
        return 1
    for port, what in ((args.ray_port, "--ray-port"), (args.dashboard_port, "--dashboard-port"), (args.s3_port, "--s3-port")):
        if port and not port_free(port):
            print(f"port {port} ({what}) is in use on {LOOPBACK}; choose another", file=sys.stderr)
            return 1
    state_dir.mkdir(parents=True, exist_ok=True)
    s3_port = args.s3_port or free_port()
    endpoint = f"http://{LOOPBACK}:{s3_port}"
    s3_env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": S3_ACCESS_KEY,
        "AWS_REGION": S3_REGION,
        "AWS_DEFAULT_REGION": S3_REGION,
    }
    ray_env = {
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "disabled",
        "GLOO_SOCKET_IFNAME": "lo",
    }

    print(f"starting S3 server (moto) on {endpoint} ...", flush=True)
    s3 = launch([sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(s3_port)],
                state_dir / "s3.log", dict(os.environ))
    state = {"s3_sid": s3.pid, "ray_sid": None, "env": {}}
    write_state(state_dir, state)
    try:
        wait_http(f"{endpoint}/moto-api/", s3, state_dir / "s3.log", args.timeout)
        create_bucket(endpoint, args.bucket)

        dashboard = f"http://{LOOPBACK}:{args.dashboard_port}"
        missing = dashboard_dependency_error()
        if missing:
            print(f"WARNING: Ray's dashboard, which serves `ray job submit`, cannot start ({missing}); "
                  "install ray[default] for it. Jobs still run with `python -m jobs.<name>` (RAY_ADDRESS joins this head).",
                  file=sys.stderr, flush=True)
        print(f"starting Ray head on {LOOPBACK}:{args.ray_port}"
              + ("" if missing else f", dashboard {dashboard}") + " ...", flush=True)
        ray_cmd = [
            ray_executable(), "start", "--head", "--block",
            "--node-ip-address", LOOPBACK, "--port", str(args.ray_port),
            "--num-cpus", str(args.num_cpus), "--num-gpus", str(args.num_gpus),
            "--include-dashboard", "false" if missing else "true", "--dashboard-host", LOOPBACK,
            "--dashboard-port", str(args.dashboard_port), "--disable-usage-stats",
        ]
        ray = launch(ray_cmd, state_dir / "ray.log", {**os.environ, **ray_env, **s3_env})
        state["ray_sid"] = ray.pid
        write_state(state_dir, state)
        if missing:
            wait_tcp(args.ray_port, ray, state_dir / "ray.log", args.timeout)
        else:
            wait_http(f"{dashboard}/api/version", ray, state_dir / "ray.log", args.timeout)
    except BaseException:
        stop_stack(state_dir)
        raise

    state["env"] = {**ray_env, **s3_env, "RAY_ADDRESS": f"{LOOPBACK}:{args.ray_port}"}
    if not missing:
        state["env"]["RAY_API_SERVER_ADDRESS"] = dashboard
    state["env"]["BINLLM_S3_BUCKET"] = f"s3://{args.bucket}"
    write_state(state_dir, state)
    env_file = state_dir / "env.sh"
    env_file.write_text(format_exports(state["env"]) + "\n")
    print(f"local stack running; logs in {state_dir}. Export these (or `source {env_file}`):")
    print(format_exports(state["env"]))
    return 0


def stop_stack(state_dir: Path) -> int:
    state = read_state(state_dir)
    if state is None:
        print(f"no local stack recorded in {state_dir}")
        return 0
    for key, name in (("ray_sid", "Ray head"), ("s3_sid", "S3 server")):
        sid = state.get(key)
        if session_alive(sid):
            print(f"stopping {name} (session {sid}) ...", flush=True)
            stop_session(sid)
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    (state_dir / "env.sh").unlink(missing_ok=True)
    print("local stack stopped")
    return 0


def launch(command: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a server as the leader of a new session, so that its pid names every process it starts."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def stop_session(sid: int, grace_s: float = 45.0) -> None:
    """SIGTERM the session leader (`ray start` drains and stops its children, up to 30 s), then SIGKILL
    whatever of the session is left after `grace_s`."""
    try:
        os.kill(sid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and session_alive(sid):
        reap(sid)
        time.sleep(0.2)
    for pid in session_pids(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is `sid` (Ray's workers get process groups of their own, not sessions)."""
    proc = Path("/proc")
    if not proc.is_dir():  # not Linux: the session leader's process group is the best we can name
        try:
            os.killpg(sid, 0)
        except (ProcessLookupError, PermissionError):
            return []
        return [sid]
    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state ppid pgrp session ...
            pids.append(int(entry.name))
    return pids


def session_alive(sid: int | None) -> bool:
    return bool(sid) and bool(session_pids(sid))


def reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_until(ready: Callable[[], bool], what: str, process: subprocess.Popen, log_path: Path,
               timeout_s: float) -> None:
    """Polls `ready` until it holds; fails early, with the log's tail, when `process` exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{shlex.join(map(str, process.args))} exited with {process.returncode}:\n"
                               f"{tail(log_path)}")
        if ready():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout_s:.0f} s; log:\n{tail(log_path)}")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def tcp_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((LOOPBACK, port)) == 0


def wait_http(url: str, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    wait_until(lambda: http_ok(url), f"{url} did not answer", process, log_path, timeout_s)


def wait_tcp(port: int, process: subprocess.Popen, log_path: Path, timeout_s: float) -> None:
    wait_until(lambda: tcp_open(port), f"{LOOPBACK}:{port} did not accept connections", process, log_path, timeout_s)


def dashboard_dependency_error() -> str | None:
    """Why Ray's dashboard (the job submission server) cannot start here, or None if it can."""
    try:
        import ray.dashboard.optional_deps  # noqa: F401  (the import Ray itself uses as its check)
    except ImportError as error:
        return str(error)
    return None


def create_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name=S3_REGION,
                          aws_access_key_id=S3_ACCESS_KEY, aws_secret_access_key=S3_ACCESS_KEY)
    client.create_bucket(Bucket=bucket)


def ray_executable() -> str:
    beside_python = Path(sys.executable).with_name("ray")
    if beside_python.is_file():
        return str(beside_python)
    raise FileNotFoundError(f"no `ray` command beside {sys.executable}; install the project into this environment")


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no conflict
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def format_exports(env: dict[str, str]) -> str:
    return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in env.items())


def read_state(state_dir: Path) -> dict | None:
    try:
        return json.loads((state_dir / STATE_FILE).read_text())
    except FileNotFoundError:
        return None


def write_state(state_dir: Path, state: dict) -> None:
    tmp = state_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=2))
    os.replace(tmp, state_dir / STATE_FILE)


if __name__ == "__main__":
    sys.exit(main())
