"""Quality and whole-run time of the main jobs in fp32 and in bf16 (autocast, + channels_last for the recipe's ResNet).

    python benchmarks/cpu_precision_quality.py                      # the recipe, seeds 42 and 0; the DDPM, seed 42
    python benchmarks/cpu_precision_quality.py --ddpm-epochs 15 --ddpm-seeds 42 0   # the `miniai ddpm` default

Every fp32 run has a bf16 twin (same job, same seed) started at the same moment in its own process, each on one
torch thread, so both see the same machine load; all the pairs run at once. The recipe's result is the held-out
accuracy of `fit_recipe`'s default on the sample's last 1,000 images; the DDPM's is `run_ddpm`'s FID and KID
(miniai's own classifier, 500 DDIM samples against the 1,000 held-out images). Times are each process's whole run:
data, training, evaluation, and for the DDPM sampling and scoring, as wall time and as the process's CPU time (one
thread, so its CPU time is its work, whatever else the machine runs), and the DDPM's training time alone. The bf16
DDPM's model is also sampled again under bf16 autocast (same starting noise) and scored, to see what bf16 sampling
would cost in quality. `--rescore` samples kept runs again with other seeds, for FID's spread from the sampling
noise alone. A run that finishes first leaves its twin more CPU, which favours fp32, so the ratios are if
anything pessimistic for bf16. Prints one line per run and a table.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from _common import machine

RECIPE = """
import json, sys, time, torch
from miniai.recipe import fit_recipe
from miniai.datasets import fashion_dls
t = time.time()
learn = fit_recipe(dls=fashion_dls(bs=128, source='sample', seed={seed}), seed={seed}, precision={p!r}, progress=False)
print(json.dumps(dict(acc=learn.metrics.history[-1]['accuracy'], seconds=time.time() - t, cpu=time.process_time())))
"""
DDPM = """
import json, sys, time, torch
from miniai.ddpm_run import load_ddpm, run_ddpm, save_samples, score_samples
t = time.time()
out, s = run_ddpm({out!r}, data='sample', seed={seed}, precision={p!r}, epochs={epochs}, progress=False)
r = dict(fid=s['fid'], kid=s['kid'], seconds=time.time() - t, cpu=time.process_time(),
         train=json.load(open(out/'config.json'))['train_seconds'])
if {p!r} == 'bf16':  # the same model and starting noise, sampled under bf16 autocast instead of fp32
    model, sched, cfg = load_ddpm(out)
    with torch.autocast('cpu', torch.bfloat16): imgs = save_samples(model, sched, 500, eta=1., seed={seed})
    r |= {{k + '_bf16_sampling': v for k, v in score_samples(imgs, 'sample').items() if k in ('fid', 'kid')}}
print(json.dumps(r))
"""

RESCORE = """
import json, torch
from miniai.ddpm_run import load_ddpm, save_samples, score_samples
model, sched, cfg = load_ddpm({d!r})
fids = [score_samples(save_samples(model, sched, 500, 'ddim', cfg['ddim_steps'], cfg['eta'], seed), 'sample')['fid']
        for seed in {seeds!r}]
print(json.dumps(dict(precision=cfg['precision'], seed=cfg['seed'], fids=fids)))
"""


def start(code):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', 'PYTHONWARNINGS': 'ignore'}
    return subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--recipe-seeds', type=int, nargs='*', default=[42, 0])
    p.add_argument('--ddpm-seeds', type=int, nargs='*', default=[42])
    p.add_argument('--ddpm-epochs', type=int, default=15, help='default: 15, the default on the sample')
    p.add_argument('--rescore', nargs='*', default=[], metavar='DIR',
                   help="instead: score more sample sets of these saved DDPM runs (a 'kept in' folder), two at a time")
    p.add_argument('--rescore-seeds', type=int, nargs='*', default=[1, 2, 3])
    a = p.parse_args(argv)
    print(machine())
    if a.rescore: return rescore(a.rescore, a.rescore_seeds)
    tmp = tempfile.mkdtemp()
    print(f'run folders kept in {tmp}')
    jobs = [(('recipe', s, pr), start(RECIPE.format(seed=s, p=pr))) for s in a.recipe_seeds for pr in ('fp32', 'bf16')]
    jobs += [(('ddpm', s, pr), start(DDPM.format(seed=s, p=pr, epochs=a.ddpm_epochs, out=f'{tmp}/ddpm-{s}-{pr}')))
             for s in a.ddpm_seeds for pr in ('fp32', 'bf16')]
    res = {}
    for key, proc in jobs:
        out, err = proc.communicate()
        if proc.returncode: sys.exit(f'{key} failed:\n{err[-3000:]}')
        res[key] = json.loads(out.strip().splitlines()[-1])
        print(key, res[key], time.strftime('%H:%M:%S'), flush=True)
    print('\n| job | seed | fp32 | bf16 | fp32 time (CPU) | bf16 time (CPU) | ratio (CPU) |\n' + '|---'*7 + '|')
    for job, seed, _ in [k for k in res if k[2] == 'fp32']:
        f, b = res[(job, seed, 'fp32')], res[(job, seed, 'bf16')]
        q = (lambda r: f"{r['acc']:.4f}") if job == 'recipe' else (lambda r: f"FID {r['fid']:.2f}, KID {r['kid']:.4f}")
        print(f"| {job} | {seed} | {q(f)} | {q(b)} | {f['seconds']:.0f} s ({f['cpu']:.0f} s) | {b['seconds']:.0f} s "
              f"({b['cpu']:.0f} s) | {b['seconds']/f['seconds']:.2f} ({b['cpu']/f['cpu']:.2f}) |")
        if job == 'ddpm':
            print(f"  training alone: fp32 {f['train']:.0f} s, bf16 {b['train']:.0f} s "
                  f"({b['train']/f['train']:.2f}); the bf16 model sampled under bf16 autocast: "
                  f"FID {b['fid_bf16_sampling']:.2f}, KID {b['kid_bf16_sampling']:.4f}")
    print(machine())


def rescore(dirs, seeds):
    "FID of 500 more DDIM samples per seed in `seeds` from each run in `dirs`: how much FID moves with the noise alone."
    for i in range(0, len(dirs), 2):
        jobs = [(d, start(RESCORE.format(d=d, seeds=seeds))) for d in dirs[i:i + 2]]
        for d, proc in jobs:
            out, err = proc.communicate()
            if proc.returncode: sys.exit(f'{d} failed:\n{err[-3000:]}')
            r = json.loads(out.strip().splitlines()[-1])
            print(f"{d}: {r['precision']}, training seed {r['seed']}, sampling seeds {seeds}: FID "
                  + ', '.join(f'{f:.2f}' for f in r['fids']), flush=True)


if __name__ == '__main__': main()
