/*
 * _fastmmapmodule.c -- the CPython binding of the fastmmap engine: the
 * CacheBase type that fastmmap.Cache subclasses.  This is the only file that
 * includes Python.h.
 *
 * Hot path: get/set/[]/in go from the Python call straight to the engine:
 * key to bytes (UTF-8 of a str is cached by CPython), hash, try-lock with
 * the GIL held, probe, copy the value out, unlock.  bytes and str values
 * never touch a serializer.
 *
 * Lock-order rule (see also fmm.h): a thread never blocks on a page lock
 * while holding the GIL.  It first tries the lock with the GIL held (the
 * common, uncontended case); on contention it releases the GIL and waits in
 * slices (LOCK_SLICE_NS) so that signals (Ctrl-C) and lock_timeout are
 * honoured promptly.  Python code (serializers, the get_and_set function)
 * runs under a page lock only where the API says so; that is safe because
 * any other thread wanting that page waits with the GIL released.
 *
 * Lifetime: each method that uses the engine handle brackets its work with
 * ENTER/LEAVE.  close() while another call is in flight (a thread waiting
 * for a lock, or a callback closing its own cache) only marks the object
 * closed; the last LEAVE frees the handle.  A held PageLock (a lock block,
 * a Share) counts as a call in flight; close() first releases the ones the
 * calling thread holds.
 *
 * Free-threaded CPython (Py_GIL_DISABLED): the module declares that it does
 * not need the GIL.  Threads then run these methods in parallel on one
 * object, so the in-flight count and the closed flag are atomics, ordered
 * so that a close() between another thread's check and its count cannot
 * free the handle under it; option and callback swaps keep the objects they replace
 * alive until the object dies (other threads may be calling them, borrowed),
 * the lazily imported functions are published with a compare-and-swap, and
 * the engine keeps its error text per thread.  Page locks were already per
 * thread.  Under the GIL the same helpers compile to the plain counters.
 *
 * Naming: CacheObject, cache_<method>, get_state(), set_error().
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <math.h>
#include <time.h>
#include <unistd.h>

#include "fmm.h"

#define LOCK_SLICE_NS 50000000LL /* 50 ms */
#define SER_RAW 0xFFu            /* serializer "raw": no serializer at all */
#define EXPIRE_NOW (-1LL)
#define MAX_EXPIRE_TIME (50LL * 365 * 86400) /* fastmmap._options.MAX_EXPIRE_TIME */

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* Python < 3.12 compatibility, in one place. */
#if PY_VERSION_HEX < 0x030C0000
static PyObject *PyErr_GetRaisedException(void)
{
    PyObject *t, *v, *tb;
    PyErr_Fetch(&t, &v, &tb);
    PyErr_NormalizeException(&t, &v, &tb);
    if (v && tb)
        PyException_SetTraceback(v, tb);
    Py_XDECREF(t);
    Py_XDECREF(tb);
    return v;
}
static void PyErr_SetRaisedException(PyObject *e)
{
    if (e)
        PyErr_Restore(Py_NewRef((PyObject *)Py_TYPE(e)), e, PyException_GetTraceback(e));
}
#endif

/* Per-object critical sections are 3.13's; before, the GIL is the lock. */
#if PY_VERSION_HEX < 0x030D0000
#define Py_BEGIN_CRITICAL_SECTION(op) {
#define Py_END_CRITICAL_SECTION() }
#endif

/* ---------- Module state ---------- */

typedef struct {
    PyTypeObject *CacheBase_Type;
    PyTypeObject *PageLock_Type;
    PyObject *Error;
    PyObject *LockTimeout;
    PyObject *GeometryError;
    PyObject *BadFileError;
    PyObject *RecursiveLockError;
    PyObject *FileReplacedError;
    PyObject *ItemTooLargeError;
    PyObject *UntrustedFileError;
    PyObject *WriteBackLostError;
    /* imported on first use (lazy_attr), so that `import fastmmap` does
     * not load pickle and a cache that never pickles never pays for it */
    PyObject *pickle_dumps;
    PyObject *pickle_loads;
    PyObject *pickle_protocol;
    PyObject *json_loads;
    PyObject *zlib_decompress;
    PyObject *lz4_decompress;
    /* fastmmap.NO_CHANGE, fastmmap.Update and fastmmap.Entry, registered by
     * the Python package at import (_set_result_types): NULL until then */
    PyObject *no_change;
    PyObject *update_type;
    PyObject *entry_type;
} fastmmap_state;

static struct PyModuleDef fastmmap_module;

typedef struct {
    PyObject_HEAD
    fmm_cache *c;
    fastmmap_state *state;
    int closed;
    int inflight;
    int64_t lock_timeout_ns;  /* <0: wait forever */
    long long default_expire; /* milliseconds; 0 never; EXPIRE_NOW */
    long long tombstone_expire; /* the same, for tombstones left by remove(key, modseq=N) */
    uint32_t ser_type;        /* FMM_T_PICKLE, FMM_T_JSON, FMM_T_CUSTOM or SER_RAW */
    uint32_t comp_type;       /* FMM_C_* */
    Py_ssize_t compress_threshold;
    PyObject *dumps;          /* serializer for non-bytes/str values */
    PyObject *loads;          /* its inverse, for FMM_T_CUSTOM entries */
    PyObject *compress;
    PyObject *decompress;     /* for FMM_C_CUSTOM entries */
    PyObject *parse_expire;   /* fastmmap._options.parse_expire_time */
    PyObject *context;        /* first argument of every callback */
    PyObject *read_cb;        /* read_cb(context, key) on a miss */
    PyObject *write_cb;       /* write_cb(context, key, value, expire_on) */
    PyObject *delete_cb;      /* delete_cb(context, key) */
    PyObject *retired;        /* list: options and callbacks replaced while in use (see retire) */
    int write_back;           /* entries marked dirty, written when they leave */
    int cache_not_found;      /* store None results of read_cb */
    int allow_recursive;      /* unlock the page around read_cb */
    int perl;                 /* a Cache::FastMmap-format file (format="perl") */
    const int *lost;          /* fmm_lost_flag(c): the file was truncated under us */
    const volatile unsigned char *probe; /* fmm_probe_addr(c), read before `lost` */
    PyObject *weakreflist;
    struct PageLockObject *holders; /* PageLocks holding a page of this cache */
    struct orphan_lock *orphans;    /* pages whose PageLock died in another thread */
#ifdef Py_GIL_DISABLED
    PyMutex lists_mutex; /* holders and orphans: any thread may link or unlink */
    /* The in-flight count, split by thread (see op_enter): one cache line
     * each, after a line of padding, so that threads entering in parallel
     * write no line in common. */
    char shard_pad[64];
    struct {
        int n;
        char pad[60];
    } shards[8];
#endif
} CacheObject;

/* A page lock held across calls: the C core of LockedEntry, LockedPage and
 * Share (see "Page locks held across calls" below).  While depth > 0 it
 * holds `page` for thread `thread` of process `pid`, is linked into its
 * cache's `holders` list and counts as one call in flight (the handle
 * outlives it). */
typedef struct PageLockObject {
    PyObject_HEAD
    PyObject *cache;  /* the CacheObject */
    PyObject *key;    /* the key whose page is locked */
    int reentrant;    /* Share: lock() again in the holding thread nests */
    int depth;        /* > 0 while held */
    int closed_out;   /* close() released it: the next release is a no-op */
    uint32_t page;
    unsigned long thread;
    pid_t pid;
    struct PageLockObject *next, *prev; /* in the cache's holders list */
} PageLockObject;

/* A page whose PageLock was finalized in a thread other than its holder (a
 * garbage-collected cycle): only the holding thread can unlock a robust
 * mutex, so the page waits here for that thread's next lock of this cache
 * (lock_slow) or its close(). */
typedef struct orphan_lock {
    struct orphan_lock *next;
    unsigned long thread;
    pid_t pid;
    uint32_t page;
} orphan_lock;

#define CacheObject_CAST(op) ((CacheObject *)(op))

/* ---------- Errors ---------- */

static const struct {
    int code;
    const char *name;
    size_t offset;
} error_table[] = {
    {FMM_EGEOMETRY, "GeometryError", offsetof(fastmmap_state, GeometryError)},
    {FMM_EBADFILE, "BadFileError", offsetof(fastmmap_state, BadFileError)},
    {FMM_ELOCKED, "RecursiveLockError", offsetof(fastmmap_state, RecursiveLockError)},
    {FMM_EREPLACED, "FileReplacedError", offsetof(fastmmap_state, FileReplacedError)},
    {FMM_ETIMEDOUT, "LockTimeout", offsetof(fastmmap_state, LockTimeout)},
    {FMM_EUNTRUSTED, "UntrustedFileError", offsetof(fastmmap_state, UntrustedFileError)},
};

/* Raise the exception for engine or errno code rc.  `what` names the
 * operation; `detail` (may be NULL or "") adds specifics. */
