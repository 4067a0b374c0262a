"""Training-step time of the DDPM UNet: fp32 (`TrainCB`) vs `MixedPrecision` vs `AccelerateCB`, as ratios to fp32.

    python benchmarks/mixed_precision.py                       # the best device there is, the course's UNet
    python benchmarks/mixed_precision.py --device cuda --bs 128
    python benchmarks/mixed_precision.py --device cpu --small  # well under a minute on a CPU
    python benchmarks/mixed_precision.py --small --results benchmarks/RESULTS.md   # also record the table

Each method trains the same diffusers UNet2DModel (`miniai.ddpm.ddpm_unet`) on the same pre-made batches of
(noised image, step, noise) already on the device, so data loading isn't timed; only the Learner's training step is
(forward, loss, backward, optimizer step, and the callbacks). Methods take turns, `--repeats` times, each timing
`--steps` steps after a warm-up; the table shows the median time per step and its ratio to fp32 in the same run.
MixedPrecision and AccelerateCB run with their defaults, which pick the same precision: fp16 with a GradScaler on
CUDA, bf16 on a CPU with native bf16. On a CPU without it both fall back to fp32, so the ratios show the callbacks'
own overhead; `--cpu-bf16` adds a row with `MixedPrecision(dtype='bf16')`, bf16 autocast anyway, to show why that
fallback exists.
"""
import argparse
import math
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from _common import machine
from miniai.accel import AccelerateCB, MixedPrecision, cpu_has_bf16
from miniai.datasets import DataLoaders
from miniai.ddpm import ddpm_unet, init_ddpm
from miniai.learner import DeviceCB, TrainCB
from miniai.recipe import std_learner

SECTION = '## mixed_precision'
FULL = dict(bs=128, size=32, channels='32,64,128,128', layers=2, steps=10, repeats=5)  # the course's UNet and batch
SMALL = dict(bs=16, size=16, channels='16,32', layers=1, steps=5, repeats=3)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='auto', help="'auto' (cuda if there is one), 'cuda', 'cuda:1', 'cpu'")
    p.add_argument('--bs', type=int, help='batch size (default: 128, as in the course)')
    p.add_argument('--size', type=int, help='image size (default: 32, Fashion-MNIST padded)')
    p.add_argument('--channels', help='UNet channels per level (default: 32,64,128,128)')
    p.add_argument('--layers', type=int, help='resnet blocks per level (default: 2)')
    p.add_argument('--steps', type=int, help='timed training steps per repeat (default: 10)')
    p.add_argument('--warmup', type=int, default=3,
                   help='untimed steps per method first (>= 1: they include accelerate\'s prepare)')
    p.add_argument('--repeats', type=int, help='timings per method, the median is reported (default: 5)')
    p.add_argument('--small', action='store_true', help='quick CPU-sized defaults: ' +
                   ' '.join(f'--{k} {v}' for k, v in SMALL.items()) + ' (flags given explicitly still win)')
    p.add_argument('--threads', type=int, help="torch CPU threads (default: torch's own choice); 1 gives steadier "
                   "timings on a busy shared machine")
    p.add_argument('--cpu-bf16', action='store_true', help='on a CPU, also time MixedPrecision forced to bf16 autocast')
    p.add_argument('--results', type=Path, help="also write the table into this markdown file's '## mixed_precision'")
    a = p.parse_args(argv)
    for k, v in (SMALL if a.small else FULL).items():
        if getattr(a, k) is None: setattr(a, k, v)
    a.channels = tuple(int(c) for c in a.channels.split(','))
    for nm in ('bs', 'size', 'layers', 'steps', 'repeats', 'warmup'):
        if getattr(a, nm) < 1: p.error(f'--{nm} must be >= 1, got {getattr(a, nm)}')
    if a.threads is not None:
        if a.threads < 1: p.error(f'--threads must be >= 1, got {a.threads}')
        torch.set_num_threads(a.threads)
    if a.device == 'auto': a.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if a.device.startswith('cuda') and not torch.cuda.is_available():
        p.error(f"--device {a.device}: this machine has no usable CUDA GPU; use --device cpu")
    return a

def make_batches(a, dev, n):
    "`n` batches (xt, t, eps) of random images, made once on the device."
    g = torch.Generator().manual_seed(0)
    def one():
        x = torch.randn(a.bs, 1, a.size, a.size, generator=g)
        return (x.to(dev), torch.randint(0, 1000, (a.bs,), generator=g).to(dev),
                torch.randn(x.shape, generator=g).to(dev))
    return [one() for _ in range(n)]

def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)

def make_learner(a, dev, train_cb, timed):
    "miniai's standard Learner (`std_learner`: AdamW, one-cycle) with `train_cb` as its training step."
    torch.manual_seed(0)
    model = init_ddpm(ddpm_unet(a.channels, a.layers, groups=min(8, min(a.channels)), size=a.size))
    dls = DataLoaders(timed, timed[:1])  # plain lists of batches: nothing to load
    # each fit plans its own one-cycle over epochs*len(timed) steps: enough for all
    epochs = math.ceil(a.warmup/a.steps)
    cbs = [] if isinstance(train_cb, AccelerateCB) else [DeviceCB(dev)]
    return std_learner(model, dls, F.mse_loss, epochs, lr=1e-3, cbs=cbs, n_inp=2, wd=0., accel=train_cb)

