"Tests for miniai.accel: MixedPrecision, GradAccumCB, GradClipCB and their combinations, AccelerateCB, MultDL."
import inspect
import json
import math
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import miniai.accel as accel
from miniai.accel import EMACB, AccelerateCB, GradAccumCB, GradClipCB, MixedPrecision, MultDL
from miniai.datasets import DataLoaders
from miniai.learner import CancelBatchException, Callback, DeviceCB, Learner, MetricsCB, ProgressCB, TrainCB

SCRIPT = Path(__file__).parent/'scripts'/'accel_train.py'
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')
cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason='checks the CPU-only behaviour')

# ---------------------------------------------------------------- helpers

def data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 20, generator=g), torch.randint(0, 5, (n,), generator=g)

def dls(n=64, bs=16, n_valid=32):
    "Plain in-order loaders over random data: batches are the same on every call."
    x, y = data(n + n_valid)
    return DataLoaders(DataLoader(TensorDataset(x[:n], y[:n]), bs), DataLoader(TensorDataset(x[n:], y[n:]), bs))

def model(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))

def flat_grad(m): return torch.cat([p.grad.flatten() for p in m.parameters()])
def flat_weights(m): return torch.cat([p.detach().flatten() for p in m.parameters()])

def big_batch_grad(n=64):
    "The fp32 gradient of the mean loss over the first `n` training samples, in one batch."
    m, (x, y) = model(), data(n + 32)
    F.cross_entropy(m(x[:n]), y[:n]).backward()
    return flat_grad(m)

class GradSpyCB(Callback):
    "Copy the gradients just before each real optimizer step (after clipping), and count the steps."
    order = 10
    def before_fit(self, learn): self.grads = []
    def after_backward(self, learn):
        if getattr(learn, 'will_step', True): self.grads.append(flat_grad(learn.model).clone())

class LossesCB(Callback):
    order = 5
    def before_fit(self, learn): self.losses = []
    def after_batch(self, learn):
        if learn.training: self.losses.append(learn.loss.item())

class StepCounterCB(Callback):
    "Count real optimizer steps by wrapping the optimizer's own `step` (zero_grad too)."
    def before_fit(self, learn):
        self.steps = self.zero_grads = 0
        opt = learn.opt
        step, zero = opt.step, opt.zero_grad
        def counted_step(*a, **k):
            self.steps += 1
            return step(*a, **k)
        def counted_zero(*a, **k):
            self.zero_grads += 1
            return zero(*a, **k)
        opt.step, opt.zero_grad = counted_step, counted_zero

def fit(*cbs, m=None, d=None, lr=0.1, **kw):
    learn = Learner(m or model(), d or dls(), F.cross_entropy, lr=lr, cbs=list(cbs))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # MixedPrecision's fp32-fallback notice, tested on its own below
        learn.fit(kw.pop('n_epochs', 1), **kw)
    return learn

@pytest.fixture(autouse=True)
def cpu_without_bf16(monkeypatch):
    """Every test sees a CPU without native bf16 unless it asks otherwise, so MixedPrecision's CPU path is fp32 (exact
    comparisons against TrainCB) on any machine; `native_bf16` below tests the other kind of CPU."""
    monkeypatch.setattr(accel, 'cpu_has_bf16', lambda: False)

@pytest.fixture
def native_bf16(monkeypatch):
    "Pretend the CPU computes bf16 natively (it is emulated, and slow, where it doesn't; the models here are tiny)."
    monkeypatch.setattr(accel, 'cpu_has_bf16', lambda: True)

def give_scaler(monkeypatch):
    "Give MixedPrecision a GradScaler whatever the precision, so the scaler's logic (fp16's) runs on a CPU too."
    monkeypatch.setattr(MixedPrecision, 'make_scaler',
                        lambda self: torch.amp.GradScaler(self.device_type, **self.scaler_kwargs))

@pytest.fixture
def always_scaler(monkeypatch): give_scaler(monkeypatch)

# ---------------------------------------------------------------- MixedPrecision

@cpu_only
def test_cpu_falls_back_to_fp32_with_one_warning():
    mp, ref, losses = MixedPrecision(), LossesCB(), LossesCB()
    fit(TrainCB(), ref)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn = Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[mp, losses])
        learn.fit(1)
        first = losses.losses
        learn.fit(2)
    msgs = [str(w.message) for w in ws if 'MixedPrecision' in str(w.message)]
    assert len(msgs) == 1, msgs  # once for the Learner: not per batch, not per fit
    assert 'fp32' in msgs[0] and 'bf16' in msgs[0]
    assert mp.amp_dtype is None and mp.scaler is None
    assert first == ref.losses  # plain fp32, identical to TrainCB

@cpu_only
def test_cpu_with_native_bf16_autocasts_quietly(native_bf16):
    mp, ref, losses, seen = MixedPrecision(), LossesCB(), LossesCB(), []
    class DtypeCB(Callback):
        def after_predict(self, learn): seen.append(learn.preds.dtype)
    fit(TrainCB(), ref)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[mp, losses, DtypeCB()]).fit(1)
    assert not [w for w in ws if 'MixedPrecision' in str(w.message)]
    assert mp.amp_dtype == torch.bfloat16 and mp.scaler is None
    assert set(seen) == {torch.bfloat16}  # train and valid forward passes both autocast
    assert losses.losses != ref.losses  # really not fp32...
    torch.testing.assert_close(losses.losses, ref.losses, rtol=5e-2, atol=0)  # ...but the same training
    assert torch.is_autocast_enabled('cpu') is False

