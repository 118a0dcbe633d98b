"""Hyper-parameter search on Ray Tune: YAML search spaces (``space``) and sweeps of Ray Train trials (``sweep``).

Importing this package does not import Ray; ``run_sweep`` does when it runs.
"""

from .space import SearchSpace, SpaceError, check_space, load_space
from .sweep import SweepError, SweepResult, run_sweep

__all__ = ["SearchSpace", "SpaceError", "SweepError", "SweepResult", "check_space", "load_space", "run_sweep"]
