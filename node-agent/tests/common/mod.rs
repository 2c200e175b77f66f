//! Helpers shared by the datapath tests: a node (pin directory + cgroup, removed on drop),
//! a client run from inside the node's cgroup, and backends that answer with their name.

#![allow(dead_code, unreachable_pub)]

pub mod pod_cgroup;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;

use node_agent::datapath::{self, Datapath};
use node_agent::program::Programmer;
use serde_json::Value;

pub const CGROUP_ROOT: &str = "/sys/fs/cgroup/unified";
pub const BPFFS: &str = "/sys/fs/bpf";

pub const CLIENT: &str = r#"
import json, socket, sys, time
mode, host, port, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
delay = float(sys.argv[5]) if len(sys.argv) > 5 else 0.0
counts, failures, sources, errors = {}, 0, set(), set()
def show(a):
    return ("[%s]:%d" if ":" in a[0] else "%s:%d") % (a[0], a[1])
for _ in range(n):
    try:
        if mode == "tcp":
            s = socket.create_connection((host, port), timeout=2)
            name = s.recv(64).decode().strip()
            peer = s.getpeername()
            sources.add(show(peer))
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(2)
            s.sendto(b"hi", (host, port))
            data, src = s.recvfrom(64)
            name = data.decode().strip()
            sources.add(show(src))
        s.close()
        counts[name] = counts.get(name, 0) + 1
    except Exception as e:
        failures += 1
        errors.add(repr(e))
    if delay:
        time.sleep(delay)
print(json.dumps({"counts": counts, "failures": failures, "sources": sorted(sources), "errors": sorted(errors)[:3]}))
"#;

/// A node: a pin directory and a cgroup, removed on drop (also on failure).
pub struct Node {
    pub dir: PathBuf,
    pub cgroup: PathBuf,
    pub script: tempfile::NamedTempFile,
}

impl Node {
    pub fn new() -> Self {
        assert!(
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .lines()
                .any(|l| l.contains(" /sys/fs/bpf ") && l.contains(" - bpf ")),
            "bpffs is not mounted at /sys/fs/bpf: run scripts/setup.sh (as root)"
        );
        let name = test_support::unique_name("cmtest");
        let cgroup = Path::new(CGROUP_ROOT).join(&name);
        std::fs::create_dir(&cgroup).unwrap();
        let script = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(script.path(), CLIENT).unwrap();
        Self {
            dir: Path::new(BPFFS).join(&name),
            cgroup,
            script,
        }
    }

    pub fn open(&self) -> Programmer {
        Programmer::new(Datapath::open(&self.dir, &self.cgroup).unwrap()).unwrap()
    }

    /// With the maps sized for `services`.
    pub fn open_sized(&self, services: u32) -> Result<Programmer, node_agent::datapath::Error> {
        let sizes = node_agent::maps::Sizes { services };
        Programmer::new(Datapath::open_sized(&self.dir, &self.cgroup, sizes)?)
    }

    /// Starts the client in the node's cgroup: `n` connections, `delay` seconds apart.
    pub fn spawn_client(&self, vip: SocketAddr, n: usize, delay: f64) -> std::process::Child {
        let cmd = format!(
            "echo $$ > {}/cgroup.procs && exec python3 {} tcp {} {} {n} {delay}",
            self.cgroup.display(),
            self.script.path().display(),
            vip.ip(),
            vip.port()
        );
        Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs the client `n` times from inside the node's cgroup (or outside, for the control).
    pub fn client(&self, inside: bool, mode: &str, vip: SocketAddr, n: usize) -> Value {
        let join = if inside {
            format!("echo $$ > {}/cgroup.procs && ", self.cgroup.display())
        } else {
            String::new()
        };
        let cmd = format!(
            "{join}exec python3 {} {mode} {} {} {n}",
            self.script.path().display(),
            vip.ip(),
            vip.port()
        );
        let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        assert!(
            out.status.success(),
            "client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = datapath::remove(&self.dir);
        let _ = std::fs::remove_dir(self.cgroup.join("pod"));
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// Backends: TCP listeners and UDP sockets that answer with their name.
pub fn backend(name: &'static str, ip: &str) -> SocketAddr {
    let tcp = std::net::TcpListener::bind(format!("{ip}:0")).unwrap();
    let addr = tcp.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in tcp.incoming().flatten() {
            use std::io::Write;
            let mut s = s;
            let _ = writeln!(s, "{name}");
        }
    });
    // The same port for UDP.
    let udp = std::net::UdpSocket::bind(addr).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(format!("{name}\n").as_bytes(), from);
        }
    });
    addr
}

