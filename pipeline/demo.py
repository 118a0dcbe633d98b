"""The whole mission on one machine: shards, training, tuning, the registry, evaluation.

``make demo`` runs ``python -m pipeline.demo --quick``: Fashion-MNIST (from Debian's
``dataset-fashion-mnist``) becomes WebDataset shards; a local Ray with 2 CPU workers trains the small
ViT-LSLA, Castling-ViT and DVT models and their ``msa`` twins; two small Ray Tune sweeps search LSLA's
dynamic-scale initialisation and outer-bias sharing, and Castling's mask-regularisation strength;
each sweep's best checkpoint is registered with the alias ``champion`` in MLflow's registry, as is the
DVT cascade's, and each is evaluated from there on the test split (DVT with its budget curve: accuracy
against expected MACs). Everything lands in one local MLflow store.

Re-running is safe: shards that exist are reused, finished runs are not trained again, and a sweep
that exists is resumed (``--new`` starts every run and sweep over).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
REPO = Path(__file__).resolve().parent.parent


# The quick profile's trades, measured on Fashion-MNIST (one process, 2 CPU threads): the plain ViTs at 16
# tokens (8x8 patches), depth 4, D=96 train 9x faster than at their own 64 tokens, depth 6, D=128 (vit_msa_nano
# 1,682 against 190 img/s per thread, castling_vit_nano 959 against 103); at D=128 those 16 tokens reach 80-81%
# after one epoch of 54,000 images, against 75% for 64 tokens at depth 2. The DVT cascade at grids 2/3/4,
# depth 2, D=96: 1,026 img/s per thread against 138 at 4/6/8, depth 2. The hierarchical nanos keep their
# size: 86% after one epoch.
_PLAIN_QUICK = {"patch_size": 8, "depth": 4, "embed_dim": 96, "num_heads": 3}
_DVT_QUICK = {"grids": [2, 3, 4], "depth": 2, "embed_dim": 96, "num_heads": 3}


@dataclass(frozen=True)
class Profile:
    """How much of everything one demo run does."""

    train_images: int | None  # None: all 60,000 (54,000 train + 6,000 val)
    test_images: int | None  # None: all 10,000
    epochs: int
    sweep_trials: int
    sweep_epochs: int
    batch_size: int = 64  # per worker
    # Trials at once, each with this many workers. Quick: all trials together on one worker each, so their
    # Ray Train start-ups (~15 s each) overlap instead of adding up; full: one 2-worker trial at a time.
    sweep_concurrency: int = 1
    sweep_workers: int = 2
    # model.kwargs by model name, over the model's own defaults (see _PLAIN_QUICK).
    model_kwargs: dict[str, dict] = field(default_factory=dict)
    # Epochs by model name, over ``epochs``: the plain ViTs need about twice the images the hierarchical
    # models need for the same accuracy (their twins get the same).
    model_epochs: dict[str, int] = field(default_factory=dict)
    # data.* / optim.* overrides for every run. Quick: light augmentation (crops of 80-100% of the image,
    # flips, no colour jitter): two epochs are too few to profit from more.
    overrides: dict[str, Any] = field(default_factory=dict)
    # The sweeps search only the method's own knobs (LSLA's scale and bias sharing, Castling's regulariser),
    # at the recipe's learning rate; False: the whole space file (learning rate, weight decay, drop path too).
    sweep_method_knobs_only: bool = False
    # The final model of each training run as an MLflow model (torch.export, ~5 s each); the registered
    # champions are logged either way.
    log_models: bool = True
    # Each model trained by its recipe, configs/fmnist_<model>.yaml (its epochs, batch, augmentation and
    # optimiser; the sweeps with sweep_epochs), instead of the base config with the fields above.
    recipes: bool = False
    # Test top-1 (%) every trained and registered model must reach, and the best of them: below, the demo
    # exits non-zero naming the model (a regression shows). None: not checked.
    floor_top1: float | None = None
    best_floor_top1: float | None = None


PROFILES = {
    # All of Fashion-MNIST (a tenth of the training images held out for validation): one epoch for the
    # hierarchical models, two for the plain ViTs; 2-trial sweeps of one epoch. Loader work in the training
    # process: on 2 cores a loader process per worker slows training by a fifth.
    "quick": Profile(train_images=None, test_images=None, epochs=1, sweep_trials=2, sweep_epochs=1,
                     sweep_concurrency=2, sweep_workers=1, log_models=False, sweep_method_knobs_only=True,
                     model_kwargs={"castling_vit_nano": _PLAIN_QUICK, "vit_msa_nano": _PLAIN_QUICK,
                                   "dvt_vit_nano": _DVT_QUICK},
                     model_epochs={"castling_vit_nano": 2, "vit_msa_nano": 2, "dvt_vit_nano": 2},
                     overrides={"data.crop_scale": [0.8, 1.0], "data.color_jitter": 0.0, "data.loader_workers": 0},
                     floor_top1=80.0, best_floor_top1=84.0),  # fmt: skip
    # The recipes as they are (10 epochs each), 8-trial sweeps of 6 epochs over the whole space files.
    "full": Profile(train_images=None, test_images=None, epochs=10, sweep_trials=8, sweep_epochs=6, recipes=True),
}

# (registered name, model kwargs, method overrides): each family with its softmax twin.
MODELS = [
    ("vit_lsla_nano", {}, {}),
    ("hier_msa_nano", {}, {}),
    ("castling_vit_nano", {}, {}),  # the default gate penalty and schedule: masks empty by 75% of training
    ("vit_msa_nano", {}, {}),
    ("dvt_vit_nano", {}, {}),
]


def _model_kwargs(name: str, kwargs: dict, profile: Profile) -> dict:
    return {**profile.model_kwargs.get(name, {}), **kwargs}


# (space file, model the sweep trains, extra overrides, the method's own knobs in that space)
SWEEPS = [
    ("tune_spaces/lsla.yaml", "vit_lsla_nano", {},
     ("model.kwargs.attn_kwargs.ds_init", "model.kwargs.attn_kwargs.ds_init_unit", "model.kwargs.attn_kwargs.bias_sharing")),
    ("tune_spaces/castling.yaml", "castling_vit_nano", {},
     ("method.castling.mask_reg_strength", "method.castling.branch_off_at")),
]


def build_demo_shards(out_dir: Path, profile: Profile, source: Path = FASHION_MNIST) -> Path:
    """Fashion-MNIST as shards, a seeded subset of it for the quick profile. Reused when already built."""
    from pipeline.data.manifest import read_manifest
    from pipeline.data.shards import write_dataset
    from pipeline.data.sources import ArraySource, idx_source

    if (out_dir / "train" / "manifest.json").exists():
        manifest = read_manifest(out_dir)
        print(f"[demo] reusing the shards in {out_dir}")
        del manifest  # reading it checks that the shard set is whole
        return out_dir
    if not source.is_dir():
        raise SystemExit(
            f"[demo] {source} is missing: install Fashion-MNIST with "
            "`sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist` (make demo does this)"
        )
    full = idx_source(source)
    rng = np.random.default_rng(0)
    limits = {"train": profile.train_images, "test": profile.test_images}
    splits = {}
    for split, (images, labels) in full.splits.items():
        keep = limits.get(split)
        if keep is not None and keep < len(labels):
            index = np.sort(rng.permutation(len(labels))[:keep])
            images, labels = images[index], labels[index]
        splits[split] = (images, labels)
    subset = ArraySource(splits, full.classes, name=full.name, format=full.format)
    samples = sum(len(labels) for _, labels in splits.values())
    print(f"[demo] building shards of {samples:,} Fashion-MNIST images in {out_dir}")
    per_shard = 5_000 if profile.train_images is None else 500 if profile.train_images <= 5_000 else 1_000
    write_dataset(subset, out_dir, samples_per_shard=per_shard, val_fraction=0.1, seed=0)
    return out_dir


def _common_overrides(data_dir: Path, work: Path, tracking_uri: str, profile: Profile, epochs: int | None,
                      log_models: bool) -> dict:  # fmt: skip
    """Where a run reads and writes, and ``epochs`` unless None; with a recipe (full profile) nothing else."""
    overrides = {
        "data.train": str(data_dir / "train"),
        "data.val": str(data_dir / "val"),
        "data.test": str(data_dir / "test"),
        "storage_path": str(work / "runs"),
        "mlflow.tracking_uri": tracking_uri,
        "mlflow.experiment": "vitpipe-demo",
        "mlflow.log_model": log_models,
    }
    if epochs is not None:
        overrides["optim.epochs"] = epochs
    if not profile.recipes:
        overrides.update({"data.batch_size": profile.batch_size, "optim.warmup_epochs": 0, "model.kwargs": {}})
    return {**overrides, **profile.overrides}


def _config_path(config_path: Path, model: str, profile: Profile) -> Path:
    return REPO / "configs" / f"fmnist_{model}.yaml" if profile.recipes else config_path


def train_models(config_path: Path, data_dir: Path, work: Path, tracking_uri: str, profile: Profile,
                 new: bool, models: list[tuple[str, dict, dict]] = MODELS) -> list[dict]:  # fmt: skip
    """Train every model once (or find it already trained); one row of results per model."""
    from pipeline.train.launcher import prepare, train

    rows = []
    for name, kwargs, method in models:
        epochs = None if profile.recipes else profile.model_epochs.get(name, profile.epochs)  # None: the recipe's
        common = _common_overrides(data_dir, work, tracking_uri, profile, epochs, profile.log_models)
        kwargs = _model_kwargs(name, kwargs, profile)
        overrides = {**common, "model.name": name, "run_name": f"demo-{name}", **method}
        if kwargs or not profile.recipes:
            overrides["model.kwargs"] = kwargs
        config = prepare(_config_path(config_path, name, profile), overrides)
        size = "".join(f"{k} {v}, " for k, v in kwargs.items())
        print(f"\n[demo] === training {name} ({size}{config.optim.epochs} epoch(s), {config.scaling.num_workers} "
              "workers) ===")  # fmt: skip
        start = time.perf_counter()
        summary = train(config, new=new)
        rows.append({"model": name, **_run_metrics(tracking_uri, summary["mlflow_run_id"]),
                     "wall_s": time.perf_counter() - start})  # fmt: skip
    return rows


def _run_metrics(tracking_uri: str, run_id: str) -> dict:
    """What the results table shows of a run, read back from MLflow (so finished runs report too)."""
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri).get_run(run_id)
    metrics, params = run.data.metrics, run.data.params

    def pick(key):
        value = metrics.get(key)
        return None if value is None else float(value)

    return {
        "run_id": run_id,
        "params_m": float(params.get("model.params", "nan")) / 1e6,
        "gmacs": float(params.get("model.macs", "nan")) / 1e9,
        "val_top1": pick("val/top1"),  # the last epoch
        "test_top1": pick("test/top1"),  # the best checkpoint, deployed form
        "images_per_s": pick("train/images_per_s"),
    }


def run_sweeps(config_path: Path, data_dir: Path, work: Path, tracking_uri: str, profile: Profile,
               new: bool, quiet: bool = True) -> list:  # fmt: skip
    from pipeline.train.launcher import prepare
    from pipeline.tune.space import load_space
    from pipeline.tune.sweep import run_sweep

    results = []
    for space_path, model, extra, method_knobs in SWEEPS:
        space = load_space(REPO / space_path).with_overrides(num_samples=profile.sweep_trials)
        if profile.sweep_method_knobs_only:
            space = space.restricted_to(method_knobs)
        # the sweep registers its champion from the best checkpoint: no per-trial model export
        common = _common_overrides(data_dir, work, tracking_uri, profile, profile.sweep_epochs, False)
        overrides = {**common, "model.name": model, "run_name": f"demo-sweep-{model}",
                     "scaling.num_workers": profile.sweep_workers, **extra}  # fmt: skip
        if not profile.recipes:
            overrides["model.kwargs"] = _model_kwargs(model, {}, profile)
        config = prepare(_config_path(config_path, model, profile), overrides)
        print(f"\n[demo] === sweep {space_path} on {model}: {profile.sweep_trials} trials x "
              f"{profile.sweep_epochs} epochs ===")  # fmt: skip
        result = run_sweep(space, config, new=new, register=True, model_name=f"demo-{model}",
                           max_concurrent=profile.sweep_concurrency, quiet=quiet)  # fmt: skip
        results.append(result)  # run_sweep printed its table
    return results


def register_and_evaluate(rows: list[dict], sweeps: list, data_dir: Path, work: Path, tracking_uri: str) -> list:
    """Each sweep's champion (registered by the sweep) and the DVT cascade's run, registered here, evaluated
    from the registry on the test split; DVT's evaluation adds its budget curve (JSON + PNG)."""
    from pipeline.eval.evaluate import evaluate_model
    from pipeline.registry import promote_run

    promotions = [s.promotion for s in sweeps if s.promotion is not None]
    for row in rows:
        if row["model"].startswith("dvt_"):
            promotions.append(promote_run(row["run_id"], tracking_uri=tracking_uri, name=f"demo-{row['model']}"))
    evaluations = []
    for promotion in promotions:
        out_dir = work / "evaluations" / promotion.name
        print(f"\n[demo] === evaluating {promotion.uri} (version {promotion.version}) on the test split ===")
        evaluations.append((promotion, evaluate_model(promotion.uri, data_dir, split="test", tracking_uri=tracking_uri,
                                                      out_dir=out_dir), out_dir))  # fmt: skip
    return evaluations


