//! The scoring index (`TRAINING.bin.index`): the Cholesky factor of a training file's
//! system (`ΦᵀΦ + λI`, or `ΦΦᵀ + λI` when it has fewer rows than dimensions), made once
//! by `spintrak index`, so that a query costs one pass over Φ and two triangular solves
//! instead of rebuilding the k × k system (at n = 100,000 and k = 8192 that is minutes).
//!
//! A safetensors file with one `cholesky` tensor (f64, the lower factor packed row by
//! row) and, under the metadata key `spintrak-index`, the header fields the factor
//! depends on: the training file's header hash and row checksum, n, k, λ. An index
//! that no longer matches its training file is never used.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::embedding_file::MappedEmbeddings;
use crate::attribution::projector::ProjectorSpec;
use crate::attribution::record::ObjectiveInfo;
use crate::attribution::score::{packed_len, Factor, Method};

pub const INDEX_VERSION: u32 = 1;
const METADATA_KEY: &str = "spintrak-index";
const TENSOR: &str = "cholesky";

/// Where the index of a training file lies: beside it, `.index` appended.
pub fn index_path(training: &Path) -> PathBuf {
    let mut name = training.as_os_str().to_owned();
    name.push(".index");
    PathBuf::from(name)
}

/// What an index was made from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexHeader {
    pub index_version: u32,
    /// The training file's name when indexed (informational).
    pub training_file: String,
    /// xxh3 of the training file's spintrak header as stored (records, model, projector).
    pub training_header_xxh3: String,
    /// `score::rows_checksum` of its rows.
    pub training_rows_xxh3: String,
    pub rows: usize,
    pub k: usize,
    pub lambda: f64,
    pub method: Method,
    /// Rows of the factor (k, or n for the push-through form).
    pub dim: usize,
    /// Copied from the training file's header, for readers of the index.
    pub model_fingerprint: String,
    pub objective: ObjectiveInfo,
    pub projector: ProjectorSpec,
}

/// Serialised index of `training` (made with `factor`, whose rows sum to `rows_checksum`).
pub fn to_bytes(training: &MappedEmbeddings, factor: &Factor<'_>, rows_checksum: u64) -> Result<Vec<u8>> {
    let header = IndexHeader {
        index_version: INDEX_VERSION,
        training_file: training.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        training_header_xxh3: format!("{:016x}", training.header_hash),
        training_rows_xxh3: format!("{rows_checksum:016x}"),
        rows: training.rows(),
        k: training.k(),
        lambda: factor.lambda,
        method: factor.method,
        dim: factor.dim,
        model_fingerprint: training.header.model.fingerprint.clone(),
        objective: training.header.objective.clone(),
        projector: training.header.projector.clone(),
    };
    let bytes: &[u8] = bytemuck::cast_slice(&factor.packed);
    let bytes: std::borrow::Cow<[u8]> = if cfg!(target_endian = "little") {
        bytes.into()
    } else {
        factor.packed.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>().into()
    };
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F64, vec![factor.packed.len()], &bytes)?;
    let mut meta = HashMap::new();
    meta.insert(METADATA_KEY.to_string(), serde_json::to_string(&header)?);
    Ok(safetensors::serialize([(TENSOR, view)], Some(meta))?)
}

/// Makes the index of `training` for λ and writes it beside the file (atomically); a
/// file already there is replaced only when it is a spintrak index. `progress` is told
/// the rows accumulated so far.
pub fn build(training: &Path, lambda: f64, progress: &(dyn Fn(usize) + Sync)) -> Result<(PathBuf, IndexHeader, u64)> {
    let out = index_path(training);
    if std::fs::symlink_metadata(&out).is_ok() {
        if let Err(e) = IndexFile::open(&out) {
            bail!(
                "{}: exists and is not a spintrak index ({e:#}); it is left alone: move it away to index {}",
                out.display(),
                training.display()
            );
        }
    }
    let mapped = MappedEmbeddings::open(training)?;
    let factor = crate::attribution::score::factorise(&mapped, lambda, progress)
        .with_context(|| format!("{}", training.display()))?;
    let checksum = crate::attribution::score::rows_checksum(&mapped);
    let bytes = to_bytes(&mapped, &factor, checksum)?;
    crate::io::write_atomic(&out, &bytes)?;
    let header = IndexFile::open(&out)?.header;
    Ok((out, header, bytes.len() as u64))
}

