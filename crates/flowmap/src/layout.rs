//! The geometry of the map, in SVG user units (pixels): where each group, node, edge curve and
//! count label goes. Deterministic: sorted inputs, no hashing, no randomness. Writes no markup.
//!
//! Three columns: clusters stacked on the left and on the right (each cluster goes to the
//! shorter side, in name order), and between them a neutral column with the services above
//! the peers outside the mesh. A cluster's nodes are rows of equal height in name order; a
//! middle node sits as near as it fits to the mean height of its neighbours in the clusters
//! (least squares, order kept), so edges run as level as they can. Every node of a column has
//! that column's width, which fits its longest (clipped) label, so labels cannot overlap.
//!
//! Edges are cubic curves between ports spread along a node's side, ordered by where the other
//! end is, so parallel edges stay apart. An edge between two nodes of one column loops out on
//! the column's outer side; an edge from the left column to the right one crosses the middle
//! column straight, in a lane of its own between the nodes there. Each count label goes to the
//! first place along its edge that overlaps no node, group label or earlier count label.

use std::collections::BTreeMap;

use crate::graph::{self, Graph, Group};

pub(crate) const MARGIN: f64 = 20.0;
/// Between two columns: room for the curves and their count labels.
pub(crate) const GUTTER: f64 = 170.0;
/// Outside the first or last column, when edges loop out there.
pub(crate) const LOOP_ROOM: f64 = 72.0;
/// Inside a group, around its nodes.
pub(crate) const GROUP_PAD: f64 = 14.0;
/// The group's label above its first node.
pub(crate) const GROUP_HEADER: f64 = 36.0;
/// Between two groups of one column.
pub(crate) const GROUP_GAP: f64 = 26.0;
pub(crate) const NODE_H: f64 = 38.0;
pub(crate) const NODE_GAP: f64 = 12.0;
/// Text to node border, left and right.
pub(crate) const NODE_PAD: f64 = 12.0;
pub(crate) const NODE_MIN_W: f64 = 150.0;
/// Font sizes, as the page's style sets them.
pub(crate) const NAME_FONT: f64 = 12.0;
pub(crate) const NS_FONT: f64 = 10.5;
pub(crate) const GROUP_FONT: f64 = 13.0;
pub(crate) const COUNT_FONT: f64 = 11.0;
/// The height of a count label's box.
const COUNT_H: f64 = 14.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Point {
    pub(crate) x: f64,
    pub(crate) y: f64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Rect {
    pub(crate) x: f64,
    pub(crate) y: f64,
    pub(crate) w: f64,
    pub(crate) h: f64,
}

impl Rect {
    pub(crate) fn right(&self) -> f64 {
        self.x + self.w
    }

    pub(crate) fn bottom(&self) -> f64 {
        self.y + self.h
    }

    pub(crate) fn center(&self) -> Point {
        Point {
            x: self.x + self.w / 2.0,
            y: self.y + self.h / 2.0,
        }
    }

    /// Whether the two share more than a border.
    pub(crate) fn overlaps(&self, other: &Rect) -> bool {
        self.x < other.right()
            && other.x < self.right()
            && self.y < other.bottom()
            && other.y < self.bottom()
    }

    fn grown(&self, by: f64) -> Rect {
        Rect {
            x: self.x - by,
            y: self.y - by,
            w: self.w + 2.0 * by,
            h: self.h + 2.0 * by,
        }
    }
}

/// A group's box and the box of its label.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct GroupBox {
    pub(crate) group: Group,
    pub(crate) rect: Rect,
    pub(crate) label: Rect,
}

/// One piece of a segment's path.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Piece {
    Cubic {
        from: Point,
        c0: Point,
        c1: Point,
        to: Point,
    },
    Line {
        from: Point,
        to: Point,
    },
}

impl Piece {
    pub(crate) fn from(&self) -> Point {
        match *self {
            Piece::Cubic { from, .. } | Piece::Line { from, .. } => from,
        }
    }

