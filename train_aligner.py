"""Stage 1: train the semantic aligner (text-conditioned per-token saliency on a frozen V-JEPA grid), and draw it.

    python train_aligner.py                          # debug V-JEPA + debug umT5 on the built-in toy clips, CPU
    python train_aligner.py --init_from=resume       # continue out_dir exactly where it stopped
    torchrun --nproc_per_node=8 train_aligner.py --vjepa_model=vjepa2.1-vitl --vjepa_ckpt=vjepa2_1_vitl.pt \
        --ckpt_dir=Wan2.2-TI2V-5B --data=my/train.jsonl --frames=32 --height=384 --width=384 --batch_size=16
    python train_aligner.py --task=saliency --video=clip.mp4 --caption="a red circle" [--out=file.png]

Every clip with K entities is asked K + 2 queries (models/aligner.py build_queries): each entity caption against
its mask, the entity captions joined with ' and ' against the union of the masks, the background caption against
the complement; BCE on the soft token-grid targets (the fraction of each token's pixels covered). One more query per
clip, its full caption (what Stage 2 asks), gives the global embedding for InfoNCE over the batch against the caption
embedding: the manifest's `text_embedding` when every clip has one, else the clip's pooled frozen T5 caption
features through the aligner's small trainable text projection (identity at init, so the random debug T5 space can
be adapted too). With caption_bce (default) that query is also supervised with the union mask: the paper's K+2 never
asks the full caption, yet Stage 2 does.
Under torchrun: DDP, rank-sharded clips, BCE normalised over the global batch, InfoNCE over the gathered batch, so
the losses equal one process's with the global batch; rank 0 alone evaluates and writes.
Evaluation on val.jsonl beside the manifest: saliency IoU and AUROC per query kind (entity, union, background,
caption) against a baseline that predicts each token's mean target over the training set.
"""
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw
from PIL.PngImagePlugin import PngInfo

from data import ClipLoader, ensure_shapes, load_clip, read_manifest, resize_crop, toy_tokenizer
from models.aligner import (Aligner, auroc, build_queries, info_nce, iou, load_encoders, mask_targets,
                            read_aligner_ckpt, tokenize)
from models import parallel
from models.checkpoint import atomic_save, load_state_dict
from models.optim import adamw, lr_at
from models.settings import choice, configure, run, save_config
from models.t5 import encode
from models.vjepa import preprocess
from models.wan import autocast as mixed_precision