@cpu_only
def test_fp16_on_cpu_is_refused():
    with pytest.raises(ValueError, match="fp16 is a CUDA GPU feature"):
        fit(MixedPrecision(dtype='fp16'))

def test_bad_arguments():
    with pytest.raises(ValueError, match="one of 'auto', 'fp16', 'bf16'"): MixedPrecision(dtype='float16')
    with pytest.raises(TypeError, match="GradScaler"): MixedPrecision(init_scal=2.**10)  # a typo, caught at once
    for bad in (0, True, 2.0):  # a bool is not a number of batches
        with pytest.raises(ValueError, match="whole number >= 1"): GradAccumCB(bad)
    for bad in (-1, True):
        with pytest.raises(ValueError, match=r"max_norm must be a number in \(0, inf\)"): GradClipCB(bad)
    with pytest.raises(ValueError, match="remove those"): fit(TrainCB(), MixedPrecision())

@pytest.mark.parametrize('cls', [MixedPrecision, GradAccumCB, GradClipCB, AccelerateCB, MultDL])
def test_no_private_arguments_in_signatures(cls):
    "Tests reach the hard-to-reach paths by patching, not through hidden arguments of the public API."
    assert not [p for p in inspect.signature(cls).parameters if p.startswith('_')]

@cpu_only
def test_bf16_by_name_on_slow_cpu_autocasts_with_one_warning():
    mp, dtypes = MixedPrecision(dtype='bf16'), []
    class DtypeCB(Callback):
        def after_predict(self, learn): dtypes.append(learn.preds.dtype)
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        learn = Learner(model(), dls(16), F.cross_entropy, lr=0.1, cbs=[mp, DtypeCB()])
        learn.fit(1); learn.fit(1)
    msgs = [str(w.message) for w in ws if 'MixedPrecision' in str(w.message)]
    assert len(msgs) == 1 and 'emulates' in msgs[0], msgs
    assert set(dtypes) == {torch.bfloat16} and mp.scaler is None

def test_autocast_covers_only_forward_and_loss(native_bf16):
    "Callbacks ordered after MixedPrecision still run outside autocast; only predict and get_loss are inside."
    seen = set()
    class WatchCB(Callback):
        order = MixedPrecision.order + 1
        def before_batch(self, learn): seen.add(('before_batch', torch.is_autocast_enabled('cpu')))
        def after_predict(self, learn): seen.add(('preds', learn.preds.dtype))
        def after_loss(self, learn): seen.add(('after_loss', torch.is_autocast_enabled('cpu')))
        def after_backward(self, learn): seen.add(('after_backward', torch.is_autocast_enabled('cpu')))
    fit(MixedPrecision(), WatchCB(), m=model().cpu())
    assert seen == {('before_batch', False), ('preds', torch.bfloat16), ('after_loss', False),
                    ('after_backward', False)}

@pytest.mark.parametrize('where', ['forward', 'loss', 'cancel'])
def test_autocast_is_off_after_a_failing_batch(where, native_bf16):
    class Model(nn.Module):
        "Note whether autocast is on in the forward pass; fail or cancel there if asked."
        def __init__(self):
            super().__init__()
            self.body = model()
        def forward(self, x):
            self.on = torch.is_autocast_enabled('cpu')
            if where == 'forward': raise RuntimeError('boom')
            if where == 'cancel': raise CancelBatchException()
            return self.body(x)
    def bad_loss(preds, y):
        bad_loss.on = torch.is_autocast_enabled('cpu')
        raise RuntimeError('boom')
    m = Model()
    learn = Learner(m, dls(16), bad_loss if where == 'loss' else F.cross_entropy, cbs=[MixedPrecision()])
    if where == 'cancel': learn.fit(1)
    else:
        with pytest.raises((RuntimeError, ValueError), match='boom'): learn.fit(1)  # TrainCB wraps loss errors
    assert m.on is True  # autocast really was on during the forward pass
    if where == 'loss': assert bad_loss.on is True  # ...and during the loss
    assert torch.is_autocast_enabled('cpu') is False
    assert torch.is_autocast_enabled() is False

class PoisonCB(Callback):
    "Put an inf into a gradient of training batch `i` of each epoch, as an fp16 overflow does (the loss stays finite)."
    def __init__(self, i): self.i = i
    def after_backward(self, learn):
        if learn.iter == self.i: next(learn.model.parameters()).grad.view(-1)[0] = math.inf

class WeightsCB(Callback):
    order = 10
    def before_fit(self, learn): self.ws = []
    def after_batch(self, learn):
        if learn.training: self.ws.append(flat_weights(learn.model).clone())

def test_scaler_counts_skipped_steps_and_survives_fits(always_scaler):
    # The CPU has a GradScaler too: the fixture turns it on while the model stays fp32
    mp, ws, poison = MixedPrecision(), WeightsCB(), PoisonCB(1)
    learn = fit(mp, ws, poison, m=model().cpu(), valid=False)
    assert mp.skipped_steps == 1
    assert mp.scaler.get_scale() == 2.**15
    assert torch.equal(ws.ws[1], ws.ws[0]) and not torch.equal(ws.ws[2], ws.ws[1])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, valid=False)  # poisoned again: a second skip, counted on top of the first
    assert mp.skipped_steps == 2
    assert mp.scaler.get_scale() == 2.**14  # halved from where the first fit left it, not from 2**16
    learn.rm_cb(poison)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, valid=False)
    assert mp.skipped_steps == 2 and mp.scaler.get_scale() == 2.**14
    assert not hasattr(learn, 'scaler')

