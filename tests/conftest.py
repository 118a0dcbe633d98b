"""Shared test fixtures. The one local Ray instance of the whole session lives here.

Tests that need Ray take the ``ray_local`` fixture and carry ``@pytest.mark.ray``; they share one
``ray.init`` (about 5 s on 2 cores) instead of paying it each. Telemetry of Ray and MLflow is off.
"""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# Ray Train V2 is the default since Ray 2.51; say so, in case a user's environment turned it off.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray runs its workers at nice 15; on a machine shared with other busy processes that starves the test's
# training workers (the run takes several times longer). Same priority as the test process itself.
os.environ.setdefault("RAY_worker_niceness", "0")

RAY_NUM_CPUS = 4  # logical: 2 training workers + headroom for the controller and a Tune trial on 2 cores


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance for the whole test session (no dashboard, pinned logical CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_NUM_CPUS, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()


def _real_cluster(nodes: int):
    from tests.ray_cluster import RayCluster

    cluster = RayCluster(num_cpus=3, resources={"vp_slot": 1})
    try:
        cluster.wait_ready()
        cluster.ensure_nodes(nodes)
        yield cluster
    finally:  # also when a test (or the start) fails
        cluster.stop()


# Real `ray start` clusters (tests/ray_cluster.py), apart from ``ray_local``: a token-authenticated head and,
# for ``ray_cluster``, one more node; 3 logical CPUs and one ``vp_slot`` each. Module-scoped: an idle
# cluster's daemons take a share of 2 cores from every later test. Tests that kill a node call
# ``ray_cluster.ensure_nodes(2)`` first.
@pytest.fixture(scope="module")
def ray_head():
    yield from _real_cluster(1)


@pytest.fixture(scope="module")
def ray_cluster():
    yield from _real_cluster(2)


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """scikit-learn's digits at 16x16 in deliberately uneven shards (train/val/test split directories)."""
    from tests.datasets import UNEVEN_SHARDS, make_digits_shards

    return make_digits_shards(tmp_path_factory.mktemp("digits"), samples_per_shard=UNEVEN_SHARDS, image_size=16)


def tiny_train_dict(digits, tmp_path, **overrides) -> dict:
    """A config dict for a seconds-long CPU run on the digits: configs/tiny_cpu.yaml with a 2-block ViT.

    ``overrides`` use dotted keys with ``__`` for dots: ``optim__epochs=3``.
    """
    from pathlib import Path

    from pipeline.train.config import apply_overrides, read_yaml

    base = read_yaml((Path(__file__).parents[1] / "configs" / "tiny_cpu.yaml").read_text())
    settings = {
        "data.train": str(digits / "train"), "data.val": str(digits / "val"), "data.test": None,
        "data.img_size": 16, "data.batch_size": 32, "data.loader_workers": 0, "data.crop_scale": [0.7, 1.0],
        "data.hflip": 0.0, "data.color_jitter": 0.0,
        "model.name": "vit_msa_nano", "model.kwargs": {"depth": 2, "embed_dim": 64, "num_heads": 4},
        "optim.epochs": 2, "optim.lr": 3.0e-3, "optim.warmup_epochs": 0, "optim.label_smoothing": 0.0,
        "scaling.timeout_s": 60, "storage_path": str(tmp_path / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "mlflow.system_metrics_interval_s": 1.0,
        "log_every": 10,
    }  # fmt: skip
    settings.update({key.replace("__", "."): value for key, value in overrides.items()})
    return apply_overrides(base, settings)


@pytest.fixture
def tiny_config(digits_shards, tmp_path):
    """``tiny_config(**overrides) -> TrainConfig``, resolved against the digits shards (see tiny_train_dict)."""
    from pipeline.train.config import TrainConfig, resolve_config

    def make(**overrides):
        return resolve_config(TrainConfig.from_dict(tiny_train_dict(digits_shards, tmp_path, **overrides)))

    return make
