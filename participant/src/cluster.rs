//! The coordinator cluster as the participant calls it: the configured
//! nodes, a cached guess at the leader, and lazily dialled channels (over
//! TLS when configured). The resolver asks it for decisions (Resolve) and
//! the joiner logs branches into begun txns with it (Join).
//!
//! One round asks the believed leader first, then every configured node,
//! following each leader hint as soon as it is given (even to an address not
//! configured, at most [`HINTS_PER_ROUND_MAX`] per round). Callers pace the
//! rounds. Bounded (I6): at most [`CHANNEL_CACHE_MAX`] channels are cached.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng as _;
use tonic::Status;
use tonic::transport::{Channel, Endpoint};
use tracing::debug;
use twopc_proto::MAX_MESSAGE_BYTES;
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::status::leader_hint;

use crate::config::{ParticipantConfig, endpoint_uri};

/// The most coordinator channels kept; past it the cache starts afresh.
pub const CHANNEL_CACHE_MAX: usize = 64;

/// How many leader hints one round may follow beyond the configured nodes,
/// so nodes pointing at each other cannot keep a round going for ever.
pub const HINTS_PER_ROUND_MAX: usize = 4;

/// How a round ended without an answer.
#[derive(Debug)]
pub(crate) enum NoAnswer {
    /// A node gave an answer any node would give (the caller's `is_final`
    /// said so): the round stopped there.
    Final(Status),
    /// Every node tried failed in a way another attempt may not; the last
    /// failure, if any node was tried.
    Exhausted(Option<Status>),
}

/// The coordinator nodes, a cached guess at the leader, and lazy channels.
pub(crate) struct Cluster {
    /// This participant's name, sent with every call.
    pub(crate) participant: String,
    nodes: Vec<String>,
    connect_timeout: Duration,
    request_timeout: Duration,
    leader: Mutex<Option<String>>,
    channels: Mutex<HashMap<String, Channel>>,
    tls: Option<twopc_proto::tls::Tls>,
}

impl Cluster {
    pub(crate) fn new(config: &ParticipantConfig) -> Self {
        Self {
            participant: config.id.to_string(),
            nodes: config.coordinators.clone(),
            connect_timeout: Duration::from_millis(config.connect_timeout_ms),
            request_timeout: Duration::from_millis(config.resolve_timeout_ms),
            leader: Mutex::new(None),
            channels: Mutex::new(HashMap::new()),
            tls: config.tls.clone(),
        }
    }

    /// The longest one call may take (`resolve_timeout_ms`).
    pub(crate) fn request_timeout(&self) -> Duration {
        self.request_timeout
    }

