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

GPU mode (``--gpu``): does the pipeline keep a GPU busy?

    python -m benchmarks.bench_train --gpu           # one worker per GPU: vit_lsla_tiny on 224x224 JPEG shards
    python -m benchmarks.bench_train --gpu --smoke   # the same code path on the CPU, shrunk (the test suite runs it)

The run is configs/vit_lsla_tiny.yaml as a user runs it (bf16, torch.compile, RandAugment, mixup and
cutmix, random erasing, EMA, nccl DDP, MLflow tracking with system metrics), on shards of generated 224x224
JPEGs (10 classes of noisy coloured gratings, ~26 KB each, about what ImageNet photos resized to 224 weigh).
Three tables:

* *the loader alone*: rank 0's train loader with the recipe's transform and ``data.loader_workers`` workers,
  no model: images/s, and CPU time per image (main process and workers). Two forms side by side: the
  loop's (uint8 out of the workers, normalised and erased on the device) and the classic one (float,
  normalised in the workers).
* *training*: under Ray Train and under torchrun (same loop, same config), the last epoch's steady step time
  split into data wait and compute (medians over the logging windows, from the MLflow run), images/s per GPU,
  GPU and CPU utilisation (MLflow's system metrics over the same windows), peak memory, MFU. Targets: data
  wait <= 5% of the step; Ray Train's step at most 5% above torchrun's.
* *loader CPUs per GPU*: the CPUs a GPU's loader needs at the measured training speed (CPU time per image x
  images/s per GPU), against the CPUs the node has per GPU. Decoding is a small share of a 224x224 JPEG's
  loader cost (the crop, RandAugment and collation are the rest), so GPU decoding alone would not change it.

Without a CUDA device (and without ``--smoke``) it says so and exits 0.
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


def run_ray(config: dict, run_id: str | None = None) -> dict:
    """The loop in ``scaling.num_workers`` Ray Train workers; Ray is started once by the caller."""
    from pipeline.train.config import TrainConfig
    from pipeline.train.launcher import build_trainer

    start = time.perf_counter()
    result = build_trainer(TrainConfig.from_dict(config), mlflow_run_id=run_id).fit()
    return {**result.metrics, "wall_s": time.perf_counter() - start}


def run_torchrun(config: dict, workers: int, run_id: str | None = None, *, log: Path | None = None,
                 timeout_s: float | None = None) -> dict:  # fmt: skip
    """The loop in ``workers`` torchrun processes (this file's --worker mode); their output goes to ``log``
    as it comes when given, else only the end of it is shown, if they fail."""
    with tempfile.TemporaryDirectory() as tmp:
        config_path, out_path = Path(tmp, "config.json"), Path(tmp, "metrics.json")
        config_path.write_text(json.dumps({"config": config, "run_id": run_id}))
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={workers}",
                   "-m", "benchmarks.bench_train", "--worker", str(config_path), str(out_path)]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # as Ray gives a 1-CPU worker (and torchrun's default)
        output = log or Path(tmp, "torchrun.log")
        output.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with output.open("w") as sink:
            done = subprocess.run(command, cwd=REPO, env=env, stdout=sink, stderr=subprocess.STDOUT, timeout=timeout_s)
        wall = time.perf_counter() - start
        if done.returncode:
            raise RuntimeError(f"torchrun exited {done.returncode}; the end of its output ({output}):\n"
                               f"{output.read_text()[-4000:]}")  # fmt: skip
        return {**json.loads(out_path.read_text()), "wall_s": wall}


def torchrun_worker(config_path: str, out_path: str) -> None:
    """Inside torchrun: Ray Train's local mode (num_workers=0) joins torchrun's process group (nccl on GPUs)."""
    from pipeline.train.config import TrainConfig, apply_overrides
    from pipeline.train.launcher import build_trainer

    job = json.loads(Path(config_path).read_text())
    config = TrainConfig.from_dict(apply_overrides(job["config"], {"scaling.num_workers": 0}))
    result = build_trainer(config, mlflow_run_id=job["run_id"]).fit()
    if int(os.environ["RANK"]) == 0:
        Path(out_path).write_text(json.dumps(result.metrics))


