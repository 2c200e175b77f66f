// SPDX-License-Identifier: GPL-2.0
// Socket-level load balancing for global services: the service lookup happens at connect(),
// sendmsg() and recvmsg() in the kernel, per cgroup. Loaded by node-agent (aya); the map
// layouts here and in node-agent/src/maps.rs must match byte for byte.
//
// Backend choice: random among the usable backends of the first tier that has one. The agent
// fills the tiers from the service's affinity (local: local then remote; remote: remote then
// local; none: one tier). A backend is usable when the agent has not marked it down and it is
// not *suspect*: the sock_ops program marks a backend suspect for this node the moment a
// translated connection to it is refused or its SYN times out, so the very next connect()
// skips it with no agent round trip (ADR 0018). Suspicion ends when its quarantine expires,
// when a connection to it succeeds, or when the agent's probe clears it. When every backend
// of every tier is down or suspect, a suspect one is still tried rather than refusing.
//
// Per-connect state costs an allocation, so the common case keeps none: a TCP socket
// connected to a backend that only one frontend's slots hold is marked with a sock_ops
// callback flag (a bit in the socket itself), and getpeername() finds that frontend in
// CM_BACKEND_IDS. Other translated sockets keep their translation in socket storage (freed
// with the socket), for getpeername()/recvmsg(). Only unconnected UDP, which may talk to
// several backends, also writes the reverse-NAT map, once per new backend, and sock_release
// removes its last entry.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

#define MAX_SERVICES 65536
#define MAX_BACKENDS 262144
// Weighted services (cluster weights) at most: one CM_GROUPS entry each (and a quarter more
// for indices resting after their service went).
#define MAX_WEIGHTED (MAX_SERVICES / 4)
#define GROUP_ENTRIES (MAX_WEIGHTED + MAX_WEIGHTED / 4 + 1) // index 0 is no group's
// Backend IDs: the backends, a quarter more for IDs resting after their backend went, and 0.
#define BACKEND_ENTRIES (MAX_BACKENDS + MAX_BACKENDS / 4 + 1)
#define MAX_SLOTS (MAX_BACKENDS * 2)
#define MAX_TIER_SLOTS 256
#define TIERS 2
// A tier of at most this many backends keeps its slots in the service's own value (one map
// lookup fewer per connect, and the slots change with the counts in one update); a bigger
// tier's slots are in CM_SLOTS.
#define INLINE_SLOTS 8

#define FAMILY_V4 4
#define FAMILY_V6 6

// struct backend.state bits
#define BACKEND_ACTIVE 1       // the agent has not marked it down
#define BACKEND_ONE_FRONTEND 2 // exactly one frontend's slots hold it: CM_BACKEND_IDS names it

#ifndef SOL_TCP
#define SOL_TCP 6
#endif
#define TCP_BPF_SOCK_OPS_CB_FLAGS 1008
// A TCP socket connect() translated to a backend with one frontend carries this sock_ops
// callback flag instead of socket storage (no allocation): getpeername() then finds the
// frontend in CM_BACKEND_IDS. Retransmission callbacks are the one kind with no cost on a
// healthy connection; cm_sockops ignores them.
#define TRANSLATED_MARK BPF_SOCK_OPS_RETRANS_CB_FLAG

// connect() -> cm_sockops handoff of "this socket was translated to a backend with one
// frontend": connect() writes the socket's cookie into slot (cookie mod HANDOFF_SLOTS) and
// cm_sockops, at TCP_CONNECT_CB of the same connect() call, marks the socket when the slot
// still holds its cookie. Cookies are unique, so a socket is never marked that connect() did
// not translate; a slot overwritten in between (another socket whose cookie is equal modulo
// 65,536 connecting at the same instant) leaves the socket unmarked, and its getpeername()
// shows the backend instead of the service.
#define HANDOFF_SLOTS 65536

// A handoff: the socket and the backend connect() chose (cm_sockops marks the socket only when
// it is connecting to that backend, and empties the slot).
struct handoff {
	__u64 cookie;
	__u32 backend_id;
	__u32 pad;
};

// Why a backend became suspect (health_event.reason).
#define SUSPECT_REFUSED 1     // SYN_SENT -> CLOSE: RST, or the caller gave up
#define SUSPECT_SYN_TIMEOUT 2 // the SYN's retransmission timer fired
#define CLEARED_ESTABLISHED 3 // a translated connection to a suspect backend succeeded

// Counters (CM_STATS index).
#define STAT_SUSPECTS 0       // backends marked suspect
#define STAT_CLEARED 1        // suspicions cleared by an established connection
#define STAT_EVENTS_LOST 2    // health events the ring had no room for
#define STAT_SUSPECT_TRIED 3  // connects that went to a suspect backend (nothing else usable)
#define STAT_NO_BACKEND 4     // connects refused: no backend at all
#define STAT_FLOWS_LOST 5     // flow events the ring had no room for
#define STATS 6

// socket state flags
#define SOCK_TRANSLATED 1     // connect() translated this socket
#define SOCK_REVNAT 2         // sendmsg() wrote a reverse-NAT entry for `be`

// A frontend: the service address and port (network order) and protocol.
struct svc_key {
	__u8 addr[16];   // IPv4 in the first 4 bytes, the rest zero
	__u16 port;      // network byte order
	__u8 proto;      // IPPROTO_TCP / IPPROTO_UDP
	__u8 family;     // 4 or 6
};

struct svc_val {
	__u32 id;
	__u16 count[TIERS];   // slots (backends) per tier
	__u16 healthy[TIERS]; // usable backends per tier as the agent sees them
	__u16 overprov_pct;   // spill-over factor x100 (140 = 1.4); 0 = all or nothing
	__u16 min_healthy;    // below this many healthy backends the first tier is skipped
	__u16 flags;          // SVC_WEIGHTED: CM_GROUPS[group] holds tier 0's cluster groups
	__u16 group;          // its CM_GROUPS index when weighted
	__u32 slot[TIERS][INLINE_SLOTS]; // backend IDs of a tier with count <= INLINE_SLOTS
};

#define SVC_WEIGHTED 1
// The weighted tier's groups are in the service's own value, where tier 1's inline slots
// would be (a weighted service has one tier): no CM_GROUPS entry to read.
#define SVC_GROUPS_INLINE 2
#define MAX_GROUPS 9 // 8 weighted clusters and the rest
#define INLINE_GROUPS 4 // in the service's value: 3 weighted clusters and the rest

// A weighted tier: its slots grouped by cluster, each group a contiguous range of slots.
// Only tier 0 is ever weighted.
struct group {
	__u8 start;
	__u8 healthy;   // usable backends in the group as the agent sees them (at most 255)
	__u16 len;
	__u16 weight;
};

// One cache line (the array is mmapable, so its entries start on page boundaries).
struct groups_val {
	__u32 n;
	__u32 total; // sum of the weights of the groups with a healthy backend (0: sum them here)
	struct group g[MAX_GROUPS];
	__u16 pad;
};

// The same, inline in a service's value (SVC_GROUPS_INLINE), in place of tier 1's slots.
struct groups_inline {
	__u32 n;
	__u32 total;
	struct group g[INLINE_GROUPS];
};

struct slot_key {
	__u32 svc_id;
	__u16 tier;
	__u16 slot;
};

struct backend {
	__u8 addr[16];
	__u16 port;       // network byte order
	__u8 family;
	__u8 state;       // BACKEND_* bits (set by the agent)
	__u16 cluster_id;
	__u16 zone;
	__u64 suspect_until; // bpf_ktime_get_ns() deadline of the quarantine; 0 = not suspect
};

// An address and port (the service's or the backend's).
struct sockaddr_cm {
	__u8 addr[16];
	__u16 port;
	__u8 family;
	__u8 pad;
	__u32 pad2;
};

// CM_BACKEND_IDS value. `front.family` is 0 while the backend never had exactly one frontend;
// while it has several, the last one stays (sockets marked through it still resolve).
struct backend_ref {
	__u32 id;
	__u32 pad;
	struct sockaddr_cm front;
};

