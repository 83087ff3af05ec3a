"""FLOPs of one call with ``FlopCounterMode`` (matmul, attention, convolution), CPU attention kernels included."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count


def _cpu_attention_flops(query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_attention_backward_flops(grad_shape, query_shape, key_shape, value_shape, *_args, out_shape=None, **_kwargs):
    return sdpa_backward_flop_count(grad_shape, query_shape, key_shape, value_shape)


# CPU fused attention kernels are missing from FlopCounterMode's table: count them like the CUDA ones.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops,
}


def count_flops(run: Callable[[], None]) -> int:
    """FLOPs of the ops ``run()`` dispatches (forward and backward). ``torch.compile``'d code runs eagerly
    under the counter's dispatch mode: the same computation, counted op by op."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        run()
    return counter.get_total_flops()


def backbone_flops(backbone: nn.Module, images: Tensor, padding_mask: Tensor, train: bool) -> int:
    """FLOPs of ``backbone`` on a batch: forward, plus backward into its trainable stages when ``train``."""
    backbone = copy.deepcopy(backbone).train(train)

    def run() -> None:
        with torch.set_grad_enabled(train):
            features = backbone(images, padding_mask).features
        if train:
            features.sum().backward()

    return count_flops(run)
