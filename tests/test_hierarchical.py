"""The hierarchical backbone: layout, budgets, small inputs, shifted-window masks, timm integration."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import DropPath
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse

import pipeline.models  # noqa: F401  (registers the factories)
from pipeline.models.counting import count_macs, count_params
from pipeline.models.hierarchical import (
    ConvStem, HierarchicalBlock, HierarchicalViT, window_region_ids,
)  # fmt: skip

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to a busy machine's scheduling."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

FACTORIES = ["vit_lsla_tiny", "vit_lsla_swin_t", "hier_msa_swin_t", "vit_lsla_nano", "hier_msa_nano",
             "vit_lsla_micro", "hier_msa_micro"]  # fmt: skip
SMALL = [name for name in FACTORIES if name.endswith(("nano", "micro"))]


def on_meta(name: str, **kwargs):
    """A full-size model with no storage: parameters and MACs are counted from shapes alone."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **kwargs).eval()


def budget(name: str, num_classes: int = 102) -> tuple[int, int]:
    model = on_meta(name, num_classes=num_classes)
    return count_params(model), count_macs(model, torch.empty(1, 3, 224, 224, device="meta"))


def tiny(**kwargs) -> HierarchicalViT:
    defaults = dict(img_size=32, num_classes=5, embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4), window_size=4)
    return HierarchicalViT(**{**defaults, **kwargs})


def test_stage_resolutions_windows_and_shifts_at_224():
    model = on_meta("vit_lsla_tiny")
    assert model.stage_resolutions == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert [len(stage.blocks) for stage in model.layers] == [3, 2, 6, 2]
    for i, stage in enumerate(model.layers):
        assert stage.window_size == (7, 7)
        shifts = [block.shift_size for block in stage.blocks]
        # every second block shifted by half a window, except in the last stage where one window covers the map
        assert shifts == [(0, 0) if j % 2 == 0 or i == 3 else (3, 3) for j in range(len(stage.blocks))]
    assert model.num_features == 768
    out = count_macs(model, torch.empty(1, 3, 224, 224, device="meta"))  # runs through every stage on meta
    assert out > 0


def test_vit_lsla_tiny_meets_the_paper_budget():
    params, macs = budget("vit_lsla_tiny")
    assert abs(params / 18.9e6 - 1) < 0.03, params
    assert abs(macs / 3.5e9 - 1) < 0.03, macs


def test_swin_t_reference_and_twins():
    """timm's Swin-T counts as the paper says; the LSLA twin differs from the MSA twin by the LSA saving only."""
    swin_params, swin_macs = budget("swin_tiny_patch4_window7_224")
    assert abs(swin_params / 27.6e6 - 1) < 0.03 and abs(swin_macs / 4.5e9 - 1) < 0.03
    lsla_params, lsla_macs = budget("vit_lsla_swin_t")
    msa_params, msa_macs = budget("hier_msa_swin_t")
    saved, tables, saved_macs = 0, 0, 0
    for dim, depth, heads, tokens in [(96, 2, 3, 56 * 56), (192, 2, 6, 28 * 28), (384, 6, 12, 14 * 14), (768, 2, 24, 49)]:
        saved += depth * (2 * dim**2 + 2 * dim)
        tables += depth * 2 * heads * 169  # DS and B_o tables of the 7x7 window
        saved_macs += depth * tokens * 2 * dim**2  # no key or value projection
    assert msa_params - lsla_params == saved - tables
    assert msa_macs - lsla_macs == saved_macs
    assert lsla_macs < 0.9 * swin_macs


def test_small_variants_at_32_and_64_with_one_or_three_channels():
    torch.manual_seed(0)
    for name in ["vit_lsla_nano", "hier_msa_nano"]:
        for size, chans in [(32, 3), (64, 1), (28, 1)]:
            model = timm.create_model(name, num_classes=7, img_size=size, in_chans=chans)
            x = torch.randn(2, chans, size, size)
            y = model(x)
            assert y.shape == (2, 7) and torch.isfinite(y).all()
            y.sum().backward()
            assert all(p.grad is not None for p in model.parameters())
    nano = timm.create_model("vit_lsla_nano")
    assert nano.stage_resolutions == [(8, 8), (4, 4), (2, 2), (1, 1)]
    # windows clamp to small maps and stop shifting there
    assert [s.window_size for s in nano.layers] == [(4, 4), (4, 4), (2, 2), (1, 1)]
    assert [s.blocks[1].shift_size for s in nano.layers] == [(2, 2), (0, 0), (0, 0), (0, 0)]
    at64 = timm.create_model("vit_lsla_nano", img_size=64)
    assert [s.blocks[1].shift_size for s in at64.layers] == [(2, 2), (2, 2), (0, 0), (0, 0)]
    assert count_params(nano) < 1.5e6


