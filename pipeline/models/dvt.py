"""DVT: Dynamic Vision Transformer (Wang et al., NeurIPS 2021), docs/models.md#dvt.

A cascade of ``K`` independent transformers (exits) over coarse-to-fine token grids, 7x7 -> 10x10 -> 14x14
at 224x224 by default. Each exit is this project's plain ``VisionTransformer`` with its own tokenizer,
position embedding, class token, blocks, norm and head. Two paths carry work from exit ``k`` to ``k+1``:

- **feature reuse**: exit ``k``'s last-block tokens, through a small MLP per block of exit ``k+1``, become
  that block's MLP ``context`` (``pipeline.models.layers.reuse.FeatureReuse``);
- **relationship reuse**: exit ``k``'s attention logits of all blocks, through one shared channel MLP and
  resized to the new grid, are added to exit ``k+1``'s logits before the softmax (``RelationReuse``).

Training runs every exit and returns every exit's logits (``cascade_loss`` sums their cross-entropies).
Dynamic inference (``forward_dynamic``) stops each sample at the first exit whose top softmax probability
reaches that exit's threshold; later exits only see the samples still undecided, and reuse exactly
those samples' features and relations. Thresholds come from ``pipeline.eval.dvt_budget``.

Backbones: DeiT (patch tokenizers: 32, conv 23/23/pad 3, 16 at 224), T2T-ViT-12/14 (tokens-to-token with
the official soft splits, performer flavour, fixed sinusoid position table, no qkv bias), and the plain
backbone with any attention plug-in. A cascade whose attention has no logits (Castling's inference form)
can reuse features only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import to_2tuple, trunc_normal_
from timm.models import register_model
from torch import Tensor, nn

from .counting import count_macs
from .layers.reuse import FeatureReuse, RelationReuse
from .layers.t2t import T2TTokenizer, sinusoid_position_embedding
from .layers.t2t import t2t_first_split as t2t_first_split_lookup
from .vit import VisionTransformer, _data_cfg

__all__ = [
    "PatchTokenizer", "ExitState", "DynamicOutput", "DynamicVisionTransformer", "build_exit", "cascade_loss",
    "CascadeLoss",
]


def patch_tokenizer_geometry(img_size: int, grid: int) -> tuple[int, int]:
    """(kernel = stride, padding) of a non-overlapping conv tokenizer that yields ``grid`` tokens per side.

    Kernel ``ceil(img / grid)``, padding ``ceil((kernel * grid - img) / 2)``: at 224 this gives the
    official DeiT tokenizers (7 -> 32/0, 10 -> 23/3, 14 -> 16/0); other sizes follow the same rule [ours].
    """
    if not 1 <= grid <= img_size:
        raise ValueError(f"a {grid}x{grid} token grid cannot be cut from {img_size} pixels")
    kernel = math.ceil(img_size / grid)
    padding = math.ceil((kernel * grid - img_size) / 2)
    if (img_size + 2 * padding - kernel) // kernel + 1 != grid:
        raise ValueError(f"no padded patch tokenizer gives a {grid}x{grid} grid at {img_size} pixels")
    return kernel, padding


class PatchTokenizer(nn.Module):
    """Image -> (B, grid_h * grid_w, D) by one strided conv, padded so that ``grid`` comes out exactly."""

    def __init__(self, img_size: int | tuple[int, int], grid: int | tuple[int, int], in_chans: int, embed_dim: int):
        super().__init__()
        self.img_size, self.grid_size = to_2tuple(img_size), to_2tuple(grid)
        geometry = [patch_tokenizer_geometry(s, g) for s, g in zip(self.img_size, self.grid_size)]
        kernel, padding = tuple(k for k, _ in geometry), tuple(p for _, p in geometry)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=kernel, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"tokenizer built for {self.img_size} images, got {tuple(x.shape[-2:])}")
        return self.proj(x).flatten(2).transpose(1, 2)


def build_exit(
    *,
    grid: int,
    img_size: int = 224,
    in_chans: int = 3,
    num_classes: int = 1000,
    tokenizer: str = "patch",
    embed_dim: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    attn: str = "msa",
    attn_kwargs: dict | None = None,
    pos_embed: str = "learned",
    norm_eps: float = 1e-6,
    t2t_token_dim: int = 64,
    t2t_flavour: str = "performer",
    t2t_first_split: tuple[int, int, int] | None = None,
    context_dim: int = 0,
    drop_rate: float = 0.0,
    proj_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    global_pool: str = "token",
) -> VisionTransformer:
    """One exit of a cascade (or a stand-alone model of that grid, with ``context_dim=0``)."""
    if tokenizer == "patch":
        embed = PatchTokenizer(img_size, grid, in_chans, embed_dim)
    elif tokenizer == "t2t":
        split = t2t_first_split if t2t_first_split is not None else t2t_first_split_lookup(grid, img_size)
        embed = T2TTokenizer(img_size, in_chans, embed_dim, token_dim=t2t_token_dim, grid=None, first_split=split,
                             flavour=t2t_flavour)
        if embed.grid_size != to_2tuple(grid):
            raise ValueError(f"T2T first split {split} gives a {embed.grid_size} grid, not {grid}x{grid}")
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; expected 'patch' or 't2t'")
    model = VisionTransformer(
        img_size=img_size, in_chans=in_chans, num_classes=num_classes, embed_dim=embed_dim, depth=depth,
        num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn=attn, attn_kwargs=attn_kwargs,
        drop_rate=drop_rate, proj_drop_rate=proj_drop_rate, drop_path_rate=drop_path_rate, tokenizer=embed,
        grid_size=grid, context_dim=context_dim, global_pool=global_pool,
        norm_layer=lambda d: nn.LayerNorm(d, eps=norm_eps),
    )
    if pos_embed == "sinusoid":  # T2T-ViT: a fixed table, kept as a frozen Parameter as the official code
        with torch.no_grad():
            model.pos_embed.copy_(sinusoid_position_embedding(model.pos_embed.shape[1], embed_dim))
        model.pos_embed.requires_grad_(False)
        trunc_normal_(model.cls_token, std=0.02)
    elif pos_embed != "learned":
        raise ValueError(f"unknown pos_embed {pos_embed!r}; expected 'learned' or 'sinusoid'")
    return model


@dataclass
class ExitState:
    """What an exit hands to the next: last-block tokens (before the final norm) and per-block logits."""

    tokens: Tensor
    logits: list[Tensor] | None

    def select(self, keep: Tensor) -> ExitState:
        """The state of the samples ``keep`` (a boolean mask or an index over the batch)."""
        logits = None if self.logits is None else [lg[keep] for lg in self.logits]
        return ExitState(self.tokens[keep], logits)


@dataclass
class DynamicOutput:
    """Result of early-exit inference, one entry per sample (``samples_per_exit``: how many each exit ran on)."""

    predictions: Tensor
    exit_index: Tensor
    macs: Tensor
    logits: Tensor
    samples_per_exit: list[int]


class DynamicVisionTransformer(nn.Module):
    """A DVT cascade of ``len(grids)`` exits. See the module docstring; knobs:

    ``grids``: token grid side of each exit, coarse to fine. ``tokenizer``: ``'patch'`` (DeiT) or ``'t2t'``.
    ``pos_embed``: ``'learned'`` (DeiT) or ``'sinusoid'`` (T2T-ViT). ``feature_reuse`` / ``relation_reuse``
    switch the reuse paths; ``reuse_hidden_dim`` (128), ``reuse_dim`` (48) and ``relation_expansion`` (3) are
    the official sizes. Every other kwarg shapes each exit as in ``build_exit``.
    """

    def __init__(
        self,
        img_size: int = 224,
        in_chans: int = 3,
        num_classes: int = 1000,
        grids: Sequence[int] = (7, 10, 14),
        tokenizer: str = "patch",
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        attn: str = "msa",
        attn_kwargs: dict | None = None,
        pos_embed: str = "learned",
        norm_eps: float = 1e-6,
        t2t_token_dim: int = 64,
        t2t_flavour: str = "performer",
        t2t_first_splits: Sequence[tuple[int, int, int]] | None = None,
        feature_reuse: bool = True,
        relation_reuse: bool = True,
        reuse_hidden_dim: int = 128,
        reuse_dim: int = 48,
        relation_expansion: int = 3,
        drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        global_pool: str = "token",
    ) -> None:
        super().__init__()
        grids = tuple(int(g) for g in grids)
        if len(grids) < 1:
            raise ValueError("a cascade needs at least one exit")
        if any(b <= a for a, b in zip(grids, grids[1:])):
            raise ValueError(f"grids must grow from exit to exit (coarse to fine), got {grids}")
        if t2t_first_splits is not None and len(t2t_first_splits) != len(grids):
            raise ValueError(f"t2t_first_splits needs one split per exit ({len(grids)}), got {len(t2t_first_splits)}")
        self.grids = grids
        self.num_exits = len(grids)
        self.img_size = img_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.embed_dim = self.num_features = embed_dim
        self.depth, self.num_heads = depth, num_heads
        self.reuse_features = feature_reuse
        self.reuse_relations = relation_reuse
        self._t2t_first_splits = tuple(t2t_first_splits) if t2t_first_splits is not None else None
        self._exit_kwargs = dict(
            img_size=img_size, in_chans=in_chans, num_classes=num_classes, tokenizer=tokenizer, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, attn=attn,
            attn_kwargs=attn_kwargs, pos_embed=pos_embed, norm_eps=norm_eps, t2t_token_dim=t2t_token_dim,
            t2t_flavour=t2t_flavour, drop_rate=drop_rate, proj_drop_rate=proj_drop_rate,
            drop_path_rate=drop_path_rate, global_pool=global_pool,
        )
        context_dim = reuse_dim if feature_reuse else 0
        self.exits = nn.ModuleList(
            self._build_exit(k, context_dim=context_dim if k > 0 else 0) for k in range(self.num_exits)
        )
        if relation_reuse and not self.attention_has_logits():
            raise ValueError(
                f"relationship reuse adds to attention logits, but attention {attn!r} has none "
                "(Castling's linear attention); build the cascade with relation_reuse=False")

        # reuse modules into exit k live at index k - 1
        norm_layer = lambda d: nn.LayerNorm(d, eps=norm_eps)  # noqa: E731
        self.feature_reuse = nn.ModuleList(
            nn.ModuleList(
                FeatureReuse(embed_dim, src, dst, hidden_dim=reuse_hidden_dim, out_dim=reuse_dim,
                             drop=proj_drop_rate, norm_layer=norm_layer)
                for _ in range(depth))
            for src, dst in zip(grids, grids[1:])
        ) if feature_reuse else None
        self.relation_reuse = nn.ModuleList(
            RelationReuse(num_heads, depth, src, dst, expansion=relation_expansion)
            for src, dst in zip(grids, grids[1:])
        ) if relation_reuse else None
        if self.feature_reuse is not None:
            self.feature_reuse.apply(_init_linear)
        self._macs_cache: dict[tuple[int, ...], list[int]] = {}

    def _build_exit(self, index: int, context_dim: int) -> VisionTransformer:
        split = self._t2t_first_splits[index] if self._t2t_first_splits is not None else None
        return build_exit(grid=self.grids[index], t2t_first_split=split, context_dim=context_dim, **self._exit_kwargs)

    def standalone_exit(self, index: int) -> VisionTransformer:
        """A fresh stand-alone model of exit ``index``'s design (its grid, no reuse inputs).

        For cost checks and baselines; when that exit takes no context (the first exit, or feature reuse
        off) ``exits[index]``'s state dict loads into it as is.
        """
        if not 0 <= index < self.num_exits:
            raise IndexError(f"exit {index} out of range for a {self.num_exits}-exit cascade")
        return self._build_exit(index, context_dim=0)

    def attention_has_logits(self) -> bool:
        """Whether every block's attention can return softmax logits (needed by relationship reuse)."""
        return all(getattr(block.attn, "has_logits", False) for e in self.exits for block in e.blocks)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {f"exits.{k}.{name}" for k, e in enumerate(self.exits) for name in e.no_weight_decay()}

    def get_classifier(self) -> nn.Module:
        return self.exits[-1].head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        for e in self.exits:
            e.reset_classifier(num_classes, global_pool)
        self._macs_cache.clear()  # the heads' cost changed

    def switch_to_inference(self) -> DynamicVisionTransformer:
        """Drop every training-only attention branch (Castling's masked softmax); weights unchanged."""
        from .layers.castling import switch_to_inference

        switch_to_inference(self)
        self._macs_cache.clear()
        if self.reuse_relations and not self.attention_has_logits():
            raise RuntimeError(
                "this cascade reuses relationships, but its attention has no logits in inference form "
                "(Castling); build it with relation_reuse=False")
        return self

    # ---- running exits ----

    def forward_exit_features(self, index: int, x: Tensor, prev: ExitState | None = None) -> ExitState:
        """Run exit ``index``'s tokenizer and blocks on images ``x``, reusing ``prev`` (exit ``index - 1``'s state)."""
        exit_ = self.exits[index]
        if index > 0 and (self.reuse_features or self.reuse_relations) and prev is None:
            raise ValueError(f"exit {index} reuses exit {index - 1}'s features/relations: pass its ExitState")
        biases = self.relation_reuse[index - 1](prev.logits) if index > 0 and self.reuse_relations else None
        feature_reuse = self.feature_reuse[index - 1] if index > 0 and self.reuse_features else None
        return_logits = self.reuse_relations and index < self.num_exits - 1  # only a next exit needs them

        tokens = exit_.embed_tokens(x)
        logits = []
        for layer, block in enumerate(exit_.blocks):
            context = feature_reuse[layer](prev.tokens) if feature_reuse is not None else None
            bias = biases[layer] if biases is not None else None
            tokens, block_logits = block(tokens, attn_bias=bias, context=context, return_logits=return_logits)
            logits.append(block_logits)
        return ExitState(tokens, logits if return_logits else None)

    def forward_exit(self, index: int, x: Tensor, prev: ExitState | None = None) -> tuple[Tensor, ExitState]:
        """Exit ``index``'s logits (B, num_classes) and the state the next exit reuses."""
        state = self.forward_exit_features(index, x, prev)
        exit_ = self.exits[index]
        return exit_.forward_head(exit_.norm(state.tokens)), state

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """Every exit's final normed tokens (B, N_k, D), coarse to fine."""
        features, prev = [], None
        for k, exit_ in enumerate(self.exits):
            prev = self.forward_exit_features(k, x, prev)
            features.append(exit_.norm(prev.tokens))
        return features

    def forward_head(self, features: list[Tensor], pre_logits: bool = False) -> list[Tensor]:
        return [e.forward_head(f, pre_logits=pre_logits) for e, f in zip(self.exits, features)]

    def forward(self, x: Tensor) -> list[Tensor]:
        """Every exit's logits (B, num_classes), coarse to fine (training and anytime evaluation)."""
        return self.forward_head(self.forward_features(x))

    # ---- costs and dynamic inference ----

    def exit_macs(self, img_size: int | tuple[int, int] | None = None) -> list[int]:
        """Cumulative MACs of one image answered at exit ``k`` (exits ``0..k`` run, with their reuse), by the
        project's counter, in inference mode. Cached per image size."""
        h, w = to_2tuple(img_size if img_size is not None else self.img_size)
        key = (self.in_chans, h, w)
        if key not in self._macs_cache:
            param = next(self.parameters())
            x = torch.zeros(1, *key, device=param.device, dtype=param.dtype)
            was_training = self.training
            self.eval()
            try:
                cumulative, total, prev = [], 0, None
                for k in range(self.num_exits):
                    result = []
                    total += count_macs(self, x, forward=lambda x, k=k, prev=prev: result.append(
                        self.forward_exit(k, x, prev)))
                    prev = result[0][1]
                    cumulative.append(total)
            finally:
                self.train(was_training)
            self._macs_cache[key] = cumulative
        return list(self._macs_cache[key])

    @torch.no_grad()
    def forward_dynamic(self, x: Tensor, thresholds: Sequence[float] | Tensor) -> DynamicOutput:
        """Early-exit inference: each sample answers at the first exit whose top softmax probability is at
        least its threshold; the last exit always answers. ``thresholds`` has one entry per exit (the last
        is ignored) or one per exit but the last. Call in eval mode."""
        thresholds = torch.as_tensor(thresholds, dtype=torch.float32).flatten().tolist()
        if len(thresholds) not in (self.num_exits, self.num_exits - 1):
            raise ValueError(f"need {self.num_exits - 1} or {self.num_exits} thresholds, got {len(thresholds)}")
        batch = x.shape[0]
        predictions = torch.empty(batch, dtype=torch.long, device=x.device)
        exit_index = torch.empty(batch, dtype=torch.long, device=x.device)
        answer_logits = None  # in the exits' output dtype (bfloat16 under autocast), known after the first
        samples_per_exit = [0] * self.num_exits
        active = torch.arange(batch, device=x.device)
        prev = None
        for k in range(self.num_exits):
            samples_per_exit[k] = active.numel()
            logits, state = self.forward_exit(k, x, prev)
            confidence, predicted = logits.softmax(dim=-1).max(dim=-1)
            if k == self.num_exits - 1:  # the last exit always answers
                done = torch.ones_like(predicted, dtype=torch.bool)
            else:
                done = confidence >= thresholds[k]
            answered = active[done]
            if answer_logits is None:
                answer_logits = logits.new_empty(batch, self.num_classes)
            predictions[answered], exit_index[answered], answer_logits[answered] = predicted[done], k, logits[done]
            undecided = ~done
            if not bool(undecided.any()):
                break
            active, x, prev = active[undecided], x[undecided], state.select(undecided)
        macs = torch.tensor(self.exit_macs(tuple(x.shape[-2:])), device=x.device)[exit_index]
        return DynamicOutput(predictions, exit_index, macs, answer_logits, samples_per_exit)


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):  # as the official reuse MLPs: trunc-normal weights, zero bias
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def cascade_loss(outputs: Sequence[Tensor], target: Tensor, weights: Sequence[float] | None = None,
                 label_smoothing: float = 0.0) -> Tensor:
    """Weighted sum of every exit's cross-entropy (equal weights of 1 by default, as the official code).

    ``target`` is class indices (B,) or soft targets (B, num_classes), e.g. from mixup/cutmix.
    """
    if weights is None:
        weights = [1.0] * len(outputs)
    if len(weights) != len(outputs):
        raise ValueError(f"{len(outputs)} exits but {len(weights)} loss weights")
    return sum(w * F.cross_entropy(out, target, label_smoothing=label_smoothing) for w, out in zip(weights, outputs))


