"""Tests: python -m pytest -q test_sara.py (CPU, a few minutes on 2 cores)."""
import collections
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

import models.checkpoint as checkpoint
from data import COLOURS, ClipLoader, load_clip, make_shapes, read_manifest, write_video
from models.aligner import Aligner, auroc, build_queries, info_nce, iou, mask_targets, tokenize
from models.checkpoint import (DIT_CONFIG, DIT_FROM_DIFFUSERS, INDEX, WEIGHTS, expert_folders, export_dit, load_dit,
                               load_pth, load_state_dict, load_weights, pth_to_safetensors, rename, T5_FROM_TRANSFORMERS,
                               vae_from_diffusers)
from models.settings import choice, configure
from models.t5 import T5Encoder, Tokenizer, build_tokenizer, clean_text, configs as t5_configs, encode
from models.trd import pair_budget, trd_loss
from models.unipc import UniPC, expert_split
from models.vae import PixelCodec, WanVAE, configs as vae_configs, load_codec
from models.vjepa import MEAN, STD, VJEPA, configs as vjepa_configs, load_vjepa, preprocess, rope_apply, rope_tables
from models.wan import WanModel, autocast, configs as wan_configs

ROOT = os.path.dirname(os.path.abspath(__file__))


def run(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=None if env is None else {**os.environ, **env})


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


def test_choice_settings(tmp_path, capsys):
    path = tmp_path / 'script.py'
    path.write_text("amp = choice('auto', 'on', 'off')  # bf16 autocast\ncfg = configure(globals(), __file__)\n")
    g = {'choice': choice}
    exec(compile(path.read_text().replace('cfg = configure(globals(), __file__)', ''), str(path), 'exec'), g)
    assert configure(dict(g), str(path), ['--amp=on']) == {'amp': 'on'}
    assert type(configure(dict(g), str(path), [])['amp']) is str
    with pytest.raises(SystemExit, match="setting 'amp' is 'bf16': choose auto, on, off"):
        configure(dict(g), str(path), ['--amp=bf16'])
    with pytest.raises(SystemExit, match=r"'of' \(did you mean off\?\)"):
        configure(dict(g), str(path), ['--amp=of'])
    with pytest.raises(SystemExit):
        configure(dict(g), str(path), ['--help'])
    assert '(auto | on | off)' in capsys.readouterr().out


def test_help_joins_continued_comments(tmp_path, capsys):
    path = tmp_path / 'script.py'
    path.write_text("steps = 3  # how many\n           # steps to take\nx = [1]\n# a plain comment\nlr = 0.1  # rate\n")
    with pytest.raises(SystemExit):
        settings(path, ['--help'])
    out = capsys.readouterr().out
    assert 'how many steps to take' in out and '--lr' in out and 'plain' not in out


def test_help_lists_every_setting_and_config_json_is_written(tmp_path):
    r = run('train_dit.py', '--help')
    assert r.returncode == 0
    for line in open(os.path.join(ROOT, 'train_dit.py')):
        if line.split('=')[0].strip() in ('max_iters', 'init_from', 'learning_rate'):
            key = line.split('=')[0].strip()
            assert f'--{key}' in r.stdout and line.split('#')[1].strip() in r.stdout
    r = run('train_dit.py', '--max_itres=3')
    assert r.returncode != 0 and "did you mean max_iters" in r.stderr
    r = run('train_dit.py', '--help')  # the motion route is ours, not MoAlign's (whose motion subspace is not public)
    assert 'motion (ours: motion-weighted)' in r.stdout and 'MoAlign' not in r.stdout


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
    assert z.shape == (2, 48, 3, 8, 12)
    torch.testing.assert_close(codec.decode(z), video, atol=1e-6, rtol=0)  # x scale / scale: within an ulp
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
    sd = rename({k: v for k, v in hf.state_dict().items() if k != 'encoder.embed_tokens.weight'},  # a tied copy
                T5_FROM_TRANSFORMERS)
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


def test_t5_gelu_rounds_like_the_official_elementary_ops():
    gate = T5Encoder(**t5_configs['debug']).blocks[0].ffn.gate
    assert isinstance(gate[0], torch.nn.Linear)  # the GELU has no parameters: the key stays ffn.gate.0.weight
    torch.manual_seed(0)
    x = (3 * torch.randn(1 << 16)).to(torch.bfloat16)
    # the official formula op by op: each op in fp32, rounded to bf16 (torch.pow(x, 3.0) is (x * x) * x, each rounded)
    b = lambda t: t.to(torch.bfloat16).float()
    f = x.float()
    inner = b(f + b(0.044715 * b(b(f * f) * f)))
    ref = b(b(0.5 * f) * b(1.0 + b(torch.tanh(b(math.sqrt(2.0 / math.pi) * inner)))))
    out = gate[1](x)
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), ref)
    assert (torch.nn.GELU(approximate='tanh')(x) != out).float().mean() > 0.3  # the fused op rounds once


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
    with pytest.raises(ValueError, match=r"malformed\.jsonl line 2: malformed JSON"):
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
    with pytest.raises(ValueError, match=r"has 2 usable clips, fewer than the 4 of one iteration \(batch_size 2 x 2 "
                                         r"data-parallel ranks x accumulation 1\)"):
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

def test_loader_gives_uint8_clips_that_normalise_to_the_float_ones(shapes):
    from data import normalise
    kw = dict(batch_size=3, frames=3, height=16, width=16, seed=5)
    f32, u8 = _take(ClipLoader(shapes / 'uniq.jsonl', **kw), 2), _take(ClipLoader(shapes / 'uniq.jsonl', uint8=True, **kw), 2)
    for a, b in zip(f32, u8):
        assert b['video'].dtype == torch.uint8 and torch.equal(normalise(b['video']), a['video'])
    if torch.cuda.is_available():  # pinned for asynchronous copies
        assert _take(ClipLoader(shapes / 'uniq.jsonl', uint8=True, pin=True, **kw), 1)[0]['video'].is_pinned()

def test_kept_clips_give_the_decoded_batches_within_their_budget(shapes):
    """Clips kept decoded in memory give the windows decoding gives; past the budget (here 2 clips and a bit) the rest
    are decoded every time."""
    kw = dict(batch_size=3, frames=3, height=16, width=16, seed=5)
    ref = _take(ClipLoader(shapes / 'uniq.jsonl', **kw), 6)
    one = T * 3 * 16 * 16  # a clip of the shapes fixture, resized: T frames, uint8
    kept = ClipLoader(shapes / 'uniq.jsonl', ram=2 * one + 1, **kw)
    got = _take(kept, 6)
    assert len(kept.ds.kept) == 2 and all(v.shape == (T, 3, 16, 16) for v in kept.ds.kept.values())
    for g, w in zip(got, ref):
        assert torch.equal(g['video'], w['video']) and g['caption'] == w['caption']
        assert all(torch.equal(a, b) for a, b in zip(g['masks'], w['masks']))

def test_write_video_roundtrip(tmp_path):
    # a smooth gradient survives crf-10 x264 nearly intact; frame count, size and value range must too
    y, x = torch.meshgrid(torch.linspace(-0.8, 0.8, 24), torch.linspace(-0.8, 0.8, 40), indexing='ij')
    video = torch.stack([torch.stack([x, y, (x + y) / 2 * (1 - t / 5)]) for t in range(5)], 1)  # [3, 5, 24, 40]
    write_video(str(tmp_path / 'v.mp4'), video, fps=8)
    assert os.listdir(tmp_path) == ['v.mp4']  # the temp file was renamed away
    back = torch.from_numpy(_decode(tmp_path / 'v.mp4')).permute(3, 0, 1, 2).float() / 127.5 - 1
    assert back.shape == video.shape
    assert (back - video).abs().mean() < 0.03


def test_write_video_truncates_like_the_official_writer(tmp_path):
    # flat grey frames at levels k + 0.6: the official writer truncates to k (rounding gives k + 1); crf 10 keeps
    # flat frames exact, at grey levels k and k + 1 that both survive yuv420p's limited range
    levels = torch.tensor([50.6, 100.6, 150.6, 200.6])
    video = (levels / 255 * 2 - 1).view(1, -1, 1, 1).expand(3, -1, 32, 32)  # decord misreads tiny sizes like 16x16
    write_video(str(tmp_path / 'v.mp4'), video, fps=8)
    back = torch.from_numpy(_decode(tmp_path / 'v.mp4')).float().mean((1, 2, 3))
    assert (back - levels.floor()).abs().max() < 0.5, back
    # imageio's quality=8 is crf 10 with x264's default preset medium (ref=3, subme=7), as x264 records it
    opts = re.search(rb'options: [^\x00]*', (tmp_path / 'v.mp4').read_bytes()).group().decode()
    assert all(o in opts.split() for o in ('crf=10.0', 'ref=3', 'subme=7', 'me=hex')), opts


# ---------------------------------------------------------------------------------------------- training and sampling

@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    """A toy set of 8 clips at 32x32 and a 60-iteration debug run on it."""
    root = tmp_path_factory.mktemp('run')
    make_shapes(root / 'data', n_train=8, n_val=2, frames=17, size=32, fps=8, seed=0)
    args = [f'--data={root}/data/train.jsonl', '--frames=9', '--height=16', '--width=16', '--batch_size=4',
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


def resumed(script, args, root, stop=3, end=5):
    """An uninterrupted run to `end` in root/full and one stopped at `stop`, then resumed to `end`, in root/half:
    (the full log, the resumed log, both final checkpoints)."""
    full = run(script, *args, f'--out_dir={root}/full', f'--max_iters={end}')
    half = run(script, *args, f'--out_dir={root}/half', f'--max_iters={stop}')
    rest = run(script, *args, f'--out_dir={root}/half', f'--max_iters={end}', '--init_from=resume')
    assert full.returncode == half.returncode == rest.returncode == 0, rest.stderr
    return full.stdout, rest.stdout, *(checkpoint_of(script, root / name) for name in ('full', 'half'))


def checkpoint_of(script, folder):
    """A run's checkpoint as one dict: train_aligner's ckpt.pt, or train_dit's sharded ckpt/ consolidated (its
    meta.pt plus every tensor of the DiT, projector and optimizer)."""
    if script == 'train_aligner.py':
        return torch.load(folder / 'ckpt.pt', weights_only=False)
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    dcp_to_torch_save(folder / 'ckpt', folder / 'consolidated.pt')
    state = torch.load(folder / 'consolidated.pt', weights_only=False)
    return {**torch.load(folder / 'ckpt' / 'meta.pt', weights_only=False), **state}


def test_resume_continues_exactly(tiny_run):
    root, args, _ = tiny_run
    full, rest, a, b = resumed('train_dit.py', args, root)
    assert sorted(losses(rest)) == [4, 5]  # 2 batches per epoch: iteration 5 is in a new epoch
    assert losses(rest)[4] == losses(full)[4] and losses(rest)[5] == losses(full)[5]
    assert a['model'].keys() == b['model'].keys() and len(a['model']) == len(WanModel(**wan_configs['debug']).state_dict())
    assert all(torch.equal(a['model'][k], b['model'][k]) for k in a['model'])
    assert a['ema'].keys() == a['model'].keys() and all(torch.equal(a['ema'][k], b['ema'][k]) for k in a['ema'])
    assert a['loader'] == b['loader'] and a['iter'] == b['iter'] == 5
    assert all(torch.equal(x, y) for x, y in zip(flat(a['optim']), flat(b['optim'])))


def test_ema_follows_the_weights_and_is_sampled(tiny_run, tmp_path):
    """E_k = E_{k-1} + (1 - min(decay, k / (9 + k))) (W_k - E_{k-1}), checked on the checkpoints of iterations 1..3;
    sample.py uses the EMA by default and the trained weights with --ema=False."""
    root, args, _ = tiny_run
    r = run('train_dit.py', *args, f'--out_dir={tmp_path}/e', '--max_iters=3', '--ckpt_interval=1', '--keep_last=0',
            '--ema_decay=0.5')
    assert r.returncode == 0, r.stderr
    from models.checkpoint import load_ckpt_dit
    weights = lambda k, ema: dict(load_ckpt_dit(str(tmp_path / 'e' / f'ckpt-{k:06d}'), ema=ema)[0].named_parameters())
    ema = weights(1, True)
    for k in (2, 3):
        trained = weights(k, False)
        ema = {n: e + (1 - min(0.5, k / (9 + k))) * (trained[n] - e) for n, e in ema.items()}
        kept = weights(k, True)
        assert max((kept[n] - ema[n]).abs().max().item() for n in ema) < 1e-6
        assert max((trained[n] - ema[n]).abs().max().item() for n in ema) > 1e-4
    videos = {}
    for flag in ('True', 'False'):
        out = tmp_path / f'ema-{flag}.mp4'
        r = run('sample.py', f'--out_dir={tmp_path}/e', '--steps=2', f'--out={out}', '--size=32*32', f'--ema={flag}')
        assert r.returncode == 0, r.stderr
        videos[flag] = out.read_bytes()
    assert videos['True'] != videos['False']


def flat(tree):
    """The tensors of a nested dict, in key order."""
    if torch.is_tensor(tree):
        return [tree]
    return [t for k in sorted(tree, key=str) for t in flat(tree[k])] if isinstance(tree, dict) else []


def test_sample_writes_a_video(tiny_run):
    import decord
    root, _, _ = tiny_run
    # (decord misreads some tiny frame sizes, 16x16 among them, so this samples the 16x16 run at 32x32)
    r = run('sample.py', f'--out_dir={root}/a', '--steps=4', f'--out={root}/s.mp4', '--size=32*32')
    assert r.returncode == 0, r.stderr
    vr = decord.VideoReader(str(root / 's.mp4'))
    assert (len(vr), *vr[0].shape) == (9, 32, 32, 3)
    assert abs(vr.get_avg_fps() - 8) < 1e-3  # 8 fps source, every frame (frame_stride 1)
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

def vjepa_hf_to_official(sd):
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
    sd = vjepa_hf_to_official(hf_vjepa2.state_dict())
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


# ---------------------------------------------------------------------------------------------- checkpoints

# a tiny DiT; text_dim 4096 as in every release, so the official config.json needs no text_dim field
TINY = dict(in_dim=16, dim=256, ffn_dim=64, out_dim=16, num_heads=2, num_layers=2)
OFFICIAL_CONFIG = {'_class_name': 'WanModel', '_diffusers_version': '0.33.0', 'model_type': 't2v', 'text_len': 512,
                   'freq_dim': 256, 'eps': 1e-6, **TINY}


def randomise_dit(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():  # every weight random, so a weight loaded into the wrong place shows
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


def dit_inputs(text_dim=4096):
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 16, 2, 4, 6, generator=g), torch.randn(2, 8, text_dim, generator=g)
    return x, torch.tensor([700.0, 30.0]), ctx


def run_dit(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_cpu_bf16_autocast_keeps_the_fp32_islands():
    """amp on the CPU: bf16 matmuls and attention (RoPE's fp32 q, k cast for SDPA), fp32 time embedding, modulation,
    residual stream and head, so the velocity comes out fp32 and close to the fp32 forward; amp=off is fp32 exactly."""
    model = randomise_dit(WanModel(in_dim=16, dim=64, ffn_dim=96, out_dim=16, num_heads=2, num_layers=2,
                                   text_dim=4096, text_len=8))
    inputs, cpu = dit_inputs(), torch.device('cpu')
    ref = run_dit(model, inputs)
    with autocast(cpu, 'off'):
        assert torch.equal(run_dit(model, inputs), ref)
    seen = []
    model.head.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    model.blocks[0].ffn[0].register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with autocast(cpu, 'on'):
        out = run_dit(model, inputs)
    assert out.dtype == torch.float32 and seen == [torch.bfloat16, torch.float32]  # the FFN's matmul, the head's
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 2e-2, rel


@pytest.mark.parametrize('L, M, dtype, tol', [(45, 45, torch.float32, 1e-5), (192, 64, torch.bfloat16, 1e-2),
                                               (2048, 2048, torch.float32, 0)])
def test_cpu_attention_is_sdpa(L, M, dtype, tol):
    """The CPU's two-matmul attention gives SDPA's output and gradients (bf16: within its rounding); past 2**24
    probabilities it is SDPA itself."""
    from models.wan import attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, n, 4, 32, generator=g).to(dtype).requires_grad_() for n in (L, M, M))
    dout = torch.randn(2, L, 4, 32, generator=g).to(dtype)
    outs = []
    for fn in (lambda: attention(q, k, v, scale=0.3),
               lambda: F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=0.3).transpose(1, 2)):
        out = fn()
        outs.append([out.float(), *(x.float() for x in torch.autograd.grad(out, (q, k, v), dout))])
    for a, b in zip(*outs):
        assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), (a - b).abs().max()


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def write_official(sd, folder, shards=2):
    """An official DiT folder written by hand: config.json, shards -0000N-of-0000M and the index json."""
    os.makedirs(folder)
    keys, weight_map = list(sd), {}
    for i in range(shards):
        name = f'diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors'
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        save_file({k: sd[k].contiguous() for k in part}, os.path.join(folder, name), metadata={'format': 'pt'})
        weight_map.update(dict.fromkeys(part, name))
    with open(os.path.join(folder, INDEX), 'w') as f:
        json.dump({'metadata': {'total_size': 0}, 'weight_map': weight_map}, f)
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump(OFFICIAL_CONFIG, f)
    return folder


@pytest.fixture(scope='module')
def dit(tmp_path_factory):
    """A random diffusers WanTransformer3DModel saved by itself (sharded); the same weights in the official layout."""
    from diffusers import WanTransformer3DModel
    root = tmp_path_factory.mktemp('dit')
    ref = randomise_dit(WanTransformer3DModel(num_attention_heads=2, attention_head_dim=128, in_channels=16,
                                          out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=64, num_layers=2))
    ref.save_pretrained(root / 'diffusers', max_shard_size='3MB')
    sd = rename(ref.state_dict(), DIT_FROM_DIFFUSERS)
    return dict(ref=ref, sd=sd, root=root, diffusers=str(root / 'diffusers'),
                official=write_official(sd, str(root / 'official')),
                bf16=write_official({k: v.bfloat16() for k, v in sd.items()}, str(root / 'bf16')))


# ---------------------------------------------------------------------------------------------- load_dit

def test_official_and_diffusers_folders_load_the_same_model(dit):
    assert len([n for n in os.listdir(dit['diffusers']) if n.endswith('.safetensors')]) >= 2  # diffusers' own shards
    official, diffusers = load_dit(dit['official'], 'cpu'), load_dit(dit['diffusers'], 'cpu')
    assert not list(WanModel(**TINY).buffers())  # nothing that to_empty would leave uninitialised
    assert_same_state(official, diffusers)
    for k, v in dit['sd'].items():
        assert torch.equal(official.state_dict()[k], v), k
    inputs = dit_inputs()
    a, b = run_dit(official, inputs), run_dit(diffusers, inputs)
    assert torch.equal(a, b)
    with torch.no_grad():
        ref = dit['ref'](*inputs, return_dict=False)[0]
    assert ((a - ref).abs().max() / ref.abs().max()).item() < 1e-4  # the config mapped to the right shape


def test_dtype_comes_from_the_file_and_is_allocated_directly(dit, monkeypatch):
    seen = []
    to_empty = torch.nn.Module.to_empty

    def spy(self, *args, **kwargs):  # what the model is at the moment it gets memory
        seen.append({(p.device.type, p.dtype) for p in self.parameters()})
        return to_empty(self, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, 'to_empty', spy)
    model = load_dit(dit['bf16'], 'cpu')
    assert seen == [{('meta', torch.bfloat16)}]  # built on meta, allocated once, in bf16: no fp32 copy
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for k, v in dit['sd'].items():
        assert torch.equal(model.state_dict()[k], v.bfloat16()), k
    up = load_dit(dit['bf16'], 'cpu', dtype=torch.float32)  # an explicit dtype wins (no bf16 forward on this CPU)
    assert {p.dtype for p in up.parameters()} == {torch.float32}
    assert torch.equal(up.state_dict()['head.modulation'], dit['sd']['head.modulation'].bfloat16().float())
    down = load_dit(dit['official'], 'cpu', dtype=torch.bfloat16)
    assert_same_state(down, model)


@pytest.mark.parametrize('damage', ['renamed', 'missing', 'shape'])
def test_bad_keys_are_named_with_the_folder(dit, tmp_path, damage):
    folder = str(tmp_path / 'bad')
    shutil.copytree(dit['official'], folder)
    shard = os.path.join(folder, 'diffusion_pytorch_model-00001-of-00002.safetensors')
    sd = load_file(shard)
    key = 'blocks.0.self_attn.q.weight'
    if damage == 'renamed':
        sd['blocks.0.self_attn.query.weight'] = sd.pop(key)
    elif damage == 'missing':
        del sd[key]
    else:
        sd[key] = sd[key][:5].contiguous()
    save_file(sd, shard)
    with pytest.raises(ValueError) as e:
        load_dit(folder, 'cpu')
    msg = str(e.value)
    assert folder in msg and f'{key}' in msg and 'strict=False' in msg
    if damage == 'renamed':
        assert '1 missing' in msg and '1 unexpected: blocks.0.self_attn.query.weight' in msg
    if damage == 'shape':
        assert f'{key} (5, 256) (model wants (256, 256))' in msg
    model = load_dit(folder, 'cpu', strict=False)  # the rest loads; what the file lacks is zero, not garbage
    assert model.state_dict()[key].abs().sum() == 0
    assert torch.equal(model.state_dict()['head.modulation'], dit['sd']['head.modulation'])


def test_missing_files_are_named(dit, tmp_path):
    folder = str(tmp_path / 'dit')
    shutil.copytree(dit['official'], folder)
    os.remove(os.path.join(folder, 'diffusion_pytorch_model-00002-of-00002.safetensors'))
    with pytest.raises(FileNotFoundError, match=r'diffusion_pytorch_model-00002-of-00002\.safetensors not found: '
                                                r'.*index\.json lists it'):
        load_dit(folder, 'cpu')
    os.remove(os.path.join(folder, INDEX))
    with pytest.raises(FileNotFoundError, match=rf'{folder}/{WEIGHTS} not found: the folder has neither'):
        load_dit(folder, 'cpu')
    os.remove(os.path.join(folder, 'config.json'))
    with pytest.raises(FileNotFoundError, match=rf'{folder}/config.json not found'):
        load_dit(folder, 'cpu')
    with pytest.raises(FileNotFoundError, match=rf'{tmp_path}/nowhere not found: pass the folder'):
        load_dit(tmp_path / 'nowhere', 'cpu')
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({'_class_name': 'UNet2DModel'}, f)
    with pytest.raises(ValueError, match="_class_name 'UNet2DModel'; expected WanModel"):
        load_dit(folder, 'cpu')
    cfg = json.load(open(os.path.join(dit['diffusers'], 'config.json')))
    with open(os.path.join(folder, 'config.json'), 'w') as f:
        json.dump({**cfg, 'image_dim': 1280}, f)  # a Wan2.1 I2V (CLIP) DiT
    with pytest.raises(ValueError, match=r"asks for \{'image_dim': 1280\}, which WanModel does not implement"):
        load_dit(folder, 'cpu')


def test_expert_folders(tmp_path):
    for sub in ['a14b/high_noise_model', 'a14b/low_noise_model', 'diff/transformer', 'diff/transformer_2',
                'diff5b/transformer', 'half/high_noise_model', 'ti2v']:
        os.makedirs(tmp_path / sub)
    for cfg in ['ti2v/config.json', 'diff5b/transformer/config.json']:
        (tmp_path / cfg).write_text('{}')
    t = str(tmp_path)
    assert expert_folders(tmp_path / 'a14b') == {'high': f'{t}/a14b/high_noise_model',
                                                 'low': f'{t}/a14b/low_noise_model'}
    assert expert_folders(tmp_path / 'diff') == {'high': f'{t}/diff/transformer', 'low': f'{t}/diff/transformer_2'}
    assert expert_folders(tmp_path / 'ti2v') == {'single': f'{t}/ti2v'}
    assert expert_folders(tmp_path / 'diff5b') == {'single': f'{t}/diff5b/transformer'}
    with pytest.raises(FileNotFoundError, match=rf'{t}/half holds no DiT: expected config.json'):
        expert_folders(tmp_path / 'half')


# ---------------------------------------------------------------------------------------------- export_dit