    /// The point at `t` in 0..=1 along the piece.
    pub(crate) fn at(&self, t: f64) -> Point {
        let u = 1.0 - t;
        match *self {
            Piece::Cubic { from, c0, c1, to } => {
                let (a, b, c, d) = (u * u * u, 3.0 * u * u * t, 3.0 * u * t * t, t * t * t);
                Point {
                    x: a * from.x + b * c0.x + c * c1.x + d * to.x,
                    y: a * from.y + b * c0.y + c * c1.y + d * to.y,
                }
            }
            Piece::Line { from, to } => Point {
                x: u * from.x + t * to.x,
                y: u * from.y + t * to.y,
            },
        }
    }

    /// Its end and control points: the curve lies in their hull.
    pub(crate) fn points(&self) -> Vec<Point> {
        match *self {
            Piece::Cubic { from, c0, c1, to } => vec![from, c0, c1, to],
            Piece::Line { from, to } => vec![from, to],
        }
    }
}

/// One segment of an edge, from node to node: its path (curves, and a straight lane across the
/// middle column when it passes it), then an arrowhead from the path's end to `tip` (on the
/// border of the node it enters).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Segment {
    pub(crate) pieces: Vec<Piece>,
    pub(crate) tip: Point,
    /// Half the arrowhead's width at its base.
    pub(crate) half_width: f64,
}

impl Segment {
    /// Where the path ends and the arrowhead starts.
    pub(crate) fn base(&self) -> Point {
        match self.pieces.last() {
            Some(Piece::Cubic { to, .. } | Piece::Line { to, .. }) => *to,
            None => self.tip,
        }
    }
}

/// How one edge is drawn.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct EdgeShape {
    pub(crate) width: f64,
    pub(crate) segments: Vec<Segment>,
    /// The box of its count label; the text is centred in it.
    pub(crate) label: Rect,
}

