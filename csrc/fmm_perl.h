/*
 * fmm_perl.h -- internal: the Cache::FastMmap-compatible file format.
 *
 * Not part of the engine's public contract (fmm.h).  fmm.c's public
 * functions dispatch here when a handle was opened with
 * cfg->format == FMM_FORMAT_PERL; the binding never calls pfm_* directly.
 * Plain C11 + POSIX, no Python.h.
 */
#ifndef FMM_PERL_H
#define FMM_PERL_H

#include "fmm.h"

typedef struct pfm_cache pfm_cache;

/* Perl's hash of the key bytes (mmap_cache.c), 32 bits. */
uint32_t pfm_hash32(const void *key, size_t klen);

int pfm_open(const char *path, const fmm_config *cfg, pfm_cache **out, int *created, char *err, size_t errlen);
void pfm_close(pfm_cache *p);
const char *pfm_errdetail(const pfm_cache *p);
uint32_t pfm_page_size(const pfm_cache *p);
uint32_t pfm_num_pages(const pfm_cache *p);
uint32_t pfm_start_slots(const pfm_cache *p);
uint32_t pfm_max_item(const pfm_cache *p);
uint64_t pfm_repairs(const pfm_cache *p);
uint32_t pfm_page_of(const pfm_cache *p, uint64_t hash);
uint32_t pfm_now(const pfm_cache *p);
void pfm_set_time(pfm_cache *p, uint32_t now);

int pfm_lock(pfm_cache *p, uint32_t page, int64_t timeout_ns);
int pfm_unlock(pfm_cache *p, uint32_t page);
int pfm_held(const pfm_cache *p, uint32_t page);

int pfm_get(pfm_cache *p, uint32_t page, uint64_t hash, const void *key, uint32_t klen, int touch, fmm_item *out);
int pfm_set(pfm_cache *p, uint32_t page, uint64_t hash, const void *key, uint32_t klen, const void *val,
            uint32_t vlen, uint32_t flags, uint32_t expire_on, uint64_t modseq, fmm_evict_fn evict, void *ctx);
int pfm_item_fits(const pfm_cache *p, uint64_t klen, uint64_t vlen);
int pfm_set_many(pfm_cache *p, uint32_t page, fmm_batch_item *items, uint32_t n, uint32_t expire_on,
                 fmm_evict_fn evict, void *ctx, uint32_t *bad, uint32_t fault);
int pfm_delete(pfm_cache *p, uint32_t page, uint64_t hash, const void *key, uint32_t klen, uint32_t *old_flags);
int pfm_expunge(pfm_cache *p, uint32_t page, int mode, fmm_evict_fn evict, void *ctx);
int pfm_page_foreach(pfm_cache *p, uint32_t page, fmm_visit_fn fn, void *ctx);
void pfm_page_info_get(pfm_cache *p, uint32_t page, fmm_page_info *info);
void pfm_page_clear_stats(pfm_cache *p, uint32_t page);
int pfm_check_page(pfm_cache *p, uint32_t page, char *msg, size_t msglen);
void pfm_init_page(pfm_cache *p, uint32_t page);
int pfm_check_file(const pfm_cache *p);
unsigned char *pfm_page_ptr(pfm_cache *p, uint32_t page);

/* Shared with fmm.c's open path (defined there), so that both formats
 * trust, name and clean up files by the same rules; see fmm_open. */
struct stat;
int fmm_check_trust(const struct stat *st, int permissions, char *err, size_t errlen);
int fmm_tmp_create(const char *path, int permissions, char **tmpname, int *fd, char *err, size_t errlen);
int fmm_tmp_publish(int fd, const char *tmpname, const char *path, int replace);

#endif /* FMM_PERL_H */
