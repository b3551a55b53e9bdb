"""Stage 1 semantic aligner: text-conditioned per-token saliency on a frozen V-JEPA token grid (our design where the
SARA paper is silent, DESIGN.md section 6), its K+2 training queries, mask pooling and the eval metrics.

Aligner(video tokens [B, N, Dv], grid, caption features [B, L, Dt], text mask [B, L]) -> saliency logits [B, N] and a
unit global embedding [B, E]. Fusion blocks are pre-norm residual: self-attention over the video tokens (a fixed 3-D
sinusoidal position signal is added once, so any grid works), cross-attention from video to caption tokens with the
padding masked, MLP. The global head pools the fused tokens weighted by sigmoid(saliency) and projects them to the
caption-embedding space: that of the manifest's `text_embedding` when embed_dim is given, else the pooled T5 space
(width Dt), where `embed_text` maps mean-pooled T5 features through a small trainable projection (identity at init).
"""
import functools
import math

import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from data import resize_crop
from models.checkpoint import load_state_dict, load_t5, read_torch
from models.t5 import T5Encoder, Tokenizer, configs as t5_configs
from models.vjepa import VJEPA, configs as vjepa_configs, load_vjepa


@functools.lru_cache(maxsize=8)
def position_signal(grid, dim):
    """[T*H*W, dim] fixed sinusoids for tokens in (t, h, w) order, channels split in three even groups (t, h, w)."""
    parts = [2 * (dim // 6), 2 * (dim // 6)]
    parts.append(dim - sum(parts))
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid), indexing='ij')
    out = []
    for pos, c in zip(axes, parts):
        freq = 1.0 / 10000 ** (torch.arange(c // 2, dtype=torch.float64) / max(c // 2, 1))
        angle = pos.flatten()[:, None] * freq
        out += [angle.sin(), angle.cos()] + ([torch.zeros(len(angle), 1, dtype=torch.float64)] if c % 2 else [])
    return torch.cat(out, dim=1).float()


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, context, mask=None):
        """x [B, N, D] attends to context [B, L, D]; mask [B, L] bool, True = a real token."""
        split = lambda y: y.unflatten(-1, (self.heads, -1)).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(context)), split(self.v(context)),
                                           attn_mask=None if mask is None else mask[:, None, None, :])
        return self.o(y.transpose(1, 2).flatten(2))


class FusionBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.self_attn, self.cross_attn = Attention(dim, heads), Attention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, text, text_mask):
        h = self.norm1(x)
        x = x + self.self_attn(h, h)
        x = x + self.cross_attn(self.norm2(x), text, text_mask)
        return x + self.mlp(self.norm3(x))


