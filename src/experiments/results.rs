//! Scores, tables and figures of experiments 1, 3 and 4, and the score tables behind
//! `spintrak score` / `attribute`.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use super::config::format_seconds;
use super::plot::{render, StripPlot, StripPoint};
use crate::attribution::score::{scores_factored, scores_rows, top_influences, Influence, Rows};
use crate::store::embedding_file::MappedEmbeddings;
use crate::store::index::{index_path, IndexFile};
use crate::store::{EmbeddingFile, Record};

/// Which experiment's results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Experiment {
    One,
    Three,
    Four,
}

impl Experiment {
    pub fn number(self) -> u32 {
        match self {
            Self::One => 1,
            Self::Three => 3,
            Self::Four => 4,
        }
    }
    /// The seed document's regularisation: λ = 10 for experiment 1, 1 for 3 and 4.
    pub fn default_lambda(self) -> f64 {
        match self {
            Self::One => 10.0,
            Self::Three | Self::Four => 1.0,
        }
    }
}

/// `--label NAME=LABEL` renames a training row in tables and figures.
#[derive(Debug, Clone, Default)]
pub struct Labels(pub HashMap<String, String>);

impl Labels {
    pub fn parse(items: &[String]) -> Result<Self> {
        let mut map = HashMap::new();
        for item in items {
            let (k, v) = item.split_once('=').with_context(|| format!("--label `{item}`: expected NAME=LABEL"))?;
            if k.is_empty() || v.is_empty() {
                bail!("--label `{item}`: expected NAME=LABEL");
            }
            map.insert(k.to_string(), v.to_string());
        }
        Ok(Self(map))
    }

    /// A training row's label: by name, else by source path, else the file stem of its name.
    pub fn of(&self, r: &Record) -> String {
        if let Some(l) = self.0.get(&r.name) {
            return l.clone();
        }
        if let Some(l) = r.source.as_ref().and_then(|s| self.0.get(s)) {
            return l.clone();
        }
        Path::new(&r.name).file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| r.name.clone())
    }

    /// The labels of `records`, made distinct: two rows given the same label (or the same
    /// file stem) keep their own columns, told apart by their source.
    pub fn unique(&self, records: &[Record]) -> Vec<String> {
        let mut labels: Vec<String> = records.iter().map(|r| self.of(r)).collect();
        let count = |labels: &[String], l: &str| labels.iter().filter(|x| x.as_str() == l).count();
        let first: Vec<String> = labels.clone();
        for (i, r) in records.iter().enumerate() {
            if count(&first, &first[i]) > 1 {
                labels[i] = format!("{} ({})", first[i], r.source.as_deref().unwrap_or(&r.name));
            }
        }
        let second = labels.clone();
        for (i, l) in labels.iter_mut().enumerate() {
            if count(&second, &second[i]) > 1 {
                *l = format!("{} #{}", second[i], i + 1);
            }
        }
        labels
    }
}

/// The embedding file a path names; a `.pt` path (as the seed document writes the
/// aggregate) falls back to the `.bin` beside it.
fn embeddings_path(path: &Path) -> Result<PathBuf> {
    if !path.exists() && path.extension().is_some_and(|e| e == "pt") {
        let bin = path.with_extension("bin");
        if bin.exists() {
            eprintln!("note: reading {} (spintrak writes embedding files as .bin)", bin.display());
            return Ok(bin);
        }
    }
    if !path.exists() {
        bail!("{}: no such file", path.display());
    }
    Ok(path.to_path_buf())
}

/// Reads an embedding file into memory (`embeddings_path` resolves the name).
pub fn read_embeddings(path: &Path) -> Result<EmbeddingFile> {
    EmbeddingFile::read(&embeddings_path(path)?)
}

/// Maps a training embedding file (`embeddings_path` resolves the name).
pub fn map_embeddings(path: &Path) -> Result<Arc<MappedEmbeddings>> {
    Ok(Arc::new(MappedEmbeddings::open(&embeddings_path(path)?)?))
}

/// Training rows of one or several files, read in place from their memory maps.
#[derive(Clone)]
pub struct Training {
    pub records: Vec<Record>,
    pub k: usize,
    files: Vec<Arc<MappedEmbeddings>>,
    /// The first row of each file in the concatenation.
    starts: Vec<usize>,
    /// The rows in use (of the concatenation), when a subset.
    selection: Option<Vec<usize>>,
}

