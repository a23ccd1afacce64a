//! The engine: continuous batching of many requests over one model, on its own thread.
//!
//! Requests wait in a bounded queue; the scheduler admits them while the running batch has room
//! (at most `max_batch` sequences, and the KV positions they may reach within the planned budget).
//! Every step of the loop prefills one chunk of one admitted prompt (so a long prompt never
//! stalls the running streams for more than a chunk) and then runs one decode step for every
//! sequence that has its prompt in: one [`nibble_llama::Llama::decode_rows`] call, each weight
//! read once for all of them, each sequence with its own KV cache and position. Sequences join
//! and leave the batch at every step. A finished sequence's cache is kept (a few of them) so that
//! a later prompt starting with the same tokens (the earlier turns of a chat, a shared system
//! prompt) prefills only the rest.
//!
//! Events go back on a channel per request; a request whose receiver is dropped (a client that
//! disconnected) is freed at the next step.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::Tensor;
use candle_transformers::generation::LogitsProcessor;
use nibble_core::{Error, Result};
use nibble_llama::KvCache;
use nibble_quant::AdapterSel;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::{GenerateOptions, Model};

/// How the engine schedules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EngineOptions {
    /// Most sequences in the running batch.
    pub max_batch: usize,
    /// Most requests waiting for a place in the batch; more are refused ([`Error::QueueFull`]).
    pub max_queue: usize,
    /// The context: a prompt plus its `max_new_tokens` must fit in it.
    pub context: usize,
    /// KV positions the running sequences (each its prompt plus its `max_new_tokens`) and the
    /// kept caches may hold together: what the planner sized the cache for,
    /// `max_batch * context`.
    pub kv_budget: usize,
    /// Prompt tokens prefilled per step.
    pub prefill_chunk: usize,
    /// Finished sequences whose caches are kept for prefix reuse.
    pub reuse_slots: usize,
}

/// Most sequences one decode step runs: up to this many rows the matrix products keep each row's
/// arithmetic independent of the batch (beyond it they switch to the blocked prefill kernels).
pub const MAX_BATCH: usize = 16;

impl EngineOptions {
    /// `max_batch` (within 1..=[`MAX_BATCH`]) sequences of up to `context` positions, a queue of
    /// 64, prefill chunks of 128.
    pub fn new(max_batch: usize, context: usize) -> Self {
        let max_batch = max_batch.clamp(1, MAX_BATCH);
        Self {
            max_batch,
            max_queue: 64,
            context,
            kv_budget: max_batch.saturating_mul(context),
            prefill_chunk: 128,
            reuse_slots: 4,
        }
    }
}

/// One request: a prompt and how to continue it.
#[derive(Debug, Clone)]
pub struct Request {
    /// The prompt's token ids.
    pub prompt: Vec<u32>,
    /// Sampling, length and eos handling.
    pub opts: GenerateOptions,
    /// Texts that end the completion where they first appear (not included in it).
    pub stop: Vec<String>,
    /// OpenAI's `presence_penalty`: subtracted from the logit of every token already generated.
    pub presence_penalty: f32,
    /// OpenAI's `frequency_penalty`: subtracted once per earlier occurrence in the generated text.
    pub frequency_penalty: f32,
    /// The LoRA adapter to run with, by index ([`Model::adapter_index`]); `None` runs the base
    /// alone. Sequences with different adapters share each batched step.
    pub adapter: Option<usize>,
}

impl Request {
    /// A request with no stop texts, no penalties and no adapter.
    pub fn new(prompt: Vec<u32>, opts: GenerateOptions) -> Self {
        Self { prompt, opts, stop: Vec::new(), presence_penalty: 0.0, frequency_penalty: 0.0, adapter: None }
    }
}

/// Why a completion ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// An eos token or a stop text.
    Stop,
    /// `max_new_tokens` were produced.
    Length,
}

impl FinishReason {
    /// OpenAI's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }
}

