"""Stage 2: continue training a Wan DiT with flow matching plus routed token-relation distillation (TRD).

    python train_dit.py                          # debug DiT on the built-in toy clips, CPU, a few minutes
    python train_dit.py --batch_size=4 --max_iters=2000 --out_dir=out/run2
    python train_dit.py --init_from=resume       # continue out_dir exactly where it stopped
    python train_dit.py --route=uniform          # + VideoREPA's TRD against frozen V-JEPA tokens
    python train_aligner.py && python train_dit.py --route=or   # SARA: pairs weighted by the Stage 1 saliency
    python train_dit.py --ckpt_dir=Wan2.2-TI2V-5B --init_from=Wan2.2-TI2V-5B --data=my/train.jsonl \
        --frames=121 --height=704 --width=1280 --export_dir=out/ti2v-export
"""
import json
import math
import os
import shutil
import time

import decord
import torch
import torch.nn.functional as F

from data import ClipLoader, ensure_shapes
from models.aligner import load_aligner
from models.checkpoint import atomic_save, dit_kwargs, export_dit, load_dit, load_state_dict, load_text_and_vae
from models.settings import configure, save_config
from models.t5 import T5Encoder, Tokenizer, configs as t5_configs, encode
from models.trd import pair_budget, trd_loss
from models.vae import load_codec
from models.vjepa import VJEPA, configs as vjepa_configs, load_vjepa, preprocess
from models.wan import WanModel, configs as wan_configs

out_dir = 'out/dit'            # run folder: config.json, ckpt.pt, tokenizer.json
data = 'shapes'                # a manifest .jsonl, or 'shapes': the built-in toy set, rendered into data/shapes if absent
model = 'debug'                # DiT config, a key of models/wan.py configs
ckpt_dir = ''                  # official Wan2.2 folder for umT5, tokenizer and VAE; '' = debug umT5, toy tokenizer, pixel
device = 'auto'                # auto = cuda when available, else cpu
seed = 0                       # seeds the weights, noise, timesteps and data order
batch_size = 8                 # clips per iteration
frames = 17                    # pixel frames per clip, 1 + 4k
height = 32                    # clip height after resize and centre crop
width = 32                     # clip width after resize and centre crop
frame_stride = 2               # take every n-th frame of the source clip
max_iters = 400                # total training iterations
learning_rate = 2e-3           # peak AdamW learning rate (constant after warmup)
warmup_iters = 50              # linear learning-rate warmup
weight_decay = 0.0             # AdamW weight decay
grad_clip = 1.0                # clip the gradient norm to this (0 = off)
t_range = (0.0, 1.0)           # sigma range after the shift, e.g. (0.875, 1.0) for the high-noise A14B expert
shift = 1.0                    # sigma = shift*u / (1 + (shift-1)*u) for u uniform in the range
caption_dropout = 0.1          # share of empty captions, so that classifier-free guidance works
route = 'none'                 # TRD routing: none (SFT) | uniform (VideoREPA) | motion | or (SARA) | and | xor
aligner_ckpt = 'out/aligner/ckpt.pt'  # Stage 1 run for routes or/and/xor; its V-JEPA is used for the targets too
trd_weight = 0.5               # L = L_flow + trd_weight * L_TRD
trd_margin = 0.1               # l_ij = relu(|cos(z_i,z_j) - cos(y_i,y_j)| - margin)
align_layer = 2                # DiT tokens after this block (1-indexed) are projected and aligned
proj_dim = 2048                # hidden width of the projector MLP dim -> proj_dim -> proj_dim -> D_vjepa
trd_pool = 1                   # average-pool both sides spatially by this factor to cut the N x N pairs
trd_block = 256                # TRD row-block size: memory O(N x block), under N*N/8 floats at N = 16k
vjepa_model = 'debug'          # V-JEPA variant of models/vjepa.py configs for routes uniform/motion ('debug' = random)
vjepa_ckpt = ''                # official V-JEPA .pt file ('' only for vjepa_model=debug)
log_interval = 25              # iterations between log lines (the loss is their mean)
ckpt_interval = 200            # iterations between checkpoints (one is always written at the end)
init_from = 'scratch'          # scratch | resume (out_dir/ckpt.pt) | a run folder | an official or diffusers DiT folder
export_dir = ''                # at the end, also write the DiT here as an official folder (safetensors + config.json)
skip_bad = False               # skip unreadable clips (counted and reported) instead of stopping
num_workers = 0                # data loader worker processes