/// Gathers training files, checking every one against the queries' header.
pub fn load_training(query: &EmbeddingFile, query_path: &Path, files: Vec<Arc<MappedEmbeddings>>) -> Result<Training> {
    if files.is_empty() {
        bail!("no training embedding files given");
    }
    let mut records = Vec::new();
    let mut starts = Vec::with_capacity(files.len());
    for f in &files {
        query.header.check_compatible(&f.header, &query_path.display().to_string(), &f.path.display().to_string())?;
        starts.push(records.len());
        records.extend(f.header.records.iter().cloned());
    }
    Ok(Training { records, k: query.k(), files, starts, selection: None })
}

impl Training {
    /// The rows with this duration.
    pub fn with_duration(&self, d: f64) -> Training {
        let all: Vec<usize> = match &self.selection {
            Some(s) => s.clone(),
            None => (0..self.records.len()).collect(),
        };
        let keep: Vec<usize> = (0..self.records.len()).filter(|&i| self.records[i].duration == d).collect();
        let selection: Vec<usize> = keep.iter().map(|&i| all[i]).collect();
        let records: Vec<Record> = keep.iter().map(|&i| self.records[i].clone()).collect();
        // Exactly one file's rows (experiment 1 has a training file per duration): that
        // file alone, so that its index can answer.
        for (f, file) in self.files.iter().enumerate() {
            let whole: Vec<usize> = (self.starts[f]..self.starts[f] + file.rows()).collect();
            if selection == whole {
                return Training { records, k: self.k, files: vec![file.clone()], starts: vec![0], selection: None };
            }
        }
        Training {
            records,
            k: self.k,
            files: self.files.clone(),
            starts: self.starts.clone(),
            selection: Some(selection),
        }
    }

    /// Row `i` of the concatenation of the files.
    fn row(&self, i: usize) -> &[f32] {
        let f = self.starts.partition_point(|&s| s <= i) - 1;
        let local = i - self.starts[f];
        &self.files[f].data()[local * self.k..(local + 1) * self.k]
    }

    /// The index beside the (single, whole) training file, when there is one made for λ.
    fn usable_index(&self, lambda: f64) -> Option<IndexFile> {
        let [file] = self.files.as_slice() else { return None };
        let path = index_path(&file.path);
        if self.selection.is_some() || !path.exists() {
            return None;
        }
        match IndexFile::open(&path).and_then(|ix| ix.check(file).map(|_| ix)) {
            Ok(ix) if ix.header.lambda == lambda => Some(ix),
            Ok(ix) => {
                eprintln!(
                    "note: {} was made for λ = {}, not {lambda}; scoring without it (re-run `spintrak index --lambda {lambda}` to use one)",
                    path.display(),
                    ix.header.lambda
                );
                None
            }
            Err(e) => {
                eprintln!("warning: {e:#}; scoring without the index");
                None
            }
        }
    }

    /// `S` (row-major m × n) for query rows `g` (m × k), through the index when one fits.
    pub fn scores(&self, g: &[f32], m: usize, lambda: f64) -> Result<Vec<f64>> {
        if let Some(ix) = self.usable_index(lambda) {
            let (s, sum) = scores_factored(g, m, self, &ix.factor(), true)?;
            if sum == Some(ix.rows_checksum()?) {
                return Ok(s);
            }
            eprintln!(
                "warning: {} holds other numbers than {} was made from; scoring without the index (re-run `spintrak index`)",
                self.name(),
                ix.path.display()
            );
        }
        Ok(scores_rows(g, m, self, lambda)?.0)
    }
}

impl Rows for Training {
    fn n(&self) -> usize {
        self.records.len()
    }

    fn k(&self) -> usize {
        self.k
    }

    fn block(&self, start: usize, len: usize) -> Cow<'_, [f32]> {
        if let ([file], None) = (self.files.as_slice(), &self.selection) {
            return Cow::Borrowed(&file.data()[start * self.k..(start + len) * self.k]);
        }
        let mut out = Vec::with_capacity(len * self.k);
        for r in start..start + len {
            out.extend_from_slice(self.row(self.selection.as_ref().map_or(r, |s| s[r])));
        }
        Cow::Owned(out)
    }

    fn name(&self) -> String {
        let names: Vec<String> = self.files.iter().map(|f| f.path.display().to_string()).collect();
        names.join(", ")
    }
}

