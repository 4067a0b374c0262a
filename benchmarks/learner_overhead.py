"""How much slower is one epoch through `Learner` + callbacks than a hand-written loop doing the same work?

Both sides train the same tiny MLP (784-50-10) with SGD at bs 64 on the bundled Fashion-MNIST sample, then run
the validation set, and both compute the same metrics: the size-weighted mean loss and the accuracy, accumulated
on the device and read once per epoch. The model is so small that the Python cost per batch shows up clearly,
which is what this measures. Timings alternate Learner and hand loop (ABAB, order flipped every pair) so that load
from other processes hits both alike; we report medians after a warm-up, of wall-clock time and of this process's
CPU time (which other processes disturb less). Besides the shipped Learner it times two proposed changes to
miniai.learner (A, B below, monkeypatched for the run) and a few ablations that show where the time goes.

    python benchmarks/learner_overhead.py            # ~30 s on an idle 2-core machine (2-4x that when shared)
    python benchmarks/learner_overhead.py --quick    # shipped Learner and the proposed changes only
    python benchmarks/learner_overhead.py --profile  # also: cProfile of the Learner, top functions by own time
"""
import argparse
import contextlib
import copy
import cProfile
import io
import math
import os
import platform
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn, optim
from torcheval.metrics import Mean, MulticlassAccuracy

import miniai.learner as ml
from miniai.datasets import fashion_dls
from miniai.learner import DeviceCB, Learner, MetricsCB, ProgressCB, TrainCB

GOAL = 1.03  # Learner/hand-loop epoch time we aim for
LR, BS, SEED = 0.1, 64, 42


def machine(threads):
    "One line saying what this ran on."
    cpu = platform.processor() or '?'
    with contextlib.suppress(OSError), open('/proc/cpuinfo') as f:
        cpu = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), cpu)
    load = ', '.join(f'{x:.2f}' for x in os.getloadavg())
    return (f'{platform.platform()} | {cpu} | {os.cpu_count()} cores | torch {torch.__version__} | '
            f'torch threads {threads} | load average {load}')


def get_model():
    return nn.Sequential(nn.Linear(784, 50), nn.ReLU(), nn.Linear(50, 10))


# ---------------------------------------------------------------------------------------------------------------
# The hand-written loop: what a careful person writes without a framework, with the same metrics as MetricsCB.
def hand_epoch(model, opt, dls, epoch, device='cpu'):
    "One training and one validation pass; prints loss and accuracy per pass like MetricsCB does."
    out = []
    for training, dl in ((True, dls.train), (False, dls.valid)):
        model.train(training)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        n = 0
        with torch.set_grad_enabled(training):
            for xb, yb in dl:
                xb, yb = xb.to(device), yb.to(device)
                preds = model(xb)
                loss = F.cross_entropy(preds, yb)
                if training:
                    loss.backward()
                    opt.step()
                    opt.zero_grad()
                loss_sum += loss.detach() * len(xb)
                correct += (preds.argmax(1) == yb).sum()
                n += len(xb)
        res = dict(accuracy=correct.item() / n, loss=loss_sum.item() / n, epoch=epoch, train=training)
        print({k: f'{v:.3f}' if isinstance(v, float) else v for k, v in res.items()})
        out.append(res)
    return out


class Hand:
    "The hand loop with its own model, optimizer and data order, so it can be timed epoch by epoch."
    def __init__(self, model):
        self.model, self.dls, self.epoch = model, fashion_dls(bs=BS, flat=True, source='sample', seed=SEED), 0
        self.opt = optim.SGD(model.parameters(), LR)
        self.history = []
    def run(self, n=1):
        for _ in range(n):
            self.history.extend(hand_epoch(self.model, self.opt, self.dls, self.epoch))
            self.epoch += 1


class Lrn:
    "The Learner with the callbacks under test."
    def __init__(self, model, cbs=None):
        dls = fashion_dls(bs=BS, flat=True, source='sample', seed=SEED)
        if cbs is None: cbs = default_cbs()
        self.learn = Learner(model, dls, F.cross_entropy, lr=LR, cbs=cbs, opt_func=optim.SGD)
    def run(self, n=1): self.learn.fit(n)


def default_cbs():
    return [TrainCB(), DeviceCB(), MetricsCB(accuracy=MulticlassAccuracy()), ProgressCB()]


