"""Frozen vision encoder wrapper (dino.txt / LiT: the image tower never trains).

``FrozenBackbone`` owns freezing so nothing else has to remember it: eval mode is
pinned (``train(True)`` is ignored, including the call Lightning makes after
validation), parameters have ``requires_grad=False``, the forward pass runs under
``torch.no_grad()``, and the weights are excluded from ``DinoTxt`` checkpoints.

Output: the last block's tokens after the final LayerNorm, ordered
``[CLS, registers x R, patches x N]`` (timm's ``forward_features`` for DINOv2 and
DINOv3 ViTs). The reference is timm's ``vit_*_patch14[_reg4]_dinov2`` which equals
the official DINOv2 models (Oquab et al., "DINOv2", TMLR 2024; Darcet et al.,
"Vision Transformers Need Registers", ICLR 2024) and timm's ``vit_*_patch16_dinov3``
for DINOv3 (Simeoni et al., "DINOv3", 2025).

Weight files (``FrozenBackbone(weights=...)``) in the official DINOv2 / DINOv3, transformers and timm
layouts are read and converted by ``dinotxt.models.weights``.

Any input size: a timm ViT with absolute position embeddings is built at the grid its
weights were trained at (37 x 37 for DINOv2), and ``dynamic_img_size`` resizes that
grid bicubically with antialias to each input's grid, once per forward (METHOD.md
section 1); registers get no position embedding. This is exactly the official
DINOv2-with-registers interpolation. The official DINOv2 models WITHOUT registers
interpolate slightly differently (a 0.1 offset on the scale factor, no antialias), so
at inputs other than 518 px their tokens differ from ours by that resampling only.
DINOv3 uses RoPE: nothing is resized.

Unlocking (``trainable_blocks=K``, ``model.backbone.trainable_blocks``; the LiT paper's "unlocked"
settings, Zhai et al. 2022): the last K entries of the encoder's ``blocks`` and every module registered
after them (timm ViTs: the final ``norm``; EfficientNet: ``conv_head`` and ``bn2``) train. They follow the
model's train / eval mode (BatchNorm layers excepted: their running statistics stay frozen, the usual
fine-tuning choice), their weights go into checkpoints under ``unlocked_backbone.`` and
``unlocked_state()`` returns them. Everything before them stays frozen and in eval mode, and autograd
records nothing there: no input of those blocks requires a gradient.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from ..utils.precision import backbone_autocast_dtype
from .cnn import CnnTokens, cnn_state, is_cnn_name
from .weights import (StateDict, key_report, load_state_dict_file, load_timm_state, native_grid,
                      read_backbone_state)


def names_code(name: str) -> bool:
    """Whether ``model.backbone.name`` is an import path (code to run) rather than a timm ViT or a
    ``cnn:<timm name>`` token source."""
    from ..utils.plugins import is_import_path

    return is_import_path(name) and not is_cnn_name(name)


class FrozenBackbone(nn.Module):
    """A frozen ViT returning ``[CLS, registers, patches]`` tokens.

    Args:
        name: timm model name (e.g. ``vit_large_patch14_reg4_dinov2``) or an import path
            ``package.module:factory`` whose factory returns an ``nn.Module``.
        weights: optional local weights file (official DINOv2 / DINOv3, Hugging Face
            transformers DINOv2, or timm layout; detected from the keys) or a state dict.
        img_size: training resolution. Any multiple of the patch size works at inference;
            with ``weights`` the position embeddings stay at the file's own grid and are
            resized from it for every input size.
        module: an already built ``nn.Module`` (takes precedence over ``name``). It must map
            images to tokens and expose ``embed_dim``, ``patch_size`` and either
            ``num_prefix_tokens`` or ``num_register_tokens``. A model holding such a
            backbone cannot be saved as a checkpoint (nothing could rebuild it).
        init_seed: seed of the random init when there are no weights, so a random-weight
            backbone is rebuilt identically (on load, in the feature cache, in curation).
        trust_code: allow ``name`` to be an import path (see ``dinotxt.utils.plugins``).
        trainable_blocks: unlock the last K blocks (0: everything frozen, the dino.txt / LiT recipe).
        **kwargs: extra constructor arguments (timm overrides such as ``depth``).
    """

    def __init__(
        self,
        name: str = "vit_large_patch14_reg4_dinov2",
        weights: Union[str, Path, StateDict, None] = None,
        img_size: int = 224,
        module: Optional[nn.Module] = None,
        init_seed: int = 0,
        trust_code: bool = False,
        trainable_blocks: int = 0,
        patch_token_layer: int = 1,
        **kwargs: Any,
    ):
        super().__init__()
        self.name = name
        self.patch_token_layer = int(patch_token_layer)
        if self.patch_token_layer < 1:
            raise ValueError(f"model.backbone.patch_token_layer={patch_token_layer}: 1 is the last layer, n the n-th last")
        self.img_size = img_size
        self.init_seed = int(init_seed)
        self.kwargs = dict(kwargs)
        # what rebuilds this backbone (DinoTxt.config): a weights file by path; a state dict or a
        # ready module cannot be written into a config
        self.weights_file: Optional[str] = str(weights) if isinstance(weights, (str, Path)) else None
        self.rebuild_problem: Optional[str] = None
        if module is not None:
            self.rebuild_problem = "it was passed as a ready module"
        elif weights is not None and self.weights_file is None:
            self.rebuild_problem = "its weights were passed as a state dict, not a file"
        self.is_timm = False
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            encoder, state, layout = self._build_encoder(name, weights, img_size, module, trust_code, kwargs)
        self._setup(encoder, name, weights, state, layout)
        self._unlock(int(trainable_blocks))

    def _build_encoder(self, name, weights, img_size, module, trust_code, kwargs):
        state: Optional[StateDict] = None
        layout = None
        if module is not None:
            encoder = module
        elif is_cnn_name(name):  # a timm CNN as a token source (dinotxt/models/cnn.py)
            try:
                encoder = CnnTokens(name[len("cnn:"):], **kwargs)
            except TypeError as e:
                raise ValueError(f"backbone '{name}' does not take model.backbone.kwargs {dict(kwargs)} ({e}); a CNN "
                                 "token source takes only 'stage'") from None
            if weights is not None:
                state, layout = cnn_state(weights, encoder), "cnn"
        elif ":" in name:
            from ..utils.plugins import import_object

            encoder = import_object(name, trust_code=trust_code, setting="model.backbone.name")(**kwargs)
        else:
            import timm

            build_size = img_size
            if weights is not None:
                # build at the grid the weights were trained at: every input size is then one
                # resize away from the original position embeddings, never two
                state, layout = read_backbone_state(weights)
                grid, proj = native_grid(state), state.get("patch_embed.proj.weight")
                if grid and proj is not None and proj.ndim == 4:
                    build_size = grid * int(proj.shape[-1])
            try:
                encoder = timm.create_model(
                    name, pretrained=False, num_classes=0, img_size=build_size, dynamic_img_size=True, **kwargs
                )
            except RuntimeError as e:
                raise ValueError(f"unknown timm backbone '{name}': {e}") from None
            self.is_timm = True
        return encoder, state, layout

    def _setup(self, encoder, name, weights, state, layout) -> None:
        if not isinstance(encoder, nn.Module):
            raise TypeError(f"backbone '{name}' did not build an nn.Module (got {type(encoder).__name__})")
        self.encoder = encoder
        self.embed_dim = int(getattr(encoder, "embed_dim", getattr(encoder, "num_features", 0)))
        patch = getattr(encoder, "patch_size", None)
        if patch is None and hasattr(encoder, "patch_embed"):
            patch = encoder.patch_embed.patch_size
        self.patch_size = int(patch[0] if isinstance(patch, (tuple, list)) else patch or 0)
        if hasattr(encoder, "num_prefix_tokens"):
            self.num_prefix_tokens = int(encoder.num_prefix_tokens)
        elif hasattr(encoder, "num_register_tokens"):
            self.num_prefix_tokens = 1 + int(encoder.num_register_tokens)
        else:
            raise ValueError(
                f"backbone '{name}' must expose num_prefix_tokens or num_register_tokens so the "
                "[CLS, registers, patches] split is known"
            )
        if not self.embed_dim or not self.patch_size:
            raise ValueError(f"backbone '{name}' must expose embed_dim and patch_size")
        blocks = getattr(encoder, "blocks", None)
        attn = getattr(blocks[0], "attn", None) if blocks is not None and len(blocks) else None
        # the official head takes the backbone's head count (a ViT-7B: 32 heads of 128, not width // 64)
        self.num_heads = int(getattr(attn, "num_heads", 0) or getattr(encoder, "num_heads", 0) or 0) or None
        if weights is not None:
            source = str(weights) if isinstance(weights, (str, Path)) else "state dict"
            if state is None:
                state, layout = self._read_state(weights)
            self.load_state(state, layout, source)
        self.requires_grad_(False)
        super().train(False)

    def _unlock(self, k: int) -> None:
        """Make the last ``k`` blocks, and the modules after them, trainable (see the module docstring)."""
        self.trainable_blocks = k
        self.unlocked_prefixes: Tuple[str, ...] = ()
        # plain list, not registered: the unlocked modules are already submodules of the encoder
        self.__dict__["_unlocked_modules"] = []
        if k == 0:
            return
        if k < 0:
            raise ValueError(f"model.backbone.trainable_blocks must be 0 or a positive number of blocks, not {k}")
        found = [(name, m) for name, m in self.named_modules()
                 if isinstance(getattr(m, "blocks", None), (nn.ModuleList, nn.Sequential))]
        if not found:
            raise ValueError(f"model.backbone.trainable_blocks={k}: backbone '{self.name}' has no 'blocks' list of "
                             "blocks to unlock (timm ViTs and EfficientNets have one); set it to 0")
        path, holder = found[0]
        depth = len(holder.blocks)
        children = [name for name, _ in holder.named_children()]
        # the modules after the blocks that hold weights (a final norm, a head convolution); parameter-free ones
        # (identity heads, pooling, dropout) stay as they are
        after = [c for c in children[children.index("blocks") + 1:]
                 if any(True for _ in getattr(holder, c).parameters()) or any(True for _ in getattr(holder, c).buffers())]
        if isinstance(self.encoder, CnnTokens) and self.encoder.stage is not None:
            # a CNN tapped at a feature stage (timm features_only) keeps every block, but only those up to the
            # tapped one are on the forward path: the last K of THOSE unlock, nothing after them
            tapped = self.encoder.net.feature_info.module_name()[-1]
            if not tapped.startswith("blocks.") or not tapped[len("blocks."):].isdigit():
                raise ValueError(f"model.backbone.trainable_blocks={k}: backbone '{self.name}' is tapped at {tapped}, "
                                 "not at one of its blocks; set it to 0")
            depth, after = int(tapped[len("blocks."):]) + 1, []
        if k > depth:
            raise ValueError(f"model.backbone.trainable_blocks={k}, but backbone '{self.name}' has {depth} blocks"
                             + (" up to its tapped feature stage" if len(holder.blocks) != depth else ""))
        base = f"{path}." if path else ""
        names = [f"{base}blocks.{i}" for i in range(depth - k, depth)] + [f"{base}{c}" for c in after]
        modules = dict(self.named_modules())
        self.__dict__["_unlocked_modules"] = [modules[n] for n in names]
        self.unlocked_prefixes = tuple(n + "." for n in names)
        for m in self._unlocked_modules:
            m.requires_grad_(True)
        self.train(self.training)

    def unlocked_state(self) -> StateDict:
        """Weights and buffers of the unlocked blocks (keys as in this module's state dict)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(self.unlocked_prefixes)} if self.trainable_blocks else {}

    def is_unlocked(self, key: str) -> bool:
        """Whether ``key`` (of this module's state dict or parameters) belongs to an unlocked block."""
        return bool(self.trainable_blocks) and key.startswith(self.unlocked_prefixes)

    @property
    def num_register_tokens(self) -> int:
        return self.num_prefix_tokens - 1

    def config_dict(self) -> Dict[str, Any]:
        """The ``BackboneConfig`` fields that rebuild this backbone (raises if nothing can)."""
        if self.rebuild_problem:
            raise ValueError(f"backbone '{self.name}' cannot be described by a config because {self.rebuild_problem}; "
                             "build it by name (a timm architecture or an import path) with weights from a file")
        return {"name": self.name, "weights": self.weights_file, "img_size": int(self.img_size),
                "init_seed": self.init_seed, "trainable_blocks": int(self.trainable_blocks),
                "patch_token_layer": self.patch_token_layer, "kwargs": dict(self.kwargs)}

    def _read_state(self, weights: Union[str, Path, StateDict]):
        """(state in this encoder's loading layout, layout name) of a file or state dict."""
        if self.is_timm:
            return read_backbone_state(weights)
        if isinstance(self.encoder, CnnTokens):
            return cnn_state(weights, self.encoder), "cnn"
        return (load_state_dict_file(weights) if isinstance(weights, (str, Path)) else dict(weights)), "plain"

    def load_weights(self, path: Union[str, Path, StateDict]) -> None:
        """Load a weights file (or state dict) strictly, in any supported layout."""
        source = str(path) if isinstance(path, (str, Path)) else "state dict"
        state, layout = self._read_state(path)
        self.load_state(state, layout, source)
        if isinstance(path, (str, Path)):
            self.weights_file = str(path)
        elif self.rebuild_problem is None:
            self.rebuild_problem = "its weights were passed as a state dict, not a file"

    def _model_description(self) -> Dict[str, int]:
        depth = len(getattr(self.encoder, "blocks", []))
        return {"width": self.embed_dim, "depth": depth, "patch": self.patch_size, "registers": self.num_register_tokens}

    def load_state(self, state: StateDict, layout: str, source: str = "state dict") -> None:
        """Load ``state`` (official / timm keys, see ``read_backbone_state``) strictly."""
        if self.is_timm:
            load_timm_state(self.encoder, self.name, state, layout, self._model_description(), source)
            return
        report = key_report(self.encoder.state_dict(), state)  # a user module: its own keys, loaded as they are
        if report:
            raise ValueError(f"weights {source} do not fit backbone '{self.name}': {report}")
        self.encoder.load_state_dict(state, strict=True)

    def full_state_dict(self) -> StateDict:
        """The encoder's state dict plus its RoPE periods (non-persistent in timm, but taken from the
        weights file when one was loaded), so writing and reloading it reproduces this backbone exactly."""
        state = dict(self.encoder.state_dict())
        rope = getattr(self.encoder, "rope", None)
        if rope is not None and isinstance(getattr(rope, "periods", None), torch.Tensor):
            state["rope.periods"] = rope.periods.detach().clone()
        return state

    def train(self, mode: bool = True) -> "FrozenBackbone":
        # Pinned: the frozen blocks never leave eval mode (no dropout / drop-path, fixed norms); unlocked
        # blocks follow ``mode``, but their BatchNorm statistics stay fixed
        super().train(False)
        if mode:
            for m in self.__dict__.get("_unlocked_modules", []):
                m.train(True)
                for sub in m.modules():
                    if isinstance(sub, nn.modules.batchnorm._BatchNorm):
                        sub.train(False)
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # frozen: no autograd at all; unlocked blocks record their graph where gradients are enabled
        with torch.no_grad() if not self.trainable_blocks else contextlib.nullcontext():
            if self.patch_token_layer > 1:
                tokens = self._tokens_with_earlier_patches(images)
            elif hasattr(self.encoder, "forward_features"):
                tokens = self.encoder.forward_features(images)
            else:
                tokens = self.encoder(images)
        if tokens.ndim != 3 or tokens.shape[-1] != self.embed_dim:
            raise ValueError(f"backbone returned {tuple(tokens.shape)}; expected (B, 1+R+N, {self.embed_dim}) tokens")
        return tokens

    def _tokens_with_earlier_patches(self, images: torch.Tensor) -> torch.Tensor:
        """[CLS of the last layer, registers and patches of the ``patch_token_layer``-th last layer], every
        token final-normed, as the official ``get_intermediate_layers(n, norm=True)`` gives them."""
        if not hasattr(self.encoder, "forward_intermediates"):
            raise ValueError(f"model.backbone.patch_token_layer={self.patch_token_layer} needs a timm ViT "
                             f"(forward_intermediates); backbone '{self.name}' has none")
        depth = len(self.encoder.blocks)
        if self.patch_token_layer > depth:
            raise ValueError(f"model.backbone.patch_token_layer={self.patch_token_layer} but the backbone has {depth} "
                             "blocks")
        final, (inter,) = self.encoder.forward_intermediates(images, indices=[depth - self.patch_token_layer],
                                                             return_prefix_tokens=True, norm=True, output_fmt="NLC")
        patches, prefix = inter
        return torch.cat([final[:, :1], prefix[:, 1:], patches], dim=1)

    def split_tokens(self, tokens: torch.Tensor):
        """(cls (B,D), registers (B,R,D), patches (B,N,D))."""
        p = self.num_prefix_tokens
        return tokens[:, 0], tokens[:, 1:p], tokens[:, p:]


def _fsdp2_sharded(module: torch.nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        return False
    return isinstance(module, FSDPModule)


def frozen_tokens(backbone: torch.nn.Module, images: torch.Tensor, autocast: Optional[str] = None) -> torch.Tensor:
    """Output tokens of the frozen backbone, as an ordinary (at least fp32) tensor the head can train on.
    A backbone with unlocked blocks (``trainable_blocks``) keeps its autograd graph (no inference mode).

    Args:
        backbone: the ``FrozenBackbone``.
        images: (B, 3, H, W) normalised images.
        autocast: ``None`` (fp32, or whatever autocast the caller runs under) or ``"bfloat16"``.
    """
    dtype = backbone_autocast_dtype(autocast)
    cast = torch.autocast(images.device.type, dtype=dtype) if dtype else contextlib.nullcontext()
    unlocked = bool(getattr(backbone, "trainable_blocks", 0))
    # frozen: no autograd bookkeeping at all; unlocked blocks need their graph. A backbone sharded by FSDP2
    # gathers its weights into buffers it writes again at every call: those must not be inference tensors
    mode = contextlib.nullcontext if unlocked else (torch.no_grad if _fsdp2_sharded(backbone) else torch.inference_mode)
    try:
        with mode(), cast:
            tokens = backbone(images)
    except RuntimeError as e:
        # torch's bf16 flash-attention CPU kernel picks its AMX packing from the hardware but refuses
        # it below the avx512 dispatch level (ATEN_CPU_CAPABILITY=default|avx2 on an AMX machine):
        # the math kernel computes the same attention
        if "pack_vnni2" not in str(e):
            raise
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with mode(), cast, sdpa_kernel([SDPBackend.MATH]):
            tokens = backbone(images)
    if unlocked:
        return tokens.to(torch.promote_types(tokens.dtype, torch.float32))
    # inference tensors cannot be saved for backward: copy outside inference mode (bf16 autocast
    # output becomes fp32; a float64 model, as the exactness tests run, stays float64)
    return tokens.to(torch.promote_types(tokens.dtype, torch.float32), copy=True)


__all__ = ["FrozenBackbone", "frozen_tokens"]
