"""Ray Train's overhead on the training loop: the same loop, data and model under Ray Train (2 workers) and
under plain ``torchrun`` DDP (2 processes), in one run.

    python -m benchmarks.bench_train                 # 8k Fashion-MNIST images, 2 epochs per launcher and round
    python -m benchmarks.bench_train --rounds 2 --images 16384 --model vit_msa_nano --depth 6

Both sides run ``pipeline.train.loop.train_loop_per_worker`` on the same config: the same shards, model,
batch size, gloo process group and DDP. Under Ray Train it runs in two Ray actors started by
``TorchTrainer`` (checkpoints reported to Ray's storage every epoch). Under torchrun it runs through Ray
Train's local mode, which joins torchrun's process group and runs the loop in each torchrun process
with no Ray runtime at all, so the only difference is who launches and coordinates the processes.

Measured: the *steady-state step time*, the median over the last epoch of the per-window mean step time
(rank 0, windows of ``--log-every`` optimizer steps, each closed by the loop's cross-rank loss sum); the
CPU time rank 0's process spends per step (Ray's threads in the worker included), which load from other
processes distorts far less than wall time; and end-to-end wall time, which includes Ray's start-up.
Launchers alternate for ``--rounds`` rounds, so load from other processes hits both alike; the table
keeps each launcher's best round. Target: Ray Train's steady step time at most 10% above torchrun's.
MLflow is off on both sides (no run id).

Priority: Ray starts its worker processes at nice 15 (``RAY_worker_niceness``), torchrun's processes run at
the caller's niceness. On a machine shared with other busy processes that alone costs the Ray workers a
large share of the CPU (measured here: +35% step time at equal CPU per step), so the benchmark starts Ray
with ``RAY_worker_niceness=0`` and compares like with like; ``--ray-niceness 15`` shows Ray's default.
Ray's local instance is started as ``vitpipe train`` starts it (with the dashboard, whose state API Ray
Train's placement-group cleaner polls every second).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def build_data(root: Path, images: int) -> str:
    """Fashion-MNIST's first ``images`` training images (or scikit-learn's digits) as shards under ``root``."""
    from pipeline.data.shards import write_dataset
    from pipeline.data.sources import ArraySource, idx_source

    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        source = idx_source(FASHION_MNIST)
        x, y = source.splits["train"]
        name, classes = "Fashion-MNIST", source.classes
    else:
        sys.path.insert(0, str(REPO))
        from tests.datasets import digits_arrays

        x, y = digits_arrays(32)
        name, classes = "sklearn digits 32x32", [str(i) for i in range(10)]
    reps = -(-images // len(x))
    x, y = np.concatenate([x] * reps)[:images], np.concatenate([y] * reps)[:images]
    split = images * 9 // 10
    source = ArraySource({"train": (x[:split], y[:split]), "test": (x[split:], y[split:])}, classes, name=name)
    write_dataset(source, root, samples_per_shard=2000, val_fraction=0.1, progress=False)
    return name


def make_config(args: argparse.Namespace, data: Path, storage: Path, workers: int) -> dict:
    from pipeline.train.config import TrainConfig, apply_overrides, read_yaml, resolve_config

    base = read_yaml((REPO / "configs" / "tiny_cpu.yaml").read_text())
    config = apply_overrides(base, {
        "run_name": f"bench-{workers}", "storage_path": str(storage),
        "data.train": str(data / "train"), "data.val": str(data / "val"), "data.test": None,
        "data.batch_size": args.batch_size, "data.loader_workers": 0,
        "model.name": args.model, "model.kwargs": {"depth": args.depth},
        "optim.epochs": args.epochs, "optim.warmup_epochs": 0, "scaling.num_workers": workers,
        "scaling.timeout_s": 300, "mlflow.tracking_uri": "sqlite:///unused.db", "log_every": args.log_every,
    })  # fmt: skip
    return resolve_config(TrainConfig.from_dict(config)).to_dict()


def run_ray(config: dict) -> dict:
    """The loop in 2 Ray Train workers; Ray is started once by main()."""
    from pipeline.train.config import TrainConfig
    from pipeline.train.launcher import build_trainer

    start = time.perf_counter()
    result = build_trainer(TrainConfig.from_dict(config), mlflow_run_id=None).fit()
    return {**result.metrics, "wall_s": time.perf_counter() - start}


def run_torchrun(config: dict, workers: int) -> dict:
    """The loop in ``workers`` torchrun processes (this file's --worker mode)."""
    with tempfile.TemporaryDirectory() as tmp:
        config_path, out_path = Path(tmp, "config.json"), Path(tmp, "metrics.json")
        config_path.write_text(json.dumps(config))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
                   "-m", "benchmarks.bench_train", "--worker", str(config_path), str(out_path)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as Ray gives a 1-CPU worker (and torchrun's default)
        start = time.perf_counter()
        subprocess.run(command, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        return {**json.loads(out_path.read_text()), "wall_s": wall}


def torchrun_worker(config_path: str, out_path: str) -> None:
    """Inside torchrun: Ray Train's local mode (num_workers=0) joins torchrun's gloo process group."""
    from pipeline.train.config import TrainConfig, apply_overrides
    from pipeline.train.launcher import build_trainer

    config = TrainConfig.from_dict(apply_overrides(json.loads(Path(config_path).read_text()),
                                                   {"scaling.num_workers": 0}))  # fmt: skip
    result = build_trainer(config, mlflow_run_id=None).fit()
    if int(os.environ["RANK"]) == 0:
        Path(out_path).write_text(json.dumps(result.metrics))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--model", default="vit_msa_nano")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64, help="per worker")
    parser.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ray-niceness", type=int, default=0, help="Ray's worker niceness (Ray's default: 15)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        torchrun_worker(*args.worker)
        return

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_worker_niceness"] = str(args.ray_niceness)  # read by the raylet ray.init starts
    import ray
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        name = build_data(root / "data", args.images)
        config = make_config(args, root / "data", root / "runs", args.workers)
        train_images = config["data"]["batch_size"] * args.workers
        ray_start = time.perf_counter()
        ray.init(num_cpus=max(os.cpu_count() or 1, args.workers), log_to_driver=False)
        ray_init_s = time.perf_counter() - ray_start
        results: dict[str, list[dict]] = {"torchrun DDP": [], "Ray Train": []}
        for round_ in range(args.rounds):
            for launcher in results:
                storage = root / "runs" / f"{launcher.split()[0]}-{round_}"
                config["storage_path"] = str(storage)
                metrics = run_torchrun(config, args.workers) if launcher == "torchrun DDP" else run_ray(config)
                results[launcher].append(metrics)
                print(f"round {round_ + 1} {launcher:13s} step {1000 * metrics['train/step_time_s']:.1f} ms  "
                      f"cpu/step {1000 * metrics['train/step_cpu_s']:.1f} ms  wall {metrics['wall_s']:.1f} s",
                      flush=True)  # fmt: skip
        ray.shutdown()

    print(f"\n{name}: {args.images} images, {args.model} depth {args.depth} at 32x32, batch {args.batch_size} "
          f"per worker, {args.workers} workers (gloo, 1 thread each), torch {torch.__version__}, "
          f"ray {ray.__version__}, Ray worker niceness {args.ray_niceness} (torchrun: {os.nice(0)}), "
          f"{os.cpu_count()} CPUs; best of {args.rounds} round(s)\n")  # fmt: skip
    print("| launcher | steady step time (ms, median) | CPU per step (ms) | images/s (steady) | last epoch (s) "
          "| wall, end to end (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    best = {k: min(v, key=lambda m: m["train/step_time_s"]) for k, v in results.items()}
    for launcher, m in best.items():
        step = m["train/step_time_s"]
        print(f"| {launcher} | {1000 * step:.1f} | {1000 * m['train/step_cpu_s']:.1f} | {train_images / step:.0f} "
              f"| {m['train/epoch_time_s']:.1f} | {m['wall_s']:.1f} |")  # fmt: skip
    ray_, torchrun = best["Ray Train"], best["torchrun DDP"]
    overhead = ray_["train/step_time_s"] / torchrun["train/step_time_s"] - 1
    cpu_overhead = ray_["train/step_cpu_s"] / torchrun["train/step_cpu_s"] - 1
    print(f"\nRay Train overhead, steady-state step time: {100 * overhead:+.1f}% (target <= +10%); CPU per step: "
          f"{100 * cpu_overhead:+.1f}%; Ray start-up (ray.init, once): {ray_init_s:.1f} s")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(dict(
            dataset=name, images=args.images, model=args.model, depth=args.depth, batch_size=args.batch_size,
            workers=args.workers, rounds=args.rounds, ray_niceness=args.ray_niceness, ray_init_s=ray_init_s,
            best={k: {"step_ms": 1000 * m["train/step_time_s"], "cpu_step_ms": 1000 * m["train/step_cpu_s"],
                      "images_per_s": train_images / m["train/step_time_s"], "wall_s": m["wall_s"]}
                  for k, m in best.items()},
            overhead=overhead, cpu_overhead=cpu_overhead, target_met=overhead <= 0.10), indent=2))


if __name__ == "__main__":
    main()
