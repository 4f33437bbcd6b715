//! Hand-written SVG charts for the bench reports (no plotting dependency): grouped bars
//! (`compare`'s latency and CPU charts) and lines over a numeric x axis (`fleet`'s TTFT
//! against offered rate). Every mark carries a `<title>` with its value, and the text is
//! escaped, so a chart is also a readable record of the figures.

use std::fmt::Write as _;

pub fn esc(t: &str) -> String {
    t.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A "nice" axis step (1, 2 or 5 × 10^k) giving about five ticks up to `max`.
pub fn nice_step(max: f64) -> f64 {
    if !(max.is_finite() && max > 0.0) {
        return 1.0;
    }
    let raw = max / 5.0;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let m = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

pub fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        let s = format!("{v:.2}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        let s = format!("{v:.4}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 80.0;

fn svg_open(title: &str, subtitle: &str) -> String {
    svg_open_sized(title, subtitle, H)
}

/// The document, its white background and its titles, `h` pixels tall.
fn svg_open_sized(title: &str, subtitle: &str, h: f64) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h}\" \
         viewBox=\"0 0 {W} {h}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(
        s,
        "<rect x=\"0\" y=\"0\" width=\"{W}\" height=\"{h}\" fill=\"white\"/>"
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"22\" text-anchor=\"middle\" font-size=\"15\" font-weight=\"bold\">{}</text>",
        W / 2.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"38\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
        W / 2.0,
        esc(subtitle)
    );
    s
}

/// A horizontal grid line at `y` (pixels) labelled `v` on the left.
fn grid_line(s: &mut String, y: f64, v: f64, stroke: &str) {
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"{stroke}\"/>",
        W - RIGHT
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
        LEFT - 6.0,
        y + 4.0,
        fmt_num(v)
    );
}

/// The y axis from 0 to `top` (data units) with grid lines; returns the scale.
fn y_axis(s: &mut String, max: f64, unit: &str) -> f64 {
    let step = nice_step(max);
    let top = (max / step).ceil().max(1.0) * step;
    let plot_h = H - TOP - BOTTOM;
    let mut v = 0.0;
    while v <= top + step / 2.0 {
        grid_line(s, H - BOTTOM - v / top * plot_h, v, "#ddd");
        v += step;
    }
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">{}</text>",
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        esc(unit)
    );
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#333\"/>",
        H - BOTTOM,
        W - RIGHT,
        H - BOTTOM
    );
    plot_h / top
}

/// Grouped bars: one group per system, one bar per series.
pub fn bars(
    title: &str,
    subtitle: &str,
    unit: &str,
    series: &[(&str, &str)],
    groups: &[(String, Vec<f64>)],
) -> String {
    let mut s = svg_open(title, subtitle);
    let max = groups
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max);
    let scale = y_axis(&mut s, max, unit);
    let plot_w = W - LEFT - RIGHT;
    let n = groups.len().max(1) as f64;
    let group_w = plot_w / n;
    let bar_w = (group_w * 0.8 / series.len().max(1) as f64).min(60.0);
    for (gi, (name, vals)) in groups.iter().enumerate() {
        let gx = LEFT + gi as f64 * group_w;
        let x0 = gx + (group_w - bar_w * series.len() as f64) / 2.0;
        for (si, ((key, color), v)) in series.iter().zip(vals).enumerate() {
            let h = (v * scale).max(0.0);
            let x = x0 + si as f64 * bar_w;
            let y = H - BOTTOM - h;
            let _ = writeln!(
                s,
                "<rect class=\"bar {key}\" data-system=\"{}\" x=\"{x:.1}\" y=\"{y:.1}\" \
                 width=\"{:.1}\" height=\"{h:.1}\" fill=\"{color}\"><title>{} {key}: {} {}</title></rect>",
                esc(name),
                bar_w - 2.0,
                esc(name),
                fmt_num(*v),
                esc(unit)
            );
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            gx + group_w / 2.0,
            H - BOTTOM + 18.0,
            esc(name)
        );
    }
    // Legend.
    if series.len() > 1 {
        for (i, (key, color)) in series.iter().enumerate() {
            let x = LEFT + i as f64 * 90.0;
            let y = H - 28.0;
            let _ = writeln!(
                s,
                "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"12\" fill=\"{color}\"/>",
                y - 10.0
            );
            let _ = writeln!(
                s,
                "<text x=\"{:.1}\" y=\"{y:.1}\">{}</text>",
                x + 16.0,
                esc(key)
            );
        }
    }
    s.push_str("</svg>\n");
    s
}

