//! Helpers for tests against a real PostgreSQL server (features `postgres`
//! and `testing`): find the server or say why the test is skipped, name
//! throwaway schemas and participants uniquely, and clean up after.
//!
//! The server is `TWOPC_POSTGRES_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`). It must allow prepared
//! transactions (`max_prepared_transactions` > 0). Where it is unreachable
//! or does not, [`database`] prints why and returns None, so the test passes
//! as skipped, unless `TWOPC_REQUIRE_POSTGRES=1` (set by `.ci/run`), when it
//! panics.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio_postgres::NoTls;

/// The server tests use when `TWOPC_POSTGRES_URL` is unset.
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A reachable server that allows prepared transactions.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    /// Its URL.
    pub url: String,
}

/// The test server, or None (after printing why `test` is skipped) when
/// there is none and `TWOPC_REQUIRE_POSTGRES` is not `1`.
///
/// # Panics
/// When `TWOPC_REQUIRE_POSTGRES=1` and the server is unreachable or has
/// `max_prepared_transactions = 0`.
pub async fn database(test: &str) -> Option<TestDatabase> {
    let url = std::env::var("TWOPC_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_URL.to_owned());
    let required = std::env::var("TWOPC_REQUIRE_POSTGRES").is_ok_and(|v| v == "1");
    match check(&url).await {
        Ok(()) => Some(TestDatabase { url }),
        Err(why) if required => panic!("{test}: PostgreSQL is required (TWOPC_REQUIRE_POSTGRES=1) but {why}"),
        Err(why) => {
            eprintln!("SKIPPED {test}: {why} (set TWOPC_REQUIRE_POSTGRES=1 to fail instead)");
            None
        }
    }
}

async fn check(url: &str) -> Result<(), String> {
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| format!("TWOPC_POSTGRES_URL {url:?}: {e}"))?;
    config.connect_timeout(Duration::from_secs(3));
    let (client, connection) =
        config.connect(NoTls).await.map_err(|e| format!("no PostgreSQL server answers at {url}: {e}"))?;
    let connection = tokio::spawn(connection);
    let row = client.query_one("SHOW max_prepared_transactions", &[]).await.map_err(|e| e.to_string())?;
    let value: String = row.get(0);
    drop(client);
    let _ = connection.await;
    if value.trim() == "0" {
        return Err(format!(
            "the server at {url} has max_prepared_transactions = 0 (PREPARE TRANSACTION fails); \
             .ci/run raises it"
        ));
    }
    Ok(())
}

/// A name no other test run uses: `prefix`, this process id and a counter,
/// lowercase, usable as a schema and as a participant id.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{prefix}_{}_{n}_{nanos:x}", std::process::id())
}

/// Runs `sql` (several statements allowed) on the server at `url`.
///
/// # Panics
/// If the server cannot be reached or the SQL fails.
pub async fn execute(url: &str, sql: &str) {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect to the test server");
    let connection = tokio::spawn(connection);
    client.batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    drop(client);
    let _ = connection.await;
}

/// The gids in `pg_prepared_xacts` that start with `prefix`.
///
/// # Panics
/// If the server cannot be reached.
pub async fn prepared_gids(url: &str, prefix: &str) -> Vec<String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect to the test server");
    let connection = tokio::spawn(connection);
    let rows = client
        .query("SELECT gid FROM pg_prepared_xacts WHERE starts_with(gid, $1) ORDER BY gid", &[&prefix])
        .await
        .expect("read pg_prepared_xacts");
    drop(client);
    let _ = connection.await;
    rows.iter().map(|row| row.get(0)).collect()
}

/// Cleans up after a test: rolls back every prepared transaction whose gid
/// starts with `gid_prefix` and has a row in `schema` (other tests may use
/// the same participant name in other schemas), then drops `schema` with
/// everything in it.
///
/// # Panics
/// If the server cannot be reached.
pub async fn drop_schema(url: &str, schema: &str, gid_prefix: &str) {
    let schema = schema.replace('"', "");
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.expect("connect to the test server");
    let connection = tokio::spawn(connection);
    let table = format!("\"{schema}\".twopc_branches");
    let exists: bool =
        client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&table]).await.map(|row| row.get(0)).unwrap_or(false);
    let ours = if exists {
        let sql = format!(
            "SELECT p.gid FROM pg_prepared_xacts p WHERE starts_with(p.gid, $1) \
             AND EXISTS (SELECT 1 FROM {table} b WHERE b.gid = p.gid)"
        );
        client.query(&sql, &[&gid_prefix]).await.map(|rows| rows.iter().map(|r| r.get(0)).collect()).unwrap_or_default()
    } else {
        Vec::<String>::new()
    };
    drop(client);
    let _ = connection.await;
    for gid in ours {
        execute(url, &format!("ROLLBACK PREPARED '{}'", gid.replace('\'', "''"))).await;
    }
    execute(url, &format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE")).await;
}

/// Cleans up when dropped, even when the test panics: rolls back the
/// prepared transactions whose gids start with each prefix and drops each
/// schema (see [`drop_schema`]). Add to it as the test creates things.
#[derive(Debug, Default)]
pub struct Cleanup {
    url: String,
    schemas: parking_lot::Mutex<Vec<(String, String)>>,
}

impl Cleanup {
    /// Nothing to clean on the server at `url` yet.
    pub fn new(url: &str) -> Self {
        Self { url: url.to_owned(), schemas: parking_lot::Mutex::default() }
    }

    /// Drops `schema` and rolls back the gids starting with `gid_prefix` at the end.
    pub fn schema(&self, schema: &str, gid_prefix: &str) {
        self.schemas.lock().push((schema.to_owned(), gid_prefix.to_owned()));
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let schemas = std::mem::take(&mut *self.schemas.lock());
        if schemas.is_empty() {
            return;
        }
        let url = self.url.clone();
        // A runtime of its own on a thread of its own: drop may run inside
        // (or while unwinding out of) the test's runtime.
        let cleaner = std::thread::spawn(move || {
            let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            runtime.block_on(async {
                for (schema, prefix) in schemas {
                    drop_schema(&url, &schema, &prefix).await;
                }
            });
        });
        if cleaner.join().is_err() {
            eprintln!("cleaning up the test's PostgreSQL schemas failed");
        }
    }
}
