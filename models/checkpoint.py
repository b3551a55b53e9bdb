"""Checkpoint I/O: official and diffusers DiT folders, .pth files, strict loading with named reports, atomic saves.

Big models are built on the meta device, allocated straight at the target device and dtype, and filled one tensor
at a time (safetensors read lazily, .pth memory-mapped), so no full fp32 host copy of a 14B model is ever made.
"""
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from safetensors import safe_open
from safetensors.torch import save_file

from models.parallel import copy_full
from models.t5 import T5Encoder, Tokenizer, t5_config
from models.vae import WanVAE, vae_config
from models.wan import WanModel

# diffusers WanTransformer3DModel key -> official Wan DiT key (diffusers scripts/convert_wan_to_diffusers.py)
DIT_FROM_DIFFUSERS = [
    (r'^condition_embedder\.time_embedder\.linear_1\.', 'time_embedding.0.'),
    (r'^condition_embedder\.time_embedder\.linear_2\.', 'time_embedding.2.'),
    (r'^condition_embedder\.text_embedder\.linear_1\.', 'text_embedding.0.'),
    (r'^condition_embedder\.text_embedder\.linear_2\.', 'text_embedding.2.'),
    (r'^condition_embedder\.time_proj\.', 'time_projection.1.'),
    (r'\.norm2\.', '.norm3.'),  # before attn2 -> cross_attn, whose own norms are norm_q/norm_k
    (r'\.attn1\.to_([qkv])\.', r'.self_attn.\1.'),
    (r'\.attn1\.to_out\.0\.', '.self_attn.o.'),
    (r'\.attn1\.norm_', '.self_attn.norm_'),
    (r'\.attn2\.to_([qkv])\.', r'.cross_attn.\1.'),
    (r'\.attn2\.to_out\.0\.', '.cross_attn.o.'),
    (r'\.attn2\.norm_', '.cross_attn.norm_'),
    (r'\.ffn\.net\.0\.proj\.', '.ffn.0.'),
    (r'\.ffn\.net\.2\.', '.ffn.2.'),
    (r'^(blocks\.\d+)\.scale_shift_table$', r'\1.modulation'),
    (r'^proj_out\.', 'head.head.'),
    (r'^scale_shift_table$', 'head.modulation'),
]

WEIGHTS = 'diffusion_pytorch_model.safetensors'  # one file, or shards ...-0000N-of-0000M.safetensors + INDEX
INDEX = WEIGHTS + '.index.json'
# official config.json fields: WanModel's register_to_config minus its ignore_for_config
DIT_CONFIG = ('model_type', 'text_len', 'in_dim', 'dim', 'ffn_dim', 'freq_dim', 'out_dim', 'num_heads', 'num_layers',
              'eps')
# fields the official loader ignores and fixes at these values: we write them only when they differ (debug models)
DIT_FIXED = {'text_dim': 4096, 'patch_size': [1, 2, 2]}
# diffusers options that WanModel implements only at these values (image_dim etc.: the Wan2.1 CLIP image branch)
DIFFUSERS_FIXED = {'qk_norm': 'rms_norm_across_heads', 'cross_attn_norm': True, 'image_dim': None,
                   'added_kv_proj_dim': None, 'pos_embed_seq_len': None, 'rope_max_seq_len': 1024}
SAFETENSORS_DTYPES = {'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
                      'I64': torch.int64, 'I32': torch.int32, 'I8': torch.int8, 'U8': torch.uint8, 'BOOL': torch.bool}


# transformers UMT5EncoderModel key -> official umT5 key
T5_FROM_TRANSFORMERS = [
    (r'^shared\.', 'token_embedding.'),
    (r'^encoder\.final_layer_norm\.', 'norm.'),
    (r'^encoder\.block\.', 'blocks.'),
    (r'\.layer\.0\.layer_norm\.', '.norm1.'),
    (r'\.layer\.0\.SelfAttention\.relative_attention_bias\.', '.pos_embedding.embedding.'),
    (r'\.layer\.0\.SelfAttention\.', '.attn.'),
    (r'\.layer\.1\.layer_norm\.', '.norm2.'),
    (r'\.layer\.1\.DenseReluDense\.wi_0\.', '.ffn.gate.0.'),
    (r'\.layer\.1\.DenseReluDense\.wi_1\.', '.ffn.fc1.'),
    (r'\.layer\.1\.DenseReluDense\.wo\.', '.ffn.fc2.'),
]


