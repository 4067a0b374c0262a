"""The Learner's behaviour, moved here from the 04_learner notebook so that the notebook can tell lesson 16's story:
the events and what a cancel skips, setup mistakes reported before training, NaN losses, the optimizer's lifetime,
MetricsCB's numbers (and no torcheval metric computed without updates), and lr_find putting everything back.
(The cleanup rules are tested in test_protocol.py, course-style optimizers and inference-only learners in
test_course_compat.py.)"""
import copy
import logging
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torcheval.metrics import MulticlassAccuracy

from miniai.datasets import fashion_dls
from miniai.learner import (EVENTS, LEARN_ATTRS, CancelBatchException, CancelEpochException, CancelFitException,
                            Callback, DeviceCB, Learner, MetricsCB, MomentumLearner, ProgressCB, SingleBatchCB,
                            TerminateOnNaNCB, TrainCB, TrainLearner, check_finite)

def tiny_dls(n_train=2, n_valid=1, bs=4):
    torch.manual_seed(0)
    mk = lambda n: [(torch.randn(bs, 3), torch.randint(0, 2, (bs,))) for _ in range(n)]
    return SimpleNamespace(train=mk(n_train), valid=mk(n_valid))

def tiny(cbs=(), **kw): return Learner(nn.Linear(3, 2), kw.pop('dls', None) or tiny_dls(), F.cross_entropy,
                                       cbs=list(cbs), **kw)

class LogCB(Callback):
    "Records every event name in order."
    def __init__(self): self.log = []
for _nm in EVENTS: setattr(LogCB, _nm, lambda self, learn, nm=_nm: self.log.append(nm))

@pytest.fixture(scope='module')
def fmnist(): return fashion_dls(bs=128, flat=True, source='sample')

def mlp(): return nn.Sequential(nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))

# --- the loop's events

BATCH_TRAIN = ['before_batch', 'after_predict', 'after_loss', 'after_backward', 'after_step', 'after_batch',
               'cleanup_batch']
BATCH_VALID = ['before_batch', 'after_predict', 'after_loss', 'after_batch', 'cleanup_batch']

def test_events_run_in_the_documented_order():
    log_cb = LogCB()
    tiny([TrainCB(), log_cb], lr=0.1).fit(1)
    assert log_cb.log == (['before_fit', 'before_epoch'] + BATCH_TRAIN*2 + ['after_epoch', 'cleanup_epoch',
                          'before_epoch'] + BATCH_VALID + ['after_epoch', 'cleanup_epoch', 'after_fit', 'cleanup_fit'])

def events_with_cancel(exc):
    "The events of a fit in which `exc` is raised from after_predict of the first training batch."
    log_cb = LogCB()
    def raiser(self, learn):
        self.log.append('after_predict')
        if learn.iter == 0 and learn.training: raise exc()
    log_cb.after_predict = raiser.__get__(log_cb)
    tiny([TrainCB(), log_cb]).fit(1)
    return log_cb.log

def test_cancel_batch_skips_the_rest_of_that_batch_only():
    log = events_with_cancel(CancelBatchException)
    assert log[:5] == ['before_fit', 'before_epoch', 'before_batch', 'after_predict', 'cleanup_batch']
    assert log.count('after_batch') == 2 and log.count('after_step') == 1

def test_cancel_epoch_skips_the_rest_of_that_epoch_and_its_after_epoch():
    log = events_with_cancel(CancelEpochException)
    assert log[4:7] == ['cleanup_batch', 'cleanup_epoch', 'before_epoch']
    assert log.count('after_epoch') == 1 and log[-2:] == ['after_fit', 'cleanup_fit']

def test_cancel_fit_runs_only_the_cleanups():
    assert events_with_cancel(CancelFitException) == ['before_fit', 'before_epoch', 'before_batch', 'after_predict',
                                                      'cleanup_batch', 'cleanup_epoch', 'cleanup_fit']

def test_an_error_runs_the_cleanups_removes_fit_callbacks_and_restores_modes():
    class Boom(Callback):
        def after_loss(self, learn):
            if learn.iter == 1: raise RuntimeError('boom')
    log_cb, boom = LogCB(), Boom()
    learn = tiny([TrainCB()])
    learn.model.eval()
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1, cbs=[log_cb, boom])
    assert log_cb.log[-3:] == ['cleanup_batch', 'cleanup_epoch', 'cleanup_fit']
    assert log_cb not in learn.cbs and boom not in learn.cbs
    assert not learn.model.training and all(p.grad is None for p in learn.model.parameters())

