//! Memory-mapped safetensors, one file or many shards, read tensor by tensor.
//!
//! Headers are parsed and validated once when the files are opened (offsets inside the file,
//! no overlap, sizes matching shapes, courtesy of the `safetensors` crate); afterwards a tensor is a
//! borrowed slice of the map, so nothing is read until it is asked for.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use nibble_core::{Error, Result};
use safetensors::tensor::{Dtype, Metadata, SafeTensors};

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8 + header length).
    data_start: usize,
    meta: Metadata,
}

/// One tensor's bytes as stored, with its dtype and shape.
#[derive(Debug, Clone, Copy)]
pub struct RawTensor<'a> {
    /// The file it lives in.
    pub path: &'a Path,
    /// The stored dtype.
    pub dtype: Dtype,
    /// The shape.
    pub shape: &'a [usize],
    /// Little-endian element bytes.
    pub data: &'a [u8],
}

/// The tensors of a checkpoint, across its shards.
pub struct Weights {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("files", &self.shards.iter().map(|s| &s.path).collect::<Vec<_>>())
            .field("tensors", &self.index.len())
            .finish()
    }
}

/// Maps a safetensors dtype to candle's, where candle has it.
pub fn candle_dtype(d: Dtype) -> Option<DType> {
    Some(match d {
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        Dtype::I16 => DType::I16,
        Dtype::I32 => DType::I32,
        Dtype::I64 => DType::I64,
        Dtype::BF16 => DType::BF16,
        Dtype::F16 => DType::F16,
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        _ => return None,
    })
}

impl Weights {
    /// Opens and validates every file; a tensor present in two files is an error.
    pub fn open(files: &[PathBuf]) -> Result<Self> {
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            // SAFETY: the map is read-only; a checkpoint changed under a running process is
            // outside what any loader (Python's included) can defend against.
            let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
            let (header_len, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| Error::CorruptCheckpoint {
                path: path.clone(),
                reason: describe(&e),
            })?;
            let shard_idx = shards.len();
            for name in meta.tensors().keys() {
                if index.insert(name.clone(), shard_idx).is_some() {
                    return Err(Error::CorruptCheckpoint {
                        path: path.clone(),
                        reason: format!("tensor `{name}` appears in more than one shard"),
                    });
                }
            }
            shards.push(Shard { path: path.clone(), mmap, data_start: 8 + header_len, meta });
        }
        Ok(Self { shards, index })
    }

    /// Whether the checkpoint has `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.index.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The files, in order.
    pub fn files(&self) -> Vec<&Path> {
        self.shards.iter().map(|s| s.path.as_path()).collect()
    }

    /// The folder (for a sharded checkpoint) or file that a missing tensor is reported against.
    fn where_missing(&self) -> PathBuf {
        match self.shards.as_slice() {
            [one] => one.path.clone(),
            [first, ..] => first.path.parent().map(Path::to_path_buf).unwrap_or_default(),
            [] => PathBuf::new(),
        }
    }

    /// The stored bytes of `name`.
    pub fn raw(&self, name: &str) -> Result<RawTensor<'_>> {
        let shard = self
            .index
            .get(name)
            .and_then(|&i| self.shards.get(i))
            .ok_or_else(|| Error::MissingTensor { path: self.where_missing(), tensor: name.to_string() })?;
        let info = shard.meta.info(name).ok_or_else(|| Error::MissingTensor {
            path: shard.path.clone(),
            tensor: name.to_string(),
        })?;
        let (start, end) = info.data_offsets;
        let data = shard
            .mmap
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| Error::CorruptCheckpoint {
                path: shard.path.clone(),
                reason: format!("tensor `{name}` lies past the end of the file"),
            })?;
        Ok(RawTensor { path: &shard.path, dtype: info.dtype, shape: &info.shape, data })
    }

    /// The dtype of the first floating-point tensor by name (F32, F16 or BF16): what
    /// transformers' `dtype="auto"` takes when config.json names none (`get_state_dict_dtype`).
    pub fn float_dtype(&self) -> Option<DType> {
        self.names().into_iter().find_map(|n| {
            let shard = self.shards.get(*self.index.get(n)?)?;
            match candle_dtype(shard.meta.info(n)?.dtype)? {
                d @ (DType::F32 | DType::F16 | DType::BF16) => Some(d),
                _ => None,
            }
        })
    }

    /// The shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        let shard = self.shards.get(*self.index.get(name)?)?;
        shard.meta.info(name).map(|i| i.shape.as_slice())
    }

    /// Loads `name` as a candle tensor on `device`.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let raw = self.raw(name)?;
        let dtype = candle_dtype(raw.dtype).ok_or_else(|| Error::DtypeMismatch {
            path: raw.path.to_path_buf(),
            tensor: name.to_string(),
            expected: "a float or integer dtype candle supports".into(),
            found: format!("{:?}", raw.dtype),
        })?;
        let t = Tensor::from_raw_buffer(raw.data, dtype, raw.shape, device)?;
        // The tensor owns a copy now; the mapped pages need not stay resident.
        self.release(name);
        Ok(t)
    }

    /// Drops the mapped pages of `name` from this process's resident memory (they stay in the
    /// page cache, and a later read maps them again). Streaming loads call this once a tensor has
    /// been copied or quantized, so that the peak resident memory of a load is the loaded model
    /// plus the tensor in flight, not the whole checkpoint. Best effort: a failure only means the
    /// pages stay resident until the map is dropped.
    pub fn release(&self, name: &str) {
        let Some(shard) = self.index.get(name).and_then(|&i| self.shards.get(i)) else { return };
        let Some(info) = shard.meta.info(name) else { return };
        let (start, end) = info.data_offsets;
        let offset = shard.data_start + start;
        if end <= start || offset + (end - start) > shard.mmap.len() {
            return;
        }
        #[cfg(unix)]
        {
            // SAFETY: the map is a read-only shared mapping of a file: MADV_DONTNEED only
            // unmaps its pages, and the next access faults in the same file bytes, so slices
            // borrowed from the map keep reading what they read before. (memmap2 marks the
            // advice unsafe for private writable maps, whose changes it would discard.)
            let _ = unsafe { shard.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, end - start) };
        }
    }

    /// Loads `name`, checking that its shape is `expected`.
    pub fn tensor_shaped(&self, name: &str, expected: &[usize], device: &Device) -> Result<Tensor> {
        self.check_shape(name, expected)?;
        self.tensor(name, device)
    }

    /// Checks that `name` exists with shape `expected`.
    pub fn check_shape(&self, name: &str, expected: &[usize]) -> Result<()> {
        let raw = self.raw(name)?;
        if raw.shape != expected {
            return Err(Error::ShapeMismatch {
                path: raw.path.to_path_buf(),
                tensor: name.to_string(),
                expected: expected.to_vec(),
                found: raw.shape.to_vec(),
            });
        }
        Ok(())
    }
}