// Per socket (socket storage): what connect()/sendmsg() translated last.
struct sock_state {
	__u32 flags;
	__u32 pad;
	struct sockaddr_cm svc;
	struct sockaddr_cm be;
};

// Reverse translation for unconnected UDP replies: per socket, backend -> service.
struct revnat_key {
	__u64 cookie;
	__u8 addr[16];
	__u16 port;
	__u8 family;
	__u8 pad;
	__u32 pad2;
};

struct revnat_val {
	__u8 addr[16];
	__u16 port;
	__u8 family;
	__u8 pad;
};

struct ipcache_key {
	__u32 prefixlen;  // over `addr`; IPv4 is IPv4-mapped IPv6 (::ffff:a.b.c.d), prefix + 96
	__u8 addr[16];
};

struct ipcache_key_host {
	__u8 addr[16];
};

struct ipcache_val {
	__u32 identity;
	__u16 cluster_id;
	__u16 pad;
};

// Settings the agent writes (CM_CONFIG[0]).
struct config {
	__u64 quarantine_ns;   // how long a suspect stays skipped without other news
	__u32 syn_rto_jiffies; // initial SYN retransmission timeout of translated connects; 0 = kernel's
	__u32 flags;           // CFG_*
};

// TCP sockets keep no per-socket state: getpeername() shows the backend (saves the socket
// storage allocation, ~0.7 us per translated connect).
#define CFG_NO_PEER_REWRITE 1
// Some endpoint on this node has a policy: connect()/sendmsg() and cm_ingress look the
// caller up in CM_ENDPOINTS (without it they skip the lookup).
#define CFG_POLICY 2
// Flow events: every new connection or first datagram of a local endpoint, or through a
// service, is reported in CM_FLOWS.
#define CFG_FLOWS 4

// A health event for the agent (CM_HEALTH_EVENTS ring).
struct health_event {
	__u64 ts;
	__u32 backend_id;
	__u8 reason;
	__u8 family;
	__u16 port;
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct svc_key);
	__type(value, struct svc_val);
	__uint(map_flags, BPF_F_NO_PREALLOC); // written by the agent only: pay for what is used
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_SERVICES SEC(".maps");

// Backends by ID: an array, so a connect finds its backend with no hash and in one cache line.
// The agent reuses an ID only well after nothing references it (a connect that read the ID
// from a slot just before the agent freed it never meets another backend under it), writes
// a backend before any slot holds its ID, and changes a live backend only in place, field by
// field (`state`, `suspect_until`): a program never reads a backend half written. Entry 0 is
// never a backend; an unused entry is zero, a removed backend's keeps its address with no
// state bit (not active) until the ID is reused.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, BACKEND_ENTRIES);
	__type(key, __u32);
	__type(value, struct backend);
	__uint(map_flags, BPF_F_MMAPABLE); // page-aligned data: a backend never straddles two lines
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_BACKENDS SEC(".maps");

// Backend address -> ID, for sock_ops (which sees only the connection's remote address), and
// the one frontend whose slots hold it (for getpeername() of marked sockets).
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, struct sockaddr_cm);
	__type(value, struct backend_ref);
	__uint(map_flags, BPF_F_NO_PREALLOC); // written by the agent only: pay for what is used
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_BACKEND_IDS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SLOTS);
	__type(key, struct slot_key);
	__type(value, __u32);
	__uint(map_flags, BPF_F_NO_PREALLOC); // written by the agent only: pay for what is used
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_SLOTS SEC(".maps");

// Weighted tiers' cluster groups, by the index in the service's value (an array: no hash on
// the connect path). Read against the service's own slot count: a stale or reused entry can
// misplace a draw among that service's backends, never leave them.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, GROUP_ENTRIES);
	__type(key, __u32);
	__type(value, struct groups_val);
	__uint(map_flags, BPF_F_MMAPABLE); // page-aligned data: an entry is one cache line
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_GROUPS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, HANDOFF_SLOTS);
	__type(key, __u32);
	__type(value, struct handoff);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_HANDOFF SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct revnat_key);
	__type(value, struct revnat_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_REVNAT SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct sock_state);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_SOCKS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 524288);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_IPCACHE SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_CONFIG SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STATS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_STATS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_HEALTH_EVENTS SEC(".maps");

// ---- Identity policy (see ADR 0022) ----

#define IDENTITY_WORLD 2 // an address the ipcache does not know

#define EP_INGRESS 1 // a policy selects the endpoint for ingress: default deny for it
#define EP_EGRESS 2  // ... for egress

#define DIR_INGRESS 0
#define DIR_EGRESS 1

#define VERDICT_ALLOW 1
#define VERDICT_DENY 2

// Outcomes counted per direction and peer cluster (CM_POLICY_STATS).
#define OUT_ALLOWED 0
#define OUT_DENIED_POLICY 1
#define OUT_DENIED_DEFAULT 2
#define OUTCOMES 3
#define MAX_CLUSTER_ID 4095

// A local endpoint: a pod's cgroup (and its descendants', each listed) -> its identity.
struct endpoint {
	__u32 identity;
	__u32 flags; // EP_*
};

// Policy, per (local identity, peer identity, direction, protocol): one hash lookup giving a
// port set — disjoint port ranges, each allow or deny with the rule that decided. The agent
// resolves overlaps (a deny wins) before writing and deduplicates sets. Peer 0 = any peer.
// Exact-identity lookups keep the cost of an enforced connect flat in the number of peers.
#define MAX_PORT_RANGES 16

struct policy_key {
	__u32 local;
	__u32 remote;
	__u8 dir;
	__u8 proto;
	__u16 pad;
};

struct port_range {
	__u16 lo;     // host order, inclusive
	__u16 hi;
	__u8 verdict; // VERDICT_*
	__u8 pad;
	__u16 pad2;
	__u32 rule;   // the agent's index of the rule that decided (for `clustermesh policy`)
};

struct port_set {
	__u32 n;
	struct port_range r[MAX_PORT_RANGES];
};

// Unconnected UDP sent by an endpoint with ingress policy: replies from that peer are let in.
struct udp_flow_key {
	__u64 cookie;
	__u8 addr[16]; // IPv4-mapped for IPv4
	__u16 port;    // network order
	__u16 pad;
	__u32 pad2;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct endpoint);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_ENDPOINTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1048576);
	__type(key, struct policy_key);
	__type(value, __u32); // port set ID
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_POLICY SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct port_set);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_POLICY_SETS SEC(".maps");

// The IP cache's host entries by exact address (IPv4-mapped for IPv4): what the programs look
// up (one hash lookup instead of a trie walk); CM_IPCACHE keeps the same entries as prefixes.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 524288);
	__type(key, struct ipcache_key_host);
	__type(value, struct ipcache_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_IPCACHE_HOSTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, (MAX_CLUSTER_ID + 1) * 2 * OUTCOMES);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_POLICY_STATS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct udp_flow_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_UDP_FLOWS SEC(".maps");

// Verdict cache (ADR 0023): per (local identity, direction, protocol, peer address, port), the
// verdict, the deciding rule and the peer's identity and cluster, valid while its generation is
// CM_POLICY_GEN's. The agent bumps the generation after every change of the policy entries, the
// port sets or the IP cache, so a stale entry is never used after the change is complete.
//
// Laid out for the cache misses it saves: a 2-way set-associative table of 64-byte slots in one
// page-aligned array (BPF_F_MMAPABLE), so a connect to a peer seen recently reads one bucket of
// two adjacent cache lines — no hash-map bucket, element or LRU list — and 10,000 peers fit in
// 640 KiB instead of an LRU map's scattered elements. Array lookups are inlined by the verifier.
// Slots are written in place by the programs themselves on a miss, so each carries a sequence
// number (a seqlock): a writer takes the slot by compare-and-swap from even to odd, writes, and
// makes it even again; a reader that sees it odd or changed across its read treats the slot as
// a miss and looks the verdict up in the maps (x86's loads are not reordered with loads, nor
// stores with stores; the compiler is held by barriers).
// [0]: the generation, which the agent changes with an atomic add through a mapping of the
// map (BPF_F_MMAPABLE): a map update copies with memcpy, which may write an 8-byte value a
// byte at a time, and a torn generation could match an entry of another one. It is never 0
// once the agent runs (it bumps it when it opens the maps), so an all-zero slot never matches.
// [1]: the seed of the cache's hash (random, written once by the agent): buckets cannot be
// chosen from outside to evict a pod's entries.
#define GEN_SEED 1
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_POLICY_GEN SEC(".maps");

