"""Accuracy of every small model on Fashion-MNIST at an equal training budget, trained by the pipeline itself.

    python -m benchmarks.bench_accuracy                         # 8k images x 2 epochs each, ~15 min on 2 cores
    python -m benchmarks.bench_accuracy --train-images 4000 --epochs 1 --models vit_lsla_nano hier_msa_nano
    python -m benchmarks.bench_accuracy --castling --train-images 3000  # Castling models and their softmax twins
    python -m benchmarks.bench_accuracy --ablation lsla --train-images 12000 --epochs 1 --seeds 2
    python -m benchmarks.bench_accuracy --ablation castling --train-images 12000 --epochs 3 --seeds 2
    python -m benchmarks.bench_accuracy --ablation dvt --demo-sizes --train-images all --epochs 2 --seeds 3
    python -m benchmarks.bench_accuracy --models castling_vit_nano vit_msa_nano --demo-sizes --train-images all --seeds 3

Each model is trained by the pipeline (``configs/tiny_cpu.yaml``: Ray Train, 2 gloo CPU workers, 64 images per
worker, AdamW + cosine, the same seeded shards, batches and number of steps), with the demo's method terms
(Castling's mask regularisation), and by default the recipes' augmentation and optimiser (``--settings
recipe``: those of ``configs/fmnist_*.yaml``, read from configs/fmnist_vit_lsla_nano.yaml, a tenth of the
epochs as warm-up); ``--settings tiny_cpu`` keeps
that config's own (crops of 8-100%, colour jitter 0.4, lr 2e-3, weight decay 0.05, no warm-up). Its best
checkpoint (by validation top-1) is then
evaluated on all 10,000 test images by ``pipeline.eval.evaluate`` (Castling in inference form; a DVT
cascade by its last exit, and its budget curve). The table gives parameters and MACs (the project's
counter), validation and test top-1, and the pipeline's training images/s (2 workers, wall clock).

``--castling`` trains the three Castling models (plain, windowed, DVT cascade) and their softmax twins, and
adds a table of the branch's fate: the last validation top-1 of the training form (``val_train_form/top1``,
logged while the branch exists) against the deployed form's at that epoch (``val/top1``), the mask density
per epoch, and the deployed model's test top-1 against its twin's.

``--ablation lsla`` trains vit_lsla_nano in the shape of the LSLA paper's study: keys/values ``qkv`` /
``qxv`` / ``qxx`` x scale ``fixed`` / ``dynamic`` x outer bias on / off, then the full LSLA with other
``ds_init`` values and ``bias_sharing`` modes, and hier_msa_nano (softmax windows) as the reference. With
``--seeds N`` every model or variant is trained N times (``optim.seed`` 0..N-1); the tables give the mean and
the spread (min-max) of test top-1.

``--ablation castling`` trains castling_swin_nano with and without its parts (the paper's study): the depthwise
conv (``dwconv="none"``) and the auxiliary masked softmax branch (``sparse_branch=False``: trained without it),
and hier_msa_nano as the reference; then the same for castling_vit_nano (``plain-*``) against vit_msa_nano.
``--ablation dvt`` trains dvt_vit_nano's cascade and each of its exits alone (a one-grid cascade: no feature or relation reuse) and sets the cascade's budget curve (thresholds
calibrated on val, swept on test) against every exit alone: the cheapest budget that reaches the exit's
accuracy, and its MACs against the exit's.

``--demo-sizes`` gives the plain ViTs and the DVT cascade the sizes ``make demo`` trains them at (its quick
profile: 8x8 patches, depth 4, D=96; DVT grids 2/3/4, depth 2): their own sizes are 6-9x slower on 2 cores.

Runs land in a local MLflow store under ``--work-dir`` (browse them with ``mlflow ui``). Needs the Debian
package dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from pipeline.demo import MODELS, PROFILES, Profile, build_demo_shards, train_models

REPO = Path(__file__).resolve().parent.parent
# each Castling model with its softmax twin (same backbone and size)
CASTLING_TWINS = {"castling_vit_nano": "vit_msa_nano", "castling_swin_nano": "hier_msa_nano",
                  "dvt_castling_nano": "dvt_vit_nano"}  # fmt: skip


def _castling(model: str = "castling_swin_nano", **attn_kwargs) -> tuple[str, dict]:
    return model, {"attn_kwargs": attn_kwargs} if attn_kwargs else {}


# the Castling paper's ablation of its parts: in the hierarchical backbone (which learns at 12k images), then in
# the plain ViT (castling_vit_nano, with its twin: at --demo-sizes for speed)
CASTLING_ABLATION = {
    "full": _castling(),
    "no_dwconv": _castling(dwconv="none"),
    "no_branch": _castling(sparse_branch=False),
    "no_dwconv-no_branch": _castling(dwconv="none", sparse_branch=False),
    "hier_msa_nano": ("hier_msa_nano", {}),
    "plain-full": _castling("castling_vit_nano"),
    "plain-no_dwconv": _castling("castling_vit_nano", dwconv="none"),
    "plain-no_branch": _castling("castling_vit_nano", sparse_branch=False),
    "vit_msa_nano": ("vit_msa_nano", {}),
}


def _dvt_exits(profile: Profile) -> dict[str, tuple[str, dict]]:
    """dvt_vit_nano's cascade, and each of its exits trained alone (a cascade of one grid)."""
    import timm
    import torch

    import pipeline.models  # noqa: F401  (registers the models)

    with torch.device("meta"):
        grids = timm.create_model("dvt_vit_nano", **profile.model_kwargs.get("dvt_vit_nano", {})).grids
    return {"cascade": ("dvt_vit_nano", {}), **{f"exit_{g}x{g}_alone": ("dvt_vit_nano", {"grids": [g]}) for g in grids}}


