"""LSLA (window and global form) against Swin window attention and an independent einsum reference."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from pipeline.models.hierarchical import HierarchicalViT, window_region_ids
from pipeline.models.layers.lsla import GlobalLSLA, WindowLSLA
from pipeline.models.layers.window_msa import WindowMSA

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to a busy machine's scheduling."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

C, HEADS, WINDOW = 16, 2, (4, 4)
D = C // HEADS
N = WINDOW[0] * WINDOW[1]


# ---------------------------------------------------------------- independent reference


def reference_rpi(height: int, width: int) -> torch.Tensor:
    """Relative position index by its definition, pair by pair."""
    coords = [(r, c) for r in range(height) for c in range(width)]
    return torch.tensor(
        [[(ri - rj + height - 1) * (2 * width - 1) + (ci - cj + width - 1) for rj, cj in coords] for ri, ci in coords]
    )


def reference_lsla(x, attn, same=None, logits_bias=None):
    """One window (or sequence) at a time, one head at a time, straight from docs/models.md#lsla-attention.

    x: (windows, n, C); same: (windows, n, n) bool or None. Tables are read from ``attn`` and gathered
    with ``attn.relative_position_index`` (checked separately against ``reference_rpi``).
    """
    index = attn.relative_position_index
    out = torch.empty_like(x)
    for w in range(x.shape[0]):
        xw = x[w]
        q = xw @ attn.q.weight.T + (attn.q.bias if attn.q.bias is not None else 0)
        k = xw @ attn.k.weight.T + attn.k.bias if attn.k is not None else xw
        v = xw @ attn.v.weight.T + attn.v.bias if attn.v is not None else xw
        heads = []
        for h in range(attn.num_heads):
            sl = slice(h * attn.head_dim, (h + 1) * attn.head_dim)
            scores = torch.einsum("id,jd->ij", q[:, sl], k[:, sl])
            if attn.scale == "dynamic":
                table = attn.scale_table.exp() if attn.ds_param == "log" else attn.scale_table
                scores = scores * table[h][index]
            else:
                scores = scores / math.sqrt(attn.head_dim)
            scores = scores + attn.inner_bias_table[h][index]
            if logits_bias is not None:
                scores = scores + logits_bias[w, h]
            if same is not None:
                scores = scores.masked_fill(~same[w], float("-inf"))
            weights = torch.softmax(scores, dim=-1)
            if attn.outer_bias:
                if attn.bias_sharing == "tied":
                    outer = attn.outer_bias_gain[h, 0] * attn.inner_bias_table[h][index]
                else:
                    outer = attn.outer_bias_table[0 if attn.bias_sharing == "heads" else h][index]
                weights = weights + (outer if same is None else outer * same[w])
            heads.append(torch.einsum("ij,jd->id", weights, v[:, sl]))
        out[w] = torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias
    return out


def randomize_tables(attn: nn.Module) -> None:
    """Tables away from their init, so a wrong gather, sign or mask cannot hide behind zeros."""
    with torch.no_grad():
        for name, p in attn.named_parameters():
            if name.endswith("_table") or name.endswith("_gain"):
                p.copy_(torch.rand_like(p) + 0.5 if name == "scale_table" else torch.randn_like(p))


def shifted_region_ids(batch_images: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Region ids of an 8x8 map, window 4, shift 2 (4 windows, 4 regions in the last) and the (W, n, n) mask."""
    ids = window_region_ids((8, 8), WINDOW, (2, 2))
    same = ids[:, :, None] == ids[:, None, :]
    return ids, same.repeat(batch_images, 1, 1)


def msa_twin(lsla: WindowLSLA) -> WindowMSA:
    """Swin window MSA whose key and value maps are the identity on each head's channel slice."""
    msa = WindowMSA(lsla.dim, lsla.num_heads, window_size=lsla.window_size)
    eye = torch.eye(lsla.dim)
    with torch.no_grad():
        msa.qkv.weight.copy_(torch.cat([lsla.q.weight, eye, eye]))
        msa.qkv.bias.copy_(torch.cat([lsla.q.bias, torch.zeros(2 * lsla.dim)]))
        msa.relative_position_bias_table.copy_(lsla.inner_bias_table)
        msa.proj.load_state_dict(lsla.proj.state_dict())
    return msa


