"""What bf16 autocast (and channels_last) buys the main jobs on this CPU: paired timings, ratios and FLOP rates.

    python benchmarks/cpu_precision.py                # one epoch of the recipe, 200 DDPM steps, torch's threads
    python benchmarks/cpu_precision.py --threads 1 --ddpm-steps 100 --repeats 2

In one run, taking turns (`--repeats` rounds, the median reported):
- one epoch of the recipe (`recipe_learner`: augmentation, training, validation) in fp32, bf16 autocast, and bf16 +
  channels_last (what `fit_recipe` does by default on a CPU with native bf16);
- `--ddpm-steps` training steps of `miniai ddpm`'s default UNet (16,32,32), bs 64, through `std_learner`, in fp32 and
  bf16 (channels_last made the UNet slower here, so it doesn't use it);
- sampling: `--sample-n` images (default 500, `miniai ddpm`'s) in `--sample-steps` DDIM steps of the default UNet,
  fp32 with the model called on all images at once, fp32 in chunks of `SAMPLE_BS` (what the samplers do on a CPU),
  and bf16 autocast in chunks;
- each model's bare training step (forward, loss, backward, AdamW; the UNet at bs 64, the default, and at bs 128,
  the issue's measurement) with its FLOPs counted by `torch.utils.flop_counter`, as GFLOP/s and as a fraction of a
  2048² matmul's rate in the same precision, measured in the same run: how close each comes to what this CPU can do.
On a CPU without native bf16 it says so and times fp32 only: emulated bf16 is many times slower.
"""
import argparse
import contextlib
import io
import statistics
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from _common import machine
from miniai.accel import cpu_has_bf16
from miniai.callbacks import CancelFitException, Callback
from miniai.datasets import DataLoaders, fashion_dls, fashion_mnist_arrays
import miniai.ddpm as ddpm
from miniai.ddpm import ddim_sample, ddpm_unet, dl_ddpm, init_ddpm, linear_sched
from miniai.fid import ddpm_images
from miniai.recipe import recipe_learner, recipe_model, std_learner

CL = torch.channels_last


def cpu_flags():
    try:
        with open('/proc/cpuinfo') as f: flags = set(f.read().split())
    except OSError: return 'unknown'
    return ' '.join(sorted(flags & {'avx512_bf16', 'amx_bf16', 'amx_tile', 'avx512f', 'avx2', 'bf16'})) or 'none'


class StopAfter(Callback):
    "End the fit after `n` training batches."
    def __init__(self, n): self.n = n
    def after_batch(self, learn):
        if learn.training and learn.iter + 1 >= self.n: raise CancelFitException()


def recipe_run(dls, precision, fmt):
    learn = recipe_learner(dls, 1, precision=precision, progress=False)
    learn.model.to(memory_format=fmt)
    def run():
        with contextlib.redirect_stdout(io.StringIO()): learn.fit(1)  # MetricsCB's lines
    return run


def ddpm_run(dls, precision, n):
    model = init_ddpm(ddpm_unet((16, 32, 32), 1, 8, False))
    learn = std_learner(model, dls, F.mse_loss, 1, 4e-3, [StopAfter(n)], n_inp=2, wd=0., precision=precision)
    return lambda: learn.fit(1, valid=False)


def sample_run(model, sched, n, steps, bf16, bs):
    def run():
        old, ddpm.SAMPLE_BS = ddpm.SAMPLE_BS, bs
        try:
            with torch.autocast('cpu', torch.bfloat16, enabled=bf16):
                ddim_sample(model, (n, 1, 32, 32), sched, steps, eta=1., generator=torch.Generator().manual_seed(0))
        finally: ddpm.SAMPLE_BS = old
    return run


def take_turns(runs, repeats):
    "Median seconds of each run in `runs`, called in turn `repeats` times after one untimed call each."
    for f in runs.values(): f()
    times = {k: [] for k in runs}
    for _ in range(repeats):
        for k, f in runs.items():
            t = time.perf_counter(); f(); times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def bare_step(model, x, loss, bf16, fmt):
    "A training step without the Learner, for the FLOP count and rate."
    model = model.to(memory_format=fmt)
    x = x.contiguous(memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), 1e-3, eps=1e-5)
    def step():
        with torch.autocast('cpu', torch.bfloat16, enabled=bf16): l = loss(model, x)
        l.backward(); opt.step(); opt.zero_grad()
    return step


def matmul_rate(dtype, n=2048, reps=10):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    a @ b
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t)
    return 2*n**3/statistics.median(ts)


