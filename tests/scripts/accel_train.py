"""Train a tiny MLP on the bundled Fashion-MNIST sample with `AccelerateCB`, alone or under `accelerate launch`.

It trains twice: with `even_batches=False` (an uneven last batch is split unevenly, so the processes see exactly the
samples a single process sees) and with accelerate's default `even_batches=True` (the last batch is filled up with
repeats of the first samples, which changes that step's gradient a little; metrics drop the repeats). Each process
saves its final weights (`{tag}_weights_{rank}.pt`) and what its `MetricsCB` recorded (`{tag}_metrics_{rank}.json`)
in the output folder given on the command line, with `tag` 'uneven' or 'even'. `tests/test_accel.py` runs it on two
CPU processes and compares with single-process runs of `train`."""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torcheval.metrics import MulticlassAccuracy

from miniai.accel import AccelerateCB
from miniai.datasets import FMNIST_MEAN, FMNIST_STD, DataLoaders, fashion_mnist_arrays
from miniai.learner import Learner, MetricsCB, ProgressCB

N_TRAIN, N_VALID, BS, EPOCHS = 301, 101, 64, 2  # 301 = 4*64 + 45 and 101 = 64 + 37: odd last batches

def get_dls():
    "Plain torch DataLoaders (accelerate splits only those), in a fixed order so every run sees the same batches."
    arrays = fashion_mnist_arrays('sample')
    def ds(x, y, n): return TensorDataset(((x[:n].float()/255 - FMNIST_MEAN)/FMNIST_STD).view(n, -1), y[:n])
    return DataLoaders(DataLoader(ds(*arrays['train'], N_TRAIN), BS), DataLoader(ds(*arrays['valid'], N_VALID), BS))

def train(out_dir, even_batches):
    "Train, save this process's weights and metrics in `out_dir`, and return them."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    # split_batches: each global batch of BS is shared out between the processes, so any process count sees the
    # same global batches as a single process does; fp32, so the runs agree to float rounding
    config = DataLoaderConfiguration(split_batches=True, even_batches=even_batches)
    cb = AccelerateCB(mixed_precision='no', dataloader_config=config)
    metrics = MetricsCB(MulticlassAccuracy())
    learn = Learner(model, get_dls(), F.cross_entropy, lr=0.1, cbs=[cb, metrics, ProgressCB()])
    learn.fit(EPOCHS)
    acc, out, tag = cb.acc, Path(out_dir), 'even' if even_batches else 'uneven'
    weights = acc.unwrap_model(learn.model).state_dict()
    torch.save(weights, out/f'{tag}_weights_{acc.process_index}.pt')
    res = dict(history=metrics.history, num_processes=acc.num_processes,
               n_valid_seen=int(metrics.metrics['MulticlassAccuracy'].num_total.item()))
    (out/f'{tag}_metrics_{acc.process_index}.json').write_text(json.dumps(res))
    acc.wait_for_everyone()
    return weights, res

if __name__ == '__main__':
    for even in (False, True): train(sys.argv[1], even)
    # Close the process group before exiting: otherwise gloo's threads can abort the interpreter's shutdown
    PartialState().destroy_process_group()