def test_skipped_steps_are_reported_at_the_end_of_each_fit(always_scaler):
    mp = MixedPrecision()
    learn = Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[mp, PoisonCB(1)])
    for n in (1, 2):
        with pytest.warns(UserWarning,
                          match=r"MixedPrecision: 1 step\(s\) skipped for inf/NaN gradients in this fit") as ws:
            learn.fit(1, valid=False)
        assert len([w for w in ws if 'skipped' in str(w.message)]) == 1 and mp.skipped_steps == n

class NaNLossCB(Callback):
    "Make the loss of training batch 1 NaN."
    def after_loss(self, learn):
        if learn.training and learn.iter == 1: learn.loss = learn.loss*math.nan

@pytest.mark.parametrize('precision', ['fp32', 'bf16', 'fp16'])
def test_a_nan_loss_raises_in_every_precision(precision, monkeypatch):
    if precision == 'bf16': monkeypatch.setattr(accel, 'cpu_has_bf16', lambda: True)
    if precision == 'fp16': give_scaler(monkeypatch)
    learn = Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[MixedPrecision(), NaNLossCB()])
    with warnings.catch_warnings(), pytest.raises(FloatingPointError,
                                                  match='the loss is NaN or infinite at epoch 0, batch 1'):
        warnings.simplefilter('ignore')
        learn.fit(1)
    assert torch.isfinite(flat_weights(learn.model)).all()

def test_skips_are_counted_without_waiting_for_the_device(always_scaler, monkeypatch):
    "No get_scale() (a GPU sync) per step: the skips are counted in a tensor, read when asked."
    calls = []
    get_scale = torch.amp.GradScaler.get_scale
    monkeypatch.setattr(torch.amp.GradScaler, 'get_scale', lambda self: calls.append(1) or get_scale(self))
    mp = MixedPrecision()
    fit(mp, PoisonCB(1), valid=False)
    assert calls == [] and mp.skipped_steps == 1

class InterruptCB(Callback):
    "Ctrl-C between GradClipCB's unscale_ (order 1) and the scaler's step, at training batch 1."
    order = 2
    def after_backward(self, learn):
        if learn.iter == 1: raise KeyboardInterrupt()

def test_an_interrupt_between_unscale_and_step_leaves_a_clean_scaler(always_scaler):
    mp, clip = MixedPrecision(init_scale=2.**10), GradClipCB(1.0)
    learn = Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[mp, clip])
    with pytest.raises(KeyboardInterrupt): learn.fit(1, cbs=InterruptCB())
    with pytest.raises(KeyboardInterrupt): learn.fit(1, cbs=InterruptCB())
    assert mp.scaler.get_scale() == 2.**10 and mp.scaler.state_dict()['_growth_tracker'] == 2  # kept
    learn.fit(1)  # no "unscale_() has already been called"
    assert mp.scaler.state_dict()['_growth_tracker'] == 6 and mp.skipped_steps == 0

@needs_cuda
def test_cuda_fp16_skips_and_counts():
    mp, ws = MixedPrecision(), WeightsCB()
    learn = Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB('cuda'), mp, ws, PoisonCB(1)])
    learn.fit(1, valid=False)
    assert mp.amp_dtype == torch.float16 and mp.use_scaler
    n, scale = mp.skipped_steps, mp.scaler.get_scale()
    assert n >= 1 and scale <= 2.**15
    assert torch.equal(ws.ws[1], ws.ws[0])
    learn.fit(1, valid=False)
    assert mp.skipped_steps >= n + 1 and mp.scaler.get_scale() <= scale/2  # on from where the first fit left it

@needs_cuda
def test_cuda_bf16_has_no_scaler():
    if not torch.cuda.is_bf16_supported(): pytest.skip('GPU without bf16')
    mp = MixedPrecision(dtype='bf16')
    learn = Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB('cuda'), mp])
    learn.fit(1)
    assert mp.amp_dtype == torch.bfloat16 and mp.scaler is None

def test_bf16_on_a_gpu_needs_compute_capability_8_of_the_models_gpu(monkeypatch):
    "is_bf16_supported() counts emulation and looks at the current GPU: the check asks the model's GPU instead."
    asked = []
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None: asked.append(d) or (7, 5))
    with pytest.raises(ValueError, match=r"cuda:1 has no native bf16 \(it needs compute capability 8.0\)"):
        accel._precision('bf16', torch.device('cuda', 1), 'MixedPrecision', 'use auto')
    assert asked == [torch.device('cuda', 1)]
    monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda d=None: (8, 0))
    assert accel._precision('bf16', torch.device('cuda', 0), 'MixedPrecision', 'use auto') == 'bf16'

# ---------------------------------------------------------------- GradAccumCB, GradClipCB, and combinations

def test_accumulating_n_batches_equals_one_big_batch():
    spy = GradSpyCB()
    fit(TrainCB(), GradAccumCB(4), spy, d=dls(64, bs=16), valid=False)
    assert len(spy.grads) == 1
    torch.testing.assert_close(spy.grads[0], big_batch_grad(64), rtol=1e-5, atol=1e-6)