def report(title, med, base='fp32'):
    print(f'\n{title}')
    for k, s in med.items(): print(f'  {k:20s} {s*1000:9.0f} ms   {s/med[base]:.2f}× {base}')


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--threads', type=int, help="torch CPU threads (default: torch's own)")
    p.add_argument('--ddpm-steps', type=int, default=200, help='DDPM training steps per turn (default: 200)')
    p.add_argument('--repeats', type=int, default=3, help='timed turns per setting (default: 3)')
    p.add_argument('--sample-n', type=int, default=500, help='images sampled per turn (default: 500)')
    p.add_argument('--sample-steps', type=int, default=10, help='DDIM steps per turn (default: 10)')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    bf16 = cpu_has_bf16()
    print(machine())
    print(f"CPU flags: {cpu_flags()} | native bf16: {bf16} | vector unit: {torch.backends.cpu.get_cpu_capability()}"
          f" | torch threads: {torch.get_num_threads()}")
    if not bf16: print("this CPU has no native bf16: emulated bf16 is many times slower, so only fp32 is timed")
    torch.manual_seed(0)
    dls = fashion_dls(bs=128, source='sample', seed=0)
    runs = {'fp32': recipe_run(dls, 'fp32', torch.contiguous_format)}
    if bf16:
        runs |= {'bf16': recipe_run(dls, 'bf16', torch.contiguous_format),
                 'bf16+channels_last': recipe_run(dls, 'bf16', CL)}
    report(f'recipe, one epoch ({len(dls.train)} training batches of 128 + validation)', take_turns(runs, a.repeats))

    x = ddpm_images(fashion_mnist_arrays('sample')['train'][0])
    sched = linear_sched(1000, 1e-4, 0.02)
    ddls = DataLoaders(dl_ddpm(x, 64, sched, shuffle=True, flat=True, drop_last=True), [])
    runs = {p: ddpm_run(ddls, p, a.ddpm_steps) for p in ['fp32'] + ['bf16']*bf16}
    report(f'`miniai ddpm` UNet (16,32,32), {a.ddpm_steps} training steps of bs 64', take_turns(runs, a.repeats))

    model = init_ddpm(ddpm_unet((16, 32, 32), 1, 8, False))
    for q in model.parameters(): q.data.normal_(0, 0.05)  # not init_ddpm's zero output: a model with work to do
    runs = {'fp32, one call': sample_run(model, sched, a.sample_n, a.sample_steps, False, a.sample_n),
            f'fp32, chunks of {ddpm.SAMPLE_BS}': sample_run(model, sched, a.sample_n, a.sample_steps, False,
                                                            ddpm.SAMPLE_BS)}
    if bf16: runs[f'bf16, chunks of {ddpm.SAMPLE_BS}'] = sample_run(model, sched, a.sample_n, a.sample_steps, True,
                                                                    ddpm.SAMPLE_BS)
    report(f'sampling {a.sample_n} images, DDIM {a.sample_steps} steps', take_turns(runs, a.repeats), 'fp32, one call')

    y = torch.randint(0, 10, (128,))
    t, noise = torch.randint(0, 1000, (128,)), torch.randn(128, 1, 32, 32)
    unet = lambda: init_ddpm(ddpm_unet((16, 32, 32), 1, 8, False))
    models = {'recipe ResNet, bs 128': (recipe_model, torch.randn(128, 1, 28, 28),
                                        lambda m, x: F.cross_entropy(m(x), y, label_smoothing=0.1), CL),
              **{f'ddpm UNet, bs {bs}': (unet, torch.randn(bs, 1, 32, 32),
                                         lambda m, x: F.mse_loss(m(x, t[:len(x)]).float(), noise[:len(x)]),
                                         torch.contiguous_format) for bs in (64, 128)}}
    precs = ['fp32'] + ['bf16']*bf16
    peak = {pr: matmul_rate(torch.float32 if pr == 'fp32' else torch.bfloat16) for pr in precs}
    print('\nbare training step: FLOP rate against a 2048² matmul in the same precision '
          f"({', '.join(f'{pr} {r/1e9:.0f} GFLOP/s' for pr, r in peak.items())})")
    for name, (mk, x, loss, fmt) in models.items():
        steps = {pr: bare_step(mk(), x, loss, pr == 'bf16', fmt if pr == 'bf16' else torch.contiguous_format)
                 for pr in precs}
        with FlopCounterMode(display=False) as fc: steps['fp32']()
        flops = fc.get_total_flops()
        med = take_turns(steps, max(a.repeats, 5))
        for pr, s in med.items():
            print(f'  {name:22s} {pr}: {s*1000:6.0f} ms, {flops/1e9:.1f} GFLOP, {flops/s/1e9:5.0f} GFLOP/s = '
                  f'{flops/s/peak[pr]:.0%} of the {pr} matmul rate')
    print('\n' + machine())


if __name__ == '__main__': main()
