//! `generate-gradients` end to end: thread-count independence, the file as Python reads
//! it, and bad settings.

use std::process::{Command, Output};

use spintrak::store::EmbeddingFile;

fn spintrak(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_spintrak"));
    cmd.args(args).env_remove("RUST_BACKTRACE");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("spawn spintrak")
}

fn gradients(out: &str, extra: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut args = vec![
        "generate-gradients",
        "--prompt",
        "calm ocean waves",
        "--duration",
        "1",
        "--seed",
        "42",
        "--output",
        out,
        "--quiet",
    ];
    args.extend_from_slice(extra);
    spintrak(&args, envs)
}

#[test]
fn byte_identical_with_one_and_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    for projector in ["sparse", "normal"] {
        // Same file name (it becomes the record's name), different folders.
        let (da, db) = (dir.path().join(format!("{projector}-1")), dir.path().join(format!("{projector}-2")));
        std::fs::create_dir(&da).unwrap();
        std::fs::create_dir(&db).unwrap();
        let (a, b) = (da.join("e.bin"), db.join("e.bin"));
        let extra = ["--projector", projector, "--proj-dim", "512"];
        let o = gradients(a.to_str().unwrap(), &extra, &[("RAYON_NUM_THREADS", "1")]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let o = gradients(b.to_str().unwrap(), &extra, &[("RAYON_NUM_THREADS", "2")]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "{projector}");
    }
}

#[test]
fn python_reads_the_same_numbers_and_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("e.bin");
    let o = gradients(path.to_str().unwrap(), &["--proj-dim", "1024"], &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let file = EmbeddingFile::read(&path).unwrap();
    let script = r#"
import json, sys
from safetensors.numpy import load_file
from safetensors import safe_open
p = sys.argv[1]
emb = load_file(p)["embeddings"]
with safe_open(p, "np") as f:
    header = json.loads(f.metadata()["spintrak"])
print(json.dumps({"shape": list(emb.shape), "dtype": str(emb.dtype), "sum": float(emb.astype("float64").sum()),
                  "first": [float(x) for x in emb[0, :5]], "header": header}))
"#;
    let out = Command::new("python3").arg("-c").arg(script).arg(&path).output().expect("python3");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["shape"], serde_json::json!([1, 1024]));
    assert_eq!(v["dtype"], "float32");
    let sum: f64 = file.data.iter().map(|&x| x as f64).sum();
    assert!((v["sum"].as_f64().unwrap() - sum).abs() <= 1e-9 * sum.abs().max(1.0));
    let first: Vec<f64> = v["first"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
    assert_eq!(first, file.data[..5].iter().map(|&x| x as f64).collect::<Vec<_>>());
    let header: spintrak::store::Header = serde_json::from_value(v["header"].clone()).unwrap();
    assert_eq!(header, file.header);
    assert_eq!(header.records[0].prompt, "calm ocean waves");
    assert_eq!(header.objective.name, "audio-nll");
}

#[test]
fn bad_projection_settings_and_outputs_fail_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.bin");
    let out_s = out.to_str().unwrap();
    for (extra, needle) in [
        (vec!["--proj-dim", "0"], "proj-dim"),
        (vec!["--proj-dim", "999999999"], "exceeds"),
        (vec!["--projector", "sparse", "--proj-dim", "1001"], "multiple"),
    ] {
        let o = gradients(out_s, &extra, &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle) && !err.contains("panicked"), "{extra:?}: {err}");
    }
    let o = gradients("/nonexistent-dir/x.bin", &[], &[]);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("/nonexistent-dir"));
    assert!(!out.exists());
    // A read-only directory: the error names the file and nothing half-written remains.
    // Root ignores permissions, so as root the command runs as `nobody` (setpriv).
    use std::os::unix::fs::PermissionsExt;
    let ro = dir.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    let target = ro.join("x.bin");
    let args = ["generate-gradients", "--prompt", "calm", "--duration", "1", "--quiet", "--output"];
    let root = effective_uid() == 0;
    let mut cmd = if root {
        if Command::new("setpriv").arg("--version").output().is_err() {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED read-only-directory check: running as root and setpriv is not installed (root ignores permissions)"
            );
            return;
        }
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_spintrak")]);
        c
    } else {
        Command::new(env!("CARGO_BIN_EXE_spintrak"))
    };
    let o = cmd.args(args).arg(&target).env_remove("RUST_BACKTRACE").output().expect("spawn");
    let err = String::from_utf8_lossy(&o.stderr);
    if root && err.starts_with("setpriv:") {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED read-only-directory check: `nobody` cannot run the test binary ({err})"
        );
        return;
    }
    assert!(!o.status.success() && err.contains("x.bin") && err.contains("cannot write"), "root: {root}: {err}");
    assert_eq!(std::fs::read_dir(&ro).unwrap().count(), 0, "no temporary file left behind");
}

/// The effective user id, from /proc (root is 0).
fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse().ok())
        .unwrap_or(u32::MAX)
}
