//! Upper bounds on the sizes a model file may declare.
//!
//! A config.json or GGUF header is a few hundred bytes that anyone can write; every size in it
//! becomes an allocation, a loop bound or a factor of a product somewhere downstream. Each
//! dimension is therefore checked against a bound here, where it is read, so that nothing later
//! can be asked to allocate 2^62 layers or overflow a product of two dimensions.
//!
//! The bounds sit far above every released model (Llama 3.1 405B: 126 layers, hidden 16384,
//! intermediate 53248; the largest vocabularies are ~262k; the longest trained contexts ~10M)
//! and low enough that the largest product of them, `vocab * hidden` or `layers * intermediate *
//! hidden`, stays below 2^53 elements, well inside `u64`/`usize` on a 64-bit host.

/// The bound on each dimension field, by its Hugging Face config.json name.
const LIMITS: [(&str, u64); 10] = [
    ("num_hidden_layers", 1 << 12),
    ("hidden_size", 1 << 17),
    ("intermediate_size", 1 << 20),
    ("num_attention_heads", 1 << 12),
    ("num_key_value_heads", 1 << 12),
    ("head_dim", 1 << 13),
    ("vocab_size", 1 << 24),
    ("max_position_embeddings", 1 << 27),
    ("sliding_window", 1 << 27),
    ("max_window_layers", 1 << 12),
];

/// The bound on `field` (a config.json name), or `None` for fields that are not sizes.
pub fn limit(field: &str) -> Option<u64> {
    LIMITS.iter().find(|(name, _)| *name == field).map(|(_, n)| *n)
}

/// The config.json name of a GGUF metadata key (`llama.block_count` -> `num_hidden_layers`), for
/// the keys that carry a bounded size.
pub fn hf_field_of_gguf_key(key: &str) -> Option<&'static str> {
    let (_, rest) = key.split_once('.')?;
    Some(match rest {
        "block_count" => "num_hidden_layers",
        "embedding_length" => "hidden_size",
        "feed_forward_length" => "intermediate_size",
        "attention.head_count" => "num_attention_heads",
        "attention.head_count_kv" => "num_key_value_heads",
        "attention.key_length" => "head_dim",
        "context_length" => "max_position_embeddings",
        _ => return None,
    })
}

/// `n` when it is within the bound of `field`, else why not (the bound and what it is for).
pub fn check(field: &str, n: u64) -> std::result::Result<u64, String> {
    match limit(field) {
        Some(max) if n > max => Err(format!(
            "{n} is beyond nibble's bound of {max} for this field (far above any released model; \
             a value this large is a damaged or hostile file)"
        )),
        _ => Ok(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_apply_by_name_and_gguf_keys_map_to_them() {
        assert!(check("num_hidden_layers", 126).is_ok());
        assert!(check("num_hidden_layers", 4_611_686_018_427_387_904).is_err());
        assert!(check("rms_norm_eps", u64::MAX).is_ok());
        assert_eq!(hf_field_of_gguf_key("llama.block_count"), Some("num_hidden_layers"));
        assert_eq!(hf_field_of_gguf_key("qwen2.attention.head_count_kv"), Some("num_key_value_heads"));
        assert_eq!(hf_field_of_gguf_key("general.alignment"), None);
        // The largest products of bounded dimensions stay far from overflow.
        let (l, h, i, v) = (limit("num_hidden_layers"), limit("hidden_size"), limit("intermediate_size"), limit("vocab_size"));
        let (l, h, i, v) = (l.unwrap(), h.unwrap(), i.unwrap(), v.unwrap());
        assert!(l.checked_mul(h).and_then(|x| x.checked_mul(i)).is_some_and(|x| x < 1 << 53));
        assert!(v.checked_mul(h).is_some_and(|x| x < 1 << 53));
    }
}
