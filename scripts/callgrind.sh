#!/usr/bin/env bash
# Instructions per request under `valgrind --tool=callgrind` (deterministic for a given binary, so it
# decides what wall-clock rounds on a shared machine cannot), through axum `Router`s as users wire
# them (benches/instructions.rs has the cases). Each case runs twice, N1 and N2 requests after the
# same setup and warm-up; (I(N2) - I(N1)) / (N2 - N1) is the cost of one request, setup cancelled.
#
#   scripts/callgrind.sh                 # every case, then the ratios (about 2 minutes)
#   scripts/callgrind.sh layer bare      # only these cases (ratios need bare and static-token)
#   N1=512 N2=2560 scripts/callgrind.sh  # other request counts (keep N2 - N1 a multiple of 256)
#   TOP=layer+scoped scripts/callgrind.sh  # also the 25 costliest functions of that case (self cost)
#
# Prints per case: instructions per request, what it adds over `bare`, and that ÷ what tower-http's
# static-token check adds; then the crate's ratio without SHA-256 (valgrind's CPU has no SHA
# extensions, so the digest runs in its portable form: a few thousand instructions a real CPU
# with SHA-NI spends far fewer cycles on).
set -euo pipefail
cd "$(dirname "$0")/.."

N1=${N1:-512}
N2=${N2:-2560}
command -v valgrind >/dev/null || { echo "callgrind.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

bin=$(cargo bench --bench instructions --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' \
  | tail -n1)
[[ -x $bin ]] || { echo "callgrind.sh: could not build benches/instructions.rs" >&2; exit 1; }

if (($#)); then cases=("$@"); else mapfile -t cases < <("$bin" list); cases+=(sha256); fi
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

instructions() { # case n -> total instructions of the run
  valgrind --tool=callgrind --toggle-collect='*measured_requests*' --toggle-collect='*measured_digests*' \
    --callgrind-out-file="$out/$1.$2" "$bin" "$1" "$2" >/dev/null 2>"$out/$1.$2.log" \
    || { cat "$out/$1.$2.log" >&2; return 1; }
  awk '/^summary:/ { print $2 }' "$out/$1.$2"
}

declare -A per
for c in "${cases[@]}"; do
  i1=$(instructions "$c" "$N1")
  i2=$(instructions "$c" "$N2")
  per[$c]=$(( (i2 - i1) / (N2 - N1) ))
  printf '%-22s %8d instructions per request\n' "$c" "${per[$c]}" >&2
done

echo
echo "instructions per request, callgrind, N1=$N1 N2=$N2, $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
printf '%-22s %10s %10s %16s\n' case instr "over bare" "÷ static token"
bare=${per[bare]:-}
token=${per[static-token]:-}
for c in "${cases[@]}"; do
  [[ $c == sha256 ]] && continue
  if [[ -n $bare && -n $token && $c != bare ]]; then
    over=$(( per[$c] - bare ))
    printf '%-22s %10d %10d %15s×\n' "$c" "${per[$c]}" "$over" "$(awk -v o="$over" -v t="$((token - bare))" 'BEGIN { printf "%.2f", o / t }')"
  else
    printf '%-22s %10d\n' "$c" "${per[$c]}"
  fi
done
if [[ -n ${per[sha256]:-} && -n $bare && -n $token ]]; then
  sha=${per[sha256]}
  echo
  echo "SHA-256 of one key: $sha instructions (portable; valgrind's CPU has no SHA extensions). Without it:"
  for c in "${cases[@]}"; do
    [[ $c == layer* || $c == moka-by-hand ]] || continue
    over=$(( per[$c] - bare - sha ))
    printf '%-22s %10d %15s×\n' "$c" "$over" "$(awk -v o="$over" -v t="$((token - bare))" 'BEGIN { printf "%.2f", o / t }')"
  done
fi

if [[ -n ${TOP:-} ]]; then
  echo
  echo "costliest functions of $TOP ($N2 requests, self cost, whole run):"
  callgrind_annotate --threshold=100 "$out/$TOP.$N2" 2>/dev/null | sed -n '/^Ir/,$p' | head -n 28
fi
