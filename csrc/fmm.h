/*
 * fmm.h -- the fastmmap engine: a shared-memory key/value cache in one
 * mmap'ed file, split into pages that are locked one at a time.
 *
 * This header is the engine's whole contract.  The engine is plain C11 +
 * POSIX; it never includes Python.h.  The CPython binding
 * (_fastmmapmodule.c) and the C test driver (test_fmm.c) use only what is
 * declared here.
 *
 * Naming: public functions fmm_*, macros and codes FMM_*, everything else in
 * fmm.c is static.
 *
 * ---------------------------------------------------------------------------
 * File format (native, version 4; files of older versions are rejected as
 * BadFileError: reopen with init_file.  Version 3 had whole-second expiry
 * and a full last_access second, and left the first word of a 9..16-byte
 * key unseeded in the short-key hash (so its keys live on other pages).
 * Version 2 had no sequence word, and its processes would write pages
 * without moving it; version 1 also had the page-header fields at 64..100
 * and XXH64 for every key).  All fields
 * native-endian; the file is a shared-memory file, not an exchange format.
 *
 *   offset 0      file header, FMM_HEADER_SIZE (4096) bytes, first 128 used:
 *                   char     magic[8]      "FASTMMAP"
 *                   uint32   version       4 (FMM_FORMAT_VERSION)
 *                   uint32   state         FMM_STATE_READY once initialised
 *                   uint32   header_size   4096
 *                   uint32   page_size     power of two, 1 KiB .. 1 GiB
 *                   uint32   num_pages     1 .. FMM_MAX_PAGES
 *                   uint32   start_slots   power of two
 *                   uint64   file_size     header_size + num_pages*page_size
 *                   uint64   created       unix seconds
 *                   uint64   hash_seed     random per file
 *                   uint64   check         XXH64 of the 56 bytes above it
 *                   uint64   repairs       pages re-initialised (atomic add)
 *   offset 4096   page 0, then page 1, ... each page_size bytes.
 *
 * Page layout:
 *   0    page header, FMM_PAGE_HEADER_SIZE (128) bytes:
 *          0   pthread_mutex_t lock (robust, process-shared, error-checking),
 *              40 bytes with glibc on x86_64;
 *          40  uint16 magic 0x5046, uint16 dirty,
 *          44  uint32 num_slots, 48 live, 52 seq, 56 free_data, 60 clock,
 *          64  uint32 deleted, 68 nreads, 72 nhits (only with
 *              enable_stats), 76..127 zero.
 *          The mutex and the fields every operation reads (40..63) share
 *          the first 64-byte cache line.  Where pthread_mutex_t is larger
 *          than 40 bytes it is padded to 64 and every field moves 24 bytes
 *          up (the file is native to its platform).
 *   128  slot table: num_slots (a power of two) uint32 slots.
 *          0 = empty (ends a probe), 1 = deleted (probe continues),
 *          otherwise (hash32 & ~offmask) | (entry_offset >> 2), where
 *          offmask = page_size/4 - 1: the low bits locate the entry (offsets
 *          are 4-aligned), the high bits are a tag from the key's hash that
 *          rejects most non-matching slots without touching the entry.
 *   ..   data area, from 128 + 4*num_slots to page_size: entries appended at
 *        free_data (a bump pointer) and compacted when space or slots run
 *        out.
 *
 * Entry: 20-byte header, then key bytes, then value bytes, total rounded up
 * to a multiple of 4:
 *   uint32 access      the page's logical LRU clock at the last read or write
 *   uint32 atime_ms    low 22 bits: unix second of the last read or write,
 *                      mod 2^22 (the full second, reported only, is the
 *                      latest one with those bits); high 10 bits: the
 *                      expiry's milliseconds (0..999) past expire_on
 *   uint32 expire_on   expiry's unix second, 0 = never: the entry expires at
 *                      expire_on * 1000 + those milliseconds (unix ms)
 *   uint32 klen_flags  key length (low 24 bits) | flags << 24
 *   uint32 vlen        value length
 * The key's hash is not stored: compaction recomputes it from the key.
 *
 * Hash: fmm_key_hash of the key bytes, seeded with the file's hash_seed: for
 * keys of up to 16 bytes two 64x64->128-bit multiply-folds of the key's
 * words, the seed and the length; for longer keys XXH64.  The page is chosen
 * from the high 32 bits (multiply-shift), the slot from the low 32 bits, so
 * the two choices are independent.
 *
 * LRU: each page has a 32-bit logical clock, incremented on every store;
 * an entry's access field is the clock value of its last use (a store
 * takes the new value, a read the current one).  Order is exact between
 * stores; reads between two stores to a page rank equal, and a read needs
 * no new stamp while the entry's stamp is from this second and within the
 * newest 1/16 of the clock span the page holds (`live` ticks for a full
 * page, proportionally more for a page whose data area is less full).
 * That lets most reads skip the lock (below) and write nothing.  Eviction
 * takes the oldest stamps first (ties in slot-table order) and renumbers
 * the stamps it keeps densely, 1..k with equal stamps kept equal, setting
 * the clock to k, so the clock never wraps.  (Versions 1 and
 * 2 advanced the clock on every hit as well: exact order, but every read
 * wrote the page.)
 *
 * Lock-free reads: `seq` is a sequence word.  fmm_lock makes it odd before
 * the holder changes anything, fmm_unlock makes it even (one higher) before
 * releasing the mutex.  fmm_get_optimistic reads a page without the lock:
 * it notes an even seq, probes, the caller copies, and fmm_read_valid
 * checks that seq did not move; any change means the copy may be torn and
 * is discarded.  Readers write nothing to the page.
 *
 * Locks and crash repair: the page mutex is a robust, process-shared
 * pthread mutex.  `dirty` is set before the first byte of a mutation and
 * cleared after the last.  When a lock returns EOWNERDEAD (the holder died),
 * the new owner validates the page; if it is dirty or invalid it is
 * re-initialised (its entries are lost, the file's repair count goes up),
 * then the mutex is marked consistent.  Every lock also checks the header
 * invariants, and every offset and length read from the page is bounds
 * checked before use: a corrupt page is repaired, it never causes an
 * out-of-page access.  The page may also change under the lock (a writer
 * that ignores the locks, random bytes written into the file): every field
 * that sizes or places a memory access is read once and checked where it
 * is used, and before unlocking, the lock words glibc trusts (owner TID,
 * kind, robust-list links) are restored if they were damaged while held.
 * Entries carry no checksum: bytes written into a value are returned as
 * they are.  A file truncated under the mapping: see "Truncation guard".
 * ---------------------------------------------------------------------------
 */
