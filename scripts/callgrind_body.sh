#!/usr/bin/env bash
# What watching a request body for its key's end costs, in instructions under
# `valgrind --tool=callgrind` (deterministic for a given binary): benches/live_body.rs's four cases
# (a scoped key, whose body is watched, and the master key, whose body is not; 1 and 65 frames),
# each run twice with N1 and N2 requests so that the setup cancels.
#
#   scripts/callgrind_body.sh              # about a minute
#   N1=256 N2=1280 scripts/callgrind_body.sh
#
# Prints instructions per request of each case, then per watched frame
# ((scoped 65 - scoped 1) - (master 65 - master 1)) / 64 and per watched request with a body
# (scoped 1 - master 1, which includes the small difference in admitting the two kinds of key).
set -euo pipefail
cd "$(dirname "$0")/.."

N1=${N1:-256}
N2=${N2:-1280}
command -v valgrind >/dev/null || { echo "callgrind_body.sh: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

bin=$(cargo bench --bench live_body --no-run --message-format=json 2>/dev/null \
  | sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' \
  | tail -n1)
[[ -x $bin ]] || { echo "callgrind_body.sh: could not build benches/live_body.rs" >&2; exit 1; }

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

instructions() { # kind frames n -> total instructions of the run
  local file="$out/$1.$2.$3"
  valgrind --tool=callgrind --callgrind-out-file="$file" "$bin" count "$1" "$2" "$3" >/dev/null 2>"$file.log" \
    || { cat "$file.log" >&2; return 1; }
  awk '/^summary:/ { print $2 }' "$file"
}

declare -A per
for kind in scoped master; do
  for frames in 1 65; do
    i1=$(instructions "$kind" "$frames" "$N1")
    i2=$(instructions "$kind" "$frames" "$N2")
    per[$kind.$frames]=$(( (i2 - i1) / (N2 - N1) ))
  done
done

echo "instructions per request, callgrind, N1=$N1 N2=$N2, $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
for kind in scoped master; do
  for frames in 1 65; do
    printf '%-8s %3d frames %10d\n' "$kind" "$frames" "${per[$kind.$frames]}"
  done
done
frame=$(awk -v s1="${per[scoped.1]}" -v s65="${per[scoped.65]}" -v m1="${per[master.1]}" -v m65="${per[master.65]}" \
  'BEGIN { printf "%.1f", ((s65 - s1) - (m65 - m1)) / 64 }')
echo "per watched frame:             $frame instructions"
echo "per watched request with body: $(( per[scoped.1] - per[master.1] )) instructions (scoped 1 - master 1)"
