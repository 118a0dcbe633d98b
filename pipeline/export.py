"""Export the deployed form of a trained model: ``vitpipe export MODEL_URI --format onnx|pt2|torchscript --out DIR``.

``MODEL_URI`` is a checkpoint (directory or ``state.pt``) or a registered version (``models:/NAME@champion``).
The model is rebuilt in inference form (Castling-ViT without its training-only masked-softmax branch),
exported with a dynamic batch dimension, then loaded back from the written file and run against
PyTorch on the same images (real ones from ``--shards``, else seeded noise): the largest difference is
written to ``export.json`` and an export whose outputs drift is an error, not a file.

A DVT cascade is exported exit by exit, so that a server can stop early: ``exitK`` takes the images and
the previous exit's state (its tokens and, with relation reuse, its attention logits) and returns its
logits and the state the next exit takes. Its thresholds, calibrated on the ``val`` split of
``--shards``, go to ``thresholds.json`` beside them (every budget point, and the cheapest one that keeps
the last exit's accuracy as the default).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["FORMATS", "ExportError", "export_model"]

FORMATS = ("onnx", "pt2", "torchscript")
_SUFFIX = {"onnx": ".onnx", "pt2": ".pt2", "torchscript": ".torchscript.pt"}
TOLERANCE = 1e-4  # largest |exported - PyTorch| allowed, relative to the largest |output| (at least 1)


class ExportError(RuntimeError):
    """The model cannot be exported, or its export does not reproduce PyTorch's outputs."""