def _lsla(kv: str = "qxx", scale: str = "dynamic", outer_bias: bool = True, **more) -> tuple[str, dict]:
    return "vit_lsla_nano", {"attn_kwargs": {"kv": kv, "scale": scale, "outer_bias": outer_bias, **more}}


# variant name -> (model, model.kwargs): the LSLA paper's ablation axes, then the knobs the sweeps search
LSLA_ABLATION = {
    **{f"{kv}-{scale}-{'ob' if ob else 'no_ob'}": _lsla(kv, scale, ob)
       for kv in ("qkv", "qxv", "qxx") for scale in ("fixed", "dynamic") for ob in (False, True)},
    "qxx-dynamic-ob-ds_init_0.5": _lsla(ds_init=0.5),
    "qxx-dynamic-ob-ds_init_2": _lsla(ds_init=2.0),
    **{f"qxx-dynamic-ob-share_{mode}": _lsla(bias_sharing=mode) for mode in ("tied", "heads", "stage")},
    "hier_msa_nano": ("hier_msa_nano", {}),
}  # fmt: skip


RECIPE = REPO / "configs" / "fmnist_vit_lsla_nano.yaml"  # the recipe shape every configs/fmnist_*.yaml shares
RECIPE_KEYS = ("data.crop_scale", "data.hflip", "data.color_jitter", "data.random_erasing", "data.loader_workers",
               "optim.lr", "optim.weight_decay", "optim.min_lr", "optim.clip_grad", "optim.label_smoothing",
               "model.drop_path_rate")  # fmt: skip


