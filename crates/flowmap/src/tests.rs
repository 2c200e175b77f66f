//! Unit tests: aggregation, determinism, escaping, the empty map, verdict classes, the data
//! attributes of the two-cluster example, the layout of large maps, and the CSP hashes.

use std::collections::{BTreeMap, BTreeSet};

use crate::graph::{self, Graph};
use crate::layout::{self, Layout};
use crate::*;

/// The example of the docs and the browser test: east → west through a service, a policy
/// denial, a default denial to the world, a service without backends.
fn two_clusters() -> Vec<Edge> {
    serde_json::from_str(include_str!("../tests/two-clusters.json")).unwrap()
}

fn workload(cluster: &str, namespace: &str, name: &str) -> Workload {
    Workload {
        cluster: cluster.into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn edge(
    source: Workload,
    destination: Workload,
    service: Option<&str>,
    verdict: &str,
    count: u64,
) -> Edge {
    Edge {
        source,
        destination,
        service: service.map(Into::into),
        verdict: verdict.into(),
        count,
    }
}

fn options() -> Options {
    Options {
        title: "cross-cluster flows".into(),
        subtitle: "flows of the last 5m from east, west".into(),
    }
}

/// A start tag as the page writes it: its name and attributes (values unescaped for `&amp;`,
/// `&quot;`, `&lt;`, `&gt;`, `&#39;`).
#[derive(Debug)]
struct Tag {
    name: String,
    attrs: BTreeMap<String, String>,
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&amp;", "&")
}

/// Every start tag of `html` in order, skipping the contents of `<style>` and `<script>`.
/// Panics on markup this crate never writes (an unquoted attribute, an unclosed tag).
fn tags(html: &str) -> Vec<Tag> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(at) = rest.find('<') {
        rest = &rest[at + 1..];
        if rest.starts_with('/') || rest.starts_with('!') {
            continue;
        }
        let end = rest.find('>').expect("an unclosed tag");
        let inner = rest[..end].trim_end_matches('/');
        let (name, mut attrs_text) = inner.split_once(' ').unwrap_or((inner, ""));
        let mut attrs = BTreeMap::new();
        loop {
            attrs_text = attrs_text.trim_start();
            if attrs_text.is_empty() {
                break;
            }
            let (key, after) = attrs_text.split_once("=\"").expect("a quoted attribute");
            assert!(
                !key.contains(' '),
                "an attribute without a value: {key:?} in <{inner}>"
            );
            let close = after.find('"').expect("a closed attribute value");
            attrs.insert(key.to_owned(), unescape(&after[..close]));
            attrs_text = &after[close + 1..];
        }
        rest = &rest[end + 1..];
        if name == "style" || name == "script" {
            let close = format!("</{name}>");
            let skip = rest.find(&close).expect("a closed style or script");
            rest = &rest[skip..];
        }
        out.push(Tag {
            name: name.to_owned(),
            attrs,
        });
    }
    out
}

/// The elements carrying `attr`.
fn with_attr<'a>(tags: &'a [Tag], attr: &str) -> Vec<&'a Tag> {
    tags.iter().filter(|t| t.attrs.contains_key(attr)).collect()
}

#[test]
fn aggregate_adds_up_equal_edges_and_sorts_them() {
    let a = workload("east", "rebel", "client");
    let b = workload("west", "rebel", "rebel-base");
    let svc = Some("rebel/rebel-base");
    let edges = vec![
        edge(b.clone(), a.clone(), None, "forwarded", 1),
        edge(a.clone(), b.clone(), svc, "forwarded", 100),
        edge(a.clone(), b.clone(), svc, "denied_by_policy", 4),
        edge(a.clone(), b.clone(), svc, "forwarded", 20),
        edge(a.clone(), b.clone(), None, "forwarded", 7),
        edge(b.clone(), a.clone(), None, "forwarded", u64::MAX),
    ];
    assert_eq!(
        aggregate(edges),
        vec![
            edge(a.clone(), b.clone(), None, "forwarded", 7),
            edge(a.clone(), b.clone(), svc, "denied_by_policy", 4),
            edge(a.clone(), b.clone(), svc, "forwarded", 120),
            edge(b, a, None, "forwarded", u64::MAX),
        ]
    );
    assert_eq!(aggregate(Vec::new()), Vec::new());
}

