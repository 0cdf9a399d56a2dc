//! Models built with `tch` from a [`ModelSpec`].
//!
//! Parameter names are stable and part of the update format:
//!
//! - MLP: `hidden.{i}.weight` `[out, in]` and `hidden.{i}.bias` `[out]` for each hidden layer
//!   `i` from 0, then `head.weight` and `head.bias`;
//! - CNN: `conv.{i}.weight` `[out, in, 3, 3]` and `conv.{i}.bias` for each conv block, then
//!   `head.weight` and `head.bias`.
//!
//! The model's parameter order is the order above. A parameter is local when its name starts
//! with one of the spec's `local` prefixes at a `.` boundary (`head` matches `head.weight`, not
//! `header.weight`); local parameters train like the others but are left out of
//! [`Model::shared_weights`], so they never leave the store.
//!
//! Initialisation follows PyTorch's `nn.Linear`/`nn.Conv2d` defaults (uniform in
//! `+-1/sqrt(fan_in)`), drawn from libtorch's generator: call `tch::manual_seed` first for a
//! repeatable model.

use tch::{Device, Kind, Tensor, nn};

use crate::task::{Activation, DeviceChoice, ModelSpec, Objective};
use crate::weights::{NamedTensor, Weights};

/// A model could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The spec has a zero or missing size.
    #[error("model spec: {0}")]
    Spec(String),
    /// Loaded weights lack a shared parameter.
    #[error("weights lack parameter {0:?}")]
    MissingParameter(String),
    /// Loaded weights have a parameter the model does not.
    #[error("weights have unknown parameter {0:?}")]
    UnknownParameter(String),
    /// A loaded parameter has the wrong shape.
    #[error("parameter {name:?}: shape {actual:?}, model expects {expected:?}")]
    Shape {
        /// The parameter.
        name: String,
        /// The model's shape.
        expected: Vec<i64>,
        /// The loaded shape.
        actual: Vec<usize>,
    },
    /// The task asks for CUDA and there is none.
    #[error("the task asks for cuda but libtorch sees no cuda device")]
    NoCuda,
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Numeric precision of the forward pass. Parameters always stay float32 (the master copy);
/// in bf16 each layer casts its weights and inputs and returns float32 outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// float32 throughout.
    F32,
    /// bfloat16 matrix products with float32 parameters and loss.
    Bf16,
}

/// Picks the device and precision for a [`DeviceChoice`]: CUDA when asked or, for `auto`, when
/// present; bf16 on CUDA when a bf16 product works there.
///
/// # Errors
/// [`ModelError::NoCuda`] when CUDA is asked for and libtorch sees no CUDA device.
pub fn pick_device(choice: DeviceChoice) -> Result<(Device, Precision), ModelError> {
    let device = match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda if !tch::Cuda::is_available() => return Err(ModelError::NoCuda),
        DeviceChoice::Cuda => Device::Cuda(0),
        DeviceChoice::Auto => Device::cuda_if_available(),
    };
    if !device.is_cuda() {
        return Ok((device, Precision::F32));
    }
    let bf16_works = Tensor::f_ones([8, 8], (Kind::BFloat16, device))
        .and_then(|t| t.f_matmul(&t))
        .is_ok();
    Ok((
        device,
        if bf16_works {
            Precision::Bf16
        } else {
            Precision::F32
        },
    ))
}

/// One trainable parameter.
#[derive(Debug)]
pub struct Parameter {
    /// Its stable name.
    pub name: String,
    /// The variable (float32, requires grad).
    pub tensor: Tensor,
    /// Whether it stays in the store.
    pub local: bool,
}

/// The layers' activations a DP-SGD step needs: for each linear layer, its input and its
/// pre-activation output.
pub struct LinearTrace {
    /// The layer's input, `[batch, in]`.
    pub input: Tensor,
    /// The layer's output before the activation, `[batch, out]`.
    pub output: Tensor,
}

/// A model: its variables, in the documented order, and how to run them.
pub struct Model {
    // Owns the variables; `params` hold shallow handles to the same storage.
    vs: nn::VarStore,
    params: Vec<Parameter>,
    arch: Architecture,
    objective: Objective,
    precision: Precision,
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        f.debug_struct("Model")
            .field("params", &names)
            .field("precision", &self.precision)
            .finish()
    }
}

enum Architecture {
    Mlp { activation: Activation },
    Cnn { input: [usize; 3], blocks: usize },
}

