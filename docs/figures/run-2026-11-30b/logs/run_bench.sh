#!/usr/bin/env bash
# Final measurements of 2026-11-30 (session 2), one after another (never two at once).
cd "$(git rev-parse --show-toplevel)" && . .venv/bin/activate   # steal.sh: logs/steal.sh
L=./logs; J=./json; mkdir -p $L $J
step() { ./steal.sh 180 >> $L/steps.txt; echo "=== $(date +%T) $1 | $(uptime | sed 's/.*load/load/') | steal ticks $(awk '/^cpu /{print $9}' /proc/stat)" | tee -a $L/steps.txt; }
step "serve base (01fdc34)"; (cd <checkout of 01fdc34> && PYTHONPATH=<checkout of 01fdc34> python -m bench.serve --model rwkv-4-pile-169m --threads 2 --clients 1,16 --requests-per-client 3 --max-tokens 128 --json $J/serve_base.json --plot $J/serve_base.png) > $L/serve_base.txt 2>&1
for r in 1 2 3; do
  step "serve run $r"; python -m bench.serve --model rwkv-4-pile-169m --threads 2 --clients 1,2,4,8,16,32 --requests-per-client 3 --max-tokens 128 --json $J/serve_$r.json --plot $J/serve_$r.png > $L/serve_$r.txt 2>&1
done
step "batch16 base"; (cd <checkout of 01fdc34> && PYTHONPATH=<checkout of 01fdc34> python -m bench.generate --model rwkv-4-pile-169m --batch 16 --tokens 128 --repeats 3 --json $J/base_169m_b16.json) > $L/base_169m_b16.txt 2>&1
step "batch16 new"; python -m bench.generate --model rwkv-4-pile-169m --batch 16 --tokens 128 --repeats 3 --json $J/decode_169m_b16.json > $L/decode_169m_b16.txt 2>&1
step "batch1 new"; python -m bench.generate --model rwkv-4-pile-169m --tokens 128 --repeats 3 --json $J/decode_169m_b1.json > $L/decode_169m_b1.txt 2>&1
for w in float32 float16 bfloat16 int8 float32; do
  step "169m $w"; python -m bench.generate --model rwkv-4-pile-169m --weights $w --tokens 256 --repeats 3 --json $J/decode_169m_$w.json > $L/decode_169m_$w.txt 2>&1
done
step "chunks fp32"; python -m bench.modes --model rwkv-4-pile-169m --chunks 2,4,8,16,24,32,48,64 --repeats 3 > $L/chunks_float32.txt 2>&1
step "chunks int8"; python -m bench.modes --model rwkv-4-pile-169m --weights int8 --chunks 2,4,8,16,24,32,48,64 --repeats 3 > $L/chunks_int8.txt 2>&1
step "prompt int8 vs fp32"; python -m bench.modes --model rwkv-4-pile-169m --weights int8 --against float32 --prompt-tokens 512 --repeats 5 > $L/modes_int8_vs_fp32.txt 2>&1
step contention; python -m bench.contention --model rwkv-4-pile-169m --threads 1,2 --tokens 128 --repeats 3 --json $J/contention.json > $L/contention.txt 2>&1
step done