    /// One pass over the cluster: `call` is made at the believed leader
    /// first, then at every configured node, each hint followed as soon as
    /// it is given, until a node answers or fails with a status `is_final`
    /// accepts as the cluster's answer.
    pub(crate) async fn round<T, F, Fut>(&self, is_final: impl Fn(&Status) -> bool, call: F) -> Result<T, NoAnswer>
    where
        F: Fn(CoordinatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let leader = self.leader.lock().clone();
        let mut queue: VecDeque<String> = leader.into_iter().chain(self.nodes.clone()).collect();
        let mut tried = HashSet::new();
        let mut hints_followed = 0;
        let mut last = None;
        while let Some(addr) = queue.pop_front() {
            if !tried.insert(addr.clone()) {
                continue;
            }
            let result = match self.channel(&addr) {
                Ok(channel) => {
                    let client = CoordinatorClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES);
                    call(client).await
                }
                Err(status) => Err(status),
            };
            let status = match result {
                Ok(answer) => {
                    *self.leader.lock() = Some(addr);
                    return Ok(answer);
                }
                Err(status) if is_final(&status) => {
                    *self.leader.lock() = Some(addr);
                    return Err(NoAnswer::Final(status));
                }
                Err(status) => status,
            };
            self.forget_leader(&addr);
            let hint = leader_hint(&status).filter(|h| !tried.contains(h));
            debug!(%addr, code = ?status.code(), message = status.message(), ?hint, "coordinator call failed");
            if let Some(hint) = hint
                && hints_followed < HINTS_PER_ROUND_MAX
            {
                hints_followed += 1;
                queue.push_front(hint);
            }
            last = Some(status);
        }
        Err(NoAnswer::Exhausted(last))
    }

    /// How many nodes a round starts with (for the logs).
    pub(crate) fn node_count(&self) -> usize {
        self.nodes.len()
    }

    fn forget_leader(&self, addr: &str) {
        let mut leader = self.leader.lock();
        if leader.as_deref() == Some(addr) {
            *leader = None;
        }
    }

    /// A lazily connecting channel to `addr`; nothing is dialled until a call.
    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let uri = endpoint_uri(addr).map_err(Status::invalid_argument)?;
        let endpoint = Endpoint::from_shared(uri)
            .map_err(|e| Status::invalid_argument(format!("{addr}: {e}")))?
            .connect_timeout(self.connect_timeout)
            .timeout(self.request_timeout);
        let dial = match &self.tls {
            Some(tls) => {
                Some(tls.dial(twopc_proto::tls::ANY_NODE_DNS).map_err(|e| Status::invalid_argument(e.to_string()))?)
            }
            None => None,
        };
        let channel = twopc_proto::net::lazy_channel_with(&endpoint, dial);
        if channels.len() >= CHANNEL_CACHE_MAX {
            channels.clear();
        }
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }
}

/// Capped exponential backoff with jitter: each pause is drawn from the upper
/// half of the current step, and the step doubles up to the cap.
pub(crate) struct Backoff {
    min_ms: u64,
    max_ms: u64,
    step_ms: u64,
}

impl Backoff {
    pub(crate) fn new(min_ms: u64, max_ms: u64) -> Self {
        assert!(min_ms <= max_ms, "validated by ParticipantConfig::validate");
        Self { min_ms, max_ms, step_ms: min_ms }
    }

    pub(crate) fn next(&mut self) -> Duration {
        let low = (self.step_ms / 2).max(self.min_ms);
        let pause_ms = twopc_proto::host::with_rng(|rng| rng.random_range(low..=self.step_ms.max(low)));
        self.step_ms = self.step_ms.saturating_mul(2).min(self.max_ms);
        Duration::from_millis(pause_ms)
    }

    /// Starts again from the first step: the cluster answered.
    pub(crate) fn reset(&mut self) {
        self.step_ms = self.min_ms;
    }

    /// The longest pause it gives.
    pub(crate) fn cap(&self) -> Duration {
        Duration::from_millis(self.max_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // I7 (liveness) and I6 (bounded retry): pauses stay within [min, max] and grow to the cap.
    #[test]
    fn backoff_grows_to_the_cap_and_stays_within_bounds() {
        let mut backoff = Backoff::new(10, 200);
        let pauses: Vec<u64> = (0..20).map(|_| u64::try_from(backoff.next().as_millis()).unwrap_or(u64::MAX)).collect();
        assert!(pauses.iter().all(|p| (10..=200).contains(p)), "{pauses:?}");
        assert!(pauses[..2].iter().all(|p| *p <= 20), "{pauses:?}");
        assert!(pauses[10..].iter().all(|p| *p >= 100), "{pauses:?}");
    }

    #[test]
    fn backoff_with_equal_bounds_is_constant() {
        let mut backoff = Backoff::new(50, 50);
        assert!((0..5).all(|_| backoff.next() == Duration::from_millis(50)));
    }

    #[test]
    fn a_reset_backoff_starts_from_the_first_step() {
        let mut backoff = Backoff::new(10, 10_000);
        for _ in 0..10 {
            backoff.next();
        }
        backoff.reset();
        assert!(backoff.next() <= Duration::from_millis(10));
    }
}
