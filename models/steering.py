"""Training-free steering of a Wan DiT at sampling time: AlignVid, StarVid-style refocusing and block calibration.

AlignVid (arXiv 2512.01334) scales the text cross-attention logits of chosen blocks at high noise; refocusing takes
gradient steps on the latent so that the phrases' cross-attention maps fall into a layout's boxes and each verb's map
onto its noun's; calibration ranks the blocks by their text attention on the foreground of clips with masks.
They reach the DiT by replacing the forward of its cross-attention modules on the instance, only while they act
(models/wan.py stays the official model). sample.py's loop calls one hook per step:

    x = hook.before(dit, x, tt, context, y, t, sigma, keep)
    with hook.scaled(dit, t, cond=True):
        v_cond = dit(x, tt, context, y)
"""
import contextlib
import functools
import json
import math
import os
import re

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from data import load_clip, read_manifest
from models.t5 import clean_text
from models.wan import attention

# the published Wan2.1-14B foreground-sensitive blocks (LAW1223/AlignVid)
NAMED_BLOCKS = {'wan14b': [0, *range(2, 8), *range(10, 21), *range(25, 33), 37, 38]}


def parse_blocks(spec, n, what):
    """'all', a named list, or '0,2-7,10-20' -> sorted block indices < n."""
    spec = str(spec).strip()
    if spec == 'all':
        return list(range(n))
    if spec in NAMED_BLOCKS:
        out = NAMED_BLOCKS[spec]
    else:
        try:
            out = [i for part in spec.strip('()[]').split(',') if part.strip()
                   for a, _, b in [part.strip().partition('-')] for i in range(int(a), int(b or a) + 1)]
        except ValueError:
            raise SystemExit(f"{what}={spec!r}: expected all, {', '.join(NAMED_BLOCKS)} or a list such as 0,2-7,10-20")
    if not out or max(out) >= n:
        raise SystemExit(f'{what}={spec!r} names block {max(out, default=None)}, but the DiT has blocks 0-{n - 1}')
    return sorted(set(out))


def block_string(blocks):
    """[0, 2, 3, 4, 7] -> '0,2-4,7' (what parse_blocks reads)."""
    runs = []
    for i in blocks:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ','.join(f'{a}' if a == b else f'{a}-{b}' for a, b in runs)


def within(t, window):
    """Whether model timestep t is in the window lo < t <= hi."""
    return window[0] < float(t) <= window[1]


# ---------------------------------------------------------------------------------------------- cross-attention
def text_logits_map(q, k, scale, fn, chunk=4096):
    """fn of the fp32 cross-attention logits [B, c, heads, M] of each chunk of c queries, concatenated over the L
    queries: q [B, L, n, d], k [B, M, n, d]. Under autograd each chunk is recomputed in backward, so neither pass
    holds L x M x heads at once (a 720p TI2V-5B video has L = 28k tokens, M = 512 text rows, 24 heads)."""
    def part(qc, k):
        return fn(torch.einsum('blnd,bmnd->blnm', qc.float(), k.float()) * scale)
    return torch.cat([checkpoint(part, qc, k, use_reentrant=False) if torch.is_grad_enabled() else part(qc, k)
                      for qc in q.split(chunk, dim=1)], dim=1)


def probe_probs(q, k, idx, scale, chunk=4096):
    """Softmax probabilities of the keys idx (over all keys) for each query -> [B, L, n, len(idx)] in fp32."""
    return text_logits_map(q, k, scale, lambda z: z.softmax(-1)[..., idx], chunk)


def adaptive_scale(q, k, alpha):
    """Entropy-adaptive AlignVid (our formula; the poster gives none): alpha_i = 1 + (alpha - 1) H_i / log M per
    query i and head, H_i the entropy of its unscaled attention over the M text rows. A diffuse row (H = log M) gets
    the full alpha, a focused one (H = 0) none. -> [B, L, heads, 1]; no gradient (a schedule, not a loss)."""
    def entropy(z):
        logp = z.log_softmax(-1)
        return -(logp.exp() * logp).sum(-1, keepdim=True)
    with torch.no_grad():
        return 1 + (alpha - 1) * text_logits_map(q, k, 1 / math.sqrt(q.shape[-1]), entropy) / math.log(k.shape[1])