/// Where everything goes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    pub(crate) width: f64,
    pub(crate) height: f64,
    pub(crate) groups: Vec<GroupBox>,
    /// Per node of the graph, in its order.
    pub(crate) nodes: Vec<Rect>,
    /// Per edge of the graph, in its order.
    pub(crate) edges: Vec<EdgeShape>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Column {
    Left,
    Neutral,
    Right,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Side {
    Left,
    Right,
}

impl Side {
    /// +1 towards the right, −1 towards the left.
    fn sign(self) -> f64 {
        match self {
            Side::Left => -1.0,
            Side::Right => 1.0,
        }
    }
}

/// The sides a segment leaves and enters by: facing each other across columns, or both on the
/// column's outer side (the neutral column loops out to the right).
fn sides(from: Column, to: Column) -> (Side, Side) {
    match from.cmp(&to) {
        std::cmp::Ordering::Less => (Side::Right, Side::Left),
        std::cmp::Ordering::Greater => (Side::Left, Side::Right),
        std::cmp::Ordering::Equal if from == Column::Left => (Side::Left, Side::Left),
        std::cmp::Ordering::Equal => (Side::Right, Side::Right),
    }
}

fn group_height(nodes: usize) -> f64 {
    let n = nodes as f64;
    GROUP_HEADER + n * NODE_H + (n - 1.0).max(0.0) * NODE_GAP + GROUP_PAD
}

/// An estimate of the width of `text` drawn in a sans-serif font of `size` pixels, on the wide
/// side (DejaVu Sans, the widest common default), so that boxes sized by it hold their text.
pub(crate) fn text_width(text: &str, size: f64) -> f64 {
    let em: f64 = text
        .chars()
        .map(|c| match c {
            'i' | 'j' | 'l' | '.' | ',' | ':' | ';' | '!' | '|' | '\'' | ' ' => 0.36,
            'f' | 't' | 'r' | 'I' | '(' | ')' | '[' | ']' | '/' | '-' | '"' => 0.46,
            'm' | 'w' | 'M' | 'W' | '@' | '%' => 1.0,
            'A'..='Z' | '0'..='9' | '_' | '&' | '#' | '<' | '>' | '=' | '+' | '~' | '…' => 0.78,
            c if c.is_ascii() => 0.64,
            _ => 1.0,
        })
        .sum();
    em * size
}

impl Layout {
    pub(crate) fn new(graph: &Graph<'_>) -> Self {
        // Groups and their nodes, in order.
        let mut members: BTreeMap<Group, Vec<usize>> = BTreeMap::new();
        for (i, node) in graph.nodes.iter().enumerate() {
            members.entry(node.group()).or_default().push(i);
        }

        // Clusters to the shorter side, in name order; services and outside in the middle.
        let mut column_of: BTreeMap<&Group, Column> = BTreeMap::new();
        let (mut left, mut right) = (0.0, 0.0);
        for (group, nodes) in &members {
            let column = match group {
                Group::Cluster(_) => {
                    let h = group_height(nodes.len()) + GROUP_GAP;
                    if left <= right {
                        left += h;
                        Column::Left
                    } else {
                        right += h;
                        Column::Right
                    }
                }
                Group::Services | Group::Outside => Column::Neutral,
            };
            column_of.insert(group, column);
        }
        let node_column: Vec<Column> = graph
            .nodes
            .iter()
            .map(|n| {
                column_of
                    .get(&n.group())
                    .copied()
                    .unwrap_or(Column::Neutral)
            })
            .collect();

        // Column widths: the widest node label or group label of the column.
        let mut node_width: BTreeMap<Column, f64> = BTreeMap::new();
        for (group, nodes) in &members {
            let column = column_of.get(group).copied().unwrap_or(Column::Neutral);
            let (kind, name) = group.label();
            let mut w = text_width(&format!("{kind} {name}"), GROUP_FONT) + 4.0;
            for &i in nodes {
                let (name, namespace) = graph.nodes[i].lines();
                w = w.max(text_width(&name, NAME_FONT) + 2.0 * NODE_PAD);
                if let Some(ns) = namespace {
                    w = w.max(text_width(&ns, NS_FONT) + 2.0 * NODE_PAD);
                }
            }
            let slot = node_width.entry(column).or_insert(NODE_MIN_W);
            *slot = slot.max(w.ceil());
        }

        // Edges that loop out of the first or last column need room outside it.
        let columns: Vec<Column> = node_width.keys().copied().collect();
        let mut loops_left = false;
        let mut loops_right = false;
        for segments in &graph.segments {
            for &(a, b) in segments {
                let (ca, cb) = (node_column[a], node_column[b]);
                if ca == cb {
                    match sides(ca, cb).0 {
                        Side::Left => loops_left |= columns.first() == Some(&ca),
                        Side::Right => loops_right |= columns.last() == Some(&ca),
                    }
                }
            }
        }

        // Column positions.
        let mut column_x: BTreeMap<Column, f64> = BTreeMap::new();
        let mut x = MARGIN + if loops_left { LOOP_ROOM } else { 0.0 };
        for (column, w) in &node_width {
            column_x.insert(*column, x);
            x += w + 2.0 * GROUP_PAD + GUTTER;
        }
        let width = if columns.is_empty() {
            2.0 * MARGIN
        } else {
            x - GUTTER + MARGIN + if loops_right { LOOP_ROOM } else { 0.0 }
        };

        // Groups stacked in their column, nodes in rows: each cluster's nodes in name order;
        // then (clusters come first in group order) each middle group's nodes in the order of,
        // and as near as they fit to, the heights of their neighbours in the clusters.
        let mut neighbours: Vec<Vec<usize>> = vec![Vec::new(); graph.nodes.len()];
        for &(a, b) in graph.segments.iter().flatten() {
            if node_column[a] == Column::Neutral && node_column[b] != Column::Neutral {
                neighbours[a].push(b);
            }
            if node_column[b] == Column::Neutral && node_column[a] != Column::Neutral {
                neighbours[b].push(a);
            }
        }
        let step = NODE_H + NODE_GAP;
        let mut column_y: BTreeMap<Column, f64> = BTreeMap::new();
        let mut groups = Vec::with_capacity(members.len());
        let mut rects = vec![Rect::default(); graph.nodes.len()];
        for (group, nodes) in &members {
            let column = column_of.get(group).copied().unwrap_or(Column::Neutral);
            let x = column_x.get(&column).copied().unwrap_or(MARGIN);
            let inner = node_width.get(&column).copied().unwrap_or(NODE_MIN_W);
            let y = column_y.entry(column).or_insert(MARGIN);
            let first = *y + GROUP_HEADER;
            let rows: Vec<(usize, f64)> = if column == Column::Neutral {
                let mut wanted: Vec<(f64, usize)> = nodes
                    .iter()
                    .map(|&i| {
                        let ys: Vec<f64> =
                            neighbours[i].iter().map(|&n| rects[n].center().y).collect();
                        let top = if ys.is_empty() {
                            first
                        } else {
                            ys.iter().sum::<f64>() / ys.len() as f64 - NODE_H / 2.0
                        };
                        (top, i)
                    })
                    .collect();
                wanted.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                let shifted: Vec<f64> = wanted
                    .iter()
                    .enumerate()
                    .map(|(k, &(top, _))| top - k as f64 * step)
                    .collect();
                isotonic(&shifted)
                    .into_iter()
                    .zip(&wanted)
                    .enumerate()
                    .map(|(k, (v, &(_, i)))| (i, v.max(first) + k as f64 * step))
                    .collect()
            } else {
                let rows = nodes.iter().enumerate();
                rows.map(|(k, &i)| (i, first + k as f64 * step)).collect()
            };
            let top = rows.first().map_or(first, |r| r.1) - GROUP_HEADER;
            let bottom = rows.last().map_or(first, |r| r.1 + NODE_H) + GROUP_PAD;
            for &(i, node_y) in &rows {
                rects[i] = Rect {
                    x: x + GROUP_PAD,
                    y: node_y,
                    w: inner,
                    h: NODE_H,
                };
            }
            let (kind, name) = group.label();
            let label = Rect {
                x: x + GROUP_PAD,
                y: top + 8.0,
                w: text_width(&format!("{kind} {name}"), GROUP_FONT),
                h: GROUP_FONT + 6.0,
            };
            let rect = Rect {
                x,
                y: top,
                w: inner + 2.0 * GROUP_PAD,
                h: bottom - top,
            };
            *y = rect.bottom() + GROUP_GAP;
            groups.push(GroupBox {
                group: group.clone(),
                rect,
                label,
            });
        }
        let height = groups
            .iter()
            .fold(2.0 * MARGIN, |h, g| h.max(g.rect.bottom() + MARGIN));

        let middle = column_x.get(&Column::Neutral).map(|&x| {
            let w = node_width
                .get(&Column::Neutral)
                .copied()
                .unwrap_or(NODE_MIN_W);
            (x, x + w + 2.0 * GROUP_PAD)
        });
        let edges = edge_shapes(graph, &node_column, &rects, &groups, middle);
        // A lane under the middle column's last group grows the picture.
        let height = edges
            .iter()
            .flat_map(|e| &e.segments)
            .flat_map(|s| &s.pieces)
            .flat_map(Piece::points)
            .fold(height, |h, p| h.max(p.y + MARGIN));
        Layout {
            width,
            height,
            groups,
            nodes: rects,
            edges,
        }
    }
}

/// The non-decreasing sequence nearest to `values` (least squares): adjacent values out of
/// order are pooled into their mean until none are.
pub(crate) fn isotonic(values: &[f64]) -> Vec<f64> {
    let mut blocks: Vec<(f64, usize)> = Vec::with_capacity(values.len());
    for &v in values {
        blocks.push((v, 1));
        while let [.., (s0, n0), (s1, n1)] = blocks[..] {
            if s0 / n0 as f64 <= s1 / n1 as f64 {
                break;
            }
            blocks.truncate(blocks.len() - 2);
            blocks.push((s0 + s1, n0 + n1));
        }
    }
    blocks
        .into_iter()
        .flat_map(|(sum, n)| std::iter::repeat_n(sum / n as f64, n))
        .collect()
}

/// Heights taken across the middle column: its nodes, its groups' borders and labels, and the
/// lanes given out so far. A segment from the left column to the right one crosses the middle column straight,
/// in a lane of its own between the nodes.
#[derive(Debug)]
struct Lanes {
    /// (top, bottom) of what a lane must not cross.
    blocked: Vec<(f64, f64)>,
    /// (height, stroke width) of each lane given out.
    taken: Vec<(f64, f64)>,
}

impl Lanes {
    fn new(x: (f64, f64), rects: &[Rect], groups: &[GroupBox]) -> Self {
        let in_middle = |r: &Rect| r.x >= x.0 && r.right() <= x.1;
        let nodes = rects
            .iter()
            .filter(|r| in_middle(r))
            .map(|r| (r.y - 3.0, r.bottom() + 3.0));
        // A group's top border and label, and its bottom border.
        let groups = groups.iter().filter(|g| in_middle(&g.rect)).flat_map(|g| {
            let (top, bottom) = (g.rect.y, g.rect.bottom());
            [
                (top - 3.0, g.label.bottom() + 3.0),
                (bottom - 3.0, bottom + 3.0),
            ]
        });
        let blocked = nodes.chain(groups).collect();
        Lanes {
            blocked,
            taken: Vec::new(),
        }
    }

    /// The free height nearest to `wanted` for a lane of stroke `width`, now taken.
    fn take(&mut self, wanted: f64, width: f64) -> f64 {
        let free = |y: f64| {
            let (top, bottom) = (y - width / 2.0, y + width / 2.0);
            top >= MARGIN / 2.0
                && self.blocked.iter().all(|&(t, b)| bottom <= t || top >= b)
                && self
                    .taken
                    .iter()
                    .all(|&(l, w)| (l - y).abs() >= (w + width) / 2.0 + 3.0)
        };
        // Below everything a lane is always free, so the search ends.
        let y = (0..)
            .flat_map(|step| [wanted + f64::from(step), wanted - f64::from(step)])
            .find(|&y| free(y))
            .unwrap_or(wanted);
        self.taken.push((y, width));
        y
    }
}

/// Ports, paths and count labels of every edge.
fn edge_shapes(
    graph: &Graph<'_>,
    node_column: &[Column],
    rects: &[Rect],
    groups: &[GroupBox],
    middle: Option<(f64, f64)>,
) -> Vec<EdgeShape> {
    // Every segment end, gathered per node side and ordered by where its other end is, gets a
    // port: a height on that side.
    struct End {
        edge: usize,
        segment: usize,
        start: bool,
        other: Point,
    }
    let mut ends: BTreeMap<(usize, Side), Vec<End>> = BTreeMap::new();
    for (edge, segments) in graph.segments.iter().enumerate() {
        for (segment, &(a, b)) in segments.iter().enumerate() {
            let (sa, sb) = sides(node_column[a], node_column[b]);
            ends.entry((a, sa)).or_default().push(End {
                edge,
                segment,
                start: true,
                other: rects[b].center(),
            });
            ends.entry((b, sb)).or_default().push(End {
                edge,
                segment,
                start: false,
                other: rects[a].center(),
            });
        }
    }
    let mut ports: BTreeMap<(usize, usize, bool), Point> = BTreeMap::new();
    for ((node, side), mut list) in ends {
        list.sort_by(|p, q| {
            p.other
                .y
                .total_cmp(&q.other.y)
                .then(p.other.x.total_cmp(&q.other.x))
                .then(p.edge.cmp(&q.edge))
                .then(p.segment.cmp(&q.segment))
                .then(q.start.cmp(&p.start))
        });
        let rect = rects[node];
        let n = list.len() as f64;
        let spacing = if n > 1.0 {
            ((NODE_H - 12.0) / (n - 1.0)).min(7.0)
        } else {
            0.0
        };
        let x = match side {
            Side::Left => rect.x,
            Side::Right => rect.right(),
        };
        for (k, end) in list.iter().enumerate() {
            let y = rect.center().y + (k as f64 - (n - 1.0) / 2.0) * spacing;
            ports.insert((end.edge, end.segment, end.start), Point { x, y });
        }
    }

    let mut lanes = middle.map(|x| (x, Lanes::new(x, rects, groups)));
    // Count labels avoid nodes, group labels and each other.
    let mut taken: Vec<Rect> = rects.iter().map(|r| r.grown(2.0)).collect();
    taken.extend(groups.iter().map(|g| g.label.grown(2.0)));

    let mut shapes = Vec::with_capacity(graph.edges.len());
    for (edge, segments) in graph.segments.iter().enumerate() {
        let count = graph.edges[edge].count;
        let width = graph::stroke_width(count);
        let mut paths = Vec::with_capacity(segments.len());
        for (segment, &(a, b)) in segments.iter().enumerate() {
            let (ca, cb) = (node_column[a], node_column[b]);
            let (sa, sb) = sides(ca, cb);
            let from = ports
                .get(&(edge, segment, true))
                .copied()
                .unwrap_or(rects[a].center());
            let tip = ports
                .get(&(edge, segment, false))
                .copied()
                .unwrap_or(rects[b].center());
            let base = Point {
                x: tip.x + sb.sign() * (5.0 + 1.3 * width),
                y: tip.y,
            };
            let crosses_middle = ca != Column::Neutral && cb != Column::Neutral && ca != cb;
            let pieces = match (&mut lanes, crosses_middle) {
                (Some(((left, right), lanes)), true) => {
                    let y = lanes.take((from.y + base.y) / 2.0, width);
                    // Enter and leave the lane a little outside the middle column.
                    let (enter, leave) = if ca < cb {
                        (*left - 10.0, *right + 10.0)
                    } else {
                        (*right + 10.0, *left - 10.0)
                    };
                    let enter = Point { x: enter, y };
                    let leave = Point { x: leave, y };
                    vec![
                        curve(from, sa, enter, sb, false),
                        Piece::Line {
                            from: enter,
                            to: leave,
                        },
                        curve(leave, sa, base, sb, false),
                    ]
                }
                _ => vec![curve(from, sa, base, sb, ca == cb)],
            };
            paths.push(Segment {
                pieces,
                tip,
                half_width: 3.0 + 0.9 * width,
            });
        }
        let label = place_label(&count.to_string(), &paths, &taken);
        taken.push(label);
        shapes.push(EdgeShape {
            width,
            segments: paths,
            label,
        });
    }
    shapes
}

/// A curve leaving `from` horizontally towards `out` and arriving at `to` horizontally from
/// the `into` side; a loop (both ends on one side of a column) bulges out by a little more the
/// farther apart its ends are.
fn curve(from: Point, out: Side, to: Point, into: Side, is_loop: bool) -> Piece {
    let reach = if is_loop {
        (26.0 + (to.y - from.y).abs() * 0.12).min(LOOP_ROOM - 14.0)
    } else {
        ((to.x - from.x).abs() * 0.5).max(30.0)
    };
    Piece::Cubic {
        from,
        c0: Point {
            x: from.x + out.sign() * reach,
            y: from.y,
        },
        c1: Point {
            x: to.x + into.sign() * reach,
            y: to.y,
        },
        to,
    }
}

/// The first box along the paths (the first segment first; a lane first, then a piece's
/// middle first) that overlaps nothing taken; the first candidate when every place does.
fn place_label(text: &str, segments: &[Segment], taken: &[Rect]) -> Rect {
    const ALONG: [f64; 9] = [0.5, 0.4, 0.6, 0.3, 0.7, 0.2, 0.8, 0.12, 0.88];
    let w = text_width(text, COUNT_FONT) + 6.0;
    let at = |p: Point| Rect {
        x: p.x - w / 2.0,
        y: p.y - COUNT_H / 2.0,
        w,
        h: COUNT_H,
    };
    let mut candidates = segments.iter().flat_map(|s| {
        let lanes = s.pieces.iter().filter(|p| matches!(p, Piece::Line { .. }));
        let curves = s.pieces.iter().filter(|p| matches!(p, Piece::Cubic { .. }));
        lanes
            .chain(curves)
            .flat_map(move |p| ALONG.iter().map(move |&t| at(p.at(t))))
    });
    let first = candidates.next();
    first
        .into_iter()
        .chain(candidates)
        .find(|r| !taken.iter().any(|t| t.overlaps(r)))
        .or(first)
        .unwrap_or(Rect {
            x: 0.0,
            y: 0.0,
            w,
            h: COUNT_H,
        })
}