static Py_NO_INLINE PyObject *set_error(fastmmap_state *st, const char *what, int rc, const char *detail,
                                        PyObject *filename)
{
    if (rc > 0) {
        if (filename) {
            PyObject *msg = detail && *detail ? PyUnicode_FromFormat("%s: %s", what, detail)
                                              : PyUnicode_FromString(strerror(rc));
            if (msg) {
                PyObject *args = Py_BuildValue("(iOO)", rc, msg, filename);
                if (args) {
                    PyErr_SetObject(PyExc_OSError, args);
                    Py_DECREF(args);
                }
                Py_DECREF(msg);
            }
            return NULL;
        }
        errno = rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    if (rc == FMM_ETOOBIG)
        return PyErr_Format(st->ItemTooLargeError, "%s: %s", what, detail && *detail ? detail : fmm_strerror(rc));
    PyObject *exc = st->Error;
    for (size_t i = 0; i < sizeof error_table / sizeof error_table[0]; i++)
        if (error_table[i].code == rc)
            exc = *(PyObject **)((char *)st + error_table[i].offset);
    if (detail && *detail)
        PyErr_Format(exc, "%s: %s", what, detail);
    else
        PyErr_Format(exc, "%s: %s", what, fmm_strerror(rc));
    return NULL;
}

static PyObject *closed_error(void)
{
    PyErr_SetString(PyExc_ValueError, "I/O operation on closed cache");
    return NULL;
}

/* The cache file shrank under the mapping (see fmm.h, "Truncation guard"):
 * whatever the operation read may be zeros; replace its result or error. */
static Py_NO_INLINE PyObject *replaced_error(CacheObject *self)
{
    PyErr_Clear();
    PyErr_SetString(self->state->FileReplacedError,
                    "the cache file was truncated or replaced while this process had it open; "
                    "reopen the cache");
    return NULL;
}
/* the handle's file was truncated under its mapping (fmm_lost, inline) */
#define IS_LOST(self) ((void)*(self)->probe, __atomic_load_n((self)->lost, __ATOMIC_ACQUIRE) != 0)
#define LOST_R(self, r)                               \
    do {                                              \
        if (UNLIKELY(IS_LOST(self))) {          \
            Py_XDECREF(r);                            \
            r = replaced_error(self);                 \
        }                                             \
    } while (0)
#define LOST_I(self, r)                               \
    do {                                              \
        if (UNLIKELY(IS_LOST(self))) {          \
            replaced_error(self);                     \
            r = -1;                                   \
        }                                             \
    } while (0)

/* ---------- Lifetime guards ---------- */

static const int never_lost = 0;
static const unsigned char no_probe = 0;

#ifdef Py_GIL_DISABLED
/* Each thread counts its operations in its own shard of self->shards, so
 * that two threads' gets do not pass one cache line back and forth.  The
 * order makes close() safe: an operation counts itself, then reads
 * `closed`; close() sets `closed`, then sums the shards; all sequentially
 * consistent, so either the operation sees the flag (and backs out) or
 * close() sees it counted.  Whoever then brings the sum to zero with the
 * flag set closes the handle; the exchange in really_close makes that
 * once even when two threads see the zero. */
#define N_SHARDS 8
/* initial-exec: a direct %fs access, not a __tls_get_addr call per operation */
static __attribute__((tls_model("initial-exec"))) _Thread_local int tl_shard = -1;
static int next_shard;

static inline int *my_shard(CacheObject *self)
{
    if (UNLIKELY(tl_shard < 0))
        tl_shard = __atomic_fetch_add(&next_shard, 1, __ATOMIC_RELAXED) % N_SHARDS;
    return &self->shards[tl_shard].n;
}

static void really_close(CacheObject *self)
{
    fmm_cache *c = __atomic_exchange_n(&self->c, NULL, __ATOMIC_SEQ_CST);
    if (c) {
        self->lost = &never_lost;
        self->probe = &no_probe;
        fmm_close(c);
    }
}

static Py_NO_INLINE void close_if_idle(CacheObject *self)
{
    long sum = 0;
    for (int i = 0; i < N_SHARDS; i++)
        sum += __atomic_load_n(&self->shards[i].n, __ATOMIC_SEQ_CST);
    if (sum == 0)
        really_close(self);
}

static inline void op_leave(CacheObject *self)
{
    __atomic_sub_fetch(my_shard(self), 1, __ATOMIC_SEQ_CST);
    if (UNLIKELY(__atomic_load_n(&self->closed, __ATOMIC_SEQ_CST)))
        close_if_idle(self);
}

/* Count one operation in; -1 with ValueError set if closed (or never opened). */
static inline int op_enter(CacheObject *self)
{
    __atomic_add_fetch(my_shard(self), 1, __ATOMIC_SEQ_CST);
    if (UNLIKELY(__atomic_load_n(&self->closed, __ATOMIC_SEQ_CST)) ||
        UNLIKELY(!__atomic_load_n(&self->c, __ATOMIC_ACQUIRE))) {
        op_leave(self);
        closed_error();
        return -1;
    }
    return 0;
}

/* One more count for an entered operation (a page held across calls: it is
 * released by this thread, so the count returns to the same shard). */
static inline void op_hold(CacheObject *self) { __atomic_add_fetch(my_shard(self), 1, __ATOMIC_SEQ_CST); }

/* Undo an op_hold without closing: the caller still has its own count. */
static inline void op_unhold(CacheObject *self) { __atomic_sub_fetch(my_shard(self), 1, __ATOMIC_SEQ_CST); }

#define LISTS_LOCK(self) PyMutex_Lock(&(self)->lists_mutex)
#define LISTS_UNLOCK(self) PyMutex_Unlock(&(self)->lists_mutex)

static void op_close(CacheObject *self)
{
    __atomic_store_n(&self->closed, 1, __ATOMIC_SEQ_CST);
    close_if_idle(self);
}

#define CLOSED_FLAG(self) __atomic_load_n(&(self)->closed, __ATOMIC_SEQ_CST)
#define IS_CLOSED(self) (CLOSED_FLAG(self) || !__atomic_load_n(&(self)->c, __ATOMIC_ACQUIRE))
#else
/* The GIL serializes these (each runs with it held). */
static void really_close(CacheObject *self)
{
    if (self->c) {
        fmm_cache *c = self->c;
        self->c = NULL;
        self->lost = &never_lost;
        self->probe = &no_probe;
        fmm_close(c);
    }
}

static inline int op_enter(CacheObject *self)
{
    if (UNLIKELY(self->closed || !self->c)) {
        closed_error();
        return -1;
    }
    self->inflight++;
    return 0;
}

static inline void op_leave(CacheObject *self)
{
    if (--self->inflight == 0 && UNLIKELY(self->closed))
        really_close(self);
}

static inline void op_hold(CacheObject *self) { self->inflight++; }

static inline void op_unhold(CacheObject *self) { self->inflight--; }

/* the GIL guards the holders and orphans lists */
#define LISTS_LOCK(self) ((void)0)
#define LISTS_UNLOCK(self) ((void)0)

static void op_close(CacheObject *self)
{
    self->closed = 1;
    if (self->inflight == 0)
        really_close(self);
}

#define CLOSED_FLAG(self) ((self)->closed)
#define IS_CLOSED(self) ((self)->closed || !(self)->c)
#endif

#define ENTER(self)                           \
    do {                                      \
        if (UNLIKELY(op_enter(self) < 0))     \
            return NULL;                      \
    } while (0)
#define LEAVE(self) op_leave(self)

/* ---------- Keys ---------- */

typedef struct {
    const char *buf;
    Py_ssize_t len;
    int isstr;
} keybuf;

static inline int get_key(PyObject *key, keybuf *k)
{
    if (LIKELY(PyUnicode_Check(key))) {
        k->buf = PyUnicode_AsUTF8AndSize(key, &k->len);
        if (UNLIKELY(!k->buf))
            return -1;
        k->isstr = 1;
    } else if (PyBytes_Check(key)) {
        k->buf = PyBytes_AS_STRING(key);
        k->len = PyBytes_GET_SIZE(key);
        k->isstr = 0;
    } else {
        PyErr_Format(PyExc_TypeError, "cache keys must be str or bytes, not %.100s", Py_TYPE(key)->tp_name);
        return -1;
    }
    if (UNLIKELY(k->len > (Py_ssize_t)FMM_MAX_KEY_LEN)) {
        PyErr_Format(PyExc_ValueError, "key of %zd bytes is longer than the limit of %u bytes", k->len,
                     FMM_MAX_KEY_LEN);
        return -1;
    }
    return 0;
}

static PyObject *key_object(const fmm_item *it)
{
    if (it->flags & FMM_F_KEYSTR)
        return PyUnicode_DecodeUTF8(it->key, it->klen, "surrogateescape");
    return PyBytes_FromStringAndSize(it->key, it->klen);
}

/* ---------- Locking with the GIL released on contention ---------- */

/* Release the page this thread orphaned (see orphan_lock), and forget
 * orphans inherited from a parent process (their locks are the parent's).
 * 1 if this thread's page was released. */
static Py_NO_INLINE int release_orphans(CacheObject *self)
{
    unsigned long me = PyThread_get_thread_ident();
    pid_t pid = getpid();
    int released = 0;
    LISTS_LOCK(self);
    orphan_lock **pp = &self->orphans;
    while (*pp) {
        orphan_lock *o = *pp;
        if (o->pid == pid && o->thread != me) {
            pp = &o->next;
            continue;
        }
        *pp = o->next;
        if (o->pid == pid) {
            fmm_unlock(self->c, o->page);
            released = 1;
        }
        PyMem_Free(o);
        op_unhold(self); /* the orphan's share; the caller's own keeps it above zero */
    }
    LISTS_UNLOCK(self);
    return released;
}

static Py_NO_INLINE int lock_slow(CacheObject *self, uint32_t page, int rc)
{
    fastmmap_state *st = self->state;
    if (rc == FMM_ELOCKED && self->orphans && release_orphans(self)) {
        rc = fmm_lock(self->c, page, 0);
        if (rc == 0)
            return 0;
    }
    if (rc == FMM_EREPLACED) {
        replaced_error(self);
        return -1;
    }
    if (rc != FMM_EBUSY) {
        if (rc == EINVAL || rc == ENOTRECOVERABLE)
            PyErr_Format(st->Error, "the lock of page %u is damaged (%s); reopen the cache with init_file=True",
                         page, strerror(rc));
        else
            set_error(st, "lock", rc, fmm_errdetail(self->c), NULL);
        return -1;
    }
    struct timespec t0;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    int64_t waited = 0;
    for (;;) {
        int64_t slice = LOCK_SLICE_NS;
        if (self->lock_timeout_ns >= 0 && self->lock_timeout_ns - waited < slice)
            slice = self->lock_timeout_ns - waited;
        if (slice <= 0)
            slice = 1;
        /* GIL released; no page lock of this cache is held by this thread. */
        Py_BEGIN_ALLOW_THREADS
        rc = fmm_lock(self->c, page, slice);
        Py_END_ALLOW_THREADS
        if (rc == 0)
            return 0;
        if (rc != FMM_ETIMEDOUT) {
            if (rc == FMM_EREPLACED)
                replaced_error(self);
            else if (rc == EINVAL || rc == ENOTRECOVERABLE)
                PyErr_Format(st->Error, "the lock of page %u is damaged (%s); reopen the cache with init_file=True",
                             page, strerror(rc));
            else
                set_error(st, "lock", rc, fmm_errdetail(self->c), NULL);
            return -1;
        }
        if (PyErr_CheckSignals())
            return -1;
        struct timespec t1;
        clock_gettime(CLOCK_MONOTONIC, &t1);
        waited = (int64_t)(t1.tv_sec - t0.tv_sec) * 1000000000LL + (t1.tv_nsec - t0.tv_nsec);
        /* After two seconds, check at each slice that the holder still
         * exists (a damaged lock word can name a thread that never unlocks).
         * This judges by TID: processes sharing a cache must share a PID
         * namespace (documented). */
        if (waited >= 2000000000LL)
            fmm_lock_stale(self->c, page);
        if (self->lock_timeout_ns >= 0 && waited >= self->lock_timeout_ns) {
            /* before giving up, make sure the holder is not a lost owner */
            if (waited < 2000000000LL && fmm_lock_stale(self->c, page)) {
                Py_BEGIN_ALLOW_THREADS
                rc = fmm_lock(self->c, page, LOCK_SLICE_NS);
                Py_END_ALLOW_THREADS
                if (rc == 0)
                    return 0;
            }
            char msg[128];
            snprintf(msg, sizeof msg, "timed out after %.3f s waiting for the lock of page %u", (double)waited / 1e9,
                     page);
            PyErr_SetString(st->LockTimeout, msg);
            return -1;
        }
    }
}

static inline int lock_page(CacheObject *self, uint32_t page)
{
    int rc = fmm_lock(self->c, page, 0);
    if (LIKELY(rc == 0))
        return 0;
    return lock_slow(self, page, rc);
}

#define UNLOCK(self, page) fmm_unlock((self)->c, (page))

/* Unlock after Python code ran under the lock (get_and_set's function,
 * read_cb).  That code may have forked: in the child the page is its
 * parent's (the engine forgot the inherited lock), every store was
 * refused, and fmm_unlock releases nothing and says so.  The call must
 * fail then rather than report a store that did not happen.  Returns -1
 * with an error set (the first one, if one is already set); a truncated
 * file (FMM_EREPLACED) is left to the caller's LOST_R. */
static int unlock_after_python(CacheObject *self, uint32_t page)
{
    int rc = UNLOCK(self, page);
    if (LIKELY(rc == 0 || rc == FMM_EREPLACED))
        return 0;
    if (!PyErr_Occurred())
        set_error(self->state, "unlock", rc, fmm_errdetail(self->c), NULL);
    return -1;
}

/* ---------- Values ---------- */

typedef struct {
    const char *buf;
    Py_ssize_t len;
    uint32_t flags;
    PyObject *owner; /* new reference keeping buf alive, or NULL */
} encoded;

/* Serialize and compress a value (no page lock held, except inside
 * get_and_set and lock blocks, by design). */
/* A serializer's result (a new reference, or NULL with an error set) as
 * bytes: str is taken as UTF-8, anything else is a TypeError.  Steals it. */
static PyObject *serialized_bytes(PyObject *out)
{
    if (!out)
        return NULL;
    if (PyUnicode_Check(out)) {
        PyObject *b = PyUnicode_AsUTF8String(out);
        Py_DECREF(out);
        return b;
    }
    if (!PyBytes_Check(out)) {
        PyErr_Format(PyExc_TypeError, "the serializer returned %.100s, expected bytes", Py_TYPE(out)->tp_name);
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

/* self->compress applied to the encoded bytes: a new bytes reference, or
 * NULL with an error set (a non-bytes result is a TypeError). */
static PyObject *compressed(CacheObject *self, const encoded *e)
{
    PyObject *src = e->owner ? Py_NewRef(e->owner) : PyBytes_FromStringAndSize(e->buf, e->len);
    if (!src)
        return NULL;
    PyObject *z = PyObject_CallOneArg(self->compress, src);
    Py_DECREF(src);
    if (z && !PyBytes_Check(z)) {
        PyErr_Format(PyExc_TypeError, "the compressor returned %.100s, expected bytes", Py_TYPE(z)->tp_name);
        Py_CLEAR(z);
    }
    return z;
}

static int encode_perl(CacheObject *self, PyObject *v, encoded *e);
static PyObject *lazy_attr(PyObject **slot, const char *mod, const char *attr);

/* pickle.dumps, imported on first use after HIGHEST_PROTOCOL (the order
 * encode_value relies on); out of line so that its fast path stays small. */
static __attribute__((noinline, cold)) PyObject *load_pickle_dumps(fastmmap_state *st)
{
    if (!lazy_attr(&st->pickle_protocol, "pickle", "HIGHEST_PROTOCOL"))
        return NULL;
    return lazy_attr(&st->pickle_dumps, "pickle", "dumps");
}

static int encode_value(CacheObject *self, PyObject *v, encoded *e)
{
    e->owner = NULL;
    if (UNLIKELY(self->perl))
        return encode_perl(self, v, e);
    if (PyBytes_CheckExact(v) || (self->ser_type == SER_RAW && PyBytes_Check(v))) {
        e->buf = PyBytes_AS_STRING(v);
        e->len = PyBytes_GET_SIZE(v);
        e->flags = FMM_T_BYTES;
    } else if (PyUnicode_CheckExact(v) || (self->ser_type == SER_RAW && PyUnicode_Check(v))) {
        e->buf = PyUnicode_AsUTF8AndSize(v, &e->len);
        if (!e->buf)
            return -1;
        e->flags = FMM_T_STR;
    } else if (v == Py_None) {
        e->buf = "";
        e->len = 0;
        e->flags = FMM_T_NONE;
        return 0;
    } else if (self->ser_type == SER_RAW) {
        PyErr_Format(PyExc_TypeError, "serializer='raw' stores only bytes, str and None values, not %.100s",
                     Py_TYPE(v)->tp_name);
        return -1;
    } else {
        PyObject *out;
        if (self->ser_type == FMM_T_PICKLE) {
            /* The protocol is published before dumps, so once dumps is
             * seen (acquire) the protocol is too: one atomic load and a
             * branch per pickled set. */
            fastmmap_state *st = self->state;
            PyObject *dumps = __atomic_load_n(&st->pickle_dumps, __ATOMIC_ACQUIRE);
            if (UNLIKELY(dumps == NULL) && !(dumps = load_pickle_dumps(st)))
                return -1;
            PyObject *args[2] = {v, __atomic_load_n(&st->pickle_protocol, __ATOMIC_RELAXED)};
            out = PyObject_Vectorcall(dumps, args, 2, NULL);
        } else {
            out = PyObject_CallOneArg(self->dumps, v);
        }
        if (!(out = serialized_bytes(out)))
            return -1;
        e->owner = out;
        e->buf = PyBytes_AS_STRING(out);
        e->len = PyBytes_GET_SIZE(out);
        e->flags = self->ser_type;
    }
    if (self->comp_type != FMM_C_NONE && e->len >= self->compress_threshold) {
        PyObject *z = compressed(self, e);
        if (!z) {
            Py_CLEAR(e->owner);
            return -1;
        }
        if (PyBytes_GET_SIZE(z) < e->len) {
            Py_XSETREF(e->owner, z);
            e->buf = PyBytes_AS_STRING(z);
            e->len = PyBytes_GET_SIZE(z);
            e->flags |= self->comp_type;
        } else {
            Py_DECREF(z);
        }
    }
    return 0;
}

/* Perl format: values as Cache::FastMmap stores them.  Perl passes every
 * value through its serializer and compressor (no threshold), so a
 * serialized cache serializes str too, and a compressed one compresses
 * everything; undef (None) is an empty value with the UNDEF flag. */
static int encode_perl(CacheObject *self, PyObject *v, encoded *e)
{
    if (v == Py_None) {
        e->buf = "";
        e->len = 0;
        e->flags = FMM_T_NONE;
        return 0;
    }
    if (self->ser_type == SER_RAW) {
        if (PyBytes_Check(v)) {
            e->buf = PyBytes_AS_STRING(v);
            e->len = PyBytes_GET_SIZE(v);
            e->flags = FMM_T_BYTES;
        } else if (PyUnicode_Check(v)) {
            e->buf = PyUnicode_AsUTF8AndSize(v, &e->len);
            if (!e->buf)
                return -1;
            e->flags = FMM_T_STR;
        } else {
            PyErr_Format(PyExc_TypeError,
                         "a format='perl' cache with serializer='raw' stores only bytes, str and None values, "
                         "not %.100s",
                         Py_TYPE(v)->tp_name);
            return -1;
        }
    } else {
        PyObject *out = serialized_bytes(PyObject_CallOneArg(self->dumps, v));
        if (!out)
            return -1;
        e->owner = out;
        e->buf = PyBytes_AS_STRING(out);
        e->len = PyBytes_GET_SIZE(out);
        e->flags = self->ser_type;
    }
    if (self->comp_type != FMM_C_NONE) {
        PyObject *z = compressed(self, e);
        if (!z) {
            Py_CLEAR(e->owner);
            return -1;
        }
        Py_XSETREF(e->owner, z);
        e->buf = PyBytes_AS_STRING(z);
        e->len = PyBytes_GET_SIZE(z);
        /* compressed bytes carry no UTF-8 flag, as in Perl */
        e->flags = (e->flags == FMM_T_STR ? FMM_T_BYTES : e->flags) | self->comp_type;
    }
    return 0;
}

/* Which Perl serializer wrote these bytes, if one fastmmap cannot read:
 * Storable (freeze: major 2 native order, byte-order string "1234..." ;
 * nfreeze: network order) or Sereal (magic "=srl" or "=\xF3rl"). */
static const char *perl_serializer_of(const char *buf, Py_ssize_t len)
{
    const unsigned char *b = (const unsigned char *)buf;
    if (len >= 5 && b[0] == '=' && (b[1] == 's' || b[1] == 0xF3) && b[2] == 'r' && b[3] == 'l' &&
        (b[4] & 0x0F) >= 1 && (b[4] & 0x0F) <= 5)
        return "Sereal";
    if (len >= 3 && b[0] == 0x04 && b[1] <= 0x0F && (b[2] == 4 || b[2] == 8) && len >= 3 + b[2]) {
        for (int i = 0; i < b[2]; i++)
            if (b[3 + i] < '1' || b[3 + i] > '8')
                return NULL;
        return "Storable";
    }
    if (len >= 3 && b[0] == 0x05 && b[1] <= 0x0F && b[2] < 0x40)
        return "Storable";
    return NULL;
}

static PyObject *import_attr(const char *mod, const char *attr)
{
    PyObject *m = PyImport_ImportModule(mod);
    if (!m)
        return NULL;
    PyObject *a = PyObject_GetAttrString(m, attr);
    Py_DECREF(m);
    return a;
}

/* *slot, importing mod.attr into it on first use (borrowed: the module
 * state keeps it).  Threads can race here without the GIL: the first to
 * publish wins and the others drop their copy, so a pointer once read is
 * never freed under its reader. */
static PyObject *lazy_attr(PyObject **slot, const char *mod, const char *attr)
{
    PyObject *fn = __atomic_load_n(slot, __ATOMIC_ACQUIRE);
    if (LIKELY(fn != NULL))
        return fn;
    if (!(fn = import_attr(mod, attr)))
        return NULL;
    PyObject *expected = NULL;
    if (!__atomic_compare_exchange_n(slot, &expected, fn, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        Py_DECREF(fn);
        fn = expected;
    }
    return fn;
}

/* Decode the raw bytes of an entry (no page lock needed: `raw` is a copy,
 * or NULL with buf/len pointing into the page for the natively stored
 * types, which call no Python code). */
static PyObject *decode_value(CacheObject *self, uint32_t flags, const char *buf, Py_ssize_t len, PyObject *raw)
{
    fastmmap_state *st = self->state;
    uint32_t type = flags & FMM_F_TYPE_MASK;
    uint32_t comp = flags & FMM_F_COMP_MASK;
    PyObject *plain = NULL, *result = NULL;
    if (raw) {
        buf = PyBytes_AS_STRING(raw);
        len = PyBytes_GET_SIZE(raw);
    }
    if (comp != FMM_C_NONE) {
        PyObject *fn = NULL;
        if (comp == FMM_C_ZLIB) {
            if (!(fn = lazy_attr(&st->zlib_decompress, "zlib", "decompress")))
                return NULL;
        } else if (comp == FMM_C_LZ4) {
            if (!(fn = lazy_attr(&st->lz4_decompress, "lz4.frame", "decompress"))) {
                if (PyErr_ExceptionMatches(PyExc_ImportError)) {
                    PyErr_Clear();
                    PyErr_SetString(PyExc_ImportError,
                                    "this value was compressed with lz4, which is not installed: "
                                    "pip install fastmmap[lz4]");
                }
                return NULL;
            }
        } else {
            fn = self->decompress;
            if (!fn)
                return PyErr_Format(st->Error, "this value was compressed with a custom compressor; "
                                               "open the cache with the same compressor= to read it");
        }
        PyObject *src = raw ? Py_NewRef(raw) : PyBytes_FromStringAndSize(buf, len);
        if (!src)
            return NULL;
        plain = PyObject_CallOneArg(fn, src);
        Py_DECREF(src);
        if (!plain)
            return NULL;
        if (!PyBytes_Check(plain)) {
            Py_DECREF(plain);
            return PyErr_Format(PyExc_TypeError, "the decompressor did not return bytes");
        }
        raw = plain;
        buf = PyBytes_AS_STRING(plain);
        len = PyBytes_GET_SIZE(plain);
    }
    /* A Perl-format JSON reader names Perl's Storable or Sereal serializer
     * when it meets their headers, which no JSON text starts with.  A raw
     * reader does not guess: like Perl's serializer => '' it returns the
     * bytes as stored, since any byte string is a valid raw value. */
    if (self->perl && type == FMM_T_JSON) {
        const char *which = perl_serializer_of(buf, len);
        if (which) {
            PyErr_Format(st->Error,
                         "this value was written by Perl with Cache::FastMmap's %s serializer, which fastmmap "
                         "cannot read; have the Perl side use serializer => 'json' or '' (raw), as this cache does",
                         which);
            goto done;
        }
    }
    switch (type) {
    case FMM_T_BYTES:
        result = raw && PyBytes_CheckExact(raw) ? Py_NewRef(raw) : PyBytes_FromStringAndSize(buf, len);
        break;
    case FMM_T_STR:
        result = PyUnicode_DecodeUTF8(buf, len, "surrogatepass");
        break;
    case FMM_T_NONE:
        result = Py_NewRef(Py_None);
        break;
    case FMM_T_PICKLE:
    case FMM_T_JSON:
    case FMM_T_CUSTOM: {
        PyObject *fn;
        if (type == FMM_T_PICKLE) {
            /* Unpickling runs code from the file: only a cache configured
             * with serializer="pickle" does it. */
            if (self->ser_type != FMM_T_PICKLE) {
                PyErr_Format(st->Error, "this value was stored with pickle, which this cache does not unpickle "
                                        "(it was opened with another serializer); open it with "
                                        "serializer='pickle' if you trust every writer of the file");
                goto done;
            }
            if (!(fn = lazy_attr(&st->pickle_loads, "pickle", "loads")))
                goto done;
        }
        else if (type == FMM_T_JSON) {
            if (!(fn = lazy_attr(&st->json_loads, "json", "loads")))
                goto done;
        } else {
            fn = self->loads;
            if (!fn) {
                PyErr_Format(st->Error, "this value was stored with a custom serializer; "
                                        "open the cache with the same serializer= to read it");
                goto done;
            }
        }
        PyObject *src = raw ? Py_NewRef(raw) : PyBytes_FromStringAndSize(buf, len);
        if (!src)
            goto done;
        result = PyObject_CallOneArg(fn, src);
        Py_DECREF(src);
        break;
    }
    default:
        PyErr_Format(st->Error, "stored value has unknown type flags 0x%x (written by a newer fastmmap?)", flags);
    }
done:
    Py_XDECREF(plain);
    return result;
}

/* Under the page lock: turn an entry into a Python object if that calls no
 * Python code (bytes, str, None, uncompressed), else return a bytes copy of
 * the raw value in *raw and NULL.  Sets *err on failure. */
static inline PyObject *value_under_lock(const fmm_item *it, PyObject **raw, int *err)
{
    *raw = NULL;
    *err = 0;
    uint32_t f = it->flags & (FMM_F_TYPE_MASK | FMM_F_COMP_MASK);
    PyObject *r;
    if (f == FMM_T_BYTES)
        r = PyBytes_FromStringAndSize(it->val, it->vlen);
    else if (f == FMM_T_STR)
        r = PyUnicode_DecodeUTF8(it->val, it->vlen, "surrogatepass");
    else if (f == FMM_T_NONE)
        return Py_NewRef(Py_None);
    else {
        *raw = PyBytes_FromStringAndSize(it->val, it->vlen);
        if (!*raw)
            *err = 1;
        return NULL;
    }
    if (!r)
        *err = 1;
    return r;
}

/* value_under_lock's raw copy, decoded once the page is released (or, for
 * a lock-free read, once the copy is known whole).  Consumes raw. */
static PyObject *decode_raw(CacheObject *self, uint32_t flags, PyObject *raw)
{
    PyObject *r = decode_value(self, flags, NULL, 0, raw);
    Py_DECREF(raw);
    return r;
}

/* ---------- Expiry arguments ---------- */

/* Expiry times are in the file's unit (fmm_time_unit: milliseconds, or
 * seconds for Perl's format); Python sees unix seconds, an int when whole. */
static uint64_t max_expire(CacheObject *self)
{
    uint32_t unit = fmm_time_unit(self->c);
    return 0xFFFFFFFFull * unit + (unit - 1);
}

static PyObject *expire_to_py(CacheObject *self, uint64_t t)
{
    uint32_t unit = fmm_time_unit(self->c);
    if (t % unit == 0)
        return PyLong_FromUnsignedLongLong(t / unit);
    return PyFloat_FromDouble((double)t / unit);
}

/* milliseconds (0 never, EXPIRE_NOW) from now -> absolute expire_on.  Perl's
 * format has whole seconds: rounded up, so an entry never expires early. */
static int expire_from_ms(CacheObject *self, long long ms, uint64_t *out)
{
    if (ms == 0) {
        *out = 0;
        return 0;
    }
    if (ms == EXPIRE_NOW) {
        uint64_t now = fmm_now(self->c);
        *out = now ? now : 1;
        return 0;
    }
    uint64_t at = 0;
    if (ms > 0 && (unsigned long long)ms <= 0xFFFFFFFFull * 1000u) {
        uint64_t after = fmm_time_unit(self->c) == 1000u ? (uint64_t)ms : ((uint64_t)ms + 999u) / 1000u;
        at = fmm_expire_at(self->c, after);
    }
    if (!at || at > max_expire(self)) {
        PyErr_Format(PyExc_ValueError, "expire_time of %lld ms is out of range", ms);
        return -1;
    }
    *out = at;
    return 0;
}

/* An exact int expire_time within [0, MAX_EXPIRE_TIME]: 1 with *secs set.
 * 0 for any other int, which parse_expire then refuses with the same
 * message as for the other forms (so one rule covers them all). */
static int int_expire_time(PyObject *v, long long *secs)
{
    int overflow;
    long long s = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || s < 0 || s > MAX_EXPIRE_TIME)
        return 0;
    *secs = s;
    return 1;
}

/* Resolve set()'s expire_time / expire_on arguments to expire_on. */
static int resolve_expiry(CacheObject *self, PyObject *expire_time, PyObject *expire_on, uint64_t *out)
{
    if (expire_on && expire_on != Py_None) {
        double d;
        if (PyLong_Check(expire_on) && !PyBool_Check(expire_on)) {
            long long v = PyLong_AsLongLong(expire_on);
            if (v == -1 && PyErr_Occurred())
                goto bad_on;
            d = (double)v;
        } else if (PyFloat_Check(expire_on)) {
            /* Checked before rounding up, so that -0.5 is refused as -1 is
             * rather than rounded to 0 (never). */
            d = PyFloat_AS_DOUBLE(expire_on);
            if (!(d >= 0))
                goto bad_on;
        } else {
            PyErr_Format(PyExc_TypeError, "expire_on must be unix seconds (int or float), not %.100s",
                         Py_TYPE(expire_on)->tp_name);
            return -1;
        }
        if (!(d >= 0 && d <= 4294967295.0)) /* unix seconds in 32 bits, in every form */
            goto bad_on;
        /* rounded up to the file's unit: never before the time given */
        d = ceil(d * fmm_time_unit(self->c));
        if (!(d >= 0 && d <= (double)max_expire(self)))
            goto bad_on;
        *out = (uint64_t)d;
        return 0;
    bad_on:
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "expire_on must be unix seconds between 0 (never) and 2**32-1");
        return -1;
    }
    long long ms, secs;
    if (!expire_time || expire_time == Py_None) {
        ms = self->default_expire;
    } else if (PyLong_CheckExact(expire_time) && int_expire_time(expire_time, &secs)) {
        /* the common case, without a call into Python */
        ms = secs * 1000;
    } else {
        if (!self->parse_expire) {
            if (PyLong_Check(expire_time))
                PyErr_Format(PyExc_ValueError, "expire_time must be between 0 and %lld seconds", MAX_EXPIRE_TIME);
            else
                PyErr_SetString(PyExc_TypeError, "expire_time must be an int");
            return -1;
        }
        PyObject *r = PyObject_CallOneArg(self->parse_expire, expire_time);
        if (!r)
            return -1;
        ms = PyLong_AsLongLong(r);
        Py_DECREF(r);
        if (ms == -1 && PyErr_Occurred())
            return -1;
    }
    if (ms == 0) { /* never, the usual default: no call on the hot path */
        *out = 0;
        return 0;
    }
    return expire_from_ms(self, ms, out);
}

/* A fastmmap.Update returned by a get_and_set function or a read_cb:
 * *value gets a new reference to its value and *exp its expiry, resolved
 * by resolve_expiry (so the per-call rules apply to it unchanged).
 * keep_expiry takes the entry's current expiry when there is one
 * (*keep_exp, or NULL for none), else `fallback`.  Returns 1 for an
 * Update, 0 for any other object (nothing set), -1 on error. */
static int unwrap_update(CacheObject *self, PyObject *obj, PyObject **value, const uint64_t *keep_exp,
                         uint64_t fallback, uint64_t *exp)
{
    fastmmap_state *st = self->state;
    if (!st->update_type || !PyObject_TypeCheck(obj, (PyTypeObject *)st->update_type))
        return 0;
    PyObject *v = PyObject_GetAttrString(obj, "value");
    PyObject *et = v ? PyObject_GetAttrString(obj, "expire_time") : NULL;
    PyObject *eo = et ? PyObject_GetAttrString(obj, "expire_on") : NULL;
    PyObject *keep = eo ? PyObject_GetAttrString(obj, "keep_expiry") : NULL;
    int rc = -1;
    if (keep) {
        int k = PyObject_IsTrue(keep);
        if (k > 0) {
            *exp = keep_exp ? *keep_exp : fallback;
            rc = 1;
        } else if (k == 0) {
            if (et == Py_None && eo == Py_None) {
                *exp = fallback;
                rc = 1;
            } else if (resolve_expiry(self, et, eo, exp) == 0) {
                rc = 1;
            }
        }
    }
    Py_XDECREF(et);
    Py_XDECREF(eo);
    Py_XDECREF(keep);
    if (rc == 1)
        *value = v;
    else
        Py_XDECREF(v);
    return rc;
}

/* ---------- Modseq arguments ---------- */

#define TOMB_FLAGS (FMM_T_TOMBSTONE | FMM_F_MODSEQ)

/* A modseq= argument: NULL or None -> 0 (*has = 0); else an int in
 * 0..2**64-1 (*has = 1).  TypeError or ValueError otherwise. */
static int parse_modseq(PyObject *o, uint64_t *out, int *has)
{
    *has = 0;
    *out = 0;
    if (!o || o == Py_None)
        return 0;
    if (!PyLong_Check(o) || PyBool_Check(o)) {
        PyErr_Format(PyExc_TypeError, "modseq must be an int, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return -1;
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "modseq must be between 0 and 2**64-1, got %R", o);
        return -1;
    }
    *out = v;
    *has = 1;
    return 0;
}

/* ---------- Callbacks ----------
 * Write-back: entries stored while write_back is on carry FMM_F_DIRTY.
 * When the engine drops a dirty entry (eviction, expiry reclaim, expunge)
 * it calls evict_collect under the page lock, which only copies the entry
 * into a list (no Python code runs); after the unlock, flush_evicted
 * passes each to write_cb, and puts back in the cache those it failed. */

typedef struct {
    PyObject *list; /* (key, raw value, flags, expire_on, modseq) tuples, or NULL */
    int err;
} evict_ctx;

static void evict_collect(void *vctx, const fmm_item *it)
{
    evict_ctx *ec = vctx;
    if (ec->err)
        return;
    if (!ec->list && !(ec->list = PyList_New(0))) {
        ec->err = 1;
        return;
    }
    PyObject *key = key_object(it);
    PyObject *t = key ? Py_BuildValue("(Ny#IKK)", key, it->val, (Py_ssize_t)it->vlen, it->flags,
                                      (unsigned long long)it->expire_on, (unsigned long long)it->modseq)
                      : NULL;
    if (!t || PyList_Append(ec->list, t) < 0)
        ec->err = 1;
    Py_XDECREF(t);
}

#define EVICT_FN(self) ((self)->write_back ? evict_collect : NULL)

static PyObject *decode_value(CacheObject *self, uint32_t flags, const char *buf, Py_ssize_t len, PyObject *raw);

static int call_write_cb(CacheObject *self, PyObject *key, PyObject *value, uint64_t expire_on)
{
    PyObject *exp = expire_to_py(self, expire_on);
    if (!exp)
        return -1;
    PyObject *args[4] = {self->context ? self->context : Py_None, key, value, exp};
    PyObject *r = PyObject_Vectorcall(self->write_cb, args, 4, NULL);
    Py_DECREF(exp);
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int call_delete_cb(CacheObject *self, PyObject *key)
{
    PyObject *args[2] = {self->context ? self->context : Py_None, key};
    PyObject *r = PyObject_Vectorcall(self->delete_cb, args, 2, NULL);
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int note_lost(PyObject **lost, PyObject *key)
{
    if (!*lost && !(*lost = PyList_New(0)))
        return -1;
    return PyList_Append(*lost, key);
}

/* Put back the dirty entries list[from:] whose write-back failed or was not
 * tried.  Each goes back under its page lock, dirty, with its expiry and
 * modseq, unless the key holds an entry now (a value, an expired one or a
 * tombstone): that one was stored after ours left the cache, so it is newer
 * and ours is not needed.  Dirty entries that a re-store evicts get one
 * write_cb call; they are not put back again, or a page too small for all
 * of them would cycle for ever.  The keys of entries that could be neither
 * written nor kept are appended to *lost.  Returns -1 only when even that
 * list cannot be built. */
static int restore_dirty(CacheObject *self, PyObject *list, Py_ssize_t from, PyObject **lost)
{
    evict_ctx displaced = {0};
    int unknown = 0; /* evicted entries that could not even be recorded */
    for (Py_ssize_t i = from; i < PyList_GET_SIZE(list); i++) {
        PyObject *t = PyList_GET_ITEM(list, i);
        PyObject *key = PyTuple_GET_ITEM(t, 0), *raw = PyTuple_GET_ITEM(t, 1);
        uint32_t flags = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, 2));
        uint64_t exp = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 3));
        uint64_t modseq = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 4));
        int rc = -1;
        /* the stored key bytes: key_object decoded them with surrogateescape */
        PyObject *kb = PyUnicode_Check(key) ? PyUnicode_AsEncodedString(key, "utf-8", "surrogateescape")
                                            : Py_NewRef(key);
        if (kb && self->c && !IS_LOST(self)) {
            const char *kbuf = PyBytes_AS_STRING(kb);
            uint32_t klen = (uint32_t)PyBytes_GET_SIZE(kb);
            uint64_t h = fmm_hash(self->c, kbuf, klen);
            uint32_t page = fmm_page_of(self->c, h);
            if (lock_page(self, page) == 0) {
                fmm_item it;
                if (fmm_get(self->c, page, h, kbuf, klen, FMM_GET_EXPIRED | FMM_GET_TOMBSTONE, &it) == 0)
                    rc = 0;
                else
                    rc = fmm_set_ms(self->c, page, h, kbuf, klen, PyBytes_AS_STRING(raw),
                                    (uint32_t)PyBytes_GET_SIZE(raw), flags, exp, modseq, evict_collect, &displaced);
                UNLOCK(self, page);
            }
        }
        Py_XDECREF(kb);
        if (rc != 0) {
            PyErr_Clear(); /* the error that matters is the write_cb's; this one shows as the loss */
            if (note_lost(lost, key) < 0)
                goto fail;
        }
    }
    if (displaced.err) {
        PyErr_Clear();
        unknown = 1;
    }
    if (displaced.list) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(displaced.list); i++) {
            PyObject *t = PyList_GET_ITEM(displaced.list, i);
            uint32_t flags = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, 2));
            uint64_t exp = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 3));
            PyObject *v = decode_value(self, flags, NULL, 0, PyTuple_GET_ITEM(t, 1));
            if (!v || call_write_cb(self, PyTuple_GET_ITEM(t, 0), v, exp) < 0) {
                PyErr_Clear();
                if (note_lost(lost, PyTuple_GET_ITEM(t, 0)) < 0) {
                    Py_XDECREF(v);
                    goto fail;
                }
            }
            Py_XDECREF(v);
        }
    }
    if (unknown && note_lost(lost, Py_None) < 0)
        goto fail;
    Py_XDECREF(displaced.list);
    return 0;
