//! The page's markup: the HTML document, its legend and the SVG map, written from a laid-out
//! graph. Every string that came from the input goes through [`Esc`]; the style and script are
//! fixed files (`html/page.css`, `html/page.js`) that the Content Security Policy admits by
//! hash, and nothing else may run or load. Computes no geometry.

use std::fmt::{self, Display, Formatter, Write};

use crate::Options;
use crate::graph::{self, Graph, Node, Verdict};
use crate::layout::{self, Layout, Piece, Rect, Segment};
use crate::sha256;

/// The page's only style sheet.
pub(crate) const STYLE: &str = include_str!("html/page.css");
/// The page's only script.
pub(crate) const SCRIPT: &str = include_str!("html/page.js");

const STYLE_HASH: [u8; 44] = sha256::base64(&sha256::digest(STYLE.as_bytes()));
const SCRIPT_HASH: [u8; 44] = sha256::base64(&sha256::digest(SCRIPT.as_bytes()));

/// What the page may load and run: its own inline style and script, nothing else, from
/// nowhere.
pub(crate) fn content_security_policy() -> String {
    let style = String::from_utf8_lossy(&STYLE_HASH);
    let script = String::from_utf8_lossy(&SCRIPT_HASH);
    format!(
        "default-src 'none'; style-src 'sha256-{style}'; script-src 'sha256-{script}'; \
         base-uri 'none'; form-action 'none'"
    )
}

/// The whole document.
pub(crate) fn page(graph: &Graph<'_>, layout: &Layout, options: &Options) -> String {
    Page {
        graph,
        layout,
        options,
    }
    .to_string()
}

struct Page<'a> {
    graph: &'a Graph<'a>,
    layout: &'a Layout,
    options: &'a Options,
}

impl Display for Page<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let Options { title, subtitle } = self.options;
        let title = if title.is_empty() { "flow map" } else { title };
        f.write_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n")?;
        writeln!(
            f,
            "<meta http-equiv=\"Content-Security-Policy\" content=\"{}\">",
            content_security_policy()
        )?;
        f.write_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n")?;
        writeln!(f, "<title>{}</title>", Esc(title))?;
        writeln!(f, "<style>{STYLE}</style>\n</head>\n<body>\n<header>")?;
        writeln!(f, "<h1>{}</h1>", Esc(title))?;
        if !subtitle.is_empty() {
            writeln!(f, "<p class=\"subtitle\">{}</p>", Esc(subtitle))?;
        }
        self.summary(f)?;
        legend(f)?;
        f.write_str("</header>\n<main>\n")?;
        if self.graph.edges.is_empty() {
            f.write_str(
                "<svg id=\"flowmap\" width=\"400\" height=\"60\" viewBox=\"0 0 400 60\" \
                 role=\"img\" aria-label=\"no flows observed\">\n\
                 <text class=\"empty\" x=\"20\" y=\"36\">no flows observed</text>\n</svg>\n",
            )?;
        } else {
            self.map(f)?;
        }
        writeln!(f, "</main>\n<script>{SCRIPT}</script>\n</body>\n</html>")
    }
}

