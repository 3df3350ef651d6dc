//! The LSTM of EnCodec's SEANet, with its recurrence as one Candle op that carries a
//! hand-written backward pass (backpropagation through time).
//!
//! Why not Candle's autograd over the time steps: every step's `h·W_hhᵀ` then
//! contributes its own `[4H, H]` weight gradient, and Candle's backward keeps each
//! of them — and the graph of its running sum — alive until it returns. For the
//! 1024-wide, 2-layer LSTM of `facebook/encodec_32khz` over 500 frames (10 s) that
//! was 16 GB. Here the backward keeps the hidden states, cell states and gates
//! (`[T, B, 6H]`, 12 MB in that case) and forms `∇W_hh = Σ_t ∂gates_tᵀ · h_{t−1}` as one matmul at the end.
//!
//! The op's inputs are the input projections `X·W_ihᵀ + b_ih + b_hh` (ordinary ops,
//! which Candle differentiates) and `W_hh`; its output is every hidden state.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

use super::ops::{cpu_storage, cpu_tensor, linear, sigmoid};

/// A single-layer LSTM over `[T, B, I]` input with PyTorch weights (`weight_ih [4H, I]`,
/// `weight_hh [4H, H]`, biases `[4H]`, gate order i, f, g, o), zero initial state.
/// Returns every hidden state, `[T, B, H]`. Differentiable with respect to all inputs.
pub fn lstm_layer(
    x: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    b_ih: Option<&Tensor>,
    b_hh: Option<&Tensor>,
) -> Result<Tensor> {
    let xi = input_projections(x, w_ih, b_ih, b_hh)?;
    let (_, _, h4) = xi.dims3()?;
    if w_hh.dims() != [h4, h4 / 4] || h4 % 4 != 0 {
        candle_core::bail!("lstm: weight_hh is {:?}, expected [{h4}, {}]", w_hh.dims(), h4 / 4);
    }
    xi.contiguous()?.apply_op2(&w_hh.contiguous()?, Recurrence)
}

/// `X·W_ihᵀ + b_ih + b_hh` for all time steps in one matmul.
fn input_projections(x: &Tensor, w_ih: &Tensor, b_ih: Option<&Tensor>, b_hh: Option<&Tensor>) -> Result<Tensor> {
    let xi = linear(x, w_ih, b_ih)?;
    match b_hh {
        Some(bh) => xi.broadcast_add(bh),
        None => Ok(xi),
    }
}

/// What the backward pass needs of a forward run: hidden states, cell states and the
/// activated gates `[i, f, g, o]` of every step.
pub struct Trace {
    /// Every hidden state, `[T, B, H]`: the layer's output.
    pub h: Tensor,
    c: Tensor,
    gates: Tensor,
}

impl Trace {
    pub fn bytes(&self) -> usize {
        [&self.h, &self.c, &self.gates].iter().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
    }
}

/// Runs the recurrence on plain tensors (no graph is recorded for untracked inputs).
/// `xi`: `[T, B, 4H]` input projections with both biases, `w_hh`: `[4H, H]`.
fn run(xi: &Tensor, w_hh: &Tensor, keep_trace: bool) -> Result<Trace> {
    let (t_len, b, h4) = xi.dims3()?;
    let hidden = h4 / 4;
    let w_hh_t = w_hh.t()?;
    let mut h = Tensor::zeros((b, hidden), xi.dtype(), xi.device())?;
    let mut c = h.clone();
    let mut hs = Vec::with_capacity(t_len);
    let mut cs = Vec::with_capacity(if keep_trace { t_len } else { 0 });
    let mut gs = Vec::with_capacity(if keep_trace { t_len } else { 0 });
    for t in 0..t_len {
        let gates = (xi.get(t)? + h.matmul(&w_hh_t)?)?;
        let i = sigmoid(&gates.narrow(1, 0, hidden)?)?;
        let f = sigmoid(&gates.narrow(1, hidden, hidden)?)?;
        let g = gates.narrow(1, 2 * hidden, hidden)?.tanh()?;
        let o = sigmoid(&gates.narrow(1, 3 * hidden, hidden)?)?;
        c = ((&f * &c)? + (&i * &g)?)?;
        h = (&o * c.tanh()?)?;
        hs.push(h.clone());
        if keep_trace {
            cs.push(c.clone());
            gs.push(Tensor::cat(&[i, f, g, o], 1)?);
        }
    }
    let stack = |v: &[Tensor], width: usize| -> Result<Tensor> {
        if v.is_empty() {
            Tensor::zeros((0, b, width), xi.dtype(), xi.device())
        } else {
            Tensor::stack(v, 0)
        }
    };
    // Without a trace, `cs` and `gs` are empty and stack to zero-length tensors.
    Ok(Trace { h: stack(&hs, hidden)?, c: stack(&cs, hidden)?, gates: stack(&gs, h4)? })
}