/// An index file, mapped.
pub struct IndexFile {
    pub path: PathBuf,
    pub header: IndexHeader,
    map: memmap2::Mmap,
    data: std::ops::Range<usize>,
}

impl IndexFile {
    /// Opens and validates an index file (not yet against its training file: `check`).
    pub fn open(path: &Path) -> Result<Self> {
        let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
        if !meta.is_file() {
            bail!("{}: not a regular file; not a spintrak index", path.display());
        }
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
        // SAFETY: read-only; spintrak replaces index files by rename, never in place.
        let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))?;
        let (header, data) = Self::parse(&map).with_context(|| format!("{}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), header, map, data })
    }

    fn parse(bytes: &[u8]) -> Result<(IndexHeader, std::ops::Range<usize>)> {
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("not a spintrak index (not safetensors, or truncated: {e})"))?;
        let json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| anyhow!("a safetensors file without a spintrak-index header: not a spintrak index"))?;
        let header: IndexHeader =
            serde_json::from_str(json).map_err(|e| anyhow!("the spintrak-index header is invalid: {e}"))?;
        if header.index_version != INDEX_VERSION {
            bail!(
                "index version {} is not supported (this build reads {INDEX_VERSION}); re-run `spintrak index`",
                header.index_version
            );
        }
        let info = meta.info(TENSOR).ok_or_else(|| anyhow!("no `{TENSOR}` tensor"))?;
        let expected_dim = match header.method {
            Method::PushThrough => header.rows,
            Method::Streamed => header.k,
        };
        // Sizes from the file are checked before any arithmetic trusts them.
        let len = (header.dim == expected_dim && header.dim < (1 << 31)).then(|| packed_len(header.dim));
        let range = len.and_then(|len| {
            let start = (8 + header_len).checked_add(info.data_offsets.0)?;
            Some((len, start, start.checked_add(len.checked_mul(8)?)?))
        });
        match range {
            Some((len, start, end))
                if info.dtype == safetensors::Dtype::F64
                    && info.shape == [len]
                    && info.data_offsets.1 - info.data_offsets.0 == len * 8
                    && end <= bytes.len() =>
            {
                Ok((header, start..end))
            }
            _ => bail!(
                "`{TENSOR}` ({:?} {:?}) is not the packed factor of the {}×{} system the header describes, or lies outside the file",
                info.dtype,
                info.shape,
                header.dim,
                header.dim
            ),
        }
    }

    /// Fails, saying why, unless this index was made from `training` (as it is now).
    pub fn check(&self, training: &MappedEmbeddings) -> Result<()> {
        let h = &self.header;
        if h.training_header_xxh3 != format!("{:016x}", training.header_hash)
            || h.rows != training.rows()
            || h.k != training.k()
        {
            bail!(
                "{} was made from another version of {} (its rows, model or settings differ); re-run `spintrak index {}`",
                self.path.display(),
                training.path.display(),
                training.path.display()
            );
        }
        Ok(())
    }

    /// The rows' checksum the index was made with.
    pub fn rows_checksum(&self) -> Result<u64> {
        u64::from_str_radix(&self.header.training_rows_xxh3, 16)
            .map_err(|_| anyhow!("{}: the row checksum is not a hex number", self.path.display()))
    }

    /// The factor, read in place when the map allows it.
    pub fn factor(&self) -> Factor<'_> {
        let bytes = &self.map[self.data.clone()];
        // SAFETY: f64 has no invalid bit patterns; an empty prefix means aligned.
        let (pre, packed, _) = unsafe { bytes.align_to::<f64>() };
        let packed = if pre.is_empty() && cfg!(target_endian = "little") {
            std::borrow::Cow::Borrowed(packed)
        } else {
            std::borrow::Cow::Owned(
                bytes
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect(),
            )
        };
        Factor { method: self.header.method, lambda: self.header.lambda, dim: self.header.dim, packed }
    }
}
