"""The GPU path on the CPU: every model family trains under bf16 / fp16 autocast and compiles whole.

CPU autocast stands in for the GPU's (the same casting rules decide which ops run in low precision),
and ``torch.compile(fullgraph=True)`` with the ``aot_eager`` backend traces forward and backward in
seconds: a graph break anywhere is an error. Inductor's code generation is left to the benchmarks.

On a GPU machine ``VITPIPE_TEST_DEVICE=cuda`` runs the same tests on the GPU, compiled with inductor
(benchmarks/gpu_session.sh does).
"""

from __future__ import annotations

import contextlib
import itertools
import os

import pytest
import timm
import torch

import pipeline.models  # noqa: F401  (registers the factories)
from pipeline.models.dvt import DynamicVisionTransformer
from pipeline.models.hierarchical import HierarchicalViT
from pipeline.models.layers.castling import mask_regularization
from pipeline.train.build import classification_loss

pytestmark = pytest.mark.timeout(300)
DEVICE = torch.device(os.environ.get("VITPIPE_TEST_DEVICE", "cpu"))
COMPILE_BACKEND = "inductor" if DEVICE.type == "cuda" else "aot_eager_decomp_partition"
# Compiled against eager inference: aot_eager runs eager's kernels; inductor fuses and reorders float32 sums.
COMPILED_TOLERANCE = dict(rtol=1e-3, atol=1e-4) if DEVICE.type == "cuda" else dict(rtol=1e-4, atol=1e-5)

# One nano model per family: plain msa, hierarchical msa, LSLA (window and global), Castling (plain and
# windowed), and every DVT cascade (softmax, LSLA, Castling, T2T tokenizer). Built with 10 classes.
def _family(name: str, **defaults):
    """A builder of the registered model ``name`` (10 classes); ``builder.__wrapped__(**overrides)`` changes its size."""

    def build(**overrides):
        return timm.create_model(name, num_classes=10, **{**defaults, **overrides}).to(DEVICE)

    def builder():
        return build()

    builder.__wrapped__ = build
    return builder


def _t2t_cascade():
    return DynamicVisionTransformer(
        img_size=224, num_classes=10, tokenizer="t2t", pos_embed="sinusoid", qkv_bias=False, embed_dim=64,
        depth=1, num_heads=2, mlp_ratio=2.0, t2t_token_dim=16,
    ).to(DEVICE)  # fmt: skip


FAMILIES = {
    "msa": _family("vit_msa_nano"),
    "hier_msa": _family("hier_msa_nano"),
    "lsla": _family("vit_lsla_nano"),
    "lsla_global": _family("vit_msa_nano", depth=2, attn="lsla"),
    "castling": _family("castling_vit_nano"),
    "castling_window": _family("castling_swin_nano"),
    "dvt_vit": _family("dvt_vit_nano"),
    "dvt_lsla": _family("dvt_lsla_nano"),
    "dvt_castling": _family("dvt_castling_nano"),
    "dvt_t2t": _t2t_cascade,
}
LOW_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Loss and gradient agreement with float32 at initialisation, measured at under 0.1% and cosine > 0.9999
# on every family; the bounds leave room for other CPUs' kernels while still catching a wrong cast.
LOSS_RTOL = 0.01
GRAD_COSINE = 0.999


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own models: no cache or recompile budget carried over from another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def autocast(precision: str | None):
    if precision is None:
        return contextlib.nullcontext()
    return torch.autocast(DEVICE.type, dtype=LOW_PRECISION[precision])


def inputs(model: torch.nn.Module, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    size = 224 if isinstance(model, DynamicVisionTransformer) and model.img_size == 224 else 32
    size = 16 if isinstance(model, HierarchicalViT) and model.img_size == (16, 16) else size
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 3, size, size, generator=g), torch.randint(0, 10, (batch,), generator=g)
    return x.to(DEVICE), y.to(DEVICE)


def train_loss(model, x, y) -> torch.Tensor:
    """The loop's loss: cross-entropy (DVT: summed over exits) plus Castling's mask regulariser."""
    return classification_loss(model(x), y) + 0.1 * mask_regularization(model)


def exits(output) -> list[torch.Tensor]:
    """A model's logits as a list: one entry, or one per DVT exit."""
    return list(output) if isinstance(output, (list, tuple)) else [output]