/// A finished request.
#[derive(Debug, Clone)]
pub struct Completion {
    /// The whole new text (special tokens and any stop text left out).
    pub text: String,
    /// The new token ids.
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Of those, the leading ones whose keys and values were reused from an earlier request.
    pub cached_tokens: usize,
    /// Seconds from submission to the first new token.
    pub time_to_first_token: f64,
}

/// What the engine reports about a request, in order: text pieces, then one `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// New text (what a stream sends as a delta).
    Text(String),
    /// The request finished.
    Done(Completion),
    /// The request failed.
    Failed(Error),
}

/// The engine's gauges, read with [`Engine::stats`].
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests waiting for a place in the batch.
    pub waiting: AtomicUsize,
    /// Sequences in the batch.
    pub running: AtomicUsize,
}

/// Told what the engine does, for metrics (the server's Prometheus histograms). Called on the
/// engine's thread: keep it cheap.
pub trait EngineObserver: Send + Sync {
    /// A decode step ran `rows` sequences in `secs` seconds.
    fn decode_step(&self, rows: usize, secs: f64);
    /// A request finished: its prompt tokens, of which `cached` were reused, its completion
    /// tokens and its time to first token in seconds.
    fn finished(&self, prompt: usize, cached: usize, completion: usize, time_to_first_token: f64);
}

/// A submitted request's events.
#[derive(Debug)]
pub struct Ticket {
    /// Events in order; dropping it cancels the request.
    pub events: UnboundedReceiver<Event>,
}

enum Msg {
    Submit(Box<Request>, UnboundedSender<Event>, Instant),
    Shutdown { cancel_running: bool },
}

/// A running engine: its thread owns the scheduler; submitting is cheap and thread-safe.
#[derive(Debug)]
pub struct Engine {
    tx: mpsc::Sender<Msg>,
    stats: Arc<EngineStats>,
    opts: EngineOptions,
    thread: Option<JoinHandle<()>>,
    /// How many adapters the model has (a request's index is checked against it).
    adapters: usize,
}

impl Engine {
    /// Starts the engine's thread over `model`, telling `observer` what it does.
    ///
    /// Errors: `opts.context` or `opts.kv_budget` is 0.
    pub fn start(model: Arc<Model>, opts: EngineOptions, observer: Option<Arc<dyn EngineObserver>>) -> Result<Self> {
        if opts.context == 0 || opts.kv_budget == 0 {
            return Err(Error::invalid_argument("context", "the engine needs a context and a KV budget of at least 1"));
        }
        if !(1..=MAX_BATCH).contains(&opts.max_batch) {
            return Err(Error::invalid_argument("max_batch", format!("{} must be in 1..={MAX_BATCH}", opts.max_batch)));
        }
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(EngineStats::default());
        let adapters = model.adapters().len();
        let sched = Scheduler {
            model,
            opts: opts.clone(),
            stats: stats.clone(),
            observer,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kept: VecDeque::new(),
            accepting: true,
        };
        let thread = std::thread::Builder::new()
            .name("nibble-engine".into())
            .spawn(move || sched.run(rx))
            .map_err(|e| Error::io("nibble-engine thread", e))?;
        Ok(Self { tx, stats, opts, thread: Some(thread), adapters })
    }

    /// The options it runs with.
    pub fn options(&self) -> &EngineOptions {
        &self.opts
    }

