// SPDX-License-Identifier: GPL-2.0
/*
 * clubcast relay XDP program: IPv4 UDP datagrams to the relay's port go to the AF_XDP socket
 * bound on the receiving queue (if there is one); everything else — other ports, TCP, ICMP,
 * ARP, IPv6, IP fragments — continues into the kernel untouched.
 *
 * Built by xdp/build (clang -target bpf); the object is checked in as xdp/relay.o and
 * embedded in the relay binary. The section is xdp.frags so the program also accepts
 * multi-buffer frames (jumbo MTUs, AF_XDP multi-buffer sockets).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

/* One AF_XDP socket per receive queue, inserted by the relay. */
struct {
	__uint(type, BPF_MAP_TYPE_XSKMAP);
	__uint(max_entries, 256);
	__type(key, __u32);
	__type(value, __u32);
} clubcast_xsks SEC(".maps");

/* Packets redirected (0) and passed to the kernel (1), per CPU. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2);
	__type(key, __u32);
	__type(value, __u64);
} clubcast_counts SEC(".maps");

/* The relay's UDP port, host byte order; set by the loader before the program is loaded. */
volatile const __u16 relay_port = 7000;

static __always_inline int count(__u32 which, int verdict)
{
	__u64 *n = bpf_map_lookup_elem(&clubcast_counts, &which);

	if (n)
		*n += 1;
	return verdict;
}

SEC("xdp.frags")
int clubcast_relay(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct udphdr *udp;

	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return count(1, XDP_PASS);
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->protocol != IPPROTO_UDP || ip->ihl < 5)
		return count(1, XDP_PASS);
	/* Fragments are reassembled by the kernel. */
	if (ip->frag_off & bpf_htons(0x3fff))
		return count(1, XDP_PASS);
	udp = (void *)ip + ip->ihl * 4;
	if ((void *)(udp + 1) > end || udp->dest != bpf_htons(relay_port))
		return count(1, XDP_PASS);
	/* XDP_PASS when no socket is bound on this queue: the kernel socket still serves it. */
	return count(0, bpf_redirect_map(&clubcast_xsks, ctx->rx_queue_index, XDP_PASS));
}

char _license[] SEC("license") = "GPL";
