"""Symmetric InfoNCE over the global batch (CLIP / LiT / dino.txt).

``logits = logit_scale * norm(img) @ norm(txt).T``;
``loss = (CE(img -> txt) + CE(txt -> img)) / 2``, computed in fp32.

Temperature convention (open_clip's, so ``ClipLoss()(**model(images, ids))`` is right):
the model stores the LOG temperature ``DinoTxt.logit_scale`` (a parameter, clamped to
[0, ln 100]); ``DinoTxt.forward`` returns its exponential under the key ``logit_scale``,
and the loss takes that exponentiated multiplier as it is.

fp32 means fp32 under any autocast: the features are upcast and autocast is switched off
inside the loss, otherwise a bf16 autocast region would hand bf16 logits (an 8-bit
mantissa, errors of ~0.3 at scale 100) to the cross-entropy. Inputs of higher precision
(float64) stay in their precision.

Under DDP the features of all ranks are gathered WITH gradients (the distributed
gather lives in a free function, as in open_clip); each rank then computes the rows
of the global loss that belong to its own samples against all samples of the global
batch. Averaging the rank losses (as DDP averages gradients) gives exactly the
single-process loss on the global batch.

Memory: the dense loss materialises two (B_rank, B) logit matrices and their softmax
(fp32: 17 GB each at a 65k global batch). ``blocked_clip_loss`` (``ClipLoss(block_size=...)``,
the ``loss.block_size`` key) computes the same loss tile by tile with a streaming
log-sum-exp (the online softmax of Milakov & Gimelshein 2018, as FlashAttention uses it),
and recomputes each tile in its own backward pass, so it keeps only the features and
one log-sum-exp per row: peak memory O(B x block) instead of O(B^2), equal to the dense
loss up to the order of its sums.

The sigmoid loss of SigLIP (Zhai, Mustafa, Kolesnikov & Beyer, "Sigmoid Loss for Language Image
Pre-Training", ICCV 2023; ``SigLipLoss``, ``loss.kind=sigmoid``) scores every image-text pair on its
own: ``logits = logit_scale * norm(img) @ norm(txt).T + logit_bias`` with a learnable bias, and
``loss = -sum_ij log sigmoid(z_ij logits_ij) / B`` with ``z = +1`` on the pairs and ``-1`` elsewhere.
Under DDP each rank scores its own images against the gathered texts of all ranks (gathered with
gradients) and divides by its own batch; DDP's average over ranks is then exactly the single-process
loss on the global batch (``-sum over all B x B pairs / B``). The big_vision reference passes the
texts round the ranks in chunks instead; gathering them gives the same sum. With ``block_size`` the
same loss runs tile by tile (``_BlockedSigmoid``), memory O(B x block).
"""
from __future__ import annotations

from functools import partial
from typing import Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..utils.precision import at_least_fp32


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate equal-sized tensors of all ranks; the backward pass sums the incoming
    gradients over ranks and hands each rank the slice of its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n:(rank + 1) * n]


