"""Issue 22, the learner's part: lr_find and callback state, the training device's CUDA random state, metric state after
a resume, and a finiteness check that doesn't wait for the GPU each batch. No GPU here: CUDA is mocked, and the 'meta'
device stands in for a GPU (its tensors can't be read back, so any wait for them fails loudly)."""
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torcheval.metrics import MulticlassAccuracy

import miniai.learner
from miniai import accel
from miniai.accel import MixedPrecision
from miniai.checkpoint import CheckpointCB, ResumeCB, read_checkpoint
from miniai.learner import Callback, DeviceCB, Learner, MetricsCB, TrainCB, check_finite, get_rng_state, set_rng_state

def cls_dls(n_train=3, n_valid=2, bs=4, n_in=6, nan_at=None):
    torch.manual_seed(0)
    mk = lambda n: [(torch.randn(bs, n_in), torch.randint(0, 3, (bs,))) for _ in range(n)]
    train = mk(n_train)
    if nan_at is not None: train[nan_at] = (train[nan_at][0]*float('nan'), train[nan_at][1])
    return SimpleNamespace(train=train, valid=mk(n_valid))

def weights(m): return [p.detach().clone() for p in m.parameters()]
def same(a, b): return all(torch.equal(x, y) for x, y in zip(a, b))

# --- item 3: lr_find puts every callback's state back

class CountCB(Callback):
    "A callback with state: the batches it has seen."
    def __init__(self): self.n = 0
    def after_batch(self, learn): self.n += 1
    def state_dict(self): return dict(n=self.n)
    def load_state_dict(self, sd): self.n = sd['n']

def test_lr_find_restores_a_callbacks_state():
    count = CountCB()
    learn = Learner(nn.Linear(6, 3), cls_dls(), F.cross_entropy, cbs=[TrainCB(), count])
    learn.fit(1)
    assert count.n == 5
    learn.lr_find(plot=False)
    assert count.n == 5

@pytest.fixture
def scaled_mp(monkeypatch):
    "MixedPrecision with a GradScaler on the CPU (its books are the CUDA one's); it grows the scale every 2 steps."
    monkeypatch.setattr(accel, 'cpu_has_bf16', lambda: False)
    monkeypatch.setattr(MixedPrecision, 'make_scaler', lambda self: torch.amp.GradScaler('cpu', growth_interval=2))

def scaler_books(mp): return mp.scaler.state_dict(), mp.skipped_steps

def test_lr_find_after_a_fit_leaves_the_grad_scaler_as_it_was(scaled_mp):
    mp = MixedPrecision()
    learn = Learner(nn.Linear(6, 3), cls_dls(), F.cross_entropy, cbs=[mp])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1)
        before = scaler_books(mp)
        learn.lr_find(plot=False)
    assert len(learn.lr_finder.losses) > 3  # the finder stepped through the scaler...
    assert scaler_books(mp) == before       # ...and its scale, growth tracker and skipped steps are as they were

def test_lr_find_before_any_fit_leaves_no_grad_scaler_behind(scaled_mp):
    "The first fit after lr_find starts from a fresh scaler, as it would without lr_find."
    def first_fit(find):
        mp = MixedPrecision()
        learn = Learner(nn.Linear(6, 3), cls_dls(), F.cross_entropy, cbs=[mp])
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            if find:
                learn.lr_find(plot=False)
                assert mp.scaler is None
            learn.fit(1)
        return scaler_books(mp)
    assert first_fit(True) == first_fit(False)

# --- item 7: the training device's CUDA random state, and only it

@pytest.fixture
def gpus(monkeypatch):
    "Pretend there are CUDA devices (two, unless a test changes `n`) with distinct RNG states; record restores."
    fake = SimpleNamespace(n=2, restored=[], states=[torch.full((16,), i, dtype=torch.uint8) for i in range(4)])
    def every_gpu(*a): raise AssertionError("only the training device's CUDA state may be saved or restored")
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: fake.n)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda i=0: fake.states[i].clone())
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda s, d: fake.restored.append((s, torch.device(d))))
    monkeypatch.setattr(torch.cuda, 'get_rng_state_all', every_gpu)
    monkeypatch.setattr(torch.cuda, 'set_rng_state_all', every_gpu)
    return fake

def test_rng_state_holds_only_the_training_devices_cuda_state(gpus):
    i, s = get_rng_state(device='cuda:1')['cuda']
    assert i == 1 and torch.equal(s, gpus.states[1])
    assert get_rng_state(device='cpu')['cuda'] is None  # training on the CPU: no GPU state to keep

def test_cuda_state_goes_to_the_device_training_resumes_on(gpus):
    "Saved from cuda:1, resumed on cuda:0 (say, the only GPU of the new machine): the state goes to cuda:0."
    st = get_rng_state(device='cuda:1')
    set_rng_state(st, device=torch.device('cuda', 0))
    assert len(gpus.restored) == 1 and torch.equal(gpus.restored[0][0], gpus.states[1])
    assert gpus.restored[0][1] == torch.device('cuda', 0)

