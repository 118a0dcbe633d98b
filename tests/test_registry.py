"""The MLflow Model Registry and evaluation without Ray: promotion, idempotence, the alias, loading back.

Checkpoints are written here in-process with the training code's own ``save_checkpoint`` (no Ray): a tiny
ViT trained a few steps on the digits, its validation metrics computed by an independent reference below.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from pipeline import tracking
from pipeline.eval.evaluate import evaluate_model
from pipeline.registry import RegistryError, best_checkpoint, load, promote_checkpoint, promote_run
from pipeline.train.build import build_model
from pipeline.train.checkpoint import checkpoint_dir_name, save_checkpoint

pytestmark = pytest.mark.timeout(300)
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(autouse=True)
def no_stray_store(tmp_path, monkeypatch):
    """Run each test in an empty folder: MLflow's default store (./mlflow.db, ./mlruns) must not appear there,
    i.e. nothing fell back on MLflow's global tracking or registry URI."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    monkeypatch.chdir(folder)
    yield folder
    assert sorted(p.name for p in folder.iterdir()) == []


def val_batches(config, split: str = "val"):
    from pipeline.data.reader import build_loader
    from pipeline.data.transforms import build_transform
    from pipeline.train.build import eval_crop_pct

    transform = build_transform(config.data.img_size, train=False, in_chans=config.data.in_chans,
                                crop_pct=eval_crop_pct(config))  # fmt: skip
    return build_loader(getattr(config.data, split) or str(Path(config.data.val).parent / split), batch_size=64,
                        train=False, transform=transform, num_workers=0)  # fmt: skip


@torch.no_grad()
def reference_metrics(model, config) -> dict[str, float]:
    """Loss / top-1 / top-5 over the val split, one pass, written out plainly (the reference)."""
    model.eval()
    loss = correct1 = correct5 = total = 0.0
    for images, labels in val_batches(config):
        keep = labels >= 0
        logits = model(images[keep]).float()
        labels = labels[keep]
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        top5 = logits.topk(5, dim=-1).indices
        correct1 += (top5[:, 0] == labels).sum().item()
        correct5 += (top5 == labels[:, None]).any(-1).sum().item()
        total += len(labels)
    assert total == 150  # every val sample once
    return {"val/loss": loss / total, "val/top1": 100 * correct1 / total, "val/top5": 100 * correct5 / total}


def write_checkpoint(config, run_dir: Path, *, epochs_done: int, steps: int, run_id: str | None = None) -> Path:
    """Train ``steps`` AdamW steps from the config's seed, save a checkpoint as the training loop lays it out."""
    from pipeline.data.reader import build_loader
    from pipeline.data.transforms import build_transform

    from pipeline.train.build import eval_crop_pct

    torch.manual_seed(config.optim.seed)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr)
    transform = build_transform(config.data.img_size, train=False, in_chans=config.data.in_chans,
                                crop_pct=eval_crop_pct(config))  # fmt: skip
    batches = iter(build_loader(config.data.train, batch_size=32, train=True, transform=transform, num_workers=0))
    model.train()
    for _ in range(steps):
        images, labels = next(batches)
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    metrics = {"epoch": epochs_done, **reference_metrics(model, config)}
    directory = run_dir / checkpoint_dir_name(epochs_done)
    save_checkpoint(directory, {
        "epochs_done": epochs_done, "global_step": steps, "model": model.state_dict(),
        "optimizer": optimizer.state_dict(), "scheduler": {}, "scaler": {}, "ema": None,
        "config": config.to_dict(), "metrics": metrics, "mlflow_run_id": run_id, "run_name": config.run_name,
    })  # fmt: skip
    return directory


def open_training_run(config, **tags) -> str:
    """An MLflow run as ``vitpipe train`` opens it: the params and the run-directory tag promotion reads."""
    run_id, _ = tracking.open_run(config.mlflow.tracking_uri, config.mlflow.experiment, config.run_name,
                                  params={"checkpoint.metric": config.checkpoint.metric,
                                          "checkpoint.mode": config.checkpoint.mode, "model.name": config.model.name},
                                  tags={tracking.TAG_RUN_DIR: config.run_dir, **tags})  # fmt: skip
    return run_id


