//! The page in a real browser: Debian's chromium, headless, opens the two-cluster example from
//! a file, runs its script without an error, requests nothing, and draws a non-trivial
//! screenshot. The only test of this crate that runs a process.
//!
//! What counts as a request: chromium's net log (`--log-net-log`) records every URL request
//! with the site it was made for; the page's own requests are the ones made for `file://`
//! (chromium's background requests, e.g. its update checks, are made for no site and are not
//! the page's). Console messages (`--enable-logging=stderr`) catch uncaught errors and loads
//! that the page's Content Security Policy blocked. A control page with a broken script and an
//! image from the network proves that both detectors see what they look for.
//!
//! Every chromium run has a fresh profile in a temp dir that is removed afterwards, is killed
//! with its process group after 60 s, and fails the test when chromium is missing (run
//! `scripts/setup.sh`).

// A test harness: its helpers fail the test on any error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use flowmap::{Edge, Options, Workload, render};

const TIMEOUT: Duration = Duration::from_secs(60);

fn two_clusters() -> Vec<Edge> {
    serde_json::from_str(include_str!("two-clusters.json")).unwrap()
}

fn options() -> Options {
    Options {
        title: "cross-cluster flows".into(),
        subtitle: "flows of the last 5m from east, west".into(),
    }
}

/// A directory of its own under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let path = std::env::temp_dir().join(format!(
            "flowmap-browser-{}-{nanos}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).unwrap();
        TempDir(path)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Debian's chromium on `PATH`, or a failure that says how to install it.
fn chromium() -> PathBuf {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("chromium"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "chromium is not installed, so the page cannot be checked in a browser: \
                 run scripts/setup.sh (it installs Debian's `chromium` package)"
            )
        })
}

/// A running chromium in a process group of its own; the whole group is killed if it is
/// dropped still running (a failed test, a timeout).
struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // Its pid is its process group's id (process_group(0)).
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", self.0.id())])
                .status();
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// What one chromium run left behind.
struct Run {
    stdout: String,
    stderr: String,
    /// The net log, when asked for.
    net_log: Option<serde_json::Value>,
}

/// Runs headless chromium on `page` with `args`, in a fresh profile, logging to stderr and
/// writing a net log; waits at most [`TIMEOUT`].
fn run_chromium(dir: &TempDir, run: &str, page: &Path, args: &[String]) -> Run {
    let profile = dir.path(&format!("profile-{run}"));
    let net_log = dir.path(&format!("{run}-netlog.json"));
    let stdout = dir.path(&format!("{run}.stdout"));
    let stderr = dir.path(&format!("{run}.stderr"));
    let mut command = Command::new(chromium());
    command
        .args(["--headless", "--no-sandbox", "--disable-gpu"])
        .args(["--enable-logging=stderr", "--v=0", "--no-first-run"])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--log-net-log={}", net_log.display()))
        .args(args)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .process_group(0);
    let mut browser = Browser(command.spawn().unwrap());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = browser.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < TIMEOUT,
            "chromium ({run}) did not finish in {TIMEOUT:?}; stderr:\n{}",
            fs::read_to_string(&stderr).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = fs::read_to_string(&stderr).unwrap();
    assert!(
        status.success(),
        "chromium ({run}) failed: {status}; stderr:\n{stderr}"
    );
    let net_log = fs::read_to_string(&net_log)
        .ok()
        .map(|text| serde_json::from_str(&text).unwrap());
    Run {
        stdout: fs::read_to_string(&stdout).unwrap(),
        stderr,
        net_log,
    }
}

/// The lines of chromium's log that say the page logged to the console (an uncaught error, a
/// load its Content Security Policy blocked, anything it printed) or failed to load something.
fn console_problems(stderr: &str) -> Vec<&str> {
    stderr
        .lines()
        .filter(|l| {
            l.contains(":CONSOLE")
                || l.contains("Uncaught")
                || l.contains("Failed to load resource")
                || l.contains("Content Security Policy")
        })
        .collect()
}

