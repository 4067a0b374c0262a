"""The notebooks as a Jupyter user meets them: run top to bottom in a real kernel, committed with current outputs,
and nbdev's documentation processing runs clean."""
import subprocess
import sys

import nbformat
import pytest

from nbrun import NBS, ROOT, code_cells, execute_all, notebooks, output_kinds

BUDGET_S = 240  # each notebook must run top to bottom in Jupyter on a CPU in about 3 minutes

@pytest.fixture(scope='session')
def executed():
    "Every notebook executed once in a fresh Jupyter kernel, two at a time."
    return execute_all(notebooks())

def test_every_notebook_is_committed_executed():
    for p in notebooks():
        nb = nbformat.read(p, as_version=4)
        assert any(c.get('outputs') for c in code_cells(nb)), f"{p.name} has no outputs: run python tests/nbrun.py {p.relative_to(ROOT)}"

@pytest.mark.parametrize('path', notebooks(), ids=lambda p: p.stem)
def test_committed_outputs_are_current(path, executed):
    "Cell by cell, executing the notebook now gives the same kinds of output (text, table, picture) as committed."
    committed = code_cells(nbformat.read(path, as_version=4))
    nb, secs, err = executed[path]
    assert err is None, f"{path.name} fails when run top to bottom in Jupyter:\n{err}"
    fresh = code_cells(nb)
    assert len(committed) == len(fresh)
    stale = [(i, sorted(output_kinds(a)), sorted(output_kinds(b))) for i, (a, b) in enumerate(zip(committed, fresh))
             if output_kinds(a) != output_kinds(b)]
    assert not stale, (f"{path.name}: committed outputs differ from a fresh run (code cell, committed, now): {stale}; "
                       f"re-run it with python tests/nbrun.py {path.relative_to(ROOT)} and commit")
    assert secs < BUDGET_S, f"{path.name} took {secs:.0f} s in Jupyter, over its {BUDGET_S} s budget"

def test_progress_table_renders_in_jupyter(executed):
    "In a real kernel ProgressCB draws its metrics table as HTML (execnb, which nbdev_test uses, never shows this)."
    nb, _, err = executed[NBS/'04_learner.ipynb']
    assert err is None, err
    html = [o['data']['text/html'] for c in code_cells(nb) for o in c['outputs'] if 'text/html' in o.get('data', {})]
    assert any('<table' in h and 'accuracy' in h and 'loss' in h for h in html)

# nbdev_proc_nbs would first try to install quarto (it can't be installed here); this is the rest of it, as it runs
PROC_NBS = "from nbdev.quarto import refresh_quarto_yml; from nbdev.serve import proc_nbs; refresh_quarto_yml(); proc_nbs(force=True)"

def test_docs_pipeline_runs_clean():
    "nbdev's processing of every notebook for the docs (all of nbdev_docs before quarto) runs without error or warning."
    r = subprocess.run([sys.executable, '-c', PROC_NBS], cwd=ROOT, capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert 'Error' not in out and 'Found cells containing imports' not in out, out
    assert len(list((ROOT/'_proc').glob('*.ipynb'))) == len(notebooks())