def vae_from_diffusers(sd):
    """diffusers AutoencoderKLWan state dict -> official Wan VAE keys (the inverse of convert_vae / convert_vae_22)."""
    wan22 = any(k.startswith('encoder.down_blocks.0.resnets.') for k in sd)
    n = 1 + max(int(m[1]) for k in sd if (m := re.match(r'decoder\.up_blocks\.0\.resnets\.(\d+)\.', k)))
    flat = lambda stage, j: f'upsamples.{int(stage) * (n + 1) + int(j)}.'  # Wan2.1: n res blocks + 1 upsampler each
    return rename(sd, [  # in order; the resnet parts first, before conv1/conv2 are reused as names
        (r'\.norm1\.', '.residual.0.'), (r'\.conv1\.', '.residual.2.'), (r'\.norm2\.', '.residual.3.'),
        (r'\.conv2\.', '.residual.6.'), (r'\.conv_shortcut\.', '.shortcut.'),
        (r'^quant_conv\.', 'conv1.'), (r'^post_quant_conv\.', 'conv2.'), (r'\.conv_in\.', '.conv1.'),
        (r'\.norm_out\.', '.head.0.'), (r'\.conv_out\.', '.head.2.'), (r'mid_block\.resnets\.0\.', 'middle.0.'),
        (r'mid_block\.attentions\.0\.', 'middle.1.'), (r'mid_block\.resnets\.1\.', 'middle.2.'),
        (r'down_blocks\.(\d+)\.resnets\.', r'downsamples.\1.downsamples.'),  # Wan2.2 stages
        (r'down_blocks\.(\d+)\.downsampler\.', lambda m: f'downsamples.{m[1]}.downsamples.{n - 1}.'),
        (r'down_blocks\.', 'downsamples.'),  # Wan2.1: already flat
        (r'up_blocks\.(\d+)\.resnets\.(\d+)\.',
         r'upsamples.\1.upsamples.\2.' if wan22 else lambda m: flat(m[1], m[2])),
        (r'up_blocks\.(\d+)\.upsampler\.', lambda m: f'upsamples.{m[1]}.upsamples.{n}.'),
        (r'up_blocks\.(\d+)\.upsamplers\.0\.', lambda m: flat(m[1], n)),
    ])


def rename(sd, table):
    out = {}
    for key, value in sd.items():
        for pattern, repl in table:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def check_keys(model, shapes, source, strict=True):
    """Compare {key: shape} with the model's state dict, naming every missing, unexpected or mis-shaped key; refuse
    unless strict=False. Returns (problems, the keys that can be loaded)."""
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes = {k: tuple(s) for k, s in shapes.items()}
    missing = [k for k in own if k not in shapes]
    unexpected = [k for k in shapes if k not in own]
    mis = [f'{k} {shapes[k]} (model wants {own[k]})' for k in own if k in shapes and shapes[k] != own[k]]
    problems = [f'{len(v)} {name}: ' + ', '.join(v[:8]) + (' ...' if len(v) > 8 else '')
                for name, v in [('missing', missing), ('unexpected', unexpected), ('mis-shaped', mis)] if v]
    if problems and strict:
        raise ValueError(f'{source} does not match {type(model).__name__}: ' + '; '.join(problems) +
                         ' (wrong model or file? pass strict=False to load the matching keys anyway)')
    if problems:
        print(f'warning: loading {source} non-strictly: ' + '; '.join(problems))
    return problems, [k for k in own if shapes.get(k) == own[k]]


def load_state_dict(model, sd, source, strict=True):
    """Load an in-memory sd into model, named report as check_keys."""
    problems, ok = check_keys(model, {k: v.shape for k, v in sd.items()}, source, strict)
    model.load_state_dict({k: sd[k] for k in ok}, strict=False)
    return problems


