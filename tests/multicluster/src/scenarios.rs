//! Scenarios, written against [`Cluster`] so that the emulated lab and kind run the same
//! steps. Each step asserts what a user would check, through the `clustermesh` CLI and real
//! connections from a client pod.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;

use crate::{Cluster, Tally, clustermesh};

/// How long a scenario waits for the mesh to converge.
pub const CONVERGE: Duration = Duration::from_secs(60);

fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// The clusters (`@cluster` suffixes) that answered, ignoring failures.
pub fn answered_by(t: &Tally) -> Vec<String> {
    let mut v: Vec<String> = t
        .keys()
        .filter_map(|k| k.split_once('@').map(|(_, c)| c.to_owned()))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// Connects from `client` until the set of answering clusters is `want` (and nothing
/// failed), or fails with the last tally.
pub async fn until_answered_by<C: Cluster>(
    c: &C,
    client: &str,
    target: SocketAddr,
    want: &[&str],
) -> Result<Tally> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let t = c.connect_from(client, target, 30).await?;
        if answered_by(&t) == want && !t.contains_key("failed") {
            return Ok(t);
        }
        if Instant::now() >= deadline {
            bail!(
                "from {client} in {} to {target}: wanted answers from {want:?}, got {t:?}",
                c.name()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `clustermesh status --wait` on `contexts` until healthy (exit 0); returns the JSON report.
pub async fn wait_healthy(kc: &Path, contexts: &[String]) -> Result<Value> {
    let mut args = vec!["status", "--wait", "--timeout", "60s", "-o", "json"];
    for c in contexts {
        args.extend(["--context", c.as_str()]);
    }
    let out = clustermesh(kc, &args).await?;
    ensure!(
        out.code == 0,
        "status not healthy: {}{}",
        out.stdout,
        out.stderr
    );
    let v: Value = serde_json::from_str(&out.stdout)?;
    ensure!(v["healthy"] == true, "{v}");
    Ok(v)
}

/// `clustermesh connect --wait -o json` from a to b; fails unless it exits 0 and reports
/// `connected`. Returns what it did per direction.
pub async fn run_connect<A: Cluster, B: Cluster>(kc: &Path, a: &A, b: &B) -> Result<Value> {
    let (ac, bc) = (a.context(), b.context());
    let out = clustermesh(
        kc,
        &[
            "connect",
            "--context",
            &ac,
            "--destination-context",
            &bc,
            "--wait",
            "--timeout",
            "60s",
            "-o",
            "json",
        ],
    )
    .await?;
    ensure!(
        out.code == 0,
        "connect {ac} → {bc}: {}{}",
        out.stdout,
        out.stderr
    );
    ensure!(out.stderr.contains("connected"), "{}", out.stderr);
    Ok(serde_json::from_str(&out.stdout)?)
}

/// Polls `clustermesh status` of a until its entry for peer `peer` satisfies `done`; returns
/// the status's exit code.
pub async fn until_peer<A: Cluster>(
    kc: &Path,
    a: &A,
    peer: &str,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<i32> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let out = clustermesh(kc, &["status", "--context", &a.context(), "-o", "json"]).await?;
        let v: Value = serde_json::from_str(&out.stdout)?;
        let entry = v["clusters"][0]["peers"]
            .as_array()
            .and_then(|p| p.iter().find(|p| p["name"] == peer).cloned());
        if entry.as_ref().is_some_and(&done) {
            return Ok(out.code);
        }
        if Instant::now() >= deadline {
            bail!("{} never showed {peer} {what}: {v}", a.name());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `clustermesh connect --wait` both ways, then `status` healthy for both.
pub async fn connect<A: Cluster, B: Cluster>(kc: &Path, a: &A, b: &B) -> Result<()> {
    run_connect(kc, a, b).await?;
    // Idempotent: a second run changes nothing.
    let v = run_connect(kc, a, b).await?;
    for d in v.as_array().context("connect -o json is a list")? {
        ensure!(
            d["action"] == "unchanged" && d["certificate"] == "reused",
            "second connect changed something: {d}"
        );
    }
    wait_healthy(kc, &[a.context(), b.context()]).await?;
    Ok(())
}

/// Deploys the demo services in both clusters and checks affinity local / remote / none and
/// shared=false from client pods in each cluster. Returns the ClusterIPs of `demo/echo`
/// (affinity local in `a`) per cluster.
pub async fn global_services<A: Cluster, B: Cluster>(
    kc: &Path,
    a: &A,
    b: &B,
) -> Result<(IpAddr, IpAddr)> {
    let global = ("service.cilium.io/global", "true");
    let echo_a = a
        .deploy(
            "demo/echo",
            2,
            &annotations(&[global, ("service.cilium.io/affinity", "local")]),
        )
        .await?;
    let echo_b = b.deploy("demo/echo", 2, &annotations(&[global])).await?;
    let remote_a = a
        .deploy(
            "demo/remote",
            1,
            &annotations(&[global, ("service.cilium.io/affinity", "remote")]),
        )
        .await?;
    b.deploy("demo/remote", 1, &annotations(&[global])).await?;
    let private_a = a
        .deploy(
            "demo/private",
            1,
            &annotations(&[global, ("service.cilium.io/shared", "false")]),
        )
        .await?;
    let private_b = b.deploy("demo/private", 1, &annotations(&[global])).await?;
    a.add_client("client").await?;
    b.add_client("client").await?;
    let (an, bn) = (a.name().to_owned(), b.name().to_owned());
    // Affinity local: only a's backends while they are healthy.
    until_answered_by(a, "client", SocketAddr::new(echo_a, 80), &[&an]).await?;
    // Affinity none (b): both clusters.
    let mut both = vec![an.as_str(), bn.as_str()];
    both.sort();
    until_answered_by(b, "client", SocketAddr::new(echo_b, 80), &both).await?;
    // Affinity remote (a): only b's.
    until_answered_by(a, "client", SocketAddr::new(remote_a, 80), &[&bn]).await?;
    // shared=false in a: a's clients use both, b's clients only b's.
    until_answered_by(a, "client", SocketAddr::new(private_a, 80), &both).await?;
    until_answered_by(b, "client", SocketAddr::new(private_b, 80), &[&bn]).await?;
    // b never even learns a's backends of the unshared service: once a's export of it has
    // reached b (b's client answering says nothing about that), its row has none.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let (rows, a_row) = loop {
        let out = clustermesh(
            kc,
            &[
                "services",
                "--context",
                &b.context(),
                "--service",
                "demo/private",
                "-o",
                "json",
            ],
        )
        .await?;
        let rows: Value = serde_json::from_str(&out.stdout).with_context(|| out.stderr.clone())?;
        let a_row = rows
            .as_array()
            .and_then(|r| r.iter().find(|r| r["cluster"] == an.as_str()))
            .cloned();
        match a_row {
            Some(row) => break (rows, row),
            None if tokio::time::Instant::now() >= deadline => {
                bail!("{an}'s demo/private never reached {bn}: {rows}")
            }
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    ensure!(
        a_row["shared"] == false && a_row["backends"].as_array().is_some_and(Vec::is_empty),
        "{rows}"
    );
    // The CLI shows the service's backends per cluster, and the node programmed as desired.
    let out = clustermesh(
        kc,
        &[
            "services",
            "--context",
            &a.context(),
            "--service",
            "demo/echo",
            "-o",
            "json",
        ],
    )
    .await?;
    ensure!(out.code == 0, "services: {}", out.stderr);
    let rows: Value = serde_json::from_str(&out.stdout)?;
    let clusters: Vec<&str> = rows
        .as_array()
        .context("list")?
        .iter()
        .filter_map(|r| r["cluster"].as_str())
        .collect();
    ensure!(
        clusters.contains(&an.as_str()) && clusters.contains(&bn.as_str()),
        "{rows}"
    );
    for r in rows.as_array().context("list")? {
        ensure!(r["backends"].as_array().map(Vec::len) == Some(2), "{r}");
    }
    let node = a.first_node().await;
    let out = clustermesh(
        kc,
        &["services", "--context", &a.context(), "--node", &node],
    )
    .await?;
    ensure!(
        out.code == 0,
        "services --node: {}{}",
        out.stdout,
        out.stderr
    );
    ensure!(
        out.stdout.contains("programmed as desired"),
        "{}",
        out.stdout
    );
    Ok((echo_a, echo_b))
}

/// Kills a's local backends of `demo/echo` (affinity local) → a's client fails over to b;
/// restarts them → back to a. Then the same through `clustermesh drill` (kill and not-ready);
/// returns the drill reports.
pub async fn failover<A: Cluster, B: Cluster>(
    kc: &Path,
    a: &A,
    b: &B,
    echo_a: IpAddr,
) -> Result<Vec<Value>> {
    let target = SocketAddr::new(echo_a, 80);
    let (an, bn) = (a.name().to_owned(), b.name().to_owned());
    a.set_backends("demo/echo", false).await?;
    until_answered_by(a, "client", target, &[&bn]).await?;
    a.set_backends("demo/echo", true).await?;
    until_answered_by(a, "client", target, &[&an]).await?;
    let mut reports = Vec::new();
    let (down, up) = a.backend_commands("demo/echo");
    let mut args: Vec<String> = [
        "drill",
        "--context",
        &a.context(),
        "--service",
        "demo/echo",
        "-o",
        "json",
        "--hold",
        "1s",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    match a.drill_client("client").await {
        Some((netns, cgroup)) => args.extend([
            "--client-netns".into(),
            netns.display().to_string(),
            "--client-cgroup".into(),
            cgroup.display().to_string(),
        ]),
        None => {
            // The drill's probe must run where the client pod runs (a node's cgroup); on kind
            // that means running `clustermesh drill` on a node, which this harness does not.
            eprintln!(
                "{}: no way to run the drill's client as a pod here; drills skipped",
                a.name()
            );
            return Ok(reports);
        }
    }
    for method in ["command", "not-ready"] {
        let mut a2 = args.clone();
        a2.extend(["--method".into(), method.into()]);
        if method == "command" {
            // Backend processes killed (connections refused) while the client connects every
            // millisecond: the kernel's passive health allows one failure per dead backend.
            a2.extend([
                "--down-cmd".into(),
                down.clone(),
                "--up-cmd".into(),
                up.clone(),
                "--interval".into(),
                "1ms".into(),
            ]);
        }
        let refs: Vec<&str> = a2.iter().map(String::as_str).collect();
        let (out, said) = drill_live(kc, &refs).await?;
        ensure!(
            out.code == 0,
            "drill ({method}) did not pass: {}{}",
            out.stdout,
            out.stderr
        );
        let v: Value = serde_json::from_str(&out.stdout).with_context(|| out.stdout.clone())?;
        ensure!(
            v["passed"] == true && v["served_remote"].as_u64() > Some(0),
            "{v}"
        );
        timeline_was_live(&said, &v).with_context(|| format!("drill ({method})"))?;
        if method == "command" {
            ensure!(
                v["failures_per_backend"].as_f64() <= Some(1.0),
                "more than one failed connection per killed backend: {v}"
            );
        }
        reports.push(v);
    }
    until_answered_by(a, "client", target, &[&an]).await?;
    Ok(reports)
}

/// Runs `clustermesh drill` with `args`, reading its stderr line by line as the drill writes
/// it; returns its output and those lines in the order they came.
async fn drill_live(kc: &Path, args: &[&str]) -> Result<(crate::CliOutput, Vec<String>)> {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt};
    let mut drill = tokio::process::Command::new(crate::lab::binary("clustermesh")?)
        .env("KUBECONFIG", kc)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start clustermesh drill")?;
    let mut stdout = drill.stdout.take().context("the drill's stdout")?;
    let stderr = drill.stderr.take().context("the drill's stderr")?;
    let report = tokio::spawn(async move {
        let mut s = String::new();
        stdout.read_to_string(&mut s).await.map(|_| s)
    });
    let mut said = Vec::new();
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while let Some(l) = tokio::time::timeout_at(deadline, lines.next_line())
        .await
        .with_context(|| format!("the drill still runs after 120 s: {}", said.join("\n")))??
    {
        said.push(l);
    }
    let status = drill.wait().await?;
    let stdout = report.await??;
    let out = crate::CliOutput {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr: said.join("\n"),
    };
    Ok((out, said))
}

/// The drill's stderr `said` shows each event of the report `v` as it happened: the report's
/// timeline, line for line (`  +12.3 ms  what`), and the failover printed before the drill
/// started bringing the backends back, the return after it.
fn timeline_was_live(said: &[String], v: &Value) -> Result<()> {
    let live: Vec<(usize, &str)> = said
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let (at, what) = l.trim_start().split_once(" ms  ")?;
            at.parse::<f64>().ok().map(|_| (i, what))
        })
        .collect();
    let reported: Vec<&str> = v["timeline"]
        .as_array()
        .map(|t| t.iter().filter_map(|e| e["what"].as_str()).collect())
        .unwrap_or_default();
    let printed: Vec<&str> = live.iter().map(|(_, w)| *w).collect();
    ensure!(
        printed == reported,
        "live timeline {printed:#?} is not the report's {reported:#?}"
    );
    let at = |needle: &str| said.iter().position(|l| l.contains(needle));
    let failed_over = at("first connection served remotely");
    let bringing_back = at("drill: bringing the local backends back");
    let returned = at("first connection served locally again");
    ensure!(
        failed_over.is_some()
            && bringing_back.is_some()
            && failed_over < bringing_back
            && bringing_back < returned,
        "events not printed as they happened: {}",
        said.join("\n")
    );
    Ok(())
}

/// Annotates `kubectl annotate --overwrite` on `service` in `c` (`value` `None` removes it).
fn annotate<C: Cluster>(
    kc: &Path,
    c: &C,
    service: &str,
    key: &str,
    value: Option<&str>,
) -> Result<()> {
    let (ns, name) = service.split_once('/').context("namespace/name")?;
    let arg = match value {
        Some(v) => format!("{key}={v}"),
        None => format!("{key}-"),
    };
    let out = std::process::Command::new("kubectl")
        .env("KUBECONFIG", kc)
        .args([
            "--context",
            &c.context(),
            "-n",
            ns,
            "annotate",
            "--overwrite",
            "service",
            name,
            &arg,
        ])
        .output()
        .context("run kubectl")?;
    ensure!(
        out.status.success(),
        "kubectl annotate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Per-cluster weights, end to end (`clustermesh.dev/cluster-weights` on a's `demo/echo`,
/// affinity local): all to b at `a=0,b=100` (the weights replace the affinity), both at
/// `a=50,b=50`, and back to the affinity when the annotation goes. Returns how long each change
/// took to be in effect on a's client node.
pub async fn cluster_weights<A: Cluster, B: Cluster>(
    kc: &Path,
    a: &A,
    b: &B,
    echo_a: IpAddr,
) -> Result<Vec<Duration>> {
    const KEY: &str = "clustermesh.dev/cluster-weights";
    let target = SocketAddr::new(echo_a, 80);
    let (an, bn) = (a.name().to_owned(), b.name().to_owned());
    let mut both = vec![an.as_str(), bn.as_str()];
    both.sort();
    let mut took = Vec::new();
    let steps: [(Option<String>, Vec<&str>); 3] = [
        (Some(format!("{an}=0,{bn}=100")), vec![bn.as_str()]),
        (Some(format!("{an}=50,{bn}=50")), both.clone()),
        (None, vec![an.as_str()]),
    ];
    for (value, want) in steps {
        let started = Instant::now();
        annotate(kc, a, "demo/echo", KEY, value.as_deref())?;
        until_answered_by(a, "client", target, &want).await?;
        took.push(started.elapsed());
    }
    // An invalid value refuses the service alone: what the nodes have stays as it was.
    annotate(kc, a, "demo/echo", KEY, Some("nobody=-1"))?;
    until_answered_by(a, "client", target, &[&an]).await?;
    annotate(kc, a, "demo/echo", KEY, None)?;
    Ok(took)
}

/// Kills b's apiserver: a's client keeps reaching b's backends (`demo/remote`, affinity
/// remote), `status` shows b stale and exits 1; restarts it: status healthy again, and a's
/// node agent deleted no map entry in between (no flap).
pub async fn peer_apiserver_restart<A: Cluster, B: Cluster>(
    kc: &Path,
    a: &A,
    b: &B,
    remote_a: IpAddr,
) -> Result<()> {
    const OPS: &str = "clustermesh_datapath_map_ops_total";
    let target = SocketAddr::new(remote_a, 80);
    let bn = b.name().to_owned();
    until_answered_by(a, "client", target, &[&bn]).await?;
    let deletes_before = a.agent_metric(OPS, "op=\"delete\"").await?;
    b.kill_apiserver().await?;
    let code = until_peer(kc, a, &bn, "stale", |p| p["phase"] == "stale").await?;
    ensure!(code == 1, "status must exit 1 with a stale peer");
    // No traffic impact while b's control plane is down.
    let t = a.connect_from("client", target, 50).await?;
    ensure!(
        answered_by(&t) == [bn.clone()] && !t.contains_key("failed"),
        "{t:?}"
    );
    b.start_apiserver().await?;
    wait_healthy(kc, &[a.context(), b.context()])
        .await
        .context("after the restart")?;
    let t = a.connect_from("client", target, 50).await?;
    ensure!(
        answered_by(&t) == [bn] && !t.contains_key("failed"),
        "{t:?}"
    );
    let deletes_after = a.agent_metric(OPS, "op=\"delete\"").await?;
    ensure!(
        deletes_after == deletes_before,
        "a's node agent deleted {} map entries across b's restart (a flap)",
        deletes_after - deletes_before
    );
    Ok(())
}

/// Disconnects a from b (`force`: a's side only): a drains b, so a's client of `demo/remote`
/// (affinity remote) is then answered by `then` (a's own backends when no peer is left), and
/// a's status no longer lists b.
pub async fn disconnect_drains<A: Cluster, B: Cluster>(
    kc: &Path,
    a: &A,
    b: &B,
    remote_a: IpAddr,
    force: bool,
    then: &[&str],
) -> Result<()> {
    let mut args = vec![
        "disconnect",
        "--context",
        a.name(),
        "--destination-context",
        b.name(),
        "--wait",
    ];
    let (ac, bc) = (a.context(), b.context());
    args[2] = &ac;
    args[4] = &bc;
    if force {
        args.push("--force");
    }
    let out = clustermesh(kc, &args).await?;
    ensure!(out.code == 0, "disconnect: {}{}", out.stdout, out.stderr);
    until_answered_by(a, "client", SocketAddr::new(remote_a, 80), then).await?;
    let out = clustermesh(kc, &["status", "--context", &a.context(), "-o", "json"]).await?;
    let v: Value = serde_json::from_str(&out.stdout)?;
    let peers = v["clusters"][0]["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    ensure!(!peers.iter().any(|p| p["name"] == b.name()), "{v}");
    // a no longer grants b: b's certificate for a's Mesh API is refused from now on.
    let grant = model::objects::grant_secret_name(b.name());
    let out = std::process::Command::new("kubectl")
        .env("KUBECONFIG", kc)
        .args([
            "--context",
            &ac,
            "-n",
            "kube-system",
            "get",
            "secret",
            &grant,
        ])
        .output()?;
    ensure!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("NotFound"),
        "disconnect left {grant} in {ac}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}

/// Someone replaces the CA in a's peer Secret for b with a foreign one: a's apiserver refuses
/// b's server certificate and says so in `status` (exit 1), while a keeps b's last state (a's
/// client still reaches b's backends); `clustermesh connect` notices the wrong CA, re-issues
/// and repairs it.
pub async fn tampered_peer_secret_is_repaired<A: Cluster, B: Cluster>(
    kc: &Path,
    a: &A,
    b: &B,
    remote_a: IpAddr,
) -> Result<()> {
    use base64::Engine;
    let foreign = certs::Ca::generate(
        &model::ClusterName::new(b.name())?,
        Duration::from_secs(86_400),
    )?;
    let patch = serde_json::json!({"data": {"ca.crt":
        base64::engine::general_purpose::STANDARD.encode(foreign.cert_pem())}});
    let secret = model::objects::peer_secret_name(b.name());
    let out = std::process::Command::new("kubectl")
        .env("KUBECONFIG", kc)
        .args([
            "--context",
            &a.context(),
            "-n",
            "kube-system",
            "patch",
            "secret",
            &secret,
            "--type",
            "merge",
            "-p",
            &patch.to_string(),
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "kubectl patch: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let code = until_peer(kc, a, b.name(), "refused for its certificate", |p| {
        p["phase"] != "ready"
            && p["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("certificate"))
    })
    .await?;
    ensure!(code == 1, "status must exit 1 while the peer is refused");
    let t = a
        .connect_from("client", SocketAddr::new(remote_a, 80), 30)
        .await?;
    ensure!(
        answered_by(&t) == [b.name().to_owned()] && !t.contains_key("failed"),
        "b's last state must stay in use: {t:?}"
    );
    let v = run_connect(kc, a, b).await.context("repairing connect")?;
    ensure!(
        v[0]["action"] == "updated" && v[0]["certificate"] == "issued",
        "{v}"
    );
    ensure!(v[1]["action"] == "unchanged", "{v}");
    wait_healthy(kc, &[a.context(), b.context()]).await?;
    Ok(())
}

/// The endpoint conditions of `service`'s EndpointSlices in `c`, by slice name (through
/// kubectl, as a user would look).
fn slice_conditions<C: Cluster>(
    kc: &Path,
    c: &C,
    service: &str,
) -> Result<BTreeMap<String, Value>> {
    let (ns, name) = service
        .split_once('/')
        .context("service is namespace/name")?;
    let out = std::process::Command::new("kubectl")
        .env("KUBECONFIG", kc)
        .args(["--context", &c.context(), "-n", ns, "get", "endpointslices"])
        .arg(format!("--selector=kubernetes.io/service-name={name}"))
        .args(["-o", "json"])
        .output()
        .context("run kubectl")?;
    ensure!(
        out.status.success(),
        "kubectl get endpointslices: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Value = serde_json::from_slice(&out.stdout)?;
    let slices = list["items"].as_array().cloned().unwrap_or_default();
    ensure!(
        !slices.is_empty(),
        "{service} has no EndpointSlices in {}",
        c.name()
    );
    Ok(slices
        .iter()
        .map(|s| {
            let conditions: Vec<Value> = s["endpoints"]
                .as_array()
                .map(|es| es.iter().map(|e| e["conditions"].clone()).collect())
                .unwrap_or_default();
            (
                s["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                Value::Array(conditions),
            )
        })
        .collect())
}

/// Ctrl-C during a drill: `clustermesh drill` runs as a process, once per method (and once
/// more, not-ready, with SIGTERM); once it has taken a's backends of `demo/echo` down (it says
/// so, and a's client is answered by b), it gets a real SIGINT (SIGTERM). It must exit 130
/// (143) with one `restored:` line per object, a's EndpointSlices must have their conditions
/// exactly as before, and a's client must be answered by a's backends again.
pub async fn interrupted_drill_restores<A: Cluster, B: Cluster>(
    kc: &Path,
    a: &A,
    b: &B,
    echo_a: IpAddr,
) -> Result<()> {
    use tokio::io::AsyncBufReadExt;
    let target = SocketAddr::new(echo_a, 80);
    let (an, bn) = (a.name().to_owned(), b.name().to_owned());
    let Some((netns, cgroup)) = a.drill_client("client").await else {
        eprintln!(
            "{}: no way to run the drill's client as a pod here; skipped",
            a.name()
        );
        return Ok(());
    };
    let (down, up) = a.backend_commands("demo/echo");
    for (method, signal, code) in [
        ("not-ready", "INT", 130),
        ("command", "INT", 130),
        ("not-ready", "TERM", 143),
    ] {
        let before = slice_conditions(kc, a, "demo/echo")?;
        let mut cmd = tokio::process::Command::new(crate::lab::binary("clustermesh")?);
        cmd.env("KUBECONFIG", kc)
            .args(["drill", "--context", &a.context(), "--service", "demo/echo"])
            .args(["--method", method, "--hold", "10m", "--timeout", "60s"])
            .arg("--client-netns")
            .arg(&netns)
            .arg("--client-cgroup")
            .arg(&cgroup)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if method == "command" {
            cmd.args(["--down-cmd", &down, "--up-cmd", &up]);
        }
        let mut drill = cmd.spawn().context("start clustermesh drill")?;
        let pid = drill.id().context("the drill's pid")?;
        let stderr = drill.stderr.take().context("the drill's stderr")?;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let mut said: Vec<String> = Vec::new();
        // Taken down: the drill says so, and a's client is served by b.
        let deadline = tokio::time::Instant::now() + CONVERGE;
        while !said
            .iter()
            .any(|l| l.starts_with("drill: local backends down"))
        {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(l)) => said.push(l),
                Ok(None) => bail!(
                    "drill ({method}) ended before taking the backends down: {}",
                    said.join("\n")
                ),
                Err(_) => bail!(
                    "drill ({method}) did not take the backends down in time: {}",
                    said.join("\n")
                ),
            }
        }
        until_answered_by(a, "client", target, &[&bn]).await?;
        if method == "not-ready" {
            let now = slice_conditions(kc, a, "demo/echo")?;
            ensure!(
                now.values()
                    .flat_map(|c| c.as_array().cloned().unwrap_or_default())
                    .all(|c| c["ready"] == false && c["serving"] == false),
                "the drill marked every endpoint not ready: {now:?}"
            );
        }
        let kill = std::process::Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()?;
        ensure!(kill.success(), "kill -{signal} {pid}");
        let status = tokio::time::timeout(CONVERGE, drill.wait())
            .await
            .with_context(|| format!("drill ({method}) still running after SIG{signal}"))??;
        while let Ok(Some(l)) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
            said.push(l);
        }
        let said = said.join("\n");
        ensure!(
            status.code() == Some(code),
            "drill ({method}) after SIG{signal}: {status}, wanted exit {code}: {said}"
        );
        let restored = said.lines().filter(|l| l.starts_with("restored: ")).count();
        match method {
            "not-ready" => {
                ensure!(
                    restored == before.len()
                        && before
                            .keys()
                            .all(|s| said.contains(&format!("restored: EndpointSlice demo/{s} "))),
                    "one restored line per EndpointSlice {:?}: {said}",
                    before.keys()
                );
                // Restored before the drill exited: no waiting here.
                let after = slice_conditions(kc, a, "demo/echo")?;
                ensure!(
                    after == before,
                    "conditions as before the drill: {before:?}, got {after:?}"
                );
            }
            _ => ensure!(
                restored == 1 && said.contains("restored: backends of demo/echo"),
                "one restored line for the backends: {said}"
            ),
        }
        until_answered_by(a, "client", target, &[&an]).await?;
        let told: Vec<&str> = said.lines().filter(|l| !l.starts_with("drill: ")).collect();
        eprintln!(
            "drill ({method}) interrupted by SIG{signal}: exit {code}, {an} serves again; it said:\n  {}",
            told.join("\n  ")
        );
    }
    Ok(())
}
