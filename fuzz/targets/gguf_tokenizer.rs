//! A tokenizer built from GGUF metadata (vocabulary, merges, token types, pre-tokenizer), then
//! used: a text encoded and decoded again.

mod scratch;

use nibble_load::{GgufFile, GgufTokenizer};

fn main() {
    afl::fuzz!(|data: &[u8]| {
        let path = scratch::write("tokenizer.gguf", data);
        let Ok(g) = GgufFile::open(&path) else { return };
        let Ok(tok) = GgufTokenizer::from_gguf(&g) else { return };
        let Ok(text) = tok.text_tokenizer(&path) else { return };
        if let Ok(ids) = text.encode("Hello, world! 123 héllo\n", true) {
            let _ = text.decode(&ids, false);
        }
    });
}
