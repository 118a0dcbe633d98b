"""Jobs as the GPU cluster runs them (issue 8): submitted to a real Ray head through the job-submission
API, and the shard-building job staging through S3 (a stand-in AWS CLI).

The jobs go to a real ``ray start`` head (``ray_head`` in tests/conftest.py) with its own temp dir, ports and
token, apart from the in-process ``ray.init`` of the other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
# What a job must not upload: the venv, data, local runs (.gitignore'd paths are skipped by Ray as well).
EXCLUDES = [".venv", ".git", "data", "runs", "mlruns", "mlflow.db", "ray_results", "benchmarks/results"]


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
    assert facts["cpus"] == ray_head.num_cpus


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
