/*
 * fuzz_fmm.c -- libFuzzer target for the engine's open, lock, read, write
 * and iterate paths on damaged cache files.
 *
 * Build and run (what `make fuzz` does):
 *   clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
 *      -Icsrc csrc/fmm.c csrc/fuzz_fmm.c -o build/fuzz_fmm -lpthread
 *   build/fuzz_fmm -max_total_time=300 build/fuzz-new tests/fuzz_corpus
 *
 * Replay without libFuzzer (what `make ctest` does, with gcc):
 *   cc -DFMM_FUZZ_REPLAY -fsanitize=address,undefined ... -o build/fuzz_replay
 *   build/fuzz_replay tests/fuzz_corpus        (directories and/or files)
 *
 * One input = one fresh cache file (created in a scratch directory made once
 * per process, under $TMPDIR, else /dev/shm, else /tmp) and a program read
 * from the input bytes:
 *
 *   byte 0      geometry: page size 1/2/4/8 KiB (bits 0-1), 1..8 pages
 *               (bits 2-4), start_slots default or 4..256 (bits 5-7)
 *   byte 1      bit 0: enable_stats; the rest picks the hash seed
 *   then ops    set / get / delete / bulk fill / foreach / expunge /
 *               check_page / page_info / clock / init_page / time / nested
 *               lock / big item / damaged lock word / stale-lock recovery /
 *               bytes damaged while open / close-damage-reopen
 *
 * "Reopen" closes the handle, applies a batch of damage records to the file
 * (byte flips and field overwrites in pages, slots and entries; file header
 * fields at offsets 0..72, optionally with the header checksum recomputed;
 * a changed geometry; a truncated file) and opens it again, so that header
 * damage has to be caught by fmm_open (FMM_EBADFILE; then init_file=1 must
 * recreate the file).
 *
 * The first PH_MUTEX bytes of each page (the process-shared mutex) are never
 * damaged at random: a mutex cannot be validated, the engine trusts it.
 * The lock-word op instead puts a mutex into the states a dead or vanished
 * owner leaves behind (owner-died bit; the TID of a thread that does not
 * exist), which the engine must recover from.  When damage changes the
 * geometry so that pages start elsewhere, fresh mutexes are written there.
 *
 * Oracles, beyond "ASan/UBSan stay quiet and nothing hangs":
 *   - while an operation runs, every page but the locked one is poisoned
 *     (ASan manual poisoning), so a read or write of a neighbouring page is
 *     reported, not only one outside the mapping;
 *   - every return code is one the contract in fmm.h allows, and a lock of
 *     a page whose mutex was not tampered with always succeeds;
 *   - every item handed out (get, foreach, eviction callback) lies inside
 *     its page;
 *   - a set that returns 0 is immediately readable with the same bytes;
 *     a store with a modseq (flag byte bit 0x80; type 6 with it: a
 *     tombstone) returns what the modseq rules of fmm.h give for the entry
 *     a peek under the same lock found, and a refused store (or one that
 *     kept an equal or newer entry) leaves that entry as it was;
 *   - tombstones are never handed out by fmm_get without
 *     FMM_GET_TOMBSTONE, by foreach or to the eviction callback;
 *     expunge(ALL) and init_page leave a page that passes fmm_check_page;
 *   - while the file has not been damaged: every page passes
 *     fmm_check_page after every operation, no page is ever repaired, and
 *     what get and foreach return agrees with a model of the last value
 *     stored under each key (eviction may drop keys, never change them);
 *   - lock-free reads: every get is first done with fmm_get_optimistic
 *     (no lock held, only that page unpoisoned), and so are all modelled
 *     keys of a page after bytes were damaged while open and after every
 *     reopen.  What it hands out lies inside its page, fmm_read_valid
 *     accepts it (no lock was taken in between: nothing moved seq), and
 *     after the page is locked it is invalid.  While the file is
 *     undamaged, the result is what the locked path finds: a hit with the
 *     same bytes, a miss where there is nothing (or an expired entry), and
 *     FMM_EAGAIN only where fmm.h allows it (statistics on, a modseq
 *     entry, a touch of a stale LRU stamp; always for a touch of an entry
 *     stamped in another second).  With a page lock held, every lock-free
 *     read is FMM_EAGAIN.
 *
 * A violated oracle aborts with a message (libFuzzer reports it as a crash).
 * FUZZ_FMM_TRACE=1 in the environment prints each step of an input.
 *
 * tests/fuzz_corpus is a minimised corpus (`make fuzz-merge`); files named
 * repro-* reproduce engine bugs the fuzzer found and are kept as they are.
 */
#define _GNU_SOURCE
#include "fmm.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

/* ---------- ASan manual poisoning (no-ops without ASan) ---------- */

#if defined(__SANITIZE_ADDRESS__)
#define FZ_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define FZ_ASAN 1
#endif
#endif
#ifdef FZ_ASAN
#include <sanitizer/asan_interface.h>
#define POISON(p, n) ASAN_POISON_MEMORY_REGION((p), (n))
#define UNPOISON(p, n) ASAN_UNPOISON_MEMORY_REGION((p), (n))
#else
#define POISON(p, n) ((void)(p), (void)(n))
#define UNPOISON(p, n) ((void)(p), (void)(n))
#endif

/* ---------- Layout facts from fmm.h's file-format description ---------- */

#define HDR_VERSION 8
#define HDR_STATE 12
#define HDR_PAGE_SIZE 20
#define HDR_NUM_PAGES 24
#define HDR_START_SLOTS 28
#define HDR_FILE_SIZE 32
#define HDR_SEED 48
#define HDR_CHECK 56 /* xxh64 (seed 0) of bytes 0..55 */
#define HDR_USED 72  /* bytes 0..71: the fields, check and repair count */
/* the mutex: 40 bytes (glibc, x86_64), padded to 64 where it is larger */
#define PH_MUTEX ((uint32_t)(sizeof(pthread_mutex_t) <= 40 ? 40 : 64))
#define PH_MAGIC PH_MUTEX             /* uint16, then uint16 dirty */
#define PH_NUM_SLOTS (PH_MUTEX + 4)
#define PH_FIELDS_END (PH_MUTEX + 32) /* after nreads, nhits */
#define PAGE_MAGIC 0x5046u /* "FP", the value fmm.c writes */
#define MAX_PAGES 256  /* damage can make a valid file of more, smaller pages */
#define MAX_PS 65536    /* ... or of fewer, bigger ones */
#define NKEYS 64
#define BASE_TIME 1000000000000ull /* unix ms */
#define DEAD_TID 0x3FFFFF00u /* above any pid_max: no such thread */

/* Removes the scratch file and directory: at exit, before an oracle's
 * abort, and (with ASan) before a sanitizer report ends the process. */
static void cleanup(void);

#define FAIL(...)                                                                                  \
    do {                                                                                           \
        fprintf(stderr, "fuzz_fmm: oracle violated at %s:%d: ", __FILE__, __LINE__);               \
        fprintf(stderr, __VA_ARGS__);                                                              \
        fputc('\n', stderr);                                                                       \
        cleanup();                                                                                 \
        abort();                                                                                   \
    } while (0)
#define EXPECT(cond, ...)                                                                          \
    do {                                                                                           \
        if (!(cond))                                                                               \
            FAIL(__VA_ARGS__);                                                                     \
    } while (0)

/* What op_lockword did to a page mutex (glibc's robust futex word). */
enum {
    LS_FREE,       /* untouched (or recovered since) */
    LS_OWNER_DIED, /* owner-died bit, no owner: the next lock gets EOWNERDEAD */
    LS_DEAD_TID,   /* names a thread that does not exist: fmm_lock_stale recovers it */
    LS_OWN_TID     /* names this thread, which does not hold it: stuck, FMM_ELOCKED */
};

/* FUZZ_FMM_TRACE=1 in the environment: print each step (to debug a find). */
static int g_trace;
#define TRACE(...)                                                                                 \
    do {                                                                                           \
        if (g_trace)                                                                               \
            fprintf(stderr, "fuzz_fmm: " __VA_ARGS__);                                             \
    } while (0)

/* ---------- Input reader: past the end, everything reads as 0 ---------- */

typedef struct {
    const uint8_t *p;
    size_t n;
} rd_t;

static uint8_t u8(rd_t *r)
{
    if (!r->n)
        return 0;
    r->n--;
    return *r->p++;
}
static uint16_t u16(rd_t *r)
{
    uint16_t v = u8(r);
    return (uint16_t)(v | (uint16_t)u8(r) << 8);
}
static uint32_t u32(rd_t *r)
{
    uint32_t v = u16(r);
    return v | (uint32_t)u16(r) << 16;
}

/* ---------- Per-process and per-input state ---------- */

