//! Joining the shard files of a sharded run into the file one machine would have written,
//! trusting nothing the shards cannot show: same settings, same dataset and duration,
//! every shard exactly once.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};

use super::EmbeddingFile;

/// Reads and checks `shards` (every shard of one run, in any order) and returns the merged
/// file, rows in the single-machine order.
pub fn merge_shards(shards: &[PathBuf]) -> Result<EmbeddingFile> {
    let files: Vec<(PathBuf, EmbeddingFile)> =
        shards.iter().map(|p| Ok((p.clone(), EmbeddingFile::read(p)?))).collect::<Result<_>>()?;
    let (first_path, first) = &files[0];
    let Some(info) = first.header.shard.clone() else {
        bail!("{}: not a shard (made without --shard)", first_path.display());
    };
    // The count comes from the file: bounded by the shards given before anything is sized by it.
    if info.count > shards.len() {
        bail!(
            "missing shard(s): the run of {} has {} shards but {} were given; pass every shard",
            first_path.display(),
            info.count,
            shards.len()
        );
    }
    let mut seen = vec![None::<&PathBuf>; info.count];
    for (path, f) in &files {
        first.header.check_compatible(&f.header, &first_path.display().to_string(), &path.display().to_string())?;
        let Some(s) = &f.header.shard else { bail!("{}: not a shard (made without --shard)", path.display()) };
        if s.count != info.count || s.dataset_examples != info.dataset_examples {
            bail!(
                "{}: shard of a different run ({} shards over {} examples; {} has {} over {})",
                path.display(),
                s.count,
                s.dataset_examples,
                first_path.display(),
                info.count,
                info.dataset_examples
            );
        }
        if s.dataset != info.dataset {
            bail!(
                "{}: shard of another dataset (its examples' paths differ from those of {}); merge only the shards of one run",
                path.display(),
                first_path.display()
            );
        }
        if s.duration != info.duration {
            let show = |d: Option<f64>| d.map_or("each example's own".to_string(), |d| format!("{d} s"));
            bail!(
                "{}: made with --duration {}, but {} with {}; merge only the shards of one run",
                path.display(),
                show(s.duration),
                first_path.display(),
                show(info.duration)
            );
        }
        if s.index >= s.count {
            bail!(
                "{}: shard index {} is out of range for {} shards; the file is damaged",
                path.display(),
                s.index,
                s.count
            );
        }
        if let Some(other) = seen[s.index] {
            bail!("{} and {} are both shard {}/{}", other.display(), path.display(), s.index, s.count);
        }
        seen[s.index] = Some(path);
    }
    let missing: Vec<String> =
        seen.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| format!("{i}/{}", info.count)).collect();
    if !missing.is_empty() {
        bail!("missing shard(s) {}", missing.join(", "));
    }
    // Rows keyed by their relative path: the single-machine order.
    let mut rows = BTreeMap::new();
    for (path, f) in &files {
        for (i, r) in f.header.records.iter().enumerate() {
            let key = r.source.clone().unwrap_or_else(|| r.name.clone());
            if rows.insert(key.clone(), (r.clone(), f.row(i).to_vec())).is_some() {
                bail!("{}: example {key} appears in more than one shard", path.display());
            }
        }
    }
    if rows.len() != info.dataset_examples {
        bail!("the shards hold {} examples, the dataset has {}", rows.len(), info.dataset_examples);
    }
    let mut header = first.header.clone();
    header.shard = None;
    header.records = Vec::with_capacity(rows.len());
    let mut data = Vec::with_capacity(rows.len() * header.projector.k);
    for (_, (r, row)) in rows {
        header.records.push(r);
        data.extend(row);
    }
    Ok(EmbeddingFile { header, data })
}