def distributed_world() -> Tuple[int, int]:
    """(rank, world size) of the initialised process group, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_features(image_features: torch.Tensor, text_features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """All-gather features from every rank, keeping the autograd graph (rank order).
    Every rank must hold the same number of rows (the loaders drop nothing unevenly:
    each rank yields full batches)."""
    if distributed_world()[1] == 1:
        return image_features, text_features
    return _AllGatherWithGrad.apply(image_features), _AllGatherWithGrad.apply(text_features)


def _tiles(n: int, block: int):
    return [(i, min(i + block, n)) for i in range(0, n, block)]


class _BlockedInfoNCE(torch.autograd.Function):
    """One direction of the global InfoNCE, summed over the rows of ``q``:
    ``sum_i logsumexp_j(s q_i . k_j) - s q_i . k_{offset+i}`` for q (n, E) against all rows of
    k (N, E), in (block x block) tiles of the logit matrix.

    The forward pass keeps a running maximum and a running sum of exponentials per row (the
    streaming log-sum-exp) and saves only ``q``, ``k``, ``s`` and the n log-sum-exps; the backward
    pass recomputes each tile's softmax ``P = exp(s q k^T - lse)`` from them, so no (n, N) matrix
    ever exists. With ``d`` the incoming gradient and ``Pk`` the rows of ``P @ k``:
    ``dq = d s (Pk - k_label)``, ``dk = d s (P^T q - q_label)``, ``ds = d sum_i q_i . (Pk_i - k_label_i)``.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, offset: int, block: int) -> torch.Tensor:
        n, big = q.shape[0], k.shape[0]
        lse = q.new_empty(n)
        for r0, r1 in _tiles(n, block):
            qs = q[r0:r1] * scale
            run_max = q.new_full((r1 - r0,), float("-inf"))
            run_sum = q.new_zeros(r1 - r0)
            for c0, c1 in _tiles(big, block):
                logits = qs @ k[c0:c1].t()
                new_max = torch.maximum(run_max, logits.amax(dim=1))
                run_sum = run_sum * torch.exp(run_max - new_max) + logits.sub_(new_max[:, None]).exp_().sum(dim=1)
                run_max = new_max
            lse[r0:r1] = run_max + torch.log(run_sum)
        positives = (q * k[offset:offset + n]).sum()
        ctx.save_for_backward(q, k, scale, lse)
        ctx.offset, ctx.block = offset, block
        return lse.sum() - scale * positives

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, scale, lse = ctx.saved_tensors
        offset, block = ctx.offset, ctx.block
        n, big = q.shape[0], k.shape[0]
        need_q, need_k, need_s = ctx.needs_input_grad[:3]
        # the backward pass of an fp32 loss stays fp32 even when it runs inside an autocast region
        with torch.autocast(q.device.type, enabled=False):
            pk = torch.zeros_like(q) if (need_q or need_s) else None
            gk = torch.zeros_like(k) if need_k else None
            for r0, r1 in _tiles(n, block):
                qb = q[r0:r1]
                qs = qb * scale
                for c0, c1 in _tiles(big, block):
                    kb = k[c0:c1]
                    probs = (qs @ kb.t()).sub_(lse[r0:r1, None]).exp_()
                    if pk is not None:
                        pk[r0:r1] += probs @ kb
                    if need_k:
                        gk[c0:c1] += probs.t() @ qb
            labels = k[offset:offset + n]
            gq = gs = None
            if need_s:
                gs = ((q * pk).sum() - (q * labels).sum()) * grad
            if need_q:
                gq = (pk - labels) * (grad * scale)
            if need_k:
                gk[offset:offset + n] -= q
                gk *= grad * scale
        return gq, gk, gs, None, None


