"""What the benchmark scripts share (they aren't part of the package): `machine()`, \
the one line saying what a run ran on.

Each script imports it with `from _common import machine`, which works because Python puts a script's own folder
first on `sys.path` (`python benchmarks/recipe.py`)."""
import os
import platform

import torch


def cpu_model():
    "The CPU's model name from /proc/cpuinfo, else what `platform` knows."
    try:
        with open('/proc/cpuinfo') as f:
            name = next((l.split(':', 1)[1].strip() for l in f if l.startswith('model name')), None)
        if name: return name
    except OSError: pass
    return platform.processor() or platform.machine() or 'unknown CPU'


def _gpu(device):
    if device is None:
        return (f'GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})' if torch.cuda.is_available()
                else 'no GPU')
    device = torch.device(device)
    if device.type == 'cuda': return f'GPU {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})'
    return 'GPU present, not used' if torch.cuda.is_available() else 'no GPU used'


def machine(device=None):
    ("One line: OS, CPU model, cores (usable by this process), torch threads, GPU, Python and torch versions, "
     "load average.")
    cores = os.cpu_count()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else cores
    load = ', '.join(f'{x:.2f}' for x in os.getloadavg()) if hasattr(os, 'getloadavg') else 'n/a'
    return (f'{platform.platform()} | {cpu_model()} | {cores} cores ({usable} usable) | torch threads '
            f'{torch.get_num_threads()} | {_gpu(device)} | Python {platform.python_version()} | '
            f'torch {torch.__version__} | '
            f'load average {load}')
