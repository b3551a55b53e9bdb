"""The toy judge: does a video show what its shapes caption says? Colour, shape, motion and background, by pixels.

    python eval.py --videos=data/shapes/val.jsonl              # the real clips: the judge's upper bound
    python eval.py --videos=data/shapes/val.jsonl --out=judge.json
    python eval.py --videos=data/shapes/val.jsonl --runs=out/dit,out/routes/or   # sample runs on those captions
    python eval.py --videos=data/shapes/val.jsonl --runs=out/dit --words=True    # + which caption words the DiT reads

Each caption entity ("a red circle moves right") is looked for frame by frame as one connected blob of its colour
whose fill of its bounding box names its shape; its centroid's travel must point the named way; the rest of the
frame must be grey. Scores are in [0, 1] per video: entity, direction, background and their mean, score.

With --judge_url and --judge_model, VLM judges on any OpenAI-compatible endpoint score real videos instead
(models/judge.py: the rubric, the vote, the cache):

    python eval.py --videos_dir=samples --judge_url=http://localhost:8000/v1 --judge_model=Qwen/Qwen3.5-27B
    python eval.py --videos=clips/val.jsonl --judge_url=... --judge_model=a,b      # the real clips: the oracle row
    python eval.py --omiti2v=OmitI2V --videos_dir=omit_videos --judge_url=... --judge_model=...
"""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import torch
import torch.nn.functional as F

from data import COLOURS, MOVES, SHAPES, load_clip, read_manifest
from models import judge as vlm
from models.checkpoint import load_dit_run
from models.settings import configure, require, run
from models.t5 import encode

videos = ''                    # a manifest .jsonl whose clips (with their captions) are judged
out = ''                       # write the per-video results and the summary here as JSON ('' = print only)
colour_dist = 40.0             # RGB distance counted as an entity's colour (mp4 is lossy; the closest two are 71 apart)
min_share = 0.6                # one blob must hold this share of the colour's pixels: one object, not specks
min_pixels = 4                 # and at least this many pixels
grey_spread = 40.0             # mean max-min channel spread of the background that scores 0
runs = ''                      # comma-separated train_dit.py runs: each samples the captions of `videos`, is judged
seeds = 2                      # samples per caption and run (sample.py seeds index i with seed + i)
steps = 0                      # sampling steps for runs (0 = sample.py's default)
size = ''                      # sampling size 'W*H' for runs ('' = the run's clip size)
guidance = 0.0                 # classifier-free guidance for runs (0 = sample.py's default for a run)
words = False                  # with runs: also how far each run's x0 estimate and samples move on a word swap
# VLM judges (models/judge.py) on any OpenAI-compatible chat endpoint: the rubric table, or OmitI2V accuracy
videos_dir = ''                # mp4s to judge: <prompt>-<index>.mp4 as sample.py --prompts writes (omiti2v: {id}.mp4)
judge_url = ''                 # endpoint(s) http://host:port/v1, comma-separated: one for every judge, or one per judge
judge_model = ''               # the judges: model names as served, comma-separated; the table also averages them
rubric = 'docs/rubric.json'    # dimensions (group TA or MQ), their questions, the scale: ours (the paper's is unpublished)
judge_frames = 8               # frames per video sent as images, spread evenly from the first to the last
judge_size = 512               # the frames' longer side at most this many pixels (0 = as decoded)
judge_votes = 3                # answers per rubric question and judge: the mean is over all, the vote their majority
judge_temperature = 0.7        # sampling temperature of the rubric's answers (OmitI2V's: 0, one answer, as AlignVid)
judge_retries = 3              # tries per question on a timeout, an HTTP error or an answer outside the schema
judge_timeout = 300.0          # seconds per try
judge_workers = 8              # questions in flight at once
judge_max_tokens = 1024        # reply budget per answer (a reasoning model that thinks first needs more)
judge_cache = ''               # the JSON-lines answer cache a rerun continues from ('' = judge_cache.jsonl by the videos)
omiti2v = ''                   # the OmitI2V folder (meta.json): score videos_dir's {id}.mp4 on its yes/no questions
omiti2v_fields = vlm.OMITI2V_FIELDS  # meta.json's key names of: id, image, prompt, category, questions, question, answer

cfg = configure(globals(), __file__)
require(globals(), 'seeds >= 1', 'judge_frames >= 1', 'judge_size >= 0', 'judge_votes >= 1', 'judge_retries >= 1',
        'judge_timeout > 0', 'judge_workers >= 1', 'judge_max_tokens >= 1', 'judge_temperature >= 0')

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


