// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//
// hsa-tests: the ROCm scenarios of the vhost-gpu-nc QEMU suite. Built with
// Debian's gcc against Debian's libhsa-runtime-dev 5.2.3 and run on
// Debian's unmodified ROCr over our libhsakmt.so.1.
//
//   hsa-tests CASE[,CASE...] | all
//
// Every case prints exactly one line "RESULT rocm/<case> PASS|FAIL <detail>";
// the exit status is 0 only if all passed. Data is always verified against
// a pattern the CPU wrote (never the zero page). Device fault counters come
// from the thunk's debug hook vgncKmtQueryCounters (docs/rocm.md).

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sched.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hsa/hsa.h>
#include <hsa/hsa_ext_amd.h>

#define COPY_BYTES (64u << 20)
#define WAIT_NS (60ull * 1000 * 1000 * 1000)

static const char *self_path;
static hsa_agent_t cpu_agent, gpu_agent;
static hsa_amd_memory_pool_t sys_pool, kernarg_pool, gpu_pool;
static bool have_sys_pool, have_kernarg_pool, have_gpu_pool;
static char fail_msg[512];

/* Pool allocations of the running case, freed after it whatever its
 * outcome, so that one failing case does not starve the next. */
static void *allocs[16];
static int nallocs;

static hsa_status_t pool_alloc(hsa_amd_memory_pool_t pool, size_t size, void **p)
{
	hsa_status_t s = hsa_amd_memory_pool_allocate(pool, size, 0, p);

	if (s == HSA_STATUS_SUCCESS && nallocs < 16)
		allocs[nallocs++] = *p;
	return s;
}

static void pool_free(void *p)
{
	for (int i = 0; i < nallocs; i++)
		if (allocs[i] == p)
			allocs[i] = NULL;
	hsa_amd_memory_pool_free(p);
}

static void free_case_allocs(void)
{
	for (int i = 0; i < nallocs; i++)
		if (allocs[i])
			hsa_amd_memory_pool_free(allocs[i]);
	nallocs = 0;
}

static int fail(const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	vsnprintf(fail_msg, sizeof(fail_msg), fmt, ap);
	va_end(ap);
	return -1;
}

#define CHECK(expr, ...) do { if (!(expr)) return fail(__VA_ARGS__); } while (0)
#define HSA_OK(call) do {                                                     \
	hsa_status_t s_ = (call);                                             \
	if (s_ != HSA_STATUS_SUCCESS) {                                       \
		const char *m_ = NULL;                                        \
		hsa_status_string(s_, &m_);                                   \
		return fail("%s: %#x %s", #call, s_, m_ ? m_ : "");          \
	}                                                                     \
} while (0)