# ---------------------------------------------------------------- the window form


def test_relative_position_index_matches_definition():
    attn = WindowLSLA(C, HEADS, window_size=(3, 5))
    assert torch.equal(attn.relative_position_index, reference_rpi(3, 5))
    assert attn.inner_bias_table.shape == (HEADS, 5 * 9)


@pytest.mark.parametrize("scale", ["dynamic", "fixed"])
@pytest.mark.parametrize("shifted", [False, True])
def test_lsla_equals_msa_with_identity_key_value_maps(scale, shifted):
    """DS = 1/sqrt(d) (the default init), B_o = 0 (its init): LSLA is Swin's W-MSA with K = V = identity."""
    torch.manual_seed(0)
    lsla = WindowLSLA(C, HEADS, window_size=WINDOW, scale=scale)
    with torch.no_grad():
        lsla.inner_bias_table.normal_()  # a bias that matters
    if scale == "dynamic":
        assert torch.equal(lsla.scale_table, torch.full_like(lsla.scale_table, D**-0.5))
    assert not lsla.outer_bias_table.any()
    msa = msa_twin(lsla)
    ids, _ = shifted_region_ids() if shifted else (None, None)
    x = torch.randn(3 * 4, N, C)
    torch.testing.assert_close(lsla(x, ids), msa(x, ids), rtol=1e-5, atol=1e-5)
    if shifted:  # the mask changes the answer, so the comparison above saw it
        assert not torch.allclose(lsla(x, ids), lsla(x))


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"ds_param": "log"},
        {"kv": "qxv", "bias_sharing": "heads"},
        {"kv": "qkv", "scale": "fixed", "bias_sharing": "tied"},
        {"outer_bias": False},
    ],
)
def test_window_lsla_matches_einsum_reference(knobs):
    torch.manual_seed(1)
    attn = WindowLSLA(C, HEADS, window_size=WINDOW, **knobs)
    randomize_tables(attn)
    x = torch.randn(2 * 4, N, C)
    ids, same = shifted_region_ids(batch_images=2)
    torch.testing.assert_close(attn(x), reference_lsla(x, attn), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(attn(x, ids), reference_lsla(x, attn, same), rtol=1e-4, atol=1e-5)
    with torch.inference_mode():
        torch.testing.assert_close(attn(x, ids), reference_lsla(x, attn, same), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "knobs",
    [
        {},
        {"ds_param": "log", "bias_sharing": "heads"},
        {"kv": "qxv", "bias_sharing": "tied"},
        {"kv": "qkv", "scale": "fixed"},
        {"outer_bias": False},
        {"scale": "fixed", "bias_sharing": "tied"},
    ],
)
@pytest.mark.parametrize("shifted", [False, True])
def test_window_lsla_gradients_match_einsum_reference(knobs, shifted):
    """Autograd through the attention against autograd through the reference, every table and x."""
    torch.manual_seed(7)
    attn = WindowLSLA(C, HEADS, window_size=WINDOW, **knobs).double()
    randomize_tables(attn)
    x = torch.randn(2 * 4, N, C, dtype=torch.float64, requires_grad=True)
    ids, same = shifted_region_ids(batch_images=2) if shifted else (None, None)
    weights = torch.randn(2 * 4, N, C, dtype=torch.float64)
    inputs = [x, *attn.parameters()]
    grads = torch.autograd.grad((attn(x, ids) * weights).sum(), inputs)
    expected = torch.autograd.grad((reference_lsla(x, attn, same) * weights).sum(), inputs)
    names = ["x", *(name for name, _ in attn.named_parameters())]
    for name, got, want in zip(names, grads, expected):
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"{name}: {m}")


