"""Speed and memory in one table: our DiT against diffusers' WanTransformer3DModel with the same weights, inputs and
dtype; MFU against the bf16 matmul peak measured in the same run; TRD against a naive N x N loss; one sampling step,
plain and with sample.py's sampling-time alignment options (AlignVid, entropy-adaptive AlignVid, refocusing); and a
per-GPU memory planner (torch's FSDP2 memory tracker under a fake process group, no GPU needed).

    python bench.py                                      # small shapes on the CPU
    python bench.py --model=ti2v-5b --frames=121 --height=704 --width=1280 --blocks=10      # one GPU
    python bench.py --plan=True --model=t2v-a14b --frames=81 --height=720 --width=1280 --world=8 --sp=4
    python bench.py --plan=True --measure=True --model=debug --blocks=2 --world=1  # estimate, then run it for real
    python bench.py --check=True --out=gpu_check       # the project's GPU check on one GPU: one summary table

Model FLOPs are counted from the blocks' matmuls (see dit_flops); MFU = model FLOPs / step time / peak, where the
peak is a big bf16 matmul timed here (on the CPU: fp32, the dtype the CPU runs). Recomputation under activation
checkpointing is not counted as model FLOPs (the usual MFU convention), so checkpointing lowers MFU.
"""
import contextlib
import gc
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from torch.distributed.device_mesh import init_device_mesh

from models.optim import dit_flops
from models.settings import choice, configure, run
from models.steering import Refocus, box_tokens, cross_attentions, scaled
from models.trd import trd_loss
from models.unipc import UniPC
from models.wan import WanModel, configs as wan_configs, cpu_bf16, flash_attn_func, rope_table, token_grid as dit_grid

model = choice('debug', *(k for k in wan_configs if k != 'debug'))  # DiT config, a key of models/wan.py configs
blocks = 0                     # use only the first N blocks (0 = all): real models whose whole DiT does not fit
frames = 9                     # pixel frames (1 + 4k); with height/width they give the latent grid via the codec stride
height = 64                    # pixel height (a multiple of the codec stride x 2)
width = 64                     # pixel width
tokens = 0                     # > 0: use this many DiT tokens per clip instead of frames/height/width
batch_size = 1                 # clips per step
checkpointing = choice('auto', 'on', 'off')  # recompute each DiT block in backward: auto = on with CUDA
warmup = 1                     # untimed iterations before each measurement
iters = 3                      # timed iterations (the median is reported)
diffusers = True               # also time diffusers' WanTransformer3DModel (skipped, with a note, when not installed)
trd_tokens = 0                 # TRD tokens N per clip (0 = the DiT's tokens without latent frame 0, at least 2048)
trd_dim = 1024                 # TRD feature width D (V-JEPA ViT-L 1024, ViT-g 1408)
trd_block = 256                # TRD row-block size
naive_max = 32768              # run the naive N x N TRD only up to this N (it holds several N x N fp32 matrices)
matmul_size = 8192             # side of the square matmul timed for the peak (CPU: capped at 2048)
plan = False                   # memory planner: estimate the per-GPU peak of a training step instead of timing
world = 8                      # planner: GPUs (FSDP2 shards parameters, gradients and AdamW states over all of them)
sp = 1                         # planner: sequence-parallel ranks per clip (each rank holds tokens / sp)
optimizer = True               # planner: AdamW (two fp32 states per parameter) as the trainer
ema = True                     # planner: the trainer's fp32 EMA of the DiT (sharded like it)
encoders = choice('online', 'cached')  # planner: the frozen encoders resident (online) or none (cached)
route = 'or'                   # planner: train_dit.py's TRD route (none = no V-JEPA, no projector)
vjepa_model = 'vitg'           # planner: V-JEPA variant resident with a route (models/vjepa.py configs)
amp = choice('auto', 'on', 'off')  # bf16 autocast on fp32 weights: auto = as the trainer
amp_cache = False              # planner: autocast's cache of bf16 weight casts (off as in train_dit.py)
measure = False                # planner: also run the same config for real at world 1 and print measured vs estimated
device = 'auto'                # auto = cuda when available, else cpu
seed = 0                       # seeds weights and inputs
check = False                  # the GPU check: this bench at the TI2V-5B shape, then a toy run, resume, export, samples
out = 'gpu_check'              # check: the folder of its runs, logs and summary.txt

cfg = configure(globals(), __file__, None if __name__ == '__main__' else [])  # imported (tests): the defaults

GIB = 2 ** 30
GPUS = {'80 GB (A100/H100)': 79.6 * GIB, '141 GB (H200)': 139.8 * GIB}  # what the driver reports as total
RESERVED = 4 * GIB   # CUDA context, NCCL buffers, allocator fragmentation: not tracked; kept free in 'fits'
STRIDE = {'ti2v': (4, 16, 16), 'debug': (4, 2, 2)}            # codec stride; the other models: Wan2.1 VAE (4, 8, 8)


# ---------------------------------------------------------------------------------------------- shapes and FLOPs

