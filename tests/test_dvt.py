"""DVT cascade: tokenizers, reuse paths against explicit references, dynamic inference, costs vs the papers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.eval.dvt_budget import assign_exits
from pipeline.models.counting import count_macs, count_params
from pipeline.models.dvt import (
    CascadeLoss,
    DynamicVisionTransformer,
    PatchTokenizer,
    cascade_loss,
    patch_tokenizer_geometry,
)
from pipeline.models.layers.reuse import FeatureReuse, RelationReuse, resize_grid
from pipeline.models.layers.t2t import T2TTokenizer, TokenPerformer, sinusoid_position_embedding

TINY = dict(img_size=32, in_chans=1, num_classes=5, grids=(2, 3, 4), embed_dim=32, depth=2, num_heads=2,
            mlp_ratio=2.0)


def tiny_cascade(**overrides) -> DynamicVisionTransformer:
    torch.manual_seed(0)
    return DynamicVisionTransformer(**{**TINY, **overrides}).eval()


# ---- independent references -------------------------------------------------------------------------------

def resize_matrix_1d(src: int, dst: int) -> np.ndarray:
    """(dst, src) matrix of "nearest upsample by ceil(dst/src), then adaptive average pool to dst", from the
    definitions: upsampled cell u comes from source floor(u / f); pooled cell i averages cells
    floor(i * U / dst) .. ceil((i + 1) * U / dst) - 1."""
    f = max(1, math.ceil(dst / src))
    up = src * f
    m = np.zeros((dst, src))
    for i in range(dst):
        lo, hi = (i * up) // dst, -((-(i + 1) * up) // dst)
        for u in range(lo, hi):
            m[i, u // f] += 1.0 / (hi - lo)
    return m


def resize_matrix(src: int, dst: int) -> torch.Tensor:
    """Flattened-grid resize (dst*dst, src*src): separable over rows and columns, so a Kronecker product."""
    r = resize_matrix_1d(src, dst)
    return torch.tensor(np.kron(r, r), dtype=torch.float32)


def explicit_feature_reuse(module: FeatureReuse, tokens: torch.Tensor, src: int, dst: int) -> torch.Tensor:
    h = F.layer_norm(tokens, (tokens.shape[-1],), module.norm.weight, module.norm.bias, module.norm.eps)
    h = F.gelu(h @ module.mlp.fc1.weight.T + module.mlp.fc1.bias) @ module.mlp.fc2.weight.T + module.mlp.fc2.bias
    patches = resize_matrix(src, dst) @ h[:, 1:]  # (B, dst^2, 48)
    return torch.cat([torch.zeros_like(h[:, :1]), patches], dim=1)


def explicit_relation_reuse(module: RelationReuse, logits: list[torch.Tensor], src: int, dst: int):
    x = torch.cat(logits, dim=1)  # (B, L*H, n, n)
    fc1, fc2 = module.mlp.fc1, module.mlp.fc2  # the official 1x1 convolutions, as matrices
    h = F.gelu(torch.einsum("oc,bcij->boij", fc1.weight, x) + fc1.bias[:, None, None])
    h = torch.einsum("oc,bcij->boij", fc2.weight, h) + fc2.bias[:, None, None]
    r = resize_matrix(src, dst)
    n_dst = 1 + dst * dst
    out = h.new_zeros(*h.shape[:2], n_dst, n_dst)
    out[..., 0, 0] = h[..., 0, 0]
    out[..., 0, 1:] = h[..., 0, 1:] @ r.T  # class row: keys resized
    out[..., 1:, 0] = h[..., 1:, 0] @ r.T  # class column: queries resized
    out[..., 1:, 1:] = r @ h[..., 1:, 1:] @ r.T
    return list(out.split(module.num_heads, dim=1))


# ---- tokenizers -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid, maps", [(7, (28, 14)), (10, (38, 19)), (14, (56, 28))])
def test_t2t_official_grids_at_224(grid, maps):
    tok = T2TTokenizer(224, embed_dim=24, token_dim=8, grid=grid).eval()
    assert tok.flavour == "performer"
    assert tok.map_sizes == ((maps[0],) * 2, (maps[1],) * 2) and tok.grid_size == (grid, grid)
    out = tok(torch.randn(2, 3, 224, 224))
    assert out.shape == (2, grid * grid, 24) and torch.isfinite(out).all()


def test_t2t_rejects_unknown_grid_and_wrong_image():
    with pytest.raises(ValueError, match="grids"):
        T2TTokenizer(224, grid=12)
    with pytest.raises(ValueError, match="flavour"):
        T2TTokenizer(224, grid=7, flavour="linformer")
    tok = T2TTokenizer(224, embed_dim=16, token_dim=8, grid=7)
    with pytest.raises(ValueError, match="224"):
        tok(torch.randn(1, 3, 112, 112))


def test_performer_linear_form_equals_quadratic_kernel_attention():
    torch.manual_seed(0)
    layer = TokenPerformer(dim=20, out_dim=16).eval()
    x = torch.randn(2, 30, 20)
    k, q, v = layer.kqv(x).split(16, dim=-1)

    def phi(t):  # exp(w t - |t|^2 / 2) / sqrt(m), m = 8
        return torch.exp(t @ layer.w.T - (t * t).sum(-1, keepdim=True) / 2) / math.sqrt(8)

    kernel = phi(q) @ phi(k).transpose(1, 2)  # (B, T, T): the quadratic form the layer avoids
    y = kernel @ v / (kernel.sum(-1, keepdim=True) + layer.eps)
    expected = v + layer.proj(y)
    torch.testing.assert_close(layer.attention(x), expected, rtol=1e-4, atol=1e-5)
    assert layer.w.shape == (8, 16) and not layer.w.requires_grad
    torch.testing.assert_close(layer.w @ layer.w.T, 8 * torch.eye(8), atol=1e-4, rtol=0)  # orthogonal, scaled


def test_sinusoid_table_matches_the_t2t_formula():
    n, d = 11, 10
    expected = np.array([[pos / np.power(10000, 2 * (j // 2) / d) for j in range(d)] for pos in range(n)])
    expected[:, 0::2], expected[:, 1::2] = np.sin(expected[:, 0::2]), np.cos(expected[:, 1::2])
    torch.testing.assert_close(sinusoid_position_embedding(n, d)[0], torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("img, grid, kernel, padding",
                         [(224, 7, 32, 0), (224, 10, 23, 3), (224, 14, 16, 0), (32, 4, 8, 0), (32, 6, 6, 2)])
def test_patch_tokenizer_geometry(img, grid, kernel, padding):
    assert patch_tokenizer_geometry(img, grid) == (kernel, padding)  # 224: the official DeiT tokenizers
    tok = PatchTokenizer(img, grid, in_chans=3, embed_dim=8)
    assert tok(torch.randn(1, 3, img, img)).shape == (1, grid * grid, 8)


# ---- reuse modules against explicit references ------------------------------------------------------------

@pytest.mark.parametrize("src, dst", [(7, 10), (10, 14), (2, 3), (4, 8), (3, 3), (4, 6), (6, 8)])
def test_resize_grid_matches_reference_and_the_official_pooling(src, dst):
    x = torch.randn(5, src * src)
    torch.testing.assert_close(resize_grid(x, (src, src), (dst, dst)), x @ resize_matrix(src, dst).T)
    up = src * math.ceil(dst / src)  # the official ops: nearest upsample, then adaptive average pooling
    official = F.adaptive_avg_pool2d(F.interpolate(x.view(5, 1, src, src), size=(up, up), mode="nearest"), dst)
    torch.testing.assert_close(resize_grid(x, (src, src), (dst, dst)), official.flatten(1))
    tokens_on_axis_1 = torch.randn(2, src * src, 3)  # any axis
    torch.testing.assert_close(resize_grid(tokens_on_axis_1, (src, src), (dst, dst), axis=1),
                               (tokens_on_axis_1.transpose(1, 2) @ resize_matrix(src, dst).T).transpose(1, 2))


def test_feature_reuse_matches_reference():
    torch.manual_seed(0)
    module = FeatureReuse(dim=24, src_grid=7, dst_grid=10).eval()
    tokens = torch.randn(3, 50, 24)
    out = module(tokens)
    assert out.shape == (3, 101, 48)
    assert (out[:, 0] == 0).all()
    torch.testing.assert_close(out, explicit_feature_reuse(module, tokens, 7, 10), rtol=1e-4, atol=1e-5)


def test_relation_reuse_shapes_and_values_class_row_and_column_passed_through():
    torch.manual_seed(0)
    heads, depth = 2, 3
    module = RelationReuse(heads, depth, src_grid=7, dst_grid=10).eval()
    logits = [torch.randn(2, heads, 50, 50) for _ in range(depth)]
    out = module(logits)
    assert len(out) == depth and all(o.shape == (2, heads, 101, 101) for o in out)
    expected = explicit_relation_reuse(module, logits, 7, 10)
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    # with the channel MLP taken out, the class-class entry is passed through untouched, and the class
    # row/column are resized along the other axis only
    module.mlp = torch.nn.Identity()
    raw = module(logits)[1]
    torch.testing.assert_close(raw[..., 0, 0], logits[1][..., 0, 0])
    torch.testing.assert_close(raw[..., 0, 1:], logits[1][..., 0, 1:] @ resize_matrix(7, 10).T)
    torch.testing.assert_close(raw[..., 1:, 0], logits[1][..., 1:, 0] @ resize_matrix(7, 10).T)
    with pytest.raises(ValueError, match="3 blocks"):
        module(logits[:2])


# ---- the cascade ------------------------------------------------------------------------------------------

def test_token_counts_per_exit():
    model = tiny_cascade()
    x = torch.randn(2, 1, 32, 32)
    assert [tuple(e.embed_tokens(x).shape) for e in model.exits] == [(2, 1 + g * g, 32) for g in (2, 3, 4)]
    feats = model.forward_features(x)
    assert [f.shape[1] for f in feats] == [5, 10, 17]
    outs = model(x)
    assert len(outs) == 3 and all(o.shape == (2, 5) for o in outs)


@pytest.mark.parametrize("tokenizer", ["patch", "t2t"])
def test_without_reuse_each_exit_is_a_standalone_model(tokenizer):
    kwargs = dict(img_size=224, grids=(7, 10, 14), tokenizer=tokenizer, in_chans=3, t2t_token_dim=8,
                  embed_dim=16, depth=1, num_heads=2)
    if tokenizer == "t2t":
        kwargs.update(pos_embed="sinusoid", qkv_bias=False)
    model = tiny_cascade(feature_reuse=False, relation_reuse=False, **kwargs)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        outs = model(x)
        for k in range(3):
            alone = model.standalone_exit(k).eval()
            alone.load_state_dict(model.exits[k].state_dict())
            assert alone.grid_size == (model.grids[k],) * 2
            torch.testing.assert_close(outs[k], alone(x), rtol=1e-5, atol=1e-5)
    assert model.feature_reuse is None and model.relation_reuse is None


def test_cascade_wiring_matches_explicit_reuse():
    """Every exit's logits recomputed block by block, with the reuse inputs built by the references above."""
    model = tiny_cascade()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        outs = model(x)
        prev_tokens, prev_logits = None, None
        for k, exit_ in enumerate(model.exits):
            tokens = exit_.embed_tokens(x)
            logits = []
            for layer, block in enumerate(exit_.blocks):
                bias = context = None
                if k > 0:
                    src, dst = model.grids[k - 1], model.grids[k]
                    context = explicit_feature_reuse(model.feature_reuse[k - 1][layer], prev_tokens, src, dst)
                    bias = explicit_relation_reuse(model.relation_reuse[k - 1], prev_logits, src, dst)[layer]
                tokens, block_logits = block(tokens, attn_bias=bias, context=context, return_logits=True)
                logits.append(block_logits)
            torch.testing.assert_close(outs[k], exit_.head(exit_.norm(tokens)[:, 0]), rtol=1e-4, atol=1e-5)
            prev_tokens, prev_logits = tokens, logits
    # the reuse really is used: switching it off changes the later exits but not the first
    plain = tiny_cascade(feature_reuse=False, relation_reuse=False)
    with torch.no_grad():
        torch.testing.assert_close(plain(x)[0], outs[0])
        assert not torch.allclose(plain(x)[2], outs[2], atol=1e-3)


