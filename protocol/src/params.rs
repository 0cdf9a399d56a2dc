//! A model's parameters as one flat vector, in an order every tier agrees on.
//!
//! # Order
//!
//! A [`ParamLayout`] lists parameters sorted by name, comparing names byte by byte (the
//! order of [`str`]'s `Ord`, so `"b"` < `"b.0"` < `"bb"` and upper case sorts before lower
//! case). Each parameter's values are laid out row-major, as libtorch and safetensors
//! store them, and the parameters follow one another with no gaps. The order depends only
//! on the names, never on the order a framework happens to list its tensors in, so a store
//! and core that agree on the layout agree on what coordinate `i` of an update means.
//!
//! # Shared and local parameters
//!
//! A parameter marked `local` (a personalised head) is trained at the store but never
//! leaves it. [`Scope::Shared`] skips those parameters; it is the scope of every update a
//! store sends. [`Scope::All`] covers everything, for checkpoints kept on the store.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Parameter values by name, each flattened row-major.
pub type ParamMap = BTreeMap<String, Vec<f32>>;

/// One parameter of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamSpec {
    /// Its name, as the model definition gives it (`"layers.0.weight"`).
    pub name: String,
    /// Its shape, outermost dimension first; an empty shape is a scalar.
    pub shape: Vec<usize>,
    /// Whether it is a personalised part that never leaves the store.
    pub local: bool,
}

impl ParamSpec {
    /// Number of values the parameter holds, or `None` if the shape's product overflows.
    pub fn numel(&self) -> Option<usize> {
        self.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d))
    }
}

/// Which parameters a flat vector covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Every parameter, local ones included.
    All,
    /// Only the parameters that are not local: what an update carries.
    Shared,
}

/// The parameters of a model in the documented order, with their offsets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamLayout {
    params: Vec<ParamSpec>,
    numels: Vec<usize>,
    len_all: usize,
    len_shared: usize,
}

/// Why a layout could not be built, or values did not match it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ParamError {
    /// Two parameters have the same name.
    #[error("parameter {name:?} appears twice in the layout")]
    Duplicate {
        /// The repeated name.
        name: String,
    },
    /// A parameter's shape, or the model as a whole, has more values than `usize` counts.
    #[error("parameter {name:?} has a shape whose size overflows")]
    SizeOverflow {
        /// The parameter whose size overflowed.
        name: String,
    },
    /// The values lack a parameter of the layout.
    #[error("parameter {name:?} is missing from the values")]
    Missing {
        /// The missing parameter.
        name: String,
    },
    /// The values have a parameter the layout does not know.
    #[error("parameter {name:?} is not in the layout")]
    Unknown {
        /// The unexpected name.
        name: String,
    },
    /// A parameter has the wrong number of values for its shape.
    #[error("parameter {name:?} has {actual} values, its shape {shape:?} needs {expected}")]
    Size {
        /// The parameter.
        name: String,
        /// Its shape in the layout.
        shape: Vec<usize>,
        /// Values its shape needs.
        expected: usize,
        /// Values present.
        actual: usize,
    },
    /// A flat vector has the wrong length for the scope.
    #[error("flat vector has {actual} values, the layout's {scope:?} scope needs {expected}")]
    FlatLength {
        /// The scope asked for.
        scope: Scope,
        /// Values the scope covers.
        expected: usize,
        /// Values present.
        actual: usize,
    },
}

impl ParamLayout {
    /// Builds a layout, sorting the parameters by name.
    ///
    /// # Errors
    ///
    /// [`ParamError::Duplicate`] when two parameters share a name and
    /// [`ParamError::SizeOverflow`] when a size does not fit in `usize`.
    pub fn new(params: impl IntoIterator<Item = ParamSpec>) -> Result<Self, ParamError> {
        let mut params: Vec<ParamSpec> = params.into_iter().collect();
        params.sort_by(|a, b| a.name.cmp(&b.name));
        if let Some(pair) = params.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(ParamError::Duplicate {
                name: pair[0].name.clone(),
            });
        }

        let mut numels = Vec::with_capacity(params.len());
        let (mut len_all, mut len_shared) = (0usize, 0usize);
        for p in &params {
            let overflow = || ParamError::SizeOverflow {
                name: p.name.clone(),
            };
            let n = p.numel().ok_or_else(overflow)?;
            len_all = len_all.checked_add(n).ok_or_else(overflow)?;
            if !p.local {
                len_shared += n;
            }
            numels.push(n);
        }
        Ok(Self {
            params,
            numels,
            len_all,
            len_shared,
        })
    }

    /// The parameters in layout order.
    pub fn params(&self) -> &[ParamSpec] {
        &self.params
    }

    /// Length of the flat vector for a scope.
    pub fn len(&self, scope: Scope) -> usize {
        match scope {
            Scope::All => self.len_all,
            Scope::Shared => self.len_shared,
        }
    }

    /// Whether the scope covers no values at all.
    pub fn is_empty(&self, scope: Scope) -> bool {
        self.len(scope) == 0
    }

    /// Concatenates the values of the scope's parameters in layout order.
    ///
    /// For [`Scope::Shared`] the map may hold the local parameters too; they are skipped.
    ///
    /// # Errors
    ///
    /// [`ParamError::Unknown`] for a name the layout lacks, [`ParamError::Missing`] for a
    /// parameter of the scope that the map lacks, and [`ParamError::Size`] for a parameter
    /// with the wrong number of values.
    pub fn flatten(&self, values: &ParamMap, scope: Scope) -> Result<Vec<f32>, ParamError> {
        if let Some(name) = values.keys().find(|k| self.position(k).is_none()) {
            return Err(ParamError::Unknown { name: name.clone() });
        }

        let mut flat = Vec::with_capacity(self.len(scope));
        for (p, &n) in self.in_scope(scope) {
            let v = values.get(&p.name).ok_or_else(|| ParamError::Missing {
                name: p.name.clone(),
            })?;
            if v.len() != n {
                return Err(ParamError::Size {
                    name: p.name.clone(),
                    shape: p.shape.clone(),
                    expected: n,
                    actual: v.len(),
                });
            }
            flat.extend_from_slice(v);
        }
        Ok(flat)
    }

    /// Splits a flat vector of the scope back into parameters, the inverse of
    /// [`ParamLayout::flatten`].
    ///
    /// # Errors
    ///
    /// [`ParamError::FlatLength`] when the vector's length is not the scope's length.
    pub fn unflatten(&self, flat: &[f32], scope: Scope) -> Result<ParamMap, ParamError> {
        let expected = self.len(scope);
        if flat.len() != expected {
            return Err(ParamError::FlatLength {
                scope,
                expected,
                actual: flat.len(),
            });
        }

        let mut map = ParamMap::new();
        let mut rest = flat;
        for (p, &n) in self.in_scope(scope) {
            let (head, tail) = rest.split_at(n);
            map.insert(p.name.clone(), head.to_vec());
            rest = tail;
        }
        Ok(map)
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.params
            .binary_search_by(|p| p.name.as_str().cmp(name))
            .ok()
    }

    fn in_scope(&self, scope: Scope) -> impl Iterator<Item = (&ParamSpec, &usize)> {
        let all = scope == Scope::All;
        self.params
            .iter()
            .zip(&self.numels)
            .filter(move |(p, _)| all || !p.local)
    }
}
