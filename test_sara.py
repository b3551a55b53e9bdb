"""Tests: python -m pytest -q test_sara.py (CPU, a few minutes on 2 cores)."""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from data import COLOURS, ClipLoader, load_clip, make_shapes, read_manifest, write_video
from models.checkpoint import DIT_FROM_DIFFUSERS, load_state_dict, rename
from models.settings import configure
from models.t5 import T5Encoder, Tokenizer, build_tokenizer, clean_text, configs as t5_configs, encode, hf_to_official
from models.unipc import UniPC, expert_split
from models.vae import PixelCodec
from models.vjepa import VJEPA, configs as vjepa_configs, load_vjepa, preprocess, rope_apply, rope_tables
from models.wan import WanModel, configs as wan_configs

ROOT = os.path.dirname(os.path.abspath(__file__))


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600)


# ---------------------------------------------------------------------------------------------- settings

@pytest.fixture
def script(tmp_path):
    path = tmp_path / 'script.py'
    path.write_text("max_iters = 100  # total iterations\nlearning_rate = 1e-3  # peak rate\n"
                    "out_dir = 'out'  # where\nt_range = (0.0, 1.0)  # sigma range\ncompile = False  # torch.compile\n"
                    "cfg = configure(globals(), __file__)\n")
    return path


def settings(path, argv):
    g = {}
    exec(compile(path.read_text().replace('cfg = configure(globals(), __file__)', ''), str(path), 'exec'), g)
    return configure(g, str(path), argv)


def test_settings_override_and_types(script, tmp_path):
    f = tmp_path / 'over.py'
    f.write_text('max_iters = 7\nimport math\nlearning_rate = 3\n')
    cfg = settings(script, [str(f), '--out_dir=runs/a', '--t_range=(0.5,1)', '--compile=True'])
    assert cfg == {'max_iters': 7, 'learning_rate': 3.0, 'out_dir': 'runs/a', 't_range': (0.5, 1), 'compile': True}


def test_settings_errors(script):
    with pytest.raises(SystemExit, match=r"unknown setting 'max_iter'; did you mean max_iters"):
        settings(script, ['--max_iter=5'])
    with pytest.raises(SystemExit, match=r"'max_iters' expects int .* got 'abc'"):
        settings(script, ['--max_iters=abc'])
    with pytest.raises(SystemExit, match=r"'compile' expects bool"):
        settings(script, ['--compile=2'])
    with pytest.raises(SystemExit, match=r'--key=value'):
        settings(script, ['--max_iters'])


def test_help_lists_every_setting_and_config_json_is_written(tmp_path):
    r = run('train_dit.py', '--help')
    assert r.returncode == 0
    for line in open(os.path.join(ROOT, 'train_dit.py')):
        if line.split('=')[0].strip() in ('max_iters', 'init_from', 'learning_rate'):
            key = line.split('=')[0].strip()
            assert f'--{key}' in r.stdout and line.split('#')[1].strip() in r.stdout
    r = run('train_dit.py', '--max_itres=3')
    assert r.returncode != 0 and "did you mean max_iters" in r.stderr


# ---------------------------------------------------------------------------------------------- the DiT

@pytest.mark.parametrize('name,count', [('t2v-a14b', 14_288_491_584), ('ti2v-5b', 4_999_787_712),
                                        ('t2v-1.3b', 1_418_996_800)])
def test_dit_parameter_counts(name, count):
    with torch.device('meta'):
        m = WanModel(**wan_configs[name])
    assert sum(p.numel() for p in m.parameters()) == count


def diffusers_pair(seed=0):
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(num_attention_heads=2, attention_head_dim=128, in_channels=16, out_channels=16,
                                text_dim=32, freq_dim=256, ffn_dim=64, num_layers=2).eval()
    with torch.no_grad():  # diffusers zero-initialises some weights; randomise all so every weight matters
        for p in ref.parameters():
            p.normal_(0, 0.05)
    ours = WanModel(in_dim=16, dim=256, ffn_dim=64, text_dim=32, out_dim=16, num_heads=2, num_layers=2).eval()
    load_state_dict(ours, rename(ref.state_dict(), DIT_FROM_DIFFUSERS), 'diffusers state dict')
    return ref, ours


@pytest.mark.parametrize('per_token', [False, True])
def test_dit_parity_with_diffusers(per_token):
    ref, ours = diffusers_pair()
    x, ctx = torch.randn(2, 16, 3, 8, 12), torch.randn(2, 512, 32)
    ctx[0, 20:], ctx[1, 7:] = 0, 0  # zero-padded captions, as the pipeline feeds them
    t = torch.randint(0, 1000, (2, 3 * 4 * 6)).float() if per_token else torch.tensor([500.0, 17.0])
    with torch.no_grad():
        a = ref(x, t, ctx, return_dict=False)[0]
        b = ours(x, t, ctx)
    err = ((a - b).abs().max() / a.abs().max()).item()
    print(f'DiT parity ({"per-token" if per_token else "shared"} t): max rel err {err:.2e}')
    assert err < 1e-4


def test_strict_load_names_bad_keys():
    ref, ours = diffusers_pair()
    sd = rename(ref.state_dict(), DIT_FROM_DIFFUSERS)
    sd['blocks.0.ffn.0.weight'] = sd['blocks.0.ffn.0.weight'][:3]
    del sd['head.modulation']
    sd['blocks.9.extra'] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        load_state_dict(ours, sd, 'fake.safetensors')
    msg = str(e.value)
    assert 'fake.safetensors' in msg and 'head.modulation' in msg and 'blocks.9.extra' in msg
    assert 'blocks.0.ffn.0.weight (3, 256)' in msg


def test_pixel_codec_roundtrip():
    codec = PixelCodec()
    video = torch.rand(2, 3, 9, 16, 24) * 2 - 1
    z = codec.encode(video)
    assert z.shape == (2, 192, 3, 4, 6)
    assert torch.equal(codec.decode(z), video)
    with pytest.raises(ValueError, match='1\\+4k frames'):
        codec.encode(video[:, :, :8])


# ---------------------------------------------------------------------------------------------- umT5
def _padded_batch(vocab, lens, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (len(lens), L), generator=g)
    mask = (torch.arange(L)[None, :] < torch.tensor(lens)[:, None]).long()
    return ids * mask, mask  # padded positions hold <pad>=0