def _need(path, fix):
    """One clear sentence instead of a traceback from deep inside a reader."""
    if not os.path.exists(path):
        raise FileNotFoundError(f'{path} not found: {fix}')
    return path


def _read_json(path, fix):
    with open(_need(path, fix)) as f:
        return json.load(f)


def _entries(path):
    """{key: (shape, dtype, load)} of a .safetensors file (header only) or a .pth file (memory-mapped)."""
    if path.endswith('.safetensors'):
        f = safe_open(path, framework='pt')
        return {k: (s.get_shape(), SAFETENSORS_DTYPES[s.get_dtype()], lambda k=k: f.get_tensor(k))
                for k in f.keys() for s in [f.get_slice(k)]}
    return {k: (v.shape, v.dtype, lambda v=v: v) for k, v in load_pth(path).items()}


def _materialise(model, entries, source, device, dtype, strict, prepare=None):
    """Fill model from entries {key: (shape, dtype, load)}: check names and shapes first, allocate the model at
    device/dtype (to_empty when it was built on meta), then copy one tensor at a time. prepare(model) runs on the
    meta model before allocation (FSDP sharding: each rank then allocates and keeps only its slices)."""
    _, ok = check_keys(model, {k: e[0] for k, e in entries.items()}, source, strict)
    if dtype is None:  # the file's own dtype
        found = {entries[k][1] for k in ok if entries[k][1].is_floating_point}
        if len(found) > 1:
            raise ValueError(f'{source} mixes dtypes {sorted(map(str, found))}; pass dtype= to pick one')
        dtype = found.pop() if found else None
    own = model.state_dict()
    meta = any(t.is_meta for t in own.values())
    lost = [n for n, _ in model.named_buffers() if n not in own]
    if meta and lost:
        raise ValueError(f'{type(model).__name__} has non-persistent buffers {lost} that no file fills and to_empty '
                         f'would leave uninitialised; build it on {device} instead of meta')
    if dtype is not None:
        model.to(dtype=dtype)  # on meta this only changes the recorded dtype: nothing is allocated yet
    if prepare is not None:
        model = prepare(model)
    model.to_empty(device=device) if meta else model.to(device)
    with torch.no_grad():
        own = model.state_dict()  # tensors sharing storage with the parameters (or their FSDP shards)
        for k in ok:
            copy_full(own[k], entries[k][2]())
        if meta:
            for k in own.keys() - set(ok):  # reachable only with strict=False: no garbage memory, zeros
                own[k].zero_()
    return model


def load_weights(model, path, device, dtype=None, strict=True):
    """Load a .pth or .safetensors state dict (official keys) into model, built on meta or not, at device and in the
    file's dtype unless dtype is given. For the umT5 encoder and the VAEs."""
    path = str(path)
    _need(path, 'pass an existing .pth or .safetensors file (the official ones sit at the checkpoint folder root)')
    return _materialise(model, _entries(path), path, device, dtype, strict)


def load_t5(path, device, dtype=None, prepare=None):
    """The umT5 encoder of models_t5_umt5-xxl-enc-bf16.pth (or a .safetensors copy), sized by the file's shapes."""
    return _from_file(lambda shapes: T5Encoder(**t5_config(shapes)), path, device, dtype, prepare)


def load_vae(path, device):
    """A Wan VAE from Wan2.1_VAE.pth / Wan2.2_VAE.pth, sized by the file's shapes; fp32, as officially."""
    return _from_file(lambda shapes: WanVAE(**vae_config(shapes)), path, device, torch.float32)


