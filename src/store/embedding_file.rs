//! The embedding file (`.bin`): a safetensors file with one `embeddings` tensor
//! (n × k, f32) and, under the metadata key `spintrak`, a JSON header saying exactly how
//! the rows were made: format version, model fingerprint, objective, projector, and one
//! record per row. Python reads it with `safetensors.numpy.load_file(path)["embeddings"]`
//! and `json.loads(safetensors.safe_open(path, "np").metadata()["spintrak"])`.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::attribution::projector::ProjectorSpec;
pub use crate::attribution::record::{ObjectiveInfo, Record};
use crate::attribution::{gradient_dim, Objective};
use crate::musicgen::MusicGen;

pub const FORMAT_VERSION: u32 = 1;
const METADATA_KEY: &str = "spintrak";
const TENSOR: &str = "embeddings";

/// The model an embedding was computed with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Hash of the config and of every tensor the gradient covers (layout independent).
    pub fingerprint: String,
    /// Where it was loaded from (informational).
    pub source: String,
    /// Parameters of the gradient: codec decoder, then LM.
    pub decoder_parameters: usize,
    pub lm_parameters: usize,
}

/// The header of an embedding file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format_version: u32,
    pub model: ModelInfo,
    pub objective: ObjectiveInfo,
    /// How rows without audio were generated (sampling settings), when any were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_with: Option<serde_json::Value>,
    pub projector: ProjectorSpec,
    /// Set on the output of one shard of a sharded run (`--shard I/N`); `merge` removes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shard: Option<ShardInfo>,
    pub records: Vec<Record>,
}

/// Which part of a dataset a shard file holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub index: usize,
    pub count: usize,
    /// Examples in the whole dataset (all shards together).
    pub dataset_examples: usize,
    /// A hash of every example's relative path: shards of different datasets never merge.
    #[serde(default)]
    pub dataset: Option<String>,
    /// The run's `--duration` (`None`: each example's own): shards of runs with different
    /// durations never merge.
    #[serde(default)]
    pub duration: Option<f64>,
}

impl Header {
    /// Fails, naming the field, when rows of `other` cannot be compared with ours.
    pub fn check_compatible(&self, other: &Header, ours: &str, theirs: &str) -> Result<()> {
        let differ = |field: &str, a: String, b: String| -> Result<()> {
            if a != b {
                bail!("{ours} and {theirs} differ in {field} ({a} vs {b}); embeddings made with different settings cannot be combined");
            }
            Ok(())
        };
        differ("format_version", self.format_version.to_string(), other.format_version.to_string())?;
        differ("model fingerprint", self.model.fingerprint.clone(), other.model.fingerprint.clone())?;
        if self.objective.name != other.objective.name {
            bail!(
                "{ours} was embedded with the `{}` objective and {theirs} with `{}`; scores need both sides made with one objective (re-embed one of them with --objective {})",
                self.objective.name,
                other.objective.name,
                other.objective.name
            );
        }
        differ("objective settings", self.objective.settings.to_string(), other.objective.settings.to_string())?;
        differ("projector kind", format!("{:?}", self.projector.kind), format!("{:?}", other.projector.kind))?;
        differ("projector seed", self.projector.seed.to_string(), other.projector.seed.to_string())?;
        differ("projector k", self.projector.k.to_string(), other.projector.k.to_string())?;
        differ("projector D", self.projector.d.to_string(), other.projector.d.to_string())?;
        differ("projector sparsity", self.projector.sparsity.to_string(), other.projector.sparsity.to_string())?;
        differ("projector version", self.projector.version.to_string(), other.projector.version.to_string())?;
        Ok(())
    }
}

/// The header fields describing a model.
pub fn model_info(model: &MusicGen, objective: &dyn Objective) -> Result<ModelInfo> {
    let (dec, lm) = gradient_dim(model, objective);
    Ok(ModelInfo {
        fingerprint: model.fingerprint()?,
        source: model.source.clone(),
        decoder_parameters: dec,
        lm_parameters: lm,
    })
}