class CascadeLoss(nn.Module):
    """``cascade_loss`` as a criterion module (``criterion(outputs, target)``)."""

    def __init__(self, weights: Sequence[float] | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.weights = None if weights is None else tuple(float(w) for w in weights)
        self.label_smoothing = label_smoothing

    def forward(self, outputs: Sequence[Tensor], target: Tensor) -> Tensor:
        return cascade_loss(outputs, target, self.weights, self.label_smoothing)


# ---- registered models ----

_T2T = dict(tokenizer="t2t", pos_embed="sinusoid", qkv_bias=False, norm_eps=1e-5)  # T2T-ViT conventions


def _create(name: str, pretrained: bool, cls, defaults: dict, **kwargs):
    if pretrained:
        raise ValueError(f"{name}: no pretrained weights are published for this project's models")
    for timm_only in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(timm_only, None)
    args = {**defaults, **kwargs}
    model = cls(**args)
    cfg = _data_cfg(args.get("img_size", 224), args.get("in_chans", 3), model.num_classes)
    if isinstance(model, DynamicVisionTransformer):
        prefixes = [f"exits.{k}." for k in range(model.num_exits)]
    else:
        prefixes = [""]
    first_conv = f"{prefixes[0]}patch_embed.proj" if args.get("tokenizer", "patch") == "patch" else None
    classifier = tuple(f"{p}head" for p in prefixes)
    model.pretrained_cfg = model.default_cfg = {
        **cfg, "first_conv": first_conv, "classifier": classifier if len(classifier) > 1 else classifier[0]}
    return model


def _create_dvt(name: str, pretrained: bool, defaults: dict, **kwargs) -> DynamicVisionTransformer:
    return _create(name, pretrained, DynamicVisionTransformer, defaults, **kwargs)


def _create_single(name: str, pretrained: bool, defaults: dict, **kwargs) -> VisionTransformer:
    return _create(name, pretrained, build_exit, defaults, **kwargs)


@register_model
def dvt_deit_small(pretrained: bool = False, **kwargs) -> DynamicVisionTransformer:
    """DVT over DeiT-S (D=384, 12 blocks, 6 heads): 7x7 / 10x10 / 14x14 exits at 224."""
    defaults = dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0, grids=(7, 10, 14))
    return _create_dvt("dvt_deit_small", pretrained, defaults, **kwargs)


