"""Stage 2: continue training a Wan DiT with flow matching plus routed token-relation distillation (TRD).

    python train_dit.py                          # debug DiT on the built-in toy clips, CPU, a few minutes
    python train_dit.py --batch_size=4 --max_iters=2000 --out_dir=out/run2
    python train_dit.py --init_from=resume       # continue out_dir exactly where it stopped (any world size)
    python train_dit.py --route=uniform          # + VideoREPA's TRD against frozen V-JEPA tokens
    python train_aligner.py && python train_dit.py --route=or   # SARA: pairs weighted by the Stage 1 saliency
    python train_dit.py --route=or --cache=build && python train_dit.py --route=or --cache=use
                                                 # the frozen models' outputs computed once per clip, then read
    torchrun --nproc_per_node=8 train_dit.py --ckpt_dir=Wan2.2-TI2V-5B --init_from=Wan2.2-TI2V-5B \
        --data=my/train.jsonl --frames=121 --height=704 --width=1280 --batch_size=1 --sp=2 --export_dir=out/ti2v \
        --learning_rate=1e-5 --lr_decay_iters=0     # the defaults are the toy's; official weights want a small rate

Under torchrun the ranks form a ("dp", "sp") mesh: FSDP2 shards the DiT, projector and umT5 over all ranks; the sp
ranks of a dp group share clips, noise and timesteps and split the tokens (Ulysses). Plain python is the same code
in a 1-rank group. Checkpoints (out_dir/ckpt) are sharded (torch.distributed.checkpoint) and resume at any world
size with the same global batch = batch_size x dp x grad_accum.
"""
import functools
import json
import math
import os
import resource
import shutil
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)

from data import ClipLoader, ensure_shapes, normalise, toy_tokenizer, video_fps
from models import parallel
from models.aligner import load_aligner
from models.cache import SALIENT, default_folder, entry_path, open_cache, pad_text, provenance, read_entry
from models.checkpoint import (atomic_save, check_shared, dit_kwargs, export_dit, link_latest, load_dit, load_text_and_vae,
                               read_sharded, run_checkpoints, run_meta, save_sharded)
from models.optim import adamw, dit_flops, lr_at, peak_flops
from models.settings import choice, configure, require, run, save_config
from models.t5 import T5Encoder, Tokenizer, configs as t5_configs, encode
from models.trd import pair_budget, trd_loss
from models.unipc import shifted, unshifted
from models.vae import load_codec
from models.vjepa import VJEPA, configs as vjepa_configs, load_vjepa, preprocess
from models.wan import WanModel, autocast as mixed_precision, configs as wan_configs

out_dir = 'out/dit'            # run folder: config.json, ckpt-<iter>/ (sharded checkpoints), tokenizer.json
data = 'shapes'                # a manifest .jsonl, or 'shapes': the built-in toy set, rendered into data/shapes if absent
model = choice('debug', *wan_configs)  # DiT config, a key of models/wan.py configs
ckpt_dir = ''                  # official Wan2.2 folder for umT5, tokenizer and VAE; '' = debug umT5, toy tokenizer, pixel
device = 'auto'                # auto = cuda when available (one GPU per torchrun process), else cpu
seed = 0                       # seeds the weights, and with each clip's slot its noise, timestep and caption dropout
batch_size = 8                 # clips per iteration per data-parallel rank (and per accumulation step)
grad_accum = 1                 # accumulation steps: global batch = batch_size x dp x grad_accum
sp = 1                         # sequence-parallel ranks per clip (Ulysses); dp = world size / sp
checkpointing = choice('auto', 'on', 'off')  # recompute each DiT block in backward: auto = on with CUDA
amp = choice('auto', 'on', 'off')  # bf16 autocast on fp32 weights: auto = on with CUDA or native CPU bf16 matmuls
compile = choice('auto', 'on', 'off')  # torch.compile each DiT block: auto = on with CUDA
frames = 9                     # pixel frames per clip, 1 + 4k
height = 32                    # clip height after resize and centre crop
width = 32                     # clip width after resize and centre crop
window = choice('random', 'centre')  # where clips are cut: a new start each epoch, or one window (a cache's)
frame_stride = 1               # take every n-th frame of the source clip
max_iters = 3200               # total training iterations
learning_rate = 2e-3           # peak AdamW learning rate, reached after warmup_iters
warmup_iters = 50              # linear learning-rate warmup
lr_decay_iters = 6400          # then a cosine decay to lr_floor x learning_rate at this iteration (0 = constant)
lr_floor = 0.1                 # the decay's end as a fraction of learning_rate
weight_decay = 0.0             # AdamW weight decay
grad_clip = 1.0                # clip the gradient norm to this (0 = off)
max_loss = 100.0               # stop, before the next checkpoint, when a loss is above this (0 = off) or not finite
ema_decay = 0.99               # EMA of the DiT weights, sampled by default (0 = off); ramps up as (1 + it) / (10 + it)
t_range = (0.0, 1.0)           # sigma range after the shift, e.g. (0.875, 1.0) for the high-noise A14B expert
shift = 5.0                    # sigma = shift*u / (1 + (shift-1)*u), u uniform: > 1 trains more at high noise
caption_dropout = 0.1          # share of empty captions, so that classifier-free guidance works
route = choice('none', 'uniform', 'motion', 'or', 'and', 'xor')  # TRD pair weights: or = SARA, uniform = VideoREPA,
                               # motion (ours: motion-weighted), none = SFT
