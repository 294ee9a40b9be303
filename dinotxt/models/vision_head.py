"""Trainable vision head of dino.txt ("vision blocks" on top of the frozen backbone).

Follows dino.txt (Jose et al., "DINOv2 Meets Text", CVPR 2025): N pre-LN transformer
blocks at the backbone width over all frozen tokens ``[CLS, registers, patches]``
(no qkv bias, SwiGLU FFN, LayerScale, stochastic depth), a final LayerNorm, then the
image embedding ``concat(c', pool(f'))`` where ``c'`` is the head CLS token and
``f'`` are the head patch tokens (registers dropped). With ``use_patch_tokens=False``
and no blocks it is the LiT baseline (CLS only). An optional bias-free linear map after
the final norm (the official ``use_linear_projection``, applied to every token, so the
dense tokens are projected too) sets an embedding width other than 2D. Module names follow
the official release (``block_list``, ``ln_final``, ``linear_projection``, ``mlp.w1/w2/w3``)
so its weights map 1:1.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .layers import Attention, LayerScale, StochasticResidual, SwiGLU, swiglu_hidden_dim
from ..config.compose import projection_width
from .layers.checkpointing import run_block


class HeadBlock(nn.Module):
    """Pre-LN block: x + ls1(attn(norm1 x)), x + ls2(mlp(norm2 x)), each branch with stochastic depth.

    Args:
        dim: token width (the backbone's D).
        num_heads: attention heads.
        mlp_ratio: SwiGLU width ratio before the 2/3 factor.
        drop_path: stochastic depth probability of both branches.
        layer_scale_init: initial LayerScale value on both branches.
        attn_impl: ``sdpa`` or ``xformers``.
        drop_path_mode: ``batch_subset`` (official: each branch on floor((1-p)B) samples) or ``per_sample``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 layer_scale_init: float = 1e-5, attn_impl: str = "sdpa", drop_path_mode: str = "batch_subset"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, num_heads, impl=attn_impl)
        self.ls1 = LayerScale(dim, layer_scale_init)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = SwiGLU(dim, swiglu_hidden_dim(dim, mlp_ratio))
        self.ls2 = LayerScale(dim, layer_scale_init)
        self.residual1 = StochasticResidual(drop_path, drop_path_mode)
        self.residual2 = StochasticResidual(drop_path, drop_path_mode)

    def attn_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.residual1(x, self.attn_branch)
        return self.residual2(x, self.mlp_branch)


def pool_patches(patches: torch.Tensor, kind: str = "mean", p: float = 3.0) -> torch.Tensor:
    """Pool (B, N, D) patch tokens to (B, D): mean | max | gem (generalised mean of clamped values)."""
    if kind == "mean":
        return patches.mean(dim=1)
    if kind == "max":
        return patches.amax(dim=1)
    if kind == "gem":
        return patches.clamp(min=1e-6).pow(p).mean(dim=1).pow(1.0 / p)
    raise ValueError(f"unknown pooling '{kind}' (use mean, max or gem)")


def pool_frozen_tokens(tokens: torch.Tensor, num_prefix_tokens: int, kind: str = "mean", p: float = 3.0) -> torch.Tensor:
    """Frozen tokens (B, 1+R+N, D) -> (B, 2, D) ``[CLS, pool(patches)]``: all a head without
    blocks reads (the LiT setting), so the feature cache can store 2 tokens per image."""
    return torch.stack([tokens[:, 0], pool_patches(tokens[:, num_prefix_tokens:], kind, p)], dim=1)


def pooled_tokens_problem(num_blocks: int, use_patch_tokens: bool, final_norm: bool, pooling: str = "mean",
                          projection: bool = False) -> Optional[str]:
    """Why a head of this configuration cannot train on pooled ``[CLS, pool(patches)]`` tokens
    (the LiT feature cache), or None if it can.

    Pooling before the head is exact only when nothing mixes or normalises patch tokens
    before the pooling: no head blocks, no final LayerNorm on the pooled half, and a linear
    projection only under mean pooling (a bias-free linear map commutes with the mean, not with
    max or GeM).
    """
    if num_blocks:
        return f"the vision head has {num_blocks} blocks (pooled tokens need vision_head.num_blocks=0)"
    if use_patch_tokens and final_norm:
        return ("the head normalises each patch token before pooling (set vision_head.final_norm=false, "
                "or vision_head.use_patch_tokens=false for CLS only)")
    if use_patch_tokens and projection and pooling != "mean":
        return (f"the head projects each patch token before {pooling} pooling (set vision_head.pooling=mean, "
                "or no linear projection)")
    return None


