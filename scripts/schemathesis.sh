#!/usr/bin/env bash
# API fuzzing: schemathesis against the example server's OpenAPI document (issue #8).
#
# Builds and starts `examples/server/` on a free 127.0.0.1 port with a throwaway SQLite database
# and a random master key, creates a scoped key through the API, then runs schemathesis twice over
# the whole document (/openapi.json): once with the master key, once with the scoped key. Every
# check schemathesis has runs (see CHECKS below for the one left out and why). Exits non-zero on
# any failure; the server is stopped and the temporary directory removed on every exit.
#
#   scripts/schemathesis.sh                     # ~2-4 minutes on 2 cores once the example is built
#   MAX_EXAMPLES=200 scripts/schemathesis.sh    # longer run
#   SEED=1234 scripts/schemathesis.sh           # replay a run (the seed is printed)
#
# schemathesis comes from PyPI: if `schemathesis` is not on PATH (or $SCHEMATHESIS), it is installed
# into a virtualenv at $SCHEMATHESIS_VENV (default ~/.cache/tower-api-keys/schemathesis-venv).
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION=4.32.5
MAX_EXAMPLES=${MAX_EXAMPLES:-40}
SEED=${SEED:-$RANDOM$RANDOM}
# `positive_data_acceptance` expects 2xx for every schema-valid request. Some schema-valid requests
# are refused by design, and a JSON Schema cannot say so: a master-key create without `owner`
# (APIKEY_OWNER_REQUIRED), an `expires_at` in the past or beyond the demo's 365-day cap, the
# per-owner limit of 10 active keys (409). Every other check runs.
CHECKS=${CHECKS:-all}
EXCLUDE_CHECKS=${EXCLUDE_CHECKS:-positive_data_acceptance}

say() { printf '\n== %s\n' "$*" >&2; }

# --- schemathesis -----------------------------------------------------------------------------
st=${SCHEMATHESIS:-$(command -v schemathesis || true)}
if [[ -z "$st" ]]; then
  venv=${SCHEMATHESIS_VENV:-$HOME/.cache/tower-api-keys/schemathesis-venv}
  if [[ ! -x "$venv/bin/schemathesis" ]]; then
    say "installing schemathesis $SCHEMATHESIS_VERSION into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "schemathesis==$SCHEMATHESIS_VERSION"
  fi
  st=$venv/bin/schemathesis
fi
"$st" --version >&2

# --- the server -------------------------------------------------------------------------------
if [[ -n "${SERVER_BIN:-}" ]]; then
  server_bin=$SERVER_BIN   # an already built example server
else
say "building the example server"
server_bin=$(cargo build --example server --message-format=json-render-diagnostics |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "server" and m.get("executable"):
        print(m["executable"])')
fi
[[ -x "$server_bin" ]] || { echo "could not find the built example server" >&2; exit 1; }

tmp=$(mktemp -d)
server_pid=
cleanup() {
  if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
base=http://127.0.0.1:$port
master=$(head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | head -c 48)

say "starting the server on $base (log: server.log in the report directory)"
report_dir=${REPORT_DIR:-${CARGO_TARGET_DIR:-target}/schemathesis}
mkdir -p "$report_dir"
report_dir=$(cd "$report_dir" && pwd)
# The demo holds an owner to 10 active keys: a run would spend its second half on 409s.
API_KEYS_MAX_ACTIVE_PER_OWNER=100000 API_KEYS_MASTER_KEY=$master DATABASE_URL="sqlite://$tmp/schemathesis.db" BIND=127.0.0.1:$port \
  RUST_LOG=${RUST_LOG:-warn} "$server_bin" >"$report_dir/server.log" 2>&1 &
server_pid=$!

for _ in $(seq 1 100); do
  curl -fsS "$base/health" >/dev/null 2>&1 && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$report_dir/server.log" >&2; exit 1; }
  sleep 0.1
done
curl -fsS "$base/health" >/dev/null

# The scoped key holds `*:*` so that the keys schemathesis asks for (random scopes) can be created
# and then fetched, rotated and revoked; it still acts as a scoped key: its own owner only, no hard
# delete, no expiry past its own. Scope escalation is covered by tests/manage.rs.
say "creating a scoped key with the master key"
created=$(curl -fsS -X POST "$base/api-keys" -H "X-Api-Key: $master" -H 'Content-Type: application/json' \
  -d '{"name": "schemathesis", "owner": "schemathesis", "scopes": ["*:*"]}')
scoped=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["key"])' <<<"$created")
scoped_id=$(python3 -c 'import json, sys; print(json.load(sys.stdin)["api_key_id"])' <<<"$created")
[[ -n "$scoped" && -n "$scoped_id" ]]
# schemathesis reuses the ids it has seen: left alone, a run finds its own key in a listing and
# revokes or rotates it, and every later request is a 401; and ids it makes up are 404s. So each run
# addresses /api-keys/{id} at keys made for it: one to fetch and change, one to rotate, one to
# revoke (or delete). The scoped run's are its own children: a scoped key acts inside its subtree.
new_key() { # creator's key, request body
  curl -fsS -X POST "$base/api-keys" -H "X-Api-Key: $1" -H 'Content-Type: application/json' -d "$2" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["api_key_id"])'
}
targets() { # creator's key, owner field ('' or '"owner": "...", ')
  local target rotated revoked
  target=$(new_key "$1" "{$2\"name\": \"schemathesis target\", \"scopes\": [\"ledgers:read\"]}")
  rotated=$(new_key "$1" "{$2\"name\": \"schemathesis rotated\", \"scopes\": [\"ledgers:read\"]}")
  revoked=$(new_key "$1" "{$2\"name\": \"schemathesis revoked\", \"scopes\": [\"ledgers:read\"]}")
  cat <<TOML
[[operations]]
include-path-regex = '^/api-keys/\\{id\\}'
exclude-name = ["POST /api-keys/{id}/rotate", "DELETE /api-keys/{id}"]
parameters = { "path.id" = "$target" }

[[operations]]
include-name = "POST /api-keys/{id}/rotate"
parameters = { "path.id" = "$rotated" }

[[operations]]
include-name = "DELETE /api-keys/{id}"
parameters = { "path.id" = "$revoked" }
TOML
}
# schemathesis keeps a cache (failures to replay first next time) in ./.schemathesis unless told:
# keep it under the report directory (target/ is ignored by git).
cat >"$tmp/common.toml" <<TOML
[cache]
directory = "$report_dir/cache"
TOML
# With the master key the collection routes need an owner (400 APIKEY_OWNER_REQUIRED otherwise), a
# rule of the caller that no schema can state: the master run names one; the scoped run fuzzes the
# parameter.
{
  cat "$tmp/common.toml"
  targets "$master" '"owner": "schemathesis", '
  cat <<TOML

[[operations]]
include-name = ["GET /api-keys", "GET /api-keys/events", "GET /api-keys/events/verify", "GET /api-keys/usage", "GET /api-keys/policy", "GET /api-keys/pools"]
parameters = { "query.owner" = "schemathesis" }
TOML
} >"$tmp/master.toml"
# The bodies too: with the master key a create (and a pool) must name its owner. The master run
# adds one where the generated body leaves it out (a body without an owner stays schema-valid, and
# the scoped run sends those); every other field is as schemathesis generated it.
cat >"$tmp/master_hooks.py" <<'PY'
import schemathesis

