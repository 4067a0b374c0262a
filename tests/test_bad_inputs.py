"""The bad-input catalogue: every mistake here gets an early, clear error that names the problem and the fix.

| # | mistake | raised | the message says |
|---|---|---|---|
| 1 | `TrainCB(n_inp=2)` on `(x, y)` batches | ValueError | no targets left; check `n_inp` |
| 2 | `TrainCB(n_inp=0)` | ValueError | n_inp must be an int >= 1 |
| 3 | regression preds `(bs,1)` vs targets `(bs,)` with MSE | ValueError | both shapes; how to reshape |
| 4 | classifier output too small for the targets | ValueError | prediction/target shapes; \
check the model's output size |
| 5 | an empty training DataLoader | ValueError | empty; lower batch_size or give data |
| 6 | a dict batch given to `TrainCB` | TypeError | the keys; use `from_dd(as_tuple=True)` |
| 7 | `dls` without `.valid` | TypeError | pass `DataLoaders(train, valid)` or `valid=False` |
| 8 | no callback doing the training step | ValueError | add `TrainCB()` |
| 9 | a callback class instead of an instance | TypeError | pass `TrainCB()` |
| 10 | `lr <= 0` (Learner or fit) | ValueError | positive; try `lr_find` |
| 11 | `lr` is NaN | ValueError | positive number |
| 12 | negative `n_epochs` | ValueError | whole number >= 0 |
| 13 | `DeviceCB(device='cuda')` without a GPU | ValueError | no usable CUDA GPU; `DeviceCB()` or 'cpu' |
| 14 | an unknown metric name | ValueError | the known names |
| 15 | something that isn't a metric in `MetricsCB` | TypeError | pass a torcheval metric |
| 16 | a NaN loss | FloatingPointError | epoch and batch; lower lr / TerminateOnNaNCB |
| 17 | a missing checkpoint | FileNotFoundError | not found |
| 18 | a corrupt checkpoint | ValueError | damaged; resume from an earlier one |
| 19 | `ResumeCB('latest')` without a `CheckpointCB` | ValueError | add a CheckpointCB or pass the file |
| 20 | `CheckpointCB(every_n_batches=0)` | ValueError | a positive int or None |
| 21 | an unknown data source | ValueError | the valid sources |
| 22 | `source='hub'` while offline | ConnectionError | offline; use source='sample' / MINIAI_DATA=sample |
| 23 | float images to `TensorDL` | TypeError | wants uint8 pixels |
| 24 | a `conv` with an even kernel size | ValueError | use an odd ks |
| 25 | an unknown CLI option | exit 2, one line | unrecognized arguments; see --help |
| 26 | `miniai fit --data hub` while offline | exit 2, one line | use the sample |
| 27 | `miniai predict` on an npz without `images` | exit 2, one line | save images under 'images' |
| 28 | `miniai predict` on images of the wrong size | exit 2, one line | expected N×28×28 |
| 29 | `miniai predict` with damaged weights | exit 2, one line | could not load; re-run fit |
| 30 | GroupNorm `groups` that don't divide the UNet's channels | ValueError | groups, the channels; pick a divisor |
| 31 | a UNet with more levels than the image size can halve | ValueError | multiples of 2^(levels-1); fewer levels |
| 32 | images the UNet can't halve (31×31) | ValueError | multiples of k; pad 28×28 to 32×32 |
| 33 | images without a channel dim to the UNet | ValueError | (N, C, H, W); `x[:, None]` |
| 34 | 3-channel images to a 1-channel UNet | ValueError | build it with in_channels=3 |
| 35 | `MixedPrecision(dtype='fp16')` on the CPU | ValueError | a GPU feature; dtype='auto' |
| 36 | `AccelerateCB(mixed_precision='fp16')` on the CPU | ValueError | silently fp32; 'no' or a GPU |
| 37 | integer images to `noisify` | TypeError | wants a floating-point batch |
| 38 | more DDIM steps than the schedule has | ValueError | 1 <= steps <= T |
| 39 | `miniai ddpm --channels 12,24` | exit 2, one line | GroupNorm groups=8 doesn't divide them |
| 40 | `miniai ddpm` with 7 levels for 32×32 images | exit 2, one line | multiples of 64; fewer levels |

Activations, init, resnet, augment and the recipe:

| mistake | raised | the message says |
|---|---|---|
| a hook function that isn't callable | TypeError | f(hook, mod, inp, outp) |
| `ResBlock(8, True)` (a bool as a width) | ValueError | whole number >= 1, a bool |
| `lsuv_init(..., max_iters=0)` | ValueError | max_iters, >= 1 |
| `RandCrop(pad=True)` | ValueError | pad, a bool |
| `mc_dropout_predict(..., n=1)` | ValueError | number of passes, >= 2 |
| `recipe_learner(dls, 0)` | ValueError | epochs, >= 1 |
| `cnn_classifier` with 3 widths | ValueError | 4 or more widths |
"""
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miniai.accel import AccelerateCB, MixedPrecision
from miniai.activations import HooksCallback
from miniai.augment import RandCrop, mc_dropout_predict
from miniai.conv import conv
from miniai.ddpm import ddim_sample, ddpm_unet, linear_sched, noisify
from miniai.datasets import TensorDL, load_fashion_mnist
from miniai.checkpoint import CheckpointCB, ResumeCB, read_checkpoint
from miniai.init import lsuv_init
from miniai.learner import DeviceCB, Learner, MetricsCB, TrainCB
from miniai.recipe import cnn_classifier, recipe_learner
from miniai.resnet import ResBlock