def test_accumulation_steps_zero_grad_and_true_loss():
    # 10 batches of 8 with n=4: groups of 4, 4 and (the epoch's last) 2
    steps, losses = StepCounterCB(), LossesCB()
    fit(TrainCB(), GradAccumCB(4), steps, losses, d=dls(80, bs=8), valid=False)
    assert steps.steps == 3 and steps.zero_grads == 3
    # the logged loss is each batch's true loss: the first group's match an untrained model's
    m, (x, y) = model(), data(80 + 32)
    with torch.no_grad(): first = [F.cross_entropy(m(x[i*8:(i+1)*8]), y[i*8:(i+1)*8]).item() for i in range(4)]
    torch.testing.assert_close(losses.losses[:4], first, rtol=1e-5, atol=1e-6)
    assert len(losses.losses) == 10

def test_last_short_group_is_a_mean():
    spy = GradSpyCB()
    learn = fit(TrainCB(), GradAccumCB(4), spy, d=dls(48, bs=8), lr=1e-9, valid=False)  # groups 4 and 2
    assert len(spy.grads) == 2
    m, (x, y) = model(), data(48 + 32)
    F.cross_entropy(m(x[32:48]), y[32:48]).backward()  # the last two batches as one (lr tiny: weights ~unchanged)
    torch.testing.assert_close(spy.grads[1], flat_grad(m), rtol=1e-4, atol=1e-6)

def test_accumulation_carries_no_grads_into_next_fit_after_error():
    class BoomCB(Callback):
        def after_backward(self, learn):
            if learn.iter == 1: raise RuntimeError('boom')
    learn = Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[TrainCB(), GradAccumCB(4), BoomCB()])
    with pytest.raises(RuntimeError): learn.fit(1)
    assert not type(learn.opt).__name__.startswith('_NoStep')  # the real optimizer is back
    assert not hasattr(learn, 'will_step')

def test_clip_sees_unscaled_norm(always_scaler):
    clip, spy, mp = GradClipCB(0.05), GradSpyCB(), MixedPrecision()
    fit(mp, clip, spy, m=model().cpu(), d=dls(64, bs=64), valid=False)
    assert mp.scaler.get_scale() == 2.**16
    torch.testing.assert_close(clip.norm, big_batch_grad().norm(), rtol=1e-4, atol=0)
    torch.testing.assert_close(spy.grads[0].norm(), torch.tensor(0.05), rtol=1e-4, atol=0)

def clipped(g, max_norm): return g*min(1., max_norm/(g.norm().item() + 1e-6))

@pytest.mark.parametrize('combo', ['mp+clip', 'mp+accum', 'clip+accum', 'mp+clip+accum'])
def test_combinations(combo, always_scaler):
    "Each pair and the triple give the gradient (at the one step) of one fp32 batch of 64, clipped if asked."
    use_mp, use_clip, use_accum = 'mp' in combo, 'clip' in combo, 'accum' in combo
    mp = MixedPrecision() if use_mp else None
    clip, spy, steps = GradClipCB(0.05), GradSpyCB(), StepCounterCB()
    cbs = [mp or TrainCB(), spy, steps] + ([clip] if use_clip else []) + ([GradAccumCB(4)] if use_accum else [])
    fit(*cbs, m=model().cpu(), d=dls(64, bs=16 if use_accum else 64), valid=False)
    ref = big_batch_grad()
    assert len(spy.grads) == 1 and steps.steps == 1
    if use_clip: torch.testing.assert_close(clip.norm, ref.norm(), rtol=1e-4, atol=0)
    # Without a clip nothing unscales before the step (scaler.step does it inside), so .grad holds 2**16 × the gradient
    expected = clipped(ref, 0.05) if use_clip else ref*2.**16 if use_mp else ref
    torch.testing.assert_close(spy.grads[0], expected, rtol=1e-4, atol=1e-7*expected.abs().max().item())
    if use_mp: assert mp.scaler.get_scale() == 2.**16 and mp.skipped_steps == 0

def test_scaler_steps_once_per_group(always_scaler):
    "With accumulation, scaler.step/update run once per group, so the whole group is at one scale."
    class UpdateCounterCB(Callback):
        order = MixedPrecision.order + 1
        def before_fit(self, learn):  # runs after MixedPrecision.before_fit has published the scaler
            self.n, update = 0, learn.scaler.update
            def counted(*a, **k):
                self.n += 1
                return update(*a, **k)
            learn.scaler.update = counted
    mp, spy, upd = MixedPrecision(), GradSpyCB(), UpdateCounterCB()
    fit(mp, GradAccumCB(4), spy, upd, m=model().cpu(), d=dls(64, bs=16), valid=False)
    assert upd.n == 1
    torch.testing.assert_close(spy.grads[0]/2.**16, big_batch_grad(), rtol=1e-4, atol=1e-7)

# ---------------------------------------------------------------- AccelerateCB

