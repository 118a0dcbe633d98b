"""MLflow outages (issue 20): a real ``mlflow server`` stopped and restarted in the middle of a run, and a
server that is down when a run resumes. Training goes on; no metric is lost; no MLflow run is forked."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.cluster import start_mlflow_server, stop_mlflow_server
from pipeline.train.checkpoint import checkpoint_dir_name
from pipeline.train.launcher import train
from tests.test_train_ray import _artifacts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(path: Path, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_a_resume_while_mlflow_is_down_waits_and_fails_instead_of_forking_a_run(tmp_path, monkeypatch):
    """A refused connection is MLflow's INTERNAL_ERROR, like a real server fault: it is waited for (here 2 s),
    then a clear error; only "does not exist" starts a new run."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the wait under test, not MLflow's own 4 min
    down = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailableError, match=rf"MLflow at {down} was unreachable for 2 s "
                                                                r"\(mlflow.outage_wait_s\) while calling get_run"):  # fmt: skip
        tracking.open_run(down, "e", "r", params={}, tags={}, resume_run_id="0123abcd", outage_wait_s=2)
    assert time.monotonic() - started >= 1.0  # retried, not given up at the first refusal

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_id, resumed = tracking.open_run(store, "e", "r", params={"a": 1}, tags={}, resume_run_id="0123abcd")
    assert not resumed and run_id != "0123abcd"  # a store that answers "no such run": a new run, said so
    assert tracking.open_run(store, "e", "r", params={}, tags={}, resume_run_id=run_id) == (run_id, True)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_run_goes_on_while_its_mlflow_server_restarts_and_logs_every_epoch_once(ray_local, tiny_config, tmp_path):
    """The server (the head node's, as cluster.yaml runs it) is stopped once epoch 1 is reported and started
    again after epoch 3: epochs 2 and 3 train while it is down, their metrics arrive once it is back; the
    node's system metrics, sampled all along, reach it too, on one line of steps."""
    port = _free_port()
    state_dir, db = tmp_path / "server", tmp_path / "server" / "mlflow.db"
    serve = dict(db=db, artifacts=str(tmp_path / "artifacts"), port=port, private_address="127.0.0.2",
                 state_dir=state_dir, workers=1)  # fmt: skip
    start_mlflow_server(**serve)
    config = tiny_config(run_name="outage", optim__epochs=6, mlflow__tracking_uri=f"http://127.0.0.1:{port}",
                         mlflow__system_metrics_interval_s=0.5, mlflow__log_model=False)  # fmt: skip
    run_dir = Path(config.run_dir)
    timeline: dict[str, bool] = {}
    down_at = 0.0

    def outage():
        nonlocal down_at
        if _wait_for(run_dir / checkpoint_dir_name(1), 240):
            timeline["stopped"] = stop_mlflow_server(state_dir)
            down_at = time.time()
            # Training does not wait for MLflow: two more epochs end while the server is down.
            timeline["trained_while_down"] = _wait_for(run_dir / checkpoint_dir_name(3), 120)
        start_mlflow_server(**serve)
        timeline["restarted"] = True

    server_thread = threading.Thread(target=outage)
    server_thread.start()
    try:
        summary = train(config)
    finally:
        server_thread.join(timeout=300)
    try:
        assert timeline == {"stopped": True, "trained_while_down": True, "restarted": True}
        assert summary["status"] == "finished" and summary["epochs_done"] == 6
        client = MlflowClient(config.mlflow.tracking_uri)
        (run,) = client.search_runs([client.get_experiment_by_name(config.mlflow.experiment).experiment_id])
        assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
        for key in ("train/loss", "val/top1", "val/loss", "train/lr"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3, 4, 5, 6], key
        assert {"checkpoints/best/state.pt", "curves.png"} <= _artifacts(client, run.info.run_id)
        cpu = client.get_metric_history(run.info.run_id, f"system/{ray.util.get_node_ip_address()}/"
                                                          "cpu_utilization_percentage")  # fmt: skip
        assert sorted(m.step for m in cpu) == list(range(len(cpu))), "a system-metrics step lost or repeated"
        assert min(m.timestamp for m in cpu) < 1000 * down_at < max(m.timestamp for m in cpu)  # sent once it was back
    finally:
        stop_mlflow_server(state_dir)