#define VERDICT_BUCKETS 16384
#define VERDICT_WAYS 2

struct verdict_slot {
	__u32 seq; // odd while a program writes the slot
	__u32 local;
	__u32 remote;
	__u32 rule;
	__u8 addr[16]; // IPv4-mapped for IPv4
	__u64 gen;
	__u16 port; // network order
	__u16 cluster;
	__u8 dir;
	__u8 proto;
	__u8 out;   // OUT_*
	__u8 flags; // FLOWF_RULE when `rule` is known
	__u8 pad[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, VERDICT_BUCKETS * VERDICT_WAYS);
	__type(key, __u32);
	__type(value, struct verdict_slot);
	__uint(map_flags, BPF_F_MMAPABLE); // values page-aligned: a slot is one cache line
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_VERDICTS SEC(".maps");

// ---- Flow events (ADR 0024) ----
//
// One event per new connection (connect(), or a TCP SYN received) and per first datagram of
// a (socket, peer) pair, never per packet. A full ring drops the event and counts it
// (STAT_FLOWS_LOST): connect() never waits for the reader.

// flow_event.verdict
#define FLOW_FORWARDED 1
#define FLOW_NO_BACKEND 2
#define FLOW_DENIED_POLICY 3
#define FLOW_DENIED_DEFAULT 4

// flow_event.flags
#define FLOWF_SERVICE 1   // the address called was a service frontend
#define FLOWF_NEXT_TIER 2 // the backend is in a later tier while tier 0 has backends
#define FLOWF_SUSPECT 4   // nothing usable: a suspect backend was tried
#define FLOWF_ENFORCED 8  // policy enforces this direction for the local endpoint
#define FLOWF_RULE 16     // `rule` names the policy rule that decided

// Unread bytes in CM_FLOWS above which a new event wakes the reader (a quarter of the ring).
#define FLOW_WAKEUP_BYTES (1024 * 1024)

struct flow_event {
	__u64 ts;               // bpf_ktime_get_ns()
	__u64 cgroup;           // the local side's cgroup (the caller at egress, the receiver at ingress)
	__u64 cookie;           // socket cookie
	__u8 orig[16];          // egress: the address called; ingress: the local address
	__u8 peer[16];          // egress: where it goes (the backend); ingress: the source
	__u16 orig_port;        // network order
	__u16 peer_port;        // network order
	__u32 local_identity;   // 0: the cgroup is no endpoint
	__u32 remote_identity;  // of `peer` when policy decided (WORLD when unknown); else 0: the agent resolves it
	__u32 backend_id;       // 0: no backend
	__u32 rule;             // with FLOWF_RULE: the agent's index of the deciding rule
	__u16 remote_cluster;
	__u8 family;            // FAMILY_*; addresses are IPv4-mapped for IPv4
	__u8 proto;
	__u8 dir;               // DIR_*
	__u8 verdict;           // FLOW_*
	__u8 tier;
	__u8 flags;             // FLOWF_*
};

// What one call learnt for its flow event.
struct flow_info {
	__u64 cgroup;
	__u32 local_id;
	__u32 remote_id;
	__u32 rule;
	__u32 bid;
	__u16 cluster;
	__u8 tier;
	__u8 flags;
	__u8 verdict;
	__u8 emit;
	__u16 pad;
};

struct flow_seen_key {
	__u64 cookie;
	__u8 addr[16]; // IPv4-mapped for IPv4
	__u16 port;    // network order
	__u8 dir;
	__u8 pad;
	__u32 pad2;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 * 1024 * 1024);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_FLOWS SEC(".maps");

// UDP (socket, peer, direction) pairs already reported: later datagrams are not events.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_seen_key);
	__type(value, __u8);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_FLOW_SEEN SEC(".maps");

static __always_inline void count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&CM_STATS, &stat);
	if (n)
		*n += 1;
}

static __always_inline void emit(__u32 id, const struct backend *be, __u8 reason, __u64 now)
{
	struct health_event *ev = bpf_ringbuf_reserve(&CM_HEALTH_EVENTS, sizeof(*ev), 0);
	if (!ev) {
		// Never back-pressure: the agent's sweep and the quarantine cover a lost event.
		count(STAT_EVENTS_LOST);
		return;
	}
	ev->ts = now;
	ev->backend_id = id;
	ev->reason = reason;
	ev->family = be->family;
	ev->port = be->port;
	__builtin_memcpy(ev->addr, be->addr, 16);
	bpf_ringbuf_submit(ev, 0);
}

// Backend choice: the random first slot is tried inline; the search over the rest of a range
// of a tier's slots runs in bpf_loop(), so the verifier checks one iteration instead of every
// path through 256 of them.
struct pick_ctx {
	const struct svc_val *svc;
	struct backend *found_be; // the usable backend found
	__u64 now;      // the clock, read only when a suspect backend is met
	__u32 tier;
	__u32 base;     // first slot of the range
	__u32 n;        // slots in the range
	__u32 start;    // random offset into the range
	__u32 found;    // its ID
	__u32 spare;    // the first suspect backend's ID, tried when nothing else is usable
	__u32 spare_tier;
	__u8 has_found;
	__u8 has_spare;
};

// Slot `off` of the range: 1 when its backend is usable (recorded in `c`).
static __always_inline long try_slot(struct pick_ctx *c, __u32 off)
{
	__u32 slot = c->base + off;
	__u32 tier = c->tier;
	__u32 bid;
	if (c->svc->count[tier & 1] <= INLINE_SLOTS) {
		if (slot >= INLINE_SLOTS)
			return 0;
		bid = c->svc->slot[tier & 1][slot];
	} else {
		struct slot_key sk = { .svc_id = c->svc->id, .tier = (__u16)tier, .slot = (__u16)slot };
		__u32 *id = bpf_map_lookup_elem(&CM_SLOTS, &sk);
		if (!id)
			return 0;
		bid = *id;
	}
	struct backend *be = bpf_map_lookup_elem(&CM_BACKENDS, &bid);
	if (!be || !(be->state & BACKEND_ACTIVE))
		return 0;
	__u64 until = be->suspect_until;
	if (until) {
		if (!c->now)
			c->now = bpf_ktime_get_ns();
		if (c->now < until) {
			if (!c->has_spare) {
				c->spare = bid;
				c->spare_tier = tier;
				c->has_spare = 1;
			}
			return 0;
		}
	}
	c->found = bid;
	c->found_be = be;
	c->has_found = 1;
	return 1;
}

// bpf_loop() step i: the slot i after the random first one.
static long pick_slot(__u32 i, void *data)
{
	struct pick_ctx *c = data;
	__u32 off = c->start + i + 1;
	if (off >= c->n)
		off -= c->n;
	return try_slot(c, off);
}

// Looks for a usable backend in slots [base, base + len) of `tier`, from a random offset.
static __always_inline int scan(struct pick_ctx *c, __u32 tier, __u32 base, __u32 len)
{
	if (len == 0 || len > MAX_TIER_SLOTS)
		return 0;
	c->tier = tier;
	c->base = base;
	c->n = len;
	c->start = bpf_get_prandom_u32() % len;
	if (try_slot(c, c->start))
		return 1;
	if (len > 1)
		bpf_loop(len - 1, pick_slot, c, 0);
	return c->has_found;
}