impl Page<'_> {
    /// One line of totals under the title.
    fn summary(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let flows = self
            .graph
            .edges
            .iter()
            .fold(0u64, |sum, e| sum.saturating_add(e.count));
        let services = self
            .graph
            .nodes
            .iter()
            .filter(|n| matches!(n, Node::Service(_)))
            .count();
        let workloads = self.graph.nodes.len() - services;
        writeln!(
            f,
            "<p class=\"summary\">{flows} {} in {} {} between {workloads} {} through {services} {}</p>",
            plural(flows, "flow", "flows"),
            self.graph.edges.len(),
            plural(self.graph.edges.len() as u64, "edge", "edges"),
            plural(workloads as u64, "workload", "workloads"),
            plural(services as u64, "service", "services"),
        )
    }

    fn map(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let Layout {
            width,
            height,
            groups,
            nodes,
            edges,
        } = self.layout;
        writeln!(
            f,
            "<svg id=\"flowmap\" width=\"{w}\" height=\"{h}\" viewBox=\"0 0 {w} {h}\" role=\"img\" \
             aria-label=\"service map\">",
            w = N(width.ceil()),
            h = N(height.ceil()),
        )?;
        f.write_str("<g class=\"groups\">\n")?;
        for g in groups {
            let (kind, name) = g.group.label();
            write!(
                f,
                "<g class=\"group {}\">{}<text class=\"group-label\" x=\"{}\" y=\"{}\">",
                g.group.class(),
                RectEl(&g.rect, 10.0),
                N(g.label.x),
                N(g.label.y + layout::GROUP_FONT),
            )?;
            if name.is_empty() {
                write!(f, "{}", Esc(kind))?;
            } else {
                write!(
                    f,
                    "<tspan class=\"group-kind\">{kind} </tspan>{}",
                    Esc(&name)
                )?;
            }
            f.write_str("</text></g>\n")?;
        }
        f.write_str("</g>\n<g class=\"edges\">\n")?;
        for (i, (edge, shape)) in self.graph.edges.iter().zip(edges).enumerate() {
            let service = edge.service.as_deref().unwrap_or("");
            writeln!(
                f,
                "<g class=\"edge {}\" data-edge=\"{i}\" data-source=\"{}\" data-destination=\"{}\" \
                 data-service=\"{}\" data-verdict=\"{}\" data-count=\"{}\">",
                Verdict::of(&edge.verdict).class(),
                Esc(&graph::workload_key(&edge.source)),
                Esc(&graph::destination_key(edge)),
                Esc(service),
                Esc(&edge.verdict),
                edge.count,
            )?;
            writeln!(f, "<title>{}</title>", Esc(&graph::edge_title(edge)))?;
            for segment in &shape.segments {
                writeln!(f, "{}", SegmentEl(segment, shape.width))?;
            }
            let center = shape.label.center();
            writeln!(
                f,
                "<text class=\"count\" x=\"{}\" y=\"{}\" text-anchor=\"middle\" \
                 dominant-baseline=\"central\">{}</text>\n</g>",
                N(center.x),
                N(center.y),
                edge.count
            )?;
        }
        f.write_str("</g>\n<g class=\"nodes\">\n")?;
        for (i, (node, rect)) in self.graph.nodes.iter().zip(nodes).enumerate() {
            let kind = match node {
                Node::Workload(_) if node.is_peer() => "workload peer",
                Node::Workload(_) => "workload",
                Node::Service(_) => "service",
            };
            let (out, into) = (self.graph.flows_out[i], self.graph.flows_in[i]);
            let flows = match node {
                Node::Service(_) => format!("{into} {}", plural(into, "flow", "flows")),
                Node::Workload(_) => {
                    format!("{out} {} out, {into} in", plural(out, "flow", "flows"))
                }
            };
            write!(
                f,
                "<g class=\"node {kind}\" data-node=\"{}\" tabindex=\"0\"><title>{}: {flows}</title>",
                Esc(&node.key()),
                Esc(&node.title()),
            )?;
            let radius = match node {
                Node::Service(_) => rect.h / 2.0,
                Node::Workload(_) => 5.0,
            };
            write!(f, "{}", RectEl(rect, radius))?;
            let (name, namespace) = node.lines();
            let center = rect.center();
            match namespace {
                Some(ns) => write!(
                    f,
                    "<text class=\"name\" x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>\
                     <text class=\"ns\" x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{}</text>",
                    N(rect.y + 16.0),
                    Esc(&name),
                    N(rect.y + 30.0),
                    Esc(&ns),
                    x = N(center.x),
                )?,
                None => write!(
                    f,
                    "<text class=\"name\" x=\"{}\" y=\"{}\" text-anchor=\"middle\" \
                     dominant-baseline=\"central\">{}</text>",
                    N(center.x),
                    N(center.y),
                    Esc(&name),
                )?,
            }
            f.write_str("</g>\n")?;
        }
        f.write_str("</g>\n</svg>\n")
    }
}