def recipe_settings(epochs: int) -> dict:
    """The recipe's augmentation and optimiser as overrides, its warm-up (a tenth of its epochs) scaled to ``epochs``."""
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    settings = {key: recipe[key.split(".")[0]][key.split(".")[1]] for key in RECIPE_KEYS}
    return {**settings, "optim.warmup_epochs": epochs // 10}


def _images(text: str) -> int | None:
    return None if text == "all" else int(text)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=_images, default=8_000, help="training images drawn from the 60k, "
                        "or 'all' (a tenth of them is held out for validation)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=None, choices=sorted({name for name, _, _ in MODELS} |
                        set(CASTLING_TWINS) | set(CASTLING_TWINS.values())))  # fmt: skip
    parser.add_argument("--castling", action="store_true", help="the Castling models and their twins (see above)")
    parser.add_argument("--ablation", choices=["lsla", "castling", "dvt"], help="a paper's ablation (see above)")
    parser.add_argument("--variants", nargs="+", help="with --ablation: only these (names as in its table)")
    parser.add_argument("--demo-sizes", action="store_true", help="the plain ViTs and DVT at make demo's sizes")
    parser.add_argument("--settings", choices=["recipe", "tiny_cpu"], default="recipe",
                        help="augmentation and optimiser: the recipes' (default) or configs/tiny_cpu.yaml's")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=1, help="runs of every model or variant, optim.seed 0..N-1")
    parser.add_argument("--reuse", action="store_true", help="runs already finished in --work-dir are read back, "
                        "not trained again (their images/s are those they measured)")  # fmt: skip
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/vitpipe-bench-accuracy"))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    import ray

    from pipeline.eval.evaluate import evaluate_model
    from pipeline.registry import best_checkpoint

    profile = Profile(train_images=args.train_images, test_images=None, epochs=args.epochs, sweep_trials=0,
                      sweep_epochs=0, model_kwargs=PROFILES["quick"].model_kwargs if args.demo_sizes else {},
                      overrides=recipe_settings(args.epochs) if args.settings == "recipe" else {})  # fmt: skip
    ablation = {"lsla": LSLA_ABLATION, "castling": CASTLING_ABLATION}.get(args.ablation) or \
        (_dvt_exits(profile) if args.ablation == "dvt" else {})  # fmt: skip
    unknown = sorted(set(args.variants or ()) - set(ablation))
    if unknown:
        parser.error(f"--ablation {args.ablation} has no variant(s) {unknown}; it has {sorted(ablation)}")
    images = "all" if args.train_images is None else f"{args.train_images:,}"
    sizes = "-demo_sizes" if args.demo_sizes else ""
    work = args.work_dir.resolve() / f"{args.train_images or 'all'}x{args.epochs}-{args.settings}{sizes}"
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    data_dir = build_demo_shards(work / "shards", profile)
    names = args.models or ([n for pair in CASTLING_TWINS.items() for n in pair] if args.castling
                            else [name for name, _, _ in MODELS])  # fmt: skip
    variants = {name: (name, {}) for name in names}
    if args.ablation:
        variants = {v: ablation[v] for v in (args.variants or ablation)}
    labels, models = [], []
    for label, (name, kwargs) in variants.items():
        for seed in range(args.seeds):
            run = label if args.seeds == 1 else f"{label}-seed{seed}"
            labels.append((label, seed, run))
            models.append((name, kwargs, {"run_name": f"demo-{run}", "optim.seed": seed}))
    wall = time.perf_counter()
    ray.init(num_cpus=max(os.cpu_count() or 2, 3))  # as the demo starts it
    try:  # new=True: a benchmark measures a whole run, never a resumed one (unless --reuse)
        rows = train_models(REPO / "configs" / "tiny_cpu.yaml", data_dir, work, tracking_uri, profile, new=not args.reuse,
                            models=models)  # fmt: skip
    finally:
        ray.shutdown()

    for row, (label, seed, run) in zip(rows, labels):
        row.update(variant=label, seed=seed)
        found = best_checkpoint(work / "runs" / f"demo-{run}", "val/top1", "max")
        if found is None:
            raise SystemExit(f"{row['model']}: no checkpoint under {work / 'runs'}")
        report = evaluate_model(found[0], data_dir, split="test")
        row["test_top1"] = report.metrics["top1"]
        row["test_images"] = report.samples
        # a DVT cascade (an exit alone has no budget to pick): the cheapest budget within 0.2 points of the last exit
        if report.budget is not None and len(report.budget.grids) > 1:
            try:
                point = report.budget.cheapest_reaching(row["test_top1"] - 0.2)
            except ValueError:  # the sweep's dearest point can fall short of the last exit on a small split
                point = max(report.budget.points, key=lambda p: p.top1)
            row["dvt_budget"] = {"q": point.q, "top1": point.top1, "mean_gmacs": point.expected_gmacs}
            row["dvt_curve"] = [{"q": p.q, "top1": p.top1, "mean_gmacs": p.expected_gmacs} for p in report.budget.points]
            row["dvt_anytime"] = {"gmacs": report.budget.cumulative_gmacs, "top1": report.budget.anytime_top1}

    print(f"\nFashion-MNIST, {images} training images (a tenth held out for validation) x {args.epochs} epochs, "
          f"2 Ray Train CPU workers, {args.settings} settings{', the demo sizes' if args.demo_sizes else ''}; "
          f"test top-1 on {rows[0]['test_images']:,} images")  # fmt: skip
    print(f"{'run':<36} {'params (M)':>10} {'MMACs':>8} {'val top-1 %':>11} {'test top-1 %':>12} {'train img/s':>11}")
    for r, (_, _, run) in zip(rows, labels):
        print(f"{run:<36} {r['params_m']:>10.3f} {r['gmacs'] * 1e3:>8.2f} {r['val_top1']:>11.2f} "
              f"{r['test_top1']:>12.2f} {r['images_per_s']:>11.0f}")
        if "dvt_budget" in r:
            b = r["dvt_budget"]
            print(f"{'':<36} early exit within 0.2 points of the last exit: q={b['q']:.2f}, top-1 {b['top1']:.2f}%, "
                  f"{b['mean_gmacs'] * 1e3:.2f} MMACs on average")
    summary = _seed_table(rows) if args.seeds > 1 or args.ablation else []
    dvt_rows = _dvt_table(rows) if args.ablation == "dvt" else []
    castling_rows = _castling_table(rows, tracking_uri) if args.seeds == 1 and not args.ablation else []
    print(f"total wall {time.perf_counter() - wall:.0f}s; runs in {tracking_uri}")
    if args.json:
        args.json.write_text(json.dumps(dict(train_images=args.train_images, epochs=args.epochs, rows=rows,
                                             castling=castling_rows, variants=summary, dvt=dvt_rows), indent=2))  # fmt: skip
    return rows


