//! bitsandbytes' 4-bit quant_state JSON, and the sizes a loader derives from it.

use nibble_quant::quant_state::QuantState;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(s) = QuantState::parse(data, "model.layers.0.mlp.up_proj.weight.quant_state.bitsandbytes__nf4") else {
            return;
        };
        let numel = s.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if let Some(n) = numel {
            let _ = (n.div_ceil(2), n.div_ceil(s.blocksize));
        }
    });
}