def dls(n=2, bs=4, classes=2):
    mk = lambda: [(torch.randn(bs, 3), torch.randint(0, classes, (bs,))) for _ in range(n)]
    return SimpleNamespace(train=mk(), valid=mk())

def fit(model=None, d=None, loss=F.cross_entropy, cbs=(TrainCB(),), **kw):
    return Learner(model or nn.Linear(3, 2), d or dls(), loss, cbs=list(cbs)).fit(1, **kw)

class NaNModel(nn.Linear):
    def forward(self, x): return super().forward(x)*float('nan')

def bad_ckpt(tmp):
    p = tmp/'ck.pt'; p.write_bytes(b'\x00garbage'); return p

CASES = {
    'n_inp too large': (lambda t: fit(cbs=[TrainCB(n_inp=2)]), ValueError, ['n_inp', 'no targets']),
    'n_inp zero': (lambda t: TrainCB(n_inp=0), ValueError, ['n_inp must be a whole number >= 1']),
    'mse shape mismatch': (lambda t: fit(nn.Linear(3, 1),
                                         SimpleNamespace(train=[(torch.randn(4, 3), torch.randn(4))], valid=[]),
                                         F.mse_loss, valid=False), ValueError, ['(4, 1)', '(4,)', 'Reshape']),
    'output too small for targets': (lambda t: fit(nn.Linear(3, 1)), ValueError,
                                     ['shape (4, 1)', "model's output size"]),
    'empty dataloader': (lambda t: fit(d=SimpleNamespace(train=[], valid=[])), ValueError, ['empty', 'batch_size']),
    'dict batch': (lambda t: fit(d=SimpleNamespace(train=[{'x': torch.randn(4, 3), 'y': torch.zeros(4)}], valid=[]),
                                 valid=False),
                   TypeError, ["keys ['x', 'y']", 'as_tuple=True']),
    'dls without valid': (lambda t: fit(d=SimpleNamespace(train=dls().train)), TypeError, ['.valid', 'valid=False']),
    'no training step': (lambda t: fit(cbs=[]), ValueError, ['TrainCB()']),
    'callback class': (lambda t: fit(cbs=[TrainCB]), TypeError, ['TrainCB()']),
    'lr zero': (lambda t: Learner(nn.Linear(3, 2), dls(), lr=0), ValueError, ['positive', 'lr_find']),
    'fit lr negative': (lambda t: fit(lr=-1e-3), ValueError, ['positive']),
    'lr nan': (lambda t: fit(lr=math.nan), ValueError, ['positive number']),
    'negative epochs': (lambda t: Learner(nn.Linear(3, 2), dls(), cbs=[TrainCB()]).fit(-1), ValueError, ['>= 0']),
    'cuda without gpu': (lambda t: fit(cbs=[TrainCB(), DeviceCB('cuda')]), ValueError,
                         ['no usable CUDA GPU', "device='cpu'"]),
    'unknown metric name': (lambda t: MetricsCB('acc'), ValueError, ["unknown metric name 'acc'", 'accuracy']),
    'not a metric': (lambda t: MetricsCB(acc=lambda p, y: 0), TypeError, ['torcheval metric']),
    'nan loss': (lambda t: fit(NaNModel(3, 2)), FloatingPointError, ['epoch 0, batch 0', 'lr', 'TerminateOnNaNCB']),
    'missing checkpoint': (lambda t: read_checkpoint(t/'nope.pt'), FileNotFoundError, ['not found']),
    'corrupt checkpoint': (lambda t: read_checkpoint(bad_ckpt(t)), ValueError, ['damaged', 'earlier one']),
    'resume latest without CheckpointCB': (lambda t: fit(cbs=[TrainCB(), ResumeCB('latest')]), ValueError,
                                           ['CheckpointCB']),
    'checkpoint every 0': (lambda t: CheckpointCB(t, every_n_batches=0), ValueError, ['whole number >= 1', 'or None']),
    'unknown data source': (lambda t: load_fashion_mnist('web'), ValueError, ['web', 'sample']),
    'hub while offline': (lambda t: load_fashion_mnist('hub'), ConnectionError, ['offline', "source='sample'"]),
    'float images to TensorDL': (lambda t: TensorDL(torch.rand(10, 28, 28), torch.zeros(10)), TypeError, ['uint8']),
    'even conv kernel': (lambda t: conv(1, 4, ks=4), ValueError, ['odd']),
    'groupnorm groups': (lambda t: ddpm_unet(channels=(16, 24), groups=16), ValueError,
                         ['groups=16', "doesn't divide [24]"]),
    'unet too deep for size': (lambda t: ddpm_unet(channels=(8,)*7), ValueError, ['multiples of 64', 'fewer levels']),
    'unet odd image size': (lambda t: unet()(torch.randn(2, 1, 31, 31), torch.tensor([1, 2])), ValueError,
                            ['got 31×31', 'multiples of 2', 'F.pad']),
    'unet no channel dim': (lambda t: unet()(torch.randn(2, 32, 32), torch.tensor([1, 2])), ValueError, ['x[:, None]']),
    'unet wrong channels': (lambda t: unet()(torch.randn(2, 3, 32, 32), torch.tensor([1, 2])), ValueError,
                            ['in_channels=3']),
    'fp16 on cpu': (lambda t: fit(cbs=[MixedPrecision(dtype='fp16')]), ValueError, ['GPU feature', "dtype='auto'"]),
    'accelerate fp16 on cpu': (lambda t: AccelerateCB(mixed_precision='fp16'), ValueError,
                               ['silently trains in fp32', "'no'"]),
    'integer images to noisify': (lambda t: noisify(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), linear_sched(10).abar),
                                  TypeError, ['floating-point']),
    'too many ddim steps': (lambda t: ddim_sample(unet(), (1, 1, 8, 8), linear_sched(10), steps=20), ValueError,
                            ['1 <= steps <= ', '10 steps']),
}
CASES.update({
    'hook function not callable': (lambda t: HooksCallback('append_stats'), TypeError, ['f(hook, mod, inp, outp)']),
    'bool as a ResBlock width': (lambda t: ResBlock(8, True), ValueError, ['whole number >= 1', 'a bool']),
    'lsuv max_iters zero': (lambda t: lsuv_init(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), torch.randn(4, 2),
                                                max_iters=0), ValueError, ['max_iters', '>= 1']),
    'bool crop padding': (lambda t: RandCrop(pad=True), ValueError, ['pad', 'a bool']),
    'one mc dropout pass': (lambda t: mc_dropout_predict(nn.Sequential(nn.Linear(3, 2), nn.Dropout()), dls().valid,
                                                         n=1),
                            ValueError, ['number of passes', '>= 2']),
    'recipe for zero epochs': (lambda t: recipe_learner(dls(), 0), ValueError, ['epochs', '>= 1']),
    'cnn with too few widths': (lambda t: cnn_classifier((16, 32, 64)), ValueError, ['4 or more']),
})
RAISED_BEFORE_TORCH_WARNS = {'mse shape mismatch'}  # our error comes first, not torch's broadcasting warning
GPU_ONLY = {'cuda without gpu', 'fp16 on cpu', 'accelerate fp16 on cpu'}  # on a GPU machine these calls are fine

