//! Loading store data: the Dominick's recipe on real rows, data minimisation, redaction and
//! the errors bad input gives.

use std::io::Write;
use std::path::{Path, PathBuf};

use fedmesh_store_agent::StoreId;
use fedmesh_store_agent::ingest::{self, DataFiles, IngestError};
use fedmesh_store_agent::spec::FeatureSpec;

const SPEC: &str = include_str!("../specs/dominicks-oj.toml");

const SALES_HEADER: &str = "store,brand,week,logmove,constant,price1,price2,price3,price4,price5,\
price6,price7,price8,price9,price10,price11,deal,feat,profit";

/// Two real rows of data/dominicks-oj/sales.csv.gz (store 2, brand 3, week 40 and store 2,
/// brand 2, week 150), and one of another store that must not leak into store 2's data.
const SALES: [&str; 3] = [
    "2,3,40,8.1101268019,1,0.06046875,0.0604965281,0.04203125,0.02953125,0.04953125,\
0.0530208333,0.03890625,0.04140625,0.02890625,0.02484375,0.038984375,1,0.3461538462,20.39",
    "2,2,150,9.3518399342,1,0.04984375,0.0415625,0.04359375,0.0478125,0.03578125,0.0509375,\
0.04203125,0.04046875,0.03265625,0.02640625,0.031171875,1,1.0,16.869",
    "5,1,40,9.1,1,0.06,0.06,0.04,0.03,0.05,0.05,0.04,0.04,0.03,0.02,0.04,0,0.0,1.0",
];

const STORES: &str = "\
STORE,AGE60,EDUC,ETHNIC,INCOME,HHLARGE,WORKWOM,HVAL150,SSTRDIST,SSTRVOL,CPDIST5,CPWVOL5
2,0.232864733974575,0.248934934159566,0.11427994888007,10.5532051751687,0.103953406283092,\
0.303585346843336,0.463887065003283,2.11012212916694,1.14285714285714,1.92727966933754,\
0.376926612794232
5,0.1173680316811,0.321225729758288,0.0538752774272162,10.9223709731668,0.103091585309159,\
0.410568031704095,0.535883355425109,3.80199781430763,0.681818181818182,1.60057342535078,\
0.73630683680335
";

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write fixture");
    path
}

fn write_gz(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let file = std::fs::File::create(&path).expect("create fixture");
    let mut gz = flate2::write::GzEncoder::new(file, flate2::Compression::default());
    gz.write_all(text.as_bytes()).expect("write fixture");
    gz.finish().expect("finish gzip");
    path
}

fn fixture(dir: &Path) -> DataFiles {
    let sales = format!("{SALES_HEADER}\n{}\n", SALES.join("\n"));
    DataFiles {
        sales: write_gz(dir, "sales.csv.gz", &sales),
        attributes: Some(write(dir, "stores.csv", STORES)),
    }
}

fn assert_close(actual: &[f32], expected: &[f64]) {
    assert_eq!(actual.len(), expected.len(), "value count");
    for (i, (a, e)) in actual.iter().zip(expected).enumerate() {
        assert!(
            (f64::from(*a) - e).abs() < 1e-5,
            "value {i}: got {a}, expected {e}"
        );
    }
}

