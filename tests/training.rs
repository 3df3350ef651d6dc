//! `generate-training-dataset-parallel` and `merge` end to end on generated datasets.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_spintrak"));
    c.env_remove("RUST_BACKTRACE").env_remove("SLURM_ARRAY_TASK_ID").env_remove("JOB_COMPLETION_INDEX");
    c
}

fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = bin();
    c.args(args);
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().expect("spawn spintrak")
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).to_string()
}

/// `n` good examples in nested folders with mixed-case extensions.
fn dataset(root: &Path, n: usize, seconds: f64) {
    let exts = ["wav", "MP3", "Flac", "m4a", "AAC"];
    for i in 0..n {
        let dir = root.join(if i % 2 == 0 { "rock" } else { "salsa/live" });
        std::fs::create_dir_all(&dir).unwrap();
        let stem = format!("song{i:02}");
        // Real (short) audio under every extension: the walk probes each file.
        let tone: Vec<f32> = (0..3200).map(|t| (t as f32 * 0.05 * (i + 1) as f32).sin() * 0.3).collect();
        spintrak::audio::write_wav(&dir.join(format!("{stem}.{}", exts[i % exts.len()])), &[tone], 32000).unwrap();
        let desc = if i % 2 == 0 { "moody rock ballad" } else { "lively salsa groove" };
        std::fs::write(
            dir.join(format!("{stem}.json")),
            format!(r#"{{"description": "{desc} {i}", "duration": {seconds}}}"#),
        )
        .unwrap();
    }
}

// These tests exercise the walk's machinery (jobs, shards, resume, failures) with the
// generation objective, which only probes the audio. audio-nll on real audio is tested in
// tests/provenance.rs.
fn train(input: &Path, output: &Path, extra: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "generate-training-dataset-parallel",
        "--objective",
        "generation",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
        "--quiet",
        "--proj-dim",
        "256",
    ];
    args.extend_from_slice(extra);
    run(&args, envs)
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn jobs_and_batches_do_not_change_the_output() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data, 6, 0.4);
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let o = train(&data, &a.join("out.bin"), &["--jobs", "1"], &[]);
    assert!(o.status.success(), "{}", err(&o));
    let o = train(&data, &b.join("out.bin"), &["--jobs", "2"], &[]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(read(&a.join("out.bin")), read(&b.join("out.bin")));
    // Examples generated together (a batch of 4 and one of 2; two batches of 3 on two
    // workers): the same file.
    for (i, extra) in [["--batch", "4", "--jobs", "1"], ["--batch", "3", "--jobs", "2"]].iter().enumerate() {
        let out = tmp.path().join(format!("batched{i}.bin"));
        let o = train(&data, &out, extra, &[]);
        assert!(o.status.success(), "{}", err(&o));
        assert_eq!(read(&a.join("out.bin")), read(&out), "--batch changed the output ({extra:?})");
    }
    let o = train(&data, &tmp.path().join("nine.bin"), &["--batch", "9"], &[]);
    assert!(!o.status.success() && err(&o).contains("1 to 8"), "{}", err(&o));
    let f = spintrak::store::EmbeddingFile::read(&a.join("out.bin")).unwrap();
    let sources: Vec<String> = f.header.records.iter().map(|r| r.source.clone().unwrap()).collect();
    let mut sorted = sources.clone();
    sorted.sort();
    assert_eq!(sources, sorted, "rows in relative-path order");
    assert_eq!(f.header.records[0].seed, 27, "the earlier tool's default seed");
    assert!(!a.join("out.bin.state").exists(), "state removed after success");
}

