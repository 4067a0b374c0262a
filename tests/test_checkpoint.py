("Exact resume: kill a training process with SIGKILL and resume it bitwise; "
 "Ctrl-C saves with CheckpointCB(on_interrupt=True).")
import csv, os, random, signal, subprocess, sys
from pathlib import Path

import pytest
import torch

from miniai.checkpoint import ckpt_files, ckpt_position, read_checkpoint

SCRIPT = Path(__file__).parent/'scripts'/'ckpt_train.py'
N_BATCHES = 2*57  # 2 epochs of the sample's 7,226 training images at bs 128

def train(tmp, name, *args):
    env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'MINIAI_DEVICE': 'cpu'}
    return subprocess.run([sys.executable, str(SCRIPT), '--ckpt', str(tmp/name), '--out', str(tmp/f'{name}.pt'),
                           *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=env)

@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('full')
    r = train(tmp, 'full')
    assert r.returncode == 0, r.stderr
    full = torch.load(tmp/'full.pt', weights_only=True)
    assert full['scaler']['scale'] > 2.**16, full['scaler']  # it grew, so a resume that lost it would show
    assert full['ema']['n_averaged'] == N_BATCHES
    return full

def assert_same(a, b):
    for part in ('model', 'ema'):  # the weights, and EMACB's average of them (with its step count)
        assert a[part].keys() == b[part].keys()
        for k in a[part]: assert torch.equal(a[part][k], b[part][k]), (part, k)
    assert a['history'] == b['history']
    assert a['scaler'] == b['scaler'] and a['skipped'] == b['skipped']  # MixedPrecision's GradScaler state

def read_csv(path):
    "CSVLoggerCB's file as `history` rows, checking it is well-formed: one header, every row complete."
    rows = list(csv.reader(path.open())) or [['accuracy', 'loss', 'epoch', 'train']]  # empty before the first row
    assert rows[0] == ['accuracy', 'loss', 'epoch', 'train'] and all(len(r) == 4 for r in rows), rows
    return [dict(accuracy=float(a), loss=float(l), epoch=int(e), train=t == 'train') for a, l, e, t in rows[1:]]

def test_kill_at_random_batch_then_resume_is_bitwise_equal(uninterrupted, tmp_path):
    kill_at = random.Random().randrange(11, N_BATCHES)  # any batch after the first checkpoint (every 10)
    r = train(tmp_path, 'run', '--kill-at', kill_at)
    assert r.returncode == -signal.SIGKILL, (kill_at, r.returncode, r.stderr)
    assert not (tmp_path/'run.pt').exists()
    printed = [l for l in r.stdout.splitlines() if l.startswith('{')]  # MetricsCB prints each row
    assert len(read_csv(tmp_path/'run.csv')) == len(printed) == (2 if kill_at > N_BATCHES//2 else 0), r.stdout
    r = train(tmp_path, 'run', '--resume')
    assert r.returncode == 0, (kill_at, r.stderr)
    assert_same(uninterrupted, torch.load(tmp_path/'run.pt', weights_only=True))
    assert read_csv(tmp_path/'run.csv') == uninterrupted['history']  # continued, no row twice

def test_a_checkpoint_asked_for_inside_an_accumulation_group_waits_for_its_end_and_resumes_bitwise(tmp_path):
    "GradAccumCB(2), a checkpoint asked for every 5 batches: each waits for the group's step, so no gradient is lost."
    r = train(tmp_path, 'full', '--accum', 2, '--every', 5)
    assert r.returncode == 0, r.stderr
    kill_at = random.Random().randrange(7, N_BATCHES)
    r = train(tmp_path, 'run', '--accum', 2, '--every', 5, '--kill-at', kill_at)
    assert r.returncode == -signal.SIGKILL, (kill_at, r.returncode, r.stderr)
    for e, done in map(ckpt_position, ckpt_files(tmp_path/'run')):
        assert done % 2 == 0 or done == N_BATCHES//2, done  # at the end of a group (the epoch's last one is short)
    r = train(tmp_path, 'run', '--accum', 2, '--every', 5, '--resume')
    assert r.returncode == 0, (kill_at, r.stderr)
    assert_same(torch.load(tmp_path/'full.pt', weights_only=True), torch.load(tmp_path/'run.pt', weights_only=True))

def test_kill_during_checkpoint_write_keeps_previous_and_resumes_exactly(uninterrupted, tmp_path):
    r = train(tmp_path, 'run', '--kill-in-write', 4)
    assert r.returncode == -signal.SIGKILL, r.stderr
    ckpts = sorted((tmp_path/'run').glob('ckpt-*.pt'))
    assert [c.name for c in ckpts] == ['ckpt-e0000-b000020.pt', 'ckpt-e0000-b000030.pt']  # keep=2; the 4th never landed
    assert list((tmp_path/'run').glob('.*.tmp')), 'the half-written temp file should be left behind, ignored'
    for c in ckpts: read_checkpoint(c)  # intact and loadable
    r = train(tmp_path, 'run', '--resume')
    assert r.returncode == 0, r.stderr
    assert_same(uninterrupted, torch.load(tmp_path/'run.pt', weights_only=True))

def test_the_training_gpus_rng_state_is_saved_and_restored(tmp_path, monkeypatch):
    "No GPU here: fake two CUDA devices, a model on cuda:1; its state goes through a checkpoint file and back to it."
    from types import SimpleNamespace
    from torch import nn
    import miniai.learner
    from miniai.checkpoint import set_rng_state
    from miniai.learner import Learner
    fake, restored = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)], []
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'get_rng_state', lambda i: fake[i].clone())
    monkeypatch.setattr(torch.cuda, 'set_rng_state', lambda s, d: restored.append((s, d)))
    monkeypatch.setattr(miniai.learner, 'model_device', lambda m: torch.device('cuda', 1))
    learn = Learner(nn.Linear(2, 2), SimpleNamespace(train=[], valid=[]))
    ck = read_checkpoint(learn.save(tmp_path/'ck.pt'))
    set_rng_state(ck['rng'])
    assert len(restored) == 1 and torch.equal(restored[0][0], fake[1]) and restored[0][1] == torch.device('cuda', 1)

