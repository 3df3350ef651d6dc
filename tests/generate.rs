//! Generation on the built-in tiny model: determinism, greedy decoding, windowed
//! extension, both checkpoint round trips, stereo.

use candle_core::Device;
use spintrak::musicgen::sampling::Sampler;
use spintrak::musicgen::{tiny, GenerateOptions, LoadOptions, MusicGen};

const SEED: u64 = 1234;

fn opts(model: &MusicGen, seed: u64, top_k: usize) -> GenerateOptions {
    GenerateOptions {
        sampler: Sampler { use_sampling: true, temperature: 1.0, top_k, top_p: 0.0, seed },
        guidance_scale: 3.0,
        extend_stride: model.default_extend_stride(),
    }
}

#[test]
fn same_seed_same_tokens_other_seed_other_tokens() {
    let model = tiny::build(SEED, &Device::Cpu).unwrap();
    let a = model.generate("calm piano melody", 1.0, &opts(&model, 42, 250), None).unwrap();
    let b = model.generate("calm piano melody", 1.0, &opts(&model, 42, 250), None).unwrap();
    let c = model.generate("calm piano melody", 1.0, &opts(&model, 43, 250), None).unwrap();
    assert_eq!(a.num_frames(), 50);
    assert_eq!(a.frames.len(), 4);
    assert_eq!(a, b);
    assert_ne!(a.frames, c.frames);
    assert!(a.frames.iter().flatten().all(|&t| t < 64), "codes must be codebook entries, not the special token");
}

#[test]
fn greedy_ignores_the_seed_and_depends_on_the_prompt() {
    let model = tiny::build(SEED, &Device::Cpu).unwrap();
    let a = model.generate("calm piano melody", 0.5, &opts(&model, 1, 1), None).unwrap();
    let b = model.generate("calm piano melody", 0.5, &opts(&model, 2, 1), None).unwrap();
    let c = model.generate("fast techno beat", 0.5, &opts(&model, 1, 1), None).unwrap();
    assert_eq!(a.frames, b.frames);
    assert_ne!(a.frames, c.frames);
}

#[test]
fn extension_continues_the_first_window() {
    // The tiny model's window is 10 s (500 frames), its stride 6 s (300 frames).
    let model = tiny::build(SEED, &Device::Cpu).unwrap();
    let o = opts(&model, 7, 250);
    let long = model.generate("lively salsa groove", 23.0, &o, None).unwrap();
    let short = model.generate("lively salsa groove", 10.0, &o, None).unwrap();
    assert_eq!(long.num_frames(), 1150);
    // Windows at 0, 6, 12 s (new frames 500, 300, 300) and 18 s (the last 50).
    let prompts: Vec<usize> = long.windows.iter().map(|w| w.prompt_len).collect();
    assert_eq!(prompts, vec![0, 200, 200, 200]);
    for k in 0..4 {
        assert_eq!(long.frames[k][..500], short.frames[k][..], "first window = a single-window generation");
    }
    // Each window is prompted with the previous one minus its first stride.
    for pair in long.windows.windows(2) {
        for k in 0..4 {
            assert_eq!(pair[1].frames[k][..200], pair[0].frames[k][300..500]);
        }
    }
}

#[test]
fn written_tiny_model_loads_back_identically() {
    let dir = tempfile::tempdir().unwrap();
    tiny::write(dir.path(), SEED).unwrap();
    let on_disk = spintrak::musicgen::load(dir.path(), &LoadOptions::default(), &Device::Cpu).unwrap();
    let in_memory = tiny::build(SEED, &Device::Cpu).unwrap();
    let a = on_disk.generate("calm piano", 0.6, &opts(&on_disk, 3, 250), None).unwrap();
    let b = in_memory.generate("calm piano", 0.6, &opts(&in_memory, 3, 250), None).unwrap();
    assert_eq!(a.frames, b.frames);
    let wa: Vec<f32> = on_disk.decode(&a.frames).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let wb: Vec<f32> = in_memory.decode(&b.frames).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(wa, wb);
    // Same parameters in the same order whichever way the model was made.
    let pa: Vec<String> = on_disk.lm_params.params().into_iter().map(|(n, _)| n).collect();
    let pb: Vec<String> = in_memory.lm_params.params().into_iter().map(|(n, _)| n).collect();
    assert_eq!(pa, pb);
}

#[test]
fn stereo_model_generates_two_channels() {
    let vocab = spintrak::musicgen::t5::TextTokenizer::from_json(&tiny::tokenizer_json()).unwrap().vocab_size();
    let model = tiny::random_model(tiny::stereo_config(vocab), 5, candle_core::DType::F32, &Device::Cpu).unwrap();
    let gen = model.generate("rock riff", 0.4, &opts(&model, 1, 250), None).unwrap();
    assert_eq!(gen.frames.len(), 8);
    assert_eq!(gen.num_frames(), 20);
    let wav = model.decode(&gen.frames).unwrap();
    assert_eq!(wav.dims(), &[2, 20 * 160]);
    // Left decodes the even codebooks, right the odd ones: decoding them alone must agree.
    let left: Vec<Vec<u32>> = gen.frames.iter().step_by(2).cloned().collect();
    let codes = candle_core::Tensor::from_vec(left.concat(), (4, 20), &Device::Cpu).unwrap();
    let mono = model.codec.decode(&codes, 1).unwrap();
    let l: Vec<f32> = wav.get(0).unwrap().to_vec1().unwrap();
    let m: Vec<f32> = mono.get(0).unwrap().to_vec1().unwrap();
    assert_eq!(l, m);
}

#[test]
fn a_batch_generates_what_each_track_generates_alone() {
    // Eight tracks (the most a batch takes) with prompts of different token lengths and
    // their own seeds: mono over two windows, and stereo.
    let vocab = spintrak::musicgen::t5::TextTokenizer::from_json(&tiny::tokenizer_json()).unwrap().vocab_size();
    let mono = tiny::build(SEED, &Device::Cpu).unwrap();
    let stereo = tiny::random_model(tiny::stereo_config(vocab), 5, candle_core::DType::F32, &Device::Cpu).unwrap();
    let prompts = [
        "calm piano",
        "lively salsa groove with bright horns, piano montuno and congas",
        "rock",
        "ambient drones over a slow pulse",
        "x",
        "techno",
        "jazz trio with brushes and upright bass",
        "folk",
    ];
    for (model, duration) in [(&mono, 10.5), (&stereo, 0.6)] {
        let o: Vec<GenerateOptions> = (0..8).map(|i| opts(model, 40 + i, 250)).collect();
        let batch = model.generate_batch(&prompts, duration, &o, None).unwrap();
        assert_eq!(batch.len(), 8);
        for (i, (track, prompt)) in batch.iter().zip(prompts).enumerate() {
            let alone = model.generate(prompt, duration, &o[i], None).unwrap();
            assert_eq!(*track, alone, "track {i} ({prompt}) differs from its generation alone");
        }
        assert_ne!(batch[0].frames, batch[1].frames);
    }
    // Only the seeds may differ within a batch.
    let mut other = opts(&mono, 1, 250);
    other.guidance_scale = 2.0;
    assert!(mono.generate_batch(&prompts[..2], 0.2, &[opts(&mono, 1, 250), other], None).is_err());
}
