//! The declarative feature spec: which columns a store loads and how each becomes features.
//!
//! A spec is TOML. It names the store column, the target, the split rule, the join with the
//! store attributes file, and an ordered list of features. Every column the store reads is
//! named here; the loader never keeps a column the spec does not name.
//!
//! ```toml
//! store_column = "store"
//! target = "logmove"
//!
//! [split]
//! column = "week"
//! train_max = 140          # rows with week <= 140 train, the rest test
//!
//! [attributes]
//! key = "STORE"            # joined on key = store_column
//!
//! [[features]]
//! name = "brand"
//! kind = "one_hot"
//! column = "brand"
//! vocabulary = [1, 2, 3]
//!
//! [[features]]
//! name = "log_own_price"
//! kind = "select"          # the column named by the template, per row
//! template = "price{brand}"
//! log = true
//!
//! [[features]]
//! name = "brand_x_log_own_price"
//! kind = "product"         # every pair of two earlier features' outputs
//! of = ["brand", "log_own_price"]
//! ```

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

/// A feature spec could not be read or is inconsistent.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The spec file could not be read.
    #[error("cannot read feature spec {path}: {source}")]
    Io {
        /// The spec file.
        path: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The spec is not valid TOML or does not match the schema.
    #[error("invalid feature spec: {0}")]
    Toml(#[from] toml::de::Error),
    /// Two features share a name.
    #[error("feature spec: duplicate feature name {0:?}")]
    DuplicateName(String),
    /// A product refers to a feature that is not defined before it.
    #[error(
        "feature spec: feature {feature:?} refers to {missing:?}, which is not defined before it"
    )]
    UnknownReference {
        /// The product feature.
        feature: String,
        /// The name it refers to.
        missing: String,
    },
    /// A select template lacks its `{column}` placeholder.
    #[error("feature spec: feature {feature:?}: template {template:?} needs one {{column}}")]
    BadTemplate {
        /// The select feature.
        feature: String,
        /// Its template.
        template: String,
    },
    /// A feature produces no values (an empty vocabulary or column list).
    #[error("feature spec: feature {0:?} produces no values")]
    Empty(String),
}

/// A declarative feature spec, see the module docs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    /// Column of the sales file holding the store id.
    pub store_column: String,
    /// Column holding the regression target (or class index).
    pub target: String,
    /// How rows split into train and test.
    pub split: SplitRule,
    /// The join with the store attributes file, if features use its columns.
    pub attributes: Option<AttributesJoin>,
    /// The features, in output order.
    pub features: Vec<Feature>,
}

/// Rows whose `column` is at most `train_max` train; the others test.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitRule {
    /// The numeric column compared with `train_max` (a week, a date as a number).
    pub column: String,
    /// The last value that still belongs to the training set.
    pub train_max: f64,
}

/// The store attributes file is joined on `key` = the sales file's store column.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributesJoin {
    /// The attributes file's store id column.
    pub key: String,
}

/// One named feature producing one or more values per row.
#[derive(Debug, Clone, Deserialize)]
pub struct Feature {
    /// Name, unique in the spec; products refer to features by it.
    pub name: String,
    /// How the values are made.
    #[serde(flatten)]
    pub kind: FeatureKind,
}

/// How a feature turns columns into values.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum FeatureKind {
    /// Each column's value as is, one value per column.
    Numeric {
        /// The columns.
        columns: Vec<String>,
    },
    /// The natural log of each column's value; a value <= 0 is an error.
    Log {
        /// The columns.
        columns: Vec<String>,
    },
    /// One value per vocabulary entry: 1 where the column equals it, else 0. A value outside the
    /// vocabulary gives all zeros, so every store maps categories identically.
    OneHot {
        /// The column.
        column: String,
        /// The fixed vocabulary, compared as numbers when both sides parse as numbers.
        vocabulary: Vec<Category>,
    },
    /// The value of the column named by `template` with `{other}` replaced by the row's value
    /// of column `other` (e.g. `price{brand}` reads `price3` on a row whose brand is 3).
    Select {
        /// Column name template with one `{column}` placeholder.
        template: String,
        /// Take the natural log of the selected value.
        #[serde(default)]
        log: bool,
    },
    /// The products of every value of `of[0]` with every value of `of[1]`, first index slowest.
    Product {
        /// Two earlier features.
        of: [String; 2],
    },
}

/// A vocabulary entry, written in TOML as an integer, a float or a string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Category {
    /// An integer category.
    Integer(i64),
    /// A float category.
    Float(f64),
    /// A text category.
    Text(String),
}