def load_text_and_vae(ckpt_dir, z_dim, t5_device, vae_device, prepare_t5=None):
    """The frozen umT5 encoder, its tokenizer and the VAE of an official checkpoint folder (the VAE whose latent
    width is z_dim when the folder holds both); prepare_t5 as in load_dit."""
    vaes = [n for n in ('Wan2.2_VAE.pth', 'Wan2.1_VAE.pth') if os.path.exists(os.path.join(ckpt_dir, n))]
    if not vaes:
        raise FileNotFoundError(f'{ckpt_dir} holds neither Wan2.2_VAE.pth nor Wan2.1_VAE.pth: pass the checkpoint '
                                f'folder that has the umT5 and VAE files')
    vae = vaes[0] if len(vaes) == 1 else 'Wan2.2_VAE.pth' if z_dim == 48 else 'Wan2.1_VAE.pth'
    return (load_t5(os.path.join(ckpt_dir, 'models_t5_umt5-xxl-enc-bf16.pth'), t5_device, prepare=prepare_t5),
            Tokenizer(os.path.join(ckpt_dir, 'google', 'umt5-xxl')), load_vae(os.path.join(ckpt_dir, vae), vae_device))


def _from_file(build, path, device, dtype, prepare=None):
    path = str(path)
    _need(path, 'pass an existing .pth or .safetensors file (the official ones sit at the checkpoint folder root)')
    entries = _entries(path)
    with torch.device('meta'):
        model = build({k: tuple(e[0]) for k, e in entries.items()})
    return _materialise(model.requires_grad_(False), entries, path, device, dtype, True, prepare).eval()


def load_pth(path):
    """A .pth state dict (models_t5_umt5-xxl-enc-bf16.pth, Wan2.1_VAE.pth, Wan2.2_VAE.pth), memory-mapped: a tensor
    is read from disk only when used."""
    _need(str(path), 'pass an existing .pth file (the official ones sit at the checkpoint folder root)')
    return torch.load(path, map_location='cpu', weights_only=True, mmap=True)


def pth_to_safetensors(src, dst):
    """Convert a .pth state dict once, keys and dtypes unchanged."""
    atomic_write(str(dst), lambda tmp: save_file({k: v.contiguous() for k, v in load_pth(src).items()}, tmp,
                                            metadata={'format': 'pt'}))


# ---------------------------------------------------------------------------------------------- the DiT

def dit_kwargs(cfg, source):
    """A DiT config.json -> (WanModel kwargs, key rename table or None)."""
    name = cfg.get('_class_name')
    if name == 'WanModel':  # absent fields take WanModel's defaults, as in the official from_pretrained
        return {k: cfg[k] for k in (*DIT_CONFIG, *DIT_FIXED) if k in cfg}, None
    if name != 'WanTransformer3DModel':
        raise ValueError(f'{source}/config.json has _class_name {name!r}; expected WanModel (official layout) '
                         'or WanTransformer3DModel (diffusers layout)')
    odd = {k: cfg[k] for k, v in DIFFUSERS_FIXED.items() if k in cfg and cfg[k] != v}
    if odd:
        raise ValueError(f'{source}/config.json asks for {odd}, which WanModel does not implement '
                         f'(it has {DIFFUSERS_FIXED})')
    try:
        i, o = cfg['in_channels'], cfg['out_channels']
        return dict(model_type='i2v' if i != o else 'ti2v' if i == 48 else 't2v',  # not stored; only recorded
                    patch_size=tuple(cfg['patch_size']), in_dim=i, out_dim=o, num_heads=cfg['num_attention_heads'],
                    dim=cfg['num_attention_heads'] * cfg['attention_head_dim'], ffn_dim=cfg['ffn_dim'],
                    freq_dim=cfg['freq_dim'], text_dim=cfg['text_dim'], num_layers=cfg['num_layers'],
                    eps=cfg['eps']), DIT_FROM_DIFFUSERS
    except KeyError as e:
        raise ValueError(f'{source}/config.json lacks the field {e}; re-download or re-save the folder') from None


def dit_files(folder):
    """The folder's safetensors files: the shards its index json lists, else the single file."""
    index = os.path.join(folder, INDEX)
    if os.path.exists(index):
        with open(index) as f:
            names = sorted(set(json.load(f)['weight_map'].values()))
        return [_need(os.path.join(folder, n), f'{INDEX} lists it; download the missing shard again') for n in names]
    return [_need(os.path.join(folder, WEIGHTS), f'the folder has neither {INDEX} (sharded) nor {WEIGHTS}; '
                  'download the DiT weights into it')]


