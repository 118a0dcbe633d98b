"""Budgeted inference for DVT cascades: calibrate exit thresholds on a held-out split, sweep the budget knob.

For a budget knob ``q`` the share of samples meant to answer at exit ``k`` (1-based) is
``pi_k = q^k / sum_j q^j``: small ``q`` sends most samples out early, large ``q`` most to the last exit.
Thresholds (``find_thresholds``) follow the official code: walk exits in order; at exit ``k`` pick
``eta_k`` so that ``floor(n * pi_k)`` of the samples not yet out have confidence (top softmax
probability) at least ``eta_k``; the last threshold is minus infinity. Expected cost is
``sum_k share_k * F_k`` with ``F_k`` the cumulative cost of exits ``1..k`` (``model.exit_macs()``, the
project's counter). Sweeping ``q`` traces accuracy against expected GMACs.

Calibration uses a held-out split (the official code reused training images; we don't), and the curve is
measured on a second split when one is given. ``calibrate_and_sweep`` is the one call a training loop
needs: it returns a ``BudgetReport`` with ``to_json`` / ``plot`` / ``save_beside(checkpoint)``.
Nothing here knows about Ray or MLflow.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = [
    "DEFAULT_QS", "ExitOutputs", "SweepPoint", "BudgetReport", "exit_shares", "find_thresholds",
    "assign_exits", "collect_exit_outputs", "sweep", "calibrate_and_sweep",
]

# q = 0.05, 0.10, ..., 2.95: the official inference script's grid
DEFAULT_QS: tuple[float, ...] = tuple(round(p / 20, 2) for p in range(1, 60))


def exit_shares(q: float, num_exits: int) -> Tensor:
    """``pi_k = q^k / sum_j q^j`` for ``k = 1..num_exits`` (float64)."""
    if not q > 0 or not math.isfinite(q):
        raise ValueError(f"the budget knob q must be a positive finite number, got {q}")
    k = torch.arange(1, num_exits + 1, dtype=torch.float64)
    log_w = k * math.log(q)
    return torch.softmax(log_w, dim=0)  # = q^k / sum q^j, without overflow for large q or many exits


def find_thresholds(confidence: Tensor, shares: Tensor | Sequence[float]) -> Tensor:
    """Thresholds (K,) from confidences (K, n): at exit ``k``, ``floor(n * shares[k])`` of the samples still
    undecided reach the threshold; the last threshold is ``-inf``.

    An exit meant to take nobody gets ``+inf``. If ties (or rounding) leave fewer undecided samples than an
    exit's quota, the threshold takes all of them (the official code would take none there) [ours].
    """
    num_exits, n = confidence.shape
    shares = torch.as_tensor(shares, dtype=torch.float64)
    if shares.shape != (num_exits,):
        raise ValueError(f"need {num_exits} shares, got {tuple(shares.shape)}")
    thresholds = torch.full((num_exits,), float("inf"), dtype=torch.float64)
    undecided = torch.ones(n, dtype=torch.bool, device=confidence.device)
    for k in range(num_exits - 1):
        quota = math.floor(n * float(shares[k]))
        candidates = confidence[k][undecided]
        if quota > 0 and candidates.numel() > 0:
            ordered = candidates.sort(descending=True).values
            thresholds[k] = float(ordered[min(quota, ordered.numel()) - 1])
            undecided &= confidence[k] < thresholds[k]
    thresholds[-1] = float("-inf")
    return thresholds


def assign_exits(confidence: Tensor, thresholds: Tensor | Sequence[float]) -> Tensor:
    """Exit index (n,) of each sample: the first ``k`` with ``confidence[k] >= thresholds[k]``, else the last."""
    num_exits, n = confidence.shape
    thresholds = torch.as_tensor(thresholds, dtype=torch.float64, device=confidence.device)
    reached = confidence.to(torch.float64) >= thresholds[:, None]
    reached[-1] = True  # the last exit always answers
    return reached.to(torch.int8).argmax(dim=0)  # argmax returns the first maximum


@dataclass
class ExitOutputs:
    """Every exit's confidence and prediction on a split: ``confidence``/``prediction`` (K, n), ``target`` (n,)."""

    confidence: Tensor
    prediction: Tensor
    target: Tensor

    @property
    def correct(self) -> Tensor:
        return self.prediction == self.target[None]

    def anytime_top1(self) -> list[float]:
        """Top-1 (%) of each exit when every sample runs it."""
        return (self.correct.to(torch.float64).mean(dim=1) * 100).tolist()


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DDP / Ray Train wrapping