#ifndef FMM_H
#define FMM_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define FMM_HEADER_SIZE      4096u
#define FMM_PAGE_HEADER_SIZE 128u
#define FMM_ENTRY_HEADER_SIZE 20u
#define FMM_MIN_PAGE_SIZE    1024u
#define FMM_MAX_PAGE_SIZE    (1u << 30)
#define FMM_MAX_PAGES        (1u << 24)
#define FMM_MAX_KEY_LEN      ((1u << 24) - 1)
#define FMM_STATE_READY      0x52454459u  /* "READ" */
#define FMM_FORMAT_VERSION   4u  /* 4: millisecond expiry, every short-key word seeded; 3: the page sequence word for lock-free reads; 2: hot page-header fields share the mutex's cache line, short-key hash */

/* ---------- Error codes ----------
 * 0 is success.  Negative values are engine codes below; positive values
 * are errno values.  fmm_strerror() describes both. */
#define FMM_OK          0
#define FMM_ENOTFOUND   (-30001) /* key absent, expired, or deleted */
#define FMM_ETOOBIG     (-30002) /* item can never fit in one page */
#define FMM_EBADFILE    (-30003) /* not a fastmmap file, or its header is invalid */
#define FMM_EGEOMETRY   (-30004) /* size options disagree with the existing file */
#define FMM_ELOCKED     (-30005) /* this thread already holds a page lock of this cache */
#define FMM_ETIMEDOUT   (-30006) /* the lock wait timed out */
#define FMM_EBUSY       (-30007) /* fmm_lock with timeout 0: page held elsewhere */
#define FMM_EBADARG     (-30008) /* invalid argument */
#define FMM_ECORRUPT    (-30009) /* a page failed validation */
#define FMM_EREPLACED   (-30010) /* the file was deleted, replaced, or truncated under the mapping */
#define FMM_ETOOMANY    (-30011) /* a thread holds locks in too many caches at once */
#define FMM_EREFUSED    (-30012) /* fmm_set_ms: the modseq rules refused the store */
#define FMM_ENOCHANGE   (-30013) /* fmm_set_ms: accepted, but an equal or newer
                                    modseq entry already there was kept */
#define FMM_EAGAIN      (-30014) /* fmm_get_optimistic: take the lock and use fmm_get */
#define FMM_EUNTRUSTED  (-30015) /* fmm_open: the existing file belongs to another user, or
                                    group/others may write it beyond cfg->permissions */

/* ---------- Entry flags (8 bits, stored with the key length) ----------
 * Engine-level flags are opaque to the engine except FMM_F_DIRTY, which
 * selects entries reported to the eviction callback.  The binding assigns
 * the value-type and compression bits. */
