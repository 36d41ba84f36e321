// SPDX-License-Identifier: GPL-2.0
/*
 * svm-test: guest-side tests of the virtio-gpu SVM uAPI
 * (DRM_IOCTL_VIRTGPU_SVM, guest/kernel/virtio-gpu/patches).
 *
 * Usage: svm-test SCENARIO. Prints "RESULT <scenario> PASS|FAIL <detail>"
 * the way nc-guest does, and exits 0 on PASS.
 *
 * Built static against the patched uAPI header by tests/qemu/setup.sh and
 * run inside the QEMU guest with the rebuilt virtio-gpu module loaded.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <drm/virtgpu_drm.h>

#define PAGE 4096UL
#define MIB (1024UL * 1024UL)

static const char *scenario;

static void result(int pass, const char *fmt, ...)
{
	va_list ap;

	printf("RESULT %s %s ", scenario, pass ? "PASS" : "FAIL");
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	printf("\n");
	fflush(stdout);
	exit(pass ? 0 : 1);
}

#define CHECK(cond, ...) do { if (!(cond)) result(0, __VA_ARGS__); } while (0)

static int open_render(void)
{
	int fd = open("/dev/dri/renderD128", O_RDWR | O_CLOEXEC);

	CHECK(fd >= 0, "open renderD128: %s", strerror(errno));
	return fd;
}

/* The SVM ioctl: 0 or -errno. */
static int svm(int fd, uint32_t op, uint64_t addr, uint64_t size,
	       uint64_t gpu_addr, uint32_t access, uint32_t granule_shift)
{
	struct drm_virtgpu_svm a = {
		.op = op,
		.addr = addr,
		.size = size,
		.gpu_addr = gpu_addr,
		.access = access,
		.granule_shift = granule_shift,
	};

	return ioctl(fd, DRM_IOCTL_VIRTGPU_SVM, &a) ? -errno : 0;
}

static int reg(int fd, void *p, uint64_t size)
{
	return svm(fd, VIRTGPU_SVM_OP_REGISTER, (uintptr_t)p, size,
		   (uintptr_t)p, VIRTGPU_SVM_ACCESS_READ |
		   VIRTGPU_SVM_ACCESS_WRITE, 21);
}

static int unreg(int fd, void *p, uint64_t size)
{
	return svm(fd, VIRTGPU_SVM_OP_UNREGISTER, (uintptr_t)p, size, 0, 0, 0);
}

/* A counter from /proc/self/fdinfo/FD ("virtio-gpu-svm-KEY:\tN"), -1 if absent. */
static long long fdinfo(int fd, const char *key)
{
	char path[64], line[256], want[96];
	long long v = -1;
	FILE *f;

	snprintf(path, sizeof(path), "/proc/self/fdinfo/%d", fd);
	snprintf(want, sizeof(want), "virtio-gpu-svm-%s:", key);
	f = fopen(path, "r");
	CHECK(f, "open %s: %s", path, strerror(errno));
	while (fgets(line, sizeof(line), f)) {
		if (!strncmp(line, want, strlen(want)))
			v = strtoll(line + strlen(want), NULL, 10);
	}
	fclose(f);
	return v;
}

static void *map_anon(size_t size)
{
	void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

	CHECK(p != MAP_FAILED, "mmap: %s", strerror(errno));
	return p;
}

/* Any kernel warning, oops or BUG since boot fails the run. */
static void scenario_dmesg(void)
{
	static const char *const bad[] = {
		"WARNING:", "BUG:", "Oops", "general protection",
		"list_add corruption", "refcount_t:", "INFO: task",
		"no answer from the device",
	};
	char buf[1 << 16];
	ssize_t n;
	size_t i;
	int fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK);

	CHECK(fd >= 0, "open /dev/kmsg: %s", strerror(errno));
	for (;;) {
		n = read(fd, buf, sizeof(buf) - 1);
		if (n < 0 && errno == EPIPE)
			continue;
		if (n <= 0)
			break;
		buf[n] = 0;
		for (i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
			CHECK(!strstr(buf, bad[i]), "kernel log: %s", buf);
	}
	close(fd);
	result(1, "no kernel warnings");
}

