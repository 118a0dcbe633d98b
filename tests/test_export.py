"""``vitpipe export``: the deployed form as ONNX, pt2 and TorchScript, read back by their own runtimes.

Each export is checked here independently of the exporter's own check: ONNX with onnxruntime, pt2 and
TorchScript in a fresh interpreter that imports torch alone (no project code), on real digits images
and a batch size the export was not traced with.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from pipeline.cli import main as cli
from pipeline.export import export_model
from pipeline.registry import load, promote_checkpoint
from pipeline.train.build import build_model
from pipeline.train.checkpoint import save_checkpoint
from tests.test_registry import val_batches, write_checkpoint

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def trained_vit(digits_shards, tmp_path_factory):
    """A tiny ViT trained 30 steps on the digits, as a checkpoint directory, and its config."""
    from pipeline.train.config import TrainConfig, resolve_config
    from tests.conftest import tiny_train_dict

    work = tmp_path_factory.mktemp("export")
    config = resolve_config(TrainConfig.from_dict(tiny_train_dict(digits_shards, work, run_name="exp")))
    return write_checkpoint(config, work / "runs", epochs_done=2, steps=30), config


def images_of(config, split: str = "val", count: int = 13) -> torch.Tensor:
    """``count`` images of a split through the eval transform (13: neither the traced 2 nor the exporter's 8)."""
    batch = next(iter(val_batches(config, split)))[0]
    return batch[:count]


def onnx_ops(path: Path) -> set[str]:
    proto = onnx.load(str(path))
    return {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}


def test_an_onnx_export_gives_pytorchs_outputs_in_onnxruntime_on_real_images(trained_vit, digits_shards, tmp_path):
    checkpoint, config = trained_vit
    summary = export_model(checkpoint, "onnx", tmp_path, shards=str(digits_shards))
    assert summary["checked_on"].startswith("8 images of val") and summary["files"][0]["file"] == "model.onnx"
    assert {p.name for p in tmp_path.iterdir()} == {"model.onnx", "export.json", "config.yaml"}
    assert json.loads((tmp_path / "export.json").read_text())["input"]["shape"] == ["batch", 1, 16, 16]

    images = images_of(config)
    with torch.no_grad():
        expected = load(checkpoint).model(images)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    (got,) = session.run(None, {"images": images.numpy()})
    assert np.abs(got - expected.numpy()).max() <= 1e-4
    assert (got.argmax(1) == expected.argmax(1).numpy()).all()
    assert expected.argmax(1).unique().numel() > 1  # a trained model, not a constant answer


@pytest.mark.parametrize("fmt", ["pt2", "torchscript"])
def test_pt2_and_torchscript_exports_run_with_torch_alone(fmt, trained_vit, tmp_path):
    checkpoint, config = trained_vit
    summary = export_model(checkpoint, fmt, tmp_path)  # no shards: checked on seeded noise
    assert summary["checked_on"].startswith("seeded noise")
    images = images_of(config)
    np.save(tmp_path / "images.npy", images.numpy())
    (file,) = [f["file"] for f in summary["files"]]
    reader = "torch.export.load(path).module()" if fmt == "pt2" else "torch.jit.load(path)"
    script = (f"import sys, numpy, torch; path = {str(tmp_path / file)!r}; model = {reader}; "
              f"x = torch.from_numpy(numpy.load({str(tmp_path / 'images.npy')!r})); "
              f"numpy.save({str(tmp_path / 'out.npy')!r}, model(x).detach().numpy()); "
              "assert not [m for m in sys.modules if m.startswith(('pipeline', 'timm'))]")  # fmt: skip
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120, cwd=tmp_path)
    with torch.no_grad():
        expected = load(checkpoint).model(images).numpy()
    assert np.abs(np.load(tmp_path / "out.npy") - expected).max() <= 1e-5


def test_castling_exports_its_inference_form_without_softmax(tiny_config, digits_shards, tmp_path):
    from pipeline.models.layers.castling import castling_modules

    castling = tiny_config(run_name="cast", model__name="castling_vit_nano", data__img_size=32,
                           model__kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    torch.manual_seed(0)
    model = build_model(castling)
    assert all(m.sparse_branch for _, m in castling_modules(model))  # saved in training form, branch and all
    save_checkpoint(tmp_path / "ckpt", {"epochs_done": 1, "global_step": 0, "model": model.state_dict(), "ema": None,
                                        "config": castling.to_dict(), "metrics": {}, "mlflow_run_id": None})  # fmt: skip
    export_model(tmp_path / "ckpt", "onnx", tmp_path / "out", shards=str(digits_shards))
    ops = onnx_ops(tmp_path / "out" / "model.onnx")
    assert "Softmax" not in ops and {"MatMul", "Conv", "ReduceL2"} <= ops  # angular kernel: normalised q and k

    images = images_of(castling)
    with torch.no_grad():
        expected = load(tmp_path / "ckpt").model(images).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(None, {"images": images.numpy()})[0] - expected).max() <= 1e-4


