//! Server-side printing (`Accept: application/json;as=Table;g=meta.k8s.io;v=v1`): the columns
//! kubectl shows for the kinds users list, as the apiserver's printers define them, and a
//! CRD's `additionalPrinterColumns`.

use serde_json::{Value, json};

use crate::registry::Resource;

/// `includeObject`: what each row carries besides its cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludeObject {
    /// Nothing.
    None,
    /// `PartialObjectMetadata` (the default).
    Metadata,
    /// The whole object (kubectl asks for it with `--sort-by` and `-o custom-columns`).
    Object,
}

/// `kubectl`'s age format: `45s`, `3m20s`, `5h`, `2d3h`.
pub fn age(created: Option<&str>) -> String {
    let Some(t) = created.and_then(|c| {
        time::OffsetDateTime::parse(c, &time::format_description::well_known::Rfc3339).ok()
    }) else {
        return "<unknown>".into();
    };
    let secs = (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    human_duration(secs)
}

fn human_duration(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 600 => format!("{}m{}s", s / 60, s % 60),
        s if s < 10_800 => format!("{}m", s / 60),
        s if s < 28_800 => format!("{}h{}m", s / 3600, (s % 3600) / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s if s < 2_592_000 => format!("{}d{}h", s / 86400, (s % 86400) / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// How a row's cells are computed.
type Cells = Box<dyn Fn(&Value) -> Vec<Value>>;

struct Column {
    name: &'static str,
    ty: &'static str,
    priority: u8,
    description: &'static str,
}

const fn col(name: &'static str, priority: u8, description: &'static str) -> Column {
    Column {
        name,
        ty: "string",
        priority,
        description,
    }
}

const fn int_col(name: &'static str, priority: u8, description: &'static str) -> Column {
    Column {
        name,
        ty: "integer",
        priority,
        description,
    }
}

fn s<'a>(o: &'a Value, pointer: &str) -> &'a str {
    o.pointer(pointer).and_then(Value::as_str).unwrap_or("")
}

fn i(o: &Value, pointer: &str) -> i64 {
    o.pointer(pointer).and_then(Value::as_i64).unwrap_or(0)
}

fn arr<'a>(o: &'a Value, pointer: &str) -> &'a [Value] {
    o.pointer(pointer)
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[])
}

fn none_if_empty(v: String) -> String {
    if v.is_empty() { "<none>".into() } else { v }
}

fn selector_text(sel: Option<&Value>) -> String {
    let Some(m) = sel.and_then(Value::as_object) else {
        return "<none>".into();
    };
    let parts: Vec<String> = m
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    none_if_empty(parts.join(","))
}

