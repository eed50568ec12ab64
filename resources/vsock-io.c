/* vsock-io: a test guest's AF_VSOCK tool (busybox has none). Built static by the e2e tests.
 *
 *   vsock-io connect CID PORT   connect, then copy stdin to the socket and the socket to stdout
 *   vsock-io listen PORT        accept one connection, then the same
 *
 * When stdin ends, the socket's sending side is shut down; the program ends when both
 * directions are done: stdin sent whole and the peer's side closed (a peer that shuts its
 * side down first still gets all of stdin). Exit status 0, or 1 with a message. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int die(const char *what) {
	fprintf(stderr, "vsock-io: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void write_all(int fd, const char *b, ssize_t n) {
	while (n > 0) {
		ssize_t w = write(fd, b, n);
		if (w < 0) {
			if (errno == EINTR)
				continue;
			die("write");
		}
		b += w;
		n -= w;
	}
}

int main(int argc, char **argv) {
	struct sockaddr_vm a = {.svm_family = AF_VSOCK};
	int s = socket(AF_VSOCK, SOCK_STREAM, 0);
	if (s < 0)
		die("socket");
	if (argc == 4 && !strcmp(argv[1], "connect")) {
		a.svm_cid = atoi(argv[2]);
		a.svm_port = atoi(argv[3]);
		if (connect(s, (struct sockaddr *)&a, sizeof a) < 0)
			die("connect");
	} else if (argc == 3 && !strcmp(argv[1], "listen")) {
		a.svm_cid = VMADDR_CID_ANY;
		a.svm_port = atoi(argv[2]);
		if (bind(s, (struct sockaddr *)&a, sizeof a) < 0)
			die("bind");
		if (listen(s, 1) < 0)
			die("listen");
		int c = accept(s, NULL, NULL);
		if (c < 0)
			die("accept");
		close(s);
		s = c;
	} else {
		fprintf(stderr, "usage: vsock-io connect CID PORT | listen PORT\n");
		return 2;
	}
	static char buf[1 << 16];
	int in_open = 1, sock_open = 1;
	while (sock_open || in_open) {
		struct pollfd p[2] = {{.fd = sock_open ? s : -1, .events = POLLIN},
				      {.fd = in_open ? 0 : -1, .events = POLLIN}};
		if (poll(p, 2, -1) < 0) {
			if (errno == EINTR)
				continue;
			die("poll");
		}
		if (p[0].revents) {
			ssize_t n = read(s, buf, sizeof buf);
			if (n < 0 && errno != EINTR)
				die("read socket");
			if (n == 0)
				sock_open = 0;
			if (n > 0)
				write_all(1, buf, n);
		}
		if (in_open && p[1].revents) {
			ssize_t n = read(0, buf, sizeof buf);
			if (n < 0 && errno != EINTR)
				die("read stdin");
			if (n == 0) {
				in_open = 0;
				shutdown(s, SHUT_WR);
			}
			if (n > 0)
				write_all(s, buf, n);
		}
	}
	return 0;
}
