//! The dataset walk: every audio file (`.wav .mp3 .flac .m4a .aac`, any letter case)
//! under a folder, with a sibling JSON of the same stem holding
//! `{"description": str, "duration": number}`. Examples come sorted by relative path,
//! so every machine and every run sees the same order.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const AUDIO_EXTENSIONS: &[&str] = &["wav", "mp3", "flac", "m4a", "aac"];

/// One training example as found on disk (its JSON not yet read).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainingExample {
    /// Path relative to the dataset root, with `/` separators.
    pub rel_path: String,
    pub audio: PathBuf,
    pub json: PathBuf,
}

impl TrainingExample {
    /// The audio file's name (the earlier tool's `name`).
    pub fn file_name(&self) -> String {
        self.audio.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
    }

    /// Reads the description and duration, checking the audio file is there.
    pub fn read_description(&self, duration_override: Option<f64>) -> Result<(String, f64)> {
        let meta = std::fs::metadata(&self.audio).with_context(|| format!("{}: cannot read", self.rel_path))?;
        if meta.len() == 0 {
            bail!("{}: the audio file is empty (0 bytes)", self.rel_path);
        }
        std::fs::File::open(&self.audio).with_context(|| format!("{}: cannot open", self.rel_path))?;
        let json_name = self.json.display();
        for p in [&self.audio, &self.json] {
            if !std::fs::metadata(p).map(|m| m.is_file()).unwrap_or(false) {
                bail!("{}: not a regular file (a FIFO, device or directory?); it is not read", p.display());
            }
        }
        let text = std::fs::read_to_string(&self.json).with_context(|| format!("{json_name}: cannot read"))?;
        if text.trim().is_empty() {
            bail!("{json_name}: the file is empty; expected {{\"description\": \"...\", \"duration\": seconds}}");
        }
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| {
            format!("{json_name}: not valid JSON; expected {{\"description\": \"...\", \"duration\": seconds}}")
        })?;
        let description = match v.get("description") {
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(serde_json::Value::String(_)) => bail!("{json_name}: `description` is empty"),
            Some(other) => bail!("{json_name}: `description` must be a string, found {other}"),
            None => bail!("{json_name}: no `description` field"),
        };
        let duration = match (duration_override, v.get("duration")) {
            (Some(d), _) => d,
            (None, Some(x)) => {
                let d = x.as_f64().with_context(|| format!("{json_name}: `duration` must be a number, found {x}"))?;
                if d.is_nan() || d <= 0.0 {
                    bail!("{json_name}: `duration` must be positive, found {d}");
                }
                if d > crate::musicgen::model::MAX_SECONDS {
                    bail!(
                        "{json_name}: `duration` {d} s is longer than the {} s limit; pass --duration or fix the file",
                        crate::musicgen::model::MAX_SECONDS
                    );
                }
                d
            }
            (None, None) => bail!("{json_name}: no `duration` field (or pass --duration)"),
        };
        Ok((description, duration))
    }
}

/// The result of a walk.
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub examples: Vec<TrainingExample>,
    /// Audio files without a JSON description (relative paths): skipped, reported.
    pub without_json: Vec<String>,
}

fn is_audio(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| AUDIO_EXTENSIONS.iter().any(|a| a.eq_ignore_ascii_case(e)))
}

fn rel(root: &Path, path: &Path) -> String {
    let r = path.strip_prefix(root).unwrap_or(path);
    r.components().map(|c| c.as_os_str().to_string_lossy().to_string()).collect::<Vec<_>>().join("/")
}