def test_accelerate_prepares_once(fresh_accelerate):
    cb, ref, losses = AccelerateCB(mixed_precision='no'), LossesCB(), LossesCB()
    n = []
    prepare = cb.acc.prepare
    cb.acc.prepare = lambda *a, **k: (n.append(len(a)), prepare(*a, **k))[1]
    learn = Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[cb, losses])
    learn.fit(1); first = losses.losses
    learn.fit(1)
    assert n == [2, 1, 1]  # the model and optimizer, then each DataLoader: all on the first fit only
    fit(TrainCB(), ref, n_epochs=2)
    torch.testing.assert_close(first + losses.losses, ref.losses, rtol=1e-5, atol=1e-6)
    learn.fit(1, reset_opt=True)  # a new optimizer is prepared on its own
    assert n == [2, 1, 1, 1]  # and a new optimizer on its own

def test_accelerate_accumulation_and_clipping_match_callbacks(fresh_accelerate):
    cb, steps = AccelerateCB(mixed_precision='no', gradient_accumulation_steps=4, max_norm=0.05), StepCounterCB()
    learn = Learner(model(), dls(64, bs=16), F.cross_entropy, lr=0.1, cbs=[cb])
    learn.fit(1, valid=False)
    clip = GradClipCB(0.05)
    own = fit(TrainCB(), GradAccumCB(4), clip, d=dls(64, bs=16), valid=False)
    torch.testing.assert_close(cb.grad_norm, clip.norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(flat_weights(learn.model), flat_weights(own.model), rtol=1e-5, atol=1e-7)

@cpu_only
def test_accelerate_fp16_on_cpu_is_refused(fresh_accelerate):
    with pytest.raises(ValueError, match="silently trains in fp32.*mixed_precision='auto'"):
        AccelerateCB(mixed_precision='fp16')
    AccelerateCB()  # and the refusal left accelerate's state free for another setting

def test_accelerate_bad_arguments(fresh_accelerate):
    with pytest.raises(ValueError, match="one of 'auto', 'no', 'fp16', 'bf16'"): AccelerateCB(mixed_precision='fp8')
    for bad in (0, True):
        with pytest.raises(ValueError, match="gradient_accumulation_steps must be a whole number >= 1"):
            AccelerateCB(gradient_accumulation_steps=bad)
    for bad in (0, -1., True):
        with pytest.raises(ValueError, match="max_norm"): AccelerateCB(max_norm=bad)

def test_accelerate_auto_precision(fresh_accelerate, monkeypatch):
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION', raising=False)
    cb = AccelerateCB()
    assert cb.mixed_precision == ('fp16' if torch.cuda.is_available() else 'no')  # this CPU has no native bf16
    assert cb.acc.mixed_precision == cb.mixed_precision

@cpu_only
def test_accelerate_auto_precision_on_native_bf16_cpu(fresh_accelerate, monkeypatch, native_bf16):
    monkeypatch.delenv('ACCELERATE_MIXED_PRECISION', raising=False)
    assert AccelerateCB().mixed_precision == 'bf16'

def test_accelerate_auto_follows_the_launcher(fresh_accelerate, monkeypatch):
    "Under `accelerate launch --mixed_precision X`, 'auto' is X, as for a plain Accelerator()."
    monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'no')
    assert AccelerateCB().mixed_precision == 'no'
    if not torch.cuda.is_available():
        monkeypatch.setenv('ACCELERATE_MIXED_PRECISION', 'fp16')
        with pytest.raises(ValueError, match="accelerate launch --mixed_precision fp16 on the CPU.*"
                                             "launch with --mixed_precision no"):
            AccelerateCB()

@cpu_only
def test_accelerate_bf16_on_slow_cpu_warns(fresh_accelerate):
    with pytest.warns(UserWarning, match="many times slower.*mixed_precision='auto'"):
        AccelerateCB(mixed_precision='bf16')

def test_accelerate_refuses_clashing_callbacks(fresh_accelerate):
    for other in (GradClipCB(), GradAccumCB(2), TrainCB()):
        with pytest.raises(ValueError, match="remove"): fit(AccelerateCB(), other)

@pytest.mark.parametrize('main', [True, False])
def test_only_the_main_process_reports(main, fresh_accelerate, monkeypatch, capsys):
    "On other processes the fit prints nothing; MetricsCB still computes, and no callback is changed afterwards."
    monkeypatch.setattr(Accelerator, 'is_main_process', property(lambda self: main))
    metrics, progress = MetricsCB(), ProgressCB()
    learn = Learner(model(), dls(), F.cross_entropy, lr=0.1,
                    cbs=[AccelerateCB(mixed_precision='no'), metrics, progress])
    print('before')
    learn.fit(2)
    print('after')
    out = capsys.readouterr().out.split('\n')
    assert out[0] == 'before' and out[-2:] == ['after', '']
    assert len(out) == (3 + 1 + 4 if main else 3)  # the main process prints a header and 4 rows
    assert len(metrics.history) == 4
    assert metrics.logger is print and 'log_row' not in vars(progress)  # back as they were

@pytest.mark.parametrize('where', ['before_fit', 'after_batch'])
def test_other_processes_get_stdout_back_after_an_error(where, fresh_accelerate, monkeypatch, capsys):
    monkeypatch.setattr(Accelerator, 'is_main_process', property(lambda self: False))
    class BoomCB(Callback):
        order = 50  # after AccelerateCB has sent stdout away
        def before_fit(self, learn):
            if where == 'before_fit': raise RuntimeError('boom')
        def after_batch(self, learn):
            if where == 'after_batch' and learn.iter == 1: raise RuntimeError('boom')
    learn = Learner(model(), dls(), F.cross_entropy, lr=0.1,
                    cbs=[AccelerateCB(mixed_precision='no'), MetricsCB(), BoomCB()])
    with pytest.raises(RuntimeError, match='boom'): learn.fit(1)
    print('after')
    assert capsys.readouterr().out == 'after\n'