cfg = configure(globals(), __file__)


def shifted(u, s):
    return s * u / (1 + (s - 1) * u)


def vjepa_tokens(vjepa, video, grid):
    """Frozen V-JEPA tokens [B, 2T, h, w, D] for the DiT token grid (T, h, w) that remains after dropping latent
    frame 0: pixel frame 0 is dropped too (the causal VAE codes it alone) and each DiT token gets one 16-px patch;
    the 2T tubelets of 2 frames are averaged in pairs by to_dit_grid, so 4 pixel frames give one token."""
    T, h, w = grid
    return vjepa(preprocess(video[:, :, 1:], (h, w))).view(video.shape[0], 2 * T, h, w, -1)


def to_dit_grid(x, pool):
    """[B, 2T, h, w, C] on the V-JEPA grid -> [B, N, C] on the (pooled) DiT grid: tubelet pairs averaged in time."""
    return pool_tokens(x.unflatten(1, (-1, 2)).mean(2), pool)


def pool_tokens(x, pool):
    """[B, T, h, w, D] -> [B, T*(h/pool)*(w/pool), D], averaging pool x pool spatial neighbours."""
    B, T, h, w, D = x.shape
    if pool > 1:
        x = F.avg_pool2d(x.permute(0, 1, 4, 2, 3).flatten(0, 1), pool).unflatten(0, (B, T)).permute(0, 1, 3, 4, 2)
    return x.flatten(1, 3)


