"""The notebooks as a Jupyter user meets them: run top to bottom in a real kernel, committed with current outputs,
and nbdev's documentation processing runs clean."""
import re
import subprocess
import sys

import nbformat
import pytest

from nbrun import NBS, ROOT, code_cells, execute_all, notebooks, output_kinds

BUDGET_S = 240  # each notebook must run top to bottom in Jupyter on a CPU in about 3 minutes

@pytest.fixture(scope='session')
def executed(request):
    "The notebooks the selected tests need (their `path`), each executed once in a fresh Jupyter kernel, two at a time."
    need = {it.callspec.params['path'] for it in request.session.items
            if 'executed' in getattr(it, 'fixturenames', ())
            and 'path' in getattr(getattr(it, 'callspec', None), 'params', {})}
    return execute_all(sorted(need))

def test_every_notebook_is_committed_executed():
    for p in notebooks():
        nb = nbformat.read(p, as_version=4)
        assert any(c.get('outputs') for c in code_cells(nb)), \
            f"{p.name} has no outputs: run python tests/nbrun.py {p.relative_to(ROOT)}"

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

@pytest.mark.parametrize('path', [NBS/'04_learner.ipynb'], ids=lambda p: p.stem)
def test_progress_table_renders_in_jupyter(path, executed):
    "In a real kernel ProgressCB draws its metrics table as HTML (execnb, which nbdev_test uses, never shows this)."
    nb, _, err = executed[path]
    assert err is None, err
    html = [o['data']['text/html'] for c in code_cells(nb) for o in c['outputs'] if 'text/html' in o.get('data', {})]
    assert any('<table' in h and 'accuracy' in h and 'loss' in h for h in html)

# nbdev_proc_nbs would first try to install quarto (it can't be installed here); this is the rest of it, as it runs
PROC_NBS = ("from nbdev.quarto import refresh_quarto_yml; from nbdev.serve import proc_nbs; "
            "refresh_quarto_yml(); proc_nbs(force=True)")

def test_docs_pipeline_runs_clean():
    "nbdev's processing of every notebook for the docs (all of nbdev_docs before quarto) runs without error or warning."
    r = subprocess.run([sys.executable, '-c', PROC_NBS], cwd=ROOT, capture_output=True, text=True)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert 'Error' not in out and 'Found cells containing imports' not in out, out
    assert len(list((ROOT/'_proc').glob('*.ipynb'))) == len(notebooks())

# What the committed outputs show a reader. These run on the committed notebooks only (no kernel): fast, and red until
# a notebook is re-executed with `python tests/nbrun.py [--full] nbs/X.ipynb` and committed.

def out_texts(cell, streams=('stdout', 'stderr')):
    "The text a reader sees under `cell`: its streams (of `streams`), text results and error tracebacks."
    for o in cell.get('outputs', []):
        if o['output_type'] == 'stream':
            if o.get('name') in streams: yield o['name'], ''.join(o['text'])
        elif o['output_type'] == 'error': yield 'error', '\n'.join(o.get('traceback', []))
        elif 'stdout' in streams: yield 'text', ''.join(o.get('data', {}).get('text/plain', ''))

def committed(path): return code_cells(nbformat.read(path, as_version=4))
def rerun(path, full=False): return f"python tests/nbrun.py {'--full ' if full else ''}{path.relative_to(ROOT)}"

WARNING = re.compile(r'Warning|WARNING')
MACHINE_PATH = re.compile(r'site-packages|/home/|/work/|/tmp/|\.venv|/root/|/Users/')

@pytest.mark.parametrize('path', notebooks(), ids=lambda p: p.stem)
def test_committed_outputs_show_no_warning_or_machine_path(path):
    "A reader sees no warning they can't act on (stderr), and no path of the machine the notebook ran on (anywhere)."
    bad = [(i, kind, line.strip()[:120]) for i, c in enumerate(committed(path)) for kind, text in out_texts(c)
           for line in text.splitlines() if MACHINE_PATH.search(line) or (kind == 'stderr' and WARNING.search(line))]
    assert not bad, (f"{path.name}: committed outputs show a warning or a machine path "
                     f"(code cell, stream, line): {bad}; "
                     f"fix its cause (or silence it in that cell, saying why), then {rerun(path)}")

