-- wrk script for bench/http.sh: POSTs cycling over a small set of keys that were
-- completed beforehand, so a gateway answers each one from its store (a replay) and never
-- forwards it. Through a plain proxy or directly, the same requests reach the upstream.
--
--   wrk -t2 -c64 -d10s --latency -s bench/replay.lua http://127.0.0.1:PORT/payments -- NONCE COUNT
--
-- Keys are "r-NONCE-1" .. "r-NONCE-COUNT" (default COUNT 100), with the body below: seed
-- them with exactly these (bench/http.sh does, with curl). At the end, prints one line
-- "RESULT ..." for bench/http.sh to parse (latencies in microseconds).

local body = '{"amount":1250,"currency":"EUR","customer":"cus_42","note":"idem bench"}'

local next_id = 1
function setup(thread)
   thread:set("id", next_id)
   next_id = next_id + 1
end

local requests = {}
local i = 0

function init(args)
   local nonce = args[1] or "0"
   local count = tonumber(args[2] or "100")
   for k = 1, count do
      requests[k] = wrk.format("POST", nil, {
         ["Content-Type"] = "application/json",
         ["Idempotency-Key"] = "r-" .. nonce .. "-" .. k,
      }, body)
   end
   -- Threads start at different keys so they do not move in lockstep.
   i = ((id or 1) - 1) * 37 % count
end

function request()
   i = i % #requests + 1
   return requests[i]
end

function done(summary, latency)
   local e = summary.errors
   io.write(string.format(
      "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d status_errors=%d socket_errors=%d\n",
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      e.status, e.connect + e.read + e.write + e.timeout))
end