/// `(xi [T, B, 4H], W_hh [4H, H]) → h [T, B, H]`.
struct Recurrence;

impl CustomOp2 for Recurrence {
    fn name(&self) -> &'static str {
        "lstm-recurrence"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let xi = cpu_tensor(s1, l1)?;
        let w_hh = cpu_tensor(s2, l2)?;
        let h = run(&xi, &w_hh, false)?.h;
        Ok((cpu_storage(&h)?, h.shape().clone()))
    }

    /// Backpropagation through time. Inputs and the incoming gradient are detached, so
    /// nothing here is recorded into a graph and nothing outlives the call but the two
    /// returned gradients.
    fn bwd(&self, xi: &Tensor, w_hh: &Tensor, _h: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (xi, w_hh, dh_all) = (xi.detach(), w_hh.detach(), grad.detach());
        let trace = run(&xi, &w_hh, true)?;
        let (d_xi, d_w_hh) = through_time(&w_hh, &trace, &dh_all)?;
        Ok((Some(d_xi), Some(d_w_hh)))
    }
}

/// Backpropagation through time of the recurrence that left `trace`, given the gradient
/// of every hidden state `dh_all` `[T, B, H]`: the gradients of the input projections
/// `[T, B, 4H]` and of `W_hh`.
fn through_time(w_hh: &Tensor, trace: &Trace, dh_all: &Tensor) -> Result<(Tensor, Tensor)> {
    let Trace { h, c, gates } = trace;
    let (t_len, b, h4) = gates.dims3()?;
    let hidden = h4 / 4;
    if t_len == 0 {
        return Ok((gates.zeros_like()?, w_hh.zeros_like()?));
    }
    let zero = Tensor::zeros((b, hidden), gates.dtype(), gates.device())?;
    let mut dh_next = zero.clone();
    let mut dc_next = zero.clone();
    let mut d_gates = Vec::with_capacity(t_len);
    for t in (0..t_len).rev() {
        let gt = gates.get(t)?;
        let i = gt.narrow(1, 0, hidden)?;
        let f = gt.narrow(1, hidden, hidden)?;
        let g = gt.narrow(1, 2 * hidden, hidden)?;
        let o = gt.narrow(1, 3 * hidden, hidden)?;
        let c_prev = if t > 0 { c.get(t - 1)? } else { zero.clone() };
        let tanh_c = c.get(t)?.tanh()?;
        let dh = (dh_all.get(t)? + &dh_next)?;
        // h = o·tanh(c);  c = f·c_prev + i·g
        let d_o = (&dh * &tanh_c)?;
        let dc = (&dc_next + ((&dh * &o)? * tanh_c.sqr()?.affine(-1.0, 1.0)?)?)?;
        let di = (&dc * &g)?;
        let dg = (&dc * &i)?;
        let df = (&dc * &c_prev)?;
        dc_next = (&dc * &f)?;
        // Through the activations: σ' = σ(1 − σ), tanh' = 1 − tanh².
        let sig_grad = |d: &Tensor, s: &Tensor| -> Result<Tensor> { d * (s * s.affine(-1.0, 1.0)?)? };
        let da = Tensor::cat(
            &[sig_grad(&di, &i)?, sig_grad(&df, &f)?, (dg * g.sqr()?.affine(-1.0, 1.0)?)?, sig_grad(&d_o, &o)?],
            1,
        )?;
        dh_next = da.matmul(w_hh)?;
        d_gates.push(da);
    }
    d_gates.reverse();
    let d_xi = Tensor::stack(&d_gates, 0)?; // [T, B, 4H]
    drop(d_gates);
    // h_{t−1} for every step: zeros, then h_0 .. h_{T−2}.
    let h_prev = Tensor::cat(&[zero.unsqueeze(0)?, h.narrow(0, 0, t_len - 1)?], 0)?;
    let d_w_hh = d_xi.reshape((t_len * b, h4))?.t()?.matmul(&h_prev.reshape((t_len * b, hidden))?)?;
    Ok((d_xi, d_w_hh))
}

