//! The map layouts of `bpf/sock_lb.c`, as fixed-size byte arrays (no unsafe `Pod` impls):
//! every key and value is encoded and decoded here, and nowhere else.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Services map capacity by default (`MAX_SERVICES` in C; the agent's `--max-services` sizes
/// the maps at load time).
pub const MAX_SERVICES: usize = 65_536;
/// Backends map capacity (`MAX_BACKENDS`).
pub const MAX_BACKENDS: usize = 262_144;
/// Backends per tier of one service (`MAX_TIER_SLOTS`).
pub const MAX_TIER_SLOTS: usize = 256;
/// A tier of at most this many backends keeps its slots in the service's value
/// (`INLINE_SLOTS`); a bigger one in `CM_SLOTS`.
pub const INLINE_SLOTS: usize = 8;

/// Whether a tier of `count` backends keeps its slots in the service's value.
pub fn tier_inline(count: u16) -> bool {
    usize::from(count) <= INLINE_SLOTS
}

/// `CM_SLOTS` entries a tier of `count` backends takes.
pub fn map_slots(count: u16) -> usize {
    if tier_inline(count) {
        0
    } else {
        usize::from(count)
    }
}
/// Slots map capacity (`MAX_SLOTS`).
pub const MAX_SLOTS: usize = MAX_BACKENDS * 2;
/// IP cache capacity (`CM_IPCACHE` max_entries).
pub const MAX_IPCACHE: usize = 524_288;
/// Tiers per service.
pub const TIERS: usize = 2;

/// Map names.
pub const SERVICES: &str = "CM_SERVICES";
/// Backends map.
pub const BACKENDS: &str = "CM_BACKENDS";
/// Slots map.
pub const SLOTS: &str = "CM_SLOTS";
/// Reverse translation map.
pub const REVNAT: &str = "CM_REVNAT";
/// IP cache map.
pub const IPCACHE: &str = "CM_IPCACHE";
/// Per-socket translation state (socket storage).
pub const SOCKS: &str = "CM_SOCKS";
/// The agent's settings for the programs.
pub const CONFIG: &str = "CM_CONFIG";
/// Per-CPU counters of the programs.
pub const STATS: &str = "CM_STATS";
/// Health events (ring buffer).
pub const HEALTH_EVENTS: &str = "CM_HEALTH_EVENTS";
/// Cluster groups of weighted tiers.
pub const GROUPS: &str = "CM_GROUPS";
/// Backend address → ID (for sock_ops).
pub const BACKEND_IDS: &str = "CM_BACKEND_IDS";
/// Local endpoints: cgroup ID → identity and enforced directions.
pub const ENDPOINTS: &str = "CM_ENDPOINTS";
/// Policy entries: (local, peer, direction, protocol) → port set ID.
pub const POLICY: &str = "CM_POLICY";
/// Port sets of the policy entries (deduplicated).
pub const POLICY_SETS: &str = "CM_POLICY_SETS";
/// The IP cache's host entries by exact address (what the programs look up).
pub const IPCACHE_HOSTS: &str = "CM_IPCACHE_HOSTS";
/// Policy verdict counters per direction and peer cluster.
pub const POLICY_STATS: &str = "CM_POLICY_STATS";
/// Unconnected UDP flows of endpoints with ingress policy (their replies pass).
pub const UDP_FLOWS: &str = "CM_UDP_FLOWS";
/// Flow events (ring buffer).
pub const FLOWS: &str = "CM_FLOWS";
/// The generation of the policy entries, port sets and IP cache (`[0]`, changed atomically
/// through a mapping) and the verdict cache's hash seed (`[1]`).
pub const POLICY_GEN: &str = "CM_POLICY_GEN";
/// The verdict cache: (local identity, direction, protocol, peer address, port) → the verdict,
/// its rule and the peer's identity, with the generation they were looked up at (a 2-way
/// set-associative array of 64-byte slots the programs write in place under a seqlock).
pub const VERDICTS: &str = "CM_VERDICTS";
/// connect() → sock_ops handoff: the cookies of sockets translated to a backend with one
/// frontend, for `cm_sockops` to mark at `TCP_CONNECT_CB`.
pub const HANDOFF: &str = "CM_HANDOFF";
/// UDP (socket, peer, direction) pairs already reported as flows.
pub const FLOW_SEEN: &str = "CM_FLOW_SEEN";
/// Groups of one weighted tier at most (`MAX_GROUPS`): 8 weighted clusters and the rest.
pub const MAX_GROUPS: usize = 9;
/// Groups a weighted tier keeps in its service's value, where tier 1's slots would be
/// (`INLINE_GROUPS`): three weighted clusters and the rest.
pub const INLINE_GROUPS: usize = 4;

