"""Sine position embeddings: of feature-map cells (encoder) and of normalized points (decoder queries)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _sine_features(coords: Tensor, num_features: int, temperature: float) -> Tensor:
    """Interleaved sin/cos features of scalar coordinates: [...] (radians) -> [..., num_features]."""
    index = torch.arange(num_features, dtype=torch.float32, device=coords.device)
    frequencies = temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_features)
    angles = coords.float()[..., None] / frequencies
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class SinePositionEmbedding2d(nn.Module):
    """2-D sine embedding of feature-map cells, computed over the valid (unpadded) area of each image.

    Coordinates are the running count of valid cells, normalized by the valid extent to (0, 2*pi].
    Output channels are ``[y features ; x features]``, ``d_model / 2`` each.
    """

    def __init__(self, d_model: int, temperature: float = 10000.0) -> None:
        super().__init__()
        if d_model % 2 != 0:
            raise ValueError(f"d_model must be even, got {d_model}")
        self.num_features = d_model // 2
        self.temperature = temperature

    def forward(self, padding_mask: Tensor) -> Tensor:
        """padding_mask: [B, H, W] bool (True = padded) -> embedding [B, d_model, H, W] float32."""
        valid = (~padding_mask).float()
        y = valid.cumsum(1)
        x = valid.cumsum(2)
        eps = 1e-6
        y = y / (y[:, -1:, :] + eps) * (2 * math.pi)
        x = x / (x[:, :, -1:] + eps) * (2 * math.pi)
        embedding = torch.cat(
            (
                _sine_features(y, self.num_features, self.temperature),
                _sine_features(x, self.num_features, self.temperature),
            ),
            dim=-1,
        )
        return embedding.permute(0, 3, 1, 2)


def sine_embed_points(points: Tensor, d_model: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalized points [..., 2] (x, y in [0, 1]) -> [..., d_model] as ``[y ; x]``.

    With 4 coordinates (cx, cy, w, h) the output is ``[y ; x ; w ; h]`` of ``2 * d_model`` channels.
    """
    per_coordinate = d_model // 2
    features = [_sine_features(c * (2 * math.pi), per_coordinate, temperature) for c in points.unbind(-1)]
    features[0], features[1] = features[1], features[0]
    return torch.cat(features, dim=-1).to(points.dtype)