# Per mode: the CPU comparison; the GPU mode; its CPU smoke run (seconds of work, the path exercised).
DEFAULTS = {
    "cpu": dict(images=8192, model="vit_msa_nano", batch_size=64, epochs=2, log_every=5, workers=2, rounds=2),
    "gpu": dict(images=16384, model="vit_lsla_tiny", img_size=224, batch_size=128, epochs=2, rounds=1),
    "smoke": dict(images=640, model="vit_lsla_nano", img_size=32, batch_size=32, epochs=2, log_every=2, workers=2,
                  rounds=1, loader_workers=1),
}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, help="default 8192 (GPU mode: 16384)")
    parser.add_argument("--model", help="default vit_msa_nano (GPU mode: vit_lsla_tiny)")
    parser.add_argument("--depth", type=int, default=4, help="CPU mode: the model's depth")
    parser.add_argument("--batch-size", type=int, help="per worker: default 64 (GPU mode: 128)")
    parser.add_argument("--epochs", type=int, help="the last one is measured (the first compiles): default 2")
    parser.add_argument("--log-every", type=int, help="optimizer steps per timing window: default 5 (GPU mode: "
                        "about 8 windows per epoch, at most 10 steps each)")  # fmt: skip
    parser.add_argument("--workers", type=int, help="default 2 (GPU mode: every GPU)")
    parser.add_argument("--rounds", type=int, help="default 2 (GPU mode: 1)")
    parser.add_argument("--ray-niceness", type=int, default=0, help="Ray's worker niceness (Ray's default: 15)")
    parser.add_argument("--json", type=Path, help="also write the results as JSON here")
    parser.add_argument("--gpu", action="store_true", help="GPU mode (see above)")
    parser.add_argument("--smoke", action="store_true", help="with --gpu: its code path on the CPU, shrunk")
    parser.add_argument("--loader-only", action="store_true", help="with --gpu: the shards and the loader alone, no "
                        "training (no GPU needed): what one loader CPU delivers on this machine")  # fmt: skip
    parser.add_argument("--loader-workers", type=int, help="GPU mode, per GPU: default the node's CPUs per GPU less one")
    parser.add_argument("--logs", type=Path, help="GPU mode: write torchrun's output here as it runs (a run that hangs "
                        "or is killed leaves what it printed)")  # fmt: skip
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        torchrun_worker(*args.worker)
        return
    if (args.smoke or args.loader_only) and not args.gpu:
        parser.error("--smoke and --loader-only are the GPU mode's: pass --gpu too")
    for key, value in DEFAULTS["smoke" if args.smoke else "gpu" if args.gpu else "cpu"].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.gpu:
        gpu_mode(args)
    else:
        cpu_mode(args)


def cpu_mode(args: argparse.Namespace) -> None:
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


# --------------------------------------------------------------------------------------------------
# GPU mode.


def synthetic_jpegs(chunk: int, count: int, size: int) -> tuple[list[bytes], list[int]]:
    """Chunk ``chunk`` of the generated images: ``count`` JPEGs (quality 90) of 10 classes, each a coloured
    grating at its class's angle over pixel noise; seeded by the chunk, so any process makes the same."""
    import io

    from PIL import Image

    rng = np.random.default_rng([0, chunk])
    labels = rng.integers(0, 10, count)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    noise = rng.normal(0, 16, (4, 2 * size, 2 * size, 3)).astype(np.float32)  # a pool, cropped at random
    encoded = []
    for label in labels:
        angle = (label + rng.uniform(-0.3, 0.3)) * np.pi / 10
        wave = np.sin(2 * np.pi * rng.uniform(3, 9) * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 7))
        top, left = rng.integers(0, size, 2)
        pixels = 128 + 100 * wave[..., None] * rng.uniform(0.2, 1.0, 3).astype(np.float32)
        pixels += noise[rng.integers(4), top:top + size, left:left + size]
        buffer = io.BytesIO()
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded, labels.tolist()


