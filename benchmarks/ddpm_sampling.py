"""Sampling speed of `miniai.ddpm`: our DDPM `sample` against a hand loop over diffusers' `DDPMScheduler`, and
DDIM (`ddim_sample`, 50 steps) against DDPM (1000 steps).

    python benchmarks/ddpm_sampling.py              # ~2.7 min on one CPU thread (load average ~4)
    python benchmarks/ddpm_sampling.py --small      # smoke run: 200-step schedule, DDIM 10 steps, ~20 s
    python benchmarks/ddpm_sampling.py --profile    # also: cProfile of both DDPM loops with a do-nothing model
    python benchmarks/ddpm_sampling.py --device cuda --bs 16 --size 32

Every contender uses the same tiny UNet (`ddpm_unet(channels=(16, 32), layers=1, groups=4)` after `init_ddpm`,
then every weight perturbed by Gaussian noise, see `make_model`, so that the predicted noise is not the all-zero
output `init_ddpm` starts from), the same linear betas (1e-4..0.02 over 1000 steps) and the same batch shape:

- **ours DDPM**: `miniai.ddpm.sample(model, shape, sched, generator=g)`, DDPM Algorithm 2, 1000 steps.
- **diffusers DDPM**: the hand loop `eps = model((x, t_batch)); x = sched.step(eps, t, x, generator=g).prev_sample`
  over `DDPMScheduler(beta_schedule='linear', variance_type='fixed_small', clip_sample=True, ...)`, 1000 steps.
- **ours DDIM**: `miniai.ddpm.ddim_sample(model, shape, sched, steps=50, generator=g)` (eta 0).
- **diffusers DDIM** (context only, no goal): the same hand loop over `DDIMScheduler(timestep_spacing='trailing')`.

Before timing, the first (warm-up) round checks that the samplers agree. Both DDPM loops draw their noise the same
way (the start, then one `randn(shape, generator)` per step while t > 0), so with the same seed they produce the
same images up to float32 rounding (diffusers computes its coefficients in float32, we in float64); the check
asserts equal mean/std to a loose tolerance and prints the median and largest pixel difference (~1e-5 here). The
two DDIM loops (eta 0) start from the same noise and are checked the same way; their pixels can differ by tenths
after 50 steps, because nothing damps the float32 rounding differences with this random model (see
`check_outputs`), but their statistics agree.

Then `--repeats` rounds, each timing every contender once (`time.perf_counter`, CUDA synchronised; the short DDIM
runs `--ddim-reps` times back to back, averaged), the order rotated every round so load from other processes hits
all alike. Ratios are taken within a round and we report their median and interquartile range, in wall-clock time
and (on a CPU) in this process's CPU time, which other jobs on a shared machine disturb less. A second, cheap phase
times both DDPM loops with a do-nothing model (`x*w`), which isolates the sampler's own per-step cost (coefficients,
noise, tensor bookkeeping) from the UNet.
"""
import os
os.environ.setdefault('OMP_NUM_THREADS', '1')  # before torch is imported: other jobs share this machine's cores

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from torch import nn

from _common import machine
from miniai.ddpm import ddim_sample, ddpm_unet, init_ddpm, linear_sched, sample

