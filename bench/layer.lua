-- wrk script for bench/layer.sh: every request is a POST with a fresh Idempotency-Key and
-- the small JSON body of bench/new_keys.lua, plus a session cookie cycling over SESSIONS
-- ids (64 by default: as many clients as wrk has connections). The cookie is there for
-- axum-idempotent, which caches per session and not at all without one; every variant
-- gets the same requests (idem scopes keys by the cookie's hash; the others ignore it).
--
--   wrk -t2 -c64 -d10s --latency -s bench/layer.lua http://127.0.0.1:PORT/payments -- NONCE [SESSIONS]
--
-- Keys are "l-NONCE-THREAD-COUNTER". Session ids are 22 base64url characters (ruts' Id
-- format: 128 bits, so the last character carries two zero bits). Prints one line
-- "RESULT ..." like bench/new_keys.lua (latencies in microseconds).

local body = '{"amount":1250,"currency":"EUR","customer":"cus_42","note":"idem bench"}'

local next_id = 1
function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
end

local parts = {}
local sessions = 64
local counter = 0

function init(args)
   local nonce = args[1] or tostring(os.time())
   sessions = tonumber(args[2] or "64")
   local template = wrk.format("POST", nil, {
      ["Content-Type"] = "application/json",
      ["Idempotency-Key"] = "@KEY@",
      ["Cookie"] = "session=@SESSION@",
   }, body)
   local ks, ke = template:find("@KEY@", 1, true)
   local ss, se = template:find("@SESSION@", 1, true)
   -- The key header comes before the cookie in wrk.format's output only by chance of
   -- table order: handle both.
   if ks < ss then
      parts = { template:sub(1, ks - 1) .. "l-" .. nonce .. "-" .. tostring(id) .. "-",
         template:sub(ke + 1, ss - 1), template:sub(se + 1), true }
   else
      parts = { template:sub(1, ss - 1), template:sub(se + 1, ks - 1) .. "l-" .. nonce ..
         "-" .. tostring(id) .. "-", template:sub(ke + 1), false }
   end
end

local function session(n)
   return string.format("benchsess%012dA", n)
end

function request()
   counter = counter + 1
   local s = session(((id or 1) * 31 + counter) % sessions)
   if parts[4] then
      return parts[1] .. counter .. parts[2] .. s .. parts[3]
   end
   return parts[1] .. s .. parts[2] .. counter .. parts[3]
end

function done(summary, latency)
   local e = summary.errors
   io.write(string.format(
      "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d status_errors=%d socket_errors=%d\n",
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      e.status, e.connect + e.read + e.write + e.timeout))
end
