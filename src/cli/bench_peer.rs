//! `spintrak bench --peer`: the same work done by spintrak and by PyTorch/transformers
//! (`bench/peer.py`, plain autograd and TRAK's CPU projector) on the same weights, the
//! two alternated in one run, each figure checked to be the same computation before its
//! speed counts. Results go to `bench/RESULTS.md`.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};

use crate::attribution::gradient::{project_gradient, stream_gradients};
use crate::attribution::objective::prepared_from_codes;
use crate::attribution::{
    for_each_gradient, gradient_dim, AudioNllObjective, GenerationObjective, Objective, Prepared, Timings,
};
use crate::attribution::{ProjectorKind, ProjectorSpec};
use crate::musicgen::model::Window;
use crate::musicgen::ops::with_f32_values;
use crate::musicgen::sampling::Sampler;
use crate::musicgen::{tiny, GenerateOptions, Generation, LoadOptions, MusicGen, Purpose};

/// Relative difference allowed between the two sides.
const TOLERANCE: f64 = 1e-4;
const PROMPT: &str = "lively salsa groove with bright horns";
const GUIDANCE: f64 = 3.0;

/// What `--peer` runs.
pub struct PeerOptions {
    pub python: Option<PathBuf>,
    pub script: PathBuf,
    pub reps: usize,
    pub results: PathBuf,
    pub models: Vec<String>,
    pub seconds: Vec<f64>,
    pub score_rows: usize,
}

/// The Python process serving `bench/peer.py`'s JSON-lines protocol.
struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    fn start(python: &Path, script: &Path, model: &Path, threads: usize) -> Result<Self> {
        let mut child = Command::new(python)
            .arg(script)
            .arg("--model")
            .arg(model)
            .arg("--threads")
            .arg(threads.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("{}: cannot start {}", python.display(), script.display()))?;
        let stdin = child.stdin.take().context("no stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("no stdout")?);
        Ok(Self { child, stdin, stdout })
    }

    fn ask(&mut self, request: serde_json::Value) -> Result<serde_json::Value> {
        writeln!(self.stdin, "{request}").context("the peer exited")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the peer exited without answering {}", request["task"]);
        }
        let v: serde_json::Value = serde_json::from_str(&line).context("the peer's answer is not JSON")?;
        if let Some(e) = v.get("error") {
            bail!("the peer failed on {}: {e}", request["task"]);
        }
        Ok(v)
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One compared figure.
struct Row {
    figure: String,
    ours: Vec<f64>,
    peer: Vec<f64>,
    /// What was checked, and whether it held.
    check: String,
    ok: bool,
    note: String,
}

fn min_median(t: &[f64]) -> (f64, f64) {
    let mut s = t.to_vec();
    s.sort_by(f64::total_cmp);
    (s.first().copied().unwrap_or(f64::NAN), s.get(s.len() / 2).copied().unwrap_or(f64::NAN))
}

fn rel(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-300);
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn rel_f32(a: &[f32], b: &[f32]) -> f64 {
    let wide = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
    rel(&wide(a), &wide(b))
}

/// Alternates `ours` and `peer`, `reps` times each; returns their wall times. With
/// `warm_up`, each side first runs once untimed (both allocators otherwise pay for
/// fresh pages on the first runs of a gradient: measured, the first run was up to twice
/// the later ones on both sides).
fn alternate(
    reps: usize,
    warm_up: bool,
    mut ours: impl FnMut() -> Result<f64>,
    mut peer: impl FnMut() -> Result<f64>,
) -> Result<(Vec<f64>, Vec<f64>)> {
    if warm_up {
        ours()?;
        peer()?;
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        a.push(ours()?);
        b.push(peer()?);
    }
    Ok((a, b))
}

fn greedy(model: &MusicGen) -> GenerateOptions {
    GenerateOptions {
        sampler: Sampler { use_sampling: false, temperature: 1.0, top_k: 0, top_p: 0.0, seed: 0 },
        guidance_scale: GUIDANCE,
        extend_stride: model.default_extend_stride(),
    }
}

/// Guided teacher-forced logits of `frames` (`[K, S, card]` flattened).
fn guided_logits(model: &MusicGen, frames: &[Vec<u32>]) -> Result<Vec<f64>> {
    let steps = model.pattern().build(frames);
    let (k, s) = (steps.len(), steps[0].len());
    let flat: Vec<u32> = (0..2).flat_map(|_| steps.iter().flatten().copied()).collect();
    let input = Tensor::from_vec(flat, (2, k, s), &Device::Cpu)?;
    let states = model.lm.project_condition(&model.encode_text(PROMPT)?)?;
    let logits = model.lm.forward(&input, &model.lm.conditioning(&states, 1)?, None)?;
    let (c, u) = (logits.get(0)?, logits.get(1)?);
    let g = (&u + ((c - &u)? * GUIDANCE)?)?;
    Ok(g.flatten_all()?.to_dtype(candle_core::DType::F64)?.to_vec1()?)
}

fn read_tensor(path: &Path, name: &str) -> Result<Vec<f64>> {
    let bytes = std::fs::read(path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)?;
    let t = st.tensor(name)?;
    Ok(match t.dtype() {
        safetensors::Dtype::F32 => {
            t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64).collect()
        }
        safetensors::Dtype::F64 => t
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            .collect(),
        other => bail!("{}: `{name}` is {other:?}", path.display()),
    })
}

