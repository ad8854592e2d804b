/*
 * Dirty-grain tracker: a hierarchical bitmap (one bit per grain, plus summary levels in which
 * bit N says "word N of the level below may be non-zero"), after QEMU's HBitmap. Work on a
 * sparse map is proportional to what is dirty, not to the volume size.
 *
 * Concurrency: dm_mark/dm_mark_many are lock-free (atomic OR on 64-bit words; a batch dense
 * against the map is first gathered with plain stores in a private bitmap, then ORed in with one
 * atomic per word it touched). Everything that clears bits (dm_clear, the set algebra) takes
 * the map's mutex and repairs the summary with a re-check, so a racing marker never leaves a set
 * bit invisible. Readers are lock-free and see a point-in-time-ish snapshot. dm_grow must not
 * run concurrently with anything else.
 *
 * Byte ranges are clamped to the volume: a range past the end covers only what lies inside.
 * These declarations are also parsed by cffi (vscsi/_build.py): keep them plain.
 */
#ifndef VSCSI_TRACKER_H
#define VSCSI_TRACKER_H

#include <stddef.h>
#include <stdint.h>

typedef struct dm dm_t;

enum { DM_OR = 0, DM_ANDNOT = 1, DM_AND = 2 };

dm_t *dm_new(uint64_t size, uint64_t grain);
void dm_free(dm_t *m);
dm_t *dm_copy(dm_t *m);
int dm_grow(dm_t *m, uint64_t new_size);

uint64_t dm_size(const dm_t *m);
uint64_t dm_grain(const dm_t *m);
uint64_t dm_nbytes(const dm_t *m);
uint64_t dm_nwords(const dm_t *m);

uint64_t dm_mark(dm_t *m, uint64_t off, uint64_t len);
uint64_t dm_mark_many(dm_t *m, const uint64_t *offs, const uint64_t *lens, size_t n);
uint64_t dm_clear(dm_t *m, uint64_t off, uint64_t len);
int dm_test(const dm_t *m, uint64_t off, uint64_t len);
uint64_t dm_count(const dm_t *m);

int dm_next_extent(const dm_t *m, uint64_t start, uint64_t end, uint64_t *out);
uint64_t dm_count_extents(const dm_t *m, uint64_t start, uint64_t end);
size_t dm_extents(const dm_t *m, uint64_t start, uint64_t end, uint64_t *offs, uint64_t *lens,
                  size_t cap);

int dm_merge(dm_t *dst, const dm_t *src, int op);
int dm_equal(const dm_t *a, const dm_t *b);

void dm_export(const dm_t *m, uint64_t *words);
int dm_import(dm_t *m, const uint64_t *words);

#endif