def _seed_table(rows: list[dict]) -> list[dict]:
    """Per model or variant: params, MACs, and test top-1 over its seeds (mean, min-max); printed as a table."""
    table = []
    for label in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == label]
        top1 = [r["test_top1"] for r in runs]
        table.append({"variant": label, "model": runs[0]["model"], "params_m": runs[0]["params_m"],
                      "gmacs": runs[0]["gmacs"], "seeds": len(runs), "test_top1": top1,
                      "mean": sum(top1) / len(top1), "min": min(top1), "max": max(top1)})  # fmt: skip
    print(f"\n{'variant':<32} {'params (M)':>10} {'MMACs':>7} {'seeds':>5} {'test top-1 % mean':>17} {'min-max':>13}")
    for t in table:
        print(f"{t['variant']:<32} {t['params_m']:>10.3f} {t['gmacs'] * 1e3:>7.2f} {t['seeds']:>5} {t['mean']:>17.2f} "
              f"{t['min']:>6.2f}-{t['max']:.2f}")
    return table


def _dvt_table(rows: list[dict]) -> list[dict]:
    """Each exit trained alone against the cascade of the same seed: the cheapest budget on the cascade's curve
    that reaches the exit's test top-1, and its mean MACs against the exit's; printed as a table."""
    cascades = {r["seed"]: r for r in rows if r["variant"] == "cascade"}
    table = []
    for r in rows:
        cascade = cascades.get(r["seed"])
        if r["variant"] == "cascade" or cascade is None:
            continue
        reaching = [p for p in cascade["dvt_curve"] if p["top1"] >= r["test_top1"]]
        point = min(reaching, key=lambda p: p["mean_gmacs"]) if reaching else None
        table.append({"exit": r["variant"], "seed": r["seed"], "exit_top1": r["test_top1"], "exit_gmacs": r["gmacs"],
                      "cascade_last_exit_top1": cascade["test_top1"],
                      "cascade_best_top1": max(p["top1"] for p in cascade["dvt_curve"]),
                      "cascade_point": point,
                      "macs_ratio": None if point is None else point["mean_gmacs"] / r["gmacs"]})  # fmt: skip
    if table:
        print("\nDVT: each exit alone against the cascade's budget curve (same seed); the cheapest budget at the "
              "exit's accuracy")  # fmt: skip
        print(f"{'exit alone':<18} {'seed':>4} {'MMACs':>7} {'top-1 %':>8} {'cascade: q':>10} {'top-1 %':>8} "
              f"{'mean MMACs':>10} {'MACs vs alone':>13}")  # fmt: skip
        for t in table:
            p = t["cascade_point"]
            tail = (f"{'not reached (best ' + format(t['cascade_best_top1'], '.2f') + ')':>41}" if p is None else
                    f"{p['q']:>10.2f} {p['top1']:>8.2f} {p['mean_gmacs'] * 1e3:>10.2f} {t['macs_ratio']:>12.2f}x")
            print(f"{t['exit']:<18} {t['seed']:>4} {t['exit_gmacs'] * 1e3:>7.2f} {t['exit_top1']:>8.2f} {tail}")
    return table


