"""DDPM sample quality on a CPU (the first study; `miniai ddpm` now prints FID/KID itself): \
FID/KID and time of DDPM (1000 steps) vs DDIM (100, 50 steps), raw vs EMA weights.

    python benchmarks/ddpm_fid.py             # the measured configuration, ~27 min on 1 core (AMD EPYC)
    python benchmarks/ddpm_fid.py --small     # a ~1 minute smoke run (tiny model, N=32); numbers mean nothing
    python benchmarks/ddpm_fid.py --ddpm-raw on   # always add the DDPM 1000 raw-weights row (another ~1000·N evals)

What it does, all on the bundled Fashion-MNIST sample (7,226 training / 1,000 held-out images, 28×28 padded to 32×32
and scaled to [-1, 1]):

1. trains a small noise-predicting UNet with `miniai.ddpm_run.train_ddpm` (paper's 1000-step linear schedule, Adam,
   one-cycle lr, EMA copy of the weights), seed 0;
2. trains the FID classifier with `miniai.fid.train_fid_classifier` (seed 0) and builds `ImageEval` \
on the held-out images
   `valid[N:]` (the reference set);
3. generates N images per row, each row from a generator seeded the same way, so every row starts from the same
   x_T (and raw/EMA rows of one sampler follow exactly the same noise), in chunks of `--chunk` images;
4. scores each row by FID and KID against the reference, with a bootstrap sd over the N generated images, and
   the two references: N held-out real images `valid[:N]` (disjoint from the reference) and N images of clipped
   Gaussian noise;
5. saves `--png` (raw vs EMA, DDIM 100, same starting noise: rows alternate raw / EMA, 8 images each) and
   `--png-samplers` (DDPM 1000 / DDIM 100 / DDIM 50, EMA weights, same starting noise, one row each).

Row order: DDPM 1000 EMA, DDIM 100 EMA, DDIM 50 EMA, DDIM 100 raw, DDIM 50 raw, then DDPM 1000 raw when
`--ddpm-raw on`, or with `auto` (the default) when the time it is expected to take (the DDPM EMA row's) still fits
in `--budget-min` minutes from the start.
"""
import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch

from _common import machine
from miniai.ddpm import ddim_sample, sample
from miniai.ddpm_run import train_ddpm
from miniai.fid import ImageEval, ddpm_images, fid, kid, train_fid_classifier
from miniai.datasets import fashion_mnist_arrays, get_grid, show_image

HERE = Path(__file__).resolve().parent
FULL = dict(channels='16,32,32', layers=1, groups=8, epochs=10, bs=64, lr=2e-3, ema=0.995, n=200, chunk=100,
            clf_epochs=3, budget_min=36., n_steps=1000)
