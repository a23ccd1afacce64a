//! [`Model`]: a loaded, placed, ready-to-run model with its tokenizer.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};
use nibble_core::{Error, Result};
use nibble_llama::{KvCache, Llama, Placement, WeightProvider};
use nibble_load::{ChatMessage, GenerationConfig, ModelConfig, ModelFiles, TextTokenizer, Weights};
use nibble_quant::{AdapterSel, BitsAndBytesConfig, ModelDtype};

use crate::adapter::{self, Adapter, AdapterProvider};
use crate::generate::{GenerateOptions, Generation, StopReason};
use crate::provider::CheckpointProvider;
use crate::source::{self, Source};
use crate::{device_for, LoadOptions};
use nibble_plan::{human, Inventory, Plan, PREFILL_CHUNK};

/// A KV cache kept between requests, with the token ids it holds ([`Model::new_session`]): a
/// prompt that starts with those ids reuses their keys and values.
#[derive(Debug, Clone)]
pub struct Session {
    cache: KvCache,
    ids: Vec<u32>,
}

impl Session {
    /// The token ids whose keys and values the session holds.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.cache.clear();
        self.ids.clear();
    }

    /// Positions the KV cache holds (the length of [`Session::ids`]).
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    /// Whether the session holds nothing.
    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    /// Bytes of keys and values held.
    pub fn kv_bytes(&self) -> usize {
        self.cache.bytes()
    }
}

/// A loaded model.
#[derive(Debug)]
pub struct Model {
    pub(crate) llama: Llama,
    pub(crate) tokenizer: Option<TextTokenizer>,
    pub(crate) generation: GenerationConfig,
    pub(crate) eos_ids: Vec<u32>,
    pub(crate) quant: BitsAndBytesConfig,
    /// Where it was loaded from: `save_pretrained` takes the config and tokenizer files from there.
    pub(crate) source: Source,
    /// Positions the KV cache was planned for ([`Model::context_len`]).
    pub(crate) context: usize,
    /// The names of the LoRA adapters on the layers, unmerged, by index.
    pub(crate) adapters: Vec<String>,
    /// The plan the load placed the model by.
    pub(crate) plan: Plan,
}

/// The context a load plans for (`max_seq_len`, by default min(max_position_embeddings, 4096)),
/// with transformers' warning when it reaches past what the model was trained on.
pub(crate) fn context_len(cfg: &ModelConfig, opts: &LoadOptions) -> usize {
    let n = opts.plan_request(cfg).max_seq_len;
    if n > cfg.max_position_embeddings {
        tracing::warn!(
            "max_seq_len {n} is past the model's max_position_embeddings = {}: its outputs degrade beyond that \
             (transformers only warns too)",
            cfg.max_position_embeddings
        );
    }
    n
}

/// The quantization actually applied: a pre-quantized checkpoint's own config wins over the
/// caller's (its weights cannot be re-quantized), but the caller's compute dtype is kept when the
/// caller asked for quantization.
fn effective_quant(cfg: &ModelConfig, requested: &BitsAndBytesConfig) -> Result<BitsAndBytesConfig> {
    let Some(q) = &cfg.quantization_config else {
        return Ok(requested.clone());
    };
    let mut stored = BitsAndBytesConfig::from_json(q)?;
    if requested.is_quantized() {
        if requested.method() != stored.method() {
            tracing::warn!(
                "{} is pre-quantized as {:?}; ignoring the requested {:?}",
                cfg.path.display(),
                stored.method(),
                requested.method()
            );
        }
        stored.bnb_4bit_compute_dtype = requested.bnb_4bit_compute_dtype;
    }
    Ok(stored)
}