@pytest.fixture(scope="module")
def trained_run(digits_shards, tmp_path_factory):
    """An MLflow run whose run directory holds two checkpoints: epoch 1 untrained, epoch 2 trained 30 steps.

    Shared by the tests of this module (read-only); each registers under its own model name.
    """
    from pipeline.train.config import TrainConfig, resolve_config
    from tests.conftest import tiny_train_dict

    config = resolve_config(TrainConfig.from_dict(
        tiny_train_dict(digits_shards, tmp_path_factory.mktemp("registry"), run_name="reg")))
    run_id = open_training_run(config)
    early = write_checkpoint(config, Path(config.run_dir), epochs_done=1, steps=0, run_id=run_id)
    late = write_checkpoint(config, Path(config.run_dir), epochs_done=2, steps=30, run_id=run_id)
    return config, run_id, early, late


def metrics_of(directory: Path) -> dict:
    return json.loads((directory / "meta.json").read_text())["metrics"]


def test_promote_registers_the_best_checkpoint_once_and_the_alias_follows(trained_run):
    config, run_id, early, late = trained_run
    assert metrics_of(late)["val/top1"] > metrics_of(early)["val/top1"] + 10  # the trained one is clearly better
    assert best_checkpoint(config.run_dir, "val/top1", "max")[0] == str(late)
    assert best_checkpoint(config.run_dir, "val/loss", "min")[0] == str(late)
    uri = config.mlflow.tracking_uri
    client = MlflowClient(uri, registry_uri=uri)

    first = promote_run(run_id, tracking_uri=uri)
    assert (first.name, first.version, first.created, first.checkpoint) == ("vit_msa_nano", "1", True, str(late))
    version = client.get_model_version_by_alias("vit_msa_nano", "champion")
    assert str(version.version) == "1" and version.run_id == run_id
    tags = version.tags
    assert tags["vitpipe.metric"] == "val/top1" and float(tags["vitpipe.metric_value"]) == metrics_of(late)["val/top1"]
    assert tags["vitpipe.epoch"] == "2" and tags["vitpipe.source_run_id"] == run_id
    assert json.loads(tags["vitpipe.config"])["model"]["kwargs"] == {"depth": 2, "embed_dim": 64, "num_heads": 4}
    assert tags["vitpipe.format"] in ("pt2", "pickle")

    again = promote_run(run_id, tracking_uri=uri)  # the same checkpoint: nothing new
    assert (again.version, again.created) == ("1", False)
    other = promote_checkpoint(early, tracking_uri=uri)  # a different checkpoint: a new version, alias moves
    assert (other.version, other.created, other.run_id) == ("2", True, run_id)
    assert str(client.get_model_version_by_alias("vit_msa_nano", "champion").version) == "2"
    back = promote_checkpoint(late, tracking_uri=uri, alias="champion")
    assert (back.version, back.created) == ("1", False)
    # Run directories on URI storage (s3:// on a cluster) are read through pyarrow: file:// takes that path here.
    remote = best_checkpoint(f"file://{config.run_dir}", "val/top1", "max")[0]
    assert remote == f"file://{late}"
    assert promote_checkpoint(remote, tracking_uri=uri).version == "1"  # the same weights: the same version
    assert str(client.get_model_version_by_alias("vit_msa_nano", "champion").version) == "1"
    assert sorted(str(v.version) for v in client.search_model_versions("name = 'vit_msa_nano'")) == ["1", "2"]