# ---------------------------------------------------------------------------------------------------------------
# Proposed change A to miniai.learner, tried here by monkeypatching (see RESULTS.md): MetricsCB keeps each batch's
# detached preds, targets and loss, and hands them to the torcheval metrics FLUSH batches at a time. torcheval's
# update costs tens of µs per call whatever the batch size (inference_mode, input checks, small tensor
# allocations), so calling it 1/FLUSH as often removes nearly all of that, and the results are the same because
# the metrics sum over samples. Only the loss is kept when there are no other metrics, so big preds are never held.
# Measured here: flushing every 16 batches gives ~1.03x, every 64 ~1.01x, once per epoch ~1.00x; 64 bounds the
# memory held to 64 batches of predictions.
FLUSH = 64


def buffered_before_epoch(self, learn):
    _orig['before_epoch'](self, learn)
    self._buf = []


def buffered_after_batch(self, learn):
    preds, n_inp = learn.preds, getattr(learn, 'n_inp', 1)
    if preds.device != self._dev:
        self._dev = preds.device
        for m in self.all_metrics.values(): m.to(self._dev)
    y = learn.batch[n_inp] if self.metrics else None
    self._buf.append((preds.detach() if self.metrics else None, y, learn.loss.detach(), len(learn.batch[0])))
    if len(self._buf) >= FLUSH: buffered_flush(self)


def buffered_flush(self):
    if not self._buf: return
    preds, ys, losses, ns = zip(*self._buf)
    self._buf = []
    if self.metrics:
        p, y = torch.cat(preds), torch.cat(ys)
        for m in self.metrics.values(): m.update(p, y)
    losses = torch.stack(losses).float()
    self.loss.update(losses, weight=torch.tensor(ns, dtype=losses.dtype, device=losses.device))


def buffered_after_epoch(self, learn):
    buffered_flush(self)
    _orig['after_epoch'](self, learn)


def buffered_state_dict(self):
    if getattr(self, '_buf', None): buffered_flush(self)  # a mid-epoch checkpoint must see every batch so far
    return _orig['state_dict'](self)


_patch = dict(before_epoch=buffered_before_epoch, after_batch=buffered_after_batch, after_epoch=buffered_after_epoch,
              state_dict=buffered_state_dict)
_orig = {k: getattr(MetricsCB, k) for k in _patch}


@contextlib.contextmanager
def buffered_metrics():
    "MetricsCB with the proposed buffered updates, for the duration of the `with`."
    for k, f in _patch.items(): setattr(MetricsCB, k, f)
    try: yield
    finally:
        for k, f in _orig.items(): setattr(MetricsCB, k, f)


# Proposed change B: TrainCB.backward checks the loss with `torch.isfinite(loss).all()` and a bool, three tensor
# ops (and a host sync on a GPU) per batch. For the usual scalar loss, `math.isfinite(loss.item())` gives the same
# answer in one cheap read; only a bad or non-scalar loss goes on to the original check (which raises the error).
def _patch_check(new):
    @contextlib.contextmanager
    def _cm():
        orig = getattr(ml, 'check_finite', None)
        if orig is not None: ml.check_finite = new(orig)
        try: yield
        finally:
            if orig is not None: ml.check_finite = orig
    return _cm


def _cheap(orig):
    def check_finite(learn):
        loss = learn.loss
        if loss.numel() != 1 or not math.isfinite(loss.item()): orig(learn)
    return check_finite


cheap_finite_check = _patch_check(_cheap)                   # change B
no_finite_check = _patch_check(lambda orig: lambda learn: None)  # ablation: what the check costs at all


@contextlib.contextmanager
def both_changes():
    with buffered_metrics(), cheap_finite_check(): yield


# ---------------------------------------------------------------------------------------------------------------
def time_once(runner, n_epochs):
    "(wall, CPU) seconds per epoch; CPU time of this process is what other processes on the machine disturb least."
    with contextlib.redirect_stdout(io.StringIO()):  # not a tty: ProgressCB prints a table, no bars
        w0, c0 = time.perf_counter(), time.process_time()
        runner.run(n_epochs)
        return (time.perf_counter() - w0) / n_epochs, (time.process_time() - c0) / n_epochs


def abab(a, b, pairs, n_epochs, patch_a=contextlib.nullcontext):
    "Times of `a` and `b` taken in alternating order (flipped every pair): lists of (wall, cpu) for each."
    ta, tb = [], []
    for i in range(pairs):
        for j in ((0, 1) if i % 2 == 0 else (1, 0)):
            if j == 0:
                with patch_a(): ta.append(time_once(a, n_epochs))
            else: tb.append(time_once(b, n_epochs))
    return ta, tb


