/*
 * The TCMU ring's C half: ordered mailbox accesses and the compiled READ/WRITE path.
 *
 * Ordering. The kernel publishes a command entry with smp_store_release on cmd_head
 * (UPDATE_HEAD in target_core_user.c) and reads cmd_tail with READ_ONCE before it reads the
 * completed entries. On a weakly ordered CPU (arm64, POWER) plain loads and stores on our side
 * may be reordered around those, so we read cmd_head with acquire and store cmd_tail with
 * release, as libtcmu does for cmd_head (tcmu-runner issue 688, an aarch64 crash). On x86 both
 * compile to a plain mov: the cost is the call. `base` is the start of the map, `off` a
 * 4-aligned byte offset in it.
 *
 * The fast path (fastpath.c) serves, in ring order, the leading READ(10/16) and WRITE(10/16)
 * entries whose outcome is plain data movement on one file descriptor (for a P-VOL in PAIR: the
 * same write on the P-VOL's, then on each S-VOL's, into regions the write-intent log already
 * holds durably marked), and stops at the first
 * entry it does not own — any other command, a TMR, a CDB with a field the SCSI core would
 * refuse, a range or length the core would answer with sense, an I/O error or a short
 * transfer. The Python SCSI core then serves that entry, so it stays the single source of SCSI
 * semantics: the fast path only ever answers GOOD. Nor does it make anything durable: a FUA
 * write, or any write while the write cache is off, is the core's. It runs only while no command
 * is out with a worker, so each completion goes into the command's own slot.
 *
 * These declarations are also parsed by cffi (vscsi/_build.py): keep them plain.
 */
#ifndef VSCSI_RING_H
#define VSCSI_RING_H

#include <stddef.h>
#include <stdint.h>

uint32_t ring_load_acquire_u32(const char *base, size_t off);
void ring_store_release_u32(char *base, size_t off, uint32_t value);
/* One 8-byte store (8-aligned `off`): a completion's status and read_len go into a slot's
 * request counts at once, so a daemon killed while answering leaves either the request or
 * the whole response word there, never half of each (vscsi/tcmu/ring.py, "Answered before
 * the restart"). */
void ring_store_u64(char *base, size_t off, uint64_t value);

/* The ring's geometry and our position in it; `pos` is both the next entry to read and
 * cmd_tail (nothing is outstanding while the fast path runs). */
struct fast_ring {
    char *base;
    uint64_t map_len;
    uint32_t cmdr_off;
    uint32_t cmdr_size;
    uint32_t data_off;
    uint32_t pos;
    int64_t replay_end;   /* entries before it were queued before we attached (the core's
                           * to serve, see serve_queued); -1: none */
    uint64_t entries;     /* entries consumed (CMD and PAD) */
    uint64_t commands;    /* commands answered */
    int deep;             /* the host keeps a queue: return when empty, do not spin */
    uint32_t lone;        /* waits since the last look at the depth */
    uint64_t window_ns;   /* how long to watch for the next command now (0: the caller's idle) */
    uint64_t missed_at;   /* when a watch last ended without a command; 0: it did not */
};

/* What the LUN allows now; `masks` are the CDB bits the core refuses (reserved or
 * unsupported), per opcode in the order READ(10), WRITE(10), READ(16), WRITE(16). */
struct fast_lun {
    int fd;               /* buffered descriptor */
    int direct_fd;        /* O_DIRECT descriptor for block-aligned buffers, or -1 */
    uint32_t block_size;
    uint32_t max_blocks;  /* MAXIMUM TRANSFER LENGTH */
    uint64_t blocks;
    int reads;
    int writes;           /* but never one that must be durable before it completes: FUA */
    uint8_t masks[4][16];
    /* The S-VOLs of a P-VOL in PAIR: a write goes to the P-VOL (fd), then to each of them,
     * and only into regions of `region` bytes whose write intent is already durable
     * (ready[r]); each region written is flagged in touched[r] for the log's owner. */
    int mirrors;
    int mirror_fd[4];
    int mirror_direct_fd[4];
    uint64_t region;
    uint64_t nregions;
    const uint8_t *ready;
    uint8_t *touched;
};

/* Serve what the fast path owns of the entries queued when it is called — never more, so a
 * ring kept busy cannot hold the LUN's state (a pair waiting to be created, a unit attention
 * waiting to be reported) for longer than one batch — then ring the doorbell (a 4-byte write
 * to `doorbell_fd`) for what it answered. Large transfers (256 KiB or more) ring it as soon
 * as they are answered, so the host refills its queue while the next one runs. Everything runs
 * on the caller's thread: in the VM, a thread per transfer (an S-VOL's write beside the
 * P-VOL's, large READs side by side) cost more CPU than it overlapped, and was slower.
 *
 * Then, while the host sends one command at a time (QD1: the next comes only after this
 * answer), spin on cmd_head for the next, as long as one comes within `idle_ns` of the last
 * batch, for up to `limit_ns` in all: it is answered with no wake-up, no GIL and no trip
 * through the Python loop. While the host keeps a queue, return once it is empty instead: the
 * loop's trip lets the queue fill, the next pass serves a batch with one doorbell, and a
 * spinner there would take the CPU the host and the kernel's completion work need, catching
 * each command alone (in the VM: 18-45% more IOPS at QD16 without the spin; 3.5 times fewer
 * at QD1). Which of the two it is (`deep`) the first pass of a call tells: two commands or
 * more, or one; a spinner returns once in PROBE_EVERY waits (`lone`) to look again. At most
 * one ring of the process spins at a time, so busy LUNs do not spin on every CPU; the others
 * sleep in poll() on their `event_fd` (uio: the kernel's interrupt; read to acknowledge it;
 * -1: none, return instead) and serve what it announces.
 *
 * The watch lasts `idle_ns`, or longer while the host's commands come just after it ends:
 * a watch that ends empty and a command that comes by the event soon after (the whole gap
 * within `max_idle_ns`) widen it to a quarter more than that gap, so the next one is caught
 * spinning; a longer pause narrows it by half again, down to `idle_ns` (`window_ns`). In the
 * VM a QD1 host's next command comes 1-3 ms after the answer (the guest's completion and
 * fio's next submission, emulated): a fixed 1 ms watch missed most of them and each miss
 * cost a wake-up and a trip through Python; a fixed 5 ms watch caught them but also spun
 * after every burst. On real hardware the gap is microseconds and the window stays put.
 *
 * Returns 1 when stopped at an entry for the core, 0 when the ring is empty and the caller
 * should sleep on its event (after the watch, or at once as above), 2 when `limit_ns` ran out
 * (the caller then looks at the LUN again: a pair waiting for its gate, a unit attention),
 * -errno when the doorbell failed. */
int ring_serve_fast_for(struct fast_ring *ring, const struct fast_lun *lun, int doorbell_fd,
                        int event_fd, uint64_t idle_ns, uint64_t max_idle_ns, uint64_t limit_ns);

#endif
