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

RAY_NUM_CPUS = 4  # logical: 2 training workers + headroom for the controller and a Tune trial on 2 cores


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance for the whole test session (no dashboard, pinned logical CPUs)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_NUM_CPUS, include_dashboard=False, log_to_driver=True)
    yield ray
    ray.shutdown()