def test_a_missing_gpu_gives_one_warning_not_an_index_error(gpus):
    st = get_rng_state(device='cuda:1')
    gpus.n = 1  # resumed where cuda:1 doesn't exist
    a = torch.rand(3)
    with pytest.warns(UserWarning, match='CUDA random state') as ws: set_rng_state(st)
    assert len(ws) == 1 and not gpus.restored
    assert torch.equal(torch.rand(3), a)  # the CPU state was restored all the same

def test_the_learner_saves_the_cuda_state_of_the_models_device(gpus, monkeypatch, tmp_path):
    monkeypatch.setattr(miniai.learner, 'model_device', lambda m: torch.device('cuda', 1))
    learn = Learner(nn.Linear(2, 2), SimpleNamespace(train=[], valid=[]))
    i, s = read_checkpoint(learn.save(tmp_path/'ck.pt'))['rng']['cuda']
    assert i == 1 and torch.equal(s, gpus.states[1])

def test_resuming_a_gpu_checkpoint_without_cuda_warns_once_and_resumes_exactly(tmp_path):
    def learner():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))  # dropout: the RNG matters
        return Learner(model, cls_dls(n_train=5), F.cross_entropy, cbs=[TrainCB()])
    learn = learner()
    learn.fit(1, cbs=CheckpointCB(tmp_path, every_n_batches=2, keep=10))
    ck_path = tmp_path/'ckpt-e0000-b000002.pt'
    ck = read_checkpoint(ck_path)
    assert ck['epoch_rng']['cuda'] is None  # the epoch's GPU state is never needed: the save's is restored before
    ck['rng']['cuda'] = (0, torch.zeros(16, dtype=torch.uint8))  # as saved on a GPU
    torch.save(ck, ck_path)
    resumed = learner()
    with pytest.warns(UserWarning, match='CUDA random state') as ws: resumed.fit(1, cbs=ResumeCB(ck_path))
    assert len([w for w in ws if 'CUDA' in str(w.message)]) == 1
    assert same(weights(resumed.model), weights(learn.model))

# --- item 8: metric state loaded from a checkpoint lives where the metrics run

def test_metric_state_loaded_mid_epoch_moves_to_the_metrics_device():
    "The metrics run on 'meta' (standing in for a GPU); a checkpoint's state is loaded from the CPU."
    x, y = torch.randn(4, 3), torch.randint(0, 3, (4,))
    def batch(dev): return SimpleNamespace(preds=x.to(dev), loss=torch.tensor(1., device=dev),
                                           batch=(x.to(dev), y.to(dev)),
                                           n_inp=1, epoch=0, training=True)
    saved = MetricsCB(accuracy=MulticlassAccuracy(), buffer=1)
    saved.before_fit(b := batch('cpu')); saved.before_epoch(b); saved.after_batch(b)
    sd = saved.state_dict()  # mid-epoch: the partial sums, on the CPU (as read from a file)
    cb = MetricsCB(accuracy=MulticlassAccuracy(), buffer=1)
    cb.before_fit(b := batch('meta')); cb.before_epoch(b); cb.after_batch(b)  # a first fit: the metrics moved
    cb.before_fit(b); cb.load_state_dict(sd)  # then the same Learner resumes (ResumeCB loads after before_fit)
    cb.before_epoch(b)
    for m in cb.all_metrics.values():
        for nm in m._state_name_to_default: assert getattr(m, nm).device.type == 'meta', nm
    cb.after_batch(b)  # updates without mixing devices

# --- items 1 and 11: check_finite

class PoisonCB(Callback):
    def __init__(self, at): self.at = at
    def before_batch(self, learn):
        if learn.training and learn.iter == self.at: learn.batch = (learn.batch[0]*float('nan'), learn.batch[1])

class SnapshotCB(Callback):
    def after_step(self, learn): self.w = weights(learn.model)

def test_on_a_cpu_a_nan_loss_raises_before_it_reaches_the_weights():
    snap = SnapshotCB()
    learn = Learner(nn.Linear(6, 3), cls_dls(), F.cross_entropy, cbs=[TrainCB(), PoisonCB(1), snap])
    with pytest.raises(FloatingPointError, match='at epoch 0, batch 1;'): learn.fit(1)
    assert same(weights(learn.model), snap.w)  # the weights after batch 0, untouched by batch 1
    assert all(torch.isfinite(w).all() for w in snap.w)

def test_off_the_cpu_the_loss_is_read_back_only_every_32_batches():
    "A 'meta' loss can't be read back: 31 batches pass without trying, the 32nd checks (and so fails here)."
    learn = SimpleNamespace()
    for i in range(31):
        learn.loss, learn.epoch, learn.iter = torch.tensor(1., device='meta'), 0, i
        check_finite(learn)
    learn.iter = 31
    with pytest.raises(RuntimeError, match='meta'): check_finite(learn)

