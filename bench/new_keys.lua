-- wrk script for bench/http.sh: every request is a POST with a fresh Idempotency-Key
-- and a small JSON body, so a gateway must claim, forward and store each one.
--
--   wrk -t2 -c64 -d10s --latency -s bench/new_keys.lua http://127.0.0.1:PORT/payments -- NONCE
--
-- NONCE keeps keys of different runs apart (the same gateway serves the warm-up and the
-- measured run). Keys are "n-NONCE-THREAD-COUNTER". NONCE "none" sends the same POSTs
-- without a key, which a gateway passes through unprotected (its cost as a plain proxy).
-- At the end, prints one line "RESULT ..." for bench/http.sh to parse (latencies in
-- microseconds).

local body = '{"amount":1250,"currency":"EUR","customer":"cus_42","note":"idem bench"}'

local next_id = 1
function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
end

local head, tail
local counter = 0

function init(args)
   local nonce = args[1] or tostring(os.time())
   if nonce == "none" then
      local plain = wrk.format("POST", nil, { ["Content-Type"] = "application/json" }, body)
      request = function() return plain end
      return
   end
   local template = wrk.format("POST", nil, {
      ["Content-Type"] = "application/json",
      ["Idempotency-Key"] = "@KEY@",
   }, body)
   local s, e = template:find("@KEY@", 1, true)
   head = template:sub(1, s - 1) .. "n-" .. nonce .. "-" .. tostring(id) .. "-"
   tail = template:sub(e + 1)
end

function request()
   counter = counter + 1
   return head .. counter .. tail
end

function done(summary, latency)
   local e = summary.errors
   io.write(string.format(
      "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d status_errors=%d socket_errors=%d\n",
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      e.status, e.connect + e.read + e.write + e.timeout))
end
