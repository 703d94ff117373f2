//! The bank as a user meets it: real `twopc` processes (3 coordinators, 2
//! banks), driven through the command line.

// Amounts are written as units_cents (150_00 is 150.00).
#![allow(clippy::inconsistent_digit_grouping)]

mod processes;

use std::net::TcpListener;

use bytes::Bytes;
use processes::{Processes, stderr, stdout};
use twopc_bank::BranchPayload;
use twopc_proto::pb::coordinator_client::CoordinatorClient;
use twopc_proto::txn_id::unix_now_ms;
use twopc_proto::{TxnId, pb};

async fn seed(p: &Processes) {
    for (bank, account, balance) in [("bank-a", "alice", "100.00"), ("bank-b", "bob", "50.00")] {
        let out = p.twopc(&["accounts", bank, "--create", account, "--balance", balance]).await;
        assert!(out.status.success(), "creating {account}@{bank}: {}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfers_across_banks_commit_overdrafts_abort_and_money_is_conserved() {
    // I1 + I8 through the CLI: a committed transfer moves money at both
    // banks; an overdraft aborts with its reason; the total never changes.
    let p = Processes::start().await;
    seed(&p).await;
    let out = p.twopc(&["transfer", "--from", "alice@bank-a", "--to", "bob@bank-b", "--amount", "12.50"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(stdout(&out).contains("committed"), "{}", stdout(&out));

    let out = p.twopc(&["transfer", "--from", "bob@bank-b", "--to", "alice@bank-a", "--amount", "1000"]).await;
    assert_eq!(out.status.code(), Some(3), "an overdraft aborts with exit code 3");
    assert!(stderr(&out).contains("insufficient funds"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "one line: {}", stderr(&out));

    let settled =
        p.wait("decisions delivered", |p| async move { p.totals().await.filter(|(_, staged)| *staged == 0) }).await;
    assert_eq!(settled.0, 150_00, "the total is unchanged");
    assert_eq!(p.balance(0, "alice").await, Some(87_50));
    assert_eq!(p.balance(1, "bob").await, Some(62_50));
    let out = p.twopc(&["balance", "bob@bank-b", "--json"]).await;
    assert!(stdout(&out).contains("\"balance\": \"62.50\""), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bank_killed_after_voting_yes_settles_its_branch_after_restart() {
    // I4 + I7: a branch prepared (held) when its bank dies keeps its hold
    // through the crash and is settled after the restart, through the
    // cluster; nothing is released on a timer.
    let mut p = Processes::start().await;
    seed(&p).await;
    // A third participant that accepts connections and never answers keeps
    // the txn in its prepare phase after bank-a voted YES.
    let hole = TcpListener::bind("127.0.0.1:0").expect("a port");
    let hole_addr = hole.local_addr().expect("its address").to_string();
    let out = p.twopc(&["participants", "register", "bank-hole", &hole_addr]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let txn = TxnId::new();
    let debit = BranchPayload::debit("alice".parse().expect("name"), 30_00).expect("payload");
    let request = pb::SubmitRequest {
        txn_id: txn.to_string(),
        branches: vec![
            pb::Branch { participant: "bank-a".into(), payload: debit.encode() },
            pb::Branch { participant: "bank-hole".into(), payload: Bytes::from_static(b"x") },
        ],
        deadline_unix_ms: unix_now_ms() + 8_000,
    };
    let addrs = p.coordinator_addrs.clone();
    let submit = tokio::spawn(async move {
        let client = twopc_client::ClusterClient::new(addrs, Default::default()).expect("client");
        client
            .coordinator(|mut c: CoordinatorClient<_>| {
                let request = request.clone();
                async move { c.submit(request).await }
            })
            .await
    });
    p.wait("bank-a to hold the debit", |p| async move {
        let t = p.bank(0).await?.total(pb::TotalRequest {}).await.ok()?.into_inner();
        (t.held_total_minor == 30_00).then_some(())
    })
    .await;
    p.banks[0].kill().await;
    let outcome = submit.await.expect("submit task").expect("the cluster answers");
    assert_eq!(outcome.decision, pb::Decision::Abort as i32, "bank-hole never voted");
    p.banks[0].restart();
    let settled = p
        .wait("bank-a's branch to be settled after restart", |p| async move {
            p.totals().await.filter(|(_, staged)| *staged == 0)
        })
        .await;
    assert_eq!(settled.0, 150_00, "the total is unchanged");
    assert_eq!(p.balance(0, "alice").await, Some(100_00), "the aborted debit was released, not applied");
    drop(hole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_transfers_fail_with_one_line_and_move_no_money() {
    // I8 at the edge: every refused transfer is refused whole, with one line
    // saying why and a non-zero exit code.
    let p = Processes::start().await;
    seed(&p).await;
    let closed = TcpListener::bind("127.0.0.1:0").expect("a port").local_addr().expect("addr").to_string();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("unknown account", vec!["--from", "zed@bank-a", "--to", "bob@bank-b", "--amount", "1"]),
        ("zero amount", vec!["--from", "alice@bank-a", "--to", "bob@bank-b", "--amount", "0"]),
        ("negative amount", vec!["--from", "alice@bank-a", "--to", "bob@bank-b", "--amount", "-5"]),
        ("too many decimals", vec!["--from", "alice@bank-a", "--to", "bob@bank-b", "--amount", "1.005"]),
        ("same account", vec!["--from", "alice@bank-a", "--to", "alice@bank-a", "--amount", "1"]),
        (
            "unreachable cluster",
            vec!["--from", "alice@bank-a", "--to", "bob@bank-b", "--amount", "1", "--coordinators", &closed],
        ),
    ];
    for (what, args) in cases {
        let mut full = vec!["transfer"];
        full.extend(args);
        let out = p.twopc(&full).await;
        assert_ne!(out.status.code(), Some(0), "{what}: must fail");
        let err = stderr(&out);
        assert_eq!(err.trim().lines().count(), 1, "{what}: one line, got {err:?}");
        assert!(err.starts_with("error: "), "{what}: {err}");
        // A refused transfer may have held money at the other bank until its
        // Abort arrives (phase 2 runs after the client's answer): wait for
        // the holds to go, then check nothing moved (I4, I8).
        let totals =
            p.wait("every hold released", |p| async move { p.totals().await.filter(|(_, staged)| *staged == 0) }).await;
        assert_eq!(totals, (150_00, 0), "{what}: no money moved");
        assert_eq!(p.balance(0, "alice").await, Some(100_00), "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_over_mutual_tls_moves_money_and_answers_no_plaintext_client() {
    // The first test's transfers, with every process and command over mutual
    // TLS (certificates from `twopc certs init`); a command without them gets
    // no answer, and exits 1 with one line.
    let p = Processes::start_tls().await;
    seed(&p).await;
    let out = p.twopc(&["transfer", "--from", "alice@bank-a", "--to", "bob@bank-b", "--amount", "12.50"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let settled =
        p.wait("decisions delivered", |p| async move { p.totals().await.filter(|(_, staged)| *staged == 0) }).await;
    assert_eq!(settled.0, 150_00, "the total is unchanged");
    assert_eq!(p.balance(1, "bob").await, Some(62_50));

    let out = p.twopc_plaintext(&["cluster", "status"]).await;
    assert_eq!(out.status.code(), Some(1), "a plaintext command must fail: {}", stdout(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "one line: {}", stderr(&out));

    let tls_dir = p.tls_dir.clone().expect("a TLS cluster");
    let out = p.twopc(&["certs", "show", &tls_dir.join("participant-bank-a.pem").display().to_string()]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("participant:bank-a"), "{}", stdout(&out));
    assert!(stdout(&out).contains("URI:spiffe://twopc/participant/bank-a"), "{}", stdout(&out));
}

#[tokio::test]
async fn a_server_refuses_plaintext_on_an_address_other_than_loopback() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("c1").display().to_string();
    let run = |extra: &[&str]| {
        let mut command = std::process::Command::new(processes::TWOPC);
        command.args(["coordinator", "--id", "1", "--peers", "1=0.0.0.0:0", "--data-dir", &data]).args(extra);
        command.env_remove("TWOPC_TLS_DIR").output().expect("run twopc")
    };
    let out = run(&[]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("refusing to serve the coordinator in plaintext on 0.0.0.0:0"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "one line: {}", stderr(&out));
}

#[test]
fn a_bank_refuses_to_send_events_in_plaintext_off_this_machine_or_with_a_missing_tls_file_or_seed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("bank").display().to_string();
    let run = |extra: &[&str]| {
        let mut command = std::process::Command::new(processes::TWOPC);
        let bank = ["bank", "--name", "bank-a", "--listen", "127.0.0.1:0", "--coordinators", "127.0.0.1:1"];
        command.args(bank).args(["--data-dir", &data]).args(extra);
        command.env_remove("TWOPC_TLS_DIR");
        for name in processes::NATS_ENV.iter().filter(|name| **name != "TWOPC_NATS_URL") {
            command.env_remove(name);
        }
        command.output().expect("run twopc")
    };
    let out = run(&["--events-nats", "nats://10.1.2.3:4222"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("refusing to send events in plaintext to NATS"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "one line: {}", stderr(&out));
    let missing = dir.path().join("no-such-ca.pem").display().to_string();
    let out = run(&["--events-nats", "tls://nats.internal:4222", "--nats-ca", &missing]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("no-such-ca.pem"), "{}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "one line: {}", stderr(&out));
    let not_a_seed = dir.path().join("bank.nk");
    std::fs::write(&not_a_seed, "s3cret-password\n").expect("write");
    let out = run(&["--events-nats", "nats://127.0.0.1:4222", "--nats-nkey", &not_a_seed.display().to_string()]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("bank.nk: it does not hold a user seed"), "{}", stderr(&out));
    assert!(!stderr(&out).contains("s3cret"), "the file's content is never shown: {}", stderr(&out));
    assert_eq!(stderr(&out).trim().lines().count(), 1, "one line: {}", stderr(&out));
}

#[test]
fn certs_init_refuses_an_empty_request_and_a_bad_name_with_one_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = dir.path().join("tls").display().to_string();
    for extra in [&[][..], &["--participants", "Bank A"][..]] {
        let out = std::process::Command::new(processes::TWOPC)
            .args(["certs", "init", "--dir", &certs])
            .args(extra)
            .output()
            .expect("run twopc");
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {}", stderr(&out));
        assert_eq!(stderr(&out).trim().lines().count(), 1, "one line: {}", stderr(&out));
    }
    assert!(!dir.path().join("tls").join("ca.key").exists(), "nothing is written for a refused request");
}

#[test]
fn certs_init_add_issues_from_the_existing_ca() {
    let dir = tempfile::tempdir().expect("temp dir");
    let certs = dir.path().join("tls");
    let run = |args: &[&str]| {
        std::process::Command::new(processes::TWOPC)
            .args(["certs", "init", "--dir", &certs.display().to_string()])
            .args(args)
            .output()
            .expect("run twopc")
    };
    let out = run(&["--nodes", "3"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ca = std::fs::read(certs.join("ca.pem")).expect("ca.pem");
    let out = run(&["--add", "--node-ids", "4", "--participants", "bank-c"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(certs.join("ca.pem")).expect("ca.pem"), ca, "--add keeps the CA");
    let node4 = twopc_proto::tls::TlsConfig::new(&certs).load(&twopc_proto::tls::Identity::node(4));
    assert!(node4.is_ok(), "node 4's files load against the CA: {node4:?}");
    let bank_c = twopc_proto::tls::TlsConfig::new(&certs).load(&twopc_proto::tls::Identity::participant("bank-c"));
    assert!(bank_c.is_ok(), "{bank_c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_reissued_certificates_and_transfers_go_on() {
    let p = Processes::start_tls().await;
    seed(&p).await;
    let tls_dir = p.tls_dir.clone().expect("a TLS cluster").display().to_string();
    let out = p
        .twopc(&[
            "certs",
            "init",
            "--dir",
            &tls_dir,
            "--add",
            "--nodes",
            "3",
            "--participants",
            "bank-a,bank-b",
            "--client",
            "--admin",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let logs = ["c1.log", "c2.log", "c3.log", "bank-a.log", "bank-b.log"].map(|l| p.dir.path().join(l));
    for proc in p.coordinators.iter().chain(&p.banks) {
        let pid = proc.pid().expect("running").to_string();
        let status = tokio::process::Command::new("kill").args(["-HUP", &pid]).status().await.expect("kill");
        assert!(status.success());
    }
    p.wait("every process to reload", |_| {
        let logs = logs.clone();
        async move {
            logs.iter()
                .all(|l| std::fs::read_to_string(l).is_ok_and(|t| t.contains("TLS files reloaded")))
                .then_some(())
        }
    })
    .await;
    let out = p.twopc(&["transfer", "--from", "alice@bank-a", "--to", "bob@bank-b", "--amount", "1.00"]).await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}
