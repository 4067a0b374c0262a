#!/usr/bin/env bash
# The whole test suite, as README.md gives it: notebooks and library in sync, every notebook, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_DATASETS_OFFLINE=${HF_DATASETS_OFFLINE:-1} HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} MPLBACKEND=${MPLBACKEND:-Agg}

echo "== nbdev_export: miniai/ must already be what the notebooks export"
state() { git status --porcelain --untracked-files=all -- miniai; git diff -- miniai | md5sum; }
before=$(state)
nbdev_export
after=$(state)
if [ "$before" != "$after" ]; then
  echo "FAIL: nbdev_export changed files under miniai/ — run nbdev_export and commit the result:"
  git status --porcelain --untracked-files=all -- miniai
  git --no-pager diff --stat -- miniai
  exit 1
fi

echo "== nbdev_test: every notebook"
# one torch thread per notebook: two notebooks run side by side on the two cores
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} nbdev_test --n_workers "${NBDEV_WORKERS:-2}" --timing

echo "== pytest"
python -m pytest -q tests
