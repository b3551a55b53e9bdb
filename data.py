"""
Video-clip data: a JSONL manifest reader, a clip decoder (decord), a synthetic
"moving shapes" dataset for smoke tests and small runs, and a resumable,
rank-sharded loader. Manifest lines look like:
{"video": "clips/0001.mp4", "caption": "...", "entities": [{"caption": "a red cube",
 "mask": "masks/0001_cube.npz"}], "background": "a grey floor", "text_embedding": "emb/0001.npy"}
Paths are relative to the manifest's folder; masks are npz files holding `mask` [T, H, W].
"""
import contextlib
import json
import os
import shutil
import zipfile
from fractions import Fraction

import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# manifest

def _where(rec):
    return f"{rec.get('manifest', '<record>')} line {rec.get('line', '?')}"

def _probe(rec, min_frames):
    """Open the video and read mask headers; raise the same ValueErrors load_clip would."""
    n = len(_open_video(rec))
    if n < min_frames:
        raise ValueError(f"{_where(rec)}: video {rec['video']} has {n} frames, fewer than the {min_frames} "
                         f"needed (lower --frames/--stride, or pass --skip_bad=True)")
    for e in rec['entities']:
        _load_mask(rec, e['mask'], n, header_only=True)

def _parse_line(line, folder):
    d = json.loads(line)  # JSONDecodeError is a ValueError: reported with the line number below
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    for key in ('video', 'caption'):
        if key not in d:
            raise ValueError(f"missing required key '{key}' (add it to the record)")
    def path(p, what):
        full = os.path.normpath(os.path.join(folder, p))
        if not os.path.isfile(full):
            raise ValueError(f"{what} {p} not found (fix the path or pass --skip_bad=True)")
        return full
    rec = dict(d, video=path(d['video'], 'video'), background=d.get('background') or '')
    rec['entities'] = []
    for i, e in enumerate(d.get('entities') or []):
        if not isinstance(e, dict) or 'caption' not in e or 'mask' not in e:
            raise ValueError(f"entity {i} needs keys 'caption' and 'mask' (fix the record or pass --skip_bad=True)")
        rec['entities'].append(dict(caption=e['caption'], mask=path(e['mask'], 'mask')))
    if d.get('text_embedding'):
        rec['text_embedding'] = path(d['text_embedding'], 'text_embedding')
    return rec

def read_manifest(path, skip_bad=False, min_frames=None):
    """Parse a JSONL manifest into records with absolute paths plus 'manifest' and 'line'
    (1-based) so later errors can point at the source line. With min_frames set, every clip
    is also probed (video opens, has >= min_frames frames, masks match its frame count)."""
    path = str(path)
    folder = os.path.dirname(os.path.abspath(path))
    recs, bad, total = [], [], 0
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            total += 1
            try:
                rec = dict(_parse_line(line, folder), manifest=path, line=lineno)
                if min_frames is not None:
                    _probe(rec, min_frames)  # its messages already start with "<path> line <n>:"
                recs.append(rec)
                continue
            except json.JSONDecodeError as err:  # a ValueError subclass: must come first
                msg = f"{path} line {lineno}: malformed JSON ({err.msg} at column {err.colno}) (fix the line or pass --skip_bad=True)"
            except ValueError as err:
                msg = str(err) if str(err).startswith(f"{path} line {lineno}:") else f"{path} line {lineno}: {err}"
            if not skip_bad:
                raise ValueError(msg)
            bad.append(msg[len(path) + 1:])
    if bad:
        print(f"skipped {len(bad)} of {total} clips in {path}: " + "; ".join(bad))
    if not recs:
        raise ValueError(f"{path}: no usable clips (add records or fix the ones reported above)")
    return recs

# -----------------------------------------------------------------------------
# decoding one clip

@contextlib.contextmanager
def _native_stderr_to(path):
    """The process's stderr (file descriptor 2, where libav and decord log) sent to path for a while."""
    saved, sink = os.dup(2), os.open(path, os.O_WRONLY)
    try:
        os.dup2(sink, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved), os.close(sink)