def build_jpeg_shards(root: Path, count: int, size: int, processes: int) -> dict:
    """Shards of ``count`` generated ``size``x``size`` JPEGs (5% carved out as val) under ``root``; the
    images are made in ``processes`` processes."""
    from concurrent.futures import ProcessPoolExecutor

    from pipeline.data.shards import write_dataset
    from pipeline.data.sources import Example, Source

    start = time.perf_counter()
    chunks = [min(512, count - first) for first in range(0, count, 512)]
    with ProcessPoolExecutor(max(1, processes)) as pool:
        parts = list(pool.map(synthetic_jpegs, range(len(chunks)), chunks, [size] * len(chunks)))
    encoded = [data for part, _ in parts for data in part]
    labels = [label for _, part in parts for label in part]

    class Generated(Source):
        name, format, classes = f"generated gratings {size}x{size}", "generated", tuple(f"grating_{c}" for c in range(10))

        def split_sizes(self) -> dict[str, int]:
            return {"train": count}

        def examples(self, split: str, rng: np.random.Generator):
            for i in rng.permutation(count):
                yield Example(int(i), encoded[i], "jpg", labels[i], "RGB", (size, size))

    write_dataset(Generated(), root, samples_per_shard=1000, val_fraction=0.05, progress=False)
    return {"images": count, "img_size": size, "kb_per_image": sum(map(len, encoded)) / count / 1024,
            "build_s": time.perf_counter() - start}  # fmt: skip


def gpu_config(args: argparse.Namespace, data: Path, storage: Path, *, workers: int, loader_workers: int,
               cpus_per_worker: float, tracking_uri: str) -> dict:  # fmt: skip
    """configs/vit_lsla_tiny.yaml on the generated shards, shortened to ``--epochs`` without warm-up."""
    from pipeline.train.config import TrainConfig, apply_overrides, read_yaml, resolve_config

    base = read_yaml((REPO / "configs" / "vit_lsla_tiny.yaml").read_text())
    overrides = {
        "run_name": "bench-train-gpu", "storage_path": str(storage),
        "data.train": str(data / "train"), "data.val": str(data / "val"), "data.test": None,
        "data.img_size": args.img_size, "data.batch_size": args.batch_size, "data.loader_workers": loader_workers,
        "model.name": args.model, "optim.epochs": args.epochs, "optim.warmup_epochs": 0,
        "scaling.num_workers": workers, "scaling.use_gpu": not args.smoke, "scaling.cpus_per_worker": cpus_per_worker,
        "scaling.timeout_s": 600, "scaling.resource_wait_s": 60, "checkpoint.every_steps": None, "max_failures": 0, "log_every": args.log_every,
        "mlflow.tracking_uri": tracking_uri, "mlflow.experiment": "bench-train-gpu",
        "mlflow.system_metrics_interval_s": 1.0, "mlflow.log_model": False,  # after the measured epoch: time only
    }  # fmt: skip
    if args.smoke:  # compiling takes minutes on a CPU; everything else is the GPU run's
        overrides["compile"] = False
    return resolve_config(TrainConfig.from_dict(apply_overrides(base, overrides))).to_dict()


def loader_alone(config_dict: dict, world_size: int, rounds: int) -> dict:
    """Rank 0's train loader with the recipe's transform, no model: the loop's uint8 form against the float
    form (normalised and erased in the workers). Best epoch of ``rounds`` per form, alternating (no warm-up:
    the shards were just written, so they are in the page cache)."""
    import torch

    from benchmarks.bench_data import run_epoch
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import Dist, _loader

    config = TrainConfig.from_dict(config_dict)
    cuda = torch.cuda.is_available() and config.scaling.use_gpu
    rank0 = Dist(0, world_size, torch.device("cuda" if cuda else "cpu"))
    forms = {
        "uint8 (the loop's)": lambda epoch: _at_epoch(_loader(config, rank0, "train", train=True), epoch),
        "float32, normalised in the workers": lambda epoch: _at_epoch(
            _loader(config, rank0, "train", train=True, on_device=False), epoch),
    }  # fmt: skip
    epochs: dict[str, list[tuple[float, float, int]]] = {form: [] for form in forms}
    for round_ in range(rounds):
        for form, make in forms.items():
            epochs[form].append(run_epoch(make(round_ + 1)))
    steps = len(forms["uint8 (the loop's)"](0))
    return {"steps_per_epoch": steps, "loader_workers": config.data.loader_workers, "pin_memory": cuda, "forms": {
        form: {"images_per_s": max(n / wall for wall, _, n in runs), "cpu_ms_per_image": 1000 * min(c / n for _, c, n in runs)}
        for form, runs in epochs.items()}}  # fmt: skip


