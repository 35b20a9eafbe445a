#!/usr/bin/env bash
# Bulk tensors through one Redis: Redis CPU and bytes per job at 256², 1024² and 2048² px
# outputs (two CFM hops: base 64, 256, 512 px), the sleep profile making the real shapes
# (latents [1,4,H/8,W/8] f32 at every stage, a PNG at the end). Each size is one
# `fmboost-loadtest --local` run whose report has a `redis` section (INFO cpu/stats sampled
# when the cluster is ready and after the drain, and the blobs the run left in Redis).
#
#   scripts/bench/bulk.sh                 # about 2-3 minutes; writes target/bench-bulk/
#   BIN_DIR=target/release DURATION=20s CONCURRENCY=8 SIZES="256 1024 2048" scripts/bench/bulk.sh
#
# Results are fetched by the harness (GetResult of every PNG, as a client would) unless
# VERIFY=0. Run it on an idle machine: everything shares the cores, so the harness, the
# coordinator and the workers compete with Redis; Redis' CPU per job is what extrapolates.
set -euo pipefail
cd "$(dirname "$0")/../.."
BIN_DIR=${BIN_DIR:-target/release}
OUT=${OUT:-target/bench-bulk}
DURATION=${DURATION:-20s}
CONCURRENCY=${CONCURRENCY:-8}
SIZES=${SIZES:-256 1024 2048}
VERIFY=${VERIFY:-1}
WORKERS=${WORKERS:-diffusion=1,cfm=2,decoder=2}
mkdir -p "$OUT"
for bin in fmboost-loadtest fmboost-coordinator fmboost-worker-decoder; do
    [ -x "$BIN_DIR/$bin" ] || { echo "bulk.sh: $BIN_DIR/$bin missing: cargo build --release --workspace --bins" >&2; exit 2; }
done
verify=()
[ "$VERIFY" = 1 ] || verify=(--no-verify-output)
{
    echo "# scripts/bench/bulk.sh $(date -u +%FT%TZ) on $(nproc) cores, $(redis-server --version | grep -o 'v=[0-9.]*')"
    echo "# start: $(uptime)"
} | tee "$OUT/summary.txt"
for size in $SIZES; do
    base=$((size / 4))
    echo "== ${size}² output (base ${base} px, 2 hops), closed loop $CONCURRENCY, $DURATION" >&2
    rc=0
    "$BIN_DIR/fmboost-loadtest" --local --bin-dir "$BIN_DIR" --profile sleep --worker-profile sleep \
        --workers "$WORKERS" --width "$base" --height "$base" --hops 2 \
        --concurrency "$CONCURRENCY" --duration "$DURATION" --idempotency-probe-every 0 "${verify[@]}" \
        --report "$OUT/bulk-$size.json" > "$OUT/bulk-$size.md" || rc=$?
    [ "$rc" = 0 ] || { echo "bulk.sh: the ${size}² run failed ($rc), see $OUT/bulk-$size.md" >&2; exit "$rc"; }
    echo "# after ${size}²: $(uptime)" | tee -a "$OUT/summary.txt"
done
python3 - "$OUT" $SIZES <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
out, sizes = sys.argv[1], sys.argv[2:]
print("| output | jobs/s | Redis busy | Redis CPU ms/job (main thread) | net in B/job | net out B/job | commands/job | blobs B/job | PNG B | final latent B | one Redis saturates at (jobs/s, extrapolated) |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for size in sizes:
    r = json.load(open(f"{out}/bulk-{size}.json"))
    red, per = r["redis"], r["redis"]["per_job"]
    blobs = red["blobs"]
    mean = lambda kind: blobs[kind]["bytes"] // max(blobs[kind]["count"], 1) if kind in blobs else 0
    main = per["main_thread_cpu_ms"] if per["main_thread_cpu_ms"] is not None else per["cpu_ms"]
    print(f"| {size}² | {r['throughput_jobs_per_s']:.1f} | {red['busy_fraction']*100:.0f} % | {per['cpu_ms']:.2f} ({main:.2f}) | "
          f"{per['net_input_bytes']:,} | {per['net_output_bytes']:,} | {per['commands']:.0f} | {per['blob_bytes']:,} | "
          f"{mean('decoder:0'):,} | {mean('cfm:2'):,} | {red['saturation_jobs_per_s']:.0f} |")
PY
