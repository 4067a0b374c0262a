"""The callback protocol never hides an error: whatever fails, wherever, the user sees that error.

Every callback miniai ships is run in a stack of callbacks that belong together, and an exception is injected at each
event and inside each training step (from the model, the loss, autograd, the optimizer). The exception that comes out
of `fit` must be the injected one — same type, same message, with no note saying that a cleanup failed too — and
`fit` must leave nothing half-done: its callbacks removed, modes restored, no gradients, loggers given back.
"""
import signal
import warnings
from functools import partial
from types import SimpleNamespace

import fastcore.all as fc
import pytest
import torch
import torch.nn.functional as F
from torch import nn, optim
from torch.optim.lr_scheduler import OneCycleLR, StepLR
from torcheval.metrics import MulticlassAccuracy

from miniai.accel import EMACB, AccelerateCB, GradAccumCB, GradClipCB, MixedPrecision
from miniai.activations import ActivationStats, HooksCallback, append_stats
from miniai.augment import CapturePreds, TTD_CB
import importlib.util
from miniai.checkpoint import CheckpointCB, CSVLoggerCB, ResumeCB, TensorBoardCB
from miniai.ddpm import DDPMCB, DDPMCB2
from miniai.init import BatchTransformCB
from miniai.learner import (EVENTS, STEPS, CancelFitException, Callback, DeviceCB, LRFinderCB, Learner, MetricsCB,
                            MomentumLearner, ProgressCB, SingleBatchCB, TerminateOnNaNCB, TrainCB, TrainLearner)
from miniai.sgd import BaseSchedCB, BatchSchedCB, HasLearnCB, EpochSchedCB, ParamSchedCB, RecorderCB, _lr

class Injected(Exception): pass

TRAIN_ONLY = {'after_backward', 'after_step', 'backward', 'step', 'zero_grad'}
BATCH_LEVEL = {'before_batch', 'after_predict', 'after_loss', 'after_backward', 'after_step', 'after_batch',
               'cleanup_batch'}
EPOCH_LEVEL = {'before_epoch', 'after_epoch', 'cleanup_epoch'}

class Faults:
    "Where the model, loss or optimizer should fail, armed by `Arm` for one chosen batch; fires once."
    def __init__(self, where=None): self.where, self.armed = where, False
    def fire(self, where):
        if not (self.armed and self.where == where): return False
        self.armed, self.where = False, None
        return True

class Arm(Callback):
    "Arm `faults` at batch `at` of the chosen phase, before any other callback sees the batch."
    order = -1000
    def __init__(self, faults, at, train): self.faults, self.at, self.train = faults, at, train
    def before_batch(self, learn): self.faults.armed = learn.training == self.train and learn.iter == self.at

class _FailInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x): return x.clone()
    @staticmethod
    def backward(ctx, g): raise Injected('injected in backward')

class Faulty(nn.Module):
    "Wrap `model`: its forward fails for 'predict', its gradient for 'backward'."
    def __init__(self, model, faults):
        super().__init__()
        self.model, self.faults = model, faults
    def forward(self, *args):
        if self.faults.fire('predict'): raise Injected('injected in predict')
        out = self.model(*args)
        return _FailInBackward.apply(out) if self.faults.fire('backward') else out

def faulty_loss(loss_func, faults):
    def f(*args):
        if faults.fire('get_loss'): raise Injected('injected in get_loss')
        return loss_func(*args)
    return f

def faulty_opt(faults):
    class FaultySGD(optim.SGD):
        def step(self, closure=None):
            if faults.fire('step'): raise Injected('injected in step')
            return super().step(closure)
        def zero_grad(self, set_to_none=True):
            if faults.fire('zero_grad'): raise Injected('injected in zero_grad')
            super().zero_grad(set_to_none)
    return lambda ps, lr: FaultySGD(ps, lr=lr, momentum=0.9)

def injector(point, order, at, train):
    "A callback that raises `Injected` at event `point`: once, in the chosen batch (or epoch) of the chosen phase."
    def f(self, learn):
        if self.fired: return
        if point in BATCH_LEVEL and not (learn.training == train and learn.iter == at): return
        if point in EPOCH_LEVEL and learn.training != train: return
        self.fired = True
        raise Injected(f'injected at {point}')
    return type(f'Inject_{point}', (Callback,), {'order': order, 'fired': False, point: f})()

