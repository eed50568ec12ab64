/* hostile-guest: a misbehaving virtio driver for nixvm's end-to-end tests.
 *
 * Runs as root in the test guest, after the guest's own virtio drivers were unbound. It drives
 * every virtio-mmio device it finds (windows of 4 KiB from BASE) through /dev/mem, or with
 * `pci` every modern virtio-pci function on the bus through its BAR (sysfs' resource0; the
 * same games through the common configuration, ISR, notify and device windows, and garbage
 * in the MSI-X table with MSI-X enabled, a BAR moved under the device), with rings
 * and buffers in its own locked pages (their physical addresses from /proc/self/pagemap), and
 * does what a broken or malicious driver does: avail indexes far ahead of the device, queues
 * used without being ready, zero-length and looping descriptor chains, buffers outside guest
 * memory, bad queue sizes, feature games, garbage config writes, huge DISCARD/WRITE_ZEROES and
 * resets in the middle of requests. After each game it resets the device; at the end it checks
 * that the devices still work (a block read, random bytes, a FUSE INIT answer).
 *
 * Every result is a line "NIXVM-TEST: <device><n>_<game>=<value>"; the last is
 * "NIXVM-TEST: hostile=done". Usage: hostile-guest [BASE [COUNT]] | hostile-guest pci
 * (defaults 0xd0000000 and 16; the layout of nixvm's boot/src/layout.rs).
 *
 * Built by the e2e test with `cc -static -O2`. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

enum {
	MAGIC = 0x000, VERSION = 0x004, DEVICE_ID = 0x008, DEV_FEATURES = 0x010,
	DEV_FEATURES_SEL = 0x014, DRV_FEATURES = 0x020, DRV_FEATURES_SEL = 0x024,
	QUEUE_SEL = 0x030, QUEUE_NUM_MAX = 0x034, QUEUE_NUM = 0x038, QUEUE_READY = 0x044,
	QUEUE_NOTIFY = 0x050, INT_STATUS = 0x060, INT_ACK = 0x064, STATUS = 0x070,
	QUEUE_DESC = 0x080, QUEUE_AVAIL = 0x090, QUEUE_USED = 0x0a0, CONFIG = 0x100,
};
enum { S_ACK = 1, S_DRIVER = 2, S_DRIVER_OK = 4, S_FEATURES_OK = 8, S_NEEDS_RESET = 0x40 };
enum { F_NEXT = 1, F_WRITE = 2 };
enum { ID_NET = 1, ID_BLK = 2, ID_RNG = 4, ID_VSOCK = 19, ID_FS = 26 };
enum { QSIZE = 8, PAGE = 4096, NPAGES = 96 };

struct desc { uint64_t addr; uint32_t len; uint16_t flags, next; };
struct avail { uint16_t flags, idx, ring[QSIZE]; };
struct used_elem { uint32_t id, len; };
struct used { uint16_t flags, idx; struct used_elem ring[QSIZE]; };

struct page { uint8_t *va; uint64_t pa; };
static struct page pages[NPAGES];

struct queue { struct desc *desc; struct avail *avail; struct used *used; struct page p[3]; };

struct dev {
	volatile uint32_t *r;
	/* virtio-pci: the BAR's length and the function's sysfs directory (0: virtio-mmio) */
	size_t pci_len;
	char sysfs[96];
	uint64_t base;
	uint32_t id;
	int n; /* index among the devices of the same kind */
	const char *name;
	uint64_t features;
	struct queue q[2];
};

static void fail(const char *what)
{
	perror(what);
	printf("NIXVM-TEST: hostile=failed:%s\n", what);
	exit(1);
}

static void sleep_ms(long ms)
{
	struct timespec t = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&t, NULL);
}

/* virtio-pci: where the structures are in nixvm's BAR (its capabilities say the same), and
 * the common configuration's fields. */
enum { P_ISR = 0x1000, P_DEVICE = 0x2000, P_NOTIFY = 0x3000, P_MSIX_TABLE = 0x4000,
       P_MSIX_PBA = 0x5000, P_NOTIFY_MULT = 4 };
enum { C_DFSELECT = 0x00, C_DF = 0x04, C_GFSELECT = 0x08, C_GF = 0x0c, C_MSIX_CONFIG = 0x10,
       C_STATUS = 0x14, C_QSELECT = 0x16, C_QSIZE = 0x18, C_QMSIX = 0x1a, C_QENABLE = 0x1c,
       C_QDESC = 0x20, C_QDRIVER = 0x28, C_QDEVICE = 0x30 };