#[test]
fn kill_dash_nine_then_resume_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data, 10, 3.0);
    let full = tmp.path().join("full");
    let crash = tmp.path().join("crash");
    std::fs::create_dir_all(&full).unwrap();
    std::fs::create_dir_all(&crash).unwrap();
    let o = train(&data, &full.join("out.bin"), &[], &[]);
    assert!(o.status.success(), "{}", err(&o));

    let out = crash.join("out.bin");
    let state = PathBuf::from(format!("{}.state", out.display()));
    let mut child = bin()
        .args([
            "generate-training-dataset-parallel",
            "--objective",
            "generation",
            "--input",
            data.to_str().unwrap(),
            "--output",
            out.to_str().unwrap(),
            "--quiet",
            "--proj-dim",
            "256",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let rows = |dir: &Path| {
        std::fs::read_dir(dir)
            .map(|it| it.filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().ends_with(".bin")).count())
            .unwrap_or(0)
    };
    let start = Instant::now();
    while rows(&state) < 3 {
        assert!(start.elapsed() < Duration::from_secs(120), "no progress");
        assert!(child.try_wait().unwrap().is_none(), "finished before it could be killed");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!out.exists());
    let persisted = rows(&state);
    assert!((3..10).contains(&persisted), "{persisted} rows persisted");

    // Without --resume the state is not silently reused or clobbered.
    let o = train(&data, &out, &[], &[]);
    assert!(!o.status.success() && err(&o).contains("--resume"), "{}", err(&o));
    // Different settings are refused, naming the setting.
    let o = train(&data, &out, &["--resume", "--seed", "5"], &[]);
    assert!(!o.status.success() && err(&o).contains("seed"), "{}", err(&o));
    let o = train(&data, &out, &["--resume", "--duration", "2"], &[]);
    assert!(!o.status.success() && err(&o).contains("duration"), "{}", err(&o));
    let o = train(&data, &out, &["--resume"], &[]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(read(&out), read(&full.join("out.bin")));
}

#[test]
fn shards_merge_into_the_single_machine_file() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data, 7, 0.4);
    let single = tmp.path().join("single.bin");
    assert!(train(&data, &single, &[], &[]).status.success());
    let mut parts = Vec::new();
    for i in 0..3 {
        let p = tmp.path().join(format!("part{i}.bin"));
        let o = if i == 1 {
            // Shard 1 comes from Slurm's environment, shard 2 from Kubernetes'.
            train(&data, &p, &[], &[("SLURM_ARRAY_TASK_ID", "1"), ("SLURM_ARRAY_TASK_COUNT", "3")])
        } else if i == 2 {
            train(&data, &p, &["--shards", "3"], &[("JOB_COMPLETION_INDEX", "2")])
        } else {
            train(&data, &p, &["--shard", "0/3"], &[])
        };
        assert!(o.status.success(), "{}", err(&o));
        parts.push(p);
    }
    let merged = tmp.path().join("merged.bin");
    let ps: Vec<&str> = parts.iter().map(|p| p.to_str().unwrap()).collect();
    let mut args = vec!["merge", merged.to_str().unwrap()];
    args.extend(ps.iter().rev());
    let o = run(&args, &[]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(read(&merged), read(&single));
    // Incomplete, duplicated or foreign shards are refused.
    let o = run(&["merge", merged.to_str().unwrap(), ps[0], ps[1]], &[]);
    assert!(!o.status.success() && err(&o).contains("missing shard"), "{}", err(&o));
    let o = run(&["merge", merged.to_str().unwrap(), ps[0], ps[1], ps[1], ps[2]], &[]);
    assert!(!o.status.success() && err(&o).contains("both shard"), "{}", err(&o));
    let o = run(&["merge", merged.to_str().unwrap(), single.to_str().unwrap()], &[]);
    assert!(!o.status.success() && err(&o).contains("not a shard"), "{}", err(&o));
    let other = tmp.path().join("other.bin");
    assert!(train(&data, &other, &["--shard", "1/3", "--proj-seed", "9"], &[]).status.success());
    let o = run(&["merge", merged.to_str().unwrap(), ps[0], other.to_str().unwrap(), ps[2]], &[]);
    assert!(!o.status.success() && err(&o).contains("projector seed"), "{}", err(&o));
    // A shard run with another --duration, or over another dataset of the same size.
    let other = tmp.path().join("other_duration.bin");
    assert!(train(&data, &other, &["--shard", "1/3", "--duration", "0.3"], &[]).status.success());
    let o = run(&["merge", merged.to_str().unwrap(), ps[0], other.to_str().unwrap(), ps[2]], &[]);
    assert!(!o.status.success() && err(&o).contains("--duration 0.3 s"), "{}", err(&o));
    let data2 = tmp.path().join("data2");
    dataset(&data2, 7, 0.4);
    std::fs::rename(data2.join("rock/song00.wav"), data2.join("rock/another00.wav")).unwrap();
    std::fs::rename(data2.join("rock/song00.json"), data2.join("rock/another00.json")).unwrap();
    let other = tmp.path().join("other_dataset.bin");
    assert!(train(&data2, &other, &["--shard", "1/3"], &[]).status.success());
    let o = run(&["merge", merged.to_str().unwrap(), ps[0], other.to_str().unwrap(), ps[2]], &[]);
    assert!(!o.status.success() && err(&o).contains("another dataset"), "{}", err(&o));
}

