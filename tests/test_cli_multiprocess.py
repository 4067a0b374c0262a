"""`miniai fit` unchanged under `accelerate launch` with two CPU processes, against one process.

The route is test_accel.py's: `accelerate launch --multi_gpu --num_processes 2` starts the processes with torchrun,
and `--device cpu` makes each use the CPU and the gloo backend.

What makes the two runs equal: the same initial weights (same seed), the same batches (each process gets its half of
every global batch of --bs, in the single process's order, the last short one shared 29 + 29), the same mean loss
(DDP averages two equal halves' gradients), no augmentation (--arch cnn) and no batch statistics (--norm layer: each
image is normalised on its own; with batch norm each process would normalise over its own 256 images, not 512).

What keeps them from being bitwise equal: the gradients are summed in another order. How much that shows depends on
the training: AdamW at the default lr 2e-2 amplifies such rounding, so even one process with 1 thread and with 2
threads ends up ~1e-2 apart after an epoch. At lr 1e-4 over one epoch (15 steps) one process with 1 and 2 threads
agrees to ~4e-6, while the weights move by ~7e-4. That is where 1e-4 is a meaningful tolerance: a process that
trained on the wrong images would be off by about as much as the weights moved."""
import json, os, socket, subprocess, sys
from pathlib import Path

import pytest
import torch

MINIAI = Path(sys.executable).parent/'miniai'
RUN = ['fit', '--arch', 'cnn', '--norm', 'layer', '--epochs', '1', '--bs', '512', '--lr', '1e-4', '--data', 'sample',
       '--seed', '1', '--device', 'cpu', '--precision', 'fp32']  # the comparison is in fp32

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def env():
    return {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'OMP_NUM_THREADS': '1', 'PYTHONWARNINGS': 'ignore'}

def test_two_processes_train_as_one(tmp_path):
    port = free_port()
    launch = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
              '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(port)]
    try: two = subprocess.run([*launch, str(MINIAI), *RUN, '--out', str(tmp_path/'two')], capture_output=True, text=True,
                              timeout=300, env=env())
    except subprocess.TimeoutExpired as e: pytest.fail(f'the two processes hung (no result in {e.timeout}s)')
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    one = subprocess.run([str(MINIAI), *RUN, '--out', str(tmp_path/'one')], capture_output=True, text=True, timeout=300, env=env())
    assert one.returncode == 0, one.stderr

    # only the main process prints: one table, one line per epoch and split; one final message
    lines = two.stdout.splitlines()
    assert sum(l.split()[:1] == ['accuracy'] for l in lines) == 1, two.stdout
    assert sum(l.split()[-1:] in (['train'], ['eval']) for l in lines) == 3, two.stdout  # the header ends in 'train' too
    assert sum(l.startswith('saved model.pt') for l in lines) == 1, two.stdout
    assert two.stderr.count('no checkpoints in a multi-process run') == 1, two.stderr

    cfg2, cfg1 = (json.loads((tmp_path/d/'config.json').read_text()) for d in ('two', 'one'))
    assert (cfg2['processes'], cfg1['processes']) == (2, 1)
    assert not (tmp_path/'two'/'checkpoints').exists()
    # the gathered metrics are the single process's: every validation image counted once, in the same batches
    for h2, h1 in zip(cfg2['history'], cfg1['history'], strict=True):
        assert (h2['epoch'], h2['train']) == (h1['epoch'], h1['train'])
        assert h2['loss'] == pytest.approx(h1['loss'], rel=1e-5), (h2, h1)
        assert h2['accuracy'] == pytest.approx(h1['accuracy'], abs=1.5e-3), (h2, h1)  # a flipped argmax or two at most

    w2, w1 = (torch.load(tmp_path/d/'model.pt', weights_only=True) for d in ('two', 'one'))
    assert w2.keys() == w1.keys()  # saved unwrapped: no DDP 'module.' prefix, so predict can load it
    torch.manual_seed(1)
    from miniai.recipe import build_model
    w0 = build_model('cnn', norm='layer').state_dict()  # fit's initial weights for --seed 1
    moved = max((w1[k] - w0[k]).abs().max().item() for k in w1)
    assert moved > 5e-4, moved  # the tolerance below is well under how far training moved the weights
    for k in w1: torch.testing.assert_close(w2[k], w1[k], rtol=0, atol=1e-4, msg=k)