out_dir = 'out/aligner'        # run folder: config.json, ckpt.pt, metrics.json, tokenizer.json, saliency/
data = 'shapes'                # a manifest .jsonl (val.jsonl beside it is the eval split), or 'shapes': the toy set
vjepa_model = 'debug'          # V-JEPA variant, a key of models/vjepa.py configs
vjepa_ckpt = ''                # official V-JEPA .pt file; '' = a frozen random-init encoder made from the seed
ckpt_dir = ''                  # official Wan2.2 folder with umT5 and tokenizer ('' = debug umT5, manifest's tokenizer)
amp = choice('auto', 'on', 'off')  # bf16 autocast of the frozen encoders: auto = on with CUDA or native CPU bf16
device = 'auto'                # auto = cuda when available, else cpu
seed = 0                       # seeds the aligner, the debug encoders and the data order
batch_size = 8                 # clips per iteration (per rank under torchrun)
frames = 16                    # V-JEPA input frames per clip (even: tubelets of 2)
height = 64                    # V-JEPA input height after resize and centre crop (a multiple of 16)
width = 64                     # V-JEPA input width (a multiple of 16)
frame_stride = 2               # take every n-th frame of the source clip
text_len = 512                 # caption tokens; longer captions are truncated, with a warning naming the clip
dim = 128                      # aligner width (256 and up for real features)
heads = 4                      # aligner attention heads
depth = 2                      # aligner fusion blocks
max_iters = 600                # total training iterations
learning_rate = 1e-3           # peak AdamW learning rate
warmup_iters = 20              # linear learning-rate warmup
lr_decay_iters = 600           # then a cosine decay to lr_floor x learning_rate at this iteration (0 = constant)
lr_floor = 0.1                 # the decay's end as a fraction of learning_rate
weight_decay = 0.01            # AdamW weight decay on matrices
grad_clip = 1.0                # clip the gradient norm to this (0 = off)
temperature = 0.07             # InfoNCE temperature
bce_weight = 1.0               # weight of the saliency BCE
nce_weight = 0.1               # weight of the InfoNCE regulariser
caption_bce = True             # also supervise the full-caption query with the union mask (False = the paper's K+2)
log_interval = 50              # iterations between log lines (the losses are their means)
eval_interval = 200            # iterations between evaluations on val.jsonl (one is always run at the end)
ckpt_interval = 200            # iterations between checkpoints (one is always written at the end)
pictures = 2                   # validation clips drawn at each evaluation (out_dir/saliency/iter_XXXX_clipN.png)
picture_frames = 4             # frames per picture row (one row per query)
picture_zoom = 2               # picture cells are the model input enlarged this many times
init_from = choice('scratch', 'resume')  # resume = continue out_dir/ckpt.pt
skip_bad = False               # skip unreadable clips (counted and reported) instead of stopping
num_workers = 0                # data loader worker processes
clip_ram = 2.0                 # GiB of decoded clips kept in memory per loader process, not decoded again (0 = off)
task = choice('train', 'saliency')  # saliency = draw out_dir/ckpt.pt's saliency for --video and --caption
video = ''                     # task=saliency: the video file
caption = ''                   # task=saliency: the caption to ask
out = ''                       # task=saliency: the PNG to write ('' = out_dir/saliency/<video name>.png)

cfg = configure(globals(), __file__)

GAP = 2  # white pixels between picture cells
LABEL = 14  # height of the text strip above each picture row


class Frozen:
    """The frozen encoders behind one call each: V-JEPA tokens of a batch of clips, umT5 features of texts."""

    def __init__(self, vjepa, t5, tok, grid, dev):
        self.vjepa, self.t5, self.tok, self.grid, self.dev, self.warned = vjepa, t5, tok, grid, dev, set()
        self.autocast = mixed_precision(dev, amp)

    @torch.no_grad()
    def video(self, video):
        with self.autocast:
            return self.vjepa(preprocess(video.to(self.dev), self.grid[1:])).float()

    @torch.no_grad()
    def text(self, texts, names, text_len):
        """Features [Q, L, Dt] and mask [Q, L] of texts (each distinct text encoded once), L = the longest."""
        first = {}
        for t, n in zip(texts, names):
            first.setdefault(t, n)
        ids, mask = tokenize(self.tok, list(first), text_len, list(first.values()), self.warned)
        n = int(mask.sum(1).max())
        feats = encode(self.t5, ids[:, :n].to(self.dev), mask[:, :n].to(self.dev), n).float()
        idx = torch.tensor([list(first).index(t) for t in texts], device=self.dev)
        return feats[idx], mask[:, :n].to(self.dev)[idx]