/// Whether a weighted service's `groups` live in its value ([`SVC_GROUPS_INLINE`]): few
/// enough, and no second tier (weights replace affinity, so a weighted service has none).
pub fn groups_fit_inline(groups: usize, tier1: usize) -> bool {
    groups <= INLINE_GROUPS && tier1 == 0
}
/// Every map the object pins, in the order they are removed.
pub const ALL: [&str; 22] = [
    HANDOFF,
    VERDICTS,
    POLICY_GEN,
    FLOWS,
    FLOW_SEEN,
    ENDPOINTS,
    POLICY,
    POLICY_SETS,
    IPCACHE_HOSTS,
    POLICY_STATS,
    UDP_FLOWS,
    SERVICES,
    GROUPS,
    BACKEND_IDS,
    BACKENDS,
    SLOTS,
    REVNAT,
    IPCACHE,
    SOCKS,
    CONFIG,
    STATS,
    HEALTH_EVENTS,
];

/// How many entries the sized maps hold: services, and from it backends (4 per service) and
/// slots (8 per service), as the defaults in C.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sizes {
    /// `CM_SERVICES`; the other sized maps follow from it.
    pub services: u32,
}

impl Default for Sizes {
    fn default() -> Self {
        Self {
            services: MAX_SERVICES as u32,
        }
    }
}

impl Sizes {
    /// Services supported at most (`--max-services`).
    pub const MAX: u32 = 1 << 20;

    /// Backends at most (`CM_BACKENDS` holds one entry more: ID 0 is never a backend).
    pub fn backends(&self) -> u32 {
        self.services.saturating_mul(4)
    }

    /// `CM_BACKENDS` entries: the backends and a quarter more, so that the IDs of removed
    /// backends can rest ([`crate::ids::GRACE`]) while new ones are programmed, and ID 0.
    pub fn backend_entries(&self) -> u32 {
        let b = self.backends();
        b.saturating_add(b / 4).saturating_add(1)
    }

    /// Weighted services at most: one in 4, at least 64, at most 49,152 (a group index is 16
    /// bits wide, and [`Sizes::group_entries`] adds a quarter).
    pub fn weighted(&self) -> u32 {
        (self.services / 4).clamp(64, 49_152)
    }

    /// `CM_GROUPS` entries (64 bytes each): the weighted services and a quarter more, for
    /// the indices resting after their service was removed or unweighted, and index 0 (none).
    pub fn group_entries(&self) -> u32 {
        let w = self.weighted();
        w + w / 4 + 1
    }

    /// `CM_SLOTS` entries.
    pub fn slots(&self) -> u32 {
        self.services.saturating_mul(8)
    }

    /// Every sized map with its entries.
    pub fn maps(&self) -> [(&'static str, u32); 5] {
        [
            (SERVICES, self.services),
            (GROUPS, self.group_entries()),
            (BACKENDS, self.backend_entries()),
            (BACKEND_IDS, self.backends()),
            (SLOTS, self.slots()),
        ]
    }
}

/// Key and value sizes of every pinned map with a fixed layout: an agent refuses to reuse a
/// pinned map of another layout (an upgrade that changed it) instead of misreading it.
pub const LAYOUT: [(&str, u32, u32); 19] = [
    (HANDOFF, 4, 16),
    (VERDICTS, 4, 64),
    (POLICY_GEN, 4, 8),
    (FLOW_SEEN, 32, 1),
    (ENDPOINTS, 8, 8),
    (POLICY, 12, 4),
    (POLICY_SETS, 4, PORT_SET_LEN as u32),
    (IPCACHE_HOSTS, 16, 8),
    (UDP_FLOWS, 32, 1),
    (SERVICES, 20, SVC_VAL_LEN as u32),
    (BACKEND_IDS, 24, 32),
    (GROUPS, 4, 64),
    (BACKENDS, 4, 32),
    (SLOTS, 8, 4),
    (REVNAT, 32, 20),
    (IPCACHE, 20, 8),
    (SOCKS, 4, 56),
    (CONFIG, 4, 16),
    (STATS, 4, 8),
];

/// `CM_STATS` indices (`STAT_*` in C), with the metric label of each.
pub const STAT_NAMES: [&str; 6] = [
    "suspects_marked",
    "suspects_cleared_by_traffic",
    "health_events_lost",
    "connects_to_suspect",
    "connects_without_backend",
    "flow_events_lost",
];

/// Transport protocol of a frontend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
        }
    }

    /// The protocol of an IP protocol number (TCP and UDP only).
    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            _ => None,
        }
    }
}

/// A service frontend: address, port, protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frontend {
    /// Address and port.
    pub addr: SocketAddr,
    /// Protocol.
    pub proto: Proto,
}

impl std::fmt::Display for Frontend {
    /// `ip:port/tcp` or `[ip]:port/udp`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        write!(f, "{}/{proto}", self.addr)
    }
}

fn addr16(ip: IpAddr) -> ([u8; 16], u8) {
    let mut a = [0u8; 16];
    match ip {
        IpAddr::V4(v4) => {
            a[..4].copy_from_slice(&v4.octets());
            (a, 4)
        }
        IpAddr::V6(v6) => (v6.octets(), 6),
    }
}

