"""Sweeps on Ray Tune: a real one (3 trials x 2 gloo workers, 2 epochs) on the session's Ray, and the summary.

The real sweep searches a grid of learning rates on the digits: 3.0e-3 and 1.0e-3 learn, 5.0 (AdamW) blows
the loss up by orders of magnitude in its first epoch. It is ranked by val/loss (min), where a blown-up
trial is far from the others whatever the luck of two epochs, and ASHA (grace 1 epoch, reduction factor
2) compares each trial at epoch 1 against those already recorded there. The grid runs in order, 2 trials
at a time: the bad trial is third, so it starts after one of the first two ended and has at least one
record to lose against, so it is stopped at epoch 1 every time.

Resources: the session's Ray has 4 logical CPUs (tests/conftest.py); a trial holds 1 CPU itself plus
2 workers x 0.5 CPU, so 2 trials run at once (on 2 real cores: 6 training processes, time-shared).
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pipeline.tune.space import parse_space
from pipeline.tune.sweep import STOPPED_EARLY, SweepResult, TrialRow, _status, plot_metric_vs_knobs, run_sweep

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

GRID = {
    "metric": "val/loss", "mode": "min", "search": "grid",
    "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 2},
    "parameters": {"optim.lr": {"grid": [3.0e-3, 1.0e-3, 5.0]}},
}  # fmt: skip


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _history(client, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def _interrupt_after(completions: int):
    """A Tune callback that interrupts the sweep (SIGUSR1, as Tune's handler expects) once ``completions``
    trials ended: the state on disk is then that of a sweep killed mid-way."""
    from ray import tune

    class InterruptAfter(tune.Callback):
        def __init__(self):
            self.ended = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.ended += 1
            if self.ended == completions:
                os.kill(os.getpid(), signal.SIGUSR1)

    return InterruptAfter()


@pytest.mark.ray
@pytest.mark.timeout(1200)
def test_a_sweep_stops_the_bad_trial_resumes_after_an_interruption_and_registers_its_champion(
    ray_local, tiny_config, digits_shards
):
    config = tiny_config(run_name="sw", scaling__cpus_per_worker=0.5, mlflow__system_metrics=False,
                         mlflow__log_model=False)  # fmt: skip
    space = parse_space(GRID, source="grid.yaml")
    uri = config.mlflow.tracking_uri
    client = MlflowClient(uri, registry_uri=uri)

    first = run_sweep(space, config, name="lr-grid", callbacks=[_interrupt_after(2)])
    assert first.interrupted and first.promotion is None
    parent = client.get_run(first.parent_run_id)
    assert parent.info.status == "KILLED" and parent.data.tags["vitpipe.status"].startswith("interrupted")
    assert sum(r.status in ("completed", "stopped early") for r in first.rows) == 2

    second = run_sweep(space, config, name="lr-grid")  # the same call again: resumes
    assert not second.interrupted and second.parent_run_id == first.parent_run_id
    parent = client.get_run(second.parent_run_id)
    assert parent.info.status == "FINISHED" and parent.data.tags["vitpipe.role"] == "sweep"

    # The table: every grid point once; the diverging trial stopped by ASHA after its first epoch.
    rows = {r.values["optim.lr"]: r for r in second.rows}
    assert sorted(rows) == [1.0e-3, 3.0e-3, 5.0]
    bad = rows[5.0]
    assert (bad.status, bad.epochs, bad.best_epoch) == ("stopped early", 1, 1)
    assert bad.best > 10 * max(rows[1.0e-3].best, rows[3.0e-3].best)  # blown up, not merely worse
    assert any(r.status == "completed" and r.epochs == 2 for r in second.rows)
    assert {r.status for r in second.rows} <= {"completed", "stopped early"}
    csv = Path(second.path, "trials.csv").read_text().splitlines()
    assert csv[0].startswith("trial,status,epochs,best_val/loss,best_epoch,optim.lr") and len(csv) == 4

    # MLflow: one child per trial under the parent (the resumed trial kept its run), params and curves.
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")  # fmt: skip
    assert sorted(c.data.tags["vitpipe.trial_id"] for c in children) == sorted(r.trial_id for r in second.rows)
    by_trial = {c.data.tags["vitpipe.trial_id"]: c for c in children}
    for row in second.rows:
        child = by_trial[row.trial_id]
        assert child.info.run_id == row.run_id and float(child.data.params["optim.lr"]) == row.values["optim.lr"]
        assert child.data.params["checkpoint.metric"] == "val/loss"  # each trial keeps its checkpoints by it
        losses = _history(client, child.info.run_id, "val/loss")
        # Tune stops a trial asynchronously: on a fast machine its worker may log one more epoch first
        seen = {epoch: loss for epoch, loss in losses.items() if epoch <= row.epochs}
        assert sorted(seen) == list(range(1, row.epochs + 1)) and math.isclose(min(seen.values()), row.best)
        assert row.status != "completed" or len(losses) == row.epochs
        if row.status == "completed":
            assert child.info.status == "FINISHED" and "curves.png" in _artifacts(client, child.info.run_id)
        else:
            assert child.info.status == "KILLED" and child.data.tags["vitpipe.status"].startswith(STOPPED_EARLY)
    parent_artifacts = _artifacts(client, parent.info.run_id)
    assert {"sweep/trials.csv", "sweep/trials.txt", "sweep/metric_vs_knobs.png", "space.yaml", "config.yaml"} <= parent_artifacts
    assert parent.data.metrics["best_val/loss"] == pytest.approx(second.best.best)

    # The champion: the best trial's best checkpoint, registered once, loadable and reproducible without Ray.
    best = min(second.rows, key=lambda r: r.best)
    assert second.best is best and second.promotion.created
    version = client.get_model_version_by_alias("vit_msa_nano", "champion")
    assert str(version.version) == second.promotion.version and version.run_id == best.run_id
    assert version.tags["vitpipe.trial_id"] == best.trial_id and version.tags["vitpipe.sweep_run_id"] == parent.info.run_id
    assert float(version.tags["vitpipe.metric_value"]) == best.best and version.tags["vitpipe.metric"] == "val/loss"
    assert version.tags["vitpipe.epoch"] == str(best.best_epoch) and float(version.tags["config.optim.lr"]) == best.values["optim.lr"]
    assert json.loads(version.tags["vitpipe.config"])["optim"]["lr"] == best.values["optim.lr"]

    from pipeline.eval.evaluate import evaluate_model

    report = evaluate_model("models:/vit_msa_nano@champion", digits_shards, split="val", tracking_uri=uri)
    logged_top1 = _history(client, best.run_id, "val/top1")[best.best_epoch]
    assert report.metrics["loss"] == pytest.approx(best.best, rel=1e-5)
    assert report.metrics["top1"] == pytest.approx(logged_top1, abs=1e-9)

    # A finished sweep run again: nothing retrained, nothing registered twice.
    third = run_sweep(space, config, name="lr-grid")
    assert third.promotion.version == second.promotion.version and not third.promotion.created
    assert len(client.search_model_versions("name = 'vit_msa_nano'")) == 1
    assert [(r.trial_id, r.status, r.epochs) for r in third.sorted_rows()] == [
        (r.trial_id, r.status, r.epochs) for r in second.sorted_rows()
    ]


# --------------------------------------------------------------------------------------------------
# The summary (no Ray).


def _result(rows: list[TrialRow], mode: str = "max") -> SweepResult:
    return SweepResult(name="s", path="/x", parent_run_id="p", metric="val/top1", mode=mode,
                       keys=["optim.lr", "model.kwargs.attn_kwargs.bias_sharing"], rows=rows, best=None,
                       interrupted=False)  # fmt: skip


def _row(trial_id, status, best, lr, sharing, epochs=2):
    return TrialRow(trial_id, status, epochs, best, None if best is None else epochs, None,
                    {"optim.lr": lr, "model.kwargs.attn_kwargs.bias_sharing": sharing}, f"run-{trial_id}")


def test_a_trial_status_comes_from_its_run_and_from_tune():
    assert _status("finished", "TERMINATED", False) == "completed"
    assert _status("running", "TERMINATED", False) == "stopped early"  # ended by the scheduler
    # ended by the scheduler while rank 0 saw its controller die (the trial's placement group removed)
    assert _status("failed: ActorDiedError: ... placement group was removed", "TERMINATED", False) == "stopped early"
    assert _status("failed: ValueError: boom", None, False) == "failed"  # a trial that failed by itself
    assert _status("running", "PENDING", False) == "unfinished"  # ended by an interruption: resumes
    assert _status("running", None, False) == "unfinished"
    assert _status("non_finite_loss", "TERMINATED", False) == "non-finite loss"
    assert _status("stopped_early: asha after epoch 1", None, False) == "stopped early"
    assert _status("failed: WorkerGroupError", "ERROR", True) == "error"
    assert _status(None, "ERROR", False) == "error" and _status(None, "PENDING", False) == "not started"


def test_the_table_ranks_trials_by_the_metric_and_the_plot_has_a_panel_per_knob(tmp_path):
    rows = [_row("t0", "completed", 61.5, 1.0e-3, "none"), _row("t1", "stopped early", 20.0, 3.0e-3, "tied", 1),
            _row("t2", "completed", 75.25, 3.0e-4, "heads"), _row("t3", "error", None, 1.0e-4, "none", 0)]  # fmt: skip
    rows[0].baseline = True
    result = _result(rows)
    assert result.baseline is rows[0] and _result(rows[1:]).baseline is None
    lines = result.table().splitlines()
    assert lines[0].split() == ["trial", "status", "epochs", "best", "val/top1", "best_epoch", "optim.lr",
                                "model.kwargs.attn_kwargs.bias_sharing"]  # fmt: skip
    assert [line.split()[0] for line in lines[1:]] == ["t2", "t0", "t1", "t3"]  # best first, unscored last
    assert lines[2].startswith("t0 (baseline)  completed")
    assert "75.2500" in lines[1] and "0.0003" in lines[1]
    assert [r.trial_id for r in _result(rows, mode="min").sorted_rows()] == ["t1", "t0", "t2", "t3"]
    csv = result.csv().splitlines()
    assert csv[0] == "trial,status,epochs,best_val/top1,best_epoch,optim.lr,model.kwargs.attn_kwargs.bias_sharing,baseline,mlflow_run_id,checkpoint"
    assert csv[1] == "t2,completed,2,75.25,2,0.0003,heads,False,run-t2,"
    assert csv[2] == "t0,completed,2,61.5,2,0.001,none,True,run-t0,"

    space = parse_space({"parameters": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
                                        "model.kwargs.attn_kwargs.bias_sharing": {"choice": ["none", "tied", "heads"]}}})  # fmt: skip
    path = plot_metric_vs_knobs(result, space, tmp_path / "plot.png")
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.shape[1] > 1.8 * image.shape[0]  # two panels side by side
    assert plot_metric_vs_knobs(_result([rows[3]]), space, tmp_path / "none.png") is None  # nothing scored