#[test]
fn dominicks_recipe_gives_hand_computed_features() {
    let dir = tempfile::tempdir().unwrap();
    let spec = FeatureSpec::from_toml_str(SPEC).unwrap();
    assert_eq!(spec.feature_count(), 47);

    let data = ingest::load_store(&spec, &fixture(dir.path()), &StoreId("2".into())).unwrap();
    assert_eq!(
        (data.train.len(), data.test.len()),
        (1, 1),
        "week 40 trains, week 150 tests"
    );
    assert_close(&data.train.targets, &[8.110_126_801_9]);
    assert_close(&data.test.targets, &[9.351_839_934_2]);

    // Row 1 (brand 3, week 40), by hand: one-hot has a 1 in place 3; the log prices are
    // ln(price1..price11) = -2.805629, -2.805169, -3.169342, -3.522306, -3.005151, -2.937070,
    // -3.246600, -3.184323, -3.543697, -3.695149, -3.244594 (python math.log); own price is
    // price3, so ln(0.04203125) = -3.169342 and the product block is that value in place 3;
    // deal 1, feat 0.3461538462; then store 2's demographics as written in stores.csv.
    let own = -3.169_341_889_745_924_2;
    let mut row1 = vec![0.0; 11];
    row1[2] = 1.0;
    row1.extend([
        -2.805_629, -2.805_169, -3.169_342, -3.522_306, -3.005_151, -2.937_070, -3.246_600,
        -3.184_323, -3.543_697, -3.695_149, -3.244_594,
    ]);
    row1.push(own);
    let mut product = vec![0.0; 11];
    product[2] = own;
    row1.extend(product);
    row1.extend([1.0, 0.346_153_846_2]);
    let demographics = [
        0.232_864_733_974_575,
        0.248_934_934_159_566,
        0.114_279_948_880_07,
        10.553_205_175_168_7,
        0.103_953_406_283_092,
        0.303_585_346_843_336,
        0.463_887_065_003_283,
        2.110_122_129_166_94,
        1.142_857_142_857_14,
        1.927_279_669_337_54,
        0.376_926_612_794_232,
    ];
    row1.extend(demographics);
    // Log prices are given to 6 decimals, so compare them at that precision.
    let close_enough: Vec<f64> = data.train.row(0).iter().map(|&v| f64::from(v)).collect();
    for (i, (a, e)) in close_enough.iter().zip(&row1).enumerate() {
        assert!(
            (a - e).abs() < 2e-6,
            "row 1 feature {i}: got {a}, expected {e}"
        );
    }

    // Row 2 (brand 2, week 150): own price is price2, ln(0.0415625) = -3.180557.
    let own = -3.180_556_960_566_064;
    let prices: [f64; 11] = [
        0.04984375,
        0.0415625,
        0.04359375,
        0.0478125,
        0.03578125,
        0.0509375,
        0.04203125,
        0.04046875,
        0.03265625,
        0.02640625,
        0.031171875,
    ];
    let mut row2 = vec![0.0; 11];
    row2[1] = 1.0;
    row2.extend(prices.iter().map(|p| p.ln()));
    row2.push(own);
    let mut product = vec![0.0; 11];
    product[1] = own;
    row2.extend(product);
    row2.extend([1.0, 1.0]);
    row2.extend(demographics);
    assert_close(data.test.row(0), &row2);
}

#[test]
fn loads_every_store_in_order_of_appearance() {
    let dir = tempfile::tempdir().unwrap();
    let spec = FeatureSpec::from_toml_str(SPEC).unwrap();
    let all = ingest::load_all(&spec, &fixture(dir.path())).unwrap();
    let stores: Vec<&str> = all.stores.iter().map(|s| s.store.0.as_str()).collect();
    assert_eq!(stores, ["2", "5"]);
    assert_eq!(all.feature_names.len(), 47);
    assert_eq!(all.feature_names[34], "deal");
}

/// A spec whose only text column is `note`; `card` is in the file but not named.
const NOTE_SPEC: &str = r#"
store_column = "store"
target = "y"
[split]
column = "week"
train_max = 10
[[features]]
name = "note"
kind = "one_hot"
column = "note"
vocabulary = ["[REDACTED]", "ok"]
"#;

#[test]
fn redacts_card_numbers_in_loaded_columns_only() {
    let dir = tempfile::tempdir().unwrap();
    // 4111 1111 1111 1111 and 5500-0000-0000-0004 pass Luhn; 4111111111111112 does not; the
    // `card` column is never loaded, so its Luhn-valid number is not even seen.
    let sales = "store,week,y,note,card
1,1,1.0,4111 1111 1111 1111,378282246310005
1,2,2.0,ok,0
1,3,3.0,4111111111111112,0
1,4,4.0,5500-0000-0000-0004,0
";
    let files = DataFiles {
        sales: write(dir.path(), "sales.csv", sales),
        attributes: None,
    };
    let spec = FeatureSpec::from_toml_str(NOTE_SPEC).unwrap();
    let all = ingest::load_all(&spec, &files).unwrap();

    assert_eq!(all.redactions, 2);
    let rows = &all.stores[0].train;
    assert_eq!(
        rows.row(0),
        [1.0, 0.0],
        "a redacted card number is seen as [REDACTED]"
    );
    assert_eq!(rows.row(1), [0.0, 1.0]);
    assert_eq!(
        rows.row(2),
        [0.0, 0.0],
        "a digit string failing Luhn is kept as it was"
    );
    assert_eq!(rows.row(3), [1.0, 0.0]);
}

