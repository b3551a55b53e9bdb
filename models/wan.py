"""The Wan2.1/2.2 DiT, written to load the official checkpoints with no renaming.

Numerics follow the official forward (Wan-Video/Wan2.2 wan/modules/model.py): float64 RoPE tables and
sinusoids, fp32 time embedding, modulation and head, a residual stream that becomes fp32 after the
first gated add, bf16 matmuls and attention under autocast.
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from models.parallel import heads_to_seq, qkv_to_heads, seq_gather, seq_shard

try:  # FlashAttention 3, then 2, when installed; never required
    from flash_attn_interface import flash_attn_func
except ImportError:
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        flash_attn_func = None

# model name -> constructor arguments (reference/wan22.md section 2)
configs = {
    't2v-a14b': dict(model_type='t2v', in_dim=16, dim=5120, ffn_dim=13824, out_dim=16, num_heads=40, num_layers=40),
    'i2v-a14b': dict(model_type='i2v', in_dim=36, dim=5120, ffn_dim=13824, out_dim=16, num_heads=40, num_layers=40),
    'ti2v-5b': dict(model_type='ti2v', in_dim=48, dim=3072, ffn_dim=14336, out_dim=48, num_heads=24, num_layers=30),
    't2v-1.3b': dict(model_type='t2v', in_dim=16, dim=1536, ffn_dim=8960, out_dim=16, num_heads=12, num_layers=30),
    't2v-14b': dict(model_type='t2v', in_dim=16, dim=5120, ffn_dim=13824, out_dim=16, num_heads=40, num_layers=40),
    # CPU debugging on the toy data: the 'pixel' codec's 48 channels, the debug umT5's 64-dim text, short captions
    'debug': dict(model_type='t2v', in_dim=48, dim=256, ffn_dim=512, out_dim=48, num_heads=2, num_layers=4,
                  text_dim=64, text_len=64),
}


def token_grid(frames, height, width, stride, patch_size=(1, 2, 2)):
    """The DiT token grid (f, h, w) of a clip of frames x height x width pixels whose codec has this stride."""
    return ((frames - 1) // stride[0] + 1) // patch_size[0], height // stride[1] // patch_size[1], \
        width // stride[2] // patch_size[2]


def fp32(x):
    """The official fp32 islands: autocast to float32 on CUDA; on the CPU (no float32 autocast there) autocast off,
    which runs these ops in fp32 as well, since their inputs are fp32."""
    return torch.autocast('cuda', dtype=torch.float32) if x.is_cuda else torch.autocast('cpu', enabled=False)


@functools.cache
def cpu_bf16():
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX): there bf16 beats fp32 (docs/speed.md);
    elsewhere oneDNN emulates it, slower than fp32."""
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line.split() for line in f if line.startswith('flags')), [])
    except OSError:
        return False
    return 'avx512_bf16' in flags or 'amx_bf16' in flags


def autocast(dev, amp='auto', cache=True):
    """bf16 autocast on fp32 weights, the official mixed precision. amp: auto (on with CUDA, and on a CPU with native
    bf16 matmuls) | on | off. cache: autocast's cache of bf16 weight casts."""
    on = amp == 'on' or (amp == 'auto' and (dev.type == 'cuda' or cpu_bf16()))
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=on, cache_enabled=cache)


def attention(q, k, v, scale=None):
    """q, k, v: [B, L, heads, head_dim]. FlashAttention on CUDA when present, else SDPA; bf16 under autocast.
    scale: the softmax scale (None = 1/sqrt(head_dim), the same call as without it). On the CPU in bf16, while the
    probabilities stay small (the toy's: 8 x 2 x 192 x 192), two matmuls around an fp32 softmax instead: SDPA's bf16
    CPU kernel is slower there; in fp32 it is not, and it keeps no probabilities for the backward (docs/speed.md)."""
    if torch.is_autocast_enabled(q.device.type):  # RoPE left q and k in fp32
        dtype = torch.get_autocast_dtype(q.device.type)
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        out = flash_attn_func(q, k, v, softmax_scale=scale)
        return out[0] if isinstance(out, tuple) else out
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if q.device.type == 'cpu' and q.dtype != torch.float32 and q.shape[:3].numel() * k.shape[2] <= 2 ** 24:
        p = ((q @ k.transpose(-1, -2)).float() * (q.shape[-1] ** -0.5 if scale is None else scale)).softmax(-1)
        return (p.to(v.dtype) @ v).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(1, 2)


