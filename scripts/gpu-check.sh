#!/usr/bin/env bash
# The GPU check (docs/benchmarks.md, "GPU check"), for a machine with an NVIDIA GPU, nvcc and
# PyTorch: builds `fmboost` with CUDA (release), runs every golden file on the GPU in f32 and
# bf16, `bench cfm` (paper config, 128² latent, f32 and bf16), `bench chain` (1024² and 2048²)
# and the PyTorch counterparts on the same card. Every step writes its JSON (lines) to
# OUT/<step>.json and its stderr to OUT/logs/<step>.log; OUT/summary.json lists each step with
# its status (ok, failed, skipped and why), exit code and seconds; OUT/env.json the card,
# driver, toolkit, torch and rustc. A step that would not fit in the remaining time budget
# is skipped, never cut off half-way (each also runs under a timeout).
#
#   scripts/gpu-check.sh [--dry-run] [--out DIR] [--budget-s S] [--device cuda:N] [--only STEP,...]
#
# --only runs the named steps (or name prefixes: `golden`, `cfm`, `chain`, `torch`; `build` is
# implied for fmboost steps): a second call on a warm machine picks up what the budget skipped.
# --device cuda:N exports CUDA_VISIBLE_DEVICES=N, so ours (`cuda:0`) and PyTorch (`cuda`) share
# the card.
#
# --dry-run (CPU only; scripts/test.sh runs it): checks this script's syntax, resolves the
# golden list, runs every fmboost command it would run, with its exact flags, on the CPU build
# (which must refuse `--device cuda:0` with its one-line "built without CUDA" error: every
# other flag was parsed), runs `check-golden` on every golden file on the CPU and a tiny real
# `bench cfm`, and parses every PyTorch command line (scripts/check_script_args.py).
#
# Environment: OUT (default target/gpu-check/out), FMBOOST_GOLDEN_DIR (../shared/golden),
# PYTHON (an interpreter with torch; default python3), CUDA_COMPUTE_CAP (default: the card's,
# from nvidia-smi, else 90), FMBOOST_CUDA_LIB_DIRS (more directories, `:`-separated, searched
# for the CUDA libraries candle links), FMBOOST_BIN (dry run: the fmboost to check; default
# \$CARGO_TARGET_DIR/debug/fmboost, else target/debug/fmboost).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out="${OUT:-target/gpu-check/out}"
budget_s=540
device="cuda:0"
only=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --out) out="${2:?--out needs a directory}"; shift 2 ;;
        --budget-s) budget_s="${2:?--budget-s needs seconds}"; shift 2 ;;
        --device) device="${2:?--device needs cuda:N}"; shift 2 ;;
        --only) only="${2:?--only needs step names}"; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu-check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$budget_s" in ''|*[!0-9]*) echo "gpu-check.sh: --budget-s $budget_s: expected whole seconds" >&2; exit 2 ;; esac
case "$device" in
    cuda:[0-9]*) ordinal="${device#cuda:}" ;;
    *) echo "gpu-check.sh: --device $device: expected cuda:N" >&2; exit 2 ;;
esac
case "$ordinal" in *[!0-9]*) echo "gpu-check.sh: --device $device: expected cuda:N" >&2; exit 2 ;; esac

golden_dir="${FMBOOST_GOLDEN_DIR:-$(cd .. && pwd)/shared/golden}"
python="${PYTHON:-python3}"
cuda_target=target/gpu-check/cargo
started=$SECONDS

log() { echo "gpu-check: $*" >&2; }
die() { log "$*"; exit 1; }

