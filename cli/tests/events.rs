//! Events that commit with the transaction (docs/PROTOCOL.md §14), end to
//! end: real `twopc` processes (3 coordinators, 2 banks with events on)
//! and the real NATS server (`TWOPC_NATS_URL`, default
//! nats://127.0.0.1:4222), reached through a proxy the test can cut.
//!
//! Each test checks the stream exactly: one event per branch of every
//! committed transfer (and per account opened), none of an aborted one,
//! whatever was killed or unreachable on the way. "Nothing more arrives" is
//! shown with a fence: a transfer committed last, whose events the relay
//! publishes after everything committed before it at that bank.

// Amounts are written as units_cents (150_00 is 150.00).
#![allow(clippy::inconsistent_digit_grouping)]

mod processes;

use std::collections::BTreeMap;
use std::time::Duration;

use processes::{Processes, stderr, stdout};
use prost::Message as _;
use twopc_participant::nats_testing::{self, NatsProxy, TestNats};
use twopc_proto::pb::{self, bank_event};
use twopc_tests::metric;

struct EventCluster {
    p: Processes,
    nats: TestNats,
    proxy: NatsProxy,
    stream: String,
}

impl EventCluster {
    /// The cluster with events on, the banks' NATS through a proxy, and
    /// accounts alice@bank-a (100.00) and bob@bank-b (50.00) whose opening
    /// events are in the stream.
    async fn start(test: &str, outbox_max: u64) -> Option<Self> {
        Self::start_with(test, outbox_max, Vec::new()).await
    }

    /// As [`EventCluster::start`], with `bank_b_args` added to bank-b.
    async fn start_with(test: &str, outbox_max: u64, bank_b_args: Vec<String>) -> Option<Self> {
        let nats = nats_testing::server(test).await?;
        let proxy = NatsProxy::start(&nats.url).await;
        let stream = nats_testing::unique_name("TEST");
        let prefix = nats_testing::unique_name("t");
        let args = [
            "--events-nats",
            &proxy.url,
            "--events-stream",
            &stream,
            "--events-prefix",
            &prefix,
            "--outbox-max",
            &outbox_max.to_string(),
        ];
        let p = Processes::start_opts(args.iter().map(|a| (*a).to_owned()).collect(), bank_b_args, false).await;
        for (bank, account, balance) in [("bank-a", "alice", "100.00"), ("bank-b", "bob", "50.00")] {
            let out = p.twopc(&["accounts", bank, "--create", account, "--balance", balance]).await;
            assert!(out.status.success(), "creating {account}@{bank}: {}", stderr(&out));
        }
        let cluster = Self { p, nats, proxy, stream };
        cluster.events(2).await;
        Some(cluster)
    }

    /// Transfers `amount` and returns (exit code, txn id).
    async fn transfer(&self, from: &str, to: &str, amount: &str) -> (Option<i32>, String) {
        let out = self.p.twopc(&["transfer", "--from", from, "--to", to, "--amount", amount]).await;
        let text = format!("{}{}", stdout(&out), stderr(&out));
        let txn = text.split("(txn ").nth(1).and_then(|rest| rest.split([')', ';']).next()).unwrap_or_default();
        (out.status.code(), txn.trim().to_owned())
    }

    /// Every event in the stream, once it holds at least `n`, keyed by id,
    /// checking that no id appears twice.
    async fn events(&self, n: u64) -> BTreeMap<String, pb::BankEvent> {
        let messages = self.nats.messages(&self.stream, n, Duration::from_secs(30)).await;
        let mut events = BTreeMap::new();
        for (msg_id, _, payload) in messages {
            let event = pb::BankEvent::decode(payload).expect("a BankEvent");
            assert_eq!(event.id, msg_id, "the Nats-Msg-Id is the event's id");
            assert!(events.insert(msg_id.clone(), event).is_none(), "event {msg_id} is in the stream twice");
        }
        events
    }

