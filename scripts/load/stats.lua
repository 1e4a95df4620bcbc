-- wrk script for the paired rounds of scripts/load.sh: prints one machine-readable line.
-- Latencies are in microseconds; `errors` counts socket errors, `non2xx` answers outside 2xx/3xx.
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "STATS requests=%d duration_us=%d p50_us=%d p99_us=%d errors=%d non2xx=%d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
