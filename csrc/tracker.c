/* Dirty-grain tracker; see tracker.h for the design and the concurrency rules. */
#include "tracker.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define MAXLV 12 /* 64^11 words of level 0 exceed any 64-bit volume at 512-byte grains */
#define NONE UINT64_MAX
/* dm_mark_many batches through a private bitmap from this many writes per level-0 word, and
 * from BATCH_MIN writes so that the mmap it costs is amortised. */
#define BATCH_DENSITY 2
#define BATCH_MIN 4096

/* Level-0 words are only read with relaxed loads; the summary protocol needs the sequentially
 * consistent order between "marker sets child, reads parent" and "clearer clears parent, reads
 * child" (a Dekker pattern), so those use SEQ_CST, which costs nothing extra on x86. */
#define LOAD(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define LOAD_SC(p) __atomic_load_n((p), __ATOMIC_SEQ_CST)
#define OR_SC(p, v) __atomic_fetch_or((p), (v), __ATOMIC_SEQ_CST)
#define AND_SC(p, v) __atomic_fetch_and((p), (v), __ATOMIC_SEQ_CST)

struct dm {
    uint64_t size;          /* bytes */
    uint64_t nbits;         /* grains */
    uint64_t count;         /* dirty grains, updated atomically */
    unsigned shift;         /* log2(grain) */
    unsigned nlv;           /* levels; level nlv-1 has one word */
    uint64_t nwords[MAXLV]; /* words per level */
    uint64_t *lv[MAXLV];
    pthread_mutex_t lock; /* serialises clearers and the set algebra */
};

static inline unsigned ctz64(uint64_t w) { return (unsigned)__builtin_ctzll(w); }
static inline unsigned pop64(uint64_t w) { return (unsigned)__builtin_popcountll(w); }

/* pop64 for words that usually hold at most one bit: without -mpopcnt the builtin is a libgcc
 * call, which the hot paths cannot afford. */
static inline unsigned pop64_sparse(uint64_t w) { return (w & (w - 1)) ? pop64(w) : w != 0; }

/* Bits [lo, 64) of a word, lo < 64. */
static inline uint64_t from_bit(uint64_t lo) { return ~0ULL << lo; }

/* Bits [0, hi) of a word, 0 < hi <= 64. */
static inline uint64_t below_bit(uint64_t hi) { return ~0ULL >> (64 - hi); }

static unsigned log2_exact(uint64_t v) { return ctz64(v); }

static void free_levels(dm_t *m)
{
    for (unsigned k = 0; k < MAXLV; k++) {
        free(m->lv[k]);
        m->lv[k] = NULL;
    }
}

/* Allocates zeroed levels for nbits; returns 0 or -1 (nothing allocated). */
static int alloc_levels(uint64_t nbits, unsigned *nlv, uint64_t *nwords, uint64_t **lv)
{
    uint64_t bits = nbits;
    unsigned k = 0;
    do {
        nwords[k] = (bits + 63) / 64;
        lv[k] = calloc(nwords[k], sizeof(uint64_t));
        if (!lv[k]) {
            while (k--)
                free(lv[k]);
            return -1;
        }
        bits = nwords[k++];
    } while (bits > 1 && k < MAXLV);
    *nlv = k;
    return 0;
}

/* Recomputes the summary levels and the count from level 0 (no concurrent users). */
static void rebuild(dm_t *m)
{
    uint64_t count = 0;
    for (unsigned k = 1; k < m->nlv; k++)
        memset(m->lv[k], 0, m->nwords[k] * sizeof(uint64_t));
    for (unsigned k = 0; k + 1 < m->nlv; k++) {
        for (uint64_t i = 0; i < m->nwords[k]; i++) {
            uint64_t w = m->lv[k][i];
            if (!w)
                continue;
            if (k == 0)
                count += pop64(w);
            m->lv[k + 1][i >> 6] |= 1ULL << (i & 63);
        }
    }
    if (m->nlv == 1)
        count = pop64(m->lv[0][0]);
    m->count = count;
}

