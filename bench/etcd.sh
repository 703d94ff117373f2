#!/usr/bin/env bash
# Starts a 3-member etcd cluster on loopback (fsync on, etcd's defaults),
# runs the etcd baseline against it with the given arguments, and stops etcd.
#
#   bench/etcd.sh [--concurrency N] [--duration SECS] [--warmup SECS] [--connections N] [--json]
#
# Needs Debian's etcd-server (apt-get install -y etcd-server etcd-client) and
# builds bench/etcd-baseline in release mode on first use (it needs protoc:
# $PROTOC, or protoc on the PATH, or the one protoc-bin-vendored ships).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

command -v etcd >/dev/null || { echo "etcd not found: apt-get install -y etcd-server etcd-client" >&2; exit 1; }
if [[ -z "${PROTOC:-}" ]]; then
  PROTOC="$(command -v protoc || ls "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/protoc-bin-vendored-linux-x86_64-*/bin/protoc 2>/dev/null | head -1 || true)"
fi
[[ -n "$PROTOC" ]] || { echo "no protoc: set PROTOC or apt-get install -y protobuf-compiler" >&2; exit 1; }
export PROTOC
(cd "$here/etcd-baseline" && cargo build --release --quiet)
baseline="$here/etcd-baseline/target/release/etcd-baseline"

data="$(mktemp -d)"
pids=()
stop() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$data"
}
trap stop EXIT

# Client ports 23791..23793, peer ports 23801..23803 (away from etcd's defaults).
cluster="e1=http://127.0.0.1:23801,e2=http://127.0.0.1:23802,e3=http://127.0.0.1:23803"
endpoints="http://127.0.0.1:23791,http://127.0.0.1:23792,http://127.0.0.1:23793"
for i in 1 2 3; do
  etcd --name "e$i" --data-dir "$data/e$i" \
    --listen-client-urls "http://127.0.0.1:2379$i" --advertise-client-urls "http://127.0.0.1:2379$i" \
    --listen-peer-urls "http://127.0.0.1:2380$i" --initial-advertise-peer-urls "http://127.0.0.1:2380$i" \
    --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token twopc-bench \
    --log-level error >"$data/e$i.log" 2>&1 &
  pids+=($!)
done
for _ in $(seq 1 100); do
  ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1 && break
  sleep 0.1
done
ETCDCTL_API=3 etcdctl --endpoints "$endpoints" endpoint health >/dev/null 2>&1 \
  || { echo "etcd did not become healthy; logs:" >&2; tail -n 20 "$data"/e*.log >&2; exit 1; }

"$baseline" --endpoints "$endpoints" "$@"