fn ip_from(a: &[u8], family: u8) -> Option<IpAddr> {
    match family {
        4 => Some(IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3]))),
        6 => {
            let mut b = [0u8; 16];
            b.copy_from_slice(&a[..16]);
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// `struct svc_key`.
pub type SvcKey = [u8; 20];
/// `struct svc_val`.
pub type SvcVal = [u8; SVC_VAL_LEN];
const SVC_VAL_LEN: usize = 20 + 4 * TIERS * INLINE_SLOTS;
/// `struct groups_val`.
pub type GroupsVal = [u8; 64];
/// `struct slot_key`.
pub type SlotKey = [u8; 8];
/// `struct backend`.
pub type BackendVal = [u8; 32];
/// `struct config`.
pub type ConfigVal = [u8; 16];
/// `struct health_event`.
pub const HEALTH_EVENT_LEN: usize = 32;
/// `struct ipcache_key` address part (the LPM trie adds the prefix length).
pub type IpcacheAddr = [u8; 16];
/// `struct ipcache_val`.
pub type IpcacheVal = [u8; 8];

/// Encodes a frontend.
pub fn svc_key(f: &Frontend) -> SvcKey {
    let (a, family) = addr16(f.addr.ip());
    let mut k = [0u8; 20];
    k[..16].copy_from_slice(&a);
    k[16..18].copy_from_slice(&f.addr.port().to_be_bytes());
    k[18] = f.proto.number();
    k[19] = family;
    k
}

/// Decodes a frontend.
pub fn parse_svc_key(k: &SvcKey) -> Option<Frontend> {
    let ip = ip_from(&k[..16], k[19])?;
    let port = u16::from_be_bytes([k[16], k[17]]);
    Some(Frontend {
        addr: SocketAddr::new(ip, port),
        proto: Proto::from_number(k[18])?,
    })
}

/// `svc_val.flags`: tier 0 is weighted by cluster; its groups are in `CM_GROUPS[group]`
/// unless [`SVC_GROUPS_INLINE`].
pub const SVC_WEIGHTED: u16 = 1;
/// `svc_val.flags`: the groups are in the value, in place of tier 1's inline slots
/// (`struct groups_inline`: [`groups_inline`]).
pub const SVC_GROUPS_INLINE: u16 = 2;

/// A service's map value: its ID, backends per tier and how connections are split.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SvcEntry {
    /// Service ID (keys the slots).
    pub id: u32,
    /// Backends per tier.
    pub counts: [u16; TIERS],
    /// Usable backends per tier, as the agent sees them (spill-over reads them).
    pub healthy: [u16; TIERS],
    /// Overprovisioning factor × 100 (140 = 1.4); 0 = all or nothing.
    pub overprov_pct: u16,
    /// Below this many healthy backends the first tier is skipped.
    pub min_healthy: u16,
    /// [`SVC_WEIGHTED`].
    pub flags: u16,
    /// Its `CM_GROUPS` index when weighted.
    pub group: u16,
    /// Backend IDs of each tier whose slots are inline ([`tier_inline`]); zeros past the count.
    pub inline: [[u32; INLINE_SLOTS]; TIERS],
}

/// Encodes a service value.
pub fn svc_val(e: &SvcEntry) -> SvcVal {
    let mut v = [0u8; SVC_VAL_LEN];
    v[..4].copy_from_slice(&e.id.to_ne_bytes());
    v[4..6].copy_from_slice(&e.counts[0].to_ne_bytes());
    v[6..8].copy_from_slice(&e.counts[1].to_ne_bytes());
    v[8..10].copy_from_slice(&e.healthy[0].to_ne_bytes());
    v[10..12].copy_from_slice(&e.healthy[1].to_ne_bytes());
    v[12..14].copy_from_slice(&e.overprov_pct.to_ne_bytes());
    v[14..16].copy_from_slice(&e.min_healthy.to_ne_bytes());
    v[16..18].copy_from_slice(&e.flags.to_ne_bytes());
    v[18..20].copy_from_slice(&e.group.to_ne_bytes());
    for (i, id) in e.inline.iter().flatten().enumerate() {
        v[20 + 4 * i..24 + 4 * i].copy_from_slice(&id.to_ne_bytes());
    }
    v
}

/// Decodes a service value.
pub fn parse_svc_val(v: &SvcVal) -> SvcEntry {
    let u16_at = |i: usize| u16::from_ne_bytes([v[i], v[i + 1]]);
    SvcEntry {
        id: u32::from_ne_bytes([v[0], v[1], v[2], v[3]]),
        counts: [u16_at(4), u16_at(6)],
        healthy: [u16_at(8), u16_at(10)],
        overprov_pct: u16_at(12),
        min_healthy: u16_at(14),
        flags: u16_at(16),
        group: u16_at(18),
        inline: std::array::from_fn(|t| {
            std::array::from_fn(|i| {
                let o = 20 + 4 * (t * INLINE_SLOTS + i);
                u32::from_ne_bytes([v[o], v[o + 1], v[o + 2], v[o + 3]])
            })
        }),
    }
}

/// One cluster group of a weighted tier: a contiguous range of its slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GroupEntry {
    /// First slot.
    pub start: u16,
    /// Slots.
    pub len: u16,
    /// Weight (0: only when no weighted group has a healthy backend).
    pub weight: u16,
    /// Usable backends in it, as the agent sees them.
    pub healthy: u16,
}

