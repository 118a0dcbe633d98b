"""Real Ray Train runs: 2 gloo DDP workers on the digits (uneven shards), tracked in MLflow.

Few and small: each run is a 2-block ViT on 16x16 images for 2-3 epochs, on the session's one Ray.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import ray
import torch
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.train.checkpoint import latest_checkpoint, load_checkpoint, load_model
from pipeline.train.launcher import train

# A hang fails in TorchConfig(timeout_s=60); these limits only bound a run on a busy 2-core machine.
pytestmark = [pytest.mark.ray, pytest.mark.timeout(360)]


def _runs(config) -> list:
    client = MlflowClient(config.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(config.mlflow.experiment)
    return client.search_runs([experiment.experiment_id])


def _artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


def _steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _timm_lr(config, step: int) -> float:
    """The learning rate timm's scheduler gives at ``step`` for a fresh run of ``config`` (21 steps per epoch)."""
    from timm.scheduler import create_scheduler_v2

    opt = config.optim
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=opt.lr)
    scheduler, _ = create_scheduler_v2(optimizer, sched=opt.scheduler, num_epochs=opt.epochs,
                                       warmup_epochs=opt.warmup_epochs, warmup_lr=opt.warmup_lr, min_lr=opt.min_lr,
                                       step_on_epochs=False, updates_per_epoch=21)  # fmt: skip
    scheduler.step_update(step)
    return optimizer.param_groups[0]["lr"]


@torch.no_grad()
def _top1_single_process(model, config) -> float:
    """Top-1 (%) over the whole val split in one process: the reference for the ranks' reduced value."""
    from pipeline.data.reader import build_loader
    from pipeline.data.transforms import build_transform
    from pipeline.train.build import eval_crop_pct

    transform = build_transform(config.data.img_size, train=False, in_chans=config.data.in_chans,
                                crop_pct=eval_crop_pct(config))  # fmt: skip
    loader = build_loader(config.data.val, batch_size=50, train=False, num_workers=0, transform=transform)
    correct = total = 0
    for images, labels in loader:
        keep = labels >= 0
        correct += (model(images[keep]).argmax(-1) == labels[keep]).sum().item()
        total += keep.sum().item()
    assert total == 150  # every val sample once: 10% of the 1,497 train+val digits, no padding counted
    return 100.0 * correct / total


