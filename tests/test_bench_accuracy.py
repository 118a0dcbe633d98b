"""benchmarks/bench_accuracy without training: every variant it trains is a valid config that builds what its
table says, the recipe settings are the recipes', and the DVT table picks the cheapest budget at an exit's
accuracy. (Its training path is the demo's, which the Ray tests run.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks.bench_accuracy import CASTLING_ABLATION, LSLA_ABLATION, _dvt_exits, _dvt_table, recipe_settings
from pipeline.demo import PROFILES, Profile, _model_kwargs
from pipeline.train.build import build_model
from pipeline.train.config import TrainConfig, load_config

REPO = Path(__file__).resolve().parents[1]


def build(name: str, kwargs: dict, profile: Profile) -> torch.nn.Module:
    overrides = {**profile.overrides, "model.name": name, "model.kwargs": _model_kwargs(name, kwargs, profile),
                 "optim.epochs": 2}  # fmt: skip
    data = load_config(REPO / "configs" / "tiny_cpu.yaml", overrides).to_dict()
    data["data"].update(num_classes=10, in_chans=3)
    with torch.device("meta"):
        return build_model(TrainConfig.from_dict(data))


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def profile(demo_sizes: bool) -> Profile:
    return Profile(train_images=None, test_images=None, epochs=2, sweep_trials=0, sweep_epochs=0,
                   model_kwargs=PROFILES["quick"].model_kwargs if demo_sizes else {}, overrides=recipe_settings(2))  # fmt: skip


def test_recipe_settings_are_the_recipes_with_the_warm_up_scaled():
    settings = recipe_settings(3)
    recipe = load_config(REPO / "configs" / "fmnist_hier_msa_nano.yaml")  # any recipe: they share one shape
    assert settings["data.crop_scale"] == recipe.data.crop_scale and settings["optim.lr"] == recipe.optim.lr
    assert settings["model.drop_path_rate"] == recipe.model.drop_path_rate
    assert settings["optim.warmup_epochs"] == 0 and recipe_settings(10)["optim.warmup_epochs"] == recipe.optim.warmup_epochs


def test_the_lsla_ablation_builds_its_axes():
    built = {label: build(name, kwargs, profile(False)) for label, (name, kwargs) in LSLA_ABLATION.items()}
    # keys and values from the input drop their projections: qkv > qxv > qxx in parameters
    assert params(built["qkv-dynamic-ob"]) > params(built["qxv-dynamic-ob"]) > params(built["qxx-dynamic-ob"])
    attn = built["qxx-fixed-no_ob"].layers[0].blocks[0].attn
    assert (attn.kv, attn.scale, attn.outer_bias) == ("qxx", "fixed", False)
    assert built["qxx-dynamic-ob-share_tied"].layers[0].blocks[0].attn.bias_sharing == "tied"


def test_the_castling_ablation_drops_the_conv_and_the_branch():
    from pipeline.models.layers.castling import castling_modules

    built = {label: build(name, kwargs, profile(False)) for label, (name, kwargs) in CASTLING_ABLATION.items()}
    parts = {label: {(m.dwconv_weight is not None, m.sparse_branch) for _, m in castling_modules(model)}
             for label, model in built.items()}  # fmt: skip
    assert parts == {"full": {(True, True)}, "no_dwconv": {(False, True)}, "no_branch": {(True, False)},
                     "no_dwconv-no_branch": {(False, False)}, "hier_msa_nano": set(), "plain-full": {(True, True)},
                     "plain-no_dwconv": {(False, True)}, "plain-no_branch": {(True, False)}, "vit_msa_nano": set()}
    assert {type(built[label]).__name__ for label in ("plain-full", "plain-no_dwconv", "vit_msa_nano")} == \
        {"VisionTransformer"}  # fmt: skip


@pytest.mark.parametrize("demo_sizes", [False, True], ids=["own_size", "demo_size"])
def test_the_dvt_ablation_trains_the_cascade_and_each_exit_alone(demo_sizes):
    variants = _dvt_exits(profile(demo_sizes))
    cascade = build(*variants.pop("cascade"), profile(demo_sizes))
    alone = {label: build(name, kwargs, profile(demo_sizes)) for label, (name, kwargs) in variants.items()}
    assert [m.grids for m in alone.values()] == [(g,) for g in cascade.grids]
    assert list(alone) == [f"exit_{g}x{g}_alone" for g in cascade.grids]


def test_the_dvt_table_finds_the_cheapest_budget_at_each_exits_accuracy():
    curve = [{"q": 0.1, "top1": 80.0, "mean_gmacs": 1e-3}, {"q": 0.5, "top1": 85.0, "mean_gmacs": 2e-3},
             {"q": 0.9, "top1": 85.5, "mean_gmacs": 2.5e-3}, {"q": 1.0, "top1": 86.0, "mean_gmacs": 3e-3}]  # fmt: skip
    rows = [{"variant": "cascade", "seed": 0, "test_top1": 86.0, "gmacs": 3e-3, "dvt_curve": curve},
            {"variant": "exit_2x2_alone", "seed": 0, "test_top1": 79.0, "gmacs": 1e-3},
            {"variant": "exit_4x4_alone", "seed": 0, "test_top1": 84.2, "gmacs": 2.5e-3},
            {"variant": "exit_8x8_alone", "seed": 0, "test_top1": 87.0, "gmacs": 4e-3},
            {"variant": "exit_4x4_alone", "seed": 1, "test_top1": 84.2, "gmacs": 2.5e-3}]  # no cascade of seed 1
    table = _dvt_table(rows)
    assert [(t["exit"], t["seed"]) for t in table] == [("exit_2x2_alone", 0), ("exit_4x4_alone", 0), ("exit_8x8_alone", 0)]
    assert table[0]["cascade_point"]["q"] == 0.1 and table[0]["macs_ratio"] == pytest.approx(1.0)
    assert table[1]["cascade_point"]["q"] == 0.5 and table[1]["macs_ratio"] == pytest.approx(0.8)
    assert table[2]["cascade_point"] is None and table[2]["macs_ratio"] is None
