"""SD-DETR task-aware query generation (TAQ, docs/method.md 2.2).

A light mini-detector scores every encoder memory cell and regresses a box from the cell's proposal
(two-stage DETR form). The top-N cells give N anchor boxes (detached) that become the slots' reference
boxes. Each anchor box is sampled at M points per task by bilinear interpolation of the memory, and the
samples are averaged into the slot's initial query content: learned interior points for classification,
evenly spaced perimeter points for localization. Padded memory cells never contribute.

An image with fewer valid cells than N (a 480x480 image at stride 32 has 225 cells, fewer than 300 slots)
takes all its valid cells as anchors and fills its remaining slots with learned query pairs and learned
reference boxes (docs/method.md 2.2, "Small maps"). The mini-detector's output marks those slots invalid
so that its loss ignores them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sd_detr.box_ops import full_precision, inverse_sigmoid
from sd_detr.heads import Predictions
from sd_detr.layers import MLP


@dataclass
class TaskAwareQueries:
    """Initial slot queries: ``cls_content``, ``loc_content`` [B, N, d]; ``anchors`` [B, N, 4] normalized
    cxcywh fp32 (detached for anchor slots, the learned fill box for fill slots); ``is_anchor`` [B, N] bool
    (False = fill slot: the image has fewer valid cells than N); ``encoder`` the mini-detector's
    predictions at the selected cells (``valid`` = ``is_anchor``, for its loss); ``cls_points``,
    ``loc_points`` [B, N, M, 2] the normalized (x, y) sampling points (meaningless on fill slots, whose
    content is learned, not sampled)."""

    cls_content: Tensor
    loc_content: Tensor
    anchors: Tensor
    is_anchor: Tensor
    encoder: Predictions
    cls_points: Tensor
    loc_points: Tensor


def valid_extent(padding_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Valid (unpadded) height and width in cells of each image: padding_mask [B, h, w] -> ([B], [B])."""
    valid = ~padding_mask
    return valid[:, :, 0].sum(1), valid[:, 0, :].sum(1)


def cell_proposals(padding_mask: Tensor, side: float) -> Tensor:
    """Normalized cxcywh proposal of every cell: centers relative to each image's valid extent, width and
    height ``side`` (a fraction of the image). padding_mask [B, h, w] -> [B, h*w, 4]."""
    batch, height, width = padding_mask.shape
    valid_h, valid_w = valid_extent(padding_mask)
    ys = (torch.arange(height, device=padding_mask.device, dtype=torch.float32) + 0.5)[None, :, None]
    xs = (torch.arange(width, device=padding_mask.device, dtype=torch.float32) + 0.5)[None, None, :]
    cy = (ys / valid_h.clamp(min=1)[:, None, None].float()).expand(batch, height, width)
    cx = (xs / valid_w.clamp(min=1)[:, None, None].float()).expand(batch, height, width)
    size = torch.full_like(cx, side)
    return torch.stack([cx, cy, size, size], dim=-1).flatten(1, 2).clamp(0.0, 1.0)


def perimeter_points(boxes: Tensor, num_points: int) -> Tensor:
    """M points evenly spaced on each box's perimeter: boxes [B, N, 4] cxcywh -> [B, N, M, 2] (x, y).

    Position along the perimeter t_k = 4 (k + 0.5) / M counts sides (top, right, bottom, left, each of
    length 1 in box units); M = 4 gives the four side midpoints.
    """
    t = 4.0 * (torch.arange(num_points, device=boxes.device, dtype=boxes.dtype) + 0.5) / num_points
    side = torch.floor(t)
    frac = t - side
    # unit-box coordinates in [-1, 1] for each side, walking clockwise from the top-left corner
    u = torch.where(side == 0, 2 * frac - 1, torch.where(side == 1, 1.0, torch.where(side == 2, 1 - 2 * frac, -1.0)))
    v = torch.where(side == 0, -1.0, torch.where(side == 1, 2 * frac - 1, torch.where(side == 2, 1.0, 1 - 2 * frac)))
    unit = torch.stack([u, v], dim=-1)  # [M, 2]
    return boxes[..., None, :2] + unit * boxes[..., None, 2:] / 2


