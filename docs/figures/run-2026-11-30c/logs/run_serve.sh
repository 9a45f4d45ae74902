#!/usr/bin/env bash
# three load-test runs of the 169m server, each after the machine was quiet (hypervisor steal < 2.5% over 5 s)
set -e
out=docs/figures/run-2026-11-30c
for i in 1 2 3; do
  bash $out/../run-2026-11-30b/logs/steal.sh 300
  uptime
  python -m bench.serve --model rwkv-4-pile-169m --wait-quiet 60 --json $out/serve_$i.json --plot $out/serve_$i.png \
    2>&1 | tee $out/logs/serve_$i.txt
done
