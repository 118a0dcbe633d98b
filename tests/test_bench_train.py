"""benchmarks/bench_train's GPU mode on a machine without a GPU: the smoke run's tables and JSON, the
generated JPEG shards, and the no-CUDA exit.

The smoke run is the GPU mode's own code path on the CPU, shrunk (32x32 JPEGs, vit_lsla_nano, 2 gloo
workers, no compile): the shards, the loader alone in both forms, a torchrun and a Ray Train run of
configs/vit_lsla_tiny.yaml tracked in a real MLflow store, and the figures read back from it. Its figures
mean nothing; what is checked is that every one is there, measured and sane.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import bench_train
from pipeline.data import build_loader, read_manifest

REPO = Path(__file__).resolve().parents[1]


def test_generated_jpeg_shards_are_jpegs_of_the_asked_size_and_learnable_classes(tmp_path):
    facts = bench_train.build_jpeg_shards(tmp_path / "data", 1100, 48, processes=2)
    manifest = read_manifest(tmp_path / "data" / "train")
    assert manifest.image.formats == {"jpg": manifest.num_samples} and manifest.num_samples == 1045  # 5% is val
    assert manifest.image.width.max == manifest.image.width.min == 48 and manifest.image_mode == "RGB"
    assert manifest.num_classes == 10 and 1 < facts["kb_per_image"] < 20
    images, labels = next(iter(build_loader(manifest, batch_size=1045, train=False, num_workers=0)))
    # The class is the grating's angle: images of one class are nearer each other than images of two classes.
    flat = images.flatten(1) - images.flatten(1).mean(1, keepdim=True)
    flat = flat / flat.norm(dim=1, keepdim=True)
    same = labels[:, None] == labels[None, :]
    similarity = (flat @ flat.T).abs()
    assert similarity[same & ~torch.eye(1045, dtype=torch.bool)].mean() > similarity[~same].mean() + 0.05


@pytest.mark.timeout(420)
def test_gpu_mode_smoke_run_measures_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_train", "--gpu", "--smoke", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=400)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and result["workers"] == 2 and result["model"] == "vit_lsla_nano"
    forms = result["loader"]["forms"]
    assert set(forms) == {"uint8 (the loop's)", "float32, normalised in the workers"}
    for figures in forms.values():
        assert figures["images_per_s"] > 0 and 0 < figures["cpu_ms_per_image"] < 1000
    assert result["loader"]["steps_per_epoch"] == 608 // (2 * 32)
    assert set(result["launchers"]) == {"torchrun DDP", "Ray Train"}
    for launcher, row in result["launchers"].items():
        assert row["windows"] >= 1, launcher  # the last epoch's logging windows came back from MLflow
        assert 0 < row["step_ms"] and 0 <= row["data_wait_ms"] < row["step_ms"], launcher
        assert 0 <= row["data_wait_share"] < 1 and row["images_per_s_per_gpu"] > 0, launcher
        assert row["gpu_utilisation"] is None and row["peak_memory_gib"] is None and row["mfu"] is None  # a CPU
    assert math.isfinite(result["overhead"]) and result["cpus_per_gpu_needed"] > 0
    assert "| Ray Train |" in done.stdout and "loader CPUs per GPU" in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the GPU mode would run")
def test_gpu_mode_without_cuda_says_so_and_exits_0(capsys):
    bench_train.main(["--gpu"])
    assert "no CUDA device here" in capsys.readouterr().out