// Draws one of `count` (at most `max`) groups by weight among those with a healthy backend
// (a dead cluster's weight goes to the others): its slot range, checked against the tier's
// `n` slots. Returns 0 when no group qualifies.
static __always_inline int draw_group(const struct group *g, __u32 count, __u32 total,
				      const int max, __u32 n, __u32 *base, __u32 *len)
{
	if (!total) {
		for (int i = 0; i < max; i++) {
			if (i < count && g[i].healthy)
				total += g[i].weight;
		}
	}
	if (!total)
		return 0;
	__u32 r = bpf_get_prandom_u32() % total;
	for (int i = 0; i < max; i++) {
		if (i >= count)
			break;
		__u32 w = g[i].healthy ? g[i].weight : 0;
		if (r < w) {
			__u32 start = g[i].start, l = g[i].len;
			if (l == 0 || start + l > n)
				return 0;
			*base = start;
			*len = l;
			return 1;
		}
		r -= w;
	}
	return 0;
}

// A weighted tier (only tier 0 ever is): its groups from the service's value or CM_GROUPS.
static __always_inline int weighted_range(const struct svc_val *svc, __u32 tier, __u32 n,
					  __u32 *base, __u32 *len)
{
	if (tier)
		return 0;
	if (svc->flags & SVC_GROUPS_INLINE) {
		const struct groups_inline *gi = (const struct groups_inline *)svc->slot[1];
		return draw_group(gi->g, gi->n, gi->total, INLINE_GROUPS, n, base, len);
	}
	__u32 idx = svc->group;
	struct groups_val *gv = bpf_map_lookup_elem(&CM_GROUPS, &idx);
	if (!gv)
		return 0;
	return draw_group(gv->g, gv->n, gv->total, MAX_GROUPS, n, base, len);
}

// Whether tier 0 hands this connection to the next tier: below the minimum of healthy
// backends always; else with probability 1 - min(1, healthy/n x factor) (spill-over).
static __always_inline int spills(const struct svc_val *svc, __u32 n)
{
	__u32 h = svc->healthy[0];
	if (h < svc->min_healthy)
		return 1;
	if (!svc->overprov_pct)
		return 0;
	__u64 share = (__u64)h * svc->overprov_pct * 100 / n; // basis points
	if (share >= 10000)
		return 0;
	return bpf_get_prandom_u32() % 10000 >= share;
}

// One tier: a cluster group drawn by weight when the tier is weighted (the whole tier when
// that group has nothing usable right now), else the whole tier.
static __always_inline int try_tier(const struct svc_val *svc, struct pick_ctx *c, __u32 tier,
				    __u32 n)
{
	__u32 base = 0, len = n;
	if ((svc->flags & SVC_WEIGHTED) && weighted_range(svc, tier, n, &base, &len) &&
	    scan(c, tier, base, len))
		return 1;
	return scan(c, tier, 0, n);
}

// Pass 1 honours spill-over and weights; when it finds nothing usable (the tier spilled to
// is dead too, the agent's counts lag the kernel), pass 2 takes tier 0 after all; when
// nothing is usable, a suspect backend; else none.
static __always_inline struct backend *pick(const struct svc_val *svc, struct flow_info *fi)
{
	struct pick_ctx c = {};
	c.svc = svc;
	__u32 n0 = svc->count[0], n1 = svc->count[1];
	if (n0 > MAX_TIER_SLOTS)
		n0 = MAX_TIER_SLOTS;
	if (n1 > MAX_TIER_SLOTS)
		n1 = MAX_TIER_SLOTS;
	// Tier 1's inline slots hold the groups: no tier 1 (the agent never writes one).
	if (svc->flags & SVC_GROUPS_INLINE)
		n1 = 0;
	int found = (n0 && !(n1 && spills(svc, n0)) && try_tier(svc, &c, 0, n0)) ||
		    (n1 && try_tier(svc, &c, 1, n1)) || (n0 && scan(&c, 0, 0, n0));
	__u32 id;
	if (found) {
		fi->bid = c.found;
		fi->tier = (__u8)c.tier;
		if (c.tier && n0)
			fi->flags |= FLOWF_NEXT_TIER;
		return c.found_be;
	} else if (c.has_spare) {
		id = c.spare;
		fi->bid = id;
		fi->tier = (__u8)c.spare_tier;
		fi->flags |= FLOWF_SUSPECT | (c.spare_tier && n0 ? FLOWF_NEXT_TIER : 0);
		count(STAT_SUSPECT_TRIED);
	} else {
		count(STAT_NO_BACKEND);
		return 0;
	}
	return bpf_map_lookup_elem(&CM_BACKENDS, &id);
}

static __always_inline void copy_addr(struct sockaddr_cm *dst, const __u8 *addr, __u16 port,
				      __u8 family)
{
	__builtin_memcpy(dst->addr, addr, 16);
	dst->port = port;
	dst->family = family;
	dst->pad = 0;
	dst->pad2 = 0;
}

static __always_inline int same_addr(const struct sockaddr_cm *a, const __u8 *addr, __u16 port,
				     __u8 family)
{
	if (a->port != port || a->family != family)
		return 0;
	const __u64 *x = (const __u64 *)a->addr;
	__u64 y0, y1;
	__builtin_memcpy(&y0, addr, 8);
	__builtin_memcpy(&y1, addr + 8, 8);
	return x[0] == y0 && x[1] == y1;
}

// Records the translation on the socket. `revnat`: an unconnected UDP send, which also needs
// the reverse-NAT map because the socket may talk to several backends.
static __always_inline void remember(struct bpf_sock_addr *ctx, const struct backend *be,
				     __u32 bid, const struct svc_key *key, int revnat, __u32 cflags)
{
	if (!revnat && ctx->protocol == IPPROTO_TCP) {
		if (cflags & CFG_NO_PEER_REWRITE)
			return;
		if (be->state & BACKEND_ONE_FRONTEND) {
			// Handed to cm_sockops, which marks the socket at TCP_CONNECT_CB in the
			// same connect() call (bpf_setsockopt() here cost ~150 ns).
			__u64 cookie = bpf_get_socket_cookie(ctx);
			__u32 slot = (__u32)cookie & (HANDOFF_SLOTS - 1);
			struct handoff *h = bpf_map_lookup_elem(&CM_HANDOFF, &slot);
			if (h) {
				h->cookie = cookie;
				h->backend_id = bid;
				return;
			}
		}
	}
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return;
	struct sock_state *st = bpf_sk_storage_get(&CM_SOCKS, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return;
	int known = (st->flags & SOCK_REVNAT) && same_addr(&st->be, be->addr, be->port, be->family) &&
		    same_addr(&st->svc, key->addr, key->port, key->family);
	copy_addr(&st->svc, key->addr, key->port, key->family);
	copy_addr(&st->be, be->addr, be->port, be->family);
	if (!revnat) {
		st->flags = SOCK_TRANSLATED;
		return;
	}
	st->flags |= SOCK_REVNAT;
	if (known)
		return;
	struct revnat_key rk = {};
	struct revnat_val rv = {};
	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.addr, be->addr, 16);
	rk.port = be->port;
	rk.family = be->family;
	__builtin_memcpy(rv.addr, key->addr, 16);
	rv.port = key->port;
	rv.family = key->family;
	bpf_map_update_elem(&CM_REVNAT, &rk, &rv, BPF_ANY);
}

// The identity and cluster ID of an address (IPv4-mapped for IPv4); WORLD when unknown.
static __always_inline __u32 identity_of(const __u8 *addr16, __u16 *cluster)
{
	struct ipcache_key_host k;
	__builtin_memcpy(k.addr, addr16, 16);
	struct ipcache_val *v = bpf_map_lookup_elem(&CM_IPCACHE_HOSTS, &k);
	if (!v) {
		*cluster = 0;
		return IDENTITY_WORLD;
	}
	*cluster = v->cluster_id;
	return v->identity;
}

static __always_inline void v4_mapped(__u8 *addr16, __u32 ip)
{
	__builtin_memset(addr16, 0, 10);
	addr16[10] = 0xff;
	addr16[11] = 0xff;
	__builtin_memcpy(addr16 + 12, &ip, 4);
}

// The port set ID of (local, remote, dir, proto); 0: none.
static __always_inline __u32 policy_set(__u32 local, __u8 dir, __u8 proto, __u32 remote)
{
	struct policy_key k = { .local = local, .remote = remote, .dir = dir, .proto = proto };
	__u32 *sid = bpf_map_lookup_elem(&CM_POLICY, &k);
	return sid ? *sid : 0;
}

