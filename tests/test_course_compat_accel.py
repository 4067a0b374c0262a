"""Lesson 20's mixed precision and Accelerate, called the way the course calls them.

As a course student I import `MixedPrecision` and `AccelerateCB` from `miniai.accel`, list them among `DeviceCB`,
`ProgressCB` and `MetricsCB` in whatever order I typed them, and train a diffusers UNet on batches `(xt, t, eps)` with
`n_inp=2` and `DDPMCB2`. These tests check that this works here; and where the course's call can't work (fp16 on a
CPU), that it fails at once with a message naming the fix."""
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset, default_collate

import miniai.accel
from miniai.accel import AccelerateCB, MixedPrecision, MultDL
from miniai.datasets import DataLoaders
from miniai.ddpm import DDPMCB2
from miniai.learner import DeviceCB, Learner, MetricsCB, ProgressCB, TrainCB

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason='checks what happens on a CPU')

COURSE_ACCEL_ALL = ['MixedPrecision', 'AccelerateCB']  # the course's miniai/accel.py exports these


def test_course_names_import():
    for name in COURSE_ACCEL_ALL:
        assert name in miniai.accel.__all__
        assert issubclass(getattr(miniai.accel, name), TrainCB)  # both replace the plain training step


def test_constructed_the_course_way(fresh_accelerate):
    assert MixedPrecision().n_inp == 1
    assert MixedPrecision(n_inp=2).n_inp == 2
    assert AccelerateCB(n_inp=2).n_inp == 2


def test_orders_the_course_relies_on():
    # Both come after DeviceCB: the model is on its device before they look at it (and prepare it)
    assert MixedPrecision.order == DeviceCB.order + 10  # the course's own expression
    assert DeviceCB.order < AccelerateCB.order
    # ours: AccelerateCB also comes before MetricsCB, which must see the batch gathered from every process
    assert AccelerateCB.order < MetricsCB.order < ProgressCB.order
    # listed in the lesson's order, they run sorted
    for train_cb in (MixedPrecision(), AccelerateCB(n_inp=2, mixed_precision='no')):
        learn = Learner(nn.Linear(2, 1), cbs=[ProgressCB(), MetricsCB(), train_cb, DeviceCB()])
        names = [type(cb).__name__ for cb in learn.cbs]
        assert names.index('DeviceCB') < names.index(type(train_cb).__name__) < names.index('ProgressCB')
        assert names.index('MetricsCB') < names.index('ProgressCB')


@cpu_only
def test_accelerate_fp16_on_cpu_fails_naming_the_fix(fresh_accelerate):
    with pytest.raises(ValueError) as e: AccelerateCB(mixed_precision='fp16')
    msg = str(e.value)
    assert 'CPU' in msg and "mixed_precision='auto'" in msg and 'CUDA' in msg
    assert AccelerateCB(n_inp=2).mixed_precision in ('no', 'bf16')  # the default suits this machine


@cpu_only
def test_mixed_precision_fp16_on_cpu_fails_naming_the_fix():
    cbs = [DeviceCB('cpu'), MixedPrecision(dtype='fp16')]
    learn = Learner(nn.Linear(4, 1), DataLoaders(*flat_dls(n=8)), F.mse_loss, cbs=cbs)
    with pytest.raises(ValueError, match="use dtype='auto'"): learn.fit(1)


@needs_cuda
def test_course_defaults_on_a_gpu(fresh_accelerate):
    assert AccelerateCB(n_inp=2).mixed_precision == 'fp16'  # the course's default
    assert AccelerateCB(mixed_precision='fp16').acc.mixed_precision == 'fp16'


# ---------------------------------------------------------------- the DDPM v2 flow of lesson 20

def flat_dls(n=64, bs=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2*n, 4, generator=g), torch.randn(2*n, 1, generator=g)
    return DataLoader(TensorDataset(x[:n], y[:n]), bs), DataLoader(TensorDataset(x[n:], y[n:]), bs)


def collate_ddpm(b, abar):
    "The lesson's collate: noise the collated images to random steps and return (xt, t, eps)."
    x0 = default_collate(b)[0]
    t = torch.randint(0, len(abar), (len(x0),))
    eps = torch.randn_like(x0)
    a = abar[t].view(-1, 1, 1, 1)
    return a.sqrt()*x0 + (1 - a).sqrt()*eps, t, eps


def ddpm_dls(n=128, bs=32):
    torch.manual_seed(0)
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000), 0)
    x = torch.rand(2*n, 1, 8, 8)*2 - 1
    def dl(x): return DataLoader(TensorDataset(x), bs, collate_fn=lambda b: collate_ddpm(b, abar))
    return DataLoaders(dl(x[:n]), dl(x[n:]))


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=('DownBlock2D',)*2, up_block_types=('UpBlock2D',)*2)


@pytest.mark.parametrize('which', ['MixedPrecision', 'AccelerateCB'])
def test_ddpm_v2_flow(which, fresh_accelerate):
    train_cb = MixedPrecision(n_inp=2) if which == 'MixedPrecision' else AccelerateCB(n_inp=2)
    metrics = MetricsCB()
    cbs = [DDPMCB2(), DeviceCB(), ProgressCB(), metrics, train_cb]  # the lesson's list, DeviceCB kept with accelerate
    learn = Learner(tiny_unet(), ddpm_dls(), nn.MSELoss(), lr=1e-2, cbs=cbs, opt_func=partial(optim.Adam, eps=1e-5))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # MixedPrecision's one fp32 notice on a CPU without native bf16
        learn.fit(3)
    train = [h['loss'] for h in metrics.history if h['train']]
    valid = [h['loss'] for h in metrics.history if not h['train']]
    assert len(train) == len(valid) == 3
    assert train[-1] < 0.8*train[0] and valid[-1] < 0.9*valid[0]  # it learns to predict the noise


def test_multdl_the_lessons_trick():
    "Each batch twice in a row: twice the steps for one pass of loading."
    dl = DataLoader(TensorDataset(torch.arange(6.)), 2)
    seen = [b[0].tolist() for b in MultDL(dl)]
    assert seen == [[0., 1.], [0., 1.], [2., 3.], [2., 3.], [4., 5.], [4., 5.]]
