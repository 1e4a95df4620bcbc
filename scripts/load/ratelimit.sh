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
# Uses from load.sh: root, here, work, server_pid (killed by its cleanup).

rl_rounds=${LOAD_RL_ROUNDS:-6}
rl_seconds=${LOAD_RL_SECONDS:-5}
rl_redis=${REDIS_URL:-redis://127.0.0.1:6379}

fail() {
  echo "FAIL: $*" | tee -a "$work/failures" >&2
}
median() { sort -g | awk '{ v[NR] = $1 } END { printf "%.3f\n", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

(cd "$root" && cargo build --release --features redis --example server)

# rl_server BACKEND: starts the server; sets server_pid, rl_base, rl_master.
rl_server() {
  local port redis_env=()
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  rl_base=http://127.0.0.1:$port
  rl_master=load-master-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  [[ $1 == redis ]] && redis_env=(REDIS_URL="$rl_redis")
  env "${redis_env[@]}" API_KEYS_MASTER_KEY="$rl_master" DATABASE_URL="sqlite://$work/rl-$1.db" \
    BIND="127.0.0.1:$port" RUST_LOG=warn TOKIO_WORKER_THREADS=2 "$server_bin" >"$work/server-rl-$1.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 150); do
    curl -fsS "$rl_base/health" >/dev/null 2>&1 && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.2
  done
  cat "$work/server-rl-$1.log" >&2
  echo "load.sh ratelimit: the server did not start" >&2
  exit 1
}

rl_stop() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}

# rl_key NAME [LIMITS_JSON]: a new key with ledgers:read; prints it.
rl_key() {
  curl -fsS -X POST -H "X-Api-Key: $rl_master" -H 'Content-Type: application/json' \
    -d "{\"name\":\"$1\",\"owner\":\"load\",\"scopes\":[\"ledgers:read\"]${2:+,$2}}" "$rl_base/api-keys" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])'
}

rl_ticks() { awk '{ print $14 + $15 }' "/proc/$server_pid/stat"; }
rl_tick_us=$((1000000 / $(getconf CLK_TCK)))

# rl_run KEY: one wrk run on /ledgers; prints "<req/s> <p50 µs> <server CPU ns per request>".
rl_run() {
  local out ticks
  ticks=$(rl_ticks)
  out=$(wrk -t1 -c32 -d"${rl_seconds}s" --timeout 2s -s "$here/load/stats.lua" \
    -H "X-Api-Key: $1" "$rl_base/ledgers" | grep '^STATS') || { fail "wrk failed"; echo "0 0 0"; return; }
  ticks=$(($(rl_ticks) - ticks))
  field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$out"; }
  [[ $(field errors) == 0 && $(field non2xx) == 0 ]] ||
    fail "$(field errors) socket errors, $(field non2xx) answers outside 2xx"
  awk -v n="$(field requests)" -v us="$(field duration_us)" -v p50="$(field p50_us)" \
    -v cpu=$((ticks * rl_tick_us)) 'BEGIN { printf "%.0f %d %.0f\n", n * 1e6 / us, p50, cpu * 1000 / n }'
}

backends=(memory)
if command -v redis-cli >/dev/null && redis-cli -u "$rl_redis" PING >/dev/null 2>&1; then
  backends+=(redis)
else
  echo "load.sh ratelimit: SKIPPED the Redis backend: $rl_redis does not answer (set REDIS_URL)" >&2
fi

printf '\nrate-limit mode: wrk -t1 -c32 on GET /ledgers, %ss per run, %s rounds\n' "$rl_seconds" "$rl_rounds"
for backend in "${backends[@]}"; do
  rl_server "$backend"
  free=$(rl_key rl-free)
  limited=$(rl_key rl-limited '"rate_limit":{"limit":1000000000,"period_seconds":1}')
  headers=$(curl -fsS -D - -o /dev/null -H "X-Api-Key: $limited" "$rl_base/ledgers")
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
  rl_stop
done

if [[ -s $work/failures ]]; then
  echo "load.sh ratelimit: $(wc -l <"$work/failures") failure(s)" >&2
  exit 1
fi
echo "load.sh ratelimit: every answer 200"
exit 0