/// Queries and training rows embedded under one or several models of one architecture
/// (a TRAK ensemble). Files are paired by model fingerprint; every model must hold the
/// same query rows and the same training rows, in the same order. Scores are the mean
/// of the models' scores.
pub struct Ensemble {
    /// One query file per model.
    pub queries: Vec<EmbeddingFile>,
    /// The training rows of each model (same order as `queries`).
    pub trainings: Vec<Training>,
}

fn same_rows(a: &[Record], b: &[Record]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.name == y.name && x.prompt == y.prompt && x.source == y.source && x.duration == y.duration)
}

impl Ensemble {
    /// Reads query files (one per model) and training files (any number per model).
    pub fn load(query_paths: &[PathBuf], training_paths: &[PathBuf]) -> Result<Self> {
        let queries = query_paths.iter().map(|p| Ok((p.clone(), read_embeddings(p)?))).collect::<Result<_>>()?;
        Self::with_queries(queries, training_paths)
    }

    /// Query embeddings already in memory (one per model, each named for messages) and
    /// training files.
    pub fn with_queries(query_files: Vec<(PathBuf, EmbeddingFile)>, training_paths: &[PathBuf]) -> Result<Self> {
        if query_files.is_empty() || training_paths.is_empty() {
            bail!("scores need query and training embedding files");
        }
        let mut queries: Vec<(PathBuf, EmbeddingFile)> = Vec::new();
        for (p, f) in query_files {
            if let Some((other, _)) =
                queries.iter().find(|(_, q)| q.header.model.fingerprint == f.header.model.fingerprint)
            {
                bail!(
                    "{} and {} are query files of the same model; give one query file per model",
                    other.display(),
                    p.display()
                );
            }
            queries.push((p, f));
        }
        let mut groups: Vec<Vec<Arc<MappedEmbeddings>>> = vec![Vec::new(); queries.len()];
        for p in training_paths {
            let f = map_embeddings(p)?;
            match queries.iter().position(|(_, q)| q.header.model.fingerprint == f.header.model.fingerprint) {
                Some(i) => groups[i].push(f),
                None if queries.len() == 1 => {
                    // One model: say what differs (fingerprint, objective, ...).
                    queries[0].1.header.check_compatible(
                        &f.header,
                        &queries[0].0.display().to_string(),
                        &p.display().to_string(),
                    )?;
                }
                None => bail!(
                    "{}: made with a model (fingerprint {}) none of the query files was made with",
                    p.display(),
                    f.header.model.fingerprint
                ),
            }
        }
        let mut trainings = Vec::with_capacity(queries.len());
        for ((qp, q), files) in queries.iter().zip(groups) {
            if files.is_empty() {
                bail!(
                    "{}: no training file was made with its model (fingerprint {}); give one per model",
                    qp.display(),
                    q.header.model.fingerprint
                );
            }
            trainings.push(load_training(q, qp, files)?);
        }
        let (q0, t0) = (&queries[0], &trainings[0]);
        for ((qp, q), t) in queries.iter().zip(&trainings).skip(1) {
            if q.header.objective.name != q0.1.header.objective.name || q.k() != q0.1.k() {
                bail!("{} and {}: the models' files differ in objective or k", q0.0.display(), qp.display());
            }
            if !same_rows(&q.header.records, &q0.1.header.records) {
                bail!("{} and {} do not hold the same queries in the same order", q0.0.display(), qp.display());
            }
            if !same_rows(&t.records, &t0.records) {
                bail!(
                    "the training files of {} and of {} do not hold the same songs in the same order",
                    q0.0.display(),
                    qp.display()
                );
            }
        }
        Ok(Self { queries: queries.into_iter().map(|(_, f)| f).collect(), trainings })
    }

    /// One model's files.
    pub fn single(query: EmbeddingFile, training: Training) -> Self {
        Self { queries: vec![query], trainings: vec![training] }
    }

    pub fn models(&self) -> usize {
        self.queries.len()
    }

    /// The queries (of the first model; all models hold the same).
    pub fn query(&self) -> &EmbeddingFile {
        &self.queries[0]
    }