@pytest.mark.parametrize("feature_reuse, relation_reuse", [(True, False), (False, True)])
def test_each_reuse_path_alone_carries_gradient_to_the_previous_exit(feature_reuse, relation_reuse):
    model = tiny_cascade(feature_reuse=feature_reuse, relation_reuse=relation_reuse).train()
    x = torch.randn(4, 1, 32, 32)
    model(x)[-1].square().sum().backward()  # a loss on the last exit only
    first_exit_grad = model.exits[0].blocks[0].attn.qkv.weight.grad
    assert first_exit_grad is not None and first_exit_grad.abs().sum() > 0
    assert (model.feature_reuse is not None) == feature_reuse and (model.relation_reuse is not None) == relation_reuse


def test_castling_cascade_refuses_relationship_reuse():
    with pytest.raises(ValueError, match="relation_reuse=False"):
        tiny_cascade(attn="castling", relation_reuse=True)
    model = timm.create_model("dvt_castling_nano", num_classes=10, in_chans=1, depth=2).eval()
    assert model.reuse_features and not model.reuse_relations
    x = torch.randn(2, 1, 32, 32)
    model.switch_to_inference()
    assert all(o.shape == (2, 10) for o in model(x))


def test_switch_to_inference_refuses_when_logits_disappear():
    model = tiny_cascade()
    model.exits[1].blocks[0].attn.has_logits = False  # what an attention kind without an inference softmax reports
    with pytest.raises(RuntimeError, match="relation_reuse=False"):
        model.switch_to_inference()


