"""Text- and image-to-video sampling from a train_dit.py run or an official Wan2.2 checkpoint folder.

    python sample.py                                         # the default run out/dit -> out/dit/sample.mp4
    python sample.py --ckpt_dir=Wan2.2-TI2V-5B --model=ti2v-5b --prompt="..." [--image=first_frame.jpg]
    python sample.py --ckpt_dir=Wan2.2-T2V-A14B --model=t2v-a14b --prompt="..." --size=832*480
    torchrun --nproc_per_node=4 sample.py --ckpt_dir=Wan2.2-T2V-A14B --model=t2v-a14b --prompt="..."

Under torchrun every rank holds the models and each group of `sp` ranks (default: all) splits a video's tokens
(Ulysses sequence parallelism): the same video as one process, sooner. With --prompts=<file> the groups split the
prompt list and write <prompt>-<index>.mp4, VBench's naming:

    torchrun --nproc_per_node=8 sample.py --ckpt_dir=Wan2.2-TI2V-5B --model=ti2v-5b --prompts=vbench.txt \
        --samples=5 --sp=1 --out=vbench_videos
"""
import collections
import json
import math
import os
import re

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import ensure_shapes, load_clip, read_manifest, write_video
from models import parallel
from models.checkpoint import expert_folders, load_ckpt_dit, load_dit, load_dit_run, load_text_and_vae
from models.settings import choice, configure, run
from models.t5 import clean_text, encode
from models.unipc import Euler, UniPC
from models.wan import autocast as mixed_precision, token_grid

out_dir = 'out/dit'            # a train_dit.py run to sample from (used when ckpt_dir is '')
ckpt_dir = ''                  # an official Wan2.2/2.1 checkpoint folder (official or diffusers DiT layout)
model = choice('ti2v-5b', 't2v-a14b', 'i2v-a14b', 't2v-1.3b', 't2v-14b')  # which official model ckpt_dir holds
prompt = 'a red circle moves right over a dark grey checkered floor'  # the caption to render
prompts = ''                   # a text file, one prompt a line: writes out/<prompt>-<index>.mp4 (VBench's naming)
samples = 1                    # with prompts: videos per prompt, index i seeded with seed + i (VBench: 5)
sp = 0                         # torchrun ranks per video (0 = all); with prompts the world/sp rank groups split them
negative_prompt = ''           # '' = the official default negative prompt (runs: the empty caption)
image = ''                     # first frame for image-to-video (i2v-a14b, or ti2v-5b)
out = ''                       # mp4 path ('' = out_dir/sample.mp4 or sample.mp4); with prompts a folder ('' = samples)
solver = choice('unipc', 'euler')  # the official default is unipc
steps = 0                      # denoising steps; 0 = the model's default
shift = 0.0                    # sigma = shift*s / (1 + (shift-1)*s); 0 = the model's default (a run's: its training shift)
guidance = 0.0                 # classifier-free guidance scale for both A14B experts; 0 = the model's default
size = ''                      # 'W*H'; '' = the model's default (image-to-video: its area, the image's aspect)
frames = 0                     # pixel frames (1 + 4k); 0 = the model's default
seed = 0                       # seeds the initial noise (drawn on the sampling device, as officially)
high = ''                      # A14B: a train_dit.py run or a DiT folder replacing ckpt_dir's high-noise expert (SARA's)
low = ''                       # A14B: the same for the low-noise expert
t5_cpu = False                 # run umT5 on the CPU (the official --t5_cpu); by default it runs on the GPU, as officially
offload = True                 # keep the idle A14B expert on the CPU, so one GPU holds the active one
ema = True                     # a run that kept an EMA of its weights is sampled with it (False = the trained weights)
dtype = ''                     # DiT weights: '' = as stored (official fp32, bf16 autocast) | bfloat16 (half memory)
amp = choice('auto', 'on', 'off')  # bf16 autocast: auto = on with CUDA or native CPU bf16 matmuls
device = 'auto'                # auto = cuda when available, else cpu
# training-free alignment at sampling time (README: "Training-free alignment at sampling time"); both off by default
alignvid = 1.0                 # AlignVid: text cross-attention logits times alpha = gamma_q*gamma_k (1.0 = off; published 1.35)
alignvid_blocks = 'all'        # blocks it scales, 0-indexed: all | a list such as 0,2-7,10-20 | wan14b (the published list)
alignvid_t = (900.0, 1000.0)   # it acts at model timesteps lo < t <= hi (published: t > 900)
alignvid_uncond = True         # scale the unconditional (negative prompt) pass too (published: yes)
alignvid_adaptive = False      # per query and head alpha_i = 1 + (alpha - 1) H_i / log(text rows), H_i its entropy
calibrate = ''                 # a manifest with masks, or 'shapes' (the toy set): print the blocks ranked by their text
                               #   attention on the foreground and a list for alignvid_blocks, instead of sampling