#define FMM_F_TYPE_MASK   0x07u  /* how the value bytes decode */
#define FMM_T_BYTES       0x00u
#define FMM_T_STR         0x01u  /* UTF-8 text */
#define FMM_T_NONE        0x02u
#define FMM_T_PICKLE      0x03u
#define FMM_T_JSON        0x04u
#define FMM_T_CUSTOM      0x05u
#define FMM_F_COMP_MASK   0x18u  /* compression of the value bytes */
#define FMM_C_NONE        0x00u
#define FMM_C_ZLIB        0x08u
#define FMM_C_LZ4         0x10u
#define FMM_C_CUSTOM      0x18u
#define FMM_F_DIRTY       0x20u  /* write-back: not yet written to the store */
#define FMM_F_KEYSTR      0x40u  /* the key was given as str (UTF-8) */
#define FMM_F_MODSEQ      0x80u  /* the entry carries a 64-bit modseq (fmm_item.modseq) */
#define FMM_T_TOMBSTONE   0x06u  /* type: a deletion marker carrying a modseq;
                                    reads as absent, needs FMM_F_MODSEQ, no value */

/* ---------- Modseq and tombstones (Cache::FastMmap 1.63 rules) ----------
 * An entry may carry a 64-bit modification sequence number.  A tombstone is
 * an entry of type FMM_T_TOMBSTONE with a modseq and no value: the key reads
 * as absent, but the modseq is remembered (until the tombstone expires) so a
 * late store of an older version is refused.  fmm_set_ms applies the rules
 * against an existing, unexpired entry that carries a modseq (an entry
 * without one, or an expired one, never blocks a store):
 *   existing tombstone, store without modseq        -> FMM_EREFUSED
 *   existing tombstone, store with modseq <  old    -> FMM_EREFUSED
 *   existing tombstone, store with modseq >= old    -> stored
 *   existing tombstone, tombstone with modseq <= old -> FMM_ENOCHANGE
 *   existing value,     tombstone with modseq <= old -> FMM_ENOCHANGE
 *   existing value,     store with modseq <  old    -> FMM_EREFUSED
 *   existing value,     store without modseq        -> stored (modseq dropped)
 *   anything else                                   -> stored
 * Native format: the modseq is the first 8 bytes of the value area (the
 * stored vlen includes them); Perl format: likewise, as 1.63 stores it
 * (FC_HASMODSEQ, FC_TOMBSTONE).  fmm_item.val/vlen never include it.
 *
 * Native format details: an entry is a tombstone only with both
 * FMM_T_TOMBSTONE and FMM_F_MODSEQ (without the modseq, type 6 is opaque
 * value bits, as every type is to the engine, and fmm_set_ms stores it as
 * an ordinary value).  The Perl format has no opaque type bits (the type is
 * mapped to Perl's flag bits): there, fmm_set_ms and fmm_set refuse type
 * FMM_T_TOMBSTONE without FMM_F_MODSEQ with FMM_EBADARG.  An entry with FMM_F_MODSEQ
 * and a stored vlen below 8, or a tombstone with a value, is corrupt (fmm_check_page reports it; a lookup that meets the former
 * repairs the page).  The size limits (FMM_ETOOBIG) are checked before the
 * rules; a stored tombstone takes 8 value bytes.  Tombstones are ordinary
 * entries for eviction (least recently used first) and expiry, but they are
 * invisible to fmm_get (without FMM_GET_TOMBSTONE), fmm_page_foreach and
 * the eviction callback, and fmm_delete removes one as FMM_ENOTFOUND. */

typedef struct fmm_cache fmm_cache;

/* Options for fmm_open.  Zero-initialise, then set what you need. */
typedef struct fmm_config {
    uint32_t page_size;    /* 0: adopt the file's, or FMM default 64 KiB */
    uint32_t num_pages;    /* 0: adopt the file's, or default 89 */
    uint32_t start_slots;  /* 0: adopt the file's, or default 128 */
    int explicit_geometry; /* FMM_GEOM_* bits: the sizes the caller asked for;
                              an existing file that disagrees is an error */
    int init_file;         /* re-initialise: in place if geometry matches, else replace */
    int permissions;       /* mode of a created file, exact (no umask); 0 -> 0600.
                              Also the trust limit of an existing file: see fmm_open */
    int anonymous;         /* no file: MAP_SHARED|MAP_ANONYMOUS, path ignored */
    int enable_stats;      /* count reads and hits in the page headers */
    int format;            /* FMM_FORMAT_NATIVE (0) or FMM_FORMAT_PERL */
    uint32_t perl_value_flags; /* Perl format: the FMM type|compression flags
                              reported for values stored without Perl's
                              UTF8/UNDEF flags (e.g. FMM_T_JSON|FMM_C_ZLIB) */
} fmm_config;

#define FMM_FORMAT_NATIVE 0
#define FMM_FORMAT_PERL   1 /* Cache::FastMmap's file format; see fmm_perl.c */

