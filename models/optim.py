"""What both trainers share: AdamW with decay on matrices only, the learning-rate schedule, and the DiT's FLOPs."""
import math

import torch

# dense bf16 matmul peaks in TFLOP/s (vendor data sheets), by a part of the name torch.cuda.get_device_name reports;
# the first match wins, so the PCIe and NVL parts come before the SXM name they contain
PEAK_TFLOPS = {'H100 PCIe': 756, 'H100 NVL': 835, 'H100': 989, 'H200': 989, 'H800': 989, 'B200': 2250, 'A100': 312,
               'A800': 312, 'L40S': 362}


def adamw(params, lr, weight_decay, **kw):
    """AdamW with betas (0.9, 0.99), weight decay on matrices and none on biases, norms and modulations."""
    params = list(params)
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.99), **kw)


def lr_at(it, peak, warmup, decay_iters, floor):
    """Linear warmup to peak, then a cosine decay to floor x peak at decay_iters (0: constant after warmup)."""
    if it < warmup:
        return peak * (it + 1) / warmup
    if not decay_iters:
        return peak
    ratio = min(1.0, (it - warmup) / max(1, decay_iters - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * ratio)))


def dit_flops(arch, L, B=1):
    """Model FLOPs of one forward + backward: 3 x the forward's matmuls in the blocks (2 FLOPs per multiply-add;
    backward = 2 x forward). Per block and clip, with L tokens, T text rows, d = dim, f = ffn_dim:
      self-attention q, k, v, o   4 * 2 L d^2       attention scores + values  2 * 2 L^2 d
      cross-attention q, o        2 * 2 L d^2       cross k, v on the text     2 * 2 T d^2
      cross scores + values       2 * 2 L T d       FFN                        2 * 2 L d f
    Embeddings and head (small at real sizes) and elementwise work are left out."""
    d, f, T, n = arch['dim'], arch['ffn_dim'], arch.get('text_len', 512), arch['num_layers']
    per_block = 8 * L * d * d + 4 * L * L * d + 4 * L * d * d + 4 * T * d * d + 4 * L * T * d + 4 * L * d * f
    return 3 * B * n * per_block


def peak_flops(dev):
    """The bf16 peak of this CUDA device in FLOP/s from PEAK_TFLOPS, or 0 where it is not listed."""
    if dev.type != 'cuda':
        return 0
    name = torch.cuda.get_device_name(dev)
    return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in name), 0)
