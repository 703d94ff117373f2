//! A minimal HTTP endpoint for Prometheus metrics, and the text format's
//! counter and gauge lines. Deliberately tiny (one `GET /metrics` per
//! connection, bounded request size and time) so it needs no HTTP framework;
//! the coordinator and the bank each render their own text.

use std::fmt::Write as _;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

/// Appends a counter in the Prometheus text format.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}");
}

/// Appends a gauge in the Prometheus text format.
pub fn gauge(out: &mut String, name: &str, help: &str, value: u64) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}");
}

/// Bytes read from a metrics request before it is refused.
const REQUEST_MAX_BYTES: usize = 8 * 1024;
/// How long a metrics client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed unanswered.
const CONNECTIONS_MAX: usize = 64;
/// The pause after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Serves `GET /metrics` on `listener` until `shutdown`, one request per
/// connection, at most [`CONNECTIONS_MAX`] at once; a failed accept is
/// logged and retried.
pub async fn serve(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => return,
            accepted = listener.accept() => accepted,
        };
        let mut socket = match accepted {
            Ok((socket, _)) => socket,
            Err(e) => {
                // Out of file descriptors, say: the endpoint lives on, and
                // the pause keeps a persistent error from spinning.
                tracing::warn!(error = %e, "metrics endpoint: accept failed");
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        // Past the bound a scraper's connection is closed unanswered.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else { continue };
        let render = render.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let Ok(Some(path)) = tokio::time::timeout(REQUEST_TIMEOUT, read_request_path(&mut socket)).await else {
                return;
            };
            let (status, body) = if path == "/metrics" {
                ("200 OK", render())
            } else {
                ("404 Not Found", "try GET /metrics\n".to_owned())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: text/plain; version=0.0.4\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
        });
    }
}

/// Reads an HTTP/1 request head and returns its path; None for anything else.
async fn read_request_path(socket: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 || buf.len() + n > REQUEST_MAX_BYTES {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = std::str::from_utf8(&buf).ok()?;
    let mut parts = head.lines().next()?.split_whitespace();
    (parts.next()? == "GET").then(|| parts.next().map(str::to_owned)).flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_metrics_over_http_and_404s_the_rest() -> std::io::Result<()> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, Arc::new(|| "twopc_up 1\n".to_owned()), async {
            let _ = stopped.await;
        }));
        for (path, expect) in [("/metrics", "twopc_up 1"), ("/other", "404")] {
            let mut socket = tokio::net::TcpStream::connect(addr).await?;
            socket.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes()).await?;
            let mut response = String::new();
            socket.read_to_string(&mut response).await?;
            assert!(response.contains(expect), "{response}");
        }
        let _ = stop.send(());
        server.await.map_err(std::io::Error::other)
    }
}
