//! A connection of the in-memory network ([`super::network`]): two byte
//! pipes whose bytes arrive a fixed latency after they were written, in
//! virtual time, in order (as TCP would deliver them).
//!
//! The latency matters: with pipes that deliver at once, a transfer takes
//! no virtual time at all, and a fault striking at a random moment would
//! almost never find a call in flight. It is fixed per connection, not
//! drawn per write: how many writes carry a message is up to hyper and h2
//! (and hyper stamps every response with the real date), and with a draw
//! per write replays diverged (docs/TESTING.md).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf as _, Bytes};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// Bytes written but not yet read, each way, before the writer waits.
const PIPE_BYTES: usize = 256 * 1024;

/// One direction of a connection.
#[derive(Default)]
struct Pipe {
    /// Written chunks and when each may be read.
    chunks: VecDeque<(Instant, Bytes)>,
    buffered: usize,
    /// The writer shut down or went away: the reader sees EOF once drained.
    writer_done: bool,
    /// The reader went away: writes fail.
    reader_gone: bool,
    reader: Option<Waker>,
    writer: Option<Waker>,
}

/// One end of a connection.
pub struct PipeEnd {
    incoming: Arc<Mutex<Pipe>>,
    outgoing: Arc<Mutex<Pipe>>,
    /// What each write takes to arrive.
    latency: Duration,
    wait: Option<Pin<Box<Sleep>>>,
}

/// A connection's two ends; bytes either way arrive `latency` after they were written.
pub fn connection(latency: Duration) -> (PipeEnd, PipeEnd) {
    let (a_to_b, b_to_a) = (Arc::new(Mutex::new(Pipe::default())), Arc::new(Mutex::new(Pipe::default())));
    let end = |incoming: &Arc<Mutex<Pipe>>, outgoing: &Arc<Mutex<Pipe>>| PipeEnd {
        incoming: Arc::clone(incoming),
        outgoing: Arc::clone(outgoing),
        latency,
        wait: None,
    };
    (end(&b_to_a, &a_to_b), end(&a_to_b, &b_to_a))
}

impl AsyncRead for PipeEnd {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut pipe = this.incoming.lock();
            let Some((arrives, chunk)) = pipe.chunks.front_mut() else {
                if pipe.writer_done {
                    return Poll::Ready(Ok(()));
                }
                pipe.reader = Some(cx.waker().clone());
                return Poll::Pending;
            };
            let arrives = *arrives;
            if arrives > Instant::now() {
                drop(pipe);
                let wait = this.wait.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(arrives)));
                if wait.deadline() != arrives {
                    wait.as_mut().reset(arrives);
                }
                if wait.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                continue;
            }
            let n = chunk.len().min(buf.remaining());
            buf.put_slice(&chunk[..n]);
            chunk.advance(n);
            if chunk.is_empty() {
                pipe.chunks.pop_front();
            }
            pipe.buffered -= n;
            if let Some(writer) = pipe.writer.take() {
                writer.wake();
            }
            return Poll::Ready(Ok(()));
        }
    }
}

impl AsyncWrite for PipeEnd {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let mut pipe = self.outgoing.lock();
        if pipe.reader_gone || pipe.writer_done {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let room = PIPE_BYTES - pipe.buffered;
        if room == 0 {
            pipe.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        let n = data.len().min(room);
        let arrives = Instant::now() + self.latency;
        pipe.chunks.push_back((arrives, Bytes::copy_from_slice(&data[..n])));
        pipe.buffered += n;
        if let Some(reader) = pipe.reader.take() {
            reader.wake();
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.close_outgoing();
        Poll::Ready(Ok(()))
    }
}

impl PipeEnd {
    fn close_outgoing(&self) {
        let mut pipe = self.outgoing.lock();
        pipe.writer_done = true;
        if let Some(reader) = pipe.reader.take() {
            reader.wake();
        }
    }
}

impl Drop for PipeEnd {
    fn drop(&mut self) {
        self.close_outgoing();
        let mut incoming = self.incoming.lock();
        incoming.reader_gone = true;
        if let Some(writer) = incoming.writer.take() {
            writer.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    // The network model: bytes arrive in order, a latency after they were
    // written, and a closed end reads as EOF on the other.
    #[tokio::test(start_paused = true)]
    async fn bytes_arrive_in_order_after_the_latency_then_eof() -> io::Result<()> {
        let latency = Duration::from_millis(3);
        let (mut a, mut b) = connection(latency);
        let sent = Instant::now();
        a.write_all(b"hello ").await?;
        a.write_all(b"world").await?;
        a.shutdown().await?;
        let mut got = Vec::new();
        b.read_to_end(&mut got).await?;
        assert_eq!(got, b"hello world");
        assert_eq!(sent.elapsed(), latency);
        drop(b);
        assert_eq!(a.write(b"x").await.map_err(|e| e.kind()), Err(io::ErrorKind::BrokenPipe));
        Ok(())
    }
}