fn bench_generation(model: &MusicGen, peer: &mut Peer, seconds: f64, reps: usize, tmp: &Path) -> Result<Row> {
    let ids = model.tokenizer.encode(PROMPT)?;
    let opts = greedy(model);
    let mut ours_codes = Vec::new();
    let mut peer_codes = serde_json::Value::Null;
    let frames = model.frames_for(seconds);
    let (a, b) = alternate(
        reps,
        false,
        || {
            let t = Instant::now();
            ours_codes = model.generate(PROMPT, seconds, &opts, None)?.frames;
            Ok(t.elapsed().as_secs_f64())
        },
        || {
            let r = peer.ask(
                serde_json::json!({"task": "generate", "input_ids": ids, "frames": frames, "guidance_scale": GUIDANCE}),
            )?;
            peer_codes = r["codes"].clone();
            Ok(r["seconds"].as_f64().unwrap_or(f64::NAN))
        },
    )?;
    // Same computation: the guided logits of our tokens, teacher-forced on both sides.
    let out = tmp.join("logits.safetensors");
    peer.ask(serde_json::json!({"task": "logits", "input_ids": ids, "codes": ours_codes, "guidance_scale": GUIDANCE, "out": out}))?;
    let err = rel(&guided_logits(model, &ours_codes)?, &read_tensor(&out, "guided")?);
    let theirs: Vec<Vec<u32>> = serde_json::from_value(peer_codes)?;
    let total = ours_codes.iter().map(Vec::len).sum::<usize>().max(1);
    let same = ours_codes.iter().flatten().zip(theirs.iter().flatten()).filter(|(x, y)| x == y).count();
    Ok(Row {
        figure: format!("greedy generation, {seconds} s ({frames} frames)"),
        ours: a,
        peer: b,
        check: format!("guided logits of the tokens: max rel. diff {err:.1e}"),
        ok: err <= TOLERANCE,
        note: format!("{:.1}% of tokens identical", 100.0 * same as f64 / total as f64),
    })
}

/// The preparation of fixed codes for `objective` (one window, no prompt).
fn prepared(model: &MusicGen, objective: &str, frames: &[Vec<u32>]) -> Result<Prepared> {
    let t5 = model.encode_text(PROMPT)?;
    if objective == "audio-nll" {
        return prepared_from_codes(model, frames.to_vec(), t5);
    }
    let duration = frames[0].len() as f64 / model.cfg.frame_rate();
    let window = Window { prompt_len: 0, frames: frames.to_vec() };
    Ok(Prepared::new(Generation { frames: frames.to_vec(), windows: vec![window] }, t5, duration))
}

/// The gradient of `objective` at `frames`, whole (for the checks, untimed): its norm
/// and every number.
fn whole_gradient(
    model: &MusicGen,
    objective: &dyn Objective,
    name: &str,
    frames: &[Vec<u32>],
) -> Result<(f64, Vec<f32>)> {
    let prepared = prepared(model, name, frames)?;
    let mut norm2 = 0f64;
    let mut all = Vec::new();
    for_each_gradient(model, objective, &prepared, &mut Timings::default(), |_, g| {
        with_f32_values(g, |v| {
            norm2 += sum_of_squares(v);
            all.extend_from_slice(v);
            Ok(())
        })
    })?;
    Ok((norm2.sqrt(), all))
}

