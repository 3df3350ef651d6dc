//! The state of a resumable run, shared by the dataset walk and the experiment runner:
//! the settings it was started with (a resume must match them, or is refused naming the
//! setting), a lock so that two runs never write one output, and per-example state files
//! that record what their example depended on and a checksum of their bytes.
//!
//! A finished example is kept only while everything it was computed from is unchanged:
//! `--resume` recomputes an example whose audio file, description, duration or seed has
//! changed since, and one whose state file is damaged.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::EmbeddingFile;

/// The settings of a run, by name (values as JSON).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings(pub BTreeMap<String, serde_json::Value>);

impl Settings {
    pub fn with(mut self, name: &str, value: impl Serialize) -> Result<Self> {
        self.0.insert(name.to_string(), serde_json::to_value(value)?);
        Ok(self)
    }

    /// Fails naming the first setting that differs from `stored` (read from `path`).
    pub fn check(&self, stored: &Settings, path: &Path) -> Result<()> {
        let names: std::collections::BTreeSet<&String> = self.0.keys().chain(stored.0.keys()).collect();
        for name in names {
            let (now, then) = (self.0.get(name), stored.0.get(name));
            if now != then {
                let show = |v: Option<&serde_json::Value>| v.map_or("(not set)".to_string(), |v| v.to_string());
                bail!(
                    "{}: this run was started with a different {name} ({}; now {}); resume with the same settings, or start a new run",
                    path.display(),
                    show(then),
                    show(now)
                );
            }
        }
        Ok(())
    }

    /// Writes the settings to `path`, or checks them against those already there.
    pub fn write_or_check(&self, path: &Path) -> Result<()> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let stored: Settings = serde_json::from_str(&text)
                    .with_context(|| format!("{}: not a spintrak run manifest", path.display()))?;
                self.check(&stored, path)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                crate::io::write_atomic(path, serde_json::to_string_pretty(self)?.as_bytes())
            }
            Err(e) => Err(e).with_context(|| format!("{}: cannot read", path.display())),
        }
    }
}

/// An exclusive lock on a run's folder, held until dropped (released by the kernel if the
/// process dies, even by `kill -9`).
pub struct RunLock {
    _file: File,
}

impl RunLock {
    /// Locks `dir` (which must exist), or fails saying another run holds it.
    pub fn acquire(dir: &Path, output: &Path) -> Result<Self> {
        let path = dir.join(".lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("{}: cannot create the lock file", path.display()))?;
        #[cfg(unix)]
        {
            use std::os::unix::io::AsRawFd;
            // SAFETY: flock on a descriptor this function owns; no memory is involved.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if rc != 0 {
                bail!(
                    "{}: another spintrak run is writing this output (it holds {}); wait for it to finish or stop it first",
                    output.display(),
                    path.display()
                );
            }
        }
        Ok(Self { _file: file })
    }
}

/// What one example's result depends on beyond the run's settings, by name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Inputs(pub BTreeMap<String, String>);

impl Inputs {
    pub fn with(mut self, name: &str, value: impl std::fmt::Display) -> Self {
        self.0.insert(name.to_string(), value.to_string());
        self
    }

    /// A file's identity as cheaply known: size and modification time.
    pub fn with_file(self, name: &str, path: &Path) -> Self {
        let stamp = match std::fs::metadata(path) {
            Ok(m) => {
                let modified = m
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_nanos());
                format!("{} bytes, modified {modified} ns", m.len())
            }
            Err(e) => format!("unreadable ({e})"),
        };
        self.with(name, stamp)
    }

    /// A small file's content, by hash.
    pub fn with_content(self, name: &str, path: &Path) -> Self {
        let stamp = match std::fs::read(path) {
            Ok(bytes) => format!("xxh3:{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)),
            Err(e) => format!("unreadable ({e})"),
        };
        self.with(name, stamp)
    }
}