/// Decodes a tier's groups.
pub fn parse_groups_val(v: &GroupsVal) -> Vec<GroupEntry> {
    let n = (u32::from_ne_bytes([v[0], v[1], v[2], v[3]]) as usize).min(MAX_GROUPS);
    let u16_at = |i: usize| u16::from_ne_bytes([v[i], v[i + 1]]);
    (0..n)
        .map(|i| {
            let o = 8 + i * 6;
            GroupEntry {
                start: u16::from(v[o]),
                healthy: u16::from(v[o + 1]),
                len: u16_at(o + 2),
                weight: u16_at(o + 4),
            }
        })
        .collect()
}

/// Encodes a tier's groups (at most [`MAX_GROUPS`]; the rest are ignored).
pub fn groups_val(groups: &[GroupEntry]) -> GroupsVal {
    let mut v = [0u8; 64];
    let n = groups.len().min(MAX_GROUPS);
    v[..4].copy_from_slice(&(n as u32).to_ne_bytes());
    // The sum of the weights the kernel draws from (groups with a healthy backend), written
    // with them in one update: the connect path reads it instead of summing.
    let total: u32 = groups
        .iter()
        .take(n)
        .filter(|g| g.healthy > 0)
        .map(|g| u32::from(g.weight))
        .sum();
    v[4..8].copy_from_slice(&total.to_ne_bytes());
    for (i, g) in groups.iter().take(n).enumerate() {
        // A tier holds at most MAX_TIER_SLOTS (256) backends: a group starts below 256; the
        // kernel reads `healthy` only as "any", so it saturates.
        let o = 8 + i * 6;
        v[o] = u8::try_from(g.start).unwrap_or(u8::MAX);
        v[o + 1] = u8::try_from(g.healthy).unwrap_or(u8::MAX);
        v[o + 2..o + 4].copy_from_slice(&g.len.to_ne_bytes());
        v[o + 4..o + 6].copy_from_slice(&g.weight.to_ne_bytes());
    }
    v
}

/// Encodes at most [`INLINE_GROUPS`] groups as tier 1's inline slot words of a service value
/// (`struct groups_inline`: the first 32 bytes of [`groups_val`]).
pub fn groups_inline(groups: &[GroupEntry]) -> [u32; INLINE_SLOTS] {
    let v = groups_val(&groups[..groups.len().min(INLINE_GROUPS)]);
    std::array::from_fn(|i| {
        u32::from_ne_bytes([v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]])
    })
}

