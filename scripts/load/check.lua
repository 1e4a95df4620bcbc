-- wrk script for the mixed run of scripts/load.sh: one category of keys per wrk process, so that every
-- answer has the same expected decision whichever connection it arrives on.
--
-- args: <category> <status> <code> <reason> <path> <key> [<path> <key> ...]
-- Requests cycle through the (path, key) pairs, the key in `X-Api-Key`. Every answer must have exactly
-- `status`, the JSON `error_detail.code` `code` and `details.reason` `reason` ("-" = none in the body).
-- Prints one RESULT line and one COUNT line per (status, code, reason) seen.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  category, want_status, want_code, want_reason = args[1], tonumber(args[2]), args[3], args[4]
  targets = {}
  for i = 5, #args, 2 do
    table.insert(targets, wrk.format("GET", args[i], { ["X-Api-Key"] = args[i + 1] }))
  end
  assert(#targets > 0, "no (path, key) pairs")
  cursor = 0
  counts, total, wrong = {}, 0, 0
end

function request()
  cursor = cursor % #targets + 1
  return targets[cursor]
end

function response(status, headers, body)
  local code = body:match('"code"%s*:%s*"([%w_]+)"') or "-"
  local reason = body:match('"reason"%s*:%s*"([%w_]+)"') or "-"
  local seen = status .. " " .. code .. " " .. reason
  counts[seen] = (counts[seen] or 0) + 1
  total = total + 1
  if status ~= want_status or code ~= want_code or reason ~= want_reason then
    wrong = wrong + 1
  end
end

function done(summary, latency, requests)
  local counted, bad, seen, name = 0, 0, {}, "?"
  for _, thread in ipairs(threads) do
    name = thread:get("category")
    counted = counted + thread:get("total")
    bad = bad + thread:get("wrong")
    for k, n in pairs(thread:get("counts")) do
      seen[k] = (seen[k] or 0) + n
    end
  end
  local e = summary.errors
  io.write(string.format("RESULT %s requests=%d counted=%d wrong=%d errors=%d\n", name,
    summary.requests, counted, bad, e.connect + e.read + e.write + e.timeout))
  for k, n in pairs(seen) do
    io.write(string.format("COUNT %s %s %d\n", name, k, n))
  end
end
