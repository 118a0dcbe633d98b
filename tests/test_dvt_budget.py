"""Budgeted DVT inference: shares, thresholds against the official procedure, the q sweep, the report."""

from __future__ import annotations

import json
import math

import pytest
import torch

import pipeline.models  # noqa: F401
from pipeline.eval import BudgetReport, calibrate_and_sweep
from pipeline.eval.dvt_budget import (
    DEFAULT_QS,
    ExitOutputs,
    assign_exits,
    collect_exit_outputs,
    exit_shares,
    find_thresholds,
    sweep,
)
from pipeline.models.dvt import DynamicVisionTransformer

CUMULATIVE = [100, 350, 900]  # MACs of answering at exit 1, 2, 3


def tie_free_outputs(n: int, num_exits: int = 3, classes: int = 4, seed: int = 0) -> ExitOutputs:
    g = torch.Generator().manual_seed(seed)
    confidence = torch.rand(num_exits, n, generator=g, dtype=torch.float64)
    assert confidence.flatten().unique().numel() == confidence.numel()
    prediction = torch.randint(0, classes, (num_exits, n), generator=g)
    target = torch.randint(0, classes, (n,), generator=g)
    return ExitOutputs(confidence, prediction, target)


# ---- the official procedure, written as in blackfeather-wang/Dynamic-Vision-Transformer inference.py ----

def official_find_threshold(confidence: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    n_stage, n_sample = confidence.shape
    _, sorted_idx = confidence.sort(dim=1, descending=True)
    filtered = torch.zeros(n_sample)
    thresholds = torch.full((n_stage,), 1e8, dtype=torch.float64)
    for k in range(n_stage - 1):
        count, out_n = 0, math.floor(n_sample * float(p[k]))
        for i in range(n_sample):
            idx = sorted_idx[k][i]
            if filtered[idx] == 0:
                count += 1
                if count == out_n:
                    thresholds[k] = confidence[k][idx]
                    break
        filtered += (confidence[k] >= thresholds[k]).float()
    thresholds[-1] = -1e8
    return thresholds


def official_evaluate(outputs: ExitOutputs, flops, thresholds):
    n_stage, n_sample = outputs.confidence.shape
    correct, spent = 0, 0.0
    for i in range(n_sample):
        for k in range(n_stage):
            if outputs.confidence[k][i] >= thresholds[k]:
                correct += int(outputs.prediction[k][i] == outputs.target[i])
                spent += flops[k]
                break
    return correct * 100.0 / n_sample, spent / n_sample


# ---- shares and thresholds --------------------------------------------------------------------------------

def test_exit_shares_are_geometric():
    torch.testing.assert_close(exit_shares(1.0, 3), torch.full((3,), 1 / 3, dtype=torch.float64))
    q = 0.35
    direct = torch.tensor([q, q**2, q**3], dtype=torch.float64)
    torch.testing.assert_close(exit_shares(q, 3), direct / direct.sum())
    big = exit_shares(1e6, 40)  # no overflow
    assert torch.isfinite(big).all() and big[-1] == pytest.approx(1 / (1 + 1e-6 + 1e-12), rel=1e-12)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="q"):
            exit_shares(bad, 3)


def test_q_equal_one_sends_a_third_to_each_exit_on_tie_free_data():
    data = tie_free_outputs(300)
    thresholds = find_thresholds(data.confidence, exit_shares(1.0, 3))
    counts = torch.bincount(assign_exits(data.confidence, thresholds), minlength=3)
    assert counts.tolist() == [100, 100, 100]


@pytest.mark.parametrize("q", [0.05, 0.3, 1.0, 1.7, 2.95])
def test_thresholds_and_evaluation_match_the_official_procedure(q):
    calibration, test = tie_free_outputs(211, seed=1), tie_free_outputs(157, seed=2)
    shares = exit_shares(q, 3)
    ours = find_thresholds(calibration.confidence, shares)
    official = official_find_threshold(calibration.confidence, shares)
    for a, b in zip(ours.tolist(), official.tolist()):
        # "no one exits here" is +inf for us and 1e8 there; the last one -inf vs -1e8
        assert a == b or (abs(b) == 1e8 and math.isinf(a) and math.copysign(1, a) == math.copysign(1, b))
    (point,) = sweep(calibration, test, CUMULATIVE, [q])
    top1, cost = official_evaluate(test, CUMULATIVE, official)
    assert point.top1 == pytest.approx(top1)
    assert point.expected_gmacs * 1e9 == pytest.approx(cost)


def test_last_threshold_lets_every_sample_exit():
    data = tie_free_outputs(120)
    thresholds = find_thresholds(data.confidence, exit_shares(50.0, 3))  # almost all meant for the last exit
    assert thresholds[-1] == float("-inf")
    data.confidence[:, :] = 0.0  # nobody confident anywhere
    exits = assign_exits(data.confidence, [0.5, 0.5, 0.99])  # even a finite last threshold is overridden
    assert (exits == 2).all()