/* The ioctl exists and checks its arguments. */
static void scenario_uapi(void)
{
	int fd = open_render();
	void *p = map_anon(4 * PAGE);
	struct drm_virtgpu_svm a = { .op = VIRTGPU_SVM_OP_REGISTER };
	int value = 0, rc;
	struct drm_virtgpu_getparam gp = {
		.param = VIRTGPU_PARAM_SVM, .value = (uintptr_t)&value,
	};

	CHECK(!ioctl(fd, DRM_IOCTL_VIRTGPU_GETPARAM, &gp) && value == 1,
	      "VIRTGPU_PARAM_SVM: %s, %d", strerror(errno), value);

	CHECK(svm(fd, 0, 0, 0, 0, 0, 0) == -EINVAL, "op 0 is not EINVAL");
	CHECK(svm(fd, 99, 0, 0, 0, 0, 0) == -EINVAL, "op 99 is not EINVAL");
	a.flags = 1;
	CHECK(ioctl(fd, DRM_IOCTL_VIRTGPU_SVM, &a) && errno == EINVAL,
	      "flags != 0 accepted");
	rc = svm(fd, VIRTGPU_SVM_OP_REGISTER, (uintptr_t)p + 1, PAGE,
		 (uintptr_t)p, 3, 0);
	CHECK(rc == -EINVAL, "misaligned addr: %d", rc);
	rc = svm(fd, VIRTGPU_SVM_OP_REGISTER, (uintptr_t)p, 0, (uintptr_t)p, 3, 0);
	CHECK(rc == -EINVAL, "size 0: %d", rc);
	rc = svm(fd, VIRTGPU_SVM_OP_REGISTER, (uintptr_t)p, PAGE, (uintptr_t)p, 0, 0);
	CHECK(rc == -EINVAL, "no access: %d", rc);
	rc = svm(fd, VIRTGPU_SVM_OP_REGISTER, (uintptr_t)p, PAGE, (uintptr_t)p, 8, 0);
	CHECK(rc == -EINVAL, "undefined access bit: %d", rc);
	rc = svm(fd, VIRTGPU_SVM_OP_REGISTER, (uintptr_t)p, PAGE, (uintptr_t)p, 3, 31);
	CHECK(rc == -EINVAL, "granule 31: %d", rc);
	rc = svm(fd, VIRTGPU_SVM_OP_REGISTER, (uintptr_t)p, PAGE, (uintptr_t)p, 3, 11);
	CHECK(rc == -EINVAL, "granule 11: %d", rc);
	rc = svm(fd, VIRTGPU_SVM_OP_REGISTER, ~0UL << 12, 2 * PAGE, 0, 3, 0);
	CHECK(rc == -EINVAL, "wrapping range: %d", rc);
	rc = svm(fd, VIRTGPU_SVM_OP_REGISTER, (uintptr_t)p, PAGE, ~0UL << 12, 3, 0);
	CHECK(rc == -EINVAL, "wrapping GPU range: %d", rc);
	CHECK(fdinfo(fd, "ranges") == 0, "ranges after refused registrations: %lld",
	      fdinfo(fd, "ranges"));
	result(1, "VIRTGPU_PARAM_SVM 1; bad arguments refused with EINVAL");
}

/* Registration, overlap checks and unregistration. */
static void scenario_register(void)
{
	int fd = open_render();
	char *p = map_anon(8 * MIB);
	int rc;

	CHECK(reg(fd, p, 4 * MIB) == 0, "register: %s", strerror(-reg(fd, p, 4 * MIB)));
	CHECK(fdinfo(fd, "ranges") == 1, "ranges = %lld", fdinfo(fd, "ranges"));
	rc = reg(fd, p + 2 * MIB, 4 * MIB);
	CHECK(rc == -EEXIST, "CPU overlap: %d", rc);
	rc = svm(fd, VIRTGPU_SVM_OP_REGISTER, (uintptr_t)p + 4 * MIB, MIB,
		 (uintptr_t)p + MIB, 3, 0);
	CHECK(rc == -EEXIST, "GPU overlap: %d", rc);
	rc = svm(fd, VIRTGPU_SVM_OP_REGISTER, (uintptr_t)p + 4 * MIB, MIB,
		 0x100000000000UL, 3, 0);
	CHECK(rc == 0, "offset mapping: %d", rc);
	CHECK(fdinfo(fd, "ranges") == 2, "ranges = %lld", fdinfo(fd, "ranges"));
	rc = unreg(fd, p, 2 * MIB);
	CHECK(rc == -ENOENT, "unregister of a part: %d", rc);
	rc = unreg(fd, p + PAGE, 4 * MIB);
	CHECK(rc == -ENOENT, "unregister at another address: %d", rc);
	CHECK(unreg(fd, p, 4 * MIB) == 0, "unregister");
	CHECK(unreg(fd, p, 4 * MIB) == -ENOENT, "second unregister");
	CHECK(fdinfo(fd, "ranges") == 1, "ranges = %lld", fdinfo(fd, "ranges"));
	/* The range is free again, and closing with a range registered is fine. */
	CHECK(reg(fd, p, 4 * MIB) == 0, "register again");
	close(fd);
	result(1, "register, overlaps (EEXIST), unregister (ENOENT for non-exact)");
}

/* The notifier fires for what the mm does to a registered range. */
static void scenario_notifier(void)
{
	int fd = open_render();
	char *p = map_anon(4 * MIB), *q = map_anon(MIB);
	long long c0, c1, c2, c3, c4;
	pid_t pid;
	int st;

	memset(p, 1, 4 * MIB);
	CHECK(reg(fd, p, 4 * MIB) == 0, "register");
	c0 = fdinfo(fd, "invalidations");
	CHECK(c0 >= 0, "no invalidation counter in fdinfo");
	CHECK(madvise(p, MIB, MADV_DONTNEED) == 0, "madvise");
	c1 = fdinfo(fd, "invalidations");
	CHECK(c1 > c0, "MADV_DONTNEED: %lld -> %lld", c0, c1);
	pid = fork();
	if (!pid)
		_exit(p[3 * MIB] == 1 ? 0 : 1);
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && !WEXITSTATUS(st),
	      "child");
	c2 = fdinfo(fd, "invalidations");
	CHECK(c2 > c1, "fork (COW write-protect): %lld -> %lld", c1, c2);
	CHECK(munmap(p + 2 * MIB, MIB) == 0, "munmap");
	c3 = fdinfo(fd, "invalidations");
	CHECK(c3 > c2, "munmap: %lld -> %lld", c2, c3);
	/*
	 * Outside the range: nothing (the mapping is made before the hole
	 * the munmap above left inside the range could be reused).
	 */
	memset(q, 1, MIB);
	CHECK(munmap(q, MIB) == 0, "munmap outside");
	c4 = fdinfo(fd, "invalidations");
	CHECK(c4 == c3, "munmap outside the range counted: %lld -> %lld", c3, c4);
	CHECK(unreg(fd, p, 4 * MIB) == 0, "unregister");
	result(1, "invalidations: DONTNEED %lld, fork %lld, munmap %lld, outside 0",
	       c1 - c0, c2 - c1, c3 - c2);
}

