#!/usr/bin/env bash
# End-to-end load test of examples/server.rs with wrk, on 127.0.0.1 only (BENCHMARKS.md, "End-to-end load").
#
# 1. Paired rounds: GET /ping (no key) against GET /auth/ping (the same handler behind ApiKeyLayer +
#    RequireScopes, with a cached key; both requests carry the same header), alternating which goes
#    first. Target: median of the per-round ratios auth/no-auth ≥ 0.90 for req/s, and p99 latency
#    auth/no-auth ≤ 1/0.90.
# 2. Mixed run: valid, revoked, unknown (deleted) but well-formed, malformed, bad-checksum and
#    wrong-scope keys across /auth/ping, /ledgers and /balances at once, one wrk process per category
#    (scripts/load/check.lua), every answer checked against its category's status, code and reason.
#
# 3. `scripts/load.sh plain` runs only the paired rounds, the plain way: wrk with no Lua script
#    (`wrk -t1 -c32 --latency`, its own summary parsed), request logs off. This is the figure to
#    compare with other middleware: a Lua script slows the client for both routes alike and so
#    flatters the ratio. Target: median req/s ratio auth/no-auth ≥ 0.95.
#
# 4. `scripts/load.sh flood` runs the flood mode instead (scripts/load/flood.sh): a legitimate client's
#    req/s beside a flood of made-up keys / beside a flood of malformed keys, keyed and public formats.
#    Target for the keyed format ≥ 0.95. LOAD_FLOOD_ROUNDS (4), LOAD_FLOOD_SECONDS (5).
#
# 5. `scripts/load.sh ratelimit` runs the rate-limit mode instead (scripts/load/ratelimit.sh): GET
#    /ledgers with a key without limits against a key with a rate limit it never reaches, paired
#    rounds, in memory and on Redis; prints the req/s ratio and the server CPU and p50 latency added.
#    LOAD_RL_ROUNDS (6), LOAD_RL_SECONDS (5), REDIS_URL.
#
# Exits non-zero on a missed target, a wrong decision or a socket error; the server is killed on exit.
# Environment: LOAD_ROUNDS (8), LOAD_SECONDS per run (5), LOAD_CONNECTIONS (32), LOAD_MIXED_SECONDS (8),
# CARGO_TARGET_DIR. Needs wrk (`apt-get install -y wrk`), curl and python3.
set -euo pipefail

rounds=${LOAD_ROUNDS:-8}
seconds=${LOAD_SECONDS:-5}
connections=${LOAD_CONNECTIONS:-32}
mixed_seconds=${LOAD_MIXED_SECONDS:-8}
mode=${1:-full}
min_ratio=0.90
[[ $mode == plain ]] && min_ratio=0.95

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
for tool in wrk curl python3; do
  command -v "$tool" >/dev/null || { echo "load.sh: $tool not found (wrk: apt-get install -y wrk)" >&2; exit 2; }
done