def _knobs(values: dict) -> str:
    """Searched values, short: the last part of each dotted name, floats to 3 significant digits."""
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={v:.3g}" if isinstance(v, float) else f"{k.rsplit('.', 1)[-1]}={v}"
                     for k, v in values.items())  # fmt: skip


def print_results(rows: list[dict], sweeps: list, evaluations: list, tracking_uri: str) -> None:
    print("\n[demo] === results (Fashion-MNIST; test: the best checkpoint, deployed form) ===")
    # run s: the whole run as the driver saw it, Ray Train's start-up and the model export included
    print(f"{'model':<20} {'params (M)':>10} {'MMACs':>8} {'val top-1 %':>12} {'test top-1 %':>12} "
          f"{'train img/s':>12} {'run s':>6}")  # fmt: skip

    def percent(value):
        return "-" if value is None else f"{value:.2f}"

    for r in rows:
        speed = f"{r['images_per_s']:.0f}" if r["images_per_s"] is not None else "-"
        print(f"{r['model']:<20} {r['params_m']:>10.3f} {r['gmacs'] * 1e3:>8.2f} {percent(r['val_top1']):>12} "
              f"{percent(r['test_top1']):>12} {speed:>12} {r['wall_s']:>6.0f}")  # fmt: skip
    for result in sweeps:
        if result.best is not None:
            print(f"sweep {result.name}: best {result.metric} = {result.best.best:.2f} ({_knobs(result.best.values)})")
    if evaluations:
        print("\n[demo] === registered models, evaluated from the registry (test split) ===")
        print(f"{'model URI':<42} {'version':>7} {'test top-1 %':>12} {'top-5 %':>8}  what else")
        for promotion, report, out_dir in evaluations:
            extra = ""
            if report.budget is not None:
                cheap = min(report.budget.points, key=lambda p: p.expected_gmacs)
                extra = (f"budget curve {out_dir / 'dvt_budget.png'} (from {cheap.expected_gmacs * 1e3:.1f} MMACs at "
                         f"{cheap.top1:.1f}%); anytime top-1 per exit: "
                         + ", ".join(f"{a:.1f}" for a in report.budget.anytime_top1))  # fmt: skip
            print(f"{promotion.uri:<42} {promotion.version:>7} {report.metrics['top1']:>12.2f} "
                  f"{report.metrics['top5']:>8.2f}  {extra}")  # fmt: skip
    print(f"\n[demo] browse everything:  .venv/bin/mlflow ui --backend-store-uri {tracking_uri} --port 5000")


