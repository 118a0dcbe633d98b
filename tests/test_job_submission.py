"""Jobs as the GPU cluster runs them (issue 8): submitted to a real Ray head through the job-submission
API, and the shard-building job staging through S3 (a stand-in AWS CLI).

A separate ``ray start --head --block`` runs in a subprocess with its own temp dir, ports, token and
environment, so it never meets the test session's in-process ``ray.init`` (tests/conftest.py). It is
stopped by signalling *that* process, never with ``ray stop``, which would kill every Ray on the machine.
"""

from __future__ import annotations

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
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# What a job must not upload: the venv, data, local runs (.gitignore'd paths are skipped by Ray as well).
EXCLUDES = [".venv", ".git", "data", "runs", "mlruns", "mlflow.db", "ray_results", "benchmarks/results"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """A token-authenticated Ray head on this machine, started and stopped as one process."""

    def __init__(self, num_cpus: int = 2):
        # Short root: Ray's unix sockets live below it and their paths are limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="vp-ray-", dir="/tmp"))
        self.token = secrets.token_hex(32)
        token_file = self.root / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "MLFLOW_TRACKING"))}
        self.env.update(
            RAY_AUTH_MODE="token",  # Ray 2.59+: the dashboard and GCS refuse requests without the token
            RAY_AUTH_TOKEN_PATH=str(token_file),  # this head's own token, not ~/.ray/auth_token
            RAY_USAGE_STATS_ENABLED="0",
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",  # tear down at once on SIGTERM
            MLFLOW_DISABLE_TELEMETRY="true",
            PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in a job is this venv's
        )
        self.dashboard_port = _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        command = [
            str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
            f"--num-cpus={num_cpus}", f"--temp-dir={self.root / 'ray'}",
            f"--object-store-memory={256 * 1024**2}",  # a shared test machine: not 30% of its memory
            f"--port={_free_port()}", f"--ray-client-server-port={_free_port()}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--dashboard-agent-listen-port={_free_port()}", f"--metrics-export-port={_free_port()}",
        ]  # fmt: skip
        self.log = self.root / "head.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip

    def client(self):
        from ray.job_submission import JobSubmissionClient

        return JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})

    def wait_ready(self, timeout_s: float = 90.0):
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"ray start exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                client = self.client()
                client.list_jobs()
                return client
            except Exception as exc:  # noqa: BLE001 - not up yet: connection refused, 5xx while starting
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the Ray head was not ready in {timeout_s:.0f} s ({exc}):\n"
                                       f"{self.log.read_text()[-3000:]}") from exc  # fmt: skip
                time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM to `ray start --block` makes it shut down every process it started; then sweep."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self._kill_leftovers()
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """Processes of this head that outlived it (their command lines name its temp dir)."""
        import psutil

        marker = str(self.root)
        for proc in psutil.process_iter(["pid", "cmdline"]):
            if any(marker in part for part in proc.info["cmdline"] or []):
                try:
                    proc.kill()
                except psutil.NoSuchProcess:
                    pass


@pytest.fixture(scope="module")
def ray_head():
    head = RayHead(num_cpus=2)
    try:
        head.wait_ready()
        yield head
    finally:  # also when the test (or the start) fails
        head.stop()


def wait_for_job(client, job_id: str, timeout_s: float):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(job_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                                             JobStatus.STOPPED}:  # fmt: skip
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(f"job {job_id} still {status} after {timeout_s:.0f} s; logs:\n{client.get_job_logs(job_id)}")
        time.sleep(1)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} ended {status}; logs:\n{logs}"
    return logs


