"""The cache of train_dit.py: the frozen models' outputs (latents, umT5 features, V-JEPA targets, saliency) of every
clip, computed once (--cache=build) and read back by the loader (--cache=use).

A cache folder holds one <manifest line>.pt per clip and meta.pt, written last, with the settings it was made with
(`provenance`): a run reads a cache only when every one of them matches its own.
"""
import datetime
import hashlib
import os

import torch

from models.checkpoint import read_torch

SALIENT = ('or', 'and', 'xor')  # the routes that weight pairs by the aligner's saliency


def default_folder(manifest):
    """cache-<manifest name> beside the manifest."""
    return os.path.join(os.path.dirname(os.path.abspath(manifest)),
                        'cache-' + os.path.splitext(os.path.basename(manifest))[0])


def file_id(path):
    """A model file as a cache records it: name, size and modification time (hashing many GiB of weights at every
    start would take minutes); a copy that keeps the times (cp -p, rsync -a) still matches."""
    if not path or not os.path.exists(path):
        return f'{path or "no file"} (missing)'
    st = os.stat(path)
    when = datetime.datetime.fromtimestamp(st.st_mtime, datetime.timezone.utc).isoformat()
    return f'{os.path.basename(path)} ({st.st_size} bytes, modified {when})'


def provenance(manifest, cfg, text_len, patch_size):
    """What a run's frozen outputs depend on, as readable values (the TRD keys only when the route aligns), from its
    settings cfg. The seed where it makes a random debug model; the window is always the centre one."""
    with open(manifest, 'rb') as fh:
        made = {'manifest': f'{os.path.basename(manifest)} (sha256 {hashlib.sha256(fh.read()).hexdigest()[:16]})'}
    made.update({k: cfg[k] for k in ('frames', 'height', 'width', 'frame_stride')}, window='centre', text_len=text_len)
    ckpt_dir, route, aligner = cfg['ckpt_dir'], cfg['route'], cfg['aligner_ckpt']
    if ckpt_dir:
        made['codec'] = '; '.join(file_id(os.path.join(ckpt_dir, n)) for n in ('Wan2.2_VAE.pth', 'Wan2.1_VAE.pth')
                                  if os.path.exists(os.path.join(ckpt_dir, n)))
        made['umT5'] = file_id(os.path.join(ckpt_dir, 'models_t5_umt5-xxl-enc-bf16.pth'))
        tok = os.path.join(ckpt_dir, 'google', 'umt5-xxl')
        made['tokenizer'] = file_id(next((os.path.join(tok, n) for n in ('tokenizer.json', 'spiece.model')
                                          if os.path.exists(os.path.join(tok, n))), tok))
    else:
        src = os.path.join(os.path.dirname(os.path.abspath(manifest)), 'tokenizer.json')
        made.update(codec='pixel', umT5=f"debug, seed {cfg['seed']}",
                    tokenizer=file_id(src) if os.path.exists(src) else 'built from the captions')
    if route != 'none':
        made.update(trd_pool=cfg['trd_pool'], patch_size=tuple(patch_size))
        made['V-JEPA'] = (f'the one of {file_id(aligner)}' if os.path.exists(aligner) else
                          f"debug, seed {cfg['seed']}" if cfg['vjepa_model'] == 'debug' else
                          f"{cfg['vjepa_model']}, {file_id(cfg['vjepa_ckpt'])}")
    if route in SALIENT:
        made['aligner'] = file_id(aligner)
    return made


def open_cache(folder, want, route, records):
    """A cache's meta.pt when it was made as `want` says and holds every clip of records, else one sentence naming
    the first difference."""
    path = os.path.join(folder, 'meta.pt')
    if not os.path.exists(path):
        raise SystemExit(f'{folder} holds no finished cache (no meta.pt): build it first, with the settings of this '
                         f'run and --cache=build')
    meta = read_torch(path, 'build it again with --cache=build')
    for key, value in want.items():
        if key not in meta['made']:
            raise SystemExit(f"{folder} holds no {'saliency' if key == 'aligner' else 'V-JEPA targets'} (it was built "
                             f"with route={meta['route']}): build it again with --route={route} --cache=build")
        if meta['made'][key] != value:
            made = meta['made'][key]
            raise SystemExit(f'{folder} was made with {key} = {made}, but this run has {value}: build it again with '
                             f'these settings and --cache=build (or pass another --cache_dir)')
    missing = next((r for r in records if not os.path.exists(entry_path(folder, r))), None)
    if missing is not None:
        raise SystemExit(f"{folder} has no entry for {missing['manifest']} line {missing['line']} "
                         f"({missing['video']}): its build did not finish; build it again with --cache=build")
    return meta


def entry_path(folder, rec):
    """One clip's cached outputs, named by its manifest line (the manifest's hash pins what each line is)."""
    return os.path.join(folder, f"{rec['line']:08d}.pt")


def read_entry(folder, rec):
    """The loader's stand-in for decoding a clip: its cached outputs {'x0', 'context'[, 'y'][, 'w']}."""
    return torch.load(entry_path(folder, rec), map_location='cpu', weights_only=True)


def pad_text(feats, text_len):
    """Trimmed umT5 features, one [n_i, dim] per clip -> [B, text_len, dim] with zeros past each caption (as encode)."""
    ctx = feats[0].new_zeros(len(feats), text_len, feats[0].shape[-1])
    for i, f in enumerate(feats):
        ctx[i, :len(f)] = f
    return ctx
