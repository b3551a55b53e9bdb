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
import math
import os

import numpy as np
import torch
import torch.distributed as dist

from data import write_video
from models import parallel
from models.checkpoint import expert_folders, load_dit, load_run_dit, load_state_dict, load_text_and_vae
from models.settings import configure, run
from models.t5 import T5Encoder, Tokenizer, configs as t5_configs, encode
from models.unipc import UniPC
from models.vae import load_codec

out_dir = 'out/dit'            # a train_dit.py run to sample from (used when ckpt_dir is '')
ckpt_dir = ''                  # an official Wan2.2/2.1 checkpoint folder (official or diffusers DiT layout)
model = 'ti2v-5b'              # which official model ckpt_dir holds: t2v-a14b | i2v-a14b | ti2v-5b | t2v-1.3b | t2v-14b
prompt = 'a red circle moves right over a dark grey checkered floor'  # the caption to render
prompts = ''                   # a text file, one prompt a line: writes out/<prompt>-<index>.mp4 (VBench's naming)
samples = 1                    # with prompts: videos per prompt, index i seeded with seed + i (VBench: 5)
sp = 0                         # torchrun ranks per video (0 = all); with prompts the world/sp rank groups split them
negative_prompt = ''           # '' = the official default negative prompt (runs: the empty caption)
image = ''                     # first frame for image-to-video (i2v-a14b, or ti2v-5b)
out = ''                       # mp4 path ('' = out_dir/sample.mp4 or sample.mp4); with prompts a folder ('' = samples)
solver = 'unipc'               # unipc (the official default) | euler
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
device = 'auto'                # auto = cuda when available, else cpu

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


class Euler:
    """First-order flow steps x += (sigma_next - sigma) v on the shifted grid from sigma = 1; UniPC's interface."""
    def __init__(self, steps, shift):
        s = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        self.sigmas = shift * s / (1 + (shift - 1) * s)
        self.timesteps = (self.sigmas[:-1] * 1000).long()  # integer model timesteps, as officially
        self.index = 0

    def step(self, v, x):
        self.index += 1
        return x.float() + (self.sigmas[self.index] - self.sigmas[self.index - 1]).item() * v.float()


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
        dit = load_run_dit(os.path.join(folder, 'ckpt'), ema=ema)[0].to(device, want)
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


def load_run(dev):
    """The DiT of a train_dit.py run (its sharded checkpoint, consolidated), its text encoder and codec."""
    ckpt_path = os.path.join(out_dir, 'ckpt')
    if not os.path.isdir(ckpt_path):
        raise SystemExit(f'{ckpt_path} does not exist: train first (python train_dit.py) or point --out_dir at a run')
    dit, meta = load_run_dit(ckpt_path, ema=ema)
    run = meta['config']
    if run['ckpt_dir']:
        t5, tok, codec = load_text_and_vae(run['ckpt_dir'], dit.out_dim, 'cpu' if t5_cpu else dev, dev)
    else:
        t5 = T5Encoder(**t5_configs['debug'])
        load_state_dict(t5, meta['t5'], ckpt_path + '/meta.pt (t5)')
        t5, tok, codec = t5.to(dev).eval(), Tokenizer(os.path.join(out_dir, 'tokenizer.json')), load_codec('pixel')
    d = dict(frames=run['frames'], fps=meta['fps'], size=f"{run['width']}*{run['height']}", steps=50,
             shift=run['shift'], guidance=(4.0, 4.0))  # the sigma shift it trained with
    return {'single': dit.to(dev).eval()}, t5, tok, codec, d


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
    if ckpt_dir and model not in OFFICIAL:
        raise SystemExit(f"unknown model '{model}'; choose one of {', '.join(OFFICIAL)}")
    if ckpt_dir and model == 'i2v-a14b' and not image:
        raise SystemExit('i2v-a14b generates from a first frame: pass --image=<path>')
    if image and model.startswith('t2v'):
        raise SystemExit(f'--image is for image-to-video models (i2v-a14b, ti2v-5b); {model} is text-to-video: '
                         f'drop --image or pick such a model')
    if solver not in ('unipc', 'euler'):
        raise SystemExit(f"unknown solver '{solver}'; choose unipc or euler")
    experts, t5, tok, codec, d = load_official(dev) if ckpt_dir else load_run(dev)
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
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if dev.type == 'cuda' else torch.autocast('cpu', enabled=False)

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
            clip = torch.cat([img[:, :, None], torch.zeros(1, 3, n_frames - 1, h, w)], dim=2)
            msk = torch.zeros(1, 4, (n_frames - 1) // 4 + 1, lat_h, lat_w)
            msk[:, :, 0] = 1  # frame 0 is given: its 4 "pixel frames" in the 4 mask channels
            y = torch.cat([msk.to(dev), codec.encode(clip.to(dev))], dim=1)
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
            with autocast:
                v_cond = dit(x, tt, cond, y, group=group)
                v_uncond = dit(x, tt, uncond, y, group=group)
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