    /// The training rows' records.
    pub fn training_records(&self) -> &[Record] {
        &self.trainings[0].records
    }

    /// The ensemble restricted to training rows of duration `d`.
    pub fn with_duration(&self, d: f64) -> Ensemble {
        Ensemble {
            queries: self.queries.clone(),
            trainings: self.trainings.iter().map(|t| t.with_duration(d)).collect(),
        }
    }

    /// Mean over models of `S = G (ΦᵀΦ + λI)⁻¹ Φᵀ` for query rows `rows` (row-major,
    /// rows.len() × n).
    pub fn scores(&self, rows: &[usize], lambda: f64) -> Result<Vec<f64>> {
        let mut mean: Vec<f64> = Vec::new();
        for (q, t) in self.queries.iter().zip(&self.trainings) {
            let g: Vec<f32> = rows.iter().flat_map(|&i| q.row(i).iter().copied()).collect();
            let s = t.scores(&g, rows.len(), lambda)?;
            if mean.is_empty() {
                mean = s;
            } else {
                for (a, b) in mean.iter_mut().zip(s) {
                    *a += b;
                }
            }
        }
        let e = self.models() as f64;
        mean.iter_mut().for_each(|x| *x /= e);
        Ok(mean)
    }
}

/// Scores of some query rows against training rows.
#[derive(Debug, Clone, Serialize)]
pub struct QueryScores {
    pub case: String,
    pub prompt: String,
    pub duration: f64,
    pub seed: u64,
    pub scores: Vec<TrainingScore>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TrainingScore {
    pub training: String,
    pub label: String,
    pub score: f64,
    pub percentage: f64,
    pub direction: &'static str,
}

/// Scores query rows `rows` against the ensemble's training rows.
pub fn score_queries(ensemble: &Ensemble, rows: &[usize], lambda: f64, labels: &Labels) -> Result<Vec<QueryScores>> {
    let query = ensemble.query();
    let records = ensemble.training_records();
    let n = records.len();
    let s = ensemble.scores(rows, lambda)?;
    let names: Vec<String> = records.iter().map(|r| r.name.clone()).collect();
    let unique = labels.unique(records);
    Ok(rows
        .iter()
        .enumerate()
        .map(|(qi, &row)| {
            let r = &query.header.records[row];
            let srow = &s[qi * n..(qi + 1) * n];
            let infl = top_influences(srow, &names, n);
            let mut by_index: Vec<Option<Influence>> = vec![None; n];
            for i in infl {
                let idx = i.index;
                by_index[idx] = Some(i);
            }
            QueryScores {
                case: r.name.clone(),
                prompt: r.prompt.clone(),
                duration: r.duration,
                seed: r.seed,
                scores: by_index
                    .into_iter()
                    .enumerate()
                    .map(|(i, inf)| {
                        let inf = inf.expect("every training row ranked");
                        TrainingScore {
                            training: records[i].name.clone(),
                            label: unique[i].clone(),
                            score: inf.score,
                            percentage: inf.percentage,
                            direction: inf.direction,
                        }
                    })
                    .collect(),
            }
        })
        .collect())
}

/// A plain-text grid table (`+---+` borders), as Python's tabulate "grid" prints.
pub fn grid_table(headers: &[String], rows: &[Vec<String>]) -> String {
    let cols = headers.len();
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (c, cell) in r.iter().enumerate().take(cols) {
            width[c] = width[c].max(cell.chars().count());
        }
    }
    let line = |ch: char| -> String {
        let mut s = String::from("+");
        for w in &width {
            s.push_str(&ch.to_string().repeat(w + 2));
            s.push('+');
        }
        s.push('\n');
        s
    };
    let row = |cells: &[String]| -> String {
        let mut s = String::from("|");
        for (c, w) in width.iter().enumerate() {
            let cell = cells.get(c).map(String::as_str).unwrap_or("");
            s.push_str(&format!(" {cell}{} |", " ".repeat(w - cell.chars().count())));
        }
        s.push('\n');
        s
    };
    let mut out = line('-');
    out.push_str(&row(headers));
    out.push_str(&line('='));
    for r in rows {
        out.push_str(&row(r));
        out.push_str(&line('-'));
    }
    out
}