def test_bad_configurations_are_refused():
    with pytest.raises(ValueError, match="coarse to fine"):
        tiny_cascade(grids=(4, 3))
    with pytest.raises(ValueError, match="tokenizer"):
        tiny_cascade(tokenizer="conv")
    with pytest.raises(ValueError, match="ExitState"):
        tiny_cascade().forward_exit(1, torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="thresholds"):
        tiny_cascade().forward_dynamic(torch.randn(1, 1, 32, 32), [0.5])


# ---- dynamic inference ------------------------------------------------------------------------------------

def _midpoint_threshold(conf: torch.Tensor, quantile: float) -> float:
    """A threshold between two neighbouring confidences, so batch-size rounding cannot flip a decision."""
    ordered = conf.sort().values
    i = int(quantile * (len(ordered) - 1))
    assert ordered[i + 1] - ordered[i] > 1e-5
    return float((ordered[i] + ordered[i + 1]) / 2)


@pytest.mark.timeout(60)
def test_dynamic_inference_equals_running_every_exit_and_selecting():
    model = tiny_cascade()
    x = torch.randn(64, 1, 32, 32)
    with torch.no_grad():
        conf, pred = torch.stack([o.softmax(-1) for o in model(x)]).max(-1)  # (K, B)
    thresholds = [_midpoint_threshold(conf[0], 0.6), _midpoint_threshold(conf[1], 0.5), float("-inf")]
    expected_exit = assign_exits(conf, thresholds)

    model.exit_macs()  # counted (on one image) before the hooks go in
    batch_sizes = {k: [] for k in range(3)}
    hooks = [e.patch_embed.register_forward_pre_hook(lambda m, a, k=k: batch_sizes[k].append(a[0].shape[0]))
             for k, e in enumerate(model.exits)]
    out = model.forward_dynamic(x, thresholds)
    for h in hooks:
        h.remove()

    torch.testing.assert_close(out.exit_index, expected_exit.long())
    torch.testing.assert_close(out.predictions, pred[expected_exit.long(), torch.arange(64)])
    counts = torch.bincount(expected_exit.long(), minlength=3).tolist()
    assert min(counts) > 0
    assert out.samples_per_exit == [64, 64 - counts[0], counts[2]]
    assert batch_sizes == {0: [64], 1: [64 - counts[0]], 2: [counts[2]]}  # later exits run on fewer samples
    assert (out.macs == torch.tensor(model.exit_macs())[out.exit_index]).all()
    with torch.no_grad():  # the answering exit's logits are those of a full run
        full = torch.stack(model(x))[out.exit_index, torch.arange(64)]
    torch.testing.assert_close(out.logits, full, rtol=1e-4, atol=1e-5)


