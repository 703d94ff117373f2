#!/usr/bin/env bash
# twopc beside etcd in one run: for each concurrency, the etcd baseline
# (bench/etcd.sh), then `twopc bench --local` at the same concurrency and
# duration, which prints the ratio of committed transfers/s to etcd's
# decision records/s. One after the other, never at once: they share the cores.
#
#   bench/compare.sh [DURATION_SECS] [CONCURRENCY...]      (defaults: 10 s at 1 and 64)
#
# JSON results go to bench/results/. Build twopc first:
#   cargo build --release -p twopc-cli
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
twopc="${TWOPC:-$here/../target/release/twopc}"
[[ -x "$twopc" ]] || { echo "build twopc first: cargo build --release -p twopc-cli" >&2; exit 1; }
duration="${1:-10}"
shift || true
levels=("$@")
[[ ${#levels[@]} -gt 0 ]] || levels=(1 64)
mkdir -p "$here/results"

for c in "${levels[@]}"; do
  etcd_json="$here/results/etcd-c$c.json"
  "$here/etcd.sh" --concurrency "$c" --duration "$duration" --json >"$etcd_json"
  echo "== concurrency $c: etcd $(grep -o '"throughput_per_s": [0-9.]*' "$etcd_json" | cut -d' ' -f2) writes/s"
  "$twopc" bench --local --concurrency "$c" --duration "$duration" --baseline-json "$etcd_json" --json \
    >"$here/results/twopc-c$c.json"
  python3 - "$here/results/twopc-c$c.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
l, b = r["latency_ms"], r["baseline"]
print(f"   twopc {r['throughput_per_s']:.1f} committed transfers/s  p50 {l['p50']:.2f} ms  p99 {l['p99']:.2f} ms")
print(f"   etcd  {b['throughput_per_s']:.1f} decision records/s     p50 {b['latency_ms']['p50']:.2f} ms  p99 {b['latency_ms']['p99']:.2f} ms")
print(f"   ratio twopc/etcd = {r['ratio']:.2f}")
PY
done
