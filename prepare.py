"""Your own clips -> Stage 1's supervision: entities (any OpenAI-compatible LLM), SAM 3 masks, caption embeddings.

    python prepare.py --data=clips/raw.jsonl --out=clips/train.jsonl --sam_dir=sam3 \
        --embed_dir=Qwen3-VL-Embedding-2B --llm_url=http://127.0.0.1:30000/v1 --llm_model=Qwen3-VL-8B-Instruct
    torchrun --nproc_per_node=8 prepare.py ...        # the clips split over the ranks, one manifest

Input lines: {"video": "a.mp4", "caption": "..."} (paths relative to the input file), optionally "entities":
["a red cube", ...] and "background": "..." (then no language model is asked). Output: the manifest the trainers read
(data.py), with masks/<clip>_<k>.npz (uint8 [T, H, W], one plane per video frame, the longer side mask_size) and
emb/<clip>.npy beside it, and <out>.provenance.json (the model folders and settings).
Entities: the caption turned into short noun phrases by the LLM (ENTITY_PROMPT, answers held to ENTITY_SCHEMA).
Masks: SAM 3 (transformers' Sam3VideoModel, a folder laid out as facebook/sam3) with one text prompt per entity,
the union of that prompt's objects per frame, run on every frame_stride-th frame (the frames between take the mask
of the nearest earlier one). Embeddings: Qwen3-VL-Embedding on the full caption (the instruction as the system
message, the last token's hidden state, L2-normalised), what train_aligner.py's InfoNCE reads.
A clip is done when its record prepared/<clip>.json is renamed into place, after its masks and embedding: a rerun
skips done clips. A video that cannot be read, a caption without entities, a failed request stop the run with one
sentence, or with --skip_bad=True are counted and named at the end.
transformers is needed by this script only (the trainers run without it); the frames and prompts are prepared here
with torch and the folder's tokenizer, so torchvision is not needed.
"""
import hashlib
import json
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw

from data import _open_video
from models import parallel
from models.chat import ChatError, ask
from models.checkpoint import atomic_write
from models.settings import choice, configure, require, run

data = ''                      # input .jsonl: one {"video", "caption"[, "entities", "background"]} per line
out = ''                       # output manifest ('' = train.jsonl beside data); masks/, emb/, prepared/ beside it
sam_dir = ''                   # SAM 3 folder as downloaded (facebook/sam3: config.json, model.safetensors, tokenizer)
embed_dir = ''                 # Qwen3-VL-Embedding folder ('' = no text_embedding: the aligner uses pooled umT5)
embed_instruction = "Represent the user's input."  # Qwen3-VL-Embedding's system message (its default)
llm_url = ''                   # OpenAI-compatible endpoint for entities, e.g. http://127.0.0.1:30000/v1 (SGLang)
llm_model = ''                 # the model name the endpoint serves
llm_retries = 3                # tries per request before the clip counts as failed
llm_timeout = 120.0            # seconds per request
max_entities = 6               # entities kept per clip (the LLM's first ones)
frame_stride = 2               # SAM 3 reads every n-th frame
sam_size = 0                   # SAM 3's square input side in pixels, a multiple of 14 (0 = the folder's, 1008)
mask_size = 512                # the masks' longer side in pixels (0 = the video's own size)
missing = choice('drop', 'empty')  # an entity SAM 3 finds in no frame: dropped from the clip, or kept with an empty mask
sheet_every = 50               # a contact sheet PNG (frames, masks, labels) every n clips in sheets/ (0 = none)
sheet_frames = 4               # frames per contact sheet
device = 'auto'                # auto = cuda when available, else cpu
dtype = choice('auto', 'float32', 'bfloat16')  # the models' weights: auto = bfloat16 on CUDA, float32 on the CPU
skip_bad = False               # count and name bad clips at the end instead of stopping at the first

cfg = configure(globals(), __file__)
require(globals(), 'frame_stride >= 1', 'mask_size >= 0', 'sam_size >= 0 and sam_size % 14 == 0',
        'max_entities >= 1', 'llm_retries >= 1', 'llm_timeout > 0', 'sheet_every >= 0', 'sheet_frames >= 1')

ENTITY_PROMPT = (
    "A video's caption follows. List the distinct physical things it names that can be seen (people, animals, "
    "objects), each as a short noun phrase of at most four words keeping its main attribute (e.g. 'a red cube', "
    "'the man in a hat'): one phrase per thing, no actions, no scenery. Then name the background or setting in one "
    "short phrase ('' when the caption names none).\nCaption: {caption}")
