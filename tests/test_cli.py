"The `miniai` console script, run as a user would: in a subprocess, on the bundled sample."
import json, os, re, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import miniai
from miniai.recipe import RECIPE_NFS

MINIAI = Path(sys.executable).parent/'miniai'
SAMPLE = Path(miniai.__file__).parent/'data'/'fashion_mnist_sample.npz'

def run(*args, timeout=300, cwd=None, **env):
    e = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'MINIAI_DEVICE': 'cpu', **env}
    return subprocess.run([str(MINIAI), *map(str, args)], capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=cwd)

def py(code, timeout=120):
    "Run `code` in a fresh Python, as the console script would run `main`."
    e = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'MINIAI_DEVICE': 'cpu'}
    return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=timeout, env=e)

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
    assert ((cfg['arch'], cfg['norm'], cfg['nfs'], cfg['epochs'], cfg['bs'])
            == ('resnet', 'batch', list(RECIPE_NFS), 1, 128))
    assert not (out/'checkpoints').exists()  # deleted once the run has finished: model.pt has what they had

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

def test_predict_without_tta_matches_fits_validation_accuracy(fitted, tmp_path):
    "The sample's held-out images are fit's validation split: without TTA, predict must report fit's own accuracy."
    out, _ = fitted
    d = np.load(SAMPLE)
    np.savez(tmp_path/'valid.npz', images=d['images'][-1000:], labels=d['labels'][-1000:])
    r = run('predict', '--model', out, '--images', tmp_path/'valid.npz', '--out', tmp_path/'p.csv', '--no-tta')
    assert r.returncode == 0, r.stderr
    cfg = json.loads((out/'config.json').read_text())
    assert r.stdout.strip().splitlines()[-1] == f"accuracy: {cfg['history'][-1]['accuracy']:.4f}", \
        (r.stdout, cfg['history'])