// The verdict (VERDICT_*, 0: none) of port set `id` for `port` (host order).
static __always_inline __u8 port_verdict(__u32 id, __u16 port, __u32 *rule)
{
	if (!id)
		return 0;
	struct port_set *set = bpf_map_lookup_elem(&CM_POLICY_SETS, &id);
	if (!set)
		return 0;
	__u32 n = set->n;
	for (int i = 0; i < MAX_PORT_RANGES; i++) {
		if (i >= n)
			break;
		if (port >= set->r[i].lo && port <= set->r[i].hi) {
			*rule = set->r[i].rule;
			return set->r[i].verdict;
		}
	}
	return 0;
}

#define barrier() asm volatile("" ::: "memory")

// The 64-bit finaliser of MurmurHash3: every input bit reaches every output bit.
static __always_inline __u64 mix64(__u64 h)
{
	h ^= h >> 33;
	h *= 0xFF51AFD7ED558CCDULL;
	h ^= h >> 33;
	h *= 0xC4CEB9FE1A85EC53ULL;
	h ^= h >> 33;
	return h;
}

// The bucket of a verdict-cache key: its words mixed in one after another from the agent's
// random seed (addresses that differ in one byte spread over the table; without the seed a
// peer could pick addresses that all land in one bucket).
static __always_inline __u32 verdict_bucket(__u64 seed, __u32 local, __u8 dir, __u8 proto,
					    const __u8 *addr16, __u16 port)
{
	__u64 a, b;
	__builtin_memcpy(&a, addr16, 8);
	__builtin_memcpy(&b, addr16 + 8, 8);
	__u64 h = mix64(seed ^ a);
	h = mix64(h ^ b);
	h = mix64(h ^ ((__u64)local << 32 | (__u64)port << 16 | (__u64)dir << 8 | proto));
	return (__u32)h & (VERDICT_BUCKETS - 1);
}

// Slot `idx` when it holds the key at generation `gen`, read consistently: 1 with the
// verdict in `out`/`fi`.
static __always_inline int verdict_hit(__u32 idx, __u32 local, __u8 dir, __u8 proto,
				       const __u8 *addr16, __u16 port, __u64 gen, int *out,
				       struct flow_info *fi)
{
	struct verdict_slot *s = bpf_map_lookup_elem(&CM_VERDICTS, &idx);
	if (!s)
		return 0;
	__u32 seq = *(volatile __u32 *)&s->seq;
	if (seq & 1)
		return 0;
	barrier();
	__u64 a, b, x0, x1;
	__builtin_memcpy(&a, addr16, 8);
	__builtin_memcpy(&b, addr16 + 8, 8);
	__builtin_memcpy(&x0, s->addr, 8);
	__builtin_memcpy(&x1, s->addr + 8, 8);
	int match = s->gen == gen && s->local == local && s->port == port && s->dir == dir &&
		    s->proto == proto && x0 == a && x1 == b;
	__u32 remote = s->remote, rule = s->rule;
	__u16 cluster = s->cluster;
	__u8 o = s->out, flags = s->flags;
	barrier();
	if (!match || *(volatile __u32 *)&s->seq != seq)
		return 0;
	*out = o;
	fi->remote_id = remote;
	fi->cluster = cluster;
	fi->rule = rule;
	fi->flags |= flags & FLOWF_RULE;
	return 1;
}

// The way of bucket `idx` to replace: one holding nothing current, else either.
static __always_inline __u32 verdict_way(__u32 idx, __u64 gen)
{
	struct verdict_slot *s = bpf_map_lookup_elem(&CM_VERDICTS, &idx);
	if (s && s->gen != gen)
		return 0;
	__u32 next = idx + 1;
	s = bpf_map_lookup_elem(&CM_VERDICTS, &next);
	if (s && s->gen != gen)
		return 1;
	return bpf_get_prandom_u32() & 1;
}

// Records a verdict in slot `idx`, unless another program is writing it.
static __always_inline void verdict_store(__u32 idx, __u32 local, __u8 dir, __u8 proto,
					  const __u8 *addr16, __u16 port, __u64 gen, int out,
					  const struct flow_info *fi)
{
	struct verdict_slot *s = bpf_map_lookup_elem(&CM_VERDICTS, &idx);
	if (!s)
		return;
	__u32 seq = *(volatile __u32 *)&s->seq;
	if (seq & 1)
		return;
	if (__sync_val_compare_and_swap(&s->seq, seq, seq + 1) != seq)
		return;
	barrier();
	s->local = local;
	s->remote = fi->remote_id;
	s->rule = fi->rule;
	__builtin_memcpy(s->addr, addr16, 16);
	s->gen = gen;
	s->port = port;
	s->cluster = fi->cluster;
	s->dir = dir;
	s->proto = proto;
	s->out = (__u8)out;
	s->flags = fi->flags & FLOWF_RULE;
	barrier();
	__sync_fetch_and_add(&s->seq, 1);
}

// The verdict for a new connection or first datagram of `local` (an enforced direction) with
// the peer at addr16:port: a deny for this peer or for any peer wins; else an allow for
// either; else default deny. From the verdict cache while its generation is current, else
// looked up (IP cache, policy map, port sets) and cached. Counted per direction and peer
// cluster. Returns OUT_*; the peer's identity and cluster and the deciding rule go to `fi`.
static __always_inline int decide(__u32 local, __u8 dir, __u8 proto, const __u8 *addr16,
				  __u16 port, struct flow_info *fi)
{
	__u32 zero = 0;
	__u64 *genp = bpf_map_lookup_elem(&CM_POLICY_GEN, &zero);
	__u64 gen = genp ? *genp : 0;
	__u32 seed_idx = GEN_SEED;
	__u64 *seedp = bpf_map_lookup_elem(&CM_POLICY_GEN, &seed_idx);
	__u32 bucket = verdict_bucket(seedp ? *seedp : 0, local, dir, proto, addr16, port);
	__u32 idx = bucket * VERDICT_WAYS;
	int out;
	if (genp && (verdict_hit(idx, local, dir, proto, addr16, port, gen, &out, fi) ||
		     verdict_hit(idx + 1, local, dir, proto, addr16, port, gen, &out, fi)))
		goto count;
	// The generation was read first: a change completed after it makes this entry stale.
	__u16 cluster;
	__u32 remote = identity_of(addr16, &cluster);
	fi->remote_id = remote;
	fi->cluster = cluster;
	__u16 p = bpf_ntohs(port);
	__u32 ra = 0, rb = 0;
	__u8 va = port_verdict(policy_set(local, dir, proto, remote), p, &ra);
	__u8 vb = port_verdict(policy_set(local, dir, proto, 0), p, &rb);
	if (va == VERDICT_DENY || vb == VERDICT_DENY) {
		out = OUT_DENIED_POLICY;
		fi->rule = va == VERDICT_DENY ? ra : rb;
		fi->flags |= FLOWF_RULE;
	} else if (va == VERDICT_ALLOW || vb == VERDICT_ALLOW) {
		out = OUT_ALLOWED;
		fi->rule = va == VERDICT_ALLOW ? ra : rb;
		fi->flags |= FLOWF_RULE;
	} else {
		out = OUT_DENIED_DEFAULT;
	}
	if (genp)
		verdict_store(idx + verdict_way(idx, gen), local, dir, proto, addr16, port, gen, out,
			      fi);
count:;
	__u32 si = ((__u32)(fi->cluster & MAX_CLUSTER_ID) * 2 + dir) * OUTCOMES + out;
	__u64 *n = bpf_map_lookup_elem(&CM_POLICY_STATS, &si);
	if (n)
		*n += 1;
	return out;
}

// The flow verdict of a policy outcome.
static __always_inline __u8 flow_verdict(int out)
{
	if (out == OUT_DENIED_POLICY)
		return FLOW_DENIED_POLICY;
	if (out == OUT_DENIED_DEFAULT)
		return FLOW_DENIED_DEFAULT;
	return FLOW_FORWARDED;
}