(cd "$root" && cargo build --release --example server)
target_dir=$(cd "$root" && cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
server_bin=$target_dir/release/examples/server

work=$(mktemp -d)
server_pid=
cleanup() {
  if [[ -n $server_pid ]]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Helpers every mode uses. Failures are lines in a file: `fail` also runs in subshells.
fail() {
  echo "FAIL: $*" | tee -a "$work/failures" >&2
}
median() { sort -g | awk '{ v[NR] = $1 } END { printf "%.3f\n", NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# start_server NAME [VAR=VALUE...]: the example server on a free port with a fresh SQLite file
# ($work/NAME.db, log $work/NAME.log), 2 tokio workers and no per-request log lines (TraceLayer would
# write one for every route alike), plus the given environment; sets server_pid, base and master.
start_server() {
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  base=http://127.0.0.1:$port
  master=load-master-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
  env "${@:2}" API_KEYS_MASTER_KEY="$master" DATABASE_URL="sqlite://$work/$1.db" BIND="127.0.0.1:$port" \
    RUST_LOG=warn TOKIO_WORKER_THREADS=2 "$server_bin" >"$work/$1.log" 2>&1 &
  server_pid=$!
  for _ in $(seq 150); do
    curl -fsS "$base/health" >/dev/null 2>&1 && return 0
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.2
  done
  cat "$work/$1.log" >&2
  echo "load.sh: the server did not start" >&2
  exit 1
}

# CPU time the server has used, in clock ticks (utime + stime; the name "server" has no space).
server_ticks() { awk '{ print $14 + $15 }' "/proc/$server_pid/stat"; }
tick_us=$((1000000 / $(getconf CLK_TCK)))

stop_server() {
  kill "$server_pid" 2>/dev/null || true
  wait "$server_pid" 2>/dev/null || true
  server_pid=
}

# ---- flood mode (`scripts/load.sh flood`): made-up keys beside a legitimate client --------------------
if [[ ${1:-} == flood ]]; then
  # shellcheck source=load/flood.sh
  source "$here/load/flood.sh"
fi
if [[ ${1:-} == ratelimit ]]; then
  # shellcheck source=load/ratelimit.sh
  source "$here/load/ratelimit.sh"
fi

start_server load

# api METHOD PATH [BODY]: a call with the master key; prints the body, fails on an error status.
api() {
  curl -fsS -X "$1" -H "X-Api-Key: $master" -H 'Content-Type: application/json' ${3:+-d "$3"} "$base$2"
}
expires=$(date -u -d '+30 days' +%Y-%m-%dT%H:%M:%SZ)
# create NAME SCOPE...: prints "<id> <key>".
create() {
  local scopes
  scopes=$(printf '"%s",' "${@:2}")
  api POST /api-keys "{\"name\":\"$1\",\"owner\":\"load\",\"scopes\":[${scopes%,}],\"expires_at\":\"$expires\"}" |
    python3 -c 'import json, sys; d = json.load(sys.stdin); print(d["api_key_id"], d["key"])'
}
# decision KEY PATH: "<status> <code> <reason>" of one GET, as check.lua reads them ("-" = none).
decision() {
  local status
  status=$(curl -sS -o "$work/body" -w '%{http_code}' -H "X-Api-Key: $1" "$base$2")
  echo "$status" \
    "$(grep -o '"code" *: *"[A-Za-z0-9_]*"' "$work/body" | head -1 | sed 's/.*"\([^"]*\)"$/\1/' | grep . || echo -)" \
    "$(grep -o '"reason" *: *"[A-Za-z0-9_]*"' "$work/body" | head -1 | sed 's/.*"\([^"]*\)"$/\1/' | grep . || echo -)"
}

read -r _ valid < <(create load-valid ledgers:read balances:read)
read -r _ wrong_scope < <(create load-wrong-scope transactions:read)
read -r revoked_id revoked < <(create load-revoked ledgers:read balances:read)
unknown=()
for i in 1 2 3; do
  read -r id key < <(create "load-deleted-$i" ledgers:read)
  # The first one is cached before it is deleted: deleting must reach the cache.
  [[ $i == 1 ]] && decision "$key" /auth/ping >/dev/null
  api DELETE "/api-keys/$id?permanent=true" >/dev/null
  unknown+=("$key")
done
decision "$revoked" /auth/ping >/dev/null # cached, then revoked
api DELETE "/api-keys/$revoked_id" >/dev/null
last=${valid: -1}
bad_checksum=${valid%?}$([[ $last == 0 ]] && echo 1 || echo 0)
malformed=("${valid/sk_live_/sk_test_}" "${valid%???}" "${valid}x" "sk_live_$(printf '!%.0s' {1..49})" not-a-key)

printf '\nmachine: %s x %s; load average %s; %s\n' "$(nproc)" \
  "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)" "$(cut -d' ' -f1-3 /proc/loadavg)" "$(wrk -v 2>&1 | head -1)"

# ---- 1. paired rounds ----------------------------------------------------------------------------
# run PATH SECONDS: one wrk run with the valid key; prints "<req/s> <p99 µs> <server CPU µs per request>".
run() {
  local out ticks
  ticks=$(server_ticks)
  out=$(wrk -t1 -c"$connections" -d"$2s" --timeout 2s -s "$here/load/stats.lua" \
    -H "X-Api-Key: $valid" "$base$1" | grep '^STATS') || { fail "wrk on $1 failed"; echo "0 0 0"; return; }
  ticks=$(($(server_ticks) - ticks))
  local field
  field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$out"; }
  if [[ $(field errors) != 0 || $(field non2xx) != 0 ]]; then
    fail "$1: $(field errors) socket errors, $(field non2xx) answers outside 2xx"
  fi
  awk -v n="$(field requests)" -v us="$(field duration_us)" -v p99="$(field p99_us)" -v cpu=$((ticks * tick_us)) \
    'BEGIN { printf "%.0f %d %.1f\n", n * 1e6 / us, p99, cpu / n }'
}
# plain_run PATH SECONDS: as `run`, from wrk's own summary (no Lua script on the client).
plain_run() {
  local out ticks
  ticks=$(server_ticks)
  out=$(wrk -t1 -c"$connections" -d"$2s" --timeout 2s --latency -H "X-Api-Key: $valid" "$base$1") ||
    { fail "wrk on $1 failed"; echo "0 0 0"; return; }
  ticks=$(($(server_ticks) - ticks))
  if grep -qE '^ *(Socket errors|Non-2xx)' <<<"$out"; then
    fail "$1: $(grep -E '^ *(Socket errors|Non-2xx)' <<<"$out" | tr -s ' ' | tr '\n' ';')"
  fi
  awk -v cpu=$((ticks * tick_us)) '
    /^ *99%/ { v = $2; u = v; sub(/[0-9.]+/, "", u); sub(/[a-z]+$/, "", v)
               p99 = v * (u == "s" ? 1e6 : u == "ms" ? 1e3 : 1) }
    / requests in / { n = $1 }
    /^Requests\/sec:/ { rps = $2 }
    END { printf "%.0f %d %.1f\n", rps, p99, n ? cpu / n : 0 }' <<<"$out"
}
[[ $mode == plain ]] && run() { plain_run "$@"; }

for path in /ping /auth/ping; do
  [[ $(decision "$valid" $path) == "200 - -" ]] || fail "$path does not answer 200 to the valid key"
  run $path 2 >/dev/null # warm-up
done
printf '\npaired rounds (%s): wrk -t1 -c%s, %ss per run, server with 2 tokio workers (2 shared cores)\n' \
  "$([[ $mode == plain ]] && echo "plain wrk, no Lua script" || echo "wrk with scripts/load/stats.lua")" "$connections" "$seconds"
printf '%-6s %12s %12s %7s %12s %12s %7s %9s %9s %7s\n' round "no-auth r/s" "auth r/s" ratio \
  "no-auth p99" "auth p99" ratio "no-auth" auth ratio
printf '%74s %s\n' "" "server CPU µs/request"
: >"$work/rps" && : >"$work/p99" && : >"$work/cpu"
for r in $(seq "$rounds"); do
  if ((r % 2)); then order=(/ping /auth/ping); else order=(/auth/ping /ping); fi
  declare -A rps=() p99=() cpu=()
  for path in "${order[@]}"; do
    read -r "rps[$path]" "p99[$path]" "cpu[$path]" < <(run "$path" "$seconds")
  done
  rps_ratio=$(awk -v a="${rps[/auth/ping]}" -v b="${rps[/ping]}" 'BEGIN { printf "%.3f", b ? a / b : 0 }')
  p99_ratio=$(awk -v a="${p99[/auth/ping]}" -v b="${p99[/ping]}" 'BEGIN { printf "%.3f", b ? a / b : 0 }')
  cpu_ratio=$(awk -v a="${cpu[/auth/ping]}" -v b="${cpu[/ping]}" 'BEGIN { printf "%.3f", b ? a / b : 0 }')
  echo "$rps_ratio" >>"$work/rps" && echo "$p99_ratio" >>"$work/p99" && echo "$cpu_ratio" >>"$work/cpu"
  printf '%-6s %12s %12s %6sx %10sus %10sus %6sx %9s %9s %6sx\n' "$r" "${rps[/ping]}" "${rps[/auth/ping]}" "$rps_ratio" \
    "${p99[/ping]}" "${p99[/auth/ping]}" "$p99_ratio" "${cpu[/ping]}" "${cpu[/auth/ping]}" "$cpu_ratio"
done
rps_median=$(median <"$work/rps")
p99_median=$(median <"$work/p99")
cpu_median=$(median <"$work/cpu")
printf 'median req/s auth/no-auth %sx (target >= %s); median p99 auth/no-auth %sx (target <= %.2f)\n' \
  "$rps_median" "$min_ratio" "$p99_median" "$(awk -v m=$min_ratio 'BEGIN { print 1 / m }')"
echo "median server CPU per request auth/no-auth ${cpu_median}x (diagnostic: what the server itself spends)"
awk -v r="$rps_median" -v m=$min_ratio 'BEGIN { exit !(r >= m) }' || fail "req/s ratio $rps_median < $min_ratio"
awk -v r="$p99_median" -v m=$min_ratio 'BEGIN { exit !(r * m <= 1) }' || fail "p99 ratio $p99_median > 1/$min_ratio"

if [[ $mode == plain ]]; then
  [[ -s $work/failures ]] && { echo "load.sh plain: $(wc -l <"$work/failures") failure(s)" >&2; exit 1; }
  echo "load.sh plain: target met"
  exit 0
fi

# ---- 2. mixed run ---------------------------------------------------------------------------------
routes=(/auth/ping /ledgers /balances)
# pairs KEY...: "<path> <key>" for every route and key.
pairs() {
  local key path
  for key in "$@"; do for path in "${routes[@]}"; do printf '%s %s ' "$path" "$key"; done; done
}
# category NAME STATUS CODE REASON KEY...
categories=(
  "valid 200 - - $valid"
  "revoked 401 AUTH_EXPIRED_API_KEY revoked $revoked"
  "unknown 401 AUTH_INVALID_API_KEY unknown ${unknown[*]}"
  "malformed 401 AUTH_INVALID_API_KEY malformed ${malformed[*]}"
  "bad-checksum 401 AUTH_INVALID_API_KEY checksum $bad_checksum"
  "wrong-scope 403 AUTH_INSUFFICIENT_PERMISSIONS - $wrong_scope"
)
# Each category's expectation, checked once with curl on every route and key before the load.
for line in "${categories[@]}"; do
  read -r name status code reason keys <<<"$line"
  for key in $keys; do
    for path in "${routes[@]}"; do
      got=$(decision "$key" "$path")
      [[ $got == "$status $code $reason" ]] || fail "$name on $path: expected '$status $code $reason', got '$got'"
    done
  done
done
mixed_pids=()
for line in "${categories[@]}"; do
  read -r name status code reason keys <<<"$line"
  # shellcheck disable=SC2046,SC2086 # word splitting wanted: one argument per path and key
  wrk -t1 -c4 -d"${mixed_seconds}s" --timeout 2s -s "$here/load/check.lua" "$base" -- \
    "$name" "$status" "$code" "$reason" $(pairs $keys) >"$work/mixed-$name" 2>&1 &
  mixed_pids+=($!)
done
for pid in "${mixed_pids[@]}"; do wait "$pid" || fail "a wrk process of the mixed run failed"; done

printf '\nmixed run: %s categories at once, wrk -t1 -c4 each, %ss; answers by status, code, reason\n' \
  "${#categories[@]}" "$mixed_seconds"
printf '%-13s %-48s %9s %7s  %s\n' category expected requests wrong answers
total=0
for line in "${categories[@]}"; do
  read -r name status code reason _ <<<"$line"
  result=$(grep "^RESULT $name " "$work/mixed-$name") || { cat "$work/mixed-$name" >&2; fail "$name: no result"; continue; }
  field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$result"; }
  answers=$(grep "^COUNT $name " "$work/mixed-$name" | cut -d' ' -f3- | awk '{ printf "%s%s %s %s: %s", sep, $1, $2, $3, $4; sep = "; " }')
  printf '%-13s %-48s %9s %7s  %s\n' "$name" "$status $code $reason" "$(field requests)" "$(field wrong)" "$answers"
  total=$((total + $(field requests)))
  [[ $(field requests) -gt 0 ]] || fail "$name: no requests completed"
  [[ $(field counted) == "$(field requests)" ]] || fail "$name: $(field counted) answers checked of $(field requests)"
  [[ $(field wrong) == 0 ]] || fail "$name: $(field wrong) wrong decisions"
  [[ $(field errors) == 0 ]] || fail "$name: $(field errors) socket errors"
done
echo "mixed total: $total requests"
kill -0 "$server_pid" 2>/dev/null || fail "the server died"

if [[ -s $work/failures ]]; then
  echo "load.sh: $(wc -l <"$work/failures") failure(s)" >&2
  exit 1
fi
echo "load.sh: all targets met, no wrong decision"