# --- the stacks: every shipped callback, with the callbacks it is used with

def cls_dls(n_train=3, n_valid=2, bs=4, n_in=6):
    torch.manual_seed(0)
    mk = lambda n: [(torch.randn(bs, n_in), torch.randint(0, 3, (bs,))) for _ in range(n)]
    return SimpleNamespace(train=mk(n_train), valid=mk(n_valid))

def mlp(n_in=6, drop=0.): return nn.Sequential(nn.Linear(n_in, 8), nn.ReLU(), nn.Dropout(drop), nn.Linear(8, 3))

HAVE_TB = importlib.util.find_spec('tensorboard') is not None  # TensorBoardCB's optional extra

class Stack:
    "How to build one Learner for the test: callbacks, model, loss, and where to inject."
    def __init__(self, cbs, model=mlp, loss=F.cross_entropy, learner=Learner, at=1, train=True, lr=0.05, unreachable=(),
                 setup=None):
        fc.store_attr()

    def make(self, faults, tmp):
        learn = self.learner(Faulty(self.model(), faults), cls_dls(), faulty_loss(self.loss, faults), lr=self.lr,
                             cbs=self.cbs(tmp), opt_func=faulty_opt(faults))
        fit_kw = self.setup(learn, tmp) if self.setup else {}
        return learn, fit_kw

class DDPMModel(nn.Module):
    "Predicts the noise from `(xt, t)`, as DDPMCB's batches give them."
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(6, 6)
    def forward(self, inp):
        xt, t = inp
        return self.lin(xt) + t[:, None].float()/1000

def with_checkpoints(learn, tmp):
    "Train once so there are checkpoints, then resume from the one after the first batch of epoch 0."
    learn.fit(1)
    return dict(cbs=[ResumeCB(tmp/'ckpt'/'ckpt-e0000-b000001.pt')])

class ScaledMP(MixedPrecision):
    "MixedPrecision that keeps a GradScaler in a CPU fp32 run, so the scaler's error paths are exercised too."
    def make_scaler(self): return torch.amp.GradScaler(self.device_type, **self.scaler_kwargs)

STACKS = {
    'standard': Stack(lambda tmp: [TrainCB(), DeviceCB('cpu'), MetricsCB(accuracy=MulticlassAccuracy()),
                                   ProgressCB(plot=True)]),
    'subclass': Stack(lambda tmp: [DeviceCB('cpu'), MetricsCB(), ProgressCB()], learner=TrainLearner),
    'momentum': Stack(lambda tmp: [MetricsCB(), ProgressCB()], learner=partial(MomentumLearner, mom=0.5),
                      # MomentumLearner's zero_grad scales the grads; the optimizer's never runs
                      unreachable=('zero_grad',)),
    'sgd': Stack(lambda tmp: [TrainCB(), BatchSchedCB(partial(OneCycleLR, max_lr=0.1, total_steps=3)),
                              EpochSchedCB(partial(StepLR, step_size=1)),
                              ParamSchedCB('momentum', lambda pos: 0.9 - pos/2),
                              RecorderCB(lr=_lr), HasLearnCB(), MetricsCB(), ProgressCB()]),
    'activations': Stack(lambda tmp: [TrainCB(), ActivationStats(fc.risinstance(nn.ReLU)),
                                      HooksCallback(append_stats, fc.risinstance(nn.Linear)), MetricsCB(),
                                      ProgressCB()]),
    'lr_finder': Stack(lambda tmp: [TrainCB(), LRFinderCB(), ProgressCB()], lr=1e-3),
    'mixed_precision': Stack(lambda tmp: [ScaledMP(), GradClipCB(1.0), GradAccumCB(2),
                                          MetricsCB(), ProgressCB()]),
    'mixed_precision_default': Stack(lambda tmp: [MixedPrecision(), MetricsCB(), ProgressCB()]),
    'accelerate': Stack(lambda tmp: [AccelerateCB(cpu=True), MetricsCB(accuracy=MulticlassAccuracy()), ProgressCB()]),
    'checkpoint': Stack(lambda tmp: [TrainCB(), EMACB(0.9), MetricsCB(), ProgressCB(),
                                     CheckpointCB(tmp/'ckpt', every_n_batches=1, keep=100, on_interrupt=True),
                                     CSVLoggerCB(tmp/'metrics.csv'), *([TensorBoardCB(tmp/'tb')] if HAVE_TB else [])],
                      setup=with_checkpoints),
    'ddpm': Stack(lambda tmp: [TrainCB(), DDPMCB(n_steps=20), DDPMCB2(), EMACB(0.9), MetricsCB(), ProgressCB()],
                  model=DDPMModel, loss=F.mse_loss),
    'augment_valid': Stack(lambda tmp: [TrainCB(), BatchTransformCB(lambda b: (b[0]*2, b[1])), TTD_CB(), CapturePreds(),
                                        TerminateOnNaNCB(), MetricsCB(), ProgressCB()],
                           model=partial(mlp, drop=0.5), train=False),
    'single_batch': Stack(lambda tmp: [TrainCB(), SingleBatchCB(), MetricsCB(), ProgressCB()], at=0,
                          unreachable=('after_epoch', 'after_fit')),  # SingleBatchCB cancels the fit before them
}

