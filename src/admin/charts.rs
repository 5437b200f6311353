//! The dashboard's charts: SVG drawn by plotters on the server, no script. Every chart has
//! labelled axes with units, time ticks in UTC and a legend; every plotted value has an
//! invisible target carrying its exact figures in a `<title>` (shown on hover), grouped per
//! series in `<g class="series" data-series="…">` so that tests and scrapers can read what is
//! drawn.

use plotters::coord::combinators::BindKeyPoints;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::service::TrafficPoint;

/// A time range the dashboard offers, and the bucket size it charts it with (minute rollups
/// for a day, hour rollups beyond).
pub(crate) struct Range {
    pub(crate) name: &'static str,
    pub(crate) secs: u64,
    pub(crate) span: u64,
}

pub(crate) const RANGES: [Range; 4] = [
    Range {
        name: "24h",
        secs: 86_400,
        span: 600,
    },
    Range {
        name: "7d",
        secs: 7 * 86_400,
        span: 3600,
    },
    Range {
        name: "30d",
        secs: 30 * 86_400,
        span: 6 * 3600,
    },
    Range {
        name: "90d",
        secs: 90 * 86_400,
        span: 86_400,
    },
];

/// The range a `?range=` names; 24 hours by default or for an unknown name.
pub(crate) fn range(name: Option<&str>) -> &'static Range {
    RANGES
        .iter()
        .find(|r| Some(r.name) == name)
        .unwrap_or(&RANGES[0])
}

impl Range {
    /// `10 min`, `1 h`, `6 h`, `1 day`: the bucket size in axis text.
    pub(crate) fn bucket_text(&self) -> String {
        match self.span {
            s if s >= 86_400 => format!("{} day", s / 86_400),
            s if s >= 3600 => format!("{} h", s / 3600),
            s => format!("{} min", s / 60),
        }
    }

    /// The API query of the same series: `since=…&resolution=…`.
    pub(crate) fn query(&self) -> String {
        format!("since={}s&resolution={}s", self.secs, self.span)
    }

    /// The first bucket start the chart shows, for a chart ending at `now`.
    pub(crate) fn start(&self, now: u64) -> u64 {
        let from = now.saturating_sub(self.secs);
        from - from % self.span
    }
}

/// Tick marks on whole hours or days (labelled) and the light grid between them, from `from`
/// to `to`.
fn time_ticks(range: &Range, from: u64, to: u64) -> (Vec<u64>, Vec<u64>) {
    let (bold, light) = match range.secs {
        s if s <= 86_400 => (3 * 3600, 3600),
        s if s <= 7 * 86_400 => (86_400, 6 * 3600),
        s if s <= 30 * 86_400 => (5 * 86_400, 86_400),
        _ => (15 * 86_400, 5 * 86_400),
    };
    let every = |step: u64| {
        let first = from.div_ceil(step) * step;
        (first..=to).step_by(step as usize).collect::<Vec<_>>()
    };
    (every(bold), every(light))
}

/// Time-axis text for a tick: time of day for a day, date and hour for a week, date beyond.
fn tick(t: u64, range: &Range) -> String {
    let d = crate::clock::utc(t);
    match range.secs {
        s if s <= 86_400 => format!("{:02}:{:02}", d.hour(), d.minute()),
        _ => format!("{:02}-{:02}", d.month() as u8, d.day()),
    }
}

/// `2026-12-06 04:10 UTC`: a bucket's start in hover text.
fn when(t: u64) -> String {
    let d = crate::clock::utc(t);
    format!(
        "{}-{:02}-{:02} {:02}:{:02} UTC",
        d.year(),
        d.month() as u8,
        d.day(),
        d.hour(),
        d.minute()
    )
}

/// One line of the share chart: a site, or every site together.
pub(crate) struct Line<'a> {
    pub(crate) label: String,
    pub(crate) color: RGBColor,
    pub(crate) points: &'a [TrafficPoint],
}

/// What the share chart marks besides its lines.
#[derive(Default)]
pub(crate) struct Marks {
    /// The readiness threshold, in percent served over TLS.
    pub(crate) threshold: Option<f64>,
    /// Stage changes: when, and the stage entered.
    pub(crate) events: Vec<(u64, String)>,
    /// Brownout windows: start and end.
    pub(crate) brownouts: Vec<(u64, u64)>,
}

