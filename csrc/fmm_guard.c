/*
 * fmm_guard.c -- the SIGBUS guard: survive a cache file that shrinks under
 * a live mapping.
 *
 * Touching a MAP_SHARED page that lies past the end of its file raises
 * SIGBUS, whose default action kills the process.  Someone truncating the
 * cache file (a cleanup script, `> file`, a full disk "fixed" by hand) would
 * thus kill every process that uses the cache.  The guard turns that into an
 * error on the handle instead:
 *
 *   - fmm_guard_register() (called by fmm_open once the file is mapped)
 *     records the mapping's range and a pointer to the handle's `lost` flag
 *     in a table, and installs the SIGBUS handler once per process
 *     (re-installed at each registration if something else took SIGBUS
 *     since, e.g. Python's faulthandler);
 *   - on a SIGBUS whose address lies in a registered range, the handler
 *     replaces the whole mapping in place with private anonymous zero memory
 *     (mmap MAP_FIXED: one syscall, async-signal-safe), sets the flag and
 *     returns: the faulting instruction runs again and reads zeros.  The
 *     engine checks the flag (fmm_lost) at every lock and unlock, and the
 *     binding after every operation, so the handle fails with FMM_EREPLACED
 *     from then on; nothing read from the zero memory is ever returned;
 *   - any other SIGBUS goes to the handler that was installed before ours:
 *     a function is called; SIG_DFL/SIG_IGN is restored, and the fault
 *     repeats (or, for a SIGBUS sent with kill/raise, is raised again) and
 *     kills the process as it would have without us.  A second foreign
 *     SIGBUS within the same chain (two handlers that each call the other,
 *     as faulthandler and we can end up) restores SIG_DFL: a foreign SIGBUS
 *     must end the process, never loop.
 *   - fmm_guard_unregister() (fmm_close, before munmap) clears the entry.
 *
 * The table is read by the handler without locks: entries are published
 * with release stores of `start` (0 = free) after `end` and `flag` are set,
 * and claimed with a compare-and-swap on `busy`.  It grows without bound:
 * it is a list of fixed chunks of GUARD_CHUNK entries, and a full list gets
 * a new chunk, zeroed before a compare-and-swap (with release order) of
 * the last chunk's `next` publishes it.  Chunks are never freed or moved, so a handler that runs
 * while another thread appends one (in this thread, interrupting the
 * append, or in another) follows only pointers to initialised chunks, with
 * acquire loads and nothing else: async-signal-safe.  Freed entries are
 * reused, so the table's length is the most mappings guarded at once.
 * Limit (documented in fmm.h): the handle must not be closed while another
 * thread still touches its mapping (the binding guarantees it).
 *
 * No Python.h: this is part of the engine.
 */
#define _GNU_SOURCE
#include "fmm.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct guard_slot {
    uintptr_t start; /* 0: free (published last, cleared first) */
    uintptr_t end;
    int *flag;
    int busy;        /* claimed by a registration */
    int state;       /* 0 mapped, 1 being replaced, 2 replaced */
} guard_slot;

#define GUARD_CHUNK 64

typedef struct guard_chunk {
    guard_slot slots[GUARD_CHUNK];
    struct guard_chunk *next; /* NULL, then a chunk for good (set by a CAS) */
} guard_chunk;

static guard_chunk first_chunk;
static struct sigaction prev_action;  /* the action before ours */
static int installed;                 /* our handler is (or was) installed */
static int foreign;                   /* foreign SIGBUS seen while chaining */
static pthread_mutex_t install_lock = PTHREAD_MUTEX_INITIALIZER;

static void guard_handler(int sig, siginfo_t *si, void *uctx);

static int is_ours(const struct sigaction *sa)
{
    return (sa->sa_flags & SA_SIGINFO) && sa->sa_sigaction == guard_handler;
}

/* Install (or re-install) our handler, keeping the current one as the
 * previous action.  Under install_lock. */
static int install(void)
{
    struct sigaction cur;
    if (sigaction(SIGBUS, NULL, &cur) != 0)
        return errno;
    if (is_ours(&cur))
        return 0;
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = guard_handler;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    /* The handler reads prev_action: publish it before the handler can run. */
    struct sigaction old;
    __atomic_store_n(&foreign, 0, __ATOMIC_RELAXED);
    prev_action = cur;
    __atomic_signal_fence(__ATOMIC_SEQ_CST);
    if (sigaction(SIGBUS, &sa, &old) != 0)
        return errno;
    if (!is_ours(&old))
        prev_action = old; /* changed between the two calls */
    __atomic_store_n(&installed, 1, __ATOMIC_RELEASE);
    return 0;
}

