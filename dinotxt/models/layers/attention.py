"""Multi-head self-attention, bidirectional (vision head) or causal (text tower).

Both towers of dino.txt use the same module: qkv projection without bias, output projection
with bias (METHOD.md sections 1 and 2); the official key names ``qkv`` / ``proj`` are kept.
torch's scaled-dot-product attention is the default; xformers' memory-efficient kernel is the
optional ``impl="xformers"`` (the ``[xformers]`` extra).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMPLEMENTATIONS = ("sdpa", "xformers")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, impl: str = "sdpa", causal: bool = False,
              dropout: float = 0.0) -> torch.Tensor:
    """Multi-head attention on (B, H, L, Dh) tensors; torch SDPA by default, xformers optional; ``dropout`` on
    the attention probabilities (training only: the caller passes 0 in eval mode)."""
    if impl == "xformers":
        try:
            from xformers.ops import LowerTriangularMask, memory_efficient_attention
        except ImportError:
            raise ImportError("attn_impl=xformers needs the xformers extra: pip install 'dinotxt[xformers]'") from None
        bias = LowerTriangularMask() if causal else None
        out = memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias,
                                         p=dropout)
        return out.transpose(1, 2)
    if impl != "sdpa":
        raise ValueError(f"unknown attention implementation '{impl}' (use {' or '.join(IMPLEMENTATIONS)})")
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=dropout)


class Attention(nn.Module):
    """Args:
        dim: token width.
        num_heads: attention heads (``dim`` must divide evenly).
        causal: each token attends to itself and the tokens before it (the text tower).
        impl: ``sdpa`` or ``xformers``.
        dropout: on the attention probabilities and after the output projection, in training (the official
            text tower's ``dropout_prob``; 0 everywhere else).
    """

    def __init__(self, dim: int, num_heads: int, causal: bool = False, impl: str = "sdpa", dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"unknown attention implementation '{impl}' (use {' or '.join(IMPLEMENTATIONS)})")
        self.num_heads, self.causal, self.impl = num_heads, causal, impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.dropout = float(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        out = attention(qkv[0], qkv[1], qkv[2], self.impl, causal=self.causal, dropout=p)
        out = self.proj(out.transpose(1, 2).reshape(B, L, C))
        return F.dropout(out, p, training=True) if p else out