class _BlockedSymmetricInfoNCE(torch.autograd.Function):
    """Both directions of the single-process InfoNCE at once, ``sum_i [lse_j(L_ij) + lse_j(L_ji) - 2 L_ii]``
    with ``L = s img txt^T``: the text -> image logits are the transpose of the image -> text ones, so
    every (block x block) tile is computed once and updates the running log-sum-exp of its rows and
    of its columns. A third fewer matrix products than the dense loss (which multiplies twice
    forward and four times backward) for one extra elementwise exponential per tile."""

    @staticmethod
    def forward(ctx, img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
        n = img.shape[0]
        tiles = _tiles(n, block)
        row_max, col_max = img.new_full((n,), float("-inf")), img.new_full((n,), float("-inf"))
        row_sum, col_sum = img.new_zeros(n), img.new_zeros(n)
        for r0, r1 in tiles:
            qs = img[r0:r1] * scale
            for c0, c1 in tiles:
                logits = qs @ txt[c0:c1].t()
                new_row = torch.maximum(row_max[r0:r1], logits.amax(dim=1))
                new_col = torch.maximum(col_max[c0:c1], logits.amax(dim=0))
                row_sum[r0:r1] = (row_sum[r0:r1] * torch.exp(row_max[r0:r1] - new_row)
                                  + torch.exp(logits - new_row[:, None]).sum(dim=1))
                col_sum[c0:c1] = (col_sum[c0:c1] * torch.exp(col_max[c0:c1] - new_col)
                                  + logits.sub_(new_col[None, :]).exp_().sum(dim=0))
                row_max[r0:r1], col_max[c0:c1] = new_row, new_col
        row_lse, col_lse = row_max + torch.log(row_sum), col_max + torch.log(col_sum)
        ctx.save_for_backward(img, txt, scale, row_lse, col_lse)
        ctx.block = block
        return row_lse.sum() + col_lse.sum() - 2 * scale * (img * txt).sum()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        img, txt, scale, row_lse, col_lse = ctx.saved_tensors
        tiles = _tiles(img.shape[0], ctx.block)
        with torch.autocast(img.device.type, enabled=False):
            pt = torch.zeros_like(img)  # rows of (P_row + P_col) @ txt
            pi = torch.zeros_like(txt)  # rows of (P_row + P_col)^T @ img
            for r0, r1 in tiles:
                ib = img[r0:r1]
                qs = ib * scale
                for c0, c1 in tiles:
                    tb = txt[c0:c1]
                    logits = qs @ tb.t()
                    probs = torch.exp(logits - row_lse[r0:r1, None]).add_(logits.sub_(col_lse[None, c0:c1]).exp_())
                    pt[r0:r1] += probs @ tb
                    pi[c0:c1] += probs.t() @ ib
            gs = ((img * pt).sum() - 2 * (img * txt).sum()) * grad if ctx.needs_input_grad[2] else None
            g = grad * scale
            g_img = (pt - 2 * txt) * g if ctx.needs_input_grad[0] else None
            g_txt = (pi - 2 * img) * g if ctx.needs_input_grad[1] else None
        return g_img, g_txt, gs, None


class _BlockedSigmoid(torch.autograd.Function):
    """``sum_ij softplus(-z_ij (s q_i . k_j + b))`` over the rows of ``q`` (n, E) against all rows of
    ``k`` (N, E), ``z = +1`` at (i, offset + i) and ``-1`` elsewhere, in (block x block) tiles.

    The forward pass sums ``softplus(L)`` (every pair as a negative) tile by tile and then corrects the
    n positives (``softplus(-L_ii) - softplus(L_ii)``); it saves only ``q``, ``k``, ``s`` and ``b``. With
    ``G = sigmoid(L) - Z+`` (``Z+`` the positives' indicator), the derivative of the sum with respect to the
    logits, the backward pass recomputes each tile: ``dq = s G k``, ``dk = s G^T q``,
    ``ds = sum_i q_i . (G k)_i`` and ``db = sum G``.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, offset: int,
                block: int) -> torch.Tensor:
        n, big = q.shape[0], k.shape[0]
        total = q.new_zeros(())
        for r0, r1 in _tiles(n, block):
            qs = q[r0:r1] * scale
            for c0, c1 in _tiles(big, block):
                total = total + F.softplus(torch.addmm(bias.expand(r1 - r0, c1 - c0), qs, k[c0:c1].t())).sum()
        positives = scale * (q * k[offset:offset + n]).sum(dim=1) + bias
        total = total + (F.softplus(-positives) - F.softplus(positives)).sum()
        ctx.save_for_backward(q, k, scale, bias)
        ctx.offset, ctx.block = offset, block
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, k, scale, bias = ctx.saved_tensors
        offset, block = ctx.offset, ctx.block
        n, big = q.shape[0], k.shape[0]
        need_q, need_k, need_s, need_b = ctx.needs_input_grad[:4]
        with torch.autocast(q.device.type, enabled=False):
            gk_ = torch.zeros_like(k) if need_k else None
            pk = torch.zeros_like(q)  # rows of G @ k (before the positives' correction)
            psum = q.new_zeros(())
            for r0, r1 in _tiles(n, block):
                qb = q[r0:r1]
                qs = qb * scale
                for c0, c1 in _tiles(big, block):
                    kb = k[c0:c1]
                    probs = torch.addmm(bias.expand(r1 - r0, c1 - c0), qs, kb.t()).sigmoid_()
                    pk[r0:r1] += probs @ kb
                    if need_k:
                        gk_[c0:c1] += probs.t() @ qb
                    if need_b:
                        psum = psum + probs.sum()
            gk = k[offset:offset + n]
            pk -= gk
            gq = pk * (grad * scale) if need_q else None
            gs = (q * pk).sum() * grad if need_s else None
            gb = (psum - n) * grad if need_b else None
            if need_k:
                gk_[offset:offset + n] -= q
                gk_ *= grad * scale
        return gq, gk_, gs, gb, None, None


def _normalized(image_features, text_features, all_image_features, all_text_features):
    """The local and gathered features, upcast to at least fp32 and L2-normalised (the gathered
    ones default to the local ones). Call inside the autocast-disabled region of a loss."""
    img = F.normalize(at_least_fp32(image_features), dim=-1)
    txt = F.normalize(at_least_fp32(text_features), dim=-1)
    all_img = img if all_image_features is None else F.normalize(at_least_fp32(all_image_features), dim=-1)
    all_txt = txt if all_text_features is None else F.normalize(at_least_fp32(all_text_features), dim=-1)
    return img, txt, all_img, all_txt


def blocked_clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                      rank: int = 0, all_image_features: Optional[torch.Tensor] = None,
                      all_text_features: Optional[torch.Tensor] = None, block_size: int = 4096) -> torch.Tensor:
    """``clip_loss`` computed in (block_size x block_size) tiles with a streaming log-sum-exp: the same
    value and gradients (up to the order of the sums), peak memory O(B x block_size) instead of O(B^2).
    Arguments as ``clip_loss``; ``block_size``: the tile side (rows and columns of the logit matrix)."""
    if block_size < 1:
        raise ValueError(f"block_size must be a positive number of rows, not {block_size}")
    with torch.autocast(image_features.device.type, enabled=False):
        img, txt, all_img, all_txt = _normalized(image_features, text_features, all_image_features,
                                                 all_text_features)
        scale = logit_scale.to(img.dtype)
        if all_image_features is None and all_text_features is None:  # one process: each tile serves both directions
            return _BlockedSymmetricInfoNCE.apply(img, txt, scale, block_size) / (2 * img.shape[0])
        offset = rank * img.shape[0]
        total = (_BlockedInfoNCE.apply(img, all_txt, scale, offset, block_size)
                 + _BlockedInfoNCE.apply(txt, all_img, scale, offset, block_size))
        return total / (2 * img.shape[0])


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
              rank: int = 0, all_image_features: Optional[torch.Tensor] = None,
              all_text_features: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Local rows of the global symmetric InfoNCE, in fp32 (or float64 for float64 inputs)
    whatever autocast is active. Features are L2-normalised here.

    Args:
        image_features, text_features: this rank's (B, E) features, paired row by row.
        logit_scale: the EXPONENTIATED temperature, the multiplier of the cosines (open_clip's
            convention; ``DinoTxt.forward`` returns it): ``model.logit_scale.exp()``, at most 100.
        rank: index of this rank's block inside the gathered features.
        all_image_features, all_text_features: the gathered global features (defaults to local).
    """
    with torch.autocast(image_features.device.type, enabled=False):
        img, txt, all_img, all_txt = _normalized(image_features, text_features, all_image_features,
                                                 all_text_features)
        scale = logit_scale.to(img.dtype)
        labels = torch.arange(img.shape[0], device=img.device) + rank * img.shape[0]
        logits_per_image = scale * img @ all_txt.t()
        logits_per_text = scale * txt @ all_img.t()
        return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def sigmoid_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                 logit_bias: torch.Tensor, rank: int = 0, all_text_features: Optional[torch.Tensor] = None,
                 block_size: Optional[int] = None) -> torch.Tensor:
    """This rank's share of the global SigLIP loss: ``-sum_{i local, j global} log sigmoid(z_ij L_ij)`` over
    its own batch size, in fp32 (float64 for float64 inputs) whatever autocast is active.

    Args:
        image_features, text_features: this rank's (B, E) features, paired row by row (L2-normalised here).
        logit_scale: the EXPONENTIATED temperature (``model.logit_scale.exp()``), as for ``clip_loss``.
        logit_bias: the learnable bias ``b`` of the logits (``model.logit_bias``; SigLIP starts it at -10).
        rank: index of this rank's block inside the gathered texts.
        all_text_features: the gathered global texts (defaults to the local ones).
        block_size: None for the dense (B_rank, B) logit matrix, or the tile side of the blocked computation.
    """
    if logit_bias is None:
        raise ValueError("the sigmoid loss needs the model's logit_bias: build the model with model.init_logit_bias "
                         "(SigLIP: -10)")
    with torch.autocast(image_features.device.type, enabled=False):
        img, _, _, all_txt = _normalized(image_features, text_features, None, all_text_features)
        scale, bias = logit_scale.to(img.dtype), logit_bias.to(img.dtype)
        n = img.shape[0]
        offset = rank * n
        if block_size:
            return _BlockedSigmoid.apply(img, all_txt, scale, bias, offset, int(block_size)) / n
        logits = scale * img @ all_txt.t() + bias
        signs = -torch.ones_like(logits)
        signs[torch.arange(n, device=img.device), torch.arange(n, device=img.device) + offset] = 1.0
        return -F.logsigmoid(signs * logits).sum() / n