class Aligner(nn.Module):
    def __init__(self, video_dim, text_dim, dim=256, heads=4, depth=2, embed_dim=None):
        super().__init__()
        self.video_in = nn.Sequential(nn.LayerNorm(video_dim), nn.Linear(video_dim, dim))
        self.text_in = nn.Sequential(nn.LayerNorm(text_dim), nn.Linear(text_dim, dim))
        self.blocks = nn.ModuleList(FusionBlock(dim, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.saliency_head = nn.Linear(dim, 1)
        self.global_head = nn.Linear(dim, embed_dim or text_dim)
        self.text_proj = None
        if embed_dim is None:  # no external caption embedding: InfoNCE against projected, pooled T5 features
            self.text_proj = nn.Linear(text_dim, text_dim)
            with torch.no_grad():
                self.text_proj.weight.copy_(torch.eye(text_dim))
                self.text_proj.bias.zero_()

    def forward(self, video, grid, text, text_mask):
        """video [B, N, Dv] V-JEPA tokens of grid (T, H, W); text [B, L, Dt], text_mask [B, L] (nonzero = real).
        Returns saliency logits [B, N] and the unit global embedding [B, E]."""
        pos = position_signal(tuple(grid), self.norm.normalized_shape[0])
        x = self.video_in(video) + pos.to(video.device, video.dtype)
        text_mask = text_mask.bool()
        t = self.text_in(text)
        for block in self.blocks:
            x = block(x, t, text_mask)
        x = self.norm(x)
        logits = self.saliency_head(x).squeeze(-1)
        w = torch.sigmoid(logits).unsqueeze(-1)
        pooled = (w * x).sum(1) / (w.sum(1) + 1e-6)
        return logits, F.normalize(self.global_head(pooled), dim=-1)

    def embed_text(self, text, text_mask):
        """Caption embedding in the pooled T5 space: masked mean of the features, trainable projection, unit norm."""
        m = text_mask.to(text.dtype).unsqueeze(-1)
        return F.normalize(self.text_proj((text * m).sum(1) / m.sum(1).clamp(min=1)), dim=-1)


def info_nce(g, c, captions, temperature):
    """Symmetric InfoNCE between rows of g and c [B, E] (unit); pairs of clips with the same caption are left out of
    each other's negatives."""
    logits = g @ c.T / temperature
    same = torch.tensor([[a == b for b in captions] for a in captions], device=g.device)
    logits = logits.masked_fill(same & ~torch.eye(len(captions), dtype=torch.bool, device=g.device), float('-inf'))
    labels = torch.arange(len(captions), device=g.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ---------------------------------------------------------------------------------------------- queries and targets

def build_queries(entity_captions, masks, background='', caption=''):
    """The K+2 queries of one clip: (kinds, texts, pixel targets [Q, T, H, W]) from K entity captions, their soft masks
    [K, T, H, W] in [0, 1] and the background caption. Each entity with its mask; the entity captions joined with
    ' and ' with the soft union 1 - prod(1 - m_k) (asked once when K = 1: it is the entity query); the background with
    the complement 1 - union (left out when the clip has no background caption). A clip without entities gives one
    query, its background (else its caption) with an all-ones target: nothing is singled out, every token counts."""
    K = len(entity_captions)
    if masks.shape[0] != K:
        raise ValueError(f'{masks.shape[0]} masks for {K} entity captions; every entity needs exactly one mask')
    if K == 0:
        text = background or caption
        if not text:
            raise ValueError('a clip without entities needs a background or a caption to be asked anything')
        return ['scene'], [text], masks.new_ones(1, *masks.shape[1:])
    union = 1 - torch.prod(1 - masks, dim=0)
    kinds, texts, targets = ['entity'] * K, list(entity_captions), list(masks)
    if K > 1:
        kinds.append('union'), texts.append(' and '.join(entity_captions)), targets.append(union)
    if background:
        kinds.append('background'), texts.append(background), targets.append(1 - union)
    return kinds, texts, torch.stack(targets)


def mask_targets(masks, grid):
    """masks [Q, T, H, W] in [0, 1] -> [Q, T'*Hp*Wp] soft targets on the V-JEPA grid (T', Hp, Wp): the fraction of each
    token's pixels covered (its T/T' frames x 16x16 pixels), after the resize and crop the video gets."""
    Q, T = masks.shape[:2]
    if T % grid[0]:
        raise ValueError(f'{T} mask frames do not split into {grid[0]} token steps')
    x = resize_crop(masks.float(), 16 * grid[1], 16 * grid[2]).clamp(0, 1)
    return F.avg_pool3d(x.unsqueeze(1), (T // grid[0], 16, 16)).flatten(1)


def tokenize(tok, texts, text_len, names=None, warned=None):
    """tok(texts, text_len) -> (ids, mask), printing once per (name, text) a warning for a text that the tokenizer
    truncates; `names` says which clip each text comes from, `warned` is the set that makes the warning one-time."""
    ids, mask = tok(texts, text_len)
    warned = set() if warned is None else warned
    for i in (mask.sum(1) >= text_len).nonzero().flatten().tolist():
        key = (names[i] if names else '', texts[i])
        if key in warned:
            continue
        warned.add(key)
        n = int(tok([texts[i]], 8 * text_len)[1].sum())
        if n > text_len:
            short = texts[i] if len(texts[i]) <= 80 else texts[i][:77] + '...'
            print(f"warning: {key[0] or 'a text'}: '{short}' has {n if n < 8 * text_len else 'at least %d' % n} "
                  f"tokens, more than text_len={text_len}: only its first {text_len - 1} and </s> are used "
                  f"(raise --text_len or shorten the caption)", flush=True)
    return ids, mask


# ---------------------------------------------------------------------------------------------- metrics

def iou(prob, target, threshold=0.5):
    """IoU of {prob > threshold} and {target > 0.5} over all elements; 1.0 when both sets are empty."""
    p, t = prob > threshold, target > 0.5
    union = (p | t).sum().item()
    return (p & t).sum().item() / union if union else 1.0


def auroc(scores, labels):
    """Area under the ROC curve from ranks (Mann-Whitney U), ties given their average rank; nan with one class only."""
    s, y = scores.flatten().double(), labels.flatten().bool()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if not n_pos or not n_neg:
        return math.nan
    sorted_s, order = s.sort()
    _, inverse, counts = torch.unique_consecutive(sorted_s, return_inverse=True, return_counts=True)
    last = counts.cumsum(0).double()
    ranks = torch.empty_like(s)
    ranks[order] = (last - (counts.double() - 1) / 2)[inverse]  # 1-based average rank of each tie group
    return ((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)).item()


# ---------------------------------------------------------------------------------------------- loading

def load_encoders(c, dev, tok_path, saved=None, text=True, prepare_t5=None):
    """Frozen V-JEPA, umT5 and tokenizer as the settings c say; the random debug ones come from c['seed'], or from
    a checkpoint's copies (`saved`). text=False: the V-JEPA alone (umT5 and tokenizer None). prepare_t5(module)
    shards umT5 before its weights are read (as in checkpoint.load_dit)."""
    if c['vjepa_model'] not in vjepa_configs:
        raise SystemExit(f"unknown vjepa_model '{c['vjepa_model']}'; choose one of {', '.join(vjepa_configs)}")
    if c['vjepa_ckpt']:
        vjepa = load_vjepa(c['vjepa_ckpt'], c['vjepa_model'], dev)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(c['seed'])
            vjepa = VJEPA(**vjepa_configs[c['vjepa_model']])
        if saved is not None and 'vjepa' in saved:
            load_state_dict(vjepa, saved['vjepa'], "the checkpoint's V-JEPA")
        vjepa = vjepa.to(dev).eval().requires_grad_(False)
    if not text:
        return vjepa, None, None
    if c['ckpt_dir']:
        t5 = load_t5(os.path.join(c['ckpt_dir'], 'models_t5_umt5-xxl-enc-bf16.pth'), dev, prepare=prepare_t5)
        tok = Tokenizer(os.path.join(c['ckpt_dir'], 'google', 'umt5-xxl'))
    else:
        t5 = T5Encoder(**t5_configs['debug']).eval().requires_grad_(False)
        t5.init_weights(c['seed'])
        if saved is not None and 't5' in saved:
            t5.load_state_dict(saved['t5'])
        t5 = t5.to(dev) if prepare_t5 is None else prepare_t5(t5.to(dev))
        tok = Tokenizer(tok_path)
    return vjepa, t5, tok


def read_aligner_ckpt(path, what='aligner_ckpt'):
    """A train_aligner.py checkpoint (ckpt.pt), or one sentence saying it is missing or cannot be read."""
    if not os.path.exists(path):
        raise SystemExit(f'{what}: {path} does not exist (train with init_from=scratch first)')
    return read_torch(path, 'it was not written completely or is damaged: train the aligner again '
                            '(python train_aligner.py) or point at another run')


def same_t5(a, b):
    """Whether two official folders hold the same umT5 file (one copy of it is enough)."""
    files = [os.path.join(d, 'models_t5_umt5-xxl-enc-bf16.pth') if d else '' for d in (a, b)]
    return all(os.path.exists(f) for f in files) and os.path.samefile(*files)


def load_aligner(path, dev, text=True, share=None, prepare_t5=None):
    """A train_aligner.py run, frozen: (aligner, V-JEPA, umT5, tokenizer, its settings), the encoders being the ones
    it was trained with (text=False: without umT5 and tokenizer). share = (ckpt_dir, umT5, tokenizer) already
    loaded: used instead of a second copy when the run's umT5 is that folder's file."""
    ckpt = read_aligner_ckpt(path)
    shared = share is not None and same_t5(ckpt['config']['ckpt_dir'], share[0])
    vjepa, t5, tok = load_encoders(ckpt['config'], dev, os.path.join(os.path.dirname(path), 'tokenizer.json'), ckpt,
                                   text and not shared, prepare_t5)
    if text and shared:
        t5, tok = share[1], share[2]
    aligner = Aligner(**ckpt['arch'])
    load_state_dict(aligner, ckpt['aligner'], path)
    return aligner.to(dev).eval().requires_grad_(False), vjepa, t5, tok, ckpt['config']
