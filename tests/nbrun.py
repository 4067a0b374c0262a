"""Execute notebooks in a real Jupyter kernel, as a reader does; used by tests/test_notebooks.py and to commit outputs.

    python tests/nbrun.py nbs/04_learner.ipynb ...   # execute in place, keep the outputs, then nbdev_clean
    python tests/nbrun.py --all                       # every notebook, two kernels side by side
    python tests/nbrun.py --full nbs/11_recipe.ipynb  # with MINIAI_FULL_RUN=1: a FULL_RUN notebook's real run
"""
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
FULL_TIMEOUT_S = 3*3600  # a full run trains for real: minutes to an hour per cell on a 2-core CPU

def notebooks(): return sorted(NBS.glob('*.ipynb'))

def kernel_env(full=False):
    "The environment a Jupyter user's kernel has: the inline plot backend (not Agg) and one torch thread per kernel."
    env = {k: v for k, v in os.environ.items() if k not in ('MPLBACKEND', 'MINIAI_FULL_RUN')}
    if full: env['MINIAI_FULL_RUN'] = '1'  # notebooks with a FULL_RUN switch do their real run
    env.setdefault('OMP_NUM_THREADS', '1')
    env.setdefault('HF_DATASETS_OFFLINE', '1')
    env.setdefault('HF_HUB_OFFLINE', '1')
    return env

def execute(path, timeout=900, full=False):
    "Run notebook `path` top to bottom in a fresh python3 kernel; return (executed notebook, seconds, error or None)."
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', resources={'metadata': {'path': str(NBS)}})
    start = time.time()
    try: client.execute(env=kernel_env(full))
    except CellExecutionError as e: return nb, time.time() - start, e
    return nb, time.time() - start, None

def execute_all(paths, workers=2, full=False):
    "Execute `paths` in `workers` kernels at once; return {path: (notebook, seconds, error or None)}."
    run = partial(execute, timeout=FULL_TIMEOUT_S if full else 900, full=full)
    with ThreadPoolExecutor(workers) as ex: return dict(zip(paths, ex.map(run, paths)))

def output_kinds(cell):
    "What a reader sees under a code cell: a set drawn from 'text', 'html', 'image' (stderr and errors aside)."
    kinds = set()
    for o in cell.get('outputs', []):
        if o['output_type'] == 'stream':
            if o.get('name') == 'stdout': kinds.add('text')
        elif o['output_type'] in ('execute_result', 'display_data'):
            data = o.get('data', {})
            if any(k.startswith('image/') for k in data): kinds.add('image')
            elif 'text/html' in data: kinds.add('html')
            elif data: kinds.add('text')
    return kinds

def code_cells(nb): return [c for c in nb['cells'] if c['cell_type'] == 'code']

if __name__ == '__main__':
    args = sys.argv[1:]
    full = '--full' in args
    args = [a for a in args if a != '--full']
    paths = notebooks() if args == ['--all'] else [Path(a).resolve() for a in args]
    for p, (nb, secs, err) in execute_all(paths, full=full).items():
        if err is not None: sys.exit(f'{p.name} failed in Jupyter, not written:\n{err}')
        nbformat.write(nb, p)
        subprocess.run([Path(sys.executable).parent/'nbdev_clean', '--fname', p], check=True, cwd=ROOT)  # this venv's
        print(f'{p.name}: {secs:.0f} s')