static char g_dir[256];
static char g_path[300];
static pthread_mutex_t g_mutex_template; /* what a fresh page mutex looks like */
static uint8_t g_val[4 * MAX_PS];
static uint8_t g_old[MAX_PS]; /* the value a store found, to check a refusal left it */
static uint8_t g_key[2 * MAX_PS];

typedef struct {
    int present;              /* a value, or a tombstone (flags say which) */
    uint32_t vlen, flags;
    uint64_t expire_on; /* unix ms */
    uint8_t fill;
    uint64_t modseq;          /* when flags & FMM_F_MODSEQ */
} model_t;

#define TOMB_FLAGS (FMM_T_TOMBSTONE | FMM_F_MODSEQ)
#define IS_TOMB(f) (((f) & (FMM_F_TYPE_MASK | FMM_F_MODSEQ)) == TOMB_FLAGS)

static struct {
    fmm_cache *c;
    fmm_config cfg; /* what the file was created with */
    unsigned char *base;
    size_t map_len;
    uint32_t ps, np, offmask;
    uint64_t now; /* unix ms */
    uint64_t seed;            /* the fixed hash seed of this input's files */
    uint64_t repairs0;        /* fmm_repairs when the file was opened */
    int clean;                /* the file has not been damaged */
    int stop;                 /* a geometry this harness does not follow */
    uint8_t lockstate[MAX_PAGES]; /* LS_*: what op_lockword did to the mutex */
    uint8_t seq;
    model_t model[NKEYS];
} S;

static void cleanup(void)
{
    if (g_path[0])
        unlink(g_path);
    if (g_dir[0])
        rmdir(g_dir);
}

