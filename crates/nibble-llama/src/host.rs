//! The decode step and the generation prefill of a CPU layer, on plain host buffers.
//!
//! A decode step is one token through every layer: a few hundred small operations per token.
//! Through candle each is a tensor with its own allocation, dispatch and layout checks, which
//! together cost as much as reading the weights. Here a layer's step is a handful of loops over
//! `Vec<f32>`, the linear layers are called through [`QuantLinear::forward_f32`], and the keys
//! and values live in a growable host buffer that the step appends to instead of copying
//! ([`HostKv`]). The arithmetic is the candle path's, op for op (RMSNorm, rotate-half RoPE,
//! scaled dot-product attention with max-subtracted exponentials, SiLU): f32 values rounded to
//! the model dtype wherever transformers' op returns a tensor of that dtype, so both paths agree
//! to float rounding. A one-sequence prompt chunk whose last logits alone are wanted (a
//! generation's prefill) runs the same code with every position a row of the products
//! ([`Llama::layer_prefill_host`]); scoring every position (perplexity) and the batched or
//! windowed cases stay on candle's tensors, and all share the same cache.

use std::borrow::Cow;

use candle_core::{Device, Tensor};
use nibble_core::{Error, Result};
use nibble_quant::kernels::{dot_f32, for_each_chunk_mut, Precision, Rows};
use nibble_quant::AdapterSel;

use crate::{GateUp, Layer, Llama, Qkv};

/// Keys and values of one layer in host memory, `[batch, kv_heads, capacity, head_dim]` each,
/// held in the model dtype (16-bit models keep the bit patterns: the values are already rounded
/// to it, so nothing is lost, and the cache is the size the planner counts). Appending grows the
/// capacity geometrically, so a token costs its own keys and values, not a copy of the whole
/// cache. Under an attention window `w` the capacity stops at `w` and position `p` lives in slot
/// `p % w`: the window the next query sees (itself and `w - 1` before it), never more.
#[derive(Debug, Clone)]
pub(crate) struct HostKv {
    batch: usize,
    heads: usize,
    head_dim: usize,
    /// Positions appended so far.
    seen: usize,
    cap: usize,
    window: Option<usize>,
    k: Buf,
    v: Buf,
}

/// Cached values in the model dtype.
#[derive(Debug, Clone)]
enum Buf {
    F32(Vec<f32>),
    /// bf16 or f16 bit patterns.
    Half(Vec<u16>, Precision),
}

impl Buf {
    fn new(p: Precision) -> Self {
        match p {
            Precision::F32 => Buf::F32(Vec::new()),
            half => Buf::Half(Vec::new(), half),
        }
    }

    fn len(&self) -> usize {
        match self {
            Buf::F32(v) => v.len(),
            Buf::Half(v, _) => v.len(),
        }
    }

    fn elem_bytes(&self) -> usize {
        match self {
            Buf::F32(_) => 4,
            Buf::Half(..) => 2,
        }
    }

    /// A copy with room for `cap` positions per head (of `old_cap`), keeping the first `len`.
    fn regrow(&self, heads: usize, d: usize, len: usize, old_cap: usize, cap: usize) -> Self {
        fn grow<T: Copy + Default>(old: &[T], heads: usize, d: usize, len: usize, old_cap: usize, cap: usize) -> Vec<T> {
            let mut new = vec![T::default(); heads * cap * d];
            for (dst, src) in new.chunks_exact_mut(cap * d).zip(old.chunks_exact((old_cap * d).max(1))) {
                dst[..len * d].copy_from_slice(&src[..len * d]);
            }
            new
        }
        match self {
            Buf::F32(v) => Buf::F32(grow(v, heads, d, len, old_cap, cap)),
            Buf::Half(v, p) => Buf::Half(grow(v, heads, d, len, old_cap, cap), *p),
        }
    }

    /// Writes positions `j0..j0 + n` of each head of `src` (`[heads, t, d]`) into slots
    /// `slot..slot + n` of each head's `cap * d` values.
    fn write(&mut self, src: &[f32], (cap_d, d, t): (usize, usize, usize), slot: usize, (j0, n): (usize, usize)) {
        let rows = src.chunks_exact((t * d).max(1)).map(|h| h.get(j0 * d..(j0 + n) * d).unwrap_or(&[]));
        let at = slot * d;
        match self {
            Buf::F32(v) => {
                for (dst, s) in v.chunks_exact_mut(cap_d.max(1)).zip(rows) {
                    if let Some(dst) = dst.get_mut(at..at + s.len()) {
                        dst.copy_from_slice(s);
                    }
                }
            }
            Buf::Half(v, p) => {
                let p = *p;
                for (dst, s) in v.chunks_exact_mut(cap_d.max(1)).zip(rows) {
                    if let Some(dst) = dst.get_mut(at..at + s.len()) {
                        dst.iter_mut().zip(s).for_each(|(d, &x)| *d = to_bits(p, x));
                    }
                }
            }
        }
    }