def load_dit(folder, device, dtype=None, strict=True, prepare=None):
    """An official (`WanModel`) or diffusers (`WanTransformer3DModel`) DiT folder -> WanModel on device, in the
    file's dtype unless dtype is given. prepare(model) runs on the meta model before it is filled (FSDP sharding:
    each rank then holds only its slices; files are read one tensor at a time)."""
    folder = str(folder)
    _need(folder, 'pass the folder holding config.json and the DiT safetensors (for A14B see expert_folders)')
    kwargs, table = dit_kwargs(_read_json(os.path.join(folder, 'config.json'), 'a DiT folder holds config.json next to '
                                          'its safetensors; pass that folder (for A14B see expert_folders)'), folder)
    entries = {}
    for path in dit_files(folder):
        entries.update(_entries(path))
    with torch.device('meta'):
        model = WanModel(**kwargs)
    return _materialise(model, rename(entries, table) if table else entries, folder, device, dtype, strict, prepare)


def expert_folders(ckpt_dir):
    """A checkpoint's DiT folder(s): {'high', 'low'} for A14B (official or diffusers layout), {'single'} otherwise."""
    ckpt_dir = str(ckpt_dir)
    for high, low in [('high_noise_model', 'low_noise_model'), ('transformer', 'transformer_2')]:
        if os.path.isdir(os.path.join(ckpt_dir, high)) and os.path.isdir(os.path.join(ckpt_dir, low)):
            return {'high': os.path.join(ckpt_dir, high), 'low': os.path.join(ckpt_dir, low)}
    for single in [ckpt_dir, os.path.join(ckpt_dir, 'transformer')]:  # TI2V-5B / Wan2.1; its diffusers repo
        if os.path.exists(os.path.join(single, 'config.json')):
            return {'single': single}
    raise FileNotFoundError(f'{ckpt_dir} holds no DiT: expected config.json (TI2V-5B, Wan2.1), high_noise_model/ and '
                            'low_noise_model/ (A14B), or transformer/ [+ transformer_2/] (diffusers); '
                            'pass the downloaded checkpoint folder')


def export_dit(model, folder, dtype=None, max_shard_bytes=10 * 10**9, sd=None):
    """Write model as an official DiT folder that load_dit and the official code read: config.json and
    diffusion_pytorch_model.safetensors, sharded with an index json above max_shard_bytes. Written beside as
    folder.tmp and renamed, so folder is never half-written. sd: the full state dict when model is sharded."""
    m, folder = model, os.path.normpath(str(folder))
    other = [n for n in (os.listdir(folder) if os.path.isdir(folder) else [])
             if n != 'config.json' and not n.startswith('diffusion_pytorch_model')]
    if other:  # the folder is replaced whole: never take a user's other files with it
        raise ValueError(f"{folder} holds other files ({', '.join(sorted(other)[:4])}); export the DiT to a folder "
                         f"of its own")
    cfg = dict(_class_name='WanModel', model_type=m.model_type, text_len=m.text_len,
               in_dim=m.patch_embedding.in_channels, dim=m.patch_embedding.out_channels,
               ffn_dim=m.blocks[0].ffn[0].out_features, freq_dim=m.freq_dim, out_dim=m.out_dim, num_heads=m.num_heads,
               num_layers=len(m.blocks), eps=m.blocks[0].norm1.eps)
    extra = dict(text_dim=m.text_embedding[0].in_features, patch_size=list(m.patch_size))
    cfg.update({k: v for k, v in extra.items() if v != DIT_FIXED[k]})
    sd = model.state_dict() if sd is None else sd
    shards, size = [[]], 0  # greedy, in state-dict order, by size at the written dtype
    for k, v in sd.items():
        n = v.numel() * (dtype or v.dtype).itemsize
        if shards[-1] and size + n > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(k)
        size += n
    names = [WEIGHTS] if len(shards) == 1 else \
        [f'diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors' for i in range(len(shards))]
    tmp = folder + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted export
    os.makedirs(tmp)
    try:
        for name, keys in zip(names, shards):  # one shard at a time on the host
            save_file({k: sd[k].detach().to('cpu', dtype or sd[k].dtype).contiguous() for k in keys},
                      os.path.join(tmp, name), metadata={'format': 'pt'})
        if len(shards) > 1:
            total = sum(sd[k].numel() * (dtype or sd[k].dtype).itemsize for k in sd)
            weight_map = {k: name for name, keys in zip(names, shards) for k in keys}
            with open(os.path.join(tmp, INDEX), 'w') as f:
                json.dump({'metadata': {'total_size': total}, 'weight_map': weight_map}, f, indent=2)
        with open(os.path.join(tmp, 'config.json'), 'w') as f:
            json.dump(cfg, f, indent=2)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _replace_folder(tmp, folder)


