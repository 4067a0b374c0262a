"""The course's notebooks, run against miniai: names they import from activations, init, sgd, resnet, augment and
imports, and the call patterns they use, written the way a student following the course writes them."""
import importlib
import os
import subprocess
import sys
import warnings
from functools import partial

import fastcore.all as fc
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.optim import lr_scheduler

from miniai.datasets import DataLoaders
from miniai.learner import Callback, DeviceCB, Learner, TrainCB, TrainLearner

# What each of the course's modules lists in its `__all__` (names only): `from miniai.X import *` must bring them all.
COURSE_ALL = {
    'activations': ['set_seed', 'Hook', 'Hooks', 'HooksCallback', 'append_stats', 'get_hist', 'get_min', 'ActivationStats'],
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