def sinusoidal_embedding_1d(dim, pos):
    half = dim // 2
    pos = pos.to(torch.float64)
    freqs = torch.outer(pos, torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=pos.device).div(half)))
    return torch.cat([torch.cos(freqs), torch.sin(freqs)], dim=1)


def rope_params(max_len, dim, theta=10000):
    angle = torch.outer(torch.arange(max_len), 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim)))
    return torch.polar(torch.ones_like(angle), angle)


@functools.lru_cache(maxsize=8)
def rope_table(head_dim, grid, device):
    """Complex rotations [f*h*w, head_dim/2] for tokens in (f, h, w) order; the axes get 44/42/42 real dims."""
    d = head_dim
    table = torch.cat([rope_params(1024, d - 4 * (d // 6)), rope_params(1024, 2 * (d // 6)),
                       rope_params(1024, 2 * (d // 6))], dim=1)
    c = d // 2
    ft, fh, fw = table.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    f, h, w = grid
    freqs = torch.cat([ft[:f].view(f, 1, 1, -1).expand(f, h, w, -1), fh[:h].view(1, h, 1, -1).expand(f, h, w, -1),
                       fw[:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1).reshape(f * h * w, c)
    return freqs.to(device)


def rope_apply(x, freqs):
    """Rotate adjacent channel pairs (2i, 2i+1) of x [B, L, heads, head_dim] by the float64 table; result fp32."""
    B, L, n, d = x.shape
    xc = torch.view_as_complex(x.to(torch.float64).reshape(B, L, n, d // 2, 2))
    return torch.view_as_real(xc * freqs.view(1, L, 1, d // 2)).flatten(3).float()


class WanRMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.float()).type_as(x)


class WanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, eps=1e-6):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = WanRMSNorm(dim, eps), WanRMSNorm(dim, eps)  # over the full dim, before the head split

    def forward(self, x, freqs, group=None, seq_len=None):
        """Under sequence parallelism (group) x holds this rank's tokens: Ulysses all-to-alls give attention every
        token for heads/sp heads; keys beyond seq_len are padding and are left out."""
        B, L, _ = x.shape
        q = self.norm_q(self.q(x)).view(B, L, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(x)).view(B, L, self.num_heads, self.head_dim)
        v = self.v(x).view(B, L, self.num_heads, self.head_dim)
        q, k, v = qkv_to_heads(rope_apply(q, freqs), rope_apply(k, freqs), v, group)
        out = attention(q, k[:, :seq_len], v[:, :seq_len])
        return self.o(heads_to_seq(out, group).flatten(2))


class WanCrossAttention(WanSelfAttention):
    def forward(self, x, context):
        B, L, _ = x.shape
        q = self.norm_q(self.q(x)).view(B, L, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(context)).view(B, -1, self.num_heads, self.head_dim)
        v = self.v(context).view(B, -1, self.num_heads, self.head_dim)
        return self.o(attention(q, k, v).flatten(2))  # all text rows attend, padding included, as officially


class WanAttentionBlock(nn.Module):
    def __init__(self, dim, ffn_dim, num_heads, eps=1e-6):
        super().__init__()
        self.norm1 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, eps)
        self.norm3 = WanLayerNorm(dim, eps, elementwise_affine=True)  # the cross-attention pre-norm
        self.cross_attn = WanCrossAttention(dim, num_heads, eps)
        self.norm2 = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate='tanh'), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, dim) / dim ** 0.5)

    def forward(self, x, e0, freqs, context, group=None, seq_len=None):
        with fp32(x):
            shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.unsqueeze(0) + e0).unbind(2)
        y = self.self_attn(self.norm1(x).float() * (1 + scale_sa) + shift_sa, freqs, group, seq_len)
        with fp32(x):
            x = x + y * gate_sa
        x = x + self.cross_attn(self.norm3(x), context)  # no gate, no modulation
        y = self.ffn(self.norm2(x).float() * (1 + scale_ff) + shift_ff)
        with fp32(x):
            x = x + y * gate_ff
        return x


class Head(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps=1e-6):
        super().__init__()
        self.norm = WanLayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim ** 0.5)

    def forward(self, x, e):
        with fp32(x):  # e is the time embedding itself (no SiLU, not e0)
            shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)
            return self.head(self.norm(x) * (1 + scale) + shift)


class WanModel(nn.Module):
    def __init__(self, model_type='t2v', patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=2048, ffn_dim=8192,
                 freq_dim=256, text_dim=4096, out_dim=16, num_heads=16, num_layers=32, eps=1e-6):
        super().__init__()
        self.model_type, self.patch_size, self.text_len, self.freq_dim = model_type, tuple(patch_size), text_len, freq_dim
        self.out_dim, self.num_heads = out_dim, num_heads
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate='tanh'), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        self.blocks = nn.ModuleList(WanAttentionBlock(dim, ffn_dim, num_heads, eps) for _ in range(num_layers))
        self.head = Head(dim, out_dim, patch_size, eps)
        self.checkpointing = False  # recompute each block in backward (a trainer setting, not a weight)

    def init_weights(self):
        """The official initialisation, for training from scratch."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for m in [*self.text_embedding.modules(), *self.time_embedding.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    def forward(self, x, t, context, y=None, features_at=0, group=None, stop_after=0):
        """x: [B, C, F, H, W] latents; t: [B] or per-token [B, L] timesteps in [0, 1000];
        context: [B, text_len, text_dim] text features, zero-padded; y: [B, C', F, H, W] extra i2v channels.
        Returns the velocity prediction [B, out_dim, F, H, W] in fp32, and with features_at = k > 0 also the
        tokens [B, L, dim] after block k (1-indexed, as VideoREPA's align_layer).
        group: the sequence-parallel group. Every rank passes the same inputs and gets the same output; the blocks
        see this rank's contiguous chunk of the tokens (padded to a multiple of sp), so the features are that chunk
        [B, pad_len(L, group) / sp, dim] (gather them with models.parallel.seq_gather).
        stop_after = k > 0 runs blocks 1..k only and returns their tokens (no head): sampling-time probes need no more."""
        if y is not None:
            x = torch.cat([x, y], dim=1)
        x = self.patch_embedding(x)
        B, _, f, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)  # tokens in (f, h, w) order
        freqs = rope_table(self.blocks[0].self_attn.head_dim, (f, h, w), x.device)
        with fp32(x):
            # a shared timestep is kept as [B, 1, ...] and broadcast: the same numbers as expanding it per token
            tt = t.view(B, -1)
            e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, tt.flatten()).float()).view(B, tt.shape[1], -1)
            e0 = self.time_projection(e).unflatten(2, (6, -1))
        context = self.text_embedding(context)
        n = x.shape[1]
        # this rank's tokens, with their rotations and (per-token) timestep embeddings; shared timesteps stay [B, 1]
        x, freqs = seq_shard(x, group), seq_shard(freqs, group, dim=0)
        e, e0 = (seq_shard(a, group) if a.shape[1] == n else a for a in (e, e0))
        for i, block in enumerate(self.blocks):
            if self.checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, e0, freqs, context, group, n, use_reentrant=False)
            else:
                x = block(x, e0, freqs, context, group, n)
            if i + 1 == features_at:
                features = x
            if i + 1 == stop_after:
                return x
        out = self.unpatchify(seq_gather(self.head(x, e), group, n), (f, h, w)).float()
        return (out, features) if features_at else out

    def unpatchify(self, x, grid):
        pt, ph, pw = self.patch_size
        f, h, w = grid
        x = x.view(x.shape[0], f, h, w, pt, ph, pw, self.out_dim)
        return torch.einsum('bfhwpqrc->bcfphqwr', x).reshape(x.shape[0], self.out_dim, f * pt, h * ph, w * pw)