#define FMM_GEOM_PAGE_SIZE 1 /* page_size was given */
#define FMM_GEOM_NUM_PAGES 2 /* num_pages was given */

/* One entry as seen under a page lock.  Pointers point into the mapping
 * and are valid until the page is unlocked or mutated. */
typedef struct fmm_item {
    const char *key;
    const char *val;
    uint32_t klen;
    uint32_t vlen;
    uint32_t flags;
    uint64_t expire_on;    /* in fmm_time_unit()s (native: ms), 0 = never */
    uint32_t access;       /* logical LRU clock value */
    uint32_t last_access;  /* unix seconds */
    uint64_t modseq;       /* when flags & FMM_F_MODSEQ, else 0 */
} fmm_item;

/* Page-level counters for statistics and the CLI. */
typedef struct fmm_page_info {
    uint32_t num_slots;
    uint32_t live;        /* slots holding an entry (expired included) */
    uint32_t expired;     /* of those, expired now */
    uint32_t deleted;     /* deleted-slot markers */
    uint32_t data_start;  /* 128 + 4*num_slots */
    uint32_t free_data;   /* first free byte */
    uint32_t live_bytes;  /* bytes of live, unexpired entries */
    uint32_t nreads;
    uint32_t nhits;
    uint32_t tombstones;  /* of the live, unexpired entries, tombstones (invisible:
                             live - expired - tombstones entries can be read) */
} fmm_page_info;

/* Called for each entry removed by eviction, expiry reclaim or expunge
 * whose flags include FMM_F_DIRTY (write-back).  Runs under the page lock;
 * the item's pointers are valid only during the call.  Must not call back
 * into the engine. */
typedef void (*fmm_evict_fn)(void *ctx, const fmm_item *item);

/* Called by fmm_page_foreach for each live entry, under the page lock.
 * Return 0 to continue, non-zero to stop (that value is returned). */
typedef int (*fmm_visit_fn)(void *ctx, const fmm_item *item);

/* ---------- Open and close ---------- */

/**
 * @brief Open (creating if needed) the cache file at @p path.
 *
 * Creation is race-free: the file is built and initialised under a
 * temporary name in the same directory, its space reserved with
 * posix_fallocate (ENOSPC is reported here, never as a later SIGBUS), and
 * published with link(2), which fails if another process won the race, in
 * which case the winner's file is opened.  Files are opened with O_NOFOLLOW
 * and O_CLOEXEC.
 *
 * The temporary name is "<path>.tmp-<pid>-XXXXXX" and its creator holds an
 * flock(2) on it until the file is published, so a creator that died
 * (SIGKILL, power cut of a container) is recognised by the lock being free,
 * whatever has become of its pid.  Every open removes such abandoned
 * temporary files of @p path that belong to this user (fmm_reap_temps).
 *
 * An existing file is trusted only if it is owned by this process's
 * effective uid or by root, and its mode gives group and others no write
 * permission that cfg->permissions (0: 0600) does not: otherwise
 * FMM_EUNTRUSTED, checked on the open descriptor before anything is read,
 * and the file is left as it is.
 *
 * @param[in]  path     file path (ignored when cfg->anonymous).
 * @param[in]  cfg      options; see fmm_config.
 * @param[out] out      the new handle.
 * @param[out] created  set to 1 if this call created the file, else 0.
 * @param[out] err      buffer for a detail message (may be NULL).
 * @param[in]  errlen   size of @p err.
 * @return 0, an FMM_E* code, or an errno value.
 */
int fmm_open(const char *path, const fmm_config *cfg, fmm_cache **out,
             int *created, char *err, size_t errlen);

/**
 * @brief Find (and remove) the temporary files that creators of @p path
 * abandoned: "<path>.tmp-<pid>-XXXXXX" files of this user whose creator's
 * flock is free.  fmm_open calls it with remove = 1.
 *
 * @param[in] path    the cache file's path.
 * @param[in] remove  1: unlink them; 0: only report them.
 * @param[in] fn      called with each one's name (in path's directory) and
 *                    size in bytes; may be NULL.
 * @param[in] ctx     passed to @p fn.
 * @return how many were found (and, with remove, removed), or -errno if
 *         the directory cannot be read.
 */
int fmm_reap_temps(const char *path, int remove, void (*fn)(void *ctx, const char *name, uint64_t size),
                   void *ctx);

/**
 * @brief Unmap and close.  No page lock of this handle may be held.
 */
void fmm_close(fmm_cache *c);

/** @brief Describe an FMM_E* code or errno value. */
const char *fmm_strerror(int rc);

/** @brief Detail text for the last error of an fmm_* call in this thread
 * ("" if none).  Kept per thread, so read it right after the failing call. */
