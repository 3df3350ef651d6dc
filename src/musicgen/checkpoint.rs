//! Reading checkpoint files as data: safetensors, and PyTorch zip pickles through
//! Candle's pickle reader, which interprets the opcodes itself and never imports or
//! runs anything named in the file.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::pickle::{Object, Stack};
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

/// All tensors of a safetensors file.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    ensure_readable(path)?;
    guarded(path, "safetensors file", || {
        candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| anyhow!("{}: not a valid safetensors file ({e}); re-export or re-download it", path.display()))
    })
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
    let mut reader = BufReader::new(reader);
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut reader)
        .map_err(|e| anyhow!("{}: the pickle is corrupt or truncated ({e})", path.display()))?;
    let root = stack.finalize().map_err(|e| anyhow!("{}: the pickle is incomplete ({e})", path.display()))?;
    Ok((root, dir))
}

/// The root object of a PyTorch zip pickle (`data.pkl`), as data.
pub fn read_pickle_root(path: &Path) -> Result<Object> {
    ensure_readable(path)?;
    guarded(path, "PyTorch checkpoint", || {
        let mut zip = open_zip(path)?;
        Ok(pickle_root(path, &mut zip)?.0)
    })
}

/// The tensors of a PyTorch checkpoint, optionally under a top-level key (`best_state`).
/// Storage views (a tensor starting inside a shared storage) are honoured.
pub fn read_pickle_tensors(path: &Path, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
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
        let mut out = HashMap::new();
        for (name, value) in items {
            let Some(info) = value
                .into_tensor_info(name, Path::new(&dir))
                .map_err(|e| anyhow!("{}: unreadable tensor entry ({e})", path.display()))?
            else {
                continue;
            };
            if let Some(t) = read_storage(path, &mut zip, &info)? {
                out.insert(info.name.clone(), t);
            }
        }
        Ok(out)
    })
}

fn read_storage(path: &Path, zip: &mut Zip, info: &candle_core::pickle::TensorInfo) -> Result<Option<Tensor>> {
    use std::io::Read;
    let layout = &info.layout;
    let size = info.dtype.size_in_bytes();
    // Candle's pickle reader gives the storage offset in bytes already.
    let start = layout.start_offset();
    if !start.is_multiple_of(size) {
        bail!("{}: tensor `{}` starts inside an element; the checkpoint is damaged", path.display(), info.name);
    }
    let (dims, strides) = (layout.dims().to_vec(), layout.stride().to_vec());
    let n = layout.shape().elem_count();
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
    let mut reader = zip
        .by_name(&info.path)
        .map_err(|e| anyhow!("{}: tensor `{}`: storage {} missing ({e})", path.display(), info.name, info.path))?;
    let span = if n == 0 { 0 } else { (last + 1 - start / size) * size };
    // Checked against the archive's record before anything is allocated.
    if (start + span) as u64 > reader.size() {
        bail!(
            "{}: tensor `{}` is truncated (its storage record is {} bytes)",
            path.display(),
            info.name,
            reader.size()
        );
    }
    std::io::copy(&mut reader.by_ref().take(start as u64), &mut std::io::sink())?;
    let mut region = vec![0u8; span];
    reader
        .read_exact(&mut region)
        .map_err(|e| anyhow!("{}: tensor `{}` is truncated ({e})", path.display(), info.name))?;
    // Gather the view's elements in row-major order (a plain copy when contiguous).
    let bytes = if layout.is_contiguous() {
        region
    } else {
        let mut out = Vec::with_capacity(n * size);
        let mut index = vec![0usize; dims.len()];
        for _ in 0..n {
            let at: usize = index.iter().zip(&strides).map(|(i, s)| i * s).sum::<usize>() * size;
            out.extend_from_slice(&region[at..at + size]);
            for k in (0..dims.len()).rev() {
                index[k] += 1;
                if index[k] < dims[k] {
                    break;
                }
                index[k] = 0;
            }
        }
        out
    };
    let shape = layout.shape().clone();
    let t = match info.dtype {
        DType::F32 => Tensor::from_vec(
            bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            shape,
            &Device::Cpu,
        )?,
        DType::F64 => Tensor::from_vec(
            bytes.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect::<Vec<f64>>(),
            shape,
            &Device::Cpu,
        )?,
        DType::F16 => Tensor::from_vec(
            bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect::<Vec<f32>>(),
            shape,
            &Device::Cpu,
        )?,
        DType::BF16 => Tensor::from_vec(
            bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect::<Vec<f32>>(),
            shape,
            &Device::Cpu,
        )?,
        // Integer and boolean buffers (e.g. EnCodec's `inited`) are not used.
        _ => return Ok(None),
    };
    Ok(Some(t))
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

/// Tensors of a weights file of either format, chosen by extension.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => read_safetensors(path),
        _ => read_pickle_tensors(path, None),
    }
}

/// The weights of a Hugging Face model directory: `model.safetensors`, sharded
/// safetensors with an index, or `pytorch_model.bin`.
pub fn read_hf_weights(dir: &Path) -> Result<HashMap<String, Tensor>> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return read_safetensors(&single);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| anyhow!("{}: no `weight_map`", index.display()))?;
        let mut files: Vec<&str> = map.values().filter_map(|f| f.as_str()).collect();
        files.sort();
        files.dedup();
        let mut all = HashMap::new();
        for f in files {
            all.extend(read_safetensors(&dir.join(f))?);
        }
        return Ok(all);
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.exists() {
        return read_pickle_tensors(&bin, None);
    }
    bail!(
        "{}: no weights found (looked for model.safetensors, model.safetensors.index.json, pytorch_model.bin)",
        dir.display()
    )
}

/// Reads a JSON file with a message naming it on failure.
pub fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", path.display()))
}
