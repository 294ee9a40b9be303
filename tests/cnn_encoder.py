"""A timm CNN with BatchNorm as a ``package.module:factory`` token source, for the tests of
encoders that carry BatchNorm buffers (0-dim ``num_batches_tracked``, running statistics)."""
import timm
import torch
from torch import nn


class CnnTokens(nn.Module):
    """``[global average of the last feature map, its cells]``: one prefix token, no registers."""

    num_prefix_tokens = 1

    def __init__(self, arch: str = "resnet18"):
        super().__init__()
        self.net = timm.create_model(arch, pretrained=False, num_classes=0, global_pool="")
        self.embed_dim = self.net.num_features
        self.patch_size = 32  # the stride of the last stage

    def forward(self, x):
        cells = self.net.forward_features(x).flatten(2).transpose(1, 2)
        return torch.cat([cells.mean(1, keepdim=True), cells], 1)


def build(arch: str = "resnet18"):
    return CnnTokens(arch)