/// Walks `root` recursively.
pub fn walk(root: &Path) -> Result<Dataset> {
    if !root.exists() {
        bail!("{}: no such directory (--input)", root.display());
    }
    if !root.is_dir() {
        bail!("{}: --input must be a directory of audio files with JSON descriptions", root.display());
    }
    let mut ds = Dataset::default();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries =
            std::fs::read_dir(&dir).with_context(|| format!("{}: cannot list the directory", dir.display()))?;
        let mut files: Vec<PathBuf> = Vec::new();
        for entry in entries {
            let entry = entry.with_context(|| format!("{}: cannot list the directory", dir.display()))?;
            let path = entry.path();
            let ft = entry.file_type().with_context(|| format!("{}: cannot stat", path.display()))?;
            if ft.is_dir() {
                stack.push(path);
            } else {
                files.push(path);
            }
        }
        for audio in files.iter().filter(|p| is_audio(p)) {
            let stem = audio.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
            let json = files.iter().find(|p| {
                p.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("json"))
                    && p.file_stem().map(|s| s.to_string_lossy() == stem).unwrap_or(false)
            });
            match json {
                Some(j) => ds.examples.push(TrainingExample {
                    rel_path: rel(root, audio),
                    audio: audio.clone(),
                    json: j.clone(),
                }),
                None => ds.without_json.push(rel(root, audio)),
            }
        }
    }
    ds.examples.sort_by(|a, b| a.rel_path.cmp(&b.rel_path));
    ds.without_json.sort();
    Ok(ds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_mixed_case_examples_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("b/deep")).unwrap();
        for (audio, json) in
            [("z.WAV", Some("z.json")), ("b/deep/a.Flac", Some("a.JSON")), ("b/c.mp3", None), ("a.m4a", Some("a.json"))]
        {
            std::fs::write(root.join(audio), b"x").unwrap();
            if let Some(j) = json {
                let j = Path::new(audio).parent().unwrap().join(j);
                std::fs::write(root.join(j), br#"{"description": "d", "duration": 3}"#).unwrap();
            }
        }
        std::fs::write(root.join("notes.txt"), b"x").unwrap();
        let ds = walk(root).unwrap();
        let rels: Vec<&str> = ds.examples.iter().map(|e| e.rel_path.as_str()).collect();
        assert_eq!(rels, vec!["a.m4a", "b/deep/a.Flac", "z.WAV"]);
        assert_eq!(ds.without_json, vec!["b/c.mp3"]);
        assert_eq!(ds.examples[2].file_name(), "z.WAV");
        assert_eq!(ds.examples[0].read_description(None).unwrap(), ("d".to_string(), 3.0));
        assert_eq!(ds.examples[0].read_description(Some(30.0)).unwrap().1, 30.0);
    }

    #[test]
    fn bad_descriptions_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let cases: &[(&str, &str)] = &[
            ("{not json", "not valid JSON"),
            (r#"{"duration": 3}"#, "no `description`"),
            (r#"{"description": 5, "duration": 3}"#, "must be a string"),
            (r#"{"description": "x", "duration": "long"}"#, "must be a number"),
            (r#"{"description": "x", "duration": -1}"#, "positive"),
            (r#"{"description": "x"}"#, "no `duration`"),
            ("", "empty"),
        ];
        for (i, (json, _)) in cases.iter().enumerate() {
            std::fs::write(dir.path().join(format!("s{i}.wav")), b"x").unwrap();
            std::fs::write(dir.path().join(format!("s{i}.json")), json).unwrap();
        }
        let ds = walk(dir.path()).unwrap();
        for (ex, (_, needle)) in ds.examples.iter().zip(cases) {
            let err = format!("{:#}", ex.read_description(None).unwrap_err());
            assert!(err.contains(needle) && err.contains(".json"), "{err}");
        }
        std::fs::write(dir.path().join("e.wav"), b"").unwrap();
        std::fs::write(dir.path().join("e.json"), r#"{"description": "x", "duration": 1}"#).unwrap();
        let ds = walk(dir.path()).unwrap();
        let e = ds.examples.iter().find(|e| e.rel_path == "e.wav").unwrap();
        assert!(format!("{:#}", e.read_description(None).unwrap_err()).contains("0 bytes"));
        assert!(walk(&dir.path().join("e.wav")).is_err());
        assert!(walk(&dir.path().join("missing")).is_err());
    }
}
