"""Multi-process strategies for ``trainer.strategy`` (Lightning), set up for a frozen tower.

- ``ddp``: one full replica per process; only trainable parameters (head, text tower,
  logit scale, unlocked backbone blocks) are registered for gradient all-reduce, the frozen
  backbone never is.
  The contrastive loss gathers features with gradients over all ranks (``dinotxt.train.loss``),
  so DDP's gradient averaging gives exactly the single-process gradient of the global batch.
- ``fsdp``: parameters sharded across processes (under bf16: bf16 parameters, gradients reduced
  in fp32, as the official trainer), one FSDP unit per transformer block of the
  text tower, of the vision head and of the frozen backbone (so even ViT-g and a 1280-wide
  text tower fit), ``use_orig_params`` so frozen and trainable weights can share a unit, and
  full (unsharded) state dicts in checkpoints so they load anywhere.
- anything else (``auto``, ``ddp_spawn``, ``deepspeed_stage_2`` ...) is passed to Lightning as is.

Activation checkpointing is set per tower in the model config
(``model.text.grad_checkpointing``, ``model.vision_head.grad_checkpointing``) and works
under every strategy.
"""
from __future__ import annotations

from typing import Set, Type, Union

from torch import nn


def block_classes() -> Set[Type[nn.Module]]:
    """Transformer block classes that become one FSDP unit each."""
    from ..models.text_tower import TextBlock
    from ..models.vision_head import HeadBlock

    classes: Set[Type[nn.Module]] = {TextBlock, HeadBlock}
    try:  # timm ViT blocks of the frozen backbone (plain and SwiGLU / DINOv3 variants share this class)
        from timm.models.vision_transformer import Block

        classes.add(Block)
    except ImportError:
        pass
    return classes


def fsdp_mixed_precision(precision: str):
    """The official trainer's FSDP precision under bf16: parameters (and buffers) in bf16, gradients
    REDUCED in fp32 (Lightning's bf16 plugin would reduce them in bf16); None for fp32 runs."""
    if not str(precision).startswith("bf16"):
        return None
    import torch
    from torch.distributed.fsdp import MixedPrecision

    return MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16)


def build_strategy(name: str, precision: str = "32-true") -> Union[str, object]:
    """A Lightning strategy object for ``ddp`` / ``fsdp``; other names are returned unchanged."""
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # every trainable parameter is used every step (drop path scales, it does not skip parameters)
        return DDPStrategy(find_unused_parameters=False)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(auto_wrap_policy=block_classes(), sharding_strategy="FULL_SHARD", use_orig_params=True,
                            state_dict_type="full", mixed_precision=fsdp_mixed_precision(precision))
    return name
