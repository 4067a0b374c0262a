"Fault injection and property checks for miniai.augment that a notebook shows badly."
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from miniai.augment import (CapturePreds, Dropout, Dropout2d, RandCopy, RandCrop, RandErase, RandFlip, TTD_CB,
                            mc_dropout_predict,
                            rand_copy, rand_crop, rand_erase, rand_flip)
from miniai.datasets import DataLoaders, TensorDL
from miniai.learner import Callback, Learner, TrainCB


def _dls(n=64, bs=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return DataLoaders(TensorDL(x, y, bs=bs), TensorDL(x, y, bs=bs))


def _model():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 32), Dropout(0.5), nn.Dropout(0.5), nn.BatchNorm1d(32),
                         nn.Linear(32, 10))


class _Boom(Callback):
    "Fail on the second validation batch."
    order = 50
    def after_batch(self, learn):
        if not learn.training and learn.iter == 1: raise RuntimeError('boom')


def _modes(m): return [x.training for x in m.modules()]


def test_capture_preds_restores_everything_when_an_epoch_fails():
    torch.manual_seed(0)
    model = _model()
    learn = Learner(model, _dls(), F.cross_entropy, cbs=[TrainCB()])
    learn.fit(1, valid=False)
    opt = learn.opt
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match='boom'): learn.capture_preds(cbs=[TTD_CB(), _Boom()])
    assert learn.opt is opt
    assert _modes(model) == [True]*len(_modes(model))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_ttd_cb_switches_dropout_back_even_when_the_epoch_fails():
    model = _model().eval()
    learn = Learner(model, _dls(), F.cross_entropy, cbs=[TrainCB(), TTD_CB(), _Boom()])
    with pytest.raises(RuntimeError): learn.fit(1, train=False)
    assert not any(m.training for m in model.modules() if isinstance(m, (Dropout, nn.Dropout)))


def test_mc_dropout_on_a_bare_model_keeps_modes_and_uses_its_device():
    model = _model().train()
    dl = _dls().valid
    mc = mc_dropout_predict(model, dl, n=3)
    assert mc.probs.shape == (64, 10) and mc.spread.shape == (64,) and mc.targs.shape == (64,)
    assert (mc.spread >= 0).all()
    assert _modes(model) == [True]*len(_modes(model))
    with pytest.raises(ValueError, match='dl='): mc_dropout_predict(model)
    with pytest.raises(TypeError, match='Learner or an nn.Module'): mc_dropout_predict('model', dl)


@pytest.mark.parametrize('shape', [(1, 1, 5, 7), (3, 3, 9, 4), (6, 2, 28, 28)])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16])
def test_augmentations_keep_shape_and_dtype(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype)
    for tfm in (RandCrop(3), RandFlip(), RandErase(0.3, 3), RandCopy(0.3, 3), nn.Sequential(RandCrop(1), RandFlip())):
        out = tfm(x)
        assert out.shape == x.shape and out.dtype == x.dtype


def test_copy_and_crop_only_use_values_from_the_same_image():
    torch.manual_seed(1)
    x = torch.arange(5*2*9*9).view(5, 2, 9, 9)
    for f in (lambda t: rand_copy(t, 0.4, 3), lambda t: rand_crop(t, 3)):
        out = f(x)
        assert (out // 81 == torch.arange(10).view(5, 2, 1, 1)).all()  # value // 81 names the (item, channel)


def test_flip_p_edges_and_erase_bounds():
    x = torch.randn(16, 1, 8, 8)
    assert torch.equal(rand_flip(x, 0.), x) and torch.equal(rand_flip(x, 1.), x.flip(-1))
    out = rand_erase(x, 0.5, 4)
    assert out.min() >= x.min() and out.max() <= x.max()


@pytest.mark.parametrize('bad', [-0.1, 1, 1.5, '0.5', None, True])
def test_dropout_rejects_bad_p(bad):
    for cls in (Dropout, Dropout2d):
        with pytest.raises(ValueError, match=r'\[0, 1\)'): cls(bad)


@pytest.mark.parametrize('call', [lambda: rand_crop(torch.zeros(2, 8, 8)), lambda: RandCrop(1.5), lambda: RandFlip(2),
                                  lambda: RandErase(0.), lambda: RandCopy(max_num=0),
                                  lambda: rand_erase(torch.zeros(1, 1, 4, 4, dtype=torch.int64))])
def test_bad_augmentation_arguments_raise_early(call):
    with pytest.raises((ValueError, TypeError)): call()


class _TwoInputs(nn.Module):
    def __init__(self): super().__init__(); self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)
    def forward(self, x1, x2): return self.a(x1) + self.b(x2)


def test_capture_preds_keeps_several_inputs_apart_and_can_skip_them():
    g = torch.Generator().manual_seed(0)
    x1, x2, y = (torch.randn(20, 4, generator=g), torch.randn(20, 2, generator=g),
                 torch.randint(0, 3, (20,), generator=g))
    batches = [(x1[i:i+8], x2[i:i+8], y[i:i+8]) for i in range(0, 20, 8)]
    learn = Learner(_TwoInputs(), DataLoaders(batches, batches), F.cross_entropy, cbs=[TrainCB(n_inp=2)])
    preds, targs, (i1, i2) = learn.capture_preds(inps=True)
    assert preds.shape == (20, 3) and torch.equal(targs, y) and torch.equal(i1, x1) and torch.equal(i2, x2)
    cp = CapturePreds(inps=False)
    learn.fit(1, train=False, cbs=cp)
    assert cp.all_inps is None and torch.equal(cp.all_preds, preds)


def test_the_recipe_lives_in_miniai_recipe_only_and_augment_does_not_import_it():
    import subprocess, sys
    code = ("import sys, miniai.augment as a; assert 'miniai.recipe' not in sys.modules\n"
            "import miniai.recipe; assert not hasattr(a, 'recipe_learner') and not hasattr(a, '__getattr__')")
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
