"""Train a tiny model with checkpoints, for tests/test_checkpoint.py.

Run it whole, or kill it (SIGKILL, from inside, at a chosen batch or in the middle of a checkpoint write) and run it
again with --resume: the final weights must be bitwise equal to the uninterrupted run's.
"""
import argparse, os, signal, warnings

import torch
import torch.nn.functional as F
from torch import nn, optim
from torcheval.metrics import MulticlassAccuracy

import miniai.checkpoint as mc
from miniai.datasets import fashion_dls
from miniai.accel import MixedPrecision
from miniai.accel import EMACB, GradAccumCB
from miniai.checkpoint import CheckpointCB, CSVLoggerCB, ResumeCB
from miniai.learner import Callback, Learner, MetricsCB
from miniai.sgd import BatchSchedCB

p = argparse.ArgumentParser()
p.add_argument('--ckpt', required=True)
p.add_argument('--out', required=True)
p.add_argument('--epochs', type=int, default=2)
p.add_argument('--every', type=int, default=10)
p.add_argument('--kill-at', type=int, default=None, help='SIGKILL after this many training batches (over all epochs)')
p.add_argument('--kill-in-write', type=int, default=None, help='SIGKILL in the middle of this checkpoint write (1-based)')
p.add_argument('--resume', action='store_true')
p.add_argument('--accum', type=int, default=1, help='GradAccumCB(accum): checkpoints wait for the end of a group')
args = p.parse_args()

torch.use_deterministic_algorithms(True)
torch.manual_seed(0)
dls = fashion_dls(bs=128, flat=True, source='sample', seed=1)
model = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10))

class Kill(Callback):
    order = CheckpointCB.order + 1  # after that batch's checkpoint, if any, is on disk
    def after_batch(self, learn):
        if learn.training and learn.epoch*len(learn.dls.train) + learn.iter + 1 == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

if args.kill_in_write:
    # Crash while a checkpoint is being written: half the temp file is on disk, the rename never happens.
    real_fsync, calls = os.fsync, [0]
    def fsync(fd):
        if os.path.isfile(f'/proc/self/fd/{fd}') and os.path.basename(os.readlink(f'/proc/self/fd/{fd}')).startswith('.ckpt-'):
            calls[0] += 1
            if calls[0] == args.kill_in_write:
                os.ftruncate(fd, os.fstat(fd).st_size//2)
                os.kill(os.getpid(), signal.SIGKILL)
        return real_fsync(fd)
    mc.os.fsync = fsync

one_cycle = BatchSchedCB(lambda opt: optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=args.epochs*len(dls.train)))
# MixedPrecision falls back to fp32 on this CPU but keeps a GradScaler (forced), growing its scale every 5 steps, so
# the scaler's state changes during the run and must come back on resume; EMACB's average must too.
warnings.filterwarnings('ignore', message='MixedPrecision: training in fp32')
class ScaledMP(MixedPrecision):
    "Keeps a GradScaler although this CPU run is fp32, so its state is in the checkpoints too."
    def make_scaler(self): return torch.amp.GradScaler(self.device_type, **self.scaler_kwargs)

mp, ema = ScaledMP(growth_interval=5), EMACB(0.9)
cbs = [mp, ema, one_cycle, MetricsCB(accuracy=MulticlassAccuracy()), CheckpointCB(args.ckpt, every_n_batches=args.every, keep=2),
       CSVLoggerCB(args.ckpt + '.csv'), Kill()] + [GradAccumCB(args.accum)]*(args.accum > 1)
learn = Learner(model, dls, F.cross_entropy, lr=0.05, cbs=cbs, opt_func=lambda ps, lr: optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=1e-4))
learn.fit(args.epochs, cbs=ResumeCB('latest') if args.resume else None)
torch.save({'model': learn.model.state_dict(), 'history': learn.metrics.history, 'ema': ema.ema_model.state_dict(),
            'scaler': mp.scaler.state_dict(), 'skipped': mp.skipped_steps}, args.out)