BETA_MIN, BETA_MAX = 1e-4, 0.02
GOAL_RATIO = 1.05     # ours / diffusers DDPM time: at most this
GOAL_SPEEDUP = 15.    # DDPM 1000 steps / DDIM 50 steps time: at least this
GOAL_SETTING = dict(steps=1000, ddim_steps=50)  # the goals are stated for these
SMALL = dict(steps=200, ddim_steps=10, repeats=3, bs=2)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Sampling speed of miniai.ddpm: `sample` vs a loop over diffusers' "
                                "DDPMScheduler, and DDIM 50 steps vs DDPM 1000 steps.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu', help="'cpu' (default), 'cuda', 'cuda:1', ...")
    p.add_argument('--bs', type=int, help='images per batch (default 4)')
    p.add_argument('--size', type=int, default=16, help='image side, 1 channel (default 16)')
    p.add_argument('--channels', default='16,32', help='UNet channels per level (default 16,32)')
    p.add_argument('--layers', type=int, default=1, help='resnet blocks per level (default 1)')
    p.add_argument('--groups', type=int, default=4, help='GroupNorm groups (default 4)')
    p.add_argument('--perturb', type=float, default=0.05, help='std of the noise added to every weight (default 0.05)')
    p.add_argument('--steps', type=int, help='DDPM schedule length = DDPM sampling steps (default 1000)')
    p.add_argument('--ddim-steps', type=int, help='DDIM sampling steps (default 50)')
    p.add_argument('--repeats', type=int, help='timed rounds; medians and IQR over them (default 5)')
    p.add_argument('--ddim-reps', type=int, default=3, help='DDIM runs per round, averaged: they are short (default 3)')
    p.add_argument('--warmup', type=int, default=1, help='untimed rounds first; the first also runs the '
                   'checks (default 1)')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads (default 1: the machine is shared)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--small', action='store_true', help='smoke run: ' + ' '.join(f"--{k.replace('_', '-')} {v}"
                   for k, v in SMALL.items()) + ' (flags given explicitly still win)')
    p.add_argument('--profile', action='store_true', help='also print cProfile of both DDPM loops (do-nothing model)')
    a = p.parse_args(argv)
    defaults = dict(steps=1000, ddim_steps=50, repeats=5, bs=4)
    for k, v in defaults.items():
        if getattr(a, k) is None: setattr(a, k, SMALL[k] if a.small else v)
    a.channels = tuple(int(c) for c in a.channels.split(','))
    for nm in ('bs', 'size', 'layers', 'steps', 'ddim_steps', 'ddim_reps', 'repeats', 'threads'):
        if getattr(a, nm) < 1: p.error(f"--{nm.replace('_', '-')} must be >= 1, got {getattr(a, nm)}")
    if a.warmup < 1: p.error('--warmup must be >= 1: the first round is the correctness check')
    if a.ddim_steps > a.steps: p.error(f'--ddim-steps ({a.ddim_steps}) must be <= --steps ({a.steps})')
    if a.device.startswith('cuda') and not torch.cuda.is_available():
        p.error(f'--device {a.device}: no usable CUDA GPU here; use --device cpu')
    a.device = torch.device(a.device)
    return a


def loadavg(): return ', '.join(f'{x:.2f}' for x in os.getloadavg())


# ---------------------------------------------------------------------------------------------------------------
# The model and the samplers under test

def make_model(a):
    """The tiny UNet, `init_ddpm`-initialised, then every parameter perturbed by N(0, perturb²) noise. `init_ddpm`
    zeroes each resnet block's conv2 and the output conv, so without this the model predicts eps = 0 exactly and
    sampling would only exercise the schedule; with it the prediction depends on x and t like a real model's."""
    torch.manual_seed(a.seed)
    model = init_ddpm(ddpm_unet(channels=a.channels, layers=a.layers, groups=a.groups, size=a.size))
    with torch.no_grad():
        for p in model.parameters(): p.add_(torch.randn_like(p)*a.perturb)
    return model.to(a.device).eval()


class NullNet(nn.Module):
    "A do-nothing noise predictor (eps = w·x), called either way the samplers call models, to time sampler overhead."
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.5))
    def forward(self, x, t=None):
        if t is None: x, t = x
        return x*self.w


def diffusers_ddpm_sched(n_steps):
    s = DDPMScheduler(num_train_timesteps=n_steps, beta_schedule='linear', beta_start=BETA_MIN, beta_end=BETA_MAX,
                      prediction_type='epsilon', variance_type='fixed_small', clip_sample=True)
    s.set_timesteps(n_steps)
    return s


