"""Exact large-batch contrastive training by gradient caching (Gao, Zhang, Han & Callan 2021,
"Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup", GradCache).

The InfoNCE of a global batch couples every pair of samples, so plain gradient accumulation
(Lightning's ``accumulate_grad_batches``) is not the same training: each micro-batch would only
see its own negatives. Gradient caching computes the loss of the whole global batch (every
micro-batch of every rank, ``data.global_batch``) with the activation memory of two micro-batches
(at most: the one pass 1 keeps, then one in pass 2), whatever the global batch:

1. pass 1 embeds every micro-batch without an autograd graph (but the last);
2. the loss over all the (gathered) embeddings gives d loss / d embedding for each of them, and
   d loss / d temperature (and d loss / d bias for the sigmoid loss);
3. pass 2 embeds each micro-batch again, with a graph, and back-propagates its slice of those
   gradients (``sum(embedding * cached gradient)`` has exactly that gradient), accumulating into
   the parameters' ``.grad``; the temperature's gradient joins the last micro-batch. The last
   micro-batch is not embedded twice: pass 1 keeps its graph (K - 1 recomputations per step, not K).

The parameter gradients equal those of one pass over the whole global batch (the loss is a
function of the embeddings only). The frozen backbone runs once per image: its tokens are kept
between the passes (or come from the feature cache, where the image side costs nothing); with
unlocked blocks (``model.backbone.trainable_blocks``) the whole backbone runs in both passes. The
random draws of the head (drop path) are replayed: each micro-batch reseeds torch's RNG from
its own seed before it is embedded, in both passes. Under DDP every rank runs the same passes;
the loss gathers the embeddings of all ranks with gradients, and only the last backward pass of
a step all-reduces the accumulated gradients (``backward(tensor, last)``: the caller's
no-sync context for the others).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import ConfigError
from ..models.backbone import frozen_tokens
from ..utils.precision import at_least_fp32
from .step import image_features

TENSOR_FIELDS = ("image", "tokens", "pooled", "text")


def check_batch_config(cfg) -> None:
    """Refuse batch settings that would not train the contrastive batch the user asked for."""
    d, t = cfg.data, cfg.trainer
    if t.accumulate_grad_batches > 1:
        raise ConfigError(
            f"trainer.accumulate_grad_batches={t.accumulate_grad_batches} would give each micro-batch only its own "
            "negatives; set data.global_batch (the contrastive batch over all devices, exact gradient caching) instead")
    if d.global_batch and (d.global_batch < d.batch_size or d.global_batch % d.batch_size):
        raise ConfigError(f"data.global_batch={d.global_batch} must be a multiple of data.batch_size={d.batch_size} "
                          "(the micro-batch of one device)")


def micro_batches_per_step(global_batch: int, batch_size: int, world_size: int) -> int:
    """K, the micro-batches of ``batch_size`` each of ``world_size`` devices embeds per optimizer step."""
    if global_batch <= 0 or global_batch % (batch_size * world_size):
        raise ConfigError(
            f"data.global_batch={global_batch} must be a multiple of data.batch_size x devices = {batch_size} x "
            f"{world_size} = {batch_size * world_size}")
    return global_batch // (batch_size * world_size)


def merge_micro_batches(micro_batches: List[Dict]) -> Dict:
    """The K micro-batches of one optimizer step as one training batch: the micro-batches themselves,
    their readers' positions (max), skip counts (sum) and how many loader batches they are."""
    positions: Dict[int, int] = {}
    skipped: Dict[str, int] = {}
    for mb in micro_batches:
        for reader, pos in mb["positions"].items():
            positions[reader] = max(positions.get(reader, 0), pos)
        for reason, count in mb["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    return {"micro_batches": micro_batches, "positions": positions, "skipped": skipped,
            "loader_batches": len(micro_batches)}


def frozen_inputs(model, micro_batch: Dict, backbone_autocast: Optional[str] = None) -> Dict:
    """The micro-batch with its images replaced by the frozen backbone's tokens (run once, kept for
    both passes); cached tokens and pooled tokens pass through. A backbone with unlocked blocks trains,
    so its images stay: it runs in both passes, like the head."""
    out = {k: micro_batch[k] for k in TENSOR_FIELDS if k in micro_batch}
    if "image" in out and not model.backbone.trainable_blocks:
        out["tokens"] = frozen_tokens(model.backbone, out.pop("image"), backbone_autocast)
    return out