impl Model {
    /// Builds a freshly initialised model on `device`.
    ///
    /// # Errors
    /// [`ModelError::Spec`] when a size is zero.
    pub fn new(spec: &ModelSpec, device: Device, precision: Precision) -> Result<Self, ModelError> {
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let mut params = Vec::new();
        let mut add_layer = |path: nn::Path<'_>, weight: Vec<i64>, fan_in: i64| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            let init = nn::Init::Uniform {
                lo: -bound,
                up: bound,
            };
            let out = weight[0];
            let w = path.var("weight", &weight, init);
            let b = path.var("bias", &[out], init);
            let prefix = path.components().collect::<Vec<_>>().join(".");
            params.push((format!("{prefix}.weight"), w));
            params.push((format!("{prefix}.bias"), b));
        };

        let arch = match spec {
            ModelSpec::Mlp {
                inputs,
                hidden,
                outputs,
                activation,
                ..
            } => {
                let sizes: Vec<usize> = std::iter::once(*inputs)
                    .chain(hidden.iter().copied())
                    .collect();
                if sizes.contains(&0) || *outputs == 0 {
                    return Err(ModelError::Spec("mlp layer sizes must be positive".into()));
                }
                for (i, pair) in sizes.windows(2).enumerate() {
                    let (fan_in, out) = (pair[0] as i64, pair[1] as i64);
                    add_layer(&root / "hidden" / i, vec![out, fan_in], fan_in);
                }
                let last = *sizes.last().unwrap_or(inputs) as i64;
                add_layer(&root / "head", vec![*outputs as i64, last], last);
                Architecture::Mlp {
                    activation: *activation,
                }
            }
            ModelSpec::Cnn {
                input,
                channels,
                classes,
                ..
            } => {
                if input.contains(&0) || channels.contains(&0) || *classes == 0 {
                    return Err(ModelError::Spec("cnn sizes must be positive".into()));
                }
                let (mut c, mut h, mut w) = (input[0] as i64, input[1] as i64, input[2] as i64);
                for (i, &out) in channels.iter().enumerate() {
                    let fan_in = c * 9;
                    add_layer(&root / "conv" / i, vec![out as i64, c, 3, 3], fan_in);
                    (c, h, w) = (out as i64, h / 2, w / 2);
                }
                if h == 0 || w == 0 {
                    return Err(ModelError::Spec(
                        "cnn input too small for its blocks".into(),
                    ));
                }
                add_layer(&root / "head", vec![*classes as i64, c * h * w], c * h * w);
                Architecture::Cnn {
                    input: *input,
                    blocks: channels.len(),
                }
            }
        };

        let local = spec.local();
        let params = params
            .into_iter()
            .map(|(name, tensor)| {
                let local = local.iter().any(|p| {
                    name == *p
                        || name
                            .strip_prefix(p.as_str())
                            .is_some_and(|r| r.starts_with('.'))
                });
                Parameter {
                    name,
                    tensor,
                    local,
                }
            })
            .collect();
        Ok(Model {
            vs,
            params,
            arch,
            objective: spec.objective(),
            precision,
        })
    }

    /// The parameters in the documented order.
    pub fn parameters(&self) -> &[Parameter] {
        &self.params
    }

    /// The variable store, for building optimisers over every parameter.
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    /// The device the variables live on.
    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The forward precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// What the outputs mean.
    pub fn objective(&self) -> Objective {
        self.objective
    }

    /// Sets every bias of the output layer (`head.bias`) to `value`: a regression model then
    /// starts by predicting `value`.
    pub fn start_output_at(&mut self, value: f64) {
        for p in self.params.iter_mut().filter(|p| p.name == "head.bias") {
            let mut target = p.tensor.shallow_clone();
            tch::no_grad(|| {
                let _ = target.fill_(value);
            });
        }
    }

    /// Whether [`Model::forward_traced`] applies (an MLP), so DP-SGD can use the fast path.
    pub fn is_mlp(&self) -> bool {
        matches!(self.arch, Architecture::Mlp { .. })
    }

    /// The model's outputs for a batch, float32 `[batch, outputs]`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self.arch {
            Architecture::Mlp { .. } => self.forward_traced(x).0,
            Architecture::Cnn { input, blocks } => {
                let [c, h, w] = input.map(|v| v as i64);
                let mut a = x.reshape([-1, c, h, w]);
                for i in 0..blocks {
                    let (weight, bias) =
                        (&self.params[2 * i].tensor, &self.params[2 * i + 1].tensor);
                    a = self
                        .cast(&a)
                        .conv2d(
                            &self.cast(weight),
                            Some(&self.cast(bias)),
                            [1, 1],
                            [1, 1],
                            [1, 1],
                            1,
                        )
                        .relu()
                        .max_pool2d_default(2);
                }
                let (weight, bias) = (
                    &self.params[2 * blocks].tensor,
                    &self.params[2 * blocks + 1].tensor,
                );
                self.linear(&a.flatten(1, -1), weight, bias)
                    .to_kind(Kind::Float)
            }
        }
    }

    /// An MLP's outputs together with each linear layer's input and pre-activation output.
    /// For a CNN it returns the outputs and no trace.
    pub fn forward_traced(&self, x: &Tensor) -> (Tensor, Vec<LinearTrace>) {
        let Architecture::Mlp { activation } = self.arch else {
            return (self.forward(x), Vec::new());
        };
        let layers = self.params.len() / 2;
        let mut trace = Vec::with_capacity(layers);
        let mut a = x.shallow_clone();
        for i in 0..layers {
            let z = self.linear(
                &a,
                &self.params[2 * i].tensor,
                &self.params[2 * i + 1].tensor,
            );
            let next = if i + 1 < layers {
                match activation {
                    Activation::Relu => z.relu(),
                    Activation::Tanh => z.tanh(),
                    Activation::Silu => z.silu(),
                }
            } else {
                z.to_kind(Kind::Float)
            };
            trace.push(LinearTrace {
                input: a,
                output: z,
            });
            a = next;
        }
        (a, trace)
    }

    fn cast(&self, t: &Tensor) -> Tensor {
        match self.precision {
            Precision::F32 => t.shallow_clone(),
            Precision::Bf16 => t.to_kind(Kind::BFloat16),
        }
    }

    fn linear(&self, x: &Tensor, weight: &Tensor, bias: &Tensor) -> Tensor {
        self.cast(x)
            .linear(&self.cast(weight), Some(&self.cast(bias)))
    }

    /// Every parameter, local ones included (for the store's own checkpoint).
    pub fn weights(&self) -> Weights {
        self.export(|_| true)
    }

    /// The shared parameters only: what may leave the store.
    pub fn shared_weights(&self) -> Weights {
        self.export(|p| !p.local)
    }

    fn export(&self, keep: impl Fn(&Parameter) -> bool) -> Weights {
        let tensors = self
            .params
            .iter()
            .filter(|p| keep(p))
            .map(|p| {
                let t = p
                    .tensor
                    .detach()
                    .to_device(Device::Cpu)
                    .to_kind(Kind::Float)
                    .contiguous();
                let shape = t.size().iter().map(|&d| d as usize).collect();
                let values = Vec::<f32>::try_from(&t.flatten(0, -1)).unwrap_or_default();
                NamedTensor {
                    name: p.name.clone(),
                    shape,
                    values,
                }
            })
            .collect();
        Weights { tensors }
    }

    /// Loads `weights` by name. Every shared parameter must be present; local parameters keep
    /// their current values when absent (global weights carry none).
    ///
    /// # Errors
    /// [`ModelError`] when a shared parameter is missing, a name is unknown or a shape differs.
    pub fn load(&mut self, weights: &Weights) -> Result<(), ModelError> {
        if let Some(unknown) = weights
            .names()
            .find(|n| !self.params.iter().any(|p| p.name == *n))
        {
            return Err(ModelError::UnknownParameter(unknown.to_string()));
        }
        for p in &self.params {
            let Some(loaded) = weights.get(&p.name) else {
                if p.local {
                    continue;
                }
                return Err(ModelError::MissingParameter(p.name.clone()));
            };
            let expected = p.tensor.size();
            let numel: usize = loaded.shape.iter().product();
            if loaded
                .shape
                .iter()
                .map(|&d| d as i64)
                .ne(expected.iter().copied())
                || numel != loaded.values.len()
            {
                return Err(ModelError::Shape {
                    name: p.name.clone(),
                    expected,
                    actual: loaded.shape.clone(),
                });
            }
            let value = Tensor::from_slice(&loaded.values)
                .reshape(&expected)
                .to_device(self.device());
            let mut target = p.tensor.shallow_clone();
            tch::no_grad(|| target.f_copy_(&value))?;
        }
        Ok(())
    }
}