def diffusers_ddim_sched(n_steps, ddim_steps):
    s = DDIMScheduler(num_train_timesteps=n_steps, beta_schedule='linear', beta_start=BETA_MIN, beta_end=BETA_MAX,
                      prediction_type='epsilon', clip_sample=True, set_alpha_to_one=True, timestep_spacing='trailing')
    s.set_timesteps(ddim_steps)
    return s


@torch.no_grad()
def diffusers_loop(model, shape, sched, generator, **step_kw):
    """The hand-written sampling loop over a diffusers scheduler, as a careful user writes it: the steps are moved to
    the device once, each step's batch of t is a zero-copy `expand`, the scheduler gets the CPU step."""
    dev = next(model.parameters()).device
    x = torch.randn(shape, generator=generator, device=dev)
    ts_dev = sched.timesteps.to(dev)
    for i, t in enumerate(sched.timesteps):
        eps = model((x, ts_dev[i].expand(shape[0])))
        x = sched.step(eps, t, x, generator=generator, **step_kw).prev_sample
    return x


def contenders(model, shape, a):
    "name -> function(generator) returning the images."
    ours = linear_sched(a.steps, BETA_MIN, BETA_MAX)
    ddpm_ref, ddim_ref = diffusers_ddpm_sched(a.steps), diffusers_ddim_sched(a.steps, a.ddim_steps)
    return {
        'ours DDPM': lambda g: sample(model, shape, ours, generator=g),
        'diffusers DDPM': lambda g: diffusers_loop(model, shape, ddpm_ref, g),
        'ours DDIM': lambda g: ddim_sample(model, shape, ours, steps=a.ddim_steps, generator=g),
        # ddim_sample re-derives eps from the clipped x0 by default: diffusers' use_clipped_model_output=True
        'diffusers DDIM': lambda g: diffusers_loop(model, shape, ddim_ref, g, eta=0., use_clipped_model_output=True),
    }


# ---------------------------------------------------------------------------------------------------------------
# Timing

def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def timed(fn, g, dev):
    "Wall-clock and this process's CPU seconds of `fn(g)`, and its output."
    sync(dev)
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(g)
    sync(dev)
    return time.perf_counter() - t0, time.process_time() - c0, out


def rounds(fns, a, n, seed0, check=None, reps=None):
    """`n` rounds; each runs every contender once (`reps[name]` times back to back, averaged: for the short DDIM
    runs), in an order rotated by one each round, all from the same seed. Returns two dicts {name: [seconds per
    round]}, wall-clock and CPU; `check(outs)` is called with the first round's outputs."""
    names, reps = list(fns), reps or {}
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for r in range(n):
        order = names[r % len(names):] + names[:r % len(names)]
        outs = {}
        for k in order:
            ts = []
            for _ in range(reps.get(k, 1)):
                g = torch.Generator(device=a.device).manual_seed(seed0 + r)
                *t, outs[k] = timed(fns[k], g, a.device)
                ts.append(t)
            wall[k].append(statistics.fmean(t[0] for t in ts))
            cpu[k].append(statistics.fmean(t[1] for t in ts))
        if check is not None and r == 0: check(outs)
    return wall, cpu


def med_iqr(xs):
    "Median and interquartile range (inclusive quartiles, as for small samples)."
    if len(xs) == 1: return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method='inclusive')
    return q2, q1, q3