def embed(model, inputs: Dict, seed: int, backbone_autocast: Optional[str] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(image, text) embeddings of one micro-batch, its random draws taken from ``seed``."""
    torch.manual_seed(seed)
    return image_features(model, inputs, backbone_autocast), model.encode_text(inputs["text"])


def gradcache_backward(model, loss_fn, micro_batches: Sequence[Dict], seeds: Sequence[int],
                       backward: Optional[Callable[[torch.Tensor, bool], None]] = None,
                       backbone_autocast: Optional[str] = None,
                       check_loss: Optional[Callable[[torch.Tensor], None]] = None) -> torch.Tensor:
    """Accumulate into the parameters' ``.grad`` the gradient of the contrastive loss of all
    ``micro_batches`` together (and, under torch.distributed, of every rank's), one micro-batch's
    graph at a time; return the (detached) loss.

    Args:
        model: the ``DinoTxt``.
        loss_fn: the global-batch loss (``ClipLoss`` or ``SigLipLoss``, dense or blocked); it gathers across ranks.
        micro_batches: dicts with ``text`` and ``image``, ``tokens`` or ``pooled``.
        seeds: one seed per micro-batch for its random draws (drop path), used in both passes.
        backward: ``backward(tensor, last)`` back-propagates one micro-batch's surrogate (default
            ``tensor.backward()``); ``last`` is the step's final call, the one that may synchronise.
        backbone_autocast: as ``trainer.backbone_autocast``.
        check_loss: called with the loss before any gradient is touched (e.g. to stop on a NaN).
    """
    if len(seeds) != len(micro_batches) or not micro_batches:
        raise ValueError(f"gradcache_backward needs one seed per micro-batch ({len(seeds)} for {len(micro_batches)})")
    backward = backward or (lambda tensor, last: tensor.backward())
    inputs = [frozen_inputs(model, mb, backbone_autocast) for mb in micro_batches]
    with torch.no_grad():  # pass 1: embeddings only ...
        embedded = [embed(model, x, seed, backbone_autocast) for x, seed in zip(inputs[:-1], seeds[:-1])]
    # ... except the last micro-batch, which keeps its graph: pass 2 does not embed it again (1/K of the
    # recomputation saved; with K = 1 nothing is recomputed). Its activations live through the loss.
    kept_img, kept_txt = embed(model, inputs[-1], seeds[-1], backbone_autocast)
    embedded.append((kept_img.detach(), kept_txt.detach()))
    img = torch.cat([e[0] for e in embedded]).requires_grad_()
    txt = torch.cat([e[1] for e in embedded]).requires_grad_()
    del embedded
    scale = model.logit_scale.detach().exp().requires_grad_()
    bias = None if getattr(model, "logit_bias", None) is None else model.logit_bias.detach().clone().requires_grad_()
    loss = loss_fn(img, txt, scale, bias)
    if check_loss is not None:
        check_loss(loss.detach())
    # allow_unused: the InfoNCE does not depend on a bias (a model built with one may still train with it)
    grads = torch.autograd.grad(loss, (img, txt, scale) + (() if bias is None else (bias,)), allow_unused=True)
    grad_img, grad_txt, grad_scale = grads[:3]
    del img, txt

    def surrogate(e_img: torch.Tensor, e_txt: torch.Tensor, rows: slice) -> torch.Tensor:
        # its value is meaningless, its gradient is the cached one (summed in at least fp32 so that a fp16
        # value cannot overflow under a gradient scaler)
        return ((at_least_fp32(e_img) * at_least_fp32(grad_img[rows])).sum()
                + (at_least_fp32(e_txt) * at_least_fp32(grad_txt[rows])).sum())

    start = 0
    for x, seed in zip(inputs[:-1], seeds[:-1]):  # pass 2: one micro-batch's graph at a time
        e_img, e_txt = embed(model, x, seed, backbone_autocast)
        rows = slice(start, start + e_img.shape[0])
        backward(surrogate(e_img, e_txt, rows), False)
        start = rows.stop
    last = surrogate(kept_img, kept_txt, slice(start, start + kept_img.shape[0]))
    last = last + model.logit_scale.exp() * grad_scale  # the temperature's (and bias's) gradient joins the last call
    if bias is not None and grads[3] is not None:
        last = last + model.logit_bias * grads[3]
    backward(last, True)
    return loss.detach()
