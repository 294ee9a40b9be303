"""An INDEPENDENT implementation of the official architectures, written from the official
code (facebookresearch/dinov2 ``dinov2/models/vision_transformer.py``, ``dinov2/layers``,
``dinov2/hub/text/*``; facebookresearch/dinov3 ``dinov3/models/vision_transformer.py``,
``dinov3/layers``), plus builders of random state dicts in the official key layouts
(METHOD.md sections 1, 2 and 6).

Everything here is functional code over the official state dict: no timm, no dinotxt
modules, explicit softmax attention instead of SDPA. The other tests load the same
state dicts through dinotxt and compare against these functions.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

Sd = Dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- builders


def _ln(sd: Sd, prefix: str, dim: int, g: torch.Generator) -> None:
    sd[prefix + ".weight"] = 1 + 0.1 * torch.randn(dim, generator=g)
    sd[prefix + ".bias"] = 0.1 * torch.randn(dim, generator=g)


def _lin(sd: Sd, prefix: str, out: int, inp: int, g: torch.Generator, bias: bool = True) -> None:
    sd[prefix + ".weight"] = torch.randn(out, inp, generator=g) * inp ** -0.5
    if bias:
        sd[prefix + ".bias"] = 0.1 * torch.randn(out, generator=g)


def official_dinov2_state(dim: int = 384, depth: int = 2, grid: int = 8, registers: int = 4, patch: int = 14,
                          swiglu: bool = False, seed: int = 0) -> Sd:
    """A ``dinov2_vit*14[_reg4]_pretrain.pth`` state dict (random values, official keys and shapes)."""
    g = torch.Generator().manual_seed(seed)
    sd: Sd = {
        "cls_token": 0.5 * torch.randn(1, 1, dim, generator=g),
        "pos_embed": 0.5 * torch.randn(1, 1 + grid * grid, dim, generator=g),
        "mask_token": torch.zeros(1, dim),
        "patch_embed.proj.weight": torch.randn(dim, 3, patch, patch, generator=g) * (3 * patch * patch) ** -0.5,
        "patch_embed.proj.bias": 0.1 * torch.randn(dim, generator=g),
    }
    if registers:
        sd["register_tokens"] = 0.5 * torch.randn(1, registers, dim, generator=g)
    for i in range(depth):
        p = f"blocks.{i}"
        _ln(sd, f"{p}.norm1", dim, g)
        _lin(sd, f"{p}.attn.qkv", 3 * dim, dim, g)
        _lin(sd, f"{p}.attn.proj", dim, dim, g)
        sd[f"{p}.ls1.gamma"] = 0.5 * torch.rand(dim, generator=g)  # far from 1e-5, so every block matters
        _ln(sd, f"{p}.norm2", dim, g)
        if swiglu:  # ViT-g: SwiGLUFFNFused, hidden (int(4D * 2/3) + 7) // 8 * 8, packed w12
            hidden = (int(4 * dim * 2 / 3) + 7) // 8 * 8
            _lin(sd, f"{p}.mlp.w12", 2 * hidden, dim, g)
            _lin(sd, f"{p}.mlp.w3", dim, hidden, g)
        else:
            _lin(sd, f"{p}.mlp.fc1", 4 * dim, dim, g)
            _lin(sd, f"{p}.mlp.fc2", dim, 4 * dim, g)
        sd[f"{p}.ls2.gamma"] = 0.5 * torch.rand(dim, generator=g)
    _ln(sd, "norm", dim, g)
    return sd


def official_dinov3_state(dim: int = 384, depth: int = 2, heads: int = 6, storage: int = 4, patch: int = 16,
                          qkv_bias: bool = True, seed: int = 0) -> Sd:
    """A DINOv3 ``.pth`` state dict: storage tokens, RoPE periods (bf16-rounded as released), masked k bias."""
    g = torch.Generator().manual_seed(seed)
    head_dim = dim // heads
    periods = 100.0 ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))
    sd: Sd = {
        "cls_token": 0.5 * torch.randn(1, 1, dim, generator=g),
        "storage_tokens": 0.5 * torch.randn(1, storage, dim, generator=g),
        "mask_token": torch.zeros(1, dim),
        "patch_embed.proj.weight": torch.randn(dim, 3, patch, patch, generator=g) * (3 * patch * patch) ** -0.5,
        "patch_embed.proj.bias": 0.1 * torch.randn(dim, generator=g),
        "rope_embed.periods": periods.bfloat16().float(),
    }
    for i in range(depth):
        p = f"blocks.{i}"
        _ln(sd, f"{p}.norm1", dim, g)
        _lin(sd, f"{p}.attn.qkv", 3 * dim, dim, g)
        mask = torch.ones(3 * dim)
        mask[dim:2 * dim] = 0  # LinearKMaskedBias: the key bias is stored but multiplied by 0
        sd[f"{p}.attn.qkv.bias_mask"] = mask
        if not qkv_bias:
            sd[f"{p}.attn.qkv.bias"] = torch.zeros(3 * dim)
        _lin(sd, f"{p}.attn.proj", dim, dim, g)
        sd[f"{p}.ls1.gamma"] = 0.5 * torch.rand(dim, generator=g)
        _ln(sd, f"{p}.norm2", dim, g)
        _lin(sd, f"{p}.mlp.fc1", 4 * dim, dim, g)
        _lin(sd, f"{p}.mlp.fc2", dim, 4 * dim, g)
        sd[f"{p}.ls2.gamma"] = 0.5 * torch.rand(dim, generator=g)
    _ln(sd, "norm", dim, g)
    return sd


def official_vision_head_state(dim: int = 384, num_blocks: int = 2, prefix: str = "block_list", seed: int = 1) -> Sd:
    """dino.txt vision head (``*_vision_head.pth``): METHOD.md section 6 keys, SwiGLU hidden aligned to 64."""
    g = torch.Generator().manual_seed(seed)
    d = int(4 * dim * 2 / 3)
    hidden = d + (-d % 64)  # SwiGLUFFNAligned(align_to=64)
    sd: Sd = {}
    for i in range(num_blocks):
        p = f"{prefix}.{i}"
        _ln(sd, f"{p}.norm1", dim, g)
        _lin(sd, f"{p}.attn.qkv", 3 * dim, dim, g, bias=False)
        _lin(sd, f"{p}.attn.proj", dim, dim, g)
        sd[f"{p}.ls1.gamma"] = 0.5 * torch.rand(dim, generator=g)
        _ln(sd, f"{p}.norm2", dim, g)
        _lin(sd, f"{p}.mlp.w1", hidden, dim, g)
        _lin(sd, f"{p}.mlp.w2", hidden, dim, g)
        _lin(sd, f"{p}.mlp.w3", dim, hidden, g)
        sd[f"{p}.ls2.gamma"] = 0.5 * torch.rand(dim, generator=g)
    _ln(sd, "ln_final", dim, g)
    return sd


def official_text_encoder_state(vocab: int = 49408, context: int = 77, width: int = 64, depth: int = 2,
                                output_dim: int = 768, seed: int = 2) -> Sd:
    """dino.txt text encoder (``*_text_encoder.pth``): METHOD.md section 6 keys."""
    g = torch.Generator().manual_seed(seed)
    sd: Sd = {
        "backbone.token_embedding.weight": 0.5 * torch.randn(vocab, width, generator=g),
        "backbone.positional_embedding": 0.5 * torch.randn(context, width, generator=g),
    }
    for i in range(depth):
        p = f"backbone.blocks.{i}"
        _ln(sd, f"{p}.attention_norm", width, g)
        _lin(sd, f"{p}.attention.qkv", 3 * width, width, g, bias=False)
        _lin(sd, f"{p}.attention.proj", width, width, g)
        _ln(sd, f"{p}.ffn_norm", width, g)
        _lin(sd, f"{p}.feed_forward.fc1", 4 * width, width, g)
        _lin(sd, f"{p}.feed_forward.fc2", width, 4 * width, g)
    _ln(sd, "backbone.ln_final", width, g)
    _lin(sd, "head.linear_projection", output_dim, width, g, bias=False)
    return sd


def official_to_hf_dinov2(sd: Sd) -> Sd:
    """Official DINOv2 keys -> transformers ``Dinov2Model`` keys, following convert_dinov2_to_hf.py."""
    out: Sd = {}
    top = {"cls_token": "embeddings.cls_token", "mask_token": "embeddings.mask_token",
           "register_tokens": "embeddings.register_tokens", "pos_embed": "embeddings.position_embeddings",
           "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
           "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
           "norm.weight": "layernorm.weight", "norm.bias": "layernorm.bias"}
    for k, v in sd.items():
        if k in top:
            out[top[k]] = v
            continue
        _, i, rest = k.split(".", 2)
        p = f"encoder.layer.{i}."
        if rest.startswith("attn.qkv."):
            kind = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), v.chunk(3)):
                out[f"{p}attention.attention.{name}.{kind}"] = part
        else:
            rest = (rest.replace("ls1.gamma", "layer_scale1.lambda1").replace("ls2.gamma", "layer_scale2.lambda1")
                    .replace("attn.proj", "attention.output.dense").replace("mlp.w12", "mlp.weights_in")
                    .replace("mlp.w3", "mlp.weights_out"))
            out[p + rest] = v
    return out


# ---------------------------------------------------------------------------- forwards


def _attention(x: torch.Tensor, qkv_w, qkv_b, proj_w, proj_b, heads: int, causal: bool = False, rope=None,
               ) -> torch.Tensor:
    B, L, D = x.shape
    q, k, v = F.linear(x, qkv_w, qkv_b).reshape(B, L, 3, heads, D // heads).unbind(2)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if rope is not None:  # DINOv3: rotate the patch tokens only (the prefix tokens come first)
        sin, cos = rope
        prefix = L - sin.shape[0]

        def rotate(t):
            body = t[:, :, prefix:]
            t1, t2 = body.chunk(2, dim=-1)
            return torch.cat([t[:, :, :prefix], body * cos + torch.cat([-t2, t1], dim=-1) * sin], dim=2)

        q, k = rotate(q), rotate(k)
    scores = (q * (D // heads) ** -0.5) @ k.transpose(-2, -1)
    if causal:
        scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, D)
    return F.linear(out, proj_w, proj_b)


def _norm(sd: Sd, prefix: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps)


def _vit_block(sd: Sd, p: str, x: torch.Tensor, heads: int, eps: float, qkv_bias=None, rope=None) -> torch.Tensor:
    y = _norm(sd, p + ".norm1", x, eps)
    x = x + sd[p + ".ls1.gamma"] * _attention(y, sd[p + ".attn.qkv.weight"], qkv_bias, sd[p + ".attn.proj.weight"],
                                             sd[p + ".attn.proj.bias"], heads, rope=rope)
    y = _norm(sd, p + ".norm2", x, eps)
    if p + ".mlp.w12.weight" in sd:  # DINOv2 ViT-g SwiGLUFFN: silu(x1) * x2 of the packed w12
        x1, x2 = F.linear(y, sd[p + ".mlp.w12.weight"], sd[p + ".mlp.w12.bias"]).chunk(2, dim=-1)
        m = F.linear(F.silu(x1) * x2, sd[p + ".mlp.w3.weight"], sd[p + ".mlp.w3.bias"])
    elif p + ".mlp.w1.weight" in sd:  # dino.txt head SwiGLUFFNAligned: w3(silu(w1 x) * w2 x)
        m = F.linear(F.silu(F.linear(y, sd[p + ".mlp.w1.weight"], sd[p + ".mlp.w1.bias"]))
                     * F.linear(y, sd[p + ".mlp.w2.weight"], sd[p + ".mlp.w2.bias"]),
                     sd[p + ".mlp.w3.weight"], sd[p + ".mlp.w3.bias"])
    else:
        m = F.linear(F.gelu(F.linear(y, sd[p + ".mlp.fc1.weight"], sd[p + ".mlp.fc1.bias"])),
                     sd[p + ".mlp.fc2.weight"], sd[p + ".mlp.fc2.bias"])
    return x + sd[p + ".ls2.gamma"] * m


def _depth(sd: Sd, prefix: str = "blocks") -> int:
    return 1 + max(int(k.split(".")[len(prefix.split("."))]) for k in sd if k.startswith(prefix + "."))


def official_dinov2_tokens(sd: Sd, images: torch.Tensor, heads: int, interpolate_antialias: bool = True,
                           interpolate_offset: float = 0.0) -> torch.Tensor:
    """DINOv2 ``forward_features`` -> ``[CLS, registers, patches]`` after the final norm (eps 1e-6).

    ``interpolate_pos_encoding`` as in the official code: reg4 models use antialias and
    ``size=``; the models without registers use ``scale_factor=(w0 + 0.1) / M`` and no antialias.
    """
    B, _, H, W = images.shape
    w = sd["patch_embed.proj.weight"]
    D, P = w.shape[0], w.shape[-1]
    x = F.conv2d(images, w, sd["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1)
    pos = sd["pos_embed"].float()
    M = math.isqrt(pos.shape[1] - 1)
    h0, w0 = H // P, W // P
    if (h0, w0) != (M, M):
        grid = pos[:, 1:].reshape(1, M, M, D).permute(0, 3, 1, 2)
        if interpolate_offset:
            kwargs = {"scale_factor": ((h0 + interpolate_offset) / M, (w0 + interpolate_offset) / M)}
        else:
            kwargs = {"size": (h0, w0)}
        grid = F.interpolate(grid, mode="bicubic", antialias=interpolate_antialias, **kwargs)
        pos = torch.cat([pos[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, D)], dim=1)
    x = x + pos
    if "register_tokens" in sd:
        x = torch.cat([x[:, :1], sd["register_tokens"].expand(B, -1, -1), x[:, 1:]], dim=1)
    for i in range(_depth(sd)):
        x = _vit_block(sd, f"blocks.{i}", x, heads, 1e-6, qkv_bias=sd[f"blocks.{i}.attn.qkv.bias"])
    return _norm(sd, "norm", x, 1e-6)


def official_dinov3_rope(periods: torch.Tensor, H: int, W: int):
    """RopePositionEmbedding.forward (normalize_coords='separate', eval: no coordinate augmentation)."""
    coords_h = torch.arange(0.5, H, dtype=torch.float32) / H
    coords_w = torch.arange(0.5, W, dtype=torch.float32) / W
    coords = torch.stack(torch.meshgrid(coords_h, coords_w, indexing="ij"), dim=-1).flatten(0, 1)
    coords = 2.0 * coords - 1.0
    angles = 2 * math.pi * coords[:, :, None] / periods[None, None, :]
    angles = angles.flatten(1, 2).tile(2)
    return torch.sin(angles), torch.cos(angles)


def official_dinov3_tokens(sd: Sd, images: torch.Tensor, heads: int) -> torch.Tensor:
    """DINOv3 ``get_intermediate_layers(n=1, norm=True)`` tokens ``[CLS, storage, patches]`` (LayerNorm eps 1e-5)."""
    B, _, H, W = images.shape
    w = sd["patch_embed.proj.weight"]
    P = w.shape[-1]
    x = F.conv2d(images, w, sd["patch_embed.proj.bias"], stride=P).flatten(2).transpose(1, 2)
    cls = sd["cls_token"] + 0 * sd["mask_token"]
    x = torch.cat([cls.expand(B, -1, -1), sd["storage_tokens"].expand(B, -1, -1), x], dim=1)
    rope = official_dinov3_rope(sd["rope_embed.periods"], H // P, W // P)
    for i in range(_depth(sd)):
        p = f"blocks.{i}"
        bias = sd[p + ".attn.qkv.bias"] * sd[p + ".attn.qkv.bias_mask"]
        x = _vit_block(sd, p, x, heads, 1e-5, qkv_bias=bias, rope=rope)
    return _norm(sd, "norm", x, 1e-5)


def official_vision_embedding(head: Sd, tokens: torch.Tensor, heads: int, num_registers: int,
                              prefix: str = "block_list") -> torch.Tensor:
    """dino.txt VisionTower.forward on backbone tokens: head blocks, ln_final, concat(CLS, mean patches)."""
    x = tokens
    n = _depth(head, prefix) if any(k.startswith(prefix + ".") for k in head) else 0
    for i in range(n):
        x = _vit_block(head, f"{prefix}.{i}", x, heads, 1e-5)
    x = _norm(head, "ln_final", x, 1e-5)
    return torch.cat([x[:, 0], x[:, 1 + num_registers:].mean(dim=1)], dim=-1)


def official_text_embedding(text: Sd, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """dino.txt TextTower.forward: causal blocks, ln_final, linear_projection, pooled at argmax(ids)."""
    x = text["backbone.token_embedding.weight"][ids] + text["backbone.positional_embedding"][: ids.shape[1]]
    for i in range(_depth(text, "backbone.blocks")):
        p = f"backbone.blocks.{i}"
        y = _norm(text, p + ".attention_norm", x, 1e-5)
        x = x + _attention(y, text[p + ".attention.qkv.weight"], None, text[p + ".attention.proj.weight"],
                           text[p + ".attention.proj.bias"], heads, causal=True)
        y = _norm(text, p + ".ffn_norm", x, 1e-5)
        x = x + F.linear(F.gelu(F.linear(y, text[p + ".feed_forward.fc1.weight"], text[p + ".feed_forward.fc1.bias"])),
                         text[p + ".feed_forward.fc2.weight"], text[p + ".feed_forward.fc2.bias"])
    x = _norm(text, "backbone.ln_final", x, 1e-5)
    x = F.linear(x, text["head.linear_projection.weight"])
    return x[torch.arange(x.shape[0]), ids.argmax(dim=-1)]


def save_pth(sd: Sd, path) -> str:
    torch.save({k: v.contiguous() for k, v in sd.items()}, str(path))
    return str(path)


# ----------------------------------------------------------------- self-checks of the reference


def test_reference_rope_matches_the_closed_form():
    # a rotation by angle 2*pi*c/period on each (x_j, x_{j+Dh/2}) pair: norms are preserved
    sin, cos = official_dinov3_rope(torch.tensor([1.0, 7.0]), 2, 3)
    assert sin.shape == (6, 8) and torch.allclose(sin ** 2 + cos ** 2, torch.ones(6, 8))
    # token 0 sits at row 0.25 / column 1/6 of [0, 1], i.e. -0.5 / -2/3 in [-1, 1]; layout [h/p0, h/p1, w/p0, w/p1] x 2
    expected = [math.sin(2 * math.pi * c / p) for c in (-0.5, -2 / 3) for p in (1.0, 7.0)] * 2
    assert torch.allclose(sin[0], torch.tensor(expected), atol=1e-6)


def test_reference_text_encoder_is_causal_and_pools_at_eot():
    sd = official_text_encoder_state(vocab=50, context=8, width=16, depth=1, output_dim=8)
    ids = torch.tensor([[48, 3, 4, 49, 0, 0, 0, 0]])
    changed = ids.clone()
    changed[0, 5] = 7  # after EOT: cannot change the output of a causal encoder pooled at EOT
    assert torch.allclose(official_text_embedding(sd, ids, 2), official_text_embedding(sd, changed, 2))
