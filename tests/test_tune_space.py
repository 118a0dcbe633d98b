"""Search spaces: YAML -> checked parameters -> Ray Tune domains; errors name the file and the parameter.

No Ray instance: Tune's domain classes and searchers are plain Python objects.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.train.config import TrainConfig
from pipeline.tune.space import Param, SpaceError, check_space, load_space, parse_space, trial_config
from pipeline.tune.sweep import default_concurrency, trial_resources

SPACES = Path(__file__).parents[1] / "tune_spaces"
pytestmark = pytest.mark.timeout(180)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def space_error(data: dict, config: TrainConfig | None = None) -> str:
    with pytest.raises(SpaceError) as info:
        space = parse_space(data, source="s.yaml")
        if config is not None:
            check_space(space, config)
    return str(info.value)


# --------------------------------------------------------------------------------------------------
# The file on its own.


def test_a_space_file_becomes_tune_domains_with_the_given_bounds(tmp_path):
    path = write(tmp_path, """
metric: val/loss
mode: min
num_samples: 5
search: random
scheduler: {name: asha, grace_period: 2, reduction_factor: 4}
parameters:
  optim.lr: {loguniform: [1e-5, 1.0e-2]}        # PyYAML alone would read 1e-5 as a string
  optim.weight_decay: {uniform: [0.0, 0.1]}
  model.drop_path_rate: {quniform: [0.0, 0.3, 0.05]}
  optim.warmup_epochs: {randint: [0, 3]}
  model.kwargs.attn_kwargs.bias_sharing: {choice: [none, tied]}
  method.dvt.exit_weights: {grid: [[1.0, 1.0], [0.5, 1.5]]}
