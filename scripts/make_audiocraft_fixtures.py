#!/usr/bin/env python3
"""Tiny MusicGen checkpoints in the form audiocraft itself exports them.

Writes into tests/fixtures/:

  audiocraft_real_mono/    text-to-music MusicGen, mono (4 codebooks, delays 0 1 2 3), with its
                           own EnCodec in compression_state_dict.bin
  audiocraft_real_stereo/  the same recipe with audiocraft's stereo fine-tuning overrides
                           (8 interleaved codebooks, delays 0 0 1 1 2 2 3 3), same EnCodec
  audiocraft_real_mono/pretrained_codec/
                           a mono MusicGen trained on the solver's default codec: its
                           compression_state_dict.bin is the pointer
                           {'pretrained': 'facebook/encodec_32khz'}, which resolves (HF_HUB_CACHE)
                           to the tiny EnCodec of tests/fixtures/audiocraft_mono/hub

Each folder holds state_dict.bin and compression_state_dict.bin as `audiocraft.utils.export`
writes them, plus reference.safetensors (outputs computed by audiocraft) and reference.json
(what each reference tensor is, and how the files were made).

Everything goes through audiocraft's own code, the way a user's fine-tune is exported:

1. The experiment configs come from `audiocraft.train.main.get_xp(overrides)`: audiocraft's own
   Dora/Hydra entry point composing its config/ tree, i.e. the config `dora run` trains with and
   saves as `xp.cfg`. So `xp.cfg` holds every key audiocraft writes, e.g.
   `transformer_lm.cross_attention: false` (audiocraft's default) while `fuser.cross: [description]`.
   Only sizes (and, for stereo, audiocraft's stereo recipe) are overridden: CODEC_OVERRIDES,
   LM_OVERRIDES, STEREO_OVERRIDES and POINTER_OVERRIDES below.
2. An EnCodec experiment (solver=compression/encodec_musicgen_32khz, tiny sizes) is built
   with `audiocraft.models.builders.get_compression_model`, its codebooks initialised the way
   training does it (k-means on the first training batch), and saved as the solver's
   checkpoint.th; the LM experiment points at it with `compression_model_checkpoint=//sig/SIG`.
3. The LM is built with `audiocraft.models.builders.get_lm_model` (which switches
   cross-attention on because `fuser.cross` lists `description`) and saved as checkpoint.th.
4. `audiocraft.utils.export.export_lm` and `export_encodec` turn the two checkpoints into
   state_dict.bin and compression_state_dict.bin (MusicGen docs, "case 1: you trained your
   own EnCodec"); for pretrained_codec/, `export_pretrained_compression_model` writes the
   pointer ("case 2").
5. The folder is loaded back with `audiocraft.models.MusicGen.get_pretrained(folder)` and the
   references are computed with that model.

Offline and CPU-only. T5 (never part of an export) comes from the tiny `t5-base` in
tests/fixtures/audiocraft_mono/hub (d_model 24), through HF_HUB_CACHE; since audiocraft
hard-codes the width of `t5-base` (T5Conditioner.MODELS_DIMS, 768), the script sets it to the
tiny model's 24 before building. audiocraft 1.3.0 pins torch 2.1; with a newer torch it runs
once `torchaudio` and `xformers` are replaced by import stubs (on CPU audiocraft only calls
`xformers.ops.unbind`, which is `torch.unbind`); the stubs are written to a temporary folder.
Modules audiocraft imports but never calls on this path (spacy, librosa, av, soundfile) are
stubbed only when they are not installed. `TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1` lets torch >= 2.6
read audiocraft's own checkpoints (they pickle an OmegaConf config).

audiocraft's config/ tree is not in its wheel: pass --audiocraft-config DIR (the config/
folder of an audiocraft 1.3.0 checkout), or the script extracts it from the audiocraft sdist
(pip download) into ~/.cache/spintrak/.

Setup (in a venv with torch, transformers, safetensors, numpy, pyyaml):
  pip install --no-deps audiocraft==1.3.0
  pip install omegaconf hydra-core flashy dora-search einops julius num2words torchmetrics
Run:
  python scripts/make_audiocraft_fixtures.py
Running it twice writes identical files.
"""

