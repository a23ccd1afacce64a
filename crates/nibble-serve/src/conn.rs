//! Connections: the accept loop with its connection limit, HTTP/1 over hyper with a header read
//! timeout, and a write timeout on every socket.
//!
//! `axum::serve` has no knobs for these, so connections are served with hyper's HTTP/1 builder
//! directly:
//!
//! - at most `max_connections` connections are served at once (a semaphore permit each); one
//!   beyond gets a canned 503 (OpenAI's error object, `too_many_connections`) written without
//!   waiting, and is closed (after up to `REFUSAL_LINGER` of reading what it sent, so that
//!   closing does not reset the connection before the client reads the 503; at most
//!   `REFUSING` such closes at once, beyond which a connection is closed at once);
//! - a request's headers must arrive within `header_read_timeout` of the connection being ready
//!   for them (also what closes an idle keep-alive connection), else hyper closes it;
//! - a write that makes no progress for `write_timeout` fails the connection, which drops the
//!   response body and so cancels a stream whose client stopped reading.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::StatusCode;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::error::ApiError;
use crate::metrics::Metrics;

/// How long a refused connection is read from (and discarded) before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_millis(500);
/// Most refused connections lingering at once.
const REFUSING: usize = 64;
/// Most bytes read from a refused connection.
const REFUSAL_READ: usize = 64 * 1024;

/// The socket settings of every connection.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    pub write_timeout: Duration,
    pub send_buffer: Option<usize>,
}

/// Accepts and serves connections until `stop` resolves; then tells every connection to finish
/// its request and close, and waits until all have.
pub(crate) async fn serve<F>(listener: TcpListener, app: Router, limits: Limits, metrics: Arc<Metrics>, stop: F)
where
    F: Future<Output = ()> + Send,
{
    // Semaphores hold at most `usize::MAX >> 3` permits; waiting for all of them back needs a u32.
    let max = limits.max_connections.clamp(1, u32::MAX as usize);
    let slots = Arc::new(Semaphore::new(max));
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let refusal: Arc<[u8]> = refusal_bytes(max).into();
    let refusing = Arc::new(Semaphore::new(REFUSING));
    tokio::pin!(stop);
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => break,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors (EMFILE, ENFILE) or a connection reset before it was
                // accepted: nothing to serve; a short pause keeps a full table from spinning.
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            // The 503 fits in the socket's empty send buffer: written at once or not at all,
            // never waited for.
            let _ = stream.try_write(&refusal);
            metrics.connection_refused();
            if let Ok(p) = refusing.clone().try_acquire_owned() {
                tokio::spawn(linger(stream, p));
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        if let Some(n) = limits.send_buffer {
            let _ = socket2::SockRef::from(&stream).set_send_buffer_size(n);
        }
        let (app, metrics, mut stopping) = (app.clone(), metrics.clone(), stopping_rx.clone());
        tokio::spawn(async move {
            metrics.connection_opened();
            {
                let io = TokioIo::new(WriteTimeout::new(stream, limits.write_timeout));
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
                let conn = builder.serve_connection(io, TowerToHyperService::new(app));
                tokio::pin!(conn);
                let mut told = false;
                let result = loop {
                    tokio::select! {
                        r = conn.as_mut() => break r,
                        _ = async { let _ = stopping.wait_for(|s| *s).await; }, if !told => {
                            told = true;
                            conn.as_mut().graceful_shutdown();
                        }
                    }
                };
                if let Err(e) = result {
                    tracing::debug!("connection ended: {e}");
                }
            }
            metrics.connection_closed();
            drop(permit);
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    // Every connection holds a permit until it ends.
    let _ = slots.acquire_many(max as u32).await;
}

/// Ends a refused connection: no more writes, then what the client sends is read and dropped
/// (for at most `REFUSAL_LINGER` and [`REFUSAL_READ`] bytes) so that the close is not a reset
/// that could discard the 503 before the client reads it.
async fn linger(stream: TcpStream, _permit: tokio::sync::OwnedSemaphorePermit) {
    let _ = socket2::SockRef::from(&stream).shutdown(std::net::Shutdown::Write);
    let drain = async {
        let mut buf = [0u8; 4096];
        let mut total = 0;
        while total < REFUSAL_READ {
            if stream.readable().await.is_err() {
                break;
            }
            match stream.try_read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
        }
    };
    let _ = tokio::time::timeout(REFUSAL_LINGER, drain).await;
}

/// The whole HTTP answer a connection beyond the limit gets.
fn refusal_bytes(max: usize) -> Vec<u8> {
    let e = ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!("the server is at its limit of {max} connections; try again shortly"),
        kind: "server_error",
        param: None,
        code: Some("too_many_connections"),
    };
    let body = e.body().to_string();
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// A socket whose writes fail with [`io::ErrorKind::TimedOut`] once one has waited
/// `timeout` without the socket taking a byte (a client that stopped reading).
struct WriteTimeout {
    inner: TcpStream,
    timeout: Duration,
    /// Armed while a write waits.
    deadline: Pin<Box<Sleep>>,
    armed: bool,
}

impl WriteTimeout {
    fn new(inner: TcpStream, timeout: Duration) -> Self {
        Self { inner, timeout, deadline: Box::pin(tokio::time::sleep(timeout)), armed: false }
    }

    /// Passes a ready result through (disarming the deadline); a pending one arms it, and fails
    /// once it has passed.
    fn watch<T>(&mut self, cx: &mut Context<'_>, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(r) => {
                self.armed = false;
                Poll::Ready(r)
            }
            Poll::Pending => {
                if !self.armed {
                    self.armed = true;
                    let at = Instant::now() + self.timeout;
                    self.deadline.as_mut().reset(at);
                }
                match self.deadline.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        self.armed = false;
                        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "the client stopped reading")))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl AsyncRead for WriteTimeout {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteTimeout {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.watch(cx, r)
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[io::IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.watch(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_flush(cx);
        this.watch(cx, r)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_shutdown(cx);
        this.watch(cx, r)
    }
}