def _replace_folder(tmp, folder):
    """Put the finished folder tmp in folder's place; a crash between the renames leaves the previous one whole at
    folder.old."""
    old = folder + '.old'
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(folder):
        os.rename(folder, old)
    os.rename(tmp, folder)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write(path, write):
    """write(tmp) then rename: an interrupted save never replaces a good file."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    write(path + '.tmp')
    os.replace(path + '.tmp', path)


def atomic_save(obj, path):
    """torch.save to a temporary name, then rename."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


# ---------------------------------------------------------------------------------------------- training runs

_SAVE_GROUP = []  # the process group of background saves, made once: their collectives must not meet training's


def save_sharded(folder, state, meta, background=False):
    """A resumable training checkpoint: `state` (nested dicts of possibly sharded tensors) written by every rank
    with torch.distributed.checkpoint, `meta` (small, the same on every rank) by rank 0 as meta.pt. Written as
    folder.tmp and renamed, so folder always holds a whole checkpoint. DCP reshards on load: any world size.
    Returns the function that finishes the save. background: the shards are staged in host memory and written by a
    thread (dcp.async_save) while training goes on; call the returned function before the next save."""
    tmp, first, single = folder + '.tmp', dist.get_rank() == 0, dist.get_world_size() == 1
    if first:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save
    dist.barrier()
    if background and not single and not _SAVE_GROUP:
        _SAVE_GROUP.append(dist.new_group(backend='gloo'))
    # one rank skips DCP's collectives, whose plan slowed every later fused AdamW step on the CPU
    if background:
        pending = dcp.async_save(state, checkpoint_id=tmp, no_dist=single, process_group=(_SAVE_GROUP or [None])[0])
    else:
        dcp.save(state, checkpoint_id=tmp, no_dist=single)

    def finish():
        if background:
            pending.result()
        dist.barrier()  # every rank's shards are on disk
        if first:
            torch.save(meta, os.path.join(tmp, 'meta.pt'))
            _replace_folder(tmp, folder)
        dist.barrier()
    return finish


def check_shared(folder, what):
    """Refuse, on every rank, a folder that is not the same one on all ranks (a node-local path): every rank writes
    its checkpoint shards there and rank 0 renames them, so each must see the others' files."""
    if dist.get_world_size() == 1:
        return
    os.makedirs(folder, exist_ok=True)
    token = [f'{os.getpid()}-{os.urandom(8).hex()}' if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)
    path = os.path.join(folder, f'.shared-{token[0]}')
    if dist.get_rank() == 0:
        open(path, 'w').close()
    dist.barrier()
    seen = torch.tensor([float(os.path.exists(path))])
    dist.all_reduce(seen, op=dist.ReduceOp.MIN)
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(path)
    if not seen.item():
        raise SystemExit(f'{what}={folder} is not one folder shared by every rank (some ranks do not see the files '
                         f'rank 0 writes there): put it on a file system that all nodes mount')


def run_checkpoints(folder):
    """The complete step checkpoints ckpt-<iter> of a run folder, oldest first (an interrupted save is a .tmp)."""
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return sorted(n for n in names if n.startswith('ckpt-') and n[5:].isdigit())


