"""VLM judges through any OpenAI-compatible chat endpoint (models/chat.py): SARA's rubric table, OmitI2V accuracy.

    pairs = judges('http://host:8000/v1', 'Qwen/Qwen3.5-27B,google/gemma-4-31b-it')   # [(url, model)]
    rubric = load_rubric('docs/rubric.json')
    asks = [(mp4, rubric_questions(rubric, prompt, frames, votes, temperature)) for mp4, prompt in prompted_videos(d)]
    answers, failed = ask_videos(asks, pairs, 'judge_cache.jsonl', frames, ...)
    print_rubric_table(rubric_table(answers, rubric, [m for _, m in pairs]), ...)

Each question goes to each judge with `frames` frames of the video as images and a JSON schema for the answer.

Mean and vote. SARA's table gives each group (TA: text alignment, MQ: motion quality) a "mean" and a "vote" on the
same 1-5 scale, the vote above the mean in every row, the real videos included: a pointwise score, not a pairwise
comparison of two methods, and what a majority vote over repeated answers gives on a skewed score distribution (its
mode lies above its mean). So each rubric question is asked `votes` times per judge, sampled (seed k for answer k):
a video's "mean" on a dimension averages its answers, its "vote" is their most common score (a tie goes to the tied
score nearest their median, then the lower). A group averages its dimensions per video; every cell is the mean over
videos +- the standard deviation over videos; "mean over judges" averages the judges per video first.

OmitI2V (AlignVid's benchmark): each sample's yes/no questions are asked once, at temperature 0, without the prompt
(as AlignVid's evaluation asks them); a sample's accuracy is its share of answers as expected, averaged over the
samples of each category (Modification, Addition, Deletion): AlignVid's per-sample macro average.

Answers are cached, one JSON line each, under a key of the video's bytes, the judge, the question's text and schema,
its temperature and seed and the frames sent: a rerun asks only what is missing, and an edited rubric re-asks only
the questions it changed. A question that fails every retry fails its video for every judge (named with the reason,
never scored); failures are not cached, so the next run asks again.
"""
import collections
import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
import torch

from data import resize_crop
from models.chat import ChatError, ask, image_part

# the benchmark authors' key names (LAW1223/AlignVid's generation and evaluation scripts read these from meta.json;
# the dataset itself was not at hand here): sample id, image path (relative to the folder), prompt, category
# (main-category: modification | addition | deletion), questions, and each question's text and expected answer
OMITI2V_NAMES = ('id', 'image', 'prompt', 'category', 'questions', 'question', 'answer')
OMITI2V_FIELDS = 'id,image-path,prompt,main-category,questions,question,expected_answer'
CATEGORIES = ('modification', 'addition', 'deletion')  # AlignVid's table order; others follow
OMITI2V_TEMPLATE = ("These are {frames} frames of one video, in order, evenly spaced from its first frame to its last."
                    "\n\nQuestion: {question}\n\nAnswer from what you see in the frames alone: yes or no, then a "
                    "one-sentence reason.")
YES_NO = {'type': 'object', 'properties': {'answer': {'type': 'string', 'enum': ['yes', 'no']},
                                           'reason': {'type': 'string'}},
          'required': ['answer', 'reason'], 'additionalProperties': False}
ALL = 'mean over judges'


def judges(urls, models):
    """[(url, model)] from comma lists: one url serving every model, or one url per model, in order."""
    urls, models = [u for u in urls.split(',') if u], [m for m in models.split(',') if m]
    if not models:
        raise ValueError('--judge_model: name at least one judge, as its server calls the model')
    if len(urls) == 1:
        urls = urls * len(models)
    if len(urls) != len(models):
        raise ValueError(f'--judge_url lists {len(urls)} urls for {len(models)} judge models: give one url for all, '
                         f'or one per model')
    if len(set(models)) < len(models):
        raise ValueError(f'--judge_model={",".join(models)} names a judge twice')
    return list(zip(urls, models))


def need(d, key, where, hint=''):
    """d[key], or one sentence naming the file and the missing key."""
    if not isinstance(d, dict) or key not in d:
        raise ValueError(f'{where} has no key {key!r}{hint}')
    return d[key]


