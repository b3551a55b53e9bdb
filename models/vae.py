"""Video codecs: the Wan2.1 and Wan2.2 causal VAEs, and `pixel`, a parameter-free codec for CPU debugging runs.

Every codec maps [B, 3, 1+4k, H, W] in [-1, 1] to latents [B, z_dim, 1+k, H/s, W/s] and back: frame 0 is coded
alone, then each group of 4 frames gives one latent frame, so everything downstream is the same code for all.

The Wan VAEs follow the official Wan-Video/Wan2.2 wan/modules/vae2_1.py and vae2_2.py (reference/wan22.md
section 4); module names are the official checkpoint keys. The official code threads a `feat_cache` list through
every call; here each causal conv keeps its own cache instead, which gives the same numbers.
"""
import functools
from collections import OrderedDict

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_T = 2  # input frames a causal conv remembers from the previous chunk (its kernel's temporal reach)

# name -> WanVAE arguments; mean/std are the official per-channel latent statistics
configs = {
    'wan2.1': dict(z_dim=16, dim=96, wan22=False,
                   mean=[-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                         0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921],
                   std=[2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                        3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]),
    'wan2.2': dict(z_dim=48, dim=160, dec_dim=256, wan22=True,
                   mean=[-0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542,
                         0.2813, 0.0891, 0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109,
                         0.2665, -0.2108, -0.2158, 0.2502, -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899,
                         -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723, -0.2839, -0.2083, -0.0520, 0.3748,
                         0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667],
                   std=[0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344,
                        0.5894, 1.0901, 0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804,
                        0.5833, 1.4146, 0.8986, 0.5659, 0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999,
                        0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944, 0.5726, 1.2042, 0.5458, 1.6887,
                        0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744]),
}