def main():
    dev = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device)
    if model not in wan_configs:
        raise SystemExit(f"unknown model '{model}'; choose one of {', '.join(wan_configs)}")
    if route not in ('none', 'uniform', 'motion', 'or', 'and', 'xor'):
        raise SystemExit(f"unknown route '{route}'; choose none, uniform, motion, or, and or xor")
    manifest = ensure_shapes('data/shapes') if data == 'shapes' else data
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    ckpt, arch = None, wan_configs[model]
    if init_from == 'resume':
        if not os.path.exists(ckpt_path):
            raise SystemExit(f'init_from=resume: {ckpt_path} does not exist (train with init_from=scratch first)')
        ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False)
        arch = ckpt['arch']
    elif os.path.exists(os.path.join(init_from, 'ckpt.pt')):  # another run: its weights, a fresh optimizer
        ckpt = {k: v for k, v in torch.load(os.path.join(init_from, 'ckpt.pt'), map_location='cpu',
                                            weights_only=False).items() if k in ('model', 't5', 'arch')}
        arch = ckpt['arch']
    elif init_from != 'scratch':
        if not os.path.exists(os.path.join(init_from, 'config.json')):
            raise SystemExit(f"init_from='{init_from}' is neither scratch, resume, a run folder (ckpt.pt) nor a DiT "
                             f"folder (config.json)")
        with open(os.path.join(init_from, 'config.json')) as f:
            arch = dit_kwargs(json.load(f), init_from)[0]
    save_config(cfg, out_dir)
    torch.manual_seed(seed)

    if init_from not in ('scratch', 'resume') and ckpt is None:
        dit = load_dit(init_from, dev, torch.float32)  # fp32 master weights; bf16 compute under autocast
    else:
        dit = WanModel(**arch)
        dit.init_weights()
        if ckpt is not None:
            load_state_dict(dit, ckpt['model'], ckpt_path if init_from == 'resume' else init_from)
    dit.to(dev).train()
    if ckpt_dir:  # the official frozen umT5, tokenizer and VAE
        t5, tok, codec = load_text_and_vae(ckpt_dir, dit.out_dim, dev, dev)
    else:  # a frozen random debug umT5 made from the seed, saved with the run
        t5 = T5Encoder(**t5_configs['debug']).eval().requires_grad_(False)
        t5.init_weights(seed)
        if ckpt is not None and 't5' in ckpt:
            t5.load_state_dict(ckpt['t5'])
        t5.to(dev)
        codec = load_codec('pixel')
        tok_path = os.path.join(os.path.dirname(manifest), 'tokenizer.json')
        tok = Tokenizer(tok_path)
        shutil.copyfile(tok_path, os.path.join(out_dir, 'tokenizer.json'))  # sample.py reads it from the run
    if codec.z_dim != dit.patch_embedding.in_channels:
        raise SystemExit(f'the codec gives {codec.z_dim} latent channels but the DiT takes '
                         f'{dit.patch_embedding.in_channels} (image-conditioned DiTs are not trained here)')

    projector = vjepa = aligner = None
    if route in ('or', 'and', 'xor'):  # the frozen Stage 1 aligner, with the V-JEPA and umT5 it was trained with
        if not os.path.exists(aligner_ckpt):
            raise SystemExit(f'route={route} weights token pairs by the Stage 1 saliency, but {aligner_ckpt} does not '
                             f'exist: run python train_aligner.py first (or point --aligner_ckpt at a run)')
        aligner, vjepa, a_t5, a_tok, a_cfg = load_aligner(aligner_ckpt, dev)
    elif route != 'none':  # frozen V-JEPA targets
        if vjepa_model == 'debug':
            vjepa = VJEPA(**vjepa_configs['debug']).eval().requires_grad_(False)
        elif not vjepa_ckpt:
            raise SystemExit(f'vjepa_model={vjepa_model} needs vjepa_ckpt=<its official .pt file>')
        else:
            vjepa = load_vjepa(vjepa_ckpt, vjepa_model)
        vjepa.to(dev)
    if route != 'none':  # a trainable projector, saved with the run and left out of the export
        dim = dit.blocks[0].ffn[0].in_features
        projector = torch.nn.Sequential(torch.nn.Linear(dim, proj_dim), torch.nn.SiLU(), torch.nn.Linear(proj_dim, proj_dim),
                                        torch.nn.SiLU(), torch.nn.Linear(proj_dim, vjepa.patch_embed.proj.out_channels)).to(dev)
        if ckpt is not None and 'projector' in ckpt:
            load_state_dict(projector, ckpt['projector'], ckpt_path + ' (projector)')
        if not 1 <= align_layer <= len(dit.blocks):
            raise SystemExit(f'align_layer={align_layer} is not a block of this DiT (1..{len(dit.blocks)})')

    loader = ClipLoader(manifest, batch_size, frames, height, width, stride=frame_stride, seed=seed,
                        skip_bad=skip_bad, num_workers=num_workers)
    fps = decord.VideoReader(loader.records[0]['video']).get_avg_fps() / frame_stride
    params = [*dit.parameters(), *(projector.parameters() if projector else [])]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    opt = torch.optim.AdamW([{'params': decay, 'weight_decay': weight_decay}, {'params': no_decay, 'weight_decay': 0.0}],
                            lr=learning_rate, betas=(0.9, 0.99), fused=dev.type == 'cuda')
    gen = torch.Generator(dev).manual_seed(seed)
    it = 0
    if init_from == 'resume':
        opt.load_state_dict(ckpt['optimizer'])
        loader.load_state_dict(ckpt['loader'])
        gen.set_state(ckpt['rng'])
        it = ckpt['iter']
    u_lo, u_hi = (r / (shift - (shift - 1) * r) for r in t_range)  # the shift's inverse maps t_range to u
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if dev.type == 'cuda' else torch.autocast('cpu', enabled=False)

    def save():
        atomic_save({'model': dit.state_dict(), 'optimizer': opt.state_dict(), 'loader': loader.state_dict(),
                     'rng': gen.get_state(), 'iter': it, 'config': cfg, 'arch': arch, 'fps': fps,
                     **({} if ckpt_dir else {'t5': t5.state_dict()}),
                     **({'projector': projector.state_dict()} if projector else {})}, ckpt_path)

    batches = iter(loader)
    losses, trd_losses, t0, w = [], [], time.time(), None
    while it < max_iters:
        batch = next(batches)
        with torch.no_grad():
            x0 = codec.encode(batch['video'].to(dev))
            captions = [c if keep else '' for c, keep in
                        zip(batch['caption'], torch.rand(len(batch['caption']), generator=gen, device=dev) >= caption_dropout)]
            ids, mask = tok(captions, dit.text_len)
            context = encode(t5, ids.to(dev), mask.to(dev), dit.text_len)
            u = u_lo + (u_hi - u_lo) * torch.rand(x0.shape[0], generator=gen, device=dev)
            sigma = shifted(u, shift).view(-1, 1, 1, 1, 1)
            noise = torch.randn(x0.shape, generator=gen, device=dev)
            xt = (1 - sigma) * x0 + sigma * noise
        lr = learning_rate * min(1.0, (it + 1) / warmup_iters) if warmup_iters else learning_rate
        for group in opt.param_groups:
            group['lr'] = lr
        with autocast:
            if projector is None:
                pred, l_trd = dit(xt, 1000 * sigma.flatten(), context), None
            else:
                pred, feats = dit(xt, 1000 * sigma.flatten(), context, features_at=align_layer)
                grid = (x0.shape[2] - 1, x0.shape[3] // dit.patch_size[1], x0.shape[4] // dit.patch_size[2])  # w/o frame 0
                z = projector(pool_tokens(feats.unflatten(1, (grid[0] + 1, *grid[1:]))[:, 1:], trd_pool))
                with torch.no_grad():
                    tokens = vjepa_tokens(vjepa, batch['video'].to(dev), grid)
                    y, w = to_dit_grid(tokens, trd_pool), None
                    if aligner is not None:  # saliency of the full caption on the same V-JEPA tokens
                        ids, mask = a_tok(batch['caption'], a_cfg['text_len'])
                        n = int(mask.sum(1).max())
                        text = encode(a_t5, ids[:, :n].to(dev), mask[:, :n].to(dev), n)
                        logits, _ = aligner(tokens.flatten(1, 3), (2 * grid[0], *grid[1:]), text, mask[:, :n].to(dev))
                        w = to_dit_grid(torch.sigmoid(logits.float()).view(*tokens.shape[:4], 1), trd_pool)[..., 0]
                pooled = (grid[0], grid[1] // trd_pool, grid[2] // trd_pool)
                l_trd = trd_loss(z, y, w, route=route, margin=trd_margin, block=trd_block, grid=pooled)
        l_flow = F.mse_loss(pred, noise - x0)
        loss = l_flow if l_trd is None else l_flow + trd_weight * l_trd
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        it += 1
        losses.append(l_flow.item())
        trd_losses.append(0.0 if l_trd is None else l_trd.item())
        if it % log_interval == 0 or it == max_iters:
            dt = (time.time() - t0) / len(losses)
            tokens = x0.shape[0] * math.prod(x0.shape[2:]) // math.prod(dit.patch_size)
            trd = '' if l_trd is None else f', trd {sum(trd_losses) / len(trd_losses):.4f}'
            if w is not None:  # the last batch's saliency and how the route spends its pair budget (the paper's figure)
                b = pair_budget(w)
                trd += (f", saliency {w.mean():.3f}, pairs fg-fg/fg-bg/bg-bg {b['fg_fg']:.0%}/{b['fg_bg']:.0%}/"
                        f"{b['bg_bg']:.0%}, {route} weight {b[route + '/fg_fg']:.0%}/{b[route + '/fg_bg']:.0%}/"
                        f"{b[route + '/bg_bg']:.0%}")
            print(f'iter {it}: loss {sum(losses) / len(losses):.4f}{trd}, {1000 * dt:.1f} ms/iter, '
                  f'{tokens / dt:,.0f} tokens/s, lr {lr:.2e}', flush=True)
            losses, trd_losses, t0 = [], [], time.time()
        if it % ckpt_interval == 0 or it == max_iters:
            save()
    if export_dir:
        export_dit(dit, export_dir)
    print(f'done: {ckpt_path}' + (f', exported to {export_dir}' if export_dir else ''))


if __name__ == '__main__':
    main()