// Whether this is the first datagram of (socket, peer, direction) seen: later ones are no
// new flow.
static __always_inline int first_datagram(__u64 cookie, const __u8 *addr16, __u16 port, __u8 dir)
{
	struct flow_seen_key k = {};
	k.cookie = cookie;
	__builtin_memcpy(k.addr, addr16, 16);
	k.port = port;
	k.dir = dir;
	if (bpf_map_lookup_elem(&CM_FLOW_SEEN, &k))
		return 0;
	__u8 one = 1;
	bpf_map_update_elem(&CM_FLOW_SEEN, &k, &one, BPF_ANY);
	return 1;
}

// Reports one flow (CM_FLOWS); a full ring drops it, counted.
static __always_inline void flow_emit(const struct flow_info *fi, __u64 cookie, __u8 dir,
				      __u8 family, __u8 proto, const __u8 *orig, __u16 orig_port,
				      const __u8 *peer, __u16 peer_port)
{
	struct flow_event *ev = bpf_ringbuf_reserve(&CM_FLOWS, sizeof(*ev), 0);
	if (!ev) {
		count(STAT_FLOWS_LOST);
		return;
	}
	ev->ts = bpf_ktime_get_ns();
	ev->cgroup = fi->cgroup;
	ev->cookie = cookie;
	__builtin_memcpy(ev->orig, orig, 16);
	__builtin_memcpy(ev->peer, peer, 16);
	ev->orig_port = orig_port;
	ev->peer_port = peer_port;
	ev->local_identity = fi->local_id;
	ev->remote_identity = fi->remote_id;
	ev->backend_id = fi->bid;
	ev->rule = fi->rule;
	ev->remote_cluster = fi->cluster;
	ev->family = family;
	ev->proto = proto;
	ev->dir = dir;
	ev->verdict = fi->verdict;
	ev->tier = fi->tier;
	ev->flags = fi->flags;
	// No wakeup per event (10,000 a second would cost the callers): the reader drains the
	// ring on its own clock, and is woken only when the ring fills up.
	__u64 wake = bpf_ringbuf_query(&CM_FLOWS, BPF_RB_AVAIL_DATA) > FLOW_WAKEUP_BYTES ?
			     BPF_RB_FORCE_WAKEUP :
			     BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(ev, wake);
}

// Egress policy and flow bookkeeping of the calling endpoint for a connection or datagram to
// addr16:port (after service translation): 1 to let it go. Fills `fi` and sets `fi->emit`
// when the call is a flow to report. An unconnected UDP send of an endpoint with ingress
// policy also records the flow, so that the peer's replies are let in.
static __always_inline int egress(struct bpf_sock_addr *ctx, const __u8 *addr16, __u16 port,
				  int unconnected_udp, __u32 cflags, struct flow_info *fi)
{
	if (!(cflags & (CFG_POLICY | CFG_FLOWS)))
		return 1;
	__u64 cg = bpf_get_current_cgroup_id();
	struct endpoint *ep = bpf_map_lookup_elem(&CM_ENDPOINTS, &cg);
	int enforced = ep && (cflags & CFG_POLICY) && (ep->flags & EP_EGRESS);
	int flows = (cflags & CFG_FLOWS) && (ep || (fi->flags & FLOWF_SERVICE));
	__u64 cookie = 0;
	if (unconnected_udp && (flows || (ep && (cflags & CFG_POLICY))))
		cookie = bpf_get_socket_cookie(ctx);
	if (flows && unconnected_udp && !first_datagram(cookie, addr16, port, DIR_EGRESS))
		flows = 0;
	__u8 proto = (__u8)ctx->protocol;
	if (enforced || flows) {
		fi->cgroup = cg;
		fi->local_id = ep ? ep->identity : 0;
		int out = OUT_ALLOWED;
		// The peer's identity is looked up only to decide policy; a flow alone leaves it
		// to the agent (remote_id 0), which knows every address's identity: a cold lookup
		// fewer per connect.
		if (enforced) {
			fi->flags |= FLOWF_ENFORCED;
			out = decide(fi->local_id, DIR_EGRESS, proto, addr16, port, fi);
		}
		fi->verdict = flow_verdict(out);
		fi->emit = flows;
		if (out != OUT_ALLOWED)
			return 0;
	}
	if (unconnected_udp && ep && (cflags & CFG_POLICY) && (ep->flags & EP_INGRESS)) {
		struct udp_flow_key fk = {};
		fk.cookie = cookie;
		__builtin_memcpy(fk.addr, addr16, 16);
		fk.port = port;
		__u8 one = 1;
		bpf_map_update_elem(&CM_UDP_FLOWS, &fk, &one, BPF_ANY);
	}
	return 1;
}

// A call to a service with no backend to take it: reported when flows are on.
static __always_inline void flow_no_backend(struct bpf_sock_addr *ctx, struct flow_info *fi,
					    __u32 cflags, __u8 family, const __u8 *orig,
					    __u16 orig_port)
{
	if (!(cflags & CFG_FLOWS))
		return;
	__u64 cg = bpf_get_current_cgroup_id();
	struct endpoint *ep = bpf_map_lookup_elem(&CM_ENDPOINTS, &cg);
	fi->cgroup = cg;
	fi->local_id = ep ? ep->identity : 0;
	fi->verdict = FLOW_NO_BACKEND;
	__u8 none[16] = {};
	flow_emit(fi, bpf_get_socket_cookie(ctx), DIR_EGRESS, family, (__u8)ctx->protocol, orig,
		  orig_port, none, 0);
}

// Returns 1 to let the call proceed (rewritten or not), 0 to refuse it (no usable backend,
// or policy).
static __always_inline int translate4(struct bpf_sock_addr *ctx, int revnat)
{
	struct svc_key key = {};
	__u32 ip = ctx->user_ip4;
	__builtin_memcpy(key.addr, &ip, 4);
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;
	key.family = FAMILY_V4;
	struct svc_val *svc = bpf_map_lookup_elem(&CM_SERVICES, &key);
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&CM_CONFIG, &zero);
	__u32 cflags = cfg ? cfg->flags : 0;
	struct flow_info fi = {};
	struct backend *be = 0;
	__u32 dst = ip;
	__u16 port = key.port;
	if (svc) {
		fi.flags = FLOWF_SERVICE;
		be = pick(svc, &fi);
		if (!be || be->family != FAMILY_V4) {
			__u8 orig[16];
			v4_mapped(orig, ip);
			flow_no_backend(ctx, &fi, cflags, FAMILY_V4, orig, key.port);
			return 0;
		}
		__builtin_memcpy(&dst, be->addr, 4);
		port = be->port;
	}
	__u8 addr16[16];
	v4_mapped(addr16, dst);
	int ok = egress(ctx, addr16, port, revnat && key.proto == IPPROTO_UDP, cflags, &fi);
	if (fi.emit) {
		__u8 orig[16];
		v4_mapped(orig, ip);
		flow_emit(&fi, bpf_get_socket_cookie(ctx), DIR_EGRESS, FAMILY_V4, key.proto, orig,
			  key.port, addr16, port);
	}
	if (!ok)
		return 0;
	if (!be)
		return 1;
	ctx->user_ip4 = dst;
	ctx->user_port = port;
	remember(ctx, be, fi.bid, &key, revnat, cflags);
	return 1;
}

