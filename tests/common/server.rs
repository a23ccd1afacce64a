//! A `nibble serve` server on a free loopback port, for the HTTP tests.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use nibble::{EngineOptions, Model};
use nibble_serve::{ServeOptions, Server};

/// A server on a free port, stopped when dropped.
pub struct Running {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Running {
    /// Starts a server named `tiny` (batch 8, the given queue, body limit and context) over the
    /// model `load` makes, and waits until `/health` is 200.
    pub fn start<L>(api_key: Option<&str>, max_queue: usize, max_body: usize, context: usize, load: L) -> Running
    where
        L: FnOnce() -> nibble::Result<Model> + Send + 'static,
    {
        let mut engine = EngineOptions::new(8, context);
        engine.max_queue = max_queue;
        let opts = ServeOptions {
            host: "127.0.0.1".into(),
            port: 0,
            api_key: api_key.map(str::to_string),
            model_name: "tiny".into(),
            max_body,
            engine,
            ..ServeOptions::default()
        };
        Self::start_with(opts, load)
    }

    /// Starts a server with `opts` (its port should be 0) over the model `load` makes, and waits
    /// until `/health` is 200.
    pub fn start_with<L>(opts: ServeOptions, load: L) -> Running
    where
        L: FnOnce() -> nibble::Result<Model> + Send + 'static,
    {
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let server = Server::bind(opts).await.unwrap();
                addr_tx.send(server.local_addr().unwrap()).unwrap();
                server
                    .run(load, async {
                        let _ = stopped.await;
                    })
                    .await
                    .unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        let r = Running { addr, stop: Some(stop), thread: Some(thread) };
        let t0 = Instant::now();
        while !r.healthy() {
            assert!(t0.elapsed() < Duration::from_secs(120), "the server never became ready");
            std::thread::sleep(Duration::from_millis(20));
        }
        r
    }

    /// A handle on a server that runs elsewhere (another process) at `addr`; dropping it stops
    /// nothing.
    pub fn attach(addr: SocketAddr) -> Running {
        Running { addr, stop: None, thread: None }
    }

    /// Whether the server's thread is still running (it has neither returned nor panicked).
    pub fn alive(&self) -> bool {
        self.thread.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Whether `GET /health` answers 200.
    pub fn healthy(&self) -> bool {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(self.addr) else { return false };
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: x\r\n\r\n").is_err() {
            return false;
        }
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out.starts_with("HTTP/1.0 200") || out.starts_with("HTTP/1.1 200")
    }

    /// `http://addr`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}