const char *fmm_errdetail(const fmm_cache *c);

/* ---------- Geometry ---------- */
uint32_t fmm_page_size(const fmm_cache *c);
uint32_t fmm_num_pages(const fmm_cache *c);
uint32_t fmm_start_slots(const fmm_cache *c);
/** @brief Largest 20+klen+vlen (rounded to 4) that fits an empty page. */
uint32_t fmm_max_item(const fmm_cache *c);
/**
 * @brief The size rule of every store (fmm_set, fmm_set_ms, fmm_set_many):
 * 1 if a key of @p klen bytes and a value of @p vlen bytes (as stored,
 * without a modseq) can fit in an empty page, i.e. klen <= FMM_MAX_KEY_LEN
 * and 20 + klen + vlen <= fmm_max_item; else 0.
 */
int fmm_item_fits(const fmm_cache *c, uint64_t klen, uint64_t vlen);
/** @brief Pages re-initialised after a crash or corruption, file-wide. */
uint64_t fmm_repairs(const fmm_cache *c);

/* ---------- Hashing ---------- */

/** @brief XXH64 with an explicit seed (exposed for tests). */
uint64_t fmm_xxh64(const void *data, size_t len, uint64_t seed);
/** @brief The native format's key hash (see the file format above). */
uint64_t fmm_key_hash(const void *key, size_t len, uint64_t seed);
/** @brief Cache::FastMmap's 32-bit hash of the key bytes (format PERL;
 * exposed for tests): h = 0x92f7e3b1, then h = rotl32(h, 4) + byte. */
uint32_t fmm_perl_hash(const void *key, size_t klen);
/** @brief The key's 64-bit hash, seeded with the file's seed (format PERL:
 * fmm_perl_hash). */
uint64_t fmm_hash(const fmm_cache *c, const void *key, size_t klen);
/** @brief The page that holds keys with this hash. */
uint32_t fmm_page_of(const fmm_cache *c, uint64_t hash);

/* ---------- Time ---------- */

/* Times (expire_on, fmm_now) are unix time in the file's unit: milliseconds
 * for the native format, seconds for Perl's.  The clock is read in the
 * vDSO (no syscall): the kernel's coarse clock where its tick is at most
 * 4 ms, else the precise one. */

/** @brief Units per second of this file's times: 1000 (native) or 1 (Perl). */
uint32_t fmm_time_unit(const fmm_cache *c);
/** @brief Now, in the file's unit: the override if set, else the clock. */
uint64_t fmm_now(const fmm_cache *c);
/**
 * @brief The expire_on of an entry stored now that must live @p after
 * units: fmm_now() + after, plus what the clock may lag real time by, so
 * that the entry never expires early; it may live up to 2 clock ticks + 1 ms
 * longer (native; exact with the override).
 */
uint64_t fmm_expire_at(const fmm_cache *c, uint64_t after);
/** @brief Override the clock for this handle, in the file's unit (0 = real
 * time).  For tests. */
void fmm_set_time(fmm_cache *c, uint64_t now);

/* ---------- Locking ----------
 * Lock order: a thread releases the GIL (if any) before it may block on a
 * page lock.  A thread holds at most one page lock per cache: locking a
 * second page (or the same page again) of the same cache returns
 * FMM_ELOCKED instead of deadlocking. */

/**
 * @brief Lock page @p page.
 * @param[in] timeout_ns  <0: wait forever; 0: try once (FMM_EBUSY if held);
 *                        >0: wait at most this long (FMM_ETIMEDOUT).
 * @return 0, FMM_EBUSY, FMM_ETIMEDOUT, FMM_ELOCKED, FMM_ETOOMANY,
 *         FMM_EBADARG or an errno value.  On 0 the page has been validated
 *         (and repaired if a previous holder died mid-write or it was found
 *         corrupt).
 */
int fmm_lock(fmm_cache *c, uint32_t page, int64_t timeout_ns);

/**
 * @brief Unlock a page locked by this thread.
 * @return 0, or FMM_EREPLACED if the file was truncated under the mapping
 *         (before or during the locked section: whatever was read under
 *         the lock may be zeros, so discard it), or FMM_EBADARG, changing
 *         nothing, if this thread does not hold @p page.  A forked child
 *         holds none of its parent's page locks (fmm_held is 0 there).
 */
int fmm_unlock(fmm_cache *c, uint32_t page);

/**
 * @brief Recover a page lock whose owner no longer exists.
 *
 * A robust mutex is released by the kernel when its owner dies, but a lock
 * word damaged on disk (or an owner outside this PID namespace) can name a
 * thread that will never unlock it.  Called by a thread that has waited a
 * while: if the lock word's owner TID does not exist (or the word is
 * inconsistent), it is marked owner-died, as the kernel does, and waiters
 * are woken; the next locker gets the page through the normal repair path.
 * Relies on the Linux robust-futex lock word (owner TID in the low 30 bits,
 * which glibc keeps as the first word of pthread_mutex_t).
 * @return 1 if the lock was recovered, 0 if its owner is alive.
 */