/// The files one results command writes.
#[derive(Debug, Clone, Serialize)]
pub struct ResultFiles {
    pub csv: PathBuf,
    pub json: PathBuf,
    pub svg: PathBuf,
    pub png: PathBuf,
}

/// Everything a results command computed.
pub struct ExperimentResults {
    pub scores: Vec<QueryScores>,
    pub tables: String,
    pub files: ResultFiles,
}

fn write_scores(exp: Experiment, out_dir: &Path, lambda: f64, all: &[QueryScores]) -> Result<(PathBuf, PathBuf)> {
    let n = exp.number();
    let csv_path = out_dir.join(format!("experiment_{n}_scores.csv"));
    let json_path = out_dir.join(format!("experiment_{n}_scores.json"));
    let mut csv = String::from("case,prompt,duration,seed,training,label,score,percentage,direction\n");
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    for c in all {
        for t in &c.scores {
            csv.push_str(&format!(
                "{},{},{},{},{},{},{:e},{},{}\n",
                q(&c.case),
                q(&c.prompt),
                c.duration,
                c.seed,
                q(&t.training),
                q(&t.label),
                t.score,
                t.percentage,
                t.direction
            ));
        }
    }
    crate::io::write_atomic(&csv_path, csv.as_bytes())?;
    let json = serde_json::json!({"experiment": n, "lambda": lambda, "cases": all});
    crate::io::write_atomic(&json_path, serde_json::to_string_pretty(&json)?.as_bytes())?;
    Ok((csv_path, json_path))
}

/// Order of first appearance.
fn ordered<T: PartialEq + Clone>(items: impl Iterator<Item = T>) -> Vec<T> {
    let mut out: Vec<T> = Vec::new();
    for i in items {
        if !out.contains(&i) {
            out.push(i);
        }
    }
    out
}