import argparse
import copy
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
HUB = FIXTURES / "audiocraft_mono" / "hub"
AUDIOCRAFT_VERSION = "1.3.0"

# Set before torch / huggingface_hub are imported: offline, the local hub, and torch.load as
# audiocraft 1.3.0 (torch 2.1) expects it.
os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] = "1"
os.environ["HF_HUB_CACHE"] = str(HUB)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("USER", "audiocraft")  # config.yaml's dora.dir reads ${oc.env:USER}
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"

import logging  # noqa: E402
import warnings  # noqa: E402

warnings.filterwarnings("ignore", message="(?s).*version_base")
warnings.filterwarnings("ignore", message="Environment variable TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
warnings.filterwarnings("ignore", category=FutureWarning)
logging.getLogger("audiocraft").setLevel(logging.ERROR)

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

torch.set_num_threads(1)

PROMPT = "calm piano melody with soft drums"
SEED = 1234
T5_LEN = 8        # length of the fixed T5 output fed to the conditioner
LM_FRAMES = 8     # frames laid out by the delay pattern for the LM input
CODEC_FRAMES = 10  # frames decoded by EnCodec
DECODER_INPUT_GAIN = 20.0
MIN_SENSITIVITY = 2e-3  # a changed code must move the reference by this much (relative), 20x the tests' tolerance

# The EnCodec experiment: audiocraft's MusicGen EnCodec recipe at tiny size.
CODEC_OVERRIDES = [
    "solver=compression/encodec_musicgen_32khz",
    "dset=audio/example",
    "seanet.n_filters=4",
    "seanet.ratios=[4,2]",
    "seanet.dimension=16",
    "rvq.bins=32",
    "rvq.n_q=4",
]

# The MusicGen experiment: the base 32 kHz text-to-music solver at tiny size.
LM_OVERRIDES = [
    "solver=musicgen/musicgen_base_32khz",
    "model/lm/model_scale=small",
    "conditioner=text2music",
    "dset=audio/example",
    "transformer_lm.dim=32",
    "transformer_lm.num_heads=4",
    "transformer_lm.num_layers=2",
    "transformer_lm.card=32",
]

# The codec a MusicGen solver uses unless told otherwise (musicgen_base_32khz.yaml:
# compression_model_checkpoint: //pretrained/facebook/encodec_32khz). Here it resolves to the tiny
# EnCodec of the hub fixture (8 kHz), so that experiment also sets sample_rate=8000, as the
# solver checks the two agree.
PRETRAINED_CODEC = "facebook/encodec_32khz"
POINTER_OVERRIDES = ["sample_rate=8000"]

EXPORT_FILES = ["state_dict.bin", "compression_state_dict.bin", "reference.safetensors", "reference.json"]

# audiocraft/grids/musicgen/musicgen_stereo_finetune_32khz.py, `stereo`.
STEREO_OVERRIDES = [
    "codebooks_pattern.delay.delays=[0,0,1,1,2,2,3,3]",
    "transformer_lm.n_q=8",
    "interleave_stereo_codebooks.use=true",
    "channels=2",
]


# ----------------------------------------------------------------------------------------------
# audiocraft on a newer torch, offline


ANY_ATTRIBUTE = '''
def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    class _Unavailable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError(f"import stub: {__name__}.{name} is not available")

    _Unavailable.__name__ = name
    return _Unavailable
'''

XFORMERS_OPS = '''
import torch

unbind = torch.unbind


class LowerTriangularMask:
    pass


def memory_efficient_attention(*args, **kwargs):
    raise RuntimeError("import stub: xformers.ops.memory_efficient_attention is not available")
'''


def install_import_stubs(folder):
    """Writes import stubs into `folder` and puts it first on sys.path. Returns the stubbed names."""

    def write(rel, text):
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))

    write("xformers/__init__.py", "")
    write("xformers/ops.py", XFORMERS_OPS)
    write("torchaudio/__init__.py", "from . import functional, transforms\n")
    write("torchaudio/transforms.py", ANY_ATTRIBUTE)
    write("torchaudio/functional.py", ANY_ATTRIBUTE)
    stubbed = ["torchaudio", "xformers"]
    for name in ["spacy", "librosa", "av", "soundfile"]:
        if importlib.util.find_spec(name) is None:
            write(f"{name}/__init__.py", ANY_ATTRIBUTE)
            if name == "librosa":
                write("librosa/filters.py", ANY_ATTRIBUTE)
            stubbed.append(name)
    sys.path.insert(0, str(folder))
    return stubbed


