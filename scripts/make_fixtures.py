#!/usr/bin/env python3
"""Reference fixtures made by scripts/make_fixtures.py.

Writes small MusicGen checkpoints (random weights, fixed seeds) and reference
outputs computed with PyTorch + transformers into tests/fixtures/:

  hf_mono/          transformers layout, mono (4 codebooks), weight norm saved as
                    `parametrizations.weight.original0/original1`
  hf_stereo/        transformers layout, stereo (8 interleaved codebooks), weight
                    norm saved as legacy `weight_g/weight_v`
  audiocraft_mono/  the weights of hf_mono in the audiocraft export layout
                    (state_dict.bin + compression_state_dict.bin pointer + hub/ cache);
                    audiocraft_mono/audiocraft_full/ has the codec inline
                    (compressed_state_dict.bin). Reference outputs: those of hf_mono.

The EnCodec codebooks are not random: before any reference is computed they are fitted (k-means, residual by
residual) to the encoder latents of varied synthetic signals, and the script asserts that encoding follows the
audio (many distinct codes per codebook on held-out signals, different codes for clearly different signals).

reference.safetensors pins (definitions in reference.json): T5 states and conditioning; conditional,
unconditional and guided LM logits; EnCodec decode; greedy generation; the `generation` objective's scalars and
gradients (f_lm / grad_lm.*, f_codec / grad_codec.*); EnCodec encoding (nll_audio -> nll_codes, stereo
channels encoded separately and interleaved); and the `audio-nll` objective on those codes (nll_f,
nll_per_codebook, grad_nll.*: teacher-forced NLL over 50-frame windows, conditional, no guidance).

Everything is deterministic: running the script twice writes identical files.

Run:  /work/venv/bin/python scripts/make_fixtures.py
Needs: torch, transformers (5.x), tokenizers, safetensors, numpy, pyyaml.
"""

import collections
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