    /// Commits a fence transfer, waits for its events (so everything committed
    /// before it has been published), and returns every event.
    async fn fenced_events(&self, expected_before: u64) -> BTreeMap<String, pb::BankEvent> {
        // A bank just restarted may refuse the first tries (an aborted fence
        // publishes nothing), so try until one commits.
        let give_up = tokio::time::Instant::now() + Duration::from_secs(30);
        let fence = loop {
            let (code, fence) = self.transfer("alice@bank-a", "bob@bank-b", "0.01").await;
            if code == Some(0) {
                break fence;
            }
            assert!(tokio::time::Instant::now() < give_up, "no fence transfer committed in 30 s (last: {code:?})");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let events = self.events(expected_before + 2).await;
        assert!(events.contains_key(&format!("{fence}:bank-a:0")), "the fence's events arrived");
        events
    }
}

/// A loopback address no one listens on, for a bank's `--metrics-listen`.
fn free_loopback_addr() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    listener.local_addr().expect("its address").to_string()
}

/// The body of `GET /metrics` at `addr`; None while it does not answer.
async fn scrape(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut socket = tokio::net::TcpStream::connect(addr).await.ok()?;
    socket.write_all(b"GET /metrics HTTP/1.1\r\nhost: bank\r\n\r\n").await.ok()?;
    let mut response = String::new();
    socket.read_to_string(&mut response).await.ok()?;
    response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned())
}

/// The txn ids with events, and how many each has.
fn per_txn(events: &BTreeMap<String, pb::BankEvent>) -> BTreeMap<String, usize> {
    let mut txns = BTreeMap::new();
    for event in events.values() {
        let txn = match &event.event {
            Some(bank_event::Event::Debited(d)) => d.txn_id.clone(),
            Some(bank_event::Event::Credited(c)) => c.txn_id.clone(),
            _ => continue,
        };
        *txns.entry(txn).or_insert(0) += 1;
    }
    txns
}

