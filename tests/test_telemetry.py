"""Each node's system metrics (pipeline.train.telemetry.NodeSystemMetrics) against a real SQLite store."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.train.telemetry import NodeSystemMetrics


def _cpu_steps(client: MlflowClient, run_id: str, node: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, f"system/{node}/cpu_utilization_percentage"))


@pytest.mark.timeout(60)
def test_each_sample_is_in_the_store_when_taken_and_a_restart_continues_the_steps(tmp_path, monkeypatch):
    # what mlflow.set_system_metrics_sampling_interval(10) leaves behind, in this process or a parent of it:
    # MLflow's own monitor would take it over the interval it is given; the config's interval wins here
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "60")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("e")).info.run_id

    with NodeSystemMetrics(uri, run_id, "10.0.0.7", first_on_node=True, interval_s=0.2):
        deadline = time.monotonic() + 30
        while len(_cpu_steps(client, run_id, "10.0.0.7")) < 3:  # in the store while the run goes on
            assert time.monotonic() < deadline, "no system metrics within 30 s at a 0.2 s interval"
            time.sleep(0.1)
        with NodeSystemMetrics(uri, run_id, "10.0.0.7", first_on_node=False, interval_s=0.2):
            pass  # another rank on the same node samples nothing
    first = _cpu_steps(client, run_id, "10.0.0.7")
    assert first == list(range(len(first)))

    client.set_terminated(run_id, "FAILED")  # a restarted worker group samples a run that is not RUNNING yet
    with NodeSystemMetrics(uri, run_id, "10.0.0.7", first_on_node=True, interval_s=0.2):
        time.sleep(0.5)
    steps = _cpu_steps(client, run_id, "10.0.0.7")
    assert steps == list(range(len(steps))) and len(steps) > len(first)  # one line of steps, none repeated
    keys = set(client.get_run(run_id).data.metrics)
    assert {"system/10.0.0.7/system_memory_usage_percentage", "system/10.0.0.7/disk_usage_percentage"} <= keys
    assert all(key.startswith("system/10.0.0.7/") for key in keys)