def load_rubric(path):
    """The rubric JSON, checked: scale {min, max}, a template with {frames} {prompt} {question} {min} {max}, and
    dimensions [{name, group, question}]."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f'rubric {path} not found (--rubric=<file.json>; docs/rubric.json shows the keys)')
    try:
        r = json.load(open(path, encoding='utf-8'))
    except ValueError as err:
        raise ValueError(f'rubric {path} is not JSON ({err})') from None
    scale, dims = need(r, 'scale', f'rubric {path}'), need(r, 'dimensions', f'rubric {path}')
    lo, hi = need(scale, 'min', f'rubric {path} scale'), need(scale, 'max', f'rubric {path} scale')
    if not (type(lo) is int and type(hi) is int and lo < hi):
        raise ValueError(f'rubric {path}: scale min and max must be integers, min < max (got {lo!r}, {hi!r})')
    try:
        need(r, 'template', f'rubric {path}').format(frames=1, prompt='', question='', min=lo, max=hi)
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f'rubric {path}: the template may use {{frames}} {{prompt}} {{question}} {{min}} {{max}} '
                         f'only ({err!r})') from None
    if not isinstance(dims, list) or not dims:
        raise ValueError(f'rubric {path}: dimensions must be a non-empty list')
    for i, d in enumerate(dims):
        for key in ('name', 'group', 'question'):
            need(d, key, f'rubric {path} dimension {i}')
    names = [d['name'] for d in dims]
    if len(set(names)) < len(names) or any('#' in n for n in names):
        raise ValueError(f'rubric {path}: dimension names must be unique and free of "#"')
    return r


def groups(rubric):
    """The rubric's groups in order of first appearance (ours: TA, MQ)."""
    return list(dict.fromkeys(d['group'] for d in rubric['dimensions']))


def prompted_videos(folder):
    """[(mp4, prompt)] of a folder sample.py --prompts wrote: <prompt>-<index>.mp4, VBench's naming."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'--videos_dir={folder}: folder not found')
    names = sorted(n for n in os.listdir(folder) if n.endswith('.mp4'))
    if not names:
        raise ValueError(f'--videos_dir={folder} holds no .mp4 videos')
    out = []
    for n in names:
        m = re.match(r'^(.+)-\d+\.mp4$', n)
        if not m:
            raise ValueError(f'{os.path.join(folder, n)} is not named <prompt>-<index>.mp4 as sample.py --prompts '
                             f'writes them (the prompt is read from the name)')
        out.append((os.path.join(folder, n), m.group(1)))
    return out


def score_schema(lo, hi):
    """A reason, then an integer score on the scale (reason first: the judge explains before it scores)."""
    return {'type': 'object', 'properties': {'reason': {'type': 'string'},
                                             'score': {'type': 'integer', 'enum': list(range(lo, hi + 1))}},
            'required': ['reason', 'score'], 'additionalProperties': False}


def rubric_questions(rubric, prompt, frames, votes, temperature):
    """Each dimension's question on a video of prompt, `votes` times (id name#k, seed k)."""
    lo, hi = rubric['scale']['min'], rubric['scale']['max']
    return [dict(id=f"{d['name']}#{k}", seed=k, temperature=temperature, schema=score_schema(lo, hi),
                 text=rubric['template'].format(frames=frames, prompt=prompt, question=d['question'], min=lo, max=hi))
            for d in rubric['dimensions'] for k in range(votes)]


def read_frames(path, n, size):
    """n frames spread evenly from the first to the last of an mp4, uint8 [H, W, 3], the longer side at most size
    (0 = as decoded)."""
    import decord
    try:
        vr = decord.VideoReader(path)
        idx = np.linspace(0, len(vr) - 1, n).round().astype(int).tolist()
        x = torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2)
    except Exception as err:  # decord raises bare RuntimeErrors on bad files
        raise ValueError(f'it could not be decoded ({str(err).splitlines()[0][:120]})') from None
    h, w = x.shape[-2:]
    s = size / max(h, w) if size else 1.0
    if s < 1:
        x = resize_crop(x, max(1, round(h * s)), max(1, round(w * s)))
    return list(x.permute(0, 2, 3, 1).contiguous().numpy())


