"""Conditional DETR decoder (Meng et al., ICCV 2021): conditional spatial queries from reference points."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sd_detr.box_ops import full_precision
from sd_detr.config import ModelConfig, TransformerConfig
from sd_detr.heads import DecoderOutput, PredictionHeads, check_memory
from sd_detr.layers import MLP, DecoderCrossBlock, DecoderSelfAttentionBlock
from sd_detr.position_encoding import sine_embed_points


class ConditionalDecoderLayer(nn.Module):
    """Self-attention among the queries, then conditional cross-attention and FFN."""

    def __init__(self, config: TransformerConfig, is_first: bool) -> None:
        super().__init__()
        d, heads, ffn, dropout = config.d_model, config.num_heads, config.ffn_dim, config.dropout
        self.self_block = DecoderSelfAttentionBlock(d, heads, dropout)
        self.cross_block = DecoderCrossBlock(d, heads, ffn, dropout, use_query_pos=is_first)

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
        x = self.self_block(x, query_pos)
        return self.cross_block(x, query_pos, query_sine, memory, memory_pos, memory_padding_mask)


class ConditionalDecoder(nn.Module):
    """Stack of :class:`ConditionalDecoderLayer` with the spatial-query transform ``T`` and a final norm.

    In layer l the spatial query is ``p_s = T(f) * PE(ref)``, with ``T`` = identity in the first layer and
    an MLP of the current decoder embedding ``f`` afterwards; ``PE`` is the sine embedding of the center.
    A one-layer decoder has no MLP (``query_scale`` is None): a parameter that never gets a gradient would
    break DDP with ``find_unused_parameters=False``.
    """

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        d = config.d_model
        self.layers = nn.ModuleList(
            ConditionalDecoderLayer(config, is_first=index == 0) for index in range(config.num_decoder_layers)
        )
        self.query_scale = MLP(d, d, d, 2) if config.num_decoder_layers > 1 else None
        self.norm = nn.LayerNorm(d)

    def forward(
        self,
        content: Tensor,
        query_pos: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
    ) -> Tensor:
        """content, query_pos [B, N, d]; reference_points [B, N, 2+] normalized -> normed hidden [L, B, N, d]."""
        check_memory(memory, memory_pos, memory_padding_mask)
        center_sine = sine_embed_points(reference_points[..., :2], content.shape[-1])
        x, hidden = content, []
        for index, layer in enumerate(self.layers):
            query_sine = center_sine if index == 0 or self.query_scale is None else center_sine * self.query_scale(x)
            x = layer(x, query_pos, query_sine, memory, memory_pos, memory_padding_mask)
            hidden.append(self.norm(x))
        return torch.stack(hidden)


class ConditionalDetrDecoding(nn.Module):
    """The Conditional DETR half after the encoder: learned queries, decoder, shared heads.

    Each of the N slots has a learned position embedding ``q`` and a reference point
    ``ref = sigmoid(MLP(q))`` (fp32, autocast off); the content starts at zero.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d = config.transformer.d_model
        self.query_pos = nn.Embedding(config.num_queries, d)
        self.ref_point_head = MLP(d, d, 2, 2)
        self.decoder = ConditionalDecoder(config.transformer)
        self.heads = PredictionHeads(d, config.num_classes, config.class_prior_prob)

    def transformer_modules(self) -> list[nn.Module]:
        """The modules official Conditional DETR initialises as transformer weights (xavier_uniform,
        docs/method.md 1.10): the decoder (layers, query-scale MLP) and the reference-point MLP."""
        return [self.decoder, self.ref_point_head]

    def forward(
        self,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
        spatial_shape: tuple[int, int],
    ) -> DecoderOutput:
        """memory, memory_pos [B, S, d]; mask [B, S]; spatial_shape (h, w) with h*w = S -> DecoderOutput."""
        batch = memory.shape[0]
        query_pos = self.query_pos.weight[None].repeat(batch, 1, 1)
        with full_precision(memory.device):
            reference = self.ref_point_head(query_pos.float()).sigmoid()
        hidden = self.decoder(
            torch.zeros_like(query_pos), query_pos, reference, memory, memory_pos, memory_padding_mask
        )
        return DecoderOutput(
            logits=self.heads.classify(hidden),
            boxes=self.heads.regress(hidden, reference),
            hidden=hidden,
            reference=reference,
        )