static __always_inline int translate6(struct bpf_sock_addr *ctx, int revnat)
{
	struct svc_key key = {};
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
	__builtin_memcpy(&key.addr[0], &a0, 4);
	__builtin_memcpy(&key.addr[4], &a1, 4);
	__builtin_memcpy(&key.addr[8], &a2, 4);
	__builtin_memcpy(&key.addr[12], &a3, 4);
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;
	key.family = FAMILY_V6;
	struct svc_val *svc = bpf_map_lookup_elem(&CM_SERVICES, &key);
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&CM_CONFIG, &zero);
	__u32 cflags = cfg ? cfg->flags : 0;
	struct flow_info fi = {};
	struct backend *be = 0;
	__u16 port = key.port;
	if (svc) {
		fi.flags = FLOWF_SERVICE;
		be = pick(svc, &fi);
		if (!be || be->family != FAMILY_V6) {
			flow_no_backend(ctx, &fi, cflags, FAMILY_V6, key.addr, key.port);
			return 0;
		}
		port = be->port;
	}
	const __u8 *dst = be ? be->addr : key.addr;
	int ok = egress(ctx, dst, port, revnat && key.proto == IPPROTO_UDP, cflags, &fi);
	if (fi.emit)
		flow_emit(&fi, bpf_get_socket_cookie(ctx), DIR_EGRESS, FAMILY_V6, key.proto, key.addr,
			  key.port, dst, port);
	if (!ok)
		return 0;
	if (!be)
		return 1;
	__u32 d0, d1, d2, d3;
	__builtin_memcpy(&d0, &be->addr[0], 4);
	__builtin_memcpy(&d1, &be->addr[4], 4);
	__builtin_memcpy(&d2, &be->addr[8], 4);
	__builtin_memcpy(&d3, &be->addr[12], 4);
	ctx->user_ip6[0] = d0;
	ctx->user_ip6[1] = d1;
	ctx->user_ip6[2] = d2;
	ctx->user_ip6[3] = d3;
	ctx->user_port = port;
	remember(ctx, be, fi.bid, &key, revnat, cflags);
	return 1;
}

// A TCP socket marked at connect(): the one frontend of the backend it is connected to.
static __always_inline const struct sockaddr_cm *marked_front(struct bpf_sock_addr *ctx,
							      const __u8 *addr, __u16 port,
							      __u8 family)
{
	int flags = 0;
	if (bpf_getsockopt(ctx, SOL_TCP, TCP_BPF_SOCK_OPS_CB_FLAGS, &flags, sizeof(flags)) ||
	    !(flags & TRANSLATED_MARK))
		return 0;
	struct sockaddr_cm k = {};
	__builtin_memcpy(k.addr, addr, 16);
	k.port = port;
	k.family = family;
	struct backend_ref *ref = bpf_map_lookup_elem(&CM_BACKEND_IDS, &k);
	if (!ref || !ref->front.family)
		return 0;
	return &ref->front;
}

// The service address a reply from (addr, port) on this socket should show, or 0.
static __always_inline const struct sockaddr_cm *reverse_lookup(struct bpf_sock_addr *ctx,
								 const __u8 *addr, __u16 port,
								 __u8 family)
{
	struct bpf_sock *sk = ctx->sk;
	if (sk) {
		struct sock_state *st = bpf_sk_storage_get(&CM_SOCKS, sk, 0, 0);
		if (st && st->flags && same_addr(&st->be, addr, port, family))
			return &st->svc;
		if (!st && ctx->protocol == IPPROTO_TCP)
			return marked_front(ctx, addr, port, family);
		if (!st || !(st->flags & SOCK_REVNAT))
			return 0;
	}
	struct revnat_key rk = {};
	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.addr, addr, 16);
	rk.port = port;
	rk.family = family;
	return bpf_map_lookup_elem(&CM_REVNAT, &rk);
}

// Replies (recvmsg) and getpeername: backend address -> service address, for this socket.
static __always_inline int reverse4(struct bpf_sock_addr *ctx)
{
	__u8 addr[16] = {};
	__u32 ip = ctx->user_ip4;
	__builtin_memcpy(addr, &ip, 4);
	const struct sockaddr_cm *svc = reverse_lookup(ctx, addr, (__u16)ctx->user_port, FAMILY_V4);
	if (svc && svc->family == FAMILY_V4) {
		__u32 src;
		__builtin_memcpy(&src, svc->addr, 4);
		ctx->user_ip4 = src;
		ctx->user_port = svc->port;
	}
	return 1;
}

static __always_inline int reverse6(struct bpf_sock_addr *ctx)
{
	__u8 addr[16];
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
	__builtin_memcpy(&addr[0], &a0, 4);
	__builtin_memcpy(&addr[4], &a1, 4);
	__builtin_memcpy(&addr[8], &a2, 4);
	__builtin_memcpy(&addr[12], &a3, 4);
	const struct sockaddr_cm *svc = reverse_lookup(ctx, addr, (__u16)ctx->user_port, FAMILY_V6);
	if (svc && svc->family == FAMILY_V6) {
		__u32 s0, s1, s2, s3;
		__builtin_memcpy(&s0, &svc->addr[0], 4);
		__builtin_memcpy(&s1, &svc->addr[4], 4);
		__builtin_memcpy(&s2, &svc->addr[8], 4);
		__builtin_memcpy(&s3, &svc->addr[12], 4);
		ctx->user_ip6[0] = s0;
		ctx->user_ip6[1] = s1;
		ctx->user_ip6[2] = s2;
		ctx->user_ip6[3] = s3;
		ctx->user_port = svc->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int cm_connect4(struct bpf_sock_addr *ctx) { return translate4(ctx, 0); }

SEC("cgroup/connect6")
int cm_connect6(struct bpf_sock_addr *ctx) { return translate6(ctx, 0); }

SEC("cgroup/sendmsg4")
int cm_sendmsg4(struct bpf_sock_addr *ctx) { return translate4(ctx, 1); }

SEC("cgroup/sendmsg6")
int cm_sendmsg6(struct bpf_sock_addr *ctx) { return translate6(ctx, 1); }

SEC("cgroup/recvmsg4")
int cm_recvmsg4(struct bpf_sock_addr *ctx) { return reverse4(ctx); }

SEC("cgroup/recvmsg6")
int cm_recvmsg6(struct bpf_sock_addr *ctx) { return reverse6(ctx); }

SEC("cgroup/getpeername4")
int cm_getpeername4(struct bpf_sock_addr *ctx) { return reverse4(ctx); }

SEC("cgroup/getpeername6")
int cm_getpeername6(struct bpf_sock_addr *ctx) { return reverse6(ctx); }

// The backend a TCP connection goes to, from its remote address (sock_ops sees only the
// translated address): its ID, or 0 when the address is no backend's.
static __always_inline int remote_backend(struct bpf_sock_ops *skops, struct sockaddr_cm *kp,
					  __u32 *id)
{
	struct sockaddr_cm k = {};
	k.port = bpf_htons((__u16)bpf_ntohl(skops->remote_port));
	if (skops->family == AF_INET) {
		__u32 ip = skops->remote_ip4;
		__builtin_memcpy(k.addr, &ip, 4);
		k.family = FAMILY_V4;
	} else if (skops->family == AF_INET6) {
		// One 4-byte context read each (the verifier refuses merged 8-byte reads).
		__u32 a0 = *(volatile __u32 *)&skops->remote_ip6[0];
		__u32 a1 = *(volatile __u32 *)&skops->remote_ip6[1];
		__u32 a2 = *(volatile __u32 *)&skops->remote_ip6[2];
		__u32 a3 = *(volatile __u32 *)&skops->remote_ip6[3];
		__builtin_memcpy(&k.addr[0], &a0, 4);
		__builtin_memcpy(&k.addr[4], &a1, 4);
		__builtin_memcpy(&k.addr[8], &a2, 4);
		__builtin_memcpy(&k.addr[12], &a3, 4);
		k.family = FAMILY_V6;
	} else {
		return 0;
	}
	struct backend_ref *v = bpf_map_lookup_elem(&CM_BACKEND_IDS, &k);
	if (!v)
		return 0;
	*id = v->id;
	*kp = k;
	return 1;
}

// Passive health: the outcome of every TCP connection from this cgroup to a backend's address
// (through a service, or straight to the backend: either is evidence about it).
SEC("sockops")
int cm_sockops(struct bpf_sock_ops *skops)
{
	__u32 op = skops->op;
	if (op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_TIMEOUT_INIT &&
	    op != BPF_SOCK_OPS_STATE_CB && op != BPF_SOCK_OPS_RTO_CB &&
	    op != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB)
		return 1;
	if (op == BPF_SOCK_OPS_TIMEOUT_INIT && skops->is_fullsock && skops->state != BPF_TCP_SYN_SENT)
		return 1;
	__u32 id = 0;
	struct sockaddr_cm remote;
	if (!remote_backend(skops, &remote, &id))
		return 1;
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&CM_CONFIG, &zero);
	if (op == BPF_SOCK_OPS_TIMEOUT_INIT) {
		// Re-invoked from the RTO timer: a pure function of the socket.
		if (cfg && cfg->syn_rto_jiffies)
			skops->reply = cfg->syn_rto_jiffies;
		return 1;
	}
	if (op == BPF_SOCK_OPS_TCP_CONNECT_CB) {
		// The translation mark, when connect() handed this socket over for this backend;
		// a mark from an earlier connection of the socket (disconnected, reconnected
		// elsewhere) is not kept.
		__u64 cookie = bpf_get_socket_cookie(skops);
		__u32 slot = (__u32)cookie & (HANDOFF_SLOTS - 1);
		struct handoff *h = bpf_map_lookup_elem(&CM_HANDOFF, &slot);
		__u32 mark = 0;
		if (h && h->cookie == cookie) {
			if (h->backend_id == id)
				mark = TRANSLATED_MARK;
			h->cookie = 0;
		}
		bpf_sock_ops_cb_flags_set(skops, mark | BPF_SOCK_OPS_STATE_CB_FLAG |
							 BPF_SOCK_OPS_RTO_CB_FLAG);
		return 1;
	}
	struct backend *be = bpf_map_lookup_elem(&CM_BACKENDS, &id);
	// The ID still that address's (IDs are reused, long after, for other backends).
	if (!be || !same_addr(&remote, be->addr, be->port, be->family))
		return 1;
	__u64 now = bpf_ktime_get_ns();
	if (op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
		// Done watching this connection; a success clears a suspicion.
		bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags & TRANSLATED_MARK);
		if (be->suspect_until) {
			be->suspect_until = 0;
			count(STAT_CLEARED);
			emit(id, be, CLEARED_ESTABLISHED, now);
		}
		return 1;
	}
	__u8 reason;
	if (op == BPF_SOCK_OPS_STATE_CB) {
		if (skops->args[0] != BPF_TCP_SYN_SENT || skops->args[1] != BPF_TCP_CLOSE)
			return 1;
		reason = SUSPECT_REFUSED;
	} else {
		// RTO_CB
		if (skops->state != BPF_TCP_SYN_SENT)
			return 1;
		reason = SUSPECT_SYN_TIMEOUT;
	}
	if (be->suspect_until > now)
		return 1;
	__u64 quarantine = cfg ? cfg->quarantine_ns : 0;
	if (!quarantine)
		quarantine = 10ULL * 1000 * 1000 * 1000;
	be->suspect_until = now + quarantine;
	count(STAT_SUSPECTS);
	emit(id, be, reason, now);
	return 1;
}