/// An embedding file of the given rows, made with `model`, `objective` and `spec`.
pub fn single_file(
    model: &MusicGen,
    objective: &dyn Objective,
    spec: &ProjectorSpec,
    rows: Vec<(Record, Vec<f32>)>,
) -> Result<EmbeddingFile> {
    let mut records = Vec::with_capacity(rows.len());
    let mut data = Vec::with_capacity(rows.len() * spec.k);
    for (record, emb) in rows {
        if emb.len() != spec.k {
            bail!("row `{}` has {} numbers, the projection gives {}", record.name, emb.len(), spec.k);
        }
        records.push(record);
        data.extend(emb);
    }
    let generated = records.iter().any(|r| r.offset.is_none());
    Ok(EmbeddingFile {
        header: Header {
            format_version: FORMAT_VERSION,
            model: model_info(model, objective)?,
            objective: objective.info(),
            generated_with: if generated { objective.generated_with() } else { None },
            projector: spec.clone(),
            shard: None,
            records,
        },
        data,
    })
}

/// An embedding file in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct EmbeddingFile {
    pub header: Header,
    /// Row-major n × k.
    pub data: Vec<f32>,
}

impl EmbeddingFile {
    pub fn rows(&self) -> usize {
        self.header.records.len()
    }

    pub fn k(&self) -> usize {
        self.header.projector.k
    }

    pub fn row(&self, i: usize) -> &[f32] {
        let k = self.k();
        &self.data[i * k..(i + 1) * k]
    }

    /// Serialised bytes (deterministic for equal contents).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let n = self.rows();
        let k = self.k();
        if self.data.len() != n * k {
            bail!("{} numbers for {n} rows of {k}", self.data.len());
        }
        // A NaN or infinity would poison every score computed from the file.
        if let Some(i) = self.data.iter().position(|x| !x.is_finite()) {
            let r = &self.header.records[i / k.max(1)];
            bail!("the embedding of `{}` holds a non-finite value ({}); nothing was written", r.name, self.data[i]);
        }
        let bytes: Vec<u8> = self.data.iter().flat_map(|x| x.to_le_bytes()).collect();
        let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, k], &bytes)?;
        let mut meta = HashMap::new();
        meta.insert(METADATA_KEY.to_string(), serde_json::to_string(&self.header)?);
        Ok(safetensors::serialize([(TENSOR, view)], Some(meta))?)
    }

    /// Writes atomically (temporary file, then rename): never a half-written file.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::io::write_atomic(path, &self.to_bytes()?)
    }

    /// Reads and validates a file written by spintrak.
    pub fn read(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        Self::from_bytes(&map).with_context(|| format!("{}", path.display()))
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        let layout = Layout::parse(bytes)?;
        let data: Vec<f32> =
            bytes[layout.data.clone()].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        if data.iter().any(|x| !x.is_finite()) {
            bail!("the embeddings contain NaN or infinite values");
        }
        Ok(Self { header: layout.header, data })
    }
}

/// Writes an embedding file of `header.records.len()` rows without holding them: `row(i)`
/// gives row i. The bytes are those `EmbeddingFile::to_bytes` gives for the same rows;
/// the file appears whole (temporary file, then rename) or not at all.
pub fn write_rows(path: &Path, header: &Header, mut row: impl FnMut(usize) -> Vec<f32>) -> Result<()> {
    let (n, k) = (header.records.len(), header.projector.k);
    let bytes = n.checked_mul(k).and_then(|x| x.checked_mul(4)).ok_or_else(|| anyhow!("{n} × {k} rows overflow"))?;
    // The safetensors layout: u64 header length, JSON header padded with spaces to a
    // multiple of 8, then the data.
    // (Fields in the order the safetensors crate writes them.)
    let meta = serde_json::to_string(&serde_json::to_string(header)?)?;
    let mut json = format!(
        r#"{{"__metadata__":{{"{METADATA_KEY}":{meta}}},"{TENSOR}":{{"dtype":"F32","shape":[{n},{k}],"data_offsets":[0,{bytes}]}}}}"#
    );
    while json.len() % 8 != 0 {
        json.push(' ');
    }
    let failed = || format!("{}: write failed (disk full?)", path.display());
    crate::io::write_atomic_with(path, |f| {
        f.write_all(&(json.len() as u64).to_le_bytes()).with_context(failed)?;
        f.write_all(json.as_bytes()).with_context(failed)?;
        for i in 0..n {
            let r = row(i);
            if r.len() != k || r.iter().any(|x| !x.is_finite()) {
                bail!("row {i} (`{}`) is not {k} finite numbers; nothing was written", header.records[i].name);
            }
            let le: Vec<u8> = r.iter().flat_map(|x| x.to_le_bytes()).collect();
            f.write_all(&le).with_context(failed)?;
        }
        Ok(())
    })
}

