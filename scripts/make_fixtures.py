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
    gc = model.generation_config
    gc.decoder_start_token_id = CARD
    gc.pad_token_id = CARD
    gc.bos_token_id = CARD
    gc.guidance_scale = GUIDANCE
    gc.do_sample = True
    gc.top_k = 250
    gc.max_length = int(round(SEGMENT_DURATION * cfg.audio_encoder.frame_rate))
    return model


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


def check_reload(folder, model, t5_hidden, mask, seq, codes):
    """The saved folder, loaded back by transformers, gives the same numbers."""
    re = MusicgenForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        c0, u0 = lm_logits(model, t5_hidden, mask, seq)
        c1, u1 = lm_logits(re, t5_hidden, mask, seq)
        a0 = decode_codes(model, codes)
        a1 = decode_codes(re, codes)
    for a, b, what in [(c0, c1, "cond"), (u0, u1, "uncond"), (a0, a1, "audio")]:
        if not torch.equal(a, b):
            raise RuntimeError(f"{folder.name}: reloaded model differs ({what}, rel {rel(a, b):.3g})")


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
    info = dict(
        K=K, delays=delays, max_delay=D, S=S_TEACHER, F_teacher=f_teacher, n_q_codec=n_q,
        prompt_ids=ids, f_lm=float(f_lm.detach()), f_codec=float(f_codec.detach()), greedy_max_new_tokens=max_new,
        greedy_min_margin=min(margins), audio_samples=int(audio.shape[-1]),
        greedy_audio_samples=int(greedy_audio.shape[-1]),
    )
    return tensors, grad_lm, grad_codec, info, (t5_hidden, mask, lm_input, codes)


def write_reference(folder, model, tensors, grad_lm, grad_codec, info, key_naming, stored_keys, extra_notes):
    out = collections.OrderedDict()
    for k, v in tensors.items():
        out[k] = v.contiguous()
    rename = legacy_weight_norm_names if key_naming == "weight_g/weight_v" else (lambda d: d)
    for k, v in rename(grad_lm).items():
        out["grad_lm." + k] = v.contiguous()
    for k, v in rename(grad_codec).items():
        out["grad_codec." + k] = v.contiguous()
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
            cross_attention=True, qk_layer_norm=False, qk_layer_norm_cross=False, attention_dropout=None,
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


def write_audiocraft(model, tokenizer, folder, hf_keys):
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
        model = build_model(tokenizer, stereo, seed)
        folder = OUT / name
        stored = save_hf(model, tokenizer, folder, legacy_names=legacy)
        tensors, grad_lm, grad_codec, info, probe = references(model, tokenizer, seed)
        check_reload(folder, model, *probe)
        key_naming = "weight_g/weight_v" if legacy else "parametrizations.weight.original0/original1"
        notes = list(COMMON_NOTES)
        notes.append(
            "weight norm keys in model.safetensors: "
            + ("legacy `<conv>.weight_g` (g) / `<conv>.weight_v` (v)" if legacy else
               "`<conv>.parametrizations.weight.original0` (g) / `.original1` (v)")
            + "; grad_codec.* use the same names"
        )
        if stereo:
            notes.append(
                "stereo: 8 decoder codebooks interleaved [L0, R0, L1, R1, L2, R2, L3, R3]; delays [0,0,1,1,2,2,3,3]; "
                "one mono EnCodec decodes codes[0::2] (left) and codes[1::2] (right); audio = cat([left, right], channel dim)"
            )
        write_reference(folder, model, tensors, grad_lm, grad_codec, info, key_naming, stored, notes)
        summary[name] = info
        print(name, json.dumps({k: v for k, v in info.items() if k != "prompt_ids"}))
        if name == "hf_mono":
            write_audiocraft(model, tokenizer, OUT / "audiocraft_mono", stored)

    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"fixtures: {total / 1e6:.2f} MB in {OUT}")


if __name__ == "__main__":
    main()