def check_outputs(outs, eps_std):
    """The samplers agree on image statistics (asserted). Same seed, same noise draws: DDPM's images also agree
    pixel for pixel to ~1e-4. DDIM's need not: with eta 0 nothing damps differences, and with this random model
    float32 rounding differences (~1e-8 after the first step) roughly double each step, so after 50 steps a few
    pixels differ by tenths while the statistics still agree (tests/test_ddpm.py checks single steps exactly)."""
    print(f'  check: the perturbed UNet predicts eps with std {eps_std:.3f} at t=T/2 (0 would mean a trivial model)')
    assert eps_std > 1e-2, 'the model predicts (near) zero noise: sampling would not exercise the UNet'
    for a_, b_ in (('ours DDPM', 'diffusers DDPM'), ('ours DDIM', 'diffusers DDIM')):
        x, y = outs[a_].float().cpu(), outs[b_].float().cpu()
        assert torch.isfinite(x).all() and torch.isfinite(y).all(), f'{a_} or {b_} produced non-finite values'
        d = (x - y).abs()
        print(f'  check: {a_:<9} mean {x.mean():+.4f} std {x.std():.4f} | {b_:<14} mean {y.mean():+.4f} '
              f'std {y.std():.4f} | |diff| median {d.median():.1e}, max {d.max():.1e}')
        assert abs(x.mean() - y.mean()) < 0.05 and abs(x.std() - y.std()) < 0.05*max(y.std().item(), 1e-3), (
            f'{a_} and {b_} disagree on image statistics: not timing like with like')


def profile_loops(a, shape):
    "cProfile of both DDPM loops with the do-nothing model: where the sampler's own time goes."
    null = NullNet().to(a.device).eval()
    fns = contenders(null, shape, a)
    for k in ('ours DDPM', 'diffusers DDPM'):
        pr = cProfile.Profile()
        g = torch.Generator(device=a.device).manual_seed(a.seed)
        pr.enable(); fns[k](g); sync(a.device); pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats('tottime').print_stats(12)
        print(f'\n--- cProfile: {k}, {a.steps} steps, do-nothing model, top 12 by own time ---')
        print('\n'.join(l for l in s.getvalue().splitlines()[4:] if l.strip()))


# ---------------------------------------------------------------------------------------------------------------