def unet(): return ddpm_unet(channels=(8, 16), layers=1, groups=4)

@pytest.mark.parametrize('name', list(CASES))
def test_bad_input(name, tmp_path, monkeypatch, fresh_accelerate):  # no case leaves accelerate's state behind
    monkeypatch.setenv('HF_DATASETS_OFFLINE', '1')
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    if name in GPU_ONLY and torch.cuda.is_available(): pytest.skip('this machine has a GPU')
    f, exc, words = CASES[name]
    with warnings.catch_warnings():
        if name in RAISED_BEFORE_TORCH_WARNS: warnings.simplefilter('error', UserWarning)
        with pytest.raises(exc) as e: f(tmp_path)
    for w in words: assert w in str(e.value), (w, str(e.value))

def cli(*args):
    env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1'}
    return subprocess.run([sys.executable, '-c', 'import sys; from miniai.cli import main; sys.exit(main())',
                           *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=env)

def test_cli_bad_inputs(tmp_path):
    np.savez(tmp_path/'noimg.npz', pixels=np.zeros((2, 28, 28), np.uint8))
    np.savez(tmp_path/'big.npz', images=np.zeros((2, 32, 32), np.uint8))
    np.savez(tmp_path/'ok.npz', images=np.zeros((2, 28, 28), np.uint8))
    (tmp_path/'m').mkdir(); (tmp_path/'m'/'config.json').write_text('{"arch": "cnn"}')
    torch.save({}, tmp_path/'m'/'model.pt')
    cases = [(['fit', '--colour', 'red'], 'unrecognized arguments'),
             (['fit', '--data', 'hub', '--epochs', '1'], 'sample'),
             (['predict', '--model', tmp_path/'m', '--images', tmp_path/'noimg.npz'], "'images'"),
             (['predict', '--model', tmp_path/'m', '--images', tmp_path/'big.npz'], 'expected N×28×28'),
             (['predict', '--model', tmp_path/'m', '--images', tmp_path/'ok.npz'], 'could not load'),
             (['ddpm', '--channels', '12,24'], "doesn't divide"),
             (['ddpm', '--channels', '8,8,8,8,8,8,8', '--data', 'sample', '--out', tmp_path/'d'], 'multiples of 64')]
    for args, words in cases:
        r = cli(*args)
        err = r.stderr.strip()
        assert r.returncode == 2 and len(err.splitlines()) == 1 and words in err and 'Traceback' not in err, \
            (args, r.returncode, err)
