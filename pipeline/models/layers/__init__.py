"""Building blocks shared by the model families (timm style: layers here, assembled models one level up).

Two attention plug-in contracts. Every attention kind (``msa``, ``lsla``, ``castling``) implements the
one its backbone needs; backbones pick a class by name and know nothing else about it.

Window attention (hierarchical, Swin-style backbone; ``pipeline.models.hierarchical``)::

    cls(dim, num_heads, *, window_size: tuple[int, int], qkv_bias=True, attn_drop=0., proj_drop=0., **kind_kwargs)
    forward(x, region_ids=None) -> Tensor
        x:          (B * num_windows, N, C) with N = window_size[0] * window_size[1]
        region_ids: (num_windows, N) long, or None. Under shifted windows a token may only attend to
                    tokens of its window that carry the same region id (Swin's mask, in a form that
                    linear attention can use as well as softmax attention).

Global attention (plain, DeiT-style backbone; ``pipeline.models.vit``)::

    cls(dim, num_heads, *, grid_size: tuple[int, int], num_prefix_tokens=1, qkv_bias=True,
        attn_drop=0., proj_drop=0., **kind_kwargs)
    has_logits: bool   # class attribute: False when the kind has no softmax logits (Castling inference)
    forward(x, attn_bias=None, return_logits=False) -> tuple[Tensor, Tensor | None]
        x:         (B, N, C) with N = num_prefix_tokens + grid_size[0] * grid_size[1]
        attn_bias: (B, num_heads, N, N) added to the logits before the softmax (DVT relationship reuse)
        returns    (out (B, N, C), logits (B, num_heads, N, N) or None); logits are the pre-softmax
                   scores after scaling and after attn_bias, returned only when return_logits=True.
"""