def sample_memory(memory_map: Tensor, padding_mask: Tensor, points: Tensor) -> Tensor:
    """Bilinear samples of the memory at normalized points, ignoring padded cells.

    memory_map [B, d, h, w]; padding_mask [B, h, w] (True = padded); points [B, N, M, 2] (x, y) relative
    to each image's valid extent -> [B, N, M, d]. Samples are renormalized by the bilinear weight that
    falls on valid cells, so a padded cell's value has no influence. Computed in fp32 with autocast off
    (bf16 sampling positions would be rounded to ~1/256 of the map). Returns fp32.
    """
    _, _, height, width = memory_map.shape
    valid_h, valid_w = valid_extent(padding_mask)
    with full_precision(memory_map.device):
        scale = torch.stack([valid_w / width, valid_h / height], dim=-1).float()[:, None, None, :]
        grid = points.float() * scale * 2 - 1
        valid = (~padding_mask)[:, None].float()
        stacked = torch.cat([memory_map.float() * valid, valid], dim=1)
        sampled = F.grid_sample(stacked, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        values, weight = sampled[:, :-1], sampled[:, -1:]
        return (values / weight.clamp(min=1e-6)).permute(0, 2, 3, 1)


class TaskAwareQueryGenerator(nn.Module):
    """Mini-detector on the encoder memory + per-task point sampling + learned fill slots
    (docs/method.md 2.2).

    Parameters by role: ``memory_proj`` (transformer weight, xavier), ``class_head`` / ``box_head`` (the
    mini-detector's heads: focal prior bias, zero last box layer), ``cls_point_offsets`` (zero weight, bias
    spreading the points over the box interior), ``fill_cls_content`` / ``fill_loc_content`` [N, d] and
    ``fill_reference`` [N, 4] (logits of the learned fill boxes), N(0, 1) as learned query embeddings.
    """

    def __init__(
        self,
        d_model: int,
        num_classes: int,
        num_queries: int,
        num_points: int,
        class_prior_prob: float,
        proposal_size: float,
    ):
        super().__init__()
        self.num_queries, self.num_points, self.proposal_size = num_queries, num_points, proposal_size
        self.memory_proj = nn.Linear(d_model, d_model)
        self.memory_norm = nn.LayerNorm(d_model)
        self.class_head = nn.Linear(d_model, num_classes)
        self.box_head = MLP(d_model, d_model, 4, 3)
        self.cls_point_offsets = nn.Linear(d_model, 2 * num_points)
        self.fill_cls_content = nn.Embedding(num_queries, d_model)
        self.fill_loc_content = nn.Embedding(num_queries, d_model)
        self.fill_reference = nn.Embedding(num_queries, 4)
        nn.init.constant_(self.class_head.bias, -math.log((1 - class_prior_prob) / class_prior_prob))
        nn.init.zeros_(self.box_head.layers[-1].weight)
        nn.init.zeros_(self.box_head.layers[-1].bias)
        nn.init.zeros_(self.cls_point_offsets.weight)
        with torch.no_grad():  # start with points spread over the box interior
            angles = 2 * math.pi * torch.arange(num_points) / num_points
            spread = 0.5 * torch.stack([angles.cos(), angles.sin()], dim=-1).flatten()
            self.cls_point_offsets.bias.copy_(torch.atanh(spread))

    def transformer_modules(self) -> list[nn.Module]:
        """The modules initialised as transformer weights (xavier_uniform, docs/method.md 1.10)."""
        return [self.memory_proj]

    def forward(self, memory: Tensor, memory_padding_mask: Tensor, spatial_shape: tuple[int, int]) -> TaskAwareQueries:
        """memory [B, S, d]; memory_padding_mask [B, S] (True = padded); spatial_shape (h, w), h*w = S.

        Image b's first min(N, valid cells of b) slots are its top-scoring valid cells (best first); its
        remaining slots, in order, take the learned fill pairs and boxes 0, 1, 2, ...
        """
        batch, num_cells, d_model = memory.shape
        height, width = spatial_shape
        if height * width != num_cells or memory_padding_mask.shape != (batch, num_cells):
            raise ValueError(
                f"TAQ: memory {tuple(memory.shape)}, mask {tuple(memory_padding_mask.shape)} and spatial_shape "
                f"{spatial_shape} disagree"
            )
        slots = self.num_queries
        padding_mask = memory_padding_mask.view(batch, height, width)
        features = self.memory_norm(self.memory_proj(memory))
        with full_precision(memory.device):  # fp32 heads: exact scores for the top-k, unrounded boxes
            logits = self.class_head(features.float())
            proposals = cell_proposals(padding_mask, self.proposal_size)
            boxes = (self.box_head(features.float()) + inverse_sigmoid(proposals)).sigmoid()
        scores = logits.max(-1).values.masked_fill(memory_padding_mask, float("-inf"))
        top = scores.topk(min(slots, num_cells), dim=1).indices  # [B, min(N, S)]; padded cells sort last
        top = F.pad(top, (0, slots - top.shape[1]))  # a map smaller than N: placeholder index 0, a fill slot
        slot = torch.arange(slots, device=memory.device)
        num_anchors = (~memory_padding_mask).sum(1).clamp(max=slots)  # [B]
        is_anchor = slot[None, :] < num_anchors[:, None]  # [B, N]
        fill_index = (slot[None, :] - num_anchors[:, None]).clamp(min=0)  # [B, N]: r-th fill slot -> entry r

        selected_logits = logits.gather(1, top[..., None].expand(-1, -1, logits.shape[-1]))
        selected_boxes = boxes.gather(1, top[..., None].expand(-1, -1, 4))
        with full_precision(memory.device):
            fill_boxes = self.fill_reference(fill_index).float().sigmoid()
        anchors = torch.where(is_anchor[..., None], selected_boxes.detach(), fill_boxes)
        selected_features = features.gather(1, top[..., None].expand(-1, -1, d_model))

        offsets = torch.tanh(self.cls_point_offsets(selected_features).float()).view(batch, slots, self.num_points, 2)
        cls_points = anchors[..., None, :2] + offsets * anchors[..., None, 2:] / 2
        loc_points = perimeter_points(anchors, self.num_points)
        memory_map = memory.transpose(1, 2).reshape(batch, d_model, height, width)
        both = sample_memory(memory_map, padding_mask, torch.cat([cls_points, loc_points], dim=2))
        sampled_cls = both[:, :, : self.num_points].mean(2).to(memory.dtype)
        sampled_loc = both[:, :, self.num_points :].mean(2).to(memory.dtype)
        cls_content = torch.where(is_anchor[..., None], sampled_cls, self.fill_cls_content(fill_index).to(memory.dtype))
        loc_content = torch.where(is_anchor[..., None], sampled_loc, self.fill_loc_content(fill_index).to(memory.dtype))
        return TaskAwareQueries(
            cls_content=cls_content,
            loc_content=loc_content,
            anchors=anchors,
            is_anchor=is_anchor,
            encoder=Predictions(selected_logits, selected_boxes, valid=is_anchor),
            cls_points=cls_points,
            loc_points=loc_points,
        )
