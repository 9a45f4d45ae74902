#!/usr/bin/env bash
# the same load test on the code at the start of this session (b87d113, checked out in $BEFORE),
# alternating with the current code, each after the machine was quiet
set -e
out=$PWD/docs/figures/run-2026-11-30c
for i in 1 2; do
  bash $out/../run-2026-11-30b/logs/steal.sh 300; uptime
  (cd "$BEFORE" && python -m bench.serve --model rwkv-4-pile-169m --json $out/before_$i.json --plot /tmp/before_$i.png \
    2>&1 | tee $out/logs/before_$i.txt)
  if [ $i = 1 ]; then
    bash $out/../run-2026-11-30b/logs/steal.sh 300; uptime
    python -m bench.serve --model rwkv-4-pile-169m --wait-quiet 60 --json $out/serve_4.json --plot /tmp/serve_4.png \
      2>&1 | tee $out/logs/serve_4.txt
  fi
done