def test_t5_parity_with_transformers_umt5():
    from transformers import UMT5Config, UMT5EncoderModel
    torch.manual_seed(0)
    cfg = UMT5Config(vocab_size=100, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2,
                     relative_attention_num_buckets=32, relative_attention_max_distance=128,
                     feed_forward_proj='gated-gelu', dropout_rate=0.0, attn_implementation='eager')
    hf = UMT5EncoderModel(cfg).eval()
    with torch.no_grad():  # HF inits norms to ones; randomize so the norm weight mapping is tested too
        for n, p in hf.named_parameters():
            if 'layer_norm' in n:
                p.add_(0.3 * torch.randn_like(p))
    sd = hf_to_official(hf.state_dict())
    model = T5Encoder(vocab=100, dim=32, dim_attn=32, dim_ffn=64, num_heads=4, num_layers=2, num_buckets=32)
    model.load_state_dict(sd, strict=True)
    # L=150 > max_distance so the log buckets and the clamp to the last bucket are exercised
    ids, mask = _padded_batch(100, [150, 97, 5], 150)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = model(ids, mask)
    real = mask.bool()
    rel = ((out - ref)[real].abs().max() / ref[real].abs().max()).item()
    print(f'umT5 parity max rel err: {rel:.3e}')
    assert rel <= 1e-5, rel


def test_t5_bf16_runs_close_to_fp32():
    model = T5Encoder(**t5_configs['debug']).init_weights(0)
    ids, mask = _padded_batch(512, [20, 7], 20)
    # oneDNN's bf16 matmul picks AMX on this host's CPU and dies with SIGILL; the native kernel is fine
    mkldnn, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    try:
        with torch.no_grad():
            ref = model(ids, mask)
            out = model.to(torch.bfloat16)(ids, mask)
    finally:
        torch.backends.mkldnn.enabled = mkldnn
    assert out.dtype == torch.bfloat16
    real = mask.bool()
    assert ((out.float() - ref)[real].abs().max() / ref[real].abs().max()).item() < 0.05


def test_t5_init_is_deterministic():
    a = T5Encoder(**t5_configs['debug']).init_weights(3).state_dict()
    b = T5Encoder(**t5_configs['debug']).init_weights(3).state_dict()
    c = T5Encoder(**t5_configs['debug']).init_weights(4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a['blocks.0.attn.q.weight'], c['blocks.0.attn.q.weight'])


def test_umt5_xxl_param_count_on_meta():
    with torch.device('meta'):
        model = T5Encoder(**t5_configs['umt5-xxl'])
    sd = model.state_dict()
    assert len(sd) == 242
    assert sum(p.numel() for p in model.parameters()) == 5_680_910_336
    assert sd['blocks.23.ffn.gate.0.weight'].shape == (10240, 4096)
    assert sd['blocks.0.pos_embedding.embedding.weight'].shape == (32, 64)


def test_encode_zero_pads_beyond_true_length():
    model = T5Encoder(**t5_configs['debug']).init_weights(0)
    ids, mask = _padded_batch(512, [12, 5, 1], 12)
    ctx = encode(model, ids, mask, text_len=16)
    with torch.no_grad():
        out = model(ids, mask)
    assert ctx.shape == (3, 16, 64)
    for i, n in enumerate([12, 5, 1]):
        assert torch.equal(ctx[i, :n], out[i, :n])
        assert ctx[i, n:].abs().sum() == 0
        assert ctx[i, :n].abs().sum(-1).min() > 0  # real rows are not zero


def test_tokenizer(tmp_path):
    path = tmp_path / 'tokenizer.json'
    build_tokenizer(['a red cube', 'a blue sphere & a red cube', 'the green cone'], path)
    tok = Tokenizer(path)
    ids, mask = tok(['a red cube', 'a  red&amp;amp;cube ', 'a purple cube'], text_len=8)
    assert ids.shape == mask.shape == (3, 8) and ids.dtype == mask.dtype == torch.long
    assert ids[0, 3].item() == 1 and mask[0].tolist() == [1] * 4 + [0] * 4  # EOS appended
    assert ids[0, 4:].tolist() == [0] * 4  # padded with <pad>=0
    assert clean_text(' a \n\t red&amp;amp;cube ') == 'a red&cube'  # word-level ids alone can't see whitespace
    clean, _ = tok(['a red&cube'], text_len=8)
    assert torch.equal(ids[1], clean[0]) and ids[1, :5].ne(2).all()  # html + whitespace cleaning
    assert ids[2, 1].item() == 2 and ids[2, 0] == ids[0, 0]  # unknown word -> <unk>
    long_ids, long_mask = tok(['a red cube ' * 10], text_len=6)
    assert long_ids.shape == (1, 6) and long_mask.all()
    assert long_ids[0, -1].item() == 1 and long_ids[0, :5].ne(1).all()  # truncation keeps EOS last


# ---------------------------------------------------------------------------------------------- data
T, S = 9, 32  # tiny toy set: 9 frames at 32x32

@pytest.fixture(scope='module')
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp('shapes')
    make_shapes(root, n_train=6, n_val=2, frames=T, size=S, fps=8, seed=0)
    # the same 8 clips with unique captions, so batches can be told apart by caption
    recs = [json.loads(l) for f in ('train.jsonl', 'val.jsonl') for l in open(root / f)]
    with open(root / 'uniq.jsonl', 'w') as f:
        f.writelines(json.dumps(dict(r, caption=f"clip {i}")) + "\n" for i, r in enumerate(recs))
    return root

def _decode(path, idx=None):
    import decord
    vr = decord.VideoReader(str(path))
    return vr.get_batch(list(range(len(vr))) if idx is None else idx).asnumpy()

def test_make_shapes_decodes_and_masks_align(shapes):
    meta = json.load(open(shapes / 'meta.json'))
    assert (meta['frames'], meta['size'], meta['fps']) == (T, S, 8)
    assert (shapes / 'tokenizer.json').is_file()
    recs = read_manifest(shapes / 'train.jsonl') + read_manifest(shapes / 'val.jsonl')
    assert len(recs) == 8
    checked = 0
    for r in recs:
        video = _decode(r['video']).astype(np.float32)
        assert video.shape == (T, S, S, 3)
        assert 1 <= len(r['entities']) <= 3
        for e in r['entities']:
            m = np.load(e['mask'])['mask']
            assert m.shape == (T, S, S) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
            # interior pixels only: yuv420p halves chroma resolution, so edge pixels blend with the floor
            inner = m.astype(bool)
            inner[:, 1:-1, 1:-1] &= inner[:, :-2, 1:-1] & inner[:, 2:, 1:-1] & inner[:, 1:-1, :-2] & inner[:, 1:-1, 2:]
            if inner.sum() < 20:
                continue  # almost fully occluded
            colour = np.array(COLOURS[e['caption'].split()[1]], np.float32)
            assert np.abs(video[inner].mean(0) - colour).max() < 25, (e, video[inner].mean(0))
            checked += 1
            assert e['caption'] in r['caption']
    assert checked >= 8