int fmm_lock_stale(fmm_cache *c, uint32_t page);

/** @brief 1 if the calling thread holds @p page of this cache, else 0. */
int fmm_held(const fmm_cache *c, uint32_t page);

/* ---------- Entry operations (page locked by the caller) ----------
 * The calls that write a page (fmm_set, fmm_set_ms, fmm_delete,
 * fmm_expunge) first check that the calling thread holds it, and return
 * FMM_EBADARG, writing nothing, if not: in particular in a child forked
 * while its parent held the page (code run under the lock that forks). */

#define FMM_GET_TOUCH   1 /* a hit updates LRU position and statistics */
#define FMM_GET_EXPIRED 2 /* also return an expired entry (write-back flushes) */
#define FMM_GET_TOMBSTONE 4 /* also return a tombstone (to read its modseq);
                               without it a tombstone is FMM_ENOTFOUND */

/**
 * @brief Look up a key in a locked page.
 * @param[in] touch  FMM_GET_* bits: FMM_GET_TOUCH makes a hit update the
 *                   entry's LRU position (and the statistics when
 *                   enabled); 0 is a pure peek.  FMM_GET_EXPIRED returns
 *                   expired entries too.  FMM_GET_TOMBSTONE returns
 *                   tombstones too (vlen 0, out->modseq set).
 * @return 0 with *out filled, or FMM_ENOTFOUND (absent, expired or a
 *         tombstone).
 */
int fmm_get(fmm_cache *c, uint32_t page, uint64_t hash,
            const void *key, uint32_t klen, int touch, fmm_item *out);

/**
 * @brief Look up a key without locking its page (native format).
 *
 * Reads the page under its sequence word (see "Lock-free reads" above) and
 * writes nothing.  On 0, *out points into the page as with fmm_get; the
 * caller copies what it needs and then calls fmm_read_valid(token): only if
 * that returns 1 is the copy (or a FMM_ENOTFOUND) a true result; if 0,
 * discard it and try again (or take the locked path).  Nothing read through
 * *out may be trusted before that check, and every length in it is
 * bounded by the page.
 *
 * @param[in] touch  FMM_GET_TOUCH: the read counts as a use, so a hit
 *                   whose LRU stamp is stale is FMM_EAGAIN (the locked
 *                   fmm_get stamps it); 0: a peek.
 * @return 0 (a hit), FMM_ENOTFOUND (absent or
 *         expired, to be confirmed by fmm_read_valid), or FMM_EAGAIN: use
 *         fmm_lock + fmm_get instead.  EAGAIN when a writer holds the page,
 *         (with FMM_GET_TOUCH) the hit's LRU stamp is stale, the entry
 *         has a modseq, statistics
 *         are on, the calling thread holds any page lock, the file is in
 *         Perl's format, or the probe met a damaged slot (which the locked
 *         path repairs).
 */
int fmm_get_optimistic(fmm_cache *c, uint32_t page, uint64_t hash,
                       const void *key, uint32_t klen, int touch, fmm_item *out, uint32_t *token);

/**
 * @brief Start loading, for writing, the cache lines a store to @p page
 * will need first (its header, and the entry the key's home slot points
 * at), before fmm_lock.  A hint: reads nothing it trusts, changes nothing
 * in the file.  No-op for Perl-format files.
 */
void fmm_prefetch(fmm_cache *c, uint32_t page, uint64_t hash);

/** @brief 1 if the page did not change since fmm_get_optimistic gave @p token. */
int fmm_read_valid(const fmm_cache *c, uint32_t page, uint32_t token);

/**
 * @brief Store a key in a locked page, compacting and evicting (least
 * recently used first) when space or slots run out.
 *
 * The old entry for the key, if any, is replaced only once the new one is
 * known to fit: on FMM_ETOOBIG nothing changes.
 *
 * @param[in] flags      entry flags (FMM_F_*), 8 bits; FMM_F_MODSEQ is ignored
 *                       (use fmm_set_ms), so no tombstone is stored.
 * @param[in] expire_on  absolute, in fmm_time_unit()s, 0 = never (Perl format:
 *                       clamped to u32 seconds).
 * @param[in] evict      called for dirty entries removed to make room (may be NULL).
 * @return 0 or FMM_ETOOBIG; FMM_EREFUSED if an unexpired tombstone holds
 *         the key (fmm_set is fmm_set_ms without FMM_F_MODSEQ);
 *         FMM_EBADARG if this thread does not hold @p page.
 */