SMALL = dict(channels='8,16', layers=1, groups=4, epochs=1, bs=64, lr=2e-3, ema=0.9, n=32, chunk=32,
             clf_epochs=1, budget_min=2., n_train=512, n_steps=100)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--small', action='store_true', help='smoke run: ' + ' '.join(f'--{k.replace("_", "-")} {v}'
                   for k, v in SMALL.items()) + ' (explicit flags still win)')
    p.add_argument('--channels', help=f"UNet channels per level (default {FULL['channels']})")
    p.add_argument('--layers', type=int, help=f"resnet blocks per level (default {FULL['layers']})")
    p.add_argument('--groups', type=int, help=f"GroupNorm groups (default {FULL['groups']})")
    p.add_argument('--epochs', type=int, help=f"DDPM training epochs (default {FULL['epochs']})")
    p.add_argument('--bs', type=int, help=f"DDPM batch size (default {FULL['bs']})")
    p.add_argument('--lr', type=float, help=f"one-cycle max lr (default {FULL['lr']})")
    p.add_argument('--ema', type=float, help=f"EMA decay (default {FULL['ema']})")
    p.add_argument('--n-train', type=int, help='use only the first N training images (default: all 7,226)')
    p.add_argument('--n-steps', type=int, help='diffusion steps T of the linear schedule (default 1000)')
    p.add_argument('--n', type=int,
                   help=f"images per row, and real images for the real-vs-real row (default {FULL['n']})")
    p.add_argument('--chunk', type=int, help=f"images per sampling call (default {FULL['chunk']})")
    p.add_argument('--clf-epochs', type=int, help=f"FID classifier epochs (default {FULL['clf_epochs']})")
    p.add_argument('--ddpm-raw', choices=('auto', 'on', 'off'), default='auto',
                   help="the DDPM raw-weights row: 'auto' runs it if it should fit in --budget-min")
    p.add_argument('--ddim-rederive', choices=('on', 'off'), default='on',
                   help="DDIM's eps re-derived from the clipped x0 ('on', ddim_sample's default since it was found "
                        "to help; runs 1 and 2 in RESULTS.md were made before, as 'off')")
    p.add_argument('--budget-min', type=float, help=f"time budget for 'auto' (default {FULL['budget_min']})")
    p.add_argument('--seed', type=int, default=0, help='seed for training, classifier and sampling (default 0)')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1)')
    p.add_argument('--boot', type=int, default=100, help='bootstrap resamples for the sd columns (default 100)')
    p.add_argument('--png', type=Path, help='raw vs EMA picture (default benchmarks/ddpm_fid.png; small: /tmp)')
    p.add_argument('--png-samplers', type=Path, help='samplers picture (default benchmarks/ddpm_fid_samplers.png)')
    a = p.parse_args(argv)
    for k, v in (SMALL if a.small else FULL).items():
        if getattr(a, k, None) is None: setattr(a, k, v)
    a.channels = tuple(int(c) for c in str(a.channels).split(','))
    out = Path('/tmp') if a.small else HERE
    if a.png is None: a.png = out/'ddpm_fid.png'
    if a.png_samplers is None: a.png_samplers = out/'ddpm_fid_samplers.png'
    return a


def load(): return '/'.join(f'{l:.2f}' for l in os.getloadavg())


T0 = time.perf_counter()
def log(msg): print(f'[{time.perf_counter() - T0:7.1f}s load {os.getloadavg()[0]:.2f}] {msg}', flush=True)


def gen_images(fn, model, n, chunk, seed, label, **kw):
    "n images from sampler `fn`, `chunk` at a time, all from one generator seeded `seed`; returns (images, secs)."
    g = torch.Generator().manual_seed(seed)
    out, t0 = [], time.perf_counter()
    for i in range(0, n, chunk):
        out.append(fn(model, (min(chunk, n - i), 1, 32, 32), generator=g, **kw))
        log(f'  {label}: {i + len(out[-1])}/{n} images, {time.perf_counter() - t0:.1f}s')
    return torch.cat(out), time.perf_counter() - t0


def scores(ie, feats, boot, seed):
    "FID and KID of generated features against the reference, and their bootstrap sd over the generated items."
    f, k = fid(feats, ie.feats), kid(feats, ie.feats)
    ref = ie.feats
    d, m = feats.shape[1], len(ref)
    kern = lambda x, y: (x@y.T/d + 1)**3  # KID's kernel, as in miniai.fid.kid
    krr = kern(ref, ref)
    t_rr = (krr.sum() - krr.diagonal().sum())/(m*(m - 1))  # the reference's term is the same for every resample
    k_gg, k_gr = kern(feats, feats), kern(feats, ref).mean(1)
    g = torch.Generator().manual_seed(seed)
    fb, kb = [], []
    for _ in range(boot):
        idx = torch.randint(0, len(feats), (len(feats),), generator=g)
        n, kgg = len(idx), k_gg[idx][:, idx]
        fb.append(fid(feats[idx], ref))
        kb.append(((kgg.sum() - kgg.diagonal().sum())/(n*(n - 1)) + t_rr - 2*k_gr[idx].mean()).item())
    sd = lambda v: torch.tensor(v).std().item() if len(v) > 1 else float('nan')
    return f, sd(fb), k, sd(kb)