json_str() {
    local s=${1//\\/\\\\}
    s=${s//\"/\\\"}
    s=${s//$'\n'/\\n}
    s=${s//$'\t'/\\t}
    s=${s//$'\r'/}
    printf '"%s"' "$s"
}

# ---------------------------------------------------------------------------------------------
# The plan: every step with its time estimate (seconds, on an H100/H200-class card), its own
# timeout, and its command. Ours run `fmboost`, the PyTorch ones `$python`.
# ---------------------------------------------------------------------------------------------
golden_files=()
for f in "$golden_dir"/*.safetensors; do
    [ -f "$f" ] && golden_files+=("$f")
done
[ ${#golden_files[@]} -gt 0 ] || die "no golden files (*.safetensors) in $golden_dir (set FMBOOST_GOLDEN_DIR)"

steps=() # names, in order of priority
declare -A step_est step_timeout step_kind step_cmd
add_step() { # NAME EST_S TIMEOUT_S KIND(fmboost|torch) ARGS...
    local name=$1 est=$2 limit=$3 kind=$4
    shift 4
    steps+=("$name")
    step_est[$name]=$est
    step_timeout[$name]=$limit
    step_kind[$name]=$kind
    step_cmd[$name]=$(printf '%q ' "$@")
}

for dtype in f32 bf16; do
    add_step "golden-$dtype" 30 180 fmboost check-golden --device cuda:0 --dtype "$dtype" --json "${golden_files[@]}"
done
for dtype in f32 bf16; do
    add_step "cfm-$dtype" 30 180 fmboost bench cfm --config paper --latent 128 --device cuda:0 --dtype "$dtype" --steps 20 --warmup 5
    add_step "torch-cfm-$dtype" 40 180 torch scripts/bench/torch_cfm_bench.py --config paper --latent 128 --device cuda --dtype "$dtype" --steps 20 --warmup 5
done
for dtype in f32 bf16; do
    add_step "chain-1024-$dtype" 60 300 fmboost bench chain --px 1024 --device cuda:0 --dtype "$dtype"
    add_step "torch-chain-1024-$dtype" 90 300 torch scripts/bench/torch_chain_bench.py --px 1024 --device cuda --dtype "$dtype"
done
for dtype in f32 bf16; do
    add_step "chain-2048-$dtype" 120 400 fmboost bench chain --px 2048 --device cuda:0 --dtype "$dtype"
done

selected() { # NAME: is it in --only (names or prefixes)?
    [ -z "$only" ] && return 0
    local want
    IFS=, read -r -a want <<<"$only"
    for w in "${want[@]}"; do
        case "$1" in "$w"|"$w"-*) return 0 ;; esac
    done
    return 1
}
if [ -n "$only" ]; then
    any=0
    for name in "${steps[@]}"; do selected "$name" && any=1; done
    [ "$any" = 1 ] || die "--only $only: matches no step (steps: ${steps[*]})"
fi

# ---------------------------------------------------------------------------------------------
# Dry run: everything that can be checked without a GPU.
# ---------------------------------------------------------------------------------------------
if [ "$dry_run" = 1 ]; then
    bash -n "$0" || die "dry run: $0 has a syntax error"
    fmboost="${FMBOOST_BIN:-${CARGO_TARGET_DIR:-target}/debug/fmboost}"
    [ -x "$fmboost" ] || die "dry run: $fmboost missing (cargo build -p fmboost-cli, or set FMBOOST_BIN)"
    command -v "$python" >/dev/null 2>&1 || die "dry run: $python not found (set PYTHON)"
    [ -f scripts/bench/torch_cfm_bench.py ] || die "dry run: scripts/bench/torch_cfm_bench.py missing"
    log "dry run: ${#golden_files[@]} golden files in $golden_dir"
    has_chain=1
    "$fmboost" bench chain --help >/dev/null 2>&1 || has_chain=0
    notes=()
    for name in "${steps[@]}"; do
        eval "set -- ${step_cmd[$name]}"
        if [ "${step_kind[$name]}" = fmboost ]; then
            if [ "$1 $2" = "bench chain" ] && [ "$has_chain" = 0 ]; then
                notes+=("$name: \`fmboost bench chain\` does not exist in this build; its command line is kept for when it does: fmboost $*")
                continue
            fi
            # The CPU build must refuse the GPU with its one-line error (exit 1), after clap
            # accepted every other flag (a usage error is exit 2). The timeout catches a
            # command that does heavy work before it opens the device.
            set +e
            err=$(timeout 120 "$fmboost" "$@" 2>&1 >/dev/null)
            rc=$?
            set -e
            lines=$(printf '%s\n' "$err" | grep -c .)
            if [ "$rc" != 1 ] || [ "$lines" != 1 ] || ! printf '%s' "$err" | grep -q -- "--device: \`cuda:0\`"; then
                die "dry run: $name: \`fmboost $*\` on the CPU build: expected exit 1 and one line refusing --device cuda:0, got exit $rc:"$'\n'"$err"
            fi
            log "dry run: $name: flags accepted (${err#error: })"
        else
            script=$1
            if [ ! -f "$script" ]; then
                notes+=("$name: $script does not exist yet; its command line is kept for when it does: $python $*")
                continue
            fi
            parsed=$("$python" scripts/check_script_args.py "$@") || die "dry run: $name: $script rejects: $*"
            log "dry run: $name: $script accepts its arguments"
            printf '%s\n' "$parsed" | grep -q '"parsed"' || die "dry run: $name: no parsed arguments from $script"
        fi
    done
    # The golden list on the CPU in f32, through the same --json report the GPU run writes.
    report=$("$fmboost" check-golden --device cpu --dtype f32 --json "${golden_files[@]}") \
        || die "dry run: check-golden failed on the CPU:"$'\n'"$report"
    checks=$(printf '%s\n' "$report" | grep -c '"ok":true')
    [ "$checks" -gt 0 ] || die "dry run: check-golden reported no passing checks"
    log "dry run: check-golden on the CPU: $checks checks ok"
    # A real, tiny bench cfm on the CPU: the JSON line the GPU run parses.
    tiny_config=$(mktemp)
    trap 'rm -f "$tiny_config"' EXIT
    printf '%s\n' '{"in_channels":8,"out_channels":4,"model_channels":32,"channel_mult":[1,2],"num_res_blocks":1,"attention_resolutions":[2],"num_heads":2,"dim_head":8,"use_linear_attn":false,"use_scale_shift_norm":true,"conv_resample":true}' >"$tiny_config"
    line=$("$fmboost" bench cfm --config "$tiny_config" --latent 16 --steps 1 --warmup 0 --device cpu --dtype f32) \
        || die "dry run: tiny bench cfm on the CPU failed"
    printf '%s\n' "$line" | grep -q '"seconds_per_nfe"' || die "dry run: bench cfm printed no seconds_per_nfe: $line"
    log "dry run: tiny bench cfm on the CPU printed its JSON line"
    for note in "${notes[@]}"; do log "NOTE: $note"; done
    log "dry run ok in $((SECONDS - started)) s (${#steps[@]} steps planned)"
    exit 0
fi

# ---------------------------------------------------------------------------------------------
# The real run.
# ---------------------------------------------------------------------------------------------
mkdir -p "$out/logs"
out=$(cd "$out" && pwd)
summary="$out/steps.jsonl"
: >"$summary"
export CUDA_VISIBLE_DEVICES="$ordinal"
command -v nvidia-smi >/dev/null 2>&1 || die "nvidia-smi not found: this is the GPU check (use --dry-run without a GPU)"
gpu_line=$(nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader -i "$ordinal" 2>&1) \
    || die "nvidia-smi -i $ordinal: $gpu_line"
IFS=, read -r gpu_name gpu_driver gpu_memory gpu_cap <<<"$gpu_line"
gpu_cap=$(echo "$gpu_cap" | tr -d ' .')
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-${gpu_cap:-90}}"
log "card: $gpu_line (building for compute capability $CUDA_COMPUTE_CAP)"

record() { # NAME STATUS EXIT SECONDS REASON [OUTPUT]
    printf '{"step":%s,"status":%s,"exit":%s,"seconds":%s,"output":%s,"reason":%s}\n' \
        "$(json_str "$1")" "$(json_str "$2")" "$3" "$4" "$(json_str "${6:-$1.json}")" "$(json_str "$5")" >>"$summary"
}

# The CUDA libraries candle links (cudarc, dynamic linking): unversioned names for the linker,
# their directories for the loader. PyTorch's wheels carry most of them (nvidia/*/lib).
cuda_lib_dirs() {
    local dirs=()
    [ -n "${FMBOOST_CUDA_LIB_DIRS:-}" ] && IFS=: read -r -a dirs <<<"$FMBOOST_CUDA_LIB_DIRS"
    for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
        [ -n "$root" ] && dirs+=("$root/lib64" "$root/lib" "$root/targets/x86_64-linux/lib")
    done
    if "$python" -c 'import nvidia' >/dev/null 2>&1; then
        while IFS= read -r d; do dirs+=("$d"); done < <("$python" -c '
import glob, nvidia, os
for root in nvidia.__path__:
    for d in sorted(glob.glob(os.path.join(root, "*", "lib"))):
        print(d)')
    fi
    dirs+=(/usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/lib64/stubs)
    printf '%s\n' "${dirs[@]}"
}
link_dir="$(pwd)/target/gpu-check/link"
prepare_cuda_libs() {
    rm -rf "$link_dir"
    mkdir -p "$link_dir"
    local missing=() loader_dirs=() found lib d
    mapfile -t search < <(cuda_lib_dirs)
    for lib in cuda cudart cublas cublasLt curand nvrtc; do
        found=""
        for d in "${search[@]}"; do
            [ -d "$d" ] || continue
            # The driver's own libcuda comes before the toolkit's link-only stub (searched last).
            found=$(ls "$d"/lib"$lib".so "$d"/lib"$lib".so.[0-9]* 2>/dev/null | head -1 || true)
            [ -n "$found" ] && break
        done
        if [ -z "$found" ]; then
            missing+=("lib$lib.so")
            continue
        fi
        ln -sf "$(readlink -f "$found")" "$link_dir/lib$lib.so"
        loader_dirs+=("$(dirname "$(readlink -f "$found")")")
        log "links lib$lib against $found"
    done
    missing_libs="${missing[*]}"
    if [ ${#missing[@]} -gt 0 ]; then
        log "CUDA libraries not found: ${missing[*]} (searched: ${search[*]}; add directories with FMBOOST_CUDA_LIB_DIRS)"
        return 1
    fi
    LD_LIBRARY_PATH="$(printf '%s:' "${loader_dirs[@]}" | tr -s ':')${LD_LIBRARY_PATH:-}"
    export LD_LIBRARY_PATH
}

{
    printf '{"gpu":%s,"driver":%s,"memory":%s,"compute_cap":%s,' "$(json_str "${gpu_name# }")" "$(json_str "${gpu_driver# }")" \
        "$(json_str "${gpu_memory# }")" "$(json_str "$CUDA_COMPUTE_CAP")"
    printf '"nvcc":%s,"torch":%s,"rustc":%s,"cpus":%s,"commit":%s,"budget_s":%s}\n' \
        "$(json_str "$(nvcc --version 2>&1 | tail -1)")" \
        "$(json_str "$("$python" -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1 | tail -1)")" \
        "$(json_str "$(rustc -V 2>&1)")" "$(nproc)" "$(json_str "$(git rev-parse HEAD 2>/dev/null || echo unknown)")" "$budget_s"
} >"$out/env.json"

# cudarc 0.19.10 (candle 0.11's) knows CUDA up to 13.4 and stops on a newer nvcc: bind the
# newest API it knows (the driver runs older API versions). PTX from an nvcc newer than the
# driver cannot be loaded: say so before building.
pick_cudarc_version() {
    local release major minor driver_cuda
    release=$(nvcc --version | sed -n 's/.*release \([0-9]*\)\.\([0-9]*\).*/\1 \2/p')
    read -r major minor <<<"$release"
    [ -n "${major:-}" ] && [ -n "${minor:-}" ] || { log "nvcc --version: no release number"; return 1; }
    if [ "$major" -gt 13 ] || { [ "$major" = 13 ] && [ "$minor" -gt 4 ]; }; then
        export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13040}"
        log "nvcc $major.$minor is newer than cudarc knows: CUDARC_CUDA_VERSION=$CUDARC_CUDA_VERSION"
    fi
    driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\.[0-9]*\).*/\1/p' | head -1)
    if [ -n "$driver_cuda" ] && [ "$(printf '%s\n%s\n' "$driver_cuda" "$major.$minor" | sort -V | tail -1)" != "$driver_cuda" ]; then
        log "WARNING: nvcc $major.$minor is newer than the driver's CUDA $driver_cuda: its PTX may not load (CUDA_ERROR_UNSUPPORTED_PTX_VERSION)"
    fi
}

failures=0
need_build=0
for name in "${steps[@]}"; do
    selected "$name" && [ "${step_kind[$name]}" = fmboost ] && need_build=1
done
built=0
build_reason="not needed by --only"
if [ "$need_build" = 1 ]; then
    build_start=$SECONDS
    if ! command -v nvcc >/dev/null 2>&1; then
        build_reason="nvcc not on PATH"
    elif ! pick_cudarc_version; then
        build_reason="nvcc's version not understood"
    elif ! prepare_cuda_libs; then
        build_reason="CUDA libraries not found: $missing_libs (set FMBOOST_CUDA_LIB_DIRS)"
    else
        log "building fmboost with CUDA (release, target $cuda_target); log in $out/logs/build.log"
        # candle-kernels' nvcc jobs use every core (by default a share of them).
        if timeout "$((budget_s - (SECONDS - started)))" env CARGO_TARGET_DIR="$cuda_target" \
            CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}" \
            RUSTFLAGS="${RUSTFLAGS:-} -L native=$link_dir" \
            cargo build --release --locked -p fmboost-cli --features cuda >"$out/logs/build.log" 2>&1; then
            built=1
            build_reason=""
        else
            build_reason="cargo build failed or ran out of time (see logs/build.log)"
        fi
    fi
    [ "$built" = 1 ] || failures=$((failures + 1))
    record build "$([ "$built" = 1 ] && echo ok || echo failed)" "$([ "$built" = 1 ] && echo 0 || echo 1)" "$((SECONDS - build_start))" "$build_reason" logs/build.log
    log "build: $([ "$built" = 1 ] && echo ok || echo "FAILED: $build_reason") in $((SECONDS - build_start)) s"
fi
fmboost="$cuda_target/release/fmboost"

for name in "${steps[@]}"; do
    selected "$name" || continue
    remaining=$((budget_s - (SECONDS - started)))
    if [ "${step_kind[$name]}" = fmboost ] && [ "$built" != 1 ]; then
        record "$name" skipped null 0 "no CUDA build: $build_reason"
        log "$name: skipped (no CUDA build)"
        continue
    fi
    if [ "$remaining" -lt "${step_est[$name]}" ]; then
        record "$name" skipped null 0 "budget: ${remaining} s left, the step takes about ${step_est[$name]} s"
        log "$name: skipped (budget: $remaining s left)"
        continue
    fi
    eval "set -- ${step_cmd[$name]}"
    if [ "${step_kind[$name]}" = fmboost ]; then
        set -- "$fmboost" "$@"
    else
        if [ ! -f "$1" ]; then
            record "$name" skipped null 0 "$1 does not exist in this checkout"
            log "$name: skipped ($1 missing)"
            continue
        fi
        set -- "$python" "$@"
    fi
    limit=${step_timeout[$name]}
    [ "$limit" -gt "$remaining" ] && limit=$remaining
    log "$name: $* (timeout $limit s)"
    step_start=$SECONDS
    set +e
    timeout "$limit" "$@" >"$out/$name.json" 2>"$out/logs/$name.log"
    rc=$?
    set -e
    seconds=$((SECONDS - step_start))
    if [ "$rc" = 0 ]; then
        record "$name" ok 0 "$seconds" ""
        log "$name: ok in $seconds s"
    else
        failures=$((failures + 1))
        reason="exit $rc"
        [ "$rc" = 124 ] && reason="timed out after $limit s"
        record "$name" failed "$rc" "$seconds" "$reason: $(tail -3 "$out/logs/$name.log")"
        log "$name: FAILED ($reason; logs/$name.log)"
    fi
done

{ printf '['; paste -sd, "$summary"; printf ']\n'; } >"$out/summary.json"
log "done in $((SECONDS - started)) s: $failures failed; results in $out (summary.json)"
[ "$failures" = 0 ]