import transformers
from transformers import (
    EncodecConfig,
    MusicgenConfig,
    MusicgenDecoderConfig,
    MusicgenForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

transformers.logging.set_verbosity_error()
torch.set_num_threads(1)
torch.use_deterministic_algorithms(True)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures"

HEADER = "reference fixtures made by scripts/make_fixtures.py"
PROMPT = "calm piano melody with soft drums"
GUIDANCE = 3.0
CARD = 32
S_TEACHER = 12          # length of the teacher-forced decoder input (incl. the start column)
T_CODES = 10            # frames decoded by EnCodec for `audio`
F_GREEDY = 20           # complete frames produced by greedy generation
SEGMENT_DURATION = 0.05  # seconds; 1000 frames/s -> a 50-frame window
SAMPLE_RATE = 8000
NLL_SECONDS = 0.08      # audio for the `audio-nll` reference: 80 frames = windows of 50 + 30
NLL_SAMPLES = int(round(NLL_SECONDS * SAMPLE_RATE))
CODEBOOK_TRAIN_SIGNALS = 64     # synthetic signals whose encoder latents the codebooks are fitted to
CODEBOOK_HELDOUT_SIGNALS = 24   # other signals on which code usage is checked
KMEANS_ITERS = 25
MIN_CODE_MARGIN = 2e-4  # nll_audio's latents lie at least this far (latent units) from a code-cell boundary
MIN_CODE_GAP = 1e-4     # ... and their nearest code is nearer than the second nearest by this much (squared distance)


# ----------------------------------------------------------------------------------------------
# tokenizer


MUSIC_WORDS = [
    "calm", "piano", "melody", "soft", "drums", "rock", "salsa", "guitar", "bass", "slow",
    "fast", "happy", "sad", "groove", "techno", "ballad", "jazz", "pop", "ambient", "loud",
    "synth", "violin", "strings", "beat", "lively", "dark", "bright", "upbeat", "chill", "epic",
    "orchestral", "acoustic", "electric", "funk", "blues", "house", "song", "music", "track",
    "vocals", "rhythm", "tempo", "ocean", "waves", "pads", "and", "the", "of",
]
SUBWORDS = ["▁wi", "th", "er", "ing", "on", "an", "in", "ly", "▁re", "ow", "ar", "es"]


def build_tokenizer():
    """A small T5-style Unigram tokenizer (ids: <pad>=0, </s>=1, <unk>=2)."""
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789") + list(",.;'-!?")
    for i, c in enumerate(chars):
        vocab.append(("▁" + c, round(-8.0 - 0.03 * i, 4)))
        vocab.append((c, round(-8.5 - 0.03 * i, 4)))
    for i, w in enumerate(SUBWORDS):
        vocab.append((w, round(-7.5 - 0.05 * i, 4)))
    for i, w in enumerate(MUSIC_WORDS):
        vocab.append(("▁" + w, round(-5.0 - 0.05 * i, 4)))
    pieces = [p for p, _ in vocab]
    assert len(pieces) == len(set(pieces)), "duplicate tokenizer pieces"
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens([AddedToken(t, special=True) for t in ["<pad>", "</s>", "<unk>"]])
    return tok


# ----------------------------------------------------------------------------------------------
# models


def make_config(vocab_size, stereo):
    t5 = T5Config(
        vocab_size=vocab_size, d_model=24, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="relu",
        dropout_rate=0.0, layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    codec = EncodecConfig(
        sampling_rate=SAMPLE_RATE, audio_channels=1, num_filters=4,
        upsampling_ratios=[2, 2, 2] if stereo else [4, 2],
        hidden_size=16, codebook_dim=16, codebook_size=CARD, kernel_size=7, last_kernel_size=7,
        residual_kernel_size=3, dilation_growth_rate=2, num_residual_layers=1, num_lstm_layers=2, compress=2,
        norm_type="weight_norm", pad_mode="reflect", use_causal_conv=False, use_conv_shortcut=stereo,
        normalize=False, trim_right_ratio=1.0,
        # num_quantizers = int(1000 * bw // (frame_rate * ceil(log2(codebook_size)))) = 20000 // (1000 * 5) = 4
        target_bandwidths=[20.0], chunk_length_s=None, overlap=None,
    )
    assert codec.frame_rate == 1000 and codec.num_quantizers == 4, (codec.frame_rate, codec.num_quantizers)
    dec = MusicgenDecoderConfig(
        vocab_size=CARD, num_codebooks=8 if stereo else 4, hidden_size=32, num_hidden_layers=2,
        num_attention_heads=4, ffn_dim=64, max_position_embeddings=2048, audio_channels=2 if stereo else 1,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, layerdrop=0.0, activation_function="gelu",
        scale_embedding=False, pad_token_id=CARD, bos_token_id=CARD, tie_word_embeddings=False,
    )
    return MusicgenConfig(text_encoder=t5, audio_encoder=codec, decoder=dec)


def _randn(gen, shape, std=1.0, mean=0.0):
    return torch.randn(shape, generator=gen, dtype=torch.float32) * std + mean


@torch.no_grad()
def randomize(module, gen):
    """Deterministic random weights of a sensible scale, LayerNorms / weight-norm g away from defaults."""
    from transformers.models.encodec.modeling_encodec import EncodecEuclideanCodebook
    from transformers.models.t5.modeling_t5 import T5LayerNorm

    for _, m in module.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.copy_(_randn(gen, m.weight.shape, 0.2, 1.0))
            m.bias.copy_(_randn(gen, m.bias.shape, 0.2))
        elif isinstance(m, T5LayerNorm):
            m.weight.copy_(_randn(gen, m.weight.shape, 0.2, 1.0))
        elif isinstance(m, torch.nn.Linear):
            m.weight.copy_(_randn(gen, m.weight.shape, 1.0 / math.sqrt(m.in_features)))
            if m.bias is not None:
                m.bias.copy_(_randn(gen, m.bias.shape, 0.1))
        elif isinstance(m, torch.nn.Embedding):
            m.weight.copy_(_randn(gen, m.weight.shape, 0.5))  # token tables and relative_attention_bias
        elif isinstance(m, torch.nn.LSTM):
            for name, p in m.named_parameters():
                if name.startswith("weight"):
                    p.copy_(_randn(gen, p.shape, 1.0 / math.sqrt(m.hidden_size)))
                else:
                    p.copy_(_randn(gen, p.shape, 0.1))
        elif isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
            pw = m.parametrizations.weight
            g, v = pw.original0, pw.original1
            v.copy_(_randn(gen, v.shape))
            g.copy_(torch.rand(g.shape, generator=gen) + 0.5)  # U(0.5, 1.5), per dim-0 slice
            if m.bias is not None:
                m.bias.copy_(_randn(gen, m.bias.shape, 0.1))
        elif isinstance(m, EncodecEuclideanCodebook):
            e = _randn(gen, m.embed.shape)
            m.embed.copy_(e)
            m.embed_avg.copy_(e)
            m.cluster_size.fill_(1.0)
            m.inited.fill_(1.0)


def build_model(tokenizer, stereo, seed):
    torch.manual_seed(seed)
    cfg = make_config(tokenizer.get_vocab_size(), stereo)
    model = MusicgenForConditionalGeneration(cfg)
    gen = torch.Generator().manual_seed(seed)
    randomize(model, gen)
    model.eval()
    code_stats = fit_codebooks(model, seed)
    gc = model.generation_config
    gc.decoder_start_token_id = CARD
    gc.pad_token_id = CARD
    gc.bos_token_id = CARD
    gc.guidance_scale = GUIDANCE
    gc.do_sample = True
    gc.top_k = 250
    gc.max_length = int(round(SEGMENT_DURATION * cfg.audio_encoder.frame_rate))
    return model, code_stats


# ----------------------------------------------------------------------------------------------
# codebooks fitted to the encoder


def synth_signals(gen, n, length, sr):
    """n varied signals [n, length]: sines, chirps, noise bursts, clicks, mixtures, AM tones, square waves and
    piecewise-loud noise, with frequencies, amplitudes and phases drawn from `gen`."""
    t = torch.arange(length, dtype=torch.float64) / sr
    dur = length / sr
    nyq = sr / 2

    def u(lo, hi):
        return lo + (hi - lo) * float(torch.rand((), generator=gen, dtype=torch.float64))

    def logu(lo, hi):
        return math.exp(u(math.log(lo), math.log(hi)))

    def sine(f, a, ph):
        return a * torch.sin(2 * math.pi * f * t + ph)

    out = []
    for i in range(n):
        kind = i % 8
        amp = logu(0.03, 0.9)
        if kind == 0:  # sine
            x = sine(logu(30, 0.95 * nyq), amp, u(0, 2 * math.pi))
        elif kind == 1:  # linear chirp
            f0, f1 = logu(30, 0.95 * nyq), logu(30, 0.95 * nyq)
            x = amp * torch.sin(2 * math.pi * (f0 * t + (f1 - f0) * t * t / (2 * dur)) + u(0, 2 * math.pi))
        elif kind == 2:  # noise burst
            c, w = u(0.1, 0.9) * dur, u(0.05, 0.4) * dur
            x = amp * torch.randn(length, generator=gen, dtype=torch.float64) * torch.exp(-0.5 * ((t - c) / w) ** 2)
        elif kind == 3:  # clicks: decaying impulses at a regular period
            period = int(u(12, 160))
            start = int(u(0, period))
            x = torch.zeros(length, dtype=torch.float64)
            x[start::period] = amp * (1.0 if u(0, 1) < 0.5 else -1.0)
            x = torch.nn.functional.conv1d(
                x[None, None], (torch.exp(-torch.arange(8.0, dtype=torch.float64) / u(0.5, 3.0))).flip(0)[None, None],
                padding=7,
            )[0, 0, :length]
        elif kind == 4:  # mixture of two tones and a little noise
            x = sine(logu(30, 0.95 * nyq), amp, u(0, 6.3)) + sine(logu(30, 0.95 * nyq), u(0.2, 1.0) * amp, u(0, 6.3))
            x = x + 0.1 * amp * torch.randn(length, generator=gen, dtype=torch.float64)
        elif kind == 5:  # amplitude-modulated tone
            x = sine(logu(100, 0.95 * nyq), amp, u(0, 6.3)) * (0.5 + 0.5 * torch.sin(2 * math.pi * logu(20, 200) * t))
        elif kind == 6:  # square wave
            x = amp * torch.sign(torch.sin(2 * math.pi * logu(30, 1500) * t + u(0, 6.3)))
        else:  # noise in segments of different loudness
            seg = int(u(40, 200))
            levels = torch.tensor([logu(0.01, 1.0) for _ in range(length // seg + 1)], dtype=torch.float64)
            x = amp * torch.randn(length, generator=gen, dtype=torch.float64) * levels.repeat_interleave(seg)[:length]
        out.append(x)
    return torch.stack(out).to(torch.float32)


def kmeans(x, k, iters):
    """Deterministic k-means on x [N, D] (float64): farthest-point initialisation from the point nearest the
    mean, then Lloyd iterations; an empty cluster takes the point farthest from its centre."""
    first = int(((x - x.mean(0)) ** 2).sum(1).argmin())
    centers = [x[first]]
    d = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, k):
        j = int(d.argmax())
        centers.append(x[j])
        d = torch.minimum(d, ((x - x[j]) ** 2).sum(1))
    c = torch.stack(centers)
    for _ in range(iters):
        dist = torch.cdist(x, c) ** 2
        assign = dist.argmin(1)
        new = torch.zeros_like(c)
        for j in range(k):
            members = x[assign == j]
            if len(members):
                new[j] = members.mean(0)
            else:
                far = int(dist.gather(1, assign[:, None])[:, 0].argmax())
                new[j] = x[far]
                assign[far] = j
        c = new
    return c


def encoder_frames(model, signals):
    """Encoder latents of each signal (as one mono channel), concatenated to [N, D]."""
    with torch.no_grad():
        z = model.audio_encoder.encoder(signals[:, None, :])  # [n, D, T]
    return z.permute(0, 2, 1).reshape(-1, z.shape[1])


@torch.no_grad()
def fit_codebooks(model, seed):
    """Replaces the random codebooks by k-means centres of the encoder's latents of varied synthetic signals,
    residual by residual (layer q is fitted to what layers < q leave), so that encoding follows the audio."""
    codec = model.config.audio_encoder
    train = synth_signals(torch.Generator().manual_seed(500 + seed), CODEBOOK_TRAIN_SIGNALS, NLL_SAMPLES,
                          codec.sampling_rate)
    residual = encoder_frames(model, train).to(torch.float64)
    for layer in model.audio_encoder.quantizer.layers:
        cb = layer.codebook
        c = kmeans(residual, CARD, KMEANS_ITERS)
        cb.embed.copy_(c.to(torch.float32))
        cb.embed_avg.copy_(c.to(torch.float32))
        cb.cluster_size.fill_(1.0)
        cb.inited.fill_(1.0)
        residual = residual - c[(torch.cdist(residual, c) ** 2).argmin(1)]
    return check_codes_follow_audio(model, seed)


def encode_audio(model, audio):
    """audio [channels, samples] -> codes [K, T] with transformers' EncodecModel.encode at the model's bandwidth.
    Stereo: each channel is encoded as mono and the codebooks interleaved [L0, R0, L1, R1, ...] (audiocraft's
    InterleaveStereoCompressionModel order; transformers decodes codes[0::2] as left and codes[1::2] as right)."""
    ae = model.audio_encoder
    bw = ae.config.target_bandwidths[0]
    assert ae.quantizer.get_num_quantizers_for_bandwidth(bw) == ae.config.num_quantizers
    with torch.no_grad():
        per = [ae.encode(audio[ch][None, None], bandwidth=bw).audio_codes for ch in range(audio.shape[0])]
    for c in per:
        assert c.shape[:3] == (1, 1, ae.config.num_quantizers), c.shape
    per = [c[0, 0] for c in per]  # [n_q, T] each
    if len(per) == 1:
        return per[0]
    n_q, t = per[0].shape
    return torch.stack(per, dim=1).reshape(n_q * len(per), t)


@torch.no_grad()
def quantize_with_margin(model, wav):
    """Residual quantisation of one channel [samples] redone by hand: the codes [n_q, T], the smallest distance
    (over frames and layers) from a residual to the boundary of its code's Voronoi cell, i.e. how far a residual
    must move before another code becomes the nearest, and the smallest gap between the squared distances to the
    nearest and the second nearest code."""
    z = model.audio_encoder.encoder(wav[None, None])[0].t()  # [T, D] float32
    residual = z
    codes, margin, min_gap = [], float("inf"), float("inf")
    for layer in model.audio_encoder.quantizer.layers:
        e = layer.codebook.embed
        d = (torch.cdist(residual.double(), e.double()) ** 2)  # [T, card]
        best = d.argmin(1)
        eb = e.double()[best]  # [T, D]
        gap = d - d.gather(1, best[:, None])  # >= 0
        sep = 2 * (e.double()[None, :, :] - eb[:, None, :]).norm(dim=-1)  # [T, card]
        ratio = gap / sep.clamp_min(1e-30)
        ratio[torch.arange(len(best)), best] = float("inf")
        margin = min(margin, float(ratio.min()))
        min_gap = min(min_gap, float(d.sort(1).values[:, :2].diff(dim=1).min()))
        codes.append(best)
        residual = residual - e[best]
    return torch.stack(codes), margin, min_gap


def code_margin(model, audio, codes):
    """Checks encode_audio's codes against the hand-made quantisation; returns the smallest Voronoi margin and
    the smallest nearest / second-nearest squared-distance gap over channels, frames and layers."""
    margins, gaps, per = [], [], []
    for ch in range(audio.shape[0]):
        c, m, g = quantize_with_margin(model, audio[ch])
        per.append(c)
        margins.append(m)
        gaps.append(g)
    n_q, t = per[0].shape
    ours = per[0] if len(per) == 1 else torch.stack(per, dim=1).reshape(n_q * len(per), t)
    assert torch.equal(ours, codes), "hand-made quantisation differs from EncodecModel.encode"
    return min(margins), min(gaps)


def check_codes_follow_audio(model, seed):
    """Asserts that encoding follows the audio; returns the measured statistics."""
    codec = model.config.audio_encoder
    sr = codec.sampling_rate
    held = synth_signals(torch.Generator().manual_seed(900 + seed), CODEBOOK_HELDOUT_SIGNALS, NLL_SAMPLES, sr)
    codes = [encode_audio(model, h[None]) for h in held]
    allc = torch.cat(codes, dim=1)  # [n_q, signals * T]
    distinct = [int(allc[q].unique().numel()) for q in range(allc.shape[0])]
    assert distinct[0] >= CARD // 4, f"codebook 0 uses only {distinct[0]} codes on held-out audio"
    assert all(d > 1 for d in distinct), f"a codebook uses a single code: {distinct}"
    varied = sum(int(c[0].unique().numel() > 1) for c in codes)
    assert varied >= len(codes) // 2, f"codebook 0 is constant within {len(codes) - varied} of {len(codes)} signals"
    # two clearly different signals: a low tone and white noise
    t = torch.arange(NLL_SAMPLES, dtype=torch.float32) / sr
    tone = 0.5 * torch.sin(2 * math.pi * 220.0 * t)
    noise = 0.3 * torch.randn(NLL_SAMPLES, generator=torch.Generator().manual_seed(950 + seed))
    ct, cn = encode_audio(model, tone[None]), encode_audio(model, noise[None])
    differ = float((ct[0] != cn[0]).float().mean())
    assert differ >= 0.5, f"tone and noise share codebook-0 codes in {1 - differ:.0%} of the frames"
    # every residual layer reduces the quantisation error of held-out latents
    with torch.no_grad():
        z = model.audio_encoder.encoder(held[:, None, :])  # [n, D, T]
        err = [float((z ** 2).mean())]
        for q in range(allc.shape[0]):
            zq = model.audio_encoder.quantizer.decode(torch.stack(codes, dim=1)[: q + 1])  # [n, D, T]
            err.append(float(((z - zq) ** 2).mean()))
    assert all(b < a for a, b in zip(err, err[1:])), f"quantisation error does not fall layer by layer: {err}"
    return collections.OrderedDict(
        heldout_signals=len(codes),
        heldout_frames=int(allc.shape[1]),
        distinct_codes_per_codebook=distinct,
        signals_with_varying_codebook0=varied,
        tone_vs_noise_codebook0_frames_differing=differ,
        quantisation_mse_by_layers=err,
    )


# ----------------------------------------------------------------------------------------------
# helpers


def delays_of(model):
    k = model.decoder.num_codebooks
    if model.config.decoder.audio_channels == 2:
        return [i // 2 for i in range(k)]
    return list(range(k))


def delay_sequence(frames, delays, special):
    """frames [K, F] -> the delayed sequence [K, F + max_delay + 1] with the start column at 0.

    seq[k, p] = frames[k, p - 1 - delays[k]] when 0 <= p - 1 - delays[k] < F, else `special`."""
    K, F = frames.shape
    S = F + max(delays) + 1
    seq = torch.full((K, S), special, dtype=torch.long)
    for k in range(K):
        seq[k, 1 + delays[k]: 1 + delays[k] + F] = frames[k]
    return seq


def decode_codes(model, codes):
    """codes [K, T] -> audio [channels, samples], as MusicgenForConditionalGeneration.generate decodes."""
    ae = model.audio_encoder
    if model.config.decoder.audio_channels == 1:
        out = ae.decode(codes[None, None], audio_scales=[None]).audio_values
    else:
        left = ae.decode(codes[None, None, ::2], audio_scales=[None]).audio_values
        right = ae.decode(codes[None, None, 1::2], audio_scales=[None]).audio_values
        out = torch.cat([left, right], dim=1)
    return out[0]


def lm_logits(model, t5_hidden, mask, seq):
    """Decoder logits [K, S, card] for the conditional and the null condition (as HF's CFG forms it)."""
    cond = model(encoder_outputs=(t5_hidden,), attention_mask=mask, decoder_input_ids=seq).logits
    uncond = model(
        encoder_outputs=(torch.zeros_like(t5_hidden),), attention_mask=torch.zeros_like(mask), decoder_input_ids=seq
    ).logits
    return cond, uncond


def rel(a, b):
    return float((a - b).abs().max() / (b.abs().max() + 1e-30))


def legacy_weight_norm_names(sd):
    out = collections.OrderedDict()
    for k, v in sd.items():
        k = k.replace(".parametrizations.weight.original0", ".weight_g")
        k = k.replace(".parametrizations.weight.original1", ".weight_v")
        out[k] = v
    return out


def save_hf(model, tokenizer, folder, legacy_names):
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    model.save_pretrained(folder)
    for extra in folder.iterdir():
        if extra.name not in ("config.json", "generation_config.json", "model.safetensors"):
            raise RuntimeError(f"unexpected file written by save_pretrained: {extra}")
    path = folder / "model.safetensors"
    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    sd = load_file(path)
    if legacy_names:
        sd = legacy_weight_norm_names(sd)
    sd = collections.OrderedDict(sorted(sd.items()))
    # a single metadata entry: safetensors writes a multi-entry metadata map in random order
    assert set(meta) <= {"format"}, meta
    save_file({k: v.contiguous() for k, v in sd.items()}, path, metadata={"format": "pt"})
    tokenizer.save(str(folder / "tokenizer.json"))
    return list(sd.keys())


def check_reload(folder, model, t5_hidden, mask, seq, codes, nll_audio, nll_codes):
    """The saved folder, loaded back by transformers, gives the same numbers (and the same encoding)."""
    re = MusicgenForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        c0, u0 = lm_logits(model, t5_hidden, mask, seq)
        c1, u1 = lm_logits(re, t5_hidden, mask, seq)
        a0 = decode_codes(model, codes)
        a1 = decode_codes(re, codes)
    for a, b, what in [(c0, c1, "cond"), (u0, u1, "uncond"), (a0, a1, "audio")]:
        if not torch.equal(a, b):
            raise RuntimeError(f"{folder.name}: reloaded model differs ({what}, rel {rel(a, b):.3g})")
    if not torch.equal(encode_audio(re, nll_audio), nll_codes):
        raise RuntimeError(f"{folder.name}: reloaded model encodes nll_audio differently")


# ----------------------------------------------------------------------------------------------
# reference outputs


def references(model, tokenizer, seed):
    K = model.decoder.num_codebooks
    delays = delays_of(model)
    D = max(delays)
    n_q = model.config.audio_encoder.num_quantizers
    g = torch.Generator().manual_seed(1000 + seed)

    ids = tokenizer.encode(PROMPT).ids
    input_ids = torch.tensor([ids], dtype=torch.long)
    mask = torch.ones_like(input_ids)

    with torch.no_grad():
        t5_hidden = model.text_encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        cond_states = model.enc_to_dec_proj(t5_hidden) * mask[..., None]

    # teacher-forced decoder input: the delayed layout of F_teacher random frames
    f_teacher = S_TEACHER - D - 1
    lm_frames = torch.randint(0, CARD, (K, f_teacher), generator=g)
    lm_input = delay_sequence(lm_frames, delays, CARD)
    assert lm_input.shape == (K, S_TEACHER)

    with torch.no_grad():
        cond, uncond = lm_logits(model, t5_hidden, mask, lm_input)
        guided = uncond + GUIDANCE * (cond - uncond)
        # the batched form HF's generate uses gives the same numbers
        both = model(
            encoder_outputs=(torch.cat([t5_hidden, torch.zeros_like(t5_hidden)]),),
            attention_mask=torch.cat([mask, torch.zeros_like(mask)]),
            decoder_input_ids=lm_input.repeat(2, 1),
        ).logits
        assert rel(both[:K], cond) < 1e-5 and rel(both[K:], uncond) < 1e-5
        # eager attention gives the same numbers as sdpa
        for sub in (model.decoder, model.text_encoder):
            sub.config._attn_implementation = "eager"
        ce, ue = lm_logits(model, t5_hidden, mask, lm_input)
        for sub in (model.decoder, model.text_encoder):
            sub.config._attn_implementation = "sdpa"
        assert rel(ce, cond) < 1e-5 and rel(ue, uncond) < 1e-5, (rel(ce, cond), rel(ue, uncond))
        # the null condition: cross-attention contributes exactly nothing
        no_cross = model.decoder(input_ids=lm_input).logits
        assert rel(no_cross, uncond) < 1e-5, rel(no_cross, uncond)
        assert torch.isfinite(uncond).all()
    cond, uncond, guided = cond.reshape(K, S_TEACHER, CARD), uncond.reshape(K, S_TEACHER, CARD), guided.reshape(
        K, S_TEACHER, CARD
    )

    # EnCodec decode
    codes = torch.randint(0, CARD, (K if model.config.decoder.audio_channels == 2 else n_q, T_CODES), generator=g)
    with torch.no_grad():
        audio = decode_codes(model, codes)
        other = codes.clone()
        other[:, T_CODES // 2] = (other[:, T_CODES // 2] + 1) % CARD
        audio_other = decode_codes(model, other)
    assert rel(audio, audio_other) > 1e-3, "decode does not depend on the codes"

    # greedy generation
    captured = {}
    orig_decode = model.audio_encoder.decode

    def capture(audio_codes, *a, **kw):
        captured.setdefault("codes", []).append(audio_codes.clone())
        return orig_decode(audio_codes, *a, **kw)

    model.audio_encoder.decode = capture
    max_new = F_GREEDY + D
    with torch.no_grad():
        greedy_audio = model.generate(
            input_ids=input_ids, attention_mask=mask, do_sample=False, guidance_scale=GUIDANCE,
            max_new_tokens=max_new,
        )
    del model.audio_encoder.decode
    got = captured["codes"]
    if model.config.decoder.audio_channels == 1:
        greedy_frames = got[0][0, 0]
    else:
        greedy_frames = torch.empty((K, F_GREEDY), dtype=torch.long)
        greedy_frames[::2] = got[0][0, 0]
        greedy_frames[1::2] = got[1][0, 0]
    greedy_audio = greedy_audio[0]
    assert greedy_frames.shape == (K, F_GREEDY), greedy_frames.shape

    # the same tokens by teacher forcing with a full forward pass; the smallest top-1/top-2 margin
    full = delay_sequence(greedy_frames, delays, CARD)
    with torch.no_grad():
        c, u = lm_logits(model, t5_hidden, mask, full)
        gl = (u + GUIDANCE * (c - u)).reshape(K, full.shape[1], CARD)
    margins = []
    for p in range(full.shape[1] - 1):
        for k in range(K):
            fr = p - delays[k]
            if 0 <= fr < F_GREEDY:
                top = gl[k, p].topk(2).values
                assert int(gl[k, p].argmax()) == int(greedy_frames[k, fr]), (k, p)
                margins.append(float(top[0] - top[1]))
    with torch.no_grad():
        assert rel(decode_codes(model, greedy_frames), greedy_audio) < 1e-6

    # gradients of the LM objective (T5 frozen, its states computed without grad)
    for p in model.parameters():
        p.requires_grad_(False)
    lm_params = [(n, p) for n, p in model.named_parameters() if n.startswith(("decoder.", "enc_to_dec_proj."))]
    for _, p in lm_params:
        p.requires_grad_(True)
    c, u = lm_logits(model, t5_hidden, mask, lm_input)
    gl = (u + GUIDANCE * (c - u)).reshape(K, S_TEACHER, CARD)
    f_lm = gl[:, : S_TEACHER - 1, :].mean(dim=(0, 2)).sum() / f_teacher
    f_lm.backward()
    grad_lm = collections.OrderedDict((n, p.grad.detach().clone()) for n, p in lm_params)
    for _, p in lm_params:
        p.requires_grad_(False)
        p.grad = None
    assert rel(gl.detach(), guided) < 1e-6

    # gradients of the codec objective
    codec_params = [(n, p) for n, p in model.named_parameters() if n.startswith("audio_encoder.decoder.")]
    for _, p in codec_params:
        p.requires_grad_(True)
    a = decode_codes(model, codes)
    f_codec = a.mean()
    f_codec.backward()
    grad_codec = collections.OrderedDict((n, p.grad.detach().clone()) for n, p in codec_params)
    for _, p in codec_params:
        p.requires_grad_(False)
        p.grad = None
    assert rel(a.detach(), audio) < 1e-6

    for n, gr in list(grad_lm.items()) + list(grad_codec.items()):
        assert torch.isfinite(gr).all(), n
        assert gr.abs().max() > 0, f"zero gradient for {n}"

    # the audio-nll objective on encoded audio (same parameter set as grad_lm)
    nll_tensors, grad_nll, nll_info = nll_references(model, t5_hidden, mask, [n for n, _ in lm_params])
    assert list(grad_nll) == list(grad_lm)

    tensors = collections.OrderedDict(
        input_ids=input_ids,
        t5_hidden=t5_hidden,
        cond_states=cond_states,
        lm_frames=lm_frames,
        lm_input=lm_input,
        logits_cond=cond,
        logits_uncond=uncond,
        logits_guided=guided,
        codes=codes,
        audio=audio,
        greedy_frames=greedy_frames,
        greedy_audio=greedy_audio,
        f_lm=f_lm.detach().reshape(1),
        f_codec=f_codec.detach().reshape(1),
    )
    tensors.update(nll_tensors)
    info = dict(
        K=K, delays=delays, max_delay=D, S=S_TEACHER, F_teacher=f_teacher, n_q_codec=n_q,
        prompt_ids=ids, f_lm=float(f_lm.detach()), f_codec=float(f_codec.detach()), greedy_max_new_tokens=max_new,
        greedy_min_margin=min(margins), audio_samples=int(audio.shape[-1]),
        greedy_audio_samples=int(greedy_audio.shape[-1]),
    )
    info.update(nll_info)
    probe = (t5_hidden, mask, lm_input, codes, nll_tensors["nll_audio"], nll_tensors["nll_codes"])
    return tensors, grad_lm, grad_codec, grad_nll, info, probe


def nll_signal(channel, variant, n, sr):
    """The `nll_audio` waveform of one channel [n]: a sequence of overlapping events (a chirp, a two-tone chord,
    a noise burst, clicks over a low decaying tone), different per channel; `variant` only reseeds the noise."""
    t = torch.arange(n, dtype=torch.float64) / sr
    gen = torch.Generator().manual_seed(7000 + 31 * variant + channel)

    def env(t0, t1, fade=0.002):
        up = ((t - t0) / fade).clamp(0, 1)
        down = ((t1 - t) / fade).clamp(0, 1)
        return (0.5 - 0.5 * torch.cos(math.pi * up)) * (0.5 - 0.5 * torch.cos(math.pi * down))

    def chirp(f0, f1, t0, t1, a):
        tt = (t - t0).clamp(0, t1 - t0)
        return a * torch.sin(2 * math.pi * (f0 * tt + (f1 - f0) * tt * tt / (2 * (t1 - t0)))) * env(t0, t1)

    def tone(f, a, ph=0.0):
        return a * torch.sin(2 * math.pi * f * t + ph)

    noise = torch.randn(n, generator=gen, dtype=torch.float64)
    clicks = torch.zeros(n, dtype=torch.float64)
    if channel == 0:
        x = chirp(150.0, 1800.0, 0.0, 0.026, 0.45)
        x = x + (tone(330.0, 0.3) + tone(1250.0, 0.15, 1.0)) * env(0.02, 0.045)
        x = x + 0.3 * noise * env(0.04, 0.056)
        clicks[int(0.052 * sr)::48] = 0.6
        low = tone(95.0, 0.5) * torch.exp(-(t - 0.05).clamp_min(0) / 0.015) * env(0.05, 0.08)
    else:
        x = chirp(2600.0, 200.0, 0.0, 0.03, 0.35)
        x = x + 0.25 * torch.sign(tone(150.0, 1.0)) * env(0.025, 0.05)
        x = x + 0.2 * noise * env(0.045, 0.065)
        clicks[int(0.058 * sr)::29] = -0.5
        low = tone(700.0, 0.4) * (0.5 + 0.5 * tone(60.0, 1.0)) * env(0.055, 0.08)
    decay = torch.exp(-torch.arange(8, dtype=torch.float64) / 1.5).flip(0)
    clicks = torch.nn.functional.conv1d(clicks[None, None], decay[None, None], padding=7)[0, 0, :n]
    return (x + clicks + low).to(torch.float32)


def choose_nll_audio(model):
    """nll_audio [channels, samples], its codes [K, T] (transformers' encode) and the smallest Voronoi margin and
    distance gap of its latents: the first noise variant whose latents are at least MIN_CODE_MARGIN from every
    code-cell boundary (and MIN_CODE_GAP in squared distance), so that an independent float32 encoder and
    quantiser give the same codes."""
    codec = model.config.audio_encoder
    channels = model.config.decoder.audio_channels
    hop = int(np.prod(codec.upsampling_ratios))
    for variant in range(50):
        audio = torch.stack([nll_signal(ch, variant, NLL_SAMPLES, codec.sampling_rate) for ch in range(channels)])
        codes = encode_audio(model, audio)
        assert codes.shape == (model.decoder.num_codebooks, NLL_SAMPLES // hop), codes.shape
        margin, gap = code_margin(model, audio, codes)
        if margin >= MIN_CODE_MARGIN and gap >= MIN_CODE_GAP:
            return audio, codes, margin, gap, variant
    raise RuntimeError("no nll_audio variant has codes clear of the cell boundaries")


def audio_nll(model, t5_hidden, mask, frames, window):
    """The `audio-nll` objective on frames [K, T]: returns (f, per_codebook [K], window lengths). Per window
    (consecutive chunks of at most `window` frames) the frames are laid out in the delay pattern, the decoder
    reads sequence[:, :S-1] (conditional, no guidance) and is scored on sequence[:, 1:] where that is a real code:
    f_w = (1/K) sum_k mean_p -log softmax(logits[k, p])[target]; f = sum_w (T_w / T) f_w."""
    K, T = frames.shape
    delays = delays_of(model)
    per_codebook = torch.zeros(K)
    lengths = []
    for start in range(0, T, window):
        fw = frames[:, start: start + window]
        tw = fw.shape[1]
        seq = delay_sequence(fw, delays, CARD)
        S = seq.shape[1]
        inp, target = seq[:, : S - 1], seq[:, 1:]
        logits = model(encoder_outputs=(t5_hidden,), attention_mask=mask, decoder_input_ids=inp).logits
        logp = torch.log_softmax(logits.reshape(K, S - 1, CARD), dim=-1)
        real = target != CARD
        assert (real.sum(1) == tw).all(), real.sum(1)
        # real targets are exactly the window's frames, in order, for every codebook
        for k in range(K):
            assert torch.equal(target[k][real[k]], fw[k])
        nll = -logp.gather(-1, target.clamp(max=CARD - 1)[..., None])[..., 0]
        per_k = (nll * real).sum(1) / real.sum(1)
        # transformers' own per-codebook cross-entropy (labels [1, S-1, K], the special token ignored) agrees
        with torch.no_grad():
            ref = model(
                encoder_outputs=(t5_hidden,), attention_mask=mask, decoder_input_ids=inp, labels=target.t()[None]
            ).loss
        mine = float(per_k.detach().mean())
        assert abs(float(ref) - mine) < 1e-5 * max(1.0, abs(float(ref))), (float(ref), mine)
        per_codebook = per_codebook + (tw / T) * per_k
        lengths.append(tw)
    assert sum(lengths) == T
    return per_codebook.mean(), per_codebook, lengths


def nll_references(model, t5_hidden, mask, lm_names):
    """nll_audio / nll_codes / nll_f / nll_per_codebook and d nll_f / d (LM parameters)."""
    codec = model.config.audio_encoder
    hop = int(np.prod(codec.upsampling_ratios))
    window = int(round(SEGMENT_DURATION * codec.frame_rate))
    audio, codes, margin, gap, variant = choose_nll_audio(model)
    T = codes.shape[1]
    assert T == NLL_SAMPLES // hop == audio.shape[1] // hop == 80, (T, audio.shape)
    if audio.shape[0] == 2:
        assert rel(audio[0], audio[1]) > 0.5, "left and right are too alike"
        assert not torch.equal(codes[0::2], codes[1::2])
    distinct = [int(codes[k].unique().numel()) for k in range(codes.shape[0])]
    assert distinct[0] >= 4, f"nll_audio's first codebook takes only {distinct[0]} values"

    params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for n in lm_names:
        params[n].requires_grad_(True)
    f, per_codebook, lengths = audio_nll(model, t5_hidden, mask, codes, window)
    f.backward()
    grads = collections.OrderedDict((n, params[n].grad.detach().clone()) for n in lm_names)
    for n in lm_names:
        params[n].requires_grad_(False)
        params[n].grad = None
    for n, g in grads.items():
        assert torch.isfinite(g).all(), n
        assert g.abs().max() > 0, f"zero nll gradient for {n}"
    # eager attention: same value
    with torch.no_grad():
        for sub in (model.decoder, model.text_encoder):
            sub.config._attn_implementation = "eager"
        fe, pe, _ = audio_nll(model, t5_hidden, mask, codes, window)
        for sub in (model.decoder, model.text_encoder):
            sub.config._attn_implementation = "sdpa"
    assert rel(pe, per_codebook.detach()) < 1e-5 and abs(float(fe) - float(f.detach())) < 1e-5, float(fe)
    assert abs(float(f.detach()) - float(per_codebook.detach().mean())) < 1e-6
    tensors = collections.OrderedDict(
        nll_audio=audio,
        nll_codes=codes,
        nll_f=f.detach().reshape(1),
        nll_per_codebook=per_codebook.detach(),
    )
    info = collections.OrderedDict(
        nll_f=float(f.detach()),
        nll_window_frames=window,
        nll_windows=lengths,
        nll_frames=T,
        nll_audio_variant=variant,
        nll_min_code_margin=margin,
        nll_min_code_gap=gap,
        nll_distinct_codes_per_row=distinct,
    )
    return tensors, grads, info


def write_reference(folder, model, tensors, grad_lm, grad_codec, grad_nll, info, code_stats, key_naming, stored_keys,
                    extra_notes):
    out = collections.OrderedDict()
    for k, v in tensors.items():
        out[k] = v.contiguous()
    rename = legacy_weight_norm_names if key_naming == "weight_g/weight_v" else (lambda d: d)
    for k, v in rename(grad_lm).items():
        out["grad_lm." + k] = v.contiguous()
    for k, v in rename(grad_codec).items():
        out["grad_codec." + k] = v.contiguous()
    for k, v in rename(grad_nll).items():
        out["grad_nll." + k] = v.contiguous()
    for k in out:
        if k.startswith("grad_"):
            assert k.split(".", 1)[1] in stored_keys, k
    for k, v in out.items():
        if v.is_floating_point():
            out[k] = v.to(torch.float32)
    save_file(out, folder / "reference.safetensors", metadata={"format": "pt"})

    cfg = model.config
    K = info["K"]
    doc = collections.OrderedDict()
    doc["about"] = HEADER
    doc["prompt"] = PROMPT
    doc["prompt_ids"] = info["prompt_ids"]
    doc["guidance_scale"] = GUIDANCE
    doc["card"] = CARD
    doc["special_token"] = CARD
    doc["K"] = K
    doc["audio_channels"] = cfg.decoder.audio_channels
    doc["delays"] = info["delays"]
    doc["S"] = info["S"]
    doc["F_teacher"] = info["F_teacher"]
    doc["T_codes"] = T_CODES
    doc["F"] = F_GREEDY
    doc["sample_rate"] = cfg.audio_encoder.sampling_rate
    doc["frame_rate"] = cfg.audio_encoder.frame_rate
    doc["hop_length"] = int(np.prod(cfg.audio_encoder.upsampling_ratios))
    doc["codec_num_quantizers"] = info["n_q_codec"]
    doc["f_lm"] = info["f_lm"]
    doc["f_codec"] = info["f_codec"]
    doc["nll_f"] = info["nll_f"]
    doc["nll_window_frames"] = info["nll_window_frames"]
    doc["nll_windows"] = info["nll_windows"]
    doc["nll_frames"] = info["nll_frames"]
    doc["key_naming"] = key_naming
    doc["tensors"] = collections.OrderedDict(
        (k, {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", "")})
        for k, v in out.items() if not k.startswith("grad_")
    )
    doc["grad_tensors"] = len([k for k in out if k.startswith("grad_")])
    doc["definitions"] = collections.OrderedDict(
        input_ids="tokenizer.json encoding of `prompt` (T5 style: pieces then </s>=1), shape [1, L]",
        t5_hidden="text_encoder (T5EncoderModel) last_hidden_state for input_ids with attention_mask = ones, [1, L, d_t5]",
        cond_states="enc_to_dec_proj(t5_hidden) * attention_mask[..., None], [1, L, hidden]",
        lm_frames="random codes [K, F_teacher] (0..card-1) from which lm_input is laid out",
        lm_input=(
            "[K, S] decoder input with the start column at position 0: lm_input[k, p] = lm_frames[k, p-1-delays[k]] "
            "if 0 <= p-1-delays[k] < F_teacher else card. So codebook k holds the special token card at positions "
            "p <= delays[k] (start + delay) and at the tail p >= F_teacher+1+delays[k], exactly the layout HF's "
            "generate (and audiocraft's delay pattern) gives a generation of F_teacher frames; S = F_teacher+max_delay+1"
        ),
        logits_cond="decoder logits [K, S, card] for lm_input (full causal forward) with encoder states cond_states, encoder mask ones",
        logits_uncond=(
            "decoder logits [K, S, card] with the null condition as MusicGen's CFG forms it in transformers: T5 states "
            "replaced by zeros AND attention mask zeros (so enc_to_dec_proj(0)=bias is multiplied by 0 -> states 0; "
            "every cross-attention key masked). Numerically the cross-attention blocks add exactly 0 (no attention "
            "biases), equal to running the decoder with no cross-attention at all (checked)"
        ),
        logits_guided="logits_uncond + guidance_scale * (logits_cond - logits_uncond)",
        codes=(
            "random codes [K_codes, T_codes]; mono: [n_q, T]; stereo: [8, T] interleaved (even rows = left channel "
            "codebooks 0..3, odd rows = right channel codebooks 0..3)"
        ),
        audio=(
            "EnCodec decode of codes, [channels, T_codes * hop_length]: sum over q of codebook_q.embed[codes[q]] -> "
            "decoder (no scale, no chunking). Stereo: left = decode(codes[0::2]), right = decode(codes[1::2]) with the "
            "same mono EnCodec, stacked as channels [left, right]"
        ),
        greedy_frames=(
            f"[K, F] audio codes from model.generate(input_ids, attention_mask, do_sample=False, guidance_scale={GUIDANCE}, "
            f"max_new_tokens={info['greedy_max_new_tokens']}) after the delay pattern is undone: column f = frame f for "
            "every codebook, start column not included. The decoder sequence inside generate has 1 + max_new_tokens "
            "= F + max_delay + 1 columns (start column of card, then one column per step); codebook k's frames are "
            "columns 1+delays[k] .. F+delays[k]. Every step: argmax over card of guided logits (CFG processor: "
            "uncond + scale*(cond-uncond), uncond = zeros states + zero mask); positions inside the delay/tail are "
            "forced to card before being fed back. Checked: a full teacher-forced forward on delay(greedy_frames) "
            "gives the same argmax at every valid position"
        ),
        greedy_audio="the audio generate returned for greedy_frames, [channels, F * hop_length]",
        f_lm=(
            "f_lm = (1/F_teacher) * sum_{s=0}^{S-2} mean_{k<K, c<card} logits_guided[k, s, c], on lm_input teacher-forced "
            "(positions 0..S-2 are the S-1 = F_teacher+max_delay sampling steps of a generation of F_teacher frames; "
            "the last position S-1 is not used). Text encoder frozen, t5_hidden computed without grad"
        ),
        grad_lm="grad_lm.<name>: d f_lm / d parameter, for every parameter whose name starts with `decoder.` or `enc_to_dec_proj.`",
        f_codec="mean of `audio` over all channels and samples (for codes)",
        grad_codec=(
            "grad_codec.<name>: d f_codec / d parameter for every parameter under `audio_encoder.decoder.` "
            "(weight-norm g and v as stored, conv biases, LSTM weights and biases)"
        ),
        nll_audio=(
            f"[channels, {NLL_SAMPLES}] float32 waveform at sample_rate ({NLL_SECONDS} s): overlapping synthetic "
            "events (chirp, two-tone chord, noise burst, clicks over a low tone), different per channel; not one of "
            "the signals the codebooks were fitted to"
        ),
        nll_codes=(
            "[K, T] int64, T = samples / hop_length = 80: EncodecModel.encode(nll_audio[None], bandwidth="
            "target_bandwidths[0]).audio_codes[0, 0] (encoder -> residual VQ: at each layer the code whose embed is "
            "nearest in squared Euclidean distance to what the previous layers left). Stereo: each channel encoded "
            "as mono, rows interleaved [L0, R0, L1, R1, L2, R2, L3, R3] (row 2q+c = channel c, codebook q), the "
            "order audiocraft's InterleaveStereoCompressionModel uses and transformers' decode reads back "
            "(codes[0::2] left, codes[1::2] right). Every latent lies at least "
            f"{MIN_CODE_MARGIN:g} (latent units; measured: {info['nll_min_code_margin']:.3g}) from the boundary "
            "of its code's nearest-neighbour cell at every layer, and its nearest code is nearer than the second "
            f"nearest by at least {MIN_CODE_GAP:g} in squared distance (measured: {info['nll_min_code_gap']:.3g}), "
            "so float32 rounding (about 1e-6 on the latents) cannot change a code"
        ),
        nll_f=(
            "audio-nll objective on nll_codes, text conditioned on `prompt` (t5_hidden, attention mask ones), "
            "conditional only (no guidance, no null condition), teacher forcing. The T frames are cut into "
            f"consecutive windows of at most W = round(segment_duration * frame_rate) = {info['nll_window_frames']} "
            f"frames (here {info['nll_windows']}). Per window w with T_w frames: seq = the delay-pattern layout of "
            "its frames [K, S], S = T_w + max_delay + 1 (as lm_input: start column of card, codebook k shifted by "
            "delays[k], card elsewhere); decoder input = seq[:, :S-1] (decoder positions restart at 0 in every "
            "window; no context from the previous window), target at input position p = seq[:, p+1]; real positions "
            "= those whose target is not card (exactly T_w per codebook: the window's frames); "
            "f_w = (1/K) sum_k mean_{real p} -log_softmax(logits_cond[k, p])[target]. "
            "nll_f = sum_w (T_w / T) f_w. Equal to transformers' own loss (labels = target, card ignored) per window"
        ),
        nll_per_codebook=(
            "[K]: sum_w (T_w / T) * mean_{real p} -log_softmax(logits_cond[k, p])[target] (codebook k's mean NLL, "
            "frame-weighted over windows); nll_f = mean(nll_per_codebook)"
        ),
        grad_nll=(
            "grad_nll.<name>: d nll_f / d parameter, for the same parameters (and names) as grad_lm: every parameter "
            "whose name starts with `decoder.` or `enc_to_dec_proj.`. T5 frozen (t5_hidden computed without grad); "
            "no codec parameter is involved (the codes are fixed integers)"
        ),
    )
    doc["codebooks"] = collections.OrderedDict(
        about=(
            "the EnCodec codebooks (quantizer.layers.q.codebook.embed = embed_avg, cluster_size 1, inited 1) are not "
            f"random: k-means ({KMEANS_ITERS} Lloyd iterations, farthest-point initialisation) of the encoder latents "
            f"of {CODEBOOK_TRAIN_SIGNALS} synthetic signals of {NLL_SECONDS} s (sines, chirps, noise bursts, clicks, "
            "mixtures, AM tones, square waves, noise of varying loudness), layer q fitted to the residuals layers < q "
            "leave; done before any reference was computed (decode, greedy and gradient references use them)"
        ),
        heldout_check=code_stats,
    )
    doc["generation"] = collections.OrderedDict(
        max_new_tokens=info["greedy_max_new_tokens"],
        decoder_length=1 + info["greedy_max_new_tokens"],
        start_column_included=False,
        greedy_min_top1_top2_margin=info["greedy_min_margin"],
        generation_config_max_length=int(model.generation_config.max_length),
        generation_config_note=(
            "generation_config.json max_length = window frames = segment_duration * frame_rate "
            f"({SEGMENT_DURATION} s * {cfg.audio_encoder.frame_rate}); do_sample/top_k/guidance_scale mirror "
            "facebook/musicgen-*; the greedy reference overrides do_sample=False and max_new_tokens"
        ),
    )
    doc["notes"] = extra_notes
    (folder / "reference.json").write_text(json.dumps(doc, indent=2) + "\n")


COMMON_NOTES = [
    "float32, eval mode, dropout 0, batch 1, attention mask of ones for the prompt",
    "decoder: pre-LayerNorm (eps 1e-5, with bias) before self-attn, cross-attn and FFN; final decoder.model.decoder.layer_norm; "
    "no biases in q/k/v/out projections, fc1, fc2 or lm_heads; attention scale head_dim**-0.5; activation 'gelu' = exact erf GELU; "
    "input = sum_k embed_tokens[k](ids[k]) (tables of card+1 rows; row card = special token) + sinusoidal position; scale_embedding false",
    "sinusoidal positions (not saved; non-persistent buffer): half=hidden/2, freq_i = exp(-i*ln(10000)/(half-1)), "
    "emb[pos] = cat(cos(pos*freq), sin(pos*freq)); positions start at 0 at the start column (+ cache length when decoding)",
    "enc_to_dec_proj (Linear with bias, d_t5 -> hidden) exists because the widths differ; its output is multiplied by the attention mask",
    "cross-attention keys/values: k_proj/v_proj of the projected T5 states (hidden -> hidden)",
    "T5: RMSNorm (no mean, no bias, eps 1e-6) pre-norm; NO 1/sqrt(d_kv) attention scaling; relative position bias only in "
    "block 0 (relative_attention_bias [num_buckets, heads]) and reused by every block; bidirectional buckets: half the "
    "buckets for rel>0 (key after query), max_exact = buckets/4, log buckets up to max_distance; "
    "relu FFN wi/wo without bias; final_layer_norm; text_encoder.encoder.embed_tokens is tied to text_encoder.shared and NOT saved",
    "EnCodec (non-causal, reflect): conv padding_total = (k-1)*dilation+1 - stride, right = padding_total//2, left = rest, "
    "plus extra right padding = ideal_length - length with ideal = (ceil((len - k_eff + padding_total)/stride + 1) - 1)*stride "
    "+ k_eff - padding_total; reflect pads with extra zero padding first when len <= max(pad). ConvTranspose1d(k=2r, stride r): "
    "output (L-1)*r + 2r, trim padding_total = r: right = r//2, left = r - r//2 -> L*r samples. "
    "Weight norm: w = g * v / ||v||, norm over all dims but 0 (per output channel for Conv1d [out,in,k], per INPUT channel "
    "for ConvTranspose1d [in,out,k]); g has shape [dim0, 1, 1]",
    "EnCodec decoder: conv(hidden->2^len(ratios)*filters, k=7), LSTM (2 layers, seq-first, output + input skip), then per ratio: "
    "ELU, ConvTranspose, resblock [ELU, conv k=3 dilation 1 (dim->dim/2), ELU, conv k=1 (dim/2->dim)] + shortcut "
    "(identity, or 1x1 conv if use_conv_shortcut); ELU, conv(filters->1, k=7). No final activation",
    "quantizer decode: sum over q of embedding lookup in quantizer.layers.q.codebook.embed [card, codebook_dim]",
    "EnCodec encoder: conv(1->filters, k=7), then per ratio in REVERSED order: resblock, ELU, conv(k=2r, stride r, "
    "dim->2*dim); LSTM (2 layers, output + input skip), ELU, conv(->hidden, k=last_kernel_size); same padding rules. "
    "Quantizer encode (bandwidth target_bandwidths[0] -> all n_q layers): residual = latent; per layer q: "
    "code = argmin_j ||residual - embed_q[j]||^2, residual -= embed_q[code]",
]


# ----------------------------------------------------------------------------------------------
# audiocraft layout


def hf_to_audiocraft_lm(sd, hidden):
    """Reverse of transformers' convert_musicgen_transformers.py (rename_keys / rename_state_dict)."""
    out = collections.OrderedDict()
    mapping = {}
    g = lambda k: sd[k].detach().clone().contiguous()
    out["condition_provider.conditioners.description.output_proj.weight"] = g("enc_to_dec_proj.weight")
    out["condition_provider.conditioners.description.output_proj.bias"] = g("enc_to_dec_proj.bias")
    mapping["enc_to_dec_proj.weight"] = "condition_provider.conditioners.description.output_proj.weight"
    mapping["enc_to_dec_proj.bias"] = "condition_provider.conditioners.description.output_proj.bias"
    K = len([k for k in sd if k.startswith("decoder.model.decoder.embed_tokens.")])
    L = len({k.split(".")[4] for k in sd if k.startswith("decoder.model.decoder.layers.")})
    for k in range(K):
        out[f"emb.{k}.weight"] = g(f"decoder.model.decoder.embed_tokens.{k}.weight")
        mapping[f"decoder.model.decoder.embed_tokens.{k}.weight"] = f"emb.{k}.weight"
    for i in range(L):
        h = f"decoder.model.decoder.layers.{i}."
        a = f"transformer.layers.{i}."
        out[a + "self_attn.in_proj_weight"] = torch.cat(
            [g(h + "self_attn.q_proj.weight"), g(h + "self_attn.k_proj.weight"), g(h + "self_attn.v_proj.weight")]
        )
        for j, p in enumerate("qkv"):
            mapping[h + f"self_attn.{p}_proj.weight"] = f"{a}self_attn.in_proj_weight[{j * hidden}:{(j + 1) * hidden}]"
        pairs = [
            ("self_attn.out_proj.weight", "self_attn.out_proj.weight"),
            ("fc1.weight", "linear1.weight"),
            ("fc2.weight", "linear2.weight"),
            ("self_attn_layer_norm.weight", "norm1.weight"),
            ("self_attn_layer_norm.bias", "norm1.bias"),
            ("final_layer_norm.weight", "norm2.weight"),
            ("final_layer_norm.bias", "norm2.bias"),
        ]
        for hk, ak in pairs:
            out[a + ak] = g(h + hk)
            mapping[h + hk] = a + ak
        out[a + "cross_attention.in_proj_weight"] = torch.cat(
            [g(h + "encoder_attn.q_proj.weight"), g(h + "encoder_attn.k_proj.weight"), g(h + "encoder_attn.v_proj.weight")]
        )
        for j, p in enumerate("qkv"):
            mapping[h + f"encoder_attn.{p}_proj.weight"] = (
                f"{a}cross_attention.in_proj_weight[{j * hidden}:{(j + 1) * hidden}]"
            )
        for hk, ak in [
            ("encoder_attn.out_proj.weight", "cross_attention.out_proj.weight"),
            ("encoder_attn_layer_norm.weight", "norm_cross.weight"),
            ("encoder_attn_layer_norm.bias", "norm_cross.bias"),
        ]:
            out[a + ak] = g(h + hk)
            mapping[h + hk] = a + ak
    out["out_norm.weight"] = g("decoder.model.decoder.layer_norm.weight")
    out["out_norm.bias"] = g("decoder.model.decoder.layer_norm.bias")
    mapping["decoder.model.decoder.layer_norm.weight"] = "out_norm.weight"
    mapping["decoder.model.decoder.layer_norm.bias"] = "out_norm.bias"
    for k in range(K):
        out[f"linears.{k}.weight"] = g(f"decoder.lm_heads.{k}.weight")
        mapping[f"decoder.lm_heads.{k}.weight"] = f"linears.{k}.weight"
    lm_keys = [k for k in sd if k.startswith(("decoder.", "enc_to_dec_proj."))]
    assert sorted(mapping) == sorted(lm_keys), set(lm_keys) ^ set(mapping)
    return out, mapping


def hf_to_audiocraft_codec(sd, convtr_prefixes):
    """Reverse of transformers' convert_encodec_checkpoint_to_pytorch.py (layer indices are identical).

    convtr_prefixes: HF module paths (`audio_encoder.decoder.layers.<i>`) of the transposed convolutions."""
    out = collections.OrderedDict()
    mapping = {}
    for k, v in sd.items():
        if not k.startswith("audio_encoder."):
            continue
        k = k[len("audio_encoder."):]
        parts = k.split(".")
        if parts[0] in ("encoder", "decoder"):
            base = f"{parts[0]}.model.{parts[2]}"
            rest = parts[3:]
            if rest[0] == "lstm":
                ak = base + "." + ".".join(rest)
            elif rest[0] == "conv":
                tail = ".".join(rest[1:])
                # decoder ConvTranspose1d layers are `convtr.convtr`
                is_tr = "audio_encoder." + ".".join(parts[:3]) in convtr_prefixes
                ak = base + (".convtr.convtr." if is_tr else ".conv.conv.") + tail
            elif rest[0] == "block":
                ak = f"{base}.block.{rest[1]}.conv.conv." + ".".join(rest[3:])
            elif rest[0] == "shortcut":
                ak = f"{base}.shortcut.conv.conv." + ".".join(rest[2:])
            else:
                raise KeyError(k)
        elif parts[0] == "quantizer":
            ak = f"quantizer.vq.layers.{parts[2]}._codebook.{parts[4]}"
        else:
            raise KeyError(k)
        ak = ak.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v"
        )
        out[ak] = v.detach().clone().contiguous()
        mapping["audio_encoder." + k] = ak
    return out, mapping


def audiocraft_lm_cfg(model):
    dec = model.config.decoder
    codec = model.config.audio_encoder
    K = dec.num_codebooks
    hidden = dec.hidden_size
    return collections.OrderedDict(
        device="cpu",
        dtype="float32",
        sample_rate=codec.sampling_rate,
        channels=1,
        lm_model="transformer_lm",
        compression_model_checkpoint="//pretrained/facebook/encodec_32khz",
        tokens=collections.OrderedDict(padding_with_special_token=False),
        dataset=collections.OrderedDict(
            segment_duration=SEGMENT_DURATION, sample_rate=codec.sampling_rate, channels=1, batch_size=1,
        ),
        codebooks_pattern=collections.OrderedDict(
            modeling="delay",
            delay=collections.OrderedDict(delays=list(range(K)), flatten_first=0, empty_initial=0),
            unroll=collections.OrderedDict(flattening=list(range(K)), delays=[0] * K),
            music_lm=collections.OrderedDict(group_by=2),
            coarse_first=collections.OrderedDict(delays=[0, 0, 0]),
        ),
        transformer_lm=collections.OrderedDict(
            dim=hidden, num_heads=dec.num_attention_heads, num_layers=dec.num_hidden_layers,
            hidden_scale=dec.ffn_dim // hidden, n_q=K, card=CARD, dropout=0.0, emb_lr=None,
            activation="gelu", norm_first=True, bias_ff=False, bias_attn=False, bias_proj=False,
            past_context=None, causal=True, custom=False, memory_efficient=True, attention_as_float32=False,
            layer_scale=None, positional_embedding="sin", xpos=False, checkpointing="none",
            weight_init="gaussian", depthwise_init="current", zero_bias_init=True, norm="layer_norm",
            cross_attention=False, qk_layer_norm=False, qk_layer_norm_cross=False, attention_dropout=None,
            kv_repeat=1, two_step_cfg=False,
        ),
        classifier_free_guidance=collections.OrderedDict(training_dropout=0.1, inference_coef=GUIDANCE),
        attribute_dropout=collections.OrderedDict(),
        fuser=collections.OrderedDict(
            cross_attention_pos_emb=False, cross_attention_pos_emb_scale=1, sum=[], prepend=[],
            cross=["description"], input_interpolate=[],
        ),
        conditioners=collections.OrderedDict(
            description=collections.OrderedDict(
                model="t5",
                t5=collections.OrderedDict(name="t5-base", finetune=False, word_dropout=0.3, normalize_text=False),
            )
        ),
        generate=collections.OrderedDict(
            lm=collections.OrderedDict(
                use_sampling=True, temp=1.0, top_k=250, top_p=0.0, max_prompt_len=None, max_gen_len=None,
                prompted_samples=True, unprompted_samples=True, gen_duration=None, remove_prompts=False,
            )
        ),
    )


def audiocraft_codec_cfg(model):
    codec = model.config.audio_encoder
    return collections.OrderedDict(
        device="cpu",
        dtype="float32",
        sample_rate=codec.sampling_rate,
        channels=codec.audio_channels,
        compression_model="encodec",
        encodec=collections.OrderedDict(
            autoencoder="seanet", quantizer="rvq", sample_rate=codec.sampling_rate,
            channels=codec.audio_channels, causal=False, renormalize=False,
        ),
        seanet=collections.OrderedDict(
            dimension=codec.hidden_size, channels=codec.audio_channels, causal=False,
            n_filters=codec.num_filters, n_residual_layers=codec.num_residual_layers,
            ratios=list(codec.upsampling_ratios), activation="ELU",
            activation_params=collections.OrderedDict(alpha=1.0), norm="weight_norm",
            norm_params=collections.OrderedDict(), kernel_size=codec.kernel_size,
            residual_kernel_size=codec.residual_kernel_size, last_kernel_size=codec.last_kernel_size,
            dilation_base=codec.dilation_growth_rate, pad_mode=codec.pad_mode,
            true_skip=not codec.use_conv_shortcut, compress=codec.compress, lstm=codec.num_lstm_layers,
            disable_norm_outer_blocks=0,
            decoder=collections.OrderedDict(
                trim_right_ratio=codec.trim_right_ratio, final_activation=None, final_activation_params=None
            ),
            encoder=collections.OrderedDict(),
        ),
        rvq=collections.OrderedDict(
            n_q=codec.num_quantizers, q_dropout=False, bins=codec.codebook_size, decay=0.99, kmeans_init=True,
            kmeans_iters=50, threshold_ema_dead_code=2, orthogonal_reg_weight=0.0,
            orthogonal_reg_active_codes_only=False,
        ),
    )


def to_yaml(d):
    def plain(x):
        if isinstance(x, dict):
            return {k: plain(v) for k, v in x.items()}
        if isinstance(x, list):
            return [plain(v) for v in x]
        return x

    return yaml.safe_dump(plain(d), sort_keys=False, default_flow_style=False)


def fake_hash(name):
    return hashlib.sha1(f"spintrak fixture {name}".encode()).hexdigest()


def write_hub_repo(hub, repo, files):
    base = hub / ("models--" + repo.replace("/", "--"))
    h = fake_hash(repo)
    snap = base / "snapshots" / h
    snap.mkdir(parents=True)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(h)
    for name, writer in files.items():
        writer(snap / name)
    return h


def save_state_dict_file(path, sd):
    save_file(collections.OrderedDict((k, v.contiguous()) for k, v in sd.items()), path, metadata={"format": "pt"})


def write_audiocraft(model, tokenizer, folder, hf_keys, nll_audio, nll_codes):
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    sd = collections.OrderedDict(model.state_dict())
    # the state dict holds what hf_mono stores, plus tied aliases transformers does not save
    assert set(hf_keys) <= set(sd) and set(sd) - set(hf_keys) == {"text_encoder.encoder.embed_tokens.weight"}, (
        set(sd) ^ set(hf_keys)
    )
    hidden = model.config.decoder.hidden_size

    lm_sd, lm_map = hf_to_audiocraft_lm(sd, hidden)
    lm_pkg = {"best_state": lm_sd, "xp.cfg": to_yaml(audiocraft_lm_cfg(model)), "version": "1.0", "exported": True}
    torch.save(lm_pkg, folder / "state_dict.bin")
    torch.save({"pretrained": "facebook/encodec_32khz", "exported": True, "version": "1.0"},
               folder / "compression_state_dict.bin")

    # hub cache: facebook/encodec_32khz (the tiny EnCodec, transformers layout, legacy weight_g/weight_v like the
    # real repo) and t5-base (the tiny T5 encoder inside a T5ForConditionalGeneration, like the real repo)
    hub = folder / "hub"
    ae = model.audio_encoder

    def write_encodec_config(p):
        cfg = ae.config.to_dict()
        cfg["architectures"] = ["EncodecModel"]
        p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    def write_encodec_weights(p):
        esd = collections.OrderedDict((k, v.detach().clone()) for k, v in ae.state_dict().items())
        save_state_dict_file(p, collections.OrderedDict(sorted(legacy_weight_norm_names(esd).items())))

    enc_hash = write_hub_repo(hub, "facebook/encodec_32khz",
                              {"config.json": write_encodec_config, "model.safetensors": write_encodec_weights})
    # the snapshot holds the encoder and the fitted codebooks: transformers loads it and encodes nll_audio alike
    snap = hub / "models--facebook--encodec_32khz" / "snapshots" / enc_hash
    snap_sd = load_file(snap / "model.safetensors")
    assert any(k.startswith("encoder.") for k in snap_sd) and any(k.startswith("quantizer.") for k in snap_sd)
    reloaded = transformers.EncodecModel.from_pretrained(snap).eval()
    with torch.no_grad():
        snap_codes = reloaded.encode(nll_audio[None], bandwidth=reloaded.config.target_bandwidths[0]).audio_codes
    assert torch.equal(snap_codes[0, 0], nll_codes), "hub EnCodec snapshot encodes nll_audio differently"

    t5cfg = T5Config.from_dict(model.config.text_encoder.to_dict())
    t5cfg.is_encoder_decoder = True
    t5cfg.architectures = ["T5ForConditionalGeneration"]
    t5cfg.tie_word_embeddings = True
    torch.manual_seed(7)
    t5full = T5ForConditionalGeneration(t5cfg).eval()
    randomize(t5full.decoder, torch.Generator().manual_seed(7))
    with torch.no_grad():
        t5full.shared.weight.copy_(model.text_encoder.shared.weight)
        missing = t5full.encoder.load_state_dict(model.text_encoder.encoder.state_dict(), strict=True)
    tmp = folder / "_t5tmp"
    t5full.save_pretrained(tmp)
    t5_sd = load_file(tmp / "model.safetensors")

    def copy_from_tmp(name):
        return lambda p: shutil.copyfile(tmp / name, p)

    t5_hash = write_hub_repo(hub, "t5-base", {
        "config.json": copy_from_tmp("config.json"),
        "model.safetensors": lambda p: save_state_dict_file(p, collections.OrderedDict(sorted(t5_sd.items()))),
        "tokenizer.json": lambda p: tokenizer.save(str(p)),
    })
    shutil.rmtree(tmp)
    # the hub T5 encoder is the MusicGen text encoder
    for k, v in model.text_encoder.state_dict().items():
        if k in t5_sd:
            assert torch.equal(t5_sd[k], v), k
    with torch.no_grad():
        ids = torch.tensor([tokenizer.encode(PROMPT).ids])
        a = model.text_encoder(input_ids=ids).last_hidden_state
        b = t5full.encoder(input_ids=ids).last_hidden_state
    assert torch.equal(a, b)

    # audiocraft_full: same LM, full codec inline as compressed_state_dict.bin
    full = folder / "audiocraft_full"
    full.mkdir()
    shutil.copyfile(folder / "state_dict.bin", full / "state_dict.bin")
    convtr = {
        f"audio_encoder.decoder.layers.{name}"
        for name, m in model.audio_encoder.decoder.layers.named_children()
        if isinstance(m, transformers.models.encodec.modeling_encodec.EncodecConvTranspose1d)
    }
    assert len(convtr) == len(model.config.audio_encoder.upsampling_ratios)
    codec_sd, codec_map = hf_to_audiocraft_codec(sd, convtr)
    # encoder, decoder and quantizer (every EnCodec tensor, codebooks included) are inline
    assert sorted(codec_map) == sorted(k for k in sd if k.startswith("audio_encoder.")), "codec tensors left out"
    assert any(k.startswith("encoder.model.") for k in codec_sd) and any(k.startswith("quantizer.vq.") for k in codec_sd)
    torch.save({"best_state": codec_sd, "xp.cfg": to_yaml(audiocraft_codec_cfg(model)), "version": "1.0",
                "exported": True}, full / "compressed_state_dict.bin")

    notes = collections.OrderedDict()
    notes["about"] = HEADER
    notes["references"] = "../hf_mono/reference.safetensors and ../hf_mono/reference.json apply unchanged (same weights)"
    notes["state_dict.bin"] = (
        "torch.save zip pickle: {'best_state': OrderedDict[str, float32 Tensor] (audiocraft LMModel names), "
        "'xp.cfg': YAML str, 'version': '1.0', 'exported': True}. T5 weights are not inside (finetune: false)"
    )
    notes["compression_state_dict.bin"] = (
        "pointer {'pretrained': 'facebook/encodec_32khz', 'exported': True, 'version': '1.0'} "
        "(the dict audiocraft.utils.export.export_pretrained_compression_model writes)"
    )
    notes["hub"] = collections.OrderedDict(
        layout="set HF_HUB_CACHE to this hub/ folder (or HF_HOME to audiocraft_mono/); snapshot files are plain "
               "files (no blobs/ symlinks); refs/main holds the snapshot hash without a newline",
        encodec_snapshot=f"models--facebook--encodec_32khz/snapshots/{enc_hash}",
        encodec_files="config.json (EncodecConfig), model.safetensors (EncodecModel state dict, keys without the "
                      "`audio_encoder.` prefix, weight norm as legacy weight_g/weight_v)",
        t5_snapshot=f"models--t5-base/snapshots/{t5_hash}",
        t5_files="config.json (T5Config, architectures T5ForConditionalGeneration), model.safetensors "
                 "(T5ForConditionalGeneration: shared.weight, encoder.block..., encoder.final_layer_norm.weight, "
                 "decoder.* random and unused; encoder/decoder embed_tokens and lm_head are tied to shared.weight and "
                 "not stored), tokenizer.json (the same tokenizer as hf_mono)",
    )
    notes["audiocraft_full"] = (
        "audiocraft_full/state_dict.bin = the same LM file; audiocraft_full/compressed_state_dict.bin = "
        "{'best_state': audiocraft EncodecModel state dict (encoder, decoder, quantizer; weight_g/weight_v), "
        "'xp.cfg': YAML str (compression_model: encodec, encodec, seanet, rvq, sample_rate, channels), "
        "'version': '1.0', 'exported': True}. T5 comes from ../hub (models--t5-base)"
    )
    notes["lm_key_map_hf_to_audiocraft"] = lm_map
    notes["codec_key_map_hf_to_audiocraft"] = codec_map
    notes["lm_keys"] = {k: list(v.shape) for k, v in lm_sd.items()}
    notes["codec_keys"] = {k: list(v.shape) for k, v in codec_sd.items()}
    (folder / "notes.json").write_text(json.dumps(notes, indent=2) + "\n")

    # round trip: the audiocraft tensors map back to the HF state dict
    back = torch.load(folder / "state_dict.bin", map_location="cpu", weights_only=True)
    yaml.safe_load(back["xp.cfg"])
    for hk, ak in lm_map.items():
        if "[" in ak:
            name, rng = ak[:-1].split("[")
            lo, hi = (int(x) for x in rng.split(":"))
            t = back["best_state"][name][lo:hi]
        else:
            t = back["best_state"][ak]
        assert torch.equal(t, sd[hk]), hk
    cback = torch.load(full / "compressed_state_dict.bin", map_location="cpu", weights_only=True)
    for hk, ak in codec_map.items():
        hv = sd[hk]
        assert torch.equal(cback["best_state"][ak], hv), hk
    return lm_map, codec_map


# ----------------------------------------------------------------------------------------------


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    enc = tokenizer.encode(PROMPT)
    print("prompt tokens:", enc.tokens, enc.ids)
    assert enc.ids[-1] == 1 and 2 not in enc.ids

    summary = {}
    for name, stereo, seed, legacy in [("hf_mono", False, 0, False), ("hf_stereo", True, 1, True)]:
        model, code_stats = build_model(tokenizer, stereo, seed)
        print(name, "codes on held-out audio:", json.dumps(code_stats))
        folder = OUT / name
        stored = save_hf(model, tokenizer, folder, legacy_names=legacy)
        tensors, grad_lm, grad_codec, grad_nll, info, probe = references(model, tokenizer, seed)
        check_reload(folder, model, *probe)
        key_naming = "weight_g/weight_v" if legacy else "parametrizations.weight.original0/original1"
        notes = list(COMMON_NOTES)
        notes.append(
            "weight norm keys in model.safetensors: "
            + ("legacy `<conv>.weight_g` (g) / `<conv>.weight_v` (v)" if legacy else
               "`<conv>.parametrizations.weight.original0` (g) / `.original1` (v)")
            + "; grad_codec.* use the same names"
        )
        notes.append(
            "audio-nll: nll_f / nll_per_codebook / grad_nll.* are the objective on nll_codes = encode(nll_audio) "
            "(definitions above); the reference is computed with autograd through the full transformers model "
            "(forward with encoder_outputs=(t5_hidden,), attention_mask ones, decoder_input_ids = each window's input)"
        )
        if stereo:
            notes.append(
                "stereo: 8 decoder codebooks interleaved [L0, R0, L1, R1, L2, R2, L3, R3]; delays [0,0,1,1,2,2,3,3]; "
                "one mono EnCodec decodes codes[0::2] (left) and codes[1::2] (right); audio = cat([left, right], channel dim)"
            )
        write_reference(folder, model, tensors, grad_lm, grad_codec, grad_nll, info, code_stats, key_naming, stored,
                        notes)
        summary[name] = info
        print(name, json.dumps({k: v for k, v in info.items() if k != "prompt_ids"}))
        if name == "hf_mono":
            write_audiocraft(model, tokenizer, OUT / "audiocraft_mono", stored, probe[-2], probe[-1])

    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
