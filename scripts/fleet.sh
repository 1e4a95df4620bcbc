#!/usr/bin/env bash
# Revocation with a receipt (issue #22; BENCHMARKS.md, "Revocation with a receipt"): three example
# servers (child processes) on one PostgreSQL, under load, 200 revocations each acknowledged by the
# fleet and then probed on every server at once; then the faults (Redis stopped, a silent cut of one
# server, one server paused with SIGSTOP for 2 s, PostgreSQL restarted through a proxy). Prints the
# figures the tests measure: time to full acknowledgement (p50/p99/max), how long DELETE took, the
# load each server carried, and the admissions (always 0: the tests fail otherwise).
#
# Environment: TEST_DATABASE_URL (postgres://postgres@127.0.0.1:5432/test), TEST_REDIS_URL
# (redis://127.0.0.1:6379), FLEET_REVOCATIONS (200), FLEET_LOAD_WORKERS (8 loops per server),
# PROFILE (release; `dev` for a debug build, as `cargo test` runs them), CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
export TEST_DATABASE_URL="${TEST_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}"
export TEST_REDIS_URL="${TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export CI=true # a missing database or Redis fails instead of skipping
profile="${PROFILE:-release}"
cargo test --profile "$profile" --features postgres,redis,metrics \
    --test fleet_receipt --test fleet_receipt_faults -- --nocapture --test-threads 1 2>&1 |
    grep -E "revocations,|revoke answered|recovered|PostgreSQL down|^test |test result|panicked"