def test_export_then_load_is_identical(dit, tmp_path):
    model = randomise_dit(WanModel(**{**TINY, 'text_dim': 32}), seed=3)  # a debug-sized text_dim must survive
    export_dit(model, tmp_path / 'one')
    assert sorted(os.listdir(tmp_path / 'one')) == ['config.json', WEIGHTS]
    cfg = json.load(open(tmp_path / 'one' / 'config.json'))
    assert cfg == {'_class_name': 'WanModel', 'model_type': 't2v', 'text_len': 512, 'freq_dim': 256, 'eps': 1e-6,
                   **TINY, 'text_dim': 32}
    inputs = dit_inputs(text_dim=32)
    back = load_dit(tmp_path / 'one', 'cpu')
    assert_same_state(back, model)
    assert torch.equal(run_dit(back, inputs), run_dit(model, inputs))

    export_dit(model, tmp_path / 'many', max_shard_bytes=300_000)  # sharding forced: the loader's index path
    files = sorted(os.listdir(tmp_path / 'many'))
    shards = [n for n in files if n.startswith('diffusion_pytorch_model-')]
    assert len(shards) >= 3 and INDEX in files and shards[-1].endswith(f'-of-{len(shards):05d}.safetensors')
    index = json.load(open(tmp_path / 'many' / INDEX))
    assert index['weight_map'].keys() == model.state_dict().keys() and set(index['weight_map'].values()) == set(shards)
    for name in shards:
        assert os.path.getsize(tmp_path / 'many' / name) < 300_000 + 5_000 or \
            len(load_file(str(tmp_path / 'many' / name))) == 1  # only a tensor larger than the limit stands alone
    back = load_dit(tmp_path / 'many', 'cpu')
    assert_same_state(back, model)
    assert torch.equal(run_dit(back, inputs), run_dit(model, inputs))

    export_dit(model, tmp_path / 'bf16', dtype=torch.bfloat16)
    assert {v.dtype for v in load_file(str(tmp_path / 'bf16' / WEIGHTS)).values()} == {torch.bfloat16}
    back = load_dit(tmp_path / 'bf16', 'cpu')
    assert all(torch.equal(back.state_dict()[k], v.bfloat16()) for k, v in model.state_dict().items())

    real = load_dit(dit['official'], 'cpu')  # release-shaped (text_dim 4096): exactly the official config fields
    export_dit(real, tmp_path / 'real')
    assert json.load(open(tmp_path / 'real' / 'config.json')).keys() == {'_class_name', *DIT_CONFIG}


def test_export_is_atomic(tmp_path, monkeypatch):
    first, second = randomise_dit(WanModel(**TINY), seed=1), randomise_dit(WanModel(**TINY), seed=2)
    export_dit(first, tmp_path / 'dit')
    calls = []

    def failing(tensors, path, **kwargs):  # the disk fills up while the second shard is written
        calls.append(path)
        if len(calls) == 2:
            raise OSError('No space left on device')
        save_file(tensors, path, **kwargs)
    monkeypatch.setattr(checkpoint, 'save_file', failing)
    with pytest.raises(OSError, match='No space'):
        export_dit(second, tmp_path / 'dit', max_shard_bytes=1_000_000)
    assert sorted(os.listdir(tmp_path)) == ['dit']  # no half-written folder, no temporary left
    assert_same_state(load_dit(tmp_path / 'dit', 'cpu'), first)
    monkeypatch.undo()
    export_dit(second, tmp_path / 'dit', max_shard_bytes=1_000_000)  # replaces a previous export
    assert sorted(os.listdir(tmp_path)) == ['dit'] and INDEX in os.listdir(tmp_path / 'dit')
    assert_same_state(load_dit(tmp_path / 'dit', 'cpu'), second)


# ---------------------------------------------------------------------------------------------- .pth files

def test_pth_load_and_convert(tmp_path):
    t5 = T5Encoder(**t5_configs['debug']).init_weights(seed=5)
    sd = {k: v.bfloat16() for k, v in t5.state_dict().items()}  # as models_t5_umt5-xxl-enc-bf16.pth
    torch.save(sd, tmp_path / 't5.pth')
    assert load_pth(tmp_path / 't5.pth').keys() == sd.keys()
    with torch.device('meta'):
        empty = T5Encoder(**t5_configs['debug'])
    loaded = load_weights(empty, tmp_path / 't5.pth', 'cpu')
    assert loaded.state_dict().keys() == sd.keys()
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())

    pth_to_safetensors(tmp_path / 't5.pth', str(tmp_path / 't5.safetensors'))
    assert sorted(os.listdir(tmp_path)) == ['t5.pth', 't5.safetensors']  # no temporary left
    conv = load_file(str(tmp_path / 't5.safetensors'))
    assert conv.keys() == sd.keys() and all(v.dtype == sd[k].dtype and torch.equal(v, sd[k]) for k, v in conv.items())

    torch.save(t5.state_dict(), tmp_path / 't5_fp32.pth')  # fp32 file into a model built normally (not on meta)
    again = load_weights(T5Encoder(**t5_configs['debug']), tmp_path / 't5_fp32.pth', 'cpu')
    ids, mask = torch.randint(3, 512, (2, 7)), torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    with torch.no_grad():
        assert torch.equal(again(ids, mask), t5(ids, mask))
    with pytest.raises(FileNotFoundError, match=rf'{tmp_path}/Wan2.1_VAE.pth not found'):
        load_weights(empty, tmp_path / 'Wan2.1_VAE.pth', 'cpu')


def test_meta_model_with_unfilled_buffers_is_refused(tmp_path):
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer('table', torch.arange(4.0), persistent=False)
    save_file(Odd().state_dict(), str(tmp_path / 'odd.safetensors'))
    with torch.device('meta'):
        odd = Odd()
    with pytest.raises(ValueError, match=r"non-persistent buffers \['table'\]"):
        load_weights(odd, tmp_path / 'odd.safetensors', 'cpu')
    built = load_weights(Odd(), tmp_path / 'odd.safetensors', 'cpu')  # built for real, its buffer is kept
    assert torch.equal(built.table, torch.arange(4.0))


# ---------------------------------------------------------------------------------------------- umT5 tokenizer

@pytest.fixture(scope='module')
def spm_folders(tmp_path_factory):
    """A tiny T5-style unigram spiece.model, a transformers-saved folder (tokenizer.json + spiece.model, as
    google/umt5-xxl/) and a folder with spiece.model alone; plus the transformers tokenizer itself."""
    pytest.importorskip('google.protobuf', reason='transformers reads spiece.model with protobuf '
                                                  '(add protobuf to requirements-test.txt)')
    import sentencepiece
    from transformers import T5Tokenizer
    root = tmp_path_factory.mktemp('spm')
    rng = random.Random(0)
    words = ('a the red green blue yellow purple cube sphere cone cylinder rolls bounces slowly quickly across over '
             'under camera pans left right city night mountain river forest ocean dog cat bird runs sleeps flies on '
             'sofa park chat noir dort sur le canapé ein kleiner Hund läuft im 4k 1080p cinematic shot of and with '
             'two three small large bright dark sunset rain snow wind').split()
    lines = [' '.join(rng.choice(words) for _ in range(rng.randint(3, 12))) + rng.choice(['.', '!', ',', ''])
             for _ in range(400)]
    (root / 'corpus.txt').write_text('\n'.join(lines))
    sentencepiece.SentencePieceTrainer.train(input=str(root / 'corpus.txt'), model_prefix=str(root / 'spiece'),
                                             vocab_size=100, model_type='unigram', pad_id=0, eos_id=1, unk_id=2,
                                             bos_id=-1, minloglevel=2)
    os.makedirs(root / 'slow')
    shutil.copy(root / 'spiece.model', root / 'slow' / 'spiece.model')
    tok = T5Tokenizer.from_pretrained(str(root / 'slow'), extra_ids=0)
    tok.save_pretrained(str(root / 'umt5'))
    shutil.copy(root / 'spiece.model', root / 'umt5' / 'spiece.model')
    return dict(tok=tok, umt5=root / 'umt5', slow=root / 'slow')


def test_umt5_tokenizer_matches_transformers(spm_folders):
    texts = ['A red cube rolls slowly across the park.', '  two &amp;amp; three\n\tsmall   dogs ',
             'Ein kleiner Hund läuft im Park, 1080p!', 'zebra 漢字 xylophone',
             'the camera pans left over the mountain river at sunset with rain and snow and wind']
    L = 16
    tok = spm_folders['tok']
    want = tok([clean_text(t) for t in texts], padding='max_length', truncation=True, max_length=L,
               add_special_tokens=True)
    want_ids, want_mask = torch.tensor(want['input_ids']), torch.tensor(want['attention_mask'])
    assert len(tok(clean_text(texts[-1]))['input_ids']) > L  # the last one is truncated
    assert len(set(want_ids.flatten().tolist())) > 20  # a real vocabulary at work, not all <unk>
    umt5, slow = spm_folders['umt5'], spm_folders['slow']
    for path in [umt5, umt5 / 'tokenizer.json', slow, slow / 'spiece.model']:
        ids, mask = Tokenizer(path)(texts, text_len=L)
        assert torch.equal(ids, want_ids) and torch.equal(mask, want_mask), path
    assert Tokenizer(umt5).sp is None and Tokenizer(slow).sp is not None  # tokenizer.json preferred, as AutoTokenizer
    assert ids[-1, -1] == 1 and mask[-1].all()  # truncated: </s> kept last
    assert ids[0, mask[0].sum() - 1] == 1 and ids[0, mask[0].sum():].eq(0).all()  # </s>, then <pad> = 0


def test_tokenizer_missing_files_are_named(tmp_path):
    for path in [tmp_path, tmp_path / 'tokenizer.json']:
        with pytest.raises(FileNotFoundError, match=rf'{path} is no tokenizer file nor a folder holding'):
            Tokenizer(path)


# ---------------------------------------------------------------------------------------------- VAEs

# diffusers AutoencoderKLWan arguments for the official Wan2.2 layout (its scripts/convert_wan_to_diffusers.py)
DIFFUSERS_WAN22 = dict(is_residual=True, patch_size=2, in_channels=12, out_channels=12, scale_factor_spatial=16)
# tiny configs: (our WanVAE arguments, the matching diffusers AutoencoderKLWan arguments)
VAE_TINY = {
    'wan2.1': (dict(z_dim=4, dim=8, wan22=False, num_res_blocks=2),
               dict(base_dim=8, z_dim=4, num_res_blocks=2)),
    'wan2.2': (dict(z_dim=6, dim=8, dec_dim=12, wan22=True, num_res_blocks=1),  # dec_dim != dim on purpose
               dict(base_dim=8, decoder_base_dim=12, z_dim=6, num_res_blocks=1, **DIFFUSERS_WAN22)),
}


def tiny_pair(name):
    """A diffusers VAE with every weight random (RMS gammas too) and our codec loaded from its renamed state dict."""
    diffusers = pytest.importorskip('diffusers')
    ours_cfg, ref_cfg = VAE_TINY[name]
    g = torch.Generator().manual_seed(0)
    z = ours_cfg['z_dim']
    mean, std = (torch.randn(z, generator=g) * 0.5).tolist(), (torch.rand(z, generator=g) + 0.5).tolist()
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(**ref_cfg, latents_mean=mean, latents_std=std).eval()
    with torch.no_grad():
        for key, p in ref.named_parameters():
            if key.endswith('gamma'):
                p.uniform_(0.5, 1.5, generator=g)
    ours = WanVAE(**ours_cfg, mean=mean, std=std).eval()
    ours.load_state_dict(vae_from_diffusers(ref.state_dict()), strict=True)
    return ours, ref


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture
def no_onednn():
    """oneDNN builds a kernel for every new conv shape; at these tiny sizes that is most of the time (3x)."""
    enabled, torch.backends.mkldnn.enabled = torch.backends.mkldnn.enabled, False
    yield
    torch.backends.mkldnn.enabled = enabled


@pytest.mark.usefixtures('no_onednn')
@pytest.mark.parametrize('name', ['wan2.1', 'wan2.2'])
def test_wan_vae_parity_with_diffusers(name):
    ours, ref = tiny_pair(name)
    s = ours.stride[1]
    mean = torch.tensor(ours.mean).view(1, -1, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(ours.std).view(1, -1, 1, 1, 1)  # the official normalisation, written out
    g = torch.Generator().manual_seed(1)
    errors = {}
    with torch.no_grad():
        for B, T in [(1, 1), (2, 5), (1, 9)]:
            video = torch.rand(B, 3, T, 2 * s, 3 * s, generator=g) * 2 - 1
            z = ours.encode(video)
            z_ref = (ref.encode(video).latent_dist.mean - mean) * inv_std
            assert z.shape == (B, ours.z_dim, 1 + (T - 1) // 4, 2, 3)
            errors[f'encode F={T}'] = rel(z, z_ref)
            x = ours.decode(z_ref)
            x_ref = ref.decode(z_ref / inv_std + mean).sample
            assert x.shape == video.shape
            assert (x_ref.abs() < 1).float().mean() > 0.5  # mostly unclamped, so the comparison sees the decoder
            errors[f'decode F={T}'] = rel(x, x_ref)
    print(name, {k: f'{v:.1e}' for k, v in errors.items()})
    assert max(errors.values()) < 1e-5, errors


@pytest.mark.usefixtures('no_onednn')
@pytest.mark.parametrize('name', ['wan2.1', 'wan2.2'])
def test_wan_vae_tiled_decode(name):
    ours, ref = tiny_pair(name)
    z = torch.randn(1, ours.z_dim, 2, 5, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = ours.decode(z)
        ours.tile = (4, 1)  # tiles start every 3 latent px; at these sizes diffusers places them the same way
        tiled = ours.decode(z)
        s = ours.stride[1]
        ref.enable_tiling(tile_sample_min_height=4 * s, tile_sample_min_width=4 * s,
                          tile_sample_stride_height=3 * s, tile_sample_stride_width=3 * s)
        mean, std = torch.tensor(ours.mean).view(1, -1, 1, 1, 1), torch.tensor(ours.std).view(1, -1, 1, 1, 1)
        tiled_ref = ref.decode(z / (1.0 / std) + mean).sample
    assert tiled.shape == whole.shape
    assert rel(tiled, tiled_ref) < 1e-5  # the same tiles and blending as diffusers' tiled_decode
    # A random decoder mixes far across its input (global attention, no learned locality), so tiles of 4 latent
    # px differ a lot from the whole-frame decode; only trained weights can show how close tiling gets.
    err = ((tiled - whole).abs().mean() / whole.abs().mean()).item()
    print(name, f'tiled vs whole (random weights): mean |diff| / mean |x| = {err:.2f}, '
          f'max rel {rel(tiled, whole):.2f}; vs diffusers tiled {rel(tiled, tiled_ref):.1e}')
    # For a decoder that only looks at its own latent pixel every tile agrees with the whole frame, so the tiled
    # result must equal it exactly: tiles in the right place, blend weights summing to one, nothing cut twice.
    p = ours.patch
    ours._decode = lambda z: z[:, :1].repeat(1, 3 * p * p, 1, 1, 1).repeat_interleave(ours.up, 3).repeat_interleave(
        ours.up, 4) * torch.arange(1, 3 * p * p + 1).view(1, -1, 1, 1, 1) / (3 * p * p)
    z = torch.rand(1, ours.z_dim, 2, 7, 11, generator=torch.Generator().manual_seed(3)) * 0.9
    local_tiled = ours.decode(z)
    ours.tile = None
    assert rel(local_tiled, ours.decode(z)) < 1e-6


@pytest.mark.parametrize('name, tensors, params, shapes', [
    ('wan2.1', 194, 126_892_531, {'encoder.downsamples.0.residual.0.gamma': (96, 1, 1, 1),
                                  'decoder.upsamples.3.time_conv.weight': (768, 384, 3, 1, 1),
                                  'decoder.upsamples.11.resample.1.weight': (96, 192, 3, 3)}),
    ('wan2.2', 196, 704_688_668, {'encoder.conv1.weight': (160, 12, 3, 3, 3),
                                  'decoder.upsamples.0.upsamples.3.time_conv.weight': (2048, 1024, 3, 1, 1),
                                  'decoder.head.2.weight': (12, 256, 3, 3, 3)})])
def test_wan_vae_official_sizes(name, tensors, params, shapes):
    with torch.device('meta'):
        vae = WanVAE(**vae_configs[name])
    sd = vae.state_dict()
    assert len(sd) == tensors
    assert sum(p.numel() for p in vae.parameters()) == params
    assert {k: tuple(sd[k].shape) for k in shapes} == shapes  # reference/wan22.md section 4
    assert vae.stride == {'wan2.1': (4, 8, 8), 'wan2.2': (4, 16, 16)}[name]
    assert vae.z_dim == len(vae.mean) == len(vae.std) == {'wan2.1': 16, 'wan2.2': 48}[name]
    # a full-size diffusers checkpoint renames onto exactly our keys and shapes
    diffusers = pytest.importorskip('diffusers')
    with torch.device('meta'):
        ref = diffusers.AutoencoderKLWan(**({} if name == 'wan2.1' else dict(
            base_dim=160, decoder_base_dim=256, z_dim=48, **DIFFUSERS_WAN22)))
    assert {k: v.shape for k, v in vae_from_diffusers(ref.state_dict()).items()} == {k: v.shape for k, v in sd.items()}


@pytest.mark.usefixtures('no_onednn')
@pytest.mark.parametrize('name', ['wan2.1', 'wan2.2'])
def test_wan_vae_roundtrip_shapes(name):
    vae = WanVAE(**VAE_TINY[name][0]).eval()
    s = vae.stride[1]
    for k in (0, 2):
        video = torch.rand(1, 3, 1 + 4 * k, s, 2 * s) * 2 - 1
        with torch.no_grad():
            z = vae.encode(video)
            assert z.shape == (1, vae.z_dim, 1 + k, 1, 2)
            x = vae.decode(z)
        assert x.shape == video.shape and x.abs().max() <= 1
    with pytest.raises(ValueError):
        vae.encode(torch.zeros(1, 3, 4, s, s))


def test_load_codec_names():
    with pytest.raises(ValueError, match='wan2.1'):
        load_codec('wan3')


# ---------------------------------------------------------------------------------------------- TRD loss

ROUTES = ['uniform', 'or', 'and', 'xor', 'motion']


# ---------------------------------------------------------------------------------------------- naive reference

def naive_motion(y, grid):
    """Motion cue written out token by token: 1 - cos to the same (h, w) one frame earlier, frame 0 = frame 1."""
    T, H, W = grid
    y = y.reshape(T, H, W, -1)
    m = torch.zeros(T, H, W, dtype=y.dtype)
    for t in range(T):
        for h in range(H):
            for x in range(W):
                t1 = max(t, 1)
                m[t, h, x] = 1 - F.cosine_similarity(y[t1, h, x], y[t1 - 1, h, x], dim=0)
    m = m.flatten()
    return (m - m.min()) / (m.max() - m.min())


def naive_weights(a, b):
    """W for a column of w_i and a row of w_j, written out per route."""
    return {'uniform': torch.ones_like(a * b), 'or': a + b - a * b, 'and': a * b, 'xor': a + b - 2 * a * b}


def naive_clip(z, y, w, route, margin, grid=None):
    """Materialises the N x N Grams and the N x N weight matrix."""
    zn, yn = F.normalize(z, dim=-1), F.normalize(y, dim=-1)
    l = torch.relu((zn @ zn.T - yn @ yn.T).abs() - margin)
    if route == 'motion':
        w, route = naive_motion(y, grid), 'or'
    W = torch.ones_like(l) if route == 'uniform' else naive_weights(w[:, None], w[None, :])[route]
    return (W * l).sum() / W.sum()


def naive(z, y, w, route, margin=0.1, grid=None):
    grids = grid if isinstance(grid, list) else [grid] * len(z)
    ws = [None] * len(z) if w is None else w
    return torch.stack([naive_clip(*a, route, margin, g) for *a, g in zip(z, y, ws, grids)]).mean()


def rel_norm(a, b):
    return ((a - b).norm() / b.norm()).item()


def inputs(Ns, D, dtype, batched, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype)
    if batched:
        z, y, w = make(len(Ns), Ns[0], D), make(len(Ns), Ns[0], D), torch.rand(len(Ns), Ns[0], generator=g, dtype=dtype)
        # y tokens correlated with z so that many |dcos| sit near the margin on both sides
        return z, 0.5 * z + y, w
    z = [make(n, D) for n in Ns]
    return z, [0.5 * zb + make(n, D) for zb, n in zip(z, Ns)], [torch.rand(n, generator=g, dtype=dtype) for n in Ns]


def grads(loss_fn, z, w, route):
    """Loss, flat gradient w.r.t. z, and w.r.t. w for the routes where w enters (else None)."""
    is_list = isinstance(z, list)
    z, w = [[t.clone().requires_grad_() for t in (ts if is_list else [ts])] for ts in (z, w)]
    loss = loss_fn(z, w) if is_list else loss_fn(z[0], w[0])
    soft = route in ('or', 'and', 'xor')
    gs = torch.autograd.grad(loss, z + (w if soft else []))
    flat = lambda ts: torch.cat([t.flatten() for t in ts])
    return loss.detach(), flat(gs[:len(z)]), flat(gs[len(z):]) if soft else None


# ---------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize('route', ROUTES)
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize('batched', [True, False], ids=['batch', 'list'])
def test_blocked_matches_naive(route, dtype, tol, batched):
    # N = 300 and 200 are not multiples of block = 64; the list batch has clips of different N
    Ns, grid = ([300, 300], (3, 10, 10)) if batched else ([300, 200], [(3, 10, 10), (2, 10, 10)])
    z, y, w = inputs(Ns, 16, dtype, batched)
    kw = dict(grid=grid) if route == 'motion' else {}
    v1, gz1, gw1 = grads(lambda z, w: trd_loss(z, y, w, route=route, margin=0.1, block=64, **kw), z, w, route)
    v2, gz2, gw2 = grads(lambda z, w: naive(z, y, w, route, 0.1, grid), z, w, route)
    assert v2 > 0.01 and gz2.norm() > 0                # the reference is not trivially zero
    errors = [rel_norm(v1, v2), rel_norm(gz1, gz2)] + ([rel_norm(gw1, gw2)] if gw2 is not None else [])
    assert max(errors) <= tol, errors


def test_uniform_is_videorepa_mean():
    # VideoREPA: plain mean over (b, i, j) of relu(|G_z - G_y| - m), Grams from per-token L2-normalised features
    z, y, _ = inputs([257, 257], 32, torch.float64, True, seed=1)
    zn, yn = F.normalize(z, dim=-1), F.normalize(y, dim=-1)
    for margin in (0.0, 0.1, 0.3):
        ref = torch.relu((zn @ zn.transpose(1, 2) - yn @ yn.transpose(1, 2)).abs() - margin).mean()
        assert torch.allclose(trd_loss(z, y, route='uniform', margin=margin, block=100), ref, rtol=1e-12, atol=0)


def test_or_ignores_pairs_of_two_unsalient_tokens():
    # Tokens 0 and 1 get a private plane (dims 6, 7): rotating z_1 in it by theta changes cos(z_0, z_1) only,
    # and z_1's norm and all its other cosines stay fixed. Under OR with w_0 = w_1 = 0 the loss must not move.
    g = torch.Generator().manual_seed(2)
    N, D = 40, 8
    base = torch.randn(N, D, generator=g, dtype=torch.float64)
    base[:, 6:] = 0
    y = torch.randn(1, N, D, generator=g, dtype=torch.float64)
    w = torch.rand(1, N, generator=g, dtype=torch.float64) * 0.8 + 0.2
    w[0, :2] = 0

    def loss(theta, route, w=w):
        e = torch.zeros(N, D, dtype=torch.float64)
        e[0, 6] = 2.0
        e[1, 6], e[1, 7] = 2.0 * torch.cos(theta), 2.0 * torch.sin(theta)
        return trd_loss((base + e)[None], y, w, route=route, block=16)

    t0, t1 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True), torch.tensor(2.5, dtype=torch.float64)
    l0 = loss(t0, 'or')
    assert abs(l0.item() - loss(t1, 'or').item()) < 1e-14
    assert torch.autograd.grad(l0, t0)[0].abs() < 1e-14
    # the perturbation is not a no-op: uniform TRD sees it, and so does OR once token 0 is a little salient
    assert abs(loss(t0, 'uniform') - loss(t1, 'uniform')) > 1e-4
    w2 = w.clone()
    w2[0, 0] = 0.3
    assert abs(loss(t0, 'or', w2) - loss(t1, 'or', w2)) > 1e-4


def test_errors():
    z = torch.randn(1, 8, 4)
    with pytest.raises(ValueError, match='needs a saliency'):
        trd_loss(z, z, route='or')
    with pytest.raises(ValueError, match='needs grid'):
        trd_loss(z, z, route='motion')
    with pytest.raises(ValueError, match="unknown route 'nope'"):
        trd_loss(z, z, torch.rand(1, 8), route='nope')


def test_memory_stays_below_an_eighth_of_one_gram():
    from bench import cpu_peak  # the allocator's own events, as bench.py measures them
    # the method sees a materialised N x N matrix: a naive Gram at N = 4096 must register >= 64 MiB
    a = torch.randn(4096, 64)
    assert cpu_peak(lambda: (a @ a.T).relu_().sum()) >= 4096 ** 2 * 4
    N, D = 16384, 256
    torch.manual_seed(0)
    z, y, w = torch.randn(1, N, D, requires_grad=True), torch.randn(1, N, D), torch.rand(1, N)
    peak = cpu_peak(lambda: trd_loss(z, y, w, route='or', block=256).backward())
    print(f'TRD forward+backward at N={N}, D={D}, block=256: peak {peak / 2 ** 20:.1f} MiB beyond inputs')
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert peak < N * N * 4 / 8, f'{peak / 2 ** 20:.1f} MiB'


def test_pair_budget_matches_the_paper_figure():
    N, nf = 2500, 1200                                                   # p = 0.48 foreground
    p = nf / N
    g = torch.Generator().manual_seed(3)
    w = torch.zeros(N)
    w[torch.randperm(N, generator=g)[:nf]] = 1.0
    b = pair_budget(w)
    # brute-force count of ordered pairs, row block by row block
    fg = w > 0.5
    counts = {'uniform': 0, 'or': 0, 'and': 0, 'xor': 0}
    for r in range(0, N, 1000):
        a, c = w[r:r + 1000, None], w[None, :]
        for name, W in naive_weights(a, c).items():
            counts[name] += (W == 1).sum().item()
    assert math.isclose(counts['or'] / N ** 2, 1 - (1 - p) ** 2) and math.isclose(counts['and'] / N ** 2, p ** 2)
    for name, n in counts.items():
        assert math.isclose(b[f'{name}/coverage'], n / N ** 2, rel_tol=1e-12)
    assert math.isclose(b['or/coverage'], 1 - (1 - p) ** 2) and math.isclose(b['and/coverage'], p ** 2)
    # the paper's figure: uniform TRD spends 23% / 50% / 27% of pairs on FG-FG / FG-BG / BG-BG
    assert [round(100 * b[k]) for k in ('fg_fg', 'fg_bg', 'bg_bg')] == [23, 50, 27]
    assert [b[f'uniform/{k}'] for k in ('fg_fg', 'fg_bg', 'bg_bg')] == [b[k] for k in ('fg_fg', 'fg_bg', 'bg_bg')]
    assert b['or/bg_bg'] == 0 and math.isclose(b['and/fg_fg'], 1) and math.isclose(b['xor/fg_bg'], 1)
    assert math.isclose(b['or/fg_fg'], p * p / (1 - (1 - p) ** 2))
    assert int(fg.sum()) == nf


def test_pair_budget_soft_weights_against_brute_force():
    g = torch.Generator().manual_seed(4)
    w = [torch.rand(300, generator=g) ** 2, torch.rand(200, generator=g)]   # list batch of different N
    b = pair_budget(w, threshold=0.4)
    ref = {}
    for wb in w:
        wb = wb.double()
        a, c, fg = wb[:, None], wb[None, :], wb > 0.4
        cls = {'fg_fg': fg[:, None] & fg[None, :], 'bg_bg': ~fg[:, None] & ~fg[None, :]}
        cls['fg_bg'] = ~(cls['fg_fg'] | cls['bg_bg'])
        for k, m in cls.items():
            ref[k] = ref.get(k, 0) + m.double().mean().item() / len(w)
        for name, W in naive_weights(a, c).items():
            for k, m in cls.items():
                ref[f'{name}/{k}'] = ref.get(f'{name}/{k}', 0) + (W * m).sum().item() / W.sum().item() / len(w)
            ref[f'{name}/coverage'] = ref.get(f'{name}/coverage', 0) + W.mean().item() / len(w)
    assert b.keys() == ref.keys()
    for k in ref:
        assert math.isclose(b[k], ref[k], rel_tol=1e-9, abs_tol=1e-12), k


# ---------------------------------------------------------------------------------------------- sample.py on official folders

def fake_official(root, model_type, in_dim, vae, experts, heads=1):
    """An official checkpoint folder at tiny sizes: DiT folder(s), umT5 .pth, VAE .pth, google/umt5-xxl tokenizer."""
    torch.manual_seed(0)
    for i, folder in enumerate(experts):  # first: export_dit refuses folders that hold other files
        dit = WanModel(model_type=model_type, in_dim=in_dim, out_dim=vae.z_dim, dim=128, ffn_dim=64, num_heads=heads,
                       num_layers=2, text_dim=64)
        export_dit(randomise_dit(dit, seed=i), str(root / folder))  # experts that differ
    os.makedirs(root / 'google' / 'umt5-xxl')
    build_tokenizer(['a red circle moves right', 'a blue square'], root / 'google' / 'umt5-xxl' / 'tokenizer.json')
    torch.save(T5Encoder(**t5_configs['debug']).init_weights(0).state_dict(), root / 'models_t5_umt5-xxl-enc-bf16.pth')
    torch.save(vae.state_dict(), root / ('Wan2.2_VAE.pth' if vae.wan22 else 'Wan2.1_VAE.pth'))
    with pytest.raises(ValueError, match='holds other files'):
        export_dit(dit, str(root))
    return root


@pytest.mark.parametrize('model,frames', [('ti2v-5b', 5), ('t2v-a14b', 9), ('i2v-a14b', 5)])
def test_sample_official_folders(tmp_path, model, frames):
    from PIL import Image
    import decord
    if model == 'ti2v-5b':
        vae, in_dim, experts = WanVAE(z_dim=6, dim=8, dec_dim=12, wan22=True, num_res_blocks=1), 6, ['']
    else:
        vae, experts = WanVAE(z_dim=4, dim=8, num_res_blocks=1), ['high_noise_model', 'low_noise_model']
        in_dim = 12 if model == 'i2v-a14b' else 4  # i2v: noise + 4 mask channels + image latents
    root = fake_official(tmp_path / 'ckpt', 't2v' if model == 't2v-a14b' else model[:4], in_dim, vae, experts)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)).save(tmp_path / 'im.png')
    args = [f'--ckpt_dir={root}', f'--model={model}', f'--frames={frames}', '--steps=8', f'--out={tmp_path}/o.mp4']
    args += [] if model == 't2v-a14b' else [f'--image={tmp_path}/im.png']
    r = run('sample.py', *args, '--size=96*64')
    assert r.returncode == 0, r.stderr
    vr = decord.VideoReader(str(tmp_path / 'o.mp4'))
    # TI2V rounds to the image's aspect within the area (96x64 here); I2V-A14B keeps the area at the aspect 1:2
    w, h = {'ti2v-5b': (96, 64), 't2v-a14b': (96, 64), 'i2v-a14b': (96, 48)}[model]
    assert (len(vr), *vr[0].shape) == (frames, h, w, 3)
    if model != 'ti2v-5b':
        high = expert_split(UniPC(8, 12.0 if model == 't2v-a14b' else 5.0).timesteps, 0.875 if model == 't2v-a14b' else 0.9)
        assert f"steps per expert: {{'high': {high}, 'low': {8 - high}}}" in r.stdout


