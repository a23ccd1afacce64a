//! `nibble serve`: an OpenAI-compatible HTTP server over nibble's [`Engine`].
//!
//! The server binds first and answers `GET /health` with 503 while the model loads (on a
//! blocking thread), 200 once it is ready. Inference runs on the engine's own thread; the async
//! handlers only parse, tokenize, submit and relay events. Endpoints: `POST /v1/chat/completions`,
//! `POST /v1/completions`, `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//! Errors are OpenAI's error object with the matching status; a request that is malformed never
//! reaches the engine.
//!
//! Under abuse (see `docs/reliability-serve.md`): at most [`ServeOptions::max_connections`]
//! connections are served, one beyond gets a 503 at once; headers must arrive within
//! [`ServeOptions::header_read_timeout`] and a body within [`ServeOptions::body_read_timeout`];
//! a write that waits [`ServeOptions::write_timeout`] (a client that stopped reading) drops the
//! connection and cancels its request; a full queue is a 429 at once.

mod conn;
mod error;
mod metrics;
pub mod request;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use nibble::engine::{EngineOptions, Ticket};
use nibble::{Completion, Engine, Event, Model, Request};
use serde_json::{json, Value};
use subtle::ConstantTimeEq;
use tokio_stream::wrappers::ReceiverStream;

pub use error::ApiError;
pub use metrics::Metrics;
use request::{Input, Parsed};

/// How to serve.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// Address to listen on.
    pub host: String,
    /// Port to listen on (0: any free port).
    pub port: u16,
    /// A bearer key every `/v1` and `/metrics` request must carry.
    pub api_key: Option<String>,
    /// The name `/v1/models` lists and requests must use (or leave out).
    pub model_name: String,
    /// Largest request body, bytes.
    pub max_body: usize,
    /// Engine settings (batch, queue, context; a context of 0 is the planner's default for the
    /// model, `min(max_position_embeddings, 4096)`).
    pub engine: EngineOptions,
    /// Most connections served at once; one beyond is answered 503 (`too_many_connections`) and
    /// closed without being read.
    pub max_connections: usize,
    /// How long a connection may take to send a request's headers (counted from when it is
    /// ready for them, so also how long a keep-alive connection may sit idle) before it is
    /// closed.
    pub header_read_timeout: Duration,
    /// How long a request may take to send its body before it is answered 408.
    pub body_read_timeout: Duration,
    /// How long a write may wait for the client to take bytes before the connection is dropped
    /// (and its request cancelled): what frees a stream whose client stopped reading.
    pub write_timeout: Duration,
    /// Each connection's socket send buffer (`SO_SNDBUF`), bytes; `None` leaves the system's
    /// autotuning. A small buffer bounds the kernel memory a stalled reader holds and makes it
    /// found sooner.
    pub send_buffer: Option<usize>,
}

/// The default of [`ServeOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 512;
/// The default of [`ServeOptions::header_read_timeout`].
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The default of [`ServeOptions::body_read_timeout`].
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The default of [`ServeOptions::write_timeout`].
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

impl Default for ServeOptions {
    /// `127.0.0.1:8080`, no key, model `model`, 4 MiB bodies, batch 8 with a queue of 64 and the
    /// planner's context, and the default limits above.
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            api_key: None,
            model_name: "model".into(),
            max_body: 4 * 1024 * 1024,
            engine: EngineOptions::new(8, 0),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            send_buffer: None,
        }
    }
}

/// Events buffered between a stream's relay and its HTTP body: when the client stops reading,
/// the relay waits here rather than piling up text.
const STREAM_BUFFER: usize = 16;

/// The loaded model and its engine.
struct Ready {
    model: Arc<Model>,
    engine: Engine,
}

/// Shared by every handler.
struct AppState {
    ready: OnceLock<Ready>,
    opts: ServeOptions,
    metrics: Arc<Metrics>,
    created: u64,
}

type Shared = Arc<AppState>;

/// A server that is listening (the model may still be loading).
pub struct Server {
    state: Shared,
    listener: tokio::net::TcpListener,
}