def test_stem_computes_conv_bn_gelu_conv_layernorm():
    """Values, batch statistics and gradients are those of the functional chain, for NCHW and channels_last input."""
    F = torch.nn.functional
    torch.manual_seed(3)
    stem = ConvStem(3, 16)
    with torch.no_grad():
        stem.bn.weight.uniform_(0.5, 1.5), stem.bn.bias.uniform_(-0.5, 0.5)
        stem.norm.weight.uniform_(0.5, 1.5), stem.norm.bias.uniform_(-0.5, 0.5)
    params = {name: p.detach().clone().requires_grad_() for name, p in stem.named_parameters()}
    running = (stem.bn.running_mean.clone(), stem.bn.running_var.clone())

    def reference(x, training):
        x = F.conv2d(x, params["conv1.weight"], stride=2, padding=1)
        x = F.batch_norm(x, *running, params["bn.weight"], params["bn.bias"], training=training, momentum=0.1)
        x = F.conv2d(F.gelu(x), params["conv2.weight"], params["conv2.bias"], stride=2, padding=1)
        return F.layer_norm(x.permute(0, 2, 3, 1), (16,), params["norm.weight"], params["norm.bias"])

    x = torch.randn(2, 3, 20, 18)
    weight = torch.randn(2, 5, 5, 16)  # a loss that weighs every output differently
    out, expected = stem(x), reference(x, True)
    assert out.shape == (2, 5, 5, 16)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(stem.bn.running_mean, running[0])
    torch.testing.assert_close(stem.bn.running_var, running[1])
    (out * weight).sum().backward()
    (expected * weight).sum().backward()
    for name, p in stem.named_parameters():  # oneDNN sums in another order: float32 rounding differs
        torch.testing.assert_close(p.grad, params[name].grad, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    stem.eval()
    with torch.inference_mode():
        torch.testing.assert_close(stem(x), reference(x, False))
        channels_last = x.contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(stem(channels_last), reference(x, False), rtol=1e-5, atol=1e-5)


def test_region_ids_reproduce_swin_mask():
    """Same region <=> Swin's additive mask is 0, for timm's own shifted block."""
    for res, window, shift in [(8, 4, 2), (14, 7, 3), (12, 6, 3)]:
        swin = SwinTransformerBlock(dim=8, input_resolution=(res, res), num_heads=1, window_size=window, shift_size=shift)
        ids = window_region_ids((res, res), (window, window), (shift, shift))
        assert torch.equal(ids[:, :, None] == ids[:, None, :], swin.attn_mask == 0)
    assert window_region_ids((8, 8), (4, 4), (0, 0)) is None


def test_padding_gets_its_own_region():
    ids = window_region_ids((7, 7), (4, 4), (0, 0))  # padded to 8x8, no shift
    assert ids.shape == (4, 16)
    grid = ids.view(2, 2, 4, 4).permute(0, 2, 1, 3).reshape(8, 8)  # back to the padded map
    assert (grid[:7, :7] == 0).all() and (grid[7] == 4).all() and (grid[:, 7] == 4).all()


def test_msa_and_lsla_backbones_agree_when_lsla_reduces_to_msa():
    """Whole nano models, shifted windows included: LSLA with DS = 1/sqrt(d), B_o = 0 is MSA with K = V = I."""
    torch.manual_seed(1)
    lsla = timm.create_model("vit_lsla_nano", num_classes=4).eval()
    msa = timm.create_model("hier_msa_nano", num_classes=4).eval()
    target = msa.state_dict()
    for name, value in lsla.state_dict().items():
        if ".attn." not in name:
            target[name] = value
    for stage in range(4):
        for block in range(2):
            prefix = f"layers.{stage}.blocks.{block}.attn."
            a = lsla.layers[stage].blocks[block].attn
            with torch.no_grad():
                a.inner_bias_table.normal_()
            eye = torch.eye(a.dim)
            target[prefix + "qkv.weight"] = torch.cat([a.q.weight, eye, eye])
            target[prefix + "qkv.bias"] = torch.cat([a.q.bias, torch.zeros(2 * a.dim)])
            target[prefix + "relative_position_bias_table"] = a.inner_bias_table
            target[prefix + "proj.weight"], target[prefix + "proj.bias"] = a.proj.weight, a.proj.bias
    msa.load_state_dict(target)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(lsla(x), msa(x), rtol=1e-4, atol=1e-5)


def test_stage_sharing_ties_one_table_per_stage():
    model = tiny(attn="lsla", attn_kwargs={"bias_sharing": "stage"})
    for stage in model.layers:
        table = stage.shared_attn_params["shared_outer_bias_table"]
        assert all(block.attn.outer_bias_table is table for block in stage.blocks)
    per_block = tiny(attn="lsla")
    # one table per stage instead of one per block; counted once
    assert count_params(per_block) - count_params(model) == sum(
        (len(s.blocks) - 1) * s.blocks[0].attn.outer_bias_table.numel() for s in per_block.layers
    )
    nwd = model.no_weight_decay()
    assert "layers.0.shared_attn_params.shared_outer_bias_table" in nwd
    assert "layers.0.blocks.1.attn.outer_bias_table" in nwd and "layers.0.blocks.1.attn.scale_table" in nwd
    assert not any("qkv" in n or n.endswith("q.weight") for n in nwd)
    model.load_state_dict(model.state_dict())  # every alias of the shared table loads


def test_timm_api_for_every_factory():
    for name in FACTORIES:
        if name in SMALL:
            model = timm.create_model(name, num_classes=3, img_size=32, in_chans=1)
            x = torch.randn(2, 1, 32, 32)
        else:
            model = on_meta(name, num_classes=3, in_chans=1)
            x = torch.empty(2, 1, 224, 224, device="meta")
        cfg = model.pretrained_cfg
        assert cfg["architecture"] == name and not cfg.get("url") and model.default_cfg is cfg
        feats = model.forward_features(x)
        assert feats.shape == (2, *model.stage_resolutions[-1], model.num_features)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
        assert model(x).shape == (2, 3)
        model.reset_classifier(0)
        assert model(x).shape == (2, model.num_features)
        with pytest.raises(ValueError, match="no pretrained weights"):
            timm.create_model(name, pretrained=True)


def test_bad_input_is_named():
    model = tiny()
    with pytest.raises(ValueError, match=r"built for inputs \(B, 3, 32, 32\)"):
        model(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="unknown window attention 'softmax'"):
        tiny(attn="softmax")
    with pytest.raises(ValueError, match="one entry per stage"):
        tiny(depths=(2, 2))
    with pytest.raises(ValueError, match="LSLA: kv="):
        tiny(attn="lsla", attn_kwargs={"kv": "xx"})


def test_stochastic_depth_rises_linearly():
    model = tiny(drop_path_rate=0.5, depths=(2, 2, 1, 1))
    rates = [getattr(block.drop_path1, "drop_prob", 0.0) for stage in model.layers for block in stage.blocks]
    assert isinstance(model.layers[0].blocks[0].drop_path1, torch.nn.Identity)  # rate 0: no module at all
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.5, 6))