    /// Values `range` as they are held (empty when out of range).
    fn rows(&self, range: std::ops::Range<usize>) -> Rows<'_> {
        match self {
            Buf::F32(v) => Rows::F32(v.get(range).unwrap_or(&[])),
            Buf::Half(v, Precision::F16) => Rows::F16(v.get(range).unwrap_or(&[])),
            Buf::Half(v, _) => Rows::Bf16(v.get(range).unwrap_or(&[])),
        }
    }

    /// Values `range` as f32: borrowed for f32, widened for 16-bit (empty when out of range).
    fn read(&self, range: std::ops::Range<usize>) -> Cow<'_, [f32]> {
        match self {
            Buf::F32(v) => Cow::Borrowed(v.get(range).unwrap_or(&[])),
            Buf::Half(v, p) => Cow::Owned(v.get(range).unwrap_or(&[]).iter().map(|&b| from_bits(*p, b)).collect()),
        }
    }
}

/// The 16-bit pattern of a value already rounded to `p` (exact).
#[inline]
fn to_bits(p: Precision, x: f32) -> u16 {
    match p {
        Precision::F16 => half::f16::from_f32(x).to_bits(),
        _ => (x.to_bits() >> 16) as u16,
    }
}

/// The f32 value of a 16-bit pattern of `p`.
#[inline]
fn from_bits(p: Precision, b: u16) -> f32 {
    match p {
        Precision::F16 => half::f16::from_bits(b).to_f32(),
        _ => f32::from_bits(u32::from(b) << 16),
    }
}

impl HostKv {
    /// An empty cache for `batch x heads` key/value heads of `head_dim`, in the model dtype `p`,
    /// for a layer with attention window `window`.
    pub(crate) fn new(batch: usize, heads: usize, head_dim: usize, p: Precision, window: Option<usize>) -> Self {
        Self { batch, heads, head_dim, seen: 0, cap: 0, window, k: Buf::new(p), v: Buf::new(p) }
    }

    /// Positions appended so far.
    pub(crate) fn seen(&self) -> usize {
        self.seen
    }