/// The gradient of `objective` at `frames`, timed over the same work as the peer's timed
/// part: forward, backward and each tensor's sum of squares, the text encoder's
/// (frozen) states prepared beforehand. Each tensor is dropped once summed (holding
/// ∇θ whole as the peer does put both sides together over 24 GB at 10 s of
/// musicgen-small). Its time and norm.
fn timed_gradient(model: &MusicGen, objective: &dyn Objective, name: &str, frames: &[Vec<u32>]) -> Result<(f64, f64)> {
    let prepared = prepared(model, name, frames)?;
    let t = Instant::now();
    let mut norm2 = 0f64;
    stream_gradients(model, objective, &prepared, &mut Timings::default(), |_, g| {
        with_f32_values(g, |v| {
            norm2 += sum_of_squares(v);
            Ok(())
        })
    })?;
    Ok((t.elapsed().as_secs_f64(), norm2.sqrt()))
}

/// The gradient of `objective` at `frames` as an embedding computes it: each parameter's
/// gradient projected to k = 8192 as it arrives and dropped, so ∇θ is never whole in
/// memory. Its time (text encoder excluded, as above) and the projected vector.
fn embedded_gradient(
    model: &MusicGen,
    objective: &dyn Objective,
    name: &str,
    frames: &[Vec<u32>],
    spec: &ProjectorSpec,
) -> Result<(f64, Vec<f32>)> {
    let prepared = prepared(model, name, frames)?;
    let t = Instant::now();
    let y = project_gradient(model, objective, spec, &prepared, &mut Timings::default(), None)?;
    Ok((t.elapsed().as_secs_f64(), y))
}

/// Returns the heap's free memory to the system (glibc), outside any timed part.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free heap pages; no allocation is touched.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Σ x² in f64, on every thread (as the peer's `vector_norm`: a serial sum over
/// musicgen-small's 420 M numbers would add a second to our side alone).
fn sum_of_squares(v: &[f32]) -> f64 {
    use rayon::prelude::*;
    v.par_chunks(1 << 16).map(sum_of_squares_serial).sum()
}

/// Σ x² in f64 over sixteen independent sums (one sum alone waits on each addition in
/// turn: 4 cycles a number, 0.4 s over musicgen-small's gradient on two threads).
fn sum_of_squares_serial(v: &[f32]) -> f64 {
    let mut lanes = [0f64; 16];
    let mut chunks = v.chunks_exact(16);
    for c in &mut chunks {
        for (s, &x) in lanes.iter_mut().zip(c) {
            *s += x as f64 * x as f64;
        }
    }
    lanes.iter().sum::<f64>() + chunks.remainder().iter().map(|&x| x as f64 * x as f64).sum::<f64>()
}

fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