def cross_attention(m, x, context, alpha=None, adaptive=False, probe=None, store=None):
    """WanCrossAttention m's forward with its logits times alpha (adaptive: per query and head from its entropy),
    and with probe (text-row indices) store(their probabilities [B, L, heads, len(probe)])."""
    B, L, _ = x.shape
    q = m.norm_q(m.q(x)).view(B, L, m.num_heads, m.head_dim)
    k = m.norm_k(m.k(context)).view(B, -1, m.num_heads, m.head_dim)
    v = m.v(context).view(B, -1, m.num_heads, m.head_dim)
    scale = None
    if alpha is not None and adaptive:
        q = q * adaptive_scale(q, k, alpha).to(q.dtype)  # a per-row alpha is a per-row scale of q
    elif alpha is not None:
        scale = alpha / math.sqrt(m.head_dim)  # softmax(alpha q k^T / sqrt(d)): (gamma q)(eta k)^T, alpha = gamma eta
    if probe is not None:
        store(probe_probs(q, k, probe, 1 / math.sqrt(m.head_dim) if scale is None else scale))
    return m.o(attention(q, k, v, scale).flatten(2))  # all text rows attend, padding included, as officially


def cross_attentions(dit, blocks):
    """The cross-attention modules of these blocks of the DiT."""
    return [dit.blocks[i].cross_attn for i in blocks]