def digest(path):
    """sha1 of a file's bytes: a video written anew under the same name is judged anew."""
    h = hashlib.sha1()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            h.update(block)
    return h.hexdigest()


def answer_key(video, model, q, frames, size):
    """The cache key of one answer: everything that decides it."""
    what = [video, model, q['text'], q['schema'], q['temperature'], q['seed'], frames, size]
    return hashlib.sha1(json.dumps(what, sort_keys=True).encode()).hexdigest()


def read_cache(path):
    """{key: answer} of a JSON-lines cache; a torn line (a run killed while writing it) is skipped."""
    out = {}
    if os.path.exists(path):
        for line in open(path, encoding='utf-8'):
            try:
                rec = json.loads(line)
                out[rec['key']] = rec['answer']
            except (ValueError, KeyError, TypeError):
                continue
    return out


def messages(parts, text):
    """One user turn: the frames, then the question (images first: a server's prefix cache reuses them)."""
    return [{'role': 'user', 'content': [*parts, {'type': 'text', 'text': text}]}]


def ask_video(path, questions, pairs, cache, log, pool, frames, size, **how):
    """{model: {question id: answer}} of one video, or None and why it failed. Only the answers missing from cache
    are asked, all at once on the pool; each is appended to log as it arrives."""
    if not os.path.isfile(path):
        return None, 'the video was not found'
    video = digest(path)
    keys = {(m, q['id']): answer_key(video, m, q, frames, size) for _, m in pairs for q in questions}
    todo = [(url, m, q) for url, m in pairs for q in questions if keys[m, q['id']] not in cache]
    errors = []
    if todo:
        try:
            parts = [image_part(f) for f in read_frames(path, frames, size)]
        except ValueError as err:
            return None, str(err)
        jobs = {pool.submit(ask, url, m, messages(parts, q['text']), q['schema'], temperature=q['temperature'],
                            seed=q['seed'], **how): (m, q) for url, m, q in todo}
        for job in as_completed(jobs):
            m, q = jobs[job]
            try:
                answer = job.result()
            except ChatError as err:
                errors.append(f"{q['id']}: {err}")
                continue
            cache[keys[m, q['id']]] = answer
            log.write(json.dumps(dict(key=keys[m, q['id']], video=path, judge=m, question=q['id'], answer=answer),
                                 ensure_ascii=False) + '\n')
            log.flush()
        print(f'{path}: {len(todo) - len(errors)} new answers' + (f', {len(errors)} failed' if errors else ''),
              flush=True)
    if errors:
        return None, f'{len(errors)} question(s) unanswered, e.g. {sorted(errors)[0]}'
    return {m: {q['id']: cache[keys[m, q['id']]] for q in questions} for _, m in pairs}, None


def ask_videos(asks, pairs, cache_path, frames, size, retries=3, timeout=300.0, workers=8, max_tokens=1024,
               wait=1.0):
    """asks: [(mp4, [question])] -> ({mp4: {model: {question id: answer}}}, {mp4: why it failed}). One video at a
    time (its frames in memory), its questions to every judge `workers` at a time."""
    cache, answers, failed = read_cache(cache_path), {}, {}
    os.makedirs(os.path.dirname(cache_path) or '.', exist_ok=True)
    how = dict(retries=retries, timeout=timeout, wait=wait, max_tokens=max_tokens)
    with open(cache_path, 'a', encoding='utf-8') as log, ThreadPoolExecutor(max(1, workers)) as pool:
        if log.tell() and open(cache_path, 'rb').read()[-1:] != b'\n':
            log.write('\n')  # after a torn last line: the next answer starts a line of its own
        for path, questions in asks:
            got, why = ask_video(path, questions, pairs, cache, log, pool, frames, size, **how)
            if got is None:
                failed[path] = why
                print(f'{path}: failed, not scored: {why}', flush=True)
            else:
                answers[path] = got
    return answers, failed