/// Colours of the lines after the first, chosen apart from each other and from the
/// threshold's grey.
pub(crate) const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(214, 39, 40),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
];

const TLS_GREEN: RGBColor = RGBColor(30, 123, 52);
const CLEAR_RED: RGBColor = RGBColor(179, 38, 30);
const WIDTH: u32 = 720;
const HEIGHT: u32 = 320;

/// Invisible hover targets, one per plotted value, by series.
#[derive(Default)]
struct Hover {
    groups: Vec<(String, Vec<String>)>,
}

impl Hover {
    fn series(&mut self, name: &str) {
        self.groups.push((name.to_owned(), Vec::new()));
    }

    fn point(&mut self, (x, y): (i32, i32), bucket: u64, value: &str, title: &str) {
        if let Some((_, v)) = self.groups.last_mut() {
            v.push(format!(
                "<circle class=\"point\" cx=\"{x}\" cy=\"{y}\" r=\"6\" fill=\"#000\" fill-opacity=\"0\" pointer-events=\"all\" data-bucket=\"{bucket}\" data-value=\"{}\"><title>{}</title></circle>",
                esc(value),
                esc(title)
            ));
        }
    }

    /// Puts the targets into the SVG, over everything else.
    fn into_svg(self, mut svg: String) -> String {
        let mut extra = String::new();
        for (name, points) in self.groups {
            extra.push_str(&format!(
                "<g class=\"series\" data-series=\"{}\">{}</g>",
                esc(&name),
                points.concat()
            ));
        }
        match svg.rfind("</svg>") {
            Some(i) => svg.insert_str(i, &extra),
            None => svg.push_str(&extra),
        }
        svg
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Runs of buckets with traffic, so a line breaks where no request came.
fn runs(points: &[TrafficPoint], span: u64) -> Vec<Vec<(u64, f64)>> {
    let mut out: Vec<Vec<(u64, f64)>> = Vec::new();
    let mut last: Option<u64> = None;
    for p in points {
        let Some(share) = p.tls_percent else {
            continue;
        };
        if last.is_none_or(|l| p.bucket != l + span) {
            out.push(Vec::new());
        }
        if let Some(run) = out.last_mut() {
            run.push((p.bucket, share));
        }
        last = Some(p.bucket);
    }
    out
}

/// Draws the legend of the series drawn so far.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    c: &mut ChartContext<'a, DB, CT>,
    pos: SeriesLabelPosition,
) {
    let _ = c
        .configure_series_labels()
        .position(pos)
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .label_font(("sans-serif", 15))
        .draw();
}

/// The time axis: `from..to` with ticks on whole hours or days.
fn x_axis(
    range: &Range,
    from: u64,
    to: u64,
) -> plotters::coord::combinators::WithKeyPoints<plotters::coord::types::RangedCoordu64> {
    let (bold, light) = time_ticks(range, from, to);
    (from..to).with_key_points(bold).with_light_points(light)
}

/// The share of requests served over TLS per bucket, one line per entry of `lines`, from
/// `from` to `to`, with the readiness threshold, stage changes and brownouts marked.
pub(crate) fn share_chart(
    lines: &[Line<'_>],
    range: &Range,
    from: u64,
    to: u64,
    marks: &Marks,
) -> String {
    let lowest = lines
        .iter()
        .flat_map(|l| l.points.iter().filter_map(|p| p.tls_percent))
        .chain(marks.threshold)
        .fold(100.0f64, f64::min);
    // Room below the lowest value, on a multiple of 5: a share of 99.5% against a threshold
    // of 99.9% must not be drawn on the same pixel row.
    let lo = ((lowest - 2.0).max(0.0) / 5.0).floor() * 5.0;
    let mut hover = Hover::default();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let built = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x_axis(range, from, to), lo..100.5);
        if let Ok(mut c) = built {
            let fmt_x = |t: &u64| tick(*t, range);
            let fmt_y = |v: &f64| format!("{v:.0}%");
            let _ = c
                .configure_mesh()
                .y_labels(6)
                .x_label_formatter(&fmt_x)
                .y_label_formatter(&fmt_y)
                .x_desc("time (UTC)")
                .y_desc("served over TLS (%)")
                .label_style(("sans-serif", 16))
                .axis_desc_style(("sans-serif", 16))
                .light_line_style(RGBColor(238, 240, 243))
                .draw();
            for &(start, end) in &marks.brownouts {
                let (a, b) = (start.max(from), end.min(to));
                if a < b {
                    let _ = c.draw_series(std::iter::once(Rectangle::new(
                        [(a, lo), (b, 100.5)],
                        CLEAR_RED.mix(0.12).filled(),
                    )));
                }
            }
            if marks.brownouts.iter().any(|&(s, e)| s < to && e > from) {
                let _ = c
                    .draw_series(std::iter::empty::<Rectangle<(u64, f64)>>())
                    .map(|s| {
                        s.label("brownout").legend(|(x, y)| {
                            Rectangle::new(
                                [(x, y - 5), (x + 16, y + 5)],
                                CLEAR_RED.mix(0.2).filled(),
                            )
                        })
                    });
            }
            // A label close to the previous one goes a line lower, so both can be read.
            let (mut last_x, mut depth) = (None::<u64>, 0u32);
            for (t, stage) in &marks.events {
                if (from..=to).contains(t) {
                    depth = match last_x {
                        Some(x) if t.saturating_sub(x) < (to - from) / 12 => depth + 1,
                        _ => 0,
                    };
                    last_x = Some(*t);
                    let label_y = 100.0 - f64::from(depth % 4) * (100.5 - lo) * 0.07;
                    let style = ShapeStyle::from(&BLACK.mix(0.6)).stroke_width(1);
                    let _ =
                        c.draw_series(DashedLineSeries::new([(*t, lo), (*t, 100.5)], 4, 4, style));
                    let _ =
                        c.draw_series(std::iter::once(Text::new(stage.clone(), (*t, label_y), {
                            // Near the right edge the text runs leftwards, inside the chart.
                            let h = if *t > to - (to - from) / 5 {
                                HPos::Right
                            } else {
                                HPos::Left
                            };
                            ("sans-serif", 14)
                                .into_font()
                                .color(&BLACK)
                                .pos(Pos::new(h, VPos::Top))
                        })));
                }
            }
            if let Some(th) = marks.threshold {
                let grey = RGBColor(110, 110, 110);
                let _ = c
                    .draw_series(DashedLineSeries::new(
                        [(from, th), (to, th)],
                        6,
                        4,
                        ShapeStyle::from(&grey).stroke_width(2),
                    ))
                    .map(|s| {
                        s.label(format!("readiness threshold ({th}%)"))
                            .legend(move |(x, y)| {
                                PathElement::new(
                                    [(x, y), (x + 16, y)],
                                    ShapeStyle::from(&grey).stroke_width(2),
                                )
                            })
                    });
            }
            for line in lines {
                let color = line.color;
                let style = ShapeStyle::from(&color).stroke_width(2);
                let segments = runs(line.points, range.span);
                // An empty series still gets its legend entry: "no traffic" is a finding.
                let _ = c
                    .draw_series(LineSeries::new(
                        segments.first().cloned().unwrap_or_default(),
                        style,
                    ))
                    .map(|s| {
                        s.label(line.label.clone())
                            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], style))
                    });
                for seg in segments.iter().skip(1) {
                    let _ = c.draw_series(LineSeries::new(seg.clone(), style));
                }
                let _ = c.draw_series(
                    segments
                        .iter()
                        .flatten()
                        .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
                );
                hover.series(&line.label);
                for p in line.points {
                    if let Some(share) = p.tls_percent {
                        hover.point(
                            c.backend_coord(&(p.bucket, share)),
                            p.bucket,
                            &format!("{share:.3}"),
                            &format!(
                                "{}, {}: {share:.2}% over TLS ({} of {} requests; {} cleartext)",
                                line.label,
                                when(p.bucket),
                                p.tls,
                                p.tls + p.cleartext,
                                p.cleartext
                            ),
                        );
                    }
                }
            }
            legend(&mut c, SeriesLabelPosition::LowerLeft);
        }
        let _ = root.present();
    }
    hover.into_svg(svg)
}

