#!/usr/bin/env bash
# wait (up to $1 s) until hypervisor steal over 5 s is under 5 ticks per CPU-second (2.5%)
end=$(( $(date +%s) + ${1:-300} ))
while [ $(date +%s) -lt $end ]; do
  a=$(awk '/^cpu /{print $9}' /proc/stat); sleep 5; b=$(awk '/^cpu /{print $9}' /proc/stat)
  if [ $((b-a)) -le 5 ]; then echo "quiet: steal $((b-a)) ticks/5s at $(date +%T)"; exit 0; fi
done
echo "still stolen at $(date +%T)"; exit 1
