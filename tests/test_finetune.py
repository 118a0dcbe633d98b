"""``model.init_from`` and ``optim.layer_decay``: starting from trained weights, offline.

The end-to-end test pre-trains on the ten digits and fine-tunes onto another label set of two classes
(0-4 vs 5-9), through ``train()`` as a user runs it, against the same run from scratch. (Digits 0-5 onto
6-9 was tried first: a 2-block ViT's features of six digits barely help with four others in one epoch.)
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient

from pipeline.registry import promote_checkpoint
from pipeline.train.build import build_model
from pipeline.train.checkpoint import save_checkpoint
from pipeline.train.config import ConfigError, TrainConfig, resolve_config
from pipeline.train.finetune import fit_weights, initial_weights
from pipeline.train.launcher import train
from tests.conftest import tiny_train_dict
from tests.datasets import make_digits_shards

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def label_sets(digits_shards, tmp_path_factory):
    """The ten digits (pre-training) and the same images labelled 0-4 / 5-9 (fine-tuning), 16x16."""
    halves = make_digits_shards(tmp_path_factory.mktemp("halves"), classes={d: d // 5 for d in range(10)},
                                image_size=16)  # fmt: skip
    return digits_shards, halves


def config_for(digits, tmp_path, **overrides) -> TrainConfig:
    settings = {"scaling.num_workers": 0, "mlflow.log_model": False, "mlflow.system_metrics": False,
                "data.test": None, **{k.replace("__", "."): v for k, v in overrides.items()}}  # fmt: skip
    return resolve_config(TrainConfig.from_dict(tiny_train_dict(digits, tmp_path, **settings)))


def save_model(config, model, directory):
    save_checkpoint(directory, {"epochs_done": 1, "global_step": 0, "model": model.state_dict(), "ema": None,
                                "config": config.to_dict(), "metrics": {}, "mlflow_run_id": None})  # fmt: skip
    return directory


def test_weights_fit_another_head_and_grid_and_nothing_else(label_sets, tmp_path):
    first, second = label_sets
    source_config = config_for(first, tmp_path, run_name="src")
    torch.manual_seed(1)
    source = build_model(source_config)  # 10 classes, 16x16 images: a 4x4 grid of patches
    target_config = config_for(second, tmp_path, run_name="dst", data__img_size=24)
    torch.manual_seed(2)
    target = build_model(target_config)  # 2 classes, 24x24: a 6x6 grid
    fitted, notes = fit_weights(target, source.state_dict())
    target.load_state_dict(fitted)  # strict

    weights = source.state_dict()
    for key, value in target.state_dict().items():
        if key.startswith(("head.", "pos_embed")):
            continue
        assert torch.equal(value, weights[key]), key
    assert torch.equal(fitted["head.weight"], build_model_seeded(target_config, 2).state_dict()["head.weight"])
    assert fitted["head.weight"].shape == (2, 64) and "classifier re-initialised for 2 classes" in notes[0]
    # the position embedding: class token kept, the 4x4 grid resized bicubically to 6x6 (reference: torch)
    pos = weights["pos_embed"]
    grid = pos[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", antialias=True, align_corners=False)
    expected = torch.cat([pos[:, :1], expected.permute(0, 2, 3, 1).reshape(1, 36, 64)], dim=1)
    torch.testing.assert_close(fitted["pos_embed"], expected)
    assert "pos_embed (1, 17, 64) -> (1, 37, 64)" in notes[1]

    # relative-position tables of a hierarchical model follow its window: 4x4 windows -> 2x2 windows
    def hier(window):
        config = config_for(first, tmp_path, run_name=f"h{window}", model__name="hier_msa_nano", data__img_size=32,
                            model__kwargs={"depths": [1, 1], "embed_dim": 32, "num_heads": [2, 4], "window_size": window})  # fmt: skip
        return build_model(config)

    wide, narrow = hier(4), hier(2)
    fitted, notes = fit_weights(narrow, wide.state_dict())
    tables = [k for k in fitted if k.endswith("relative_position_bias_table")]
    assert tables and all(fitted[k].shape == narrow.state_dict()[k].shape for k in tables)
    assert "resampled" in notes[0] and all("relative_position_bias_table" in n or "pos" in n for n in notes)
    same, notes = fit_weights(hier(4), wide.state_dict())
    assert notes == [] and all(torch.equal(same[k], v) for k, v in wide.state_dict().items())

    # weights of another architecture are an error naming what does not fit
    lsla = config_for(first, tmp_path, run_name="lsla", model__name="vit_lsla_nano", data__img_size=32,
                      model__kwargs={"depths": [1, 1], "embed_dim": 32, "num_heads": [2, 4]})  # fmt: skip
    save_model(lsla, build_model(lsla), tmp_path / "lsla")
    with pytest.raises(ConfigError, match=r"model.init_from: .*lsla: its weights do not fit VisionTransformer"):
        initial_weights(config_for(second, tmp_path, run_name="x", model__init_from=str(tmp_path / "lsla")))
    with pytest.raises(ConfigError, match="model.init_from: no checkpoint at"):
        initial_weights(config_for(second, tmp_path, run_name="x", model__init_from=str(tmp_path / "nothing")))


def pretrained_checkpoint(config, directory, epochs: int = 6, one_cycle: bool = False):
    """``epochs`` of AdamW on the config's train split, by hand, saved as a checkpoint. ``one_cycle``: the
    learning rate follows torch's one-cycle schedule peaking at ``optim.lr`` (weight decay 0.05)."""
    from pipeline.data.reader import build_loader
    from pipeline.data.transforms import build_transform

    torch.manual_seed(config.optim.seed)
    model = build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.optim.lr, weight_decay=0.05 if one_cycle else 0.01)
    transform = build_transform(config.data.img_size, train=False, in_chans=config.data.in_chans,
                                crop_pct=config.data.crop_pct)  # fmt: skip
    loader = build_loader(config.data.train, batch_size=32, train=True, transform=transform, num_workers=0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.optim.lr, total_steps=epochs * len(loader)) \
        if one_cycle else None
    model.train()
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
    return save_model(config, model, directory)


