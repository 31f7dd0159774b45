#!/usr/bin/env bash
# Alternated A/B of the benchmark (issue 13): old 8ceb7e7 vs new HEAD, separate processes,
# background sweep paused meanwhile.
set -u
PG=$1
trap 'kill -CONT -- -$PG' EXIT
kill -STOP -- -$PG
sleep 20
for i in 1 2 3; do
  if [ $((i % 2)) -eq 1 ]; then order="old new"; else order="new old"; fi
  for side in $order; do
    tree=/work/${side}_tree
    echo "$(date -u +%T) start $side-$i load $(cut -d' ' -f1-3 /proc/loadavg)"
    (cd $tree && PYTHONPATH=$tree /work/main/.venv/bin/python -m experiments.benchmark \
        --out /work/ab/$side-$i --full --nopaper_scale --sections latency,post,efficiency \
        > /work/ab/$side-$i.log 2>&1)
    echo "$(date -u +%T) end $side-$i rc $?"
  done
done
