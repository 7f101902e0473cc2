"""A Ray cluster started as the README says (`ray start --head` with token auth, on loopback)
refuses clients without its token, over gRPC and over the dashboard's HTTP API.

Facts of Ray 2.60 these tests pin down:
- `ray start --head` does not make a token: with `RAY_AUTH_MODE=token` it needs one in
  `RAY_AUTH_TOKEN`, the file named by `RAY_AUTH_TOKEN_PATH` or `~/.ray/auth_token` (the
  variable wins over a file); with `RAY_AUTH_MODE` unset it enables auth only if such a token
  already exists.
- A client of an explicit address sends the token only under `RAY_AUTH_MODE=token`.
- A refused `ray.init(address=...)` retries for about 20 s (one try a second), then raises
  `ConnectionError` caused by "... AuthenticationError: RPC error: InvalidAuthToken ...".
- The dashboard's HTTP API answers 401 without `Authorization: Bearer <token>`, 403 to a wrong
  one.
- `--node-ip-address=127.0.0.1` alone leaves the GCS and raylet listening on every interface;
  with `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0` they bind 127.0.0.1, and a client on the machine
  needs the switch too, or it swaps 127.0.0.1 for the external address and hangs there.

The cluster runs in its own temp dir and HOME (so no `~/.ray/auth_token` of this machine takes
part) and is stopped by that temp dir only; clients are fresh interpreters, so no Ray state
reaches this process.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from m3ae.launch.local_cluster import free_port, stop_processes_of

RAY = Path(sys.executable).parent / "ray"
# Every Ray setting a client of this machine might carry; each client sets its own.
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")
RAY_ENV = ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")

CLIENT = """
import sys
import ray
try:
    ray.init(address=sys.argv[1], log_to_driver=False)
    print("ANSWER", ray.get(ray.remote(lambda: 6 * 7).remote(), timeout=60))
except Exception as error:
    chain = []
    while error is not None:
        chain.append(f"{type(error).__name__}: {error}")
        error = error.__cause__
    print("REFUSED", " <- ".join(chain).replace("\\n", " "))
    sys.exit(3)
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    token = secrets.token_hex(32)
    home = tmp_path_factory.mktemp("home")  # empty: no ~/.ray/auth_token
    temp = tempfile.mkdtemp(prefix="rayauth", dir="/tmp")  # short: Ray's socket paths sit in it
    gcs, dashboard = free_port(), free_port()
    # A single-machine Ray: its servers bind 127.0.0.1, and a client's 127.0.0.1 stays that (a
    # client without the switch swaps it for the machine's external address, and hangs there).
    base = {k: v for k, v in os.environ.items() if k not in RAY_ENV}
    base.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    env = dict(base, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    start = [
        str(RAY),
        "start",
        "--head",
        f"--temp-dir={temp}",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        "--num-cpus=1",
        f"--object-store-memory={80 * 1024**2}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        "--disable-usage-stats",
    ]
    try:
        subprocess.run(start, check=True, capture_output=True, env=env, timeout=180)
        yield dict(
            address=f"127.0.0.1:{gcs}",
            dashboard=f"http://127.0.0.1:{dashboard}",
            token=token,
            temp=temp,
            env=base,
        )
    finally:
        stop_processes_of(temp)  # this cluster only: never `ray stop`, which stops every one
        shutil.rmtree(temp, ignore_errors=True)


def client(cluster, **env: str) -> subprocess.Popen:
    """`ray.init(address=...)` and a task, in a fresh interpreter with these Ray settings."""
    return subprocess.Popen(
        [sys.executable, "-c", CLIENT, cluster["address"]],
        env={**cluster["env"], **env},
        cwd=cluster["env"]["HOME"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def outcome(proc: subprocess.Popen, t0: float) -> tuple[int, str, float]:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the client hung for 120 s: {out[-2000:]} {err[-2000:]}")
    return proc.returncode, out + err, time.monotonic() - t0


@pytest.mark.timeout(300)
def test_a_client_with_the_cluster_token_runs_a_task(cluster):
    rc, output, _ = outcome(
        client(cluster, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster["token"]), time.monotonic()
    )
    assert rc == 0 and "ANSWER 42" in output, output[-3000:]
    # The README's command keeps every server of the cluster on loopback.
    pids = {
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if any(cluster["temp"] in arg for arg in p.info["cmdline"] or ())
    }
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    }
    assert listening and all(ip in LOOPBACK for ip, _ in listening), listening


@pytest.mark.timeout(300)
def test_clients_without_the_token_are_refused_and_do_not_hang(cluster):
    t0 = time.monotonic()
    clients = {  # concurrently: each one's refusal takes Ray's ~20 s of retries
        "wrong token": client(cluster, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
        "no token": client(cluster),
        # The right token is not sent unless RAY_AUTH_MODE=token says so.
        "token without RAY_AUTH_MODE": client(cluster, RAY_AUTH_TOKEN=cluster["token"]),
    }
    for name, proc in clients.items():
        rc, output, seconds = outcome(proc, t0)
        assert rc == 3, f"{name}: {output[-3000:]}"
        refused = next(line for line in output.splitlines() if line.startswith("REFUSED"))
        assert refused.startswith("REFUSED ConnectionError: Failed to connect to Ray cluster")
        assert "AuthenticationError: RPC error: InvalidAuthToken" in refused, refused
        assert "ANSWER" not in output
        assert seconds < 90, (name, seconds)


@pytest.mark.timeout(120)
def test_the_dashboard_http_api_wants_the_bearer_token(cluster):
    def status(token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        request = urllib.request.Request(cluster["dashboard"] + "/api/jobs/", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status(None) == 401
    assert status("0" * 64) == 403
    assert status(cluster["token"]) == 200


@pytest.mark.timeout(180)
def test_ray_job_cli_sends_the_token_under_ray_auth_mode_token(cluster):
    def job_list(**env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(RAY), "job", "list", "--address", cluster["dashboard"]],
            env={**cluster["env"], **env},
            capture_output=True,
            text=True,
            timeout=90,
        )

    ok = job_list(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=cluster["token"])
    assert ok.returncode == 0, ok.stdout[-2000:] + ok.stderr[-2000:]
    refused = job_list(RAY_AUTH_TOKEN=cluster["token"])  # the mode unset: no header is sent
    assert refused.returncode != 0
    assert "AuthenticationError: Authentication required: Unauthorized" in refused.stderr
