//! Reading a store's sales and attributes into feature rows.
//!
//! The loader reads the CSV header, keeps only the columns the [`FeatureSpec`] names, redacts
//! card numbers in every kept field, joins the store attributes, and computes the raw
//! (unnormalised) features of every row. Files ending in `.gz` or starting with the gzip magic
//! bytes are decompressed on the fly.
//!
//! Rows are counted from 1 for the first data row after the header, so `row 1` is line 2 of
//! the file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use crate::redact::redact_card_numbers;
use crate::spec::{FeatureKind, FeatureSpec, parse_template};
use crate::{Examples, StoreId};

/// Store data could not be loaded. Every variant names the file and, where one applies, the
/// row and column.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The file could not be opened or read.
    #[error("{file}: {source}")]
    Io {
        /// The file.
        file: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The CSV structure is broken (unequal field counts, bad quoting, bad UTF-8).
    #[error("{file}: row {row}: malformed csv: {message}")]
    Csv {
        /// The file.
        file: PathBuf,
        /// The data row, from 1.
        row: u64,
        /// What the CSV reader reported.
        message: String,
    },
    /// The file has no header or no data rows.
    #[error("{file}: file is empty")]
    EmptyFile {
        /// The file.
        file: PathBuf,
    },
    /// A column the spec names is in neither file.
    #[error("{file}: missing column {column:?}")]
    MissingColumn {
        /// The sales file (and the attributes file, if one was given, was searched too).
        file: PathBuf,
        /// The column.
        column: String,
    },
    /// A value that must be a number is not.
    #[error("{file}: row {row}, column {column:?}: not a number")]
    NotNumeric {
        /// The file.
        file: PathBuf,
        /// The data row, from 1.
        row: u64,
        /// The column.
        column: String,
    },
    /// A log feature met a value <= 0.
    #[error("{file}: row {row}, column {column:?}: log of a value that is not positive")]
    NonPositiveLog {
        /// The file.
        file: PathBuf,
        /// The data row, from 1.
        row: u64,
        /// The column.
        column: String,
    },
    /// A row's store has no row in the attributes file.
    #[error("{file}: row {row}, column {column:?}: store {store} has no attributes row")]
    UnknownStore {
        /// The sales file.
        file: PathBuf,
        /// The data row, from 1.
        row: u64,
        /// The store column.
        column: String,
        /// The store.
        store: String,
    },
    /// Two attributes rows for the same store.
    #[error("{file}: row {row}, column {column:?}: store {store} appears twice")]
    DuplicateStore {
        /// The attributes file.
        file: PathBuf,
        /// The data row, from 1.
        row: u64,
        /// The key column.
        column: String,
        /// The store.
        store: String,
    },
    /// A select feature named a column that is not in the file.
    #[error("{file}: row {row}, column {column:?}: selects column {selected:?}, which is missing")]
    MissingSelected {
        /// The file.
        file: PathBuf,
        /// The data row, from 1.
        row: u64,
        /// The column whose value built the name.
        column: String,
        /// The column name built from the template.
        selected: String,
    },
    /// The requested store has no rows (or no training rows).
    #[error("{file}: store {store} has no rows")]
    NoRows {
        /// The sales file.
        file: PathBuf,
        /// The store.
        store: String,
    },
    /// The spec asks for store attributes but no attributes file was given.
    #[error("{file}: the feature spec joins store attributes but no attributes file was given")]
    NoAttributesFile {
        /// The sales file.
        file: PathBuf,
    },
}

/// Where a store's data lives.
#[derive(Debug, Clone)]
pub struct DataFiles {
    /// Sales rows, CSV, optionally gzip.
    pub sales: PathBuf,
    /// Store attributes, CSV, optionally gzip; needed when the spec has an `[attributes]` join.
    pub attributes: Option<PathBuf>,
}

impl DataFiles {
    /// The vendored layout of a data directory: `sales.csv.gz` and `stores.csv`.
    pub fn in_dir(dir: &Path) -> Self {
        DataFiles {
            sales: dir.join("sales.csv.gz"),
            attributes: Some(dir.join("stores.csv")),
        }
    }
}

