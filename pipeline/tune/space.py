"""Search spaces: a YAML file -> validated parameters -> Ray Tune distributions.

A space file names the training-config fields to search (dotted keys, as for ``vitpipe train --set``)
and how to draw each, plus the sweep's settings::

    metric: val/top1              # default: the training config's checkpoint.metric / checkpoint.mode
    mode: max
    num_samples: 16               # trials (for `grid`: repeats of the whole grid)
    search: optuna                # optuna | random | grid
    scheduler: {name: asha, grace_period: 1, reduction_factor: 3}   # or fifo (no early stopping)
    seed: 0                       # seeds the searcher
    baseline: true                # the first trial runs the training config's own values (default: false)
    parameters:
      optim.lr: {loguniform: [1.0e-4, 3.0e-3]}
      optim.weight_decay: {uniform: [0.0, 0.1]}
      model.drop_path_rate: {quniform: [0.0, 0.2, 0.05]}     # low, high, step
      optim.warmup_epochs: {randint: [0, 3]}                  # high excluded, as in Tune and numpy
      model.kwargs.attn_kwargs.bias_sharing: {choice: [none, tied, heads, stage]}
      method.castling.mask_reg_schedule: {grid: [constant, linear]}   # every value, crossed with the rest

Two stages of checks, both before Ray starts: :func:`load_space` checks the file on its own (known
distributions, bounds in order, numbers that are numbers); :func:`check_space` checks it against the
training config: every key exists, each parameter's extreme values make a valid config, and values
that change the model (free-form ``model.kwargs`` included) build it, on the meta device.

This module imports Ray only where it builds Tune objects (``param_space``, ``searcher``, ``SchedulerSpec.build``).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.train.config import ConfigError, TrainConfig, apply_overrides, flatten, read_yaml

__all__ = [
    "DISTRIBUTIONS",
    "SEARCHES",
    "SCHEDULERS",
    "Param",
    "SchedulerSpec",
    "SearchSpace",
    "SpaceError",
    "check_space",
    "load_space",
    "parse_space",
    "plain_value",
    "trial_config",
]

DISTRIBUTIONS = ("loguniform", "uniform", "quniform", "randint", "choice", "grid")
SEARCHES = ("optuna", "random", "grid")
SCHEDULERS = ("asha", "fifo")
_TOP_KEYS = ("metric", "mode", "num_samples", "search", "scheduler", "seed", "baseline", "parameters")
_SCHEDULER_KEYS = ("name", "grace_period", "reduction_factor")
# Fields a sweep sets itself, or that must be the same for every trial (resources, where runs go).
_NOT_SEARCHABLE = ("run_name", "storage_path", "ray_address", "scaling", "checkpoint", "mlflow", "max_failures",
                   "data.train", "data.val", "data.test")  # fmt: skip
# Values under these prefixes change what gets built: check_space builds the model for each extreme.
_BUILD_PREFIXES = ("model.", "data.num_classes", "data.img_size", "data.in_chans", "optim.optimizer",
                   "optim.opt_kwargs", "optim.scheduler", "method.")  # fmt: skip


class SpaceError(ValueError):
    """A problem with a search space; the message names the file and the parameter."""


@dataclass(frozen=True)
class Param:
    """One searched field: ``key`` (dotted), ``kind`` (one of :data:`DISTRIBUTIONS`) and its arguments."""

    key: str
    kind: str
    args: tuple

    @property
    def categorical(self) -> bool:
        return self.kind in ("choice", "grid")

    @property
    def log_scale(self) -> bool:
        return self.kind == "loguniform"

    def extremes(self) -> list[Any]:
        """The values that bound what a trial can get: both ends of a range, every category."""
        if self.categorical:
            return list(self.args)
        if self.kind == "randint":
            return [self.args[0], self.args[1] - 1]
        return [self.args[0], self.args[1]]

    def contains(self, value: Any) -> bool:
        """Whether a trial could draw ``value``."""
        if self.categorical:
            return value in self.args
        if not _is_number(value):
            return False
        if self.kind == "randint":
            return _is_int(value) and self.args[0] <= value < self.args[1]
        return self.args[0] <= value <= self.args[1]

    def describe(self) -> str:
        """``loguniform(0.0001, 0.003)``: for the parent run's params and the summary."""
        return f"{self.kind}({', '.join(repr(a) if isinstance(a, str) else str(a) for a in self.args)})"

    def domain(self):
        """The Ray Tune domain (``tune.loguniform(...)``, ``tune.grid_search([...])``, ...)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.args))
        if self.kind == "choice":
            return tune.choice(list(self.args))
        return getattr(tune, self.kind)(*self.args)


@dataclass(frozen=True)
class SchedulerSpec:
    name: str = "asha"
    grace_period: int = 1  # epochs a trial runs before ASHA may stop it
    reduction_factor: float = 3.0  # ASHA keeps the top 1/reduction_factor at each rung

    def build(self, max_epochs: int, experiment_path: str):
        """ASHA on the reported ``epoch`` (it survives restarts, unlike Tune's iteration count), or None.

        ``experiment_path``: the sweep's directory, from which a restored sweep refills ASHA's rungs
        (:class:`pipeline.tune.schedulers.ResumableASHA`).
        """
        if self.name == "fifo":
            return None
        from pipeline.tune.schedulers import ResumableASHA

        if self.grace_period > max_epochs:
            raise SpaceError(f"scheduler.grace_period ({self.grace_period}) exceeds optim.epochs ({max_epochs})")
        # stop_last_trials=False: a trial that reaches the last epoch is left to finish its run (best
        # checkpoint and curves to MLflow, the final model) instead of being stopped at its last report.
        return ResumableASHA(experiment_path, time_attr="epoch", max_t=max_epochs, grace_period=self.grace_period,
                             reduction_factor=self.reduction_factor, stop_last_trials=False)  # fmt: skip


@dataclass
class SearchSpace:
    parameters: dict[str, Param]
    metric: str | None = None  # None: the training config's checkpoint.metric
    mode: str | None = None  # None: the training config's checkpoint.mode
    num_samples: int | None = None  # None: 1 for grid search, else 8
    search: str = "optuna"
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    seed: int | None = None
    # The first trial runs the training config's own values of the searched keys (one of num_samples): the
    # sweep then says what the search gained over the config it started from, at the same budget.
    baseline: bool = False
    source: str = "<space>"  # the file it came from, for messages
    text: str = ""  # the file's text, logged with the sweep

    def samples(self) -> int:
        if self.num_samples is not None:
            return self.num_samples
        return 1 if self.search == "grid" else 8

    def with_overrides(self, *, num_samples: int | None = None, search: str | None = None,
                       scheduler: str | None = None, baseline: bool | None = None) -> SearchSpace:  # fmt: skip
        """The command line's ``--samples`` / ``--search`` / ``--scheduler`` / ``--baseline`` over the file's
        values, rechecked."""
        data = dict(self.__dict__)
        if baseline is not None:
            data["baseline"] = baseline
        if num_samples is not None:
            data["num_samples"] = num_samples
        if search is not None:
            data["search"] = search
        if scheduler is not None:
            data["scheduler"] = SchedulerSpec(scheduler, self.scheduler.grace_period, self.scheduler.reduction_factor)
        space = SearchSpace(**data)
        _check_settings(space)
        return space

    def restricted_to(self, keys: Sequence[str]) -> SearchSpace:
        """The space over ``keys`` alone; the other parameters keep the training config's values."""
        missing = [key for key in keys if key not in self.parameters]
        if missing:
            raise SpaceError(f"{self.source}: no parameter(s) {', '.join(missing)} to search")
        data = dict(self.__dict__, parameters={key: self.parameters[key] for key in keys})
        return SearchSpace(**data)

    def param_space(self) -> dict[str, Any]:
        """Tune's ``param_space``: flat, keyed by the dotted config keys. ``grid`` search turns choices into grids."""
        space = {}
        for key, param in self.parameters.items():
            if self.search == "grid" and param.kind == "choice":
                param = Param(key, "grid", param.args)
            space[key] = param.domain()
        return space

    def baseline_values(self, config: TrainConfig) -> dict[str, Any]:
        """The training config's own value of each searched key: what the baseline trial runs."""
        flat = flatten(config.to_dict())
        values = {}
        for key, param in self.parameters.items():
            where = f"{self.source}: baseline: {key}"
            if key in flat:
                value = flat[key]
            else:  # a key under a free-form mapping (model.kwargs) that the config does not set
                raise SpaceError(f"{where} is not set in the training config, so the baseline trial has no value "
                                 f"for it; set it there (or --set {key}=...)")  # fmt: skip
            if not param.contains(value):
                raise SpaceError(f"{where} = {value!r} (the training config's) lies outside {param.describe()}")
            values[key] = value
        return values

    def searcher(self, metric: str, mode: str, first: list[dict[str, Any]] | None = None):
        """The search algorithm: Optuna's TPE, or Tune's random/grid variant generator (None); ``first``:
        trials to run before the search proposes (the baseline)."""
        if self.search == "optuna":
            from ray.tune.search.optuna import OptunaSearch

            return OptunaSearch(metric=metric, mode=mode, seed=self.seed, points_to_evaluate=first)
        if first:
            from ray.tune.search.basic_variant import BasicVariantGenerator

            return BasicVariantGenerator(points_to_evaluate=first, random_state=self.seed)
        return None


# --------------------------------------------------------------------------------------------------
# Reading and checking the file on its own.


def load_space(path: str | os.PathLike) -> SearchSpace:
    """Read and check a space file (see the module docstring). Errors: :class:`SpaceError`."""
    path = Path(path)
    if not path.is_file():
        raise SpaceError(f"search space file not found: {path}")
    text = path.read_text()
    try:
        # The training config's loader: it also reads `1e-5` as a number (plain PyYAML reads a string).
        data = read_yaml(text)
    except yaml.YAMLError as err:
        raise SpaceError(f"{path}: not valid YAML ({err})") from None
    return parse_space(data, source=str(path), text=text)


def parse_space(data: Any, *, source: str = "<space>", text: str = "") -> SearchSpace:
    """Check a space given as a mapping (as read from YAML) and build it."""
    if not isinstance(data, dict):
        raise SpaceError(f"{source}: expected a mapping at the top level, with a 'parameters' section")
    _no_unknown(data, _TOP_KEYS, source, "")
    parameters = data.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SpaceError(f"{source}: 'parameters' must be a non-empty mapping of dotted config keys to distributions")
    params = {str(key): _parse_param(str(key), spec, source) for key, spec in parameters.items()}

    scheduler = data.get("scheduler", {})
    if isinstance(scheduler, str):
        scheduler = {"name": scheduler}
    if not isinstance(scheduler, dict):
        raise SpaceError(f"{source}: scheduler: expected a name ({' or '.join(SCHEDULERS)}) or a mapping")
    _no_unknown(scheduler, _SCHEDULER_KEYS, source, "scheduler.")
    spec = SchedulerSpec(
        name=scheduler.get("name", "asha"),
        grace_period=scheduler.get("grace_period", 1),
        reduction_factor=scheduler.get("reduction_factor", 3.0),
    )
    space = SearchSpace(
        parameters=params, metric=data.get("metric"), mode=data.get("mode"), num_samples=data.get("num_samples"),
        search=data.get("search", "optuna"), scheduler=spec, seed=data.get("seed"),
        baseline=data.get("baseline", False), source=source, text=text,
    )  # fmt: skip
    _check_settings(space)
    return space


def _no_unknown(data: dict, known: tuple[str, ...], source: str, prefix: str) -> None:
    for key in data:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f" (did you mean {prefix}{close[0]!r}?)" if close else f"; known: {', '.join(known)}"
            raise SpaceError(f"{source}: {prefix}{key}: unknown key{hint}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number_error(where: str, kind: str, value: Any) -> SpaceError:
    hint = ""
    if isinstance(value, str):
        try:
            float(value)
            hint = " (quoted? write numbers bare, e.g. 1.0e-5)"
        except ValueError:
            pass
    return SpaceError(f"{where}: {kind} bounds must be numbers, got {value!r} ({type(value).__name__}){hint}")


def _parse_param(key: str, spec: Any, source: str) -> Param:
    where = f"{source}: parameters.{key}"
    if not key or any(not part for part in key.split(".")):
        raise SpaceError(f"{where}: not a dotted config key such as optim.lr")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise SpaceError(
            f"{where}: expected one distribution, e.g. {{loguniform: [1.0e-4, 1.0e-2]}} or {{choice: [a, b]}}; "
            f"got {spec!r} (fixed values belong in the training config or --set)"
        )
    ((kind, args),) = spec.items()
    if kind not in DISTRIBUTIONS:
        close = difflib.get_close_matches(str(kind), DISTRIBUTIONS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise SpaceError(f"{where}: unknown distribution {kind!r}{hint}; known: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, list):
        raise SpaceError(f"{where}: {kind} takes a list, e.g. {kind}: {_EXAMPLES[kind]}; got {args!r}")

    if kind in ("choice", "grid"):
        if not args:
            raise SpaceError(f"{where}: {kind} needs at least one value")
        for value in args:
            if isinstance(value, dict):
                raise SpaceError(f"{where}: {kind} values must be scalars or lists, got the mapping {value!r}")
        seen = []
        for value in args:
            if value in seen:
                raise SpaceError(f"{where}: {kind} lists {value!r} twice")
            seen.append(value)
        return Param(key, kind, tuple(args))

    arity = 3 if kind == "quniform" else 2
    if len(args) != arity:
        raise SpaceError(f"{where}: {kind} takes {arity} numbers, e.g. {kind}: {_EXAMPLES[kind]}; got {args!r}")
    for value in args:
        if not _is_number(value):
            raise _number_error(where, kind, value)
        if not math.isfinite(value):
            raise SpaceError(f"{where}: {kind} bounds must be finite, got {value}")
    low, high = args[0], args[1]
    if kind == "randint":
        if not (_is_int(low) and _is_int(high)):
            raise SpaceError(f"{where}: randint bounds must be integers, got {args!r}")
        if high - low < 1:
            raise SpaceError(f"{where}: randint needs low < high (high is excluded), got [{low}, {high}]")
        return Param(key, kind, (low, high))
    if not low < high:
        raise SpaceError(f"{where}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise SpaceError(f"{where}: loguniform needs 0 < low, got low = {low}")
    if kind == "quniform":
        step = args[2]
        if step <= 0:
            raise SpaceError(f"{where}: quniform's step must be > 0, got {step}")
        steps = (high - low) / step
        if abs(steps - round(steps)) > 1e-6 or round(steps) < 1:
            raise SpaceError(f"{where}: quniform's range {high} - {low} must be a whole number (>= 1) of steps {step}")
        return Param(key, kind, (float(low), float(high), float(step)))
    return Param(key, kind, (float(low), float(high)))


_EXAMPLES = {
    "loguniform": "[1.0e-4, 1.0e-2]",
    "uniform": "[0.0, 0.1]",
    "quniform": "[0.0, 0.3, 0.05]",
    "randint": "[1, 5]",
    "choice": "[a, b]",
    "grid": "[a, b]",
}


def _check_settings(space: SearchSpace) -> None:
    where = space.source
    if space.search not in SEARCHES:
        raise SpaceError(f"{where}: search must be one of {', '.join(SEARCHES)}, got {space.search!r}")
    if space.scheduler.name not in SCHEDULERS:
        raise SpaceError(f"{where}: scheduler.name must be one of {', '.join(SCHEDULERS)}, got {space.scheduler.name!r}")
    if not _is_int(space.scheduler.grace_period) or space.scheduler.grace_period < 1:
        raise SpaceError(f"{where}: scheduler.grace_period must be an integer >= 1 (epochs), got {space.scheduler.grace_period!r}")
    if not _is_number(space.scheduler.reduction_factor) or space.scheduler.reduction_factor <= 1:
        raise SpaceError(f"{where}: scheduler.reduction_factor must be a number > 1, got {space.scheduler.reduction_factor!r}")
    if space.num_samples is not None and (not _is_int(space.num_samples) or space.num_samples < 1):
        raise SpaceError(f"{where}: num_samples must be an integer >= 1, got {space.num_samples!r}")
    if space.seed is not None and not _is_int(space.seed):
        raise SpaceError(f"{where}: seed must be an integer, got {space.seed!r}")
    if not isinstance(space.baseline, bool):
        raise SpaceError(f"{where}: baseline must be true or false, got {space.baseline!r}")
    if space.baseline and space.search == "grid":
        raise SpaceError(f"{where}: baseline: a grid search runs the values it lists; use search: optuna or random "
                         "to add the config's own values as the first trial")  # fmt: skip
    if space.mode is not None and space.mode not in ("max", "min"):
        raise SpaceError(f"{where}: mode must be max or min, got {space.mode!r}")
    if (space.metric is None) != (space.mode is None):
        raise SpaceError(f"{where}: give metric and mode together (or neither: the config's checkpoint.metric/mode)")
    if space.search == "optuna":
        for param in space.parameters.values():
            if param.kind == "grid":
                raise SpaceError(f"{where}: parameters.{param.key}: optuna cannot search a grid; use choice, "
                                 "or search: random / grid")  # fmt: skip
            if param.kind == "choice" and any(isinstance(v, list) for v in param.args):
                raise SpaceError(f"{where}: parameters.{param.key}: optuna's categories must be scalars, this "
                                 "choice has lists; use search: random")  # fmt: skip
    if space.search == "grid":
        for param in space.parameters.values():
            if not param.categorical:
                raise SpaceError(f"{where}: parameters.{param.key}: grid search needs finite values; "
                                 f"use grid or choice instead of {param.kind}")  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Checking the space against a training config.


def _searchable(key: str, source: str) -> None:
    for prefix in _NOT_SEARCHABLE:
        if key == prefix or key.startswith(prefix + "."):
            raise SpaceError(f"{source}: parameters.{key}: cannot be searched (the sweep sets {prefix} itself, or "
                             "every trial must share it); set it in the training config")  # fmt: skip


def trial_config(base: dict[str, Any], values: dict[str, Any]) -> TrainConfig:
    """The training config of one trial: ``base`` (a ``TrainConfig.to_dict()``) with the drawn values set."""
    return TrainConfig.from_dict(apply_overrides(base, {k: plain_value(v) for k, v in values.items()}))


def plain_value(value: Any) -> Any:
    """Tune hands numpy scalars and tuples back; the config wants plain Python values."""
    if hasattr(value, "item") and callable(value.item) and not isinstance(value, (list, dict, str)):
        return value.item()
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    return value


def check_space(space: SearchSpace, config: TrainConfig, *, build_models: bool = True) -> tuple[str, str]:
    """Check ``space`` against a resolved training config; returns the sweep's ``(metric, mode)``.

    Each parameter alone at each of its extreme values (both range ends, every category; the other
    fields as in ``config``) must give a valid config; with ``build_models`` the values that change the
    model or its optimiser are built too (meta device), so a misspelt ``model.kwargs`` key or a value
    the model rejects fails here, naming the parameter, not in a trial on the cluster.
    """
    from pipeline.train.launcher import check_model_and_optimisation

    base = config.to_dict()
    metric = space.metric or config.checkpoint.metric
    mode = space.mode or config.checkpoint.mode
    try:  # the sweep keeps each trial's checkpoints by the sweep's metric: it must be one the loop reports
        TrainConfig.from_dict(apply_overrides(base, {"checkpoint.metric": metric, "checkpoint.mode": mode}))
    except ConfigError as err:
        raise SpaceError(f"{space.source}: metric: {err}") from None
    for key, param in space.parameters.items():
        _searchable(key, space.source)
        for value in param.extremes():
            where = f"{space.source}: parameters.{key} = {value!r}"
            try:
                trial = trial_config(base, {key: value})
                if build_models and key.startswith(_BUILD_PREFIXES):
                    check_model_and_optimisation(trial)
            except (ValueError, TypeError) as err:  # ConfigError, or a model constructor rejecting the value
                raise SpaceError(f"{where}: {err}") from None
    if space.baseline:
        space.baseline_values(config)
    if space.scheduler.name == "asha" and space.scheduler.grace_period > config.optim.epochs:
        raise SpaceError(f"{space.source}: scheduler.grace_period ({space.scheduler.grace_period}) exceeds the "
                         f"config's optim.epochs ({config.optim.epochs})")  # fmt: skip
    return metric, mode
