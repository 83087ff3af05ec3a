"""SD-DETR's divided decoder (DFL, docs/method.md 2.1) and its query generation (TAQ on or off, 2.2).

Every slot i carries a classification query c_i and a localization query l_i. Each layer runs one
self-attention over the 2N tokens [c_1..c_N ; l_1..l_N], then cross-attention + FFN: one shared module
for both streams in layers before ``query_split``, one module per stream from ``query_split`` on. Each
stream has its own conditional spatial query (its own transform T of its own content). The class head
reads only the classification stream, the box head only the localization stream.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from sd_detr.box_ops import full_precision
from sd_detr.config import ModelConfig, TransformerConfig
from sd_detr.heads import DecoderOutput, PredictionHeads, check_memory
from sd_detr.layers import MLP, DecoderCrossBlock, DecoderSelfAttentionBlock
from sd_detr.position_encoding import sine_embed_points
from sd_detr.taq import TaskAwareQueryGenerator


class SDDecoderLayer(nn.Module):
    """Shared self-attention over both query sets, then shared or divided cross-attention + FFN."""

    def __init__(self, config: TransformerConfig, is_first: bool, divided: bool) -> None:
        super().__init__()
        d, heads, ffn, dropout = config.d_model, config.num_heads, config.ffn_dim, config.dropout
        self.divided = divided
        self.self_block = DecoderSelfAttentionBlock(d, heads, dropout)
        if divided:
            self.cls_cross = DecoderCrossBlock(d, heads, ffn, dropout, use_query_pos=is_first)
            self.loc_cross = DecoderCrossBlock(d, heads, ffn, dropout, use_query_pos=is_first)
        else:
            self.shared_cross = DecoderCrossBlock(d, heads, ffn, dropout, use_query_pos=is_first)

    def forward(
        self,
        cls: Tensor,
        loc: Tensor,
        query_pos: Tensor,
        cls_sine: Tensor,
        loc_sine: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """cls, loc, query_pos, cls_sine, loc_sine [B, N, d]; memory, memory_pos [B, S, d] -> (cls, loc)."""
        num_slots = cls.shape[1]
        tokens = self.self_block(torch.cat([cls, loc], dim=1), torch.cat([query_pos, query_pos], dim=1))
        cls, loc = tokens.split(num_slots, dim=1)
        if self.divided:
            cls = self.cls_cross(cls, query_pos, cls_sine, memory, memory_pos, memory_padding_mask)
            loc = self.loc_cross(loc, query_pos, loc_sine, memory, memory_pos, memory_padding_mask)
            return cls, loc
        both = self.shared_cross(
            tokens,
            torch.cat([query_pos, query_pos], dim=1),
            torch.cat([cls_sine, loc_sine], dim=1),
            memory,
            memory_pos,
            memory_padding_mask,
        )
        return both[:, :num_slots], both[:, num_slots:]


class SDDecoder(nn.Module):
    """Stack of :class:`SDDecoderLayer` (divided from ``query_split`` on), per-stream T and final norms.

    T is the identity in the first layer and a per-stream MLP afterwards; a one-layer decoder has no MLPs
    (``cls_query_scale`` / ``loc_query_scale`` are None), so that no parameter goes without a gradient (DDP
    with ``find_unused_parameters=False``).
    """

    def __init__(self, config: TransformerConfig, query_split: int) -> None:
        super().__init__()
        d = config.d_model
        self.layers = nn.ModuleList(
            SDDecoderLayer(config, is_first=index == 0, divided=index >= query_split)
            for index in range(config.num_decoder_layers)
        )
        later_layers = config.num_decoder_layers > 1
        self.cls_query_scale = MLP(d, d, d, 2) if later_layers else None
        self.loc_query_scale = MLP(d, d, d, 2) if later_layers else None
        self.cls_norm = nn.LayerNorm(d)
        self.loc_norm = nn.LayerNorm(d)

    def forward(
        self,
        cls: Tensor,
        loc: Tensor,
        query_pos: Tensor,
        reference: Tensor,
        memory: Tensor,
        memory_pos: Tensor,
        memory_padding_mask: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """cls, loc, query_pos [B, N, d]; reference [B, N, 2 or 4] -> normed (cls, loc) hidden [L, B, N, d]."""
        check_memory(memory, memory_pos, memory_padding_mask)
        center_sine = sine_embed_points(reference[..., :2], cls.shape[-1])
        cls_hidden, loc_hidden = [], []
        for index, layer in enumerate(self.layers):
            cls_sine, loc_sine = self._spatial_queries(index, center_sine, cls, loc)
            cls, loc = layer(cls, loc, query_pos, cls_sine, loc_sine, memory, memory_pos, memory_padding_mask)
            cls_hidden.append(self.cls_norm(cls))
            loc_hidden.append(self.loc_norm(loc))
        return torch.stack(cls_hidden), torch.stack(loc_hidden)

    def _spatial_queries(self, index: int, center_sine: Tensor, cls: Tensor, loc: Tensor) -> tuple[Tensor, Tensor]:
        """Layer ``index``'s spatial query T(f) * PE(ref) of each stream: center_sine, cls, loc [B, N, d] ->
        (cls_sine, loc_sine) [B, N, d]."""
        if index == 0 or self.cls_query_scale is None or self.loc_query_scale is None:
            return center_sine, center_sine
        return center_sine * self.cls_query_scale(cls), center_sine * self.loc_query_scale(loc)


class SDDetrDecoding(nn.Module):
    """SD-DETR after the encoder: slot queries (TAQ or learned pairs), divided decoder, task heads.

    With TAQ the reference of each slot is its anchor box (4-d, detached; a learned box on fill slots of
    images with fewer memory cells than slots) and the slot position embedding is an MLP of the reference's
    sine embedding; without TAQ each slot has a learned position embedding, a reference point
    sigmoid(MLP(pos)) and learned classification and localization contents. References are fp32.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, slots = config.transformer.d_model, config.num_queries
        self.taq = config.taq
        if config.taq:
            self.query_generator = TaskAwareQueryGenerator(
                d,
                config.num_classes,
                slots,
                config.taq_num_points,
                config.class_prior_prob,
                proposal_size=config.taq_proposal_size,
            )
            self.anchor_pos_head = MLP(2 * d, d, d, 2)
        else:
            self.query_pos = nn.Embedding(slots, d)
            self.ref_point_head = MLP(d, d, 2, 2)
            self.cls_content = nn.Embedding(slots, d)
            self.loc_content = nn.Embedding(slots, d)
        self.decoder = SDDecoder(config.transformer, config.query_split)
        self.heads = PredictionHeads(d, config.num_classes, config.class_prior_prob)

    def transformer_modules(self) -> list[nn.Module]:
        """The modules initialised as transformer weights (xavier_uniform, docs/method.md 1.10): the decoder
        (layers, query-scale MLPs), the reference-point / anchor-position MLP and TAQ's memory projection."""
        if self.taq:
            return [self.decoder, self.anchor_pos_head, *self.query_generator.transformer_modules()]
        return [self.decoder, self.ref_point_head]

    def forward(
        self, memory: Tensor, memory_pos: Tensor, memory_padding_mask: Tensor, spatial_shape: tuple[int, int]
    ) -> DecoderOutput:
        """memory, memory_pos [B, S, d]; mask [B, S] (True = padded); spatial_shape (h, w), h*w = S."""
        batch, _, d = memory.shape
        extras: dict[str, Tensor] = {}
        encoder = None
        if self.taq:
            queries = self.query_generator(memory, memory_padding_mask, spatial_shape)
            cls, loc, reference = queries.cls_content, queries.loc_content, queries.anchors
            query_pos = self.anchor_pos_head(sine_embed_points(reference, d))
            encoder = queries.encoder
            extras = {
                "cls_points": queries.cls_points,
                "loc_points": queries.loc_points,
                "is_anchor": queries.is_anchor,
            }
        else:
            query_pos = self.query_pos.weight[None].repeat(batch, 1, 1)
            with full_precision(memory.device):
                reference = self.ref_point_head(query_pos.float()).sigmoid()
            cls = self.cls_content.weight[None].repeat(batch, 1, 1)
            loc = self.loc_content.weight[None].repeat(batch, 1, 1)
        cls_hidden, loc_hidden = self.decoder(cls, loc, query_pos, reference, memory, memory_pos, memory_padding_mask)
        extras["loc_hidden"] = loc_hidden
        return DecoderOutput(
            logits=self.heads.classify(cls_hidden),
            boxes=self.heads.regress(loc_hidden, reference),
            hidden=cls_hidden,
            reference=reference,
            encoder=encoder,
            extras=extras,
        )