    /// Positions held: all of them, or the last `window` under a window.
    pub(crate) fn kept(&self) -> usize {
        self.window.map_or(self.seen, |w| self.seen.min(w))
    }

    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        (self.k.len() + self.v.len()) * self.k.elem_bytes()
    }

    /// Whether the first `len` positions are all still held (a window's ring may have
    /// overwritten them).
    pub(crate) fn can_truncate(&self, len: usize) -> bool {
        len >= self.seen || self.kept() == self.seen
    }

    /// Keeps the first `len` positions, which [`HostKv::can_truncate`] said are held; their slots
    /// are untouched, later appends overwrite the rest.
    pub(crate) fn truncate(&mut self, len: usize) {
        self.seen = self.seen.min(len);
    }

    /// Positions `pos..pos + n` as runs of consecutive slots `(slot, first position offset, len)`:
    /// one run, or two where a window's ring wraps (the second is empty when it does not).
    fn runs(&self, pos: usize, n: usize) -> [(usize, usize, usize); 2] {
        let (slot, first) = match self.window {
            Some(w) => (pos % w.max(1), n.min(w - pos % w.max(1))),
            None => (pos, n),
        };
        [(slot, 0, first), (0, first, n - first)]
    }

    /// Appends `t` positions of keys and values, each `[batch, heads, t, head_dim]`, values of
    /// the model dtype.
    pub(crate) fn append(&mut self, k: &[f32], v: &[f32], t: usize) -> Result<()> {
        let (bh, d) = (self.batch * self.heads, self.head_dim);
        if k.len() != bh * t * d || v.len() != k.len() {
            return Err(Error::invalid_argument(
                "kv cache",
                format!("{} key values for {bh} heads x {t} positions x {d}", k.len()),
            ));
        }
        let want = match self.window {
            Some(w) => (self.seen + t).min(w),
            None => self.seen + t,
        };
        if want > self.cap {
            let cap = want.max(2 * self.cap).max(64);
            let cap = self.window.map_or(cap, |w| cap.min(w));
            // Before a window first fills, slots are positions, so growing keeps them in place.
            let kept = self.kept();
            self.k = self.k.regrow(bh, d, kept, self.cap, cap);
            self.v = self.v.regrow(bh, d, kept, self.cap, cap);
            self.cap = cap;
        }
        // Under a window only the last `window` of these positions are ever seen again.
        let skip = self.window.map_or(0, |w| t.saturating_sub(w));
        for (slot, off, n) in self.runs(self.seen + skip, t - skip) {
            self.k.write(k, (self.cap * d, d, t), slot, (skip + off, n));
            self.v.write(v, (self.cap * d, d, t), slot, (skip + off, n));
        }
        self.seen += t;
        Ok(())
    }

    /// The kept keys and values as `[batch, heads, kept, head_dim]` f32 tensors in position
    /// order (copies), for the candle attention of a prefill step.
    pub(crate) fn tensors(&self, device: &Device) -> Result<(Tensor, Tensor)> {
        let (d, kept) = (self.head_dim, self.kept());
        let first = self.seen - kept;
        let runs = self.runs(first, kept);
        let gather = |buf: &Buf| -> Vec<f32> {
            let mut all = Vec::with_capacity(self.batch * self.heads * kept * d);
            for h in 0..self.batch * self.heads {
                let start = h * self.cap * d;
                for &(slot, _, n) in &runs {
                    all.extend_from_slice(&buf.read(start + slot * d..start + (slot + n) * d));
                }
            }
            all
        };
        let shape = (self.batch, self.heads, kept, d);
        Ok((Tensor::from_vec(gather(&self.k), shape, device)?, Tensor::from_vec(gather(&self.v), shape, device)?))
    }

    /// Keys and values of head `h` of batch row `b` as held: `kept` rows of `head_dim` each, in
    /// slot order (attention sums over them, so the order is immaterial; empty for a head
    /// outside the cache).
    fn head(&self, b: usize, h: usize) -> (Rows<'_>, Rows<'_>) {
        let start = (b * self.heads + h) * self.cap * self.head_dim;
        let range = start..start + self.kept() * self.head_dim;
        (self.k.rows(range.clone()), self.v.rows(range))
    }
}

/// transformers' `LlamaRMSNorm` per row of `w.len()` values: `w * (x * rsqrt(mean(x^2) + eps))`,
/// the normalized value and the product each rounded to `p`, the model dtype (as the tensor
/// path's `Llama::rms_norm`).
fn rms_norm(x: &[f32], w: &[f32], eps: f64, p: Precision) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()];
    for (row, o) in x.chunks_exact(w.len().max(1)).zip(out.chunks_exact_mut(w.len().max(1))) {
        let sum2 = dot_f32(row, row);
        let inv = 1.0 / (sum2 / row.len() as f32 + eps as f32).sqrt();
        // Whole-row loops around each rounding, so that every one vectorizes.
        o.iter_mut().zip(row).for_each(|(o, &v)| *o = v * inv);
        p.round_slice(o);
        o.iter_mut().zip(w).for_each(|(o, &g)| *o *= g);
        p.round_slice(o);
    }
    out
}

/// Rotate-half RoPE of the first `2 * cos.len()` values of every `head_dim`-wide head in `x`, in
/// place (the rest pass through): `x * cos + rotate_half(x) * sin` with both products and the sum
/// rounded to `p` (candle's fused `rope` for f32).
fn rope(x: &mut [f32], head_dim: usize, cos: &[f32], sin: &[f32], p: Precision) {
    let half = cos.len();
    // The four products of a head for the 16-bit case, each rounded as a whole slice (so that
    // the roundings vectorize), reused from head to head.
    let mut prods = if p == Precision::F32 { Vec::new() } else { vec![0.0f32; 4 * half] };
    for head in x.chunks_exact_mut(head_dim.max(1)) {
        let Some(rotated) = head.get_mut(..2 * half) else { continue };
        let (a, b) = rotated.split_at_mut(half);
        if p == Precision::F32 {
            for (((x1, x2), &c), &s) in a.iter_mut().zip(b.iter_mut()).zip(cos).zip(sin) {
                let (u, v) = (*x1, *x2);
                *x1 = u * c - v * s;
                *x2 = u * s + v * c;
            }
            continue;
        }
        let (uc, rest) = prods.split_at_mut(half);
        let (vs, rest) = rest.split_at_mut(half);
        let (vc, us) = rest.split_at_mut(half);
        for j in 0..half.min(a.len()).min(b.len()).min(sin.len()) {
            let (u, v, c, s) = (a[j], b[j], cos[j], sin[j]);
            (uc[j], vs[j], vc[j], us[j]) = (u * c, v * s, v * c, u * s);
        }
        p.round_slice(&mut prods);
        let (uc, rest) = prods.split_at(half);
        let (vs, rest) = rest.split_at(half);
        let (vc, us) = rest.split_at(half);
        for j in 0..half.min(a.len()).min(b.len()) {
            a[j] = uc[j] - vs[j];
            b[j] = vc[j] + us[j];
        }
        p.round_slice(a);
        p.round_slice(b);
    }
}