def arch_of(name, n_blocks=0):
    arch = dict(wan_configs[name])
    if n_blocks:
        arch['num_layers'] = min(n_blocks, arch['num_layers'])
    return arch


def factor_grid(n):
    """A (f, h, w) grid with f*h*w = n, every side <= 1024 (the RoPE tables), as close to a cube as divisors allow."""
    best = None
    for f in range(1, min(n, 1024) + 1):
        if n % f:
            continue
        m = n // f
        for h in range(1, min(m, 1024) + 1):
            if m % h == 0 and m // h <= 1024:
                sides = (f, h, m // h)
                score = max(sides) / min(sides)
                if best is None or score < best[0]:
                    best = (score, sides)
    if best is None:
        raise SystemExit(f'tokens={n} has no (f, h, w) grid with sides <= 1024')
    return best[1]


def rank_grid(name, n_tokens=0, n_frames=9, h=64, w=64, sp_=1):
    """The DiT token grid (f, h, w) of one clip, for this rank's 1/sp of the tokens (padded up to a multiple of sp)."""
    if n_tokens:
        return factor_grid(-(-n_tokens // sp_))
    st = STRIDE.get(wan_configs[name]['model_type'] if name != 'debug' else 'debug', (4, 8, 8))
    if (n_frames - 1) % st[0] or h % (2 * st[1]) or w % (2 * st[2]):
        raise SystemExit(f'frames={n_frames}, height={h}, width={w}: need frames = 1 + {st[0]}k and height/width '
                         f'multiples of {2 * st[1]} for {name}')
    grid = dit_grid(n_frames, h, w, st)
    return grid if sp_ == 1 else factor_grid(-(-math.prod(grid) // sp_))


# ---------------------------------------------------------------------------------------------- timing helpers

def sync(dev):
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)


def once(fn, dev):
    """Seconds of one call of fn (CUDA events on a GPU, perf_counter on the CPU)."""
    sync(dev)
    if dev.type == 'cuda':
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(dev)
        return start.elapsed_time(end) / 1000
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def timed(*fns, dev, n_warm=None, n=None):
    """Median seconds per call of each fn after warmup. Several fns are interleaved call by call, so that a machine
    whose load changes (a shared CPU) slows them alike and their ratio stays fair."""
    n_warm, n = warmup if n_warm is None else n_warm, iters if n is None else n
    for _ in range(n_warm):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(max(1, n)):
        for fn, ts in zip(fns, times):
            ts.append(once(fn, dev))
    out = [sorted(ts)[len(ts) // 2] for ts in times]
    return out if len(fns) > 1 else out[0]


def cpu_peak(fn):
    """Peak of the running sum of CPU allocator events (bytes) while fn runs, from the profiler's raw events: the
    allocator's own record, independent of any tensor bookkeeping of ours. Tensors alive before fn are not counted."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == '[memory]')
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def peak_bytes(fn, dev):
    """Peak bytes allocated while fn runs, above what was allocated before it."""
    gc.collect()
    if dev.type == 'cuda':
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        sync(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    return cpu_peak(fn)


def matmul_peak(dev, bf16):
    """Measured dense matmul rate (FLOP/s) in the step's matmul dtype: bf16 under autocast, else fp32."""
    n = matmul_size if dev.type == 'cuda' else min(matmul_size, 2048)
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    reps = 20 if dev.type == 'cuda' else 2
    s = timed(lambda: a @ b, dev=dev, n_warm=2, n=reps)
    return 2 * n ** 3 / s, f'{"bf16" if dtype == torch.bfloat16 else "fp32"} {n}x{n} matmul'


def attention_backends():
    ours = 'SDPA (CPU bf16: matmul, fp32 softmax, matmul up to 2**24 probabilities)'
    if flash_attn_func is not None:
        ours = {'flash_attn_interface': 'flash-attn 3', 'flash_attn': 'flash-attn 2'}.get(
            flash_attn_func.__module__.split('.')[0], flash_attn_func.__module__) + ' (CUDA bf16), else SDPA'
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
        theirs = str(_AttentionBackendRegistry.get_active_backend()[0].value)
        theirs = 'SDPA (native)' if theirs == 'native' else theirs
    except Exception:
        theirs = '-'
    return ours, theirs


# ---------------------------------------------------------------------------------------------- the models

def diffusers_twin(ours, arch, dev):
    """diffusers' WanTransformer3DModel of the same shape with our weights copied in (the parity tests' key map)."""
    from diffusers import WanTransformer3DModel
    from models.checkpoint import DIT_FROM_DIFFUSERS, rename
    with torch.device(dev):
        ref = WanTransformer3DModel(num_attention_heads=arch['num_heads'],
                                    attention_head_dim=arch['dim'] // arch['num_heads'],
                                    in_channels=arch['in_dim'], out_channels=arch['out_dim'],
                                    text_dim=arch.get('text_dim', 4096), freq_dim=256, ffn_dim=arch['ffn_dim'],
                                    num_layers=arch['num_layers'], eps=1e-6)
    theirs = ref.state_dict()
    mine = ours.state_dict()
    names = rename({k: k for k in theirs}, DIT_FROM_DIFFUSERS)  # our name -> diffusers name
    ref.load_state_dict({names[k]: v for k, v in mine.items()}, strict=True)
    return ref


def inputs(arch, grid, dev, B):
    g = torch.Generator(dev).manual_seed(seed)
    f, h, w = grid
    x = torch.randn(B, arch['in_dim'], f, 2 * h, 2 * w, generator=g, device=dev)
    ctx = torch.randn(B, arch.get('text_len', 512), arch.get('text_dim', 4096), generator=g, device=dev)
    ctx[:, 20:] = 0  # a zero-padded caption
    t = torch.full((B,), 500.0, device=dev)
    target = torch.randn(B, arch['out_dim'], f, 2 * h, 2 * w, generator=g, device=dev)
    return x, t, ctx, target


# ---------------------------------------------------------------------------------------------- memory planner

def ckpt_overcount(arch, grid, B, parts, ckpt):
    """What the tracker may over-count with per-block checkpointing: it keeps one [B, tokens, dim] fp32 tensor per
    block alive through the backward that the allocator has freed. It only matters when the peak is in the backward
    (a Temp share at the peak)."""
    if not ckpt:
        return 0
    return min(parts.get('Temp', 0), arch['num_layers'] * B * math.prod(grid) * arch['dim'] * 4)


def meta_params(build, prefixes=('',)):
    """Parameters of a model built on the meta device, those whose names start with one of prefixes."""
    with torch.device('meta'):
        return sum(p.numel() for n, p in build().named_parameters() if n.startswith(prefixes))


def frozen_models(arch):
    """The frozen models train_dit.py keeps resident when it runs them online, {name: (build, bytes per parameter,
    sharded)}: a toy run's debug umT5 and V-JEPA, or umT5-XXL, the VAE encoder (its decoder never reaches the GPU)
    and V-JEPA. A Stage 1 aligner whose umT5 is the DiT's file shares it."""
    from models.t5 import T5Encoder, configs as t5_configs
    from models.vae import WanVAE, configs as vae_configs
    from models.vjepa import VJEPA, configs as vjepa_configs

    def vae_encoder():
        vae = WanVAE(**vae_configs['wan2.2' if arch['out_dim'] == 48 else 'wan2.1'])
        vae.decoder = vae.conv2 = None
        return vae
    if encoders == 'cached':
        return {}
    debug = model == 'debug'
    out = {'debug umT5 (fp32)': (lambda: T5Encoder(**t5_configs['debug']), 4, False)} if debug else {
        'umT5-XXL (bf16, sharded)': (lambda: T5Encoder(**t5_configs['umt5-xxl']), 2, True),
        'VAE encoder (fp32, replicated)': (vae_encoder, 4, False)}
    if route != 'none':
        v = 'debug' if debug else vjepa_model
        out[f'V-JEPA {v} (fp32, sharded)'] = (lambda: VJEPA(**vjepa_configs[v]), 4, True)
    return out


def encoder_bytes(arch, n_world):
    """What train_dit.py keeps resident beside the DiT's own state, analytic (the tracker does not run them), per
    GPU: the EMA, the frozen models and the projector."""
    from models.vjepa import configs as vjepa_configs
    out = {'EMA of the DiT (fp32, sharded)': param_count(arch) * 4 / n_world} if ema else {}
    for name, (build, nbytes, sharded) in frozen_models(arch).items():
        with torch.device('meta'):
            out[name] = sum(p.numel() for p in build().parameters()) * nbytes / (n_world if sharded else 1)
    if route != 'none':
        D = vjepa_configs['debug' if model == 'debug' else vjepa_model]['dim']
        n_proj = arch['dim'] * 2048 + 2048 * 2048 + 2048 * D + 2 * 2048 + D  # proj_dim 2048, as train_dit.py
        out['projector (fp32 + grads + AdamW, sharded)'] = n_proj * 16 / n_world
    return out


def build_step(arch, grid, dev, B, amp, ckpt, use_opt, mesh):
    """Model (FSDP2 over mesh), optimizer, inputs and one training step, as train_dit.py runs it."""
    from torch.distributed.fsdp import fully_shard
    torch.manual_seed(seed)
    with torch.device(dev):
        dit = WanModel(**arch)
    dit.train().checkpointing = ckpt
    for blk in dit.blocks:
        fully_shard(blk, mesh=mesh)
    fully_shard(dit, mesh=mesh)
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-5, betas=(0.9, 0.99), foreach=False) if use_opt else None
    x, t, ctx, target = inputs(arch, grid, dev, B)
    autocast = (torch.autocast(dev.type, dtype=torch.bfloat16, cache_enabled=amp_cache) if amp
                else contextlib.nullcontext())

    def step():
        with autocast:
            loss = F.mse_loss(dit(x, t, ctx), target)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            dit.zero_grad(set_to_none=True)
    return dit, opt, (x, t, ctx, target), step


def plan_dit(arch, grid, n_world, B, amp, ckpt, use_opt, n_iter=2, fake=True):
    """Per-rank peak bytes of n_iter training steps, from FSDPMemTracker under FakeTensorMode and a fake process
    group of n_world ranks (this process is rank 0). Returns (peak bytes, {category: bytes at the peak})."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.testing._internal.distributed.fake_pg import FakeStore
    was = dist.is_initialized()
    if not was:
        dist.init_process_group('fake', store=FakeStore(), rank=0, world_size=n_world)
    try:
        mesh = init_device_mesh('cpu', (n_world,))  # outside fake mode: the mesh reads its rank table
        with FakeTensorMode() if fake else contextlib.nullcontext():  # fake=False: real tensors, same tracker
            dit, opt, batch, step = build_step(arch, grid, torch.device('cpu'), B, amp, ckpt, use_opt, mesh)
            tracker = FSDPMemTracker(dit, opt)
            tracker.track_inputs(batch)
            with tracker:
                for _ in range(n_iter):
                    step()
                    tracker.reset_mod_stats()  # per-module stats only; the peak is kept
            snap = next(iter(tracker.get_tracker_snapshot('peak').values()))
    finally:
        rope_table.cache_clear()  # it cached fake tensors
        if not was:
            dist.destroy_process_group()
    return snap['Total'], {getattr(k, 'value', k): v for k, v in snap.items() if k != 'Total' and v}


def measure_dit(arch, grid, dev, B, amp, ckpt, use_opt, n_iter=2, resident=False):
    """The same steps for real in a 1-rank group (gloo on the CPU, nccl on a GPU): peak bytes allocated, counted from
    an empty allocator (CUDA: max_memory_allocated; CPU: the profiler's allocator events over build + steps).
    resident: also the EMA and the frozen models, built for real beside the DiT."""
    import torch.distributed as dist
    was = dist.is_initialized()
    if not was:
        dist.init_process_group('nccl' if dev.type == 'cuda' else 'gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh(dev.type, (1,))

        def go():
            dit, opt, batch, step = build_step(arch, grid, dev, B, amp, ckpt, use_opt, mesh)
            kept = [p.detach().clone() for p in dit.parameters()] if resident and ema else []
            kept += [build().to(dev, torch.bfloat16 if nbytes == 2 else torch.float32)
                     for build, nbytes, _ in frozen_models(arch).values()] if resident else []
            for _ in range(n_iter):
                step()
        return peak_bytes(go, dev)
    finally:
        rope_table.cache_clear()
        if not was:
            dist.destroy_process_group()


def fmt_rate(r):
    return f'{r / 1e12:.1f} TFLOP/s' if r >= 1e12 else f'{r / 1e9:.1f} GFLOP/s'


def fmt_gib(b):
    return f'{b / GIB:.2f} GiB' if b >= GIB else f'{b / 2 ** 20:.1f} MiB'


def check_layout(arch):
    """Refuse a world / sp split that cannot run."""
    if world < 1 or sp < 1 or world % sp:
        raise SystemExit(f'sp={sp} must divide world={world}')
    if arch['num_heads'] % sp:
        raise SystemExit(f"sp={sp} does not divide the {arch['num_heads']} heads of {model}")


def param_count(arch):
    with torch.device('meta'):
        return sum(p.numel() for p in WanModel(**arch).parameters())


def plan_header(arch, full, grid, ckpt, use_amp):
    """The planned configuration in one line."""
    n_params = param_count(arch)
    part = f' ({arch["num_layers"]} blocks)' if blocks else ''
    size = f'{n_params / 1e9:.2f}B' if n_params > 1e8 else f'{n_params / 1e6:.2f}M'
    return (f'memory plan: {model}{part}, {size} params, '
            f'{math.prod(full):,} tokens per clip, batch {batch_size}, world {world}, '
            f'sp {sp} (this rank: {math.prod(grid):,} tokens), checkpointing {"on" if ckpt else "off"}, '
            f'{"AdamW" if optimizer else "no optimizer"}, {"bf16 autocast" if use_amp else "fp32"}, '
            f'encoders {encoders}{f", route {route}" if encoders == "online" else ""}')


def print_plan(peak, parts, enc, over, seconds):
    """The tracked peak by category, the analytic encoder terms, their total and whether it fits each GPU."""
    total = peak + sum(enc.values())
    print(f'  DiT training step (FSDPMemTracker, fake {world}-rank group, FakeTensorMode, {seconds:.0f} s): '
          f'peak {fmt_gib(peak)} = ' + ', '.join(f'{k} {fmt_gib(v)}' for k, v in parts.items()))
    for k, v in enc.items():
        print(f'  + {k}: {fmt_gib(v)} (analytic: weights only)')
    print(f'  estimated peak per GPU: {fmt_gib(total)}; untracked: CUDA context, NCCL buffers, allocator '
          f'fragmentation ({fmt_gib(RESERVED)} kept free below), the encoders\' transient activations (they run '
          f'under no_grad before the DiT forward)')
    if over:
        print(f'  the peak is in the backward, where with checkpointing the tracker may over-count up to '
              f'{fmt_gib(over)} (one [tokens, dim] fp32 tensor per block, see ckpt_overcount): the peak lies in '
              f'[{fmt_gib(total - over)}, {fmt_gib(total)}]; "fits" below uses the upper end')
    for name, cap in GPUS.items():
        print(f'  {name}: {"fits" if total + RESERVED <= cap else "does NOT fit"}')


def main_plan(dev):
    arch = arch_of(model, blocks)
    check_layout(arch)
    ckpt = checkpointing != 'off'  # the planner plans for GPUs: auto = on, as the trainer
    full = rank_grid(model, tokens, frames, height, width)
    grid = rank_grid(model, math.prod(full) if sp > 1 else tokens, frames, height, width, sp)
    use_amp = amp == 'on' or (amp == 'auto' and (not measure or dev.type == 'cuda' or cpu_bf16()))
    t0 = time.time()
    peak, parts = plan_dit(arch, grid, world, batch_size, use_amp, ckpt, optimizer)
    seconds, enc = time.time() - t0, encoder_bytes(arch, world)
    print(plan_header(arch, full, grid, ckpt, use_amp))
    print_plan(peak, parts, enc, ckpt_overcount(arch, grid, batch_size, parts, ckpt), seconds)
    if measure:
        if world != 1 or sp != 1:
            raise SystemExit('measure=True runs the config for real in one process: use --world=1 --sp=1')
        real = measure_dit(arch, grid, dev, batch_size, use_amp, ckpt, optimizer)
        print(f'  measured on {dev.type} (1-rank {"nccl" if dev.type == "cuda" else "gloo"} group, same steps): '
              f'peak {fmt_gib(real)}; tracker estimate / measured = {peak / real:.3f}')
        real = measure_dit(arch, grid, dev, batch_size, use_amp, ckpt, optimizer, resident=True)
        est = peak + sum(v for k, v in enc.items() if not k.startswith('projector'))  # the projector is not built
        print(f'  with the EMA and the frozen models built beside it: peak {fmt_gib(real)}; planner estimate / '
              f'measured = {est / real:.3f}')
    return peak, peak + sum(enc.values())


# ---------------------------------------------------------------------------------------------- the benchmark

def bench_dit(arch, dev, ckpt):
    """Our DiT with the official init, in train mode."""
    torch.manual_seed(seed)
    with torch.device(dev):
        dit = WanModel(**arch)
    dit.init_weights()
    with torch.no_grad():  # the official init zeroes the head: give every weight a value so every path is exercised
        dit.head.head.weight.normal_(0, 0.02)
    dit.train().checkpointing = ckpt
    return dit


def reference(dit, arch, dev, ckpt):
    """diffusers' twin of dit in train mode, or (None, a note saying why there is none)."""
    if not diffusers:
        return None, ''
    try:
        ref = diffusers_twin(dit, arch, dev).train()
        if ckpt:
            ref.enable_gradient_checkpointing()
        return ref, ''
    except Exception as err:  # not installed, or a version that cannot build it: our rows still come out
        return None, f'diffusers reference skipped ({type(err).__name__}: {str(err)[:80]})'


def fwd_bwd(m, call, target, autocast):
    """One call: forward (call(m)), MSE to target, backward, gradients dropped."""
    def go():
        with autocast:
            loss = F.mse_loss(call(m), target)
        loss.backward()
        m.zero_grad(set_to_none=True)
    return go


def weight_bytes(m):
    return sum(p.numel() * p.element_size() for p in m.parameters())


def time_dit(dit, arch, batch, dev, ckpt, autocast):
    """Forward + backward of our DiT and its diffusers twin: median seconds (interleaved call by call), peak memory
    with the weights, and the outputs' max relative difference. The twin's entries are None without it."""
    x, t, ctx, target = batch
    ours_call = lambda m: m(x, t, ctx)
    ref_call = lambda m: m(x, t, ctx, return_dict=False)[0]
    ours = fwd_bwd(dit, ours_call, target, autocast)
    ref, note = reference(dit, arch, dev, ckpt)
    s_ref = mem_ref = err = None
    if ref is not None:
        try:
            s_ours, s_ref = timed(ours, fwd_bwd(ref, ref_call, target, autocast), dev=dev)
        except Exception as e:
            note, ref = f'diffusers reference failed ({type(e).__name__}: {str(e)[:80]})', None
            dit.zero_grad(set_to_none=True)
    if s_ref is None:
        s_ours = timed(ours, dev=dev)
    mem_ours = peak_bytes(ours, dev) + weight_bytes(dit)  # the weights were allocated before
    with torch.no_grad(), autocast:
        out_ours = dit(x, t, ctx).float()
        if ref is not None:
            out_ref = ref_call(ref).float()
            err = ((out_ours - out_ref).abs().max() / out_ref.abs().max()).item()
            del out_ref
    if ref is not None:
        mem_ref = peak_bytes(fwd_bwd(ref, ref_call, target, autocast), dev) + weight_bytes(ref)
    return dict(s_ours=s_ours, s_ref=s_ref, mem_ours=mem_ours, mem_ref=mem_ref, err=err, note=note)


def import_sample():
    """sample.py as a module; it reads its settings from the command line when imported, so it is given none."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import sample
    finally:
        sys.argv = argv
    return sample


def refocus_layout(grid, dev):
    """Two nouns with boxes and one verb bound to the first, as a layout file gives them."""
    box = lambda x0: box_tokens({0: [x0, 0.2, x0 + 0.4, 0.8]}, grid, 4).to(dev)  # 4 pixel frames a latent frame
    return dict(idx=torch.tensor([1, 2, 3, 5, 6]), grid=grid, nouns=[([0, 1], box(0.1)), ([3, 4], box(0.5))],
                verbs=[([2], 0)])


def time_sampling(dit, batch, grid, dev, autocast):
    """Median seconds of one sampling step (a classifier-free guidance pair and a UniPC update), plain and with
    sample.py's sampling-time alignment options: AlignVid, entropy-adaptive AlignVid, refocusing."""
    x, t, ctx, _ = batch
    sample, every = import_sample(), list(range(len(dit.blocks)))
    refocus = Refocus(refocus_layout(grid, dev), every, sample.refocus_t, sample.refocus_verb_t, sample.refocus_iters,
                      sample.refocus_step, sample.refocus_tau, sample.refocus_verb_weight)  # sample.py's settings

    def plain():
        solver = UniPC(50, 5.0)
        with torch.no_grad(), autocast:
            v_c, v_u = dit(x, t, ctx), dit(x, t, torch.zeros_like(ctx))
            return solver.step(v_u + 5.0 * (v_c - v_u), x)

    def aligned(adaptive):  # AlignVid, alpha 1.35 on every block
        def go():
            with scaled(cross_attentions(dit, every), 1.35, adaptive):
                plain()
        return go

    def refocused():  # sample.refocus_iters latent gradient steps through all the blocks, t = 950 in its windows
        with autocast:
            refocus.refocus(dit, x, t, ctx, None, 950, 0.95, torch.ones_like(x))
        plain()
    return timed(plain, aligned(False), aligned(True), refocused, dev=dev)


def naive_trd(z, y, w, margin=0.1):
    """The N x N reference: both Grams, the OR weights and the loss materialised (autograd keeps them)."""
    zn, yn = F.normalize(z, dim=-1), F.normalize(y, dim=-1)
    W = w[:, None] + w[None, :] - w[:, None] * w[None, :]
    l = torch.relu((zn @ zn.T - yn @ yn.T).abs() - margin)
    return (W * l).sum() / W.sum()


def trd_inputs(grid, dev):
    """Features z (needing gradients), targets y and saliency weights w of trd_tokens tokens (0: as the trainer)."""
    f0, h0, w0 = grid
    N = trd_tokens or max(2048, max(1, f0 - 1) * h0 * w0)
    g = torch.Generator(dev).manual_seed(seed)
    z = torch.randn(N, trd_dim, generator=g, device=dev, requires_grad=True)
    y = 0.5 * z.detach() + torch.randn(N, trd_dim, generator=g, device=dev)
    w = torch.rand(N, generator=g, device=dev)
    return z, y, w


def time_trd(grid, dev):
    """Blocked TRD (models/trd.py) against the naive N x N loss, forward + backward in fp32 as the trainer runs it:
    median seconds, peak memory and both losses. The naive entries are None above naive_max."""
    z, y, w = trd_inputs(grid, dev)

    def blocked():
        trd_loss(z[None], y[None], w[None], route='or', block=trd_block).backward()
        z.grad = None

    def naive():
        naive_trd(z, y, w).backward()
        z.grad = None
    with torch.no_grad():
        lb, ln = trd_loss(z[None], y[None], w[None], route='or', block=trd_block).item(), naive_trd(z, y, w).item()
    s_naive = m_naive = None
    if len(z) <= naive_max:
        s_trd, s_naive = timed(blocked, naive, dev=dev)
        m_naive = peak_bytes(naive, dev)
    else:
        s_trd = timed(blocked, dev=dev)
    return dict(N=len(z), s=s_trd, s_naive=s_naive, mem=peak_bytes(blocked, dev), mem_naive=m_naive, loss=lb,
                loss_naive=ln)


def ms(s):
    return f'{1000 * s:,.1f} ms'


def dit_rows(r, flops, peak, peak_what):
    """Table rows (what, ours, reference, note) of the DiT step."""
    s, s_ref, mem, mem_ref, err = r['s_ours'], r['s_ref'], r['mem_ours'], r['mem_ref'], r['err']
    return [('DiT forward+backward (reference: diffusers)', ms(s), ms(s_ref) if s_ref else '-',
             f'{s_ref / s:.2f}x (diffusers / ours)' if s_ref else r['note']),
            ('  model FLOPs per step', f'{flops:.3g}', f'{flops:.3g}', 'blocks\' matmuls x 3 (dit_flops)'),
            ('  achieved', fmt_rate(flops / s), fmt_rate(flops / s_ref) if s_ref else '-', ''),
            (f'  MFU (peak {fmt_rate(peak)}, {peak_what})', f'{flops / s / peak:.1%}',
             f'{flops / s_ref / peak:.1%}' if s_ref else '-', 'measured in this run'),
            ('  peak memory (weights + grads + activations)', fmt_gib(mem), fmt_gib(mem_ref) if mem_ref else '-',
             f'{mem_ref / mem:.2f}x' if mem_ref else ''),
            ('  output max rel difference', '', f'{err:.1e}' if err is not None else '-', 'same weights and inputs'),
            ('attention backend', *attention_backends(), '')]


def trd_rows(r):
    """Table rows of the TRD loss."""
    s, s_naive, mem, mem_naive = r['s'], r['s_naive'], r['mem'], r['mem_naive']
    return [(f'TRD fwd+bwd, N={r["N"]:,}, D={trd_dim} (reference: naive N x N)', ms(s),
             ms(s_naive) if s_naive else 'skipped (N > naive_max)', f'{s_naive / s:.2f}x (naive / ours)' if s_naive
             else ''),
            ('  TRD peak memory', fmt_gib(mem), fmt_gib(mem_naive) if mem_naive else '-',
             f'{mem_naive / mem:.1f}x; loss {r["loss"]:.6f} vs {r["loss_naive"]:.6f}' if mem_naive else '')]


def sampling_rows(s_plain, s_align, s_adapt, s_refocus):
    """Table rows of the sampling step, plain and with each sampling-time option."""
    extra = lambda s: f'{s / s_plain - 1:+.0%} over the plain step'
    return [('sampling step (cfg pair + UniPC update)', ms(s_plain), '-', 'ours only'),
            ('  with AlignVid (alpha 1.35, all blocks)', ms(s_align), '-', extra(s_align)),
            ('  with AlignVid, entropy-adaptive', ms(s_adapt), '-', extra(s_adapt)),
            (f'  with refocusing ({import_sample().refocus_iters} iterations, 2 nouns + 1 verb)', ms(s_refocus), '-',
             extra(s_refocus))]


def print_table(rows):
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows + [('', 'ours')])
    w3 = max(len(r[2]) for r in rows + [('', '', 'reference')])
    print(f'| {"":<{w1}} | {"ours":>{w2}} | {"reference":>{w3}} | note')
    for r in rows:
        print(f'| {r[0]:<{w1}} | {r[1]:>{w2}} | {r[2]:>{w3}} | {r[3]}')


def print_planner_beside(arch, grid, ckpt, measured):
    """The planner's estimate of the step just measured (our DiT, one GPU, no optimizer) beside its measured peak."""
    est, parts = plan_dit(arch, grid, 1, batch_size, True, ckpt, False)
    over = ckpt_overcount(arch, grid, batch_size, parts, ckpt)
    print(f'planner estimate for this step (ours, world 1, no optimizer): {fmt_gib(est)}'
          + (f' (>= {fmt_gib(est - over)} without the checkpoint over-count)' if over else '') +
          f' vs measured {fmt_gib(measured)} (estimate / measured = {est / measured:.2f}); at the estimate\'s '
          f'peak: ' + ', '.join(f'{k} {fmt_gib(v)}' for k, v in parts.items()))


def main_bench(dev):
    arch = arch_of(model, blocks)
    grid = rank_grid(model, tokens, frames, height, width)
    ckpt = checkpointing == 'on' or (checkpointing == 'auto' and dev.type == 'cuda')
    gpu = dev.type == 'cuda'
    use_amp = amp == 'on' or (amp == 'auto' and (gpu or cpu_bf16()))  # as the trainer
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp)
    print(f'bench: {model}, {arch["num_layers"]} of {wan_configs[model]["num_layers"]} blocks, grid {grid} = '
          f'{math.prod(grid):,} tokens, batch {batch_size}, '
          f'{dev.type}{f" ({torch.cuda.get_device_name(dev)})" if gpu else ""}, '
          f'{"bf16 autocast on fp32 weights" if use_amp else "fp32"}, checkpointing {"on" if ckpt else "off"}, '
          f'torch {torch.__version__}', flush=True)
    peak, peak_what = matmul_peak(dev, use_amp)
    dit = bench_dit(arch, dev, ckpt)
    batch = inputs(arch, grid, dev, batch_size)
    dit_r = time_dit(dit, arch, batch, dev, ckpt, autocast)
    sampling = time_sampling(dit, batch, grid, dev, autocast)
    gc.collect()
    trd_r = time_trd(grid, dev)
    flops = dit_flops(arch, math.prod(grid), batch_size)
    print_table(dit_rows(dit_r, flops, peak, peak_what) + trd_rows(trd_r) + sampling_rows(*sampling))
    if gpu:
        del dit
        gc.collect()
        print_planner_beside(arch, grid, ckpt, dit_r['mem_ours'])


# ---------------------------------------------------------------------------------------------- the GPU check

def step(name, args, log):
    """One command of the check, its output appended to log: (name, ok, seconds, output)."""
    import subprocess
    t0 = time.time()
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True)
    with open(log, 'a') as f:
        f.write(f'$ python {" ".join(args)}\n{r.stdout}{r.stderr}\n')
    return name, r.returncode == 0, time.time() - t0, r.stdout + r.stderr


def last(pattern, text, default='-'):
    """The last match of pattern's group 1 in text."""
    import re
    found = re.findall(pattern, text)
    return found[-1] if found else default


# what the summary takes from each step's output: {label: regex of the value}
CHECK_NUMBERS = {
    'bench': {'DiT fwd+bwd': r'DiT forward\+backward[^|]*\|\s*([\d.,]+ ms)',
              'against diffusers': r'([\d.]+x) \(diffusers / ours\)', 'MFU': r'MFU[^|]*\|\s*([\d.]+%)',
              'peak': r'peak memory \(weights[^|]*\|\s*([\d.]+ [GM]iB)',
              'planner/measured': r'estimate / measured = ([\d.]+)'},
    'train': {'loss': r'loss ([\d.]+)', 'step': r'([\d.]+ ms/iter)', 'peak': r'peak (?:mem|RSS) ([\d.]+ GiB)'},
    'sample': {'': r'wrote (.*?):'},
}


def check_runs(dev, folder):
    """The check's commands: on CUDA the TI2V-5B shape and a toy run of about 10k tokens per clip; elsewhere the
    same steps at toy sizes (a dry run of the check itself)."""
    gpu = dev.type == 'cuda'
    shape = (['--model=ti2v-5b', '--blocks=2', '--frames=121', '--height=704', '--width=1280'] if gpu else
             ['--model=debug', '--blocks=2', '--iters=1', '--naive_max=0'])
    toy = (['--frames=17', '--height=176', '--width=176', '--batch_size=2'] if gpu else
           ['--frames=9', '--height=16', '--width=16', '--batch_size=2', '--proj_dim=64'])
    run_dir, log = os.path.join(folder, 'run'), os.path.join(folder, 'log.txt')
    n = 10 if gpu else 2  # iterations between checkpoints
    train = ['train_dit.py', *toy, '--route=uniform', "--aligner_ckpt=", f'--log_interval={n}', f'--out_dir={run_dir}']
    sample = ['sample.py', f'--out_dir={run_dir}', '--steps=10' if gpu else '--steps=2']
    torchrun = ['-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=1']
    return log, [('bench (DiT fwd+bwd against diffusers)', ['bench.py', *shape]),
                 ('train (FSDP2, TRD, EMA, checkpoint)', [*train, f'--max_iters={2 * n}', f'--ckpt_interval={n}']),
                 ('resume and export', [*train, f'--max_iters={3 * n}', '--init_from=resume',
                                        f'--export_dir={os.path.join(folder, "export")}']),
                 ('sample (python)', [*sample, f'--out={folder}/python.mp4']),
                 ('sample (torchrun, 1 process)', [*torchrun, *sample, f'--out={folder}/torchrun.mp4'])]


def main_check(dev):
    """Every step of the check in order, then one table: what ran, whether it passed, its time and its numbers."""
    os.makedirs(out, exist_ok=True)
    log, steps = check_runs(dev, out)
    rows = []
    for name, args in steps:
        name, ok, seconds, text = step(name, args, log)
        kind = 'bench' if name.startswith('bench') else 'train' if name.startswith(('train', 'resume')) else 'sample'
        what = ', '.join(f'{k} {last(p, text)}' for k, p in CHECK_NUMBERS[kind].items())
        rows.append((name, 'ok' if ok else 'FAILED', f'{seconds:.0f} s', what))
    videos = [os.path.join(out, f'{k}.mp4') for k in ('python', 'torchrun')]
    if all(os.path.exists(v) for v in videos):  # the mp4 writer is deterministic: equal frames, equal bytes
        same = open(videos[0], 'rb').read() == open(videos[1], 'rb').read()
        rows.append(('python and torchrun videos equal', 'ok' if same else 'FAILED', '-', 'byte for byte'))
    table = [f'GPU check on {torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"}, '
             f'torch {torch.__version__}; commands and output: {log}'] + \
            [f'  {n:<36} {s:<7} {t:>6}  {w}' for n, s, t, w in rows]
    print('\n'.join(table))
    with open(os.path.join(out, 'summary.txt'), 'w') as f:
        f.write('\n'.join(table) + '\n')
    if any(r[1] != 'ok' for r in rows):
        raise SystemExit(f'the GPU check failed: see {log}')


def main():
    from models.parallel import pick_device
    dev = pick_device(device)
    if dev.type == 'cuda':
        torch.cuda.set_device(dev)
    t0 = time.time()
    main_check(dev) if check else main_plan(dev) if plan else main_bench(dev)
    print(f'bench.py took {time.time() - t0:.0f} s')


if __name__ == '__main__':
    run(main)
