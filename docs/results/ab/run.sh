#!/bin/bash
# A/B of the tiled kernel between two source trees, alternating fresh processes, one thread each.
# Usage: BASE_SRC=/path/to/old/src NEW_SRC=/path/to/new/src PYTHON=python docs/results/ab/run.sh
# Each output line: variant round which fwd_seconds fwd_bwd_seconds (process CPU time).
here=$(cd "$(dirname "$0")" && pwd)
for variant in causal plain awsc; do
  for r in 1 2 3; do
    for which in base new; do
      if [ $which = base ]; then src=$BASE_SRC; else src=$NEW_SRC; fi
      echo "$variant $r $which $(OMP_NUM_THREADS=1 PYTHONPATH=$src ${PYTHON:-python} "$here/tiled_case.py" $variant 4096)"
    done
  done
done