def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()
    print(machine(a.device))
    print(f'load average at start: {loadavg()}')
    shape = (a.bs, 1, a.size, a.size)
    model = make_model(a)
    with torch.no_grad():
        x = torch.randn(shape, generator=torch.Generator().manual_seed(a.seed)).to(a.device)
        eps_std = model((x, torch.full((a.bs,), a.steps//2, device=a.device))).std().item()
    n_par = sum(p.numel() for p in model.parameters())
    print(f'model: ddpm_unet(channels={a.channels}, layers={a.layers}, groups={a.groups}), {n_par:,} parameters, '
          f'init_ddpm + N(0, {a.perturb}²) on every weight | shape {shape} | DDPM {a.steps} steps, DDIM '
          f'{a.ddim_steps} | {a.repeats} rounds after {a.warmup} warm-up')

    # Phase 1: the real (tiny) UNet, all four samplers.
    fns = contenders(model, shape, a)
    print(f'warm-up and checks ({a.warmup} round{"s" * (a.warmup > 1)}) ...')
    rounds(fns, a, a.warmup, a.seed, check=lambda outs: check_outputs(outs, eps_std))
    print('timing ...')
    T, C = rounds(fns, a, a.repeats, a.seed + 1000, reps={k: a.ddim_reps for k in fns if 'DDIM' in k})
    for k, v in T.items(): print(f'  {k:<15} ' + ' '.join(f'{t:7.3f}' for t in v) + ' s wall')

    # Phase 2: the same DDPM loops with a do-nothing model, to see the samplers' own cost per step.
    null = NullNet().to(a.device).eval()
    nfns = {k: f for k, f in contenders(null, shape, a).items() if 'DDPM' in k}
    rounds(nfns, a, 1, a.seed)
    N, _ = rounds(nfns, a, max(a.repeats, 5), a.seed + 2000)

    if a.profile: profile_loops(a, shape)

    # Per-round ratios, then medians and IQRs.
    ratio = med_iqr([o/d for o, d in zip(T['ours DDPM'], T['diffusers DDPM'])])
    ratio_cpu = med_iqr([o/d for o, d in zip(C['ours DDPM'], C['diffusers DDPM'])])
    speedup = med_iqr([p/i for p, i in zip(T['ours DDPM'], T['ours DDIM'])])
    ddim_ratio = med_iqr([o/d for o, d in zip(T['ours DDIM'], T['diffusers DDIM'])])
    null_ratio = med_iqr([o/d for o, d in zip(N['ours DDPM'], N['diffusers DDPM'])])
    m = {k: statistics.median(v) for k, v in T.items()}
    us = {k: statistics.median(v)/a.steps*1e6 for k, v in N.items()}
    at_goal = all(getattr(a, k) == v for k, v in GOAL_SETTING.items())
    yes = lambda ok: ('**yes**' if ok else '**no**') if at_goal else f"{'yes' if ok else 'no'} (not the goal's setting)"
    f = lambda r: f'{r[0]:.3f}× ({r[1]:.3f}–{r[2]:.3f})'

    print(f'\nload average at end: {loadavg()}')
    print(f'run time: {time.perf_counter() - t_start:.0f} s\n')
    print('| measured | ours | reference | ratio, median (IQR) | goal | met |')
    print('|---|---|---|---|---|---|')
    print(f"| DDPM {a.steps} steps: ours `sample` / diffusers `DDPMScheduler` loop | {m['ours DDPM']:.2f} s | "
          f"{m['diffusers DDPM']:.2f} s | **{f(ratio)}** | ≤ {GOAL_RATIO}× | {yes(ratio[0] <= GOAL_RATIO)} |")
    if a.device.type == 'cpu':  # CPU time is what this process used: less disturbed by other jobs than wall time
        print(f"| same, CPU time of this process | {statistics.median(C['ours DDPM']):.2f} s | "
              f"{statistics.median(C['diffusers DDPM']):.2f} s | {f(ratio_cpu)} | ≤ {GOAL_RATIO}× | "
              f"{yes(ratio_cpu[0] <= GOAL_RATIO)} |")
    print(f"| speed-up of ours: DDPM {a.steps} steps / DDIM {a.ddim_steps} steps | {m['ours DDIM']:.3f} s (DDIM) | "
          f"{m['ours DDPM']:.2f} s (DDPM) | **{speedup[0]:.1f}×** ({speedup[1]:.1f}–{speedup[2]:.1f}) | "
          f"≥ {GOAL_SPEEDUP:.0f}× | {yes(speedup[0] >= GOAL_SPEEDUP)} |")
    print(f"| DDIM {a.ddim_steps} steps: ours `ddim_sample` / diffusers `DDIMScheduler` loop | "
          f"{m['ours DDIM']:.3f} s | {m['diffusers DDIM']:.3f} s | {f(ddim_ratio)} | — | — |")
    print(f"| sampler's own cost per step (do-nothing model), ours / diffusers | {us['ours DDPM']:.0f} µs | "
          f"{us['diffusers DDPM']:.0f} µs | {f(null_ratio)} | — | — |")
    step_ms = m['ours DDPM']/a.steps*1e3
    fwd = step_ms - us['ours DDPM']*1e-3
    expect = (fwd + us['ours DDPM']*1e-3)/(fwd + us['diffusers DDPM']*1e-3)
    print(f'\nThe UNet forward takes about {fwd:.2f} ms of the {step_ms:.2f} ms per DDPM step; the rest is the '
          f'sampler ({us["ours DDPM"]:.0f} µs ours, {us["diffusers DDPM"]:.0f} µs diffusers, per step, measured with '
          f'the do-nothing model, whose own call is included). Same UNet + these overheads predict ours/diffusers = '
          f'{expect:.3f}×.')
    if not at_goal:
        print(f'(goals are stated for --steps 1000 --ddim-steps 50; this run used {a.steps} and {a.ddim_steps})')


if __name__ == '__main__':
    main()