/// Decodes the groups of [`groups_inline`].
pub fn parse_groups_inline(words: &[u32; INLINE_SLOTS]) -> Vec<GroupEntry> {
    let mut v = [0u8; 64];
    for (i, w) in words.iter().enumerate() {
        v[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let mut groups = parse_groups_val(&v);
    groups.truncate(INLINE_GROUPS);
    groups
}

/// Encodes a slot key.
pub fn slot_key(svc: u32, tier: u16, slot: u16) -> SlotKey {
    let mut k = [0u8; 8];
    k[..4].copy_from_slice(&svc.to_ne_bytes());
    k[4..6].copy_from_slice(&tier.to_ne_bytes());
    k[6..8].copy_from_slice(&slot.to_ne_bytes());
    k
}

/// Decodes a slot key into (service, tier, slot).
pub fn parse_slot_key(k: &SlotKey) -> (u32, u16, u16) {
    (
        u32::from_ne_bytes([k[0], k[1], k[2], k[3]]),
        u16::from_ne_bytes([k[4], k[5]]),
        u16::from_ne_bytes([k[6], k[7]]),
    )
}

/// A backend as the datapath sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BackendEntry {
    /// Address and port.
    pub addr: SocketAddr,
    /// Whether new connections may go to it.
    pub healthy: bool,
    /// Its cluster's ID.
    pub cluster_id: u16,
    /// Its zone (an index the agent assigns; 0 = unknown).
    pub zone: u16,
    /// Whether exactly one frontend's slots hold it (then `CM_BACKEND_IDS` names that frontend
    /// and translated TCP sockets to it keep no socket storage).
    pub one_frontend: bool,
    /// Until when (`CLOCK_MONOTONIC` ns, the kernel's `bpf_ktime_get_ns`) the kernel skips it
    /// as suspect; 0 = not suspect. Only the kernel sets it; the agent keeps it when it
    /// rewrites a backend and clears it when a probe succeeds.
    pub suspect_until_ns: u64,
}

impl BackendEntry {
    /// Whether the kernel skips it as suspect at `now_ns` (`CLOCK_MONOTONIC`).
    pub fn suspect_at(&self, now_ns: u64) -> bool {
        self.suspect_until_ns > now_ns
    }
}

/// `CLOCK_MONOTONIC` in ns: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

/// `struct backend.state` bits.
const BACKEND_ACTIVE: u8 = 1;
const BACKEND_ONE_FRONTEND: u8 = 2;

/// Encodes a backend.
pub fn backend_val(b: &BackendEntry) -> BackendVal {
    let (a, family) = addr16(b.addr.ip());
    let mut v = [0u8; 32];
    v[..16].copy_from_slice(&a);
    v[16..18].copy_from_slice(&b.addr.port().to_be_bytes());
    v[18] = family;
    v[19] = u8::from(b.healthy) | (u8::from(b.one_frontend) << 1);
    v[20..22].copy_from_slice(&b.cluster_id.to_ne_bytes());
    v[22..24].copy_from_slice(&b.zone.to_ne_bytes());
    v[24..32].copy_from_slice(&b.suspect_until_ns.to_ne_bytes());
    v
}

/// The same backend retired: no longer active nor with one frontend, its address kept until
/// its ID is reused (only the state byte differs, so a program reading it meanwhile sees a
/// whole entry, skipped).
pub fn retired(v: &BackendVal) -> BackendVal {
    let mut r = *v;
    r[19] = 0;
    r
}

/// Decodes a backend.
pub fn parse_backend_val(v: &BackendVal) -> Option<BackendEntry> {
    let ip = ip_from(&v[..16], v[18])?;
    Some(BackendEntry {
        addr: SocketAddr::new(ip, u16::from_be_bytes([v[16], v[17]])),
        healthy: v[19] & BACKEND_ACTIVE != 0,
        one_frontend: v[19] & BACKEND_ONE_FRONTEND != 0,
        cluster_id: u16::from_ne_bytes([v[20], v[21]]),
        zone: u16::from_ne_bytes([v[22], v[23]]),
        suspect_until_ns: u64::from_ne_bytes([
            v[24], v[25], v[26], v[27], v[28], v[29], v[30], v[31],
        ]),
    })
}

/// `struct sockaddr_cm`: a backend's address as `CM_BACKEND_IDS` keys it.
pub type SockaddrKey = [u8; 24];

/// Encodes a backend address for `CM_BACKEND_IDS`.
pub fn sockaddr_key(addr: &SocketAddr) -> SockaddrKey {
    let (a, family) = addr16(addr.ip());
    let mut k = [0u8; 24];
    k[..16].copy_from_slice(&a);
    k[16..18].copy_from_slice(&addr.port().to_be_bytes());
    k[18] = family;
    k
}

/// `struct backend_ref`: a `CM_BACKEND_IDS` value.
pub type BackendRef = [u8; 32];

/// Encodes a backend's ID and the one frontend whose slots hold it (`None`: never had one).
pub fn backend_ref(id: u32, front: Option<SocketAddr>) -> BackendRef {
    let mut v = [0u8; 32];
    v[..4].copy_from_slice(&id.to_ne_bytes());
    if let Some(f) = front {
        v[8..].copy_from_slice(&sockaddr_key(&f));
    }
    v
}

/// Decodes a `CM_BACKEND_IDS` value into (ID, frontend).
pub fn parse_backend_ref(v: &BackendRef) -> (u32, Option<SocketAddr>) {
    let id = u32::from_ne_bytes([v[0], v[1], v[2], v[3]]);
    let front =
        ip_from(&v[8..24], v[26]).map(|ip| SocketAddr::new(ip, u16::from_be_bytes([v[24], v[25]])));
    (id, front)
}

/// `config.flags`: TCP sockets keep no per-socket state (getpeername shows the backend).
pub const CFG_NO_PEER_REWRITE: u32 = 1;
/// `struct endpoint`: identity, `EP_*` flags.
pub type EndpointVal = [u8; 8];
/// `struct policy_key`.
pub type PolicyKey = [u8; 12];
/// Port ranges of one port set at most (`MAX_PORT_RANGES`).
pub const MAX_PORT_RANGES: usize = 16;
/// Bytes of a `struct port_set`.
pub const PORT_SET_LEN: usize = 4 + 12 * MAX_PORT_RANGES;
/// `struct port_set`.
pub type PortSetVal = [u8; PORT_SET_LEN];

/// `config.flags`: some endpoint has a policy (the programs look callers up in `CM_ENDPOINTS`).
pub const CFG_POLICY: u32 = 2;
/// `CFG_FLOWS`: the programs report flows in `CM_FLOWS`.
pub const CFG_FLOWS: u32 = 4;

/// The programs' settings (`struct config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Config {
    /// How long the kernel skips a suspect backend without other news, in ns.
    pub quarantine_ns: u64,
    /// Initial SYN retransmission timeout of translated connects, in kernel jiffies; 0 = the
    /// kernel's (1 s).
    pub syn_rto_jiffies: u32,
    /// `CFG_*` bits.
    pub flags: u32,
}

/// Encodes the settings.
pub fn config_val(c: &Config) -> ConfigVal {
    let mut v = [0u8; 16];
    v[..8].copy_from_slice(&c.quarantine_ns.to_ne_bytes());
    v[8..12].copy_from_slice(&c.syn_rto_jiffies.to_ne_bytes());
    v[12..16].copy_from_slice(&c.flags.to_ne_bytes());
    v
}