fn describe(e: &safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    match e {
        E::HeaderTooSmall => "the file is shorter than the 8-byte header length".into(),
        E::HeaderTooLarge => "the header length is larger than safetensors allows (truncated or not a safetensors file)".into(),
        E::InvalidHeaderLength => "the header length points past the end of the file (truncated?)".into(),
        E::MetadataIncompleteBuffer => "the tensor data does not match the file size (truncated or padded)".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    /// A tensor read after its pages were released reads the same bytes (they come back from
    /// the file), and releasing a name that is not there is a no-op.
    #[test]
    fn release_keeps_contents() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("nibble-release-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
        let path = dir.join("model.safetensors");
        // Several pages, with a value pattern that a zero-filled page would not match.
        let values: Vec<f32> = (0..100_000).map(|i| (i as f32).sin() + 2.0).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let view = TensorView::new(Dtype::F32, vec![values.len()], &bytes)
            .map_err(|e| Error::invalid_argument("test tensor", e.to_string()))?;
        safetensors::serialize_to_file([("w", view)], None, &path)
            .map_err(|e| Error::invalid_argument("test file", e.to_string()))?;

        let weights = Weights::open(std::slice::from_ref(&path))?;
        let first = weights.tensor("w", &Device::Cpu)?.to_vec1::<f32>()?;
        weights.release("w");
        weights.release("absent");
        let again = weights.tensor("w", &Device::Cpu)?.to_vec1::<f32>()?;
        let raw_after = weights.raw("w")?.data.to_vec();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(first, values);
        assert_eq!(again, values);
        assert_eq!(raw_after, bytes);
        Ok(())
    }
}