def centres(near, shape):
    """Centroids (x, y) of the colour's dominant blob in the frames where its fill names the shape; near [T, H, W]."""
    labels = components(near)
    out = []
    for t in range(len(near)):
        hit = find(near[t], labels[t])
        if hit is None:
            continue
        blob, fill = hit
        if min(FILL, key=lambda s: abs(FILL[s] - fill)) == shape:
            ys, xs = np.nonzero(blob)
            out.append((xs.mean(), ys.mean()))
    return out


def moves(centres_, direction):
    """Whether the travel from the first centroid to the last points the named way, by a pixel at least."""
    if len(centres_) < 2:
        return False
    d = np.subtract(centres_[-1], centres_[0])  # (dx, dy), image y grows downwards like MOVES'
    axis = int(abs(d[1]) > abs(d[0]))
    want = MOVES[direction]
    return want[axis] != 0 and np.sign(d[axis]) == want[axis] and abs(d[axis]) >= 1


def background_score(video, near_any):
    """1 for a grey background, 0 at a mean channel spread of grey_spread; near_any: the entities' colour pixels."""
    # edges of shapes blend into the floor (yuv420 halves chroma): leave a 2-pixel ring out of the background
    ring = F.max_pool2d(torch.from_numpy(near_any)[:, None].float(), 5, 1, 2)[:, 0].numpy() > 0
    rest = video[~ring].astype(np.int16)
    channel_spread = (rest.max(-1) - rest.min(-1)).mean() if len(rest) else grey_spread
    return float(1 - min(1.0, channel_spread / grey_spread))


def judge(video, caption):
    """video uint8 [T, H, W, 3] (as decord returns it), a toy caption -> dict of scores in [0, 1]."""
    entities, background = parse(caption)
    x = video.astype(np.float32)
    near_any = np.zeros(video.shape[:3], bool)
    present, moved, each = [], [], []
    for colour, shape, direction in entities:
        near = np.linalg.norm(x - np.float32(COLOURS[colour]), axis=-1) < colour_dist
        near_any |= near
        found = centres(near, shape)
        present.append(len(found) / len(video))
        moved.append(float(moves(found, direction)))
        each.append(dict(entity=f"{colour} {shape} moves {direction}", present=present[-1], direction=moved[-1]))
    scores = dict(entity=float(np.mean(present)), direction=float(np.mean(moved)),
                  background=background_score(video, near_any))
    scores['score'] = float(np.mean(list(scores.values())))
    return dict(scores, background_text=background, entities=each)


def read(path):
    """All frames of an mp4 -> uint8 [T, H, W, 3]."""
    import decord
    vr = decord.VideoReader(path)
    return vr.get_batch(range(len(vr))).asnumpy()


def judge_files(items, show):
    """[(mp4 path, caption)] -> the judge's results, one dict per video."""
    results = []
    for path, caption in items:
        results.append(dict(video=path, caption=caption, **judge(read(path), caption)))
        if show:
            r = results[-1]
            print(f"{path}: score {r['score']:.3f} entity {r['entity']:.3f} direction {r['direction']:.3f} "
                  f"background {r['background']:.3f}")
    return results


KEYS = ('score', 'entity', 'direction', 'background')


def spread(groups):
    """Mean and standard deviation over groups (videos, or seeds) of each score's mean within a group."""
    means = [{k: float(np.mean([r[k] for r in g])) for k in KEYS} for g in groups]
    return {k: dict(mean=float(np.mean([m[k] for m in means])), std=float(np.std([m[k] for m in means]))) for k in KEYS}