def test_callbacks_get_self_learn_for_code_in_the_older_style():
    class SelfLearnCB(Callback):
        def after_batch(self, learn): self.same = self.learn is learn
    cb = SelfLearnCB()
    tiny([TrainCB()]).fit(1, cbs=cb)
    assert cb.same

def test_single_batch_cb_stops_after_one_batch_and_is_removed():
    class Count(Callback):
        def before_fit(self, learn): self.n = 0
        def after_batch(self, learn): self.n += 1
    learn, count = tiny([TrainCB()]), Count()
    learn.fit(1, cbs=[SingleBatchCB(), count])
    assert count.n == 1 and learn.cbs == [learn.cbs[0]] and isinstance(learn.cbs[0], TrainCB)

def test_learn_attrs_lists_every_attribute_the_standard_callbacks_set():
    learn = tiny([TrainCB(), DeviceCB('cpu'), MetricsCB(), ProgressCB()])
    learn.fit(1)
    assert {k for k in vars(learn) if not k.startswith('_')} | {'training'} <= set(LEARN_ATTRS)

# --- mistakes reported before training, with the fix

@pytest.mark.parametrize('make, err, msg', [
    (lambda: tiny().fit(1), ValueError, 'add TrainCB()'),
    (lambda: tiny(lr=-1), ValueError, 'positive'),
    (lambda: tiny([TrainCB()], dls=SimpleNamespace(train=[], valid=[])).fit(1), ValueError, 'empty'),
    (lambda: tiny([TrainCB(n_inp=2)]).fit(1), ValueError, 'check n_inp'),
    (lambda: tiny([TrainCB]), TypeError, 'pass an instance, TrainCB()'),
    (lambda: tiny([TrainCB()]).fit(True), ValueError, 'bool'),  # True is not 1 epoch
    (lambda: TrainCB(n_inp=True), ValueError, 'bool'),
    (lambda: tiny([TrainCB()], dls=SimpleNamespace(train=[{'image': torch.randn(4, 3), 'label': torch.zeros(4).long()}],
                                                   valid=[])).fit(1, valid=False), TypeError, 'as_tuple=True'),
    (lambda: MetricsCB('acuracy'), ValueError, "known names are ['accuracy'"),
    (lambda: MetricsCB(acc=F.cross_entropy), TypeError, 'not a torcheval metric'),
], ids=['no TrainCB', 'negative lr', 'empty dl', 'n_inp', 'class not instance', 'fit(True)', 'n_inp=True',
        'dict batch', 'metric name', 'not a metric'])
def test_setup_mistakes_are_reported_with_the_fix(make, err, msg):
    with pytest.raises(err, match=msg.replace('(', r'\(').replace(')', r'\)').replace('[', r'\[')): make()

def test_preds_and_targets_that_do_not_fit_the_loss_name_their_shapes():
    reg = SimpleNamespace(train=[(torch.randn(4, 3), torch.randn(4))], valid=[])
    with pytest.raises(ValueError, match=r'\(4, 1\) but targets \(4,\)'):  # MSE would broadcast them silently
        Learner(nn.Linear(3, 1), reg, F.mse_loss, cbs=[TrainCB()]).fit(1, valid=False)
    with pytest.raises(ValueError, match=r'of shape \(4, 1\)'):
        Learner(nn.Linear(3, 1), tiny_dls(), F.cross_entropy, cbs=[TrainCB()]).fit(1)
    Learner(nn.Sequential(nn.Linear(3, 1), nn.Flatten(0)), reg, F.mse_loss, cbs=[TrainCB()]).fit(1, valid=False)

# --- NaN losses

class PoisonCB(Callback):
    "Make the second training batch's inputs NaN."
    def before_batch(self, learn):
        if learn.training and learn.iter == 1: learn.batch = (learn.batch[0]*float('nan'), learn.batch[1])

def test_a_nan_loss_stops_fit_naming_the_batch_before_the_weights_see_it():
    learn = tiny([TrainCB(), PoisonCB()])
    with pytest.raises(FloatingPointError, match='epoch 0, batch 1; lower the lr'): learn.fit(1)
    assert torch.isfinite(learn.model.weight).all()