/// One store's raw features, split into training and test rows.
#[derive(Debug, Clone)]
pub struct StoreData {
    /// The store.
    pub store: StoreId,
    /// Rows whose split value is at most the spec's `train_max`.
    pub train: Examples,
    /// The other rows.
    pub test: Examples,
}

/// Every store's data from one load.
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Feature names, in column order.
    pub feature_names: Vec<String>,
    /// Stores in the order they first appear in the sales file.
    pub stores: Vec<StoreData>,
    /// How many card numbers were redacted while loading.
    pub redactions: usize,
}

/// Loads every store in the sales file.
///
/// # Errors
/// [`IngestError`] naming the file, row and column of the first bad value.
pub fn load_all(spec: &FeatureSpec, files: &DataFiles) -> Result<Dataset, IngestError> {
    load(spec, files, None)
}

/// Loads one store's rows only; other stores' rows are skipped before any value is parsed.
///
/// # Errors
/// [`IngestError`]; [`IngestError::NoRows`] when the store has no rows.
pub fn load_store(
    spec: &FeatureSpec,
    files: &DataFiles,
    store: &StoreId,
) -> Result<StoreData, IngestError> {
    let mut dataset = load(spec, files, Some(store))?;
    match dataset.stores.pop() {
        Some(data) => Ok(data),
        None => Err(IngestError::NoRows {
            file: files.sales.clone(),
            store: store.0.clone(),
        }),
    }
}

/// A CSV file opened with its header read.
struct Table {
    path: PathBuf,
    reader: csv::Reader<Box<dyn Read>>,
    header: Vec<String>,
}

impl Table {
    fn open(path: &Path) -> Result<Self, IngestError> {
        let io = |source| IngestError::Io {
            file: path.to_path_buf(),
            source,
        };
        let mut file = BufReader::new(File::open(path).map_err(io)?);
        let mut magic = [0u8; 2];
        let gzip = {
            use std::io::BufRead;
            let head = file.fill_buf().map_err(io)?;
            if head.len() >= 2 {
                magic.copy_from_slice(&head[..2]);
            }
            magic == [0x1f, 0x8b]
        };
        let input: Box<dyn Read> = if gzip {
            Box::new(flate2::read::MultiGzDecoder::new(file))
        } else {
            Box::new(file)
        };
        let mut reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .from_reader(input);
        let header = reader.headers().map_err(|e| csv_error(path, 0, e))?;
        let header: Vec<String> = header.iter().map(|h| h.trim().to_string()).collect();
        if header.iter().all(String::is_empty) {
            return Err(IngestError::EmptyFile {
                file: path.to_path_buf(),
            });
        }
        Ok(Table {
            path: path.to_path_buf(),
            reader,
            header,
        })
    }

    fn position(&self, column: &str) -> Option<usize> {
        self.header.iter().position(|h| h == column)
    }

    /// Reads every row, keeping only `columns` (header positions) with card numbers redacted.
    /// Calls `visit` with the 1-based row number and the kept fields of each row for which
    /// `wanted(raw record)` holds; other rows are dropped before anything is copied.
    fn for_each_row(
        &mut self,
        columns: &[usize],
        redactions: &mut usize,
        wanted: impl Fn(&csv::StringRecord) -> bool,
        mut visit: impl FnMut(u64, Vec<String>) -> Result<(), IngestError>,
    ) -> Result<u64, IngestError> {
        let mut record = csv::StringRecord::new();
        let mut row = 0;
        loop {
            let more = self
                .reader
                .read_record(&mut record)
                .map_err(|e| csv_error(&self.path, row + 1, e))?;
            if !more {
                break;
            }
            row += 1;
            if !wanted(&record) {
                continue;
            }
            let mut kept = Vec::with_capacity(columns.len());
            for &c in columns {
                let (text, count) = redact_card_numbers(record.get(c).unwrap_or(""));
                *redactions += count;
                kept.push(text.into_owned());
            }
            visit(row, kept)?;
        }
        if row == 0 {
            return Err(IngestError::EmptyFile {
                file: self.path.clone(),
            });
        }
        Ok(row)
    }
}

fn csv_error(path: &Path, row: u64, err: csv::Error) -> IngestError {
    IngestError::Csv {
        file: path.to_path_buf(),
        row,
        message: err.to_string(),
    }
}