def gradients(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def step(model, x, y, precision: str | None, scaler: torch.amp.GradScaler | None = None):
    """One forward and backward; returns the loss and the (unscaled) gradients. Seeded: any dropout or
    stochastic depth draws the same masks in every precision."""
    torch.manual_seed(0)
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast(precision):
        loss = train_loss(model, x, y)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # unscale_ needs one; lr 0 leaves weights as they are
        scaler.unscale_(optimizer)
    return loss.detach().float(), gradients(model)


def assert_close_to_fp32(name, loss, grads, loss32, grads32, cosine=GRAD_COSINE):
    assert torch.isfinite(loss) and abs(loss - loss32) <= LOSS_RTOL * abs(loss32), (name, loss, loss32)
    for param, g in grads.items():
        assert g is not None and torch.isfinite(g).all(), (name, param)
    flat, flat32 = (torch.cat([g[p].double().flatten() for p in sorted(g)]) for g in (grads, grads32))
    assert torch.nn.functional.cosine_similarity(flat, flat32, dim=0) > cosine, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_trains_and_evaluates_in_bf16_fp16_and_fp32(family):
    """bf16 autocast, fp16 autocast + GradScaler: finite loss near float32's, finite gradients for every
    parameter, pointing where float32's point; evaluation under each precision agrees with float32."""
    torch.manual_seed(0)
    model = FAMILIES[family]()
    x, y = inputs(model)
    loss32, grads32 = step(model, x, y, None)
    assert all(g is not None for g in grads32.values()), [p for p, g in grads32.items() if g is None]
    bf16 = step(model, x, y, "bf16")
    assert_close_to_fp32(f"{family} bf16", *bf16, loss32, grads32)
    fp16 = step(model, x, y, "fp16", torch.amp.GradScaler(DEVICE.type, init_scale=2.0**10))
    assert_close_to_fp32(f"{family} fp16", *fp16, loss32, grads32)

    model.eval()
    with torch.no_grad():
        reference = model(x)
        for precision in LOW_PRECISION:
            with autocast(precision):
                out = model(x)
            for got, want in zip(exits(out), exits(reference)):
                assert got.dtype == LOW_PRECISION[precision]
                torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05)
        if isinstance(model, DynamicVisionTransformer):  # early exit under autocast, as the budget sweep runs it
            with autocast("bf16"):
                dynamic = model.forward_dynamic(x, [0.0] * (model.num_exits - 1))
            assert (dynamic.exit_index == 0).all() and dynamic.logits.dtype == torch.bfloat16


KNOBS = [
    dict(kv=kv, scale=scale, ds_param=ds_param, outer_bias=outer_bias, bias_sharing=sharing)
    for kv, (scale, ds_param), (outer_bias, sharing) in itertools.product(
        ["qxx", "qxv", "qkv"],
        [("dynamic", "linear"), ("dynamic", "log"), ("fixed", "linear")],
        [(True, "none"), (True, "tied"), (True, "heads"), (True, "stage"), (False, "none")],
    )
]


def tiny_lsla(knobs: dict) -> HierarchicalViT:
    """Two stages, the first with a shifted block, 16x16 input: every LSLA code path in milliseconds."""
    return HierarchicalViT(img_size=16, num_classes=10, embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=2,
                           drop_path_rate=0.0, attn="lsla", attn_kwargs=knobs).to(DEVICE)  # fmt: skip


def test_every_lsla_knob_combination_trains_in_bf16():
    """45 distinct models, each with every table away from its init."""
    for knobs in KNOBS:
        torch.manual_seed(3)
        model = tiny_lsla(knobs)
        with torch.no_grad():  # tables away from their init (B_o = 0 would hide a wrong outer-bias cast)
            for name, p in model.named_parameters():
                if name.endswith(("bias_table", "_gain")):
                    p.normal_(0, 0.1)
        x, y = inputs(model)
        loss32, grads32 = step(model, x, y, None)
        assert_close_to_fp32(knobs, *step(model, x, y, "bf16"), loss32, grads32)


def compile_and_check(model, x, y):
    """Compiled (fullgraph) training step under bf16 autocast, the GPU default, and compiled fp32 inference.

    ``fullgraph=True`` makes any graph break an error. Training values are not compared with eager's
    (the decomposed dropout draws other masks; the bf16 test above checks the numbers); inference is
    deterministic and must match eager.
    """
    compiled = torch.compile(model, backend=COMPILE_BACKEND, fullgraph=True)
    model.train()
    model.zero_grad(set_to_none=True)
    with autocast("bf16"):
        loss = train_loss(compiled, x, y)
    loss.backward()
    assert torch.isfinite(loss)
    for name, g in gradients(model).items():
        assert g is not None and torch.isfinite(g).all(), name
    model.eval()
    with torch.no_grad():
        for got, want in zip(exits(compiled(x)), exits(model(x))):
            torch.testing.assert_close(got, want, **COMPILED_TOLERANCE)
    return compiled


# Shallower than the registered nano models (the same code paths: two blocks give a shifted one), so
# that tracing forward and backward of each family takes seconds.
SHALLOW = {"msa": dict(depth=2), "lsla": dict(depths=(2, 2, 1, 1)), "hier_msa": dict(depths=(2, 2, 1, 1)),
           "castling": dict(depth=2), "castling_window": dict(depths=(2, 2, 1, 1)), "dvt_vit": dict(depth=2),
           "dvt_lsla": dict(depth=2), "dvt_castling": dict(depth=2)}  # fmt: skip


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_step_and_inference_compile_without_graph_breaks(family):
    """One graph for forward + backward and one for inference; Castling's deployed form compiles whole too.

    Stochastic depth is on wherever the model has it, so its random ops are traced as well.
    """
    torch.manual_seed(0)
    build = FAMILIES[family]
    model = build.__wrapped__(**SHALLOW[family]) if family in SHALLOW else build()
    for m in model.modules():
        if type(m).__name__ == "DropPath":
            m.drop_prob = 0.1
    x, y = inputs(model, batch=2)
    compiled = compile_and_check(model, x, y)
    if "castling" in family:
        model.switch_to_inference().eval()
        with torch.no_grad():
            for got, want in zip(exits(compiled(x)), exits(model(x))):
                torch.testing.assert_close(got, want, **COMPILED_TOLERANCE)


@pytest.mark.parametrize("knobs", [KNOBS[0], KNOBS[6], KNOBS[8], KNOBS[13], KNOBS[-1]],
                         ids=lambda k: "-".join(str(v) for v in k.values()))
def test_lsla_knobs_compile_without_graph_breaks(knobs):
    torch.manual_seed(0)
    model = tiny_lsla(knobs)
    compile_and_check(model, *inputs(model))
