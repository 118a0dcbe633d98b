"""The plain (DeiT-style) ViT backbone: timm parity, the msa attention's two paths, DVT's hooks."""

import importlib.util
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.models.counting import count_params
from pipeline.models.vit import Attention, Block, VisionTransformer, global_attention_class

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=7)


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: one thread is faster than a pool, and a pool's spinning threads slow to a
    crawl when the machine is shared (measured here: 130 s instead of 6 s for the regulariser test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    "ours, timm_name, published",
    [
        ("vit_msa_deit_tiny", "deit_tiny_patch16_224", 5.7e6),
        ("vit_msa_deit_small", "deit_small_patch16_224", 22e6),
        ("vit_msa_deit_base", "deit_base_patch16_224", 86e6),
    ],
)
def test_param_counts_match_timm_deit(ours, timm_name, published):
    with torch.device("meta"):
        mine = timm.create_model(ours)
        reference = timm.create_model(timm_name)
    assert count_params(mine) == count_params(reference)
    assert count_params(mine) == pytest.approx(published, rel=0.03)  # DeiT paper: 5.7M / 22M / 86M
    assert mine.state_dict().keys() == reference.state_dict().keys()  # same names: a timm DeiT checkpoint loads as is


def test_forward_matches_timm_vit_with_same_weights():
    torch.manual_seed(0)
    reference = TimmViT(**SMALL).eval()
    mine = VisionTransformer(**SMALL).eval()
    mine.load_state_dict(reference.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(mine(x), reference(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.forward_features(x), reference.forward_features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.forward_head(mine.forward_features(x), pre_logits=True),
                                   reference.forward_head(reference.forward_features(x), pre_logits=True))


def _explicit_attention(attn: Attention, x, bias=None):
    """Softmax attention written out from the module's weights: (output, logits)."""
    B, N, C = x.shape
    h, d = attn.num_heads, C // attn.num_heads
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(C, dim=-1)
    q, k, v = (t.view(B, N, h, d).transpose(1, 2) for t in (q, k, v))
    logits = q @ k.transpose(-2, -1) / math.sqrt(d)
    if bias is not None:
        logits = logits + bias
    out = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B, N, C)
    return out @ attn.proj.weight.T + attn.proj.bias, logits


def test_msa_fused_and_logit_paths_match_explicit_attention():
    torch.manual_seed(0)
    attn = Attention(48, 3, grid_size=(4, 4)).eval()
    x = torch.randn(2, 17, 48)
    bias = torch.randn(2, 3, 17, 17)
    expected, expected_logits = _explicit_attention(attn, x)
    fused, none = attn(x)
    assert none is None
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    out, logits = attn(x, return_logits=True)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    expected_b, expected_logits_b = _explicit_attention(attn, x, bias)
    out_b, logits_b = attn(x, attn_bias=bias, return_logits=True)
    torch.testing.assert_close(out_b, expected_b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_b, expected_logits_b, rtol=1e-5, atol=1e-5)  # logits include the bias
    assert not torch.allclose(out_b, expected, atol=1e-3)
    with pytest.raises(ValueError, match="attn_bias"):
        attn(x, attn_bias=torch.zeros(2, 3, 5, 5))


def test_block_feature_reuse_context_feeds_only_the_mlp():
    torch.manual_seed(0)
    block = Block(32, 2, grid_size=(3, 3), context_dim=8).eval()
    assert block.norm2.normalized_shape == (40,)
    assert (block.mlp.fc1.in_features, block.mlp.fc1.out_features, block.mlp.fc2.out_features) == (40, 128, 32)
    x, context = torch.randn(2, 10, 32), torch.randn(2, 10, 8)
    out, logits = block(x, context=context, return_logits=True)
    assert logits.shape == (2, 2, 10, 10)
    # the reference: attention on the tokens alone, the MLP on [tokens, context]
    a, ref_logits = block.attn(block.norm1(x), return_logits=True)
    y = x + a
    expected = y + block.mlp(block.norm2(torch.cat([y, context], dim=-1)))
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(logits, ref_logits)
    with pytest.raises(ValueError, match="context"):
        block(x)
    with pytest.raises(ValueError, match="context"):
        Block(32, 2, grid_size=(3, 3))(x, context=context)


def test_custom_tokenizer_and_grid():
    class Tokenizer(nn.Module):  # 2x2 grid from a 12x12 image, as DVT's coarse exits do
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 24, kernel_size=6, stride=6)

        def forward(self, x):
            return self.conv(x).flatten(2).transpose(1, 2)

    model = VisionTransformer(embed_dim=24, depth=1, num_heads=2, num_classes=5, tokenizer=Tokenizer(), grid_size=2)
    x = torch.randn(3, 3, 12, 12)
    tokens = model.embed_tokens(x)
    assert tokens.shape == (3, 5, 24)
    torch.testing.assert_close(tokens[:, 0], (model.cls_token + model.pos_embed[:, :1]).expand(3, 1, 24)[:, 0])
    assert model(x).shape == (3, 5)
    with pytest.raises(ValueError, match="grid_size"):
        VisionTransformer(tokenizer=Tokenizer())
    with pytest.raises(ValueError, match="tokens"):
        model.embed_tokens(torch.randn(1, 3, 18, 18))


