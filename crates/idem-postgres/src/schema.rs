//! The table's name, its DDL, and the versioned migrations that create it.

use sqlx::{AssertSqlSafe, Connection, PgConnection, SqlSafeStr, SqlStr};

use crate::ConnectError;

/// The newest schema version this crate creates.
pub(crate) const SCHEMA_VERSION: i32 = 3;

/// The table that records, per records table, which schema version it is at. It lives in
/// the records table's schema (or on the search path when the name is unqualified).
pub(crate) const VERSIONS_TABLE: &str = "idem_schema_versions";

/// Longest record-table name: the index name adds 15 characters and Postgres truncates
/// identifiers past 63.
const MAX_TABLE_LEN: usize = 48;
const MAX_SCHEMA_LEN: usize = 63;

/// A validated, optionally schema-qualified table name: `name` or `schema.name`, each part
/// lowercase ASCII letters, digits and `_`, not starting with a digit or `pg_`; the table
/// part at most 48 characters (so names derived from it, such as an index's, fit Postgres'
/// 63), the schema at most 63. Such a name never needs escaping, and is always quoted.
///
/// Public so that other crates keeping tables beside the store's (the `idem-queue` inbox)
/// apply the same rules.
///
/// ```
/// use idem_postgres::TableName;
///
/// let table = TableName::parse("billing.processed").unwrap();
/// assert_eq!(table.table(), "\"billing\".\"processed\"");
/// assert_eq!(table.name(), "processed");
/// assert_eq!(table.display(), "billing.processed");
/// assert!(TableName::parse("Processed").is_err());
/// assert!(TableName::parse("x; DROP TABLE y").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableName {
    schema: Option<String>,
    name: String,
}

fn check_identifier(part: &str, max: usize) -> Result<(), &'static str> {
    let mut bytes = part.bytes();
    match bytes.next() {
        None => return Err("a name part is empty"),
        Some(b'a'..=b'z' | b'_') => {}
        Some(_) => return Err("a name part must start with a lowercase letter or `_`"),
    }
    if !bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_')) {
        return Err("only lowercase ASCII letters, digits and `_` are allowed");
    }
    if part.len() > max {
        return Err(if max == MAX_TABLE_LEN {
            "the table name is longer than 48 characters"
        } else {
            "the schema name is longer than 63 characters"
        });
    }
    if part.starts_with("pg_") {
        return Err("names starting with `pg_` are reserved by Postgres");
    }
    Ok(())
}

impl TableName {
    /// Validates `table` or `schema.table`; the error is [`ConnectError::InvalidTable`],
    /// with the reason.
    pub fn parse(text: &str) -> Result<Self, ConnectError> {
        let invalid = |reason| ConnectError::InvalidTable {
            name: text.to_owned(),
            reason,
        };
        let (schema, name) = match text.split_once('.') {
            Some((schema, name)) => (Some(schema), name),
            None => (None, text),
        };
        if let Some(schema) = schema {
            check_identifier(schema, MAX_SCHEMA_LEN).map_err(invalid)?;
        }
        check_identifier(name, MAX_TABLE_LEN).map_err(invalid)?;
        if name == VERSIONS_TABLE {
            return Err(invalid("that name is taken by the schema-version table"));
        }
        Ok(Self {
            schema: schema.map(str::to_owned),
            name: name.to_owned(),
        })
    }