static void init_once(void)
{
    if (g_dir[0])
        return;
    /* $TMPDIR, else /dev/shm: on tmpfs an input runs several times faster
     * than on a disk file system (ext4 waits in mmap write faults). */
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = access("/dev/shm", W_OK | X_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(g_dir, sizeof g_dir, "%s/fuzz_fmm-XXXXXX", tmp);
    if (!mkdtemp(g_dir)) {
        perror("fuzz_fmm: mkdtemp");
        abort();
    }
    snprintf(g_path, sizeof g_path, "%s/cache", g_dir);
    const char *tr = getenv("FUZZ_FMM_TRACE");
    g_trace = tr && *tr && *tr != '0';
    atexit(cleanup);
#ifdef FZ_ASAN
    __sanitizer_set_death_callback(cleanup);
#endif
    /* The engine's page mutex: robust, process-shared, error-checking. */
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    pthread_mutexattr_settype(&a, PTHREAD_MUTEX_ERRORCHECK);
    pthread_mutex_init(&g_mutex_template, &a);
    pthread_mutexattr_destroy(&a);
}

/* ---------- Mapping access and poisoning ---------- */

static void adopt_handle(void)
{
    S.ps = fmm_page_size(S.c);
    S.np = fmm_num_pages(S.c);
    EXPECT(S.ps >= 1024 && (S.ps & (S.ps - 1)) == 0, "page size %u", S.ps);
    EXPECT(S.np >= 1, "num_pages %u", S.np);
    if (S.ps > MAX_PS || S.np > MAX_PAGES)
        S.stop = 1; /* valid, but beyond this harness's buffers: end the input */
    S.offmask = S.ps / 4 - 1;
    S.base = fmm_page_ptr(S.c, 0) - FMM_HEADER_SIZE;
    S.map_len = FMM_HEADER_SIZE + (size_t)S.ps * S.np;
    EXPECT(fmm_page_ptr(S.c, S.np) == NULL, "page_ptr past the end");
    fmm_set_time(S.c, S.now);
    S.repairs0 = fmm_repairs(S.c);
    /* Everything but the file header is off limits until a page is locked. */
    POISON(S.base + FMM_HEADER_SIZE, S.map_len - FMM_HEADER_SIZE);
}

static void close_handle(void)
{
    if (!S.c)
        return;
    UNPOISON(S.base, S.map_len);
    fmm_close(S.c);
    S.c = NULL;
    S.base = NULL;
}

static unsigned char *page_ptr(uint32_t p) { return S.base + FMM_HEADER_SIZE + (size_t)p * S.ps; }
static void open_page(uint32_t p) { UNPOISON(page_ptr(p), S.ps); }
static void shut_page(uint32_t p) { POISON(page_ptr(p), S.ps); }

/* ---------- Keys, values and the model ---------- */

/* Modelled key k (0..NKEYS-1): "k", k, then k%13 'x' bytes. */
static uint32_t make_key(uint32_t k, uint8_t *buf)
{
    uint32_t n = 2 + k % 13;
    buf[0] = 'k';
    buf[1] = (uint8_t)k;
    memset(buf + 2, 'x', n - 2);
    return n;
}

static int key_index(const char *key, uint32_t klen)
{
    if (klen < 2 || klen > 14 || key[0] != 'k')
        return -1;
    uint32_t k = (uint8_t)key[1];
    if (k >= NKEYS || klen != 2 + k % 13)
        return -1;
    for (uint32_t i = 2; i < klen; i++)
        if (key[i] != 'x')
            return -1;
    return (int)k;
}

static uint32_t page_of_key(const void *key, uint32_t klen, uint64_t *hash)
{
    *hash = fmm_hash(S.c, key, klen);
    uint32_t p = fmm_page_of(S.c, *hash);
    EXPECT(p < S.np, "fmm_page_of gave %u of %u", p, S.np);
    return p;
}

static uint32_t value_len(uint8_t b)
{
    return b < 192 ? b : (uint32_t)(b - 192) * (S.ps / 32);
}

/* Check that an item lies inside page p; in clean mode also against the model. */
static void check_item(uint32_t p, const fmm_item *it, const char *who)
{
    const unsigned char *lo = page_ptr(p) + FMM_PAGE_HEADER_SIZE, *hi = page_ptr(p) + S.ps;
    const unsigned char *k = (const unsigned char *)it->key, *v = (const unsigned char *)it->val;
    EXPECT(k >= lo && k <= hi && it->klen <= (size_t)(hi - k), "%s: key outside page %u", who, p);
    EXPECT(v == k + it->klen + (it->flags & FMM_F_MODSEQ ? 8 : 0), "%s: value does not follow the key (and modseq)",
           who);
    EXPECT((it->flags & FMM_F_MODSEQ) || it->modseq == 0, "%s: modseq %llu without the flag", who,
           (unsigned long long)it->modseq);
    EXPECT(!IS_TOMB(it->flags) || it->vlen == 0, "%s: tombstone with a %u-byte value", who, it->vlen);
    EXPECT(it->vlen <= (size_t)(hi - v), "%s: value runs past page %u", who, p);
    EXPECT(it->flags <= 0xFF, "%s: flags 0x%x", who, it->flags);
    /* Touch every byte: ASan reports a poisoned one. */
    volatile unsigned sum = 0;
    for (uint32_t i = 0; i < it->klen + it->vlen; i++)
        sum += k[i];
    (void)sum;
    if (!S.clean)
        return;
    int ki = key_index(it->key, it->klen);
    if (ki < 0)
        return;
    model_t *m = &S.model[ki];
    EXPECT(m->present, "%s: key %d found but it was deleted, cleared or never stored", who, ki);
    EXPECT(it->vlen == m->vlen && it->flags == m->flags && it->expire_on == m->expire_on,
           "%s: key %d is (vlen %u flags 0x%x expire %llu), stored (vlen %u flags 0x%x expire %llu)", who, ki,
           it->vlen, it->flags, (unsigned long long)it->expire_on, m->vlen, m->flags,
           (unsigned long long)m->expire_on);
    EXPECT(it->modseq == (m->flags & FMM_F_MODSEQ ? m->modseq : 0), "%s: key %d has modseq %llu, stored %llu", who,
           ki, (unsigned long long)it->modseq, (unsigned long long)m->modseq);
    for (uint32_t i = 0; i < it->vlen; i++)
        EXPECT(v[i] == m->fill, "%s: key %d value byte %u is 0x%02x, stored 0x%02x", who, ki, i, v[i], m->fill);
}

typedef struct {
    uint32_t page;
    uint32_t seen;
    uint32_t stop_after;
} visit_ctx;

static void on_evict(void *ctx, const fmm_item *it)
{
    visit_ctx *v = ctx;
    check_item(v->page, it, "evict callback");
    EXPECT(it->flags & FMM_F_DIRTY, "evict callback for a clean entry");
    EXPECT(!IS_TOMB(it->flags), "evict callback for a tombstone");
    int ki = key_index(it->key, it->klen);
    if (ki >= 0)
        S.model[ki].present = 0;
    v->seen++;
}

static int on_visit(void *ctx, const fmm_item *it)
{
    visit_ctx *v = ctx;
    check_item(v->page, it, "foreach");
    EXPECT(!(it->expire_on && S.now >= it->expire_on), "foreach visited an expired entry");
    EXPECT(!IS_TOMB(it->flags), "foreach visited a tombstone");
    v->seen++;
    EXPECT(v->seen <= S.ps / 4, "foreach visited %u entries", v->seen);
    return v->stop_after && v->seen >= v->stop_after ? 7 : 0;
}

/* ---------- Locking with the expected outcomes ---------- */

static int64_t pick_timeout(uint8_t sel, uint32_t p)
{
    switch (sel & 3) {
    case 0: return 0;
    case 1: return 1000000; /* 1 ms */
    default: return S.lockstate[p] == LS_DEAD_TID ? 0 : -1; /* never blocks forever */
    }
}

/* Lock page p (unpoisoned); returns 0 on success, -1 (page poisoned again)
 * if its lock word names this thread.  A lock word naming a dead thread
 * must refuse the lock until fmm_lock_stale recovers it. */
static int lock_page(uint32_t p, uint8_t sel)
{
    open_page(p);
    int rc = fmm_lock(S.c, p, pick_timeout(sel, p));
    TRACE("lock page %u (state %d, timeout sel %u): %d\n", p, S.lockstate[p], sel & 3, rc);
    if (S.lockstate[p] == LS_OWN_TID) {
        EXPECT(rc == FMM_ELOCKED, "fmm_lock(page %u) whose lock word names this thread: %d", p, rc);
        EXPECT(fmm_lock_stale(S.c, p) == 0, "fmm_lock_stale took a lock from a live owner");
        EXPECT(!fmm_held(S.c, p), "fmm_held after a refused lock");
        shut_page(p);
        return -1;
    }
    if (rc == 0) {
        EXPECT(S.lockstate[p] != LS_DEAD_TID, "locked page %u whose lock word names a dead thread", p);
        EXPECT(fmm_held(S.c, p), "fmm_held after lock");
        S.lockstate[p] = LS_FREE;
        return 0;
    }
    EXPECT(S.lockstate[p] == LS_DEAD_TID && (rc == FMM_EBUSY || rc == FMM_ETIMEDOUT), "fmm_lock(page %u): %d %s",
           p, rc, fmm_strerror(rc));
    EXPECT(fmm_lock_stale(S.c, p) == 1, "fmm_lock_stale did not recover page %u", p);
    S.lockstate[p] = LS_OWNER_DIED;
    rc = fmm_lock(S.c, p, pick_timeout(sel >> 2, p));
    EXPECT(rc == 0, "fmm_lock after recovery: %d %s", rc, fmm_strerror(rc));
    S.lockstate[p] = LS_FREE;
    return 0;
}

static void check_clean(uint32_t p)
{
    if (!S.clean)
        return;
    char msg[256];
    int rc = fmm_check_page(S.c, p, msg, sizeof msg);
    EXPECT(rc == 0, "undamaged page %u failed its check: %s", p, msg);
    EXPECT(fmm_repairs(S.c) == S.repairs0, "a page of an undamaged file was repaired");
}

static void unlock_page(uint32_t p)
{
    check_clean(p);
    fmm_unlock(S.c, p);
    EXPECT(!fmm_held(S.c, p), "fmm_held after unlock");
    shut_page(p);
}

/* ---------- Operations ---------- */

/* The modseq rules of fmm.h, written again from the table: what a store
 * (flags, modseq) over the existing entry `old` returns. */
static int expected_rule(const fmm_item *old, uint32_t flags, uint64_t modseq)
{
    if (!(old->flags & FMM_F_MODSEQ) || (old->expire_on && S.now >= old->expire_on))
        return 0;
    int old_tomb = IS_TOMB(old->flags);
    if (IS_TOMB(flags))
        return modseq <= old->modseq ? FMM_ENOCHANGE : 0;
    if (!(flags & FMM_F_MODSEQ))
        return old_tomb ? FMM_EREFUSED : 0;
    return modseq < old->modseq ? FMM_EREFUSED : 0;
}

/* Store under the locked page p: with fmm_set_ms if flags has FMM_F_MODSEQ
 * (type 6 then makes a tombstone, whose value is dropped unless vlen % 7 is
 * 3, to reach FMM_EBADARG), else fmm_set. */
static void do_set(uint32_t p, uint64_t hash, const uint8_t *key, uint32_t klen, uint32_t vlen, uint32_t flags,
                   uint64_t expire_on, uint64_t modseq, int ki)
{
    uint8_t fill = S.seq++;
    int ms = (flags & FMM_F_MODSEQ) != 0;
    int tomb = IS_TOMB(flags);
    if (tomb && vlen % 7 != 3)
        vlen = 0;
    if (!ms)
        modseq = 0;
    memset(g_val, fill, vlen);
    visit_ctx ev = {p, 0, 0};
    uint64_t need = ((uint64_t)FMM_ENTRY_HEADER_SIZE + klen + vlen + (ms ? 8 : 0) + 3) & ~(uint64_t)3;
    /* what is there now (a peek: no LRU change), for the rules */
    fmm_item old;
    int have = fmm_get(S.c, p, hash, key, klen, FMM_GET_EXPIRED | FMM_GET_TOMBSTONE, &old) == 0;
    if (have) {
        check_item(p, &old, "peek before set");
        memcpy(g_old, old.val, old.vlen);
    }
    int want = tomb && vlen ? FMM_EBADARG
               : need > fmm_max_item(S.c) ? FMM_ETOOBIG
               : have ? expected_rule(&old, flags, modseq)
               : 0;
    int rc = ms ? fmm_set_ms(S.c, p, hash, key, klen, g_val, vlen, flags, expire_on, modseq, on_evict, &ev)
                : fmm_set(S.c, p, hash, key, klen, g_val, vlen, flags, expire_on, on_evict, &ev);
    TRACE("set key %d (flags 0x%x modseq %llu vlen %u, %s): %d, want %d\n", ki, flags, (unsigned long long)modseq,
          vlen, have ? "over an entry" : "new", rc, want);
    EXPECT(rc == want, "fmm_set%s of %llu bytes (max %u), flags 0x%x modseq %llu over %s: %d %s, want %d", ms ? "_ms" : "",
           (unsigned long long)need, fmm_max_item(S.c), flags, (unsigned long long)modseq,
           have ? "an entry" : "nothing", rc, fmm_strerror(rc), want);
    fmm_item it;
    if (rc != 0) {
        /* nothing changed */
        int now_have = fmm_get(S.c, p, hash, key, klen, FMM_GET_EXPIRED | FMM_GET_TOMBSTONE, &it) == 0;
        EXPECT(now_have == have, "a refused store changed whether the key is there");
        if (have) {
            check_item(p, &it, "get after a refused set");
            EXPECT(it.vlen == old.vlen && it.flags == old.flags && it.modseq == old.modseq &&
                       it.expire_on == old.expire_on && memcmp(it.val, g_old, it.vlen) == 0,
                   "a refused store changed the entry");
        }
        return;
    }
    if (ki >= 0)
        S.model[ki] = (model_t){1, vlen, flags, expire_on, fill, modseq};
    rc = fmm_get(S.c, p, hash, key, klen, FMM_GET_EXPIRED | FMM_GET_TOMBSTONE, &it);
    EXPECT(rc == 0, "key just stored is not found: %d", rc);
    check_item(p, &it, "get after set");
    EXPECT(it.klen == klen && memcmp(it.key, key, klen) == 0, "get after set: another key");
    EXPECT(it.vlen == vlen && it.flags == flags && it.expire_on == expire_on && it.modseq == modseq,
           "get after set: other metadata");
    for (uint32_t i = 0; i < vlen; i++)
        EXPECT((uint8_t)it.val[i] == fill, "get after set: value byte %u", i);
    if (tomb)
        EXPECT(fmm_get(S.c, p, hash, key, klen, FMM_GET_EXPIRED, &it) == FMM_ENOTFOUND,
               "a tombstone read without FMM_GET_TOMBSTONE");
}

static uint32_t pick_key(rd_t *r, uint8_t *buf, int *ki)
{
    uint8_t b = u8(r);
    if (b < 0xF0) {
        *ki = b % NKEYS;
        return make_key((uint32_t)*ki, buf);
    }
    /* An unmodelled key, long enough to reach FMM_ETOOBIG on its own. */
    *ki = -1;
    uint32_t n = u16(r) % (2 * S.ps);
    for (uint32_t i = 0; i < n; i++)
        buf[i] = (uint8_t)(b + i * 7);
    return n;
}

/* In milliseconds: steps of 150 ms cross second boundaries, where the
 * expiry's second and its milliseconds (stored apart) both count. */
static uint64_t pick_expire(uint8_t e)
{
    if (e < 128)
        return 0;
    if (e < 192)
        return S.now + 1 + (e & 15) * 150u; /* a little later */
    if (e < 224)
        return S.now - (e & 15) * 150u; /* already expired (now >= expire_on) */
    return (uint64_t)(0xFFFFFFF0u | (e & 15)) * 1000u + (e & 15) * 61u; /* the latest there are */
}

/* ---------- Lock-free reads ---------- */

/* What a lock-free read found (the value copied to g_optval). */
typedef struct {
    int rc;
    uint32_t tok, vlen, flags, last_access;
    uint64_t expire_on;
} opt_t;
static uint8_t g_optval[MAX_PS];

/* Read key (page p, this thread holding no lock) as the binding does:
 * fmm_get_optimistic, copy, fmm_read_valid.  Only page p is unpoisoned,
 * and only for the read and the copy. */
static void opt_get(uint32_t p, uint64_t hash, const uint8_t *key, uint32_t klen, int touch, opt_t *o)
{
    fmm_item it;
    uint32_t tok = 0xFFFFFFFFu;
    open_page(p);
    int rc = fmm_get_optimistic(S.c, p, hash, key, klen, touch, &it, &tok);
    TRACE("lock-free get (page %u, touch %d): %d, token %u\n", p, touch, rc, tok);
    EXPECT(rc == 0 || rc == FMM_ENOTFOUND || rc == FMM_EAGAIN, "fmm_get_optimistic: %d %s", rc, fmm_strerror(rc));
    if (S.cfg.enable_stats)
        EXPECT(rc == FMM_EAGAIN, "fmm_get_optimistic with statistics on: %d", rc);
    memset(o, 0, sizeof *o);
    o->rc = rc;
    o->tok = tok;
    if (rc == 0) {
        check_item(p, &it, "lock-free get"); /* inside the page; in clean mode, the model's value */
        EXPECT(it.klen == klen && memcmp(it.key, key, klen) == 0, "lock-free get returned another key");
        EXPECT(!(it.flags & FMM_F_MODSEQ), "lock-free get returned a modseq entry (flags 0x%x)", it.flags);
        EXPECT(!(it.expire_on && S.now >= it.expire_on), "lock-free get returned an expired entry");
        EXPECT(!touch || it.last_access == S.now / 1000, "lock-free touch of an entry stamped at %u, now %llu ms",
               it.last_access, (unsigned long long)S.now);
        memcpy(g_optval, it.val, it.vlen);
        o->vlen = it.vlen;
        o->flags = it.flags;
        o->expire_on = it.expire_on;
        o->last_access = it.last_access;
    }
    if (rc != FMM_EAGAIN) {
        EXPECT(!(tok & 1u), "fmm_get_optimistic gave an odd token %u", tok);
        EXPECT(fmm_read_valid(S.c, p, tok) == 1, "fmm_read_valid: seq moved with no lock taken");
    }
    shut_page(p);
}

/* Lock-free reads of every modelled key that lives on page p (all pages if
 * p is S.np): after damage, nothing read may lie outside its page. */
static void opt_sweep(uint32_t p)
{
    for (uint32_t k = 0; k < NKEYS && !S.stop; k++) {
        uint8_t key[16];
        uint32_t klen = make_key(k, key);
        uint64_t hash;
        uint32_t q = page_of_key(key, klen, &hash);
        if (p < S.np && q != p)
            continue;
        opt_t o;
        opt_get(q, hash, key, klen, k & 1 ? FMM_GET_TOUCH : 0, &o);
    }
}

/* After locking page p: the token of a lock-free read taken before is
 * invalid, a lock-free read now is FMM_EAGAIN, and (undamaged file) the
 * lock-free result agrees with the locked path. */
static void opt_check_locked(uint32_t p, uint64_t hash, const uint8_t *key, uint32_t klen, int touch, const opt_t *o)
{
    if (o->rc != FMM_EAGAIN)
        EXPECT(fmm_read_valid(S.c, p, o->tok) == 0, "fmm_read_valid after the page was locked");
    fmm_item it;
    uint32_t tok;
    int rc = fmm_get_optimistic(S.c, p, hash, key, klen, touch, &it, &tok);
    EXPECT(rc == FMM_EAGAIN, "fmm_get_optimistic with a page lock held: %d", rc);
    if (!S.clean)
        return;
    /* what is there, expired entries and tombstones included (a peek) */
    int found = fmm_get(S.c, p, hash, key, klen, FMM_GET_EXPIRED | FMM_GET_TOMBSTONE, &it) == 0;
    int ms = found && (it.flags & FMM_F_MODSEQ);
    int live = found && !(it.expire_on && S.now >= it.expire_on);
    int want_hit = live && !ms;
    if (S.cfg.enable_stats)
        return; /* always FMM_EAGAIN, checked above */
    if (o->rc == 0) {
        EXPECT(want_hit, "lock-free hit, but the locked path finds %s", found ? "an expired or modseq entry" : "nothing");
        EXPECT(it.vlen == o->vlen && it.flags == o->flags && it.expire_on == o->expire_on &&
                   memcmp(it.val, g_optval, it.vlen) == 0,
               "lock-free hit (vlen %u flags 0x%x) differs from the locked one (vlen %u flags 0x%x)", o->vlen,
               o->flags, it.vlen, it.flags);
    } else if (o->rc == FMM_ENOTFOUND) {
        EXPECT(!found || (!live && !ms), "lock-free miss, but the locked path finds %s",
               ms ? "a modseq entry" : "a live entry");
    } else { /* FMM_EAGAIN: a modseq entry, or a touch whose stamp is stale */
        EXPECT(ms || (touch && want_hit), "lock-free read FMM_EAGAIN without a reason (%s, touch %d)",
               found ? (live ? "a live entry" : "an expired entry") : "no entry", touch);
    }
    if (touch && want_hit && it.last_access != S.now / 1000)
        EXPECT(o->rc == FMM_EAGAIN, "lock-free touch of an entry stamped at %u, now %llu ms: %d", it.last_access,
               (unsigned long long)S.now, o->rc);
}

static void op_key(rd_t *r, int kind, uint8_t op)
{
    uint8_t *key = g_key;
    int ki;
    uint32_t klen = pick_key(r, key, &ki);
    uint64_t hash;
    uint32_t p = page_of_key(key, klen, &hash);
    int touch = 0;
    opt_t o = {FMM_EAGAIN, 0, 0, 0, 0, 0};
    if (kind == 1) {
        /* a get: first without the lock (its byte is read first: locking
         * reads none, so inputs keep their meaning) */
        touch = u8(r) & 7;
        opt_get(p, hash, key, klen, touch & FMM_GET_TOUCH, &o);
    }
    if (lock_page(p, op >> 5))
        return;
    if (kind == 0) { /* set */
        uint32_t vlen = value_len(u8(r));
        uint32_t flags = u8(r);
        uint64_t expire_on = pick_expire(u8(r));
        uint64_t modseq = 0;
        if (flags & FMM_F_MODSEQ) { /* small numbers, so that they compare; sometimes the extremes */
            uint8_t m = u8(r);
            modseq = m < 240 ? m % 16 : m & 1 ? UINT64_MAX - (m & 7) : (1ull << 63) + (m & 7);
        }
        do_set(p, hash, key, klen, vlen, flags, expire_on, modseq, ki);
    } else if (kind == 1) { /* get */
        opt_check_locked(p, hash, key, klen, touch & FMM_GET_TOUCH, &o);
        fmm_item it;
        int rc = fmm_get(S.c, p, hash, key, klen, touch, &it);
        EXPECT(rc == 0 || rc == FMM_ENOTFOUND, "fmm_get: %d", rc);
        if (rc == 0) {
            check_item(p, &it, "get");
            EXPECT(it.klen == klen && memcmp(it.key, key, klen) == 0, "get returned another key");
            if (!(touch & FMM_GET_EXPIRED))
                EXPECT(!(it.expire_on && S.now >= it.expire_on), "get returned an expired entry");
            if (!(touch & FMM_GET_TOMBSTONE))
                EXPECT(!IS_TOMB(it.flags), "get returned a tombstone");
        }
    } else { /* delete */
        uint32_t old_flags = 0xdead;
        fmm_item old;
        int have = fmm_get(S.c, p, hash, key, klen, FMM_GET_EXPIRED | FMM_GET_TOMBSTONE, &old) == 0;
        int gone = !have || (old.expire_on && S.now >= old.expire_on) || IS_TOMB(old.flags);
        int rc = fmm_delete(S.c, p, hash, key, klen, &old_flags);
        EXPECT(rc == 0 || rc == FMM_ENOTFOUND, "fmm_delete: %d", rc);
        if (S.clean) /* expired entries and tombstones are removed as "not found" */
            EXPECT(rc == (gone ? FMM_ENOTFOUND : 0), "fmm_delete of %s: %d", have ? "an entry" : "nothing", rc);
        if (rc == 0)
            EXPECT(old_flags <= 0xFF, "fmm_delete: old flags 0x%x", old_flags);
        if (ki >= 0)
            S.model[ki].present = 0;
        fmm_item it;
        if (S.clean)
            EXPECT(fmm_get(S.c, p, hash, key, klen, FMM_GET_EXPIRED | FMM_GET_TOMBSTONE, &it) == FMM_ENOTFOUND,
                   "key found after delete");
    }
    unlock_page(p);
}

/* The modelled keys among n that share a page with key vb % NKEYS, stored
 * with one fmm_set_many: all of them or none, checked against the sizes
 * (each item, then the batch against an empty page) and the model. */
static void fill_batch(uint32_t n, uint8_t vb, uint8_t fb, uint8_t eb)
{
    static fmm_batch_item items[64];
    static uint8_t keys[64][16];
    static fmm_item had_it[64];
    int kis[64], had[64], rule[64];
    uint8_t fills[64], first[64];
    uint64_t h;
    uint32_t p = page_of_key(keys[0], make_key((uint32_t)vb % NKEYS, keys[0]), &h);
    uint32_t m = 0;
    size_t off = 0;
    for (uint32_t i = 0; i < n; i++) {
        int k = (int)((vb + i * 5) % NKEYS), dup = 0;
        for (uint32_t j = 0; j < m; j++)
            dup |= kis[j] == k;
        uint32_t klen = make_key((uint32_t)k, keys[m]);
        uint32_t vlen = value_len((uint8_t)((vb + i * 13) % 200));
        if (dup || page_of_key(keys[m], klen, &h) != p || off + vlen > sizeof g_val)
            continue;
        fills[m] = S.seq++;
        memset(g_val + off, fills[m], vlen);
        items[m] = (fmm_batch_item){h, keys[m], g_val + off, klen, vlen, (fb + i) & 0x7Fu, -1};
        kis[m++] = k;
        off += vlen;
    }
    if (lock_page(p, 0))
        return;
    uint32_t exp = pick_expire(eb);
    int want = 0;
    uint32_t want_bad = UINT32_MAX;
    uint64_t total = 0;
    for (uint32_t j = 0; j < m; j++) {
        had[j] = fmm_get(S.c, p, items[j].hash, keys[j], items[j].klen, FMM_GET_EXPIRED | FMM_GET_TOMBSTONE,
                         &had_it[j]) == 0;
        if (had[j])
            check_item(p, &had_it[j], "peek before set_many");
        first[j] = had[j] && had_it[j].vlen ? (uint8_t)had_it[j].val[0] : 0;
        rule[j] = had[j] ? expected_rule(&had_it[j], items[j].flags, 0) : 0;
        uint64_t need = ((uint64_t)FMM_ENTRY_HEADER_SIZE + items[j].klen + items[j].vlen + 3) & ~(uint64_t)3;
        if (!want && need > fmm_max_item(S.c)) {
            want = FMM_ETOOBIG;
            want_bad = j;
        }
        total += need;
    }
    uint32_t ns = 4; /* the fewest slots for m entries at load 3/4 */
    while ((uint64_t)ns * 3 < (uint64_t)m * 4 + 2)
        ns *= 2;
    if (!want && (ns > (S.ps - FMM_PAGE_HEADER_SIZE) / 4 || total + FMM_PAGE_HEADER_SIZE + 4ull * ns > S.ps)) {
        want = FMM_ETOOBIG;
        want_bad = m;
    }
    visit_ctx ev = {p, 0, 0};
    uint32_t bad = UINT32_MAX;
    int rc = fmm_set_many(S.c, p, items, m, exp, on_evict, &ev, &bad);
    TRACE("set_many of %u keys in page %u: %d, want %d\n", m, p, rc, want);
    EXPECT(rc == want || (!S.clean && !want && rc == FMM_ECORRUPT), "fmm_set_many of %u items (%llu bytes): %d %s, want %d",
           m, (unsigned long long)total, rc, fmm_strerror(rc), want);
    if (rc == FMM_ETOOBIG)
        EXPECT(bad == want_bad, "fmm_set_many: bad item %u, want %u", bad, want_bad);
    for (uint32_t j = 0; j < m && (rc == 0 || rc == FMM_ETOOBIG); j++) {
        fmm_item it;
        int have = fmm_get(S.c, p, items[j].hash, keys[j], items[j].klen, FMM_GET_EXPIRED | FMM_GET_TOMBSTONE,
                           &it) == 0;
        if (rc == 0 && items[j].rc == 0) {
            EXPECT(rule[j] == 0 || !S.clean, "fmm_set_many stored key %d over a tombstone", kis[j]);
            S.model[kis[j]] = (model_t){1, items[j].vlen, items[j].flags, exp, fills[j], 0};
            EXPECT(have, "fmm_set_many: key %d of the batch is not found", kis[j]);
            if (have) {
                check_item(p, &it, "get after set_many");
                EXPECT(it.vlen == items[j].vlen && (it.vlen == 0 || (uint8_t)it.val[0] == fills[j]),
                       "fmm_set_many: key %d holds another value", kis[j]);
            }
        } else {
            /* refused, or the batch was: the key is as it was (a refused
             * item's tombstone may have been evicted to make room) */
            EXPECT(rc != 0 || items[j].rc == FMM_EREFUSED, "fmm_set_many: item rc %d", items[j].rc);
            EXPECT(rc != 0 || rule[j] == FMM_EREFUSED || !S.clean, "fmm_set_many refused key %d", kis[j]);
            EXPECT(have == had[j] || (rc == 0 && !have), "a refused fmm_set_many changed whether key %d is there",
                   kis[j]);
            if (have && had[j])
                EXPECT(it.vlen == had_it[j].vlen && it.flags == had_it[j].flags &&
                           it.expire_on == had_it[j].expire_on && (it.vlen == 0 || (uint8_t)it.val[0] == first[j]),
                       "a refused fmm_set_many changed key %d", kis[j]);
        }
    }
    unlock_page(p);
}

/* Store many modelled keys at once, so that pages fill and evict; with the
 * top bit of the count byte, as one fmm_set_many batch. */
static void op_fill(rd_t *r)
{
    uint8_t nb = u8(r);
    uint32_t n = nb % 64 + 1;
    uint8_t vb = u8(r), fb = u8(r), eb = u8(r);
    if (nb & 0x80) {
        fill_batch(n, vb, fb, eb);
        return;
    }
    for (uint32_t i = 0; i < n; i++) {
        uint32_t k = (vb + i * 5) % NKEYS;
        uint8_t key[16];
        uint32_t klen = make_key(k, key);
        uint64_t hash;
        uint32_t p = page_of_key(key, klen, &hash);
        if (lock_page(p, 0))
            continue;
        do_set(p, hash, key, klen, value_len((uint8_t)(vb + i * 13) % 200), (fb + i) & 0xFF,
               i % 4 == 0 ? pick_expire(eb) : 0, (uint64_t)((eb + i) & 7), (int)k);
        unlock_page(p);
    }
}

static void model_forget_page(uint32_t p)
{
    for (uint32_t k = 0; k < NKEYS; k++) {
        uint8_t key[16];
        uint32_t klen = make_key(k, key);
        uint64_t hash;
        if (page_of_key(key, klen, &hash) == p)
            S.model[k].present = 0;
    }
}

static void op_page(rd_t *r, int kind, uint8_t op)
{
    uint32_t p = u8(r) % S.np;
    uint8_t arg = u8(r);
    if (lock_page(p, op >> 5))
        return;
    char msg[256];
    switch (kind) {
    case 0: { /* foreach */
        visit_ctx v = {p, 0, arg % 8};
        int rc = fmm_page_foreach(S.c, p, on_visit, &v);
        EXPECT(rc == 0 || (rc == 7 && v.stop_after && v.seen == v.stop_after), "foreach: %d", rc);
        break;
    }
    case 1: { /* expunge */
        visit_ctx v = {p, 0, 0};
        int mode = arg & 1 ? FMM_EXPUNGE_ALL : FMM_EXPUNGE_EXPIRED;
        int rc = fmm_expunge(S.c, p, mode, on_evict, &v);
        EXPECT(rc == 0, "fmm_expunge: %d", rc);
        if (mode == FMM_EXPUNGE_ALL) {
            model_forget_page(p);
            EXPECT(fmm_check_page(S.c, p, msg, sizeof msg) == 0, "page %u invalid after expunge(ALL): %s", p, msg);
            fmm_page_info info;
            fmm_page_info_get(S.c, p, &info);
            EXPECT(info.live == 0 && info.deleted == 0, "expunge(ALL) left %u live, %u deleted", info.live,
                   info.deleted);
        }
        break;
    }
    case 2: { /* check_page */
        int rc = fmm_check_page(S.c, p, arg & 1 ? msg : NULL, arg & 1 ? sizeof msg : 0);
        EXPECT(rc == 0 || rc == FMM_ECORRUPT, "fmm_check_page: %d", rc);
        if (rc == FMM_ECORRUPT && (arg & 1))
            EXPECT(msg[0], "fmm_check_page failed without a message");
        break;
    }
    case 3: { /* page_info */
        fmm_page_info info;
        fmm_page_info_get(S.c, p, &info);
        uint32_t ns = info.num_slots;
        EXPECT(ns >= 4 && (ns & (ns - 1)) == 0 && info.data_start == FMM_PAGE_HEADER_SIZE + 4 * ns &&
                   info.data_start <= S.ps && info.free_data <= S.ps && info.live <= ns &&
                   info.expired <= info.live && info.tombstones <= info.live - info.expired &&
                   /* damaged slots can count one entry twice */
                   (!S.clean || info.live_bytes <= S.ps - info.data_start),
               "page_info: slots %u live %u expired %u tombstones %u data_start %u free_data %u live_bytes %u", ns,
               info.live, info.expired, info.tombstones, info.data_start, info.free_data, info.live_bytes);
        if (arg & 1)
            fmm_page_clear_stats(S.c, p);
        break;
    }
    case 4: { /* LRU clock near or past the renumbering point */
        static const uint32_t clocks[] = {0xEFFFFFFFu, 0xF0000000u, 0xF0000001u, 0xFFFFFFFEu, 0xFFFFFFFFu, 0, 1, 2};
        fmm_set_page_clock(S.c, p, clocks[arg % 8]);
        break;
    }
    case 5: /* init_page */
        fmm_init_page(S.c, p);
        model_forget_page(p);
        EXPECT(fmm_check_page(S.c, p, msg, sizeof msg) == 0, "page %u invalid after init_page: %s", p, msg);
        break;
    }
    unlock_page(p);
}

/* A thread holds at most one page of a cache: the second lock is refused
 * without touching that page (it stays poisoned). */
static void op_nested(rd_t *r, uint8_t op)
{
    uint32_t p = u8(r) % S.np, q = u8(r) % S.np;
    if (lock_page(p, op >> 5))
        return;
    int rc = fmm_lock(S.c, q, 0);
    EXPECT(rc == FMM_ELOCKED, "second lock (pages %u then %u): %d", p, q, rc);
    EXPECT(fmm_held(S.c, q) == (p == q), "fmm_held of the other page");
    /* no lock-free read while this thread holds a page lock, of any page */
    uint8_t key[16];
    uint32_t klen = make_key((p * 7 + q) % NKEYS, key);
    uint64_t hash;
    uint32_t kp = page_of_key(key, klen, &hash);
    if (kp != p)
        open_page(kp);
    fmm_item it;
    uint32_t tok;
    rc = fmm_get_optimistic(S.c, kp, hash, key, klen, 0, &it, &tok);
    EXPECT(rc == FMM_EAGAIN, "fmm_get_optimistic of page %u with page %u locked: %d", kp, p, rc);
    if (kp != p)
        shut_page(kp);
    unlock_page(p);
}

static void op_big(rd_t *r)
{
    uint8_t key[16];
    int ki = u8(r) % NKEYS;
    uint32_t klen = make_key((uint32_t)ki, key);
    uint32_t max = fmm_max_item(S.c);
    EXPECT(max == S.ps - FMM_PAGE_HEADER_SIZE - 16, "fmm_max_item %u for page size %u", max, S.ps);
    uint32_t vlen = max - FMM_ENTRY_HEADER_SIZE - klen + (u8(r) & 7) - 3; /* around the limit */
    uint64_t hash;
    uint32_t p = page_of_key(key, klen, &hash);
    if (lock_page(p, 0))
        return;
    uint8_t flags = u8(r);
    do_set(p, hash, key, klen, vlen, flags, 0, (uint64_t)((flags >> 3) & 3), ki);
    unlock_page(p);
}

/* Put a page mutex in the state a vanished owner leaves.  glibc keeps the
 * futex word (owner TID | FUTEX_WAITERS | FUTEX_OWNER_DIED) first. */
static void op_lockword(rd_t *r)
{
    uint32_t p = u8(r) % S.np;
    uint8_t mode = u8(r) % 4;
    TRACE("lock word of page %u: mode %u\n", p, mode);
    open_page(p);
    pthread_mutex_t *m = (pthread_mutex_t *)page_ptr(p);
#ifdef __GLIBC__
    uint32_t word;
    memcpy(&word, m, 4);
    if (word == 0) { /* never over a lock word another state already uses */
        m->__data.__owner = (int)DEAD_TID;
        m->__data.__nusers = 1;
        if (mode == 0) {
            m->__data.__lock = 0x40000000; /* FUTEX_OWNER_DIED: the kernel saw the owner die */
            S.lockstate[p] = LS_OWNER_DIED;
        } else if (mode == 3) {
            m->__data.__lock = (int)gettid(); /* e.g. a TID reused after its owner died elsewhere */
            m->__data.__owner = (int)gettid();
            S.lockstate[p] = LS_OWN_TID;
        } else {
            m->__data.__lock = (int)(DEAD_TID | (mode == 2 ? 0x80000000u : 0)); /* owner gone, unnoticed */
            S.lockstate[p] = LS_DEAD_TID;
        }
    }
#else
    (void)m;
    (void)mode;
#endif
    shut_page(p);
}

static void op_stale(rd_t *r)
{
    uint32_t p = u8(r) % S.np;
    open_page(p);
    int rc = fmm_lock_stale(S.c, p);
    /* a free lock or a live owner's is left alone; a dead owner's is marked owner-died */
    int want = S.lockstate[p] == LS_OWNER_DIED || S.lockstate[p] == LS_DEAD_TID;
    EXPECT(rc == want, "fmm_lock_stale(page %u) in state %d: %d", p, S.lockstate[p], rc);
    if (rc)
        S.lockstate[p] = LS_OWNER_DIED;
    shut_page(p);
}

static const uint32_t *interesting(void)
{
    static uint32_t v[32];
    uint32_t ps = S.ps;
    uint32_t t[32] = {0,          1,          2,           3,          4,          5,          7,
                      8,          64,         127,         128,        129,        ps / 4 - 1, ps / 4,
                      ps / 2,     ps - 64,    ps - 20,     ps - 4,     ps - 1,     ps,         ps + 4,
                      0x00FFFFFF, 0x01000000, 0x7FFFFFFF, 0x80000000, 0xF0000000, 0xFFFFFFF0, 0xFFFFFFFC,
                      0xFFFFFFFF, PAGE_MAGIC, 0x10000,    ps * 2};
    memcpy(v, t, sizeof t);
    return v;
}

/* A value to damage a field with: boundary values relative to the page
 * size, powers of two (slot counts must be one), raw words, small numbers. */
static uint32_t pick_u32(rd_t *r)
{
    uint8_t s = u8(r);
    if (s < 96)
        return interesting()[s % 32];
    if (s < 128)
        return 1u << (s & 31);
    if (s < 192)
        return u32(r);
    return s - 192u;
}

/* Damage an open page's bytes (no lock held: as another process might):
 * a page header field, or any word past the mutex. */
static void op_runtime_damage(rd_t *r)
{
    uint32_t p = u8(r) % S.np;
    uint16_t where = u16(r);
    uint32_t off = where & 1 ? PH_MAGIC + (uint32_t)(where >> 1) % ((PH_FIELDS_END - PH_MAGIC) / 4) * 4
                             : PH_MUTEX + (where % (S.ps - PH_MUTEX)) / 4 * 4;
    uint32_t v = pick_u32(r);
    open_page(p);
    memcpy(page_ptr(p) + off, &v, 4);
    shut_page(p);
    S.clean = 0;
    opt_sweep(p); /* read the damaged page without its lock */
}

/* ---------- Damage to the closed file, then reopen ---------- */

typedef struct {
    int fd;
    off_t size;
    int shrunk; /* truncated at some point: mutexes may be zeroed */
} file_t;

static int f_read(file_t *f, off_t off, void *buf, size_t n)
{
    if (off < 0 || off + (off_t)n > f->size)
        return -1;
    return pread(f->fd, buf, n, off) == (ssize_t)n ? 0 : -1;
}
static void f_write(file_t *f, off_t off, const void *buf, size_t n)
{
    if (off < 0 || off + (off_t)n > f->size)
        return;
    if (pwrite(f->fd, buf, n, off) != (ssize_t)n)
        FAIL("pwrite: %s", strerror(errno));
}
/* Write inside page [pg, pg+ps) but never over its mutex or the next page. */
static void f_page_write(file_t *f, off_t pg, uint32_t ps, uint64_t rel, const void *buf, size_t n)
{
    if (rel >= PH_MUTEX && rel + n <= ps)
        f_write(f, pg + (off_t)rel, buf, n);
}
static void f_fix_check(file_t *f)
{
    unsigned char h[HDR_CHECK];
    if (f_read(f, 0, h, sizeof h))
        return;
    uint64_t check = fmm_xxh64(h, sizeof h, 0);
    f_write(f, HDR_CHECK, &check, 8);
}

static int file_open(file_t *f)
{
    f->fd = open(g_path, O_RDWR | O_CLOEXEC);
    if (f->fd < 0)
        FAIL("open %s: %s", g_path, strerror(errno));
    struct stat st;
    if (fstat(f->fd, &st) != 0)
        FAIL("fstat: %s", strerror(errno));
    f->size = st.st_size;
    f->shrunk = 0;
    return 0;
}

/* The slot count a page header claims, if plausible (else 4). */
static uint32_t f_num_slots(file_t *f, off_t pg, uint32_t ps)
{
    uint32_t ns = 0;
    f_read(f, pg + PH_NUM_SLOTS, &ns, 4);
    if (ns < 4 || (ns & (ns - 1)) || FMM_PAGE_HEADER_SIZE + 4ull * ns > ps)
        ns = 4;
    return ns;
}

/* Apply one damage record under the geometry the file had (ps, np). */
static void damage_one(rd_t *r, file_t *f, uint32_t ps, uint32_t np)
{
    uint8_t kind = u8(r) % 9;
    uint32_t p = u8(r) % np;
    off_t pg = FMM_HEADER_SIZE + (off_t)p * ps;
    uint32_t offmask = ps / 4 - 1;
    TRACE("damage kind %u, page %u\n", kind, p);
    switch (kind) {
    case 0: { /* xor one byte anywhere in a page past the mutex */
        off_t off = pg + PH_MUTEX + u16(r) % (ps - PH_MUTEX);
        uint8_t b, x = u8(r);
        if (!f_read(f, off, &b, 1)) {
            b ^= x ? x : 0x80;
            f_write(f, off, &b, 1);
        }
        break;
    }
    case 1: { /* a 4-byte word in a page */
        uint32_t rel = PH_MUTEX + (u16(r) % (ps - PH_MUTEX)) / 4 * 4;
        uint32_t v = pick_u32(r);
        f_page_write(f, pg, ps, rel, &v, 4);
        break;
    }
    case 2: { /* a page header field: magic+dirty, num_slots, live, seq, free_data, clock, deleted, nreads */
        uint32_t rel = PH_MAGIC + (u8(r) % ((PH_FIELDS_END - PH_MAGIC) / 4)) * 4;
        uint32_t v = pick_u32(r);
        f_page_write(f, pg, ps, rel, &v, 4);
        break;
    }
    case 3: { /* a slot: any value, a real key's tag with a chosen offset, or a copy of another slot */
        uint32_t ns = f_num_slots(f, pg, ps);
        uint32_t idx = u16(r) % ns;
        uint8_t sel = u8(r);
        uint32_t v = 0;
        if (sel % 3 == 1) {
            uint8_t key[16];
            uint32_t klen = make_key((sel >> 2) % NKEYS, key);
            uint32_t lo = (uint32_t)fmm_key_hash(key, klen, S.seed);
            v = (lo & ~offmask) | ((pick_u32(r) >> 2) & offmask);
        } else if (sel % 3 == 2) {
            f_read(f, pg + FMM_PAGE_HEADER_SIZE + 4 * (off_t)((idx + 1 + sel / 3) % ns), &v, 4);
        } else {
            v = pick_u32(r);
        }
        f_page_write(f, pg, ps, FMM_PAGE_HEADER_SIZE + 4ull * idx, &v, 4);
        break;
    }
    case 4: { /* a field of the entry the n-th used slot points at, or a key/value byte */
        uint32_t ns = f_num_slots(f, pg, ps);
        uint32_t want = u8(r), field = u8(r);
        uint32_t v = pick_u32(r);
        for (uint32_t i = 0; i < ns; i++) {
            uint32_t s = 0;
            f_read(f, pg + FMM_PAGE_HEADER_SIZE + 4 * (off_t)i, &s, 4);
            if (s <= 1)
                continue;
            if (want) {
                want--;
                continue;
            }
            uint64_t off = (uint64_t)(s & offmask) << 2;
            if (field < FMM_ENTRY_HEADER_SIZE) /* access, last_access, expire_on, klen_flags, vlen */
                f_page_write(f, pg, ps, off + field / 4 * 4, &v, 4);
            else
                f_page_write(f, pg, ps, off + field, &v, 1);
            break;
        }
        break;
    }
    case 5: { /* a file header field (offsets 0..71) */
        off_t off = u8(r) % (HDR_USED / 4) * 4;
        uint32_t v = pick_u32(r);
        f_write(f, off, &v, 4);
        break;
    }
    case 6: /* recompute the header checksum, so that the field checks must catch it */
        f_fix_check(f);
        break;
    case 7: { /* a different, self-consistent geometry (pages start elsewhere) */
        uint8_t g = u8(r);
        uint32_t nps = 1024u << (g & 3), nnp = 1 + ((g >> 2) & 7);
        uint64_t size = FMM_HEADER_SIZE + (uint64_t)nps * nnp;
        uint32_t slots = 0;
        f_read(f, HDR_START_SLOTS, &slots, 4);
        if (g & 0x20)
            slots = 4u << ((g >> 6) & 3);
        if (ftruncate(f->fd, (off_t)size) == 0) {
            f->shrunk |= (off_t)size < f->size;
            f->size = (off_t)size;
        }
        f_write(f, HDR_PAGE_SIZE, &nps, 4);
        f_write(f, HDR_NUM_PAGES, &nnp, 4);
        f_write(f, HDR_START_SLOTS, &slots, 4);
        f_write(f, HDR_FILE_SIZE, &size, 8);
        f_fix_check(f);
        break;
    }
    case 8: { /* a truncated or extended file */
        off_t size = f->size;
        uint8_t how = u8(r);
        size = how & 1 ? size - 1 - (how >> 1) * 64 : size + 1 + (how >> 1) * 64;
        if (size < 0)
            size = 0;
        if (ftruncate(f->fd, size) == 0) {
            f->shrunk |= size < f->size;
            f->size = size;
        }
        break;
    }
    }
}

/* If the header now describes pages that start elsewhere, or the file was
 * cut short (and maybe extended again with zeros), the first PH_MUTEX bytes of a
 * page may not be a mutex: put fresh ones there (a mutex can't be
 * validated, the engine trusts it).  Returns 1 if it did. */
static int fresh_mutexes(file_t *f, uint32_t ps, uint32_t np)
{
    uint32_t nps = 0, nnp = 0;
    if (f_read(f, HDR_PAGE_SIZE, &nps, 4) || f_read(f, HDR_NUM_PAGES, &nnp, 4))
        return f->shrunk;
    if (nps == ps && nnp == np && !f->shrunk)
        return 0;
    if (nps < 1024 || (nps & (nps - 1)))
        return 1; /* fmm_open refuses it */
    for (uint64_t p = 0; p < nnp && FMM_HEADER_SIZE + p * nps < (uint64_t)f->size; p++)
        f_write(f, FMM_HEADER_SIZE + (off_t)(p * nps), &g_mutex_template, sizeof g_mutex_template);
    return 1;
}

/* Give the file this input's fixed hash seed (the engine picks a random
 * one), so that an input always maps its keys to the same pages and slots. */
static void fix_seed(void)
{
    file_t f;
    file_open(&f);
    f_write(&f, HDR_SEED, &S.seed, 8);
    f_fix_check(&f);
    close(f.fd);
}

/* fmm_open the file with sizes ps x np (for a file the call creates or
 * re-initialises, and to compare with when explicit); a file the call
 * created gets the fixed seed first. */
static int reopen(int init_file, int explicit_geometry, uint32_t ps, uint32_t np)
{
    fmm_config cfg = S.cfg;
    cfg.page_size = ps;
    cfg.num_pages = np;
    cfg.init_file = init_file;
    cfg.explicit_geometry = explicit_geometry ? FMM_GEOM_PAGE_SIZE | FMM_GEOM_NUM_PAGES : 0;
    /* without explicit_geometry an existing file's sizes are adopted; the
     * sizes given are for a file this call creates */
    int created = -1;
    char err[256];
    int rc = fmm_open(g_path, &cfg, &S.c, &created, err, sizeof err);
    TRACE("fmm_open(init_file %d, explicit %d, %u x %u): %d created %d %s\n", init_file, explicit_geometry, np, ps,
          rc, created, err);
    if (rc != 0) {
        EXPECT(S.c == NULL, "fmm_open failed but gave a handle");
        EXPECT(err[0], "fmm_open failed (%d %s) without a detail message", rc, fmm_strerror(rc));
        return rc;
    }
    EXPECT(created == 0 || created == 1, "created flag %d", created);
    int fresh = created || init_file;
    if (created) {
        fmm_close(S.c);
        S.c = NULL;
        fix_seed();
        cfg.init_file = 0;
        cfg.explicit_geometry = FMM_GEOM_PAGE_SIZE | FMM_GEOM_NUM_PAGES;
        rc = fmm_open(g_path, &cfg, &S.c, &created, err, sizeof err);
        EXPECT(rc == 0 && created == 0, "reopening a new file: %d %s", rc, fmm_strerror(rc));
    }
    if (fresh) {
        /* a new file, or every page re-initialised in place (which also
         * took and released every page lock) */
        S.clean = 1;
        memset(S.model, 0, sizeof S.model);
        memset(S.lockstate, 0, sizeof S.lockstate);
    }
    adopt_handle();
    return 0;
}

static void op_reopen(rd_t *r)
{
    uint32_t ps = S.ps, np = S.np;
    uint8_t ctl = u8(r);
    uint32_t nrec = ctl % 8;
    close_handle();
    file_t f;
    file_open(&f);
    for (uint32_t i = 0; i < nrec; i++)
        damage_one(r, &f, ps, np);
    if (fresh_mutexes(&f, ps, np))
        memset(S.lockstate, 0, sizeof S.lockstate);
    close(f.fd);
    TRACE("reopen after %u damage records, %zu bytes left\n", nrec, r->n);
    if (nrec) {
        S.clean = 0;
        memset(S.model, 0, sizeof S.model);
    }
    int direct_init = (ctl >> 5) & 1;
    for (uint32_t p = 0; p < MAX_PAGES; p++)
        if (S.lockstate[p] == LS_DEAD_TID)
            direct_init = 0; /* fmm_open would wait a second for that lock */
    int rc = reopen(direct_init, (ctl >> 3) & 1, ps, np);
    if (rc == 0) {
        opt_sweep(S.np); /* pages are not validated until locked: read them without a lock first */
        if (direct_init) {
            /* re-initialised in place: every page is fresh, the damage is gone */
            for (uint32_t p = 0; p < S.np && !S.stop; p++) {
                EXPECT(lock_page(p, 0) == 0, "page %u can't be locked after init_file", p);
                fmm_page_info info;
                fmm_page_info_get(S.c, p, &info);
                EXPECT(info.live == 0, "page %u has %u entries after init_file", p, info.live);
                unlock_page(p);
            }
        }
        return;
    }
    EXPECT(!S.clean, "an undamaged file was refused: %d %s", rc, fmm_strerror(rc));
    EXPECT(rc == FMM_EBADFILE || rc == FMM_EGEOMETRY, "reopening a damaged file: %d %s", rc, fmm_strerror(rc));
    /* what init_file is for: recreate (or re-initialise) the file */
    rc = reopen(1, 1, ps, np); /* explicit: replaces the file, never waits on its locks */
    EXPECT(rc == 0 && S.clean, "fmm_open(init_file=1) of a damaged file: %d %s", rc, fmm_strerror(rc));
}

/* ---------- One input ---------- */

static void new_file(rd_t *r)
{
    uint8_t g = u8(r), o = u8(r);
    memset(&S, 0, sizeof S);
    S.cfg.page_size = 1024u << (g & 3);
    S.cfg.num_pages = 1 + ((g >> 2) & 7);
    S.cfg.start_slots = (g >> 5) ? 2u << (g >> 5) : 0;
    S.cfg.enable_stats = o & 1;
    S.cfg.permissions = 0600;
    S.seed = 0x9E3779B97F4A7C15ull * (uint64_t)(1 + (o >> 1));
    S.now = BASE_TIME;
    unlink(g_path);
    int rc = reopen(0, 0, S.cfg.page_size, S.cfg.num_pages);
    EXPECT(rc == 0 && S.clean, "creating the cache: %d %s", rc, fmm_strerror(rc));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    init_once();
    rd_t r = {data, size};
    new_file(&r);
    for (int steps = 0; r.n && !S.stop && steps < 200; steps++) {
        uint8_t op = u8(&r);
        TRACE("step %d: op %u (kind %u), %zu bytes left\n", steps, op, op % 18, r.n);
        switch (op % 18) {
        case 0: op_key(&r, 0, op); break;
        case 1: op_key(&r, 1, op); break;
        case 2: op_key(&r, 2, op); break;
        case 3: op_fill(&r); break;
        case 4: op_page(&r, 0, op); break;
        case 5: op_page(&r, 1, op); break;
        case 6: op_page(&r, 2, op); break;
        case 7: op_page(&r, 3, op); break;
        case 8: op_page(&r, 4, op); break;
        case 9: op_page(&r, 5, op); break;
        case 10: op_nested(&r, op); break;
        case 11: op_big(&r); break;
        case 12: op_lockword(&r); break;
        case 13: op_stale(&r); break;
        case 14: op_runtime_damage(&r); break;
        case 15: op_reopen(&r); break;
        case 16: { /* time passes */
            uint8_t t = u8(&r);
            S.now += t < 200 ? (uint64_t)t * 37u : (uint64_t)(t - 199) * 3600000u; /* ms */
            fmm_set_time(S.c, S.now);
            EXPECT(fmm_now(S.c) == S.now, "fmm_now");
            break;
        }
        case 17: /* file and geometry queries */
            EXPECT(fmm_check_file(S.c) == 0, "fmm_check_file: the file is still there");
            EXPECT(fmm_start_slots(S.c) >= 4, "start_slots %u", fmm_start_slots(S.c));
            (void)fmm_repairs(S.c);
            break;
        }
    }
    close_handle();
    return 0;
}

/* ---------- Replay without libFuzzer ---------- */

#ifdef FMM_FUZZ_REPLAY
static int replay_file(const char *path)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        perror(path);
        return -1;
    }
    size_t cap = 1 << 16, n = 0;
    uint8_t *buf = malloc(cap);
    size_t got;
    while (buf && (got = fread(buf + n, 1, cap - n, fp)) > 0) {
        n += got;
        if (n == cap) {
            uint8_t *nb = realloc(buf, cap *= 2);
            if (!nb) {
                free(buf);
                buf = NULL;
            }
            buf = nb;
        }
    }
    fclose(fp);
    if (!buf) {
        fprintf(stderr, "%s: out of memory\n", path);
        return -1;
    }
    LLVMFuzzerTestOneInput(buf, n);
    free(buf);
    return 0;
}