calibrate_t = 900.0            # the model timestep calibrate noises the clips to
calibrate_clips = 16           # clips calibrate reads (those with masks, from the top of the manifest)
calibrate_keep = 0.7           # share of the blocks calibrate lists (the published Wan2.1-14B list: 28 of 40)
layout = ''                    # StarVid refocusing: a layout JSON file, or 'oracle' (a manifest clip: its caption, boxes
                               #   from its masks); '' = off
layout_data = 'data/shapes/val.jsonl'  # with layout=oracle: the manifest
layout_clip = 0                # with layout=oracle: the clip's index in it
refocus_blocks = 'all'         # blocks whose cross-attention maps are refocused (the DiT runs up to the deepest)
refocus_t = (700.0, 1000.0)    # model timesteps lo < t <= hi of the spatial term (noun maps into their boxes)
refocus_verb_t = (700.0, 1000.0)  # model timesteps of the contrastive term (verb maps onto their noun's)
refocus_iters = 3              # gradient steps on the latent per denoising step in a window
refocus_step = 0.1             # each moves the latent by step * sigma in rms (normalised gradient descent)
refocus_tau = 0.5              # temperature of the contrastive term
refocus_verb_weight = 1.0      # weight of the contrastive term against the spatial one

cfg = configure(globals(), __file__)

# official sampling defaults (reference/wan22.md sections 2 and 5); guidance is (low-noise, high-noise)
OFFICIAL = {
    't2v-a14b': dict(frames=81, fps=16, size='1280*720', steps=40, shift=12.0, guidance=(3.0, 4.0),
                     boundary=0.875),
    'i2v-a14b': dict(frames=81, fps=16, size='1280*720', steps=40, shift=5.0, guidance=(3.5, 3.5),
                     boundary=0.900),
    'ti2v-5b': dict(frames=121, fps=24, size='1280*704', steps=50, shift=5.0, guidance=(5.0, 5.0)),
    't2v-1.3b': dict(frames=81, fps=16, size='832*480', steps=50, shift=5.0, guidance=(5.0, 5.0)),
    't2v-14b': dict(frames=81, fps=16, size='1280*720', steps=50, shift=5.0, guidance=(5.0, 5.0)),
}
NEG_PROMPT = ('色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，'
              '残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，'
              '三条腿，背景人很多，倒着走')


