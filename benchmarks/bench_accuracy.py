"""Accuracy of every small model on Fashion-MNIST at an equal training budget, trained by the pipeline itself.

    python -m benchmarks.bench_accuracy                         # 8k images x 2 epochs each, ~15 min on 2 cores
    python -m benchmarks.bench_accuracy --train-images 4000 --epochs 1 --models vit_lsla_nano hier_msa_nano
    python -m benchmarks.bench_accuracy --castling --train-images 3000  # Castling models and their softmax twins
    python -m benchmarks.bench_accuracy --ablation lsla --train-images 12000 --epochs 1 --seeds 2

Each model is trained the way ``make demo`` trains it (``configs/tiny_cpu.yaml``: Ray Train, 2 gloo CPU
workers, AdamW + cosine, label smoothing 0.1, the same seeded shards, batches and number of steps), with the
demo's method terms (Castling's mask regularisation). Its best checkpoint (by validation top-1) is then
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

Runs land in a local MLflow store under ``--work-dir`` (browse them with ``mlflow ui``). Needs the Debian
package dataset-fashion-mnist.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from pipeline.demo import MODELS, Profile, build_demo_shards, train_models

REPO = Path(__file__).resolve().parent.parent
# each Castling model with its softmax twin (same backbone and size)
CASTLING_TWINS = {"castling_vit_nano": "vit_msa_nano", "castling_swin_nano": "hier_msa_nano",
                  "dvt_castling_nano": "dvt_vit_nano"}  # fmt: skip


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


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=8_000, help="training images drawn from the 60k "
                        "(a tenth of them is held out for validation)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=None, choices=sorted({name for name, _, _ in MODELS} |
                        set(CASTLING_TWINS) | set(CASTLING_TWINS.values())))  # fmt: skip
    parser.add_argument("--castling", action="store_true", help="the Castling models and their twins (see above)")
    parser.add_argument("--ablation", choices=["lsla"], help="the LSLA paper's ablation on vit_lsla_nano (see above)")
    parser.add_argument("--variants", nargs="+", choices=sorted(LSLA_ABLATION), help="with --ablation: only these")
    parser.add_argument("--seeds", type=int, default=1, help="runs of every model or variant, optim.seed 0..N-1")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/vitpipe-bench-accuracy"))
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    import ray

    from pipeline.eval.evaluate import evaluate_model
    from pipeline.registry import best_checkpoint

    profile = Profile(train_images=args.train_images, test_images=None, epochs=args.epochs, sweep_trials=0,
                      sweep_epochs=0)  # fmt: skip
    work = args.work_dir.resolve() / f"{args.train_images}x{args.epochs}"
    work.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{work / 'mlflow.db'}"
    data_dir = build_demo_shards(work / "shards", profile)
    names = args.models or ([n for pair in CASTLING_TWINS.items() for n in pair] if args.castling
                            else [name for name, _, _ in MODELS])  # fmt: skip
    variants = {name: (name, {}) for name in names}
    if args.ablation:
        variants = {v: LSLA_ABLATION[v] for v in (args.variants or LSLA_ABLATION)}
    labels, models = [], []
    for label, (name, kwargs) in variants.items():
        for seed in range(args.seeds):
            run = label if args.seeds == 1 else f"{label}-seed{seed}"
            labels.append((label, seed, run))
            models.append((name, kwargs, {"run_name": f"demo-{run}", "optim.seed": seed}))
    wall = time.perf_counter()
    ray.init(num_cpus=max(os.cpu_count() or 2, 3))  # as the demo starts it
    try:  # new=True: a benchmark measures a whole run, never a resumed one
        rows = train_models(REPO / "configs" / "tiny_cpu.yaml", data_dir, work, tracking_uri, profile, new=True,
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
        if report.budget is not None:  # DVT: the cheapest budget within 0.2 points of the last exit
            try:
                point = report.budget.cheapest_reaching(row["test_top1"] - 0.2)
            except ValueError:  # the sweep's dearest point can fall short of the last exit on a small split
                point = max(report.budget.points, key=lambda p: p.top1)
            row["dvt_budget"] = {"q": point.q, "top1": point.top1, "mean_gmacs": point.expected_gmacs}

    print(f"\nFashion-MNIST, {args.train_images:,} training images (a tenth held out for validation) x {args.epochs} "
          f"epochs, 2 Ray Train CPU workers, configs/tiny_cpu.yaml; test top-1 on {rows[0]['test_images']:,} images")
    print(f"{'model':<20} {'params (M)':>10} {'MMACs':>8} {'val top-1 %':>11} {'test top-1 %':>12} {'train img/s':>11}")
    for r in rows:
        print(f"{r['model']:<20} {r['params_m']:>10.3f} {r['gmacs'] * 1e3:>8.2f} {r['val_top1']:>11.2f} "
              f"{r['test_top1']:>12.2f} {r['images_per_s']:>11.0f}")
        if "dvt_budget" in r:
            b = r["dvt_budget"]
            print(f"{'':<20} early exit within 0.2 points of the last exit: q={b['q']:.2f}, top-1 {b['top1']:.2f}%, "
                  f"{b['mean_gmacs'] * 1e3:.2f} MMACs on average")
    summary = _seed_table(rows) if args.seeds > 1 or args.ablation else []
    castling_rows = _castling_table(rows, tracking_uri) if args.seeds == 1 else []
    print(f"total wall {time.perf_counter() - wall:.0f}s; runs in {tracking_uri}")
    if args.json:
        args.json.write_text(json.dumps(dict(train_images=args.train_images, epochs=args.epochs, rows=rows,
                                             castling=castling_rows, variants=summary), indent=2))  # fmt: skip
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
