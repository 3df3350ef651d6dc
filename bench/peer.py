#!/usr/bin/env python3
"""PyTorch / transformers peer for `spintrak bench --peer`.

    python bench/peer.py --model DIR --threads N

DIR is a MusicGen in the transformers layout. The process serves JSON lines: one request object per line on
stdin, exactly one response object per line on stdout; logs and warnings go to stderr. A failing request
answers {"error": "..."} and the peer keeps serving; EOF on stdin ends it with status 0. Every response has
"seconds", the wall time (time.perf_counter) of the timed part only.

The objectives are those of scripts/make_fixtures.py (delays_of, delay_sequence, decode_codes, lm_logits,
references, audio_nll), restated here so that this file stands alone.

Requests:
  {"task":"info"}
  {"task":"generate","input_ids":[..],"frames":F,"guidance_scale":g}            -> codes [K][F]
  {"task":"logits","input_ids":[..],"codes":[[..]],"guidance_scale":g,"out":p}  -> p: "guided" f32 [K,S,card]
  {"task":"grad","objective":"audio-nll"|"generation","input_ids":[..],"codes":[[..]],
   "guidance_scale":g,"window":W,"keep":slot|null,"dtype":"float32"|"float64"}  -> f_lm, f_codec, norm, parameters
  {"task":"gram","slots":[i,..]}  {"task":"clear"}
  {"task":"project","d":D,"k":k,"seed":s,"block":B,"d_slice":n?,"proj_type":"normal"?}  -> ratio
  {"task":"score","training":p,"lambda":l,"out":q}                              -> q: "scores" f64 [m,n]
"""

import os
import sys

# Replies own the real stdout; everything else (Python prints, C-level writes, progress bars) lands on stderr.
_REPLY = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
os.dup2(2, 1)
sys.stdout = sys.stderr
# libgomp's default wait policy (spin, then sleep) makes every small parallel op pay a slow wake-up on
# 2-vCPU VMs: with --threads 2, a tiny model's generation ran 10-25x slower than with 1 thread. PASSIVE (sleep
# at once) removes most of that. It must be set before torch loads libgomp; the caller's environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import MusicgenForConditionalGeneration  # noqa: E402

transformers.logging.set_verbosity_error()

LM_PREFIXES = ("decoder.", "enc_to_dec_proj.")
CODEC_PREFIXES = ("audio_encoder.decoder.",)


# ----------------------------------------------------------------------------------------------------------
# the objectives, as scripts/make_fixtures.py defines them


