# Flood mode of scripts/load.sh (`scripts/load.sh flood`), sourced by it after the build: what a flood
# of made-up keys does to a legitimate client (README.md, "Threat model: a flood of made-up keys").
#
# For each key format of the example server (keyed tag, the default; public CRC32 checksum, with
# API_KEYS_PUBLIC_CHECKSUM=1), a fresh server (temp SQLite, 2 tokio workers) and LOAD_FLOOD_ROUNDS
# paired rounds: a legitimate client (wrk -t1 -c16, a cached key on /auth/ping) for LOAD_FLOOD_SECONDS
# beside a flood (wrk -t1 -c16, scripts/load/flood.lua, a new key per request) of made-up keys of the
# server's format, and beside a flood of malformed keys, alternating which goes first. The number is
# the median of the per-round ratios legit req/s beside made-up / beside malformed.
# Target for the keyed format: ≥ 0.95. Every flood answer is checked (401 and its reason).
# Uses from load.sh: here, work, fail, median, start_server / stop_server (base, master, server_pid).

flood_rounds=${LOAD_FLOOD_ROUNDS:-4}
flood_seconds=${LOAD_FLOOD_SECONDS:-5}
flood_target=0.95

# flood_round KEY KIND REASON: legit req/s on /auth/ping while flood.lua sends KIND keys.
flood_round() {
  local flood_pid out
  wrk -t1 -c16 -d"$((flood_seconds + 2))s" --timeout 2s -s "$here/load/flood.lua" "$base" -- \
    "$2" sk_live "$3" >"$work/flood-out" 2>&1 &
  flood_pid=$!
  sleep 1
  out=$(wrk -t1 -c16 -d"${flood_seconds}s" --timeout 2s -s "$here/load/stats.lua" \
    -H "X-Api-Key: $1" "$base/auth/ping" | grep '^STATS') || fail "legit wrk failed"
  wait "$flood_pid" || fail "flood wrk failed"
  local flood_line
  flood_line=$(grep '^FLOOD' "$work/flood-out") || { cat "$work/flood-out" >&2; fail "$2 flood: no result"; }
  field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$2"; }
  [[ $(field errors "$out") == 0 && $(field non2xx "$out") == 0 ]] || fail "legit client: errors or non-2xx"
  [[ $(field wrong "$flood_line") == 0 ]] || fail "$2 flood: $(field wrong "$flood_line") answers not 401 $3"
  [[ $(field requests "$flood_line") -gt 0 ]] || fail "$2 flood: no requests"
  awk -v n="$(field requests "$out")" -v us="$(field duration_us "$out")" \
    -v fn="$(field requests "$flood_line")" -v fus="$(field duration_us "$flood_line")" \
    -v shed="$(field shed "$flood_line")" \
    'BEGIN { printf "%.0f %.0f %d\n", n * 1e6 / us, fn * 1e6 / fus, shed }'
}

printf '\nflood mode: legit wrk -t1 -c16 on /auth/ping beside a flood wrk -t1 -c16, %ss per run, %s rounds\n' \
  "$flood_seconds" "$flood_rounds"
for public in 0 1; do
  start_server "flood-$public" API_KEYS_PUBLIC_CHECKSUM="$public"
  key=$(curl -fsS -X POST -H "X-Api-Key: $master" -H 'Content-Type: application/json' \
    -d '{"name":"flood-legit","owner":"load","scopes":["ledgers:read"]}' "$base/api-keys" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])')
  curl -fsS -o /dev/null -H "X-Api-Key: $key" "$base/auth/ping" || fail "the legit key is refused"
  if ((public)); then name="public CRC32"; kind=public; reason=unknown; else name="keyed tag"; kind=keyed; reason=checksum; fi
  printf '\n%s (key length %s)\n' "$name" "${#key}"
  printf '%-6s %20s %12s %8s %22s %14s %8s\n' round "legit beside made-up" "made-up r/s" "503 shed" \
    "legit beside malformed" "malformed r/s" ratio
  : >"$work/flood-ratios"
  for r in $(seq "$flood_rounds"); do
    if ((r % 2)); then order=(made-up malformed); else order=(malformed made-up); fi
    declare -A legit=() flood=() shed=()
    for what in "${order[@]}"; do
      if [[ $what == made-up ]]; then
        read -r "legit[$what]" "flood[$what]" "shed[$what]" < <(flood_round "$key" "$kind" "$reason")
      else
        read -r "legit[$what]" "flood[$what]" "shed[$what]" < <(flood_round "$key" malformed malformed)
      fi
    done
    ratio=$(awk -v a="${legit[made-up]}" -v b="${legit[malformed]}" 'BEGIN { printf "%.3f", b ? a / b : 0 }')
    echo "$ratio" >>"$work/flood-ratios"
    printf '%-6s %20s %12s %8s %22s %14s %7sx\n' "$r" "${legit[made-up]}" "${flood[made-up]}" \
      "${shed[made-up]}" "${legit[malformed]}" "${flood[malformed]}" "$ratio"
  done
  flood_median=$(median <"$work/flood-ratios")
  echo "$name: median legit req/s beside made-up / beside malformed ${flood_median}x"
  if ((public == 0)); then
    awk -v r="$flood_median" -v m=$flood_target 'BEGIN { exit !(r >= m) }' ||
      fail "keyed flood ratio $flood_median < $flood_target"
  fi
  stop_server
done

if [[ -s $work/failures ]]; then
  echo "load.sh flood: $(wc -l <"$work/failures") failure(s)" >&2
  exit 1
fi
echo "load.sh flood: keyed target met (>= $flood_target), every flood answer as expected"
exit 0
