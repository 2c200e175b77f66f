//! What a drill took down, and putting it back: the restore guard, and SIGINT / SIGTERM.
//!
//! The drill records each object in a [`Guard`] *before* it takes it down (an EndpointSlice's
//! endpoints as they were read, or the `--up-cmd` that brings killed backends back), so that a
//! signal, an error or the normal end of the drill restores exactly that, and only that.
//! Restoring is not cut short by a further signal; one that arrives says what remains. What
//! cannot be restored is named with the command that restores it by hand. Must not take
//! anything down itself.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
use kube::Api;
use kube::api::{Patch, PatchParams};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// How long one attempt to put an EndpointSlice back may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts per EndpointSlice before its restore counts as failed.
const ATTEMPTS: u32 = 4;

/// A signal that interrupts the drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Interrupt {
    /// SIGINT (Ctrl-C).
    Int,
    /// SIGTERM.
    Term,
}

impl Interrupt {
    /// The exit code of a command interrupted by this signal (128 + the signal's number).
    pub(crate) fn exit_code(self) -> std::process::ExitCode {
        std::process::ExitCode::from(match self {
            Self::Int => 130,
            Self::Term => 143,
        })
    }
}

impl std::fmt::Display for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Int => "SIGINT",
            Self::Term => "SIGTERM",
        })
    }
}

/// SIGINT and SIGTERM, caught from [`Signals::install`] on (they no longer end the process).
pub(crate) struct Signals {
    source: Source,
}

enum Source {
    Os {
        int: Signal,
        term: Signal,
    },
    /// Signals sent by a test (none once the sender is gone).
    #[cfg(test)]
    Test(tokio::sync::mpsc::UnboundedReceiver<Interrupt>),
}

impl Signals {
    /// Catches SIGINT and SIGTERM from now on.
    pub(crate) fn install() -> Result<Self> {
        Ok(Self {
            source: Source::Os {
                int: signal(SignalKind::interrupt()).context("catch SIGINT")?,
                term: signal(SignalKind::terminate()).context("catch SIGTERM")?,
            },
        })
    }

    /// Signals that `send` delivers, for tests that must not take the test process's own.
    #[cfg(test)]
    pub(crate) fn fake() -> (Self, tokio::sync::mpsc::UnboundedSender<Interrupt>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        (
            Self {
                source: Source::Test(rx),
            },
            tx,
        )
    }

    /// Signals that never come.
    #[cfg(test)]
    pub(crate) fn none() -> Self {
        Self::fake().0
    }

    /// The next signal.
    pub(crate) async fn recv(&mut self) -> Interrupt {
        match &mut self.source {
            Source::Os { int, term } => tokio::select! {
                _ = int.recv() => Interrupt::Int,
                _ = term.recv() => Interrupt::Term,
            },
            #[cfg(test)]
            Source::Test(rx) => match rx.recv().await {
                Some(s) => s,
                None => std::future::pending().await,
            },
        }
    }
}

/// One object the drill took down, and what it was before.
#[derive(Debug, Clone)]
enum Item {
    /// An EndpointSlice whose endpoints were marked not ready; `endpoints` as read before.
    Slice {
        namespace: String,
        name: String,
        endpoints: Vec<Endpoint>,
    },
    /// Backends taken down by `--down-cmd`; `up_cmd` brings them back.
    Backends {
        service: String,
        addresses: Vec<IpAddr>,
        up_cmd: String,
    },
}

impl Item {
    fn describe(&self) -> String {
        match self {
            Self::Slice {
                namespace, name, ..
            } => format!("EndpointSlice {namespace}/{name}"),
            Self::Backends {
                service, addresses, ..
            } => format!("backends of {service} ({})", join(addresses)),
        }
    }
}

fn join(addresses: &[IpAddr]) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What [`Guard::restore`] did.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    /// Objects put back (or found gone).
    pub restored: usize,
    /// Objects that could not be put back (each printed with the command that does).
    pub failed: usize,
    /// Those commands, one per object that could not be put back.
    pub by_hand: Vec<String>,
    /// The first signal that arrived while restoring.
    pub signal: Option<Interrupt>,
}