/// Two counts per bucket stacked: `below` from zero, `above` on top of it.
pub(crate) struct Stack<'a> {
    pub(crate) below: (&'a str, RGBColor, fn(&TrafficPoint) -> u64),
    pub(crate) above: (&'a str, RGBColor, fn(&TrafficPoint) -> u64),
    /// The y axis' text, without the bucket (`requests`).
    pub(crate) what: &'a str,
}

/// Requests per bucket, two kinds stacked (cleartext under TLS; people under programs).
pub(crate) fn stacked_chart(
    points: &[TrafficPoint],
    stack: &Stack<'_>,
    range: &Range,
    from: u64,
    to: u64,
) -> String {
    let (below, above) = (stack.below, stack.above);
    let peak = points
        .iter()
        .map(|p| below.2(p) + above.2(p))
        .max()
        .unwrap_or(0)
        .max(1);
    let mut hover = Hover::default();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, 260)).into_drawing_area();
        let _ = root.fill(&WHITE);
        let built = ChartBuilder::on(&root)
            .margin(12)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(x_axis(range, from, to), 0u64..peak + peak / 10 + 1);
        if let Ok(mut c) = built {
            let fmt_x = |t: &u64| tick(*t, range);
            let y_desc = format!("{} per {}", stack.what, range.bucket_text());
            let _ = c
                .configure_mesh()
                .y_labels(5)
                .x_label_formatter(&fmt_x)
                .x_desc("time (UTC)")
                .y_desc(y_desc)
                .label_style(("sans-serif", 16))
                .axis_desc_style(("sans-serif", 16))
                .light_line_style(RGBColor(238, 240, 243))
                .draw();
            // Each bucket as a bar of its own width, so a lone busy bucket still shows.
            let span = range.span;
            let bars =
                |lo: fn(&TrafficPoint) -> u64, hi: fn(&TrafficPoint) -> u64, color: RGBColor| {
                    points
                        .iter()
                        .filter(move |p| hi(p) > lo(p))
                        .map(move |p| {
                            Rectangle::new(
                                [(p.bucket, lo(p)), ((p.bucket + span).min(to), hi(p))],
                                color.mix(0.75).filled(),
                            )
                        })
                        .collect::<Vec<_>>()
                };
            let b = below.2;
            let _ = c.draw_series(bars(|_| 0, b, below.1)).map(|s| {
                let color = below.1;
                s.label(below.0).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.mix(0.75).filled())
                })
            });
            let total_of = |p: &TrafficPoint| below.2(p) + above.2(p);
            let top: Vec<_> = points
                .iter()
                .filter(|p| above.2(p) > 0)
                .map(|p| {
                    Rectangle::new(
                        [
                            (p.bucket, below.2(p)),
                            ((p.bucket + span).min(to), total_of(p)),
                        ],
                        above.1.mix(0.75).filled(),
                    )
                })
                .collect();
            let _ = c.draw_series(top).map(|s| {
                let color = above.1;
                s.label(above.0).legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.mix(0.75).filled())
                })
            });
            for (name, f) in [(below.0, below.2), (above.0, above.2)] {
                hover.series(name);
                for p in points {
                    let n = f(p);
                    let y = if name == below.0 { n } else { total_of(p) };
                    hover.point(
                        c.backend_coord(&(p.bucket + span / 2, y)),
                        p.bucket,
                        &n.to_string(),
                        &format!(
                            "{}: {n} {} ({} {} and {} {} in all)",
                            when(p.bucket),
                            name,
                            below.2(p),
                            below.0,
                            above.2(p),
                            above.0
                        ),
                    );
                }
            }
            legend(&mut c, SeriesLabelPosition::UpperLeft);
        }
        let _ = root.present();
    }
    hover.into_svg(svg)
}

/// Requests per bucket: cleartext under TLS.
pub(crate) const TLS_AND_CLEARTEXT: Stack<'static> = Stack {
    below: ("cleartext", CLEAR_RED, |p| p.cleartext),
    above: ("over TLS", TLS_GREEN, |p| p.tls),
    what: "requests",
};

/// Cleartext requests per bucket: likely people under likely programs.
pub(crate) const HUMAN_AND_AUTOMATED: Stack<'static> = Stack {
    below: ("likely people (browsers)", RGBColor(31, 119, 180), |p| {
        p.cleartext_likely_human
    }),
    above: (
        "likely programs (scripts, SDKs, bots, devices)",
        RGBColor(255, 127, 14),
        |p| p.cleartext_likely_automated,
    ),
    what: "cleartext requests",
};

/// The first line's colour (every site together, or the site itself).
pub(crate) const FIRST: RGBColor = TLS_GREEN;