@register_model
def dvt_t2t_vit_12(pretrained: bool = False, **kwargs) -> DynamicVisionTransformer:
    """DVT over T2T-ViT-12 (D=256, 12 blocks, 4 heads, MLP ratio 2, performer T2T)."""
    defaults = dict(embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0, grids=(7, 10, 14), **_T2T)
    return _create_dvt("dvt_t2t_vit_12", pretrained, defaults, **kwargs)


@register_model
def dvt_t2t_vit_14(pretrained: bool = False, **kwargs) -> DynamicVisionTransformer:
    """DVT over T2T-ViT-14 (D=384, 14 blocks, 6 heads, MLP ratio 3, performer T2T)."""
    defaults = dict(embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, grids=(7, 10, 14), **_T2T)
    return _create_dvt("dvt_t2t_vit_14", pretrained, defaults, **kwargs)


_NANO = dict(img_size=32, grids=(4, 6, 8), embed_dim=128, depth=6, num_heads=4, mlp_ratio=2.0)  # CPU-sized


@register_model
def dvt_vit_nano(pretrained: bool = False, **kwargs) -> DynamicVisionTransformer:
    """CPU-sized DVT at 32x32: exits 4x4 / 6x6 / 8x8, D=128, 6 blocks, 4 heads, softmax attention."""
    return _create_dvt("dvt_vit_nano", pretrained, dict(_NANO, attn="msa"), **kwargs)


