// SPDX-License-Identifier: GPL-2.0
// Socket-level load balancing for global services: the service lookup happens at connect(),
// sendmsg() and recvmsg() in the kernel, per cgroup. Loaded by node-agent (aya); the map
// layouts here and in node-agent/src/maps.rs must match byte for byte.
//
// Backend choice: random among the healthy backends of the first tier that has one. The agent
// fills the tiers from the service's affinity (local: local then remote; remote: remote then
// local; none: one tier). A backend marked unhealthy is skipped without any other update.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>

#define MAX_SERVICES 65536
#define MAX_BACKENDS 262144
#define MAX_SLOTS (MAX_BACKENDS * 2)
#define MAX_TIER_SLOTS 256
#define TIERS 2

#define FAMILY_V4 4
#define FAMILY_V6 6

#define BACKEND_ACTIVE 1

// A frontend: the service address and port (network order) and protocol.
struct svc_key {
	__u8 addr[16];   // IPv4 in the first 4 bytes, the rest zero
	__u16 port;      // network byte order
	__u8 proto;      // IPPROTO_TCP / IPPROTO_UDP
	__u8 family;     // 4 or 6
};

struct svc_val {
	__u32 id;
	__u16 count[TIERS]; // backends per tier
	__u32 flags;
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
	__u8 state;       // BACKEND_ACTIVE or 0 (unhealthy)
	__u16 cluster_id;
	__u16 zone;
};

// Reverse translation for UDP replies and getpeername: per socket, backend → service.
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

struct ipcache_val {
	__u32 identity;
	__u16 cluster_id;
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SERVICES);
	__type(key, struct svc_key);
	__type(value, struct svc_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_SERVICES SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_BACKENDS);
	__type(key, __u32);
	__type(value, struct backend);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_BACKENDS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MAX_SLOTS);
	__type(key, struct slot_key);
	__type(value, __u32);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_SLOTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 262144);
	__type(key, struct revnat_key);
	__type(value, struct revnat_val);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_REVNAT SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 524288);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_val);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} CM_IPCACHE SEC(".maps");

static __always_inline struct backend *pick(const struct svc_val *svc)
{
	for (int tier = 0; tier < TIERS; tier++) {
		__u32 n = svc->count[tier];
		if (n == 0)
			continue;
		if (n > MAX_TIER_SLOTS)
			n = MAX_TIER_SLOTS;
		__u32 start = bpf_get_prandom_u32() % n;
		for (__u32 i = 0; i < MAX_TIER_SLOTS; i++) {
			if (i >= n)
				break;
			__u32 slot = start + i;
			if (slot >= n)
				slot -= n;
			struct slot_key sk = { .svc_id = svc->id, .tier = tier, .slot = slot };
			__u32 *id = bpf_map_lookup_elem(&CM_SLOTS, &sk);
			if (!id)
				continue;
			struct backend *be = bpf_map_lookup_elem(&CM_BACKENDS, id);
			if (be && be->state == BACKEND_ACTIVE)
				return be;
		}
	}
	return 0;
}

static __always_inline void remember(struct bpf_sock_addr *ctx, const struct backend *be,
				     const struct svc_key *key)
{
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

// Returns 1 to let the call proceed (rewritten or not), 0 to refuse it (no healthy backend).
static __always_inline int translate4(struct bpf_sock_addr *ctx)
{
	struct svc_key key = {};
	__u32 ip = ctx->user_ip4;
	__builtin_memcpy(key.addr, &ip, 4);
	key.port = (__u16)ctx->user_port;
	key.proto = (__u8)ctx->protocol;
	key.family = FAMILY_V4;
	struct svc_val *svc = bpf_map_lookup_elem(&CM_SERVICES, &key);
	if (!svc)
		return 1;
	struct backend *be = pick(svc);
	if (!be || be->family != FAMILY_V4)
		return 0;
	__u32 dst;
	__builtin_memcpy(&dst, be->addr, 4);
	ctx->user_ip4 = dst;
	ctx->user_port = be->port;
	remember(ctx, be, &key);
	return 1;
}

static __always_inline int translate6(struct bpf_sock_addr *ctx)
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
	if (!svc)
		return 1;
	struct backend *be = pick(svc);
	if (!be || be->family != FAMILY_V6)
		return 0;
	__u32 d0, d1, d2, d3;
	__builtin_memcpy(&d0, &be->addr[0], 4);
	__builtin_memcpy(&d1, &be->addr[4], 4);
	__builtin_memcpy(&d2, &be->addr[8], 4);
	__builtin_memcpy(&d3, &be->addr[12], 4);
	ctx->user_ip6[0] = d0;
	ctx->user_ip6[1] = d1;
	ctx->user_ip6[2] = d2;
	ctx->user_ip6[3] = d3;
	ctx->user_port = be->port;
	remember(ctx, be, &key);
	return 1;
}

