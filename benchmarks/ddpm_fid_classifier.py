"""Make `miniai/data/fid_classifier.npz`, the FID feature classifier that ships with miniai.

    python benchmarks/ddpm_fid_classifier.py            # writes miniai/data/fid_classifier.npz (~5 s on one core)
    python benchmarks/ddpm_fid_classifier.py --out X.npz --epochs 8

`miniai.fid.fid_classifier()` (stride-2 convs 16-32-64-128 with batch norm, average pool, linear), trained by
`miniai.fid.train_fid_classifier` on the bundled sample's 7,226 training images (32×32, [-1, 1], as the DDPM makes
them) with seed 0 on one torch thread, then saved with `save_fid_classifier`. It prints the held-out accuracy on
the sample's 1,000 validation images, which it never trains on. Every FID that `miniai ddpm` prints uses these
weights, so the file changes only when this script's defaults do.
"""
import argparse
from pathlib import Path

import torch

from miniai.fid import FID_CLASSIFIER_PATH, save_fid_classifier, train_fid_classifier


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--out', type=Path, default=FID_CLASSIFIER_PATH,
                   help=f'where to save (default {FID_CLASSIFIER_PATH})')
    p.add_argument('--epochs', type=int, default=5, help='training epochs (default 5)')
    p.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # the thread count changes the rounding, so fix it
    model, acc = train_fid_classifier(epochs=a.epochs, source='sample', device='cpu', seed=a.seed)
    path = save_fid_classifier(model, a.out)
    print(f'held-out accuracy {acc:.4f}; saved {path} ({path.stat().st_size/1024:.0f} KB)')


if __name__ == '__main__': main()