""")
    space = load_space(path)
    assert (space.metric, space.mode, space.samples(), space.search) == ("val/loss", "min", 5, "random")
    assert (space.scheduler.grace_period, space.scheduler.reduction_factor) == (2, 4)
    assert space.parameters["optim.lr"] == Param("optim.lr", "loguniform", (1e-5, 1e-2))
    domains = space.param_space()
    lr = domains["optim.lr"]
    assert (lr.lower, lr.upper, type(lr.get_sampler()).__name__) == (1e-5, 1e-2, "_LogUniform")
    assert domains["method.dvt.exit_weights"] == {"grid_search": [[1.0, 1.0], [0.5, 1.5]]}
    assert domains["model.kwargs.attn_kwargs.bias_sharing"].categories == ["none", "tied"]

    np.random.seed(0)
    lrs = np.asarray(lr.sample(size=2000))
    assert lrs.min() >= 1e-5 and lrs.max() <= 1e-2
    # log-uniform: each decade gets about a third of the draws (uniform would put 90% in the top one)
    decade_share = np.histogram(np.log10(lrs), bins=[-5, -4, -3, -2])[0] / len(lrs)
    assert np.allclose(decade_share, 1 / 3, atol=0.05), decade_share
    drop = np.asarray(domains["model.drop_path_rate"].sample(size=200))
    assert np.allclose(drop / 0.05, np.round(drop / 0.05)) and drop.min() >= 0 and drop.max() <= 0.3 + 1e-9
    warmup = set(np.asarray(domains["optim.warmup_epochs"].sample(size=200)).tolist())
    assert warmup == {0, 1, 2}  # high excluded, as in Tune and numpy
    assert Param("k", "randint", (0, 3)).extremes() == [0, 2]


def test_grid_search_turns_choices_into_grids_and_optuna_gets_a_seeded_searcher():
    grid = parse_space({"search": "grid", "parameters": {"optim.lr": {"choice": [1.0e-3, 2.0e-3]}}})
    assert grid.param_space() == {"optim.lr": {"grid_search": [1.0e-3, 2.0e-3]}} and grid.samples() == 1
    assert grid.searcher("val/top1", "max") is None  # Tune's variant generator expands the grid

    optuna = parse_space({"seed": 3, "parameters": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}})
    searcher = optuna.searcher("val/top1", "max")
    assert type(searcher).__name__ == "OptunaSearch" and searcher.metric == "val/top1" and searcher.mode == "max"
    assert optuna.samples() == 8 and optuna.search == "optuna"
    overridden = optuna.with_overrides(num_samples=3, search="random", scheduler="fifo")
    assert (overridden.samples(), overridden.search, overridden.scheduler.build(5, "x")) == (3, "random", None)


def test_asha_decides_on_the_reported_epoch_and_lets_finishing_trials_finish(tmp_path):
    space = parse_space({"scheduler": {"grace_period": 1, "reduction_factor": 2},
                         "parameters": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}})  # fmt: skip
    asha = space.scheduler.build(max_epochs=3, experiment_path=str(tmp_path))
    assert asha._time_attr == "epoch" and asha._max_t == 3 and asha._reduction_factor == 2
    assert asha._stop_last_trials is False
    assert asha.replay() == 0  # a new sweep: nothing saved to replay
    with pytest.raises(SpaceError, match="grace_period \\(4\\) exceeds optim.epochs \\(3\\)"):
        parse_space({"scheduler": {"grace_period": 4}, "parameters": {"optim.lr": {"uniform": [0.1, 0.2]}}}).scheduler.build(3, "x")


def test_asha_stops_poor_trials_early_but_never_at_their_last_epoch(tmp_path):
    # Ray's ASHA has a rung at max_t when max_t = grace_period * reduction_factor**k, and stops trials
    # below its cutoff there even with stop_last_trials=False: such a trial would lose its run's end.
    space = parse_space({"metric": "val/top1", "mode": "max", "scheduler": {"grace_period": 1, "reduction_factor": 3},
                         "parameters": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}}})  # fmt: skip
    decisions = {}
    for max_epochs in (1, 3):
        asha = space.scheduler.build(max_epochs=max_epochs, experiment_path=str(tmp_path / "new"))
        asha.set_search_properties("val/top1", "max")
        trials = [SimpleNamespace(trial_id=f"t{i}") for i in range(4)]
        for trial in trials:
            asha.on_trial_add(None, trial)
        decisions[max_epochs] = [asha.on_trial_result(None, trial, {"epoch": 1, "val/top1": 90.0 - 10 * i})
                                 for i, trial in enumerate(trials)]  # fmt: skip
        assert asha._num_stopped == decisions[max_epochs].count("STOP")
    assert decisions[1] == ["CONTINUE"] * 4  # epoch 1 is the last: every trial finishes its run
    assert decisions[3] == ["CONTINUE", "STOP", "STOP", "STOP"]  # two epochs to go: the poor ones stop


@pytest.mark.parametrize(
    "data, message",
    [
        ({"parameters": {"optim.lr": {"logunform": [1.0e-4, 1.0e-2]}}},
         "parameters.optim.lr: unknown distribution 'logunform' (did you mean 'loguniform'?)"),
        ({"parameters": {"optim.lr": {"loguniform": [0.0, 1.0e-2]}}}, "loguniform needs 0 < low, got low = 0"),
        ({"parameters": {"optim.lr": {"uniform": [0.2, 0.1]}}}, "uniform needs low < high, got [0.2, 0.1]"),
        ({"parameters": {"optim.lr": {"uniform": [0.1]}}}, "uniform takes 2 numbers"),
        ({"parameters": {"optim.lr": {"loguniform": ["1e-4", 1.0e-2]}}},
         "loguniform bounds must be numbers, got '1e-4' (str) (quoted? write numbers bare"),
        ({"parameters": {"optim.lr": {"uniform": [True, 2]}}}, "uniform bounds must be numbers, got True"),
        ({"parameters": {"optim.lr": {"uniform": [0.0, math.inf]}}}, "uniform bounds must be finite"),
        ({"parameters": {"optim.epochs": {"randint": [1.5, 4]}}}, "randint bounds must be integers"),
        ({"parameters": {"optim.epochs": {"randint": [3, 3]}}}, "randint needs low < high (high is excluded)"),
        ({"parameters": {"x.y": {"quniform": [0.0, 0.35, 0.1]}}}, "must be a whole number (>= 1) of steps 0.1"),
        ({"parameters": {"x.y": {"quniform": [0.0, 0.3, -0.1]}}}, "quniform's step must be > 0"),
        ({"parameters": {"x.y": {"choice": []}}}, "choice needs at least one value"),
        ({"parameters": {"x.y": {"choice": [1, 1]}}}, "choice lists 1 twice"),
        ({"parameters": {"x.y": {"choice": [{"a": 1}]}}}, "values must be scalars or lists"),
        ({"parameters": {"x.y": {"choice": "ab"}}}, "choice takes a list, e.g. choice: [a, b]"),
        ({"parameters": {"optim.lr": 1.0e-3}}, "expected one distribution, e.g. {loguniform"),
        ({"parameters": {"optim.lr": {"uniform": [0.1, 0.2], "choice": [1]}}}, "expected one distribution"),
        ({"parameters": {"optim..lr": {"uniform": [0.1, 0.2]}}}, "not a dotted config key"),
        ({"parameters": {}}, "'parameters' must be a non-empty mapping"),
        ({"parameter": {"optim.lr": {"uniform": [0.1, 0.2]}}}, "parameter: unknown key (did you mean 'parameters'?)"),
        ({"search": "bayes", "parameters": {"a.b": {"choice": [1]}}}, "search must be one of optuna, random, grid"),
        ({"scheduler": "hyperband", "parameters": {"a.b": {"choice": [1]}}}, "scheduler.name must be one of asha, fifo"),
        ({"scheduler": {"grace": 1}, "parameters": {"a.b": {"choice": [1]}}}, "scheduler.grace: unknown key"),
        ({"scheduler": {"reduction_factor": 1}, "parameters": {"a.b": {"choice": [1]}}}, "reduction_factor must be a number > 1"),
        ({"num_samples": 0, "parameters": {"a.b": {"choice": [1]}}}, "num_samples must be an integer >= 1"),
        ({"metric": "val/loss", "parameters": {"a.b": {"choice": [1]}}}, "give metric and mode together"),
        ({"metric": "val/loss", "mode": "lowest", "parameters": {"a.b": {"choice": [1]}}}, "mode must be max or min"),
        ({"parameters": {"a.b": {"grid": [1, 2]}}}, "optuna cannot search a grid; use choice"),
        ({"parameters": {"a.b": {"choice": [[1, 2], [3]]}}}, "optuna's categories must be scalars"),
        ({"search": "grid", "parameters": {"a.b": {"uniform": [0.1, 0.2]}}}, "grid search needs finite values"),
    ],
)
def test_a_bad_space_file_gets_a_clear_error(data, message):
    assert message in space_error(data)


def test_space_file_errors_name_the_file(tmp_path):
    with pytest.raises(SpaceError, match="not found"):
        load_space(tmp_path / "missing.yaml")
    with pytest.raises(SpaceError, match=r"space.yaml: not valid YAML"):
        load_space(write(tmp_path, "parameters: {optim.lr: [1,"))
    with pytest.raises(SpaceError, match=r"space.yaml: parameters.optim.lr: unknown distribution"):
        load_space(write(tmp_path, "parameters:\n  optim.lr: {normal: [0, 1]}\n"))


# --------------------------------------------------------------------------------------------------
# Against a training config.


@pytest.mark.parametrize(
    "parameters, message",
    [
        ({"optim.lrr": {"loguniform": [1.0e-4, 1.0e-2]}}, "parameters.optim.lrr = 0.0001: optim.lrr: unknown key (did you mean 'optim.lr'?)"),
        ({"optimizer.lr": {"loguniform": [1.0e-4, 1.0e-2]}}, "optimizer: unknown key"),
        ({"optim.lr.value": {"uniform": [0.1, 0.2]}}, "optim.lr: is a value, not a section"),
        ({"model.drop_path_rate": {"uniform": [0.0, 1.5]}}, "model.drop_path_rate = 1.5: model.drop_path_rate must be < 1.0"),
        ({"optim.epochs": {"choice": [2, "three"]}}, "optim.epochs = 'three': optim.epochs: expected an integer"),
        ({"optim.warmup_epochs": {"randint": [0, 4]}}, "optim.warmup_epochs = 3: optim.warmup_epochs (3) must be < optim.epochs (2)"),
        ({"model.kwargs.attn_kwargs.ds_init": {"uniform": [0.5, 2.0]}}, "vit_msa_nano rejects them"),
        ({"model.kwargs.depht": {"choice": [1, 2]}}, "model.kwargs.depht = 1: model.kwargs: vit_msa_nano rejects them"),
        ({"model.name": {"choice": ["vit_msa_nano", "vit_nope"]}}, "model.name: unknown model 'vit_nope'"),
        ({"optim.optimizer": {"choice": ["adamw", "adamq"]}}, "optim.optimizer = 'adamq'"),
        ({"model.kwargs.num_classes": {"choice": [10]}}, "model.kwargs.num_classes: set data.num_classes instead"),
        ({"scaling.num_workers": {"choice": [1, 2]}}, "parameters.scaling.num_workers: cannot be searched"),
        ({"storage_path": {"choice": ["a", "b"]}}, "parameters.storage_path: cannot be searched"),
        ({"checkpoint.metric": {"choice": ["val/top1"]}}, "parameters.checkpoint.metric: cannot be searched"),
    ],
)
def test_keys_and_values_are_checked_against_the_training_config(tiny_config, parameters, message):
    assert message in space_error({"search": "random", "parameters": parameters}, tiny_config())


def test_the_metric_must_be_one_the_training_loop_reports(tiny_config):
    message = space_error({"metric": "accuracy", "mode": "max", "parameters": {"optim.lr": {"uniform": [0.1, 0.2]}}},
                          tiny_config())  # fmt: skip
    assert "s.yaml: metric: checkpoint.metric must look like 'val/top1'" in message
    message = space_error({"scheduler": {"grace_period": 3}, "parameters": {"optim.lr": {"uniform": [0.1, 0.2]}}},
                          tiny_config())  # fmt: skip
    assert "grace_period (3) exceeds the config's optim.epochs (2)" in message


def test_a_valid_space_gives_the_sweep_metric_and_trial_configs(tiny_config):
    config = tiny_config()
    space = parse_space({"parameters": {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]},
                                        "model.kwargs.depth": {"randint": [1, 3]}}})  # fmt: skip
    assert check_space(space, config) == ("val/top1", "max")  # the config's checkpoint metric by default
    # Tune hands back numpy scalars; a trial's config gets plain values and keeps the rest of the config
    trial = trial_config(config.to_dict(), {"optim.lr": np.float64(2.5e-3), "model.kwargs.depth": np.int64(1)})
    assert trial.optim.lr == 2.5e-3 and type(trial.model.kwargs["depth"]) is int and trial.model.kwargs["depth"] == 1
    assert trial.model.kwargs["embed_dim"] == 64 and trial.data == config.data


@pytest.mark.parametrize("name, model", [("lsla", "vit_lsla_nano"), ("castling", "castling_vit_nano"), ("dvt", "dvt_vit_nano")])
def test_the_shipped_spaces_fit_their_models(tiny_config, name, model):
    config = tiny_config(model__name=model, model__kwargs={}, data__img_size=32)
    space = load_space(SPACES / f"{name}.yaml")
    assert check_space(space, config) == ("val/top1", "max")
    assert space.text.lstrip().startswith("#")  # each says why its ranges are what they are
    for key in space.parameters:
        assert key in space.text


def test_concurrency_is_what_the_cluster_holds_for_a_trial_and_its_workers(tiny_config):
    config = tiny_config(scaling__cpus_per_worker=0.5)
    assert trial_resources(config) == {"CPU": 2.0}  # 1 for the trial + 2 workers x 0.5
    assert default_concurrency({"CPU": 4.0}, trial_resources(config)) == 2
    assert default_concurrency({"CPU": 5.9}, trial_resources(config)) == 2
    gpu = tiny_config(scaling__use_gpu=True, precision="fp32", scaling__num_workers=4,
                      scaling__resources_per_worker={"memory": 1.0e9})  # fmt: skip
    need = trial_resources(gpu)
    assert need == {"CPU": 5.0, "GPU": 4.0, "memory": 4.0e9}
    assert default_concurrency({"CPU": 64.0, "GPU": 8.0, "memory": 1.0e12}, need) == 2  # GPUs bound it
    from pipeline.tune.sweep import SweepError

    with pytest.raises(SweepError, match="one trial needs .*'GPU': 4.0.* the Ray cluster has .*'GPU': 0.0"):
        default_concurrency({"CPU": 64.0}, need)


def test_a_space_restricted_to_some_knobs_searches_only_those():
    space = load_space(SPACES / "lsla.yaml")
    knobs = ("model.kwargs.attn_kwargs.ds_init", "model.kwargs.attn_kwargs.bias_sharing")
    only = space.restricted_to(knobs)
    assert tuple(only.parameters) == knobs and set(only.param_space()) == set(knobs)
    assert only.parameters[knobs[0]] == space.parameters[knobs[0]] and only.scheduler == space.scheduler
    assert "optim.lr" in space.parameters  # the original is untouched
    with pytest.raises(SpaceError, match=r"no parameter\(s\) optim.momentum to search"):
        space.restricted_to(["optim.momentum"])


def test_every_shipped_space_checks_against_its_example_config():
    from pipeline.train.config import load_config

    configs = Path(__file__).parents[1] / "configs"
    pairs = {"lsla.yaml": "fmnist_vit_lsla_nano.yaml", "castling.yaml": "fmnist_castling_vit_nano.yaml",
             "recipe.yaml": "fmnist_vit_lsla_nano.yaml"}  # fmt: skip
    for space_file, config_file in pairs.items():
        config = load_config(configs / config_file)
        data = config.to_dict()
        data["data"].update(num_classes=10, in_chans=1)
        check_space(load_space(SPACES / space_file), TrainConfig.from_dict(data), build_models=False)


def test_a_baseline_trial_runs_the_configs_own_values_first(tiny_config):
    config = tiny_config(model__kwargs={"depth": 2})
    parameters = {"optim.lr": {"loguniform": [1.0e-4, 1.0e-2]}, "model.kwargs.depth": {"choice": [1, 2, 3]},
                  "optim.label_smoothing": {"quniform": [0.0, 0.2, 0.05]}}  # fmt: skip
    space = parse_space({"baseline": True, "seed": 1, "parameters": parameters}, source="s.yaml")
    check_space(space, config)
    first = space.baseline_values(config)
    assert first == {"optim.lr": config.optim.lr, "model.kwargs.depth": 2,
                     "optim.label_smoothing": config.optim.label_smoothing}  # fmt: skip
    # Optuna and random search both run it before proposing anything
    assert space.searcher("val/top1", "max", [first])._points_to_evaluate == [first]
    random = space.with_overrides(search="random").searcher("val/top1", "max", [first])
    assert type(random).__name__ == "BasicVariantGenerator" and random._points_to_evaluate == [first]
    assert space.with_overrides(search="random", baseline=False).searcher("val/top1", "max") is None
    # The trial that gets exactly those values (as Tune hands them back) is the one tagged baseline
    from pipeline.tune.sweep import _same_values

    assert _same_values({**first, "optim.lr": np.float64(config.optim.lr)}, first)
    assert not _same_values({**first, "model.kwargs.depth": 3}, first) and not _same_values(first, None)


def test_a_baseline_needs_every_searched_value_in_the_config_and_inside_the_space(tiny_config):
    config = tiny_config(model__name="vit_lsla_nano", model__kwargs={}, data__img_size=32)
    ds_init = {"model.kwargs.attn_kwargs.ds_init": {"loguniform": [0.5, 2.0]}}
    message = space_error({"baseline": True, "parameters": ds_init}, config)
    assert "s.yaml: baseline: model.kwargs.attn_kwargs.ds_init is not set in the training config" in message
    narrow = {"optim.lr": {"loguniform": [1.0e-2, 1.0e-1]}}
    message = space_error({"baseline": True, "parameters": narrow}, config)
    assert f"baseline: optim.lr = {config.optim.lr!r} (the training config's) lies outside loguniform(0.01, 0.1)" in message
    with pytest.raises(SpaceError, match="baseline: a grid search runs the values it lists"):
        parse_space({"baseline": True, "search": "grid", "parameters": {"optim.lr": {"grid": [0.1, 0.2]}}})
    with pytest.raises(SpaceError, match="baseline must be true or false, got 'yes please'"):
        parse_space({"baseline": "yes please", "parameters": narrow})
