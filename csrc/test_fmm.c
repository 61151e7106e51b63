/*
 * test_fmm.c -- the engine's own test driver: plain C11 + POSIX, no Python,
 * no framework.  Uses only what fmm.h declares, plus the page-header layout
 * that fmm.h documents (the mutex in bytes 0..39, then uint16 magic at 40,
 * uint16 dirty 42, uint32 num_slots 44, live 48, seq 52, free_data 56,
 * clock 60, deleted 64, ...) for the crash, corruption and lock-free read
 * tests.
 *
 * Build and run (what `make ctest` does):
 *   cc -std=gnu11 -g -O1 -fsanitize=address,undefined -fno-sanitize-recover=all \
 *      -fno-omit-frame-pointer -Wall -Wextra -Werror -Icsrc \
 *      csrc/fmm.c csrc/test_fmm.c -o build/test_fmm -lpthread
 *   build/test_fmm
 *
 * Each test is a function; CHECK() records a failure (file:line and the
 * expression) and carries on.  main() prints one line per test and a final
 * "N passed, M failed" (counting tests), and exits non-zero if any failed.
 * Every file lives in a private directory made with mkdtemp under $TMPDIR
 * (or /tmp) and removed at the end.  Child processes report through their
 * exit status and leave with _exit() so that they never run the parent's
 * atexit handlers (or LeakSanitizer).
 *
 * The corruption fuzz runs its seeds in a child process: a seed that
 * crashes the engine is reported (and the next child carries on) instead of
 * ending the driver.  The page layout also depends on the random hash seed
 * of each cache, so a failing seed number locates the kind of damage but
 * does not replay it exactly.  FMM_FUZZ_SEEDS=n runs a longer fuzz.
 */
#define _GNU_SOURCE
#include "fmm.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* The documented page-header layout (fmm.h): the mutex takes the first 40
 * bytes (glibc, x86_64; 64 where pthread_mutex_t is larger), then the
 * fields. */
#define PH_FIELDS ((uint32_t)(sizeof(pthread_mutex_t) <= 40 ? 40 : 64))
#define PH_DIRTY (PH_FIELDS + 2)      /* uint16 */
#define PH_NUM_SLOTS (PH_FIELDS + 4)  /* uint32 */
#define PH_SEQ (PH_FIELDS + 12)       /* uint32: odd while the page is locked */

/* ------------------------------------------------------------------ harness */

static int g_test_failures;   /* failed CHECKs in the current test */
static int g_quiet_after = 12; /* print at most this many failures per test */
static char g_dir[1024];      /* private scratch directory */

static void check_fail(const char *file, int line, const char *expr)
{
    if (g_test_failures < g_quiet_after)
        fprintf(stderr, "%s:%d: CHECK failed: %s\n", file, line, expr);
    else if (g_test_failures == g_quiet_after)
        fprintf(stderr, "    (further failures of this test not shown)\n");
    g_test_failures++;
}

static void check_fail_eq(const char *file, int line, const char *a, const char *b, long long va, long long vb)
{
    if (g_test_failures < g_quiet_after)
        fprintf(stderr, "%s:%d: CHECK failed: %s == %s (%lld [0x%llx] != %lld [0x%llx])\n", file, line, a, b, va,
                (unsigned long long)va, vb, (unsigned long long)vb);
    else if (g_test_failures == g_quiet_after)
        fprintf(stderr, "    (further failures of this test not shown)\n");
    g_test_failures++;
}

#define CHECK(expr)                                                                                                    \
    do {                                                                                                               \
        if (!(expr))                                                                                                   \
            check_fail(__FILE__, __LINE__, #expr);                                                                     \
    } while (0)

#define CHECK_EQ(a, b)                                                                                                 \
    do {                                                                                                               \
        long long va_ = (long long)(a), vb_ = (long long)(b);                                                          \
        if (va_ != vb_)                                                                                                \
            check_fail_eq(__FILE__, __LINE__, #a, #b, va_, vb_);                                                       \
    } while (0)

/* An error code, compared and printed with its description. */
#define CHECK_RC(call, want)                                                                                           \
    do {                                                                                                               \
        int rc_ = (call), want_ = (want);                                                                              \
        if (rc_ != want_) {                                                                                            \
            char m_[400];                                                                                              \
            snprintf(m_, sizeof m_, "%s returned %d (%s), expected %d (%s)", #call, rc_, fmm_strerror(rc_), want_,     \
                     fmm_strerror(want_));                                                                             \
            check_fail(__FILE__, __LINE__, m_);                                                                        \
        }                                                                                                              \
    } while (0)

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* splitmix64: a small deterministic generator for the randomised tests. */
static uint64_t rng_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}
static uint32_t rng_below(uint64_t *s, uint32_t n) { return n ? (uint32_t)(rng_next(s) % n) : 0; }

/* ------------------------------------------------------------------ helpers */

static void tpath(char *buf, const char *name)
{
    int n = snprintf(buf, PATH_MAX, "%.1024s/%.256s", g_dir, name);
    if (n < 0 || n >= PATH_MAX)
        abort();
}

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    (void)remove(p);
    return 0; /* best effort: keep walking */
}
static void rm_rf(const char *dir) { nftw(dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

/* Read a whole file into a malloc'ed buffer; NULL if it cannot be read. */
static unsigned char *slurp(const char *path, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
    if (fd < 0)
        return NULL;
    struct stat st;
    if (fstat(fd, &st) != 0) {
        close(fd);
        return NULL;
    }
    size_t n = (size_t)st.st_size;
    unsigned char *b = malloc(n ? n : 1);
    size_t got = 0;
    while (b && got < n) {
        ssize_t r = read(fd, b + got, n - got);
        if (r <= 0)
            break;
        got += (size_t)r;
    }
    close(fd);
    if (!b || got != n) {
        free(b);
        return NULL;
    }
    *len = n;
    return b;
}

/* 1 if the file at path has exactly these contents. */
static int same_contents(const char *path, const unsigned char *want, size_t wlen)
{
    size_t len = 0;
    unsigned char *b = slurp(path, &len);
    int same = b && len == wlen && memcmp(b, want, len) == 0;
    free(b);
    return same;
}

static long long file_size(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0 ? (long long)st.st_size : -1;
}

static int file_mode(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0 ? (int)(st.st_mode & 07777) : -1;
}

static int exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

/* Number of entries of g_dir whose name starts with prefix. */
static int count_dir_prefix(const char *prefix)
{
    DIR *d = opendir(g_dir);
    int n = 0;
    if (!d)
        return -1;
    struct dirent *de;
    while ((de = readdir(d)) != NULL)
        if (strncmp(de->d_name, prefix, strlen(prefix)) == 0)
            n++;
    closedir(d);
    return n;
}

/* Open with a config; on failure print the detail and return NULL. */
static fmm_cache *open_cfg(const char *path, const fmm_config *cfg, int *created)
{
    fmm_cache *c = NULL;
    char err[300] = "";
    int cr = 0;
    int rc = fmm_open(path, cfg, &c, &cr, err, sizeof err);
    if (rc) {
        fprintf(stderr, "    fmm_open(%s): %s: %s\n", path ? path : "(anonymous)", fmm_strerror(rc), err);
        return NULL;
    }
    if (created)
        *created = cr;
    return c;
}

/* A file cache with explicit geometry. */
static fmm_cache *open_geom(const char *path, uint32_t page_size, uint32_t num_pages)
{
    fmm_config cfg = {0};
    cfg.page_size = page_size;
    cfg.num_pages = num_pages;
    cfg.explicit_geometry = FMM_GEOM_PAGE_SIZE | FMM_GEOM_NUM_PAGES;
    return open_cfg(path, &cfg, NULL);
}

/* An anonymous (fileless) cache. */
static fmm_cache *open_anon(uint32_t page_size, uint32_t num_pages)
{
    fmm_config cfg = {0};
    cfg.page_size = page_size;
    cfg.num_pages = num_pages;
    cfg.anonymous = 1;
    return open_cfg(NULL, &cfg, NULL);
}

/* Locked one-shot operations on a key (a C string). */
static int kset_full(fmm_cache *c, const char *k, const void *v, uint32_t vlen, uint32_t flags, uint64_t exp,
                     fmm_evict_fn fn, void *ctx)
{
    uint32_t klen = (uint32_t)strlen(k);
    uint64_t h = fmm_hash(c, k, klen);
    uint32_t p = fmm_page_of(c, h);
    int rc = fmm_lock(c, p, -1);
    if (rc)
        return rc;
    rc = fmm_set(c, p, h, k, klen, v, vlen, flags, exp, fn, ctx);
    fmm_unlock(c, p);
    return rc;
}
static int kset(fmm_cache *c, const char *k, const void *v, uint32_t vlen)
{
    return kset_full(c, k, v, vlen, 0, 0, NULL, NULL);
}
static int ksets(fmm_cache *c, const char *k, const char *v) { return kset(c, k, v, (uint32_t)strlen(v)); }

/* Get a copy of the value (at most cap bytes into buf, NUL-terminated if
 * room); *vlen, *flags receive the entry's (either may be NULL). */
static int kget_full(fmm_cache *c, const char *k, int touch, char *buf, size_t cap, uint32_t *vlen, uint32_t *flags)
{
    uint32_t klen = (uint32_t)strlen(k);
    uint64_t h = fmm_hash(c, k, klen);
    uint32_t p = fmm_page_of(c, h);
    int rc = fmm_lock(c, p, -1);
    if (rc)
        return rc;
    fmm_item it;
    rc = fmm_get(c, p, h, k, klen, touch, &it);
    if (rc == 0) {
        if (it.klen != klen || memcmp(it.key, k, klen) != 0)
            rc = -1; /* wrong entry returned */
        if (buf && cap) {
            size_t n = it.vlen < cap ? it.vlen : cap;
            memcpy(buf, it.val, n);
            if (n < cap)
                buf[n] = 0;
        }
        if (vlen)
            *vlen = it.vlen;
        if (flags)
            *flags = it.flags;
    }
    fmm_unlock(c, p);
    return rc;
}
static int kget(fmm_cache *c, const char *k, char *buf, size_t cap, uint32_t *vlen)
{
    return kget_full(c, k, 1, buf, cap, vlen, NULL);
}
/* 1 if present (peek, no LRU touch). */
static int khas(fmm_cache *c, const char *k) { return kget_full(c, k, 0, NULL, 0, NULL, NULL) == 0; }
/* 1 if present with exactly this value. */
static int kis(fmm_cache *c, const char *k, const void *v, uint32_t vlen)
{
    char *buf = malloc(vlen + 1);
    uint32_t got = 0;
    int ok = buf && kget_full(c, k, 0, buf, vlen + 1, &got, NULL) == 0 && got == vlen && memcmp(buf, v, vlen) == 0;
    free(buf);
    return ok;
}
static int kiss(fmm_cache *c, const char *k, const char *v) { return kis(c, k, v, (uint32_t)strlen(v)); }

static int kdel(fmm_cache *c, const char *k)
{
    uint32_t klen = (uint32_t)strlen(k);
    uint64_t h = fmm_hash(c, k, klen);
    uint32_t p = fmm_page_of(c, h);
    int rc = fmm_lock(c, p, -1);
    if (rc)
        return rc;
    rc = fmm_delete(c, p, h, k, klen, NULL);
    fmm_unlock(c, p);
    return rc;
}

/* fmm_check_page of every page; prints the first problem. */
static int check_all_pages(fmm_cache *c)
{
    for (uint32_t p = 0; p < fmm_num_pages(c); p++) {
        if (fmm_lock(c, p, -1) != 0)
            return -1;
        char msg[256];
        int rc = fmm_check_page(c, p, msg, sizeof msg);
        fmm_unlock(c, p);
        if (rc) {
            fprintf(stderr, "    check_page: %s\n", msg);
            return rc;
        }
    }
    return 0;
}

static int check_one_page(fmm_cache *c, uint32_t p)
{
    if (fmm_lock(c, p, -1) != 0)
        return -1;
    char msg[256];
    int rc = fmm_check_page(c, p, msg, sizeof msg);
    fmm_unlock(c, p);
    if (rc)
        fprintf(stderr, "    check_page: %s\n", msg);
    return rc;
}

/* Count live, unexpired entries across all pages (foreach). */
static int count_visit(void *ctx, const fmm_item *it)
{
    (void)it;
    ++*(long *)ctx;
    return 0;
}
static long count_entries(fmm_cache *c)
{
    long n = 0;
    for (uint32_t p = 0; p < fmm_num_pages(c); p++) {
        if (fmm_lock(c, p, -1) != 0)
            return -1;
        fmm_page_foreach(c, p, count_visit, &n);
        fmm_unlock(c, p);
    }
    return n;
}

static void page_info(fmm_cache *c, uint32_t p, fmm_page_info *info)
{
    memset(info, 0, sizeof *info);
    if (fmm_lock(c, p, -1) == 0) {
        fmm_page_info_get(c, p, info);
        fmm_unlock(c, p);
    }
}

/* Wait for a child; return its exit code, or 1000+signal if killed. */
static int wait_child(pid_t pid)
{
    int st = 0;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR)
            return -1;
    if (WIFEXITED(st))
        return WEXITSTATUS(st);
    if (WIFSIGNALED(st))
        return 1000 + WTERMSIG(st);
    return -1;
}

static int read_byte(int fd)
{
    unsigned char ch;
    ssize_t r;
    do
        r = read(fd, &ch, 1);
    while (r < 0 && errno == EINTR);
    return r == 1 ? ch : -1;
}
static void write_byte(int fd, unsigned char ch)
{
    ssize_t r;
    do
        r = write(fd, &ch, 1);
    while (r < 0 && errno == EINTR);
}

/* ------------------------------------------------------------------ tests */

static void test_xxh64_vectors(void)
{
    CHECK(fmm_xxh64("", 0, 0) == 0xEF46DB3751D8E999ULL);
    CHECK(fmm_xxh64("a", 1, 0) == 0xD24EC4F1A98C6E5BULL);
    CHECK(fmm_xxh64("abc", 3, 0) == 0x44BC2CF5AD770999ULL);
    unsigned char b[100];
    for (int i = 0; i < 100; i++)
        b[i] = (unsigned char)i;
    /* Cross-checked with the python xxhash package (xxh64_intdigest). */
    CHECK(fmm_xxh64(b, 100, 0) == 0x6AC1E58032166597ULL);
    CHECK(fmm_xxh64(b, 37, 0) == 0xD93FA2DFEE5C24C9ULL);
    CHECK(fmm_xxh64(b, 100, 0x9E3779B97F4A7C15ULL) == 0x3B97D91EBA03E785ULL);
    const char *fox = "The quick brown fox jumps over the lazy dog";
    CHECK(fmm_xxh64(fox, strlen(fox), 0) == 0x0B242D361FDA71BCULL);
    /* Alignment must not matter. */
    unsigned char un[101];
    memcpy(un + 1, b, 100);
    CHECK(fmm_xxh64(un + 1, 100, 0) == 0x6AC1E58032166597ULL);
    CHECK(fmm_xxh64(un + 1, 37, 0) == 0xD93FA2DFEE5C24C9ULL);

    /* fmm_hash is XXH64 with the file's seed: same file, same hash;
     * independent files get independent seeds. */
    fmm_cache *a = open_anon(4096, 4), *a2 = open_anon(4096, 4);
    CHECK(a && a2);
    if (a && a2) {
        CHECK(fmm_hash(a, "abc", 3) == fmm_hash(a, "abc", 3));
        CHECK(fmm_hash(a, "abc", 3) != fmm_hash(a2, "abc", 3));
        CHECK(fmm_page_of(a, fmm_hash(a, "abc", 3)) < 4);
        /* every page is reachable */
        int seen[4] = {0};
        char k[16];
        for (int i = 0; i < 200; i++) {
            snprintf(k, sizeof k, "k%d", i);
            uint32_t p = fmm_page_of(a, fmm_hash(a, k, strlen(k)));
            CHECK(p < 4);
            if (p < 4)
                seen[p] = 1;
        }
        CHECK(seen[0] && seen[1] && seen[2] && seen[3]);
    }
    fmm_close(a);
    fmm_close(a2);
}

/* The short-key hash (keys of up to 16 bytes) mixes every key byte with
 * the seed: keys that share a first word still spread, whatever that word
 * (one that cancels the hash's own constant included), and the same key
 * hashes differently under another seed. */
static void test_short_key_hash_seeds_every_byte(void)
{
    static const uint64_t firsts[] = {0xa0761d6478bd642fULL, 0, ~0ULL, 0x6b65792d6b65792dULL};
    /* (A seed equal to a first word XOR the constant would zero that word:
     * the collision then needs the file's random seed, so none is listed.) */
    static const uint64_t seeds[] = {1, 0x9E3779B97F4A7C15ULL, 0x0123456789abcdefULL, 0xfedcba9876543210ULL};
    enum { N = 256 };
    for (size_t f = 0; f < sizeof firsts / sizeof firsts[0]; f++)
        for (size_t s = 0; s < sizeof seeds / sizeof seeds[0]; s++)
            for (size_t len = 9; len <= 16; len++) {
                unsigned char k[16];
                uint64_t h[N];
                memcpy(k, &firsts[f], 8);
                memset(k + 8, 'x', 8);
                int dup = 0, same_other_seed = 0;
                for (int i = 0; i < N; i++) {
                    k[len - 1] = (unsigned char)i;
                    h[i] = fmm_key_hash(k, len, seeds[s]);
                    for (int j = 0; j < i; j++)
                        dup += h[j] == h[i];
                    same_other_seed += h[i] == fmm_key_hash(k, len, seeds[s] ^ 0x5555);
                }
                CHECK(dup == 0);
                CHECK(same_other_seed == 0);
                /* the page (the high word) spreads too: 256 keys over 64 pages */
                int per_page[64] = {0}, worst = 0;
                for (int i = 0; i < N; i++) {
                    int p = (int)(((h[i] >> 32) * 64) >> 32);
                    if (++per_page[p] > worst)
                        worst = per_page[p];
                }
                CHECK(worst <= 24);
            }
}

static void test_open_create(void)
{
    char path[PATH_MAX];
    tpath(path, "create.fmm");
    mode_t old = umask(022);
    int created = -1;
    fmm_config cfg = {0};
    cfg.page_size = 4096;
    cfg.num_pages = 3;
    cfg.explicit_geometry = FMM_GEOM_PAGE_SIZE | FMM_GEOM_NUM_PAGES;
    fmm_cache *c = open_cfg(path, &cfg, &created);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(created, 1);
        CHECK_EQ(file_size(path), 4096 + 3 * 4096);
        CHECK_EQ(file_mode(path), 0600);
        CHECK_EQ(fmm_page_size(c), 4096);
        CHECK_EQ(fmm_num_pages(c), 3);
        CHECK(fmm_start_slots(c) >= 4);
        CHECK_EQ(fmm_check_file(c), 0);
        CHECK_EQ(check_all_pages(c), 0);
        CHECK_EQ(fmm_repairs(c), 0);
        fmm_close(c);
    }
    /* the temporary name used for building is gone */
    CHECK_EQ(count_dir_prefix("create.fmm.tmp"), 0);

    /* permissions are exact, whatever the umask */
    char p2[PATH_MAX], p3[PATH_MAX];
    tpath(p2, "perm644.fmm");
    tpath(p3, "perm660.fmm");
    cfg.permissions = 0644;
    c = open_cfg(p2, &cfg, &created);
    CHECK(c != NULL);
    CHECK_EQ(file_mode(p2), 0644);
    fmm_close(c);
    cfg.permissions = 0660;
    c = open_cfg(p3, &cfg, &created);
    CHECK(c != NULL);
    CHECK_EQ(file_mode(p3), 0660);
    fmm_close(c);
    umask(077);
    char p4[PATH_MAX];
    tpath(p4, "perm600.fmm");
    cfg.permissions = 0;
    c = open_cfg(p4, &cfg, &created);
    CHECK(c != NULL);
    CHECK_EQ(file_mode(p4), 0600);
    fmm_close(c);
    umask(old);

    /* default geometry of a new file: 64 KiB pages, 89 pages */
    char p5[PATH_MAX];
    tpath(p5, "default.fmm");
    fmm_config zero = {0};
    c = open_cfg(p5, &zero, &created);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(created, 1);
        CHECK_EQ(fmm_page_size(c), 65536);
        CHECK_EQ(fmm_num_pages(c), 89);
        CHECK_EQ(file_size(p5), 4096 + 89LL * 65536);
        fmm_close(c);
    }
}

static void test_open_reopen_geometry(void)
{
    char path[PATH_MAX];
    tpath(path, "geom.fmm");
    fmm_cache *c = open_geom(path, 4096, 3);
    CHECK(c != NULL);
    if (!c)
        return;
    CHECK_EQ(ksets(c, "hello", "world"), 0);
    uint32_t slots = fmm_start_slots(c);
    fmm_close(c);

    /* start_slots is rounded up to a power of two and kept in the file */
    {
        char sp[PATH_MAX];
        tpath(sp, "slots.fmm");
        fmm_config sc = {0};
        sc.page_size = 65536;
        sc.num_pages = 1;
        sc.start_slots = 300;
        fmm_cache *x = open_cfg(sp, &sc, NULL);
        CHECK(x != NULL);
        if (x) {
            CHECK_EQ(fmm_start_slots(x), 512);
            fmm_page_info pi;
            page_info(x, 0, &pi);
            CHECK_EQ(pi.num_slots, 512);
            fmm_close(x);
        }
        fmm_config z0 = {0};
        x = open_cfg(sp, &z0, NULL);
        CHECK(x != NULL);
        if (x) {
            CHECK_EQ(fmm_start_slots(x), 512);
            fmm_close(x);
        }
    }

    /* zeroed config adopts the file */
    int created = -1;
    fmm_config zero = {0};
    c = open_cfg(path, &zero, &created);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(created, 0);
        CHECK_EQ(fmm_page_size(c), 4096);
        CHECK_EQ(fmm_num_pages(c), 3);
        CHECK_EQ(fmm_start_slots(c), slots);
        CHECK(kiss(c, "hello", "world"));
        fmm_close(c);
    }

    size_t blen = 0;
    unsigned char *before = slurp(path, &blen);
    CHECK(before != NULL);

    /* explicit num_pages that disagrees: FMM_EGEOMETRY, file untouched */
    fmm_config cfg = {0};
    cfg.page_size = 4096;
    cfg.num_pages = 5;
    cfg.explicit_geometry = FMM_GEOM_NUM_PAGES;
    fmm_cache *bad = NULL;
    char err[300] = "";
    CHECK_RC(fmm_open(path, &cfg, &bad, &created, err, sizeof err), FMM_EGEOMETRY);
    CHECK(bad == NULL);
    CHECK(err[0] != 0);
    CHECK(before && same_contents(path, before, blen));
    /* explicit page_size that disagrees: same */
    cfg.page_size = 8192;
    cfg.num_pages = 3;
    cfg.explicit_geometry = FMM_GEOM_PAGE_SIZE;
    CHECK_RC(fmm_open(path, &cfg, &bad, &created, err, sizeof err), FMM_EGEOMETRY);
    CHECK(before && same_contents(path, before, blen));

    /* only page_size was given and it matches: num_pages is adopted */
    cfg.page_size = 4096;
    cfg.num_pages = 5;
    cfg.explicit_geometry = FMM_GEOM_PAGE_SIZE;
    created = -1;
    c = open_cfg(path, &cfg, &created);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(created, 0);
        CHECK_EQ(fmm_num_pages(c), 3);
        CHECK_EQ(fmm_page_size(c), 4096);
        CHECK(kiss(c, "hello", "world"));
        fmm_close(c);
    }
    CHECK_EQ(file_size(path), 4096 + 3 * 4096);
    free(before);
}

static void test_open_init_file(void)
{
    char path[PATH_MAX];
    tpath(path, "init.fmm");
    fmm_cache *old = open_geom(path, 4096, 3);
    CHECK(old != NULL);
    if (!old)
        return;
    CHECK_EQ(ksets(old, "k1", "v1"), 0);
    CHECK_EQ(ksets(old, "k2", "v2"), 0);

    /* init_file with a different geometry: a new file replaces the old */
    fmm_config cfg = {0};
    cfg.page_size = 8192;
    cfg.num_pages = 2;
    cfg.explicit_geometry = FMM_GEOM_PAGE_SIZE | FMM_GEOM_NUM_PAGES;
    cfg.init_file = 1;
    int created = -1;
    fmm_cache *c = open_cfg(path, &cfg, &created);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(fmm_page_size(c), 8192);
        CHECK_EQ(fmm_num_pages(c), 2);
        CHECK_EQ(file_size(path), 4096 + 2 * 8192);
        CHECK(!khas(c, "k1"));
        CHECK(!khas(c, "k2"));
        CHECK_EQ(fmm_check_file(c), 0);
        CHECK_EQ(check_all_pages(c), 0);
        CHECK_EQ(ksets(c, "k3", "v3"), 0);
        CHECK_EQ(ksets(c, "k4", "v4"), 0);
        fmm_close(c);
    }
    /* the old handle still works on the old (unlinked) file, and knows it */
    CHECK(kiss(old, "k1", "v1"));
    CHECK_RC(fmm_check_file(old), FMM_EREPLACED);
    fmm_close(old);

    /* init_file with the same geometry: cleared in place */
    struct stat st1, st2;
    CHECK(stat(path, &st1) == 0);
    c = open_cfg(path, &cfg, &created);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(fmm_page_size(c), 8192);
        CHECK_EQ(fmm_num_pages(c), 2);
        CHECK(!khas(c, "k3"));
        CHECK(!khas(c, "k4"));
        CHECK_EQ(count_entries(c), 0);
        CHECK_EQ(check_all_pages(c), 0);
        CHECK_EQ(ksets(c, "k5", "v5"), 0);
        fmm_close(c);
    }
    CHECK(stat(path, &st2) == 0);
    CHECK_EQ(file_size(path), 4096 + 2 * 8192);

    /* and init_file without explicit sizes also clears */
    fmm_config zi = {0};
    zi.init_file = 1;
    c = open_cfg(path, &zi, &created);
    CHECK(c != NULL);
    if (c) {
        CHECK(!khas(c, "k5"));
        CHECK_EQ(fmm_page_size(c), 8192);
        fmm_close(c);
    }
}