/// The legend: a swatch per verdict, the node shapes, what the width means.
fn legend(f: &mut Formatter<'_>) -> fmt::Result {
    f.write_str("<div class=\"legend\">\n")?;
    for verdict in Verdict::ALL {
        writeln!(
            f,
            "<span><svg width=\"36\" height=\"12\" viewBox=\"0 0 36 12\" aria-hidden=\"true\">\
             <g class=\"{}\"><path d=\"M2 6H26\" stroke-width=\"3\" fill=\"none\"/>\
             <polygon points=\"34,6 26,1.5 26,10.5\"/></g></svg>{}</span>",
            verdict.class(),
            verdict.legend(),
        )?;
    }
    f.write_str(
        "<span><svg width=\"30\" height=\"16\" viewBox=\"0 0 30 16\" aria-hidden=\"true\">\
         <g class=\"node workload\"><rect x=\"1\" y=\"1\" width=\"28\" height=\"14\" rx=\"3\"/></g>\
         </svg>workload</span>\n\
         <span><svg width=\"30\" height=\"16\" viewBox=\"0 0 30 16\" aria-hidden=\"true\">\
         <g class=\"node service\"><rect x=\"1\" y=\"1\" width=\"28\" height=\"14\" rx=\"7\"/></g>\
         </svg>service</span>\n\
         <span>line width: flows (log scale); number: flows</span>\n</div>\n",
    )
}

fn plural(n: u64, one: &'static str, many: &'static str) -> &'static str {
    if n == 1 { one } else { many }
}

/// `s` escaped for HTML text and attribute values; control characters become U+FFFD.
pub(crate) struct Esc<'a>(pub(crate) &'a str);

impl Display for Esc<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        for c in self.0.chars() {
            match c {
                '&' => f.write_str("&amp;")?,
                '<' => f.write_str("&lt;")?,
                '>' => f.write_str("&gt;")?,
                '"' => f.write_str("&quot;")?,
                '\'' => f.write_str("&#39;")?,
                c if c.is_control() => f.write_char('\u{FFFD}')?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

/// A coordinate, to a tenth of a pixel.
struct N(f64);

impl Display for N {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        // No "-0.0": the same geometry always prints the same.
        let v = if self.0.abs() < 0.05 { 0.0 } else { self.0 };
        write!(f, "{v:.1}")
    }
}

struct RectEl<'a>(&'a Rect, f64);

impl Display for RectEl<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let RectEl(r, radius) = self;
        write!(
            f,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" rx=\"{}\"/>",
            N(r.x),
            N(r.y),
            N(r.w),
            N(r.h),
            N(*radius)
        )
    }
}

/// A segment: its path and its arrowhead.
struct SegmentEl<'a>(&'a Segment, f64);

impl Display for SegmentEl<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let SegmentEl(segment, width) = self;
        f.write_str("<path d=\"")?;
        if let Some(first) = segment.pieces.first() {
            let from = first.from();
            write!(f, "M{} {}", N(from.x), N(from.y))?;
        }
        for piece in &segment.pieces {
            match piece {
                Piece::Cubic { c0, c1, to, .. } => write!(
                    f,
                    "C{} {} {} {} {} {}",
                    N(c0.x),
                    N(c0.y),
                    N(c1.x),
                    N(c1.y),
                    N(to.x),
                    N(to.y)
                )?,
                Piece::Line { to, .. } => write!(f, "L{} {}", N(to.x), N(to.y))?,
            }
        }
        let (tip, base, half) = (segment.tip, segment.base(), segment.half_width);
        write!(
            f,
            "\" stroke-width=\"{}\"/><polygon points=\"{},{} {},{} {},{}\"/>",
            N(*width),
            N(tip.x),
            N(tip.y),
            N(base.x),
            N(base.y - half),
            N(base.x),
            N(base.y + half),
        )
    }
}
