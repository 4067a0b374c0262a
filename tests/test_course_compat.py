"""A course student's code against miniai: each pattern of the course's notebooks that must work as taught.

Written in our own words; grouped by the part of the course it comes from."""
import importlib
import os
import subprocess
import sys
import warnings
from functools import partial
from types import SimpleNamespace

import fastcore.all as fc
import pytest
import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from torch import nn, optim
from torch.optim import lr_scheduler
from torch.utils.data import DataLoader, TensorDataset, default_collate
from torcheval.metrics import MulticlassAccuracy

import miniai.accel
from miniai.accel import AccelerateCB, MixedPrecision, MultDL
from miniai.conv import conv
from miniai.datasets import DataLoaders, fashion_mnist_arrays
from miniai.ddpm import DDPMCB, DDPMCB2, ddim_sample
from miniai.fid import ImageEval
from miniai.learner import Callback, DeviceCB, Learner, MetricsCB, ProgressCB, TrainCB, TrainLearner, to_cpu


# --- The Learner: inference-only learners, hand-written optimizers, the course's imports
# Things I do in the course's notebooks with the Learner, which must work the same with miniai.
#
# - capture a model's features or predictions with an inference-only Learner (`opt_func=None`)
#   and `fit(1, train=False)`;
# - get a clear message when I forget the optimizer and try to train that Learner;
# - train with optimizers I wrote myself in the SGD notebook (they have `params`, `step`, `zero_grad`, no `.state`);
# - `from miniai.learner import *` and friends, `to_cpu` included.
def get_dls(n_train=8, n_valid=3, bs=16):
    "Two blobs of points, one per class: easy to learn, so training visibly works."
    g = torch.Generator().manual_seed(42)
    def batch():
        y = torch.randint(0, 2, (bs,), generator=g)
        x = torch.randn(bs, 2, generator=g)*0.5 + (y[:, None]*2 - 1)*1.5
        return x, y
    return SimpleNamespace(train=[batch() for _ in range(n_train)], valid=[batch() for _ in range(n_valid)])

def get_model(): return nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))

class Capture(Callback):
    "Like the course's capture callbacks: keep every batch's predictions (on the CPU)."
    def before_fit(self, learn): self.preds = []
    def after_batch(self, learn): self.preds.append(to_cpu(learn.preds))

def test_inference_only_learner_predicts_with_fit_train_false():
    model = get_model()
    learn = Learner(model, get_dls(), F.cross_entropy, cbs=[DeviceCB()], opt_func=None)
    cap = Capture()
    learn.fit(1, train=False, cbs=[TrainCB(), cap])
    preds = torch.cat(cap.preds)
    assert preds.shape == (3*16, 2)
    assert learn.opt is None                      # nothing was made to train with
    xs = torch.cat([x for x, _ in get_dls().valid]).to(next(model.parameters()).device)
    with torch.no_grad(): direct = model(xs).cpu()
    assert torch.allclose(preds, direct)          # it really is the model's output, batch after batch

def test_inference_only_train_learner_as_in_image_eval():
    "ImageEval in the course builds `TrainLearner(model, dls, loss_func=fc.noop, cbs=..., opt_func=None)`."
    learn = TrainLearner(get_model(), get_dls(), loss_func=fc.noop, cbs=[DeviceCB()], opt_func=None)
    cap = Capture()
    learn.fit(1, train=False, cbs=cap)
    assert len(cap.preds) == 3

def test_training_without_an_optimizer_says_so_before_anything_runs():
    seen = []
    class Watch(Callback):
        def before_fit(self, learn): seen.append('before_fit')
    learn = Learner(get_model(), get_dls(), F.cross_entropy, cbs=[TrainCB(), Watch()], opt_func=None)
    with pytest.raises(ValueError, match='opt_func=None') as e: learn.fit(1)
    assert 'train=False' in str(e.value)   # and how to fix it
    assert seen == []                      # told before anything ran

class SGDWithMomentum:
    "My own optimizer from the SGD notebook: a running average of the gradients kept on each parameter."
    def __init__(self, params, lr, mom=0.9, wd=0.):
        self.params, self.lr, self.mom, self.wd = list(params), lr, mom, wd
    def step(self):
        with torch.no_grad():
            for p in self.params:
                if self.wd: p *= 1 - self.lr*self.wd
                if not hasattr(p, 'grad_avg'): p.grad_avg = torch.zeros_like(p.grad)
                p.grad_avg = p.grad_avg*self.mom + p.grad
                p -= self.lr*p.grad_avg
    def zero_grad(self):
        for p in self.params: p.grad.data.zero_()

