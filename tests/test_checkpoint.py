"Exact resume: kill a training process with SIGKILL, resume it in a new process, get bitwise the same weights."
import os, random, signal, subprocess, sys
from pathlib import Path

import pytest
import torch

from miniai.checkpoint import read_checkpoint

SCRIPT = Path(__file__).parent/'scripts'/'ckpt_train.py'
N_BATCHES = 2*57  # 2 epochs of the sample's 7,226 training images at bs 128

def train(tmp, name, *args):
    env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'MINIAI_DEVICE': 'cpu'}
    return subprocess.run([sys.executable, str(SCRIPT), '--ckpt', str(tmp/name), '--out', str(tmp/f'{name}.pt'), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)

@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('full')
    r = train(tmp, 'full')
    assert r.returncode == 0, r.stderr
    full = torch.load(tmp/'full.pt', weights_only=True)
    assert full['scaler']['scale'] > 2.**16, full['scaler']  # it grew, so a resume that lost it would show
    assert full['ema']['n_averaged'] == N_BATCHES
    return full

def assert_same(a, b):
    for part in ('model', 'ema'):  # the weights, and EMACB's average of them (with its step count)
        assert a[part].keys() == b[part].keys()
        for k in a[part]: assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a['history'] == b['history']
    assert a['scaler'] == b['scaler'] and a['skipped'] == b['skipped']  # MixedPrecision's GradScaler state

def test_kill_at_random_batch_then_resume_is_bitwise_equal(uninterrupted, tmp_path):
    kill_at = random.Random().randrange(11, N_BATCHES)  # any batch after the first checkpoint (every 10)
    r = train(tmp_path, 'run', '--kill-at', kill_at)
    assert r.returncode == -signal.SIGKILL, (kill_at, r.returncode, r.stderr)
    assert not (tmp_path/'run.pt').exists()
    r = train(tmp_path, 'run', '--resume')
    assert r.returncode == 0, (kill_at, r.stderr)
    assert_same(uninterrupted, torch.load(tmp_path/'run.pt', weights_only=True))

def test_kill_during_checkpoint_write_keeps_previous_and_resumes_exactly(uninterrupted, tmp_path):
    r = train(tmp_path, 'run', '--kill-in-write', 4)
    assert r.returncode == -signal.SIGKILL, r.stderr
    ckpts = sorted((tmp_path/'run').glob('ckpt-*.pt'))
    assert [c.name for c in ckpts] == ['ckpt-e0000-b000020.pt', 'ckpt-e0000-b000030.pt']  # keep=2; the 4th never landed
    assert list((tmp_path/'run').glob('.*.tmp')), 'the half-written temp file should be left behind, ignored'
    for c in ckpts: read_checkpoint(c)  # intact and loadable
    r = train(tmp_path, 'run', '--resume')
    assert r.returncode == 0, r.stderr
    assert_same(uninterrupted, torch.load(tmp_path/'run.pt', weights_only=True))

def test_cuda_rng_states_are_saved_and_restored(tmp_path, monkeypatch):
    "No GPU here: fake two CUDA devices' RNG states and check they go through a checkpoint file and back."
    from types import SimpleNamespace
    from torch import nn
    from miniai.checkpoint import set_rng_state
    from miniai.learner import Learner
    fake, restored = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', lambda: [t.clone() for t in fake])
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', restored.append)
    learn = Learner(nn.Linear(2, 2), SimpleNamespace(train=[], valid=[]))
    ck = read_checkpoint(learn.save(tmp_path/'ck.pt'))
    set_rng_state(ck['rng'])
    assert len(restored) == 1 and all(torch.equal(a, b) for a, b in zip(restored[0], fake)) and len(restored[0]) == 2