static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s FILE_OR_DIR...\n", argv[0]);
        return 2;
    }
    int runs = 0, bad = 0;
    for (int i = 1; i < argc; i++) {
        struct stat st;
        if (stat(argv[i], &st) != 0) {
            perror(argv[i]);
            bad++;
            continue;
        }
        if (!S_ISDIR(st.st_mode)) {
            bad += replay_file(argv[i]) != 0;
            runs++;
            continue;
        }
        DIR *d = opendir(argv[i]);
        if (!d) {
            perror(argv[i]);
            bad++;
            continue;
        }
        char **names = NULL;
        size_t nn = 0;
        struct dirent *de;
        while ((de = readdir(d)) != NULL) {
            if (de->d_name[0] == '.')
                continue;
            char **nn2 = realloc(names, (nn + 1) * sizeof *names);
            if (!nn2)
                break;
            names = nn2;
            size_t len = strlen(argv[i]) + strlen(de->d_name) + 2;
            names[nn] = malloc(len);
            if (!names[nn])
                break;
            snprintf(names[nn], len, "%s/%s", argv[i], de->d_name);
            nn++;
        }
        closedir(d);
        if (nn)
            qsort(names, nn, sizeof *names, cmp_str);
        for (size_t j = 0; j < nn; j++) {
            if (stat(names[j], &st) == 0 && S_ISREG(st.st_mode)) {
                bad += replay_file(names[j]) != 0;
                runs++;
            }
            free(names[j]);
        }
        free(names);
    }
    printf("fuzz_fmm: replayed %d inputs%s\n", runs, bad ? ", some unreadable" : "");
    return bad ? 1 : 0;
}
#endif
