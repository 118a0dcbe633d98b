"""The MAC counter against published figures of well-known models (fvcore convention)."""

import pytest
import timm
import torch
from torch import nn

from pipeline.models.counting import count_macs, count_params


@pytest.mark.parametrize(
    "name, params_m, gmacs",
    [
        # DeiT paper, Table 1: DeiT-Ti 5.7M / 1.3G, DeiT-S 22M / 4.6G; Swin paper: Swin-T 28M / 4.5G.
        ("deit_tiny_patch16_224", 5.72, 1.25),
        ("deit_small_patch16_224", 22.05, 4.60),
        ("swin_tiny_patch4_window7_224", 28.29, 4.49),
    ],
)
def test_published_figures(name, params_m, gmacs):
    model = timm.create_model(name, pretrained=False).eval()
    assert count_params(model) / 1e6 == pytest.approx(params_m, rel=0.005)
    assert count_macs(model, torch.randn(1, 3, 224, 224)) / 1e9 == pytest.approx(gmacs, rel=0.01)


def test_fused_attention_is_counted():
    """q·kᵀ and P·v through scaled_dot_product_attention count as two batched matmuls."""
    b, h, n, d = 2, 3, 50, 16
    q = k = v = torch.randn(b, h, n, d)
    sdpa = nn.Module()
    macs = count_macs(sdpa, (q, k, v), forward=torch.nn.functional.scaled_dot_product_attention)
    assert macs == 2 * b * h * n * n * d


def test_shared_parameters_counted_once():
    lin = nn.Linear(4, 4)
    assert count_params(nn.Sequential(lin, lin)) == 20