# --- Ctrl-C: CheckpointCB(on_interrupt=True)

import inspect
from types import SimpleNamespace
import torch.nn.functional as F
from torch import nn, optim
from miniai.checkpoint import CheckpointCB, FitInterrupted, ResumeCB, ckpt_files
from miniai.learner import Callback, Learner, MetricsCB, TrainCB

def small_learner(folder, **ckpt_kw):
    torch.manual_seed(0)
    mk = lambda n: [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(n)]
    dls = SimpleNamespace(train=mk(5), valid=mk(2))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
    return Learner(model, dls, F.cross_entropy, lr=0.1, opt_func=lambda ps, lr: optim.SGD(ps, lr=lr, momentum=0.9),
                   cbs=[TrainCB(), MetricsCB(), CheckpointCB(folder, **ckpt_kw)])

class CtrlC(Callback):
    "Send this process `times` SIGINTs in training batch `at` of epoch 0 (or validation batch `at` with `valid`)."
    def __init__(self, at, times=1, valid=False): self.at, self.times, self.valid = at, times, valid
    def after_batch(self, learn):
        if learn.epoch == 0 and learn.training != self.valid and learn.iter == self.at:
            for _ in range(self.times): signal.raise_signal(signal.SIGINT)

def test_ctrl_c_saves_after_the_batch_then_resume_is_exact(tmp_path):
    full = small_learner(tmp_path/'full')
    full.fit(2)
    handler = signal.getsignal(signal.SIGINT)
    cut = small_learner(tmp_path/'cut', on_interrupt=True)
    with pytest.raises(FitInterrupted) as ei: cut.fit(2, cbs=CtrlC(3))
    assert str(ei.value) == f"interrupted; saved the training state at epoch 0, batch 4 in {tmp_path/'cut'}"
    assert isinstance(ei.value, KeyboardInterrupt)
    assert [f.name for f in ckpt_files(tmp_path/'cut')] == ['ckpt-e0000-b000004.pt']
    assert signal.getsignal(signal.SIGINT) is handler, 'the handler from before fit must be back'
    resumed = small_learner(tmp_path/'cut')
    resumed.fit(2, cbs=ResumeCB())
    for k, v in full.model.state_dict().items(): assert torch.equal(v, resumed.model.state_dict()[k]), k
    h1, h2 = resumed.metrics.history, full.metrics.history  # the cut epoch sums its loss in other groups: rounding
    assert [(h['epoch'], h['train']) for h in h1] == [(h['epoch'], h['train']) for h in h2]
    assert [h['loss'] for h in h1] == pytest.approx([h['loss'] for h in h2], rel=1e-6)