fail:
    Py_XDECREF(displaced.list);
    return -1;
}

/* The error for dirty values that are gone: a WriteBackLostError whose
 * `keys` lists them (None for one that could not even be recorded), caused
 * by `cause`, the write_cb error that started it (stolen, may be NULL). */
static PyObject *lost_error(CacheObject *self, PyObject *lost, PyObject *cause)
{
    PyObject *e = NULL;
    PyObject *msg = PyUnicode_FromFormat("write-back failed (%R) and %zd dirty value(s) could not be put back in the "
                                         "cache, so they are lost: keys %R",
                                         cause ? cause : Py_None, PyList_GET_SIZE(lost), lost);
    if (msg) {
        e = PyObject_CallOneArg(self->state->WriteBackLostError, msg);
        Py_DECREF(msg);
    }
    PyObject *keys = e ? PyList_AsTuple(lost) : NULL;
    if (e && (!keys || PyObject_SetAttrString(e, "keys", keys) < 0))
        Py_CLEAR(e);
    Py_XDECREF(keys);
    if (!e) {
        Py_XDECREF(cause);
        return PyErr_GetRaisedException();
    }
    if (cause)
        PyException_SetCause(e, cause); /* steals */
    return e;
}

/* Write evicted dirty entries to the store (no page lock held), in order,
 * stopping at the first that fails (write_cb or decoding raised): that one
 * and those after it go back into the cache, still dirty (restore_dirty),
 * and the exception is raised.  If some could not be put back, the error is
 * a WriteBackLostError naming them.  Consumes ec->list. */
static int flush_evicted(CacheObject *self, evict_ctx *ec)
{
    int rc = 0;
    PyObject *exc = NULL;
    if (ec->err) {
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        rc = -1;
        exc = PyErr_GetRaisedException();
    }
    if (ec->list && self->write_cb) {
        Py_ssize_t n = PyList_GET_SIZE(ec->list), i;
        for (i = 0; i < n; i++) {
            PyObject *t = PyList_GET_ITEM(ec->list, i);
            uint32_t flags = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, 2));
            uint64_t exp = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(t, 3));
            PyObject *v = decode_value(self, flags, NULL, 0, PyTuple_GET_ITEM(t, 1));
            if (!v || call_write_cb(self, PyTuple_GET_ITEM(t, 0), v, exp) < 0) {
                Py_XDECREF(v);
                rc = -1;
                if (!exc)
                    exc = PyErr_GetRaisedException();
                else
                    PyErr_Clear();
                break;
            }
            Py_DECREF(v);
        }
        if (i < n) {
            PyObject *lost = NULL;
            if (restore_dirty(self, ec->list, i, &lost) < 0) {
                Py_XDECREF(exc);
                exc = PyErr_GetRaisedException();
            } else if (lost) {
                exc = lost_error(self, lost, exc);
            }
            Py_XDECREF(lost);
        }
    }
    Py_CLEAR(ec->list);
    if (exc)
        PyErr_SetRaisedException(exc);
    return rc;
}

/* ---------- Core operations ---------- */

static PyObject *read_through(CacheObject *self, PyObject *key, const keybuf *k, uint64_t h, uint32_t page);

/* Look a key up.  Returns a new reference, or NULL: with an exception set
 * on error, without one on a miss. */
static PyObject *do_get(CacheObject *self, PyObject *key)
{
    keybuf k;
    if (get_key(key, &k) < 0)
        return NULL;
    uint64_t h = fmm_hash(self->c, k.buf, (size_t)k.len);
    uint32_t page = fmm_page_of(self->c, h);
    /* Lock-free first (fmm_get_optimistic): a hit whose LRU stamp is fresh,
     * or a miss with no read_cb, needs no lock and writes nothing.  A copy
     * made while a writer changed the page is thrown away and read again;
     * after two such tries, or when the engine says so, take the lock. */
    for (int tries = 0; tries < 2; tries++) {
        fmm_item it;
        uint32_t tok;
        int rc = fmm_get_optimistic(self->c, page, h, k.buf, (uint32_t)k.len, FMM_GET_TOUCH, &it, &tok);
        if (rc == FMM_ENOTFOUND) {
            if (self->read_cb)
                break; /* read-through runs under the page lock */
            if (fmm_read_valid(self->c, page, tok))
                return NULL;
            continue;
        }
        if (rc != 0)
            break;
        PyObject *raw, *r;
        int err;
        r = value_under_lock(&it, &raw, &err);
        if (UNLIKELY(!fmm_read_valid(self->c, page, tok))) {
            /* torn: whatever was built from it (or failed on it) goes */
            Py_XDECREF(r);
            Py_XDECREF(raw);
            if (err)
                PyErr_Clear();
            continue;
        }
        if (raw)
            r = decode_raw(self, it.flags, raw);
        return r;
    }
    if (lock_page(self, page) < 0)
        return NULL;
    fmm_item it;
    PyObject *r = NULL, *raw = NULL;
    int err = 0;
    if (fmm_get(self->c, page, h, k.buf, (uint32_t)k.len, FMM_GET_TOUCH, &it) == 0) {
        r = value_under_lock(&it, &raw, &err);
        UNLOCK(self, page);
        if (raw)
            r = decode_raw(self, it.flags, raw);
        return r;
    }
    if (UNLIKELY(self->read_cb != NULL) && LIKELY(!IS_LOST(self)))
        return read_through(self, key, &k, h, page);
    UNLOCK(self, page);
    return NULL;
}

/* A miss with read_cb set, entered with the page locked; unlocks it.  As in
 * Cache::FastMmap, read_cb runs under the page lock (so concurrent misses
 * on the page wait for this one) unless allow_recursive. */
static Py_NO_INLINE PyObject *read_through(CacheObject *self, PyObject *key, const keybuf *k, uint64_t h,
                                           uint32_t page)
{
    PyObject *args[2] = {self->context ? self->context : Py_None, key};
    PyObject *v;
    if (self->allow_recursive) {
        UNLOCK(self, page);
        v = PyObject_Vectorcall(self->read_cb, args, 2, NULL);
        if (!v)
            return NULL;
        if (lock_page(self, page) < 0) {
            Py_DECREF(v);
            return NULL;
        }
    } else {
        v = PyObject_Vectorcall(self->read_cb, args, 2, NULL);
        if (!v) {
            unlock_after_python(self, page);
            return NULL;
        }
    }
    /* page locked */
    evict_ctx ec = {0};
    encoded e = {0};
    uint64_t exp = 0;
    int bad = 0;
    /* fastmmap.Update(value, expire_time=...): the source's own freshness */
    int upd = resolve_expiry(self, NULL, NULL, &exp);
    if (upd == 0) {
        PyObject *inner;
        upd = unwrap_update(self, v, &inner, NULL, exp, &exp);
        if (upd == 1)
            Py_SETREF(v, inner);
    }
    if (upd < 0)
        bad = 1;
    int store = !bad && (v != Py_None || self->cache_not_found);
    if (store) {
        if (encode_value(self, v, &e) < 0) {
            bad = 1;
        } else if (e.len <= (Py_ssize_t)UINT32_MAX) {
            /* over a tombstone the store is refused: the value is still returned */
            int rc = fmm_set(self->c, page, h, k->buf, (uint32_t)k->len, e.buf, (uint32_t)e.len,
                             e.flags | (k->isstr ? FMM_F_KEYSTR : 0), exp, EVICT_FN(self), &ec);
            if (rc && rc != FMM_ETOOBIG && rc != FMM_EREFUSED) {
                set_error(self->state, "read-through store", rc, fmm_errdetail(self->c), NULL);
                bad = 1;
            }
        }
    }
    if (unlock_after_python(self, page) < 0)
        bad = 1;
    Py_XDECREF(e.owner);
    if (flush_evicted(self, &ec) < 0)
        bad = 1;
    if (bad) {
        Py_DECREF(v);
        return NULL;
    }
    if (v == Py_None && !store) {
        Py_DECREF(v);
        return NULL; /* a miss */
    }
    return v;
}

/* Store; returns 1 stored, 0 too big, 2 refused by the modseq rules
 * (nothing changed in either case), -1 error.  `modseq` is NULL for a
 * plain store.  Runs the write callbacks after the page is unlocked:
 * write-through after a store or a too-big item (the store still gets
 * it), write-back only for a too-big item, never after a refusal. */
static int do_set(CacheObject *self, PyObject *key, PyObject *value, uint64_t expire_on, const uint64_t *modseq)
{
    keybuf k;
    encoded e;
    if (get_key(key, &k) < 0)
        return -1;
    uint64_t h = fmm_hash(self->c, k.buf, (size_t)k.len);
    uint32_t page = fmm_page_of(self->c, h);
    fmm_prefetch(self->c, page, h);
    if (encode_value(self, value, &e) < 0)
        return -1;
    int result = -1;
    evict_ctx ec = {0};
    int rc = FMM_ETOOBIG;
    if (e.len <= (Py_ssize_t)UINT32_MAX) {
        if (lock_page(self, page) < 0)
            goto done;
        uint32_t flags = e.flags | (k.isstr ? FMM_F_KEYSTR : 0) | (self->write_back ? FMM_F_DIRTY : 0);
        if (LIKELY(!modseq))
            rc = fmm_set(self->c, page, h, k.buf, (uint32_t)k.len, e.buf, (uint32_t)e.len, flags, expire_on,
                         EVICT_FN(self), &ec);
        else
            rc = fmm_set_ms(self->c, page, h, k.buf, (uint32_t)k.len, e.buf, (uint32_t)e.len,
                            flags | FMM_F_MODSEQ, expire_on, *modseq, EVICT_FN(self), &ec);
        UNLOCK(self, page);
    }
    if (rc == 0)
        result = 1;
    else if (rc == FMM_ETOOBIG)
        result = 0;
    else if (rc == FMM_EREFUSED)
        result = 2;
    else
        set_error(self->state, "set", rc, NULL, NULL);
    if (flush_evicted(self, &ec) < 0)
        result = -1;
    /* write-through, or write-back of an item the cache could not hold */
    if (self->write_cb && (result == 1 || result == 0) && (!self->write_back || result == 0))
        if (call_write_cb(self, key, value, expire_on) < 0)
            result = -1;
done:
    Py_XDECREF(e.owner);
    return result;
}

static PyObject *too_big_error(CacheObject *self, PyObject *key)
{
    return PyErr_Format(self->state->ItemTooLargeError,
                        "item for key %R does not fit in a page (at most %u bytes of key, value and %u bytes of "
                        "overhead per item; raise page_size)",
                        key, fmm_max_item(self->c), FMM_ENTRY_HEADER_SIZE);
}

/* ---------- Mapping protocol ---------- */

static PyObject *cache_subscript(PyObject *op, PyObject *key)
{
    CacheObject *self = CacheObject_CAST(op);
    ENTER(self);
    PyObject *r = do_get(self, key);
    if (!r && !PyErr_Occurred())
        PyErr_SetObject(PyExc_KeyError, key);
    LOST_R(self, r);
    LEAVE(self);
    return r;
}