/// Maps an embedding file read-only, refusing what cannot be one.
fn map_file(path: &Path) -> Result<memmap2::Mmap> {
    if path.is_dir() {
        bail!("{}: is a directory, not an embedding file (.bin)", path.display());
    }
    let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file (a FIFO or device?); give an embedding file (.bin)", path.display());
    }
    let file = std::fs::File::open(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if file.metadata().map(|m| m.len()).unwrap_or(0) == 0 {
        bail!("{}: the file is empty; not an embedding file", path.display());
    }
    // Mapped, not read: a large training file is paged in once, not copied.
    // SAFETY: the map is read-only. spintrak replaces files by rename, never truncating
    // them in place, so its own writers cannot shrink a file under the map.
    unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("{}: cannot map", path.display()))
}

/// Where the parts of an embedding file lie.
struct Layout {
    header: Header,
    /// The spintrak header exactly as stored.
    header_json: String,
    /// Byte range of the n × k little-endian f32 rows.
    data: std::ops::Range<usize>,
}

impl Layout {
    fn parse(bytes: &[u8]) -> Result<Self> {
        if bytes.is_empty() {
            bail!("the file is empty");
        }
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| anyhow!("not an embedding file (not safetensors, or truncated: {e})"))?;
        let header_json = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(METADATA_KEY))
            .ok_or_else(|| anyhow!("a safetensors file without a spintrak header: not an embedding file"))?
            .clone();
        let header: Header =
            serde_json::from_str(&header_json).map_err(|e| anyhow!("the spintrak header is invalid: {e}"))?;
        if header.format_version != FORMAT_VERSION {
            bail!(
                "embedding format version {} is not supported (this build reads {FORMAT_VERSION})",
                header.format_version
            );
        }
        let info = meta.info(TENSOR).ok_or_else(|| anyhow!("no `{TENSOR}` tensor"))?;
        let n = header.records.len();
        let k = header.projector.k;
        if info.dtype != safetensors::Dtype::F32 || info.shape != [n, k] {
            bail!("`{TENSOR}` is {:?} {:?}, the header says f32 [{n}, {k}]", info.dtype, info.shape);
        }
        let start = 8usize
            .checked_add(header_len)
            .and_then(|s| s.checked_add(info.data_offsets.0))
            .ok_or_else(|| anyhow!("the file is corrupt (offsets overflow)"))?;
        let len = n.checked_mul(k).and_then(|x| x.checked_mul(4));
        let end = len.and_then(|l| start.checked_add(l));
        match end {
            Some(end) if info.data_offsets.1 - info.data_offsets.0 == end - start && end <= bytes.len() => {
                Ok(Self { header, header_json, data: start..end })
            }
            _ => bail!("the file is truncated or corrupt: `{TENSOR}` does not lie inside it"),
        }
    }
}

/// An embedding file read in place: the header parsed, the rows left in the memory map
/// (a 100,000 × 8192 training file is 3.3 GB; it is streamed, never copied whole).
pub struct MappedEmbeddings {
    pub path: std::path::PathBuf,
    pub header: Header,
    /// A hash of the header exactly as stored (indexes record it).
    pub header_hash: u64,
    map: memmap2::Mmap,
    data: std::ops::Range<usize>,
    /// The rows, when the map cannot be read as f32 in place (misaligned or big-endian).
    copied: Option<Vec<f32>>,
}

impl MappedEmbeddings {
    pub fn open(path: &Path) -> Result<Self> {
        let map = map_file(path)?;
        let layout = Layout::parse(&map).with_context(|| format!("{}", path.display()))?;
        let header_hash = xxhash_rust::xxh3::xxh3_64(layout.header_json.as_bytes());
        let bytes = &map[layout.data.clone()];
        // SAFETY: f32 has no invalid bit patterns; `align_to` returns an empty prefix
        // only when the slice is aligned.
        let (pre, _, _) = unsafe { bytes.align_to::<f32>() };
        let copied = (!pre.is_empty() || cfg!(target_endian = "big"))
            .then(|| bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect());
        Ok(Self { path: path.to_path_buf(), header: layout.header, header_hash, map, data: layout.data, copied })
    }