def summary(ta, tb, k):
    "Median times of a and b, the median of the per-pair ratios, and their interquartile range, for clock `k`."
    a, b = [t[k] for t in ta], [t[k] for t in tb]
    ratios = [x/y for x, y in zip(a, b)]
    q = statistics.quantiles(ratios, n=4)
    return statistics.median(a), statistics.median(b), statistics.median(ratios), (q[0], q[2])


def check_same_work(n_epochs=2):
    "Same weights and data order: hand loop, Learner and Learner with changes A + B must report the same metrics."
    torch.manual_seed(0)
    m = get_model()
    hand, lrn, lrn_buf = Hand(copy.deepcopy(m)), Lrn(copy.deepcopy(m)), Lrn(copy.deepcopy(m))
    with contextlib.redirect_stdout(io.StringIO()):
        hand.run(n_epochs); lrn.run(n_epochs)
        with both_changes(): lrn_buf.run(n_epochs)
    for got in (lrn.learn.metrics.history, lrn_buf.learn.metrics.history):
        if len(got) != len(hand.history): raise AssertionError(f'{len(got)} Learner records vs {len(hand.history)}')
        for h, g in zip(hand.history, got):
            for k in ('accuracy', 'loss'):
                if abs(h[k] - g[k]) > 1e-5: raise AssertionError(f'hand loop and Learner disagree on {k}: {h[k]} vs {g[k]}')
    if hasattr(ml, 'check_finite'):  # change B must still stop a NaN loss with the original error
        bad = type('FakeLearner', (), dict(loss=torch.tensor(float('nan')), epoch=0, iter=0))()
        with cheap_finite_check():
            try: ml.check_finite(bad)
            except FloatingPointError: pass
            else: raise AssertionError('change B let a NaN loss through')
    return got[-1]


def per_batch_update_cost(n=2000):
    "CPU µs per batch: torcheval MulticlassAccuracy/Mean updates, hand-written accumulation, and buffered updates."
    torch.manual_seed(0)
    preds, targ, loss = torch.randn(BS, 10), torch.randint(0, 10, (BS,)), torch.tensor(2.3)
    acc, mean = MulticlassAccuracy(), Mean()
    correct, total = torch.zeros((), dtype=torch.int64), torch.zeros((), dtype=torch.float64)
    buf = []

    def hand_acc():
        nonlocal correct
        correct += (preds.argmax(1) == targ).sum()

    def hand_mean():
        nonlocal total
        total += loss * BS

    def buffered():  # what the proposed MetricsCB does per batch, flush included
        buf.append((preds.detach(), targ, loss.detach(), BS))
        if len(buf) >= FLUSH:
            p, y, l, ns = zip(*buf)
            buf.clear()
            acc.update(torch.cat(p), torch.cat(y))
            l = torch.stack(l).float()
            mean.update(l, weight=torch.tensor(ns, dtype=l.dtype))

    fns = dict(tv_acc=lambda: acc.update(preds, targ), tv_mean=lambda: mean.update(loss, weight=BS),
               hand_acc=hand_acc, hand_mean=hand_mean, buffered=buffered)
    best = {k: float('inf') for k in fns}
    for _ in range(5):  # interleaved, best of 5: the run least disturbed by other processes
        for k, f in fns.items():
            for _ in range(64): f()
            t0 = time.process_time()
            for _ in range(n): f()
            best[k] = min(best[k], (time.process_time() - t0) / n * 1e6)
    return best


def profile_learner(n_epochs=5):
    "cProfile one Learner run; returns the top entries by own time."
    torch.manual_seed(0)
    lrn = Lrn(get_model())
    time_once(lrn, 1)
    pr = cProfile.Profile()
    with contextlib.redirect_stdout(io.StringIO()):
        pr.enable(); lrn.run(n_epochs); pr.disable()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats('tottime').print_stats(22)
    return s.getvalue()