static volatile uint8_t *bar8(struct dev *d, unsigned off) { return (volatile uint8_t *)d->r + off; }
static uint32_t prd(struct dev *d, unsigned off, int width)
{
	if (off + width > d->pci_len)
		return 0;
	volatile uint8_t *p = bar8(d, off);
	switch (width) {
	case 1: return *p;
	case 2: return *(volatile uint16_t *)p;
	default: return *(volatile uint32_t *)p;
	}
}
static void pwr(struct dev *d, unsigned off, int width, uint32_t v)
{
	if (off + width > d->pci_len)
		return;
	volatile uint8_t *p = bar8(d, off);
	switch (width) {
	case 1: *p = (uint8_t)v; break;
	case 2: *(volatile uint16_t *)p = (uint16_t)v; break;
	default: *(volatile uint32_t *)p = v; break;
	}
}

/* A virtio-mmio register's counterpart in a virtio-pci BAR: its offset and width (0: none). */
static int pci_reg(unsigned off, unsigned *at)
{
	static const struct { unsigned mmio, pci; int width; } map[] = {
		{ DEV_FEATURES_SEL, C_DFSELECT, 4 }, { DEV_FEATURES, C_DF, 4 },
		{ DRV_FEATURES_SEL, C_GFSELECT, 4 }, { DRV_FEATURES, C_GF, 4 },
		{ QUEUE_SEL, C_QSELECT, 2 }, { QUEUE_NUM_MAX, C_QSIZE, 2 }, { QUEUE_NUM, C_QSIZE, 2 },
		{ QUEUE_READY, C_QENABLE, 2 }, { INT_STATUS, P_ISR, 1 }, { STATUS, C_STATUS, 1 },
		{ QUEUE_DESC, C_QDESC, 4 }, { QUEUE_DESC + 4, C_QDESC + 4, 4 },
		{ QUEUE_AVAIL, C_QDRIVER, 4 }, { QUEUE_AVAIL + 4, C_QDRIVER + 4, 4 },
		{ QUEUE_USED, C_QDEVICE, 4 }, { QUEUE_USED + 4, C_QDEVICE + 4, 4 },
	};
	for (unsigned i = 0; i < sizeof map / sizeof map[0]; i++)
		if (map[i].mmio == off) {
			*at = map[i].pci;
			return map[i].width;
		}
	if (off >= CONFIG) {
		*at = P_DEVICE + off - CONFIG;
		return 4;
	}
	*at = off; /* anything else: the same offset in the common configuration, 32 bits */
	return 4;
}

static uint32_t rd(struct dev *d, unsigned off)
{
	if (!d->pci_len)
		return d->r[off / 4];
	unsigned at;
	int width = pci_reg(off, &at);
	return prd(d, at, width);
}
static void wr(struct dev *d, unsigned off, uint32_t v)
{
	if (!d->pci_len) {
		d->r[off / 4] = v;
		return;
	}
	if (off == INT_ACK)
		return; /* reading the ISR acknowledged */
	if (off == QUEUE_NOTIFY) {
		/* Queue v's notify address (nixvm: notify_off = the queue's index), kept in the
		 * notify window for any v. */
		pwr(d, P_NOTIFY + P_NOTIFY_MULT * (v & 0x3ff), 2, v);
		return;
	}
	unsigned at;
	int width = pci_reg(off, &at);
	pwr(d, at, width, v);
}
static void wr64(struct dev *d, unsigned off, uint64_t v)
{
	wr(d, off, (uint32_t)v);
	wr(d, off + 4, (uint32_t)(v >> 32));
}

