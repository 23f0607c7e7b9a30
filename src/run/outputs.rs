//! What a run writes: the per-epoch history (JSON, and CSV through the
//! `csv` crate), the learning curves (SVG through `plotters`) and
//! `result.json`, every file atomically.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// One epoch of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EpochRow {
    /// 1-based epoch over the whole run (all stages).
    pub epoch: usize,
    /// 0-based stage.
    pub stage: usize,
    /// Wall-clock seconds of the epoch (training and validation).
    pub seconds: f64,
    /// (name, value) as fit logs them (`loss`, `accuracy`, `val_loss`, ...);
    /// `None` for a value that is not finite.
    pub values: Vec<(String, Option<f64>)>,
}

/// The history of a run: every epoch of every stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RunHistory {
    /// Rows in order.
    pub rows: Vec<EpochRow>,
}

impl RunHistory {
    /// The logged names, in order of first appearance.
    pub fn columns(&self) -> Vec<String> {
        let mut cols: Vec<String> = Vec::new();
        for r in &self.rows {
            for (k, _) in &r.values {
                if !cols.contains(k) {
                    cols.push(k.clone());
                }
            }
        }
        cols
    }

    /// The values of `name`, one per row (`None` where missing or not finite).
    pub fn series(&self, name: &str) -> Vec<Option<f64>> {
        self.rows
            .iter()
            .map(|r| {
                r.values
                    .iter()
                    .find(|(k, _)| k == name)
                    .and_then(|(_, v)| *v)
            })
            .collect()
    }

    /// Keras's `history.history` shape, plus `epoch`, `stage` and `seconds`:
    /// `{"epoch": [1, 2], "stage": [0, 0], "loss": [..], ..., "seconds": [..]}`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        m.insert(
            "epoch".into(),
            self.rows.iter().map(|r| r.epoch).collect::<Vec<_>>().into(),
        );
        m.insert(
            "stage".into(),
            self.rows.iter().map(|r| r.stage).collect::<Vec<_>>().into(),
        );
        for c in self.columns() {
            m.insert(
                c.clone(),
                serde_json::to_value(self.series(&c)).unwrap_or_default(),
            );
        }
        m.insert(
            "seconds".into(),
            self.rows
                .iter()
                .map(|r| r.seconds)
                .collect::<Vec<_>>()
                .into(),
        );
        serde_json::Value::Object(m)
    }

    /// One line per epoch: `epoch,stage,<columns>,seconds` (empty cells for
    /// missing values), written by the `csv` crate (which quotes a column
    /// name that needs it).
    pub fn to_csv(&self) -> Result<String> {
        let bad = |e: csv::Error| Error::format("history.csv", e.to_string());
        let cols = self.columns();
        let mut w = csv::Writer::from_writer(Vec::new());
        let header = ["epoch", "stage"]
            .into_iter()
            .chain(cols.iter().map(String::as_str))
            .chain(["seconds"]);
        w.write_record(header).map_err(bad)?;
        for r in &self.rows {
            let mut rec = vec![r.epoch.to_string(), r.stage.to_string()];
            for c in &cols {
                rec.push(
                    match r.values.iter().find(|(k, _)| k == c).map(|(_, v)| *v) {
                        Some(Some(v)) => v.to_string(),
                        _ => String::new(),
                    },
                );
            }
            rec.push(format!("{:.3}", r.seconds));
            w.write_record(&rec).map_err(bad)?;
        }
        let bytes = w
            .into_inner()
            .map_err(|e| Error::format("history.csv", e.to_string()))?;
        String::from_utf8(bytes).map_err(|e| Error::format("history.csv", e.to_string()))
    }
}

/// Writes `bytes` to `path` atomically (a `tempfile` in the same
/// directory, synced and persisted over `path`), so that a reader never
/// sees a half-written file and a crash leaves the old one whole.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    crate::nn::atomic_write(path, bytes)
}

/// Writes `value` as pretty JSON, atomically.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value).map_err(|e| Error::Format {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// Round numbers for axis ticks: about `target` steps of 1, 2 or 5 x 10^k
/// covering `[lo, hi]`.
pub fn nice_ticks(lo: f64, hi: f64, target: usize) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite()) {
        return vec![0.0, 1.0];
    }
    let (lo, hi) = if hi - lo < 1e-12 {
        (lo - 0.5, hi + 0.5)
    } else {
        (lo, hi)
    };
    let raw = (hi - lo) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let start = (lo / step).floor() * step;
    let mut t = Vec::new();
    let mut v = start;
    while v <= hi + step * 0.5 + 1e-12 && t.len() < 100 {
        t.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        v += step;
    }
    if t.last().is_some_and(|&l| l < hi) {
        t.push(v);
    }
    t
}

const TRAIN_COLOR: RGBColor = RGBColor(0x1f, 0x77, 0xb4);
const VAL_COLOR: RGBColor = RGBColor(0xff, 0x7f, 0x0e);
const FONT: &str = "sans-serif";

/// The runs of consecutive finite values of `series`, as (epoch, value)
/// points (a missing value breaks the line).
fn segments(series: &[Option<f64>]) -> Vec<Vec<(f64, f64)>> {
    let mut out: Vec<Vec<(f64, f64)>> = vec![Vec::new()];
    for (i, v) in series.iter().enumerate() {
        match v {
            Some(v) => out
                .last_mut()
                .unwrap_or(&mut Vec::new())
                .push((i as f64 + 1.0, *v)),
            None => out.push(Vec::new()),
        }
    }
    out.retain(|s| !s.is_empty());
    out
}