def test_dynamic_inference_stops_early_when_everyone_is_confident():
    model = tiny_cascade()
    out = model.forward_dynamic(torch.randn(8, 1, 32, 32), [0.0, 0.0])
    assert out.samples_per_exit == [8, 0, 0] and (out.exit_index == 0).all()
    assert (out.macs == model.exit_macs()[0]).all()


# ---- losses -----------------------------------------------------------------------------------------------

def test_cascade_loss_sums_exit_cross_entropies_and_takes_soft_targets():
    torch.manual_seed(0)
    outputs = [torch.randn(6, 5) for _ in range(3)]
    target = torch.randint(0, 5, (6,))
    plain = sum(F.cross_entropy(o, target) for o in outputs)
    torch.testing.assert_close(cascade_loss(outputs, target), plain)
    weighted = 0.5 * F.cross_entropy(outputs[0], target) + 2 * F.cross_entropy(outputs[2], target)
    torch.testing.assert_close(CascadeLoss(weights=(0.5, 0.0, 2.0))(outputs, target), weighted)
    soft = F.one_hot(target, 5).float()
    torch.testing.assert_close(cascade_loss(outputs, soft), plain)
    mixed = 0.7 * soft + 0.3 * soft.roll(1, 0)
    expected = sum(-(mixed * o.log_softmax(-1)).sum(-1).mean() for o in outputs)
    torch.testing.assert_close(cascade_loss(outputs, mixed), expected)
    with pytest.raises(ValueError, match="weights"):
        cascade_loss(outputs, target, weights=(1.0,))