int fmm_set(fmm_cache *c, uint32_t page, uint64_t hash,
            const void *key, uint32_t klen, const void *val, uint32_t vlen,
            uint32_t flags, uint64_t expire_on, fmm_evict_fn evict, void *ctx);

/**
 * @brief fmm_set with a modseq: as fmm_set, applying the modseq rules above.
 *
 * @param[in] flags   as fmm_set; FMM_F_MODSEQ stores @p modseq with the
 *                    entry; type FMM_T_TOMBSTONE (with FMM_F_MODSEQ, vlen 0)
 *                    stores a tombstone.  Without FMM_F_MODSEQ this is
 *                    fmm_set, except that an existing unexpired tombstone
 *                    refuses the store.
 * @return 0 (stored), FMM_ENOCHANGE (accepted, existing entry kept),
 *         FMM_EREFUSED (refused, nothing changed), FMM_ETOOBIG, or
 *         FMM_EBADARG (a tombstone with vlen > 0; Perl format: also type
 *         FMM_T_TOMBSTONE without FMM_F_MODSEQ; or the page is not held
 *         by this thread).
 */
int fmm_set_ms(fmm_cache *c, uint32_t page, uint64_t hash,
               const void *key, uint32_t klen, const void *val, uint32_t vlen,
               uint32_t flags, uint64_t expire_on, uint64_t modseq,
               fmm_evict_fn evict, void *ctx);

/** @brief One item of fmm_set_many. */
typedef struct fmm_batch_item {
    uint64_t hash;     /* fmm_hash of the key; the key must belong to the page */
    const void *key;
    const void *val;
    uint32_t klen, vlen;
    uint32_t flags;    /* as fmm_set (FMM_F_MODSEQ is ignored) */
    int rc;            /* out: 0 stored, FMM_EREFUSED (an unexpired tombstone
                          held the key when the batch began: not stored, as
                          fmm_set) */
} fmm_batch_item;

/**
 * @brief Store @p n items in a locked page, all or none.
 *
 * Every item must pass fmm_item_fits, and the items together (with their
 * entry headers and a slot each) must fit in an empty page; otherwise
 * FMM_ETOOBIG is returned before anything changes, with *bad set to the
 * index of the item that can never fit, or to @p n if only the batch as a
 * whole cannot.  Then room for the whole batch is made at once (expired
 * entries dropped, least recently used evicted, as fmm_set does for one
 * item), and the items are stored in order, a later duplicate key
 * replacing an earlier one.  The page's crash marker spans the stores of
 * all items (native format: the dirty word; Perl format, which has none:
 * the page magic, cleared for the span), so a writer killed between two
 * items leaves a page the next locker re-initialises: the page holds all
 * of the batch or none of it.
 *
 * @param[in] expire_on  absolute unix seconds for every item, 0 = never.
 * @param[out] bad       see above (may be NULL).
 * @return 0 (each item's rc says whether it was stored), FMM_ETOOBIG,
 *         ENOMEM (nothing changed) or FMM_ECORRUPT (the page was found
 *         corrupt mid-batch and re-initialised: none of the batch is in it).
 */
int fmm_set_many(fmm_cache *c, uint32_t page, fmm_batch_item *items, uint32_t n,
                 uint64_t expire_on, fmm_evict_fn evict, void *ctx, uint32_t *bad);

/**
 * @brief Delete a key from a locked page.
 * @param[out] old_flags  flags of the deleted entry (may be NULL).
 * @return 0, or FMM_ENOTFOUND if absent, expired or a tombstone (an
 *         expired entry or a tombstone is deleted all the same), or
 *         FMM_EBADARG if this thread does not hold @p page.
 */
int fmm_delete(fmm_cache *c, uint32_t page, uint64_t hash,
               const void *key, uint32_t klen, uint32_t *old_flags);

/** @brief Expunge modes. */
#define FMM_EXPUNGE_EXPIRED 0  /* purge(): expired entries only */
#define FMM_EXPUNGE_ALL     1  /* clear(): everything */

/**
 * @brief Remove expired (or all) entries of a locked page and compact it.
 * Dirty removed entries are passed to @p evict first.
 * @return 0, or FMM_EBADARG if this thread does not hold @p page.
 */
int fmm_expunge(fmm_cache *c, uint32_t page, int mode,
                fmm_evict_fn evict, void *ctx);

/**
 * @brief Visit each live, unexpired entry of a locked page (tombstones are
 * skipped; so are they in fmm_expunge's evict reports).
 * @return 0, or the first non-zero value returned by @p fn.
 */
int fmm_page_foreach(fmm_cache *c, uint32_t page, fmm_visit_fn fn, void *ctx);

/** @brief Fill @p info for a locked page. */
void fmm_page_info_get(fmm_cache *c, uint32_t page, fmm_page_info *info);

