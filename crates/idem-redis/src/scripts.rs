//! The Lua scripts: each state change is one of them, run atomically by Redis.
//!
//! Every script touches only `KEYS[1]`, the record's hash, so it runs on the one node that
//! owns the record's slot. Times are Unix milliseconds read from Redis' own clock (`TIME`);
//! Redis 7 replicates a script's effects, not the script, so reading the clock is allowed.
//! Numbers travel as decimal strings (`string.format('%d', n)`): Lua's `tostring` would
//! print large numbers in exponent form.
//!
//! The record's hash fields:
//!
//! | field        | value                                                      |
//! |--------------|------------------------------------------------------------|
//! | `state`      | `in_flight` or `completed`                                 |
//! | `fp`         | the request fingerprint, 64 hex digits                     |
//! | `token`      | the fencing token of the latest claim, decimal             |
//! | `expires_ms` | lease end (in flight) or retention end (completed)         |
//! | `stored`     | `Stored::encode()` bytes, when completed                   |
//! | `claimed_ms` | when the latest claim was made (renewals keep it)          |
//! | `scope`      | the scope's text, for inspection only                      |
//! | `key`        | the key's text, for inspection only                        |
//!
//! The key also carries a native expiry (`PEXPIREAT`), so Redis forgets records by itself:
//! at the retention end once completed, and one more lease length past the lease end while
//! in flight, so that the holder's late `complete` still finds the record (it reads as
//! absent to `begin` and `get` meanwhile). Scripts compare `expires_ms` with the clock for
//! that, and because Redis keeps a key until the millisecond after its expiry time while the
//! contract says a record stops counting at that very millisecond.

use fred::types::scripts::Script;

/// Reads the clock and defines the helpers every script shares.
///
/// `now_us` mints tokens; `now_ms` measures leases and retention. `held(token)` says whether
/// `token` holds the record in flight and unexpired.
const PRELUDE: &str = r#"
local clock = redis.call('TIME')
local now_us = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local function fmt(n) return string.format('%d', n) end
local function held(token)
  local r = redis.call('HMGET', KEYS[1], 'state', 'expires_ms', 'token')
  local expires = tonumber(r[2])
  return r[1] == 'in_flight' and expires ~= nil and now_ms < expires and r[3] == token
end
"#;

/// `begin`. ARGV: fingerprint (hex), lease (ms), scope, key text.
///
/// A live record answers `mismatch`, `in_flight` (with the lease time left) or `completed`
/// (with its retention end and outcome). Otherwise the key is claimed with a token larger
/// than both the clock in microseconds and the previous token still in the hash.
const BEGIN: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'state', 'fp', 'expires_ms', 'token')
local expires = tonumber(r[3])
if r[1] and expires ~= nil and now_ms < expires then
  if r[2] ~= ARGV[1] then return {'mismatch'} end
  if r[1] == 'in_flight' then return {'in_flight', fmt(expires - now_ms)} end
  if r[1] == 'completed' then
    return {'completed', fmt(expires), redis.call('HGET', KEYS[1], 'stored')}
  end
  return {'corrupt', 'unknown state'}
end
local token = now_us
local previous = tonumber(r[4])
if previous ~= nil and previous >= token then token = previous + 1 end
local lease = tonumber(ARGV[2])
local lease_end = now_ms + lease
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'in_flight', 'fp', ARGV[1], 'token', fmt(token),
  'expires_ms', fmt(lease_end), 'claimed_ms', fmt(now_ms), 'scope', ARGV[3], 'key', ARGV[4])
redis.call('PEXPIREAT', KEYS[1], lease_end + lease)
return {'acquired', fmt(token), fmt(lease_end)}
"#;

/// `complete`. ARGV: token, retention (ms), encoded outcome.
///
/// The holder of the current token completes an in-flight record even after its lease ended
/// (the record is still there: nobody took it over, released or deleted it). The token that
/// completed the record gets its retention end again, and nothing changes.
const COMPLETE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'state', 'expires_ms', 'token')
if r[3] ~= ARGV[1] then return {'lost'} end
if r[1] == 'in_flight' then
  local retain_end = now_ms + tonumber(ARGV[2])
  redis.call('HSET', KEYS[1], 'state', 'completed', 'expires_ms', fmt(retain_end),
    'stored', ARGV[3])
  redis.call('PEXPIREAT', KEYS[1], retain_end)
  return {'ok', fmt(retain_end)}
end
local expires = tonumber(r[2])
if r[1] == 'completed' and expires ~= nil and now_ms < expires then
  return {'ok', fmt(expires)}
end
return {'lost'}
"#;

/// `release`. ARGV: token.
const RELEASE: &str = r#"
if not held(ARGV[1]) then return {'lost'} end
redis.call('DEL', KEYS[1])
return {'ok'}
"#;

/// `renew`. ARGV: token, lease (ms).
const RENEW: &str = r#"
if not held(ARGV[1]) then return {'lost'} end
local lease = tonumber(ARGV[2])
local lease_end = now_ms + lease
redis.call('HSET', KEYS[1], 'expires_ms', fmt(lease_end))
redis.call('PEXPIREAT', KEYS[1], lease_end + lease)
return {'ok', fmt(lease_end)}
"#;

/// `delete`. Removes the key whatever its state; answers 1 if the record was live.
const DELETE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'state', 'expires_ms')
local expires = tonumber(r[2])
local live = r[1] and expires ~= nil and now_ms < expires
redis.call('DEL', KEYS[1])
if live then return 1 end
return 0
"#;

/// `get`: read only. Answers `absent` or the record's fields.
const GET: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'state', 'fp', 'token', 'expires_ms', 'stored')
local expires = tonumber(r[4])
if not (r[1] and expires ~= nil and now_ms < expires) then return {'absent'} end
return {'record', r[1], r[2], r[3], r[4], r[5]}
"#;

/// The loaded form of every script. Writers carry a `#!lua` shebang, so that Redis refuses
/// them up front when it is out of memory instead of failing halfway; the reader is marked
/// `no-writes`, so it still runs then.
#[derive(Debug, Clone)]
pub(crate) struct Scripts {
    pub(crate) begin: Script,
    pub(crate) complete: Script,
    pub(crate) release: Script,
    pub(crate) renew: Script,
    pub(crate) delete: Script,
    pub(crate) get: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        let writer = |body: &str| Script::from_lua(format!("#!lua\n{PRELUDE}{body}"));
        Self {
            begin: writer(BEGIN),
            complete: writer(COMPLETE),
            release: writer(RELEASE),
            renew: writer(RENEW),
            delete: writer(DELETE),
            get: Script::from_lua(format!("#!lua flags=no-writes\n{PRELUDE}{GET}")),
        }
    }

    pub(crate) fn all(&self) -> [&Script; 6] {
        [
            &self.begin,
            &self.complete,
            &self.release,
            &self.renew,
            &self.delete,
            &self.get,
        ]
    }
}
