"""How `miniai ddpm`'s defaults were chosen: train one configuration, then score several samplers by FID and KID.

    python benchmarks/ddpm_tuning.py --name lr4e15 --epochs 15 --lr 4e-3 --n 500 \\
        --samplers ddim:50:re:0,ddim:50:re:1,ddim:25:re:0
    python benchmarks/ddpm_tuning.py --name smoke --epochs 1 --n-train 512 --n 50 --samplers ddim:10:re:1   # ~1 min

Training is `miniai.ddpm_run.train_ddpm` (the UNet of `--channels`, one resnet block per level, Adam, \
one-cycle to `--lr`,
EMA 0.999 with warm-up, the paper's linear 1000-step schedule unless `--sched cosine`, `--min-snr` to draw t with
Min-SNR-γ weights) on the bundled sample's 7,226 training images, seed 0. Each sampler in `--samplers` is
`ddim:STEPS:re|no:ETA` (DDIM, eps re-derived from the clipped x0 or the model's own, eta) or `ddpm` (all 1000
steps); each draws `--n` images from the same starting noise, scored against the sample's 1,000 held-out images with
the classifier that ships with miniai. The first sampler is also run on the raw weights. Results go to stdout and
are appended as one JSON line to `--results` (default /tmp/ddpm_tuning.jsonl); the EMA and raw weights are saved
to `--weights-dir` so more samplers can be scored later with `--load`.

The numbers in benchmarks/RESULTS.md ("`miniai ddpm` defaults") came from an earlier draft of this script that had
its own copies of the EMA warm-up and of the DDIM loop (the same formulas, the same random draws in the same order).
"""
import argparse, json, time
from pathlib import Path

import torch

from miniai.datasets import fashion_mnist_arrays
from miniai.ddpm import ddim_sample, ddpm_unet, linear_sched, sample
from miniai.ddpm_run import _make_sched, save_grid, train_ddpm
from miniai.fid import ImageEval, ddpm_images, load_fid_classifier


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--name', required=True, help='a name for the printed rows and the saved files')
    p.add_argument('--channels', default='16,32,32'); p.add_argument('--epochs', type=int, default=5)
    p.add_argument('--bs', type=int, default=64); p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--sched', default='linear', choices=['linear', 'cosine'])
    p.add_argument('--min-snr', type=float, default=None, help='γ for Min-SNR t sampling (default: uniform t)')
    p.add_argument('--n-train', type=int, default=None); p.add_argument('--n', type=int, default=200)
    p.add_argument('--samplers', default='ddim:50:re:0')
    p.add_argument('--threads', type=int, default=1); p.add_argument('--seed', type=int, default=0)
    p.add_argument('--load', action='store_true', help='skip training: score the weights saved under --name')
    p.add_argument('--weights-dir', type=Path, default=Path('/tmp'))
    p.add_argument('--results', type=Path, default=Path('/tmp/ddpm_tuning.jsonl'))
    return p.parse_args(argv)


def draw(model, sched, spec, n, seed):
    "Images from sampler `spec` ('ddpm' or 'ddim:STEPS:re|no:ETA'), all specs from the same starting noise."
    g = torch.Generator().manual_seed(seed)
    if spec == 'ddpm': return sample(model, (n, 1, 32, 32), sched, generator=g)
    _, steps, re, eta = spec.split(':')
    return ddim_sample(model, (n, 1, 32, 32), sched, int(steps), eta=float(eta), generator=g, rederive=re == 're')


def main(argv=None):
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    channels, wpath = tuple(int(c) for c in a.channels.split(',')), a.weights_dir/f'{a.name}_weights.pt'
    res = dict(name=a.name, args={k: str(v) for k, v in vars(a).items()})
    if a.load:
        sd, sched = torch.load(wpath, weights_only=True), _make_sched(a.sched, 1000)
        models = {}
        for w in ('ema', 'raw'):
            models[w] = ddpm_unet(channels, 1, 8).eval(); models[w].load_state_dict(sd[w])
    else:
        t0 = time.time()
        run = train_ddpm(epochs=a.epochs, bs=a.bs, lr=a.lr, sched=a.sched, source='sample', channels=channels, groups=8,
                         min_snr=a.min_snr, n_train=a.n_train, device='cpu', seed=a.seed)
        res['train_s'] = time.time() - t0
        print(f'{a.name}: trained in {res["train_s"]:.0f}s', flush=True)
        models, sched = {'ema': run.ema_model.module, 'raw': run.model}, run.sched
        torch.save({k: m.state_dict() for k, m in models.items()}, wpath)
    arrays = fashion_mnist_arrays('sample')
    ie = ImageEval(load_fid_classifier()[:-1], ddpm_images(arrays['valid'][0]))
    real = ddpm_images(arrays['train'][0][:a.n])
    res['real'] = dict(fid=ie.fid(real), kid=ie.kid(real))
    print(f"{a.n} real training images: FID {res['real']['fid']:.2f} KID {res['real']['kid']*1e3:.1f}e-3", flush=True)
    specs = a.samplers.split(',')
    for w, spec in [('ema', s) for s in specs] + [('raw', specs[0])]:
        t1 = time.time()
        imgs = draw(models[w], sched, spec, a.n, a.seed).clamp(-1, 1)
        r = res[f'{w} {spec}'] = dict(fid=ie.fid(imgs), kid=ie.kid(imgs), secs=time.time() - t1)
        print(f'{a.name} {w} {spec}: FID {r["fid"]:.2f} KID {r["kid"]*1e3:.1f}e-3 {r["secs"]:.0f}s', flush=True)
        if w == 'ema':
            save_grid(imgs[:32], a.weights_dir/f'{a.name}_{spec.replace(":", "_")}.png', title=f'{a.name} {spec}')
    with open(a.results, 'a') as f: f.write(json.dumps(res) + '\n')


if __name__ == '__main__': main()
