"`miniai ddpm` and `miniai sample` run as a user would: in a subprocess, a tiny model on the bundled sample."
import inspect, json, os, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from miniai.cli import get_parser
from miniai.ddpm import ddpm_unet, init_ddpm
from miniai.ddpm_run import load_ddpm, save_samples, train_ddpm
from miniai.fid import ddpm_pixels

MINIAI = Path(sys.executable).parent/'miniai'
TINY = ['--epochs', 1, '--steps', 50, '--ddim-steps', 10, '--n', 20, '--channels', '8,16', '--n-train', 128, '--bs', 32,
        '--data', 'sample', '--seed', 3]


def run(*args, timeout=300):
    e = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'MINIAI_DEVICE': 'cpu'}
    return subprocess.run([str(MINIAI), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=e)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp('ddpm')/'run'
    return out, run('ddpm', *TINY, '--out', out)


def test_ddpm_prints_progress_warning_and_scores(trained):
    out, r = trained
    assert r.returncode == 0, r.stderr
    assert 'Traceback' not in r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ['loss', 'epoch', 'train']  # the metrics table
    assert any(l.startswith('warning: only 4 optimizer steps') for l in lines), r.stdout  # 128 images / 32: too short
    assert any(l.startswith('DDIM, 10 steps: step 10/10') for l in lines), r.stdout  # sampling progress
    fid_line = next(l for l in lines if l.startswith('FID '))
    assert 'KID' in fid_line and '20 samples' in fid_line and '1,000 held-out' in fid_line, fid_line
    assert f'miniai sample --model {out}' in lines[-1]


def test_ddpm_writes_grids_samples_and_model(trained):
    out, r = trained
    for f in ('samples.png', 'progression.png'):
        with Image.open(out/f) as im: im.verify()
    with Image.open(out/'samples.png') as im:
        w, h = im.size
        assert im.format == 'PNG' and 1 < w/h < 1.4 and w > 300, im.size  # ceil(sqrt(20)) = 5 wide, 4 rows, a title
    with Image.open(out/'progression.png') as im:
        w, h = im.size
        assert 1.8 < w/h < 3, im.size  # 4 images × the 10 DDIM steps, a title
    with np.load(out/'samples.npz') as d:
        assert d['images'].shape == (20, 28, 28) and d['images'].dtype == np.uint8
        assert d['images'].min() < 50 < 200 < d['images'].max()  # pixels over the whole range, not a constant


def test_ddpm_writes_the_metrics_rows_to_metrics_csv(trained):
    out, r = trained
    table = [l.split() for l in r.stdout.splitlines()[1:] if l.split()[-1:] in (['train'], ['eval'])]
    rows = [l.split(',') for l in (out/'metrics.csv').read_text().splitlines()]
    assert rows[0] == ['loss', 'epoch', 'train'] and len(rows) == 1 + len(table) > 1, (rows, r.stdout)
    assert [[f'{float(l):.3f}', e, t] for l, e, t in rows[1:]] == table  # the printed table, at full precision


def test_config_round_trips(trained):
    out, _ = trained
    cfg = json.loads((out/'config.json').read_text())
    assert (cfg['channels'], cfg['n_steps'], cfg['sched'], cfg['size'], cfg['pad']) == ([8, 16], 50, 'linear', 32, 2)
    assert ((cfg['sampler'], cfg['ddim_steps'], cfg['eta'], cfg['epochs'], cfg['opt_steps'], cfg['seed'])
            == ('ddim', 10, 1., 1, 4, 3))
    assert (set(cfg['scores']) >= {'fid', 'kid', 'real_fid', 'real_kid'}
            and cfg['scores']['fid'] > cfg['scores']['real_fid'])
    model, sched, cfg2 = load_ddpm(out)
    assert cfg2 == cfg and len(sched) == 50 and sum(p.numel() for p in model.parameters()) > 1000
    # the saved EMA weights are what sampled samples.npz: the same call gives the same pixels
    imgs = save_samples(model, sched, 20, 'ddim', 10, eta=1., seed=3)
    with np.load(out/'samples.npz') as d:
        ours = ddpm_pixels(imgs).numpy()
        assert (ours == d['images']).mean() > 0.99  # the same images (a rare pixel may round the other way)


def test_ema_warmup_moved_the_average_towards_the_weights(trained):
    "4 optimizer steps: a plain 0.999 average would still be ~99.6% the initial weights; with warm-up it follows."
    out, _ = trained
    torch.manual_seed(3)  # train_ddpm seeds, then builds the model first
    init = init_ddpm(ddpm_unet((8, 16), 1, 8)).state_dict()
    ema, raw = load_ddpm(out)[0].state_dict(), load_ddpm(out, 'raw')[0].state_dict()
    dist = lambda a, b: sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt()
    assert dist(init, raw) > 0  # training moved the weights
    moved = 1 - dist(ema, raw)/dist(init, raw)
    assert moved > 0.5, moved


def test_sample_draws_a_new_grid(trained, tmp_path):
    out, _ = trained
    r = run('sample', '--model', out, '--n', 6, '--seed', 1, '--out', tmp_path/'new.png')
    assert r.returncode == 0, r.stderr
    assert str(tmp_path/'new.png') in r.stdout.splitlines()[-1]
    with Image.open(tmp_path/'new.png') as im: assert im.size[0] > im.size[1]  # 3 wide, 2 rows
    expect = tmp_path/'expect.png'
    model, sched, _ = load_ddpm(out)
    save_samples(model, sched, 6, 'ddim', 10, eta=1., seed=1, grid=expect, weights='EMA')
    assert np.array_equal(np.asarray(Image.open(tmp_path/'new.png')), np.asarray(Image.open(expect)))
    r = run('sample', '--model', out, '--n', 4, '--weights', 'raw', '--sampler', 'ddpm')
    assert r.returncode == 0 and (out/'samples-0.png').exists(), r.stderr


@pytest.mark.parametrize('args,words', [
    (['sample', '--model', 'no/such/dir'], 'config.json not found'),
    (['sample', '--model', '.', '--out', 'x.jpg'], 'ending in .png'),
    (['ddpm', '--steps', 20, '--ddim-steps', 50], "the schedule's 20 steps"),
    (['sample'], 'required: --model')])
def test_mistakes_are_one_line(args, words, tmp_path):
    r = run(*args)
    assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith('miniai: error:') and words in err, err


def test_cli_defaults_are_train_ddpms():
    "The parser states its defaults (it must not import diffusers to print --help); they must be train_ddpm's."
    a = get_parser().parse_args(['ddpm'])
    d = {k: p.default for k, p in inspect.signature(train_ddpm).parameters.items()}
    assert (a.epochs, a.bs, a.lr, a.steps, a.sched, tuple(a.channels)) == \
           (d['epochs'], d['bs'], d['lr'], d['n_steps'], d['sched'], tuple(d['channels']))
    assert (a.sampler, a.ddim_steps, a.eta, a.n) == ('ddim', 50, 1., 500)  # the sampler of the measured default run
