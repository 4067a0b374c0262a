"""As a course student would write it: the calls of the course's FID, DDPM and DDIM notebooks, against miniai.

Each test trains something tiny on the bundled Fashion-MNIST sample for a few batches, so the numbers mean little;
what is checked is that the course's way of calling things works and gives sensible results."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn, optim
from torch.utils.data import DataLoader, TensorDataset

from miniai.conv import conv
from miniai.datasets import DataLoaders, fashion_mnist_arrays
from miniai.ddpm import DDPMCB, ddim_sample
from miniai.fid import ImageEval
from miniai.learner import DeviceCB, Learner, MetricsCB, TrainCB


def images(x):
    "The course pads the 28×28 images to 32×32 and scales them to [-1, 1] for the DDPM (here for both)."
    return F.pad(x.float()/255, (2, 2, 2, 2))[:, None]*2 - 1


@pytest.fixture(scope='module')
def dls():
    a = fashion_mnist_arrays('sample')
    (xt, yt), (xv, yv) = a['train'], a['valid']
    return DataLoaders(DataLoader(TensorDataset(images(xt[:1024]), yt[:1024]), 64, shuffle=True),
                       DataLoader(TensorDataset(images(xv[:500]), yv[:500]), 128))


def test_star_import_gives_the_course_names():
    ns = {}
    exec('from miniai.fid import *', ns)
    assert {'ImageEval', 'fid', 'kid', 'fid_classifier', 'train_fid_classifier', 'load_fid_classifier'} <= set(ns)
    exec('from miniai.ddpm import *', ns)
    assert {'DDPMCB', 'EMACB', 'noisify', 'sample', 'ddim_sample', 'UNet'} <= set(ns)


def test_image_eval_with_a_chopped_classifier(dls):
    "The course trains a classifier, deletes its last layers, and hands the rest to ImageEval with the DataLoaders."
    torch.manual_seed(0)
    model = nn.Sequential(conv(1, 16, norm=nn.BatchNorm2d), conv(16, 32, norm=nn.BatchNorm2d), conv(32, 64, norm=nn.BatchNorm2d),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    learn = Learner(model, dls, F.cross_entropy, lr=1e-2, cbs=[TrainCB(), DeviceCB(), MetricsCB()], opt_func=optim.Adam)
    learn.fit(1, valid=False)
    cmodel = learn.model
    del cmodel[5]  # the course deletes the classification head; what is left gives 64 features per image
    ie = ImageEval(cmodel, learn.dls, cbs=[DeviceCB()])
    real = dls.train.dataset.tensors[0][:300]
    noise = torch.randn(300, 1, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert ie.feats.shape == (500, 64)
    assert ie.fid(noise) > 5*ie.fid(real) > 0
    assert ie.kid(noise) > 5*abs(ie.kid(real))


class UNet(UNet2DModel):
    "The course's DDPM notebook: a UNet2DModel taking ONE input, the (xt, t) tuple that DDPMCB's batches give TrainCB."
    def forward(self, x): return super().forward(*x).sample


def test_sampling_a_tuple_input_unet_trained_with_ddpmcb(dls):
    torch.manual_seed(0)
    model = UNet(in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8, layers_per_block=1,
                 down_block_types=('DownBlock2D',)*2, up_block_types=('UpBlock2D',)*2)
    ddpm_cb = DDPMCB(n_steps=100, beta_min=0.001, beta_max=0.2)
    learn = Learner(model, dls, nn.MSELoss(), lr=2e-3, cbs=[ddpm_cb, DeviceCB(), TrainCB(), MetricsCB()],
                    opt_func=optim.Adam)
    learn.fit(1, valid=False)
    samples = ddpm_cb.sample(learn.model, (4, 1, 32, 32))  # the course: model((xt, t)), as in training
    # a difference from the course: the result is the images themselves, not a list of every step's images
    assert isinstance(samples, torch.Tensor) and samples.shape == (4, 1, 32, 32)
    assert samples.abs().max() <= 1 + 1e-6 and samples.std() > 0.05
    imgs, traj = ddpm_cb.sample(learn.model, (4, 1, 32, 32), return_traj=True, traj_every=10)
    assert torch.equal(traj.x0[-1], imgs) and len(traj.t) == 11  # the walk, for the course's preds[-1]-style pictures
    assert ddim_sample(learn.model, (4, 1, 32, 32), ddpm_cb.sched, steps=10).shape == (4, 1, 32, 32)
