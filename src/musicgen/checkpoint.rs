//! Reading checkpoint files as data: safetensors, and PyTorch zip pickles through
//! Candle's pickle reader, which interprets the opcodes itself and never imports or
//! runs anything named in the file.

use std::collections::HashMap;
use std::io::BufReader;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{Device, Tensor};

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

/// The root object of a PyTorch zip pickle (`data.pkl`), as data.
pub fn read_pickle_root(path: &Path) -> Result<Object> {
    ensure_readable(path)?;
    guarded(path, "PyTorch checkpoint", || {
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let mut zip = zip_archive(path, file)?;
        let names: Vec<String> = zip.file_names().filter_map(|n| n.ok().map(|n| n.to_string())).collect();
        let pkl = names
            .iter()
            .find(|n| n.ends_with("data.pkl"))
            .ok_or_else(|| anyhow!("{}: no data.pkl inside; not a PyTorch checkpoint", path.display()))?;
        let reader = zip.by_name(pkl).with_context(|| format!("{}: cannot read {pkl}", path.display()))?;
        let mut reader = BufReader::new(reader);
        let mut stack = Stack::empty();
        stack
            .read_loop(&mut reader)
            .map_err(|e| anyhow!("{}: the pickle is corrupt or truncated ({e})", path.display()))?;
        stack.finalize().map_err(|e| anyhow!("{}: the pickle is incomplete ({e})", path.display()))
    })
}

fn zip_archive(path: &Path, file: std::fs::File) -> Result<zip::ZipArchive<BufReader<std::fs::File>>> {
    zip::ZipArchive::new(BufReader::new(file)).map_err(|e| {
        anyhow!(
            "{}: not a PyTorch zip checkpoint ({e}); it may be truncated, or saved with the legacy non-zip format (re-save it with torch.save)",
            path.display()
        )
    })
}

/// The tensors of a PyTorch checkpoint, optionally under a top-level key (`best_state`).
pub fn read_pickle_tensors(path: &Path, key: Option<&str>) -> Result<HashMap<String, Tensor>> {
    ensure_readable(path)?;
    guarded(path, "PyTorch checkpoint", || {
        let tensors = candle_core::pickle::read_all_with_key(path, key)
            .map_err(|e| anyhow!("{}: cannot read tensors ({e})", path.display()))?;
        Ok(tensors.into_iter().collect())
    })
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