def test_the_training_step_callbacks_refuse_a_learner_that_overrides_the_step(fresh_accelerate):
    from miniai.learner import TrainLearner
    for cb in (MixedPrecision(), AccelerateCB(mixed_precision='no')):
        with pytest.raises(ValueError, match='needs a plain Learner'):
            TrainLearner(model(), dls(), F.cross_entropy, cbs=[cb]).fit(1)

def test_several_processes_share_tensordls_and_refuse_other_loaders(fresh_accelerate, monkeypatch):
    ("With (pretend) 2 processes, a TensorDL batch too small to share and a loader that can't be shared "
     "fail before training.")
    from miniai.datasets import TensorDL
    monkeypatch.setattr(Accelerator, 'num_processes', property(lambda self: 2))
    x, y = torch.randint(0, 256, (65, 4, 5), dtype=torch.uint8), torch.randint(0, 5, (65,))
    tiny = DataLoaders(TensorDL(x, y, bs=32, flat=True), TensorDL(x, y, bs=64, flat=True))  # last batches of 1
    with pytest.raises(ValueError, match='too small to share between 2 processes; pick another bs'):
        Learner(model(), tiny, F.cross_entropy, cbs=[AccelerateCB(mixed_precision='no')]).fit(1)
    other = DataLoaders(MultDL(dls().train), dls().valid)
    with pytest.raises(TypeError, match="can't share a MultDL between 2 processes"):
        Learner(model(), other, F.cross_entropy, cbs=[AccelerateCB(mixed_precision='no')]).fit(1)

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def test_two_processes(tmp_path, monkeypatch, fresh_accelerate):
    """Two CPU processes with gloo: no hang, the same weights on both, and the losses and accuracy of one process.

    `accelerate launch --cpu` starts several processes only through MPI; `--multi_gpu` starts them with torchrun, and
    ACCELERATE_USE_CPU=1 makes each one use the CPU and the gloo backend."""
    port = free_port()
    env = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1', 'MASTER_PORT': str(port),
           'PYTHONWARNINGS': 'ignore'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(port), str(SCRIPT), str(tmp_path)]
    try: res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e: pytest.fail(f'the two processes hung (no result in {e.timeout}s)')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # Only the main process prints ProgressCB's table: one header per run, and 2 epochs × (train, eval) rows each
    lines = res.stdout.splitlines()
    assert sum(l.startswith('MulticlassAccuracy') for l in lines) == 2, res.stdout
    assert sum(l.split()[-1:] == ['eval'] for l in lines) == 4, res.stdout

    # The reference: one process, same global batches
    monkeypatch.setenv('ACCELERATE_USE_CPU', '1')
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import accel_train
        ref_dir = tmp_path/'single'; ref_dir.mkdir()
        ref_w, ref = accel_train.train(ref_dir, even_batches=False)
    finally: sys.path.remove(str(SCRIPT.parent))
    assert ref['num_processes'] == 1

    for tag in ('uneven', 'even'):
        w0, w1 = (torch.load(tmp_path/f'{tag}_weights_{r}.pt') for r in (0, 1))
        for k in w0: assert torch.equal(w0[k], w1[k]), (tag, k)  # DDP kept the two copies identical
        m0, m1 = (json.loads((tmp_path/f'{tag}_metrics_{r}.json').read_text()) for r in (0, 1))
        assert m0 == m1  # both processes computed the same gathered metrics
        assert m0['num_processes'] == 2
        assert m0['n_valid_seen'] == accel_train.N_VALID  # no sample counted twice in the uneven last batch
        if tag == 'uneven':
            # Each process sees exactly its part of a single process's batches, and AccelerateCB weights the uneven
            # last batch's shares (23 and 22 samples) by size: the same training up to float rounding.
            for h, r in zip(m0['history'], ref['history'], strict=True):
                assert (h['epoch'], h['train']) == (r['epoch'], r['train'])
                assert h['loss'] == pytest.approx(r['loss'], rel=1e-4), (h, r)
                assert h['MulticlassAccuracy'] == pytest.approx(r['MulticlassAccuracy'], abs=1e-6), (h, r)
            for k in w0: torch.testing.assert_close(w0[k], ref_w[k].cpu(), rtol=1e-4, atol=1e-5)
        else:
            # accelerate's default fills the last batch up with 19 repeated samples, which changes those two steps:
            # the losses stay within a few percent (accuracy on 101 samples is too coarse to compare)
            for h, r in zip(m0['history'], ref['history'], strict=True):
                assert h['loss'] == pytest.approx(r['loss'], rel=5e-2), (h, r)

