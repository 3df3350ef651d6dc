//! Named model tensors.
//!
//! A [`ParamStore`] owns the tensors of one model part (the LM, or the codec). Model
//! constructors pull tensors out of it through a prefix-scoped [`Vb`]; the first pull
//! of a trainable tensor turns it into a [`Var`] and fixes its place in the parameter
//! order, so the order is the order in which the model is built — stable and documented
//! by the model code itself, independent of how the checkpoint happened to store it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor, Var};

use super::checkpoint::StoredTensor;

struct Inner {
    /// Tensors of the checkpoint, not yet claimed (nor read) by the model.
    unclaimed: HashMap<String, StoredTensor>,
    /// Trainable parameters in model order.
    params: Vec<(String, Var)>,
    index: HashMap<String, usize>,
    /// Non-trainable tensors (codebooks, frozen encoders) already claimed.
    buffers: HashMap<String, Tensor>,
}

/// Creates a tensor for a name and shape: used to build fresh models (the built-in tiny
/// model) through the very constructors that load checkpoints.
pub type Initializer = Arc<dyn Fn(&str, &[usize]) -> Result<Tensor> + Send + Sync>;

/// The tensors of one model part; cheap to clone (shared).
#[derive(Clone)]
pub struct ParamStore {
    inner: Arc<Mutex<Inner>>,
    /// Where the tensors came from, for error messages.
    origin: String,
    device: Device,
    dtype: DType,
    init: Option<Initializer>,
}

impl ParamStore {
    pub fn new(tensors: HashMap<String, Tensor>, origin: impl Into<String>, device: &Device) -> Self {
        let stored = tensors.into_iter().map(|(n, t)| (n, StoredTensor::Memory(t))).collect();
        Self::stored(stored, origin, device)
    }