def test_make_shapes_deterministic_and_val_differs(shapes, tmp_path):
    make_shapes(tmp_path, n_train=6, n_val=2, frames=T, size=S, fps=8, seed=0)
    for f in ('train.jsonl', 'val.jsonl'):
        assert (tmp_path / f).read_text() == (shapes / f).read_text()
    a = read_manifest(shapes / 'train.jsonl') + read_manifest(shapes / 'val.jsonl')
    b = read_manifest(tmp_path / 'train.jsonl') + read_manifest(tmp_path / 'val.jsonl')
    masks_a = {}
    for ra, rb in zip(a, b):
        for ea, eb in zip(ra['entities'], rb['entities']):
            ma, mb = np.load(ea['mask'])['mask'], np.load(eb['mask'])['mask']
            assert np.array_equal(ma, mb)
            masks_a.setdefault(ra['video'], []).append(ma)
    train, val = a[:6], a[6:]
    assert not {r['video'] for r in train} & {r['video'] for r in val}
    for v in val:
        for t in train:
            assert not np.array_equal(_decode(v['video']), _decode(t['video']))
            assert not any(np.array_equal(x, y) for x in masks_a[v['video']] for y in masks_a[t['video']])
    make_shapes(tmp_path / 'other', n_train=6, n_val=2, frames=T, size=S, fps=8, seed=1)
    assert (tmp_path / 'other' / 'train.jsonl').read_text() != (shapes / 'train.jsonl').read_text()