class CausalConv3d(nn.Conv3d):
    """Conv3d padded on both sides in space but only in front in time (2*p frames), so output t sees inputs <= t.

    Convs with temporal padding are stateful: the front padding is replaced by the last CACHE_T input frames of
    the previous call, so running a video chunk by chunk equals one causal conv over the whole video.
    WanVAE.reset() forgets them before each video."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        p = self.padding
        self.causal_pad = (p[2], p[2], p[1], p[1], 2 * p[0], 0)
        self.padding = (0, 0, 0)
        self.cache = None

    def forward(self, x):
        pad = self.causal_pad
        if pad[4]:
            if self.cache is not None:
                x = torch.cat([self.cache, x], 2)
                pad = pad[:4] + (pad[4] - self.cache.shape[2], 0)  # fewer than 2 cached frames: zeros before them
            self.cache = x[:, :, -CACHE_T:].clone()
        return super().forward(F.pad(x, pad))


class RMS_norm(nn.Module):
    """x / ||x|| over channels * sqrt(C) * gamma; gamma is [C,1,1,1] for video, [C,1,1] for frames (images=True)."""

    def __init__(self, dim, images=False):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * (2 if images else 3)))

    def forward(self, x):
        return F.normalize(x, dim=1) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    def __init__(self, in_dim, out_dim):
        super().__init__()
        self.residual = nn.Sequential(RMS_norm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
                                      RMS_norm(out_dim), nn.SiLU(), nn.Dropout(0.0),
                                      CausalConv3d(out_dim, out_dim, 3, padding=1))
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x):
        return self.residual(x) + self.shortcut(x)


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame (frames do not mix)."""

    def __init__(self, dim):
        super().__init__()
        self.norm = RMS_norm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).flatten(0, 1))
        q, k, v = self.to_qkv(y).view(b * t, 1, 3 * c, h * w).transpose(2, 3).chunk(3, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        return x + self.proj(y).unflatten(0, (b, t)).transpose(1, 2)


class Resample(nn.Module):
    """2x down/up-sampling of each frame; the *3d modes also halve/double time with `time_conv`."""

    def __init__(self, dim, mode, up_dim=None):
        super().__init__()
        self.mode = mode
        if mode.startswith('up'):  # up_dim: dim // 2 in Wan2.1, dim in Wan2.2
            self.resample = nn.Sequential(nn.Upsample(scale_factor=(2.0, 2.0), mode='nearest-exact'),
                                          nn.Conv2d(dim, up_dim, 3, padding=1))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        if mode == 'upsample3d':
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        elif mode == 'downsample3d':
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        self.cache = None  # per-video state, like CausalConv3d's

    def forward(self, x):
        b, c, t, h, w = x.shape
        if self.mode == 'upsample3d':
            if self.cache is None:  # first chunk: latent frame 0 becomes the single pixel frame 0
                self.cache = True
            else:  # every frame becomes two: the two channel halves of time_conv, interleaved
                x = self.time_conv(x).view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
        x = self.resample(x.transpose(1, 2).flatten(0, 1)).unflatten(0, (b, -1)).transpose(1, 2)
        if self.mode == 'downsample3d':  # stride-2 conv over [previous chunk's last frame, x]; frame 0 passes as is
            prev, self.cache = self.cache, x[:, :, -1:].clone()
            if prev is not None:
                x = self.time_conv(torch.cat([prev, x], 2))
        return x


def avg_down(x, c_out, ft, fs):
    """Wan2.2 AvgDown3D shortcut: (ft, fs, fs) blocks to channels, then the mean of each group of channels."""
    x = F.pad(x, (0, 0, 0, 0, -x.shape[2] % ft, 0))  # the first chunk has 1 frame: zero frame in front
    b, c, t, h, w = x.shape
    x = x.view(b, c, t // ft, ft, h // fs, fs, w // fs, fs).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c_out, -1, t // ft, h // fs, w // fs).mean(2)


def dup_up(x, c_out, ft, fs):
    """Wan2.2 DupUp3D shortcut: repeat channels, then channels to (ft, fs, fs) blocks."""
    b, c, t, h, w = x.shape
    x = x.repeat_interleave(c_out * ft * fs * fs // c, dim=1).view(b, c_out, ft, fs, fs, t, h, w)
    return x.permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(b, c_out, t * ft, h * fs, w * fs)


class Stage(nn.Module):
    """Wan2.2 Down_ResidualBlock / Up_ResidualBlock: layers named `name`, plus a parameter-free shortcut."""

    def __init__(self, name, layers, shortcut):
        super().__init__()
        self.name = name
        self.add_module(name, nn.Sequential(*layers))
        self.shortcut = shortcut

    def forward(self, x):
        y = getattr(self, self.name)(x)
        if self.shortcut is None:
            return y
        s = self.shortcut(x)  # on the first decoder chunk y is not doubled in time: keep s's last frames
        return y + s[:, :, s.shape[2] - y.shape[2]:]


def encoder(in_dim, dim, z_dim, dim_mult, num_res_blocks, t_down, wan22):
    dims = [dim * m for m in [1] + dim_mult]
    stages = []
    for i, (d_in, d) in enumerate(zip(dims[:-1], dims[1:])):
        down = i < len(dim_mult) - 1
        layers = [ResidualBlock(d_in if j == 0 else d, d) for j in range(num_res_blocks)]
        layers += [Resample(d, 'downsample3d' if t_down[i] else 'downsample2d')] if down else []
        ft, fs = (1 + t_down[i], 2) if down else (1, 1)
        stages.append(Stage('downsamples', layers, functools.partial(avg_down, c_out=d, ft=ft, fs=fs)) if wan22
                      else layers)
    return nn.Sequential(OrderedDict(
        conv1=CausalConv3d(in_dim, dims[0], 3, padding=1),
        downsamples=nn.Sequential(*stages) if wan22 else nn.Sequential(*sum(stages, [])),
        middle=nn.Sequential(ResidualBlock(d, d), AttentionBlock(d), ResidualBlock(d, d)),
        head=nn.Sequential(RMS_norm(d), nn.SiLU(), CausalConv3d(d, z_dim, 3, padding=1))))


def decoder(out_dim, dim, z_dim, dim_mult, num_res_blocks, t_up, wan22):
    dims = [dim * m for m in [dim_mult[-1]] + dim_mult[::-1]]
    stages = []
    for i, (d_in, d) in enumerate(zip(dims[:-1], dims[1:])):
        up = i < len(dim_mult) - 1
        d_in = d_in // 2 if i and not wan22 else d_in  # Wan2.1's upsampling conv halves the channels
        layers = [ResidualBlock(d_in if j == 0 else d, d) for j in range(num_res_blocks + 1)]
        layers += [Resample(d, 'upsample3d' if t_up[i] else 'upsample2d', d if wan22 else d // 2)] if up else []
        shortcut = functools.partial(dup_up, c_out=d, ft=1 + t_up[i], fs=2) if up else None
        stages.append(Stage('upsamples', layers, shortcut) if wan22 else layers)
    return nn.Sequential(OrderedDict(
        conv1=CausalConv3d(z_dim, dims[0], 3, padding=1),
        middle=nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                             ResidualBlock(dims[0], dims[0])),
        upsamples=nn.Sequential(*stages) if wan22 else nn.Sequential(*sum(stages, [])),
        head=nn.Sequential(RMS_norm(d), nn.SiLU(), CausalConv3d(d, out_dim, 3, padding=1))))


def patchify(x, p):
    """b c f (h q) (w r) -> b (c r q) f h w, Wan2.2's 2x2 pixel patches."""
    b, c, f, h, w = x.shape
    x = x.view(b, c, f, h // p, p, w // p, p).permute(0, 1, 6, 4, 2, 3, 5)
    return x.reshape(b, c * p * p, f, h // p, w // p)


def unpatchify(x, p):
    b, c, f, h, w = x.shape
    x = x.view(b, c // (p * p), p, p, f, h, w).permute(0, 1, 4, 5, 3, 6, 2)
    return x.reshape(b, c // (p * p), f, h * p, w * p)


class WanVAE(nn.Module):
    """The Wan2.1 (wan22=False) or Wan2.2 (wan22=True: 2x2 patchify, shortcut stages, separate dec_dim) VAE.

    encode returns the posterior mean only, normalised per channel with `mean`/`std`; decode clamps to [-1, 1].
    Both run in the weights' dtype with autocast off (officially fp32). Set `tile = (side, overlap)` in latent
    pixels, e.g. (32, 8), to decode in spatial tiles with bounded memory (see _decode_tiled)."""

    def __init__(self, z_dim, dim, dec_dim=None, wan22=False, mean=None, std=None, dim_mult=(1, 2, 4, 4),
                 num_res_blocks=2, t_down=(False, True, True)):
        super().__init__()
        dim_mult, t_down = list(dim_mult), list(t_down)
        self.z_dim, self.wan22, self.patch = z_dim, wan22, 2 if wan22 else 1
        self.mean, self.std = mean or [0.0] * z_dim, std or [1.0] * z_dim
        self.up = 2 ** (len(dim_mult) - 1)  # decoder output pixels per latent pixel (before unpatchify)
        self.stride = (2 ** sum(t_down), self.patch * self.up, self.patch * self.up)
        self.tile = None
        channels = 3 * self.patch ** 2
        self.encoder = encoder(channels, dim, 2 * z_dim, dim_mult, num_res_blocks, t_down, wan22)
        self.conv1 = CausalConv3d(2 * z_dim, 2 * z_dim, 1)
        self.conv2 = CausalConv3d(z_dim, z_dim, 1)
        self.decoder = decoder(channels, dec_dim or dim, z_dim, dim_mult, num_res_blocks, t_down[::-1], wan22)

    def reset(self):
        for m in self.modules():
            if hasattr(m, 'cache'):
                m.cache = None

    def _stats(self, like):  # official: mu = (mu - mean) * (1 / std) and back
        mean, std = (torch.tensor(v, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
                     for v in (self.mean, self.std))
        return mean, 1.0 / std

    def encode(self, video):
        _, c, n, h, w = video.shape
        if c != 3 or (n - 1) % 4 or h % self.stride[1] or w % self.stride[2]:
            raise ValueError(f'the Wan VAE needs [B, 3, 1+4k, H, W] with H, W divisible by {self.stride[1]}, '
                             f'got {tuple(video.shape)}')
        with torch.autocast(video.device.type, enabled=False):
            x = video.to(self.conv1.weight.dtype)
            x = patchify(x, self.patch) if self.wan22 else x
            self.reset()  # causal chunks: frame 0 alone, then 4 frames each -> one latent frame per chunk
            out = torch.cat([self.encoder(x[:, :, max(0, 4 * i - 3):4 * i + 1]) for i in range(1 + (n - 1) // 4)], 2)
            self.reset()
            mu = self.conv1(out).chunk(2, dim=1)[0]  # (mu, log_var): the codec is deterministic
            mean, inv_std = self._stats(mu)
            return (mu - mean) * inv_std

    def decode(self, z):
        if z.dim() != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f'the Wan VAE decodes [B, {self.z_dim}, T, h, w] latents, got {tuple(z.shape)}')
        with torch.autocast(z.device.type, enabled=False):
            z = z.to(self.conv2.weight.dtype)
            mean, inv_std = self._stats(z)
            z = z / inv_std + mean
            x = self._decode_tiled(z) if self.tile else self._decode(z)
            return (unpatchify(x, self.patch) if self.wan22 else x).clamp(-1, 1)

    def _decode(self, z):
        self.reset()
        x = self.conv2(z)
        out = torch.cat([self.decoder(x[:, :, i:i + 1]) for i in range(x.shape[2])], 2)  # one latent frame a time
        self.reset()
        return out

    def _decode_tiled(self, z):
        """diffusers AutoencoderKLWan.tiled_decode's scheme: tiles of `side` latent pixels start every
        side - overlap; each decoded tile is blended linearly into its upper, then its left neighbour over the
        overlap, and cut where the next tile starts. Approximate near the seams."""
        side, overlap = self.tile
        if not 0 <= overlap < side:
            raise ValueError(f'tile = (side, overlap) needs 0 <= overlap < side, got {self.tile}')
        e, keep = overlap * self.up, (side - overlap) * self.up  # blend width and tile pitch in decoded pixels
        starts = lambda n: range(0, max(n - overlap, 1), side - overlap)
        rows = [[self._decode(z[..., i:i + side, j:j + side]) for j in starts(z.shape[4])] for i in starts(z.shape[3])]
        ramp = torch.arange(e, dtype=z.dtype, device=z.device) / e  # weight of the later tile across the overlap
        for i, row in enumerate(rows):
            for j, x in enumerate(row):
                if i and e:
                    x[..., :e, :] = rows[i - 1][j][..., -e:, :] * (1 - ramp[:, None]) + x[..., :e, :] * ramp[:, None]
                if j and e:
                    x[..., :e] = row[j - 1][..., -e:] * (1 - ramp) + x[..., :e] * ramp
        cut = lambda k, n: keep if k < n - 1 else None  # the last tile is kept whole
        return torch.cat([torch.cat([x[..., :cut(i, len(rows)), :cut(j, len(row))] for j, x in enumerate(row)], -1)
                          for i, row in enumerate(rows)], -2)


def vae_config(shapes):
    """WanVAE arguments read off {key: shape} of an official state dict: the released files give the configs
    above (with their latent statistics), smaller test-made files their own widths."""
    wan22 = shapes['encoder.conv1.weight'][1] == 12
    prefix = 'encoder.downsamples.0.downsamples.' if wan22 else 'encoder.downsamples.'
    blocks = len({k[len(prefix):].split('.')[0] for k in shapes if k.startswith(prefix)})
    cfg = dict(z_dim=shapes['conv2.weight'][0], dim=shapes['encoder.conv1.weight'][0], wan22=wan22,
               num_res_blocks=blocks - 1 if wan22 else (blocks - 3) // 4)  # + 1 downsampler; 2.1: 4 stages, 3 resamples
    if wan22:
        cfg['dec_dim'] = shapes['decoder.head.2.weight'][1]
    ref = configs['wan2.2' if wan22 else 'wan2.1']
    return ref if all(ref.get(k, 2) == v for k, v in cfg.items()) else cfg  # (ref leaves num_res_blocks at 2)


class PixelCodec:
    """[B, 3, 1+4k, H, W] in [-1, 1] <-> [B, 48, 1+k, H/2, W/2]: each latent pixel stacks 4 frames x 2x2 pixels x RGB
    (times `scale`), frame 0 repeated to fill its group. 48 channels (as the Wan2.2 VAE) keep a 2x2-patch token at
    192 values, so a narrow debug DiT's head can still express the noise it has to remove. Unscaled, the clips'
    variance (0.1) is a tenth of the noise's, the velocity target is mostly noise, and a debug DiT learns to pass
    the noise through rather than the picture (its x0 estimate at sigma 1 was worse than the mean image)."""
    stride = (4, 2, 2)
    z_dim = 3 * 4 * 2 * 2
    scale = 3.0  # toy-clip pixels have std 0.34: x3 gives latents of about unit variance, as the VAE's normalised ones

    def encode(self, video):
        B, C, F, H, W = video.shape
        if (F - 1) % 4 or H % 2 or W % 2:
            raise ValueError(f'pixel codec needs 1+4k frames and even sides, got {F} frames of {H}x{W}')
        x = torch.cat([video[:, :, :1].expand(-1, -1, 4, -1, -1), video[:, :, 1:]], dim=2)
        x = x.view(B, C, F // 4 + 1, 4, H // 2, 2, W // 2, 2)
        return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(B, self.z_dim, F // 4 + 1, H // 2, W // 2) * self.scale

    def decode(self, z):
        B, _, T, h, w = z.shape
        x = (z / self.scale).view(B, 3, 4, 2, 2, T, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4).reshape(B, 3, T * 4, h * 2, w * 2)
        return torch.cat([x[:, :, :4].mean(2, keepdim=True), x[:, :, 4:]], dim=2)  # frame 0's group: 4 copies


def load_codec(name):
    """'pixel', or a randomly initialised, frozen Wan VAE ('wan2.1', 'wan2.2'); load official weights with
    load_state_dict (the keys match) and move it with .to(device)."""
    if name == 'pixel':
        return PixelCodec()
    if name in configs:
        return WanVAE(**configs[name]).eval().requires_grad_(False)
    raise ValueError(f"unknown codec '{name}'; this version has: pixel, {', '.join(configs)}")
