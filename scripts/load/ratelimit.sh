# Rate-limit mode of scripts/load.sh (`scripts/load.sh ratelimit`), sourced by it after the build: what
# a per-key rate limit adds to a request end to end (BENCHMARKS.md, "Rate limits").
#
# The example server (temp SQLite, 2 tokio workers) applies its limiter to /ledgers. Two keys with the
# same scopes: one without limits (the limiter costs it one branch) and one with a rate limit it never
# reaches (10^9 per second). LOAD_RL_ROUNDS paired rounds of wrk -t1 -c32 --latency on GET /ledgers,
# one run per key, alternating which goes first; per round the ratio of req/s (limited / unlimited)
# and the server's CPU time per request of each (from /proc, so the client's cost is not in it).
# Printed: median req/s ratio, median added CPU per request (ns) and added p50 latency (µs).
#
# Backends: in memory, and Redis (REDIS_URL, default redis://127.0.0.1:6379, the server built with
# `--features redis`) when redis-cli can PING it; with Redis, a bare round trip (redis-benchmark -c 1
# GET, p50) is measured in the same run for comparison. Every answer must be 200 (a 429 would mean
# the limit was reached and the comparison is void).
# Uses from load.sh: root, here, work, fail, median, start_server / stop_server (base, master,
# server_pid).

rl_rounds=${LOAD_RL_ROUNDS:-6}
rl_seconds=${LOAD_RL_SECONDS:-5}
rl_redis=${REDIS_URL:-redis://127.0.0.1:6379}

(cd "$root" && cargo build --release --features redis --example server)

# rl_key NAME [LIMITS_JSON]: a new key with ledgers:read; prints it.
rl_key() {
  curl -fsS -X POST -H "X-Api-Key: $master" -H 'Content-Type: application/json' \
    -d "{\"name\":\"$1\",\"owner\":\"load\",\"scopes\":[\"ledgers:read\"]${2:+,$2}}" "$base/api-keys" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])'
}

# rl_run KEY: one wrk run on /ledgers; prints "<req/s> <p50 µs> <server CPU ns per request>".
rl_run() {
  local out ticks
  ticks=$(server_ticks)
  out=$(wrk -t1 -c32 -d"${rl_seconds}s" --timeout 2s -s "$here/load/stats.lua" \
    -H "X-Api-Key: $1" "$base/ledgers" | grep '^STATS') || { fail "wrk failed"; echo "0 0 0"; return; }
  ticks=$(($(server_ticks) - ticks))
  field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$out"; }
  [[ $(field errors) == 0 && $(field non2xx) == 0 ]] ||
    fail "$(field errors) socket errors, $(field non2xx) answers outside 2xx"
  awk -v n="$(field requests)" -v us="$(field duration_us)" -v p50="$(field p50_us)" \
    -v cpu=$((ticks * tick_us)) 'BEGIN { printf "%.0f %d %.0f\n", n * 1e6 / us, p50, cpu * 1000 / n }'
}

backends=(memory)
if command -v redis-cli >/dev/null && redis-cli -u "$rl_redis" PING >/dev/null 2>&1; then
  backends+=(redis)
else
  echo "load.sh ratelimit: SKIPPED the Redis backend: $rl_redis does not answer (set REDIS_URL)" >&2
fi

printf '\nrate-limit mode: wrk -t1 -c32 on GET /ledgers, %ss per run, %s rounds\n' "$rl_seconds" "$rl_rounds"
for backend in "${backends[@]}"; do
  redis_env=()
  [[ $backend == redis ]] && redis_env=(REDIS_URL="$rl_redis")
  start_server "rl-$backend" "${redis_env[@]}"
  free=$(rl_key rl-free)
  limited=$(rl_key rl-limited '"rate_limit":{"limit":1000000000,"period_seconds":1}')
  headers=$(curl -fsS -D - -o /dev/null -H "X-Api-Key: $limited" "$base/ledgers")
  grep -qi '^ratelimit:' <<<"$headers" || fail "$backend: the limited key's answer has no RateLimit header"
  printf '\n%s backend\n' "$backend"
  printf '%-6s %12s %12s %10s %10s %12s %12s %8s\n' round "free r/s" "limited r/s" "free p50" \
    "lim. p50" "free CPU/req" "lim. CPU/req" ratio
  : >"$work/rl-ratios"
  : >"$work/rl-cpu"
  : >"$work/rl-p50"
  for r in $(seq "$rl_rounds"); do
    if ((r % 2)); then order=(free limited); else order=(limited free); fi
    declare -A rps=() p50=() cpu=()
    for which in "${order[@]}"; do
      key=$free
      [[ $which == limited ]] && key=$limited
      read -r "rps[$which]" "p50[$which]" "cpu[$which]" < <(rl_run "$key")
    done
    ratio=$(awk -v a="${rps[limited]}" -v b="${rps[free]}" 'BEGIN { printf "%.3f", b ? a / b : 0 }')
    echo "$ratio" >>"$work/rl-ratios"
    echo $((cpu[limited] - cpu[free])) >>"$work/rl-cpu"
    echo $((p50[limited] - p50[free])) >>"$work/rl-p50"
    printf '%-6s %12s %12s %8sus %8sus %10sns %10sns %7sx\n' "$r" "${rps[free]}" "${rps[limited]}" \
      "${p50[free]}" "${p50[limited]}" "${cpu[free]}" "${cpu[limited]}" "$ratio"
  done
  summary="$backend: median req/s limited/free $(median <"$work/rl-ratios")x; added server CPU per request \
$(median <"$work/rl-cpu") ns; added p50 latency $(median <"$work/rl-p50") us"
  if [[ $backend == redis ]]; then
    rtt=$(redis-benchmark -u "$rl_redis" -c 1 -n 20000 -q GET rl-load-bare 2>/dev/null | tr '\r' '\n' |
      grep -o 'p50=[0-9.]*' | tail -1 | cut -d= -f2)
    summary+="; bare Redis round trip (redis-benchmark -c 1 GET, p50) ${rtt} ms"
  fi
  echo "$summary"
  stop_server
done

if [[ -s $work/failures ]]; then
  echo "load.sh ratelimit: $(wc -l <"$work/failures") failure(s)" >&2
  exit 1
fi
echo "load.sh ratelimit: every answer 200"
exit 0