def test_the_champion_loads_without_ray_and_reproduces_its_validation_metrics(trained_run, digits_shards):
    config, run_id, _, late = trained_run
    uri = config.mlflow.tracking_uri
    promote_run(run_id, tracking_uri=uri, name="digits-vit")
    logged = metrics_of(late)

    loaded = load("models:/digits-vit@champion", tracking_uri=uri)
    assert loaded.meta["epochs_done"] == 2 and loaded.config.model.name == "vit_msa_nano"
    reference = build_model(config)
    reference.load_state_dict(torch.load(late / "state.pt", weights_only=True)["model"])
    images = next(iter(val_batches(config)))[0][:8]
    with torch.no_grad():
        assert torch.equal(loaded.model(images), reference.eval()(images))
        # MLflow's own loader reads the same version (pt2 or pickle) and computes the same logits
        with mlflow_uri(uri):
            native = mlflow.pytorch.load_model("models:/digits-vit@champion")
        assert torch.allclose(native(images), reference(images), atol=1e-5)

    report = evaluate_model("models:/digits-vit@champion", digits_shards, split="val", tracking_uri=uri)
    assert report.samples == 150 and report.split == "val" and report.epochs_done == 2
    assert report.metrics["top1"] == pytest.approx(logged["val/top1"], abs=1e-9)
    assert report.metrics["top5"] == pytest.approx(logged["val/top5"], abs=1e-9)
    assert report.metrics["loss"] == pytest.approx(logged["val/loss"], rel=1e-5)
    assert report.budget is None  # not a cascade


class mlflow_uri:
    def __init__(self, uri):
        self.uri = uri

    def __enter__(self):
        self.previous = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)

    def __exit__(self, *exc):
        mlflow.set_tracking_uri(self.previous[0])
        mlflow.set_registry_uri(self.previous[1])


def test_a_sweep_parent_promotes_its_best_trial(trained_run, tmp_path):
    """`vitpipe registry promote PARENT`: the child with the best logged metric, by the sweep's mode."""
    import shutil

    config, _, early, late = trained_run
    uri = config.mlflow.tracking_uri
    parent, _ = tracking.open_run(uri, config.mlflow.experiment, "sweepx", params={},
                                  tags={"vitpipe.role": "sweep", "vitpipe.metric": "val/loss", "vitpipe.mode": "min"})  # fmt: skip
    client = MlflowClient(uri, registry_uri=uri)
    children = {}
    for name, source in (("t0", late), ("t1", early)):  # t0 holds the trained checkpoint: the lower loss
        run_dir = tmp_path / name
        shutil.copytree(source, run_dir / source.name)
        run_id = open_training_run(config, **{"mlflow.parentRunId": parent, "vitpipe.trial_id": name,
                                              tracking.TAG_RUN_DIR: str(run_dir)})  # fmt: skip
        client.log_metric(run_id, "val/loss", metrics_of(source)["val/loss"], step=1)
        children[name] = (run_id, run_dir / source.name)
    assert metrics_of(late)["val/loss"] < metrics_of(early)["val/loss"]

    promotion = promote_run(parent, tracking_uri=uri, name="sweep-best")
    assert promotion.run_id == children["t0"][0] and promotion.checkpoint == str(children["t0"][1])
    tags = client.get_model_version("sweep-best", promotion.version).tags
    assert tags["vitpipe.sweep_run_id"] == parent and tags["vitpipe.trial_id"] == "t0"


def test_nothing_to_promote_or_load_is_a_clear_error(tiny_config, tmp_path):
    config = tiny_config(run_name="empty")
    uri = config.mlflow.tracking_uri
    run_id = open_training_run(config)
    with pytest.raises(RegistryError, match=f"run {run_id} has no checkpoint: none in its run directory"):
        promote_run(run_id, tracking_uri=uri)
    with pytest.raises(RegistryError, match="run 0123abcd is not in"):
        promote_run("0123abcd", tracking_uri=uri)
    with pytest.raises(RegistryError, match="no checkpoint at"):
        promote_checkpoint(tmp_path, tracking_uri=uri)
    with pytest.raises(RegistryError, match="models:/nobody@champion: cannot be fetched"):
        load("models:/nobody@champion", tracking_uri=uri)
    with pytest.raises(RegistryError, match="neither a checkpoint path nor a model URI"):
        load(str(tmp_path / "missing"), tracking_uri=uri)


