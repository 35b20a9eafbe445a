#!/usr/bin/env bash
# Ours and PyTorch's benchmark back to back, REPEAT times, on the same machine and threads:
# each JSON line on stdout, with `# loadavg ...` lines between them.
#
#   scripts/bench/compare.sh cfm  [REPEAT]     # bench cfm --config paper --latent 128
#   scripts/bench/compare.sh chain [REPEAT] [-- extra flags for both, e.g. --px 1024]
#
# Environment: FMBOOST (default target/release/fmboost), PYTHON (default /work/venv/bin/python
# if present, else python3), THREADS (default 2), STEPS (bench cfm timed NFE, default 3).
set -euo pipefail
cd "$(dirname "$0")/../.."

what=${1:?usage: compare.sh cfm|chain [REPEAT] [-- flags]}
repeat=${2:-2}
shift $(( $# >= 2 ? 2 : $# ))
[[ ${1:-} == -- ]] && shift
extra=("$@")

fmboost=${FMBOOST:-target/release/fmboost}
python=${PYTHON:-$( [[ -x /work/venv/bin/python ]] && echo /work/venv/bin/python || echo python3 )}
threads=${THREADS:-2}
steps=${STEPS:-3}
[[ -x $fmboost ]] || { echo "compare.sh: $fmboost not found (cargo build --release -p fmboost-cli, or set FMBOOST)" >&2; exit 2; }
[[ $repeat =~ ^[1-9][0-9]*$ ]] || { echo "compare.sh: REPEAT must be a positive integer, got '$repeat'" >&2; exit 2; }

echo "# $(date -u +%FT%TZ) $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) CPUs, threads $threads"
for ((i = 1; i <= repeat; i++)); do
    case $what in
        cfm)
            echo "# loadavg $(cat /proc/loadavg)"
            RAYON_NUM_THREADS=$threads "$fmboost" bench cfm --config paper --latent 128 --steps "$steps" "${extra[@]}"
            echo "# loadavg $(cat /proc/loadavg)"
            "$python" scripts/bench/torch_cfm_bench.py --config paper --latent 128 --threads "$threads" --steps "$steps" "${extra[@]}"
            ;;
        chain)
            echo "# loadavg $(cat /proc/loadavg)"
            RAYON_NUM_THREADS=$threads "$fmboost" bench chain "${extra[@]}"
            echo "# loadavg $(cat /proc/loadavg)"
            "$python" scripts/bench/torch_chain_bench.py --threads "$threads" "${extra[@]}" 2> >(grep -v 'should be kept in float32' >&2)
            ;;
        *)
            echo "compare.sh: unknown benchmark '$what' (cfm or chain)" >&2
            exit 2
            ;;
    esac
done
echo "# loadavg $(cat /proc/loadavg)"
