#!/usr/bin/env bash
# Tessera side by side with the raw disk and with peer NBD servers, in one
# run, on the same disk (the directory given), with the same workloads:
#
#   raw        fio --ioengine=io_uring --direct=1 on a file      (the machine's limit)
#   driver-r1  tessera bench, 1 replica (through the driver, QUIC + TLS)
#   driver-r2  tessera bench, 2 replicas (both mirrors on the same disk)
#   tessera-nbd  fio --ioengine=nbd against `tessera nbd` (via `tessera demo`, 1 replica)
#   qemu-nbd   fio --ioengine=nbd against qemu-nbd --cache=none --aio=io_uring
#   nbdkit     fio --ioengine=nbd against nbdkit file (cache=none)
#
# Prints every figure and its ratio to raw; writes all results as JSON lines.
#
#   bench/compare.sh [DIR] [SECONDS_PER_WORKLOAD] [SPAN]
#   bench/compare.sh target/bench-compare 10 1G       # the defaults
#
# Installs fio, qemu-utils, nbdkit and libnbd-bin from Debian when missing
# (needs root for that); builds Tessera in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=$(realpath -m "${1:-target/bench-compare}")
SECS=${2:-10}
SPAN=${3:-1G}
mkdir -p "$DIR"
RESULTS="$DIR/results.jsonl"
DEMO= PEER=
trap 'kill $DEMO $PEER 2>/dev/null || true' EXIT
: > "$RESULTS"

missing=()
for pkg in fio qemu-utils nbdkit libnbd-bin; do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
cargo build --release --quiet
TESSERA=target/release/tessera

# name rw bs iodepth rwmixread
WORKLOADS=(
  "randread-4k-qd1 randread 4k 1 100"
  "randread-4k-qd32 randread 4k 32 100"
  "randwrite-4k-qd1 randwrite 4k 1 0"
  "randwrite-4k-qd32 randwrite 4k 32 0"
  "seqread-1m-qd4 read 1m 4 100"
  "seqwrite-1m-qd4 write 1m 4 0"
  "randrw70-4k-qd32 randrw 4k 32 70"
)