USER_SCRIPT = """
import json, sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn
from torcheval.metrics import MulticlassAccuracy

from miniai.accel import AccelerateCB, GradAccumCB
from miniai.datasets import fashion_dls
from miniai.learner import Callback, DeviceCB, Learner, MetricsCB, TrainCB
from miniai.recipe import cnn_classifier

def gn_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, 2, 1), nn.GroupNorm(4, 8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1),
                         nn.GroupNorm(4, 16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))

class SeenCB(Callback):
    "The labels of each training batch this process computes on, before AccelerateCB gathers them."
    order = AccelerateCB.order + 1
    def before_fit(self, learn): self.seen = []
    def after_predict(self, learn):
        if learn.training: self.seen.append(learn.batch[1].tolist())

def run(*cbs):
    seen, metrics = SeenCB(), MetricsCB(accuracy=MulticlassAccuracy())
    learn = Learner(gn_model(), fashion_dls(bs=65, seed=1), F.cross_entropy, lr=0.05, cbs=[*cbs, seen, metrics])
    dls = learn.dls
    learn.fit(1)
    assert learn.dls is dls  # the user's loaders are back after the fit
    return learn, seen.seen, metrics.history

out = Path(sys.argv[1])
# The issue's example as a user writes it: a batch-norm CNN on miniai's own loaders
Learner(cnn_classifier(), fashion_dls(bs=64), F.cross_entropy, cbs=[AccelerateCB()]).fit(1)
# GroupNorm, so the processes train as one would; 7,226 images in batches of 65 leave a last batch of 11: 6 + 5
cb = AccelerateCB()
learn, seen, hist = run(cb)
acc = cb.acc
res = dict(n=acc.num_processes, seen=seen, history=hist)
def diffs(learn, ref):
    w0, w1, w2 = gn_model().state_dict(), ref.model.state_dict(), acc.unwrap_model(learn.model).state_dict()
    return max((w1[k] - w0[k]).abs().max().item() for k in w0), max((w2[k] - w1[k]).abs().max().item() for k in w0)
if acc.is_main_process:  # the same training in one plain process
    ref, res['ref_seen'], res['ref_history'] = run(DeviceCB('cpu'), TrainCB())
    res['moved'], res['diff'] = diffs(learn, ref)
# Accumulating 4 batches (112 = 28 groups of 4): the gradients are synced once per group, as GradAccumCB steps
cb4 = AccelerateCB(gradient_accumulation_steps=4)
learn4 = run(cb4)[0]
if acc.is_main_process: res['moved4'], res['diff4'] = diffs(learn4, run(DeviceCB('cpu'), TrainCB(), GradAccumCB(4))[0])
(out/f'rank{acc.process_index}.json').write_text(json.dumps(res))
PartialState().destroy_process_group()
"""

def test_a_users_script_with_fashion_dls_trains_each_process_on_its_share(tmp_path):
    """The issue's script: `fashion_dls` and `AccelerateCB` under `accelerate launch`, two CPU processes, no CLI.

    Each process computes on its consecutive part of every batch of the single process's shuffle, the metrics are the
    whole batch's, and with GroupNorm the weights end where one process's do, up to the float rounding that training
    amplifies (far less than how far the weights moved: a process that trained on other images would be off by that)."""
    script, port = tmp_path/'user.py', free_port()
    script.write_text(USER_SCRIPT)
    env = {**os.environ, 'ACCELERATE_USE_CPU': '1', 'OMP_NUM_THREADS': '1', 'HF_DATASETS_OFFLINE': '1',
           'HF_HUB_OFFLINE': '1'}
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2', '--num_machines',
           '1', '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(port), str(script),
           str(tmp_path)]
    try: res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e: pytest.fail(f'the two processes hung (no result in {e.timeout}s)')
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stderr.count('UserWarning: AccelerateCB: on CPUs') == 1, res.stderr  # the main process's note
    r0, r1 = (json.loads((tmp_path/f'rank{i}.json').read_text()) for i in (0, 1))
    assert r0['n'] == r1['n'] == 2
    assert len(r0['seen']) == len(r1['seen']) == len(r0['ref_seen']) == 112
    for a, b, whole in zip(r0['seen'], r1['seen'], r0['ref_seen'], strict=True): assert a + b == whole
    assert (len(r0['seen'][-1]), len(r1['seen'][-1])) == (6, 5)
    assert r0['history'] == r1['history']
    for h, ref in zip(r0['history'], r0['ref_history'], strict=True):
        assert h['loss'] == pytest.approx(ref['loss'], rel=1e-4), (h, ref)
        assert h['accuracy'] == pytest.approx(ref['accuracy'], abs=5e-3), (h, ref)  # a few flipped argmaxes at most
    assert r0['diff'] < r0['moved']/100, (r0['diff'], r0['moved'])
    assert r0['diff4'] < r0['moved4']/100, (r0['diff4'], r0['moved4'])

# ---------------------------------------------------------------- EMACB with the training-step callbacks

def test_ema_averages_once_per_optimizer_step_and_not_a_skipped_one(always_scaler):
    ema, ws = EMACB(0.5, warmup=False), WeightsCB()
    learn = fit(MixedPrecision(), GradAccumCB(4), ema, ws, PoisonCB(7), d=dls(128, bs=16), valid=False)  # 2 groups
    assert ema.ema_model.n_averaged.item() == 2  # not 8: one update per optimizer step
    assert torch.equal(ws.ws[7], ws.ws[3])  # the second step was skipped...
    torch.testing.assert_close(flat_weights(ema.ema_model.module), ws.ws[3])  # ...and left the average alone

