"""Checkpoint I/O: strict loading with named reports, the diffusers key map, atomic saves."""
import os
import re

import torch

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


def rename(sd, table):
    out = {}
    for key, value in sd.items():
        for pattern, repl in table:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def load_state_dict(model, sd, source, strict=True):
    """Load sd into model, naming every missing, unexpected or mis-shaped key; refuse unless strict=False."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f'{k} {tuple(sd[k].shape)} (model wants {tuple(own[k].shape)})'
              for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = [f'{len(v)} {name}: ' + ', '.join(v[:8]) + (' ...' if len(v) > 8 else '')
                for name, v in [('missing', missing), ('unexpected', unexpected), ('mis-shaped', shapes)] if v]
    if problems and strict:
        raise ValueError(f'{source} does not match {type(model).__name__}: ' + '; '.join(problems) +
                         ' (wrong model or file? pass strict=False to load the matching keys anyway)')
    if problems:
        print(f'warning: loading {source} non-strictly: ' + '; '.join(problems))
    model.load_state_dict({k: v for k, v in sd.items() if k in own and v.shape == own[k].shape}, strict=False)
    return problems


def atomic_save(obj, path):
    """torch.save to a temporary name, then rename: an interrupted save never replaces a good checkpoint."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    tmp = path + '.tmp'
    torch.save(obj, tmp)
    os.replace(tmp, path)