def test_sample_replaces_an_a14b_expert_by_a_run_or_a_folder(tmp_path):
    import decord
    vae = WanVAE(z_dim=4, dim=8, num_res_blocks=1)
    root = fake_official(tmp_path / 'ckpt', 't2v', 4, vae, ['high_noise_model', 'low_noise_model'])
    make_shapes(tmp_path / 'data', n_train=2, n_val=1, frames=9, size=32, fps=8, seed=0)
    # SARA's setting: a run continued from the high-noise expert (here with lr 0: the official weights again)
    r = run('train_dit.py', f'--data={tmp_path}/data/train.jsonl', f'--ckpt_dir={root}', '--frames=5', '--height=32',
            f'--init_from={root}/high_noise_model', '--width=32', '--batch_size=2', '--max_iters=1',
            '--learning_rate=0.0', f'--out_dir={tmp_path}/run')
    assert r.returncode == 0, r.stderr

    def sample(name, *extra):  # guidance 1: the random experts amplify float noise less than with CFG
        r = run('sample.py', f'--ckpt_dir={root}', '--model=t2v-a14b', '--frames=5', '--steps=8', '--size=64*32',
                '--guidance=1', f'--out={tmp_path}/{name}.mp4', *extra)
        assert r.returncode == 0, r.stderr
        return decord.VideoReader(str(tmp_path / f'{name}.mp4')).get_batch(range(5)).asnumpy().astype(float), r.stdout

    base, _ = sample('base')
    same, log = sample('run', f'--high={tmp_path}/run')
    also, _ = sample('low', f'--low={root}/low_noise_model')
    # the replacement acts at the high-noise steps only: the low-noise weights there change the video
    swapped, _ = sample('swapped', f'--high={root}/low_noise_model')
    # equal weights from another file can round differently in CPU matmuls (buffer addresses): within a tenth of
    # what a different expert changes (measured: 0 or 0.4 against 3.1 mean levels)
    effect = np.abs(base - swapped).mean()
    print(f'mean |video difference|: run as high expert {np.abs(base - same).mean():.2f}, official low as low '
          f'{np.abs(base - also).mean():.2f}, low-noise weights as high expert {effect:.2f}')
    assert f'high {tmp_path}/run, low {root}/low_noise_model' in log and effect > 1
    assert np.abs(base - same).mean() < 0.1 * effect and np.abs(base - also).mean() < 0.1 * effect
    r = run('sample.py', f'--ckpt_dir={root}', '--model=t2v-a14b', '--image=x.png')
    assert r.returncode != 0 and 'is text-to-video: drop --image' in r.stderr


def test_umt5_runs_on_the_sampling_device_unless_t5_cpu(monkeypatch, tmp_path):
    """As officially: umT5 loaded on the GPU, on the CPU only with t5_cpu (the official --t5_cpu); offload keeps the
    A14B experts on the CPU until used. Checked through the devices load_official asks for (no GPU needed)."""
    monkeypatch.setattr(sys, 'argv', ['sample.py'])
    import sample
    asked = {}
    monkeypatch.setattr(sample, 'expert_folders', lambda d: {'high': 'h', 'low': 'l'})
    monkeypatch.setattr(sample, 'load_expert',
                        lambda f, device, *rest: asked.setdefault(f, device) and WanModel(num_layers=0))
    monkeypatch.setattr(sample, 'load_text_and_vae', lambda d, z, t5_dev, vae_dev: asked.update(t5=t5_dev, vae=vae_dev))
    gpu = torch.device('cuda', 0)
    monkeypatch.setattr(sample, 'ckpt_dir', str(tmp_path))
    monkeypatch.setattr(sample, 'model', 't2v-a14b')
    with pytest.raises(TypeError):  # load_text_and_vae returns nothing here: only the devices matter
        sample.load_official(gpu, None, None)
    assert asked == {'h': torch.device('cpu'), 'l': torch.device('cpu'), 't5': gpu, 'vae': gpu}
    monkeypatch.setattr(sample, 't5_cpu', True)
    monkeypatch.setattr(sample, 'offload', False)
    asked.clear()
    with pytest.raises(TypeError):
        sample.load_official(gpu, None, None)
    assert asked == {'h': gpu, 'l': gpu, 't5': 'cpu', 'vae': gpu}
    # under torchrun, one video per rank: offload or not, no rank puts the experts in host memory
    monkeypatch.setattr(sample, 'offload', True)
    monkeypatch.setenv('WORLD_SIZE', '8')
    asked.clear()
    with pytest.raises(TypeError):
        sample.load_official(gpu, None, None)
    assert asked['h'] == gpu and asked['l'] == gpu and not sample.offloading(gpu)


def test_ti2v_output_size_is_the_official_one(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['sample.py'])  # importing the script reads its settings from the arguments
    from sample import best_output_size
    assert best_output_size(176, 405, 32, 32, 1280 * 704) == (640, 1408)  # sqrt(area / ratio) would give 608x1440
    assert best_output_size(220, 625, 32, 32, 1280 * 704) == (544, 1568)
    assert best_output_size(1280, 704, 32, 32, 1280 * 704) == (1280, 704)


# ---------------------------------------------------------------------------------------------- sampling-time alignment

def old_cross_attention_forward(self, x, context):
    """WanCrossAttention.forward as it was before the sampling-time hooks (attention() called without a scale)."""
    from models.wan import attention
    B, L, _ = x.shape
    q = self.norm_q(self.q(x)).view(B, L, self.num_heads, self.head_dim)
    k = self.norm_k(self.k(context)).view(B, -1, self.num_heads, self.head_dim)
    v = self.v(context).view(B, -1, self.num_heads, self.head_dim)
    return self.o(attention(q, k, v).flatten(2))


# runs sample.py in a fresh process with WanCrossAttention.forward wrapped: 'old' replaces it by the forward above,
# 'record' writes the logit scale of every cross-attention call (in call order) to a JSON file
SAMPLE_WRAPPER = '''
import inspect, json, os, runpy, sys
sys.path.insert(0, os.getcwd())
import models.steering as s
import models.wan as w
import test_sara
mode, path, args = sys.argv[1], sys.argv[2], sys.argv[3:]
seen, forward, steered = [], w.WanCrossAttention.forward, s.cross_attention
def record(self, x, context):  # the official forward: unscaled
    seen.append(None)
    return forward(self, x, context)
def record_steered(m, x, context, alpha=None, **kw):  # the forward models/steering.py installs
    seen.append(alpha)
    return steered(m, x, context, alpha, **kw)
if mode == 'old':
    w.WanCrossAttention.forward = test_sara.old_cross_attention_forward
else:
    w.WanCrossAttention.forward, s.cross_attention = record, record_steered
sys.argv = ['sample.py', *args]
runpy.run_path('sample.py', run_name='__main__')
json.dump(seen, open(path, 'w'))
'''


def video_frames(path, n=9):
    import decord
    return decord.VideoReader(str(path)).get_batch(range(n)).asnumpy().astype(float)


def wrapped_sample(tmp_path, mode, *args):
    (tmp_path / 'wrap.py').write_text(SAMPLE_WRAPPER)
    r = run(str(tmp_path / 'wrap.py'), mode, str(tmp_path / f'{mode}.json'), *args)
    assert r.returncode == 0, r.stderr
    return json.load(open(tmp_path / f'{mode}.json')), r.stdout


def tiny_cross_attention(seed=0, dim=64, heads=2):
    from models.wan import WanCrossAttention
    torch.manual_seed(seed)
    m = WanCrossAttention(dim, heads)
    with torch.no_grad():  # the q/k norm gains stay 1: logits of order 1, as in a trained model
        for n, p in m.named_parameters():
            if not n.startswith('norm'):
                p.normal_(0, 0.3)
    g = torch.Generator().manual_seed(seed + 1)
    return m.eval(), torch.randn(1, 10, dim, generator=g), torch.randn(1, 7, dim, generator=g)


def qkv(m, x, context):
    B, L, _ = x.shape
    q = m.norm_q(m.q(x)).view(B, L, m.num_heads, m.head_dim)
    k = m.norm_k(m.k(context)).view(B, -1, m.num_heads, m.head_dim)
    return q, k, m.v(context).view(B, -1, m.num_heads, m.head_dim)


def hand_attention(m, x, context, gamma_q=1.0, gamma_k=1.0):
    """(probabilities [B, L, heads, M], module output) of softmax((gamma_q q)(gamma_k k)^T / sqrt(d)) v, by hand."""
    q, k, v = qkv(m, x, context)
    p = torch.einsum('blnd,bmnd->blnm', gamma_q * q, gamma_k * k).div(math.sqrt(m.head_dim)).softmax(-1)
    return p, m.o(torch.einsum('blnm,bmnd->blnd', p, v).flatten(2))


def block_outputs(model, inputs):
    seen = []
    hooks = [b.register_forward_hook(lambda m, i, o: seen.append(o)) for b in model.blocks]
    out = run_dit(model, inputs)
    for h in hooks:
        h.remove()
    return [out, *seen]


@pytest.fixture(scope='module')
def align_run(tmp_path_factory):
    """A 30-iteration debug run on 8 toy clips of 9 frames (stride 1) at 16x16, and 2 held-out clips with masks."""
    root = tmp_path_factory.mktemp('align')
    make_shapes(root / 'data', n_train=8, n_val=2, frames=9, size=32, fps=8, seed=0)
    r = run('train_dit.py', f'--data={root}/data/train.jsonl', '--frames=9', '--frame_stride=1', '--height=16',
            '--width=16', '--batch_size=4', '--warmup_iters=5', '--max_iters=30', f'--out_dir={root}/run')
    assert r.returncode == 0, r.stderr
    return root


def test_alignment_off_is_bit_identical_to_the_dit_before_it(align_run, tmp_path, monkeypatch):
    """With no steering installed every block output equals the pre-hook forward's bit for bit; sample.py at
    its default settings writes the video of sample.py running the pre-hook forward (compared within CPU rounding
    across processes: matmuls may round by buffer address; the same run's bytes are usually equal)."""
    from models.wan import WanCrossAttention
    model = randomise_dit(WanModel(**TINY))
    now = block_outputs(model, dit_inputs())
    monkeypatch.setattr(WanCrossAttention, 'forward', old_cross_attention_forward)
    old = block_outputs(model, dit_inputs())
    assert len(now) == 3 and all(torch.equal(a, b) for a, b in zip(now, old))
    args = [f'--out_dir={align_run}/run', '--steps=3', '--size=32*32']
    wrapped_sample(tmp_path, 'old', *args, f'--out={tmp_path}/old.mp4')
    r = run('sample.py', *args, f'--out={tmp_path}/now.mp4')
    assert r.returncode == 0, r.stderr
    old, now = video_frames(tmp_path / 'old.mp4'), video_frames(tmp_path / 'now.mp4')
    print(f'default sample against the pre-hook forward: mean |difference| {np.abs(old - now).mean():.4f} levels')
    assert old.std() > 1 and np.abs(old - now).mean() < 1.5  # measured 0.0 to 0.64; alpha 1.35 changes it by ~6


def test_alignvid_scale_is_the_softmax_temperature_and_lowers_entropy():
    """alpha scales the logits: softmax(alpha q k^T / sqrt(d)) v by hand; gamma_q 1.2 with gamma_k 1.5 is alpha 1.8;
    the attention entropy falls strictly as alpha grows; the adaptive variant follows its formula."""
    from models.steering import cross_attention, scaled
    m, x, context = tiny_cross_attention()
    with torch.no_grad():
        for alpha in (0.5, 1.35, 4.0):
            with scaled([m], alpha):
                assert torch.allclose(m(x, context), hand_attention(m, x, context, alpha)[1], atol=1e-5)
        with scaled([m], 1.8):
            assert torch.allclose(m(x, context), hand_attention(m, x, context, 1.2, 1.5)[1], atol=1e-5)
        entropy = {}
        for alpha in (0.5, 1.0, 1.35, 2.0, 4.0):
            probs = []
            cross_attention(m, x, context, alpha, probe=torch.arange(context.shape[1]), store=probs.append)
            entropy[alpha] = -(probs[0] * probs[0].clamp_min(1e-30).log()).sum(-1).mean().item()
        print('cross-attention entropy (nats, log 7 = %.3f) by alpha: ' % math.log(7) +
              ', '.join(f'{a:g}: {h:.4f}' for a, h in entropy.items()))
        assert all(a > b for a, b in zip(list(entropy.values()), list(entropy.values())[1:]))
        p = hand_attention(m, x, context)[0]  # alpha_i = 1 + (2 - 1) H_i / log M per query and head
        a = 1 + (-(p * p.log()).sum(-1, keepdim=True)) / math.log(7)
        q, k, v = qkv(m, x, context)
        want = m.o(F.scaled_dot_product_attention((a * q).transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
                   .transpose(1, 2).flatten(2))
        with scaled([m], 2.0, adaptive=True):
            assert torch.allclose(m(x, context), want, atol=1e-5)
        assert not torch.allclose(want, hand_attention(m, x, context, 2.0)[1], atol=1e-3)


def test_probe_is_the_softmax_and_rebuilds_the_output():
    """The probed probabilities are the softmax's columns (chunked or not, with their gradient) and, probing every
    text row, reproduce the module's output."""
    from models.steering import probe_probs, probing
    m, x, context = tiny_cross_attention(seed=3)
    with torch.no_grad():
        with probing([m], torch.tensor([1, 4, 6])) as probs:
            out = m(x, context)
        p, _ = hand_attention(m, x, context)
        assert probs[0].shape == (1, 10, 2, 3) and torch.allclose(probs[0], p[..., [1, 4, 6]], atol=1e-6)
        with probing([m], torch.arange(7)) as probs:
            m(x, context)
        assert 'forward' not in vars(m)  # the class's forward again
        v = m.v(context).view(1, 7, 2, -1)
        assert torch.allclose(m.o(torch.einsum('blnm,bmnd->blnd', probs[0], v).flatten(2)), out, atol=1e-5)
    q, k, _ = qkv(m, x, context)
    q = q.detach().requires_grad_()
    idx = torch.tensor([0, 2])
    whole, chunked = probe_probs(q, k, idx, 0.3, chunk=100), probe_probs(q, k, idx, 0.3, chunk=3)
    assert torch.allclose(whole, chunked, atol=1e-7)
    w = torch.randn_like(whole)
    g1, = torch.autograd.grad((whole * w).sum(), q)
    g2, = torch.autograd.grad((chunked * w).sum(), q)
    assert torch.allclose(g1, g2, atol=1e-6)


def sample_module(monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['sample.py'])  # importing the script reads its settings from the arguments
    import sample
    return sample


def test_alignvid_blocks_and_window_select_exactly(align_run, tmp_path, monkeypatch):
    """Blocks and steps outside the settings run unscaled (the default path, bit-equal); the unconditional pass
    follows alignvid_uncond; a window that holds no step gives the default video."""
    from models.steering import block_string, parse_blocks
    assert parse_blocks('0,2-7,10-20', 40, 'b') == [0, *range(2, 8), *range(10, 21)]
    assert len(parse_blocks('wan14b', 40, 'b')) == 28 and parse_blocks('all', 3, 'b') == [0, 1, 2]
    assert block_string([0, 2, 3, 4, 7, 9, 10]) == '0,2-4,7,9-10'
    with pytest.raises(SystemExit, match='names block 38, but the DiT has blocks 0-29'):
        parse_blocks('wan14b', 30, 'alignvid_blocks')
    with pytest.raises(SystemExit, match='expected all'):
        parse_blocks('x-3', 30, 'alignvid_blocks')
    args = [f'--out_dir={align_run}/run', '--steps=5', '--shift=5', '--size=32*32']  # alpha 4: a visible effect
    seen, _ = wrapped_sample(tmp_path, 'record', *args, '--alignvid=4.0', '--alignvid_blocks=0,2-3',
                             '--alignvid_t=(600,990)', '--alignvid_uncond=False', f'--out={tmp_path}/on.mp4')
    ts = UniPC(5, 5.0).timesteps.tolist()
    assert ts[0] > 990 and any(t <= 600 for t in ts) and any(600 < t <= 990 for t in ts)
    want = [[4.0 if 600 < t <= 990 and cond and b in (0, 2, 3) else None for b in range(4)]
            for t in ts for cond in (True, False)]
    assert seen == [s for call in want for s in call]
    r = run('sample.py', *args, f'--out={tmp_path}/off.mp4')
    assert r.returncode == 0, r.stderr
    r = run('sample.py', *args, '--alignvid=2.0', '--alignvid_t=(0,1)', f'--out={tmp_path}/empty.mp4')
    assert r.returncode == 0, r.stderr
    on, off, empty = (video_frames(tmp_path / f'{n}.mp4') for n in ('on', 'off', 'empty'))
    effect = np.abs(on - off).mean()
    print(f'mean |video difference|: alignvid on vs off {effect:.3f}, empty window vs off '
          f'{np.abs(empty - off).mean():.4f} levels')
    # two processes can round CPU matmuls differently (buffer addresses), which a random DiT amplifies: within a
    # tenth of what the scaling changes (the recorded scales above check the window exactly)
    assert effect > 0.5 and np.abs(empty - off).mean() < 0.1 * effect
    if torch.distributed.is_available() and torch.distributed.is_gloo_available():  # AlignVid under sp = 2
        r = torchrun(2, 'sample.py', *args, '--alignvid=4.0', '--alignvid_blocks=0,2-3', '--alignvid_t=(600,990)',
                     '--alignvid_uncond=False', f'--out={tmp_path}/sp.mp4')
        assert r.returncode == 0 and 'sp 2' in r.stdout, r.stderr[-3000:]
        sp = video_frames(tmp_path / 'sp.mp4')
        print(f'alignvid under sp 2 vs 1 process: {np.abs(on - sp).mean():.3f} levels')
        assert np.abs(on - sp).mean() < 0.2 * effect


def refocus_setup(sample, monkeypatch, seed=0):
    """A random debug-width DiT (gradients enabled on its weights, to show none arrive), a noisy latent of 3 x 8 x 8
    tokens, a 12-token context, and plan(boxes, verbs) for nouns at tokens [1, 2] and [5] and a verb at token [3];
    refocus(x, plan) refocuses on blocks 0 and 1 with sample.py's refocus settings at the time of the call."""
    from models.steering import Refocus, box_tokens, cross_attentions, phrase_map, probed, probing
    torch.manual_seed(seed)
    m = WanModel(**{**wan_configs['debug'], 'num_layers': 2})
    m.init_weights()
    g = torch.Generator().manual_seed(seed)
    x, ctx = torch.randn(1, 48, 3, 16, 16, generator=g), torch.randn(1, 64, 64, generator=g)
    ctx[:, 12:] = 0
    grid = (3, 8, 8)

    def plan(boxes, verbs=()):
        nouns = [([0, 1], box_tokens(boxes[0], grid, 4)), ([3], box_tokens(boxes[1], grid, 4))]
        return dict(idx=torch.tensor([1, 2, 3, 5]), grid=grid, nouns=nouns, verbs=[([2], n) for n in verbs])

    def maps(x, plan):
        with probing(cross_attentions(m, [0, 1]), plan['idx']) as probs, torch.no_grad():
            m(x, torch.tensor([950.0]), ctx, stop_after=2)
        p = probed(probs)
        return [phrase_map(p, cols, grid) for cols in ([0, 1], [3], [2])]  # noun 0, noun 1, verb

    def refocus(x, plan):
        r = Refocus(plan, [0, 1], sample.refocus_t, sample.refocus_verb_t, sample.refocus_iters, sample.refocus_step,
                    sample.refocus_tau, sample.refocus_verb_weight)
        with torch.no_grad():
            return r.refocus(m, x, torch.tensor([950.0]), ctx, None, 950, 0.95, torch.ones_like(x))[0]
    monkeypatch.setattr(sample, 'refocus_iters', 4)
    return m, x, plan, maps, refocus


def test_refocus_moves_attention_into_the_boxes(monkeypatch):
    from models.steering import box_tokens
    sample = sample_module(monkeypatch)
    m, x, plan, maps, refocus = refocus_setup(sample, monkeypatch)
    left, right = {0: [0.0, 0.0, 0.4, 1.0]}, {0: [0.6, 0.0, 1.0, 1.0]}
    centroid = lambda p: (p.view(3, 8, 8).sum(1) * (torch.arange(8) + 0.5) / 8).sum(-1).mean().item()
    inside = lambda p, keys: (p * box_tokens(keys, (3, 8, 8), 4)).sum(-1).mean().item()
    before = maps(x, plan([left, right]))[0]
    after = {}
    for name, keys in (('left', left), ('right', right)):
        after[name] = maps(refocus(x, plan([keys, {0: [0, 0, 1, 1]}])), plan([keys, right]))[0]
        print(f'noun mass in the {name} box: {inside(before, keys):.3f} -> {inside(after[name], keys):.3f}; '
              f'centroid x {centroid(before):.3f} -> {centroid(after[name]):.3f}')
        assert inside(after[name], keys) > inside(before, keys) + 0.05
    assert centroid(after['left']) < centroid(before) < centroid(after['right'])
    assert all(p.requires_grad and p.grad is None for p in m.parameters())


def test_contrastive_term_ties_the_verb_to_its_noun(monkeypatch):
    from models.steering import kl_adjacent
    sample = sample_module(monkeypatch)
    m, x, plan, maps, refocus = refocus_setup(sample, monkeypatch, seed=1)
    monkeypatch.setattr(sample, 'refocus_t', (0.0, 0.0))  # the contrastive term alone
    for noun in (0, 1):
        p = plan([{0: [0, 0, 0.5, 1]}, {0: [0.5, 0, 1, 1]}], verbs=[noun])
        n0, n1, v = maps(x, p)
        gap = lambda n0, n1, v: kl_adjacent(v, [n0, n1][noun]) - kl_adjacent(v, [n1, n0][noun])
        before = gap(n0, n1, v).item()
        after = gap(*maps(refocus(x, p), p)).item()
        print(f'verb bound to noun {noun}: KL(verb, its noun) - KL(verb, other noun) {before:.4f} -> {after:.4f}')
        assert after < before - 1e-3
    assert all(p.grad is None for p in m.parameters())



def test_refocus_gradient_is_the_same_with_block_checkpointing(monkeypatch):
    """On a GPU refocusing recomputes blocks in backward; the probes' side outputs keep the same latent gradient."""
    from models.steering import cross_attentions, layout_losses, probed, probing
    sample = sample_module(monkeypatch)
    m, x, plan, _, _ = refocus_setup(sample, monkeypatch)
    p, grads = plan([{0: [0, 0, 0.5, 1]}, {0: [0.5, 0, 1, 1]}], verbs=[0]), []
    for ck in (False, True):
        m.checkpointing = ck
        with probing(cross_attentions(m, [0, 1]), p['idx']) as probs:
            z = x.clone().requires_grad_()
            m(z, torch.tensor([950.0]), torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0)), stop_after=2)
            loss = sum(layout_losses(probed(probs), p, sample.refocus_tau))
            grads.append(torch.autograd.grad(loss, z)[0])
    assert grads[0].abs().max() > 0 and torch.equal(grads[0], grads[1])

