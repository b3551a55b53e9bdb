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

With --omiti2v=<the OmitI2V folder> each sample of its meta.json is rendered from its image and prompt as
<out>/{id}.mp4, the names `eval.py --omiti2v` reads.

The training-free methods (AlignVid, layout refocusing, block calibration) live in models/steering.py and reach the
sampling loop as one per-step hook.
"""
import collections
import contextlib
import functools
import math
import os

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from data import ensure_shapes, load_clip, read_manifest, write_video
from models import parallel
from models.checkpoint import expert_folders, load_ckpt_dit, load_dit, load_dit_run, load_text_and_vae
from models.judge import OMITI2V_FIELDS, read_omiti2v
from models.settings import choice, configure, run
from models.steering import (AlignVid, Refocus, Steering, block_string, calibrate_blocks, make_plan, oracle_layout,
                             parse_blocks, read_layout)
from models.t5 import encode
from models.unipc import Euler, UniPC
from models.wan import autocast as mixed_precision, token_grid

out_dir = 'out/dit'            # a train_dit.py run to sample from (used when ckpt_dir is '')
ckpt_dir = ''                  # an official Wan2.2/2.1 checkpoint folder (official or diffusers DiT layout)
model = choice('ti2v-5b', 't2v-a14b', 'i2v-a14b', 't2v-1.3b', 't2v-14b')  # which official model ckpt_dir holds
prompt = 'a red circle moves right over a dark grey checkered floor'  # the caption to render
prompts = ''                   # a text file, one prompt a line: writes out/<prompt>-<index>.mp4 (VBench's naming)
samples = 1                    # with prompts: videos per prompt, index i seeded with seed + i (VBench: 5)
omiti2v = ''                   # an OmitI2V folder (meta.json, images): out/{id}.mp4 per sample from its image and prompt
omiti2v_fields = OMITI2V_FIELDS  # meta.json's key names of: id, image, prompt, category, questions, question, answer
sp = 0                         # torchrun ranks per video (0 = all); with prompts the world/sp rank groups split them
negative_prompt = ''           # '' = the official default negative prompt (runs: the empty caption)
image = ''                     # first frame for image-to-video (i2v-a14b, or ti2v-5b)
out = ''                       # mp4 path ('' = out_dir/sample.mp4 or sample.mp4); with prompts a folder ('' = samples)
solver = choice('unipc', 'euler')  # the official default is unipc
steps = 0                      # denoising steps; 0 = the model's default
shift = 0.0                    # the timestep shift (models/unipc.shifted); 0 = the model's default (a run's: its own)
guidance = 0.0                 # classifier-free guidance scale for both A14B experts; 0 = the model's default
size = ''                      # 'W*H'; '' = the model's default (image-to-video: its area, the image's aspect)
frames = 0                     # pixel frames (1 + 4k); 0 = the model's default
seed = 0                       # seeds the initial noise (drawn on the sampling device, as officially)
high = ''                      # A14B: a train_dit.py run or DiT folder replacing ckpt_dir's high-noise expert (SARA's)
low = ''                       # A14B: the same for the low-noise expert
t5_cpu = False                 # run umT5 on the CPU (the official --t5_cpu); by default on the GPU, as officially
offload = True                 # keep the idle A14B expert on the CPU, so one GPU holds the active one
ema = True                     # a run that kept an EMA of its weights is sampled with it (False = the trained weights)
dtype = choice('auto', 'stored', 'bfloat16')  # DiT weights: auto = bfloat16 for A14B on CUDA (the official
                               # convert_model_dtype), else as stored; bfloat16 halves their memory
amp = choice('auto', 'on', 'off')  # bf16 autocast: auto = on with CUDA or native CPU bf16 matmuls
device = 'auto'                # auto = cuda when available, else cpu
# training-free alignment at sampling time (models/steering.py); both off by default
alignvid = 1.0                 # AlignVid: text cross-attention logits times alpha (1.0 = off; published 1.35)
alignvid_blocks = 'all'        # blocks it scales, 0-indexed: all | a list such as 0,2-7,10-20 | wan14b (published)
alignvid_t = (900.0, 1000.0)   # it acts at model timesteps lo < t <= hi (published: t > 900)
alignvid_uncond = True         # scale the unconditional (negative prompt) pass too (published: yes)
alignvid_adaptive = False      # per query and head alpha_i = 1 + (alpha - 1) H_i / log(text rows), H_i its entropy
calibrate = ''                 # a manifest with masks, or 'shapes': print blocks ranked for alignvid_blocks, no video
calibrate_t = 900.0            # the model timestep calibrate noises the clips to
calibrate_clips = 16           # clips calibrate reads (those with masks, from the top of the manifest)
calibrate_keep = 0.7           # share of the blocks calibrate lists (the published Wan2.1-14B list: 28 of 40)
layout = ''                    # StarVid refocusing: a layout JSON file, or 'oracle' (a clip of layout_data); '' = off
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


def load_expert(folder, device, want, prepare=None):
    """A DiT folder (official or diffusers layout) or a train_dit.py run folder, in dtype want (None: the file's);
    prepare shards an official folder's DiT before its weights are read."""
    if os.path.isdir(os.path.join(folder, 'ckpt')):
        dit = load_ckpt_dit(os.path.join(folder, 'ckpt'), ema=ema)[0].to(device, want)
    else:
        dit = load_dit(folder, device, want, prepare=prepare)
    return dit.eval().requires_grad_(False)


def load_official(dev, mesh, group):
    """The DiT expert(s), umT5 and VAE of an official folder, each read straight to its device in its file dtype;
    `high` / `low` replace an A14B expert by a trained one (SARA trains the high-noise expert). Under sequence
    parallelism the experts are FSDP-sharded over the group, so no rank holds a whole expert."""
    folders = expert_folders(ckpt_dir)
    for name, folder in (('high', high), ('low', low)):
        if folder and name not in folders:
            raise SystemExit(f'--{name}={folder} replaces an A14B expert, but {ckpt_dir} holds a single DiT')
        if folder:
            folders[name] = folder
    store = torch.device('cpu') if offloading(dev) and group is None else dev
    want = torch.bfloat16 if dtype == 'bfloat16' or (dtype == 'auto' and dev.type == 'cuda' and len(folders) > 1) \
        else None
    prepare = (lambda m: parallel.shard_frozen(m, mesh, m.blocks, group)) if group is not None else None
    experts = {k: load_expert(f, store, want, prepare) for k, f in folders.items()}
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


def expert_name(experts, t, d):
    """The expert for model timestep t: the single DiT, or A14B's high-noise one from boundary * 1000 on."""
    if 'single' in experts:
        return 'single'
    return 'high' if float(t) >= d['boundary'] * 1000 else 'low'


def offloading(dev):
    """Whether idle DiT experts wait on the CPU: with offload on CUDA in one process. Under torchrun every rank's
    copy would multiply host memory by the ranks (both A14B experts each), so there the experts stay on the GPUs:
    whole with one video per rank, FSDP-sharded with sp ranks per video."""
    return offload and dev.type == 'cuda' and int(os.environ.get('WORLD_SIZE', 1)) == 1


def active(experts, name, dev):
    """The expert `name` on dev; when offloading the others wait on the CPU (sharded experts stay put)."""
    if offloading(dev) and not parallel.is_sharded(experts[name]):
        for k, m in experts.items():
            m.to(dev if k == name else 'cpu')
    return experts[name]


def encode_text(t5, tok, texts, text_len, dev):
    """umT5 features [len(texts), text_len, dim] on dev (zero-padded) and the token mask; with offload on CUDA umT5
    goes back to the CPU afterwards, as officially, so that the DiT has the GPU."""
    ids, mask = tok(texts, text_len)
    t5_dev = torch.device('cpu') if t5_cpu else dev
    context = encode(t5.to(t5_dev), ids.to(t5_dev), mask.to(t5_dev), text_len).to(dev)
    if offload and dev.type == 'cuda':
        t5.to('cpu')
    return context, mask


def generate(models, text, noise_seed, shape, y, first, dev, group=None, autocast=contextlib.nullcontext(), hook=None):
    """One video [1, 3, T, H, W] in [-1, 1] for text, and the steps each expert took. shape: the latent's; y: the
    I2V-A14B image channels; first: TI2V's first latent frame, pinned; hook: a models.steering.Steering."""
    experts, t5, tok, codec, d = models
    text_len = next(iter(experts.values())).text_len
    context, _ = encode_text(t5, tok, [text, negative_prompt or (NEG_PROMPT if ckpt_dir else '')], text_len, dev)
    cond, uncond = context[:1], context[1:]
    x = torch.randn(shape, generator=torch.Generator(dev).manual_seed(noise_seed), device=dev)[None]
    keep = torch.ones_like(x)
    if first is not None:
        keep[:, :, 0] = 0  # latent frame 0 is the image's, re-imposed after every step
        x = (1 - keep) * first + keep * x
    st, sh = steps or d['steps'], shift or d['shift']
    sampler = UniPC(st, sh) if solver == 'unipc' else Euler(st, sh)
    guide = (guidance, guidance) if guidance else d['guidance']  # (low-noise, high-noise)
    hook, used = hook or Steering(), collections.Counter()
    for t in sampler.timesteps:
        name = expert_name(experts, t, d)
        dit, used[name] = active(experts, name, dev), used[name] + 1
        tt = t.to(dev, torch.float32).view(1)
        if first is not None:  # per-token timesteps: 0 for the given frame's tokens
            tt = (keep[0, 0, :, ::2, ::2] * tt).flatten()[None]
        with autocast:
            x = hook.before(dit, x, tt, cond, y, t, sampler.sigmas[sampler.index].item(), keep)
            with hook.scaled(dit, t, cond=True):
                v_cond = dit(x, tt, cond, y, group=group)
            with hook.scaled(dit, t, cond=False):
                v_uncond = dit(x, tt, uncond, y, group=group)
        g = guide[1] if name == 'high' else guide[0]
        x = sampler.step(v_uncond + g * (v_cond - v_uncond), x)
        if first is not None:
            x = (1 - keep) * first + keep * x
    if offloading(dev):  # the decoder's activations get the GPU, as officially
        for m in experts.values():
            if not parallel.is_sharded(m):
                m.to('cpu')
        torch.cuda.empty_cache()
    return codec.decode(x.float()).clamp(-1, 1), used


def i2v_image(codec, dit, n_frames, w, h, dev, path):
    """I2V-A14B: the image resized to the area w*h at its own aspect (official rounding) -> (y, w, h)."""
    img = to_tensor(load_image(path))
    aspect = img.shape[1] / img.shape[2]
    s, p = codec.stride[1], dit.patch_size[1]
    lat_h = round(math.sqrt(w * h * aspect) // s // p * p)
    lat_w = round(math.sqrt(w * h / aspect) // s // p * p)
    h, w = lat_h * s, lat_w * s
    img = F.interpolate(img[None], size=(h, w), mode='bicubic')
    return i2v_condition(codec, img.to(dev), n_frames), w, h


def ti2v_image(codec, w, h, dev, path):
    """TI2V-5B: the image resized and centre-cropped to the official size within w*h -> (first latent frame, w, h)."""
    from PIL import Image
    img = load_image(path)
    ow, oh = best_output_size(img.width, img.height, 32, 32, w * h)
    scale = max(ow / img.width, oh / img.height)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    x1, y1 = (img.width - ow) // 2, (img.height - oh) // 2
    return codec.encode(to_tensor(img.crop((x1, y1, x1 + ow, y1 + oh)))[None, :, None].to(dev)), ow, oh


def image_condition(codec, dit, n_frames, w, h, dev, path):
    """(y, first, w, h): the image at path as I2V-A14B's extra channels y or TI2V-5B's first latent frame (None
    without an image), and the video size after the image's rounding."""
    y, first = None, None
    if path and model == 'i2v-a14b' and ckpt_dir:
        y, w, h = i2v_image(codec, dit, n_frames, w, h, dev, path)
    elif path and ckpt_dir:
        first, w, h = ti2v_image(codec, w, h, dev, path)
    elif path:
        raise SystemExit('--image and --omiti2v need an official image-to-video model (i2v-a14b or ti2v-5b) in '
                         'ckpt_dir')
    if h % (codec.stride[1] * 2) or w % (codec.stride[2] * 2):
        raise SystemExit(f'size {w}*{h} must be a multiple of {2 * codec.stride[2]} on both sides for this model')
    return y, first, w, h


def alignvid_scaling(n_blocks):
    """The AlignVid part of the hook (None at alignvid 1.0)."""
    if alignvid == 1.0:
        return None
    blocks = parse_blocks(alignvid_blocks, n_blocks, 'alignvid_blocks')
    return AlignVid(alignvid, blocks, alignvid_t, alignvid_uncond, alignvid_adaptive)


def layout_refocusing(jobs, tok, dit, codec, n_frames, h, w, d):
    """The refocusing part of the hook (None without a layout) and the jobs: a layout's prompt replaces the prompt."""
    if not layout:
        return None, jobs
    if prompts or omiti2v:
        raise SystemExit('layout describes one prompt: use --prompt, not --prompts or --omiti2v')
    text, boxes, verbs = oracle_layout(layout_data, layout_clip, n_frames, d.get('stride', 1)) \
        if layout == 'oracle' else read_layout(layout, n_frames)
    text = text or prompt  # oracle: the clip's caption
    grid = token_grid(n_frames, h, w, codec.stride, dit.patch_size)  # after an image's size rounding
    plan = make_plan(text, boxes, verbs, tok, dit.text_len, grid, codec.stride[0], f'layout {layout}')
    blocks = parse_blocks(refocus_blocks, len(dit.blocks), 'refocus_blocks')
    print(f'refocusing {len(boxes)} phrase(s), {len(verbs)} verb(s) at blocks {block_string(blocks)}: {text!r}')
    refocus = Refocus(plan, blocks, refocus_t, refocus_verb_t, refocus_iters, refocus_step, refocus_tau,
                      refocus_verb_weight)
    return refocus, [(text, None, image, video_path(text, None))]


def noised_clips(models, dit, recs, n_frames, h, w, dev):
    """Each clip of recs as calibrate_blocks reads it: its latent noised to calibrate_t (seed + its index), the
    timestep, its caption's context and length, I2V-A14B's y from its first frame, the union of its masks."""
    _, t5, tok, codec, d = models
    for k, rec in enumerate(recs):
        clip = load_clip(rec, n_frames, h, w, d.get('stride', 1))
        video = clip['video'][None].to(dev)
        x0 = codec.encode(video)
        s = calibrate_t / 1000
        xt = (1 - s) * x0 + s * torch.randn(x0.shape, generator=torch.Generator(dev).manual_seed(seed + k), device=dev)
        y = i2v_condition(codec, video[:, :, 0], n_frames) if dit.model_type == 'i2v' else None
        context, mask = encode_text(t5, tok, [clip['caption']], dit.text_len, dev)
        masks = clip['masks'].max(0).values.to(dev)
        yield xt, torch.full((1,), calibrate_t, device=dev), context, y, int(mask.sum()) - 1, masks  # </s> left out


def calibration(models, dev, n_frames, h, w, autocast):
    """calibrate: print the DiT's blocks ranked by the lift of their text attention on the foreground of clips with
    masks, and the share calibrate_keep of them as a list for alignvid_blocks."""
    experts, _, _, codec, d = models
    manifest = ensure_shapes() if calibrate == 'shapes' else calibrate
    recs = [r for r in read_manifest(manifest) if r['entities']][:calibrate_clips]
    if not recs:
        raise SystemExit(f'calibrate={calibrate}: {manifest} has no clips with entity masks')
    dit = experts[expert_name(experts, calibrate_t, d)].to(dev)
    grid = token_grid(n_frames, h, w, codec.stride, dit.patch_size)
    print(f'calibrate: {len(recs)} clips of {manifest} at t={calibrate_t:g}; foreground lift per block '
          f'(share of text attention on the masks / their area):')
    clips = noised_clips(models, dit, recs, n_frames, h, w, dev)
    return calibrate_blocks(dit, clips, len(recs), grid, codec.stride[0], calibrate_keep, autocast)


def omiti2v_jobs():
    """(prompt, None, image, out/{id}.mp4) per OmitI2V sample, the file name its evaluation reads."""
    if prompts or image:
        raise SystemExit('--omiti2v brings its own prompts and images: drop --prompts and --image')
    return [(s['prompt'], None, s['image'], os.path.join(out or 'samples', f"{s['id']}.mp4"))
            for s in read_omiti2v(omiti2v, omiti2v_fields, ('id', 'image', 'prompt'))]


def prompt_jobs():
    """(text, index, image, mp4 path) per video: the prompt (index None), each line of the prompts file `samples`
    times, or each OmitI2V sample."""
    if omiti2v:
        return omiti2v_jobs()
    if not prompts:
        return [(prompt, None, image, video_path(prompt, None))]
    if not os.path.isfile(prompts):
        raise SystemExit(f'--prompts={prompts}: file not found (one prompt a line)')
    texts = [line.strip() for line in open(prompts, encoding='utf-8') if line.strip()]
    bad = next((t for t in texts if '/' in t or len(t.encode()) > 240), None)
    if bad:  # the prompt is the file name (VBench's convention)
        raise SystemExit(f'{prompts}: the prompt {bad[:60]!r} cannot be a file name (a "/" or over 240 bytes)')
    return [(t, i, image, video_path(t, i)) for t in texts for i in range(samples)]


def video_path(text, i):
    """The prompt's video: out or the default; a batch's: <prompt>-<index>.mp4 in out (or samples)."""
    if i is None:
        return out or (os.path.join(out_dir, 'sample.mp4') if not ckpt_dir else 'sample.mp4')
    return os.path.join(out or 'samples', f'{text}-{i}.mp4')


def checked_dit(experts, d, sp_size):
    """One of the experts, once they fit the model and sp_size divides their heads."""
    if ('high' in experts) != ('boundary' in d):
        raise SystemExit(f"{ckpt_dir} holds {', '.join(experts)} DiT folder(s), which does not fit model={model}")
    dit = next(iter(experts.values()))
    if dit.num_heads % sp_size:
        raise SystemExit(f"sp={sp_size} ranks per video do not divide the DiT's {dit.num_heads} heads: "
                         f"pick an sp (or a number of torchrun processes) that divides it")
    return dit


def main():
    mesh, dev = parallel.init(sp or int(os.environ.get('WORLD_SIZE', 1)), device)
    group = parallel.sp_group(mesh)
    jobs = prompt_jobs()
    if ckpt_dir and model == 'i2v-a14b' and not (image or omiti2v):
        raise SystemExit('i2v-a14b generates from a first frame: pass --image=<path>')
    if (image or omiti2v) and model.startswith('t2v'):
        flag = '--image' if image else '--omiti2v'
        raise SystemExit(f'{flag} is for image-to-video models (i2v-a14b, ti2v-5b); {model} is text-to-video: '
                         f'drop {flag} or pick such a model')
    models = load_official(dev, mesh, group) if ckpt_dir else load_trained(dev)
    experts, t5, tok, codec, d = models
    dit = checked_dit(experts, d, mesh['sp'].size())
    n_frames = frames or d['frames']
    w, h = (int(v) for v in (size or d['size']).split('*'))
    if (n_frames - 1) % 4:
        raise SystemExit(f'frames must be 1 + 4k, got {n_frames}')
    autocast = mixed_precision(dev, amp)
    if (calibrate or layout) and group is not None:
        raise SystemExit('calibrate and layout read cross-attention maps of whole videos, which sequence parallelism '
                         'splits over ranks: run them in one process per video (--sp=1)')
    if calibrate:
        with torch.no_grad():
            return calibration(models, dev, n_frames, h, w, autocast)
    align = alignvid_scaling(len(dit.blocks))
    # each image is conditioned once in a row of jobs that share it (one image for a prompt or a prompts file)
    condition = functools.lru_cache(maxsize=1)(lambda img: image_condition(codec, dit, n_frames, w, h, dev, img))
    with torch.no_grad():
        *_, w0, h0 = condition(jobs[0][2])
    refocus, jobs = layout_refocusing(jobs, tok, dit, codec, n_frames, h0, w0, d)
    hook = Steering(align, refocus)

    dp, at = mesh['dp'].size(), mesh['dp'].get_local_rank()
    for text, i, img, path in jobs[at::dp]:  # each group of sp ranks its share of the prompts
        if (prompts or omiti2v) and os.path.exists(path):  # a batch picks up where it stopped
            continue
        with torch.no_grad():
            y, first, vw, vh = condition(img)
            shape = (dit.out_dim, (n_frames - 1) // codec.stride[0] + 1, vh // codec.stride[1], vw // codec.stride[2])
            video, used = generate(models, text, seed + (i or 0), shape, y, first, dev, group, autocast, hook)
        if mesh['sp'].get_local_rank() == 0:
            os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
            write_video(path, video[0].cpu(), d['fps'])
            print(f'wrote {path}: {video.shape[2]} frames of {video.shape[4]}x{video.shape[3]} at {d["fps"]:g} fps; '
                  f'steps per expert: {dict(used)}' + (f'; sp {group.size()}' if group else '') +
                  (f'; rank {dist.get_rank()}' if dp > 1 else ''), flush=True)
    parallel.close()


if __name__ == '__main__':
    run(main)