def test_my_own_optimizer_trains_with_the_standard_callbacks():
    torch.manual_seed(0)
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    learn = Learner(get_model(), get_dls(), F.cross_entropy, lr=0.05,
                    cbs=[DeviceCB(), TrainCB(), metrics, ProgressCB()], opt_func=SGDWithMomentum)
    learn.fit(3)
    assert isinstance(learn.opt, SGDWithMomentum)
    assert all(hasattr(p, 'grad_avg') for p in learn.model.parameters())   # my step really ran
    hist = metrics.history
    assert hist[-1]['accuracy'] > 0.9 and hist[-1]['loss'] < hist[1]['loss'], hist
    learn.fit(1, lr=0.01)            # a new lr goes to my optimizer too
    assert learn.opt.lr == 0.01

def test_my_own_optimizer_survives_a_second_fit_after_an_error():
    class Oops(Callback):
        def after_predict(self, learn): raise RuntimeError('oops')
    learn = Learner(get_model(), get_dls(), F.cross_entropy, lr=0.05, cbs=[DeviceCB(), TrainCB()],
                    opt_func=SGDWithMomentum)
    with pytest.raises(RuntimeError, match='oops'): learn.fit(1, cbs=Oops())   # not my zero_grad's AttributeError
    learn.fit(1)

def test_course_imports():
    import miniai.learner as ml
    from miniai.learner import to_cpu as tc
    assert 'to_cpu' in ml.__all__ and tc is to_cpu
    t = torch.ones(2, requires_grad=True)*2
    assert not to_cpu({'a': [t]})['a'][0].requires_grad
    for nm in ('Learner', 'TrainLearner', 'MomentumLearner', 'TrainCB', 'DeviceCB', 'MetricsCB', 'ProgressCB',
               'SingleBatchCB', 'LRFinderCB', 'Callback', 'run_cbs', 'with_cbs', 'CancelFitException',
               'CancelEpochException', 'CancelBatchException'):
        assert nm in ml.__all__, nm

def test_course_learner_attributes():
    "The course's callbacks read learn.training, learn.epoch, learn.iter and learn.n_inp."
    seen = {}
    class Peek(Callback):
        def after_batch(self, learn): seen.setdefault(learn.training, (learn.epoch, learn.iter, learn.n_inp))
    Learner(get_model(), get_dls(), F.cross_entropy, cbs=[TrainCB()]).fit(1, cbs=Peek())
    assert seen == {True: (0, 0, 1), False: (0, 0, 1)}

def test_whole_numbers_must_be_whole_numbers():
    learn = Learner(get_model(), get_dls(), F.cross_entropy, cbs=[TrainCB()])
    with pytest.raises(ValueError, match='bool'): learn.fit(True)
    with pytest.raises(ValueError, match='bool'): TrainCB(n_inp=True)
    with pytest.raises(ValueError, match='whole number'): learn.fit(1.5)


# --- activations, init, sgd, resnet, augment and imports: names and call patterns
# The course's notebooks, run against miniai: names they import from activations, init, sgd, resnet, augment and
# imports, and the call patterns they use, written the way a student following the course writes them.
# What each of the course's modules lists in its `__all__` (names only): `from miniai.X import *` must bring them all.
COURSE_ALL = {
    'activations': ['set_seed', 'Hook', 'Hooks', 'HooksCallback', 'append_stats', 'get_hist', 'get_min',
                    'ActivationStats'],
    'init': ['clean_ipython_hist', 'clean_tb', 'clean_mem', 'BatchTransformCB', 'GeneralRelu', 'plot_func',
             'init_weights', 'lsuv_init', 'conv', 'get_model'],
    'sgd': ['BaseSchedCB', 'BatchSchedCB', 'HasLearnCB', 'RecorderCB', 'EpochSchedCB'],
    'resnet': ['act_gr', 'ResBlock'],
    'augment': ['summary', 'show_image_batch', 'CapturePreds', 'capture_preds', 'rand_erase', 'RandErase', 'rand_copy',
                'RandCopy'],
}


