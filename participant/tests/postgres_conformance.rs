//! I1, I3, I4, I5: PostgresResource honours the Resource contract against a
//! real PostgreSQL server, checked by the same conformance suite as every
//! implementation; "restart" drops the pool and opens the schema again.
//! Skipped (with the reason printed) where no server allows prepared
//! transactions, unless TWOPC_REQUIRE_POSTGRES=1.

#![cfg(feature = "postgres")]

mod postgres_common;

use bytes::Bytes;
use parking_lot::Mutex;
use postgres_common::Counting;
use twopc_participant::conformance::{self, Harness};
use twopc_participant::postgres::PostgresConfig;
use twopc_participant::postgres_testing::{self, Cleanup, TestDatabase};
use twopc_participant::{ParticipantId, TxnId};

struct PgHarness {
    db: TestDatabase,
    participant: ParticipantId,
    schemas: Mutex<Vec<String>>,
    cleanup: Cleanup,
}

impl Harness for PgHarness {
    type Resource = Counting;

    async fn create(&self) -> Counting {
        let schema = postgres_testing::unique_name("twopc_conf");
        self.schemas.lock().push(schema.clone());
        self.cleanup.schema(&schema, &format!("twopc:{}:", self.participant));
        postgres_common::open(&self.participant, PostgresConfig::new(&self.db.url, schema)).await
    }

    async fn restart(&self, resource: Counting) -> Counting {
        let config = resource.config().clone();
        drop(resource);
        postgres_common::open(&self.participant, config).await
    }

    fn yes_payload(&self, _txn: TxnId) -> Bytes {
        Bytes::from_static(b"effect")
    }

    fn no_payload(&self, _txn: TxnId) -> Bytes {
        Bytes::from_static(b"no:insufficient funds")
    }

    async fn applied_count(&self, resource: &Counting, txn: TxnId) -> u64 {
        postgres_common::effects(resource, txn).await
    }

    fn keeps_payload_digests(&self) -> bool {
        true
    }
}

// I1, I3, I4, I5: every case of the suite passes against PostgreSQL, across
// reopen; and every reservation taken was settled exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_resource_passes_the_conformance_suite() {
    let Some(db) = postgres_testing::database("postgres_resource_passes_the_conformance_suite").await else {
        return;
    };
    let participant: ParticipantId = postgres_testing::unique_name("conf").parse().expect("participant id");
    let cleanup = Cleanup::new(&db.url);
    let harness = PgHarness { db: db.clone(), participant: participant.clone(), schemas: Mutex::default(), cleanup };
    conformance::run_all(&harness).await;
    let schemas = harness.schemas.lock().clone();
    for schema in &schemas {
        let config = PostgresConfig::new(&db.url, schema.clone());
        let resource = postgres_common::open(&participant, config).await;
        assert_eq!(postgres_common::reservations(&resource).await, 0, "{schema}: a reservation was never settled");
    }
}