    pub fn rows(&self) -> usize {
        self.header.records.len()
    }

    pub fn k(&self) -> usize {
        self.header.projector.k
    }

    /// All rows, row-major n × k (non-finite values are caught by what reads them).
    pub fn data(&self) -> &[f32] {
        if let Some(c) = &self.copied {
            return c;
        }
        // SAFETY: as in `open`; the prefix was checked to be empty there.
        let (_, rows, _) = unsafe { self.map[self.data.clone()].align_to::<f32>() };
        rows
    }
}

impl crate::attribution::score::Rows for MappedEmbeddings {
    fn n(&self) -> usize {
        self.rows()
    }

    fn k(&self) -> usize {
        self.header.projector.k
    }

    fn block(&self, start: usize, len: usize) -> std::borrow::Cow<'_, [f32]> {
        let k = self.header.projector.k;
        std::borrow::Cow::Borrowed(&self.data()[start * k..(start + len) * k])
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::attribution::projector::ProjectorKind;

    #[test]
    fn streamed_files_are_byte_identical_to_written_ones() {
        let records: Vec<Record> = (0..5)
            .map(|i| Record {
                name: format!("r{i}"),
                prompt: "p \"q\"".into(),
                duration: 1.5,
                seed: i,
                source: None,
                offset: None,
            })
            .collect();
        let header = Header {
            format_version: FORMAT_VERSION,
            model: ModelInfo { fingerprint: "f".into(), source: "s".into(), decoder_parameters: 3, lm_parameters: 5 },
            objective: ObjectiveInfo { name: "audio-nll".into(), settings: serde_json::json!({"a": 1}) },
            generated_with: None,
            projector: ProjectorSpec::new(ProjectorKind::Identity, 0, None, 3, 1).unwrap(),
            shard: None,
            records,
        };
        let file = EmbeddingFile { header, data: (0..15).map(|i| i as f32 * 0.25 - 1.0).collect() };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("streamed.bin");
        write_rows(&path, &file.header, |i| file.row(i).to_vec()).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), file.to_bytes().unwrap());
        let mapped = MappedEmbeddings::open(&path).unwrap();
        assert_eq!(mapped.data(), file.data.as_slice());
        // A bad row writes nothing.
        let bad = dir.path().join("bad.bin");
        assert!(write_rows(&bad, &file.header, |i| vec![if i == 3 { f32::NAN } else { 0.0 }; 3]).is_err());
        assert!(!bad.exists());
    }

    #[test]
    fn header_floats_survive_the_round_trip_exactly() {
        // Resume and merge compare headers for equality: a duration or a setting read back
        // one ulp off would refuse a state made with the very same settings.
        let awkward = [0.1 + 0.2, 29.970000000000002, 1e-7, 2.0f64.sqrt(), -0.011049037799239159, 123456.789e-3];
        let records = awkward
            .iter()
            .enumerate()
            .map(|(i, &d)| Record {
                name: format!("r{i}"),
                prompt: "p".into(),
                duration: d,
                seed: i as u64,
                source: None,
                offset: Some(d),
            })
            .collect();
        let header = Header {
            format_version: FORMAT_VERSION,
            model: ModelInfo { fingerprint: "f".into(), source: "s".into(), decoder_parameters: 3, lm_parameters: 5 },
            objective: ObjectiveInfo {
                name: "generation".into(),
                settings: serde_json::json!({"temperature": 0.7000000000000001, "guidance_scale": 2.9999999999999996}),
            },
            generated_with: None,
            projector: ProjectorSpec::new(ProjectorKind::Sparse, 42, Some(2), 8, 2).unwrap(),
            shard: None,
            records,
        };
        let file = EmbeddingFile { header, data: (0..12).map(|i| i as f32 * 0.1).collect() };
        let back = EmbeddingFile::from_bytes(&file.to_bytes().unwrap()).unwrap();
        assert_eq!(back, file);
        for (r, &d) in back.header.records.iter().zip(&awkward) {
            assert_eq!(r.duration.to_bits(), d.to_bits());
            assert_eq!(r.offset.map(f64::to_bits), Some(d.to_bits()));
        }
    }
}