dm_t *dm_new(uint64_t size, uint64_t grain)
{
    if (size == 0 || grain < 512 || (grain & (grain - 1)) || grain > (1ULL << 40))
        return NULL;
    dm_t *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    m->size = size;
    m->shift = log2_exact(grain);
    m->nbits = (size >> m->shift) + ((size & (grain - 1)) != 0);
    if (alloc_levels(m->nbits, &m->nlv, m->nwords, m->lv) || pthread_mutex_init(&m->lock, NULL)) {
        free_levels(m);
        free(m);
        return NULL;
    }
    return m;
}

void dm_free(dm_t *m)
{
    if (!m)
        return;
    free_levels(m);
    pthread_mutex_destroy(&m->lock);
    free(m);
}

dm_t *dm_copy(dm_t *m)
{
    dm_t *c = dm_new(m->size, 1ULL << m->shift);
    if (!c)
        return NULL;
    for (uint64_t i = 0; i < m->nwords[0]; i++)
        c->lv[0][i] = LOAD(&m->lv[0][i]);
    rebuild(c);
    return c;
}

int dm_grow(dm_t *m, uint64_t new_size)
{
    if (new_size < m->size)
        return -1;
    uint64_t grain = 1ULL << m->shift;
    uint64_t nbits = (new_size >> m->shift) + ((new_size & (grain - 1)) != 0);
    unsigned nlv;
    uint64_t nwords[MAXLV] = {0};
    uint64_t *lv[MAXLV] = {0};
    if (alloc_levels(nbits, &nlv, nwords, lv))
        return -1;
    pthread_mutex_lock(&m->lock);
    memcpy(lv[0], m->lv[0], m->nwords[0] * sizeof(uint64_t));
    free_levels(m);
    memcpy(m->lv, lv, sizeof(lv));
    memcpy(m->nwords, nwords, sizeof(nwords));
    m->nlv = nlv;
    m->nbits = nbits;
    m->size = new_size;
    rebuild(m);
    pthread_mutex_unlock(&m->lock);
    return 0;
}

uint64_t dm_size(const dm_t *m) { return m->size; }
uint64_t dm_grain(const dm_t *m) { return 1ULL << m->shift; }
uint64_t dm_nwords(const dm_t *m) { return m->nwords[0]; }
uint64_t dm_count(const dm_t *m) { return __atomic_load_n(&m->count, __ATOMIC_RELAXED); }

uint64_t dm_nbytes(const dm_t *m)
{
    uint64_t n = sizeof(*m);
    for (unsigned k = 0; k < m->nlv; k++)
        n += m->nwords[k] * sizeof(uint64_t);
    return n;
}

/* ---- summary maintenance ------------------------------------------------------------------ */

/* A bit of level-(k-1) word idx was just set: make the word reachable from the top. Whoever turns a
 * summary word from zero to non-zero owns the walk further up; a bit already set means its owner
 * did (or is doing) the rest, or a clearer will see our child on its re-check and restore it. */
static inline void summary_raise(dm_t *m, unsigned k, uint64_t idx)
{
    for (; k < m->nlv; k++) {
        uint64_t *w = &m->lv[k][idx >> 6];
        uint64_t bit = 1ULL << (idx & 63);
        if (LOAD_SC(w) & bit)
            return;
        if (OR_SC(w, bit))
            return;
        idx >>= 6;
    }
}

/* Level-0 word idx went non-zero. */
static inline void summary_set(dm_t *m, uint64_t idx) { summary_raise(m, 1, idx); }

/* Level-0 word idx was seen zero by a clearer (mutex held): drop its summary bits, re-checking
 * the child after each drop so that a concurrent marker's bit is never hidden. */