# cleanups depend on who was set up
POINTS = ([(p, o) for p in EVENTS if p.startswith('before_') for o in (-100, 200)] +
          [(p, 0) for p in EVENTS if not p.startswith('before_')] + [(p, None) for p in STEPS] +
          [('after_backward', 2)])  # after GradClipCB's unscale_, before the GradScaler's step

@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='MixedPrecision: training in fp32')
        warnings.filterwarnings('ignore', message='Detected call of `lr_scheduler.step()`')
        yield

@pytest.mark.parametrize('point,order', POINTS, ids=[f'{p}@{o}' for p, o in POINTS])
@pytest.mark.parametrize('name', list(STACKS))
def test_injected_error_is_the_one_the_user_sees(name, point, order, tmp_path, request):
    stack = STACKS[name]
    if name == 'accelerate': request.getfixturevalue('fresh_accelerate')
    if point in stack.unreachable: pytest.skip(f'{point} never runs in this stack')
    train = point in TRAIN_ONLY or stack.train
    faults = Faults(point if order is None else None)
    learn, fit_kw = stack.make(faults, tmp_path)
    learn.model.train()
    modes = [m.training for m in learn.model.modules()]
    cbs_before = list(learn.cbs)
    metrics = [cb for cb in learn.cbs if isinstance(cb, MetricsCB)]
    extra = [Arm(faults, stack.at, train)] + ([] if order is None else [injector(point, order, stack.at, train)])
    expected = f'injected in {point}' if order is None else f'injected at {point}'
    sigint = signal.getsignal(signal.SIGINT)

    with pytest.raises(Exception) as ei: learn.fit(1, **{**fit_kw, 'cbs': extra + fit_kw.get('cbs', [])})
    assert type(ei.value) is Injected and str(ei.value) == expected, repr(ei.value)
    assert not getattr(ei.value, '__notes__', None), ei.value.__notes__  # no cleanup failed on the way out
    assert learn.cbs == cbs_before, 'the callbacks passed to fit must be removed'
    assert [m.training for m in learn.model.modules()] == modes, 'train/eval modes must be as before fit'
    assert all(p.grad is None for p in learn.model.parameters()), 'no gradients of the failed step may be left'
    for m in metrics: assert 'logger' not in vars(m), 'ProgressCB must give MetricsCB its logger back'
    assert signal.getsignal(signal.SIGINT) is sigint, 'CheckpointCB(on_interrupt=True) must put the handler back'
    learn.fit(1)  # and the Learner still trains


def test_every_stack_runs_cleanly_without_injection(tmp_path, fresh_accelerate):
    "The stacks are sound: without a fault, each one fits (so every failure above is the injected one's doing)."
    for name, stack in STACKS.items():
        learn, fit_kw = stack.make(Faults(), tmp_path/name)
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            learn.fit(1, **fit_kw)