#[test]
fn the_same_edges_in_any_order_give_the_same_bytes() {
    let edges = two_clusters();
    let page = render(&edges, &options());
    assert_eq!(render(&edges, &options()), page);

    let mut reversed = edges.clone();
    reversed.reverse();
    assert_eq!(render(&reversed, &options()), page);

    // 120 flows reported as 100 + 20 are the same edge.
    let mut split = edges.clone();
    split[0].count = 100;
    let mut rest = edges[0].clone();
    rest.count = 20;
    split.push(rest);
    assert_eq!(render(&split, &options()), page);
}

#[test]
fn names_are_escaped_and_inject_no_element_or_attribute() {
    let evil = "<script>alert(1)</script>";
    let edges = vec![
        edge(
            workload("east", "rebel", evil),
            workload("<img src=x onerror=alert(2)>", "a\"b&c'd", "tie"),
            Some("\"><svg onload=alert(3)>/x"),
            "<b>bold</b>",
            5,
        ),
        edge(
            workload("east", "rebel", "bell\u{7}\nline"),
            workload("", "", "world"),
            None,
            "forwarded",
            1,
        ),
    ];
    let page = render(
        &edges,
        &Options {
            title: "</title><script>alert(4)</script>".into(),
            subtitle: "<iframe src=\"x\">".into(),
        },
    );

    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(page.contains("a&quot;b&amp;c&#39;d"));
    assert!(
        page.contains("bell\u{FFFD}\u{FFFD}line"),
        "control characters are replaced"
    );
    for raw in [
        "<script>alert",
        "<img",
        "<iframe",
        "<b>",
        "<svg onload",
        "\u{7}",
    ] {
        assert!(!page.contains(raw), "{raw:?} reached the page unescaped");
    }

    // Every element is one this crate writes, and no attribute is an event handler.
    let allowed: BTreeSet<&str> = [
        "html", "meta", "head", "title", "style", "body", "header", "h1", "p", "div", "span",
        "main", "svg", "g", "rect", "text", "tspan", "path", "polygon", "script",
    ]
    .into();
    let tags = tags(&page);
    for tag in &tags {
        assert!(
            allowed.contains(tag.name.as_str()),
            "an injected <{}>",
            tag.name
        );
        for key in tag.attrs.keys() {
            assert!(
                !key.starts_with("on"),
                "an injected {key} on <{}>",
                tag.name
            );
        }
    }
    assert_eq!(tags.iter().filter(|t| t.name == "script").count(), 1);

    // The names arrive intact in the data attributes.
    let edge_tags = with_attr(&tags, "data-edge");
    assert_eq!(edge_tags.len(), 2);
    assert!(
        edge_tags
            .iter()
            .any(|t| t.attrs["data-source"] == format!("east/rebel/{evil}")
                && t.attrs["data-service"] == "\"><svg onload=alert(3)>/x"
                && t.attrs["data-verdict"] == "<b>bold</b>")
    );
    let nodes: BTreeSet<&str> = with_attr(&tags, "data-node")
        .iter()
        .map(|t| t.attrs["data-node"].as_str())
        .collect();
    assert!(nodes.contains(format!("workload:east/rebel/{evil}").as_str()));
    assert!(nodes.contains("workload:<img src=x onerror=alert(2)>/a\"b&c'd/tie"));
}

