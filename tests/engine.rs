//! The engine (continuous batching) without HTTP: requests batched together answer as each does
//! alone through `Model::generate`; stop texts, penalties, limits and cancellation.

mod common;

use std::sync::Arc;

use common::*;
use nibble::engine::{EngineObserver, EngineOptions};
use nibble::{BitsAndBytesConfig, DeviceMap, Engine, Error, Event, FinishReason, GenerateOptions, Request};

fn model() -> Arc<nibble::Model> {
    Arc::new(nibble::from_pretrained(&tiny_model(), BitsAndBytesConfig::nf4(), DeviceMap::Auto).unwrap())
}

/// Collects a ticket's events: the streamed text and the completion.
fn wait(mut t: nibble::engine::Ticket) -> (String, nibble::Completion) {
    let mut streamed = String::new();
    while let Some(e) = t.events.blocking_recv() {
        match e {
            Event::Text(s) => streamed.push_str(&s),
            Event::Done(c) => return (streamed, c),
            Event::Failed(e) => panic!("request failed: {e}"),
        }
    }
    panic!("the engine dropped the request");
}

fn prompts() -> Vec<Vec<u32>> {
    (0..6u32).map(|k| (0..(3 + 9 * k)).map(|i| (i * 17 + k * 5 + 1) % 500).collect()).collect()
}

#[derive(Default)]
struct Count {
    steps: std::sync::Mutex<Vec<usize>>,
}

impl EngineObserver for Count {
    fn decode_step(&self, rows: usize, _secs: f64) {
        self.steps.lock().unwrap().push(rows);
    }
    fn finished(&self, _: usize, _: usize, _: usize, _: f64) {}
}

/// Six greedy requests submitted at once run batched (the observer sees steps of several rows)
/// and each gets exactly the tokens `Model::generate` gives it alone.
#[test]
fn batched_requests_answer_as_alone() {
    let model = model();
    let count = Arc::new(Count::default());
    let engine = Engine::start(model.clone(), EngineOptions::new(8, 256), Some(count.clone())).unwrap();
    let opts = GenerateOptions { stop_at_eos: false, ..GenerateOptions::greedy(12) };
    let tickets: Vec<_> = prompts().into_iter().map(|p| engine.submit(Request::new(p, opts.clone())).unwrap()).collect();
    for (p, t) in prompts().iter().zip(tickets) {
        let (streamed, done) = wait(t);
        let alone = model.generate(p, &opts, |_| {}).unwrap();
        assert_eq!(done.tokens, alone.tokens, "prompt of {} tokens", p.len());
        assert_eq!(done.text, alone.text);
        assert_eq!(streamed, done.text, "the stream adds up to the text");
        assert_eq!(done.finish, FinishReason::Length);
        assert_eq!(done.prompt_tokens, p.len());
    }
    let steps = count.steps.lock().unwrap().clone();
    assert!(steps.iter().any(|&r| r > 1), "no decode step ran more than one sequence: {steps:?}");
    engine.shutdown(false);
}

/// A second request that extends the first's prompt and answer reuses the cached prefix and
/// answers as a fresh generate does.
#[test]
fn a_repeated_prefix_is_reused() {
    let model = model();
    let engine = Engine::start(model.clone(), EngineOptions::new(2, 256), None).unwrap();
    let opts = GenerateOptions { stop_at_eos: false, ..GenerateOptions::greedy(6) };
    let first: Vec<u32> = (0..30u32).map(|i| (i * 7 + 3) % 400).collect();
    let (_, a) = wait(engine.submit(Request::new(first.clone(), opts.clone())).unwrap());
    let mut second = first.clone();
    second.extend(&a.tokens);
    second.extend([11, 12, 13]);
    let (_, b) = wait(engine.submit(Request::new(second.clone(), opts.clone())).unwrap());
    // The first request's cache holds its prompt and every new token but the last.
    assert_eq!(b.cached_tokens, first.len() + a.tokens.len() - 1);
    assert_eq!(b.tokens, model.generate(&second, &opts, |_| {}).unwrap().tokens);
}

/// A stop text ends the completion before it; what was streamed never includes it.
#[test]
fn stop_texts_end_the_completion() {
    let model = model();
    let engine = Engine::start(model.clone(), EngineOptions::new(2, 256), None).unwrap();
    let opts = GenerateOptions { stop_at_eos: false, ..GenerateOptions::greedy(16) };
    let p = prompts()[2].clone();
    let full = model.generate(&p, &opts, |_| {}).unwrap().text;
    // Stop at a piece of the middle of the text.
    let chars: Vec<char> = full.chars().collect();
    assert!(chars.len() > 6, "the tiny model's text is too short to cut: {full:?}");
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let cut = full.find(&stop).unwrap();
    let req = Request { stop: vec![stop.clone()], ..Request::new(p, opts) };
    let (streamed, done) = wait(engine.submit(req).unwrap());
    assert_eq!(done.text, full[..cut]);
    assert_eq!(streamed, done.text);
    assert_eq!(done.finish, FinishReason::Stop);
}

/// Limits are typed errors at submission: nothing reaches the model.
#[test]
fn limits_are_errors() {
    let model = model();
    let mut opts = EngineOptions::new(1, 64);
    opts.max_queue = 0;
    let engine = Engine::start(model, opts, None).unwrap();
    let long = Request::new(vec![1; 60], GenerateOptions::greedy(10));
    assert!(matches!(
        engine.submit(long),
        Err(Error::ContextLengthExceeded { prompt_tokens: 60, max_new_tokens: 10, context: 64 })
    ));
    assert!(matches!(engine.submit(Request::new(vec![], GenerateOptions::greedy(1))), Err(Error::InvalidArgument { .. })));
    let bad = Request { presence_penalty: 3.0, ..Request::new(vec![1], GenerateOptions::greedy(1)) };
    assert!(matches!(engine.submit(bad), Err(Error::InvalidArgument { ref name, .. }) if name == "presence_penalty"));
    assert!(matches!(engine.submit(Request::new(vec![1, 2], GenerateOptions::greedy(1))), Err(Error::QueueFull { .. })));
    assert!(matches!(
        engine.submit(Request::new(vec![1], GenerateOptions::greedy(0))),
        Err(Error::InvalidArgument { ref name, .. }) if name == "max_new_tokens"
    ));
    let mut too_wide = EngineOptions::new(1, 64);
    too_wide.max_batch = nibble::engine::MAX_BATCH + 1;
    assert!(Engine::start(crate::model(), too_wide, None).is_err());
}

/// Shutting down with cancellation fails what runs with `Cancelled`; a dropped ticket frees its
/// sequence (the engine keeps serving others).
#[test]
fn cancellation() {
    let model = model();
    let engine = Engine::start(model, EngineOptions::new(4, 256), None).unwrap();
    let opts = GenerateOptions { stop_at_eos: false, ..GenerateOptions::greedy(200) };
    drop(engine.submit(Request::new(vec![1, 2, 3], opts.clone())).unwrap());
    let (_, done) = wait(engine.submit(Request::new(vec![4, 5, 6], GenerateOptions { max_new_tokens: 5, ..opts.clone() })).unwrap());
    assert_eq!(done.tokens.len(), 5);
    let mut t = engine.submit(Request::new(vec![7, 8, 9], opts)).unwrap();
    engine.shutdown(true);
    let mut failed = false;
    while let Some(e) = t.events.blocking_recv() {
        if let Event::Failed(Error::Cancelled { .. }) = e {
            failed = true;
        }
    }
    assert!(failed, "a request cancelled at shutdown ends in Cancelled");
}