fn load_error(sales: &str, stores: Option<&str>, store: Option<&str>) -> (IngestError, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let files = DataFiles {
        sales: write(dir.path(), "sales.csv", sales),
        attributes: stores.map(|s| write(dir.path(), "stores.csv", s)),
    };
    let spec = FeatureSpec::from_toml_str(SPEC).unwrap();
    let err = match store {
        Some(id) => ingest::load_store(&spec, &files, &StoreId(id.into())).unwrap_err(),
        None => ingest::load_all(&spec, &files).unwrap_err(),
    };
    (err, files.sales)
}

#[test]
fn missing_column_names_file_and_column() {
    let header = SALES_HEADER.replace("price7,", "");
    let row = SALES[0].replacen("0.03890625,", "", 1);
    let (err, sales) = load_error(&format!("{header}\n{row}\n"), Some(STORES), None);
    let message = err.to_string();
    assert!(matches!(err, IngestError::MissingColumn { ref column, .. } if column == "price7"));
    assert!(
        message.contains(&sales.display().to_string()) && message.contains("price7"),
        "{message}"
    );
}

#[test]
fn non_numeric_value_names_file_row_and_column() {
    let bad = SALES[1].replace("9.3518399342", "lots");
    let (err, _) = load_error(
        &format!("{SALES_HEADER}\n{}\n{bad}\n", SALES[0]),
        Some(STORES),
        None,
    );
    let message = err.to_string();
    assert!(
        matches!(err, IngestError::NotNumeric { row: 2, ref column, .. } if column == "logmove")
    );
    assert!(
        message.contains("sales.csv") && message.contains("row 2") && message.contains("logmove"),
        "{message}"
    );
}

#[test]
fn non_numeric_attribute_names_the_attributes_file() {
    let stores = STORES.replace("10.5532051751687", "n/a");
    let (err, _) = load_error(
        &format!("{SALES_HEADER}\n{}\n", SALES[0]),
        Some(&stores),
        None,
    );
    let message = err.to_string();
    assert!(
        message.contains("stores.csv") && message.contains("row 1") && message.contains("INCOME"),
        "{message}"
    );
}

#[test]
fn log_of_non_positive_price_is_an_error() {
    let bad = SALES[0].replacen("0.06046875", "0", 1);
    let (err, _) = load_error(&format!("{SALES_HEADER}\n{bad}\n"), Some(STORES), None);
    assert!(
        matches!(err, IngestError::NonPositiveLog { row: 1, ref column, .. } if column == "price1"),
        "{err}"
    );
}

#[test]
fn empty_file_is_an_error() {
    let (err, _) = load_error("", Some(STORES), None);
    assert!(matches!(err, IngestError::EmptyFile { .. }), "{err}");
    let (err, _) = load_error(&format!("{SALES_HEADER}\n"), Some(STORES), None);
    assert!(matches!(err, IngestError::EmptyFile { .. }), "{err}");
}

#[test]
fn store_without_rows_is_an_error() {
    let (err, _) = load_error(
        &format!("{SALES_HEADER}\n{}\n", SALES[0]),
        Some(STORES),
        Some("77"),
    );
    assert!(
        matches!(err, IngestError::NoRows { ref store, .. } if store == "77"),
        "{err}"
    );
    assert!(err.to_string().contains("sales.csv"));
}

#[test]
fn store_without_attributes_row_names_the_row() {
    let only_five = STORES
        .lines()
        .filter(|l| !l.starts_with("2,"))
        .collect::<Vec<_>>()
        .join("\n");
    let (err, _) = load_error(
        &format!("{SALES_HEADER}\n{}\n", SALES[0]),
        Some(&only_five),
        None,
    );
    assert!(
        matches!(err, IngestError::UnknownStore { row: 1, ref store, .. } if store == "2"),
        "{err}"
    );
}