#[test]
fn no_edges_make_a_page_that_says_no_flows_observed() {
    let page = render(&[], &options());
    assert!(page.contains("no flows observed"));
    let tags = tags(&page);
    assert!(with_attr(&tags, "data-edge").is_empty());
    assert!(with_attr(&tags, "data-node").is_empty());
    assert!(
        tags.iter()
            .any(|t| t.name == "svg" && t.attrs.get("id").map(String::as_str) == Some("flowmap"))
    );
    assert!(
        tags.iter().any(|t| t.name == "script"),
        "the page still reports data-ready"
    );
    assert!(page.contains("0 flows in 0 edges"));
}

#[test]
fn each_verdict_has_its_colour_class() {
    let verdicts = [
        ("forwarded", "verdict-forwarded", "stroke: #2e9d4a;"),
        (
            "denied_by_policy",
            "verdict-denied-by-policy",
            "stroke: #d62728;",
        ),
        (
            "denied_by_default",
            "verdict-denied-by-default",
            "stroke: #7f0000; stroke-dasharray: 7 4;",
        ),
        ("no_backend", "verdict-no-backend", "stroke: #f28e00;"),
        ("dropped_by_gremlins", "verdict-unknown", "stroke: #8c8c8c;"),
        ("", "verdict-unknown", "stroke: #8c8c8c;"),
    ];
    let source = workload("east", "rebel", "client");
    let edges: Vec<Edge> = verdicts
        .iter()
        .enumerate()
        .map(|(i, (verdict, _, _))| {
            edge(
                source.clone(),
                workload("west", "rebel", &format!("b{i}")),
                None,
                verdict,
                1,
            )
        })
        .collect();
    let page = render(&edges, &options());
    let tags = tags(&page);
    for (verdict, class, css) in verdicts {
        let tag = with_attr(&tags, "data-edge")
            .into_iter()
            .find(|t| t.attrs["data-verdict"] == verdict)
            .unwrap();
        assert_eq!(tag.attrs["class"], format!("edge {class}"), "{verdict}");
        assert!(
            page.contains(&format!(".{class} path {{ {css} }}")),
            "{class} is drawn {css}"
        );
        assert!(
            page.contains(&format!("<g class=\"{class}\">")),
            "{class} is in the legend"
        );
    }
}

#[test]
fn the_two_cluster_example_marks_every_node_and_edge() {
    let page = render(&two_clusters(), &options());
    let tags = tags(&page);

    let nodes: BTreeSet<&str> = with_attr(&tags, "data-node")
        .iter()
        .map(|t| t.attrs["data-node"].as_str())
        .collect();
    let expected: BTreeSet<&str> = [
        "workload:east/rebel/c",
        "workload:east/rebel/client",
        "workload:east/rebel/x",
        "workload:east/rebel/x-wing",
        "workload:west/empire/tie",
        "workload:west/rebel/rebel-base",
        "workload://world",
        "service:/rebel/rebel-base",
    ]
    .into();
    assert_eq!(nodes, expected);

    let edges: BTreeSet<[&str; 5]> = with_attr(&tags, "data-edge")
        .iter()
        .map(|t| {
            [
                "data-source",
                "data-destination",
                "data-service",
                "data-verdict",
                "data-count",
            ]
            .map(|k| t.attrs[k].as_str())
        })
        .collect();
    let expected: BTreeSet<[&str; 5]> = [
        [
            "east/rebel/client",
            "west/rebel/rebel-base",
            "rebel/rebel-base",
            "forwarded",
            "120",
        ],
        [
            "east/rebel/x-wing",
            "west/empire/tie",
            "",
            "denied_by_policy",
            "3",
        ],
        ["east/rebel/x", "//world", "", "denied_by_default", "1"],
        ["east/rebel/c", "", "rebel/rebel-base", "no_backend", "2"],
    ]
    .into();
    assert_eq!(edges, expected);

    for title in [
        "east/rebel/client → west/rebel/rebel-base via rebel/rebel-base: 120 flows, forwarded",
        "east/rebel/x-wing → west/empire/tie: 3 flows, denied_by_policy",
        "east/rebel/x → world: 1 flow, denied_by_default",
        "east/rebel/c → svc rebel/rebel-base: 2 flows, no_backend",
    ] {
        assert!(page.contains(&format!("<title>{title}</title>")), "{title}");
    }
    for title in [
        "east/rebel/client: 120 flows out, 0 in",
        "west/rebel/rebel-base: 0 flows out, 120 in",
        "world: 0 flows out, 1 in",
        "svc rebel/rebel-base: 122 flows",
    ] {
        assert!(page.contains(&format!("<title>{title}</title>")), "{title}");
    }
    for group in [
        "<tspan class=\"group-kind\">cluster </tspan>east",
        "<tspan class=\"group-kind\">cluster </tspan>west",
        ">services</text>",
        ">outside the mesh</text>",
        ">svc rebel/rebel-base</text>",
        ">ns rebel</text>",
    ] {
        assert!(page.contains(group), "{group}");
    }

    // Through the service: two segments; ended at the service or direct: one.
    let graph_edges = aggregate(two_clusters());
    let graph = Graph::new(&graph_edges);
    let segments: BTreeMap<&str, usize> = graph
        .edges
        .iter()
        .zip(&graph.segments)
        .map(|(e, s)| (e.source.name.as_str(), s.len()))
        .collect();
    assert_eq!(
        segments,
        [("c", 1), ("client", 2), ("x", 1), ("x-wing", 1)].into()
    );
    // Each count is printed on its edge.
    for count in ["120", "3", "1", "2"] {
        assert!(
            page.contains(&format!("dominant-baseline=\"central\">{count}</text>")),
            "{count}"
        );
    }
}

