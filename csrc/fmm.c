/*
 * fmm.c -- the fastmmap engine.  See fmm.h for the file format and the
 * contract of every public function.
 *
 * Invariants kept by every function that mutates a page (all of them run
 * with the page's mutex held by the calling thread):
 *   - hdr->dirty is 1 from before the first mutated byte to after the last,
 *     so a writer killed half-way leaves a mark the next locker sees;
 *   - FMM_PAGE_HEADER_SIZE + 4*num_slots <= free_data <= page_size;
 *   - live + deleted <= num_slots and at least one slot is empty;
 *   - every live slot points at an entry inside [data_start, free_data).
 * Nothing read from the mapping is trusted: page_ok() checks the header
 * after each lock and entry_ok() checks each entry before its bytes are
 * used.  A page that fails is re-initialised (a "repair"), never read out
 * of bounds.
 *
 * Naming: public fmm_*, everything else static; `ph` is a page header,
 * `c` the handle.
 */
#define _GNU_SOURCE
#include "fmm.h"
#include "fmm_perl.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <dirent.h>
#include <pwd.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/syscall.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fmm_compat.h"

#ifdef FMM_DEBUG_LOG
#define FMM_DEBUG(...) fprintf(stderr, "fmm: " __VA_ARGS__)
#else
#define FMM_DEBUG(...) ((void)0)
#endif

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* Compiler barrier: a process killed by a signal has executed its stores
 * in program order, so keeping the compiler from moving stores across the
 * dirty marker is enough for crash detection. */
#define BARRIER() __atomic_signal_fence(__ATOMIC_SEQ_CST)

#define PAGE_MAGIC 0x5046u /* "FP" in a little-endian file */
#define SLOT_EMPTY 0u
#define SLOT_DELETED 1u
#define MIN_SLOTS 4u
#define RENUMBER_AT 0xF0000000u
/* Compaction policy: a rebuild for a store keeps every live entry if they
 * and the new item fill at most FILL_PCT of the data area, and otherwise
 * evicts least recently used entries until they do.  Every rebuild thus
 * leaves at least (100 - FILL_PCT)% free, which bounds how often a page is
 * rebuilt, while pages stay nearly full (hit rate).  Measured on a Zipf(0.99)
 * read-through workload (benchmarks/): 95 holds 8% more entries than a
 * 92/82 high/low pair for about 30% more instructions in eviction-heavy
 * stores, and brings the hit rate within 3 points of an exact LRU. */
#ifndef FILL_PCT
#define FILL_PCT 95u
#endif

/* One read of a field of the mapping.  The mapping is shared with other
 * processes that may write it at any moment (or with a hostile writer that
 * ignores the locks), and it may turn to zeros under us (the SIGBUS guard):
 * a value that is bounds-checked must be the value that is then used, so
 * such fields are read once, into a local, never re-read. */
#define RD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

#define ROUND4(x) (((uint64_t)(x) + 3u) & ~(uint64_t)3u)
#define KLEN(kf) ((kf)&0xFFFFFFu)
#define KFLAGS(kf) ((kf) >> 24)

/* Modseq entries (fmm.h, "Modseq and tombstones"): the hot paths test the
 * FMM_F_MODSEQ bit of the entry's validated snapshot (esnap.flags) and take
 * the modseq work out of line, where the snapshot's vlen is checked to hold
 * the modseq.  The 8-byte modseq is the start of the value area, copied
 * with memcpy (values are not 8-aligned). */
#define MODSEQ_LEN 8u
#define TOMB_FLAGS (FMM_T_TOMBSTONE | FMM_F_MODSEQ)
#define IS_TOMB(f) (((f) & (FMM_F_TYPE_MASK | FMM_F_MODSEQ)) == TOMB_FLAGS)

/* ---------- On-disk structures ---------- */

typedef struct file_header {
    char magic[8];          /* 0  */
    uint32_t version;       /* 8  */
    uint32_t state;         /* 12 */
    uint32_t header_size;   /* 16 */
    uint32_t page_size;     /* 20 */
    uint32_t num_pages;     /* 24 */
    uint32_t start_slots;   /* 28 */
    uint64_t file_size;     /* 32 */
    uint64_t created;       /* 40 */
    uint64_t hash_seed;     /* 48 */
    uint64_t check;         /* 56: xxh64 of bytes 0..55 */
    uint64_t repairs;       /* 64: updated atomically */
} file_header;

/* The page header.  Every lock, get and set reads the mutex and the fields
 * magic..clock, so they share the page's first cache line: glibc's mutex
 * takes 40 bytes on x86_64 (and on most 64-bit ABIs), which leaves 24 bytes
 * for the hot fields (magic and dirty are 16 bits each to make room).  A
 * platform with a larger mutex pads it to 64 bytes instead: the same fields,
 * at offsets 24 bytes further, on the second line.  The statistics counters
 * (written only with enable_stats) come after the hot line. */
#define LOCK_BYTES (sizeof(pthread_mutex_t) <= 40 ? 40 : 64)
#define PAGE_HDR_FIELDS 36u /* bytes of fields after the mutex, spare excluded */
typedef struct page_hdr {
    union {
        pthread_mutex_t m;
        char pad[LOCK_BYTES];
    } lock;             /* 0 */
    uint16_t magic;     /* 40 */
    uint16_t dirty;     /* 42 */
    uint32_t num_slots; /* 44 */
    uint32_t live;      /* 48 */
    uint32_t seq;       /* 52: odd while the page is locked (see "Lock-free reads") */
    uint32_t free_data; /* 56 */
    uint32_t clock;     /* 60 */
    uint32_t deleted;   /* 64 */
    uint32_t nreads;    /* 68 */
    uint32_t nhits;     /* 72 */
    uint32_t spare[(FMM_PAGE_HEADER_SIZE - LOCK_BYTES - PAGE_HDR_FIELDS) / 4]; /* 76..127 */
} page_hdr;

typedef struct entry {
    uint32_t access;
    uint32_t atime_ms;     /* last access second mod 2^22 | expiry's milliseconds << 22 (fmm.h) */
    uint32_t expire_on;    /* expiry's unix second, 0 = never */
    uint32_t klen_flags;
    uint32_t vlen;
    /* key bytes, value bytes */
} entry;

_Static_assert(sizeof(pthread_mutex_t) <= 64, "mutex must fit 64 bytes");
_Static_assert(offsetof(page_hdr, deleted) == LOCK_BYTES + 24, "hot page-header fields end at the mutex + 24");
_Static_assert(sizeof(page_hdr) == FMM_PAGE_HEADER_SIZE, "page header size");
_Static_assert(sizeof(entry) == FMM_ENTRY_HEADER_SIZE, "entry header size");
_Static_assert(sizeof(file_header) <= FMM_HEADER_SIZE, "file header size");

static const char FILE_MAGIC[8] = {'F', 'A', 'S', 'T', 'M', 'M', 'A', 'P'};

struct fmm_cache {
    uint64_t id;               /* unique per handle in this process: thread-local records use it */
    unsigned char *base;
    size_t map_len;
    int fd;
    int anonymous;
    int stats;
    char *path;
    file_header *fh;
    uint32_t page_size;
    uint32_t num_pages;
    uint32_t start_slots;
    uint32_t offbits;  /* log2(page_size) - 2 */
    uint32_t offmask;  /* (1 << offbits) - 1 */
    uint64_t seed;
    uint64_t time_override;    /* unix milliseconds, 0 = the real clock */
    clockid_t clock_id;        /* CLOCK_REALTIME_COARSE, or CLOCK_REALTIME where it is too coarse */
    uint64_t clock_res_ns;     /* clock_id's resolution */
    uint32_t max_slots; /* most slots a page can hold: (page_size - 128) / 4 */
    int lost;           /* set by the SIGBUS guard: the file shrank under the mapping */
    int guard_slot;     /* fmm_guard_register's slot, or -1 */
    dev_t dev;
    ino_t ino;
    pfm_cache *perl;           /* non-NULL: a Perl-format file, every call goes to fmm_perl.c */
    uint8_t *ns_hint;          /* per page: log2 of its slot count when last seen (fmm_prefetch) */
    uint32_t batch_fault;      /* fmm_set_batch_fault (tests): 0 off */
};

/* The detail of the last error, per thread rather than per handle: threads
 * sharing a handle (free-threaded Python runs them in parallel) would
 * otherwise overwrite the text another thread is formatting into its
 * exception.  Only error paths touch it, so the default TLS model. */
static _Thread_local char tl_err[256];

/* ---------- XXH64 (the published algorithm, written from its spec) ---------- */

#define XP1 0x9E3779B185EBCA87ULL
#define XP2 0xC2B2AE3D27D4EB4FULL
#define XP3 0x165667B19E3779F9ULL
#define XP4 0x85EBCA77C2B2AE63ULL
#define XP5 0x27D4EB2F165667C5ULL

