//! Rotary position embeddings with transformers' frequency rules.

use nibble_quant::kernels::Precision;
use candle_core::{DType, Device, Tensor};
use nibble_core::Result;
use nibble_load::{ModelConfig, RopeScaling};

/// Inverse frequencies; cos/sin tables are made per forward for just the positions it needs, so
/// a 128k-context model costs nothing until it is used at that length.
#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
}

impl Rope {
    /// Frequencies for `cfg` (default, linear or llama3 scaling).
    pub fn new(cfg: &ModelConfig) -> Result<Self> {
        let dim = cfg.rotary_dim;
        let base: Vec<f64> = (0..dim / 2).map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f64 / dim as f64)).collect();
        let scaled: Vec<f64> = match cfg.rope_scaling {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        Ok(Self { inv_freq: scaled.iter().map(|&f| f as f32).collect() })
    }

    /// cos and sin of position `pos`, `head_dim / 2` values each (the host decode step's),
    /// rounded to the model dtype as transformers casts them.
    pub(crate) fn cos_sin_host(&self, pos: usize, dtype: Precision) -> (Vec<f32>, Vec<f32>) {
        // The same f32 angle as `cos_sin`.
        let angle = |f: f32| pos as f32 * f;
        let (mut cos, mut sin): (Vec<f32>, Vec<f32>) =
            self.inv_freq.iter().map(|&f| angle(f).cos()).zip(self.inv_freq.iter().map(|&f| angle(f).sin())).unzip();
        dtype.round_slice(&mut cos);
        dtype.round_slice(&mut sin);
        (cos, sin)
    }

    /// cos and sin, each `[len, head_dim / 2]` in `dtype`, for positions `start..start + len`.
    pub fn cos_sin(&self, start: usize, len: usize, dtype: DType, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for &f in &self.inv_freq {
                // transformers forms the angle as an f32 product.
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let cos = Tensor::from_vec(cos, (len, half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (len, half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }
}