// Replies (recvmsg) and getpeername: backend address → service address, for this socket.
static __always_inline int reverse4(struct bpf_sock_addr *ctx)
{
	struct revnat_key rk = {};
	__u32 ip = ctx->user_ip4;
	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(rk.addr, &ip, 4);
	rk.port = (__u16)ctx->user_port;
	rk.family = FAMILY_V4;
	struct revnat_val *rv = bpf_map_lookup_elem(&CM_REVNAT, &rk);
	if (rv && rv->family == FAMILY_V4) {
		__u32 src;
		__builtin_memcpy(&src, rv->addr, 4);
		ctx->user_ip4 = src;
		ctx->user_port = rv->port;
	}
	return 1;
}

static __always_inline int reverse6(struct bpf_sock_addr *ctx)
{
	struct revnat_key rk = {};
	__u32 a0 = ctx->user_ip6[0], a1 = ctx->user_ip6[1], a2 = ctx->user_ip6[2], a3 = ctx->user_ip6[3];
	rk.cookie = bpf_get_socket_cookie(ctx);
	__builtin_memcpy(&rk.addr[0], &a0, 4);
	__builtin_memcpy(&rk.addr[4], &a1, 4);
	__builtin_memcpy(&rk.addr[8], &a2, 4);
	__builtin_memcpy(&rk.addr[12], &a3, 4);
	rk.port = (__u16)ctx->user_port;
	rk.family = FAMILY_V6;
	struct revnat_val *rv = bpf_map_lookup_elem(&CM_REVNAT, &rk);
	if (rv && rv->family == FAMILY_V6) {
		__u32 s0, s1, s2, s3;
		__builtin_memcpy(&s0, &rv->addr[0], 4);
		__builtin_memcpy(&s1, &rv->addr[4], 4);
		__builtin_memcpy(&s2, &rv->addr[8], 4);
		__builtin_memcpy(&s3, &rv->addr[12], 4);
		ctx->user_ip6[0] = s0;
		ctx->user_ip6[1] = s1;
		ctx->user_ip6[2] = s2;
		ctx->user_ip6[3] = s3;
		ctx->user_port = rv->port;
	}
	return 1;
}

SEC("cgroup/connect4")
int cm_connect4(struct bpf_sock_addr *ctx) { return translate4(ctx); }

SEC("cgroup/connect6")
int cm_connect6(struct bpf_sock_addr *ctx) { return translate6(ctx); }

SEC("cgroup/sendmsg4")
int cm_sendmsg4(struct bpf_sock_addr *ctx) { return translate4(ctx); }

SEC("cgroup/sendmsg6")
int cm_sendmsg6(struct bpf_sock_addr *ctx) { return translate6(ctx); }

SEC("cgroup/recvmsg4")
int cm_recvmsg4(struct bpf_sock_addr *ctx) { return reverse4(ctx); }

SEC("cgroup/recvmsg6")
int cm_recvmsg6(struct bpf_sock_addr *ctx) { return reverse6(ctx); }

SEC("cgroup/getpeername4")
int cm_getpeername4(struct bpf_sock_addr *ctx) { return reverse4(ctx); }

SEC("cgroup/getpeername6")
int cm_getpeername6(struct bpf_sock_addr *ctx) { return reverse6(ctx); }

char _license[] SEC("license") = "GPL";
