//! What a run writes: the per-epoch history (JSON and CSV), the learning
//! curves (hand-written SVG) and `result.json`.

use std::path::Path;

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

fn fmt_tick(v: f64, step: f64) -> String {
    let decimals = if step >= 1.0 {
        0
    } else {
        (-step.log10()).ceil() as usize
    };
    format!("{v:.decimals$}")
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

const TRAIN_COLOR: &str = "#1f77b4";
const VAL_COLOR: &str = "#ff7f0e";

/// One panel of the learning curves: `name` and `val_<name>` per epoch.
fn panel(h: &RunHistory, name: &str, x0: f64, y0: f64, w: f64, ht: f64) -> String {
    let train = h.series(name);
    let val = h.series(&format!("val_{name}"));
    let n = h.rows.len();
    let values: Vec<f64> = train.iter().chain(&val).flatten().copied().collect();
    let (mut lo, mut hi) = values
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if values.is_empty() {
        (lo, hi) = (0.0, 1.0);
    }
    let yt = nice_ticks(lo, hi, 5);
    let (ylo, yhi) = (yt[0], *yt.last().unwrap_or(&1.0));
    let xt: Vec<f64> = nice_ticks(1.0, n.max(2) as f64, 6)
        .into_iter()
        .filter(|&v| v >= 1.0 && v.fract() == 0.0)
        .collect();
    let (xlo, xhi) = (1.0, (n.max(2) as f64).max(*xt.last().unwrap_or(&2.0)));
    let px = |e: f64| x0 + (e - xlo) / (xhi - xlo) * w;
    let py = |v: f64| y0 + ht - (v - ylo) / (yhi - ylo).max(1e-300) * ht;
    let mut s = String::new();
    // Frame and grid.
    s += &format!(
        "<rect x=\"{x0:.1}\" y=\"{y0:.1}\" width=\"{w:.1}\" height=\"{ht:.1}\" fill=\"white\" stroke=\"#333\"/>\n"
    );
    let ystep = if yt.len() > 1 { yt[1] - yt[0] } else { 1.0 };
    for &v in &yt {
        let y = py(v);
        s += &format!(
            "<line x1=\"{x0:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>\n",
            x0 + w
        );
        s += &format!(
            "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{x0:.1}\" y2=\"{y:.1}\" stroke=\"#333\"/>\n",
            x0 - 5.0
        );
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>\n",
            x0 - 8.0,
            y + 4.0,
            fmt_tick(v, ystep)
        );
    }
    for &e in &xt {
        let x = px(e);
        s += &format!(
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#333\"/>\n",
            y0 + ht,
            y0 + ht + 5.0
        );
        s += &format!(
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{e}</text>\n",
            y0 + ht + 20.0
        );
    }
    // Stage boundaries.
    for i in 1..n {
        if h.rows[i].stage != h.rows[i - 1].stage {
            let x = px(i as f64 + 0.5);
            s += &format!(
                "<line x1=\"{x:.1}\" y1=\"{y0:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"#999\" stroke-dasharray=\"4 3\"/>\n",
                y0 + ht
            );
        }
    }
    // Curves: a polyline per run of finite values, a dot per epoch.
    for (series, color) in [(&train, TRAIN_COLOR), (&val, VAL_COLOR)] {
        let mut pts: Vec<String> = Vec::new();
        let flush = |pts: &mut Vec<String>, s: &mut String| {
            if pts.len() > 1 {
                *s += &format!(
                    "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>\n",
                    pts.join(" ")
                );
            }
            pts.clear();
        };
        for (i, v) in series.iter().enumerate() {
            match v {
                Some(v) => {
                    let (x, y) = (px(i as f64 + 1.0), py(*v));
                    pts.push(format!("{x:.1},{y:.1}"));
                    s += &format!(
                        "<circle cx=\"{x:.1}\" cy=\"{y:.1}\" r=\"2.5\" fill=\"{color}\"/>\n"
                    );
                }
                None => flush(&mut pts, &mut s),
            }
        }
        flush(&mut pts, &mut s);
    }
    // Labels and legend.
    s += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">epoch</text>\n",
        x0 + w / 2.0,
        y0 + ht + 40.0
    );
    s += &format!(
        "<text transform=\"translate({:.1},{:.1}) rotate(-90)\" text-anchor=\"middle\">{}</text>\n",
        x0 - 50.0,
        y0 + ht / 2.0,
        esc(name)
    );
    s += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-weight=\"bold\">{}</text>\n",
        x0 + w / 2.0,
        y0 - 10.0,
        esc(name)
    );
    // The legend goes in the corner the curves leave free: at the bottom
    // when they end high (accuracy), at the top when they end low (loss).
    let (first, last) = (
        train.iter().flatten().next().copied().unwrap_or(0.0),
        train.iter().flatten().last().copied().unwrap_or(0.0),
    );
    let ly = if last > first {
        y0 + ht - 58.0
    } else {
        y0 + 12.0
    };
    let lx = x0 + w - 150.0;
    s += &format!(
        "<rect x=\"{lx:.1}\" y=\"{ly:.1}\" width=\"140\" height=\"46\" fill=\"white\" fill-opacity=\"0.85\" stroke=\"#999\"/>\n"
    );
    for (k, (label, color)) in [
        (name.to_string(), TRAIN_COLOR),
        (format!("val_{name}"), VAL_COLOR),
    ]
    .iter()
    .enumerate()
    {
        let y = ly + 16.0 + 20.0 * k as f64;
        s += &format!(
            "<line x1=\"{:.1}\" y1=\"{y:.1}\" x2=\"{:.1}\" y2=\"{y:.1}\" stroke=\"{color}\" stroke-width=\"2\"/>\n",
            lx + 8.0,
            lx + 32.0
        );
        s += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            lx + 38.0,
            y + 4.0,
            esc(label)
        );
    }
    s
}

/// The learning curves as an SVG document: the title, a second line
/// `subtitle` (the run's own result, beside the seed's figure the title
/// quotes), one panel for the loss and one for each metric (training and
/// validation per epoch), with ticks, axis labels, a legend, and dashed
/// lines where a new stage starts.
pub fn curves_svg(h: &RunHistory, title: &str, subtitle: &str) -> String {
    let metrics: Vec<String> = h
        .columns()
        .into_iter()
        .filter(|c| !c.starts_with("val_"))
        .collect();
    let panels = metrics.len().max(1);
    let (pw, ph) = (420.0, 300.0);
    let width = 90.0 + panels as f64 * (pw + 90.0);
    let height = ph + 130.0;
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width:.0}\" height=\"{height:.0}\" \
         viewBox=\"0 0 {width:.0} {height:.0}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{:.1}\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">{}</text>\n\
         <text x=\"{:.1}\" y=\"38\" text-anchor=\"middle\" font-size=\"13\" font-weight=\"bold\">{}</text>\n",
        width / 2.0,
        esc(title),
        width / 2.0,
        esc(subtitle)
    );
    for (i, m) in metrics.iter().enumerate() {
        s += &panel(h, m, 90.0 + i as f64 * (pw + 90.0), 60.0, pw, ph);
    }
    s += "</svg>\n";
    s
}