ENTITY_SCHEMA = {'type': 'object', 'additionalProperties': False, 'required': ['entities', 'background'],
                 'properties': {'entities': {'type': 'array', 'items': {'type': 'string'}},
                                'background': {'type': 'string'}}}
STAGES = ('read', 'entities', 'masks', 'embedding', 'write')  # the per-clip times reported at the end
SHEET_HEIGHT = 192  # contact sheet cells, in pixels
PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)]


class BadClip(ValueError):
    """A clip that cannot be prepared: counted and named with --skip_bad=True, else the run's one sentence."""


# ---------------------------------------------------------------------------------------------------- input

def read_input(path):
    """Input records with absolute video paths, their line and a stable name; a malformed line is a BadClip."""
    if not os.path.isfile(path):
        raise SystemExit(f'--data={path}: file not found (one {{"video", "caption"}} per line)')
    folder, recs = os.path.dirname(os.path.abspath(path)), []
    for line_no, line in enumerate(open(path, encoding='utf-8'), 1):
        if line.strip():
            recs.append(parse_line(line, path, line_no, folder))
    if not recs:
        raise SystemExit(f'{path}: no clips')
    return recs


def parse_line(line, path, line_no, folder):
    """One input line as a record, or a dict with 'bad' (the sentence) when it cannot be one."""
    where = f'{path} line {line_no}'
    try:
        d = json.loads(line)
    except json.JSONDecodeError as err:
        return dict(where=where, bad=f'{where}: malformed JSON ({err.msg} at column {err.colno})')
    if not isinstance(d, dict) or not isinstance(d.get('video'), str) or not isinstance(d.get('caption'), str) \
            or not d['caption'].strip():
        return dict(where=where, bad=f"{where}: needs a 'video' path and a non-empty 'caption'")
    if 'entities' in d and not (isinstance(d['entities'], list) and all(isinstance(e, str) for e in d['entities'])):
        return dict(where=where, bad=f"{where}: 'entities' must be a list of noun phrases")
    video = os.path.join(folder, d['video'])
    name = os.path.splitext(os.path.basename(video))[0][:60]
    key = hashlib.sha1(f"{d['video']}\n{d['caption']}".encode()).hexdigest()[:8]  # same name on every rerun
    return dict(d, video=video, where=where, manifest=path, line=line_no, name=f'{name}-{key}', rel_video=os.path.relpath(video, out_folder()))


def out_folder():
    return os.path.dirname(os.path.abspath(out_path()))


def out_path():
    return out or os.path.join(os.path.dirname(os.path.abspath(data)), 'train.jsonl')


def read_frames(rec):
    """(frames uint8 [t, H, W, 3] at frame_stride, the video's frame count n)."""
    try:
        vr = _open_video(rec)
    except ValueError as err:  # data.py's sentence, naming this clip's input line
        raise BadClip(str(err)) from None
    n = len(vr)
    try:
        return vr.get_batch(list(range(0, n, frame_stride))).asnumpy(), n
    except Exception as err:  # decord's bare DECORDError
        raise BadClip(f"{rec['where']}: video {rec['video']} failed to decode ({str(err).splitlines()[0][:200]})")


# ------------------------------------------------------------------------------------------------- entities

def entities_of(rec):
    """(entity noun phrases, background): the line's own, or the LLM's answer for its caption."""
    if 'entities' in rec:
        ents, background = rec['entities'], rec.get('background', '')
    elif not llm_url:
        raise BadClip(f"{rec['where']}: no 'entities' and no --llm_url to ask for them")
    else:
        msg = [{'role': 'user', 'content': ENTITY_PROMPT.format(caption=rec['caption'])}]
        try:
            answer = ask(llm_url, llm_model, msg, ENTITY_SCHEMA, retries=llm_retries, timeout=llm_timeout)
        except ChatError as err:
            raise BadClip(f"{rec['where']}: the entity request failed: {err}") from None
        ents, background = answer['entities'], rec.get('background', answer['background'])
    ents = list(dict.fromkeys(e.strip() for e in ents if isinstance(e, str) and e.strip()))[:max_entities]
    if not ents:
        raise BadClip(f"{rec['where']}: the caption names no entity ({rec['caption'][:60]!r})")
    return ents, background.strip()


