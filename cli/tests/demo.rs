//! I8 over mutual TLS (issue 15, docs/SECURITY.md): `twopc demo --tls
//! --chaos` issues a CA and certificates for its 3 coordinators and 2 banks,
//! runs every conversation on mutual TLS, SIGKILLs the coordinator leader and
//! a bank holding prepared branches mid-run, and still conserves money with
//! every transfer decided. With `--events` (issue 18, docs/PROTOCOL.md §14)
//! the view built from the event stream alone ends equal to the banks.

mod processes;

use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chaos_demo_over_mutual_tls_conserves_money() {
    let stdout =
        processes::demo(&["--tls", "--chaos", "--transfers", "400", "--concurrency", "8"], Duration::from_secs(240))
            .await;
    assert!(stdout.contains("on mutual TLS"), "the demo did not run on TLS:\n{stdout}");
    assert!(stdout.contains("SIGKILL"), "nothing was killed:\n{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_chaos_demo_with_events_the_view_equals_the_banks() {
    let test = "after_the_chaos_demo_with_events_the_view_equals_the_banks";
    let Some(nats) = twopc_participant::nats_testing::server(test).await else { return };
    let args = ["--chaos", "--events", "--nats", &nats.url, "--transfers", "400", "--concurrency", "8"];
    let stdout = processes::demo(&args, Duration::from_secs(240)).await;
    assert!(stdout.contains("SIGKILL"), "nothing was killed:\n{stdout}");
    assert!(stdout.contains("view matches the banks: yes"), "the view did not converge:\n{stdout}");
    // Every account's row shows the same amount in BALANCE and VIEW.
    let rows: Vec<&str> = stdout.lines().filter(|l| l.contains("@bank-")).collect();
    assert_eq!(rows.len(), 10, "five accounts at each bank:\n{stdout}");
    for row in rows {
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(cells.len(), 3, "account, balance, view: {row}");
        assert_eq!(cells[1], cells[2], "the view disagrees with the bank: {row}");
    }
}