def test_load_clip_shapes_values_and_resize(shapes):
    rec = max(read_manifest(shapes / 'train.jsonl'), key=lambda r: len(r['entities']))
    idx = [1, 3, 5, 7]
    # native size: exactly the decoded frames at start, start+stride, ... and the stored mask frames
    out = load_clip(rec, frames=4, height=S, width=S, stride=2, start=1)
    assert out['video'].shape == (3, 4, S, S) and out['video'].dtype == torch.float32
    ref = torch.from_numpy(_decode(rec['video'], idx)).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert torch.equal(out['video'], ref)
    K = len(rec['entities'])
    raw = np.stack([np.load(e['mask'])['mask'][idx] for e in rec['entities']]).astype(np.float32)
    assert out['masks'].shape == (K, 4, S, S) and torch.equal(out['masks'], torch.from_numpy(raw))
    assert out['entity_captions'] == [e['caption'] for e in rec['entities']]
    assert out['caption'] == rec['caption'] and out['background'] == rec['background']
    # aspect change: scale 1, centre crop of rows 8..24
    wide = load_clip(rec, frames=4, height=S // 2, width=S, stride=2, start=1)
    assert torch.equal(wide['video'], ref[:, :, S // 4: S // 4 + S // 2])
    # downsampling: values stay in range, masks become soft and keep their covered area
    small = load_clip(rec, frames=4, height=12, width=12, stride=2, start=1)
    v, m = small['video'], small['masks']
    assert v.shape == (3, 4, 12, 12) and v.min() >= -1 and v.max() <= 1 and v.std() > 0.05
    assert m.shape == (K, 4, 12, 12) and m.min() >= 0 and m.max() <= 1
    assert ((m > 0.05) & (m < 0.95)).any()  # soft edges, not re-binarised
    area_small = m.sum((2, 3)) / 12 ** 2
    area_raw = torch.from_numpy(raw).sum((2, 3)) / S ** 2
    assert torch.allclose(area_small, area_raw, atol=0.02), (area_small, area_raw)
    # no entities -> an empty mask tensor with the right trailing shape
    bare = load_clip(dict(rec, entities=[]), frames=4, height=12, width=12, stride=2, start=1)
    assert bare['masks'].shape == (0, 4, 12, 12) and bare['entity_captions'] == []
    with pytest.raises(ValueError, match=r"line \d+: video .*0\d{3}\.mp4 has 9 frames, fewer than the 17"):
        load_clip(rec, frames=9, height=S, width=S, stride=2)

def _bad_manifest(shapes, name, bad_line):
    """A manifest in the shapes folder: a good clip on line 1, `bad_line` on line 2."""
    good = (shapes / 'train.jsonl').read_text().splitlines()[0]
    path = shapes / name
    path.write_text(good + "\n" + bad_line + "\n")
    return path

def test_bad_inputs_give_clear_errors(shapes):
    good = json.loads((shapes / 'train.jsonl').read_text().splitlines()[1])
    # missing video
    p = _bad_manifest(shapes, 'missing.jsonl', json.dumps(dict(good, video='clips/nope.mp4')))
    with pytest.raises(ValueError) as e:
        read_manifest(p)
    assert f"{p} line 2: video clips/nope.mp4 not found" in str(e.value) and "--skip_bad=True" in str(e.value)
    # malformed JSON
    p = _bad_manifest(shapes, 'malformed.jsonl', '{"video": "clips/0001.mp4", "caption": ')
    with pytest.raises(ValueError, match=rf"malformed\.jsonl line 2: malformed JSON"):
        read_manifest(p)
    # corrupt mp4: the manifest reads fine, decoding fails with the line and file named
    (shapes / 'clips' / 'garbage.mp4').write_bytes(b'\x00not an mp4' * 100)
    p = _bad_manifest(shapes, 'corrupt.jsonl', json.dumps(dict(good, video='clips/garbage.mp4')))
    rec = read_manifest(p)[1]
    with pytest.raises(ValueError, match=r"corrupt\.jsonl line 2: video .*garbage\.mp4 could not be decoded"):
        load_clip(rec, frames=3, height=16, width=16)
    # mask with the wrong number of frames: names the mask file and both counts
    np.savez_compressed(shapes / 'masks' / 'short.npz', mask=np.zeros((5, S, S), np.uint8))
    ents = [dict(caption='a thing', mask='masks/short.npz')]
    p = _bad_manifest(shapes, 'shortmask.jsonl', json.dumps(dict(good, entities=ents)))
    with pytest.raises(ValueError, match=r"shortmask\.jsonl line 2: mask .*short\.npz has 5 frames but video .* has 9"):
        load_clip(read_manifest(p)[1], frames=3, height=16, width=16)
    # required key
    p = _bad_manifest(shapes, 'nocaption.jsonl', json.dumps(dict(video=good['video'])))
    with pytest.raises(ValueError, match=r"nocaption\.jsonl line 2: missing required key 'caption'"):
        read_manifest(p)

def test_skip_bad_skips_and_counts(shapes, capsys):
    lines = (shapes / 'train.jsonl').read_text().splitlines()[:3]
    good = json.loads(lines[1])
    (shapes / 'clips' / 'garbage.mp4').write_bytes(b'\x00not an mp4' * 100)
    np.savez_compressed(shapes / 'masks' / 'short.npz', mask=np.zeros((5, S, S), np.uint8))
    bad = [json.dumps(dict(good, video='clips/nope.mp4')),                               # line 4
           '{"video": "clips/0001.mp4", "caption": ',                                    # line 5
           json.dumps(dict(good, video='clips/garbage.mp4')),                            # line 6
           json.dumps(dict(good, entities=[dict(caption='x', mask='masks/short.npz')]))]  # line 7
    p = shapes / 'mixed.jsonl'
    p.write_text("\n".join(lines + bad) + "\n")
    with pytest.raises(ValueError, match="line 4"):
        read_manifest(p)
    assert len(read_manifest(p, skip_bad=True)) == 5  # cheap checks only: missing file, bad JSON
    out = capsys.readouterr().out
    assert out.count("skipped") == 1 and "skipped 2 of 7 clips" in out and "line 4" in out and "line 5" in out
    # the loader with skip_bad probes decoding too, so corrupt videos and bad masks drop out up front
    loader = ClipLoader(p, batch_size=3, frames=3, height=16, width=16, skip_bad=True)
    out = capsys.readouterr().out
    assert out.count("skipped") == 1 and "skipped 4 of 7 clips" in out
    assert all(f"line {i}" in out for i in (4, 5, 6, 7)) and "garbage.mp4" in out and "short.npz" in out
    assert len(loader.records) == 3 and next(iter(loader))['video'].shape == (3, 3, 3, 16, 16)
    # without skip_bad, the load-time error surfaces from the loader with its message intact
    p2 = _bad_manifest(shapes, 'corrupt2.jsonl', bad[2])
    with pytest.raises(ValueError, match=r"corrupt2\.jsonl line 2: video .*garbage\.mp4"):
        for _ in ClipLoader(p2, batch_size=1, frames=3, height=16, width=16, seed=0):
            pass
    with pytest.raises(ValueError, match=r"has 2 usable clips, fewer than world_size\*batch_size = 2\*2 = 4"):
        ClipLoader(p2, batch_size=2, frames=3, height=16, width=16, world_size=2)

def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]

def test_loader_ranks_are_disjoint_and_equal(shapes):
    kw = dict(batch_size=2, frames=3, height=16, width=16, world_size=2, seed=3)
    r0, r1 = (ClipLoader(shapes / 'uniq.jsonl', rank=r, **kw) for r in (0, 1))
    assert r0.batches_per_epoch == r1.batches_per_epoch == 2
    b0, b1 = _take(r0, 2), _take(r1, 2)
    c0 = [c for b in b0 for c in b['caption']]
    c1 = [c for b in b1 for c in b['caption']]
    assert len(set(c0)) == len(set(c1)) == 4 and not set(c0) & set(c1)
    assert r0.state_dict() == r1.state_dict() == {'epoch': 1, 'step': 0}
    b = b0[0]
    assert b['video'].shape == (2, 3, 3, 16, 16) and len(b['masks']) == 2
    assert all(m.shape[1:] == (3, 16, 16) and m.shape[0] == len(e) for m, e in zip(b['masks'], b['entity_captions']))
    # 7 clips over 2 ranks: shares truncated to 3 each -> still the same number of batches
    lines = (shapes / 'uniq.jsonl').read_text().splitlines()[:7]
    (shapes / 'seven.jsonl').write_text("\n".join(lines) + "\n")
    kw['batch_size'] = 1
    assert [ClipLoader(shapes / 'seven.jsonl', rank=r, **kw).batches_per_epoch for r in (0, 1)] == [3, 3]

def test_loader_resume_and_workers(shapes):
    kw = dict(batch_size=3, frames=3, height=16, width=16, seed=5)
    ref_loader = ClipLoader(shapes / 'uniq.jsonl', **kw)
    assert ref_loader.batches_per_epoch == 2
    ref, states, it = [], [], iter(ref_loader)
    for _ in range(6):
        ref.append(next(it))
        states.append(ref_loader.state_dict())
    assert states[2] == {'epoch': 1, 'step': 1}
    # epochs reshuffle, and temporal offsets are drawn (not every clip starts at frame 0)
    assert ref[0]['caption'] + ref[1]['caption'] != ref[2]['caption'] + ref[3]['caption']
    recs = {r['caption']: r for r in ref_loader.records}
    at0 = [torch.equal(v, load_clip(recs[c], 3, 16, 16)['video']) for b in ref for v, c in zip(b['video'], b['caption'])]
    assert not all(at0)
    for taken in (1, 3):  # after 1 batch the next two cross into epoch 1; after 3 we are mid-epoch 1
        fresh = ClipLoader(shapes / 'uniq.jsonl', **kw)
        fresh.load_state_dict(states[taken - 1])
        for got, want in zip(_take(fresh, 2), ref[taken:taken + 2]):
            assert torch.equal(got['video'], want['video']) and got['caption'] == want['caption']
            assert all(torch.equal(a, b) for a, b in zip(got['masks'], want['masks']))
    # worker processes give identical batches (offsets do not depend on who loads the clip)
    par = ClipLoader(shapes / 'uniq.jsonl', num_workers=2, **kw)
    par.load_state_dict(states[0])
    got = _take(par, 3)
    assert par.state_dict() == states[3]
    for g, w in zip(got, ref[1:4]):
        assert torch.equal(g['video'], w['video']) and g['caption'] == w['caption']

def test_write_video_roundtrip(tmp_path):
    # a smooth gradient survives crf-10 x264 nearly intact; frame count, size and value range must too
    y, x = torch.meshgrid(torch.linspace(-0.8, 0.8, 24), torch.linspace(-0.8, 0.8, 40), indexing='ij')
    video = torch.stack([torch.stack([x, y, (x + y) / 2 * (1 - t / 5)]) for t in range(5)], 1)  # [3, 5, 24, 40]
    write_video(str(tmp_path / 'v.mp4'), video, fps=8)
    assert os.listdir(tmp_path) == ['v.mp4']  # the temp file was renamed away
    back = torch.from_numpy(_decode(tmp_path / 'v.mp4')).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert back.shape == video.shape
    assert (back - video).abs().mean() < 0.03


# ---------------------------------------------------------------------------------------------- training and sampling

@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A toy set of 8 clips at 32x32 and a 60-iteration debug run on it."""
    root = tmp_path_factory.mktemp('run')
    make_shapes(root / 'data', n_train=8, n_val=2, frames=17, size=32, fps=8, seed=0)
    args = [f'--data={root}/data/train.jsonl', '--frames=9', '--height=32', '--width=32', '--batch_size=4',
            '--log_interval=1', '--warmup_iters=5']
    r = run('train_dit.py', *args, f'--out_dir={root}/a', '--max_iters=60', '--ckpt_interval=1000')
    assert r.returncode == 0, r.stderr
    return root, args, r.stdout


def losses(log):
    return {int(line.split()[1][:-1]): float(line.split()[3][:-1]) for line in log.splitlines() if line.startswith('iter ')}


def test_training_lowers_the_loss(tiny_run):
    root, _, log = tiny_run
    loss = losses(log)
    first, last = [loss[i] for i in range(1, 11)], [loss[i] for i in range(51, 61)]
    print(f'loss first 10 iters {sum(first) / 10:.4f}, last 10 iters {sum(last) / 10:.4f}')
    assert sum(last) < 0.85 * sum(first)
    assert json.load(open(root / 'a' / 'config.json'))['max_iters'] == 60


def test_resume_continues_exactly(tiny_run):
    root, args, _ = tiny_run
    full = run('train_dit.py', *args, f'--out_dir={root}/full', '--max_iters=5')
    half = run('train_dit.py', *args, f'--out_dir={root}/half', '--max_iters=3')
    rest = run('train_dit.py', *args, f'--out_dir={root}/half', '--max_iters=5', '--init_from=resume')
    assert full.returncode == half.returncode == rest.returncode == 0, rest.stderr
    assert sorted(losses(rest.stdout)) == [4, 5]  # 2 batches per epoch: iteration 5 is in a new epoch
    assert losses(rest.stdout)[4] == losses(full.stdout)[4] and losses(rest.stdout)[5] == losses(full.stdout)[5]
    a = torch.load(root / 'full' / 'ckpt.pt', weights_only=False)
    b = torch.load(root / 'half' / 'ckpt.pt', weights_only=False)
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['loader'] == b['loader'] and torch.equal(a['rng'], b['rng'])


def test_sample_writes_a_video(tiny_run):
    import decord
    root, _, _ = tiny_run
    r = run('sample.py', f'--out_dir={root}/a', '--steps=4', f'--out={root}/s.mp4')
    assert r.returncode == 0, r.stderr
    vr = decord.VideoReader(str(root / 's.mp4'))
    assert (len(vr), *vr[0].shape) == (9, 32, 32, 3)
    assert abs(vr.get_avg_fps() - 4) < 1e-3  # 8 fps source, every 2nd frame
    r = run('sample.py', f'--out_dir={root}/nothing')
    assert r.returncode != 0 and 'train first' in r.stderr


# ---------------------------------------------------------------------------------------------- unipc

def official_base_grid(steps):
    """Official FlowUniPCMultistepScheduler(shift=1).set_timesteps base grid: linspace(sigma_max, sigma_min) taken
    from its float32 training sigmas 1 - linspace(1, 1/1000, 1000)[::-1]."""
    train = (1.0 - torch.from_numpy(np.linspace(1, 1 / 1000, 1000)[::-1].copy())).float()
    return np.linspace(train[0].item(), train[-1].item(), steps + 1)[:-1]


def diffusers_unipc(steps, shift):
    from diffusers import UniPCMultistepScheduler
    ref = UniPCMultistepScheduler(prediction_type='flow_prediction', use_flow_sigmas=True, num_train_timesteps=1000,
                                  flow_shift=shift, solver_order=2, solver_type='bh2', predict_x0=True,
                                  lower_order_final=True, disable_corrector=[], final_sigmas_type='zero')
    # diffusers' own flow grid is linspace(1, 1/1000)[:-1] (0.001 above the official one, e.g. 40 steps/shift 12
    # ends ...391 242 instead of ...386 235), so pass the official base grid; diffusers applies flow_shift to it.
    ref.set_timesteps(sigmas=official_base_grid(steps))
    ref.set_begin_index(0)  # its timestep lookup would skip sigma[0] if the first timestep repeats
    return ref


@pytest.mark.parametrize('shift,steps', [(1, 3), (5, 10), (5, 40), (5, 50), (12, 10), (12, 40), (12, 50)])
def test_unipc_schedule_matches_diffusers(shift, steps):
    ours, ref = UniPC(steps, shift), diffusers_unipc(steps, shift)
    assert ours.sigmas.dtype == torch.float64 and ours.timesteps.dtype == torch.int64
    assert len(ours.timesteps) == steps and len(ours.sigmas) == steps + 1 and ours.sigmas[-1] == 0
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert torch.allclose(ours.sigmas, ref.sigmas.double(), rtol=0, atol=1e-6)
    assert torch.equal(ours.sigmas.float(), ref.sigmas)  # diffusers keeps float32 sigmas


@pytest.mark.parametrize('shift,steps', [(5, 10), (5, 40), (5, 50), (12, 10), (12, 40), (12, 50)])
def test_unipc_steps_match_diffusers(shift, steps):
    ours, ref = UniPC(steps, shift), diffusers_unipc(steps, shift)
    g = torch.Generator().manual_seed(steps * 100 + shift)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    y = x.clone()
    for t in ref.timesteps:
        v = torch.randn(x.shape, generator=g)  # the same "model output" for both
        x, y = ours.step(v, x), ref.step(v, t, y).prev_sample
        assert x.dtype == torch.float32
        assert (x - y).abs().max() <= 1e-5 * y.abs().max(), int(t)
    with pytest.raises(IndexError):
        ours.step(v, x)


def test_unipc_wan22_timesteps_and_expert_split():
    t2v = UniPC(40, 12).timesteps
    assert t2v.tolist() == [999, 997, 995, 993, 990, 988, 985, 982, 979, 976, 972, 969, 965, 961, 956, 952, 947, 941,
                            936, 929, 922, 915, 907, 898, 888, 877, 865, 852, 837, 819, 799, 776, 749, 717, 678, 631,
                            571, 492, 386, 235]
    assert expert_split(t2v, 0.875) == 26  # T2V-A14B: 26 high-noise + 14 low-noise steps
    i2v = UniPC(40, 5).timesteps
    assert expert_split(i2v, 0.9) == 15 and i2v[14] == 902 and i2v[15] < 900  # I2V-A14B: 15 high + 25 low
    ti2v = UniPC(50, 5).timesteps
    assert ti2v[:3].tolist() == [999, 995, 991] and ti2v[-3:].tolist() == [241, 172, 92]
    assert expert_split(torch.tensor([901, 900, 899]), 0.9) == 2  # official: t >= boundary goes to the high expert


@pytest.mark.parametrize('shift,steps', [(5, 10), (12, 40)])
def test_unipc_straight_flow_lands_on_x0(shift, steps):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 3, 8, 8, generator=g).unbind(0)
    solver = UniPC(steps, shift)
    x = (1 - solver.sigmas[0].float()) * x0 + solver.sigmas[0].float() * eps  # x_t at the first sigma
    for _ in solver.timesteps:
        x = solver.step(eps - x0, x)  # the exact, constant velocity of the straight path
    assert (x - x0).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------- V-JEPA

def randomise(model, seed=0):
    """Every parameter random, norms and modality vectors included, at scales that keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if 'mod_embed' in name:
                p.copy_(0.5 * r)
            elif p.ndim >= 2:
                p.copy_(r / p[0].numel() ** 0.5)
            else:
                p.copy_(1 + 0.2 * r if name.endswith('weight') else 0.2 * r)
    return model


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ------------------------------------------------------------------ V-JEPA 2 against transformers VJEPA2Model

def hf_to_official(sd):
    """transformers VJEPA2Model encoder weights -> the official layout, as in the released .pt files."""
    out = {}
    for k, v in sd.items():
        if not k.startswith('encoder.'):
            continue  # the predictor
        k = re.sub(r'^encoder\.', '', k)
        k = re.sub(r'^embeddings\.patch_embeddings\.proj\.', 'patch_embed.proj.', k)
        k = re.sub(r'^layernorm\.', 'norm.', k)
        k = re.sub(r'^layer\.(\d+)\.attention\.', r'blocks.\1.attn.', k)
        k = re.sub(r'^layer\.(\d+)\.', r'blocks.\1.', k)
        out[k] = v
    for k in [k for k in out if '.attn.query.' in k]:  # fuse q, k, v rows into qkv
        out[k.replace('.query.', '.qkv.')] = torch.cat([out.pop(k.replace('.query.', f'.{n}.'))
                                                        for n in ('query', 'key', 'value')])
    return {'module.backbone.' + k: v for k, v in out.items()}


@pytest.fixture(scope='module')
def hf_vjepa2():
    transformers = pytest.importorskip('transformers')
    c = vjepa_configs['debug']
    config = transformers.VJEPA2Config(
        hidden_size=c['dim'], num_hidden_layers=c['depth'], num_attention_heads=c['heads'],
        mlp_ratio=c['mlp'] / c['dim'], crop_size=c['res'], frames_per_clip=8, tubelet_size=2, patch_size=16,
        pred_hidden_size=32, pred_num_hidden_layers=1, pred_num_attention_heads=2, attn_implementation='eager')
    return randomise(transformers.VJEPA2Model(config).eval(), seed=1)


def test_vjepa2_matches_transformers(hf_vjepa2, tmp_path):
    sd = hf_to_official(hf_vjepa2.state_dict())
    assert len(sd) == 2 + 12 * 2 + 2 and all(k.startswith('module.backbone.') for k in sd)
    other = {k: v * 1.5 if k.endswith('qkv.weight') else v for k, v in sd.items()}
    path = tmp_path / 'vjepa2.pt'
    torch.save({'encoder': other, 'target_encoder': {**sd, 'module.backbone.pos_embed': torch.zeros(1, 64, 128)},
                'epoch': 7, 'lr': 1e-4}, path)
    x = torch.randn(2, 3, 8, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf_vjepa2(pixel_values_videos=x.transpose(1, 2), skip_predictor=True).last_hidden_state  # [B, T, C, H, W]
        model = load_vjepa(str(path), 'debug')  # default sub-dict: target_encoder; prefixes and pos_embed dropped
        out = model(x)
        assert out.shape == ref.shape == (2, 4 * 4 * 4, 128)
        err = rel_err(out, ref)
        assert err < 2e-5, err
        assert not any(p.requires_grad for p in model.parameters())
        # the `encoder` sub-dict is a different model; a V2 file with only `encoder` falls back to it
        assert rel_err(load_vjepa(str(path), 'debug', key='encoder')(x), ref) > 1e-2
        flat = tmp_path / 'flat.pt'
        torch.save({'encoder': sd}, flat)
        assert rel_err(load_vjepa(str(flat), 'debug')(x), ref) < 2e-5
        torch.save(sd, flat)  # a bare state dict
        assert rel_err(load_vjepa(str(flat), 'debug')(x), ref) < 2e-5


# ------------------------------------------------------------------ RoPE and 2.1 against the fact-sheet formulas

def direct_rope(grid, head_dim, version):
    """reference/vjepa.md 1.3, written out channel by channel in float64."""
    T, H, W = grid
    s = 2 * ((head_dim // 3) // 2)
    N = T * H * W
    cos, sin = torch.ones(N, head_dim, dtype=torch.float64), torch.zeros(N, head_dim, dtype=torch.float64)
    for n in range(N):
        t, h, w = n // (H * W), (n % (H * W)) // W, n % W
        if version == 2.1:
            h = h * (16 - 1) / (H - 1) if H > 1 else 0.0
            w = w * (16 - 1) / (W - 1) if W > 1 else 0.0
        for axis, pos in enumerate((t, h, w)):
            for j in range(s):
                k = j // 2 if version == 2.1 else j % (s // 2)
                a = pos / 10000 ** (k / (s / 2))
                cos[n, axis * s + j], sin[n, axis * s + j] = math.cos(a), math.sin(a)
    return cos, sin


def direct_rotate(x, cos, sin):
    rot = torch.empty_like(x)
    rot[..., 0::2], rot[..., 1::2] = -x[..., 1::2], x[..., 0::2]
    return x * cos + rot * sin


@pytest.mark.parametrize('version', [2, 2.1])
@pytest.mark.parametrize('head_dim', [64, 80])
def test_rope_tables_and_rotation_match_formulas(version, head_dim):
    g = torch.Generator().manual_seed(0)
    for grid in [(3, 4, 6), (2, 1, 5)]:  # non-square, and a 1-row grid (the 2.1 rescale must not divide by zero)
        cos, sin = rope_tables(grid, head_dim, version, torch.device('cpu'))
        dcos, dsin = direct_rope(grid, head_dim, version)
        assert cos.dtype == torch.float32 and torch.isfinite(cos).all()
        assert (cos.double() - dcos).abs().max() < 1e-6 and (sin.double() - dsin).abs().max() < 1e-6
        q = torch.randn(2, 3, math.prod(grid), head_dim, generator=g)
        assert (rope_apply(q, cos, sin).double() - direct_rotate(q.double(), dcos, dsin)).abs().max() < 1e-5
    # the two layouts really differ (a swapped layout would fail the check above)
    other = direct_rope((3, 4, 6), head_dim, 2.1 if version == 2 else 2)[0]
    assert (rope_tables((3, 4, 6), head_dim, version, torch.device('cpu'))[0].double() - other).abs().max() > 0.1


def ln(x, w, b):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt((x - mu).pow(2).mean(-1, keepdim=True) + 1e-6) * w + b


def direct_block(sd, p, x, heads, cos, sin):
    B, N, D = x.shape
    hd = D // heads
    y = ln(x, sd[p + 'norm1.weight'], sd[p + 'norm1.bias'])
    qkv = y @ sd[p + 'attn.qkv.weight'].T + sd[p + 'attn.qkv.bias']
    q, k, v = (qkv[..., i * D:(i + 1) * D].reshape(B, N, heads, hd).transpose(1, 2) for i in range(3))
    q, k = direct_rotate(q, cos, sin), direct_rotate(k, cos, sin)
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1) @ v
    x = x + a.transpose(1, 2).reshape(B, N, D) @ sd[p + 'attn.proj.weight'].T + sd[p + 'attn.proj.bias']
    y = ln(x, sd[p + 'norm2.weight'], sd[p + 'norm2.bias']) @ sd[p + 'mlp.fc1.weight'].T + sd[p + 'mlp.fc1.bias']
    y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
    return x + y @ sd[p + 'mlp.fc2.weight'].T + sd[p + 'mlp.fc2.bias']


def direct_vjepa21(model, x, heads, depth):
    """The 2.1 encoder from the fact sheet: tubelet (or image) patches, modality vector, blocks, norms_block[3]."""
    sd = {k: v.double() for k, v in model.state_dict().items()}
    B, C, T, H, W = x.shape
    image = T == 1
    kt = 1 if image else 2
    grid = (T // kt, H // 16, W // 16)
    patches = x.double().reshape(B, C, grid[0], kt, grid[1], 16, grid[2], 16).permute(0, 2, 4, 6, 1, 3, 5, 7)
    pe = 'patch_embed_img.proj.' if image else 'patch_embed.proj.'
    w = sd[pe + 'weight']
    h = patches.reshape(B, math.prod(grid), -1) @ w.reshape(w.shape[0], -1).T + sd[pe + 'bias']
    h = h + sd['img_mod_embed' if image else 'video_mod_embed'][0]
    cos, sin = direct_rope(grid, w.shape[0] // heads, 2.1)
    for i in range(depth):
        h = direct_block(sd, f'blocks.{i}.', h, heads, cos, sin)
    return ln(h, sd['norms_block.3.weight'], sd['norms_block.3.bias'])


def test_vjepa21_block_and_forward_match_formulas():
    c = vjepa_configs['vjepa2.1-debug']
    model = randomise(VJEPA(**c), seed=2).eval()
    g = torch.Generator().manual_seed(3)
    video = torch.randn(2, 3, 4, 48, 80, generator=g)  # a 2 x 3 x 5 token grid
    image = torch.randn(2, 3, 1, 48, 80, generator=g)
    with torch.no_grad():
        x = torch.randn(2, 15, c['dim'], generator=g)
        out = model.blocks[0](x, *rope_tables((1, 3, 5), 64, 2.1, torch.device('cpu')))
        ref = direct_block({k: v.double() for k, v in model.state_dict().items()}, 'blocks.0.', x.double(), c['heads'],
                           *direct_rope((1, 3, 5), 64, 2.1))
        assert rel_err(out, ref) < 1e-5
        x = 0.01 * x  # a small residual stream, where LayerNorm's eps (1e-6, not torch's 1e-5) shows
        out = model.blocks[0](x, *rope_tables((1, 3, 5), 64, 2.1, torch.device('cpu')))
        ref = direct_block({k: v.double() for k, v in model.state_dict().items()}, 'blocks.0.', x.double(), c['heads'],
                           *direct_rope((1, 3, 5), 64, 2.1))
        assert rel_err(out, ref) < 1e-5
        assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
        assert model.token_grid(4, 48, 80) == (2, 3, 5) and model.token_grid(1, 48, 80) == (1, 3, 5)
        out = model(video)
        assert out.shape == (2, 30, c['dim'])
        assert rel_err(out, direct_vjepa21(model, video, c['heads'], c['depth'])) < 1e-5
        out = model(image)  # the image path: patch_embed_img + img_mod_embed
        assert out.shape == (2, 15, c['dim'])
        assert rel_err(out, direct_vjepa21(model, image, c['heads'], c['depth'])) < 1e-5
        # the image path is not the video path on a repeated frame
        assert rel_err(model(image.repeat(1, 1, 2, 1, 1)), out) > 1e-2
    with pytest.raises(ValueError, match='even frame count'):
        VJEPA(**vjepa_configs['debug']).token_grid(1, 48, 80)  # V2 has no image path
    with pytest.raises(ValueError, match='divisible by 16'):
        model.token_grid(4, 40, 80)


# ------------------------------------------------------------------ loading: refusals and reports

def save(path, obj):
    torch.save(obj, path)
    return str(path)


def test_load_refuses_wrong_variant_heads_and_keys(tmp_path):
    # a real g-shaped qkv (zero-stride, so it costs nothing) named as a variant with other dims
    g_qkv = torch.zeros(()).expand(3 * 1408, 1408)
    path = save(tmp_path / 'vitg.pt', {'target_encoder': {'module.backbone.blocks.0.attn.qkv.weight': g_qkv}})
    for name, want in [('vith', (3840, 1280)), ('vjepa2.1-vitG', (4992, 1664))]:
        with pytest.raises(ValueError) as e:
            load_vjepa(path, name)
        msg = str(e.value)
        assert path in msg and 'blocks.0.attn.qkv.weight' in msg and '(4224, 1408)' in msg and str(want) in msg
        assert 'of that width: vitg, vitg-384, vjepa2.1-vitg)' in msg
    # the same check at tiny size: a checkpoint whose width implies head_dim 48 for the 2 heads of 'debug' (64)
    wide = VJEPA(dim=96, depth=2, heads=2, mlp=512).state_dict()
    path = save(tmp_path / 'wide.pt', {'target_encoder': {'module.backbone.' + k: v for k, v in wide.items()}})
    with pytest.raises(ValueError, match=r'\(288, 96\) but .debug. needs \(384, 128\).*head_dim 48'):
        load_vjepa(path, 'debug')
    # heads cannot be read from shapes: an explicit head count other than the variant's is refused
    with pytest.raises(ValueError, match=r"'vitg' has 22 heads, not heads=16"):
        load_vjepa(path, 'vitg', heads=16)
    with pytest.raises(ValueError, match=r"'vjepa2.1-vitG' has 26 heads, not heads=16"):
        load_vjepa(path, 'vjepa2.1-vitG', heads=16)
    with pytest.raises(ValueError, match=r"unknown V-JEPA variant 'vit-l'; known: vitl, vith"):
        load_vjepa(path, 'vit-l')
    # wrong or missing sub-dict: named, with what the file has
    good = {'module.backbone.' + k: v for k, v in VJEPA(**vjepa_configs['debug']).state_dict().items()}
    path = save(tmp_path / 'v2.pt', {'encoder': good, 'epoch': 1})
    with pytest.raises(ValueError, match=r"v2.pt has no 'ema_encoder' entry \(it has 'encoder', 'epoch'\); pass key="):
        load_vjepa(path, 'debug', key='ema_encoder')
    with pytest.raises(ValueError, match=r"has no 'ema_encoder' entry"):  # the 2.1 B/L default
        load_vjepa(path, 'vjepa2.1-vitb')
    with pytest.raises(ValueError, match=r"has no 'target_encoder' entry"):  # 2.1 g/G: no fallback to `encoder`
        load_vjepa(path, 'vjepa2.1-vitg')
    # strict: missing and unexpected keys by name (a V2 checkpoint loaded as 2.1)
    with pytest.raises(ValueError, match=r'missing: .*norms_block.0.weight.*unexpected: norm.weight, norm.bias'):
        load_vjepa(path, 'vjepa2.1-debug', key='encoder')
    bad = {k: v for k, v in good.items() if not k.endswith('blocks.1.mlp.fc2.bias')}
    path = save(tmp_path / 'bad.pt', {'encoder': {**bad, 'module.backbone.extra.weight': torch.zeros(1)}})
    with pytest.raises(ValueError, match=r"bad.pt \['encoder'\] does not match VJEPA: "
                                         r"1 missing: blocks.1.mlp.fc2.bias; 1 unexpected: extra.weight"):
        load_vjepa(path, 'debug')


# ------------------------------------------------------------------ real configs on the meta device

def test_real_config_sizes():
    def block_params(d, m):
        return 3 * d * d + 3 * d + d * d + d + 2 * d * m + m + d + 4 * d
    for name, c in vjepa_configs.items():
        with torch.device('meta'):
            model = VJEPA(**c)
        n_tensors = len(model.state_dict())
        assert n_tensors == 2 + 12 * c['depth'] + (2 if c['version'] == 2 else 8 + 2 + 2), name
        d, m = c['dim'], c['mlp']
        n = 3 * 2 * 256 * d + d + c['depth'] * block_params(d, m) + (
            2 * d if c['version'] == 2 else 8 * d + 3 * 256 * d + d + 2 * d)
        assert sum(p.numel() for p in model.parameters()) == n, name
        assert d // c['heads'] == 64 or name == 'vith'
    counts = {}
    for name in ['vitl', 'vjepa2.1-vitl', 'vjepa2.1-vitb']:
        with torch.device('meta'):
            counts[name] = len(VJEPA(**vjepa_configs[name]).state_dict())
    assert counts == {'vitl': 292, 'vjepa2.1-vitl': 302, 'vjepa2.1-vitb': 158}  # reference/vjepa.md section 2
    with torch.device('meta'):
        numel = {k: sum(p.numel() for p in VJEPA(**vjepa_configs[k]).parameters())
                 for k in ['vitl', 'vith', 'vitg', 'vjepa2.1-vitb', 'vjepa2.1-vitG']}
    assert numel['vitl'] == 303_885_312
    assert 0.6e9 < numel['vith'] < 0.66e9 and 0.95e9 < numel['vitg'] < 1.05e9
    assert 80e6 < numel['vjepa2.1-vitb'] < 90e6 and 1.8e9 < numel['vjepa2.1-vitG'] < 2.1e9
    assert vjepa_configs['vitg']['mlp'] == int(1408 * 48 / 11)  # the odd MLP ratios of g and G
    assert vjepa_configs['vjepa2.1-vitG']['mlp'] == int(1664 * 64 / 13)


# ------------------------------------------------------------------ preprocessing

def test_preprocess_grid_normalisation_and_centre_crop():
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    video = torch.zeros(2, 3, 4, 64, 128)
    video[..., :16], video[..., -16:] = -1, 1  # bars at the far left and right: a centre crop cuts both away
    out = preprocess(video, (2, 2))
    assert out.shape == (2, 3, 4, 32, 32)
    assert torch.allclose(out, ((0.5 - mean) / std).view(1, 3, 1, 1, 1).expand_as(out), atol=1e-6)
    # a tall video with a different value per row band; the grid is non-square, the result covers the middle rows
    video = torch.linspace(-1, 1, 96).view(1, 1, 1, 96, 1).expand(1, 3, 2, 96, 32).contiguous()
    out = preprocess(video, (2, 1))  # 32 x 16 pixels: scale 0.5 -> 48 x 16, rows 8:40 kept
    assert out.shape == (1, 3, 2, 32, 16)
    col = out[0, 0, 0, :, 0] * std[0] + mean[0]
    # output row i samples input row 2i + 0.5 of the ramp row/95: rows 8..39 of 48 -> input rows 16.5..78.5
    assert abs(col[0] - 16.5 / 95) < 1e-4 and abs(col[-1] - 78.5 / 95) < 1e-4
    # downsampling is antialiased: 4-pixel stripes shrunk 4x blur to +-0.5 (plain bilinear would alias them to +-1)
    stripes = torch.where(torch.arange(128) % 8 < 4, 1.0, -1.0).expand(1, 3, 2, 128, 128)
    out = (preprocess(stripes, (2, 2)) * std.view(1, 3, 1, 1, 1) + mean.view(1, 3, 1, 1, 1)) * 2 - 1
    assert out[..., 1:-1].abs().max() < 0.6
    same = torch.rand(1, 3, 2, 32, 48) * 2 - 1  # already at the grid's size: only normalised
    want = ((same + 1) / 2 - mean.view(1, 3, 1, 1, 1)) / std.view(1, 3, 1, 1, 1)
    assert torch.allclose(preprocess(same, (2, 3)), want, atol=1e-6)