/// A layer's forward pass that keeps what [`lstm_layer_backward`] needs: the same numbers
/// as [`lstm_layer`] (`trace.h`), on untracked tensors.
pub fn lstm_layer_traced(
    x: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    b_ih: Option<&Tensor>,
    b_hh: Option<&Tensor>,
) -> Result<Trace> {
    run(&input_projections(x, w_ih, b_ih, b_hh)?.contiguous()?, w_hh, true)
}

/// What [`lstm_layer_backward`] gives.
pub struct LstmGradients {
    /// `[T, B, I]`.
    pub input: Tensor,
    pub w_ih: Tensor,
    pub w_hh: Tensor,
    /// The gradient of either bias (both are added to the same sum).
    pub bias: Tensor,
}

/// The layer's backward pass by hand, from its input `x` `[T, B, I]`, the trace of its
/// forward pass and the gradient of every hidden state `dh` `[T, B, H]`.
pub fn lstm_layer_backward(
    x: &Tensor,
    w_ih: &Tensor,
    w_hh: &Tensor,
    trace: &Trace,
    dh: &Tensor,
) -> Result<LstmGradients> {
    let (t_len, b, input) = x.dims3()?;
    let (d_xi, w_hh_grad) = through_time(w_hh, trace, dh)?;
    let rows = d_xi.reshape((t_len * b, w_ih.dim(0)?))?;
    Ok(LstmGradients {
        input: rows.matmul(w_ih)?.reshape((t_len, b, input))?,
        w_ih: rows.t()?.matmul(&x.reshape((t_len * b, input))?)?,
        w_hh: w_hh_grad,
        bias: rows.sum(0)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let data = crate::rng::symmetric_uniforms(seed, shape.iter().product());
        Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
    }

    /// The recurrence written out with Candle's own differentiable ops, step by step:
    /// an independent reference for both the values and (through Candle's autograd)
    /// the gradients.
    fn reference(x: &Tensor, w_ih: &Tensor, w_hh: &Tensor, b_ih: &Tensor, b_hh: &Tensor) -> Tensor {
        let (t_len, b, _) = x.dims3().unwrap();
        let hidden = w_hh.dim(1).unwrap();
        let logistic = |v: Tensor| (v.neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap();
        let mut h = Tensor::zeros((b, hidden), DType::F64, &Device::Cpu).unwrap();
        let mut c = h.clone();
        let mut outs = Vec::new();
        for t in 0..t_len {
            let gates = (x.get(t).unwrap().matmul(&w_ih.t().unwrap()).unwrap() + h.matmul(&w_hh.t().unwrap()).unwrap())
                .unwrap()
                .broadcast_add(&(b_ih + b_hh).unwrap())
                .unwrap();
            let part = |k: usize| gates.narrow(1, k * hidden, hidden).unwrap();
            let (i, f, g, o) = (logistic(part(0)), logistic(part(1)), part(2).tanh().unwrap(), logistic(part(3)));
            c = ((f * &c).unwrap() + (i * g).unwrap()).unwrap();
            h = (o * c.tanh().unwrap()).unwrap();
            outs.push(h.clone());
        }
        Tensor::stack(&outs, 0).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    #[test]
    fn values_and_gradients_match_step_by_step_autograd() {
        for &(t_len, b, input, hidden) in &[(7usize, 1usize, 3usize, 4usize), (5, 2, 4, 3), (1, 1, 2, 2)] {
            let x = Var::from_tensor(&randn(&[t_len, b, input], 1)).unwrap();
            let w_ih = Var::from_tensor(&randn(&[4 * hidden, input], 2)).unwrap();
            let w_hh = Var::from_tensor(&randn(&[4 * hidden, hidden], 3)).unwrap();
            let b_ih = Var::from_tensor(&randn(&[4 * hidden], 4)).unwrap();
            let b_hh = Var::from_tensor(&randn(&[4 * hidden], 5)).unwrap();
            // A weighted sum, so every output element matters differently.
            let weights = randn(&[t_len, b, hidden], 6);
            let ours = lstm_layer(&x, &w_ih, &w_hh, Some(&b_ih), Some(&b_hh)).unwrap();
            let theirs = reference(&x, &w_ih, &w_hh, &b_ih, &b_hh);
            assert!(max_abs_diff(&ours, &theirs) < 1e-12, "values, shape {:?}", (t_len, b, input, hidden));
            let g_ours = (ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let g_theirs = (theirs * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in [("x", &x), ("w_ih", &w_ih), ("w_hh", &w_hh), ("b_ih", &b_ih), ("b_hh", &b_hh)] {
                let a = g_ours.get(var).unwrap_or_else(|| panic!("no gradient for {name}"));
                let e = g_theirs.get(var).unwrap();
                let scale: f64 = e.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap();
                // One step sees only h₋₁ = 0, so ∇W_hh is rightly zero there.
                if t_len > 1 || name != "w_hh" {
                    assert!(scale > 1e-3, "{name}: reference gradient vanishes, the test checks nothing");
                }
                assert!(max_abs_diff(a, e) < 1e-12 * (1.0 + scale), "{name} gradient, shape {:?}", (t_len, b, hidden));
            }
        }
    }

    #[test]
    fn weight_gradient_matches_finite_differences() {
        let (t_len, b, input, hidden) = (6, 2, 3, 3);
        let x = randn(&[t_len, b, input], 11);
        let w_ih = randn(&[4 * hidden, input], 12);
        let w_hh = Var::from_tensor(&randn(&[4 * hidden, hidden], 13)).unwrap();
        let weights = randn(&[t_len, b, hidden], 14);
        let f = |w: &Tensor| -> f64 {
            (lstm_layer(&x, &w_ih, w, None, None).unwrap() * &weights).unwrap().sum_all().unwrap().to_scalar().unwrap()
        };
        let grads = (lstm_layer(&x, &w_ih, &w_hh, None, None).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let grad: Vec<f64> = grads.get(&w_hh).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = w_hh.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        for idx in 0..base.len() {
            let shifted = |d: f64| {
                let mut v = base.clone();
                v[idx] += d;
                Tensor::from_vec(v, w_hh.dims(), &Device::Cpu).unwrap()
            };
            let fd = (f(&shifted(eps)) - f(&shifted(-eps))) / (2.0 * eps);
            assert!((fd - grad[idx]).abs() < 1e-7 * (1.0 + fd.abs()), "w_hh[{idx}]: fd {fd} vs {}", grad[idx]);
        }
    }

    #[test]
    fn backward_holds_no_graph() {
        // The gradients the op hands back are plain values: nothing they reference can
        // keep a forward graph (and its activations) alive.
        let x = Var::from_tensor(&randn(&[4, 1, 2], 21)).unwrap();
        let w_ih = Var::from_tensor(&randn(&[8, 2], 22)).unwrap();
        let w_hh = Var::from_tensor(&randn(&[8, 2], 23)).unwrap();
        let y = lstm_layer(&x, &w_ih, &w_hh, None, None).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        let g = grads.get(&w_hh).unwrap();
        assert!(!g.track_op(), "∇W_hh carries a graph");
    }

    #[test]
    fn runs_in_single_precision_like_double() {
        let x = randn(&[9, 1, 4], 31);
        let w_ih = randn(&[12, 4], 32);
        let w_hh = randn(&[12, 3], 33);
        let y64 = lstm_layer(&x, &w_ih, &w_hh, None, None).unwrap();
        let f32s = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let y32 = lstm_layer(&f32s(&x), &f32s(&w_ih), &f32s(&w_hh), None, None).unwrap();
        assert_eq!(y32.dtype(), DType::F32);
        assert!(max_abs_diff(&y32.to_dtype(DType::F64).unwrap(), &y64) < 1e-6);
    }
}
