//! Mutation fuzzing of every reader of untrusted files, from the committed corpus in
//! `tests/fuzz_corpus/<reader>/`: pickle streams and zip checkpoints, safetensors, audio,
//! YAML (experiment configs and audiocraft `xp.cfg`), embedding files.
//!
//! Each reader gets a fixed number of deterministic mutations of each seed (bit flips,
//! boundary values in length fields, truncation, repeated and inserted runs) and must
//! return `Ok` or `Err` — never panic, abort or overflow its stack. `SPINTRAK_FUZZ_ITERS`
//! raises the count for a longer local run; failing inputs are written to
//! `target/fuzz-failures/` to become corpus entries.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use spintrak::rng::Stream;

fn corpus(reader: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_corpus").join(reader);
    let mut seeds: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "{}: empty corpus", dir.display());
    seeds
}

fn iterations() -> usize {
    std::env::var("SPINTRAK_FUZZ_ITERS").ok().and_then(|v| v.parse().ok()).unwrap_or(150)
}

/// One mutation of `seed`, drawn from `s`.
fn mutate(seed: &[u8], s: &mut Stream) -> Vec<u8> {
    let mut v = seed.to_vec();
    let rounds = 1 + (s.next_u64() % 4) as usize;
    for _ in 0..rounds {
        let len = v.len().max(1);
        let at = (s.next_u64() as usize) % len;
        match s.next_u64() % 7 {
            0 => {
                if let Some(b) = v.get_mut(at) {
                    *b ^= 1 << (s.next_u64() % 8);
                }
            }
            1 => {
                // A boundary value over a 1-, 2-, 4- or 8-byte field.
                let width = [1usize, 2, 4, 8][(s.next_u64() % 4) as usize];
                let value: u64 =
                    [0, 1, 0x7f, 0xff, 0x7fff_ffff, 0xffff_ffff, u64::MAX, 1 << 40][(s.next_u64() % 8) as usize];
                for (i, b) in value.to_le_bytes().iter().take(width).enumerate() {
                    if let Some(x) = v.get_mut(at + i) {
                        *x = *b;
                    }
                }
            }
            2 => v.truncate(at),
            3 => {
                // Repeat a run (deeper nesting, longer lists).
                let end = (at + 1 + (s.next_u64() % 16) as usize).min(v.len());
                let run = v[at.min(v.len())..end].to_vec();
                let times = 1 + (s.next_u64() % 64) as usize;
                for _ in 0..times {
                    v.splice(at..at, run.iter().copied());
                }
            }
            4 => {
                let n = 1 + (s.next_u64() % 8) as usize;
                let bytes: Vec<u8> = (0..n).map(|_| s.next_u64() as u8).collect();
                v.splice(at.min(v.len())..at.min(v.len()), bytes);
            }
            5 => {
                let end = (at + 1 + (s.next_u64() % 32) as usize).min(v.len());
                v.drain(at.min(v.len())..end);
            }
            _ => {
                if let Some(b) = v.get_mut(at) {
                    *b = s.next_u64() as u8;
                }
            }
        }
    }
    v
}

/// Runs `read` on every seed and its mutations; fails listing the inputs that panicked.
fn fuzz(reader: &str, read: impl Fn(&[u8])) {
    let mut failures = Vec::new();
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures").join(reader);
    for (name, seed) in corpus(reader) {
        let mut s = Stream::new(name.bytes().fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64)));
        for i in 0..=iterations() {
            let input = if i == 0 { seed.clone() } else { mutate(&seed, &mut s) };
            if catch_unwind(AssertUnwindSafe(|| read(&input))).is_err() {
                std::fs::create_dir_all(&out).unwrap();
                let path = out.join(format!("{name}.{i}"));
                std::fs::write(&path, &input).unwrap();
                failures.push(path.display().to_string());
            }
        }
    }
    assert!(failures.is_empty(), "{reader}: the reader panicked on:\n{}", failures.join("\n"));
}

/// Writes `bytes` to a fresh file named `name` and hands its path to `read`.
fn with_file(name: &str, bytes: &[u8], read: impl FnOnce(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, bytes).unwrap();
    read(&path);
}

#[test]
fn pickle_streams_and_checkpoints() {
    use spintrak::musicgen::checkpoint::{open_pickle_tensors, parse_pickle, read_pickle_tensors};
    fuzz("pickle", |bytes| {
        if bytes.starts_with(b"PK") {
            with_file("model.pt", bytes, |p| {
                let _ = read_pickle_tensors(p, Some("best_state"));
                let _ = read_pickle_tensors(p, None);
            });
        } else {
            let _ = parse_pickle(bytes);
            // The same stream inside a zip checkpoint, read down to the tensors.
            let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
            let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
            zip.start_file("archive/data.pkl", stored).unwrap();
            std::io::Write::write_all(&mut zip, bytes).unwrap();
            let file = zip.finish().unwrap().into_inner();
            with_file("model.pt", &file, |p| {
                if let Ok(t) = open_pickle_tensors(p, Some("best_state")) {
                    for (name, t) in t {
                        let _ = t.to_tensor(&name);
                    }
                }
            });
        }
    });
}

#[test]
fn safetensors_headers_and_files() {
    use spintrak::musicgen::checkpoint::{parse_safetensors_header, read_safetensors};
    fuzz("safetensors", |bytes| {
        with_file("model.safetensors", bytes, |p| {
            let _ = read_safetensors(p);
        });
        if bytes.len() >= 8 {
            let n = (u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize).min(bytes.len() - 8);
            let _ = parse_safetensors_header(&bytes[8..8 + n], (bytes.len() - 8 - n) as u64);
        }
    });
}

#[test]
fn audio_front_end() {
    fuzz("audio", |bytes| {
        with_file("song.wav", bytes, |p| {
            let _ = spintrak::audio::read_audio(p);
            let _ = spintrak::audio::read_excerpt(p, 32000, 2, 0.0, Some(0.05));
        });
    });
}

#[test]
fn yaml_configs() {
    fuzz("yaml", |bytes| {
        let text = String::from_utf8_lossy(bytes);
        let _ = spintrak::musicgen::loader::read_xp_cfg(&text);
        with_file("experiment.yaml", bytes, |p| {
            let _ = spintrak::experiments::config::ExperimentConfig::read(p);
        });
    });
}

#[test]
fn embedding_files() {
    use spintrak::store::EmbeddingFile;
    fuzz("embedding", |bytes| {
        let _ = EmbeddingFile::from_bytes(bytes);
        with_file("e.bin", bytes, |p| {
            let _ = EmbeddingFile::read(p);
        });
    });
}