static void test_open_bad_paths(void)
{
    char real[PATH_MAX], link1[PATH_MAX], dangle[PATH_MAX], target[PATH_MAX];
    tpath(real, "real.fmm");
    tpath(link1, "link.fmm");
    tpath(dangle, "dangle.fmm");
    tpath(target, "nowhere.fmm");
    fmm_config zero = {0};
    fmm_cache *c = open_geom(real, 4096, 2);
    CHECK(c != NULL);
    fmm_close(c);

    /* a symlink at the path (to a valid cache, or dangling) is refused */
    CHECK(symlink("real.fmm", link1) == 0);
    fmm_cache *x = NULL;
    int created = -1;
    int rc = fmm_open(link1, &zero, &x, &created, NULL, 0);
    CHECK(rc != 0);
    CHECK(x == NULL);
    fmm_close(x);
    CHECK(symlink("nowhere.fmm", dangle) == 0);
    x = NULL;
    rc = fmm_open(dangle, &zero, &x, &created, NULL, 0);
    CHECK(rc != 0);
    CHECK(x == NULL);
    fmm_close(x);
    CHECK(!exists(target));

    /* 8 KiB of random bytes: FMM_EBADFILE and the file untouched */
    char junk[PATH_MAX];
    tpath(junk, "junk.fmm");
    unsigned char rnd[8192];
    uint64_t s = 42;
    for (size_t i = 0; i < sizeof rnd; i++)
        rnd[i] = (unsigned char)rng_next(&s);
    int fd = open(junk, O_CREAT | O_WRONLY | O_TRUNC | O_CLOEXEC, 0600);
    CHECK(fd >= 0);
    if (fd >= 0) {
        CHECK(write(fd, rnd, sizeof rnd) == (ssize_t)sizeof rnd);
        close(fd);
    }
    x = NULL;
    char err[300] = "";
    CHECK_RC(fmm_open(junk, &zero, &x, &created, err, sizeof err), FMM_EBADFILE);
    CHECK(x == NULL);
    CHECK(same_contents(junk, rnd, sizeof rnd));
    fmm_config g = {0};
    g.page_size = 4096;
    g.num_pages = 1;
    g.explicit_geometry = FMM_GEOM_PAGE_SIZE | FMM_GEOM_NUM_PAGES;
    CHECK_RC(fmm_open(junk, &g, &x, &created, err, sizeof err), FMM_EBADFILE);
    CHECK(same_contents(junk, rnd, sizeof rnd));

    /* a valid header on a truncated file is refused too */
    char trunc[PATH_MAX];
    tpath(trunc, "trunc.fmm");
    c = open_geom(trunc, 4096, 4);
    CHECK(c != NULL);
    fmm_close(c);
    CHECK(truncate(trunc, 4096 + 2 * 4096) == 0);
    CHECK_RC(fmm_open(trunc, &zero, &x, &created, err, sizeof err), FMM_EBADFILE);
    CHECK_EQ(file_size(trunc), 4096 + 2 * 4096);

    /* an EMPTY existing file (mkstemp) becomes a new cache */
    char empty[PATH_MAX];
    tpath(empty, "empty-XXXXXX");
    fd = mkstemp(empty);
    CHECK(fd >= 0);
    if (fd >= 0)
        close(fd);
    created = -1;
    c = open_cfg(empty, &g, &created);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(created, 1);
        CHECK_EQ(file_size(empty), 4096 + 4096);
        CHECK_EQ(ksets(c, "a", "b"), 0);
        CHECK(kiss(c, "a", "b"));
        CHECK_EQ(fmm_check_file(c), 0);
        fmm_close(c);
    }
    c = open_cfg(empty, &zero, &created);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(created, 0);
        CHECK(kiss(c, "a", "b"));
        fmm_close(c);
    }

    /* a directory is refused */
    char dir[PATH_MAX];
    tpath(dir, "adir.fmm");
    CHECK(mkdir(dir, 0700) == 0);
    x = NULL;
    rc = fmm_open(dir, &zero, &x, &created, NULL, 0);
    CHECK(rc != 0);
    CHECK(x == NULL);
    struct stat st;
    CHECK(stat(dir, &st) == 0 && S_ISDIR(st.st_mode));

    /* a missing directory: an errno, not success */
    char nodir[PATH_MAX];
    tpath(nodir, "no/such/dir.fmm");
    rc = fmm_open(nodir, &zero, &x, &created, NULL, 0);
    CHECK(rc > 0);
    CHECK(x == NULL);
}

/* An existing file writable by group/others beyond cfg->permissions is
 * refused before it is read (FMM_EUNTRUSTED, the file unchanged); an
 * abandoned temporary file of the cache (its creator's flock free) is
 * removed by the next open, a locked one kept; an empty path says so. */
static void test_open_trust_and_temps(void)
{
    char path[PATH_MAX];
    tpath(path, "trust.fmm");
    fmm_cache *c = open_geom(path, 4096, 2);
    CHECK(c != NULL);
    fmm_close(c);
    CHECK(chmod(path, 0666) == 0);
    struct stat before, after;
    CHECK(stat(path, &before) == 0);
    fmm_config cfg = {0};
    fmm_cache *x = NULL;
    int created = -1;
    char err[400] = "";
    CHECK_RC(fmm_open(path, &cfg, &x, &created, err, sizeof err), FMM_EUNTRUSTED);
    CHECK(x == NULL);
    CHECK(strstr(err, "mode 0666") != NULL);
    cfg.init_file = 1; /* refused too: nothing replaced */
    CHECK_RC(fmm_open(path, &cfg, &x, &created, err, sizeof err), FMM_EUNTRUSTED);
    CHECK(stat(path, &after) == 0 && after.st_ino == before.st_ino && after.st_mtime == before.st_mtime);
    cfg.init_file = 0;
    cfg.permissions = 0666;
    c = open_cfg(path, &cfg, &created);
    CHECK(c != NULL);
    fmm_close(c);

    char dead[PATH_MAX + 64], live[PATH_MAX + 64];
    snprintf(dead, sizeof dead, "%s.tmp-%ld-Dead00", path, (long)getpid());
    snprintf(live, sizeof live, "%s.tmp-1-Live00", path);
    int dfd = open(dead, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
    int lfd = open(live, O_CREAT | O_EXCL | O_WRONLY | O_CLOEXEC, 0600);
    CHECK(dfd >= 0 && lfd >= 0);
    CHECK(flock(lfd, LOCK_EX) == 0);
    close(dfd);
    CHECK_EQ(fmm_reap_temps(path, 0, NULL, NULL), 1);
    CHECK(exists(dead));
    c = open_cfg(path, &cfg, &created);
    CHECK(c != NULL);
    fmm_close(c);
    CHECK(!exists(dead));
    CHECK(exists(live));
    close(lfd);
    CHECK_EQ(fmm_reap_temps(path, 1, NULL, NULL), 1);
    CHECK(!exists(live));

    CHECK_RC(fmm_open("", &cfg, &x, &created, err, sizeof err), ENOENT);
    CHECK(strstr(err, "empty") != NULL);
}

static void test_open_anonymous_and_args(void)
{
    fmm_config cfg = {0};
    cfg.anonymous = 1;
    cfg.page_size = 8192;
    cfg.num_pages = 3;
    int created = -1;
    fmm_cache *c = open_cfg(NULL, &cfg, &created);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(created, 1);
        CHECK_EQ(fmm_page_size(c), 8192);
        CHECK_EQ(fmm_num_pages(c), 3);
        CHECK_EQ(ksets(c, "anon", "value"), 0);
        CHECK(kiss(c, "anon", "value"));
        CHECK_EQ(fmm_check_file(c), 0);
        CHECK_EQ(check_all_pages(c), 0);
        fmm_close(c);
    }
    /* anonymous: a path, if given, is ignored (nothing is created) */
    char p[PATH_MAX];
    tpath(p, "anon-ignored.fmm");
    c = open_cfg(p, &cfg, &created);
    CHECK(c != NULL);
    CHECK(!exists(p));
    fmm_close(c);

    /* bad page sizes */
    char bp[PATH_MAX];
    tpath(bp, "badarg.fmm");
    fmm_config bad = {0};
    fmm_cache *x = NULL;
    uint32_t sizes[] = {5000, 3 * 4096, 512, 1u << 31};
    for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        bad.page_size = sizes[i];
        bad.num_pages = 2;
        bad.explicit_geometry = FMM_GEOM_PAGE_SIZE | FMM_GEOM_NUM_PAGES;
        bad.anonymous = 0;
        CHECK_RC(fmm_open(bp, &bad, &x, &created, NULL, 0), FMM_EBADARG);
        CHECK(x == NULL);
        bad.anonymous = 1;
        CHECK_RC(fmm_open(NULL, &bad, &x, &created, NULL, 0), FMM_EBADARG);
    }
    CHECK(!exists(bp));
    bad.page_size = 4096;
    bad.num_pages = FMM_MAX_PAGES + 1;
    bad.anonymous = 0;
    CHECK_RC(fmm_open(bp, &bad, &x, &created, NULL, 0), FMM_EBADARG);
    CHECK(!exists(bp));

    /* strerror covers the codes */
    CHECK(strcmp(fmm_strerror(FMM_ENOTFOUND), "unknown fastmmap error") != 0);
    CHECK(strcmp(fmm_strerror(FMM_ETOOMANY), "unknown fastmmap error") != 0);
    CHECK(fmm_strerror(ENOENT) != NULL && fmm_strerror(ENOENT)[0] != 0);
}

/* 16 processes open the same path at once (pipe barrier); each stores its
 * own key.  Exactly one of them creates the file. */
static void race_open(const char *path, const char *tmp_prefix)
{
    enum { NCHILD = 16 };
    int pfd[2];
    CHECK(pipe(pfd) == 0);
    pid_t pids[NCHILD];
    fflush(NULL);
    for (int i = 0; i < NCHILD; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            close(pfd[1]);
            char ch;
            while (read(pfd[0], &ch, 1) < 0 && errno == EINTR)
                ; /* the barrier: EOF when the parent closes its end */
            fmm_config cfg = {0};
            cfg.page_size = 4096;
            cfg.num_pages = 8;
            cfg.explicit_geometry = FMM_GEOM_PAGE_SIZE | FMM_GEOM_NUM_PAGES;
            fmm_cache *c = NULL;
            int created = 0;
            if (fmm_open(path, &cfg, &c, &created, NULL, 0) != 0)
                _exit(2);
            char key[32];
            snprintf(key, sizeof key, "child-%d", i);
            if (ksets(c, key, key) != 0)
                _exit(3);
            fmm_close(c);
            _exit(created ? 11 : 10);
        }
        CHECK(pids[i] > 0);
    }
    close(pfd[0]);
    usleep(50000); /* let every child reach the barrier */
    close(pfd[1]);
    int creators = 0, bad = 0;
    for (int i = 0; i < NCHILD; i++) {
        if (pids[i] <= 0)
            continue;
        int st = wait_child(pids[i]);
        if (st == 11)
            creators++;
        else if (st != 10) {
            bad++;
            fprintf(stderr, "    child %d exited with %d\n", i, st);
        }
    }
    CHECK_EQ(bad, 0);
    CHECK_EQ(creators, 1);
    fmm_config zero = {0};
    int created = -1;
    fmm_cache *c = open_cfg(path, &zero, &created);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(created, 0);
        CHECK_EQ(fmm_num_pages(c), 8);
        CHECK_EQ(file_size(path), 4096 + 8 * 4096);
        for (int i = 0; i < NCHILD; i++) {
            char key[32];
            snprintf(key, sizeof key, "child-%d", i);
            CHECK(kiss(c, key, key));
        }
        CHECK_EQ(count_entries(c), NCHILD);
        CHECK_EQ(check_all_pages(c), 0);
        fmm_close(c);
    }
    CHECK_EQ(count_dir_prefix(tmp_prefix), 0); /* no temporary file left */
}

static void test_race_free_creation(void)
{
    char path[PATH_MAX];
    tpath(path, "race.fmm");
    race_open(path, "race.fmm.tmp");
    /* the same race on an existing EMPTY file (made by mkstemp) */
    char empty[PATH_MAX];
    tpath(empty, "race-empty-XXXXXX");
    int fd = mkstemp(empty);
    CHECK(fd >= 0);
    if (fd >= 0) {
        close(fd);
        char prefix[64];
        snprintf(prefix, sizeof prefix, "%s.tmp", strrchr(empty, '/') + 1);
        race_open(empty, prefix);
    }
}

static void test_get_set_delete(void)
{
    fmm_cache *c = open_anon(8192, 4);
    CHECK(c != NULL);
    if (!c)
        return;
    char buf[256];
    uint32_t vlen = 0;
    CHECK_RC(kget(c, "missing", buf, sizeof buf, &vlen), FMM_ENOTFOUND);
    CHECK_EQ(ksets(c, "alpha", "one"), 0);
    CHECK_EQ(ksets(c, "beta", "two"), 0);
    CHECK(kiss(c, "alpha", "one"));
    CHECK(kiss(c, "beta", "two"));
    /* overwrite, longer and shorter */
    CHECK_EQ(ksets(c, "alpha", "a much longer value than before"), 0);
    CHECK(kiss(c, "alpha", "a much longer value than before"));
    CHECK_EQ(ksets(c, "alpha", "s"), 0);
    CHECK(kiss(c, "alpha", "s"));
    CHECK(kiss(c, "beta", "two"));
    /* delete */
    CHECK_EQ(kdel(c, "alpha"), 0);
    CHECK(!khas(c, "alpha"));
    CHECK_RC(kdel(c, "alpha"), FMM_ENOTFOUND);
    CHECK_RC(kdel(c, "never-there"), FMM_ENOTFOUND);
    CHECK(kiss(c, "beta", "two"));
    /* old_flags from delete */
    {
        const char *k = "flagged";
        uint32_t kl = (uint32_t)strlen(k);
        CHECK_EQ(kset_full(c, k, "v", 1, FMM_T_STR | FMM_F_KEYSTR, 0, NULL, NULL), 0);
        uint64_t h = fmm_hash(c, k, kl);
        uint32_t p = fmm_page_of(c, h);
        CHECK_EQ(fmm_lock(c, p, -1), 0);
        uint32_t of = 0;
        CHECK_EQ(fmm_delete(c, p, h, k, kl, &of), 0);
        CHECK_EQ(of, FMM_T_STR | FMM_F_KEYSTR);
        fmm_unlock(c, p);
    }
    /* empty key and empty value */
    CHECK_EQ(ksets(c, "", "empty key"), 0);
    CHECK(kiss(c, "", "empty key"));
    CHECK_EQ(ksets(c, "empty value", ""), 0);
    vlen = 99;
    CHECK_EQ(kget(c, "empty value", buf, sizeof buf, &vlen), 0);
    CHECK_EQ(vlen, 0);
    CHECK_EQ(kset(c, "", "", 0), 0);
    vlen = 99;
    CHECK_EQ(kget(c, "", buf, sizeof buf, &vlen), 0);
    CHECK_EQ(vlen, 0);
    CHECK_EQ(kdel(c, ""), 0);
    CHECK(!khas(c, ""));
    /* binary keys with NUL bytes are distinct from their prefixes */
    {
        const char k1[] = {'a', 0, 'b'}, k2[] = {'a', 0, 'c'};
        uint64_t h1 = fmm_hash(c, k1, 3), h2 = fmm_hash(c, k2, 3), h0 = fmm_hash(c, "a", 1);
        uint32_t p1 = fmm_page_of(c, h1), p2 = fmm_page_of(c, h2), p0 = fmm_page_of(c, h0);
        CHECK_EQ(fmm_lock(c, p1, -1), 0);
        CHECK_EQ(fmm_set(c, p1, h1, k1, 3, "1", 1, 0, 0, NULL, NULL), 0);
        fmm_unlock(c, p1);
        CHECK_EQ(fmm_lock(c, p2, -1), 0);
        fmm_item it;
        CHECK_RC(fmm_get(c, p2, h2, k2, 3, 1, &it), FMM_ENOTFOUND);
        fmm_unlock(c, p2);
        CHECK_EQ(fmm_lock(c, p0, -1), 0);
        CHECK_RC(fmm_get(c, p0, h0, "a", 1, 1, &it), FMM_ENOTFOUND);
        fmm_unlock(c, p0);
        CHECK_EQ(fmm_lock(c, p1, -1), 0);
        CHECK_EQ(fmm_get(c, p1, h1, k1, 3, 1, &it), 0);
        CHECK(it.vlen == 1 && it.val[0] == '1');
        fmm_unlock(c, p1);
    }

    /* key too long */
    {
        uint32_t kl = FMM_MAX_KEY_LEN + 1;
        char *big = malloc(kl);
        CHECK(big != NULL);
        if (big) {
            memset(big, 'k', kl);
            uint64_t h = fmm_hash(c, big, kl);
            uint32_t p = fmm_page_of(c, h);
            CHECK_EQ(fmm_lock(c, p, -1), 0);
            CHECK_RC(fmm_set(c, p, h, big, kl, "v", 1, 0, 0, NULL, NULL), FMM_ETOOBIG);
            CHECK_EQ(check_one_page(c, p) == -1, 1); /* ELOCKED: we hold it */
            fmm_unlock(c, p);
            free(big);
        }
    }

    /* value too big: FMM_ETOOBIG and the old value survives */
    uint32_t mi = fmm_max_item(c);
    CHECK(mi > 0 && mi <= fmm_page_size(c) - FMM_PAGE_HEADER_SIZE);
    CHECK_EQ(mi % 4, 0);
    {
        const char *k = "bigkey";
        uint32_t kl = (uint32_t)strlen(k);
        CHECK_EQ(ksets(c, k, "old value"), 0);
        uint32_t vl = mi - FMM_ENTRY_HEADER_SIZE - kl + 1; /* one byte too many */
        char *v = malloc(vl);
        memset(v, 'v', vl);
        CHECK_RC(kset(c, k, v, vl), FMM_ETOOBIG);
        CHECK(kiss(c, k, "old value"));
        CHECK_RC(kset(c, k, v, UINT32_MAX - 8), FMM_ETOOBIG);
        CHECK(kiss(c, k, "old value"));
        free(v);
    }
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);

    /* an item of exactly fmm_max_item bytes fits an empty page, and then
     * a page that has entries (evicting them) */
    for (uint32_t ps = 1024; ps <= 65536; ps *= 4) {
        c = open_anon(ps, 1);
        CHECK(c != NULL);
        if (!c)
            continue;
        mi = fmm_max_item(c);
        const char *k = "max";
        uint32_t vl = mi - FMM_ENTRY_HEADER_SIZE - 3;
        char *v = malloc(vl);
        for (uint32_t i = 0; i < vl; i++)
            v[i] = (char)('a' + i % 26);
        CHECK_EQ(kset(c, k, v, vl), 0);
        CHECK(kis(c, k, v, vl));
        CHECK_EQ(check_all_pages(c), 0);
        CHECK_EQ(ksets(c, "small1", "x"), 0);
        CHECK_EQ(ksets(c, "small2", "y"), 0);
        CHECK(kiss(c, "small2", "y"));
        CHECK_EQ(kset(c, k, v, vl), 0);
        CHECK(kis(c, k, v, vl));
        CHECK_EQ(check_all_pages(c), 0);
        free(v);
        fmm_close(c);
    }

    /* every flag value 0..0x7f round-trips */
    c = open_anon(65536, 2);
    CHECK(c != NULL);
    if (c) {
        char k[16];
        for (uint32_t f = 0; f <= 0x7f; f++) {
            snprintf(k, sizeof k, "f%u", f);
            CHECK_EQ(kset_full(c, k, k, (uint32_t)strlen(k), f, 0, NULL, NULL), 0);
        }
        for (uint32_t f = 0; f <= 0x7f; f++) {
            snprintf(k, sizeof k, "f%u", f);
            uint32_t got = 0xFFFF;
            CHECK_EQ(kget_full(c, k, 1, buf, sizeof buf, NULL, &got), 0);
            CHECK_EQ(got, f);
        }
        fmm_close(c);
    }
}