def test_ties_never_leave_an_exit_overfull_or_samples_stranded():
    confidence = torch.tensor([[0.9, 0.9, 0.9, 0.9, 0.1, 0.1], [0.5, 0.4, 0.3, 0.2, 0.8, 0.7], [0.0] * 6])
    thresholds = find_thresholds(confidence, torch.tensor([1 / 3, 1 / 3, 1 / 3]))
    exits = assign_exits(confidence, thresholds)
    assert exits.tolist() == [0, 0, 0, 0, 1, 1]  # the tie sends four out at exit 1; exit 2 takes what is left


def test_expected_cost_rises_with_q_from_first_exit_to_full_cascade():
    data = tie_free_outputs(600)
    qs = [1e-20, *DEFAULT_QS, 1e20]  # the extremes: pi_1 == 1.0, then pi_3 == 1.0, in float64
    points = sweep(data, data, CUMULATIVE, qs)
    costs = [p.expected_gmacs * 1e9 for p in points]
    assert costs[0] == pytest.approx(CUMULATIVE[0]) and costs[-1] == pytest.approx(CUMULATIVE[-1])
    assert all(a <= b for a, b in zip(costs, costs[1:]))
    assert costs[1] < costs[len(costs) // 2] < costs[-2]
    for p in points:
        assert sum(p.exit_fractions) == pytest.approx(1.0)
        assert sum(f * c for f, c in zip(p.exit_fractions, CUMULATIVE)) == pytest.approx(p.expected_gmacs * 1e9)


# ---- end to end on a tiny cascade -------------------------------------------------------------------------

def tiny_cascade() -> DynamicVisionTransformer:
    torch.manual_seed(0)
    return DynamicVisionTransformer(img_size=32, in_chans=1, num_classes=5, grids=(2, 3, 4), embed_dim=32,
                                    depth=2, num_heads=2, mlp_ratio=2.0)


def batches(n_batches: int, seed: int, size: int = 40):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 1, 32, 32, generator=g), torch.randint(0, 5, (size,), generator=g))
            for _ in range(n_batches)]


@pytest.mark.timeout(90)
def test_calibrate_and_sweep_agrees_with_real_dynamic_inference(tmp_path):
    model = tiny_cascade().train()
    val, test = batches(3, seed=1), batches(2, seed=2)
    report = calibrate_and_sweep(model, val, test, qs=[0.3, 1.0, 2.5])
    assert model.training  # mode restored
    assert report.grids == [2, 3, 4] and report.evaluated_on == "test"
    assert (report.calibration_samples, report.evaluation_samples) == (120, 80)
    assert report.cumulative_gmacs == [m / 1e9 for m in model.exit_macs()]

    model.eval()
    images, targets = torch.cat([b[0] for b in test]), torch.cat([b[1] for b in test])
    with torch.no_grad():
        anytime = [float((o.argmax(-1) == targets).float().mean() * 100) for o in model(images)]
    assert report.anytime_top1 == pytest.approx(anytime)
    for point in report.points:  # the simulated budget is what early-exit inference really does
        out = model.forward_dynamic(images, point.thresholds)
        assert point.top1 == pytest.approx(float((out.predictions == targets).float().mean() * 100))
        assert point.expected_gmacs == pytest.approx(float(out.macs.double().mean()) / 1e9)
        fractions = torch.bincount(out.exit_index, minlength=3).double() / len(targets)
        assert point.exit_fractions == pytest.approx(fractions.tolist())

    checkpoint = tmp_path / "run" / "checkpoint_000003"
    checkpoint.mkdir(parents=True)
    json_path, png_path = report.save_beside(checkpoint)
    assert json_path == checkpoint / "dvt_budget.json" and png_path == checkpoint / "dvt_budget.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png_path.stat().st_size > 10_000
    raw = json.loads(json_path.read_text())  # strict JSON: infinities written as strings
    assert raw["points"][0]["thresholds"][-1] == "-inf"
    assert BudgetReport.from_json(json_path) == report


def test_calibration_on_its_own_split_and_report_queries():
    model = tiny_cascade()
    report = calibrate_and_sweep(model, batches(2, seed=3))
    assert report.evaluated_on == "calibration" and report.evaluation_samples == 80
    assert len(report.points) == len(DEFAULT_QS)
    cheapest = min(p.expected_gmacs for p in report.points)
    assert report.best_within(cheapest).expected_gmacs == cheapest
    best = max(p.top1 for p in report.points)
    assert report.cheapest_reaching(best).top1 == best
    assert report.point_for_q(1.01).q == 1.0
    with pytest.raises(ValueError, match="GMACs"):
        report.best_within(cheapest / 2)
    with pytest.raises(ValueError, match="top-1"):
        report.cheapest_reaching(101.0)


def test_bad_inputs_are_named():
    model = tiny_cascade()
    with pytest.raises(ValueError, match="no batches"):
        collect_exit_outputs(model, [])
    with pytest.raises(ValueError, match="class-index"):
        collect_exit_outputs(model, [(torch.randn(2, 1, 32, 32), torch.rand(2, 5))])
    with pytest.raises(TypeError, match="DVT cascade"):
        calibrate_and_sweep(torch.nn.Linear(2, 2), batches(1, seed=0))
    with pytest.raises(ValueError, match="shares"):
        find_thresholds(torch.rand(3, 10), [0.5, 0.5])