def test_a_second_ctrl_c_stops_at_once_naming_the_newest_checkpoint(tmp_path):
    learn = small_learner(tmp_path, every_n_batches=2, on_interrupt=True)
    with pytest.raises(FitInterrupted) as ei: learn.fit(2, cbs=CtrlC(2, times=2))
    assert str(ei.value) == f"interrupted; saved the training state at epoch 0, batch 2 in {tmp_path}"
    assert [f.name for f in ckpt_files(tmp_path)] == ['ckpt-e0000-b000002.pt']  # none after batch 3: it stopped at once

def test_ctrl_c_before_any_checkpoint_says_nothing_was_saved(tmp_path):
    learn = small_learner(tmp_path, on_interrupt=True)
    with pytest.raises(FitInterrupted, match='^interrupted before the first checkpoint; nothing was saved$'):
        learn.fit(1, cbs=CtrlC(1, times=2))
    assert ckpt_files(tmp_path) == []

def test_ctrl_c_during_validation_saves_at_the_end_of_the_epoch(tmp_path):
    learn = small_learner(tmp_path, every_epoch=False, on_interrupt=True)
    with pytest.raises(FitInterrupted) as ei: learn.fit(3, cbs=CtrlC(0, valid=True))
    assert str(ei.value) == f"interrupted; saved the training state at the end of epoch 0 in {tmp_path}"
    assert [f.name for f in ckpt_files(tmp_path)] == ['ckpt-e0001-b000000.pt']
    assert len(learn.metrics.history) == 2  # epoch 0's training and validation passes, no more

def test_without_on_interrupt_ctrl_c_stops_at_once(tmp_path):
    learn = small_learner(tmp_path, every_n_batches=1)
    with pytest.raises(KeyboardInterrupt) as ei: learn.fit(1, cbs=CtrlC(1))
    assert type(ei.value) is KeyboardInterrupt and [f.name for f in ckpt_files(tmp_path)] == ['ckpt-e0000-b000001.pt']

def test_fit_is_the_same_whatever_was_imported():
    import miniai.checkpoint  # noqa: F401 (imported above too: it must change nothing in Learner.fit)
    assert Learner.fit.__module__ == 'miniai.learner' and 'resume' not in inspect.signature(Learner.fit).parameters

class Averager(Callback):
    "Keeps `avg`, a module made in before_fit, through the pending-state mechanism (as EMACB and MixedPrecision do)."
    def __init__(self): self.avg = None
    def before_fit(self, learn):
        if self.avg is None: self.avg = nn.Linear(2, 2)
        self.made('avg')
    def after_step(self, learn):
        with torch.no_grad(): self.avg.weight.add_(1)
    def state_dict(self): return dict(avg=self.state_of('avg'))
    def load_state_dict(self, sd): self.load_or_keep('avg', sd['avg'])

def test_load_applies_callback_state_at_once_or_when_fit_makes_its_object(tmp_path):
    learn = small_learner(tmp_path)
    learn.add_cb(Averager())
    learn.fit(1)
    saved = learn.cbs[[type(c) for c in learn.cbs].index(Averager)].avg.weight.clone()
    path = learn.save(tmp_path/'ck.pt')
    fresh = small_learner(tmp_path)
    avg = Averager()
    fresh.add_cb(avg)
    fresh.load(path)                                   # before any fit: kept...
    assert avg.avg is None and torch.equal(avg.state_dict()['avg']['weight'], saved)  # ...and saved again as it is
    fresh.fit(1, train=False)                          # fit makes the object, which gets the state
    assert torch.equal(avg.avg.weight, saved)
    with torch.no_grad(): avg.avg.weight.zero_()
    fresh.load(path)                                   # the object exists: loaded at once
    assert torch.equal(avg.avg.weight, saved)
    assert fresh.metrics.history == learn.metrics.history  # MetricsCB's history came back too