static int do_delete(CacheObject *self, PyObject *key)
{
    keybuf k;
    if (get_key(key, &k) < 0)
        return -1;
    uint64_t h = fmm_hash(self->c, k.buf, (size_t)k.len);
    uint32_t page = fmm_page_of(self->c, h);
    if (lock_page(self, page) < 0)
        return -1;
    int rc = fmm_delete(self->c, page, h, k.buf, (uint32_t)k.len, NULL);
    UNLOCK(self, page);
    if (self->delete_cb && call_delete_cb(self, key) < 0)
        return -1;
    return rc == 0;
}

static int cache_ass_subscript(PyObject *op, PyObject *key, PyObject *value)
{
    CacheObject *self = CacheObject_CAST(op);
    if (UNLIKELY(op_enter(self) < 0))
        return -1;
    int r;
    if (value) {
        uint64_t exp;
        r = -1;
        if (resolve_expiry(self, NULL, NULL, &exp) == 0) {
            r = do_set(self, key, value, exp, NULL);
            if (r == 0) {
                too_big_error(self, key);
                r = -1;
            } else if (r >= 1) {
                r = 0; /* stored, or refused by a tombstone: not an error (as set() returning False) */
            }
        }
    } else {
        r = do_delete(self, key);
        if (r == 0) {
            PyErr_SetObject(PyExc_KeyError, key);
            r = -1;
        } else if (r == 1) {
            r = 0;
        }
    }
    LOST_I(self, r);
    LEAVE(self);
    return r;
}

static int cache_contains(PyObject *op, PyObject *key)
{
    CacheObject *self = CacheObject_CAST(op);
    if (UNLIKELY(op_enter(self) < 0))
        return -1;
    int r = -1;
    keybuf k;
    if (get_key(key, &k) == 0) {
        uint64_t h = fmm_hash(self->c, k.buf, (size_t)k.len);
        uint32_t page = fmm_page_of(self->c, h);
        fmm_item it;
        uint32_t tok;
        int rc = fmm_get_optimistic(self->c, page, h, k.buf, (uint32_t)k.len, 0, &it, &tok);
        if ((rc == 0 || rc == FMM_ENOTFOUND) && fmm_read_valid(self->c, page, tok)) {
            r = rc == 0;
        } else if (lock_page(self, page) == 0) {
            r = fmm_get(self->c, page, h, k.buf, (uint32_t)k.len, 0, &it) == 0;
            UNLOCK(self, page);
        }
    }
    LOST_I(self, r);
    LEAVE(self);
    return r;
}

static Py_ssize_t cache_length(PyObject *op)
{
    CacheObject *self = CacheObject_CAST(op);
    if (UNLIKELY(op_enter(self) < 0))
        return -1;
    Py_ssize_t n = 0;
    uint32_t np = fmm_num_pages(self->c);
    for (uint32_t p = 0; p < np; p++) {
        if (lock_page(self, p) < 0) {
            n = -1;
            break;
        }
        fmm_page_info info;
        fmm_page_info_get(self->c, p, &info);
        UNLOCK(self, p);
        n += info.live - info.expired - info.tombstones;
    }
    LOST_I(self, n);
    LEAVE(self);
    return n;
}

/* ---------- Methods ---------- */

PyDoc_STRVAR(cache_get_doc, "get($self, key, default=None, /)\n--\n\n"
                            "Return the value for key, or default if it is absent or expired.");

static PyObject *cache_get(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CacheObject *self = CacheObject_CAST(op);
    if (UNLIKELY(nargs < 1 || nargs > 2)) {
        return PyErr_Format(PyExc_TypeError, "get expected 1 or 2 arguments, got %zd", nargs);
    }
    ENTER(self);
    PyObject *r = do_get(self, args[0]);
    if (!r && !PyErr_Occurred())
        r = Py_NewRef(nargs == 2 ? args[1] : Py_None);
    LOST_R(self, r);
    LEAVE(self);
    return r;
}

/* Tiny keyword-argument helper: match kwnames against allowed names. */
static int parse_kw(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                    const char *const *names, Py_ssize_t npos_max, PyObject **out, Py_ssize_t nout)
{
    for (Py_ssize_t i = 0; i < nout; i++)
        out[i] = NULL;
    if (nargs > npos_max) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd positional arguments (%zd given)", fname, npos_max,
                     nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    if (kwnames) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t j = 0; j < nkw; j++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, j);
            Py_ssize_t i;
            for (i = 0; i < nout; i++)
                if (PyUnicode_CompareWithASCIIString(name, names[i]) == 0)
                    break;
            if (i == nout) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname, name);
                return -1;
            }
            if (out[i]) {
                PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname, names[i]);
                return -1;
            }
            out[i] = args[nargs + j];
        }
    }
    return 0;
}

PyDoc_STRVAR(cache_set_doc,
             "set($self, key, value, expire_time=None, *, expire_on=None, modseq=None)\n--\n\n"
             "Store value under key.  Return True if stored, False if the item can never fit in a page\n"
             "or the modseq rules refused it (the old value, if any, is then kept).\n\n"
             "expire_time: seconds or a string like '30s', '5m', 'never', 'now'; None uses the cache's default.\n"
             "expire_on: absolute unix seconds (0 = never); takes precedence over expire_time.\n"
             "modseq: an int 0..2**64-1 stored with the value; refused (False) if the key holds a newer\n"
             "modseq, or a tombstone (left by remove(key, modseq=...)) with a newer one.  Without modseq,\n"
             "a store over an unexpired tombstone is refused too.");

/* set(key, value) with the default expiry: the hot path, no argument parsing. */
static PyObject *cache_set_2(CacheObject *self, PyObject *key, PyObject *value)
{
    ENTER(self);
    PyObject *res = NULL;
    uint64_t exp;
    if (resolve_expiry(self, NULL, NULL, &exp) == 0) {
        int r = do_set(self, key, value, exp, NULL);
        if (r >= 0)
            res = Py_NewRef(r == 1 ? Py_True : Py_False);
    }
    LOST_R(self, res);
    LEAVE(self);
    return res;
}

static PyObject *cache_set(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    CacheObject *self = CacheObject_CAST(op);
    if (LIKELY(!kwnames && nargs == 2))
        return cache_set_2(self, args[0], args[1]);
    static const char *const names[] = {"key", "value", "expire_time", "expire_on", "modseq"};
    PyObject *a[5];
    if (parse_kw("set", args, nargs, kwnames, names, 3, a, 5) < 0)
        return NULL;
    if (!a[0] || !a[1])
        return PyErr_Format(PyExc_TypeError, "set() missing required argument '%s'", a[0] ? "value" : "key");
    uint64_t ms;
    int has_ms;
    if (parse_modseq(a[4], &ms, &has_ms) < 0)
        return NULL;
    ENTER(self);
    PyObject *res = NULL;
    uint64_t exp;
    if (resolve_expiry(self, a[2], a[3], &exp) == 0) {
        int r = do_set(self, a[0], a[1], exp, has_ms ? &ms : NULL);
        if (r >= 0)
            res = Py_NewRef(r == 1 ? Py_True : Py_False);
    }
    LOST_R(self, res);
    LEAVE(self);
    return res;
}

PyDoc_STRVAR(cache_exists_doc, "exists($self, key, /)\n--\n\n"
                               "Return True if key is present and not expired (does not count as a use).");

static PyObject *cache_exists(PyObject *op, PyObject *key)
{
    int r = cache_contains(op, key);
    if (r < 0)
        return NULL;
    return Py_NewRef(r ? Py_True : Py_False);
}

PyDoc_STRVAR(cache_remove_doc,
             "remove($self, key, /, *, modseq=None, expire_time=None, expire_on=None)\n--\n\n"
             "Delete key.  Return True if a live entry was removed, False if absent.\n\n"
             "With modseq (an int 0..2**64-1), leave a tombstone carrying it instead: the key reads as\n"
             "absent, and stores with an older modseq, or without one, are refused until the tombstone\n"
             "expires (after the cache's tombstone_expire_time, or expire_time / expire_on given here).\n"
             "A live entry with an equal or newer modseq is kept (False).  delete_cb is called when the\n"
             "tombstone is stored.");

/* remove(key, modseq=N): store a tombstone.  Returns 1 if a live value was
 * removed, 0 if not, -1 on error. */
static int do_remove_ms(CacheObject *self, PyObject *key, uint64_t modseq, PyObject *expire_time,
                        PyObject *expire_on)
{
    keybuf k;
    uint64_t exp;
    if (get_key(key, &k) < 0)
        return -1;
    if ((!expire_time || expire_time == Py_None) && (!expire_on || expire_on == Py_None)) {
        if (expire_from_ms(self, self->tombstone_expire, &exp) < 0)
            return -1;
    } else if (resolve_expiry(self, expire_time, expire_on, &exp) < 0) {
        return -1;
    }
    uint64_t h = fmm_hash(self->c, k.buf, (size_t)k.len);
    uint32_t page = fmm_page_of(self->c, h);
    if (lock_page(self, page) < 0)
        return -1;
    fmm_item it;
    evict_ctx ec = {0};
    int live = fmm_get(self->c, page, h, k.buf, (uint32_t)k.len, 0, &it) == 0;
    int rc = fmm_set_ms(self->c, page, h, k.buf, (uint32_t)k.len, NULL, 0, TOMB_FLAGS | (k.isstr ? FMM_F_KEYSTR : 0),
                        exp, modseq, EVICT_FN(self), &ec);
    UNLOCK(self, page);
    int result = -1;
    if (rc == 0)
        result = live;
    else if (rc == FMM_ENOCHANGE)
        result = 0;
    else if (rc == FMM_ETOOBIG)
        too_big_error(self, key);
    else
        set_error(self->state, "remove", rc, NULL, NULL);
    if (flush_evicted(self, &ec) < 0)
        result = -1;
    if (rc == 0 && result >= 0 && self->delete_cb && call_delete_cb(self, key) < 0)
        result = -1;
    return result;
}

static PyObject *cache_remove(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    CacheObject *self = CacheObject_CAST(op);
    static const char *const names[] = {"key", "modseq", "expire_time", "expire_on"};
    PyObject *a[4];
    if (parse_kw("remove", args, nargs, kwnames, names, 1, a, 4) < 0)
        return NULL;
    if (!a[0])
        return PyErr_Format(PyExc_TypeError, "remove() missing required argument 'key'");
    uint64_t ms;
    int has_ms;
    if (parse_modseq(a[1], &ms, &has_ms) < 0)
        return NULL;
    if (!has_ms && ((a[2] && a[2] != Py_None) || (a[3] && a[3] != Py_None)))
        return PyErr_Format(PyExc_TypeError, "remove(): expire_time and expire_on apply only with modseq "
                                             "(they set the tombstone's expiry)");
    ENTER(self);
    int r = has_ms ? do_remove_ms(self, a[0], ms, a[2], a[3]) : do_delete(self, a[0]);
    LOST_I(self, r);
    LEAVE(self);
    if (r < 0)
        return NULL;
    return Py_NewRef(r ? Py_True : Py_False);
}

PyDoc_STRVAR(cache_get_modseq_doc,
             "get_modseq($self, key, /)\n--\n\n"
             "Return the modseq of key's entry: of its value, or of the tombstone that remove(key, modseq=...)\n"
             "left.  None if the key is absent or expired, or its entry has no modseq.  Does not count as a use.");

static PyObject *cache_get_modseq(PyObject *op, PyObject *key)
{
    CacheObject *self = CacheObject_CAST(op);
    ENTER(self);
    PyObject *res = NULL;
    keybuf k;
    if (get_key(key, &k) == 0) {
        uint64_t h = fmm_hash(self->c, k.buf, (size_t)k.len);
        uint32_t page = fmm_page_of(self->c, h);
        if (lock_page(self, page) == 0) {
            fmm_item it;
            int found = fmm_get(self->c, page, h, k.buf, (uint32_t)k.len, FMM_GET_TOMBSTONE, &it) == 0 &&
                        (it.flags & FMM_F_MODSEQ);
            uint64_t ms = it.modseq;
            UNLOCK(self, page);
            res = found ? PyLong_FromUnsignedLongLong(ms) : Py_NewRef(Py_None);
        }
    }
    LOST_R(self, res); /* the modseq may have been read from zeros */
    LEAVE(self);
    return res;
}

PyDoc_STRVAR(cache_get_and_set_doc,
             "get_and_set($self, key, fn, expire_time=None, *, expire_on=None, modseq=None, default=None,\n"
             "            entry=False, with_stored=False)\n--\n\n"
             "Atomically replace the value of key with fn(key, old) and return the new value.\n\n"
             "old is the current value, or default if the key is absent; with entry=True, fn gets a\n"
             "fastmmap.Entry(value, exists, expire_on, modseq) instead.  fn may return the new value,\n"
             "fastmmap.Update(value, expire_time=None, *, expire_on=None, keep_expiry=False) to give it\n"
             "its own expiry (or keep the entry's), or fastmmap.NO_CHANGE to store nothing (the call\n"
             "then returns the current value, or default).  with_stored=True returns (value, stored).\n\n"
             "fn runs while the key's page is locked, so no other thread or process can change the key\n"
             "in between.  fn must not use this cache: doing so raises fastmmap.RecursiveLockError.\n"
             "Raises ItemTooLargeError (keeping the old value) if the new item can never fit in a page.\n"
             "modseq: store the new value with this modseq.  If the modseq rules refuse the store (a newer\n"
             "modseq, or a tombstone, holds the key), nothing changes and the current value is returned\n"
             "(default over a tombstone) instead of fn's.");

static PyObject *cache_get_and_set(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    CacheObject *self = CacheObject_CAST(op);
    static const char *const names[] = {"key",    "fn",      "expire_time", "expire_on",
                                        "modseq", "default", "entry",       "with_stored"};
    PyObject *a[8];
    if (parse_kw("get_and_set", args, nargs, kwnames, names, 3, a, 8) < 0)
        return NULL;
    if (!a[0] || !a[1])
        return PyErr_Format(PyExc_TypeError, "get_and_set() missing required argument '%s'", a[0] ? "fn" : "key");
    PyObject *key = a[0], *fn = a[1], *dflt = a[5] ? a[5] : Py_None;
    if (!PyCallable_Check(fn))
        return PyErr_Format(PyExc_TypeError, "get_and_set: fn must be callable, not %.100s", Py_TYPE(fn)->tp_name);
    int want_entry = a[6] ? PyObject_IsTrue(a[6]) : 0;
    int want_stored = a[7] ? PyObject_IsTrue(a[7]) : 0;
    if (want_entry < 0 || want_stored < 0)
        return NULL;
    uint64_t ms;
    int has_ms;
    if (parse_modseq(a[4], &ms, &has_ms) < 0)
        return NULL;
    if (want_entry && !self->state->entry_type)
        return PyErr_Format(PyExc_TypeError, "get_and_set: entry=True needs the fastmmap package imported");
    ENTER(self);
    PyObject *old = NULL, *raw = NULL, *ret = NULL, *newv = NULL, *val = NULL, *res = NULL;
    encoded e = {0};
    evict_ctx ec = {0};
    keybuf k;
    uint64_t exp, old_exp = 0;
    int stored = 0, kept = 0, found = 0;
    if (get_key(key, &k) < 0 || resolve_expiry(self, a[2], a[3], &exp) < 0)
        goto out;
    uint64_t h = fmm_hash(self->c, k.buf, (size_t)k.len);
    uint32_t page = fmm_page_of(self->c, h);
    if (lock_page(self, page) < 0)
        goto out;
    /* Page locked from here to UNLOCK below; Python code runs under it by design. */
    fmm_item it;
    int err = 0;
    uint64_t old_ms = 0;
    int old_has_ms = 0;
    if (fmm_get(self->c, page, h, k.buf, (uint32_t)k.len, FMM_GET_TOUCH, &it) == 0) {
        found = 1;
        old_exp = it.expire_on;
        old_has_ms = (it.flags & FMM_F_MODSEQ) != 0;
        old_ms = it.modseq;
        old = value_under_lock(&it, &raw, &err);
        if (raw) {
            old = decode_value(self, it.flags, NULL, 0, raw);
            if (!old)
                err = 1;
        }
    } else {
        old = Py_NewRef(dflt);
    }
    if (!err && UNLIKELY(IS_LOST(self))) {
        /* the old value may have been read from zeros: fn must not see it */
        replaced_error(self);
        err = 1;
    }
    if (!err) {
        PyObject *arg = old;
        if (want_entry)
            arg = PyObject_CallFunction(self->state->entry_type, "(OONN)", old, found ? Py_True : Py_False,
                                        found ? expire_to_py(self, old_exp) : Py_NewRef(Py_None),
                                        found && old_has_ms ? PyLong_FromUnsignedLongLong(old_ms)
                                                            : Py_NewRef(Py_None));
        if (arg) {
            PyObject *cargs[2] = {key, arg};
            ret = PyObject_Vectorcall(fn, cargs, 2, NULL);
            if (arg != old)
                Py_DECREF(arg);
        }
    }
    if (ret && ret == self->state->no_change) {
        kept = 1; /* fn asked for no store */
    } else if (ret) {
        int u = unwrap_update(self, ret, &val, found ? &old_exp : NULL, exp, &exp);
        if (u == 0)
            val = Py_NewRef(ret);
        if (u >= 0)
            newv = val;
    }
    if (newv && encode_value(self, newv, &e) == 0) {
        uint32_t flags = e.flags | (k.isstr ? FMM_F_KEYSTR : 0) | (self->write_back ? FMM_F_DIRTY : 0);
        int rc = e.len > (Py_ssize_t)UINT32_MAX
                     ? FMM_ETOOBIG
                     : fmm_set_ms(self->c, page, h, k.buf, (uint32_t)k.len, e.buf, (uint32_t)e.len,
                                  flags | (has_ms ? FMM_F_MODSEQ : 0), exp, ms, EVICT_FN(self), &ec);
        if (rc == 0)
            stored = 1;
        else if (rc == FMM_EREFUSED)
            kept = 1;
        else if (rc == FMM_ETOOBIG)
            too_big_error(self, key);
        else
            set_error(self->state, "get_and_set", rc, fmm_errdetail(self->c), NULL);
    }
    if (unlock_after_python(self, page) < 0)
        stored = kept = 0;
    if (flush_evicted(self, &ec) < 0)
        stored = kept = 0;
    else if (stored && self->write_cb && !self->write_back && call_write_cb(self, key, newv, exp) < 0)
        stored = 0;
    if (stored)
        res = Py_NewRef(newv);
    else if (kept)
        res = Py_NewRef(old); /* what the key still holds (or default) */
    if (res && want_stored)
        res = Py_BuildValue("(NO)", res, stored ? Py_True : Py_False); /* steals res */
out:
    Py_XDECREF(e.owner);
    Py_XDECREF(raw);
    Py_XDECREF(old);
    Py_XDECREF(ret);
    Py_XDECREF(val);
    LOST_R(self, res);
    LEAVE(self);
    return res;
}

PyDoc_STRVAR(cache__set_result_types_doc,
             "_set_result_types($module, no_change, update, entry, /)\n--\n\n"
             "Register fastmmap.NO_CHANGE, fastmmap.Update and fastmmap.Entry (done by the package).");

PyDoc_STRVAR(cache_get_and_remove_doc,
             "get_and_remove($self, key, default=None, /)\n--\n\n"
             "Atomically remove key and return its value (default if it was absent).");

static PyObject *cache_get_and_remove(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CacheObject *self = CacheObject_CAST(op);
    if (nargs < 1 || nargs > 2)
        return PyErr_Format(PyExc_TypeError, "get_and_remove expected 1 or 2 arguments, got %zd", nargs);
    PyObject *key = args[0];
    ENTER(self);
    PyObject *r = NULL, *raw = NULL;
    keybuf k;
    if (get_key(key, &k) < 0)
        goto out;
    uint64_t h = fmm_hash(self->c, k.buf, (size_t)k.len);
    uint32_t page = fmm_page_of(self->c, h);
    if (lock_page(self, page) < 0)
        goto out;
    fmm_item it;
    int err = 0, found = 0;
    uint32_t flags = 0;
    if (fmm_get(self->c, page, h, k.buf, (uint32_t)k.len, 0, &it) == 0) {
        found = 1;
        flags = it.flags;
        r = value_under_lock(&it, &raw, &err);
        if (!err)
            fmm_delete(self->c, page, h, k.buf, (uint32_t)k.len, NULL);
    }
    UNLOCK(self, page);
    if (raw)
        r = decode_raw(self, flags, raw);
    if (!found && !err)
        r = Py_NewRef(nargs == 2 ? args[1] : Py_None);
out:
    LOST_R(self, r);
    LEAVE(self);
    return r;
}

