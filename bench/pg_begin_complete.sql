-- pgbench script for bench/http.sh: one transaction = the Postgres store's work for one
-- new key, its `begin` and its `complete` statements exactly as the store sends them
-- (crates/idem-postgres/src/statements.rs), one autocommitted statement each.
--
--   PGOPTIONS='-c search_path=SCHEMA' pgbench -n -M prepared -c 64 -j 2 -T 10 \
--       -f bench/pg_begin_complete.sql postgres://postgres@127.0.0.1:5432/test
--
-- SCHEMA holds a records table made by the store's migration (bench/http.sh lets
-- `idem serve --store postgres://...?table=SCHEMA.records` create it); the table is named
-- without a schema here, so search_path picks it. The store's parameters become:
--   $1 id          sha256 of a fresh random number (the store sends ScopedKey::digest(),
--                  32 bytes too)
--   $2 scope       'anonymous', as the gateway stores a request without a scope
--   $3 key         the number as text
--   $4 fingerprint a constant 32-byte digest
--   $5 lease       60 s, the gateway's default
-- and for complete: $2 token from begin (\gset), $3 the 69-byte outcome the gateway stores
-- for bench-upstream's 201 answer (Stored::encode()), $4 retention 24 h, the default.
\set k random(1, 1000000000000000000)
WITH claimed AS (
INSERT INTO "records" AS r (id, scope, key, fingerprint, token, state, expires_at, outcome)
VALUES (sha256(int8send(:k::int8)), 'anonymous', :k::text, '\x5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8'::bytea, nextval('"records_token_seq"'), 'in_flight', now() + '60 seconds'::interval, NULL)
ON CONFLICT (id) DO UPDATE
SET fingerprint = excluded.fingerprint, token = nextval('"records_token_seq"'),
state = 'in_flight', expires_at = excluded.expires_at, outcome = NULL
WHERE r.expires_at <= now()
RETURNING r.token, r.expires_at
)
SELECT true AS acquired, token, true AS same_fingerprint, false AS completed,
(extract(epoch FROM expires_at) * 1000000)::int8 AS expires_us, NULL::bytea AS outcome, (extract(epoch FROM now()) * 1000000)::int8 AS now_us
FROM claimed
UNION ALL
SELECT false, token, fingerprint = '\x5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8'::bytea, state = 'completed',
(extract(epoch FROM expires_at) * 1000000)::int8, CASE WHEN state = 'completed' AND fingerprint = '\x5e884898da28047151d0e56f8dc6292773603d0d6aabbdd62a11ef721d1542d8'::bytea THEN outcome END, (extract(epoch FROM now()) * 1000000)::int8
FROM "records"
WHERE id = sha256(int8send(:k::int8)) AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM claimed)
\gset
UPDATE "records" SET state = 'completed', outcome = '\x01c901010c636f6e74656e742d74797065106170706c69636174696f6e2f6a736f6e01217b226964223a227061795f31222c22737461747573223a2263726561746564227d'::bytea, expires_at = now() + '86400 seconds'::interval
WHERE id = sha256(int8send(:k::int8)) AND token = :token AND state = 'in_flight' AND expires_at > now()
RETURNING (extract(epoch FROM expires_at) * 1000000)::int8;