def test_every_shipped_callback_is_in_a_stack(tmp_path, fresh_accelerate):
    "A callback added to miniai later must get a stack here too."
    def subclasses(c): return {c} | {s for sub in c.__subclasses__() for s in subclasses(sub)}
    shipped = {c for c in subclasses(Callback) if c.__module__.startswith('miniai.') and not c.__name__.startswith('_')}
    shipped -= {Callback, BaseSchedCB}  # bases, not used as they are
    covered = {ResumeCB}
    for stack in STACKS.values(): covered |= {type(cb) for cb in stack.cbs(tmp_path)}
    if not HAVE_TB: covered.add(TensorBoardCB)  # an optional extra: in its stack where tensorboard is installed
    assert shipped - covered == set(), sorted(c.__name__ for c in shipped - covered)

def test_no_shipped_callback_has_a_misnamed_event_method():
    def subclasses(c): return {c} | {s for sub in c.__subclasses__() for s in subclasses(sub)}
    for c in subclasses(Callback):
        for nm in vars(c):
            if nm.startswith(('before_', 'after_', 'cleanup_')): assert nm in EVENTS, f'{c.__name__}.{nm}'

# --- the two paths users found, and the rules behind them

def test_device_cuda_on_a_cpu_machine_with_progress_gives_the_device_error():
    if torch.cuda.is_available(): pytest.skip('this machine has CUDA: DeviceCB("cuda") works here')
    metrics = MetricsCB()
    learn = Learner(nn.Linear(6, 3), cls_dls(), F.cross_entropy,
                    cbs=[TrainCB(), DeviceCB('cuda'), metrics, ProgressCB()])
    with pytest.raises(Exception) as ei: learn.fit(1)
    assert type(ei.value) is ValueError and 'no usable CUDA GPU' in str(ei.value), repr(ei.value)
    assert not getattr(ei.value, '__notes__', None)
    assert 'logger' not in vars(metrics)

class CourseSGD:
    "Written the way the course writes its optimizers: zero_grad assumes every parameter has a gradient."
    def __init__(self, params, lr): self.params, self.lr = list(params), lr
    def step(self):
        with torch.no_grad():
            for p in self.params: p -= self.lr*p.grad
    def zero_grad(self):
        for p in self.params: p.grad.data.zero_()

@pytest.mark.parametrize('where', ['predict', 'get_loss'])
def test_an_optimizer_whose_zero_grad_fails_on_missing_grads_does_not_replace_the_error(where):
    faults = Faults(where)
    learn = Learner(Faulty(nn.Linear(6, 3), faults), cls_dls(), faulty_loss(F.cross_entropy, faults),
                    cbs=[TrainCB(), Arm(faults, 0, True)], opt_func=CourseSGD)
    with pytest.raises(Exception) as ei: learn.fit(1)
    assert type(ei.value) is Injected and str(ei.value) == f'injected in {where}', repr(ei.value)

def trace(log, name, order, fail=False, before=True):
    def before_fit(self, learn):
        if fail: raise Injected(f'{name} failed')
        log.append(f'{name}.before')
    d = dict(order=order, cleanup_fit=lambda self, learn: log.append(f'{name}.cleanup'))
    if before: d['before_fit'] = before_fit
    return type(name, (Callback,), d)()

def test_cleanup_runs_only_for_callbacks_whose_before_ran():
    log = []
    cbs = [trace(log, 'A', 1), trace(log, 'B', 2, fail=True), trace(log, 'C', 3), trace(log, 'D', 4, before=False)]
    with pytest.raises(Injected, match='B failed'):
        Learner(nn.Linear(6, 3), cls_dls(), F.cross_entropy, cbs=[TrainCB(), *cbs]).fit(1)
    assert log == ['A.before', 'A.cleanup', 'D.cleanup']  # D has nothing to set up, so its cleanup always runs

class FailingCleanup(Callback):
    def __init__(self, msg='cleanup broke'): self.msg = msg
    def cleanup_epoch(self, learn): raise KeyError(self.msg)

@pytest.mark.skipif(not hasattr(Exception, 'add_note'), reason='notes need Python 3.11; 3.10 gets a warning instead')
def test_a_failing_cleanup_becomes_a_note_on_the_original_error():
    learn = Learner(nn.Linear(6, 3), cls_dls(), F.cross_entropy, cbs=[TrainCB()])
    bad = injector('after_loss', 0, 1, True)
    with pytest.raises(Injected, match='injected at after_loss') as ei:
        learn.fit(1, cbs=[bad, FailingCleanup('one'), FailingCleanup('two')])
    notes = getattr(ei.value, '__notes__', [])
    assert len(notes) == 2 and all('FailingCleanup.cleanup_epoch' in n for n in notes) and "'two'" in notes[1], notes