impl Server {
    /// Binds the address of `opts`.
    ///
    /// Errors: the address cannot be bound.
    pub async fn bind(opts: ServeOptions) -> std::io::Result<Self> {
        let listener = tokio::net::TcpListener::bind((opts.host.as_str(), opts.port)).await?;
        let state = Arc::new(AppState { ready: OnceLock::new(), opts, metrics: Arc::new(Metrics::default()), created: now() });
        Ok(Self { state, listener })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` resolves, loading the model with `load` (on a blocking thread)
    /// meanwhile; then stops accepting, lets running requests finish, and stops the engine.
    /// A failed `accept` (out of file descriptors, say) is logged and the loop goes on.
    ///
    /// Errors: loading failed.
    pub async fn run<L, S>(self, load: L, shutdown: S) -> Result<(), nibble::Error>
    where
        L: FnOnce() -> nibble::Result<Model> + Send + 'static,
        S: std::future::Future<Output = ()> + Send + 'static,
    {
        let state = self.state.clone();
        let app = router(state.clone());
        // A load failure ends the server with the error.
        let failure = Arc::new(std::sync::Mutex::new(None::<nibble::Error>));
        let failed = Arc::new(tokio::sync::Notify::new());
        let (failure_in, failed_in) = (failure.clone(), failed.clone());
        let loader = state.clone();
        tokio::task::spawn_blocking(move || {
            let started = match load() {
                Ok(model) => {
                    let mut eo = loader.opts.engine.clone();
                    if eo.context == 0 {
                        // The planner's default context (what it sized the cache for).
                        eo.context = model.context_len();
                        eo.kv_budget = eo.max_batch.saturating_mul(eo.context);
                    }
                    let model = Arc::new(model);
                    let observer = loader.metrics.clone();
                    Engine::start(model.clone(), eo, Some(observer)).map(|engine| Ready { model, engine })
                }
                Err(e) => Err(e),
            };
            match started {
                Ok(r) => {
                    let _ = loader.ready.set(r);
                    tracing::info!("model loaded; serving");
                }
                Err(e) => {
                    if let Ok(mut f) = failure_in.lock() {
                        *f = Some(e);
                    }
                    failed_in.notify_one();
                }
            }
        });
        let stop = async move {
            tokio::select! {
                _ = shutdown => {}
                _ = failed.notified() => {}
            }
        };
        let o = &state.opts;
        let limits = conn::Limits {
            max_connections: o.max_connections,
            header_read_timeout: o.header_read_timeout,
            write_timeout: o.write_timeout,
            send_buffer: o.send_buffer,
        };
        conn::serve(self.listener, app, limits, state.metrics.clone(), stop).await;
        if let Some(e) = failure.lock().ok().and_then(|mut f| f.take()) {
            return Err(e);
        }
        // Graceful: every connection has finished; the engine has nothing left to run.
        if let Some(state) = Arc::into_inner(state) {
            if let Some(r) = state.ready.into_inner() {
                r.engine.shutdown(false);
            }
        }
        Ok(())
    }
}

/// The routes over `state`.
fn router(state: Shared) -> Router {
    let max_body = state.opts.max_body;
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// The engine once loaded, else a 503.
fn ready(state: &AppState) -> Result<&Ready, ApiError> {
    state.ready.get().ok_or_else(|| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: "the model is still loading".into(),
        kind: "server_error",
        param: None,
        code: Some("model_loading"),
    })
}

/// 401 unless the request carries the key (compared in constant time).
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.opts.api_key else { return Ok(()) };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "a valid API key is needed: send `Authorization: Bearer <key>`".into(),
        kind: "authentication_error",
        param: None,
        code: Some("invalid_api_key"),
    })
}

/// Counts the answer's status, then returns it.
fn counted(state: &AppState, endpoint: &str, r: Response) -> Response {
    state.metrics.request(endpoint, r.status().as_u16());
    r
}

async fn health(State(state): State<Shared>) -> Response {
    let r = match state.ready.get() {
        Some(_) => (StatusCode::OK, Json(json!({"status": "ok"}))).into_response(),
        None => (StatusCode::SERVICE_UNAVAILABLE, Json(json!({"status": "loading"}))).into_response(),
    };
    counted(&state, "/health", r)
}

async fn metrics_text(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let r = match authorize(&state, &headers) {
        Ok(()) => {
            let text = state.metrics.render(state.ready.get().map(|r| r.engine.stats()));
            ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
        }
        Err(e) => e.into_response(),
    };
    counted(&state, "/metrics", r)
}

async fn models(State(state): State<Shared>, headers: HeaderMap) -> Response {
    let r = match authorize(&state, &headers) {
        Ok(()) => {
            let base = &state.opts.model_name;
            let entry = |id: &str, parent: Option<&str>| {
                let mut e = json!({"id": id, "object": "model", "created": state.created, "owned_by": "nibble"});
                if let Some(p) = parent {
                    e["parent"] = json!(p);
                }
                e
            };
            let mut data = vec![entry(base, None)];
            if let Ok(ready) = ready(&state) {
                data.extend(ready.model.adapters().iter().map(|a| entry(&format!("{base}:{a}"), Some(base))));
            }
            Json(json!({"object": "list", "data": data})).into_response()
        }
        Err(e) => e.into_response(),
    };
    counted(&state, "/v1/models", r)
}

async fn not_found(State(state): State<Shared>) -> Response {
    let e = ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such endpoint".into(),
        kind: "invalid_request_error",
        param: None,
        code: Some("not_found"),
    };
    counted(&state, "other", e.into_response())
}

async fn chat(State(state): State<Shared>, req: axum::extract::Request) -> Response {
    let r = complete(&state, req, true).await.unwrap_or_else(IntoResponse::into_response);
    counted(&state, "/v1/chat/completions", r)
}

async fn completions(State(state): State<Shared>, req: axum::extract::Request) -> Response {
    let r = complete(&state, req, false).await.unwrap_or_else(IntoResponse::into_response);
    counted(&state, "/v1/completions", r)
}

/// The body, within the size limit and [`ServeOptions::body_read_timeout`].
async fn read_body(state: &AppState, req: axum::extract::Request) -> Result<Bytes, ApiError> {
    let limit = state.opts.body_read_timeout;
    match tokio::time::timeout(limit, Bytes::from_request(req, &())).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => {
            let status = e.status();
            let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "request_too_large" } else { "invalid_body" };
            Err(ApiError { status, message: e.body_text(), kind: "invalid_request_error", param: None, code: Some(code) })
        }
        Err(_) => Err(ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: format!("the request body did not arrive within {} s", limit.as_secs_f64()),
            kind: "invalid_request_error",
            param: None,
            code: Some("request_timeout"),
        }),
    }
}

/// Both completion endpoints: validate, tokenize, submit, then answer whole or as a stream.
async fn complete(state: &Shared, req: axum::extract::Request, chat: bool) -> Result<Response, ApiError> {
    authorize(state, req.headers())?;
    let body = read_body(state, req).await?;
    let parsed = request::parse(&body, chat)?;
    let ready = ready(state)?;
    let base = &state.opts.model_name;
    // `<base>` runs the base alone, `<base>:<adapter>` that adapter (as vLLM names LoRA models).
    let adapter = match parsed.model.as_deref() {
        None => None,
        Some(m) if m == base => None,
        Some(m) => match m.strip_prefix(base.as_str()).and_then(|r| r.strip_prefix(':')).and_then(|a| ready.model.adapter_index(a)) {
            Some(i) => Some(i),
            None => {
                let mut served = vec![format!("`{base}`")];
                served.extend(ready.model.adapters().iter().map(|a| format!("`{base}:{a}`")));
                return Err(ApiError {
                    status: StatusCode::NOT_FOUND,
                    message: format!("the model `{m}` does not exist; this server serves {}", served.join(", ")),
                    kind: "invalid_request_error",
                    param: Some("model".into()),
                    code: Some("model_not_found"),
                });
            }
        },
    };
    let model_name = parsed.model.clone().unwrap_or_else(|| base.clone());
    let field = if chat { "messages" } else { "prompt" };
    let prompt = tokenize(&ready.model, &parsed.input).map_err(|e| ApiError::from_engine(e, field))?;
    // Without max_tokens, up to the end of the context (as OpenAI's default).
    let context = ready.engine.options().context;
    let max_new = parsed.max_tokens.unwrap_or_else(|| context.saturating_sub(prompt.len()).max(1));
    let Parsed { opts, stop, presence_penalty, frequency_penalty, stream, include_usage, .. } = parsed;
    let opts = nibble::GenerateOptions { max_new_tokens: max_new, ..opts };
    let req = Request { prompt, opts, stop, presence_penalty, frequency_penalty, adapter };
    let ticket = ready.engine.submit(req).map_err(|e| ApiError::from_engine(e, field))?;
    let meta = Meta { id: next_id(chat), created: now(), model: model_name, chat };
    if stream {
        return Ok(stream_response(ticket, meta, include_usage, field));
    }
    let done = collect(ticket, field).await?;
    Ok(Json(meta.whole(&done)).into_response())
}

/// The prompt's token ids: messages through the chat template, text with special tokens.
fn tokenize(model: &Model, input: &Input) -> nibble::Result<Vec<u32>> {
    let tok = model.tokenizer()?;
    match input {
        Input::Messages(m) => tok.apply_chat_template(m, true),
        Input::Text(t) => tok.encode(t, true),
        Input::Tokens(ids) => {
            let vocab = model.config().vocab_size;
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                return Err(nibble::Error::invalid_argument("prompt", format!("token id {bad} is outside the vocabulary of {vocab}")));
            }
            Ok(ids.clone())
        }
    }
}

/// Waits for the completion (dropping the ticket, if the client goes, frees the sequence).
async fn collect(mut t: Ticket, field: &str) -> Result<Completion, ApiError> {
    while let Some(e) = t.events.recv().await {
        match e {
            Event::Text(_) => {}
            Event::Done(c) => return Ok(c),
            Event::Failed(e) => return Err(ApiError::from_engine(e, field)),
        }
    }
    Err(ApiError::from_engine(nibble::Error::Cancelled { reason: "the engine dropped the request".into() }, field))
}

/// What every answer of one request shares.
#[derive(Debug, Clone)]
struct Meta {
    id: String,
    created: u64,
    model: String,
    chat: bool,
}

impl Meta {
    fn usage(c: &Completion) -> Value {
        json!({
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.tokens.len(),
            "total_tokens": c.prompt_tokens + c.tokens.len(),
            "prompt_tokens_details": {"cached_tokens": c.cached_tokens},
        })
    }

    fn whole(&self, c: &Completion) -> Value {
        let choice = if self.chat {
            json!({"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": null, "finish_reason": c.finish.as_str()})
        } else {
            json!({"index": 0, "text": c.text, "logprobs": null, "finish_reason": c.finish.as_str()})
        };
        json!({
            "id": self.id,
            "object": if self.chat { "chat.completion" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": Self::usage(c),
        })
    }

    /// One stream chunk: a text delta (`role` on the first of a chat), or the finish.
    fn chunk(&self, text: Option<&str>, first: bool, finish: Option<&str>) -> Value {
        let choice = if self.chat {
            let mut delta = serde_json::Map::new();
            if first {
                delta.insert("role".into(), json!("assistant"));
            }
            if let Some(t) = text {
                delta.insert("content".into(), json!(t));
            }
            json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish})
        } else {
            json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
        };
        json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        })
    }

    fn usage_chunk(&self, c: &Completion) -> Value {
        json!({
            "id": self.id,
            "object": if self.chat { "chat.completion.chunk" } else { "text_completion" },
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": Self::usage(c),
        })
    }
}

/// Server-sent events: a chunk per text piece, the finish, the usage when asked for, then
/// `data: [DONE]`. An error after the stream started is sent as an error object.
fn stream_response(mut t: Ticket, meta: Meta, include_usage: bool, field: &'static str) -> Response {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, Infallible>>(STREAM_BUFFER);
    // Relays the engine's events; when the client goes (even while the request still waits in
    // the queue, or when its connection is dropped for not reading), the ticket is dropped,
    // which frees the sequence at the engine's next step.
    tokio::spawn(async move {
        let tx = &tx;
        let send = |v: Value| async move { tx.send(Ok(SseEvent::default().data(v.to_string()))).await.is_ok() };
        let mut first = true;
        loop {
            let e = tokio::select! {
                e = t.events.recv() => e,
                _ = tx.closed() => None,
            };
            let Some(e) = e else { break };
            let ok = match e {
                Event::Text(s) => {
                    let c = meta.chunk(Some(&s), first, None);
                    first = false;
                    send(c).await
                }
                Event::Done(c) => {
                    if first && meta.chat {
                        send(meta.chunk(Some(""), true, None)).await;
                    }
                    send(meta.chunk(None, false, Some(c.finish.as_str()))).await;
                    if include_usage {
                        send(meta.usage_chunk(&c)).await;
                    }
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    break;
                }
                Event::Failed(e) => {
                    send(ApiError::from_engine(e, field).body()).await;
                    let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                    break;
                }
            };
            if !ok {
                break;
            }
        }
    });
    Sse::new(ReceiverStream::new(rx)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn next_id(chat: bool) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(1);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{}-{:x}{n:06}", if chat { "chatcmpl" } else { "cmpl" }, now())
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    tracing::info!("shutting down: no new requests; finishing the running ones");
}
