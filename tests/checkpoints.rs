//! Checkpoint reading against the reference reader: sharded safetensors read tensor by
//! tensor into their final buffers give exactly the bytes Python's `safetensors` gives,
//! q/k/v land in their packed places, and damaged weights are refused where they start.

use std::path::Path;
use std::process::Command;

use spintrak::musicgen::checkpoint::read_hf_weights;
use spintrak::musicgen::t5::TextTokenizer;
use spintrak::musicgen::{tiny, LoadOptions};

fn tiny_config() -> spintrak::musicgen::MusicgenConfig {
    let vocab = TextTokenizer::from_json(&tiny::tokenizer_json()).unwrap().vocab_size();
    tiny::config(vocab)
}

/// {name: [sum in f64, first values]} of every tensor of a transformers directory, as
/// Python's safetensors reads it.
fn python_view(dir: &Path) -> serde_json::Value {
    let script = r#"
import json, sys, os
from safetensors.numpy import load_file
d = sys.argv[1]
index = json.load(open(os.path.join(d, "model.safetensors.index.json")))
out = {}
for shard in sorted(set(index["weight_map"].values())):
    for name, t in load_file(os.path.join(d, shard)).items():
        assert index["weight_map"][name] == shard, name
        flat = t.reshape(-1)
        out[name] = [float(flat.astype("float64").sum()), [float(x) for x in flat[:4]], list(t.shape)]
print(json.dumps(out))
"#;
    let out = Command::new("python3").arg("-c").arg(script).arg(dir).output().expect("python3");
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn sharded_weights_read_as_the_reference_reader_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = tiny_config();
    // Small shards: many files, tensors at every kind of offset.
    tiny::write_random_transformers(&cfg, 5, dir.path(), 256 << 10).unwrap();
    let shards = std::fs::read_dir(dir.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".safetensors"))
        .count();
    assert!(shards >= 3, "{shards} shards");
    let reference = python_view(dir.path());
    let ours = read_hf_weights(dir.path()).unwrap();
    let reference = reference.as_object().unwrap();
    assert_eq!(ours.len(), reference.len(), "tensor count");
    for (name, want) in reference {
        let t = ours.get(name).unwrap_or_else(|| panic!("{name} missing"));
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        let sum: f64 = v.iter().map(|&x| x as f64).sum();
        let want_sum = want[0].as_f64().unwrap();
        assert!((sum - want_sum).abs() <= 1e-9 * want_sum.abs().max(1.0), "{name}: sum {sum} vs {want_sum}");
        let first: Vec<f64> = want[1].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        assert_eq!(v.iter().take(4).map(|&x| x as f64).collect::<Vec<_>>(), first, "{name}");
        let shape: Vec<usize> = want[2].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
        assert_eq!(t.dims(), &shape[..], "{name}");
    }
    // Layers are distinct tensors, not one repeated.
    let l0 = &reference["decoder.model.decoder.layers.0.fc1.weight"][0];
    let l1 = &reference["decoder.model.decoder.layers.1.fc1.weight"][0];
    assert_ne!(l0, l1);

    // Loaded as a model: q, k and v are read into one packed buffer, in that order.
    let model = spintrak::musicgen::load(dir.path(), &LoadOptions::default(), &candle_core::Device::Cpu).unwrap();
    let claimed = model.lm_params.claimed();
    let dim = cfg.lm.dim;
    for (i, x) in ["q", "k", "v"].iter().enumerate() {
        for (hf, ac) in [("self_attn", "self_attn"), ("encoder_attn", "cross_attention")] {
            let packed = &claimed[&format!("transformer.layers.1.{ac}.in_proj_weight")];
            let block: Vec<f32> = packed.narrow(0, i * dim, dim).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let want = &reference[&format!("decoder.model.decoder.layers.1.{hf}.{x}_proj.weight")];
            let sum: f64 = block.iter().map(|&x| x as f64).sum();
            assert!((sum - want[0].as_f64().unwrap()).abs() <= 1e-9 * sum.abs().max(1.0), "{hf}.{x}");
            assert_eq!(block[0] as f64, want[1][0].as_f64().unwrap(), "{hf}.{x}");
        }
    }
    // Every loaded byte is accounted for: the LM as stored (q/k/v packed), nothing twice.
    let lm_bytes: u64 = reference
        .iter()
        .filter(|(n, _)| n.starts_with("decoder.") || n.starts_with("enc_to_dec_proj."))
        .map(|(_, v)| 4 * v[2].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product::<u64>())
        .sum();
    assert_eq!(model.lm_params.claimed_bytes(), lm_bytes);
}

/// Rewrites one tensor's header entry or bytes in a single-file safetensors model.
fn edit_safetensors(path: &Path, tensor: &str, edit: impl FnOnce(&mut serde_json::Value, &mut [u8])) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut data = bytes[8 + n..].to_vec();
    let [start, end] = [0, 1].map(|i| header[tensor]["data_offsets"][i].as_u64().unwrap() as usize);
    edit(&mut header[tensor], &mut data[start..end]);
    let mut json = serde_json::to_vec(&header).unwrap();
    while !(8 + json.len()).is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(&data);
    std::fs::write(path, out).unwrap();
}