def test_layout_files_are_checked(tmp_path):
    from models import steering
    build_tokenizer(['a red circle moves right and a blue square moves left'], tmp_path / 't.json')
    tok = Tokenizer(tmp_path / 't.json')
    text = 'A red circle moves right and a blue square moves left'
    assert steering.phrase_tokens(tok, text, 'blue square', 64, 'x') == [7, 8]
    assert steering.phrase_tokens(tok, text, 'a red circle', 64, 'x') == [0, 1, 2]

    def layout(spec, frames=9):
        path = tmp_path / 'l.json'
        path.write_text(spec if isinstance(spec, str) else json.dumps(spec))
        return steering.read_layout(str(path), frames)
    good = {'entities': [{'phrase': 'a red circle', 'boxes': {'0': [0.1, 0.1, 0.3, 0.4], '8': [0.6, 0.1, 0.8, 0.4]}}],
            'verbs': [{'phrase': 'moves right', 'noun': 'a red circle'}]}
    _, boxes, verbs = layout(good)
    assert steering.box_at(boxes['a red circle'], 4) == pytest.approx([0.35, 0.1, 0.55, 0.4]) and verbs == [('moves right', 'a red circle')]
    cover = steering.box_tokens({0: [0.25, 0.0, 0.5, 0.5]}, (1, 4, 4), 4).view(4, 4)
    assert cover.tolist() == [[0, 1, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    with pytest.raises(SystemExit, match="the phrase 'a green cone' is not in the prompt"):
        steering.phrase_tokens(tok, text, 'a green cone', 64, 'layout l.json')
    with pytest.raises(SystemExit, match=r'box \[0.1, 0.1, 1.3, 0.4\] is outside \[0, 1\]'):
        layout({'entities': [{'phrase': 'a', 'boxes': {'0': [0.1, 0.1, 1.3, 0.4]}}]})
    with pytest.raises(SystemExit, match=r'frame 9 is past the clip of 9 frames \(0-8\)'):
        layout({'entities': [{'phrase': 'a', 'boxes': {'9': [0.1, 0.1, 0.3, 0.4]}}]})
    with pytest.raises(SystemExit, match='not valid JSON'):
        layout('{"entities": [')
    with pytest.raises(SystemExit, match='non-empty "entities" list'):
        layout({'boxes': []})
    with pytest.raises(SystemExit, match='"noun" that is one of the entity phrases'):
        layout({**good, 'verbs': [{'phrase': 'moves right', 'noun': 'a blue square'}]})


def box_colour_mass(video, caption, boxes, stride=4):
    """Share of the pixels of each caption entity's colour (eval.py's colour distance) that lie inside its box,
    over the frames of a decoded video [T, H, W, 3] uint8; boxes from the layout, interpolated at each frame."""
    import eval as judge
    from models.steering import box_at
    T, H, W, _ = video.shape
    out = {}
    for name, keys in boxes.items():
        colour = judge.COLOURS[name.split()[1]]
        near = np.linalg.norm(video.astype(np.float32) - np.float32(colour), axis=-1) < judge.colour_dist
        inside = np.zeros_like(near)
        for p in range(T):
            x0, y0, x1, y1 = box_at(keys, p)
            inside[p, round(y0 * H):round(y1 * H), round(x0 * W):round(x1 * W)] = True
        out[name] = (near & inside).sum() / max(near.sum(), 1)
    return out


def test_refocus_and_calibrate_on_a_trained_toy_model(align_run, tmp_path, monkeypatch):
    """End to end on the toy run: the oracle layout of a held-out clip (its caption, boxes from its masks) with and
    without refocusing, the losses printed per step fall within the window, the video changes; calibrate lists the
    share of blocks asked for. The colour mass in the boxes is printed (a report, no threshold)."""
    import decord
    from models.steering import oracle_layout, parse_blocks
    monkeypatch.setattr(sys, 'argv', ['sample.py'])  # box_colour_mass imports eval.py, which reads the arguments
    args = [f'--out_dir={align_run}/run', '--steps=6', '--size=32*32', f'--layout_data={align_run}/data/val.jsonl']
    videos = {}
    for name, extra in (('plain', ['--refocus_t=(0,0)', '--refocus_verb_t=(0,0)']), ('refocused', [])):
        r = run('sample.py', *args, '--layout=oracle', *extra, f'--out={tmp_path}/{name}.mp4')
        assert r.returncode == 0, r.stderr
        videos[name] = decord.VideoReader(str(tmp_path / f'{name}.mp4')).get_batch(range(9)).asnumpy()
    assert not np.array_equal(videos['plain'], videos['refocused'])
    fell = [(float(a), float(b)) for a, b in re.findall(r'spatial (\S+) -> (\S+),', r.stdout)]
    assert len(fell) >= 2 and sum(b for _, b in fell) < sum(a for a, _ in fell), r.stdout
    caption, boxes, _ = oracle_layout(f'{align_run}/data/val.jsonl', 0, 9, 1)
    for name, v in videos.items():
        print(f'{name}: colour mass inside the boxes ' +
              ', '.join(f'{k} {m:.3f}' for k, m in box_colour_mass(v, caption, boxes).items()))
    r = run('sample.py', f'--out_dir={align_run}/run', '--size=32*32', f'--calibrate={align_run}/data/train.jsonl',
            '--calibrate_clips=4', '--calibrate_keep=0.5')
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    lifts = re.search(r'\n  (.*)\n', r.stdout).group(1).split()
    blocks = parse_blocks(re.search(r'--alignvid_blocks=(\S+)', r.stdout).group(1), 4, 'b')
    assert len(lifts) == 4 and len(blocks) == 2 and blocks == sorted(int(s.split(':')[0]) for s in lifts[:2])
    if torch.distributed.is_available() and torch.distributed.is_gloo_available():
        r = torchrun(2, 'sample.py', *args, '--layout=oracle', '--sp=2', f'--out={tmp_path}/sp.mp4')
        assert r.returncode != 0 and 'run them in one process per video (--sp=1)' in r.stderr


@pytest.mark.parametrize('model', ['ti2v-5b', 'i2v-a14b'])
def test_alignment_on_official_folders(tmp_path, model):
    """AlignVid and a layout file on image-to-video official folders (the token grid after the image's size
    rounding; TI2V's pinned first frame)."""
    import decord
    vae = WanVAE(z_dim=6, dim=8, dec_dim=12, wan22=True, num_res_blocks=1) if model == 'ti2v-5b' else \
        WanVAE(z_dim=4, dim=8, num_res_blocks=1)
    experts, in_dim = ([''], 6) if model == 'ti2v-5b' else (['high_noise_model', 'low_noise_model'], 12)
    root = fake_official(tmp_path / 'ckpt', model[:4], in_dim, vae, experts)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 200, 3), dtype=np.uint8)).save(tmp_path / 'im.png')
    (tmp_path / 'l.json').write_text(json.dumps({
        'prompt': 'a red circle moves right', 'verbs': [{'phrase': 'moves right', 'noun': 'a red circle'}],
        'entities': [{'phrase': 'a red circle', 'boxes': {'0': [0.0, 0.2, 0.4, 0.8], '4': [0.6, 0.2, 1.0, 0.8]}}]}))
    args = [f'--ckpt_dir={root}', f'--model={model}', '--frames=5', '--steps=4', f'--image={tmp_path}/im.png',
            '--size=96*64', '--alignvid=1.35', '--alignvid_t=(0,1000)', f'--layout={tmp_path}/l.json',
            '--refocus_blocks=1', '--refocus_iters=1', '--refocus_t=(0,1000)', f'--out={tmp_path}/o.mp4']
    r = run('sample.py', *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count('layout losses') == 4 and "refocusing 1 phrase(s), 1 verb(s) at blocks 1" in r.stdout
    assert len(decord.VideoReader(str(tmp_path / 'o.mp4'))) == 5


def test_train_from_official_folder_and_export(tmp_path):
    vae = WanVAE(z_dim=6, dim=8, dec_dim=12, wan22=True, num_res_blocks=1)
    root = fake_official(tmp_path / 'ckpt', 'ti2v', 6, vae, [''])
    make_shapes(tmp_path / 'data', n_train=4, n_val=1, frames=9, size=32, fps=8, seed=0)
    args = [f'--data={tmp_path}/data/train.jsonl', f'--ckpt_dir={root}', f'--init_from={root}', '--frames=5',
            '--height=32', '--width=32', '--batch_size=2', '--max_iters=2', '--log_interval=1']
    r = run('train_dit.py', *args, '--learning_rate=0.0', f'--out_dir={tmp_path}/frozen', f'--export_dir={tmp_path}/e0')
    assert r.returncode == 0, r.stderr
    official = load_dit(str(root), 'cpu').state_dict()
    exported = load_dit(str(tmp_path / 'e0'), 'cpu').state_dict()
    assert all(torch.equal(official[k], exported[k]) for k in official)  # lr 0: the official weights, round-tripped
    r = run('train_dit.py', *args, f'--out_dir={tmp_path}/run', f'--export_dir={tmp_path}/e1')
    assert r.returncode == 0, r.stderr
    trained = checkpoint_of('train_dit.py', tmp_path / 'run')
    assert 't5' not in trained  # the official umT5 stays in ckpt_dir, not in every checkpoint
    exported = load_dit(str(tmp_path / 'e1'), 'cpu').state_dict()
    assert all(torch.equal(trained['ema']['dit.' + k], exported[k]) for k in exported)  # the EMA is what is exported
    assert not torch.equal(official['blocks.0.ffn.0.weight'], exported['blocks.0.ffn.0.weight'])
    r = run('sample.py', f'--out_dir={tmp_path}/run', '--steps=2', f'--out={tmp_path}/s.mp4')
    assert r.returncode == 0, r.stderr
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return
    # two ranks: each fills only its FSDP slices from the official files, or from a run folder's sharded checkpoint
    raw = {k: trained['model']['dit.' + k] for k in exported}  # a run folder starts others from its trained weights
    for init, out, ref in ((root, 'e2', official), (tmp_path / 'run', 'e3', raw)):
        r = torchrun(2, 'train_dit.py', *args[:2], f'--init_from={init}', *args[3:], '--batch_size=1',
                     '--learning_rate=0.0', f'--out_dir={tmp_path}/{out}run', f'--export_dir={tmp_path}/{out}')
        assert r.returncode == 0, r.stderr[-3000:]
        again = load_dit(str(tmp_path / out), 'cpu').state_dict()
        assert again.keys() == ref.keys() and all(torch.equal(ref[k], again[k]) for k in ref)


def trd_losses(log):
    return {int(line.split()[1][:-1]): float(line.split()[5][:-1]) for line in log.splitlines() if ' trd ' in line}


def test_trd_training_falls_and_resumes_exactly(tiny_run):
    root, args, _ = tiny_run
    # shift 1: timesteps spread evenly (at shift 5 most are near pure noise, where the DiT's tokens align slowly)
    full, rest, a, b = resumed('train_dit.py', [*args, '--route=uniform', '--proj_dim=64', '--align_layer=2', '--shift=1'],
                               root / 'trd', stop=10, end=20)
    flow, align = losses(full), trd_losses(full)
    assert all(math.isfinite(v) for v in [*flow.values(), *align.values()])
    # (one iteration's L_TRD depends much on its clips and timesteps: compare the halves of the run)
    assert sum(align[i] for i in range(11, 21)) < 0.8 * sum(align[i] for i in range(1, 11))
    assert sum(flow[i] for i in range(11, 21)) < sum(flow[i] for i in range(1, 11))
    for i in range(11, 21):  # the projector and its optimizer state come back with the run
        assert losses(rest)[i] == flow[i] and trd_losses(rest)[i] == align[i]
    projector = [k for k in a['model'] if k.startswith('projector.')]
    assert len(projector) == 6 and all(torch.equal(a['model'][k], b['model'][k]) for k in projector)


# ---------------------------------------------------------------------------------------------- Stage 1 aligner

def test_k_plus_2_queries_and_pooled_targets_by_hand():
    T, H, W = 4, 32, 32  # grid (2, 2, 2): each token is 2 frames x 16 x 16 = 512 pixels
    a, b = torch.zeros(T, H, W), torch.zeros(T, H, W)
    a[0, :8, :16] = 1           # token (0, 0, 0): 128 of 512 pixels
    a[2:, 16:, 16:] = 1         # token (1, 1, 1): all of it
    b[0, :8, :16] = 0.5         # soft, on top of a's pixels: union there is 1 - 0 * 0.5 = 1
    b[1, 16:24, :16] = 0.5      # token (0, 1, 0): 128 pixels at 0.5 -> 64 / 512
    a[1, 16:24, :16] = 0.5      # the same pixels: soft OR 1 - 0.5 * 0.5 = 0.75 (max would give 0.5)
    b[3, :16, 16:] = 1          # token (1, 0, 1): 256 of 512
    masks = torch.stack([a, b])
    kinds, texts, targets = build_queries(['a red circle', 'a blue square'], masks, 'a grey floor', 'whole caption')
    assert kinds == ['entity', 'entity', 'union', 'background']
    assert texts == ['a red circle', 'a blue square', 'a red circle and a blue square', 'a grey floor']
    union = 1 - (1 - a) * (1 - b)
    assert torch.equal(targets[0], a) and torch.equal(targets[1], b)
    assert torch.equal(targets[2], union) and torch.equal(targets[3], 1 - union)
    assert targets[2][0, 0, 0] == 1 and targets[2][1, 20, 0] == 0.75 and targets[3][1, 20, 0] == 0.25
    pooled = mask_targets(targets, (2, 2, 2)).view(4, 2, 2, 2)  # (t, h, w) order
    want_a = torch.zeros(2, 2, 2)
    want_a[0, 0, 0], want_a[0, 1, 0], want_a[1, 1, 1] = 128 / 512, 64 / 512, 1
    want_b = torch.zeros(2, 2, 2)
    want_b[0, 0, 0], want_b[0, 1, 0], want_b[1, 0, 1] = 64 / 512, 64 / 512, 256 / 512
    want_u = torch.zeros(2, 2, 2)
    want_u[0, 0, 0], want_u[0, 1, 0], want_u[1, 1, 1], want_u[1, 0, 1] = 128 / 512, 96 / 512, 1, 256 / 512
    for got, want in zip(pooled, (want_a, want_b, want_u, 1 - want_u)):
        assert torch.allclose(got, want, atol=1e-6), (got, want)
    # K = 1: the union query would repeat the entity query, so it is asked once
    kinds, texts, targets = build_queries(['a red circle'], masks[:1], 'a grey floor')
    assert kinds == ['entity', 'background'] and torch.equal(targets[1], 1 - a)
    # no background caption: no background query
    assert build_queries(['x', 'y'], masks, '')[0] == ['entity', 'entity', 'union']


def test_mask_targets_follow_the_video_resize_and_crop():
    # a mask that is also the video's red channel: its pooled target must equal the pooled preprocessed channel,
    # whatever resize and crop preprocess applies (here 40x72 -> 32x64: scale 1, crop; and 48x40 -> 32x32: shrink, crop)
    g = torch.Generator().manual_seed(0)
    for shape, grid in (((6, 40, 72), (3, 2, 4)), ((4, 48, 40), (2, 2, 2))):
        m = (torch.rand(shape, generator=g) > 0.6).float()
        video = (m * 2 - 1).expand(1, 3, *shape)
        x = preprocess(video, grid[1:])[0, 0] * STD[0] + MEAN[0]  # back to [0, 1]
        want = F.avg_pool3d(x[None, None], (shape[0] // grid[0], 16, 16)).flatten()
        got = mask_targets(m[None], grid)[0]
        assert got.shape == (math.prod(grid),) and torch.allclose(got, want, atol=1e-5)
        assert (got > 0.05).any() and (got < 0.95).any()


def test_clip_without_entities_and_mask_count():
    masks = torch.zeros(0, 4, 8, 8)
    kinds, texts, targets = build_queries([], masks, 'a grey floor', 'a grey floor, nothing else')
    assert kinds == ['scene'] and texts == ['a grey floor'] and torch.equal(targets, torch.ones(1, 4, 8, 8))
    assert build_queries([], masks, '', 'the caption')[1] == ['the caption']
    with pytest.raises(ValueError, match='without entities needs a background or a caption'):
        build_queries([], masks, '', '')
    with pytest.raises(ValueError, match='1 masks for 2 entity captions'):
        build_queries(['a', 'b'], torch.zeros(1, 4, 8, 8), 'bg')


def test_entity_without_mask_is_caught_in_the_manifest(tiny):
    # a manifest entity carries its own mask, so counts cannot differ; one without a mask is named with its line
    good = json.loads((tiny / 'train.jsonl').read_text().splitlines()[0])
    p = tiny / 'nomask.jsonl'
    p.write_text(json.dumps(dict(good, entities=[{'caption': 'a thing'}])) + '\n')
    with pytest.raises(ValueError, match=r"nomask\.jsonl line 1: entity 0 needs keys 'caption' and 'mask'"):
        read_manifest(p)


def test_overlong_caption_warns_once_naming_the_clip(tiny, capsys):
    tok = Tokenizer(tiny / 'tokenizer.json')
    long = ' '.join(['a red circle moves left'] * 5)  # 25 words + </s>
    warned = set()
    ids, mask = tokenize(tok, ['a red circle', long], 8, ['clips.jsonl line 3', 'clips.jsonl line 7'], warned)
    assert mask.sum(1).tolist() == [4, 8] and ids[1, 7] == 1  # truncated, </s> kept last
    out = capsys.readouterr().out
    assert out.count('warning') == 1 and 'clips.jsonl line 7' in out and 'has 26 tokens' in out
    assert 'text_len=8' in out and 'line 3' not in out
    tokenize(tok, [long, long], 8, ['clips.jsonl line 7'] * 2, warned)
    assert capsys.readouterr().out == ''  # one-time
    tokenize(tok, [long], 26, ['clips.jsonl line 7'], set())  # fits exactly: no warning
    assert capsys.readouterr().out == ''


def test_one_umt5_when_the_aligner_reads_the_dits_file(tmp_path):
    from models.aligner import same_t5
    name = 'models_t5_umt5-xxl-enc-bf16.pth'
    for d in ('a', 'b', 'c'):
        os.makedirs(tmp_path / d)
    (tmp_path / 'a' / name).write_bytes(b'x')
    os.link(tmp_path / 'a' / name, tmp_path / 'b' / name)  # the same file under another folder
    (tmp_path / 'c' / name).write_bytes(b'x')  # an equal copy is another file: both are loaded
    assert same_t5(str(tmp_path / 'a'), str(tmp_path / 'b')) and not same_t5(str(tmp_path / 'a'), str(tmp_path / 'c'))
    assert not same_t5('', str(tmp_path / 'a'))


# ---------------------------------------------------------------------------------------------- metrics

def test_auroc_and_iou_by_hand():
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    s = torch.tensor([0.1, 0.2, 0.7, 0.9, 0.3, 0.8])
    assert auroc(s, y) == 1.0 and auroc(-s, y) == 0.0
    assert auroc(torch.ones(6), y) == 0.5
    # pos {0.4, 0.8} vs neg {0.1, 0.4}: 1 + 0.5 (tie) + 1 + 1 of 4 pairs
    assert auroc(torch.tensor([0.1, 0.4, 0.4, 0.8]), torch.tensor([0, 1, 0, 1])) == 0.875
    assert math.isnan(auroc(s, torch.ones(6)))
    g = torch.Generator().manual_seed(0)
    s, y = torch.randint(0, 5, (200,), generator=g).float(), torch.rand(200, generator=g) > 0.7
    pos, neg = s[y], s[~y]
    brute = ((pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()).mean().item()
    assert abs(auroc(s, y) - brute) < 1e-12
    p = torch.tensor([0.9, 0.6, 0.5, 0.2, 0.7])
    t = torch.tensor([1.0, 0.0, 1.0, 0.6, 0.4])
    # predicted {0, 1, 4} (0.5 is not above the threshold), true {0, 2, 3}: 1 shared of 5
    assert iou(p, t) == 0.2 and iou(torch.zeros(3), torch.zeros(3)) == 1.0 and iou(p, torch.zeros(5)) == 0.0


# ---------------------------------------------------------------------------------------------- model and losses

@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp('aligner')
    make_shapes(root, n_train=8, n_val=2, frames=17, size=32, fps=8, seed=0)
    return root


def test_info_nce_leaves_out_repeated_captions():
    e = torch.eye(3, 8)  # orthonormal: logits 1/t on the diagonal, 0 elsewhere
    assert torch.allclose(info_nce(e, e, ['a', 'b', 'c'], 0.5), torch.tensor(math.log(1 + 2 * math.exp(-2))))
    g = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=-1)
    c = g[[0, 0, 2]]  # clips 0 and 1 share caption 'a': clip 1's positive is clip 0's embedding
    same = info_nce(g, c, ['a', 'a', 'c'], 1.0)
    logits = g @ c.T
    row = [F.cross_entropy(logits[i, keep][None], torch.tensor([keep.index(i)]))
           for i, keep in enumerate(([0, 2], [1, 2], [0, 1, 2]))]
    col = [F.cross_entropy(logits.T[i, keep][None], torch.tensor([keep.index(i)]))
           for i, keep in enumerate(([0, 2], [1, 2], [0, 1, 2]))]
    assert torch.allclose(same, (sum(row) + sum(col)) / 6, atol=1e-6)


def test_aligner_loss_falls_on_a_toy_batch(tiny):
    torch.manual_seed(0)
    batch = next(iter(ClipLoader(tiny / 'train.jsonl', 4, 8, 32, 32, stride=2, seed=0)))
    grid = (4, 2, 2)
    vjepa = VJEPA(**vjepa_configs['debug']).eval()
    t5 = T5Encoder(**t5_configs['debug']).init_weights(0).eval()
    tok = Tokenizer(tiny / 'tokenizer.json')
    with torch.no_grad():
        tokens = vjepa(preprocess(batch['video'], grid[1:]))
        clip_of, texts, targets = [], [], []
        for b in range(4):
            _, t, m = build_queries(batch['entity_captions'][b], batch['masks'][b], batch['background'][b])
            clip_of, texts, targets = clip_of + [b] * len(t), texts + t, targets + [mask_targets(m, grid)]
        targets = torch.cat(targets)
        ids, mask = tok(texts + batch['caption'], 32)
        text = encode(t5, ids, mask, 32)
    aligner = Aligner(128, 64, dim=64, heads=2, depth=1)
    opt = torch.optim.AdamW(aligner.parameters(), lr=3e-3)
    Q, losses = len(texts), []
    for _ in range(30):
        logits, emb = aligner(tokens[clip_of + list(range(4))], grid, text, mask)
        bce = F.binary_cross_entropy_with_logits(logits[:Q], targets)
        nce = info_nce(emb[Q:], aligner.embed_text(text[Q:], mask[Q:]), batch['caption'], 0.07)
        loss = bce + 0.1 * nce
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append((bce.item(), nce.item()))
    (b0, n0), (b1, n1) = losses[0], losses[-1]
    assert b1 < 0.5 * b0 and n1 < 0.5 * n0, losses
    # padding is masked: extra pad tokens change nothing
    with torch.no_grad():
        padded = torch.cat([text, torch.randn(len(text), 3, 64)], 1)
        pmask = torch.cat([mask, torch.zeros(len(mask), 3, dtype=mask.dtype)], 1)
        a = aligner(tokens[clip_of + list(range(4))], grid, text, mask)
        b = aligner(tokens[clip_of + list(range(4))], grid, padded, pmask)
    assert torch.allclose(a[0], b[0], atol=1e-5) and torch.allclose(a[1], b[1], atol=1e-5)


# ---------------------------------------------------------------------------------------------- the trainer

ALIGNER_ARGS = ['--frames=8', '--height=32', '--width=48', '--batch_size=4', '--dim=32', '--heads=2', '--depth=1',
        '--log_interval=1', '--eval_interval=3', '--ckpt_interval=1000', '--pictures=2', '--picture_frames=3',
        '--picture_zoom=2', '--text_len=40', '--warmup_iters=2', '--lr_decay_iters=6']


def png_size(rows, frames=3, zoom=2, height=32, width=48, gap=2, label=14):
    """(width, height) of a saliency picture: `rows` rows (queries), each a text strip above 2 zoomed cells per frame
    (mask overlay, heatmap), gaps between them."""
    return 2 * frames * (zoom * width + gap) - gap, rows * (label + zoom * height + gap) - gap


ALIGNER_PNG_SIZE = png_size(4)  # (586, 318): val clip 0 has K = 1 entity, K + 3 queries


def aligner_losses(log):
    return {int(m[1]): (m[2], m[3]) for m in re.finditer(r'^iter (\d+): bce ([\d.]+), nce ([\d.]+)', log, re.M)}


@pytest.fixture(scope='module')
def trained(tiny, tmp_path_factory):
    """A 6-iteration run on the tiny set, whose train.jsonl has a clip without entities and an over-long caption."""
    root = tmp_path_factory.mktemp('aligner_run')
    lines = [json.loads(l) for l in (tiny / 'train.jsonl').read_text().splitlines()]
    lines[2] = dict(lines[2], entities=[])
    lines[5] = dict(lines[5], caption=' '.join([lines[5]['caption']] * 6))  # > 40 tokens
    (tiny / 'odd.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
    args = [f'--data={tiny}/odd.jsonl', *ALIGNER_ARGS]
    r = run('train_aligner.py', *args, f'--out_dir={root}/a', '--max_iters=6')
    assert r.returncode == 0, r.stderr
    return root, args, r.stdout


def test_training_writes_checkpoint_metrics_and_pictures(trained):
    root, _, log = trained
    assert sorted(aligner_losses(log)) == list(range(1, 7))
    ckpt = torch.load(root / 'a' / 'ckpt.pt', weights_only=False)
    assert ckpt['iter'] == 6 and ckpt['grid'] == (4, 2, 3) and 'vjepa' in ckpt and 't5' in ckpt
    m = json.load(open(root / 'a' / 'metrics.json'))
    assert m['iter'] == 6 and [h['iter'] for h in m['history']] == [3, 6]
    for kind in ('union', 'entity', 'caption'):
        assert 0 <= m[kind]['iou'] <= 1 and 0 <= m[kind]['auroc'] <= 1 and 0 <= m[kind]['baseline_auroc'] <= 1
    assert m['union']['queries'] == 2  # the two validation clips
    assert re.search(r'^eval 6: union IoU [\d.]+ \(baseline [\d.]+\), AUROC [\d.]+ \(baseline [\d.]+\)', log, re.M)
    for it in (3, 6):
        with Image.open(root / 'a' / 'saliency' / f'iter_{it:04d}_clip0.png') as im:
            assert im.size == ALIGNER_PNG_SIZE and im.mode == 'RGB'
    with Image.open(root / 'a' / 'saliency' / 'iter_0006_clip0.png') as im:
        px = np.asarray(im)
    assert (px[14:78, 96:98] == 255).all()  # the gap after the first cell, below the text strip
    assert px[14:78, :96].std() > 0         # the overlay cell is an image


def test_aligner_pictures_label_every_query(trained, tiny):
    # val clip 1 with K entities: one row per query, K + 3 (entities, union, background, full caption), each labelled
    root, _, _ = trained
    rec = json.loads((tiny / 'val.jsonl').read_text().splitlines()[1])
    ents = [e['caption'] for e in rec['entities']]
    rows = len(ents) + 3
    with Image.open(root / 'a' / 'saliency' / 'iter_0006_clip1.png') as im:
        labels, px = json.loads(im.text['labels']), np.asarray(im)
    assert len(ents) >= 2 and len(labels) == rows and px.shape[1::-1] == png_size(rows)
    assert [l.split(' (IoU ')[0] for l in labels] == ['entity'] * len(ents) + ['union', 'background', 'caption']
    assert all(re.fullmatch(r'\w+ \(IoU [01]\.\d\d\): .+', l) for l in labels), labels
    assert [l.split('): ', 1)[1] for l in labels] == ents + [' and '.join(ents), rec['background'], rec['caption']]
    for r in range(rows):  # each row's text strip has dark text on white
        strip = px[r * (14 + 64 + 2):][:14]
        assert (strip < 100).any() and (strip == 255).mean() > 0.5


def test_clip_without_entities_and_long_caption_are_reported_once(trained):
    _, _, log = trained
    notes = [l for l in log.splitlines() if 'no entities' in l]
    assert len(notes) == 1 and 'odd.jsonl line 3' in notes[0]  # 3 epochs of 2 batches: seen 3 times, said once
    warns = [l for l in log.splitlines() if l.startswith('warning')]
    assert len(warns) == 1 and 'odd.jsonl line 6' in warns[0] and 'text_len=40' in warns[0]


def test_saliency_task_draws_any_clip_and_caption(trained, tiny):
    root, _, _ = trained
    clip = read_manifest(tiny / 'val.jsonl')[0]['video']
    r = run('train_aligner.py', '--task=saliency', f'--out_dir={root}/a', f'--video={clip}',
            '--caption=a red circle', f'--out={root}/s.png', '--picture_zoom=3')  # 4 frames: the default
    assert r.returncode == 0, r.stderr
    assert 'wrote' in r.stdout
    with Image.open(root / 's.png') as im:
        assert im.size == png_size(1, frames=4, zoom=3) == (1166, 110)  # one row: the caption, no IoU without masks
        assert json.loads(im.text['labels']) == ['a red circle']
    assert json.load(open(root / 'a' / 'config.json'))['task'] == 'train'  # drawing leaves the run alone
    r = run('train_aligner.py', '--task=saliency', f'--out_dir={root}/a', f'--video={root}/nope.mp4', '--caption=x')
    assert r.returncode != 0 and 'nope.mp4: file not found' in r.stderr


def test_aligner_resume_continues_exactly(trained):
    root, args, _ = trained
    full, rest, a, b = resumed('train_aligner.py', args, root)
    assert sorted(aligner_losses(rest)) == [4, 5]  # 2 batches per epoch: iteration 5 is in a new epoch
    assert aligner_losses(rest)[4] == aligner_losses(full)[4] and aligner_losses(rest)[5] == aligner_losses(full)[5]
    assert all(torch.equal(a['aligner'][k], b['aligner'][k]) for k in a['aligner'])
    assert a['loader'] == b['loader']
    assert [h['iter'] for h in json.load(open(root / 'half' / 'metrics.json'))['history']] == [3, 5]


def test_torchrun_two_ranks_match_one_process(tiny, tmp_path):
    # ranks take alternate clips of each epoch's permutation: 2 ranks x 2 clips see the same 4 clips as 1 x 4, and
    # the loss is normalised over the global batch (BCE) and taken over the gathered batch (InfoNCE); in fp32, as bf16
    # roundings of the frozen encoders' outputs change with the batch split
    args = [f'--data={tiny}/train.jsonl', *ALIGNER_ARGS, '--max_iters=2', '--eval_interval=1000', '--amp=off']
    one = run('train_aligner.py', *args, f'--out_dir={tmp_path}/one')
    two = run('-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29517', 'train_aligner.py', *args,
              '--batch_size=2', f'--out_dir={tmp_path}/two', env={'CUDA_VISIBLE_DEVICES': ''})
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a, b = aligner_losses(one.stdout), aligner_losses(two.stdout)
    assert sorted(a) == sorted(b) == [1, 2]
    for i in (1, 2):
        assert all(abs(float(x) - float(y)) <= 2e-4 for x, y in zip(a[i], b[i])), (a, b)
    assert 'eval 2' in two.stdout and two.stdout.count('done:') == 1  # rank 0 alone evaluates and writes


def test_text_embeddings_from_the_manifest(tiny, tmp_path):
    # every clip with an .npy caption embedding: InfoNCE targets live in that space (width 16), no text projection
    os.makedirs(tiny / 'emb', exist_ok=True)
    lines = [json.loads(l) for l in (tiny / 'train.jsonl').read_text().splitlines()]
    for i, l in enumerate(lines):
        np.save(tiny / 'emb' / f'{i}.npy', np.random.default_rng(i).standard_normal(16).astype(np.float32))
        l['text_embedding'] = f'emb/{i}.npy'
    (tiny / 'emb.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
    r = run('train_aligner.py', f'--data={tiny}/emb.jsonl', *ALIGNER_ARGS, '--max_iters=2', f'--out_dir={tmp_path}/e')
    assert r.returncode == 0, r.stderr
    ckpt = torch.load(tmp_path / 'e' / 'ckpt.pt', weights_only=False)
    assert ckpt['arch']['embed_dim'] == 16 and ckpt['aligner']['global_head.weight'].shape == (16, 32)
    assert not any(k.startswith('text_proj') for k in ckpt['aligner'])
    # some clips with one, some without: refused, naming the first clip without
    del lines[3]['text_embedding']
    (tiny / 'mixed.jsonl').write_text(''.join(json.dumps(l) + '\n' for l in lines))
    r = run('train_aligner.py', f'--data={tiny}/mixed.jsonl', *ALIGNER_ARGS, '--max_iters=2', f'--out_dir={tmp_path}/m')
    assert r.returncode != 0 and 'mixed.jsonl line 4 has no text_embedding but other clips do' in r.stderr


# ---------------------------------------------------------------------------------------------- Stage 2 with the aligner

def test_sara_or_route_trains_on_the_aligner_saliency(trained, tiny, tmp_path):
    root, _, _ = trained
    args = [f'--data={tiny}/train.jsonl', '--frames=9', '--height=16', '--width=16', '--batch_size=4', '--proj_dim=64',
            '--log_interval=1', '--max_iters=20', '--warmup_iters=5', f'--out_dir={tmp_path}/dit']
    r = run('train_dit.py', *args, '--route=or', f'--aligner_ckpt={root}/a/ckpt.pt')
    assert r.returncode == 0, r.stderr
    flow, align = losses(r.stdout), trd_losses(r.stdout)
    assert all(math.isfinite(v) for v in [*flow.values(), *align.values()]) and len(align) == 20
    assert sum(align[i] for i in range(16, 21)) < sum(align[i] for i in range(1, 6))
    assert sum(flow[i] for i in range(16, 21)) < sum(flow[i] for i in range(1, 6))
    budget = re.findall(r'saliency ([\d.]+), pairs fg-fg/fg-bg/bg-bg (\d+)%/(\d+)%/(\d+)%, or weight', r.stdout)
    assert len(budget) == 20 and all(0 < float(s) < 1 and abs(sum(map(int, p)) - 100) <= 2 for s, *p in budget)
    r = run('train_dit.py', *args, '--route=and', f'--aligner_ckpt={tmp_path}/none.pt')
    assert r.returncode != 0 and 'run python train_aligner.py first' in r.stderr
    # one frozen V-JEPA for every route: uniform takes the aligner's too, and a different one is refused
    r = run('train_dit.py', *args, '--route=uniform', '--max_iters=1', f'--aligner_ckpt={root}/a/ckpt.pt')
    assert r.returncode == 0 and f'TRD targets: the frozen V-JEPA (debug) of {root}/a/ckpt.pt' in r.stdout, r.stderr
    r = run('train_dit.py', *args, '--route=uniform', '--vjepa_model=vjepa2-vitl', '--vjepa_ckpt=v.pt',
            f'--aligner_ckpt={root}/a/ckpt.pt')
    one_line_error(r, "differ from the V-JEPA of")


# ---------------------------------------------------------------------------------------------- the frozen-output cache

# 9 of a clip's 17 frames: the window has room to move (the centre one is taken) and 2 latent frames remain for TRD
# (motion needs 2); 8 clips of batch 4, so 4 iterations span 2 epochs; half the captions dropped, so the empty
# caption's cached features are read
# fp32: the cache runs the frozen encoders one clip at a time, training a batch at a time, and bf16 rounds differently
CACHE_ARGS = ['--frames=9', '--frame_stride=1', '--height=16', '--width=16', '--batch_size=4', '--proj_dim=32',
              '--log_interval=1', '--warmup_iters=2', '--max_iters=4', '--ckpt_interval=1000', '--caption_dropout=0.5',
              '--amp=off']

# train_dit.py with every frozen model and the video decoder refusing to be built or run
NO_FROZEN = """import runpy, sys
import data, models.aligner, models.t5, models.vae, models.vjepa
def refuse(*args, **kwargs):
    raise RuntimeError('a frozen model or the video decoder was used')
for cls in (models.t5.T5Encoder, models.vjepa.VJEPA, models.aligner.Aligner, models.vae.WanVAE):
    cls.__init__ = refuse
models.vae.PixelCodec.encode = data.load_clip = refuse
sys.argv = ['train_dit.py', *sys.argv[1:]]
runpy.run_path('train_dit.py', run_name='__main__')
"""


def test_training_from_the_cache_gives_the_online_losses(trained, tiny, tmp_path):
    """One cache built for SARA's or route (latents, umT5 features, the aligner's V-JEPA targets and saliency) serves
    every route; training from it builds no frozen model, decodes no video and logs the online losses."""
    root, _, _ = trained
    args = [f'--data={tiny}/train.jsonl', *CACHE_ARGS, f'--aligner_ckpt={root}/a/ckpt.pt', f'--cache_dir={tmp_path}/c']
    r = run('train_dit.py', *args, '--route=or', '--cache=build')
    assert r.returncode == 0 and 'cached the frozen outputs of 8 clips' in r.stdout, r.stderr
    assert sorted(os.listdir(tmp_path / 'c')) == [f'{i:08d}.pt' for i in range(1, 9)] + ['meta.pt', 'tokenizer.json']
    entry = torch.load(tmp_path / 'c' / '00000001.pt')
    caption = json.loads((tiny / 'train.jsonl').read_text().splitlines()[0])['caption']
    n_text = int(Tokenizer(tiny / 'tokenizer.json')([caption], 64)[1].sum())
    # 48 x (1 + 2) x 8 x 8 latents; the caption's own tokens, not 64; 2 x 4 x 4 tokens after latent frame 0
    assert entry['x0'].shape == (48, 3, 8, 8) and entry['context'].shape == (n_text, 64)
    assert entry['context'].untyped_storage().nbytes() == n_text * 64 * 4  # trimmed on disk too
    assert entry['y'].shape == (32, 128) and entry['w'].shape == (32,)
    for route in ('none', 'uniform', 'motion', 'or'):
        online = run('train_dit.py', *args, f'--route={route}', '--window=centre', f'--out_dir={tmp_path}/{route}-online')
        cached = run('-c', NO_FROZEN, *args, f'--route={route}', '--cache=use', f'--out_dir={tmp_path}/{route}-cached')
        assert online.returncode == 0 and cached.returncode == 0, online.stderr[-2000:] + cached.stderr[-2000:]
        assert 'the VAE, umT5, V-JEPA and aligner are not loaded' in cached.stdout
        print(route, losses(online.stdout), trd_losses(online.stdout), losses(cached.stdout), trd_losses(cached.stdout))
        assert sorted(losses(online.stdout)) == [1, 2, 3, 4]
        for i, v in losses(online.stdout).items():  # printed to 4 decimals
            assert abs(losses(cached.stdout)[i] - v) <= 1e-4, (route, online.stdout, cached.stdout)
        for i, v in trd_losses(online.stdout).items():
            assert abs(trd_losses(cached.stdout)[i] - v) <= 1e-4, (route, online.stdout, cached.stdout)
        assert len(trd_losses(cached.stdout)) == (0 if route == 'none' else 4)


@pytest.fixture(scope='module')
def cached_copy(tiny, tmp_path_factory):
    """A copy of the tiny set (its files get touched) and a cache of it for route uniform with the debug V-JEPA."""
    root = tmp_path_factory.mktemp('cache')
    shutil.copytree(tiny, root / 'd', ignore=shutil.ignore_patterns('odd.jsonl', 'mixed.jsonl', 'cache-*'))
    args = [f'--data={root}/d/train.jsonl', *CACHE_ARGS, '--route=uniform', '--aligner_ckpt=']
    r = run('train_dit.py', *args, '--cache=build')
    assert r.returncode == 0 and os.path.exists(root / 'd' / 'cache-train' / 'meta.pt'), r.stderr
    return root, args


def test_a_cache_made_otherwise_or_incomplete_is_refused(cached_copy, tmp_path):
    root, args = cached_copy
    use = lambda *more: run('train_dit.py', *args, '--cache=use', f'--out_dir={tmp_path}/o', *more)
    folder = root / 'd' / 'cache-train'
    one_line_error(use('--height=32'), f'{folder} was made with height = 16, but this run has 32: build it again')
    one_line_error(use('--seed=1'), 'was made with umT5 = debug, seed 0, but this run has debug, seed 1')
    one_line_error(use('--trd_pool=2'), 'was made with trd_pool = 1, but this run has 2')
    one_line_error(use('--route=or'), f'{folder} holds no saliency (it was built with route=uniform): build it again '
                                      f'with --route=or --cache=build')
    one_line_error(use('--cache_dir=' + str(tmp_path)), f'{tmp_path} holds no finished cache (no meta.pt)')
    tokenizer = root / 'd' / 'tokenizer.json'  # another file of the same name: its time tells
    os.utime(tokenizer, (tokenizer.stat().st_atime, tokenizer.stat().st_mtime + 10))
    one_line_error(use(), 'was made with tokenizer = tokenizer.json (')
    os.utime(tokenizer, (tokenizer.stat().st_atime, tokenizer.stat().st_mtime - 10))
    manifest = root / 'd' / 'train.jsonl'
    text = manifest.read_text()
    manifest.write_text(text.replace('moves', 'glides', 1))
    one_line_error(use(), 'was made with manifest = train.jsonl (sha256 ')
    manifest.write_text(text)
    os.remove(folder / '00000003.pt')  # what an interrupted build leaves
    one_line_error(use(), f'{folder} has no entry for {manifest} line 3 ({root}/d/clips/0002.mp4): its build did not '
                          f'finish; build it again with --cache=build')


# ---------------------------------------------------------------------------------------------- bad input, checkpoints

def one_line_error(r, phrase):
    """A user error: non-zero exit, exactly one line on stderr, no traceback, containing phrase."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and phrase in lines[0] and 'Traceback' not in r.stderr, r.stderr[-2000:]


def test_bad_sizes_and_damaged_checkpoints_end_in_one_line(tiny_run, tmp_path):
    root, args, _ = tiny_run
    data = args[0]
    one_line_error(run('train_dit.py', data, '--height=30', f'--out_dir={tmp_path}/x'),
                   '--height=30 is not a multiple of 4 (2 px per latent x 2 latents per DiT token): use 28 or 32')
    one_line_error(run('train_dit.py', data, '--frames=8', f'--out_dir={tmp_path}/x'), '--frames=8: clips need 1 + 4k')
    one_line_error(run('train_dit.py', data, '--route=uniform', '--frames=1', "--aligner_ckpt=", f'--out_dir={tmp_path}/x'),
                   'k >= 1 for TRD')
    one_line_error(run('train_dit.py', data, '--route=uniform', '--trd_pool=3', "--aligner_ckpt=",
                       f'--out_dir={tmp_path}/x'), '--trd_pool=3 does not divide the 8x8 token grid')
    one_line_error(run('sample.py', f'--ckpt_dir={tmp_path}/nowhere'), f'{tmp_path}/nowhere holds no DiT')
    # a damaged checkpoint: its meta.pt, then one of its shard files
    shutil.copytree(root / 'a', tmp_path / 'a', symlinks=True)
    ckpt = tmp_path / 'a' / 'ckpt'
    meta = (ckpt / 'meta.pt').read_bytes()
    (ckpt / 'meta.pt').write_bytes(meta[:len(meta) // 2])
    resume = ['train_dit.py', *args, '--init_from=resume', '--max_iters=70', f'--out_dir={tmp_path}/a']
    one_line_error(run(*resume), f'{ckpt}/meta.pt cannot be read')
    (ckpt / 'meta.pt').write_bytes(meta)
    shard = next(p for p in ckpt.iterdir() if p.suffix == '.distcp')
    shard.write_bytes(shard.read_bytes()[:100])
    one_line_error(run(*resume), f'{ckpt} cannot be read')
    one_line_error(run('sample.py', f'--out_dir={tmp_path}/a'), f'{ckpt} cannot be read')


def test_step_checkpoints_keep_last_and_resume_a_chosen_one(tiny_run, tmp_path):
    root, args, _ = tiny_run
    r = run('train_dit.py', *args, '--max_iters=4', '--ckpt_interval=1', '--keep_last=2', f'--out_dir={tmp_path}/r')
    assert r.returncode == 0, r.stderr
    os.makedirs(tmp_path / 'r' / 'ckpt-000009.tmp')  # what a save killed half-way leaves: never picked
    assert sorted(os.listdir(tmp_path / 'r')) == ['ckpt', 'ckpt-000003', 'ckpt-000004', 'ckpt-000009.tmp',
                                                  'config.json', 'tokenizer.json']
    assert os.readlink(tmp_path / 'r' / 'ckpt') == 'ckpt-000004'
    again = run('train_dit.py', *args, '--max_iters=4', '--init_from=resume', '--resume_ckpt=ckpt-000003',
                f'--out_dir={tmp_path}/r')
    assert again.returncode == 0, again.stderr
    assert losses(again.stdout) == {4: losses(r.stdout)[4]}  # the chosen checkpoint continues the same curve
    newest = run('train_dit.py', *args, '--max_iters=5', '--init_from=resume', f'--out_dir={tmp_path}/r')
    assert newest.returncode == 0 and sorted(losses(newest.stdout)) == [5], newest.stderr
    one_line_error(run('train_dit.py', *args, '--init_from=resume', '--resume_ckpt=ckpt-000001',
                       f'--out_dir={tmp_path}/r'), 'checkpoints of')


def test_a_damaged_aligner_checkpoint_ends_in_one_line(trained, tiny, tmp_path):
    root, args, _ = trained
    shutil.copytree(root / 'a', tmp_path / 'a')
    blob = (tmp_path / 'a' / 'ckpt.pt').read_bytes()
    (tmp_path / 'a' / 'ckpt.pt').write_bytes(blob[:len(blob) // 3])
    one_line_error(run('train_aligner.py', *args, '--init_from=resume', '--max_iters=8', f'--out_dir={tmp_path}/a'),
                   f'{tmp_path}/a/ckpt.pt cannot be read')
    one_line_error(run('train_dit.py', f'--data={tiny}/train.jsonl', '--frames=9', '--height=16', '--width=16',
                       '--route=or', f'--aligner_ckpt={tmp_path}/a/ckpt.pt', f'--out_dir={tmp_path}/d'),
                   f'{tmp_path}/a/ckpt.pt cannot be read')


def test_a_manifest_without_tokenizer_gets_a_toy_one(tiny_run, tmp_path):
    root, args, _ = tiny_run
    shutil.copytree(root / 'data', tmp_path / 'mine')
    os.remove(tmp_path / 'mine' / 'tokenizer.json')
    r = run('train_dit.py', f'--data={tmp_path}/mine/train.jsonl', *args[1:], '--max_iters=1', f'--out_dir={tmp_path}/o')
    assert r.returncode == 0, r.stderr
    assert 'has no tokenizer.json beside it: built a word-level toy tokenizer from the captions of its 8 clips' in r.stdout
    caption = json.loads((tmp_path / 'mine' / 'train.jsonl').read_text().splitlines()[0])['caption']
    ids, _ = Tokenizer(str(tmp_path / 'o' / 'tokenizer.json'))([caption], 64)
    assert (ids > 2).sum() == len(caption.split())  # every word of the captions is known (2 = <unk>)


@pytest.mark.skipif(not (shutil.which('g++') or shutil.which('clang++')), reason='torch.compile needs a C++ compiler')
def test_compiled_blocks_train_as_eager_ones(tiny_run, tmp_path):
    root, args, _ = tiny_run  # the stated tolerance: 2e-3 on the loss, printed to 4 decimals
    eager, compiled = (run('train_dit.py', *args, '--max_iters=2', f'--compile={c}', f'--out_dir={tmp_path}/{c}')
                       for c in ('off', 'on'))
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr[-2000:]
    a, b = losses(eager.stdout), losses(compiled.stdout)
    assert sorted(a) == sorted(b) == [1, 2] and all(abs(a[i] - b[i]) <= 2e-3 for i in a), (a, b)


def test_a_diverging_run_stops_before_its_checkpoint(tiny_run, tmp_path):
    root, args, _ = tiny_run
    r = run('train_dit.py', *args, '--max_iters=2', '--ckpt_interval=2', f'--out_dir={tmp_path}/d')
    assert r.returncode == 0, r.stderr
    # the loss explodes right away; the next checkpoint (iteration 4) would overwrite the good one's rotation
    bad = run('train_dit.py', *args, '--init_from=resume', '--max_iters=6', '--ckpt_interval=2', '--learning_rate=1e9',
              '--warmup_iters=1', f'--out_dir={tmp_path}/d')
    one_line_error(bad, f'the loss reached')
    assert f'stopped before checkpointing; {tmp_path}/d/ckpt (iteration 2) is the last good one' in bad.stderr
    assert os.readlink(tmp_path / 'd' / 'ckpt') == 'ckpt-000002' and not (tmp_path / 'd' / 'ckpt-000004').exists()


def test_a_garbage_first_clip_and_out_of_range_settings_end_in_one_line(tiny_run, tmp_path):
    root, args, _ = tiny_run
    shutil.copytree(root / 'data', tmp_path / 'g')
    (tmp_path / 'g' / 'clips' / '0000.mp4').write_bytes(b'not a video' * 100)
    one_line_error(run('train_dit.py', f'--data={tmp_path}/g/train.jsonl', *args[1:], f'--out_dir={tmp_path}/o'),
                   f'{tmp_path}/g/train.jsonl line 1: video {tmp_path}/g/clips/0000.mp4 could not be decoded')
    r = run('train_dit.py', f'--data={tmp_path}/g/train.jsonl', *args[1:], '--skip_bad=True', '--max_iters=1',
            '--batch_size=2', f'--out_dir={tmp_path}/o')
    assert r.returncode == 0 and 'skipped 1 of 8 clips' in r.stdout, r.stderr[-2000:]
    one_line_error(run('train_dit.py', '--learning_rate=-1'), '--learning_rate=-1.0: the settings need learning_rate >= 0')
    one_line_error(run('train_dit.py', '--t_range=(0.9,0.2)'), 'the settings need 0 <= t_range[0] < t_range[1] <= 1')
    one_line_error(run('train_dit.py', '--ema_decay=1.5'), 'the settings need 0 <= ema_decay < 1')


# ---------------------------------------------------------------------------------------------- multi-process (torchrun, gloo)

multiprocess = pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                                  reason='needs torch.distributed with the gloo backend')


def torchrun(n, *args):
    """n gloo processes on the CPU, also on a machine with fewer GPUs than n."""
    return run('-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', *args,
               env={'CUDA_VISIBLE_DEVICES': ''})


# train_dit.py in a folder of its rank's own: a relative out_dir is then a node-local folder
OWN_FOLDER = """import os, runpy, sys
root = {root!r}
os.makedirs(f'rank{os.environ["RANK"]}', exist_ok=True)
os.chdir(f'rank{os.environ["RANK"]}')
sys.path.insert(0, root)
sys.argv = ['train_dit.py', *sys.argv[1:]]
runpy.run_path(os.path.join(root, 'train_dit.py'), run_name='__main__')
"""


@multiprocess
def test_an_out_dir_that_is_not_shared_is_refused(tiny_run, tmp_path):
    root, args, _ = tiny_run
    (tmp_path / 'own.py').write_text(OWN_FOLDER.replace('{root!r}', repr(ROOT)))
    r = run('-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2', str(tmp_path / 'own.py'), *args,
            '--batch_size=2', '--max_iters=1', '--out_dir=out', cwd=tmp_path, env={'CUDA_VISIBLE_DEVICES': ''})
    assert r.returncode != 0 and 'out_dir=out is not one folder shared by every rank' in r.stderr, r.stderr[-3000:]
    assert not any(any((tmp_path / f'rank{k}' / 'out').glob('ckpt*')) for k in (0, 1))


def test_each_process_gets_its_own_visible_gpu(monkeypatch):
    from models.parallel import pick_device
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)  # a scheduler's per-task CUDA_VISIBLE_DEVICES
    assert pick_device('cuda', local=3) == torch.device('cuda', 0)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 8)
    assert pick_device('cuda', local=5) == torch.device('cuda', 5)
    with pytest.raises(SystemExit, match='LOCAL_RANK 9 has no GPU of its own'):
        pick_device('cuda', local=9)
    assert pick_device('cpu', local=5) == torch.device('cpu')


def test_a_frozen_sharded_model_holds_only_its_shards_after_forward():
    from torch.distributed.tensor import DTensor
    from models import parallel
    mesh, dev = parallel.init(1, 'cpu')
    t5 = T5Encoder(**t5_configs['debug']).eval().requires_grad_(False)
    plain, frozen = parallel.shard(t5, mesh, t5.blocks), None
    ids = torch.randint(3, 100, (1, 8))
    with torch.no_grad():
        plain(ids, torch.ones_like(ids))
    assert not all(isinstance(p, DTensor) for p in plain.parameters())  # FSDP2 keeps a root unit gathered
    t5 = T5Encoder(**t5_configs['debug']).eval().requires_grad_(False)
    frozen = parallel.shard_frozen(t5, mesh, t5.blocks)
    with torch.no_grad():
        frozen(ids, torch.ones_like(ids))
    assert all(isinstance(p, DTensor) for p in frozen.parameters())


def sp_parity_worker():
    """Under torchrun: a small DiT, projector and TRD on 3x3x5 = 45 tokens (padded to a multiple of sp) with the sp
    group and without it (every rank the whole sequence); rank 0 prints the worst differences as JSON."""
    from models import parallel
    mesh, _ = parallel.init(int(os.environ['WORLD_SIZE']))
    group, sp = parallel.sp_group(mesh), mesh['sp'].size()
    torch.manual_seed(0)
    dit = WanModel(in_dim=4, dim=32, ffn_dim=64, out_dim=4, num_heads=4, num_layers=2, text_dim=8, text_len=6,
                   freq_dim=16)
    dit.init_weights()
    with torch.no_grad():  # away from the zero-initialised head, so that every parameter gets a gradient
        for p in dit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    proj = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.SiLU(), torch.nn.Linear(16, 8))
    x, ctx = torch.randn(2, 4, 3, 6, 10), torch.randn(2, 6, 8)
    target, y, w = torch.randn(2, 4, 3, 6, 10), torch.randn(2, 30, 8), torch.rand(2, 30)
    results = {}
    for route in ('none', 'uniform', 'or'):
        for per_token in (False, True):
            t = torch.rand(2, 45) * 1000 if per_token else torch.rand(2) * 1000
            runs = []
            for g in (None, group):
                dit.zero_grad(), proj.zero_grad()
                out, feats = dit(x, t, ctx, features_at=1, group=g)
                share = F.mse_loss(out, target) / (1 if g is None else sp)  # the trainer's shares
                if route != 'none':
                    z = parallel.seq_gather(proj(feats), g, 45).unflatten(1, (3, 3, 5))[:, 1:].flatten(1, 3)
                    share = share + 0.5 * trd_loss(z, y, w, route=route, part=(0, 1) if g is None else (g.rank(), sp))
                share.backward()
                params = [*dit.named_parameters(), *proj.named_parameters(prefix='projector')]
                grads = {k: p.grad.clone() for k, p in params if p.grad is not None}
                loss = share.detach().clone()
                if g is not None:  # what FSDP's average over the group, times sp, gives
                    for v in [loss, *grads.values()]:
                        torch.distributed.all_reduce(v, group=g)
                runs.append((out.detach(), loss, grads))
            (o0, l0, g0), (o1, l1, g1) = runs
            rel = {k: ((g0[k] - g1[k]).abs().max() / g0[k].abs().max()).item() for k in g0}
            worst = max(rel, key=rel.get)
            results[f'{route}/{"per-token" if per_token else "shared"}'] = dict(
                out=((o0 - o1).abs().max() / o0.abs().max()).item(), loss=abs(l0 - l1).item() / abs(l0).item(),
                grad=rel[worst], worst=worst, params=len(g0), same_keys=g0.keys() == g1.keys())
    if torch.distributed.get_rank() == 0:
        print('RESULT ' + json.dumps(results))
    parallel.close()


@multiprocess
@pytest.mark.parametrize('sp', [2, 4])
def test_sequence_parallel_forward_and_gradients_match_one_process(sp):
    r = torchrun(sp, 'test_sara.py', 'sp_parity')
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.split('RESULT ')[1])
    assert len(results) == 6
    for name, e in results.items():
        print(f'sp={sp} {name}: output {e["out"]:.1e}, loss {e["loss"]:.1e}, worst of {e["params"]} parameter '
              f'gradients {e["grad"]:.1e} ({e["worst"]})')
        assert e['same_keys'] and e['params'] == (69 if name.startswith('none') else 73)  # DiT (+ projector)
        assert e['out'] <= 1e-6 and e['loss'] <= 1e-6 and e['grad'] <= 2e-5, (name, e)


@multiprocess
def test_caching_on_two_ranks_gives_the_cache_of_one_process(tiny, tmp_path):
    """7 clips on 2 ranks (4 and 3: the short rank repeats a clip unwritten, as the FSDP-sharded V-JEPA needs every
    rank in each forward) give the files of one process."""
    lines = (tiny / 'train.jsonl').read_text().splitlines()[:7]
    (tiny / 'seven.jsonl').write_text(''.join(l + '\n' for l in lines))
    args = [f'--data={tiny}/seven.jsonl', *CACHE_ARGS, '--batch_size=2', '--route=uniform', '--aligner_ckpt=',
            '--cache=build']
    one = run('train_dit.py', *args, f'--cache_dir={tmp_path}/one')
    two = torchrun(2, 'train_dit.py', *args, f'--cache_dir={tmp_path}/two')
    assert one.returncode == 0 and two.returncode == 0, one.stderr[-3000:] + two.stderr[-3000:]
    assert 'cached the frozen outputs of 7 clips' in two.stdout and 'on 2 ranks' in two.stdout
    names = sorted(os.listdir(tmp_path / 'one'))
    assert names == sorted(os.listdir(tmp_path / 'two')) and len(names) == 7 + 2
    for name in names:
        if not name.endswith('.pt'):
            assert (tmp_path / 'one' / name).read_bytes() == (tmp_path / 'two' / name).read_bytes(), name
            continue
        a, b = (torch.load(tmp_path / d / name, weights_only=False) for d in ('one', 'two'))
        assert a.keys() == b.keys(), name
        for k in a:  # the tensors (an entry's, the empty caption's, the debug umT5's), then the rest (settings, files)
            if torch.is_tensor(a[k]) or k == 't5':
                assert all(torch.allclose(x, y, rtol=0, atol=1e-6) for x, y in zip(flat({0: a[k]}), flat({0: b[k]})))
            else:
                assert a[k] == b[k], (name, k)


# 45 tokens per clip (3 latent frames of 3x5): not a multiple of sp = 2; TRD against V-JEPA targets; checkpointing;
# fp32, since bf16 roundings change with the batch split and sequence sharding (the layouts' math is what is tested)
LAYOUT_ARGS = ['--frames=9', '--height=12', '--width=20', '--max_iters=4', '--log_interval=1', '--warmup_iters=2',
               '--route=uniform', '--proj_dim=32', '--checkpointing=on', '--amp=off']


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
    """One process with batch 4, and the same global batch as dp x sp = 2x1, 1x2, 2x2 and as 2 accumulation steps."""
    root = tmp_path_factory.mktemp('layouts')
    make_shapes(root / 'data', n_train=8, n_val=1, frames=17, size=32, fps=8, seed=0)
    args = [f'--data={root}/data/train.jsonl', *LAYOUT_ARGS]
    logs = {'1x1': run('train_dit.py', *args, '--batch_size=4', f'--out_dir={root}/1x1'),
            'accum': run('train_dit.py', *args, '--batch_size=2', '--grad_accum=2', f'--out_dir={root}/accum'),
            '2x1': torchrun(2, 'train_dit.py', *args, '--batch_size=2', f'--out_dir={root}/2x1',
                            f'--export_dir={root}/export'),
            '1x2': torchrun(2, 'train_dit.py', *args, '--batch_size=4', '--sp=2', f'--out_dir={root}/1x2'),
            '2x2': torchrun(4, 'train_dit.py', *args, '--batch_size=2', '--sp=2', f'--out_dir={root}/2x2')}
    for name, r in logs.items():
        assert r.returncode == 0, (name, r.stderr[-3000:])
    return root, args, {k: r.stdout for k, r in logs.items()}


@multiprocess
def test_layouts_give_the_losses_and_parameters_of_one_process(layouts):
    root, _, logs = layouts
    assert 'world 4 = dp 2 x sp 2; global batch 4 = batch_size 2 x dp 2 x grad_accum 1' in logs['2x2']
    assert all(log.count('done:') == 1 for log in logs.values())  # rank 0 alone logs and writes
    one = checkpoint_of('train_dit.py', root / '1x1')['model']
    for name in ('accum', '2x1', '1x2', '2x2'):
        for i in range(1, 5):  # the logged means over ranks, printed to 4 decimals
            assert abs(losses(logs[name])[i] - losses(logs['1x1'])[i]) <= 1e-4, (name, logs[name])
            assert abs(trd_losses(logs[name])[i] - trd_losses(logs['1x1'])[i]) <= 1e-4, (name, logs[name])
        other = checkpoint_of('train_dit.py', root / name)['model']
        diff = {k: (other[k] - one[k]).abs().max().item() for k in one}
        worst = max(diff, key=diff.get)
        print(f'{name}: worst parameter {worst} differs by {diff[worst]:.1e} after 4 AdamW steps of lr 2e-3')
        assert other.keys() == one.keys() and diff[worst] <= 5e-5  # Adam's sign-like steps amplify 1e-7 gradients
    exported = load_dit(str(root / 'export'), 'cpu').state_dict()  # consolidated by rank 0, official layout
    two = checkpoint_of('train_dit.py', root / '2x1')['ema']  # the export is the EMA
    assert all(torch.equal(exported[k], two['dit.' + k]) for k in exported)


@multiprocess
def test_checkpoint_of_world_4_resumes_at_world_2_and_1(layouts):
    root, args, logs = layouts
    half = torchrun(4, 'train_dit.py', *args, '--batch_size=1', '--max_iters=2', f'--out_dir={root}/w4')
    assert half.returncode == 0, half.stderr[-3000:]
    shutil.copytree(root / 'w4', root / 'w4b')
    two = torchrun(2, 'train_dit.py', *args, '--batch_size=2', '--init_from=resume', f'--out_dir={root}/w4')
    one = run('train_dit.py', *args, '--batch_size=4', '--init_from=resume', f'--out_dir={root}/w4b')
    assert two.returncode == 0 and one.returncode == 0, two.stderr[-3000:] + one.stderr[-3000:]
    full = losses(logs['1x1'])
    for log in (half.stdout, two.stdout, one.stdout):  # one loss curve, whatever the world size
        assert all(abs(v - full[i]) <= 1e-4 for i, v in losses(log).items())
    assert sorted(losses(two.stdout)) == sorted(losses(one.stdout)) == [3, 4]
    bad = run('train_dit.py', *args, '--batch_size=2', '--init_from=resume', f'--out_dir={root}/w4b')
    assert bad.returncode != 0 and 'was trained with a global batch of 4 clips; this layout gives 2' in bad.stderr


@multiprocess
def test_a14b_experts_sharded_over_the_sp_ranks_sample_the_one_process_video(tmp_path):
    """Under torchrun each rank holds 1/sp of each expert (FSDP over the sp group), never both whole experts."""
    import decord
    vae = WanVAE(z_dim=4, dim=8, num_res_blocks=1)
    root = fake_official(tmp_path / 'ckpt', 't2v', 4, vae, ['high_noise_model', 'low_noise_model'], heads=2)
    args = [f'--ckpt_dir={root}', '--model=t2v-a14b', '--frames=5', '--steps=4', '--size=64*32', '--guidance=1',
            '--amp=off']
    one = run('sample.py', *args, f'--out={tmp_path}/one.mp4')
    two = torchrun(2, 'sample.py', *args, '--sp=2', f'--out={tmp_path}/two.mp4')
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    a, b = (decord.VideoReader(str(tmp_path / f'{n}.mp4')).get_batch(range(5)).asnumpy().astype(float)
            for n in ('one', 'two'))
    assert np.abs(a - b).mean() < 0.5, np.abs(a - b).mean()  # CPU rounding across processes, as sp=2 above


def test_sampling_with_sp_2_equals_one_process(layouts):
    import decord
    root, _, _ = layouts
    args = [f'--out_dir={root}/2x2', '--steps=3', '--size=32*32', '--amp=off']
    one = run('sample.py', *args, f'--out={root}/s1.mp4')
    two = torchrun(2, 'sample.py', *args, f'--out={root}/s2.mp4')
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert 'sp 2' in two.stdout and two.stdout.count('wrote') == 1
    a, b = (decord.VideoReader(str(root / n)).get_batch(range(9)).asnumpy().astype(float) for n in ('s1.mp4', 's2.mp4'))
    # (the forward is exact, see the sp parity test; CPU matmuls may round by buffer address, which 3 steps amplify)
    print(f'sp 2 against sp 1: mean |difference| {np.abs(a - b).mean():.3f} levels')
    assert a.shape == (9, 32, 32, 3) and a.std() > 1 and np.abs(a - b).mean() < 0.5


@multiprocess
def test_batch_sampling_names_files_like_vbench_and_splits_the_prompts(layouts, tmp_path):
    import decord
    root, _, _ = layouts
    texts = ['a red circle moves right over a grey floor', 'a blue square moves up over a grey floor',
             'a green triangle moves left over a grey floor']
    (tmp_path / 'p.txt').write_text('\n'.join(texts) + '\n\n')
    args = [f'--out_dir={root}/1x1', '--steps=2', '--size=32*32', f'--prompts={tmp_path}/p.txt', '--samples=2']
    want = sorted(f'{t}-{i}.mp4' for t in texts for i in range(2))
    one = run('sample.py', *args, f'--out={tmp_path}/one')
    two = torchrun(2, 'sample.py', *args, '--sp=1', f'--out={tmp_path}/two')
    assert one.returncode == 0 and two.returncode == 0, one.stderr + two.stderr[-3000:]
    assert sorted(os.listdir(tmp_path / 'one')) == sorted(os.listdir(tmp_path / 'two')) == want
    ranks = {}
    for name, rank in re.findall(r'wrote [^\n]*?([^/\n]*\.mp4): [^\n]*?; rank (\d)', two.stdout):  # lines may interleave
        ranks.setdefault(rank, set()).add(name)
    assert sorted(ranks) == ['0', '1'] and ranks['0'].isdisjoint(ranks['1']) and len(ranks['0']) == len(ranks['1']) == 3
    frames = lambda folder, name: decord.VideoReader(str(tmp_path / folder / name)).get_batch(range(9)).asnumpy()
    diff = lambda a, b: np.abs(frames(*a).astype(float) - frames(*b)).mean()
    assert all(diff(('one', n), ('two', n)) < 0.5 for n in want)  # seed + index, whoever writes it
    assert diff(('one', want[0]), ('one', want[1])) > 2  # another index, another noise
    again = run('sample.py', *args, f'--out={tmp_path}/one')  # a finished batch writes nothing more
    assert again.returncode == 0 and 'wrote' not in again.stdout


@multiprocess
def test_impossible_layouts_are_refused_in_one_sentence(layouts):
    root, args, _ = layouts
    r = torchrun(3, 'train_dit.py', *args, '--sp=2', f'--out_dir={root}/bad')
    assert r.returncode != 0 and 'sp=2 does not divide the world size 3' in r.stderr
    r = torchrun(3, 'train_dit.py', *args, '--sp=3', f'--out_dir={root}/bad')
    assert r.returncode != 0 and 'sp=3 does not divide the 2 attention heads of this DiT' in r.stderr
    r = torchrun(2, 'train_dit.py', *args, '--batch_size=8', f'--out_dir={root}/bad')
    assert r.returncode != 0 and 'has 8 usable clips, fewer than the 16 of one iteration' in r.stderr
    assert not os.path.exists(root / 'bad' / 'ckpt')


# ---------------------------------------------------------------------------------------------- eval.py (toy judge)

@pytest.fixture(scope='module')
def judged_clips(tmp_path_factory):
    """Four held-out toy clips at 64x64, decoded as the judge sees generated videos: (manifest, [(video, record)])."""
    import decord
    root = tmp_path_factory.mktemp('judge')
    make_shapes(root, n_train=4, n_val=4, frames=17, size=64, fps=8, seed=0)
    recs = read_manifest(root / 'val.jsonl')
    return root / 'val.jsonl', [(decord.VideoReader(r['video']).get_batch(range(17)).asnumpy(), r) for r in recs]


def test_judge_scores_real_clips_high_and_noise_low(judged_clips, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['eval.py'])  # importing the script reads its settings from the arguments
    from eval import judge
    _, clips = judged_clips
    real = [judge(v, r['caption']) for v, r in clips]
    rng = np.random.default_rng(0)
    noise = [judge(rng.integers(0, 256, v.shape, dtype=np.uint8), r['caption']) for v, r in clips]
    for name, rs in (('real', real), ('noise', noise)):
        print(name, {k: (round(float(np.mean([r[k] for r in rs])), 3), round(float(np.std([r[k] for r in rs])), 3))
                     for k in ('score', 'entity', 'direction', 'background')})
    assert all(0 <= r[k] <= 1 for r in real + noise for k in ('score', 'entity', 'direction', 'background'))
    assert np.mean([r['score'] for r in real]) >= 0.85 and min(r['direction'] for r in real) == 1
    assert max(r['score'] for r in noise) <= 0.1


def test_judge_notices_a_recoloured_entity_and_a_clip_played_backwards(judged_clips, monkeypatch):
    monkeypatch.setattr(sys, 'argv', ['eval.py'])  # importing the script reads its settings from the arguments
    from eval import judge
    _, clips = judged_clips
    for v, r in clips:
        colour = r['caption'].split()[1]  # the first entity's: "a red circle moves ..."
        other = next(c for c in COLOURS if c not in r['caption'])
        mask = np.load(r['entities'][0]['mask'])['mask'].astype(bool)
        mask = F.max_pool2d(torch.from_numpy(mask)[:, None].float(), 3, 1, 1)[:, 0].numpy() > 0  # and its blurred rim
        recoloured = v.copy()
        recoloured[mask] = COLOURS[other]
        before, after, back = judge(v, r['caption']), judge(recoloured, r['caption']), judge(v[::-1], r['caption'])
        n = len(r['entities'])
        print(f"{r['caption']}: entity {before['entity']:.3f} -> {after['entity']:.3f} ({colour} -> {other}), "
              f"direction {before['direction']:.3f} -> backwards {back['direction']:.3f}")
        assert before['entities'][0]['present'] >= 0.75 and after['entities'][0]['present'] == 0
        assert after['entity'] <= before['entity'] - 0.75 / n
        assert before['direction'] == 1 and back['direction'] == 0


def test_eval_script_prints_the_means_and_writes_json(judged_clips, tmp_path):
    manifest, _ = judged_clips
    r = run('eval.py', f'--videos={manifest}', f'--out={tmp_path}/judge.json')
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    assert re.search(r'^mean over 4 videos: score [\d.]+ \+- [\d.]+ entity', r.stdout, re.M)
    saved = json.load(open(tmp_path / 'judge.json'))
    assert len(saved['videos']) == 4 and saved['summary']['score']['mean'] >= 0.85
    r = run('eval.py')
    assert r.returncode == 1 and r.stderr.strip() == 'error: nothing to judge: pass --videos=<manifest.jsonl>'


def test_eval_samples_and_judges_runs(tiny_run, tmp_path):
    root, _, _ = tiny_run  # (the run's clips are 16x16, which decord misreads: sample at 32x32)
    r = run('eval.py', f'--videos={root}/data/val.jsonl', f'--runs={root}/a', '--seeds=2', '--steps=2', '--size=32*32',
            f'--out={tmp_path}/j.json')
    assert r.returncode == 0, r.stderr
    assert re.search(r'^real clips +[\d.]+ \+- ', r.stdout, re.M) and re.search(rf'^{root}/a +[\d.]+ \+- ', r.stdout, re.M)
    res = json.load(open(tmp_path / 'j.json'))
    per_seed = res['runs'][f'{root}/a']
    captions = [json.loads(l)['caption'] for l in (root / 'data' / 'val.jsonl').read_text().splitlines()]
    assert [[v['caption'] for v in seed] for seed in per_seed] == [captions, captions]
    assert sorted(os.listdir(root / 'a' / 'judged')) == sorted([f'{c}-{i}.mp4' for c in captions for i in (0, 1)] +
                                                               ['prompts.txt'])
    assert all(0 <= res['table'][f'{root}/a'][k]['mean'] <= 1 for k in ('score', 'entity', 'direction', 'background'))


def test_word_effects_measure_what_the_dit_reads_from_the_caption(tiny_run, tmp_path, monkeypatch):
    """eval.py --words: a run's x0 estimate moves when a caption word is swapped; with the cross-attention's output
    zeroed (a DiT that reads no caption) nothing moves; the numbers reach the printout and the JSON."""
    monkeypatch.setattr(sys, 'argv', ['eval.py'])  # importing the script reads its settings from the arguments
    import eval as judge
    import models.checkpoint as ckpt
    root, _, _ = tiny_run
    recs = read_manifest(root / 'data' / 'val.jsonl')
    effects = judge.word_effects(str(root / 'a'), recs)
    assert list(effects) == ['shape swapped', 'direction swapped', 'colour swapped', 'caption dropped']
    assert all(list(e) == [0.9, 0.6, 0.3] and all(v > 1e-4 for v in e.values()) for e in effects.values()), effects
    load = ckpt.load_ckpt_dit

    def deaf(*args, **kwargs):
        dit, meta = load(*args, **kwargs)
        for block in dit.blocks:
            block.cross_attn.o.weight.data.zero_(), block.cross_attn.o.bias.data.zero_()
        return dit, meta
    monkeypatch.setattr(ckpt, 'load_ckpt_dit', deaf)
    deaf_effects = judge.word_effects(str(root / 'a'), recs)
    # (at most float rounding: the batch's last row may take another GEMM path)
    assert all(v < 1e-6 for e in deaf_effects.values() for v in e.values()), deaf_effects
    monkeypatch.setattr(ckpt, 'load_ckpt_dit', load)
    r = run('eval.py', f'--videos={root}/data/val.jsonl', f'--runs={root}/a', '--seeds=2', '--steps=2', '--size=32*32',
            '--words=True', f'--out={tmp_path}/j.json')
    assert r.returncode == 0, r.stderr
    assert f'{root}/a: mean |change| of the x0 estimate at sigma 0.9 / 0.6 / 0.3: shape swapped ' in r.stdout
    res = json.load(open(tmp_path / 'j.json'))
    assert res['words'][f'{root}/a']['colour swapped']['0.9'] == pytest.approx(effects['colour swapped'][0.9])
    # the samples of the swapped captions (seed 0) against the caption's own, and its next seed for scale
    moved = res['samples'][f'{root}/a']
    assert list(moved) == ['shape swapped', 'direction swapped', 'colour swapped', 'next seed']
    assert moved['next seed'] > 1 and all(v >= 0 for v in moved.values()), moved
    assert (f"{root}/a: mean |change| of the seed-0 samples (of 255): shape swapped {moved['shape swapped']:.2f}"
            in r.stdout)
    captions = [json.loads(l)['caption'] for l in (root / 'data' / 'val.jsonl').read_text().splitlines()]
    assert sorted(os.listdir(root / 'a' / 'swapped')) == sorted([f'{t}-0.mp4' for c in captions
                                                                 for t in judge.swapped(c)] + ['prompts.txt'])


def test_a_short_run_raises_the_judge_score(tmp_path):
    """Learning, end to end, as nanoGPT's overfit check: 300 iterations on two 32x32 toy clips lift the judge's
    score of samples of their captions (fixed seeds) well above the same model untrained (learning rate 0). A broken
    target, loss, codec or sampler leaves the samples as noisy as the untrained model's."""
    make_shapes(tmp_path / 'data', n_train=2, n_val=1, frames=9, size=32, fps=8, seed=0)
    args = [f'--data={tmp_path}/data/train.jsonl', '--frames=5', '--batch_size=2', '--log_interval=100',
            '--warmup_iters=10']
    for name, extra in (('untrained', ['--max_iters=1', '--learning_rate=0']), ('trained', ['--max_iters=300'])):
        r = run('train_dit.py', *args, f'--out_dir={tmp_path}/{name}', *extra)
        assert r.returncode == 0, r.stderr
    r = run('eval.py', f'--videos={tmp_path}/data/train.jsonl', f'--runs={tmp_path}/untrained,{tmp_path}/trained',
            '--seeds=2', '--steps=20', f'--out={tmp_path}/j.json')
    assert r.returncode == 0, r.stderr
    table = json.load(open(tmp_path / 'j.json'))['table']
    before, after = (table[f'{tmp_path}/{n}'] for n in ('untrained', 'trained'))
    print(f"judge score untrained {before['score']['mean']:.3f}, after 300 iterations {after['score']['mean']:.3f}")
    assert after['score']['mean'] > before['score']['mean'] + 0.05  # measured 0.062 -> 0.204 (bf16 autocast)


# ---------------------------------------------------------------------------------------------- bench.py

def test_bench_prints_ours_diffusers_and_their_ratio():
    r = run('bench.py', '--frames=5', '--height=32', '--width=32', '--warmup=0', '--iters=1', '--trd_dim=64', '--amp=off')
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    out = r.stdout
    assert ', fp32, ' in out.splitlines()[0] and 'fp32 2048x2048 matmul' in out  # amp off: fp32 steps, fp32 peak
    assert re.search(r'^\| +\| +ours \| +reference \| note', out, re.M)
    ours, theirs, ratio = re.search(r'^\| DiT forward\+backward \(reference: diffusers\) +\| +([\d,.]+) ms \| +([\d,.]+) ms \| ([\d.]+)x '
                                    r'\(diffusers / ours\)', out, re.M).groups()
    ours, theirs = (float(v.replace(',', '')) for v in (ours, theirs))
    assert abs(float(ratio) - theirs / ours) < 0.01 + 0.01 * float(ratio)
    assert float(re.search(r'output max rel difference .*\| +([\d.e+-]+) \|', out).group(1)) < 1e-4  # same weights
    for row in ('MFU', 'peak memory', 'attention backend', 'TRD fwd+bwd', 'TRD peak memory', 'sampling step'):
        assert re.search(rf'^\| +{re.escape(row)}', out, re.M), row
    aligned = ('with AlignVid (alpha 1.35, all blocks)', 'with AlignVid, entropy-adaptive',
               'with refocusing (3 iterations, 2 nouns + 1 verb)')
    for row in aligned:  # the sampling step with each sampling-time option, and its extra cost
        assert re.search(rf'^\|   {re.escape(row)} +\| +[\d,.]+ ms \| +- \| [+-]\d+% over the plain step$', out, re.M), row
    rows = [line.split('|')[1].strip() for line in out.splitlines() if line.startswith('|')]
    at = rows.index('sampling step (cfg pair + UniPC update)')
    assert tuple(rows[at + 1:at + 4]) == aligned  # right after the plain step


def test_learning_rate_warms_up_then_decays_to_its_floor():
    from models.optim import lr_at
    lrs = [lr_at(i, 2e-3, 50, 1200, 0.1) for i in range(1300)]
    assert lrs[0] == 2e-3 / 50 and lrs[49] == lrs[50] == 2e-3
    assert all(a > b for a, b in zip(lrs[50:1200], lrs[51:1201]))
    assert lrs[625] == pytest.approx(1.1e-3) and lrs[1200] == lrs[1299] == pytest.approx(2e-4)
    # constant after warmup (fine-tuning official weights)
    assert lr_at(49, 2e-3, 50, 0, 0.1) == lr_at(5000, 2e-3, 50, 0, 0.1) == 2e-3


def test_the_mfu_peak_is_the_exact_device_s(monkeypatch):
    from models.optim import peak_flops
    for name, peak in (('NVIDIA H100 80GB HBM3', 989e12), ('NVIDIA H100 PCIe', 756e12), ('NVIDIA H100 NVL', 835e12),
                       ('NVIDIA H200', 989e12), ('NVIDIA GeForce RTX 4090', 0)):
        monkeypatch.setattr(torch.cuda, 'get_device_name', lambda dev, n=name: n)
        assert peak_flops(torch.device('cuda', 0)) == peak, name
    assert peak_flops(torch.device('cpu')) == 0


def test_dit_flops_match_torch_flop_counter(monkeypatch):
    # dit_flops counts the blocks' matmuls by formula; torch's FlopCounterMode counts every matmul of a real
    # block forward + backward (inputs needing gradients, as inside the DiT). The CPU's fused SDPA kernel has no FLOP
    # formula in the counter, so attention runs as explicit matmuls here (the same arithmetic).
    from torch.utils.flop_counter import FlopCounterMode
    import models.wan as wan
    from models.optim import dit_flops

    def math_attention(q, k, v, scale=None):
        q, k, v = (a.transpose(1, 2) for a in (q, k, v))
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return (torch.softmax(q @ k.transpose(-1, -2) * scale, -1) @ v).transpose(1, 2)
    monkeypatch.setattr(wan, 'attention', math_attention)
    arch = dict(wan_configs['debug'], num_layers=1)
    d, L, T = arch['dim'], 2 * 4 * 6, arch['text_len']
    block = wan.WanAttentionBlock(d, arch['ffn_dim'], arch['num_heads'])
    x, context = torch.randn(1, L, d, requires_grad=True), torch.randn(1, T, d, requires_grad=True)
    e0 = torch.randn(1, 1, 6, d, requires_grad=True)
    freqs = wan.rope_table(d // arch['num_heads'], (2, 4, 6), torch.device('cpu'))
    with FlopCounterMode(display=False) as counter:
        block(x, e0, freqs, context, None, L).square().mean().backward()
    assert counter.get_total_flops() == dit_flops(arch, L)


def test_the_gpu_check_runs_dry_on_the_cpu(tmp_path):
    """bench.py --check=True: on a GPU the project's GPU check; here the same steps at toy sizes, and its table."""
    r = run('bench.py', '--check=True', f'--out={tmp_path}/c', env={'CUDA_VISIBLE_DEVICES': ''})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = (tmp_path / 'c' / 'summary.txt').read_text()
    for row in ('bench (DiT fwd+bwd against diffusers)', 'train (FSDP2, TRD, EMA, checkpoint)', 'resume and export',
                'sample (python)', 'sample (torchrun, 1 process)', 'python and torchrun videos equal'):
        assert re.search(rf'{re.escape(row)}\s+ok', summary), summary
    assert re.search(r'against diffusers [\d.]+x, MFU [\d.]+%', summary), summary
    assert (tmp_path / 'c' / 'export' / 'config.json').exists()


def plan_output(*args):
    r = run('bench.py', '--plan=True', '--model=debug', '--blocks=2', '--frames=9', '--height=64', '--width=64', *args)
    assert r.returncode == 0, r.stderr
    print(r.stdout)
    parts = dict((k, float(v) * (2 ** 30 if u == 'GiB' else 2 ** 20)) for k, v, u in
                 re.findall(r'(?:= |, )([A-Z][A-Za-z ]+) ([\d.]+) (GiB|MiB)', r.stdout.split('\n')[1]))
    return r.stdout, parts


def test_memory_plan_within_25_percent_of_a_real_cpu_run():
    # What can be checked honestly on this machine: the tracker's accounting of one rank's peak (parameters, their
    # FSDP2 all-gather copies, gradients, AdamW states, saved activations, backward temporaries) for a config that
    # runs for real here, at world 1, in a real 1-rank gloo group, with the same steps, measured independently by the
    # CPU allocator's own events (the profiler), from build to the end of the second step. Checkpointing is off so
    # that activations are a large share of the peak, and bf16 autocast is on as on a GPU. Not checkable here: the
    # sharding over W > 1 real GPUs (the fake group only changes the shard sizes, checked below as a 1/W scaling),
    # the CUDA allocator's caching and fragmentation, CUDA context and NCCL buffers (the planner keeps 4 GiB free for
    # them and says so), the analytic encoder terms, and CUDA's attention kernels (bench.py on a GPU prints the planner
    # beside the measured peak for that).
    out, parts = plan_output('--world=1', '--measure=True', '--checkpointing=off', '--amp=on')
    ratio = float(re.search(r'tracker estimate / measured = ([\d.]+)', out).group(1))
    assert 0.75 <= ratio <= 1.25, ratio
    # the EMA and the frozen debug umT5 and V-JEPA, listed one line each and built for real beside the DiT
    assert 'EMA of the DiT (fp32, sharded)' in out and 'debug umT5 (fp32)' in out and 'V-JEPA debug' in out
    ratio = float(re.search(r'planner estimate / measured = ([\d.]+)', out).group(1))
    assert 0.75 <= ratio <= 1.25, ratio
    assert parts['Activation'] > 0.3 * sum(parts.values())  # the check is not just parameter counting
    out, _ = plan_output('--world=1', '--measure=True', '--checkpointing=on', '--amp=on')  # as the trainer on a GPU
    ratio = float(re.search(r'tracker estimate / measured = ([\d.]+)', out).group(1))
    assert 0.75 <= ratio <= 1.25, ratio
    _, parts4 = plan_output('--world=4', '--checkpointing=off', '--amp=on')
    for k in ('Sharded Param', 'OptState'):
        assert abs(parts4[k] * 4 / parts[k] - 1) < 0.05, (k, parts4[k], parts[k])
    assert abs(parts4['Activation'] / parts['Activation'] - 1) < 0.05


if __name__ == '__main__':  # workers of the multi-process tests: python -m torch.distributed.run ... test_sara.py NAME
    {'sp_parity': sp_parity_worker}[sys.argv[1]]()


# ---------------------------------------------------------------------------------------------- prepare.py

PREP_WORDS = ('a an the red green blue yellow purple orange circle square triangle moves left right up down and over '
              'light dark grey checkered floor stone sand').split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def word_tokenizer(folder, words, specials, chat_template=None):
    """A transformers fast tokenizer over a word list, saved into folder (the real folders hold their own)."""
    from tokenizers import Tokenizer, models as tokenizer_models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(['[UNK]', *specials, *sorted(set(words) - set(specials))])}
    tok = Tokenizer(tokenizer_models.WordLevel(vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token='[UNK]', pad_token=specials[0],
                                   additional_special_tokens=list(specials[1:]))
    fast.chat_template = chat_template
    fast.save_pretrained(folder)
    return len(vocab)


def tiny_sam3(folder, score=0.0, size=112):
    """A random Sam3VideoModel at a tiny config in facebook/sam3's layout (config.json, model.safetensors with the
    tracker at tracker_model.*, processor_config.json, tokenizer). score: the detection thresholds (a random detector
    finds nothing at the real 0.5)."""
    from transformers import Sam3VideoConfig, Sam3VideoModel
    g = size // 14
    vit = dict(model_type='sam3_vit_model', hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, image_size=size, patch_size=14, window_size=g // 2, global_attn_indexes=[1],
               pretrain_image_size=size)
    vision = dict(model_type='sam3_vision_model', backbone_config=vit)
    text = dict(model_type='clip_text_model', vocab_size=64, hidden_size=32, intermediate_size=64, projection_dim=32,
                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32, bos_token_id=2, eos_token_id=1)
    one = dict(num_layers=1, num_attention_heads=2, intermediate_size=64)
    detector = dict(model_type='sam3', vision_config=vision, text_config=text, geometry_encoder_config=one,
                    detr_encoder_config=one, detr_decoder_config=dict(one, num_queries=8),
                    mask_decoder_config=dict(num_attention_heads=2))
    tracker = dict(model_type='sam3_tracker_video', image_size=size, vision_config=vision,
                   memory_attention_num_layers=1, memory_attention_feed_forward_hidden_size=64,
                   memory_fuser_num_layers=1, memory_fuser_intermediate_dim=64,
                   mask_decoder_config=dict(mlp_dim=64, iou_head_hidden_dim=32))
    cfg = Sam3VideoConfig(detector_config=detector, tracker_config=tracker, score_threshold_detection=score,
                          new_det_thresh=score, hotstart_delay=0)
    cfg.image_size = size
    torch.manual_seed(0)
    Sam3VideoModel(cfg).save_pretrained(folder)
    path = os.path.join(folder, 'model.safetensors')  # save_pretrained nests the tracker: tracker_model.tracker_model.*
    save_file({k.replace('tracker_model.tracker_model.', 'tracker_model.'): v for k, v in load_file(path).items()},
              path, metadata={'format': 'pt'})
    norm = dict(size=dict(height=size, width=size), image_mean=[0.5] * 3, image_std=[0.5] * 3, rescale_factor=1 / 255,
                resample=2, do_resize=True, do_rescale=True, do_normalize=True, do_convert_rgb=True)
    with open(os.path.join(folder, 'processor_config.json'), 'w') as f:
        json.dump(dict(processor_class='Sam3VideoProcessor', target_size=size,
                       image_processor=dict(norm, image_processor_type='Sam3ImageProcessor',
                                            mask_size=dict(height=4 * g, width=4 * g)),
                       video_processor=dict(norm, video_processor_type='Sam2VideoVideoProcessor')), f, indent=2)
    word_tokenizer(folder, PREP_WORDS, ['<|endoftext|>', '<|startoftext|>'])


def tiny_qwen3_vl_embedding(folder):
    """A random Qwen3-VL at a tiny config, saved as Qwen3-VL checkpoints are (Qwen3VLForConditionalGeneration),
    with a chat template."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration
    n = word_tokenizer(folder, PREP_WORDS + "Represent the user's input . system user assistant".split(),
                       ['<|endoftext|>', '<|im_start|>', '<|im_end|>'], CHATML)
    text = dict(vocab_size=n + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                rope_scaling=dict(rope_type='default', mrope_section=[1, 1, 2], mrope_interleaved=True))
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                  deepstack_visual_indexes=[0], num_position_embeddings=64)
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=n + 1, video_token_id=n + 2,
                        vision_start_token_id=n + 3, vision_end_token_id=n + 4)
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(cfg).save_pretrained(folder)


@pytest.fixture(scope='module')
def prep(tmp_path_factory):
    """Tiny SAM 3 and Qwen3-VL-Embedding folders, three toy clips and their raw input (video, caption, entities)."""
    pytest.importorskip('transformers')
    root = tmp_path_factory.mktemp('prep')
    tiny_sam3(str(root / 'sam3'))
    tiny_qwen3_vl_embedding(str(root / 'emb'))
    make_shapes(str(root / 'toy'), n_train=3, n_val=0, frames=17, size=64)
    recs = [json.loads(line) for line in open(root / 'toy' / 'train.jsonl')]
    raw = [dict(video=r['video'], caption=r['caption'], entities=[e['caption'] for e in r['entities']],
                background=r['background']) for r in recs]
    (root / 'toy' / 'raw.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in raw))
    return root, raw


def prepare(root, *args, out='out/train.jsonl', data='toy/raw.jsonl', n=0):
    args = (f'--data={root / data}', f'--out={root / out}', f'--sam_dir={root / "sam3"}', *args)
    env = {'HF_HUB_OFFLINE': '1', 'CUDA_VISIBLE_DEVICES': ''}  # no kernel download from the hub
    r = run('-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={n}', 'prepare.py', *args, env=env) \
        if n else run('prepare.py', *args, env=env)
    return r, root / out


def test_prepare_writes_masks_and_embeddings_the_trainers_read(prep, tmp_path):
    root, raw = prep
    r, manifest = prepare(root, f'--embed_dir={root / "emb"}', '--sheet_every=2', '--mask_size=48')
    assert r.returncode == 0, r.stderr[-2000:]
    assert '3 clips (3 prepared now, 0 done before)' in r.stdout and 'Traceback' not in r.stderr
    recs = read_manifest(manifest, min_frames=17)  # the trainers' reader: every mask has the video's 17 frames
    assert [rec['caption'] for rec in recs] == [x['caption'] for x in raw]
    assert [[e['caption'] for e in rec['entities']] for rec in recs] == [x['entities'] for x in raw]
    for rec in recs:
        for e in rec['entities']:
            m = np.load(e['mask'])['mask']
            assert m.shape == (17, 48, 48) and m.dtype == np.uint8 and set(np.unique(m)) <= {0, 1}
            assert (m[1::2] == m[0::2][:8]).all()  # frame_stride=2: each odd frame repeats the frame read before it
    sheets = sorted(os.listdir(root / 'out' / 'sheets'))
    assert len(sheets) == 2 and Image.open(root / 'out' / 'sheets' / sheets[0]).size[1] > 192
    prov = json.load(open(root / 'out' / 'train.provenance.json'))
    assert prov['models']['sam_dir'] == str(root / 'sam3') and prov['settings']['frame_stride'] == 2

    # the embedding is Qwen3-VL-Embedding's recipe: system instruction, user caption, the assistant turn opened,
    # the last token's hidden state, L2-normalised
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration
    tok = AutoTokenizer.from_pretrained(root / 'emb')
    model = Qwen3VLForConditionalGeneration.from_pretrained(root / 'emb').eval()
    text = (f"<|im_start|>system\nRepresent the user's input.<|im_end|>\n<|im_start|>user\n{raw[1]['caption']}"
            "<|im_end|>\n<|im_start|>assistant\n")
    ids = torch.tensor([tok(text)['input_ids']])
    with torch.no_grad():
        h = model.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0, -1]
    torch.testing.assert_close(torch.from_numpy(np.load(recs[1]['text_embedding'])), F.normalize(h, dim=0),
                               atol=1e-5, rtol=1e-5)

    # a rerun does no work; Stage 1 trains on the manifest
    stamp = os.path.getmtime(recs[0]['entities'][0]['mask'])
    r, _ = prepare(root, f'--embed_dir={root / "emb"}')
    assert '3 clips (0 prepared now, 3 done before)' in r.stdout, r.stdout + r.stderr[-2000:]
    assert os.path.getmtime(recs[0]['entities'][0]['mask']) == stamp
    r = run('train_aligner.py', f'--data={manifest}', f'--out_dir={tmp_path / "al"}', '--max_iters=3',
            '--batch_size=2', '--frames=8', '--log_interval=1')
    assert r.returncode == 0 and 'iter 3: bce' in r.stdout, r.stderr[-2000:]


def test_prepare_asks_the_llm_for_entities_and_names_what_failed(prep, chat_server):
    root, raw = prep
    url, replies, bodies = chat_server
    lines = [dict(video=x['video'], caption=x['caption']) for x in raw]
    (root / 'toy' / 'llm.jsonl').write_text(''.join(json.dumps(x) + '\n' for x in lines))
    replies.extend([(200, json.dumps({'entities': ['a red circle', ' ', 'a red circle'], 'background': 'a floor'})),
                    (200, 'not json'), (200, 'still not json'),   # clip 2: two tries, both outside the schema
                    (200, json.dumps({'entities': [], 'background': ''}))])  # clip 3: names nothing
    r, manifest = prepare(root, f'--llm_url={url}', '--llm_model=qwen', '--llm_retries=2', '--skip_bad=True',
                          out='llm/train.jsonl', data='toy/llm.jsonl')
    assert r.returncode == 0 and 'Traceback' not in r.stderr, r.stderr[-2000:]
    assert len(bodies) == 4 and bodies[0]['model'] == 'qwen'
    assert bodies[0]['response_format']['json_schema']['schema']['required'] == ['entities', 'background']
    assert raw[0]['caption'] in bodies[0]['messages'][0]['content']
    recs = [json.loads(line) for line in open(manifest)]
    assert len(recs) == 1 and [e['caption'] for e in recs[0]['entities']] == ['a red circle']
    assert recs[0]['background'] == 'a floor'
    assert '2 bad clips' in r.stdout and 'llm.jsonl line 2: the entity request failed' in r.stdout
    assert 'an answer outside the schema' in r.stdout and 'llm.jsonl line 3: the caption names no entity' in r.stdout
    # without --skip_bad the first failure is the run's one sentence; an unreachable endpoint is named
    r, _ = prepare(root, '--llm_url=http://127.0.0.1:9/v1', '--llm_retries=1', out='llm2/train.jsonl',
                   data='toy/llm.jsonl')
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert 'llm.jsonl line 1: the entity request failed: http://127.0.0.1:9/v1' in r.stderr and 'unreachable' in r.stderr


def test_prepare_drops_or_keeps_entities_sam3_finds_nowhere(prep):
    root, raw = prep
    tiny_sam3(str(root / 'blind'), score=1.01)  # no detection passes a threshold above every probability
    args = (f'--sam_dir={root / "blind"}', '--skip_bad=True')
    r, manifest = prepare(root, *args, out='drop/train.jsonl')
    assert r.returncode == 0 and 'SAM 3 found none of its entities' in r.stdout and '3 bad clips' in r.stdout
    assert manifest.read_text() == ''
    r, manifest = prepare(root, *args, '--missing=empty', out='empty/train.jsonl')
    assert r.returncode == 0 and 'entities SAM 3 found nowhere: 5' in r.stdout, r.stdout + r.stderr[-2000:]
    recs = read_manifest(manifest, min_frames=17)
    assert sum(len(rec['entities']) for rec in recs) == 5
    assert all(np.load(e['mask'])['mask'].max() == 0 for rec in recs for e in rec['entities'])


def test_prepare_names_a_bad_video_and_settings(prep):
    root, raw = prep
    (root / 'toy' / 'garbage.mp4').write_bytes(b'not a video at all' * 100)
    lines = [dict(raw[0]), dict(raw[0], video='garbage.mp4'), '{"video": 3']
    (root / 'toy' / 'bad.jsonl').write_text(''.join((x if isinstance(x, str) else json.dumps(x)) + '\n' for x in lines))
    r, _ = prepare(root, out='bad/train.jsonl', data='toy/bad.jsonl')
    assert r.returncode != 0 and 'Traceback' not in r.stderr
    assert 'bad.jsonl line 3: malformed JSON' in r.stderr
    r, manifest = prepare(root, '--skip_bad=True', out='bad/train.jsonl', data='toy/bad.jsonl')
    assert r.returncode == 0 and '2 bad clips' in r.stdout and 'garbage.mp4 could not be decoded' in r.stdout
    assert len(manifest.read_text().splitlines()) == 1
    r, _ = prepare(root, '--frame_stride=0', out='bad/train.jsonl', data='toy/bad.jsonl')
    assert r.returncode != 0 and '--frame_stride=0: the settings need frame_stride >= 1' in r.stderr


@multiprocess
def test_prepare_two_ranks_write_the_manifest_of_one_process(prep):
    root, raw = prep
    one, manifest1 = prepare(root, f'--embed_dir={root / "emb"}', out='one/train.jsonl')
    two, manifest2 = prepare(root, f'--embed_dir={root / "emb"}', out='two/train.jsonl', n=2)
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert '[0] 1/2' in two.stdout and '[1] 1/1' in two.stdout  # the three clips split over the ranks
    assert manifest1.read_text() == manifest2.read_text()
    for a, b in zip(read_manifest(manifest1), read_manifest(manifest2)):
        assert (np.load(a['text_embedding']) == np.load(b['text_embedding'])).all()
        for ea, eb in zip(a['entities'], b['entities']):
            assert (np.load(ea['mask'])['mask'] == np.load(eb['mask'])['mask']).all()


def test_prepare_frames_and_prompts_match_the_official_processor(prep):
    """Our torch-only preparation of SAM 3's inputs equals Sam3VideoProcessor's (needs a torchvision that loads)."""
    try:
        from transformers import Sam3VideoProcessor
        import torchvision.ops  # noqa: F401 (the processor's import; fails beside a CPU torch it was not built for)
        torch.ops.torchvision.nms
    except Exception as err:
        pytest.skip(f'no working torchvision here ({str(err)[:80]})')
    import importlib
    root, raw = prep
    sys.argv = ['prepare.py', f'--sam_dir={root / "sam3"}']
    prep_mod = importlib.import_module('prepare')
    model, tok, norm = prep_mod.load_sam(str(root / 'sam3'), torch.device('cpu'), torch.float32)
    proc = Sam3VideoProcessor.from_pretrained(root / 'sam3')
    frames = np.random.default_rng(0).integers(0, 256, (3, 48, 80, 3), dtype=np.uint8)
    official = proc.init_video_session(video=list(frames), inference_device='cpu')
    ours = prep_mod.sam_frames(frames, norm, torch.float32)
    theirs = torch.stack([official.processed_frames[i] for i in range(3)])
    # the processor resizes in uint8: ours is within one uint8 step (2/255 on the [-1, 1] scale)
    assert ours.shape == theirs.shape and (ours - theirs).abs().max() < 2 / 255, (ours - theirs).abs().max()
    proc.add_text_prompt(official, 'a red circle')
    ids = tok('a red circle', return_tensors='pt', padding='max_length', max_length=32, truncation=True)
    assert torch.equal(official.prompt_input_ids[0], ids.input_ids)


# ---------------------------------------------------------------------------------------------- models/chat.py

@pytest.fixture
def chat_server():
    """A loopback chat-completions server: each POST pops the next scripted reply (status, content or 'sleep'), or
    a callable body -> reply at the head answers every POST; the request bodies are kept."""
    import http.server
    import threading
    replies, bodies = [], []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            bodies.append(json.loads(self.rfile.read(int(self.headers['Content-Length']))))
            reply = replies[0] if callable(replies[0]) else replies.pop(0)  # a callable stays and answers each body
            status, content = reply(bodies[-1]) if callable(reply) else reply
            if status == 'sleep':
                time.sleep(content)
                status, content = 200, '{}'
            data = json.dumps({'choices': [{'message': {'role': 'assistant', 'content': content}}]}).encode()
            self.send_response(status)
            self.send_header('Content-Type', 'application/json')
            self.send_header('Content-Length', str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    server.handle_error = lambda *args: None  # a client that timed out and left: no broken-pipe traceback
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f'http://127.0.0.1:{server.server_port}/v1', replies, bodies
    server.shutdown()


def test_chat_sends_the_schema_and_images_and_parses_the_answer(chat_server):
    from models.chat import ask, image_part
    url, replies, bodies = chat_server
    schema = {'type': 'object', 'properties': {'score': {'type': 'integer'}, 'why': {'type': 'string'}},
              'required': ['score', 'why']}
    replies.append((200, '{"score": 4, "why": "red"}'))
    frame = np.zeros((8, 8, 3), np.uint8)
    messages = [{'role': 'user', 'content': [image_part(frame), {'type': 'text', 'text': 'rate it'}]}]
    assert ask(url, 'judge', messages, schema) == {'score': 4, 'why': 'red'}
    body = bodies[0]
    assert body['model'] == 'judge' and body['response_format']['json_schema']['schema'] == schema
    assert body['messages'][0]['content'][0]['image_url']['url'].startswith('data:image/png;base64,')


def test_chat_retries_then_names_the_failure(chat_server):
    from models.chat import ChatError, ask
    url, replies, bodies = chat_server
    schema = {'type': 'object', 'properties': {'score': {'type': 'integer'}}, 'required': ['score']}
    replies.extend([(500, 'x'), (200, 'not json'), (200, '{"score": 2}')])  # two failures, then an answer
    assert ask(url, 'm', [], schema, retries=3, wait=0) == {'score': 2} and len(bodies) == 3
    replies.extend([(200, '{"other": 1}')] * 2)
    with pytest.raises(ChatError, match=r"model m\): an answer outside the schema .*'score'.*after 2 tries"):
        ask(url, 'm', [], schema, retries=2, wait=0)
    replies.append((503, 'x'))
    with pytest.raises(ChatError, match='HTTP 503'):
        ask(url, 'm', [], schema, retries=1)
    replies.append(('sleep', 1.0))
    with pytest.raises(ChatError, match='no answer within 0.2 s|unreachable'):
        ask(url, 'm', [], schema, retries=1, timeout=0.2)
    with pytest.raises(ChatError, match=r'127.0.0.1:9/v1 \(model m\): unreachable'):
        ask('http://127.0.0.1:9/v1', 'm', [], schema, retries=1)


# ---------------------------------------------------------------------------------------------- VLM judges (models/judge.py)

JUDGE_RUBRIC = {'about': 'a test rubric', 'scale': {'min': 1, 'max': 5},
                'template': '{frames} frames. Prompt: {prompt}. Q: {question} Score {min} to {max}.',
                'dimensions': [{'name': 'presence', 'group': 'TA', 'question': 'PRESENCE?'},
                               {'name': 'binding', 'group': 'TA', 'question': 'BINDING?'},
                               {'name': 'smooth', 'group': 'MQ', 'question': 'SMOOTH?'}]}
# judge a's answers by prompt, dimension and seed (= vote index); judge b answers 2 on the red ball, 4 on the cube
JUDGE_A = {'a red ball': dict(presence=[5, 5, 4], binding=[3, 4, 4], smooth=[2, 3, 4]),
           'a blue cube': dict(presence=[4, 4, 4], binding=[5, 1, 3], smooth=[5, 5, 5])}


def judge_videos(root):
    """sample.py --prompts' naming: <prompt>-<index>.mp4, two small real videos, and the test rubric."""
    os.makedirs(root / 'videos')
    for k, prompt in enumerate(JUDGE_A):
        video = torch.full((3, 5, 32, 64), -0.5 + k) + torch.linspace(0, 0.4, 5)[None, :, None, None]
        write_video(str(root / 'videos' / f'{prompt}-0.mp4'), video, 8)
    (root / 'rubric.json').write_text(json.dumps(JUDGE_RUBRIC))
    return root / 'videos', root / 'rubric.json'


def asked_what(body):
    """(judge, prompt, dimension, seed) of a rubric request."""
    text = body['messages'][0]['content'][-1]['text']
    prompt = re.search(r'Prompt: (.*?)\. Q:', text).group(1)
    dim = next(d['name'] for d in JUDGE_RUBRIC['dimensions'] if d['question'].rstrip('?') in text)
    return body['model'], prompt, dim, body['seed']


def fixed_scores(body):
    model, prompt, dim, k = asked_what(body)
    score = JUDGE_A[prompt][dim][k] if model == 'a' else (2 if prompt == 'a red ball' else 4)
    return 200, json.dumps({'reason': 'as seen', 'score': score})


def judge_run(folder, rubric_path, url, cache, **kw):
    from models import judge
    rub = judge.load_rubric(str(rubric_path))
    asks = [(p, judge.rubric_questions(rub, text, 2, 3, 0.7)) for p, text in judge.prompted_videos(str(folder))]
    how = dict(dict(retries=2, timeout=5.0, workers=4, wait=0.0), **kw)
    answers, failed = judge.ask_videos(asks, judge.judges(url, 'a,b'), str(cache), 2, 64, **how)
    return rub, answers, failed


def test_judge_rubric_table_means_and_votes_by_hand(chat_server, tmp_path):
    from models import judge
    url, replies, bodies = chat_server
    folder, rubric_path = judge_videos(tmp_path)
    replies.append(fixed_scores)
    rub, answers, failed = judge_run(folder, rubric_path, url, tmp_path / 'cache.jsonl')
    assert not failed and len(bodies) == 2 * 3 * 3 * 2  # videos x dimensions x votes x judges
    t = judge.rubric_table(answers, rub, ['a', 'b'])
    cell = lambda row, who, kind: (t[row][who][kind]['mean'], t[row][who][kind]['std'])
    # judge a, per video (mean, vote): red ball presence (14/3, 5) binding (11/3, 4) smooth (3, 3: a three-way tie
    # goes to the median); blue cube presence (4, 4) binding (3, 3: a tie again) smooth (5, 5)
    assert cell('presence', 'a', 'mean') == pytest.approx((13 / 3, 1 / 3))
    assert cell('presence', 'a', 'vote') == pytest.approx((4.5, 0.5))
    assert cell('smooth', 'a', 'vote') == pytest.approx((4.0, 1.0))
    assert cell('TA', 'a', 'mean') == pytest.approx((23 / 6, 1 / 3))  # videos 25/6 and 7/2
    assert cell('TA', 'a', 'vote') == pytest.approx((4.0, 0.5))  # videos 9/2 and 7/2
    assert cell('MQ', 'b', 'mean') == cell('MQ', 'b', 'vote') == pytest.approx((3.0, 1.0))
    # over judges, per video first: TA mean red (25/6 + 2) / 2, blue (7/2 + 4) / 2; vote 13/4 and 15/4
    assert cell('TA', judge.ALL, 'mean') == pytest.approx((41 / 12, 1 / 3))
    assert cell('TA', judge.ALL, 'vote') == pytest.approx((3.5, 0.25))
    assert cell('MQ', judge.ALL, 'mean') == pytest.approx((3.5, 1.0))
    assert list(t) == ['presence', 'binding', 'smooth', 'TA', 'MQ']
    # each request: the frames as PNG images, then the question; the schema; sampled, a seed per vote
    body = bodies[0]
    parts = body['messages'][0]['content']
    assert [p['type'] for p in parts] == ['image_url', 'image_url', 'text']
    assert all(p['image_url']['url'].startswith('data:image/png;base64,') for p in parts[:2])
    assert body['response_format']['json_schema']['schema'] == judge.score_schema(1, 5)
    assert body['temperature'] == 0.7 and sorted({b['seed'] for b in bodies}) == [0, 1, 2]
    assert parts[-1]['text'].startswith('2 frames. Prompt: ')
    ours = judge.load_rubric(os.path.join(ROOT, 'docs', 'rubric.json'))  # the shipped rubric: 13 dimensions
    assert [d['group'] for d in ours['dimensions']].count('TA') == 7 and len(ours['dimensions']) == 13


def test_judge_retries_malformed_timeouts_and_http_errors_then_names_the_video(chat_server, tmp_path):
    from models import judge
    url, replies, bodies = chat_server
    folder, rubric_path = judge_videos(tmp_path)
    tries = collections.Counter()

    def flaky(body):
        what = asked_what(body)
        tries[what] += 1
        model, prompt, dim, k = what
        if prompt == 'a red ball' and model == 'b' and dim == 'smooth' and k == 1:
            return 500, 'x'  # always: the red ball fails
        if prompt == 'a blue cube' and tries[what] == 1:  # every first try on the cube goes wrong, once
            return [(200, 'not json'), (200, '{"reason": "x", "score": 9}'), ('sleep', 1.0)][k]
        return fixed_scores(body)
    replies.append(flaky)
    rub, answers, failed = judge_run(folder, rubric_path, url, tmp_path / 'cache.jsonl', timeout=0.3)
    red, blue = (str(folder / f'{p}-0.mp4') for p in JUDGE_A)
    assert list(failed) == [red] and list(answers) == [blue]  # never scored, named with the reason
    assert re.search(r"1 question\(s\) unanswered, e.g. smooth#1: .*model b\): HTTP 500 .*after 2 tries", failed[red])
    assert tries[('b', 'a red ball', 'smooth', 1)] == 2  # judge_retries tries
    assert all(tries[('a', 'a blue cube', d, k)] == 2 for d in JUDGE_A['a blue cube'] for k in range(3))
    assert answers[blue]['a']['binding#1']['score'] == 1  # the answer after the retry
    t = judge.rubric_table(answers, rub, ['a', 'b'])
    assert t['TA']['a']['mean'] == pytest.approx(dict(mean=3.5, std=0.0))  # the cube alone
    replies[0] = fixed_scores
    n = len(bodies)
    _, answers, failed = judge_run(folder, rubric_path, url, tmp_path / 'cache.jsonl')
    assert not failed and len(bodies) - n == 1  # the failure was not cached: the rerun asks it alone


def test_judge_rerun_after_an_interruption_asks_only_what_is_missing(chat_server, tmp_path):
    from models import judge
    url, replies, bodies = chat_server
    folder, rubric_path = judge_videos(tmp_path)
    cache = tmp_path / 'cache.jsonl'
    replies.append(fixed_scores)
    _, whole, _ = judge_run(folder, rubric_path, url, tmp_path / 'whole.jsonl')
    lines = (tmp_path / 'whole.jsonl').read_text().splitlines()
    cache.write_text('\n'.join(lines[:25]) + '\n' + lines[25][:30])  # killed while writing its 26th answer
    n = len(bodies)
    _, answers, failed = judge_run(folder, rubric_path, url, cache)
    assert len(bodies) - n == 36 - 25 and answers == whole and not failed
    n = len(bodies)
    assert judge_run(folder, rubric_path, url, cache)[1] == whole and len(bodies) == n  # all there: nothing asked
    rub = dict(JUDGE_RUBRIC, dimensions=[dict(d, question='SMOOTH, really?') if d['name'] == 'smooth' else d
                                         for d in JUDGE_RUBRIC['dimensions']])
    rubric_path.write_text(json.dumps(rub))
    judge_run(folder, rubric_path, url, cache)
    assert len(bodies) - n == 2 * 3 * 2  # an edited question is asked anew on each video, vote and judge


def test_judge_eval_script_prints_one_table_and_writes_json(chat_server, tmp_path):
    url, replies, bodies = chat_server
    folder, rubric_path = judge_videos(tmp_path)
    replies.append(fixed_scores)
    args = ['eval.py', f'--videos_dir={folder}', f'--judge_url={url}', '--judge_model=a,b', f'--rubric={rubric_path}',
            '--judge_frames=2', '--judge_size=32']
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert re.search(r'^TA\s+3\.833 \+- 0\.333  4\.000 \+- 0\.500  3\.000 \+- 1\.000  3\.000 \+- 1\.000  '
                     r'3\.417 \+- 0\.333  3\.500 \+- 0\.250', r.stdout, re.M), r.stdout
    out = json.load(open(folder / 'judged.json'))
    assert out['table']['MQ']['mean over judges']['vote'] == pytest.approx(dict(mean=3.5, std=1.0))
    assert not out['failed'] and len(bodies) == 36 and os.path.exists(folder / 'judge_cache.jsonl')
    again = run(*args)  # another process: every answer from the cache
    assert again.returncode == 0 and len(bodies) == 36 and 'new answers' not in again.stdout
    bad = [run(*args[:3], '--judge_model=a,b,c', '--judge_url=http://x/v1,http://y/v1'),
           run(*args[:4], f'--rubric={tmp_path}/none.json'), run('eval.py', *args[2:4]),
           run(*args[:4], f'--videos_dir={tmp_path}/nowhere'), run(*args, '--judge_votes=0')]
    for b, phrase in zip(bad, ['lists 2 urls for 3 judge models', 'none.json not found', 'nothing to judge',
                               'nowhere: folder not found', '--judge_votes=0: the settings need judge_votes >= 1']):
        assert b.returncode != 0 and phrase in b.stderr and 'Traceback' not in b.stderr, b.stderr
    (tmp_path / 'rubric.json').write_text(json.dumps(dict(JUDGE_RUBRIC, dimensions=[{'name': 'x', 'group': 'TA'}])))
    b = run(*args)
    assert b.returncode != 0 and b.stderr.strip().count('\n') == 0 and "dimension 0 has no key 'question'" in b.stderr


def omiti2v_folder(root):
    """A two-sample OmitI2V benchmark: meta.json with the authors' key names, PNG images, and {id}.mp4 videos."""
    os.makedirs(root / 'OmitI2V' / 'images')
    os.makedirs(root / 'videos')
    meta = [{'id': 'sample_0', 'image-path': 'images/0.png', 'prompt': 'a sunflower appears in the vase',
             'main-category': 'addition', 'questions': [
                 {'id': 'q1', 'question': 'Did a sunflower appear?', 'expected_answer': 'yes', 'category': 'x'},
                 {'id': 'q2', 'question': 'Is the sunflower in the vase?', 'expected_answer': 'yes'},
                 {'id': 'q3', 'question': 'Is the vase still empty?', 'expected_answer': 'no'}]},
            {'id': 'sample_1', 'image-path': 'images/1.png', 'prompt': 'the cat leaves the sofa',
             'main-category': 'Deletion', 'questions': [
                 {'id': 'q1', 'question': 'Is the cat still on the sofa?', 'expected_answer': 'no'},
                 {'id': 'q2', 'question': 'Is the sofa still there?', 'expected_answer': 'Yes'}]}]
    (root / 'OmitI2V' / 'meta.json').write_text(json.dumps(meta))
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate([(100, 200), (200, 100)]):  # two aspects
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / 'OmitI2V' / 'images' / f'{k}.png')
        write_video(str(root / 'videos' / f'sample_{k}.mp4'), torch.full((3, 5, 32, 32), -0.4 + 0.8 * k), 8)
    return root / 'OmitI2V', root / 'videos', meta


def test_omiti2v_accuracy_on_a_two_sample_benchmark(chat_server, tmp_path):
    url, replies, bodies = chat_server
    bench, videos_dir, meta = omiti2v_folder(tmp_path)
    expected = {q['question']: q['expected_answer'].lower() for s in meta for q in s['questions']}

    def answers(body):  # judge a says yes to everything; b is right but on "Is the cat still on the sofa?"
        q = re.search(r'Question: (.*?)\n', body['messages'][0]['content'][-1]['text']).group(1)
        right = expected[q] if q != 'Is the cat still on the sofa?' else 'yes'
        return 200, json.dumps({'answer': 'yes' if body['model'] == 'a' else right, 'reason': 'seen'})
    replies.append(answers)
    r = run('eval.py', f'--omiti2v={bench}', f'--videos_dir={videos_dir}', f'--judge_url={url}', '--judge_model=a,b',
            '--judge_frames=3')
    assert r.returncode == 0, r.stderr
    # per sample: a 2/3 and 1/2, b 1 and 1/2; over judges 5/6 and 1/2
    table = json.load(open(videos_dir / 'omiti2v.json'))['table']
    assert table['a'] == pytest.approx(dict(addition=200 / 3, deletion=50.0, all=175 / 3))
    assert table['b'] == pytest.approx(dict(addition=100.0, deletion=50.0, all=75.0))
    assert table['mean over judges'] == pytest.approx(dict(addition=250 / 3, deletion=50.0, all=200 / 3))
    assert re.search(r'^mean over judges\s+83\.33\s+50\.00\s+66\.67$', r.stdout, re.M), r.stdout
    assert re.search(r'Addition\s+Deletion\s+all', r.stdout)
    assert len(bodies) == 5 * 2 and all(b['temperature'] == 0.0 for b in bodies)
    body = bodies[0]
    assert [p['type'] for p in body['messages'][0]['content']] == ['image_url'] * 3 + ['text']
    assert all(s['prompt'] not in b['messages'][0]['content'][-1]['text'] for b in bodies for s in meta)  # no prompt
    assert body['response_format']['json_schema']['schema']['properties']['answer']['enum'] == ['yes', 'no']
    os.remove(videos_dir / 'sample_1.mp4')  # a missing video: named, not scored
    r = run('eval.py', f'--omiti2v={bench}', f'--videos_dir={videos_dir}', f'--judge_url={url}', '--judge_model=a,b',
            '--judge_frames=3')
    assert r.returncode == 0 and len(bodies) == 10 and 'sample_1.mp4: the video was not found' in r.stdout


def test_omiti2v_bad_meta_json_ends_in_one_sentence(tmp_path):
    from models import judge
    bench, videos_dir, meta = omiti2v_folder(tmp_path)
    assert [s['id'] for s in judge.read_omiti2v(str(bench))] == ['sample_0', 'sample_1']
    s = judge.read_omiti2v(str(bench))[1]
    assert s['category'] == 'deletion' and s['questions'][1] == ('Is the sofa still there?', 'yes')
    assert s['image'] == os.path.join(str(bench), 'images/1.png') and s['prompt'] == 'the cat leaves the sofa'
    with pytest.raises(ValueError, match=r"meta.json sample 0 has no key 'image' \(its image: set --omiti2v_fields"):
        judge.read_omiti2v(str(bench), 'id,image,prompt,main-category,questions,question,expected_answer')
    with pytest.raises(ValueError, match="sample 0 question 0 has no key 'answer'"):
        judge.read_omiti2v(str(bench), 'id,image-path,prompt,main-category,questions,question,answer')
    assert judge.read_omiti2v(str(bench), 'id,image,prompt,main-category,questions,question,answer', ('id', 'prompt'))
    r = run('eval.py', f'--omiti2v={bench}', f'--videos_dir={videos_dir}', '--judge_url=http://x/v1',
            '--judge_model=a', '--omiti2v_fields=id,image-path,prompt,type,questions,question,expected_answer')
    assert r.returncode != 0 and "meta.json sample 0 has no key 'type' (its category" in r.stderr
    assert r.stderr.strip().count('\n') == 0
    r = run('eval.py', f'--omiti2v={tmp_path}/nowhere', f'--videos_dir={videos_dir}', '--judge_url=http://x/v1',
            '--judge_model=a')
    assert r.returncode != 0 and 'nowhere: folder not found' in r.stderr and 'Traceback' not in r.stderr


def test_omiti2v_sample_writes_one_video_per_sample(tmp_path):
    import decord
    bench, _, _ = omiti2v_folder(tmp_path)
    vae = WanVAE(z_dim=6, dim=8, dec_dim=12, wan22=True, num_res_blocks=1)
    root = fake_official(tmp_path / 'ckpt', 'ti2v', 6, vae, [''])
    args = ['sample.py', f'--ckpt_dir={root}', '--model=ti2v-5b', '--frames=5', '--steps=2', '--size=96*64',
            f'--omiti2v={bench}', f'--out={tmp_path}/omit']
    r = run(*args)
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / 'omit')) == ['sample_0.mp4', 'sample_1.mp4']
    sizes = [decord.VideoReader(str(tmp_path / 'omit' / f'sample_{k}.mp4'))[0].shape for k in range(2)]
    assert sizes == [(64, 96, 3), (96, 64, 3)]  # each its own image's aspect within the area (official rounding)
    again = run(*args)
    assert again.returncode == 0 and 'wrote' not in again.stdout  # a finished benchmark writes nothing more
    r = run(*args, '--prompts=p.txt')
    assert r.returncode != 0 and 'drop --prompts and --image' in r.stderr