// Ingress policy and flow events of the receiving endpoint (the socket's cgroup), for new TCP
// connections (a SYN without ACK: every later packet belongs to a connection already decided,
// and a reply to a connection the endpoint opened is never a SYN without ACK) and UDP
// datagrams (except on a connected socket and the replies to an unconnected socket's own
// sends). Other protocols (ICMP, needed for path MTU and IPv6 neighbour discovery) and
// non-first IPv4 fragments pass. Returns 1 to deliver.
SEC("cgroup_skb/ingress")
int cm_ingress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct config *cfg = bpf_map_lookup_elem(&CM_CONFIG, &zero);
	if (!cfg || !(cfg->flags & (CFG_POLICY | CFG_FLOWS)))
		return 1;
	__u32 cflags = cfg->flags;
	__u64 cg = bpf_skb_cgroup_id(skb);
	struct endpoint *ep = bpf_map_lookup_elem(&CM_ENDPOINTS, &cg);
	if (!ep)
		return 1;
	int enforced = (cflags & CFG_POLICY) && (ep->flags & EP_INGRESS);
	int flows = cflags & CFG_FLOWS;
	if (!enforced && !flows)
		return 1;
	// A packet that cannot be parsed is dropped only where policy is enforced.
	int unparsed = enforced ? 0 : 1;
	__u8 addr16[16];
	__u8 local16[16];
	__u8 family;
	__u8 proto;
	__u32 l4;
	if (skb->protocol == bpf_htons(0x0800)) {
		__u8 h[20];
		if (bpf_skb_load_bytes(skb, 0, h, 20))
			return unparsed;
		if ((h[6] & 0x1f) || h[7]) // fragment offset: not the first fragment
			return 1;
		proto = h[9];
		l4 = (h[0] & 0xf) * 4;
		__u32 src, dst;
		__builtin_memcpy(&src, &h[12], 4);
		__builtin_memcpy(&dst, &h[16], 4);
		v4_mapped(addr16, src);
		v4_mapped(local16, dst);
		family = FAMILY_V4;
	} else if (skb->protocol == bpf_htons(0x86DD)) {
		__u8 h[40];
		if (bpf_skb_load_bytes(skb, 0, h, 40))
			return unparsed;
		proto = h[6];
		if (proto == 58) // ICMPv6
			return 1;
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
			return unparsed; // extension headers: not parsed, so not let through an enforced endpoint
		l4 = 40;
		__builtin_memcpy(addr16, &h[8], 16);
		__builtin_memcpy(local16, &h[24], 16);
		family = FAMILY_V6;
	} else {
		return 1;
	}
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
		return 1;
	__u8 ports[14];
	if (bpf_skb_load_bytes(skb, l4, ports, proto == IPPROTO_TCP ? 14 : 4))
		return unparsed;
	__u16 sport, dport;
	__builtin_memcpy(&sport, &ports[0], 2);
	__builtin_memcpy(&dport, &ports[2], 2);
	__u64 cookie = 0;
	if (proto == IPPROTO_TCP) {
		__u8 tflags = ports[13];
		if (!(tflags & 0x02) || (tflags & 0x10)) // not SYN, or SYN-ACK
			return 1;
		if (flows)
			cookie = bpf_get_socket_cookie(skb);
	} else {
		struct bpf_sock *sk = skb->sk;
		if (sk) {
			sk = bpf_sk_fullsock(sk);
			if (sk && sk->state == 1) // a connected UDP socket: its own peer
				return 1;
		}
		cookie = bpf_get_socket_cookie(skb);
		if (enforced) {
			struct udp_flow_key fk = {};
			fk.cookie = cookie;
			__builtin_memcpy(fk.addr, addr16, 16);
			fk.port = sport;
			if (bpf_map_lookup_elem(&CM_UDP_FLOWS, &fk))
				return 1;
		}
		if (flows && !first_datagram(cookie, addr16, sport, DIR_INGRESS))
			flows = 0;
		if (!enforced && !flows)
			return 1;
	}
	struct flow_info fi = {};
	fi.cgroup = cg;
	fi.local_id = ep->identity;
	int out = OUT_ALLOWED;
	if (enforced) {
		fi.flags |= FLOWF_ENFORCED;
		out = decide(fi.local_id, DIR_INGRESS, proto, addr16, dport, &fi);
	}
	if (flows) {
		fi.verdict = flow_verdict(out);
		flow_emit(&fi, cookie, DIR_INGRESS, family, proto, local16, dport, addr16, sport);
	}
	return out == OUT_ALLOWED;
}

// A socket goes away: its socket storage goes with it; an unconnected UDP socket's last
// reverse-NAT entry is removed here (older ones age out of the LRU map).
SEC("cgroup/sock_release")
int cm_release(struct bpf_sock *ctx)
{
	struct sock_state *st = bpf_sk_storage_get(&CM_SOCKS, ctx, 0, 0);
	if (!st || !(st->flags & SOCK_REVNAT))
		return 1;
	struct revnat_key rk = {};
	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.addr, st->be.addr, 16);
	rk.port = st->be.port;
	rk.family = st->be.family;
	bpf_map_delete_elem(&CM_REVNAT, &rk);
	return 1;
}

char _license[] SEC("license") = "GPL";