def _open_video(rec):
    import decord  # lazy: keeps `import data` cheap for tools that only write videos
    try:
        with _native_stderr_to(os.devnull):  # a bad file's libav lines: the sentence below says it once
            return decord.VideoReader(rec['video'], ctx=decord.cpu(0))
    except Exception as err:  # decord raises a bare RuntimeError (DECORDError) on bad files
        raise ValueError(f"{_where(rec)}: video {rec['video']} could not be decoded "
                         f"({str(err).splitlines()[0][:200]}) (re-encode or remove it, or pass --skip_bad=True)") from None

def video_fps(rec):
    """The frame rate of a record's video, or the sentence naming its manifest line when it cannot be read."""
    return _open_video(rec).get_avg_fps()

def _load_mask(rec, path, n, header_only=False):
    """Mask array [T, H, W] from an npz (or just its shape: reading the .npy header inside
    the zip lets probing skip decompression); checks T against the video's n frames."""
    try:
        if header_only:
            with zipfile.ZipFile(path) as z, z.open('mask.npy') as f:
                major, _ = np.lib.format.read_magic(f)
                read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
                m, shape = None, read(f)[0]
        else:
            m = np.load(path)['mask']
            shape = m.shape
    except (OSError, KeyError, IndexError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{_where(rec)}: mask {path} is not an npz with key 'mask' ({err}) "
                         f"(re-save it with np.savez_compressed(path, mask=m), or pass --skip_bad=True)") from None
    if len(shape) != 3:
        raise ValueError(f"{_where(rec)}: mask {path} has shape {tuple(shape)}, expected [T, H, W] "
                         f"(re-export it with one [H, W] plane per video frame, or pass --skip_bad=True)")
    if shape[0] != n:
        raise ValueError(f"{_where(rec)}: mask {path} has {shape[0]} frames but video {rec['video']} has {n} "
                         f"(re-export the mask with one frame per video frame, or pass --skip_bad=True)")
    return m

def resize_crop(x, height, width):
    """[..., h, w] -> [..., height, width]: scale so the short side covers, centre crop. Bilinear with antialias
    averages over the footprint when shrinking, so binary masks become soft coverage fractions and thin shapes do
    not alias away. The one resize of the project: clips, masks, V-JEPA inputs and aligner targets all use it."""
    h, w = x.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    if (nh, nw) != (h, w):
        c = x.shape[-3] if x.dim() >= 3 else 1  # channels stay together (uint8 video resizes as [T, 3, h, w])
        x = F.interpolate(x.reshape(-1, c, h, w), size=(nh, nw), mode='bilinear', antialias=True,
                          align_corners=False).reshape(*x.shape[:-2], nh, nw)
    top, left = (nh - height) // 2, (nw - width) // 2
    return x[..., top:top + height, left:left + width]

def decode_clip(rec, height, width, idx=None, vr=None, chunk=32):
    """Frames idx (None = all) of a record, resized and centre-cropped: uint8 [T, 3, height, width]. Decoded `chunk`
    frames at a time, so a whole long clip never sits in memory at its source size."""
    vr = vr or _open_video(rec)
    idx = list(range(len(vr))) if idx is None else idx
    parts = []
    for i in range(0, len(idx), chunk):
        try:
            x = torch.from_numpy(vr.get_batch(idx[i:i + chunk]).asnumpy())  # [t, h, w, 3] uint8
        except Exception as err:
            raise ValueError(f"{_where(rec)}: video {rec['video']} failed to decode frames {idx[0]}..{idx[-1]} "
                             f"({str(err).splitlines()[0][:200]}) (re-encode or remove it, or pass --skip_bad=True)") from None
        parts.append(resize_crop(x.permute(0, 3, 1, 2), height, width))  # resize in uint8: 4x less memory than float
    return torch.cat(parts)