int fmm_guard_register(void *start, size_t len, int *flag)
{
    if (!start || !len || !flag)
        return -1;
    pthread_mutex_lock(&install_lock);
    int rc = install();
    pthread_mutex_unlock(&install_lock);
    if (rc)
        return -1;
    int base = 0;
    for (guard_chunk *ch = &first_chunk;;) {
        for (int i = 0; i < GUARD_CHUNK; i++) {
            guard_slot *g = &ch->slots[i];
            int zero = 0;
            if (__atomic_load_n(&g->busy, __ATOMIC_RELAXED) ||
                !__atomic_compare_exchange_n(&g->busy, &zero, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_RELAXED))
                continue;
            __atomic_store_n(&g->end, (uintptr_t)start + len, __ATOMIC_RELAXED);
            __atomic_store_n(&g->flag, flag, __ATOMIC_RELAXED);
            __atomic_store_n(&g->state, 0, __ATOMIC_RELAXED);
            __atomic_store_n(&g->start, (uintptr_t)start, __ATOMIC_RELEASE);
            return base + i;
        }
        if (base > INT_MAX - 2 * GUARD_CHUNK)
            return -1; /* no slot number left (billions of live mappings) */
        base += GUARD_CHUNK;
        guard_chunk *next = __atomic_load_n(&ch->next, __ATOMIC_ACQUIRE);
        if (!next) {
            /* Appenders race with a compare-and-swap rather than a lock (a
             * lock held by another thread at fork would stay held in the
             * child): the loser frees its chunk, never seen by anyone, and
             * takes the winner's. */
            guard_chunk *fresh = calloc(1, sizeof *fresh);
            if (!fresh)
                return -1; /* out of memory: this mapping is not guarded */
            if (__atomic_compare_exchange_n(&ch->next, &next, fresh, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
                next = fresh;
            else
                free(fresh); /* `next` now holds the winner's chunk */
        }
        ch = next;
    }
}

/* The entry with slot number `slot`, or NULL. */
static guard_slot *slot_at(int slot)
{
    if (slot < 0)
        return NULL;
    guard_chunk *ch = &first_chunk;
    for (; ch && slot >= GUARD_CHUNK; slot -= GUARD_CHUNK)
        ch = __atomic_load_n(&ch->next, __ATOMIC_ACQUIRE);
    return ch ? &ch->slots[slot] : NULL;
}

void fmm_guard_unregister(int slot)
{
    guard_slot *g = slot_at(slot);
    if (!g)
        return;
    __atomic_store_n(&g->start, 0, __ATOMIC_RELEASE);
    /* a handler that already matched this entry finishes before we reuse it */
    while (__atomic_load_n(&g->state, __ATOMIC_ACQUIRE) == 1)
        sched_yield();
    __atomic_store_n(&g->flag, NULL, __ATOMIC_RELAXED);
    __atomic_store_n(&g->busy, 0, __ATOMIC_RELEASE);
}

int fmm_guard_capacity(void)
{
    int n = 0;
    for (guard_chunk *ch = &first_chunk; ch; ch = __atomic_load_n(&ch->next, __ATOMIC_ACQUIRE))
        n += GUARD_CHUNK;
    return n;
}

int fmm_guard_active(void)
{
    struct sigaction cur;
    return sigaction(SIGBUS, NULL, &cur) == 0 && is_ours(&cur);
}

/* Replace the mapping of slot i with zero memory (once, whichever thread
 * gets there first); 0 on success. */
static int replace_mapping(guard_slot *g, uintptr_t start, uintptr_t end)
{
    int st = 0;
    if (__atomic_compare_exchange_n(&g->state, &st, 1, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
        void *p = mmap((void *)start, end - start, PROT_READ | PROT_WRITE,
                       MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) {
            __atomic_store_n(&g->state, 0, __ATOMIC_RELEASE);
            return -1;
        }
        int *flag = __atomic_load_n(&g->flag, __ATOMIC_ACQUIRE);
        if (flag)
            __atomic_store_n(flag, 1, __ATOMIC_RELEASE);
        __atomic_store_n(&g->state, 2, __ATOMIC_RELEASE);
        return 0;
    }
    /* Another thread is replacing it: wait (a single syscall away). */
    while (__atomic_load_n(&g->state, __ATOMIC_ACQUIRE) == 1)
        sched_yield();
    return __atomic_load_n(&g->state, __ATOMIC_ACQUIRE) == 2 ? 0 : -1;
}

static void guard_handler(int sig, siginfo_t *si, void *uctx)
{
    int saved_errno = errno;
    uintptr_t a = (uintptr_t)si->si_addr;
    if (si->si_code > 0) { /* sent by the kernel for a fault: si_addr is valid */
        /* Only acquire loads: a chunk reached through `next` is initialised
         * and stays where it is, even while another thread appends one. */
        for (guard_chunk *ch = &first_chunk; ch; ch = __atomic_load_n(&ch->next, __ATOMIC_ACQUIRE)) {
            for (int i = 0; i < GUARD_CHUNK; i++) {
                guard_slot *g = &ch->slots[i];
                uintptr_t s = __atomic_load_n(&g->start, __ATOMIC_ACQUIRE);
                if (!s || a < s)
                    continue;
                uintptr_t e = __atomic_load_n(&g->end, __ATOMIC_RELAXED);
                if (a >= e)
                    continue;
                if (replace_mapping(g, s, e) == 0) {
                    errno = saved_errno;
                    return; /* the faulting access retries on zero memory */
                }
                goto not_ours;
            }
        }
    }
not_ours:; /* C11 wants a statement after a label, not a declaration */
    /* Not ours: hand the signal to whoever had it before us. */
    struct sigaction prev = prev_action;
    int again = __atomic_fetch_add(&foreign, 1, __ATOMIC_ACQ_REL) > 0;
    if (again || is_ours(&prev) || prev.sa_handler == SIG_DFL || prev.sa_handler == SIG_IGN) {
        struct sigaction dfl;
        memset(&dfl, 0, sizeof dfl);
        dfl.sa_handler = SIG_DFL;
        sigemptyset(&dfl.sa_mask);
        sigaction(SIGBUS, &dfl, NULL);
        if (si->si_code <= 0)
            raise(sig); /* pending until we return, then fatal */
        errno = saved_errno;
        return; /* a fault repeats, now with the default action */
    }
    errno = saved_errno;
    if (prev.sa_flags & SA_SIGINFO)
        prev.sa_sigaction(sig, si, uctx);
    else
        prev.sa_handler(sig);
}