fn bench_gradient(model: &MusicGen, peer: &mut Peer, seconds: f64, name: &str, reps: usize) -> Result<Row> {
    let objective: Box<dyn Objective> = if name == "audio-nll" {
        Box::new(AudioNllObjective::default())
    } else {
        Box::new(GenerationObjective::from_options(&greedy(model)))
    };
    let ids = model.tokenizer.encode(PROMPT)?;
    let window = crate::musicgen::loss::window_frames(model);
    let frames = model.frames_for(seconds).min(window);
    // Two sets of codes: a greedy generation and a reproducible random one.
    let codes_a = model.generate(PROMPT, frames as f64 / model.cfg.frame_rate(), &greedy(model), None)?.frames;
    let card = model.cfg.lm.card as u64;
    let codes_b: Vec<Vec<u32>> = (0..codes_a.len())
        .map(|k| (0..frames).map(|t| (crate::rng::hash(5, &[k as u64, t as u64]) % card) as u32).collect())
        .collect();
    let request = |codes: &Vec<Vec<u32>>, keep: Option<usize>, dtype: &str| {
        serde_json::json!({"task": "grad", "objective": name, "input_ids": ids, "codes": codes,
            "guidance_scale": GUIDANCE, "window": window, "keep": keep, "dtype": dtype})
    };
    let (dec, lm) = gradient_dim(model, objective.as_ref());
    let spec = ProjectorSpec::new(ProjectorKind::Sparse, 42, Some(8192.min((dec + lm) / 8 * 8)), dec + lm, 8)?;
    let mut our_norm = f64::NAN;
    let (a, b) = alternate(
        reps,
        true,
        || {
            let (secs, norm) = timed_gradient(model, objective.as_ref(), name, &codes_a)?;
            our_norm = norm;
            Ok(secs)
        },
        || {
            let r = peer.ask(request(&codes_a, None, "float32"))?;
            Ok(r["seconds"].as_f64().unwrap_or(f64::NAN))
        },
    )?;
    // The embedding's path (projection as the gradient comes), timed once for the note and
    // checked against the projection of the whole gradient.
    let (embed_secs, projected) = embedded_gradient(model, objective.as_ref(), name, &codes_a, &spec)?;
    let (_, ga) = whole_gradient(model, objective.as_ref(), name, &codes_a)?;
    let mut whole = spec.start();
    whole.add(0, &ga)?;
    let embed_err = rel_f32(&projected, &whole.finish_added(ga.len())?);
    let (_, gb) = whole_gradient(model, objective.as_ref(), name, &codes_b)?;
    let ours_gram = [dot(&ga, &ga), dot(&ga, &gb), dot(&gb, &gb)];
    drop((ga, gb));
    // The peer's side of the check in float64: the exact function both float32 runs
    // approximate (float32 rounding differs between implementations; PyTorch's own float32
    // codec-decoder gradient strays from its float64 by 1e-3 at 10 s of musicgen-small).
    // Our side is done with this row: hand its freed heap back (the process never trims
    // it on its own, see `cli::app`), since the peer's float64 gradients that follow need
    // most of the machine's memory at 10 s of musicgen-small with guidance.
    release_free_memory();
    let peer_norm = peer.ask(request(&codes_a, Some(0), "float64"))?["norm"].as_f64().unwrap_or(f64::NAN);
    peer.ask(request(&codes_b, Some(1), "float64"))?;
    let g = peer.ask(serde_json::json!({"task": "gram", "slots": [0, 1]}))?["gram"].clone();
    peer.ask(serde_json::json!({"task": "clear"}))?;
    let g: Vec<Vec<f64>> = serde_json::from_value(g)?;
    let peer_gram = [g[0][0], g[0][1], g[1][1]];
    let norm_err = (our_norm - peer_norm).abs() / peer_norm.abs().max(1e-300);
    let gram_err = rel(&ours_gram, &peer_gram);
    Ok(Row {
        figure: format!("gradient, {name}, {seconds} s ({frames} frames; forward + backward)"),
        ours: a,
        peer: b,
        check: format!(
            "vs PyTorch in f64: gradient norm rel. diff {norm_err:.1e}; Gram of 2 gradients {gram_err:.1e}; \
             the embedding's projection vs the whole gradient's {embed_err:.1e}"
        ),
        ok: norm_err <= TOLERANCE && gram_err <= TOLERANCE && embed_err <= TOLERANCE,
        note: format!(
            "both: forward, backward and each tensor's sum of squares, text encoder excluded; ours as an \
             embedding runs it (each tensor's gradient projected to k = 8192 as it comes, never whole): \
             {embed_secs:.3} s"
        ),
    })
}

fn bench_projection(peer: &mut Peer, d: usize, reps: usize) -> Result<Row> {
    let k = 8192;
    let spec = ProjectorSpec::new(ProjectorKind::Sparse, 42, Some(k), d, 8)?;
    let values: Vec<f32> = (0..d).map(|i| crate::rng::normal(9, i as u64, 0) as f32).collect();
    let norm2: f64 = values.iter().map(|&x| x as f64 * x as f64).sum();
    // The dense projector is too slow to run whole (about k·D multiply-adds): the peer
    // projects a slice of 2^20 numbers, and its time is scaled to D.
    let slice = (1usize << 20).min(d);
    let mut ratios = (0f64, 0f64);
    let (a, b) = alternate(
        reps,
        false,
        || {
            let t = Instant::now();
            let mut p = spec.start();
            for (c, chunk) in values.chunks(1 << 20).enumerate() {
                p.update(c << 20, chunk)?;
            }
            let y = p.finish()?;
            let secs = t.elapsed().as_secs_f64();
            ratios.0 = y.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / norm2;
            Ok(secs)
        },
        || {
            let r = peer.ask(
                serde_json::json!({"task": "project", "d": d, "k": k, "seed": 0, "block": 128, "d_slice": slice}),
            )?;
            ratios.1 = r["ratio"].as_f64().unwrap_or(f64::NAN);
            Ok(r["seconds"].as_f64().unwrap_or(f64::NAN))
        },
    )?;
    // Different random matrices: what must agree is that both preserve lengths
    // (E‖Px‖² = ‖x‖², within a few multiples of √(2/k)).
    let ok = (ratios.0 - 1.0).abs() < 0.1 && (ratios.1 - 1.0).abs() < 0.1;
    Ok(Row {
        figure: format!("projection of D = {d} to k = {k} (ours: sparse; peer: dense Gaussian blocks)"),
        ours: a,
        peer: b,
        check: format!("‖Px‖²/‖x‖²: ours {:.3}, peer {:.3}", ratios.0, ratios.1),
        ok,
        note: format!("peer timed on {slice} numbers and scaled to D"),
    })
}