@schemathesis.hook
def map_body(context, body):
    operation = context.operation
    if (operation is not None and operation.label in ("POST /api-keys", "PUT /api-keys/pools")
            and isinstance(body, dict) and "owner" not in body):
        return {**body, "owner": "schemathesis"}
    return body
PY
# Operations only the master key may call answer a scoped key 403 whatever it sends: the master run
# covers them.
{
  cat "$tmp/common.toml"
  targets "$scoped" ''
  cat <<TOML

[[operations]]
include-name = ["GET /api-keys/owners", "PUT /api-keys/pools"]
enabled = false
TOML
} >"$tmp/scoped.toml"

# --- the runs ---------------------------------------------------------------------------------
status=0
# The header name is lowercase on purpose: schemathesis matches it against the security scheme's
# (`x-api-key`) case-sensitively, and only a matching header is removed for its `ignored_auth` check.
run() { # label key config-file [hooks-file]
  say "schemathesis as $1 (max $MAX_EXAMPLES examples per operation, seed $SEED)"
  SCHEMATHESIS_HOOKS=${4:-} "$st" --config-file "$3" run "$base/openapi.json" \
    --checks "$CHECKS" --exclude-checks "$EXCLUDE_CHECKS" \
    --header "x-api-key: $2" \
    --max-examples "$MAX_EXAMPLES" --seed "$SEED" \
    --workers 1 --request-timeout 10 \
    --report junit --report-junit-path "$report_dir/$1.junit.xml" \
    --output-sanitize true \
    || status=1
}
# The scoped run goes first: the master run may revoke, rotate or delete any key it finds listed,
# the scoped key included.
run scoped "$scoped" "$tmp/scoped.toml"
# A run that revoked or rotated its own key would have spent the rest of its requests on 401s.
if ! curl -fsS -o /dev/null "$base/api-keys/$scoped_id" -H "x-api-key: $scoped"; then
  echo "the scoped key no longer works after its run (revoked or rotated by schemathesis?)" >&2
  status=1
fi
run master "$master" "$tmp/master.toml" "$tmp/master_hooks.py"
if ! kill -0 "$server_pid" 2>/dev/null; then
  echo "the server died during the run" >&2
  status=1
fi
if grep -qiE 'panicked|ERROR' "$report_dir/server.log"; then
  say "the server logged errors:"
  grep -iE 'panicked|ERROR' "$report_dir/server.log" | head -20 >&2
  status=1
fi
if [[ $status -eq 0 ]]; then say "schemathesis: no failures"; else say "schemathesis: FAILURES (see above)"; fi
exit $status