/// Splits `rows` rows of `y` into consecutive column blocks of the given widths (a fused
/// projection's outputs: q, k, v or gate, up), each `rows x width`.
fn split_columns(y: &[f32], rows: usize, widths: &[usize]) -> Vec<Vec<f32>> {
    let total: usize = widths.iter().sum();
    let mut out: Vec<Vec<f32>> = widths.iter().map(|w| Vec::with_capacity(rows * w)).collect();
    for row in y.chunks_exact(total.max(1)) {
        let mut at = 0;
        for (o, &w) in out.iter_mut().zip(widths) {
            o.extend_from_slice(row.get(at..at + w).unwrap_or(&[]));
            at += w;
        }
    }
    out
}

/// `[t, heads, d]` (positions major) as `[heads, t, d]`.
fn heads_major(x: &[f32], t: usize, heads: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len());
    for h in 0..heads {
        for i in 0..t {
            out.extend_from_slice(x.get((i * heads + h) * d..(i * heads + h + 1) * d).unwrap_or(&[]));
        }
    }
    out
}

/// `g <- silu(g) * u` (SiLU of the gate times the up projection), the SiLU and the product each
/// rounded to `p`, as candle's `silu` then a product, but with an `exp` the compiler
/// vectorizes: libm's `expf` one value at a time was the costliest loop of a decode step left
/// on one thread. Within a few f32 ulps of the libm version for finite inputs.
fn silu_mul(g: &mut [f32], u: &[f32], p: Precision) {
    if p == Precision::F32 {
        for (g, &u) in g.iter_mut().zip(u) {
            *g = *g / (1.0 + exp_f32(-*g)) * u;
        }
        return;
    }
    for g in g.iter_mut() {
        *g = *g / (1.0 + exp_f32(-*g));
    }
    p.round_slice(g);
    g.iter_mut().zip(u).for_each(|(g, &u)| *g *= u);
    p.round_slice(g);
}

