/*
 * fuzz_fmm_perl.c -- libFuzzer target for the Cache::FastMmap file format
 * (fmm_perl.c): stores, reads, deletes, expunges and iteration on pages
 * that the input damages at random while the cache is open.
 *
 *   make fuzz         runs this target after fuzz_fmm (FUZZ_SECONDS each)
 *   make ctest        replays tests/fuzz_corpus_perl with -DFMM_FUZZ_REPLAY
 *
 * One input = one fresh Perl-format file and a program:
 *   byte 0    page size 1/2/4/8 KiB (bits 0-1), 1..4 pages (bits 2-3),
 *             start_slots 89 or a small count (bits 4-7)
 *   then ops  set / get / delete / expunge / foreach / damage bytes /
 *             check all pages / advance time / page info / reopen / a
 *             store with a modseq or a tombstone
 *
 * Oracles, beyond "ASan/UBSan stay quiet":
 *   - every return code is one fmm.h allows;
 *   - every item handed out lies inside its page;
 *   - a store that returns 0 reads back the same bytes at once;
 *   - until the input damages the file: every page passes fmm_check_page
 *     after every operation, nothing is repaired, and each get returns the
 *     last value stored under the key or nothing (eviction drops, never
 *     changes);
 *   - after damage, a page that fails fmm_check_page passes once
 *     re-initialised.
 */
#define _GNU_SOURCE
#include "fmm.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define NKEYS 24
#define MAXV 3000

static char g_path[512];

static void die(const char *what)
{
    fprintf(stderr, "fuzz_fmm_perl: oracle violated: %s\n", what);
    abort();
}

typedef struct {
    const uint8_t *d;
    size_t n, i;
} input;

static unsigned next(input *in) { return in->i < in->n ? in->d[in->i++] : 0; }

static fmm_cache *open_it(uint32_t ps, uint32_t np, uint32_t ss, int init)
{
    fmm_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.format = FMM_FORMAT_PERL;
    cfg.page_size = ps;
    cfg.num_pages = np;
    cfg.start_slots = ss;
    cfg.init_file = init;
    cfg.perl_value_flags = FMM_T_BYTES;
    fmm_cache *c = NULL;
    char err[256];
    int rc = fmm_open(g_path, &cfg, &c, NULL, err, sizeof err);
    if (rc) {
        fprintf(stderr, "open: %s (%s)\n", fmm_strerror(rc), err);
        die("open of a file of the right size failed");
    }
    return c;
}

static void inside(fmm_cache *c, uint32_t page, const fmm_item *it)
{
    const char *lo = (const char *)fmm_page_ptr(c, page), *hi = lo + fmm_page_size(c);
    if (it->key < lo || it->key + it->klen > hi || it->val < lo || it->val + it->vlen > hi)
        die("an item lies outside its page");
}

typedef struct {
    fmm_cache *c;
    uint32_t page;
} visit_ctx;

static int visit(void *ctx, const fmm_item *it)
{
    visit_ctx *v = ctx;
    inside(v->c, v->page, it);
    return 0;
}

