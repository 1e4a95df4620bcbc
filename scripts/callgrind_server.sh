#!/usr/bin/env bash
# The example server's own instructions per request under `valgrind --tool=callgrind`: `GET /ping`
# (no key) against `GET /auth/ping` (the same handler behind the key layer, its scope guard and the
# limiter), as `scripts/load.sh plain` times them with wrk, but counted (user space, deterministic up
# to the server's background timers) instead of timed on a shared machine.
#
#   scripts/callgrind_server.sh          # N requests per route per phase (N=2000), two phases each
#   N=4000 scripts/callgrind_server.sh
#   KEEP=/tmp/cg scripts/callgrind_server.sh   # keep each phase's callgrind file there (callgrind_annotate)
#
# The server runs under callgrind with 2 tokio workers, a temp SQLite database and RUST_LOG=warn; a
# Python client sends N keep-alive requests one after another on one connection. Before each phase
# the counters are zeroed (`callgrind_control --zero`), after it they are dumped; a phase's total
# divided by N is one request, with the server's HTTP/1 parsing, axum's routing and every layer.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-2000}
for tool in valgrind callgrind_control curl python3; do
  command -v "$tool" >/dev/null || { echo "callgrind_server.sh: $tool not found" >&2; exit 2; }
done

cargo build --release --example server >&2
target_dir=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
server_bin=$target_dir/release/examples/server

work=$(mktemp -d)
server_pid=
cleanup() {
  [[ -n $server_pid ]] && { kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; }
  rm -rf "$work"
}
trap cleanup EXIT

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
master=cg-master-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
API_KEYS_MASTER_KEY=$master DATABASE_URL="sqlite://$work/cg.db" BIND="127.0.0.1:$port" RUST_LOG=warn \
  TOKIO_WORKER_THREADS=2 valgrind --tool=callgrind --callgrind-out-file="$work/cg.out" \
  "$server_bin" >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 600); do
  curl -fsS "$base/health" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$work/server.log" >&2; exit 1; }
  sleep 0.2
done

expires=$(date -u -d '+30 days' +%Y-%m-%dT%H:%M:%SZ)
key=$(curl -fsS -X POST -H "X-Api-Key: $master" -H 'Content-Type: application/json' \
  -d "{\"name\":\"cg\",\"owner\":\"cg\",\"scopes\":[\"ledgers:read\"],\"expires_at\":\"$expires\"}" \
  "$base/api-keys" | python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])')

# send PATH COUNT: COUNT keep-alive GETs with the key, each checked for 200.
send() {
  python3 - "$port" "$1" "$2" "$key" <<'EOF'
import http.client, sys
port, path, count, key = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4]
conn = http.client.HTTPConnection("127.0.0.1", port)
for _ in range(count):
    conn.request("GET", path, headers={"X-Api-Key": key})
    response = conn.getresponse()
    response.read()
    if response.status != 200:
        sys.exit(f"{path}: {response.status}")
EOF
}

send /ping 200
send /auth/ping 200
declare -A total=()
phase=0
for round in 1 2; do
  for path in /ping /auth/ping; do
    phase=$((phase + 1))
    callgrind_control --zero "$server_pid" >/dev/null
    send "$path" "$N"
    callgrind_control --dump="phase$phase" "$server_pid" >/dev/null
    file=$(ls -t "$work"/cg.out.* | head -1)
    instr=$(awk '/^summary:|^totals:/ { print $2; exit }' "$file")
    per=$((instr / N))
    printf '%-11s round %d: %8d instructions per request\n' "$path" "$round" "$per" >&2
    total[$path]=$(( ${total[$path]:-0} + per ))
    [[ -n ${KEEP:-} ]] && mkdir -p "$KEEP" && cp "$file" "$KEEP/round$round${path//\//_}.out"
  done
done
ping=$((total[/ping] / 2))
auth=$((total[/auth/ping] / 2))
echo
echo "example server, instructions per request (callgrind, N=$N, mean of 2 phases), $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty')"
printf '%-12s %10d\n' /ping "$ping" /auth/ping "$auth"
printf '%-12s %10d  (%s× /ping)\n' added $((auth - ping)) "$(awk -v a="$auth" -v p="$ping" 'BEGIN { printf "%.3f", a / p }')"
