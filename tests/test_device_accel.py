"""miniai.accel on a real CUDA GPU: what tests/test_accel.py can only show on a CPU with fakes (issue 22).

Every test skips without CUDA. On a GPU they run in a few seconds: `python -m pytest -q tests/test_device_accel.py`."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from miniai.accel import EMACB, AccelerateCB, GradClipCB, MixedPrecision
from miniai.learner import Callback, DeviceCB, Learner
from test_accel import PoisonCB, WeightsCB, dls, flat_weights, model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

def fit(*cbs, n=1, d=None, **kw):
    learn = Learner(model(), d or dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB('cuda'), *cbs])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(n, valid=False, **kw)
    return learn

def test_fp16_skips_are_counted_on_the_gpu_and_reported():
    mp = MixedPrecision()
    with pytest.warns(UserWarning, match=r'MixedPrecision: 1 step\(s\) skipped'):
        Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB('cuda'), mp, PoisonCB(1)]).fit(1, valid=False)
    assert mp.amp_dtype == torch.float16 and mp._skips.device.type == 'cuda' and mp.skipped_steps == 1

def test_fp16_nan_loss_raises():
    class NaNLossCB(Callback):
        def after_loss(self, learn):
            if learn.training and learn.iter == 1: learn.loss = learn.loss*math.nan
    with pytest.raises(FloatingPointError): fit(MixedPrecision(), NaNLossCB())

def test_fp16_interrupt_between_unscale_and_step():
    class InterruptCB(Callback):
        order = 2
        def after_backward(self, learn):
            if learn.iter == 1: raise KeyboardInterrupt()
    mp = MixedPrecision()
    learn = Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[DeviceCB('cuda'), mp, GradClipCB(1.0)])
    with pytest.raises(KeyboardInterrupt): learn.fit(1, cbs=InterruptCB())
    learn.fit(1)  # no "unscale_() has already been called"
    assert mp.scaler.get_scale() >= 2.**15

def test_ema_ignores_an_fp16_skipped_step():
    ema, ws = EMACB(0.5, warmup=False), WeightsCB()
    fit(MixedPrecision(), ema, ws, PoisonCB(1), d=dls(32))  # two steps: the first copies the weights, the second skips
    assert torch.equal(ws.ws[1], ws.ws[0])
    torch.testing.assert_close(flat_weights(ema.ema_model.module), ws.ws[1])
    assert ema.ema_model.n_averaged.item() == 2  # counted, with a weight of 0

def test_bf16_on_this_gpu():
    ok = torch.cuda.get_device_capability() >= (8, 0)
    if not ok:
        with pytest.raises(ValueError, match='no native bf16'): fit(MixedPrecision(dtype='bf16'))
        return
    mp = MixedPrecision(dtype='bf16')
    fit(mp)
    assert mp.amp_dtype == torch.bfloat16 and mp.scaler is None

def test_accelerate_trains_on_the_gpu_it_is_given(fresh_accelerate):
    i = torch.cuda.device_count() - 1  # the last GPU: cuda:1 or later where there are several
    cb = AccelerateCB(mixed_precision='fp16', device=f'cuda:{i}')
    learn = Learner(model(), dls(), F.cross_entropy, lr=0.1, cbs=[cb])
    learn.fit(1)
    assert next(learn.model.parameters()).device == torch.device('cuda', i)
    sd = cb.state_dict()
    assert sd['scaler']['scale'] > 0 and sd['skipped_steps'] == cb.skipped_steps