def _at_epoch(loader, epoch: int):
    loader.set_epoch(epoch)
    return loader


def last_epoch_windows(tracking_uri: str, run_id: str, *, epochs: int, steps_per_epoch: int,
                       sample_interval_s: float) -> dict:  # fmt: skip
    """The last epoch's logging windows as the MLflow run holds them (rank 0's): medians of the step's data
    wait, compute, data-wait share and MFU; and the nodes' GPU and CPU utilisation, MLflow's system metrics
    sampled wholly inside the span of those windows (a sample covers the interval before its timestamp)."""
    import re

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    first_step = (epochs - 1) * steps_per_epoch

    def last_epoch(key: str) -> dict[int, tuple[int, float]]:
        return {m.step: (m.timestamp, m.value) for m in client.get_metric_history(run_id, key) if m.step > first_step}

    step_s, wait_s = last_epoch("train/step_time_s_step"), last_epoch("train/data_wait_s_step")
    compute_s, mfu = last_epoch("train/compute_s_step"), last_epoch("train/mfu_step")
    windows = sorted(set(step_s) & set(wait_s))

    def median(values: list[float]) -> float | None:
        return float(np.median(values)) if values else None

    figures: dict = {
        "windows": len(windows), "data_wait_share": median([wait_s[k][1] / step_s[k][1] for k in windows]),
        "data_wait_s": median([wait_s[k][1] for k in windows]), "compute_s": median([v for _, v in compute_s.values()]),
        "mfu": median([v for _, v in mfu.values()]),
    }  # fmt: skip
    stamps = sorted(t for t, _ in step_s.values())
    keys = list(client.get_run(run_id).data.metrics)
    for kind, pattern in (("gpu", r"system/.+/gpu_\d+_utilization_percentage"), ("cpu", r"system/.+/cpu_utilization_percentage")):
        samples = [m.value for key in keys if re.fullmatch(pattern, key) for m in client.get_metric_history(run_id, key)
                   if stamps and stamps[0] <= m.timestamp - 1000 * sample_interval_s and m.timestamp <= stamps[-1]]  # fmt: skip
        figures[f"{kind}_utilisation"] = float(np.mean(samples)) if samples else None
    return figures


