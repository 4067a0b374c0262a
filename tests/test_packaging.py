"The wheel builds without setuptools warnings and carries the bundled data, so an installed miniai works offline."
import subprocess, sys, sysconfig, zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ['miniai/data/fashion_mnist_sample.npz', 'miniai/data/fid_classifier.npz']

def run(*cmd, **kw): return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=600, **kw)

def test_wheel_builds_clean_and_its_install_loads_the_sample(tmp_path):
    r = run(sys.executable, '-m', 'pip', 'wheel', '-v', '--no-deps', '-w', tmp_path/'whl', ROOT)
    log = r.stdout + r.stderr
    if r.returncode and ('No matching distribution' in log or 'Could not find a version' in log):
        pytest.skip('no setuptools to build with (offline, without a local package index)')
    assert r.returncode == 0, log[-3000:]
    assert 'absent from the `packages` configuration' not in log and 'would be ignored' not in log, log[-3000:]
    whl, = (tmp_path/'whl').glob('miniai-*.whl')
    assert set(DATA) <= set(zipfile.ZipFile(whl).namelist())

    # A fresh venv that sees torch & co. from this environment (a .pth line, since --system-site-packages would give
    # the base Python's when this one is a venv); only the wheel itself is installed into it
    venv = tmp_path/'venv'
    assert run(sys.executable, '-m', 'venv', '--system-site-packages', venv).returncode == 0
    py = venv/'bin'/'python'
    site = Path(run(py, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])').stdout.strip())
    outer = {sysconfig.get_paths()[k] for k in ('purelib', 'platlib')}
    (site/'outer_env.pth').write_text('\n'.join(sorted(outer)) + '\n')
    r = run(py, '-m', 'pip', 'install', '--no-deps', '--no-index', whl)
    assert r.returncode == 0, r.stdout + r.stderr
    code = ("import miniai, numpy as np; from miniai.datasets import fashion_mnist_arrays, sample_path; "
            "a = fashion_mnist_arrays('sample'); print(miniai.__file__); print(sample_path()); "
            "print(len(a['train'][0]))")
    r = run(py, '-c', code, cwd=tmp_path)   # not from the repo, whose miniai/ would shadow the installed one
    assert r.returncode == 0, r.stderr
    where, sample, n = r.stdout.split()
    assert Path(where).is_relative_to(venv) and Path(sample).is_relative_to(venv), r.stdout
    assert int(n) > 1000