def save_rows(rows, path, ncol=8):
    ("Save image rows [(label, images (n,1,32,32) in [-1,1])] as a PNG, `ncol` images a row, "
     "drawn as `show_images` does.")
    import matplotlib.pyplot as plt
    fig, axs = get_grid(len(rows)*ncol, ncols=ncol, imsize=1)
    for r, (label, imgs) in enumerate(rows):
        for c, ax in enumerate(axs[r*ncol:(r + 1)*ncol]):
            if c < len(imgs): show_image(imgs[c].clamp(-1, 1), ax=ax, vmin=-1, vmax=1)
            else: ax.set_axis_off()
        axs[r*ncol].text(-0.1, 0.5, label, transform=axs[r*ncol].transAxes, ha='right', va='center', fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches='tight')
    plt.close(fig)
    return path


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    print(f'machine: {machine()}', flush=True)
    print(f'load average (1/5/15 min) at start: {load()}', flush=True)
    print(f'command: python {" ".join(sys.argv)}', flush=True)

    # 1. the DDPM
    cfg = dict(epochs=a.epochs, bs=a.bs, lr=a.lr, n_steps=a.n_steps, sched='linear', source='sample',
               channels=a.channels, layers=a.layers, groups=a.groups, attn=False, ema=a.ema, n_train=a.n_train,
               device='cpu', seed=a.seed)
    log(f'training DDPM: {cfg}')
    t0, c0 = time.perf_counter(), time.process_time()
    run = train_ddpm(**cfg, progress=True)
    train_wall, train_cpu = time.perf_counter() - t0, time.process_time() - c0
    n_params = sum(p.numel() for p in run.model.parameters())
    n_batches = run.ema_model.n_averaged.item()
    hist = run.learn.metrics.history
    last = {k: v for k, v in hist[-1].items()} if hist else {}
    log(f'trained: {n_params:,} params, {n_batches} optimizer steps, {train_wall:.0f}s wall ({train_cpu:.0f}s CPU); '
        f'last epoch metrics {hist[-2:] if hist else None}')
    run.model.eval(); run.ema_model.eval()
    ema_model = run.ema_model.module  # the averaged UNet itself

    # 2. the FID classifier and the reference
    t0 = time.perf_counter()
    clf, acc = train_fid_classifier(epochs=a.clf_epochs, source='sample', device='cpu', seed=a.seed)
    clf_secs = time.perf_counter() - t0
    x_valid = ddpm_images(fashion_mnist_arrays('sample')['valid'][0])
    if not 2 <= a.n <= len(x_valid) - 2: raise SystemExit(f'--n must leave a reference: 2 <= n <= {len(x_valid) - 2}')
    ie = ImageEval(clf[:-1], x_valid[a.n:])  # the features: the classifier without its last layer
    log(f'FID classifier: {a.clf_epochs} epochs, held-out accuracy {acc:.4f}, {clf_secs:.0f}s; '
        f'reference = held-out images valid[{a.n}:] ({len(x_valid) - a.n} images)')

    rows = []  # (sampler, weights, steps, images or None, secs)
    real = x_valid[:a.n]
    noise = torch.randn(a.n, 1, 32, 32, generator=torch.Generator().manual_seed(a.seed)).clamp(-1, 1)
    rows.append(('real held-out images', '—', '—', real, None))
    rows.append(('Gaussian noise, clipped', '—', '—', noise, None))

    # 3. the samplers
    sched, imgs = run.sched, {}
    plan = [('DDPM', 'EMA', 1000), ('DDIM', 'EMA', 100), ('DDIM', 'EMA', 50), ('DDIM', 'raw', 100),
            ('DDIM', 'raw', 50), ('DDPM', 'raw', 1000)]
    for kind, w, steps in plan:
        model = ema_model if w == 'EMA' else run.model
        if (kind, w) == ('DDPM', 'raw'):
            if a.ddpm_raw == 'off': continue
            est = imgs[('DDPM', 'EMA', len(sched))][1]
            left = a.budget_min*60 - (time.perf_counter() - T0)
            if a.ddpm_raw == 'auto' and est > left - 30:  # 30s for scoring and pictures
                log(f'skipping DDPM raw: expected {est:.0f}s, {left:.0f}s left of --budget-min {a.budget_min:g}')
                continue
        label = f'{kind} {steps if kind == "DDIM" else len(sched)} {w}'
        log(f'sampling {label}')
        if kind == 'DDPM':
            x, secs = gen_images(sample, model, a.n, a.chunk, a.seed, label, sched=sched)
            steps = len(sched)
        else:
            x, secs = gen_images(ddim_sample, model, a.n, a.chunk, a.seed, label, sched=sched, steps=steps,
                                 rederive=a.ddim_rederive == 'on')
        imgs[(kind, w, steps)] = (x, secs)
        rows.append((kind, w, steps, x, secs))
        log(f'{label}: {secs:.1f}s, {secs/a.n:.3f}s/image')

    # 4. scores
    res = []
    for i, (kind, w, steps, x, secs) in enumerate(rows):
        f, fsd, k, ksd = scores(ie, ie.get_feats(x), a.boot, a.seed + i)
        res.append((kind, w, steps, f, fsd, k, ksd, secs))

    # 5. pictures
    if ('DDIM', 'raw', 100) in imgs:
        raw, ema = imgs[('DDIM', 'raw', 100)][0], imgs[('DDIM', 'EMA', 100)][0]
        save_rows([('DDIM 100, raw', raw[:8]), ('DDIM 100, EMA', ema[:8]),
                   ('DDIM 100, raw', raw[8:16]), ('DDIM 100, EMA', ema[8:16])], a.png)
        log(f'saved {a.png} ({a.png.stat().st_size/1024:.0f} KB)')
    sp = [(f'{kind} {steps}, {w}', imgs[(kind, w, steps)][0][:8]) for kind, w, steps in
          [('DDPM', 'EMA', len(sched)), ('DDIM', 'EMA', 100), ('DDIM', 'EMA', 50), ('DDPM', 'raw', len(sched))]
          if (kind, w, steps) in imgs]
    save_rows(sp, a.png_samplers)
    log(f'saved {a.png_samplers} ({a.png_samplers.stat().st_size/1024:.0f} KB)')

    # 6. report
    total = time.perf_counter() - T0
    print()
    print(f'machine: {machine()}')
    print(f'load average (1/5/15 min) at end: {load()}')
    print(f'DDPM UNet: channels {a.channels}, {a.layers} resnet block(s) per level, groups {a.groups}, no attention, '
          f'{n_params:,} parameters; linear schedule, T={len(sched)}; {a.epochs} epochs of '
          f'{a.n_train or 7226} images at bs {a.bs} = {n_batches} steps, Adam, one-cycle lr {a.lr:g}, '
          f'EMA decay {a.ema:g}; seed {a.seed}')
    if hist:
        print(f'DDPM training: {train_wall:.0f}s wall ({train_cpu:.0f}s CPU); last epoch losses: {hist[-2:]}')
    print(f'FID classifier: {a.clf_epochs} epochs, held-out accuracy {acc:.1%}, {clf_secs:.0f}s')
    print(f'reference: {len(x_valid) - a.n} held-out images (valid[{a.n}:]); every row N={a.n} images; '
          f'sampling in chunks of {a.chunk}; ± = bootstrap sd over the N images ({a.boot} resamples)')
    print(f'total run time: {total:.0f}s ({total/60:.1f} min)')
    print()
    print('| sampler | weights | steps | N | FID | KID ×10³ | seconds | s/image |')
    print('|---|---|---|---|---|---|---|---|')
    for kind, w, steps, f, fsd, k, ksd, secs in res:
        t = ('—', '—') if secs is None else (f'{secs:.0f}', f'{secs/a.n:.3f}')
        print(f'| {kind} | {w} | {steps} | {a.n} | {f:.2f} ± {fsd:.2f} | {k*1e3:.2f} ± {ksd*1e3:.2f} | '
              f'{t[0]} | {t[1]} |')
    return res


if __name__ == '__main__':
    main()