@pytest.mark.ray
@pytest.mark.timeout(300)  # generous: a loaded 2-core machine is several times slower than an idle one
def test_job_runs_submitted_code_in_the_project_env(ray_head):
    """The README's command (`ray job submit --working-dir .` with RAY_AUTH_MODE=token): the token is needed,
    the uploaded working dir comes first on sys.path, and `python` is the project's interpreter."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"{ray_head.address}/api/jobs/", timeout=10)
    assert refused.value.code == 401  # no token, no jobs

    probe = ("import json, sys, ray, pipeline; ray.init(); "
             "print('PROBE', json.dumps({'python': sys.executable, 'pipeline': pipeline.__file__, "
             "'cpus': ray.cluster_resources().get('CPU')}))")  # fmt: skip
    env = {**ray_head.env, "RAY_ADDRESS": ray_head.address}  # token mode and this head's token file
    submit = [str(VENV_BIN / "ray"), "job", "submit", "--working-dir", ".", "--", "python", "-c", probe]
    done = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr  # `ray job submit` waits and fails with the job
    facts = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("PROBE ")).split(" ", 1)[1])
    assert Path(facts["python"]) == Path(sys.executable)
    assert "working_dir_files" in facts["pipeline"]  # the uploaded copy, not the editable install in REPO
    assert not facts["pipeline"].startswith(str(REPO))
    assert facts["cpus"] == 2


@pytest.mark.ray
@pytest.mark.timeout(480)  # generous: a loaded 2-core machine is several times slower than an idle one
def test_train_job_logs_its_mlflow_run(ray_head):
    """`jobs/train.py` with a tiny config, submitted like on the cluster, trains and records one MLflow run."""
    from mlflow.tracking import MlflowClient

    from tests.datasets import make_digits_shards

    # Outside the repo (not uploaded with the working dir), inside the head's folder (removed with it, after
    # every process of the head, the job's included, has stopped).
    work = ray_head.root / "job"
    shards = make_digits_shards(work / "digits", image_size=16, samples_per_shard=200)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"  # absolute: the job runs in another directory
    overrides = {
        "run_name": "job-submission", "storage_path": str(work / "runs"),
        "data.train": str(shards / "train"), "data.val": str(shards / "val"), "data.test": str(shards / "test"),
        "data.img_size": 16, "data.batch_size": 64, "data.loader_workers": 0,
        "model.kwargs": "{depth: 1, embed_dim: 32}", "optim.epochs": 1, "optim.warmup_epochs": 0,
        "scaling.num_workers": 1, "scaling.timeout_s": 60,
        "mlflow.tracking_uri": tracking_uri, "mlflow.experiment": "job-submission",
        "mlflow.log_model": False, "mlflow.system_metrics": False,  # not what this test is about
    }  # fmt: skip
    entrypoint = "python jobs/train.py --config configs/tiny_cpu.yaml --new " + " ".join(
        f"--set '{key}={value}'" for key, value in overrides.items())
    client = ray_head.client()
    job_id = client.submit_job(entrypoint=entrypoint,
                               runtime_env={"working_dir": str(REPO), "excludes": EXCLUDES})  # fmt: skip
    logs = wait_for_job(client, job_id, timeout_s=420)

    mlflow_client = MlflowClient(tracking_uri)
    experiment = mlflow_client.get_experiment_by_name("job-submission")
    assert experiment is not None, f"the job made no MLflow experiment; logs:\n{logs}"
    runs = mlflow_client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.run_name == "job-submission"
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == "vit_msa_nano"
    assert 0.0 <= run.data.metrics["val/top1"] <= 100.0
    assert run.data.metrics["train/loss"] > 0.0
    assert run.info.run_id in logs  # the driver reported the run it logged to
    assert any((work / "runs" / "job-submission").rglob("*")), "no checkpoint on the run's storage path"


# A stand-in for the AWS CLI's `aws s3 ls|cp|sync`: s3://BUCKET/KEY is the file $FAKE_S3/BUCKET/KEY.
FAKE_AWS = """#!{python}
import os, shutil, sys
from pathlib import Path

root = Path(os.environ["FAKE_S3"])
def local(arg):
    return root / arg.removeprefix("s3://") if arg.startswith("s3://") else Path(arg)
service, command, *args = sys.argv[1:]
assert service == "s3", sys.argv
delete = "--delete" in args
paths = [a for a in args if not a.startswith("--")]
with open(root / "calls.log", "a") as log:
    print(command, *args, file=log)
if command == "ls":
    found = sorted(p.name for p in local(paths[0]).glob("*")) if local(paths[0]).is_dir() else []
    print("\\n".join(found))
    sys.exit(0 if found else 1)
if command == "cp" and paths[1] == "-":
    sys.stdout.buffer.write(local(paths[0]).read_bytes())
elif command == "cp":
    local(paths[1]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(local(paths[0]), local(paths[1]))
elif command == "sync":
    if delete:
        shutil.rmtree(local(paths[1]), ignore_errors=True)
    shutil.copytree(local(paths[0]), local(paths[1]), dirs_exist_ok=True)
else:
    sys.exit(f"fake aws: unsupported s3 {{command}}")
"""


@pytest.mark.timeout(120)
def test_build_shards_job_stages_through_s3(tmp_path, monkeypatch):
    """S3 source in, shards out to S3, and the printed `pipe:aws s3 cp` template feeds the training reader."""
    from PIL import Image

    from pipeline.data import build_loader, read_manifest
    from tests.datasets import digits_arrays

    fake_s3, bin_dir = tmp_path / "s3", tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "aws").write_text(FAKE_AWS.format(python=sys.executable))
    (bin_dir / "aws").chmod(0o755)
    images, labels = digits_arrays()
    for i in range(60):  # an ImageFolder of two digit classes, uploaded as raw data
        folder = fake_s3 / "bucket" / "raw" / "digits" / f"digit{labels[i] % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(folder / f"{i}.png")
    monkeypatch.setenv("FAKE_S3", str(fake_s3))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")

    command = [sys.executable, str(REPO / "jobs" / "build_shards.py"), "s3://bucket/raw/digits",
               "s3://bucket/shards/digits", "--format", "imagefolder", "--samples-per-shard", "16",
               "--val-fraction", "0.2", "--no-progress"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    uploaded = fake_s3 / "bucket" / "shards" / "digits"
    assert read_manifest(uploaded / "train").num_samples == 48 and read_manifest(uploaded / "val").num_samples == 12
    template = "pipe:aws s3 cp s3://bucket/shards/digits/train/{name} -"
    assert f'train: "{template}"' in done.stdout

    manifest = read_manifest(template)  # read through the (fake) AWS CLI, as GPU workers do
    assert manifest.num_samples == 48 and manifest.classes == ("digit0", "digit1")
    loader = build_loader(template, batch_size=8, train=False, num_workers=0)
    assert sum(len(batch[1]) for batch in loader) == 48

    again = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert again.returncode == 2 and "already holds files; pass --overwrite" in again.stderr
