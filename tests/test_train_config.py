"""Training configs: schema validation, dotted overrides, resolution against the shards, errors before Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from pipeline.train.config import (
    ConfigError,
    TrainConfig,
    apply_overrides,
    flatten,
    load_config,
    parse_overrides,
    read_yaml,
    resolve_config,
)
from tests.conftest import tiny_train_dict

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
MINIMAL = {"model": {"name": "vit_msa_nano"}, "data": {"train": "d/train", "val": "d/val"}}

pytestmark = pytest.mark.timeout(120)


def error_of(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(data)
    return str(info.value)


def test_defaults_fill_a_minimal_config_and_survive_a_round_trip():
    config = TrainConfig.from_dict(MINIMAL)
    assert config.optim.optimizer == "adamw" and config.scaling.num_workers == 2
    assert not config.compile and config.compile_backend == "inductor" and not config.channels_last
    assert config.run_dir == "runs/vitpipe"
    assert TrainConfig.from_dict(yaml.safe_load(yaml.safe_dump(config.to_dict()))) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"optim": {"lrr": 1.0}}, "optim.lrr: unknown key (did you mean 'optim.lr'?)"),
        ({"optimiser": {}}, "optimiser: unknown key (did you mean 'optim'?)"),
        ({"optim": {"lr": "fast"}}, "optim.lr: expected a number, got 'fast'"),
        ({"optim": {"epochs": 1.5}}, "optim.epochs: expected an integer, got 1.5"),
        ({"scaling": {"use_gpu": "yes"}}, "scaling.use_gpu: expected true/false, got 'yes'"),
        ({"optim": {"lr": -1.0}}, "optim.lr must be > 0, got -1.0"),
        ({"optim": {"clip_mode": "max"}}, "optim.clip_mode: expected one of 'norm', 'value', 'agc', got 'max'"),
        ({"precision": "fp16"}, "precision: fp16 needs scaling.use_gpu"),
        ({"checkpoint": {"metric": "val_ema/top1"}}, "checkpoint.metric 'val_ema/top1' needs optim.ema: true"),
        ({"checkpoint": {"every_steps": 0}}, "checkpoint.every_steps must be > 0, got 0"),
        ({"data": None}, "data.train: missing required key"),
        ({"data": {"train": "d", "val": "d", "mixup": 0.8, "batch_size": 33}}, "data.batch_size must be even"),
        ({"method": {"dvt": {"exit_weights": [1.0, -1.0]}}}, "method.dvt.exit_weights must be non-negative"),
        ({"scaling": {"resources_per_worker": {"GPU": 1}}}, "scaling.resources_per_worker.GPU: use scaling"),
        ({"run_name": "my run"}, "run_name must be letters"),
        ({"compile": "yes"}, "compile: expected true/false, got 'yes'"),
        ({"compile_mode": "fast"}, "compile_mode: expected one of 'default', 'reduce-overhead', 'max-autotune'"),
        ({"compile_backend": "tvm"}, "compile_backend: expected one of 'inductor', 'aot_eager'"),
        ({"compile": True, "compile_mode": "max-autotune", "compile_backend": "aot_eager"},
         "compile_mode: 'max-autotune' is an inductor mode; compile_backend is 'aot_eager'"),
        ({"channels_last": 1}, "channels_last: expected true/false, got 1"),
        ({"method": {"castling": {"branch_off_at": 0.0}}}, "method.castling.branch_off_at must be in (0, 1] or null"),
        ({"method": {"castling": {"branch_off_at": 1.5}}}, "method.castling.branch_off_at must be in (0, 1] or null"),
    ],
)
def test_errors_name_the_field(change, message):
    data = {**MINIMAL, **{k: ({**MINIMAL.get(k, {}), **v} if isinstance(v, dict) else v) for k, v in change.items()}}
    assert message in error_of(data)


def test_yaml_reads_exponent_floats_as_numbers():
    # PyYAML's YAML 1.1 rules read 1e-5 as a string; the config loader does not.
    assert read_yaml("a: 1e-5\nb: 3E+2\nc: 1.0e-3\nd: e5\n") == {"a": 1e-5, "b": 300.0, "c": 1e-3, "d": "e5"}


def test_overrides_set_dotted_keys_and_create_sections():
    overrides = parse_overrides(["optim.lr=3e-4", "model.kwargs.ds_init=2.0", "model.kwargs.bias_sharing=tied",
                                 "checkpoint.every_steps=5", "mlflow.outage_wait_s=30", "data.crop_scale=[0.5, 1.0]"])
    data = apply_overrides(MINIMAL, overrides)
    assert MINIMAL == {"model": {"name": "vit_msa_nano"}, "data": {"train": "d/train", "val": "d/val"}}  # a copy
    config = TrainConfig.from_dict(data)
    assert config.optim.lr == 3e-4
    assert config.model.kwargs == {"ds_init": 2.0, "bias_sharing": "tied"}
    assert (config.checkpoint.every_steps, config.mlflow.outage_wait_s) == (5, 30)
    assert config.data.crop_scale == [0.5, 1.0]


@pytest.mark.parametrize(
    "key, message",
    [
        ("optim.lrr", "optim.lrr: unknown key (did you mean 'optim.lr'?)"),
        ("modle.kwargs.x", "modle: unknown key (did you mean 'model'?)"),
        ("optim.lr.x", "optim.lr: is a value, not a section"),
        ("method.castling.strength", "method.castling.strength: unknown key"),
        ("optim..lr", "empty part"),
    ],
)
def test_override_key_errors(key, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("?", r"\?")):
        apply_overrides(MINIMAL, {key: 1})


def test_override_values_are_validated_with_the_config():
    with pytest.raises(ConfigError, match="optim.epochs: expected an integer"):
        TrainConfig.from_dict(apply_overrides(MINIMAL, parse_overrides(["optim.epochs=many"])))
    with pytest.raises(ConfigError, match="--set 'optim.lr': expected key=value"):
        parse_overrides(["optim.lr"])


def test_flatten_gives_dotted_params():
    flat = flatten(TrainConfig.from_dict(apply_overrides(MINIMAL, {"model.kwargs.ds_init": 2.0})).to_dict())
    assert flat["model.kwargs.ds_init"] == 2.0 and flat["optim.lr"] == 1e-3 and flat["data.crop_scale"] == [0.08, 1.0]
    assert flat["method.castling.mask_reg_strength"] == 0.1 and flat["method.castling.branch_off_at"] == 0.75
    assert "model.kwargs" not in flat


def test_resolve_fills_data_facts_paths_and_tracking_uri(digits_shards, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    data = tiny_train_dict(digits_shards, tmp_path, data__img_size=None, storage_path="runs")
    data["mlflow"]["tracking_uri"] = None
    config = resolve_config(TrainConfig.from_dict(data))
    assert (config.data.num_classes, config.data.in_chans, config.data.img_size) == (10, 1, 16)  # from the manifest
    assert config.storage_path == str(tmp_path / "runs")
    assert config.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"  # absolute: workers run elsewhere
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://vitpipe-head:5000")
    assert resolve_config(TrainConfig.from_dict(data)).mlflow.tracking_uri == "http://vitpipe-head:5000"
    s3 = resolve_config(TrainConfig.from_dict({**data, "storage_path": "s3://bucket/runs"}))
    assert s3.run_dir == "s3://bucket/runs/tiny-cpu"


def test_missing_or_damaged_shards_are_config_errors(digits_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"data.train: .*no manifest.json"):
        resolve_config(TrainConfig.from_dict(tiny_train_dict(digits_shards, tmp_path, data__train=str(tmp_path / "nope"))))
    copy = tmp_path / "copy"
    for split in ("train", "val"):
        (copy / split).mkdir(parents=True)
        for file in (digits_shards / split).iterdir():
            (copy / split / file.name).write_bytes(file.read_bytes())
    next((copy / "val").glob("*.tar")).unlink()
    data = tiny_train_dict(copy, tmp_path)
    with pytest.raises(ConfigError, match=r"data.val: shard .*\.tar listed in the manifest is missing"):
        resolve_config(TrainConfig.from_dict(data))
    with pytest.raises(ConfigError, match="data.num_classes: must be given"):
        resolve_config(TrainConfig.from_dict({**MINIMAL, "data": {"train": "https://host/train", "val": "https://host/val"}}),
                       check_data=False)


def test_cli_reports_config_errors_before_ray_starts(digits_shards, tmp_path, monkeypatch, capsys):
    import ray

    from pipeline.cli import main

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for a bad config")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr("pipeline.train.launcher.build_trainer", no_ray)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_train_dict(digits_shards, tmp_path)))
    cases = {
        "optim.lrr=1.0": "optim.lrr: unknown key",
        "model.name=vit_msa_nanoo": "model.name: unknown model 'vit_msa_nanoo'; similar: ['vit_msa_nano'",
        "model.kwargs.depthh=2": "model.kwargs: vit_msa_nano rejects them",
        "optim.optimizer=adamww": "optim.optimizer",
        "optim.scheduler=cosinee": "optim.scheduler: Unknown scheduler",
        "method.dvt.exit_weights=[1.0, 1.0]": "method.dvt.exit_weights: 2 weights for a model with 1 exit(s)",
        f"data.train={tmp_path / 'missing'}": "data.train:",
        # a file where the storage folder should be: unwritable (as root too, unlike a read-only folder)
        f"storage_path={tmp_path / 'a_file' / 'runs'}": f"storage_path {tmp_path / 'a_file' / 'runs'}: cannot write "
                                                        "there (NotADirectoryError",
    }
    (tmp_path / "a_file").write_text("not a folder")
    for override, message in cases.items():
        assert main(["train", "--config", str(path), "--set", override]) == 2, override
        assert message in capsys.readouterr().err, override
    assert main(["train", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run opened for any of them


def test_dry_run_prints_the_resolved_config(digits_shards, tmp_path, capsys):
    from pipeline.cli import main

    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_train_dict(digits_shards, tmp_path, data__img_size=None)))
    assert main(["train", "--config", str(path), "--dry-run", "--set", "optim.lr=1e-4"]) == 0
    out = capsys.readouterr().out
    resolved = yaml.safe_load(out)
    assert resolved["optim"]["lr"] == 1e-4 and resolved["data"]["img_size"] == 16
    assert "# model: params" in out


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_are_valid_and_build_their_model(path):
    from pipeline.train.build import build_model

    config = load_config(path)
    data = config.to_dict()
    data["data"].update(num_classes=config.data.num_classes or 10, in_chans=config.data.in_chans or 3)
    with torch.device("meta"):  # parameters without memory: even the 224x224 models build in a blink
        model = build_model(TrainConfig.from_dict(data))
    assert sum(p.numel() for p in model.parameters()) > 0


def test_the_gpu_configs_compile_and_the_cpu_configs_do_not():
    compiled = {path.name: load_config(path).compile for path in CONFIGS}
    gpu = {path.name for path in CONFIGS if load_config(path).scaling.use_gpu}
    assert gpu and {name for name, on in compiled.items() if on} == gpu


def test_every_model_family_has_an_example_config():
    names = {load_config(path).model.name for path in CONFIGS}
    for family in ("vit_msa_", "vit_lsla_", "castling_", "dvt_"):
        assert any(name.startswith(family) for name in names), family


RECIPE_MODELS = ("vit_lsla_nano", "hier_msa_nano", "castling_vit_nano", "vit_msa_nano", "dvt_vit_nano",
                 "dvt_lsla_nano", "dvt_castling_nano")  # fmt: skip


def test_every_nano_family_has_a_fashion_mnist_recipe_and_they_share_one_recipe():
    recipes = {load_config(p).model.name: load_config(p) for p in CONFIGS if p.name.startswith("fmnist_")}
    assert sorted(recipes) == sorted(RECIPE_MODELS)
    reference = recipes["vit_lsla_nano"]
    assert reference.optim.epochs == 10  # the budget the recipes are judged at
    for name, config in recipes.items():  # only the model (and its method's terms) differ
        assert config.optim == reference.optim, name
        assert config.data == reference.data, name
        assert config.model.drop_path_rate == reference.model.drop_path_rate, name


def test_the_demo_names_every_model_below_its_floor():
    from types import SimpleNamespace

    from pipeline.demo import PROFILES, below_floors

    quick = PROFILES["quick"]
    rows = [{"model": "vit_lsla_nano", "test_top1": 86.0}, {"model": "vit_msa_nano", "test_top1": 79.9},
            {"model": "dvt_vit_nano", "test_top1": None}]  # fmt: skip
    champion = (SimpleNamespace(uri="models:/demo-vit_lsla_nano@champion"), SimpleNamespace(metrics={"top1": 85.1}), None)
    missed = below_floors(rows, [champion], quick)
    assert missed == ["vit_msa_nano (trained): test top-1 79.90% < 80%",
                      "dvt_vit_nano (trained): test top-1 not measured < 80%"]  # fmt: skip
    rows = [{"model": "vit_lsla_nano", "test_top1": 83.0}]
    assert below_floors(rows, [], quick) == ["the best test top-1 is 83.00% < 84%"]
    assert below_floors(rows, [], PROFILES["full"]) == []  # the full profile checks no floors
