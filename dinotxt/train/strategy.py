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
- ``fsdp2``: the official trainer's form, FSDP2 (``torch.distributed.fsdp.fully_shard``, per-parameter
  DTensor shards): ``fully_shard`` on every transformer block (text tower, vision head, frozen backbone),
  then on each tower for what is left in it (embeddings, norms, projections); the temperature (and logit
  bias) stay whole on every rank and their gradient is averaged before each step (``sync_replicated_grads``);
  under bf16 the official policy (bf16 parameters, fp32 gradient reduction).
  Lightning's ``ModelParallelStrategy`` runs it (data parallel over every process, no tensor parallel);
  the system's ``configure_model`` applies ``apply_fsdp2``; checkpoints gather full weights.
- anything else (``auto``, ``ddp_spawn``, ``deepspeed_stage_2`` ...) is passed to Lightning as is.

Activation checkpointing is set per tower in the model config
(``model.text.grad_checkpointing``, ``model.vision_head.grad_checkpointing``) and works
under every strategy.
"""
from __future__ import annotations

import functools
import warnings
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


def fsdp2_mixed_precision(precision: str):
    """FSDP2's form of the same policy: ``MixedPrecisionPolicy`` (bf16 parameters, fp32 reduction) under bf16;
    the default policy (parameters and reduction in their own dtype) otherwise."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if not str(precision).startswith("bf16"):
        return MixedPrecisionPolicy()
    import torch

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def apply_fsdp2(model: nn.Module, mesh=None, precision: str = "32-true") -> nn.Module:
    """Shard ``model`` (a ``DinoTxt``) in place with FSDP2: one ``fully_shard`` group per transformer block
    (``block_classes``: text blocks, head blocks, the backbone's blocks), then one group per tower for what
    is left in it (the backbone's patch embedding, the head's norm and projection, the text embeddings and
    projection). The training step reaches the towers through their own forward methods (the head's
    ``forward_pooled`` / ``forward_tokens`` are registered as such), never through the model's. The
    temperature (and the logit bias) stay whole on every rank: ``sync_replicated_grads`` averages their
    gradients before each optimizer step (the official trainer leaves them unsynced). ``mesh``: a 1-D
    device mesh over the data-parallel processes (None: every process of the default group)."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    # the towers return views (x[:, 0], a stochastic-depth subset merged back); nothing writes into them in place,
    # which is what FSDP2's warning about views is about
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    policy = fsdp2_mixed_precision(precision)
    classes = tuple(block_classes())
    for block in [m for m in model.modules() if isinstance(m, classes)]:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    for tower in (model.backbone, model.vision_head, model.text):
        fully_shard(tower, mesh=mesh, mp_policy=policy)
    for method in ("forward_pooled", "forward_tokens"):
        register_fsdp_forward_method(model.vision_head, method)
    model.fsdp2 = True
    return model


def replicated_params(model: nn.Module):
    """The trainable parameters ``apply_fsdp2`` leaves whole on every rank (the temperature, the logit bias)."""
    return [p for name, p in model.named_parameters(recurse=False) if p.requires_grad]


def sync_replicated_grads(model: nn.Module) -> None:
    """Average the gradients of ``replicated_params`` over the processes (a model not sharded by
    ``apply_fsdp2``: nothing to do; DDP and FSDP1 reduce them themselves)."""
    if not getattr(model, "fsdp2", False):
        return
    import torch.distributed as dist

    for p in replicated_params(model):
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(dist.get_world_size())


def sharded_full_state(model: nn.Module):
    """The full (unsharded) state dict of a model sharded by ``apply_fsdp2``, on the CPU of rank 0 (empty on the
    others; a collective: every rank must call it); None for a model that is not (its own tensors are whole)."""
    if not getattr(model, "fsdp2", False):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def build_strategy(name: str, precision: str = "32-true") -> Union[str, object]:
    """A Lightning strategy object for ``ddp`` / ``fsdp`` / ``fsdp2``; other names are returned unchanged."""
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        # every trainable parameter is used every step (drop path scales, it does not skip parameters)
        return DDPStrategy(find_unused_parameters=False)
    if name == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        return FSDPStrategy(auto_wrap_policy=block_classes(), sharding_strategy="FULL_SHARD", use_orig_params=True,
                            state_dict_type="full", mixed_precision=fsdp_mixed_precision(precision))
    if name == "fsdp2":
        return FSDP2Strategy(precision)
    return name


@functools.lru_cache(maxsize=None)
def _fsdp2_strategy_class():
    """The class, built once on first use (Lightning is imported only by the training path)."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    class FSDP2Strategy(ModelParallelStrategy):
        """``ModelParallelStrategy`` as pure data parallelism: a mesh of (every process, 1) (its own "auto" would make
        the processes of one node a tensor-parallel group), full state dicts in Lightning checkpoints (one file,
        loads anywhere); ``mp_precision`` is what ``apply_fsdp2`` is given."""

        def __init__(self, precision: str = "32-true"):
            super().__init__(save_distributed_checkpoint=False)
            self.mp_precision = str(precision)

        def setup_environment(self) -> None:
            self._data_parallel_size, self._tensor_parallel_size = self.world_size, 1
            super().setup_environment()

    return FSDP2Strategy


def FSDP2Strategy(precision: str = "32-true"):  # noqa: N802 (constructs the class above)
    return _fsdp2_strategy_class()(precision)