    /// Queues `req`.
    ///
    /// Errors (nothing reaches the model): an empty prompt or bad sampling options
    /// ([`Error::InvalidArgument`]), a prompt plus `max_new_tokens` beyond the context
    /// ([`Error::ContextLengthExceeded`]), a full queue ([`Error::QueueFull`]), an engine that
    /// has stopped ([`Error::Cancelled`]).
    pub fn submit(&self, req: Request) -> Result<Ticket> {
        req.opts.validate()?;
        if req.prompt.is_empty() {
            return Err(Error::invalid_argument("prompt", "needs at least one token"));
        }
        if req.opts.max_new_tokens == 0 {
            return Err(Error::invalid_argument("max_new_tokens", "must be at least 1"));
        }
        if let Some(i) = req.adapter {
            if i >= self.adapters {
                return Err(Error::invalid_argument("adapter", format!("index {i}, but the model has {} adapter(s)", self.adapters)));
            }
        }
        for (name, v) in [("presence_penalty", req.presence_penalty), ("frequency_penalty", req.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return Err(Error::invalid_argument(name, format!("{v} must be in [-2, 2]")));
            }
        }
        let total = req.prompt.len().saturating_add(req.opts.max_new_tokens);
        if total > self.opts.context {
            return Err(Error::ContextLengthExceeded {
                prompt_tokens: req.prompt.len(),
                max_new_tokens: req.opts.max_new_tokens,
                context: self.opts.context,
            });
        }
        // Counted here so that concurrent submitters see each other at once.
        let waiting = self.stats.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.opts.max_queue {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::QueueFull { waiting });
        }
        let (etx, erx) = unbounded_channel();
        if self.tx.send(Msg::Submit(Box::new(req), etx, Instant::now())).is_err() {
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Error::Cancelled { reason: "the engine has stopped".into() });
        }
        Ok(Ticket { events: erx })
    }

    /// The engine's gauges.
    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Stops taking requests; the engine finishes the running and waiting ones (or, with
    /// `cancel_running`, fails them with [`Error::Cancelled`]) and its thread ends. Waits for it.
    pub fn shutdown(mut self, cancel_running: bool) {
        let _ = self.tx.send(Msg::Shutdown { cancel_running });
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.tx.send(Msg::Shutdown { cancel_running: true });
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A sequence in the batch.
struct Seq {
    req: Box<Request>,
    events: UnboundedSender<Event>,
    submitted: Instant,
    first_token: Option<Instant>,
    cache: KvCache,
    /// Token ids whose keys and values `cache` holds.
    held: Vec<u32>,
    /// Prompt tokens not yet prefilled.
    todo: usize,
    cached: usize,
    processor: LogitsProcessor,
    /// New tokens so far; the last is fed at the next decode step.
    tokens: Vec<u32>,
    counts: HashMap<u32, u32>,
    /// Bytes of the text already sent.
    shown: usize,
    /// The completion's text and reason, once finished.
    finished: Option<(String, FinishReason)>,
}

/// A finished sequence's cache, kept for prefix reuse (by a sequence with the same adapter:
/// the keys and values depend on it).
struct Kept {
    held: Vec<u32>,
    cache: KvCache,
    adapter: Option<usize>,
}

struct Scheduler {
    model: Arc<Model>,
    opts: EngineOptions,
    stats: Arc<EngineStats>,
    observer: Option<Arc<dyn EngineObserver>>,
    waiting: VecDeque<(Box<Request>, UnboundedSender<Event>, Instant)>,
    running: Vec<Seq>,
    kept: VecDeque<Kept>,
    accepting: bool,
}

impl Scheduler {
    fn run(mut self, rx: mpsc::Receiver<Msg>) {
        loop {
            // Idle: block for the next message; busy: take what has arrived.
            if self.running.is_empty() && self.waiting.is_empty() {
                if !self.accepting {
                    return;
                }
                match rx.recv() {
                    Ok(m) => self.handle(m),
                    Err(_) => return,
                }
            }
            while let Ok(m) = rx.try_recv() {
                self.handle(m);
            }
            self.admit();
            self.step();
            self.retire();
        }
    }

    fn handle(&mut self, m: Msg) {
        match m {
            Msg::Submit(req, tx, at) => {
                if self.accepting {
                    self.waiting.push_back((req, tx, at));
                } else {
                    self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                    let _ = tx.send(Event::Failed(Error::Cancelled { reason: "the server is shutting down".into() }));
                }
            }
            Msg::Shutdown { cancel_running } => {
                self.accepting = false;
                if cancel_running {
                    let reason = || Error::Cancelled { reason: "the server is shutting down".into() };
                    for (_, tx, _) in self.waiting.drain(..) {
                        self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
                        let _ = tx.send(Event::Failed(reason()));
                    }
                    for s in self.running.drain(..) {
                        let _ = s.events.send(Event::Failed(reason()));
                    }
                    self.stats.running.store(0, Ordering::SeqCst);
                }
            }
        }
    }

    /// KV positions a request may reach.
    fn reach(req: &Request) -> usize {
        req.prompt.len().saturating_add(req.opts.max_new_tokens)
    }

    /// Moves waiting requests into the batch, in order, while the batch and the KV budget have
    /// room (a request whose client has gone is dropped).
    fn admit(&mut self) {
        let mut used: usize = self.running.iter().map(|s| Self::reach(&s.req)).sum();
        while self.running.len() < self.opts.max_batch {
            let Some((req, _, _)) = self.waiting.front() else { break };
            let need = Self::reach(req);
            // Kept caches count against the budget too; the oldest make room first.
            let kept = |k: &VecDeque<Kept>| k.iter().map(|k| k.held.len()).sum::<usize>();
            while !self.kept.is_empty() && used.saturating_add(need).saturating_add(kept(&self.kept)) > self.opts.kv_budget {
                self.kept.pop_front();
            }
            // The first request always fits (submit checked it against the context).
            if !self.running.is_empty() && used.saturating_add(need) > self.opts.kv_budget {
                break;
            }
            let Some((req, tx, at)) = self.waiting.pop_front() else { break };
            self.stats.waiting.fetch_sub(1, Ordering::SeqCst);
            if tx.is_closed() {
                continue;
            }
            used = used.saturating_add(need);
            let seq = self.start(req, tx, at);
            self.running.push(seq);
        }
        self.stats.running.store(self.running.len(), Ordering::SeqCst);
    }

    /// A new sequence, over the kept cache that shares the longest prefix with its prompt.
    fn start(&mut self, req: Box<Request>, events: UnboundedSender<Event>, submitted: Instant) -> Seq {
        // At least one prompt token is fed, for the logits of the first new token.
        let limit = req.prompt.len() - 1;
        let shared = |k: &Kept| {
            let n = k.held.iter().zip(&req.prompt).take_while(|(a, b)| a == b).count().min(limit);
            if k.adapter == req.adapter { n } else { 0 }
        };
        let best = self.kept.iter().enumerate().map(|(i, k)| (shared(k), i)).max();
        let (mut cache, mut held, mut cached) = (self.model.new_cache(), Vec::new(), 0);
        if let Some((n, i)) = best.filter(|&(n, _)| n > 0) {
            if let Some(mut k) = self.kept.remove(i) {
                if k.cache.truncate(n).unwrap_or(false) {
                    k.held.truncate(n);
                    (cache, held, cached) = (k.cache, k.held, n);
                }
            }
        }
        let todo = req.prompt.len() - cached;
        let processor = req.opts.logits_processor();
        Seq {
            req,
            events,
            submitted,
            first_token: None,
            cache,
            held,
            todo,
            cached,
            processor,
            tokens: Vec::new(),
            counts: HashMap::new(),
            shown: 0,
            finished: None,
        }
    }

    /// One prefill chunk (of the first sequence still prefilling), then one decode step of
    /// every sequence whose prompt is in.
    fn step(&mut self) {
        let model = self.model.clone();
        if let Some(s) = self.running.iter_mut().find(|s| s.todo > 0 && s.finished.is_none()) {
            let start = s.req.prompt.len() - s.todo;
            let n = s.todo.min(self.opts.prefill_chunk.max(1));
            let chunk = s.req.prompt[start..start + n].to_vec();
            match model.forward_chunked_sel(&chunk, &mut s.cache, true, AdapterSel::Groups(&[s.req.adapter])) {
                Ok(logits) => {
                    s.held.extend_from_slice(&chunk);
                    s.todo -= n;
                    if s.todo == 0 {
                        Self::take_token(&model, s, &logits);
                    }
                }
                Err(e) => Self::fail(s, e),
            }
        }
        let rows: Vec<usize> = (0..self.running.len())
            .filter(|&i| {
                let s = &self.running[i];
                s.todo == 0 && s.finished.is_none() && !s.tokens.is_empty()
            })
            .collect();
        if rows.is_empty() {
            return;
        }
        let started = Instant::now();
        let tokens: Vec<u32> = rows.iter().filter_map(|&i| self.running[i].tokens.last().copied()).collect();
        let adapters: Vec<Option<usize>> = rows.iter().filter_map(|&i| self.running.get(i).map(|s| s.req.adapter)).collect();
        let mut caches: Vec<&mut KvCache> = Vec::with_capacity(rows.len());
        for (i, s) in self.running.iter_mut().enumerate() {
            if rows.contains(&i) {
                caches.push(&mut s.cache);
            }
        }
        let out = model.llama().decode_rows_sel(&tokens, &mut caches, AdapterSel::Groups(&adapters));
        drop(caches);
        match out {
            Ok(logits) => {
                for (r, &i) in rows.iter().enumerate() {
                    let s = &mut self.running[i];
                    if let Some(&t) = s.tokens.last() {
                        s.held.push(t);
                    }
                    match logits.get(r) {
                        Ok(row) => Self::take_token(&model, s, &row),
                        Err(e) => Self::fail(s, e.into()),
                    }
                }
                let secs = started.elapsed().as_secs_f64().max(1e-9);
                self.record_step(rows.len(), secs);
            }
            Err(e) => {
                // A failure inside the model (not the request's doing): every row of the step
                // gets it (the first the error itself).
                let msg = e.to_string();
                let mut first = Some(e);
                for &i in &rows {
                    let err = first.take().unwrap_or_else(|| Error::Candle(candle_core::Error::Msg(msg.clone())));
                    Self::fail(&mut self.running[i], err);
                }
            }
        }
    }

    fn record_step(&self, rows: usize, secs: f64) {
        if let Some(o) = &self.observer {
            o.decode_step(rows, secs);
        }
    }

    fn fail(s: &mut Seq, e: Error) {
        let _ = s.events.send(Event::Failed(e));
        // Marked finished with no text: `retire` drops it without a `Done`.
        s.finished = Some((String::new(), FinishReason::Stop));
        s.tokens.clear();
        // Its cache may hold a partial step: not kept for reuse.
        s.held.clear();
        s.events = unbounded_channel().0;
    }

    /// Samples the next token of `s` from its last logits, sends the text that is final, and
    /// marks the sequence finished at eos, a stop text or its length.
    fn take_token(model: &Model, s: &mut Seq, logits: &Tensor) {
        let next = match Self::sample(s, logits) {
            Ok(t) => t,
            Err(e) => return Self::fail(s, e),
        };
        s.first_token.get_or_insert_with(Instant::now);
        s.tokens.push(next);
        *s.counts.entry(next).or_default() += 1;
        let eos = s.req.opts.stop_at_eos && model.eos_token_ids().contains(&next);
        let text = match model.tokenizer().and_then(|t| t.decode(&s.tokens, true)) {
            Ok(t) => t,
            Err(e) => return Self::fail(s, e),
        };
        if let Some(cut) = s.req.stop.iter().filter(|p| !p.is_empty()).filter_map(|p| text.find(p.as_str())).min() {
            return Self::finish(s, text[..cut].to_string(), FinishReason::Stop);
        }
        if eos {
            return Self::finish(s, text, FinishReason::Stop);
        }
        if s.tokens.len() >= s.req.opts.max_new_tokens {
            return Self::finish(s, text, FinishReason::Length);
        }
        // Hold back a piece that ends inside a multi-byte character or could begin a stop text.
        let mut limit = text.len();
        if text.ends_with('\u{fffd}') {
            limit = limit.saturating_sub('\u{fffd}'.len_utf8());
        }
        let settled = text.get(..limit).unwrap_or("");
        let mut end = limit;
        for p in &s.req.stop {
            // The longest proper prefix of `p` that the settled text ends with stays unsent.
            if let Some(k) = (1..p.len()).rev().find(|&k| p.is_char_boundary(k) && settled.ends_with(&p[..k])) {
                end = end.min(limit - k);
            }
        }
        if end > s.shown && text.is_char_boundary(end) && text.is_char_boundary(s.shown) {
            let _ = s.events.send(Event::Text(text[s.shown..end].to_string()));
            s.shown = end;
        }
    }

    /// Penalties, then the request's sampler.
    fn sample(s: &mut Seq, logits: &Tensor) -> Result<u32> {
        let logits = logits.flatten_all()?;
        let opts = &s.req.opts;
        let logits = if opts.repetition_penalty != 1.0 {
            let mut context = s.req.prompt.clone();
            context.extend(&s.tokens);
            candle_transformers::utils::apply_repeat_penalty(&logits, opts.repetition_penalty, &context)?
        } else {
            logits
        };
        let (pp, fp) = (s.req.presence_penalty, s.req.frequency_penalty);
        let logits = if (pp != 0.0 || fp != 0.0) && !s.counts.is_empty() {
            let mut v: Vec<f32> = logits.to_dtype(candle_core::DType::F32)?.to_vec1()?;
            for (&t, &c) in &s.counts {
                if let Some(l) = v.get_mut(t as usize) {
                    *l -= pp + fp * c as f32;
                }
            }
            Tensor::new(v, logits.device())?
        } else {
            logits
        };
        Ok(s.processor.sample(&logits)?)
    }

    fn finish(s: &mut Seq, text: String, reason: FinishReason) {
        if text.len() > s.shown && text.is_char_boundary(s.shown) {
            let _ = s.events.send(Event::Text(text[s.shown..].to_string()));
            s.shown = text.len();
        }
        s.finished = Some((text, reason));
    }

    /// Sends `Done` for finished sequences and drops them (keeping their caches for reuse), and
    /// drops sequences whose client has gone.
    fn retire(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            let s = &self.running[i];
            if s.finished.is_none() && !s.events.is_closed() {
                i += 1;
                continue;
            }
            let s = self.running.swap_remove(i);
            if let Some((text, finish)) = s.finished {
                let ttft = s.first_token.map_or(0.0, |f| f.duration_since(s.submitted).as_secs_f64());
                if !s.tokens.is_empty() {
                    self.record_done(s.req.prompt.len(), s.cached, s.tokens.len(), ttft);
                }
                let done = Completion {
                    text,
                    tokens: s.tokens,
                    finish,
                    prompt_tokens: s.req.prompt.len(),
                    cached_tokens: s.cached,
                    time_to_first_token: ttft,
                };
                let _ = s.events.send(Event::Done(done));
            }
            if self.opts.reuse_slots > 0 && !s.held.is_empty() {
                if self.kept.len() >= self.opts.reuse_slots {
                    self.kept.pop_front();
                }
                self.kept.push_back(Kept { held: s.held, cache: s.cache, adapter: s.req.adapter });
            }
        }
        self.stats.running.store(self.running.len(), Ordering::SeqCst);
    }

    fn record_done(&self, prompt: usize, cached: usize, completion: usize, ttft: f64) {
        if let Some(o) = &self.observer {
            o.finished(prompt, cached, completion, ttft);
        }
    }
}