def test_avg_pool_head_and_reset_classifier():
    torch.manual_seed(0)
    model = VisionTransformer(**{**SMALL, "global_pool": "avg"}).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), feats[:, 1:].mean(1))
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model(x).shape == (2, 48)


def test_create_model_kwargs_and_errors():
    model = timm.create_model("vit_msa_nano", num_classes=10, img_size=28, in_chans=1, patch_size=7)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.pretrained_cfg["input_size"] == (1, 28, 28)
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("vit_msa_nano", pretrained=True)
    with pytest.raises(ValueError, match="unknown attention"):
        VisionTransformer(**SMALL, attn="performer")
    with pytest.raises(ValueError, match="divisible"):
        VisionTransformer(img_size=32, patch_size=8, embed_dim=50, num_heads=3)
    with pytest.raises(AssertionError):  # timm's PatchEmbed names the size mismatch
        model(torch.randn(1, 1, 32, 32))


def test_switch_to_inference_is_a_no_op_for_msa():
    model = timm.create_model("vit_msa_nano", depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert model.switch_to_inference() is model
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_drop_path_is_linear_in_depth():
    model = VisionTransformer(**{**SMALL, "depth": 3, "drop_path_rate": 0.2})
    assert isinstance(model.blocks[0].drop_path1, nn.Identity)
    assert [b.drop_path1.drop_prob for b in model.blocks[1:]] == pytest.approx([0.1, 0.2])


@pytest.mark.skipif(importlib.util.find_spec("pipeline.models.layers.lsla") is None, reason="LSLA not written yet")
def test_lsla_plugs_in_by_name():
    model = VisionTransformer(**SMALL, attn="lsla").eval()
    assert type(model.blocks[0].attn) is global_attention_class("lsla")
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)


@pytest.mark.skipif(importlib.util.find_spec("pipeline.models.layers.lsla") is None, reason="LSLA not written yet")
def test_lsla_stage_sharing_ties_one_outer_bias_table_across_blocks():
    """bias_sharing="stage": the backbone (one stage) owns one B_o table; every block's attention uses it."""
    torch.manual_seed(0)
    depth, heads = 3, SMALL["num_heads"]
    model = VisionTransformer(**{**SMALL, "depth": depth}, attn="lsla", attn_kwargs={"bias_sharing": "stage"})
    own = VisionTransformer(**{**SMALL, "depth": depth}, attn="lsla", attn_kwargs={"bias_sharing": "none"})
    grid = 32 // SMALL["patch_size"]
    entries = (2 * grid - 1) ** 2 + 3  # the grid's relative positions + three class-token entries
    table = model.shared_attn_params["shared_outer_bias_table"]
    assert table.shape == (heads, entries)
    assert all(block.attn.outer_bias_table is table for block in model.blocks)
    assert count_params(own) - count_params(model) == (depth - 1) * heads * entries
    assert not own.shared_attn_params  # nothing shared unless asked: state dicts keep timm's names
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).sum().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0  # B_o starts at zero but learns
    # one table means each block's gradient adds into it: the sum of what three private tables would get
    with torch.no_grad():
        table.normal_()
    model.zero_grad()
    # the shared table is saved under every block's name too, so the private-table model loads it as is
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("shared_attn_params.")}
    own.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), own(x))
    model(x).sum().backward()
    own(x).sum().backward()
    summed = sum(block.attn.outer_bias_table.grad for block in own.blocks)
    torch.testing.assert_close(table.grad, summed)
    # tables are position parameters, kept out of weight decay under every alias
    nwd = model.no_weight_decay()
    assert {"shared_attn_params.shared_outer_bias_table", "blocks.2.attn.outer_bias_table",
            "blocks.0.attn.scale_table", "blocks.1.attn.inner_bias_table", "pos_embed", "cls_token"} <= nwd
    assert not any(n.endswith(("q.weight", "proj.weight", "fc1.weight")) for n in nwd)


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    model = timm.create_model("vit_msa_nano", num_classes=4, depth=2)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = F.cross_entropy(model(x), y)
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert F.cross_entropy(model(x), y) < first