static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t rd64(const unsigned char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t rd32(const unsigned char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t xround(uint64_t acc, uint64_t in)
{
    acc += in * XP2;
    acc = rotl64(acc, 31);
    return acc * XP1;
}
static inline uint64_t xmerge(uint64_t acc, uint64_t v)
{
    acc ^= xround(0, v);
    return acc * XP1 + XP4;
}

uint64_t fmm_xxh64(const void *data, size_t len, uint64_t seed)
{
    const unsigned char *p = (const unsigned char *)data;
    const unsigned char *end = p + len;
    uint64_t h;
    if (len >= 32) {
        const unsigned char *limit = end - 32;
        uint64_t v1 = seed + XP1 + XP2, v2 = seed + XP2, v3 = seed, v4 = seed - XP1;
        do {
            v1 = xround(v1, rd64(p));
            v2 = xround(v2, rd64(p + 8));
            v3 = xround(v3, rd64(p + 16));
            v4 = xround(v4, rd64(p + 24));
            p += 32;
        } while (p <= limit);
        h = rotl64(v1, 1) + rotl64(v2, 7) + rotl64(v3, 12) + rotl64(v4, 18);
        h = xmerge(h, v1);
        h = xmerge(h, v2);
        h = xmerge(h, v3);
        h = xmerge(h, v4);
    } else {
        h = seed + XP5;
    }
    h += (uint64_t)len;
    while (p + 8 <= end) {
        h ^= xround(0, rd64(p));
        h = rotl64(h, 27) * XP1 + XP4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)rd32(p) * XP1;
        h = rotl64(h, 23) * XP2 + XP3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * XP5;
        h = rotl64(h, 11) * XP1;
        p++;
    }
    h ^= h >> 33;
    h *= XP2;
    h ^= h >> 29;
    h *= XP3;
    h ^= h >> 32;
    return h;
}

uint32_t fmm_perl_hash(const void *key, size_t klen) { return pfm_hash32(key, klen); }

/* The high and low halves of the 128-bit product, folded: one multiply
 * mixes every bit of both inputs into every bit of the result. */
static inline uint64_t mum64(uint64_t a, uint64_t b)
{
    __uint128_t r = (__uint128_t)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
}

uint64_t fmm_key_hash(const void *key, size_t len, uint64_t seed)
{
    if (len > 16)
        return fmm_xxh64(key, len, seed);
    /* Keys of up to 16 bytes (most cache keys): two overlapping loads cover
     * the bytes, two multiply-folds mix them with the seed and the length.
     * About 15 instructions where XXH64 takes about 70 for 16 bytes.
     * Both words are XORed with the seed before the first multiply: a word
     * that reaches the multiply as zero zeroes the product whatever the
     * other word holds, so an unseeded word would let a client that picks
     * keys choose the one first word that sends every key of a length to
     * one hash in every file.  The second word takes the seed rotated, so
     * that swapping the two words (the multiply is symmetric) is no
     * seed-independent collision either. */
    const unsigned char *p = key;
    uint64_t a, b;
    if (len >= 8) {
        a = rd64(p);
        b = rd64(p + len - 8);
    } else if (len >= 4) {
        a = rd32(p);
        b = rd32(p + len - 4);
    } else if (len) {
        a = ((uint64_t)p[0] << 16) | ((uint64_t)p[len >> 1] << 8) | p[len - 1];
        b = 0;
    } else {
        a = b = 0;
    }
    uint64_t h = mum64(a ^ seed ^ 0xa0761d6478bd642fULL, b ^ rotl64(seed, 32) ^ 0xe7037ed1a0b428dbULL);
    return mum64(h ^ 0x8ebc6af09c88c6e3ULL, (uint64_t)len ^ seed ^ 0x589965cc75374cc3ULL);
}

uint64_t fmm_hash(const fmm_cache *c, const void *key, size_t klen)
{
    if (UNLIKELY(c->perl))
        return pfm_hash32(key, klen);
    return fmm_key_hash(key, klen, c->seed);
}

uint32_t fmm_page_of(const fmm_cache *c, uint64_t hash)
{
    if (UNLIKELY(c->perl))
        return pfm_page_of(c->perl, hash);
    return (uint32_t)(((hash >> 32) * (uint64_t)c->num_pages) >> 32);
}

/* ---------- Small helpers ---------- */

static void set_detail(char *buf, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_detail(char *buf, size_t len, const char *fmt, ...)
{
    if (!buf || !len)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, len, fmt, ap);
    va_end(ap);
}

static inline int is_pow2(uint64_t x) { return x && !(x & (x - 1)); }
static inline uint32_t pow2_ceil(uint64_t x)
{
    uint64_t p = 1;
    while (p < x)
        p <<= 1;
    return p > (1u << 31) ? (1u << 31) : (uint32_t)p;
}
static inline uint32_t log2u(uint32_t x) { return 31u - (uint32_t)__builtin_clz(x); }

static inline page_hdr *PH(const fmm_cache *c, uint32_t page)
{
    return (page_hdr *)(c->base + FMM_HEADER_SIZE + (uint64_t)page * c->page_size);
}
static inline uint32_t *SLOTS(page_hdr *ph) { return (uint32_t *)((char *)ph + FMM_PAGE_HEADER_SIZE); }
static inline uint32_t data_start(uint32_t num_slots) { return FMM_PAGE_HEADER_SIZE + 4u * num_slots; }

/* The real clock in nanoseconds.  Both clocks are read in the vDSO, with
 * no syscall; the coarse one (the kernel's tick) is the cheaper. */
static inline uint64_t clock_ns(const fmm_cache *c)
{
    struct timespec ts;
    clock_gettime(c->clock_id, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The coarse clock lags real time by up to one tick; an entry stored with
 * it is given that tick more (fmm_expire_at), and read with it may live a
 * tick longer: 2 ticks + 1 ms past its time at most.  Above 4 ms a tick
 * (a kernel with HZ < 250) that would exceed 10 ms: the precise clock. */
#define COARSE_CLOCK_MAX_RES_NS 4000000u

static void clock_init(fmm_cache *c)
{
    struct timespec res;
    c->clock_id = CLOCK_REALTIME_COARSE;
    if (clock_getres(CLOCK_REALTIME_COARSE, &res) != 0 || res.tv_sec != 0 ||
        (uint64_t)res.tv_nsec > COARSE_CLOCK_MAX_RES_NS) {
        c->clock_id = CLOCK_REALTIME;
        if (clock_getres(CLOCK_REALTIME, &res) != 0 || res.tv_sec != 0)
            res.tv_nsec = 1000000; /* unknown: assume 1 ms */
    }
    c->clock_res_ns = (uint64_t)res.tv_nsec;
}

uint64_t fmm_now(const fmm_cache *c)
{
    if (UNLIKELY(c->perl))
        return pfm_now(c->perl);
    if (c->time_override)
        return c->time_override;
    return clock_ns(c) / 1000000u;
}

/* The second now, for last_access and the LRU stamp: time() is cheaper
 * than the millisecond clock, which only an entry with an expiry needs. */
static inline uint32_t now_sec(const fmm_cache *c)
{
    if (c->time_override)
        return (uint32_t)(c->time_override / 1000u);
    return (uint32_t)time(NULL);
}

/* now_sec, or from the millisecond time when it was read already. */
static inline uint32_t sec_of(const fmm_cache *c, uint64_t now_ms)
{
    return now_ms ? (uint32_t)(now_ms / 1000u) : now_sec(c);
}

/* A Perl-format file's times are u32 unix seconds. */
static inline uint32_t perl_secs(uint64_t t) { return t > 0xFFFFFFFFu ? 0xFFFFFFFFu : (uint32_t)t; }

uint32_t fmm_time_unit(const fmm_cache *c) { return c->perl ? 1u : 1000u; }

uint64_t fmm_expire_at(const fmm_cache *c, uint64_t after)
{
    if (UNLIKELY(c->perl))
        return pfm_now(c->perl) + after;
    if (c->time_override)
        return c->time_override + after;
    /* The clock may lag real time by its resolution: an entry must not
     * expire before `after` has passed, so count from the latest real time
     * the reading allows, rounded up to the millisecond. */
    return (clock_ns(c) + c->clock_res_ns + 999999u) / 1000000u + after;
}

void fmm_set_time(fmm_cache *c, uint64_t now)
{
    c->time_override = now;
    if (c->perl)
        pfm_set_time(c->perl, perl_secs(now));
}
uint32_t fmm_page_size(const fmm_cache *c) { return c->page_size; }
uint32_t fmm_num_pages(const fmm_cache *c) { return c->num_pages; }
uint32_t fmm_start_slots(const fmm_cache *c) { return c->start_slots; }
uint32_t fmm_max_item(const fmm_cache *c)
{
    if (UNLIKELY(c->perl))
        return pfm_max_item(c->perl);
    return c->page_size - data_start(MIN_SLOTS);
}
/* The size rule as a rounded entry size (the native format): the largest
 * entry is one that fills an empty page whose slot table has shrunk to
 * MIN_SLOTS, which a rebuild for a store does when it must. */
static inline int need_fits(const fmm_cache *c, uint64_t need) { return need <= c->page_size - data_start(MIN_SLOTS); }
int fmm_item_fits(const fmm_cache *c, uint64_t klen, uint64_t vlen)
{
    if (klen > UINT32_MAX || vlen > UINT32_MAX)
        return 0;
    if (UNLIKELY(c->perl))
        return pfm_item_fits(c->perl, klen, vlen);
    return klen <= FMM_MAX_KEY_LEN && need_fits(c, ROUND4((uint64_t)FMM_ENTRY_HEADER_SIZE + klen + vlen));
}
uint64_t fmm_repairs(const fmm_cache *c)
{
    if (UNLIKELY(c->perl))
        return pfm_repairs(c->perl);
    return c->fh ? __atomic_load_n(&c->fh->repairs, __ATOMIC_RELAXED) : 0;
}
const char *fmm_errdetail(const fmm_cache *c) { return c->perl ? pfm_errdetail(c->perl) : tl_err; }
int fmm_lost(const fmm_cache *c) { return UNLIKELY(__atomic_load_n(&c->lost, __ATOMIC_ACQUIRE) != 0); }
const int *fmm_lost_flag(const fmm_cache *c) { return &c->lost; }
const volatile unsigned char *fmm_probe_addr(const fmm_cache *c)
{
    if (c->perl)
        return pfm_page_ptr(c->perl, 0) + (size_t)c->page_size * c->num_pages - 1;
    return c->base + c->map_len - 1;
}
unsigned char *fmm_page_ptr(fmm_cache *c, uint32_t page)
{
    if (UNLIKELY(c->perl))
        return pfm_page_ptr(c->perl, page);
    return page < c->num_pages ? (unsigned char *)PH(c, page) : NULL;
}

const char *fmm_strerror(int rc)
{
    switch (rc) {
    case FMM_OK: return "success";
    case FMM_ENOTFOUND: return "key not found";
    case FMM_ETOOBIG: return "item too large to fit in a page";
    case FMM_EBADFILE: return "not a fastmmap cache file, or its header is invalid";
    case FMM_EGEOMETRY: return "size options disagree with the existing cache file";
    case FMM_ELOCKED: return "this thread already holds a page lock of this cache (recursive use from a callback?)";
    case FMM_ETIMEDOUT: return "timed out waiting for a page lock";
    case FMM_EBUSY: return "page is locked by another thread or process";
    case FMM_EBADARG: return "invalid argument";
    case FMM_ECORRUPT: return "page failed validation";
    case FMM_EREPLACED:
        return "the cache file was deleted, replaced or truncated under this handle; reopen the cache";
    case FMM_ETOOMANY: return "this thread holds page locks in too many caches";
    case FMM_EREFUSED: return "store refused by the modseq rules (a tombstone or a newer modseq holds the key)";
    case FMM_ENOCHANGE: return "an entry with an equal or newer modseq was kept";
    case FMM_EAGAIN: return "a lock-free read must be retried under the page lock";
    case FMM_EUNTRUSTED:
        return "the existing file belongs to another user, or group/others may write it beyond permissions";
    default: return rc > 0 ? strerror(rc) : "unknown fastmmap error";
    }
}

/* ---------- Entry access, bounds-checked ---------- */

/* An entry as validated: its fields read once (see RD).  Everything that
 * sizes or places an access to the entry (lengths, the modseq flag) comes
 * from here after validation, never from the entry header again. */
typedef struct esnap {
    entry *e;
    uint32_t klen, vlen, flags, size; /* size: rounded total length */
} esnap;

/* A slot count that keeps the slot table inside the page. */
static inline int ns_ok(const fmm_cache *c, uint32_t ns)
{
    return is_pow2(ns) && ns >= MIN_SLOTS && ns <= c->max_slots;
}

/* Validate the bounds of the entry a live slot points at and snapshot its
 * lengths.  Never reads outside [data_start, free_data), and free_data is
 * checked against the page size here too: the header may have changed
 * since the lock validated it.  entry_ok also rejects a modseq entry too
 * short to hold its modseq; find_slot leaves that to the callers that read
 * the modseq or hand the entry out (in their modseq branches, off the hot
 * path), checking the snapshot. */
static inline int entry_bounds_ok(const fmm_cache *c, page_hdr *ph, uint32_t slot, esnap *sn)
{
    uint32_t off = (slot & c->offmask) << 2;
    uint32_t fd = RD(ph->free_data);
    uint32_t ns = RD(ph->num_slots);
    if (UNLIKELY(fd > c->page_size || ns > c->max_slots || off < data_start(ns) ||
                 (uint64_t)off + FMM_ENTRY_HEADER_SIZE > fd))
        return 0;
    entry *e = (entry *)((char *)ph + off);
    uint32_t kf = RD(e->klen_flags), vlen = RD(e->vlen);
    uint64_t total = ROUND4((uint64_t)FMM_ENTRY_HEADER_SIZE + KLEN(kf) + vlen);
    if (UNLIKELY((uint64_t)off + total > fd))
        return 0;
    sn->e = e;
    sn->klen = KLEN(kf);
    sn->vlen = vlen;
    sn->flags = KFLAGS(kf);
    sn->size = (uint32_t)total;
    return 1;
}

/* A modseq entry's value area starts with its 8-byte modseq: a snapshot
 * with FMM_F_MODSEQ and a vlen below 8 is corrupt. */
static inline int sn_modseq_short(const esnap *sn) { return (sn->flags & FMM_F_MODSEQ) && sn->vlen < MODSEQ_LEN; }

static inline int entry_ok(const fmm_cache *c, page_hdr *ph, uint32_t slot, esnap *sn)
{
    return entry_bounds_ok(c, ph, slot, sn) && !sn_modseq_short(sn);
}

/* An entry's expiry in milliseconds is its second (expire_on) and the
 * milliseconds into it (atime_ms's high bits): the header stays 20 bytes.
 * The access second keeps the low bits, enough to tell "this second" for
 * the LRU stamp (stamp_fresh) and to rebuild the full second for reports
 * (last_access_of) for an entry used in the last 48 days. */
#define ATIME_BITS 22u
#define ATIME_MASK ((1u << ATIME_BITS) - 1u)

static inline uint64_t entry_expire(const entry *e)
{
    uint32_t s = RD(e->expire_on);
    return s ? (uint64_t)s * 1000u + (RD(e->atime_ms) >> ATIME_BITS) : 0;
}

/* Both words of a store: `now_s` the access second, `expire_on` in ms (0
 * never).  An expiry before 1970-01-01T00:00:01 is in the past all the
 * same: stored as that second, since second 0 means never. */
static inline void set_times(entry *e, uint32_t now_s, uint64_t expire_on)
{
    uint32_t sec = 0, ms = 0;
    if (expire_on) {
        if (expire_on < 1000u)
            expire_on = 1000u;
        if (expire_on > 0xFFFFFFFFull * 1000u + 999u)
            expire_on = 0xFFFFFFFFull * 1000u + 999u;
        sec = (uint32_t)(expire_on / 1000u);
        ms = (uint32_t)(expire_on % 1000u);
    }
    e->atime_ms = (now_s & ATIME_MASK) | ms << ATIME_BITS;
    e->expire_on = sec;
}

/* A read's new access second, keeping the expiry's milliseconds. */
static inline void touch_atime(entry *e, uint32_t now_s)
{
    e->atime_ms = (e->atime_ms & ~ATIME_MASK) | (now_s & ATIME_MASK);
}

/* The full access second: the latest at or before now with those low bits. */
static inline uint32_t last_access_of(const entry *e, uint32_t now_s)
{
    return now_s - ((now_s - RD(e->atime_ms)) & ATIME_MASK);
}

static inline int expired(const entry *e, uint64_t now)
{
    uint64_t x = entry_expire(e);
    return x && now >= x;
}

static inline int sn_is_tomb(const esnap *sn) { return IS_TOMB(sn->flags); }

/* The modseq of a modseq entry: the snapshot's vlen was checked >= 8, so
 * the 8 bytes lie inside the validated entry. */
static inline uint64_t sn_modseq(const esnap *sn)
{
    return rd64((const unsigned char *)(sn->e + 1) + sn->klen);
}

/* Fill an item from a validated snapshot; `ms` says whether the entry has
 * a modseq (a constant where the caller knows, so that the hot path has no
 * modseq test; with ms, the caller checked sn->vlen >= 8). */
static inline __attribute__((always_inline)) void fill_item_ms(fmm_item *it, const esnap *sn, int ms, uint32_t now_s)
{
    const entry *e = sn->e;
    const char *k = (const char *)(e + 1);
    it->key = k;
    it->klen = sn->klen;
    it->val = k + sn->klen;
    it->vlen = sn->vlen;
    it->flags = sn->flags;
    it->expire_on = entry_expire(e);
    it->access = e->access;
    it->last_access = last_access_of(e, now_s);
    it->modseq = 0;
    if (ms) {
        it->modseq = rd64((const unsigned char *)it->val);
        it->val += MODSEQ_LEN;
        it->vlen -= MODSEQ_LEN;
    }
}

/* For snapshots from entry_ok (a modseq entry has its 8 bytes). */
static inline void fill_item(fmm_item *it, const esnap *sn, uint64_t now)
{
    fill_item_ms(it, sn, (sn->flags & FMM_F_MODSEQ) != 0, (uint32_t)(now / 1000u));
}

/* Home index of a hash in a table of num_slots: the top bits of the low
 * hash word (the slot's tag keeps those bits too). */
static inline uint32_t home_index(uint32_t lo, uint32_t num_slots)
{
    return lo >> (32u - log2u(num_slots));
}

/* ---------- Page initialisation and repair ---------- */

static void init_page_fields(fmm_cache *c, page_hdr *ph)
{
    ph->dirty = 1;
    BARRIER();
    ph->num_slots = c->start_slots;
    ph->live = 0;
    ph->deleted = 0;
    ph->free_data = data_start(c->start_slots);
    ph->clock = 0;
    ph->nreads = 0;
    ph->nhits = 0;
    memset(ph->spare, 0, sizeof ph->spare);
    memset(SLOTS(ph), 0, 4u * c->start_slots);
    ph->magic = PAGE_MAGIC;
    BARRIER();
    ph->dirty = 0;
}

void fmm_init_page(fmm_cache *c, uint32_t page)
{
    if (UNLIKELY(c->perl))
        pfm_init_page(c->perl, page);
    else
        init_page_fields(c, PH(c, page));
}

static void repair_page(fmm_cache *c, page_hdr *ph, const char *why)
{
    unsigned page = (unsigned)(((unsigned char *)ph - c->base - FMM_HEADER_SIZE) / c->page_size);
    FMM_DEBUG("repairing page %u: %s\n", page, why);
    snprintf(tl_err, sizeof tl_err, "page %u re-initialised: %s", page, why);
    init_page_fields(c, ph);
    if (c->fh)
        __atomic_fetch_add(&c->fh->repairs, 1, __ATOMIC_RELAXED);
}

/* Cheap header invariants, checked after every lock. */
static int page_ok(const fmm_cache *c, const page_hdr *ph)
{
    uint32_t ns = ph->num_slots;
    if (ph->magic != PAGE_MAGIC || ph->dirty)
        return 0;
    /* bound ns first: data_start(ns) would wrap for ns >= 2^30 */
    if (!is_pow2(ns) || ns < MIN_SLOTS || ns > (c->page_size - FMM_PAGE_HEADER_SIZE) / 4)
        return 0;
    if ((uint64_t)ph->live + ph->deleted >= ns)
        return 0;
    if (ph->free_data < data_start(ns) || ph->free_data > c->page_size || (ph->free_data & 3u))
        return 0;
    return 1;
}

/* ---------- Locking ----------
 * A thread may hold at most one page of a given cache.  The record of held
 * pages is thread-local so that one handle can be shared by threads that
 * each hold a different page. */

/* initial-exec: direct %fs-relative access instead of a __tls_get_addr call
 * on every lock and unlock (55 fewer instructions per get, measured with
 * callgrind); the ~200 bytes fit the static TLS glibc reserves for
 * dlopen'ed modules.  musl reserves none and refuses to dlopen a module
 * with initial-exec TLS, so there the compiler's default (dynamic) model
 * stays, which on musl's x86_64 and aarch64 goes through TLS descriptors
 * (a call that returns a fixed offset, no __tls_get_addr). */
#ifdef __GLIBC__
#define TL_MODEL __attribute__((tls_model("initial-exec")))
#else
#define TL_MODEL
#endif
#define TL_MAX 8
static TL_MODEL _Thread_local struct {
    uint64_t id; /* the handle's id, not its address: a freed handle's
                    address can be reused by a new one */
    pthread_mutex_t *m; /* the page's mutex */
    void *lnext;        /* its robust-list link as glibc set it at lock time */
    uint32_t page;
} tl_held[TL_MAX];
static TL_MODEL _Thread_local int tl_n;
/* glibc puts a mutex it locks at the head of the thread's robust list: its
 * __prev link is then the list head, the same for every lock of a thread,
 * and the lock word holds the thread's TID. */
#ifdef __GLIBC__
static TL_MODEL _Thread_local void *tl_head;
#endif
static TL_MODEL _Thread_local uint32_t tl_tid;
static uint64_t next_handle_id = 1;

/* A forked child holds none of its parent's page locks (the robust mutexes
 * stay owned by the parent's thread), so it must not inherit the records:
 * with them, its fmm_unlock would make a page's seq even while the parent
 * is still writing it, and readers would accept torn copies. */
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void forget_held_in_child(void)
{
    tl_n = 0;
    tl_tid = 0; /* the stores' owner check (CHECK_HELD): the child is another thread */
}
static void install_atfork(void) { pthread_atfork(NULL, NULL, forget_held_in_child); }

static int tl_find(const fmm_cache *c)
{
    for (int i = 0; i < tl_n; i++)
        if (tl_held[i].id == c->id)
            return i;
    return -1;
}

/* Forget held record i (the last one takes its place). */
static inline void drop_held(int i)
{
    int last = --tl_n;
    if (UNLIKELY(i != last))
        tl_held[i] = tl_held[last];
}

static int deep_check(fmm_cache *c, uint32_t page, char *msg, size_t msglen);
static int rebuild(fmm_cache *c, page_hdr *ph, int mode, long drop_slot, uint32_t need, uint32_t nnew,
                   fmm_evict_fn fn, void *ctx);
enum { RB_INSERT, RB_EXPIRED, RB_ALL, RB_RENUMBER };

/* ---------- Damaged mutex words ----------
 * glibc trusts the mutex's kind word: a damaged one (say, with the
 * priority-protect bit but not the robust bit) makes pthread_mutex_lock
 * abort the process on an internal assertion instead of returning an
 * error.  So before locking we compare the kind word with that of a mutex
 * initialised exactly as ours are, and put it back (a compare-and-swap: every
 * process restores the same value) if it differs; the page is then treated as
 * damaged and re-initialised once locked. */
static int init_mutex(pthread_mutex_t *m);

#ifdef __GLIBC__
static int ref_kind_value(void)
{
    static int ref = -1;
    int r = __atomic_load_n(&ref, __ATOMIC_RELAXED);
    if (r == -1) {
        pthread_mutex_t m;
        memset(&m, 0, sizeof m);
        if (init_mutex(&m) != 0)
            return -1;
        r = m.__data.__kind;
        pthread_mutex_destroy(&m);
        __atomic_store_n(&ref, r, __ATOMIC_RELAXED);
    }
    return r;
}

/* 1 if the kind word was damaged (and has now been restored). */
static int restore_mutex_kind(page_hdr *ph)
{
    int ref = ref_kind_value();
    int *kind = &ph->lock.m.__data.__kind;
    int k = __atomic_load_n(kind, __ATOMIC_ACQUIRE);
    if (LIKELY(k == ref) || ref == -1)
        return 0;
    __atomic_compare_exchange_n(kind, &k, ref, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
    return 1;
}

/* Remember what glibc wrote into a mutex we just locked (record i). */
static inline void note_locked(int i, pthread_mutex_t *m)
{
    tl_held[i].m = m;
    tl_held[i].lnext = __atomic_load_n(&m->__data.__list.__next, __ATOMIC_RELAXED);
    tl_head = __atomic_load_n(&m->__data.__list.__prev, __ATOMIC_RELAXED);
    tl_tid = __atomic_load_n((uint32_t *)&m->__data.__lock, __ATOMIC_RELAXED) & FUTEX_TID_MASK;
}

/* 1 if p points into the robust-list head or a mutex that this thread holds
 * (other than record `self`): where glibc's list links may legitimately
 * point once the thread has locked or unlocked other robust mutexes. */
static int link_ok(void *p, int self)
{
    uintptr_t a = (uintptr_t)p & ~(uintptr_t)1, h = (uintptr_t)tl_head;
    if (a + 32 >= h && a <= h + 32)
        return 1;
    for (int j = 0; j < tl_n; j++) {
        uintptr_t m = (uintptr_t)tl_held[j].m;
        if (j != self && a >= m && a < m + sizeof(pthread_mutex_t))
            return 1;
    }
    return 0;
}

/* Before unlocking a mutex we hold: undo damage to the words glibc's
 * robust unlock trusts.  A foreign owner TID in the lock word makes it fail
 * with EPERM and leave the mutex on our robust list (where a later lock of
 * it corrupts the list); a damaged list link makes it write through a wild
 * pointer. */
static __attribute__((noinline)) void scrub_held_slow(int i)
{
    pthread_mutex_t *m = tl_held[i].m;
    if (!tl_tid)
        return;
    uint32_t *w = (uint32_t *)&m->__data.__lock;
    uint32_t lw = __atomic_load_n(w, __ATOMIC_RELAXED);
    if (UNLIKELY((lw & FUTEX_TID_MASK) != tl_tid || (lw & FUTEX_OWNER_DIED)))
        __atomic_compare_exchange_n(w, &lw, tl_tid | (lw & FUTEX_WAITERS), 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
    if (UNLIKELY(__atomic_load_n(&m->__data.__owner, __ATOMIC_RELAXED) != (int)tl_tid))
        __atomic_store_n(&m->__data.__owner, (int)tl_tid, __ATOMIC_RELAXED);
    void *p = __atomic_load_n(&m->__data.__list.__prev, __ATOMIC_RELAXED);
    if (UNLIKELY(p != tl_head) && !link_ok(p, i))
        __atomic_store_n(&m->__data.__list.__prev, tl_head, __ATOMIC_RELAXED);
    void *n = __atomic_load_n(&m->__data.__list.__next, __ATOMIC_RELAXED);
    if (UNLIKELY(n != tl_held[i].lnext) && !link_ok(n, i))
        __atomic_store_n(&m->__data.__list.__next, tl_held[i].lnext, __ATOMIC_RELAXED);
}

/* The common case, inline: all four words as glibc left them. */
static inline __attribute__((always_inline)) void scrub_held(int i)
{
    pthread_mutex_t *m = tl_held[i].m;
    uint32_t lw = __atomic_load_n((uint32_t *)&m->__data.__lock, __ATOMIC_RELAXED);
    int owner = __atomic_load_n(&m->__data.__owner, __ATOMIC_RELAXED);
    void *p = __atomic_load_n(&m->__data.__list.__prev, __ATOMIC_RELAXED);
    void *n = __atomic_load_n(&m->__data.__list.__next, __ATOMIC_RELAXED);
    if (UNLIKELY(((lw & ~(uint32_t)FUTEX_WAITERS) != tl_tid) | (owner != (int)tl_tid) | (p != tl_head) |
                 (n != tl_held[i].lnext)))
        scrub_held_slow(i);
}

/* A mutex left "not recoverable" (glibc's state after an owner died and the
 * next one did not mark it consistent, which the engine never does: so it
 * is damage): make it lockable again.  1 if it was. */
static int revive_mutex(page_hdr *ph)
{
    int *owner = &ph->lock.m.__data.__owner;
    int o = __atomic_load_n(owner, __ATOMIC_RELAXED);
    if (o != 0x7fffffff) /* PTHREAD_MUTEX_NOTRECOVERABLE */
        return 0;
    return __atomic_compare_exchange_n(owner, &o, 0, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED);
}
#else
static int restore_mutex_kind(page_hdr *ph)
{
    (void)ph;
    return 0;
}
static inline void note_locked(int i, pthread_mutex_t *m) { tl_held[i].m = m; }
static void scrub_held(int i) { (void)i; }
static int revive_mutex(page_hdr *ph)
{
    (void)ph;
    return 0;
}
#endif

/* Wait slices of an unbounded lock: a handle whose file was truncated under
 * it is noticed by its waiters within this time. */
#define WAIT_SLICE_NS 200000000LL

/* 1 if the file is now shorter than our mapping.  A waiter needs this as
 * well as the lost flag: when a cut leaves the lock word in the file, the
 * holder can lose its mapping (SIGBUS past the cut) and with it any way to
 * unlock the word, while the waiter touches only the word and never faults.
 * Asked only after a wait slice ran out, so it costs one fstat per slice. */
static int file_shrank(const fmm_cache *c)
{
    struct stat st;
    return c->fd >= 0 && fstat(c->fd, &st) == 0 && (uint64_t)st.st_size < (uint64_t)c->map_len;
}

#ifdef __GLIBC__
static int64_t mono_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* Wait for a held page mutex.  The mutex is always taken with
 * pthread_mutex_trylock (so glibc keeps its robust-list bookkeeping and
 * owner-died handling), but the sleeping is a futex wait of our own on the
 * lock word, done the way glibc's robust lock does it (set FUTEX_WAITERS,
 * then FUTEX_WAIT on the value seen).  Why not pthread_mutex_clocklock: if
 * the file is truncated while we sleep, the SIGBUS guard swaps zero memory
 * in under the lock word, and glibc's timed robust lock treats the futex
 * call's unexpected result as fatal and aborts the process.  Here any
 * result just means "look again", and the lost flag ends the wait. */
static __attribute__((noinline)) int lock_mutex_wait(fmm_cache *c, page_hdr *ph, int64_t timeout_ns, int *damaged)
{
    pthread_mutex_t *m = &ph->lock.m;
    uint32_t *word = (uint32_t *)&m->__data.__lock;
    int64_t deadline = timeout_ns > 0 ? mono_now_ns() + timeout_ns : 0;
    for (;;) {
        /* the kind word may have been damaged while we slept: glibc reads
         * it on every call (a priority-protect kind makes it abort) */
        if (UNLIKELY(restore_mutex_kind(ph)))
            *damaged = 1;
        int rc = pthread_mutex_trylock(m);
        if (rc != EBUSY) {
            if (rc == 0 || rc == EOWNERDEAD)
                /* as glibc does after a wait: others may still sleep, so
                 * that our unlock wakes one */
                __atomic_fetch_or(word, FUTEX_WAITERS, __ATOMIC_RELAXED);
            return rc;
        }
        if (fmm_lost(c))
            return ETIMEDOUT; /* fmm_lock reports FMM_EREPLACED */
        int64_t slice = WAIT_SLICE_NS;
        if (timeout_ns > 0) {
            int64_t left = deadline - mono_now_ns();
            if (left <= 0)
                return ETIMEDOUT;
            if (left < slice)
                slice = left;
        }
        uint32_t v = __atomic_load_n(word, __ATOMIC_RELAXED);
        if ((v & FUTEX_TID_MASK) == 0 && !(v & FUTEX_WAITERS))
            continue; /* free (or owner died, no one waiting): trylock takes it */
        if (!(v & FUTEX_WAITERS)) {
            if (!__atomic_compare_exchange_n(word, &v, v | FUTEX_WAITERS, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED))
                continue;
            v |= FUTEX_WAITERS;
        }
        struct timespec rel = {(time_t)(slice / 1000000000LL), (long)(slice % 1000000000LL)};
        /* any result: look again */
        if (syscall(SYS_futex, word, FUTEX_WAIT, v, &rel, NULL, 0) != 0 && errno == ETIMEDOUT && file_shrank(c))
            return ESTALE; /* fmm_lock reports FMM_EREPLACED */
    }
}
#else
static __attribute__((noinline)) int lock_mutex_wait(fmm_cache *c, page_hdr *ph, int64_t timeout_ns, int *damaged)
{
    pthread_mutex_t *m = &ph->lock.m;
    (void)damaged;
    int rc;
    do {
        int64_t t = timeout_ns < 0 || timeout_ns > WAIT_SLICE_NS ? WAIT_SLICE_NS : timeout_ns;
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        ts.tv_sec += (time_t)(t / 1000000000);
        ts.tv_nsec += (long)(t % 1000000000);
        if (ts.tv_nsec >= 1000000000) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000;
        }
        rc = fmm_mutex_clocklock_mono(m, &ts);
        if (rc != ETIMEDOUT || fmm_lost(c))
            return rc;
        if (file_shrank(c))
            return ESTALE;
        if (timeout_ns > 0)
            timeout_ns -= t;
    } while (timeout_ns != 0);
    return ETIMEDOUT;
}
#endif

/* ---------- Lock-free reads: the page's sequence word ----------
 * A seqlock beside the mutex.  Whoever locks a page makes `seq` odd before
 * touching anything else and even again (one higher) just before
 * unlocking, so every locked section, reads included, moves it on.  A
 * reader without the lock (fmm_get_optimistic) notes an even seq, probes
 * and copies, then checks that seq has not moved: if it has, what it read
 * may be torn, and it throws the copy away.  The reader writes nothing to
 * the page, so readers on two cores never pull its cache lines back and
 * forth.  A writer killed while holding the page leaves seq odd, which
 * sends readers to the locked path: the robust mutex's EOWNERDEAD repair
 * runs there and the unlock makes seq even again.  `seq | 1` (not +1) at
 * lock time keeps the parity right after such a death.  The data is read
 * and written with plain accesses between the fences, as the Linux
 * kernel's seqlocks do; every offset and length the reader follows is
 * bounds-checked as under the lock, so a torn read is wrong data, never an
 * access outside the page, and it never survives the seq check. */
static inline void seq_enter(page_hdr *ph)
{
    __atomic_store_n(&ph->seq, RD(ph->seq) | 1u, __ATOMIC_RELAXED);
    /* the odd seq is visible before any store of the locked section */
    __atomic_thread_fence(__ATOMIC_RELEASE);
}

static inline void seq_leave(page_hdr *ph)
{
    /* every store of the locked section is visible before the even seq */
    __atomic_store_n(&ph->seq, (RD(ph->seq) | 1u) + 1u, __ATOMIC_RELEASE);
}

/* The uncontended lock inline; waiting out of line. */
static inline __attribute__((always_inline)) int lock_mutex(fmm_cache *c, page_hdr *ph, int64_t timeout_ns,
                                                         int *damaged)
{
    int rc = pthread_mutex_trylock(&ph->lock.m);
    if (LIKELY(rc != EBUSY) || timeout_ns == 0)
        return rc;
    return lock_mutex_wait(c, ph, timeout_ns, damaged);
}

int fmm_lock(fmm_cache *c, uint32_t page, int64_t timeout_ns)
{
    if (UNLIKELY(c->perl))
        return UNLIKELY(fmm_lost(c)) ? FMM_EREPLACED : pfm_lock(c->perl, page, timeout_ns);
    if (UNLIKELY(page >= c->num_pages))
        return FMM_EBADARG;
    if (UNLIKELY(fmm_lost(c)))
        return FMM_EREPLACED;
    int held = tl_find(c);
    if (UNLIKELY(held >= 0)) {
        snprintf(tl_err, sizeof tl_err, "page %u is already locked by this thread; can't lock page %u",
                 tl_held[held].page, page);
        return FMM_ELOCKED;
    }
    if (UNLIKELY(tl_n >= TL_MAX))
        return FMM_ETOOMANY;

    page_hdr *ph = PH(c, page);
    int rc;
    int kind_damaged = restore_mutex_kind(ph);
    rc = lock_mutex(c, ph, timeout_ns, &kind_damaged);
    if (UNLIKELY(rc == ENOTRECOVERABLE) && revive_mutex(ph)) {
        kind_damaged = 1;
        rc = lock_mutex(c, ph, timeout_ns, &kind_damaged);
    }
    if (LIKELY(rc == 0 || rc == EOWNERDEAD))
        seq_enter(ph);
    switch (rc) {
    case 0:
        break;
    case EOWNERDEAD: {
        /* The previous holder died with the lock.  If it was mid-write the
         * page is dirty: re-initialise.  Otherwise keep the page if it
         * passes the full check. */
        char why[128];
        if (ph->dirty)
            repair_page(c, ph, "left dirty by a killed writer");
        else if (deep_check(c, page, why, sizeof why) != 0)
            repair_page(c, ph, why);
        pthread_mutex_consistent(&ph->lock.m);
        break;
    }
    case EBUSY:
        return FMM_EBUSY;
    case ETIMEDOUT:
        return fmm_lost(c) ? FMM_EREPLACED : FMM_ETIMEDOUT;
    case EDEADLK:
        snprintf(tl_err, sizeof tl_err, "page %u is already locked by this thread", page);
        return FMM_ELOCKED;
    default:
        if (fmm_lost(c))
            return FMM_EREPLACED;
        if (rc == ESTALE) {
            /* the file shrank under a lock we wait for (lock_mutex_wait):
             * nothing of this handle is released or changed, and every
             * later wait for that page ends the same way */
            snprintf(tl_err, sizeof tl_err, "the file was truncated while waiting for the lock of page %u", page);
            return FMM_EREPLACED;
        }
        snprintf(tl_err, sizeof tl_err, "locking page %u: %s", page, strerror(rc));
        return rc;
    }
    int i = tl_n;
    tl_held[i].id = c->id;
    tl_held[i].page = page;
    note_locked(i, &ph->lock.m);
    tl_n++;
    if (UNLIKELY(kind_damaged))
        repair_page(c, ph, "page lock was damaged");
    else if (UNLIKELY(!page_ok(c, ph)))
        repair_page(c, ph, "page header failed validation");
    else if (UNLIKELY(ph->clock >= RENUMBER_AT))
        rebuild(c, ph, RB_RENUMBER, -1, 0, 0, NULL, NULL); /* on ENOMEM: retried at the next lock */
    if (UNLIKELY(fmm_lost(c))) {
        /* The file shrank while we waited or repaired: what we locked is
         * zero memory now.  Release it (it may be on our robust list). */
        fmm_unlock(c, page);
        return FMM_EREPLACED;
    }
    return 0;
}

int fmm_lock_stale(fmm_cache *c, uint32_t page)
{
    if (UNLIKELY(c->perl))
        return 0; /* fcntl locks die with their owner */
    if (page >= c->num_pages || fmm_lost(c))
        return 0;
    uint32_t *word = (uint32_t *)&PH(c, page)->lock.m;
    uint32_t lw = __atomic_load_n(word, __ATOMIC_ACQUIRE);
    uint32_t tid = lw & FUTEX_TID_MASK;
    int stale;
    if (lw == 0)
        return 0; /* free: a waiter will get it */
    if (tid == 0)
        stale = 1; /* owner-died already, or bits with no owner: wake someone */
    else
        stale = kill((pid_t)tid, 0) != 0 && errno == ESRCH;
    if (!stale)
        return 0;
    uint32_t nv = (lw & FUTEX_WAITERS) | FUTEX_OWNER_DIED;
    if (lw != nv && !__atomic_compare_exchange_n(word, &lw, nv, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return 0; /* it changed under us: someone is handling it */
    syscall(SYS_futex, word, FUTEX_WAKE, INT_MAX, NULL, NULL, 0);
    return 1;
}

int fmm_held(const fmm_cache *c, uint32_t page)
{
    if (UNLIKELY(c->perl))
        return pfm_held(c->perl, page);
    int i = tl_find(c);
    return i >= 0 && tl_held[i].page == page;
}

/* Every store checks that the calling thread holds the page.  A caller
 * runs Python code under the lock (get_and_set's function, read_cb, a lock
 * block's serializer), and that code may fork: the child holds none of its
 * parent's locks (forget_held_in_child) but carries on into the store.
 * Writing there would land in a page whose real holder may be writing it,
 * without moving its sequence word, so lock-free readers could accept a
 * torn copy and lockers find a page to repair.
 *
 * With glibc the common case is decided by the mutex's owner TID against
 * this thread's (tl_tid: 0 until the thread first locks a page, and again
 * in a forked child): a load from the page header's first cache line,
 * which the store reads anyway.  Any mismatch, including an owner word
 * damaged or zeroed under the lock, falls back to the thread's own records
 * (held_slow), which alone decide. */
static __attribute__((noinline, cold)) int held_slow(fmm_cache *c, uint32_t page)
{
    int i = tl_find(c);
    if (i >= 0 && tl_held[i].page == page)
        return 0;
    snprintf(tl_err, sizeof tl_err, "page %u is not locked by this thread (a child forked under the lock?)", page);
    return FMM_EBADARG;
}
#ifdef __GLIBC__
#define OWNER_IS_ME(ph) \
    (tl_tid != 0 && __atomic_load_n(&(ph)->lock.m.__data.__owner, __ATOMIC_RELAXED) == (int)tl_tid)
#else
#define OWNER_IS_ME(ph) 0
#endif
/* 0 if this thread holds the page, else FMM_EBADARG (to return). */
#define CHECK_HELD(c, ph, page) (LIKELY(OWNER_IS_ME(ph)) ? 0 : held_slow((c), (page)))

int fmm_unlock(fmm_cache *c, uint32_t page)
{
    if (UNLIKELY(c->perl)) {
        int rc = pfm_unlock(c->perl, page);
        return rc ? rc : fmm_lost(c) ? FMM_EREPLACED : 0;
    }
    int i = tl_find(c);
    if (UNLIKELY(i < 0 || tl_held[i].page != page)) {
        /* Not ours: touching its seq or its mutex would open the page to
         * torn reads while its real holder writes. */
        snprintf(tl_err, sizeof tl_err, "page %u is not locked by this thread", page);
        return FMM_EBADARG;
    }
    if (UNLIKELY(fmm_lost(c))) {
        /* The mutex is in zero memory now: nothing to release, and glibc
         * must not follow its (zeroed) robust-list links. */
        drop_held(i);
        return FMM_EREPLACED;
    }
    page_hdr *ph = PH(c, page);
    restore_mutex_kind(ph); /* damaged while we held it: unlock must not abort */
    scrub_held(i);
    drop_held(i);
    seq_leave(ph);
    pthread_mutex_unlock(&ph->lock.m);
    return fmm_lost(c) ? FMM_EREPLACED : 0;
}

/* ---------- Probing ---------- */

/* memcmp(a, b, n) == 0, inline for the short keys caches mostly see (two
 * overlapping 8-byte loads up to 16 bytes) instead of a libc call. */
static inline int key_eq(const void *a, const void *b, uint32_t n)
{
    const unsigned char *p = (const unsigned char *)a, *q = (const unsigned char *)b;
    if (n >= 8 && n <= 16)
        return ((rd64(p) ^ rd64(q)) | (rd64(p + n - 8) ^ rd64(q + n - 8))) == 0;
    if (n >= 4 && n < 8)
        return ((rd32(p) ^ rd32(q)) | (rd32(p + n - 4) ^ rd32(q + n - 4))) == 0;
    return memcmp(p, q, n) == 0;
}

/* Find the slot of a key.  Returns the slot index or -1.  *ins (if not
 * NULL) receives the slot to insert into: the first deleted slot seen, or
 * the empty slot that ended the probe (-1 if the table has none).  Returns
 * -2 if a corrupt slot was found (the caller repairs the page).  On a hit,
 * *found is the entry's bounds-checked snapshot; a modseq entry in it may
 * still be too short for its modseq (callers check sn_modseq_short in
 * their modseq branches). */
static inline long find_slot(const fmm_cache *c, page_hdr *ph, uint32_t lo, const void *key, uint32_t klen,
                             long *ins, esnap *found)
{
    uint32_t ns = RD(ph->num_slots);
    if (UNLIKELY(!ns_ok(c, ns)))
        return -2; /* changed since the lock validated it */
    uint32_t mask = ns - 1;
    uint32_t idx = home_index(lo, ns);
    uint32_t tag = lo & ~c->offmask;
    uint32_t *slots = SLOTS(ph);
    long first_del = -1;
    for (uint32_t n = ns; n; n--, idx = (idx + 1) & mask) {
        uint32_t s = RD(slots[idx]);
        if (s == SLOT_EMPTY) {
            if (ins)
                *ins = first_del >= 0 ? first_del : (long)idx;
            return -1;
        }
        if (s == SLOT_DELETED) {
            if (first_del < 0)
                first_del = idx;
            continue;
        }
        if ((s & ~c->offmask) != tag)
            continue;
        if (UNLIKELY(!entry_bounds_ok(c, ph, s, found)))
            return -2;
        if (found->klen == klen && key_eq(found->e + 1, key, klen)) {
            if (ins)
                *ins = -1;
            return idx;
        }
    }
    if (ins)
        *ins = first_del;
    return -1;
}

/* The caller copies a found value next (after allocating its buffer):
 * start loading its first cache lines now.  The snapshot bounded the entry
 * to the page; prefetching never faults anyway. */
static inline void prefetch_value(const fmm_item *it)
{
    __builtin_prefetch(it->val, 0, 3);
    if (it->vlen > 64)
        __builtin_prefetch(it->val + 64, 0, 3);
}

/* fmm_get after the key was found: expiry, LRU touch, the item. */
static inline __attribute__((always_inline)) int get_found(fmm_cache *c, page_hdr *ph, const esnap *sn, int touch,
                                                           fmm_item *out, int ms)
{
    entry *e = sn->e;
    int do_touch = touch & FMM_GET_TOUCH;
    uint64_t now = 0;
    if (e->expire_on) {
        now = fmm_now(c);
        if (expired(e, now)) {
            if (!(touch & FMM_GET_EXPIRED))
                return FMM_ENOTFOUND;
            do_touch = 0;
        }
    }
    uint32_t now_s = sec_of(c, now);
    if (do_touch) {
        if (c->stats)
            ph->nhits++;
        /* reads stamp the current clock; only stores advance it (see
         * "LRU" in fmm.h) */
        e->access = ph->clock;
        touch_atime(e, now_s);
    }
    fill_item_ms(out, sn, ms, now_s);
    prefetch_value(out);
    return 0;
}

/* The same for an entry with a modseq, out of the hot path.  The snapshot
 * is passed by value: a pointer to fmm_get's would keep it in memory on
 * the hot path too. */
static __attribute__((noinline)) int get_found_ms(fmm_cache *c, page_hdr *ph, esnap sn, int touch, fmm_item *out)
{
    if (UNLIKELY(sn_modseq_short(&sn))) {
        repair_page(c, ph, "modseq entry too short for its modseq");
        return FMM_ENOTFOUND;
    }
    if (sn_is_tomb(&sn) && !(touch & FMM_GET_TOMBSTONE))
        return FMM_ENOTFOUND;
    return get_found(c, ph, &sn, touch, out, 1);
}

int fmm_get(fmm_cache *c, uint32_t page, uint64_t hash, const void *key, uint32_t klen, int touch,
            fmm_item *out)
{
    if (UNLIKELY(c->perl))
        return pfm_get(c->perl, page, hash, key, klen, touch, out);
    page_hdr *ph = PH(c, page);
    esnap sn;
    long idx = find_slot(c, ph, (uint32_t)hash, key, klen, NULL, &sn);
    if (UNLIKELY(idx == -2)) {
        repair_page(c, ph, "slot points outside the page's data");
        return FMM_ENOTFOUND;
    }
    int do_touch = touch & FMM_GET_TOUCH;
    if (do_touch && c->stats)
        ph->nreads++;
    if (idx < 0)
        return FMM_ENOTFOUND;
    if (UNLIKELY(sn.flags & FMM_F_MODSEQ))
        return get_found_ms(c, ph, sn, touch, out);
    return get_found(c, ph, &sn, touch, out, 0);
}

/* ---------- Prefetching a page before its lock ----------
 * A store's first memory accesses form a chain: the page header (the lock
 * word, then num_slots), the key's slot, its entry.  When another core
 * wrote those lines last, each link waits for a cross-core transfer.
 * fmm_prefetch starts the header and the entry transfers together, before
 * the lock: the entry's address comes from the slot table using the
 * page's slot count as this handle last saw it (ns_hint, one byte per
 * page in process memory), so it needs nothing from the header.  A stale
 * hint or a moved entry only wastes the prefetch; nothing read here is
 * trusted.  Measured side by side (one process, random 100 B sets over
 * 10,000 keys in a 64 MiB cache): 8.1-8.7M sets/s without, 9.8-10.1M with. */
static inline void prefetch_w(const void *p)
{
#if defined(__x86_64__) || defined(__i386__)
    /* PREFETCHW; CPUs without it execute the encoding as a NOP */
    __asm__ volatile("prefetchw %0" : : "m"(*(const char *)p));
#else
    __builtin_prefetch(p, 1, 3);
#endif
}

static inline void note_ns(fmm_cache *c, uint32_t page, uint32_t ns)
{
    if (LIKELY(c->ns_hint != NULL)) {
        uint8_t l = (uint8_t)log2u(ns | 1u);
        if (__atomic_load_n(&c->ns_hint[page], __ATOMIC_RELAXED) != l)
            __atomic_store_n(&c->ns_hint[page], l, __ATOMIC_RELAXED);
    }
}

/* The entry a hinted probe's home slot points at, if its tag matches; else
 * NULL.  The slot is read without the lock: only an address comes out. */
static inline const char *hinted_entry(const fmm_cache *c, page_hdr *ph, uint32_t page, uint32_t lo)
{
    if (UNLIKELY(c->ns_hint == NULL))
        return NULL;
    uint32_t l = __atomic_load_n(&c->ns_hint[page], __ATOMIC_RELAXED);
    if (l < 2 || (1u << l) > c->max_slots)
        return NULL;
    uint32_t s = RD(SLOTS(ph)[home_index(lo, 1u << l)]);
    if (s <= SLOT_DELETED || (s & ~c->offmask) != (lo & ~c->offmask))
        return NULL;
    return (const char *)ph + ((s & c->offmask) << 2);
}

/* 1 if a hit read without the lock needs no new LRU stamp: the entry was
 * stamped this second, and its stamp is within the newest 1/2^STAMP_SHIFT
 * of the clock span the page can hold.  Stores advance the clock, so a page
 * that churns spans about as many ticks as it holds entries: `live` scaled
 * by how full the data area is (live * cap / used), which for a full page
 * is `live`, and for a page far from full is large (its entries are far
 * from eviction).  Otherwise the reader takes the locked path, which
 * stamps the entry.  Measured on the Zipf(0.99) read-through benchmark
 * (gap to an exact LRU's hit rate): a stamp on every read 2.85 points, 1/16
 * 2.85-2.88, 1/8 2.91-2.93, 1/4 (of `live`, unscaled) 3.06-3.10. */
#define STAMP_SHIFT 4
static inline int stamp_fresh(const fmm_cache *c, const page_hdr *ph, const entry *e, uint32_t now_s)
{
    if (((RD(e->atime_ms) ^ now_s) & ATIME_MASK) != 0)
        return 0;
    uint64_t age = (uint32_t)(RD(ph->clock) - RD(e->access));
    uint32_t ns = RD(ph->num_slots);
    uint32_t ds = data_start(ns < c->max_slots ? ns : c->max_slots); /* torn reads stay bounded */
    uint32_t fd = RD(ph->free_data);
    uint64_t used = fd > ds ? fd - ds : 0, cap = c->page_size > ds ? c->page_size - ds : 0;
    /* age * used <= live * cap / 2^STAMP_SHIFT; no product reaches 2^63 */
    return age * used <= ((uint64_t)RD(ph->live) * cap) >> STAMP_SHIFT;
}

int fmm_get_optimistic(fmm_cache *c, uint32_t page, uint64_t hash, const void *key, uint32_t klen, int touch,
                       fmm_item *out, uint32_t *token)
{
    /* FMM_GET_EXPIRED and FMM_GET_TOMBSTONE reads are left to fmm_get */
    if (UNLIKELY(c->perl || c->stats || tl_n != 0 || page >= c->num_pages || (touch & ~FMM_GET_TOUCH)))
        return FMM_EAGAIN;
    page_hdr *ph = PH(c, page);
    /* the hinted entry's line travels while the header's does */
    const void *he = hinted_entry(c, ph, page, (uint32_t)hash);
    if (he)
        __builtin_prefetch(he, 0, 3);
    uint32_t s0 = __atomic_load_n(&ph->seq, __ATOMIC_ACQUIRE);
    *token = s0;
    /* odd: a writer holds the page (or died holding it) */
    if (UNLIKELY((s0 & 1u) | (RD(ph->magic) != PAGE_MAGIC) | (RD(ph->dirty) != 0)))
        return FMM_EAGAIN;
    esnap sn;
    long idx = find_slot(c, ph, (uint32_t)hash, key, klen, NULL, &sn);
    note_ns(c, page, RD(ph->num_slots));
    if (idx < 0)
        return UNLIKELY(idx == -2) ? FMM_EAGAIN : FMM_ENOTFOUND; /* -2: the locked path repairs */
    if (UNLIKELY(sn.flags & FMM_F_MODSEQ))
        return FMM_EAGAIN; /* tombstone rules, short-modseq repair: the locked path */
    entry *e = sn.e;
    uint64_t now = 0;
    if (RD(e->expire_on)) {
        now = fmm_now(c);
        if (expired(e, now))
            return FMM_ENOTFOUND;
    }
    uint32_t now_s = sec_of(c, now);
    if (UNLIKELY((touch & FMM_GET_TOUCH) && !stamp_fresh(c, ph, e, now_s)))
        return FMM_EAGAIN;
    fill_item_ms(out, &sn, 0, now_s);
    prefetch_value(out);
    return 0;
}

void fmm_prefetch(fmm_cache *c, uint32_t page, uint64_t hash)
{
    if (UNLIKELY(c->perl) || UNLIKELY(page >= c->num_pages))
        return;
    page_hdr *ph = PH(c, page);
    prefetch_w(ph);
    const char *e = hinted_entry(c, ph, page, (uint32_t)hash);
    if (e) {
        /* the entry's first three lines: a 16-byte key and a 100-byte
         * value span them (the unlock waits for every line written) */
        const char *end = (const char *)ph + c->page_size;
        prefetch_w(e);
        if (e + 64 < end)
            prefetch_w(e + 64);
        if (e + 128 < end)
            prefetch_w(e + 128);
    }
}

int fmm_read_valid(const fmm_cache *c, uint32_t page, uint32_t token)
{
    /* the reads of the probe and the copy complete before seq is read again */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (UNLIKELY(page >= c->num_pages || c->perl))
        return 0;
    return __atomic_load_n(&PH(c, page)->seq, __ATOMIC_RELAXED) == token;
}

/* ---------- Compaction and eviction ---------- */

typedef struct kept {
    uint32_t hash;  /* low 32 bits of the key's hash */
    uint32_t slot;  /* old slot value */
    uint32_t size;  /* rounded entry size */
    uint32_t access;
    uint32_t klen, vlen, flags; /* as validated */
} kept;

/* Sort by access, oldest first: an LSD radix sort on (access - min), a
 * byte per pass.  Access stamps come from a dense logical clock, so their
 * span is small and one or two passes usually do.  tmp holds n entries. */
static void sort_by_access(kept *a, kept *tmp, uint32_t n)
{
    if (n < 2)
        return;
    uint32_t mn = UINT32_MAX, mx = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (a[i].access < mn)
            mn = a[i].access;
        if (a[i].access > mx)
            mx = a[i].access;
    }
    uint32_t span = mx - mn;
    kept *src = a, *dst = tmp;
    for (uint32_t shift = 0; shift < 32 && (span >> shift); shift += 8) {
        uint32_t pos[256] = {0};
        for (uint32_t i = 0; i < n; i++)
            pos[((src[i].access - mn) >> shift) & 255]++;
        for (uint32_t d = 0, sum = 0; d < 256; d++) {
            uint32_t cnt = pos[d];
            pos[d] = sum;
            sum += cnt;
        }
        for (uint32_t i = 0; i < n; i++)
            dst[pos[((src[i].access - mn) >> shift) & 255]++] = src[i];
        kept *t = src;
        src = dst;
        dst = t;
    }
    if (src != a)
        memcpy(a, src, (size_t)n * sizeof(kept));
}

/* Slots for n entries: load at most 1/2, at least start_slots. */
static uint32_t slots_for(const fmm_cache *c, uint32_t n)
{
    uint32_t want = pow2_ceil((uint64_t)n * 2);
    if (want < c->start_slots)
        want = c->start_slots;
    return want < MIN_SLOTS ? MIN_SLOTS : want;
}
/* Fewest slots for n entries: load at most 3/4. */
static uint32_t slots_min(uint32_t n)
{
    uint32_t want = pow2_ceil(((uint64_t)n * 4 + 2) / 3);
    return want < MIN_SLOTS ? MIN_SLOTS : want;
}
static int64_t cap_for(const fmm_cache *c, uint32_t ns) { return (int64_t)c->page_size - data_start(ns); }

/* Tombstones are never reported: they hold no value to write back.  `sn`
 * comes from entry_ok (or a kept record of one). */
static void report(fmm_evict_fn fn, void *ctx, const esnap *sn, uint64_t now)
{
    if (fn && (sn->flags & FMM_F_DIRTY) && !sn_is_tomb(sn)) {
        fmm_item it;
        fill_item(&it, sn, now);
        fn(ctx, &it);
    }
}

/*
 * Rebuild a locked page: drop `drop_slot` (the old entry of a key being
 * replaced, or -1), drop expired entries (all entries for RB_ALL), evict
 * least recently used entries if `need` bytes of new entries plus `nnew`
 * more slots must fit (RB_INSERT: one item, or a whole fmm_set_many
 * batch), and write the survivors back packed, with a slot table sized for
 * them.  Dirty dropped entries are reported to `fn` before the page
 * changes.
 *
 * Returns 0, ENOMEM (nothing changed), or FMM_ECORRUPT (the page was
 * found corrupt and has been re-initialised instead).
 */
static int rebuild(fmm_cache *c, page_hdr *ph, int mode, long drop_slot, uint32_t need, uint32_t nnew,
                   fmm_evict_fn fn, void *ctx)
{
    uint32_t ns = RD(ph->num_slots);
    uint32_t *slots = SLOTS(ph);
    uint64_t now = fmm_now(c);
    uint32_t nlive = RD(ph->live);
    if (!ns_ok(c, ns)) {
        repair_page(c, ph, "slot count changed under the lock");
        return FMM_ECORRUPT;
    }
    if (nlive >= ns) {
        repair_page(c, ph, "live count larger than the slot table");
        return FMM_ECORRUPT;
    }
    kept *ks = malloc(((size_t)nlive + 1) * 2 * sizeof(kept)); /* second half: sort scratch */
    unsigned char *scratch = malloc(c->page_size);
    if (!ks || !scratch) {
        free(ks);
        free(scratch);
        return ENOMEM;
    }

    /* Pass 1: classify, validating every entry. */
    uint32_t n = 0;
    uint64_t total = 0;
    for (uint32_t i = 0; i < ns; i++) {
        uint32_t s = RD(slots[i]);
        if (s <= SLOT_DELETED || (long)i == drop_slot)
            continue;
        esnap sn;
        if (!entry_ok(c, ph, s, &sn) || n >= nlive) {
            free(ks);
            free(scratch);
            repair_page(c, ph, "entry outside the page's data, or live count wrong");
            return FMM_ECORRUPT;
        }
        entry *e = sn.e;
        if (mode == RB_ALL || (mode != RB_RENUMBER && expired(e, now))) {
            report(fn, ctx, &sn, now);
            continue;
        }
        /* The slot's tag must match the key's hash: a damaged tag would
         * hide the entry from lookups and let the key be stored twice. */
        uint32_t lo = (uint32_t)fmm_hash(c, e + 1, sn.klen);
        if ((lo & ~c->offmask) != (s & ~c->offmask))
            continue;
        ks[n].hash = lo;
        ks[n].slot = s;
        ks[n].size = sn.size;
        ks[n].access = e->access;
        ks[n].klen = sn.klen;
        ks[n].vlen = sn.vlen;
        ks[n].flags = sn.flags;
        n++;
        total += sn.size;
    }

    /* Decide what stays and how many slots. */
    uint32_t extra = mode == RB_INSERT ? nnew : 0;
    uint32_t first = 0; /* ks[first..n) are kept */
    uint32_t nslots = slots_for(c, n + extra);
    int sorted = 0;
    if (mode == RB_INSERT && (int64_t)(total + need) * 100 > cap_for(c, nslots) * (int64_t)FILL_PCT) {
        sort_by_access(ks, ks + nlive + 1, n);
        sorted = 1;
        while (first < n) {
            nslots = slots_for(c, n - first + extra);
            if ((int64_t)(total + need) * 100 <= cap_for(c, nslots) * (int64_t)FILL_PCT)
                break;
            esnap sn = {(entry *)((char *)ph + ((ks[first].slot & c->offmask) << 2)), ks[first].klen,
                        ks[first].vlen, ks[first].flags, ks[first].size};
            report(fn, ctx, &sn, now);
            total -= ks[first].size;
            first++;
        }
        if (first == n)
            nslots = slots_for(c, extra);
    }
    if ((int64_t)(total + need) > cap_for(c, nslots))
        nslots = slots_min(n - first + extra); /* a big item, or a page full of tiny ones */
    if ((int64_t)(total + need) > cap_for(c, nslots)) {
        /* only possible if entries overlap: the page lied about itself */
        free(ks);
        free(scratch);
        repair_page(c, ph, "live entries larger than the page");
        return FMM_ECORRUPT;
    }
    if (!sorted && (mode == RB_RENUMBER || ph->clock >= RENUMBER_AT - extra)) {
        sort_by_access(ks, ks + nlive + 1, n);
        sorted = 1;
    }

    /* Pass 2: build the new slot table and data area in scratch. */
    uint32_t ds = data_start(nslots);
    uint32_t *nsl = (uint32_t *)(scratch + FMM_PAGE_HEADER_SIZE);
    memset(nsl, 0, 4u * nslots);
    uint32_t pos = ds;
    uint32_t nmask = nslots - 1;
    uint32_t rank = 0; /* sorted: stamps renumbered 1..rank, equal stamps kept equal */
    for (uint32_t i = first; i < n; i++) {
        uint32_t s = ks[i].slot;
        entry *e = (entry *)((char *)ph + ((s & c->offmask) << 2));
        uint32_t lo = ks[i].hash;
        memcpy(scratch + pos, e, ks[i].size);
        if (sorted) {
            if (i == first || ks[i].access != ks[i - 1].access)
                rank++;
            ((entry *)(scratch + pos))->access = rank;
        }
        uint32_t idx = home_index(lo, nslots);
        while (nsl[idx] != SLOT_EMPTY)
            idx = (idx + 1) & nmask;
        nsl[idx] = (s & ~c->offmask) | (pos >> 2);
        pos += ks[i].size;
    }

    /* Write it back: this is the mutation. */
    ph->dirty = 1;
    BARRIER();
    memcpy((char *)ph + FMM_PAGE_HEADER_SIZE, scratch + FMM_PAGE_HEADER_SIZE, pos - FMM_PAGE_HEADER_SIZE);
    ph->num_slots = nslots;
    ph->live = n - first;
    ph->deleted = 0;
    ph->free_data = pos;
    if (sorted)
        ph->clock = rank;
    BARRIER();
    ph->dirty = 0;
    free(ks);
    free(scratch);
    return 0;
}

/* The modseq rules of fmm.h against `old`, an existing entry that carries
 * a modseq: 0 (store), FMM_EREFUSED or FMM_ENOCHANGE.  Out of line: only
 * entries with a modseq get here. */
static __attribute__((noinline)) int modseq_rule(fmm_cache *c, esnap old, uint32_t flags, uint64_t modseq)
{
    /* `old` by value: a pointer to set_impl's snapshot would keep it in
     * memory on the hot path too.  Its vlen was checked >= 8. */
    if (expired(old.e, fmm_now(c)))
        return 0; /* an expired entry never blocks a store */
    uint64_t old_ms = sn_modseq(&old);
    if (IS_TOMB(flags))
        return modseq <= old_ms ? FMM_ENOCHANGE : 0;
    if (!(flags & FMM_F_MODSEQ))
        return sn_is_tomb(&old) ? FMM_EREFUSED : 0; /* a plain set drops a value's modseq */
    return modseq < old_ms ? FMM_EREFUSED : 0;
}

/* Write an entry's value area: the modseq (if any), then the value.  The
 * value first: `val` may overlap the old value of the same entry. */
static inline void put_value(char *vp, const void *val, uint32_t vlen, uint32_t mslen, uint64_t modseq)
{
    if (vlen)
        memmove(vp + mslen, val, vlen);
    if (mslen)
        memcpy(vp, &modseq, MODSEQ_LEN);
}

/* fmm_set and fmm_set_ms.  Inlined into both so that fmm_set, whose flags
 * never carry FMM_F_MODSEQ, compiles without the modseq arithmetic.
 * `batch` (a constant, so fmm_set and fmm_set_ms compile without it): one
 * item of fmm_set_many, which made room for the whole batch beforehand and
 * keeps the dirty marker set from the first item to the last, so here the
 * marker is left set, nothing is rebuilt (a rebuild could evict the
 * batch's earlier items), and a page found corrupt is re-initialised and
 * reported instead of being stored into again. */
static inline __attribute__((always_inline)) int set_impl(fmm_cache *c, uint32_t page, uint64_t hash,
                                                          const void *key, uint32_t klen, const void *val,
                                                          uint32_t vlen, uint32_t flags, uint64_t expire_on,
                                                          uint64_t modseq, fmm_evict_fn evict, void *ctx,
                                                          const int batch)
{
    uint32_t mslen = (flags & FMM_F_MODSEQ) ? MODSEQ_LEN : 0;
    if (klen > FMM_MAX_KEY_LEN)
        return FMM_ETOOBIG;
    uint64_t svlen = (uint64_t)vlen + mslen; /* the stored vlen */
    uint64_t need = ROUND4((uint64_t)FMM_ENTRY_HEADER_SIZE + klen + svlen);
    if (!need_fits(c, need))
        return FMM_ETOOBIG;
    page_hdr *ph = PH(c, page);
    int held = CHECK_HELD(c, ph, page);
    if (UNLIKELY(held))
        return held;
    uint32_t lo = (uint32_t)hash;
    int rebuilt = 0, repaired = 0;
    for (;;) {
        long ins = -1;
        esnap sn = {0};
        long idx = find_slot(c, ph, lo, key, klen, &ins, &sn);
        entry *old = sn.e;
        note_ns(c, page, RD(ph->num_slots));
        if (UNLIKELY(idx == -2)) {
            if (batch || ++repaired > 4) {
                repair_page(c, ph, "slot points outside the page's data");
                return FMM_ECORRUPT; /* someone keeps writing the page under our lock */
            }
            repair_page(c, ph, "slot points outside the page's data");
            continue;
        }
        /* The rules, before anything changes (after a rebuild the old
         * entry is gone, dropped by it). */
        if (idx >= 0 && UNLIKELY(sn.flags & FMM_F_MODSEQ)) {
            if (UNLIKELY(sn_modseq_short(&sn))) {
                if (batch || ++repaired > 4) {
                    repair_page(c, ph, "modseq entry too short for its modseq");
                    return FMM_ECORRUPT;
                }
                repair_page(c, ph, "modseq entry too short for its modseq");
                continue;
            }
            int rc = modseq_rule(c, sn, flags, modseq);
            if (rc)
                return rc;
        }
        /* Replacing an expired dirty entry (e.g. by read-through): it was
         * never written back, so report it like any other reclaimed one. */
        if (idx >= 0 && !rebuilt && evict) {
            uint64_t now = fmm_now(c);
            if (expired(old, now))
                report(evict, ctx, &sn, now);
        }
        /* Same rounded size as the old entry: rewrite it in place.  Its
         * cache lines were just read by the probe, and no garbage is left
         * for compaction.  Crash safety is the same as for an append: the
         * dirty marker brackets the writes. */
        if (idx >= 0 && ROUND4((uint64_t)FMM_ENTRY_HEADER_SIZE + klen + sn.vlen) == need &&
            LIKELY(ph->clock < RENUMBER_AT)) {
            uint32_t now_s = now_sec(c);
            ph->dirty = 1;
            BARRIER();
            old->access = ++ph->clock;
            set_times(old, now_s, expire_on);
            old->klen_flags = klen | (flags << 24);
            old->vlen = (uint32_t)svlen;
            put_value((char *)(old + 1) + klen, val, vlen, mslen, modseq);
            BARRIER();
            if (!batch)
                ph->dirty = 0;
            return 0;
        }
        uint32_t off = RD(ph->free_data);
        if (UNLIKELY(off > c->page_size || off < FMM_PAGE_HEADER_SIZE + 4u * MIN_SLOTS || (off & 3u))) {
            if (batch || ++repaired > 4) {
                repair_page(c, ph, "free_data changed under the lock");
                return FMM_ECORRUPT;
            }
            repair_page(c, ph, "free_data changed under the lock");
            continue;
        }
        int space = (uint64_t)c->page_size - off >= need;
        int slot_ok = idx >= 0 || (ins >= 0 && ((uint64_t)ph->live + ph->deleted + 1) * 4 <= (uint64_t)ph->num_slots * 3);
        if (!space || !slot_ok || ph->clock >= RENUMBER_AT) {
            if (batch) {
                /* fmm_set_many made room for every item: the page changed
                 * under the lock */
                repair_page(c, ph, "no room left for a batch that had room");
                return FMM_ECORRUPT;
            }
            /* A rebuild guarantees room; one that found the page corrupt
             * re-initialised it instead, and the next one will do. */
            if (rebuilt >= 2)
                return FMM_ECORRUPT;
            int rc = rebuild(c, ph, RB_INSERT, idx, (uint32_t)need, 1, evict, ctx);
            if (rc == ENOMEM)
                return ENOMEM;
            rebuilt++;
            continue;
        }
        /* Store: append the entry, then point the slot at it. */
        uint32_t now_s = now_sec(c);
        ph->dirty = 1;
        BARRIER();
        entry *e = (entry *)((char *)ph + off);
        e->access = ++ph->clock;
        set_times(e, now_s, expire_on);
        e->klen_flags = klen | (flags << 24);
        e->vlen = (uint32_t)svlen;
        memcpy(e + 1, key, klen);
        put_value((char *)(e + 1) + klen, val, vlen, mslen, modseq);
        ph->free_data = off + (uint32_t)need;
        uint32_t sv = (lo & ~c->offmask) | (off >> 2);
        uint32_t *slots = SLOTS(ph);
        if (idx >= 0) {
            slots[idx] = sv;
        } else {
            if (slots[ins] == SLOT_DELETED)
                ph->deleted--;
            slots[ins] = sv;
            ph->live++;
        }
        BARRIER();
        if (!batch)
            ph->dirty = 0;
        return 0;
    }
}

int fmm_set(fmm_cache *c, uint32_t page, uint64_t hash, const void *key, uint32_t klen, const void *val,
            uint32_t vlen, uint32_t flags, uint64_t expire_on, fmm_evict_fn evict, void *ctx)
{
    /* FMM_F_MODSEQ is ignored (fmm.h): masked for both formats */
    if (UNLIKELY(c->perl))
        return pfm_set(c->perl, page, hash, key, klen, val, vlen, flags & 0x7Fu, perl_secs(expire_on), 0, evict,
                       ctx);
    return set_impl(c, page, hash, key, klen, val, vlen, flags & 0x7Fu, expire_on, 0, evict, ctx, 0);
}

int fmm_set_ms(fmm_cache *c, uint32_t page, uint64_t hash, const void *key, uint32_t klen, const void *val,
               uint32_t vlen, uint32_t flags, uint64_t expire_on, uint64_t modseq, fmm_evict_fn evict, void *ctx)
{
    if (UNLIKELY(c->perl))
        return pfm_set(c->perl, page, hash, key, klen, val, vlen, flags, perl_secs(expire_on), modseq, evict, ctx);
    if (IS_TOMB(flags & 0xFFu) && vlen)
        return FMM_EBADARG; /* a tombstone has no value */
    return set_impl(c, page, hash, key, klen, val, vlen, flags & 0xFFu, expire_on, modseq, evict, ctx, 0);
}

/* fmm_set_many's first size check, shared by both formats: each item on
 * its own, by the rule of every store.  *total: the native entry bytes of
 * the whole batch. */
static int batch_sizes(fmm_cache *c, const fmm_batch_item *items, uint32_t n, uint32_t *bad, uint64_t *total)
{
    uint64_t sum = 0;
    for (uint32_t i = 0; i < n; i++) {
        if (!fmm_item_fits(c, items[i].klen, items[i].vlen)) {
            snprintf(tl_err, sizeof tl_err, "item %u: %llu bytes of key and value do not fit in a page (at most %u)",
                     (unsigned)i, (unsigned long long)items[i].klen + items[i].vlen,
                     (unsigned)(fmm_max_item(c) - FMM_ENTRY_HEADER_SIZE));
            if (bad)
                *bad = i;
            return FMM_ETOOBIG;
        }
        sum += ROUND4((uint64_t)FMM_ENTRY_HEADER_SIZE + items[i].klen + items[i].vlen);
    }
    *total = sum;
    return 0;
}

int fmm_set_many(fmm_cache *c, uint32_t page, fmm_batch_item *items, uint32_t n, uint64_t expire_on,
                 fmm_evict_fn evict, void *ctx, uint32_t *bad)
{
    uint64_t total;
    int rc = batch_sizes(c, items, n, bad, &total);
    if (rc)
        return rc;
    if (UNLIKELY(c->perl))
        return pfm_set_many(c->perl, page, items, n, perl_secs(expire_on), evict, ctx, bad, c->batch_fault);
    /* The whole batch must fit an empty page whose slot table has just
     * room for it (load 3/4, what a rebuild shrinks to when it must). */
    uint32_t ns_min = slots_min(n);
    if (ns_min > c->max_slots || (int64_t)total > cap_for(c, ns_min)) {
        snprintf(tl_err, sizeof tl_err,
                 "%u items need %llu bytes with their headers and slots, more than a page of %u bytes holds",
                 (unsigned)n, (unsigned long long)(total + 4ull * ns_min + FMM_PAGE_HEADER_SIZE),
                 (unsigned)c->page_size);
        if (bad)
            *bad = n;
        return FMM_ETOOBIG;
    }
    if (n == 0)
        return 0;
    page_hdr *ph = PH(c, page);
    int held = CHECK_HELD(c, ph, page);
    if (UNLIKELY(held))
        return held;
    /* The tombstone rule against the page as the batch found it, before
     * making room can evict a tombstone (a refused store changes nothing,
     * as for fmm_set).  A damaged entry is left to the store, which
     * repairs the page. */
    for (uint32_t i = 0; i < n; i++) {
        esnap sn = {0};
        long idx = find_slot(c, ph, (uint32_t)items[i].hash, items[i].key, items[i].klen, NULL, &sn);
        items[i].rc = idx >= 0 && (sn.flags & FMM_F_MODSEQ) && !sn_modseq_short(&sn)
                          ? modseq_rule(c, sn, items[i].flags & 0x7Fu, 0)
                          : 0;
    }
    /* Room for every item at once: free bytes for all of them (a replaced
     * key's old entry stays as garbage until the next rebuild, so all are
     * counted as appends), a slot each, and a clock that cannot reach the
     * renumbering point; otherwise one rebuild makes that room.  Between
     * the rebuild and the first item the page is consistent and holds none
     * of the batch. */
    for (int tries = 0;; tries++) {
        uint32_t off = RD(ph->free_data), ns = RD(ph->num_slots);
        if (off <= c->page_size && (uint64_t)c->page_size - off >= total && ns_ok(c, ns) &&
            ((uint64_t)RD(ph->live) + RD(ph->deleted) + n) * 4 <= (uint64_t)ns * 3 &&
            RD(ph->clock) < RENUMBER_AT - n)
            break;
        if (tries == 2)
            return FMM_ECORRUPT; /* the page keeps changing under the lock */
        /* on FMM_ECORRUPT the page was re-initialised: the next try fits */
        rc = rebuild(c, ph, RB_INSERT, -1, (uint32_t)total, n, evict, ctx);
        if (rc == ENOMEM)
            return ENOMEM;
    }
    /* The batch's dirty span: from here to the last item's last byte. */
    ph->dirty = 1;
    BARRIER();
    for (uint32_t i = 0; i < n; i++) {
        if (UNLIKELY(c->batch_fault == i + 1))
            raise(SIGKILL);
        const fmm_batch_item *it = &items[i];
        if (it->rc == FMM_EREFUSED)
            continue;
        rc = set_impl(c, page, it->hash, it->key, it->klen, it->val, it->vlen, it->flags & 0x7Fu, expire_on, 0,
                      evict, ctx, 1);
        if (UNLIKELY(rc != 0 && rc != FMM_EREFUSED))
            return rc; /* FMM_ECORRUPT: re-initialised, none of the batch is left */
        items[i].rc = rc;
    }
    if (UNLIKELY(c->batch_fault == n + 1))
        raise(SIGKILL);
    BARRIER();
    ph->dirty = 0;
    return 0;
}

int fmm_delete(fmm_cache *c, uint32_t page, uint64_t hash, const void *key, uint32_t klen, uint32_t *old_flags)
{
    if (UNLIKELY(c->perl))
        return pfm_delete(c->perl, page, hash, key, klen, old_flags);
    page_hdr *ph = PH(c, page);
    int held = CHECK_HELD(c, ph, page);
    if (UNLIKELY(held))
        return held;
    esnap sn;
    long idx = find_slot(c, ph, (uint32_t)hash, key, klen, NULL, &sn);
    if (UNLIKELY(idx == -2)) {
        repair_page(c, ph, "slot points outside the page's data");
        return FMM_ENOTFOUND;
    }
    if (idx < 0)
        return FMM_ENOTFOUND;
    entry *e = sn.e;
    if (UNLIKELY(ph->live == 0)) {
        repair_page(c, ph, "live count is zero but a slot holds an entry");
        return FMM_ENOTFOUND;
    }
    /* an expired entry or a tombstone is removed all the same, but was not there */
    int was_expired = expired(e, fmm_now(c)) || sn_is_tomb(&sn);
    if (old_flags)
        *old_flags = sn.flags;
    ph->dirty = 1;
    BARRIER();
    SLOTS(ph)[idx] = SLOT_DELETED;
    ph->live--;
    ph->deleted++;
    BARRIER();
    ph->dirty = 0;
    return was_expired ? FMM_ENOTFOUND : 0;
}

int fmm_expunge(fmm_cache *c, uint32_t page, int mode, fmm_evict_fn evict, void *ctx)
{
    if (UNLIKELY(c->perl))
        return pfm_expunge(c->perl, page, mode, evict, ctx);
    page_hdr *ph = PH(c, page);
    int held = CHECK_HELD(c, ph, page);
    if (UNLIKELY(held))
        return held;
    int rc = rebuild(c, ph, mode == FMM_EXPUNGE_ALL ? RB_ALL : RB_EXPIRED, -1, 0, 0, evict, ctx);
    if (rc == FMM_ECORRUPT)
        return 0;
    return rc;
}

int fmm_page_foreach(fmm_cache *c, uint32_t page, fmm_visit_fn fn, void *ctx)
{
    if (UNLIKELY(c->perl))
        return pfm_page_foreach(c->perl, page, fn, ctx);
    page_hdr *ph = PH(c, page);
    uint32_t ns = RD(ph->num_slots);
    uint32_t *slots = SLOTS(ph);
    uint64_t now = fmm_now(c);
    if (!ns_ok(c, ns)) {
        repair_page(c, ph, "slot count changed under the lock");
        return 0;
    }
    for (uint32_t i = 0; i < ns; i++) {
        uint32_t s = RD(slots[i]);
        if (s <= SLOT_DELETED)
            continue;
        esnap sn;
        if (!entry_ok(c, ph, s, &sn)) {
            repair_page(c, ph, "slot points outside the page's data");
            return 0;
        }
        if (expired(sn.e, now) || sn_is_tomb(&sn))
            continue;
        fmm_item it;
        fill_item(&it, &sn, now);
        int rc = fn(ctx, &it);
        if (rc)
            return rc;
    }
    return 0;
}

void fmm_page_info_get(fmm_cache *c, uint32_t page, fmm_page_info *info)
{
    if (UNLIKELY(c->perl)) {
        pfm_page_info_get(c->perl, page, info);
        return;
    }
    page_hdr *ph = PH(c, page);
    memset(info, 0, sizeof *info);
    uint32_t ns = RD(ph->num_slots);
    uint32_t *slots = SLOTS(ph);
    uint64_t now = fmm_now(c);
    info->num_slots = ns;
    info->deleted = ph->deleted;
    info->data_start = data_start(ns);
    info->free_data = ph->free_data;
    info->nreads = ph->nreads;
    info->nhits = ph->nhits;
    if (!ns_ok(c, ns))
        return; /* damaged: the next lock repairs it */
    for (uint32_t i = 0; i < ns; i++) {
        uint32_t s = RD(slots[i]);
        if (s <= SLOT_DELETED)
            continue;
        esnap sn;
        if (!entry_ok(c, ph, s, &sn))
            continue;
        info->live++;
        if (expired(sn.e, now)) {
            info->expired++;
        } else {
            info->live_bytes += sn.size;
            if (sn_is_tomb(&sn))
                info->tombstones++;
        }
    }
}

void fmm_page_clear_stats(fmm_cache *c, uint32_t page)
{
    if (UNLIKELY(c->perl)) {
        pfm_page_clear_stats(c->perl, page);
        return;
    }
    page_hdr *ph = PH(c, page);
    ph->nreads = 0;
    ph->nhits = 0;
}

void fmm_set_batch_fault(fmm_cache *c, uint32_t k) { c->batch_fault = k; }

void fmm_set_page_clock(fmm_cache *c, uint32_t page, uint32_t clock)
{
    if (!c->perl)
        PH(c, page)->clock = clock;
}

/* ---------- Validation ---------- */

typedef struct span {
    uint32_t off, size;
} span;
static int cmp_span(const void *a, const void *b)
{
    uint32_t x = ((const span *)a)->off, y = ((const span *)b)->off;
    return x < y ? -1 : x > y;
}

/* Every structural invariant of a page (the lock must be held). */
static int deep_check(fmm_cache *c, uint32_t page, char *msg, size_t msglen)
{
    page_hdr *ph = PH(c, page);
    if (ph->magic != PAGE_MAGIC) {
        set_detail(msg, msglen, "page %u: bad magic 0x%04x", page, (unsigned)ph->magic);
        return FMM_ECORRUPT;
    }
    if (ph->dirty) {
        set_detail(msg, msglen, "page %u: left dirty (a writer died mid-update)", page);
        return FMM_ECORRUPT;
    }
    if (!page_ok(c, ph)) {
        set_detail(msg, msglen, "page %u: header invariants violated (slots %u, live %u, deleted %u, free_data %u)",
                   page, ph->num_slots, ph->live, ph->deleted, ph->free_data);
        return FMM_ECORRUPT;
    }
    uint32_t ns = RD(ph->num_slots), mask = ns - 1;
    uint32_t *slots = SLOTS(ph);
    uint32_t live = 0, deleted = 0;
    if (!ns_ok(c, ns)) {
        set_detail(msg, msglen, "page %u: slot count %u changed while checking", page, ns);
        return FMM_ECORRUPT;
    }
    span *sp = malloc(((size_t)ns + 1) * sizeof(span));
    if (!sp) {
        set_detail(msg, msglen, "page %u: out of memory while checking", page);
        return ENOMEM;
    }
    int rc = 0;
    for (uint32_t i = 0; i < ns && rc == 0; i++) {
        uint32_t s = RD(slots[i]);
        if (s == SLOT_EMPTY)
            continue;
        if (s == SLOT_DELETED) {
            deleted++;
            continue;
        }
        esnap sn;
        if (!entry_bounds_ok(c, ph, s, &sn)) {
            set_detail(msg, msglen, "page %u: slot %u points outside the data area (0x%08x)", page, i, s);
            rc = FMM_ECORRUPT;
            break;
        }
        if (sn_modseq_short(&sn)) {
            set_detail(msg, msglen, "page %u: slot %u: modseq entry with a value of %u bytes (< 8)", page, i,
                       sn.vlen);
            rc = FMM_ECORRUPT;
            break;
        }
        if (sn_is_tomb(&sn) && sn.vlen != MODSEQ_LEN) {
            set_detail(msg, msglen, "page %u: slot %u: tombstone with a value", page, i);
            rc = FMM_ECORRUPT;
            break;
        }
        uint32_t lo = (uint32_t)fmm_hash(c, sn.e + 1, sn.klen);
        if ((lo & ~c->offmask) != (s & ~c->offmask)) {
            set_detail(msg, msglen, "page %u: slot %u tag does not match its key's hash", page, i);
            rc = FMM_ECORRUPT;
            break;
        }
        for (uint32_t j = home_index(lo, ns); j != i; j = (j + 1) & mask) {
            if (RD(slots[j]) == SLOT_EMPTY) {
                set_detail(msg, msglen, "page %u: slot %u unreachable from its home slot", page, i);
                rc = FMM_ECORRUPT;
                break;
            }
        }
        sp[live].off = (s & c->offmask) << 2;
        sp[live].size = sn.size;
        live++;
    }
    if (rc == 0 && (live != ph->live || deleted != ph->deleted)) {
        set_detail(msg, msglen, "page %u: counts wrong (live %u, header %u; deleted %u, header %u)", page, live,
                   ph->live, deleted, ph->deleted);
        rc = FMM_ECORRUPT;
    }
    if (rc == 0 && live) {
        qsort(sp, live, sizeof(span), cmp_span);
        for (uint32_t i = 1; i < live; i++) {
            if (sp[i - 1].off + sp[i - 1].size > sp[i].off) {
                set_detail(msg, msglen, "page %u: entries at %u and %u overlap", page, sp[i - 1].off, sp[i].off);
                rc = FMM_ECORRUPT;
                break;
            }
        }
    }
    free(sp);
    return rc;
}

int fmm_check_page(fmm_cache *c, uint32_t page, char *msg, size_t msglen)
{
    if (UNLIKELY(c->perl))
        return pfm_check_page(c->perl, page, msg, msglen);
    if (msg && msglen)
        msg[0] = 0;
    return deep_check(c, page, msg, msglen);
}

/* ---------- File creation and opening ---------- */

static uint64_t header_check(const file_header *h) { return fmm_xxh64(h, offsetof(file_header, check), 0); }

static int init_mutex(pthread_mutex_t *m)
{
    pthread_mutexattr_t a;
    int rc = pthread_mutexattr_init(&a);
    if (rc)
        return rc;
    if (!(rc = pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED)) &&
        !(rc = pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST)) &&
        !(rc = pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK)))
        rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return rc;
}

static void set_geometry(fmm_cache *c, uint32_t page_size, uint32_t num_pages, uint32_t start_slots)
{
    c->page_size = page_size;
    c->num_pages = num_pages;
    c->start_slots = start_slots;
    c->offbits = log2u(page_size) - 2;
    c->offmask = (1u << c->offbits) - 1;
    c->max_slots = (page_size - FMM_PAGE_HEADER_SIZE) / 4;
}

/* Initialise a fresh mapping: header and every page with its mutex. */
static int init_mapping(fmm_cache *c, uint64_t file_size)
{
    file_header *h = (file_header *)c->base;
    memset(h, 0, sizeof *h);
    memcpy(h->magic, FILE_MAGIC, 8);
    h->version = FMM_FORMAT_VERSION;
    h->header_size = FMM_HEADER_SIZE;
    h->page_size = c->page_size;
    h->num_pages = c->num_pages;
    h->start_slots = c->start_slots;
    h->file_size = file_size;
    h->created = (uint64_t)time(NULL);
    uint64_t seed;
    if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed)
        seed = ((uint64_t)time(NULL) << 32) ^ (uint64_t)getpid() ^ (uint64_t)(uintptr_t)c;
    h->hash_seed = seed;
    h->state = FMM_STATE_READY;
    h->check = header_check(h);
    c->fh = h;
    c->seed = seed;
    for (uint32_t p = 0; p < c->num_pages; p++) {
        page_hdr *ph = PH(c, p);
        int rc = init_mutex(&ph->lock.m);
        if (rc)
            return rc;
        init_page_fields(c, ph);
    }
    return 0;
}