/*
 * A compat-profile session of the vhost-gpu-nc protocol on @fd
 * (docs/protocol.md 3.1, 5.2): one 3D buffer resource holds the reply
 * buffer (4 KiB), the fault ring (16 records) and the signal area.
 */
struct session {
	int fd;
	uint32_t res;
	uint8_t *mem;
	uint32_t seqno;
};

#define S_REPLY 0
#define S_RING 4096
#define S_SIGNALS 8192
#define S_SIZE 12288

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }

static int execbuffer(int fd, const void *cmd, uint32_t size)
{
	struct drm_virtgpu_execbuffer eb = {
		.size = size,
		.command = (uintptr_t)cmd,
		.fence_fd = -1,
	};

	return ioctl(fd, DRM_IOCTL_VIRTGPU_EXECBUFFER, &eb) ? -errno : 0;
}

/* The context gets created by the first resource. */
static uint32_t create_buffer(int fd, uint32_t size, uint8_t **map)
{
	struct drm_virtgpu_resource_create rc = {
		.format = 64, .bind = 1, .width = size, .height = 1, .depth = 1,
		.array_size = 1, .size = size,
	};
	struct drm_virtgpu_map m = { 0 };
	void *p;

	CHECK(!ioctl(fd, DRM_IOCTL_VIRTGPU_RESOURCE_CREATE, &rc),
	      "RESOURCE_CREATE: %s", strerror(errno));
	m.handle = rc.bo_handle;
	CHECK(!ioctl(fd, DRM_IOCTL_VIRTGPU_MAP, &m), "MAP: %s", strerror(errno));
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, m.offset);
	CHECK(p != MAP_FAILED, "mmap buffer: %s", strerror(errno));
	memset(p, 0, size);
	*map = p;
	return rc.res_handle;
}

/* Waits for the reply with @seqno at @off; returns its status. */
static uint32_t wait_reply(struct session *s, uint32_t off, uint32_t seqno)
{
	int i;

	for (i = 0; i < 20000; i++) {
		if (__atomic_load_n((uint32_t *)(s->mem + off), __ATOMIC_ACQUIRE) == seqno)
			return get32(s->mem + off + 4);
		usleep(100);
	}
	result(0, "no reply to seqno %u", seqno);
	return 0;
}

static void session_init(struct session *s, int fd)
{
	uint8_t req[104] = { 0 };

	s->fd = fd;
	s->res = create_buffer(fd, S_SIZE, &s->mem);
	s->seqno = 1;
	put32(req + 0, 0x0001);		/* SESSION_INIT */
	put32(req + 4, sizeof(req));
	put32(req + 8, s->seqno);
	put32(req + 12, S_REPLY);
	put32(req + 16, 1);		/* version 1.0 */
	put32(req + 20, 1);		/* COMPAT */
	put32(req + 32, s->res);	/* reply */
	put64(req + 40, S_REPLY);
	put64(req + 48, 4096);
	put32(req + 56, s->res);	/* fault ring */
	put64(req + 64, S_RING);
	put64(req + 72, 128 + 32 * 16);
	put32(req + 80, s->res);	/* signals */
	put64(req + 88, S_SIGNALS);
	put64(req + 96, 32 * 4);
	CHECK(!execbuffer(fd, req, sizeof(req)), "EXECBUFFER SESSION_INIT");
	CHECK(wait_reply(s, S_REPLY, s->seqno) == 0, "SESSION_INIT failed");
}

/* The capset's feature bits (docs/protocol.md 2.2). */
static uint32_t capset_features(int fd)
{
	uint8_t caps[128] = { 0 };
	struct drm_virtgpu_get_caps gc = {
		.cap_set_id = 24, .cap_set_ver = 1,
		.addr = (uintptr_t)caps, .size = sizeof(caps),
	};

	CHECK(!ioctl(fd, DRM_IOCTL_VIRTGPU_GET_CAPS, &gc), "GET_CAPS: %s",
	      strerror(errno));
	CHECK(get32(caps) == 0x434e4756, "capset magic %#x", get32(caps));
	return get32(caps + 12);
}

#define FEATURE_KERNEL_SVM (1u << 4)

static int svm_enable(int fd, uint32_t ring_size)
{
	struct drm_virtgpu_svm a = { .op = VIRTGPU_SVM_OP_ENABLE,
				     .ring_size = ring_size };

	return ioctl(fd, DRM_IOCTL_VIRTGPU_SVM, &a) ? -errno : 0;
}

static int svm_disable(int fd)
{
	return svm(fd, VIRTGPU_SVM_OP_DISABLE, 0, 0, 0, 0, 0);
}

/*
 * ENABLE needs a context with a session, and a device that offers kernel
 * SVM (capset feature KERNEL_SVM; protocol 1.0 devices answer
 * EOPNOTSUPP).
 */