/// What the drill has taken down and not yet put back.
pub(crate) struct Guard {
    client: kube::Client,
    context: String,
    kubeconfig: Option<String>,
    pending: Vec<Item>,
}

impl Guard {
    /// A guard for objects of `client`'s cluster, reached as kubeconfig `context` (of
    /// `kubeconfig`, when not the default) by the commands printed for restoring by hand.
    pub(crate) fn new(client: kube::Client, context: &str, kubeconfig: Option<String>) -> Self {
        Self {
            client,
            context: context.to_owned(),
            kubeconfig,
            pending: Vec::new(),
        }
    }

    /// Records `slice` (of `namespace`) as read, before its endpoints are changed.
    pub(crate) fn record_slice(&mut self, namespace: &str, slice: &EndpointSlice) {
        self.pending.push(Item::Slice {
            namespace: namespace.to_owned(),
            name: slice.metadata.name.clone().unwrap_or_default(),
            endpoints: slice.endpoints.clone(),
        });
    }

    /// Records that the backends at `addresses` of `service` are about to be taken down by a
    /// command, and that `up_cmd` brings them back.
    pub(crate) fn record_backends(&mut self, service: &str, addresses: &[IpAddr], up_cmd: &str) {
        self.pending.push(Item::Backends {
            service: service.to_owned(),
            addresses: addresses.to_vec(),
            up_cmd: up_cmd.to_owned(),
        });
    }

    /// The command that restores `item` by hand.
    fn by_hand(&self, item: &Item) -> String {
        match item {
            Item::Slice {
                namespace,
                name,
                endpoints,
            } => {
                let mut cmd = String::from("kubectl");
                if let Some(kc) = &self.kubeconfig {
                    cmd.push_str(&format!(" --kubeconfig {}", quote(kc)));
                }
                let patch = serde_json::json!({ "endpoints": endpoints }).to_string();
                cmd.push_str(&format!(
                    " --context {} -n {} patch endpointslice {} --type merge -p {}",
                    quote(&self.context),
                    quote(namespace),
                    quote(name),
                    quote(&patch)
                ));
                cmd
            }
            Item::Backends { up_cmd, .. } => up_cmd.clone(),
        }
    }

    /// Puts back everything recorded, in order. Prints to stderr one `restored: ...` line per
    /// object when `announce` (or from the first signal on), and always, for each object that
    /// could not be put back, the error and the command that restores it by hand. A signal
    /// meanwhile does not stop it: it prints what remains, with those commands.
    pub(crate) async fn restore(&mut self, signals: &mut Signals, announce: bool) -> Restored {
        let mut announce = announce;
        let mut done = Restored::default();
        let mut quiet: Vec<String> = Vec::new();
        while !self.pending.is_empty() {
            let item = self.pending[0].clone();
            let result = {
                let fut = restore_one(&self.client, &item);
                tokio::pin!(fut);
                loop {
                    tokio::select! {
                        r = &mut fut => break r,
                        s = signals.recv() => {
                            done.signal.get_or_insert(s);
                            if !announce {
                                for line in quiet.drain(..) {
                                    eprintln!("{line}");
                                }
                                announce = true;
                            }
                            eprintln!(
                                "{s}: still restoring, the drill exits when done; remaining \
                                 (to restore by hand if it must be stopped):"
                            );
                            for it in &self.pending {
                                eprintln!("  {}: {}", it.describe(), self.by_hand(it));
                            }
                        }
                    }
                }
            };
            self.pending.remove(0);
            match result {
                Ok(line) => {
                    done.restored += 1;
                    if announce {
                        eprintln!("{line}");
                    } else {
                        quiet.push(line);
                    }
                }
                Err(e) => {
                    done.failed += 1;
                    let cmd = self.by_hand(&item);
                    eprintln!("error: could not restore {}: {e:#}", item.describe());
                    eprintln!("  restore it by hand: {cmd}");
                    done.by_hand.push(cmd);
                }
            }
        }
        done
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        eprintln!("error: the drill stops with these still down; restore them by hand:");
        for it in &self.pending {
            eprintln!("  {}: {}", it.describe(), self.by_hand(it));
        }
    }
}

