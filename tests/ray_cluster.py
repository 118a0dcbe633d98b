"""Real Ray clusters on this machine, for tests: a token-authenticated head and extra nodes joined to it.

Each node is one ``ray start --block`` subprocess with its own temp dir, ports, IP on the loopback network
(127.0.0.1 for the head, 127.0.0.2, .3, ... for the others, so nodes differ by address as they do on a
cluster) and working directory. They never meet the test session's in-process ``ray.init``
(tests/conftest.py): a node is stopped by signalling *its* process, never with ``ray stop``, which would
kill every Ray on the machine.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
_NEXT_IP = itertools.count(2)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class RayNode:
    """One Ray node (head or worker) as a single ``ray start --block`` process."""

    def __init__(self, root: Path, env: dict[str, str], *, ip: str, num_cpus: int,
                 resources: dict[str, float] | None, head_gcs: str | None):  # fmt: skip
        self.ip, self.root, self.env = ip, root, env
        self.killed = False
        self.cwd = root / "cwd"  # the node's working directory: where its workers start
        self.cwd.mkdir(parents=True)
        if head_gcs is None:
            self.gcs_port, self.dashboard_port = free_port(ip), free_port(ip)
            role = ["--head", f"--port={self.gcs_port}", f"--ray-client-server-port={free_port(ip)}",
                    f"--dashboard-host={ip}", f"--dashboard-port={self.dashboard_port}"]  # fmt: skip
        else:
            role = [f"--address={head_gcs}"]
        low = 20000 + 1000 * (int(ip.rsplit(".", 1)[1]) % 40)  # each node its own range of worker ports
        command = [
            str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", *role,
            f"--node-ip-address={ip}", f"--num-cpus={num_cpus}", f"--temp-dir={root / 'ray'}",
            f"--resources={json.dumps(resources or {})}",
            f"--object-store-memory={128 * 1024**2}",  # a shared test machine: not 30% of its memory
            f"--node-manager-port={free_port(ip)}", f"--object-manager-port={free_port(ip)}",
            f"--dashboard-agent-listen-port={free_port(ip)}", f"--dashboard-agent-grpc-port={free_port(ip)}",
            f"--runtime-env-agent-port={free_port(ip)}", f"--metrics-export-port={free_port(ip)}",
            f"--min-worker-port={low}", f"--max-worker-port={low + 999}",
        ]  # fmt: skip
        self.log = root / "node.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, env=env, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def processes(self):
        """This node's live processes (their command lines name its temp dir)."""
        import psutil

        marker = str(self.root)
        for proc in psutil.process_iter(["pid", "cmdline", "name"]):
            if any(marker in part for part in proc.info["cmdline"] or []):
                yield proc

    def raylet_pid(self) -> int:
        pids = [p.pid for p in self.processes() if p.info["name"] == "raylet"]
        if len(pids) != 1:
            raise RuntimeError(f"expected one raylet under {self.root}, found {pids}")
        return pids[0]

    def kill_raylet(self) -> None:
        """What a lost machine looks like to the cluster: its raylet gone at once (its workers follow)."""
        os.kill(self.raylet_pid(), signal.SIGKILL)
        self.killed = True  # its `ray start --block` now exits 1, as it should

    def stop(self) -> None:
        """SIGTERM to `ray start --block` makes it shut down every process it started; then sweep."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        import psutil

        for proc in self.processes():  # workers that outlived their raylet
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass


class RayCluster:
    """A token-authenticated Ray head (127.0.0.1) and the nodes added to it; ``stop`` ends them all.

    ``env`` is what a process needs to talk to this cluster (its token file, no inherited RAY_* settings);
    ``gcs_address`` is what ``ray.init(address=...)`` and ``vitpipe train --address`` take; ``address`` is the
    dashboard's, for the job-submission API.
    """

    def __init__(self, num_cpus: int = 3, resources: dict[str, float] | None = None):
        # Short root: Ray's unix sockets live below it and their paths are limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="vp-ray-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        token_file = self.root / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_TRACKING"))}
        self.env.update(
            RAY_AUTH_MODE="token",  # Ray 2.59+: the dashboard and GCS refuse requests without the token
            RAY_AUTH_TOKEN_PATH=str(token_file),  # this cluster's own token, not ~/.ray/auth_token
            RAY_USAGE_STATS_ENABLED="0",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # tear down at once on SIGTERM
            RAY_worker_niceness="0",  # as tests/conftest.py: do not starve the training workers
            MLFLOW_DISABLE_TELEMETRY="true",
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in a job is this venv's
        )
        self.num_cpus, self.resources = num_cpus, resources  # of every node, the head's included
        self.nodes: list[RayNode] = []
        self.head = RayNode(self.root / "head", self.env, ip="127.0.0.1", num_cpus=num_cpus, resources=resources,
                            head_gcs=None)  # fmt: skip
        self.nodes.append(self.head)
        self.address = f"http://127.0.0.1:{self.head.dashboard_port}"
        self.gcs_address = f"127.0.0.1:{self.head.gcs_port}"

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def wait_ready(self, timeout_s: float = 90.0):
        """Wait for the head's job API; returns its client."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.head.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.head.process.returncode}:\n{self.head.log.read_text()}")
            try:
                client = self.client()
                client.list_jobs()
                return client
            except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, 5xx while starting
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Ray head was not ready in {timeout_s:.0f} s ({exc}):\n"
                                       f"{self.head.log.read_text()[-3000:]}") from exc  # fmt: skip
                time.sleep(0.5)

    def add_node(self) -> RayNode:
        """Start a node that joins this cluster at its own loopback IP (call :meth:`wait_for_nodes` after)."""
        ip = f"127.0.0.{next(_NEXT_IP)}"
        node = RayNode(self.root / ip, self.env, ip=ip, num_cpus=self.num_cpus, resources=self.resources,
                       head_gcs=self.gcs_address)  # fmt: skip
        self.nodes.append(node)
        return node

    def ensure_nodes(self, count: int) -> list[dict]:
        """Add nodes until ``count`` are alive (tests that lose a node leave fewer); returns them."""
        alive = self.alive_nodes()
        if len(alive) < count:
            for _ in range(count - len(alive)):
                self.add_node()
            alive = self.wait_for_nodes(count)
        return alive

    def _ask(self, expression: str, imports: str = "") -> Any:
        """The JSON value of ``expression``, computed by a short-lived Python process that can reach this
        cluster (its token); ``imports`` come first."""
        code = f"import json, ray; {imports}; print('ANSWER', json.dumps({expression}))"
        done = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, text=True, timeout=120)
        line = next((x for x in done.stdout.splitlines() if x.startswith("ANSWER ")), None)
        if line is None:
            raise RuntimeError(f"asking the cluster for {expression} failed:\n{done.stdout}\n{done.stderr}")
        return json.loads(line.split(" ", 1)[1])

    def alive_nodes(self) -> list[dict]:
        """The cluster's live nodes as the head sees them."""
        return self._ask("[{'ip': n['NodeManagerAddress'], 'id': n['NodeID'], 'resources': n['Resources']} "
                         "for n in ray.nodes() if n['Alive']]",
                         f"ray.init(address={self.gcs_address!r}, logging_level='ERROR')")  # fmt: skip

    def train_worker_pids(self) -> list[int]:
        """PIDs of the live Ray Train worker processes, found through Ray's state API."""
        # The dashboard's address, not auto-detection: other Rays on this machine (the tests' own) would be found too.
        return self._ask(f"[a.pid for a in list_actors(address={self.address!r}, filters=[('class_name', '=', "
                         "'RayTrainWorker'), ('state', '=', 'ALIVE')])]", "from ray.util.state import list_actors")

    def wait_for_nodes(self, count: int, timeout_s: float = 120.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(alive := self.alive_nodes()) != count:
            for node in self.nodes:
                if node.process.poll() is not None and not node.killed:
                    raise RuntimeError(f"a node exited with {node.process.returncode}:\n{node.log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} live nodes after {timeout_s:.0f} s, expected {count}: {alive}")
            time.sleep(1.0)
        return alive

    def stop(self) -> None:
        for node in reversed(self.nodes):  # the head last: the others leave its GCS first
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)
