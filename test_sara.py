"""Tests: python -m pytest -q test_sara.py (CPU, a few minutes on 2 cores)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from models.checkpoint import DIT_FROM_DIFFUSERS, load_state_dict, rename
from models.settings import configure
from models.vae import PixelCodec
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