PyDoc_STRVAR(cache_add_doc,
             "add($self, key, value, expire_time=None, *, expire_on=None)\n--\n\n"
             "Store value only if key is absent (or expired), atomically.  Return True if stored,\n"
             "False if the key was present.  Raises ValueError if the item can never fit in a page.");

static PyObject *cache_add(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    CacheObject *self = CacheObject_CAST(op);
    static const char *const names[] = {"key", "value", "expire_time", "expire_on"};
    PyObject *a[4];
    if (parse_kw("add", args, nargs, kwnames, names, 3, a, 4) < 0)
        return NULL;
    if (!a[0] || !a[1])
        return PyErr_Format(PyExc_TypeError, "add() missing required argument '%s'", a[0] ? "value" : "key");
    ENTER(self);
    PyObject *res = NULL;
    encoded e = {0};
    keybuf k;
    uint64_t exp;
    if (get_key(a[0], &k) < 0 || resolve_expiry(self, a[2], a[3], &exp) < 0 || encode_value(self, a[1], &e) < 0)
        goto out;
    uint64_t h = fmm_hash(self->c, k.buf, (size_t)k.len);
    uint32_t page = fmm_page_of(self->c, h);
    if (lock_page(self, page) < 0)
        goto out;
    fmm_item it;
    int rc = 1;
    evict_ctx ec = {0};
    if (fmm_get(self->c, page, h, k.buf, (uint32_t)k.len, 0, &it) != 0)
        rc = e.len > (Py_ssize_t)UINT32_MAX
                 ? FMM_ETOOBIG
                 : fmm_set(self->c, page, h, k.buf, (uint32_t)k.len, e.buf, (uint32_t)e.len,
                           e.flags | (k.isstr ? FMM_F_KEYSTR : 0) | (self->write_back ? FMM_F_DIRTY : 0), exp,
                           EVICT_FN(self), &ec);
    UNLOCK(self, page);
    if (rc == 1 || rc == FMM_EREFUSED) /* present, or held by a tombstone */
        res = Py_NewRef(Py_False);
    else if (rc == 0)
        res = Py_NewRef(Py_True);
    else if (rc == FMM_ETOOBIG)
        too_big_error(self, a[0]);
    else
        set_error(self->state, "add", rc, NULL, NULL);
    if (flush_evicted(self, &ec) < 0 ||
        (rc == 0 && self->write_cb && !self->write_back && call_write_cb(self, a[0], a[1], exp) < 0))
        Py_CLEAR(res);
out:
    Py_XDECREF(e.owner);
    LOST_R(self, res);
    LEAVE(self);
    return res;
}

/* Run an expunge over every page; with `flush`, dirty entries removed are
 * written back (write-back mode) after each page is unlocked. */
static PyObject *expunge_all(CacheObject *self, int mode, int flush)
{
    ENTER(self);
    PyObject *res = Py_None;
    uint32_t np = fmm_num_pages(self->c);
    for (uint32_t p = 0; p < np; p++) {
        if (lock_page(self, p) < 0) {
            res = NULL;
            break;
        }
        evict_ctx ec = {0};
        int rc = fmm_expunge(self->c, p, mode, flush && self->write_back ? evict_collect : NULL, &ec);
        UNLOCK(self, p);
        if (flush_evicted(self, &ec) < 0) {
            res = NULL;
            break;
        }
        if (rc) {
            res = set_error(self->state, "expunge", rc, NULL, NULL);
            break;
        }
    }
    if (UNLIKELY(IS_LOST(self)))
        res = replaced_error(self);
    LEAVE(self);
    return res ? Py_NewRef(res) : NULL;
}

PyDoc_STRVAR(cache_clear_doc, "clear($self, /)\n--\n\nRemove every entry (no callbacks are called).");
static PyObject *cache_clear(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    return expunge_all(CacheObject_CAST(op), FMM_EXPUNGE_ALL, 0);
}

PyDoc_STRVAR(cache_purge_doc, "purge($self, /)\n--\n\nRemove expired entries and compact their pages (no callbacks).");
static PyObject *cache_purge(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    return expunge_all(CacheObject_CAST(op), FMM_EXPUNGE_EXPIRED, 0);
}

PyDoc_STRVAR(cache_empty_doc,
             "empty($self, only_expired=False)\n--\n\n"
             "Remove all entries (or only expired ones), first writing dirty entries back through\n"
             "write_cb in write-back mode (expired ones included).");
static PyObject *cache_empty(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"only_expired"};
    PyObject *a[1];
    if (parse_kw("empty", args, nargs, kwnames, names, 1, a, 1) < 0)
        return NULL;
    int only = 0;
    if (a[0] && (only = PyObject_IsTrue(a[0])) < 0)
        return NULL;
    return expunge_all(CacheObject_CAST(op), only ? FMM_EXPUNGE_EXPIRED : FMM_EXPUNGE_ALL, 1);
}

PyDoc_STRVAR(cache_expire_doc,
             "expire($self, key, /)\n--\n\n"
             "Remove key now.  In write-back mode a dirty value is first written through write_cb.");
static PyObject *cache_expire(PyObject *op, PyObject *key)
{
    CacheObject *self = CacheObject_CAST(op);
    ENTER(self);
    PyObject *res = NULL;
    keybuf k;
    if (get_key(key, &k) < 0)
        goto out;
    uint64_t h = fmm_hash(self->c, k.buf, (size_t)k.len);
    uint32_t page = fmm_page_of(self->c, h);
    if (lock_page(self, page) < 0)
        goto out;
    fmm_item it;
    evict_ctx ec = {0};
    if (fmm_get(self->c, page, h, k.buf, (uint32_t)k.len, FMM_GET_EXPIRED, &it) == 0) {
        /* recorded as an eviction is, so that a failed write-back puts it back */
        if (self->write_back && (it.flags & FMM_F_DIRTY))
            evict_collect(&ec, &it);
        if (!ec.err)
            fmm_delete(self->c, page, h, k.buf, (uint32_t)k.len, NULL);
    }
    UNLOCK(self, page);
    if (ec.err) { /* nothing was deleted */
        Py_CLEAR(ec.list);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        goto out;
    }
    if (flush_evicted(self, &ec) == 0)
        res = Py_NewRef(Py_None);
out:
    LOST_R(self, res);
    LEAVE(self);
    return res;
}

PyDoc_STRVAR(cache_touch_doc,
             "touch($self, key, expire_time=None, *, expire_on=None)\n--\n\n"
             "Give key a new expiry time without changing its value.  Return True if the key exists.");
static PyObject *cache_touch(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    CacheObject *self = CacheObject_CAST(op);
    static const char *const names[] = {"key", "expire_time", "expire_on"};
    PyObject *a[3];
    if (parse_kw("touch", args, nargs, kwnames, names, 2, a, 3) < 0)
        return NULL;
    if (!a[0])
        return PyErr_Format(PyExc_TypeError, "touch() missing required argument 'key'");
    ENTER(self);
    PyObject *res = NULL, *copy = NULL;
    keybuf k;
    uint64_t exp;
    if (get_key(a[0], &k) < 0 || resolve_expiry(self, a[1], a[2], &exp) < 0)
        goto out;
    uint64_t h = fmm_hash(self->c, k.buf, (size_t)k.len);
    uint32_t page = fmm_page_of(self->c, h);
    if (lock_page(self, page) < 0)
        goto out;
    fmm_item it;
    int found = 0, rc = 0;
    evict_ctx ec = {0};
    if (fmm_get(self->c, page, h, k.buf, (uint32_t)k.len, FMM_GET_TOUCH, &it) == 0) {
        found = 1;
        /* copy first: storing may compact the page under the old pointer */
        copy = PyBytes_FromStringAndSize(it.val, it.vlen);
        if (!copy)
            rc = -1;
        else
            rc = fmm_set_ms(self->c, page, h, k.buf, (uint32_t)k.len, PyBytes_AS_STRING(copy), it.vlen, it.flags,
                            exp, it.modseq, EVICT_FN(self), &ec); /* keeps the modseq, if any */
    }
    UNLOCK(self, page);
    if (rc > 0 || rc < -1)
        set_error(self->state, "touch", rc, NULL, NULL);
    else if (rc == 0)
        res = Py_NewRef(found ? Py_True : Py_False);
    if (flush_evicted(self, &ec) < 0)
        Py_CLEAR(res);
out:
    Py_XDECREF(copy);
    LOST_R(self, res);
    LEAVE(self);
    return res;
}

/* Collect entries for get_keys / iteration. */
typedef struct {
    PyObject *list;
    int mode; /* 0: keys; 1: (key, last_access, expire_on, flags); 2: plus raw value bytes */
    CacheObject *self;
} collect_ctx;

static int collect_visit(void *vctx, const fmm_item *it)
{
    collect_ctx *ctx = vctx;
    PyObject *key = key_object(it);
    if (!key)
        return -1;
    PyObject *item = key;
    if (ctx->mode) {
        PyObject *raw = Py_None;
        if (ctx->mode == 2) {
            raw = PyBytes_FromStringAndSize(it->val, it->vlen);
            if (!raw) {
                Py_DECREF(key);
                return -1;
            }
        } else {
            Py_INCREF(raw);
        }
        PyObject *ms = it->flags & FMM_F_MODSEQ ? PyLong_FromUnsignedLongLong(it->modseq) : Py_NewRef(Py_None);
        if (!ms) {
            Py_DECREF(key);
            Py_DECREF(raw);
            return -1;
        }
        item = Py_BuildValue("(NININN)", key, it->last_access, expire_to_py(ctx->self, it->expire_on), it->flags,
                             raw, ms);
        if (!item)
            return -1;
    }
    int r = PyList_Append(ctx->list, item);
    Py_DECREF(item);
    return r;
}

PyDoc_STRVAR(cache__entries_doc,
             "_entries($self, mode=0, /)\n--\n\n"
             "Snapshot of live entries, page by page.  mode 0: keys; 1: tuples (key, last_access, expire_on,\n"
             "flags, None, modseq or None); 2: the same with the value decoded.");

static PyObject *cache__entries(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CacheObject *self = CacheObject_CAST(op);
    int mode = 0;
    if (nargs > 1)
        return PyErr_Format(PyExc_TypeError, "_entries expected at most 1 argument");
    if (nargs == 1) {
        /* Any int out of range (one too large for a C long included) is a
         * ValueError naming the argument, not an OverflowError. */
        int overflow;
        long m = PyLong_AsLongAndOverflow(args[0], &overflow);
        if (m == -1 && PyErr_Occurred())
            return NULL;
        if (overflow || m < 0 || m > 2)
            return PyErr_Format(PyExc_ValueError, "get_keys mode must be 0, 1 or 2, not %R", args[0]);
        mode = (int)m;
    }
    ENTER(self);
    collect_ctx ctx = {PyList_New(0), mode, self};
    if (!ctx.list)
        goto error;
    uint32_t np = fmm_num_pages(self->c);
    for (uint32_t p = 0; p < np; p++) {
        if (lock_page(self, p) < 0)
            goto error;
        int rc = fmm_page_foreach(self->c, p, collect_visit, &ctx);
        UNLOCK(self, p);
        if (rc)
            goto error;
    }
    if (mode == 2) {
        /* decode values now that no lock is held */
        Py_ssize_t n = PyList_GET_SIZE(ctx.list);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *t = PyList_GET_ITEM(ctx.list, i);
            PyObject *raw = PyTuple_GET_ITEM(t, 4);
            uint32_t flags = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, 3));
            PyObject *v = decode_value(self, flags, NULL, 0, raw);
            if (!v)
                goto error;
            PyObject *nt = PyTuple_Pack(6, PyTuple_GET_ITEM(t, 0), PyTuple_GET_ITEM(t, 1), PyTuple_GET_ITEM(t, 2),
                                        PyTuple_GET_ITEM(t, 3), v, PyTuple_GET_ITEM(t, 5));
            Py_DECREF(v);
            if (!nt)
                goto error;
            PyList_SetItem(ctx.list, i, nt);
        }
    }
    LOST_R(self, ctx.list);
    LEAVE(self);
    return ctx.list;
error:
    Py_XDECREF(ctx.list);
    if (UNLIKELY(IS_LOST(self)))
        replaced_error(self);
    LEAVE(self);
    return NULL;
}

PyDoc_STRVAR(cache_get_statistics_doc,
             "get_statistics($self, clear=False)\n--\n\n"
             "Return (nreads, nreadhits) summed over all pages (counted only with enable_stats=True).\n"
             "With clear=True the counters are reset after reading.");

static PyObject *cache_get_statistics(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    CacheObject *self = CacheObject_CAST(op);
    static const char *const names[] = {"clear"};
    PyObject *a[1];
    if (parse_kw("get_statistics", args, nargs, kwnames, names, 1, a, 1) < 0)
        return NULL;
    int clear = 0;
    if (a[0] && (clear = PyObject_IsTrue(a[0])) < 0)
        return NULL;
    ENTER(self);
    unsigned long long reads = 0, hits = 0;
    PyObject *res = NULL;
    uint32_t np = fmm_num_pages(self->c);
    for (uint32_t p = 0; p < np; p++) {
        if (lock_page(self, p) < 0)
            goto out;
        fmm_page_info info;
        fmm_page_info_get(self->c, p, &info);
        reads += info.nreads;
        hits += info.nhits;
        if (clear)
            fmm_page_clear_stats(self->c, p);
        UNLOCK(self, p);
    }
    res = Py_BuildValue("(KK)", reads, hits);
out:
    LOST_R(self, res);
    LEAVE(self);
    return res;
}

/* multi_get / multi_set: keys live in the page of page_key, stored as
 * page_key + "-" + key, as in Cache::FastMmap. */
static PyObject *combined_key(PyObject *page_key, PyObject *key, int *isstr)
{
    keybuf pk, k;
    if (get_key(page_key, &pk) < 0 || get_key(key, &k) < 0)
        return NULL;
    *isstr = k.isstr;
    PyObject *b = PyBytes_FromStringAndSize(NULL, pk.len + 1 + k.len);
    if (!b)
        return NULL;
    char *d = PyBytes_AS_STRING(b);
    memcpy(d, pk.buf, pk.len);
    d[pk.len] = '-';
    memcpy(d + pk.len + 1, k.buf, k.len);
    return b;
}

static int page_of_key(CacheObject *self, PyObject *page_key, uint32_t *page)
{
    keybuf pk;
    if (get_key(page_key, &pk) < 0)
        return -1;
    *page = fmm_page_of(self->c, fmm_hash(self->c, pk.buf, (size_t)pk.len));
    return 0;
}

PyDoc_STRVAR(cache_multi_get_doc,
             "multi_get($self, page_key, keys, /)\n--\n\n"
             "Fetch several keys stored with multi_set(page_key, ...) under one page lock.\n"
             "Return a dict of the keys found.");

static PyObject *cache_multi_get(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CacheObject *self = CacheObject_CAST(op);
    if (nargs != 2)
        return PyErr_Format(PyExc_TypeError, "multi_get expected 2 arguments, got %zd", nargs);
    ENTER(self);
    PyObject *keys = NULL, *combined = NULL, *raws = NULL, *result = NULL;
    uint32_t page;
    if (page_of_key(self, args[0], &page) < 0)
        goto out;
    keys = PySequence_List(args[1]);
    if (!keys)
        goto out;
    Py_ssize_t n = PyList_GET_SIZE(keys);
    combined = PyList_New(n);
    raws = PyList_New(n);
    if (!combined || !raws)
        goto out;
    for (Py_ssize_t i = 0; i < n; i++) {
        int isstr;
        PyObject *ck = combined_key(args[0], PyList_GET_ITEM(keys, i), &isstr);
        if (!ck)
            goto out;
        PyList_SET_ITEM(combined, i, ck);
        PyList_SET_ITEM(raws, i, Py_NewRef(Py_None));
    }
    if (lock_page(self, page) < 0)
        goto out;
    int err = 0;
    for (Py_ssize_t i = 0; i < n && !err; i++) {
        PyObject *ck = PyList_GET_ITEM(combined, i);
        uint64_t h = fmm_hash(self->c, PyBytes_AS_STRING(ck), (size_t)PyBytes_GET_SIZE(ck));
        fmm_item it;
        if (fmm_get(self->c, page, h, PyBytes_AS_STRING(ck), (uint32_t)PyBytes_GET_SIZE(ck), 1, &it) == 0) {
            PyObject *t = Py_BuildValue("(Iy#)", it.flags, it.val, (Py_ssize_t)it.vlen);
            if (!t)
                err = 1;
            else
                PyList_SetItem(raws, i, t);
        }
    }
    UNLOCK(self, page);
    if (err)
        goto out;
    result = PyDict_New();
    if (!result)
        goto out;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PyList_GET_ITEM(raws, i);
        if (t == Py_None)
            continue;
        uint32_t flags = (uint32_t)PyLong_AsUnsignedLong(PyTuple_GET_ITEM(t, 0));
        PyObject *v = decode_value(self, flags, NULL, 0, PyTuple_GET_ITEM(t, 1));
        if (!v || PyDict_SetItem(result, PyList_GET_ITEM(keys, i), v) < 0) {
            Py_XDECREF(v);
            Py_CLEAR(result);
            goto out;
        }
        Py_DECREF(v);
    }
out:
    Py_XDECREF(keys);
    Py_XDECREF(combined);
    Py_XDECREF(raws);
    LOST_R(self, result);
    LEAVE(self);
    return result;
}

PyDoc_STRVAR(cache_multi_set_doc,
             "multi_set($self, page_key, mapping, expire_time=None)\n--\n\n"
             "Store every item of mapping (a mapping, or an iterable of (key, value) pairs as\n"
             "update() takes) in the page chosen by page_key, under one page lock: all of them\n"
             "or none.  Raises ItemTooLargeError, storing nothing, if one item can never fit in\n"
             "a page or the items together do not fit in the page.");

/* The (key, value) pairs of multi_set's argument, as a list of 2-tuples:
 * what dict.update() accepts, a mapping (anything with keys()) or an
 * iterable of pairs; anything else is a TypeError. */
static PyObject *batch_pairs(PyObject *arg)
{
    if (PyDict_Check(arg))
        return PyDict_Items(arg);
    PyObject *keys_m = PyObject_GetAttrString(arg, "keys");
    if (!keys_m) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
    }
    PyObject *out = PyList_New(0);
    if (!out) {
        Py_XDECREF(keys_m);
        return NULL;
    }
    PyObject *it = NULL, *item = NULL;
    if (keys_m) {
        PyObject *keys = PyObject_CallNoArgs(keys_m);
        Py_DECREF(keys_m);
        it = keys ? PyObject_GetIter(keys) : NULL;
        Py_XDECREF(keys);
        if (!it)
            goto fail;
        while ((item = PyIter_Next(it))) {
            PyObject *v = PyObject_GetItem(arg, item);
            PyObject *t = v ? PyTuple_Pack(2, item, v) : NULL;
            Py_XDECREF(v);
            Py_CLEAR(item);
            if (!t || PyList_Append(out, t) < 0) {
                Py_XDECREF(t);
                goto fail;
            }
            Py_DECREF(t);
        }
    } else {
        it = PyObject_GetIter(arg);
        if (!it) {
            if (PyErr_ExceptionMatches(PyExc_TypeError))
                PyErr_Format(PyExc_TypeError,
                             "multi_set: mapping must be a mapping or an iterable of (key, value) pairs, not %.100s",
                             Py_TYPE(arg)->tp_name);
            goto fail;
        }
        for (Py_ssize_t i = 0; (item = PyIter_Next(it)); i++) {
            PyObject *seq = PySequence_Fast(item, "");
            if (!seq || PySequence_Fast_GET_SIZE(seq) != 2) {
                if (!seq && !PyErr_ExceptionMatches(PyExc_TypeError))
                    goto fail;
                if (seq)
                    PyErr_Format(PyExc_TypeError,
                                 "multi_set: element #%zd of the pairs has length %zd, not a (key, value) pair", i,
                                 PySequence_Fast_GET_SIZE(seq));
                else
                    PyErr_Format(PyExc_TypeError,
                                 "multi_set: element #%zd of the pairs is %.100s, not a (key, value) pair", i,
                                 Py_TYPE(item)->tp_name);
                Py_XDECREF(seq);
                goto fail;
            }
            PyObject *t = PyTuple_Pack(2, PySequence_Fast_GET_ITEM(seq, 0), PySequence_Fast_GET_ITEM(seq, 1));
            Py_DECREF(seq);
            Py_CLEAR(item);
            if (!t || PyList_Append(out, t) < 0) {
                Py_XDECREF(t);
                goto fail;
            }
            Py_DECREF(t);
        }
    }
    if (PyErr_Occurred())
        goto fail;
    Py_DECREF(it);
    return out;