class _GlobalBatchLoss(nn.Module):
    """A loss over the global batch, dense or in tiles of ``block_size`` (None or 0: dense)."""

    def __init__(self, block_size: Optional[int] = None):
        super().__init__()
        if block_size is not None and block_size < 0:
            raise ValueError(f"loss block_size must be a positive number of rows (or 0/None for dense), not {block_size}")
        self.block_size = int(block_size) if block_size else None


class ClipLoss(_GlobalBatchLoss):
    """Global-batch symmetric InfoNCE; works in one process or under torch.distributed.

    ``forward(image_features, text_features, logit_scale)`` takes the exponentiated scale,
    as open_clip's ``ClipLoss`` does, so ``ClipLoss()(**model(images, ids))`` is the
    training loss of a ``DinoTxt``.

    Args:
        block_size: None (or 0) for the dense loss; a tile side for ``blocked_clip_loss`` (the
            same loss in O(B x block_size) memory).
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        # a bias shifts every logit of a softmax row alike: the InfoNCE does not depend on it (a model built
        # with one, for the sigmoid loss, can still be scored with this loss)
        rank, world = distributed_world()
        loss = clip_loss if self.block_size is None else partial(blocked_clip_loss, block_size=self.block_size)
        if world == 1:
            return loss(image_features, text_features, logit_scale)
        all_img, all_txt = gather_features(image_features, text_features)
        return loss(image_features, text_features, logit_scale, rank, all_img, all_txt)


class SigLipLoss(_GlobalBatchLoss):
    """The global-batch sigmoid loss of SigLIP, in one process or under torch.distributed.

    ``forward(image_features, text_features, logit_scale, logit_bias)`` takes the exponentiated scale and
    the bias, as open_clip's ``SigLipLoss`` does, so ``SigLipLoss()(**model(images, ids))`` is the training
    loss of a ``DinoTxt`` built with a bias (``model.init_logit_bias``).

    Args:
        block_size: None (or 0) for the dense loss; a tile side for the blocked computation.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        rank, world = distributed_world()
        all_txt = None if world == 1 else _AllGatherWithGrad.apply(text_features)
        return sigmoid_loss(image_features, text_features, logit_scale, logit_bias, rank, all_txt, self.block_size)


LOSSES = {"infonce": ClipLoss, "sigmoid": SigLipLoss}


def build_loss(kind: str = "infonce", block_size: Optional[int] = None) -> nn.Module:
    """The training loss ``loss.kind`` names: ``infonce`` (CLIP / LiT / dino.txt) or ``sigmoid`` (SigLIP)."""
    if kind not in LOSSES:
        raise ValueError(f"unknown loss kind '{kind}' (use {' or '.join(LOSSES)})")
    return LOSSES[kind](block_size)
