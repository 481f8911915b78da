#!/usr/bin/env bash
# A/B two (or more) tessera binaries on this noisy machine: run `tessera
# bench` with each in turn, ROUNDS times, alternating, on one cluster
# directory, and print per workload the best and the median IOPS and the
# lowest CPU seconds per GiB of each binary. Slowdowns from other tenants
# only ever lower a run, so best-of-N is the fairer comparison.
#
#   bench/ab.sh DIR ROUNDS SECONDS WORKLOADS BINARY...
#   bench/ab.sh target/ab 4 3 randread-4k-qd1,seqwrite-1m-qd4 old/tessera target/release/tessera
#
# Extra `tessera bench` options go in $BENCH_ARGS (e.g. "--replicas 2").
set -euo pipefail
DIR=$1 ROUNDS=$2 SECS=$3 WORKLOADS=$4
shift 4
mkdir -p "$DIR"
OUT="$DIR/ab.jsonl"
: > "$OUT"
for round in $(seq 1 "$ROUNDS"); do
  for bin in "$@"; do
    echo "round $round: $bin" >&2
    # shellcheck disable=SC2086
    "$bin" bench --dir "$DIR/cluster" --disk-size 1G --span 256M --runtime "$SECS" \
        --workloads "$WORKLOADS" --json ${BENCH_ARGS:-} 2>/dev/null |
      python3 -c 'import json,sys; [print(json.dumps({"bin": sys.argv[1], **r})) for r in json.load(sys.stdin)["results"]]' "$bin" >> "$OUT"
  done
done
rm -rf "$DIR/cluster"
python3 - "$OUT" "$@" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
bins = sys.argv[2:]
names = list(dict.fromkeys(r["workload"]["name"] for r in rows))
print(f"{'workload':<19} {'binary':<28} {'best IOPS':>10} {'median':>10} {'min CPU s/GiB':>14}")
for w in names:
    for b in bins:
        runs = [r for r in rows if r["bin"] == b and r["workload"]["name"] == w]
        iops = [r["iops"] for r in runs]
        cpu = min(r["cpu_sec_per_gib"] for r in runs)
        print(f"{w:<19} {b[-28:]:<28} {max(iops):>10.0f} {statistics.median(iops):>10.0f} {cpu:>14.2f}")
PY