# --------------------------------------------------------------------------------------------------- SAM 3

def quiet_transformers():
    """transformers' load reports and progress bars off: this script prints one line per clip."""
    from transformers.utils import logging
    logging.set_verbosity_error()
    logging.disable_progress_bar()


def load_sam(folder, dev, dt):
    """SAM 3's video model, its tokenizer and its frame normalisation (size, mean, std) from a facebook/sam3 folder."""
    from transformers import AutoTokenizer, Sam3VideoConfig, Sam3VideoModel
    quiet_transformers()
    for f in ('config.json', 'processor_config.json'):
        if not os.path.isfile(os.path.join(folder, f)):
            raise SystemExit(f'--sam_dir={folder}: no {f} (download the whole facebook/sam3 folder)')
    config = Sam3VideoConfig.from_pretrained(folder)
    if sam_size:
        config.image_size = sam_size  # propagates to the detector's and the tracker's feature sizes
    model, info = Sam3VideoModel.from_pretrained(folder, config=config, dtype=dt, output_loading_info=True)
    if info['missing_keys']:
        raise SystemExit(f'--sam_dir={folder}: the checkpoint lacks {len(info["missing_keys"])} weights of '
                         f'Sam3VideoModel (e.g. {sorted(info["missing_keys"])[0]}): not a facebook/sam3 folder')
    proc = json.load(open(os.path.join(folder, 'processor_config.json')))
    proc = proc.get('video_processor', proc)
    norm = dict(size=config.image_size, mean=proc.get('image_mean', [0.5] * 3), std=proc.get('image_std', [0.5] * 3),
                scale=proc.get('rescale_factor', 1 / 255))
    return model.to(dev).eval(), AutoTokenizer.from_pretrained(folder), norm


def sam_frames(frames, norm, dt):
    """uint8 [t, H, W, 3] -> SAM 3's input [t, 3, S, S]: square resize (bilinear, antialiased), rescale, normalise."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(norm['size'], norm['size']), mode='bilinear', antialias=True, align_corners=False)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (norm['mean'], norm['std']))
    return ((x * norm['scale'] - mean) / std).to(dt)


def mask_shape(h, w):
    s = mask_size / max(h, w) if mask_size and max(h, w) > mask_size else 1.0
    return max(1, round(h * s)), max(1, round(w * s))


@torch.inference_mode()
def sam_masks(sam, frames, prompts, dev):
    """bool [K, t, h, w]: per prompt, the union of its SAM 3 objects in each frame read, at mask_shape."""
    from transformers.models.sam3_video.modeling_sam3_video import Sam3VideoInferenceSession
    model, tok, norm = sam
    dt = next(model.parameters()).dtype
    session = Sam3VideoInferenceSession(video=sam_frames(frames, norm, dt), video_height=frames.shape[1],
                                        video_width=frames.shape[2], inference_device=dev,
                                        inference_state_device=dev, video_storage_device='cpu', dtype=dt)
    index = {}
    for k, text in enumerate(prompts):  # as Sam3VideoProcessor.add_text_prompt: 32 tokens, padded
        pid = session.add_prompt(text)
        ids = tok(text, return_tensors='pt', padding='max_length', max_length=32, truncation=True).to(dev)
        session.prompt_input_ids[pid], session.prompt_attention_masks[pid] = ids.input_ids, ids.attention_mask
        index[pid] = k
    h, w = mask_shape(*frames.shape[1:3])
    masks = torch.zeros(len(prompts), len(frames), h, w, dtype=torch.bool)
    for o in model.propagate_in_video_iterator(session):
        hidden = set(o.suppressed_obj_ids or ()) | set(session.hotstart_removed_obj_ids)
        for obj, logits in o.obj_id_to_mask.items():  # low-resolution logits [1, h', w']
            if obj not in hidden:
                up = F.interpolate(logits[None].float(), size=(h, w), mode='bilinear', align_corners=False)[0, 0]
                masks[index[session.obj_id_to_prompt_id[obj]], o.frame_idx] |= (up > 0).cpu()
    return masks


def every_frame(masks, n):
    """[K, t, h, w] at frame_stride -> uint8 [K, n, h, w]: each video frame takes the nearest earlier read one."""
    idx = torch.clamp(torch.arange(n) // frame_stride, max=masks.shape[1] - 1)
    return masks[:, idx].to(torch.uint8).numpy()


# ----------------------------------------------------------------------------------------------- embeddings

def load_embedder(folder, dev, dt):
    """Qwen3-VL-Embedding (Qwen3VLModel, no LM head) and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        raise SystemExit(f'--embed_dir={folder}: no config.json (download the whole Qwen3-VL-Embedding folder)')
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = 'right'
    return AutoModel.from_pretrained(folder, dtype=dt).to(dev).eval(), tok


