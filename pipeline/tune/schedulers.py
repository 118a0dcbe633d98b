"""ASHA that survives ``Tuner.restore``.

Tune saves the searcher's state with the experiment but not the scheduler's: a restored sweep starts its
ASHA with empty rungs, so a poor trial that resumes after an interruption has no recorded trial to lose
against and runs to the end. :class:`ResumableASHA` refills its rungs from the results saved in the
experiment directory the first time Tune hands it a trial, which on a restore happens before any trial
runs again. On a new sweep there is nothing saved yet and nothing to replay.

It also never stops a trial at its last epoch. Ray's ASHA has a rung at ``max_t`` whenever ``max_t`` is
``grace_period * reduction_factor**k`` (one epoch with a grace period of one, three with a factor of 3),
and ``stop_last_trials=False`` does not spare a trial that lands on it: stopped there, the trial has
nothing left to save and loses the end of its run (the test metrics, its final model).

Imported only when a sweep runs (it imports Ray).
"""

from __future__ import annotations

import math

from ray.tune import ExperimentAnalysis, Tuner
from ray.tune.schedulers import ASHAScheduler, TrialScheduler

__all__ = ["ResumableASHA"]


class ResumableASHA(ASHAScheduler):
    def __init__(self, experiment_path: str, **kwargs):
        super().__init__(**kwargs)
        self.experiment_path = experiment_path
        self.replayed = False

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self.replayed:
            self.replayed = True
            self.replay(tune_controller)
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)  # records the result in its rung
        if action == TrialScheduler.STOP and result.get(self._time_attr, 0) >= self._max_t:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action

    def replay(self, tune_controller=None) -> int:
        """Record the saved results of the experiment in the rungs; returns how many trials were replayed."""
        if not Tuner.can_restore(self.experiment_path):
            return 0
        try:
            analysis = ExperimentAnalysis(self.experiment_path)
        except ValueError:  # a new sweep: Tune has written its settings but no experiment state yet
            return 0
        frames = analysis.trial_dataframes
        replayed = 0
        for trial in analysis.trials:
            frame = frames.get(trial.trial_id)
            if frame is None or self._time_attr not in frame or self._metric not in frame:
                continue
            super().on_trial_add(tune_controller, trial)
            for _, row in frame.sort_values(self._time_attr).iterrows():
                value = row[self._metric]
                if isinstance(value, (int, float)) and math.isfinite(value):
                    # Only the rungs are updated; the decisions it returns were taken when the results came.
                    self.on_trial_result(tune_controller, trial, {self._time_attr: row[self._time_attr],
                                                                  self._metric: float(value)})  # fmt: skip
            self.on_trial_remove(tune_controller, trial)
            replayed += 1
        self._num_stopped = 0  # the count of this session's decisions
        return replayed