@pytest.mark.parametrize("resolution, shift", [((8, 8), 2), ((8, 8), 0), ((12, 8), 2)])
def test_msa_block_equals_timms_swin_block(resolution, shift):
    """A (shifted) window-MSA block against timm's SwinTransformerBlock with the same weights: values and gradients."""
    from pipeline.models.hierarchical import window_attention_class

    torch.manual_seed(8)
    dim, heads, window = 16, 2, 4
    ours = HierarchicalBlock(dim, heads, resolution=resolution, window_size=(window, window), shift_size=(shift, shift),
                             attn_layer=window_attention_class("msa"), attn_kwargs={})  # fmt: skip
    swin = SwinTransformerBlock(dim, resolution, heads, window_size=window, shift_size=shift)
    with torch.no_grad():
        ours.attn.relative_position_bias_table.normal_()
    state = {k: v for k, v in ours.state_dict().items() if "relative_position_bias_table" not in k}
    state["attn.relative_position_bias_table"] = ours.attn.relative_position_bias_table.detach().T  # (entries, heads)
    missing, unexpected = swin.load_state_dict(state, strict=False)
    assert not unexpected and all("relative_position_index" in k or "attn_mask" in k for k in missing), missing
    x = torch.randn(2, *resolution, dim, requires_grad=True)
    weight = torch.randn(2, *resolution, dim)
    got, expected = ours(x), swin(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    (g,) = torch.autograd.grad((got * weight).sum(), x)
    (e,) = torch.autograd.grad((expected * weight).sum(), x)
    torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_castling_plugs_in_and_switches():
    torch.manual_seed(2)
    model = tiny(attn="castling")
    assert type(model.layers[0].blocks[0].attn).__name__ == "WindowCastlingAttention"
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    model.eval()
    assert model.switch_to_inference() is model
    assert model(x).shape == (2, 5)


def test_castling_backbone_trains_after_an_inference_mode_pass():
    """Validation runs under inference_mode; the region cache it fills must not poison the next training step."""
    model = timm.create_model("castling_swin_nano", num_classes=10, img_size=32, in_chans=1)
    x = torch.randn(2, 1, 32, 32)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
