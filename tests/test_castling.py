"""Castling-ViT: linear-angular attention against an explicit quadratic reference, the vanishing
softmax branch, the mask regulariser, the switch, linear cost and export."""

import math
from collections import Counter

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.models.counting import count_macs
from pipeline.models.layers.castling import (
    CastlingAttention,
    WindowCastlingAttention,
    branch_scale_at,
    castling_modules,
    inference_form,
    mask_densities,
    mask_reg_weight,
    mask_regularization,
    open_branches,
    set_branch_scale,
    switch_to_inference,
)
from pipeline.models.vit import VisionTransformer

@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than a pool, and a pool's spinning threads slow to a
    crawl when the machine is shared (measured here: 130 s instead of 6 s for the regulariser test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- independent references


def conv_matrix(weight, grid, num_prefix, mode):
    """The depthwise conv (weight (heads, k) or (heads, k, k)) as a dense (heads, N, N) matrix M.

    out_i = Σ_j M[i, j] v_j. Mode ``"none"`` (weight None): no conv, M = 0."""
    H, W = grid
    N = num_prefix + H * W
    if mode == "none":
        return torch.zeros(1, N, N)
    heads, k = weight.shape[0], weight.shape[1]
    c = k // 2
    M = torch.zeros(heads, N, N)
    if mode == "tokens":  # slide along the whole sequence, prefix tokens included
        for i in range(N):
            for j in range(max(0, i - c), min(N, i + c + 1)):
                M[:, i, j] = weight[:, j - i + c]
        return M
    for p in range(num_prefix):  # a prefix token is its own only neighbour
        M[:, p, p] = weight[:, c, c]
    for r in range(H):
        for s in range(W):
            for dr in range(-c, c + 1):
                for ds in range(-c, c + 1):
                    if 0 <= r + dr < H and 0 <= s + ds < W:
                        M[:, num_prefix + r * W + s, num_prefix + (r + dr) * W + s + ds] = weight[:, dr + c, ds + c]
    return M


def reference_castling(attn, x, grid, num_prefix, branch, same=None):
    """Castling attention in its quadratic form, from the module's weights.

    A = 0.5 I + (1/pi) q̂ k̂ᵀ (restricted to ``same`` when given), Y = A v (+ Sparse v), Y/||Y||,
    + conv(v) (restricted to ``same``), heads merged, projected; the branch is ``g_h Sparse v`` with
    ``g_h = max(a_h, 0) s``. Also returns the gate penalty mean_h g_h m_h (m_h: each row's mass that
    the threshold keeps, averaged) and the gated mask's density.
    """
    B, N, C = x.shape
    h = attn.num_heads
    d = C // h
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=-1)
    q, k, v = (t.view(B, N, h, d).transpose(1, 2) for t in (q, k, v))
    qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    A = 0.5 * torch.eye(N) + qn @ kn.transpose(-2, -1) / math.pi
    conv = conv_matrix(attn.dwconv_weight, grid, num_prefix, attn.dwconv_mode)
    logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    if same is not None:
        A, conv = A * same, conv * same
        logits = logits.masked_fill(~same, float("-inf"))
    y = A @ v
    stats = None
    if branch:
        P = logits.softmax(-1)
        sparse = P * (P > attn.mask_eps)
        gate = attn.branch_gate.detach().clamp(min=0) * attn.branch_scale
        y = y + gate.view(h, 1, 1) * (sparse @ v)
        kept = sparse.sum(-1).mean(dim=(0, 2))  # per head
        share = (P > attn.mask_eps).float().mean(dim=(0, 2, 3))
        stats = (gate * kept).mean(), (share * (gate > 0)).mean()
    y = y / y.norm(dim=-1, keepdim=True) + conv @ v
    return y.transpose(1, 2).reshape(B, N, C) @ attn.proj.weight.T + attn.proj.bias, stats