fn load_error(dir: &Path) -> String {
    match spintrak::musicgen::load(dir, &LoadOptions::default(), &candle_core::Device::Cpu) {
        Ok(_) => panic!("{}: a damaged model loaded", dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[test]
fn damaged_weights_are_refused_naming_the_tensor() {
    let tensor = "decoder.model.decoder.layers.1.fc1.weight";
    let fresh = || {
        let dir = tempfile::tempdir().unwrap();
        tiny::write(dir.path(), 3).unwrap();
        // The untouched model loads (the control).
        spintrak::musicgen::load(dir.path(), &LoadOptions::default(), &candle_core::Device::Cpu).unwrap();
        dir
    };
    for (what, bad) in [("NaN", f32::NAN), ("infinity", f32::INFINITY)] {
        let dir = fresh();
        edit_safetensors(&dir.path().join("model.safetensors"), tensor, |_, data| {
            data[40..44].copy_from_slice(&bad.to_le_bytes());
        });
        let e = load_error(dir.path());
        assert!(e.contains(tensor) && e.contains("non-finite") && e.contains("element 10"), "{what}: {e}");
    }
    // Relabelled to a dtype of another size: the bytes no longer match the shape.
    let dir = fresh();
    edit_safetensors(&dir.path().join("model.safetensors"), tensor, |h, _| h["dtype"] = "BF16".into());
    let e = load_error(dir.path());
    assert!(e.contains(tensor) && e.contains("dtype or shape was changed"), "{e}");
    // Relabelled to an integer type of the same size: not read as floats.
    let dir = fresh();
    edit_safetensors(&dir.path().join("model.safetensors"), tensor, |h, _| h["dtype"] = "I32".into());
    let e = load_error(dir.path());
    assert!(e.contains(tensor) && e.contains("not a float type"), "{e}");
    // Offsets past the end of the file (a truncated download).
    let dir = fresh();
    let path = dir.path().join("model.safetensors");
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len - 1000).unwrap();
    let e = load_error(dir.path());
    assert!(e.contains("outside the data section") && e.contains("model.safetensors"), "{e}");
}

/// A zip checkpoint whose `data.pkl` is `pickle`.
fn zip_checkpoint(path: &Path, pickle: &[u8]) {
    let mut zip = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("archive/data.pkl", stored).unwrap();
    std::io::Write::write_all(&mut zip, pickle).unwrap();
    zip.finish().unwrap();
}

#[test]
fn hostile_pickles_are_refused_not_crashed_on() {
    use spintrak::musicgen::checkpoint::read_pickle_root;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state_dict.bin");
    // 200,000 nested lists: without a depth limit, dropping the parsed object overflows the stack.
    let mut deep = b"\x80\x02]".to_vec();
    deep.extend(std::iter::repeat_n(b']', 200_000));
    deep.extend(std::iter::repeat_n(b'a', 200_000));
    deep.push(b'.');
    zip_checkpoint(&path, &deep);
    let e = format!("{:#}", read_pickle_root(&path).unwrap_err());
    assert!(e.contains("state_dict.bin") && e.contains("nested deeper"), "{e}");
    // A string claiming 4 GB: refused before anything is allocated.
    zip_checkpoint(&path, b"\x80\x02X\xff\xff\xff\xffabc.");
    let e = format!("{:#}", read_pickle_root(&path).unwrap_err());
    assert!(e.contains("past the end"), "{e}");
    // The control: a small real-shaped pickle reads.
    zip_checkpoint(&path, b"\x80\x02}q\x00X\x01\x00\x00\x00aq\x01K\x01s.");
    read_pickle_root(&path).unwrap();
}

#[test]
fn a_pickled_tensor_relabelled_to_another_dtype_is_refused_naming_it() {
    use spintrak::musicgen::checkpoint::read_pickle_tensors;
    use std::io::Read;
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/storage_views/views.pt");
    // The control: the fixture reads.
    read_pickle_tensors(&src, Some("best_state")).unwrap();
    // Same archive, with the storages' class changed from FloatStorage to HalfStorage.
    let mut archive = zip::ZipArchive::new(std::fs::File::open(&src).unwrap()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dst = dir.path().join("relabelled.pt");
    let mut out = zip::ZipWriter::new(std::fs::File::create(&dst).unwrap());
    let stored = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    let mut changed = false;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).unwrap();
        let name = entry.name().unwrap().to_string();
        let mut bytes = Vec::new();
        entry.read_to_end(&mut bytes).unwrap();
        if name.ends_with("data.pkl") {
            let text = bytes.clone();
            let at = text.windows(12).position(|w| w == b"FloatStorage").expect("a FloatStorage global");
            bytes = [&text[..at], b"HalfStorage".as_slice(), &text[at + 12..]].concat();
            changed = true;
        }
        out.start_file(name, stored).unwrap();
        std::io::Write::write_all(&mut out, &bytes).unwrap();
    }
    out.finish().unwrap();
    assert!(changed);
    let e = format!("{:#}", read_pickle_tensors(&dst, Some("best_state")).unwrap_err());
    assert!(e.contains("relabelled.pt") && e.contains("dtype was changed"), "{e}");
}