def test_masked_attention_and_outer_bias_are_exactly_zero():
    torch.manual_seed(2)
    attn = WindowLSLA(C, HEADS, window_size=WINDOW)
    randomize_tables(attn)  # B_o is far from zero everywhere
    ids, same = shifted_region_ids(batch_images=3)
    weights = attn.attention_map(torch.randn(3 * 4, N, C), ids)  # (B*nW, heads, n, n)
    masked = ~same.unsqueeze(1).expand_as(weights)
    assert masked.any() and (weights[masked] == 0).all()
    assert (weights[~masked] != 0).all()
    # rows sum to 1 + (the row's unmasked B_o), as A' = A + B_o says
    outer = attn.outer_bias_table[:, attn.relative_position_index]
    expected = 1 + (outer.unsqueeze(0) * same.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(weights.sum(-1), expected)


@pytest.mark.parametrize("cls", [WindowLSLA, WindowMSA])
def test_region_mask_follows_the_region_ids(cls):
    torch.manual_seed(5)
    attn = cls(C, HEADS, window_size=WINDOW)
    randomize_tables(attn)
    x = torch.randn(4, N, C)
    ids, _ = shifted_region_ids()
    with torch.inference_mode():
        attn(x, ids)
    attn(x, ids).sum().backward()  # a training step after an inference-mode pass

    def fresh(region_ids):  # the same weights in a module that never saw another mask
        twin = cls(C, HEADS, window_size=WINDOW)
        twin.load_state_dict(attn.state_dict())
        return twin(x, region_ids)

    other = ids.flip(0)  # another tensor
    torch.testing.assert_close(attn(x, other), fresh(other))
    ids.copy_(ids.roll(1, dims=1))  # the same tensor, changed in place
    torch.testing.assert_close(attn(x, ids), fresh(ids))
    assert not torch.allclose(attn(x, ids), attn(x, other))


@pytest.mark.parametrize("cls", [WindowLSLA, WindowMSA])
def test_bound_region_masks_match_masks_built_at_the_call(cls):
    """A block binds its region ids once; the masks kept as buffers give what masks built per call give."""
    torch.manual_seed(5)
    attn = cls(C, HEADS, window_size=WINDOW)
    randomize_tables(attn)
    x = torch.randn(4, N, C)
    ids, _ = shifted_region_ids()
    with torch.inference_mode():
        attn.bind_region_ids(ids)
        bound = attn(x, attn.region_ids)
    attn(x, attn.region_ids).sum().backward()  # masks bound under inference mode serve a training step
    assert attn.region_ids is ids and attn.region_bias.shape == attn.region_keep.shape == (4, 1, N, N)
    torch.testing.assert_close(bound, attn(x, ids.clone()))  # another tensor: built at the call
    assert not torch.allclose(bound, attn(x))  # and the masks do mask
    attn.double()  # the masks are buffers: they follow the module
    assert attn.region_bias.dtype == attn.region_keep.dtype == torch.float64
    torch.testing.assert_close(attn(x.double(), attn.region_ids), bound.double(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn", ["lsla", "msa"])
def test_shifted_window_block_exports_without_side_effects(attn):
    """torch.export traces a shifted-window block: the mask is computed in the graph, nothing is written to the module."""
    from pipeline.models.hierarchical import HierarchicalBlock, window_attention_class

    torch.manual_seed(6)
    block = HierarchicalBlock(
        C, HEADS, resolution=(8, 8), window_size=WINDOW, shift_size=(2, 2),
        attn_layer=window_attention_class(attn), attn_kwargs={},
    ).eval()  # fmt: skip
    randomize_tables(block.attn)
    assert block.region_ids is block.attn.region_ids is not None  # the block passes the attention's bound ids
    x = torch.randn(2, 8, 8, C)
    attributes = {name: set(m.__dict__) for name, m in block.named_modules()}
    program = torch.export.export(block, (x,))
    assert {name: set(m.__dict__) for name, m in block.named_modules()} == attributes  # no cache written
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), block(x))


def test_lsla_block_has_2c2_plus_2c_fewer_projection_parameters():
    def projections(attn):
        return sum(p.numel() for name, p in attn.named_parameters() if not name.endswith(("_table", "_gain")))

    for dim, heads in [(16, 2), (96, 3), (768, 24)]:
        lsla = WindowLSLA(dim, heads, window_size=(7, 7))
        msa = WindowMSA(dim, heads, window_size=(7, 7))
        assert projections(msa) - projections(lsla) == 2 * dim**2 + 2 * dim
        # whole modules: minus the two extra tables (DS and B_o) of 13 x 13 entries per head
        total = sum(p.numel() for p in msa.parameters()) - sum(p.numel() for p in lsla.parameters())
        assert total == 2 * dim**2 + 2 * dim - 2 * heads * 169


def test_ds_init_forms():
    for ds_init, unit, param, expected in [
        (1.0, "inv_sqrt_d", "linear", D**-0.5),
        (2.0, "inv_sqrt_d", "linear", 2 * D**-0.5),
        (0.5, "inv_sqrt_d", "log", 0.5 * D**-0.5),
        (1.0, "absolute", "linear", 1.0),
        (3.0, "absolute", "log", 3.0),
    ]:
        attn = WindowLSLA(C, HEADS, window_size=WINDOW, ds_init=ds_init, ds_init_unit=unit, ds_param=param)
        ds = attn._tables()[0]
        torch.testing.assert_close(ds, torch.full((HEADS, N, N), expected))
        if param == "log":
            torch.testing.assert_close(attn.scale_table, torch.full_like(attn.scale_table, math.log(expected)))


def test_bias_sharing_layouts():
    kw = dict(window_size=WINDOW)
    assert WindowLSLA(C, HEADS, **kw, bias_sharing="none").outer_bias_table.shape == (HEADS, 49)
    assert WindowLSLA(C, HEADS, **kw, bias_sharing="heads").outer_bias_table.shape == (1, 49)
    tied = WindowLSLA(C, HEADS, **kw, bias_sharing="tied")
    assert tied.outer_bias_table is None and tied.outer_bias_gain.shape == (HEADS, 1) and not tied.outer_bias_gain.any()
    shared = WindowLSLA.stage_shared_params(HEADS, WINDOW, bias_sharing="stage")
    a = WindowLSLA(C, HEADS, **kw, bias_sharing="stage", **shared)
    b = WindowLSLA(C, HEADS, **kw, bias_sharing="stage", **shared)
    assert a.outer_bias_table is b.outer_bias_table is shared["shared_outer_bias_table"]
    assert WindowLSLA.stage_shared_params(HEADS, WINDOW, bias_sharing="none") == {}
    assert WindowLSLA.stage_shared_params(HEADS, WINDOW, bias_sharing="stage", outer_bias=False) == {}
    no_outer = WindowLSLA(C, HEADS, **kw, outer_bias=False, bias_sharing="tied")
    assert no_outer.outer_bias_table is None and no_outer.outer_bias_gain is None


@pytest.mark.parametrize(
    "knobs, message",
    [
        ({"kv": "qk"}, "kv="),
        ({"scale": "learned"}, "scale="),
        ({"ds_param": "exp"}, "ds_param="),
        ({"ds_init_unit": "sqrt_d"}, "ds_init_unit="),
        ({"bias_sharing": "blocks"}, "bias_sharing="),
        ({"bias_sharing": "blocks", "outer_bias": False}, "bias_sharing="),
        ({"ds_init": "1/sqrt(d)"}, "ds_init must be a finite number"),
        ({"ds_init": -1.0, "ds_param": "log"}, "positive ds_init"),
        ({"bias_sharing": "stage"}, "shared_outer_bias_table"),
    ],
)
def test_bad_knobs_are_named(knobs, message):
    with pytest.raises(ValueError, match=message):
        WindowLSLA(C, HEADS, window_size=WINDOW, **knobs)


def test_bad_windows_are_named():
    attn = WindowLSLA(C, HEADS, window_size=WINDOW)
    with pytest.raises(ValueError, match="expected windows"):
        attn(torch.randn(4, N + 1, C))
    with pytest.raises(ValueError, match="region_ids"):
        attn(torch.randn(6, N, C), torch.zeros(4, N, dtype=torch.long))
    with pytest.raises(ValueError, match="multiple of num_heads"):
        WindowLSLA(10, 3, window_size=WINDOW)


def test_every_knob_combination_runs_forward_and_backward():
    """kv x scale x ds_param x outer_bias x bias_sharing on a tiny backbone with shifted windows.

    ds_param only matters with a dynamic scale, bias_sharing only with an outer bias: 45 distinct models.
    """
    torch.manual_seed(3)
    x = torch.randn(2, 3, 16, 16)
    scales = [("dynamic", "linear"), ("dynamic", "log"), ("fixed", "linear")]
    outers = [(True, "none"), (True, "tied"), (True, "heads"), (True, "stage"), (False, "none")]
    for kv, (scale, ds_param), (outer_bias, sharing) in itertools.product(["qxx", "qxv", "qkv"], scales, outers):
        knobs = dict(kv=kv, scale=scale, ds_param=ds_param, outer_bias=outer_bias, bias_sharing=sharing)
        model = HierarchicalViT(
            img_size=16, num_classes=3, embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=2,
            attn="lsla", attn_kwargs=knobs,
        )  # fmt: skip
        assert model.layers[0].blocks[1].region_ids is not None  # a shifted block is in the graph
        model(x).logsumexp(-1).sum().backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), (knobs, name)
        if outer_bias:  # B_o starts at zero but learns: its gradient reaches it
            outer = [p for n, p in model.named_parameters() if "outer_bias" in n]
            assert outer and all(p.grad.abs().sum() > 0 for p in outer), knobs