def test_a_cascade_exports_each_exit_and_thresholds_that_reproduce_its_early_exit(tiny_config, digits_shards, tmp_path):
    """Run the ONNX exits as a server would (each on the images the previous left undecided, with their
    state) at the exported default thresholds: the same answers and exits as PyTorch's forward_dynamic."""
    dvt = tiny_config(run_name="dvt", model__name="dvt_vit_nano", data__img_size=32,
                      model__kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "ckpt", {"epochs_done": 1, "global_step": 0, "model": build_model(dvt).state_dict(),
                                        "ema": None, "config": dvt.to_dict(), "metrics": {},
                                        "mlflow_run_id": None})  # fmt: skip
    out = tmp_path / "out"
    summary = export_model(tmp_path / "ckpt", "onnx", out, shards=str(digits_shards))
    assert [f["file"] for f in summary["files"]] == ["exit1.onnx", "exit2.onnx", "exit3.onnx"]
    assert summary["files"][1]["inputs"] == ["images", "prev_tokens", "prev_relations0"]
    thresholds = json.loads((out / "thresholds.json").read_text())
    assert thresholds["budget"]["evaluated_on"] == "test" and thresholds["budget"]["calibration_samples"] == 150
    default = thresholds["default"]
    assert default["top1"] >= thresholds["budget"]["anytime_top1"][-1]
    cut = [float(t) for t in default["thresholds"][:-1]]

    images = images_of(dvt, "test", count=64)
    sessions = [onnxruntime.InferenceSession(str(out / f["file"]), providers=["CPUExecutionProvider"])
                for f in summary["files"]]  # fmt: skip
    answer, answered_at = np.full(len(images), -1), np.full(len(images), -1)
    undecided, state = np.arange(len(images)), []
    for k, session in enumerate(sessions):
        names = [i.name for i in session.get_inputs()]
        outputs = session.run(None, dict(zip(names, [images.numpy()[undecided], *state])))
        probabilities = torch.from_numpy(outputs[0]).softmax(-1)
        confidence, predicted = probabilities.max(-1)
        done = np.ones(len(undecided), bool) if k == len(sessions) - 1 else (confidence >= cut[k]).numpy()
        answer[undecided[done]], answered_at[undecided[done]] = predicted.numpy()[done], k
        undecided, state = undecided[~done], [o[~done] for o in outputs[1:]]
    assert len(undecided) == 0

    reference = load(tmp_path / "ckpt").model.forward_dynamic(images, cut)
    assert (answered_at == reference.exit_index.numpy()).all() and (answer == reference.predictions.numpy()).all()
    assert len(set(answered_at.tolist())) > 1  # the test exercises more than one exit


def test_the_cli_exports_a_registered_model_and_names_bad_input(trained_vit, tiny_config, tmp_path, capsys):
    checkpoint, config = trained_vit
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    promote_checkpoint(checkpoint, tracking_uri=uri, name="exported")
    assert cli(["export", "models:/exported@champion", "--format", "pt2", "--out", str(tmp_path / "out"),
                "--tracking-uri", uri]) == 0  # fmt: skip
    assert "model.pt2: images -> logits" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "export.json").read_text())
    assert summary["source"] == "models:/exported@champion" and summary["epochs_done"] == 2

    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    dvt = tiny_config(run_name="dvt", model__name="dvt_vit_nano", data__img_size=32,
                      model__kwargs={"depth": 1, "embed_dim": 32, "num_heads": 2})  # fmt: skip
    save_checkpoint(tmp_path / "dvt", {"epochs_done": 1, "global_step": 0, "model": build_model(dvt).state_dict(),
                                       "ema": None, "config": dvt.to_dict(), "metrics": {},
                                       "mlflow_run_id": None})  # fmt: skip
    cases = {
        str(not_a_checkpoint): "is not a vitpipe checkpoint",
        str(tmp_path / "missing"): "neither a checkpoint path nor a model URI",
        "models:/nobody@champion": "cannot be fetched",
        str(tmp_path / "dvt"): "pass --shards",
    }
    for source, message in cases.items():
        assert cli(["export", source, "--format", "onnx", "--out", str(tmp_path / "bad"), "--tracking-uri", uri]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # nothing half-written
    with pytest.raises(SystemExit):
        cli(["export", str(checkpoint), "--format", "tflite", "--out", str(tmp_path / "bad")])
    assert "--format" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["--help"])
    assert "export" in capsys.readouterr().out
