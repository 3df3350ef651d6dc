//! Reading checkpoint files as data: safetensors, and PyTorch zip pickles through
//! Candle's pickle reader, which interprets the opcodes itself and never imports or
//! runs anything named in the file.

use std::collections::HashMap;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{DType, Device, Tensor};

/// Runs a parser that might panic on hostile or corrupt input, turning a panic into an
/// error that names the file.
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => bail!("{}: the {what} is corrupt (the reader could not parse it)", path.display()),
    }
}

fn ensure_readable(path: &Path) -> Result<()> {
    let meta = std::fs::metadata(path).with_context(|| format!("{}: cannot read the file", path.display()))?;
    if !meta.is_file() {
        bail!("{}: not a regular file", path.display());
    }
    if meta.len() == 0 {
        bail!("{}: the file is empty (an interrupted download or copy?)", path.display());
    }
    Ok(())
}

type Zip = zip::ZipArchive<BufReader<std::fs::File>>;

/// Opens a PyTorch zip checkpoint. The archive is read from offset 0 first: the zip
/// crate's offset detection misreads some valid archives written by `torch.save`.
fn open_zip(path: &Path) -> Result<Zip> {
    let open = || std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()));
    let known = zip::read::Config { archive_offset: zip::read::ArchiveOffset::Known(0) };
    match zip::ZipArchive::with_config(known, BufReader::new(open()?)) {
        Ok(z) => Ok(z),
        Err(_) => zip::ZipArchive::new(BufReader::new(open()?)).map_err(|e| {
            anyhow!(
                "{}: not a PyTorch zip checkpoint ({e}); it may be truncated, or saved with the legacy non-zip format (re-save it with torch.save)",
                path.display()
            )
        }),
    }
}

/// The root object of `data.pkl` and the archive folder it sits in.
fn pickle_root(path: &Path, zip: &mut Zip) -> Result<(Object, String)> {
    let names: Vec<String> = zip.file_names().filter_map(|n| n.ok().map(|n| n.to_string())).collect();
    let pkl = names
        .iter()
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| anyhow!("{}: no data.pkl inside; not a PyTorch checkpoint", path.display()))?;
    let dir = pkl.trim_end_matches(".pkl").to_string();
    let reader = zip.by_name(pkl).with_context(|| format!("{}: cannot read {pkl}", path.display()))?;
    if reader.size() > MAX_PICKLE_BYTES {
        bail!(
            "{}: its pickle ({pkl}) is {} bytes; a checkpoint's is at most a few MB (over {MAX_PICKLE_BYTES} bytes is refused)",
            path.display(),
            reader.size()
        );
    }
    let mut bytes = Vec::new();
    reader
        .take(MAX_PICKLE_BYTES)
        .read_to_end(&mut bytes)
        .map_err(|e| anyhow!("{}: the pickle cannot be read ({e})", path.display()))?;
    let root = parse_pickle(&bytes).map_err(|e| anyhow!("{}: {e:#}", path.display()))?;
    Ok((root, dir))
}

/// The largest `data.pkl` read (a 3.5 B-parameter state dict's is well under 1 MB).
const MAX_PICKLE_BYTES: u64 = 256 << 20;

/// Parses a pickle stream as data, after [`super::pickle_scan::check`] has bounded its
/// depth, size and length fields.
pub fn parse_pickle(bytes: &[u8]) -> Result<Object> {
    super::pickle_scan::check(bytes).map_err(|e| anyhow!("the pickle is not a checkpoint: {e:#}"))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::Cursor::new(bytes))
        .map_err(|e| anyhow!("the pickle is corrupt or truncated ({e})"))?;
    stack.finalize().map_err(|e| anyhow!("the pickle is incomplete ({e})"))
}

/// The root object of a PyTorch zip pickle (`data.pkl`), as data.
pub fn read_pickle_root(path: &Path) -> Result<Object> {
    ensure_readable(path)?;
    guarded(path, "PyTorch checkpoint", || {
        let mut zip = open_zip(path)?;
        Ok(pickle_root(path, &mut zip)?.0)
    })
}

/// A PyTorch zip checkpoint kept open while its tensors are read one by one.
pub struct PickleFile {
    path: PathBuf,
    zip: Mutex<Zip>,
}

