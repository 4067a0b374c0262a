"""Things I do in the course's notebooks with the Learner, which must work the same with miniai.

- capture a model's features or predictions with an inference-only Learner (`opt_func=None`) and `fit(1, train=False)`;
- get a clear message when I forget the optimizer and try to train that Learner;
- train with optimizers I wrote myself in the SGD notebook (they have `params`, `step`, `zero_grad`, no `.state`);
- `from miniai.learner import *` and friends, `to_cpu` included.
"""
from types import SimpleNamespace

import fastcore.all as fc
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torcheval.metrics import MulticlassAccuracy

from miniai.learner import (Callback, DeviceCB, Learner, MetricsCB, ProgressCB, TrainCB, TrainLearner, to_cpu)

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
    learn = Learner(get_model(), get_dls(), F.cross_entropy, lr=0.05, cbs=[DeviceCB(), TrainCB()], opt_func=SGDWithMomentum)
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
