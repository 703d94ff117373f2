//! A client of the coordinator cluster for applications, tools and tests:
//! any node's address will do; it follows leader hints and retries what is
//! safe to retry (every call is idempotent by txn id, docs/PROTOCOL.md I5).

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::Rng as _;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use twopc_proto::pb::admin_client::AdminClient;
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::{MAX_MESSAGE_BYTES, status};

/// How a [`ClusterClient`] retries.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Give up retrying after this long. Default: 15000 ms.
    pub retry_budget_ms: u64,
    /// One attempt's timeout. Default: 10000 ms.
    pub attempt_timeout_ms: u64,
    /// Connect timeout per node. Default: 1000 ms.
    pub connect_timeout_ms: u64,
    /// Backoff between attempts, first step. Default: 20 ms.
    pub backoff_min_ms: u64,
    /// Backoff cap. Default: 500 ms.
    pub backoff_max_ms: u64,
    /// Mutual TLS to the nodes, each of which must prove it is a node of the
    /// cluster (`nodes.twopc`); `None` is plaintext. Default: None.
    pub tls: Option<twopc_proto::tls::Tls>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            retry_budget_ms: 15_000,
            attempt_timeout_ms: 10_000,
            connect_timeout_ms: 1_000,
            backoff_min_ms: 20,
            backoff_max_ms: 500,
            tls: None,
        }
    }
}

/// A leader-following client of a coordinator cluster. Cheap to clone:
/// clones share their connections and their idea of the leader.
#[derive(Clone)]
pub struct ClusterClient {
    inner: Arc<Inner>,
}

struct Inner {
    addrs: Vec<String>,
    config: ClientConfig,
    channels: Mutex<HashMap<String, Channel>>,
    /// Where the last call succeeded or the last hint pointed.
    preferred: Mutex<Option<String>>,
}

impl ClusterClient {
    /// A client of the cluster whose nodes (some or all) are at `addrs`
    /// (`host:port`). Connects lazily.
    ///
    /// # Errors
    /// `INVALID_ARGUMENT` when no address is given or one is malformed.
    pub fn new(addrs: Vec<String>, config: ClientConfig) -> Result<Self, Status> {
        if addrs.is_empty() {
            return Err(Status::invalid_argument(
                "no coordinator address: pass --coordinators HOST:PORT[,HOST:PORT...] or set TWOPC_COORDINATORS",
            ));
        }
        let inner = Inner { addrs, config, channels: Mutex::default(), preferred: Mutex::default() };
        for addr in &inner.addrs {
            inner.channel(addr)?;
        }
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Calls the client API, following leader hints and retrying retryable failures.
    ///
    /// # Errors
    /// The first non-retryable status, or the last one once the retry budget is spent.
    pub async fn coordinator<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(CoordinatorClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.inner
            .with_retries(|channel| {
                call(
                    CoordinatorClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                )
            })
            .await
    }

    /// Calls the admin API, following leader hints and retrying retryable failures.
    ///
    /// # Errors
    /// As [`ClusterClient::coordinator`].
    pub async fn admin<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(AdminClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        self.inner
            .with_retries(|channel| {
                call(
                    AdminClient::new(channel)
                        .max_decoding_message_size(MAX_MESSAGE_BYTES)
                        .max_encoding_message_size(MAX_MESSAGE_BYTES),
                )
            })
            .await
    }
}

impl Inner {
    fn channel(&self, addr: &str) -> Result<Channel, Status> {
        let mut channels = self.channels.lock();
        if let Some(channel) = channels.get(addr) {
            return Ok(channel.clone());
        }
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| Status::invalid_argument(format!("coordinator address {addr:?} is not host:port: {e}")))?;
        let endpoint =
            endpoint.connect_timeout(Duration::from_millis(self.config.connect_timeout_ms)).tcp_nodelay(true);
        let dial = match &self.config.tls {
            Some(tls) => {
                Some(tls.dial(twopc_proto::tls::ANY_NODE_DNS).map_err(|e| Status::invalid_argument(e.to_string()))?)
            }
            None => None,
        };
        let channel = twopc_proto::net::lazy_channel_with(&endpoint, dial);
        channels.insert(addr.to_owned(), channel.clone());
        Ok(channel)
    }

    async fn with_retries<T, F, Fut>(&self, call: F) -> Result<T, Status>
    where
        F: Fn(Channel) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(self.config.retry_budget_ms);
        let attempt_timeout = Duration::from_millis(self.config.attempt_timeout_ms);
        let mut next = 0usize;
        let mut attempts: u32 = 0;
        loop {
            let addr = self.preferred.lock().clone().unwrap_or_else(|| self.addrs[next % self.addrs.len()].clone());
            let result = match tokio::time::timeout(attempt_timeout, call(self.channel(&addr)?)).await {
                Ok(result) => result,
                Err(_) => Err(Status::deadline_exceeded(format!("no answer from {addr} within {attempt_timeout:?}"))),
            };
            let err = match result {
                Ok(response) => {
                    *self.preferred.lock() = Some(addr);
                    return Ok(response.into_inner());
                }
                Err(err) => err,
            };
            let retryable = status::is_retryable(&err) || err.code() == Code::Cancelled;
            if !retryable || tokio::time::Instant::now() >= deadline {
                return Err(err);
            }
            match status::leader_hint(&err) {
                Some(leader) if leader != addr => *self.preferred.lock() = Some(leader),
                _ => {
                    *self.preferred.lock() = None;
                    next += 1;
                }
            }
            attempts = attempts.saturating_add(1);
            // A full round of nodes failing means the cluster is between
            // leaders (or down): back off before the next round.
            if (attempts as usize).is_multiple_of(self.addrs.len()) {
                tokio::time::sleep(self.backoff(attempts / self.addrs.len() as u32)).await;
            }
        }
    }

    fn backoff(&self, rounds: u32) -> Duration {
        let ceiling = self.config.backoff_min_ms.saturating_mul(1 << rounds.min(16)).min(self.config.backoff_max_ms);
        Duration::from_millis(twopc_proto::host::with_rng(|rng| rng.random_range(ceiling / 2..=ceiling)))
    }
}