class Gather(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order. Every rank computes the same loss from them, so the gradient of a
    rank's own rows is the sum over ranks (DDP then averages the parameter gradients: the global-batch gradient)."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


def eval_queries(clip, grid):
    """The training queries of a clip plus, for any clip with entities, 'union' (for K = 1 the entity caption, put
    after it as build_queries orders K > 1) and 'caption' (its full caption, as Stage 2 asks), both against the union
    mask. -> kinds, texts, pixel targets [Q, T, H, W], token targets [Q, N]."""
    ents, masks = clip['entity_captions'], clip['masks']
    kinds, texts, targets = build_queries(ents, masks, clip['background'], clip['caption'])
    if ents:
        union = 1 - torch.prod(1 - masks, dim=0, keepdim=True)
        if len(ents) == 1:
            kinds, texts, targets = kinds[:1] + ['union'] + kinds[1:], texts[:1] + ents + texts[1:], \
                torch.cat([targets[:1], union, targets[1:]])
        kinds, texts, targets = kinds + ['caption'], texts + [clip['caption']], torch.cat([targets, union])
    return kinds, texts, targets, mask_targets(targets, grid)


def baseline(records, grid):
    """Per query kind, each token's mean target over the training clips (first window of each): a position prior."""
    sums, counts = {}, {}
    for rec in records:
        kinds, _, _, targets = eval_queries(load_clip(rec, frames, height, width, frame_stride), grid)
        for k, t in zip(kinds, targets):
            sums[k], counts[k] = sums.get(k, 0) + t, counts.get(k, 0) + 1
    return {k: sums[k] / counts[k] for k in sums}


def heat(x):
    """[...] in [0, 1] -> [..., 3] uint8, a jet-like colour map (blue low, red high)."""
    x = x.clamp(0, 1).unsqueeze(-1)
    rgb = (1.5 - (4 * x - torch.tensor([3.0, 2.0, 1.0])).abs()).clamp(0, 1)
    return (rgb * 255).round().to(torch.uint8)


def fit(draw, text, width):
    """text, cut to `width` pixels with '...' (the PNG's 'labels' chunk keeps it whole)."""
    if draw.textlength(text) <= width:
        return text
    while text and draw.textlength(text + '...') > width:
        text = text[:-1]
    return text + '...'


def video_frames(video, th, tw):
    """video [3, T, H, W] in [-1, 1] -> [T, th, tw, 3] pixel values in [0, 255], resized and cropped as the model's."""
    return ((resize_crop(video.float().cpu(), th, tw) + 1) * 127.5).round().clamp(0, 255).permute(1, 2, 3, 0)


def upsample(saliency, grid, th, tw):
    """Saliency [N] on the token grid -> [T', th, tw] in [0, 1], bilinear."""
    return F.interpolate(saliency.float().cpu().view(grid[0], 1, grid[1], grid[2]), size=(th, tw), mode='bilinear',
                         align_corners=False)[:, 0].clamp(0, 1)


def overlay(frame, s, mask):
    """The frame with the query's mask (red) over it; without a mask, the heatmap of s over it, opaque where salient."""
    if mask is None:
        a = 0.7 * s.unsqueeze(-1)
        return frame * (1 - a) + heat(s).float() * a
    m = resize_crop(mask.float().cpu(), *frame.shape[:2]).clamp(0, 1).unsqueeze(-1)
    return frame * (1 - 0.6 * m) + torch.tensor([255.0, 0.0, 0.0]) * 0.6 * m


def cell(img, cw, ch):
    """[h, w, 3] pixel values -> a cw x ch picture cell, enlarged without smoothing."""
    return Image.fromarray(img.round().clamp(0, 255).to(torch.uint8).numpy()).resize((cw, ch), Image.NEAREST)


def save_png(canvas, labels, path):
    """Write canvas atomically, the labels, uncut, in its PNG text chunk 'labels' (JSON)."""
    info = PngInfo()
    info.add_text('labels', json.dumps(labels))
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    canvas.save(path + '.tmp', format='PNG', pnginfo=info)
    os.replace(path + '.tmp', path)


def picture(video, rows, grid, path):
    """PNG grid: one row per query, its label in a text strip above picture_frames pairs of cells: the overlay and the
    saliency heatmap. video [3, T, H, W] in [-1, 1]; rows: (label, saliency [N] probabilities, mask [T, H, W] or
    None). -> (width, height)"""
    T, th, tw = video.shape[1], 16 * grid[1], 16 * grid[2]
    frames_ = video_frames(video, th, tw)
    picks = np.linspace(0, T - 1, min(picture_frames, T)).round().astype(int)
    cw, ch = picture_zoom * tw, picture_zoom * th
    canvas = Image.new('RGB', (2 * len(picks) * (cw + GAP) - GAP, len(rows) * (LABEL + ch + GAP) - GAP), 'white')
    draw = ImageDraw.Draw(canvas)  # Pillow's default font
    for r, (label, saliency, mask) in enumerate(rows):
        y = r * (LABEL + ch + GAP)
        draw.text((2, y + 1), fit(draw, label, canvas.width - 4), fill='black')
        sal = upsample(saliency, grid, th, tw)
        for i, f in enumerate(picks):
            s = sal[f * grid[0] // T]
            for j, img in enumerate((overlay(frames_[f], s, None if mask is None else mask[f]), heat(s).float())):
                canvas.paste(cell(img, cw, ch), ((2 * i + j) * (cw + GAP), y + LABEL))
    save_png(canvas, [r[0] for r in rows], path)
    return canvas.size


@torch.no_grad()
def evaluate(aligner, frozen, records, base, grid, it):
    """IoU (sigmoid > 0.5 vs target > 0.5) and AUROC (target > 0.5) over every token of every validation query, per
    kind, next to the baseline's; pictures of every query of the first `pictures` clips, each labelled with its
    kind, IoU and text."""
    aligner.eval()
    got = {}
    for n, rec in enumerate(records):
        clip = load_clip(rec, frames, height, width, frame_stride)
        kinds, texts, pixels, targets = eval_queries(clip, grid)
        text, mask = frozen.text(texts, [clip['where']] * len(texts), text_len)
        tokens = frozen.video(clip['video'][None])
        with frozen.autocast:
            logits, _ = aligner(tokens.expand(len(texts), -1, -1), grid, text, mask)
        probs = torch.sigmoid(logits.float()).cpu()
        for k, p, t in zip(kinds, probs, targets):
            got.setdefault(k, []).append((p, t, base.get(k, torch.full_like(t, 0.5))))
        if n < pictures:
            rows = [(f'{k} (IoU {iou(p, t):.2f}): {x}', p, m)
                    for k, x, p, t, m in zip(kinds, texts, probs, targets, pixels)]
            picture(clip['video'], rows, grid, os.path.join(out_dir, 'saliency', f'iter_{it:04d}_clip{n}.png'))
    aligner.train()
    out = {}
    for k, rows in got.items():
        p, t, b = (torch.stack(x) for x in zip(*rows))
        out[k] = dict(iou=iou(p, t), auroc=auroc(p, t > 0.5), baseline_iou=iou(b, t),
                      baseline_auroc=auroc(b, t > 0.5), queries=len(rows))
        out[k] = {name: None if v != v else v for name, v in out[k].items()}  # AUROC of one class: null
    return out


def saliency_task():
    """Draw the saliency of out_dir/ckpt.pt for --video and --caption (frames, size and encoders as in training)."""
    if not video or not caption:
        raise SystemExit('task=saliency needs --video=path.mp4 and --caption="..."')
    if not os.path.isfile(video):
        raise SystemExit(f'--video={video}: file not found')
    ckpt = read_aligner_ckpt(os.path.join(out_dir, 'ckpt.pt'), 'task=saliency')
    c, dev = ckpt['config'], parallel.pick_device(device)
    vjepa, t5, tok = load_encoders(c, dev, os.path.join(out_dir, 'tokenizer.json'), ckpt)
    grid = tuple(ckpt['grid'])
    aligner = Aligner(**ckpt['arch'])
    load_state_dict(aligner, ckpt['aligner'], os.path.join(out_dir, 'ckpt.pt'))
    aligner.to(dev).eval()
    rec = dict(video=video, caption=caption, entities=[], background='', manifest=f'--video={video}', line=1)
    try:
        clip = load_clip(rec, c['frames'], c['height'], c['width'], c['frame_stride'])
    except ValueError as err:
        raise SystemExit(str(err))
    frozen = Frozen(vjepa, t5, tok, grid, dev)
    text, mask = frozen.text([caption], ['--caption'], c['text_len'])
    with torch.no_grad():
        logits, _ = aligner(frozen.video(clip['video'][None]), grid, text, mask)
    path = out or os.path.join(out_dir, 'saliency', os.path.splitext(os.path.basename(video))[0] + '.png')
    size = picture(clip['video'], [(caption, torch.sigmoid(logits[0].float()), None)], grid, path)
    print(f'wrote {path} ({size[0]}x{size[1]}), mean saliency {torch.sigmoid(logits.float()).mean():.3f}')


def open_loader(manifest, rank, world):
    """This rank's share of the training clips."""
    try:
        return ClipLoader(manifest, batch_size, frames, height, width, stride=frame_stride, rank=rank, world_size=world,
                          seed=seed, skip_bad=skip_bad, num_workers=num_workers, ram=int(clip_ram * 2**30))
    except ValueError as err:
        raise SystemExit(str(err))


def load_frozen(manifest, records, ckpt, dev, master):
    """The frozen encoders and their token grid; without ckpt_dir a toy tokenizer is written into the run first."""
    if master and not ckpt_dir:
        toy_tokenizer(manifest, records, out_dir)
    dist.barrier()
    tok_path = os.path.join(out_dir, 'tokenizer.json')  # task=saliency and Stage 2 read it from the run
    vjepa, t5, tok = load_encoders(cfg, dev, tok_path, ckpt)
    try:
        grid = vjepa.token_grid(frames, height, width)
    except ValueError as err:
        raise SystemExit(f'--frames={frames} --height={height} --width={width}: {err}')
    return Frozen(vjepa, t5, tok, grid, dev)


def text_embedding_dim(records):
    """Width of the manifest's caption embeddings, or None where no clip has one (InfoNCE then uses pooled umT5)."""
    has = ['text_embedding' in r for r in records]
    if any(has) and not all(has):
        r = records[has.index(False)]
        raise SystemExit(f"{r['manifest']} line {r['line']} has no text_embedding but other clips do; give every clip "
                         f"one, or none (then InfoNCE uses pooled umT5 caption features)")
    return int(np.load(records[0]['text_embedding'], mmap_mode='r').size) if all(has) else None


def build_aligner(frozen, embed_dim, ckpt, dev):
    """The aligner, from the seed or the checkpoint's weights, in train mode; and its arch."""
    arch = dict(video_dim=frozen.vjepa.patch_embed.proj.out_channels, text_dim=frozen.t5.norm.weight.shape[0], dim=dim,
                heads=heads, depth=depth, embed_dim=embed_dim)
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if ckpt is not None and ckpt['arch'] != arch:
        raise SystemExit(f'init_from=resume: {ckpt_path} holds an aligner {ckpt["arch"]}, the settings give {arch}; '
                         f'resume with the settings of that run (see {out_dir}/config.json)')
    torch.manual_seed(seed)
    aligner = Aligner(**arch)
    if ckpt is not None:
        load_state_dict(aligner, ckpt['aligner'], ckpt_path)
    return aligner.to(dev).train(), arch


def resume(ckpt, opt, loader):
    """Optimizer, data order and RNG as the checkpoint left them -> the iteration to continue from (0: scratch)."""
    if ckpt is None:
        return 0
    opt.load_state_dict(ckpt['optimizer'])
    loader.load_state_dict(ckpt['loader'])
    torch.set_rng_state(ckpt['rng'])
    return ckpt['iter']


def load_val(manifest, records, grid):
    """val.jsonl beside the manifest and the baseline's position prior, or (None, None) with a note without it."""
    val_path = os.path.join(os.path.dirname(manifest), 'val.jsonl')
    if not os.path.exists(val_path):
        print(f'note: no {val_path}: no evaluation')
        return None, None
    try:
        val = read_manifest(val_path, skip_bad)
    except ValueError as err:
        raise SystemExit(str(err))
    return val, baseline(records, grid)


def read_history(it):
    """The resumed run's evaluations up to iteration it."""
    path = os.path.join(out_dir, 'metrics.json')
    return [h for h in json.load(open(path))['history'] if h['iter'] <= it] if os.path.exists(path) else []


def all_sum(x, world):
    """x summed over the ranks, in place."""
    if world > 1:
        dist.all_reduce(x)
    return x


def batch_queries(batch, grid, noted):
    """The queries of a batch: the clip each asks, its text and clip name, and the BCE targets [Q (+ B), N]: the K+2
    queries' rows, then with caption_bce the full captions' (the union mask). Clips without entities are noted once."""
    clip_of, texts, names, targets, caption_targets = [], [], [], [], []
    for b in range(len(batch['caption'])):
        where = batch['where'][b]
        if not batch['entity_captions'][b] and where not in noted:
            noted.add(where)
            print(f"note: {where} has no entities: it is asked one query, its background (else its caption), with "
                  f"every token salient (add entities with masks to supervise saliency)")
        _, t, m = build_queries(batch['entity_captions'][b], batch['masks'][b], batch['background'][b],
                                batch['caption'][b])
        clip_of += [b] * len(t)
        texts += t
        names += [where] * len(t)
        targets.append(mask_targets(m, grid))
        if caption_bce:
            masks = batch['masks'][b]
            union = 1 - torch.prod(1 - masks, dim=0, keepdim=True) if len(masks) else m[:1]
            caption_targets.append(mask_targets(union, grid))
    return clip_of, texts, names, torch.cat(targets + caption_targets)


def caption_embeddings(aligner, batch, text, mask, embed_dim):
    """InfoNCE's caption side [B, E]: the manifest's text embeddings, else the aligner's projection of the captions'
    pooled umT5 features (text, mask)."""
    if embed_dim is None:
        return aligner.embed_text(text, mask).float()
    bad = [w for w, e in zip(batch['where'], batch['text_embedding']) if e.numel() != embed_dim]
    if bad:
        raise SystemExit(f'{bad[0]}: its text_embedding has another width than the first clip\'s {embed_dim}')
    return F.normalize(torch.stack(batch['text_embedding']).to(text.device), dim=-1)


def gather_batch(g, c, captions, world):
    """Every rank's embeddings and captions, in rank order: InfoNCE over the global batch."""
    g, c = Gather.apply(g), Gather.apply(c)
    gathered = [None] * world
    dist.all_gather_object(gathered, captions)
    return g, c, [x for part in gathered for x in part]


def train_step(model, aligner, opt, frozen, batch, lr, world, embed_dim, noted):
    """One optimizer step on a batch -> (BCE mean, InfoNCE, queries), BCE and queries over the global batch."""
    dev, grid, B = frozen.dev, frozen.grid, len(batch['caption'])
    with torch.no_grad():
        tokens = frozen.video(batch['video'])
        clip_of, texts, names, targets = batch_queries(batch, grid, noted)
        Q, targets = len(texts), targets.to(dev)  # targets: the rows of the queries that BCE sees
        text, mask = frozen.text(texts + batch['caption'], names + batch['where'], text_len)
        count = all_sum(torch.tensor([float(targets.numel())], device=dev), world)
    for group in opt.param_groups:
        group['lr'] = lr
    with frozen.autocast:
        logits, emb = model(tokens[clip_of + list(range(B))], grid, text, mask)
    bce_sum = F.binary_cross_entropy_with_logits(logits[:len(targets)].float(), targets, reduction='sum')
    bce = bce_sum / count[0] * world  # DDP averages gradients: this makes them those of the global mean
    g, c = emb[Q:].float(), caption_embeddings(aligner, batch, text[Q:], mask[Q:], embed_dim)
    captions = batch['caption']
    if world > 1:
        g, c, captions = gather_batch(g, c, captions, world)
    nce = info_nce(g, c, captions, temperature)
    loss = bce_weight * bce + nce_weight * nce
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(aligner.parameters(), grad_clip)
    opt.step()
    summed = all_sum(torch.stack([bce_sum.detach() / count[0], torch.tensor(float(Q + B), device=dev)]), world)
    return summed[0].item(), nce.item(), summed[1].item()


def evaluate_and_log(aligner, frozen, val, base, it, history):
    """Evaluate, add the result to out_dir/metrics.json's history and print the scores beside the baseline's."""
    m = dict(iter=it, **evaluate(aligner, frozen, val, base, frozen.grid, it))
    history.append(m)
    path = os.path.join(out_dir, 'metrics.json')
    with open(path + '.tmp', 'w') as f:
        json.dump(dict(m, history=history), f, indent=2)
    os.replace(path + '.tmp', path)
    u = m.get('union')
    if u:
        print(f"eval {it}: union IoU {u['iou']:.3f} (baseline {u['baseline_iou']:.3f}), AUROC {u['auroc']:.3f} "
              f"(baseline {u['baseline_auroc']:.3f}); " +
              ', '.join(f"{k} IoU {v['iou']:.3f} AUROC {v['auroc']:.3f}" for k, v in m.items()
                        if k not in ('iter', 'union') and v['auroc'] is not None), flush=True)


def save_ckpt(aligner, opt, loader, it, arch, frozen):
    """Everything resume needs, with the random debug encoders' weights so that the run is self-contained."""
    atomic_save({'aligner': aligner.state_dict(), 'optimizer': opt.state_dict(), 'loader': loader.state_dict(),
                 'rng': torch.get_rng_state(), 'iter': it, 'config': cfg, 'arch': arch, 'grid': frozen.grid,
                 **({} if vjepa_ckpt else {'vjepa': frozen.vjepa.state_dict()}),
                 **({} if ckpt_dir else {'t5': frozen.t5.state_dict()})}, os.path.join(out_dir, 'ckpt.pt'))


def main():
    _, dev = parallel.init(1, device)  # data parallel over every torchrun process (one rank for plain python)
    rank, world = dist.get_rank(), dist.get_world_size()
    master = rank == 0
    manifest = ensure_shapes('data/shapes') if data == 'shapes' else data
    ckpt = read_aligner_ckpt(os.path.join(out_dir, 'ckpt.pt'), 'init_from=resume') if init_from == 'resume' else None
    loader = open_loader(manifest, rank, world)
    frozen = load_frozen(manifest, loader.records, ckpt, dev, master)
    embed_dim = text_embedding_dim(loader.records)
    aligner, arch = build_aligner(frozen, embed_dim, ckpt, dev)
    model = torch.nn.parallel.DistributedDataParallel(aligner, device_ids=[dev] if dev.type == 'cuda' else None) \
        if world > 1 else aligner  # DDP only where there are other ranks
    opt = adamw(aligner.parameters(), learning_rate, weight_decay)
    it = resume(ckpt, opt, loader)
    val, base, history = None, None, []
    if master:
        save_config(cfg, out_dir)
        val, base = load_val(manifest, loader.records, frozen.grid)
        history = read_history(it) if ckpt is not None else []

    noted, batches = set(), iter(loader)
    sums, n_logged, t0 = np.zeros(3), 0, time.time()
    while it < max_iters:
        lr = lr_at(it, learning_rate, warmup_iters, lr_decay_iters, lr_floor)
        sums += train_step(model, aligner, opt, frozen, next(batches), lr, world, embed_dim, noted)
        it, n_logged = it + 1, n_logged + 1
        if it % log_interval == 0 or it == max_iters:  # the log line's losses are the means since the last one
            if master:
                print(f'iter {it}: bce {sums[0] / n_logged:.4f}, nce {sums[1] / n_logged:.4f}, '
                      f'{1000 * (time.time() - t0) / n_logged:.1f} ms/iter, {sums[2] / n_logged:.0f} queries/iter, '
                      f'lr {lr:.2e}', flush=True)
            sums, n_logged, t0 = np.zeros(3), 0, time.time()
        t_pause = time.time()
        if master and val is not None and (it % eval_interval == 0 or it == max_iters):
            evaluate_and_log(aligner, frozen, val, base, it, history)
        if master and (it % ckpt_interval == 0 or it == max_iters):
            save_ckpt(aligner, opt, loader, it, arch, frozen)
        t0 += time.time() - t_pause  # ms/iter counts training only
    parallel.close()
    if master:
        print(f'done: {os.path.join(out_dir, "ckpt.pt")}')


if __name__ == '__main__':
    run(saliency_task if task == 'saliency' else main)