static void scenario_enable(void)
{
	int fd = open_render();
	int kernel_svm = !!(capset_features(fd) & FEATURE_KERNEL_SVM);
	struct session s;
	uint8_t *m;
	int rc;

	rc = svm_enable(fd, 0);
	CHECK(rc == -ENOENT, "ENABLE without a context: %d", rc);
	CHECK(svm_enable(fd, 100) == -EINVAL, "ring size 100 accepted");
	CHECK(svm_enable(fd, 8) == -EINVAL, "ring size 8 accepted");
	create_buffer(fd, 4096, &m);
	rc = svm_enable(fd, 0);
	CHECK(rc == -ENOENT, "ENABLE without a session: %d", rc);
	CHECK(fdinfo(fd, "enabled") == 0, "enabled after a failed ENABLE");
	session_init(&s, fd);
	rc = svm_enable(fd, 64);
	if (!kernel_svm) {
		CHECK(rc == -EOPNOTSUPP, "ENABLE on a 1.0 device: %d", rc);
		CHECK(fdinfo(fd, "enabled") == 0, "enabled = %lld",
		      fdinfo(fd, "enabled"));
		CHECK(svm_disable(fd) == -ENOENT, "DISABLE when not enabled");
		result(1, "ENOENT without a context or session; the device has no KERNEL_SVM: EOPNOTSUPP");
	}
	CHECK(rc == 0, "ENABLE: %d", rc);
	CHECK(fdinfo(fd, "enabled") == 1, "enabled = %lld", fdinfo(fd, "enabled"));
	CHECK(svm_enable(fd, 64) == -EBUSY, "second ENABLE");
	CHECK(svm_disable(fd) == 0, "DISABLE");
	CHECK(fdinfo(fd, "enabled") == 0, "enabled after DISABLE");
	CHECK(svm_enable(fd, 0) == 0, "ENABLE again");
	close(fd);
	result(1, "ENOENT without a context or session; ENABLE, EBUSY, DISABLE, ENABLE, close");
}

static unsigned long resident_pages(void *p, size_t size)
{
	unsigned char vec[4096];
	unsigned long n = 0, i;

	CHECK(size / PAGE <= sizeof(vec), "mincore range too large");
	CHECK(!mincore(p, size, vec), "mincore: %s", strerror(errno));
	for (i = 0; i < size / PAGE; i++)
		n += vec[i] & 1;
	return n;
}

/*
 * PREFETCH resolves a range with hmm_range_fault: the pages become
 * resident (they are faulted in, not pinned) and, with SVM enabled, bound.
 */