@contextlib.contextmanager
def replaced(modules, forward):
    """Within: the j-th module's calls run forward(j, module) (x, context) instead of its class's forward."""
    for j, m in enumerate(modules):
        m.forward = forward(j, m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward


def scaled(modules, alpha, adaptive=False):
    """Within: AlignVid's logit scale alpha on these cross-attention modules."""
    return replaced(modules, lambda j, m: functools.partial(cross_attention, m, alpha=alpha, adaptive=adaptive))


@contextlib.contextmanager
def probing(modules, idx):
    """Within: every call of the j-th module sets probs[j] to its probabilities of the text rows idx; yields probs."""
    probs = [None] * len(modules)
    with replaced(modules, lambda j, m: functools.partial(cross_attention, m, probe=idx,
                                                          store=functools.partial(probs.__setitem__, j))):
        yield probs


def probed(probs):
    """The probed probabilities of batch item 0, averaged over heads and modules -> [L, n]."""
    return torch.stack([p[0].mean(1) for p in probs]).mean(0)


class AlignVid:
    """AlignVid's attention scaling: text cross-attention logits times alpha in `blocks` at model timesteps
    window[0] < t <= window[1], on the conditional pass and (uncond) the unconditional one."""
    def __init__(self, alpha, blocks, window, uncond, adaptive):
        self.alpha, self.blocks, self.window, self.uncond, self.adaptive = alpha, blocks, window, uncond, adaptive

    def scaled(self, dit, t, cond):
        if within(t, self.window) and (cond or self.uncond):
            return scaled(cross_attentions(dit, self.blocks), self.alpha, self.adaptive)
        return contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- layouts
def phrase_tokens(tok, text, phrase, text_len, where):
    """Indices of the prompt's tokens that overlap `phrase` (first occurrence, case-insensitive)."""
    text, needle = clean_text(text), clean_text(phrase)
    start = text.lower().find(needle.lower())
    if not needle or start < 0:
        raise SystemExit(f'{where}: the phrase {phrase!r} is not in the prompt {text!r}; use words of the prompt')
    end = start + len(needle)
    idx = [i for i, (a, b) in enumerate(tok.offsets(text)[:text_len - 1]) if a < end and b > start]
    if not idx:
        raise SystemExit(f'{where}: the phrase {phrase!r} falls past the {text_len - 1} tokens the DiT reads')
    return idx


def box_at(keys, p):
    """Box [x0, y0, x1, y1] at (fractional) pixel frame p: linear between keyframes, held beyond the first and last."""
    frames = sorted(keys)
    if p <= frames[0] or p >= frames[-1]:
        return keys[frames[0] if p <= frames[0] else frames[-1]]
    b = next(f for f in frames if f >= p)
    a = max(f for f in frames if f <= p)
    u = 0 if a == b else (p - a) / (b - a)
    return [(1 - u) * x + u * y for x, y in zip(keys[a], keys[b])]


def box_tokens(keys, grid, stride):
    """Token coverage [f, h*w] of a keyframed box: latent frame j at the middle of its pixel frames (0; 4j-1.5)."""
    f, h, w = grid
    rows = []
    for j in range(f):
        x0, y0, x1, y1 = box_at(keys, 0 if j == 0 else stride * j - (stride - 1) / 2)
        # each token cell's covered fraction: the overlap in x times the overlap in y
        cx = (torch.clamp(torch.minimum(torch.arange(1, w + 1) / w, torch.tensor(x1)) -
                          torch.maximum(torch.arange(w) / w, torch.tensor(x0)), min=0) * w)
        cy = (torch.clamp(torch.minimum(torch.arange(1, h + 1) / h, torch.tensor(y1)) -
                          torch.maximum(torch.arange(h) / h, torch.tensor(y0)), min=0) * h)
        rows.append((cy[:, None] * cx[None]).flatten())
    return torch.stack(rows).float()


def read_layout(path, frames):
    """A layout file -> (prompt or None, {phrase: {frame: box}}, [(verb phrase, noun phrase)]), checked."""
    bad = lambda why: SystemExit(f'layout {path}: {why}')
    try:
        spec = json.load(open(path, encoding='utf-8'))
    except FileNotFoundError:
        raise bad('file not found') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad(f'not valid JSON ({err}); see README for the format') from None
    if not isinstance(spec, dict) or not isinstance(spec.get('entities'), list) or not spec['entities']:
        raise bad('expected an object with a non-empty "entities" list of '
                  '{"phrase": ..., "boxes": {frame: [x0, y0, x1, y1]}}')
    boxes = {}
    for i, e in enumerate(spec['entities']):
        if not isinstance(e, dict) or not isinstance(e.get('phrase'), str) or not isinstance(e.get('boxes'), dict) \
                or not e['boxes']:
            raise bad(f'entity {i} needs a "phrase" string and a non-empty "boxes" object {{frame: [x0, y0, x1, y1]}}')
        keys = {}
        for k, b in e['boxes'].items():
            if not str(k).isdigit():
                raise bad(f'entity {e["phrase"]!r}: frame {k!r} is not a frame index')
            if int(k) >= frames:
                raise bad(f'entity {e["phrase"]!r}: frame {k} is past the clip of {frames} frames (0-{frames - 1})')
            if not (isinstance(b, list) and len(b) == 4 and all(isinstance(v, (int, float)) for v in b)):
                raise bad(f'entity {e["phrase"]!r} frame {k}: a box is [x0, y0, x1, y1], got {b!r}')
            if not (0 <= b[0] < b[2] <= 1 and 0 <= b[1] < b[3] <= 1):
                raise bad(f'entity {e["phrase"]!r} frame {k}: box {b} is outside [0, 1] or empty '
                          f'(need 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1, fractions of width and height)')
            keys[int(k)] = [float(v) for v in b]
        boxes[e['phrase']] = keys
    verbs = []
    for i, v in enumerate(spec.get('verbs') or []):
        if not isinstance(v, dict) or not isinstance(v.get('phrase'), str) or v.get('noun') not in boxes:
            raise bad(f'verb {i} needs a "phrase" string and a "noun" that is one of the entity phrases {list(boxes)}')
        verbs.append((v['phrase'], v['noun']))
    if spec.get('prompt') is not None and not isinstance(spec['prompt'], str):
        raise bad('"prompt" must be a string')
    return spec.get('prompt'), boxes, verbs


def oracle_layout(manifest, index, frames, stride):
    """The layout of clip `index` of a manifest with masks: its caption, each entity's mask bounding box on every
    frame where it shows, and its motion ("moves right") bound to it."""
    if not os.path.isfile(manifest):
        raise SystemExit(f'layout=oracle reads clip {index} of layout_data={manifest}, which does not exist: '
                         f'render the toy set (python train_dit.py) or point layout_data at a manifest with masks')
    recs = [r for r in read_manifest(manifest) if r['entities']]
    if index >= len(recs):
        raise SystemExit(f'layout_clip={index}: {manifest} has {len(recs)} clips with masks')
    clip = load_clip(recs[index], frames, 64, 64, stride)  # boxes are fractions: any square size will do
    boxes, verbs = {}, []
    for name, m in zip(clip['entity_captions'], clip['masks']):
        keys = {}
        for p, mp in enumerate(m > 0.5):
            ys, xs = mp.nonzero(as_tuple=True)
            if len(xs):
                keys[p] = [xs.min().item() / 64, ys.min().item() / 64, (xs.max().item() + 1) / 64,
                           (ys.max().item() + 1) / 64]
        if keys:
            boxes[name] = keys
        motion = re.search(re.escape(name) + r' (moves \w+)', clip['caption'])
        if motion and keys:
            verbs.append((motion.group(1), name))
    return clip['caption'], boxes, verbs


def make_plan(text, boxes, verbs, tok, text_len, grid, stride, where):
    """Token indices and box coverage of each noun, token indices and noun of each verb, on the token grid."""
    nouns = [(phrase_tokens(tok, text, p, text_len, where), box_tokens(k, grid, stride)) for p, k in boxes.items()]
    names = list(boxes)
    vs = [(phrase_tokens(tok, text, p, text_len, where), names.index(n)) for p, n in verbs]
    idx = sorted({i for cols, *_ in nouns + vs for i in cols})
    col = {i: c for c, i in enumerate(idx)}  # prompt token -> column of the probed probabilities
    return dict(idx=torch.tensor(idx), grid=grid, nouns=[([col[i] for i in c], b) for c, b in nouns],
                verbs=[([col[i] for i in c], n) for c, n in vs])


# ---------------------------------------------------------------------------------------------- refocusing
def phrase_map(probs, cols, grid):
    """A phrase's map: the probabilities of its tokens summed, per frame normalised over positions -> [f, h*w]."""
    m = probs[:, cols].sum(-1).view(grid[0], -1)
    return m / m.sum(-1, keepdim=True).clamp_min(1e-12)


def kl_adjacent(p, q):
    """mean over frames f of mean over f' in {f-1, f, f+1} of KL(p_f || q_f'); p, q [f, n]."""
    qs = torch.stack([torch.cat([q[:1], q[:-1]]), q, torch.cat([q[1:], q[-1:]])])
    lp, lq = p.clamp_min(1e-12).log(), qs.clamp_min(1e-12).log()
    return (p * (lp - lq)).sum(-1).mean()


def layout_losses(probs, plan, tau):
    """probs [L, n] (heads and blocks averaged) -> (spatial, contrastive) losses.
    spatial: mean over nouns and frames of (1 - mass of the noun's map inside its box)^2;
    contrastive: per verb, -log softmax_j(-d_j / tau) at its noun, d_j = kl_adjacent(verb map, noun j's map);
    with a single noun, d / tau."""
    grid = plan['grid']
    maps = [phrase_map(probs, cols, grid) for cols, _ in plan['nouns']]
    spatial = torch.stack([(1 - (m * b.to(m.device)).sum(-1)).pow(2).mean()
                           for m, (_, b) in zip(maps, plan['nouns'])]).mean()
    terms = []
    for cols, n in plan['verbs']:
        v = phrase_map(probs, cols, grid)
        d = torch.stack([kl_adjacent(v, m) for m in maps])
        terms.append(-F.log_softmax(-d / tau, 0)[n] if len(maps) > 1 else d[0] / tau)
    contrastive = torch.stack(terms).mean() if terms else probs.new_zeros(())
    return spatial, contrastive


class Refocus:
    """StarVid-style refocusing on a plan (make_plan): before a step, `iters` normalised gradient steps of the layout
    losses on the latent, each of size step * sigma in rms; the spatial term at model timesteps in window, the
    contrastive one (weight verb_weight, temperature tau) in verb_window."""
    def __init__(self, plan, blocks, window, verb_window, iters, step, tau, verb_weight):
        self.plan, self.blocks, self.window, self.verb_window = plan, blocks, window, verb_window
        self.iters, self.step, self.tau, self.verb_weight = iters, step, tau, verb_weight

    def refocus(self, dit, x, tt, context, y, t, sigma, keep):
        """The refocused latent, through blocks 0..max(blocks) only, and the (spatial, contrastive) losses before
        each step (None outside the windows); the DiT weights get no gradient (autograd.grad w.r.t. the latent)."""
        spatial_on, verb_on = within(t, self.window), within(t, self.verb_window) and self.plan['verbs']
        if not (spatial_on or verb_on):
            return x, None
        was, dit.checkpointing = dit.checkpointing, x.is_cuda  # on a GPU recompute blocks in backward: 14B activations
        seen = []
        with probing(cross_attentions(dit, self.blocks), self.plan['idx'].to(x.device)) as probs:
            for _ in range(self.iters):
                with torch.enable_grad():
                    z = x.detach().float().requires_grad_()
                    dit(z, tt, context, y, stop_after=max(self.blocks) + 1)
                    sp, ct = layout_losses(probed(probs), self.plan, self.tau)
                    loss = (sp if spatial_on else 0) + (self.verb_weight * ct if verb_on else 0)
                    g, = torch.autograd.grad(loss, z)
                seen.append((sp.item(), ct.item()))
                g = g * keep  # a pinned first frame stays the image's
                x = x - self.step * sigma * g / g.pow(2).mean().sqrt().clamp_min(1e-12)
        dit.checkpointing = was
        return x, seen

    def before(self, dit, x, tt, context, y, t, sigma, keep):
        x, losses = self.refocus(dit, x, tt, context, y, t, sigma, keep)
        if losses:
            print(f'  t={t.item()}: layout losses over the {self.iters} latent steps: spatial '
                  f'{losses[0][0]:.4f} -> {losses[-1][0]:.4f}, contrastive {losses[0][1]:.4f} -> '
                  f'{losses[-1][1]:.4f}', flush=True)
        return x


class Steering:
    """The sampling loop's per-step hook: refocus (a Refocus) moves the latent before the step, align (an AlignVid)
    scales the text attention of its passes; either may be None (then that part changes nothing)."""
    def __init__(self, align=None, refocus=None):
        self.align, self.refocus = align, refocus

    def before(self, dit, x, tt, context, y, t, sigma, keep):
        """The latent the step at timestep t (sigma) starts from; tt, context, y: the DiT's conditional inputs."""
        return self.refocus.before(dit, x, tt, context, y, t, sigma, keep) if self.refocus else x

    def scaled(self, dit, t, cond):
        """A context for the conditional (cond) or unconditional pass at timestep t."""
        return self.align.scaled(dit, t, cond) if self.align else contextlib.nullcontext()


# ---------------------------------------------------------------------------------------------- calibration
def to_tokens(m, grid, stride):
    """Pixel-frame maps [T, H, W] in [0, 1] -> token coverage [f, h*w]: latent frame 0 is pixel frame 0, latent frame j
    the mean of pixel frames 4j-3..4j (the causal codecs' grouping), then the mean over each token's pixels."""
    f, h, w = grid
    m = torch.cat([m[:1], m[1:].reshape(f - 1, stride, *m.shape[1:]).mean(1)]) if f > 1 else m[:1]
    return F.adaptive_avg_pool2d(m[:, None].float(), (h, w)).flatten(1)


def foreground_lift(dit, x, t, context, y, n_text, fg, grid, autocast=contextlib.nullcontext()):
    """Per block, the share of the first n_text text rows' (per-frame normalised) attention inside the foreground
    fg [f, h*w], over fg's share of the frame (1 = no preference)."""
    with probing(cross_attentions(dit, range(len(dit.blocks))), torch.arange(n_text, device=x.device)) as probs:
        with autocast:
            dit(x, t, context, y)
    area = fg.mean(-1).clamp_min(1e-6)
    return [((phrase_map(p[0].mean(1), list(range(p.shape[-1])), grid) * fg).sum(-1) / area).mean().item()
            for p in probs]


def calibrate_blocks(dit, clips, n, grid, stride, keep, autocast):
    """Rank the DiT's blocks by their mean foreground lift over n clips, each (x_t, t, context, y, caption length,
    masks [T, H, W]); prints the ranking and the share `keep` of the blocks as a list; returns it and the lifts."""
    lift = torch.zeros(len(dit.blocks))
    for x, t, context, y, n_text, masks in clips:
        lifts = foreground_lift(dit, x, t, context, y, n_text, to_tokens(masks, grid, stride), grid, autocast)
        for i, v in enumerate(lifts):
            lift[i] += v / n
    order = lift.argsort(descending=True).tolist()
    kept = sorted(order[:max(1, math.ceil(keep * len(order)))])
    print('  ' + '  '.join(f'{i}:{lift[i]:.2f}' for i in order))
    print(f'--alignvid_blocks={block_string(kept)}')
    return kept, lift