def sample_run(folder, captions, n=None, sub='judged'):
    """Samples of a run for every caption and seed (n seeds, default `seeds`), written fresh into folder/sub by
    sample.py."""
    n = n or seeds
    where = os.path.join(folder, sub)
    shutil.rmtree(where, ignore_errors=True)  # always the run's current weights
    os.makedirs(where)
    with open(os.path.join(where, 'prompts.txt'), 'w') as f:
        f.write(''.join(c + '\n' for c in captions))
    cmd = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'sample.py'), f'--out_dir={folder}',
           f'--prompts={where}/prompts.txt', f'--samples={n}', f'--out={where}',
           *([f'--steps={steps}'] if steps else []), *([f'--size={size}'] if size else []),
           *([f'--guidance={guidance}'] if guidance else [])]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise ValueError(f"sampling {folder} failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    return [[(os.path.join(where, f'{c}-{i}.mp4'), c) for c in captions] for i in range(n)]


SWAPS = dict(shape=dict(zip(SHAPES, SHAPES[1:] + SHAPES[:1])), direction=dict(left='right', right='left', up='down',
            down='up'), colour=dict(zip(COLOURS, list(COLOURS)[1:] + list(COLOURS)[:1])))
SIGMAS = (0.9, 0.6, 0.3)


def swapped(caption):
    """The caption with its first shape, direction and colour word swapped (one caption per kind of word)."""
    words = caption.split()
    out = []
    for swap in SWAPS.values():
        i = next(i for i, w in enumerate(words) if w in swap)
        out.append(' '.join(words[:i] + [swap[words[i]]] + words[i + 1:]))
    return out


def sample_effects(folder, per_seed):
    """How far a run's samples follow the caption rather than the noise: mean |change| (of 255) of the seed-0 video
    when its caption's shape, direction or colour word is swapped, and, for scale, between seeds 0 and 1 of the same
    caption (per_seed: the judged samples, one list per seed). A DiT that reads the caption moves its samples on a
    swap about as far as a new seed does."""
    first = [read(r['video']).astype(np.float32) for r in per_seed[0]]
    kinds = [f'{k} swapped' for k in SWAPS]
    swaps = sample_run(folder, [t for r in per_seed[0] for t in swapped(r['caption'])], n=1, sub='swapped')[0]
    out = {k: float(np.mean([np.abs(read(swaps[len(kinds) * j + i][0]) - v).mean() for j, v in enumerate(first)]))
           for i, k in enumerate(kinds)}
    if len(per_seed) > 1:
        out['next seed'] = float(np.mean([np.abs(read(r['video']) - v).mean() for r, v in zip(per_seed[1], first)]))
    return out


def word_effects(folder, recs):
    """{swap: {sigma: mean |x0 estimate(caption) - x0 estimate(caption with the swap)|}} of a run's DiT (EMA weights,
    fp32, CPU) over the clips of recs, each clip's centre window noised once per sigma (seed 0)."""
    dit, t5, tok, codec, meta = load_dit_run(folder)
    c = meta['config']
    keys = [f'{k} swapped' for k in SWAPS] + ['caption dropped']
    g, out = torch.Generator().manual_seed(0), {k: {s: [] for s in SIGMAS} for k in keys}
    with torch.no_grad():
        for rec in recs:
            x0 = codec.encode(load_clip(rec, c['frames'], c['height'], c['width'], c['frame_stride'],
                                        start=lambda hi: hi // 2, masks=False)['video'][None])
            texts = [rec['caption']] + swapped(rec['caption'])
            ids, mask = tok(texts + [''], dit.text_len)
            context = encode(t5, ids, mask, dit.text_len)
            for s in SIGMAS:
                xt = (1 - s) * x0 + s * torch.randn(x0.shape, generator=g)
                x0_hat = xt - s * dit(xt.expand(len(context), -1, -1, -1, -1), torch.full((len(context),), 1000 * s),
                                      context)
                for k, other in zip(out, x0_hat[1:]):
                    out[k][s].append((other - x0_hat[0]).abs().mean().item())
    return {k: {s: float(np.mean(v)) for s, v in per.items()} for k, per in out.items()}


def judge_runs(recs):
    """{run: [per seed: the judge's results]} of every run in --runs, sampled on the captions of recs."""
    return {folder: [judge_files(items, show=False) for items in sample_run(folder, [r['caption'] for r in recs])]
            for folder in filter(None, runs.split(','))}


def print_table(table, n_videos):
    """The score means +- their spread: one line for the real clips alone, else a table with a row per run."""
    if runs:
        print(f"{'':<24}" + ''.join(f'{k:>16}' for k in KEYS) +
              f'   (real clips: +- over videos; runs: over {seeds} seeds)')
    for name, row in table.items():
        print((f'{name:<24}' if runs else f'mean over {n_videos} videos: ') +
              ''.join(f"{row[k]['mean']:>9.3f} +- {row[k]['std']:.3f}" if runs else
                      f"{k} {row[k]['mean']:.3f} +- {row[k]['std']:.3f} " for k in KEYS).rstrip())


def judged_folder():
    """Where the cache and the JSON go by default: videos_dir, or the manifest's folder."""
    return videos_dir or os.path.dirname(os.path.abspath(videos))


def asked(asks, pairs):
    """The judges' answers to asks [(mp4, [question])] through the cache, and the failures."""
    cache = judge_cache or os.path.join(judged_folder(), 'judge_cache.jsonl')
    return vlm.ask_videos(asks, pairs, cache, judge_frames, judge_size, judge_retries, judge_timeout,
                            judge_workers, judge_max_tokens)


def rubric_scores(pairs):
    """The rubric table of videos_dir (prompts from the file names) or of the manifest's clips (their captions)."""
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), rubric)
    rub = vlm.load_rubric(here if not os.path.exists(rubric) and rubric == 'docs/rubric.json' else rubric)
    items = vlm.prompted_videos(videos_dir) if videos_dir else [(r['video'], r['caption']) for r in
                                                                  read_manifest(videos)]
    answers, failed = asked([(path, vlm.rubric_questions(rub, text, judge_frames, judge_votes, judge_temperature))
                             for path, text in items], pairs)
    if not answers:
        raise ValueError(f'no video could be judged ({len(failed)} failed), e.g. {next(iter(failed.items()))}')
    table = vlm.rubric_table(answers, rub, [m for _, m in pairs])
    vlm.print_rubric_table(table, rub, rubric, len(answers), judge_votes, failed)
    return dict(table=table, answers=answers, failed=failed)


def omiti2v_scores(pairs):
    """OmitI2V accuracy per category of videos_dir's {id}.mp4 (samples without questions are left out, as
    AlignVid's evaluation does)."""
    if not videos_dir:
        raise ValueError('--omiti2v needs --videos_dir=<the folder of {id}.mp4 that sample.py --omiti2v wrote>')
    if not os.path.isdir(videos_dir):
        raise FileNotFoundError(f'--videos_dir={videos_dir}: folder not found')
    samples = [s for s in vlm.read_omiti2v(omiti2v, omiti2v_fields, ('id', 'category', 'questions')) if s['questions']]
    paths = {os.path.join(videos_dir, f"{s['id']}.mp4"): s for s in samples}
    answers, failed = asked([(p, vlm.omiti2v_questions(s, judge_frames)) for p, s in paths.items()], pairs)
    if not answers:
        raise ValueError(f'no video could be judged ({len(failed)} failed), e.g. {next(iter(failed.items()))}')
    by_id = {paths[p]['id']: a for p, a in answers.items()}
    table = vlm.omiti2v_table(by_id, samples, [m for _, m in pairs])
    vlm.print_omiti2v_table(table, samples, by_id, failed)
    return dict(table=table, answers=by_id, failed=failed)


def vlm_judging():
    """The VLM judges' table, printed and written as JSON (out, or judged.json / omiti2v.json by the videos)."""
    pairs = vlm.judges(judge_url, judge_model)
    if not (videos_dir or videos):
        raise ValueError('nothing to judge: pass --videos_dir=<folder of mp4s> (or --videos=<manifest.jsonl>)')
    result = omiti2v_scores(pairs) if omiti2v else rubric_scores(pairs)
    path = out or os.path.join(judged_folder(), 'omiti2v.json' if omiti2v else 'judged.json')
    with open(path, 'w') as f:
        json.dump(dict(result, judges=[dict(url=u, model=m) for u, m in pairs], config=cfg), f, indent=2,
                  ensure_ascii=False)
    print(f'wrote {path}')


def main():
    if judge_url or judge_model:
        return vlm_judging()
    if not videos:
        raise ValueError("nothing to judge: pass --videos=<manifest.jsonl>")
    recs = read_manifest(videos)
    real = judge_files([(r['video'], r['caption']) for r in recs], show=not runs)
    judged = judge_runs(recs)
    table = {'real clips': spread([[r] for r in real]),  # spread over videos
             **{folder: spread(per_seed) for folder, per_seed in judged.items()}}  # spread over seeds
    print_table(table, len(real))
    effects = {folder: word_effects(folder, recs) for folder in judged} if words else {}
    for folder, per in effects.items():
        print(f'{folder}: mean |change| of the x0 estimate at sigma ' + ' / '.join(map(str, SIGMAS)) + ': ' +
              '; '.join(f"{k} {' / '.join(f'{v:.4f}' for v in e.values())}" for k, e in per.items()))
    moved = {folder: sample_effects(folder, judged[folder]) for folder in effects}
    for folder, per in moved.items():
        print(f'{folder}: mean |change| of the seed-0 samples (of 255): ' +
              '; '.join(f'{k} {v:.2f}' for k, v in per.items()))
    if out:
        with open(out, 'w') as f:
            json.dump(dict(summary=table['real clips'], table=table, videos=real, runs=judged, words=effects,
                           samples=moved, config=cfg), f, indent=2)
        print(f"wrote {out}")


if __name__ == '__main__':
    run(main)
