"""Train with `AccelerateCB`, `CheckpointCB` and `CSVLoggerCB`, alone or under `accelerate launch`, for
tests/test_accel_resume.py.

`python accel_ckpt.py OUT`: train uninterrupted into OUT/whole, then again into OUT/run, where the main process
kills itself (SIGKILL) in the middle of its `--kill-in-write`-th checkpoint write. `--resume` carries OUT/run on
from its newest checkpoint. Each run saves the main process's final weights and metrics history as OUT/NAME.pt.

What makes the resume hard: each process has its own random state (seeded by its rank) and draws its own dropout
masks; gradients are accumulated over 2 batches while checkpoints are asked for every 5 (so a save waits for the end
of the group), and AdamW's moments and the metrics' partial sums must come back."""
import argparse, os, signal
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn, optim

import miniai.checkpoint as mc
from miniai.accel import AccelerateCB
from miniai.checkpoint import CheckpointCB, CSVLoggerCB, ResumeCB
from miniai.datasets import DataLoaders, TensorDL, fashion_mnist_arrays
from miniai.learner import Learner, MetricsCB

p = argparse.ArgumentParser()
p.add_argument('out', type=Path)
p.add_argument('--kill-in-write', type=int, default=4)
p.add_argument('--resume', action='store_true')
args = p.parse_args()

def dls():
    a = fashion_mnist_arrays('sample')
    tdl = lambda x, y, **kw: TensorDL(x[:1000], y[:1000], bs=50, mean=0.29, std=0.35, **kw)
    return DataLoaders(tdl(*a['train'], shuffle=True, seed=1), tdl(*a['valid']))

def train(name, resume=False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Dropout(0.3),
                          nn.Conv2d(8, 16, 3, 2, 1), nn.GroupNorm(4, 16), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 10))
    acc = AccelerateCB(mixed_precision='no', gradient_accumulation_steps=2)
    torch.manual_seed(acc.acc.process_index)  # each process its own dropout masks
    cbs = [acc, MetricsCB('accuracy'), CSVLoggerCB(args.out/f'{name}.csv'),
           CheckpointCB(args.out/name, every_n_batches=5, keep=2)]
    learn = Learner(model, dls(), F.cross_entropy, lr=3e-3, cbs=cbs, opt_func=optim.AdamW)
    learn.fit(2, cbs=ResumeCB('latest') if resume else None)
    if acc.acc.is_main_process:
        torch.save(dict(model=acc.acc.unwrap_model(learn.model).state_dict(), history=learn.metrics.history),
                   args.out/f'{name}.pt')

def kill_in_write(n):  # the main process dies half-way through its n-th checkpoint write
    real_fsync, calls = os.fsync, [0]
    def fsync(fd):
        if os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith('.ckpt-'):  # a checkpoint's temp file
            calls[0] += 1
            if calls[0] == n:
                os.ftruncate(fd, os.fstat(fd).st_size//2)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_fsync(fd)
    mc.os.fsync = fsync

if args.resume: train('run', resume=True)
else:
    train('whole')
    if PartialState().is_main_process: kill_in_write(args.kill_in_write)
    train('run')
PartialState().destroy_process_group()  # before exiting: otherwise gloo's threads can abort the shutdown
