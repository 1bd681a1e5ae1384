/*
 * memhog: a memory-heavy test workload with verifiable contents (DistriProc test image).
 *
 *   memhog serve --mib N [--procs P] [--threads T] [--port 7070] [--seed S] [--zero-pct Z]
 *   memhog query [--pid PID] [--port 7070] [--timeout-ms 10000] [--time-to-first-response]
 *                [--no-lo-up] CMD...
 *
 * serve: allocates N MiB of private anonymous memory (one mmap per process) split over P
 * processes (the parent forks P-1 children before it creates any thread) and T threads per
 * process. Global page g (0 .. N*256-1) belongs to process p = the p-th contiguous share and,
 * inside it, to one thread's contiguous slice; that thread fills it at start-up and computes
 * over it on every request. Page contents depend only on (seed, g):
 *
 *   zero(g)   = epoch(g) == 0 && mix(seed ^ ZERO_SALT ^ g * GOLDEN) % 100 < Z  (all-zero page)
 *   base(g)   = mix(seed ^ g * PAGE_MUL)                            if epoch(g) == 0
 *             = mix(seed ^ g * PAGE_MUL ^ mix(epoch(g) * EPOCH_SALT)) otherwise
 *   word(g,i) = mix(base(g) + (i + 1) * GOLDEN)      i = 0..511 (8-byte words, little endian)
 *
 * where mix() is the splitmix64 finaliser and epoch(g) the number of the last WRITE that
 * rewrote page g (0: never rewritten). WRITE <pct> number e rewrites the pages whose g % 100
 * falls in the next pct residues of a cursor that starts at 0 and advances by pct each time
 * (so ten WRITE 10 rewrite every page once); epoch(g) = last[g % 100] is process state, kept
 * by every process alike and carried through checkpoints with the rest of its memory. The checksum is
 *
 *   SUM = sum over g of mix(page_hash(page g) ^ g * PAGE_MUL)      (mod 2^64)
 *
 * which is order dependent per page (page g must hold page g's data) but can be added up in
 * parallel. Line protocol on TCP 0.0.0.0:PORT (one command per connection; the server closes
 * the connection after its reply, so no established socket lingers into a checkpoint):
 *
 *   PING        -> PONG
 *   SUM         -> SUM <16 hex> pages=<n>      checksum over the memory of all processes
 *   EXPECT      -> SUM <16 hex> pages=<n>      same, from the generator, memory untouched
 *   VERIFY      -> OK pages=<n> | BAD page=<idx> proc=<p>   (lowest bad global page index)
 *   TOUCH <pct> -> OK                          reads one word of pct% of the pages
 *   WRITE <pct> -> OK pages=<n>                rewrites pct% of the pages (see epoch above)
 *   anything else -> ERR <reason>
 *
 * The parent serves TCP and asks the children over socketpairs ("<CMD> <arg>\n" ->
 * "R <hex>\n"). The parent answers PONG only after every process has filled its memory.
 *
 * query: with --pid, setns() into /proc/PID/ns/net first; connects to 127.0.0.1:PORT retrying
 * every 1 ms (also when the connection is reset before a reply) until the timeout, sends CMD,
 * prints the reply line. Exit 0 on a reply, 2 on timeout, 1 on other errors. After setns() it
 * sets the netns's lo up if it is down (restored containers come back with lo down; see
 * ensure_lo_up; --no-lo-up disables that). With
 * --time-to-first-response a second line "ttfr_us=<microseconds>" (from start to reply) follows.
 *
 * Built static (gcc -O2 -static -pthread); survives CRIU checkpoint/restore (EINTR handled,
 * SIGPIPE ignored, no tty needed, stdio only used for one start-up line and errors).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <arpa/inet.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define GOLDEN 0x9E3779B97F4A7C15ull
#define PAGE_MUL 0xD1B54A32D192ED03ull
#define ZERO_SALT 0x5A17E5A1A5A17E00ull
#define EPOCH_SALT 0x6C8E9CF570932BD5ull
#define MAX_PROCS 64
#define MAX_THREADS 64
#define LINE_MAX_LEN 256

/* ------------------------------------------------------------------ generator and hashing */