/// Puts `item` back; returns the line that says so.
async fn restore_one(client: &kube::Client, item: &Item) -> Result<String> {
    match item {
        Item::Slice {
            namespace,
            name,
            endpoints,
        } => {
            let api = Api::<EndpointSlice>::namespaced(client.clone(), namespace);
            let patch = serde_json::json!({ "endpoints": endpoints });
            let mut backoff = telemetry::backoff::Backoff::new(
                Duration::from_millis(200),
                Duration::from_secs(2),
                Duration::from_secs(60),
            );
            let mut attempt = 1;
            loop {
                let r = tokio::time::timeout(
                    ATTEMPT_TIMEOUT,
                    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)),
                )
                .await;
                let e = match r {
                    Ok(Ok(_)) => {
                        return Ok(format!(
                            "restored: EndpointSlice {namespace}/{name} conditions {}",
                            conditions(endpoints)
                        ));
                    }
                    Ok(Err(kube::Error::Api(s))) if s.code == 404 => {
                        return Ok(format!(
                            "restored: EndpointSlice {namespace}/{name} is gone (deleted \
                             meanwhile): nothing to put back"
                        ));
                    }
                    Ok(Err(e)) => anyhow::Error::new(e),
                    Err(_) => anyhow::anyhow!("no answer within {ATTEMPT_TIMEOUT:?}"),
                };
                if attempt >= ATTEMPTS {
                    return Err(e.context(format!("patch EndpointSlice ({attempt} attempts)")));
                }
                attempt += 1;
                backoff.wait().await;
            }
        }
        Item::Backends {
            service,
            addresses,
            up_cmd,
        } => {
            run_shell(up_cmd, "--up-cmd", None).await?;
            Ok(format!(
                "restored: backends of {service} ({}): --up-cmd ran",
                join(addresses)
            ))
        }
    }
}

/// Runs `cmd` with `sh -c` in a process group of its own, so that a Ctrl-C at the terminal
/// reaches the drill only (which decides what to stop); killed after `timeout`, if given.
pub(crate) async fn run_shell(cmd: &str, what: &str, timeout: Option<Duration>) -> Result<()> {
    let child = tokio::process::Command::new("sh")
        .args(["-c", cmd])
        .stdin(std::process::Stdio::null())
        .process_group(0)
        .kill_on_drop(true)
        .output();
    let out = match timeout {
        Some(t) => tokio::time::timeout(t, child)
            .await
            .map_err(|_| anyhow::anyhow!("{what} {cmd:?} did not finish within {t:?}"))?,
        None => child.await,
    }
    .with_context(|| format!("run {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} {cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ready=… serving=…` of `endpoints` (each value that occurs; `unset` for no condition).
fn conditions(endpoints: &[Endpoint]) -> String {
    let values = |f: fn(&EndpointConditions) -> Option<bool>| {
        let set: std::collections::BTreeSet<&str> = endpoints
            .iter()
            .map(|e| match e.conditions.as_ref().and_then(f) {
                Some(true) => "true",
                Some(false) => "false",
                None => "unset",
            })
            .collect();
        set.into_iter().collect::<Vec<_>>().join(",")
    };
    format!(
        "ready={} serving={}",
        values(|c| c.ready),
        values(|c| c.serving)
    )
}

/// `s` as one shell word.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c))
    {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn endpoint(ip: &str, ready: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.to_owned()],
            conditions: ready.map(|r| EndpointConditions {
                ready: Some(r),
                serving: Some(r),
                terminating: None,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn conditions_name_every_value_that_occurs() {
        assert_eq!(
            conditions(&[
                endpoint("10.0.0.1", Some(true)),
                endpoint("10.0.0.2", Some(true))
            ]),
            "ready=true serving=true"
        );
        assert_eq!(
            conditions(&[endpoint("10.0.0.1", Some(true)), endpoint("10.0.0.2", None)]),
            "ready=true,unset serving=true,unset"
        );
    }

    #[test]
    fn quoted_words_survive_the_shell() {
        assert_eq!(quote("demo"), "demo");
        assert_eq!(quote("a b"), "'a b'");
        let tricky = r#"{"x":"it's"}"#;
        let out = std::process::Command::new("sh")
            .args(["-c", &format!("printf %s {}", quote(tricky))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), tricky);
    }
}
