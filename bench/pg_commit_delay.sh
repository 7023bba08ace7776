#!/usr/bin/env bash
# commit_delay / commit_siblings with pgbench on the Postgres store's begin + complete
# (bench/pg_begin_complete.sql), run by hand (BENCHMARKS.md, issue 12 item 3):
#
#   bash bench/pg_commit_delay.sh
#
# The settings are per session (PGOPTIONS; commit_delay needs a superuser): nothing on the
# server changes. A records table like the store's (schema version 3 of
# crates/idem-postgres/src/schema.rs) is made in a schema of its own and
# dropped at the end. Prints, per run, transactions/s (one = two commits), the average
# latency and WAL fsyncs per transaction (pg_stat_wal.wal_sync: cluster-wide, so other
# sessions' count too). Knob: PG_URL (postgres://postgres@127.0.0.1:5432/test).
set -euo pipefail
URL=${PG_URL:-postgres://postgres@127.0.0.1:5432/test}
S=idem_cd_$$
PGBENCH=$(command -v pgbench || find /usr/lib/postgresql/*/bin -name pgbench | sort -V | tail -1)
psql "$URL" -XAtq <<SQL
CREATE SCHEMA $S;
CREATE SEQUENCE $S.records_token_seq AS bigint;
CREATE TABLE $S.records (id bytea PRIMARY KEY, scope text NOT NULL, key text NOT NULL,
  fingerprint bytea NOT NULL, token bigint NOT NULL,
  state text NOT NULL CHECK (state IN ('in_flight', 'completed')), expires_at timestamptz NOT NULL,
  outcome bytea, CHECK ((state = 'completed') = (outcome IS NOT NULL)),
  kept_until timestamptz, claimed_at timestamptz);
CREATE INDEX ON $S.records (expires_at);
CREATE INDEX ON $S.records (claimed_at) WHERE state = 'in_flight';
SQL
trap 'psql "$URL" -XAtqc "DROP SCHEMA $S CASCADE"' EXIT
cd "$(dirname "$0")/.."
for round in 1 2; do
for clients in 64 10; do
  for delay in 0 10 100 1000; do
    for siblings in 5; do
      s0=$(psql "$URL" -XAtqc "SELECT wal_sync FROM pg_stat_wal")
      out=$(PGOPTIONS="-c search_path=$S -c commit_delay=$delay -c commit_siblings=$siblings" \
        "$PGBENCH" -n -M prepared -c "$clients" -j 2 -T 10 -f bench/pg_begin_complete.sql "$URL" 2>&1)
      tps=$(grep -oP 'tps = \K[0-9.]+' <<<"$out" | head -1)
      lat=$(grep -oP 'latency average = \K[0-9.]+' <<<"$out")
      s1=$(psql "$URL" -XAtqc "SELECT wal_sync FROM pg_stat_wal")
      txns=$(grep -oP 'number of transactions actually processed: \K[0-9]+' <<<"$out")
      syncs=$(awk -v a="$s0" -v b="$s1" -v t="$txns" 'BEGIN { printf "%.3f", (b - a) / t }')
      load=$(cut -d' ' -f1 /proc/loadavg)
      echo "round=$round clients=$clients commit_delay=$delay commit_siblings=$siblings tps=$tps latency_ms=$lat wal_syncs_per_txn=$syncs load1=$load"
    done
  done
done
done