fn bench_scoring(peer: &mut Peer, n: usize, reps: usize, tmp: &Path) -> Result<Row> {
    let (k, m, lambda) = (8192usize, 100usize, 1.0);
    let rows = |count: usize, seed: u64| -> Vec<f32> {
        (0..count * k).map(|i| crate::rng::normal(seed, i as u64, 0) as f32).collect()
    };
    let (phi, g) = (rows(n, 2), rows(m, 1));
    let file = tmp.join("scoring.safetensors");
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (pb, gb) = (bytes(&phi), bytes(&g));
    let views = [
        ("phi", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![n, k], &pb)?),
        ("g", safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![m, k], &gb)?),
    ];
    std::fs::write(&file, safetensors::serialize(views, None)?)?;
    drop((pb, gb));
    let out = tmp.join("scores.safetensors");
    let mut ours = Vec::new();
    let (a, b) = alternate(
        reps,
        true,
        || {
            let t = Instant::now();
            ours = crate::attribution::score::scores(&g, m, &phi, n, k, lambda)?.0;
            Ok(t.elapsed().as_secs_f64())
        },
        || {
            let r = peer.ask(serde_json::json!({"task": "score", "training": file, "lambda": lambda, "out": out}))?;
            Ok(r["seconds"].as_f64().unwrap_or(f64::NAN))
        },
    )?;
    let err = rel(&ours, &read_tensor(&out, "scores")?);
    Ok(Row {
        figure: format!("scores, n = {n} × k = {k} against m = {m} (peer: torch f64 Cholesky)"),
        ours: a,
        peer: b,
        check: format!("scores max rel. diff {err:.1e}"),
        ok: err <= TOLERANCE,
        note: String::new(),
    })
}

/// The Python to run the peer with: `--python`, else `bench/.venv` (created with pip
/// from bench/requirements.txt when missing).
fn python(opts: &PeerOptions) -> Result<PathBuf> {
    if let Some(p) = &opts.python {
        return Ok(p.clone());
    }
    let dir = opts.script.parent().unwrap_or(Path::new(".")).join(".venv");
    let py = dir.join("bin/python");
    if !py.exists() {
        let req = opts.script.with_file_name("requirements.txt");
        eprintln!("setting up {} with pip ({}; about 3 GB to download)", dir.display(), req.display());
        let ok = Command::new("python3").arg("-m").arg("venv").arg(&dir).status()?.success()
            && Command::new(&py).args(["-m", "pip", "install", "-r"]).arg(&req).status()?.success();
        if !ok {
            bail!("could not set up {}; install bench/requirements.txt yourself and pass --python", dir.display());
        }
    }
    Ok(py)
}

/// Writes a model of `name`'s shape to `dir` in the transformers layout and loads it.
fn model(name: &str, dir: &Path) -> Result<MusicGen> {
    match name {
        "tiny" => tiny::write(dir, super::TINY_SEED)?,
        "small" => {
            let vocab = crate::musicgen::t5::TextTokenizer::from_json(&tiny::tokenizer_json())?.vocab_size();
            tiny::write_random_transformers(&tiny::small_shape_config(vocab), 7, dir, 1 << 30)?;
        }
        other => bail!("--peer-models takes tiny and small, got `{other}`"),
    }
    crate::musicgen::load(dir, &LoadOptions { purpose: Purpose::Gradients, ..Default::default() }, &Device::Cpu)
}

