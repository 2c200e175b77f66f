//! Runs the conformance suite (`tests/kube-testserver/conformance`, pytest) against this build's
//! `kube-testserver` binary. The suite states what the real kube-apiserver 1.32 does; see its
//! README.md. Bounded in time: pytest is interrupted (SIGINT, so its fixtures stop the servers
//! they started) and then killed if it overruns.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

/// The whole suite takes well under a minute when it passes; failing waits take longer.
const TIMEOUT: Duration = Duration::from_secs(300);

fn drain(mut r: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

#[test]
fn conformance_suite_against_the_real_apiserver_behaviour() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let repo = crate_dir.parent().and_then(Path::parent).unwrap();
    let python = repo.join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh (it installs the Python client, kubernetes-validate \
         and pytest in .venv)",
        python.display()
    );
    let suite = crate_dir.join("conformance");
    let mut child = Command::new(&python)
        .args([
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-rfE",
            "--tb=short",
        ])
        .arg(&suite)
        .current_dir(&suite)
        .env("KUBE_TESTSERVER_BIN", env!("CARGO_BIN_EXE_kube-testserver"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start pytest");
    let out = drain(child.stdout.take().unwrap());
    let err = drain(child.stderr.take().unwrap());

    let deadline = Instant::now() + TIMEOUT;
    let mut interrupted = false;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for pytest") {
            break Some(s);
        }
        let now = Instant::now();
        if now >= deadline + Duration::from_secs(15) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if now >= deadline && !interrupted {
            // KeyboardInterrupt: pytest runs the fixtures' teardown (servers, temp dirs).
            let _ = Command::new("kill")
                .args(["-INT", &child.id().to_string()])
                .status();
            interrupted = true;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let out = out.join().unwrap_or_default();
    let err = err.join().unwrap_or_default();
    println!("{out}");
    eprintln!("{err}");
    match status {
        Some(s) if s.success() && !interrupted => {}
        Some(s) if interrupted => panic!("conformance suite overran {TIMEOUT:?} (exit {s})"),
        Some(s) => panic!("conformance suite failed ({s}); pytest's output is above"),
        None => panic!("conformance suite overran {TIMEOUT:?} and was killed"),
    }
}