def methods(a, dev):
    "(name, precision label, training callback) for each method to time."
    on_cuda = dev.type == 'cuda'
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # MixedPrecision's fp32 notice on CPUs: the label says it instead
        res = [('fp32 TrainCB', 'fp32', TrainCB(n_inp=2)), ('MixedPrecision', None, MixedPrecision(n_inp=2))]
    acc = AccelerateCB(n_inp=2, **({} if on_cuda else dict(cpu=True)))  # 'auto': the precision MixedPrecision picks
    res.append(('AccelerateCB', {'no': 'no (fp32)'}.get(acc.mixed_precision, acc.mixed_precision), acc))
    if a.cpu_bf16 and not on_cuda:
        res.append(('MixedPrecision, bf16 by name', 'bf16 (emulated)' if not cpu_has_bf16() else 'bf16',
                    MixedPrecision(n_inp=2, dtype='bf16')))
    return res

def fit_steps(learn, dev):
    sync(dev)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(1, valid=False)
    sync(dev)
    return time.perf_counter() - start

def run(a):
    dev = torch.device(a.device)
    if dev.type == 'cuda' and dev.index is not None: torch.cuda.set_device(dev)
    warm, timed = make_batches(a, dev, a.warmup), make_batches(a, dev, a.steps)
    rows = []
    for name, prec, cb in methods(a, dev):
        learn = make_learner(a, dev, cb, timed)
        learn.dls = DataLoaders(warm, warm[:1])
        fit_steps(learn, dev)  # first fit: accelerate's prepare, cuDNN autotuning, allocator warm-up
        learn.dls = DataLoaders(timed, timed[:1])  # AccelerateCB prepares once per Learner, so this is kept as is
        if prec is None: prec = 'fp32 (fallback)' if cb.amp_dtype is None else str(cb.amp_dtype).replace('torch.', '')
        rows.append(dict(name=name, prec=prec, learn=learn, cb=cb, times=[]))
    for _ in range(a.repeats):  # take turns, so a slow patch of the machine hits every method alike
        for r in rows: r['times'].append(fit_steps(r['learn'], dev)/a.steps)
    base = statistics.median(rows[0]['times'])
    for r in rows:
        r['ms'] = statistics.median(r['times'])*1000
        r['ratio'] = r['ms']/1000/base
    return dev, rows

def table(a, dev, rows, secs):
    lines = [f'### {dev.type}', '',
             f'Machine: {machine(dev)} | native bf16: {cpu_has_bf16()}.', '',
             f'Model: diffusers UNet2DModel via `ddpm_unet(channels={a.channels}, layers={a.layers})`, '
             f'{a.size}×{a.size} '
             f'1-channel images, batch size {a.bs}, `std_learner` (AdamW, one-cycle); '
             f'median of {a.repeats} repeats of {a.steps} steps after '
             f'{a.warmup} warm-up steps. Ratio: time per step / fp32 time per step (lower is faster).', '',
             '| method | precision | ms/step | ratio vs fp32 |', '|---|---|---:|---:|']
    lines += [f"| {r['name']} | {r['prec']} | {r['ms']:.1f} | {r['ratio']:.2f} |" for r in rows]
    cmd = 'python benchmarks/mixed_precision.py ' + ' '.join(sys.argv[1:])
    lines += ['', f'Command: `{cmd.strip()}` ({secs:.0f} s in all).']
    return '\n'.join(lines)

def write_results(path, dev_type, text):
    "Put `text` in `path` as the `### {dev_type}` part of the '## mixed_precision' section, leaving the rest alone."
    doc = path.read_text() if path.exists() else '# Benchmark results\n'
    if SECTION not in doc: doc = doc.rstrip('\n') + f'\n\n{SECTION}\n\n' + text + '\n'
    else:
        start = doc.index(SECTION) + len(SECTION)
        nxt = re.search(r'^## ', doc[start:], re.M)
        end = start + nxt.start() if nxt else len(doc)
        section = doc[start:end]
        parts = re.split(r'(?m)^(?=### )', section)
        kept = [p for p in parts if not p.startswith(f'### {dev_type}\n') and p.strip()]
        section = '\n\n' + '\n\n'.join(p.strip('\n') for p in kept + [text]) + '\n\n'
        doc = doc[:start] + section + doc[end:].lstrip('\n')
    path.write_text(doc.rstrip('\n') + '\n')

def main(argv=None):
    start = time.perf_counter()
    a = parse_args(argv)
    dev, rows = run(a)
    text = table(a, dev, rows, time.perf_counter() - start)
    print(text)
    if a.results:
        write_results(a.results, dev.type, text)
        print(f'\nwritten to {a.results} ({SECTION}, ### {dev.type})')

if __name__ == '__main__': main()