pub fn run(opts: &PeerOptions) -> Result<()> {
    if !opts.script.is_file() {
        bail!(
            "{}: the peer script is missing; run from the repository root or pass --peer-script",
            opts.script.display()
        );
    }
    let python = python(opts)?;
    let threads = candle_core::utils::get_num_threads();
    let tmp = std::env::temp_dir().join(format!("spintrak-bench-peer-{}", std::process::id()));
    std::fs::create_dir_all(&tmp)?;
    let mut sections: Vec<(String, Vec<Row>)> = Vec::new();
    let mut versions = serde_json::Value::Null;
    let result = (|| -> Result<()> {
        for name in &opts.models {
            let label = if name == "small" { "musicgen-small shape (random weights)" } else { "tiny model" };
            let dir = tmp.join(name);
            std::fs::create_dir_all(&dir)?;
            let model = model(name, &dir)?;
            sections.push((format!("{label}, {} LM parameters", model.lm_params.num_scalars()), Vec::new()));
            let rows = &mut sections.last_mut().expect("just pushed").1;
            let mut peer = Peer::start(&python, &opts.script, &dir, threads)?;
            versions = peer.ask(serde_json::json!({"task": "info"}))?;
            for &s in &opts.seconds {
                eprintln!("{name}, {s} s: generation");
                rows.push(bench_generation(&model, &mut peer, s, opts.reps, &tmp)?);
                for objective in ["audio-nll", "generation"] {
                    eprintln!("{name}, {s} s: gradient, {objective}");
                    rows.push(bench_gradient(&model, &mut peer, s, objective, opts.reps)?);
                }
            }
            let (dec, lm) =
                crate::attribution::gradient_dim(&model, &GenerationObjective::from_options(&greedy(&model)));
            eprintln!("{name}: projection");
            rows.push(bench_projection(&mut peer, dec + lm, opts.reps)?);
            if name == opts.models.last().map(String::as_str).unwrap_or_default() && opts.score_rows > 0 {
                eprintln!("scoring");
                rows.push(bench_scoring(&mut peer, opts.score_rows, opts.reps, &tmp)?);
            }
        }
        let md = report(&sections, &versions, threads, opts.reps);
        print!("{md}");
        crate::io::write_atomic(&opts.results, md.as_bytes())?;
        eprintln!("wrote {}", opts.results.display());
        if sections.iter().flat_map(|(_, r)| r).any(|r| !r.ok) {
            bail!("some figures were not the same computation on both sides (see {})", opts.results.display());
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&tmp);
    // A run that stops early keeps what it measured, beside (not over) the last full table.
    if let Err(e) = result {
        let done: usize = sections.iter().map(|(_, r)| r.len()).sum();
        if done == 0 {
            return Err(e);
        }
        let partial = opts.results.with_extension("partial.md");
        let md = report(&sections, &versions, threads, opts.reps);
        crate::io::write_atomic(&partial, md.as_bytes())?;
        return Err(e.context(format!("stopped after {done} figures; they are in {}", partial.display())));
    }
    Ok(())
}

fn report(sections: &[(String, Vec<Row>)], versions: &serde_json::Value, threads: usize, reps: usize) -> String {
    let date = std::process::Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let mut md = format!(
        "# spintrak next to PyTorch\n\n`spintrak bench --peer`, {date}: {cores} cores, {threads} threads on both sides; \
         torch {}, transformers {} (`bench/peer.py`, OMP_WAIT_POLICY {}). The same weights (written by spintrak in the \
         transformers layout, loaded by both), runs alternated, {reps} of each (gradients and scoring after one untimed \
         run of each side); seconds as min / median, and the ratio \
         of medians (spintrak ÷ PyTorch: below 1, spintrak is faster). A figure counts only if its check holds \
         (relative difference ≤ {TOLERANCE:e}).\n",
        versions["torch"].as_str().unwrap_or("?"),
        versions["transformers"].as_str().unwrap_or("?"),
        versions["omp_wait_policy"].as_str().unwrap_or("?"),
    );
    for (title, rows) in sections {
        md.push_str(&format!(
            "\n## {title}\n\n| figure | spintrak s | PyTorch s | ratio | check | |\n|---|---|---|---|---|---|\n"
        ));
        for r in rows {
            let ((a0, a1), (b0, b1)) = (min_median(&r.ours), min_median(&r.peer));
            md.push_str(&format!(
                "| {} | {a0:.3} / {a1:.3} | {b0:.3} / {b1:.3} | **{:.2}** | {} {} | {} |\n",
                r.figure,
                a1 / b1,
                if r.ok { "✓" } else { "✗" },
                r.check,
                r.note
            ));
        }
    }
    md
}