@torch.no_grad()
def collect_exit_outputs(model: nn.Module, batches: Iterable, device: torch.device | str | None = None) -> ExitOutputs:
    """Run every exit on ``batches`` (an iterable of ``(images, targets)``), in eval mode."""
    model = _unwrap(model)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    confidences, predictions, targets = [], [], []
    try:
        for batch in batches:
            images, target = batch[0], batch[1]
            if target.ndim != 1:
                raise ValueError(f"calibration needs class-index targets (B,), got shape {tuple(target.shape)}")
            outputs = model(images.to(device, non_blocking=True))
            probs = torch.stack([o.float().softmax(dim=-1) for o in outputs])  # (K, B, C)
            conf, pred = probs.max(dim=-1)
            confidences.append(conf.cpu())
            predictions.append(pred.cpu())
            targets.append(target.cpu())
    finally:
        model.train(was_training)
    if not targets:
        raise ValueError("no batches to calibrate on")
    return ExitOutputs(torch.cat(confidences, 1), torch.cat(predictions, 1), torch.cat(targets))


@dataclass
class SweepPoint:
    """One budget: knob ``q``, its intended ``shares``, the calibrated ``thresholds``, and what they gave."""

    q: float
    shares: list[float]
    thresholds: list[float]
    top1: float
    expected_gmacs: float
    exit_fractions: list[float]


def sweep(calibration: ExitOutputs, evaluation: ExitOutputs, cumulative_macs: Sequence[int],
          qs: Iterable[float] = DEFAULT_QS) -> list[SweepPoint]:
    """Calibrate thresholds on ``calibration`` for every ``q`` and measure them on ``evaluation``."""
    num_exits = calibration.confidence.shape[0]
    if evaluation.confidence.shape[0] != num_exits or len(cumulative_macs) != num_exits:
        raise ValueError("calibration, evaluation and cumulative_macs must cover the same number of exits")
    gmacs = torch.tensor(cumulative_macs, dtype=torch.float64) / 1e9
    correct = evaluation.correct
    n = correct.shape[1]
    points = []
    for q in qs:
        shares = exit_shares(q, num_exits)
        thresholds = find_thresholds(calibration.confidence, shares)
        exits = assign_exits(evaluation.confidence, thresholds)
        fractions = torch.bincount(exits.long(), minlength=num_exits).to(torch.float64) / n
        top1 = float(correct[exits.long(), torch.arange(n)].to(torch.float64).mean() * 100)
        points.append(SweepPoint(float(q), shares.tolist(), thresholds.tolist(), top1,
                                 float((fractions * gmacs).sum()), fractions.tolist()))
    return points