def test_every_n_reads_back_once_per_n_batches_and_names_the_range(monkeypatch):
    reads, bool_, item = [], torch.Tensor.__bool__, torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, '__bool__', lambda t: reads.append(1) or bool_(t))
    monkeypatch.setattr(torch.Tensor, 'item', lambda t: reads.append(1) or item(t))
    learn = SimpleNamespace(epoch=0)
    for i in range(8):
        learn.loss, learn.iter = torch.tensor(1.), i
        check_finite(learn, every=4)
    assert len(reads) == 2
    learn.loss, learn.iter = torch.tensor(float('nan')), 8
    check_finite(learn, every=4)  # not checked yet
    learn.loss, learn.iter = torch.tensor(1.), 11
    with pytest.raises(FloatingPointError, match='between epoch 0, batch 8 and epoch 0, batch 11;'):
        check_finite(learn, every=4)

def test_the_check_runs_at_the_end_of_each_epoch():
    class RareCheckCB(TrainCB):
        def backward(self, learn): check_finite(learn, every=100); learn.loss.backward()
    learn = Learner(nn.Linear(6, 3), cls_dls(nan_at=2), F.cross_entropy, cbs=[RareCheckCB()])
    with pytest.raises(FloatingPointError, match='between epoch 0, batch 0 and epoch 0, batch 2;'): learn.fit(2)
    assert learn.epoch == 0

def test_checkpoints_never_hold_weights_an_unchecked_nan_loss_reached(tmp_path):
    class RareCheckCB(TrainCB):
        def backward(self, learn): check_finite(learn, every=100); learn.loss.backward()
    learn = Learner(nn.Linear(6, 3), cls_dls(n_train=4, nan_at=0), F.cross_entropy, cbs=[RareCheckCB()])
    with pytest.raises(FloatingPointError, match='between epoch 0, batch 0 and epoch 0, batch 1;'):
        learn.fit(1, cbs=CheckpointCB(tmp_path, every_n_batches=2))
    assert not list(tmp_path.glob('*.pt'))

def test_lr_find_ends_at_a_nan_loss_on_every_device():
    "On a CPU check_finite reads each loss: the finder must see a NaN loss first, and end there, not fail."
    learn = Learner(nn.Linear(6, 3), cls_dls(n_train=6), F.cross_entropy, cbs=[TrainCB(), PoisonCB(3)])
    learn.lr_find(plot=False)
    assert len(learn.lr_finder.losses) == 4 and learn.lr_finder.losses[-1] != learn.lr_finder.losses[-1]

def test_lr_find_writes_no_checkpoints(tmp_path):
    "Its throwaway run would rotate real checkpoints out, and a later ResumeCB('latest') could pick one of its own."
    learn = Learner(nn.Linear(6, 3), cls_dls(), F.cross_entropy,
                    cbs=[TrainCB(), CheckpointCB(tmp_path, every_n_batches=1)])
    learn.lr_find(plot=False)
    assert not list(tmp_path.glob('*.pt'))
    learn.fit(1)
    assert list(tmp_path.glob('*.pt'))

# --- on a real GPU (skipped elsewhere): what the mocks above stand in for

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')

def dropout_learner(*cbs):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 3))  # dropout draws on the GPU
    return Learner(model, cls_dls(n_train=6), F.cross_entropy, cbs=[TrainCB(), DeviceCB('cuda'), *cbs])

@needs_cuda
def test_on_a_gpu_check_finite_never_waits_for_it_within_32_batches():
    class WatchedCB(TrainCB):
        def backward(self, learn):
            torch.cuda.set_sync_debug_mode('error')  # any wait for the GPU raises
            try: check_finite(learn)
            finally: torch.cuda.set_sync_debug_mode(0)
            learn.loss.backward()
    learn = Learner(nn.Linear(6, 3), cls_dls(n_train=20), F.cross_entropy, cbs=[WatchedCB(), DeviceCB('cuda')])
    learn.fit(1)

@needs_cuda
def test_on_a_gpu_a_same_process_resume_is_exact_and_its_metrics_follow(tmp_path):
    metrics = MetricsCB(accuracy=MulticlassAccuracy())
    learn = dropout_learner(metrics)
    learn.fit(1, cbs=CheckpointCB(tmp_path, every_n_batches=2, keep=10))
    done, history = weights(learn.model), metrics.history
    learn.fit(1, cbs=ResumeCB(tmp_path/'ckpt-e0000-b000004.pt'))  # the same Learner: its metrics are on the GPU
    assert same(weights(learn.model), done)
    assert [h['accuracy'] for h in metrics.history] == [h['accuracy'] for h in history]
    assert [h['loss'] for h in metrics.history] == pytest.approx([h['loss'] for h in history])

@needs_cuda
def test_on_a_gpu_lr_find_before_the_first_fit_changes_nothing():
    "DeviceCB moves the model in lr_find's own fit: the GPU's random state must come back all the same."
    def train_once(find):
        learn = dropout_learner()
        if find: learn.lr_find(plot=False)
        learn.fit(1)
        return weights(learn.model)
    assert same(train_once(True), train_once(False))