def normalise(video):
    """uint8 frames -> float in [-1, 1], on whatever device they are (the trainers normalise on the GPU)."""
    return (video.float() / 127.5 - 1).clamp(-1, 1)

def load_clip(rec, frames, height, width, stride=1, start=0, masks=True, decoded=None, uint8=False):
    """Decode frames start, start+stride, ... (`frames` of them) of one manifest record.
    `start` may also be a callable max_start -> start (the loader draws offsets that way,
    once the clip length is known). Returns video [3,T,H,W] in [-1,1], masks [K,T,H,W] in [0,1] (one per entity,
    in manifest order: an entity is a caption and its mask, so the counts always agree), the captions, `where`
    (manifest and line, for messages) and `text_embedding` ([E] float32, or None when the record has none).
    masks=False skips the masks (None): a trainer that does not read them saves their decompression, which costs
    more than decoding the video. decoded: the record's decode_clip(rec,
    height, width), whose frames are then taken instead of decoding. uint8: the video as uint8 [3,T,H,W] for
    normalise() on the device (a quarter of the bytes to copy)."""
    vr = _open_video(rec) if decoded is None else None
    n = len(vr) if decoded is None else len(decoded)
    if callable(start):
        start = start(max(n - (frames - 1) * stride - 1, 0))
    need = start + (frames - 1) * stride + 1
    if n < need:
        raise ValueError(f"{_where(rec)}: video {rec['video']} has {n} frames, fewer than the {need} needed "
                         f"for frames={frames} stride={stride} start={start} (lower --frames/--stride, or pass --skip_bad=True)")
    idx = list(range(start, need, stride))
    x = decode_clip(rec, height, width, idx, vr) if decoded is None else decoded[idx]
    video = (x if uint8 else normalise(x)).permute(1, 0, 2, 3).contiguous()
    planes = None
    if masks:
        planes = []
        for e in rec['entities']:
            m = _load_mask(rec, e['mask'], n)[idx].astype(np.float32)
            m = torch.from_numpy(m)[:, None]  # one entity at a time bounds memory
            planes.append(resize_crop(m, height, width)[:, 0].clamp(0, 1))
        planes = torch.stack(planes) if planes else torch.zeros(0, frames, height, width)
    return dict(video=video, masks=planes, caption=rec['caption'], background=rec['background'],
                entity_captions=[e['caption'] for e in rec['entities']], where=_where(rec),
                text_embedding=_load_embedding(rec) if rec.get('text_embedding') else None)

def _load_embedding(rec):
    """The record's precomputed caption embedding: an .npy holding [E] (or [1, E]) -> float32 tensor [E]."""
    path = rec['text_embedding']
    try:
        e = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{_where(rec)}: text_embedding {path} could not be read ({err}) "
                         f"(re-save it with np.save(path, e), or pass --skip_bad=True)") from None
    if not isinstance(e, np.ndarray) or e.ndim not in (1, 2) or (e.ndim == 2 and e.shape[0] != 1) or e.size == 0:
        raise ValueError(f"{_where(rec)}: text_embedding {path} holds {getattr(e, 'shape', type(e).__name__)}, "
                         f"expected one vector [E] (re-save it with np.save(path, e) for a 1-D e)")
    return torch.from_numpy(e.astype(np.float32).reshape(-1))

# -----------------------------------------------------------------------------
# writing videos

