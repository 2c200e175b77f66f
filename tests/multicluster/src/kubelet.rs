//! The lab kubelet's first part (issue #15): what one container of a stored Pod runs, resolved
//! from the objects the way the kubelet resolves it — the image's entrypoint mapped to a built
//! binary, `command` and `args` with `$(VAR)` expanded, `env` (with `fieldRef`,
//! `configMapKeyRef`, `secretKeyRef`) and `envFrom`, and each volume mount with what it holds
//! (Secret and ConfigMap files with their modes, projected sources incl. the ServiceAccount
//! token, emptyDir, hostPath). A missing object or key that is not optional refuses the
//! container naming the field, as the kubelet's `CreateContainerConfigError` does.
//!
//! Pure: no I/O. Running the result (mount namespace, network namespace, cgroup, probes,
//! restarts) is the next step of the lab kubelet; see the issue.

use std::collections::BTreeMap;
use std::path::PathBuf;

use k8s_openapi::api::core::v1::{Container, PodSpec, Volume};

/// What the kubelet knows of a pod besides its spec (for `fieldRef`).
#[derive(Debug, Clone, Default)]
pub struct PodFacts {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.uid`.
    pub uid: String,
    /// `spec.nodeName`.
    pub node: String,
    /// `status.podIP`.
    pub pod_ip: String,
    /// `status.hostIP`.
    pub host_ip: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
}

/// The ConfigMaps and Secrets a pod may reference, by (namespace, name).
#[derive(Debug, Clone, Default)]
pub struct Objects {
    /// ConfigMap data.
    pub config_maps: BTreeMap<(String, String), BTreeMap<String, String>>,
    /// Secret data (decoded).
    pub secrets: BTreeMap<(String, String), BTreeMap<String, Vec<u8>>>,
}

/// What a mounted volume holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An empty directory of the pod (in memory when asked).
    EmptyDir {
        /// `medium: Memory`.
        memory: bool,
    },
    /// A path of the node.
    HostPath(PathBuf),
    /// A PersistentVolumeClaim (the lab keeps one directory per claim, across restarts).
    Claim(String),
    /// Files: relative path → (content, mode). A ServiceAccount token file is listed in
    /// `tokens` instead (it is minted when the container starts).
    Files {
        /// The files.
        files: BTreeMap<String, (Vec<u8>, u32)>,
        /// Projected ServiceAccount tokens: relative path → (audience, expiration seconds,
        /// mode).
        tokens: BTreeMap<String, (String, i64, u32)>,
    },
}

/// One volume mount of the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Where the container sees it.
    pub path: String,
    /// Read-only.
    pub read_only: bool,
    /// The volume's name.
    pub volume: String,
    /// What it holds.
    pub source: Source,
}

/// What to run for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessSpec {
    /// The program and its arguments, expanded.
    pub argv: Vec<String>,
    /// The environment (`envFrom` first, `env` over it).
    pub env: BTreeMap<String, String>,
    /// Volume mounts, in the container's order.
    pub mounts: Vec<Mount>,
    /// `hostNetwork`.
    pub host_network: bool,
    /// Capabilities added after dropping (`securityContext.capabilities.add`), when it drops
    /// `ALL`.
    pub capabilities: Option<Vec<String>>,
}

/// Why a container cannot be started (the kubelet's `CreateContainerConfigError`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("container {container}: {field}: {reason}")]
pub struct ConfigError {
    /// The container.
    pub container: String,
    /// The field, as a path.
    pub field: String,
    /// What is wrong.
    pub reason: String,
}

/// Expands `$(VAR)` in `s` from `env` as Kubernetes does: `$$` is a literal `$`, a reference to
/// an undefined variable is left as written.
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(s.len());
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'$' && i + 1 < b.len() {
            if b[i + 1] == b'$' {
                out.push('$');
                i += 2;
                continue;
            }
            if b[i + 1] == b'('
                && let Some(end) = s[i + 2..].find(')')
            {
                let name = &s[i + 2..i + 2 + end];
                match env.get(name) {
                    Some(v) => out.push_str(v),
                    None => out.push_str(&s[i..i + 3 + end]),
                }
                i += 3 + end;
                continue;
            }
        }
        let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn field_ref(facts: &PodFacts, path: &str) -> Option<String> {
    Some(match path {
        "metadata.name" => facts.name.clone(),
        "metadata.namespace" => facts.namespace.clone(),
        "metadata.uid" => facts.uid.clone(),
        "spec.nodeName" => facts.node.clone(),
        "status.podIP" => facts.pod_ip.clone(),
        "status.hostIP" => facts.host_ip.clone(),
        p => {
            let key = p
                .strip_prefix("metadata.labels['")
                .and_then(|r| r.strip_suffix("']"))?;
            facts.labels.get(key).cloned().unwrap_or_default()
        }
    })
}

/// Resolves container `name` of `spec` for the pod `facts`; `binary` maps (image, command) to
/// the program to run (`None`: the image is not one the lab can run).
pub fn resolve(
    spec: &PodSpec,
    facts: &PodFacts,
    name: &str,
    objects: &Objects,
    binary: &dyn Fn(&str, &str) -> Option<PathBuf>,
) -> Result<ProcessSpec, ConfigError> {
    let err = |field: String, reason: String| ConfigError {
        container: name.to_owned(),
        field,
        reason,
    };
    let (index, c): (usize, &Container) = spec
        .containers
        .iter()
        .enumerate()
        .find(|(_, c)| c.name == name)
        .ok_or_else(|| err("spec.containers".into(), "no such container".into()))?;
    let at = |f: &str| format!("spec.containers[{index}].{f}");
    let ns = facts.namespace.clone();
    let cm = |n: &str| objects.config_maps.get(&(ns.clone(), n.to_owned()));
    let secret = |n: &str| objects.secrets.get(&(ns.clone(), n.to_owned()));

    // Environment: envFrom first, then env in order (each may refer to the ones before).
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    for (i, from) in c.env_from.iter().flatten().enumerate() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match cm(&r.name) {
                Some(data) => {
                    for (k, v) in data {
                        env.insert(format!("{prefix}{k}"), v.clone());
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(err(
                        at(&format!("envFrom[{i}].configMapRef")),
                        format!("configmap \"{}\" not found", r.name),
                    ));
                }
            }
        }
        if let Some(r) = &from.secret_ref {
            match secret(&r.name) {
                Some(data) => {
                    for (k, v) in data {
                        env.insert(format!("{prefix}{k}"), String::from_utf8_lossy(v).into());
                    }
                }
                None if r.optional == Some(true) => {}
                None => {
                    return Err(err(
                        at(&format!("envFrom[{i}].secretRef")),
                        format!("secret \"{}\" not found", r.name),
                    ));
                }
            }
        }
    }
    for (i, e) in c.env.iter().flatten().enumerate() {
        let value = if let Some(v) = &e.value {
            Some(expand(v, &env))
        } else if let Some(from) = &e.value_from {
            if let Some(f) = &from.field_ref {
                Some(field_ref(facts, &f.field_path).ok_or_else(|| {
                    err(
                        at(&format!("env[{i}].valueFrom.fieldRef.fieldPath")),
                        format!("unsupported field {:?}", f.field_path),
                    )
                })?)
            } else if let Some(k) = &from.config_map_key_ref {
                match cm(&k.name).and_then(|d| d.get(&k.key)) {
                    Some(v) => Some(v.clone()),
                    None if k.optional == Some(true) => None,
                    None => {
                        return Err(err(
                            at(&format!("env[{i}].valueFrom.configMapKeyRef")),
                            format!("key {:?} of configmap \"{}\" not found", k.key, k.name),
                        ));
                    }
                }
            } else if let Some(k) = &from.secret_key_ref {
                match secret(&k.name).and_then(|d| d.get(&k.key)) {
                    Some(v) => Some(String::from_utf8_lossy(v).into()),
                    None if k.optional == Some(true) => None,
                    None => {
                        return Err(err(
                            at(&format!("env[{i}].valueFrom.secretKeyRef")),
                            format!("key {:?} of secret \"{}\" not found", k.key, k.name),
                        ));
                    }
                }
            } else {
                return Err(err(
                    at(&format!("env[{i}].valueFrom")),
                    "only fieldRef, configMapKeyRef and secretKeyRef are supported".into(),
                ));
            }
        } else {
            Some(String::new())
        };
        if let Some(v) = value {
            env.insert(e.name.clone(), v);
        }
    }

    // The program: the command (or the image's entrypoint: none is known here) and args.
    let image = c.image.clone().unwrap_or_default();
    let command = c.command.clone().unwrap_or_default();
    let Some(program) = command.first() else {
        return Err(err(
            at("command"),
            format!("image {image:?}: the lab needs an explicit command"),
        ));
    };
    let path = binary(&image, program).ok_or_else(|| {
        err(
            at("command[0]"),
            format!("the lab cannot run {program:?} of image {image:?}"),
        )
    })?;
    let mut argv = vec![path.display().to_string()];
    argv.extend(command.iter().skip(1).map(|a| expand(a, &env)));
    argv.extend(c.args.iter().flatten().map(|a| expand(a, &env)));

    // Volumes.
    let volumes: BTreeMap<&str, &Volume> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mut mounts = Vec::new();
    for (i, m) in c.volume_mounts.iter().flatten().enumerate() {
        let field = at(&format!("volumeMounts[{i}]"));
        let v = volumes
            .get(m.name.as_str())
            .ok_or_else(|| err(field.clone(), format!("no volume {:?}", m.name)))?;
        let source = volume_source(v, &ns, objects).map_err(|reason| err(field.clone(), reason))?;
        mounts.push(Mount {
            path: m.mount_path.clone(),
            read_only: m.read_only == Some(true),
            volume: m.name.clone(),
            source,
        });
    }
    let capabilities = c
        .security_context
        .as_ref()
        .and_then(|s| s.capabilities.as_ref())
        .filter(|caps| caps.drop.iter().flatten().any(|d| d == "ALL"))
        .map(|caps| caps.add.clone().unwrap_or_default());
    Ok(ProcessSpec {
        argv,
        env,
        mounts,
        host_network: spec.host_network == Some(true),
        capabilities,
    })
}

/// The name and spec of pod `ordinal` of a StatefulSet, as its controller makes them: each
/// volume claim template becomes a volume of the claim `<template>-<set>-<ordinal>`.
pub fn stateful_set_pod(
    set: &k8s_openapi::api::apps::v1::StatefulSet,
    ordinal: u32,
) -> Option<(String, PodSpec)> {
    let name = set.metadata.name.clone()?;
    let spec = set.spec.as_ref()?;
    let mut pod = spec.template.spec.clone()?;
    let pod_name = format!("{name}-{ordinal}");
    for t in spec.volume_claim_templates.iter().flatten() {
        let tname = t.metadata.name.clone()?;
        pod.volumes.get_or_insert_with(Vec::new).push(Volume {
            name: tname.clone(),
            persistent_volume_claim: Some(
                k8s_openapi::api::core::v1::PersistentVolumeClaimVolumeSource {
                    claim_name: format!("{tname}-{pod_name}"),
                    read_only: None,
                },
            ),
            ..Default::default()
        });
    }
    Some((pod_name, pod))
}

/// What volume `v` holds.
fn volume_source(v: &Volume, ns: &str, objects: &Objects) -> Result<Source, String> {
    let key = |n: &str| (ns.to_owned(), n.to_owned());
    if let Some(e) = &v.empty_dir {
        return Ok(Source::EmptyDir {
            memory: e.medium.as_deref() == Some("Memory"),
        });
    }
    if let Some(h) = &v.host_path {
        return Ok(Source::HostPath(PathBuf::from(&h.path)));
    }
    if let Some(c) = &v.persistent_volume_claim {
        return Ok(Source::Claim(c.claim_name.clone()));
    }
    let mut files = BTreeMap::new();
    let mut tokens = BTreeMap::new();
    // Items of a Secret or ConfigMap: all keys, or only the listed ones at their paths.
    let mut add = |data: BTreeMap<String, Vec<u8>>,
                   items: &Option<Vec<k8s_openapi::api::core::v1::KeyToPath>>,
                   mode: u32,
                   what: &str|
     -> Result<(), String> {
        match items {
            None => {
                for (k, v) in data {
                    files.insert(k, (v, mode));
                }
            }
            Some(items) => {
                for it in items {
                    let content = data
                        .get(&it.key)
                        .ok_or_else(|| format!("key {:?} of {what} not found", it.key))?;
                    let m = it.mode.map_or(mode, |m| m as u32);
                    files.insert(it.path.clone(), (content.clone(), m));
                }
            }
        }
        Ok(())
    };
    let cm_bytes = |n: &str| {
        objects.config_maps.get(&key(n)).map(|d| {
            d.iter()
                .map(|(k, v)| (k.clone(), v.as_bytes().to_vec()))
                .collect::<BTreeMap<_, _>>()
        })
    };
    if let Some(s) = &v.secret {
        let name = s.secret_name.clone().unwrap_or_default();
        let mode = s.default_mode.map_or(0o644, |m| m as u32);
        match objects.secrets.get(&key(&name)) {
            Some(d) => add(d.clone(), &s.items, mode, &format!("secret \"{name}\""))?,
            None if s.optional == Some(true) => {}
            None => return Err(format!("secret \"{name}\" not found")),
        }
    } else if let Some(c) = &v.config_map {
        let mode = c.default_mode.map_or(0o644, |m| m as u32);
        match cm_bytes(&c.name) {
            Some(d) => add(d, &c.items, mode, &format!("configmap \"{}\"", c.name))?,
            None if c.optional == Some(true) => {}
            None => return Err(format!("configmap \"{}\" not found", c.name)),
        }
    } else if let Some(p) = &v.projected {
        let mode = p.default_mode.map_or(0o644, |m| m as u32);
        for src in p.sources.iter().flatten() {
            if let Some(t) = &src.service_account_token {
                tokens.insert(
                    t.path.clone(),
                    (
                        t.audience.clone().unwrap_or_default(),
                        t.expiration_seconds.unwrap_or(3600),
                        mode,
                    ),
                );
            }
            if let Some(c) = &src.config_map {
                match cm_bytes(&c.name) {
                    Some(d) => add(d, &c.items, mode, &format!("configmap \"{}\"", c.name))?,
                    None if c.optional == Some(true) => {}
                    None => return Err(format!("configmap \"{}\" not found", c.name)),
                }
            }
            if let Some(s) = &src.secret {
                match objects.secrets.get(&key(&s.name)) {
                    Some(d) => add(d.clone(), &s.items, mode, &format!("secret \"{}\"", s.name))?,
                    None if s.optional == Some(true) => {}
                    None => return Err(format!("secret \"{}\" not found", s.name)),
                }
            }
        }
    } else {
        return Err(format!(
            "volume {:?}: only emptyDir, hostPath, secret, configMap and projected are supported",
            v.name
        ));
    }
    Ok(Source::Files { files, tokens })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};

    #[test]
    fn variables_expand_as_kubernetes_expands_them() {
        let env = BTreeMap::from([
            ("A".to_owned(), "east".to_owned()),
            ("B".to_owned(), "1".to_owned()),
        ]);
        assert_eq!(expand("--cluster-name=$(A)", &env), "--cluster-name=east");
        assert_eq!(expand("$(A)-$(B)", &env), "east-1");
        assert_eq!(expand("$$(A)", &env), "$(A)", "escaped");
        assert_eq!(expand("$(NOPE)", &env), "$(NOPE)", "undefined: as written");
        assert_eq!(expand("$(A", &env), "$(A", "unterminated");
        assert_eq!(expand("cost: 5$ ü", &env), "cost: 5$ ü");
    }

    /// The manifests as shipped, rendered as users render them (`kubectl kustomize`).
    fn rendered() -> Vec<serde_json::Value> {
        let root =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/overlays/example");
        let out = std::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(&root)
            .output()
            .expect("run kubectl (needed to render deploy/, as `clustermesh install` does)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_yaml::Deserializer::from_slice(&out.stdout)
            .map(|d| serde_json::to_value(serde_yaml::Value::deserialize(d).unwrap()).unwrap())
            .collect()
    }

    use serde::Deserialize;

    fn stored(docs: &[serde_json::Value]) -> Objects {
        let mut o = Objects::default();
        for d in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
            let data: BTreeMap<String, String> =
                serde_json::from_value(d["data"].clone()).unwrap_or_default();
            o.config_maps.insert(
                (
                    d["metadata"]["namespace"].as_str().unwrap().to_owned(),
                    d["metadata"]["name"].as_str().unwrap().to_owned(),
                ),
                data,
            );
        }
        // The Secrets `clustermesh install` creates (contents do not matter here).
        for name in [
            "clustermesh-etcd-client",
            "clustermesh-apiserver-tls",
            "clustermesh-node-agent-issuer",
            "clustermesh-etcd-server",
        ] {
            o.secrets.insert(
                ("kube-system".into(), name.into()),
                BTreeMap::from([
                    ("tls.crt".to_owned(), b"c".to_vec()),
                    ("tls.key".to_owned(), b"k".to_vec()),
                    ("ca.crt".to_owned(), b"a".to_vec()),
                ]),
            );
        }
        o.config_maps.insert(
            ("kube-system".into(), "clustermesh-ca-bundle".into()),
            BTreeMap::from([("ca.crt".to_owned(), "CA".to_owned())]),
        );
        o
    }

    fn lab_binary(image: &str, program: &str) -> Option<PathBuf> {
        match (image.split([':', '@']).next()?, program) {
            (i, "clustermesh-apiserver" | "node-agent") if i.ends_with("clustermesh") => {
                Some(PathBuf::from(format!("/lab/bin/{program}")))
            }
            (i, "etcd") if i.ends_with("etcd") => Some(PathBuf::from("/usr/bin/etcd")),
            _ => None,
        }
    }

    fn facts(name: &str, node: &str) -> PodFacts {
        PodFacts {
            name: name.into(),
            namespace: "kube-system".into(),
            node: node.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_shipped_workloads_resolve_to_what_the_lab_would_run() {
        let docs = rendered();
        let objects = stored(&docs);
        let find = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap().clone();
        let agent: DaemonSet = serde_json::from_value(find("DaemonSet")).unwrap();
        let spec = agent.spec.unwrap().template.spec.unwrap();
        let p = resolve(
            &spec,
            &facts("agent-x", "east-node-1"),
            "agent",
            &objects,
            &lab_binary,
        )
        .unwrap();
        assert_eq!(p.argv[0], "/lab/bin/node-agent");
        for want in [
            "--cluster-name=east",
            "--cluster-id=1",
            "--node-name=east-node-1",
            "--apiserver=clustermesh-apiserver.kube-system.svc:4240",
        ] {
            assert!(p.argv.iter().any(|a| a == want), "{want} in {:?}", p.argv);
        }
        assert!(p.host_network);
        assert_eq!(
            p.capabilities,
            Some(vec!["BPF".into(), "NET_ADMIN".into(), "SYS_ADMIN".into()])
        );
        let enroll = p.mounts.iter().find(|m| m.volume == "enroll").unwrap();
        assert_eq!(enroll.path, "/var/run/secrets/clustermesh");
        match &enroll.source {
            Source::Files { files, tokens } => {
                assert_eq!(files.get("ca.crt"), Some(&(b"CA".to_vec(), 0o400)));
                assert_eq!(
                    tokens.get("token"),
                    Some(&("clustermesh".to_owned(), 3600, 0o400))
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(
            p.mounts
                .iter()
                .any(|m| m.source == Source::HostPath("/sys/fs/bpf".into())
                    && m.path == "/sys/fs/bpf")
        );

        let api: Deployment = serde_json::from_value(find("Deployment")).unwrap();
        let spec = api.spec.unwrap().template.spec.unwrap();
        let p = resolve(
            &spec,
            &facts("api-1", "n"),
            "apiserver",
            &objects,
            &lab_binary,
        )
        .unwrap();
        assert!(
            p.argv.iter().any(|a| a == "--replica=api-1"),
            "{:?}",
            p.argv
        );
        assert_eq!(p.env.get("CLUSTER_NAME").map(String::as_str), Some("east"));
        assert!(!p.host_network);

        let etcd: StatefulSet = serde_json::from_value(find("StatefulSet")).unwrap();
        let (pod, spec) = stateful_set_pod(&etcd, 0).unwrap();
        assert_eq!(pod, "clustermesh-etcd-0");
        let p = resolve(&spec, &facts(&pod, "n"), "etcd", &objects, &lab_binary).unwrap();
        assert_eq!(p.argv[0], "/usr/bin/etcd");
        assert!(p.mounts.iter().any(|m| m.path == "/var/lib/etcd"
            && m.source == Source::Claim("data-clustermesh-etcd-0".into())));
        assert!(p.argv.iter().any(|a| a
            == "--advertise-client-urls=https://clustermesh-etcd-0.clustermesh-etcd.kube-system.svc:2379"));
    }

    #[test]
    fn a_missing_object_refuses_the_container_naming_the_field() {
        let docs = rendered();
        let mut objects = stored(&docs);
        let api: Deployment = serde_json::from_value(
            docs.iter()
                .find(|d| d["kind"] == "Deployment")
                .unwrap()
                .clone(),
        )
        .unwrap();
        let spec = api.spec.unwrap().template.spec.unwrap();
        objects
            .secrets
            .remove(&("kube-system".into(), "clustermesh-apiserver-tls".into()));
        let e = resolve(&spec, &facts("a", "n"), "apiserver", &objects, &lab_binary).unwrap_err();
        assert!(
            e.field.starts_with("spec.containers[0].volumeMounts["),
            "{e}"
        );
        assert!(e.reason.contains("clustermesh-apiserver-tls"), "{e}");
        objects.config_maps.clear();
        let e = resolve(&spec, &facts("a", "n"), "apiserver", &objects, &lab_binary).unwrap_err();
        assert_eq!(e.field, "spec.containers[0].envFrom[0].configMapRef", "{e}");
        // An image the lab cannot run.
        let e = resolve(
            &spec,
            &facts("a", "n"),
            "apiserver",
            &stored(&docs),
            &|_, _| None,
        )
        .unwrap_err();
        assert_eq!(e.field, "spec.containers[0].command[0]");
    }
}