def test_a_failing_cleanup_without_an_earlier_error_is_raised():
    learn = Learner(nn.Linear(6, 3), cls_dls(), F.cross_entropy, cbs=[TrainCB()])
    with pytest.raises(KeyError, match='cleanup broke'): learn.fit(1, cbs=FailingCleanup())

def test_a_failing_cleanup_during_a_cancel_is_raised_not_swallowed():
    "A cancel is not an error: a cleanup that fails while one passes by must surface, not hide in a note on it."
    class FailingBatchCleanup(Callback):
        def cleanup_batch(self, learn): raise KeyError('cleanup broke')
    learn = Learner(nn.Linear(6, 3), cls_dls(), F.cross_entropy, cbs=[TrainCB()])
    with pytest.raises(KeyError, match='cleanup broke'): learn.fit(1, cbs=[SingleBatchCB(), FailingBatchCleanup()])

LR_FIND_POINTS = [(None, None), ('after_loss', 0), ('after_backward', 2), ('step', None), ('cleanup_fit', 0)]

@pytest.mark.parametrize('point,order', LR_FIND_POINTS, ids=[f'{p}@{o}' for p, o in LR_FIND_POINTS])
def test_lr_find_around_a_mixed_precision_fit_leaves_every_callback_as_it_was(point, order, tmp_path):
    "lr_find, finishing or failing anywhere, gives back the GradScaler's scale and growth count and every other state."
    faults = Faults(point if order is None else None)
    learn, _ = STACKS['mixed_precision'].make(faults, tmp_path)
    learn.fit(1)
    states = lambda: {type(cb).__name__: repr(cb.state_dict()) for cb in learn.cbs if hasattr(cb, 'state_dict')}
    before = states()
    assert 'ScaledMP' in before
    extra = [Arm(faults, 1, True)] + ([] if point is None or order is None else [injector(point, order, 1, True)])
    for cb in extra: learn.add_cb(cb)
    try: learn.lr_find(plot=False)
    except Injected: pass
    for cb in extra: learn.rm_cb(cb)
    assert faults.where is None and all(getattr(cb, 'fired', True) for cb in extra), 'the fault must have fired'
    assert states() == before
    learn.fit(1)  # and the Learner still trains

@pytest.mark.skipif(not hasattr(Exception, 'add_note'), reason='notes need Python 3.11; 3.10 gets a warning instead')
def test_restoring_state_after_lr_find_fails_cannot_hide_its_error():
    learn = Learner(nn.Linear(6, 3), cls_dls(), F.cross_entropy, cbs=[TrainCB(), injector('after_loss', 0, 1, True)])
    learn.model.load_state_dict = lambda sd: (_ for _ in ()).throw(RuntimeError('restore broke'))
    with pytest.raises(Injected) as ei: learn.lr_find(plot=False)
    notes = getattr(ei.value, '__notes__', [])
    assert any('restore broke' in n for n in notes), notes

# --- callback method names are checked

def test_a_misspelt_event_method_is_refused_with_the_likely_name():
    class Typo(Callback):
        def after_batc(self, learn): pass
    with pytest.raises(ValueError, match="did you mean 'after_batch'"):
        Learner(nn.Linear(6, 3), cls_dls(), cbs=[Typo()])
    class Typo2(Callback):
        def before_predict(self, learn): pass
    with pytest.raises(ValueError, match="before_predict"):
        Learner(nn.Linear(6, 3), cls_dls()).fit(1, cbs=[TrainCB(), Typo2()])

def test_a_misspelt_method_set_on_an_instance_is_refused_too():
    cb = Callback()
    cb.cleanup_fitt = lambda learn: None
    with pytest.raises(ValueError, match="did you mean 'cleanup_fit'"): Learner(nn.Linear(6, 3), cls_dls()).add_cb(cb)

def test_helpers_and_plain_attributes_are_not_taken_for_events():
    class Fine(Callback):
        after_fit_message = 'done'          # not a method
        def _after_batch_plot(self): pass  # a private helper
        def after_batch(self, learn): pass
    Learner(nn.Linear(6, 3), cls_dls(), cbs=[Fine()])
