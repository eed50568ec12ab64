/*
 * guest-io: the block benchmark's I/O load (benches/block.rs), for the guest and the host.
 *
 *   guest-io PATH MODE SECONDS [THREADS]
 *
 * MODE is one of
 *   seqread   1 MiB O_DIRECT reads from offset 0 up, wrapping at the end of PATH
 *   seqwrite  1 MiB O_DIRECT writes of a fixed pattern, the same way, then fdatasync
 *   randread  4 KiB O_DIRECT reads at random 4 KiB-aligned offsets, THREADS (default 1)
 *             threads each with one request in flight
 * Each runs for SECONDS of wall time (CLOCK_MONOTONIC) and prints one line:
 *   NIXVM-BENCH: seqread_mbs=123.4        (MB = 10^6 bytes)
 *   NIXVM-BENCH: seqwrite_mbs=123.4
 *   NIXVM-BENCH: randread_qd<THREADS>_iops=1234
 * or "NIXVM-BENCH: error=..." and exit status 1. PATH is a block device or a file; its size
 * is found with lseek(SEEK_END). Built with gcc -static -O2 -pthread.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SEQ_BLOCK (1 << 20)
#define RAND_BLOCK 4096
#define MAX_THREADS 64

static const char *path;
static double seconds;
static off_t size;

static double now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void fail(const char *what)
{
	printf("NIXVM-BENCH: error=%s: %s\n", what, strerror(errno));
	fflush(stdout);
	exit(1);
}

static void *aligned(size_t len)
{
	void *p;
	int e = posix_memalign(&p, 4096, len);
	if (e != 0) {
		errno = e;
		fail("posix_memalign");
	}
	return p;
}

/* Sequential 1 MiB reads or writes; returns MB/s. */
static double sequential(int write)
{
	int fd = open(path, (write ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0)
		fail("open");
	unsigned char *buf = aligned(SEQ_BLOCK);
	for (size_t i = 0; i < SEQ_BLOCK; i++)
		buf[i] = (unsigned char)(i * 7 + 1);
	off_t end = size / SEQ_BLOCK * SEQ_BLOCK;
	if (end == 0) {
		errno = EINVAL;
		fail("smaller than 1 MiB");
	}
	off_t off = 0;
	uint64_t bytes = 0;
	double start = now(), t;
	do {
		ssize_t n = write ? pwrite(fd, buf, SEQ_BLOCK, off) : pread(fd, buf, SEQ_BLOCK, off);
		if (n != SEQ_BLOCK) {
			if (n >= 0)
				errno = EIO;
			fail(write ? "pwrite" : "pread");
		}
		bytes += SEQ_BLOCK;
		off = (off + SEQ_BLOCK) % end;
		t = now();
	} while (t - start < seconds);
	if (write && fdatasync(fd) != 0)
		fail("fdatasync");
	t = now();
	close(fd);
	free(buf);
	return (double)bytes / (t - start) / 1e6;
}

struct worker {
	pthread_t thread;
	unsigned seed;
	uint64_t ops;
	int err;
};

static int rand_fd;
static double rand_start;

static void *rand_worker(void *arg)
{
	struct worker *w = arg;
	unsigned char *buf = aligned(RAND_BLOCK);
	uint64_t blocks = (uint64_t)size / RAND_BLOCK;
	uint64_t x = w->seed * 0x9e3779b97f4a7c15ULL + 1;
	do {
		/* xorshift64 */
		x ^= x << 13;
		x ^= x >> 7;
		x ^= x << 17;
		off_t off = (off_t)(x % blocks) * RAND_BLOCK;
		if (pread(rand_fd, buf, RAND_BLOCK, off) != RAND_BLOCK) {
			w->err = errno ? errno : EIO;
			break;
		}
		w->ops++;
	} while (now() - rand_start < seconds);
	free(buf);
	return NULL;
}

/* Random 4 KiB reads from `threads` threads; returns IOPS. */
static double random_reads(int threads)
{
	static struct worker workers[MAX_THREADS];
	rand_fd = open(path, O_RDONLY | O_DIRECT);
	if (rand_fd < 0)
		fail("open");
	if (size < RAND_BLOCK) {
		errno = EINVAL;
		fail("smaller than 4 KiB");
	}
	rand_start = now();
	for (int i = 0; i < threads; i++) {
		workers[i].seed = (unsigned)i + 1;
		int e = pthread_create(&workers[i].thread, NULL, rand_worker, &workers[i]);
		if (e != 0) {
			errno = e;
			fail("pthread_create");
		}
	}
	uint64_t ops = 0;
	for (int i = 0; i < threads; i++) {
		pthread_join(workers[i].thread, NULL);
		if (workers[i].err) {
			errno = workers[i].err;
			fail("pread");
		}
		ops += workers[i].ops;
	}
	double t = now();
	close(rand_fd);
	return (double)ops / (t - rand_start);
}

int main(int argc, char **argv)
{
	if (argc < 4 || argc > 5) {
		fprintf(stderr, "usage: %s PATH seqread|seqwrite|randread SECONDS [THREADS]\n", argv[0]);
		return 2;
	}
	path = argv[1];
	seconds = atof(argv[3]);
	int threads = argc == 5 ? atoi(argv[4]) : 1;
	if (seconds <= 0 || threads < 1 || threads > MAX_THREADS) {
		fprintf(stderr, "%s: bad SECONDS or THREADS (1 to %d)\n", argv[0], MAX_THREADS);
		return 2;
	}
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		fail("open");
	size = lseek(fd, 0, SEEK_END);
	if (size < 0)
		fail("lseek");
	close(fd);

	const char *mode = argv[2];
	if (strcmp(mode, "seqread") == 0)
		printf("NIXVM-BENCH: seqread_mbs=%.1f\n", sequential(0));
	else if (strcmp(mode, "seqwrite") == 0)
		printf("NIXVM-BENCH: seqwrite_mbs=%.1f\n", sequential(1));
	else if (strcmp(mode, "randread") == 0)
		printf("NIXVM-BENCH: randread_qd%d_iops=%.0f\n", threads, random_reads(threads));
	else {
		fprintf(stderr, "%s: unknown mode '%s'\n", argv[0], mode);
		return 2;
	}
	fflush(stdout);
	return 0;
}