def swin_region_ids(H, W, window, shift):
    """Swin's shifted-window regions, partitioned into (num_windows, window*window) ids."""
    img = torch.zeros(H, W, dtype=torch.long)
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for n, (hs, ws) in enumerate((hs, ws) for hs in cuts for ws in cuts):
        img[hs, ws] = n
    return img.view(H // window, window, W // window, window).permute(0, 2, 1, 3).reshape(-1, window * window)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops a forward dispatches, by name."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def attention_ops(self):
        return sum(n for name, n in self.counts.items() if "softmax" in name or "scaled_dot_product" in name)


def randomize(module, seed=0):
    """Non-trivial weights everywhere (biases included), reproducibly; branch gates open but not at 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("branch_gate"):
                p.copy_(torch.rand(p.shape, generator=g) * 0.7 + 0.3)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return module


# ---------------------------------------------------------------- the attention against its quadratic form


@pytest.mark.parametrize("dwconv, kernel", [("tokens", 9), ("tokens", 3), ("grid", 3), ("none", 3)])
@pytest.mark.parametrize("branch", [True, False])
@pytest.mark.parametrize("grad", [True, False], ids=["autograd", "in-place"])
def test_right_to_left_equals_quadratic_reference(dwconv, kernel, branch, grad):
    grid = (3, 4)
    attn = randomize(
        CastlingAttention(24, 2, grid_size=grid, num_prefix_tokens=1, mask_eps=0.1, dwconv=dwconv, dwconv_kernel=kernel)
    )
    if not branch:
        switch_to_inference(attn)
    x = torch.randn(3, 13, 24)
    with torch.set_grad_enabled(grad):  # without autograd the core runs in place in the q, k, v buffer
        out, logits = attn(x)
    expected, stats = reference_castling(attn, x, grid, 1, branch)
    assert logits is None
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    if branch:  # the recorded statistics are those of the reference, and the mask is partly populated
        torch.testing.assert_close(attn.last_penalty, stats[0])
        torch.testing.assert_close(attn.last_mask_density, stats[1])
        assert 0.05 < float(stats[1]) < 0.95


@pytest.mark.parametrize("dwconv", ["grid", "tokens", "none"])
@pytest.mark.parametrize("branch", [True, False])
def test_window_region_restriction_equals_masked_reference(dwconv, branch):
    window, B = 4, 2
    region_ids = swin_region_ids(8, 8, window, shift=2)  # 4 windows, up to 4 regions each
    attn = randomize(WindowCastlingAttention(16, 2, window_size=window, mask_eps=0.05, dwconv=dwconv), seed=1)
    if not branch:
        switch_to_inference(attn)
    x = torch.randn(B * 4, 16, 16)
    out = attn(x, region_ids)
    same = (region_ids[:, :, None] == region_ids[:, None, :]).repeat(B, 1, 1).unsqueeze(1)  # (B*nW, 1, N, N)
    expected, stats = reference_castling(attn, x, (window, window), 0, branch, same=same)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    if branch:
        torch.testing.assert_close(attn.last_penalty, stats[0].to(attn.last_penalty))
    # and behaviourally: changing one region's tokens leaves every other region's outputs as they were
    last_window = region_ids[-1]
    moved = last_window == last_window.max()
    x2 = x.clone()
    x2[3][moved] += torch.randn(int(moved.sum()), 16)
    out2 = attn(x2, region_ids)
    torch.testing.assert_close(out2[3][~moved], out[3][~moved], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out2[3][moved], out[3][moved])


def test_window_without_regions_equals_global_attention_on_the_same_grid():
    window = WindowCastlingAttention(16, 2, window_size=(3, 4), dwconv="grid", dwconv_kernel=3)
    glob = CastlingAttention(16, 2, grid_size=(3, 4), num_prefix_tokens=0, dwconv="grid", dwconv_kernel=3)
    glob.load_state_dict(randomize(window).state_dict())
    x = torch.randn(2, 12, 16)
    torch.testing.assert_close(window(x), glob(x)[0])
    one_region = torch.zeros(1, 12, dtype=torch.long)
    torch.testing.assert_close(window(x, one_region), glob(x)[0])


def test_output_is_unit_norm_per_head_before_the_conv():
    attn = randomize(CastlingAttention(24, 3, grid_size=(2, 2)))
    with torch.no_grad():
        attn.dwconv_weight.zero_()
        attn.proj.weight.copy_(torch.eye(24))
        attn.proj.bias.zero_()
    out, _ = attn(torch.randn(2, 5, 24))
    torch.testing.assert_close(out.view(2, 5, 3, 8).norm(dim=-1), torch.ones(2, 5, 3))


@pytest.mark.parametrize("dwconv, kernel", [("tokens", 9), ("tokens", 5), ("grid", 3)])
def test_conv_receptive_field_is_the_kernel(dwconv, kernel):
    """With q = k = 0 the attention is token-local, so token i's output depends on exactly its conv field."""
    H, W = 5, 6
    attn = CastlingAttention(16, 2, grid_size=(H, W), dwconv=dwconv, dwconv_kernel=kernel, sparse_branch=False)
    randomize(attn)
    with torch.no_grad():
        attn.qkv.weight[:32].zero_()
        attn.qkv.bias[:32].zero_()
    N, c = 1 + H * W, kernel // 2
    x = torch.randn(1, N, 16, requires_grad=True)
    out, _ = attn(x)
    for i in [0, 1, 8, 17, N - 1]:
        (grad,) = torch.autograd.grad(out[0, i].sum(), x, retain_graph=True)
        seen = set(grad[0].abs().sum(-1).nonzero().flatten().tolist())
        if dwconv == "tokens":
            expected = set(range(max(0, i - c), min(N, i + c + 1)))
        elif i == 0:
            expected = {0}  # the class token has no grid neighbours
        else:
            r, s = divmod(i - 1, W)
            expected = {1 + rr * W + ss for rr in range(r - c, r + c + 1) for ss in range(s - c, s + c + 1)
                        if 0 <= rr < H and 0 <= ss < W}
        assert seen == expected, (i, sorted(seen))


# ---------------------------------------------------------------- the branch and the switch


def test_with_eps_at_least_one_training_and_inference_forms_agree():
    torch.manual_seed(0)
    model = timm.create_model("castling_vit_nano", num_classes=10, depth=2, attn_kwargs={"mask_eps": 1.0})
    x = torch.randn(2, 3, 32, 32)
    trained = model(x)
    assert mask_densities(model) == {"blocks.0.attn": 0.0, "blocks.1.attn": 0.0}
    inference = model.switch_to_inference()(x)
    torch.testing.assert_close(trained, inference, rtol=0, atol=0)
    # with eps in (0, 1) the branch does change the output: the comparison above can fail
    model2 = timm.create_model("castling_vit_nano", num_classes=10, depth=2, img_size=16)
    x2 = torch.randn(2, 3, 16, 16)
    assert not torch.allclose(model2(x2), model2.switch_to_inference()(x2))


def test_training_forward_has_one_softmax_per_block_inference_none():
    model = timm.create_model("castling_vit_nano", num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    with OpCounter() as ops:
        model(x)
    assert ops.counts["_softmax"] == ops.attention_ops() == len(model.blocks) == 6
    model.switch_to_inference()
    for mode in (model.train, model.eval):
        mode()
        with OpCounter() as ops:
            model(x)
        assert ops.attention_ops() == 0, ops.counts
    # the counter does see fused attention: the softmax twin dispatches one attention op per block
    with OpCounter() as ops:
        timm.create_model("vit_msa_nano", num_classes=10).eval()(x)
    assert ops.attention_ops() == 6


def test_switch_keeps_the_state_dict_and_the_interface():
    model = timm.create_model("castling_vit_nano", num_classes=10, depth=2)
    model(torch.randn(2, 3, 32, 32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert switch_to_inference(model) is model
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(not m.sparse_branch for _, m in castling_modules(model))
    assert float(mask_regularization(model)) == 0.0 and mask_densities(model) == {}
    # a fresh training-form model loads the switched model's weights as they are
    timm.create_model("castling_vit_nano", num_classes=10, depth=2).load_state_dict(after)
    attn = model.blocks[0].attn
    assert not attn.has_logits
    x = torch.randn(1, 65, 128)
    with pytest.raises(ValueError, match="logits"):
        attn(x, return_logits=True)
    with pytest.raises(ValueError, match="attn_bias"):
        attn(x, attn_bias=torch.zeros(1, 4, 65, 65))


def test_bad_input_is_named():
    attn = CastlingAttention(16, 2, grid_size=(2, 2))
    with pytest.raises(ValueError, match=r"\(B, 5, 16\)"):
        attn(torch.randn(1, 4, 16))
    with pytest.raises(ValueError, match="odd"):
        CastlingAttention(16, 2, grid_size=(2, 2), dwconv_kernel=4)
    with pytest.raises(ValueError, match="dwconv"):
        CastlingAttention(16, 2, grid_size=(2, 2), dwconv="3d")
    with pytest.raises(ValueError, match="num_heads"):
        CastlingAttention(16, 3, grid_size=(2, 2))
    window = WindowCastlingAttention(16, 2, window_size=2)
    with pytest.raises(ValueError, match="region_ids"):
        window(torch.randn(4, 4, 16), torch.zeros(3, 4, dtype=torch.long))


# ---------------------------------------------------------------- the mask regulariser


def test_mask_reg_weight_schedules():
    assert mask_reg_weight(2.0, "constant", 0.9) == 2.0
    assert mask_reg_weight(2.0, "linear", 0.0, ramp_share=0.5) == 0.0
    assert mask_reg_weight(2.0, "linear", 0.25, ramp_share=0.5) == pytest.approx(1.0)
    assert mask_reg_weight(2.0, "linear", 0.8, ramp_share=0.5) == 2.0
    with pytest.raises(ValueError, match="schedule"):
        mask_reg_weight(1.0, "cosine", 0.5)
    with pytest.raises(ValueError, match="ramp_share"):
        mask_reg_weight(1.0, "linear", 0.5, ramp_share=0.0)


def test_mask_regularization_is_the_sum_of_gate_penalties_and_acts_on_the_gates_only():
    torch.manual_seed(0)
    model = timm.create_model("castling_vit_nano", num_classes=10, depth=3, img_size=16)
    model(torch.randn(2, 3, 16, 16))
    reg = mask_regularization(model)
    torch.testing.assert_close(reg, sum(m.last_penalty for _, m in castling_modules(model)))
    assert reg > 0
    reg.backward()
    for _, m in castling_modules(model):
        assert (m.branch_gate.grad > 0).all()  # every head's gate is pushed down
        assert m.qkv.weight.grad is None  # the penalty does not flatten q kᵀ: it closes the gate
    densities = mask_densities(model)
    assert densities.keys() == {f"blocks.{i}.attn" for i in range(3)}
    model.eval()  # evaluation forwards leave the training statistics as they were
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16) * 5)
    assert mask_regularization(model).item() == reg.item() and mask_densities(model) == densities


@pytest.mark.parametrize("window", [4, 7])
def test_gate_gradient_is_not_zero_with_a_full_mask_at_16_and_49_tokens(window):
    """Below 1/eps = 50 tokens no row of P can be emptied, and mean(Sparse) = 1/n is constant when the mask
    is full; the gate's penalty still has a gradient there, the largest it can have."""
    torch.manual_seed(0)
    attn = WindowCastlingAttention(32, 2, window_size=window)
    with torch.no_grad():
        attn.qkv.weight.mul_(0.01)  # q kᵀ ~ 0: P ~ uniform 1/n > eps, every entry on
    attn(torch.randn(8, window * window, 32))
    assert attn.last_mask_density == 1.0
    (grad,) = torch.autograd.grad(attn.last_penalty, attn.branch_gate)
    torch.testing.assert_close(grad, torch.full((2,), 0.5))  # d/dg_h of mean_h g_h m_h with m_h = 1


def test_a_closed_gate_removes_the_branch_exactly_and_stays_closed():
    torch.manual_seed(0)
    model = timm.create_model("castling_vit_nano", num_classes=10, depth=2, img_size=16, attn_kwargs={"mask_eps": 0.001})
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        for _, m in castling_modules(model):
            m.branch_gate.fill_(-0.1)
    closed = model(x)
    assert mask_densities(model) == {"blocks.0.attn": 0.0, "blocks.1.attn": 0.0}
    mask_regularization(model).backward()
    assert all(float(m.branch_gate.grad.abs().sum()) == 0.0 for _, m in castling_modules(model))  # no way back
    deployed = timm.create_model("castling_vit_nano", num_classes=10, depth=2, img_size=16).switch_to_inference()
    deployed.load_state_dict(model.state_dict())  # the same state dict loads into the inference form
    torch.testing.assert_close(closed, deployed(x), rtol=0, atol=0)
    with torch.no_grad():  # and an open gate does change the output
        for _, m in castling_modules(model):
            m.branch_gate.fill_(1.0)
    assert not torch.allclose(model(x), closed)


def test_branch_scale_schedule_and_its_buffer():
    assert branch_scale_at(0.0, 0.75) == 1.0
    assert branch_scale_at(0.375, 0.75) == pytest.approx(0.5)
    assert branch_scale_at(0.75, 0.75) == 0.0 and branch_scale_at(0.9, 0.75) == 0.0
    assert branch_scale_at(0.9, None) == 1.0
    with pytest.raises(ValueError, match="branch_off_at"):
        branch_scale_at(0.5, 0.0)
    model = timm.create_model("castling_vit_nano", num_classes=10, depth=2, img_size=16)
    set_branch_scale(model, 0.25)
    state = model.state_dict()
    assert state["blocks.1.attn.branch_scale"].item() == 0.25  # saved: a loaded model knows where the schedule was
    for _, m in castling_modules(model):
        torch.testing.assert_close(m.gate(), torch.full((4,), 0.25))


def test_inference_form_context_and_the_warning_on_an_open_switch():
    torch.manual_seed(0)
    model = timm.create_model("castling_vit_nano", num_classes=10, depth=2, img_size=16)
    x = torch.randn(2, 3, 16, 16)
    model(x)  # a training forward: the gated masks are populated
    assert set(open_branches(model)) == {"blocks.0.attn", "blocks.1.attn"}
    with inference_form(model):
        deployed = model(x)
        assert not any(m.sparse_branch for _, m in castling_modules(model))
    assert all(m.sparse_branch for _, m in castling_modules(model))  # restored
    with pytest.warns(UserWarning, match=r"masks not empty in 2 layer\(s\): blocks.0.attn \(density"):
        model.switch_to_inference()
    torch.testing.assert_close(model(x), deployed)
    assert open_branches(model) == {}


def _gates_after_training(strength, steps=25):
    """Mean gate and mask density of a small Castling ViT after a short optimisation with the penalty."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2,
                              num_heads=2, attn="castling")
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 1, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)
    gates = [m.branch_gate for _, m in castling_modules(model)]
    others = [p for p in model.parameters() if all(p is not q for q in gates)]
    opt = torch.optim.AdamW([{"params": others}, {"params": gates, "lr": 0.05}], lr=1e-3, weight_decay=0.0)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        (loss + mask_reg_weight(strength) * mask_regularization(model)).backward()
        opt.step()
    model(x)
    density = sum(mask_densities(model).values()) / 2
    return torch.cat([gate.detach().clamp(min=0) for gate in gates]).mean().item(), density


@pytest.mark.timeout(120)
def test_the_penalty_closes_the_gates_and_a_larger_lambda_closes_them_sooner():
    free_gate, free_density = _gates_after_training(0.0)
    mild_gate, _ = _gates_after_training(0.01)
    strong_gate, strong_density = _gates_after_training(30.0)
    assert free_density > 0.2  # 17 tokens: the threshold alone keeps the mask populated
    assert strong_gate < mild_gate < free_gate
    assert strong_gate == 0.0 and strong_density == 0.0  # every head closed


# ---------------------------------------------------------------- cost and export


def _castling_macs_formula(tokens_side, C=192, depth=12, d=64, patch=16, classes=1000, kernel=9):
    """castling_deit_tiny's MACs as the counter sees them: matmuls and convolutions."""
    N = 1 + tokens_side**2
    # qkv + proj + MLP, then k̂ᵀv and q̂(k̂ᵀv), then the depthwise conv along the tokens (kernel taps per element of v)
    per_block = 12 * N * C * C + 2 * N * C * d + kernel * N * C
    return tokens_side**2 * C * 3 * patch * patch + depth * per_block + C * classes


def test_inference_macs_per_token_are_constant_in_tokens_softmax_grows():
    per_token = {}
    for kind in ("castling_deit_tiny", "vit_msa_deit_tiny"):
        for side in (14, 28, 56):  # 196, 784, 3136 patch tokens
            with torch.device("meta"):
                model = timm.create_model(kind, img_size=16 * side).eval().switch_to_inference()
                macs = count_macs(model, torch.empty(1, 3, 16 * side, 16 * side))
            if kind.startswith("castling"):
                assert macs == _castling_macs_formula(side)
            per_token[kind, side] = macs / side**2
    castling = [per_token["castling_deit_tiny", s] for s in (14, 28, 56)]
    msa = [per_token["vit_msa_deit_tiny", s] for s in (14, 28, 56)]
    assert max(castling) / min(castling) < 1.01
    assert msa[0] < msa[1] < msa[2] and msa[2] / msa[0] > 2.5
    assert castling[0] < msa[0]
    # the training form carries the quadratic branch, which the switch removes
    with torch.device("meta"):
        model = timm.create_model("castling_deit_tiny").train()
        branch_macs = 12 * 2 * 197**2 * 192  # P = q kᵀ and Sparse v, per block
        assert count_macs(model, torch.empty(1, 3, 224, 224)) == _castling_macs_formula(14) + branch_macs


@pytest.mark.timeout(180)
def test_inference_model_exports_without_softmax():
    import onnx
    from onnx.reference import ReferenceEvaluator

    torch.manual_seed(0)
    model = timm.create_model("castling_vit_nano", num_classes=10, depth=2).switch_to_inference().eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    exported = torch.export.export(model, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert not any("softmax" in t or "scaled_dot_product" in t for t in targets)
    torch.testing.assert_close(exported.module()(x), expected)

    with torch.no_grad():  # the usual way to export; eager no-grad runs in place, a traced graph must not
        proto = torch.onnx.export(model, (x,), dynamo=True).model_proto
    ops = {n.op_type for n in proto.graph.node} | {n.op_type for f in proto.functions for n in f.node}
    assert "Softmax" not in ops and "MatMul" in ops and "Conv" in ops
    onnx.checker.check_model(proto)
    (onnx_out,) = ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(onnx_out), expected, rtol=1e-4, atol=1e-5)


def test_registered_models_build_and_run():
    x = torch.randn(2, 3, 32, 32)
    nano = timm.create_model("castling_vit_nano", num_classes=10)
    twin = timm.create_model("vit_msa_nano", num_classes=10)
    assert nano(x).shape == twin(x).shape == (2, 10)
    # Castling adds the conv and the branch's gates (one per head, unused by the inference form)
    extra = sum(m.dwconv_weight.numel() + m.branch_gate.numel() for _, m in castling_modules(nano))
    assert sum(p.numel() for p in nano.parameters()) == sum(p.numel() for p in twin.parameters()) + extra == \
        sum(p.numel() for p in twin.parameters()) + 6 * 4 * (9 + 1)
    with torch.device("meta"):
        published = {"castling_deit_tiny": 5.7e6, "castling_deit_small": 22e6, "castling_deit_base": 86e6}
        for name, count in published.items():
            assert sum(p.numel() for p in timm.create_model(name).parameters()) == pytest.approx(count, rel=0.03)


# ---------------------------------------------------------------- Castling in the hierarchical backbone


def test_window_castling_with_the_backbones_region_ids_padding_included():
    from pipeline.models.hierarchical import window_region_ids

    region_ids = window_region_ids((6, 7), (4, 4), (2, 2))  # padded to 8 x 8: a padding region as well
    attn = randomize(WindowCastlingAttention(16, 2, window_size=4, mask_eps=0.05), seed=2)
    x = torch.randn(2 * region_ids.shape[0], 16, 16)
    same = (region_ids[:, :, None] == region_ids[:, None, :]).repeat(2, 1, 1).unsqueeze(1)
    expected, _ = reference_castling(attn, x, (4, 4), 0, True, same=same)
    torch.testing.assert_close(attn(x, region_ids), expected, rtol=1e-4, atol=1e-5)


def test_castling_swin_models():
    model = timm.create_model("castling_swin_nano")
    x = torch.randn(2, 3, 32, 32)
    with OpCounter() as ops:
        model(x)
    attns = castling_modules(model)
    assert len(attns) == 8 and all(isinstance(m, WindowCastlingAttention) for _, m in attns)
    assert ops.counts["_softmax"] == 8 and len(mask_densities(model)) == 8
    mask_regularization(model).backward()
    with pytest.warns(UserWarning, match="masks not empty"):  # a fresh model's masks are populated
        model.switch_to_inference().eval()
    with OpCounter() as ops:
        assert model(x).shape == (2, 10)
    assert ops.attention_ops() == 0
    # Swin-T layout: Castling swaps each block's (2*7-1)^2 relative-bias table for a 3x3 kernel and a gate, per head
    with torch.device("meta"):
        castling, msa = timm.create_model("castling_swin_t"), timm.create_model("hier_msa_swin_t")
    heads = 2 * 3 + 2 * 6 + 6 * 12 + 2 * 24
    assert sum(p.numel() for p in msa.parameters()) - sum(p.numel() for p in castling.parameters()) == heads * (169 - 9 - 1)


@pytest.mark.parametrize("name", ["castling_vit_nano", "castling_swin_nano"])
def test_ablation_forms_without_the_conv_and_without_the_branch(name):
    """The paper's ablations: ``dwconv="none"`` drops exactly the conv's weights; ``sparse_branch=False`` trains
    with no softmax at all and leaves no trained parameter without a gradient (DDP's requirement)."""
    x = torch.randn(2, 3, 32, 32)
    full = timm.create_model(name)
    no_conv = timm.create_model(name, attn_kwargs={"dwconv": "none"})
    conv_weights = sum(m.dwconv_weight.numel() for _, m in castling_modules(full))
    assert conv_weights > 0 and all(m.dwconv_weight is None for _, m in castling_modules(no_conv))
    assert sum(p.numel() for p in full.parameters()) - sum(p.numel() for p in no_conv.parameters()) == conv_weights

    for kwargs in ({"sparse_branch": False}, {"sparse_branch": False, "dwconv": "none"}):
        model = timm.create_model(name, attn_kwargs=kwargs).train()
        with OpCounter() as ops:
            loss = model(x).logsumexp(-1).mean()
        assert ops.attention_ops() == 0 and not mask_densities(model)
        loss.backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        assert not any(m.branch_gate.requires_grad for _, m in castling_modules(model))