@torch.inference_mode()
def embed(embedder, texts, dev):
    """float32 [B, D], L2-normalised: each text as the user turn after the instruction, the hidden state at its last
    non-padding token (the assistant turn's opening, as add_generation_prompt writes it)."""
    model, tok = embedder
    chats = [[{'role': 'system', 'content': embed_instruction}, {'role': 'user', 'content': t}] for t in texts]
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in chats]
    x = tok(prompts, return_tensors='pt', padding=True).to(dev)
    hidden = model(input_ids=x.input_ids, attention_mask=x.attention_mask).last_hidden_state
    last = x.attention_mask.sum(1) - 1
    return F.normalize(hidden[torch.arange(len(texts)), last].float(), dim=-1).cpu()


# --------------------------------------------------------------------------------------------------- output

def save_npz(path, **arrays):
    def write(tmp):
        with open(tmp, 'wb') as f:  # a file object: numpy would append .npz to a name
            np.savez_compressed(f, **arrays)
    atomic_write(path, write)


def save_npy(path, array):
    def write(tmp):
        with open(tmp, 'wb') as f:
            np.save(f, array)
    atomic_write(path, write)


def save_json(path, obj, lines=False):
    def write(tmp):
        with open(tmp, 'w', encoding='utf-8') as f:
            if lines:
                f.writelines(json.dumps(o) + '\n' for o in obj)
            else:
                json.dump(obj, f, indent=2)
    atomic_write(path, write)


def contact_sheet(path, frames, masks, labels):
    """A row of frames, each entity's mask tinted in its colour, with a legend: for a person to check the masks."""
    pick = np.linspace(0, len(frames) - 1, min(sheet_frames, len(frames))).round().astype(int)
    h = SHEET_HEIGHT
    w = round(masks.shape[-1] * h / masks.shape[-2])
    cells = []
    for i in pick:
        img = np.asarray(Image.fromarray(frames[i]).resize((w, h), Image.BILINEAR)).astype(np.float32)
        for k, m in enumerate(masks[:, i]):
            m = np.asarray(Image.fromarray(m).resize((w, h), Image.NEAREST))
            img[m] = 0.45 * img[m] + 0.55 * np.array(PALETTE[k % len(PALETTE)])
        cells.append(img.astype(np.uint8))
    legend = 14 * len(labels) + 6
    sheet = Image.new('RGB', (len(cells) * (w + 2), h + legend), 'white')
    for j, c in enumerate(cells):
        sheet.paste(Image.fromarray(c), (j * (w + 2), legend))
    draw = ImageDraw.Draw(sheet)
    for k, label in enumerate(labels):
        draw.text((4, 3 + 14 * k), label, fill=PALETTE[k % len(PALETTE)])
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sheet.save(path)


def prepare_clip(rec, sam, embedder, dev, sheet):
    """Entities, masks and embedding of one clip written beside the manifest; its record last. Returns the stage
    times, the number of entities SAM 3 found nowhere and the record."""
    t = [time.time()]
    frames, n = read_frames(rec)
    t.append(time.time())
    ents, background = entities_of(rec)
    t.append(time.time())
    masks = sam_masks(sam, frames, ents, dev)
    t.append(time.time())
    emb = embed(embedder, [rec['caption']], dev)[0].numpy() if embedder is not None else None
    t.append(time.time())
    found = masks.flatten(1).any(1).tolist()
    keep = [k for k in range(len(ents)) if found[k] or missing == 'empty']
    if not keep:
        raise BadClip(f"{rec['where']}: SAM 3 found none of its entities {ents} in any frame")
    base = out_folder()
    if sheet:
        contact_sheet(os.path.join(base, 'sheets', rec['name'] + '.png'), frames, masks.numpy(), ents)
    planes = every_frame(masks[keep], n)
    record = dict(video=rec['rel_video'], caption=rec['caption'], entities=[], background=background)
    for j, k in enumerate(keep):
        rel = f"masks/{rec['name']}_{j}.npz"
        save_npz(os.path.join(base, rel), mask=planes[j])
        record['entities'].append(dict(caption=ents[k], mask=rel))
    if emb is not None:
        record['text_embedding'] = f"emb/{rec['name']}.npy"
        save_npy(os.path.join(base, record['text_embedding']), emb)
    t.append(time.time())
    save_json(done_path(rec), record)  # the clip counts as done from here
    return np.diff(t), len(ents) - sum(found), record