def main():
    global FLUSH
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--pairs', type=int, default=15, help='ABAB pairs per comparison')
    p.add_argument('--epochs', type=int, default=1, help='epochs per timed run')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (default 1: the model is tiny and the 2-core machine is shared)')
    p.add_argument('--flush', type=int, default=FLUSH, help='change A: batches buffered between metric updates')
    p.add_argument('--quick', action='store_true', help='only the shipped Learner and the proposed changes')
    p.add_argument('--fast-data', action='store_true',
                   help="both sides use the get_batch proposed in data_pipeline.py (so data loading weighs less)")
    p.add_argument('--profile', action='store_true', help='also print a cProfile of the Learner')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    FLUSH = args.flush
    print('machine:', machine(torch.get_num_threads()))
    if args.fast_data:
        import sys
        from pathlib import Path
        from miniai.datasets import TensorDL
        sys.path.insert(0, str(Path(__file__).parent))
        from data_pipeline import proposed_get_batch
        TensorDL.get_batch = proposed_get_batch
        print('data: TensorDL.get_batch patched with the version proposed in data_pipeline.py')

    last = check_same_work()
    print(f"same work checked: hand loop, Learner and Learner with changes A + B agree (last valid loss "
          f"{last['loss']:.4f}, accuracy {last['accuracy']:.4f})")

    torch.manual_seed(0)
    m = get_model()
    hand = Hand(copy.deepcopy(m))
    n_batches = len(hand.dls.train) + len(hand.dls.valid)
    print(f'{n_batches} batches per epoch ({len(hand.dls.train)} train at bs {BS}, {len(hand.dls.valid)} valid at '
          f'bs {2*BS}); {args.pairs} ABAB pairs of {args.epochs} epoch(s) each; medians; change A flushes every '
          f'{FLUSH} batches\n')
    plain = contextlib.nullcontext
    shipped = lambda: Lrn(copy.deepcopy(m))
    variants = {  # name: (make the runner, patch active while it runs)
        'Learner + 4 callbacks (as shipped)': (shipped, plain),
        'A: MetricsCB buffers updates': (shipped, buffered_metrics),
        'B: finite check via loss.item()': (shipped, cheap_finite_check),
        'A + B (proposed)': (shipped, both_changes),
        'ablation: no ProgressCB': (lambda: Lrn(copy.deepcopy(m), [TrainCB(), DeviceCB(), MetricsCB(
            accuracy=MulticlassAccuracy())]), plain),
        'ablation: TrainCB + DeviceCB only': (lambda: Lrn(copy.deepcopy(m), [TrainCB(), DeviceCB()]), plain),
        'ablation: TrainCB + DeviceCB, B': (lambda: Lrn(copy.deepcopy(m), [TrainCB(), DeviceCB()]), cheap_finite_check),
        'ablation: TrainCB + DeviceCB, no check': (lambda: Lrn(copy.deepcopy(m), [TrainCB(), DeviceCB()]),
                                                    no_finite_check)}
    if args.quick: variants = {k: variants[k] for k in ('Learner + 4 callbacks (as shipped)', 'A + B (proposed)')}
    print(f"{'':38s} {'wall ms':>8s} {'hand ms':>8s} {'ratio (IQR)':>20s} {'CPU ms':>8s} {'hand ms':>8s} "
          f"{'ratio (IQR)':>20s} {'CPU µs/batch':>12s}")
    rows = {}
    for name, (make, patch) in variants.items():
        lrn = make()
        with patch(): time_once(lrn, 1)  # warm-up
        time_once(hand, 1)
        ta, tb = abab(lrn, hand, args.pairs, args.epochs, patch)
        rows[name] = w, c = summary(ta, tb, 0), summary(ta, tb, 1)
        over = (c[0] - c[1]) / n_batches * 1e6
        print(f'{name:38s} {w[0]*1e3:8.1f} {w[1]*1e3:8.1f} {w[2]:7.3f} ({w[3][0]:.3f}-{w[3][1]:.3f}) '
              f'{c[0]*1e3:8.1f} {c[1]*1e3:8.1f} {c[2]:7.3f} ({c[3][0]:.3f}-{c[3][1]:.3f}) {over:+12.1f}')
    ok = lambda r: 'met' if r <= GOAL else 'NOT met'
    for name, label in (('Learner + 4 callbacks (as shipped)', 'Learner/hand loop'),
                        ('A + B (proposed)', 'with changes A + B')):
        w, c = rows[name]
        print(f'{label}: {w[2]:.3f}x wall, {c[2]:.3f}x CPU  (goal <= {GOAL}x on wall clock: {ok(w[2])}; CPU: {ok(c[2])})')

    c = per_batch_update_cost()
    print(f"\nCPU µs per batch of {BS} (best of 5): torcheval MulticlassAccuracy.update {c['tv_acc']:.1f}, "
          f"Mean.update {c['tv_mean']:.1f} (together {c['tv_acc'] + c['tv_mean']:.1f}); hand-written argmax/eq/sum "
          f"{c['hand_acc']:.1f}, loss sum {c['hand_mean']:.1f} (together {c['hand_acc'] + c['hand_mean']:.1f}); "
          f"both torcheval updates buffered x{FLUSH} {c['buffered']:.1f}")
    if args.profile: print('\n' + profile_learner())
    print('load average at end:', ', '.join(f'{x:.2f}' for x in os.getloadavg()))


if __name__ == '__main__': main()
