"""Parameters and MACs of the project's models against the papers' figures (224x224, the project's counter).

    python -m benchmarks.bench_counts            # a few seconds; no timing involved

Castling models are counted in inference form (the auxiliary softmax branch dropped), as the paper counts
them. MACs are multiply-accumulates as fvcore counts them (what the papers call FLOPs), from
``pipeline.models.counting``. Heads: 102 classes where the paper counted with IP102's head (ViT-LSLA and
its Swin-T reference), 1000 otherwise. Models are built on the meta device where they can be (no memory,
no weights), on CPU otherwise.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import timm
import torch

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.models.counting import count_macs, count_params

# (what, timm name and kwargs, paper's params (M), paper's GMACs, where the figure comes from)
ROWS = [
    ("ViT-LSLA (paper budget)", "vit_lsla_tiny", {"num_classes": 102}, 18.9, 3.5, "ViT-LSLA paper, IP102 head"),
    ("Swin-T (timm)", "swin_tiny_patch4_window7_224", {"num_classes": 102}, 27.6, 4.5, "ViT-LSLA paper, IP102 head"),
    ("Swin-T layout with LSLA", "vit_lsla_swin_t", {"num_classes": 102}, None, None, "its msa twin minus 2C^2+2C per block"),
    ("Swin-T layout with msa", "hier_msa_swin_t", {"num_classes": 102}, None, None, "Swin-T with the 2-conv stem"),
    ("Castling-DeiT-T (inference)", "castling_deit_tiny", {}, 5.6, 1.18, "Castling-ViT paper"),
    ("DeiT-T (timm)", "deit_tiny_patch16_224", {}, 5.7, 1.3, "DeiT paper"),
    ("DeiT-S (timm)", "deit_small_patch16_224", {}, 22.0, 4.6, "DeiT paper"),
    ("T2T-ViT-12 (14x14)", "t2t_vit_12", {}, 6.9, 1.78, "T2T-ViT / DVT papers"),
    ("T2T-ViT-12 at 7x7", "t2t_vit_12", {"grid": 7}, None, 0.47, "DVT paper"),
]
CASCADES = ["dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_deit_small"]


def build(name: str, kwargs: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model in inference form and a 224x224 input, on the meta device when the model builds there."""
    try:
        with torch.device("meta"):
            model, x = timm.create_model(name, **kwargs), torch.empty(1, 3, 224, 224)
    except (NotImplementedError, RuntimeError):  # e.g. an init that reads tensor values
        model, x = timm.create_model(name, **kwargs), torch.empty(1, 3, 224, 224)
    if hasattr(model, "switch_to_inference"):
        model.switch_to_inference()
    return model.eval(), x


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)

    def off(ours, paper):
        return "" if paper is None else f"{100 * (ours / paper - 1):+.1f}%"

    print(f"{'model':<26} {'timm name':<30} {'params M':>8} {'paper':>6} {'diff':>6} | {'GMACs':>6} {'paper':>6} "
          f"{'diff':>6} | source")
    rows = []
    for what, name, kwargs, paper_params, paper_gmacs, source in ROWS:
        model, x = build(name, kwargs)
        params, gmacs = count_params(model) / 1e6, count_macs(model, x) / 1e9
        rows.append(dict(model=what, name=name, kwargs=kwargs, params_m=params, gmacs=gmacs,
                         paper_params_m=paper_params, paper_gmacs=paper_gmacs, source=source))  # fmt: skip
        print(f"{what:<26} {name + (' ' + str(kwargs) if kwargs else ''):<30} {params:>8.2f} "
              f"{paper_params if paper_params else '':>6} {off(params, paper_params):>6} | {gmacs:>6.3f} "
              f"{paper_gmacs if paper_gmacs else '':>6} {off(gmacs, paper_gmacs):>6} | {source}")

    print(f"\n{'DVT cascade':<16} {'params M':>8} | cumulative GMACs after each exit (feature and relation reuse on)")
    cascades = []
    for name in CASCADES:
        model, _ = build(name, {})
        cumulative = [m / 1e9 for m in model.exit_macs()]
        cascades.append(dict(name=name, params_m=count_params(model) / 1e6, cumulative_gmacs=cumulative))
        print(f"{name:<16} {count_params(model) / 1e6:>8.2f} | " + "  ".join(f"{g:.3f}" for g in cumulative))
    if args.json:
        args.json.write_text(json.dumps(dict(models=rows, cascades=cascades), indent=2))
    return dict(models=rows, cascades=cascades)


if __name__ == "__main__":
    main()