class VisionHead(nn.Module):
    """Trainable head over frozen tokens, producing the image embedding and dense tokens.

    Args:
        dim: backbone width D.
        num_prefix_tokens: 1 + number of registers in the input token sequence.
        num_blocks: trainable blocks (dino.txt: 2; LiT: 0).
        num_heads: attention heads (default D // 64).
        mlp_ratio, drop_path, layer_scale_init, attn_impl: block settings (see HeadBlock);
            ``drop_path`` is the rate of EVERY block, as in the official head (not spread over depth).
        drop_path_mode: ``batch_subset`` (official) or ``per_sample`` (see ``layers/drop_path.py``).
        pooling: mean | max | gem pooling of head patch tokens.
        gem_p: GeM exponent.
        use_patch_tokens: embedding = concat(CLS, pooled patches) (2D) if True, else CLS (D).
        final_norm: apply ``ln_final`` to all tokens after the blocks.
        embed_dim: the image embedding width (None: 2D with patch tokens, D without); another width
            adds the projection.
        linear_projection: a bias-free linear map D -> embed_dim / 2 (or embed_dim, CLS only) on every
            token after ``ln_final`` even at the default width (the official ``use_linear_projection``;
            initialised N(0, 1/D) as there).
    """

    def __init__(self, dim: int, num_prefix_tokens: int = 1, num_blocks: int = 2, num_heads: Optional[int] = None,
                 mlp_ratio: float = 4.0, drop_path: float = 0.3, layer_scale_init: float = 1e-5,
                 pooling: str = "mean", gem_p: float = 3.0, use_patch_tokens: bool = True,
                 final_norm: bool = True, attn_impl: str = "sdpa", drop_path_mode: str = "batch_subset",
                 embed_dim: Optional[int] = None, linear_projection: bool = False):
        super().__init__()
        num_heads = num_heads or max(1, dim // 64)
        if pooling not in ("mean", "max", "gem"):
            raise ValueError(f"unknown pooling '{pooling}' (use mean, max or gem)")
        self.dim = dim
        self.num_prefix_tokens = num_prefix_tokens
        self.num_heads = num_heads
        self.mlp_ratio, self.drop_path, self.layer_scale_init = float(mlp_ratio), float(drop_path), float(layer_scale_init)
        self.attn_impl = attn_impl
        self.pooling = pooling
        self.gem_p = gem_p
        self.use_patch_tokens = use_patch_tokens
        self.drop_path_mode = drop_path_mode
        self.block_list = nn.ModuleList(
            HeadBlock(dim, num_heads, mlp_ratio, drop_path, layer_scale_init, attn_impl, drop_path_mode)
            for _ in range(num_blocks)
        )
        self.ln_final = nn.LayerNorm(dim, eps=1e-5) if final_norm else nn.Identity()
        width = projection_width(dim, use_patch_tokens, embed_dim, linear_projection)
        self.linear_projection = nn.Identity() if width is None else nn.Linear(dim, width, bias=False)
        self.token_dim = dim if width is None else width  # the width of the head's output tokens
        self.grad_checkpointing = False
        self.apply(self._init_weights)
        if width is not None:  # the official init of the projection (VisionHead.init_weights)
            nn.init.normal_(self.linear_projection.weight, std=dim ** -0.5)

    @property
    def output_dim(self) -> int:
        return self.token_dim * (2 if self.use_patch_tokens else 1)

    @property
    def has_projection(self) -> bool:
        return isinstance(self.linear_projection, nn.Linear)

    def config_dict(self) -> dict:
        """The ``VisionHeadConfig`` fields that rebuild this head (its width comes from the backbone)."""
        return {"num_blocks": len(self.block_list), "num_heads": self.num_heads, "mlp_ratio": self.mlp_ratio,
                "drop_path": self.drop_path, "layer_scale_init": self.layer_scale_init, "pooling": self.pooling,
                "gem_p": float(self.gem_p), "use_patch_tokens": self.use_patch_tokens,
                "final_norm": not isinstance(self.ln_final, nn.Identity), "attn_impl": self.attn_impl,
                "drop_path_mode": self.drop_path_mode,
                "embed_dim": self.output_dim if self.has_projection else None,
                "linear_projection": self.has_projection,
                "grad_checkpointing": bool(self.grad_checkpointing)}

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward_tokens(self, tokens: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Run the blocks, the final norm and the projection; return (head CLS (B, P), head patch tokens
        (B, N, P)), P = ``token_dim`` (D without a projection). Registers are dropped before the projection."""
        x = tokens
        mode = self.grad_checkpointing if self.training else None
        for block in self.block_list:
            x = run_block(block, x, mode)
        x = self.ln_final(x)
        cls, patches = x[:, 0], x[:, self.num_prefix_tokens:]
        if not self.has_projection:
            return cls, patches
        return self.linear_projection(cls), self.linear_projection(patches)

    def embed(self, cls: torch.Tensor, patches: torch.Tensor) -> torch.Tensor:
        if not self.use_patch_tokens:
            return cls
        return torch.cat([cls, pool_patches(patches, self.pooling, self.gem_p)], dim=-1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen tokens (B, 1+R+N, D) -> image embedding (B, 2D) or (B, D) for CLS-only."""
        cls, patches = self.forward_tokens(tokens)
        return self.embed(cls, patches)

    # ------------------------------------------------------------------ pooled (LiT) cache path
    def pooled_cache_problem(self) -> Optional[str]:
        """Why this head cannot train on pooled ``[CLS, pool(patches)]`` tokens, or None if it can."""
        return pooled_tokens_problem(len(self.block_list), self.use_patch_tokens,
                                     not isinstance(self.ln_final, nn.Identity), self.pooling, self.has_projection)

    def pool_frozen_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen tokens (B, 1+R+N, D) -> (B, 2, D) ``[CLS, pool(patches)]`` with this head's pooler."""
        return pool_frozen_tokens(tokens, self.num_prefix_tokens, self.pooling, self.gem_p)

    def forward_pooled(self, pooled: torch.Tensor) -> torch.Tensor:
        """Image embedding from ``pool_frozen_tokens`` output; equals ``forward`` on the full tokens."""
        problem = self.pooled_cache_problem()
        if problem:
            raise ValueError(f"cannot train on pooled cached tokens: {problem}; rebuild the cache with cache.tokens=all")
        cls = self.linear_projection(self.ln_final(pooled[:, 0]))
        # mean pooling commutes with the bias-free projection: proj(mean(f)) = mean(proj(f))
        return torch.cat([cls, self.linear_projection(pooled[:, 1])], dim=-1) if self.use_patch_tokens else cls