const SERVER: &str = r#"
import socket, sys
name, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((ip, port))
s.listen(512)
print("ready", flush=True)
while True:
    c, _ = s.accept()
    try:
        c.sendall((name + "\n").encode())
    finally:
        c.close()
"#;

/// A backend as its own process (so that a test can kill it), answering with its name.
pub struct BackendProcess(std::process::Child);

impl BackendProcess {
    pub fn start(name: &str, addr: SocketAddr) -> Self {
        use std::io::BufRead;
        let mut child = Command::new("python3")
            .args([
                "-c",
                SERVER,
                name,
                &addr.ip().to_string(),
                &addr.port().to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "ready",
            "backend {name} on {addr} did not start"
        );
        Self(child)
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A free TCP port on 127.0.0.1 (also free on other loopback addresses in practice).
pub fn free_port() -> u16 {
    test_support::free_port().unwrap()
}

/// A "pod": its own network namespace (veth to the host side) and a child cgroup of the
/// node's cgroup. Removed on drop.
pub struct Pod {
    pub netns: String,
    pub host_ip: std::net::IpAddr,
    host_if: String,
    pub cgroup: PathBuf,
}

/// Runs a shell command; fails the test with its stderr when it fails.
pub fn run(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Pod {
    pub fn new(node: &Node) -> Self {
        let id = std::process::id() % 200 + 20;
        let netns = test_support::unique_name("cmpod");
        let host_if = format!("cmh{id}");
        let pod_if = format!("cmp{id}");
        run(&format!(
            "ip netns add {netns} && ip link add {host_if} type veth peer name {pod_if} && \
             ip link set {pod_if} netns {netns} && ip addr add 10.77.{id}.1/24 dev {host_if} && ip link set {host_if} up && \
             ip -n {netns} addr add 10.77.{id}.2/24 dev {pod_if} && ip -n {netns} link set {pod_if} up && \
             ip -n {netns} link set lo up && ip -n {netns} route add default via 10.77.{id}.1"
        ));
        let cgroup = node.cgroup.join("pod");
        std::fs::create_dir(&cgroup).unwrap();
        Self {
            netns,
            host_ip: format!("10.77.{id}.1").parse().unwrap(),
            host_if,
            cgroup,
        }
    }

    /// Runs the client in the pod's network namespace, inside its cgroup or not.
    pub fn client(&self, node: &Node, inside: bool, vip: SocketAddr, n: usize) -> Value {
        let join = if inside {
            format!("echo $$ > {}/cgroup.procs && ", self.cgroup.display())
        } else {
            String::new()
        };
        let cmd = format!(
            "{join}exec python3 {} tcp {} {} {n}",
            node.script.path().display(),
            vip.ip(),
            vip.port()
        );
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.netns))
            .args(["sh", "-c", &cmd])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns])
            .status();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .status();
        let _ = std::fs::remove_dir(&self.cgroup);
    }
}

/// A backend of cluster `cluster_id` (zone 0).
pub fn spec(addr: SocketAddr, cluster_id: u16) -> node_agent::program::BackendSpec {
    node_agent::program::BackendSpec {
        addr,
        cluster_id,
        zone: 0,
    }
}

/// The client's tally: who answered how many times.
pub fn counts(v: &Value) -> std::collections::BTreeMap<String, u64> {
    v["counts"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, n)| (k.clone(), n.as_u64().unwrap()))
        .collect()
}