def best_output_size(w, h, dw, dh, area):
    """Official TI2V rounding: the (W, H) multiple of (dw, dh) within `area` whose aspect is closest to w/h."""
    ratio = w / h
    ow = (area * ratio) ** 0.5
    ow1 = int(ow // dw * dw)
    oh1 = int(area / ow1 // dh * dh)
    oh2 = int(area / ow // dh * dh)  # area / ow, not sqrt(area / ratio): they differ at exact multiples
    ow2 = int(area / oh2 // dw * dw)
    err = lambda ow, oh: max(ratio * oh / ow, ow / (oh * ratio))
    return (ow1, oh1) if err(ow1, oh1) < err(ow2, oh2) else (ow2, oh2)


def i2v_condition(codec, image, n_frames):
    """I2V-A14B's extra input channels for a first frame image [1, 3, H, W]: 4 mask channels (1 on latent frame 0, the
    given frame's 4 "pixel frames") and the latents of the image followed by n_frames - 1 black frames."""
    z = codec.encode(torch.cat([image[:, :, None], image.new_zeros(1, 3, n_frames - 1, *image.shape[-2:])], dim=2))
    msk = torch.zeros_like(z[:, :4])
    msk[:, :, 0] = 1
    return torch.cat([msk, z], dim=1)


def load_image(path):
    from PIL import Image
    if not os.path.exists(path):
        raise SystemExit(f"image '{path}' not found")
    return Image.open(path).convert('RGB')


def to_tensor(img):
    """PIL image -> [3, H, W] in [-1, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)


def load_expert(folder, device):
    """A DiT folder (official or diffusers layout) or a train_dit.py run folder, in the file's dtype unless `dtype`."""
    want = getattr(torch, dtype) if dtype else None
    if os.path.isdir(os.path.join(folder, 'ckpt')):
        dit = load_ckpt_dit(os.path.join(folder, 'ckpt'), ema=ema)[0].to(device, want)
    else:
        dit = load_dit(folder, device, want)
    return dit.eval().requires_grad_(False)


def load_official(dev):
    """The DiT expert(s), umT5 and VAE of an official folder, each read straight to its device in its file dtype;
    `high` / `low` replace an A14B expert by a trained one (SARA trains the high-noise expert)."""
    folders = expert_folders(ckpt_dir)
    for name, folder in (('high', high), ('low', low)):
        if folder and name not in folders:
            raise SystemExit(f'--{name}={folder} replaces an A14B expert, but {ckpt_dir} holds a single DiT')
        if folder:
            folders[name] = folder
    store = torch.device('cpu') if offload else dev
    experts = {k: load_expert(f, store) for k, f in folders.items()}
    if len(folders) > 1:
        print('experts: ' + ', '.join(f'{k} {f}' for k, f in folders.items()))
    t5, tok, vae = load_text_and_vae(ckpt_dir, next(iter(experts.values())).out_dim, 'cpu' if t5_cpu else dev, dev)
    return experts, t5, tok, vae, OFFICIAL[model]


def load_trained(dev):
    """The DiT of a train_dit.py run (its sharded checkpoint, consolidated), its text encoder and codec."""
    dit, t5, tok, codec, meta = load_dit_run(out_dir, dev, ema, 'cpu' if t5_cpu else dev)
    run = meta['config']
    d = dict(frames=run['frames'], fps=meta['fps'], size=f"{run['width']}*{run['height']}", steps=50,
             shift=run['shift'], guidance=(4.0, 4.0), stride=run.get('frame_stride', 1))  # the shift it trained with
    return {'single': dit}, t5, tok, codec, d


# ---------------------------------------------------------------------------------------------- training-free alignment
# AlignVid (arXiv 2512.01334): the published Wan2.1-14B foreground-sensitive blocks (LAW1223/AlignVid)
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
    """[0, 2, 3, 4, 7] -> '0,2-4,7' (what alignvid_blocks reads)."""
    runs = []
    for i in blocks:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    return ','.join(f'{a}' if a == b else f'{a}-{b}' for a, b in runs)


def within(t, window):
    return window[0] < float(t) <= window[1]


def set_logit_scale(dit, alpha, blocks):
    """AlignVid's ASM on the text cross-attention of `blocks` (alpha None: every block as officially)."""
    for i, b in enumerate(dit.blocks):
        b.cross_attn.logit_scale = alpha if alpha is not None and i in blocks else None
        b.cross_attn.adaptive = alignvid_adaptive


def to_tokens(m, grid, stride):
    """Pixel-frame maps [T, H, W] in [0, 1] -> token coverage [f, h*w]: latent frame 0 is pixel frame 0, latent frame j
    the mean of pixel frames 4j-3..4j (the causal codecs' grouping), then the mean over each token's pixels."""
    f, h, w = grid
    m = torch.cat([m[:1], m[1:].reshape(f - 1, stride, *m.shape[1:]).mean(1)]) if f > 1 else m[:1]
    return F.adaptive_avg_pool2d(m[:, None].float(), (h, w)).flatten(1)


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
        raise bad('expected an object with a non-empty "entities" list of {"phrase": ..., "boxes": {frame: [x0, y0, x1, y1]}}')
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
                raise bad(f'entity {e["phrase"]!r} frame {k}: box {b} is outside [0, 1] or empty (need 0 <= x0 < x1 <= 1, '
                          f'0 <= y0 < y1 <= 1, fractions of width and height)')
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


def oracle_layout(frames, stride):
    """The toy clip layout_clip of layout_data: its caption, each entity's mask bounding box on every frame where it
    shows, and its motion ("moves right") bound to it."""
    if not os.path.isfile(layout_data):
        raise SystemExit(f'layout=oracle reads clip {layout_clip} of layout_data={layout_data}, which does not exist: '
                         f'render the toy set (python train_dit.py) or point layout_data at a manifest with masks')
    recs = [r for r in read_manifest(layout_data) if r['entities']]
    if layout_clip >= len(recs):
        raise SystemExit(f'layout_clip={layout_clip}: {layout_data} has {len(recs)} clips with masks')
    clip = load_clip(recs[layout_clip], frames, 64, 64, stride)  # boxes are fractions: any square size will do
    boxes, verbs = {}, []
    for name, m in zip(clip['entity_captions'], clip['masks']):
        keys = {}
        for p, mp in enumerate(m > 0.5):
            ys, xs = mp.nonzero(as_tuple=True)
            if len(xs):
                keys[p] = [xs.min().item() / 64, ys.min().item() / 64, (xs.max().item() + 1) / 64, (ys.max().item() + 1) / 64]
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


def phrase_map(probs, cols, grid):
    """A phrase's map: the probabilities of its tokens summed, per frame normalised over positions -> [f, h*w]."""
    m = probs[:, cols].sum(-1).view(grid[0], -1)
    return m / m.sum(-1, keepdim=True).clamp_min(1e-12)


def kl_adjacent(p, q):
    """mean over frames f of mean over f' in {f-1, f, f+1} of KL(p_f || q_f'); p, q [f, n]."""
    qs = torch.stack([torch.cat([q[:1], q[:-1]]), q, torch.cat([q[1:], q[-1:]])])
    lp, lq = p.clamp_min(1e-12).log(), qs.clamp_min(1e-12).log()
    return (p * (lp - lq)).sum(-1).mean()


def layout_losses(probs, plan):
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
        terms.append(-F.log_softmax(-d / refocus_tau, 0)[n] if len(maps) > 1 else d[0] / refocus_tau)
    contrastive = torch.stack(terms).mean() if terms else probs.new_zeros(())
    return spatial, contrastive


def probe(dit, blocks, idx):
    for i, b in enumerate(dit.blocks):
        b.cross_attn.probe = idx if i in blocks else None
        b.cross_attn.probs = None


def probed(dit, blocks):
    """The probed probabilities of batch item 0, averaged over heads and blocks -> [L, n]."""
    return torch.stack([dit.blocks[i].cross_attn.probs[0].mean(1) for i in blocks]).mean(0)


def refocus(dit, x, tt, context, y, plan, blocks, t, sigma, keep):
    """StarVid-style refocusing: refocus_iters normalised gradient steps of the layout losses on the latent x,
    through blocks 0..max(blocks) only; the DiT weights get no gradient (autograd.grad w.r.t. the latent only).
    Returns the new x and the (spatial, contrastive) losses before each step."""
    spatial_on, verb_on = within(t, refocus_t), within(t, refocus_verb_t) and plan['verbs']
    if not (spatial_on or verb_on):
        return x, None
    probe(dit, blocks, plan['idx'].to(x.device))
    was, dit.checkpointing = dit.checkpointing, x.is_cuda  # on a GPU recompute blocks in backward: 14B activations
    seen = []
    for _ in range(refocus_iters):
        with torch.enable_grad():
            z = x.detach().float().requires_grad_()
            dit(z, tt, context, y, stop_after=max(blocks) + 1)
            sp, ct = layout_losses(probed(dit, blocks), plan)
            loss = (sp if spatial_on else 0) + (refocus_verb_weight * ct if verb_on else 0)
            g, = torch.autograd.grad(loss, z)
        seen.append((sp.item(), ct.item()))
        g = g * keep  # a pinned first frame stays the image's
        x = x - refocus_step * sigma * g / g.pow(2).mean().sqrt().clamp_min(1e-12)
    probe(dit, [], None)
    dit.checkpointing = was
    return x, seen


def calibrate_blocks(experts, t5, tok, codec, d, dev, n_frames, h, w, autocast):
    """Rank the DiT's blocks by the lift of their text cross-attention on the foreground: for clips with masks noised
    to calibrate_t, the share of the caption tokens' (per-frame normalised) attention mass inside the union of the
    entity masks, divided by the masks' share of the frame (1 = no preference). Prints the ranking and a list."""
    manifest = ensure_shapes() if calibrate == 'shapes' else calibrate
    recs = [r for r in read_manifest(manifest) if r['entities']][:calibrate_clips]
    if not recs:
        raise SystemExit(f'calibrate={calibrate}: {manifest} has no clips with entity masks')
    high = 'high' in experts and calibrate_t >= d.get('boundary', 0) * 1000
    dit = experts['single' if 'single' in experts else 'high' if high else 'low'].to(dev)
    grid, n = token_grid(n_frames, h, w, codec.stride, dit.patch_size), len(dit.blocks)
    lift = torch.zeros(n)
    for k, rec in enumerate(recs):
        clip = load_clip(rec, n_frames, h, w, d.get('stride', 1))
        video = clip['video'][None].to(dev)
        x0 = codec.encode(video)
        s = calibrate_t / 1000
        xt = (1 - s) * x0 + s * torch.randn(x0.shape, generator=torch.Generator(dev).manual_seed(seed + k), device=dev)
        y = None
        if dit.model_type == 'i2v':  # I2V-A14B: the clip's first frame as the conditioning image
            y = i2v_condition(codec, video[:, :, 0], n_frames)
        ids, mask = tok([clip['caption']], dit.text_len)
        context = encode(t5, ids.to(next(t5.parameters()).device), mask.to(next(t5.parameters()).device),
                         dit.text_len).to(dev)
        probe(dit, range(n), torch.arange(int(mask.sum()) - 1, device=dev))  # the caption's tokens, </s> left out
        with autocast:
            dit(xt, torch.full((1,), calibrate_t, device=dev), context, y)
        fg = to_tokens(clip['masks'].max(0).values.to(dev), grid, codec.stride[0])  # [f, h*w]
        area = fg.mean(-1).clamp_min(1e-6)
        for i, b in enumerate(dit.blocks):
            m = phrase_map(b.cross_attn.probs[0].mean(1), list(range(b.cross_attn.probs.shape[-1])), grid)
            lift[i] += ((m * fg).sum(-1) / area).mean().item() / len(recs)
    probe(dit, [], None)
    order = lift.argsort(descending=True).tolist()
    keep = sorted(order[:max(1, math.ceil(calibrate_keep * n))])
    print(f'calibrate: {len(recs)} clips of {manifest} at t={calibrate_t:g}; foreground lift per block '
          f'(share of text attention on the masks / their area):')
    print('  ' + '  '.join(f'{i}:{lift[i]:.2f}' for i in order))
    print(f'--alignvid_blocks={block_string(keep)}')
    return keep, lift


def main():
    mesh, dev = parallel.init(sp or int(os.environ.get('WORLD_SIZE', 1)), device)
    group = parallel.sp_group(mesh)
    jobs = [(prompt, None)]
    if prompts:
        if not os.path.isfile(prompts):
            raise SystemExit(f'--prompts={prompts}: file not found (one prompt a line)')
        texts = [line.strip() for line in open(prompts, encoding='utf-8') if line.strip()]
        bad = next((t for t in texts if '/' in t or len(t.encode()) > 240), None)
        if bad:  # the prompt is the file name (VBench's convention)
            raise SystemExit(f'{prompts}: the prompt {bad[:60]!r} cannot be a file name (a "/" or over 240 bytes)')
        jobs = [(t, i) for t in texts for i in range(samples)]
    if ckpt_dir and model == 'i2v-a14b' and not image:
        raise SystemExit('i2v-a14b generates from a first frame: pass --image=<path>')
    if image and model.startswith('t2v'):
        raise SystemExit(f'--image is for image-to-video models (i2v-a14b, ti2v-5b); {model} is text-to-video: '
                         f'drop --image or pick such a model')
    experts, t5, tok, codec, d = load_official(dev) if ckpt_dir else load_trained(dev)
    if ('high' in experts) != ('boundary' in d):
        raise SystemExit(f"{ckpt_dir} holds {', '.join(experts)} DiT folder(s), which does not fit model={model}")
    any_dit = next(iter(experts.values()))
    if any_dit.num_heads % mesh['sp'].size():
        raise SystemExit(f"sp={mesh['sp'].size()} ranks per video do not divide the DiT's {any_dit.num_heads} heads: "
                         f"pick an sp (or a number of torchrun processes) that divides it")
    n_frames = frames or d['frames']
    w, h = (int(v) for v in (size or d['size']).split('*'))
    guide = (guidance, guidance) if guidance else d['guidance']
    st, sh = steps or d['steps'], shift or d['shift']
    if (n_frames - 1) % 4:
        raise SystemExit(f'frames must be 1 + 4k, got {n_frames}')
    autocast = mixed_precision(dev, amp)
    if (calibrate or layout) and group is not None:
        raise SystemExit('calibrate and layout read cross-attention maps of whole videos, which sequence parallelism '
                         'splits over ranks: run them in one process per video (--sp=1)')
    if calibrate:
        with torch.no_grad():
            return calibrate_blocks(experts, t5, tok, codec, d, dev, n_frames, h, w, autocast)
    n_blocks = len(any_dit.blocks)
    scaled = parse_blocks(alignvid_blocks, n_blocks, 'alignvid_blocks') if alignvid != 1.0 else []

    with torch.no_grad():
        # the conditioning image: I2V-A14B concatenates mask + image latents, TI2V-5B pins the first latent frame
        y, first = None, None
        if image and model == 'i2v-a14b' and ckpt_dir:
            img = to_tensor(load_image(image))
            aspect = img.shape[1] / img.shape[2]
            s, p = codec.stride[1], any_dit.patch_size[1]
            lat_h = round(math.sqrt(w * h * aspect) // s // p * p)
            lat_w = round(math.sqrt(w * h / aspect) // s // p * p)
            h, w = lat_h * s, lat_w * s
            img = torch.nn.functional.interpolate(img[None], size=(h, w), mode='bicubic')
            y = i2v_condition(codec, img.to(dev), n_frames)
        elif image and ckpt_dir:
            from PIL import Image
            img = load_image(image)
            ow, oh = best_output_size(img.width, img.height, 32, 32, w * h)
            scale = max(ow / img.width, oh / img.height)
            img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
            x1, y1 = (img.width - ow) // 2, (img.height - oh) // 2
            w, h = ow, oh
            first = codec.encode(to_tensor(img.crop((x1, y1, x1 + ow, y1 + oh)))[None, :, None].to(dev))
        elif image:
            raise SystemExit('image= needs an official image-to-video model (i2v-a14b or ti2v-5b) in ckpt_dir')
        if h % (codec.stride[1] * 2) or w % (codec.stride[2] * 2):
            raise SystemExit(f'size {w}*{h} must be a multiple of {2 * codec.stride[2]} on both sides for this model')
    plan = None
    if layout:  # the layout's prompt (oracle: the clip's caption) replaces the prompt
        if prompts:
            raise SystemExit('layout describes one prompt: use --prompt, not --prompts')
        lay_prompt, boxes, verbs = oracle_layout(n_frames, d.get('stride', 1)) if layout == 'oracle' else \
            read_layout(layout, n_frames)
        jobs = [(lay_prompt or prompt, None)]
        grid = token_grid(n_frames, h, w, codec.stride, any_dit.patch_size)  # after an image's size rounding
        plan = make_plan(jobs[0][0], boxes, verbs, tok, any_dit.text_len, grid, codec.stride[0], f'layout {layout}')
        refocused = parse_blocks(refocus_blocks, n_blocks, 'refocus_blocks')
        print(f'refocusing {len(boxes)} phrase(s), {len(verbs)} verb(s) at blocks {block_string(refocused)}: '
              f'{jobs[0][0]!r}')

    def generate(text, noise_seed):
        """One video [1, 3, T, H, W] in [-1, 1] for text, and the steps each expert took."""
        ids, mask = tok([text, negative_prompt or (NEG_PROMPT if ckpt_dir else '')], any_dit.text_len)
        t5_dev = next(t5.parameters()).device
        context = encode(t5, ids.to(t5_dev), mask.to(t5_dev), any_dit.text_len).to(dev)
        cond, uncond = context[:1], context[1:]
        shape = (any_dit.out_dim, (n_frames - 1) // codec.stride[0] + 1, h // codec.stride[1], w // codec.stride[2])
        x = torch.randn(shape, generator=torch.Generator(dev).manual_seed(noise_seed), device=dev)[None]
        keep = torch.ones_like(x)
        if first is not None:
            keep[:, :, 0] = 0  # latent frame 0 is the image's, re-imposed after every step
            x = (1 - keep) * first + keep * x
        sampler = UniPC(st, sh) if solver == 'unipc' else Euler(st, sh)
        boundary, used = d.get('boundary', 0) * 1000, collections.Counter()
        for t in sampler.timesteps:
            high = 'high' in experts and t.item() >= boundary
            name = 'single' if 'single' in experts else 'high' if high else 'low'
            if offload and dev.type == 'cuda':  # only the active expert on the GPU
                for k, m in experts.items():
                    m.to(dev if k == name else 'cpu')
            dit, used[name] = experts[name].to(dev), used[name] + 1
            tt = t.to(dev, torch.float32).view(1)
            if first is not None:  # per-token timesteps: 0 for the given frame's tokens
                tt = (keep[0, 0, :, ::2, ::2] * tt).flatten()[None]
            if plan is not None:
                with autocast:
                    x, losses = refocus(dit, x, tt, cond, y, plan, refocused, t, sampler.sigmas[sampler.index].item(), keep)
                if losses:
                    print(f'  t={t.item()}: layout losses over the {refocus_iters} latent steps: spatial '
                          f'{losses[0][0]:.4f} -> {losses[-1][0]:.4f}, contrastive {losses[0][1]:.4f} -> '
                          f'{losses[-1][1]:.4f}', flush=True)
            on = scaled and within(t, alignvid_t)
            if on:
                set_logit_scale(dit, alignvid, scaled)
            with autocast:
                v_cond = dit(x, tt, cond, y, group=group)
                if on and not alignvid_uncond:
                    set_logit_scale(dit, None, scaled)
                v_uncond = dit(x, tt, uncond, y, group=group)
            if on:
                set_logit_scale(dit, None, scaled)
            g = guide[1] if high else guide[0]
            x = sampler.step(v_uncond + g * (v_cond - v_uncond), x)
            if first is not None:
                x = (1 - keep) * first + keep * x
        return codec.decode(x.float()).clamp(-1, 1), used

    dp, at = mesh['dp'].size(), mesh['dp'].get_local_rank()
    folder = out or 'samples'
    for text, i in jobs[at::dp]:  # each group of sp ranks its share of the prompts
        if i is None:
            path = out or (os.path.join(out_dir, 'sample.mp4') if not ckpt_dir else 'sample.mp4')
        else:
            path = os.path.join(folder, f'{text}-{i}.mp4')
            if os.path.exists(path):  # a batch picks up where it stopped
                continue
        with torch.no_grad():
            video, used = generate(text, seed + (i or 0))
        if mesh['sp'].get_local_rank() == 0:
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
            write_video(path, video[0].cpu(), d['fps'])
            print(f'wrote {path}: {video.shape[2]} frames of {video.shape[4]}x{video.shape[3]} at {d["fps"]:g} fps; '
                  f'steps per expert: {dict(used)}' + (f'; sp {group.size()}' if group else '') +
                  (f'; rank {dist.get_rank()}' if dp > 1 else ''), flush=True)
    parallel.close()


if __name__ == '__main__':
    run(main)