/// The tensors of a PyTorch checkpoint, optionally under a top-level key (`best_state`),
/// as [`StoredTensor`]s: only the pickle is parsed here; the bytes are read when a tensor
/// is claimed. Storage views (a tensor starting inside a shared storage) are honoured.
pub fn open_pickle_tensors(path: &Path, key: Option<&str>) -> Result<HashMap<String, StoredTensor>> {
    ensure_readable(path)?;
    guarded(path, "PyTorch checkpoint", || {
        let mut zip = open_zip(path)?;
        let (root, dir) = pickle_root(path, &mut zip)?;
        let obj = match key {
            Some(k) => match root {
                Object::Dict(items) => items
                    .into_iter()
                    .find(|(name, _)| *name == Object::Unicode(k.to_string()))
                    .map(|(_, v)| v)
                    .ok_or_else(|| anyhow!("{}: no `{k}` entry", path.display()))?,
                _ => bail!("{}: the checkpoint is not a dict", path.display()),
            },
            None => root,
        };
        let Object::Dict(items) = obj else { bail!("{}: the state is not a dict of tensors", path.display()) };
        let file = Arc::new(PickleFile { path: path.to_path_buf(), zip: Mutex::new(zip) });
        let mut out = HashMap::new();
        for (name, value) in items {
            let Some(info) = value
                .into_tensor_info(name, Path::new(&dir))
                .map_err(|e| anyhow!("{}: unreadable tensor entry ({e})", path.display()))?
            else {
                continue;
            };
            // Integer and boolean buffers (e.g. EnCodec's `inited` in some versions) are not used.
            if StoredDType::from_candle(info.dtype).is_none() {
                continue;
            }
            out.insert(info.name.clone(), StoredTensor::Pickle { file: file.clone(), info });
        }
        Ok(out)
    })
}

/// Every tensor of a PyTorch checkpoint, read now.
pub fn read_pickle_tensors(path: &Path, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    materialize(open_pickle_tensors(path, key)?)
}

impl PickleFile {
    /// Reads the view `info` into `out` (row-major), checking it against its storage record
    /// before anything is read.
    fn read_into(&self, info: &TensorInfo, out: &mut [f32]) -> Result<()> {
        let path = &self.path;
        let dtype = StoredDType::from_candle(info.dtype).ok_or_else(|| {
            anyhow!("{}: tensor `{}` is stored as {:?}, not a float type", path.display(), info.name, info.dtype)
        })?;
        let layout = &info.layout;
        let size = dtype.size();
        // Candle's pickle reader gives the storage offset in bytes already.
        let start = layout.start_offset();
        if !start.is_multiple_of(size) {
            bail!("{}: tensor `{}` starts inside an element; the checkpoint is damaged", path.display(), info.name);
        }
        let (dims, strides) = (layout.dims().to_vec(), layout.stride().to_vec());
        let n = layout.shape().elem_count();
        if out.len() != n {
            bail!("{}: tensor `{}`: {} elements asked for, {n} stored", path.display(), info.name, out.len());
        }
        // The elements a view reaches: offset + Σ (dim − 1)·stride, all inside its storage.
        let reach = dims.iter().zip(&strides).try_fold(start / size, |acc, (&d, &st)| {
            if d == 0 {
                Some(acc)
            } else {
                acc.checked_add((d - 1).checked_mul(st)?)
            }
        });
        let last = match reach {
            Some(r) if n == 0 || r < info.storage_size => r,
            _ => bail!(
                "{}: tensor `{}` reaches beyond its storage of {} elements; the checkpoint is damaged",
                path.display(),
                info.name,
                info.storage_size
            ),
        };
        let mut zip = self.zip.lock().unwrap_or_else(|e| e.into_inner());
        let mut reader = zip
            .by_name(&info.path)
            .map_err(|e| anyhow!("{}: tensor `{}`: storage {} missing ({e})", path.display(), info.name, info.path))?;
        // torch.save writes a storage's bytes exactly: a record of another size means the
        // storage was relabelled to another dtype, or cut short.
        let expected = (info.storage_size as u64).checked_mul(size as u64);
        if expected != Some(reader.size()) {
            bail!(
                "{}: tensor `{}`: its storage record holds {} bytes, but {} elements of {:?} need {}; the tensor's dtype was changed or the file is truncated",
                path.display(),
                info.name,
                reader.size(),
                info.storage_size,
                info.dtype,
                expected.map_or("more".to_string(), |e| e.to_string())
            );
        }
        let span = if n == 0 { 0 } else { (last + 1 - start / size) * size };
        std::io::copy(&mut reader.by_ref().take(start as u64), &mut std::io::sink())?;
        let truncated = |e: std::io::Error| anyhow!("{}: tensor `{}` is truncated ({e})", path.display(), info.name);
        if layout.is_contiguous() && dtype == StoredDType::F32 {
            // The common case: straight into the final buffer.
            reader.read_exact(bytemuck::cast_slice_mut(out)).map_err(truncated)?;
            // Stored little-endian (a no-op on little-endian machines).
            for x in out.iter_mut() {
                *x = f32::from_bits(u32::from_le(x.to_bits()));
            }
        } else {
            let mut region = vec![0u8; span];
            reader.read_exact(&mut region).map_err(truncated)?;
            // Gather the view's elements in row-major order.
            let mut index = vec![0usize; dims.len()];
            for slot in out.iter_mut() {
                let at: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>() * size;
                *slot = dtype.decode(&region[at..at + size]);
                for k in (0..dims.len()).rev() {
                    index[k] += 1;
                    if index[k] < dims[k] {
                        break;
                    }
                    index[k] = 0;
                }
            }
        }
        Ok(())
    }
}