fn label_selector_text(sel: Option<&Value>) -> String {
    let Some(sel) = sel else {
        return "<none>".into();
    };
    let mut parts: Vec<String> = sel
        .get("matchLabels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default();
    for e in sel
        .get("matchExpressions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let key = s(e, "/key");
        let values: Vec<&str> = arr(e, "/values").iter().filter_map(Value::as_str).collect();
        parts.push(match s(e, "/operator") {
            "In" => format!("{key} in ({})", values.join(",")),
            "NotIn" => format!("{key} notin ({})", values.join(",")),
            "Exists" => key.to_owned(),
            "DoesNotExist" => format!("!{key}"),
            _ => key.to_owned(),
        });
    }
    none_if_empty(parts.join(","))
}

fn service_ports(o: &Value) -> String {
    let parts: Vec<String> = arr(o, "/spec/ports")
        .iter()
        .map(|p| {
            let port = i(p, "/port");
            let proto = match s(p, "/protocol") {
                "" => "TCP",
                x => x,
            };
            match p.get("nodePort").and_then(Value::as_i64) {
                Some(np) if np > 0 => format!("{port}:{np}/{proto}"),
                _ => format!("{port}/{proto}"),
            }
        })
        .collect();
    none_if_empty(parts.join(","))
}

fn external_ip(o: &Value) -> String {
    let mut ips: Vec<String> = arr(o, "/spec/externalIPs")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    match s(o, "/spec/type") {
        "ExternalName" => return s(o, "/spec/externalName").to_owned(),
        "LoadBalancer" => {
            for ing in arr(o, "/status/loadBalancer/ingress") {
                let v = if s(ing, "/ip").is_empty() {
                    s(ing, "/hostname")
                } else {
                    s(ing, "/ip")
                };
                if !v.is_empty() {
                    ips.push(v.to_owned());
                }
            }
            if ips.is_empty() {
                return "<pending>".into();
            }
        }
        _ => {}
    }
    none_if_empty(ips.join(","))
}

fn pod_cells(o: &Value) -> Vec<Value> {
    let statuses = arr(o, "/status/containerStatuses");
    let total = arr(o, "/spec/containers").len();
    let ready = statuses
        .iter()
        .filter(|c| c.get("ready") == Some(&json!(true)))
        .count();
    let restarts: i64 = statuses.iter().map(|c| i(c, "/restartCount")).sum();
    let mut status = match s(o, "/status/reason") {
        "" => s(o, "/status/phase").to_owned(),
        r => r.to_owned(),
    };
    for c in statuses {
        if let Some(r) = c.pointer("/state/waiting/reason").and_then(Value::as_str) {
            status = r.to_owned();
        } else if let Some(r) = c
            .pointer("/state/terminated/reason")
            .and_then(Value::as_str)
        {
            status = r.to_owned();
        }
    }
    if o.pointer("/metadata/deletionTimestamp").is_some() {
        status = "Terminating".into();
    }
    let gates: Vec<&str> = arr(o, "/spec/readinessGates")
        .iter()
        .map(|g| s(g, "/conditionType"))
        .collect();
    let gates_cell = if gates.is_empty() {
        "<none>".to_owned()
    } else {
        let ok = gates
            .iter()
            .filter(|g| {
                arr(o, "/status/conditions")
                    .iter()
                    .any(|c| s(c, "/type") == **g && s(c, "/status") == "True")
            })
            .count();
        format!("{ok}/{}", gates.len())
    };
    vec![
        json!(format!("{ready}/{total}")),
        json!(status),
        json!(restarts),
        json!(age(o
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str))),
        json!(none_if_empty(s(o, "/status/podIP").to_owned())),
        json!(none_if_empty(s(o, "/spec/nodeName").to_owned())),
        json!(none_if_empty(s(o, "/status/nominatedNodeName").to_owned())),
        json!(gates_cell),
    ]
}

fn node_cells(o: &Value) -> Vec<Value> {
    let ready = arr(o, "/status/conditions")
        .iter()
        .find(|c| s(c, "/type") == "Ready");
    let mut status = match ready.map(|c| s(c, "/status")) {
        Some("True") => "Ready".to_owned(),
        _ => "NotReady".to_owned(),
    };
    if o.pointer("/spec/unschedulable") == Some(&json!(true)) {
        status.push_str(",SchedulingDisabled");
    }
    let roles: Vec<String> = o
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.keys()
                .filter_map(|k| k.strip_prefix("node-role.kubernetes.io/"))
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default();
    let addr = |ty: &str| {
        arr(o, "/status/addresses")
            .iter()
            .find(|a| s(a, "/type") == ty)
            .map(|a| s(a, "/address").to_owned())
            .unwrap_or_else(|| "<none>".into())
    };
    vec![
        json!(status),
        json!(none_if_empty(roles.join(","))),
        json!(age(o
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str))),
        json!(s(o, "/status/nodeInfo/kubeletVersion")),
        json!(addr("InternalIP")),
        json!(addr("ExternalIP")),
        json!(none_if_empty(s(o, "/status/nodeInfo/osImage").to_owned())),
        json!(none_if_empty(
            s(o, "/status/nodeInfo/kernelVersion").to_owned()
        )),
        json!(none_if_empty(
            s(o, "/status/nodeInfo/containerRuntimeVersion").to_owned()
        )),
    ]
}

fn containers_images(o: &Value, pointer: &str) -> (String, String) {
    let cs = arr(o, pointer);
    let names: Vec<&str> = cs.iter().map(|c| s(c, "/name")).collect();
    let images: Vec<&str> = cs.iter().map(|c| s(c, "/image")).collect();
    (names.join(","), images.join(","))
}