#[test]
fn broken_examples_are_reported_and_the_rest_kept() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data, 4, 0.4);
    std::fs::create_dir_all(data.join("bad/deeper")).unwrap();
    std::fs::write(data.join("bad/malformed.wav"), b"x").unwrap();
    std::fs::write(data.join("bad/malformed.json"), b"{oops").unwrap();
    std::fs::write(data.join("bad/deeper/empty.WAV"), b"").unwrap();
    std::fs::write(data.join("bad/deeper/empty.json"), br#"{"description": "x", "duration": 1}"#).unwrap();
    std::fs::write(data.join("bad/notext.flac"), b"x").unwrap();
    std::fs::write(data.join("bad/notext.json"), br#"{"duration": 1}"#).unwrap();
    std::fs::write(data.join("bad/orphan.mp3"), b"x").unwrap();
    // Text named .mp3 with a good description: the generation objective never decodes it,
    // but the walk probes it.
    std::fs::write(data.join("bad/text.mp3"), b"ID3? no: a plain text file that is not audio at all").unwrap();
    std::fs::write(data.join("bad/text.json"), br#"{"description": "x", "duration": 1}"#).unwrap();
    let out = tmp.path().join("out.bin");
    // Batched: a broken example fails alone, its batch-mates are kept.
    let o = train(&data, &out, &["--jobs", "2", "--batch", "3"], &[]);
    let e = err(&o);
    assert!(!o.status.success());
    for needle in ["4 of 8 examples failed", "malformed.json", "0 bytes", "description", "text.mp3: not usable audio"] {
        assert!(e.contains(needle), "missing `{needle}` in: {e}");
    }
    assert!(!out.exists(), "no partial output file");
    let state = PathBuf::from(format!("{}.state", out.display()));
    let kept = std::fs::read_dir(&state)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".bin"))
        .count();
    assert_eq!(kept, 4, "the good examples are persisted");
    // Fix the dataset, resume: only the rest is computed and the output completes.
    std::fs::remove_dir_all(data.join("bad")).unwrap();
    let o = train(&data, &out, &["--resume"], &[]);
    assert!(o.status.success(), "{}", err(&o));
    assert_eq!(spintrak::store::EmbeddingFile::read(&out).unwrap().rows(), 4);
}

#[test]
fn resume_recomputes_what_changed_since() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data, 4, 0.4);
    // One broken example makes the run stop with its state kept.
    spintrak::audio::write_wav(&data.join("late.wav"), &[vec![0.1; 3200]], 32000).unwrap();
    std::fs::write(data.join("late.json"), b"{oops").unwrap();
    let out = tmp.path().join("out.bin");
    assert!(!train(&data, &out, &[], &[]).status.success());
    let state = PathBuf::from(format!("{}.state", out.display()));
    // Meanwhile: a description is edited, and a state file is damaged.
    std::fs::write(data.join("rock/song00.json"), r#"{"description": "a harp solo now", "duration": 0.4}"#).unwrap();
    let victim = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "bin"))
        .unwrap();
    let mut bytes = std::fs::read(&victim).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&victim, bytes).unwrap();
    // Fixed, resumed: the output equals a fresh run over the dataset as it is now.
    std::fs::write(data.join("late.json"), br#"{"description": "late song", "duration": 0.4}"#).unwrap();
    let o = train(&data, &out, &["--resume"], &[]);
    assert!(o.status.success(), "{}", err(&o));
    let fresh = tmp.path().join("fresh.bin");
    assert!(train(&data, &fresh, &[], &[]).status.success());
    assert_eq!(read(&out), read(&fresh), "a resumed run kept a stale or damaged example");
    let f = spintrak::store::EmbeddingFile::read(&out).unwrap();
    assert!(f.header.records.iter().any(|r| r.prompt == "a harp solo now"));
}

#[test]
fn bad_arguments_fail_with_a_message() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    dataset(&data, 1, 0.4);
    let out = tmp.path().join("o.bin");
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("lonely.wav"), b"x").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--input".into(), data.join("rock/song00.wav").display().to_string()], "must be a directory"),
        (vec!["--input".into(), empty.display().to_string()], "no training examples"),
        (vec!["--input".into(), tmp.path().join("nope").display().to_string()], "no such directory"),
    ];
    for (args, needle) in cases {
        let mut full =
            vec!["generate-training-dataset-parallel".to_string(), "--objective".into(), "generation".into()];
        full.extend(args);
        full.extend(["--output".to_string(), out.display().to_string()]);
        let refs: Vec<&str> = full.iter().map(String::as_str).collect();
        let o = run(&refs, &[]);
        assert!(!o.status.success() && err(&o).contains(needle), "{needle}: {}", err(&o));
    }
    for d in ["0", "-1", "abc"] {
        let o = train(&data, &out, &["--duration", d], &[]);
        assert!(
            !o.status.success() && err(&o).contains("the duration must be positive")
                || err(&o).contains("is not a number of seconds"),
            "{}",
            err(&o)
        );
    }
    let o = train(&data, Path::new("/no/such/dir/o.bin"), &[], &[]);
    assert!(!o.status.success() && err(&o).contains("/no/such/dir"), "{}", err(&o));
    assert!(!out.exists());
}