def test_terminate_on_nan_ends_fit_quietly_with_the_last_good_weights():
    term = TerminateOnNaNCB()
    learn = tiny([TrainCB(), PoisonCB(), term])
    learn.fit(1)
    assert term.stopped_at == (0, 1) and torch.isfinite(learn.model.weight).all()

def test_check_finite_every_n_batches_names_the_range_since_the_last_read():
    class Every4CB(TrainCB):
        def backward(self, learn): check_finite(learn, every=4); learn.loss.backward()
    learn = tiny([Every4CB(), PoisonCB()], dls=tiny_dls(n_train=6))
    with pytest.raises(FloatingPointError, match='between epoch 0, batch 0 and epoch 0, batch 3'): learn.fit(1)

# --- the optimizer lives as long as the Learner

def test_the_optimizer_is_kept_between_fits_and_lr_changes_reach_it():
    learn = tiny([TrainCB()], lr=0.1, opt_func=lambda ps, lr: optim.SGD(ps, lr=lr, momentum=0.9))
    learn.fit(1)
    opt, buf = learn.opt, learn.opt.state[learn.model.weight]['momentum_buffer'].clone()
    learn.fit(1, lr=0.01)
    assert learn.opt is opt and opt.param_groups[0]['lr'] == 0.01
    assert not torch.equal(opt.state[learn.model.weight]['momentum_buffer'], buf)  # carried on and changed
    learn.fit(1)
    assert opt.param_groups[0]['lr'] == 0.01   # fit without lr keeps the optimizer's rate...
    learn.lr = 0.05
    learn.fit(1)
    assert opt.param_groups[0]['lr'] == 0.05   # ...unless learn.lr was changed
    learn.fit(1, reset_opt=True)
    assert learn.opt is not opt

def test_momentum_learner_skips_parameters_without_gradients(fmnist):
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.unused = mlp(), nn.Linear(10, 10)
        def forward(self, x): return self.body(x)
    torch.manual_seed(0)
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    learn = MomentumLearner(TwoHeads(), fmnist, F.cross_entropy, lr=0.1, cbs=[DeviceCB(), metrics])
    learn.fit(1)
    assert learn.model.unused.weight.grad is None and metrics.history[-1]['accuracy'] > 0.75

# --- MetricsCB

def test_metrics_have_a_train_and_a_valid_row_per_epoch_equal_to_a_direct_computation(fmnist):
    torch.manual_seed(0)
    metrics = MetricsCB(accuracy=MulticlassAccuracy(), buffer=5)  # several flushes per epoch
    learn = Learner(mlp(), fmnist, F.cross_entropy, lr=0.2, cbs=[TrainCB(), DeviceCB(), metrics])
    learn.fit(2)
    assert [(h['epoch'], h['train']) for h in metrics.history] == [(0, True), (0, False), (1, True), (1, False)]
    assert metrics.history[-1]['loss'] < metrics.history[1]['loss']
    with torch.no_grad():
        xv, yv = map(torch.cat, zip(*fmnist.valid))
        out = learn.model(xv).cpu()
    assert metrics.history[-1]['accuracy'] == pytest.approx((out.argmax(1) == yv).float().mean().item(), abs=1e-6)
    assert metrics.history[-1]['loss'] == pytest.approx(F.cross_entropy(out, yv).item(), abs=1e-4)

def test_the_mean_loss_does_not_depend_on_where_the_buffer_was_flushed():
    "A checkpoint flushes MetricsCB's buffer early; a resumed epoch must still report exactly the same mean loss."
    g = torch.Generator().manual_seed(0)
    batch = [SimpleNamespace(preds=torch.randn(4, 2), loss=torch.rand((), generator=g)*3,
                             batch=(torch.zeros(4), torch.zeros(4)))
             for _ in range(200)]
    def mean_loss(buffer):
        m = MetricsCB(buffer=buffer)
        m.logger = lambda row: None
        m.before_epoch(None)
        for b in batch: m.after_batch(b)
        m.after_epoch(SimpleNamespace(epoch=0, training=True))
        return m.history[0]['loss']
    assert len({mean_loss(n) for n in (1, 3, 7, 32, 200)}) == 1

