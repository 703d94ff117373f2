//! I8 under faults with a PostgreSQL bank: `twopc demo --chaos --store
//! postgres://...` (bank-b on PostgreSQL, SIGKILLed while it holds prepared
//! transactions, the coordinator leader killed too) conserves money and
//! leaves no transfer undecided; its schema is dropped afterwards. Skipped
//! where no server allows prepared transactions, unless
//! TWOPC_REQUIRE_POSTGRES=1.

mod processes;

use std::time::Duration;

use twopc_participant::postgres_testing;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chaos_demo_with_a_postgres_bank_conserves_money() {
    let Some(db) = postgres_testing::database("the_chaos_demo_with_a_postgres_bank_conserves_money").await else {
        return;
    };
    let args = ["--chaos", "--transfers", "400", "--concurrency", "8", "--store", &db.url];
    let stdout = processes::demo(&args, Duration::from_secs(240)).await;
    assert!(stdout.contains("SIGKILL bank-b holding"), "bank-b was not killed holding prepared branches:\n{stdout}");
    let schema = stdout
        .lines()
        .find_map(|line| line.split_once("keeps its accounts on PostgreSQL, schema ").map(|(_, s)| s.trim()))
        .expect("the demo names bank-b's schema")
        .to_owned();
    let (client, connection) = twopc_participant::postgres::tokio_postgres::connect(
        &db.url,
        twopc_participant::postgres::tokio_postgres::NoTls,
    )
    .await
    .expect("connect");
    let connection = tokio::spawn(connection);
    let left: bool = client
        .query_one("SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)", &[&schema])
        .await
        .expect("query")
        .get(0);
    assert!(!left, "the demo left schema {schema} behind");
    drop(client);
    let _ = connection.await;
}
