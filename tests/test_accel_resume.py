"""Checkpoints under `AccelerateCB` on two CPU processes (gloo), in a user's own script (tests/scripts/accel_ckpt.py).

The main process is killed (SIGKILL) in the middle of a checkpoint write: the previous checkpoint must still load, and
resuming from it under the same launch must end bitwise where the uninterrupted run ended, with the same metrics.csv.
A resume with another number of processes is refused, naming both."""
import csv, os, signal, socket, subprocess, sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from miniai.checkpoint import ckpt_files, read_checkpoint

SCRIPT = Path(__file__).parent/'scripts'/'accel_ckpt.py'

def launch(*args):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    env = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore',
           'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines',
           '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(port), str(SCRIPT),
           *map(str, args)]
    try: return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e: pytest.fail(f'the two processes hung (no result in {e.timeout}s)')

def test_kill_in_a_checkpoint_write_then_resume_on_two_processes_is_bitwise(tmp_path):
    r = launch(tmp_path, '--kill-in-write', 4)
    assert r.returncode != 0 and 'Signal 9 (SIGKILL)' in r.stderr, r.stderr[-3000:]
    assert (tmp_path/'whole.pt').exists() and not (tmp_path/'run.pt').exists()
    # 20 batches an epoch, accumulated in pairs, saves asked for every 5: at 6, 10, 16; the 4th (20) never landed
    assert [f.name for f in ckpt_files(tmp_path/'run')] == ['ckpt-e0000-b000010.pt', 'ckpt-e0000-b000016.pt']
    ck = read_checkpoint(ckpt_files(tmp_path/'run')[-1])
    assert ck['procs'] == 2 and len(ck['rng']) == 2 and not torch.equal(ck['rng'][0]['torch'], ck['rng'][1]['torch'])

    r = launch(tmp_path, '--resume')
    assert r.returncode == 0, r.stderr[-3000:]
    whole, run = (torch.load(tmp_path/f'{n}.pt', weights_only=True) for n in ('whole', 'run'))
    for k in whole['model']: assert torch.equal(whole['model'][k], run['model'][k]), k
    assert whole['history'] == run['history']
    assert (tmp_path/'whole.csv').read_text() == (tmp_path/'run.csv').read_text()
    assert len(list(csv.reader((tmp_path/'run.csv').open()))) == 1 + 4  # a header, then 2 epochs × train, eval

def test_another_number_of_processes_is_refused_naming_both(tmp_path):
    "The checkpoint of a 2-process run loaded by one process: one line, before anything changes."
    import torch.nn.functional as F
    from torch import nn
    from miniai.checkpoint import CheckpointCB, ResumeCB
    from miniai.learner import Learner, TrainCB
    data = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))]
    learn = Learner(nn.Linear(2, 2), SimpleNamespace(train=data, valid=data), F.cross_entropy,
                    cbs=[TrainCB(), CheckpointCB(tmp_path)])
    learn.fit(1)
    f = ckpt_files(tmp_path)[-1]
    ck = read_checkpoint(f)
    torch.save({**ck, 'procs': 2, 'rng': [ck['rng']]*2, 'epoch_rng': [None]*2}, f)
    with pytest.raises(ValueError, match=r'was saved by 2 processes, this run has 1; resume it with 2$'):
        learn.fit(2, cbs=ResumeCB())