# ---- registry and costs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, attention", [("dvt_vit_nano", "Attention"), ("dvt_lsla_nano", "GlobalLSLA"),
                                             ("dvt_castling_nano", "CastlingAttention")])
def test_nano_models_build_through_timm(name, attention):
    model = timm.create_model(name, num_classes=10, in_chans=1, img_size=32, depth=1).eval()
    outs = model(torch.randn(2, 1, 32, 32))
    assert [o.shape for o in outs] == [(2, 10)] * 3
    assert model.grids == (4, 6, 8)
    assert {type(b.attn).__name__ for e in model.exits for b in e.blocks} == {attention}
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model(name, pretrained=True)


def _performer_macs(tokens, din, emb=64, m=32):
    return tokens * (3 * din * emb + 4 * emb * m + m + 3 * emb * emb)


def _performer_params(din, emb=64, m=32):
    return 2 * din + din * 3 * emb + 3 * emb + emb * emb + emb + 2 * emb + 2 * (emb * emb + emb) + m * emb


T2T_224 = {7: (14, 28, 14), 10: (11, 38, 19), 14: (7, 56, 28)}  # grid: first kernel, map after split 1, 2


def official_t2t_cascade(D, L, H, ratio, grids=(7, 10, 14), classes=1000, reuse=48, hidden=128):
    """Parameters and cumulative MACs of the official DVT(T2T-ViT) design, summed component by component."""
    hid = int(D * ratio)

    def block(n, c):  # macs, params (no qkv bias)
        macs = 3 * n * D * D + 2 * n * n * D + n * D * D + n * (D + c) * hid + n * hid * D
        params = 2 * D + 3 * D * D + D * D + D + 2 * (D + c) + (D + c) * hid + hid + hid * D + D
        return macs, params

    def t2t(g):
        k0, s0, s1 = T2T_224[g]
        macs = _performer_macs(s0 * s0, 3 * k0 * k0) + _performer_macs(s1 * s1, 64 * 9) + g * g * 576 * D
        params = _performer_params(3 * k0 * k0) + _performer_params(64 * 9) + 576 * D + D
        return macs, params

    total_params, cumulative, macs = 0, [], 0
    for k, g in enumerate(grids):
        n = 1 + g * g
        c = reuse if k else 0
        t_macs, t_params = t2t(g)
        b_macs, b_params = block(n, c)
        macs += t_macs + L * b_macs + D * classes
        total_params += t_params + D + n * D + L * b_params + 2 * D + D * classes + classes
        if k:
            n_prev = 1 + grids[k - 1] ** 2
            macs += L * n_prev * (D * hidden + hidden * reuse)  # feature reuse MLPs (every token of the source)
            total_params += L * (2 * D + D * hidden + hidden + hidden * reuse + reuse)
            hl = H * L
            macs += n_prev * n_prev * 6 * hl * hl  # relation MLP: 1x1 convs HL -> 3HL -> HL on the source grid
            total_params += 6 * hl * hl + 4 * hl
        cumulative.append(macs)
    return total_params, cumulative