def vote(scores):
    """The most common score; a tie goes to the tied score nearest the median of all, then to the lower."""
    counts = collections.Counter(scores)
    tied = sorted(s for s, c in counts.items() if c == max(counts.values()))
    return min(tied, key=lambda s: abs(s - float(np.median(scores))))


def video_scores(answers, rubric):
    """{dimension or group: (mean, vote)} of one judge's answers {question id: answer} on one video."""
    per = collections.defaultdict(list)
    for qid, a in answers.items():
        per[qid.rsplit('#', 1)[0]].append(a['score'])
    out = {d['name']: (float(np.mean(per[d['name']])), float(vote(per[d['name']]))) for d in rubric['dimensions']}
    for g in groups(rubric):
        rows = [out[d['name']] for d in rubric['dimensions'] if d['group'] == g]
        out[g] = tuple(float(np.mean([r[j] for r in rows])) for j in (0, 1))
    return out


def stats(values):
    return dict(mean=float(np.mean(values)), std=float(np.std(values)))


def rubric_table(answers, rubric, models):
    """{row: {judge: {'mean': {mean, std}, 'vote': {mean, std}}}}: a row per dimension, then per group; a column per
    judge, then ALL (the judges averaged per video); mean and spread over the videos."""
    per = {m: [video_scores(answers[v][m], rubric) for v in answers] for m in models}
    rows = [d['name'] for d in rubric['dimensions']] + groups(rubric)
    per[ALL] = [{r: tuple(float(np.mean([per[m][i][r][j] for m in models])) for j in (0, 1)) for r in rows}
                for i in range(len(answers))]
    return {r: {m: {kind: stats([p[r][j] for p in per[m]]) for j, kind in enumerate(('mean', 'vote'))}
                for m in per} for r in rows}


def print_failed(failed):
    if failed:
        print(f'failed, not scored ({len(failed)}): ' + '; '.join(f'{os.path.basename(p)}: {why}'
                                                                  for p, why in failed.items()))


def print_rubric_table(table, rubric, rubric_path, n_videos, votes, failed):
    """The table: a row per dimension and group, mean and vote (+- over videos) per judge and over judges."""
    by_name = {d['name']: d['group'] for d in rubric['dimensions']}
    judges_ = list(next(iter(table.values())))
    print(f'VLM rubric {rubric_path} (ours: the paper\'s is unpublished): {n_videos} videos, {len(judges_) - 1} '
          f'judge(s), {votes} answer(s) per question; mean and vote, +- over videos')
    print(f"{'':<24}{'':<6}" + ''.join(f'{m[-30:]:<32}' for m in judges_))
    print(f"{'dimension':<24}{'group':<6}" + f"{'mean':<16}{'vote':<16}" * len(judges_))
    cell = lambda s: f"{s['mean']:.3f} +- {s['std']:.3f}  "
    for row, cols in table.items():
        print(f"{row:<24}{by_name.get(row, ''):<6}" + ''.join(cell(c['mean']) + cell(c['vote'])
                                                             for c in cols.values()))
    print_failed(failed)


def yes_no(value, where):
    v = str(value).strip().lower()
    if v not in ('yes', 'no'):
        raise ValueError(f'{where}: the expected answer is {value!r}, not yes or no')
    return v