def test_ema_follows_accelerate_and_averages_the_unwrapped_model(fresh_accelerate):
    assert EMACB.order > AccelerateCB.order  # after AccelerateCB has prepared (under DDP: wrapped) the model
    ema = EMACB(0.5, warmup=False)
    learn = fit(AccelerateCB(mixed_precision='no', gradient_accumulation_steps=4), ema, d=dls(128, bs=16), valid=False)
    assert ema._src is accel.extract_model_from_parallel(learn.model) and ema.ema_model.n_averaged.item() == 2

# ---------------------------------------------------------------- AccelerateCB: state, devices, weighting

def test_accelerate_saves_and_loads_its_scaler_and_skips(fresh_accelerate):
    cb = AccelerateCB(mixed_precision='no')
    assert cb.state_dict() == dict(scaler=None, skipped_steps=0)
    cb.acc.scaler = torch.amp.GradScaler('cpu', init_scale=2.**10)  # what fp16 on a GPU has
    cb.skipped_steps = 3
    sd = cb.state_dict()
    cb2 = AccelerateCB(mixed_precision='no')
    cb2.acc.scaler = torch.amp.GradScaler('cpu')
    cb2.load_state_dict(sd)
    assert cb2.acc.scaler.get_scale() == 2.**10 and cb2.skipped_steps == 3

def test_accelerate_keeps_the_gpu_index(fresh_accelerate, monkeypatch):
    "`device='cuda:1'` trains on cuda:1: accelerate's own 'cuda' is the current GPU."
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    assert AccelerateCB(mixed_precision='no', device='cuda:1').acc.device == torch.device('cuda', 1)

def test_accelerate_refuses_a_devicecb_on_another_gpu(fresh_accelerate, monkeypatch):
    "DeviceCB('cuda') is the current GPU, cuda:0, not the cuda:1 AccelerateCB trains on."
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(DeviceCB, 'before_fit', lambda self, learn: setattr(self, 'dev', torch.device('cuda')))
    cb = AccelerateCB(mixed_precision='no', device='cuda:1')
    with pytest.raises(ValueError, match='DeviceCB puts the model on cuda, AccelerateCB on cuda:1; remove DeviceCB'):
        Learner(model(), dls(), F.cross_entropy, cbs=[DeviceCB('cuda'), cb]).fit(1)

def test_accelerate_weights_a_short_last_group_by_its_size(fresh_accelerate):
    "6 batches with 4 to a group: groups of 4 and 2, each a mean, as GradAccumCB makes them."
    learn = fit(AccelerateCB(mixed_precision='no', gradient_accumulation_steps=4), d=dls(48, bs=8), valid=False)
    own = fit(TrainCB(), GradAccumCB(4), d=dls(48, bs=8), valid=False)
    torch.testing.assert_close(flat_weights(learn.model), flat_weights(own.model), rtol=1e-5, atol=1e-7)

def test_accelerate_counts_the_items_of_nested_batches(fresh_accelerate, monkeypatch):
    "A DDPM batch ((xt, t), eps) has bs items, not 2: the shares are weighted by that."
    monkeypatch.setattr(Accelerator, 'num_processes', property(lambda self: 2))
    x, y = data()
    class Nested:
        def __len__(self): return 4
        def __iter__(self): return (((x[i:i+16], torch.zeros(16)), y[i:i+16]) for i in range(0, 64, 16))
    seen = []
    class NsCB(Callback):
        order = AccelerateCB.order + 1
        def after_predict(self, learn): seen.append(cb.ns.tolist())
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model()
        def forward(self, inp): return self.body(inp[0])
    cb = AccelerateCB(mixed_precision='no')
    monkeypatch.setattr(cb, '_loaders', lambda dls: dls)  # the loaders as they are: one process's share
    Learner(TwoInputs(), DataLoaders(Nested(), Nested()), F.cross_entropy, cbs=[cb, NsCB()]).fit(1)
    assert seen[0] == [16.]

# ---------------------------------------------------------------- MultDL

def test_multdl():
    dl = DataLoader(range(10), batch_size=4)
    m = MultDL(dl, 3)
    assert len(m) == 9
    out = [b.tolist() for b in m]
    assert out == [[0, 1, 2, 3]]*3 + [[4, 5, 6, 7]]*3 + [[8, 9]]*3
    assert len(out) == len(m)
    assert m.batch_size == 4 and m.dataset is dl.dataset
    assert len(MultDL(dl)) == 6
    for bad in (1.5, 0, True):
        with pytest.raises(ValueError, match='whole number >= 1'): MultDL(dl, bad)
    learn = fit(TrainCB(), steps := StepCounterCB(), d=DataLoaders(MultDL(dls().train, 2), dls().valid))
    assert steps.steps == 8


def test_fit_run_hands_the_gpu_index_to_accelerate(monkeypatch, tmp_path):
    ("`miniai fit --accelerate --device cuda:1` must train on cuda:1, not on accelerate's default GPU "
     "(issue 22, item 6).")
    import miniai.recipe as recipe
    class Made(Exception): pass
    def fake(**kw): raise Made(kw)
    monkeypatch.setattr(recipe, 'AccelerateCB', fake)
    monkeypatch.delenv('WORLD_SIZE', raising=False)
    with pytest.raises(Made) as ei:
        recipe.fit_run(tmp_path/'run', arch='cnn', epochs=1, device='cuda:1', accelerate=True)
    assert ei.value.args[0]['device'] == torch.device('cuda:1')