@register_model
def dvt_lsla_nano(pretrained: bool = False, **kwargs) -> DynamicVisionTransformer:
    """``dvt_vit_nano`` with LSLA attention over the whole token grid."""
    return _create_dvt("dvt_lsla_nano", pretrained, dict(_NANO, attn="lsla"), **kwargs)


@register_model
def dvt_castling_nano(pretrained: bool = False, **kwargs) -> DynamicVisionTransformer:
    """``dvt_vit_nano`` with Castling attention: feature reuse only (its inference form has no logits)."""
    return _create_dvt("dvt_castling_nano", pretrained, dict(_NANO, attn="castling", relation_reuse=False), **kwargs)


@register_model
def t2t_vit_12(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """T2T-ViT-12 alone (14x14 tokens at 224): the baseline DVT(T2T-ViT-12) is measured against."""
    defaults = dict(grid=14, embed_dim=256, depth=12, num_heads=4, mlp_ratio=2.0, **_T2T)
    return _create_single("t2t_vit_12", pretrained, defaults, **kwargs)


@register_model
def t2t_vit_14(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """T2T-ViT-14 alone (14x14 tokens at 224)."""
    defaults = dict(grid=14, embed_dim=384, depth=14, num_heads=6, mlp_ratio=3.0, **_T2T)
    return _create_single("t2t_vit_14", pretrained, defaults, **kwargs)