/// Decodes the settings.
pub fn parse_config_val(v: &ConfigVal) -> Config {
    Config {
        quarantine_ns: u64::from_ne_bytes([v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7]]),
        syn_rto_jiffies: u32::from_ne_bytes([v[8], v[9], v[10], v[11]]),
        flags: u32::from_ne_bytes([v[12], v[13], v[14], v[15]]),
    }
}

/// Why the kernel reported a backend (`struct health_event.reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HealthReason {
    /// A translated connect went from SYN_SENT to CLOSE: refused (RST), or the caller gave up.
    Refused,
    /// The SYN of a translated connect was not answered within its retransmission timeout.
    SynTimeout,
    /// A translated connection to a suspect backend was established (suspicion cleared).
    Established,
}

impl HealthReason {
    /// A label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Refused => "refused",
            Self::SynTimeout => "syn_timeout",
            Self::Established => "established",
        }
    }
}

/// A health event from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthEvent {
    /// `bpf_ktime_get_ns()` when it happened.
    pub ts_ns: u64,
    /// The backend's ID in `CM_BACKENDS`.
    pub backend_id: u32,
    /// Its address.
    pub addr: SocketAddr,
    /// What happened.
    pub reason: HealthReason,
}

/// Decodes a health event (`None` for a record of another size or an unknown reason).
pub fn parse_health_event(b: &[u8]) -> Option<HealthEvent> {
    if b.len() != HEALTH_EVENT_LEN {
        return None;
    }
    let reason = match b[12] {
        1 => HealthReason::Refused,
        2 => HealthReason::SynTimeout,
        3 => HealthReason::Established,
        _ => return None,
    };
    let ip = ip_from(&b[16..32], b[13])?;
    Some(HealthEvent {
        ts_ns: u64::from_ne_bytes(b[..8].try_into().ok()?),
        backend_id: u32::from_ne_bytes(b[8..12].try_into().ok()?),
        addr: SocketAddr::new(ip, u16::from_be_bytes([b[14], b[15]])),
        reason,
    })
}

/// `struct flow_event`'s size.
pub const FLOW_EVENT_LEN: usize = 88;

/// Where a flow goes relative to the local endpoint (`DIR_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FlowDirection {
    /// Received by the local endpoint.
    Ingress,
    /// Sent by a local process.
    Egress,
}

/// A flow's outcome (`FLOW_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FlowVerdict {
    /// Let through (and translated, through a service).
    Forwarded,
    /// A service with no backend to take it: refused.
    NoBackend,
    /// Refused by a deny rule.
    DeniedByPolicy,
    /// Refused: policy selects the endpoint and no rule allows it.
    DeniedByDefault,
}

impl FlowVerdict {
    /// The name used in metrics, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::NoBackend => "no_backend",
            Self::DeniedByPolicy => "denied_by_policy",
            Self::DeniedByDefault => "denied_by_default",
        }
    }
}

/// `FLOWF_SERVICE`: the address called was a service frontend.
pub const FLOWF_SERVICE: u8 = 1;
/// `FLOWF_NEXT_TIER`: the backend is in a later tier while tier 0 has backends.
pub const FLOWF_NEXT_TIER: u8 = 2;
/// `FLOWF_SUSPECT`: nothing usable; a suspect backend was tried.
pub const FLOWF_SUSPECT: u8 = 4;
/// `FLOWF_ENFORCED`: policy enforces this direction for the local endpoint.
pub const FLOWF_ENFORCED: u8 = 8;
/// `FLOWF_RULE`: `rule` names the deciding policy rule.
pub const FLOWF_RULE: u8 = 16;

/// A flow event from the kernel (`struct flow_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns()` when it happened.
    pub ts_ns: u64,
    /// The local side's cgroup.
    pub cgroup: u64,
    /// The socket's cookie.
    pub cookie: u64,
    /// Egress: the address called; ingress: the local address.
    pub orig: SocketAddr,
    /// Egress: where it went (the backend; unspecified when there was none); ingress: the
    /// source.
    pub peer: SocketAddr,
    /// The local endpoint's identity (0: not an endpoint).
    pub local_identity: u32,
    /// The peer's identity as policy saw it (2 = world when the IP cache does not know it);
    /// 0 when no policy decided: the agent resolves the address itself.
    pub remote_identity: u32,
    /// The backend's ID (0: none).
    pub backend_id: u32,
    /// The deciding policy rule, when one did.
    pub rule: Option<u32>,
    /// The peer's cluster ID (0: unknown).
    pub remote_cluster: u16,
    /// TCP or UDP.
    pub proto: Proto,
    /// Direction.
    pub direction: FlowDirection,
    /// Outcome.
    pub verdict: FlowVerdict,
    /// The backend's tier.
    pub tier: u8,
    /// `FLOWF_*` bits.
    pub flags: u8,
}