# ---------------------------------------------------------------- the global form


GRID = (3, 4)


def global_reference_index(grid, prefix):
    """Class-token entries written out by hand: grid pairs by definition, then cls->patch, patch->cls, cls->cls."""
    grid_rpi = reference_rpi(*grid)
    m = (2 * grid[0] - 1) * (2 * grid[1] - 1)
    n = prefix + grid[0] * grid[1]
    index = torch.empty(n, n, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            if i >= prefix and j >= prefix:
                index[i, j] = grid_rpi[i - prefix, j - prefix]
            else:
                index[i, j] = m + (0 if i < prefix <= j else 1 if j < prefix <= i else 2)
    return index


@pytest.mark.parametrize("prefix", [0, 1, 2])
def test_global_lsla_shapes_index_and_values(prefix):
    torch.manual_seed(4)
    attn = GlobalLSLA(C, HEADS, grid_size=GRID, num_prefix_tokens=prefix, bias_sharing="tied")
    randomize_tables(attn)
    n = prefix + GRID[0] * GRID[1]
    m = (2 * GRID[0] - 1) * (2 * GRID[1] - 1) + (3 if prefix else 0)
    assert GlobalLSLA.has_logits
    assert attn.inner_bias_table.shape == attn.scale_table.shape == (HEADS, m)
    assert torch.equal(attn.relative_position_index, global_reference_index(GRID, prefix))
    x = torch.randn(2, n, C)
    out, logits = attn(x)
    assert out.shape == (2, n, C) and logits is None
    torch.testing.assert_close(out, reference_lsla(x, attn), rtol=1e-4, atol=1e-5)

    bias = torch.randn(2, HEADS, n, n)
    out_b, logits_b = attn(x, attn_bias=bias, return_logits=True)
    assert logits_b.shape == (2, HEADS, n, n)
    torch.testing.assert_close(out_b, reference_lsla(x, attn, logits_bias=bias), rtol=1e-4, atol=1e-5)
    _, logits_0 = attn(x, return_logits=True)
    torch.testing.assert_close(logits_b - logits_0, bias)  # attn_bias lands inside the softmax, once
    with torch.no_grad():
        out_n, logits_n = attn(x, attn_bias=bias, return_logits=True)
    torch.testing.assert_close(out_n, out_b)
    torch.testing.assert_close(logits_n, logits_b)


def test_global_lsla_stage_sharing():
    shared = GlobalLSLA.stage_shared_params(HEADS, GRID, num_prefix_tokens=1, bias_sharing="stage")
    a, b = (GlobalLSLA(C, HEADS, grid_size=GRID, bias_sharing="stage", **shared) for _ in range(2))
    assert a.outer_bias_table is b.outer_bias_table and a.outer_bias_table.shape == (HEADS, 5 * 7 + 3)
    assert GlobalLSLA.stage_shared_params(HEADS, GRID, bias_sharing="heads") == {}


def test_global_lsla_rejects_wrong_token_count():
    attn = GlobalLSLA(C, HEADS, grid_size=GRID)
    with pytest.raises(ValueError, match="13 tokens"):
        attn(torch.randn(2, 12, C))
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        GlobalLSLA(C, HEADS, grid_size=GRID, num_prefix_tokens=-1)