/** @brief Zero a locked page's read counters. */
void fmm_page_clear_stats(fmm_cache *c, uint32_t page);

/**
 * @brief Check every structural invariant of a locked page.
 * @param[out] msg  description of the first problem found.
 * @return 0 if valid, FMM_ECORRUPT otherwise.
 */
int fmm_check_page(fmm_cache *c, uint32_t page, char *msg, size_t msglen);

/** @brief Re-initialise a locked page (all its entries are dropped). */
void fmm_init_page(fmm_cache *c, uint32_t page);

/**
 * @brief Report whether the path still names the file this handle mapped,
 * at its mapped size (a cheap check that touches no mapped byte).
 * @return 0, FMM_EREPLACED, or an errno value from stat.
 */
int fmm_check_file(const fmm_cache *c);

/* ---------- Truncation guard (fmm_guard.c) ----------
 * A cache file that shrinks while it is mapped (truncated by hand, by a
 * cleanup script, ...) makes every access to the lost part of a MAP_SHARED
 * mapping raise SIGBUS, which kills the process.  fmm_open registers each
 * file mapping with the guard, which installs a SIGBUS handler once per
 * process (SA_SIGINFO|SA_ONSTACK; re-installed at the next fmm_open if
 * something else, e.g. Python's faulthandler, took SIGBUS since).  On a
 * SIGBUS inside a registered mapping the handler replaces the whole mapping
 * in place with private zero memory and marks the handle lost; the faulting
 * access then reads zeros and the operation completes on them, harmlessly.
 * From then on every call on that handle that takes a lock returns
 * FMM_EREPLACED, fmm_unlock releases nothing, and callers must check
 * fmm_lost() after they have read an item's bytes, because the bytes may
 * have turned to zeros under them.  Other handles, and other processes that
 * did not touch the lost range, are unaffected.  Any other SIGBUS is passed
 * on to the handler that was installed before (or the default action).
 *
 * Limits: none on the number of mappings guarded (the guard's table grows
 * in chunks that are never freed; only an allocation failure leaves a
 * mapping unguarded); a lost handle's zero memory is not unmapped by fmm_close
 * (the page mutexes in it may still be on a thread's robust-futex list, which
 * glibc writes to), so each lost handle leaks its address range; a thread
 * that is inside glibc's robust-mutex unlock at the very instant another
 * thread of the same process faults can still crash (a window of a few
 * instructions).  The guard also costs nothing until a fault: one load of
 * the flag per lock and unlock. */
/** @brief Guard [start, start+len): on SIGBUS there, set *flag to 1.
 *  @return the slot (for fmm_guard_unregister), or -1 (out of memory, or
 *  the handler could not be installed: the mapping works unguarded). */
int fmm_guard_register(void *start, size_t len, int *flag);
/** @brief Stop guarding a slot returned by fmm_guard_register (-1: no-op). */
void fmm_guard_unregister(int slot);
/** @brief 1 if the guard's handler is the current SIGBUS action. */
int fmm_guard_active(void);
/** @brief Entries the guard's table holds now (exposed for tests). */
int fmm_guard_capacity(void);
/** @brief 1 if the handle's file shrank under its mapping (see above). */
int fmm_lost(const fmm_cache *c);
/** @brief Address of the flag fmm_lost reads (non-zero: lost), valid until
 * fmm_close, for callers that check it inline on a hot path. */
const int *fmm_lost_flag(const fmm_cache *c);
/** @brief The mapping's last byte, valid until fmm_close.  A file cut to a
 * size inside an OS page reads as zeros past its new end without any
 * SIGBUS; reading this byte after an operation faults if the file now ends
 * before its last OS page, so the guard sets the lost flag and the zeros
 * the operation may have read are never returned.  (A cut inside the last
 * OS page itself is not seen this way.) */
const volatile unsigned char *fmm_probe_addr(const fmm_cache *c);

/* ---------- Test hooks ---------- */

/** @brief Raw pointer to the start of a page (tests and fuzzers only). */
unsigned char *fmm_page_ptr(fmm_cache *c, uint32_t page);

/** @brief Set a locked page's LRU clock (to test renumbering). */
void fmm_set_page_clock(fmm_cache *c, uint32_t page, uint32_t clock);

/**
 * @brief Fault injection for crash tests of fmm_set_many: with @p k > 0,
 * every later fmm_set_many on this handle with at least k - 1 items
 * raises SIGKILL once k - 1 of its items are stored (k = 1: after room
 * was made, before the first item; k = n + 1: after the last item, before
 * the batch is committed).  0 turns it off.
 */
void fmm_set_batch_fault(fmm_cache *c, uint32_t k);

#ifdef __cplusplus
}
#endif
#endif /* FMM_H */