# Append one JSON line per fio job: setup, workload, iops, MB/s, p50/p99/p99.9 µs.
fio_run() {
  local setup=$1 workload=$2 rw=$3 bs=$4 qd=$5 mix=$6; shift 6
  fio --name="$workload" --rw="$rw" --bs="$bs" --iodepth="$qd" --rwmixread="$mix" \
      --runtime="$SECS" --time_based --ramp_time=1 --group_reporting \
      --output-format=json "$@" > "$DIR/fio.json" 2>"$DIR/fio.err" || {
        echo "fio failed for $setup $workload:" >&2; cat "$DIR/fio.err" >&2; return 1; }
  python3 - "$setup" "$workload" "$DIR/fio.json" >> "$RESULTS" <<'PY'
import json, sys
setup, workload, path = sys.argv[1:4]
text = open(path).read()
# The nbd engine prints a line before the JSON.
job = json.loads(text[text.index("{"):])["jobs"][0]
iops = job["read"]["iops"] + job["write"]["iops"]
mbps = (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 1e6
side = job["read"] if job["read"]["iops"] >= job["write"]["iops"] else job["write"]
pct = side.get("clat_ns", {}).get("percentile", {})
us = lambda k: round(pct.get(k, 0) / 1000)
print(json.dumps({"setup": setup, "workload": workload, "iops": iops, "mb_per_sec": mbps,
                  "p50_us": us("50.000000"), "p99_us": us("99.000000"), "p999_us": us("99.900000")}))
PY
}

fio_all() {
  local setup=$1; shift
  for w in "${WORKLOADS[@]}"; do
    # shellcheck disable=SC2086
    set -- $w "$@"
    echo "  $setup $1"
    fio_run "$setup" "$@"
    shift 5
  done
}

# Write the whole span once, so reads read data (unwritten extents and
# unwritten Tessera chunks read as zeroes without touching the disk).
fill() {
  fio --name=fill --rw=write --bs=1m --iodepth=8 --size="$SPAN" --output-format=terse "$@" \
      > /dev/null 2>"$DIR/fill.err" || { cat "$DIR/fill.err" >&2; return 1; }
}

wait_port() {
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1" >&2; return 1
}

echo "== raw disk: fio io_uring O_DIRECT on $DIR/raw.img"
rm -f "$DIR/raw.img"; fallocate -l "$SPAN" "$DIR/raw.img"
fill --filename="$DIR/raw.img" --ioengine=io_uring --direct=1
fio_all raw --filename="$DIR/raw.img" --size="$SPAN" --ioengine=io_uring --direct=1
rm -f "$DIR/raw.img"

for replicas in 1 2; do
  echo "== tessera bench through the driver, $replicas replica(s)"
  rm -rf "$DIR/driver-r$replicas"
  "$TESSERA" bench --dir "$DIR/driver-r$replicas" --replicas "$replicas" --span "$SPAN" \
      --runtime "$SECS" --json 2>/dev/null > "$DIR/bench.json"
  python3 - "driver-r$replicas" "$DIR/bench.json" >> "$RESULTS" <<'PY'
import json, sys
setup, path = sys.argv[1:3]
for r in json.load(open(path))["results"]:
    print(json.dumps({"setup": setup, "workload": r["workload"]["name"], "iops": r["iops"],
                      "mb_per_sec": r["mb_per_sec"], "p50_us": r["p50_us"], "p99_us": r["p99_us"],
                      "p999_us": r["p999_us"], "cpu_sec_per_gib": r["cpu_sec_per_gib"]}))
PY
  rm -rf "$DIR/driver-r$replicas"
done

echo "== tessera NBD frontend (tessera demo, 1 replica)"
rm -rf "$DIR/nbd"; mkdir -p "$DIR/nbd"
(cd "$DIR/nbd" && exec "$OLDPWD/$TESSERA" demo --replicas 1 --volume-size "$SPAN" \
    --nbd tcp:127.0.0.1:10931 > demo.out 2> demo.log) &
DEMO=$!
wait_port 10931
fill --ioengine=nbd --uri=nbd://127.0.0.1:10931/demo
fio_all tessera-nbd --ioengine=nbd --uri=nbd://127.0.0.1:10931/demo --size="$SPAN"
kill "$DEMO"; wait "$DEMO" || true
DEMO=
rm -rf "$DIR/nbd"

# A peer NBD server on a filled file of its own: SETUP PORT IMAGE COMMAND...
# (COMMAND serves IMAGE on 127.0.0.1:PORT in the foreground).
peer() {
  local setup=$1 port=$2 image=$3; shift 3
  echo "== $setup: $*"
  rm -f "$image"; fallocate -l "$SPAN" "$image"
  fill --filename="$image" --ioengine=io_uring --direct=1
  "$@" &
  PEER=$!
  wait_port "$port"
  fio_all "$setup" --ioengine=nbd --uri="nbd://127.0.0.1:$port" --size="$SPAN"
  kill "$PEER"; wait "$PEER" || true
  PEER=
  rm -f "$image"
}

peer qemu-nbd 10932 "$DIR/qemu.img" \
  qemu-nbd --cache=none --aio=io_uring -f raw -p 10932 -b 127.0.0.1 -e 64 --persistent "$DIR/qemu.img"
peer nbdkit 10933 "$DIR/nbdkit.img" \
  nbdkit --foreground -p 10933 -i 127.0.0.1 file "$DIR/nbdkit.img" cache=none

python3 - "$RESULTS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
raw = {r["workload"]: r for r in rows if r["setup"] == "raw"}
setups = []
for r in rows:
    if r["setup"] not in setups:
        setups.append(r["setup"])
print(f"\n{'workload':<19} {'setup':<12} {'IOPS':>9} {'MB/s':>8} {'p50 µs':>7} {'p99 µs':>7} {'p99.9':>7}  {'vs raw':>6}")
for w in raw:
    for s in setups:
        for r in rows:
            if r["setup"] == s and r["workload"] == w:
                ratio = r["iops"] / raw[w]["iops"] if raw[w]["iops"] else 0
                print(f"{w:<19} {s:<12} {r['iops']:>9.0f} {r['mb_per_sec']:>8.1f} {r['p50_us']:>7} {r['p99_us']:>7} {r['p999_us']:>7}  {ratio:>6.2f}")
print(f"\nresults: {sys.argv[1]}")
PY