static inline uint64_t mix(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static uint64_t g_seed = 1;
static unsigned g_zero_pct = 0;
/* WRITE state: the epoch of the last WRITE, the epoch per residue g % 100, the cursor. */
static uint32_t g_epoch;
static uint32_t g_last_epoch[100];
static unsigned g_write_cursor;

static inline uint32_t page_epoch(uint64_t g) { return g_last_epoch[g % 100u]; }

static inline int page_is_zero(uint64_t g)
{
	return g_zero_pct > 0 && page_epoch(g) == 0 &&
	       mix(g_seed ^ ZERO_SALT ^ (g * GOLDEN)) % 100u < g_zero_pct;
}

/* Starts WRITE <pct>: the next pct residues from the cursor get a new epoch. */
static void begin_write(uint64_t pct)
{
	g_epoch++;
	for (uint64_t i = 0; i < pct; i++)
		g_last_epoch[(g_write_cursor + i) % 100u] = g_epoch;
	g_write_cursor = (unsigned)((g_write_cursor + pct) % 100u);
}

static void gen_page(uint64_t g, uint64_t *out)
{
	if (page_is_zero(g)) {
		memset(out, 0, PAGE);
		return;
	}
	uint64_t base = mix(g_seed ^ (g * PAGE_MUL));
	if (page_epoch(g) != 0)
		base = mix(base ^ mix((uint64_t)page_epoch(g) * EPOCH_SALT));
	for (unsigned i = 0; i < WORDS; i++)
		out[i] = mix(base + (uint64_t)(i + 1) * GOLDEN);
}

static uint64_t page_hash(const uint64_t *w)
{
	uint64_t a = 0x243F6A8885A308D3ull, b = 0x13198A2E03707344ull;
	uint64_t c = 0xA4093822299F31D0ull, d = 0x082EFA98EC4E6C89ull;
	for (unsigned i = 0; i < WORDS; i += 4) {
		a = rotl(a ^ w[i + 0], 29) * GOLDEN;
		b = rotl(b ^ w[i + 1], 31) * PAGE_MUL;
		c = rotl(c ^ w[i + 2], 27) * GOLDEN;
		d = rotl(d ^ w[i + 3], 33) * PAGE_MUL;
	}
	return mix(a ^ rotl(b, 16) ^ rotl(c, 32) ^ rotl(d, 48));
}

static inline uint64_t page_term(uint64_t hash, uint64_t g) { return mix(hash ^ (g * PAGE_MUL)); }

/* ------------------------------------------------------------------ small utilities */

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("memhog: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

static uint64_t now_us(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}

static int write_all(int fd, const char *buf, size_t len)
{
	while (len > 0) {
		ssize_t n = write(fd, buf, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		buf += n;
		len -= (size_t)n;
	}
	return 0;
}

/*
 * Reads one '\n'-terminated line (without the newline) into buf. timeout_ms < 0: no timeout.
 * Returns the length, -1 on error/EOF before a newline, -2 on timeout.
 */
static int read_line(int fd, char *buf, size_t cap, int timeout_ms)
{
	size_t len = 0;
	uint64_t deadline = timeout_ms >= 0 ? now_us() + (uint64_t)timeout_ms * 1000u : 0;
	for (;;) {
		if (timeout_ms >= 0) {
			uint64_t now = now_us();
			if (now >= deadline)
				return -2;
			struct pollfd p = {.fd = fd, .events = POLLIN};
			int r = poll(&p, 1, (int)((deadline - now + 999) / 1000));
			if (r < 0 && errno == EINTR)
				continue;
			if (r < 0)
				return -1;
			if (r == 0)
				return -2;
		}
		char ch;
		ssize_t n = read(fd, &ch, 1);
		if (n < 0) {
			if (errno == EINTR || errno == EAGAIN)
				continue;
			return -1;
		}
		if (n == 0)
			return -1;
		if (ch == '\n') {
			if (len > 0 && buf[len - 1] == '\r')
				len--;
			buf[len] = '\0';
			return (int)len;
		}
		if (len + 1 < cap)
			buf[len++] = ch;
	}
}

static uint64_t parse_u64(const char *opt, const char *s)
{
	char *end;
	errno = 0;
	unsigned long long v = strtoull(s, &end, 0);
	if (errno || end == s || *end != '\0' || s[0] == '-')
		die("invalid value for %s: '%s'", opt, s);
	return (uint64_t)v;
}

/* ------------------------------------------------------------------ per-process worker pool */

enum job { JOB_FILL, JOB_SUM, JOB_EXPECT, JOB_VERIFY, JOB_TOUCH, JOB_WRITE };

struct worker {
	pthread_t th;
	uint64_t first, count; /* global page range of this thread */
	uint8_t *mem;          /* address of page `first` */
	uint64_t result;
};

static struct {
	pthread_mutex_t mu;
	pthread_cond_t cv_job, cv_done;
	uint64_t gen;
	enum job job;
	uint64_t arg;
	unsigned done;
	unsigned nthreads;
	struct worker w[MAX_THREADS];
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER,
	  .cv_job = PTHREAD_COND_INITIALIZER,
	  .cv_done = PTHREAD_COND_INITIALIZER};

static uint64_t run_job(struct worker *w, enum job job, uint64_t arg)
{
	static const uint64_t none = UINT64_MAX;
	uint64_t buf[WORDS];
	uint64_t acc = 0;
	switch (job) {
	case JOB_FILL:
		for (uint64_t i = 0; i < w->count; i++)
			if (!page_is_zero(w->first + i))
				gen_page(w->first + i, (uint64_t *)(w->mem + i * PAGE));
		return 0;
	case JOB_SUM:
		for (uint64_t i = 0; i < w->count; i++)
			acc += page_term(page_hash((const uint64_t *)(w->mem + i * PAGE)), w->first + i);
		return acc;
	case JOB_EXPECT:
		for (uint64_t i = 0; i < w->count; i++) {
			gen_page(w->first + i, buf);
			acc += page_term(page_hash(buf), w->first + i);
		}
		return acc;
	case JOB_VERIFY:
		for (uint64_t i = 0; i < w->count; i++) {
			gen_page(w->first + i, buf);
			if (memcmp(buf, w->mem + i * PAGE, PAGE) != 0)
				return w->first + i;
		}
		return none;
	case JOB_TOUCH:
		for (uint64_t i = 0; i < w->count; i++)
			if ((w->first + i) % 100u < arg)
				acc += *(volatile uint64_t *)(w->mem + i * PAGE);
		return acc;
	case JOB_WRITE:
		for (uint64_t i = 0; i < w->count; i++)
			if (page_epoch(w->first + i) == g_epoch) {
				gen_page(w->first + i, (uint64_t *)(w->mem + i * PAGE));
				acc++;
			}
		return acc;
	}
	return 0;
}

static void *worker_main(void *p)
{
	struct worker *w = p;
	uint64_t seen = 0;
	for (;;) {
		pthread_mutex_lock(&pool.mu);
		while (pool.gen == seen)
			pthread_cond_wait(&pool.cv_job, &pool.mu);
		seen = pool.gen;
		enum job job = pool.job;
		uint64_t arg = pool.arg;
		pthread_mutex_unlock(&pool.mu);

		uint64_t r = run_job(w, job, arg);

		pthread_mutex_lock(&pool.mu);
		w->result = r;
		pool.done++;
		pthread_cond_signal(&pool.cv_done);
		pthread_mutex_unlock(&pool.mu);
	}
	return NULL;
}

/* Runs a job on every thread of this process and combines the results. */
static uint64_t pool_run(enum job job, uint64_t arg)
{
	if (job == JOB_WRITE)
		begin_write(arg);
	pthread_mutex_lock(&pool.mu);
	pool.job = job;
	pool.arg = arg;
	pool.done = 0;
	pool.gen++;
	pthread_cond_broadcast(&pool.cv_job);
	while (pool.done < pool.nthreads)
		pthread_cond_wait(&pool.cv_done, &pool.mu);
	uint64_t r = job == JOB_VERIFY ? UINT64_MAX : 0;
	for (unsigned t = 0; t < pool.nthreads; t++) {
		if (job == JOB_VERIFY) {
			if (pool.w[t].result < r)
				r = pool.w[t].result;
		} else {
			r += pool.w[t].result;
		}
	}
	pthread_mutex_unlock(&pool.mu);
	return r;
}

/* Maps this process's share [first, first+count) and starts its threads, which fill it. */
static void pool_start(uint64_t first, uint64_t count, unsigned nthreads)
{
	uint8_t *mem = NULL;
	if (count > 0) {
		mem = mmap(NULL, count * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
			   -1, 0);
		if (mem == MAP_FAILED)
			die("mmap of %" PRIu64 " pages failed: %s", count, strerror(errno));
	}
	pool.nthreads = nthreads;
	for (unsigned t = 0; t < nthreads; t++) {
		struct worker *w = &pool.w[t];
		uint64_t a = count * t / nthreads, b = count * (t + 1) / nthreads;
		w->first = first + a;
		w->count = b - a;
		w->mem = mem + a * PAGE;
		int e = pthread_create(&w->th, NULL, worker_main, w);
		if (e)
			die("pthread_create: %s", strerror(e));
	}
	pool_run(JOB_FILL, 0);
}

/* ------------------------------------------------------------------ serve */

struct child {
	pid_t pid;
	int fd;
};

static struct child g_children[MAX_PROCS];
static unsigned g_nprocs = 1;
static uint64_t g_total_pages;

static int parse_job(const char *cmd, enum job *job, uint64_t *arg)
{
	*arg = 0;
	if (strcmp(cmd, "SUM") == 0)
		*job = JOB_SUM;
	else if (strcmp(cmd, "EXPECT") == 0)
		*job = JOB_EXPECT;
	else if (strcmp(cmd, "VERIFY") == 0)
		*job = JOB_VERIFY;
	else if (strncmp(cmd, "TOUCH ", 6) == 0 || strncmp(cmd, "WRITE ", 6) == 0) {
		char *end;
		unsigned long v = strtoul(cmd + 6, &end, 10);
		if (end == cmd + 6 || *end != '\0' || v > 100)
			return -1;
		*job = cmd[0] == 'T' ? JOB_TOUCH : JOB_WRITE;
		*arg = v;
	} else
		return -1;
	return 0;
}

static const char *job_word(enum job j)
{
	switch (j) {
	case JOB_SUM: return "SUM";
	case JOB_EXPECT: return "EXPECT";
	case JOB_VERIFY: return "VERIFY";
	case JOB_TOUCH: return "TOUCH";
	case JOB_WRITE: return "WRITE";
	default: return "FILL";
	}
}

/* Child main loop: "<JOB> <arg>\n" -> "R <hex>\n". Exits when the parent goes away. */
static void child_loop(int fd)
{
	char line[LINE_MAX_LEN];
	for (;;) {
		int n = read_line(fd, line, sizeof line, -1);
		if (n < 0)
			_exit(0);
		char word[16];
		unsigned long long arg = 0;
		enum job job;
		uint64_t targ;
		char cmd[LINE_MAX_LEN];
		if (sscanf(line, "%15s %llu", word, &arg) < 1)
			_exit(1);
		if (strcmp(word, "TOUCH") == 0 || strcmp(word, "WRITE") == 0)
			snprintf(cmd, sizeof cmd, "%s %llu", word, arg);
		else
			snprintf(cmd, sizeof cmd, "%s", word);
		if (parse_job(cmd, &job, &targ) != 0)
			_exit(1);
		uint64_t r = pool_run(job, targ);
		char out[64];
		int len = snprintf(out, sizeof out, "R %016" PRIx64 "\n", r);
		if (write_all(fd, out, (size_t)len) != 0)
			_exit(0);
	}
}

/* Runs a job over all processes; returns 0 and the combined result, or -1 (reason in err). */
static int run_everywhere(enum job job, uint64_t arg, uint64_t *res, unsigned *bad_proc,
			  char *err, size_t errcap)
{
	char msg[64];
	int len = snprintf(msg, sizeof msg, "%s %" PRIu64 "\n", job_word(job), arg);
	for (unsigned p = 1; p < g_nprocs; p++) {
		if (write_all(g_children[p].fd, msg, (size_t)len) != 0) {
			snprintf(err, errcap, "proc %u unreachable: %s", p, strerror(errno));
			return -1;
		}
	}
	uint64_t r = pool_run(job, arg);
	*bad_proc = 0;
	int failed = 0;
	for (unsigned p = 1; p < g_nprocs; p++) {
		char line[LINE_MAX_LEN];
		uint64_t v;
		if (read_line(g_children[p].fd, line, sizeof line, -1) < 0 ||
		    sscanf(line, "R %" SCNx64, &v) != 1) {
			if (!failed)
				snprintf(err, errcap, "proc %u did not answer", p);
			failed = 1;
			continue;
		}
		if (job == JOB_VERIFY) {
			if (v < r) {
				r = v;
				*bad_proc = p;
			}
		} else {
			r += v;
		}
	}
	*res = r;
	return failed ? -1 : 0;
}

static void handle_command(const char *cmd, char *reply, size_t cap)
{
	if (strcmp(cmd, "PING") == 0) {
		snprintf(reply, cap, "PONG");
		return;
	}
	enum job job;
	uint64_t arg, res;
	unsigned bad_proc;
	char err[128];
	if (parse_job(cmd, &job, &arg) != 0) {
		snprintf(reply, cap, "ERR unknown command");
		return;
	}
	if (run_everywhere(job, arg, &res, &bad_proc, err, sizeof err) != 0) {
		snprintf(reply, cap, "ERR %s", err);
		return;
	}
	switch (job) {
	case JOB_SUM:
	case JOB_EXPECT:
		snprintf(reply, cap, "SUM %016" PRIx64 " pages=%" PRIu64, res, g_total_pages);
		break;
	case JOB_VERIFY:
		if (res == UINT64_MAX)
			snprintf(reply, cap, "OK pages=%" PRIu64, g_total_pages);
		else
			snprintf(reply, cap, "BAD page=%" PRIu64 " proc=%u", res, bad_proc);
		break;
	case JOB_WRITE:
		snprintf(reply, cap, "OK pages=%" PRIu64, res);
		break;
	default:
		snprintf(reply, cap, "OK");
	}
}

static void on_term(int sig)
{
	(void)sig;
	for (unsigned p = 1; p < g_nprocs; p++)
		if (g_children[p].pid > 0)
			kill(g_children[p].pid, SIGKILL);
	_exit(0);
}

static void usage(void)
{
	fputs("usage: memhog serve --mib N [--procs P] [--threads T] [--port 7070] [--seed S] "
	      "[--zero-pct Z]\n"
	      "       memhog query [--pid PID] [--port 7070] [--timeout-ms 10000] "
	      "[--time-to-first-response] [--no-lo-up] CMD...\n",
	      stderr);
	exit(1);
}

static int serve(int argc, char **argv)
{
	uint64_t mib = 0, port = 7070, procs = 1, threads = 1;
	int have_mib = 0;
	for (int i = 0; i < argc; i++) {
		const char *o = argv[i];
		if (i + 1 >= argc)
			usage();
		const char *v = argv[++i];
		if (strcmp(o, "--mib") == 0) {
			mib = parse_u64(o, v);
			have_mib = 1;
		} else if (strcmp(o, "--procs") == 0)
			procs = parse_u64(o, v);
		else if (strcmp(o, "--threads") == 0)
			threads = parse_u64(o, v);
		else if (strcmp(o, "--port") == 0)
			port = parse_u64(o, v);
		else if (strcmp(o, "--seed") == 0)
			g_seed = parse_u64(o, v);
		else if (strcmp(o, "--zero-pct") == 0)
			g_zero_pct = (unsigned)parse_u64(o, v);
		else
			usage();
	}
	if (!have_mib || mib == 0)
		die("--mib N (N >= 1) is required");
	if (mib > (1u << 20))
		die("--mib %" PRIu64 " is too large", mib);
	if (procs < 1 || procs > MAX_PROCS)
		die("--procs must be 1..%d", MAX_PROCS);
	if (threads < 1 || threads > MAX_THREADS)
		die("--threads must be 1..%d", MAX_THREADS);
	if (port < 1 || port > 65535)
		die("--port must be 1..65535");
	if (g_zero_pct > 100)
		die("--zero-pct must be 0..100");

	signal(SIGPIPE, SIG_IGN);
	g_total_pages = mib * (1024u * 1024u / PAGE);
	g_nprocs = (unsigned)procs;

	/* Listen first so that a bad port fails before any memory is allocated; the socket is
	 * closed in the children. Connections wait in the backlog until the fill is done. */
	int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (lfd < 0)
		die("socket: %s", strerror(errno));
	int one = 1;
	setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				 .sin_addr.s_addr = htonl(INADDR_ANY)};
	if (bind(lfd, (struct sockaddr *)&sa, sizeof sa) != 0)
		die("bind 0.0.0.0:%" PRIu64 ": %s", port, strerror(errno));
	if (listen(lfd, 128) != 0)
		die("listen: %s", strerror(errno));

	pid_t parent = getpid();
	for (unsigned p = 1; p < g_nprocs; p++) {
		int sv[2];
		if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
			die("socketpair: %s", strerror(errno));
		pid_t pid = fork();
		if (pid < 0)
			die("fork: %s", strerror(errno));
		if (pid == 0) {
			prctl(PR_SET_PDEATHSIG, SIGKILL);
			if (getppid() != parent)
				_exit(0);
			close(lfd);
			close(sv[0]);
			for (unsigned q = 1; q < p; q++)
				close(g_children[q].fd);
			uint64_t first = g_total_pages * p / g_nprocs;
			uint64_t last = g_total_pages * (p + 1) / g_nprocs;
			pool_start(first, last - first, (unsigned)threads);
			if (write_all(sv[1], "READY\n", 6) != 0)
				_exit(1);
			child_loop(sv[1]);
			_exit(0);
		}
		close(sv[1]);
		g_children[p].pid = pid;
		g_children[p].fd = sv[0];
	}
	struct sigaction act = {.sa_handler = on_term};
	sigaction(SIGTERM, &act, NULL);
	sigaction(SIGINT, &act, NULL);

	pool_start(0, g_total_pages / g_nprocs, (unsigned)threads);
	for (unsigned p = 1; p < g_nprocs; p++) {
		char line[LINE_MAX_LEN];
		if (read_line(g_children[p].fd, line, sizeof line, -1) < 0 ||
		    strcmp(line, "READY") != 0)
			die("proc %u failed during start-up", p);
	}
	fprintf(stderr,
		"memhog: serving %" PRIu64 " MiB (%" PRIu64 " pages) in %u procs x %" PRIu64
		" threads, seed %" PRIu64 ", zero %u%%, on 0.0.0.0:%" PRIu64 "\n",
		mib, g_total_pages, g_nprocs, threads, g_seed, g_zero_pct, port);
	fflush(stderr);

	for (;;) {
		int cfd = accept4(lfd, NULL, NULL, SOCK_CLOEXEC);
		if (cfd < 0) {
			if (errno == EINTR || errno == ECONNABORTED || errno == EAGAIN)
				continue;
			if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
				usleep(10000);
				continue;
			}
			die("accept: %s", strerror(errno));
		}
		char line[LINE_MAX_LEN], reply[LINE_MAX_LEN + 16];
		if (read_line(cfd, line, sizeof line, 10000) >= 0) {
			handle_command(line, reply, sizeof reply - 1);
			size_t len = strlen(reply);
			reply[len++] = '\n';
			write_all(cfd, reply, len);
		}
		close(cfd);
		/* Reap children that died (their commands then report ERR). */
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
	}
}

/* ------------------------------------------------------------------ query */

/*
 * Containers restored by runc/CRIU through containerd come back with their loopback device
 * down (the checkpoint carries no netdev images for the container's netns: seen with CRIU
 * 4.2.1, runc 1.1.5, containerd 1.7 and 2.1 here), so nothing could reach 127.0.0.1 inside.
 * After setns() the query client sets lo up, as runc does when it creates the netns.
 */
static void ensure_lo_up(long pid)
{
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return;
	struct ifreq ifr;
	memset(&ifr, 0, sizeof ifr);
	strcpy(ifr.ifr_name, "lo");
	if (ioctl(fd, SIOCGIFFLAGS, &ifr) == 0 && !(ifr.ifr_flags & IFF_UP)) {
		ifr.ifr_flags |= IFF_UP;
		if (ioctl(fd, SIOCSIFFLAGS, &ifr) == 0)
			fprintf(stderr, "memhog: lo was down in the netns of pid %ld; set it up\n", pid);
		else
			fprintf(stderr, "memhog: lo is down in the netns of pid %ld: %s\n", pid,
				strerror(errno));
	}
	close(fd);
}

static int query(int argc, char **argv)
{
	long pid = -1;
	uint64_t port = 7070, timeout_ms = 10000;
	int ttfr = 0, lo_up = 1, i = 0;
	for (; i < argc; i++) {
		const char *o = argv[i];
		if (strncmp(o, "--", 2) != 0)
			break;
		if (strcmp(o, "--time-to-first-response") == 0) {
			ttfr = 1;
			continue;
		}
		if (strcmp(o, "--no-lo-up") == 0) {
			lo_up = 0;
			continue;
		}
		if (i + 1 >= argc)
			usage();
		const char *v = argv[++i];
		if (strcmp(o, "--pid") == 0)
			pid = (long)parse_u64(o, v);
		else if (strcmp(o, "--port") == 0)
			port = parse_u64(o, v);
		else if (strcmp(o, "--timeout-ms") == 0)
			timeout_ms = parse_u64(o, v);
		else
			usage();
	}
	if (i >= argc)
		usage();
	char cmd[LINE_MAX_LEN];
	size_t len = 0;
	for (; i < argc; i++) {
		int n = snprintf(cmd + len, sizeof cmd - len, "%s%s", len ? " " : "", argv[i]);
		if (n < 0 || (size_t)n >= sizeof cmd - len)
			die("command too long");
		len += (size_t)n;
	}
	cmd[len++] = '\n';

	signal(SIGPIPE, SIG_IGN);
	uint64_t start = now_us();
	if (pid >= 0) {
		char path[64];
		snprintf(path, sizeof path, "/proc/%ld/ns/net", pid);
		int nfd = open(path, O_RDONLY | O_CLOEXEC);
		if (nfd < 0)
			die("open %s: %s", path, strerror(errno));
		if (setns(nfd, CLONE_NEWNET) != 0)
			die("setns %s: %s", path, strerror(errno));
		close(nfd);
		if (lo_up)
			ensure_lo_up(pid);
	}
	uint64_t deadline = start + timeout_ms * 1000u;
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
				 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	for (;;) {
		uint64_t now = now_us();
		if (now >= deadline)
			break;
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			die("socket: %s", strerror(errno));
		int r;
		do
			r = connect(fd, (struct sockaddr *)&sa, sizeof sa);
		while (r != 0 && errno == EINTR);
		if (r == 0 && write_all(fd, cmd, len) == 0) {
			char reply[LINE_MAX_LEN * 2];
			uint64_t t = now_us();
			int left_ms = t < deadline ? (int)((deadline - t + 999) / 1000) : 0;
			int n = read_line(fd, reply, sizeof reply, left_ms);
			if (n >= 0) {
				uint64_t took = now_us() - start;
				close(fd);
				printf("%s\n", reply);
				if (ttfr)
					printf("ttfr_us=%" PRIu64 "\n", took);
				fflush(stdout);
				return 0;
			}
			if (n == -2) {
				close(fd);
				break;
			}
		}
		close(fd);
		usleep(1000);
	}
	fprintf(stderr, "memhog: no reply from 127.0.0.1:%" PRIu64 "%s within %" PRIu64 " ms\n",
		port, pid >= 0 ? " (in the target's netns)" : "", timeout_ms);
	return 2;
}

int main(int argc, char **argv)
{
	if (argc < 2)
		usage();
	if (strcmp(argv[1], "serve") == 0)
		return serve(argc - 2, argv + 2);
	if (strcmp(argv[1], "query") == 0)
		return query(argc - 2, argv + 2);
	usage();
	return 1;
}