/// One panel of the learning curves: `name` and `val_<name>` per epoch.
fn panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, plotters::coord::Shift>,
    h: &RunHistory,
    name: &str,
) -> std::result::Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    let train = h.series(name);
    let val_name = format!("val_{name}");
    let val = h.series(&val_name);
    let n = h.rows.len();
    let values: Vec<f64> = train.iter().chain(&val).flatten().copied().collect();
    let (lo, hi) = if values.is_empty() {
        (0.0, 1.0)
    } else {
        values
            .iter()
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            })
    };
    let yt = nice_ticks(lo, hi, 5);
    let (ylo, yhi) = (yt[0], *yt.last().unwrap_or(&1.0));
    let xhi = n.max(2) as f64;
    let mut chart = ChartBuilder::on(area)
        .caption(name, (FONT, 16).into_font().style(FontStyle::Bold))
        .margin_top(5)
        .margin_left(10)
        .margin_right(25)
        .x_label_area_size(42)
        .y_label_area_size(58)
        .build_cartesian_2d(1.0..xhi, ylo..yhi)?;
    let ystep = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
    let decimals = if ystep >= 1.0 {
        0
    } else {
        (-ystep.log10()).ceil() as usize
    };
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(TRANSPARENT)
        .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
        .x_labels(n.clamp(2, 7))
        .y_labels(yt.len())
        .x_label_formatter(&|v| {
            if v.fract() == 0.0 {
                format!("{v:.0}")
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| format!("{v:.decimals$}"))
        .x_desc("epoch")
        .y_desc(name)
        .axis_desc_style((FONT, 15))
        .label_style((FONT, 15))
        .draw()?;
    // A frame, as the axes draw only the left and bottom sides.
    chart.draw_series(std::iter::once(Rectangle::new(
        [(1.0, ylo), (xhi, yhi)],
        RGBColor(0x33, 0x33, 0x33).stroke_width(1),
    )))?;
    // Stage boundaries: dashed, between the last epoch of one stage and the
    // first of the next.
    for i in 1..n {
        if h.rows[i].stage != h.rows[i - 1].stage {
            let x = i as f64 + 0.5;
            chart.draw_series(DashedLineSeries::new(
                [(x, ylo), (x, yhi)],
                4,
                3,
                RGBColor(0x99, 0x99, 0x99).into(),
            ))?;
        }
    }
    // The curves: a line per run of finite values, a dot per epoch, one
    // legend entry per series.
    for (series, color, label) in [(&train, TRAIN_COLOR, name), (&val, VAL_COLOR, &val_name)] {
        for (k, seg) in segments(series).into_iter().enumerate() {
            let drawn = chart.draw_series(
                LineSeries::new(seg, color.stroke_width(2)).point_size(if n > 60 { 0 } else { 2 }),
            )?;
            if k == 0 {
                drawn.label(label.to_string()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
                });
            }
        }
    }
    // The legend goes in the corner the curves leave free: at the bottom
    // when they end high (accuracy), at the top when they end low (loss).
    let (first, last) = (
        train.iter().flatten().next().copied().unwrap_or(0.0),
        train.iter().flatten().last().copied().unwrap_or(0.0),
    );
    chart
        .configure_series_labels()
        .position(if last > first {
            SeriesLabelPosition::LowerRight
        } else {
            SeriesLabelPosition::UpperRight
        })
        .margin(12)
        .label_font((FONT, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(0x99, 0x99, 0x99))
        .draw()?;
    Ok(())
}

/// The learning curves as an SVG document, drawn by `plotters`: the title,
/// a second line `subtitle` (the run's own result, beside the seed's figure
/// the title quotes), one panel for the loss and one for each metric
/// (training and validation per epoch, a dot per epoch), with ticks, axis
/// labels, a legend, and dashed lines where a new stage starts.
pub fn curves_svg(h: &RunHistory, title: &str, subtitle: &str) -> Result<String> {
    let metrics: Vec<String> = h
        .columns()
        .into_iter()
        .filter(|c| !c.starts_with("val_"))
        .collect();
    let panels = metrics.len().max(1);
    let (pw, ph) = (510u32, 380u32);
    let width = 40 + panels as u32 * pw;
    let height = ph + 60;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
        let bad = |e: DrawingAreaErrorKind<_>| Error::format("curves.svg", e.to_string());
        root.fill(&WHITE).map_err(bad)?;
        let (top, body) = root.split_vertically(60);
        let centre = (width as i32) / 2;
        let centred = |size: f64, style: FontStyle| {
            (FONT, size)
                .into_font()
                .style(style)
                .into_text_style(&top)
                .pos(Pos::new(HPos::Center, VPos::Top))
        };
        top.draw(&Text::new(
            title,
            (centre, 8),
            centred(18.0, FontStyle::Normal),
        ))
        .map_err(bad)?;
        top.draw(&Text::new(
            subtitle,
            (centre, 32),
            centred(16.0, FontStyle::Bold),
        ))
        .map_err(bad)?;
        let body = body.margin(0, 0, 20, 20);
        let areas = body.split_evenly((1, panels));
        for (area, m) in areas.iter().zip(&metrics) {
            panel(area, h, m).map_err(bad)?;
        }
        root.present().map_err(bad)?;
    }
    Ok(svg)
}
