//! I8 over mutual TLS (issue 15, docs/SECURITY.md): `twopc demo --tls
//! --chaos` issues a CA and certificates for its 3 coordinators and 2 banks,
//! runs every conversation on mutual TLS, SIGKILLs the coordinator leader and
//! a bank holding prepared branches mid-run, and still conserves money with
//! every transfer decided.

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