def link_latest(out_dir, name, keep_last):
    """out_dir/ckpt re-pointed at the checkpoint out_dir/<name> (atomically: ckpt is always a whole checkpoint),
    then all but the newest keep_last checkpoints removed (0 = keep all)."""
    link = os.path.join(out_dir, 'ckpt')
    if os.path.isdir(link) and not os.path.islink(link):  # a copy of the run made without links
        step = os.path.join(out_dir, f"ckpt-{run_meta(link)['iter']:06d}")
        shutil.rmtree(link) if os.path.exists(step) else os.rename(link, step)
    os.symlink(name, link + '.link')
    os.replace(link + '.link', link)
    for old in run_checkpoints(out_dir)[:-keep_last] if keep_last > 0 else []:
        if old != name:
            shutil.rmtree(os.path.join(out_dir, old), ignore_errors=True)


UNREADABLE = ('it was not written completely or is damaged: resume from another checkpoint of the run '
              '(--resume_ckpt=ckpt-<iter>) or train again')


def read_torch(path, fix):
    """torch.load of one of our own files, or one sentence naming it and the fix."""
    try:
        return torch.load(path, map_location='cpu', weights_only=False)
    except Exception as err:  # a truncated or damaged file fails deep inside the unpickler
        raise SystemExit(f'{path} cannot be read ({type(err).__name__}: {err}); {fix}') from None


def run_meta(folder):
    """meta.pt of a run's checkpoint folder (out_dir/ckpt), or one sentence saying what is wrong."""
    path = os.path.join(folder, 'meta.pt')
    if not os.path.exists(path):
        raise SystemExit(f'{folder} is not a finished checkpoint (no meta.pt): train first (python train_dit.py) or '
                         f'point at a run folder')
    return read_torch(path, UNREADABLE)


def read_sharded(state, folder):
    """dcp.load into state (each rank its slices), or one sentence naming the checkpoint that cannot be read."""
    try:
        dcp.load(state, checkpoint_id=folder, no_dist=not dist.is_initialized())
    except (Exception, CheckpointException) as err:  # DCP wraps reader failures (not in Exception): name the folder
        if isinstance(err, CheckpointException):  # the first rank's own failure says more
            err = next(iter(err.failures.values()))[0]  # (exception, traceback) pairs by rank
        why = f'{type(err).__name__}: {err}'.splitlines()[0][:200]
        raise SystemExit(f'{folder} cannot be read ({why}); {UNREADABLE}') from None


def load_ckpt_dit(folder, device='cpu', ema=True):
    """The consolidated DiT of a train_dit.py checkpoint folder (out_dir/ckpt), at any world size, with its meta:
    its EMA weights when the run kept them and `ema`, else the trained weights."""
    meta = run_meta(folder)
    with torch.device('meta'):  # no random init of weights that the checkpoint overwrites
        dit = WanModel(**meta['arch'])
    dit.to_empty(device='cpu')
    sd = {f'dit.{k}': v for k, v in dit.state_dict().items()}
    read_sharded({'ema' if ema and meta['config'].get('ema_decay') else 'model': sd}, folder)
    return dit.to(device), meta


def load_dit_run(run_dir, device='cpu', ema=True, t5_device=None):
    """A train_dit.py run folder -> (DiT in eval mode, umT5, tokenizer, codec, meta of run_dir/ckpt): the official
    folder's umT5 and VAE when it trained with ckpt_dir, else its debug umT5 (saved in the checkpoint), its tokenizer
    and the pixel codec."""
    from models.t5 import configs as t5_configs
    from models.vae import load_codec
    ckpt_path = os.path.join(run_dir, 'ckpt')
    if not os.path.isdir(ckpt_path):
        raise SystemExit(f'{ckpt_path} does not exist: train first (python train_dit.py) or point at a run folder')
    dit, meta = load_ckpt_dit(ckpt_path, ema=ema)
    t5_device = t5_device or device
    if meta['config']['ckpt_dir']:
        t5, tok, codec = load_text_and_vae(meta['config']['ckpt_dir'], dit.out_dim, t5_device, device)
    else:
        t5 = T5Encoder(**t5_configs['debug'])
        load_state_dict(t5, meta['t5'], ckpt_path + '/meta.pt (t5)')
        t5, tok, codec = t5.to(t5_device).eval(), Tokenizer(os.path.join(run_dir, 'tokenizer.json')), load_codec('pixel')
    return dit.to(device).eval().requires_grad_(False), t5, tok, codec, meta