def _encode_float(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # strict JSON has no infinities: "inf" / "-inf"


@dataclass
class BudgetReport:
    """Accuracy against expected cost of a calibrated cascade, with what is needed to run it at a budget."""

    grids: list[int]
    cumulative_gmacs: list[float]
    anytime_top1: list[float]
    points: list[SweepPoint]
    calibration_samples: int
    evaluation_samples: int
    evaluated_on: str  # "test" (a split apart from calibration) or "calibration"
    extra: dict = field(default_factory=dict)

    # ---- picking a budget ----

    def point_for_q(self, q: float) -> SweepPoint:
        """The sweep point whose knob is nearest ``q``."""
        return min(self.points, key=lambda p: abs(p.q - q))

    def best_within(self, gmacs: float) -> SweepPoint:
        """The most accurate point whose expected cost is at most ``gmacs``."""
        feasible = [p for p in self.points if p.expected_gmacs <= gmacs]
        if not feasible:
            raise ValueError(f"no budget point costs {gmacs} GMACs or less (cheapest: "
                             f"{min(p.expected_gmacs for p in self.points):.4g})")
        return max(feasible, key=lambda p: (p.top1, -p.expected_gmacs))

    def cheapest_reaching(self, top1: float) -> SweepPoint:
        """The cheapest point with top-1 (%) at least ``top1``."""
        reaching = [p for p in self.points if p.top1 >= top1]
        if not reaching:
            raise ValueError(f"no budget point reaches {top1}% top-1 (best: {max(p.top1 for p in self.points):.2f}%)")
        return min(reaching, key=lambda p: (p.expected_gmacs, -p.top1))

    # ---- output ----

    def to_dict(self) -> dict:
        data = asdict(self)
        for point in data["points"]:
            point["thresholds"] = [_encode_float(t) for t in point["thresholds"]]
        return data

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> BudgetReport:
        data = json.loads(Path(path).read_text())
        points = [SweepPoint(**{**p, "thresholds": [float(t) for t in p["thresholds"]]}) for p in data.pop("points")]
        return cls(points=points, **data)

    def plot(self, path: str | Path, baselines: dict[str, tuple[float, float]] | None = None) -> Path:
        """Draw accuracy vs expected GMACs (with each exit's anytime point and optional ``baselines``,
        name -> (GMACs, top-1 %)) and the exit fractions against ``q``; PNG through matplotlib's Agg canvas."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(11, 4.2), layout="constrained")
        FigureCanvasAgg(fig)
        curve, shares = fig.subplots(1, 2)
        curve.plot([p.expected_gmacs for p in self.points], [p.top1 for p in self.points], "o-", ms=3,
                   label="DVT, budgeted (q sweep)")
        curve.plot(self.cumulative_gmacs, self.anytime_top1, "s--", color="grey", label="exit k for every sample")
        for k, (g, a) in enumerate(zip(self.cumulative_gmacs, self.anytime_top1)):
            curve.annotate(f"{self.grids[k]}x{self.grids[k]}", (g, a), textcoords="offset points", xytext=(4, -10),
                           fontsize=8)
        for name, (g, a) in (baselines or {}).items():
            curve.plot([g], [a], "*", ms=11, label=name)
        curve.set_xlabel("expected GMACs per image")
        curve.set_ylabel(f"top-1 (%) on {self.evaluated_on} split ({self.evaluation_samples} images)")
        curve.grid(alpha=0.3)
        curve.legend(fontsize=8)
        qs = [p.q for p in self.points]
        bottom = [0.0] * len(qs)
        for k in range(len(self.grids)):
            part = [p.exit_fractions[k] for p in self.points]
            shares.fill_between(qs, bottom, [b + s for b, s in zip(bottom, part)], alpha=0.7,
                                label=f"exit {k + 1} ({self.grids[k]}x{self.grids[k]})")
            bottom = [b + s for b, s in zip(bottom, part)]
        shares.set_xlabel("budget knob q")
        shares.set_ylabel("fraction of images answered")
        shares.set_ylim(0, 1)
        shares.legend(fontsize=8, loc="lower left")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
        return path

    def save_beside(self, checkpoint: str | Path, stem: str = "dvt_budget") -> tuple[Path, Path]:
        """Write ``<stem>.json`` and ``<stem>.png`` beside ``checkpoint`` (a file, or a checkpoint directory)."""
        checkpoint = Path(checkpoint)
        folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
        return self.to_json(folder / f"{stem}.json"), self.plot(folder / f"{stem}.png")


def calibrate_and_sweep(model: nn.Module, val_batches: Iterable, test_batches: Iterable | None = None,
                        qs: Iterable[float] = DEFAULT_QS, device: torch.device | str | None = None) -> BudgetReport:
    """Calibrate thresholds on ``val_batches`` (held out from training) for every ``q`` in ``qs`` and measure
    accuracy and expected cost on ``test_batches`` (or on the calibration split itself when none is given).

    ``model`` is a DVT cascade (``pipeline.models.dvt.DynamicVisionTransformer``, possibly DDP-wrapped);
    batches are ``(images, class_indices)`` pairs.
    """
    cascade = _unwrap(model)
    if not hasattr(cascade, "exit_macs"):
        raise TypeError(f"calibrate_and_sweep needs a DVT cascade, got {type(cascade).__name__}")
    calibration = collect_exit_outputs(cascade, val_batches, device)
    evaluation = collect_exit_outputs(cascade, test_batches, device) if test_batches is not None else calibration
    cumulative = cascade.exit_macs()
    return BudgetReport(
        grids=list(cascade.grids),
        cumulative_gmacs=[m / 1e9 for m in cumulative],
        anytime_top1=evaluation.anytime_top1(),
        points=sweep(calibration, evaluation, cumulative, qs),
        calibration_samples=calibration.target.numel(),
        evaluation_samples=evaluation.target.numel(),
        evaluated_on="test" if test_batches is not None else "calibration",
    )
