//! Prometheus metrics (`GET /metrics`), with the `prometheus-client` crate.

use std::sync::atomic::{AtomicU64, Ordering};

use nibble::engine::{EngineObserver, EngineStats};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// The server's metrics; the engine feeds the token counts and histograms as it runs.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<Vec<(String, String)>, Counter>,
    prompt_tokens: Counter,
    cached_tokens: Counter,
    completion_tokens: Counter,
    queue: Gauge,
    running: Gauge,
    batch: Histogram,
    ttft: Histogram,
    decode_tps: Gauge<f64, AtomicU64>,
    connections: Gauge,
    refused: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("nibble");
        let requests = Family::<Vec<(String, String)>, Counter>::default();
        let prompt_tokens = Counter::default();
        let cached_tokens = Counter::default();
        let completion_tokens = Counter::default();
        let queue = Gauge::default();
        let running = Gauge::default();
        let batch = Histogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0]);
        let ttft = Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        let decode_tps = Gauge::<f64, AtomicU64>::default();
        let connections = Gauge::default();
        let refused = Counter::default();
        registry.register("requests", "HTTP requests by endpoint and status", requests.clone());
        registry.register("prompt_tokens", "Prompt tokens of finished requests", prompt_tokens.clone());
        registry.register("cached_prompt_tokens", "Prompt tokens reused from cached prefixes", cached_tokens.clone());
        registry.register("completion_tokens", "Completion tokens generated", completion_tokens.clone());
        registry.register("queue_depth", "Requests waiting for a place in the batch", queue.clone());
        registry.register("running_sequences", "Sequences in the running batch", running.clone());
        registry.register("batch_size", "Sequences per decode step", batch.clone());
        registry.register("time_to_first_token_seconds", "Seconds from a request's arrival to its first token", ttft.clone());
        registry.register("decode_tokens_per_second", "Tokens per second of the last decode step (all sequences)", decode_tps.clone());
        registry.register("open_connections", "Connections being served", connections.clone());
        registry.register("refused_connections", "Connections refused (503) for being beyond the limit", refused.clone());
        Self { registry, requests, prompt_tokens, cached_tokens, completion_tokens, queue, running, batch, ttft, decode_tps, connections, refused }
    }
}

impl Metrics {
    /// Counts one answered request.
    pub fn request(&self, endpoint: &str, status: u16) {
        let labels = vec![("endpoint".to_string(), endpoint.to_string()), ("status".to_string(), status.to_string())];
        self.requests.get_or_create(&labels).inc();
    }

    /// A connection is being served.
    pub fn connection_opened(&self) {
        self.connections.inc();
    }

    /// A served connection ended.
    pub fn connection_closed(&self) {
        self.connections.dec();
    }

    /// A connection beyond the limit was refused.
    pub fn connection_refused(&self) {
        self.refused.inc();
    }

    /// The text exposition, with the gauges read from `stats` now.
    pub fn render(&self, stats: Option<&EngineStats>) -> String {
        if let Some(s) = stats {
            self.queue.set(s.waiting.load(Ordering::Relaxed) as i64);
            self.running.set(s.running.load(Ordering::Relaxed) as i64);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl EngineObserver for Metrics {
    fn decode_step(&self, rows: usize, secs: f64) {
        self.batch.observe(rows as f64);
        if secs > 0.0 {
            self.decode_tps.set(rows as f64 / secs);
        }
    }

    fn finished(&self, prompt: usize, cached: usize, completion: usize, time_to_first_token: f64) {
        self.prompt_tokens.inc_by(prompt as u64);
        self.cached_tokens.inc_by(cached as u64);
        self.completion_tokens.inc_by(completion as u64);
        self.ttft.observe(time_to_first_token);
    }
}