def test_tta_averages_the_softmax_of_image_and_mirror(fitted):
    from miniai.recipe import classify, load_classifier
    out, _ = fitted
    x = np.load(SAMPLE)['images'][:300]
    model, cfg = load_classifier(out)
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16, enabled=cfg['precision'] == 'bf16'):  # as fit's
        xb = ((torch.from_numpy(x).float()/255 - cfg['mean'])/cfg['std'])[:, None]
        plain = model(xb).float().softmax(1)
        mirrored = model(xb.flip(-1)).float().softmax(1)
    assert torch.equal(classify(model, cfg, x, bs=128, tta=True), ((plain + mirrored)/2).argmax(1))
    assert torch.equal(classify(model, cfg, x, bs=128, tta=False), plain.argmax(1))
    assert torch.equal(classify(model, cfg, x, bs=128), classify(model, cfg, x, tta=True))  # the ResNet saw flips

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
    (['fit', '--bogus'], "unrecognized arguments: --bogus (see 'miniai fit --help')"),
    (['predict', '--bogus', '--model', 'm', '--images', 'x.npz'], "(see 'miniai predict --help')"),
    (['--bogus'], "(see 'miniai --help')"),
    (['fit', '--arch', 'resnet', '--norm', 'layer'], '--arch cnn'),
    (['fit', '--threads', '0'], '--threads'),
    (['fit', '--resume', 'no/such/run'], 'no such folder'),
    (['fit', '--lr', '-1'], '--lr'),
    (['fit', '--data', 'web'], "'auto', 'hub', 'sample'"),
    (['fit', '--arch', 'vgg'], "'resnet', 'cnn'"),
    (['predict', '--images', 'x.npz'], '--model'),
    (['predict', '--model', 'no/such/dir', '--images', 'x.npz'], 'not found'),
    (['fit', '--data', 'hub', '--epochs', '1'], 'sample'),
])
def test_bad_input_is_one_line(args, words, tmp_path):
    r = run(*args, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert 'Traceback' not in err
    assert len(err.splitlines()) == 1 and err.startswith('miniai: error:'), err
    assert words in err, err
    assert list(tmp_path.iterdir()) == []  # not even an empty ./miniai-run folder is left behind

def test_predict_with_a_ddpm_folder_points_to_sample(tmp_path):
    "A folder from 'miniai ddpm' given to predict: one line that says what it is and which command uses it."
    ddpm_dir = tmp_path/'ddpm'; ddpm_dir.mkdir()
    (ddpm_dir/'config.json').write_text('{"channels": [16, 32, 32], "n_steps": 1000}')
    (ddpm_dir/'model.pt').write_bytes(b'')
    np.savez(tmp_path/'x.npz', images=np.zeros((2, 28, 28), np.uint8))
    r = run('predict', '--model', str(ddpm_dir), '--images', str(tmp_path/'x.npz'), timeout=60)
    assert r.returncode == 2 and "miniai sample --model" in r.stderr and 'Traceback' not in r.stderr, r.stderr

def test_version():
    r = run('--version', timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == f'miniai {miniai.__version__}', (r.stdout, r.stderr)

@pytest.mark.parametrize('argv', [['--help'], ['fit', '--help'], ['--version'], ['fit', '--bogus'], ['predict']])
def test_help_version_and_argument_errors_dont_import_torch(argv):
    "They answer at once: nothing heavy is imported before the arguments are known to be good."
    r = py(f"""import sys
from miniai.cli import main
try: rc = main({argv!r})
except SystemExit as e: rc = e.code
print('rc', rc)
print('heavy', sorted(m for m in ('torch', 'numpy', 'matplotlib', 'accelerate', 'datasets', 'diffusers', 'torcheval') \
if m in sys.modules))""")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == 'heavy []', r.stdout

def test_unwritable_out_fails_before_training(tmp_path):
    (tmp_path/'file').write_text('')
    for out in ('/proc/x', tmp_path/'file', tmp_path/'file'/'sub'):
        r = run('fit', '--arch', 'cnn', '--epochs', 1, '--data', 'sample', '--out', out, timeout=60)
        err = r.stderr.strip()
        assert r.returncode == 2 and err.startswith('miniai: error: --out') and len(err.splitlines()) == 1, err
        assert r.stdout == ''  # no metrics table: training never started
    r = run('predict', '--model', 'm', '--images', 'x.npz', '--out', '/proc/x/p.csv', timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and 'not found' in r.stderr  # the inputs are checked first...

def test_predict_unwritable_out(fitted, tmp_path):
    out, _ = fitted
    d = np.load(SAMPLE)
    np.savez(tmp_path/'few.npz', images=d['images'][:10])
    r = run('predict', '--model', out, '--images', tmp_path/'few.npz', '--out', '/proc/x/p.csv', timeout=60)
    assert r.returncode == 2 and "--out /proc/x: can't write there" in r.stderr, r.stderr  # ...then the output

@pytest.mark.skipif(torch.cuda.is_available(), reason='this machine has a GPU')
def test_cuda_without_gpu_is_one_line_before_any_work(tmp_path):
    for args in (['--device', 'cuda'], ['--device', 'cuda:1']):
        r = run('fit', '--arch', 'cnn', '--out', tmp_path/'o', *args, timeout=60)
        err = r.stderr.strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and '--device cpu' in err and 'Traceback' not in err, \
            err
        assert r.stdout == '' and not (tmp_path/'o').exists()
    r = run('fit', '--arch', 'cnn', '--out', tmp_path/'o', timeout=60, MINIAI_DEVICE='cuda')
    assert r.returncode == 2 and 'MINIAI_DEVICE=cuda' in r.stderr, r.stderr

def test_bad_npz_is_one_line_but_a_bug_shows_its_traceback(fitted, tmp_path):
    out, _ = fitted
    np.savez(tmp_path/'bad.npz', pixels=np.zeros((2, 28, 28), np.uint8))
    r = py(f"import sys; from miniai.cli import main; "
           f"sys.exit(main(['predict', '--model', {str(out)!r}, '--images', {str(tmp_path/'bad.npz')!r}]))")
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and "no 'images'" in r.stderr, r.stderr
    (tmp_path/'not.npz').write_text('hello')
    r = py(f"import sys; from miniai.cli import main; "
           f"sys.exit(main(['predict', '--model', {str(out)!r}, '--images', {str(tmp_path/'not.npz')!r}]))")
    assert r.returncode == 2 and r.stderr.strip().count('\n') == 0 and 'not a readable .npz' in r.stderr, r.stderr
    for exc in ('RuntimeError', 'TypeError', 'KeyError'):
        # an internal bug: the same command, with a function inside miniai broken
        r = py(f"""import sys
import miniai.cli as cli
def broken(*a, **k): raise {exc}('a bug inside miniai')
cli.read_images = broken
sys.exit(cli.main(['predict', '--model', {str(out)!r}, '--images', {str(SAMPLE)!r}]))""")
        assert (r.returncode == 1 and 'Traceback' in r.stderr and f'{exc}: ' in r.stderr
                and 'a bug inside miniai' in r.stderr), r.stderr

def test_busy_machine_notice_and_threads_flag(tmp_path):
    "--threads is what the run uses; without it and without OMP_NUM_THREADS, a busy machine is told about once."
    env = {k: v for k, v in os.environ.items() if k != 'OMP_NUM_THREADS'}
    r = subprocess.run([str(MINIAI), 'fit', '--arch', 'cnn', '--epochs', '1', '--bs', '1024', '--data', 'sample',
                        '--threads', '1', '--out', str(tmp_path/'t')], capture_output=True, text=True, timeout=300,
                       env={**env, 'HF_DATASETS_OFFLINE': '1', 'MINIAI_DEVICE': 'cpu'})
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path/'t'/'config.json').read_text())['threads'] == 1
    assert 'busy' not in r.stderr  # the user chose

def test_help_explains_every_option():
    r = run('fit', '--help')
    assert r.returncode == 0
    for opt in ('--arch', '--norm', '--epochs', '--bs', '--lr', '--data', '--seed', '--out', '--resume', '--device',
                '--threads', '--accelerate'): assert opt in r.stdout
    r = run('predict', '--help')
    for opt in ('--model', '--images', '--out', '--tta', '--no-tta'): assert opt in r.stdout
