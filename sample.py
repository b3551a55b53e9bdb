"""Text-to-video sampling from a run of train_dit.py.

    python sample.py                                    # the default run out/dit, writes out/dit/sample.mp4
    python sample.py --prompt="a blue square moves up over ..." --guidance=4 --steps=30
"""
import os

import torch

from data import write_video
from models.checkpoint import load_state_dict
from models.settings import configure
from models.t5 import T5Encoder, Tokenizer, configs as t5_configs, encode
from models.vae import load_codec
from models.wan import WanModel

out_dir = 'out/dit'            # the run to load (its ckpt.pt and tokenizer.json)
prompt = 'a red circle moves right over a grey checkered floor'  # the caption to render
negative_prompt = ''           # the caption guidance steers away from
out = ''                       # mp4 path; '' = out_dir/sample.mp4
steps = 50                     # denoising steps
shift = 3.0                    # sigma = shift*s / (1 + (shift-1)*s) on the uniform grid; more = more time at high noise
guidance = 4.0                 # classifier-free guidance scale (1 = off)
seed = 0                       # seeds the initial noise
device = 'auto'                # auto = cuda when available, else cpu

cfg = configure(globals(), __file__)


def euler(dit, x, cond, uncond, steps, shift, guidance):
    """Euler steps of the flow ODE dx/dsigma = v from sigma = 1 to 0, with CFG over one batched forward."""
    sigmas = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    context = torch.cat([cond, uncond])
    for i in range(steps):
        t = (sigmas[i] * 1000).long().float().to(x.device)  # the model sees integer timesteps, as officially
        v_cond, v_uncond = dit(torch.cat([x, x]), t.expand(2 * x.shape[0]), context).chunk(2)
        v = v_uncond + guidance * (v_cond - v_uncond)
        x = x + (sigmas[i + 1] - sigmas[i]).item() * v
    return x


def main():
    dev = torch.device(('cuda' if torch.cuda.is_available() else 'cpu') if device == 'auto' else device)
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not os.path.exists(ckpt_path):
        raise SystemExit(f'{ckpt_path} does not exist: train first (python train_dit.py) or point --out_dir at a run')
    ckpt = torch.load(ckpt_path, map_location='cpu', weights_only=False)
    run = ckpt['config']
    dit = WanModel(**ckpt['arch'])
    load_state_dict(dit, ckpt['model'], ckpt_path)
    dit.to(dev).eval()
    t5 = T5Encoder(**t5_configs['debug'])
    load_state_dict(t5, ckpt['t5'], ckpt_path + ' (t5)')
    t5.to(dev).eval()
    tok = Tokenizer(os.path.join(out_dir, 'tokenizer.json'))
    codec = load_codec(run['vae'])

    torch.manual_seed(seed)
    T = (run['frames'] - 1) // codec.stride[0] + 1
    shape = (1, dit.out_dim, T, run['height'] // codec.stride[1], run['width'] // codec.stride[2])
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dev)
    autocast = torch.autocast('cuda', dtype=torch.bfloat16) if dev.type == 'cuda' else torch.autocast('cpu', enabled=False)
    with torch.no_grad(), autocast:
        ids, mask = tok([prompt, negative_prompt], dit.text_len)
        cond, uncond = encode(t5, ids.to(dev), mask.to(dev), dit.text_len).chunk(2)
        latents = euler(dit, noise, cond, uncond, steps, shift, guidance)
        video = codec.decode(latents.float()).clamp(-1, 1)
    path = out or os.path.join(out_dir, 'sample.mp4')
    write_video(path, video[0].cpu(), ckpt['fps'])
    print(f'wrote {path}: {video.shape[2]} frames of {video.shape[3]}x{video.shape[4]} at {ckpt["fps"]:g} fps')


if __name__ == '__main__':
    main()