def read_omiti2v(folder, fields=OMITI2V_FIELDS, want=OMITI2V_NAMES[:5]):
    """The samples of an OmitI2V folder's meta.json (a list) as dicts with the keys of want among id, image (a path,
    which must exist), prompt, category (lower case) and questions [(text, 'yes' | 'no')], read through fields: this
    file's key names for OMITI2V_NAMES, in that order."""
    meta = os.path.join(folder, 'meta.json')
    if not os.path.isdir(folder):
        raise FileNotFoundError(f'--omiti2v={folder}: folder not found (the downloaded AIPeanutman/OmitI2V dataset)')
    if not os.path.isfile(meta):
        raise FileNotFoundError(f'{meta} not found: --omiti2v names the OmitI2V folder that holds meta.json')
    keys = dict(zip(OMITI2V_NAMES, fields.split(',')))
    if len(fields.split(',')) != len(OMITI2V_NAMES):
        raise ValueError(f'--omiti2v_fields={fields!r}: give {len(OMITI2V_NAMES)} comma-separated key names, for '
                         f'{",".join(OMITI2V_NAMES)}')
    try:
        data = json.load(open(meta, encoding='utf-8'))
    except ValueError as err:
        raise ValueError(f'{meta} is not JSON ({err})') from None
    if not isinstance(data, list):
        raise ValueError(f'{meta}: expected a list of samples, got a JSON {type(data).__name__}')
    get = lambda rec, name, where: need(rec, keys[name], where, f' (its {name}: set --omiti2v_fields to the file\'s '
                                                                 f'key names)')
    samples = []
    for i, rec in enumerate(data):
        where = f'{meta} sample {i}'
        s = {n: get(rec, n, where) for n in want if n != 'questions'}
        if 'id' in s:
            s['id'] = str(s['id'])
        if 'image' in s:
            s['image'] = os.path.join(folder, s['image'])
            if not os.path.isfile(s['image']):
                raise FileNotFoundError(f'{where}: image {s["image"]} not found')
        if 'category' in s:
            s['category'] = str(s['category']).strip().lower()
        if 'questions' in want:
            qs = get(rec, 'questions', where)
            if not isinstance(qs, list):
                raise ValueError(f'{where}: {keys["questions"]!r} is a {type(qs).__name__}, not a list of questions')
            s['questions'] = [(str(get(q, 'question', f'{where} question {j}')),
                               yes_no(get(q, 'answer', f'{where} question {j}'), f'{where} question {j}'))
                              for j, q in enumerate(qs)]
        samples.append(s)
    ids = [s['id'] for s in samples if 'id' in s]
    if len(set(ids)) < len(ids):
        raise ValueError(f'{meta}: sample ids repeat, so their {{id}}.mp4 videos would too')
    return samples


def omiti2v_questions(sample, frames):
    """A sample's yes/no questions (ids 0, 1, ...), asked once at temperature 0 without the prompt."""
    return [dict(id=f'{j}#0', seed=0, temperature=0.0, schema=YES_NO,
                 text=OMITI2V_TEMPLATE.format(frames=frames, question=q))
            for j, (q, _) in enumerate(sample['questions'])]


def categories(samples):
    found = {s['category'] for s in samples}
    return [c for c in CATEGORIES if c in found] + sorted(found - set(CATEGORIES))


def omiti2v_table(answers, samples, models):
    """{judge: {category: accuracy %, 'all': %}}; answers: {sample id: {model: {question id: answer}}}. A sample's
    accuracy is its share of answers as expected; a category's, the mean over its samples; ALL averages the judges
    per sample."""
    by_id = {s['id']: s for s in samples}
    acc = {m: {sid: float(np.mean([got[m][f'{j}#0']['answer'] == want
                                   for j, (_, want) in enumerate(by_id[sid]['questions'])]))
               for sid, got in answers.items()} for m in models}
    acc[ALL] = {sid: float(np.mean([acc[m][sid] for m in models])) for sid in answers}
    scored = [by_id[sid] for sid in answers]
    return {m: {**{c: 100 * float(np.mean([a[s['id']] for s in scored if s['category'] == c]))
                   for c in categories(scored)}, 'all': 100 * float(np.mean(list(a.values())))}
            for m, a in acc.items()}


def print_omiti2v_table(table, samples, answers, failed):
    """AlignVid's table: accuracy (%) per category, a row per judge and over judges."""
    scored = [s for s in samples if s['id'] in answers]
    cats = categories(scored)
    counts = collections.Counter(s['category'] for s in scored)
    print(f'OmitI2V: {len(scored)} samples (' + ', '.join(f'{c.capitalize()} {counts[c]}' for c in cats) +
          f'); accuracy (%), each sample\'s share of yes/no questions answered as expected, averaged per category')
    print(f"{'judge':<32}" + ''.join(f'{c.capitalize():>14}' for c in cats) + f"{'all':>10}")
    for m, row in table.items():
        print(f'{m[-30:]:<32}' + ''.join(f'{row[c]:>14.2f}' for c in cats) + f"{row['all']:>10.2f}")
    print_failed(failed)