fail:
    Py_XDECREF(item);
    Py_XDECREF(it);
    Py_DECREF(out);
    return NULL;
}

static PyObject *cache_multi_set(PyObject *op, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    CacheObject *self = CacheObject_CAST(op);
    static const char *const names[] = {"page_key", "mapping", "expire_time"};
    PyObject *a[3];
    if (parse_kw("multi_set", args, nargs, kwnames, names, 3, a, 3) < 0)
        return NULL;
    if (!a[0] || !a[1])
        return PyErr_Format(PyExc_TypeError, "multi_set() missing required arguments");
    ENTER(self);
    PyObject *items = NULL, *prepared = NULL, *res = NULL;
    fmm_batch_item *batch = NULL;
    uint32_t page;
    uint64_t exp;
    if (page_of_key(self, a[0], &page) < 0 || resolve_expiry(self, a[2], NULL, &exp) < 0)
        goto out;
    items = batch_pairs(a[1]);
    if (!items)
        goto out;
    Py_ssize_t n = PyList_GET_SIZE(items);
    if (n > (Py_ssize_t)UINT32_MAX) {
        PyErr_SetString(self->state->ItemTooLargeError, "multi_set: too many items for one page");
        goto out;
    }
    prepared = PyList_New(n);
    batch = PyMem_Calloc(n ? (size_t)n : 1, sizeof *batch);
    if (!prepared || !batch) {
        if (!batch)
            PyErr_NoMemory();
        goto out;
    }
    /* Serialize everything before taking the lock: a serializer may fail
     * or call back into the cache, and then nothing has been stored.  The
     * engine checks the sizes, of each item and of the whole batch, with
     * the rule of every store, before it changes anything. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *kv = PyList_GET_ITEM(items, i);
        int isstr;
        PyObject *ck = combined_key(a[0], PyTuple_GET_ITEM(kv, 0), &isstr);
        if (!ck)
            goto out;
        encoded e;
        if (encode_value(self, PyTuple_GET_ITEM(kv, 1), &e) < 0) {
            Py_DECREF(ck);
            goto out;
        }
        PyObject *vb = e.owner ? Py_NewRef(e.owner) : PyBytes_FromStringAndSize(e.buf, e.len);
        Py_XDECREF(e.owner);
        PyObject *t = vb ? PyTuple_Pack(2, ck, vb) : NULL;
        Py_DECREF(ck);
        if (!t) {
            Py_XDECREF(vb);
            goto out;
        }
        PyList_SET_ITEM(prepared, i, t); /* keeps the key and value bytes alive */
        const char *vbuf = PyBytes_AS_STRING(vb);
        Py_DECREF(vb);
        PyObject *kb = PyTuple_GET_ITEM(t, 0);
        if (PyBytes_GET_SIZE(kb) > (Py_ssize_t)UINT32_MAX || e.len > (Py_ssize_t)UINT32_MAX) {
            too_big_error(self, PyTuple_GET_ITEM(kv, 0));
            goto out;
        }
        fmm_batch_item *b = &batch[i];
        b->key = PyBytes_AS_STRING(kb);
        b->klen = (uint32_t)PyBytes_GET_SIZE(kb);
        b->hash = fmm_hash(self->c, b->key, b->klen);
        b->val = vbuf;
        b->vlen = (uint32_t)e.len;
        b->flags = e.flags | (isstr ? FMM_F_KEYSTR : 0);
    }
    if (lock_page(self, page) < 0)
        goto out;
    evict_ctx ec = {0};
    uint32_t bad = 0;
    int rc = fmm_set_many(self->c, page, batch, (uint32_t)n, exp, EVICT_FN(self), &ec, &bad);
    UNLOCK(self, page);
    if (rc == FMM_ETOOBIG && bad < (uint32_t)n)
        too_big_error(self, PyTuple_GET_ITEM(PyList_GET_ITEM(items, bad), 0));
    else if (rc)
        set_error(self->state, "multi_set", rc, fmm_errdetail(self->c), NULL);
    else
        res = Py_NewRef(Py_None);
    if (flush_evicted(self, &ec) < 0)
        Py_CLEAR(res);
out:
    PyMem_Free(batch);
    Py_XDECREF(items);
    Py_XDECREF(prepared);
    LOST_R(self, res);
    LEAVE(self);
    return res;
}

PyDoc_STRVAR(cache__set_batch_fault_doc,
             "_set_batch_fault($self, k, /)\n--\n\n"
             "Crash tests: the next multi_set of this handle SIGKILLs the process once k - 1 of\n"
             "its items are stored (k = 0: off).");