aligner_ckpt = 'out/aligner/ckpt.pt'  # Stage 1 run: saliency for or/and/xor, and (when it exists) every route's V-JEPA
trd_weight = 0.5               # L = L_flow + trd_weight * L_TRD
trd_margin = 0.1               # l_ij = relu(|cos(z_i,z_j) - cos(y_i,y_j)| - margin)
align_layer = 2                # DiT tokens after this block (1-indexed) are projected and aligned
proj_dim = 2048                # hidden width of the projector MLP dim -> proj_dim -> proj_dim -> D_vjepa
trd_pool = 1                   # average-pool both sides spatially by this factor (after the projector) to cut N x N
trd_block = 256                # TRD row-block size: memory O(N x block)
vjepa_model = 'debug'          # V-JEPA variant (models/vjepa.py configs) when there is no aligner run ('debug' = random)
vjepa_ckpt = ''                # official V-JEPA .pt file ('' only for vjepa_model=debug)
log_interval = 25              # iterations between log lines (the loss is their mean over iterations and ranks)
ckpt_interval = 400            # iterations between checkpoints out_dir/ckpt-<iter> (one is always written at the end)
keep_last = 2                  # checkpoints kept; out_dir/ckpt links to the newest complete one
ckpt_async = True              # write checkpoints from a background thread while training goes on
init_from = 'scratch'          # scratch | resume (out_dir/ckpt) | a run folder | an official or diffusers DiT folder
resume_ckpt = ''               # with init_from=resume: a checkpoint of out_dir to resume instead (e.g. ckpt-000200)
export_dir = ''                # at the end, also write the DiT here as an official folder (safetensors + config.json)
skip_bad = False               # skip unreadable clips (counted and reported) instead of stopping
num_workers = -1               # data loader worker processes (-1 = 4 with CUDA, 0 on the CPU)
clip_ram = 2.0                 # GiB of decoded clips kept in memory per loader process, re-cut each epoch (0 = off)
cache = choice('off', 'build', 'use')  # frozen outputs: computed every step | once per clip into cache_dir | read from it
cache_dir = ''                 # the cache folder ('' = cache-<manifest name> beside the manifest)

cfg = configure(globals(), __file__)


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