static void scenario_prefetch(void)
{
	int fd = open_render();
	int kernel_svm = !!(capset_features(fd) & FEATURE_KERNEL_SVM);
	char *p = map_anon(4 * MIB), *none;
	unsigned long before, after;
	struct session s;
	int rc;

	CHECK(reg(fd, p, 4 * MIB) == 0, "register");
	rc = svm(fd, VIRTGPU_SVM_OP_PREFETCH, (uintptr_t)p + 4 * MIB, PAGE, 0, 0, 0);
	CHECK(rc == -ENOENT, "PREFETCH outside the range: %d", rc);
	rc = svm(fd, VIRTGPU_SVM_OP_PREFETCH, (uintptr_t)p + 3 * MIB, 2 * MIB, 0, 0, 0);
	CHECK(rc == -ENOENT, "PREFETCH past the range: %d", rc);
	rc = svm(fd, VIRTGPU_SVM_OP_PREFETCH, (uintptr_t)p + 1, PAGE, 0, 0, 0);
	CHECK(rc == -EINVAL, "misaligned PREFETCH: %d", rc);

	before = resident_pages(p, 2 * MIB);
	rc = svm(fd, VIRTGPU_SVM_OP_PREFETCH, (uintptr_t)p, 2 * MIB, 0, 0, 0);
	after = resident_pages(p, 2 * MIB);
	CHECK(before == 0 && after == 512,
	      "PREFETCH did not fault the pages in: resident %lu -> %lu", before, after);
	if (!kernel_svm) {
		CHECK(rc == -ENODEV, "PREFETCH without SVM enabled: %d", rc);
	} else {
		CHECK(rc == -ENODEV, "PREFETCH before ENABLE: %d", rc);
	}

	/* A PROT_NONE range cannot be bound. */
	none = mmap(NULL, MIB, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(none != MAP_FAILED, "mmap PROT_NONE");
	CHECK(reg(fd, none, MIB) == 0, "register PROT_NONE");
	rc = svm(fd, VIRTGPU_SVM_OP_PREFETCH, (uintptr_t)none, MIB, 0, 0, 0);
	CHECK(rc == -EFAULT, "PREFETCH of PROT_NONE: %d", rc);

	if (!kernel_svm)
		result(1, "ENOENT outside ranges, EFAULT for PROT_NONE; pages faulted in (%lu resident), ENODEV without SVM",
		       after);

	session_init(&s, fd);
	CHECK(svm_enable(fd, 0) == 0, "ENABLE");
	rc = svm(fd, VIRTGPU_SVM_OP_PREFETCH, (uintptr_t)p, 4 * MIB, 0, 0, 0);
	CHECK(rc == 0, "PREFETCH: %d", rc);
	CHECK(fdinfo(fd, "bound-pages") == 1024, "bound pages %lld",
	      fdinfo(fd, "bound-pages"));
	CHECK(fdinfo(fd, "binds") == 2, "binds %lld", fdinfo(fd, "binds"));
	CHECK(munmap(p, MIB) == 0, "munmap");
	CHECK(fdinfo(fd, "unbinds") == 1, "unbinds after munmap: %lld",
	      fdinfo(fd, "unbinds"));
	result(1, "bound 4 MiB in %lld binds; munmap unbound in %lld us",
	       fdinfo(fd, "binds"), fdinfo(fd, "unbind-ns") / 1000);
}

static void set_strict(int on)
{
	int fd = open("/sys/module/virtio_gpu/parameters/svm_strict", O_WRONLY);

	CHECK(fd >= 0, "svm_strict parameter: %s", strerror(errno));
	CHECK(write(fd, on ? "Y" : "N", 1) == 1, "write svm_strict");
	close(fd);
}

/* A request header at @p; returns the next free offset. */
static uint32_t put_hdr(uint8_t *p, uint32_t cmd, uint32_t len, uint32_t seqno,
			uint32_t reply_off)
{
	memset(p, 0, len);
	put32(p, cmd);
	put32(p + 4, len);
	put32(p + 8, seqno);
	put32(p + 12, reply_off);
	return len;
}

/* VM_BIND with one op of @kind (MAP_PAGES names one bogus page). */
static uint32_t put_bind(uint8_t *p, uint32_t kind, uint64_t va, uint32_t seqno)
{
	uint32_t len = kind == 2 ? 24 + 40 + 8 : 24 + 40;

	put_hdr(p, 0x0010, len, seqno, 0xffffffff);
	put32(p + 16, 1);
	put32(p + 20, kind == 2 ? 1 : 0);
	put32(p + 24, kind);
	put32(p + 28, kind == 2 ? 3 : 0);
	put64(p + 32, va);
	put64(p + 40, PAGE);
	if (kind == 2)
		put64(p + 64, 1ULL << 52);	/* not guest RAM */
	return len;
}

/*
 * The driver refuses user requests only the kernel may send: always
 * SVM_ATTACH/SVM_DETACH and kernel reply offsets; with SVM enabled (or the
 * svm_strict parameter) also MAP_PAGES and FAULT_REPLY. It frames the
 * stream like the device: nothing after a broken header counts.
 */
static void scenario_filter(void)
{
	int fd = open_render();
	uint8_t req[256];
	struct session s;
	uint32_t n;
	int rc;

	session_init(&s, fd);
	n = put_hdr(req, 0x0003, 16, 10, 0x80000000);	/* DEVICE_QUERY */
	rc = execbuffer(fd, req, n);
	CHECK(rc == -EACCES, "kernel reply offset: %d", rc);
	n = put_hdr(req, 0x0050, 56, 11, 0xffffffff);	/* SVM_ATTACH */
	CHECK(execbuffer(fd, req, n) == -EACCES, "user SVM_ATTACH accepted");
	n = put_hdr(req, 0x0051, 16, 12, 0xffffffff);	/* SVM_DETACH */
	CHECK(execbuffer(fd, req, n) == -EACCES, "user SVM_DETACH accepted");
	n = put_hdr(req, 0x0003, 16, 13, 64);
	n += put_hdr(req + n, 0x0051, 16, 14, 0xffffffff);
	CHECK(execbuffer(fd, req, n) == -EACCES, "SVM_DETACH second in a stream accepted");
	/* Not mediated: MAP_PAGES and FAULT_REPLY go through. */
	n = put_bind(req, 2, 0x200000, 15);
	rc = execbuffer(fd, req, n);
	CHECK(rc == 0, "MAP_PAGES refused without SVM: %d", rc);
	n = put_hdr(req, 0x0030, 40, 16, 0xffffffff);
	put32(req + 16, 1);
	put32(req + 32, 1);
	CHECK(execbuffer(fd, req, n) == 0, "FAULT_REPLY refused without SVM");

	set_strict(1);
	n = put_bind(req, 2, 0x200000, 17);
	rc = execbuffer(fd, req, n);
	set_strict(0);
	CHECK(rc == -EACCES, "strict: MAP_PAGES accepted: %d", rc);
	set_strict(1);
	n = put_hdr(req, 0x0030, 40, 18, 0xffffffff);
	put32(req + 16, 1);
	put32(req + 32, 1);
	rc = execbuffer(fd, req, n);
	n = put_bind(req, 3, 0x200000, 19);
	CHECK(execbuffer(fd, req, n) == 0, "strict: UNMAP refused");
	/* After a header that breaks the framing, the device executes nothing. */
	n = put_hdr(req, 0x0003, 16, 20, 0xffffffff);
	put32(req + 4, 12);
	n += put_bind(req + n, 2, 0x200000, 21);
	CHECK(execbuffer(fd, req, n) == 0, "MAP_PAGES after broken framing refused");
	set_strict(0);
	CHECK(rc == -EACCES, "strict: FAULT_REPLY accepted: %d", rc);
	n = put_bind(req, 2, 0x200000, 22);
	CHECK(execbuffer(fd, req, n) == 0, "MAP_PAGES refused after strict mode off");
	result(1, "kernel-only requests refused (EACCES); MAP_PAGES/FAULT_REPLY refused in strict mode only; framing as the device");
}

/*
 * End to end: GPU work on memory the kernel resolves. These need a device
 * with KERNEL_SVM (protocol 1.1); on a 1.0 device they fail at ENABLE.
 */

/* Sends one request (reply at a rotating offset) and waits for its reply. */
static uint32_t call(struct session *s, uint8_t *req, uint32_t len,
		     uint8_t *reply, uint32_t reply_len)
{
	uint32_t off = (s->seqno % 16) * 256, st;

	s->seqno++;
	put32(req + 8, s->seqno);
	put32(req + 12, off);
	memset(s->mem + S_REPLY + off, 0, 256);
	CHECK(!execbuffer(s->fd, req, len), "EXECBUFFER %#x", get32(req));
	st = wait_reply(s, S_REPLY + off, s->seqno);
	if (reply)
		memcpy(reply, s->mem + S_REPLY + off, reply_len);
	return st;
}

static uint32_t queue_create(struct session *s)
{
	uint8_t req[24] = { 0 }, rep[24];

	put32(req, 0x0020);
	put32(req + 4, sizeof(req));
	CHECK(call(s, req, sizeof(req), rep, sizeof(rep)) == 0, "QUEUE_CREATE");
	return get32(rep + 16);
}

static uint64_t completion;

/* FILL (kernel 1) or COPY (kernel 2) on @q, signalling slot 0. */
static void dispatch(struct session *s, uint32_t q, uint32_t kernel,
		     uint64_t a0, uint64_t a1, uint64_t a2)
{
	uint8_t req[64] = { 0 };

	completion++;
	memset(s->mem + S_SIGNALS, 0, 32);
	put32(req, 0x0022);
	put32(req + 4, sizeof(req));
	put32(req + 16, q);
	put32(req + 20, kernel);
	put32(req + 24, 0);
	put64(req + 32, completion);
	put64(req + 40, a0);
	put64(req + 48, a1);
	if (kernel == 1)
		put32(req + 56, (uint32_t)a2);
	else
		put64(req + 56, a2);
	CHECK(call(s, req, sizeof(req), NULL, 0) == 0, "DISPATCH");
}

/* Waits for the last dispatch; returns its status (0 = OK). */
static uint32_t wait_done(struct session *s, int timeout_s)
{
	struct timespec t0, t;

	clock_gettime(CLOCK_MONOTONIC, &t0);
	for (;;) {
		if (__atomic_load_n((uint64_t *)(s->mem + S_SIGNALS),
				    __ATOMIC_ACQUIRE) == completion)
			return get32(s->mem + S_SIGNALS + 8);
		clock_gettime(CLOCK_MONOTONIC, &t);
		CHECK(t.tv_sec - t0.tv_sec < timeout_s, "dispatch timed out");
		usleep(200);
	}
}

static uint64_t bound_bytes(struct session *s)
{
	uint8_t req[16] = { 0 }, rep[80];

	put32(req, 0x0003);
	put32(req + 4, sizeof(req));
	CHECK(call(s, req, sizeof(req), rep, sizeof(rep)) == 0, "DEVICE_QUERY");
	return (uint64_t)get32(rep + 64) | (uint64_t)get32(rep + 68) << 32;
}

static double now_ms(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* A session with the kernel resolver, a queue, and @p registered. */
static uint32_t e2e_setup(struct session *s, void *p, size_t size)
{
	int fd = open_render();
	int rc;

	CHECK(capset_features(fd) & FEATURE_KERNEL_SVM,
	      "the device does not offer KERNEL_SVM (protocol 1.1)");
	session_init(s, fd);
	rc = svm_enable(fd, 0);
	CHECK(rc == 0, "ENABLE: %d", rc);
	CHECK(reg(fd, p, size) == 0, "register");
	return queue_create(s);
}

static void check_fill(const uint32_t *p, size_t n, uint32_t v, const char *what)
{
	size_t i;

	for (i = 0; i < n; i++)
		CHECK(p[i] == v, "%s: [%zu] = %#x, want %#x", what, i, p[i], v);
}

/* 64 MiB of plain anonymous memory, resolved by the kernel only. */
static void scenario_e2e_unified(void)
{
	const size_t size = 64 * MIB;
	uint32_t *p = map_anon(size);
	struct session s;
	double t0, t1;
	uint32_t q;

	q = e2e_setup(&s, p, size);
	t0 = now_ms();
	dispatch(&s, q, 1, (uintptr_t)p, size / 4, 0xabcd1234);
	CHECK(wait_done(&s, 120) == 0, "FILL failed");
	t1 = now_ms();
	check_fill(p, size / 4, 0xabcd1234, "unified");
	result(1, "64 MiB FILL %.0f ms, kernel faults=%lld resolved=%lld (%.0f us each), binds=%lld",
	       t1 - t0, fdinfo(s.fd, "faults"), fdinfo(s.fd, "faults-resolved"),
	       fdinfo(s.fd, "fault-ns") / 1e3 /
	       (fdinfo(s.fd, "faults") ? fdinfo(s.fd, "faults") : 1),
	       fdinfo(s.fd, "binds"));
}

/*
 * munmap + mmap at the same address: the GPU must write the new page,
 * never the old one. The old pages stay alive in a child that shares them
 * (MAP_SHARED), holding a canary the GPU must not overwrite.
 */
static void scenario_e2e_remap(void)
{
	const size_t size = 2 * MIB;
	uint32_t *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
			   MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	int to_child[2], to_parent[2];
	struct session s;
	uint32_t q, *n;
	char c = 0;
	pid_t pid;
	int st;

	CHECK(p != MAP_FAILED, "mmap");
	q = e2e_setup(&s, p, size);
	dispatch(&s, q, 1, (uintptr_t)p, size / 4, 0x11111111);
	CHECK(wait_done(&s, 60) == 0, "first FILL");
	check_fill(p, size / 4, 0x11111111, "first FILL");

	CHECK(!pipe(to_child) && !pipe(to_parent), "pipe");
	pid = fork();
	if (!pid) {
		/* The old pages, shared with the parent until it unmaps them. */
		if (read(to_child[0], &c, 1) != 1)
			_exit(2);
		for (size_t i = 0; i < size / 4; i++)
			if (p[i] != 0x11111111)
				_exit(3);
		_exit(0);
	}
	CHECK(!munmap(p, size), "munmap");
	n = mmap(p, size, PROT_READ | PROT_WRITE,
		 MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
	CHECK(n == p, "mmap at the same address");
	memset(n, 0x5a, size);
	dispatch(&s, q, 1, (uintptr_t)n, size / 4, 0x22222222);
	CHECK(wait_done(&s, 60) == 0, "second FILL");
	CHECK(write(to_child[1], &c, 1) == 1, "pipe write");
	CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0,
	      "the GPU wrote the old pages (child saw status %d)", WEXITSTATUS(st));
	check_fill(n, size / 4, 0x22222222, "the new mapping");
	result(1, "new pages written, old pages untouched; unbinds=%lld (%.0f us each)",
	       fdinfo(s.fd, "unbinds"), fdinfo(s.fd, "unbind-ns") / 1e3 /
	       (fdinfo(s.fd, "unbinds") ? fdinfo(s.fd, "unbinds") : 1));
}

/* MADV_DONTNEED, then a GPU read sees zeroes. */
static void scenario_e2e_dontneed(void)
{
	const size_t size = 2 * MIB;
	uint32_t *p = map_anon(2 * size), *dst = p + size / 4;
	struct session s;
	uint32_t q;

	q = e2e_setup(&s, p, 2 * size);
	dispatch(&s, q, 1, (uintptr_t)p, size / 4, 0x33333333);
	CHECK(wait_done(&s, 60) == 0, "FILL");
	check_fill(p, size / 4, 0x33333333, "FILL");
	CHECK(!madvise(p, size, MADV_DONTNEED), "madvise");
	memset(dst, 0xee, size);
	dispatch(&s, q, 2, (uintptr_t)dst, (uintptr_t)p, size);
	CHECK(wait_done(&s, 60) == 0, "COPY");
	check_fill(dst, size / 4, 0, "the GPU's read after MADV_DONTNEED");
	result(1, "GPU read zeroes after MADV_DONTNEED; unbinds=%lld", fdinfo(s.fd, "unbinds"));
}

/*
 * fork: the parent writes after fork (copy-on-write gives it new pages,
 * the child keeps the old ones); the GPU must follow the parent's pages.
 */
static void scenario_e2e_fork(void)
{
	const size_t size = 2 * MIB;
	uint32_t *p = map_anon(size);
	int to_child[2];
	struct session s;
	uint32_t q;
	char c = 0;
	pid_t pid;
	int st;

	q = e2e_setup(&s, p, size);
	dispatch(&s, q, 1, (uintptr_t)p, size / 4, 0x44444444);
	CHECK(wait_done(&s, 60) == 0, "FILL");
	CHECK(!pipe(to_child), "pipe");
	pid = fork();
	if (!pid) {
		if (read(to_child[0], &c, 1) != 1)
			_exit(2);
		for (size_t i = 0; i < size / 4; i++)
			if (p[i] != 0x44444444)
				_exit(3);
		_exit(0);
	}
	memset(p, 0x66, size);	/* COW: the parent gets new pages */
	dispatch(&s, q, 1, (uintptr_t)p, size / 4, 0x55555555);
	CHECK(wait_done(&s, 60) == 0, "FILL after fork");
	CHECK(write(to_child[1], &c, 1) == 1, "pipe write");
	CHECK(waitpid(pid, &st, 0) == pid, "waitpid");
	check_fill(p, size / 4, 0x55555555, "the parent's pages");
	CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0,
	      "the GPU wrote the child's pages (child status %d)", WEXITSTATUS(st));
	result(1, "GPU followed the parent's pages after fork + COW; the child's stayed");
}

/*
 * A registered range with holes: the mapped parts of a granule resolve,
 * a GPU access to a hole is rejected.
 */
static void scenario_e2e_holes(void)
{
	char *p = map_anon(4 * MIB);
	struct session s;
	uint32_t q, st;
	int rc;

	CHECK(!munmap(p, MIB) && !munmap(p + 2 * MIB, MIB), "munmap");
	q = e2e_setup(&s, p, 4 * MIB);
	dispatch(&s, q, 1, (uintptr_t)p + MIB, MIB / 4, 0x88888888);
	CHECK(wait_done(&s, 60) == 0, "FILL of the second MiB");
	check_fill((uint32_t *)(p + MIB), MIB / 4, 0x88888888, "second MiB");
	dispatch(&s, q, 1, (uintptr_t)p + 3 * MIB, MIB / 4, 0x99999999);
	CHECK(wait_done(&s, 60) == 0, "FILL of the fourth MiB");
	check_fill((uint32_t *)(p + 3 * MIB), MIB / 4, 0x99999999, "fourth MiB");
	dispatch(&s, q, 1, (uintptr_t)p, 1024, 1);
	st = wait_done(&s, 60);
	CHECK(st == 1, "FILL of a hole: status %u, want FAULT_REJECTED", st);
	rc = svm(s.fd, VIRTGPU_SVM_OP_PREFETCH, (uintptr_t)p, 4 * MIB, 0, 0, 0);
	CHECK(rc == -EFAULT, "PREFETCH over holes: %d", rc);
	rc = svm(s.fd, VIRTGPU_SVM_OP_PREFETCH, (uintptr_t)p + MIB, MIB, 0, 0, 0);
	CHECK(rc == 0, "PREFETCH of a mapped MiB: %d", rc);
	result(1, "mapped parts resolved around holes, the hole rejected; faults=%lld rejected=%lld",
	       fdinfo(s.fd, "faults"), fdinfo(s.fd, "faults-rejected"));
}

/*
 * A process exiting mid-dispatch leaves nothing bound: the parent keeps
 * the file open (and queries the session) after the child that enabled
 * SVM and started a long dispatch has exited.
 */
static void scenario_e2e_exit(void)
{
	const size_t size = 64 * MIB;
	struct session s;
	uint64_t before, after;
	int go[2], ready[2];
	char c = 0;
	pid_t pid;
	int st;

	session_init(&s, open_render());
	CHECK(capset_features(s.fd) & FEATURE_KERNEL_SVM,
	      "the device does not offer KERNEL_SVM (protocol 1.1)");
	before = bound_bytes(&s);
	CHECK(!pipe(go) && !pipe(ready), "pipe");
	pid = fork();
	if (!pid) {
		uint32_t *p = map_anon(size), q;

		if (svm_enable(s.fd, 0) || reg(s.fd, p, size))
			_exit(2);
		q = queue_create(&s);
		dispatch(&s, q, 1, (uintptr_t)p, size / 4, 0x77777777);
		/* Let a few faults resolve, then die mid-dispatch. */
		while (fdinfo(s.fd, "binds") < 2)
			usleep(100);
		if (write(ready[1], &c, 1) != 1)
			_exit(3);
		_exit(0);
	}
	completion++;	/* the child's dispatch */
	CHECK(read(ready[0], &c, 1) == 1, "the child did not get going");
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && !WEXITSTATUS(st),
	      "child");
	/* The dispatch ends (its faults are rejected); nothing stays bound. */
	CHECK(wait_done(&s, 60) != 0, "the dispatch of the exited process succeeded");
	after = bound_bytes(&s);
	CHECK(after == before, "bound bytes %llu before, %llu after the exit",
	      (unsigned long long)before, (unsigned long long)after);
	result(1, "after the exit: bound bytes back to %llu, dispatch ended with status %u; binds=%lld unbinds=%lld",
	       (unsigned long long)after, get32(s.mem + S_SIGNALS + 8),
	       fdinfo(s.fd, "binds"), fdinfo(s.fd, "unbinds"));
}

