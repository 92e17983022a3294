"""Custom layers for architecture YAML files.

Any `nn.Module` subclass defined in this file can be named as a `layer_type` in an architecture,
just like a class of `torch.nn`; nothing needs registering. If its constructor takes an
input-size argument (`in_channels`, `in_features`, ...), leave it out of the YAML: it is filled
in from the previous layer's output shape (see model_base.INPUT_SIZE_ARGS).
"""
from torch import nn


class ResidualBlock(nn.Module):
    """conv -> ReLU -> conv, plus the input (through a 1x1 conv when the channel count changes)."""

    def __init__(self, in_channels, out_channels, kernel_size=3, padding=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size, padding=padding)
        self.act = nn.ReLU()
        self.shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x):
        return self.shortcut(x) + self.conv2(self.act(self.conv1(x)))
