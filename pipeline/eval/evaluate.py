"""Evaluate a trained model on a shard split, without Ray: ``vitpipe evaluate MODEL_URI --shards DIR``.

``MODEL_URI`` is a checkpoint (directory or ``state.pt``) or a version registered by
:mod:`pipeline.registry` (``models:/name@champion``). The model is rebuilt from the config stored with
its weights and switched to inference form (Castling-ViT drops its training-only branch). Metrics are
the training loop's own (:func:`pipeline.train.loop.evaluate`): loss, top-1 and top-5 of the last exit
(and each exit's top-1 for a cascade), so a checkpoint's logged validation numbers are reproduced.
For a DVT cascade the budget curve is added: thresholds calibrated on the ``val`` split, accuracy
against expected cost measured on the evaluated split (:mod:`pipeline.eval.dvt_budget`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["EvalReport", "evaluate_model", "resolve_split"]


@dataclass
class EvalReport:
    source: str  # what was loaded
    split: str  # the split evaluated
    samples: int
    metrics: dict[str, float]  # loss, top1, top5 (%), exitK_top1 for cascades
    model: str
    epochs_done: int | None
    logged: dict[str, float] = field(default_factory=dict)  # the checkpoint's own validation metrics
    budget: Any = None  # pipeline.eval.dvt_budget.BudgetReport for DVT cascades

    def to_dict(self) -> dict:
        data = {k: v for k, v in self.__dict__.items() if k != "budget"}
        if self.budget is not None:
            data["budget"] = self.budget.to_dict()
        return data

    def summary(self) -> str:
        lines = [f"{self.model} from {self.source} (epoch {self.epochs_done}), {self.split} split, {self.samples} images"]
        for key, value in self.metrics.items():
            logged = self.logged.get(f"val/{key}")
            note = f"   (logged val/{key}: {logged:.4f})" if logged is not None and self.split == "val" else ""
            lines.append(f"  {key:<12} {value:.4f}{note}")
        if self.budget is not None:
            points = self.budget.points
            cheapest, dearest = min(points, key=lambda p: p.expected_gmacs), max(points, key=lambda p: p.expected_gmacs)
            lines.append(f"  DVT budget curve: {len(points)} points, {cheapest.expected_gmacs:.4g} GMACs at "
                         f"{cheapest.top1:.2f}% to {dearest.expected_gmacs:.4g} GMACs at {dearest.top1:.2f}% "
                         f"(calibrated on val, {self.budget.calibration_samples} images)")  # fmt: skip
        return "\n".join(lines)


def resolve_split(shards: str | os.PathLike, split: str):
    """The split's manifest: ``shards`` is a split directory, or a dataset root holding ``<split>/``."""
    from pipeline.data.manifest import ManifestError, read_manifest

    manifest = read_manifest(shards)
    if hasattr(manifest, "shard_urls"):  # already a split
        return manifest
    if split not in manifest:
        raise ManifestError(f"{shards}: has no {split!r} split (it has {', '.join(manifest.splits)})")
    return manifest[split]


def _batches(config, manifest, *, batch_size: int, loader_workers: int):
    from pipeline.data.reader import build_loader
    from pipeline.data.transforms import build_transform
    from pipeline.train.build import eval_crop_pct

    transform = build_transform(config.data.img_size, train=False, in_chans=config.data.in_chans,
                                crop_pct=eval_crop_pct(config))  # fmt: skip
    return build_loader(manifest, batch_size=batch_size, train=False, transform=transform, num_workers=loader_workers)


def _real_rows(batches):
    for images, labels in batches:
        keep = labels >= 0  # the reader pads the last batch with label -1 rows
        if keep.any():
            yield images[keep], labels[keep]


def evaluate_model(
    model_uri: str | os.PathLike,
    shards: str | os.PathLike,
    *,
    split: str = "test",
    batch_size: int = 256,
    loader_workers: int = 0,
    device: str = "cpu",
    tracking_uri: str | None = None,
    out_dir: str | os.PathLike | None = None,
) -> EvalReport:
    """Load ``model_uri`` and evaluate it on ``split`` of ``shards``; ``out_dir`` gets ``evaluation.json``
    (and DVT's ``dvt_budget.json`` / ``.png``)."""
    import torch

    from pipeline.registry import load
    from pipeline.train.loop import Dist, evaluate

    loaded = load(model_uri, tracking_uri=tracking_uri)
    config = loaded.config
    manifest = resolve_split(shards, split)
    if manifest.num_classes != config.data.num_classes:
        raise ValueError(f"{shards}: {manifest.num_classes} classes, the model was trained on {config.data.num_classes}")
    torch_device = torch.device(device)
    model = loaded.model.to(torch_device)
    metrics = evaluate(model, _batches(config, manifest, batch_size=batch_size, loader_workers=loader_workers),
                       Dist(0, 1, torch_device), config)  # fmt: skip
    budget = None
    if hasattr(model, "exit_macs"):  # a DVT cascade: calibrate on val, sweep the budget on this split
        from pipeline.eval.dvt_budget import calibrate_and_sweep

        from pipeline.data.manifest import read_manifest

        root = Path(shards).parent if hasattr(read_manifest(shards), "shard_urls") else Path(shards)
        calibration = resolve_split(root, "val")  # held out from training, as in the training loop
        same = calibration.shard_urls() == manifest.shard_urls()
        budget = calibrate_and_sweep(
            model, _real_rows(_batches(config, calibration, batch_size=batch_size, loader_workers=loader_workers)),
            None if same else _real_rows(_batches(config, manifest, batch_size=batch_size, loader_workers=loader_workers)),
            device=torch_device,
        )  # fmt: skip
    logged = {k: v for k, v in (loaded.meta.get("metrics") or {}).items() if k.startswith("val")}
    report = EvalReport(source=loaded.source, split=manifest.split, samples=manifest.num_samples, metrics=metrics,
                        model=config.model.name, epochs_done=loaded.meta.get("epochs_done"), logged=logged,
                        budget=budget)  # fmt: skip
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.json").write_text(json.dumps(report.to_dict(), indent=1, default=str) + "\n")
        if budget is not None:
            budget.to_json(out / "dvt_budget.json")
            budget.plot(out / "dvt_budget.png")
    return report