@pytest.mark.parametrize('mod', list(COURSE_ALL))
def test_star_import_brings_every_course_name(mod):
    ns = {}
    exec(f'from miniai.{mod} import *', ns)
    missing = [n for n in COURSE_ALL[mod] if n not in ns]
    assert not missing, f'from miniai.{mod} import * lacks {missing}'
    m = importlib.import_module(f'miniai.{mod}')
    assert all(getattr(m, n) is not None for n in COURSE_ALL[mod])  # real objects, not placeholders


def test_the_missing_names_import_from_the_course_paths():
    from miniai.augment import summary
    from miniai.init import clean_ipython_hist, clean_mem, clean_tb, conv
    from miniai.sgd import HasLearnCB
    assert callable(conv) and callable(clean_mem) and callable(clean_tb) and callable(clean_ipython_hist)
    assert issubclass(HasLearnCB, Callback) and callable(summary)


# ---- a tiny image problem, as in the course's notebooks -------------------------------------------------------------

def image_dls(n=64, bs=16):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
    batches = lambda: [(x[i:i+bs], y[i:i+bs]) for i in range(0, n, bs)]
    return DataLoaders(batches(), batches())


def course_cnn():
    from miniai.init import conv
    # the course's init/resnet call pattern: act=<class> or act=None, an optional norm, bias=None
    return nn.Sequential(conv(1, 8, ks=3, stride=2, act=nn.ReLU, norm=None, bias=None), conv(8, 16, act=nn.ReLU),
                         conv(16, 32, norm=nn.BatchNorm2d), conv(32, 64), conv(64, 10, act=None), nn.Flatten())


def test_init_conv_takes_the_course_arguments():
    from miniai.init import conv
    test = course_cnn()
    assert test(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert [type(l) for l in conv(4, 8, act=None)] == [nn.Conv2d]
    assert [type(l) for l in conv(4, 8, act=False)] == [nn.Conv2d]
    with_bn = conv(4, 8, norm=nn.BatchNorm2d)
    assert [type(l) for l in with_bn] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU] and with_bn[0].bias is None


def test_course_resblock_model_with_summary():
    from miniai.augment import summary  # noqa: F401  (the course imports it from augment; it patches Learner)
    from miniai.resnet import ResBlock, act_gr
    def get_model(act=nn.ReLU, nfs=(16, 32, 64, 128, 256, 512), norm=nn.BatchNorm2d):
        layers = [ResBlock(1, 16, ks=5, stride=1, act=act, norm=norm)]
        layers += [ResBlock(nfs[i], nfs[i+1], act=act, norm=norm, stride=2) for i in range(len(nfs)-1)]
        layers += [nn.Flatten(), nn.Linear(nfs[-1], 10, bias=False), nn.BatchNorm1d(10)]
        return nn.Sequential(*layers)
    model = get_model(act_gr)
    learn = TrainLearner(model, image_dls(), F.cross_entropy, cbs=[DeviceCB()])
    s = learn.summary()
    assert s.rows[0]['output'] == (16, 16, 28, 28) and s.rows[-1]['output'] == (16, 10)
    assert s.params == sum(p.numel() for p in model.parameters())
    assert learn.model(torch.randn(3, 1, 28, 28)).shape == (3, 10)


@pytest.mark.parametrize('make_cb', ['ActivationStats', 'HooksCallback'])
def test_a_filter_that_matches_nothing_warns_and_the_fit_goes_on(make_cb):
    from miniai.activations import ActivationStats, HooksCallback, append_stats
    from miniai.init import GeneralRelu
    only_grelu = fc.risinstance(GeneralRelu)  # the course's filter, on a model without any GeneralRelu (like timm's)
    cb = ActivationStats(only_grelu) if make_cb == 'ActivationStats' else HooksCallback(append_stats, only_grelu)
    model = course_cnn()
    w0 = model[0][0].weight.detach().clone()
    learn = TrainLearner(model, image_dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB(), cb])
    with pytest.warns(UserWarning, match='no modules to hook'):
        learn.fit(1)
    assert len(cb) == 0
    assert not torch.equal(model[0][0].weight, w0)  # it trained
    assert not any(m._forward_hooks for m in model.modules())