/// The state file beside an example's embedding: its inputs and the checksum of its bytes.
#[derive(Debug, Serialize, Deserialize)]
struct Stamp {
    inputs: Inputs,
    embedding_xxh3: String,
}

/// A run's state folder: settings, lock and one embedding + stamp per finished example.
pub struct RunState {
    dir: PathBuf,
    _lock: RunLock,
}

impl RunState {
    /// Opens the state folder `dir` of the run writing `output`: creates it, or (with
    /// `resume`) continues it after checking its settings. Fails if another run holds it.
    pub fn open(dir: &Path, output: &Path, settings: &Settings, resume: bool) -> Result<Self> {
        let existed = dir.exists();
        if !existed {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("{}: cannot create the state folder", dir.display()))?;
        }
        let lock = RunLock::acquire(dir, output)?;
        if existed && !resume {
            bail!(
                "{}: an interrupted run left its state here; pass --resume to continue it, or delete the folder to start over",
                dir.display()
            );
        }
        settings.write_or_check(&dir.join("manifest.json"))?;
        Ok(Self { dir: dir.to_path_buf(), _lock: lock })
    }

    fn paths(&self, key: &str) -> (PathBuf, PathBuf) {
        let name = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(key.as_bytes()));
        (self.dir.join(format!("{name}.bin")), self.dir.join(format!("{name}.json")))
    }

    /// Saves a finished example (embedding first; the stamp marks it complete).
    pub fn save(&self, key: &str, inputs: &Inputs, file: &EmbeddingFile) -> Result<()> {
        let (bin, json) = self.paths(key);
        let bytes = file.to_bytes()?;
        crate::io::write_atomic(&bin, &bytes)?;
        let stamp =
            Stamp { inputs: inputs.clone(), embedding_xxh3: format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)) };
        crate::io::write_atomic(&json, serde_json::to_string_pretty(&stamp)?.as_bytes())
    }

    /// The example saved under `key`, if it was computed from exactly `inputs` and its
    /// bytes are intact; otherwise `None` (it is then recomputed).
    pub fn load(&self, key: &str, inputs: &Inputs) -> Option<EmbeddingFile> {
        let (bin, json) = self.paths(key);
        let stamp: Stamp = serde_json::from_str(&std::fs::read_to_string(json).ok()?).ok()?;
        if stamp.inputs != *inputs {
            return None;
        }
        let bytes = std::fs::read(bin).ok()?;
        if format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&bytes)) != stamp.embedding_xxh3 {
            return None;
        }
        EmbeddingFile::from_bytes(&bytes).ok()
    }

    /// Removes the folder once the run's output is written.
    pub fn finish(self) -> Result<()> {
        std::fs::remove_dir_all(&self.dir).with_context(|| format!("{}: cannot remove", self.dir.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_name_what_changed_and_a_second_run_is_locked_out() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("out.bin.state");
        let out = dir.path().join("out.bin");
        let settings = Settings::default().with("seed", 27).unwrap().with("duration", 30.0).unwrap();
        let run = RunState::open(&state, &out, &settings, false).unwrap();
        // While the first holds the folder, a second run is refused.
        let e = format!("{:#}", RunState::open(&state, &out, &settings, true).err().unwrap());
        assert!(e.contains("another spintrak run"), "{e}");
        drop(run);
        // Without --resume, the leftover state is not silently reused.
        let e = format!("{:#}", RunState::open(&state, &out, &settings, false).err().unwrap());
        assert!(e.contains("--resume"), "{e}");
        // Other settings: refused naming the setting.
        let other = Settings::default().with("seed", 28).unwrap().with("duration", 30.0).unwrap();
        let e = format!("{:#}", RunState::open(&state, &out, &other, true).err().unwrap());
        assert!(e.contains("different seed (27; now 28)"), "{e}");
        RunState::open(&state, &out, &settings, true).unwrap().finish().unwrap();
        assert!(!state.exists());
    }
}
