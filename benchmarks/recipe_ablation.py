"""Ablation of the default recipe on the bundled sample's held-out 1,000 images: epochs, label smoothing and flip TTA.

    python benchmarks/recipe_ablation.py --seeds 42 0 --threads 1

Each configuration trains the recipe from scratch per seed and reports plain and flip-TTA accuracy (the mean of the
softmax of each image and its mirror) on images it never trained on, plus wall time. Prints markdown rows for
benchmarks/RESULTS.md.
"""
import argparse
import time
from functools import partial

import torch
import torch.nn.functional as F

from miniai.datasets import fashion_dls
from miniai.recipe import recipe_learner

CONFIGS = {  # name: (epochs, label smoothing)
    '12 epochs (the old default)': (12, 0.),
    '12 epochs, label smoothing 0.1': (12, 0.1),
    '16 epochs, label smoothing 0.1': (16, 0.1),
}

@torch.no_grad()
def accuracies(model, dl):
    "Plain and flip-TTA accuracy of `model` over `dl`."
    model.eval()
    hits, hits_tta, n = 0, 0, 0
    for xb, yb in dl:
        p = F.softmax(model(xb), 1)
        p_tta = (p + F.softmax(model(xb.flip(-1)), 1))/2
        hits += (p.argmax(1) == yb).sum().item(); hits_tta += (p_tta.argmax(1) == yb).sum().item(); n += len(yb)
    return hits/n, hits_tta/n

def run(epochs, ls, seed):
    torch.manual_seed(seed)
    dls = fashion_dls(bs=128, source='sample', seed=seed)
    learn = recipe_learner(dls, epochs, device='cpu', progress=False)
    if ls: learn.loss_func = partial(F.cross_entropy, label_smoothing=ls)
    t0 = time.perf_counter()
    learn.fit(epochs)
    return (*accuracies(learn.model, dls.valid), time.perf_counter() - t0)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[42, 0])
    p.add_argument('--threads', type=int, default=1)
    p.add_argument('--only', default=None, help='run only configurations whose name contains this')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print('| configuration | seed | accuracy | flip TTA | train time |\n|---|---|---|---|---|', flush=True)
    for name, (epochs, ls) in CONFIGS.items():
        if args.only and args.only not in name: continue
        for seed in args.seeds:
            acc, acc_tta, secs = run(epochs, ls, seed)
            print(f'| {name} | {seed} | {acc:.4f} | {acc_tta:.4f} | {secs:.0f} s |', flush=True)

if __name__ == '__main__':
    main()
