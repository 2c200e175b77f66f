//! Pods as child cgroups of the node's cgroup (sharing the host's network, each with its own
//! loopback address): a TCP+UDP server answering with its name, and a client that tallies
//! answers and errors. Used by the policy and flow tests.

use std::io::BufRead;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use node_agent::policy::Endpoint;
use serde_json::Value;

use super::Node;

pub const SERVER: &str = r#"
import socket, sys, threading
name, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
t = socket.socket()
t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind((ip, port))
t.listen(512)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind((ip, port))
def udp():
    while True:
        data, src = u.recvfrom(64)
        u.sendto((name + "\n").encode(), src)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, _ = t.accept()
    try:
        c.sendall((name + "\n").encode())
    finally:
        c.close()
"#;

/// `n` attempts from `src` to `dst`: TCP connect + read, or a UDP datagram + its answer.
pub const CLIENT: &str = r#"
import json, socket, sys
mode, src, host, port, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
ok, errors = {}, {}
for _ in range(n):
    try:
        if mode == "tcp":
            s = socket.socket()
            s.settimeout(0.5)
            s.bind((src, 0))
            s.connect((host, port))
            name = s.recv(64).decode().strip()
        else:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(0.5)
            s.bind((src, 0))
            s.sendto(b"hi", (host, port))
            name = s.recvfrom(64)[0].decode().strip()
        s.close()
        ok[name] = ok.get(name, 0) + 1
    except Exception as e:
        key = type(e).__name__
        errors[key] = errors.get(key, 0) + 1
print(json.dumps({"ok": ok, "errors": errors}))
"#;

/// A pod: a child cgroup of the node's cgroup, removed on drop.
pub struct PodCgroup {
    pub path: PathBuf,
    pub id: u64,
}

impl PodCgroup {
    pub fn new(node: &Node, name: &str) -> Self {
        let path = node.cgroup.join(name);
        std::fs::create_dir(&path).unwrap();
        let id = std::fs::metadata(&path).unwrap().ino();
        Self { path, id }
    }

    pub fn endpoint(&self, identity: u32, ingress: bool, egress: bool) -> Endpoint {
        Endpoint {
            cgroup_id: self.id,
            identity,
            ingress,
            egress,
        }
    }

    pub fn join(&self) -> String {
        format!("echo $$ > {}/cgroup.procs && ", self.path.display())
    }

    /// Runs the client inside this pod.
    pub fn client(&self, mode: &str, src: &str, dst: SocketAddr, n: usize) -> Value {
        let cmd = format!(
            "{}exec python3 -c '{}' {mode} {src} {} {} {n}",
            self.join(),
            CLIENT.replace('\'', "'\\''"),
            dst.ip(),
            dst.port()
        );
        let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        assert!(
            out.status.success(),
            "client: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Starts a TCP+UDP server named `name` inside this pod.
    pub fn server(&self, name: &str, addr: SocketAddr) -> Server {
        let cmd = format!(
            "{}exec python3 -c '{}' {name} {} {}",
            self.join(),
            SERVER.replace('\'', "'\\''"),
            addr.ip(),
            addr.port()
        );
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "ready", "server {name} on {addr}");
        Server(child)
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

pub struct Server(pub Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn ok(run: &Value, name: &str) -> u64 {
    run["ok"][name].as_u64().unwrap_or(0)
}

pub fn errors(run: &Value, kind: &str) -> u64 {
    run["errors"][kind].as_u64().unwrap_or(0)
}