/// `exp(x)` for f32 in branch-free arithmetic (so loops over it vectorize): `2^n * e^r` with
/// `n = round(x / ln 2)`, `r` reduced in two steps (Cody-Waite) and `e^r` by Cephes' `expf`
/// polynomial, about 1 ulp. `x` is clamped to `[-87, 88]` so that `2^n` stays a normal f32,
/// which the two callers cannot notice: the softmax's arguments are at most 0, and where SiLU's
/// `exp(-g)` leaves that range, `g / (1 + exp(-g))` is either `g` (below, `exp` is under 2^-125)
/// or under 1e-36 in magnitude (above). NaN stays NaN.
#[inline(always)]
fn exp_f32(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer (to nearest even) and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 + n * 2.121_944_4e-4;
    let p = 1.987_569_1e-4_f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^n: n + 127 in the exponent field (`shifted`'s low bits hold n + 2^22).
    let n_int = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    er * f32::from_bits(((n_int + 127) as u32) << 23)
}

/// The exponentials of a softmax in place, max-subtracted, with [`exp_f32`]; returns their
/// f32 sum (the flash kernel divides by it after the product with V).
fn softmax_exp(s: &mut [f32]) -> f32 {
    let max = s.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in s.iter_mut() {
        *v = exp_f32(*v - max);
        sum += *v;
    }
    sum
}

/// Attention work (query heads x positions x head_dim) above which heads run in parallel: a few
/// microseconds, since handing work to the kernel team costs well under one.
const PAR_ATTENTION_MACS: usize = 1 << 13;

impl Llama {
    /// Whether a layer on `device` runs its decode steps on host buffers.
    pub(crate) fn host_path(&self, device: &Device) -> bool {
        device.is_cpu()
    }

    /// One token per batch row through `layer`: `x` is `[batch, 1, hidden]` at the position
    /// whose RoPE cos and sin are `rot` ([`crate::Rope::cos_sin_host`]), every row in `kv`.
    pub(crate) fn layer_step_host(
        &self,
        layer: &Layer,
        x: &Tensor,
        (cos, sin): &(Vec<f32>, Vec<f32>),
        kv: &mut HostKv,
        sel: AdapterSel<'_>,
    ) -> Result<Tensor> {
        let (b, _, h) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let p = self.precision();
        let xs: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let xs = self.layer_rows(layer, xs, b, sel, |q: &mut [f32], k: &mut [f32], v: &[f32]| {
            rope(q, hd, cos, sin, p);
            rope(k, hd, cos, sin, p);
            // `[batch, kv_heads, head_dim]` is `[batch, kv_heads, 1, head_dim]`: one position.
            kv.append(k, v, 1)?;
            let seqs: Vec<(&HostKv, usize, usize)> = (0..b).map(|bi| (&*kv, bi, usize::MAX)).collect();
            self.attend(q, &seqs, nh, nkv, hd)
        })?;
        Ok(Tensor::from_vec(xs, (b, 1, h), &Device::Cpu)?)
    }

    /// One token for each of several sequences through `layer`, each with its own cache and
    /// position: `xs` is `[n, hidden]`, row `i` at the position whose cos and sin are `rots[i]`,
    /// attending over `kvs[i]` (a batch of one). The products run on all rows together; the
    /// attention per row, so no row is padded to another's length.
    pub(crate) fn layer_step_rows(
        &self,
        layer: &Layer,
        xs: Vec<f32>,
        rots: &[(Vec<f32>, Vec<f32>)],
        kvs: &mut [&mut HostKv],
        sel: AdapterSel<'_>,
    ) -> Result<Vec<f32>> {
        let n = kvs.len();
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let kw = nkv * hd;
        if rots.len() != n {
            return Err(Error::invalid_argument("rots", format!("{} positions for {n} sequences", rots.len())));
        }
        self.layer_rows(layer, xs, n, sel, |q: &mut [f32], k: &mut [f32], v: &[f32]| {
            self.rope_rows(q, k, rots);
            for (i, kv) in kvs.iter_mut().enumerate() {
                kv.append(&k[i * kw..(i + 1) * kw], &v[i * kw..(i + 1) * kw], 1)?;
            }
            // Every row's heads in one hand-off to the kernel team, so the two cores share
            // the whole batch's attention instead of one row's few heads at a time.
            let seqs: Vec<(&HostKv, usize, usize)> = kvs.iter().map(|kv| (&**kv, 0, usize::MAX)).collect();
            self.attend(q, &seqs, nh, nkv, hd)
        })
    }

    /// Whether a prompt chunk of `t` positions after the `cache.len()` cached ones, in a batch of
    /// `batch`, runs on host buffers when only its last logits are asked for (a generation's
    /// prefill; scoring every position always runs on tensors): one sequence, every layer on
    /// the CPU with its keys and values on the host (or none yet), and no attention window that
    /// the chunk's positions could leave (so slots are positions and a causal limit is the
    /// whole mask).
    pub fn prefills_on_host(&self, batch: usize, t: usize, cache: &crate::KvCache) -> bool {
        let end = cache.len().saturating_add(t);
        batch == 1
            && t > 1
            && self.layers.iter().all(|l| self.host_path(&l.device) && l.window.is_none_or(|w| end <= w))
            && cache.layers.len() == self.layers.len()
            && cache.layers.iter().all(|s| matches!(s, crate::Slot::Empty | crate::Slot::Host(_)))
    }

    /// A prompt chunk through `layer` on host buffers: `xs` is `[t, hidden]`, row `i` at the
    /// position whose cos and sin are `rots[i]` (the `t` positions after the `kv.seen()` cached
    /// ones). Every position is a row of the products (the blocked 4-bit kernel reads each
    /// weight once for all of them); the keys and values are appended to `kv`, then each row
    /// attends over the cache up to its own position: the candle path's ops and roundings
    /// without its tensors.
    pub(crate) fn layer_prefill_host(
        &self,
        layer: &Layer,
        xs: Vec<f32>,
        rots: &[(Vec<f32>, Vec<f32>)],
        kv: &mut HostKv,
        sel: AdapterSel<'_>,
    ) -> Result<Vec<f32>> {
        let t = rots.len();
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let offset = kv.seen();
        self.layer_rows(layer, xs, t, sel, |q: &mut [f32], k: &mut [f32], v: &[f32]| {
            self.rope_rows(q, k, rots);
            // `[t, kv_heads, d]` rows to the cache's `[kv_heads, t, d]`.
            kv.append(&heads_major(k, t, nkv, hd), &heads_major(v, t, nkv, hd), t)?;
            let seqs: Vec<(&HostKv, usize, usize)> = (0..t).map(|i| (&*kv, 0, offset + i + 1)).collect();
            self.attend(q, &seqs, nh, nkv, hd)
        })
    }

    /// RoPE of each row of `q` and `k` (`[rows, heads * head_dim]`) at the position whose cos and
    /// sin are `rots[row]`.
    fn rope_rows(&self, q: &mut [f32], k: &mut [f32], rots: &[(Vec<f32>, Vec<f32>)]) {
        let hd = self.cfg.head_dim;
        let (qw, kw) = (self.cfg.num_attention_heads * hd, self.cfg.num_key_value_heads * hd);
        let p = self.precision();
        for (i, (cos, sin)) in rots.iter().enumerate() {
            if let (Some(qi), Some(ki)) = (q.get_mut(i * qw..(i + 1) * qw), k.get_mut(i * kw..(i + 1) * kw)) {
                rope(qi, hd, cos, sin, p);
                rope(ki, hd, cos, sin, p);
            }
        }
    }

    /// The layer on `b` rows of `xs` (`[b, hidden]`), with `attention(q, k, v)` turning the
    /// rows' projections (after any q/k norm) into the attention output `[b, heads * head_dim]`
    /// (RoPE, the cache and the attention itself are the caller's).
    fn layer_rows<F>(&self, layer: &Layer, mut xs: Vec<f32>, b: usize, sel: AdapterSel<'_>, attention: F) -> Result<Vec<f32>>
    where
        F: FnOnce(&mut [f32], &mut [f32], &[f32]) -> Result<Vec<f32>>,
    {
        let eps = self.cfg.rms_norm_eps;
        let p = self.precision();
        let hn = rms_norm(&xs, &layer.input_norm.host, eps, p);
        // Each product is split across the kernel team (see `nibble_quant::kernels::for_each_index`),
        // so they run one after another.
        let (mut q, mut k, v) = match &layer.qkv {
            Qkv::Separate { q, k, v } => (q.forward_f32_sel(&hn, b, sel)?, k.forward_f32_sel(&hn, b, sel)?, v.forward_f32_sel(&hn, b, sel)?),
            Qkv::Fused(qkv) => {
                let (qw, kw) = (self.cfg.q_width(), self.cfg.kv_width());
                let mut parts = split_columns(&qkv.forward_f32_sel(&hn, b, sel)?, b, &[qw, kw, kw]).into_iter();
                let mut next = || parts.next().unwrap_or_default();
                (next(), next(), next())
            }
        };
        // Per-head RMSNorm (Qwen3): every head_dim values are one row.
        if let Some(n) = &layer.q_norm {
            q = rms_norm(&q, &n.host, eps, p);
        }
        if let Some(n) = &layer.k_norm {
            k = rms_norm(&k, &n.host, eps, p);
        }
        let attn = attention(&mut q, &mut k, &v)?;
        let o = layer.o.forward_f32_sel(&attn, b, sel)?;
        xs.iter_mut().zip(&o).for_each(|(x, o)| *x += o);
        p.round_slice(&mut xs);

        let hn = rms_norm(&xs, &layer.post_norm.host, eps, p);
        let (mut act, up) = match &layer.gate_up {
            GateUp::Separate { gate, up } => (gate.forward_f32_sel(&hn, b, sel)?, up.forward_f32_sel(&hn, b, sel)?),
            GateUp::Fused(gu) => {
                let inter = self.cfg.intermediate_size;
                let mut parts = split_columns(&gu.forward_f32_sel(&hn, b, sel)?, b, &[inter, inter]).into_iter();
                let mut next = || parts.next().unwrap_or_default();
                (next(), next())
            }
        };
        silu_mul(&mut act, &up, p);
        let down = layer.down.forward_f32_sel(&act, b, sel)?;
        xs.iter_mut().zip(&down).for_each(|(x, d)| *x += d);
        p.round_slice(&mut xs);
        Ok(xs)
    }

    /// Scaled dot-product attention of one query position per sequence (`q` is
    /// `[seqs, heads, head_dim]`; sequence `i` is batch row `seqs[i].1` of the cache `seqs[i].0`)
    /// over the first `seqs[i].2` positions its cache holds (all of them, at most); returns
    /// `[seqs, heads * head_dim]`.
    /// As torch's CPU flash kernel: f32 scores, the max-subtracted exponentials rounded to the
    /// model dtype for the product with V, accumulated in f32 and divided by the f32 sum of the
    /// unrounded exponentials at the end, then rounded once.
    fn attend(&self, q: &[f32], seqs: &[(&HostKv, usize, usize)], nh: usize, nkv: usize, hd: usize) -> Result<Vec<f32>> {
        let rep = nh / nkv.max(1);
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        let p = self.precision();
        // The cache is read as held (16-bit models: bit patterns, widened in registers).
        let head = |i: usize, out: &mut [f32]| {
            let (si, hi) = (i / nh, i % nh);
            let Some(&(kv, bi, upto)) = seqs.get(si) else { return };
            let t = kv.kept().min(upto);
            let qh = &q[i * hd..(i + 1) * hd];
            let (keys, values) = kv.head(bi, hi / rep);
            let mut s = vec![0.0f32; t];
            keys.dots(hd, qh, &mut s);
            s.iter_mut().for_each(|v| *v *= scale);
            let sum = softmax_exp(&mut s);
            p.round_slice(&mut s);
            values.weighted_sum(hd, &s, out);
            out.iter_mut().for_each(|o| *o /= sum);
            p.round_slice(out);
        };
        let mut out = vec![0.0f32; seqs.len() * nh * hd];
        if q.len() != out.len() {
            return Err(Error::invalid_argument("query", format!("{} values for {} x {nh} heads of {hd}", q.len(), seqs.len())));
        }
        let work: usize = seqs.iter().map(|(kv, _, upto)| kv.kept().min(*upto)).sum::<usize>().saturating_mul(nh * hd);
        if work >= PAR_ATTENTION_MACS {
            for_each_chunk_mut(&mut out, hd, head);
        } else {
            for (i, o) in out.chunks_mut(hd).enumerate() {
                head(i, o);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Held values as f32.
    fn widen(r: Rows<'_>) -> Vec<f32> {
        match r {
            Rows::F32(v) => v.to_vec(),
            Rows::Bf16(v) => v.iter().map(|&b| half::bf16::from_bits(b).to_f32()).collect(),
            Rows::F16(v) => v.iter().map(|&b| half::f16::from_bits(b).to_f32()).collect(),
        }
    }

    /// The vectorizable `exp` and SiLU agree with libm's within a few ulps over the range that
    /// matters, and keep NaN.
    #[test]
    fn exp_and_silu_match_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x <= 88.0 {
            let (got, want) = (f64::from(exp_f32(x)), f64::from(x.exp()));
            worst = worst.max((got - want).abs() / want);
            x += 0.0137;
        }
        assert!(worst < 4.0 * f64::from(f32::EPSILON), "exp: worst relative error {worst:e}");
        let gs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.01).collect();
        let us: Vec<f32> = gs.iter().map(|g| 1.0 + g.abs() * 0.5).collect();
        let mut act = gs.clone();
        silu_mul(&mut act, &us, Precision::F32);
        for ((&g, &u), &a) in gs.iter().zip(&us).zip(&act) {
            let want = g / (1.0 + (-g).exp()) * u;
            assert!((a - want).abs() <= 4.0 * f32::EPSILON * want.abs() + 1e-30, "silu({g}) * {u}: {a} vs {want}");
        }
        assert!(exp_f32(f32::NAN).is_nan());
        assert_eq!(exp_f32(-200.0), (-87.0f32).exp());
    }

    /// Appending past the capacity (a prefill, then single positions across two regrowths)
    /// keeps every position where `tensors` and `head` read it; a wrongly sized append is an error.
    #[test]
    fn host_kv_grows_and_keeps_positions() -> Result<()> {
        let (b, heads, d) = (2, 3, 4);
        let mut kv = HostKv::new(b, heads, d, Precision::F32, None);
        // Value of (batch, head, position, i): distinct for every slot.
        let val = |bi: usize, h: usize, p: usize, i: usize| (((bi * 10 + h) * 1000 + p) * 10 + i) as f32;
        let step = |p0: usize, t: usize| -> Vec<f32> {
            let mut out = Vec::new();
            for bi in 0..b {
                for h in 0..heads {
                    for p in p0..p0 + t {
                        out.extend((0..d).map(|i| val(bi, h, p, i)));
                    }
                }
            }
            out
        };
        kv.append(&step(0, 5), &step(0, 5), 5)?;
        for p in 5..150 {
            let s = step(p, 1);
            kv.append(&s, &s, 1)?;
        }
        assert_eq!(kv.seen(), 150);
        let (k, v) = kv.tensors(&Device::Cpu)?;
        assert_eq!(k.dims(), &[b, heads, 150, d]);
        assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, step(0, 150));
        assert_eq!(v.flatten_all()?.to_vec1::<f32>()?, step(0, 150));
        let (keys, _) = kv.head(1, 2);
        assert_eq!(widen(keys).get(149 * d), Some(&val(1, 2, 149, 0)));
        assert!(kv.append(&[0.0; 3], &[0.0; 3], 1).is_err());
        Ok(())
    }

    /// Under a window the cache keeps the last `window` positions, in position order for
    /// `tensors` whether or not the ring has wrapped, through prefills longer than the window,
    /// single steps and a prefill that wraps; it can be truncated only before it wraps.
    #[test]
    fn windowed_host_kv_keeps_the_last_positions_in_order() -> Result<()> {
        let (b, heads, d, w) = (1, 2, 3, 8);
        // Distinct for every slot and exact in bf16 (the cache holds values of the model dtype).
        let val = |h: usize, p: usize, i: usize| (h * 40 + p) as f32 + 0.5 * i as f32;
        let step = |p0: usize, t: usize| -> Vec<f32> {
            (0..heads).flat_map(|h| (p0..p0 + t).flat_map(move |p| (0..d).map(move |i| val(h, p, i)))).collect()
        };
        for p in [Precision::F32, Precision::Bf16] {
            let mut kv = HostKv::new(b, heads, d, p, Some(w));
            kv.append(&step(0, 5), &step(0, 5), 5)?;
            assert!(kv.can_truncate(3));
            for pos in 5..13 {
                let s = step(pos, 1);
                kv.append(&s, &s, 1)?;
            }
            assert!(!kv.can_truncate(3), "the ring has overwritten position 3");
            // A prefill that wraps the ring, then one longer than the window.
            kv.append(&step(13, 6), &step(13, 6), 6)?;
            let want = |first: usize| step(first, w);
            let (k, _) = kv.tensors(&Device::Cpu)?;
            assert_eq!(k.dims(), &[b, heads, w, d]);
            assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, want(19 - w));
            kv.append(&step(19, 11), &step(19, 11), 11)?;
            let (_, v) = kv.tensors(&Device::Cpu)?;
            assert_eq!(v.flatten_all()?.to_vec1::<f32>()?, want(30 - w));
            assert_eq!((kv.seen(), kv.kept()), (30, w));
            assert_eq!(kv.bytes(), 2 * heads * w * d * if p == Precision::F32 { 4 } else { 2 });
        }
        Ok(())
    }

    /// A 16-bit model's cache holds 2 bytes a value and gives back exactly what it was handed
    /// (values already of that dtype), in both the tensor and the per-head reads.
    #[test]
    fn host_kv_in_sixteen_bits_is_exact_and_half_the_size() -> Result<()> {
        let (b, heads, d, t) = (1, 2, 8, 70);
        for p in [Precision::Bf16, Precision::F16] {
            let vals: Vec<f32> = (0..b * heads * t * d).map(|i| p.round((i as f32 * 0.37).sin() * 3.0)).collect();
            let mut kv = HostKv::new(b, heads, d, p, None);
            kv.append(&vals, &vals, t)?;
            let mut wide = HostKv::new(b, heads, d, Precision::F32, None);
            wide.append(&vals, &vals, t)?;
            assert_eq!(kv.bytes() * 2, wide.bytes());
            let (k, _) = kv.tensors(&Device::Cpu)?;
            assert_eq!(k.flatten_all()?.to_vec1::<f32>()?, vals);
            let (keys, values) = kv.head(0, 1);
            assert_eq!(widen(keys), &vals[t * d..]);
            assert_eq!(widen(values), &vals[t * d..]);
        }
        Ok(())
    }
}