static void summary_clear(dm_t *m, uint64_t idx)
{
    for (unsigned k = 1; k < m->nlv; k++) {
        uint64_t *w = &m->lv[k][idx >> 6];
        uint64_t bit = 1ULL << (idx & 63);
        uint64_t old = AND_SC(w, ~bit);
        if (LOAD_SC(&m->lv[k - 1][idx])) {
            if (old & bit)
                OR_SC(w, bit);
            return;
        }
        if (old & ~bit)
            return;
        idx >>= 6;
    }
}

/* ---- marking ------------------------------------------------------------------------------ */

/* Every marker that sets a level-0 bit checks the parent afterwards (a load that is almost
 * always a hit on a set bit, so the branch predicts well); the bit test lets the compiler use a
 * single locked bit-test-and-set. */
static inline uint64_t set_bit(dm_t *m, uint64_t b)
{
    uint64_t wi = b >> 6;
    uint64_t bit = 1ULL << (b & 63);
    uint64_t *w = &m->lv[0][wi];
    if (LOAD(w) & bit)
        return 0;
    if (OR_SC(w, bit) & bit)
        return 0;
    summary_set(m, wi);
    return 1;
}

/* Sets grains [b, e), b < e. */
static uint64_t set_range(dm_t *m, uint64_t b, uint64_t e)
{
    uint64_t newly = 0;
    while (b < e) {
        uint64_t wi = b >> 6;
        uint64_t hi = (e - (wi << 6)) >= 64 ? 64 : e - (wi << 6);
        uint64_t mask = from_bit(b & 63) & below_bit(hi);
        uint64_t *w = &m->lv[0][wi];
        if ((LOAD(w) & mask) != mask) {
            uint64_t old = OR_SC(w, mask);
            newly += pop64_sparse(mask & ~old);
            summary_set(m, wi);
        }
        b = (wi + 1) << 6;
    }
    return newly;
}

/* Grains [*b, *e) touched by [off, off+len) clamped to the volume; 0 if empty. */
static inline int touched(const dm_t *m, uint64_t off, uint64_t len, uint64_t *b, uint64_t *e)
{
    if (len == 0 || off >= m->size)
        return 0;
    if (len > m->size - off)
        len = m->size - off;
    *b = off >> m->shift;
    *e = ((off + len - 1) >> m->shift) + 1;
    return 1;
}

uint64_t dm_mark(dm_t *m, uint64_t off, uint64_t len)
{
    uint64_t b, e;
    if (!touched(m, off, len, &b, &e))
        return 0;
    uint64_t newly = (e - b == 1) ? set_bit(m, b) : set_range(m, b, e);
    if (newly)
        __atomic_fetch_add(&m->count, newly, __ATOMIC_RELAXED);
    return newly;
}

#define PREFETCH_AHEAD 16

/* Bounds of range i of a batch as grains [*b, *e); 0 if it lies wholly past the volume. */
static inline int batch_range(const dm_t *m, const uint64_t *offs, const uint64_t *lens,
                              size_t i, uint64_t *b, uint64_t *e)
{
    return touched(m, offs[i], lens[i], b, e);
}

static inline void prefetch_ahead(const dm_t *m, const uint64_t *words, const uint64_t *offs,
                                  size_t i, size_t n)
{
    if (i + PREFETCH_AHEAD < n && offs[i + PREFETCH_AHEAD] < m->size)
        __builtin_prefetch(&words[offs[i + PREFETCH_AHEAD] >> (m->shift + 6)], 1, 3);
}

/* One atomic per write: the path for batches that are sparse against the map. */
static uint64_t mark_each(dm_t *m, const uint64_t *offs, const uint64_t *lens, size_t n)
{
    uint64_t newly = 0, b, e;
    for (size_t i = 0; i < n; i++) {
        prefetch_ahead(m, m->lv[0], offs, i, n);
        if (batch_range(m, offs, lens, i, &b, &e))
            newly += (e - b == 1) ? set_bit(m, b) : set_range(m, b, e);
    }
    return newly;
}

/* A private copy-sized bitmap, zeroed by the kernel; the batch density guarantees that a linear
 * scan of it costs less than the marking did. */