def _yuv420(rgb):
    """uint8 [H, W, 3], even sides -> the yuv420p planes [H * 3 / 2, W] (BT.601 limited range as swscale's default,
    chroma from 2x2 means). Done here because swscale's rounding depended on the buffer address and its threads:
    the same video written twice could differ by a few levels."""
    x = rgb.astype(np.float32)
    H, W = rgb.shape[:2]
    c = x.reshape(H // 2, 2, W // 2, 2, 3).mean((1, 3))
    mix = lambda v, a, b, d, off: np.clip(np.rint(off + a * v[..., 0] + b * v[..., 1] + d * v[..., 2]), 0, 255)
    planes = [mix(x, 0.256788, 0.504129, 0.097906, 16), mix(c, -0.148223, -0.290993, 0.439216, 128),
              mix(c, 0.439216, -0.367788, -0.071427, 128)]
    return np.concatenate([p.ravel() for p in planes]).astype(np.uint8).reshape(H * 3 // 2, W)

def _encode(path, frames, fps):
    """frames: uint8 [T, H, W, 3]. Writes to a temp name, then renames, so a crash never
    leaves a truncated mp4 under the final name. The official writer's quality: imageio's
    quality=8 is libx264 crf int(51 * 0.2) = 10 with no preset given, i.e. x264's medium."""
    import av
    frames = np.pad(frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), mode='edge')  # yuv420p needs even sides
    tmp = f"{path}.tmp{os.getpid()}"
    with av.open(tmp, 'w', format='mp4') as c:
        s = c.add_stream('libx264', rate=Fraction(fps).limit_denominator(1001))
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], 'yuv420p'
        s.options = {'crf': '10', 'preset': 'medium', 'threads': '1'}  # x264's threads: pixels varied with timing
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(_yuv420(f), format='yuv420p')))
        c.mux(s.encode())
    os.replace(tmp, path)

def write_video(path, video, fps):
    """video: tensor [3, T, H, W] in [-1, 1] -> mp4 (libx264, yuv420p)."""
    # truncate, not round, to uint8 with the official op order (make_grid's (x + 1) / 2, then * 255)
    x = ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2 * 255).to(torch.uint8)
    _encode(path, x.permute(1, 2, 3, 0).numpy(), fps)

# -----------------------------------------------------------------------------
# synthetic dataset: coloured shapes moving in straight lines over a grey texture

COLOURS = dict(red=(220, 40, 40), green=(40, 170, 60), blue=(40, 90, 230),
               yellow=(235, 210, 40), purple=(150, 60, 200), orange=(245, 140, 30))
MOVES = dict(left=(-1, 0), right=(1, 0), up=(0, -1), down=(0, 1))
SHAPES = ('circle', 'square', 'triangle')