    fn qualify(&self, name: &str) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{name}\""),
            None => format!("\"{name}\""),
        }
    }

    /// The table, quoted for SQL (with its schema, if it has one).
    pub fn table(&self) -> String {
        self.qualify(&self.name)
    }

    /// The token sequence, quoted for SQL.
    pub(crate) fn sequence(&self) -> String {
        self.qualify(&format!("{}_token_seq", self.name))
    }

    /// The schema-version table, quoted for SQL.
    pub(crate) fn versions(&self) -> String {
        self.qualify(VERSIONS_TABLE)
    }

    /// The table's own name, without its schema or quotes.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The unquoted name as given, for display and lock names.
    pub fn display(&self) -> String {
        match &self.schema {
            Some(schema) => format!("{schema}.{}", self.name),
            None => self.name.clone(),
        }
    }

    /// The advisory-lock name that keeps two sweeps of this table apart.
    pub(crate) fn sweep_lock(&self) -> String {
        format!("idem-postgres sweep {}", self.display())
    }

    fn migrate_lock(&self) -> String {
        format!("idem-postgres migrate {}", self.display())
    }

    /// The DDL of schema version `version` (1-based), each step idempotent.
    fn step(&self, version: i32) -> String {
        let (table, sequence) = (self.table(), self.sequence());
        let index = format!("\"{}_expires_at_idx\"", self.name);
        match version {
            1 => format!(
                "CREATE SEQUENCE IF NOT EXISTS {sequence} AS bigint;\n\
                 CREATE TABLE IF NOT EXISTS {table} (\n    \
                     id bytea PRIMARY KEY,\n    \
                     scope text NOT NULL,\n    \
                     key text NOT NULL,\n    \
                     fingerprint bytea NOT NULL,\n    \
                     token bigint NOT NULL,\n    \
                     state text NOT NULL CHECK (state IN ('in_flight', 'completed')),\n    \
                     expires_at timestamptz NOT NULL,\n    \
                     outcome bytea,\n    \
                     CHECK ((state = 'completed') = (outcome IS NOT NULL))\n\
                 );\n\
                 COMMENT ON TABLE {table} IS 'idem-postgres idempotency records; \
                     id = ScopedKey::digest(), outcome = Stored::encode()';\n\
                 CREATE INDEX IF NOT EXISTS {index} ON {table} (expires_at);\n"
            ),
            // Until when a record is kept past its expiry, so that the holder of an in-flight
            // record whose lease ended can still complete it. NULL (rows written by version 1
            // code) means at its expiry; the row is kept until the later of the two.
            2 => format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS kept_until timestamptz;\n\
                 COMMENT ON COLUMN {table}.kept_until IS 'in flight: lease end + one lease \
                     length, for the holder''s late complete; NULL: at expires_at';\n"
            ),
            // When the current token claimed the key, for listing stuck leases oldest first
            // (`Store::in_flight`). NULL (rows claimed by version 2 code) is never listed.
            3 => format!(
                "ALTER TABLE {table} ADD COLUMN IF NOT EXISTS claimed_at timestamptz;\n\
                 CREATE INDEX IF NOT EXISTS \"{name}_claimed_at_idx\" ON {table} (claimed_at)\n    \
                     WHERE state = 'in_flight';\n",
                name = self.name
            ),
            _ => String::new(),
        }
    }

    fn versions_ddl(&self) -> String {
        format!(
            "CREATE TABLE IF NOT EXISTS {} (\n    \
                 table_name text PRIMARY KEY,\n    \
                 version integer NOT NULL,\n    \
                 applied_at timestamptz NOT NULL DEFAULT now()\n\
             );\n",
            self.versions()
        )
    }

    fn record_version(&self, version: i32) -> String {
        format!(
            "INSERT INTO {} (table_name, version) VALUES ('{}', {version})\n    \
             ON CONFLICT (table_name) DO UPDATE SET version = excluded.version, applied_at = now();\n",
            self.versions(),
            self.name
        )
    }

    /// The whole script that brings an empty database to the current schema version.
    pub(crate) fn script(&self) -> String {
        let mut script = String::from("BEGIN;\n");
        if let Some(schema) = &self.schema {
            script.push_str(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\";\n"));
        }
        for version in 1..=SCHEMA_VERSION {
            script.push_str(&self.step(version));
        }
        script.push_str(&self.versions_ddl());
        script.push_str(&self.record_version(SCHEMA_VERSION));
        script.push_str("COMMIT;\n");
        script
    }
}

pub(crate) fn sql(text: String) -> SqlStr {
    AssertSqlSafe(text).into_sql_str()
}