    /// A store over checkpoint tensors that are read when the model claims them, each
    /// straight into the buffer the model keeps.
    pub fn stored(tensors: HashMap<String, StoredTensor>, origin: impl Into<String>, device: &Device) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                unclaimed: tensors,
                params: Vec::new(),
                index: HashMap::new(),
                buffers: HashMap::new(),
            })),
            origin: origin.into(),
            device: device.clone(),
            dtype: DType::F32,
            init: None,
        }
    }

    /// A store that creates every tensor the model asks for with `init`.
    pub fn initializing(init: Initializer, origin: impl Into<String>, device: &Device) -> Self {
        let mut store = Self::new(HashMap::new(), origin, device);
        store.init = Some(init);
        store
    }

    /// Every tensor, claimed or not (for saving a model whole); unclaimed ones are read.
    pub fn all(&self) -> Result<HashMap<String, Tensor>> {
        let mut out = self.claimed();
        let inner = self.lock();
        for (n, t) in inner.unclaimed.iter() {
            out.insert(n.clone(), t.to_tensor(n)?);
        }
        Ok(out)
    }

    /// Bytes of every tensor the model has claimed (what loading it put in memory).
    pub fn claimed_bytes(&self) -> u64 {
        let inner = self.lock();
        let size = |t: &Tensor| (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        inner.params.iter().map(|(_, v)| size(v.as_tensor())).sum::<u64>()
            + inner.buffers.values().map(size).sum::<u64>()
    }

    /// Every claimed tensor (parameters and buffers) by name.
    pub fn claimed(&self) -> HashMap<String, Tensor> {
        let inner = self.lock();
        let mut out: HashMap<String, Tensor> =
            inner.params.iter().map(|(n, v)| (n.clone(), v.as_tensor().detach())).collect();
        out.extend(inner.buffers.iter().map(|(n, t)| (n.clone(), t.clone())));
        out
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A poisoned lock only means another thread panicked mid-read; the map is intact.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Computes in `dtype` (F32 by default; F64 for finite-difference checks).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// A builder rooted at `prefix`. With `detach`, tensors are handed out without
    /// gradient tracking (for fast inference that builds no autograd graph).
    pub fn vb(&self, detach: bool) -> Vb {
        Vb { store: self.clone(), prefix: String::new(), detach }
    }

    /// Trainable parameters in model order.
    pub fn params(&self) -> Vec<(String, Var)> {
        self.lock().params.clone()
    }

    /// Total number of trainable scalars.
    pub fn num_scalars(&self) -> usize {
        self.lock().params.iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// Names of checkpoint tensors the model never asked for.
    pub fn unclaimed(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().unclaimed.keys().cloned().collect();
        names.sort();
        names
    }

    /// Fails when the checkpoint holds tensors the model does not use (other than those
    /// matching `allowed`): an unsupported variant (e.g. attention biases) must not be
    /// silently half-loaded.
    pub fn ensure_all_claimed(&self, allowed: &[&str]) -> Result<()> {
        let left: Vec<String> =
            self.unclaimed().into_iter().filter(|n| !allowed.iter().any(|a| n.contains(a))).collect();
        if !left.is_empty() {
            let shown: Vec<&str> = left.iter().take(5).map(String::as_str).collect();
            bail!(
                "{}: {} tensor(s) are not used by this model, e.g. {:?}; this checkpoint variant is not supported",
                self.origin,
                left.len(),
                shown
            );
        }
        Ok(())
    }

    /// Replaces the value of every parameter (e.g. after an optimiser step).
    pub fn var(&self, name: &str) -> Option<Var> {
        let inner = self.lock();
        inner.index.get(name).map(|&i| inner.params[i].1.clone())
    }

    fn take(&self, name: &str, shape: &[usize], trainable: bool, detach: bool) -> Result<Tensor> {
        let mut inner = self.lock();
        if let Some(&i) = inner.index.get(name) {
            let t = inner.params[i].1.as_tensor();
            check_shape(&self.origin, name, t.dims(), shape)?;
            return Ok(if detach { t.detach() } else { t.clone() });
        }
        if let Some(t) = inner.buffers.get(name) {
            check_shape(&self.origin, name, t.dims(), shape)?;
            return Ok(t.clone());
        }
        let stored = match (inner.unclaimed.remove(name), &self.init) {
            (Some(t), _) => Some(t),
            (None, Some(init)) => Some(StoredTensor::Memory(init(name, shape)?)),
            (None, None) => None,
        };
        let Some(stored) = stored else {
            bail!(
                "{}: missing tensor `{name}` (expected shape {shape:?}); the checkpoint does not match its config",
                self.origin
            );
        };
        let dims = stored.dims().map_err(|e| anyhow::anyhow!("{}: tensor `{name}`: {e:#}", self.origin))?;
        check_shape(&self.origin, name, &dims, shape)?;
        let on_cpu_f32 = self.device.is_cpu() && self.dtype == DType::F32;
        let value = match stored {
            StoredTensor::Memory(t) => Stored::Tensor(t),
            // Read from the file straight into the buffer the model keeps.
            file if on_cpu_f32 => Stored::Data(file.read_f32(name)?),
            file => Stored::Tensor(Tensor::from_vec(file.read_f32(name)?, shape, &Device::Cpu)?),
        };
        let out = match (value, trainable) {
            (Stored::Data(v), true) => {
                let var = Var::from_vec(v, shape, &self.device)?;
                self.push_param(&mut inner, name, var, detach)
            }
            (Stored::Data(v), false) => Tensor::from_vec(v, shape, &self.device)?,
            (Stored::Tensor(t), true) => {
                let t = t.to_device(&self.device)?.to_dtype(self.dtype)?;
                self.push_param(&mut inner, name, Var::from_tensor(&t)?, detach)
            }
            (Stored::Tensor(t), false) => t.to_device(&self.device)?.to_dtype(self.dtype)?,
        };
        if !trainable {
            inner.buffers.insert(name.to_string(), out.clone());
        }
        Ok(out)
    }

    fn push_param(&self, inner: &mut Inner, name: &str, var: Var, detach: bool) -> Tensor {
        let out = if detach { var.as_tensor().detach() } else { var.as_tensor().clone() };
        let idx = inner.params.len();
        inner.params.push((name.to_string(), var));
        inner.index.insert(name.to_string(), idx);
        out
    }

    fn contains(&self, name: &str) -> bool {
        if self.init.is_some() {
            return true;
        }
        let inner = self.lock();
        inner.unclaimed.contains_key(name) || inner.index.contains_key(name) || inner.buffers.contains_key(name)
    }
}

/// A claimed tensor before it takes its final form.
enum Stored {
    Data(Vec<f32>),
    Tensor(Tensor),
}

fn check_shape(origin: &str, name: &str, dims: &[usize], shape: &[usize]) -> Result<()> {
    if dims != shape {
        bail!("{origin}: tensor `{name}` has shape {dims:?}, the config expects {shape:?}");
    }
    Ok(())
}

/// A prefix-scoped view of a [`ParamStore`], in the spirit of `candle_nn::VarBuilder`.
#[derive(Clone)]
pub struct Vb {
    store: ParamStore,
    prefix: String,
    detach: bool,
}

impl Vb {
    /// Descends into a sub-module.
    pub fn pp(&self, name: impl std::fmt::Display) -> Vb {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{}", self.prefix, name) };
        Vb { store: self.store.clone(), prefix, detach: self.detach }
    }

    fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// A trainable parameter.
    pub fn param(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.store.take(&self.path(name), shape, true, self.detach)
    }

    /// A trainable parameter that a checkpoint may or may not have.
    pub fn param_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            Ok(Some(self.param(name, shape)?))
        } else {
            Ok(None)
        }
    }

    /// A non-trainable tensor (buffers, frozen weights).
    pub fn buffer(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.store.take(&self.path(name), shape, false, true)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.store.contains(&self.path(name))
    }

    pub fn device(&self) -> &Device {
        self.store.device()
    }
}
