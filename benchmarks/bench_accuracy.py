"""Accuracy of every small model on Fashion-MNIST at an equal training budget, trained by the pipeline itself.

    python -m benchmarks.bench_accuracy                         # 8k images x 2 epochs each, ~15 min on 2 cores
    python -m benchmarks.bench_accuracy --train-images 4000 --epochs 1 --models vit_lsla_nano hier_msa_nano

Each model is trained the way ``make demo`` trains it (``configs/tiny_cpu.yaml``: Ray Train, 2 gloo CPU
workers, AdamW + cosine, label smoothing 0.1, the same seeded shards, batches and number of steps), with the
demo's method terms (Castling's mask regularisation). Its best checkpoint (by validation top-1) is then
evaluated on all 10,000 test images by ``pipeline.eval.evaluate`` (Castling in inference form; a DVT
cascade by its last exit, and its budget curve). The table gives parameters and MACs (the project's
counter), validation and test top-1, and the pipeline's training images/s (2 workers, wall clock).

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


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=8_000, help="training images drawn from the 60k "
                        "(a tenth of them is held out for validation)")  # fmt: skip
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=[name for name, _, _ in MODELS],
                        choices=[name for name, _, _ in MODELS])  # fmt: skip
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
    models = [m for m in MODELS if m[0] in args.models]
    wall = time.perf_counter()
    ray.init(num_cpus=max(os.cpu_count() or 2, 3))  # as the demo starts it
    try:  # new=True: a benchmark measures a whole run, never a resumed one
        rows = train_models(REPO / "configs" / "tiny_cpu.yaml", data_dir, work, tracking_uri, profile, new=True,
                            models=models)  # fmt: skip
    finally:
        ray.shutdown()

    for row in rows:
        found = best_checkpoint(work / "runs" / f"demo-{row['model']}", "val/top1", "max")
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
    print(f"total wall {time.perf_counter() - wall:.0f}s; runs in {tracking_uri}")
    if args.json:
        args.json.write_text(json.dumps(dict(train_images=args.train_images, epochs=args.epochs, rows=rows), indent=2))
    return rows


if __name__ == "__main__":
    main()