/// The URLs chromium requested on the page's behalf (for the site `file://`), from its net log.
fn page_requests(net_log: &serde_json::Value) -> BTreeSet<String> {
    let types = &net_log["constants"]["logEventTypes"];
    let start_job = types["URL_REQUEST_START_JOB"].as_u64().unwrap();
    let events = net_log["events"].as_array().unwrap();
    assert!(!events.is_empty(), "an empty net log");
    events
        .iter()
        .filter(|e| e["type"].as_u64() == Some(start_job))
        .filter(|e| {
            e["params"]["network_isolation_key"]
                .as_str()
                .is_some_and(|k| k.contains("file://"))
        })
        .map(|e| e["params"]["url"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The attributes of every start tag in `dom` that has `attr` (as chromium serializes them:
/// double-quoted, `&amp;` `&quot;` `&lt;` `&gt;` escaped).
fn elements_with(dom: &str, attr: &str) -> Vec<BTreeMap<String, String>> {
    let needle = format!(" {attr}=\"");
    let mut out = Vec::new();
    for (at, _) in dom.match_indices(&needle) {
        let start = dom[..at].rfind('<').unwrap();
        let end = at + dom[at..].find('>').unwrap();
        let mut attrs = BTreeMap::new();
        let mut rest = &dom[start..end];
        rest = rest.split_once(' ').map_or("", |(_, r)| r);
        while let Some((key, after)) = rest.split_once("=\"") {
            let close = after.find('"').unwrap();
            let value = after[..close]
                .replace("&quot;", "\"")
                .replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&amp;", "&");
            attrs.insert(key.trim().to_owned(), value);
            rest = &after[close + 1..];
        }
        out.push(attrs);
    }
    out
}

#[test]
fn the_map_loads_runs_and_requests_nothing_in_chromium() {
    let started = Instant::now();
    let dir = TempDir::new();
    let page = dir.path("map.html");
    fs::write(&page, render(&two_clusters(), &options())).unwrap();

    // The DOM after load: the script ran to its end, every node and edge is there.
    let run = run_chromium(&dir, "dom", &page, &["--dump-dom".into()]);
    let problems = console_problems(&run.stderr);
    assert!(
        problems.is_empty(),
        "the page logged to the console:\n{}",
        problems.join("\n")
    );
    let requests = page_requests(run.net_log.as_ref().expect("chromium wrote no net log"));
    assert!(requests.is_empty(), "the page made requests: {requests:?}");

    let body = elements_with(&run.stdout, "data-ready");
    assert_eq!(
        body.len(),
        1,
        "no <body data-ready>: the script did not run to its end\n{}",
        run.stdout
    );
    assert_eq!(body[0]["data-ready"], "1");
    assert_eq!(body[0]["data-edges"], "4");

    let nodes: BTreeSet<String> = elements_with(&run.stdout, "data-node")
        .into_iter()
        .map(|a| a["data-node"].clone())
        .collect();
    let expected: BTreeSet<String> = [
        "workload:east/rebel/c",
        "workload:east/rebel/client",
        "workload:east/rebel/x",
        "workload:east/rebel/x-wing",
        "workload:west/empire/tie",
        "workload:west/rebel/rebel-base",
        "workload://world",
        "service:/rebel/rebel-base",
    ]
    .map(String::from)
    .into();
    assert_eq!(nodes, expected);

    let edges: BTreeSet<Vec<String>> = elements_with(&run.stdout, "data-edge")
        .into_iter()
        .map(|a| {
            [
                "data-source",
                "data-destination",
                "data-service",
                "data-verdict",
                "data-count",
            ]
            .iter()
            .map(|k| a[*k].clone())
            .collect()
        })
        .collect();
    let expected: BTreeSet<Vec<String>> = [
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
    .iter()
    .map(|e| e.iter().map(|s| s.to_string()).collect())
    .collect();
    assert_eq!(edges, expected);

    // A screenshot of a real drawing, not a blank page.
    let png = dir.path("map.png");
    let run = run_chromium(
        &dir,
        "screenshot",
        &page,
        &[
            format!("--screenshot={}", png.display()),
            "--window-size=1400,900".into(),
            "--hide-scrollbars".into(),
        ],
    );
    let problems = console_problems(&run.stderr);
    assert!(
        problems.is_empty(),
        "the page logged to the console:\n{}",
        problems.join("\n")
    );
    let bytes = fs::read(&png).expect("chromium wrote no screenshot");
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is not a PNG"
    );
    assert!(
        bytes.len() > 10 * 1024,
        "the screenshot is {} bytes: a blank page?",
        bytes.len()
    );

    eprintln!("chromium checked the page in {:?}", started.elapsed());
}

#[test]
fn the_checks_catch_a_script_error_and_a_request() {
    let dir = TempDir::new();
    let page = dir.path("broken.html");
    fs::write(
        &page,
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"></head><body>\
         <img src=\"http://127.0.0.1:1/pixel.png\" alt=\"\">\
         <script>thisFunctionDoesNotExist();</script></body></html>",
    )
    .unwrap();
    let run = run_chromium(&dir, "control", &page, &["--dump-dom".into()]);
    let problems = console_problems(&run.stderr);
    assert!(
        problems.iter().any(|l| l.contains("Uncaught")),
        "an uncaught error went unseen; stderr:\n{}",
        run.stderr
    );
    let requests = page_requests(run.net_log.as_ref().expect("chromium wrote no net log"));
    assert_eq!(requests, ["http://127.0.0.1:1/pixel.png".to_owned()].into());
}

/// Writes `docs/flow-map.png`: the two-cluster example plus a third cluster. Run by hand:
/// `cargo test -p flowmap --test browser -- --ignored docs_screenshot`.
#[test]
#[ignore = "writes docs/flow-map.png"]
fn docs_screenshot() {
    let mut edges = two_clusters();
    edges.push(Edge {
        source: Workload {
            cluster: "north".into(),
            namespace: "rebel".into(),
            name: "client".into(),
        },
        destination: Workload {
            cluster: "west".into(),
            namespace: "rebel".into(),
            name: "rebel-base".into(),
        },
        service: Some("rebel/rebel-base".into()),
        verdict: "forwarded".into(),
        count: 45,
    });
    let html = render(
        &edges,
        &Options {
            title: "cross-cluster flows".into(),
            subtitle: "flows of the last 5m from east, north, west".into(),
        },
    );
    // The window fits the map.
    let svg = &elements_with(&html, "id")
        .into_iter()
        .find(|a| a["id"] == "flowmap")
        .unwrap();
    let size = |k: &str| svg[k].parse::<f64>().unwrap() as u32;
    let (width, height) = ((size("width") + 60).max(900), size("height") + 190);

    let dir = TempDir::new();
    let page = dir.path("map.html");
    fs::write(&page, &html).unwrap();
    let png = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/flow-map.png");
    let run = run_chromium(
        &dir,
        "docs",
        &page,
        &[
            format!("--screenshot={}", png.display()),
            format!("--window-size={width},{height}"),
            "--hide-scrollbars".into(),
        ],
    );
    let problems = console_problems(&run.stderr);
    assert!(
        problems.is_empty(),
        "the page logged to the console:\n{}",
        problems.join("\n")
    );
    eprintln!("wrote {} ({width}×{height})", png.display());
}