/// Entries of a pickled dict keyed by strings.
pub fn dict_entries(obj: &Object) -> Option<Vec<(String, &Object)>> {
    match obj {
        Object::Dict(items) => Some(
            items
                .iter()
                .filter_map(|(k, v)| match k {
                    Object::Unicode(s) => Some((s.clone(), v)),
                    _ => None,
                })
                .collect(),
        ),
        _ => None,
    }
}

/// A string value of a pickled dict.
pub fn dict_string(obj: &Object, key: &str) -> Option<String> {
    dict_entries(obj)?.into_iter().find(|(k, _)| k == key).and_then(|(_, v)| match v {
        Object::Unicode(s) => Some(s.clone()),
        _ => None,
    })
}

/// Whether a pickled dict has a key.
pub fn dict_has(obj: &Object, key: &str) -> bool {
    dict_entries(obj).is_some_and(|e| e.iter().any(|(k, _)| k == key))
}

/// The float types a checkpoint may store; every one is read as f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoredDType {
    F32,
    F64,
    F16,
    BF16,
}

impl StoredDType {
    fn from_candle(d: DType) -> Option<Self> {
        match d {
            DType::F32 => Some(Self::F32),
            DType::F64 => Some(Self::F64),
            DType::F16 => Some(Self::F16),
            DType::BF16 => Some(Self::BF16),
            _ => None,
        }
    }

    fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F64 => 8,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// One little-endian element (`bytes.len() == self.size()`).
    fn decode(self, b: &[u8]) -> f32 {
        match self {
            Self::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            Self::F64 => f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32,
            Self::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            Self::BF16 => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        }
    }
}

/// One tensor of a safetensors header: its type, shape and bytes (relative to the data
/// section), already checked to agree with each other and with the file's size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsEntry {
    /// `None` for the integer and boolean types, which MusicGen does not use.
    pub dtype: Option<StoredDType>,
    /// The type as the header names it.
    pub dtype_name: String,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

/// The largest safetensors header read (the reference reader's own limit is 100 MB).
const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

/// Parses the JSON header of a safetensors file whose data section holds `data_len`
/// bytes. Every size is checked before it is trusted: a tensor must fit its dtype, its
/// shape and the file.
pub fn parse_safetensors_header(json: &[u8], data_len: u64) -> Result<Vec<(String, SafetensorsEntry)>> {
    let v: serde_json::Value =
        serde_json::from_slice(json).map_err(|e| anyhow!("the header is not valid JSON ({e})"))?;
    let obj = v.as_object().ok_or_else(|| anyhow!("the header is not a JSON object"))?;
    let mut out = Vec::with_capacity(obj.len());
    for (name, t) in obj {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| anyhow!("tensor `{name}`: {what}");
        let dtype_name = t.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad("no `dtype` string"))?;
        let (dtype, size) = match dtype_name {
            "F32" => (Some(StoredDType::F32), 4),
            "F64" => (Some(StoredDType::F64), 8),
            "F16" => (Some(StoredDType::F16), 2),
            "BF16" => (Some(StoredDType::BF16), 2),
            "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" => (None, 1),
            "I16" | "U16" => (None, 2),
            "I32" | "U32" => (None, 4),
            "I64" | "U64" => (None, 8),
            other => return Err(bad(&format!("unknown dtype `{other}`"))),
        };
        let shape: Vec<usize> = t
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok())).collect())
            .ok_or_else(|| bad("`shape` must be a list of non-negative integers"))?;
        let offsets: Vec<u64> = t
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|s| s.iter().map(|d| d.as_u64()).collect())
            .ok_or_else(|| bad("`data_offsets` must be two non-negative integers"))?;
        let [start, end] = offsets[..] else { return Err(bad("`data_offsets` must be two integers")) };
        if start > end || end > data_len {
            return Err(bad(&format!(
                "bytes {start}..{end} lie outside the data section of {data_len} bytes (truncated file?)"
            )));
        }
        let bytes = shape
            .iter()
            .try_fold(size as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(&format!("shape {shape:?} is too large")))?;
        if bytes != end - start {
            return Err(bad(&format!(
                "shape {shape:?} of {dtype_name} needs {bytes} bytes but {} are stored; the dtype or shape was changed",
                end - start
            )));
        }
        out.push((name.clone(), SafetensorsEntry { dtype, dtype_name: dtype_name.to_string(), shape, start, end }));
    }
    Ok(out)
}