def audiocraft_config_dir(explicit):
    """audiocraft's config/ tree: given, cached, or extracted from the sdist."""
    if explicit:
        path = Path(explicit)
        if not (path / "config.yaml").exists():
            sys.exit(f"{path}: not audiocraft's config/ folder (no config.yaml)")
        return path
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "spintrak"
    path = cache / f"audiocraft-{AUDIOCRAFT_VERSION}" / "config"
    if (path / "config.yaml").exists():
        return path
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", tmp,
             f"audiocraft=={AUDIOCRAFT_VERSION}"],
            check=True,
        )
        (sdist,) = Path(tmp).glob("audiocraft-*.tar.gz")
        prefix = f"audiocraft-{AUDIOCRAFT_VERSION}/config/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            tar.extractall(cache, members=members, filter="data")
    return path


# ----------------------------------------------------------------------------------------------
# helpers


def perturb_norms(module, gen, scale=0.1):
    """Moves LayerNorm scales/offsets and weight-norm magnitudes off their initial values, so
    a loader that skipped them would be caught."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = isinstance(module.get_submodule(name.rsplit(".", 1)[0]), torch.nn.LayerNorm)
            if is_norm and leaf == "weight":
                p.mul_(1 + scale * torch.randn(p.shape, generator=gen))
            elif is_norm and leaf == "bias":
                p.add_(scale * torch.randn(p.shape, generator=gen))
            elif leaf in ("weight_g", "original0"):
                p.mul_(1 + scale * torch.randn(p.shape, generator=gen))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def plain_state(state):
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


# ----------------------------------------------------------------------------------------------
# the fixtures


def audiocraft_train_main(config_dir, dora_dir):
    """audiocraft.train.main: the Dora/Hydra entry point `dora run` trains through.

    audiocraft/train.py declares it with `@hydra_main(config_path='../config', ...)`, relative
    to the package, where the wheel has no config/; the same declaration is pointed at
    `config_dir` instead. The team settings come from config/teams/default.yaml and the Dora
    folder (where experiments and their checkpoint.th live) is `dora_dir`."""
    import dora

    os.environ["AUDIOCRAFT_CONFIG"] = str(config_dir / "teams" / "default.yaml")
    os.environ["AUDIOCRAFT_TEAM"] = "default"
    os.environ["AUDIOCRAFT_CLUSTER"] = "default"
    os.environ["AUDIOCRAFT_DORA_DIR"] = str(dora_dir)
    packaged = dora.hydra_main

    def hydra_main(config_name, config_path, **kwargs):
        if config_path == "../config":
            config_path = str(config_dir.resolve())
        return packaged(config_name=config_name, config_path=config_path, **kwargs)

    dora.hydra_main = hydra_main
    try:
        from audiocraft import train
    finally:
        dora.hydra_main = packaged
    assert Path(train.main.dora.dir) == Path(dora_dir), train.main.dora.dir
    return train.main


class Maker:
    def __init__(self, config_dir, dora_dir):
        self.main = audiocraft_train_main(config_dir, dora_dir)

    def experiment(self, argv):
        """The XP (config + signature) `dora run ARGV` would train."""
        return self.main.get_xp(list(argv))

    def make_codec_xp(self, seed):
        from audiocraft.models import builders

        xp = self.experiment(CODEC_OVERRIDES)
        cfg = copy.deepcopy(xp.cfg)
        cfg.device = "cpu"
        torch.manual_seed(seed)
        model = builders.get_compression_model(cfg)
        # The first training batch initialises the codebooks (k-means) and their EMA statistics.
        gen = torch.Generator().manual_seed(seed + 1)
        t = torch.arange(4000) / cfg.sample_rate
        batch = torch.stack([
            torch.sin(2 * torch.pi * (110 + 90 * i) * t) * (0.3 + 0.1 * i) + 0.05 * torch.randn(t.shape, generator=gen)
            for i in range(4)
        ])[:, None]
        model.train()
        model(batch)
        model.eval()
        perturb_norms(model, gen)
        # Freshly initialised, the decoder output is dominated by its biases; a larger gain on
        # its input convolution makes the decoded audio depend clearly on the codes.
        with torch.no_grad():
            model.decoder.model[0].conv.conv.weight_g.mul_(DECODER_INPUT_GAIN)
        state = plain_state(model.state_dict())
        folder = xp.folder
        folder.mkdir(parents=True, exist_ok=True)
        # What audiocraft's CompressionSolver checkpoint holds for the export (flashy state
        # 'xp.cfg', 'xp.sig', 'history', plus the registered 'model' / 'best_state').
        torch.save(
            {"history": [], "xp.cfg": xp.cfg, "xp.sig": xp.sig, "model": state, "best_state": {"model": state}},
            folder / "checkpoint.th",
        )
        return xp

    def make_lm_xp(self, argv, seed):
        from audiocraft.models import builders
        from audiocraft.solvers.compression import CompressionSolver

        xp = self.experiment(argv)
        cfg = xp.cfg
        assert cfg.transformer_lm.cross_attention is False, "audiocraft's LM config has cross_attention: false"
        assert list(cfg.fuser.cross) == ["description"], cfg.fuser.cross
        # MusicGenSolver.build_model: the codec and its checks, then the LM.
        compression = CompressionSolver.wrapped_model_from_checkpoint(cfg, cfg.compression_model_checkpoint, "cpu")
        assert compression.sample_rate == cfg.sample_rate
        assert cfg.transformer_lm.card == compression.cardinality
        assert cfg.transformer_lm.n_q == compression.num_codebooks
        build_cfg = copy.deepcopy(cfg)
        build_cfg.device = "cpu"
        torch.manual_seed(seed)
        lm = builders.get_lm_model(build_cfg)
        assert all(layer.cross_attention is not None for layer in lm.transformer.layers), \
            "get_lm_model enables cross-attention because fuser.cross lists `description`"
        perturb_norms(lm, torch.Generator().manual_seed(seed + 1))
        state = plain_state(lm.state_dict())
        assert not any(k.startswith("condition_provider.conditioners.description.t5") for k in state)
        folder = xp.folder
        folder.mkdir(parents=True, exist_ok=True)
        # What the MusicGenSolver checkpoint holds for export_lm (no FSDP: fsdp_best_state empty).
        torch.save(
            {"history": [], "xp.cfg": xp.cfg, "xp.sig": xp.sig, "model": state, "best_state": {"model": state},
             "fsdp_best_state": {}},
            folder / "checkpoint.th",
        )
        return xp, lm

    def export(self, codec_xp, lm_xp, out):
        """MusicGen docs, "Importing / Exporting models": export_lm, then the codec: case 1
        (trained your own: export_encodec) or case 2 (a pretrained one: export_pretrained_compression_model)."""
        from audiocraft.utils import export

        for name in EXPORT_FILES:
            (out / name).unlink(missing_ok=True)
        out.mkdir(parents=True, exist_ok=True)
        export.export_lm(lm_xp.folder / "checkpoint.th", out / "state_dict.bin")
        if codec_xp is None:
            export.export_pretrained_compression_model(PRETRAINED_CODEC, out / "compression_state_dict.bin")
        else:
            export.export_encodec(codec_xp.folder / "checkpoint.th", out / "compression_state_dict.bin")


def check_export(out, lm_built, pointer):
    pkg = torch.load(out / "state_dict.bin", map_location="cpu", weights_only=False)
    assert set(pkg) == {"best_state", "xp.cfg", "version", "exported"}, set(pkg)
    assert pkg["exported"] is True and pkg["version"] == AUDIOCRAFT_VERSION
    xp = yaml.safe_load(pkg["xp.cfg"])
    assert xp["transformer_lm"]["cross_attention"] is False, "real exports say cross_attention: false"
    assert xp["fuser"]["cross"] == ["description"], xp["fuser"]
    assert any(".cross_attention." in k for k in pkg["best_state"]), "the LM has cross-attention weights"
    assert all(isinstance(lm_built.transformer.layers[i].cross_attention, torch.nn.Module)
               for i in range(len(lm_built.transformer.layers)))
    codec = torch.load(out / "compression_state_dict.bin", map_location="cpu", weights_only=False)
    if pointer:
        assert codec == {"pretrained": PRETRAINED_CODEC, "exported": True, "version": AUDIOCRAFT_VERSION}, codec
        return xp, None, pkg
    assert set(codec) == {"best_state", "xp.cfg", "version", "exported"}, set(codec)
    return xp, yaml.safe_load(codec["xp.cfg"]), pkg


def references(out, stereo, seed):
    """Loads the export with audiocraft and computes the reference outputs."""
    from audiocraft.models import MusicGen
    from audiocraft.modules.conditioners import ClassifierFreeGuidanceDropout, ConditioningAttributes

    mg = MusicGen.get_pretrained(str(out), device="cpu")
    lm, codec = mg.lm, mg.compression_model
    lm.eval()
    codec.eval()
    gen = torch.Generator().manual_seed(seed)
    K, card = lm.num_codebooks, lm.card
    conditioner = lm.condition_provider.conditioners["description"]
    d_t5 = conditioner.output_proj.in_features

    def conditioner_on(t5_out, mask):
        """T5Conditioner.forward with `t5` answering `t5_out`: output_proj, then the mask multiply."""
        real = conditioner.__dict__["t5"]
        conditioner.__dict__["t5"] = lambda **inputs: types.SimpleNamespace(last_hidden_state=t5_out)
        try:
            inputs = {"input_ids": torch.zeros(mask.shape, dtype=torch.long), "attention_mask": mask}
            return conditioner(inputs)
        finally:
            conditioner.__dict__["t5"] = real

    r = {}
    with torch.no_grad():
        t5_hidden = torch.randn(1, T5_LEN, d_t5, generator=gen)
        mask = torch.ones(1, T5_LEN, dtype=torch.long)
        cond_states, cond_mask = conditioner_on(t5_hidden, mask)
        # The null condition of classifier-free guidance: what the conditioner makes of an
        # absent description (mask zeroed), here for the same T5 length.
        null_states, null_mask = conditioner_on(t5_hidden, torch.zeros_like(mask))
        frames = torch.randint(0, card, (1, K, LM_FRAMES), generator=gen)
        pattern = lm.pattern_provider.get_pattern(LM_FRAMES)
        seq, _, _ = pattern.build_pattern_sequence(frames, lm.special_token_id, keep_only_valid_steps=False)
        logits = lm(seq, [], condition_tensors={"description": (cond_states, cond_mask)})
        logits_uncond = lm(seq, [], condition_tensors={"description": (null_states, null_mask)})
        # The whole text path as audiocraft runs it (tokenizer, T5 from the hub, projection), and
        # the null condition as generation forms it (ClassifierFreeGuidanceDropout(p=1)).
        attrs = [ConditioningAttributes(text={"description": PROMPT})]
        attrs = attrs + ClassifierFreeGuidanceDropout(p=1.0)(attrs)
        tokenized = lm.condition_provider.tokenize(attrs)
        prompt_ids = tokenized["description"]["input_ids"][0].clone()
        prompt_states, prompt_mask = lm.condition_provider(tokenized)["description"]
        assert prompt_mask[0].all() and not prompt_mask[1].any()
        assert prompt_states[1].abs().max() == 0
        prompt_t5 = conditioner.t5(**{k: v[:1] for k, v in tokenized["description"].items()}).last_hidden_state
        prompt_logits = lm(seq, [], condition_tensors={"description": (prompt_states[:1], prompt_mask[:1])})
        codes = torch.randint(0, codec.cardinality, (1, codec.num_codebooks, CODEC_FRAMES), generator=gen)
        audio = codec.decode(codes, None)
        # The references notice a wrong code, codebook order or channel interleaving.
        variants = {"one frame": codes.clone(), "last codebook": codes.clone()}
        variants["one frame"][0, :, CODEC_FRAMES // 2] = (codes[0, :, CODEC_FRAMES // 2] + 1) % codec.cardinality
        variants["last codebook"][0, -1] = (codes[0, -1] + 7) % codec.cardinality
        if stereo:
            variants["left/right swapped"] = codes[:, [k ^ 1 for k in range(codes.shape[1])]]
            variants["channels blocked"] = torch.cat([codes[:, 0::2], codes[:, 1::2]], 1)
        for what, c in variants.items():
            assert rel(codec.decode(c, None), audio) > MIN_SENSITIVITY, f"decode barely depends on {what}"
        for what, other in [("conditioning", logits_uncond), ("prompt", prompt_logits)]:
            assert rel(other, logits) > MIN_SENSITIVITY, f"logits barely depend on {what}"
        rotated = seq.roll(1, dims=1)  # codebook rows fed to the wrong embeddings
        assert rel(lm(rotated, [], condition_tensors={"description": (cond_states, cond_mask)}), logits) > MIN_SENSITIVITY
    assert seq.shape == (1, K, LM_FRAMES + max(pattern_delays(lm)) + 1)
    assert torch.equal(cond_mask, mask) and null_states.abs().max() == 0
    r["t5_hidden"] = t5_hidden
    r["t5_mask"] = mask
    r["cond_states"] = cond_states
    r["lm_frames"] = frames[0]
    r["lm_input"] = seq[0]
    r["logits"] = logits[0]
    r["logits_uncond"] = logits_uncond[0]
    r["prompt_ids"] = prompt_ids[None]
    r["prompt_t5_hidden"] = prompt_t5
    r["prompt_cond_states"] = prompt_states[:1]
    r["prompt_logits"] = prompt_logits[0]
    r["codes"] = codes[0]
    r["audio"] = audio[0]
    info = {
        "K": K,
        "card": card,
        "special_token": lm.special_token_id,
        "delays": pattern_delays(lm),
        "audio_channels": codec.channels,
        "sample_rate": codec.sample_rate,
        "frame_rate": codec.frame_rate,
        "codec_codebooks": codec.num_codebooks,
        "d_t5": d_t5,
        "dim": lm.dim,
        "stereo": stereo,
    }
    return {k: v.contiguous() for k, v in r.items()}, info, mg


def pattern_delays(lm):
    return list(lm.pattern_provider.delays)


KEY_DOCS = {
    "t5_hidden": "[1, L, d_t5] f32: a fixed random stand-in for T5's last hidden state (L = 8, d_t5 = 24)",
    "t5_mask": "[1, L] i64: its attention mask (all ones, so masking changes nothing)",
    "cond_states": "[1, L, dim] f32: T5Conditioner.forward on t5_hidden (output_proj, then times the mask); "
                   "= LM.project_condition(t5_hidden)",
    "lm_frames": "[K, F] i64: random frames (F = 8)",
    "lm_input": "[K, S] i64: lm_frames laid out by audiocraft's delay pattern "
                "(build_pattern_sequence, keep_only_valid_steps=False): S = F + max_delay + 1, step 0 is the "
                "start column, the special token is card",
    "logits": "[K, S, card] f32: LMModel.forward(lm_input, condition_tensors={'description': (cond_states, mask)})",
    "logits_uncond": "[K, S, card] f32: the same with the null condition (the conditioner's output for a "
                     "zeroed mask: all-zero states of length L), as classifier-free guidance forms it",
    "prompt_ids": "[1, N] i64: audiocraft's T5 tokenization of the prompt (tiny t5-base from the hub fixture)",
    "prompt_t5_hidden": "[1, N, d_t5] f32: T5EncoderModel output for prompt_ids",
    "prompt_cond_states": "[1, N, dim] f32: audiocraft's condition provider on the prompt (T5 + output_proj + mask)",
    "prompt_logits": "[K, S, card] f32: LMModel.forward(lm_input) conditioned on prompt_cond_states",
    "codes": "[codec_codebooks, T] i64: random codes (T = 10); stereo: interleaved per codebook "
             "(k0 left, k0 right, k1 left, ...), as InterleaveStereoCompressionModel lays them out",
    "audio": "[channels, T * hop] f32: compression_model.decode(codes) (stereo: left and right decoded "
             "separately by the mono EnCodec, concatenated on channels)",
}


NOTES = [
    "xp.cfg is OmegaConf.to_yaml of the composed config: interpolations such as ${sample_rate} (generate.audio, "
    "metrics) or, in the codec's, ${channels} and ${encodec.causal} are kept unresolved, as in real exports",
    "device: cuda, autocast: true (training settings) are what the config says; models were built and run "
    "on CPU in float32, as audiocraft's loaders do (they set device and dtype)",
    "the EnCodec's codebooks were initialised by k-means on one training batch (kmeans_init: true), its "
    "weight-norm magnitudes and the LM's LayerNorm parameters moved off their initial values, and the gain of "
    "the decoder's input convolution raised (x20) so `audio` depends clearly on `codes`",
    "audiocraft's SEANet pads with pad_mode: constant; the same weights with reflect padding change `audio` "
    "by about 50%",
]


def write_reference(out, refs, info, codec_xp, lm_xp, lm_argv, stubbed, lm_xp_cfg, codec_xp_cfg):
    save_file(refs, str(out / "reference.safetensors"), metadata={"about": "audiocraft reference outputs"})
    doc = {
        "about": "an audiocraft MusicGen export (state_dict.bin, compression_state_dict.bin) made by "
                 "scripts/make_audiocraft_fixtures.py with audiocraft's own config composition, model builders "
                 "and export functions; reference outputs computed by audiocraft on the exported folder "
                 "(MusicGen.get_pretrained)",
        "audiocraft_version": AUDIOCRAFT_VERSION,
        "torch_version": torch.__version__.split("+")[0],
        "prompt": PROMPT,
        "t5": "tiny t5-base from ../audiocraft_mono/hub (models--t5-base), d_model 24; T5 is not in the export. "
              "audiocraft's T5Conditioner.MODELS_DIMS['t5-base'] was set to 24 to build the conditioner",
        "codec_experiment": ({"sig": codec_xp.sig, "overrides": CODEC_OVERRIDES} if codec_xp else
                             f"none: the pretrained {PRETRAINED_CODEC}, here the tiny EnCodec of "
                             "../../audiocraft_mono/hub (models--facebook--encodec_32khz: 8 kHz, 4 x 32 codes, reflect padding)"),
        "lm_experiment": {"sig": lm_xp.sig, "overrides": lm_argv},
        "export": {
            "state_dict.bin": "audiocraft.utils.export.export_lm(<LM xp>/checkpoint.th, state_dict.bin): "
                              "{'best_state': LM state dict, 'xp.cfg': OmegaConf.to_yaml(cfg), 'version', 'exported'}",
            "compression_state_dict.bin": (
                "audiocraft.utils.export.export_encodec(<EnCodec xp>/checkpoint.th, compression_state_dict.bin): "
                "the full codec, same keys" if codec_xp else
                f"audiocraft.utils.export.export_pretrained_compression_model('{PRETRAINED_CODEC}', "
                f"compression_state_dict.bin): {{'pretrained': '{PRETRAINED_CODEC}', 'exported': True, 'version'}}"),
        },
        "xp_cfg_excerpt": {
            "transformer_lm.cross_attention": lm_xp_cfg["transformer_lm"]["cross_attention"],
            "fuser": lm_xp_cfg["fuser"],
            "conditioners": lm_xp_cfg["conditioners"],
            "codebooks_pattern": lm_xp_cfg["codebooks_pattern"],
            "interleave_stereo_codebooks": lm_xp_cfg["interleave_stereo_codebooks"],
            "channels": lm_xp_cfg["channels"],
            "compression_model_checkpoint": lm_xp_cfg["compression_model_checkpoint"],
            "sample_rate": lm_xp_cfg["sample_rate"],
        },
        "codec_xp_cfg_excerpt": {k: codec_xp_cfg[k] for k in ["compression_model", "encodec", "seanet", "rvq",
                                                              "sample_rate", "channels"]} if codec_xp_cfg else None,
        "notes": NOTES if codec_xp else NOTES[:2] + [
            f"the codec is the pointer {PRETRAINED_CODEC!r}: audiocraft resolved it through HF_HUB_CACHE to the tiny "
            "transformers EncodecModel of ../../audiocraft_mono/hub (its HFEncodecCompressionModel wrapper)"],
        "runtime_stubs": stubbed,
        "info": info,
        "keys": KEY_DOCS,
        "shapes": {k: list(v.shape) for k, v in refs.items()},
    }
    (out / "reference.json").write_text(json.dumps(doc, indent=2, default=_json_scalar) + "\n")


def _json_scalar(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--audiocraft-config", help="audiocraft's config/ folder (default: from the sdist)")
    args = ap.parse_args()

    config_dir = audiocraft_config_dir(args.audiocraft_config)
    with tempfile.TemporaryDirectory(prefix="audiocraft_fixtures_") as tmp:
        tmp = Path(tmp)
        stubbed = install_import_stubs(tmp / "stubs")
        import audiocraft

        assert audiocraft.__version__ == AUDIOCRAFT_VERSION, audiocraft.__version__
        from audiocraft.modules.conditioners import T5Conditioner

        t5_cfg = json.loads(next((HUB / "models--t5-base" / "snapshots").glob("*/config.json")).read_text())
        T5Conditioner.MODELS_DIMS["t5-base"] = t5_cfg["d_model"]

        maker = Maker(config_dir, tmp / "dora")
        codec_xp = maker.make_codec_xp(SEED)
        own_codec = [f"compression_model_checkpoint=//sig/{codec_xp.sig}"]
        variants = [
            ("audiocraft_real_mono", codec_xp, LM_OVERRIDES + own_codec, False, SEED + 10),
            ("audiocraft_real_stereo", codec_xp, LM_OVERRIDES + own_codec + STEREO_OVERRIDES, True, SEED + 20),
            ("audiocraft_real_mono/pretrained_codec", None, LM_OVERRIDES + POINTER_OVERRIDES, False, SEED + 30),
        ]
        for name, codec, argv, stereo, seed in variants:
            out = FIXTURES / name
            lm_xp, lm_built = maker.make_lm_xp(argv, seed)
            maker.export(codec, lm_xp, out)
            lm_cfg, codec_cfg, pkg = check_export(out, lm_built, pointer=codec is None)
            refs, info, mg = references(out, stereo, seed + 5)
            # The loaded export is the model that was built.
            for k, v in lm_built.state_dict().items():
                assert torch.equal(v, mg.lm.state_dict()[k]), k
            write_reference(out, refs, info, codec, lm_xp, argv, stubbed, lm_cfg, codec_cfg)
            back = load_file(str(out / "reference.safetensors"))
            assert all(torch.equal(back[k], refs[k]) for k in refs)
            sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
            print(f"{name}: lm xp {lm_xp.sig}, files {sizes}")
            print(f"  transformer_lm.cross_attention: {lm_cfg['transformer_lm']['cross_attention']}, "
                  f"fuser.cross: {lm_cfg['fuser']['cross']}, delays: {info['delays']}, stubs: {stubbed}")


if __name__ == "__main__":
    main()
