//! Embedding twopc in your own service: an inventory that reserves stock on
//! Prepare and ships it on Commit.
//!
//! Run next to a cluster (see the README):
//! `cargo run -p twopc-participant --example inventory -- 127.0.0.1:7201 127.0.0.1:7001`
//! then `twopc participants register inventory 127.0.0.1:7201`.
//!
//! This example keeps its state in memory to stay short. A real resource must
//! make each YES vote durable (fsync) before returning it, and remember votes,
//! decisions and tombstones across restarts: see the `Resource` contract.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use twopc_participant::resource::{Resource, ResourceError};
use twopc_participant::{Participant, ParticipantConfig};
use twopc_proto::{Decision, TxnId, Vote};

#[derive(Default)]
struct Inventory {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    stock: HashMap<String, u32>,
    /// Reserved by prepared branches: txn -> (item, quantity).
    reserved: HashMap<TxnId, (String, u32)>,
    /// Votes and decisions already given, for idempotent answers.
    decided: HashMap<TxnId, Decision>,
    refused: HashMap<TxnId, String>,
}

impl Resource for Inventory {
    async fn prepare(&self, txn: TxnId, payload: Bytes) -> Result<Vote, ResourceError> {
        let mut s = self.state.lock();
        if s.reserved.contains_key(&txn) || s.decided.get(&txn) == Some(&Decision::Commit) {
            return Ok(Vote::Yes);
        }
        if let Some(reason) = s.refused.get(&txn) {
            return Ok(Vote::no(reason.clone()));
        }
        if s.decided.contains_key(&txn) {
            return Ok(Vote::no("aborted before prepare"));
        }
        // The payload is "ITEM QUANTITY", e.g. "widget 3".
        let text = String::from_utf8_lossy(&payload);
        let Some((item, quantity)) = text.split_once(' ').and_then(|(i, q)| Some((i.to_owned(), q.parse().ok()?)))
        else {
            s.refused.insert(txn, "payload is not \"ITEM QUANTITY\"".into());
            return Ok(Vote::no("payload is not \"ITEM QUANTITY\""));
        };
        let available = s.stock.get(&item).copied().unwrap_or(0);
        if available < quantity {
            let reason = format!("only {available} {item} in stock");
            s.refused.insert(txn, reason.clone());
            return Ok(Vote::no(reason));
        }
        s.stock.insert(item.clone(), available - quantity);
        s.reserved.insert(txn, (item, quantity));
        // A real service makes the reservation durable here, before voting YES.
        Ok(Vote::Yes)
    }

    async fn commit(&self, txn: TxnId) -> Result<(), ResourceError> {
        let mut s = self.state.lock();
        match s.decided.get(&txn) {
            Some(Decision::Commit) => return Ok(()),
            Some(Decision::Abort) => return Err(ResourceError::Conflict { recorded: Decision::Abort }),
            None => {}
        }
        if s.reserved.remove(&txn).is_none() {
            return Err(ResourceError::NotPrepared);
        }
        s.decided.insert(txn, Decision::Commit); // shipped: the reservation is consumed
        Ok(())
    }

    async fn abort(&self, txn: TxnId) -> Result<(), ResourceError> {
        let mut s = self.state.lock();
        if s.decided.get(&txn) == Some(&Decision::Commit) {
            return Err(ResourceError::Conflict { recorded: Decision::Commit });
        }
        if let Some((item, quantity)) = s.reserved.remove(&txn) {
            *s.stock.entry(item).or_default() += quantity; // the reservation goes back on the shelf
        }
        s.decided.insert(txn, Decision::Abort); // also the tombstone for a late Prepare
        Ok(())
    }

    async fn prepared(&self) -> Result<Vec<TxnId>, ResourceError> {
        Ok(self.state.lock().reserved.keys().copied().collect())
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen = args.next().unwrap_or_else(|| "127.0.0.1:7201".into());
    let coordinators: Vec<String> = args.collect();
    let inventory = Inventory::default();
    inventory.state.lock().stock.insert("widget".into(), 10);
    let config = ParticipantConfig::new("inventory".parse()?, coordinators);
    let participant = Participant::new(Arc::new(inventory), config)?;
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("inventory serving on {listen}");
    participant
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