static PyObject *cache__set_batch_fault(PyObject *op, PyObject *arg)
{
    CacheObject *self = CacheObject_CAST(op);
    unsigned long k = PyLong_AsUnsignedLong(arg);
    if (k == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (IS_CLOSED(self))
        return closed_error();
    fmm_set_batch_fault(self->c, (uint32_t)k);
    Py_RETURN_NONE;
}

/* ---------- Page locks held across calls (cache.lock / cache.page / Share) ----------
 * A PageLock (below) locks the page of its key; the Python context managers
 * built on it call the _held_* methods with its page number, which check
 * that this thread holds that page.  Callbacks are not run here: _held_set
 * returns what the caller must write back once unlocked. */

static int held_key(CacheObject *self, PyObject *pageobj, PyObject *key, PyObject *page_key, uint32_t *page,
                    PyObject **owner, keybuf *k)
{
    unsigned long p = PyLong_AsUnsignedLong(pageobj);
    if (p == (unsigned long)-1 && PyErr_Occurred())
        return -1;
    if (UNLIKELY(IS_LOST(self))) {
        replaced_error(self);
        return -1;
    }
    if (p >= fmm_num_pages(self->c) || !fmm_held(self->c, (uint32_t)p)) {
        PyErr_Format(self->state->Error, "page %lu is not locked by this thread (lock block already exited?)", p);
        return -1;
    }
    *page = (uint32_t)p;
    *owner = NULL;
    if (page_key == Py_None) {
        if (get_key(key, k) < 0)
            return -1;
        if (fmm_page_of(self->c, fmm_hash(self->c, k->buf, (size_t)k->len)) != *page) {
            PyErr_SetString(PyExc_ValueError, "key does not belong to the locked page");
            return -1;
        }
        return 0;
    }
    int isstr;
    PyObject *ck = combined_key(page_key, key, &isstr);
    if (!ck)
        return -1;
    *owner = ck;
    k->buf = PyBytes_AS_STRING(ck);
    k->len = PyBytes_GET_SIZE(ck);
    k->isstr = isstr;
    return 0;
}

static PyObject *cache__held_get(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CacheObject *self = CacheObject_CAST(op);
    if (nargs != 4)
        return PyErr_Format(PyExc_TypeError, "_held_get(page, key, page_key, default)");
    if (!self->c)
        return closed_error();
    uint32_t page;
    PyObject *owner, *raw = NULL, *r = NULL;
    keybuf k;
    if (held_key(self, args[0], args[1], args[2], &page, &owner, &k) < 0)
        return NULL;
    fmm_item it;
    int err = 0;
    if (fmm_get(self->c, page, fmm_hash(self->c, k.buf, (size_t)k.len), k.buf, (uint32_t)k.len, FMM_GET_TOUCH,
                &it) == 0) {
        r = value_under_lock(&it, &raw, &err);
        if (raw)
            r = decode_raw(self, it.flags, raw);
    } else {
        r = Py_NewRef(args[3]);
    }
    Py_XDECREF(owner);
    LOST_R(self, r);
    return r;
}

static PyObject *cache__held_set(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CacheObject *self = CacheObject_CAST(op);
    if (nargs != 5)
        return PyErr_Format(PyExc_TypeError, "_held_set(page, key, page_key, value, expire_time)");
    if (!self->c)
        return closed_error();
    uint32_t page;
    uint64_t exp;
    PyObject *owner, *res = NULL;
    keybuf k;
    encoded e = {0};
    evict_ctx ec = {0};
    if (held_key(self, args[0], args[1], args[2], &page, &owner, &k) < 0)
        return NULL;
    if (resolve_expiry(self, args[4], NULL, &exp) < 0 || encode_value(self, args[3], &e) < 0)
        goto out;
    int rc = FMM_ETOOBIG;
    if (e.len <= (Py_ssize_t)UINT32_MAX)
        rc = fmm_set(self->c, page, fmm_hash(self->c, k.buf, (size_t)k.len), k.buf, (uint32_t)k.len, e.buf,
                     (uint32_t)e.len,
                     e.flags | (k.isstr ? FMM_F_KEYSTR : 0) | (self->write_back && args[2] == Py_None ? FMM_F_DIRTY : 0),
                     exp, EVICT_FN(self), &ec);
    if (ec.err) {
        PyErr_NoMemory();
        goto out;
    }
    if (rc && rc != FMM_ETOOBIG && rc != FMM_EREFUSED) {
        /* (FMM_EBADARG: the serializer forked, and this is the child) */
        set_error(self->state, "set", rc, fmm_errdetail(self->c), NULL);
        goto out;
    }
    /* stored: True, too big: False, refused by a tombstone: None */
    res = Py_BuildValue("(ONO)", rc == 0 ? Py_True : rc == FMM_ETOOBIG ? Py_False : Py_None,
                        expire_to_py(self, exp), ec.list ? ec.list : Py_None);
    LOST_R(self, res);
out:
    Py_XDECREF(ec.list);
    Py_XDECREF(e.owner);
    Py_XDECREF(owner);
    return res;
}

static PyObject *cache__held_delete(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CacheObject *self = CacheObject_CAST(op);
    if (nargs != 3)
        return PyErr_Format(PyExc_TypeError, "_held_delete(page, key, page_key)");
    if (!self->c)
        return closed_error();
    uint32_t page;
    PyObject *owner;
    keybuf k;
    if (held_key(self, args[0], args[1], args[2], &page, &owner, &k) < 0)
        return NULL;
    int rc = fmm_delete(self->c, page, fmm_hash(self->c, k.buf, (size_t)k.len), k.buf, (uint32_t)k.len, NULL);
    Py_XDECREF(owner);
    if (UNLIKELY(IS_LOST(self)))
        return replaced_error(self);
    return Py_NewRef(rc == 0 ? Py_True : Py_False);
}

static PyObject *cache__flush_evicted(PyObject *op, PyObject *list)
{
    CacheObject *self = CacheObject_CAST(op);
    if (list == Py_None)
        Py_RETURN_NONE;
    if (!PyList_Check(list))
        return PyErr_Format(PyExc_TypeError, "_flush_evicted expects a list");
    evict_ctx ec = {Py_NewRef(list), 0};
    if (flush_evicted(self, &ec) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ---------- PageLock: a page lock held across calls ----------
 * The lock of a `with cache.lock(key)` / `cache.page(pk)` block or a Share
 * is taken and recorded in one C call, and released in one: no Python code
 * runs between the moment the page is locked and the moment this object
 * says it holds it, nor between the decision to release and the unlock.
 * Python code run there (a signal handler at a bytecode boundary, say a
 * KeyboardInterrupt or a SIGALRM timeout) could otherwise raise with the
 * page locked and nothing left to unlock it: the thread would hit
 * RecursiveLockError on every later call and every other process would
 * wait on that page until this one exited.
 *
 * The remaining ways for Python code to run with the page held are all
 * covered:
 *   - a signal that arrived while acquire() waited (GIL released): its
 *     handler runs in acquire(), and if it raises the page is released
 *     before acquire() returns;
 *   - __enter__ and __exit__ are these C functions, so the `with`
 *     statement calls no Python code between taking the lock and entering
 *     the block's protected range (BEFORE_WITH does not run signal
 *     handlers);
 *   - a PageLock that dies still holding its page (an exception escaped
 *     between a plain acquire() and the caller's try, or Python versions
 *     that check for signals after __enter__) releases it when finalized;
 *     in another thread (a garbage-collected cycle) it leaves the page to
 *     its holding thread, which releases it at its next lock of this cache
 *     or at close();
 *   - close() releases the pages this thread holds through PageLocks.
 * A lock inherited by a forked child stays with the parent: the child's
 * release forgets it without unlocking. */

#define PageLock_CAST(op) ((PageLockObject *)(op))

static void holders_link(CacheObject *c, PageLockObject *lk)
{
    LISTS_LOCK(c);
    lk->prev = NULL;
    lk->next = c->holders;
    if (c->holders)
        c->holders->prev = lk;
    c->holders = lk;
    LISTS_UNLOCK(c);
}

static void holders_unlink(CacheObject *c, PageLockObject *lk)
{
    LISTS_LOCK(c);
    if (lk->prev)
        lk->prev->next = lk->next;
    else if (c->holders == lk)
        c->holders = lk->next;
    if (lk->next)
        lk->next->prev = lk->prev;
    lk->next = lk->prev = NULL;
    LISTS_UNLOCK(c);
}

/* Stop holding (depth to 0) and unlock if this is the holding process.
 * Returns the engine's unlock code (0 when nothing was unlocked).  The
 * caller must not use `c` afterwards: LEAVE may free its handle. */
static int pagelock_drop(PageLockObject *lk, int unlock)
{
    CacheObject *c = CacheObject_CAST(lk->cache);
    lk->depth = 0;
    holders_unlink(c, lk);
    int rc = unlock ? UNLOCK(c, lk->page) : 0;
    if (rc == FMM_EREPLACED)
        replaced_error(c);
    else if (rc)
        set_error(c->state, "unlock", rc, c->c ? fmm_errdetail(c->c) : NULL, NULL);
    LEAVE(c); /* pairs with the op_enter of pagelock_acquire */
    return rc;
}

static int pagelock_acquire(PageLockObject *lk)
{
    if (!lk->cache)
        return PyErr_SetString(PyExc_TypeError, "PageLock.__init__() was not called"), -1;
    CacheObject *c = CacheObject_CAST(lk->cache);
    unsigned long me = PyThread_get_thread_ident();
    pid_t pid = getpid();
    if (lk->depth > 0 && lk->pid != pid)
        pagelock_drop(lk, 0); /* inherited across fork: the parent's */
    if (lk->depth > 0) {
        if (lk->reentrant && lk->thread == me) {
            lk->depth++;
            return 0;
        }
        if (!lk->reentrant) {
            PyErr_SetString(c->state->Error, "this lock block is already active");
            return -1;
        }
        /* a Share held by another thread: wait for the page like anyone */
    }
    keybuf k;
    if (get_key(lk->key, &k) < 0)
        return -1;
    if (op_enter(c) < 0) /* held until pagelock_drop's LEAVE */
        return -1;
    uint32_t page = fmm_page_of(c->c, fmm_hash(c->c, k.buf, (size_t)k.len));
    if (lock_page(c, page) < 0) {
        LEAVE(c);
        return -1;
    }
    /* Locked: record it before anything can run Python code. */
    lk->depth = 1;
    lk->closed_out = 0;
    lk->page = page;
    lk->thread = me;
    lk->pid = pid;
    holders_link(c, lk);
    /* A signal that arrived during the wait runs its handler now; if that
     * raises, the caller never learns it held the page, so release it. */
    if (PyErr_CheckSignals() < 0) {
        PyObject *exc = PyErr_GetRaisedException();
        pagelock_drop(lk, 1);
        PyErr_SetRaisedException(exc); /* the handler's exception wins */
        return -1;
    }
    return 0;
}

/* 1 if the page was unlocked, 0 if still held (nested) or left to the
 * parent (a forked child), -1 on error. */
static int pagelock_release(PageLockObject *lk)
{
    if (lk->depth > 0 && lk->pid != getpid()) {
        /* a child forked while the lock was held: the lock stays with the
         * parent; leaving the block here only forgets it */
        if (--lk->depth == 0)
            pagelock_drop(lk, 0);
        return 0;
    }
    if (lk->depth == 0 && lk->closed_out) {
        lk->closed_out = 0; /* close() already released it */
        return 0;
    }
    if (lk->depth == 0 || lk->thread != PyThread_get_thread_ident()) {
        PyErr_SetString(lk->cache ? CacheObject_CAST(lk->cache)->state->Error : PyExc_RuntimeError,
                        "unlock without lock in this thread");
        return -1;
    }
    if (--lk->depth > 0)
        return 0;
    return pagelock_drop(lk, 1) ? -1 : 1;
}

/* close(): release the pages this thread holds through PageLocks (and
 * orphans), so that a lock block still open, or one whose exit never ran,
 * does not keep the page locked in the file. */
static void release_thread_locks(CacheObject *self)
{
    unsigned long me = PyThread_get_thread_ident();
    pid_t pid = getpid();
    PyObject *exc = PyErr_GetRaisedException();
    for (;;) {
        /* one at a time, the list searched afresh: other threads may link
         * and unlink their own holders meanwhile */
        LISTS_LOCK(self);
        PageLockObject *lk = self->holders;
        while (lk && !(lk->pid != pid || lk->thread == me))
            lk = lk->next;
        LISTS_UNLOCK(self);
        if (!lk)
            break;
        int unlock = lk->pid == pid; /* else inherited across fork: the parent's */
        lk->closed_out = 1;
        op_hold(self); /* pagelock_drop's LEAVE must not close under us */
        pagelock_drop(lk, unlock);
        op_unhold(self);
        PyErr_Clear(); /* closing: a truncated file is no news */
    }
    if (self->orphans) {
        op_hold(self);
        release_orphans(self);
        op_unhold(self);
    }
    PyErr_SetRaisedException(exc);
}

static PyObject *cache__release_locks(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    release_thread_locks(CacheObject_CAST(op));
    Py_RETURN_NONE;
}

static int pagelock_init(PyObject *op, PyObject *args, PyObject *kwds)
{
    PageLockObject *lk = PageLock_CAST(op);
    static char *kwlist[] = {"", "", "reentrant", NULL};
    PyObject *cache, *key;
    int reentrant = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO|p:PageLock", kwlist, &cache, &key, &reentrant))
        return -1;
    PyObject *mod = PyType_GetModuleByDef(Py_TYPE(op), &fastmmap_module);
    if (!mod)
        return -1;
    fastmmap_state *mst = PyModule_GetState(mod);
    if (!PyObject_TypeCheck(cache, mst->CacheBase_Type)) {
        PyErr_Format(PyExc_TypeError, "PageLock: cache must be a fastmmap cache, not %.100s", Py_TYPE(cache)->tp_name);
        return -1;
    }
    keybuf k;
    if (get_key(key, &k) < 0)
        return -1;
    if (lk->depth > 0) {
        PyErr_SetString(mst->Error, "PageLock.__init__() on a held lock");
        return -1;
    }
    Py_XSETREF(lk->cache, Py_NewRef(cache));
    Py_XSETREF(lk->key, Py_NewRef(key));
    lk->reentrant = reentrant;
    return 0;
}

static PyObject *pagelock__acquire(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    if (pagelock_acquire(PageLock_CAST(op)) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *pagelock__release(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    if (pagelock_release(PageLock_CAST(op)) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *pagelock_enter(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    if (pagelock_acquire(PageLock_CAST(op)) < 0)
        return NULL;
    return Py_NewRef(op);
}

/* __exit__: release, then (once the page is unlocked, or forgotten in a
 * forked child) call the subclass's _after_exit(released) hook, where
 * LockedEntry/LockedPage run the callbacks they deferred. */
static PyObject *pagelock_exit(PyObject *op, PyObject *const *Py_UNUSED(args), Py_ssize_t Py_UNUSED(nargs))
{
    PageLockObject *lk = PageLock_CAST(op);
    int nested = lk->depth > 1 && lk->pid == getpid();
    int r = pagelock_release(lk);
    if (r < 0)
        return NULL;
    if (!nested) {
        PyObject *hook = PyObject_GetAttrString(op, "_after_exit");
        if (!hook) {
            if (!PyErr_ExceptionMatches(PyExc_AttributeError))
                return NULL;
            PyErr_Clear();
        } else {
            PyObject *res = PyObject_CallOneArg(hook, r ? Py_True : Py_False);
            Py_DECREF(hook);
            if (!res)
                return NULL;
            Py_DECREF(res);
        }
    }
    Py_RETURN_FALSE;
}

static PyObject *pagelock__held(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    PageLockObject *lk = PageLock_CAST(op);
    return PyBool_FromLong(lk->depth > 0 && lk->thread == PyThread_get_thread_ident() && lk->pid == getpid());
}

static PyObject *pagelock_get_page(PyObject *op, void *Py_UNUSED(closure))
{
    PageLockObject *lk = PageLock_CAST(op);
    if (lk->depth == 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(lk->page);
}

/* A PageLock that dies holding its page releases it (see above). */
static void pagelock_finalize(PyObject *op)
{
    PageLockObject *lk = PageLock_CAST(op);
    if (lk->depth == 0 || !lk->cache)
        return;
    PyObject *exc = PyErr_GetRaisedException();
    CacheObject *c = CacheObject_CAST(lk->cache);
    if (lk->pid != getpid()) {
        pagelock_drop(lk, 0);
    } else if (lk->thread == PyThread_get_thread_ident()) {
        pagelock_drop(lk, 1);
    } else {
        orphan_lock *o = PyMem_Malloc(sizeof *o);
        if (o) {
            /* the orphan takes over the held page and its inflight share */
            o->thread = lk->thread;
            o->pid = lk->pid;
            o->page = lk->page;
            LISTS_LOCK(c);
            o->next = c->orphans;
            c->orphans = o;
            LISTS_UNLOCK(c);
            lk->depth = 0;
            holders_unlink(c, lk);
        } else {
            lk->depth = 0;
            holders_unlink(c, lk);
            LEAVE(c);
        }
    }
    PyErr_Clear(); /* nobody to report an unlock error to */
    PyErr_SetRaisedException(exc);
}

static int pagelock_traverse(PyObject *op, visitproc visit, void *arg)
{
    PageLockObject *lk = PageLock_CAST(op);
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(lk->cache);
    Py_VISIT(lk->key);
    return 0;
}

static int pagelock_clear(PyObject *op)
{
    PageLockObject *lk = PageLock_CAST(op);
    if (lk->depth == 0) /* a held lock needs its cache to release it */
        Py_CLEAR(lk->cache);
    Py_CLEAR(lk->key);
    return 0;
}

static void pagelock_dealloc(PyObject *op)
{
    PyTypeObject *tp = Py_TYPE(op);
    if (PyObject_CallFinalizerFromDealloc(op) < 0)
        return; /* resurrected */
    PyObject_GC_UnTrack(op);
    PageLockObject *lk = PageLock_CAST(op);
    if (lk->depth > 0 && lk->cache) /* not finalized (should not happen): do not leave it linked */
        holders_unlink(CacheObject_CAST(lk->cache), lk);
    lk->depth = 0;
    pagelock_clear(op);
    tp->tp_free(op);
    Py_DECREF(tp);
}

static PyMethodDef pagelock_methods[] = {
    {"_acquire", pagelock__acquire, METH_NOARGS,
     "_acquire($self, /)\n--\n\nLock the page (waiting for other holders); nests if reentrant."},
    {"_release", pagelock__release, METH_NOARGS, "_release($self, /)\n--\n\nUndo one _acquire()."},
    {"_held", pagelock__held, METH_NOARGS, "_held($self, /)\n--\n\nTrue if this thread holds the lock."},
    {"__enter__", pagelock_enter, METH_NOARGS, "__enter__($self, /)\n--\n\nLock the page; return self."},
    {"__exit__", (PyCFunction)(void (*)(void))pagelock_exit, METH_FASTCALL,
     "__exit__($self, /, *exc)\n--\n\nUnlock the page (then call self._after_exit(released) if defined)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pagelock_getset[] = {
    {"_page", pagelock_get_page, NULL, "The locked page's number, or None when not held.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(pagelock_doc, "PageLock(cache, key, /, reentrant=False)\n--\n\n"
                           "The lock of key's page, held across calls: the base of LockedEntry, LockedPage\n"
                           "and Share.  Taken and recorded in one C call, released when its holder leaves\n"
                           "the with block, when it is garbage-collected, or when the cache is closed.");

static PyType_Slot pagelock_slots[] = {
    {Py_tp_doc, (void *)pagelock_doc},
    {Py_tp_new, PyType_GenericNew},
    {Py_tp_init, pagelock_init},
    {Py_tp_finalize, pagelock_finalize},
    {Py_tp_dealloc, pagelock_dealloc},
    {Py_tp_traverse, pagelock_traverse},
    {Py_tp_clear, pagelock_clear},
    {Py_tp_methods, pagelock_methods},
    {Py_tp_getset, pagelock_getset},
    {0, NULL},
};

static PyType_Spec pagelock_spec = {
    .name = "fastmmap._fastmmap.PageLock",
    .basicsize = sizeof(PageLockObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = pagelock_slots,
};


/* Set an option or callback field to obj (None: NULL), in a critical
 * section on self.  The object it replaces is kept in self->retired until
 * self dies, not released: another thread may be calling it right now
 * through a borrowed pointer (in parallel without the GIL, or in Python
 * code that let this thread run).  Only reconfiguring with new objects
 * grows the list. */
static int swap_opt(CacheObject *self, PyObject **field, PyObject *obj)
{
    PyObject *old = *field, *new = obj == Py_None ? NULL : obj;
    if (old == new)
        return 0;
    if (old) {
        if (!self->retired && !(self->retired = PyList_New(0)))
            return -1;
        if (PyList_Append(self->retired, old) < 0)
            return -1;
    }
    __atomic_store_n(field, Py_XNewRef(new), __ATOMIC_RELEASE);
    Py_XDECREF(old);
    return 0;
}

static PyObject *cache__set_callbacks(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CacheObject *self = CacheObject_CAST(op);
    if (nargs != 7)
        return PyErr_Format(PyExc_TypeError,
                            "_set_callbacks(context, read_cb, write_cb, delete_cb, write_back, cache_not_found, "
                            "allow_recursive)");
    int flags[3];
    for (int i = 0; i < 3; i++)
        if ((flags[i] = PyObject_IsTrue(args[4 + i])) < 0)
            return NULL;
    int rc = -1;
    Py_BEGIN_CRITICAL_SECTION(op);
    if (swap_opt(self, &self->context, args[0]) == 0 && swap_opt(self, &self->read_cb, args[1]) == 0 &&
        swap_opt(self, &self->write_cb, args[2]) == 0 && swap_opt(self, &self->delete_cb, args[3]) == 0) {
        self->write_back = flags[0];
        self->cache_not_found = flags[1];
        self->allow_recursive = flags[2];
        rc = 0;
    }
    Py_END_CRITICAL_SECTION();
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(cache_repaired_pages_doc,
             "repaired_pages($self, /)\n--\n\n"
             "Number of pages of this cache file re-initialised after a writer died mid-update or a page\n"
             "failed validation (counted in the file, by every process).");

static PyObject *cache_repaired_pages(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    CacheObject *self = CacheObject_CAST(op);
    ENTER(self);
    PyObject *r = PyLong_FromUnsignedLongLong(fmm_repairs(self->c));
    LOST_R(self, r);
    LEAVE(self);
    return r;
}

PyDoc_STRVAR(cache_check_doc,
             "check($self, /)\n--\n\n"
             "Validate every page and the file itself.  Return a list of the problems found (empty when\n"
             "all is well).  A page whose header fails validation when it is locked is re-initialised\n"
             "(as by any operation) and reported; other problems are only reported.");

static PyObject *cache_check(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    CacheObject *self = CacheObject_CAST(op);
    ENTER(self);
    PyObject *problems = PyList_New(0);
    if (!problems)
        goto out;
    int frc = fmm_check_file(self->c);
    if (frc) {
        PyObject *m = PyUnicode_FromFormat("file: %s", fmm_strerror(frc));
        if (!m || PyList_Append(problems, m) < 0) {
            Py_XDECREF(m);
            Py_CLEAR(problems);
            goto out;
        }
        Py_DECREF(m);
    }
    uint32_t np = fmm_num_pages(self->c);
    for (uint32_t p = 0; p < np; p++) {
        uint64_t before = fmm_repairs(self->c);
        if (lock_page(self, p) < 0) {
            Py_CLEAR(problems);
            goto out;
        }
        char msg[256];
        int rc = 0;
        if (fmm_repairs(self->c) != before) {
            /* locking found the page invalid and re-initialised it */
            snprintf(msg, sizeof msg, "%s", fmm_errdetail(self->c));
            rc = FMM_ECORRUPT;
        } else {
            rc = fmm_check_page(self->c, p, msg, sizeof msg);
        }
        UNLOCK(self, p);
        if (rc) {
            PyObject *m = PyUnicode_FromString(msg);
            if (!m || PyList_Append(problems, m) < 0) {
                Py_XDECREF(m);
                Py_CLEAR(problems);
                goto out;
            }
            Py_DECREF(m);
        }
    }
out:
    LOST_R(self, problems);
    LEAVE(self);
    return problems;
}

PyDoc_STRVAR(cache__page_info_doc,
             "_page_info($self, page, /)\n--\n\n"
             "Counters of one page: dict with num_slots, live, expired, tombstones, deleted, data_start,\n"
             "free_data, live_bytes, nreads, nhits.");

static PyObject *cache__page_info(PyObject *op, PyObject *arg)
{
    CacheObject *self = CacheObject_CAST(op);
    unsigned long p = PyLong_AsUnsignedLong(arg);
    if (p == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    ENTER(self);
    PyObject *r = NULL;
    if (p >= fmm_num_pages(self->c)) {
        PyErr_Format(PyExc_IndexError, "page %lu out of range", p);
        goto out;
    }
    if (lock_page(self, (uint32_t)p) < 0)
        goto out;
    fmm_page_info i;
    fmm_page_info_get(self->c, (uint32_t)p, &i);
    UNLOCK(self, (uint32_t)p);
    r = Py_BuildValue("{sIsIsIsIsIsIsIsIsIsI}", "num_slots", i.num_slots, "live", i.live, "expired", i.expired,
                      "tombstones", i.tombstones, "deleted", i.deleted, "data_start", i.data_start, "free_data", i.free_data, "live_bytes",
                      i.live_bytes, "nreads", i.nreads, "nhits", i.nhits);
out:
    LOST_R(self, r);
    LEAVE(self);
    return r;
}

PyDoc_STRVAR(cache__set_time_override_doc,
             "_set_time_override($self, t, /)\n--\n\n"
             "Use unix seconds t (an int, or a float in the native format: milliseconds count) as the\n"
             "current time for this Cache (0 restores the real clock).  For tests.");

static PyObject *cache__set_time_override(PyObject *op, PyObject *arg)
{
    CacheObject *self = CacheObject_CAST(op);
    double t = PyFloat_AsDouble(arg);
    if (t == -1 && PyErr_Occurred())
        return NULL;
    if (!self->c)
        return closed_error();
    t = floor(t * fmm_time_unit(self->c));
    if (!(t >= 0 && t <= (double)max_expire(self)))
        return PyErr_Format(PyExc_ValueError, "time override out of range");
    ENTER(self);
    fmm_set_time(self->c, (uint64_t)t);
    LEAVE(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(cache__open_doc,
             "_open($self, path, page_size, num_pages, start_slots, explicit_geometry, init_file,\n"
             "      permissions, anonymous, enable_stats, format=0, perl_value_flags=0, /)\n--\n\n"
             "Open or create the cache file (options already validated by fastmmap.Cache).  Return True if\n"
             "this call created the file.  format 1 is Cache::FastMmap's file format.");

static PyObject *cache__open(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CacheObject *self = CacheObject_CAST(op);
    if (nargs != 9 && nargs != 11)
        return PyErr_Format(PyExc_TypeError, "_open expected 9 or 11 arguments");
    if (self->c || CLOSED_FLAG(self))
        return PyErr_Format(PyExc_ValueError, "cache is already open");
    PyObject *path = args[0];
    PyObject *path_bytes = NULL;
    fmm_config cfg;
    memset(&cfg, 0, sizeof cfg);
    unsigned long v[8];
    for (int i = 0; i < 8; i++) {
        v[i] = PyLong_AsUnsignedLong(args[i + 1]);
        if (v[i] == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
    }
    cfg.page_size = (uint32_t)v[0];
    cfg.num_pages = (uint32_t)v[1];
    cfg.start_slots = (uint32_t)v[2];
    cfg.explicit_geometry = (int)v[3];
    cfg.init_file = (int)v[4];
    cfg.permissions = (int)v[5];
    cfg.anonymous = (int)v[6];
    cfg.enable_stats = (int)v[7];
    if (nargs == 11) {
        /* format (0 native, 1 perl) and the Perl format's plain-value flags */
        unsigned long fmt = PyLong_AsUnsignedLong(args[9]);
        unsigned long pvf = PyLong_AsUnsignedLong(args[10]);
        if (PyErr_Occurred())
            return NULL;
        cfg.format = (int)fmt;
        cfg.perl_value_flags = (uint32_t)pvf;
    }
    const char *cpath = NULL;
    if (!cfg.anonymous) {
        if (!PyUnicode_FSConverter(path, &path_bytes))
            return NULL;
        cpath = PyBytes_AS_STRING(path_bytes);
    }
    char err[512];
    int created = 0, rc;
    fmm_cache *c = NULL;
    /* GIL released: no page lock held, open/mmap/fallocate may block. */
    Py_BEGIN_ALLOW_THREADS
    rc = fmm_open(cpath, &cfg, &c, &created, err, sizeof err);
    Py_END_ALLOW_THREADS
    Py_XDECREF(path_bytes);
    if (rc) {
        if (rc > 0 && !cfg.anonymous)
            return set_error(self->state, "open", rc, err, path);
        if (rc == FMM_EBADARG)
            return PyErr_Format(PyExc_ValueError, "%s", err);
        if (rc == FMM_EBADFILE || rc == FMM_EGEOMETRY)
            return PyErr_Format(rc == FMM_EBADFILE ? self->state->BadFileError : self->state->GeometryError,
                                "%S: %s", path, err);
        if (rc == FMM_EUNTRUSTED) {
            /* a PermissionError too: (errno, message, filename) sets its
             * errno and filename attributes like any refused open */
            PyObject *args = Py_BuildValue("(isO)", EACCES, err, path);
            if (args) {
                PyErr_SetObject(self->state->UntrustedFileError, args);
                Py_DECREF(args);
            }
            return NULL;
        }
        return set_error(self->state, "open", rc, err, NULL);
    }
    int raced = 0;
    Py_BEGIN_CRITICAL_SECTION(op);
    /* another thread's _open or close() ran while this one was opening */
    raced = self->c || CLOSED_FLAG(self);
    if (!raced) {
        self->lost = fmm_lost_flag(c);
        self->probe = fmm_probe_addr(c);
        self->perl = cfg.format == FMM_FORMAT_PERL;
        /* last: other threads take a non-NULL c as open */
        __atomic_store_n(&self->c, c, __ATOMIC_RELEASE);
    }
    Py_END_CRITICAL_SECTION();
    if (raced) {
        fmm_close(c);
        return PyErr_Format(PyExc_ValueError, "cache is already open");
    }
    return Py_NewRef(created ? Py_True : Py_False);
}

PyDoc_STRVAR(cache__configure_doc,
             "_configure($self, default_expire, lock_timeout, ser_type, dumps, loads, comp_type, compress,\n"
             "           decompress, compress_threshold, parse_expire, tombstone_expire, /)\n--\n\n"
             "Set value handling options (already validated by fastmmap.Cache).");

static PyObject *cache__configure(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    CacheObject *self = CacheObject_CAST(op);
    if (nargs != 11)
        return PyErr_Format(PyExc_TypeError, "_configure expected 11 arguments");
    long long de = PyLong_AsLongLong(args[0]);
    if (de == -1 && PyErr_Occurred())
        return NULL;
    long long te = de; /* tombstone_expire None: the default expiry */
    if (args[10] != Py_None) {
        te = PyLong_AsLongLong(args[10]);
        if (te == -1 && PyErr_Occurred())
            return NULL;
    }
    double lt = -1;
    if (args[1] != Py_None) {
        lt = PyFloat_AsDouble(args[1]);
        if (lt == -1 && PyErr_Occurred())
            return NULL;
    }
    unsigned long ser = PyLong_AsUnsignedLong(args[2]);
    unsigned long comp = PyLong_AsUnsignedLong(args[5]);
    Py_ssize_t thr = PyLong_AsSsize_t(args[8]);
    if (PyErr_Occurred())
        return NULL;
    int rc = -1;
    Py_BEGIN_CRITICAL_SECTION(op);
    if (swap_opt(self, &self->dumps, args[3]) == 0 && swap_opt(self, &self->loads, args[4]) == 0 &&
        swap_opt(self, &self->compress, args[6]) == 0 && swap_opt(self, &self->decompress, args[7]) == 0 &&
        swap_opt(self, &self->parse_expire, args[9]) == 0) {
        self->default_expire = de;
        self->tombstone_expire = te;
        self->lock_timeout_ns = lt < 0 ? -1 : (int64_t)(lt * 1e9);
        self->ser_type = (uint32_t)ser;
        self->comp_type = (uint32_t)comp;
        self->compress_threshold = thr;
        rc = 0;
    }
    Py_END_CRITICAL_SECTION();
    if (rc < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyDoc_STRVAR(cache_close_doc, "close($self, /)\n--\n\n"
                              "Unmap the cache.  Idempotent; later operations raise ValueError.");

static PyObject *cache_close(PyObject *op, PyObject *Py_UNUSED(ignored))
{
    CacheObject *self = CacheObject_CAST(op);
    release_thread_locks(self);
    op_close(self);
    Py_RETURN_NONE;
}

/* ---------- Getters ---------- */

static PyObject *cache_get_closed(PyObject *op, void *Py_UNUSED(closure))
{
    return Py_NewRef(IS_CLOSED(CacheObject_CAST(op)) ? Py_True : Py_False);
}
static PyObject *cache_get_page_size(PyObject *op, void *Py_UNUSED(closure))
{
    CacheObject *self = CacheObject_CAST(op);
    if (!self->c)
        return closed_error();
    return PyLong_FromUnsignedLong(fmm_page_size(self->c));
}
static PyObject *cache_get_num_pages(PyObject *op, void *Py_UNUSED(closure))
{
    CacheObject *self = CacheObject_CAST(op);
    if (!self->c)
        return closed_error();
    return PyLong_FromUnsignedLong(fmm_num_pages(self->c));
}
static PyObject *cache_get_cache_size(PyObject *op, void *Py_UNUSED(closure))
{
    CacheObject *self = CacheObject_CAST(op);
    if (!self->c)
        return closed_error();
    return PyLong_FromUnsignedLongLong((unsigned long long)fmm_page_size(self->c) * fmm_num_pages(self->c));
}
static PyObject *cache_get_max_item_size(PyObject *op, void *Py_UNUSED(closure))
{
    CacheObject *self = CacheObject_CAST(op);
    if (!self->c)
        return closed_error();
    return PyLong_FromUnsignedLong(fmm_max_item(self->c) - FMM_ENTRY_HEADER_SIZE);
}

static PyGetSetDef cache_getset[] = {
    {"closed", cache_get_closed, NULL, "True once close() was called.", NULL},
    {"page_size", cache_get_page_size, NULL, "Bytes per page.", NULL},
    {"num_pages", cache_get_num_pages, NULL, "Number of pages.", NULL},
    {"cache_size", cache_get_cache_size, NULL, "page_size * num_pages.", NULL},
    {"max_item_size", cache_get_max_item_size, NULL,
     "Largest len(key) + len(stored value) that fits in a page (values as stored: serialized, compressed).",
     NULL},
    {NULL},
};

static PyMethodDef cache_methods[] = {
    {"get", (PyCFunction)(void (*)(void))cache_get, METH_FASTCALL, cache_get_doc},
    {"set", (PyCFunction)(void (*)(void))cache_set, METH_FASTCALL | METH_KEYWORDS, cache_set_doc},
    {"exists", cache_exists, METH_O, cache_exists_doc},
    {"remove", (PyCFunction)(void (*)(void))cache_remove, METH_FASTCALL | METH_KEYWORDS, cache_remove_doc},
    {"get_modseq", cache_get_modseq, METH_O, cache_get_modseq_doc},
    {"get_and_set", (PyCFunction)(void (*)(void))cache_get_and_set, METH_FASTCALL | METH_KEYWORDS,
     cache_get_and_set_doc},
    {"get_and_remove", (PyCFunction)(void (*)(void))cache_get_and_remove, METH_FASTCALL, cache_get_and_remove_doc},
    {"add", (PyCFunction)(void (*)(void))cache_add, METH_FASTCALL | METH_KEYWORDS, cache_add_doc},
    {"clear", cache_clear, METH_NOARGS, cache_clear_doc},
    {"empty", (PyCFunction)(void (*)(void))cache_empty, METH_FASTCALL | METH_KEYWORDS, cache_empty_doc},
    {"expire", cache_expire, METH_O, cache_expire_doc},
    {"touch", (PyCFunction)(void (*)(void))cache_touch, METH_FASTCALL | METH_KEYWORDS, cache_touch_doc},
    {"purge", cache_purge, METH_NOARGS, cache_purge_doc},
    {"_entries", (PyCFunction)(void (*)(void))cache__entries, METH_FASTCALL, cache__entries_doc},
    {"get_statistics", (PyCFunction)(void (*)(void))cache_get_statistics, METH_FASTCALL | METH_KEYWORDS,
     cache_get_statistics_doc},
    {"multi_get", (PyCFunction)(void (*)(void))cache_multi_get, METH_FASTCALL, cache_multi_get_doc},
    {"multi_set", (PyCFunction)(void (*)(void))cache_multi_set, METH_FASTCALL | METH_KEYWORDS,
     cache_multi_set_doc},
    {"repaired_pages", cache_repaired_pages, METH_NOARGS, cache_repaired_pages_doc},
    {"_set_batch_fault", cache__set_batch_fault, METH_O, cache__set_batch_fault_doc},
    {"check", cache_check, METH_NOARGS, cache_check_doc},
    {"_page_info", cache__page_info, METH_O, cache__page_info_doc},
    {"_set_time_override", cache__set_time_override, METH_O, cache__set_time_override_doc},
    {"_open", (PyCFunction)(void (*)(void))cache__open, METH_FASTCALL, cache__open_doc},
    {"_configure", (PyCFunction)(void (*)(void))cache__configure, METH_FASTCALL, cache__configure_doc},
    {"close", cache_close, METH_NOARGS, cache_close_doc},
    {"_release_locks", cache__release_locks, METH_NOARGS,
     "_release_locks($self, /)\n--\n\nRelease the pages this thread holds through lock blocks (close() does it)."},
    {"_held_get", (PyCFunction)(void (*)(void))cache__held_get, METH_FASTCALL,
     "_held_get($self, page, key, page_key, default, /)\n--\n\nRead in a page this thread holds."},
    {"_held_set", (PyCFunction)(void (*)(void))cache__held_set, METH_FASTCALL,
     "_held_set($self, page, key, page_key, value, expire_time, /)\n--\n\n"
     "Store in a page this thread holds; return (stored, expire_on, evicted dirty entries or None)."},
    {"_held_delete", (PyCFunction)(void (*)(void))cache__held_delete, METH_FASTCALL,
     "_held_delete($self, page, key, page_key, /)\n--\n\nDelete in a page this thread holds."},
    {"_flush_evicted", cache__flush_evicted, METH_O,
     "_flush_evicted($self, entries, /)\n--\n\nWrite evicted dirty entries through write_cb."},
    {"_set_callbacks", (PyCFunction)(void (*)(void))cache__set_callbacks, METH_FASTCALL,
     "_set_callbacks($self, context, read_cb, write_cb, delete_cb, write_back, cache_not_found, allow_recursive, /)"
     "\n--\n\nConfigure callbacks (validated by fastmmap.Cache)."},
    {NULL},
};

static PyMemberDef cache_members[] = {
    {"__weaklistoffset__", T_PYSSIZET, offsetof(CacheObject, weakreflist), READONLY},
    {NULL},
};

/* ---------- Type slots ---------- */

static PyObject *cache_new(PyTypeObject *type, PyObject *Py_UNUSED(args), PyObject *Py_UNUSED(kwds))
{
    PyObject *mod = PyType_GetModuleByDef(type, &fastmmap_module);
    if (!mod)
        return NULL;
    CacheObject *self = (CacheObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    self->state = PyModule_GetState(mod);
    self->lock_timeout_ns = -1;
    self->ser_type = FMM_T_PICKLE;
    self->comp_type = FMM_C_NONE;
    self->lost = &never_lost;
    self->probe = &no_probe;
    return (PyObject *)self;
}

static int cache_traverse(PyObject *op, visitproc visit, void *arg)
{
    CacheObject *self = CacheObject_CAST(op);
    Py_VISIT(Py_TYPE(op));
    Py_VISIT(self->dumps);
    Py_VISIT(self->loads);
    Py_VISIT(self->compress);
    Py_VISIT(self->decompress);
    Py_VISIT(self->parse_expire);
    Py_VISIT(self->context);
    Py_VISIT(self->read_cb);
    Py_VISIT(self->write_cb);
    Py_VISIT(self->delete_cb);
    Py_VISIT(self->retired);
    return 0;
}

static int cache_clear_refs(PyObject *op)
{
    CacheObject *self = CacheObject_CAST(op);
    Py_CLEAR(self->dumps);
    Py_CLEAR(self->loads);
    Py_CLEAR(self->compress);
    Py_CLEAR(self->decompress);
    Py_CLEAR(self->parse_expire);
    Py_CLEAR(self->context);
    Py_CLEAR(self->read_cb);
    Py_CLEAR(self->write_cb);
    Py_CLEAR(self->delete_cb);
    Py_CLEAR(self->retired);
    return 0;
}

static void cache_dealloc(PyObject *op)
{
    CacheObject *self = CacheObject_CAST(op);
    PyTypeObject *tp = Py_TYPE(op);
    PyObject_GC_UnTrack(op);
    if (self->weakreflist)
        PyObject_ClearWeakRefs(op);
    op_close(self);
    while (self->orphans) { /* their pages: fmm_close releases this thread's */
        orphan_lock *o = self->orphans;
        self->orphans = o->next;
        PyMem_Free(o);
    }
    really_close(self); /* even with a page still counted as held */
    cache_clear_refs(op);
    tp->tp_free(op);
    Py_DECREF(tp);
}

PyDoc_STRVAR(cachebase_doc, "The C core of fastmmap.Cache.  Use fastmmap.Cache, not this type.");

static PyType_Slot cache_slots[] = {
    {Py_tp_doc, (void *)cachebase_doc},
    {Py_tp_new, cache_new},
    {Py_tp_dealloc, cache_dealloc},
    {Py_tp_traverse, cache_traverse},
    {Py_tp_clear, cache_clear_refs},
    {Py_tp_methods, cache_methods},
    {Py_tp_getset, cache_getset},
    {Py_tp_members, cache_members},
    {Py_mp_subscript, cache_subscript},
    {Py_mp_ass_subscript, cache_ass_subscript},
    {Py_mp_length, cache_length},
    {Py_sq_contains, cache_contains},
    {0, NULL},
};

static PyType_Spec cache_spec = {
    .name = "fastmmap._fastmmap.CacheBase",
    .basicsize = sizeof(CacheObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = cache_slots,
};

/* ---------- Module ---------- */

static PyObject *mod_xxh64(PyObject *Py_UNUSED(mod), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2)
        return PyErr_Format(PyExc_TypeError, "xxh64(data, seed=0)");
    Py_buffer b;
    if (PyObject_GetBuffer(args[0], &b, PyBUF_SIMPLE) < 0)
        return NULL;
    unsigned long long seed = 0;
    if (nargs == 2) {
        seed = PyLong_AsUnsignedLongLongMask(args[1]);
        if (PyErr_Occurred()) {
            PyBuffer_Release(&b);
            return NULL;
        }
    }
    uint64_t h = fmm_xxh64(b.buf, (size_t)b.len, seed);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(h);
}

static PyObject *mod_perl_hash(PyObject *Py_UNUSED(mod), PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    uint32_t h = fmm_perl_hash(b.buf, (size_t)b.len);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLong(h);
}

static void reap_found(void *ctx, const char *name, uint64_t size)
{
    PyObject *list = ctx;
    if (PyErr_Occurred())
        return;
    PyObject *item = Py_BuildValue("(NK)", PyUnicode_DecodeFSDefault(name), (unsigned long long)size);
    if (item) {
        PyList_Append(list, item);
        Py_DECREF(item);
    }
}

static PyObject *mod_reap_temps(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *path_bytes = NULL;
    int remove;
    if (!PyArg_ParseTuple(args, "O&p:_reap_temps", PyUnicode_FSConverter, &path_bytes, &remove))
        return NULL;
    PyObject *list = PyList_New(0);
    if (!list) {
        Py_DECREF(path_bytes);
        return NULL;
    }
    /* under the GIL: the callback builds Python objects (a directory scan) */
    int n = fmm_reap_temps(PyBytes_AS_STRING(path_bytes), remove, reap_found, list);
    if (n < 0 && !PyErr_Occurred()) {
        errno = -n;
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, PyTuple_GET_ITEM(args, 0));
    }
    Py_DECREF(path_bytes);
    if (PyErr_Occurred()) {
        Py_DECREF(list);
        return NULL;
    }
    return list;
}

static PyObject *mod_set_result_types(PyObject *mod, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3)
        return PyErr_Format(PyExc_TypeError, "_set_result_types expected 3 arguments, got %zd", nargs);
    if (!PyType_Check(args[1]) || !PyType_Check(args[2]))
        return PyErr_Format(PyExc_TypeError, "_set_result_types: update and entry must be classes");
    fastmmap_state *st = PyModule_GetState(mod);
    Py_XSETREF(st->no_change, Py_NewRef(args[0]));
    Py_XSETREF(st->update_type, Py_NewRef(args[1]));
    Py_XSETREF(st->entry_type, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"_reap_temps", mod_reap_temps, METH_VARARGS,
     "_reap_temps($module, path, remove, /)\n--\n\nThe temporary files that dead creators of the cache file at "
     "path left (name, size), removed if remove is true."},
    {"_set_result_types", (PyCFunction)(void (*)(void))mod_set_result_types, METH_FASTCALL,
     cache__set_result_types_doc},
    {"perl_hash", mod_perl_hash, METH_O,
     "perl_hash($module, data, /)\n--\n\nCache::FastMmap's 32-bit hash of a bytes-like object (format='perl'): "
     "the page is hash % num_pages, the slot hash // num_pages."},
    {"xxh64", (PyCFunction)(void (*)(void))mod_xxh64, METH_FASTCALL,
     "xxh64($module, data, seed=0, /)\n--\n\nXXH64 of a bytes-like object (the engine's hash)."},
    {NULL},
};

static int add_exception(PyObject *mod, PyObject **slot, const char *name, PyObject *bases, const char *doc)
{
    char full[128];
    snprintf(full, sizeof full, "fastmmap.%s", name);
    *slot = PyErr_NewExceptionWithDoc(full, doc, bases, NULL);
    if (!*slot)
        return -1;
    return PyModule_AddObjectRef(mod, name, *slot);
}

static int fastmmap_exec(PyObject *mod)
{
    fastmmap_state *st = PyModule_GetState(mod);
    st->CacheBase_Type = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &cache_spec, NULL);
    if (!st->CacheBase_Type || PyModule_AddType(mod, st->CacheBase_Type) < 0)
        return -1;
    st->PageLock_Type = (PyTypeObject *)PyType_FromModuleAndSpec(mod, &pagelock_spec, NULL);
    if (!st->PageLock_Type || PyModule_AddType(mod, st->PageLock_Type) < 0)
        return -1;
    if (add_exception(mod, &st->Error, "Error", NULL, "Base class of fastmmap's own errors.") < 0)
        return -1;
    struct {
        PyObject **slot;
        const char *name;
        PyObject *builtin;
        const char *doc;
    } subs[] = {
        {&st->LockTimeout, "LockTimeout", PyExc_TimeoutError, "A page lock was not obtained within lock_timeout."},
        {&st->GeometryError, "GeometryError", PyExc_ValueError,
         "Size options disagree with the existing cache file (pass init_file=True to recreate it)."},
        {&st->BadFileError, "BadFileError", NULL, "The file is not a fastmmap cache, or its header is invalid."},
        {&st->RecursiveLockError, "RecursiveLockError", NULL,
         "This thread already holds a page lock of this cache (a callback used the cache?)."},
        {&st->FileReplacedError, "FileReplacedError", NULL, "The cache file was deleted or replaced."},
        {&st->ItemTooLargeError, "ItemTooLargeError", PyExc_ValueError,
         "An item (key, stored value and entry header) can never fit in one page."},
        {&st->UntrustedFileError, "UntrustedFileError", PyExc_PermissionError,
         "An existing cache file (or directory) is owned by another user, or group/others may write it beyond "
         "permissions."},
        {&st->WriteBackLostError, "WriteBackLostError", NULL,
         "Write-back failed and dirty values could not be put back in the cache: their keys are in .keys."},
    };
    for (size_t i = 0; i < sizeof subs / sizeof subs[0]; i++) {
        PyObject *bases = subs[i].builtin ? PyTuple_Pack(2, st->Error, subs[i].builtin) : PyTuple_Pack(1, st->Error);
        if (!bases)
            return -1;
        int r = add_exception(mod, subs[i].slot, subs[i].name, bases, subs[i].doc);
        Py_DECREF(bases);
        if (r < 0)
            return -1;
    }
    /* the class default, so that .keys is always there (and typed in the stub) */
    PyObject *no_keys = PyTuple_New(0);
    if (!no_keys || PyObject_SetAttrString(st->WriteBackLostError, "keys", no_keys) < 0) {
        Py_XDECREF(no_keys);
        return -1;
    }
    Py_DECREF(no_keys);
    if (PyModule_AddIntConstant(mod, "T_BYTES", FMM_T_BYTES) < 0 ||
        PyModule_AddIntConstant(mod, "T_STR", FMM_T_STR) < 0 ||
        PyModule_AddIntConstant(mod, "T_NONE", FMM_T_NONE) < 0 ||
        PyModule_AddIntConstant(mod, "T_PICKLE", FMM_T_PICKLE) < 0 ||
        PyModule_AddIntConstant(mod, "T_JSON", FMM_T_JSON) < 0 ||
        PyModule_AddIntConstant(mod, "T_CUSTOM", FMM_T_CUSTOM) < 0 ||
        PyModule_AddIntConstant(mod, "SER_RAW", SER_RAW) < 0 ||
        PyModule_AddIntConstant(mod, "C_NONE", FMM_C_NONE) < 0 ||
        PyModule_AddIntConstant(mod, "C_ZLIB", FMM_C_ZLIB) < 0 ||
        PyModule_AddIntConstant(mod, "C_LZ4", FMM_C_LZ4) < 0 ||
        PyModule_AddIntConstant(mod, "C_CUSTOM", FMM_C_CUSTOM) < 0 ||
        PyModule_AddIntConstant(mod, "F_DIRTY", FMM_F_DIRTY) < 0 ||
        PyModule_AddIntConstant(mod, "F_KEYSTR", FMM_F_KEYSTR) < 0 ||
        PyModule_AddIntConstant(mod, "F_MODSEQ", FMM_F_MODSEQ) < 0 ||
        PyModule_AddIntConstant(mod, "T_TOMBSTONE", FMM_T_TOMBSTONE) < 0 ||
        PyModule_AddIntConstant(mod, "EXPIRE_NOW", (long)EXPIRE_NOW) < 0 ||
        PyModule_AddIntConstant(mod, "MAX_KEY_LEN", FMM_MAX_KEY_LEN) < 0 ||
        PyModule_AddIntConstant(mod, "MIN_PAGE_SIZE", FMM_MIN_PAGE_SIZE) < 0 ||
        PyModule_AddIntConstant(mod, "MAX_PAGE_SIZE", FMM_MAX_PAGE_SIZE) < 0 ||
        PyModule_AddIntConstant(mod, "MAX_PAGES", FMM_MAX_PAGES) < 0)
        return -1;
    return 0;
}

static int fastmmap_traverse(PyObject *mod, visitproc visit, void *arg)
{
    fastmmap_state *st = PyModule_GetState(mod);
    Py_VISIT(st->CacheBase_Type);
    Py_VISIT(st->PageLock_Type);
    Py_VISIT(st->Error);
    Py_VISIT(st->LockTimeout);
    Py_VISIT(st->GeometryError);
    Py_VISIT(st->BadFileError);
    Py_VISIT(st->RecursiveLockError);
    Py_VISIT(st->FileReplacedError);
    Py_VISIT(st->ItemTooLargeError);
    Py_VISIT(st->UntrustedFileError);
    Py_VISIT(st->WriteBackLostError);
    Py_VISIT(st->pickle_dumps);
    Py_VISIT(st->pickle_loads);
    Py_VISIT(st->pickle_protocol);
    Py_VISIT(st->json_loads);
    Py_VISIT(st->zlib_decompress);
    Py_VISIT(st->lz4_decompress);
    Py_VISIT(st->no_change);
    Py_VISIT(st->update_type);
    Py_VISIT(st->entry_type);
    return 0;
}

static int fastmmap_clear(PyObject *mod)
{
    fastmmap_state *st = PyModule_GetState(mod);
    Py_CLEAR(st->CacheBase_Type);
    Py_CLEAR(st->PageLock_Type);
    Py_CLEAR(st->Error);
    Py_CLEAR(st->LockTimeout);
    Py_CLEAR(st->GeometryError);
    Py_CLEAR(st->BadFileError);
    Py_CLEAR(st->RecursiveLockError);
    Py_CLEAR(st->FileReplacedError);
    Py_CLEAR(st->ItemTooLargeError);
    Py_CLEAR(st->UntrustedFileError);
    Py_CLEAR(st->WriteBackLostError);
    Py_CLEAR(st->pickle_dumps);
    Py_CLEAR(st->pickle_loads);
    Py_CLEAR(st->pickle_protocol);
    Py_CLEAR(st->json_loads);
    Py_CLEAR(st->zlib_decompress);
    Py_CLEAR(st->lz4_decompress);
    Py_CLEAR(st->no_change);
    Py_CLEAR(st->update_type);
    Py_CLEAR(st->entry_type);
    return 0;
}

static void fastmmap_free(void *mod) { fastmmap_clear((PyObject *)mod); }

static PyModuleDef_Slot fastmmap_slots[] = {
    {Py_mod_exec, fastmmap_exec},
#ifdef Py_GIL_DISABLED
    /* safe without the GIL: see "Free-threaded CPython" at the top */
    {Py_mod_gil, Py_MOD_GIL_NOT_USED},
#endif
#ifdef Py_mod_multiple_interpreters
    /* fcntl-free, but page locks are per thread and the thread-local record
     * of held pages is shared by interpreters of one thread: stay conservative. */
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
    {0, NULL},
};

static struct PyModuleDef fastmmap_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fastmmap._fastmmap",
    .m_doc = "The C core of fastmmap: a shared-memory cache in an mmap'ed file.",
    .m_size = sizeof(fastmmap_state),
    .m_methods = module_methods,
    .m_slots = fastmmap_slots,
    .m_traverse = fastmmap_traverse,
    .m_clear = fastmmap_clear,
    .m_free = fastmmap_free,
};

PyMODINIT_FUNC PyInit__fastmmap(void) { return PyModuleDef_Init(&fastmmap_module); }
