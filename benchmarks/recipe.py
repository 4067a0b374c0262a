"""Train miniai's default recipe (`miniai.recipe.fit_recipe`) on the bundled Fashion-MNIST sample and report
accuracy on its 1,000 held-out images, wall time and the machine.

    python benchmarks/recipe.py                 # the default recipe, seed 42
    python benchmarks/recipe.py --threads 2     # limit torch to 2 CPU threads
    python benchmarks/recipe.py --epochs 1      # a quick smoke run

Training uses the sample's first 7,226 images; the last 1,000 (`fashion_dls(source='sample').valid`) are never
trained on. Nothing is written to disk; copy the printed line into benchmarks/RESULTS.md.
"""
import argparse
import os
import time

import torch

from _common import machine
from miniai.recipe import fit_recipe
from miniai.datasets import fashion_dls


def load():
    return ' '.join(f'{l:.1f}' for l in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--epochs', type=int, default=None, help="epochs (default: the recipe's)")
    p.add_argument('--seed', type=int, default=42, help='random seed (default: 42)')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch decides)')
    p.add_argument('--device', default=None, help='torch device (default: the best available)')
    args = p.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    kw = {} if args.epochs is None else dict(epochs=args.epochs)

    dls = fashion_dls(bs=128, source='sample', seed=args.seed)
    load0 = load()
    t0, c0 = time.perf_counter(), time.process_time()
    learn = fit_recipe(dls, seed=args.seed, device=args.device, **kw)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    epochs = learn.n_epochs
    preds, targs = learn.capture_preds()  # one more pass over the held-out images, to measure accuracy directly
    acc = (preds.argmax(1) == targs).float().mean().item()

    print(f"machine: {machine()}")
    print(f"load average (1/5/15 min) at start: {load0}; at end: {load()}")
    print(f"recipe: {epochs} epochs, {len(dls.train.x):,} training images, {len(targs):,} held-out images")
    print(f"accuracy: {acc:.4f}")
    print(f"wall time: {wall:.1f} s (CPU time of this process: {cpu:.1f} s)")


if __name__ == '__main__':
    main()
