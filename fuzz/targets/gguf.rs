//! The GGUF header, metadata and tensor infos, then the model config built from them and the
//! tensors' extents (nothing is dequantized: that is candle's, on checked extents).

mod scratch;

use nibble_load::GgufFile;

fn main() {
    afl::fuzz!(|data: &[u8]| {
        if nibble_load::gguf_header::read(data).is_err() {
            return;
        }
        let path = scratch::write("model.gguf", data);
        let Ok(g) = GgufFile::open(&path) else { return };
        let _ = g.tensor_names().count();
        let _ = g.config();
    });
}
