"""How much slower is one epoch through `Learner` + callbacks than a hand-written loop doing the same work?

Both sides train the same tiny MLP (784-50-10) with SGD at bs 64 on the bundled Fashion-MNIST sample, then run
the validation set, and both compute the same metrics: the size-weighted mean loss and the accuracy, accumulated
on the device and read once per epoch. The model is so small that the Python cost per batch shows up clearly,
which is what this measures. Timings alternate Learner and hand loop (ABAB, order flipped every pair) so that load
from other processes hits both alike; we report medians after a warm-up, of wall-clock time and of this process's
CPU time (which other processes disturb less). Besides the shipped Learner it times ablations that take one piece
of the design away (MetricsCB's buffered updates, the one-read finite check, ProgressCB, the metrics) to show where
the time goes.

    python benchmarks/learner_overhead.py            # ~30 s on an idle 2-core machine (2-4x that when shared)
    python benchmarks/learner_overhead.py --quick    # the shipped Learner only
    python benchmarks/learner_overhead.py --profile  # also: cProfile of the Learner, top functions by own time
"""
import argparse
import contextlib
import copy
import cProfile
import io
import os
import pstats
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn, optim
from torcheval.metrics import Mean, MulticlassAccuracy

import miniai.learner as ml
from _common import machine
from miniai.datasets import fashion_dls
from miniai.learner import DeviceCB, Learner, MetricsCB, ProgressCB, TrainCB

GOAL = 1.03  # Learner/hand-loop epoch time we aim for
SHIPPED = 'Learner + 4 callbacks (as shipped)'
BUFFER = MetricsCB().buffer  # batches MetricsCB collects before updating its torcheval metrics
LR, BS, SEED = 0.1, 64, 42


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
# Ablations: each takes one piece of the shipped design away, to show what it costs or saves.
def unbuffered_cbs():
    "MetricsCB updating its torcheval metrics every batch (buffer=1), as the course's MetricsCB does."
    return [TrainCB(), DeviceCB(), MetricsCB(accuracy=MulticlassAccuracy(), buffer=1), ProgressCB()]


def _patch_check(make):
    "A context manager that swaps `miniai.learner.check_finite` for `make(original)` while it is active."
    @contextlib.contextmanager
    def _cm():
        orig = ml.check_finite
        ml.check_finite = make(orig)
        try: yield
        finally: ml.check_finite = orig
    return _cm


def _tensor_check(orig):
    "The course-style check: three tensor ops (`isfinite`, `all`, `bool`) per batch instead of one `.item()`."
    def check_finite(learn):
        if not torch.isfinite(learn.loss).all(): orig(learn)
    return check_finite


tensor_finite_check = _patch_check(_tensor_check)
no_finite_check = _patch_check(lambda orig: lambda learn: None)  # what the check costs at all


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
    "Same weights and data order: the hand loop and the Learner (buffered or not) must report the same metrics."
    torch.manual_seed(0)
    m = get_model()
    hand, lrn, lrn_1 = Hand(copy.deepcopy(m)), Lrn(copy.deepcopy(m)), Lrn(copy.deepcopy(m), unbuffered_cbs())
    with contextlib.redirect_stdout(io.StringIO()):
        hand.run(n_epochs); lrn.run(n_epochs); lrn_1.run(n_epochs)
    for got in (lrn.learn.metrics.history, lrn_1.learn.metrics.history):
        if len(got) != len(hand.history): raise AssertionError(f'{len(got)} Learner records vs {len(hand.history)}')
        for h, g in zip(hand.history, got):
            for k in ('accuracy', 'loss'):
                if abs(h[k] - g[k]) > 1e-5:
                    raise AssertionError(f'hand loop and Learner disagree on {k}: {h[k]} vs {g[k]}')
    bad = type('FakeLearner', (), dict(loss=torch.tensor(float('nan')), epoch=0, iter=0))()
    try: ml.check_finite(bad)  # the cheap check must still stop a NaN loss
    except FloatingPointError: pass
    else: raise AssertionError('check_finite let a NaN loss through')
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

    def buffered():  # what MetricsCB does per batch, flush included
        buf.append((preds.detach(), targ, loss.detach(), BS))
        if len(buf) >= BUFFER:
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
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--pairs', type=int, default=15, help='ABAB pairs per comparison')
    p.add_argument('--epochs', type=int, default=1, help='epochs per timed run')
    p.add_argument('--threads', type=int, default=1,
                   help='torch threads (default 1: the model is tiny and the 2-core machine is shared)')
    p.add_argument('--quick', action='store_true', help='only the shipped Learner, no ablations')
    p.add_argument('--profile', action='store_true', help='also print a cProfile of the Learner')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print('machine:', machine())

    last = check_same_work()
    print(f"same work checked: hand loop and Learner (buffered and per-batch metric updates) agree (last valid loss "
          f"{last['loss']:.4f}, accuracy {last['accuracy']:.4f})")

    torch.manual_seed(0)
    m = get_model()
    hand = Hand(copy.deepcopy(m))
    n_batches = len(hand.dls.train) + len(hand.dls.valid)
    print(f'{n_batches} batches per epoch ({len(hand.dls.train)} train at bs {BS}, {len(hand.dls.valid)} valid at '
          f'bs {2*BS}); {args.pairs} ABAB pairs of {args.epochs} epoch(s) each; medians; MetricsCB buffers '
          f'{BUFFER} batches\n')
    plain = contextlib.nullcontext
    shipped = lambda: Lrn(copy.deepcopy(m))
    core = lambda: Lrn(copy.deepcopy(m), [TrainCB(), DeviceCB()])
    variants = {  # name: (make the runner, patch active while it runs)
        SHIPPED: (shipped, plain),
        'ablation: metrics updated every batch': (lambda: Lrn(copy.deepcopy(m), unbuffered_cbs()), plain),
        'ablation: tensor finite check': (shipped, tensor_finite_check),
        'ablation: no ProgressCB': (lambda: Lrn(copy.deepcopy(m), [TrainCB(), DeviceCB(), MetricsCB(
            accuracy=MulticlassAccuracy())]), plain),
        'ablation: TrainCB + DeviceCB only': (core, plain),
        'ablation: TrainCB + DeviceCB, no check': (core, no_finite_check)}
    if args.quick: variants = {SHIPPED: variants[SHIPPED]}
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
    w, c = rows[SHIPPED]
    print(f'Learner/hand loop: {w[2]:.3f}x wall, {c[2]:.3f}x CPU  '
          f'(goal <= {GOAL}x on wall clock: {ok(w[2])}; CPU: {ok(c[2])})')

    c = per_batch_update_cost()
    print(f"\nCPU µs per batch of {BS} (best of 5): torcheval MulticlassAccuracy.update {c['tv_acc']:.1f}, "
          f"Mean.update {c['tv_mean']:.1f} (together {c['tv_acc'] + c['tv_mean']:.1f}); hand-written argmax/eq/sum "
          f"{c['hand_acc']:.1f}, loss sum {c['hand_mean']:.1f} (together {c['hand_acc'] + c['hand_mean']:.1f}); "
          f"both torcheval updates buffered x{BUFFER} (MetricsCB's default) {c['buffered']:.1f}")
    if args.profile: print('\n' + profile_learner())
    print('load average at end:', ', '.join(f'{x:.2f}' for x in os.getloadavg()))


if __name__ == '__main__': main()
