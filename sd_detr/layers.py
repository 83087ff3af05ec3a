"""Transformer building blocks shared by the encoder and both decoders (post-norm, as DETR)."""

from __future__ import annotations

import itertools

import torch.nn.functional as F
from torch import Tensor, nn

from sd_detr.attention import ConditionalCrossAttention, DecoderSelfAttention, EncoderSelfAttention


class MLP(nn.Module):
    """Stack of Linear layers with ReLU between them: [..., in] -> [..., out]."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x


class FeedForward(nn.Module):
    """Residual FFN block with post-norm: ``norm(x + dropout(fc2(dropout(relu(fc1(x))))))``."""

    def __init__(self, d_model: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.dropout(self.fc2(self.dropout(F.relu(self.fc1(x))))))


class EncoderLayer(nn.Module):
    """Post-norm encoder layer: self-attention (position added to q, k) then FFN."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = EncoderSelfAttention(d_model, num_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)

    def forward(self, x: Tensor, pos: Tensor, padding_mask: Tensor | None) -> Tensor:
        """x, pos [B, S, d]; padding_mask [B, S] -> [B, S, d]."""
        x = self.norm(x + self.dropout(self.self_attn(x, pos, padding_mask)))
        return self.ffn(x)


class TransformerEncoder(nn.Module):
    """Stack of :class:`EncoderLayer` over the flattened feature map."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(d_model, num_heads, ffn_dim, dropout) for _ in range(num_layers))

    def forward(self, x: Tensor, pos: Tensor, padding_mask: Tensor | None) -> Tensor:
        """x, pos [B, S, d]; padding_mask [B, S] (True = padded) -> memory [B, S, d]."""
        for layer in self.layers:
            x = layer(x, pos, padding_mask)
        return x


class DecoderSelfAttentionBlock(nn.Module):
    """Decoder self-attention among all query tokens with residual and post-norm."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = DecoderSelfAttention(d_model, num_heads, dropout)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, query_pos: Tensor) -> Tensor:
        """x, query_pos [B, T, d] -> [B, T, d]."""
        return self.norm(x + self.dropout(self.attn(x, query_pos)))


class DecoderCrossBlock(nn.Module):
    """Conditional cross-attention over the encoder memory, residual + norm, then the FFN block.

    The part of a decoder layer that SD-DETR divides by task (one instance per stream).
    """

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float, use_query_pos: bool) -> None:
        super().__init__()
        self.attn = ConditionalCrossAttention(d_model, num_heads, dropout, use_query_pos)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)
        self.ffn = FeedForward(d_model, ffn_dim, dropout)

    def forward(
        self,
        x: Tensor,
        query_pos: Tensor,
        query_sine: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
    ) -> Tensor:
        """x, query_pos, query_sine [B, N, d]; memory, memory_pos [B, S, d] -> [B, N, d]."""
        attended = self.attn(x, query_pos, query_sine, memory, memory_pos, memory_padding_mask)
        return self.ffn(self.norm(x + self.dropout(attended)))