MIN_SHOWN = 0.25  # the course's notebooks show output under 27-70% of their code cells

@pytest.mark.parametrize('path', notebooks(), ids=lambda p: p.stem)
def test_a_quarter_of_code_cells_show_something(path):
    cells = committed(path)
    shown = sum(bool(c.get('outputs')) for c in cells)
    assert shown >= MIN_SHOWN*len(cells), (f"{path.name}: only {shown} of {len(cells)} code cells show an output; "
        f"show at least {MIN_SHOWN:.0%} (a value, a table, a plot of what the cell did), then {rerun(path)}")

FULL_RUN_SWITCH = re.compile(r'^FULL_RUN\s*=', re.M)
def full_run_notebooks():
    return [p for p in notebooks() if any(FULL_RUN_SWITCH.search(c['source']) for c in committed(p))]

@pytest.mark.parametrize('path', full_run_notebooks(), ids=lambda p: p.stem)
def test_full_run_notebooks_are_committed_with_the_full_run(path):
    """A notebook with a `FULL_RUN` switch is committed executed with it on, so readers see real results. The marker:
    the cell that sets FULL_RUN prints a line starting 'full run' when it is on (and something else when off), and no
    committed output says a part was 'skipped: set FULL_RUN = True'. Red until the lead's final full runs."""
    cells = committed(path)
    switch = next(c for c in cells if FULL_RUN_SWITCH.search(c['source']))
    said = [t.strip().lower() for _, t in out_texts(switch, ('stdout',))]
    skipped = [i for i, c in enumerate(cells) for _, t in out_texts(c, ('stdout',)) if 'set FULL_RUN' in t]
    how = (f"let the switch cell print('full run: ...' if FULL_RUN else 'short run: ...'), then commit it executed "
           f"with {rerun(path, full=True)}")
    assert said and said[0].startswith('full run'), f"{path.name}: its FULL_RUN cell shows {said or 'nothing'}; {how}"
    assert not skipped, f"{path.name}: code cells {skipped} say they were skipped without FULL_RUN; {how}"

def full_run_numbers(path, pattern):
    "The numbers `pattern` captures in the committed stdout of the cells that use FULL_RUN."
    return [float(m) for c in committed(path) if 'FULL_RUN' in c['source']
            for _, t in out_texts(c, ('stdout',)) for m in re.findall(pattern, t)]

def test_committed_recipe_accuracy_is_the_recipes(path=NBS/'11_recipe.ipynb'):
    "The recipe reaches about 91% on the sample's held-out images (benchmarks/RESULTS.md); the committed run shows it."
    accs = full_run_numbers(path, r'accuracy[^\n]*?\b(0\.\d+)')
    assert accs, (f"{path.name}: no accuracy printed by a FULL_RUN cell; "
                  f"commit it executed with {rerun(path, full=True)}")
    assert accs[-1] >= 0.90, f"{path.name}: the committed full run shows accuracy {accs[-1]}, below the recipe's 0.90"

# FIDs of 500 samples against the 1,000 held-out images (benchmarks/RESULTS.md): real training images 0.6, clipped
# Gaussian noise 37.3, 'miniai ddpm' 2.7; at 200 samples partly recognisable clothes (565 training steps) score 11-13
# and clothes (1,680 steps) 5. Below 15 the samples are clothing, even at 200 samples, where FID reads higher.
FID_BOUND = 15.

def test_committed_ddpm_samples_are_clothing_not_noise(path=NBS/'13_ddpm.ipynb'):
    ("Every FID 13_ddpm's full run prints for the model's samples (not for noise or real-image references) "
     "is below the bound.")
    fids = [(line.strip(), float(m)) for c in committed(path) for _, t in out_texts(c, ('stdout',))
            for line in t.splitlines() if not re.search(r'noise|real', line, re.I)
            for m in re.findall(r'FID[\s:=]*(\d+(?:\.\d+)?)', line)]
    assert fids, (f"{path.name}: no FID printed; print the samples' FID (miniai.fid) "
                  f"and commit with {rerun(path, full=True)}")
    bad = [f for f in fids if f[1] >= FID_BOUND]
    assert not bad, f"{path.name}: committed FIDs {bad} are not below {FID_BOUND}: noise, not clothing; train longer"