static void on_evict(void *ctx, const fmm_item *it)
{
    visit_ctx *v = ctx;
    inside(v->c, v->page, it);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (!g_path[0]) {
        const char *tmp = getenv("TMPDIR");
        char dir[400];
        snprintf(dir, sizeof dir, "%s/fuzz_fmm_perl-XXXXXX", tmp && *tmp ? tmp : "/tmp");
        if (!mkdtemp(dir))
            abort();
        snprintf(g_path, sizeof g_path, "%s/cache", dir);
    }
    input in = {data, size, 0};
    unsigned g = next(&in);
    uint32_t ps = 1024u << (g & 3), np = 1 + ((g >> 2) & 3), ss = (g >> 4) ? 4 + (g >> 4) * 3 : 89;
    unlink(g_path);
    fmm_cache *c = open_it(ps, np, ss, 0);
    static uint8_t model[NKEYS][MAXV];
    static int32_t mlen[NKEYS]; /* -1: absent */
    static uint8_t val[MAXV];
    for (int k = 0; k < NKEYS; k++)
        mlen[k] = -1;
    int damaged = 0;
    uint32_t now = 1700000000;
    fmm_set_time(c, now);
    for (int steps = 0; steps < 400 && in.i < in.n; steps++) {
        unsigned op = next(&in) % 11;
        int k = (int)(next(&in) % NKEYS);
        char key[16];
        int kl = snprintf(key, sizeof key, "key-%d", k * 7919);
        uint64_t h = fmm_hash(c, key, (size_t)kl);
        uint32_t page = fmm_page_of(c, h);
        visit_ctx vc = {c, page};
        if (op == 5) { /* damage bytes anywhere in the file */
            unsigned cnt = 1 + next(&in) % 8;
            for (unsigned j = 0; j < cnt; j++) {
                uint32_t off = ((uint32_t)next(&in) << 8 | next(&in)) % (ps * np);
                if (next(&in) & 1)
                    off %= 64; /* favour the header and the first slots */
                fmm_page_ptr(c, 0)[off] = (uint8_t)next(&in);
            }
            damaged = 1;
            continue;
        }
        if (op == 9) { /* reopen */
            fmm_close(c);
            c = open_it(ps, np, ss, 0);
            fmm_set_time(c, now);
            continue;
        }
        if (op == 7) {
            now += next(&in) % 8;
            fmm_set_time(c, now);
            continue;
        }
        int rc = fmm_lock(c, page, -1);
        if (rc)
            die("lock failed");
        switch (op) {
        case 0:
        case 10: {
            uint32_t vl = (next(&in) * 13u) % MAXV;
            for (uint32_t j = 0; j < vl; j++)
                val[j] = (uint8_t)(j * 31 + (unsigned)k + in.i);
            uint32_t exp = (next(&in) % 4 == 0) ? now + next(&in) % 5 : 0;
            uint32_t flags = next(&in) % 3; /* bytes, str, none */
            if (flags == FMM_T_NONE)
                vl = 0;
            uint64_t ms = 0;
            if (op == 10) {
                flags |= FMM_F_MODSEQ;
                ms = next(&in);
                if (next(&in) & 1) {
                    flags = FMM_T_TOMBSTONE | FMM_F_MODSEQ;
                    vl = 0;
                }
            }
            rc = fmm_set_ms(c, page, h, key, (uint32_t)kl, val, vl, flags, exp, ms, on_evict, &vc);
            if (rc != 0 && rc != FMM_ETOOBIG && rc != FMM_EREFUSED && rc != FMM_ENOCHANGE)
                die("set returned an undocumented code");
            if (rc == 0 && (flags & FMM_F_TYPE_MASK) != FMM_T_TOMBSTONE && exp != now) {
                fmm_item it;
                if (fmm_get(c, page, h, key, (uint32_t)kl, 0, &it) != 0)
                    die("a stored key is not readable");
                inside(c, page, &it);
                if (it.vlen != vl || (vl && memcmp(it.val, val, vl)))
                    die("a stored value reads back different");
            }
            if (rc == 0) {
                int live = (flags & FMM_F_TYPE_MASK) != FMM_T_TOMBSTONE && !exp;
                mlen[k] = live ? (int32_t)vl : -2; /* -2: may or may not be there */
                if (live)
                    memcpy(model[k], val, vl);
            } else if (rc != FMM_EREFUSED && rc != FMM_ENOCHANGE) {
                mlen[k] = mlen[k] == -1 ? -1 : -2;
            }
            if (exp && rc == 0)
                mlen[k] = -2;
            break;
        }
        case 1: {
            fmm_item it;
            rc = fmm_get(c, page, h, key, (uint32_t)kl, FMM_GET_TOUCH, &it);
            if (rc != 0 && rc != FMM_ENOTFOUND)
                die("get returned an undocumented code");
            if (rc == 0) {
                inside(c, page, &it);
                if (!damaged && mlen[k] >= 0 &&
                    (it.vlen != (uint32_t)mlen[k] || (it.vlen && memcmp(it.val, model[k], it.vlen))))
                    die("get returned a value that was never stored under the key");
                if (!damaged && mlen[k] == -1)
                    die("get found a key never stored");
            }
            break;
        }
        case 2:
            rc = fmm_delete(c, page, h, key, (uint32_t)kl, NULL);
            if (rc != 0 && rc != FMM_ENOTFOUND)
                die("delete returned an undocumented code");
            mlen[k] = -1;
            break;
        case 3:
            fmm_expunge(c, page, next(&in) & 1 ? FMM_EXPUNGE_ALL : FMM_EXPUNGE_EXPIRED, on_evict, &vc);
            if (!damaged)
                for (int j = 0; j < NKEYS; j++)
                    if (mlen[j] != -1)
                        mlen[j] = -2; /* not tracked per page: allow absence */
            break;
        case 4:
            fmm_page_foreach(c, page, visit, &vc);
            break;
        case 8: {
            fmm_page_info info;
            fmm_page_info_get(c, page, &info);
            break;
        }
        default:
            break;
        }
        fmm_unlock(c, page);
        if (!damaged) {
            for (uint32_t p = 0; p < np; p++) {
                char msg[200];
                if (fmm_lock(c, p, -1))
                    die("lock failed");
                if (fmm_check_page(c, p, msg, sizeof msg) != 0) {
                    fprintf(stderr, "%s\n", msg);
                    die("an undamaged page fails the check");
                }
                fmm_unlock(c, p);
            }
            if (fmm_repairs(c))
                die("a page was repaired without damage");
        }
    }
    for (uint32_t p = 0; p < np; p++) {
        char msg[200];
        if (fmm_lock(c, p, -1))
            die("lock failed");
        if (fmm_check_page(c, p, msg, sizeof msg) != 0) {
            fmm_init_page(c, p);
            if (fmm_check_page(c, p, msg, sizeof msg) != 0)
                die("a re-initialised page fails the check");
        }
        fmm_unlock(c, p);
    }
    fmm_close(c);
    return 0;
}

#ifdef FMM_FUZZ_REPLAY
#include <dirent.h>

static int replay_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return 0;
    static uint8_t buf[1 << 16];
    size_t n = fread(buf, 1, sizeof buf, f);
    fclose(f);
    LLVMFuzzerTestOneInput(buf, n);
    return 1;
}

int main(int argc, char **argv)
{
    int count = 0;
    for (int a = 1; a < argc; a++) {
        DIR *d = opendir(argv[a]);
        if (!d) {
            count += replay_file(argv[a]);
            continue;
        }
        struct dirent *e;
        while ((e = readdir(d))) {
            if (e->d_name[0] == '.')
                continue;
            char p[1024];
            snprintf(p, sizeof p, "%s/%s", argv[a], e->d_name);
            count += replay_file(p);
        }
        closedir(d);
    }
    printf("fuzz_fmm_perl replay: %d inputs, no oracle violated\n", count);
    return 0;
}
#endif