impl Category {
    /// Whether a raw field value is this category.
    pub fn matches(&self, raw: &str) -> bool {
        let raw = raw.trim();
        match self {
            Category::Integer(v) => raw.parse::<f64>().is_ok_and(|x| x == *v as f64),
            Category::Float(v) => raw.parse::<f64>().is_ok_and(|x| x == *v),
            Category::Text(v) => raw == v,
        }
    }

    fn label(&self) -> String {
        match self {
            Category::Integer(v) => v.to_string(),
            Category::Float(v) => v.to_string(),
            Category::Text(v) => v.clone(),
        }
    }
}

impl FeatureSpec {
    /// Parses and checks a spec from TOML text.
    ///
    /// # Errors
    /// [`SpecError`] when the text is not a valid spec.
    pub fn from_toml_str(text: &str) -> Result<Self, SpecError> {
        let spec: FeatureSpec = toml::from_str(text)?;
        spec.check()?;
        Ok(spec)
    }

    /// Reads and checks a spec file.
    ///
    /// # Errors
    /// [`SpecError`] when the file cannot be read or is not a valid spec.
    pub fn from_path(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// Names of the produced features, in output order; its length is the feature count.
    pub fn feature_names(&self) -> Vec<String> {
        let mut names: Vec<(String, Vec<String>)> = Vec::new();
        for feature in &self.features {
            let values = match &feature.kind {
                FeatureKind::Numeric { columns } => columns.clone(),
                FeatureKind::Log { columns } => {
                    columns.iter().map(|c| format!("log({c})")).collect()
                }
                FeatureKind::OneHot { column, vocabulary } => vocabulary
                    .iter()
                    .map(|v| format!("{column}={}", v.label()))
                    .collect(),
                FeatureKind::Select { .. } => vec![feature.name.clone()],
                FeatureKind::Product { of } => {
                    let part = |n: &str| {
                        names
                            .iter()
                            .find(|(name, _)| name == n)
                            .map(|(_, v)| v.clone())
                    };
                    let (left, right) = (
                        part(&of[0]).unwrap_or_default(),
                        part(&of[1]).unwrap_or_default(),
                    );
                    left.iter()
                        .flat_map(|l| right.iter().map(move |r| format!("{l}*{r}")))
                        .collect()
                }
            };
            names.push((feature.name.clone(), values));
        }
        names.into_iter().flat_map(|(_, v)| v).collect()
    }

    /// Number of values the spec produces per row.
    pub fn feature_count(&self) -> usize {
        self.feature_names().len()
    }

    fn check(&self) -> Result<(), SpecError> {
        let mut seen = HashSet::new();
        for feature in &self.features {
            if !seen.insert(feature.name.as_str()) {
                return Err(SpecError::DuplicateName(feature.name.clone()));
            }
            let empty = match &feature.kind {
                FeatureKind::Numeric { columns } | FeatureKind::Log { columns } => {
                    columns.is_empty()
                }
                FeatureKind::OneHot { vocabulary, .. } => vocabulary.is_empty(),
                FeatureKind::Select { template, .. } => {
                    if parse_template(template).is_none() {
                        return Err(SpecError::BadTemplate {
                            feature: feature.name.clone(),
                            template: template.clone(),
                        });
                    }
                    false
                }
                FeatureKind::Product { of } => {
                    // Only features defined earlier, and not this one, may be referenced.
                    seen.remove(feature.name.as_str());
                    if let Some(missing) = of.iter().find(|n| !seen.contains(n.as_str())) {
                        return Err(SpecError::UnknownReference {
                            feature: feature.name.clone(),
                            missing: missing.clone(),
                        });
                    }
                    seen.insert(feature.name.as_str());
                    false
                }
            };
            if empty {
                return Err(SpecError::Empty(feature.name.clone()));
            }
        }
        Ok(())
    }
}

/// Splits `price{brand}` into `("price", "brand", "")`: prefix, key column, suffix.
pub(crate) fn parse_template(template: &str) -> Option<(&str, &str, &str)> {
    let open = template.find('{')?;
    let close = open + template[open..].find('}')?;
    let (prefix, key, suffix) = (
        &template[..open],
        &template[open + 1..close],
        &template[close + 1..],
    );
    let valid = !key.is_empty() && !suffix.contains(['{', '}']) && !prefix.contains('}');
    valid.then_some((prefix, key, suffix))
}