static void test_expiry(void)
{
    fmm_cache *c = open_anon(8192, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    const uint32_t T = 1700000000u;
    fmm_set_time(c, T);
    CHECK_EQ(fmm_now(c), T);
    CHECK_EQ(kset_full(c, "soon", "v", 1, 0, T + 3, NULL, NULL), 0);
    CHECK_EQ(kset_full(c, "never", "w", 1, 0, 0, NULL, NULL), 0);
    CHECK_EQ(kset_full(c, "soon2", "x", 1, 0, T + 3, NULL, NULL), 0);
    CHECK_EQ(kset_full(c, "past", "y", 1, 0, T - 1, NULL, NULL), 0);
    CHECK(!khas(c, "past"));
    fmm_set_time(c, T + 2);
    CHECK(kiss(c, "soon", "v"));
    CHECK_EQ(count_entries(c), 3);
    fmm_set_time(c, T + 3);
    CHECK(!khas(c, "soon"));
    CHECK(!khas(c, "soon2"));
    CHECK(kiss(c, "never", "w"));
    CHECK_EQ(count_entries(c), 1);
    fmm_set_time(c, 0xFFFFFFF0u);
    CHECK(kiss(c, "never", "w"));
    fmm_set_time(c, T + 3);
    /* deleting an expired entry says not found, and removes it */
    const char *k = "soon";
    uint64_t h = fmm_hash(c, k, 4);
    uint32_t p = fmm_page_of(c, h);
    fmm_page_info before, after;
    page_info(c, p, &before);
    CHECK_RC(kdel(c, "soon"), FMM_ENOTFOUND);
    page_info(c, p, &after);
    CHECK_EQ(after.live, before.live - 1);
    CHECK_EQ(after.deleted, before.deleted + 1);
    CHECK_RC(kdel(c, "soon"), FMM_ENOTFOUND);
    /* an expired key can be set again */
    CHECK_EQ(kset_full(c, "soon2", "new", 3, 0, T + 10, NULL, NULL), 0);
    CHECK(kiss(c, "soon2", "new"));
    /* an expired entry no longer counts as live bytes */
    fmm_set_time(c, T + 11);
    CHECK(!khas(c, "soon2"));
    CHECK_EQ(check_all_pages(c), 0);
    /* back to real time, in milliseconds */
    fmm_set_time(c, 0);
    CHECK_EQ(fmm_time_unit(c), 1000);
    uint64_t real = (uint64_t)time(NULL) * 1000u;
    CHECK(fmm_now(c) + 2000 >= real && fmm_now(c) <= real + 2000);
    fmm_close(c);
}

/* Native expiry has millisecond resolution: the milliseconds share a word
 * with the access second, which reads and stores must both keep right. */
static void test_expiry_ms(void)
{
    fmm_cache *c = open_anon(8192, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    const uint64_t T = 1700000000123u; /* unix ms */
    fmm_set_time(c, T);
    CHECK_EQ(fmm_now(c), T);
    CHECK_EQ(fmm_expire_at(c, 250), T + 250); /* exact with the override */
    CHECK_EQ(kset_full(c, "q", "v", 1, 0, T + 250, NULL, NULL), 0);
    CHECK_EQ(kset_full(c, "s", "w", 1, 0, T + 877, NULL, NULL), 0); /* crosses into the next second */
    CHECK_EQ(kset_full(c, "tiny", "x", 1, 0, 1, NULL, NULL), 0);     /* 1 ms after 1970: expired, not never */
    CHECK(!khas(c, "tiny"));
    uint64_t h = fmm_hash(c, "q", 1);
    fmm_item it;
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_RC(fmm_get(c, 0, h, "q", 1, 0, &it), 0);
    CHECK_EQ(it.expire_on, T + 250);
    CHECK_EQ(it.last_access, T / 1000);
    fmm_unlock(c, 0);
    /* a touching read a second later restamps the access second and keeps
     * the expiry's milliseconds */
    fmm_set_time(c, T + 249);
    CHECK(kiss(c, "q", "v"));
    fmm_set_time(c, T + 1000 - 123 - 1); /* the last ms of the store's second */
    CHECK(kiss(c, "s", "w"));
    fmm_set_time(c, T + 250 - 1);
    CHECK_EQ(kget_full(c, "q", FMM_GET_TOUCH, NULL, 0, NULL, NULL), 0);
    fmm_set_time(c, T + 250);
    CHECK(!khas(c, "q"));
    CHECK(kiss(c, "s", "w"));
    fmm_set_time(c, T + 876);
    CHECK_EQ(kget_full(c, "s", FMM_GET_TOUCH, NULL, 0, NULL, NULL), 0);
    h = fmm_hash(c, "s", 1);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_RC(fmm_get(c, 0, h, "s", 1, 0, &it), 0);
    CHECK_EQ(it.expire_on, T + 877);
    CHECK_EQ(it.last_access, (T + 876) / 1000);
    fmm_unlock(c, 0);
    fmm_set_time(c, T + 877);
    CHECK(!khas(c, "s"));
    /* last_access is the full second for an entry used 40 days ago */
    fmm_set_time(c, T);
    CHECK_EQ(kset_full(c, "old", "o", 1, 0, 0, NULL, NULL), 0);
    fmm_set_time(c, T + 40ull * 86400 * 1000);
    h = fmm_hash(c, "old", 3);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_RC(fmm_get(c, 0, h, "old", 3, 0, &it), 0);
    CHECK_EQ(it.last_access, T / 1000);
    CHECK_EQ(it.expire_on, 0);
    fmm_unlock(c, 0);
    /* the latest expiry there is: second 2^32-1, 999 ms */
    CHECK_EQ(kset_full(c, "far", "f", 1, 0, UINT64_MAX, NULL, NULL), 0);
    h = fmm_hash(c, "far", 3);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_RC(fmm_get(c, 0, h, "far", 3, 0, &it), 0);
    CHECK(it.expire_on == 0xFFFFFFFFull * 1000 + 999);
    fmm_unlock(c, 0);
    /* the real clock: fmm_expire_at counts from the latest real time the
     * clock reading allows, so never before fmm_now() + after */
    fmm_set_time(c, 0);
    uint64_t before = fmm_now(c);
    uint64_t at = fmm_expire_at(c, 250);
    CHECK(at >= before + 250 && at <= fmm_now(c) + 250 + 10);
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

static void test_lru_eviction(void)
{
    fmm_cache *c = open_anon(8192, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    enum { N = 200 };
    char k[16], v[128];
    int evicted_seen = 0;
    for (int i = 0; i < N; i++) {
        snprintf(k, sizeof k, "key%03d", i);
        memset(v, 'a' + i % 26, 90);
        memcpy(v, k, 6);
        CHECK_EQ(kset(c, k, v, 90), 0);
        if (i >= 5 && i % 10 == 0) {
            for (int j = 0; j < 5; j++) {
                snprintf(k, sizeof k, "key%03d", j);
                CHECK_EQ(kget(c, k, NULL, 0, NULL), 0);
            }
        }
        if (!evicted_seen && !khas(c, "key005"))
            evicted_seen = i;
    }
    CHECK(evicted_seen > 0);
    for (int j = 0; j < 5; j++) {
        snprintf(k, sizeof k, "key%03d", j);
        CHECK(khas(c, k));
    }
    /* the most recent 20 are present, with the right values */
    for (int i = N - 20; i < N; i++) {
        snprintf(k, sizeof k, "key%03d", i);
        memset(v, 'a' + i % 26, 90);
        memcpy(v, k, 6);
        CHECK(kis(c, k, v, 90));
    }
    /* survivors (besides the touched 5) are a contiguous most-recent run */
    int first_present = -1, holes = 0;
    for (int i = 5; i < N; i++) {
        snprintf(k, sizeof k, "key%03d", i);
        int has = khas(c, k);
        if (has && first_present < 0)
            first_present = i;
        if (!has && first_present >= 0)
            holes++;
    }
    CHECK_EQ(holes, 0);
    CHECK(first_present > 100); /* the least recently used are gone */
    for (int i = 5; i < 100; i++) {
        snprintf(k, sizeof k, "key%03d", i);
        CHECK(!khas(c, k));
    }
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

static void test_compaction_overwrites(void)
{
    fmm_cache *c = open_anon(8192, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    enum { NK = 30, ROUNDS = 2000 };
    char k[16], v[128];
    uint64_t s = 7;
    uint32_t last_len[NK] = {0};
    for (int r = 0; r < ROUNDS; r++) {
        for (int i = 0; i < NK; i++) {
            snprintf(k, sizeof k, "ow%02d", i);
            uint32_t vl = 40 + rng_below(&s, 60);
            int n = snprintf(v, sizeof v, "%s-round-%d-", k, r);
            memset(v + n, 'z', vl - (uint32_t)n);
            last_len[i] = vl;
            CHECK_EQ(kset(c, k, v, vl), 0);
        }
        if (r % 250 == 249 || r == ROUNDS - 1) {
            CHECK_EQ(check_all_pages(c), 0);
            for (int i = 0; i < NK; i++) {
                snprintf(k, sizeof k, "ow%02d", i);
                int n = snprintf(v, sizeof v, "%s-round-%d-", k, r);
                memset(v + n, 'z', last_len[i] - (uint32_t)n);
                CHECK(kis(c, k, v, last_len[i]));
            }
        }
    }
    CHECK_EQ(count_entries(c), NK);
    fmm_close(c);
}

static void test_slot_growth_shrink(void)
{
    fmm_cache *c = open_anon(65536, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    char k[16];
    fmm_page_info info;
    page_info(c, 0, &info);
    uint32_t start = info.num_slots;
    CHECK(start <= 128);
    for (int i = 0; i < 1000; i++) {
        snprintf(k, sizeof k, "%d", i);
        CHECK_EQ(kset(c, k, "v", 1), 0);
    }
    page_info(c, 0, &info);
    CHECK(info.num_slots > 1024);
    CHECK_EQ(info.live, 1000);
    CHECK_EQ(info.data_start, FMM_PAGE_HEADER_SIZE + 4 * info.num_slots);
    for (int i = 0; i < 1000; i++) {
        snprintf(k, sizeof k, "%d", i);
        CHECK(khas(c, k));
    }
    CHECK_EQ(check_all_pages(c), 0);
    for (int i = 0; i < 990; i++) {
        snprintf(k, sizeof k, "%d", i);
        CHECK_EQ(kdel(c, k), 0);
    }
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_expunge(c, 0, FMM_EXPUNGE_EXPIRED, NULL, NULL), 0);
    fmm_page_info_get(c, 0, &info);
    fmm_unlock(c, 0);
    CHECK(info.num_slots <= 128);
    CHECK_EQ(info.live, 10);
    CHECK_EQ(info.deleted, 0);
    for (int i = 990; i < 1000; i++) {
        snprintf(k, sizeof k, "%d", i);
        CHECK(kiss(c, k, "v"));
    }
    for (int i = 0; i < 990; i += 37) {
        snprintf(k, sizeof k, "%d", i);
        CHECK(!khas(c, k));
    }
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

/* A random word of lowercase letters, length lo..hi. */
static uint32_t rand_word(uint64_t *s, char *out, uint32_t lo, uint32_t hi)
{
    uint32_t n = lo + rng_below(s, hi - lo + 1);
    for (uint32_t i = 0; i < n; i++)
        out[i] = (char)('a' + rng_below(s, 26));
    out[n] = 0;
    return n;
}

static void test_perl_t16(void)
{
    fmm_cache *c = open_anon(32768, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    enum { LIVE = 100 };
    char keys[LIVE][16], vals[LIVE][48];
    uint64_t s = 16;
    for (int round = 0; round < 20; round++) {
        CHECK_EQ(fmm_lock(c, 0, -1), 0);
        CHECK_EQ(fmm_expunge(c, 0, FMM_EXPUNGE_ALL, NULL, NULL), 0);
        fmm_unlock(c, 0);
        int n = 0;
        while (n < LIVE) {
            char kw[16];
            rand_word(&s, kw, 1, 12);
            int dup = 0;
            for (int i = 0; i < n; i++)
                dup |= strcmp(keys[i], kw) == 0;
            if (dup)
                continue;
            strcpy(keys[n], kw);
            rand_word(&s, vals[n], 0, 40);
            CHECK_EQ(ksets(c, keys[n], vals[n]), 0);
            n++;
        }
        for (int step = 0; step < 50; step++) {
            int gone = (int)rng_below(&s, LIVE);
            char gk[16];
            strcpy(gk, keys[gone]);
            CHECK_EQ(kdel(c, gk), 0);
            for (;;) {
                rand_word(&s, keys[gone], 1, 12);
                int dup = strcmp(keys[gone], gk) == 0;
                for (int i = 0; i < LIVE; i++)
                    dup |= i != gone && strcmp(keys[i], keys[gone]) == 0;
                if (!dup)
                    break;
            }
            rand_word(&s, vals[gone], 0, 40);
            CHECK_EQ(ksets(c, keys[gone], vals[gone]), 0);
            for (int i = 0; i < LIVE; i++)
                if (!kiss(c, keys[i], vals[i])) {
                    fprintf(stderr, "    round %d step %d: key %s lost\n", round, step, keys[i]);
                    CHECK(!"a live key went missing");
                }
            CHECK(!khas(c, gk));
        }
        CHECK_EQ(count_entries(c), LIVE);
    }
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

static void test_perl_t17(void)
{
    fmm_cache *c = open_anon(65536, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    enum { BIG = 31000 };
    char *a = malloc(BIG), *b = malloc(BIG);
    memset(a, 'a', BIG);
    memset(b, 'b', BIG);
    CHECK_EQ(kset(c, "big-a", a, BIG), 0);
    CHECK_EQ(kset(c, "big-b", b, BIG), 0);
    int lost_at = -1;
    for (int i = 0; i < 90; i++) {
        CHECK_EQ(ksets(c, "small", "x"), 0);
        CHECK(kiss(c, "small", "x"));
        CHECK_EQ(kdel(c, "small"), 0);
        if (lost_at < 0 && (!kis(c, "big-a", a, BIG) || !kis(c, "big-b", b, BIG)))
            lost_at = i;
    }
    if (lost_at >= 0)
        fprintf(stderr, "    a big value was evicted at round %d\n", lost_at);
    CHECK_EQ(lost_at, -1);
    CHECK(kis(c, "big-a", a, BIG));
    CHECK(kis(c, "big-b", b, BIG));
    CHECK_EQ(count_entries(c), 2);
    CHECK_EQ(check_all_pages(c), 0);
    free(a);
    free(b);
    fmm_close(c);
}

/* Eviction callback log: keys are "<letter><index>". */
typedef struct evlog {
    int n, clean, bad;
    int hits[400];
} evlog;
static void ev_record(void *ctx, const fmm_item *it)
{
    evlog *l = ctx;
    l->n++;
    if (!(it->flags & FMM_F_DIRTY))
        l->clean++;
    char k[32];
    if (it->klen < 2 || it->klen >= sizeof k) {
        l->bad++;
        return;
    }
    memcpy(k, it->key, it->klen);
    k[it->klen] = 0;
    int i = atoi(k + 1);
    if (i < 0 || i >= 400)
        l->bad++;
    else
        l->hits[i]++;
}

typedef struct seen {
    int n;
    int hits[400];
    int stop_after; /* 0: never */
} seen;
static int visit_record(void *ctx, const fmm_item *it)
{
    seen *s = ctx;
    char k[32];
    s->n++;
    if (it->klen >= 2 && it->klen < sizeof k) {
        memcpy(k, it->key, it->klen);
        k[it->klen] = 0;
        int i = atoi(k + 1);
        if (i >= 0 && i < 400)
            s->hits[i]++;
    }
    return s->stop_after && s->n >= s->stop_after ? 7 : 0;
}

static void test_expunge_dirty_foreach(void)
{
    fmm_cache *c = open_anon(65536, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    const uint32_t T = 1700000000u;
    fmm_set_time(c, T);
    char k[16];
    /* i%4: 0 dirty forever, 1 dirty expiring, 2 clean expiring, 3 clean forever */
    for (int i = 0; i < 40; i++) {
        snprintf(k, sizeof k, "x%d", i);
        uint32_t flags = (i % 4 <= 1 ? FMM_F_DIRTY : 0) | FMM_T_STR;
        uint32_t exp = (i % 4 == 1 || i % 4 == 2) ? T + 10 : 0;
        CHECK_EQ(kset_full(c, k, k, (uint32_t)strlen(k), flags, exp, NULL, NULL), 0);
    }
    /* delete a few of each kind: deleted entries are not visited or reported */
    for (int i = 36; i < 40; i++) {
        snprintf(k, sizeof k, "x%d", i);
        CHECK_EQ(kdel(c, k), 0);
    }
    seen sn;
    memset(&sn, 0, sizeof sn);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_page_foreach(c, 0, visit_record, &sn), 0);
    fmm_unlock(c, 0);
    CHECK_EQ(sn.n, 36);
    for (int i = 0; i < 40; i++)
        CHECK_EQ(sn.hits[i], i < 36 ? 1 : 0);

    fmm_set_time(c, T + 10);
    memset(&sn, 0, sizeof sn);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_page_foreach(c, 0, visit_record, &sn), 0);
    fmm_page_info info;
    fmm_page_info_get(c, 0, &info);
    CHECK_EQ(info.live, 36);
    CHECK_EQ(info.expired, 18);
    CHECK_EQ(info.deleted, 4);
    /* a visitor's non-zero return stops the walk and is returned */
    seen stop;
    memset(&stop, 0, sizeof stop);
    stop.stop_after = 3;
    CHECK_EQ(fmm_page_foreach(c, 0, visit_record, &stop), 7);
    CHECK_EQ(stop.n, 3);
    fmm_unlock(c, 0);
    CHECK_EQ(sn.n, 18);
    for (int i = 0; i < 36; i++)
        CHECK_EQ(sn.hits[i], (i % 4 == 0 || i % 4 == 3) ? 1 : 0);

    /* purge: expired only; only the dirty ones are reported */
    evlog ev;
    memset(&ev, 0, sizeof ev);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_expunge(c, 0, FMM_EXPUNGE_EXPIRED, ev_record, &ev), 0);
    fmm_page_info_get(c, 0, &info);
    fmm_unlock(c, 0);
    CHECK_EQ(ev.n, 9);
    CHECK_EQ(ev.clean, 0);
    CHECK_EQ(ev.bad, 0);
    for (int i = 0; i < 36; i++)
        CHECK_EQ(ev.hits[i], i % 4 == 1 ? 1 : 0);
    CHECK_EQ(info.live, 18);
    CHECK_EQ(info.expired, 0);
    CHECK_EQ(info.deleted, 0);
    for (int i = 0; i < 36; i++) {
        snprintf(k, sizeof k, "x%d", i);
        CHECK_EQ(khas(c, k), (i % 4 == 0 || i % 4 == 3));
    }
    CHECK_EQ(check_all_pages(c), 0);

    /* clear: everything; the dirty ones reported */
    memset(&ev, 0, sizeof ev);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_expunge(c, 0, FMM_EXPUNGE_ALL, ev_record, &ev), 0);
    fmm_page_info_get(c, 0, &info);
    fmm_unlock(c, 0);
    CHECK_EQ(ev.n, 9);
    CHECK_EQ(ev.clean, 0);
    for (int i = 0; i < 36; i++)
        CHECK_EQ(ev.hits[i], i % 4 == 0 ? 1 : 0);
    CHECK_EQ(info.live, 0);
    CHECK_EQ(count_entries(c), 0);
    CHECK_EQ(check_all_pages(c), 0);
    /* expunge with a NULL callback works too */
    CHECK_EQ(ksets(c, "y1", "v"), 0);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_expunge(c, 0, FMM_EXPUNGE_ALL, NULL, NULL), 0);
    fmm_unlock(c, 0);
    CHECK(!khas(c, "y1"));
    fmm_close(c);
}

/* Dirty entries removed by eviction (and by expiry reclaim during a set)
 * are reported exactly once; clean ones never. */
static void test_evict_callback(void)
{
    fmm_cache *c = open_anon(8192, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    enum { N = 300 };
    evlog ev;
    memset(&ev, 0, sizeof ev);
    char k[16], v[100];
    memset(v, 'v', sizeof v);
    for (int i = 0; i < N; i++) {
        snprintf(k, sizeof k, "e%d", i);
        CHECK_EQ(kset_full(c, k, v, 80, i % 2 ? 0 : FMM_F_DIRTY, 0, ev_record, &ev), 0);
    }
    CHECK(ev.n > 0);
    CHECK_EQ(ev.clean, 0);
    CHECK_EQ(ev.bad, 0);
    int missing_dirty = 0, missing_clean = 0;
    for (int i = 0; i < N; i++) {
        snprintf(k, sizeof k, "e%d", i);
        int has = khas(c, k);
        if (i % 2 == 0) {
            CHECK_EQ(ev.hits[i], has ? 0 : 1);
            missing_dirty += !has;
        } else {
            CHECK_EQ(ev.hits[i], 0);
            missing_clean += !has;
        }
    }
    CHECK(missing_clean > 0);
    CHECK_EQ(ev.n, missing_dirty);

    /* expiry reclaim: expired dirty entries are reported when a set
     * compacts the page */
    const uint32_t T = 1700000000u;
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_expunge(c, 0, FMM_EXPUNGE_ALL, NULL, NULL), 0);
    fmm_unlock(c, 0);
    fmm_set_time(c, T);
    for (int i = 0; i < 10; i++) {
        snprintf(k, sizeof k, "t%d", i);
        CHECK_EQ(kset_full(c, k, v, 80, i % 2 ? 0 : FMM_F_DIRTY, T + 5, NULL, NULL), 0);
    }
    fmm_set_time(c, T + 5);
    memset(&ev, 0, sizeof ev);
    for (int i = 10; i < 200 && ev.n == 0; i++) {
        snprintf(k, sizeof k, "t%d", i);
        CHECK_EQ(kset_full(c, k, v, 80, 0, 0, ev_record, &ev), 0);
    }
    CHECK_EQ(ev.n, 5);
    CHECK_EQ(ev.clean, 0);
    for (int i = 0; i < 10; i++)
        CHECK_EQ(ev.hits[i], i % 2 ? 0 : 1);
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

/* ------------------------------------------------------------------ modseq and tombstones */

#define TOMB (FMM_T_TOMBSTONE | FMM_F_MODSEQ)

/* fmm_set_ms on a key (a C string), page locked around it. */
static int kset_ms(fmm_cache *c, const char *k, const void *v, uint32_t vlen, uint32_t flags, uint32_t exp,
                   uint64_t modseq, fmm_evict_fn fn, void *ctx)
{
    uint32_t klen = (uint32_t)strlen(k);
    uint64_t h = fmm_hash(c, k, klen);
    uint32_t p = fmm_page_of(c, h);
    int rc = fmm_lock(c, p, -1);
    if (rc)
        return rc;
    rc = fmm_set_ms(c, p, h, k, klen, v, vlen, flags, exp, modseq, fn, ctx);
    fmm_unlock(c, p);
    return rc;
}
static int kms(fmm_cache *c, const char *k, const char *v, uint64_t modseq)
{
    return kset_ms(c, k, v, (uint32_t)strlen(v), FMM_T_STR | FMM_F_MODSEQ, 0, modseq, NULL, NULL);
}
static int ktomb(fmm_cache *c, const char *k, uint64_t modseq, uint32_t exp)
{
    return kset_ms(c, k, NULL, 0, TOMB, exp, modseq, NULL, NULL);
}

/* The entry of k as fmm_get(touch) sees it: rc; flags, modseq and value
 * (NUL-terminated, at most 63 bytes) copied out. */
typedef struct {
    uint32_t flags, vlen, expire_on;
    uint64_t modseq;
    char val[64];
} msview;
static int kview(fmm_cache *c, const char *k, int touch, msview *out)
{
    uint32_t klen = (uint32_t)strlen(k);
    uint64_t h = fmm_hash(c, k, klen);
    uint32_t p = fmm_page_of(c, h);
    memset(out, 0, sizeof *out);
    int rc = fmm_lock(c, p, -1);
    if (rc)
        return rc;
    fmm_item it;
    memset(&it, 0xAB, sizeof it);
    rc = fmm_get(c, p, h, k, klen, touch, &it);
    if (rc == 0) {
        out->flags = it.flags;
        out->vlen = it.vlen;
        out->expire_on = it.expire_on;
        out->modseq = it.modseq;
        size_t n = it.vlen < sizeof out->val - 1 ? it.vlen : sizeof out->val - 1;
        memcpy(out->val, it.val, n);
        /* the value follows the key, after the 8-byte modseq if there is one */
        if (it.klen != klen || memcmp(it.key, k, klen) != 0 ||
            it.val != it.key + it.klen + (it.flags & FMM_F_MODSEQ ? 8 : 0) ||
            (!(it.flags & FMM_F_MODSEQ) && it.modseq != 0))
            rc = -1;
    }
    fmm_unlock(c, p);
    return rc;
}
/* 1 if k reads (fmm_get without FMM_GET_TOMBSTONE) as value v with this modseq
 * (0 and no FMM_F_MODSEQ flag when ms_flag is 0). */
static int kis_ms(fmm_cache *c, const char *k, const char *v, int ms_flag, uint64_t modseq)
{
    msview m;
    return kview(c, k, 0, &m) == 0 && m.vlen == strlen(v) && strcmp(m.val, v) == 0 &&
           !!(m.flags & FMM_F_MODSEQ) == ms_flag && m.modseq == modseq;
}
/* 1 if k holds a tombstone with this modseq (and reads as absent). */
static int kis_tomb(fmm_cache *c, const char *k, uint64_t modseq)
{
    msview m;
    return kview(c, k, 0, &m) == FMM_ENOTFOUND && kview(c, k, FMM_GET_EXPIRED, &m) == FMM_ENOTFOUND &&
           kview(c, k, FMM_GET_TOMBSTONE, &m) == 0 && m.flags == TOMB && m.vlen == 0 && m.modseq == modseq;
}

/* Every row of the rules table in fmm.h. */
static void test_modseq_rules(void)
{
    fmm_cache *c = open_anon(8192, 4);
    CHECK(c != NULL);
    if (!c)
        return;
    /* existing tombstone, store without modseq -> refused */
    CHECK_EQ(ktomb(c, "t1", 5, 0), 0);
    CHECK(kis_tomb(c, "t1", 5));
    CHECK(!khas(c, "t1"));
    CHECK_RC(ksets(c, "t1", "plain"), FMM_EREFUSED);
    CHECK_RC(kset_ms(c, "t1", "x", 1, FMM_T_BYTES, 0, 99, NULL, NULL), FMM_EREFUSED); /* modseq ignored w/o flag */
    CHECK(kis_tomb(c, "t1", 5));
    /* existing tombstone, store with modseq < old -> refused */
    CHECK_RC(kms(c, "t1", "older", 4), FMM_EREFUSED);
    CHECK_RC(kms(c, "t1", "oldest", 0), FMM_EREFUSED);
    CHECK(kis_tomb(c, "t1", 5));
    /* existing tombstone, store with modseq >= old -> stored (equal, then newer) */
    CHECK_EQ(kms(c, "t1", "equal", 5), 0);
    CHECK(kis_ms(c, "t1", "equal", 1, 5));
    CHECK_EQ(ktomb(c, "t2", 5, 0), 0);
    CHECK_EQ(kms(c, "t2", "newer", 6), 0);
    CHECK(kis_ms(c, "t2", "newer", 1, 6));
    /* existing tombstone, tombstone with modseq <= old -> no change; > old -> stored */
    CHECK_EQ(ktomb(c, "t3", 5, 0), 0);
    CHECK_RC(ktomb(c, "t3", 5, 0), FMM_ENOCHANGE);
    CHECK_RC(ktomb(c, "t3", 4, 0), FMM_ENOCHANGE);
    CHECK(kis_tomb(c, "t3", 5));
    CHECK_EQ(ktomb(c, "t3", 6, 0), 0);
    CHECK(kis_tomb(c, "t3", 6));
    /* existing value, tombstone with modseq <= old -> no change (value kept); > old -> deleted */
    CHECK_EQ(kms(c, "v1", "val", 5), 0);
    CHECK_RC(ktomb(c, "v1", 5, 0), FMM_ENOCHANGE);
    CHECK_RC(ktomb(c, "v1", 1, 0), FMM_ENOCHANGE);
    CHECK(kis_ms(c, "v1", "val", 1, 5));
    CHECK_EQ(ktomb(c, "v1", 6, 0), 0);
    CHECK(kis_tomb(c, "v1", 6));
    /* existing value, store with modseq < old -> refused (value kept); >= old -> stored */
    CHECK_EQ(kms(c, "v2", "five", 5), 0);
    CHECK_RC(kms(c, "v2", "four", 4), FMM_EREFUSED);
    CHECK(kis_ms(c, "v2", "five", 1, 5));
    CHECK_EQ(kms(c, "v2", "five again", 5), 0);
    CHECK(kis_ms(c, "v2", "five again", 1, 5));
    CHECK_EQ(kms(c, "v2", "seven", 7), 0);
    CHECK(kis_ms(c, "v2", "seven", 1, 7));
    /* existing value, store without modseq -> stored, modseq dropped */
    CHECK_EQ(ksets(c, "v2", "plain"), 0);
    CHECK(kis_ms(c, "v2", "plain", 0, 0));
    CHECK_EQ(kms(c, "v2", "one", 1), 0); /* nothing to compare with any more */
    CHECK(kis_ms(c, "v2", "one", 1, 1));
    /* anything else -> stored: no entry, or an entry without a modseq */
    CHECK_EQ(kms(c, "n1", "fresh", 3), 0);
    CHECK(kis_ms(c, "n1", "fresh", 1, 3));
    CHECK_EQ(ktomb(c, "n2", 3, 0), 0);
    CHECK(kis_tomb(c, "n2", 3));
    CHECK_EQ(ksets(c, "n3", "plain"), 0);
    CHECK_EQ(kms(c, "n3", "ms", 0), 0);
    CHECK(kis_ms(c, "n3", "ms", 1, 0));
    CHECK_EQ(ksets(c, "n4", "plain"), 0);
    CHECK_EQ(ktomb(c, "n4", 0, 0), 0);
    CHECK(kis_tomb(c, "n4", 0));
    /* the full 64-bit range, compared unsigned */
    CHECK_EQ(kms(c, "big", "max", UINT64_MAX), 0);
    CHECK(kis_ms(c, "big", "max", 1, UINT64_MAX));
    CHECK_RC(kms(c, "big", "less", UINT64_MAX - 1), FMM_EREFUSED);
    CHECK_RC(ktomb(c, "big", UINT64_MAX, 0), FMM_ENOCHANGE);
    CHECK_EQ(kms(c, "big2", "2^63", 1ull << 63), 0);
    CHECK_RC(kms(c, "big2", "2^62", 1ull << 62), FMM_EREFUSED);
    /* bad arguments: a tombstone with a value; FMM_F_MODSEQ is ignored by fmm_set */
    CHECK_RC(kset_ms(c, "bad", "v", 1, TOMB, 0, 1, NULL, NULL), FMM_EBADARG);
    CHECK(!khas(c, "bad"));
    CHECK_EQ(kset_full(c, "nf", "v", 1, FMM_F_MODSEQ | FMM_T_STR, 0, NULL, NULL), 0);
    CHECK(kis_ms(c, "nf", "v", 0, 0));
    CHECK_EQ(kset_full(c, "nf2", "", 0, TOMB, 0, NULL, NULL), 0); /* type 6 without the modseq: opaque */
    msview m;
    CHECK_EQ(kview(c, "nf2", 0, &m), 0);
    CHECK_EQ(m.flags, FMM_T_TOMBSTONE);
    /* sizes are checked before the rules, and a refused store changes nothing */
    {
        uint32_t big = fmm_max_item(c);
        char *v = calloc(1, big);
        CHECK_RC(kset_ms(c, "t3", v, big, FMM_F_MODSEQ, 0, 100, NULL, NULL), FMM_ETOOBIG);
        CHECK(kis_tomb(c, "t3", 6));
        /* fits without the modseq's 8 bytes, not with them (a page-sized
         * item: it evicts whatever shares its page) */
        uint32_t vl = big - FMM_ENTRY_HEADER_SIZE - 2 - 6;
        CHECK_EQ(kset(c, "tb", v, vl), 0);
        CHECK_RC(kset_ms(c, "tb", v, vl, FMM_F_MODSEQ, 0, 1, NULL, NULL), FMM_ETOOBIG);
        CHECK_EQ(kset_ms(c, "tb", v, vl - 8, FMM_F_MODSEQ, 0, 1, NULL, NULL), 0);
        free(v);
    }
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

/* Expired entries never block; fmm_delete removes a tombstone as "not
 * found"; fmm_get's flags; the in-place and compaction paths keep it. */
static void test_modseq_expiry_delete(void)
{
    fmm_cache *c = open_anon(8192, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    const uint32_t T = 1700000000u;
    fmm_set_time(c, T);
    CHECK_EQ(ktomb(c, "t", 10, T + 3), 0);
    CHECK_RC(ksets(c, "t", "early"), FMM_EREFUSED);
    fmm_set_time(c, T + 2);
    CHECK_RC(kms(c, "t", "early", 9), FMM_EREFUSED);
    fmm_set_time(c, T + 3); /* the tombstone has expired: anything goes */
    msview m;
    CHECK_RC(kview(c, "t", FMM_GET_TOMBSTONE, &m), FMM_ENOTFOUND);
    CHECK_EQ(kview(c, "t", FMM_GET_TOMBSTONE | FMM_GET_EXPIRED, &m), 0);
    CHECK_EQ(m.modseq, 10);
    CHECK_EQ(ksets(c, "t", "late"), 0);
    CHECK(kiss(c, "t", "late"));
    /* an expired modseq value does not block an older modseq */
    CHECK_EQ(kset_ms(c, "v", "x", 1, FMM_F_MODSEQ, T + 5, 50, NULL, NULL), 0);
    CHECK_RC(kms(c, "v", "y", 49), FMM_EREFUSED);
    fmm_set_time(c, T + 5);
    CHECK_EQ(kms(c, "v", "y", 1), 0);
    CHECK(kis_ms(c, "v", "y", 1, 1));
    /* expired tombstone over an expired one: stored (a new tombstone) */
    CHECK_EQ(ktomb(c, "e", 7, T + 6), 0);
    fmm_set_time(c, T + 6);
    CHECK_EQ(ktomb(c, "e", 1, 0), 0);
    CHECK(kis_tomb(c, "e", 1));
    /* fmm_delete over a tombstone: removes it, reports not found */
    CHECK_EQ(ktomb(c, "d", 3, 0), 0);
    {
        const char *k = "d";
        uint64_t h = fmm_hash(c, k, 1);
        uint32_t p = fmm_page_of(c, h);
        fmm_page_info before, after;
        page_info(c, p, &before);
        CHECK_EQ(fmm_lock(c, p, -1), 0);
        uint32_t of = 0;
        CHECK_RC(fmm_delete(c, p, h, k, 1, &of), FMM_ENOTFOUND);
        CHECK_EQ(of, TOMB);
        CHECK_RC(fmm_delete(c, p, h, k, 1, &of), FMM_ENOTFOUND);
        fmm_unlock(c, p);
        page_info(c, p, &after);
        CHECK_EQ(after.live, before.live - 1);
        CHECK_EQ(after.tombstones, before.tombstones - 1);
    }
    CHECK_RC(kview(c, "d", FMM_GET_TOMBSTONE, &m), FMM_ENOTFOUND);
    CHECK_EQ(ksets(c, "d", "back"), 0);
    /* a modseq value deletes normally */
    CHECK_EQ(kms(c, "dv", "x", 3), 0);
    CHECK_EQ(kdel(c, "dv"), 0);
    CHECK(!khas(c, "dv"));
    /* touch on a tombstone with FMM_GET_TOMBSTONE|FMM_GET_TOUCH works; the
     * item is empty, points inside the page */
    CHECK_EQ(ktomb(c, "tt", 4, 0), 0);
    CHECK_EQ(kview(c, "tt", FMM_GET_TOMBSTONE | FMM_GET_TOUCH, &m), 0);
    CHECK_EQ(m.vlen, 0);
    /* in place (same rounded size), and value sizes around the 8-byte prefix */
    CHECK_EQ(ksets(c, "ip", "0123456789abcdef"), 0);          /* 16 value bytes, no modseq */
    CHECK_EQ(kms(c, "ip", "01234567", 21), 0);                 /* 8 + 8 bytes: rewritten in place */
    CHECK(kis_ms(c, "ip", "01234567", 1, 21));
    CHECK_EQ(kms(c, "ip", "abcdefgh", 21), 0);
    CHECK(kis_ms(c, "ip", "abcdefgh", 1, 21));
    CHECK_EQ(ksets(c, "ip", "0123456789ABCDEF"), 0);
    CHECK(kis_ms(c, "ip", "0123456789ABCDEF", 0, 0));
    CHECK_EQ(kms(c, "ip", "", 22), 0);
    CHECK(kis_ms(c, "ip", "", 1, 22));
    CHECK_EQ(ktomb(c, "ip", 23, 0), 0);
    CHECK(kis_tomb(c, "ip", 23));
    /* keys of every length 1..8: the modseq lands at every alignment */
    for (int n = 1; n <= 8; n++) {
        char k[9];
        memset(k, 'a' + n, (size_t)n);
        k[n] = 0;
        uint64_t ms = 0x0102030405060708ull * (uint64_t)n;
        CHECK_EQ(kms(c, k, "v", ms), 0);
        CHECK(kis_ms(c, k, "v", 1, ms));
    }
    /* survives compaction: overwrite other keys until the page is rebuilt */
    char k[16], v[200];
    memset(v, 'z', sizeof v);
    for (int i = 0; i < 400; i++) {
        snprintf(k, sizeof k, "f%d", i % 7);
        CHECK_EQ(kset(c, k, v, 150 + (uint32_t)(i % 3) * 8), 0);
    }
    CHECK(kis_tomb(c, "ip", 23));
    for (int n = 1; n <= 8; n++) { /* little live data: nothing was evicted */
        memset(k, 'a' + n, (size_t)n);
        k[n] = 0;
        CHECK(kis_ms(c, k, "v", 1, 0x0102030405060708ull * (uint64_t)n));
    }
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

typedef struct {
    int n, tombs, modseqs;
    uint64_t last_modseq;
    int bad;
} msev;
static void msev_record(void *ctx, const fmm_item *it)
{
    msev *e = ctx;
    e->n++;
    if ((it->flags & (FMM_F_TYPE_MASK | FMM_F_MODSEQ)) == TOMB)
        e->tombs++;
    if (it->flags & FMM_F_MODSEQ) {
        e->modseqs++;
        e->last_modseq = it->modseq;
        if (it->vlen != 1 || it->val[0] != 'w')
            e->bad++;
    }
}
static int msvisit(void *ctx, const fmm_item *it)
{
    msev_record(ctx, it);
    return 0;
}

/* Tombstones are invisible to foreach and the eviction callback, counted in
 * page info, and evicted like any entry. */
static void test_modseq_visibility_eviction(void)
{
    fmm_cache *c = open_anon(8192, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    CHECK_EQ(kset_ms(c, "dt", NULL, 0, TOMB | FMM_F_DIRTY, 0, 5, NULL, NULL), 0);
    CHECK_EQ(kset_ms(c, "dv", "w", 1, FMM_F_MODSEQ | FMM_F_DIRTY, 0, 6, NULL, NULL), 0);
    CHECK_EQ(ksets(c, "plain", "p"), 0);
    msev e;
    memset(&e, 0, sizeof e);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_page_foreach(c, 0, msvisit, &e), 0);
    fmm_page_info info;
    fmm_page_info_get(c, 0, &info);
    fmm_unlock(c, 0);
    CHECK_EQ(e.n, 2);
    CHECK_EQ(e.tombs, 0);
    CHECK_EQ(e.modseqs, 1);
    CHECK_EQ(e.last_modseq, 6);
    CHECK_EQ(e.bad, 0);
    CHECK_EQ(info.live, 3);
    CHECK_EQ(info.tombstones, 1);
    CHECK_EQ(info.expired, 0);
    CHECK_EQ(count_entries(c), 2);
    /* expunge(ALL) reports the dirty value with its modseq, never the tombstone */
    memset(&e, 0, sizeof e);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_expunge(c, 0, FMM_EXPUNGE_ALL, msev_record, &e), 0);
    fmm_unlock(c, 0);
    CHECK_EQ(e.n, 1);
    CHECK_EQ(e.tombs, 0);
    CHECK_EQ(e.last_modseq, 6);
    CHECK_EQ(e.bad, 0);
    /* an expired dirty tombstone is not reported by purge either */
    const uint32_t T = 1700000000u;
    fmm_set_time(c, T);
    CHECK_EQ(kset_ms(c, "dt", NULL, 0, TOMB | FMM_F_DIRTY, T + 1, 5, NULL, NULL), 0);
    fmm_set_time(c, T + 1);
    memset(&e, 0, sizeof e);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    fmm_page_info_get(c, 0, &info);
    CHECK_EQ(info.expired, 1);
    CHECK_EQ(info.tombstones, 0);
    CHECK_EQ(fmm_expunge(c, 0, FMM_EXPUNGE_EXPIRED, msev_record, &e), 0);
    fmm_page_info_get(c, 0, &info);
    fmm_unlock(c, 0);
    CHECK_EQ(e.n, 0);
    CHECK_EQ(info.live, 0);
    fmm_set_time(c, 0);
    /* LRU eviction drops tombstones like values (and never reports them,
     * dirty or not) */
    CHECK_EQ(kset_ms(c, "old-tomb", NULL, 0, TOMB | FMM_F_DIRTY, 0, 9, NULL, NULL), 0);
    char k[16], v[100];
    memset(v, 'v', sizeof v);
    memset(&e, 0, sizeof e);
    for (int i = 0; i < 300; i++) {
        snprintf(k, sizeof k, "e%d", i);
        CHECK_EQ(kset_ms(c, k, v, 80, FMM_F_DIRTY, 0, 0, msev_record, &e), 0);
    }
    CHECK(e.n > 0);
    CHECK_EQ(e.tombs, 0);
    msview m;
    CHECK_RC(kview(c, "old-tomb", FMM_GET_TOMBSTONE, &m), FMM_ENOTFOUND);
    CHECK_EQ(ksets(c, "old-tomb", "stored now"), 0);
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

/* fmm_check_page accepts modseq entries and tombstones, and rejects a
 * modseq entry too short for its modseq, or a tombstone with a value; a
 * lookup that meets the short entry repairs the page. */
static void test_modseq_check_page(void)
{
    fmm_cache *c = open_anon(4096, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    CHECK_EQ(kms(c, "a", "value", 1), 0);
    CHECK_EQ(ktomb(c, "b", 2, 0), 0);
    CHECK_EQ(kms(c, "c", "", 3), 0);
    CHECK_EQ(check_all_pages(c), 0);
    /* the entry header is the 20 bytes before the key; vlen is its last word */
    const char *keys[] = {"a", "b"};
    const uint32_t bad_vlen[] = {7, 12};
    for (int t = 0; t < 2; t++) {
        const char *k = keys[t];
        uint64_t h = fmm_hash(c, k, 1);
        CHECK_EQ(fmm_lock(c, 0, -1), 0);
        fmm_item it;
        CHECK_EQ(fmm_get(c, 0, h, k, 1, FMM_GET_TOMBSTONE, &it), 0);
        unsigned char *vlenp = (unsigned char *)it.key - 4;
        uint32_t saved;
        memcpy(&saved, vlenp, 4);
        memcpy(vlenp, &bad_vlen[t], 4);
        char msg[256] = "";
        CHECK_RC(fmm_check_page(c, 0, msg, sizeof msg), FMM_ECORRUPT);
        CHECK(strstr(msg, t == 0 ? "modseq" : "tombstone") != NULL);
        memcpy(vlenp, &saved, 4);
        CHECK_EQ(fmm_check_page(c, 0, msg, sizeof msg), 0);
        fmm_unlock(c, 0);
    }
    /* the short one met by fmm_get, then by fmm_set_ms: each repairs */
    for (int how = 0; how < 2; how++) {
        CHECK_EQ(kms(c, "a", "value", 1), 0);
        uint64_t h = fmm_hash(c, "a", 1);
        uint64_t r0 = fmm_repairs(c);
        CHECK_EQ(fmm_lock(c, 0, -1), 0);
        fmm_item it;
        CHECK_EQ(fmm_get(c, 0, h, "a", 1, 0, &it), 0);
        uint32_t four = 4;
        memcpy((unsigned char *)it.key - 4, &four, 4);
        if (how == 0)
            CHECK_RC(fmm_get(c, 0, h, "a", 1, FMM_GET_TOUCH, &it), FMM_ENOTFOUND);
        else
            CHECK_EQ(fmm_set_ms(c, 0, h, "a", 1, "new", 3, FMM_F_MODSEQ, 0, 0, NULL, NULL), 0);
        char msg[256];
        CHECK_EQ(fmm_check_page(c, 0, msg, sizeof msg), 0);
        fmm_unlock(c, 0);
        CHECK_EQ(fmm_repairs(c), r0 + 1);
        CHECK_EQ(khas(c, "a"), how);
    }
    fmm_close(c);
    /* strerror knows the new codes */
    CHECK(strstr(fmm_strerror(FMM_EREFUSED), "modseq") != NULL);
    CHECK(strstr(fmm_strerror(FMM_ENOCHANGE), "modseq") != NULL);
}

static void test_lru_clock_renumbering(void)
{
    fmm_cache *c = open_anon(8192, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    enum { NK = 40 };
    char k[16], v[128];
    uint64_t last_use[NK];
    uint64_t tick = 0;
    memset(v, 'r', sizeof v);
    for (int i = 0; i < NK; i++) {
        snprintf(k, sizeof k, "k%02d", i);
        CHECK_EQ(kset(c, k, v, 100), 0);
        last_use[i] = ++tick;
    }
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    fmm_set_page_clock(c, 0, 0xEFFFFFF0u);
    fmm_unlock(c, 0);
    uint64_t s = 99;
    for (int op = 0; op < 100; op++) {
        int i = (int)rng_below(&s, NK);
        snprintf(k, sizeof k, "k%02d", i);
        if (op % 3 == 0)
            CHECK_EQ(kset(c, k, v, 90 + rng_below(&s, 20)), 0);
        else
            CHECK_EQ(kget(c, k, NULL, 0, NULL), 0);
        last_use[i] = ++tick;
        if (op % 10 == 0)
            CHECK_EQ(check_one_page(c, 0), 0);
    }
    CHECK_EQ(kget(c, "k07", NULL, 0, NULL), 0);
    last_use[7] = ++tick;
    CHECK_EQ(check_all_pages(c), 0);
    /* the clock was renumbered: access values are small again */
    {
        uint64_t h = fmm_hash(c, "k07", 3);
        fmm_item it;
        CHECK_EQ(fmm_lock(c, 0, -1), 0);
        CHECK_EQ(fmm_get(c, 0, h, "k07", 3, 0, &it), 0);
        CHECK(it.access < 0x10000u);
        fmm_unlock(c, 0);
    }
    /* now push new keys until the first k-key is evicted */
    int evicted = 0;
    for (int n = 0; n < 400 && !evicted; n++) {
        snprintf(k, sizeof k, "n%03d", n);
        CHECK_EQ(kset(c, k, v, 100), 0);
        for (int i = 0; i < NK; i++) {
            snprintf(k, sizeof k, "k%02d", i);
            evicted |= !khas(c, k);
        }
    }
    CHECK(evicted);
    CHECK(khas(c, "k07"));
    int order_bad = 0;
    for (int i = 0; i < NK; i++) {
        snprintf(k, sizeof k, "k%02d", i);
        if (khas(c, k))
            continue;
        for (int j = 0; j < NK; j++) {
            snprintf(k, sizeof k, "k%02d", j);
            if (khas(c, k) && last_use[j] < last_use[i])
                order_bad++;
        }
    }
    CHECK_EQ(order_bad, 0);
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

/* ------------------------------------------------------------------ fmm_set_many */

/* A one-page cache (every key on page 0) of the given format. */
static fmm_cache *open_batch_cache(const char *name, int format, uint32_t page_size)
{
    char p[PATH_MAX];
    tpath(p, name);
    fmm_config cfg = {0};
    cfg.format = format;
    cfg.page_size = page_size;
    cfg.num_pages = 1;
    cfg.init_file = 1;
    cfg.explicit_geometry = FMM_GEOM_PAGE_SIZE | FMM_GEOM_NUM_PAGES;
    if (format == FMM_FORMAT_PERL)
        cfg.perl_value_flags = FMM_T_BYTES;
    return open_cfg(p, &cfg, NULL);
}

/* n items "b0".."b{n-1}" with vlen-byte values of their index. */
enum { BATCH_MAX = 8 };
typedef struct {
    char keys[BATCH_MAX][16];
    unsigned char vals[BATCH_MAX][4096];
    fmm_batch_item it[BATCH_MAX];
} batch_buf;

static void batch_fill(fmm_cache *c, batch_buf *b, uint32_t n, uint32_t vlen)
{
    for (uint32_t i = 0; i < n; i++) {
        snprintf(b->keys[i], sizeof b->keys[i], "b%u", (unsigned)i);
        memset(b->vals[i], 'A' + (int)i, vlen);
        fmm_batch_item *it = &b->it[i];
        memset(it, 0, sizeof *it);
        it->key = b->keys[i];
        it->klen = (uint32_t)strlen(b->keys[i]);
        it->hash = fmm_hash(c, it->key, it->klen);
        it->val = b->vals[i];
        it->vlen = vlen;
        it->flags = FMM_T_BYTES;
    }
}

static int batch_store(fmm_cache *c, batch_buf *b, uint32_t n, uint32_t *bad)
{
    int rc = fmm_lock(c, 0, -1);
    if (rc)
        return rc;
    rc = fmm_set_many(c, 0, b->it, n, 0, NULL, NULL, bad);
    fmm_unlock(c, 0);
    return rc;
}

/* How many of the batch's n keys the page holds, each with its value. */
static uint32_t batch_present(fmm_cache *c, const batch_buf *b, uint32_t n, uint32_t vlen)
{
    uint32_t found = 0;
    if (fmm_lock(c, 0, -1) != 0)
        return UINT32_MAX;
    for (uint32_t i = 0; i < n; i++) {
        fmm_item it;
        if (fmm_get(c, 0, b->it[i].hash, b->keys[i], b->it[i].klen, 0, &it) == 0) {
            found++;
            CHECK(it.vlen == vlen && memcmp(it.val, b->vals[i], vlen) == 0);
        }
    }
    fmm_unlock(c, 0);
    return found;
}

static void set_many_format(int format, const char *tag)
{
    char name[64];
    snprintf(name, sizeof name, "many-%s.fmm", tag);
    fmm_cache *c = open_batch_cache(name, format, 4096);
    CHECK(c != NULL);
    if (!c)
        return;
    batch_buf *b = calloc(1, sizeof *b);
    uint32_t bad = 99;

    /* Too big together: five 1.5 KiB items in a 4 KiB page store nothing
     * and evict nothing. */
    CHECK_EQ(ksets(c, "old", "kept"), 0);
    batch_fill(c, b, 5, 1536);
    CHECK_RC(batch_store(c, b, 5, &bad), FMM_ETOOBIG);
    CHECK_EQ(bad, 5);
    CHECK_EQ(batch_present(c, b, 5, 1536), 0);
    CHECK(khas(c, "old"));
    CHECK_EQ(count_entries(c), 1);

    /* One item that can never fit: its index, nothing stored. */
    batch_fill(c, b, 3, 100);
    b->it[1].vlen = fmm_max_item(c); /* + the key: over the limit */
    CHECK_RC(batch_store(c, b, 3, &bad), FMM_ETOOBIG);
    CHECK_EQ(bad, 1);
    CHECK_EQ(count_entries(c), 1);

    /* The size rule of every store: klen + vlen up to max_item - 20. */
    uint32_t most = fmm_max_item(c) - FMM_ENTRY_HEADER_SIZE;
    CHECK(fmm_item_fits(c, 2, most - 2));
    CHECK(!fmm_item_fits(c, 2, most - 1));
    for (uint32_t below = 0; below < 4; below++) {
        batch_fill(c, b, 1, 0);
        b->it[0].vlen = most - 2 - below; /* "b0": 2 bytes of key */
        CHECK_RC(batch_store(c, b, 1, &bad), 0);
        CHECK_RC(kset(c, "b0", b->vals[0], most - 2 - below), 0);
    }

    /* A batch that fits after eviction: stored entirely, others evicted. */
    char k[16];
    for (int i = 0; i < 40; i++) {
        snprintf(k, sizeof k, "s%d", i);
        CHECK_EQ(ksets(c, k, "0123456789012345678901234567890123456789"), 0);
    }
    batch_fill(c, b, 2, 1500);
    CHECK_RC(batch_store(c, b, 2, &bad), 0);
    CHECK_EQ(b->it[0].rc, 0);
    CHECK_EQ(b->it[1].rc, 0);
    CHECK_EQ(batch_present(c, b, 2, 1500), 2);
    CHECK_EQ(check_all_pages(c), 0);
    /* and again over itself (each key replaced), then with a duplicate key */
    CHECK_RC(batch_store(c, b, 2, &bad), 0);
    CHECK_EQ(batch_present(c, b, 2, 1500), 2);
    batch_fill(c, b, 3, 1000);
    b->it[2] = b->it[0];
    CHECK_RC(batch_store(c, b, 3, &bad), 0);
    CHECK_EQ(batch_present(c, b, 2, 1000), 2);
    CHECK_EQ(check_all_pages(c), 0);

    /* A tombstone holds "b1": that item is refused, the others stored, even
     * though making room for the batch (nearly the whole data area: Perl's
     * slot table has grown by now) evicts the tombstone. */
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_expunge(c, 0, FMM_EXPUNGE_ALL, NULL, NULL), 0);
    fmm_unlock(c, 0);
    CHECK_RC(ktomb(c, "b1", 5, 0), 0);
    batch_fill(c, b, 3, format == FMM_FORMAT_PERL ? 1080 : 1290);
    CHECK_RC(batch_store(c, b, 3, &bad), 0);
    CHECK_EQ(b->it[0].rc, 0);
    CHECK_EQ(b->it[1].rc, FMM_EREFUSED);
    CHECK_EQ(b->it[2].rc, 0);
    CHECK(khas(c, "b0") && !khas(c, "b1") && khas(c, "b2"));
    CHECK_EQ(check_all_pages(c), 0);

    /* SIGKILL at every item boundary (k - 1 items stored): the next locker
     * re-initialises the page, which then holds none of the batch. */
    enum { N = 4 };
    for (uint32_t kk = 1; kk <= N + 1; kk++) {
        CHECK_EQ(fmm_lock(c, 0, -1), 0);
        CHECK_EQ(fmm_expunge(c, 0, FMM_EXPUNGE_ALL, NULL, NULL), 0);
        fmm_unlock(c, 0);
        CHECK_EQ(ksets(c, "old", "kept"), 0);
        batch_fill(c, b, N, 700);
        uint64_t before = fmm_repairs(c);
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0) {
            fmm_set_batch_fault(c, kk);
            batch_store(c, b, N, NULL);
            _exit(0); /* not killed: the test fails on the status */
        }
        CHECK_EQ(wait_child(pid), 1000 + SIGKILL);
        CHECK_EQ(batch_present(c, b, N, 700), 0);
        CHECK(!khas(c, "old")); /* the page was re-initialised */
        CHECK_EQ(fmm_repairs(c), before + 1);
        CHECK_EQ(check_all_pages(c), 0);
    }
    /* and without the fault, the same batch is stored whole */
    batch_fill(c, b, N, 700);
    CHECK_RC(batch_store(c, b, N, &bad), 0);
    CHECK_EQ(batch_present(c, b, N, 700), N);
    free(b);
    fmm_close(c);
}

static void test_set_many(void)
{
    set_many_format(FMM_FORMAT_NATIVE, "native");
    set_many_format(FMM_FORMAT_PERL, "perl");
}

/* A child process that holds page `page` of c until told to let go.
 * Returns the pid; *release is the fd to write to. */
static pid_t hold_page_in_child(fmm_cache *c, uint32_t page, int *release)
{
    int up[2], down[2];
    if (pipe(up) != 0 || pipe(down) != 0)
        return -1;
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(up[0]);
        close(down[1]);
        if (fmm_lock(c, page, -1) != 0)
            _exit(2);
        write_byte(up[1], 'L');
        read_byte(down[0]); /* wait for the parent (or its death) */
        fmm_unlock(c, page);
        _exit(0);
    }
    close(up[1]);
    close(down[0]);
    int ok = pid > 0 && read_byte(up[0]) == 'L';
    close(up[0]);
    *release = down[1];
    if (!ok && pid > 0) {
        close(down[1]);
        wait_child(pid);
        return -1;
    }
    return pid;
}

/* Two threads of one handle: each reads the detail of its own last error,
 * even after the other thread failed in between (free-threaded Python runs
 * them in parallel). */
typedef struct {
    fmm_cache *c;
    sem_t a_failed, b_failed;
    char b_detail[256];
} errdetail_ctx;

static void *errdetail_thread_b(void *arg)
{
    errdetail_ctx *x = arg;
    sem_wait(&x->a_failed);
    CHECK_RC(fmm_unlock(x->c, 2), FMM_EBADARG);
    snprintf(x->b_detail, sizeof x->b_detail, "%s", fmm_errdetail(x->c));
    sem_post(&x->b_failed);
    return NULL;
}

static void test_errdetail_per_thread(void)
{
    errdetail_ctx x;
    x.c = open_anon(4096, 4);
    CHECK(x.c != NULL);
    if (!x.c)
        return;
    sem_init(&x.a_failed, 0, 0);
    sem_init(&x.b_failed, 0, 0);
    pthread_t tb;
    CHECK_EQ(pthread_create(&tb, NULL, errdetail_thread_b, &x), 0);
    CHECK_RC(fmm_unlock(x.c, 1), FMM_EBADARG); /* "page 1 is not locked by this thread" */
    sem_post(&x.a_failed);
    sem_wait(&x.b_failed); /* thread b failed on page 2 meanwhile */
    CHECK(strstr(fmm_errdetail(x.c), "page 1 ") != NULL);
    pthread_join(tb, NULL);
    CHECK(strstr(x.b_detail, "page 2 ") != NULL);
    sem_destroy(&x.a_failed);
    sem_destroy(&x.b_failed);
    fmm_close(x.c);
}

static void test_locking_rules(void)
{
    char pa[PATH_MAX], pb[PATH_MAX];
    tpath(pa, "lock-a.fmm");
    tpath(pb, "lock-b.fmm");
    fmm_cache *a = open_geom(pa, 4096, 4), *b = open_geom(pb, 4096, 4);
    CHECK(a && b);
    if (!a || !b) {
        fmm_close(a);
        fmm_close(b);
        return;
    }
    /* the same page twice, or a second page: FMM_ELOCKED, no deadlock */
    CHECK_EQ(fmm_lock(a, 1, -1), 0);
    CHECK_RC(fmm_lock(a, 1, -1), FMM_ELOCKED);
    CHECK_RC(fmm_lock(a, 1, 0), FMM_ELOCKED);
    CHECK_RC(fmm_lock(a, 2, -1), FMM_ELOCKED);
    CHECK(fmm_errdetail(a)[0] != 0);
    /* another cache is independent */
    CHECK_EQ(fmm_lock(b, 1, -1), 0);
    CHECK_RC(ksets(a, "x", "y"), FMM_ELOCKED); /* whatever page "x" is on */
    fmm_unlock(b, 1);
    fmm_unlock(a, 1);
    /* after unlocking, both pages can be taken in turn */
    CHECK_EQ(fmm_lock(a, 2, -1), 0);
    fmm_unlock(a, 2);
    CHECK_EQ(fmm_lock(a, 1, 0), 0);
    fmm_unlock(a, 1);
    /* a page out of range */
    CHECK_RC(fmm_lock(a, 4, -1), FMM_EBADARG);
    CHECK_RC(fmm_lock(a, UINT32_MAX, 0), FMM_EBADARG);
    /* two handles on one file, different pages, one thread: fine */
    fmm_config zero = {0};
    fmm_cache *a2 = open_cfg(pa, &zero, NULL);
    CHECK(a2 != NULL);
    if (a2) {
        CHECK_EQ(fmm_lock(a, 0, -1), 0);
        CHECK_EQ(fmm_lock(a2, 3, -1), 0);
        /* the same page through the other handle: refused, not a deadlock */
        int rc = fmm_lock(a2, 0, 0);
        CHECK(rc == FMM_ELOCKED || rc == FMM_EBUSY);
        fmm_unlock(a2, 3);
        fmm_unlock(a, 0);
        fmm_close(a2);
    }

    /* a thread holding pages of too many caches: FMM_ETOOMANY */
    enum { NC = 12 };
    fmm_cache *many[NC];
    int locked[NC] = {0}, ok = 0, toomany = 0;
    for (int i = 0; i < NC; i++) {
        many[i] = open_anon(4096, 1);
        CHECK(many[i] != NULL);
        if (!many[i])
            continue;
        int rc = fmm_lock(many[i], 0, -1);
        if (rc == 0) {
            locked[i] = 1;
            ok++;
        } else if (rc == FMM_ETOOMANY) {
            toomany++;
        } else {
            CHECK_RC(rc, 0);
        }
    }
    CHECK(ok >= 2);
    CHECK_EQ(ok + toomany, NC);
    for (int i = 0; i < NC; i++) {
        if (locked[i])
            fmm_unlock(many[i], 0);
        fmm_close(many[i]);
    }

    /* held by another process: timeout 0 -> EBUSY; 50 ms -> ETIMEDOUT */
    int release = -1;
    pid_t pid = hold_page_in_child(a, 2, &release);
    CHECK(pid > 0);
    if (pid > 0) {
        uint64_t rep = fmm_repairs(a);
        CHECK_RC(fmm_lock(a, 2, 0), FMM_EBUSY);
        double t0 = now_s();
        CHECK_RC(fmm_lock(a, 2, 50 * 1000000LL), FMM_ETIMEDOUT);
        double waited = now_s() - t0;
        CHECK(waited >= 0.045);
        CHECK(waited < 5.0);
        /* other pages are free meanwhile */
        CHECK_EQ(fmm_lock(a, 3, 0), 0);
        fmm_unlock(a, 3);
        /* a long timeout succeeds once the holder lets go */
        write_byte(release, 'U');
        CHECK_EQ(fmm_lock(a, 2, 5000 * 1000000LL), 0);
        fmm_unlock(a, 2);
        close(release);
        CHECK_EQ(wait_child(pid), 0);
        CHECK_EQ(fmm_repairs(a), rep);
    }
    CHECK_EQ(check_all_pages(a), 0);
    fmm_close(a);
    fmm_close(b);
}

/* Locked read-increment-write of one 8-byte counter. */
static int incr(fmm_cache *c, const char *k)
{
    uint32_t klen = (uint32_t)strlen(k);
    uint64_t h = fmm_hash(c, k, klen);
    uint32_t p = fmm_page_of(c, h);
    int rc = fmm_lock(c, p, -1);
    if (rc)
        return rc;
    fmm_item it;
    uint64_t n = 0;
    rc = fmm_get(c, p, h, k, klen, 1, &it);
    if (rc == 0 && it.vlen == sizeof n)
        memcpy(&n, it.val, sizeof n);
    else if (rc == 0)
        rc = -1;
    else if (rc == FMM_ENOTFOUND)
        rc = 0;
    if (rc == 0) {
        n++;
        rc = fmm_set(c, p, h, k, klen, &n, sizeof n, 0, 0, NULL, NULL);
    }
    fmm_unlock(c, p);
    return rc;
}
static uint64_t counter_value(fmm_cache *c, const char *k)
{
    uint64_t n = 0;
    uint32_t vl = 0;
    char buf[16];
    if (kget_full(c, k, 0, buf, sizeof buf, &vl, NULL) == 0 && vl == sizeof n)
        memcpy(&n, buf, sizeof n);
    return n;
}

typedef struct thr_arg {
    fmm_cache *c;
    int n, errors;
} thr_arg;
static void *incr_thread(void *p)
{
    thr_arg *t = p;
    for (int i = 0; i < t->n; i++)
        if (incr(t->c, "counter") != 0)
            t->errors++;
    return NULL;
}

static void test_threads_counter(void)
{
    fmm_cache *c = open_anon(4096, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    enum { NT = 4, PER = 10000 };
    pthread_t th[NT];
    thr_arg args[NT];
    int started[NT] = {0};
    for (int i = 0; i < NT; i++) {
        args[i].c = c;
        args[i].n = PER;
        args[i].errors = 0;
        started[i] = pthread_create(&th[i], NULL, incr_thread, &args[i]) == 0;
        CHECK(started[i]);
    }
    int errors = 0;
    for (int i = 0; i < NT; i++) {
        if (started[i])
            pthread_join(th[i], NULL);
        errors += args[i].errors;
    }
    CHECK_EQ(errors, 0);
    CHECK_EQ(counter_value(c, "counter"), NT * PER);
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

static void test_cross_process_counter(void)
{
    char path[PATH_MAX];
    tpath(path, "xproc.fmm");
    fmm_cache *c = open_geom(path, 4096, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    enum { PER = 5000 };
    pid_t pids[2];
    fflush(NULL);
    for (int i = 0; i < 2; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            /* child 0 uses the inherited mapping, child 1 opens the path */
            fmm_cache *cc = c;
            if (i == 1) {
                fmm_config zero = {0};
                if (fmm_open(path, &zero, &cc, NULL, NULL, 0) != 0)
                    _exit(2);
            }
            for (int j = 0; j < PER; j++)
                if (incr(cc, "counter") != 0)
                    _exit(3);
            _exit(0);
        }
        CHECK(pids[i] > 0);
    }
    for (int i = 0; i < 2; i++)
        if (pids[i] > 0)
            CHECK_EQ(wait_child(pids[i]), 0);
    CHECK_EQ(counter_value(c, "counter"), 2 * PER);
    CHECK_EQ(check_all_pages(c), 0);
    CHECK_EQ(fmm_repairs(c), 0);
    fmm_close(c);

    /* an anonymous cache is shared with forked children too */
    c = open_anon(4096, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    fflush(NULL);
    for (int i = 0; i < 2; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            for (int j = 0; j < PER / 5; j++)
                if (incr(c, "counter") != 0)
                    _exit(3);
            char key[32];
            snprintf(key, sizeof key, "from-%d", i);
            _exit(ksets(c, key, "child") == 0 ? 0 : 4);
        }
        CHECK(pids[i] > 0);
    }
    for (int i = 0; i < 2; i++)
        if (pids[i] > 0)
            CHECK_EQ(wait_child(pids[i]), 0);
    CHECK_EQ(counter_value(c, "counter"), 2 * (PER / 5));
    CHECK(kiss(c, "from-0", "child"));
    CHECK(kiss(c, "from-1", "child"));
    fmm_close(c);
}

/* Fork a child that locks `page`, optionally marks it dirty through the
 * documented header layout (uint16 dirty at offset PH_DIRTY), and exits without
 * unlocking. */
static int die_holding(fmm_cache *c, uint32_t page, int dirty)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        if (fmm_lock(c, page, -1) != 0)
            _exit(2);
        if (dirty) {
            uint16_t one = 1;
            memcpy(fmm_page_ptr(c, page) + PH_DIRTY, &one, sizeof one);
        }
        _exit(0);
    }
    return pid > 0 ? wait_child(pid) : -1;
}

static void test_crash_repair(void)
{
    char path[PATH_MAX];
    tpath(path, "crash.fmm");
    fmm_cache *c = open_geom(path, 8192, 4);
    CHECK(c != NULL);
    if (!c)
        return;
    char k[16];
    enum { N = 60 };
    for (int i = 0; i < N; i++) {
        snprintf(k, sizeof k, "c%d", i);
        CHECK_EQ(ksets(c, k, k), 0);
    }
    const uint32_t victim = fmm_page_of(c, fmm_hash(c, "c0", 2));
    int in_victim = 0;
    for (int i = 0; i < N; i++) {
        snprintf(k, sizeof k, "c%d", i);
        in_victim += fmm_page_of(c, fmm_hash(c, k, strlen(k))) == victim;
    }
    CHECK(in_victim > 0 && in_victim < N);

    /* a holder that dies with the page clean: nothing lost, no repair */
    uint64_t rep0 = fmm_repairs(c);
    CHECK_EQ(die_holding(c, victim, 0), 0);
    CHECK_EQ(fmm_lock(c, victim, -1), 0);
    fmm_unlock(c, victim);
    CHECK_EQ(fmm_repairs(c), rep0);
    for (int i = 0; i < N; i++) {
        snprintf(k, sizeof k, "c%d", i);
        CHECK(kiss(c, k, k));
    }
    CHECK_EQ(check_all_pages(c), 0);

    /* a holder that dies mid-write (dirty): the page is re-initialised */
    CHECK_EQ(die_holding(c, victim, 1), 0);
    CHECK_EQ(fmm_lock(c, victim, -1), 0);
    char msg[256];
    CHECK_EQ(fmm_check_page(c, victim, msg, sizeof msg), 0);
    fmm_unlock(c, victim);
    CHECK_EQ(fmm_repairs(c), rep0 + 1);
    for (int i = 0; i < N; i++) {
        snprintf(k, sizeof k, "c%d", i);
        int in = fmm_page_of(c, fmm_hash(c, k, strlen(k))) == victim;
        CHECK_EQ(khas(c, k), !in);
    }
    CHECK_EQ(check_all_pages(c), 0);
    CHECK_EQ(fmm_repairs(c), rep0 + 1); /* once only */
    /* the repaired page works, and the repair count is file-wide */
    CHECK_EQ(ksets(c, "c0", "again"), 0);
    CHECK(kiss(c, "c0", "again"));
    fmm_config zero = {0};
    fmm_cache *c2 = open_cfg(path, &zero, NULL);
    CHECK(c2 != NULL);
    if (c2) {
        CHECK_EQ(fmm_repairs(c2), rep0 + 1);
        CHECK(kiss(c2, "c0", "again"));
        fmm_close(c2);
    }
    /* a dead holder seen through a timed lock and a try-lock too */
    CHECK_EQ(die_holding(c, victim, 1), 0);
    CHECK_EQ(fmm_lock(c, victim, 0), 0);
    fmm_unlock(c, victim);
    CHECK_EQ(fmm_repairs(c), rep0 + 2);
    CHECK(!khas(c, "c0"));
    CHECK_EQ(ksets(c, "c0", "third"), 0);
    CHECK_EQ(die_holding(c, victim, 1), 0);
    CHECK_EQ(fmm_lock(c, victim, 1000 * 1000000LL), 0);
    fmm_unlock(c, victim);
    CHECK_EQ(fmm_repairs(c), rep0 + 3);
    CHECK(!khas(c, "c0"));
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

static void test_check_file(void)
{
    char path[PATH_MAX], other[PATH_MAX];
    tpath(path, "cf.fmm");
    tpath(other, "cf-other.fmm");
    fmm_cache *c = open_geom(path, 4096, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    CHECK_EQ(fmm_check_file(c), 0);
    /* another file renamed over the path */
    fmm_cache *o = open_geom(other, 4096, 2);
    CHECK(o != NULL);
    fmm_close(o);
    CHECK(rename(other, path) == 0);
    CHECK_RC(fmm_check_file(c), FMM_EREPLACED);
    fmm_close(c);
    /* the path unlinked */
    c = open_geom(path, 4096, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    CHECK_EQ(fmm_check_file(c), 0);
    CHECK(unlink(path) == 0);
    CHECK_RC(fmm_check_file(c), FMM_EREPLACED);
    /* the handle keeps working on its (now unlinked) file */
    CHECK_EQ(ksets(c, "still", "works"), 0);
    CHECK(kiss(c, "still", "works"));
    fmm_close(c);
    /* anonymous caches have no path to lose */
    c = open_anon(4096, 1);
    CHECK(c != NULL);
    CHECK_EQ(fmm_check_file(c), 0);
    fmm_close(c);
}

/* ---- corruption fuzz ---- */

typedef struct fuzz_ctx {
    const unsigned char *lo, *hi; /* items must lie in [lo, hi) */
    long visits, bad;
    unsigned sum;
} fuzz_ctx;

static int in_page(const fuzz_ctx *f, const void *p, uint32_t n)
{
    const unsigned char *q = p;
    return q >= f->lo && q <= f->hi && n <= (size_t)(f->hi - q);
}

static int fuzz_visit(void *ctx, const fmm_item *it)
{
    fuzz_ctx *f = ctx;
    f->visits++;
    if (!in_page(f, it->key, it->klen) || !in_page(f, it->val, it->vlen)) {
        f->bad++;
        return 0;
    }
    /* read every byte handed out, so that a sanitizer sees a bad range */
    for (uint32_t i = 0; i < it->klen; i++)
        f->sum += (unsigned char)it->key[i];
    for (uint32_t i = 0; i < it->vlen; i++)
        f->sum += (unsigned char)it->val[i];
    return 0;
}

static void put32(unsigned char *pg, uint32_t off, uint32_t v) { memcpy(pg + off, &v, 4); }
static uint32_t get32(const unsigned char *pg, uint32_t off)
{
    uint32_t v;
    memcpy(&v, pg + off, 4);
    return v;
}

/* One random act of corruption somewhere in [PH_FIELDS, ps): anywhere but
 * the mutex. */
static void scribble(unsigned char *pg, uint32_t ps, uint64_t *s)
{
    uint32_t ns = get32(pg, PH_NUM_SLOTS);
    uint32_t max_slots = (ps - FMM_PAGE_HEADER_SIZE) / 4;
    if (ns == 0 || ns > max_slots)
        ns = max_slots;
    uint32_t ds = FMM_PAGE_HEADER_SIZE + 4 * ns;
    switch (rng_below(s, 7)) {
    case 0: { /* random bytes over a random range */
        uint32_t off = PH_FIELDS + rng_below(s, ps - PH_FIELDS);
        uint32_t lim = (uint32_t[]){4, 32, 512, ps}[rng_below(s, 4)];
        uint32_t len = 1 + rng_below(s, lim);
        if (len > ps - off)
            len = ps - off;
        for (uint32_t i = 0; i < len; i++)
            pg[off + i] = (unsigned char)rng_next(s);
        break;
    }
    case 1: { /* a page-header field, with a plausible or a wild value */
        uint32_t off = PH_FIELDS + 4 * rng_below(s, 16);
        uint32_t cur = get32(pg, off), v;
        switch (rng_below(s, 6)) {
        case 0: v = (uint32_t)rng_next(s); break;
        case 1: v = rng_below(s, 64); break;
        case 2: v = 1u << rng_below(s, 32); break;
        case 3: v = cur + rng_below(s, 9) - 4; break;
        case 4: v = 4 * rng_below(s, ps / 4 + 2); break;
        default: v = cur ^ (1u << rng_below(s, 32)); break;
        }
        put32(pg, off, v);
        break;
    }
    case 2: { /* a slot */
        uint32_t idx = rng_below(s, ns);
        uint32_t off = FMM_PAGE_HEADER_SIZE + 4 * idx, cur = get32(pg, off), v;
        uint32_t offmask = ps / 4 - 1;
        switch (rng_below(s, 6)) {
        case 0: v = (uint32_t)rng_next(s); break;
        case 1: v = 0; break;
        case 2: v = 1; break;
        case 3: v = (cur & ~offmask) | rng_below(s, offmask + 1); break;
        case 4: v = get32(pg, FMM_PAGE_HEADER_SIZE + 4 * rng_below(s, ns)); break; /* duplicate */
        default: v = (cur & ~offmask) | (((cur & offmask) + rng_below(s, 9) - 4) & offmask); break;
        }
        put32(pg, off, v);
        break;
    }
    case 3: { /* an entry-header word: lengths, expiry, access */
        if (ds + 24 >= ps)
            break;
        uint32_t off = (ds + rng_below(s, ps - ds - 24)) & ~3u;
        uint32_t v;
        switch (rng_below(s, 5)) {
        case 0: v = (uint32_t)rng_next(s); break;
        case 1: v = 0xFFFFFFFFu; break;
        case 2: v = 0x00FFFFFFu | ((uint32_t)rng_below(s, 256) << 24); break;
        case 3: v = ps - rng_below(s, 64); break;
        default: v = rng_below(s, 300); break;
        }
        put32(pg, off, v);
        break;
    }
    case 6: /* num_slots: any power of two, however large */
        put32(pg, PH_NUM_SLOTS, 1u << rng_below(s, 32));
        break;
    case 4: { /* one flipped bit */
        uint32_t off = PH_FIELDS + rng_below(s, ps - PH_FIELDS);
        pg[off] ^= (unsigned char)(1u << rng_below(s, 8));
        break;
    }
    default: { /* zeroed range */
        uint32_t off = PH_FIELDS + rng_below(s, ps - PH_FIELDS);
        uint32_t len = 1 + rng_below(s, 64);
        if (len > ps - off)
            len = ps - off;
        memset(pg + off, 0, len);
        break;
    }
    }
}

static int pset(fmm_cache *c, uint32_t p, const char *k, const void *v, uint32_t vl, uint32_t exp)
{
    uint32_t kl = (uint32_t)strlen(k);
    return fmm_set(c, p, fmm_hash(c, k, kl), k, kl, v, vl, 0, exp, NULL, NULL);
}

/* What the fuzzing child reports through shared memory. */
typedef struct fuzz_shared {
    int current;   /* the seed being run */
    int done;      /* the child finished its range */
    int lock_fail, set_fail, info_bad, bad_after_set, lost_fresh, corrupt_seen;
    long bad_items, visits;
    uint64_t repairs;
} fuzz_shared;

/* Run seeds first..last on a fresh cache; called in a child process so
 * that a crash is reported as a failed seed instead of ending the driver. */
static void fuzz_range(fuzz_shared *sh, int first, int last)
{
    enum { PS = 8192, MAXK = 140 };
    /* Two pages; the fuzzed page is the last one of the mapping and the
     * page before it is made inaccessible, so that a read or write beyond
     * either end of the fuzzed page faults at once. */
    fmm_cache *c = open_anon(PS, 2);
    if (!c)
        _exit(2);
    const uint32_t P = 1;
    unsigned char *pg = fmm_page_ptr(c, P);
    unsigned char *guard = fmm_page_ptr(c, 0);
    if (pg != guard + PS || mprotect(guard, PS, PROT_NONE) != 0)
        _exit(3);
    const uint32_t T = 1700000000u;
    fmm_set_time(c, T);
    fuzz_ctx f = {pg + FMM_PAGE_HEADER_SIZE, pg + PS, 0, 0, 0};
    uint64_t rep0 = fmm_repairs(c);
    char key[32], val[160], msg[256];
    for (int seed = first; seed <= last; seed++) {
        sh->current = seed;
        uint64_t s = (uint64_t)seed * 0x2545F4914F6CDD1DULL;
        /* a fresh page with live, expired and deleted entries and garbage */
        if (fmm_lock(c, P, -1) != 0) {
            sh->lock_fail++;
            continue;
        }
        fmm_init_page(c, P);
        int nk = 5 + (int)rng_below(&s, MAXK - 5);
        for (int i = 0; i < nk; i++) {
            snprintf(key, sizeof key, "z%d-%d", seed, i);
            uint32_t vl = rng_below(&s, 120);
            memset(val, 'a' + i % 26, vl);
            uint32_t exp = rng_below(&s, 4) == 0 ? T + rng_below(&s, 3) : 0;
            pset(c, P, key, val, vl, exp);
            if (rng_below(&s, 5) == 0) {
                snprintf(key, sizeof key, "z%d-%d", seed, (int)rng_below(&s, (uint32_t)i + 1));
                fmm_delete(c, P, fmm_hash(c, key, strlen(key)), key, (uint32_t)strlen(key), NULL);
            }
        }
        fmm_unlock(c, P);

        int acts = 1 + (int)rng_below(&s, 4);
        for (int a = 0; a < acts; a++)
            scribble(pg, PS, &s);

        /* every operation on the damaged page: no crash, no bad pointer */
        if (fmm_lock(c, P, -1) != 0) {
            sh->lock_fail++;
            continue;
        }
        for (int i = 0; i < nk; i++) {
            snprintf(key, sizeof key, "z%d-%d", seed, i);
            uint32_t kl = (uint32_t)strlen(key);
            fmm_item it;
            if (fmm_get(c, P, fmm_hash(c, key, kl), key, kl, i & 1, &it) == 0) {
                fuzz_visit(&f, &it);
                if (it.klen != kl || memcmp(it.key, key, kl) != 0)
                    f.bad++;
            }
        }
        snprintf(key, sizeof key, "z%d-%d", seed, (int)rng_below(&s, (uint32_t)nk));
        memset(val, 'Q', 50);
        if (pset(c, P, key, val, 50, 0) != 0)
            sh->set_fail++;
        snprintf(key, sizeof key, "z%d-%d", seed, (int)rng_below(&s, (uint32_t)nk));
        int rc = fmm_delete(c, P, fmm_hash(c, key, strlen(key)), key, (uint32_t)strlen(key), NULL);
        if (rc != 0 && rc != FMM_ENOTFOUND)
            sh->set_fail++;
        fmm_page_foreach(c, P, fuzz_visit, &f);
        fmm_page_info info;
        fmm_page_info_get(c, P, &info);
        if (info.free_data > PS || info.data_start != FMM_PAGE_HEADER_SIZE + 4 * info.num_slots ||
            info.expired > info.live)
            sh->info_bad++;
        if (fmm_check_page(c, P, msg, sizeof msg) != 0)
            sh->corrupt_seen++;
        if (seed % 3 == 0)
            fmm_expunge(c, P, seed % 6 == 0 ? FMM_EXPUNGE_EXPIRED : FMM_EXPUNGE_ALL, NULL, NULL);
        fmm_page_foreach(c, P, fuzz_visit, &f);

        /* Damage inside the page (a wrong tag or count) is only found by a
         * compaction, which rehashes every key: compact, then one set of a
         * fresh key leaves a valid page. */
        fmm_expunge(c, P, FMM_EXPUNGE_EXPIRED, NULL, NULL);
        snprintf(key, sizeof key, "fresh-%d", seed);
        snprintf(val, sizeof val, "value-%d", seed);
        if (pset(c, P, key, val, (uint32_t)strlen(val), 0) != 0)
            sh->set_fail++;
        if (fmm_check_page(c, P, msg, sizeof msg) != 0) {
            if (sh->bad_after_set < 5)
                fprintf(stderr, "    seed %d: after a fresh set the page is still invalid: %s\n", seed, msg);
            sh->bad_after_set++;
        }
        fmm_item it;
        uint32_t kl = (uint32_t)strlen(key);
        if (fmm_get(c, P, fmm_hash(c, key, kl), key, kl, 1, &it) != 0 || it.vlen != strlen(val) ||
            memcmp(it.val, val, it.vlen) != 0)
            sh->lost_fresh++;
        fmm_unlock(c, P);
        sh->bad_items = f.bad;
        sh->visits = f.visits;
        sh->repairs = fmm_repairs(c) - rep0;
    }
    sh->done = 1;
    fflush(NULL);
    _exit(0);
}

static void test_corruption_fuzz(void)
{
    /* FMM_FUZZ_SEEDS=n runs a longer fuzz by hand */
    int seeds = 500;
    const char *env = getenv("FMM_FUZZ_SEEDS");
    if (env && atoi(env) > 0)
        seeds = atoi(env);
    fuzz_shared *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(sh != MAP_FAILED);
    if (sh == MAP_FAILED)
        return;
    memset(sh, 0, sizeof *sh);
    /* The seeds run in a child; if it dies, the seed is a failure and a
     * new child carries on with the next one (up to a limit). */
    int next = 1, crashes = 0, crash_seeds[5];
    long bad_items = 0, visits = 0;
    uint64_t repairs = 0;
    while (next <= seeds && crashes < 5) {
        sh->done = 0;
        sh->current = next;
        fflush(NULL);
        pid_t pid = fork();
        if (pid == 0)
            fuzz_range(sh, next, seeds);
        CHECK(pid > 0);
        if (pid <= 0)
            break;
        int st = wait_child(pid);
        bad_items += sh->bad_items;
        visits += sh->visits;
        repairs += sh->repairs;
        sh->bad_items = sh->visits = 0;
        sh->repairs = 0;
        if (st == 0 && sh->done)
            break;
        crash_seeds[crashes++] = sh->current;
        fprintf(stderr, "    seed %d: the fuzzing process died (status %d)\n", sh->current, st);
        next = sh->current + 1;
    }
    CHECK_EQ(crashes, 0);
    if (crashes) {
        fprintf(stderr, "    crashing seeds:");
        for (int i = 0; i < crashes; i++)
            fprintf(stderr, " %d", crash_seeds[i]);
        fprintf(stderr, "%s\n", crashes == 5 ? " (gave up)" : "");
    }
    CHECK_EQ(sh->lock_fail, 0);
    CHECK_EQ(bad_items, 0);
    CHECK_EQ(sh->set_fail, 0);
    CHECK_EQ(sh->info_bad, 0);
    CHECK_EQ(sh->bad_after_set, 0);
    CHECK_EQ(sh->lost_fresh, 0);
    CHECK(visits > 0);
    CHECK(repairs > 0); /* some damage was seen and repaired */
    if (sh->bad_after_set)
        fprintf(stderr, "    %d of %d seeds: page invalid after a fresh set (%llu repairs, %d seen corrupt)\n",
                sh->bad_after_set, seeds, (unsigned long long)repairs, sh->corrupt_seen);
    munmap(sh, sizeof *sh);
}

static void test_stats(void)
{
    fmm_config cfg = {0};
    cfg.anonymous = 1;
    cfg.page_size = 8192;
    cfg.num_pages = 1;
    cfg.enable_stats = 1;
    fmm_cache *c = open_cfg(NULL, &cfg, NULL);
    CHECK(c != NULL);
    if (!c)
        return;
    CHECK_EQ(ksets(c, "a", "1"), 0);
    CHECK_EQ(ksets(c, "b", "2"), 0);
    CHECK(kget(c, "a", NULL, 0, NULL) == 0);
    CHECK(kget(c, "b", NULL, 0, NULL) == 0);
    CHECK(kget(c, "b", NULL, 0, NULL) == 0);
    CHECK(kget(c, "zz", NULL, 0, NULL) == FMM_ENOTFOUND);
    CHECK(khas(c, "a")); /* a peek (touch 0) is not counted */
    fmm_page_info info;
    page_info(c, 0, &info);
    CHECK_EQ(info.nreads, 4);
    CHECK_EQ(info.nhits, 3);
    CHECK_EQ(info.live, 2);
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    fmm_page_clear_stats(c, 0);
    fmm_page_info_get(c, 0, &info);
    fmm_unlock(c, 0);
    CHECK_EQ(info.nreads, 0);
    CHECK_EQ(info.nhits, 0);
    fmm_close(c);
    /* without enable_stats nothing is counted */
    c = open_anon(8192, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    CHECK_EQ(ksets(c, "a", "1"), 0);
    CHECK(kget(c, "a", NULL, 0, NULL) == 0);
    page_info(c, 0, &info);
    CHECK_EQ(info.nreads, 0);
    CHECK_EQ(info.nhits, 0);
    fmm_close(c);
}

/* The smallest page, and a page so big that slot tags are too narrow to
 * hold the home index once the table passes 1024 slots (compaction must
 * then rehash the keys). */
static void test_page_size_extremes(void)
{
    fmm_cache *c = open_anon(FMM_MIN_PAGE_SIZE, 2);
    CHECK(c != NULL);
    if (c) {
        char k[16], v[64];
        memset(v, 'm', sizeof v);
        for (int i = 0; i < 200; i++) {
            snprintf(k, sizeof k, "m%d", i);
            CHECK_EQ(kset(c, k, v, 20), 0);
            CHECK(kis(c, k, v, 20));
        }
        CHECK_EQ(check_all_pages(c), 0);
        CHECK(count_entries(c) > 4);
        uint32_t mi = fmm_max_item(c);
        char *big = malloc(mi);
        memset(big, 'B', mi);
        CHECK_EQ(kset(c, "B", big, mi - FMM_ENTRY_HEADER_SIZE - 1), 0);
        CHECK(kis(c, "B", big, mi - FMM_ENTRY_HEADER_SIZE - 1));
        CHECK_RC(kset(c, "B", big, mi - FMM_ENTRY_HEADER_SIZE), FMM_ETOOBIG);
        free(big);
        CHECK_EQ(check_all_pages(c), 0);
        fmm_close(c);
    }

    c = open_anon(1u << 24, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    enum { N = 3000 };
    char k[16];
    for (int i = 0; i < N; i++) {
        snprintf(k, sizeof k, "b%d", i);
        CHECK_EQ(kset(c, k, k, (uint32_t)strlen(k)), 0);
    }
    fmm_page_info info;
    page_info(c, 0, &info);
    CHECK(info.num_slots > 2048);
    CHECK_EQ(info.live, N);
    for (int i = 0; i < N; i++) {
        snprintf(k, sizeof k, "b%d", i);
        CHECK(kiss(c, k, k));
    }
    CHECK_EQ(check_all_pages(c), 0);
    for (int i = 0; i < N - 5; i++) {
        snprintf(k, sizeof k, "b%d", i);
        CHECK_EQ(kdel(c, k), 0);
    }
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_expunge(c, 0, FMM_EXPUNGE_EXPIRED, NULL, NULL), 0);
    fmm_page_info_get(c, 0, &info);
    fmm_unlock(c, 0);
    CHECK(info.num_slots <= 128);
    for (int i = N - 5; i < N; i++) {
        snprintf(k, sizeof k, "b%d", i);
        CHECK(kiss(c, k, k));
    }
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}


/* ------------------------------------------------------------------ SIGBUS guard */

/* Truncate the file under live handles: every touch of the lost range would
 * raise SIGBUS; the guard turns it into FMM_EREPLACED on that handle. */
/* valgrind preloads its vgpreload_*.so into the program it runs. */
static int under_valgrind(void)
{
    const char *p = getenv("LD_PRELOAD");
    return p && strstr(p, "vgpreload") != NULL;
}

static void test_guard_truncate(void)
{
    if (under_valgrind()) {
        /* valgrind does not resume a faulting access after a SIGBUS handler
         * has replaced the mapping (it re-executes with a clobbered address
         * and then dies of SIGSEGV): only the sanitizer build runs this. */
        printf("skip test_guard_truncate: valgrind cannot resume an access after the SIGBUS guard remaps it\n");
        return;
    }
    char path[PATH_MAX], other[PATH_MAX];
    tpath(path, "guard.fmm");
    tpath(other, "guard-other.fmm");
    fmm_cache *a = open_geom(path, 4096, 4);
    fmm_cache *b = open_geom(path, 4096, 4);
    fmm_cache *o = open_geom(other, 4096, 4);
    fmm_cache *d = open_geom(path, 4096, 4); /* only probes */
    CHECK(a && b && o && d);
    if (!a || !b || !o || !d) {
        fmm_close(a);
        fmm_close(b);
        fmm_close(o);
        fmm_close(d);
        return;
    }
    CHECK(fmm_guard_active());
    (void)*fmm_probe_addr(d); /* the whole file is there: no fault */
    CHECK(!fmm_lost(d));
    char k[32];
    for (int i = 0; i < 40; i++) {
        snprintf(k, sizeof k, "key%d", i);
        CHECK_EQ(ksets(a, k, k), 0);
        CHECK_EQ(ksets(o, k, k), 0);
    }
    /* a key on page 0 and one on page 3 */
    const char *k0 = NULL, *k3 = NULL;
    static char kk0[32], kk3[32];
    for (int i = 0; i < 40 && (!k0 || !k3); i++) {
        snprintf(k, sizeof k, "key%d", i);
        uint32_t p = fmm_page_of(a, fmm_hash(a, k, strlen(k)));
        if (p == 0 && !k0)
            k0 = strcpy(kk0, k);
        if (p == 3 && !k3)
            k3 = strcpy(kk3, k);
    }
    CHECK(k0 && k3);
    if (!k0 || !k3)
        k0 = k3 = "key0";

    /* a holds page 3's lock while the file shrinks to the middle of page 2 */
    uint32_t h3len = (uint32_t)strlen(k3);
    uint64_t h3 = fmm_hash(a, k3, h3len);
    CHECK_EQ(fmm_lock(a, 3, -1), 0);
    int fd = open(path, O_RDWR | O_CLOEXEC);
    CHECK(fd >= 0);
    CHECK(ftruncate(fd, FMM_HEADER_SIZE + 2 * 4096 + 1000) == 0);
    CHECK_RC(fmm_check_file(a), FMM_EREPLACED); /* cheap detection: no byte touched */
    CHECK(!fmm_lost(a));
    fmm_item it;
    /* touches page 3: SIGBUS, the mapping turns to zeros, the lookup misses */
    CHECK_RC(fmm_get(a, 3, h3, k3, h3len, FMM_GET_TOUCH, &it), FMM_ENOTFOUND);
    CHECK(fmm_lost(a));
    CHECK_RC(fmm_set(a, 3, h3, k3, h3len, "x", 1, 0, 0, NULL, NULL), 0); /* into zero memory: harmless */
    CHECK_RC(fmm_unlock(a, 3), FMM_EREPLACED);
    CHECK(!fmm_held(a, 3));
    CHECK_RC(kget(a, k0, NULL, 0, NULL), FMM_EREPLACED);
    CHECK_RC(ksets(a, k0, "v"), FMM_EREPLACED);
    CHECK_RC(kdel(a, k0), FMM_EREPLACED);
    CHECK_RC(fmm_lock(a, 0, 0), FMM_EREPLACED);
    CHECK_RC(fmm_check_file(a), FMM_EREPLACED);

    /* b has not touched the lost range: page 0 still works for it */
    CHECK(!fmm_lost(b));
    CHECK(kiss(b, k0, k0));
    CHECK(!fmm_lost(b));
    /* page 3 is gone for b too, once it touches it */
    CHECK_RC(kget(b, k3, NULL, 0, NULL), FMM_EREPLACED);
    CHECK(fmm_lost(b));
    /* the probe byte (the mapping's last) lies past the new end: reading it
     * faults, so a handle learns of a cut inside an OS page (which reads as
     * zeros, not SIGBUS) after any operation */
    CHECK(!fmm_lost(d));
    (void)*fmm_probe_addr(d);
    CHECK(fmm_lost(d));
    /* the other file's handle is unaffected */
    (void)*fmm_probe_addr(o);
    CHECK(!fmm_lost(o));
    for (int i = 0; i < 40; i++) {
        snprintf(k, sizeof k, "key%d", i);
        CHECK(kiss(o, k, k));
    }
    fmm_close(a);
    fmm_close(b);
    fmm_close(d);

    /* truncated to zero, then reopened: a clean error, then a fresh file */
    fmm_cache *c = open_geom(path, 4096, 4);
    CHECK(c == NULL); /* the file is now too short: FMM_EBADFILE */
    fmm_config cfg = {0};
    cfg.page_size = 4096;
    cfg.num_pages = 4;
    cfg.init_file = 1;
    c = open_cfg(path, &cfg, NULL);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(ksets(c, "k", "v"), 0);
        close(fd); /* init_file replaced the file: truncate the new one */
        fd = open(path, O_RDWR | O_CLOEXEC);
        CHECK(fd >= 0 && ftruncate(fd, 0) == 0);
        CHECK_RC(kget(c, "k", NULL, 0, NULL), FMM_EREPLACED);
        fmm_close(c);
    }
    close(fd);
    CHECK(fmm_guard_active());
    CHECK(kiss(o, "key1", "key1"));
    fmm_close(o);
}

/* More mappings than the guard's first table chunk holds are all guarded:
 * the table grows, and a truncation under the last handle opened is an
 * error on that handle, not a SIGBUS that kills the process.  In a child,
 * so that an unguarded mapping fails the test instead of ending the driver. */
static void test_guard_many_mappings(void)
{
    if (under_valgrind()) {
        printf("skip test_guard_many_mappings: valgrind cannot resume an access after the SIGBUS guard remaps it\n");
        return;
    }
    enum { N = 300 };
    char path[PATH_MAX];
    tpath(path, "guard-many.fmm");
    pid_t pid = fork();
    CHECK(pid >= 0);
    if (pid == 0) {
        static fmm_cache *h[N];
        int bad = 0;
        for (int i = 0; i < N; i++)
            if (!(h[i] = open_geom(path, 4096, 1)))
                _exit(10);
        if (fmm_guard_capacity() < N)
            _exit(11);
        /* a second round reuses the entries the first one freed */
        int cap = fmm_guard_capacity();
        for (int i = 0; i < N; i++) {
            fmm_close(h[i]);
            if (!(h[i] = open_geom(path, 4096, 1)))
                _exit(12);
        }
        if (fmm_guard_capacity() != cap)
            _exit(13);
        int fd = open(path, O_RDWR | O_CLOEXEC);
        if (fd < 0 || ftruncate(fd, 0) != 0)
            _exit(14);
        close(fd);
        /* the last handle opened, the first, and one in the middle */
        const int which[] = {N - 1, 0, N / 2};
        for (int j = 0; j < 3; j++) {
            (void)*fmm_probe_addr(h[which[j]]); /* past the end of the file now */
            bad += !fmm_lost(h[which[j]]);
            bad += ksets(h[which[j]], "k", "v") != FMM_EREPLACED;
        }
        for (int i = 0; i < N; i++)
            fmm_close(h[i]);
        _exit(bad ? 15 : 0);
    }
    int status = 0;
    CHECK(waitpid(pid, &status, 0) == pid);
    CHECK(WIFEXITED(status));
    if (WIFSIGNALED(status))
        printf("test_guard_many_mappings: the child died of signal %d\n", WTERMSIG(status));
    CHECK_EQ(WIFEXITED(status) ? WEXITSTATUS(status) : -1, 0);
}

/* Threads that register at once, past several table chunks, each get an
 * entry of their own (growth races on the last chunk's `next`). */
enum { GUARD_THREADS = 4, GUARD_PER_THREAD = 150 };
static char g_guard_area[GUARD_THREADS * GUARD_PER_THREAD];
static int g_guard_flags[GUARD_THREADS * GUARD_PER_THREAD];
static int g_guard_slots[GUARD_THREADS * GUARD_PER_THREAD];

static void *guard_register_many(void *arg)
{
    int t = (int)(intptr_t)arg;
    for (int i = t * GUARD_PER_THREAD; i < (t + 1) * GUARD_PER_THREAD; i++)
        g_guard_slots[i] = fmm_guard_register(&g_guard_area[i], 1, &g_guard_flags[i]);
    return NULL;
}

static void test_guard_concurrent_growth(void)
{
    enum { N = GUARD_THREADS * GUARD_PER_THREAD };
    pthread_t th[GUARD_THREADS];
    for (int t = 0; t < GUARD_THREADS; t++)
        CHECK(pthread_create(&th[t], NULL, guard_register_many, (void *)(intptr_t)t) == 0);
    for (int t = 0; t < GUARD_THREADS; t++)
        pthread_join(th[t], NULL);
    int bad = 0;
    for (int i = 0; i < N; i++) {
        bad += g_guard_slots[i] < 0;
        for (int j = 0; j < i; j++)
            bad += g_guard_slots[j] == g_guard_slots[i];
    }
    CHECK_EQ(bad, 0);
    CHECK(fmm_guard_capacity() >= N);
    for (int i = 0; i < N; i++)
        fmm_guard_unregister(g_guard_slots[i]);
}

/* A SIGBUS outside any cache mapping still goes to the previous handler. */
static sig_atomic_t g_foreign_bus;
static void foreign_bus_handler(int sig)
{
    (void)sig;
    g_foreign_bus = 1;
}
static void test_guard_chains_foreign(void)
{
    pid_t pid = fork();
    if (pid == 0) {
        signal(SIGBUS, foreign_bus_handler);
        char path[PATH_MAX];
        tpath(path, "guard-chain.fmm");
        fmm_cache *c = open_geom(path, 4096, 2); /* installs the guard over our handler */
        if (!c || !fmm_guard_active())
            _exit(3);
        raise(SIGBUS); /* not a fault in a cache: reaches foreign_bus_handler */
        int ok = g_foreign_bus == 1;
        fmm_close(c);
        if (under_valgrind())
            _exit(ok ? 0 : 4); /* dying of SIGBUS makes valgrind print the child's leak report: noise */
        /* with the default action before us, a foreign SIGBUS still kills */
        signal(SIGBUS, SIG_DFL);
        c = open_geom(path, 4096, 2);
        if (!ok || !c)
            _exit(4);
        raise(SIGBUS);
        _exit(5);
    }
    int st = 0;
    CHECK(waitpid(pid, &st, 0) == pid);
    if (under_valgrind())
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    else
        CHECK(WIFSIGNALED(st) && WTERMSIG(st) == SIGBUS);
    if (WIFEXITED(st))
        fprintf(stderr, "child exited with %d\n", WEXITSTATUS(st));
}

/* ------------------------------------------------------------------ lock-free reads */

/* The page's sequence word (documented layout): odd while the page is held. */
static uint32_t page_seq(fmm_cache *c, uint32_t p)
{
    return __atomic_load_n((const uint32_t *)(const void *)(fmm_page_ptr(c, p) + PH_SEQ), __ATOMIC_ACQUIRE);
}

#define OPT_TORN (-1)      /* fmm_read_valid rejected the read */
#define OPT_WRONG_KEY (-2) /* a validated hit for another key */

/* A lock-free read of key k as a caller does it: fmm_get_optimistic, copy
 * (at most cap bytes into buf, NUL-terminated if room), fmm_read_valid.
 * Returns 0, FMM_ENOTFOUND, FMM_EAGAIN, OPT_TORN or OPT_WRONG_KEY. */
static int oget(fmm_cache *c, const char *k, int touch, char *buf, size_t cap, uint32_t *vlen)
{
    uint32_t klen = (uint32_t)strlen(k);
    uint64_t h = fmm_hash(c, k, klen);
    uint32_t p = fmm_page_of(c, h);
    fmm_item it;
    uint32_t tok = 0;
    int rc = fmm_get_optimistic(c, p, h, k, klen, touch, &it, &tok);
    if (rc == FMM_EAGAIN)
        return rc;
    int same_key = 1;
    uint32_t n = 0;
    if (rc == 0) {
        same_key = it.klen == klen && memcmp(it.key, k, klen) == 0;
        n = it.vlen;
        if (buf && cap) {
            size_t m = n < cap ? n : cap;
            memcpy(buf, it.val, m);
            if (m < cap)
                buf[m] = 0;
        }
    }
    if (!fmm_read_valid(c, p, tok))
        return OPT_TORN;
    if (!same_key)
        return OPT_WRONG_KEY;
    if (vlen)
        *vlen = n;
    return rc;
}

/* 1 if a lock-free read of k validates with exactly the value v. */
static int oget_is(fmm_cache *c, const char *k, int touch, const char *v)
{
    char buf[512];
    uint32_t n = 0;
    size_t want = strlen(v);
    return oget(c, k, touch, buf, sizeof buf, &n) == 0 && n == want && memcmp(buf, v, want) == 0;
}

/* A key (written into buf) that hashes to page p of c. */
static const char *key_on_page(fmm_cache *c, uint32_t p, const char *prefix, char *buf, size_t cap)
{
    for (int i = 0; i < 100000; i++) {
        snprintf(buf, cap, "%s%d", prefix, i);
        if (fmm_page_of(c, fmm_hash(c, buf, strlen(buf))) == p)
            return buf;
    }
    abort();
}

/* A thread that holds one page until told to let go (the thread version
 * of hold_page_in_child). */
typedef struct holder {
    fmm_cache *c;
    uint32_t page;
    int up[2], down[2];
    int rc;
} holder;
static void *holder_thread(void *p)
{
    holder *h = p;
    h->rc = fmm_lock(h->c, h->page, -1);
    write_byte(h->up[1], 'L');
    read_byte(h->down[0]);
    if (h->rc == 0)
        fmm_unlock(h->c, h->page);
    return NULL;
}

/* A child forked while its parent holds a page holds nothing: its
 * fmm_unlock and fmm_close must leave the page's mutex and seq alone (an
 * even seq while the parent writes would let readers accept torn copies),
 * and fmm_unlock of a page this thread does not hold changes nothing. */
static void test_fork_while_holding(void)
{
    fmm_cache *c = open_anon(4096, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    CHECK_EQ(ksets(c, "k", "v"), 0);
    uint64_t h = fmm_hash(c, "k", 1);
    uint32_t p = fmm_page_of(c, h), q = 1 - p;
    /* seq sits 12 bytes after the mutex, which fmm.c pads to 40 bytes, or
     * to 64 where the ABI's mutex is larger (aarch64's is 48) */
    size_t seq_off = (sizeof(pthread_mutex_t) <= 40 ? 40 : 64) + 12;
    volatile uint32_t *seq = (volatile uint32_t *)(fmm_page_ptr(c, p) + seq_off);
    CHECK_RC(fmm_lock(c, p, -1), 0);
    CHECK(*seq & 1u);
    uint32_t held_seq = *seq;
    pid_t pid = fork();
    if (pid == 0) {
        int ok = fmm_held(c, p) == 0;
        ok &= fmm_unlock(c, p) == FMM_EBADARG;
        ok &= *seq == held_seq;
        /* fmm_close releases nothing either: check through a second
         * mapping of the same memory is not possible for an anonymous
         * cache, so check that the parent sees seq unchanged below */
        fmm_close(c);
        _exit(ok ? 0 : 1);
    }
    int st = 0;
    CHECK(pid > 0 && waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK_EQ(*seq, held_seq); /* still odd: the parent still writes */
    CHECK(fmm_held(c, p));
    CHECK_RC(fmm_unlock(c, q), FMM_EBADARG); /* the other page: not ours */
    CHECK_EQ(*seq, held_seq);
    CHECK(fmm_held(c, p));
    CHECK_RC(fmm_unlock(c, p), 0);
    CHECK_EQ(*seq, held_seq + 1);
    CHECK_RC(fmm_unlock(c, p), FMM_EBADARG); /* twice */
    CHECK_EQ(*seq, held_seq + 1);
    CHECK(khas(c, "k"));
    fmm_close(c);
}

/* Every call that writes a page checks that this thread holds it: code run
 * under the lock (a binding's callback) may fork, and the child, which
 * holds nothing, must not write the page its parent still holds (the
 * page's seq would not move, so lock-free readers could take a torn copy).
 * In the child each store is refused and no byte of the page changes; the
 * same for a page this thread never locked. */
static void test_store_needs_the_lock(void)
{
    fmm_cache *c = open_anon(4096, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    CHECK_EQ(ksets(c, "k", "v"), 0);
    uint64_t h = fmm_hash(c, "k", 1);
    uint32_t p = fmm_page_of(c, h), q = 1 - p;
    uint32_t ps = fmm_page_size(c);
    unsigned char *before = malloc(ps);
    CHECK(before != NULL);
    if (!before) {
        fmm_close(c);
        return;
    }
    /* a page nobody holds */
    memcpy(before, fmm_page_ptr(c, p), ps);
    CHECK_RC(fmm_set(c, p, h, "k", 1, "w", 1, 0, 0, NULL, NULL), FMM_EBADARG);
    CHECK_RC(fmm_set_ms(c, p, h, "k", 1, "w", 1, FMM_F_MODSEQ, 0, 5, NULL, NULL), FMM_EBADARG);
    CHECK_RC(fmm_delete(c, p, h, "k", 1, NULL), FMM_EBADARG);
    CHECK_RC(fmm_expunge(c, p, FMM_EXPUNGE_ALL, NULL, NULL), FMM_EBADARG);
    CHECK(strstr(fmm_errdetail(c), "not locked by this thread") != NULL);
    CHECK(memcmp(before, fmm_page_ptr(c, p), ps) == 0);
    /* holding the other page does not make this one writable */
    CHECK_RC(fmm_lock(c, q, -1), 0);
    CHECK_RC(fmm_set(c, p, h, "k", 1, "w", 1, 0, 0, NULL, NULL), FMM_EBADARG);
    CHECK(memcmp(before, fmm_page_ptr(c, p), ps) == 0);
    CHECK_RC(fmm_unlock(c, q), 0);
    /* a child forked while the parent holds the page */
    CHECK_RC(fmm_lock(c, p, -1), 0);
    memcpy(before, fmm_page_ptr(c, p), ps);
    pid_t pid = fork();
    if (pid == 0) {
        int ok = fmm_set(c, p, h, "k", 1, "child", 5, 0, 0, NULL, NULL) == FMM_EBADARG;
        ok &= fmm_set_ms(c, p, h, "k", 1, "child", 5, FMM_F_MODSEQ, 0, 9, NULL, NULL) == FMM_EBADARG;
        ok &= fmm_set(c, p, h, "new", 3, "child", 5, 0, 0, NULL, NULL) == FMM_EBADARG;
        ok &= fmm_delete(c, p, h, "k", 1, NULL) == FMM_EBADARG;
        ok &= fmm_expunge(c, p, FMM_EXPUNGE_ALL, NULL, NULL) == FMM_EBADARG;
        ok &= fmm_unlock(c, p) == FMM_EBADARG;
        ok &= memcmp(before, fmm_page_ptr(c, p), ps) == 0;
        _exit(ok ? 0 : 1);
    }
    int st = 0;
    CHECK(pid > 0 && waitpid(pid, &st, 0) == pid);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK(memcmp(before, fmm_page_ptr(c, p), ps) == 0);
    /* the holder itself still writes */
    CHECK_RC(fmm_set(c, p, h, "k", 1, "parent", 6, 0, 0, NULL, NULL), 0);
    CHECK_RC(fmm_unlock(c, p), 0);
    char buf[16];
    uint32_t vlen = 0;
    CHECK_RC(kget(c, "k", buf, sizeof buf, &vlen), 0);
    CHECK(vlen == 6 && memcmp(buf, "parent", 6) == 0);
    free(before);
    fmm_close(c);
}

/* fmm_prefetch is a hint: whatever the page holds (fresh, full, with slots
 * pointing anywhere, a page number out of range), it changes no byte of
 * the file and every operation after it gives the same results. */
static void test_prefetch_hint(void)
{
    fmm_cache *c = open_anon(4096, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    char k[32];
    const size_t len = FMM_HEADER_SIZE + 2 * 4096;
    unsigned char *before = malloc(len);
    CHECK(before != NULL);
    if (!before) {
        fmm_close(c);
        return;
    }
    for (int round = 0; round < 3; round++) {
        for (int i = 0; i < 200; i++) {
            snprintf(k, sizeof k, "p%d", i);
            uint64_t h = fmm_hash(c, k, strlen(k));
            uint32_t pg = fmm_page_of(c, h);
            memcpy(before, fmm_page_ptr(c, 0) - FMM_HEADER_SIZE, len);
            fmm_prefetch(c, pg, h);
            fmm_prefetch(c, 2, h);          /* out of range: ignored */
            fmm_prefetch(c, UINT32_MAX, h);
            CHECK(memcmp(before, fmm_page_ptr(c, 0) - FMM_HEADER_SIZE, len) == 0);
            CHECK_EQ(ksets(c, k, round == 1 ? "a value a little longer" : "v"), 0);
            CHECK(khas(c, k));
        }
        if (round == 1) {
            /* slots pointing at arbitrary offsets, tags matching nothing in particular */
            uint32_t *slots = (uint32_t *)(fmm_page_ptr(c, 1) + FMM_PAGE_HEADER_SIZE);
            for (int i = 0; i < 8; i++)
                slots[i] = 0xFFFFFFFCu - (uint32_t)i * 0x01000101u;
            for (int i = 0; i < 50; i++) {
                snprintf(k, sizeof k, "p%d", i);
                uint64_t h = fmm_hash(c, k, strlen(k));
                fmm_prefetch(c, 1, h);
                fmm_prefetch(c, 0, h);
            }
            CHECK_RC(fmm_lock(c, 1, -1), 0); /* the damaged page is repaired under its lock */
            char msg[200];
            if (fmm_check_page(c, 1, msg, sizeof msg) != 0)
                fmm_init_page(c, 1);
            fmm_unlock(c, 1);
        }
    }
    free(before);
    fmm_close(c);
}

/* fmm_get_optimistic: hits, misses, expiry, every documented FMM_EAGAIN,
 * the LRU stamp rule for FMM_GET_TOUCH, and fmm_read_valid's token. */
static void test_optimistic_basic(void)
{
    const uint32_t T = 1700000000u;
    fmm_cache *c = open_anon(8192, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    fmm_set_time(c, T);
    char buf[512], k[64], kb[64];
    uint32_t vl = 0;

    /* hits, misses, an empty value, a long key (XXH64), overwrites, deletes */
    const char *lk = "a key longer than sixteen bytes, hashed with XXH64";
    CHECK_EQ(ksets(c, "a", "alpha"), 0);
    CHECK_EQ(ksets(c, "empty", ""), 0);
    CHECK_EQ(ksets(c, lk, "long"), 0);
    CHECK(oget_is(c, "a", 0, "alpha"));
    CHECK(oget_is(c, "a", FMM_GET_TOUCH, "alpha")); /* stamped by its store, this second */
    CHECK(oget_is(c, "empty", 0, ""));
    CHECK(oget_is(c, lk, 0, "long"));
    CHECK_RC(oget(c, "zz", 0, buf, sizeof buf, &vl), FMM_ENOTFOUND);
    CHECK_RC(oget(c, "zz", FMM_GET_TOUCH, buf, sizeof buf, &vl), FMM_ENOTFOUND);
    CHECK_RC(oget(c, "", 0, buf, sizeof buf, &vl), FMM_ENOTFOUND);
    CHECK_EQ(ksets(c, "a", "beta"), 0);           /* same size: rewritten in place */
    CHECK(oget_is(c, "a", 0, "beta"));
    CHECK_EQ(ksets(c, "a", "a longer value"), 0); /* appended, the old entry left as garbage */
    CHECK(oget_is(c, "a", 0, "a longer value"));
    CHECK_EQ(kdel(c, "empty"), 0);
    CHECK_RC(oget(c, "empty", 0, buf, sizeof buf, &vl), FMM_ENOTFOUND);
    /* many keys: probes past collisions and deleted slots agree with the lock */
    enum { NM = 150 };
    for (int i = 0; i < NM; i++) {
        snprintf(k, sizeof k, "many%d", i);
        CHECK_EQ(ksets(c, k, k), 0);
    }
    for (int i = 0; i < NM; i += 3) {
        snprintf(k, sizeof k, "many%d", i);
        CHECK_EQ(kdel(c, k), 0);
    }
    int agree = 0;
    for (int i = 0; i < NM; i++) {
        snprintf(k, sizeof k, "many%d", i);
        int locked = khas(c, k);
        CHECK_EQ(locked, i % 3 != 0);
        /* with FMM_GET_TOUCH the stamps of early keys are stale by now */
        int touched = oget(c, k, FMM_GET_TOUCH, buf, sizeof buf, &vl);
        if (locked)
            agree += oget_is(c, k, 0, k) && (touched == FMM_EAGAIN || (touched == 0 && strcmp(buf, k) == 0));
        else
            agree += oget(c, k, 0, buf, sizeof buf, &vl) == FMM_ENOTFOUND;
    }
    CHECK_EQ(agree, NM);

    /* expiry: expire_on is the first second the entry is gone */
    CHECK_EQ(kset_full(c, "exp", "soon", 4, 0, T + 5, NULL, NULL), 0);
    CHECK_EQ(kset_full(c, "past", "gone", 4, 0, T - 1, NULL, NULL), 0);
    CHECK(oget_is(c, "exp", 0, "soon"));
    CHECK_RC(oget(c, "past", 0, buf, sizeof buf, &vl), FMM_ENOTFOUND);
    fmm_set_time(c, T + 4);
    CHECK(oget_is(c, "exp", 0, "soon"));
    fmm_set_time(c, T + 5);
    CHECK_RC(oget(c, "exp", 0, buf, sizeof buf, &vl), FMM_ENOTFOUND);
    CHECK_RC(oget(c, "exp", FMM_GET_TOUCH, buf, sizeof buf, &vl), FMM_ENOTFOUND);
    CHECK(!khas(c, "exp")); /* the locked path agrees */
    CHECK(oget_is(c, "a", 0, "a longer value"));
    fmm_set_time(c, T);

    /* FMM_EAGAIN while this thread holds a page lock: this page, another
     * page of the cache, a page of another cache */
    const uint64_t ha = fmm_hash(c, "a", 1);
    const uint32_t pa = fmm_page_of(c, ha), pb = 1 - pa;
    const char *ka = key_on_page(c, pa, "misses-a", k, sizeof k); /* absent, on page pa */
    CHECK_EQ(fmm_lock(c, pa, -1), 0);
    CHECK_RC(oget(c, "a", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
    CHECK_RC(oget(c, ka, 0, buf, sizeof buf, &vl), FMM_EAGAIN);
    fmm_unlock(c, pa);
    CHECK_EQ(fmm_lock(c, pb, -1), 0);
    CHECK_RC(oget(c, "a", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
    fmm_unlock(c, pb);
    fmm_cache *o = open_anon(4096, 1);
    CHECK(o != NULL);
    if (o) {
        CHECK_EQ(fmm_lock(o, 0, -1), 0);
        CHECK_RC(oget(c, "a", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
        fmm_unlock(o, 0);
        fmm_close(o);
    }
    CHECK(oget_is(c, "a", 0, "a longer value"));

    /* fmm_read_valid: true while nothing locks the page, false after any
     * locked section of it, even one that changed nothing */
    fmm_item it;
    uint32_t tok = 1, tok2 = 1;
    CHECK_RC(fmm_get_optimistic(c, pa, ha, "a", 1, 0, &it, &tok), 0);
    CHECK_EQ(tok & 1u, 0);
    CHECK_EQ(tok, page_seq(c, pa));
    CHECK(fmm_read_valid(c, pa, tok));
    CHECK(fmm_read_valid(c, pa, tok)); /* reading writes nothing */
    CHECK_RC(fmm_get_optimistic(c, pa, ha, "a", 1, 0, &it, &tok2), 0);
    CHECK_EQ(tok2, tok);
    CHECK_EQ(fmm_lock(c, pb, -1), 0); /* another page moves only its own seq */
    CHECK_RC(fmm_lock(c, pa, 0), FMM_ELOCKED); /* a refused lock moves nothing */
    fmm_unlock(c, pb);
    CHECK(fmm_read_valid(c, pa, tok));
    CHECK_EQ(fmm_lock(c, pa, -1), 0);
    CHECK_EQ(page_seq(c, pa), tok + 1);
    CHECK(!fmm_read_valid(c, pa, tok));
    fmm_unlock(c, pa);
    CHECK_EQ(page_seq(c, pa), tok + 2);
    CHECK(!fmm_read_valid(c, pa, tok));
    /* a miss's token likewise; a locked peek invalidates it */
    uint64_t hk = fmm_hash(c, ka, strlen(ka));
    CHECK_RC(fmm_get_optimistic(c, pa, hk, ka, (uint32_t)strlen(ka), 0, &it, &tok), FMM_ENOTFOUND);
    CHECK(fmm_read_valid(c, pa, tok));
    CHECK(khas(c, "a"));
    CHECK(!fmm_read_valid(c, pa, tok));
    /* a store invalidates a hit's token */
    CHECK_RC(fmm_get_optimistic(c, pa, ha, "a", 1, 0, &it, &tok), 0);
    CHECK_EQ(ksets(c, "a", "gamma"), 0);
    CHECK(!fmm_read_valid(c, pa, tok));
    CHECK(oget_is(c, "a", 0, "gamma"));

    /* token parity: a reader that starts while another thread holds the
     * page gets FMM_EAGAIN, and a token taken before is invalid */
    holder hd = {c, pa, {-1, -1}, {-1, -1}, -1};
    pthread_t th;
    CHECK_RC(fmm_get_optimistic(c, pa, ha, "a", 1, 0, &it, &tok), 0);
    int piped = pipe(hd.up) == 0 && pipe(hd.down) == 0;
    CHECK(piped);
    if (piped && pthread_create(&th, NULL, holder_thread, &hd) == 0) {
        CHECK_EQ(read_byte(hd.up[0]), 'L');
        CHECK_EQ(hd.rc, 0);
        CHECK_EQ(page_seq(c, pa), tok + 1);
        CHECK(!fmm_read_valid(c, pa, tok));
        CHECK_RC(fmm_get_optimistic(c, pa, ha, "a", 1, 0, &it, &tok2), FMM_EAGAIN);
        CHECK_RC(fmm_get_optimistic(c, pa, ha, "a", 1, FMM_GET_TOUCH, &it, &tok2), FMM_EAGAIN);
        CHECK_RC(oget(c, ka, 0, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK_RC(fmm_lock(c, pa, 0), FMM_EBUSY);
        /* the other page is still readable without the lock */
        const char *kbk = key_on_page(c, pb, "many", kb, sizeof kb);
        CHECK(oget_is(c, kbk, 0, kbk) || oget(c, kbk, 0, buf, sizeof buf, &vl) == FMM_ENOTFOUND);
        write_byte(hd.down[1], 'U');
        pthread_join(th, NULL);
        CHECK_EQ(page_seq(c, pa), tok + 2);
        CHECK(oget_is(c, "a", 0, "gamma"));
    } else {
        CHECK(!"pthread_create");
    }
    for (int i = 0; i < 2; i++) {
        if (hd.up[i] >= 0)
            close(hd.up[i]);
        if (hd.down[i] >= 0)
            close(hd.down[i]);
    }

    /* modseq entries and tombstones: the locked path applies their rules */
    {
        uint64_t hm = fmm_hash(c, "ms", 2), ht = fmm_hash(c, "tomb", 4);
        uint32_t pm = fmm_page_of(c, hm), pt = fmm_page_of(c, ht);
        CHECK_EQ(fmm_lock(c, pm, -1), 0);
        CHECK_RC(fmm_set_ms(c, pm, hm, "ms", 2, "v1", 2, FMM_F_MODSEQ, 0, 7, NULL, NULL), 0);
        fmm_unlock(c, pm);
        CHECK_EQ(fmm_lock(c, pt, -1), 0);
        CHECK_RC(fmm_set_ms(c, pt, ht, "tomb", 4, "", 0, FMM_T_TOMBSTONE | FMM_F_MODSEQ, 0, 9, NULL, NULL), 0);
        fmm_unlock(c, pt);
        CHECK_RC(oget(c, "ms", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK_RC(oget(c, "ms", FMM_GET_TOUCH, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK(kiss(c, "ms", "v1"));
        CHECK_RC(oget(c, "tomb", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK(!khas(c, "tomb"));
        /* a store without a modseq drops it: lock-free again */
        CHECK_EQ(ksets(c, "ms", "v2"), 0);
        CHECK(oget_is(c, "ms", 0, "v2"));
    }
    CHECK_EQ(check_all_pages(c), 0);
    CHECK_EQ(fmm_repairs(c), 0);
    fmm_close(c);

    /* statistics on: every lock-free read is FMM_EAGAIN (the counters are
     * kept under the lock) */
    fmm_config cfg = {0};
    cfg.anonymous = 1;
    cfg.page_size = 8192;
    cfg.num_pages = 1;
    cfg.enable_stats = 1;
    c = open_cfg(NULL, &cfg, NULL);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(ksets(c, "a", "1"), 0);
        CHECK_RC(oget(c, "a", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK_RC(oget(c, "a", FMM_GET_TOUCH, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK_RC(oget(c, "zz", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK(kget(c, "a", NULL, 0, NULL) == 0);
        fmm_page_info info;
        page_info(c, 0, &info);
        CHECK_EQ(info.nreads, 1);
        CHECK_EQ(info.nhits, 1);
        fmm_close(c);
    }

    /* the Perl format: always FMM_EAGAIN */
    char pp[PATH_MAX];
    tpath(pp, "opt-perl.fmm");
    fmm_config pc = {0};
    pc.format = FMM_FORMAT_PERL;
    pc.page_size = 8192;
    pc.num_pages = 2;
    pc.perl_value_flags = FMM_T_BYTES;
    c = open_cfg(pp, &pc, NULL);
    CHECK(c != NULL);
    if (c) {
        CHECK_EQ(ksets(c, "a", "1"), 0);
        CHECK(kiss(c, "a", "1"));
        CHECK_RC(oget(c, "a", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK_RC(oget(c, "zz", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
        fmm_close(c);
    }

    /* a damaged slot or page header: FMM_EAGAIN, and the locked path repairs */
    c = open_anon(4096, 1);
    CHECK(c != NULL);
    if (c) {
        unsigned char *pg = fmm_page_ptr(c, 0);
        const uint32_t offmask = 4096 / 4 - 1;
        CHECK_EQ(ksets(c, "only", "x"), 0);
        CHECK(oget_is(c, "only", 0, "x"));
        uint32_t ns = get32(pg, PH_NUM_SLOTS), used = 0, at = 0;
        for (uint32_t i = 0; i < ns; i++)
            if (get32(pg, FMM_PAGE_HEADER_SIZE + 4 * i) > 1) {
                used++;
                at = FMM_PAGE_HEADER_SIZE + 4 * i;
            }
        CHECK_EQ(used, 1);
        /* the key's tag, pointing into the page header */
        put32(pg, at, (get32(pg, at) & ~offmask) | 2);
        uint64_t rep = fmm_repairs(c);
        CHECK_RC(oget(c, "only", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK_RC(oget(c, "only", FMM_GET_TOUCH, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK(!khas(c, "only"));
        CHECK_EQ(fmm_repairs(c), rep + 1);
        CHECK_RC(oget(c, "only", 0, buf, sizeof buf, &vl), FMM_ENOTFOUND);
        CHECK_EQ(ksets(c, "only", "y"), 0);
        CHECK(oget_is(c, "only", 0, "y"));
        /* dirty set while nobody holds the page (as by a stray writer) */
        uint16_t one = 1;
        memcpy(pg + PH_DIRTY, &one, sizeof one);
        CHECK_RC(oget(c, "only", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK(!khas(c, "only"));
        CHECK_EQ(fmm_repairs(c), rep + 2);
        CHECK_EQ(ksets(c, "only", "z"), 0);
        CHECK(oget_is(c, "only", 0, "z"));
        /* seq made odd by hand (a writer that died holding the page): the
         * next lock and unlock make it even again */
        uint32_t sq = page_seq(c, 0);
        put32(pg, PH_SEQ, sq | 1u);
        CHECK_RC(oget(c, "only", 0, buf, sizeof buf, &vl), FMM_EAGAIN);
        CHECK(kiss(c, "only", "z"));
        CHECK_EQ(page_seq(c, 0) & 1u, 0);
        CHECK(oget_is(c, "only", 0, "z"));
        CHECK_EQ(fmm_repairs(c), rep + 2);
        CHECK_EQ(check_all_pages(c), 0);
        fmm_close(c);
    }

    /* FMM_GET_TOUCH: a hit whose LRU stamp is stale needs the lock (which
     * stamps it); a peek never does.  One page, a fixed clock. */
    c = open_anon(8192, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    fmm_set_time(c, (uint64_t)T * 1000u);
    CHECK_EQ(ksets(c, "hot", "h"), 0);
    CHECK(oget_is(c, "hot", FMM_GET_TOUCH, "h")); /* stamped by its store */
    CHECK_EQ(ksets(c, "other", "o"), 0);
    CHECK(oget_is(c, "hot", FMM_GET_TOUCH, "h")); /* one store later: still among the newest */
    fmm_set_time(c, (uint64_t)(T + 1) * 1000u);
    CHECK_RC(oget(c, "hot", FMM_GET_TOUCH, buf, sizeof buf, &vl), FMM_EAGAIN); /* stamped in another second */
    CHECK(oget_is(c, "hot", 0, "h"));
    CHECK(khas(c, "hot")); /* a locked peek does not stamp */
    CHECK_RC(oget(c, "hot", FMM_GET_TOUCH, buf, sizeof buf, &vl), FMM_EAGAIN);
    CHECK_EQ(kget(c, "hot", NULL, 0, NULL), 0); /* a locked touch does */
    CHECK(oget_is(c, "hot", FMM_GET_TOUCH, "h"));
    /* stores age a stamp within the second: past 1/16 of the page's span */
    enum { NF = 40 };
    for (int i = 0; i < NF; i++) {
        snprintf(k, sizeof k, "fill%d", i);
        CHECK_EQ(ksets(c, k, "........"), 0);
    }
    CHECK_RC(oget(c, "hot", FMM_GET_TOUCH, buf, sizeof buf, &vl), FMM_EAGAIN);
    CHECK(oget_is(c, "hot", 0, "h"));
    CHECK(oget_is(c, "fill39", FMM_GET_TOUCH, "........"));
    /* a locked touch stamps the current clock (the newest store's) and
     * does not advance it */
    {
        uint64_t hh = fmm_hash(c, "hot", 3), hf = fmm_hash(c, "fill39", 6);
        fmm_item newest, hot;
        CHECK_EQ(fmm_lock(c, 0, -1), 0);
        CHECK_RC(fmm_get(c, 0, hf, "fill39", 6, 0, &newest), 0);
        CHECK_RC(fmm_get(c, 0, hh, "hot", 3, FMM_GET_TOUCH, &hot), 0);
        CHECK_EQ(hot.access, newest.access);
        CHECK_EQ(hot.last_access, T + 1);
        CHECK_RC(fmm_get(c, 0, hh, "hot", 3, FMM_GET_TOUCH, &hot), 0);
        CHECK_EQ(hot.access, newest.access);
        fmm_unlock(c, 0);
    }
    CHECK(oget_is(c, "hot", FMM_GET_TOUCH, "h"));
    /* lock-free reads write nothing: the page is byte-for-byte the same
     * after hits, misses and fresh and stale touches */
    {
        unsigned char *pg = fmm_page_ptr(c, 0);
        unsigned char *snap = malloc(8192);
        CHECK(snap != NULL);
        if (snap) {
            memcpy(snap, pg, 8192);
            int n = 0;
            for (int r = 0; r < 3; r++) {
                n += oget_is(c, "hot", FMM_GET_TOUCH, "h");
                n += oget_is(c, "other", 0, "o");
                n += oget(c, "other", FMM_GET_TOUCH, buf, sizeof buf, &vl) == FMM_EAGAIN;
                n += oget(c, "nope", FMM_GET_TOUCH, buf, sizeof buf, &vl) == FMM_ENOTFOUND;
                for (int i = 0; i < NF; i++) {
                    snprintf(k, sizeof k, "fill%d", i);
                    n += oget_is(c, k, 0, "........");
                }
            }
            CHECK_EQ(n, 3 * (4 + NF));
            CHECK(memcmp(snap, pg, 8192) == 0);
            free(snap);
        }
    }
    CHECK_EQ(check_all_pages(c), 0);
    fmm_close(c);
}

/* ---- self-checking values, for readers racing writers ----
 * A value is a uint32 length (of the whole value), a uint32 check (XXH64
 * of the payload, seeded from the key and the length), then the payload:
 * a copy torn between two versions, or taken from another key's entry,
 * does not check out. */
#define SC_HDR 8u
#define SC_KEYS 24

static uint32_t sc_check(const char *k, uint32_t klen, const unsigned char *pl, uint32_t n)
{
    return (uint32_t)fmm_xxh64(pl, n, fmm_xxh64(k, klen, 0x5C5Cu) ^ n);
}

static void sc_fill(unsigned char *v, uint32_t vlen, const char *k, uint32_t klen, uint64_t *s)
{
    for (uint32_t i = SC_HDR; i < vlen; i += 8) {
        uint64_t r = rng_next(s);
        memcpy(v + i, &r, vlen - i < 8 ? vlen - i : 8);
    }
    uint32_t chk = sc_check(k, klen, v + SC_HDR, vlen - SC_HDR);
    memcpy(v, &vlen, 4);
    memcpy(v + 4, &chk, 4);
}

static int sc_ok(const unsigned char *v, uint32_t vlen, const char *k, uint32_t klen)
{
    uint32_t len, chk;
    if (vlen < SC_HDR)
        return 0;
    memcpy(&len, v, 4);
    memcpy(&chk, v + 4, 4);
    return len == vlen && chk == sc_check(k, klen, v + SC_HDR, vlen - SC_HDR);
}

/* What the readers saw. */
typedef struct opt_count {
    long accepted;      /* copies fmm_read_valid accepted (each must check out) */
    long rejected;      /* copies it rejected */
    long rejected_torn; /* of those, copies that did not check out */
    long misses;        /* misses it accepted */
    long miss_rejected; /* misses it rejected */
    long eagain;        /* FMM_EAGAIN */
    long locked;        /* reads that then took the lock */
    long bad;           /* accepted copies that did not check out, items
                           outside the page, unexpected return codes */
    long reads;
} opt_count;

static void opt_add(opt_count *to, const opt_count *n)
{
    to->accepted += n->accepted;
    to->rejected += n->rejected;
    to->rejected_torn += n->rejected_torn;
    to->misses += n->misses;
    to->miss_rejected += n->miss_rejected;
    to->eagain += n->eagain;
    to->locked += n->locked;
    to->bad += n->bad;
    to->reads += n->reads;
}

static void sc_bad(opt_count *n, const char *k, const char *what)
{
    if (n->bad++ < 5)
        fprintf(stderr, "    key %s: %s\n", k, what);
}

/* One read of key k as a caller does it: lock-free (copy, then validate),
 * and on FMM_EAGAIN with touch (or every 4th peek) through the lock.
 * vbuf and kbuf hold a page each.  Every 64th read yields the CPU between
 * the probe and the copy: on a machine with few cores (and under valgrind,
 * which runs one thread at a time) readers and writers rarely overlap
 * otherwise, and the copy then follows a pointer that the writers may have
 * moved or overwritten meanwhile. */
static void sc_read(fmm_cache *c, const char *k, int touch, unsigned char *vbuf, char *kbuf, opt_count *n)
{
    const uint32_t ps = fmm_page_size(c);
    uint32_t klen = (uint32_t)strlen(k);
    uint64_t h = fmm_hash(c, k, klen);
    uint32_t p = fmm_page_of(c, h);
    fmm_item it;
    uint32_t tok = 0;
    int rc = fmm_get_optimistic(c, p, h, k, klen, touch, &it, &tok);
    if (n->reads++ % 64 == 63)
        sched_yield();
    if (rc == FMM_EAGAIN) {
        n->eagain++;
        if (!touch && n->eagain % 4)
            return;
        if (fmm_lock(c, p, -1) != 0) {
            sc_bad(n, k, "fmm_lock failed");
            return;
        }
        n->locked++;
        rc = fmm_get(c, p, h, k, klen, touch, &it);
        if (rc == 0 && (it.klen != klen || memcmp(it.key, k, klen) != 0 ||
                        !sc_ok((const unsigned char *)it.val, it.vlen, k, klen)))
            sc_bad(n, k, "a value read under the lock does not check out");
        else if (rc != 0 && rc != FMM_ENOTFOUND)
            sc_bad(n, k, "fmm_get failed");
        fmm_unlock(c, p);
        return;
    }
    uint32_t vlen = 0, kl = 0;
    if (rc == 0) {
        /* torn or not, the item lies inside the page */
        const char *lo = (const char *)fmm_page_ptr(c, p), *hi = lo + ps;
        vlen = it.vlen;
        kl = it.klen;
        if (it.key < lo || it.key > hi || kl > (size_t)(hi - it.key) || it.val < lo || it.val > hi ||
            vlen > (size_t)(hi - it.val)) {
            sc_bad(n, k, "fmm_get_optimistic gave an item outside the page");
            return;
        }
        memcpy(vbuf, it.val, vlen);
        memcpy(kbuf, it.key, kl);
    }
    /* checked before the validation, so that torn copies are counted */
    int good = rc == 0 && kl == klen && memcmp(kbuf, k, klen) == 0 && sc_ok(vbuf, vlen, k, klen);
    int valid = fmm_read_valid(c, p, tok);
    if (rc == FMM_ENOTFOUND) {
        if (valid)
            n->misses++;
        else
            n->miss_rejected++;
        return;
    }
    if (rc != 0) {
        sc_bad(n, k, "unexpected return code");
        return;
    }
    if (valid) {
        n->accepted++;
        if (!good)
            sc_bad(n, k, "a copy fmm_read_valid accepted does not check out");
    } else {
        n->rejected++;
        n->rejected_torn += !good;
    }
}

/* Most stores rewrite a key at its home size (in place, when the entry is
 * there), the rest at a random size up to maxv (appends, compaction,
 * eviction); a few delete.  Values are stored dirty, so that the eviction
 * callback counts (and checks) what eviction drops: ev[0] good, ev[1] bad. */
static uint32_t sc_home_len(uint32_t i) { return SC_HDR + (i * 37u) % 120u; }

static void sc_evicted(void *ctx, const fmm_item *it)
{
    long *ev = ctx;
    ev[sc_ok((const unsigned char *)it->val, it->vlen, it->key, it->klen) ? 0 : 1]++;
}

static int sc_write_step(fmm_cache *c, uint64_t *s, unsigned char *vbuf, uint32_t maxv, long ev[2])
{
    char k[16];
    uint32_t i = rng_below(s, SC_KEYS);
    snprintf(k, sizeof k, "sc%02u", i);
    uint32_t op = rng_below(s, 16);
    if (op == 0) {
        int rc = kdel(c, k);
        return rc == 0 || rc == FMM_ENOTFOUND ? 0 : rc;
    }
    uint32_t vlen = op < 13 ? sc_home_len(i) : SC_HDR + rng_below(s, maxv - SC_HDR);
    sc_fill(vbuf, vlen, k, (uint32_t)strlen(k), s);
    return kset_full(c, k, vbuf, vlen, FMM_F_DIRTY, 0, sc_evicted, ev);
}

static int sc_prefill(fmm_cache *c, uint64_t *s, unsigned char *vbuf)
{
    int errors = 0;
    char k[16];
    for (uint32_t i = 0; i < SC_KEYS; i++) {
        snprintf(k, sizeof k, "sc%02u", i);
        sc_fill(vbuf, sc_home_len(i), k, (uint32_t)strlen(k), s);
        errors += kset(c, k, vbuf, sc_home_len(i)) != 0;
    }
    return errors;
}

/* Every key is absent or checks out under the lock. */
static int sc_verify_locked(fmm_cache *c)
{
    int bad = 0;
    char k[16];
    for (uint32_t i = 0; i < SC_KEYS; i++) {
        snprintf(k, sizeof k, "sc%02u", i);
        uint32_t klen = (uint32_t)strlen(k);
        uint64_t h = fmm_hash(c, k, klen);
        uint32_t p = fmm_page_of(c, h);
        if (fmm_lock(c, p, -1) != 0)
            return -1;
        fmm_item it;
        int rc = fmm_get(c, p, h, k, klen, 0, &it);
        bad += rc == 0 ? !sc_ok((const unsigned char *)it.val, it.vlen, k, klen) : rc != FMM_ENOTFOUND;
        fmm_unlock(c, p);
    }
    return bad;
}

typedef struct sc_thr {
    fmm_cache *c;
    const int *stop;
    uint64_t seed;
    long ops;
    long ev[2];  /* writers: evicted entries that checked out, that did not */
    int errors;  /* writers */
    opt_count n; /* readers */
} sc_thr;

static void *sc_writer(void *arg)
{
    sc_thr *t = arg;
    uint32_t ps = fmm_page_size(t->c);
    unsigned char *vbuf = malloc(ps);
    if (!vbuf) {
        t->errors++;
        return NULL;
    }
    uint64_t s = t->seed;
    while (!__atomic_load_n(t->stop, __ATOMIC_RELAXED)) {
        if (sc_write_step(t->c, &s, vbuf, ps / 8, t->ev) != 0)
            t->errors++;
        if (++t->ops % 32 == 0)
            sched_yield(); /* valgrind's thread lock is unfair: let the readers run */
    }
    free(vbuf);
    return NULL;
}

static void *sc_reader(void *arg)
{
    sc_thr *t = arg;
    uint32_t ps = fmm_page_size(t->c);
    unsigned char *vbuf = malloc(ps);
    char *kbuf = malloc(ps);
    uint64_t s = t->seed;
    char k[16];
    while (vbuf && kbuf && !__atomic_load_n(t->stop, __ATOMIC_RELAXED)) {
        snprintf(k, sizeof k, "sc%02u", rng_below(&s, SC_KEYS));
        sc_read(t->c, k, (t->ops & 1) ? FMM_GET_TOUCH : 0, vbuf, kbuf, &t->n);
        t->ops++;
    }
    if (!vbuf || !kbuf)
        t->n.bad++;
    free(vbuf);
    free(kbuf);
    return NULL;
}

static void sleep_s(double s)
{
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

static void print_opt_count(const char *who, const opt_count *n, long wops, long evicted, double secs)
{
    printf("     %s: %.2fs, %ld writes, %ld evictions; copies accepted %ld, rejected %ld (%ld of them torn); "
           "misses accepted %ld, rejected %ld; EAGAIN %ld (%ld then locked)\n",
           who, secs, wops, evicted, n->accepted, n->rejected, n->rejected_torn, n->misses, n->miss_rejected,
           n->eagain, n->locked);
}

/* Writer threads rewrite self-checking values (in place, at new sizes,
 * compacting and evicting in one small page) while reader threads read
 * without the lock: every copy fmm_read_valid accepts must check out, and
 * both accepted and rejected copies must occur.  Runs in rounds of about a
 * second until both have been seen (at most 20 s). */
static void test_optimistic_torn_threads(void)
{
    enum { NW = 3, NR = 2 };
    fmm_cache *c = open_anon(4096, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    unsigned char vbuf[4096];
    uint64_t s = 4242;
    CHECK_EQ(sc_prefill(c, &s, vbuf), 0);
    opt_count tot = {0};
    long wops = 0, ev[2] = {0, 0};
    int werrors = 0, started_all = 1, rounds = 0;
    double t0 = now_s();
    do {
        int stop = 0;
        sc_thr w[NW], r[NR];
        pthread_t wt[NW], rt[NR];
        int wok[NW], rok[NR];
        for (int i = 0; i < NW; i++) {
            w[i] = (sc_thr){c, &stop, 1000u * (unsigned)rounds + (unsigned)i + 1, 0, {0, 0}, 0, {0}};
            wok[i] = pthread_create(&wt[i], NULL, sc_writer, &w[i]) == 0;
            started_all &= wok[i];
        }
        for (int i = 0; i < NR; i++) {
            r[i] = (sc_thr){c, &stop, 7000u * (unsigned)rounds + (unsigned)i + 77, 0, {0, 0}, 0, {0}};
            rok[i] = pthread_create(&rt[i], NULL, sc_reader, &r[i]) == 0;
            started_all &= rok[i];
        }
        sleep_s(rounds ? 0.5 : 1.0);
        __atomic_store_n(&stop, 1, __ATOMIC_RELAXED);
        for (int i = 0; i < NW; i++)
            if (wok[i]) {
                pthread_join(wt[i], NULL);
                wops += w[i].ops;
                ev[0] += w[i].ev[0];
                ev[1] += w[i].ev[1];
                werrors += w[i].errors;
            }
        for (int i = 0; i < NR; i++)
            if (rok[i]) {
                pthread_join(rt[i], NULL);
                opt_add(&tot, &r[i].n);
            }
        rounds++;
    } while (started_all && (tot.accepted == 0 || tot.rejected == 0) && now_s() - t0 < 20.0);
    print_opt_count("threads", &tot, wops, ev[0] + ev[1], now_s() - t0);
    CHECK(started_all);
    CHECK_EQ(werrors, 0);
    CHECK(ev[0] > 0); /* the page did evict */
    CHECK_EQ(ev[1], 0);
    CHECK_EQ(tot.bad, 0);
    CHECK(tot.accepted > 0);
    CHECK(tot.rejected > 0);
    CHECK_EQ(sc_verify_locked(c), 0);
    CHECK_EQ(check_all_pages(c), 0);
    CHECK_EQ(fmm_repairs(c), 0);
    fmm_close(c);
}

/* The same across processes on a shared file: forked writers (one on the
 * inherited mapping, one on its own fmm_open of the path), the parent
 * reading without the lock. */
static void test_optimistic_cross_process(void)
{
    enum { NW = 2 };
    char path[PATH_MAX];
    tpath(path, "opt-xproc.fmm");
    fmm_cache *c = open_geom(path, 4096, 1);
    CHECK(c != NULL);
    if (!c)
        return;
    unsigned char vbuf[4096];
    char kbuf[4096];
    uint64_t s = 99;
    CHECK_EQ(sc_prefill(c, &s, vbuf), 0);
    struct xshared {
        int stop;
        long writes[NW];
        long ev[NW][2];
    } *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    CHECK(sh != MAP_FAILED);
    if (sh == MAP_FAILED) {
        fmm_close(c);
        return;
    }
    memset(sh, 0, sizeof *sh);
    pid_t pids[NW];
    fflush(NULL);
    for (int i = 0; i < NW; i++) {
        pids[i] = fork();
        if (pids[i] == 0) {
            fmm_cache *cc = c;
            if (i == 1) {
                fmm_config zero = {0};
                if (fmm_open(path, &zero, &cc, NULL, NULL, 0) != 0)
                    _exit(2);
            }
            uint64_t ws = 31u + (unsigned)i;
            double end = now_s() + 60.0; /* if the parent never says stop */
            while (!__atomic_load_n(&sh->stop, __ATOMIC_RELAXED)) {
                if (sc_write_step(cc, &ws, vbuf, 4096 / 8, sh->ev[i]) != 0)
                    _exit(3);
                sh->writes[i]++;
                if (now_s() > end)
                    _exit(4);
            }
            _exit(0);
        }
        CHECK(pids[i] > 0);
    }
    opt_count n = {0};
    double t0 = now_s();
    for (long i = 0;; i++) {
        snprintf((char *)vbuf, 16, "sc%02u", rng_below(&s, SC_KEYS));
        char k[16];
        memcpy(k, vbuf, sizeof k);
        sc_read(c, k, (i & 1) ? FMM_GET_TOUCH : 0, vbuf, kbuf, &n);
        if ((i & 255) == 0) {
            double t = now_s() - t0;
            if (t > 20.0 || (t > 1.0 && n.accepted > 0 && n.rejected > 0))
                break;
        }
    }
    __atomic_store_n(&sh->stop, 1, __ATOMIC_RELAXED);
    long wops = 0, ev[2] = {0, 0};
    for (int i = 0; i < NW; i++)
        if (pids[i] > 0) {
            CHECK_EQ(wait_child(pids[i]), 0);
            wops += sh->writes[i];
            ev[0] += sh->ev[i][0];
            ev[1] += sh->ev[i][1];
        }
    print_opt_count("processes", &n, wops, ev[0] + ev[1], now_s() - t0);
    CHECK(ev[0] > 0);
    CHECK_EQ(ev[1], 0);
    CHECK_EQ(n.bad, 0);
    CHECK(n.accepted > 0);
    CHECK(n.rejected > 0);
    CHECK_EQ(sc_verify_locked(c), 0);
    CHECK_EQ(check_all_pages(c), 0);
    CHECK_EQ(fmm_repairs(c), 0);
    munmap(sh, sizeof *sh);
    fmm_close(c);
}

/* A writer that dies holding a page leaves its seq odd: lock-free reads of
 * that page are FMM_EAGAIN until a locker repairs it (EOWNERDEAD) and
 * unlocks; other pages stay readable meanwhile. */
static void test_optimistic_after_killed_writer(void)
{
    char path[PATH_MAX], buf[64], k[32], kb[32];
    uint32_t vl = 0;
    tpath(path, "opt-killed.fmm");
    fmm_cache *c = open_geom(path, 8192, 2);
    CHECK(c != NULL);
    if (!c)
        return;
    const uint32_t victim = 0, other = 1;
    const char *kv = key_on_page(c, victim, "victim", k, sizeof k);
    const char *ko = key_on_page(c, other, "other", kb, sizeof kb);
    const uint32_t kvlen = (uint32_t)strlen(kv);
    const uint64_t hv = fmm_hash(c, kv, kvlen);
    CHECK_EQ(ksets(c, kv, "v1"), 0);
    CHECK_EQ(ksets(c, ko, "o1"), 0);
    uint64_t rep0 = fmm_repairs(c);
    fmm_item it;
    uint32_t tok = 1;

    /* 1: a holder that _exit()s with the page clean: no repair needed */
    CHECK_RC(fmm_get_optimistic(c, victim, hv, kv, kvlen, 0, &it, &tok), 0);
    CHECK_EQ(die_holding(c, victim, 0), 0);
    CHECK_EQ(page_seq(c, victim), tok + 1);
    CHECK(!fmm_read_valid(c, victim, tok)); /* a reader that started before the crash */
    CHECK_RC(oget(c, kv, 0, buf, sizeof buf, &vl), FMM_EAGAIN);
    CHECK_RC(oget(c, kv, FMM_GET_TOUCH, buf, sizeof buf, &vl), FMM_EAGAIN);
    CHECK(oget_is(c, ko, 0, "o1"));
    CHECK_RC(oget(c, kv, 0, buf, sizeof buf, &vl), FMM_EAGAIN); /* reading repairs nothing */
    CHECK_EQ(fmm_lock(c, victim, -1), 0);                        /* EOWNERDEAD, handled */
    CHECK_EQ(page_seq(c, victim) & 1u, 1);
    CHECK_RC(oget(c, kv, 0, buf, sizeof buf, &vl), FMM_EAGAIN); /* held by this thread */
    fmm_unlock(c, victim);
    CHECK_EQ(page_seq(c, victim), tok + 2);
    CHECK_EQ(fmm_repairs(c), rep0);
    CHECK(oget_is(c, kv, 0, "v1"));

    /* 2: a holder that dies mid-write (dirty): the page is re-initialised,
     * and the lock-free miss is then a true one */
    CHECK_EQ(die_holding(c, victim, 1), 0);
    CHECK_EQ(page_seq(c, victim) & 1u, 1);
    CHECK_RC(oget(c, kv, 0, buf, sizeof buf, &vl), FMM_EAGAIN);
    CHECK_EQ(fmm_lock(c, victim, 0), 0);
    fmm_unlock(c, victim);
    CHECK_EQ(page_seq(c, victim) & 1u, 0);
    CHECK_EQ(fmm_repairs(c), rep0 + 1);
    CHECK_RC(oget(c, kv, 0, buf, sizeof buf, &vl), FMM_ENOTFOUND);
    CHECK(oget_is(c, ko, 0, "o1"));
    CHECK_EQ(ksets(c, kv, "v2"), 0);
    CHECK(oget_is(c, kv, 0, "v2"));

    /* 3: SIGKILLed while holding the page mid-write; another handle (as
     * another process would) repairs it through an ordinary locked get */
    int up[2], down[2];
    CHECK(pipe(up) == 0 && pipe(down) == 0);
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        close(up[0]);
        close(down[1]);
        if (fmm_lock(c, victim, -1) != 0)
            _exit(2);
        uint16_t one = 1;
        memcpy(fmm_page_ptr(c, victim) + PH_DIRTY, &one, sizeof one);
        write_byte(up[1], 'L');
        read_byte(down[0]); /* killed here */
        _exit(3);
    }
    close(up[1]);
    close(down[0]);
    CHECK(pid > 0);
    if (pid > 0) {
        CHECK_EQ(read_byte(up[0]), 'L');
        CHECK_EQ(page_seq(c, victim) & 1u, 1);
        CHECK_RC(oget(c, kv, 0, buf, sizeof buf, &vl), FMM_EAGAIN); /* held by a live writer */
        CHECK_EQ(kill(pid, SIGKILL), 0);
        CHECK_EQ(wait_child(pid), 1000 + SIGKILL);
        CHECK_EQ(page_seq(c, victim) & 1u, 1);
        CHECK_RC(oget(c, kv, 0, buf, sizeof buf, &vl), FMM_EAGAIN); /* held by a dead one */
        CHECK(oget_is(c, ko, 0, "o1"));
        fmm_config zero = {0};
        fmm_cache *c2 = open_cfg(path, &zero, NULL);
        CHECK(c2 != NULL);
        if (c2) {
            CHECK(!khas(c2, kv)); /* the lock repaired the dirty page */
            CHECK_EQ(fmm_repairs(c2), rep0 + 2);
            CHECK_EQ(ksets(c2, kv, "v3"), 0);
            fmm_close(c2);
        }
        CHECK_EQ(page_seq(c, victim) & 1u, 0);
        CHECK(oget_is(c, kv, 0, "v3"));
        CHECK(oget_is(c, kv, FMM_GET_TOUCH, "v3"));
    }
    close(up[0]);
    close(down[1]);
    CHECK_EQ(check_all_pages(c), 0);
    CHECK(oget_is(c, ko, 0, "o1"));
    fmm_close(c);
}

/* ------------------------------------------------------------------ main */

typedef struct test {
    const char *name;
    void (*fn)(void);
    int needs_robust; /* its subject is a lock holder's death */
} test;

#define T(f) {#f, f, 0}
#define T_ROBUST(f) {#f, f, 1}

/* A dead holder's mutex is released (EOWNERDEAD) by the kernel, which walks
 * the robust-futex list the thread registered.  qemu-user, which runs these
 * tests for other architectures, cannot pass that list to the host kernel
 * and fails the call with ENOSYS: there a dead holder's lock is never
 * released and the tests of that would wait forever, so they are skipped
 * (and reported as skipped). */
static int robust_list_works(void)
{
    void *head;
    size_t len;
    return syscall(SYS_get_robust_list, 0, &head, &len) == 0;
}
static const test TESTS[] = {
    T(test_xxh64_vectors),
    T(test_short_key_hash_seeds_every_byte),
    T(test_open_create),
    T(test_open_reopen_geometry),
    T(test_open_init_file),
    T(test_open_bad_paths),
    T(test_open_trust_and_temps),
    T(test_open_anonymous_and_args),
    T(test_race_free_creation),
    T(test_get_set_delete),
    T(test_expiry),
    T(test_expiry_ms),
    T(test_lru_eviction),
    T(test_compaction_overwrites),
    T(test_slot_growth_shrink),
    T(test_perl_t16),
    T(test_perl_t17),
    T(test_expunge_dirty_foreach),
    T(test_evict_callback),
    T(test_lru_clock_renumbering),
    T(test_modseq_rules),
    T(test_modseq_expiry_delete),
    T(test_modseq_visibility_eviction),
    T(test_modseq_check_page),
    T(test_locking_rules),
    T(test_errdetail_per_thread),
    T(test_threads_counter),
    T(test_cross_process_counter),
    T_ROBUST(test_crash_repair),
    T(test_check_file),
    T(test_corruption_fuzz),
    T(test_stats),
    T(test_page_size_extremes),
    T(test_guard_truncate),
    T(test_guard_chains_foreign),
    T(test_guard_many_mappings),
    T(test_guard_concurrent_growth),
    T(test_optimistic_basic),
    T(test_optimistic_torn_threads),
    T_ROBUST(test_optimistic_after_killed_writer),
    T(test_optimistic_cross_process),
    T(test_prefetch_hint),
    T(test_fork_while_holding),
    T_ROBUST(test_set_many), /* its last part kills a holder mid-batch */
    T(test_store_needs_the_lock),
};

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    signal(SIGPIPE, SIG_IGN);
    const char *tmp = getenv("TMPDIR");
    if (!tmp || !*tmp)
        tmp = "/tmp";
    snprintf(g_dir, sizeof g_dir, "%s/test_fmm-XXXXXX", tmp);
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 2;
    }
    int passed = 0, failed = 0, skipped = 0;
    int robust = robust_list_works();
    double t0 = now_s();
    for (size_t i = 0; i < sizeof TESTS / sizeof TESTS[0]; i++) {
        if (TESTS[i].needs_robust && !robust) {
            skipped++;
            printf("skip %-30s (no robust-futex list here, e.g. under qemu-user)\n", TESTS[i].name);
            continue;
        }
        g_test_failures = 0;
        double t = now_s();
        TESTS[i].fn();
        t = now_s() - t;
        if (g_test_failures) {
            failed++;
            printf("FAIL %-30s %d check(s) failed (%.2fs)\n", TESTS[i].name, g_test_failures, t);
        } else {
            passed++;
            printf("ok   %-30s (%.2fs)\n", TESTS[i].name, t);
        }
    }
    rm_rf(g_dir);
    fprintf(stderr, "total time %.2fs\n", now_s() - t0);
    printf("%d passed, %d failed, %d skipped\n", passed, failed, skipped);
    return failed ? 1 : 0;
}
