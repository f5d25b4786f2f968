"""Encoder and decoder stacks: dense (flattened input) or convolutional (1-D over time, 2-D images).

Series windows arrive as [N, W, F] and images as [N, C, H, W]; every stack maps that input to a
flat code [N, out] and back, so the autoencoder kinds never see the backbone's layout.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipeline.detector.models.config import ModelConfig

__all__ = ["activation", "build_decoder", "build_encoder"]


def activation(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "gelu": nn.GELU,
        "elu": nn.ELU,
        "sigmoid": nn.Sigmoid,
        "linear": nn.Identity,
    }[name]()


class _ChannelsFirst(nn.Module):
    """[N, W, F] windows <-> [N, F, W] for Conv1d; images pass through unchanged."""

    def __init__(self, series: bool, inverse: bool = False) -> None:
        super().__init__()
        self.series, self.inverse = series, inverse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(1, 2) if self.series else x


def _conv_geometry(config: ModelConfig) -> tuple[int, list[tuple[int, ...]]]:
    """Input channels and the spatial size after each stride-2 layer (index 0 = input)."""
    if config.is_image:
        channels, spatial = config.input_shape[0], tuple(config.input_shape[1:])
    else:
        spatial, channels = (config.input_shape[0],), config.input_shape[1]
    sizes = [spatial]
    for _ in config.hidden:
        sizes.append(tuple(math.ceil(s / 2) for s in sizes[-1]))
    return channels, sizes


def build_encoder(config: ModelConfig, out_features: int) -> nn.Sequential:
    act = config.activation
    if config.backbone == "dense":
        layers: list[nn.Module] = [nn.Flatten()]
        width = config.n_inputs
        for h in config.hidden:
            layers += [nn.Linear(width, h), activation(act)]
            width = h
        layers.append(nn.Linear(width, out_features))
        return nn.Sequential(*layers)
    channels, sizes = _conv_geometry(config)
    conv = nn.Conv2d if config.is_image else nn.Conv1d
    layers = [_ChannelsFirst(series=not config.is_image)]
    for h in config.hidden:
        layers += [conv(channels, h, kernel_size=3, stride=2, padding=1), activation(act)]
        channels = h
    layers += [nn.Flatten(), nn.Linear(channels * math.prod(sizes[-1]), out_features)]
    return nn.Sequential(*layers)


def build_decoder(config: ModelConfig) -> nn.Sequential:
    act = config.activation
    if config.backbone == "dense":
        layers: list[nn.Module] = []
        width = config.code_size
        for h in reversed(config.hidden):
            layers += [nn.Linear(width, h), activation(act)]
            width = h
        layers += [
            nn.Linear(width, config.n_inputs),
            activation(config.output_activation),
            nn.Unflatten(1, config.input_shape),
        ]
        return nn.Sequential(*layers)
    in_channels, sizes = _conv_geometry(config)
    deconv = nn.ConvTranspose2d if config.is_image else nn.ConvTranspose1d
    conv = nn.Conv2d if config.is_image else nn.Conv1d
    hidden = config.hidden
    layers = [
        nn.Linear(config.code_size, hidden[-1] * math.prod(sizes[-1])),
        activation(act),
        nn.Unflatten(1, (hidden[-1], *sizes[-1])),
    ]
    for i in range(len(hidden) - 1, -1, -1):
        out_channels = hidden[i - 1] if i > 0 else hidden[0]
        # A stride-2 transposed conv (k=3, p=1) gives 2 * n - 1 (+ output_padding) per axis.
        padding = tuple(t - (2 * s - 1) for t, s in zip(sizes[i], sizes[i + 1], strict=True))
        layers += [
            deconv(
                hidden[i], out_channels, kernel_size=3, stride=2, padding=1, output_padding=padding
            ),
            activation(act),
        ]
    layers += [
        conv(hidden[0], in_channels, kernel_size=3, padding=1),
        activation(config.output_activation),
        _ChannelsFirst(series=not config.is_image),
    ]
    return nn.Sequential(*layers)
