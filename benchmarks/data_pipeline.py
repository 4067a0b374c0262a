"""How many training batches per second does `fashion_dls` deliver, against the course's route and a bare loop?

Three ways to get shuffled, normalised Fashion-MNIST batches of 256 from the bundled sample:

- ours: `fashion_dls(bs=256, source='sample').train`, which cuts batches out of an in-memory uint8 tensor;
- the course's route: a Hugging Face `datasets.Dataset` (from `load_fashion_mnist('sample')['train']`) whose
  `with_transform` turns each PIL image into a normalised tensor (with numpy: no torchvision), batched by a
  torch `DataLoader` with `collate_dict`;
- bare: take rows of a uint8 tensor by a random permutation (`index_select`) and divide by 255, nothing else: the
  practical upper limit.

The course's route is ~100x slower, so only a limited number of its batches is timed. All three are timed in
interleaved rounds (the order rotating each round) so that load from other processes hits them alike; we report
medians of wall-clock and CPU time after a warm-up.

    python benchmarks/data_pipeline.py     # well under a minute on 2 cores
"""
import argparse
import os
import statistics
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from _common import machine
from miniai.datasets import FMNIST_MEAN, FMNIST_STD, collate_dict, fashion_dls, inplace, load_fashion_mnist

BS = 256
GOAL_COURSE = 80  # ours must be at least this many times faster than the course's route


@inplace
def to_tensor_item_by_item(b):
    "The course's per-item transform: each PIL image to a normalised float (1,28,28) tensor, one at a time."
    b['image'] = [torch.from_numpy((np.asarray(im, dtype=np.float32)/255 - FMNIST_MEAN)/FMNIST_STD)[None]
                  for im in b['image']]


def course_dl():
    "The course's route: HF Dataset + per-item transform + DataLoader with collate_dict."
    ds = load_fashion_mnist('sample')['train'].with_transform(to_tensor_item_by_item)
    return DataLoader(ds, batch_size=BS, shuffle=True, collate_fn=collate_dict(ds))


class Bare:
    "The least work that still gives shuffled float batches: take rows of a uint8 tensor, divide by 255."
    def __init__(self, x, y): self.x, self.y = x, y
    def __len__(self): return -(-len(self.x) // BS)
    def __iter__(self):
        idxs = torch.randperm(len(self.x))
        for i in range(0, len(idxs), BS):
            b = idxs[i:i+BS]
            yield self.x.index_select(0, b).float().div_(255), self.y.index_select(0, b)


def rate(dl, n_batches):
    "(wall, CPU) seconds per batch over the first `n_batches` batches of fresh passes over `dl`."
    done = 0
    w0, c0 = time.perf_counter(), time.process_time()
    while done < n_batches:
        for xb, yb in dl:
            done += 1
            if done == n_batches: break
    return (time.perf_counter() - w0) / n_batches, (time.process_time() - c0) / n_batches


def check_same_batches(ours, course):
    ("All routes must give the same kind of batch: (256,1,28,28) float32, int64 labels, "
     "and ours bitwise equal to the course's.")
    xb, yb = next(iter(ours))
    xc, yc = next(iter(course))
    for name, (x, y) in dict(ours=(xb, yb), course=(xc, yc)).items():
        if x.shape != (BS, 1, 28, 28) or x.dtype != torch.float32 or y.dtype != torch.int64:
            raise AssertionError(f'{name} gives {tuple(x.shape)} {x.dtype}, {y.dtype}')
    first_ours = ours.get_batch(torch.arange(4))[0]  # the same four images through both routes
    first_course = collate_dict(course.dataset)([course.dataset[i] for i in range(4)])[0]
    if not torch.equal(first_ours, first_course):  # bitwise
        raise AssertionError('the two routes normalise differently')


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=9, help='interleaved rounds')
    p.add_argument('--course-batches', type=int, default=20, help="course-route batches timed per round")
    p.add_argument('--fast-batches', type=int, default=300, help='batches of ours and of bare timed per round')
    p.add_argument('--threads', type=int, default=1, help='torch threads (default 1: the machine is shared)')
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print('machine:', machine())

    ours = fashion_dls(bs=BS, source='sample', seed=0).train
    course = course_dl()
    bare = Bare(ours.x.view(len(ours.x), -1), ours.y)  # the same uint8 tensor ours cuts from
    check_same_batches(ours, course)
    print(f'same batches checked: ours and course both give ({BS},1,28,28) float32, bitwise equal; '
          f'train split {len(ours.x)} '
          f'images = {len(ours)} batches per epoch\n')

    loaders = dict(ours=(ours, args.fast_batches), bare=(bare, args.fast_batches),
                   course=(course, args.course_batches))
    for dl, n in loaders.values(): rate(dl, min(n, 5))  # warm-up
    times = {k: [] for k in loaders}
    names = list(loaders)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:  # rotate the order each round
            times[k].append(rate(*loaders[k]))

    med = {k: (statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)) for k, ts in times.items()}
    pair = lambda a, b, i: statistics.median(tb[i] / ta[i] for ta, tb in zip(times[a], times[b]))  # per-round ratio
    print(f"{'route':8s} {'batches/s (wall)':>17s} {'batches/s (CPU)':>16s} {'batches timed':>14s}")
    for k, (w, c) in med.items():
        print(f'{k:8s} {1/w:17.1f} {1/c:16.1f} {args.rounds * loaders[k][1]:14d}')
    oc_w, oc_c, ob_w, ob_c = (pair('ours', 'course', 0), pair('ours', 'course', 1),
                              pair('ours', 'bare', 0), pair('ours', 'bare', 1))
    print(f'\nours/course: {oc_w:.0f}x wall, {oc_c:.0f}x CPU  (goal >= {GOAL_COURSE}x: '
          f'{"met" if oc_w >= GOAL_COURSE else "NOT met"}, judged on wall clock; CPU time counts every thread)')
    print(f'ours/bare:   {ob_w:.2f} wall, {ob_c:.2f} CPU  (the fraction of the bare loop\'s rate we reach)')
    print('load average at end:', ', '.join(f'{x:.2f}' for x in os.getloadavg()))


if __name__ == '__main__': main()