def gpu_mode(args: argparse.Namespace) -> None:
    import torch

    if not (args.smoke or args.loader_only) and not torch.cuda.is_available():
        print("bench_train --gpu: no CUDA device here, nothing measured (--smoke runs its code path on the CPU)")
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_worker_niceness"] = str(args.ray_niceness)
    import ray

    from pipeline import tracking
    from pipeline.train.config import TrainConfig
    from pipeline.train.telemetry import peak_bf16_tflops

    cpus = len(os.sched_getaffinity(0))
    workers = args.workers or (torch.cuda.device_count() if torch.cuda.is_available() and not args.smoke else
                               2 if args.smoke else 1)  # fmt: skip
    cpus_per_gpu = max(1, cpus // workers)
    loader_workers = args.loader_workers or max(1, cpus_per_gpu - 1)  # one CPU for the training process
    if args.log_every is None:  # about 8 timing windows in the measured epoch, of at most 10 steps
        args.log_every = max(1, min(10, int(args.images * 0.95) // (workers * args.batch_size) // 8))
    device = ("CPU (smoke run: the figures mean nothing)" if args.smoke else
              torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_train_gpu_") as tmp:
        root = Path(tmp)
        shards = build_jpeg_shards(root / "data", args.images, args.img_size, processes=cpus)
        print(f"shards: {args.images} generated {args.img_size}x{args.img_size} JPEGs, {shards['kb_per_image']:.1f} KB "
              f"each, built in {shards['build_s']:.0f} s", flush=True)  # fmt: skip
        tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
        config = gpu_config(args, root / "data", root / "runs", workers=workers, loader_workers=loader_workers,
                            cpus_per_worker=cpus_per_gpu, tracking_uri=tracking_uri)  # fmt: skip
        loader = loader_alone(config, workers, rounds=2)
        for form, figures in loader["forms"].items():
            print(f"loader alone, {form}: {figures['images_per_s']:.0f} images/s, "
                  f"{figures['cpu_ms_per_image']:.2f} CPU ms/image", flush=True)  # fmt: skip
        if args.loader_only:
            _print_loader(loader, shards, args, workers, loader_workers, cpus)
            if args.json:
                args.json.write_text(json.dumps(dict(loader_only=True, cpus=cpus, shards=shards, loader=loader,
                                                     loader_workers=loader_workers), indent=2))  # fmt: skip
            return

        ray.init(num_cpus=cpus, log_to_driver=not args.smoke)  # on a GPU node its workers' lines are the log
        runs: dict[str, list[dict]] = {"torchrun DDP": [], "Ray Train": []}
        for round_ in range(args.rounds):
            for launcher in runs:
                config["storage_path"] = str(root / "runs" / f"{launcher.split()[0]}-{round_}")
                run_id, _ = tracking.open_run(tracking_uri, "bench-train-gpu", f"{launcher} {round_ + 1}",
                                              params={}, tags={})  # fmt: skip
                log = args.logs / f"torchrun-{round_ + 1}.log" if args.logs else None
                metrics = (run_torchrun(config, workers, run_id, log=log, timeout_s=900) if launcher == "torchrun DDP"
                           else run_ray(config, run_id))  # fmt: skip
                metrics["windows"] = last_epoch_windows(tracking_uri, run_id, epochs=args.epochs,
                                                        steps_per_epoch=loader["steps_per_epoch"],
                                                        sample_interval_s=config["mlflow"]["system_metrics_interval_s"])
                runs[launcher].append(metrics)
                print(f"round {round_ + 1} {launcher:13s} step {1000 * metrics['train/step_time_s']:.1f} ms, "
                      f"data wait {_percent(metrics['windows']['data_wait_share'])}, wall {metrics['wall_s']:.0f} s",
                      flush=True)  # fmt: skip
        ray.shutdown()

    best = {k: min(v, key=lambda m: m["train/step_time_s"]) for k, v in runs.items()}
    rows = {launcher: _gpu_row(m, args.batch_size) for launcher, m in best.items()}
    ray_row, torchrun_row = rows["Ray Train"], rows["torchrun DDP"]
    overhead = ray_row["step_ms"] / torchrun_row["step_ms"] - 1
    uint8 = loader["forms"]["uint8 (the loop's)"]
    # At the measured speed; a GPU the loader starves runs faster when fed: its speed over its busy share.
    cpus_needed = ray_row["images_per_s_per_gpu"] * uint8["cpu_ms_per_image"] / 1000
    busy = (ray_row["gpu_utilisation"] or 0) / 100
    full_speed = ray_row["images_per_s_per_gpu"] / busy if busy > 0 else None
    cpus_needed_full = None if full_speed is None else full_speed * uint8["cpu_ms_per_image"] / 1000
    peak = peak_bf16_tflops(device)
    precision = TrainConfig.from_dict(config).effective_precision

    print(f"\n{device}: {workers} worker(s), {args.model} at {args.img_size}x{args.img_size}, batch {args.batch_size} "
          f"per GPU, {precision}, compile {config['compile']}, loader workers per GPU: {loader_workers}, "
          f"{cpus} CPUs; torch {torch.__version__} (CUDA {torch.version.cuda}), ray {ray.__version__}; "
          f"last of {args.epochs} epochs, best of {args.rounds} round(s)\n")  # fmt: skip
    _print_loader(loader, shards, args, workers, loader_workers, cpus)
    print("\n| launcher | step (ms) | data wait (ms) | data wait share, steady | compute (ms) | images/s per GPU | "
          "GPU util (%) | CPU util (%) | peak memory (GiB) | MFU |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for launcher, r in rows.items():
        print(f"| {launcher} | {r['step_ms']:.1f} | {r['data_wait_ms']:.1f} | {_percent(r['data_wait_share'])} | "
              f"{r['compute_ms']:.1f} | {r['images_per_s_per_gpu']:.0f} | {_number(r['gpu_utilisation'])} | "
              f"{_number(r['cpu_utilisation'])} | {_number(r['peak_memory_gib'], '.1f')} | {_percent(r['mfu'])} |")
    print(f"\nRay Train overhead, steady step time: {100 * overhead:+.1f}% (target <= +5%)")
    share = ray_row["data_wait_share"]
    print(f"data wait, Ray Train, steady: {_percent(share)} of the step (target <= 5%)")
    print(f"loader CPUs per GPU at {ray_row['images_per_s_per_gpu']:.0f} images/s: {cpus_needed:.1f} (this node has "
          f"{cpus_per_gpu} per GPU; {loader_workers} loader workers)")  # fmt: skip
    if full_speed is not None:
        print(f"at the GPU's full speed (images/s over its {100 * busy:.0f}% busy share: {full_speed:.0f} images/s): "
              f"{cpus_needed_full:.1f} loader CPUs per GPU")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(dict(
            device=device, smoke=args.smoke, workers=workers, model=args.model, img_size=args.img_size,
            batch_size=args.batch_size, epochs=args.epochs, rounds=args.rounds, cpus=cpus, loader_workers=loader_workers,
            torch=torch.__version__, cuda=torch.version.cuda, ray=ray.__version__, peak_bf16_tflops=peak,
            precision=precision, compile=config["compile"], shards=shards, loader=loader, launchers=rows,
            overhead=overhead, cpus_per_gpu_needed=cpus_needed, cpus_per_gpu_needed_at_full_speed=cpus_needed_full,
            cpus_per_gpu=cpus_per_gpu,
            targets_met={"ray_overhead_le_5pct": overhead <= 0.05,
                         "data_wait_le_5pct": share is not None and share <= 0.05}), indent=2))  # fmt: skip


def _print_loader(loader: dict, shards: dict, args: argparse.Namespace, workers: int, loader_workers: int, cpus: int) -> None:
    print(f"\nthe loader alone: rank 0 of {workers}, {loader_workers} loader workers, batch {args.batch_size}, "
          f"{shards['kb_per_image']:.1f} KB JPEGs at {args.img_size}x{args.img_size}, configs/vit_lsla_tiny.yaml's "
          f"train transform, {cpus} CPUs, best of 2 epochs\n")  # fmt: skip
    print("| form | images/s | CPU ms per image (main process + workers) | images/s per loader CPU |\n|---|---:|---:|---:|")
    for form, figures in loader["forms"].items():
        print(f"| {form} | {figures['images_per_s']:.0f} | {figures['cpu_ms_per_image']:.2f} | "
              f"{1000 / figures['cpu_ms_per_image']:.0f} |")  # fmt: skip


def _gpu_row(metrics: dict, batch_size: int) -> dict:
    """One launcher's figures: the steady ones (medians over the last epoch's windows) where the MLflow run
    has them, else the epoch's (which include the loader's start)."""
    w, step = metrics["windows"], metrics["train/step_time_s"]
    wait = w["data_wait_s"] if w["data_wait_s"] is not None else metrics["train/data_wait_s"]
    compute = w["compute_s"] if w["compute_s"] is not None else metrics["train/compute_s"]
    return {
        "step_ms": 1000 * step, "data_wait_ms": 1000 * wait, "compute_ms": 1000 * compute,
        "data_wait_share": w["data_wait_share"], "data_wait_share_epoch": metrics["train/data_wait_share"],
        "images_per_s_per_gpu": batch_size / step, "gpu_utilisation": w["gpu_utilisation"],
        "cpu_utilisation": w["cpu_utilisation"], "peak_memory_gib": metrics.get("train/peak_memory_gib"),
        "mfu": w["mfu"] if w["mfu"] is not None else metrics.get("train/mfu"),
        "tflops_per_gpu": metrics.get("train/tflops_per_worker"), "windows": w["windows"], "wall_s": metrics["wall_s"],
    }  # fmt: skip


def _percent(share: float | None) -> str:
    return "n/a" if share is None else f"{100 * share:.1f}%"


def _number(value: float | None, spec: str = ".0f") -> str:
    return "n/a" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