class SkipFirstEpoch(Callback):
    "05_checkpoint's naive resume: cancel every batch of epoch 0 below `n`, validation included."
    def __init__(self, n=5): self.n = n
    def before_batch(self, learn):
        if learn.epoch == 0 and learn.iter < self.n: raise CancelBatchException()

def test_an_epoch_without_batches_computes_no_metric_and_says_nan(caplog):
    ("torcheval's compute() of a metric with no updates logs a warning and gives a loss of 0.0; "
     "MetricsCB never calls it.")
    rows, metrics = [], MetricsCB(accuracy=MulticlassAccuracy())
    metrics.logger = rows.append
    with caplog.at_level(logging.WARNING): tiny([TrainCB(), metrics]).fit(2, cbs=SkipFirstEpoch())
    assert not [r for r in caplog.records if 'update()' in r.getMessage()], caplog.text
    h = metrics.history
    assert [(r['epoch'], r['train']) for r in h] == [(0, True), (0, False), (1, True), (1, False)]
    assert all(math.isnan(h[i][k]) for i in (0, 1) for k in ('accuracy', 'loss'))  # every batch of epoch 0 skipped
    assert all(math.isfinite(h[i][k]) for i in (2, 3) for k in ('accuracy', 'loss'))
    assert rows[1]['loss'] == 'nan'

def test_a_partly_skipped_epoch_still_reports_its_batches(caplog):
    metrics = MetricsCB()
    with caplog.at_level(logging.WARNING):
        tiny([TrainCB(), metrics], dls=tiny_dls(n_train=3)).fit(1, cbs=SkipFirstEpoch(2))
    assert math.isfinite(metrics.history[0]['loss']) and math.isnan(metrics.history[1]['loss'])
    assert 'update()' not in caplog.text

def test_an_empty_validation_epoch_leaves_progress_cb_working():
    class NoLen(list): __len__ = None  # an iterable DataLoader: fit can't see it is empty
    dls = SimpleNamespace(train=tiny_dls().train, valid=NoLen())
    prog, metrics = ProgressCB(), MetricsCB()
    tiny([TrainCB(), metrics, prog], dls=dls).fit(1)
    assert math.isnan(prog.val_losses[0]) and math.isnan(metrics.history[1]['loss'])

# --- lr_find

def test_lr_find_puts_weights_and_optimizer_back_and_suggests_a_sane_lr(fmnist):
    torch.manual_seed(0)
    learn = TrainLearner(mlp(), fmnist, F.cross_entropy, lr=0.1,
                         opt_func=lambda ps, lr: optim.SGD(ps, lr=lr, momentum=0.9))
    learn.fit(1, valid=False)
    before, opt_before = copy.deepcopy(learn.model.state_dict()), copy.deepcopy(learn.opt.state_dict())
    suggested = learn.lr_find(plot=False)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, before[k]), k
    after = learn.opt.state_dict()
    for i, s in opt_before['state'].items():
        assert torch.equal(s['momentum_buffer'], after['state'][i]['momentum_buffer'])
    assert after['param_groups'] == opt_before['param_groups']
    f = learn.lr_finder
    assert 1e-4 < suggested < 1, suggested
    assert f.losses[-1] > f.min*3 or not math.isfinite(f.losses[-1])   # it stopped because the loss blew up
    assert f.lrs[1]/f.lrs[0] == pytest.approx(1.3)

def test_training_after_lr_find_is_bitwise_training_without_it(fmnist):
    def train_once(find):
        torch.manual_seed(0)
        learn = TrainLearner(mlp(), fmnist, F.cross_entropy, lr=0.1)
        if find: learn.lr_find(plot=False)
        learn.fit(1, valid=False)
        return learn.model.state_dict()
    a, b = train_once(False), train_once(True)
    for k in a: assert torch.equal(a[k], b[k]), k

def test_an_error_in_lr_find_comes_through_and_everything_is_put_back():
    class Explode(Callback):
        def after_loss(self, learn):
            if learn.iter == 1: raise RuntimeError('exploded')
    torch.manual_seed(0)
    learn = TrainLearner(nn.Linear(3, 2), tiny_dls(n_train=4), F.cross_entropy, lr=0.1, cbs=[Explode()])
    before = copy.deepcopy(learn.model.state_dict())
    with pytest.raises(RuntimeError, match='exploded'): learn.lr_find(plot=False)
    for k, v in learn.model.state_dict().items(): assert torch.equal(v, before[k]), k
    assert learn.opt is None
