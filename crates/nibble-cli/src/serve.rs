//! `nibble serve`: the OpenAI-compatible server (see `docs/serving.md`).

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use nibble::EngineOptions;
use nibble_serve::{shutdown_signal, ServeOptions, Server};

use crate::args::ModelArgs;

/// Flags of `nibble serve`. The generation flags of the model flags are defaults nothing uses:
/// each request brings its own.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Model flags.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Most sequences decoded together (1 to 16).
    #[arg(long, default_value_t = 8, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16))]
    pub max_batch: usize,
    /// A key every request must send as `Authorization: Bearer <key>` (also read from
    /// NIBBLE_API_KEY).
    #[arg(long, env = "NIBBLE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Most requests waiting for a place in the batch; more get 429.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// The model name `/v1/models` lists [default: the model's folder or id].
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub max_body: usize,
    /// Most connections served at once; more are answered 503 and closed.
    #[arg(long, default_value_t = nibble_serve::DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1_000_000))]
    pub max_connections: usize,
    /// Seconds a connection may take to send a request's headers (and may sit idle between
    /// requests) before it is closed.
    #[arg(long, default_value = "10", value_parser = seconds)]
    pub header_read_timeout: Duration,
    /// Seconds a request may take to send its body before it is answered 408.
    #[arg(long, default_value = "30", value_parser = seconds)]
    pub body_read_timeout: Duration,
    /// Seconds a write may wait on a client that does not read before its connection is dropped
    /// and its request cancelled.
    #[arg(long, default_value = "30", value_parser = seconds)]
    pub write_timeout: Duration,
    /// Each connection's socket send buffer in bytes (SO_SNDBUF) [default: the system's
    /// autotuning].
    #[arg(long)]
    pub send_buffer: Option<usize>,
}

/// A positive, finite number of seconds (fractions allowed).
fn seconds(s: &str) -> Result<Duration, String> {
    let v: f64 = s.parse().map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
        return Err(format!("`{s}` must be more than 0 and at most 86400 seconds"));
    }
    Ok(Duration::from_secs_f64(v))
}

/// Plans and loads the model once (the server answers `/health` with 503 meanwhile), then serves
/// until SIGINT or SIGTERM.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let source = args.model.model_source();
    // The planner sizes the KV cache for `max_batch` sequences of the context, which is then the
    // engine's budget (0: the planner's default, resolved from the model once loaded).
    let mut load = args.model.load_options();
    load.batch = args.max_batch.max(1);
    load.progress = false;
    let mut engine = EngineOptions::new(args.max_batch, args.model.max_seq_len.unwrap_or(0));
    engine.max_queue = args.queue;
    // A local folder or file is named by its last component (as clients would write it), a hub
    // id by itself.
    let name = args.served_model_name.clone().unwrap_or_else(|| {
        let path = std::path::Path::new(source.trim_end_matches('/'));
        match path.file_name() {
            Some(n) if path.exists() => n.to_string_lossy().into_owned(),
            _ => source.clone(),
        }
    });
    let opts = ServeOptions {
        host: args.host.clone(),
        port: args.port,
        api_key: args.api_key.clone(),
        model_name: name,
        max_body: args.max_body,
        engine,
        max_connections: args.max_connections,
        header_read_timeout: args.header_read_timeout,
        body_read_timeout: args.body_read_timeout,
        write_timeout: args.write_timeout,
        send_buffer: args.send_buffer,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the runtime")?;
    rt.block_on(async move {
        let server = Server::bind(opts.clone()).await.with_context(|| format!("cannot listen on {}:{}", opts.host, opts.port))?;
        let addr = server.local_addr().context("reading the bound address")?;
        // The one line scripts wait for.
        eprintln!("nibble serve: listening on http://{addr} (model {}; loading)", opts.model_name);
        let src = source.clone();
        server.run(move || nibble::Model::load(&src, &load), shutdown_signal()).await?;
        anyhow::Ok(())
    })
}
