/* The compiled READ/WRITE path of the TCMU ring: see ring.h for what it owns and what it
 * leaves to the Python SCSI core. Layouts are target_core_user.h's (vscsi/tcmu/abi.py). */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "ring.h"

#define MAILBOX_HEAD 12
#define MAILBOX_TAIL 64
#define OP_MASK 0x7u
#define OP_PAD 0
#define OP_CMD 1
#define ENTRY_ALIGN 8
#define CMD_IOV_OFFSET 48
#define CMD_ENTRY_MIN 112 /* header + response with its 96-byte sense buffer */
#define FAST_MAX_IOV 1024 /* IOV_MAX: more than that goes to Python */
#define FUA 0x08
#define LARGE (256u << 10) /* a transfer this large is worth a doorbell of its own */

static uint32_t ld32(const char *p)
{
    uint32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static uint64_t ld64(const char *p)
{
    uint64_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = v << 8 | p[i];
    return v;
}

/* A decoded READ/WRITE CDB this path may serve. */
struct rw {
    int write;
    uint64_t lba;
    uint64_t blocks;
};

/* Decode the CDB at `cdb` (at least 16 readable bytes); 0 when the core must see it. */
static int decode(const uint8_t *cdb, const struct fast_lun *l, struct rw *rw)
{
    int kind, size;
    switch (cdb[0]) {
    case 0x28: kind = 0; size = 10; break;
    case 0x2A: kind = 1; size = 10; break;
    case 0x88: kind = 2; size = 16; break;
    case 0x8A: kind = 3; size = 16; break;
    default: return 0;
    }
    rw->write = kind & 1;
    if (rw->write ? !l->writes : !l->reads)
        return 0;
    for (int i = 0; i < size; i++)
        if (cdb[i] & l->masks[kind][i])
            return 0;
    if (size == 10) {
        rw->lba = be(cdb + 2, 4);
        rw->blocks = be(cdb + 7, 2);
    } else {
        rw->lba = be(cdb + 2, 8);
        rw->blocks = be(cdb + 10, 4);
    }
    if (rw->write && (cdb[1] & FUA))
        return 0;
    return rw->blocks && rw->blocks <= l->max_blocks && rw->lba <= l->blocks &&
           rw->blocks <= l->blocks - rw->lba;
}

/* Gather the entry's data iovecs into `iov`; returns their count, or -1 when the core must
 * see the entry (bad addresses, too many, a total other than `bytes`). `*aligned` says
 * whether every buffer suits O_DIRECT. */
static int gather(const struct fast_ring *r, const char *ent, uint32_t cnt, uint64_t bytes,
                  uint32_t bs, struct iovec *iov, int *aligned)
{
    uint64_t total = 0;
    *aligned = 1;
    for (uint32_t i = 0; i < cnt; i++) {
        uint64_t off = ld64(ent + CMD_IOV_OFFSET + 16 * i);
        uint64_t len = ld64(ent + CMD_IOV_OFFSET + 16 * i + 8);
        if (off < r->data_off || off > r->map_len || len > r->map_len - off)
            return -1;
        iov[i].iov_base = r->base + off;
        iov[i].iov_len = len;
        total += len;
        if (len % bs || (uintptr_t)(r->base + off) % bs)
            *aligned = 0;
    }
    return total == bytes ? (int)cnt : -1;
}

/* Whether every region of [at, at+bytes) has its write intent durable; flags them touched. */
static int intent_ready(const struct fast_lun *l, uint64_t at, uint64_t bytes)
{
    uint64_t first = at / l->region, last = (at + bytes - 1) / l->region;
    if (last >= l->nregions)
        return 0;
    for (uint64_t r = first; r <= last; r++)
        if (!l->ready[r])
            return 0;
    for (uint64_t r = first; r <= last; r++)
        l->touched[r] = 1;
    return 1;
}

/* One whole transfer on `fd` (`direct_fd` when the buffers suit O_DIRECT); 0 when short or
 * failed. */
static int move(int write, int fd, int direct_fd, int aligned, const struct iovec *iov, int n,
                off_t at, uint64_t bytes)
{
    int use = aligned && direct_fd >= 0 ? direct_fd : fd;
    ssize_t done = write ? pwritev(use, iov, n, at) : preadv(use, iov, n, at);
    return done >= 0 && (uint64_t)done == bytes;
}

/* Write the P-VOL (`l->fd`), then each S-VOL; 1 when every side took the whole transfer.
 * One after the other, on this thread: every write this path takes is buffered (no FUA, the
 * write cache on), a copy into the page cache, and such sides run in turn in the core too
 * (vscsi/store/fanout.py). A thread of its own for the S side cost more than the copy it
 * overlapped: in the VM, a P-VOL in PAIR wrote 1 MiB 35-60% faster and 256 KiB 90% faster
 * without it; a helper thread kept for the ring fell in between. */
static int mirror_write(const struct fast_lun *l, int aligned, const struct iovec *iov, int n,
                        off_t at, uint64_t bytes)
{
    if (!move(1, l->fd, l->direct_fd, aligned, iov, n, at, bytes))
        return 0;
    for (int m = 0; m < l->mirrors; m++)
        if (!move(1, l->mirror_fd[m], l->mirror_direct_fd[m], aligned, iov, n, at, bytes))
            return 0;
    return 1;
}

/* What one CMD entry asks of this path: decoded, its data gathered. */
struct job {
    const struct fast_lun *l;
    struct rw rw;
    uint64_t bytes;
    off_t at;
    int aligned;
    int n;
    struct iovec iov[FAST_MAX_IOV];
};

/* Decode and gather the CMD entry `ent`; 0 when the core must see it. */
static int prepare(const struct fast_ring *r, const struct fast_lun *l, const char *ent,
                   uint32_t len, struct job *j)
{
    uint32_t cnt = ld32(ent + 8);
    uint64_t cdb_off = ld64(ent + 24);

    if (len < CMD_ENTRY_MIN || ld32(ent + 12) || ld32(ent + 16) || cnt > FAST_MAX_IOV ||
        CMD_IOV_OFFSET + 16 * (uint64_t)cnt > len)
        return 0;
    if (cdb_off < r->cmdr_off || cdb_off + 16 > r->data_off)
        return 0;
    if (!decode((const uint8_t *)r->base + cdb_off, l, &j->rw))
        return 0;
    j->bytes = j->rw.blocks * l->block_size;
    j->n = gather(r, ent, cnt, j->bytes, l->block_size, j->iov, &j->aligned);
    j->at = (off_t)(j->rw.lba * l->block_size);
    return j->n >= 0;
}

/* Move a prepared job's data; 1 when every side took the whole transfer. */
static int execute(const struct job *j)
{
    const struct fast_lun *l = j->l;
    if (j->rw.write && l->mirrors) /* a failing S-VOL suspends its pair in the core */
        return mirror_write(l, j->aligned, j->iov, j->n, j->at, j->bytes);
    return move(j->rw.write, l->fd, l->direct_fd, j->aligned, j->iov, j->n, j->at, j->bytes);
}

/* Tell the kernel about the answers published so far (uio: a 4-byte write). */
static int ring_doorbell(int fd)
{
    static const uint32_t one = 1;
    ssize_t n;
    while ((n = write(fd, &one, sizeof one)) < 0 && errno == EINTR)
        ;
    return n == sizeof one ? 0 : -(errno ? errno : EIO);
}

/* The entry at `pos` if its header is sound (its length in `*len`, op in `*op`), else NULL. */
static char *entry_at(const struct fast_ring *r, uint32_t pos, uint32_t *len, uint32_t *op)
{
    char *ent = r->base + r->cmdr_off + pos;
    uint32_t len_op = ld32(ent);
    *len = len_op & ~OP_MASK;
    *op = len_op & OP_MASK;
    if (!*len || *len % ENTRY_ALIGN || pos + *len > r->cmdr_size)
        return NULL;
    return ent;
}

/* Serve the CMD entry `ent` at cmd_tail. 1 when it is answered GOOD in its slot, 0 to leave
 * it to the core; `*large` says to tell the kernel at once (a large transfer). */
static int serve_next(const struct fast_ring *r, const struct fast_lun *l, char *ent,
                      uint32_t len, int *large)
{
    struct job j;
    j.l = l;
    if (!prepare(r, l, ent, len, &j))
        return 0;
    if (j.rw.write && l->mirrors && !intent_ready(l, (uint64_t)j.at, j.bytes))
        return 0;
    if (!execute(&j))
        return 0; /* the core runs it again and reports what happens (READ/WRITE repeat) */
    ent[7] = 0;                                     /* uflags */
    ring_store_u64(ent, 8, 0); /* scsi_status GOOD, padding, read_len 0: one store (ring.h) */
    *large = j.bytes >= LARGE;
    return 1;
}

/* Serve what this path owns of the entries queued on entry (see ring_serve_fast_for); rings
 * `doorbell_fd` after each large transfer, so the host gets it back while the next one runs.
 * 1: stopped at an entry for the core; 0: reached that head; -errno: the doorbell failed. */
static int serve_queued(struct fast_ring *r, const struct fast_lun *l, int doorbell_fd)
{
    uint32_t head = ring_load_acquire_u32(r->base, MAILBOX_HEAD);
    if (head >= r->cmdr_size || r->replay_end >= 0)
        return 1; /* entries from before the attach may hold an answer already: the core's */
    while (r->pos != head) {
        uint32_t len, op;
        int large = 0; /* a large transfer answered: ring at once */
        char *ent = entry_at(r, r->pos, &len, &op);
        if (!ent)
            return 1;
        if (op == OP_CMD) {
            if (!serve_next(r, l, ent, len, &large))
                return 1;
            r->commands++;
        } else if (op != OP_PAD) {
            return 1;
        }
        r->pos = (r->pos + len) % r->cmdr_size;
        r->entries++;
        ring_store_release_u32(r->base, MAILBOX_TAIL, r->pos);
        if (large && r->pos != head) {
            int rc = ring_doorbell(doorbell_fd);
            if (rc < 0)
                return rc;
        }
    }
    return 0; /* not past the head seen on entry: the caller's view of the LUN stays fresh */
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int watching; /* a ring of this process is watching its head */

/* A ring that spins returns instead once in this many waits, to see whether the host keeps a
 * queue: a first pass that finds two commands or more says it does. */
#define PROBE_EVERY 64

/* Wait for cmd_head to move past `pos` until `deadline`: 1 if it did, 0 if not, -1 at once
 * when another ring of the process is watching. */
static int watch(const struct fast_ring *r, uint64_t deadline)
{
    int idle = 0;
    if (!__atomic_compare_exchange_n(&watching, &idle, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return -1;
    int moved = 0;
    while (!(moved = ring_load_acquire_u32(r->base, MAILBOX_HEAD) != r->pos) &&
           now_ns() < deadline)
        sched_yield();
    __atomic_store_n(&watching, 0, __ATOMIC_RELEASE);
    return moved;
}

/* Sleep on the ring's own event descriptor (uio: the kernel's interrupt for new commands)
 * until `deadline`; 1 when an event came (read, so acknowledged), 0 otherwise. */
static int await_event(int event_fd, uint64_t deadline)
{
    uint64_t now = now_ns();
    if (event_fd < 0 || now >= deadline)
        return 0;
    struct pollfd p = {.fd = event_fd, .events = POLLIN};
    int ms = (int)((deadline - now + 999999) / 1000000);
    int n;
    while ((n = poll(&p, 1, ms)) < 0 && errno == EINTR)
        ;
    if (n <= 0 || !(p.revents & POLLIN))
        return 0;
    uint32_t count;
    ssize_t got;
    while ((got = read(event_fd, &count, sizeof count)) < 0 && errno == EINTR)
        ;
    return got == sizeof count;
}

/* The watch's length for this call (see ring_serve_fast_for): a command that came soon after
 * the last watch ended empty widens it to cover that gap; a longer pause narrows it. */
static uint64_t watch_window(struct fast_ring *r, uint64_t now, uint64_t idle_ns,
                             uint64_t max_idle_ns)
{
    uint64_t window = r->window_ns > idle_ns ? r->window_ns : idle_ns;
    if (r->missed_at) {
        uint64_t gap = window + (now - r->missed_at); /* from the answer to this command */
        if (gap <= max_idle_ns)
            window = gap + gap / 4 < max_idle_ns ? gap + gap / 4 : max_idle_ns;
        else
            window = window / 2 > idle_ns ? window / 2 : idle_ns;
        r->missed_at = 0;
    }
    return r->window_ns = window;
}

int ring_serve_fast_for(struct fast_ring *r, const struct fast_lun *l, int doorbell_fd,
                        int event_fd, uint64_t idle_ns, uint64_t max_idle_ns, uint64_t limit_ns)
{
    uint64_t start = now_ns(), end = start + limit_ns;
    uint64_t window = watch_window(r, start, idle_ns, max_idle_ns);
    int first = 1; /* the first pass comes after the caller's loop: a wake-up, a look around */
    for (;;) {
        uint64_t before = r->entries, commands = r->commands;
        int stopped = serve_queued(r, l, doorbell_fd);
        if (stopped < 0)
            return stopped;
        if (r->entries != before) {
            int rc = ring_doorbell(doorbell_fd);
            if (rc < 0)
                return rc;
        }
        if (stopped)
            return 1;
        uint64_t now = now_ns();
        uint64_t deadline = now + window < end ? now + window : end;
        if (now >= end)
            return 2;
        if (first && r->commands != commands)
            r->deep = r->commands - commands >= 2;
        first = 0;
        int moved = ring_load_acquire_u32(r->base, MAILBOX_HEAD) != r->pos;
        if (!moved && (r->deep || ++r->lone % PROBE_EVERY == 0))
            return 0; /* deep, or a look: the caller's trip lets the queue fill */
        if (!moved && (moved = watch(r, deadline)) == 0 && deadline != end)
            r->missed_at = now_ns();
        if (moved < 0) /* another ring spins: sleep on this one's event, GIL still released */
            moved = await_event(event_fd, deadline);
        if (!moved)
            return deadline == end ? 2 : 0;
    }
}