/// A safetensors file kept open while its tensors are read one by one.
pub struct SafetensorsFile {
    path: PathBuf,
    file: Mutex<std::fs::File>,
    data_start: u64,
}

/// The tensors of a safetensors file as [`StoredTensor`]s: only the header is read here.
pub fn open_safetensors(path: &Path) -> Result<HashMap<String, StoredTensor>> {
    ensure_readable(path)?;
    let fail =
        |what: String| anyhow!("{}: not a valid safetensors file: {what}; re-export or re-download it", path.display());
    let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    let len = file.metadata().with_context(|| format!("{}: cannot read", path.display()))?.len();
    let mut n = [0u8; 8];
    file.read_exact(&mut n).map_err(|_| fail("shorter than its 8-byte header length".into()))?;
    let n = u64::from_le_bytes(n);
    if n > MAX_SAFETENSORS_HEADER || n > len - 8 {
        return Err(fail(format!("the header claims {n} bytes in a file of {len}")));
    }
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json).map_err(|e| fail(format!("cannot read the header ({e})")))?;
    let entries = parse_safetensors_header(&json, len - 8 - n).map_err(|e| fail(format!("{e:#}")))?;
    let shared = Arc::new(SafetensorsFile { path: path.to_path_buf(), file: Mutex::new(file), data_start: 8 + n });
    Ok(entries
        .into_iter()
        .map(|(name, entry)| (name.clone(), StoredTensor::Safetensors { file: shared.clone(), name, entry }))
        .collect())
}

/// Every tensor of a safetensors file, read now.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    materialize(open_safetensors(path)?)
}

impl SafetensorsFile {
    fn read_into(&self, name: &str, entry: &SafetensorsEntry, out: &mut [f32]) -> Result<()> {
        let path = &self.path;
        let dtype = entry.dtype.ok_or_else(|| {
            anyhow!("{}: tensor `{name}` is stored as {}, not a float type", path.display(), entry.dtype_name)
        })?;
        let n = (entry.end - entry.start) / dtype.size() as u64;
        if out.len() as u64 != n {
            bail!("{}: tensor `{name}`: {} elements asked for, {n} stored", path.display(), out.len());
        }
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        file.seek(SeekFrom::Start(self.data_start + entry.start))?;
        let truncated = |e: std::io::Error| anyhow!("{}: tensor `{name}` is truncated ({e})", path.display());
        if dtype == StoredDType::F32 {
            // The common case: straight into the final buffer.
            file.read_exact(bytemuck::cast_slice_mut(out)).map_err(truncated)?;
            for x in out.iter_mut() {
                *x = f32::from_bits(u32::from_le(x.to_bits()));
            }
        } else {
            // Converted in chunks, never holding the whole tensor twice.
            let size = dtype.size();
            let mut buf = vec![0u8; size * 65536];
            for chunk in out.chunks_mut(65536) {
                let bytes = &mut buf[..chunk.len() * size];
                file.read_exact(bytes).map_err(truncated)?;
                for (slot, b) in chunk.iter_mut().zip(bytes.chunks_exact(size)) {
                    *slot = dtype.decode(b);
                }
            }
        }
        Ok(())
    }
}

/// A checkpoint tensor, read only when the model claims it, straight into the buffer
/// the model keeps: a model is never held twice in memory while it loads.
#[derive(Clone)]
pub enum StoredTensor {
    /// Already in memory (the built-in model, tests).
    Memory(Tensor),
    Safetensors {
        file: Arc<SafetensorsFile>,
        name: String,
        entry: SafetensorsEntry,
    },
    Pickle {
        file: Arc<PickleFile>,
        info: TensorInfo,
    },
    /// Pieces stacked along the first dimension (q, k, v packed as `in_proj_weight`).
    Stacked(Vec<StoredTensor>),
}

