-- wrk script for the flood mode of scripts/load.sh: every request carries a new key, made per request.
--
-- args: <kind> <prefix> <expected reason>
--   keyed     `<prefix>_` + 43 random base62 + `1` (a secret version the server accepts) + 11 random
--             base62: the keyed format's shape with a tag nobody computed.
--   public    `<prefix>_` + 43 random base62 + its CRC32 in 6 base62 digits: what anyone can make for
--             the public checksum format (each one new, so each one a store lookup there).
--   malformed the keyed format's length, with a `!` as its last character (refused by the shape).
-- Each kind costs the client the same: 55 random characters (CRC32 only for `public`). Every answer
-- must be 401 with `details.reason` = the expected reason, except that for `public` a 503
-- AUTH_UNAVAILABLE (the resolver's lookup bound shedding store lookups) is counted as `shed`.
-- Prints one FLOOD line.

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

local alphabet = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
local chars = {}
for i = 1, 62 do chars[i] = alphabet:sub(i, i) end

local crc_table = {}
for i = 0, 255 do
  local c = i
  for _ = 1, 8 do
    if bit.band(c, 1) == 1 then
      c = bit.bxor(bit.rshift(c, 1), 0xEDB88320)
    else
      c = bit.rshift(c, 1)
    end
  end
  crc_table[i] = c
end

local function crc32(s)
  local c = 0xFFFFFFFF
  for i = 1, #s do
    c = bit.bxor(crc_table[bit.band(bit.bxor(c, s:byte(i)), 0xFF)], bit.rshift(c, 8))
  end
  c = bit.bnot(c)
  if c < 0 then c = c + 4294967296 end
  return c
end

local function base62(value, width)
  local out = {}
  for i = width, 1, -1 do
    out[i] = chars[value % 62 + 1]
    value = math.floor(value / 62)
  end
  return table.concat(out)
end

local function random(n)
  local out = {}
  for i = 1, n do out[i] = chars[math.random(62)] end
  return table.concat(out)
end

function init(args)
  kind, prefix, want_reason = args[1], args[2] .. "_", args[3]
  math.randomseed(os.time() + tonumber(tostring({}):match("0x(%x+)"), 16) % 100000)
  total, wrong, shed = 0, 0, 0
end

function request()
  local key
  if kind == "keyed" then
    key = prefix .. random(43) .. "1" .. random(11)
  elseif kind == "public" then
    local signed = prefix .. random(43)
    key = signed .. base62(crc32(signed), 6)
    random(6) -- the same amount of random characters as the other kinds
  else
    key = prefix .. random(54) .. "!"
  end
  return wrk.format("GET", "/auth/ping", { ["X-Api-Key"] = key })
end

function response(status, headers, body)
  total = total + 1
  local reason = body:match('"reason"%s*:%s*"([%w_]+)"') or "-"
  if kind == "public" and status == 503 and body:find('"AUTH_UNAVAILABLE"', 1, true) then
    shed = shed + 1
  elseif status ~= 401 or reason ~= want_reason then
    wrong = wrong + 1
  end
end

function done(summary, latency, requests)
  local counted, bad, dropped = 0, 0, 0
  for _, thread in ipairs(threads) do
    counted = counted + thread:get("total")
    bad = bad + thread:get("wrong")
    dropped = dropped + thread:get("shed")
  end
  local e = summary.errors
  io.write(string.format("FLOOD requests=%d counted=%d wrong=%d shed=%d errors=%d duration_us=%d\n",
    summary.requests, counted, bad, dropped, e.connect + e.read + e.write + e.timeout, summary.duration))
end