static uint64_t *scratch_new(uint64_t nwords)
{
    void *p = mmap(NULL, nwords * sizeof(uint64_t), PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void scratch_range(uint64_t *s, uint64_t b, uint64_t e)
{
    while (b < e) {
        uint64_t wi = b >> 6;
        uint64_t hi = (e - (wi << 6)) >= 64 ? 64 : e - (wi << 6);
        s[wi] |= from_bit(b & 63) & below_bit(hi);
        b = (wi + 1) << 6;
    }
}

/* ORs mask into level-0 word wi; returns the word's previous value. A CAS rather than a
 * fetch-or because x86 can only return the old value of an OR through one. */
static inline uint64_t or_word(dm_t *m, uint64_t wi, uint64_t mask)
{
    uint64_t *w = &m->lv[0][wi];
    uint64_t old = LOAD(w);
    while ((old & mask) != mask &&
           !__atomic_compare_exchange_n(w, &old, old | mask, 1, __ATOMIC_SEQ_CST,
                                        __ATOMIC_RELAXED))
        ;
    return old;
}

/* Level-1 word j's children in mask were just set: the same protocol as summary_set, for
 * up to 64 children at once. */
static void summary_set_many(dm_t *m, uint64_t j, uint64_t mask)
{
    if (m->nlv < 2)
        return;
    uint64_t *w = &m->lv[1][j];
    if ((LOAD_SC(w) & mask) == mask)
        return;
    if (OR_SC(w, mask) == 0 && m->nlv > 2)
        summary_raise(m, 2, j); /* level-1 word j went non-zero: level 2 up */
}

/* ORs the scratch into the map, one atomic per touched word, in address order. */
static uint64_t scratch_merge(dm_t *m, const uint64_t *s)
{
    uint64_t newly = 0, sum = 0, nwords = m->nwords[0];
    for (uint64_t wi = 0; wi < nwords; wi++) {
        if (s[wi]) {
            uint64_t old = or_word(m, wi, s[wi]);
            newly += pop64_sparse(s[wi] & ~old);
            sum |= 1ULL << (wi & 63);
        }
        if ((wi & 63) == 63 || wi + 1 == nwords) {
            if (sum)
                summary_set_many(m, wi >> 6, sum);
            sum = 0;
        }
    }
    return newly;
}

/* Plain stores into a private bitmap, then one atomic per touched word: for batches dense
 * enough that several writes share a word, which is where atomics dominate. */
static uint64_t mark_batched(dm_t *m, uint64_t *s, const uint64_t *offs, const uint64_t *lens,
                             size_t n)
{
    uint64_t b, e;
    for (size_t i = 0; i < n; i++) {
        prefetch_ahead(m, s, offs, i, n);
        if (!batch_range(m, offs, lens, i, &b, &e))
            continue;
        if (e - b == 1)
            s[b >> 6] |= 1ULL << (b & 63);
        else
            scratch_range(s, b, e);
    }
    uint64_t newly = scratch_merge(m, s);
    munmap(s, m->nwords[0] * sizeof(uint64_t));
    return newly;
}

uint64_t dm_mark_many(dm_t *m, const uint64_t *offs, const uint64_t *lens, size_t n)
{
    int dense = n >= BATCH_MIN && n / BATCH_DENSITY >= m->nwords[0];
    uint64_t *s = dense ? scratch_new(m->nwords[0]) : NULL;
    uint64_t newly = s ? mark_batched(m, s, offs, lens, n) : mark_each(m, offs, lens, n);
    if (newly)
        __atomic_fetch_add(&m->count, newly, __ATOMIC_RELAXED);
    return newly;
}

/* ---- searching ---------------------------------------------------------------------------- */

/* First set grain >= pos, or NONE; descends through the summary so empty space costs
 * O(log64 n). A stale summary bit (child already cleared) just sends the search up again. */
static uint64_t find_set(const dm_t *m, uint64_t pos)
{
    unsigned k = 0;
    uint64_t i = pos;
    const unsigned top = m->nlv - 1;
    for (;;) {
        if (i >= m->nwords[k] * 64)
            return NONE;
        uint64_t wi = i >> 6;
        uint64_t w = (k ? LOAD_SC(&m->lv[k][wi]) : LOAD(&m->lv[k][wi])) & from_bit(i & 63);
        if (w) {
            uint64_t bit = (wi << 6) | ctz64(w);
            if (k == 0)
                return bit < m->nbits ? bit : NONE;
            k--;
            i = bit << 6;
            continue;
        }
        if (k == top)
            return NONE;
        i = wi + 1;
        k++;
    }
}

/* First clear grain in [pos, limit), or limit. */
static uint64_t find_clear(const dm_t *m, uint64_t pos, uint64_t limit)
{
    while (pos < limit) {
        uint64_t wi = pos >> 6;
        uint64_t w = ~LOAD(&m->lv[0][wi]) & from_bit(pos & 63);
        if (w) {
            uint64_t z = (wi << 6) | ctz64(w);
            return z < limit ? z : limit;
        }
        pos = (wi + 1) << 6;
    }
    return limit;
}

/* Grain window [*b, *e) for the byte window [start, end) clamped to the volume; 0 if empty. */
static int window(const dm_t *m, uint64_t start, uint64_t end, uint64_t *b, uint64_t *e)
{
    if (end > m->size)
        end = m->size;
    if (start >= end)
        return 0;
    *b = start >> m->shift;
    *e = ((end - 1) >> m->shift) + 1;
    return 1;
}

/* Byte extent of grains [gb, ge) clipped to [start, end). */
static void to_bytes(const dm_t *m, uint64_t gb, uint64_t ge, uint64_t start, uint64_t end,
                     uint64_t *off, uint64_t *len)
{
    uint64_t lo = gb << m->shift, hi = ge >= m->nbits ? m->size : ge << m->shift;
    if (end > m->size)
        end = m->size;
    if (lo < start)
        lo = start;
    if (hi > end)
        hi = end;
    *off = lo;
    *len = hi - lo;
}

int dm_test(const dm_t *m, uint64_t off, uint64_t len)
{
    uint64_t b, e;
    if (!touched(m, off, len, &b, &e))
        return 0;
    uint64_t s = find_set(m, b);
    return s != NONE && s < e;
}

int dm_next_extent(const dm_t *m, uint64_t start, uint64_t end, uint64_t *out)
{
    uint64_t b, e;
    if (!window(m, start, end, &b, &e))
        return 0;
    uint64_t s = find_set(m, b);
    if (s == NONE || s >= e)
        return 0;
    to_bytes(m, s, find_clear(m, s, e), start, end, &out[0], &out[1]);
    return 1;
}

/* Next non-zero level-0 word in [wi, last], or NONE: a plain walk while the map is dense, the
 * summary as soon as it is not. */
static inline uint64_t next_nonzero(const dm_t *m, uint64_t wi, uint64_t last)
{
    if (wi > last)
        return NONE;
    if (LOAD(&m->lv[0][wi]))
        return wi;
    uint64_t s = find_set(m, wi << 6);
    return (s == NONE || (s >> 6) > last) ? NONE : s >> 6;
}

/* Level-0 word wi restricted to the grain window [b, e). */
static inline uint64_t window_word(const dm_t *m, uint64_t wi, uint64_t b, uint64_t e)
{
    uint64_t w = LOAD(&m->lv[0][wi]);
    if (wi == b >> 6)
        w &= from_bit(b & 63);
    if (wi == (e - 1) >> 6)
        w &= below_bit(e - (wi << 6));
    return w;
}

uint64_t dm_count_extents(const dm_t *m, uint64_t start, uint64_t end)
{
    uint64_t b, e;
    if (!window(m, start, end, &b, &e))
        return 0;
    const uint64_t last = (e - 1) >> 6;
    uint64_t runs = 0, carry = 0, next = NONE;
    for (uint64_t wi = next_nonzero(m, b >> 6, last); wi != NONE;
         wi = next_nonzero(m, wi + 1, last)) {
        uint64_t w = window_word(m, wi, b, e);
        if (wi != next)
            carry = 0;
        runs += pop64(w & ~((w << 1) | carry));
        carry = w >> 63;
        next = wi + 1;
    }
    return runs;
}

/* Runs are extracted a word at a time: adding a word's lowest set bit carries through the run
 * that starts there, so ctz of the sum is where the run ends. */
size_t dm_extents(const dm_t *m, uint64_t start, uint64_t end, uint64_t *offs, uint64_t *lens,
                  size_t cap)
{
    uint64_t b, e;
    if (cap == 0 || !window(m, start, end, &b, &e))
        return 0;
    const uint64_t last = (e - 1) >> 6;
    const unsigned sh = m->shift;
    size_t n = 0;
    uint64_t open = NONE, next = NONE;
#define EMIT(s, t)                                                                             \
    do {                                                                                       \
        offs[n] = (s) << sh;                                                                   \
        lens[n] = ((t) - (s)) << sh;                                                           \
        if (++n == cap)                                                                        \
            goto done;                                                                         \
    } while (0)
    for (uint64_t wi = next_nonzero(m, b >> 6, last); wi != NONE;
         wi = next_nonzero(m, wi + 1, last)) {
        uint64_t w = window_word(m, wi, b, e), base = wi << 6;
        if (open != NONE) {
            if (wi == next && (w & 1)) {
                uint64_t x = w + 1;
                if (!x) {
                    next = wi + 1;
                    continue;
                }
                EMIT(open, base + ctz64(x));
                w &= x;
            } else {
                EMIT(open, next << 6);
            }
            open = NONE;
        }
        while (w) {
            uint64_t x = w + (w & -w);
            if (!x) {
                open = base + ctz64(w);
                break;
            }
            EMIT(base + ctz64(w), base + ctz64(x));
            w &= x;
        }
        next = wi + 1;
    }
    if (open != NONE)
        EMIT(open, next << 6);
#undef EMIT
done:
    if (n) {
        uint64_t lo = start > offs[0] ? start : offs[0];
        lens[0] -= lo - offs[0];
        offs[0] = lo;
        uint64_t hi = end < m->size ? end : m->size;
        if (offs[n - 1] + lens[n - 1] > hi)
            lens[n - 1] = hi - offs[n - 1];
    }
    return n;
}

/* ---- clearing (mutex held) ------------------------------------------------------------------ */

/* Clears grains [b, e); returns how many were set. */
static uint64_t clear_range(dm_t *m, uint64_t b, uint64_t e)
{
    uint64_t cleared = 0;
    while (b < e) {
        uint64_t wi = b >> 6;
        uint64_t hi = (e - (wi << 6)) >= 64 ? 64 : e - (wi << 6);
        uint64_t mask = from_bit(b & 63) & below_bit(hi);
        uint64_t *w = &m->lv[0][wi];
        if (LOAD(w) & mask) {
            uint64_t old = AND_SC(w, ~mask);
            cleared += pop64(old & mask);
            if (!(old & ~mask))
                summary_clear(m, wi);
        }
        b = (wi + 1) << 6;
    }
    return cleared;
}

static void uncount(dm_t *m, uint64_t n)
{
    if (n)
        __atomic_fetch_sub(&m->count, n, __ATOMIC_RELAXED);
}

uint64_t dm_clear(dm_t *m, uint64_t off, uint64_t len)
{
    if (len == 0 || off >= m->size)
        return 0;
    uint64_t end = len > m->size - off ? m->size : off + len;
    uint64_t mask = (1ULL << m->shift) - 1;
    uint64_t b = (off >> m->shift) + ((off & mask) != 0);
    uint64_t e = end == m->size ? m->nbits : end >> m->shift;
    if (b >= e)
        return 0;
    pthread_mutex_lock(&m->lock);
    uint64_t n = clear_range(m, b, e);
    uncount(m, n);
    pthread_mutex_unlock(&m->lock);
    return n;
}

/* ---- set algebra ---------------------------------------------------------------------------- */

static int same_geometry(const dm_t *a, const dm_t *b)
{
    return a->size == b->size && a->shift == b->shift;
}

/* Next non-zero level-0 word index >= wi, or NONE. */
static uint64_t next_word(const dm_t *m, uint64_t wi)
{
    uint64_t s = find_set(m, wi << 6);
    return s == NONE ? NONE : s >> 6;
}

static void merge_or(dm_t *dst, const dm_t *src)
{
    uint64_t newly = 0;
    for (uint64_t wi = next_word(src, 0); wi != NONE; wi = next_word(src, wi + 1)) {
        uint64_t w = LOAD(&src->lv[0][wi]);
        if (!w)
            continue;
        uint64_t old = OR_SC(&dst->lv[0][wi], w);
        newly += pop64(w & ~old);
        if (!old)
            summary_set(dst, wi);
    }
    if (newly)
        __atomic_fetch_add(&dst->count, newly, __ATOMIC_RELAXED);
}

/* Clears bits of dst word wi selected by keep(word) == 0; returns how many were set. */
static uint64_t and_word(dm_t *dst, uint64_t wi, uint64_t keep)
{
    uint64_t old = AND_SC(&dst->lv[0][wi], keep);
    if (old && !(old & keep))
        summary_clear(dst, wi);
    return pop64(old & ~keep);
}

static void merge_andnot(dm_t *dst, const dm_t *src)
{
    uint64_t cleared = 0;
    for (uint64_t wi = next_word(src, 0); wi != NONE; wi = next_word(src, wi + 1)) {
        uint64_t w = LOAD(&src->lv[0][wi]);
        if (w)
            cleared += and_word(dst, wi, ~w);
    }
    uncount(dst, cleared);
}

static void merge_and(dm_t *dst, const dm_t *src)
{
    uint64_t cleared = 0;
    for (uint64_t wi = next_word(dst, 0); wi != NONE; wi = next_word(dst, wi + 1))
        cleared += and_word(dst, wi, LOAD(&src->lv[0][wi]));
    uncount(dst, cleared);
}

int dm_merge(dm_t *dst, const dm_t *src, int op)
{
    if (!same_geometry(dst, src) || op < DM_OR || op > DM_AND)
        return -1;
    pthread_mutex_lock(&dst->lock);
    if (op == DM_OR)
        merge_or(dst, src);
    else if (op == DM_ANDNOT)
        merge_andnot(dst, src);
    else
        merge_and(dst, src);
    pthread_mutex_unlock(&dst->lock);
    return 0;
}

int dm_equal(const dm_t *a, const dm_t *b)
{
    if (!same_geometry(a, b))
        return 0;
    for (uint64_t i = 0; i < a->nwords[0]; i++)
        if (LOAD(&a->lv[0][i]) != LOAD(&b->lv[0][i]))
            return 0;
    return 1;
}

/* ---- serialisation ---------------------------------------------------------------------------- */

void dm_export(const dm_t *m, uint64_t *words)
{
    for (uint64_t i = 0; i < m->nwords[0]; i++)
        words[i] = LOAD(&m->lv[0][i]);
}

int dm_import(dm_t *m, const uint64_t *words)
{
    uint64_t last = m->nwords[0] - 1, tail = m->nbits - (last << 6);
    if (words[last] & ~below_bit(tail))
        return -1;
    pthread_mutex_lock(&m->lock);
    memcpy(m->lv[0], words, m->nwords[0] * sizeof(uint64_t));
    rebuild(m);
    pthread_mutex_unlock(&m->lock);
    return 0;
}