def test_two_worker_run_on_uneven_shards_tracks_checkpoints_and_loads_without_ray(ray_local, tiny_config):
    config = tiny_config(checkpoint__keep=1, profile__steps=[3, 5], log_every=5)
    summary = train(config)

    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    client = MlflowClient(config.mlflow.tracking_uri)
    (run,) = _runs(config)
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.tags[tracking.TAG_STATUS] == "finished"
    assert run.data.tags["mlflow.source.git.commit"]
    # flattened config and the model's size as params
    assert run.data.params["optim.lr"] == "0.003" and run.data.params["model.kwargs.depth"] == "2"
    assert run.data.params["scaling.num_workers"] == "2" and int(run.data.params["model.params"]) > 0
    # per-epoch metrics, one point per epoch, and system metrics sampled alongside
    for key in ("train/loss", "val/loss", "val/top1", "val/top5", "train/images_per_s", "train/data_wait_share"):
        assert _steps(client, run.info.run_id, key) == [1, 2], key
    assert 0.0 < run.data.metrics["train/data_wait_share"] < 1.0  # loader_workers 0: decoding is waited for
    # system metrics named by node: both ranks are on this one, whose first rank samples it
    nodes = {key.split("/")[1] for key in run.data.metrics if key.startswith("system/")}
    ip = ray.util.get_node_ip_address()
    assert nodes == {ip} and f"system/{ip}/cpu_utilization_percentage" in run.data.metrics
    # where a step's time goes, per logging window (every 5 steps; 21 per epoch) and per epoch
    for key in ("train/step_time_s_step", "train/data_wait_s_step", "train/compute_s_step"):
        assert _steps(client, run.info.run_id, key) == [5, 10, 15, 20, 25, 30, 35, 40], key
    m = run.data.metrics
    assert m["train/compute_s_step"] + m["train/data_wait_s_step"] == pytest.approx(m["train/step_time_s_step"])
    assert m["train/compute_s"] > 0 and 0 < m["train/data_wait_s"] < m["train/data_wait_s"] + m["train/compute_s"]
    # achieved TFLOP/s: the training form's MACs (logged as a param) x 2 x 3 x one worker's images/s
    macs = int(run.data.params["model.macs_train"])
    assert macs == int(run.data.params["model.macs"]) > 0  # a plain ViT: the same forward in both forms
    assert m["train/tflops_per_worker"] == pytest.approx(macs * 6 * m["train/images_per_s"] / 2 / 1e12, rel=1e-9)
    assert "train/mfu" not in m  # CPU: no bf16 peak to measure against
    loss = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.step)]
    assert loss[1] < loss[0] - 0.05, f"train loss did not fall: {loss}"
    artifacts = _artifacts(client, run.info.run_id)
    assert {"config.yaml", "curves.png", "checkpoints/best/state.pt", "checkpoints/best/meta.json"} <= artifacts
    # profile.steps [3, 5]: each rank's trace of those three optimizer steps, and its operator table
    assert {f"profile/rank{r}.{ext}" for r in (0, 1) for ext in ("trace.json", "txt")} <= artifacts
    trace = json.loads(Path(client.download_artifacts(run.info.run_id, "profile/rank1.trace.json")).read_text())
    spans = sorted(e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#"))
    assert spans == ["ProfilerStep#3", "ProfilerStep#4", "ProfilerStep#5"], spans
    assert any(e.get("name") == "aten::scaled_dot_product_attention" or "addmm" in e.get("name", "")
               for e in trace["traceEvents"])  # fmt: skip
    (logged,) = client.search_logged_models([run.info.experiment_id])
    assert logged.source_run_id == run.info.run_id and run.data.tags[tracking.TAG_FINAL_MODEL] == "pt2"

    # Retention: best by val/top1 (keep=1) plus the latest, which resuming needs.
    run_dir = Path(config.run_dir)
    kept = sorted(p.name for p in run_dir.glob("checkpoint_epoch*"))
    best_epoch = summary["best_epoch"]
    assert kept == sorted({f"checkpoint_epoch{best_epoch:04d}", "checkpoint_epoch0002"})
    assert latest_checkpoint(config.run_dir)[1]["epochs_done"] == 2

    # The best checkpoint loads without Ray (weights_only) and reproduces the reported, rank-reduced top-1.
    state = load_checkpoint(summary["best_checkpoint"])
    assert state["epochs_done"] == best_epoch and state["mlflow_run_id"] == run.info.run_id
    assert {"model", "optimizer", "scheduler", "scaler", "ema", "config", "metrics"} <= set(state)
    model = load_model(summary["best_checkpoint"])
    assert _top1_single_process(model, config) == pytest.approx(summary["best_metric"], abs=1e-9)


@pytest.mark.timeout(600)  # three driver starts
def test_rerunning_a_finished_run_with_more_epochs_continues_its_mlflow_run_on_a_replanned_schedule(
    ray_local, tiny_config, capfd
):
    """A worker killed mid-run is tests/test_multinode.py's (a real SIGKILL); here the driver comes back."""
    config = tiny_config(max_failures=1)
    summary = train(config)
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    client = MlflowClient(config.mlflow.tracking_uri)
    (run,) = _runs(config)
    assert run.info.status == "FINISHED" and _steps(client, run.info.run_id, "val/top1") == [1, 2]

    # Re-running the same name with more epochs resumes after epoch 2, into the same MLflow run, with the
    # learning-rate schedule re-planned over the new total (the old plan had reached min_lr at step 42).
    more = tiny_config(max_failures=1, optim__epochs=4)
    resumed = train(more)
    assert resumed["epochs_done"] == 4 and resumed["mlflow_run_id"] == run.info.run_id
    assert "the learning-rate schedule is re-planned over 4 epochs from step 42" in capfd.readouterr().out
    (run,) = _runs(config)
    assert run.info.status == "FINISHED" and _steps(client, run.info.run_id, "val/top1") == [1, 2, 3, 4]
    assert load_checkpoint(latest_checkpoint(more.run_dir)[0])["global_step"] == 4 * 21
    lr = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/lr")}
    assert lr[3] == pytest.approx(_timm_lr(more, step=3 * 21), rel=1e-6) and lr[3] > 10 * more.optim.min_lr
    assert lr[2] == pytest.approx(more.optim.min_lr)  # the 2-epoch plan's end

    # And once more: nothing left to train; Ray is not even asked.
    assert train(more)["status"] == "already_finished"
    assert len(_runs(config)) == 1


@pytest.mark.ray
def test_two_worker_castling_run_trains_past_the_closed_branch(ray_local, tiny_config):
    """DDP wants a gradient for every parameter at every step: after the gate schedule reaches 0 (half-way
    here) the branch still runs, adding exactly nothing, and the run finishes with the masks empty."""
    config = tiny_config(model__name="castling_vit_nano", method__castling__branch_off_at=0.5,
                         mlflow__log_model=False)  # fmt: skip
    assert config.scaling.num_workers == 2 and not config.scaling.find_unused_parameters
    summary = train(config)
    assert summary["status"] == "finished" and summary["epochs_done"] == 2
    client = MlflowClient(config.mlflow.tracking_uri)
    (run,) = _runs(config)
    densities = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "castling/mask_density_mean")}
    assert densities[1] > 0 and densities[2] == 0.0  # epoch 2 runs entirely after the schedule's end
    assert "vitpipe.castling_open_masks" not in run.data.tags


# The digits (1,797 8x8 scans, 16x16 shards) upscaled to the nano's 32x32, 3 epochs of ~1,200 images at
# lr 2e-3; measured 94.0% val top-1 (chance is 10%).
LSLA_DIGITS_FLOOR = 85.0


def test_two_worker_lsla_run_learns_the_digits(ray_local, tiny_config):
    """ViT-LSLA, the hierarchical backbone at its own size, trained by 2 DDP workers through train()."""
    config = tiny_config(model__name="vit_lsla_nano", model__kwargs={}, data__img_size=32, optim__epochs=3,
                         optim__lr=2.0e-3, mlflow__log_model=False)  # fmt: skip
    summary = train(config)
    assert summary["status"] == "finished" and config.scaling.num_workers == 2
    (run,) = _runs(config)
    assert run.data.params["model.name"] == "vit_lsla_nano"
    assert summary["best_metric"] >= LSLA_DIGITS_FLOOR, f"val top-1 {summary['best_metric']:.1f}%"