static void result(struct dev *d, const char *game, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void result(struct dev *d, const char *game, const char *fmt, ...)
{
	va_list ap;
	printf("NIXVM-TEST: %s%d_%s=", d->name, d->n, game);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
}

/* Locked anonymous pages and their guest-physical addresses. */
static void alloc_pages(void)
{
	uint8_t *m = mmap(NULL, NPAGES * PAGE, PROT_READ | PROT_WRITE,
			  MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE | MAP_LOCKED, -1, 0);
	if (m == MAP_FAILED)
		fail("mmap pages");
	int pm = open("/proc/self/pagemap", O_RDONLY);
	if (pm < 0)
		fail("open pagemap");
	for (int i = 0; i < NPAGES; i++) {
		uint8_t *va = m + (size_t)i * PAGE;
		va[0] = 1;
		uint64_t e;
		if (pread(pm, &e, 8, (off_t)((uintptr_t)va / PAGE) * 8) != 8)
			fail("read pagemap");
		if (!(e & (1ULL << 63)) || !(e & ((1ULL << 55) - 1)))
			fail("page not present");
		pages[i].va = va;
		pages[i].pa = (e & ((1ULL << 55) - 1)) * PAGE;
		memset(va, 0, PAGE);
	}
	close(pm);
}

static int next_page;
static struct page take_page(void)
{
	if (next_page == NPAGES)
		next_page = 6; /* pages 0-5 hold the two queues' rings */
	struct page p = pages[next_page++];
	memset(p.va, 0, PAGE);
	return p;
}

/* Resets the device and waits (bounded) until it reads back 0. */
static int reset(struct dev *d)
{
	wr(d, STATUS, 0);
	for (int i = 0; i < 500; i++) {
		if (rd(d, STATUS) == 0)
			return 0;
		sleep_ms(10);
	}
	result(d, "reset", "stuck:0x%x", rd(d, STATUS));
	return -1;
}

/* Reset, ACK, DRIVER, features (VERSION_1 plus `extra` of the offered ones), FEATURES_OK. */
static int begin(struct dev *d, uint64_t extra)
{
	if (reset(d))
		return -1;
	wr(d, INT_ACK, rd(d, INT_STATUS));
	wr(d, STATUS, S_ACK);
	wr(d, STATUS, S_ACK | S_DRIVER);
	wr(d, DEV_FEATURES_SEL, 0);
	uint64_t f = rd(d, DEV_FEATURES);
	wr(d, DEV_FEATURES_SEL, 1);
	f |= (uint64_t)rd(d, DEV_FEATURES) << 32;
	d->features = f;
	uint64_t want = (1ULL << 32) | (extra & f);
	wr(d, DRV_FEATURES_SEL, 0);
	wr(d, DRV_FEATURES, (uint32_t)want);
	wr(d, DRV_FEATURES_SEL, 1);
	wr(d, DRV_FEATURES, (uint32_t)(want >> 32));
	wr(d, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	return (rd(d, STATUS) & S_FEATURES_OK) ? 0 : -1;
}

/* Fresh rings for queue `qi` in pages 3*qi..3*qi+2; `ready` sets QueueReady. */
static void setup_queue(struct dev *d, int qi, uint32_t num, int ready)
{
	struct queue *q = &d->q[qi];
	for (int i = 0; i < 3; i++) {
		q->p[i] = pages[qi * 3 + i];
		memset(q->p[i].va, 0, PAGE);
	}
	q->desc = (struct desc *)q->p[0].va;
	q->avail = (struct avail *)q->p[1].va;
	q->used = (struct used *)q->p[2].va;
	wr(d, QUEUE_SEL, qi);
	wr(d, QUEUE_NUM, num);
	wr64(d, QUEUE_DESC, q->p[0].pa);
	wr64(d, QUEUE_AVAIL, q->p[1].pa);
	wr64(d, QUEUE_USED, q->p[2].pa);
	if (ready)
		wr(d, QUEUE_READY, 1);
}

static void driver_ok(struct dev *d)
{
	wr(d, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* Publishes `n` more avail entries (heads given) and kicks queue `qi`. */
static void publish(struct dev *d, int qi, const uint16_t *heads, int n)
{
	struct avail *a = d->q[qi].avail;
	for (int i = 0; i < n; i++)
		a->ring[(a->idx + i) % QSIZE] = heads[i];
	__atomic_store_n(&a->idx, (uint16_t)(a->idx + n), __ATOMIC_RELEASE);
	wr(d, QUEUE_NOTIFY, qi);
}

/* Waits up to `ms` until the used index reaches `want`; returns the used index. */
static uint16_t wait_used(struct dev *d, int qi, uint16_t want, int ms)
{
	for (int i = 0; i < ms / 5; i++) {
		uint16_t u = __atomic_load_n(&d->q[qi].used->idx, __ATOMIC_ACQUIRE);
		if (u == want)
			return u;
		sleep_ms(5);
	}
	return __atomic_load_n(&d->q[qi].used->idx, __ATOMIC_ACQUIRE);
}

/* Whether the device set DEVICE_NEEDS_RESET within `ms` (polled: a device whose worker is
 * slow to take the kick under load still counts; a quiet device costs the whole wait). */
static const char *needs_reset_within(struct dev *d, int ms)
{
	for (int i = 0; i < ms / 5; i++) {
		if (rd(d, STATUS) & S_NEEDS_RESET)
			return "needs_reset";
		sleep_ms(5);
	}
	return (rd(d, STATUS) & S_NEEDS_RESET) ? "needs_reset" : "quiet";
}

/* After a game the device has answered (its used index moved), a short grace is enough. */
static const char *needs_reset(struct dev *d)
{
	return needs_reset_within(d, 200);
}

/* After a game only DEVICE_NEEDS_RESET answers: wait long enough for a loaded host. */
#define RESET_WAIT_MS 3000

/* The queue the games play with: TX for net (served at every kick), the first otherwise. */
#define GAMEQ (d->id == ID_NET ? 1 : 0)

/* 1. The avail index far more than a queue ahead of the device. */
static void game_ahead(struct dev *d)
{
	if (begin(d, 0))
		return result(d, "ahead", "features_refused");
	setup_queue(d, GAMEQ, QSIZE, 1);
	driver_ok(d);
	d->q[GAMEQ].avail->idx = 0x4000;
	wr(d, QUEUE_NOTIFY, GAMEQ);
	result(d, "ahead", "%s", needs_reset_within(d, RESET_WAIT_MS));
	reset(d);
}

/* 2. A queue that was never made ready, with a non-zero avail index, at DRIVER_OK. */
static void game_unready(struct dev *d)
{
	if (begin(d, 0))
		return result(d, "unready", "features_refused");
	setup_queue(d, GAMEQ, QSIZE, 0);
	d->q[GAMEQ].avail->idx = 7;
	driver_ok(d);
	wr(d, QUEUE_NOTIFY, GAMEQ);
	wr(d, QUEUE_NOTIFY, 1);
	result(d, "unready", "%s", needs_reset(d));
	reset(d);
}

/* 3. Zero-length buffers: single ones and three-descriptor chains. */
static void game_zero_length(struct dev *d)
{
	if (begin(d, 0))
		return result(d, "zero_length", "features_refused");
	setup_queue(d, GAMEQ, QSIZE, 1);
	driver_ok(d);
	struct desc *t = d->q[GAMEQ].desc;
	struct page p = take_page();
	uint16_t heads[QSIZE / 2];
	for (int i = 0; i < QSIZE / 2; i++) {
		heads[i] = (uint16_t)i;
		t[i] = (struct desc){ p.pa, 0, F_WRITE, 0 };
	}
	/* 4..6: a chain of three, 7: alone */
	t[4] = (struct desc){ p.pa, 0, F_NEXT, 5 };
	t[5] = (struct desc){ p.pa, 0, F_NEXT | F_WRITE, 6 };
	t[6] = (struct desc){ p.pa, 0, F_WRITE, 0 };
	t[7] = (struct desc){ p.pa, 0, 0, 0 };
	publish(d, GAMEQ, heads, QSIZE / 2);
	uint16_t more[2] = { 4, 7 };
	publish(d, GAMEQ, more, 2);
	uint16_t u = wait_used(d, GAMEQ, QSIZE / 2 + 2, 300);
	result(d, "zero_length", "used:%u,%s", u, needs_reset(d));
	reset(d);
}

/* 4. A descriptor chain that loops, and one that points outside the table. */
static void game_loop(struct dev *d)
{
	if (begin(d, 0))
		return result(d, "loop", "features_refused");
	setup_queue(d, GAMEQ, QSIZE, 1);
	driver_ok(d);
	struct desc *t = d->q[GAMEQ].desc;
	struct page p = take_page();
	t[0] = (struct desc){ p.pa, 16, F_NEXT, 1 };
	t[1] = (struct desc){ p.pa + 16, 16, F_NEXT | F_WRITE, 0 };
	t[2] = (struct desc){ p.pa, 16, F_NEXT, 200 };
	uint16_t heads[3] = { 0, 2, 1 };
	publish(d, GAMEQ, heads, 3);
	uint16_t u = wait_used(d, GAMEQ, 3, 300);
	result(d, "loop", "used:%u,%s", u, needs_reset(d));
	reset(d);
}

/* 5. Buffers outside guest memory (the MMIO gap, and beyond any RAM). */
static void game_wild_address(struct dev *d)
{
	if (begin(d, 0))
		return result(d, "wild_address", "features_refused");
	setup_queue(d, GAMEQ, QSIZE, 1);
	driver_ok(d);
	struct desc *t = d->q[GAMEQ].desc;
	t[0] = (struct desc){ 0xfffffffff000ULL, 4096, F_WRITE, 0 };
	t[1] = (struct desc){ d->base, 4096, F_WRITE, 0 };
	t[2] = (struct desc){ 0xfffffffffff0ULL, 0xffffffff, F_WRITE, 0 };
	uint16_t heads[3] = { 0, 1, 2 };
	publish(d, GAMEQ, heads, 3);
	uint16_t u = wait_used(d, GAMEQ, 3, 300);
	result(d, "wild_address", "used:%u,%s", u, needs_reset(d));
	/* and rings outside guest memory */
	if (begin(d, 0) == 0) {
		setup_queue(d, GAMEQ, QSIZE, 0);
		wr64(d, QUEUE_AVAIL, 0xffffffff0000ULL);
		wr(d, QUEUE_READY, 1);
		driver_ok(d);
		wr(d, QUEUE_NOTIFY, GAMEQ);
		result(d, "wild_ring", "%s", needs_reset_within(d, RESET_WAIT_MS));
	}
	reset(d);
}

/* 6. Queue sizes the device must refuse: 0, not a power of two, above the maximum. */
static void game_queue_sizes(struct dev *d)
{
	static const uint32_t sizes[] = { 0, 3, 0x10000, 0xffffffff };
	char out[64] = "";
	for (unsigned i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
		if (begin(d, 0))
			return result(d, "queue_sizes", "features_refused");
		setup_queue(d, GAMEQ, sizes[i], 1);
		driver_ok(d);
		wr(d, QUEUE_NOTIFY, GAMEQ);
		sleep_ms(50);
		strcat(out, (rd(d, STATUS) & S_NEEDS_RESET) ? "r" : "-");
		reset(d);
	}
	result(d, "queue_sizes", "%s", out);
}

/* 7. Feature games, register writes out of order, garbage in config space. */
static void game_registers(struct dev *d)
{
	reset(d);
	wr(d, STATUS, S_ACK | S_DRIVER | S_DRIVER_OK); /* DRIVER_OK without FEATURES_OK */
	wr(d, QUEUE_NOTIFY, 0);
	reset(d);
	wr(d, STATUS, S_ACK | S_DRIVER);
	for (unsigned s = 0; s < 4; s++) {
		wr(d, DRV_FEATURES_SEL, s);
		wr(d, DRV_FEATURES, 0xffffffff);
	}
	wr(d, STATUS, S_ACK | S_DRIVER | S_FEATURES_OK);
	int refused = !(rd(d, STATUS) & S_FEATURES_OK);
	for (unsigned off = CONFIG; off < 0x1000; off += 4)
		wr(d, off, 0xdeadbeef);
	for (unsigned off = 0; off < CONFIG; off += 4)
		(void)rd(d, off);
	wr(d, QUEUE_SEL, 0xffff);
	wr(d, QUEUE_NUM, 8);
	wr(d, QUEUE_READY, 1);
	wr(d, QUEUE_NOTIFY, 0xffff);
	result(d, "registers", "unknown_features_%s", refused ? "refused" : "accepted");
	reset(d);
}

/* The offset of the function's MSI-X capability in its configuration space (0: none). */
static int msix_cap(int cfg)
{
	uint8_t c[256];
	if (pread(cfg, c, sizeof c, 0) != (ssize_t)sizeof c)
		return 0;
	int at = c[0x34] & 0xfc;
	for (int i = 0; at && i < 48; i++) { /* bounded: a looping list ends too */
		if (c[at] == 0x11)
			return at;
		at = c[at + 1] & 0xfc;
	}
	return 0;
}

/* The function's configuration space (sysfs' config file), read-write; -1 if it cannot open. */
static int config_fd(struct dev *d)
{
	char path[128];
	snprintf(path, sizeof path, "%s/config", d->sysfs);
	return open(path, O_RDWR);
}

/* 8. virtio-pci only: MSI-X enabled from the configuration space (as a driver does), garbage
 * in the MSI-X table and around it, vectors out of range, a device error to signal. */
static void game_msix(struct dev *d)
{
	int cfg = config_fd(d);
	int cap = cfg < 0 ? 0 : msix_cap(cfg);
	if (!cap) {
		if (cfg >= 0)
			close(cfg);
		return result(d, "msix", "no_capability");
	}
	if (begin(d, 0)) {
		close(cfg);
		return result(d, "msix", "features_refused");
	}
	uint16_t on = 0x8000, off = 0;
	pwrite(cfg, &on, 2, cap + 2);
	/* Vector 0: an address no APIC has (dropped); vector 1: a LAPIC, an unused vector. */
	static const uint32_t table[] = { 0xdeadb000, 0xdeadbeef, 0xef, 0, 0xfee00000, 0, 0xee, 0 };
	for (unsigned i = 0; i < sizeof table / sizeof table[0]; i++)
		pwr(d, P_MSIX_TABLE + 4 * i, 4, table[i]);
	for (unsigned at = P_MSIX_TABLE + sizeof table; at < P_MSIX_TABLE + 0x100; at += 4)
		pwr(d, at, 4, 0xdeadbeef);
	for (unsigned at = P_MSIX_PBA; at < P_MSIX_PBA + 0x40; at += 4)
		pwr(d, at, 4, 0xffffffff);
	pwr(d, P_ISR, 4, 0xffffffff);
	pwr(d, C_MSIX_CONFIG, 2, 0);
	uint32_t config_vector = prd(d, C_MSIX_CONFIG, 2);
	setup_queue(d, GAMEQ, QSIZE, 0);
	pwr(d, C_QMSIX, 2, 7); /* past the table */
	uint32_t queue_vector = prd(d, C_QMSIX, 2);
	wr(d, QUEUE_READY, 1);
	driver_ok(d);
	d->q[GAMEQ].avail->idx = 0x4000;
	wr(d, QUEUE_NOTIFY, GAMEQ);
	const char *state = needs_reset_within(d, RESET_WAIT_MS);
	pwrite(cfg, &off, 2, cap + 2);
	close(cfg);
	result(d, "msix", "config:%x,queue:%x,%s", config_vector, queue_vector, state);
	reset(d);
}

/* 9. virtio-pci only: BAR 0 sized (all ones: its size mask reads back), then moved
 * elsewhere through the configuration space while the device is in use: the move is refused,
 * the BAR reads back where the device is, and the device goes on working (alive, below). */
static void game_bar(struct dev *d)
{
	int cfg = config_fd(d);
	if (cfg < 0)
		return result(d, "bar", "no_config");
	uint32_t was = 0, mask = 0, now = 0, ones = 0xffffffff;
	pread(cfg, &was, 4, 0x10);
	pwrite(cfg, &ones, 4, 0x10);
	pread(cfg, &mask, 4, 0x10);
	uint32_t elsewhere = was ^ 0x10000000;
	pwrite(cfg, &elsewhere, 4, 0x10);
	pread(cfg, &now, 4, 0x10);
	pwrite(cfg, &was, 4, 0x10);
	close(cfg);
	result(d, "bar", "mask:%x,%s", mask, now == was ? "kept" : "moved");
}

/* A block request: header, optional data pages, status byte. Returns the head. */
static uint16_t blk_request(struct dev *d, uint16_t first, uint32_t type, uint64_t sector,
			    struct page *data, int ndata, uint32_t len, struct page *hdr)
{
	struct desc *t = d->q[0].desc;
	uint8_t *h = hdr->va;
	memset(h, 0, 32);
	memcpy(h, &type, 4);
	memcpy(h + 8, &sector, 8);
	h[31] = 0xee; /* status, offset 31 */
	uint16_t i = first;
	t[i] = (struct desc){ hdr->pa, 16, F_NEXT, (uint16_t)(i + 1) };
	for (int k = 0; k < ndata; k++) {
		i++;
		uint16_t w = (type == 0) ? F_WRITE : 0;
		t[i] = (struct desc){ data[k].pa, len, (uint16_t)(F_NEXT | w), (uint16_t)(i + 1) };
	}
	i++;
	t[i] = (struct desc){ hdr->pa + 31, 1, F_WRITE, 0 };
	return first;
}

/* 10. Block only: huge DISCARD/WRITE_ZEROES, a write past the end, reset mid-request. */
static void game_block(struct dev *d)
{
	const uint64_t discard_wz = (1ULL << 13) | (1ULL << 14);
	static const uint32_t types[] = { 11, 13 };
	static const char *names[] = { "discard_huge", "write_zeroes_huge" };
	for (int k = 0; k < 2; k++) {
		if (begin(d, discard_wz))
			return result(d, names[k], "features_refused");
		setup_queue(d, 0, QSIZE, 1);
		driver_ok(d);
		struct page hdr = take_page(), seg = take_page();
		uint64_t sector = 0;
		uint32_t num = 0xffffffff, flags = 0;
		memcpy(seg.va, &sector, 8);
		memcpy(seg.va + 8, &num, 4);
		memcpy(seg.va + 12, &flags, 4);
		uint16_t head = blk_request(d, 0, types[k], 0, &seg, 1, 16, &hdr);
		publish(d, 0, &head, 1);
		uint16_t u = wait_used(d, 0, 1, 2000);
		result(d, names[k], "used:%u,status:%u", u, hdr.va[31]);
		reset(d);
	}

	if (begin(d, 0))
		return;
	setup_queue(d, 0, QSIZE, 1);
	driver_ok(d);
	struct page hdr = take_page(), data = take_page();
	uint16_t head = blk_request(d, 0, 1, 1ULL << 60, &data, 1, PAGE, &hdr);
	publish(d, 0, &head, 1);
	uint16_t u = wait_used(d, 0, 1, 2000);
	result(d, "write_past_end", "used:%u,status:%u", u, hdr.va[31]);
	reset(d);

	/* Reset in the middle: two reads of four pages each, kicked, then reset at once. */
	for (int round = 0; round < 5; round++) {
		if (begin(d, 0))
			return;
		setup_queue(d, 0, QSIZE, 1);
		driver_ok(d);
		struct page h1 = take_page(), h2 = take_page(), pg[4];
		for (int i = 0; i < 4; i++)
			pg[i] = take_page();
		uint16_t heads[2];
		heads[0] = blk_request(d, 0, 0, 0, pg, 2, PAGE, &h1);
		heads[1] = blk_request(d, 4, 0, 8, pg + 2, 2, PAGE, &h2);
		publish(d, 0, heads, 2);
		if (reset(d))
			return;
	}
	result(d, "reset_mid_request", "ok");
}

/* After the games: one correct request; the device must still serve it. */
static void alive(struct dev *d)
{
	if (begin(d, 0))
		return result(d, "alive", "features_refused");
	setup_queue(d, 0, QSIZE, 1);
	if (d->id == ID_FS || d->id == ID_NET)
		setup_queue(d, 1, QSIZE, 1);
	driver_ok(d);
	if (rd(d, STATUS) & S_NEEDS_RESET)
		return result(d, "alive", "needs_reset");
	struct page a = take_page(), b = take_page();
	uint16_t head = 0;
	struct desc *t;
	switch (d->id) {
	case ID_BLK: /* read sector 0 */
		head = blk_request(d, 0, 0, 0, &b, 1, 512, &a);
		publish(d, 0, &head, 1);
		if (wait_used(d, 0, 1, 3000) != 1)
			return result(d, "alive", "no_answer");
		return result(d, "alive", "status:%u,first:%02x%02x%02x%02x", a.va[31], b.va[0],
			      b.va[1], b.va[2], b.va[3]);
	case ID_RNG:
		t = d->q[0].desc;
		t[0] = (struct desc){ a.pa, 64, F_WRITE, 0 };
		publish(d, 0, &head, 1);
		if (wait_used(d, 0, 1, 3000) != 1)
			return result(d, "alive", "no_answer");
		return result(d, "alive", "bytes:%u", d->q[0].used->ring[0].len);
	case ID_FS: { /* FUSE_INIT on the request queue (queue 1) */
		uint32_t in_len = 40 + 64;
		uint32_t hdr[10] = { in_len, 26 /* FUSE_INIT */, 1, 0, 1, 0, 0, 0, 0, 0 };
		memcpy(a.va, hdr, 40);
		uint32_t init_in[4] = { 7, 31, 0x20000, 0 };
		memcpy(a.va + 40, init_in, 16);
		t = d->q[1].desc;
		t[0] = (struct desc){ a.pa, in_len, F_NEXT, 1 };
		t[1] = (struct desc){ b.pa, 16 + 64, F_WRITE, 0 };
		publish(d, 1, &head, 1);
		if (wait_used(d, 1, 1, 3000) != 1)
			return result(d, "alive", "no_answer");
		int32_t err;
		memcpy(&err, b.va + 4, 4);
		uint32_t major;
		memcpy(&major, b.va + 16, 4);
		return result(d, "alive", "error:%d,major:%u", err, major);
	}
	default: /* net: the RX queue takes buffers and nothing breaks */
		t = d->q[0].desc;
		t[0] = (struct desc){ a.pa, PAGE, F_WRITE, 0 };
		publish(d, 0, &head, 1);
		sleep_ms(100);
		return result(d, "alive", "%s", (rd(d, STATUS) & S_NEEDS_RESET) ? "needs_reset"
										     : "ok");
	}
}

static struct dev devs[32];
static int ndevs, per_kind[32];

static void add(struct dev d)
{
	switch (d.id) {
	case ID_NET: d.name = "net"; break;
	case ID_BLK: d.name = "blk"; break;
	case ID_RNG: d.name = "rng"; break;
	case ID_FS: d.name = "fs"; break;
	case ID_VSOCK: d.name = "vsock"; break;
	default: d.name = "dev"; break;
	}
	d.n = per_kind[d.id % 32]++;
	devs[ndevs++] = d;
}

/* virtio-mmio windows from `base` until one holds no device. */
static void find_mmio(uint64_t base, int count)
{
	int mem = open("/dev/mem", O_RDWR | O_SYNC);
	if (mem < 0)
		fail("open /dev/mem");
	for (int i = 0; i < count && ndevs < 32; i++) {
		uint64_t at = base + (uint64_t)i * PAGE;
		void *m = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, mem, (off_t)at);
		if (m == MAP_FAILED)
			break;
		struct dev d = { .r = m, .base = at };
		if (rd(&d, MAGIC) != 0x74726976 || rd(&d, VERSION) != 2 || rd(&d, DEVICE_ID) == 0) {
			munmap(m, PAGE);
			break;
		}
		d.id = rd(&d, DEVICE_ID);
		add(d);
	}
}

static unsigned long sysfs_number(const char *dir, const char *file)
{
	char path[160], buf[64] = "";
	snprintf(path, sizeof path, "%s/%s", dir, file);
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return 0;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	return n > 0 ? strtoul(buf, NULL, 0) : 0;
}

/* Modern virtio-pci functions (1af4:1040 + type), in bus order, through their BAR 0. */
static void find_pci(void)
{
	struct dirent **names;
	int k = scandir("/sys/bus/pci/devices", &names, NULL, alphasort);
	if (k < 0)
		fail("scandir /sys/bus/pci/devices");
	for (int i = 0; i < k; i++) {
		struct dev d = { 0 };
		snprintf(d.sysfs, sizeof d.sysfs, "/sys/bus/pci/devices/%s", names[i]->d_name);
		unsigned long device = sysfs_number(d.sysfs, "device");
		if (sysfs_number(d.sysfs, "vendor") != 0x1af4 || device < 0x1040 || device > 0x107f
		    || ndevs == 32)
			continue;
		char path[160];
		snprintf(path, sizeof path, "%s/resource", d.sysfs);
		FILE *f = fopen(path, "r");
		unsigned long long start = 0, end = 0;
		if (!f || fscanf(f, "%llx %llx", &start, &end) != 2 || end <= start)
			fail("read the BAR");
		fclose(f);
		snprintf(path, sizeof path, "%s/resource0", d.sysfs);
		int fd = open(path, O_RDWR | O_SYNC);
		if (fd < 0)
			fail("open resource0");
		d.pci_len = (size_t)(end - start + 1);
		void *m = mmap(NULL, d.pci_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
		if (m == MAP_FAILED)
			fail("mmap resource0");
		close(fd);
		d.r = m;
		d.base = start;
		d.id = (uint32_t)(device - 0x1040);
		add(d);
	}
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	alloc_pages();
	if (argc > 1 && !strcmp(argv[1], "pci"))
		find_pci();
	else
		find_mmio(argc > 1 ? strtoull(argv[1], NULL, 0) : 0xd0000000ULL,
			  argc > 2 ? atoi(argv[2]) : 16);
	int n = ndevs;
	printf("NIXVM-TEST: hostile_devices=%d\n", n);
	for (int i = 0; i < n; i++) {
		struct dev *d = &devs[i];
		game_ahead(d);
		game_unready(d);
		game_zero_length(d);
		game_loop(d);
		game_wild_address(d);
		game_queue_sizes(d);
		game_registers(d);
		if (d->pci_len) {
			game_msix(d);
			game_bar(d);
		}
		if (d->id == ID_BLK)
			game_block(d);
	}
	for (int i = 0; i < n; i++)
		alive(&devs[i]);
	printf("NIXVM-TEST: hostile=done\n");
	return 0;
}
