"""Multi-head attention modules of the encoder and of the Conditional DETR decoder.

All heads and queries are computed at once with ``scaled_dot_product_attention``. The conditional
cross-attention concatenates a content part and a spatial part per head (query ``[c_q ; p_s]``, key
``[c_k ; p_k]``), so each head's score is the sum of a content and a spatial dot product, scaled by
``1 / sqrt(2 * head_dim)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _split_heads(x: Tensor, num_heads: int) -> Tensor:
    """[B, L, H*D] -> [B, H, L, D]."""
    batch, length, width = x.shape
    return x.view(batch, length, num_heads, width // num_heads).transpose(1, 2)


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    num_heads: int,
    key_padding_mask: Tensor | None = None,
    dropout: float = 0.0,
) -> Tensor:
    """Attention of projected inputs: query [B, Lq, H*Dk], key [B, Lk, H*Dk], value [B, Lk, H*Dv].

    ``key_padding_mask`` [B, Lk] bool marks keys to ignore (True = padded). Returns [B, Lq, H*Dv].
    """
    q, k, v = (_split_heads(t, num_heads) for t in (query, key, value))
    attn_mask = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
    return out.transpose(1, 2).flatten(2)


def attention_probabilities(
    query: Tensor, key: Tensor, num_heads: int, key_padding_mask: Tensor | None = None
) -> Tensor:
    """Softmax attention weights of projected query [B, Lq, H*Dk] and key [B, Lk, H*Dk] -> [B, H, Lq, Lk].

    Used for diagnostics (attention maps); the forward pass itself uses the fused kernel.
    """
    q, k = _split_heads(query, num_heads), _split_heads(key, num_heads)
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if key_padding_mask is not None:
        scores = scores.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    return scores.softmax(-1)


class EncoderSelfAttention(nn.Module):
    """Self-attention of the encoder: position embedding added to queries and keys, not to values."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def reset_parameters_as_packed(self) -> None:
        """Initialise q, k, v as official DETR's ``nn.MultiheadAttention`` does (docs/method.md 1.10): one
        packed [3d, d] weight drawn xavier_uniform (bound sqrt(6 / 4d)) and split, zero biases; zero output
        bias (its weight is left to the caller's xavier pass)."""
        width = self.q_proj.weight.shape[0]
        packed = torch.empty(3 * width, width, device=self.q_proj.weight.device)
        nn.init.xavier_uniform_(packed)
        with torch.no_grad():
            for projection, chunk in zip((self.q_proj, self.k_proj, self.v_proj), packed.chunk(3), strict=True):
                projection.weight.copy_(chunk)
                projection.bias.zero_()
            self.out_proj.bias.zero_()

    def forward(self, x: Tensor, pos: Tensor, padding_mask: Tensor | None) -> Tensor:
        """x, pos [B, S, d]; padding_mask [B, S] (True = padded) -> [B, S, d]."""
        query_key = x + pos
        dropout = self.dropout if self.training else 0.0
        out = multi_head_attention(
            self.q_proj(query_key),
            self.k_proj(query_key),
            self.v_proj(x),
            self.num_heads,
            padding_mask,
            dropout,
        )
        return self.out_proj(out)


class DecoderSelfAttention(nn.Module):
    """Self-attention among object queries with separate content and position projections."""

    def __init__(self, d_model: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q_content_proj = nn.Linear(d_model, d_model)
        self.q_pos_proj = nn.Linear(d_model, d_model)
        self.k_content_proj = nn.Linear(d_model, d_model)
        self.k_pos_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, query_pos: Tensor) -> Tensor:
        """x (content), query_pos [B, N, d] -> [B, N, d]."""
        query = self.q_content_proj(x) + self.q_pos_proj(query_pos)
        key = self.k_content_proj(x) + self.k_pos_proj(query_pos)
        dropout = self.dropout if self.training else 0.0
        return self.out_proj(multi_head_attention(query, key, self.v_proj(x), self.num_heads, None, dropout))


class ConditionalCrossAttention(nn.Module):
    """Conditional DETR cross-attention: per head, query ``[c_q ; p_s]`` against key ``[c_k ; p_k]``.

    ``use_query_pos`` (first decoder layer only) also adds the projected query position to the content
    query and the projected key position to the content key, as Conditional DETR does.
    """

    def __init__(self, d_model: int, num_heads: int, dropout: float, use_query_pos: bool) -> None:
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q_content_proj = nn.Linear(d_model, d_model)
        self.q_pos_proj = nn.Linear(d_model, d_model) if use_query_pos else None
        self.k_content_proj = nn.Linear(d_model, d_model)
        self.k_pos_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.q_pos_sine_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def project(
        self, x: Tensor, query_pos: Tensor, query_sine: Tensor, memory: Tensor, memory_pos: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Projected (query [B, N, 2d], key [B, S, 2d], value [B, S, d]) with heads interleaved."""
        batch, num_queries, width = x.shape
        length = memory.shape[1]
        head_dim = width // self.num_heads
        query = self.q_content_proj(x)
        key = self.k_content_proj(memory)
        key_pos = self.k_pos_proj(memory_pos)
        if self.q_pos_proj is not None:
            query = query + self.q_pos_proj(query_pos)
            key = key + key_pos
        spatial_query = self.q_pos_sine_proj(query_sine)
        query = torch.cat(
            (
                query.view(batch, num_queries, self.num_heads, head_dim),
                spatial_query.view(batch, num_queries, self.num_heads, head_dim),
            ),
            dim=-1,
        ).flatten(2)
        key = torch.cat(
            (
                key.view(batch, length, self.num_heads, head_dim),
                key_pos.view(batch, length, self.num_heads, head_dim),
            ),
            dim=-1,
        ).flatten(2)
        return query, key, self.v_proj(memory)

    def forward(
        self,
        x: Tensor,
        query_pos: Tensor,
        query_sine: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
    ) -> Tensor:
        """x, query_pos, query_sine [B, N, d]; memory, memory_pos [B, S, d]; mask [B, S] -> [B, N, d]."""
        query, key, value = self.project(x, query_pos, query_sine, memory, memory_pos)
        dropout = self.dropout if self.training else 0.0
        out = multi_head_attention(query, key, value, self.num_heads, memory_padding_mask, dropout)
        return self.out_proj(out)

    def attention_map(
        self,
        x: Tensor,
        query_pos: Tensor,
        query_sine: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
    ) -> Tensor:
        """Head-averaged attention weights [B, N, S] of the same computation as ``forward``."""
        query, key, _ = self.project(x, query_pos, query_sine, memory, memory_pos)
        return attention_probabilities(query, key, self.num_heads, memory_padding_mask).mean(1)
