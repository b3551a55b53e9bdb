"""The toy judge: does a video show what its shapes caption says? Colour, shape, motion and background, by pixels.

    python eval.py --videos=data/shapes/val.jsonl              # the real clips: the judge's upper bound
    python eval.py --videos=data/shapes/val.jsonl --out=judge.json

Each caption entity ("a red circle moves right") is looked for frame by frame as one connected blob of its colour
whose fill of its bounding box names its shape; its centroid's travel must point the named way; the rest of the
frame must be grey. Scores are in [0, 1] per video: entity, direction, background and their mean, score.
"""
import json
import re

import numpy as np
import torch
import torch.nn.functional as F

from data import COLOURS, MOVES, SHAPES, read_manifest
from models.settings import configure, run

videos = ''                    # a manifest .jsonl whose clips (with their captions) are judged
out = ''                       # write the per-video results and the summary here as JSON ('' = print only)
colour_dist = 40.0             # RGB distance to an entity's colour that still counts as it (mp4 is lossy;
                               # the closest pair, yellow/orange, is 71 apart)
min_share = 0.6                # one blob must hold this share of the colour's pixels: one object, not specks
min_pixels = 4                 # and at least this many pixels
grey_spread = 40.0             # mean max-min channel spread of the background that scores 0

# imported (tests) the defaults hold; only `python eval.py` reads the command line
cfg = configure(globals(), __file__, None if __name__ == '__main__' else [])

FILL = dict(square=1.0, circle=np.pi / 4, triangle=0.5)  # blob area / bounding-box area of each shape
ENTITY = re.compile(rf"\b({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) moves ({'|'.join(MOVES)})\b")


def parse(caption):
    """'a red circle moves right and ... over <background>' -> [(colour, shape, direction)], background text."""
    things, _, background = caption.partition(' over ')
    entities = ENTITY.findall(things)
    if not entities:
        raise ValueError(f"caption {caption!r} names no '<colour> <shape> moves <direction>' entity")
    return entities, background


def components(mask):
    """8-connected labels of a bool mask [T, H, W]: each pixel ends with the largest index in its blob (0 = off).
    Max-pooling the indices until nothing changes: no scipy, and all frames at once."""
    m = torch.from_numpy(mask)[:, None]
    idx = torch.arange(1, m[0].numel() + 1, dtype=torch.float32).view(1, *m.shape[1:]) * m  # exact below 2**24
    while True:
        nxt = F.max_pool2d(idx, 3, 1, 1) * m
        if torch.equal(nxt, idx):
            return idx[:, 0].long().numpy()
        idx = nxt


def find(frame_mask, labels):
    """The dominant blob of one frame's colour pixels -> (its mask, fill ratio) or None when scattered/absent."""
    n = frame_mask.sum()
    if n < min_pixels:
        return None
    ids, counts = np.unique(labels[frame_mask], return_counts=True)
    k = counts.argmax()
    if counts[k] < max(min_pixels, min_share * n):
        return None
    blob = labels == ids[k]
    ys, xs = np.nonzero(blob)
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    return blob, counts[k] / box


def judge(video, caption):
    """video uint8 [T, H, W, 3] (as decord returns it), a toy caption -> dict of scores in [0, 1]."""
    entities, background = parse(caption)
    x = video.astype(np.float32)
    near_any = np.zeros(video.shape[:3], bool)
    present, moved, each = [], [], []
    for colour, shape, direction in entities:
        near = np.linalg.norm(x - np.float32(COLOURS[colour]), axis=-1) < colour_dist
        near_any |= near
        labels = components(near)
        centres = []
        for t in range(len(video)):
            hit = find(near[t], labels[t])
            if hit is None:
                continue
            blob, fill = hit
            if min(FILL, key=lambda s: abs(FILL[s] - fill)) == shape:
                ys, xs = np.nonzero(blob)
                centres.append((xs.mean(), ys.mean()))
        present.append(len(centres) / len(video))
        ok = False
        if len(centres) >= 2:
            d = np.subtract(centres[-1], centres[0])  # (dx, dy), image y grows downwards like MOVES'
            axis = int(abs(d[1]) > abs(d[0]))
            want = MOVES[direction]
            ok = want[axis] != 0 and np.sign(d[axis]) == want[axis] and abs(d[axis]) >= 1
        moved.append(float(ok))
        each.append(dict(entity=f"{colour} {shape} moves {direction}", present=present[-1], direction=moved[-1]))
    # edges of shapes blend into the floor (yuv420 halves chroma): leave a 2-pixel ring out of the background
    ring = F.max_pool2d(torch.from_numpy(near_any)[:, None].float(), 5, 1, 2)[:, 0].numpy() > 0
    rest = video[~ring].astype(np.int16)
    spread = (rest.max(-1) - rest.min(-1)).mean() if len(rest) else grey_spread
    scores = dict(entity=float(np.mean(present)), direction=float(np.mean(moved)),
                  background=float(1 - min(1.0, spread / grey_spread)))
    scores['score'] = float(np.mean(list(scores.values())))
    return dict(scores, background_text=background, entities=each)


def main():
    import decord
    if not videos:
        raise ValueError("nothing to judge: pass --videos=<manifest.jsonl>")
    results = []
    for rec in read_manifest(videos):
        vr = decord.VideoReader(rec['video'])
        r = dict(video=rec['video'], caption=rec['caption'],
                 **judge(vr.get_batch(range(len(vr))).asnumpy(), rec['caption']))
        results.append(r)
        print(f"{r['video']}: score {r['score']:.3f} entity {r['entity']:.3f} direction {r['direction']:.3f} "
              f"background {r['background']:.3f}")
    keys = ('score', 'entity', 'direction', 'background')
    summary = {k: dict(mean=float(np.mean([r[k] for r in results])), std=float(np.std([r[k] for r in results])))
               for k in keys}
    print(f"mean over {len(results)} videos: " + ' '.join(
        f"{k} {summary[k]['mean']:.3f} +- {summary[k]['std']:.3f}" for k in keys))
    if out:
        with open(out, 'w') as f:
            json.dump(dict(summary=summary, videos=results, config=cfg), f, indent=2)
        print(f"wrote {out}")


if __name__ == '__main__':
    run(main)