def below_floors(rows: list[dict], evaluations: list, profile: Profile) -> list[str]:
    """What missed the profile's accuracy floors (test top-1), one line each; empty when all is well."""
    if profile.floor_top1 is None:
        return []
    scores = {f"{r['model']} (trained)": r["test_top1"] for r in rows}
    scores.update({f"{promotion.uri} (registered)": report.metrics["top1"] for promotion, report, _ in evaluations})
    missed = [f"{name}: test top-1 {'not measured' if top1 is None else f'{top1:.2f}%'} < {profile.floor_top1:g}%"
              for name, top1 in scores.items() if top1 is None or top1 < profile.floor_top1]  # fmt: skip
    best = max((top1 for top1 in scores.values() if top1 is not None), default=None)
    if profile.best_floor_top1 is not None and (best is None or best < profile.best_floor_top1):
        missed.append(f"the best test top-1 is {'not measured' if best is None else f'{best:.2f}%'} "
                      f"< {profile.best_floor_top1:g}%")  # fmt: skip
    return missed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="profile", action="store_const", const="quick",
                      help="40,000 training images x 2 epochs; the plain ViTs at 16 tokens (8x8 patches), depth 4, "
                      "D=96 and the DVT cascade at grids 2/3/4, depth 2 (the hierarchical models as they are); "
                      "light augmentation; 2-trial sweeps of the methods' own knobs; every model must reach "
                      "80%% test top-1, the best 84%%; 16-18 min on 2 idle cores (default)")
    size.add_argument("--full", dest="profile", action="store_const", const="full",
                      help="all of Fashion-MNIST, each model by its recipe (configs/fmnist_<model>.yaml: 10 epochs "
                      "at the model's own size), 8-trial sweeps of 6 epochs over the whole space files (hours on a CPU)")
    parser.set_defaults(profile="quick")
    parser.add_argument("--work-dir", default="demo", help="where shards, checkpoints and mlflow.db go")
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny_cpu.yaml"), help="the base training config of the quick profile (the full one trains the recipes)")
    parser.add_argument("--skip-sweeps", action="store_true", help="train and evaluate only")
    parser.add_argument("--new", action="store_true", help="start every run and sweep over")
    parser.add_argument("--verbose", action="store_true", help="show Ray's and MLflow's own log lines and Tune's "
                        "status tables, and a progress line every 50 steps (default: a line per epoch and trial)")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if args.verbose:
        os.environ["VITPIPE_VERBOSE"] = "1"  # read by the training loop in every worker
    else:  # set before Ray starts, so that its workers inherit them
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        # Tune's reporter at verbosity 0; the default one still prints each sweep's settings box and paths.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    profile = PROFILES[args.profile]
    if not args.verbose:
        profile = replace(profile, overrides={**profile.overrides, "log_every": 10_000})  # the epochs' lines only
    work = Path(args.work_dir).resolve() / args.profile
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    config_path = Path(args.config)

    phases: dict[str, float] = {}  # wall-clock seconds of each part, printed at the end
    mark = start = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal mark
        phases[phase], mark = time.perf_counter() - mark, time.perf_counter()

    data_dir = build_demo_shards(work / "shards", profile)
    lap("shards")
    import ray

    # Logical CPUs for 2 workers + the train controller, and for the concurrent sweep trials (each its
    # workers + its trial actor). With the dashboard: Ray Train's placement-group cleaner polls its state API.
    ray.init(num_cpus=max(os.cpu_count() or 2, 3, profile.sweep_concurrency * (profile.sweep_workers + 1)),
             logging_level=logging.INFO if args.verbose else logging.WARNING)  # fmt: skip
    lap("Ray start")
    try:
        rows = train_models(config_path, data_dir, work, tracking_uri, profile, args.new)
        lap("training")
        sweeps = [] if args.skip_sweeps else run_sweeps(config_path, data_dir, work, tracking_uri, profile, args.new,
                                                        quiet=not args.verbose)
        lap("sweeps")
    finally:
        ray.shutdown()

    evaluations = register_and_evaluate(rows, sweeps, data_dir, work, tracking_uri)
    lap("registry and evaluation")
    print_results(rows, sweeps, evaluations, tracking_uri)
    print(f"[demo] done in {(time.perf_counter() - start) / 60:.1f} min: "
          + ", ".join(f"{phase} {seconds:.0f} s" for phase, seconds in phases.items()))  # fmt: skip
    missed = below_floors(rows, evaluations, profile)
    if missed:
        print(f"[demo] FAILED: below the {args.profile} profile's accuracy floors (a regression):\n  "
              + "\n  ".join(missed), file=sys.stderr)  # fmt: skip
        return 1
    if profile.floor_top1 is not None:
        print(f"[demo] every model reached the floors: test top-1 >= {profile.floor_top1:g}%, "
              f"the best >= {profile.best_floor_top1:g}%")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
