//! The safetensors header and the shard index: input starting with `{` is a
//! `model.safetensors.index.json` (resolved against a folder holding one shard), anything else a
//! `model.safetensors` whose tensors are all listed, shape-checked and read.

mod scratch;

use nibble_load::weights::Weights;
use nibble_load::ModelFiles;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if data.first() == Some(&b'{') {
            let dir = scratch::dir().join("model");
            let _ = std::fs::create_dir_all(&dir);
            let _ = std::fs::write(dir.join("config.json"), b"{}");
            let _ = std::fs::write(dir.join("model-00001-of-00001.safetensors"), b"");
            let _ = std::fs::write(dir.join("model.safetensors.index.json"), data);
            let _ = ModelFiles::from_dir(&dir);
            return;
        }
        let path = scratch::write("model.safetensors", data);
        let Ok(w) = Weights::open(&[path]) else { return };
        for name in w.names().into_iter().map(str::to_string).collect::<Vec<_>>() {
            if let Some(shape) = w.shape(&name).map(<[usize]>::to_vec) {
                let _ = w.check_shape(&name, &shape);
            }
            let _ = w.raw(&name);
            let _ = w.tensor(&name, &candle_core::Device::Cpu);
        }
    });
}