impl StoredTensor {
    pub fn dims(&self) -> Result<Vec<usize>> {
        match self {
            Self::Memory(t) => Ok(t.dims().to_vec()),
            Self::Safetensors { entry, .. } => Ok(entry.shape.clone()),
            Self::Pickle { info, .. } => Ok(info.layout.dims().to_vec()),
            Self::Stacked(parts) => {
                let mut dims: Option<Vec<usize>> = None;
                for p in parts {
                    let d = p.dims()?;
                    dims = Some(match dims {
                        None => d,
                        Some(mut acc) => {
                            if acc.len() != d.len() || acc.is_empty() || acc[1..] != d[1..] {
                                bail!("pieces of shapes {acc:?} and {d:?} cannot be stacked");
                            }
                            acc[0] += d[0];
                            acc
                        }
                    });
                }
                dims.ok_or_else(|| anyhow!("nothing to stack"))
            }
        }
    }

    pub fn elem_count(&self) -> Result<usize> {
        Ok(self.dims()?.iter().product())
    }

    /// Reads the tensor, row-major, into `out` (exactly its size). Values read from a
    /// file must be finite: NaN or infinity in a checkpoint is refused here, naming the
    /// tensor, rather than surfacing later as a diverged loss or an all-NaN embedding.
    pub fn read_into(&self, name: &str, out: &mut [f32]) -> Result<()> {
        match self {
            Self::Memory(t) => {
                let v: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
                if v.len() != out.len() {
                    bail!("tensor `{name}`: {} elements asked for, {} held", out.len(), v.len());
                }
                out.copy_from_slice(&v);
                return Ok(());
            }
            Self::Safetensors { file, name: stored, entry } => file.read_into(stored, entry, out)?,
            Self::Pickle { file, info } => file.read_into(info, out)?,
            Self::Stacked(parts) => {
                let mut at = 0;
                for p in parts {
                    let n = p.elem_count()?;
                    let piece =
                        out.get_mut(at..at + n).ok_or_else(|| anyhow!("tensor `{name}`: stacked pieces overflow"))?;
                    p.read_into(name, piece)?;
                    at += n;
                }
                return Ok(());
            }
        }
        if let Some(i) = out.iter().position(|x| !x.is_finite()) {
            bail!(
                "{}: tensor `{}` holds a non-finite value ({} at element {i}); the checkpoint is damaged (a diverged fine-tune?)",
                self.origin(),
                self.stored_name().unwrap_or(name),
                out[i]
            );
        }
        Ok(())
    }

    /// The whole tensor as f32, row-major.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let mut out = vec![0f32; self.elem_count()?];
        self.read_into(name, &mut out)?;
        Ok(out)
    }

    pub fn to_tensor(&self, name: &str) -> Result<Tensor> {
        if let Self::Memory(t) = self {
            return Ok(t.clone());
        }
        Ok(Tensor::from_vec(self.read_f32(name)?, self.dims()?, &Device::Cpu)?)
    }

    /// The file it is read from.
    fn origin(&self) -> String {
        match self {
            Self::Safetensors { file, .. } => file.path.display().to_string(),
            Self::Pickle { file, .. } => file.path.display().to_string(),
            Self::Memory(_) | Self::Stacked(_) => "<memory>".to_string(),
        }
    }

    /// The name the file gives it.
    fn stored_name(&self) -> Option<&str> {
        match self {
            Self::Safetensors { name, .. } => Some(name),
            Self::Pickle { info, .. } => Some(&info.name),
            Self::Memory(_) | Self::Stacked(_) => None,
        }
    }
}

/// Reads every stored tensor now.
pub fn materialize(stored: HashMap<String, StoredTensor>) -> Result<HashMap<String, Tensor>> {
    stored.into_iter().map(|(name, s)| Ok((name.clone(), s.to_tensor(&name)?))).collect()
}

/// Tensors of a weights file of either format, chosen by extension.
pub fn open_weights(path: &Path) -> Result<HashMap<String, StoredTensor>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => open_safetensors(path),
        _ => open_pickle_tensors(path, None),
    }
}

/// The weights of a Hugging Face model directory: `model.safetensors`, sharded
/// safetensors with an index, or `pytorch_model.bin`. Headers only: see [`StoredTensor`].
pub fn open_hf_weights(dir: &Path) -> Result<HashMap<String, StoredTensor>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return open_safetensors(&single);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: no `weight_map`", index.display()))?;
        let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        files.sort();
        files.dedup();
        let mut all = HashMap::new();
        for f in files {
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                bail!("{}: shard `{f}` is not a file name in this directory", index.display());
            }
            all.extend(open_safetensors(&dir.join(f))?);
        }
        return Ok(all);
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.exists() {
        return open_pickle_tensors(&bin, None);
    }
    bail!(
        "{}: no weights found (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin)",
        dir.display()
    )
}

/// The weights of a Hugging Face model directory, read now.
pub fn read_hf_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    materialize(open_hf_weights(dir)?)
}

/// Reads a JSON file with a message naming it on failure.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}