/// Where a column the spec names is read from.
#[derive(Clone, Copy, PartialEq)]
enum Source {
    /// Index into the kept sales fields.
    Sales(usize),
    /// Index into the kept attributes fields.
    Attributes(usize),
}

/// The columns to keep from both files, and where each named column ends up.
struct Plan {
    sales_keep: Vec<usize>,
    attr_keep: Vec<usize>,
    by_name: HashMap<String, Source>,
}

impl Plan {
    fn add(&mut self, column: &str, sales: &Table, attrs: Option<&Table>) -> Option<Source> {
        if let Some(&source) = self.by_name.get(column) {
            return Some(source);
        }
        let source = if let Some(pos) = sales.position(column) {
            self.sales_keep.push(pos);
            Source::Sales(self.sales_keep.len() - 1)
        } else {
            let pos = attrs?.position(column)?;
            self.attr_keep.push(pos);
            Source::Attributes(self.attr_keep.len() - 1)
        };
        self.by_name.insert(column.to_string(), source);
        Some(source)
    }
}

/// The raw fields of one sales row and its store's attributes row.
struct Row<'a> {
    sales_file: &'a Path,
    attr_file: &'a Path,
    row: u64,
    sales: &'a [String],
    attrs: &'a (u64, Vec<String>),
}

impl Row<'_> {
    fn text(&self, source: Source) -> &str {
        match source {
            Source::Sales(i) => &self.sales[i],
            Source::Attributes(i) => &self.attrs.1[i],
        }
    }

    fn number(&self, source: Source, column: &str) -> Result<f64, IngestError> {
        let text = self.text(source).trim();
        text.parse::<f64>()
            .ok()
            .filter(|v| !v.is_nan())
            .ok_or_else(|| {
                let (file, row) = self.locate(source);
                IngestError::NotNumeric {
                    file,
                    row,
                    column: column.to_string(),
                }
            })
    }

    fn log(&self, source: Source, column: &str) -> Result<f64, IngestError> {
        let value = self.number(source, column)?;
        if value <= 0.0 {
            let (file, row) = self.locate(source);
            return Err(IngestError::NonPositiveLog {
                file,
                row,
                column: column.to_string(),
            });
        }
        Ok(value.ln())
    }

    fn locate(&self, source: Source) -> (PathBuf, u64) {
        match source {
            Source::Sales(_) => (self.sales_file.to_path_buf(), self.row),
            Source::Attributes(_) => (self.attr_file.to_path_buf(), self.attrs.0),
        }
    }
}

/// A feature resolved against the files: where its columns are, and where its values go.
enum Step {
    Values {
        sources: Vec<(Source, String)>,
        log: bool,
    },
    OneHot {
        source: Source,
        vocabulary: Vec<crate::spec::Category>,
    },
    Select {
        key: (Source, String),
        prefix: String,
        suffix: String,
        choices: HashMap<String, Source>,
        log: bool,
    },
    Product {
        left: std::ops::Range<usize>,
        right: std::ops::Range<usize>,
    },
}