def check_sizes(codec, patch):
    """The clip size settings against the codec's and the DiT's grids, in one sentence, before the DiT is loaded."""
    t, s = codec.stride[0], codec.stride[1] * patch[1]
    if frames < 1 + t * (route != 'none') or (frames - 1) % t:  # TRD drops latent frame 0: it needs one more
        raise SystemExit(f'--frames={frames}: clips need 1 + {t}k frames for this codec' +
                         (', k >= 1 for TRD' if route != 'none' else '') + f' (e.g. {1 + t * max(1, (frames - 1) // t)})')
    for name, v in (('height', height), ('width', width)):
        if v % s or v == 0:
            raise SystemExit(f"--{name}={v} is not a multiple of {s} ({codec.stride[1]} px per latent x {patch[1]} "
                             f"latents per DiT token): use {max(s, v // s * s)} or {(v // s + 1) * s}")
    if route != 'none' and (height // s % trd_pool or width // s % trd_pool):
        raise SystemExit(f'--trd_pool={trd_pool} does not divide the {height // s}x{width // s} token grid of '
                         f'{height}x{width} clips')


def clip_generator(dev, slot):
    """The random stream of one clip, a function of the seed and its slot (epoch, position in the epoch's order)
    only: the same numbers at any layout of the global batch, and nothing to save for an exact resume."""
    return torch.Generator(dev).manual_seed((seed * 1_000_003 + slot[0]) * 1_000_003 + slot[1])


def make_loader(manifest, folder, dp_rank, dp, dev):
    """This dp rank's clips, as uint8 (normalised on the device) in pinned memory on CUDA; every rank builds the same
    list, so a layout the data cannot fill is refused on all."""
    workers = num_workers if num_workers >= 0 else 4 if dev.type == 'cuda' else 0
    try:
        return ClipLoader(manifest, batch_size, frames, height, width, stride=frame_stride, rank=dp_rank,
                          world_size=dp, seed=seed, skip_bad=skip_bad, num_workers=workers, accum=grad_accum,
                          window='centre' if cache != 'off' else window,  # a cache holds the centre windows
                          fetch=functools.partial(read_entry, folder) if cache == 'use' else None, masks=False,
                          ram=int(clip_ram * 2**30), uint8=True, pin=dev.type == 'cuda')
    except ValueError as err:
        raise SystemExit(str(err)) from None


def resolve_init():
    """(arch, run, meta): the DiT's config, the checkpoint whose weights it starts from (None: scratch or a DiT
    folder) and, when resuming, that checkpoint's meta (its iteration, loader and EMA)."""
    if init_from == 'resume':
        run = os.path.join(out_dir, resume_ckpt or 'ckpt')
        if not os.path.isdir(run):
            raise SystemExit(f'init_from=resume: {run} does not exist (train with init_from=scratch first' +
                             (f'; checkpoints of {out_dir}: {", ".join(run_checkpoints(out_dir)) or "none"})'
                              if resume_ckpt else ')'))
        meta = run_meta(run)
        return meta['arch'], run, meta
    if os.path.isdir(os.path.join(init_from, 'ckpt')):  # another run: its weights, a fresh optimizer
        run = os.path.join(init_from, 'ckpt')
        return run_meta(run)['arch'], run, None
    if init_from == 'scratch':
        return wan_configs[model], None, None
    if os.path.exists(os.path.join(init_from, 'config.json')):
        with open(os.path.join(init_from, 'config.json')) as f:
            return dit_kwargs(json.load(f), init_from)[0], None, None
    raise SystemExit(f"init_from='{init_from}' is neither scratch, resume, a run folder (ckpt/) nor a DiT folder "
                     f"(config.json)")


# ---------------------------------------------------------------------------------------------- the frozen models

def load_frozen(manifest, records, spec, mesh, dev, meta, tok_dir):
    """The frozen models as the settings say: umT5, its tokenizer, the codec, and for TRD the V-JEPA and (or/and/xor)
    the aligner with its own umT5 and tokenizer (None where the route needs none). Their umT5s and V-JEPA are
    FSDP-sharded like the DiT; a debug run's tokenizer is written to tok_dir."""
    master = dist.get_rank() == 0
    f = SimpleNamespace(vjepa=None, aligner=None, a_t5=None, a_tok=None, a_len=0)
    if ckpt_dir:  # the official frozen umT5 (sharded like the DiT), tokenizer and VAE
        f.t5, f.tok, f.codec = load_text_and_vae(ckpt_dir, spec.out_dim, dev, 'cpu',
                                                 lambda m: parallel.shard_frozen(m, mesh, m.blocks))
        f.codec.decoder = f.codec.conv2 = None  # training only encodes: the decoder never reaches the GPU
        f.codec.to(dev)
    else:  # a frozen random debug umT5 made from the seed, saved with the run, and a word-level tokenizer
        f.t5 = T5Encoder(**t5_configs['debug']).eval().requires_grad_(False)
        f.t5.init_weights(seed)
        if meta is not None:
            f.t5.load_state_dict(meta['t5'])
        f.t5.to(dev)
        f.codec = load_codec('pixel')
        if master:  # sample.py reads it from the run
            toy_tokenizer(manifest, records, tok_dir)
        dist.barrier()
        f.tok = Tokenizer(os.path.join(tok_dir, 'tokenizer.json'))
    if route in SALIENT and not os.path.exists(aligner_ckpt):
        raise SystemExit(f'route={route} weights token pairs by the Stage 1 saliency, but {aligner_ckpt or "no"} '
                         f'aligner_ckpt exists: run python train_aligner.py first (or point --aligner_ckpt at a run)')
    if route != 'none' and os.path.exists(aligner_ckpt):  # one frozen V-JEPA for every route: the aligner's
        f.aligner, f.vjepa, f.a_t5, f.a_tok, a_cfg = load_aligner(
            aligner_ckpt, dev, text=route in SALIENT, share=(ckpt_dir, f.t5, f.tok) if ckpt_dir else None,
            prepare_t5=lambda m: parallel.shard_frozen(m, mesh, m.blocks))
        f.a_len = a_cfg['text_len']
        theirs = (a_cfg['vjepa_model'], a_cfg['vjepa_ckpt'])
        if (vjepa_model, vjepa_ckpt) not in (('debug', ''), theirs):
            raise SystemExit(f'vjepa_model={vjepa_model} vjepa_ckpt={vjepa_ckpt!r} differ from the V-JEPA of '
                             f'{aligner_ckpt} ({theirs[0]}, {theirs[1]!r}): every route takes its targets from the '
                             f"aligner's encoder; drop them, or pass --aligner_ckpt='' to use them without an aligner")
        if master:
            print(f'TRD targets: the frozen V-JEPA ({theirs[0]}) of {aligner_ckpt}', flush=True)
        if route not in SALIENT:
            f.aligner = None
    elif route != 'none':  # frozen V-JEPA targets
        if vjepa_model == 'debug':  # random, from the seed alone: the same targets when a run resumes
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                f.vjepa = VJEPA(**vjepa_configs['debug']).eval().requires_grad_(False)
        elif not vjepa_ckpt:
            raise SystemExit(f'vjepa_model={vjepa_model} needs vjepa_ckpt=<its official .pt file>')
        else:
            f.vjepa = load_vjepa(vjepa_ckpt, vjepa_model, dev)
    if route != 'none':  # the frozen V-JEPA sharded like the DiT
        f.vjepa = parallel.shard_frozen(f.vjepa.to(dev), mesh, f.vjepa.blocks)
    return f


def frozen_source(manifest, folder, loader, spec, mesh, dev, meta):
    """(frozen models, cache meta, codec): the frozen models (None with cache=use: none is loaded) or the cache's
    meta.pt (None without cache=use), and the codec's stride and width."""
    if cache != 'use':  # the frozen models draw nothing from the seed's stream: the DiT starts the same either way
        with torch.random.fork_rng(devices=[]):
            fz = load_frozen(manifest, loader.records, spec, mesh, dev, meta, folder if cache == 'build' else out_dir)
        return fz, None, fz.codec
    cached = open_cache(folder, provenance(manifest, cfg, spec.text_len, spec.patch_size), route, loader.records)
    if dist.get_rank() == 0:
        if not ckpt_dir:  # sample.py reads the tokenizer from the run
            os.makedirs(out_dir, exist_ok=True)
            shutil.copyfile(os.path.join(folder, 'tokenizer.json'), os.path.join(out_dir, 'tokenizer.json'))
        print(f'frozen outputs from the cache {folder} ({cached["clips"]} clips): the VAE, umT5, V-JEPA and '
              f'aligner are not loaded', flush=True)
    return None, cached, SimpleNamespace(**cached['codec'])


def online_cost(fz):
    """The one line a real run without the cache prints: which frozen models run at every step, and their size."""
    models = {'VAE': fz.codec, 'umT5': fz.t5, 'V-JEPA': fz.vjepa, 'aligner': fz.aligner, "aligner's umT5": fz.a_t5}
    sizes = {k: sum(p.numel() for p in m.parameters()) for k, m in models.items() if isinstance(m, torch.nn.Module)}
    listed = ', '.join(f'{k} {n / 1e9:.2f} B' for k, n in sizes.items())
    return (f'note: the frozen models ({listed} parameters) run online: every step encodes its clips again, on each '
            f'sp rank of a clip too, and holds their weights; build the cache once (--cache=build, then --cache=use)')


def text_features(fz, captions, text_len, dev):
    """umT5 features [B, text_len, dim] (zeros past each caption) and each caption's token count."""
    ids, mask = fz.tok(captions, text_len)
    return encode(fz.t5, ids.to(dev), mask.to(dev), text_len), mask.sum(1).tolist()


def trd_targets(fz, video, captions, latent_shape, patch, dev, autocast):
    """For TRD, on the (pooled) DiT grid without latent frame 0 (the causal VAE codes pixel frame 0 alone): the
    frozen V-JEPA targets y [B, N, D] and, for or/and/xor, the saliency w [B, N] of the full caption."""
    if route == 'none':
        return None, None
    T = (latent_shape[2] - 1, latent_shape[3] // patch[1], latent_shape[4] // patch[2])
    with torch.no_grad(), autocast:
        tokens = vjepa_tokens(fz.vjepa, video, T)
        y, w = to_dit_grid(tokens, trd_pool).to(torch.bfloat16), None  # bf16: half the cache, the same online
        if fz.aligner is not None:  # the aligner's saliency on the same V-JEPA tokens
            ids, mask = fz.a_tok(captions, fz.a_len)
            n = int(mask.sum(1).max())
            t = encode(fz.a_t5, ids[:, :n].to(dev), mask[:, :n].to(dev), n)
            logits, _ = fz.aligner(tokens.flatten(1, 3), (2 * T[0], *T[1:]), t, mask[:, :n].to(dev))
            w = to_dit_grid(torch.sigmoid(logits.float()).view(*tokens.shape[:4], 1), trd_pool)[..., 0]
    return y, w


def frozen_outputs(batch, fz, cached, text_len, patch, dev, autocast):
    """A batch's latents x0, text features, TRD targets y and saliency w: read from the cache, or computed by the
    frozen models."""
    if cached:
        to = lambda key: torch.stack(batch[key]).to(dev, non_blocking=True)
        context = pad_text(batch['context'], text_len).to(dev, non_blocking=True)
        return to('x0'), context, to('y') if route != 'none' else None, to('w') if route in SALIENT else None
    video = normalise(batch['video'].to(dev, non_blocking=True))  # once, for the codec and the V-JEPA targets
    x0 = fz.codec.encode(video)
    context = text_features(fz, batch['caption'], text_len, dev)[0]
    return (x0, context, *trd_targets(fz, video, batch['caption'], x0.shape, patch, dev, autocast))


def dropped(context, empty, gens, dev):
    """Classifier-free guidance's caption dropout: each clip's features replaced by the empty caption's with
    probability caption_dropout, drawn on the device (no host sync)."""
    drop = torch.cat([torch.rand(1, generator=g, device=dev) for g in gens]) < caption_dropout
    return torch.where(drop.view(-1, 1, 1), empty.to(context.dtype), context)


def build_cache(loader, fz, folder, manifest, spec, fps, dev, autocast):
    """cache=build: every clip's frozen outputs (its centre window) into folder, then meta.pt; under torchrun clip k
    on rank k % world. Every rank runs the same number of clips (the last round repeats clips without writing
    them) because the FSDP-sharded encoders gather their weights together."""
    rank, world, recs, t0 = dist.get_rank(), dist.get_world_size(), loader.records, time.time()
    path = os.path.join(folder, 'meta.pt')
    if rank == 0:  # meta.pt is written last: a folder without it is no finished cache
        os.makedirs(folder, exist_ok=True)
        if os.path.exists(path):
            os.remove(path)
    dist.barrier()
    for k in range(rank, -(-len(recs) // world) * world, world):
        clip = loader.ds[(0, k % len(recs), 0)]  # the centre window (epoch and slot do not matter)
        with torch.no_grad():
            video = normalise(clip['video'][None].to(dev))
            x0 = fz.codec.encode(video)
            context, n = text_features(fz, [clip['caption']], spec.text_len, dev)
            y, w = trd_targets(fz, video, [clip['caption']], x0.shape, spec.patch_size, dev, autocast)
        if k < len(recs):
            entry = {'x0': x0[0], 'context': context[0, :n[0]], 'y': None if y is None else y[0],
                     'w': None if w is None else w[0]}
            # clone: a slice saved as it is would drag its whole storage (the padding to text_len) along
            atomic_save({key: v.cpu().clone() for key, v in entry.items() if v is not None},
                        entry_path(folder, recs[k]))
    empty, n = text_features(fz, [''], spec.text_len, dev)  # what a dropped caption reads
    dist.barrier()
    if rank == 0:
        atomic_save({'made': provenance(manifest, cfg, spec.text_len, spec.patch_size), 'route': route,
                     'clips': len(recs), 'fps': fps, 'empty': empty[0, :n[0]].cpu().clone(),
                     'codec': {'stride': fz.codec.stride, 'z_dim': fz.codec.z_dim},
                     'vjepa_dim': None if fz.vjepa is None else fz.vjepa.patch_embed.proj.out_channels,
                     **({} if ckpt_dir else {'t5': fz.t5.state_dict()})}, path)
        print(f'cached the frozen outputs of {len(recs)} clips in {folder} ({time.time() - t0:.1f} s on {world} '
              f'rank{"s" if world > 1 else ""}): train from them with the same settings and --cache=use', flush=True)


# ---------------------------------------------------------------------------------------------- the trained modules

def build_trainable(arch, spec, run, mesh, dev, vjepa_dim):
    """The DiT and, for TRD, its projector, FSDP-sharded before they hold any weights and filled shard by shard
    (no rank holds a full fp32 copy), as one ModuleDict: one state dict and one optimizer for both."""
    def shard_dit(m):  # blocks compiled before FSDP wraps them, as torchtitan does
        if compile == 'on' or (compile == 'auto' and dev.type == 'cuda'):
            for block in m.blocks:
                block.compile()
        return parallel.shard(m, mesh, m.blocks)
    if run is None and init_from != 'scratch':
        dit = load_dit(init_from, dev, torch.float32, prepare=shard_dit)  # fp32 master weights, bf16 autocast
    elif run is None:  # scratch: the seed's initialisation, the same at every layout
        dit = WanModel(**arch)
        dit.init_weights()
        dit = shard_dit(dit.to(dev))
    else:  # a run's checkpoint: DCP fills the shards (restore)
        dit = shard_dit(spec)
        dit.to_empty(device=dev)
    dit.train().checkpointing = checkpointing == 'on' or (checkpointing == 'auto' and dev.type == 'cuda')
    trainable = torch.nn.ModuleDict({'dit': dit})
    if route != 'none':  # saved with the run, left out of the export
        if not 1 <= align_layer <= len(dit.blocks):
            raise SystemExit(f'align_layer={align_layer} is not a block of this DiT (1..{len(dit.blocks)})')
        dim = dit.blocks[0].ffn[0].in_features
        nn = torch.nn
        projector = nn.Sequential(nn.Linear(dim, proj_dim), nn.SiLU(), nn.Linear(proj_dim, proj_dim), nn.SiLU(),
                                  nn.Linear(proj_dim, vjepa_dim))
        trainable['projector'] = parallel.shard(projector.to(dev), mesh)
    return trainable


def restore(trainable, opt, run, meta):
    """Weights (and, resuming, the optimizer) from the checkpoint run; DCP reads each rank's slices, whatever the
    world size that wrote them. Another run's checkpoint gives its DiT only (a fresh projector and optimizer)."""
    model_sd, optim_sd = get_state_dict(trainable, opt)
    if meta is None:
        state = {'model': {k: v for k, v in model_sd.items() if k.startswith('dit.')}}
        read_sharded(state, run)
        set_model_state_dict(trainable, state['model'], options=StateDictOptions(strict=False))
    else:
        state = {'model': model_sd, 'optim': optim_sd}
        read_sharded(state, run)
        set_state_dict(trainable, opt, model_state_dict=state['model'], optim_state_dict=state['optim'])


def make_ema(dit, run, meta):
    """The EMA: fp32 copies of this rank's DiT shards (no communication) under the checkpoint's 'model' key names,
    read back from the checkpoint when resuming ({} with ema_decay=0)."""
    if not ema_decay:
        return {}
    ema = {f'dit.{k}': p.detach().clone() for k, p in dit.named_parameters()}
    if meta is not None:
        if not meta['config'].get('ema_decay'):
            raise SystemExit(f"{run} has no EMA weights (trained with ema_decay=0): resume it with --ema_decay=0")
        read_sharded({'ema': ema}, run)
    return ema


def save(trainable, opt, ema, it, meta):
    """out_dir/ckpt-<iter> (sharded, every rank its part, written in the background with ckpt_async); returns the
    function that finishes it: out_dir/ckpt re-pointed at it and old ones removed."""
    model_sd, optim_sd = get_state_dict(trainable, opt)
    name = f'ckpt-{it:06d}'
    written = save_sharded(os.path.join(out_dir, name), {'model': model_sd, 'optim': optim_sd,
                                                         **({'ema': ema} if ema else {})},
                           {'iter': it, **meta}, background=ckpt_async)

    def finish():
        written()
        if dist.get_rank() == 0:
            link_latest(out_dir, name, keep_last)
        dist.barrier()
    return finish


# ---------------------------------------------------------------------------------------------- one step

def noised(x0, gens, u_lo, u_hi, dev):
    """Flow matching's x_t = (1 - sigma) x0 + sigma eps for each clip's sigma (shifted, in t_range) and noise eps."""
    u = u_lo + (u_hi - u_lo) * torch.cat([torch.rand(1, generator=g, device=dev) for g in gens])
    sigma = shifted(u, shift).view(-1, 1, 1, 1, 1)
    noise = torch.stack([torch.randn(x0.shape[1:], generator=g, device=dev) for g in gens])
    return sigma, noise, (1 - sigma) * x0 + sigma * noise


def losses(trainable, x0, sigma, noise, xt, context, y, w, group, autocast):
    """L_flow (the same on every sp rank) and this rank's share of L_TRD (None without TRD): under sequence
    parallelism each rank projects its own tokens, gathers the group's and computes its rows against all columns."""
    dit = trainable['dit']
    grid = (x0.shape[2], x0.shape[3] // dit.patch_size[1], x0.shape[4] // dit.patch_size[2])
    with autocast:
        out = dit(xt, 1000 * sigma.flatten(), context, features_at=align_layer if route != 'none' else 0, group=group)
        pred, feats = out if route != 'none' else (out, None)
        l_flow = F.mse_loss(pred, noise - x0)
        if feats is None:
            return l_flow, None
        z = trainable['projector'](feats.flatten(0, 1)).unflatten(0, feats.shape[:2])  # 2-D: no view for FSDP
        z = parallel.seq_gather(z, group, math.prod(grid)).unflatten(1, grid)[:, 1:]
        z = pool_tokens(z, trd_pool)  # latent frame 0 dropped, as for the targets y
        pooled = (grid[0] - 1, grid[1] // trd_pool, grid[2] // trd_pool)
        part = (0, 1) if group is None else (group.rank(), sp)
        return l_flow, trd_loss(z, y.float(), w, route=route, margin=trd_margin, block=trd_block, grid=pooled, part=part)


def check_loss(worst, it, pending):
    """Stop the run, before it writes a checkpoint, when a loss since the last check was not finite or above
    max_loss on any rank: the checkpoint being written is finished and stays the last good one."""
    flags = torch.stack([worst.isnan().float(), worst.nan_to_num(posinf=math.inf)])  # a NaN does not survive MAX
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    value = math.nan if flags[0] else flags[1].item()
    if not math.isfinite(value) or value > max_loss > 0:
        pending()
        good = os.path.join(out_dir, 'ckpt')
        kept = f'{good} (iteration {run_meta(good)["iter"]})' if os.path.exists(good) else 'no checkpoint'
        raise SystemExit(f'iteration {it}: the loss reached {value:.4g} (max_loss={max_loss:g}): stopped before '
                         f'checkpointing; {kept} is the last good one (lower learning_rate)')
    worst.zero_()


def rank_loss(l_flow, l_trd):
    """What this rank backpropagates. models/parallel.py's convention: the sp ranks' shares add up to the group's
    loss (each takes 1/sp of L_flow, its rows of L_TRD) and FSDP averages over all dp x sp ranks, so the shares are
    scaled by sp (a sum over sp, a mean over dp); / grad_accum averages the micro-steps."""
    share = l_flow / sp + (0 if l_trd is None else trd_weight * l_trd)
    return share * sp / grad_accum


def log_line(it, sums, n_logged, dt, tok_s, lr, w, arch, L, dev):
    """One log line: the mean losses, speed, the last batch's saliency and pair budget, memory and MFU."""
    l_flow, l_trd = sums.tolist()
    trd = '' if route == 'none' else f', trd {l_trd:.4f}'
    if w is not None:  # how the route spends its pair budget (the paper's figure)
        b = pair_budget(w)
        trd += (f", saliency {w.mean():.3f}, pairs fg-fg/fg-bg/bg-bg {b['fg_fg']:.0%}/{b['fg_bg']:.0%}/"
                f"{b['bg_bg']:.0%}, {route} weight {b[route + '/fg_fg']:.0%}/{b[route + '/fg_bg']:.0%}/"
                f"{b[route + '/bg_bg']:.0%}")
    if dev.type == 'cuda':
        mem = f', peak mem {torch.cuda.max_memory_allocated(dev) / 2**30:.1f} GiB'
        peak = peak_flops(dev)
        mem += f', MFU {dit_flops(arch, L) / L * tok_s / dist.get_world_size() / peak:.1%}' if peak else ''
    else:
        mem = f', peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB'
    return f'iter {it}: loss {l_flow:.4f}{trd}, {1000 * dt:.1f} ms/iter, {tok_s:,.0f} tokens/s, lr {lr:.2e}{mem}'


def export(dit, ema):
    """The DiT (its EMA weights when kept) as an official folder in export_dir, gathered on rank 0's host memory
    one tensor at a time."""
    if ema:
        for p, e in zip(dit.parameters(), ema.values()):
            p.data.copy_(e)
    sd = get_model_state_dict(dit, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        export_dit(dit, export_dir, sd=sd)


# ---------------------------------------------------------------------------------------------- main

def main():
    require(globals(), 'learning_rate >= 0', 'batch_size >= 1', 'grad_accum >= 1', 'sp >= 1', 'max_iters >= 0',
            'warmup_iters >= 0', 'lr_decay_iters >= 0', '0 <= lr_floor <= 1', 'weight_decay >= 0', 'grad_clip >= 0',
            'max_loss >= 0', '0 <= ema_decay < 1', '0 <= caption_dropout <= 1', 'shift > 0',
            'len(t_range) == 2', '0 <= t_range[0] < t_range[1] <= 1', 'trd_weight >= 0', 'trd_margin >= 0', 'align_layer >= 1',
            'proj_dim >= 1', 'trd_pool >= 1', 'trd_block >= 1', 'log_interval >= 1', 'ckpt_interval >= 1',
            'keep_last >= 0', 'num_workers >= -1', 'clip_ram >= 0', 'frame_stride >= 1')
    arch, run, meta = resolve_init()
    mesh, dev = parallel.init(sp, device, heads=arch['num_heads'])
    group, world, master = parallel.sp_group(mesh), dist.get_world_size(), dist.get_rank() == 0
    dp, dp_rank = mesh['dp'].size(), mesh['dp'].get_local_rank()
    global_batch = batch_size * dp * grad_accum
    if meta is not None and meta['global_batch'] != global_batch:
        raise SystemExit(f"{run} was trained with a global batch of {meta['global_batch']} clips; this layout gives "
                         f"{global_batch} (batch_size {batch_size} x dp {dp} x grad_accum {grad_accum}): set "
                         f"batch_size or grad_accum so that the product stays {meta['global_batch']}")
    manifest = ensure_shapes('data/shapes') if data == 'shapes' else data
    folder = cache_dir or default_folder(manifest)
    if cache != 'build':
        check_shared(out_dir, 'out_dir')
    if cache != 'off':
        check_shared(folder, 'cache_dir')
    loader = make_loader(manifest, folder, dp_rank, dp, dev)
    if master and cache != 'build':
        save_config(cfg, out_dir)
        print(f'world {world} = dp {dp} x sp {sp}; global batch {global_batch} = batch_size {batch_size} x dp {dp} x '
              f'grad_accum {grad_accum}', flush=True)
    torch.manual_seed(seed)
    with torch.device('meta'):  # the DiT's shape for the checks below (a resumed run fills it)
        spec = WanModel(**arch)
    # no cast cache: it would keep a bf16 copy of every block's gathered weights until the forward ends
    autocast = mixed_precision(dev, amp, cache=False)

    fz, cached, codec = frozen_source(manifest, folder, loader, spec, mesh, dev, meta)
    if master and ckpt_dir and cache == 'off':
        print(online_cost(fz), flush=True)
    if codec.z_dim != spec.patch_embedding.in_channels:
        raise SystemExit(f'the codec gives {codec.z_dim} latent channels but the DiT takes '
                         f'{spec.patch_embedding.in_channels} (image-conditioned DiTs are not trained here)')
    check_sizes(codec, spec.patch_size)
    fps = cached['fps'] if cached else video_fps(loader.records[0]) / frame_stride
    if cache == 'build':  # before the DiT exists: a build needs only the frozen models
        build_cache(loader, fz, folder, manifest, spec, fps, dev, autocast)
        parallel.close()
        return

    with torch.no_grad():  # what a dropped caption reads
        empty = pad_text([cached['empty']], spec.text_len).to(dev) if cached else \
            text_features(fz, [''], spec.text_len, dev)[0]
    vjepa_dim = (cached['vjepa_dim'] if cached else fz.vjepa.patch_embed.proj.out_channels) if route != 'none' else 0
    trainable = build_trainable(arch, spec, run, mesh, dev, vjepa_dim)
    dit, params = trainable['dit'], list(trainable.parameters())
    opt = adamw(params, learning_rate, weight_decay, fused=True)  # one kernel, on the CPU too
    if run is not None:
        restore(trainable, opt, run, meta)
    ema = make_ema(dit, run, meta)
    if meta is not None:
        loader.load_state_dict(meta['loader'])
    it = meta['iter'] if meta is not None else 0
    u_lo, u_hi = (unshifted(r, shift) for r in t_range)
    # what every checkpoint records besides the weights; a debug run keeps the random umT5 that made its features
    run_info = {'global_batch': global_batch, 'config': cfg, 'arch': arch, 'fps': fps, 'world': world,
                **({} if ckpt_dir else {'t5': cached['t5'] if cached else fz.t5.state_dict()})}

    batches = iter(loader)
    sums, t0, n_logged, tokens_done = torch.zeros(2, device=dev), time.time(), 0, 0
    worst = torch.zeros((), device=dev)  # the largest loss share since the last check
    pending = lambda: None  # finishes the checkpoint being written
    while it < max_iters:
        lr = lr_at(it, learning_rate, warmup_iters, lr_decay_iters, lr_floor)
        for g in opt.param_groups:
            g['lr'] = lr
        for _ in range(grad_accum):  # FSDP reduce-scatters every micro-step: sharded gradients accumulate
            batch = next(batches)
            gens = [clip_generator(dev, s) for s in batch['slot']]
            with torch.no_grad():
                x0, context, y, w = frozen_outputs(batch, fz, cached, dit.text_len, dit.patch_size, dev, autocast)
                context = dropped(context, empty, gens, dev)
                sigma, noise, xt = noised(x0, gens, u_lo, u_hi, dev)
            l_flow, l_trd = losses(trainable, x0, sigma, noise, xt, context, y, w, group, autocast)
            rank_loss(l_flow, l_trd).backward()
            parts = torch.stack([l_flow.detach() / sp, l_flow.new_zeros(()) if l_trd is None else l_trd.detach()])
            sums += parts / grad_accum
            worst = torch.maximum(worst, parts.sum())  # NaN propagates
            tokens_done += x0[:, 0].numel() // math.prod(dit.patch_size)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if ema:
            torch._foreach_lerp_(list(ema.values()), [p.detach() for p in dit.parameters()],
                                 1 - min(ema_decay, (1 + it) / (10 + it)))
        it += 1
        n_logged += 1
        if it % log_interval == 0 or it % ckpt_interval == 0 or it == max_iters:
            check_loss(worst, it, pending)
        if it % log_interval == 0 or it == max_iters:
            dist.all_reduce(sums)  # sums over sp of the shares, then over dp
            dt = time.time() - t0
            tok_s = tokens_done * world / sp / dt  # every dp group processes its own tokens
            L = tokens_done / (n_logged * grad_accum * batch_size)  # tokens per clip
            line = log_line(it, sums / (dp * n_logged), n_logged, dt / n_logged, tok_s, lr, w, arch, L, dev)
            if master:
                print(line, flush=True)
            sums, t0, n_logged, tokens_done = torch.zeros(2, device=dev), time.time(), 0, 0
        if it % ckpt_interval == 0 or it == max_iters:
            pending()
            pending = save(trainable, opt, ema, it, {'loader': loader.state_dict(), **run_info})
    pending()
    if export_dir:
        export(dit, ema)
    if master:
        exported = f', exported to {export_dir}' + (' (EMA weights)' if ema else '') if export_dir else ''
        print(f'done: {os.path.join(out_dir, "ckpt")}{exported}', flush=True)
    parallel.close()


if __name__ == '__main__':
    run(main)