static int validate_config(const fmm_config *cfg, char *err, size_t errlen)
{
    if (cfg->page_size && (!is_pow2(cfg->page_size) || cfg->page_size < FMM_MIN_PAGE_SIZE ||
                           cfg->page_size > FMM_MAX_PAGE_SIZE)) {
        set_detail(err, errlen, "page_size %u must be a power of two between %u and %u", cfg->page_size,
                   FMM_MIN_PAGE_SIZE, FMM_MAX_PAGE_SIZE);
        return FMM_EBADARG;
    }
    if (cfg->num_pages > FMM_MAX_PAGES) {
        set_detail(err, errlen, "num_pages %u exceeds %u", cfg->num_pages, FMM_MAX_PAGES);
        return FMM_EBADARG;
    }
    return 0;
}

static uint32_t effective_start_slots(uint32_t want, uint32_t page_size)
{
    uint32_t s = pow2_ceil(want ? want : 89);
    if (s < MIN_SLOTS)
        s = MIN_SLOTS;
    /* at most a quarter of the page */
    while (s > MIN_SLOTS && (uint64_t)data_start(s) > page_size / 4)
        s >>= 1;
    return s;
}

static int map_fd(fmm_cache *c, int fd, uint64_t size, char *err, size_t errlen)
{
    void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        set_detail(err, errlen, "mmap of %llu bytes failed: %s", (unsigned long long)size, strerror(e));
        return e;
    }
    c->base = p;
    c->map_len = (size_t)size;
    c->fh = (file_header *)p;
    return 0;
}

/* ---------- Trust and temporary files (fmm_perl.c uses them too) ---------- */

/* "user NAME (uid N)", or "uid N" for a uid without a passwd entry. */
static void owner_name(uid_t uid, char *buf, size_t len)
{
    struct passwd pw, *res = NULL;
    char tmp[1024];
    if (getpwuid_r(uid, &pw, tmp, sizeof tmp, &res) == 0 && res && res->pw_name)
        snprintf(buf, len, "user %s (uid %u)", res->pw_name, (unsigned)uid);
    else
        snprintf(buf, len, "uid %u", (unsigned)uid);
}

/* Whoever can write the file can put a pickle in it that runs as every
 * reader, and can keep writing the mapping: so an existing file is used
 * only if its owner is us or root (root can write any file and any
 * process's memory already, and a root-made file is how a cache is shared
 * between service users), and its mode lets group and others write no
 * more than `permissions` (what we would have created it with) does. */
int fmm_check_trust(const struct stat *st, int permissions, char *err, size_t errlen)
{
    mode_t asked = permissions > 0 ? (mode_t)permissions : 0600;
    uid_t me = geteuid();
    mode_t extra = st->st_mode & (S_IWGRP | S_IWOTH) & ~asked;
    int foreign = st->st_uid != me && st->st_uid != 0;
    if (!foreign && !extra)
        return 0;
    char owner[160];
    owner_name(st->st_uid, owner, sizeof owner);
    unsigned mode = (unsigned)(st->st_mode & 07777);
    if (foreign)
        set_detail(err, errlen,
                   "refusing a file owned by %s with mode %04o: this process runs as uid %u and opens only its "
                   "own files or root's, since the owner of the file can write into the cache (a pickled value "
                   "runs code in every reader); remove it, or use it as its owner",
                   owner, mode, (unsigned)me);
    else
        set_detail(err, errlen,
                   "refusing a file owned by %s with mode %04o: it lets %s write to it, beyond permissions=0o%o; "
                   "chmod it, or pass permissions=0o%o if those writers are trusted",
                   owner, mode,
                   extra == (S_IWGRP | S_IWOTH) ? "group and others" : extra == S_IWGRP ? "the group" : "others",
                   (unsigned)asked, mode & 0777);
    return FMM_EUNTRUSTED;
}

/* Create "<path>.tmp-<pid>-XXXXXX" and hold an flock on it until
 * fmm_tmp_publish: the lock, not the pid, tells fmm_reap_temps that its
 * creator is alive (a pid can be reused; the lock goes with the last
 * descriptor).  A reaper that found the file in the instant before we
 * locked it may have removed it: then the name no longer leads to our
 * file, and we start again. */
int fmm_tmp_create(const char *path, int permissions, char **tmpname, int *fdp, char *err, size_t errlen)
{
    size_t tl = strlen(path) + 48;
    char *name = malloc(tl);
    if (!name)
        return ENOMEM;
    for (int attempt = 0; attempt < 100; attempt++) {
        snprintf(name, tl, "%s.tmp-%ld-XXXXXX", path, (long)getpid());
        int fd = mkostemp(name, O_CLOEXEC);
        if (fd < 0) {
            int e = errno;
            set_detail(err, errlen, "creating a temporary file beside the cache file failed: %s", strerror(e));
            free(name);
            return e;
        }
        /* a file system without flock fails the reaper's lock as well,
         * so such a file is never taken for abandoned */
        while (flock(fd, LOCK_EX) != 0 && errno == EINTR)
            ;
        struct stat a, b;
        if (fstat(fd, &a) == 0 && lstat(name, &b) == 0 && a.st_ino == b.st_ino && a.st_dev == b.st_dev) {
            if (fchmod(fd, (mode_t)(permissions > 0 ? permissions : 0600)) != 0) {
                int e = errno;
                set_detail(err, errlen, "fchmod: %s", strerror(e));
                unlink(name);
                close(fd);
                free(name);
                return e;
            }
            *tmpname = name;
            *fdp = fd;
            return 0;
        }
        close(fd);
    }
    set_detail(err, errlen, "creating a temporary file beside the cache file: it kept being removed");
    free(name);
    return EAGAIN;
}

/* Give the finished file its name, then drop the creator's lock (after the
 * temporary name is gone, so a reaper never sees it unlocked).  replace:
 * rename over path; else link, which fails with EEXIST if another process
 * published first.  On failure the caller unlinks tmpname. */
int fmm_tmp_publish(int fd, const char *tmpname, const char *path, int replace)
{
    int rc = 0;
    if (replace) {
        rc = rename(tmpname, path) == 0 ? 0 : errno;
    } else if (link(tmpname, path) == 0) {
        unlink(tmpname);
    } else {
        rc = errno;
        /* filesystems without hard links */
        if (rc != EEXIST)
            rc = fmm_rename_noreplace(tmpname, path) == 0 ? 0 : errno;
    }
    if (rc == 0)
        flock(fd, LOCK_UN);
    return rc;
}

/* "<base>.tmp-<digits>-XXXXXX", the names fmm_tmp_create makes. */
static int is_temp_of(const char *name, const char *base, size_t blen)
{
    if (strncmp(name, base, blen) != 0 || strncmp(name + blen, ".tmp-", 5) != 0)
        return 0;
    const char *q = name + blen + 5;
    if (*q < '0' || *q > '9')
        return 0;
    while (*q >= '0' && *q <= '9')
        q++;
    if (*q++ != '-' || strlen(q) != 6)
        return 0;
    for (; *q; q++)
        if (!((*q >= '0' && *q <= '9') || (*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z')))
            return 0;
    return 1;
}

int fmm_reap_temps(const char *path, int remove, void (*fn)(void *ctx, const char *name, uint64_t size), void *ctx)
{
    const char *slash = strrchr(path, '/');
    const char *base = slash ? slash + 1 : path;
    size_t blen = strlen(base);
    if (!blen)
        return 0;
    char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
    if (!dir)
        return -ENOMEM;
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(dir);
    if (dfd < 0)
        return -errno;
    int lfd = fcntl(dfd, F_DUPFD_CLOEXEC, 0);
    DIR *d = lfd >= 0 ? fdopendir(lfd) : NULL;
    if (!d) {
        int e = errno;
        if (lfd >= 0)
            close(lfd);
        close(dfd);
        return -e;
    }
    uid_t me = geteuid();
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (!is_temp_of(de->d_name, base, blen))
            continue;
        int fd = openat(dfd, de->d_name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            continue;
        struct stat st, now;
        /* the lock is free: its creator is gone.  Then the name must still
         * lead to the file we locked, or it is not ours to remove. */
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_uid == me && flock(fd, LOCK_EX | LOCK_NB) == 0 &&
            fstatat(dfd, de->d_name, &now, AT_SYMLINK_NOFOLLOW) == 0 && now.st_ino == st.st_ino &&
            now.st_dev == st.st_dev && (!remove || unlinkat(dfd, de->d_name, 0) == 0)) {
            n++;
            if (fn)
                fn(ctx, de->d_name, (uint64_t)st.st_size);
        }
        close(fd);
    }
    closedir(d);
    close(dfd);
    return n;
}

/* Build a complete, initialised file under a temporary name in the
 * directory of `path`.  On success *tmpfd is open on it and *tmpname holds
 * its name (to free). */
static int build_file(fmm_cache *c, const char *path, const fmm_config *cfg, char **tmpname, int *tmpfd, char *err,
                      size_t errlen)
{
    uint64_t size = FMM_HEADER_SIZE + (uint64_t)c->page_size * c->num_pages;
    int fd;
    int rc = fmm_tmp_create(path, cfg->permissions, tmpname, &fd, err, errlen);
    if (rc)
        return rc;
    rc = posix_fallocate(fd, 0, (off_t)size);
    if (rc == EOPNOTSUPP || rc == EINVAL) /* filesystems without fallocate */
        rc = ftruncate(fd, (off_t)size) == 0 ? 0 : errno;
    if (rc) {
        set_detail(err, errlen, "reserving %llu bytes for the cache file failed: %s", (unsigned long long)size,
                   strerror(rc));
        goto fail;
    }
    rc = map_fd(c, fd, size, err, errlen);
    if (rc)
        goto fail;
    rc = init_mapping(c, size);
    if (rc) {
        set_detail(err, errlen, "initialising page mutexes failed: %s", strerror(rc));
        munmap(c->base, c->map_len);
        c->base = NULL;
        goto fail;
    }
    *tmpfd = fd;
    return 0;
fail:
    close(fd);
    unlink(*tmpname);
    free(*tmpname);
    *tmpname = NULL;
    return rc;
}

/* Read and validate the header of an open file; fill geometry. */
static int adopt_header(fmm_cache *c, int fd, const struct stat *st, char *err, size_t errlen)
{
    file_header h;
    if ((uint64_t)st->st_size < FMM_HEADER_SIZE) {
        set_detail(err, errlen, "file is %lld bytes, too small for a fastmmap cache", (long long)st->st_size);
        return FMM_EBADFILE;
    }
    ssize_t r;
    do
        r = pread(fd, &h, sizeof h, 0);
    while (r < 0 && errno == EINTR);
    if (r != (ssize_t)sizeof h) {
        int e = r < 0 ? errno : EIO;
        set_detail(err, errlen, "reading the header failed: %s", strerror(e));
        return e;
    }
    if (memcmp(h.magic, FILE_MAGIC, 8) != 0) {
        set_detail(err, errlen, "no fastmmap magic at the start of the file");
        return FMM_EBADFILE;
    }
    if (h.version != FMM_FORMAT_VERSION) {
        set_detail(err, errlen, "file format version %u is not supported (this is version %u)", h.version,
                   FMM_FORMAT_VERSION);
        return FMM_EBADFILE;
    }
    if (h.check != header_check(&h) || h.state != FMM_STATE_READY || h.header_size != FMM_HEADER_SIZE) {
        set_detail(err, errlen, "header checksum or state is wrong");
        return FMM_EBADFILE;
    }
    if (!is_pow2(h.page_size) || h.page_size < FMM_MIN_PAGE_SIZE || h.page_size > FMM_MAX_PAGE_SIZE ||
        h.num_pages < 1 || h.num_pages > FMM_MAX_PAGES || !is_pow2(h.start_slots) || h.start_slots < MIN_SLOTS ||
        h.start_slots > h.page_size / 16 || data_start(h.start_slots) > h.page_size / 4) {
        set_detail(err, errlen, "header claims an impossible geometry (page_size %u, num_pages %u, start_slots %u)",
                   h.page_size, h.num_pages, h.start_slots);
        return FMM_EBADFILE;
    }
    uint64_t want = FMM_HEADER_SIZE + (uint64_t)h.page_size * h.num_pages;
    if (h.file_size != want || (uint64_t)st->st_size != want) {
        set_detail(err, errlen, "file is %lld bytes but its header says %llu", (long long)st->st_size,
                   (unsigned long long)want);
        return FMM_EBADFILE;
    }
    set_geometry(c, h.page_size, h.num_pages, h.start_slots);
    c->seed = h.hash_seed;
    return 0;
}

static void reset_handle(fmm_cache *c)
{
    if (c->base)
        munmap(c->base, c->map_len);
    if (c->fd >= 0)
        close(c->fd);
    c->base = NULL;
    c->fh = NULL;
    c->fd = -1;
}

/* Create a new file (or replace one) and leave the handle on it. */
static int create_file(fmm_cache *c, const char *path, const fmm_config *cfg, int replace, char *err,
                       size_t errlen)
{
    char *tmp = NULL;
    int fd = -1;
    int rc = build_file(c, path, cfg, &tmp, &fd, err, errlen);
    if (rc == 0) {
        rc = fmm_tmp_publish(fd, tmp, path, replace);
        if (rc) {
            if (rc != EEXIST)
                set_detail(err, errlen, "publishing the new cache file failed: %s", strerror(rc));
            unlink(tmp);
            munmap(c->base, c->map_len);
            c->base = NULL;
            c->fh = NULL;
            close(fd);
        } else {
            c->fd = fd;
        }
    }
    free(tmp);
    return rc;
}

int fmm_open(const char *path, const fmm_config *cfg, fmm_cache **out, int *created, char *err, size_t errlen)
{
    if (err && errlen)
        err[0] = 0;
    *out = NULL;
    if (created)
        *created = 0;
    if (!cfg->anonymous) {
        if (!path || !*path) {
            set_detail(err, errlen, "the path of the cache file is empty");
            return ENOENT;
        }
        /* the temporary files of creators that died; nothing to do with
         * this open's outcome, so errors are ignored */
        fmm_reap_temps(path, 1, NULL, NULL);
    }
    if (cfg->format == FMM_FORMAT_PERL) {
        fmm_cache *c = calloc(1, sizeof *c);
        if (!c)
            return ENOMEM;
        int rc = pfm_open(path, cfg, &c->perl, created, err, errlen);
        if (rc) {
            free(c);
            return rc;
        }
        c->id = __atomic_fetch_add(&next_handle_id, 1, __ATOMIC_RELAXED);
        c->fd = -1;
        c->page_size = pfm_page_size(c->perl);
        c->num_pages = pfm_num_pages(c->perl);
        c->start_slots = pfm_start_slots(c->perl);
        c->guard_slot = fmm_guard_register(pfm_page_ptr(c->perl, 0), (size_t)c->page_size * c->num_pages, &c->lost);
        *out = c;
        return 0;
    }
    if (cfg->format != FMM_FORMAT_NATIVE) {
        set_detail(err, errlen, "unknown file format %d", cfg->format);
        return FMM_EBADARG;
    }
    int rc = validate_config(cfg, err, errlen);
    if (rc)
        return rc;
    pthread_once(&atfork_once, install_atfork);
    fmm_cache *c = calloc(1, sizeof *c);
    if (!c)
        return ENOMEM;
    c->id = __atomic_fetch_add(&next_handle_id, 1, __ATOMIC_RELAXED);
    c->fd = -1;
    c->guard_slot = -1;
    c->stats = cfg->enable_stats;
    clock_init(c);
    uint32_t ps = cfg->page_size ? cfg->page_size : 65536;
    uint32_t np = cfg->num_pages ? cfg->num_pages : 89;
    set_geometry(c, ps, np, effective_start_slots(cfg->start_slots, ps));

    if (cfg->anonymous) {
        uint64_t size = FMM_HEADER_SIZE + (uint64_t)ps * np;
        void *p = mmap(NULL, (size_t)size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            rc = errno;
            set_detail(err, errlen, "anonymous mmap of %llu bytes failed: %s", (unsigned long long)size,
                       strerror(rc));
            free(c);
            return rc;
        }
        c->base = p;
        c->map_len = (size_t)size;
        c->anonymous = 1;
        rc = init_mapping(c, size);
        if (rc) {
            fmm_close(c);
            return rc;
        }
        if (created)
            *created = 1;
        c->ns_hint = calloc(c->num_pages, 1);
        *out = c;
        return 0;
    }

    c->path = strdup(path);
    if (!c->path) {
        free(c);
        return ENOMEM;
    }
    for (int attempt = 0; attempt < 50; attempt++) {
        int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) {
            rc = errno;
            if (rc == ENOENT) {
                set_geometry(c, ps, np, effective_start_slots(cfg->start_slots, ps));
                rc = create_file(c, path, cfg, 0, err, errlen);
                if (rc == EEXIST)
                    continue; /* another process won the race: open its file */
                if (rc == 0 && created)
                    *created = 1;
                goto done;
            }
            if (rc == ELOOP || rc == EMLINK)
                set_detail(err, errlen, "refusing to open a symbolic link");
            goto done;
        }
        struct stat st;
        if (fstat(fd, &st) != 0) {
            rc = errno;
            close(fd);
            goto done;
        }
        if (!S_ISREG(st.st_mode)) {
            close(fd);
            rc = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
            set_detail(err, errlen, "not a regular file");
            goto done;
        }
        /* before anything is read, replaced or mapped: see fmm_open */
        rc = fmm_check_trust(&st, cfg->permissions, err, errlen);
        if (rc) {
            close(fd);
            goto done;
        }
        if (st.st_size == 0) {
            /* An empty file (e.g. from mkstemp): replace it, serialised by
             * flock so that only one process does. */
            while (flock(fd, LOCK_EX) != 0 && errno == EINTR)
                ;
            struct stat now;
            int same = stat(path, &now) == 0 && now.st_ino == st.st_ino && now.st_dev == st.st_dev;
            int still_empty = fstat(fd, &st) == 0 && st.st_size == 0;
            if (same && still_empty) {
                set_geometry(c, ps, np, effective_start_slots(cfg->start_slots, ps));
                rc = create_file(c, path, cfg, 1, err, errlen);
                flock(fd, LOCK_UN);
                close(fd);
                if (rc == 0 && created)
                    *created = 1;
                goto done;
            }
            flock(fd, LOCK_UN);
            close(fd);
            continue; /* someone else replaced it: open theirs */
        }
        char herr[200] = "";
        rc = adopt_header(c, fd, &st, herr, sizeof herr);
        if (rc == 0 && (((cfg->explicit_geometry & FMM_GEOM_PAGE_SIZE) && c->page_size != ps) ||
                        ((cfg->explicit_geometry & FMM_GEOM_NUM_PAGES) && c->num_pages != np))) {
            set_detail(herr, sizeof herr,
                       "the file has %u pages of %u bytes but %u pages of %u bytes were asked for "
                       "(pass init_file=True to recreate it, or no size options to adopt it)",
                       c->num_pages, c->page_size, np, ps);
            rc = FMM_EGEOMETRY;
        }
        if (rc && cfg->init_file && (rc == FMM_EGEOMETRY || rc == FMM_EBADFILE)) {
            close(fd);
            set_geometry(c, ps, np, effective_start_slots(cfg->start_slots, ps));
            rc = create_file(c, path, cfg, 1, err, errlen);
            if (rc == 0 && created)
                *created = 1;
            goto done;
        }
        if (rc) {
            set_detail(err, errlen, "%s", herr);
            close(fd);
            goto done;
        }
        rc = map_fd(c, fd, (uint64_t)st.st_size, err, errlen);
        if (rc) {
            close(fd);
            goto done;
        }
        c->fd = fd;
        if (cfg->init_file) {
            /* In place, under each page lock.  A lock that cannot be taken
             * within a second (damaged, or held by a lost owner) makes us
             * replace the whole file instead. */
            for (uint32_t p = 0; p < c->num_pages; p++) {
                int lrc = fmm_lock(c, p, 1000000000LL);
                if (lrc == FMM_ETIMEDOUT && fmm_lock_stale(c, p))
                    lrc = fmm_lock(c, p, 1000000000LL);
                if (lrc) {
                    /* keep the adopted geometry: it agrees with any sizes given */
                    reset_handle(c);
                    rc = create_file(c, path, cfg, 1, err, errlen);
                    if (rc == 0 && created)
                        *created = 1;
                    goto done;
                }
                init_page_fields(c, PH(c, p));
                fmm_unlock(c, p);
            }
        }
        goto done;
    }
    rc = EAGAIN;
    set_detail(err, errlen, "the cache file kept changing while opening it");
done:
    if (rc == 0 && c->fd >= 0) {
        struct stat st;
        if (fstat(c->fd, &st) == 0) {
            c->dev = st.st_dev;
            c->ino = st.st_ino;
        }
    }
    if (rc) {
        reset_handle(c);
        free(c->path);
        free(c);
        return rc;
    }
    if (!c->anonymous)
        c->guard_slot = fmm_guard_register(c->base, c->map_len, &c->lost);
    c->ns_hint = calloc(c->num_pages, 1); /* NULL: no prefetching, nothing else changes */
    *out = c;
    return 0;
}

void fmm_close(fmm_cache *c)
{
    if (!c)
        return;
    if (c->perl) {
        /* no robust mutexes live in a Perl file: its zero memory, if the
         * file was truncated, can be unmapped */
        fmm_guard_unregister(c->guard_slot);
        pfm_close(c->perl);
        free(c);
        return;
    }
    /* A page this thread still holds (an abandoned lock block) is released
     * rather than left locked in the file for ever. */
    int i = tl_find(c);
    if (i >= 0 && c->base)
        fmm_unlock(c, tl_held[i].page);
    fmm_guard_unregister(c->guard_slot);
    c->guard_slot = -1;
    if (fmm_lost(c)) {
        /* The zero memory that replaced the mapping stays mapped: mutexes
         * in it may still be linked from a thread's robust-futex list,
         * which glibc writes through at that thread's next lock or unlock
         * (see fmm.h).  Address space, not memory: untouched zero pages
         * cost nothing. */
        c->base = NULL;
    }
    reset_handle(c);
    free(c->ns_hint);
    free(c->path);
    free(c);
}

int fmm_check_file(const fmm_cache *c)
{
    if (UNLIKELY(c->perl))
        return pfm_check_file(c->perl);
    if (fmm_lost(c))
        return FMM_EREPLACED;
    if (c->anonymous)
        return 0;
    struct stat st;
    /* truncated (or extended) in place: the mapping no longer matches */
    if (c->fd >= 0 && fstat(c->fd, &st) == 0 && (uint64_t)st.st_size != (uint64_t)c->map_len)
        return FMM_EREPLACED;
    if (stat(c->path, &st) != 0)
        return errno == ENOENT ? FMM_EREPLACED : errno;
    if (st.st_ino != c->ino || st.st_dev != c->dev)
        return FMM_EREPLACED;
    return 0;
}
