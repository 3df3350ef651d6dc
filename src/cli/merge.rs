//! `spintrak merge OUT.bin SHARD.bin...`: joins the shards of a sharded run.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use crate::store::EmbeddingFile;

/// Merge the shard outputs of a sharded `generate-training-dataset-parallel` run.
#[derive(Debug, Args)]
#[command(
    after_help = "Example:\n  spintrak merge training_gradients_30.bin part*.bin\n\nThe result is byte-identical to a single-machine run over the same dataset."
)]
pub struct Merge {
    /// Output embedding file.
    pub output: PathBuf,
    /// Shard files (every shard of the run, in any order).
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
}

impl Merge {
    pub fn run(&self) -> Result<()> {
        super::check_output_dir(&self.output)?;
        for shard in &self.shards {
            super::refuse_overlap(&self.output, "the output", shard, "the shard", false)?;
        }
        let files: Vec<(PathBuf, EmbeddingFile)> =
            self.shards.iter().map(|p| Ok((p.clone(), EmbeddingFile::read(p)?))).collect::<Result<_>>()?;
        let (first_path, first) = &files[0];
        let Some(info) = first.header.shard.clone() else {
            bail!("{}: not a shard (made without --shard)", first_path.display());
        };
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
        EmbeddingFile { header, data }.write(&self.output)?;
        eprintln!("wrote {} ({} examples from {} shards)", self.output.display(), info.dataset_examples, info.count);
        Ok(())
    }
}