def done_path(rec):
    return os.path.join(out_folder(), 'prepared', rec['name'] + '.json')


def write_manifest(recs, bad):
    """The manifest of every done clip in input order, and the provenance beside it."""
    done = [json.load(open(done_path(r))) for r in recs if 'bad' not in r and os.path.exists(done_path(r))]
    save_json(out_path(), done, lines=True)
    models = dict(sam_dir=os.path.abspath(sam_dir), embed_dir=embed_dir and os.path.abspath(embed_dir),
                  llm_url=llm_url, llm_model=llm_model)
    save_json(os.path.splitext(out_path())[0] + '.provenance.json',
              dict(models=models, settings=cfg, entity_prompt=ENTITY_PROMPT, clips=len(done), bad=bad,
                   written=time.strftime('%Y-%m-%d %H:%M:%S')))
    return len(done)


def main():
    if not data:
        raise SystemExit('--data is needed: an input .jsonl with one {"video", "caption"} per line')
    if not sam_dir:
        raise SystemExit('--sam_dir is needed: the SAM 3 folder (facebook/sam3) that makes the masks')
    _, dev = parallel.init(1, device)
    rank, world = dist.get_rank(), dist.get_world_size()
    dt = {'float32': torch.float32, 'bfloat16': torch.bfloat16}.get(dtype, torch.bfloat16 if dev.type == 'cuda'
                                                                    else torch.float32)
    recs = read_input(data)
    todo = [(i, r) for i, r in enumerate(recs) if 'bad' not in r and not os.path.exists(done_path(r))]
    done_before = sum('bad' not in r for r in recs) - len(todo)
    bad = [r['bad'] for r in recs if 'bad' in r]
    if bad and not skip_bad:
        raise SystemExit(f'{bad[0]} (fix the line or pass --skip_bad=True)')
    bad = bad if rank == 0 else []  # the input's bad lines reported once
    mine = todo[rank::world]
    sam = load_sam(sam_dir, dev, dt) if mine else None
    embedder = load_embedder(embed_dir, dev, dt) if mine and embed_dir else None
    times, lost, n_done = np.zeros(len(STAGES)), 0, 0
    for j, (i, rec) in enumerate(mine):
        try:
            dt_clip, not_found, record = prepare_clip(rec, sam, embedder, dev, sheet_every and i % sheet_every == 0)
        except BadClip as err:
            if not skip_bad:
                hint = '' if 'skip_bad' in str(err) else ' (fix it, or pass --skip_bad=True to skip it and go on)'
                raise SystemExit(f'{err}{hint}') from None
            bad.append(str(err))
            continue
        times, lost, n_done = times + dt_clip, lost + not_found, n_done + 1
        gone = f", {not_found} entit{'y' if not_found == 1 else 'ies'} found nowhere ({missing})" if not_found else ''
        print(f"[{rank}] {j + 1}/{len(mine)} {rec['name']}: {len(record['entities'])} entities{gone}, "
              f"{dt_clip.sum():.1f} s", flush=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, (bad, times.tolist(), lost, n_done))
    if rank == 0:
        bad = [b for g in gathered for b in g[0]]
        times, lost, n_done = sum(np.array(g[1]) for g in gathered), sum(g[2] for g in gathered), \
            sum(g[3] for g in gathered)
        total = write_manifest(recs, bad)
        per = ', '.join(f'{s} {v / max(n_done, 1):.2f} s' for s, v in zip(STAGES, times))
        print(f'{out_path()}: {total} clips ({n_done} prepared now, {done_before} done before)'
              + (f'; per clip: {per}' if n_done else '') + f'; entities SAM 3 found nowhere: {lost}')
        if bad:
            print(f'{len(bad)} bad clips, not in the manifest: ' + '; '.join(bad))
    parallel.close()


if __name__ == '__main__':
    run(main)