fn assert_each_committed_has_both_branches(events: &BTreeMap<String, pb::BankEvent>, committed: &[String]) {
    let txns = per_txn(events);
    for txn in committed {
        assert_eq!(txns.get(txn), Some(&2), "committed txn {txn}: one event per branch");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_transfer_publishes_one_event_per_branch_and_an_aborted_one_none() {
    let Some(c) =
        EventCluster::start("a_committed_transfer_publishes_one_event_per_branch_and_an_aborted_one_none", 1000).await
    else {
        return;
    };
    let mut committed = Vec::new();
    for _ in 0..3 {
        let (code, txn) = c.transfer("alice@bank-a", "bob@bank-b", "10.00").await;
        assert_eq!(code, Some(0));
        committed.push(txn);
    }
    let (code, aborted) = c.transfer("bob@bank-b", "alice@bank-a", "1000").await;
    assert_eq!(code, Some(3), "an overdraft aborts");
    let events = c.fenced_events(2 + 6).await;
    assert_eq!(events.len(), 2 + 6 + 2, "two openings, three transfers, the fence: {events:?}");
    assert_each_committed_has_both_branches(&events, &committed);
    assert!(!per_txn(&events).contains_key(&aborted), "the aborted transfer published nothing");
    let debit = events.get(&format!("{}:bank-a:0", committed[0])).expect("the first debit");
    match &debit.event {
        Some(bank_event::Event::Debited(d)) => {
            assert_eq!((d.bank.as_str(), d.account.as_str(), d.amount_minor), ("bank-a", "alice", 10_00));
        }
        other => panic!("expected TransferDebited, got {other:?}"),
    }
    c.nats.delete_stream(&c.stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_killed_after_commit_before_publishing_publishes_once_after_restart() {
    let Some(mut c) =
        EventCluster::start("a_bank_killed_after_commit_before_publishing_publishes_once_after_restart", 1000).await
    else {
        return;
    };
    c.proxy.cut();
    let (code, txn) = c.transfer("alice@bank-a", "bob@bank-b", "10.00").await;
    assert_eq!(code, Some(0));
    // Both banks have applied the Commit (so its events are ready, not sent).
    c.p.wait("both branches applied", |p| async move {
        (p.balance(0, "alice").await == Some(90_00) && p.balance(1, "bob").await == Some(60_00)).then_some(())
    })
    .await;
    for bank in &mut c.p.banks {
        bank.kill().await;
    }
    c.proxy.restore();
    for bank in &mut c.p.banks {
        bank.restart();
    }
    let events = c.fenced_events(2 + 2).await;
    assert_eq!(events.len(), 2 + 2 + 2, "{events:?}");
    assert_each_committed_has_both_branches(&events, &[txn]);
    c.nats.delete_stream(&c.stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_unreachable_delays_events_and_past_the_bound_the_banks_refuse() {
    let outbox_max = 5;
    let metrics = free_loopback_addr();
    let bank_b_args = vec!["--metrics-listen".to_owned(), metrics.clone()];
    let test = "nats_unreachable_delays_events_and_past_the_bound_the_banks_refuse";
    let Some(c) = EventCluster::start_with(test, outbox_max, bank_b_args).await else {
        return;
    };
    c.proxy.cut();
    let mut committed = Vec::new();
    let refused = loop {
        let out = c.p.twopc(&["transfer", "--from", "alice@bank-a", "--to", "bob@bank-b", "--amount", "1.00"]).await;
        match out.status.code() {
            Some(0) => {
                let text = stdout(&out);
                committed.push(text.split("(txn ").nth(1).and_then(|r| r.split(')').next()).unwrap_or("").to_owned());
            }
            Some(3) => break stderr(&out),
            other => panic!("transfer exited {other:?}: {}", stderr(&out)),
        }
        assert!(committed.len() <= outbox_max as usize, "the outbox bound was never reached");
    };
    // Each bank holds one waiting event per committed transfer: the bound
    // is reached after outbox_max of them, and never before.
    assert_eq!(committed.len(), outbox_max as usize, "transfers stay available up to the bound");
    assert!(refused.contains("event outbox full"), "the reason names the outbox: {refused}");
    // bank-b's /metrics says its relay is failing, with the bound's worth waiting.
    c.p.wait("bank-b's metrics to show the relay failing", |_| async {
        let text = scrape(&metrics).await?;
        let failing = metric(&text, "twopc_outbox_healthy") == Some(0);
        (failing && metric(&text, "twopc_outbox_failures_total")? > 0).then_some(())
    })
    .await;
    c.p.wait("bank-b's metrics to show the waiting events", |_| async {
        (metric(&scrape(&metrics).await?, "twopc_outbox_waiting")? == outbox_max).then_some(())
    })
    .await;
    c.proxy.restore();
    // Everything waiting goes out before the fence can be taken.
    c.events(2 + 2 * outbox_max).await;
    let events = c.fenced_events(2 + 2 * outbox_max).await;
    assert_eq!(events.len() as u64, 2 + 2 * outbox_max + 2, "{events:?}");
    assert_each_committed_has_both_branches(&events, &committed);
    // Then healthy again, bob's opening, each credit and the fence's each
    // acknowledged: as new, or as a repeat when the cut lost its first PubAck.
    let events_at_b = outbox_max + 2;
    let acked = |text: &str| {
        Some(metric(text, "twopc_outbox_published_total")? + metric(text, "twopc_outbox_duplicates_total")?)
    };
    let text =
        c.p.wait("bank-b's metrics to show every event published", |_| async {
            let text = scrape(&metrics).await?;
            (acked(&text)? >= events_at_b).then_some(text)
        })
        .await;
    assert!(metric(&text, "twopc_outbox_published_total") <= Some(events_at_b), "{text}");
    assert_eq!(metric(&text, "twopc_outbox_healthy"), Some(1), "{text}");
    assert_eq!(metric(&text, "twopc_bank_commits_total"), Some(outbox_max + 1), "{text}");
    assert_eq!(metric(&text, "twopc_bank_in_doubt"), Some(0), "{text}");
    c.p.wait("bank-b's metrics to show nothing waiting", |_| async {
        (metric(&scrape(&metrics).await?, "twopc_outbox_waiting")? == 0).then_some(())
    })
    .await;
    c.nats.delete_stream(&c.stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_bank_publishes_what_its_prepared_transactions_committed() {
    let test = "the_postgres_bank_publishes_what_its_prepared_transactions_committed";
    let Some(db) = twopc_participant::postgres_testing::database(test).await else { return };
    let schema = twopc_participant::postgres_testing::unique_name("twopc_ev");
    let cleanup = twopc_participant::postgres_testing::Cleanup::new(&db.url);
    cleanup.schema(&schema, "twopc:bank-b:");
    let pg = vec!["--store".to_owned(), db.url.clone(), "--pg-schema".to_owned(), schema];
    let Some(mut c) = EventCluster::start_with(test, 1000, pg).await else { return };
    c.proxy.cut();
    let mut committed = Vec::new();
    for _ in 0..2 {
        let (code, txn) = c.transfer("alice@bank-a", "bob@bank-b", "10.00").await;
        assert_eq!(code, Some(0));
        committed.push(txn);
    }
    let (code, aborted) = c.transfer("bob@bank-b", "alice@bank-a", "1000").await;
    assert_eq!(code, Some(3), "an overdraft at the PostgreSQL bank aborts");
    let (code, aborted_here) = c.transfer("alice@bank-a", "bob@bank-b", "1000").await;
    assert_eq!(code, Some(3), "an overdraft at bank-a aborts; bank-b's credit was prepared, then rolled back");
    c.p.wait("both banks applied the commits", |p| async move {
        (p.balance(0, "alice").await == Some(80_00) && p.balance(1, "bob").await == Some(70_00)).then_some(())
    })
    .await;
    // Committed in PostgreSQL, not published: killed, then back with NATS.
    c.p.banks[1].kill().await;
    c.proxy.restore();
    c.p.banks[1].restart();
    let events = c.fenced_events(2 + 4).await;
    assert_eq!(events.len(), 2 + 4 + 2, "{events:?}");
    assert_each_committed_has_both_branches(&events, &committed);
    for txn in [&aborted, &aborted_here] {
        assert!(!per_txn(&events).contains_key(txn), "aborted txn {txn} published nothing");
    }
    c.nats.delete_stream(&c.stream).await;
    drop(cleanup);
}

// `bench --local --events` against a NATS server of the test's own that
// requires TLS, a client certificate and a token, all given to the bench:
// its banks get them through their environment (their relays create the
// run's stream), and the bench's own connection deletes that stream at the
// end. Had either gone without them, the stream would be missing at the
// end and the bench would warn that it could not delete it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_bench_passes_nats_tls_and_credentials_to_its_banks() {
    const TEST: &str = "a_local_bench_passes_nats_tls_and_credentials_to_its_banks";
    use twopc_participant::nats_testing::{SecureNats, ServerAuth, ServerTlsFiles};
    let dir = tempfile::tempdir().expect("tempdir");
    let (files, (cert, key)) = ServerTlsFiles::write_with_client(dir.path());
    let Some(server) = SecureNats::start(TEST, dir.path(), &files, ServerAuth::Token("s3cret")).await else { return };
    let path = |p: &std::path::Path| p.display().to_string();
    let mut command = tokio::process::Command::new(processes::TWOPC);
    command
        .args(["bench", "--local", "--events", "-c", "2", "-d", "2", "--warmup", "0", "--nats", &server.url])
        .args(["--nats-ca", &path(&files.ca), "--nats-cert", &path(&cert), "--nats-key", &path(&key)])
        .args(["--nats-token", "s3cret"]);
    for name in processes::NATS_ENV {
        command.env_remove(name);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .expect("the bench ends within 120 s")
        .expect("run twopc bench");
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout(&out), stderr(&out));
    assert!(stdout(&out).contains("events to NATS"), "{}", stdout(&out));
    assert!(!stderr(&out).contains("could not delete"), "{}", stderr(&out));
}
