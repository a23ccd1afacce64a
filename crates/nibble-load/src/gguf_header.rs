//! A bounded reader of the GGUF header: magic, version, metadata and tensor infos.
//!
//! candle's `Content::read` trusts parts of the header: `general.alignment = 0` divides by zero
//! and a product of tensor dimensions may overflow. This reader checks every count, length and
//! offset against the bytes that are really there before it allocates anything, and produces the
//! same candle [`Content`] the rest of the loader works with. Its rules follow llama.cpp's
//! `gguf_init_from_file`: version 1 to 3, at most 4 dimensions, unique keys and tensor names, an
//! alignment that is a power of two, tensor offsets aligned to it.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::{Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::GgmlDType;

/// The alignment of the tensor data when `general.alignment` is absent (GGUF's default).
const DEFAULT_ALIGNMENT: u64 = 32;

/// Metadata arrays nest at most this deep (real files nest at most one level).
const MAX_DEPTH: usize = 4;

/// Items in one metadata array: the vocabulary bound ([`crate::limits`]); the largest arrays of
/// real files are the vocabulary and the merges. With it, the parsed metadata takes at most a
/// small multiple of the file's own bytes.
const MAX_ARRAY_ITEMS: u64 = 1 << 24;

/// GGML allows at most four dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// Reads the bytes of a GGUF file (`data`, usually a memory map) up to the tensor data.
/// The error says what is wrong and where, for a `CorruptGguf` error.
pub fn read(data: &[u8]) -> Result<Content, String> {
    let mut r = Reader { data, pos: 0, v1: false };
    let magic = r.take(4)?;
    if magic != b"GGUF" {
        return Err(format!("not a GGUF file: it starts with {magic:02x?} instead of the magic \"GGUF\""));
    }
    let magic = match r.u32()? {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return Err(format!("GGUF version {v} is not one of 1, 2, 3")),
    };
    r.v1 = magic == VersionedMagic::GgufV1;
    let tensor_count = r.len()?;
    let kv_count = r.len()?;
    // Each entry takes at least this many bytes, so a count the file cannot hold fails here.
    let prefix = r.prefix();
    r.fits(kv_count, prefix + 4 + 1, "metadata entries")?;
    r.fits(tensor_count, prefix + 4 + 4 + 8, "tensor infos")?;

    let mut metadata = HashMap::new();
    for _ in 0..kv_count {
        let key = r.string()?;
        let ty = r.u32()?;
        let value = r.value(ty, 0).map_err(|e| format!("metadata `{key}`: {e}"))?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(format!("metadata key `{key}` appears twice"));
        }
    }
    let alignment = alignment(&metadata)?;

    let mut tensor_infos = HashMap::new();
    for _ in 0..tensor_count {
        let name = r.string()?;
        let info = r.tensor_info(alignment).map_err(|e| format!("tensor `{name}`: {e}"))?;
        if tensor_infos.insert(name.clone(), info).is_some() {
            return Err(format!("tensor `{name}` appears twice"));
        }
    }
    let end = r.pos as u64;
    let tensor_data_offset = end
        .checked_next_multiple_of(alignment)
        .ok_or_else(|| "the tensor data offset overflows".to_string())?;
    Ok(Content { magic, metadata, tensor_infos, tensor_data_offset })
}

/// `general.alignment`: an unsigned integer that is a power of two, else the default.
fn alignment(metadata: &HashMap<String, Value>) -> Result<u64, String> {
    let a = match metadata.get("general.alignment") {
        None => return Ok(DEFAULT_ALIGNMENT),
        Some(Value::U8(v)) => u64::from(*v),
        Some(Value::U16(v)) => u64::from(*v),
        Some(Value::U32(v)) => u64::from(*v),
        Some(Value::U64(v)) => *v,
        Some(v) => return Err(format!("general.alignment is {v:?}, not an unsigned integer")),
    };
    if !a.is_power_of_two() || a > 1 << 30 {
        return Err(format!("general.alignment = {a} is not a power of two of at most 2^30"));
    }
    Ok(a)
}