def _save_tiny_cascade(tiny_config, directory: Path):
    """A one-block DVT cascade, seeded, saved untrained as a checkpoint in ``directory``; returns the model."""
    dvt = tiny_config(run_name="dvt", model__name="dvt_vit_nano", data__img_size=32,
                      model__kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    torch.manual_seed(0)
    model = build_model(dvt)
    save_checkpoint(directory, {"epochs_done": 1, "global_step": 0, "model": model.state_dict(), "ema": None,
                                "config": dvt.to_dict(), "metrics": {}, "mlflow_run_id": None})  # fmt: skip
    return model


def test_cascades_and_castling_are_evaluated_in_their_inference_forms(tiny_config, digits_shards, tmp_path):
    """DVT: the budget curve (calibrated on val, measured on test); Castling: the branch is dropped."""
    from pipeline.models.layers.castling import castling_modules

    _save_tiny_cascade(tiny_config, tmp_path / "dvt")
    report = evaluate_model(tmp_path / "dvt", digits_shards, split="test", out_dir=tmp_path / "out")
    assert report.samples == 300 and {"exit1_top1", "exit2_top1", "exit3_top1"} <= set(report.metrics)
    budget = report.budget
    assert budget is not None and budget.evaluated_on == "test" and budget.calibration_samples == 150
    assert budget.evaluation_samples == 300 and len(budget.points) > 10
    # the cheapest budget point costs about the first exit, the dearest about the whole cascade
    costs = sorted(p.expected_gmacs for p in budget.points)
    assert costs[0] < costs[-1] <= budget.cumulative_gmacs[-1] + 1e-9
    assert {"evaluation.json", "dvt_budget.json", "dvt_budget.png"} <= {p.name for p in (tmp_path / "out").iterdir()}

    castling = tiny_config(run_name="cast", model__name="castling_vit_nano", data__img_size=32,
                           model__kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    model = build_model(castling)
    assert all(m.sparse_branch for _, m in castling_modules(model))  # built in training form
    save_checkpoint(tmp_path / "cast", {"epochs_done": 1, "global_step": 0, "model": model.state_dict(), "ema": None,
                                        "config": castling.to_dict(), "metrics": {}, "mlflow_run_id": None})  # fmt: skip
    loaded = load(tmp_path / "cast")
    assert castling_modules(loaded.model) and not any(m.sparse_branch for _, m in castling_modules(loaded.model))
    assert evaluate_model(tmp_path / "cast", digits_shards, split="val").samples == 150


def test_the_cli_promotes_and_evaluates_without_importing_ray(trained_run, digits_shards, no_stray_store, capsys):
    config, run_id, _, late = trained_run
    uri = config.mlflow.tracking_uri
    script = (
        "import sys; from pipeline.cli import main\n"
        f"assert main(['registry', 'promote', {run_id!r}, '--name', 'cli-vit', '--tracking-uri', {uri!r}]) == 0\n"
        f"assert main(['evaluate', 'models:/cli-vit@champion', '--shards', {str(digits_shards)!r}, "
        f"'--split', 'val', '--tracking-uri', {uri!r}]) == 0\n"
        "assert 'ray' not in sys.modules, 'Ray was imported'\n"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=no_stray_store, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registered as cli-vit version 1" in out.stdout
    top1 = metrics_of(late)["val/top1"]
    assert f"top1         {top1:.4f}   (logged val/top1: {top1:.4f})" in out.stdout
    from pipeline.cli import main

    assert main(["evaluate", "models:/nope@champion", "--shards", str(digits_shards), "--tracking-uri", uri]) == 2
    assert "vitpipe evaluate: models:/nope@champion: cannot be fetched" in capsys.readouterr().err


def test_run_tags_take_the_commit_from_the_environment_without_git(monkeypatch):
    """A `ray job submit --working-dir .` copy has no .git: the commit comes from VITPIPE_GIT_COMMIT."""
    from pipeline import tracking

    monkeypatch.setattr(tracking, "_git", lambda *args: None)
    monkeypatch.delenv(tracking.GIT_COMMIT_ENV, raising=False)
    assert "mlflow.source.git.commit" not in tracking.run_tags()
    monkeypatch.setenv(tracking.GIT_COMMIT_ENV, "0123abcd")
    assert tracking.run_tags()["mlflow.source.git.commit"] == "0123abcd"


def test_a_cascade_registers_as_pickle_with_an_input_signature_and_loads_whole(tiny_config, tmp_path, capfd):
    """A DVT cascade returns one logits tensor per exit: MLflow can neither infer an output signature nor serve
    it, so it is registered as pickle with a float32 input signature and no example (no serving validation,
    which would fail and warn); the registry loads it back from its checkpoint as the same cascade."""
    model = _save_tiny_cascade(tiny_config, tmp_path / "dvt")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    promotion = promote_checkpoint(tmp_path / "dvt", tracking_uri=uri, name="cascade")
    logs = capfd.readouterr()
    assert "Failed to validate serving input example" not in logs.err + logs.out
    assert "Failed to infer the model signature" not in logs.err + logs.out

    version = MlflowClient(uri, registry_uri=uri).get_model_version("cascade", promotion.version)
    assert version.tags["vitpipe.format"] == "pickle"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)  # get_model_info resolves the logged model through the global URI
    try:
        info = mlflow.models.get_model_info(version.source)
    finally:
        mlflow.set_tracking_uri(previous)
    assert info.signature.outputs is None
    spec = {"dtype": "float32", "shape": (-1, 1, 32, 32)}
    assert info.signature.inputs.to_dict() == [{"type": "tensor", "tensor-spec": spec}]
    loaded = load(promotion.uri, tracking_uri=uri).model
    images = torch.randn(3, 1, 32, 32)
    for got, want in zip(loaded(images), model.eval()(images), strict=True):
        torch.testing.assert_close(got, want)


def test_files_that_are_not_checkpoints_or_do_not_fit_their_model_are_clear_errors(tiny_config, digits_shards,
                                                                                    tmp_path, capsys):  # fmt: skip
    """What a user hands `vitpipe evaluate` by mistake: Ray's snapshot JSON beside the checkpoints, a checkpoint
    cut short by a failed copy, a torch file of someone else's, weights saved under another model's config."""
    from pipeline.cli import main
    from pipeline.train.checkpoint import CheckpointError, load_checkpoint

    config = tiny_config(run_name="errors")
    _save_tiny_cascade(tiny_config, tmp_path / checkpoint_dir_name(1))
    state_file = tmp_path / checkpoint_dir_name(1) / "state.pt"
    snapshot = tmp_path / "checkpoint_manager_snapshot.json"
    snapshot.write_text(json.dumps({"checkpoint_results": [], "latest_checkpoint_result": None}))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(state_file.read_bytes()[: state_file.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"weight": torch.zeros(3)}, foreign)
    shards = ["--shards", str(digits_shards), "--tracking-uri", config.mlflow.tracking_uri]
    for path, problem in ((snapshot, "is not a vitpipe checkpoint (torch.load with weights_only: "),
                          (truncated, "is not a vitpipe checkpoint (torch.load with weights_only: "),
                          (foreign, "is a torch file but not a vitpipe checkpoint (no model and config entries)")):
        assert main(["evaluate", str(path), *shards]) == 2, path
        err = capsys.readouterr().err
        assert err.startswith(f"vitpipe evaluate: {path} {problem}"), err
        assert "Traceback" not in err

    # The cascade's weights under a plain ViT's config: which model, and what does not fit.
    state = load_checkpoint(state_file)
    state["config"] = config.to_dict()
    mismatched = save_checkpoint(tmp_path / "mismatched", state)
    with pytest.raises(CheckpointError, match=r"its weights are not those of vit_msa_nano as configured here: "
                                              r"\d+ missing \(.*\d+ unexpected"):  # fmt: skip
        load(mismatched)
