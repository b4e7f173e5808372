//! The bench report's picture: the forwarding rate at ≤ 0.5 % loss (PDR, Mpps) by mode, end
//! to end on veth, as bars with min–max whiskers, one bar per (mode, flow count). plotters'
//! bitmap backend with the font read from Debian's `fonts-dejavu-core` (no fontconfig).

use std::path::Path;

use anyhow::{Context, Result};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
    style::FontStyle,
};

use crate::{median, min_max, pps_bench::PpsRow};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Short x-axis name of a row.
fn label(r: &PpsRow) -> String {
    let mode = r
        .target
        .name()
        .split([':', '(', ','])
        .next()
        .unwrap_or("")
        .trim();
    let mode = mode.strip_prefix("xdplb ").unwrap_or(mode);
    let mode = mode.strip_suffix(" DNAT").unwrap_or(mode);
    let mode = if r.target.two_way() {
        format!("{mode} 2-way")
    } else {
        mode.to_string()
    };
    let flows = if r.flows >= 1000 {
        format!("{}k", r.flows / 1000)
    } else {
        r.flows.to_string()
    };
    format!("{mode} · {flows}")
}

/// Draw `rows` into the PNG at `path`.
pub fn pps_png(rows: &[PpsRow], title: &str, path: &Path) -> Result<()> {
    let font: &'static [u8] = Box::leak(
        std::fs::read(FONT)
            .with_context(|| format!("{FONT} (Debian package fonts-dejavu-core)"))?
            .into_boxed_slice(),
    );
    plotters::style::register_font("sans-serif", FontStyle::Normal, font)
        .map_err(|_| anyhow::anyhow!("{FONT} is not a usable font"))?;

    let n = rows.len() as u32;
    let top = rows
        .iter()
        .map(|r| min_max(&r.pdr_mpps).1)
        .fold(0.0, f64::max)
        * 1.2;
    let root = BitMapBackend::new(path, (1200, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (0u32..n.saturating_sub(1)).into_segmented(),
            0.0..top.max(0.1),
        )?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .y_desc("Mpps forwarded at ≤ 0.5 % loss (median of runs; whisker: min–max)")
        .x_labels(n as usize)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => rows.get(*i as usize).map(label).unwrap_or_default(),
            _ => String::new(),
        })
        .label_style(("sans-serif", 13))
        .draw()?;

    for (flows, colour, name) in [(1u32, BLUE, "1 flow"), (10_000, RED, "10k flows")] {
        let style = colour.mix(0.6).filled();
        chart
            .draw_series(
                rows.iter()
                    .enumerate()
                    .filter(|(_, r)| r.flows == flows)
                    .map(move |(i, r)| {
                        let i = i as u32;
                        let mut bar = Rectangle::new(
                            [
                                (SegmentValue::Exact(i), 0.0),
                                (SegmentValue::Exact(i + 1), median(&r.pdr_mpps)),
                            ],
                            style,
                        );
                        bar.set_margin(0, 0, 12, 12);
                        bar
                    }),
            )?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 6), (x + 16, y + 6)], style));
    }
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let (min, max) = min_max(&r.pdr_mpps);
        let x = SegmentValue::CenterOf(i as u32);
        PathElement::new(vec![(x.clone(), min), (x, max)], BLACK.stroke_width(2))
    }))?;
    let above = ("sans-serif", 13)
        .into_font()
        .into_text_style(&root)
        .pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(rows.iter().enumerate().map(|(i, r)| {
        let m = median(&r.pdr_mpps);
        let top_of_whisker = min_max(&r.pdr_mpps).1;
        Text::new(
            format!("{m:.2}"),
            (
                SegmentValue::CenterOf(i as u32),
                top_of_whisker + top * 0.01,
            ),
            above.clone(),
        )
    }))?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .label_font(("sans-serif", 14))
        .draw()?;
    root.present()?;
    Ok(())
}