/// The ggml type of id `id` (ggml.h's `enum ggml_type`), for the types candle can hold.
fn ggml_dtype(id: u32) -> Result<GgmlDType, String> {
    Ok(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        other => return Err(format!("ggml type {other} is unknown or not supported")),
    })
}

/// A cursor over the header bytes; every read is bounds-checked.
struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// GGUF version 1 writes lengths and counts as u32, later versions as u64.
    v1: bool,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or_else(|| {
            format!("truncated: {n} bytes needed at byte {}, the file has {}", self.pos, self.data.len())
        })?;
        let bytes = self.data.get(self.pos..end).ok_or("truncated")?;
        self.pos = end;
        Ok(bytes)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// Bytes a length or count takes.
    fn prefix(&self) -> u64 {
        if self.v1 {
            4
        } else {
            8
        }
    }

    fn len(&mut self) -> Result<u64, String> {
        if self.v1 {
            self.u32().map(u64::from)
        } else {
            self.u64()
        }
    }

    /// Checks that `count` items of at least `min` bytes each fit in what is left.
    fn fits(&self, count: u64, min: u64, what: &str) -> Result<(), String> {
        let need = count.checked_mul(min);
        match need {
            Some(n) if n <= self.remaining() as u64 => Ok(()),
            _ => Err(format!(
                "{count} {what} cannot fit in the {} bytes left of the file (truncated or damaged)",
                self.remaining()
            )),
        }
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.len()?;
        let n = usize::try_from(n).ok().filter(|&n| n <= self.remaining()).ok_or_else(|| {
            format!("truncated: a string of {n} bytes at byte {} runs past the end of the file", self.pos)
        })?;
        let bytes = self.take(n)?;
        // Some writers NUL-terminate; the strings are otherwise UTF-8 (lossy, as llama.cpp).
        let trimmed = bytes.iter().rposition(|&b| b != 0).map_or(&bytes[..0], |i| &bytes[..=i]);
        Ok(String::from_utf8_lossy(trimmed).into_owned())
    }

    /// The least number of bytes one value of type `ty` takes.
    fn min_size(&self, ty: u32) -> Result<u64, String> {
        Ok(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => self.prefix(),
            9 => 4 + self.prefix(),
            other => return Err(format!("value type {other} is unknown")),
        })
    }

    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>()?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array()?)),
            2 => Value::U16(u16::from_le_bytes(self.array()?)),
            3 => Value::I16(i16::from_le_bytes(self.array()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.array()?)),
            6 => Value::F32(f32::from_le_bytes(self.array()?)),
            7 => match self.array::<1>()?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return Err(format!("bool byte {b} is neither 0 nor 1")),
            },
            8 => Value::String(self.string()?),
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_DEPTH}"));
                }
                let item = self.u32()?;
                let n = self.len()?;
                if n > MAX_ARRAY_ITEMS {
                    return Err(format!("an array of {n} items, beyond the bound of {MAX_ARRAY_ITEMS}"));
                }
                self.fits(n, self.min_size(item)?, "array items")?;
                // `fits` bounds n by the bytes left, so this allocation is bounded by the file.
                let mut items = Vec::with_capacity(usize::try_from(n).map_err(|_| "array too long")?);
                for _ in 0..n {
                    items.push(self.value(item, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.array()?)),
            12 => Value::F64(f64::from_le_bytes(self.array()?)),
            other => return Err(format!("value type {other} is unknown")),
        })
    }

    fn tensor_info(&mut self, alignment: u64) -> Result<TensorInfo, String> {
        let n_dims = self.u32()?;
        if n_dims > MAX_DIMS {
            return Err(format!("{n_dims} dimensions, GGML allows at most {MAX_DIMS}"));
        }
        let mut dims = Vec::with_capacity(MAX_DIMS as usize);
        // The product of the non-zero dimensions bounds every partial product, in any order (a
        // zero dimension would hide an overflow from a product taken in file order, and candle
        // multiplies them in the reverse one).
        let mut nonzero: usize = 1;
        for _ in 0..n_dims {
            let d = if self.v1 { u64::from(self.u32()?) } else { self.u64()? };
            let d = usize::try_from(d).map_err(|_| format!("dimension {d} is too large"))?;
            nonzero = nonzero.checked_mul(d.max(1)).ok_or_else(|| "the product of its dimensions overflows".to_string())?;
            dims.push(d);
        }
        // GGUF lists the fastest-varying dimension first; candle's shapes list it last.
        dims.reverse();
        let ggml_dtype = ggml_dtype(self.u32()?)?;
        let offset = self.u64()?;
        if offset % alignment != 0 {
            return Err(format!("its offset {offset} is not a multiple of the alignment {alignment}"));
        }
        Ok(TensorInfo { ggml_dtype, shape: candle_core::Shape::from(dims), offset })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A version 3 header with the given metadata bytes (already encoded) and no tensors.
    fn header(kv: u64, body: &[u8]) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(0u64.to_le_bytes());
        b.extend(kv.to_le_bytes());
        b.extend(body);
        b
    }

    fn kv_u32(key: &str, v: u32) -> Vec<u8> {
        let mut b = (key.len() as u64).to_le_bytes().to_vec();
        b.extend(key.as_bytes());
        b.extend(4u32.to_le_bytes());
        b.extend(v.to_le_bytes());
        b
    }

    #[test]
    fn alignment_zero_and_non_powers_of_two_are_refused() {
        for a in [0, 3, 48] {
            let e = read(&header(1, &kv_u32("general.alignment", a))).unwrap_err();
            assert!(e.contains("general.alignment"), "{e}");
        }
        let c = read(&header(1, &kv_u32("general.alignment", 64))).unwrap();
        assert_eq!(c.tensor_data_offset % 64, 0);
    }

    #[test]
    fn counts_and_lengths_beyond_the_file_are_refused_before_allocating() {
        // 2^62 metadata entries in a 40-byte file.
        assert!(read(&header(1 << 62, &[])).unwrap_err().contains("cannot fit"));
        // A string length of 2^63.
        let mut body = (1u64 << 63).to_le_bytes().to_vec();
        body.extend([0u8; 16]);
        assert!(read(&header(1, &body)).unwrap_err().contains("runs past the end"));
        // Arrays of 2^60 and of 2^20 u64 items.
        for (n, want) in [(1u64 << 60, "bound"), (1 << 20, "cannot fit")] {
            let mut body = 1u64.to_le_bytes().to_vec();
            body.extend(b"k");
            body.extend(9u32.to_le_bytes());
            body.extend(10u32.to_le_bytes());
            body.extend(n.to_le_bytes());
            assert!(read(&header(1, &body)).unwrap_err().contains(want));
        }
        // Every prefix of a valid header is refused, never a panic.
        let full = header(1, &kv_u32("general.alignment", 64));
        for n in 0..full.len() {
            assert!(read(&full[..n]).is_err());
        }
    }

    #[test]
    fn a_zero_dimension_does_not_hide_an_overflow() {
        // Found by the `gguf` fuzz target: dims [0, 2^40, 2^40] multiply to 0 in file order and
        // overflow in candle's (reversed) order.
        for dims in [[0u64, 1 << 40, 1 << 40], [1 << 40, 1 << 40, 0]] {
            let mut b = b"GGUF".to_vec();
            b.extend(3u32.to_le_bytes());
            b.extend(1u64.to_le_bytes());
            b.extend(0u64.to_le_bytes());
            b.extend(1u64.to_le_bytes());
            b.extend(b"t");
            b.extend(3u32.to_le_bytes());
            dims.iter().for_each(|d| b.extend(d.to_le_bytes()));
            b.extend(0u32.to_le_bytes());
            b.extend(0u64.to_le_bytes());
            b.resize(b.len() + 64, 0);
            assert!(read(&b).unwrap_err().contains("overflows"), "{dims:?}");
        }
    }
}