def test_load_warns_about_callback_state_the_learner_lacks(tmp_path):
    learn = small_learner(tmp_path)
    learn.fit(1)
    path = learn.save(tmp_path/'ck.pt')
    bare = Learner(learn.model, learn.dls, F.cross_entropy, cbs=[TrainCB()])
    with pytest.warns(UserWarning, match=r"state for callbacks \['MetricsCB'\] that this Learner lacks"):
        bare.load(path)

# --- what a resume refuses; the metrics on disk

import warnings
from miniai.checkpoint import CSVLoggerCB, TensorBoardCB

def tiny_learner(folder, step=None, *cbs):
    data = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))]*3
    return Learner(nn.Linear(2, 2), SimpleNamespace(train=data, valid=data), F.cross_entropy,
                   cbs=[step or TrainCB(), CheckpointCB(folder), *cbs])

def test_resume_refuses_a_checkpoint_of_another_precision(tmp_path):
    from miniai.accel import MixedPrecision
    tiny_learner(tmp_path).fit(1)
    with warnings.catch_warnings(), \
         pytest.raises(ValueError, match='trained in fp32, this run trains in bf16; resume it in fp32'):
        warnings.simplefilter('ignore')  # bf16 on a CPU without it: slow, but this fit never gets to train
        tiny_learner(tmp_path, MixedPrecision(dtype='bf16')).fit(2, cbs=ResumeCB())

def test_a_folder_a_live_run_writes_is_refused_and_a_dead_runs_lock_is_not(tmp_path):
    tiny_learner(tmp_path).fit(1)
    hold = ("import sys, time\nfrom miniai.checkpoint import lock_folder\nf = lock_folder(sys.argv[1])\n"
            "print('locked', flush=True)\ntime.sleep(120)")
    p = subprocess.Popen([sys.executable, '-c', hold, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == 'locked\n'
        before = {f: f.read_bytes() for f in tmp_path.iterdir()}
        for fit in (lambda: tiny_learner(tmp_path).fit(2, cbs=ResumeCB()), lambda: tiny_learner(tmp_path).fit(1)):
            with pytest.raises(ValueError,
                               match=f'^{tmp_path} is being written by a live run; wait for it to end, or stop it$'):
                fit()
        assert {f: f.read_bytes() for f in tmp_path.iterdir()} == before
    finally: p.kill(); p.wait()
    assert (tmp_path/'lock').exists()  # left by the killed process: the system has let its lock go
    tiny_learner(tmp_path).fit(2, cbs=ResumeCB())

def test_csv_logger_needs_metrics_and_rewrites_a_stale_file(tmp_path):
    with pytest.raises(ValueError, match=r"add MetricsCB\(\) to cbs"):
        tiny_learner(tmp_path, None, CSVLoggerCB(tmp_path/'m.csv')).fit(1)
    (tmp_path/'m.csv').write_text('rows of another run\n')
    learn = tiny_learner(tmp_path/'c', None, MetricsCB(), CSVLoggerCB(tmp_path/'m.csv'))
    learn.fit(2)
    rows = (tmp_path/'m.csv').read_text().splitlines()
    assert (rows[0] == 'loss,epoch,train' and len(rows) == 5 and rows[1].endswith(',0,train')
            and rows[4].endswith(',1,eval'))

def test_tensorboard_writes_the_metrics_rows(tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    learn = tiny_learner(tmp_path/'c', None, MetricsCB(), TensorBoardCB(tmp_path/'tb'))
    learn.fit(2)
    ea = EventAccumulator(str(tmp_path/'tb')).Reload()
    for phase, train in (('train', True), ('eval', False)):
        got = [(s.step, s.value) for s in ea.Scalars(f'loss/{phase}')]
        assert got == [(h['epoch'], pytest.approx(h['loss'])) for h in learn.metrics.history if h['train'] == train]