def test_activation_stats_on_a_filter_that_matches():
    from miniai.activations import ActivationStats
    astats = ActivationStats(fc.risinstance(nn.ReLU))
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # no warning when the filter finds modules
        TrainLearner(course_cnn(), image_dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB(), astats]).fit(1)
    assert len(astats) == 4
    axs = astats.color_dim()
    assert len(axs) >= 4


def test_hook_keeps_its_handle_as_hook():
    from miniai.activations import Hook
    calls = []
    lin = nn.Linear(3, 2)
    h = Hook(lin, lambda hook, mod, inp, outp: calls.append(outp.shape))
    lin(torch.randn(4, 3))
    h.hook.remove()
    lin(torch.randn(4, 3))
    assert calls == [(4, 2)]


def test_capture_preds_in_the_course_argument_order():
    from miniai.augment import capture_preds  # noqa: F401
    from miniai.init import BatchTransformCB
    model = course_cnn()
    learn = TrainLearner(model, image_dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB()])
    learn.fit(1)
    flip = BatchTransformCB(lambda b: (b[0].flip(-1), b[1]), on_train=False)
    preds, targs, inps = learn.capture_preds(cbs=[flip], inps=True)
    assert preds.shape == (64, 10) and targs.shape == (64,) and inps.shape == (64, 1, 28, 28)
    x_valid = torch.cat([x for x, _ in learn.dls.valid])
    assert torch.equal(inps, x_valid.flip(-1))      # the extra callback ran on every batch
    p2, t2, i2 = learn.capture_preds([], True)       # positional: cbs, then inps
    assert torch.equal(i2, x_valid) and torch.equal(t2, targs)
    assert len(learn.capture_preds()) == 2


def test_capture_preds_callback_attributes():
    from miniai.augment import CapturePreds
    cp = CapturePreds()
    learn = TrainLearner(course_cnn(), image_dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB()])
    learn.fit(1, train=False, cbs=[cp])
    assert isinstance(cp.all_preds, torch.Tensor) and cp.all_preds.shape == (64, 10)
    assert isinstance(cp.all_targs, torch.Tensor) and cp.all_targs.shape == (64,)
    assert isinstance(cp.all_inps, torch.Tensor) and cp.all_inps.shape == (64, 1, 28, 28)


def test_has_learn_cb_sets_learn_during_fit_and_clears_it_after():
    from miniai.sgd import HasLearnCB
    class Spy(HasLearnCB):
        def after_batch(self, learn): self.seen = self.learn
    spy = Spy()
    learn = TrainLearner(course_cnn(), image_dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB(), spy])
    learn.fit(1)
    assert spy.seen is learn and spy.learn is None

    class Breaks(HasLearnCB):
        def after_batch(self, learn): raise RuntimeError('bad batch')
    breaks = Breaks()
    with pytest.raises(RuntimeError, match='bad batch'): learn.fit(1, cbs=[breaks])
    assert breaks.learn is None


def test_recorder_with_the_course_functions_of_the_callback():
    from miniai.sgd import BatchSchedCB, RecorderCB
    def _lr(cb): return cb.pg['lr']
    def _beta1(cb): return cb.pg['betas'][0]
    rec = RecorderCB(lr=_lr, mom=_beta1)
    dls = image_dls()
    epochs, lr = 2, 6e-2
    sched = partial(lr_scheduler.OneCycleLR, max_lr=lr, total_steps=epochs*len(dls.train))
    learn = TrainLearner(course_cnn(), dls, F.cross_entropy, lr=lr, cbs=[DeviceCB(), BatchSchedCB(sched), rec],
                         opt_func=optim.AdamW)
    learn.fit(epochs)
    lrs, moms = torch.tensor(rec.recs['lr']), torch.tensor(rec.recs['mom'])
    assert len(lrs) == epochs*len(dls.train)
    assert lrs[0] == pytest.approx(lr/25) and lrs.max() == pytest.approx(lr, rel=0.05)
    assert int(lrs.argmax()) == int(moms.argmin())   # beta1 dips where the lr peaks
    rec.plot()


