"""miniai.fid: FID and KID against reference computations, ImageEval's course-style API, and the shipped classifier."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torcheval.metrics.image.fid import FrechetInceptionDistance

from miniai.datasets import DataLoaders, fashion_mnist_arrays
from miniai.fid import (FID_CLASSIFIER_PATH, ImageEval, ddpm_images, fid, fid_classifier, kid, load_fid_classifier,
                        save_fid_classifier, train_fid_classifier)
from miniai.learner import DeviceCB

F64 = torch.float64


@pytest.fixture(scope='module')
def data():
    a = fashion_mnist_arrays('sample')
    return ddpm_images(a['train'][0][:600]), a['train'][1][:600], ddpm_images(a['valid'][0]), a['valid'][1]


@pytest.fixture(scope='module')
def shipped(): return load_fid_classifier()


def _stats(f): return f.mean(0), torch.cov(f.T)


def test_fid_matches_torcheval_formula():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(12, 12, generator=g, dtype=F64)
    a = torch.randn(300, 12, generator=g, dtype=F64)@mix
    b = torch.randn(400, 12, generator=g, dtype=F64)@(mix + 0.2) + 0.5
    theirs = FrechetInceptionDistance._calculate_frechet_distance(None, *_stats(a), *_stats(b)).item()
    assert fid(a, b) == pytest.approx(theirs, rel=1e-8)
    assert fid(a, a) == pytest.approx(0., abs=1e-8)


def test_fid_of_known_gaussians():
    "N(0, I) against N(mu, 4I) in d dims: |mu|^2 + d·(1 + 4 - 2·2)."
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(40_000, 3, generator=g), 2*torch.randn(40_000, 3, generator=g) + torch.tensor([2., 0, 0])
    assert fid(a, b) == pytest.approx(4 + 3, rel=0.03)


def test_kid_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 3, generator=g, dtype=F64), torch.randn(9, 3, generator=g, dtype=F64) + 1
    k = lambda x, y: (float(x @ y)/3 + 1)**3
    aa = sum(k(a[i], a[j]) for i in range(7) for j in range(7) if i != j)/(7*6)
    bb = sum(k(b[i], b[j]) for i in range(9) for j in range(9) if i != j)/(9*8)
    ab = sum(k(x, y) for x in a for y in b)/(7*9)
    assert kid(a, b) == pytest.approx(aa + bb - 2*ab, rel=1e-10)


@pytest.mark.parametrize('bad', [(torch.randn(5, 3), torch.randn(5, 4)), (torch.randn(1, 3), torch.randn(5, 3)),
                                 (torch.randn(5), torch.randn(5))])
def test_fid_kid_refuse_bad_features(bad):
    for f in (fid, kid):
        with pytest.raises(ValueError, match='feature matrices'): f(*bad)


def test_shipped_classifier_is_accurate_and_round_trips(tmp_path, data, shipped):
    _, _, xv, yv = data
    assert FID_CLASSIFIER_PATH.exists() and FID_CLASSIFIER_PATH.stat().st_size < 600_000
    assert not shipped.training
    with torch.no_grad(): acc = (shipped(xv).argmax(1) == yv).float().mean().item()
    assert acc > 0.85, acc
    p = save_fid_classifier(shipped, tmp_path/'c.npz')
    again = load_fid_classifier(p)
    for (k, a), b in zip(shipped.state_dict().items(), again.state_dict().values()): assert torch.equal(a, b), k
    with pytest.raises(FileNotFoundError, match='no FID classifier'): load_fid_classifier(tmp_path/'none.npz')


def test_train_fid_classifier_small():
    model, acc = train_fid_classifier(epochs=1, n_train=2048, source='sample', device='cpu', seed=0)
    assert isinstance(model, nn.Sequential) and not model.training and 0.3 < acc <= 1
    with pytest.raises(ValueError, match='whole number'): train_fid_classifier(epochs=True)


def test_image_eval_course_style(data, shipped):
    "ImageEval(model, dls, cbs): features are model(x) of dls.valid's images; fid/kid score samples against them."
    xt, yt, xv, yv = data
    dls = DataLoaders(DataLoader(TensorDataset(xt, yt), 100), DataLoader(TensorDataset(xv, yv), 128))
    body = shipped[:-1]
    ie = ImageEval(body, dls, cbs=[DeviceCB('cpu')])
    with torch.no_grad(): fv, ft = body(xv).double(), body(xt[:300]).double()
    torch.testing.assert_close(ie.feats, fv, rtol=1e-6, atol=1e-6)
    assert ie.fid(xt[:300]) == pytest.approx(fid(ft, fv), rel=1e-6)
    assert ie.kid(xt[:300]) == pytest.approx(kid(ft, fv), rel=1e-6, abs=1e-9)
    torch.testing.assert_close(ie.get_feats(xt[:5]), ft[:5], rtol=1e-6, atol=1e-6)
    noise = torch.randn(300, 1, 32, 32, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert ie.fid(noise) > 20*ie.fid(xt[:300]) and ie.kid(noise) > 20*abs(ie.kid(xt[:300]))
    # a tensor of real images works the same, and the model's mode is left as it was
    body.train()
    ie2 = ImageEval(body, xv)
    assert body.training
    body.eval()
    torch.testing.assert_close(ie2.feats, ie.feats)


def test_image_eval_takes_a_dataloader_of_samples_and_refuses_bad_input(data, shipped):
    xt, _, xv, _ = data
    ie = ImageEval(shipped[:-1], xv)
    assert ie.fid(DataLoader(TensorDataset(xt[:200]), 64)) == pytest.approx(ie.fid(xt[:200]), rel=1e-9)
    with pytest.raises(TypeError, match='DataLoaders'): ImageEval(shipped[:-1], [xv])
    with pytest.raises(TypeError, match='image tensors'): ie.get_feats(DataLoader([{'x': 1}], batch_size=1))
    with pytest.raises(ValueError, match='whole number'): ImageEval(shipped[:-1], xv, bs=0)