def _background(rng, size):
    yy, xx = np.mgrid[:size, :size]
    tone, lo = [('dark', 60), ('light', 140)][rng.integers(2)]
    lo = lo + rng.integers(0, 30)
    cell = max(2, int(size * rng.uniform(0.12, 0.25)))  # a texture cell spans a DiT token or more at 32 px
    kind = rng.choice(['checkered floor', 'striped wall', 'speckled floor'])
    if kind == 'checkered floor':
        pat = ((yy // cell + xx // cell) % 2).astype(np.float32)
    elif kind == 'striped wall':
        pat = ((yy if rng.integers(2) else xx) // cell % 2).astype(np.float32)
    else:
        k = max(2, size // cell)
        pat = rng.random((k, k)).astype(np.float32)[yy * k // size, xx * k // size]
    img = (lo + pat * rng.uniform(12, 24)).round().astype(np.uint8)
    return np.repeat(img[..., None], 3, -1), f"a {tone} grey {kind}"

def _render(rng, frames, size):
    """-> (video uint8 [T,S,S,3], visible masks [K,T,S,S] uint8, entity captions, motions, bg caption)"""
    bg, bg_caption = _background(rng, size)
    c = np.arange(size) + 0.5  # pixel centres, so masks are exactly the painted pixels
    t = np.linspace(0, 1, frames)[:, None, None]
    k = rng.integers(1, 3)
    colours = rng.choice(list(COLOURS), k, replace=False)  # distinct colours keep captions unambiguous
    video = np.broadcast_to(bg, (frames, size, size, 3)).copy()
    inside, ents, moves = [], [], []
    for colour in colours:
        shape, move = rng.choice(SHAPES), rng.choice(list(MOVES))
        r = rng.uniform(0.14, 0.22) * size  # 9-14 px wide at 32 px: 2-4 DiT tokens
        room = size - 2 * r
        travel = rng.uniform(0.4, 0.9) * room  # straight line that stays inside the frame: caption stays true
        along = r + rng.uniform(0, room - travel) + travel * t
        dx, dy = MOVES[move]
        if dx + dy < 0:
            along = size - along
        across = rng.uniform(r, size - r)
        cx, cy = (along, across) if dx else (across, along)
        X, Y = c[None, None, :] - cx, c[None, :, None] - cy
        if shape == 'circle':
            m = X ** 2 + Y ** 2 <= r ** 2
        elif shape == 'square':
            m = (np.abs(X) <= r * 0.85) & (np.abs(Y) <= r * 0.85)
        else:  # upward triangle: apex at (0, -r), base at y = +r
            m = (Y <= r) & (np.abs(X) <= (Y + r) / 2)
        video[m] = COLOURS[colour]
        inside.append(m)
        ents.append(f"{'an' if colour[0] in 'aeiou' else 'a'} {colour} {shape}")
        moves.append(move)
    covered, masks = np.zeros_like(inside[0]), [None] * k
    for i in reversed(range(k)):  # later shapes are drawn on top: a shape only owns what stays visible
        masks[i] = (inside[i] & ~covered).astype(np.uint8)
        covered |= inside[i]
    return video, np.stack(masks), ents, moves, bg_caption

def make_shapes(root, n_train=256, n_val=16, frames=33, size=128, fps=8, seed=0):
    """Render a deterministic toy dataset into root (train.jsonl, val.jsonl, clips/, masks/,
    tokenizer.json, meta.json). train.jsonl is written last: its presence means 'complete'."""
    from models.t5 import build_tokenizer
    assert size % 2 == 0, "size must be even for yuv420p"
    os.makedirs(os.path.join(root, 'clips'), exist_ok=True)
    os.makedirs(os.path.join(root, 'masks'), exist_ok=True)
    done = os.path.join(root, 'train.jsonl')
    if os.path.exists(done):
        os.remove(done)  # a re-render that gets interrupted must not look finished
    lines, texts = [], []
    for i in range(n_train + n_val):
        rng = np.random.default_rng([seed, i])  # per-clip stream: clip i is the same whatever n_train is
        video, masks, ents, moves, bg = _render(rng, frames, size)
        parts = [f"{e} moves {m}" for e, m in zip(ents, moves)]  # "a, b and c over <background>"
        caption = (", ".join(parts[:-1]) + " and " if len(parts) > 1 else "") + parts[-1] + f" over {bg}"
        rec = dict(video=f"clips/{i:04d}.mp4", caption=caption, entities=[], background=bg)
        _encode(os.path.join(root, rec['video']), video, fps)
        for j, (e, m) in enumerate(zip(ents, masks)):
            rec['entities'].append(dict(caption=e, mask=f"masks/{i:04d}_{j}.npz"))
            np.savez_compressed(os.path.join(root, rec['entities'][-1]['mask']), mask=m)
        lines.append(json.dumps(rec))
        texts += [rec['caption'], bg] + ents
    build_tokenizer(list(dict.fromkeys(texts)), os.path.join(root, 'tokenizer.json'))
    with open(os.path.join(root, 'meta.json'), 'w') as f:
        json.dump(dict(fps=fps, frames=frames, size=size, n_train=n_train, n_val=n_val, seed=seed), f)
    for name, part in (('val.jsonl', lines[n_train:]), ('train.jsonl', lines[:n_train])):
        with open(os.path.join(root, name + '.tmp'), 'w') as f:
            f.write("\n".join(part) + "\n")
        os.replace(os.path.join(root, name + '.tmp'), os.path.join(root, name))
    return done

def toy_tokenizer(manifest, records, out_dir):
    """The word-level tokenizer of a debug run (no official umT5), written to out_dir/tokenizer.json where sampling
    finds it: the manifest's own tokenizer.json (the toy set ships one), else one built from its captions."""
    from models.t5 import build_tokenizer
    src = os.path.join(os.path.dirname(os.path.abspath(manifest)), 'tokenizer.json')
    dst = os.path.join(out_dir, 'tokenizer.json')
    os.makedirs(out_dir, exist_ok=True)
    if os.path.exists(src):
        shutil.copyfile(src, dst)
    else:
        texts = [t for r in records for t in (r['caption'], r['background'], *(e['caption'] for e in r['entities'])) if t]
        build_tokenizer(list(dict.fromkeys(texts)), dst)
        print(f"{manifest} has no tokenizer.json beside it: built a word-level toy tokenizer from the captions of its "
              f"{len(records)} clips into {dst} (pass --ckpt_dir to use the official umT5 and its tokenizer)")
    return dst

def ensure_shapes(root='data/shapes'):
    """Render the default toy set unless root/train.jsonl exists; returns its path. Renders into
    a private temp folder and renames it, so ranks racing here never write the same files."""
    train = os.path.join(root, 'train.jsonl')
    if not os.path.exists(train):
        if os.path.isdir(root) and os.listdir(root):
            return make_shapes(root)  # leftovers of an interrupted in-place render: redo in place
        tmp = f"{os.path.normpath(root)}.tmp{os.getpid()}"
        make_shapes(tmp)
        try:
            os.rename(tmp, root)  # atomic; fails if another process finished first
        except OSError:
            if not os.path.exists(train):
                raise
            shutil.rmtree(tmp)
    return train

# -----------------------------------------------------------------------------
# resumable, rank-sharded loader

class _Clips(torch.utils.data.Dataset):
    """Indexed by (epoch, clip index); the temporal offset is a pure function of
    (seed, epoch, index), so batches do not depend on the number of workers.
    window='centre' takes every clip's middle window instead, in every epoch: one window per clip is what a cache
    of the frozen models' outputs can hold. fetch(record) -> dict replaces decoding (train_dit.py's cache).
    Decoded clips are kept whole (resized, uint8) while they fit in `ram` bytes; later windows are cut from them. The
    first clip that does not fit ends the keeping: the rest are decoded window by window, as without it."""
    def __init__(self, recs, frames, height, width, stride, seed, window='random', fetch=None, masks=True, ram=0,
                 uint8=False):
        self.records, self.args, self.seed = recs, (frames, height, width, stride), seed
        self.window, self.fetch, self.masks, self.uint8 = window, fetch, masks, uint8
        self.kept, self.room = {}, ram

    def __getitem__(self, key):
        epoch, i, slot = key
        if self.fetch is not None:
            return dict(self.fetch(self.records[i]), slot=(epoch, slot))
        rng = np.random.default_rng([self.seed, epoch, i])
        start = (lambda hi: hi // 2) if self.window == 'centre' else (lambda hi: int(rng.integers(0, hi + 1)))
        if i not in self.kept and self.room > 0:
            vr, (_, height, width, _) = _open_video(self.records[i]), self.args
            size = len(vr) * 3 * height * width
            if size <= self.room:
                self.kept[i], self.room = decode_clip(self.records[i], height, width, vr=vr), self.room - size
            else:
                self.room = 0
        clip = load_clip(self.records[i], *self.args, start=start, masks=self.masks, decoded=self.kept.get(i),
                         uint8=self.uint8)
        return dict(clip, slot=(epoch, slot))

def _collate(items):
    """Lists per key; the videos stacked."""
    batch = {k: [x[k] for x in items] for k in items[0]}
    if 'video' in batch:
        batch['video'] = torch.stack(batch['video'])
    return batch

def _pinned(batch):
    """The batch's tensors in page-locked memory, so that their copies to the GPU can run asynchronously."""
    pin = lambda v: v.pin_memory() if isinstance(v, torch.Tensor) else v
    return {k: [pin(x) for x in v] if isinstance(v, list) else pin(v) for k, v in batch.items()}

class ClipLoader:
    """Endless batches for one data-parallel rank. Each epoch is a seeded permutation split into equal disjoint rank
    shares; an iteration takes `accum` batches. Every clip comes with its slot (epoch, position in the epoch's
    permutation): the same clip gets the same slot whatever the layout, so randomness drawn per slot (noise,
    timesteps) makes dp x batch_size x accum layouts of one global batch compute the same thing. The state is the
    iteration count in the epoch, which resumes exactly, also at another layout with the same global batch.
    Iterate with one iterator at a time. uint8: videos as uint8 (see load_clip); pin: batches in pinned memory."""
    def __init__(self, manifest, batch_size, frames, height, width, stride=1,
                 rank=0, world_size=1, seed=0, skip_bad=False, num_workers=0, accum=1, window='random', fetch=None,
                 masks=True, ram=0, uint8=False, pin=False):
        assert 0 <= rank < world_size, f"rank {rank} must be in [0, {world_size})"
        # skip_bad probes every clip up front, so all ranks agree on the clip list and a batch never shrinks
        need = (frames - 1) * stride + 1
        self.records = read_manifest(manifest, skip_bad, min_frames=need if skip_bad else None)
        n, per_iter = len(self.records), world_size * batch_size * accum
        if n < per_iter:
            raise ValueError(f"{manifest} has {n} usable clips, fewer than the {per_iter} of one iteration "
                             f"(batch_size {batch_size} x {world_size} data-parallel ranks x accumulation {accum}); "
                             f"add clips or lower --batch_size")
        self.per_rank = n // world_size  # equal shares: every rank runs the same number of steps
        self.batches_per_epoch = self.per_rank // (batch_size * accum) * accum  # whole iterations; the rest dropped
        self.bs, self.rank, self.world, self.seed, self.workers = batch_size, rank, world_size, seed, num_workers
        self.accum, self.pin = accum, pin
        assert window in ('random', 'centre'), f"window '{window}': random or centre"
        self.ds = _Clips(self.records, frames, height, width, stride, seed, window, fetch, masks, ram, uint8)
        self.epoch, self.step = 0, 0

    def state_dict(self):  # position of the next batch, in whole iterations (saved between iterations)
        return {'epoch': self.epoch, 'step': self.step // self.accum}

    def load_state_dict(self, sd):
        n = self.batches_per_epoch // self.accum
        if not 0 <= sd['step'] < n:
            raise ValueError(f"loader step {sd['step']} out of range for {n} iterations per epoch (a different data "
                             f"set or global batch?)")
        self.epoch, self.step = int(sd['epoch']), int(sd['step']) * self.accum  # takes effect at the next iter()

    def _keys(self):
        epoch, step = self.epoch, self.step
        while True:
            perm = torch.randperm(len(self.records), generator=torch.Generator().manual_seed(self.seed + epoch))
            share = perm[self.rank::self.world][:self.per_rank].tolist()
            for s in range(step, self.batches_per_epoch):
                yield [(epoch, share[p], self.rank + self.world * p) for p in range(s * self.bs, (s + 1) * self.bs)]
            epoch, step = epoch + 1, 0

    def __iter__(self):
        if self.workers == 0:
            batches = (_collate([self.ds[k] for k in keys]) for keys in self._keys())
        else:  # one DataLoader over an endless batch list: workers start once, not every epoch
            batches = torch.utils.data.DataLoader(self.ds, batch_sampler=self._keys(), num_workers=self.workers,
                                                  collate_fn=_collate, pin_memory=self.pin)
        for batch in batches:
            if self.pin and self.workers == 0:
                batch = _pinned(batch)
            self.step += 1
            if self.step == self.batches_per_epoch:
                self.epoch, self.step = self.epoch + 1, 0
            yield batch