/* CPU seconds this process used so far (all threads: ROCr's, the thunk's). */
static double cpu_s(void)
{
	struct rusage ru;

	getrusage(RUSAGE_SELF, &ru);
	return ru.ru_utime.tv_sec + ru.ru_stime.tv_sec + (ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

static double now_s(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* The thunk's device counters: faults raised, resolved, rejected, timed
 * out, cancelled, bound bytes, fault records handled, interrupts, the
 * transport profile (1 compat, 2 native), user queues offered (1/0), then
 * the device's QUEUE_COUNTERS: user-queue packets, copy bytes, interrupts
 * raised, doorbell polls; then the fault resolver (1 the thunk's
 * user-space one, 2 the guest kernel's). */
enum { C_RAISED, C_RESOLVED, C_REJECTED, C_TIMED_OUT, C_CANCELLED, C_BOUND, C_HANDLED, C_IRQ_SEEN,
       C_PROFILE, C_QUEUES, C_UQ_PACKETS, C_COPY_BYTES, C_INTERRUPTS, C_DOORBELL_POLLS, C_RESOLVER, C_N };
struct counters { uint64_t v[C_N]; };

static int counters(struct counters *c)
{
	static int (*query)(uint64_t *, uint32_t);

	if (!query) {
		void *h = dlopen("libhsakmt.so.1", RTLD_NOW | RTLD_NOLOAD);

		query = h ? (int (*)(uint64_t *, uint32_t))dlvsym(h, "vgncKmtQueryCounters", "VGNC_DEBUG_1") : NULL;
		if (!query)
			return -1;
	}
	return query(c->v, C_N) == 0 ? 0 : -1;
}

static void fill_pattern(uint32_t *p, size_t words, uint32_t seed)
{
	for (size_t i = 0; i < words; i++)
		p[i] = (uint32_t)(i * 2654435761u) ^ seed;
}

static long check_pattern(const uint32_t *p, size_t words, uint32_t seed)
{
	for (size_t i = 0; i < words; i++)
		if (p[i] != ((uint32_t)(i * 2654435761u) ^ seed))
			return (long)i;
	return -1;
}

/* --- discovery ------------------------------------------------------- */

static hsa_status_t pool_cb(hsa_amd_memory_pool_t pool, void *data)
{
	hsa_amd_segment_t seg;
	uint32_t flags = 0;
	bool alloc = false;
	bool gpu = data != NULL;

	hsa_amd_memory_pool_get_info(pool, HSA_AMD_MEMORY_POOL_INFO_SEGMENT, &seg);
	hsa_amd_memory_pool_get_info(pool, HSA_AMD_MEMORY_POOL_INFO_RUNTIME_ALLOC_ALLOWED, &alloc);
	if (seg != HSA_AMD_SEGMENT_GLOBAL || !alloc)
		return HSA_STATUS_SUCCESS;
	hsa_amd_memory_pool_get_info(pool, HSA_AMD_MEMORY_POOL_INFO_GLOBAL_FLAGS, &flags);
	if (gpu && !have_gpu_pool) {
		gpu_pool = pool;
		have_gpu_pool = true;
	} else if (!gpu && (flags & HSA_AMD_MEMORY_POOL_GLOBAL_FLAG_KERNARG_INIT)) {
		kernarg_pool = pool;
		have_kernarg_pool = true;
	} else if (!gpu && (flags & HSA_AMD_MEMORY_POOL_GLOBAL_FLAG_FINE_GRAINED) && !have_sys_pool) {
		sys_pool = pool;
		have_sys_pool = true;
	}
	return HSA_STATUS_SUCCESS;
}

static int agents_found, gpus_found;

static hsa_status_t agent_cb(hsa_agent_t agent, void *data)
{
	hsa_device_type_t type;

	(void)data;
	agents_found++;
	hsa_agent_get_info(agent, HSA_AGENT_INFO_DEVICE, &type);
	if (type == HSA_DEVICE_TYPE_CPU && cpu_agent.handle == 0) {
		cpu_agent = agent;
		hsa_amd_agent_iterate_memory_pools(agent, pool_cb, NULL);
	} else if (type == HSA_DEVICE_TYPE_GPU) {
		gpus_found++;
		if (gpu_agent.handle == 0) {
			gpu_agent = agent;
			hsa_amd_agent_iterate_memory_pools(agent, pool_cb, (void *)1);
		}
	}
	return HSA_STATUS_SUCCESS;
}

static char isa_name[128];

static hsa_status_t isa_cb(hsa_isa_t isa, void *data)
{
	uint32_t len = 0;

	(void)data;
	hsa_isa_get_info_alt(isa, HSA_ISA_INFO_NAME_LENGTH, &len);
	if (len < sizeof(isa_name))
		hsa_isa_get_info_alt(isa, HSA_ISA_INFO_NAME, isa_name);
	return HSA_STATUS_SUCCESS;
}

static int case_agents(char *detail, size_t n)
{
	char name[64] = { 0 };
	uint32_t cus = 0;
	size_t fb = 0;

	CHECK(agents_found == 2 && gpus_found == 1, "%d agents, %d GPUs", agents_found, gpus_found);
	HSA_OK(hsa_agent_get_info(gpu_agent, HSA_AGENT_INFO_NAME, name));
	CHECK(strcmp(name, "gfx90a") == 0, "GPU name '%s'", name);
	HSA_OK(hsa_agent_iterate_isas(gpu_agent, isa_cb, NULL));
	CHECK(strstr(isa_name, "gfx90a") && strstr(isa_name, "xnack+"), "ISA '%s'", isa_name);
	HSA_OK(hsa_agent_get_info(gpu_agent, (hsa_agent_info_t)HSA_AMD_AGENT_INFO_COMPUTE_UNIT_COUNT, &cus));
	CHECK(cus > 0, "0 compute units");
	CHECK(have_sys_pool && have_kernarg_pool && have_gpu_pool, "pools: system %d kernarg %d gpu %d",
	      have_sys_pool, have_kernarg_pool, have_gpu_pool);
	HSA_OK(hsa_amd_memory_pool_get_info(gpu_pool, HSA_AMD_MEMORY_POOL_INFO_SIZE, &fb));
	CHECK(fb >= COPY_BYTES, "GPU pool of %zu bytes", fb);
	struct counters c;

	const char *want = getenv("NC_PROFILE");
	const char *profile;

	CHECK(counters(&c) == 0, "no vgncKmtQueryCounters in libhsakmt.so.1");
	profile = c.v[C_PROFILE] == 2 ? "native" : "compat";
	CHECK(!want || !*want || strcmp(want, profile) == 0, "the thunk uses the %s profile, the suite booted %s",
	      profile, want);
	snprintf(detail, n, "%s, ISA %s, %u CUs, GPU pool %zu MiB, system+kernarg pools, %s profile", name, isa_name,
		 cus, fb >> 20, profile);
	return 0;
}

/* --- pool allocation and access ---------------------------------------- */

static int case_pools(char *detail, size_t n)
{
	void *g = NULL, *s = NULL;
	hsa_amd_pointer_info_t info = { .size = sizeof(info) };
	hsa_amd_memory_pool_access_t access;

	HSA_OK(pool_alloc(gpu_pool, COPY_BYTES, &g));
	HSA_OK(pool_alloc(sys_pool, 1 << 20, &s));
	HSA_OK(hsa_amd_agents_allow_access(1, &gpu_agent, NULL, s));
	HSA_OK(hsa_amd_agents_allow_access(1, &cpu_agent, NULL, g));
	HSA_OK(hsa_amd_pointer_info(g, &info, NULL, NULL, NULL));
	CHECK(info.type == HSA_EXT_POINTER_TYPE_HSA && info.sizeInBytes == COPY_BYTES,
	      "GPU allocation info type %d size %zu", info.type, info.sizeInBytes);
	HSA_OK(hsa_amd_agent_memory_pool_get_info(gpu_agent, sys_pool, HSA_AMD_AGENT_MEMORY_POOL_INFO_ACCESS, &access));
	CHECK(access != HSA_AMD_MEMORY_POOL_ACCESS_NEVER_ALLOWED, "GPU can never reach system memory");
	/* The CPU writes and reads the system allocation. */
	fill_pattern(s, (1 << 20) / 4, 0x5eed);
	CHECK(check_pattern(s, (1 << 20) / 4, 0x5eed) < 0, "system memory readback");
	pool_free(g);
	pool_free(s);
	info.size = sizeof(info);
	CHECK(hsa_amd_pointer_info(g, &info, NULL, NULL, NULL) != HSA_STATUS_SUCCESS ||
	      info.type == HSA_EXT_POINTER_TYPE_UNKNOWN, "freed pointer still known");
	snprintf(detail, n, "64 MiB GPU pool + 1 MiB system pool allocated, allow_access, pointer info, freed");
	return 0;
}

/* --- signals ------------------------------------------------------------ */

struct store_arg { hsa_signal_t sig; long value; };

static void *delayed_store(void *p)
{
	struct store_arg *a = p;

	usleep(50 * 1000);
	hsa_signal_store_screlease(a->sig, a->value);
	return NULL;
}

static int case_signals(char *detail, size_t n)
{
	hsa_signal_t sig;
	hsa_signal_value_t v;
	pthread_t t;
	struct store_arg arg;
	double t0, waited;

	HSA_OK(hsa_signal_create(5, 0, NULL, &sig));
	CHECK(hsa_signal_load_scacquire(sig) == 5, "initial value");
	hsa_signal_add_screlease(sig, 10);
	hsa_signal_subtract_screlease(sig, 3);
	CHECK(hsa_signal_load_relaxed(sig) == 12, "add/subtract: %ld", (long)hsa_signal_load_relaxed(sig));
	v = hsa_signal_cas_screlease(sig, 12, 40);
	CHECK(v == 12 && hsa_signal_load_relaxed(sig) == 40, "cas");
	v = hsa_signal_exchange_screlease(sig, 7);
	CHECK(v == 40 && hsa_signal_load_relaxed(sig) == 7, "exchange");
	/* A wait that times out: the timeout is in timestamp ticks (1 GHz). */
	t0 = now_s();
	v = hsa_signal_wait_scacquire(sig, HSA_SIGNAL_CONDITION_EQ, 99, 100ull * 1000 * 1000, HSA_WAIT_STATE_BLOCKED);
	waited = now_s() - t0;
	CHECK(v == 7 && waited >= 0.09, "timed wait returned %ld after %.3f s", (long)v, waited);
	/* A blocked wait woken by another thread's store: ROCr sleeps in
	 * hsaKmtWaitOnEvent and the store's hsaKmtSetEvent wakes it. */
	arg.sig = sig;
	arg.value = 0;
	pthread_create(&t, NULL, delayed_store, &arg);
	t0 = now_s();
	v = hsa_signal_wait_scacquire(sig, HSA_SIGNAL_CONDITION_LT, 1, WAIT_NS, HSA_WAIT_STATE_BLOCKED);
	waited = now_s() - t0;
	pthread_join(t, NULL);
	CHECK(v == 0, "woken wait saw %ld", (long)v);
	CHECK(waited < 5.0, "woken wait took %.3f s", waited);
	/* The cost of sleeping: a 500 ms blocked wait nobody ends, in CPU
	 * time of the whole process (ROCr spins ~200 us, then sleeps in the
	 * thunk; the thunk's interrupt thread keeps polling the device). */
	double c0 = cpu_s(), idle, busy;

	t0 = now_s();
	hsa_signal_wait_scacquire(sig, HSA_SIGNAL_CONDITION_EQ, 99, 500ull * 1000 * 1000, HSA_WAIT_STATE_BLOCKED);
	idle = (cpu_s() - c0) / (now_s() - t0) * 100;
	/* Baseline, same run: the same wait spinning (HSA_WAIT_STATE_ACTIVE). */
	c0 = cpu_s();
	t0 = now_s();
	hsa_signal_wait_scacquire(sig, HSA_SIGNAL_CONDITION_EQ, 99, 200ull * 1000 * 1000, HSA_WAIT_STATE_ACTIVE);
	busy = (cpu_s() - c0) / (now_s() - t0) * 100;
	printf("rocm/signals: a 500 ms blocked wait cost %.1f%% of one CPU; the same wait spinning: %.1f%%\n", idle,
	       busy);
	CHECK(idle < busy, "blocked wait (%.1f%%) no cheaper than spinning (%.1f%%)", idle, busy);
	HSA_OK(hsa_signal_destroy(sig));
	snprintf(detail, n, "load/store/add/cas/exchange, timed wait %.0f ms, cross-thread wake after %.0f ms, "
		 "idle wait %.1f%% CPU", 100.0, waited * 1000, idle);
	return 0;
}

/* --- copies --------------------------------------------------------------- */

static int copy_wait(void *dst, hsa_agent_t da, const void *src, hsa_agent_t sa, size_t size, double *secs)
{
	hsa_signal_t done;
	hsa_signal_value_t v;
	double t0;

	HSA_OK(hsa_signal_create(1, 0, NULL, &done));
	t0 = now_s();
	HSA_OK(hsa_amd_memory_async_copy(dst, da, src, sa, size, 0, NULL, done));
	v = hsa_signal_wait_scacquire(done, HSA_SIGNAL_CONDITION_LT, 1, WAIT_NS, HSA_WAIT_STATE_BLOCKED);
	*secs = now_s() - t0;
	hsa_signal_destroy(done);
	CHECK(v == 0, "copy did not complete in 60 s (signal %ld)", (long)v);
	return 0;
}

static double mibs(double secs) { return secs > 0 ? (COPY_BYTES / 1048576.0) / secs : 0; }

/* The device's user-queue counters between two snapshots, as one line. */
static void queue_delta(char *buf, size_t n, const struct counters *a, const struct counters *b)
{
	snprintf(buf, n, "user-queue packets %" PRIu64 ", copy bytes %" PRIu64 " (%.1f MiB), interrupts %" PRIu64
		 ", doorbell polls %" PRIu64,
		 b->v[C_UQ_PACKETS] - a->v[C_UQ_PACKETS], b->v[C_COPY_BYTES] - a->v[C_COPY_BYTES],
		 (b->v[C_COPY_BYTES] - a->v[C_COPY_BYTES]) / 1048576.0, b->v[C_INTERRUPTS] - a->v[C_INTERRUPTS],
		 b->v[C_DOORBELL_POLLS] - a->v[C_DOORBELL_POLLS]);
}

static int case_copy(char *detail, size_t n)
{
	void *g = NULL, *h = NULL, *back = NULL;
	double up, down, t0, base;
	struct counters before, after;
	char queues[256];
	long bad;

	HSA_OK(pool_alloc(gpu_pool, COPY_BYTES, &g));
	HSA_OK(pool_alloc(sys_pool, COPY_BYTES, &h));
	HSA_OK(pool_alloc(sys_pool, COPY_BYTES, &back));
	HSA_OK(hsa_amd_agents_allow_access(1, &gpu_agent, NULL, h));
	HSA_OK(hsa_amd_agents_allow_access(1, &gpu_agent, NULL, back));
	fill_pattern(h, COPY_BYTES / 4, 0xc0ffee);
	memset(back, 0xa5, COPY_BYTES);
	/* Same-run baseline: the CPU copying the same 64 MiB. */
	t0 = now_s();
	memcpy(back, h, COPY_BYTES);
	base = now_s() - t0;
	memset(back, 0xa5, COPY_BYTES);
	CHECK(counters(&before) == 0, "no vgncKmtQueryCounters in libhsakmt.so.1");
	if (copy_wait(g, gpu_agent, h, cpu_agent, COPY_BYTES, &up))
		return -1;
	if (copy_wait(back, cpu_agent, g, gpu_agent, COPY_BYTES, &down))
		return -1;
	CHECK(counters(&after) == 0, "counters");
	bad = check_pattern(back, COPY_BYTES / 4, 0xc0ffee);
	CHECK(bad < 0, "data wrong at word %ld: %#x", bad, bad < 0 ? 0 : ((uint32_t *)back)[bad]);
	queue_delta(queues, sizeof(queues), &before, &after);
	printf("rocm/copy: 64 MiB host->device %.1f MiB/s, device->host %.1f MiB/s (guest-side, TCG: informational), "
	       "CPU memcpy baseline %.1f MiB/s\n", mibs(up), mibs(down), mibs(base));
	printf("rocm/copy: device counters: %s\n", queues);
	/* The device's SDMA engine did the copying (not a CPU fallback). */
	CHECK(after.v[C_COPY_BYTES] - before.v[C_COPY_BYTES] >= 2ull * COPY_BYTES,
	      "the device copied %" PRIu64 " bytes, want >= %llu", after.v[C_COPY_BYTES] - before.v[C_COPY_BYTES],
	      2ull * COPY_BYTES);
	pool_free(g);
	pool_free(h);
	pool_free(back);
	snprintf(detail, n, "64 MiB H2D %.1f MiB/s + D2H %.1f MiB/s verified (memcpy %.1f MiB/s)",
		 mibs(up), mibs(down), mibs(base));
	return 0;
}

/* Many small copies in flight at once, enough to wrap the SDMA ring (ROCr's
 * is 1 MiB; a copy takes at least a 28-byte COPY_LINEAR and the 32-byte
 * ATOMIC that decrements its signal, 108 bytes with the HDP flush and the
 * event's FENCE and TRAP): every piece lands where it should. Then a copy that depends on a signal nobody has set yet: the
 * engine's POLL_REGMEM waits for it. */
#define STREAM_BYTES (8u << 20)

static int case_copy_stream(char *detail, size_t n)
{
	void *g = NULL, *h = NULL, *back = NULL;
	hsa_signal_t done, dep;
	hsa_signal_value_t v;
	struct counters before, after;
	size_t off = 0, copies = 0;
	uint32_t rnd = 12345;
	double t0, secs, waited;
	long bad;

	HSA_OK(pool_alloc(gpu_pool, STREAM_BYTES, &g));
	HSA_OK(pool_alloc(sys_pool, STREAM_BYTES, &h));
	HSA_OK(pool_alloc(sys_pool, STREAM_BYTES, &back));
	HSA_OK(hsa_amd_agents_allow_access(1, &gpu_agent, NULL, h));
	HSA_OK(hsa_amd_agents_allow_access(1, &gpu_agent, NULL, back));
	fill_pattern(h, STREAM_BYTES / 4, 0x57ea);
	memset(back, 0x5a, STREAM_BYTES);
	CHECK(counters(&before) == 0, "no vgncKmtQueryCounters in libhsakmt.so.1");
	/* Pieces of 4 .. 512 bytes (multiples of 4), all on one signal. */
	size_t pieces = 0;

	for (size_t o = 0; o < STREAM_BYTES; pieces++) {
		rnd = rnd * 1103515245u + 12345u;
		o += 4 + (rnd >> 16) % 128 * 4;
	}
	HSA_OK(hsa_signal_create((hsa_signal_value_t)pieces, 0, NULL, &done));
	rnd = 12345;
	t0 = now_s();
	while (off < STREAM_BYTES) {
		size_t len;

		rnd = rnd * 1103515245u + 12345u;
		len = 4 + (rnd >> 16) % 128 * 4;
		if (off + len > STREAM_BYTES)
			len = STREAM_BYTES - off;
		HSA_OK(hsa_amd_memory_async_copy((char *)g + off, gpu_agent, (char *)h + off, cpu_agent, len, 0, NULL,
						 done));
		off += len;
		copies++;
	}
	CHECK(copies == pieces, "%zu copies for %zu pieces", copies, pieces);
	v = hsa_signal_wait_scacquire(done, HSA_SIGNAL_CONDITION_LT, 1, WAIT_NS, HSA_WAIT_STATE_BLOCKED);
	secs = now_s() - t0;
	CHECK(v == 0, "%zu copies: the signal stayed at %ld", copies, (long)v);
	hsa_signal_destroy(done);
	/* The way back waits for a dependency the CPU sets 100 ms later. */
	HSA_OK(hsa_signal_create(1, 0, NULL, &dep));
	HSA_OK(hsa_signal_create(1, 0, NULL, &done));
	HSA_OK(hsa_amd_memory_async_copy(back, cpu_agent, g, gpu_agent, STREAM_BYTES, 1, &dep, done));
	v = hsa_signal_wait_scacquire(done, HSA_SIGNAL_CONDITION_LT, 1, 100ull * 1000 * 1000, HSA_WAIT_STATE_BLOCKED);
	CHECK(v == 1, "the dependent copy completed before its dependency");
	CHECK(((uint32_t *)back)[0] == 0x5a5a5a5a, "the dependent copy started before its dependency");
	hsa_signal_store_screlease(dep, 0);
	t0 = now_s();
	v = hsa_signal_wait_scacquire(done, HSA_SIGNAL_CONDITION_LT, 1, WAIT_NS, HSA_WAIT_STATE_BLOCKED);
	waited = now_s() - t0;
	CHECK(v == 0, "the dependent copy did not complete (signal %ld)", (long)v);
	hsa_signal_destroy(done);
	hsa_signal_destroy(dep);
	CHECK(counters(&after) == 0, "counters");
	bad = check_pattern(back, STREAM_BYTES / 4, 0x57ea);
	CHECK(bad < 0, "data wrong at word %ld: %#x", bad, bad < 0 ? 0 : ((uint32_t *)back)[bad]);
	uint64_t packets = after.v[C_UQ_PACKETS] - before.v[C_UQ_PACKETS];
	char queues[256];

	queue_delta(queues, sizeof(queues), &before, &after);
	printf("rocm/copy-stream: %zu copies of 4..512 bytes in %.2f s (%.0f copies/s), then 8 MiB after a "
	       "dependency: %.0f ms\n", copies, secs, copies / secs, waited * 1000);
	printf("rocm/copy-stream: device counters: %s\n", queues);
	/* At least two packets per copy (the copy, the signal's decrement), at
	 * least 60 bytes: more than the 1 MiB ring holds, so it wrapped. */
	CHECK(packets >= 2 * copies, "%" PRIu64 " user-queue packets for %zu copies", packets, copies);
	CHECK(copies * 60 > 1 << 20, "only %zu copies", copies);
	CHECK(after.v[C_COPY_BYTES] - before.v[C_COPY_BYTES] >= 2ull * STREAM_BYTES, "the device copied %" PRIu64
	      " bytes", after.v[C_COPY_BYTES] - before.v[C_COPY_BYTES]);
	pool_free(g);
	pool_free(h);
	pool_free(back);
	snprintf(detail, n, "%zu copies in flight (%.0f/s) wrapped the SDMA ring, verified; a copy waited for its "
		 "dependency signal", copies, copies / secs);
	return 0;
}

static int case_memory_lock(char *detail, size_t n)
{
	size_t len = 16u << 20;
	uint32_t *host = aligned_alloc(4096, len), *host2 = aligned_alloc(4096, len);
	void *agent_ptr = NULL, *agent_ptr2 = NULL, *g = NULL;
	double a, b;
	long bad;

	CHECK(host && host2, "malloc");
	fill_pattern(host, len / 4, 0x10c4);
	memset(host2, 0x3c, len);
	HSA_OK(hsa_amd_memory_lock(host, len, &gpu_agent, 1, &agent_ptr));
	HSA_OK(hsa_amd_memory_lock(host2, len, &gpu_agent, 1, &agent_ptr2));
	CHECK(agent_ptr == host, "agent pointer %p != host %p (identity VA)", agent_ptr, (void *)host);
	HSA_OK(pool_alloc(gpu_pool, len, &g));
	if (copy_wait(g, gpu_agent, agent_ptr, cpu_agent, len, &a) ||
	    copy_wait(agent_ptr2, cpu_agent, g, gpu_agent, len, &b))
		return -1;
	bad = check_pattern(host2, len / 4, 0x10c4);
	CHECK(bad < 0, "locked copy wrong at word %ld", bad);
	HSA_OK(hsa_amd_memory_unlock(host));
	HSA_OK(hsa_amd_memory_unlock(host2));
	pool_free(g);
	free(host);
	free(host2);
	snprintf(detail, n, "16 MiB locked malloc -> device -> locked malloc verified");
	return 0;
}

/* --- SVM attributes and unified memory --------------------------------------- */

static int case_svm_attrs(char *detail, size_t n)
{
	size_t len = 8u << 20;
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	hsa_amd_svm_attribute_pair_t set[] = {
		{ HSA_AMD_SVM_ATTRIB_GLOBAL_FLAG, HSA_AMD_SVM_GLOBAL_FLAG_COARSE_GRAINED },
		{ HSA_AMD_SVM_ATTRIB_READ_ONLY, 1 },
		{ HSA_AMD_SVM_ATTRIB_MIGRATION_GRANULARITY, 4 },
		{ HSA_AMD_SVM_ATTRIB_PREFERRED_LOCATION, gpu_agent.handle },
		{ HSA_AMD_SVM_ATTRIB_AGENT_ACCESSIBLE_IN_PLACE, gpu_agent.handle },
	};
	hsa_amd_svm_attribute_pair_t get[] = {
		{ HSA_AMD_SVM_ATTRIB_GLOBAL_FLAG, 0 },
		{ HSA_AMD_SVM_ATTRIB_READ_ONLY, 0 },
		{ HSA_AMD_SVM_ATTRIB_MIGRATION_GRANULARITY, 0 },
		{ HSA_AMD_SVM_ATTRIB_PREFERRED_LOCATION, 0 },
		{ HSA_AMD_SVM_ATTRIB_ACCESS_QUERY, gpu_agent.handle },
	};

	CHECK(p != MAP_FAILED, "mmap");
	HSA_OK(hsa_amd_svm_attributes_set(p, len, set, sizeof(set) / sizeof(set[0])));
	HSA_OK(hsa_amd_svm_attributes_get(p, len, get, sizeof(get) / sizeof(get[0])));
	CHECK(get[0].value == HSA_AMD_SVM_GLOBAL_FLAG_COARSE_GRAINED, "global flag %" PRIu64, get[0].value);
	CHECK(get[1].value != 0, "read only %" PRIu64, get[1].value);
	CHECK(get[2].value == 4, "granularity %" PRIu64, get[2].value);
	CHECK(get[3].value == gpu_agent.handle, "preferred location %#" PRIx64, get[3].value);
	CHECK(get[4].attribute == HSA_AMD_SVM_ATTRIB_AGENT_ACCESSIBLE_IN_PLACE,
	      "access query answered %#" PRIx64, get[4].attribute);
	/* Half of the range changed back: the whole range is now mixed. */
	hsa_amd_svm_attribute_pair_t fine[] = { { HSA_AMD_SVM_ATTRIB_GLOBAL_FLAG, HSA_AMD_SVM_GLOBAL_FLAG_FINE_GRAINED } };
	HSA_OK(hsa_amd_svm_attributes_set(p, len / 2, fine, 1));
	get[0].value = 0;
	HSA_OK(hsa_amd_svm_attributes_get(p, len, get, 1));
	CHECK(get[0].value == HSA_AMD_SVM_GLOBAL_FLAG_INDETERMINATE, "mixed range global flag %" PRIu64, get[0].value);
	munmap(p, len);
	snprintf(detail, n, "coarse/read-only/granularity/preferred/in-place set and read back; mixed range indeterminate");
	return 0;
}

static int case_unified(char *detail, size_t n)
{
	uint32_t *src = malloc(COPY_BYTES), *dst = malloc(COPY_BYTES);
	void *g = NULL;
	struct counters before, after;
	double up, down;
	long bad;

	CHECK(src && dst, "malloc");
	CHECK(counters(&before) == 0, "no vgncKmtQueryCounters in libhsakmt.so.1");
	fill_pattern(src, COPY_BYTES / 4, 0x0dd);
	memset(dst, 0x77, COPY_BYTES);
	HSA_OK(pool_alloc(gpu_pool, COPY_BYTES, &g));
	/* Never registered, never locked: plain malloc memory. */
	if (copy_wait(g, gpu_agent, src, cpu_agent, COPY_BYTES, &up) ||
	    copy_wait(dst, cpu_agent, g, gpu_agent, COPY_BYTES, &down))
		return -1;
	bad = check_pattern(dst, COPY_BYTES / 4, 0x0dd);
	CHECK(bad < 0, "unified copy wrong at word %ld", bad);
	CHECK(counters(&after) == 0, "counters");
	uint64_t raised = after.v[C_RAISED] - before.v[C_RAISED], resolved = after.v[C_RESOLVED] - before.v[C_RESOLVED];
	char queues[256];

	uint64_t handled = after.v[C_HANDLED] - before.v[C_HANDLED];
	const char *resolver = after.v[C_RESOLVER] == 2 ? "the guest kernel" : "the thunk (user space)";

	queue_delta(queues, sizeof(queues), &before, &after);
	printf("rocm/unified: 64 MiB malloc->device->malloc: faults raised %" PRIu64 ", resolved %" PRIu64
	       ", rejected %" PRIu64 " (resolver: %s; fault records the thunk handled: %" PRIu64 "); "
	       "%.1f / %.1f MiB/s\n", raised, resolved, after.v[C_REJECTED] - before.v[C_REJECTED], resolver, handled,
	       mibs(up), mibs(down));
	printf("rocm/unified: device counters: %s\n", queues);
	CHECK(resolved > 0 && resolved == raised, "faults raised %" PRIu64 " resolved %" PRIu64, raised, resolved);
	/* Who answered: the kernel leaves the thunk nothing to read; the
	 * user-space resolver reads every record. */
	CHECK(after.v[C_RESOLVER] == 2 ? handled == 0 : handled >= raised,
	      "resolver %" PRIu64 " but the thunk handled %" PRIu64 " of %" PRIu64 " faults", after.v[C_RESOLVER],
	      handled, raised);
	CHECK(after.v[C_COPY_BYTES] - before.v[C_COPY_BYTES] >= 2ull * COPY_BYTES, "the device copied %" PRIu64 " bytes",
	      after.v[C_COPY_BYTES] - before.v[C_COPY_BYTES]);
	pool_free(g);
	free(src);
	free(dst);
	snprintf(detail, n, "64 MiB from/to never-registered malloc verified, %" PRIu64 " faults resolved by %s",
		 resolved, resolver);
	return 0;
}

/* --- a fatal fault, in a child process -------------------------------------- */

static int child_fatal_fault(void)
{
	size_t len = 1 << 20;
	void *g = NULL;
	void *hole = mmap(NULL, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	hsa_signal_t done;

	if (hole == MAP_FAILED || pool_alloc(gpu_pool, len, &g) != HSA_STATUS_SUCCESS)
		return 3;
	hsa_signal_create(1, 0, NULL, &done);
	fprintf(stderr, "child: copying from %p, which nobody may read\n", hole);
	if (hsa_amd_memory_async_copy(g, gpu_agent, hole, cpu_agent, len, 0, NULL, done) != HSA_STATUS_SUCCESS)
		return 4;
	hsa_signal_wait_scacquire(done, HSA_SIGNAL_CONDITION_LT, 1, WAIT_NS, HSA_WAIT_STATE_BLOCKED);
	fprintf(stderr, "child: the copy ended without a fault\n");
	return 5;
}

static int case_fatal_fault(char *detail, size_t n)
{
	int pipefd[2], status;
	char out[4096] = { 0 };
	size_t got = 0;
	pid_t pid;
	ssize_t r;

	CHECK(pipe(pipefd) == 0, "pipe");
	pid = fork();
	CHECK(pid >= 0, "fork");
	if (pid == 0) {
		dup2(pipefd[1], 2);
		close(pipefd[0]);
		execl(self_path, self_path, "--child-fatal-fault", (char *)NULL);
		_exit(127);
	}
	close(pipefd[1]);
	while (got < sizeof(out) - 1 && (r = read(pipefd[0], out + got, sizeof(out) - 1 - got)) > 0)
		got += r;
	close(pipefd[0]);
	waitpid(pid, &status, 0);
	const char *report = strstr(out, "Memory access fault by GPU node-1");
	char line[256] = { 0 };

	if (report)
		sscanf(report, "%255[^\n]", line);
	for (char *l = strtok(out, "\n"); l; l = strtok(NULL, "\n"))
		printf("rocm/fatal-fault child| %s\n", l);
	CHECK(report, "ROCr printed no memory access fault report");
	CHECK(WIFSIGNALED(status) && WTERMSIG(status) == SIGABRT, "child status %#x, not SIGABRT", status);
	snprintf(detail, n, "child aborted by ROCr: \"%s\"", line);
	return 0;
}

/* --- AQL queues ----------------------------------------------------------------- */

static void submit(hsa_queue_t *q, const void *packet, uint16_t header)
{
	uint64_t index = hsa_queue_add_write_index_screlease(q, 1);
	uint8_t *slot = (uint8_t *)q->base_address + (index % q->size) * 64;

	/* A full ring: wait for the packet processor to free the slot. */
	while (index - hsa_queue_load_read_index_scacquire(q) >= q->size)
		sched_yield();

	memcpy(slot + 2, (const uint8_t *)packet + 2, 62);
	__atomic_store_n((uint16_t *)slot, header, __ATOMIC_RELEASE);
	hsa_signal_store_screlease(q->doorbell_signal, index);
}

static volatile hsa_status_t queue_error;
static volatile int queue_errors;

static void queue_cb(hsa_status_t status, hsa_queue_t *q, void *data)
{
	(void)q;
	(void)data;
	queue_error = status;
	__atomic_add_fetch(&queue_errors, 1, __ATOMIC_SEQ_CST);
}

static int case_aql_barrier(char *detail, size_t n)
{
	hsa_queue_t *q = NULL;
	hsa_signal_t dep[2], done;
	hsa_barrier_and_packet_t b;
	hsa_signal_value_t v;
	uint16_t header = HSA_PACKET_TYPE_BARRIER_AND << HSA_PACKET_HEADER_TYPE |
			  1 << HSA_PACKET_HEADER_BARRIER |
			  HSA_FENCE_SCOPE_SYSTEM << HSA_PACKET_HEADER_SCACQUIRE_FENCE_SCOPE |
			  HSA_FENCE_SCOPE_SYSTEM << HSA_PACKET_HEADER_SCRELEASE_FENCE_SCOPE;

	HSA_OK(hsa_queue_create(gpu_agent, 256, HSA_QUEUE_TYPE_MULTI, queue_cb, NULL, UINT32_MAX, UINT32_MAX, &q));
	HSA_OK(hsa_signal_create(1, 0, NULL, &dep[0]));
	HSA_OK(hsa_signal_create(1, 0, NULL, &dep[1]));
	HSA_OK(hsa_signal_create(1, 0, NULL, &done));
	memset(&b, 0, sizeof(b));
	b.dep_signal[0] = dep[0];
	b.dep_signal[1] = dep[1];
	b.completion_signal = done;
	submit(q, &b, header);
	/* Not before both dependencies are satisfied. */
	v = hsa_signal_wait_scacquire(done, HSA_SIGNAL_CONDITION_LT, 1, 200ull * 1000 * 1000, HSA_WAIT_STATE_BLOCKED);
	CHECK(v == 1, "barrier completed with dependencies pending");
	hsa_signal_store_screlease(dep[0], 0);
	v = hsa_signal_wait_scacquire(done, HSA_SIGNAL_CONDITION_LT, 1, 200ull * 1000 * 1000, HSA_WAIT_STATE_BLOCKED);
	CHECK(v == 1, "barrier-AND completed with one dependency pending");
	hsa_signal_store_screlease(dep[1], 0);
	v = hsa_signal_wait_scacquire(done, HSA_SIGNAL_CONDITION_LT, 1, WAIT_NS, HSA_WAIT_STATE_BLOCKED);
	CHECK(v == 0, "barrier-AND did not complete (signal %ld)", (long)v);
	CHECK(hsa_queue_load_read_index_scacquire(q) >= 1, "read index did not move");
	/* Barrier-OR: waits while no dependency is satisfied, completes when
	 * one is. */
	hsa_barrier_or_packet_t o;
	uint16_t or_header = (header & ~(0xff << HSA_PACKET_HEADER_TYPE)) |
			     HSA_PACKET_TYPE_BARRIER_OR << HSA_PACKET_HEADER_TYPE;

	hsa_signal_store_screlease(dep[0], 1);
	hsa_signal_store_screlease(dep[1], 1);
	hsa_signal_store_screlease(done, 1);
	memset(&o, 0, sizeof(o));
	o.dep_signal[0] = dep[0];
	o.dep_signal[3] = dep[1];
	o.completion_signal = done;
	submit(q, &o, or_header);
	v = hsa_signal_wait_scacquire(done, HSA_SIGNAL_CONDITION_LT, 1, 200ull * 1000 * 1000, HSA_WAIT_STATE_BLOCKED);
	CHECK(v == 1, "barrier-OR completed with no dependency satisfied");
	hsa_signal_store_screlease(dep[1], 0);
	v = hsa_signal_wait_scacquire(done, HSA_SIGNAL_CONDITION_LT, 1, WAIT_NS, HSA_WAIT_STATE_BLOCKED);
	CHECK(v == 0, "barrier-OR did not complete on its second dependency (signal %ld)", (long)v);
	CHECK(hsa_signal_load_relaxed(dep[0]) == 1, "dependency signal changed");
	/* Three rings' worth of barrier packets without dependencies, on one
	 * completion signal: the ring wraps and every slot is reused. */
	uint64_t first = hsa_queue_load_write_index_relaxed(q), count = 3ull * q->size;
	uint32_t slots = q->size;
	double t0 = now_s(), secs;

	hsa_signal_store_screlease(done, (hsa_signal_value_t)count);
	memset(&o, 0, sizeof(o));
	o.completion_signal = done;
	for (uint64_t i = 0; i < count; i++)
		submit(q, &o, or_header);
	v = hsa_signal_wait_scacquire(done, HSA_SIGNAL_CONDITION_LT, 1, WAIT_NS, HSA_WAIT_STATE_BLOCKED);
	secs = now_s() - t0;
	CHECK(v == 0, "%" PRIu64 " barrier packets: the signal stayed at %ld", count, (long)v);
	CHECK(hsa_queue_load_read_index_scacquire(q) == first + count, "read index %" PRIu64 ", want %" PRIu64,
	      hsa_queue_load_read_index_scacquire(q), first + count);
	CHECK(queue_errors == 0, "queue error %#x", queue_error);
	hsa_signal_destroy(dep[0]);
	hsa_signal_destroy(dep[1]);
	hsa_signal_destroy(done);
	HSA_OK(hsa_queue_destroy(q));
	printf("rocm/aql-barrier: %" PRIu64 " barrier packets through a %u-slot ring in %.2f s (%.0f packets/s)\n",
	       count, slots, secs, count / secs);
	snprintf(detail, n, "barrier-AND waited for both dependency signals, barrier-OR for one of two, then "
		 "completed; %" PRIu64 " packets wrapped the %u-slot ring", count, slots);
	return 0;
}

static int case_kernel_dispatch(char *detail, size_t n)
{
	hsa_queue_t *q = NULL;
	hsa_kernel_dispatch_packet_t k;
	hsa_signal_t done;
	double t0 = now_s();
	const char *msg = NULL;
	uint16_t header = HSA_PACKET_TYPE_KERNEL_DISPATCH << HSA_PACKET_HEADER_TYPE |
			  HSA_FENCE_SCOPE_SYSTEM << HSA_PACKET_HEADER_SCACQUIRE_FENCE_SCOPE |
			  HSA_FENCE_SCOPE_SYSTEM << HSA_PACKET_HEADER_SCRELEASE_FENCE_SCOPE;

	queue_errors = 0;
	HSA_OK(hsa_queue_create(gpu_agent, 256, HSA_QUEUE_TYPE_MULTI, queue_cb, NULL, UINT32_MAX, UINT32_MAX, &q));
	HSA_OK(hsa_signal_create(1, 0, NULL, &done));
	memset(&k, 0, sizeof(k));
	k.setup = 1 << HSA_KERNEL_DISPATCH_PACKET_SETUP_DIMENSIONS;
	k.workgroup_size_x = k.workgroup_size_y = k.workgroup_size_z = 1;
	k.grid_size_x = k.grid_size_y = k.grid_size_z = 1;
	k.kernel_object = 0x1000; /* a gfx90a code object this device cannot run */
	k.completion_signal = done;
	submit(q, &k, header);
	while (queue_errors == 0 && now_s() - t0 < 60)
		usleep(1000);
	CHECK(queue_errors > 0, "no queue error within 60 s");
	hsa_status_string(queue_error, &msg);
	CHECK(queue_error == (hsa_status_t)HSA_STATUS_ERROR_ILLEGAL_INSTRUCTION, "queue error %#x (%s)", queue_error,
	      msg ? msg : "");
	hsa_signal_destroy(done);
	hsa_queue_destroy(q);
	snprintf(detail, n, "error callback after %.0f ms: %#x %s", (now_s() - t0) * 1000, queue_error, msg ? msg : "");
	return 0;
}

/* --- driver ---------------------------------------------------------------------- */

/* needs_queues: the case needs the device's user-mode queues (protocol
 * 1.1 USER_QUEUES); on a device without them it is reported SKIP, with
 * the reason, never PASS. */
struct test { const char *name; int (*fn)(char *, size_t); bool needs_queues; };

static const struct test tests[] = {
	{ "agents", case_agents, false },
	{ "pools", case_pools, false },
	{ "signals", case_signals, false },
	{ "svm-attrs", case_svm_attrs, false },
	{ "copy", case_copy, true },
	{ "copy-stream", case_copy_stream, true },
	{ "memory-lock", case_memory_lock, true },
	{ "unified", case_unified, true },
	{ "aql-barrier", case_aql_barrier, true },
	{ "kernel-dispatch", case_kernel_dispatch, true },
	{ "fatal-fault", case_fatal_fault, true },
};

static bool wanted(const char *list, const char *name)
{
	size_t len = strlen(name);

	if (strcmp(list, "all") == 0)
		return true;
	for (const char *p = list; (p = strstr(p, name)); p += len)
		if ((p == list || p[-1] == ',') && (p[len] == 0 || p[len] == ','))
			return true;
	return false;
}

int main(int argc, char **argv)
{
	const char *list = argc > 1 ? argv[1] : "all";
	int failed = 0, ran = 0;
	hsa_status_t s;
	struct counters c;
	bool queues;

	self_path = argv[0];
	setvbuf(stdout, NULL, _IOLBF, 0);
	s = hsa_init();
	if (s != HSA_STATUS_SUCCESS) {
		printf("RESULT rocm/hsa-init FAIL hsa_init: %#x\n", s);
		return 1;
	}
	hsa_iterate_agents(agent_cb, NULL);
	if (strcmp(list, "--child-fatal-fault") == 0)
		return child_fatal_fault();
	queues = counters(&c) == 0 && c.v[C_QUEUES] == 1;
	for (size_t i = 0; i < sizeof(tests) / sizeof(tests[0]); i++) {
		char detail[512] = { 0 };
		double t0 = now_s();

		if (!wanted(list, tests[i].name))
			continue;
		ran++;
		fail_msg[0] = 0;
		if (tests[i].needs_queues && !queues) {
			printf("RESULT rocm/%s SKIP the device offers no user-mode queues (protocol 1.1 USER_QUEUES)\n",
			       tests[i].name);
			continue;
		}
		if (!gpu_agent.handle && strcmp(tests[i].name, "agents") != 0) {
			printf("RESULT rocm/%s FAIL no GPU agent\n", tests[i].name);
			failed++;
			continue;
		}
		int rc = tests[i].fn(detail, sizeof(detail));

		free_case_allocs();
		if (rc == 0) {
			printf("RESULT rocm/%s PASS %s (%.0f ms)\n", tests[i].name, detail, (now_s() - t0) * 1000);
		} else {
			printf("RESULT rocm/%s FAIL %s\n", tests[i].name, fail_msg);
			failed++;
		}
	}
	if (counters(&c) == 0)
		printf("rocm: device counters: faults raised %" PRIu64 " resolved %" PRIu64 " rejected %" PRIu64
		       " timed out %" PRIu64 "; user-queue packets %" PRIu64 ", copy bytes %" PRIu64 ", interrupts %" PRIu64
		       " (the thunk saw %" PRIu64 "), doorbell polls %" PRIu64 "\n",
		       c.v[C_RAISED], c.v[C_RESOLVED], c.v[C_REJECTED], c.v[C_TIMED_OUT], c.v[C_UQ_PACKETS],
		       c.v[C_COPY_BYTES], c.v[C_INTERRUPTS], c.v[C_IRQ_SEEN], c.v[C_DOORBELL_POLLS]);
	hsa_shut_down();
	if (ran == 0) {
		fprintf(stderr, "usage: hsa-tests all|CASE[,CASE...]\n");
		return 2;
	}
	return failed ? 1 : 0;
}