def delays_of(model):
    k = model.decoder.num_codebooks
    if model.config.decoder.audio_channels == 2:
        return [i // 2 for i in range(k)]  # stereo: [L0, R0, L1, R1, ...], each pair shares a delay
    return list(range(k))


def delay_sequence(frames, delays, special):
    """frames [K, F] -> [K, F + max_delay + 1], start column at 0; seq[k, 1 + delays[k] + f] = frames[k, f]."""
    K, F = frames.shape
    seq = torch.full((K, F + max(delays) + 1), special, dtype=torch.long)
    for k in range(K):
        seq[k, 1 + delays[k]: 1 + delays[k] + F] = frames[k]
    return seq


def decode_codes(model, codes):
    """codes [K, T] -> audio [channels, samples]; stereo decodes even rows (left) and odd rows (right)."""
    ae = model.audio_encoder
    if model.config.decoder.audio_channels == 1:
        return ae.decode(codes[None, None], audio_scales=[None]).audio_values[0]
    left = ae.decode(codes[None, None, ::2], audio_scales=[None]).audio_values
    right = ae.decode(codes[None, None, 1::2], audio_scales=[None]).audio_values
    return torch.cat([left, right], dim=1)[0]


def guided_logits(model, t5_hidden, seq, g):
    """Guided logits [K, S, card] of a teacher-forced decoder input [K, S]. cond and uncond run as one batch of
    two, the form generate uses: same numbers as two passes, and faster (tiny model, 50 frames, forward +
    backward: 5.4 ms against 8.2 ms). The null condition is zero states with a zero mask (HF's CFG)."""
    K, S = seq.shape
    mask = torch.ones(t5_hidden.shape[:2], dtype=torch.long)
    logits = model(
        encoder_outputs=(torch.cat([t5_hidden, torch.zeros_like(t5_hidden)]),),
        attention_mask=torch.cat([mask, torch.zeros_like(mask)]),
        decoder_input_ids=seq.repeat(2, 1),
    ).logits  # [2K, S, card]: rows < K conditional
    cond, uncond = logits[:K], logits[K:]
    return uncond + g * (cond - uncond)


def f_generation_lm(model, t5_hidden, frames, g, window, card):
    """sum over windows of the guided logits at the S-1 sampling steps, / (K * card * T)."""
    K, T = frames.shape
    delays = delays_of(model)
    total = 0.0
    for start in range(0, T, window):
        seq = delay_sequence(frames[:, start: start + window], delays, card)
        # causal decoder: feeding seq[:, :S-1] gives the same logits at those positions as the full sequence
        total = total + guided_logits(model, t5_hidden, seq[:, :-1], g).sum()
    return total / (K * card * T)


def audio_nll(model, t5_hidden, frames, window, card):
    """Teacher-forced NLL, conditional, no guidance: f = mean_k sum_w (T_w / T) mean_{real p} nll[k, p]."""
    K, T = frames.shape
    delays = delays_of(model)
    mask = torch.ones(t5_hidden.shape[:2], dtype=torch.long)
    per_codebook = torch.zeros(K)
    for start in range(0, T, window):
        fw = frames[:, start: start + window]
        seq = delay_sequence(fw, delays, card)
        inp, target = seq[:, :-1], seq[:, 1:]
        logits = model(encoder_outputs=(t5_hidden,), attention_mask=mask, decoder_input_ids=inp).logits
        logp = torch.log_softmax(logits.reshape(K, inp.shape[1], card), dim=-1)
        real = target != card  # exactly the window's frames, T_w per codebook
        nll = -logp.gather(-1, target.clamp(max=card - 1)[..., None])[..., 0]
        per_codebook = per_codebook + (fw.shape[1] / T) * (nll * real).sum(1) / real.sum(1)
    return per_codebook.mean()


# ----------------------------------------------------------------------------------------------------------


def differentiated(model):
    """The parameters the objectives differentiate, by group. Only these keep requires_grad: the frozen T5 (and
    encoder / quantizer) then builds no graph."""
    named = list(model.named_parameters())
    params = {
        "lm": [(n, p) for n, p in named if n.startswith(LM_PREFIXES)],
        "codec_decoder": [(n, p) for n, p in named if n.startswith(CODEC_PREFIXES)],
    }
    wanted = {id(p) for group in params.values() for _, p in group}
    for p in model.parameters():
        p.requires_grad_(id(p) in wanted)
    return params


class Peer:
    def __init__(self, model_dir):
        # transformers' default attention: sdpa for the decoder and T5 (EnCodec has none), the setting
        # scripts/make_fixtures.py computes its references with (eager agrees within 1e-5). Asking for "sdpa"
        # explicitly fails: it is applied to EnCodec too, which refuses it.
        self.model = MusicgenForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
        cfg = self.model.config.decoder
        self.K, self.card = cfg.num_codebooks, cfg.vocab_size  # the special (start / pad) token is id `card`
        self.delays = delays_of(self.model)
        self.params = differentiated(self.model)
        self.model64 = None  # (model, params) in float64, made on first use
        self.slots = {}

    # -- helpers ------------------------------------------------------------------------------------------

    def t5(self, req):
        ids = torch.tensor([req["input_ids"]], dtype=torch.long)
        with torch.no_grad():
            return self.model.text_encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state

    def codes(self, req):
        c = torch.tensor(req["codes"], dtype=torch.long)
        if c.dim() != 2 or c.shape[0] != self.K or c.shape[1] == 0:
            raise ValueError(f"codes must be [K={self.K}][T>0], got shape {list(c.shape)}")
        if int(c.min()) < 0 or int(c.max()) >= self.card:
            raise ValueError(f"codes must lie in 0..{self.card - 1}")
        return c

    def variant(self, req):
        """(model, params) in the request's dtype: float32 (timed), or float64, the reference both sides'
        float32 results are checked against (float32 rounding differs between implementations: in the codec
        decoder's backward PyTorch's own float32 strays from its float64 by 1e-3 at 10 s of musicgen-small)."""
        dtype = req.get("dtype", "float32")
        if dtype == "float32":
            return self.model, self.params
        if dtype != "float64":
            raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
        if self.model64 is None:
            model = copy.deepcopy(self.model).double()
            self.model64 = (model, differentiated(model))
        return self.model64

    def _grad(self, f, group, params_of=None):
        names, params = zip(*(params_of or self.params)[group])
        # materialize_grads: a parameter outside the graph gets zeros, not None
        return dict(zip(names, torch.autograd.grad(f, params, allow_unused=True, materialize_grads=True)))

    # -- tasks --------------------------------------------------------------------------------------------

    def info(self, req):
        return {
            "seconds": 0.0,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "threads": torch.get_num_threads(),
            "attention": self.model.decoder.config._attn_implementation,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "parameters": {k: sum(p.numel() for _, p in v) for k, v in self.params.items()},
        }

    def generate(self, req):
        frames = int(req["frames"])
        ids = torch.tensor([req["input_ids"]], dtype=torch.long)
        ae = self.model.audio_encoder
        captured = []
        orig_decode = ae.decode

        # generate undoes the delay pattern and hands the frames to EnCodec: catching them there is the only
        # place they exist without the pattern (stereo: one call per channel, left first)
        def capture(audio_codes, *a, **kw):
            captured.append(audio_codes.clone())
            return orig_decode(audio_codes, *a, **kw)

        ae.decode = capture
        try:
            t0 = time.perf_counter()
            with torch.no_grad():
                self.model.generate(
                    input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    guidance_scale=float(req["guidance_scale"]), max_new_tokens=frames + max(self.delays),
                )
            seconds = time.perf_counter() - t0
        finally:
            del ae.decode
        if self.model.config.decoder.audio_channels == 1:
            codes = captured[0][0, 0]
        else:
            codes = torch.empty((self.K, captured[0].shape[-1]), dtype=torch.long)
            codes[0::2], codes[1::2] = captured[0][0, 0], captured[1][0, 0]
        if tuple(codes.shape) != (self.K, frames):
            raise RuntimeError(f"generate produced codes of shape {list(codes.shape)}, expected [{self.K}, {frames}]")
        return {"seconds": seconds, "codes": codes.tolist()}

    def logits(self, req):
        t5_hidden, codes = self.t5(req), self.codes(req)
        t0 = time.perf_counter()
        with torch.no_grad():
            guided = guided_logits(self.model, t5_hidden, delay_sequence(codes, self.delays, self.card),
                                   float(req["guidance_scale"]))
        seconds = time.perf_counter() - t0
        save_file({"guided": guided.contiguous()}, req["out"])
        return {"seconds": seconds}

    def grad(self, req):
        objective, window, keep = req["objective"], int(req["window"]), req.get("keep")
        if objective not in ("audio-nll", "generation"):
            raise ValueError(f"unknown objective {objective!r}")
        if window <= 0:
            raise ValueError("window must be positive")
        codes = self.codes(req)
        model, params = self.variant(req)
        # frozen text encoder (float32, as on our side): not part of the gradient, so not timed
        t5_hidden = self.t5(req).to(next(model.parameters()).dtype)

        t0 = time.perf_counter()
        f_codec = None
        if objective == "audio-nll":
            f_lm = audio_nll(model, t5_hidden, codes, window, self.card)
        else:
            f_lm = f_generation_lm(model, t5_hidden, codes, float(req["guidance_scale"]), window, self.card)
        grads = self._grad(f_lm, "lm", params)
        if objective == "generation":
            # second backward pass, as make_fixtures: the codec objective shares no graph with the LM one
            f_codec = decode_codes(model, codes).mean()
            grads.update(self._grad(f_codec, "codec_decoder", params))
        # per-tensor f64 sums of squares: no f64 copy of the whole gradient
        sq = sum(float(torch.linalg.vector_norm(g, dtype=torch.float64)) ** 2 for g in grads.values())
        seconds = time.perf_counter() - t0

        # one flat vector in model.named_parameters() order (for the LM + codec gradient: codec rows first)
        names = [n for n, _ in model.named_parameters() if n in grads]
        count = sum(grads[n].numel() for n in names)
        if keep is not None:
            flat = torch.empty(count, dtype=torch.float32)
            at = 0
            for n in names:
                g = grads[n].reshape(-1)
                flat[at: at + g.numel()] = g
                at += g.numel()
            self.slots[int(keep)] = flat
        return {
            "seconds": seconds,
            "f_lm": float(f_lm.detach()),
            "f_codec": None if f_codec is None else float(f_codec.detach()),
            "norm": math.sqrt(sq),
            "parameters": count,
        }

    def gram(self, req):
        slots = [int(s) for s in req["slots"]]
        missing = [s for s in slots if s not in self.slots]
        if missing:
            raise KeyError(f"no gradient kept in slot(s) {missing}")
        vecs = [self.slots[s] for s in slots]
        if len({v.numel() for v in vecs}) > 1:
            raise ValueError("kept gradients differ in length (different objectives?)")
        n = len(vecs)
        gram = [[0.0] * n for _ in range(n)]
        chunk = 1 << 22  # f64 dot products chunk by chunk: bounded extra memory whatever the model size
        for i in range(n):
            for j in range(i, n):
                acc = 0.0
                for at in range(0, vecs[i].numel(), chunk):
                    acc += float(torch.dot(vecs[i][at: at + chunk].double(), vecs[j][at: at + chunk].double()))
                gram[i][j] = gram[j][i] = acc
        return {"seconds": 0.0, "gram": gram}

    def clear(self, req):
        """Drops the kept gradients and the float64 model: the next figure's timed runs start with the memory
        they had before this one's checks (at 10 s of musicgen-small, both sides together otherwise exceeded
        24 GB)."""
        self.slots.clear()
        self.model64 = None
        gc.collect()
        return {"seconds": 0.0}

    def project(self, req):
        """TRAK's BasicProjector (trak/projectors.py, traker 0.3.2), the projector TRAKer uses on device="cpu".
        TRAKer builds it there with proj_type=normal (Gaussian: its CPU bernoulli_ has no float16), so normal is
        the default; "proj_type": "rademacher" gives bernoulli_(0.5) * 2 - 1, TRAKer's choice on a GPU. The
        [d, block] matrix is generated block by block of output columns, block i from a torch.Generator seeded
        seed + 1000 * i (model_id 0), and multiplied in. dtype float32 (BasicProjector's own default) rather
        than TRAKer's float16: f16 matmul on CPU is emulated and would not compare fairly. TRAK scales by
        nothing, so E||Px||^2 = k ||x||^2 and `ratio` divides by k."""
        D, k, seed, block = int(req["d"]), int(req["k"]), int(req["seed"]), int(req["block"])
        n = min(D, int(req["d_slice"])) if req.get("d_slice") is not None else D
        block = min(k, block)
        proj_type = req.get("proj_type") or "normal"
        if proj_type not in ("normal", "rademacher"):
            raise ValueError(f"proj_type is normal or rademacher, got {proj_type!r}")
        rademacher = proj_type == "rademacher"
        need = n * block * 4
        avail = _mem_available()
        if avail is not None and need > 0.8 * avail:
            raise MemoryError(f"one [{n}, {block}] f32 block needs {need / 2**30:.1f} GiB, "
                              f"{avail / 2**30:.1f} GiB available: pass a smaller d_slice or block")
        x = torch.randn((1, n), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float32)

        t0 = time.perf_counter()
        gen = torch.Generator()
        proj = torch.empty((n, block), dtype=torch.float32)
        sketch = torch.zeros((1, k), dtype=torch.float32)
        for ind in range(math.ceil(k / block)):
            gen.manual_seed(seed + 1000 * ind)
            if rademacher:
                proj.bernoulli_(p=0.5, generator=gen)
                proj *= 2.0
                proj -= 1.0
            else:
                proj.normal_(generator=gen)
            st, ed = ind * block, min((ind + 1) * block, k)
            sketch[:, st:ed] = x @ proj[:, : ed - st]
        seconds = time.perf_counter() - t0

        ratio = float(sketch.double().square().sum() / (k * x.double().square().sum()))
        out = {"ratio": ratio, "proj_type": proj_type}
        if n < D:
            out.update(seconds_slice=seconds, seconds=seconds * D / n, extrapolated=True)
        else:
            out.update(seconds=seconds, extrapolated=False)
        return out

    def score(self, req):
        t = load_file(req["training"])
        phi, g, lam = t["phi"], t["g"], float(req["lambda"])
        if phi.dim() != 2 or g.dim() != 2 or phi.shape[1] != g.shape[1]:
            raise ValueError(f"phi [n,k] and g [m,k] expected, got {list(phi.shape)} and {list(g.shape)}")
        n, k = phi.shape

        t0 = time.perf_counter()
        phi, g = phi.to(torch.float64), g.to(torch.float64)
        if n >= k:  # S = G (Phi^T Phi + l I)^-1 Phi^T, a k x k solve
            a = phi.T @ phi
            a.diagonal().add_(lam)
            scores = (phi @ torch.cholesky_solve(g.T, torch.linalg.cholesky(a))).T
            method = "gram"
        else:  # push-through identity: G Phi^T (Phi Phi^T + l I)^-1, an n x n solve
            b = phi @ phi.T
            b.diagonal().add_(lam)
            scores = torch.cholesky_solve(phi @ g.T, torch.linalg.cholesky(b)).T  # B symmetric
            method = "kernel"
        scores = scores.contiguous()
        seconds = time.perf_counter() - t0

        save_file({"scores": scores}, req["out"])
        return {"seconds": seconds, "method": method}


def _mem_available():
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None


def reply(obj):
    try:
        text = json.dumps(obj, allow_nan=False)
    except ValueError as e:  # NaN / inf is not JSON: say so rather than send what the reader cannot parse
        text = json.dumps({"error": f"non-finite value in response: {e}"})
    _REPLY.write(text + "\n")
    _REPLY.flush()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="MusicGen directory (transformers layout)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    peer = Peer(args.model)
    print(f"peer: {args.model} loaded, {args.threads} thread(s)", file=sys.stderr, flush=True)
    tasks = {t: getattr(peer, t) for t in ("info", "generate", "logits", "grad", "gram", "clear", "project", "score")}

    while True:
        line = sys.stdin.readline()
        if not line:
            return 0
        if not line.strip():
            continue  # a blank line is no request
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("a request is a JSON object")
            task = tasks.get(req.get("task"))
            if task is None:
                raise ValueError(f"unknown task {req.get('task')!r}")
            reply(task(req))
        except Exception as e:  # noqa: BLE001 -- any failure is the request's, the peer serves on
            reply({"error": f"{type(e).__name__}: {e}"})


if __name__ == "__main__":
    sys.exit(main())
