"""Text tower of dino.txt, trained from scratch (CLIP-style causal transformer).

Causal pre-LN transformer with token + learned positional embeddings, exact-GELU MLP,
no qkv bias, a final LayerNorm, then a bias-free linear projection applied to every
token and pooled at the end-of-text token (the argmax of the token ids: EOT carries
the largest id in both the CLIP BPE and dinotxt's SentencePiece tokenizer). Because
attention is causal, padding after EOT cannot change the result; so, exactly, the tower
drops the batch's padding columns before running (``trim_padding``) and projects only
the EOT token of each row (a per-token linear map commutes with the pooling).

Module names follow the official release (``backbone.blocks.{i}.attention.qkv``,
``backbone.ln_final``, ``head.linear_projection``) so its weights load 1:1.
The first D output dims align with the image CLS half, the last D with the patch half.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Attention, LayerScale
from .layers.checkpointing import run_block

POOLERS = ("argmax", "first", "last")  # where the text embedding is read (the official tokens_pooler_type)


class FeedForward(nn.Module):
    def __init__(self, width: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.dropout = nn.Dropout(dropout)  # after the activation and after fc2, as the official Mlp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.fc2(self.dropout(F.gelu(self.fc1(x)))))  # exact (erf) GELU


class TextBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0,
                 ls_init: Optional[float] = None):
        super().__init__()
        self.attention_norm = nn.LayerNorm(width, eps=1e-5)
        self.attention = Attention(width, heads, causal=True, dropout=dropout)
        self.ffn_norm = nn.LayerNorm(width, eps=1e-5)
        self.feed_forward = FeedForward(width, int(width * mlp_ratio), dropout)
        # LayerScale on both branches when ls_init is set (the official ls_init_value; off in the release)
        self.ls1 = LayerScale(width, ls_init) if ls_init else nn.Identity()
        self.ls2 = LayerScale(width, ls_init) if ls_init else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attention(self.attention_norm(x)))
        return x + self.ls2(self.feed_forward(self.ffn_norm(x)))


class TextTransformer(nn.Module):
    def __init__(self, vocab_size: int, context_length: int, width: int, depth: int, heads: int, mlp_ratio: float,
                 dropout: float = 0.0, ls_init: Optional[float] = None):
        super().__init__()
        self.context_length = context_length
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.dropout = nn.Dropout(dropout)  # on the embeddings, as the official tower
        self.blocks = nn.ModuleList(TextBlock(width, heads, mlp_ratio, dropout, ls_init) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width, eps=1e-5)
        self.grad_checkpointing = False

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        L = ids.shape[1]
        if L > self.context_length:
            raise ValueError(f"text has {L} tokens; the context length is {self.context_length}")
        x = self.dropout(self.token_embedding(ids) + self.positional_embedding[:L])
        mode = self.grad_checkpointing if self.training else None
        for block in self.blocks:
            x = run_block(block, x, mode)
        return self.ln_final(x)


class TextHead(nn.Module):
    """The pooled token, projected. ``linear_projection=False`` (the official ``text_model_use_linear_projection``
    off) keeps no projection where the tower's width already is the embedding width, as the official tower."""

    def __init__(self, width: int, output_dim: int, pooler: str = "argmax", linear_projection: bool = True):
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"text pooler '{pooler}' is not one of {', '.join(POOLERS)}")
        self.pooler = pooler
        if linear_projection or width != output_dim:
            self.linear_projection = nn.Linear(width, output_dim, bias=False)
        else:
            self.linear_projection = nn.Identity()

    def forward(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # project only the pooled token of each row: identical to projecting all tokens, then pooling
        if self.pooler == "first":
            pooled = tokens[:, 0]
        elif self.pooler == "last":  # the last position of the full context (its padding included)
            pooled = tokens[:, -1]
        else:  # the end-of-text token, the largest id
            pooled = tokens[torch.arange(tokens.shape[0], device=tokens.device), ids.argmax(dim=-1)]
        return self.linear_projection(pooled)


class TextTower(nn.Module):
    """Token ids (B, L) -> text embedding (B, output_dim).

    Args:
        vocab_size: tokenizer vocabulary size (ids must be < vocab_size; EOT is the largest id).
        context_length: maximum number of tokens (positional embeddings).
        width, depth, heads: transformer size (dino.txt: 1280, 24, 20).
        mlp_ratio: MLP hidden width / width.
        output_dim: embedding width, 2D to match ``concat(CLS, pooled patches)``.
        pooler, dropout, ls_init: the official tower's options (argmax | first | last, dropout, LayerScale init).
        linear_projection: False drops the projection when ``width == output_dim`` (the official option).
    """

    def __init__(self, vocab_size: int = 49408, context_length: int = 77, width: int = 1280, depth: int = 24,
                 heads: int = 20, mlp_ratio: float = 4.0, output_dim: int = 2048, pooler: str = "argmax",
                 dropout: float = 0.0, ls_init: Optional[float] = None, linear_projection: bool = True):
        super().__init__()
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.width, self.depth, self.heads, self.mlp_ratio = width, depth, heads, float(mlp_ratio)
        self.output_dim = output_dim
        self.pooler, self.dropout, self.ls_init = pooler, float(dropout), ls_init
        self.backbone = TextTransformer(vocab_size, context_length, width, depth, heads, mlp_ratio, dropout, ls_init)
        self.head = TextHead(width, output_dim, pooler, linear_projection)
        self.init_weights()

    def init_weights(self) -> None:
        bb = self.backbone
        width, depth = bb.positional_embedding.shape[1], len(bb.blocks)
        attn_std = width ** -0.5
        proj_std = width ** -0.5 * (2 * depth) ** -0.5
        fc_std = (2 * width) ** -0.5
        nn.init.normal_(bb.token_embedding.weight, std=0.02)
        nn.init.normal_(bb.positional_embedding, std=0.01)
        for block in bb.blocks:
            nn.init.normal_(block.attention.qkv.weight, std=attn_std)
            nn.init.normal_(block.attention.proj.weight, std=proj_std)
            nn.init.zeros_(block.attention.proj.bias)
            nn.init.normal_(block.feed_forward.fc1.weight, std=fc_std)
            nn.init.zeros_(block.feed_forward.fc1.bias)
            nn.init.normal_(block.feed_forward.fc2.weight, std=proj_std)
            nn.init.zeros_(block.feed_forward.fc2.bias)
        if isinstance(self.head.linear_projection, nn.Linear):
            nn.init.normal_(self.head.linear_projection.weight, std=attn_std)

    def set_grad_checkpointing(self, enable=True) -> None:
        """True / ``full``: recompute each block in the backward pass; ``selective``: keep the matmul and
        attention outputs, recompute the rest (``dinotxt.models.layers.checkpointing``); False: off."""
        self.backbone.grad_checkpointing = "full" if enable is True else enable

    def config_dict(self) -> dict:
        """The ``TextConfig`` fields that rebuild this tower."""
        return {"vocab_size": self.vocab_size, "context_length": self.context_length, "width": self.width,
                "depth": self.depth, "heads": self.heads, "mlp_ratio": self.mlp_ratio, "output_dim": self.output_dim,
                "grad_checkpointing": bool(self.backbone.grad_checkpointing), "pooler": self.pooler,
                "dropout": self.dropout, "ls_init": self.ls_init,
                "linear_projection": isinstance(self.head.linear_projection, nn.Linear)}

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.numel() and int(ids.max()) >= self.vocab_size:
            raise ValueError(
                f"token id {int(ids.max())} >= text vocab_size {self.vocab_size}: the tokenizer does not match this model"
            )
        # padding after the end-of-text token cannot reach the first or the EOT token (causal attention): it is
        # dropped; the "last" pooler reads the context's last position, which sees the padding
        return self.head(self.backbone(ids if self.pooler == "last" else trim_padding(ids)), ids)


def trim_padding(ids: torch.Tensor) -> torch.Tensor:
    """Drop the columns after the last end-of-text token of the batch.

    Exact: attention is causal and the embedding is read at each row's EOT (its argmax), so
    tokens after it never reach the output. Captions are short (about 10-20 of 77 tokens),
    so this removes most of the text tower's compute.
    """
    if ids.numel() == 0:
        return ids
    last = int(ids.argmax(dim=-1).max()) + 1
    return ids[:, :last] if last < ids.shape[1] else ids