/// Runs the results of experiment 1, 3 or 4. `test_paths`: the runner's aggregate file,
/// or one per model of an ensemble.
pub fn experiment_results(
    exp: Experiment,
    test_paths: &[PathBuf],
    training_paths: &[PathBuf],
    lambda: f64,
    labels: &Labels,
    out_dir: &Path,
) -> Result<ExperimentResults> {
    let ensemble = Ensemble::load(test_paths, training_paths)?;
    let test = ensemble.query();
    if test.rows() == 0 {
        bail!("{}: holds no cases", test_paths[0].display());
    }
    if !out_dir.is_dir() {
        bail!("{}: the output folder does not exist", out_dir.display());
    }
    let recs = &test.header.records;
    let durations = ordered(recs.iter().map(|r| r.duration));
    let seeds = ordered(recs.iter().map(|r| r.seed));
    let prompts = ordered(recs.iter().map(|r| r.prompt.clone()));
    let mut all = Vec::new();
    let mut tables = String::new();
    match exp {
        Experiment::One => {
            // Pair cases and training rows by the durations in their headers.
            let available = ordered(ensemble.training_records().iter().map(|r| r.duration));
            for &d in &durations {
                let rows: Vec<usize> = (0..recs.len()).filter(|&i| recs[i].duration == d).collect();
                let t = ensemble.with_duration(d);
                if t.training_records().is_empty() {
                    let have: Vec<String> = available.iter().map(|x| format!("{} s", format_seconds(*x))).collect();
                    bail!(
                        "no training embeddings of {} s among the training files (they hold {}); compute them with `spintrak generate-training-dataset-parallel --duration {}`",
                        format_seconds(d),
                        if have.is_empty() { "none".into() } else { have.join(", ") },
                        format_seconds(d)
                    );
                }
                all.extend(score_queries(&t, &rows, lambda, labels)?);
            }
            // Mean of each case's embedding, per duration and seed.
            let mut headers = vec!["duration".to_string()];
            headers.extend(seeds.iter().map(|s| format!("seed {s}")));
            headers.push("all seeds".into());
            let mut rows = Vec::new();
            for &d in &durations {
                let mut row = vec![format!("{} s", format_seconds(d))];
                let mut sum = 0.0;
                let mut count = 0;
                for &s in &seeds {
                    match recs.iter().position(|r| r.duration == d && r.seed == s) {
                        Some(i) => {
                            let mean = test.row(i).iter().map(|&x| x as f64).sum::<f64>() / test.k() as f64;
                            sum += mean;
                            count += 1;
                            row.push(format!("{mean:.4e}"));
                        }
                        None => row.push("—".into()),
                    }
                }
                row.push(if count > 0 { format!("{:.4e}", sum / count as f64) } else { "—".into() });
                rows.push(row);
            }
            tables.push_str("Mean of the test embeddings (projected gradients) per duration:\n");
            tables.push_str(&grid_table(&headers, &rows));
        }
        Experiment::Three | Experiment::Four => {
            let rows: Vec<usize> = (0..recs.len()).collect();
            all.extend(score_queries(&ensemble, &rows, lambda, labels)?);
        }
    }
    // Score table: one row per case, one column per training song.
    let songs = ordered(all.iter().flat_map(|c| c.scores.iter().map(|t| t.label.clone())));
    let mut headers = vec!["case".to_string()];
    headers.extend(songs.iter().cloned());
    let rows: Vec<Vec<String>> = all
        .iter()
        .map(|c| {
            let mut r = vec![c.case.clone()];
            for s in &songs {
                r.push(
                    c.scores
                        .iter()
                        .find(|t| &t.label == s)
                        .map_or("—".into(), |t| format!("{:+.4e} ({:+.1}%)", t.score, t.percentage)),
                );
            }
            r
        })
        .collect();
    tables.push_str(&format!("Attribution scores (λ = {lambda}):\n"));
    tables.push_str(&grid_table(&headers, &rows));

    let (csv, json) = write_scores(exp, out_dir, lambda, &all)?;
    // Plot rows: durations (experiment 1) or prompts (3 and 4), in config order.
    let row_labels: Vec<String> = match exp {
        Experiment::One => durations.iter().map(|d| format!("{} s", format_seconds(*d))).collect(),
        _ => prompts.clone(),
    };
    let row_of = |c: &QueryScores| -> usize {
        match exp {
            Experiment::One => durations.iter().position(|d| *d == c.duration).unwrap_or(0),
            _ => prompts.iter().position(|p| *p == c.prompt).unwrap_or(0),
        }
    };
    let mut points = Vec::new();
    for c in &all {
        for t in &c.scores {
            points.push(StripPoint {
                row: row_of(c),
                x: t.score,
                colour: songs.iter().position(|s| *s == t.label).unwrap_or(0),
                marker: seeds.iter().position(|s| *s == c.seed).unwrap_or(0),
            });
        }
    }
    let n = exp.number();
    let plot = StripPlot {
        title: format!("Experiment {n}: attribution scores (λ = {lambda})"),
        x_label: "score".into(),
        y_label: if exp == Experiment::One { "duration".into() } else { "generated sample".into() },
        rows: row_labels,
        colours: songs,
        markers: seeds.iter().map(|s| format!("seed {s}")).collect(),
        points,
    };
    let svg = out_dir.join(format!("experiment_{n}.svg"));
    let png = out_dir.join(format!("experiment_{n}.png"));
    render(&plot, &svg, &png)?;
    Ok(ExperimentResults { scores: all, tables, files: ResultFiles { csv, json, svg, png } })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str, source: &str) -> Record {
        Record {
            name: name.into(),
            prompt: String::new(),
            duration: 1.0,
            seed: 0,
            source: Some(source.into()),
            offset: None,
        }
    }

    #[test]
    fn two_rows_with_one_label_keep_their_own_columns() {
        let labels = Labels::parse(&["a/rock.wav=Rock".into(), "b/rock.wav=Rock".into()]).unwrap();
        let records =
            [record("rock.wav", "a/rock.wav"), record("rock.wav", "b/rock.wav"), record("salsa.wav", "salsa.wav")];
        // By name both would be "Rock"; by source each gets its label, then told apart.
        let labels = Labels(labels.0.into_iter().filter(|(k, _)| k.contains('/')).collect());
        let got = labels.unique(&records);
        assert_eq!(got, vec!["Rock (a/rock.wav)", "Rock (b/rock.wav)", "salsa"]);
        // Same name, same source: numbered.
        let same = [record("x.wav", "x.wav"), record("x.wav", "x.wav")];
        let got = Labels::default().unique(&same);
        assert_ne!(got[0], got[1]);
    }
}
