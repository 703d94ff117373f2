//! I1, I3, I4, I5: MemoryResource honours the Resource contract, checked by
//! the same conformance suite every implementation runs.

use bytes::Bytes;
use twopc_participant::conformance::{self, Harness};
use twopc_participant::{MemoryResource, TxnId};

struct MemoryHarness;

impl Harness for MemoryHarness {
    type Resource = MemoryResource;

    async fn create(&self) -> MemoryResource {
        MemoryResource::new()
    }

    async fn restart(&self, resource: MemoryResource) -> MemoryResource {
        let reopened = resource.restarted();
        drop(resource);
        reopened
    }

    fn yes_payload(&self, _txn: TxnId) -> Bytes {
        Bytes::from_static(b"credit 10")
    }

    fn no_payload(&self, _txn: TxnId) -> Bytes {
        Bytes::from_static(b"no:insufficient funds")
    }

    async fn applied_count(&self, resource: &MemoryResource, txn: TxnId) -> u64 {
        u64::from(resource.commit_count(txn))
    }

    fn keeps_payload_digests(&self) -> bool {
        true
    }
}

// I1, I3, I4, I5: every case of the suite passes against the in-memory resource.
#[tokio::test]
async fn memory_resource_passes_the_conformance_suite() {
    conformance::run_all(&MemoryHarness).await;
}