def build_model_seeded(config, seed):
    torch.manual_seed(seed)
    return build_model(config)


def test_timm_pretrained_weights_load_from_a_local_file(digits_shards, tmp_path, monkeypatch):
    """``timm:NAME`` + ``model.pretrained_file``: timm's own loader (greyscale conv adapted by summing the
    RGB filters), then our fit (new grid, new head)."""
    torch.manual_seed(0)
    published = timm.create_model("vit_tiny_patch16_224")  # stands in for the downloaded weights
    file = tmp_path / "vit_tiny.pth"
    torch.save(published.state_dict(), file)
    config = config_for(digits_shards, tmp_path, model__name="vit_tiny_patch16_224", model__kwargs={},
                        data__img_size=32, model__init_from="timm:vit_tiny_patch16_224",
                        model__pretrained_file=str(file))  # fmt: skip
    initial = initial_weights(config)
    weights, source = initial.state_dict, published.state_dict()
    assert torch.equal(weights["blocks.11.mlp.fc2.weight"], source["blocks.11.mlp.fc2.weight"])
    assert torch.equal(weights["patch_embed.proj.weight"], source["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert weights["pos_embed"].shape == (1, 5, 192) and weights["head.weight"].shape == (10, 192)
    assert initial.source == f"timm:vit_tiny_patch16_224 ({file})"
    assert initial.notes[0].startswith("classifier re-initialised for 10 classes") and "(1000, 192) -> (10, 192)" in initial.notes[0]

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no network: fail now, not after retries
    offline = config_for(digits_shards, tmp_path, model__name="vit_tiny_patch16_224", model__kwargs={},
                         data__img_size=32, model__init_from="timm:vit_tiny_patch16_224")  # fmt: skip
    with pytest.raises(ConfigError, match="offline\\? download the weights once and point to the file"):
        initial_weights(offline)
    with pytest.raises(ConfigError, match="model.pretrained_file: only read with model.init_from: timm:NAME"):
        config_for(digits_shards, tmp_path, model__pretrained_file=str(file))


def test_layer_decay_scales_each_depth_and_the_logged_lr_is_the_heads(digits_shards, tmp_path):
    from pipeline.train.loop import _lr, _optimizer

    config = config_for(digits_shards, tmp_path, optim__layer_decay=0.5)
    model = build_model(config)
    optimizer = _optimizer(config, model, torch.device("cpu"))
    scale_of = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    # stem (patch embedding), 2 blocks (the final norm with the last, as timm groups its ViT), head: each half the next
    assert scale_of[id(params["patch_embed.proj.weight"])] == 0.5**3
    assert scale_of[id(params["blocks.0.attn.qkv.weight"])] == 0.5**2
    assert scale_of[id(params["blocks.1.attn.qkv.weight"])] == 0.5
    assert scale_of[id(params["norm.weight"])] == 0.5 and scale_of[id(params["head.weight"])] == 1.0
    assert _lr(optimizer) == config.optim.lr
    with pytest.raises(ConfigError, match=r"optim.layer_decay must be in \(0, 1\]"):
        config_for(digits_shards, tmp_path, optim__layer_decay=1.5)


def test_fine_tuning_a_registered_model_onto_new_labels_beats_training_from_scratch(label_sets, tmp_path):
    digits, halves = label_sets
    pretrain = config_for(digits, tmp_path, run_name="pretrain", optim__lr=1.0e-3)
    checkpoint = pretrained_checkpoint(pretrain, tmp_path / "pretrain", epochs=10)
    uri = pretrain.mlflow.tracking_uri
    promotion = promote_checkpoint(checkpoint, tracking_uri=uri, name="digits")
    # one epoch on the new labels: from the registered model (warm start, layer decay) and from scratch
    common = dict(optim__epochs=1, optim__lr=1.0e-3)
    tuned = config_for(halves, tmp_path, run_name="tuned", model__init_from="models:/digits@champion",
                       optim__layer_decay=0.75, **common)  # fmt: skip
    scratch = config_for(halves, tmp_path, run_name="scratch", **common)
    client = MlflowClient(uri)
    runs = {}
    for config in (tuned, scratch):
        run_id = train(config)["mlflow_run_id"]
        runs[config.run_name] = client.get_run(run_id)
    tags = runs["tuned"].data.tags
    assert tags["vitpipe.init_from"] == f"models:/digits/{promotion.version}"
    assert tags["vitpipe.init_notes"].startswith("classifier re-initialised for 2 classes (head.weight (10, 64)")
    assert "vitpipe.init_from" not in runs["scratch"].data.tags
    tuned_top1, scratch_top1 = (runs[k].data.metrics["val/top1"] for k in ("tuned", "scratch"))
    # measured over seeds 0-2 after 6 pre-training epochs (76% on the ten digits): tuned 67-73%, scratch 43-57%
    assert tuned_top1 >= scratch_top1 + 8, (tuned_top1, scratch_top1)
    assert math.isclose(runs["tuned"].data.metrics["train/lr"], runs["scratch"].data.metrics["train/lr"])


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ray_workers_start_from_the_drivers_weights_and_a_resumed_run_keeps_its_own(ray_local, label_sets, tmp_path,
                                                                                   capfd):  # fmt: skip
    """2 workers: the fitted weights travel through Ray's object store to both ranks (their val shares are
    evaluated by different ranks, so one rank off its weights would show); resuming does not re-apply them.
    A distillation teacher (of the new labels) travels the same way and runs on both ranks."""
    from pipeline.train.checkpoint import latest_checkpoint, load_checkpoint, load_model
    from tests.test_train_ray import _top1_single_process

    first, second = label_sets
    pretrain = config_for(first, tmp_path, run_name="pretrain", optim__lr=1.0e-3)
    checkpoint = pretrained_checkpoint(pretrain, tmp_path / "pretrain", epochs=1)
    # lr 1e-9: an epoch leaves the weights where they started, so the checkpoint shows what the ranks began from
    teacher = config_for(second, tmp_path, run_name="teacher")
    save_model(teacher, build_model(teacher), tmp_path / "teacher")
    tuned = config_for(second, tmp_path, run_name="tuned", model__init_from=str(checkpoint), scaling__num_workers=2,
                       optim__epochs=1, optim__lr=1.0e-9, optim__warmup_lr=1.0e-9, optim__min_lr=1.0e-9,
                       method__distill__teacher=str(tmp_path / "teacher"), method__distill__kind="hard")  # fmt: skip
    summary = train(tuned)
    out = capfd.readouterr().out
    assert "[vitpipe] starting from " + str(checkpoint) in out
    assert f"[vitpipe] distilling from {tmp_path / 'teacher'} (hard, weight 0.5)" in out
    tags = MlflowClient(tuned.mlflow.tracking_uri).get_run(summary["mlflow_run_id"]).data.tags
    assert tags["vitpipe.distill_teacher"] == str(tmp_path / "teacher")
    start = load_checkpoint(latest_checkpoint(tuned.run_dir)[0])
    source = load_checkpoint(checkpoint)["model"]
    for key, value in start["model"].items():
        if not key.startswith("head."):
            torch.testing.assert_close(value, source[key], atol=1e-6, rtol=0)
    assert _top1_single_process(load_model(summary["best_checkpoint"]), tuned) == pytest.approx(
        summary["best_metric"], abs=1e-9)

    more = config_for(second, tmp_path, run_name="tuned", model__init_from=str(checkpoint), scaling__num_workers=2,
                      optim__epochs=2, optim__lr=1.0e-9, optim__warmup_lr=1.0e-9, optim__min_lr=1.0e-9)  # fmt: skip
    head = start["model"]["head.weight"]
    assert train(more)["epochs_done"] == 2
    assert "starting from" not in capfd.readouterr().out
    resumed = load_checkpoint(latest_checkpoint(more.run_dir)[0])["model"]["head.weight"]
    torch.testing.assert_close(resumed, head, atol=1e-6, rtol=0)  # its own head, not a fresh initialisation
