/*
 * test_fmm_perl.c -- C tests of the Cache::FastMmap file format (fmm_perl.c)
 * through the public engine API (fmm.h, format FMM_FORMAT_PERL).
 *
 * Run by `make ctest` under ASan+UBSan and by `make ctest-valgrind`.  The
 * interoperability tests against the real Perl module are in
 * tests/test_perl_format.py; these check the layout byte for byte, the
 * page rules, threads, fork, lock timeouts and damaged pages.
 */
#define _GNU_SOURCE
#include "fmm.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int g_fail, g_test_fail;
static char g_dir[512];

#define CHECK(e)                                                                                                       \
    do {                                                                                                               \
        if (!(e)) {                                                                                                    \
            if (g_test_fail++ < 10)                                                                                    \
                fprintf(stderr, "  %s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #e);                               \
        }                                                                                                              \
    } while (0)
#define CHECK_EQ(a, b)                                                                                                 \
    do {                                                                                                               \
        long long a_ = (long long)(a), b_ = (long long)(b);                                                            \
        if (a_ != b_ && g_test_fail++ < 10)                                                                            \
            fprintf(stderr, "  %s:%d: %s == %lld, expected %s == %lld\n", __FILE__, __LINE__, #a, a_, #b, b_);         \
    } while (0)

static uint64_t rng(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void path_of(char *buf, const char *name) { snprintf(buf, PATH_MAX, "%s/%s", g_dir, name); }

static fmm_cache *popen_(const char *name, uint32_t page_size, uint32_t num_pages, int init)
{
    char p[PATH_MAX];
    path_of(p, name);
    fmm_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.format = FMM_FORMAT_PERL;
    cfg.page_size = page_size;
    cfg.num_pages = num_pages;
    cfg.init_file = init;
    cfg.perl_value_flags = FMM_T_BYTES;
    fmm_cache *c = NULL;
    char err[256];
    int rc = fmm_open(p, &cfg, &c, NULL, err, sizeof err);
    if (rc)
        fprintf(stderr, "  open %s: %s (%s)\n", p, fmm_strerror(rc), err);
    return c;
}

static int pset(fmm_cache *c, const char *k, const void *v, uint32_t vlen, uint32_t flags, uint32_t exp)
{
    uint32_t kl = (uint32_t)strlen(k);
    uint64_t h = fmm_hash(c, k, kl);
    uint32_t pg = fmm_page_of(c, h);
    int rc = fmm_lock(c, pg, -1);
    if (rc)
        return rc;
    rc = fmm_set(c, pg, h, k, kl, v, vlen, flags, exp, NULL, NULL);
    fmm_unlock(c, pg);
    return rc;
}

/* 0 and a copy in buf (NUL-terminated), or an error code */
static int pget(fmm_cache *c, const char *k, char *buf, size_t cap, uint32_t *flags)
{
    uint32_t kl = (uint32_t)strlen(k);
    uint64_t h = fmm_hash(c, k, kl);
    uint32_t pg = fmm_page_of(c, h);
    int rc = fmm_lock(c, pg, -1);
    if (rc)
        return rc;
    fmm_item it;
    rc = fmm_get(c, pg, h, k, kl, FMM_GET_TOUCH, &it);
    if (rc == 0) {
        size_t n = it.vlen < cap - 1 ? it.vlen : cap - 1;
        memcpy(buf, it.val, n);
        buf[n] = 0;
        if (flags)
            *flags = it.flags;
    }
    fmm_unlock(c, pg);
    return rc;
}

static uint32_t rd32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static int check_all(fmm_cache *c)
{
    int bad = 0;
    for (uint32_t p = 0; p < fmm_num_pages(c); p++) {
        char msg[200];
        if (fmm_lock(c, p, -1) != 0)
            return -1;
        if (fmm_check_page(c, p, msg, sizeof msg) != 0) {
            if (bad++ < 3)
                fprintf(stderr, "  check: %s\n", msg);
        }
        fmm_unlock(c, p);
    }
    return bad;
}

/* ------------------------------------------------------------------ tests */

static void test_hash_vectors(void)
{
    CHECK_EQ(fmm_perl_hash("", 0), 2465719217u);
    CHECK_EQ(fmm_perl_hash("a", 1), 796801914u);
    CHECK_EQ(fmm_perl_hash("abc", 3), 2117828786u);
    CHECK_EQ(fmm_perl_hash("hello world", 11), 2948198678u);
    CHECK_EQ(fmm_perl_hash("key1", 4), 3820531640u);
    CHECK_EQ(fmm_perl_hash("\xE2\x98\xBA", 3), 2117862761u);
    fmm_cache *c = popen_("hash", 4096, 89, 0);
    CHECK(c);
    if (!c)
        return;
    CHECK_EQ(fmm_page_of(c, fmm_hash(c, "hello world", 11)), 75);
    CHECK_EQ(fmm_page_of(c, fmm_hash(c, "key1", 4)), 71);
    fmm_close(c);
}

static void test_layout(void)
{
    fmm_cache *c = popen_("layout", 4096, 3, 0);
    CHECK(c);
    if (!c)
        return;
    char p[PATH_MAX];
    path_of(p, "layout");
    struct stat st;
    CHECK(stat(p, &st) == 0 && st.st_size == 3 * 4096);
    CHECK_EQ(fmm_max_item(c), 4096 - 32 - 4 * 89 - 24 + 20);
    CHECK_EQ(pset(c, "abc", "hello", 5, FMM_T_BYTES, 0), 0);
    uint32_t pg = fmm_page_of(c, fmm_hash(c, "abc", 3));
    const unsigned char *b = fmm_page_ptr(c, pg);
    CHECK_EQ(rd32(b + 0), 0x92f7e3b1u);
    CHECK_EQ(rd32(b + 4), 89);
    CHECK_EQ(rd32(b + 8), 88);   /* free slots */
    CHECK_EQ(rd32(b + 12), 0);   /* old slots */
    CHECK_EQ(rd32(b + 16), 388 + 32); /* free_data: 24 + 3 + 5 rounded */
    CHECK_EQ(rd32(b + 20), 4096 - 420);
    uint32_t h = fmm_perl_hash("abc", 3);
    uint32_t slot = (h / 3) % 89;
    CHECK_EQ(rd32(b + 32 + 4 * slot), 388);
    const unsigned char *e = b + 388;
    CHECK(rd32(e + 0) > 1000000000u); /* last_access */
    CHECK_EQ(rd32(e + 4), 0);         /* expire_on */
    CHECK_EQ(rd32(e + 8), h / 3);     /* slot hash */
    CHECK_EQ(rd32(e + 12), 0);        /* flags */
    CHECK_EQ(rd32(e + 16), 3);
    CHECK_EQ(rd32(e + 20), 5);
    CHECK(memcmp(e + 24, "abchello", 8) == 0);
    /* Perl's flag bits */
    CHECK_EQ(pset(c, "abc", "", 0, FMM_T_NONE | FMM_F_KEYSTR | FMM_F_DIRTY, 12345), 0);
    CHECK_EQ(rd32(b + 32 + 4 * slot), 420);
    CHECK_EQ(rd32(b + 12), 0);        /* the deleted slot was reused */
    CHECK_EQ(rd32(b + 420 + 12), (1u << 29) | (1u << 30) | 1u);
    CHECK_EQ(rd32(b + 420 + 4), 12345);
    CHECK_EQ(pset(c, "abc", "x", 1, FMM_T_STR, 0), 0);
    CHECK_EQ(rd32(b + 448 + 12), 1u << 31);
    char buf[64];
    uint32_t fl = 0;
    CHECK_EQ(pget(c, "abc", buf, sizeof buf, &fl), 0);
    CHECK_EQ(fl, FMM_T_STR);
    CHECK_EQ(check_all(c), 0);
    fmm_close(c);
}

static void test_set_get_delete_expire(void)
{
    fmm_cache *c = popen_("basic", 8192, 5, 0);
    CHECK(c);
    if (!c)
        return;
    char buf[256];
    CHECK_EQ(pget(c, "nope", buf, sizeof buf, NULL), FMM_ENOTFOUND);
    CHECK_EQ(pset(c, "k", "v1", 2, 0, 0), 0);
    CHECK_EQ(pset(c, "k", "value two", 9, 0, 0), 0);
    CHECK(pget(c, "k", buf, sizeof buf, NULL) == 0 && strcmp(buf, "value two") == 0);
    fmm_set_time(c, 1700000000);
    CHECK_EQ(pset(c, "t", "ttl", 3, 0, 1700000010), 0);
    CHECK_EQ(pget(c, "t", buf, sizeof buf, NULL), 0);
    fmm_set_time(c, 1700000010);
    CHECK_EQ(pget(c, "t", buf, sizeof buf, NULL), FMM_ENOTFOUND);
    uint64_t h = fmm_hash(c, "k", 1);
    uint32_t pg = fmm_page_of(c, h);
    CHECK_EQ(fmm_lock(c, pg, -1), 0);
    CHECK_EQ(fmm_delete(c, pg, h, "k", 1, NULL), 0);
    CHECK_EQ(fmm_delete(c, pg, h, "k", 1, NULL), FMM_ENOTFOUND);
    fmm_unlock(c, pg);
    /* too big for a page: refused, old value kept */
    CHECK_EQ(pset(c, "big", "x", 1, 0, 0), 0);
    char *huge = calloc(1, 9000);
    CHECK_EQ(pset(c, "big", huge, 9000, 0, 0), FMM_ETOOBIG);
    CHECK(pget(c, "big", buf, sizeof buf, NULL) == 0 && strcmp(buf, "x") == 0);
    /* the largest item that fits a fresh page does fit */
    uint32_t most = fmm_max_item(c) - 20 - 3;
    CHECK_EQ(pset(c, "big", huge, most, 0, 0), 0);
    free(huge);
    CHECK_EQ(check_all(c), 0);
    fmm_close(c);
}

typedef struct {
    int dirty, total;
} evict_count;

static void on_evict(void *ctx, const fmm_item *it)
{
    evict_count *ec = ctx;
    ec->total++;
    if (it->flags & FMM_F_DIRTY)
        ec->dirty++;
}

static void test_churn_oracle(void)
{
    /* random sets/gets/deletes on tiny pages, every read checked against
     * what was last stored (a miss is allowed: eviction) */
    fmm_cache *c = popen_("churn", 4096, 3, 0);
    CHECK(c);
    if (!c)
        return;
    enum { NK = 400 };
    static uint32_t ver[NK];
    memset(ver, 0, sizeof ver);
    uint64_t s = 7;
    char key[32], val[600], buf[700];
    evict_count ec = {0, 0};
    for (int i = 0; i < 60000; i++) {
        int k = (int)(rng(&s) % NK);
        snprintf(key, sizeof key, "key%d", k);
        uint32_t kl = (uint32_t)strlen(key);
        uint64_t h = fmm_hash(c, key, kl);
        uint32_t pg = fmm_page_of(c, h);
        int op = (int)(rng(&s) % 10);
        CHECK_EQ(fmm_lock(c, pg, -1), 0);
        if (op < 5) {
            ver[k]++;
            int len = snprintf(val, sizeof val, "%s:%u:", key, ver[k]);
            int pad = (int)(rng(&s) % 300);
            memset(val + len, 'a' + k % 26, (size_t)pad);
            len += pad;
            CHECK_EQ(fmm_set(c, pg, h, key, kl, val, (uint32_t)len, FMM_F_DIRTY, 0, on_evict, &ec), 0);
        } else if (op < 9) {
            fmm_item it;
            if (fmm_get(c, pg, h, key, kl, FMM_GET_TOUCH, &it) == 0) {
                int n = snprintf(buf, sizeof buf, "%s:%u:", key, ver[k]);
                CHECK(it.vlen >= (uint32_t)n && memcmp(it.val, buf, (size_t)n) == 0);
            }
        } else {
            fmm_delete(c, pg, h, key, kl, NULL);
        }
        fmm_unlock(c, pg);
        if (i % 5000 == 0)
            CHECK_EQ(check_all(c), 0);
    }
    CHECK(ec.total > 1000 && ec.dirty == ec.total);
    /* slot tables grew the Perl way */
    for (uint32_t p = 0; p < 3; p++) {
        uint32_t ns = rd32(fmm_page_ptr(c, p) + 4);
        CHECK(ns == 89 || ns == 179 || ns == 359 || ns == 719);
    }
    /* expunge all */
    for (uint32_t p = 0; p < 3; p++) {
        CHECK_EQ(fmm_lock(c, p, -1), 0);
        CHECK_EQ(fmm_expunge(c, p, FMM_EXPUNGE_ALL, NULL, NULL), 0);
        fmm_page_info info;
        fmm_page_info_get(c, p, &info);
        CHECK_EQ(info.live, 0);
        fmm_unlock(c, p);
    }
    CHECK_EQ(check_all(c), 0);
    fmm_close(c);
}

typedef struct {
    fmm_cache *c;
    int n;
} thr_arg;

static void incr(fmm_cache *c)
{
    const char *k = "counter";
    uint64_t h = fmm_hash(c, k, 7);
    uint32_t pg = fmm_page_of(c, h);
    int rc = fmm_lock(c, pg, -1);
    if (rc) {
        CHECK_EQ(rc, 0);
        return;
    }
    fmm_item it;
    long v = 0;
    char buf[32];
    if (fmm_get(c, pg, h, k, 7, FMM_GET_TOUCH, &it) == 0) {
        memcpy(buf, it.val, it.vlen < 31 ? it.vlen : 31);
        buf[it.vlen < 31 ? it.vlen : 31] = 0;
        v = atol(buf);
    }
    int n = snprintf(buf, sizeof buf, "%ld", v + 1);
    CHECK_EQ(fmm_set(c, pg, h, k, 7, buf, (uint32_t)n, 0, 0, NULL, NULL), 0);
    fmm_unlock(c, pg);
}

static void *thr_main(void *a)
{
    thr_arg *t = a;
    for (int i = 0; i < t->n; i++)
        incr(t->c);
    return NULL;
}

static void test_threads_and_fork(void)
{
    fmm_cache *c = popen_("conc", 4096, 7, 0);
    CHECK(c);
    if (!c)
        return;
    /* children forked from this handle must not share its file locks */
    pid_t kids[2];
    for (int i = 0; i < 2; i++) {
        kids[i] = fork();
        if (kids[i] == 0) {
            thr_arg a = {c, 1500};
            thr_main(&a);
            _exit(g_test_fail ? 1 : 0);
        }
    }
    pthread_t th[3];
    thr_arg a = {c, 1000};
    for (int i = 0; i < 3; i++)
        pthread_create(&th[i], NULL, thr_main, &a);
    for (int i = 0; i < 3; i++)
        pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++) {
        int st = 0;
        waitpid(kids[i], &st, 0);
        CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    }
    char buf[32];
    CHECK(pget(c, "counter", buf, sizeof buf, NULL) == 0);
    CHECK_EQ(atol(buf), 3000 + 3000);
    fmm_close(c);
}

static void test_lock_rules(void)
{
    fmm_cache *c = popen_("locks", 4096, 2, 0);
    fmm_cache *d = popen_("locks", 4096, 2, 0); /* a second handle, same process */
    CHECK(c && d);
    if (!c || !d)
        return;
    CHECK_EQ(fmm_lock(c, 0, -1), 0);
    CHECK_EQ(fmm_lock(c, 1, 0), FMM_ELOCKED);
    CHECK(fmm_held(c, 0) && !fmm_held(c, 1));
    /* another handle (its own file description) is excluded */
    CHECK_EQ(fmm_lock(d, 0, 0), FMM_EBUSY);
    CHECK_EQ(fmm_lock(d, 0, 30000000), FMM_ETIMEDOUT);
    CHECK_EQ(fmm_lock(d, 1, 0), 0);
    fmm_unlock(d, 1);
    /* a process too */
    pid_t pid = fork();
    if (pid == 0) {
        int rc = fmm_lock(d, 0, 20000000);
        _exit(rc == FMM_ETIMEDOUT ? 0 : 1);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    /* a child forked while c holds page 0 holds nothing: its unlock and
     * close must not release the parent's lock (they share the open file
     * description until the child reopens it) */
    pid = fork();
    if (pid == 0) {
        int ok = !fmm_held(c, 0);
        /* and its stores are refused, writing nothing */
        uint32_t ps = fmm_page_size(c);
        unsigned char *before = malloc(ps);
        ok &= before != NULL;
        if (before) {
            memcpy(before, fmm_page_ptr(c, 0), ps);
            uint64_t h = 0; /* a hash whose page is 0 */
            ok &= fmm_set(c, 0, h, "k", 1, "child", 5, 0, 0, NULL, NULL) == FMM_EBADARG;
            ok &= fmm_set_ms(c, 0, h, "k", 1, "child", 5, FMM_F_MODSEQ, 0, 3, NULL, NULL) == FMM_EBADARG;
            ok &= fmm_delete(c, 0, h, "k", 1, NULL) == FMM_EBADARG;
            ok &= fmm_expunge(c, 0, FMM_EXPUNGE_ALL, NULL, NULL) == FMM_EBADARG;
            ok &= strstr(fmm_errdetail(c), "not locked by this thread") != NULL;
            ok &= memcmp(before, fmm_page_ptr(c, 0), ps) == 0;
            free(before);
        }
        fmm_unlock(c, 0);
        fmm_close(c);
        ok &= fmm_lock(d, 0, 20000000) == FMM_ETIMEDOUT; /* still the parent's */
        _exit(ok ? 0 : 1);
    }
    st = 0;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0);
    CHECK(fmm_held(c, 0));
    CHECK_EQ(fmm_lock(d, 0, 0), FMM_EBUSY);
    fmm_unlock(c, 0);
    CHECK_EQ(fmm_lock(d, 0, 0), 0);
    fmm_unlock(d, 0);
    CHECK_EQ(fmm_lock(c, 2, 0), FMM_EBADARG);
    fmm_close(d);
    fmm_close(c);
}

static void test_geometry_and_open_errors(void)
{
    fmm_cache *c = popen_("geo", 4096, 3, 0);
    CHECK(c);
    if (c)
        fmm_close(c);
    char p[PATH_MAX];
    path_of(p, "geo");
    fmm_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.format = FMM_FORMAT_PERL;
    cfg.page_size = 4096;
    cfg.num_pages = 4;
    char err[256];
    c = NULL;
    CHECK_EQ(fmm_open(p, &cfg, &c, NULL, err, sizeof err), FMM_EGEOMETRY);
    CHECK(c == NULL && strstr(err, "init_file") != NULL);
    cfg.init_file = 1;
    CHECK_EQ(fmm_open(p, &cfg, &c, NULL, err, sizeof err), 0);
    struct stat st;
    CHECK(stat(p, &st) == 0 && st.st_size == 4 * 4096);
    fmm_close(c);
    cfg.anonymous = 1;
    CHECK_EQ(fmm_open(p, &cfg, &c, NULL, err, sizeof err), FMM_EBADARG);
    cfg.anonymous = 0;
    cfg.page_size = 100;
    CHECK_EQ(fmm_open(p, &cfg, &c, NULL, err, sizeof err), FMM_EBADARG);
    cfg.format = 7;
    CHECK_EQ(fmm_open(p, &cfg, &c, NULL, err, sizeof err), FMM_EBADARG);
}

/* A slot count so large that 32 + 4 * count wraps 32 bits must fail the
 * header check at lock time (it once passed as a small table, and a probe
 * then indexed gigabytes past the page). */
static void test_damaged_slot_count(void)
{
    const uint32_t bad[] = {0x80000059u, 0xC0000000u, 0xFFFFFFF8u, 0x40000000u, 0};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        fmm_cache *c = popen_("slotcount", 4096, 1, 1);
        CHECK(c);
        if (!c)
            return;
        CHECK_EQ(pset(c, "k", "v", 1, 0, 0), 0);
        uint64_t before = fmm_repairs(c);
        memcpy(fmm_page_ptr(c, 0) + 4, &bad[i], 4); /* num_slots */
        char buf[16];
        CHECK(pget(c, "k", buf, sizeof buf, NULL) != 0); /* the page was re-initialised */
        CHECK(fmm_repairs(c) == before + 1);
        CHECK_EQ(pset(c, "k", "w", 1, 0, 0), 0);
        CHECK(pget(c, "k", buf, sizeof buf, NULL) == 0);
        fmm_close(c);
    }
}

static void test_damage(void)
{
    /* random bytes written over pages: no operation reads outside the
     * mapping (ASan would say), and damaged pages are repaired */
    uint64_t s = 99;
    int repaired_ok = 1;
    for (int round = 0; round < 300; round++) {
        fmm_cache *c = popen_("damage", 4096, 2, 1);
        CHECK(c);
        if (!c)
            return;
        char key[32], val[128];
        for (int i = 0; i < 60; i++) {
            snprintf(key, sizeof key, "k%d", i);
            int n = snprintf(val, sizeof val, "value-%d-%d", i, round);
            pset(c, key, val, (uint32_t)n, 0, 0);
        }
        unsigned char *b = fmm_page_ptr(c, (uint32_t)(rng(&s) % 2));
        int flips = 1 + (int)(rng(&s) % 8);
        for (int f = 0; f < flips; f++) {
            uint32_t off = (uint32_t)(rng(&s) % (round % 2 ? 4096 : 400));
            b[off] = (unsigned char)rng(&s);
        }
        char buf[200];
        for (int i = 0; i < 80; i++) {
            snprintf(key, sizeof key, "k%d", (int)(rng(&s) % 70));
            uint32_t kl = (uint32_t)strlen(key);
            uint64_t h = fmm_hash(c, key, kl);
            uint32_t pg = fmm_page_of(c, h);
            if (fmm_lock(c, pg, -1) != 0)
                continue;
            fmm_item it;
            switch (rng(&s) % 4) {
            case 0:
                fmm_get(c, pg, h, key, kl, FMM_GET_TOUCH, &it);
                break;
            case 1:
                fmm_set(c, pg, h, key, kl, "fresh", 5, 0, 0, NULL, NULL);
                break;
            case 2:
                fmm_delete(c, pg, h, key, kl, NULL);
                break;
            default: {
                fmm_page_info info;
                fmm_page_info_get(c, pg, &info);
                fmm_expunge(c, pg, FMM_EXPUNGE_EXPIRED, NULL, NULL);
            }
            }
            fmm_unlock(c, pg);
        }
        (void)buf;
        /* whatever the damage, a page the engine judged bad is repaired on
         * the next lock or op; pages that pass check_page stay usable */
        for (uint32_t p = 0; p < 2; p++) {
            char msg[200];
            if (fmm_lock(c, p, -1) != 0)
                continue;
            if (fmm_check_page(c, p, msg, sizeof msg) != 0) {
                fmm_init_page(c, p);
                if (fmm_check_page(c, p, msg, sizeof msg) != 0)
                    repaired_ok = 0;
            }
            fmm_unlock(c, p);
        }
        fmm_close(c);
    }
    CHECK(repaired_ok);
}

static const struct {
    const char *name;
    void (*fn)(void);
} TESTS[] = {
    {"perl_hash_vectors", test_hash_vectors},
    {"perl_layout", test_layout},
    {"perl_set_get_delete_expire", test_set_get_delete_expire},
    {"perl_churn_oracle", test_churn_oracle},
    {"perl_threads_and_fork", test_threads_and_fork},
    {"perl_lock_rules", test_lock_rules},
    {"perl_geometry_errors", test_geometry_and_open_errors},
    {"perl_damage", test_damage},
    {"perl_damaged_slot_count", test_damaged_slot_count},
};

static int rm_entry(const char *p, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)flag;
    (void)ftw;
    (void)remove(p);
    return 0;
}

int main(void)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    const char *tmp = getenv("TMPDIR");
    snprintf(g_dir, sizeof g_dir, "%s/test_fmm_perl-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(g_dir)) {
        perror("mkdtemp");
        return 2;
    }
    int passed = 0;
    for (size_t i = 0; i < sizeof TESTS / sizeof TESTS[0]; i++) {
        g_test_fail = 0;
        TESTS[i].fn();
        printf("%s %s\n", g_test_fail ? "FAIL" : "ok  ", TESTS[i].name);
        if (g_test_fail)
            g_fail++;
        else
            passed++;
    }
    nftw(g_dir, rm_entry, 16, FTW_DEPTH | FTW_PHYS);
    printf("%d passed, %d failed\n", passed, g_fail);
    return g_fail ? 1 : 0;
}