class CascadeExit(nn.Module):
    """Exit ``index`` of a DVT cascade over plain tensors: ``(images, *previous state) -> (logits, *state)``.

    The state is the exit's last-block tokens, then (with relation reuse) one attention-logits tensor per
    block; the first exit takes images alone and the last returns logits alone.
    """

    def __init__(self, cascade: nn.Module, index: int):
        super().__init__()
        self.cascade, self.index = cascade, index
        self.takes_state = index > 0 and (cascade.reuse_features or cascade.reuse_relations)
        self.gives_state = index < cascade.num_exits - 1 and (cascade.reuse_features or cascade.reuse_relations)

    def forward(self, images: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        from pipeline.models.dvt import ExitState

        prev = ExitState(state[0], list(state[1:]) or None) if self.takes_state else None
        logits, new = self.cascade.forward_exit(self.index, images, prev)
        if not self.gives_state:
            return (logits,)
        return (logits, new.tokens, *(new.logits or []))


@dataclass
class _Graph:
    name: str  # the file stem: "model", or "exit1", "exit2", ... for a cascade
    module: nn.Module
    input_names: list[str]
    output_names: list[str]


def _graphs(model: nn.Module) -> list[_Graph]:
    if not hasattr(model, "exit_macs"):
        return [_Graph("model", model, ["images"], ["logits"])]
    graphs = []
    for k in range(model.num_exits):
        exit_ = CascadeExit(model, k)
        blocks = len(model.exits[k].blocks)
        state_out = ["tokens"] + [f"relations{b}" for b in range(blocks)] * model.reuse_relations
        state_in = [f"prev_{n}" for n in graphs[-1].output_names[1:]] if exit_.takes_state else []
        graphs.append(_Graph(f"exit{k + 1}", exit_, ["images", *state_in], ["logits", *state_out] if exit_.gives_state
                             else ["logits"]))  # fmt: skip
    return graphs


# --------------------------------------------------------------------------------------------------
# Writing and reading back each format.


@contextlib.contextmanager
def _torchscript_quietly():
    """Without the tracer's shape-check warnings and PyTorch's deprecation notice (said once, by export_model)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.", category=FutureWarning)
        yield


def _exported_program(graph: _Graph, inputs: tuple[Tensor, ...]):
    batch = torch.export.Dim("batch", min=1)
    dynamic = [{0: batch}]  # the images; a cascade exit's state arrives as one *args tuple
    if len(inputs) > 1:
        dynamic.append(tuple({0: batch} for _ in inputs[1:]))
    return torch.export.export(graph.module, inputs, dynamic_shapes=tuple(dynamic))


def _write(fmt: str, graph: _Graph, inputs: tuple[Tensor, ...], path: Path) -> None:
    if fmt == "torchscript":
        # Tracing records shape reads as ops, so the batch dimension stays free (checked on another batch size);
        # its warnings are about the models' shape checks, which a trace freezes as intended.
        with _torchscript_quietly():
            torch.jit.save(torch.jit.trace(graph.module, inputs, check_trace=False), str(path))
        return
    program = _exported_program(graph, inputs)
    if fmt == "pt2":
        torch.export.save(program, str(path))
    else:
        onnx_program = torch.onnx.export(program, input_names=graph.input_names, output_names=graph.output_names,
                                         dynamo=True, verbose=False)  # fmt: skip
        onnx_program.save(str(path))


def _as_tuple(out) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (list, tuple)) else (out,)


def _runner(fmt: str, path: Path):
    """A callable: tensors in, a tuple of float32 tensors out, from the file alone."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise ExportError("checking an ONNX export needs onnxruntime: pip install 'vitpipe[export]'") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        return lambda *xs: tuple(torch.from_numpy(o) for o in session.run(None, dict(zip(names, (x.numpy() for x in xs)))))
    if fmt == "torchscript":
        with _torchscript_quietly():
            module = torch.jit.load(str(path))
    else:
        module = torch.export.load(str(path)).module()

    return lambda *xs: _as_tuple(module(*xs))


def _difference(expected: tuple[Tensor, ...], got: tuple[Tensor, ...], what: str) -> float:
    if len(expected) != len(got):
        raise ExportError(f"{what}: {len(got)} outputs, PyTorch gives {len(expected)}")
    worst = 0.0
    for e, g in zip(expected, got):
        if e.shape != g.shape:
            raise ExportError(f"{what}: an output of shape {tuple(g.shape)}, PyTorch gives {tuple(e.shape)}")
        scale = max(1.0, e.abs().max().item())
        worst = max(worst, (e.float() - g.float()).abs().max().item() / scale)
    return worst


# --------------------------------------------------------------------------------------------------
# Images to check on.


def _check_images(config, shards: str | None, split: str, count: int) -> tuple[Tensor, str]:
    """``count`` images of ``split`` (eval transform), or seeded noise of the model's input shape."""
    if shards is None:
        generator = torch.Generator().manual_seed(0)
        size = (count, config.data.in_chans, config.data.img_size, config.data.img_size)
        return torch.randn(size, generator=generator), "seeded noise (pass --shards to check on real images)"
    from pipeline.eval.evaluate import _batches, _real_rows, resolve_split

    manifest = resolve_split(shards, split)
    images = []
    for batch, _ in _real_rows(_batches(config, manifest, batch_size=count, loader_workers=0)):
        images.append(batch)
        if sum(len(b) for b in images) >= count:
            break
    return torch.cat(images)[:count], f"{count} images of {manifest.split} from {shards}"


def _thresholds(model, config, shards: str) -> dict:
    """Every budget point calibrated on val (measured on test when the shards have one), and a default."""
    from pipeline.data.manifest import ManifestError
    from pipeline.eval.dvt_budget import calibrate_and_sweep
    from pipeline.eval.evaluate import _batches, _real_rows, resolve_split

    from pipeline.data.manifest import read_manifest

    root = Path(shards).parent if hasattr(read_manifest(shards), "shard_urls") else Path(shards)  # a split: its root
    val = resolve_split(root, "val")
    try:
        test = resolve_split(root, "test")
    except ManifestError:
        test = None

    def rows(manifest):
        return _real_rows(_batches(config, manifest, batch_size=256, loader_workers=0))

    report = calibrate_and_sweep(model, rows(val), None if test is None else rows(test))
    last = report.anytime_top1[-1]
    reaching = [p for p in report.points if p.top1 >= last]
    default = min(reaching, key=lambda p: p.expected_gmacs) if reaching else max(report.points, key=lambda p: p.top1)
    budget = report.to_dict()
    why = (f"the cheapest point with the last exit's top-1 ({last:.2f}%) on {report.evaluated_on}" if reaching
           else "the most accurate point")  # fmt: skip
    return {
        "rule": "an image stops at the first exit whose top softmax probability is at least that exit's threshold; "
                "the last exit always answers",
        "default": {**budget["points"][report.points.index(default)], "why": why},
        "budget": budget,
    }


# --------------------------------------------------------------------------------------------------
# The command.


def export_model(model_uri: str | os.PathLike, fmt: str, out_dir: str | os.PathLike, *, shards: str | None = None,
                 split: str = "val", tracking_uri: str | None = None, check_images: int = 8) -> dict:  # fmt: skip
    """Export ``model_uri`` in inference form as ``fmt`` into ``out_dir``; returns what ``export.json`` holds.

    Every written graph is loaded back and checked against PyTorch on ``check_images`` images (of ``split``
    of ``shards``, else seeded noise) in a batch of another size than the one exported with, so the dynamic
    batch dimension is checked too. A DVT cascade needs ``shards`` (its thresholds are calibrated on val).
    """
    import yaml

    from pipeline.data.transforms import default_normalisation
    from pipeline.registry import load

    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "torchscript":
        print("[vitpipe] note: PyTorch deprecates TorchScript; pt2 (torch.export) is its successor")
    loaded = load(model_uri, tracking_uri=tracking_uri)  # inference form, eval mode, on the CPU
    model, config = loaded.model.float(), loaded.config
    if hasattr(model, "exit_macs") and shards is None:
        raise ExportError("a DVT cascade's exits are exported with their thresholds, calibrated on the val split: "
                          "pass --shards (a dataset root holding val/)")  # fmt: skip
    if shards is not None:
        from pipeline.eval.evaluate import resolve_split

        manifest = resolve_split(shards, split)
        if manifest.num_classes != config.data.num_classes:
            raise ExportError(f"{shards}: {manifest.num_classes} classes, the model was trained on "
                              f"{config.data.num_classes}")  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images, images_from = _check_images(config, shards, split, max(check_images, 3))
    example = images[:2]  # torch.export specialises a batch of 1; checked below on all of `images`
    files, state, example_state = [], (), ()
    with torch.no_grad():
        for graph in _graphs(model):
            path = out / f"{graph.name}{_SUFFIX[fmt]}"
            inputs, check = (example, *example_state), (images, *state)
            try:
                _write(fmt, graph, inputs, path)
            except Exception as err:  # noqa: BLE001 - the exporters raise many kinds; name the graph and the cause
                raise ExportError(f"{config.model.name}: {graph.name} cannot be exported as {fmt} "
                                  f"({type(err).__name__}: {str(err).splitlines()[0][:500]})") from err  # fmt: skip
            expected = _as_tuple(graph.module(*check))
            difference = _difference(expected, _runner(fmt, path)(*check), f"{path.name}")
            if difference > TOLERANCE:
                raise ExportError(f"{path.name}: its outputs differ from PyTorch's by {difference:.3g} (relative), "
                                  f"more than {TOLERANCE}")  # fmt: skip
            files.append({"file": path.name, "inputs": graph.input_names, "outputs": graph.output_names,
                          "max_relative_difference": difference})  # fmt: skip
            state, example_state = expected[1:], tuple(t[:2] for t in _as_tuple(graph.module(*inputs))[1:])
    mean, std = default_normalisation(config.data.in_chans)
    summary = {
        "format": fmt,
        "source": loaded.source,
        "model": config.model.name,
        "epochs_done": loaded.meta.get("epochs_done"),
        "num_classes": config.data.num_classes,
        "input": {"shape": ["batch", config.data.in_chans, config.data.img_size, config.data.img_size],
                  "resize_then_centre_crop": config.data.crop_pct, "interpolation": "bilinear",
                  "mean": list(mean), "std": list(std)},  # fmt: skip
        "checked_on": images_from,
        "files": files,
    }
    if hasattr(model, "exit_macs"):
        (out / "thresholds.json").write_text(json.dumps(_thresholds(model, config, shards), indent=1) + "\n")
        summary["thresholds"] = "thresholds.json"
    (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    (out / "export.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary
