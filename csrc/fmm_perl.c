/*
 * fmm_perl.c -- Cache::FastMmap's file format, so that Perl and Python
 * processes can share one cache file.
 *
 * Written from the format description (Cache::FastMmap 1.57..1.63, see the
 * project's reference notes): no code of the Perl module is used.
 *
 * File: num_pages * page_size bytes, no file header.  All fields are
 * native-endian uint32 except the modseq (8 bytes, memcpy'd).
 *
 * Page header, 32 bytes:
 *   0 magic 0x92f7e3b1   4 num_slots   8 free_slots (empty + deleted)
 *   12 old_slots (deleted)  16 free_data (offset of the first free byte)
 *   20 free_bytes (page_size - free_data)  24 nreads  28 nreadhits
 * Slot table at 32: num_slots uint32 offsets from the page start;
 *   0 empty (ends a probe), 1 deleted (probe continues), else an entry.
 * Entry, 24 bytes then key then value, rounded up to 4:
 *   last_access, expire_on, slot_hash, flags, key_len, val_len
 *   (val_len includes an 8-byte modseq prefix when FC_HASMODSEQ).
 * Hash: h = 0x92f7e3b1; for each byte h = rotl(h, 4) + byte;
 *   page = h % num_pages, slot_hash = h / num_pages, the first probe is
 *   slot_hash % num_slots, then linear.
 *
 * Locking: an exclusive fcntl lock on the page's byte range, as Perl takes
 * (F_SETLKW, F_WRLCK).  We use open-file-description locks (F_OFD_*),
 * which conflict with Perl's POSIX record locks but belong to our file
 * descriptor, not to the process: closing another descriptor of the file
 * does not drop them, and two handles in one process exclude each other.
 * A descriptor shared across fork() would share the locks too, so a forked
 * child reopens its own (pthread_atfork bumps a generation counter; the
 * next lock notices).  Threads sharing a handle exclude each other with an
 * in-process mutex per page, taken before the file lock.
 *
 * Expunge (compaction plus eviction) follows Perl's rules: nothing to do
 * when more than 30% of the slots were never used and the item fits;
 * otherwise drop expired entries, double the slot table (n -> 2n+1) when
 * more than 30% of it is in use, and in a store evict the least recently
 * accessed entries until under 60% of the data area is used.  One
 * difference: if the item still does not fit (it needs more than 40% of
 * the page), older entries go until it does, where Perl would fail the
 * store.
 *
 * The format has no checksum and no dirty marker, so a writer killed
 * mid-store can leave a damaged page.  Every offset and length read from
 * the file is bounds-checked before use; a page whose header or slots
 * fail the checks is re-initialised (its entries are lost) and counted.
 */
#define _GNU_SOURCE
#include "fmm_perl.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fmm_compat.h"

#define P_MAGIC 0x92f7e3b1u
#define P_HDR 32u
#define E_HDR 24u
#define FC_ISDIRTY 1u
#define FC_HASMODSEQ (1u << 27)
#define FC_TOMBSTONE (1u << 28)
#define FC_UNDEF (1u << 29)
#define FC_UTF8KEY (1u << 30)
#define FC_UTF8VAL (1u << 31)

#define ROUND4(x) (((uint64_t)(x) + 3u) & ~(uint64_t)3u)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

typedef struct phdr {
    uint32_t magic, num_slots, free_slots, old_slots, free_data, free_bytes, nreads, nhits;
} phdr;

typedef struct pent {
    uint32_t last_access, expire_on, slot_hash, flags, klen, vlen;
} pent;

_Static_assert(sizeof(phdr) == P_HDR, "perl page header");
_Static_assert(sizeof(pent) == E_HDR, "perl entry header");

struct pfm_cache {
    uint64_t id;
    int fd;
    char *path;
    dev_t dev;
    ino_t ino;
    unsigned char *base;
    size_t map_len;
    uint32_t page_size, num_pages, start_slots;
    int stats;
    uint32_t value_flags;
    uint32_t time_override;
    unsigned gen;             /* fork generation this fd belongs to */
    pthread_mutex_t *mx;      /* one per page: threads of this handle */
    uint64_t repairs;
};

/* ---------- process-wide state ---------- */

#define TL_MAX 8
static __thread struct {
    uint64_t id;
    uint32_t page;
} tl_held[TL_MAX];
static __thread int tl_n;

/* A forked child holds none of its parent's page locks: it forgets the
 * records it inherited (with them, its unlock would release the parent's
 * fcntl lock through the open file description they still share, while
 * the parent writes the page) and reopens its descriptor before it locks. */
static unsigned fork_gen;
static uint64_t next_id = 1;
static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void on_fork_child(void)
{
    tl_n = 0;
    __atomic_add_fetch(&fork_gen, 1, __ATOMIC_RELAXED);
}
static void install_atfork(void) { pthread_atfork(NULL, NULL, on_fork_child); }

static int tl_find(const pfm_cache *p)
{
    for (int i = 0; i < tl_n; i++)
        if (tl_held[i].id == p->id)
            return i;
    return -1;
}

/* Per thread, not per handle: threads sharing a handle run in parallel
 * under free-threaded Python, and one must not overwrite the text another
 * is reading (fmm.c's tl_err, for the same reason). */
static _Thread_local char tl_err[256];

static void detail(pfm_cache *p, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void detail(pfm_cache *p, const char *fmt, ...)
{
    va_list ap;
    (void)p;
    va_start(ap, fmt);
    vsnprintf(tl_err, sizeof tl_err, fmt, ap);
    va_end(ap);
}

/* ---------- small accessors ---------- */

uint32_t pfm_hash32(const void *key, size_t klen)
{
    const unsigned char *k = key;
    uint32_t h = P_MAGIC;
    for (size_t i = 0; i < klen; i++)
        h = (h << 4) + (h >> 28) + k[i];
    return h;
}

static inline unsigned char *PB(const pfm_cache *p, uint32_t page) { return p->base + (uint64_t)page * p->page_size; }
static inline phdr *PHD(const pfm_cache *p, uint32_t page) { return (phdr *)PB(p, page); }
static inline uint32_t *PSLOTS(unsigned char *pb) { return (uint32_t *)(pb + P_HDR); }
static inline uint32_t dstart(uint32_t ns) { return P_HDR + 4u * ns; }
static inline int is_expired(const pent *e, uint32_t now) { return e->expire_on && now >= e->expire_on; }

uint32_t pfm_page_size(const pfm_cache *p) { return p->page_size; }
uint32_t pfm_num_pages(const pfm_cache *p) { return p->num_pages; }
uint32_t pfm_start_slots(const pfm_cache *p) { return p->start_slots; }
/* fmm_max_item's contract counts a 20-byte entry header; report the same
 * quantity (the largest key+value that fits an empty page, plus 20). */
uint32_t pfm_max_item(const pfm_cache *p)
{
    uint32_t ds = dstart(p->start_slots);
    return ds + E_HDR >= p->page_size ? 0 : (p->page_size - ds - E_HDR) + FMM_ENTRY_HEADER_SIZE;
}
uint64_t pfm_repairs(const pfm_cache *p) { return p->repairs; }
uint32_t pfm_page_of(const pfm_cache *p, uint64_t hash) { return (uint32_t)hash % p->num_pages; }
static inline uint32_t slot_hash_of(const pfm_cache *p, uint64_t hash) { return (uint32_t)hash / p->num_pages; }
uint32_t pfm_now(const pfm_cache *p) { return p->time_override ? p->time_override : (uint32_t)time(NULL); }
void pfm_set_time(pfm_cache *p, uint32_t now) { p->time_override = now; }
const char *pfm_errdetail(const pfm_cache *p)
{
    (void)p;
    return tl_err;
}
unsigned char *pfm_page_ptr(pfm_cache *p, uint32_t page) { return PB(p, page); }

/* ---------- flags: Perl's bits <-> the engine's ---------- */

static uint32_t to_perl_flags(uint32_t f)
{
    uint32_t pf = 0, type = f & FMM_F_TYPE_MASK;
    if (type == FMM_T_TOMBSTONE)
        pf |= FC_TOMBSTONE;
    else if (type == FMM_T_NONE)
        pf |= FC_UNDEF;
    else if (type == FMM_T_STR && !(f & FMM_F_COMP_MASK))
        pf |= FC_UTF8VAL;
    if (f & FMM_F_KEYSTR)
        pf |= FC_UTF8KEY;
    if (f & FMM_F_DIRTY)
        pf |= FC_ISDIRTY;
    if (f & FMM_F_MODSEQ)
        pf |= FC_HASMODSEQ;
    return pf;
}

static uint32_t from_perl_flags(const pfm_cache *p, uint32_t pf)
{
    uint32_t f;
    if (pf & FC_TOMBSTONE)
        f = FMM_T_TOMBSTONE;
    else if (pf & FC_UNDEF)
        f = FMM_T_NONE;
    else if (pf & FC_UTF8VAL)
        f = FMM_T_STR;
    else
        f = p->value_flags & (FMM_F_TYPE_MASK | FMM_F_COMP_MASK);
    if (pf & FC_UTF8KEY)
        f |= FMM_F_KEYSTR;
    if (pf & FC_ISDIRTY)
        f |= FMM_F_DIRTY;
    if (pf & FC_HASMODSEQ)
        f |= FMM_F_MODSEQ;
    return f;
}

/* ---------- validation ---------- */

static int header_ok(const pfm_cache *p, const phdr *h)
{
    /* num_slots is bounded first: dstart() of a huge count wraps 32 bits
     * (a damaged count of 2^31 + 89 once passed as a small slot table) */
    return h->magic == P_MAGIC && h->num_slots >= 1 && h->num_slots < (p->page_size - P_HDR) / 4u &&
           (uint64_t)dstart(h->num_slots) < p->page_size &&
           h->free_slots <= h->num_slots && h->old_slots <= h->free_slots && h->free_data >= dstart(h->num_slots) &&
           h->free_data <= p->page_size && (uint64_t)h->free_data + h->free_bytes == p->page_size;
}

/* The entry a slot value points at, or NULL if the value is not a valid
 * entry offset for this page (the page is then damaged). */
static pent *entry_at(const pfm_cache *p, unsigned char *pb, uint32_t off)
{
    (void)p;
    const phdr *h = (const phdr *)pb;
    if (off < dstart(h->num_slots) || (off & 3u) || (uint64_t)off + E_HDR > h->free_data)
        return NULL;
    pent *e = (pent *)(pb + off);
    if ((uint64_t)off + E_HDR + e->klen + e->vlen > h->free_data)
        return NULL;
    if ((e->flags & FC_HASMODSEQ) && e->vlen < 8)
        return NULL;
    return e;
}

static void init_page(pfm_cache *p, unsigned char *pb)
{
    memset(pb, 0, p->page_size);
    phdr *h = (phdr *)pb;
    uint32_t ns = p->start_slots;
    h->magic = P_MAGIC;
    h->num_slots = ns;
    h->free_slots = ns;
    h->old_slots = 0;
    h->free_data = dstart(ns);
    h->free_bytes = p->page_size - h->free_data;
}

void pfm_init_page(pfm_cache *p, uint32_t page) { init_page(p, PB(p, page)); }

static void repair(pfm_cache *p, uint32_t page, const char *why)
{
    detail(p, "page %u re-initialised: %s", page, why);
    init_page(p, PB(p, page));
    p->repairs++;
}

/* ---------- locking ---------- */

static int file_lock(pfm_cache *p, uint32_t page, int cmd, short type)
{
    struct flock fl;
    memset(&fl, 0, sizeof fl);
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = (off_t)((uint64_t)page * p->page_size);
    fl.l_len = (off_t)p->page_size;
    fl.l_pid = 0;
    return fcntl(p->fd, cmd, &fl) == 0 ? 0 : errno;
}

/* A forked child shares its parent's open file description, and with it
 * the OFD locks: give the child its own. */
static int after_fork(pfm_cache *p)
{
    char proc[64];
    snprintf(proc, sizeof proc, "/proc/self/fd/%d", p->fd);
    int fd = open(proc, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        fd = open(p->path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
        struct stat st;
        if (fd >= 0 && (fstat(fd, &st) != 0 || st.st_ino != p->ino || st.st_dev != p->dev)) {
            close(fd);
            detail(p, "the cache file was replaced; reopen the cache");
            return FMM_EREPLACED;
        }
    }
    if (fd < 0) {
        int rc = errno;
        detail(p, "reopening the cache file after fork: %s", strerror(rc));
        return rc;
    }
    if (dup3(fd, p->fd, O_CLOEXEC) < 0) {
        int rc = errno;
        close(fd);
        return rc;
    }
    close(fd);
    for (uint32_t i = 0; i < p->num_pages; i++)
        pthread_mutex_init(&p->mx[i], NULL);
    p->gen = __atomic_load_n(&fork_gen, __ATOMIC_RELAXED);
    return 0;
}

static int64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

int pfm_lock(pfm_cache *p, uint32_t page, int64_t timeout_ns)
{
    if (UNLIKELY(page >= p->num_pages))
        return FMM_EBADARG;
    int held = tl_find(p);
    if (UNLIKELY(held >= 0)) {
        detail(p, "page %u is already locked by this thread; can't lock page %u", tl_held[held].page, page);
        return FMM_ELOCKED;
    }
    if (UNLIKELY(tl_n >= TL_MAX))
        return FMM_ETOOMANY;
    if (UNLIKELY(p->gen != __atomic_load_n(&fork_gen, __ATOMIC_RELAXED))) {
        int rc = after_fork(p);
        if (rc)
            return rc;
    }
    int64_t deadline = timeout_ns > 0 ? mono_ns() + timeout_ns : 0;
    int rc;
    if (timeout_ns == 0) {
        rc = pthread_mutex_trylock(&p->mx[page]);
    } else if (timeout_ns < 0) {
        rc = pthread_mutex_lock(&p->mx[page]);
    } else {
        struct timespec ts = {.tv_sec = (time_t)(deadline / 1000000000LL), .tv_nsec = (long)(deadline % 1000000000LL)};
        rc = fmm_mutex_clocklock_mono(&p->mx[page], &ts);
    }
    if (rc == EBUSY)
        return FMM_EBUSY;
    if (rc == ETIMEDOUT)
        return FMM_ETIMEDOUT;
    if (rc) {
        detail(p, "locking page %u: %s", page, strerror(rc));
        return rc;
    }
    /* the file lock: try, then wait as the timeout allows */
    int64_t sleep_ns = 20000;
    for (;;) {
        rc = file_lock(p, page, F_OFD_SETLK, F_WRLCK);
        if (rc == 0)
            break;
        if (rc == EINTR)
            continue;
        if (rc != EAGAIN && rc != EACCES) {
            pthread_mutex_unlock(&p->mx[page]);
            detail(p, "fcntl lock of page %u: %s", page, strerror(rc));
            return rc;
        }
        if (timeout_ns == 0) {
            pthread_mutex_unlock(&p->mx[page]);
            return FMM_EBUSY;
        }
        if (timeout_ns < 0) {
            do
                rc = file_lock(p, page, F_OFD_SETLKW, F_WRLCK);
            while (rc == EINTR);
            if (rc) {
                pthread_mutex_unlock(&p->mx[page]);
                detail(p, "fcntl lock of page %u: %s", page, strerror(rc));
                return rc;
            }
            break;
        }
        int64_t left = deadline - mono_ns();
        if (left <= 0) {
            pthread_mutex_unlock(&p->mx[page]);
            return FMM_ETIMEDOUT;
        }
        int64_t s = sleep_ns < left ? sleep_ns : left;
        struct timespec ts = {.tv_sec = 0, .tv_nsec = (long)s};
        nanosleep(&ts, NULL);
        if (sleep_ns < 1000000)
            sleep_ns *= 2;
    }
    phdr *h = PHD(p, page);
    if (UNLIKELY(!header_ok(p, h)))
        repair(p, page, h->magic == P_MAGIC ? "page header failed validation" : "page magic not found");
    tl_held[tl_n].id = p->id;
    tl_held[tl_n].page = page;
    tl_n++;
    return 0;
}

int pfm_unlock(pfm_cache *p, uint32_t page)
{
    int i = tl_find(p);
    if (i < 0 || tl_held[i].page != page) {
        /* not ours (a child forked under the lock): releasing the fcntl
         * lock through the descriptor it shares would free the parent's */
        detail(p, "page %u is not locked by this thread", page);
        return FMM_EBADARG;
    }
    tl_held[i] = tl_held[tl_n - 1];
    tl_n--;
    file_lock(p, page, F_OFD_SETLK, F_UNLCK);
    pthread_mutex_unlock(&p->mx[page]);
    return 0;
}

int pfm_held(const pfm_cache *p, uint32_t page)
{
    int i = tl_find(p);
    return i >= 0 && tl_held[i].page == page;
}

/* Stores check that this thread holds the page, as fmm.c's do (see
 * not_held there): a child forked by code run under the lock holds
 * nothing, and its write would land in a page its parent may be writing. */
static __attribute__((noinline, cold)) int not_held(pfm_cache *p, uint32_t page)
{
    detail(p, "page %u is not locked by this thread (a child forked under the lock?)", page);
    return FMM_EBADARG;
}

/* ---------- probing ---------- */

/* Find the key.  Returns the matching slot index, or -1 if absent (then
 * *ins is the slot to store into: the first deleted slot seen, else the
 * empty slot that ended the probe, else -1 when the table is full), or -2
 * if a slot points outside the page (the caller repairs). */
static long find_slot(const pfm_cache *p, unsigned char *pb, uint32_t slot_hash, const void *key, uint32_t klen,
                      long *ins)
{
    const phdr *h = (const phdr *)pb;
    uint32_t ns = h->num_slots;
    uint32_t *slots = PSLOTS(pb);
    uint32_t i = slot_hash % ns;
    long first_del = -1;
    for (uint32_t n = 0; n < ns; n++) {
        uint32_t v = slots[i];
        if (v == 0) {
            if (ins)
                *ins = first_del >= 0 ? first_del : (long)i;
            return -1;
        }
        if (v == 1) {
            if (first_del < 0)
                first_del = (long)i;
        } else {
            pent *e = entry_at(p, pb, v);
            if (!e)
                return -2;
            if (e->klen == klen && memcmp((unsigned char *)e + E_HDR, key, klen) == 0)
                return (long)i;
        }
        if (++i == ns)
            i = 0;
    }
    if (ins)
        *ins = first_del;
    return -1;
}

static void fill_item(const pfm_cache *p, fmm_item *it, pent *e)
{
    const unsigned char *k = (const unsigned char *)e + E_HDR;
    const unsigned char *v = k + e->klen;
    uint32_t vlen = e->vlen;
    it->modseq = 0;
    if (e->flags & FC_HASMODSEQ) {
        memcpy(&it->modseq, v, 8);
        v += 8;
        vlen -= 8;
    }
    it->key = (const char *)k;
    it->klen = e->klen;
    it->val = (const char *)v;
    it->vlen = vlen;
    it->flags = from_perl_flags(p, e->flags);
    it->expire_on = e->expire_on;
    it->access = e->last_access;
    it->last_access = e->last_access;
}

static uint64_t entry_modseq(const pent *e)
{
    uint64_t ms;
    memcpy(&ms, (const unsigned char *)e + E_HDR + e->klen, 8);
    return ms;
}

int pfm_get(pfm_cache *p, uint32_t page, uint64_t hash, const void *key, uint32_t klen, int touch, fmm_item *out)
{
    unsigned char *pb = PB(p, page);
    phdr *h = (phdr *)pb;
    long s = find_slot(p, pb, slot_hash_of(p, hash), key, klen, NULL);
    if (UNLIKELY(s == -2)) {
        repair(p, page, "a slot points outside the page");
        s = -1;
    }
    if (p->stats && (touch & FMM_GET_TOUCH))
        h->nreads++;
    if (s < 0)
        return FMM_ENOTFOUND;
    pent *e = (pent *)(pb + PSLOTS(pb)[s]);
    uint32_t now = pfm_now(p);
    if (is_expired(e, now) && !(touch & FMM_GET_EXPIRED))
        return FMM_ENOTFOUND;
    if ((e->flags & FC_TOMBSTONE) && !(touch & FMM_GET_TOMBSTONE))
        return FMM_ENOTFOUND;
    if (touch & FMM_GET_TOUCH) {
        e->last_access = now;
        if (p->stats)
            h->nhits++;
    }
    fill_item(p, out, e);
    return 0;
}

/* ---------- expunge ---------- */

static int cmp_access(const void *a, const void *b)
{
    uint32_t x = (*(pent *const *)a)->last_access, y = (*(pent *const *)b)->last_access;
    return x < y ? -1 : x > y;
}

static void report(const pfm_cache *p, fmm_evict_fn fn, void *ctx, pent *e)
{
    if (!fn || !(e->flags & FC_ISDIRTY) || (e->flags & FC_TOMBSTONE))
        return;
    fmm_item it;
    fill_item(p, &it, e);
    fn(ctx, &it);
}

/* The slot count expunge leaves for a table of ns slots holding nkept
 * entries that survive expiry (`used` bytes), in `mode`: Perl doubles it
 * (n -> 2n+1) when more than 30% is in use, here only as long as the
 * table leaves 3/4 of the page to data. */
static uint32_t expunge_slots(const pfm_cache *p, uint32_t ns, uint32_t nkept, uint64_t used, int mode)
{
    uint64_t data_size = p->page_size - dstart(ns);
    if ((double)nkept / ns > 0.3 && (data_size > used + ((uint64_t)ns + 1) * 4 || mode == 2)) {
        uint64_t grown = (uint64_t)ns * 2 + 1;
        /* Perl grows unconditionally here; never let the table eat the page */
        if (dstart((uint32_t)(grown < 0x3FFFFFFF ? grown : 0x3FFFFFFF)) + (uint64_t)p->page_size / 4 <= p->page_size)
            return (uint32_t)grown;
    }
    return ns;
}

/* Perl's expunge.  mode 0: expired only; 1: everything; 2: make room for a
 * store of `len` key+value bytes (len < 0: no fast path).  `need` (mode 2)
 * is the rounded size of the entries to be stored: older entries are
 * evicted until it fits even where Perl's 60% rule would stop, and until
 * `need_slots` slots are free (pfm_set_many's batch).  Returns 0, or
 * ENOMEM (nothing changed). */
static int expunge(pfm_cache *p, uint32_t page, int mode, int64_t len, uint32_t need, uint32_t need_slots,
                   fmm_evict_fn fn, void *ctx)
{
    unsigned char *pb = PB(p, page);
    phdr *h = (phdr *)pb;
    uint32_t ns = h->num_slots;
    if (mode == 2 && len >= 0) {
        double free_pct = (double)(h->free_slots - h->old_slots) / ns;
        if (free_pct > 0.3 && h->free_bytes >= ROUND4(E_HDR + (uint64_t)len) && h->free_bytes >= need)
            return 0;
    }
    uint32_t *slots = PSLOTS(pb);
    pent **list = malloc(sizeof(pent *) * (size_t)ns);
    if (!list)
        return ENOMEM;
    uint32_t nkept = 0, nout = 0;
    uint64_t used = 0;
    uint32_t now = pfm_now(p);
    /* kept entries fill list from the front, expunged ones from the back */
    for (uint32_t i = 0; i < ns; i++) {
        uint32_t v = slots[i];
        if (v <= 1)
            continue;
        pent *e = entry_at(p, pb, v);
        if (!e) {
            free(list);
            repair(p, page, "a slot points outside the page");
            return 0;
        }
        if (mode == 1 || is_expired(e, now)) {
            list[ns - 1 - nout++] = e;
            continue;
        }
        used += ROUND4(E_HDR + (uint64_t)e->klen + e->vlen);
        list[nkept++] = e;
    }
    uint32_t new_ns = expunge_slots(p, ns, nkept, used, mode);
    uint64_t data_size = p->page_size - dstart(new_ns);
    uint32_t first = 0; /* list[first..nkept) survive */
    if (mode == 2) {
        qsort(list, nkept, sizeof *list, cmp_access);
        uint64_t thresh = (uint64_t)(data_size * 0.6);
        while (first < nkept &&
               (used >= thresh || (need && data_size - used < need) || new_ns - (nkept - first) < need_slots)) {
            pent *e = list[first++];
            used -= ROUND4(E_HDR + (uint64_t)e->klen + e->vlen);
            report(p, fn, ctx, e);
        }
    }
    for (uint32_t i = 0; i < nout; i++)
        report(p, fn, ctx, list[ns - 1 - i]);
    /* compact into fresh buffers, then copy back */
    uint32_t *nslots = calloc(new_ns, sizeof(uint32_t));
    unsigned char *ndata = malloc(data_size ? data_size : 1);
    if (!nslots || !ndata) {
        free(nslots);
        free(ndata);
        free(list);
        return ENOMEM;
    }
    uint32_t off = 0;
    for (uint32_t k = first; k < nkept; k++) {
        pent *e = list[k];
        uint32_t sz = (uint32_t)ROUND4(E_HDR + (uint64_t)e->klen + e->vlen);
        uint32_t i = e->slot_hash % new_ns;
        while (nslots[i])
            if (++i == new_ns)
                i = 0;
        nslots[i] = dstart(new_ns) + off;
        memcpy(ndata + off, e, E_HDR + (size_t)e->klen + e->vlen);
        memset(ndata + off + E_HDR + e->klen + e->vlen, 0, sz - (E_HDR + e->klen + e->vlen));
        off += sz;
    }
    memcpy(pb + P_HDR, nslots, (size_t)new_ns * 4);
    memcpy(pb + dstart(new_ns), ndata, off);
    h->num_slots = new_ns;
    h->free_slots = new_ns - (nkept - first);
    h->old_slots = 0;
    h->free_data = dstart(new_ns) + off;
    h->free_bytes = p->page_size - h->free_data;
    free(nslots);
    free(ndata);
    free(list);
    return 0;
}

int pfm_expunge(pfm_cache *p, uint32_t page, int mode, fmm_evict_fn evict, void *ctx)
{
    if (UNLIKELY(!pfm_held(p, page)))
        return not_held(p, page);
    return expunge(p, page, mode == FMM_EXPUNGE_ALL ? 1 : 0, -1, 0, 0, evict, ctx);
}

/* ---------- store ---------- */

/* The modseq rules of fmm.h against the existing entry e (may be NULL). */
static int modseq_rule(const pent *e, uint32_t now, uint32_t flags, uint64_t modseq)
{
    if (!e || is_expired(e, now) || !(e->flags & FC_HASMODSEQ))
        return 0;
    uint64_t old = entry_modseq(e);
    int has = (flags & FMM_F_MODSEQ) != 0;
    int tomb = (flags & FMM_F_TYPE_MASK) == FMM_T_TOMBSTONE;
    if (e->flags & FC_TOMBSTONE) {
        if (!has)
            return FMM_EREFUSED;
        if (tomb)
            return modseq <= old ? FMM_ENOCHANGE : 0;
        return modseq < old ? FMM_EREFUSED : 0;
    }
    if (tomb)
        return modseq <= old ? FMM_ENOCHANGE : 0;
    if (has && modseq < old)
        return FMM_EREFUSED;
    return 0;
}

/* The size rule of every store (fmm_item_fits): an entry of klen + vlen
 * bytes (the stored vlen, with any modseq) fits the data area of an empty
 * page with its start_slots table.  That area is a multiple of 4, so the
 * entry's rounding never turns an item away. */
int pfm_item_fits(const pfm_cache *p, uint64_t klen, uint64_t vlen)
{
    return (uint64_t)E_HDR + klen + vlen <= (uint64_t)p->page_size - dstart(p->start_slots);
}

/* Write an entry for the key into a locked page that has room for it
 * (free bytes for `size` and a free slot): replace the key's entry if it
 * has one, else insert.  Returns 0, or FMM_ETOOBIG / FMM_ECORRUPT if the
 * room turned out not to be there (nothing changed). */
static int store(pfm_cache *p, unsigned char *pb, uint32_t sh, const void *key, uint32_t klen, const void *val,
                 uint32_t vlen, uint32_t flags, uint32_t expire_on, uint64_t modseq, uint64_t size, uint32_t now)
{
    int has_ms = (flags & FMM_F_MODSEQ) != 0;
    phdr *h = (phdr *)pb;
    long ins = -1;
    long s = find_slot(p, pb, sh, key, klen, &ins);
    if (s == -2)
        return FMM_ECORRUPT;
    if (h->free_bytes < size)
        return FMM_ETOOBIG;
    uint32_t *slots = PSLOTS(pb);
    long at;
    if (s >= 0) {
        /* replace: the old slot becomes deleted, then is reused */
        slots[s] = 1;
        h->free_slots++;
        h->old_slots++;
        at = s;
    } else {
        if (ins < 0)
            return FMM_ETOOBIG; /* no slot free (cannot happen after expunge) */
        at = ins;
    }
    if (slots[at] == 1)
        h->old_slots--;
    h->free_slots--;
    uint32_t off = h->free_data;
    pent *e = (pent *)(pb + off);
    e->last_access = now;
    e->expire_on = expire_on;
    e->slot_hash = sh;
    e->flags = to_perl_flags(flags);
    e->klen = klen;
    e->vlen = vlen + (has_ms ? 8u : 0u);
    unsigned char *d = (unsigned char *)e + E_HDR;
    memcpy(d, key, klen);
    d += klen;
    if (has_ms) {
        memcpy(d, &modseq, 8);
        d += 8;
    }
    if (vlen)
        memcpy(d, val, vlen);
    uint32_t used = E_HDR + klen + e->vlen;
    memset((unsigned char *)e + used, 0, (size_t)size - used);
    slots[at] = off;
    h->free_data = off + (uint32_t)size;
    h->free_bytes = p->page_size - h->free_data;
    return 0;
}

int pfm_set(pfm_cache *p, uint32_t page, uint64_t hash, const void *key, uint32_t klen, const void *val,
            uint32_t vlen, uint32_t flags, uint32_t expire_on, uint64_t modseq, fmm_evict_fn evict, void *ctx)
{
    if (UNLIKELY(!pfm_held(p, page)))
        return not_held(p, page);
    int has_ms = (flags & FMM_F_MODSEQ) != 0;
    if ((flags & FMM_F_TYPE_MASK) == FMM_T_TOMBSTONE && (!has_ms || vlen))
        return FMM_EBADARG;
    if (!pfm_item_fits(p, klen, (uint64_t)vlen + (has_ms ? 8u : 0u)))
        return FMM_ETOOBIG;
    uint64_t size = ROUND4(E_HDR + (uint64_t)klen + vlen + (has_ms ? 8u : 0u));
    unsigned char *pb = PB(p, page);
    uint32_t sh = slot_hash_of(p, hash);
    uint32_t now = pfm_now(p);
    /* The rules first: a refused store must not evict anything. */
    long s = find_slot(p, pb, sh, key, klen, NULL);
    if (s == -2) {
        repair(p, page, "a slot points outside the page");
        s = -1;
    }
    int rule = modseq_rule(s >= 0 ? (pent *)(pb + PSLOTS(pb)[s]) : NULL, now, flags, modseq);
    if (rule)
        return rule;
    int rc = expunge(p, page, 2, (int64_t)klen + vlen, (uint32_t)size, 0, evict, ctx);
    if (rc)
        return rc;
    rc = store(p, pb, sh, key, klen, val, vlen, flags, expire_on, modseq, size, now);
    if (rc == FMM_ECORRUPT) { /* cannot happen after a successful expunge; be safe */
        repair(p, page, "a slot points outside the page");
        rc = store(p, pb, sh, key, klen, val, vlen, flags, expire_on, modseq, size, now);
    }
    return rc == FMM_ECORRUPT ? FMM_ETOOBIG : rc;
}

/* fmm_set_many for this format (each item already passed the size rule).
 * The format has no dirty marker, so the page's magic is one for the
 * batch: it is cleared before the first item is written and restored
 * after the last, and a page found without its magic is re-initialised at
 * the next lock (by this engine; a Perl process reports the page as
 * corrupt until then).  Perl's slot tables never shrink, so the batch must
 * fit the data area this page's table leaves it (after the growth
 * expunge would apply), not that of an empty page. */
int pfm_set_many(pfm_cache *p, uint32_t page, fmm_batch_item *items, uint32_t n, uint32_t expire_on,
                 fmm_evict_fn evict, void *ctx, uint32_t *bad, uint32_t fault)
{
    if (UNLIKELY(!pfm_held(p, page)))
        return not_held(p, page);
    unsigned char *pb = PB(p, page);
    phdr *h = (phdr *)pb;
    uint32_t now = pfm_now(p);
    uint64_t total = 0;
    for (uint32_t i = 0; i < n; i++)
        total += ROUND4(E_HDR + (uint64_t)items[i].klen + items[i].vlen);
    /* The slot count expunge will leave: count the entries that survive expiry. */
    uint32_t ns = h->num_slots, nkept = 0;
    uint32_t *slots = PSLOTS(pb);
    for (uint32_t i = 0; i < ns; i++) {
        if (slots[i] <= 1)
            continue;
        pent *e = entry_at(p, pb, slots[i]);
        if (!e) {
            repair(p, page, "a slot points outside the page");
            ns = h->num_slots;
            nkept = 0;
            break;
        }
        nkept += !is_expired(e, now);
    }
    uint32_t new_ns = expunge_slots(p, ns, nkept, 0, 2);
    if ((uint64_t)n >= new_ns || total > (uint64_t)p->page_size - dstart(new_ns)) {
        detail(p, "%u items need %llu bytes with their headers, more than page %u holds (%u bytes of data, %u slots)",
               (unsigned)n, (unsigned long long)total, (unsigned)page, (unsigned)(p->page_size - dstart(new_ns)),
               (unsigned)new_ns);
        if (bad)
            *bad = n;
        return FMM_ETOOBIG;
    }
    if (n == 0)
        return 0;
    /* The tombstone rule against the page as the batch found it, before
     * expunge can evict a tombstone (a refused store changes nothing). */
    for (uint32_t i = 0; i < n; i++) {
        long s = find_slot(p, pb, slot_hash_of(p, items[i].hash), items[i].key, items[i].klen, NULL);
        items[i].rc = s >= 0 ? modseq_rule((pent *)(pb + slots[s]), now, items[i].flags & 0x7Fu, 0) : 0;
    }
    /* Room for all at once: bytes for every item as an append, and more
     * empty slots than items (a probe ends at an empty slot). */
    if (h->free_bytes < total || h->free_slots - h->old_slots <= n) {
        int rc = expunge(p, page, 2, -1, (uint32_t)total, n + 1, evict, ctx);
        if (rc)
            return rc;
        if (h->free_bytes < total || h->free_slots - h->old_slots <= n)
            return FMM_ECORRUPT; /* expunge found the page corrupt and re-initialised it */
    }
    h->magic = 0;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    for (uint32_t i = 0; i < n; i++) {
        if (UNLIKELY(fault == i + 1))
            raise(SIGKILL);
        fmm_batch_item *it = &items[i];
        if (it->rc == FMM_EREFUSED)
            continue;
        int rc = store(p, pb, slot_hash_of(p, it->hash), it->key, it->klen, it->val, it->vlen, it->flags & 0x7Fu,
                       expire_on, 0, ROUND4(E_HDR + (uint64_t)it->klen + it->vlen), now);
        if (rc) {
            /* the page changed under the lock: drop the part of the batch */
            repair(p, page, "no room left for a batch that had room");
            return FMM_ECORRUPT;
        }
        it->rc = 0;
    }
    if (UNLIKELY(fault == n + 1))
        raise(SIGKILL);
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    h->magic = P_MAGIC;
    return 0;
}

int pfm_delete(pfm_cache *p, uint32_t page, uint64_t hash, const void *key, uint32_t klen, uint32_t *old_flags)
{
    if (UNLIKELY(!pfm_held(p, page)))
        return not_held(p, page);
    unsigned char *pb = PB(p, page);
    phdr *h = (phdr *)pb;
    long s = find_slot(p, pb, slot_hash_of(p, hash), key, klen, NULL);
    if (s == -2) {
        repair(p, page, "a slot points outside the page");
        return FMM_ENOTFOUND;
    }
    if (s < 0)
        return FMM_ENOTFOUND;
    uint32_t *slots = PSLOTS(pb);
    pent *e = (pent *)(pb + slots[s]);
    int gone = is_expired(e, pfm_now(p)) || (e->flags & FC_TOMBSTONE);
    if (old_flags)
        *old_flags = from_perl_flags(p, e->flags);
    slots[s] = 1;
    h->free_slots++;
    h->old_slots++;
    return gone ? FMM_ENOTFOUND : 0;
}

int pfm_page_foreach(pfm_cache *p, uint32_t page, fmm_visit_fn fn, void *ctx)
{
    unsigned char *pb = PB(p, page);
    uint32_t ns = ((phdr *)pb)->num_slots;
    uint32_t now = pfm_now(p);
    for (uint32_t i = 0; i < ns; i++) {
        uint32_t v = PSLOTS(pb)[i];
        if (v <= 1)
            continue;
        pent *e = entry_at(p, pb, v);
        if (!e) {
            repair(p, page, "a slot points outside the page");
            return 0;
        }
        if (is_expired(e, now) || (e->flags & FC_TOMBSTONE))
            continue;
        fmm_item it;
        fill_item(p, &it, e);
        int r = fn(ctx, &it);
        if (r)
            return r;
        /* the callback must not mutate the page; re-read the table size */
        ns = ((phdr *)pb)->num_slots;
    }
    return 0;
}

void pfm_page_info_get(pfm_cache *p, uint32_t page, fmm_page_info *info)
{
    unsigned char *pb = PB(p, page);
    phdr *h = (phdr *)pb;
    memset(info, 0, sizeof *info);
    info->num_slots = h->num_slots;
    info->data_start = dstart(h->num_slots);
    info->free_data = h->free_data;
    info->nreads = h->nreads;
    info->nhits = h->nhits;
    uint32_t now = pfm_now(p);
    for (uint32_t i = 0; i < h->num_slots; i++) {
        uint32_t v = PSLOTS(pb)[i];
        if (v == 1)
            info->deleted++;
        if (v <= 1)
            continue;
        pent *e = entry_at(p, pb, v);
        if (!e)
            continue;
        info->live++;
        if (is_expired(e, now)) {
            info->expired++;
        } else {
            info->live_bytes += (uint32_t)ROUND4(E_HDR + (uint64_t)e->klen + e->vlen);
            if (e->flags & FC_TOMBSTONE) /* unexpired only, as the native count */
                info->tombstones++;
        }
    }
}

void pfm_page_clear_stats(pfm_cache *p, uint32_t page)
{
    PHD(p, page)->nreads = 0;
    PHD(p, page)->nhits = 0;
}

typedef struct span {
    uint32_t start, end;
} span;

static int cmp_span(const void *a, const void *b)
{
    uint32_t x = ((const span *)a)->start, y = ((const span *)b)->start;
    return x < y ? -1 : x > y;
}

int pfm_check_page(pfm_cache *p, uint32_t page, char *msg, size_t msglen)
{
    unsigned char *pb = PB(p, page);
    phdr *h = (phdr *)pb;
#define BAD(...)                                                                                                        \
    do {                                                                                                               \
        if (msg && msglen)                                                                                             \
            snprintf(msg, msglen, __VA_ARGS__);                                                                        \
        free(sp);                                                                                                      \
        return FMM_ECORRUPT;                                                                                           \
    } while (0)
    span *sp = NULL;
    if (h->magic != P_MAGIC)
        BAD("page %u: magic 0x%08x, expected 0x%08x", page, h->magic, P_MAGIC);
    if (!header_ok(p, h))
        BAD("page %u: header counters inconsistent (slots %u, free %u, old %u, free_data %u, free_bytes %u)", page,
            h->num_slots, h->free_slots, h->old_slots, h->free_data, h->free_bytes);
    uint32_t ns = h->num_slots, nfree = 0, nold = 0, n = 0;
    sp = malloc(sizeof(span) * (size_t)ns + 1);
    if (!sp)
        return ENOMEM;
    for (uint32_t i = 0; i < ns; i++) {
        uint32_t v = PSLOTS(pb)[i];
        if (v <= 1) {
            nfree++;
            nold += v;
            continue;
        }
        pent *e = entry_at(p, pb, v);
        if (!e)
            BAD("page %u: slot %u points at %u, outside the data area", page, i, v);
        uint32_t h32 = pfm_hash32((unsigned char *)e + E_HDR, e->klen);
        if (h32 % p->num_pages != page || h32 / p->num_pages != e->slot_hash)
            BAD("page %u: slot %u holds a key that hashes elsewhere", page, i);
        long at = find_slot(p, pb, e->slot_hash, (unsigned char *)e + E_HDR, e->klen, NULL);
        if (at != (long)i)
            BAD("page %u: slot %u is not where its key's probe finds it", page, i);
        sp[n].start = v;
        sp[n].end = v + E_HDR + e->klen + e->vlen;
        n++;
    }
    if (nfree != h->free_slots || nold != h->old_slots)
        BAD("page %u: free/old slot counts %u/%u, the table has %u/%u", page, h->free_slots, h->old_slots, nfree,
            nold);
    qsort(sp, n, sizeof *sp, cmp_span);
    for (uint32_t i = 1; i < n; i++)
        if (sp[i].start < sp[i - 1].end)
            BAD("page %u: entries at %u and %u overlap", page, sp[i - 1].start, sp[i].start);
    free(sp);
#undef BAD
    return 0;
}

/* ---------- open and close ---------- */

static int map_file(pfm_cache *p, int fd, char *err, size_t errlen)
{
    void *m = mmap(NULL, p->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (m == MAP_FAILED) {
        int rc = errno;
        snprintf(err, errlen, "mmap of %zu bytes failed: %s", p->map_len, strerror(rc));
        return rc;
    }
    p->base = m;
    return 0;
}

/* Build and initialise the file under a temporary name, then publish it
 * with link(2) (replace: rename(2)), so nobody ever maps a half-built file.
 * The temporary file is named and cleaned up as a native one (fmm.c). */
static int create(pfm_cache *p, const char *path, const fmm_config *cfg, int replace, char *err, size_t errlen)
{
    char *tmp = NULL;
    int fd = -1;
    int rc = fmm_tmp_create(path, cfg->permissions, &tmp, &fd, err, errlen);
    if (rc)
        return rc;
    if ((rc = posix_fallocate(fd, 0, (off_t)p->map_len)) != 0) {
        snprintf(err, errlen, "reserving %zu bytes for the cache file: %s", p->map_len, strerror(rc));
        goto fail;
    }
    if ((rc = map_file(p, fd, err, errlen)) != 0)
        goto fail;
    for (uint32_t i = 0; i < p->num_pages; i++)
        init_page(p, PB(p, i));
    if ((rc = fmm_tmp_publish(fd, tmp, path, replace)) != 0) {
        if (rc != EEXIST)
            snprintf(err, errlen, "publishing the new cache file failed: %s", strerror(rc));
        goto fail;
    }
    free(tmp);
    p->fd = fd;
    return 0;
fail:
    if (p->base) {
        munmap(p->base, p->map_len);
        p->base = NULL;
    }
    close(fd);
    unlink(tmp);
    free(tmp);
    return rc;
}

/* A file shorter than the cache may be one that a Perl process is still
 * creating (Perl writes its zero pages one by one, under no lock).  Such a
 * creator touches the file's mtime with every page; a file unchanged for
 * this long has none at work, and is refused without waiting. */
#define PERL_CREATOR_QUIET_NS 2000000000LL

static int recently_written(const struct stat *st)
{
    struct timespec now;
    if (clock_gettime(CLOCK_REALTIME, &now) != 0)
        return 1;
    long long age = (long long)(now.tv_sec - st->st_mtim.tv_sec) * 1000000000LL + (now.tv_nsec - st->st_mtim.tv_nsec);
    return age < PERL_CREATOR_QUIET_NS;
}

int pfm_open(const char *path, const fmm_config *cfg, pfm_cache **out, int *created, char *err, size_t errlen)
{
    char dummy[8];
    if (!err || !errlen) {
        err = dummy;
        errlen = sizeof dummy;
    }
    err[0] = 0;
    *out = NULL;
    if (created)
        *created = 0;
    if (cfg->anonymous) {
        snprintf(err, errlen, "the Perl format needs a file that Perl can open; anonymous memory is native only");
        return FMM_EBADARG;
    }
    uint32_t ps = cfg->page_size ? cfg->page_size : 65536;
    uint32_t np = cfg->num_pages ? cfg->num_pages : 89;
    uint32_t ss = cfg->start_slots ? cfg->start_slots : 89;
    if (ps < FMM_MIN_PAGE_SIZE || ps > FMM_MAX_PAGE_SIZE || (ps & 3u) || np < 1 || np > FMM_MAX_PAGES) {
        snprintf(err, errlen, "page_size %u / num_pages %u out of range", ps, np);
        return FMM_EBADARG;
    }
    if (ss < 1 || dstart(ss) + E_HDR + 4 > ps) {
        snprintf(err, errlen, "start_slots %u leaves no room for data in a %u-byte page", ss, ps);
        return FMM_EBADARG;
    }
    pthread_once(&atfork_once, install_atfork);
    pfm_cache *p = calloc(1, sizeof *p);
    if (!p)
        return ENOMEM;
    p->id = __atomic_fetch_add(&next_id, 1, __ATOMIC_RELAXED) | (1ull << 63);
    p->fd = -1;
    p->page_size = ps;
    p->num_pages = np;
    p->start_slots = ss;
    p->stats = cfg->enable_stats;
    p->value_flags = cfg->perl_value_flags;
    p->map_len = (size_t)((uint64_t)ps * np);
    p->gen = __atomic_load_n(&fork_gen, __ATOMIC_RELAXED);
    p->path = strdup(path);
    p->mx = calloc(np, sizeof(pthread_mutex_t));
    int rc = 0;
    if (!p->path || !p->mx) {
        rc = ENOMEM;
        goto fail;
    }
    for (uint32_t i = 0; i < np; i++)
        pthread_mutex_init(&p->mx[i], NULL);

    for (int attempt = 0; attempt < 200; attempt++) {
        int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
        if (fd < 0) {
            rc = errno;
            if (rc == ENOENT) {
                rc = create(p, path, cfg, 0, err, errlen);
                if (rc == EEXIST)
                    continue;
                if (rc == 0 && created)
                    *created = 1;
                goto done;
            }
            if (rc == ELOOP || rc == EMLINK)
                snprintf(err, errlen, "refusing to open a symbolic link");
            goto fail;
        }
        struct stat st;
        if (fstat(fd, &st) != 0) {
            rc = errno;
            close(fd);
            goto fail;
        }
        if (!S_ISREG(st.st_mode)) {
            rc = S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
            snprintf(err, errlen, "not a regular file");
            close(fd);
            goto fail;
        }
        /* the same rule as the native format's, before anything is read */
        if ((rc = fmm_check_trust(&st, cfg->permissions, err, errlen)) != 0) {
            close(fd);
            goto fail;
        }
        if ((uint64_t)st.st_size != p->map_len) {
            close(fd);
            if (cfg->init_file) {
                rc = create(p, path, cfg, 1, err, errlen);
                if (rc == 0 && created)
                    *created = 1;
                goto done;
            }
            if ((uint64_t)st.st_size < p->map_len && attempt < 199 && recently_written(&st)) {
                /* Perl creates its file by appending zero pages: wait for
                 * a creator still writing */
                struct timespec ts = {0, 10000000};
                nanosleep(&ts, NULL);
                continue;
            }
            rc = FMM_EGEOMETRY;
            snprintf(err, errlen,
                     "the file is %llu bytes but %u pages of %u bytes (%zu bytes) were asked for; a Perl "
                     "process given these options would delete and recreate it (pass init_file=True to do that)",
                     (unsigned long long)st.st_size, np, ps, p->map_len);
            goto fail;
        }
        if ((rc = map_file(p, fd, err, errlen)) != 0) {
            close(fd);
            goto fail;
        }
        p->fd = fd;
        if (cfg->init_file) {
            for (uint32_t i = 0; i < np; i++) {
                int lrc = pfm_lock(p, i, 5000000000LL);
                if (lrc) {
                    rc = lrc;
                    snprintf(err, errlen, "init_file: could not lock page %u", i);
                    goto fail;
                }
                init_page(p, PB(p, i));
                pfm_unlock(p, i);
            }
        }
        goto done;
    }
    rc = EAGAIN;
    snprintf(err, errlen, "the cache file kept changing while opening it");
    goto fail;
done:
    if (rc)
        goto fail;
    {
        struct stat st;
        if (fstat(p->fd, &st) == 0) {
            p->dev = st.st_dev;
            p->ino = st.st_ino;
        }
    }
    *out = p;
    return 0;
fail:
    if (p->base)
        munmap(p->base, p->map_len);
    if (p->fd >= 0)
        close(p->fd);
    if (p->mx)
        for (uint32_t i = 0; i < np; i++)
            pthread_mutex_destroy(&p->mx[i]);
    free(p->mx);
    free(p->path);
    free(p);
    return rc;
}

void pfm_close(pfm_cache *p)
{
    if (!p)
        return;
    int i = tl_find(p);
    if (i >= 0)
        pfm_unlock(p, tl_held[i].page);
    if (p->base)
        munmap(p->base, p->map_len);
    if (p->fd >= 0)
        close(p->fd);
    for (uint32_t k = 0; k < p->num_pages; k++)
        pthread_mutex_destroy(&p->mx[k]);
    free(p->mx);
    free(p->path);
    free(p);
}

int pfm_check_file(const pfm_cache *p)
{
    struct stat st;
    if (stat(p->path, &st) != 0)
        return errno == ENOENT ? FMM_EREPLACED : errno;
    if (st.st_ino != p->ino || st.st_dev != p->dev)
        return FMM_EREPLACED;
    return 0;
}
