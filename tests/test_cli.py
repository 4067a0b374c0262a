"The `miniai` console script, run as a user would: in a subprocess, on the bundled sample."
import json, os, re, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import miniai
from miniai.augment import RECIPE_NFS

MINIAI = Path(sys.executable).parent/'miniai'
SAMPLE = Path(miniai.__file__).parent/'data'/'fashion_mnist_sample.npz'

def run(*args, timeout=300, **env):
    e = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'MINIAI_DEVICE': 'cpu', **env}
    return subprocess.run([str(MINIAI), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=e)

@pytest.fixture(scope='module')
def fitted(tmp_path_factory):
    out = tmp_path_factory.mktemp('run')
    r = run('fit', '--epochs', 1, '--data', 'sample', '--out', out)
    return out, r

def test_fit_writes_model_config_and_curve(fitted):
    out, r = fitted
    assert r.returncode == 0, r.stderr
    header = r.stdout.splitlines()[0].split()
    assert header[:4] == ['accuracy', 'loss', 'epoch', 'train'], r.stdout
    assert 'Traceback' not in r.stderr
    sd = torch.load(out/'model.pt', weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values()) and len(sd) > 4
    with Image.open(out/'loss.png') as im:
        im.verify()
    with Image.open(out/'loss.png') as im:
        assert im.format == 'PNG' and im.size[0] > 100 and im.size[1] > 100
    cfg = json.loads((out/'config.json').read_text())
    assert [h['train'] for h in cfg['history']] == [True, False]
    assert cfg['history'][-1]['accuracy'] > 0.6
    # the default is the recipe's ResNet, and predict must be able to rebuild it from what config.json says
    assert (cfg['arch'], cfg['nfs'], cfg['epochs'], cfg['bs']) == ('resnet', list(RECIPE_NFS), 1, 128)

def test_predict_with_labels_prints_accuracy_last(fitted, tmp_path):
    out, _ = fitted
    d = np.load(SAMPLE)
    np.savez(tmp_path/'held.npz', images=d['images'][-300:], labels=d['labels'][-300:])
    r = run('predict', '--model', out, '--images', tmp_path/'held.npz', '--out', tmp_path/'p.csv')
    assert r.returncode == 0, r.stderr
    last = r.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r'accuracy: 0\.\d{4}', last), last
    rows = (tmp_path/'p.csv').read_text().splitlines()
    assert rows[0] == 'index,class,name' and len(rows) == 301
    preds = np.array([int(r.split(',')[1]) for r in rows[1:]])
    assert abs((preds == d['labels'][-300:]).mean() - float(last.split()[1])) < 1e-4

def test_predict_without_labels(fitted, tmp_path):
    out, _ = fitted
    d = np.load(SAMPLE)
    np.savez(tmp_path/'nolab.npz', images=d['images'][:10])
    r = run('predict', '--model', out, '--images', tmp_path/'nolab.npz')
    assert r.returncode == 0, r.stderr
    assert 'accuracy' not in r.stdout
    assert len((out/'predictions.csv').read_text().splitlines()) == 11

@pytest.mark.parametrize('args, words', [
    (['fit', '--epoch', '1'], 'unrecognized arguments'),
    (['fit', '--bogus'], 'unrecognized arguments'),
    (['fit', '--lr', '-1'], '--lr'),
    (['fit', '--data', 'web'], '--data'),
    (['fit', '--arch', 'vgg'], '--arch'),
    (['predict', '--images', 'x.npz'], '--model'),
    (['predict', '--model', 'no/such/dir', '--images', 'x.npz'], 'not found'),
    (['fit', '--data', 'hub', '--epochs', '1'], 'sample'),
])
def test_bad_input_is_one_line(args, words):
    r = run(*args, timeout=60)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert 'Traceback' not in err
    assert len(err.splitlines()) == 1 and err.startswith('miniai: error:'), err
    assert words in err, err

def test_help_explains_every_option():
    r = run('fit', '--help')
    assert r.returncode == 0
    for opt in ('--arch', '--epochs', '--bs', '--lr', '--data', '--out'): assert opt in r.stdout
    r = run('predict', '--help')
    for opt in ('--model', '--images', '--out'): assert opt in r.stdout

def test_ddpm_tiny_writes_sample_grid_and_progression(tmp_path):
    r = run('ddpm', '--epochs', 1, '--steps', 50, '--sampler', 'ddim', '--ddim-steps', 10, '--n', 9, '--channels', '16,32',
            '--n-train', 128, '--bs', 64, '--out', tmp_path/'dd')
    assert r.returncode == 0, r.stderr
    for f in ('samples.png', 'progression.png'):
        with Image.open(tmp_path/'dd'/f) as im:
            im.verify()
    with Image.open(tmp_path/'dd'/'samples.png') as im:
        assert im.format == 'PNG' and im.size == (3*32 + 4*2, 3*32 + 4*2)  # a 3×3 grid of 32×32 with 2-pixel gaps
    with Image.open(tmp_path/'dd'/'progression.png') as im:
        assert im.size[0] > im.size[1] > 32  # frames left to right, one row per image
    assert isinstance(torch.load(tmp_path/'dd'/'model.pt', weights_only=True), dict)

def test_ddpm_bad_channels_is_one_line(tmp_path):
    r = run('ddpm', '--channels', '12,20', '--out', tmp_path/'x', timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith('miniai: error:') and 'multiple of' in r.stderr, r.stderr