#[test]
fn the_page_loads_nothing_from_anywhere() {
    let page = render(&two_clusters(), &options());
    for fetch in [
        "http:",
        "https:",
        "//www",
        "src=",
        "href=",
        "url(",
        "@import",
        "@font-face",
    ] {
        assert!(!page.contains(fetch), "the page names {fetch}");
    }
    let tags = tags(&page);
    let csp = tags
        .iter()
        .find(|t| t.attrs.get("http-equiv").map(String::as_str) == Some("Content-Security-Policy"))
        .unwrap();
    let policy = &csp.attrs["content"];
    assert!(policy.starts_with("default-src 'none'; "), "{policy}");
    assert!(!policy.contains("unsafe"), "{policy}");
}

#[test]
fn stroke_width_grows_with_the_count_on_a_log_scale_and_is_clamped() {
    assert_eq!(graph::stroke_width(0), 1.5);
    assert_eq!(graph::stroke_width(1), 1.5);
    assert!((graph::stroke_width(10) - 3.1).abs() < 1e-9);
    assert!((graph::stroke_width(1000) - 6.3).abs() < 1e-9);
    assert_eq!(graph::stroke_width(u64::MAX), 9.0);
    let widths: Vec<f64> = [1, 2, 10, 100, 10_000, 100_000]
        .map(graph::stroke_width)
        .into();
    assert!(widths.windows(2).all(|w| w[0] < w[1]), "{widths:?}");
}

#[test]
fn long_names_are_clipped_and_kept_whole_in_the_tooltip() {
    let long = "a-very-long-deployment-name-that-goes-on-and-on-and-on";
    let page = render(
        &[edge(
            workload("east", "rebel", long),
            workload("", "", "world"),
            None,
            "forwarded",
            1,
        )],
        &options(),
    );
    assert!(
        page.contains(">a-very-long-deployment-name-that-goes-o…</text>"),
        "{page}"
    );
    assert!(page.contains(&format!(
        "<title>east/rebel/{long}: 1 flow out, 0 in</title>"
    )));
}