def test_miniai_imports_gives_the_usual_names():
    ns = {}
    exec('from miniai.imports import *', ns)
    for name in ['torch', 'nn', 'F', 'optim', 'np', 'plt', 'fc', 'partial', 'Path', 'math', 'DataLoader',
                 'default_collate', 'MulticlassAccuracy', 'progress_bar', 'master_bar', 'load_dataset', 'lr_scheduler',
                 'tensor', 'Learner', 'TrainLearner', 'DeviceCB', 'ActivationStats', 'clean_mem', 'ResBlock',
                 'capture_preds', 'HasLearnCB', 'BatchTransformCB', 'MixedPrecision']:
        assert name in ns, name
    assert ns['nn'] is nn and ns['F'] is F and ns['optim'] is optim


def test_course_dataloader_after_miniai_imports():
    "The course's way: `from miniai.imports import *`, then PyTorch's DataLoader with a batch_size."
    ns = {}
    exec('from miniai.imports import *\n'
         'ds = Dataset(torch.arange(10.), torch.arange(10))\n'
         'dl = DataLoader(ds, batch_size=4)\n'
         'xb, yb = next(iter(dl))', ns)
    assert ns['DataLoader'] is DataLoader and isinstance(ns['dl'], DataLoader)
    assert ns['xb'].tolist() == [0., 1., 2., 3.] and len(ns['dl']) == 3
    import miniai.training
    assert miniai.training.__all__ == ['accuracy', 'report', 'Dataset', 'fit', 'get_dls']   # the course's exports
    assert miniai.training.DataLoader is not DataLoader    # the from-scratch one, by name


def test_clean_mem_outside_ipython_and_after_an_error():
    from miniai.init import clean_mem, clean_tb
    def fails(t): raise ValueError('boom')
    try: fails(torch.zeros(10))
    except ValueError: sys.last_type, sys.last_value, sys.last_traceback = sys.exc_info()
    clean_mem()
    assert not hasattr(sys, 'last_traceback') and not hasattr(sys, 'last_value')
    clean_tb(); clean_mem()  # nothing left to clean is fine too


def test_clean_ipython_hist_drops_old_outputs_in_a_shell(tmp_path):
    # a real IPython shell in a child process, so this test's interpreter is left alone
    code = '''
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
for hist in (True, False):   # a notebook numbers its cells (store_history); run_cell's default doesn't
    ip.run_cell("import torch\\nbig = torch.zeros(100, 100)\\nbig", store_history=hist)
    ip.run_cell("import weakref\\nref = weakref.ref(big)\\ndel big", store_history=hist)
    assert ip.user_ns['ref']() is not None   # kept alive by the output history
    ip.run_cell("from miniai.init import clean_mem\\nclean_mem()", store_history=hist)
    assert ip.user_ns['ref']() is None, f'the output history still holds the tensor (store_history={hist})'
    assert ip.user_ns['_'] == '' and not ip.user_ns['Out']
print('ok')
'''
    env = {**os.environ, 'IPYTHONDIR': str(tmp_path)}   # its history database goes to a temporary folder
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0 and r.stdout.strip().endswith('ok'), r.stderr


# --- Lesson 20's mixed precision and Accelerate
# Lesson 20's mixed precision and Accelerate, called the way the course calls them.
#
# As a course student I import `MixedPrecision` and `AccelerateCB` from `miniai.accel`, list them among `DeviceCB`,
# `ProgressCB` and `MetricsCB` in whatever order I typed them, and train a diffusers UNet on batches `(xt, t, eps)` with
# `n_inp=2` and `DDPMCB2`. These tests check that this works here; and where the course's call can't work (fp16 on a
# CPU), that it fails at once with a message naming the fix.
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


# --- FID, DDPM and DDIM as the course's notebooks call them
# As a course student would write it: the calls of the course's FID, DDPM and DDIM notebooks, against miniai.
#
# Each test trains something tiny on the bundled Fashion-MNIST sample for a few batches, so the numbers mean little;
# what is checked is that the course's way of calling things works and gives sensible results.
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
    assert {'DDPMCB', 'noisify', 'sample', 'ddim_sample', 'UNet'} <= set(ns)
    exec('from miniai.accel import *', ns)
    assert 'EMACB' in ns  # a general callback: it lives with the other training aids


def test_image_eval_with_a_chopped_classifier(dls):
    "The course trains a classifier, deletes its last layers, and hands the rest to ImageEval with the DataLoaders."
    torch.manual_seed(0)
    model = nn.Sequential(conv(1, 16, norm=nn.BatchNorm2d), conv(16, 32, norm=nn.BatchNorm2d),
                          conv(32, 64, norm=nn.BatchNorm2d),
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
