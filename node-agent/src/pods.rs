//! Local pods' cgroups, found by pod UID the way kubelet names them, so that the kernel can
//! tell which endpoint (identity) a `connect()` or a received packet belongs to.
//!
//! kubelet's cgroupfs driver names a pod's cgroup `pod<uid>` (under `kubepods/<qos>/`), the
//! systemd driver `kubepods-<qos>-pod<uid with '-' as '_'>.slice`; the containers' cgroups are
//! below it. Every cgroup of the pod's subtree maps to the pod (a process runs in its
//! container's cgroup, and that is the cgroup the kernel reports).

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// How deep below the node's cgroup a pod's cgroup may sit (kubepods/qos/pod/container).
const MAX_DEPTH: usize = 8;
/// At most this many cgroups are looked at in one scan (a bound on a hostile tree).
const MAX_CGROUPS: usize = 100_000;

/// The pod UID a cgroup directory name stands for, if it is a pod's.
pub fn uid_of(name: &str) -> Option<String> {
    let raw = if let Some(rest) = name.strip_suffix(".slice") {
        // systemd: kubepods-pod<uid>.slice, kubepods-<qos>-pod<uid>.slice
        let i = rest.rfind("-pod")?;
        rest[i + 4..].replace('_', "-")
    } else {
        name.strip_prefix("pod")?.to_owned()
    };
    is_uid(&raw).then_some(raw)
}

/// A Kubernetes UID: 36 characters, hex digits and dashes in the 8-4-4-4-12 layout.
fn is_uid(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        })
}

/// Every pod cgroup under `root`: pod UID → the cgroup IDs of its subtree (the pod's own
/// first). A directory that cannot be read is skipped (the next scan sees it).
pub fn scan(root: &Path) -> HashMap<String, Vec<u64>> {
    let mut out: HashMap<String, Vec<u64>> = HashMap::new();
    let mut seen = 0usize;
    // (directory, depth, the pod it belongs to)
    let mut stack = vec![(root.to_path_buf(), 0usize, None::<String>)];
    while let Some((dir, depth, pod)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if seen >= MAX_CGROUPS {
                tracing::warn!(root = %root.display(), limit = MAX_CGROUPS, "cgroup scan stopped at its limit");
                return out;
            }
            let Ok(meta) = e.metadata() else { continue };
            if !meta.is_dir() {
                continue;
            }
            seen += 1;
            let name = e.file_name().to_string_lossy().into_owned();
            let owner = pod.clone().or_else(|| uid_of(&name));
            if let Some(uid) = &owner {
                out.entry(uid.clone()).or_default().push(meta.ino());
            }
            if depth + 1 < MAX_DEPTH {
                stack.push((e.path(), depth + 1, owner));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "8d0b8a9e-2f7c-4a53-9b1e-3c5d6e7f8a90";

    #[test]
    fn both_kubelet_cgroup_drivers_are_recognised() {
        assert_eq!(uid_of(&format!("pod{UID}")).as_deref(), Some(UID));
        let systemd = format!("kubepods-burstable-pod{}.slice", UID.replace('-', "_"));
        assert_eq!(uid_of(&systemd).as_deref(), Some(UID));
        let guaranteed = format!("kubepods-pod{}.slice", UID.replace('-', "_"));
        assert_eq!(uid_of(&guaranteed).as_deref(), Some(UID));
        for no in [
            "kubepods",
            "kubepods-burstable.slice",
            "pod",
            "podnot-a-uid",
            "cri-containerd-0123.scope",
            &format!("pod{UID}x"),
        ] {
            assert_eq!(uid_of(no), None, "{no}");
        }
    }

    #[test]
    fn a_pods_subtree_maps_to_it() {
        let root = tempfile::tempdir().unwrap();
        let pod = root
            .path()
            .join("kubepods/besteffort")
            .join(format!("pod{UID}"));
        std::fs::create_dir_all(pod.join("container-a")).unwrap();
        std::fs::create_dir_all(root.path().join("kubepods/other")).unwrap();
        let found = scan(root.path());
        assert_eq!(found.len(), 1);
        let ids = &found[UID];
        assert_eq!(ids.len(), 2, "the pod and its container");
        assert!(ids.contains(&std::fs::metadata(&pod).unwrap().ino()));
        assert!(ids.contains(&std::fs::metadata(pod.join("container-a")).unwrap().ino()));
    }
}
