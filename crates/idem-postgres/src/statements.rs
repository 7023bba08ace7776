//! The SQL of every store operation, generated once per table.
//!
//! Every statement reads the time from the server (`now()`: the start of the statement's
//! transaction, which for these single-statement transactions is the statement's start),
//! so gateways with skewed clocks agree on leases. Times travel as Unix microseconds.

use sqlx::SqlStr;

use crate::schema::{TableName, sql};

/// A timestamptz as whole Unix microseconds (exact: timestamptz has microsecond resolution).
fn micros(expr: &str) -> String {
    format!("(extract(epoch FROM {expr}) * 1000000)::int8")
}

#[derive(Debug)]
pub(crate) struct Statements {
    pub(crate) begin: SqlStr,
    pub(crate) complete: SqlStr,
    pub(crate) completed_by: SqlStr,
    pub(crate) renew: SqlStr,
    pub(crate) release: SqlStr,
    pub(crate) get: SqlStr,
    pub(crate) delete: SqlStr,
    pub(crate) sweep: SqlStr,
    pub(crate) in_flight: SqlStr,
}

impl Statements {
    pub(crate) fn new(table: &TableName) -> Self {
        let (t, seq) = (table.table(), table.sequence());
        let expires = micros("expires_at");
        let now = micros("now()");
        Self {
            // $1 id, $2 scope, $3 key, $4 fingerprint, $5 lease.
            //
            // One statement: insert the claim, or take over a record whose lease or
            // retention ended (the ON CONFLICT WHERE is checked against the latest committed
            // version of the row, under its row lock). When neither happened, the second
            // branch reports the live record as of the statement's snapshot. Under READ
            // COMMITTED that snapshot can miss a row committed while the statement waited on
            // it (or still show one that was just released); then no row comes back and the
            // caller runs the statement again.
            //
            // A takeover draws its token from the sequence after it holds the row lock, so
            // it outranks every token drawn before, the previous holder's included.
            //
            // An in-flight record is kept (`kept_until`) one more lease length past its lease
            // end, for its holder's late complete.
            begin: sql(format!(
                "WITH claimed AS (\n\
                 INSERT INTO {t} AS r (id, scope, key, fingerprint, token, state, expires_at, outcome, kept_until,\n\
                 claimed_at)\n\
                 VALUES ($1, $2, $3, $4, nextval('{seq}'), 'in_flight', now() + $5::interval, NULL,\n\
                 now() + $5::interval * 2, now())\n\
                 ON CONFLICT (id) DO UPDATE\n\
                 SET fingerprint = excluded.fingerprint, token = nextval('{seq}'),\n\
                 state = 'in_flight', expires_at = excluded.expires_at, outcome = NULL,\n\
                 kept_until = excluded.kept_until, claimed_at = excluded.claimed_at\n\
                 WHERE r.expires_at <= now()\n\
                 RETURNING r.token, r.expires_at\n\
                 )\n\
                 SELECT true AS acquired, token, true AS same_fingerprint, false AS completed,\n\
                 {expires} AS expires_us, NULL::bytea AS outcome, {now} AS now_us\n\
                 FROM claimed\n\
                 UNION ALL\n\
                 SELECT false, token, fingerprint = $4, state = 'completed',\n\
                 {expires}, CASE WHEN state = 'completed' AND fingerprint = $4 THEN outcome END, {now}\n\
                 FROM {t}\n\
                 WHERE id = $1 AND expires_at > now() AND NOT EXISTS (SELECT 1 FROM claimed)"
            )),
            // $1 id, $2 token, $3 outcome, $4 retention.
            //
            // The holder of the current token completes an in-flight record while it is kept,
            // past its lease too (nobody took it over: a takeover changes the token; nobody
            // released it: a release ends keeping at once). A record this token already
            // completed answers its retention end and is not written again. Both branches
            // read one snapshot, so at most one returns a row; when none does, the caller
            // asks `completed_by` under a fresh snapshot, for a concurrent complete of the
            // same token that committed while this one waited on the row.
            complete: sql(format!(
                "WITH done AS (\n\
                 UPDATE {t} SET state = 'completed', outcome = $3, expires_at = now() + $4::interval,\n\
                 kept_until = NULL\n\
                 WHERE id = $1 AND token = $2 AND state = 'in_flight'\n\
                 AND GREATEST(kept_until, expires_at) > now()\n\
                 RETURNING expires_at\n\
                 )\n\
                 SELECT {expires} FROM done\n\
                 UNION ALL\n\
                 SELECT {expires} FROM {t}\n\
                 WHERE id = $1 AND token = $2 AND state = 'completed' AND expires_at > now()"
            )),
            // $1 id, $2 token.
            completed_by: sql(format!(
                "SELECT {expires} FROM {t}\n\
                 WHERE id = $1 AND token = $2 AND state = 'completed' AND expires_at > now()"
            )),
            // $1 id, $2 token, $3 lease.
            renew: sql(format!(
                "UPDATE {t} SET expires_at = now() + $3::interval, kept_until = now() + $3::interval * 2\n\
                 WHERE id = $1 AND token = $2 AND state = 'in_flight' AND expires_at > now()\n\
                 RETURNING {expires}"
            )),
            // $1 id, $2 token. The row stays (expired at once, swept later) so the next
            // claim goes through the takeover path and outranks the released token; it is
            // no longer kept, so the released holder cannot complete it.
            release: sql(format!(
                "UPDATE {t} SET expires_at = '-infinity', kept_until = '-infinity'\n\
                 WHERE id = $1 AND token = $2 AND state = 'in_flight' AND expires_at > now()\n\
                 RETURNING true"
            )),
            // $1 id.
            get: sql(format!(
                "SELECT fingerprint, token, state = 'completed' AS completed, {expires} AS expires_us, outcome\n\
                 FROM {t} WHERE id = $1 AND expires_at > now()"
            )),
            // $1 id.
            delete: sql(format!(
                "DELETE FROM {t} WHERE id = $1 RETURNING expires_at > now()"
            )),
            // $1 limit. Runs inside the transaction that holds the sweep's advisory lock.
            // Removes records that are expired and no longer kept (in flight, a lease length
            // past the lease).
            sweep: sql(format!(
                "DELETE FROM {t} WHERE id = ANY(ARRAY(\n\
                 SELECT id FROM {t} WHERE expires_at <= now()\n\
                 AND (kept_until IS NULL OR kept_until <= now())\n\
                 ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED))"
            )),
            // $1 minimum age, $2 limit. Walks the partial index on claimed_at oldest first;
            // rows whose lease ended are skipped (the sweeper removes them).
            in_flight: sql(format!(
                "SELECT scope, key, token, {claimed} AS claimed_us, {expires} AS expires_us\n\
                 FROM {t} WHERE state = 'in_flight' AND claimed_at <= now() - $1::interval\n\
                 AND expires_at > now()\n\
                 ORDER BY claimed_at LIMIT $2",
                claimed = micros("claimed_at")
            )),
        }
    }
}