/// Edges between `clusters` clusters of `per_cluster` workloads each, some through services,
/// some to the world, some within a cluster.
fn many(clusters: usize, per_cluster: usize) -> Vec<Edge> {
    let mut edges = Vec::new();
    for c in 0..clusters {
        for w in 0..per_cluster {
            let source = workload(
                &format!("cluster-{c}"),
                &format!("ns-{}", w % 3),
                &format!("workload-{w}-{}", "x".repeat(w % 17)),
            );
            let peer = (c + 1 + w) % clusters;
            let destination = workload(
                &format!("cluster-{peer}"),
                &format!("ns-{}", w % 3),
                &format!(
                    "workload-{}-{}",
                    (w * 7) % per_cluster,
                    "x".repeat(((w * 7) % per_cluster) % 17)
                ),
            );
            let service = format!("ns-{}/svc-{}", w % 3, w % 11);
            let verdict = [
                "forwarded",
                "denied_by_policy",
                "denied_by_default",
                "no_backend",
                "other",
            ][w % 5];
            edges.push(edge(
                source.clone(),
                destination.clone(),
                Some(&service),
                verdict,
                (w * w + 1) as u64,
            ));
            if w % 4 == 0 {
                edges.push(edge(
                    source.clone(),
                    workload("", "", "world"),
                    None,
                    "forwarded",
                    3,
                ));
            }
            if w % 6 == 0 {
                let sibling = workload(&format!("cluster-{c}"), "ns-0", "workload-0-");
                edges.push(edge(source, sibling, None, "forwarded", 9));
            }
        }
    }
    edges
}

/// No two nodes overlap, each node holds its text and sits inside its group, no two groups
/// overlap, and everything is inside the picture.
fn assert_readable(edges: &[Edge]) {
    let edges = aggregate(edges.iter().cloned());
    let graph = Graph::new(&edges);
    let layout = Layout::new(&graph);
    let inside = |r: &layout::Rect| {
        r.x >= 0.0 && r.y >= 0.0 && r.right() <= layout.width && r.bottom() <= layout.height
    };
    for (i, (node, rect)) in graph.nodes.iter().zip(&layout.nodes).enumerate() {
        assert!(
            inside(rect),
            "{node:?} at {rect:?} outside {}×{}",
            layout.width,
            layout.height
        );
        let (name, namespace) = node.lines();
        assert!(
            layout::text_width(&name, layout::NAME_FONT) + 2.0 * layout::NODE_PAD <= rect.w,
            "{name}"
        );
        if let Some(ns) = namespace {
            assert!(
                layout::text_width(&ns, layout::NS_FONT) + 2.0 * layout::NODE_PAD <= rect.w,
                "{ns}"
            );
        }
        let group = layout
            .groups
            .iter()
            .find(|g| g.group == node.group())
            .unwrap();
        assert!(
            group.rect.x <= rect.x
                && rect.right() <= group.rect.right()
                && group.rect.y <= rect.y
                && rect.bottom() <= group.rect.bottom()
        );
        assert!(
            !group.label.overlaps(rect),
            "{node:?} under its group's label"
        );
        for (j, other) in layout.nodes.iter().enumerate().skip(i + 1) {
            assert!(
                !rect.overlaps(other),
                "{node:?} overlaps {:?}",
                graph.nodes[j]
            );
        }
    }
    for (i, g) in layout.groups.iter().enumerate() {
        assert!(inside(&g.rect));
        for other in &layout.groups[i + 1..] {
            assert!(
                !g.rect.overlaps(&other.rect),
                "{:?} overlaps {:?}",
                g.group,
                other.group
            );
        }
    }
    for shape in &layout.edges {
        for segment in &shape.segments {
            // No edge runs over a node.
            for piece in &segment.pieces {
                for k in 0..=50 {
                    let p = piece.at(f64::from(k) / 50.0);
                    for (node, r) in graph.nodes.iter().zip(&layout.nodes) {
                        let inside = p.x > r.x + 1.0
                            && p.x < r.right() - 1.0
                            && p.y > r.y + 1.0
                            && p.y < r.bottom() - 1.0;
                        assert!(!inside, "an edge runs over {node:?} at {p:?}");
                    }
                }
            }
            // A lane across the middle column passes between its nodes.
            for piece in &segment.pieces {
                if let layout::Piece::Line { from, to } = piece {
                    let lane = layout::Rect {
                        x: from.x.min(to.x),
                        y: from.y - shape.width / 2.0,
                        w: (to.x - from.x).abs(),
                        h: shape.width,
                    };
                    for (node, rect) in graph.nodes.iter().zip(&layout.nodes) {
                        assert!(!lane.overlaps(rect), "a lane crosses {node:?}");
                    }
                }
            }
            let points = segment.pieces.iter().flat_map(layout::Piece::points);
            for p in points.chain([segment.tip]) {
                assert!(
                    p.x >= 0.0 && p.x <= layout.width && p.y >= 0.0 && p.y <= layout.height,
                    "{p:?}"
                );
            }
        }
    }
}

