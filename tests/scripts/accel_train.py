"""Train a tiny MLP on the bundled Fashion-MNIST sample with `AccelerateCB`, alone or under `accelerate launch`.

Each process saves its final weights (`weights_{rank}.pt`) and what its `MetricsCB` recorded (`metrics_{rank}.json`)
in the output folder given on the command line. The sizes leave an uneven last batch in training and validation.
`tests/test_accel.py` runs it on two CPU processes and compares with a single-process run of `train`."""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import DataLoaderConfiguration
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torcheval.metrics import MulticlassAccuracy

from miniai.accel import AccelerateCB
from miniai.datasets import FMNIST_MEAN, FMNIST_STD, DataLoaders, fashion_mnist_arrays
from miniai.learner import Learner, MetricsCB

N_TRAIN, N_VALID, BS, EPOCHS = 301, 101, 64, 2  # 301 = 4*64 + 45 and 101 = 64 + 37: odd last batches

def get_dls():
    "Plain torch DataLoaders (accelerate splits only those), in a fixed order so every run sees the same batches."
    arrays = fashion_mnist_arrays('sample')
    def ds(x, y, n): return TensorDataset(((x[:n].float()/255 - FMNIST_MEAN)/FMNIST_STD).view(n, -1), y[:n])
    return DataLoaders(DataLoader(ds(*arrays['train'], N_TRAIN), BS), DataLoader(ds(*arrays['valid'], N_VALID), BS))

def train(out_dir):
    "Train, save this process's weights and metrics in `out_dir`, and return the `MetricsCB` history."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10))
    # split_batches: each global batch of BS is shared out between the processes, so any process count sees the
    # same global batches as a single process does
    cb = AccelerateCB(dataloader_config=DataLoaderConfiguration(split_batches=True))
    metrics = MetricsCB(MulticlassAccuracy())
    learn = Learner(model, get_dls(), F.cross_entropy, lr=0.3, cbs=[cb, metrics])
    learn.fit(EPOCHS)
    acc, out = cb.acc, Path(out_dir)
    torch.save(acc.unwrap_model(learn.model).state_dict(), out/f'weights_{acc.process_index}.pt')
    res = dict(history=metrics.history, num_processes=acc.num_processes,
               n_valid_seen=int(metrics.metrics['MulticlassAccuracy'].num_total.item()))
    (out/f'metrics_{acc.process_index}.json').write_text(json.dumps(res))
    acc.wait_for_everyone()
    return res

if __name__ == '__main__': train(sys.argv[1])
