//! PNG plots of a run, drawn with plotters' bitmap backend. Text uses DejaVu Sans from the
//! Debian package `fonts-dejavu-core` (or `NETLAB_FONT`), loaded at run time, so no
//! fontconfig or freetype build is needed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};
use serde_json::Value;

use crate::launch::Outcome;

const FONT_PATHS: [&str; 2] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];
const SIZE: (u32, u32) = (900, 520);

/// Registers the font once per process.
fn font() -> Result<()> {
    static LOADED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let candidates = std::env::var("NETLAB_FONT")
                .into_iter()
                .chain(FONT_PATHS.map(String::from));
            for path in candidates {
                if let Ok(bytes) = std::fs::read(&path) {
                    // plotters keeps fonts for the whole process.
                    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                    return register_font("sans-serif", FontStyle::Normal, bytes)
                        .map_err(|_| format!("{path} is not a usable font"));
                }
            }
            Err("no DejaVuSans.ttf: install the Debian package fonts-dejavu-core".into())
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Draws every plot into `dir`; returns the file names.
pub(crate) fn draw(dir: &Path, outcome: &Outcome, baselines: &Value) -> Result<Vec<String>> {
    font()?;
    let samples = &outcome.samples;
    let mut files = Vec::new();

    // 1. Test RMSE per round against both baselines.
    let rmse: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((s.round as f64, s.test_rmse?)))
        .collect();
    let mut lines = vec![("federated (test RMSE)".to_owned(), rmse)];
    let rounds = samples.iter().map(|s| s.round as f64).fold(1.0, f64::max);
    for (key, label) in [
        ("pooled_mlp_store_onehot", "pooled MLP + store one-hot"),
        ("local", "local ridge per store"),
    ] {
        if let Some(v) = baselines[key].as_f64() {
            lines.push((label.to_owned(), vec![(0.0, v), (rounds, v)]));
        }
    }
    files.push(line_chart(
        dir,
        "rmse.png",
        "Test RMSE per round (log units sold)",
        "RMSE",
        &lines,
    )?);

    // 2. Participation per round by region.
    let regions: BTreeSet<&String> = samples
        .iter()
        .flat_map(|s| s.survivors_by_region.keys())
        .collect();
    let lines: Vec<(String, Vec<(f64, f64)>)> = regions
        .iter()
        .map(|r| {
            let points = samples
                .iter()
                .map(|s| {
                    (
                        s.round as f64,
                        *s.survivors_by_region.get(*r).unwrap_or(&0) as f64,
                    )
                })
                .collect();
            ((*r).clone(), points)
        })
        .collect();
    files.push(line_chart(
        dir,
        "participation.png",
        "Stores in the sum per round, by region",
        "stores",
        &lines,
    )?);

    // 3. Uplink bytes per store per round.
    let uplink: Vec<(f64, f64)> = samples
        .iter()
        .filter_map(|s| Some((s.round as f64, s.payload_bytes_per_store? as f64)))
        .collect();
    files.push(line_chart(
        dir,
        "uplink.png",
        "Upload per store per round",
        "bytes",
        &[("masked update".into(), uplink)],
    )?);

    // 4. Round duration.
    let durations: Vec<(f64, f64)> = samples
        .iter()
        .map(|s| (s.round as f64, s.duration_s))
        .collect();
    files.push(line_chart(
        dir,
        "round-duration.png",
        "Round wall time",
        "seconds",
        &[("round".into(), durations)],
    )?);

    // 5. Epsilon per store over rounds (every store a thin line).
    let stores: BTreeSet<&String> = samples.iter().flat_map(|s| s.epsilon.keys()).collect();
    let mut per_store: BTreeMap<&String, Vec<(f64, f64)>> = BTreeMap::new();
    for store in &stores {
        let points = samples
            .iter()
            .map(|s| (s.round as f64, *s.epsilon.get(*store).unwrap_or(&0.0)))
            .collect();
        per_store.insert(store, points);
    }
    let lines: Vec<(String, Vec<(f64, f64)>)> = per_store
        .into_iter()
        .map(|(k, v)| (format!("store {k}"), v))
        .collect();
    files.push(epsilon_chart(dir, &lines)?);
    Ok(files)
}

fn bounds(lines: &[(String, Vec<(f64, f64)>)]) -> (f64, f64, f64, f64) {
    let points = lines.iter().flat_map(|(_, p)| p.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in points {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x0 > x1 {
        return (0.0, 1.0, 0.0, 1.0);
    }
    let pad = ((y1 - y0) * 0.1).max(1e-3);
    (
        x0,
        x1.max(x0 + 1.0),
        (y0 - pad).min(0.0f64.max(y0 - pad)),
        y1 + pad,
    )
}

fn line_chart(
    dir: &Path,
    file: &str,
    title: &str,
    y_label: &str,
    lines: &[(String, Vec<(f64, f64)>)],
) -> Result<String> {
    let path = dir.join(file);
    let (x0, x1, y0, y1) = bounds(lines);
    {
        let root = BitMapBackend::new(&path, SIZE).into_drawing_area();
        root.fill(&WHITE).context("fill")?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .context("axes")?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc(y_label)
            .draw()
            .context("mesh")?;
        for (i, (label, points)) in lines.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(2),
                ))
                .context("series")?
                .label(label.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .context("legend")?;
        root.present().context("write png")?;
    }
    Ok(file.to_owned())
}

fn epsilon_chart(dir: &Path, lines: &[(String, Vec<(f64, f64)>)]) -> Result<String> {
    let file = "epsilon.png";
    let path = dir.join(file);
    let (x0, x1, _, y1) = bounds(lines);
    {
        let root = BitMapBackend::new(&path, SIZE).into_drawing_area();
        root.fill(&WHITE).context("fill")?;
        let mut chart = ChartBuilder::on(&root)
            .caption("Record-level epsilon spent per store", ("sans-serif", 22))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, 0.0..y1.max(1.0))
            .context("axes")?;
        chart
            .configure_mesh()
            .x_desc("round")
            .y_desc("epsilon")
            .draw()
            .context("mesh")?;
        for (i, (_, points)) in lines.iter().enumerate() {
            let colour = Palette99::pick(i).mix(0.6);
            chart
                .draw_series(LineSeries::new(
                    points.iter().copied(),
                    colour.stroke_width(1),
                ))
                .context("series")?;
        }
        root.present().context("write png")?;
    }
    Ok(file.to_owned())
}