fn load(
    spec: &FeatureSpec,
    files: &DataFiles,
    only: Option<&StoreId>,
) -> Result<Dataset, IngestError> {
    let mut sales = Table::open(&files.sales)?;
    let mut attrs = match (&spec.attributes, &files.attributes) {
        (Some(_), Some(path)) => Some(Table::open(path)?),
        (Some(_), None) => {
            return Err(IngestError::NoAttributesFile {
                file: files.sales.clone(),
            });
        }
        (None, _) => None,
    };
    let missing = |column: &str| IngestError::MissingColumn {
        file: files.sales.clone(),
        column: column.to_string(),
    };

    // 1. Resolve every column the spec names; nothing else is ever kept.
    let mut plan = Plan {
        sales_keep: Vec::new(),
        attr_keep: Vec::new(),
        by_name: HashMap::new(),
    };
    let store_col = match sales.position(&spec.store_column) {
        Some(_) => plan
            .add(&spec.store_column, &sales, None)
            .ok_or_else(|| missing(&spec.store_column))?,
        None => return Err(missing(&spec.store_column)),
    };
    let Source::Sales(store_index) = store_col else {
        return Err(missing(&spec.store_column));
    };
    let target = plan
        .add(&spec.target, &sales, attrs.as_ref())
        .ok_or_else(|| missing(&spec.target))?;
    let split = plan
        .add(&spec.split.column, &sales, attrs.as_ref())
        .ok_or_else(|| missing(&spec.split.column))?;
    let (steps, dim) = resolve_features(spec, &mut plan, &sales, attrs.as_ref(), &missing)?;

    // 2. Read the attributes: store key -> (row, kept fields).
    let mut attributes: HashMap<String, (u64, Vec<String>)> = HashMap::new();
    let mut redactions = 0;
    let attr_path = files.attributes.clone().unwrap_or_default();
    if let (Some(join), Some(table)) = (&spec.attributes, attrs.as_mut()) {
        let key = table
            .position(&join.key)
            .ok_or_else(|| IngestError::MissingColumn {
                file: table.path.clone(),
                column: join.key.clone(),
            })?;
        let mut keep = vec![key];
        keep.extend(&plan.attr_keep);
        let path = table.path.clone();
        table.for_each_row(
            &keep,
            &mut redactions,
            |_| true,
            |row, mut fields| {
                let store = normalise_key(&fields.remove(0));
                if attributes.contains_key(&store) {
                    return Err(IngestError::DuplicateStore {
                        file: path.clone(),
                        row,
                        column: join.key.clone(),
                        store,
                    });
                }
                attributes.insert(store, (row, fields));
                Ok(())
            },
        )?;
    }

    // 3. Stream the sales rows, computing features as they come.
    let no_attrs = (0, Vec::new());
    let mut stores: Vec<StoreData> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let only_key = only.map(|s| normalise_key(&s.0));
    let sales_path = sales.path.clone();
    // Another store's row is dropped on its raw store id, before any of its fields is kept.
    let store_pos = plan.sales_keep[store_index];
    let wanted = |record: &csv::StringRecord| {
        only_key
            .as_ref()
            .is_none_or(|k| *k == normalise_key(record.get(store_pos).unwrap_or("")))
    };
    sales.for_each_row(
        &plan.sales_keep.clone(),
        &mut redactions,
        wanted,
        |row, fields| {
            let store = normalise_key(&fields[store_index]);
            let attrs_row = if spec.attributes.is_some() {
                attributes
                    .get(&store)
                    .ok_or_else(|| IngestError::UnknownStore {
                        file: sales_path.clone(),
                        row,
                        column: spec.store_column.clone(),
                        store: store.clone(),
                    })?
            } else {
                &no_attrs
            };
            let row = Row {
                sales_file: &sales_path,
                attr_file: &attr_path,
                row,
                sales: &fields,
                attrs: attrs_row,
            };

            let y = row.number(target, &spec.target)?;
            let is_train = row.number(split, &spec.split.column)? <= spec.split.train_max;
            let slot = *index.entry(store.clone()).or_insert_with(|| {
                stores.push(StoreData {
                    store: StoreId(store.clone()),
                    train: Examples::empty(dim),
                    test: Examples::empty(dim),
                });
                stores.len() - 1
            });
            let examples = if is_train {
                &mut stores[slot].train
            } else {
                &mut stores[slot].test
            };
            let start = examples.features.len();
            examples.features.resize(start + dim, 0.0);
            compute_row(&steps, &row, &mut examples.features[start..])?;
            examples.targets.push(y as f32);
            Ok(())
        },
    )?;

    if let Some(key) = only_key.filter(|_| stores.is_empty()) {
        return Err(IngestError::NoRows {
            file: files.sales.clone(),
            store: key,
        });
    }
    if redactions > 0 {
        tracing::warn!(
            redaction.count = redactions,
            file = %files.sales.display(),
            "redacted card numbers in loaded store data"
        );
    }
    Ok(Dataset {
        feature_names: spec.feature_names(),
        stores,
        redactions,
    })
}

/// Store ids compare as written, except that `2` and `2.0` are the same store.
fn normalise_key(raw: &str) -> String {
    let raw = raw.trim();
    match raw.parse::<f64>() {
        Ok(v) if v.fract() == 0.0 && v.abs() < 1e15 => format!("{}", v as i64),
        _ => raw.to_string(),
    }
}