/// Colours of successive series.
const PALETTE: [&str; 10] = [
    "#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
    "#9c755f", "#bab0ac",
];

/// One line of a [`lines`] chart: its name and its (x, y) points; y ≤ 0 or not finite is
/// a missing point (the line breaks there).
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// Lines over a numeric x axis (ticks at the x values that occur), y on a log10 scale
/// (latencies that span milliseconds to seconds stay readable side by side), a legend
/// under the plot.
pub fn lines(title: &str, subtitle: &str, x_unit: &str, y_unit: &str, series: &[Series]) -> String {
    let legend_rows = series.len().div_ceil(4).max(1) as f64;
    let h = H + 16.0 * legend_rows;
    let bottom = BOTTOM + 16.0 * legend_rows;
    let mut s = svg_open_sized(title, subtitle, h);
    let ok = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && y > 0.0;
    let all: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|x| x.points.iter().copied())
        .filter(ok)
        .collect();
    let (xmin, xmax) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (ymin, ymax) = all
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if all.is_empty() {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data</text>\n</svg>",
            W / 2.0,
            h / 2.0
        );
        return s;
    }
    // Decades that hold every value.
    let lo = 10f64.powf(ymin.log10().floor());
    let hi = 10f64.powf(ymax.log10().ceil()).max(lo * 10.0);
    let plot_h = h - TOP - bottom;
    let plot_w = W - LEFT - RIGHT;
    let y_of = |v: f64| h - bottom - (v / lo).log10() / (hi / lo).log10() * plot_h;
    let span = (xmax - xmin).max(1e-9);
    let pad = if xmax > xmin { 0.05 * span } else { 1.0 };
    let x_of = |v: f64| LEFT + (v - xmin + pad) / (span + 2.0 * pad) * plot_w;
    let mut decade = lo;
    while decade <= hi * 1.0001 {
        for m in [1.0, 2.0, 5.0] {
            let v = decade * m;
            if v > hi * 1.0001 {
                break;
            }
            let stroke = if m == 1.0 { "#bbb" } else { "#e6e6e6" };
            grid_line(&mut s, y_of(v), v, stroke);
        }
        decade *= 10.0;
    }
    let _ = writeln!(
        s,
        "<text x=\"16\" y=\"{:.1}\" transform=\"rotate(-90 16 {:.1})\" text-anchor=\"middle\">{} (log scale)</text>",
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0,
        esc(y_unit)
    );
    let axis_y = h - bottom;
    let _ = writeln!(
        s,
        "<line x1=\"{LEFT}\" y1=\"{axis_y}\" x2=\"{}\" y2=\"{axis_y}\" stroke=\"#333\"/>",
        W - RIGHT
    );
    let mut xs: Vec<f64> = all.iter().map(|p| p.0).collect();
    xs.sort_by(f64::total_cmp);
    xs.dedup();
    for x in &xs {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
            x_of(*x),
            axis_y + 18.0,
            fmt_num(*x)
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
        LEFT + plot_w / 2.0,
        axis_y + 36.0,
        esc(x_unit)
    );
    for (i, line) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let mut path = String::new();
        let mut pen_down = false;
        for p in &line.points {
            if ok(p) {
                let _ = write!(
                    path,
                    "{}{:.1},{:.1} ",
                    if pen_down { "L" } else { "M" },
                    x_of(p.0),
                    y_of(p.1)
                );
                pen_down = true;
            } else {
                pen_down = false;
            }
        }
        if !path.is_empty() {
            let _ = writeln!(
                s,
                "<path class=\"line\" data-series=\"{}\" d=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2\"/>",
                esc(&line.name),
                path.trim_end()
            );
        }
        for p in line.points.iter().filter(|p| ok(p)) {
            let _ = writeln!(
                s,
                "<circle class=\"point\" data-series=\"{}\" cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"><title>{}: {} {} → {} {}</title></circle>",
                esc(&line.name),
                x_of(p.0),
                y_of(p.1),
                esc(&line.name),
                fmt_num(p.0),
                esc(x_unit),
                fmt_num(p.1),
                esc(y_unit)
            );
        }
        let x = LEFT + (i % 4) as f64 * 170.0;
        let y = axis_y + 56.0 + (i / 4) as f64 * 16.0;
        let _ = writeln!(
            s,
            "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"12\" height=\"4\" fill=\"{color}\"/>",
            y - 6.0
        );
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{y:.1}\">{}</text>",
            x + 16.0,
            esc(&line.name)
        );
    }
    s.push_str("</svg>\n");
    s
}
