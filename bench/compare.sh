#!/usr/bin/env bash
# twopc beside etcd in one run: for each concurrency, the etcd baseline
# (bench/etcd.sh), then `twopc bench --local` at the same concurrency and
# duration with each commit protocol (docs/PROTOCOL.md §5 sequential, §13
# parallel), each printing the ratio of committed transfers/s to etcd's
# decision records/s, and parallel's p50 as a share of sequential's. One after
# the other, never at once: they share the cores.
#
#   bench/compare.sh [DURATION_SECS] [CONCURRENCY...]      (defaults: 10 s at 1 and 64)
#   PROTOCOLS="parallel" bench/compare.sh ...              (only these protocols)
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
read -r -a protocols <<<"${PROTOCOLS:-sequential parallel}"
mkdir -p "$here/results"

for c in "${levels[@]}"; do
  etcd_json="$here/results/etcd-c$c.json"
  "$here/etcd.sh" --concurrency "$c" --duration "$duration" --json >"$etcd_json"
  echo "== concurrency $c: etcd $(grep -o '"throughput_per_s": [0-9.]*' "$etcd_json" | cut -d' ' -f2) writes/s"
  for protocol in "${protocols[@]}"; do
    "$twopc" bench --local --commit-protocol "$protocol" --concurrency "$c" --duration "$duration" \
      --baseline-json "$etcd_json" --json >"$here/results/twopc-$protocol-c$c.json"
  done
  python3 - "$here/results" "$c" "${protocols[@]}" <<'PY'
import json, sys
results, c, protocols = sys.argv[1], sys.argv[2], sys.argv[3:]
runs = {p: json.load(open(f"{results}/twopc-{p}-c{c}.json")) for p in protocols}
b = next(iter(runs.values()))["baseline"]
for p, r in runs.items():
    l = r["latency_ms"]
    print(f"   twopc {p:<10} {r['throughput_per_s']:8.1f} committed transfers/s  p50 {l['p50']:.2f} ms  p99 {l['p99']:.2f} ms  ratio to etcd {r['ratio']:.2f}")
print(f"   etcd             {b['throughput_per_s']:8.1f} decision records/s     p50 {b['latency_ms']['p50']:.2f} ms  p99 {b['latency_ms']['p99']:.2f} ms")
if "sequential" in runs and "parallel" in runs:
    s, p = runs["sequential"], runs["parallel"]
    print(f"   parallel/sequential: p50 {p['latency_ms']['p50'] / s['latency_ms']['p50']:.2f}x, throughput {p['throughput_per_s'] / s['throughput_per_s']:.2f}x")
PY
done