/// No count label covers a node, a group label or another count label.
fn assert_labels_free(edges: &[Edge]) {
    let edges = aggregate(edges.iter().cloned());
    let layout = Layout::new(&Graph::new(&edges));
    let labels: Vec<layout::Rect> = layout.edges.iter().map(|e| e.label).collect();
    for (i, label) in labels.iter().enumerate() {
        assert!(
            !layout.nodes.iter().any(|n| n.overlaps(label)),
            "{label:?} covers a node"
        );
        assert!(
            !layout.groups.iter().any(|g| g.label.overlaps(label)),
            "{label:?} covers a group label"
        );
        assert!(
            !labels[i + 1..].iter().any(|l| l.overlaps(label)),
            "{label:?} covers a count"
        );
    }
}

#[test]
fn maps_of_one_two_three_and_many_clusters_are_readable() {
    assert_labels_free(&two_clusters());
    assert_readable(&two_clusters());
    let mut three = two_clusters();
    three.push(edge(
        workload("north", "rebel", "client"),
        workload("west", "rebel", "rebel-base"),
        Some("rebel/rebel-base"),
        "forwarded",
        45,
    ));
    assert_readable(&three);
    assert_labels_free(&three);
    assert_readable(&many(1, 12));
    assert_readable(&many(3, 20));
    let big = many(5, 60);
    let nodes = Graph::new(&aggregate(big.clone())).nodes.len();
    assert!(nodes >= 300, "{nodes} nodes");
    assert_readable(&big);
}

#[test]
fn a_cluster_talking_to_itself_loops_inside_the_picture() {
    let a = workload("east", "rebel", "a");
    let b = workload("east", "rebel", "b");
    let edges = [
        edge(a.clone(), b.clone(), None, "forwarded", 10),
        edge(a.clone(), a.clone(), None, "forwarded", 1),
        edge(a, b, Some("rebel/b"), "forwarded", 5),
    ];
    assert_readable(&edges);
    let page = render(&edges, &options());
    assert_eq!(with_attr(&tags(&page), "data-edge").len(), 3);
}

#[test]
fn sha256_and_base64_match_known_vectors() {
    use crate::sha256::{base64, digest};
    let hex = |d: [u8; 32]| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(
        hex(digest(b"")),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    assert_eq!(
        hex(digest(b"abc")),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(
        hex(digest(
            b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
        )),
        "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
    );
    assert_eq!(
        hex(digest(&[b'a'; 1000])),
        "41edece42d63e8d9bf515a9ba6932e1c20cbc9f5a5d134645adb5db1b9737ea3"
    );
    assert_eq!(
        &base64(&digest(b"")),
        b"47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    );
}

#[test]
fn isotonic_pools_values_out_of_order_into_their_mean() {
    assert_eq!(layout::isotonic(&[]), Vec::<f64>::new());
    assert_eq!(layout::isotonic(&[1.0, 2.0, 3.0]), vec![1.0, 2.0, 3.0]);
    assert_eq!(layout::isotonic(&[3.0, 1.0, 2.0]), vec![2.0, 2.0, 2.0]);
    assert_eq!(
        layout::isotonic(&[1.0, 5.0, 3.0, 4.0]),
        vec![1.0, 4.0, 4.0, 4.0]
    );
}