/// Decodes a flow event (`None` for a record of another size or unknown values).
pub fn parse_flow_event(b: &[u8]) -> Option<FlowEvent> {
    if b.len() != FLOW_EVENT_LEN {
        return None;
    }
    let u64_at = |i: usize| {
        b.get(i..i + 8)
            .and_then(|s| s.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    let u32_at = |i: usize| {
        b.get(i..i + 4)
            .and_then(|s| s.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    // IPv4 addresses are IPv4-mapped.
    let ip = |a: &[u8]| match b[78] {
        4 => Some(IpAddr::V4(Ipv4Addr::new(a[12], a[13], a[14], a[15]))),
        6 => ip_from(a, 6),
        _ => None,
    };
    let orig = SocketAddr::new(ip(&b[24..40])?, u16::from_be_bytes([b[56], b[57]]));
    let peer = SocketAddr::new(ip(&b[40..56])?, u16::from_be_bytes([b[58], b[59]]));
    let direction = match b[80] {
        0 => FlowDirection::Ingress,
        1 => FlowDirection::Egress,
        _ => return None,
    };
    let verdict = match b[81] {
        1 => FlowVerdict::Forwarded,
        2 => FlowVerdict::NoBackend,
        3 => FlowVerdict::DeniedByPolicy,
        4 => FlowVerdict::DeniedByDefault,
        _ => return None,
    };
    let flags = b[83];
    Some(FlowEvent {
        ts_ns: u64_at(0)?,
        cgroup: u64_at(8)?,
        cookie: u64_at(16)?,
        orig,
        peer,
        local_identity: u32_at(60)?,
        remote_identity: u32_at(64)?,
        backend_id: u32_at(68)?,
        rule: (flags & FLOWF_RULE != 0).then_some(u32_at(72)?),
        remote_cluster: u16::from_ne_bytes([b[76], b[77]]),
        proto: Proto::from_number(b[79])?,
        direction,
        verdict,
        tier: b[82],
        flags,
    })
}

/// An IP cache entry: a prefix (IPv4 as IPv4-mapped IPv6) and its identity and cluster.
pub fn ipcache_key(net: &ipnet::IpNet) -> (u32, IpcacheAddr) {
    match net {
        ipnet::IpNet::V4(v4) => (
            u32::from(v4.prefix_len()) + 96,
            v4.network().to_ipv6_mapped().octets(),
        ),
        ipnet::IpNet::V6(v6) => (u32::from(v6.prefix_len()), v6.network().octets()),
    }
}

/// Encodes an IP cache value.
pub fn ipcache_val(identity: u32, cluster_id: u16) -> IpcacheVal {
    let mut v = [0u8; 8];
    v[..4].copy_from_slice(&identity.to_ne_bytes());
    v[4..6].copy_from_slice(&cluster_id.to_ne_bytes());
    v
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_tier_s_groups_carry_the_sum_of_the_weights_the_kernel_draws_from() {
        let g = |weight, healthy| GroupEntry {
            start: 0,
            len: 1,
            weight,
            healthy,
        };
        let v = groups_val(&[g(90, 2), g(10, 0), g(5, 1)]);
        assert_eq!(u32::from_ne_bytes([v[4], v[5], v[6], v[7]]), 95);
        assert_eq!(parse_groups_val(&v), vec![g(90, 2), g(10, 0), g(5, 1)]);
        let none = groups_val(&[g(90, 0)]);
        assert_eq!(u32::from_ne_bytes([none[4], none[5], none[6], none[7]]), 0);
        // Inline in a service's value: the same layout's first 32 bytes, four groups at most.
        let four = [g(90, 2), g(10, 0), g(5, 1), g(0, 3)];
        let w = groups_inline(&four);
        assert_eq!((w[0], w[1]), (4, 95));
        assert_eq!(parse_groups_inline(&w), four);
        assert_eq!(
            parse_groups_inline(&groups_inline(&[g(1, 1); 6])).len(),
            4,
            "never more than fit"
        );
        assert!(groups_fit_inline(4, 0) && !groups_fit_inline(5, 0) && !groups_fit_inline(2, 1));
    }

    #[test]
    fn layouts_round_trip_and_match_c() {
        let f = Frontend {
            addr: "10.96.0.10:80".parse().unwrap(),
            proto: Proto::Tcp,
        };
        let k = svc_key(&f);
        assert_eq!(&k[..4], &[10, 96, 0, 10]);
        assert_eq!(
            &k[16..20],
            &[0, 80, 6, 4],
            "port in network order, proto, family"
        );
        assert_eq!(parse_svc_key(&k), Some(f));
        assert_eq!(f.to_string(), "10.96.0.10:80/tcp");
        let f6 = Frontend {
            addr: "[fd00::10]:443".parse().unwrap(),
            proto: Proto::Udp,
        };
        assert_eq!(parse_svc_key(&svc_key(&f6)), Some(f6));
        assert_eq!(f6.to_string(), "[fd00::10]:443/udp");
        let e = SvcEntry {
            id: 7,
            counts: [3, 2],
            healthy: [2, 2],
            overprov_pct: 140,
            min_healthy: 1,
            flags: SVC_WEIGHTED,
            group: 300,
            inline: [[1, 2, 3, 0, 0, 0, 0, 0], [9, 10, 0, 0, 0, 0, 0, 0]],
        };
        assert_eq!(parse_svc_val(&svc_val(&e)), e);
        assert_eq!(
            &svc_val(&e)[16..20],
            &[1, 0, 44, 1],
            "flags, then the group index"
        );
        assert_eq!(&svc_val(&e)[20 + 32..20 + 36], &9u32.to_ne_bytes());
        assert!(tier_inline(8) && !tier_inline(9));
        assert_eq!((map_slots(8), map_slots(9)), (0, 9));
        let g = groups_val(&[GroupEntry {
            start: 2,
            len: 3,
            weight: 90,
            healthy: 1,
        }]);
        assert_eq!(&g[..4], &1u32.to_ne_bytes());
        assert_eq!(&g[8..14], &[2, 1, 3, 0, 90, 0]);
        assert_eq!(parse_slot_key(&slot_key(9, 1, 255)), (9, 1, 255));
        let b = BackendEntry {
            addr: "10.1.0.5:8080".parse().unwrap(),
            healthy: true,
            cluster_id: 4095,
            zone: 2,
            one_frontend: false,
            suspect_until_ns: 1_234_567,
        };
        let v = backend_val(&b);
        assert_eq!(v[19], 1);
        assert_eq!(&v[24..32], &1_234_567u64.to_ne_bytes());
        assert_eq!(parse_backend_val(&v), Some(b));
        let one = BackendEntry {
            one_frontend: true,
            healthy: false,
            ..b
        };
        assert_eq!(
            backend_val(&one)[19],
            2,
            "BACKEND_ONE_FRONTEND without BACKEND_ACTIVE"
        );
        assert_eq!(parse_backend_val(&backend_val(&one)), Some(one));
        let front: SocketAddr = "[fd00::10]:443".parse().unwrap();
        let r = backend_ref(77, Some(front));
        assert_eq!(&r[..4], &77u32.to_ne_bytes());
        assert_eq!(&r[8..32], &sockaddr_key(&front));
        assert_eq!(parse_backend_ref(&r), (77, Some(front)));
        assert_eq!(parse_backend_ref(&backend_ref(5, None)), (5, None));
        assert!(b.suspect_at(1_000_000) && !b.suspect_at(1_234_567));
        let mut ev = [0u8; HEALTH_EVENT_LEN];
        ev[..8].copy_from_slice(&99u64.to_ne_bytes());
        ev[8..12].copy_from_slice(&7u32.to_ne_bytes());
        ev[12] = 2;
        ev[13] = 4;
        ev[14..16].copy_from_slice(&8080u16.to_be_bytes());
        ev[16..20].copy_from_slice(&[10, 1, 0, 5]);
        assert_eq!(
            parse_health_event(&ev),
            Some(HealthEvent {
                ts_ns: 99,
                backend_id: 7,
                addr: "10.1.0.5:8080".parse().unwrap(),
                reason: HealthReason::SynTimeout,
            })
        );
        assert_eq!(parse_health_event(&ev[..31]), None);
        let config = Config {
            quarantine_ns: 5,
            syn_rto_jiffies: 25,
            flags: CFG_NO_PEER_REWRITE,
        };
        let c = config_val(&config);
        assert_eq!(&c[8..12], &25u32.to_ne_bytes());
        assert_eq!(parse_config_val(&c), config);
        let k = sockaddr_key(&"10.1.0.5:8080".parse().unwrap());
        assert_eq!(&k[16..19], &[0x1f, 0x90, 4]);
        let (len, a) = ipcache_key(&"10.1.0.0/16".parse().unwrap());
        assert_eq!(len, 112);
        assert_eq!(&a[10..16], &[0xff, 0xff, 10, 1, 0, 0]);
    }

    /// A record the agent did not expect (another layout, a truncated or corrupt one) is
    /// skipped and counted, never a panic in the reader: every length, and every value of
    /// each byte of a valid record.
    #[test]
    fn malformed_flow_records_are_refused_without_panicking() {
        for len in 0..=2 * FLOW_EVENT_LEN {
            let b = vec![0xa5u8; len];
            if len != FLOW_EVENT_LEN {
                assert!(parse_flow_event(&b).is_none(), "{len} bytes");
            }
            let _ = parse_flow_event(&b);
        }
        let mut good = vec![0u8; FLOW_EVENT_LEN];
        good[78] = 4; // IPv4
        good[79] = 6; // TCP
        good[80] = 1; // egress
        good[81] = 1; // forwarded
        assert!(parse_flow_event(&good).is_some());
        for i in 0..FLOW_EVENT_LEN {
            for v in 0..=u8::MAX {
                let mut b = good.clone();
                b[i] = v;
                let _ = parse_flow_event(&b);
            }
        }
        // Unknown family, protocol, direction or verdict: refused, not guessed.
        for (i, v) in [(78, 5), (79, 1), (80, 2), (81, 0), (81, 5)] {
            let mut b = good.clone();
            b[i] = v;
            assert!(parse_flow_event(&b).is_none(), "byte {i} = {v}");
        }
    }
}