@pytest.mark.parametrize("name, D, L, H, ratio", [("dvt_t2t_vit_12", 256, 12, 4, 2.0),
                                                  ("dvt_t2t_vit_14", 384, 14, 6, 3.0)])
def test_t2t_cascade_counts_equal_the_official_design(name, D, L, H, ratio):
    with torch.device("meta"):
        model = timm.create_model(name)
    params, cumulative = official_t2t_cascade(D, L, H, ratio)
    assert count_params(model) == params
    assert model.exit_macs() == cumulative


def test_t2t_vit_12_standalone_exits_match_the_paper():
    """The cascade's exits alone are the registered T2T-ViT-12 at the exit's grid (see the cascade test
    below for the equality of designs); their costs are the papers' figures."""
    with torch.device("meta"):
        x = torch.empty(1, 3, 224, 224)
        fine, coarse = timm.create_model("t2t_vit_12").eval(), timm.create_model("t2t_vit_12", grid=7).eval()
        exits = timm.create_model("dvt_t2t_vit_12", feature_reuse=False, relation_reuse=False).exits
    assert count_macs(fine, x) / 1e9 == pytest.approx(1.78, rel=0.015)  # DVT paper: T2T-ViT-12, 1.78 GFLOPs
    assert count_macs(coarse, x) / 1e9 == pytest.approx(0.47, rel=0.015)  # its 7x7 version, 0.47 GFLOPs
    assert count_params(fine) == pytest.approx(6.9e6, rel=0.01)  # T2T-ViT paper: 6.9M parameters
    assert count_params(fine) == count_params(exits[2]) and count_params(coarse) == count_params(exits[0])


def test_deit_small_cascade_exits_match_deit():
    with torch.device("meta"):
        model = timm.create_model("dvt_deit_small")
        deit = timm.create_model("deit_small_patch16_224")
        fine = model.standalone_exit(2).eval()
        x = torch.empty(1, 3, 224, 224)
    assert [tuple(e.patch_embed.proj.kernel_size) + tuple(e.patch_embed.proj.padding) for e in model.exits] == [
        (32, 32, 0, 0), (23, 23, 3, 3), (16, 16, 0, 0)]
    assert count_params(fine) == count_params(deit)
    assert count_macs(fine, x) == count_macs(deit.eval(), x)
    assert count_macs(fine, x) / 1e9 == pytest.approx(4.6, rel=0.01)  # DeiT paper: DeiT-S 4.6 GFLOPs