def _castling_table(rows: list[dict], tracking_uri: str) -> list[dict]:
    """The branch's fate for every Castling model trained, read back from its MLflow run; printed as a table."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    by_model = {r["model"]: r for r in rows}
    table = []
    for name, twin in CASTLING_TWINS.items():
        if name not in by_model:
            continue
        run_id = by_model[name]["run_id"]

        def history(key, run_id=run_id):
            return {m.step: m.value for m in client.get_metric_history(run_id, key)}

        training_form, deployed, density = history("val_train_form/top1"), history("val/top1"), \
            history("castling/mask_density_mean")  # fmt: skip
        last = max(training_form) if training_form else None
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        table.append({
            "model": name, "twin": twin, "test_top1": by_model[name]["test_top1"],
            "twin_test_top1": by_model[twin]["test_top1"] if twin in by_model else None,
            "train_form_epoch": last, "train_form_val_top1": None if last is None else training_form[last],
            "deployed_val_top1_then": None if last is None else deployed[last],
            "mask_density_by_epoch": [density[e] for e in sorted(density)],
            "density_plot_logged": "castling_mask_density.png" in artifacts,
        })  # fmt: skip
    if table:
        print("\nCastling: the deployed (inference) form against the training form and the softmax twin")
        print(f"{'model':<20} {'test %':>7} {'twin':<14} {'twin %':>7} {'vs twin':>8} {'train-form val % (epoch)':>25} "
              f"{'deployed val %':>15} {'mask density by epoch'}")  # fmt: skip
        for t in table:
            twin_top1 = t["twin_test_top1"]
            gap = "" if twin_top1 is None else f"{t['test_top1'] - twin_top1:+.2f}"
            then = "" if t["train_form_epoch"] is None else f"{t['train_form_val_top1']:.2f} ({t['train_form_epoch']})"
            deployed = "" if t["deployed_val_top1_then"] is None else f"{t['deployed_val_top1_then']:.2f}"
            densities = " ".join(f"{d:.3f}" for d in t["mask_density_by_epoch"])
            print(f"{t['model']:<20} {t['test_top1']:>7.2f} {t['twin']:<14} "
                  f"{'' if twin_top1 is None else f'{twin_top1:.2f}':>7} {gap:>8} {then:>25} {deployed:>15} {densities}")
    return table


if __name__ == "__main__":
    main()