/* The file's SVM is bound to the mm that first used it. */
static void scenario_mm(void)
{
	int fd = open_render();
	char *p = map_anon(MIB);
	pid_t pid;
	int st;

	CHECK(reg(fd, p, MIB) == 0, "register");
	pid = fork();
	if (!pid)
		_exit(reg(fd, p + 0, MIB) == -EPERM &&
		      unreg(fd, p, MIB) == -EPERM ? 0 : 1);
	CHECK(waitpid(pid, &st, 0) == pid && WIFEXITED(st) && !WEXITSTATUS(st),
	      "the child's mm was not refused with EPERM");
	CHECK(fdinfo(fd, "ranges") == 1, "ranges = %lld", fdinfo(fd, "ranges"));
	result(1, "another process's mm refused with EPERM");
}

static const struct {
	const char *name;
	void (*run)(void);
} scenarios[] = {
	{ "svm-uapi", scenario_uapi },
	{ "svm-register", scenario_register },
	{ "svm-notifier", scenario_notifier },
	{ "svm-mm", scenario_mm },
	{ "svm-enable", scenario_enable },
	{ "svm-prefetch", scenario_prefetch },
	{ "svm-filter", scenario_filter },
	{ "svm-e2e-unified", scenario_e2e_unified },
	{ "svm-e2e-remap", scenario_e2e_remap },
	{ "svm-e2e-dontneed", scenario_e2e_dontneed },
	{ "svm-e2e-fork", scenario_e2e_fork },
	{ "svm-e2e-exit", scenario_e2e_exit },
	{ "svm-e2e-holes", scenario_e2e_holes },
	{ "svm-dmesg", scenario_dmesg },
};

int main(int argc, char **argv)
{
	size_t i;

	setvbuf(stdout, NULL, _IOLBF, 0);
	scenario = argc > 1 ? argv[1] : "?";
	for (i = 0; i < sizeof(scenarios) / sizeof(scenarios[0]); i++) {
		if (!strcmp(scenarios[i].name, scenario)) {
			scenarios[i].run();
			return 0;
		}
	}
	result(0, "unknown scenario");
	return 1;
}