/// Evaluates the simple JSONPath of a printer column (`.spec.replicas`, `.status.x[0].y`).
fn json_path(o: &Value, path: &str) -> Value {
    let mut cur = o;
    let path = path.trim().trim_start_matches('{').trim_end_matches('}');
    for part in path
        .trim_start_matches('.')
        .split('.')
        .filter(|p| !p.is_empty())
    {
        let (name, index) = match part.split_once('[') {
            Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (part, None),
        };
        cur = match cur.get(name) {
            Some(v) => v,
            None => return Value::Null,
        };
        if let Some(ix) = index {
            cur = match cur.get(ix) {
                Some(v) => v,
                None => return Value::Null,
            };
        }
    }
    cur.clone()
}

fn crd_columns(crd: &Value, version: &str) -> Vec<(String, String, String, u8, String)> {
    arr(crd, "/spec/versions")
        .iter()
        .find(|v| s(v, "/name") == version)
        .map(|v| {
            arr(v, "/additionalPrinterColumns")
                .iter()
                .map(|c| {
                    (
                        s(c, "/name").to_owned(),
                        match s(c, "/type") {
                            "" => "string".to_owned(),
                            t => t.to_owned(),
                        },
                        s(c, "/jsonPath").to_owned(),
                        u8::try_from(i(c, "/priority")).unwrap_or(0),
                        s(c, "/description").to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The Table of `items` of `res` (`crd`: its definition, for custom resources).
pub fn table(
    res: &Resource,
    crd: &Option<std::sync::Arc<Value>>,
    items: &[Value],
    include: IncludeObject,
) -> Value {
    let name_col = Column {
        name: "Name",
        ty: "string",
        priority: 0,
        description: "Name must be unique within a namespace.",
    };
    let age_col = col(
        "Age",
        0,
        "CreationTimestamp is a timestamp representing the server time when this object was created.",
    );
    let ag = |o: &Value| {
        json!(age(o
            .pointer("/metadata/creationTimestamp")
            .and_then(Value::as_str)))
    };
    let (mut cols, cells): (Vec<Column>, Cells) = match (res.gvr.group.as_str(), res.kind.as_str())
    {
        ("", "Service") => (
            vec![
                col("Type", 0, "The type of the service."),
                col("Cluster-IP", 0, "The IP address of the service."),
                col("External-IP", 0, "The external IP address of the service."),
                col("Port(s)", 0, "The ports of the service."),
                age_col,
                col("Selector", 1, "The label selector of the service."),
            ],
            Box::new(move |o| {
                vec![
                    json!(s(o, "/spec/type")),
                    json!(none_if_empty(s(o, "/spec/clusterIP").to_owned())),
                    json!(external_ip(o)),
                    json!(service_ports(o)),
                    ag(o),
                    json!(selector_text(o.pointer("/spec/selector"))),
                ]
            }),
        ),
        ("", "Pod") => (
            vec![
                col(
                    "Ready",
                    0,
                    "The aggregate readiness state of this pod for accepting traffic.",
                ),
                col(
                    "Status",
                    0,
                    "The aggregate status of the containers in this pod.",
                ),
                int_col(
                    "Restarts",
                    0,
                    "The number of times the containers in this pod have been restarted.",
                ),
                age_col,
                col("IP", 1, "The IP address assigned to the pod."),
                col(
                    "Node",
                    1,
                    "The name of the node to which the pod is scheduled.",
                ),
                col(
                    "Nominated Node",
                    1,
                    "The name of the node that the pod is nominated to run on.",
                ),
                col("Readiness Gates", 1, "The readiness gates of the pod."),
            ],
            Box::new(pod_cells),
        ),
        ("", "Node") => (
            vec![
                col("Status", 0, "The status of the node."),
                col("Roles", 0, "The roles of the node."),
                age_col,
                col("Version", 0, "Kubelet Version reported by the node."),
                col("Internal-IP", 1, "List of internal IPs."),
                col("External-IP", 1, "List of external IPs."),
                col("OS-Image", 1, "OS Image reported by the node."),
                col("Kernel-Version", 1, "Kernel Version reported by the node."),
                col(
                    "Container-Runtime",
                    1,
                    "Container Runtime Version reported by the node.",
                ),
            ],
            Box::new(node_cells),
        ),
        ("", "Namespace") => (
            vec![col("Status", 0, "The status of the namespace."), age_col],
            Box::new(move |o| vec![json!(s(o, "/status/phase")), ag(o)]),
        ),
        ("", "ConfigMap") => (
            vec![int_col("Data", 0, "Number of data entries."), age_col],
            Box::new(move |o| {
                let n = o
                    .get("data")
                    .and_then(Value::as_object)
                    .map_or(0, |m| m.len())
                    + o.get("binaryData")
                        .and_then(Value::as_object)
                        .map_or(0, |m| m.len());
                vec![json!(n), ag(o)]
            }),
        ),
        ("", "Secret") => (
            vec![
                col("Type", 0, "The type of the secret."),
                int_col("Data", 0, "Number of data entries."),
                age_col,
            ],
            Box::new(move |o| {
                vec![
                    json!(s(o, "/type")),
                    json!(
                        o.get("data")
                            .and_then(Value::as_object)
                            .map_or(0, |m| m.len())
                    ),
                    ag(o),
                ]
            }),
        ),
        ("", "ServiceAccount") => (
            vec![int_col("Secrets", 0, "Number of secrets."), age_col],
            Box::new(move |o| vec![json!(arr(o, "/secrets").len()), ag(o)]),
        ),
        ("", "Endpoints") => (
            vec![col("Endpoints", 0, "Endpoints of the service."), age_col],
            Box::new(move |o| {
                let mut eps = Vec::new();
                for sub in arr(o, "/subsets") {
                    for a in arr(sub, "/addresses") {
                        for p in arr(sub, "/ports") {
                            eps.push(format!("{}:{}", s(a, "/ip"), i(p, "/port")));
                        }
                    }
                }
                vec![json!(none_if_empty(eps.join(","))), ag(o)]
            }),
        ),
        ("discovery.k8s.io", "EndpointSlice") => (
            vec![
                col("AddressType", 0, "The IP protocol for this slice."),
                col("Ports", 0, "The ports of this slice."),
                col("Endpoints", 0, "The endpoints of this slice."),
                age_col,
            ],
            Box::new(move |o| {
                let ports: Vec<String> = arr(o, "/ports")
                    .iter()
                    .map(|p| i(p, "/port").to_string())
                    .collect();
                let addrs: Vec<String> = arr(o, "/endpoints")
                    .iter()
                    .flat_map(|e| {
                        arr(e, "/addresses")
                            .iter()
                            .filter_map(|a| a.as_str().map(str::to_owned))
                    })
                    .collect();
                let shown = if addrs.len() > 3 {
                    format!("{} + {} more...", addrs[..3].join(","), addrs.len() - 3)
                } else {
                    addrs.join(",")
                };
                vec![
                    json!(s(o, "/addressType")),
                    json!(if ports.is_empty() {
                        "<unset>".to_owned()
                    } else {
                        ports.join(",")
                    }),
                    json!(if shown.is_empty() {
                        "<unset>".to_owned()
                    } else {
                        shown
                    }),
                    ag(o),
                ]
            }),
        ),
        ("coordination.k8s.io", "Lease") => (
            vec![col("Holder", 0, "The holder of the lease."), age_col],
            Box::new(move |o| vec![json!(s(o, "/spec/holderIdentity")), ag(o)]),
        ),
        ("apps", "Deployment") => (
            vec![
                col("Ready", 0, "Number of the pod with ready state."),
                int_col(
                    "Up-to-date",
                    0,
                    "Total number of non-terminated pods targeted by this deployment that have the desired template spec.",
                ),
                int_col(
                    "Available",
                    0,
                    "Total number of available pods (ready for at least minReadySeconds) targeted by this deployment.",
                ),
                age_col,
                col("Containers", 1, "Names of each container in the template."),
                col(
                    "Images",
                    1,
                    "Images referenced by each container in the template.",
                ),
                col("Selector", 1, "Label selector for pods."),
            ],
            Box::new(move |o| {
                let (c, im) = containers_images(o, "/spec/template/spec/containers");
                vec![
                    json!(format!(
                        "{}/{}",
                        i(o, "/status/readyReplicas"),
                        i(o, "/spec/replicas")
                    )),
                    json!(i(o, "/status/updatedReplicas")),
                    json!(i(o, "/status/availableReplicas")),
                    ag(o),
                    json!(c),
                    json!(im),
                    json!(label_selector_text(o.pointer("/spec/selector"))),
                ]
            }),
        ),
        ("apps", "DaemonSet") => (
            vec![
                int_col("Desired", 0, "The desired number of pods."),
                int_col("Current", 0, "The current number of pods."),
                int_col("Ready", 0, "The number of pods ready."),
                int_col("Up-to-date", 0, "The number of pods updated."),
                int_col("Available", 0, "The number of pods available."),
                col("Node Selector", 0, "Which nodes the pods run on."),
                age_col,
                col("Containers", 1, "Names of each container in the template."),
                col(
                    "Images",
                    1,
                    "Images referenced by each container in the template.",
                ),
                col("Selector", 1, "Label selector for pods."),
            ],
            Box::new(move |o| {
                let (c, im) = containers_images(o, "/spec/template/spec/containers");
                vec![
                    json!(i(o, "/status/desiredNumberScheduled")),
                    json!(i(o, "/status/currentNumberScheduled")),
                    json!(i(o, "/status/numberReady")),
                    json!(i(o, "/status/updatedNumberScheduled")),
                    json!(i(o, "/status/numberAvailable")),
                    json!(selector_text(o.pointer("/spec/template/spec/nodeSelector"))),
                    ag(o),
                    json!(c),
                    json!(im),
                    json!(label_selector_text(o.pointer("/spec/selector"))),
                ]
            }),
        ),
        ("apps", "StatefulSet") => (
            vec![
                col("Ready", 0, "Number of the pod with ready state."),
                age_col,
                col("Containers", 1, "Names of each container in the template."),
                col(
                    "Images",
                    1,
                    "Images referenced by each container in the template.",
                ),
            ],
            Box::new(move |o| {
                let (c, im) = containers_images(o, "/spec/template/spec/containers");
                vec![
                    json!(format!(
                        "{}/{}",
                        i(o, "/status/readyReplicas"),
                        i(o, "/spec/replicas")
                    )),
                    ag(o),
                    json!(c),
                    json!(im),
                ]
            }),
        ),
        ("apps", "ReplicaSet") => (
            vec![
                int_col("Desired", 0, "Number of desired pods."),
                int_col("Current", 0, "Number of actually running pods."),
                int_col("Ready", 0, "Number of ready pods."),
                age_col,
            ],
            Box::new(move |o| {
                vec![
                    json!(i(o, "/spec/replicas")),
                    json!(i(o, "/status/replicas")),
                    json!(i(o, "/status/readyReplicas")),
                    ag(o),
                ]
            }),
        ),
        ("batch", "Job") => (
            vec![
                col("Status", 0, "Status of the job."),
                col("Completions", 0, "The completed and desired completions."),
                col("Duration", 0, "Time required to complete the job."),
                age_col,
            ],
            Box::new(move |o| {
                let status = if arr(o, "/status/conditions")
                    .iter()
                    .any(|c| s(c, "/type") == "Complete" && s(c, "/status") == "True")
                {
                    "Complete"
                } else if arr(o, "/status/conditions")
                    .iter()
                    .any(|c| s(c, "/type") == "Failed" && s(c, "/status") == "True")
                {
                    "Failed"
                } else {
                    "Running"
                };
                vec![
                    json!(status),
                    json!(format!(
                        "{}/{}",
                        i(o, "/status/succeeded"),
                        i(o, "/spec/completions")
                    )),
                    json!(""),
                    ag(o),
                ]
            }),
        ),
        ("batch", "CronJob") => (
            vec![
                col("Schedule", 0, "The schedule of the cron job."),
                col("Timezone", 0, "The timezone of the cron job."),
                col("Suspend", 0, "Whether the cron job is suspended."),
                int_col("Active", 0, "The number of active jobs."),
                col("Last Schedule", 0, "When the job was last scheduled."),
                age_col,
            ],
            Box::new(move |o| {
                vec![
                    json!(s(o, "/spec/schedule")),
                    json!(none_if_empty(s(o, "/spec/timeZone").to_owned())),
                    json!(
                        o.pointer("/spec/suspend")
                            .and_then(Value::as_bool)
                            .unwrap_or(false)
                            .to_string()
                            .replace("false", "False")
                            .replace("true", "True")
                    ),
                    json!(arr(o, "/status/active").len()),
                    json!(
                        o.pointer("/status/lastScheduleTime")
                            .and_then(Value::as_str)
                            .map_or("<none>".to_owned(), |t| age(Some(t)))
                    ),
                    ag(o),
                ]
            }),
        ),
        ("policy", "PodDisruptionBudget") => (
            vec![
                col(
                    "Min Available",
                    0,
                    "The minimum number of pods that must be available.",
                ),
                col(
                    "Max Unavailable",
                    0,
                    "The maximum number of pods that may be unavailable.",
                ),
                int_col(
                    "Allowed Disruptions",
                    0,
                    "Calculated number of pods that may be disrupted at this time.",
                ),
                age_col,
            ],
            Box::new(move |o| {
                let show = |p: &str| match o.pointer(p) {
                    Some(Value::String(v)) => v.clone(),
                    Some(Value::Number(n)) => n.to_string(),
                    _ => "N/A".into(),
                };
                vec![
                    json!(show("/spec/minAvailable")),
                    json!(show("/spec/maxUnavailable")),
                    json!(i(o, "/status/disruptionsAllowed")),
                    ag(o),
                ]
            }),
        ),
        ("networking.k8s.io", "NetworkPolicy") => (
            vec![
                col("Pod-Selector", 0, "The pod selector of the network policy."),
                age_col,
            ],
            Box::new(move |o| {
                vec![
                    json!(
                        match label_selector_text(o.pointer("/spec/podSelector")).as_str() {
                            "<none>" => "<none>".to_owned(),
                            t => t.to_owned(),
                        }
                    ),
                    ag(o),
                ]
            }),
        ),
        ("rbac.authorization.k8s.io", "Role" | "ClusterRole") => (
            vec![col("Created At", 0, "The time the role was created.")],
            Box::new(|o| vec![json!(s(o, "/metadata/creationTimestamp"))]),
        ),
        ("rbac.authorization.k8s.io", "RoleBinding" | "ClusterRoleBinding") => (
            vec![
                col("Role", 0, "The role of the binding."),
                age_col,
                col("Users", 1, "Users in the binding."),
                col("Groups", 1, "Groups in the binding."),
                col("ServiceAccounts", 1, "ServiceAccounts in the binding."),
            ],
            Box::new(move |o| {
                let of = |k: &str| {
                    arr(o, "/subjects")
                        .iter()
                        .filter(|x| s(x, "/kind") == k)
                        .map(|x| {
                            if k == "ServiceAccount" {
                                format!("{}/{}", s(x, "/namespace"), s(x, "/name"))
                            } else {
                                s(x, "/name").to_owned()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                vec![
                    json!(format!(
                        "{}/{}",
                        s(o, "/roleRef/kind"),
                        s(o, "/roleRef/name")
                    )),
                    ag(o),
                    json!(of("User")),
                    json!(of("Group")),
                    json!(of("ServiceAccount")),
                ]
            }),
        ),
        ("apiextensions.k8s.io", "CustomResourceDefinition") => (
            vec![col("Created At", 0, "The time the CRD was created.")],
            Box::new(|o| vec![json!(s(o, "/metadata/creationTimestamp"))]),
        ),
        ("", "Event") | ("events.k8s.io", "Event") => (
            vec![
                col("Last Seen", 0, "Time since the event was last seen."),
                col("Type", 0, "Type of the event."),
                col("Reason", 0, "Why the event happened."),
                col("Object", 0, "The object the event is about."),
                col("Message", 0, "The event's message."),
            ],
            Box::new(|o| {
                let last = [
                    "/lastTimestamp",
                    "/eventTime",
                    "/metadata/creationTimestamp",
                ]
                .iter()
                .find_map(|p| o.pointer(p).and_then(Value::as_str))
                .map(|t| age(Some(t)))
                .unwrap_or_else(|| "<unknown>".into());
                let obj = o
                    .get("involvedObject")
                    .or_else(|| o.get("regarding"))
                    .cloned()
                    .unwrap_or(Value::Null);
                vec![
                    json!(last),
                    json!(s(o, "/type")),
                    json!(s(o, "/reason")),
                    json!(format!(
                        "{}/{}",
                        s(&obj, "/kind").to_lowercase(),
                        s(&obj, "/name")
                    )),
                    json!(match s(o, "/message") {
                        "" => s(o, "/note"),
                        m => m,
                    }),
                ]
            }),
        ),
        _ => {
            let custom = crd
                .as_ref()
                .map(|c| crd_columns(c, &res.gvr.version))
                .unwrap_or_default();
            if custom.is_empty() {
                (vec![age_col], Box::new(move |o| vec![ag(o)]))
            } else {
                let custom2 = custom.clone();
                let defs: Vec<Value> = std::iter::once(json!({"name": "Name", "type": "string", "format": "name", "description": name_col.description, "priority": 0}))
                        .chain(custom.iter().map(|(n, t, _, p, d)| json!({"name": n, "type": t, "format": "", "description": d, "priority": p})))
                        .collect();
                return finish(defs, items, include, move |o| {
                    custom2
                        .iter()
                        .map(|(_, t, path, _, _)| {
                            let v = json_path(o, path);
                            if t == "date" {
                                v.as_str().map_or(Value::Null, |d| json!(age(Some(d))))
                            } else {
                                v
                            }
                        })
                        .collect()
                });
            }
        }
    };
    cols.insert(0, name_col);
    let defs: Vec<Value> = cols
        .iter()
        .map(|c| {
            json!({"name": c.name, "type": c.ty, "format": if c.name == "Name" { "name" } else { "" }, "description": c.description, "priority": c.priority})
        })
        .collect();
    finish(defs, items, include, cells)
}

fn finish(
    defs: Vec<Value>,
    items: &[Value],
    include: IncludeObject,
    cells: impl Fn(&Value) -> Vec<Value>,
) -> Value {
    let rows: Vec<Value> = items
        .iter()
        .map(|o| {
            let mut c = vec![o.pointer("/metadata/name").cloned().unwrap_or(Value::Null)];
            c.extend(cells(o));
            let mut row = json!({"cells": c});
            match include {
                IncludeObject::None => {}
                IncludeObject::Metadata => {
                    row["object"] = json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o.get("metadata").cloned().unwrap_or(Value::Null)});
                }
                IncludeObject::Object => row["object"] = o.clone(),
            }
            row
        })
        .collect();
    json!({
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {},
        "columnDefinitions": defs,
        "rows": rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{Gvr, Registry};

    #[test]
    fn services_print_type_ip_and_ports() {
        let res = Registry::default()
            .get(&Gvr {
                group: String::new(),
                version: "v1".into(),
                resource: "services".into(),
            })
            .cloned()
            .expect("services");
        let svc = json!({"metadata": {"name": "web"}, "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.5", "ports": [{"port": 80, "protocol": "TCP"}, {"port": 53, "protocol": "UDP"}]}});
        let t = table(&res, &None, &[svc], IncludeObject::Metadata);
        let names: Vec<&str> = t["columnDefinitions"]
            .as_array()
            .expect("columns")
            .iter()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(
            names,
            [
                "Name",
                "Type",
                "Cluster-IP",
                "External-IP",
                "Port(s)",
                "Age",
                "Selector"
            ]
        );
        assert_eq!(t["rows"][0]["cells"][4], "80/TCP,53/UDP");
        assert_eq!(t["rows"][0]["cells"][3], "<none>");
    }

    #[test]
    fn ages_read_like_kubectl() {
        assert_eq!(human_duration(45), "45s");
        assert_eq!(human_duration(200), "3m20s");
        assert_eq!(human_duration(4000), "66m");
        assert_eq!(human_duration(90_000), "25h");
        assert_eq!(human_duration(200_000), "2d7h");
    }

    #[test]
    fn printer_column_paths() {
        let o = json!({"spec": {"a": [{"b": 3}]}});
        assert_eq!(json_path(&o, ".spec.a[0].b"), json!(3));
        assert_eq!(json_path(&o, ".spec.missing"), Value::Null);
    }
}