pub(crate) fn progress_bar(total: u64, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    // indicatif draws to stderr only when it is a terminal.
    let bar = ProgressBar::new(total);
    if let Ok(style) = ProgressStyle::with_template("{spinner} quantizing [{bar:30}] {pos}/{len} {msg}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// What a load builds the decoder from, shared by every source format.
pub(crate) struct Build<'a> {
    pub cfg: &'a ModelConfig,
    pub quant: &'a BitsAndBytesConfig,
    pub placement: Placement,
    pub dtype: DType,
    pub opts: &'a LoadOptions,
    /// The model's name in the log.
    pub name: &'a str,
    pub started: Instant,
    /// The adapters to put on it ([`crate::adapter::open_all`]).
    pub adapters: &'a [Adapter],
}

/// Builds the decoder through the provider `make` returns (handed the quantization progress
/// bar), with the adapters on the layers they target, then logs what was loaded.
pub(crate) fn build_llama<P: WeightProvider>(b: Build<'_>, make: impl FnOnce(ProgressBar) -> P) -> Result<Llama> {
    let Build { cfg, quant, placement, dtype, opts, name, started, adapters } = b;
    let linears = (cfg.layer_linears().len() * cfg.num_hidden_layers) as u64 + 1;
    let bar = progress_bar(linears, opts.progress && quant.is_quantized());
    let compute = quant.bnb_4bit_compute_dtype.dtype();
    let mut provider = AdapterProvider::new(make(bar.clone()), adapters, opts.merge_adapters, quant, (dtype, compute));
    let llama = Llama::load(cfg, placement, dtype, &mut provider)?;
    provider.report_unused();
    bar.finish_and_clear();
    tracing::info!(
        "loaded {name} ({} layers, {:?}, dtype {dtype:?}) in {:.2}s, {} weight bytes resident",
        cfg.num_hidden_layers,
        quant.method(),
        started.elapsed().as_secs_f64(),
        llama.resident_weight_bytes()
    );
    Ok(llama)
}

/// Where each part of the model goes: the planner checks every device's budget (weights, KV
/// cache for `opts.max_seq_len`, reserve) before any weight is read.
pub(crate) fn placement(cfg: &ModelConfig, opts: &LoadOptions, dtype: DType, adapters: &[Adapter]) -> Result<(Placement, Plan)> {
    let quant = effective_quant(cfg, &opts.quant)?;
    let inventory = opts.inventory.clone().unwrap_or_else(Inventory::detect);
    let mut request = opts.plan_request_for(cfg, adapters)?;
    request.dtype = dtype;
    let plan = nibble_plan::plan(cfg, &quant, &request, &inventory)?;
    for u in &plan.usage {
        tracing::info!(
            "{}: {} ({} weights, {} KV, {} reserve of {} budget)",
            u.device,
            u.modules.join(", "),
            human(u.weight_bytes),
            human(u.kv_bytes),
            human(u.reserve_bytes),
            human(u.budget)
        );
    }
    let layers = &plan.layers;
    let placement = Placement {
        embed: device_for(layers.embed)?,
        layers: layers.layers.iter().map(|d| device_for(*d)).collect::<Result<_>>()?,
        head: device_for(layers.head)?,
    };
    Ok((placement, plan))
}

/// transformers' `dtype` resolution: an explicit dtype as given; `auto` is config.json's `dtype`
/// (or `torch_dtype`), else the checkpoint tensors' dtype, else float32.
fn resolve_dtype(requested: ModelDtype, cfg: &ModelConfig, weights: &Weights) -> DType {
    requested.resolve(|| {
        cfg.dtype.as_deref().and_then(ModelDtype::from_hf_name).or_else(|| weights.float_dtype()).unwrap_or(DType::F32)
    })
}

impl Model {
    /// Loads a model; see [`crate::from_pretrained`].
    pub fn load(id: &str, opts: &LoadOptions) -> Result<Self> {
        let started = Instant::now();
        opts.quant.validate()?;
        let source = source::resolve(id, opts)?;
        let adapters = adapter::open_all(opts)?;
        adapter::check_base(&adapters, id);
        let mut model = match source {
            Source::Folder(files) => Self::load_folder(files, opts, started, &adapters)?,
            Source::Gguf(path) => crate::gguf::load(&path, opts, started, &adapters)?,
        };
        if !opts.merge_adapters {
            model.adapters = adapters.into_iter().map(|a| a.name).collect();
        }
        Ok(model)
    }

    /// Loads a Hugging Face folder.
    fn load_folder(files: ModelFiles, opts: &LoadOptions, started: Instant, adapters: &[Adapter]) -> Result<Self> {
        let cfg = ModelConfig::from_file(&files.config)?;
        let quant = effective_quant(&cfg, &opts.quant)?;
        let compute = quant.bnb_4bit_compute_dtype.dtype();
        let weights = Weights::open(&files.weights)?;
        let dtype = resolve_dtype(opts.dtype, &cfg, &weights);
        let (placement, plan) = placement(&cfg, opts, dtype, adapters)?;

        let tokenizer = match &files.tokenizer {
            Some(t) => Some(TextTokenizer::from_files(
                t,
                files.tokenizer_config.as_deref(),
                files.chat_template.as_deref(),
            )?),
            None => None,
        };
        let generation = match &files.generation_config {
            Some(p) => GenerationConfig::from_file(p)?,
            None => GenerationConfig::default(),
        };
        let mut eos_ids = if generation.eos_token_ids.is_empty() {
            cfg.eos_token_ids.clone()
        } else {
            generation.eos_token_ids.clone()
        };
        eos_ids.dedup();

        let name = files.dir.display().to_string();
        let build = Build { cfg: &cfg, quant: &quant, placement, dtype, opts, name: &name, started, adapters };
        let llama = build_llama(build, |progress| CheckpointProvider { weights: &weights, quant: &quant, dtype, compute, progress })?;
        let context = context_len(&cfg, opts);
        let source = Source::Folder(files);
        Ok(Self { llama, tokenizer, generation, eos_ids, quant, source, context, adapters: Vec::new(), plan })
    }

    /// Positions the KV cache was planned for (`LoadOptions::max_seq_len`, by default
    /// min(max_position_embeddings, 4096)): a prompt must be shorter, and generation stops when
    /// the prompt and the new tokens fill it ([`StopReason::ContextFull`]).
    pub fn context_len(&self) -> usize {
        self.context
    }

    /// The names of the LoRA adapters loaded unmerged, by index (the first is the active one:
    /// [`Model::generate`] and the other single-sequence calls run with it). Empty when none
    /// was loaded, or when they were merged into the weights.
    pub fn adapters(&self) -> &[String] {
        &self.adapters
    }

    /// The index of the adapter named `name`.
    pub fn adapter_index(&self, name: &str) -> Option<usize> {
        self.adapters.iter().position(|a| a == name)
    }

    /// The plan the load placed the model by: each device's modules and planned bytes, and the
    /// estimate (whose weight bytes are what [`Model::resident_weight_bytes`] reports, adapters
    /// included).
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The model's configuration.
    pub fn config(&self) -> &ModelConfig {
        self.llama.config()
    }

    /// The quantization applied.
    pub fn quantization(&self) -> &BitsAndBytesConfig {
        &self.quant
    }

    /// The files it was loaded from, for a model loaded from a folder (`None` for a GGUF file).
    pub fn files(&self) -> Option<&ModelFiles> {
        match &self.source {
            Source::Folder(files) => Some(files),
            Source::Gguf(_) => None,
        }
    }

    /// Where it was loaded from.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// `generation_config.json` as read.
    pub fn generation_config(&self) -> &GenerationConfig {
        &self.generation
    }

    /// The ids that end generation.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The tokenizer, or an error when the folder has no tokenizer.json.
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| Error::MissingFile {
            path: match &self.source {
                Source::Folder(files) => files.dir.join("tokenizer.json"),
                Source::Gguf(path) => path.clone(),
            },
            hint: "text in and out needs the model's tokenizer.json; token ids still work".into(),
        })
    }

    /// Bytes of weights resident (embeddings, norms, quantized linears with their state).
    pub fn resident_weight_bytes(&self) -> usize {
        self.llama.resident_weight_bytes()
    }

    /// The model dtype the load resolved (transformers' `dtype`; `auto` is the checkpoint's).
    pub fn dtype(&self) -> DType {
        self.llama.dtype()
    }

    /// Whether a tied `lm_head` is the embedding's own storage (held once, as in transformers).
    pub fn head_is_shared(&self) -> bool {
        self.llama.head_is_shared()
    }

    /// The underlying decoder (for saving and inspection).
    pub fn llama(&self) -> &Llama {
        &self.llama
    }

    /// A fresh KV cache.
    pub fn new_cache(&self) -> KvCache {
        self.llama.new_cache()
    }

    /// Logits `[batch, seq, vocab]` (f32) for `input_ids` (`[batch, seq]`, u32) at positions
    /// `offset..`, extending `cache`.
    pub fn forward(&self, input_ids: &Tensor, offset: usize, cache: &mut KvCache) -> Result<Tensor> {
        self.llama.forward(input_ids, offset, cache, false)
    }

    /// Logits `[seq, vocab]` (f32) of one sequence, from a fresh cache.
    pub fn logits(&self, ids: &[u32]) -> Result<Tensor> {
        let mut cache = self.new_cache();
        self.forward_chunked(ids, &mut cache, false)
    }

    /// Runs one sequence through the model in chunks of [`PREFILL_CHUNK`] positions (what the
    /// planner's activation reserve assumes), extending `cache`. Returns logits `[seq, vocab]`, or
    /// `[1, vocab]` for the last position when `last_only`.
    pub(crate) fn forward_chunked(&self, ids: &[u32], cache: &mut KvCache, last_only: bool) -> Result<Tensor> {
        self.forward_chunked_sel(ids, cache, last_only, AdapterSel::Active)
    }

    /// [`Model::forward_chunked`] with the adapter `sel` picks.
    pub(crate) fn forward_chunked_sel(&self, ids: &[u32], cache: &mut KvCache, last_only: bool, sel: AdapterSel<'_>) -> Result<Tensor> {
        let mut outputs = Vec::new();
        for chunk in ids.chunks(PREFILL_CHUNK) {
            let input = Tensor::new(chunk, &Device::Cpu)?.unsqueeze(0)?;
            let logits = self.llama.forward_sel(&input, cache.len(), cache, last_only, sel)?.squeeze(0)?;
            if last_only {
                outputs.clear();
            }
            outputs.push(logits);
        }
        if outputs.is_empty() {
            return Err(Error::invalid_argument("ids", "needs at least one token"));
        }
        Ok(Tensor::cat(&outputs, 0)?)
    }

    /// Generates from token ids, calling `on_text` with each new piece of text as it forms.
    pub fn generate(&self, prompt: &[u32], opts: &GenerateOptions, on_text: impl FnMut(&str)) -> Result<Generation> {
        self.generate_in(&mut self.new_session(), prompt, opts, on_text)
    }

    /// A session: a KV cache kept between requests, with the token ids it holds.
    pub fn new_session(&self) -> Session {
        Session { cache: self.new_cache(), ids: Vec::new() }
    }

    /// [`Model::generate`] in `session`: the longest prefix of `prompt` that the session already
    /// holds (the earlier turns of a chat) is reused, only the rest is prefilled
    /// ([`Generation::cached_tokens`] says how many were reused). On return the session holds
    /// the prompt and the new tokens but the last; on an error it is emptied.
    pub fn generate_in(
        &self,
        session: &mut Session,
        prompt: &[u32],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let out = self.generate_session(session, prompt, opts, on_text);
        if out.is_err() {
            session.clear();
        }
        out
    }

    fn generate_session(
        &self,
        session: &mut Session,
        prompt: &[u32],
        opts: &GenerateOptions,
        mut on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        opts.validate()?;
        if prompt.is_empty() {
            return Err(Error::invalid_argument("prompt", "needs at least one token"));
        }
        if prompt.len() >= self.context {
            return Err(Error::ContextLengthExceeded {
                prompt_tokens: prompt.len(),
                max_new_tokens: opts.max_new_tokens,
                context: self.context,
            });
        }
        // Without the cap, generation would run past the positions the cache was planned for.
        let max_new = opts.max_new_tokens.min(self.context - prompt.len());
        if max_new < opts.max_new_tokens {
            tracing::warn!(
                "the prompt has {} tokens: at most {max_new} of the {} new tokens asked for fit the {}-token context",
                prompt.len(),
                opts.max_new_tokens,
                self.context
            );
        }
        // At least one prompt token is fed, for the logits of the first new token.
        let shared = session.ids.iter().zip(prompt).take_while(|(a, b)| a == b).count().min(prompt.len() - 1);
        let cached = if session.cache.truncate(shared)? { shared } else { 0 };
        if cached == 0 {
            session.cache.clear();
        }
        session.ids.truncate(cached);
        let cache = &mut session.cache;
        let mut processor = opts.logits_processor();
        let mut context: Vec<u32> = prompt.to_vec();
        let mut tokens: Vec<u32> = Vec::new();
        let mut shown = String::new();
        let started = Instant::now();
        let mut first_token_at = None;
        let mut stop = StopReason::MaxTokens;
        let mut input = prompt[cached..].to_vec();
        while tokens.len() < max_new {
            let logits = self.forward_chunked(&input, cache, true)?.flatten_all()?;
            session.ids.extend_from_slice(&input);
            let logits = if opts.repetition_penalty != 1.0 {
                candle_transformers::utils::apply_repeat_penalty(&logits, opts.repetition_penalty, &context)?
            } else {
                logits
            };
            let next = processor.sample(&logits)?;
            first_token_at.get_or_insert_with(Instant::now);
            tokens.push(next);
            context.push(next);
            if opts.stop_at_eos && self.eos_ids.contains(&next) {
                stop = StopReason::Eos(next);
                break;
            }
            if let Some(tok) = &self.tokenizer {
                let text = tok.decode(&tokens, true)?;
                // Hold back a piece that ends inside a multi-byte character.
                if text.len() > shown.len() && !text.ends_with('\u{fffd}') && text.starts_with(shown.as_str()) {
                    on_text(&text[shown.len()..]);
                    shown = text;
                }
            }
            input = vec![next];
        }
        if stop == StopReason::MaxTokens && tokens.len() < opts.max_new_tokens {
            stop = StopReason::ContextFull;
        }
        let first = first_token_at.unwrap_or_else(Instant::now);
        let text = match &self.tokenizer {
            Some(tok) => tok.decode(&tokens, true)?,
            None => String::new(),
        };
        if text.len() > shown.len() && text.starts_with(shown.as_str()) {
            on_text(&text[shown.len()..]);
        }
        Ok(Generation {
            prompt_tokens: prompt.len(),
            cached_tokens: cached,
            tokens,
            text,
            stop,
            prefill_secs: first.duration_since(started).as_secs_f64(),
            decode_secs: first.elapsed().as_secs_f64(),
        })
    }

    /// Generates a continuation of `prompt` (tokenized with special tokens, as transformers does).
    pub fn generate_text(&self, prompt: &str, opts: &GenerateOptions, on_text: impl FnMut(&str)) -> Result<Generation> {
        let ids = self.tokenizer()?.encode(prompt, true)?;
        self.generate(&ids, opts, on_text)
    }

    /// Answers the conversation `messages` with the model's chat template.
    pub fn chat(&self, messages: &[ChatMessage], opts: &GenerateOptions, on_text: impl FnMut(&str)) -> Result<Generation> {
        self.chat_in(&mut self.new_session(), messages, opts, on_text)
    }

    /// [`Model::chat`] in `session`: a conversation's later turns prefill only what the session
    /// does not hold yet (their new messages), as [`Model::generate_in`].
    pub fn chat_in(
        &self,
        session: &mut Session,
        messages: &[ChatMessage],
        opts: &GenerateOptions,
        on_text: impl FnMut(&str),
    ) -> Result<Generation> {
        let ids = self.tokenizer()?.apply_chat_template(messages, true)?;
        self.generate_in(session, &ids, opts, on_text)
    }

    /// Perplexity over the first `max_tokens` tokens of `text` (special tokens added):
    /// exp of the mean next-token negative log-likelihood, as transformers'
    /// `exp(model(ids, labels=ids).loss)`.
    pub fn perplexity(&self, text: &str, max_tokens: usize) -> Result<f64> {
        let mut ids = self.tokenizer()?.encode(text, true)?;
        ids.truncate(max_tokens);
        self.perplexity_of_ids(&ids)
    }

    /// Perplexity of a token sequence (at least two tokens).
    pub fn perplexity_of_ids(&self, ids: &[u32]) -> Result<f64> {
        if ids.len() < 2 {
            return Err(Error::invalid_argument("text", "perplexity needs at least two tokens"));
        }
        if ids.len() > self.context {
            return Err(Error::ContextLengthExceeded { prompt_tokens: ids.len(), max_new_tokens: 0, context: self.context });
        }
        let logits = self.logits(ids)?;
        let logp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, 1)?;
        let rows = logp.to_vec2::<f32>()?;
        let nll: f64 = rows
            .iter()
            .zip(ids.iter().skip(1))
            .map(|(row, &next)| -f64::from(row.get(next as usize).copied().unwrap_or(f32::NEG_INFINITY)))
            .sum();
        Ok((nll / (ids.len() - 1) as f64).exp())
    }
}