/// Brings the table to [`SCHEMA_VERSION`], in one transaction, under an advisory lock so
/// that gateways starting together do not race each other's DDL. Does nothing (and needs no
/// DDL privilege) when the table is already current. Newer schema versions are accepted:
/// versions only ever add.
///
/// On failure the transaction's `ROLLBACK` is only queued on `conn` (sqlx's way): close the
/// connection rather than reuse it.
pub(crate) async fn migrate(conn: &mut PgConnection, table: &TableName) -> Result<(), sqlx::Error> {
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))")
        .bind(table.migrate_lock())
        .execute(&mut *tx)
        .await?;
    let versions_exist: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(table.versions())
        .fetch_one(&mut *tx)
        .await?;
    let current: i32 = if versions_exist {
        sqlx::query_scalar(sql(format!(
            "SELECT version FROM {} WHERE table_name = $1",
            table.versions()
        )))
        .bind(&table.name)
        .fetch_optional(&mut *tx)
        .await?
        .unwrap_or(0)
    } else {
        0
    };
    if current >= SCHEMA_VERSION {
        tx.commit().await?;
        return Ok(());
    }
    if let Some(schema) = &table.schema {
        let missing: bool = sqlx::query_scalar("SELECT to_regnamespace($1) IS NULL")
            .bind(schema)
            .fetch_one(&mut *tx)
            .await?;
        if missing {
            sqlx::raw_sql(sql(format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\"")))
                .execute(&mut *tx)
                .await?;
        }
    }
    let mut ddl = String::new();
    for version in current + 1..=SCHEMA_VERSION {
        ddl.push_str(&table.step(version));
    }
    ddl.push_str(&table.versions_ddl());
    ddl.push_str(&table.record_version(SCHEMA_VERSION));
    sqlx::raw_sql(sql(ddl)).execute(&mut *tx).await?;
    tx.commit().await?;
    tracing::info!(
        table = %table.display(),
        from = current,
        to = SCHEMA_VERSION,
        "migrated the idem records table"
    );
    Ok(())
}

/// Whether the table and its sequence exist, for stores that skip migrations.
pub(crate) async fn exists(
    conn: &mut PgConnection,
    table: &TableName,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL")
        .bind(table.table())
        .bind(table.sequence())
        .fetch_one(conn)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_schema_qualified_names() {
        let plain = TableName::parse("idem_records").unwrap();
        assert_eq!(plain.table(), "\"idem_records\"");
        assert_eq!(plain.sequence(), "\"idem_records_token_seq\"");
        let qualified = TableName::parse("idem.records_2").unwrap();
        assert_eq!(qualified.table(), "\"idem\".\"records_2\"");
        assert_eq!(qualified.versions(), "\"idem\".\"idem_schema_versions\"");
        assert_eq!(qualified.display(), "idem.records_2");
        assert!(TableName::parse(&"t".repeat(48)).is_ok());
    }

    #[test]
    fn rejects_anything_that_needs_escaping() {
        for bad in [
            "",
            ".",
            "a.",
            ".a",
            "a.b.c",
            "Records",
            "1records",
            "rec-ords",
            "rec ords",
            "records\"; DROP TABLE x; --",
            "r\u{e9}cords",
            "pg_records",
            "idem_schema_versions",
            &"t".repeat(49),
        ] {
            match TableName::parse(bad) {
                Err(ConnectError::InvalidTable { name, .. }) => assert_eq!(name, bad),
                other => panic!("{bad:?} should be refused, got {other:?}"),
            }
        }
    }

    #[test]
    fn the_script_is_one_transaction_ending_at_the_current_version() {
        let script = TableName::parse("ops.idem_records").unwrap().script();
        assert!(script.starts_with("BEGIN;\nCREATE SCHEMA IF NOT EXISTS \"ops\";"));
        assert!(script.contains("CREATE TABLE IF NOT EXISTS \"ops\".\"idem_records\""));
        assert!(script.contains("ADD COLUMN IF NOT EXISTS kept_until timestamptz"));
        assert!(script.contains("ADD COLUMN IF NOT EXISTS claimed_at timestamptz"));
        assert!(script.contains("VALUES ('idem_records', 3)"));
        assert!(script.ends_with("COMMIT;\n"));
    }
}
