"""V-JEPA 2 and V-JEPA 2.1 video encoders, written to load the official `.pt` checkpoints with no renaming
beyond the `module.backbone.` prefixes (facts: reference/vjepa.md sections 1-3).

A pre-norm ViT over 2x16x16 tubelets with 3-D RoPE on q and k. The two versions differ in the RoPE layout
(V2 keeps the "tiled" cos/sin table its weights were trained with; 2.1 uses the proper interleaved rotation and
rescales spatial positions to the 16x16 pre-training grid), and in the output: V2 has one final `norm`, 2.1 has
`norms_block` (inference uses the last), an image patch embedding and learned modality vectors.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from data import resize_crop
from models.checkpoint import load_state_dict

# name -> constructor arguments: width, blocks, heads, MLP hidden, version, training resolution (reference 1.1).
# g and G use the `_xformers` builders' 22 / 26 heads; 16-head variants have identical shapes, so heads come from here.
configs = {
    'vitl': dict(dim=1024, depth=24, heads=16, mlp=4096, version=2, res=256),
    'vith': dict(dim=1280, depth=32, heads=16, mlp=5120, version=2, res=256),
    'vitg': dict(dim=1408, depth=40, heads=22, mlp=6144, version=2, res=256),
    'vitg-384': dict(dim=1408, depth=40, heads=22, mlp=6144, version=2, res=384),
    'vjepa2.1-vitb': dict(dim=768, depth=12, heads=12, mlp=3072, version=2.1, res=384),
    'vjepa2.1-vitl': dict(dim=1024, depth=24, heads=16, mlp=4096, version=2.1, res=384),
    'vjepa2.1-vitg': dict(dim=1408, depth=40, heads=22, mlp=6144, version=2.1, res=384),
    'vjepa2.1-vitG': dict(dim=1664, depth=48, heads=26, mlp=8192, version=2.1, res=384),
    # CPU tests and the toy data; head_dim 64 as in every real variant, so the RoPE split (20/20/20 + 4) is the real one
    'debug': dict(dim=128, depth=2, heads=2, mlp=512, version=2, res=64),
    'vjepa2.1-debug': dict(dim=128, depth=2, heads=2, mlp=512, version=2.1, res=64),
}

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # ImageNet, as in every official eval transform


def rope_tables(grid, head_dim, version, device):
    """COS, SIN [T*Hp*Wp, head_dim] (fp32) for tokens in (t, h, w) order; channels [0,s) t, [s,2s) h, [2s,3s) w,
    the rest pass through (cos 1, sin 0). Built in float64, then cast; cheap, so rebuilt per forward (no cache
    that could hand inference-mode tensors to a later autograd pass)."""
    T, H, W = grid
    s = 2 * (head_dim // 3 // 2)
    axes = (torch.arange(n, dtype=torch.float64) for n in grid)
    t, h, w = (p.flatten() for p in torch.meshgrid(*axes, indexing='ij'))
    if version != 2:  # 2.1 `interpolate_rope`: spatial positions stretched onto the 16-grid of 256 px, time untouched
        h, w = (h * 15 / (H - 1) if H > 1 else h), (w * 15 / (W - 1) if W > 1 else w)
    omega = 1.0 / 10000 ** (torch.arange(s // 2, dtype=torch.float64) / (s / 2))
    j = torch.arange(s)
    # V2: [a0..a9, a0..a9], so a pair's two channels see different angles (a known bug its weights depend on)
    # 2.1: [a0, a0, a1, a1, ...], a true rotation of each adjacent pair
    freq = omega[j % (s // 2)] if version == 2 else omega[j // 2]
    angle = torch.cat([pos[:, None] * freq for pos in (t, h, w)], dim=1)
    rest = head_dim - 3 * s
    cos = torch.cat([angle.cos(), angle.new_ones(len(t), rest)], dim=1)
    sin = torch.cat([angle.sin(), angle.new_zeros(len(t), rest)], dim=1)
    return cos.float().to(device), sin.float().to(device)


def rope_apply(x, cos, sin):
    """x [B, heads, N, hd]: x*COS + rot(x)*SIN with rot(x)[2i] = -x[2i+1], rot(x)[2i+1] = x[2i]; in fp32, cast back."""
    xf = x.float()
    x1, x2 = xf.unflatten(-1, (-1, 2)).unbind(-1)
    return (xf * cos + torch.stack((-x2, x1), dim=-1).flatten(-2) * sin).to(x.dtype)


class PatchEmbed(nn.Module):
    def __init__(self, dim, tubelet):
        super().__init__()
        self.proj = nn.Conv3d(3, dim, kernel_size=(tubelet, 16, 16), stride=(tubelet, 16, 16))

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D], tokens in (t, h, w) order


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)  # rows: q, k, v, each head-major
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(rope_apply(q, cos, sin), rope_apply(k, cos, sin), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact erf GELU in every released encoder


class Block(nn.Module):
    def __init__(self, dim, heads, mlp):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn, self.mlp = Attention(dim, heads), Mlp(dim, mlp)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class VJEPA(nn.Module):
    def __init__(self, dim, depth, heads, mlp, version=2, res=256):
        super().__init__()
        self.version, self.res, self.head_dim = version, res, dim // heads
        self.patch_embed = PatchEmbed(dim, 2)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp) for _ in range(depth))
        if version == 2:
            self.norm = nn.LayerNorm(dim, eps=1e-6)
        else:  # 4 norms for the hierarchical training targets; inference uses norms_block[3] after the last block
            self.norms_block = nn.ModuleList(nn.LayerNorm(dim, eps=1e-6) for _ in range(4))
            self.patch_embed_img = PatchEmbed(dim, 1)
            self.img_mod_embed = nn.Parameter(torch.zeros(1, 1, dim))
            self.video_mod_embed = nn.Parameter(torch.zeros(1, 1, dim))

    def token_grid(self, frames, height, width):
        """(T', Hp, Wp) token grid of a [B, 3, frames, height, width] input; a single frame is an image in 2.1."""
        image = self.version != 2 and frames == 1
        if height % 16 or width % 16 or (frames % 2 and not image):
            raise ValueError(f'V-JEPA {self.version} needs height and width divisible by 16 and an even frame count'
                             f'{" (or 1 frame, an image)" if self.version != 2 else ""}, got {frames}x{height}x{width};'
                             f' use preprocess() to resize, and drop or repeat a frame')
        return (1 if image else frames // 2), height // 16, width // 16

    def forward(self, x):
        """x: [B, 3, T, H, W] ImageNet-normalised frames (see preprocess). Returns [B, T/2*H/16*W/16, D] tokens
        in (t, h, w) order; in 2.1 a single frame takes the image path ([B, H/16*W/16, D])."""
        grid = self.token_grid(*x.shape[2:])
        if self.version == 2:
            x = self.patch_embed(x)
        elif x.shape[2] == 1:
            x = self.patch_embed_img(x) + self.img_mod_embed
        else:
            x = self.patch_embed(x) + self.video_mod_embed
        cos, sin = rope_tables(grid, self.head_dim, self.version, x.device)  # shared by every block and head
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x) if self.version == 2 else self.norms_block[3](x)


def preprocess(video, grid):
    """video [B, 3, T, H, W] in [-1, 1] -> [B, 3, T, 16*Hp, 16*Wp] ImageNet-normalised for a (Hp, Wp) token grid:
    bilinear antialiased resize to cover, then centre crop. Unlike the official eval (short side to crop*256/224,
    then crop), nothing beyond the aspect mismatch is cut, so the tokens cover the same field as the caller's grid."""
    B, C, T, H, W = video.shape
    th, tw = 16 * grid[0], 16 * grid[1]
    x = (resize_crop(video.float().transpose(1, 2).reshape(B * T, C, H, W), th, tw) + 1) / 2
    x = (x - x.new_tensor(MEAN).view(1, 3, 1, 1)) / x.new_tensor(STD).view(1, 3, 1, 1)
    return x.reshape(B, T, C, th, tw).transpose(1, 2).to(video.dtype)


def load_vjepa(path, name, device='cpu', dtype=torch.float32, key=None, heads=None):
    """The frozen encoder `name` (a key of `configs`) from an official checkpoint (or a flat state dict) at `path`.
    key: the sub-dict; by default 2.1 B/L `ema_encoder`, 2.1 g/G `target_encoder`, V2 `target_encoder` (the EMA
    encoder of the paper probes) else `encoder`. heads: only a check, the variant fixes the head count."""
    if name not in configs:
        raise ValueError(f"unknown V-JEPA variant {name!r}; known: {', '.join(configs)}")
    cfg = configs[name]
    if heads is not None and heads != cfg['heads']:
        raise ValueError(f"{path}: '{name}' has {cfg['heads']} heads, not heads={heads}; a different head count "
                         f"has the same parameter shapes and would load silently with wrong outputs")
    ckpt = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    if not any(isinstance(v, dict) for v in ckpt.values()):
        sub, sd = None, ckpt  # already a flat state dict
    else:
        wanted = [key] if key else ['ema_encoder'] if name in ('vjepa2.1-vitb', 'vjepa2.1-vitl') else \
            ['target_encoder'] if cfg['version'] != 2 else ['target_encoder', 'encoder']
        sub = next((k for k in wanted if k in ckpt), None)
        if sub is None:
            raise ValueError(f"{path} has no {' or '.join(repr(k) for k in wanted)} entry (it has "
                             f"{', '.join(map(repr, ckpt))}); pass key= to pick the encoder sub-dict")
        sd = ckpt[sub]
    sd = {k.replace('module.', '').replace('backbone.', ''): v for k, v in sd.items() if not k.endswith('pos_embed')}
    where = f"{path} ['{sub}']" if sub else path
    qkv, want = sd.get('blocks.0.attn.qkv.weight'), (3 * cfg['dim'], cfg['dim'])
    if qkv is not None and tuple(qkv.shape) != want:
        same = ', '.join(k for k, c in configs.items() if c['dim'] == qkv.shape[-1]) or 'none known'
        raise ValueError(f"{where}: blocks.0.attn.qkv.weight has shape {tuple(qkv.shape)} but '{name}' needs {want} "
                         f"({cfg['heads']} heads of {cfg['dim'] // cfg['heads']}; this file's width would give "
                         f"head_dim {qkv.shape[-1] / cfg['heads']:g}), so it is a checkpoint of another variant "
                         f"(of that width: {same})")
    with torch.device('meta'):
        model = VJEPA(**cfg).to(dtype)
    model = model.to_empty(device=device)  # no random init of a 1-2B model that is overwritten at once
    load_state_dict(model, sd, where)  # strict: names missing, unexpected and mis-shaped keys
    return model.eval().requires_grad_(False)
