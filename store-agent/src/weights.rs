//! Model weights and deltas, exchanged as safetensors.
//!
//! [`Weights`] is an ordered list of named float32 tensors. Its order is the model's parameter
//! order (see [`crate::model`]), which is also the order of [`Weights::flatten`]: the fixed order
//! in which `fedmesh-protocol` sees a delta as one vector. The safetensors form records that
//! order in its metadata under [`ORDER_KEY`], since safetensors itself keeps no order.

use std::collections::HashMap;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

/// Metadata key holding the comma-separated parameter order.
pub const ORDER_KEY: &str = "fedmesh.order";

/// Weights could not be encoded, decoded or combined.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The bytes are not valid safetensors.
    #[error("invalid safetensors: {0}")]
    Format(#[from] safetensors::SafeTensorError),
    /// A tensor is not float32.
    #[error("tensor {name:?}: dtype {dtype:?}, expected F32")]
    Dtype {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
    },
    /// The order metadata names tensors that are not there, or misses some.
    #[error("order metadata does not list the file's tensors (first mismatch {name:?})")]
    Order {
        /// The first name that does not match.
        name: String,
    },
    /// Two weight sets do not have the same names and shapes.
    #[error("tensor {name:?}: {problem}")]
    Mismatch {
        /// The tensor.
        name: String,
        /// What differs.
        problem: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// One named float32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Stable parameter name, e.g. `hidden.0.weight`.
    pub name: String,
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Values, row-major; `len()` is the product of `shape`.
    pub values: Vec<f32>,
}

/// Named tensors in the model's parameter order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Weights {
    /// The tensors.
    pub tensors: Vec<NamedTensor>,
}

impl Weights {
    /// Parameter names, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&NamedTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Total number of values.
    pub fn numel(&self) -> usize {
        self.tensors.iter().map(|t| t.values.len()).sum()
    }

    /// All values, tensor after tensor in order.
    pub fn flatten(&self) -> Vec<f32> {
        self.tensors
            .iter()
            .flat_map(|t| t.values.iter().copied())
            .collect()
    }

    /// `self - base`, tensor by tensor; both must have the same names, order and shapes.
    ///
    /// # Errors
    /// [`WeightsError::Mismatch`] when they differ in names or shapes.
    pub fn delta(&self, base: &Weights) -> Result<Weights, WeightsError> {
        if self.tensors.len() != base.tensors.len() {
            let name = self
                .names()
                .find(|n| base.get(n).is_none())
                .unwrap_or_default();
            return Err(WeightsError::Mismatch {
                name: name.to_string(),
                problem: format!(
                    "{} tensors against {}",
                    self.tensors.len(),
                    base.tensors.len()
                ),
            });
        }
        let tensors = self
            .tensors
            .iter()
            .zip(&base.tensors)
            .map(|(a, b)| {
                if a.name != b.name || a.shape != b.shape {
                    return Err(WeightsError::Mismatch {
                        name: a.name.clone(),
                        problem: format!(
                            "{:?} {:?} against {:?} {:?}",
                            a.name, a.shape, b.name, b.shape
                        ),
                    });
                }
                let values = a.values.iter().zip(&b.values).map(|(x, y)| x - y).collect();
                Ok(NamedTensor {
                    name: a.name.clone(),
                    shape: a.shape.clone(),
                    values,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Weights { tensors })
    }

    /// Encodes as safetensors bytes, with the order in the metadata.
    ///
    /// # Errors
    /// [`WeightsError::Format`] when a tensor's values do not match its shape.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, WeightsError> {
        let bytes: Vec<Vec<u8>> = self
            .tensors
            .iter()
            .map(|t| t.values.iter().flat_map(|v| v.to_le_bytes()).collect())
            .collect();
        let views = self
            .tensors
            .iter()
            .zip(&bytes)
            .map(|(t, b)| {
                Ok((
                    t.name.as_str(),
                    TensorView::new(Dtype::F32, t.shape.clone(), b)?,
                ))
            })
            .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
        let order = self.names().collect::<Vec<_>>().join(",");
        let metadata = Some(HashMap::from([(ORDER_KEY.to_string(), order)]));
        Ok(safetensors::serialize(views, &metadata)?)
    }

    /// Decodes safetensors bytes (attacker input: every problem is an error).
    ///
    /// Without order metadata, tensors come in name order.
    ///
    /// # Errors
    /// [`WeightsError`] when the bytes are not float32 safetensors with a consistent order.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, WeightsError> {
        let (_, metadata) = SafeTensors::read_metadata(bytes)?;
        let file = SafeTensors::deserialize(bytes)?;
        let mut names: Vec<String> = file.names().into_iter().cloned().collect();
        names.sort();
        let order = metadata.metadata().as_ref().and_then(|m| m.get(ORDER_KEY));
        if let Some(order) = order {
            let listed: Vec<String> = order
                .split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect();
            let mut sorted = listed.clone();
            sorted.sort();
            if sorted != names {
                let name = listed
                    .iter()
                    .zip(&names)
                    .find(|(a, b)| a != b)
                    .map(|(a, _)| a);
                return Err(WeightsError::Order {
                    name: name.cloned().unwrap_or_default(),
                });
            }
            names = listed;
        }

        let tensors = names
            .into_iter()
            .map(|name| {
                let view = file.tensor(&name)?;
                if view.dtype() != Dtype::F32 {
                    return Err(WeightsError::Dtype {
                        name,
                        dtype: format!("{:?}", view.dtype()),
                    });
                }
                let values = view
                    .data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                Ok(NamedTensor {
                    name,
                    shape: view.shape().to_vec(),
                    values,
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Weights { tensors })
    }

    /// Writes a safetensors file.
    ///
    /// # Errors
    /// [`WeightsError`] on encoding or I/O failure.
    pub fn write(&self, path: &Path) -> Result<(), WeightsError> {
        std::fs::write(path, self.to_safetensors()?).map_err(|source| WeightsError::Io {
            path: path.display().to_string(),
            source,
        })
    }

    /// Reads a safetensors file.
    ///
    /// # Errors
    /// [`WeightsError`] on I/O failure or invalid content.
    pub fn read(path: &Path) -> Result<Self, WeightsError> {
        let bytes = std::fs::read(path).map_err(|source| WeightsError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_safetensors(&bytes)
    }
}
