"Fault injection: an exception at any event point of fit leaves nothing half-done."
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miniai.learner import EVENTS, STEPS, Callback, Learner, TrainCB

class Injected(Exception): pass

class Recorder(Callback):
    "Records the cleanup events it sees."
    order = 50
    def __init__(self): self.seen = []
    def cleanup_batch(self, learn): self.seen.append('cleanup_batch')
    def cleanup_epoch(self, learn): self.seen.append('cleanup_epoch')
    def cleanup_fit(self, learn): self.seen.append('cleanup_fit')

def raiser_at(point):
    "A callback that raises `Injected` at `point` (an event or a step method) on the second training batch if it can."
    def f(self, learn):
        in_batch = point not in ('before_fit', 'after_fit', 'cleanup_fit', 'before_epoch', 'after_epoch',
                                 'cleanup_epoch')
        if not in_batch or (learn.training and learn.iter == 1): raise Injected(point)
    return type(f'Raise_{point}', (Callback,), {point: f})()

def dls():
    torch.manual_seed(0)
    mk = lambda n: [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(n)]
    return SimpleNamespace(train=mk(3), valid=mk(2))

POINTS = ([e for e in EVENTS if not e.startswith('cleanup')] + list(STEPS)
          + ['cleanup_batch', 'cleanup_epoch', 'cleanup_fit'])

@pytest.mark.parametrize('point', POINTS)
@pytest.mark.parametrize('mode', ['train', 'eval'])
def test_exception_at_every_point_cleans_up(point, mode):
    model = nn.Linear(3, 2)
    model.train(mode == 'train')
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec, bad = Recorder(), raiser_at(point)
    learn = Learner(model, dls(), F.cross_entropy, lr=0.1, cbs=[TrainCB()])
    n_cbs = list(learn.cbs)
    with pytest.raises(Injected):
        learn.fit(1, cbs=[rec, bad])
    assert learn.cbs == n_cbs, 'callbacks passed to fit must be removed'
    assert model.training == (mode == 'train'), 'train/eval mode must be as before fit'
    assert rec.seen[-1] == 'cleanup_fit' or point == 'cleanup_fit'
    if point not in ('before_fit', 'after_fit', 'cleanup_fit', 'before_epoch', 'after_epoch', 'cleanup_epoch'):
        assert rec.seen[-3:] == ['cleanup_batch', 'cleanup_epoch', 'cleanup_fit'] or point.startswith('cleanup'), \
            rec.seen
    if point in ('before_fit', 'before_epoch', 'before_batch', 'predict', 'after_predict', 'get_loss', 'after_loss',
                 'backward'):
        if point in ('before_fit', 'before_epoch'):
            for k, v in model.state_dict().items():
                assert torch.equal(v, before[k]), 'nothing trained before the failure'
    # the Learner still works afterwards
    learn.fit(1)
    assert learn.model.training is False

def test_grads_are_not_left_behind_by_a_failed_batch_for_the_next_fit():
    class FailAfterBackward(Callback):
        def after_backward(self, learn):
            if learn.iter == 0: raise Injected()
    learn = Learner(nn.Linear(3, 2), dls(), F.cross_entropy, lr=0.1, cbs=[TrainCB()])
    with pytest.raises(Injected): learn.fit(1, cbs=FailAfterBackward())
    assert all(p.grad is None for p in learn.model.parameters())

def test_keyboard_interrupt_still_cleans_up_and_comes_through():
    class CtrlC(Callback):
        def after_batch(self, learn):
            if learn.iter == 1: raise KeyboardInterrupt()
    rec = Recorder()
    learn = Learner(nn.Linear(3, 2), dls(), F.cross_entropy, lr=0.1, cbs=[TrainCB()])
    n_cbs = list(learn.cbs)
    with pytest.raises(KeyboardInterrupt): learn.fit(1, cbs=[rec, CtrlC()])
    assert rec.seen == ['cleanup_batch', 'cleanup_batch', 'cleanup_epoch', 'cleanup_fit']
    assert learn.cbs == n_cbs and all(p.grad is None for p in learn.model.parameters())