fn resolve_features(
    spec: &FeatureSpec,
    plan: &mut Plan,
    sales: &Table,
    attrs: Option<&Table>,
    missing: &dyn Fn(&str) -> IngestError,
) -> Result<(Vec<Step>, usize), IngestError> {
    let mut steps = Vec::new();
    let mut ranges: HashMap<&str, std::ops::Range<usize>> = HashMap::new();
    let mut dim = 0;
    let add = |plan: &mut Plan, column: &str| {
        plan.add(column, sales, attrs)
            .map(|s| (s, column.to_string()))
            .ok_or_else(|| missing(column))
    };
    for feature in &spec.features {
        let (step, width) = match &feature.kind {
            FeatureKind::Numeric { columns } | FeatureKind::Log { columns } => {
                let sources = columns
                    .iter()
                    .map(|c| add(plan, c))
                    .collect::<Result<Vec<_>, _>>()?;
                let log = matches!(feature.kind, FeatureKind::Log { .. });
                (Step::Values { sources, log }, columns.len())
            }
            FeatureKind::OneHot { column, vocabulary } => {
                let (source, _) = add(plan, column)?;
                let width = vocabulary.len();
                (
                    Step::OneHot {
                        source,
                        vocabulary: vocabulary.clone(),
                    },
                    width,
                )
            }
            FeatureKind::Select { template, log } => {
                let (prefix, key, suffix) =
                    parse_template(template).ok_or_else(|| missing(template))?;
                let key = add(plan, key)?;
                // Every header column the template can name is kept, and no other.
                let mut choices = HashMap::new();
                let names: Vec<String> = sales
                    .header
                    .iter()
                    .chain(attrs.map(|a| a.header.iter()).into_iter().flatten())
                    .filter(|h| {
                        h.len() > prefix.len() + suffix.len()
                            && h.starts_with(prefix)
                            && h.ends_with(suffix)
                    })
                    .cloned()
                    .collect();
                for name in names {
                    let middle = name[prefix.len()..name.len() - suffix.len()].to_string();
                    let (source, _) = add(plan, &name)?;
                    choices.insert(normalise_key(&middle), source);
                }
                let step = Step::Select {
                    key,
                    prefix: prefix.to_string(),
                    suffix: suffix.to_string(),
                    choices,
                    log: *log,
                };
                (step, 1)
            }
            FeatureKind::Product { of } => {
                let left = ranges[of[0].as_str()].clone();
                let right = ranges[of[1].as_str()].clone();
                let width = left.len() * right.len();
                (Step::Product { left, right }, width)
            }
        };
        ranges.insert(&feature.name, dim..dim + width);
        dim += width;
        steps.push(step);
    }
    Ok((steps, dim))
}

fn compute_row(steps: &[Step], row: &Row<'_>, out: &mut [f32]) -> Result<(), IngestError> {
    let mut at = 0;
    for step in steps {
        match step {
            Step::Values { sources, log } => {
                for (source, column) in sources {
                    let v = if *log {
                        row.log(*source, column)?
                    } else {
                        row.number(*source, column)?
                    };
                    out[at] = v as f32;
                    at += 1;
                }
            }
            Step::OneHot {
                source, vocabulary, ..
            } => {
                let text = row.text(*source);
                for category in vocabulary {
                    out[at] = if category.matches(text) { 1.0 } else { 0.0 };
                    at += 1;
                }
            }
            Step::Select {
                key,
                prefix,
                suffix,
                choices,
                log,
            } => {
                let chosen = normalise_key(row.text(key.0));
                let source = choices.get(&chosen).copied().ok_or_else(|| {
                    let (file, r) = row.locate(key.0);
                    IngestError::MissingSelected {
                        file,
                        row: r,
                        column: key.1.clone(),
                        selected: format!("{prefix}{chosen}{suffix}"),
                    }
                })?;
                let name = format!("{prefix}{chosen}{suffix}");
                let v = if *log {
                    row.log(source, &name)?
                } else {
                    row.number(source, &name)?
                };
                out[at] = v as f32;
                at += 1;
            }
            Step::Product { left, right } => {
                for l in left.clone() {
                    for r in right.clone() {
                        out[at] = out[l] * out[r];
                        at += 1;
                    }
                }
            }
        }
    }
    Ok(())
}
