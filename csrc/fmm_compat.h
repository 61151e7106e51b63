/* fmm_compat.h - the few libc calls the engine needs that older glibc
 * (the manylinux_2_28 baseline) or musl lack, each with the fallback used
 * there.  Included by the engine's .c files after _GNU_SOURCE and the
 * system headers; never by the binding.
 *
 * The choice is made at compile time from the libc headers the build
 * targets, never at run time: a weak reference to a newer glibc symbol
 * would still carry its symbol version and make the module refuse to load
 * on the older glibc the wheel promises to support. */
#ifndef FMM_COMPAT_H
#define FMM_COMPAT_H

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* -DFMM_HAVE_CLOCKLOCK=0 builds the fallback on any libc (to test it). */
#ifndef FMM_HAVE_CLOCKLOCK
#if defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 30))
#define FMM_HAVE_CLOCKLOCK 1
#else
#define FMM_HAVE_CLOCKLOCK 0
#endif
#endif

/* Lock m, giving up at *deadline on CLOCK_MONOTONIC.  Without
 * pthread_mutex_clocklock (glibc before 2.30, musl) the deadline is turned
 * into a CLOCK_REALTIME one for pthread_mutex_timedlock: a wall-clock step
 * during the wait then lengthens or shortens it, which is the most a
 * caller can see.  The engine waits in slices well under a second anyway,
 * so a stepped clock costs at most one slice. */
static inline int fmm_mutex_clocklock_mono(pthread_mutex_t *m, const struct timespec *deadline)
{
#if FMM_HAVE_CLOCKLOCK
    return pthread_mutex_clocklock(m, CLOCK_MONOTONIC, deadline);
#else
    struct timespec now_m, now_r;
    clock_gettime(CLOCK_MONOTONIC, &now_m);
    clock_gettime(CLOCK_REALTIME, &now_r);
    int64_t left = (int64_t)(deadline->tv_sec - now_m.tv_sec) * 1000000000LL + (deadline->tv_nsec - now_m.tv_nsec);
    if (left < 0)
        left = 0;
    int64_t abs_ns = (int64_t)now_r.tv_sec * 1000000000LL + now_r.tv_nsec + left;
    struct timespec rt = {(time_t)(abs_ns / 1000000000LL), (long)(abs_ns % 1000000000LL)};
    return pthread_mutex_timedlock(m, &rt);
#endif
}

#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE (1 << 0) /* linux/fs.h; musl's stdio.h lacks it */
#endif

/* rename(old, new) unless new exists (EEXIST).  musl has no renameat2()
 * wrapper; the system call itself is the same everywhere (Linux 3.15+). */
static inline int fmm_rename_noreplace(const char *old, const char *new)
{
#if defined(__GLIBC__)
    return renameat2(AT_FDCWD, old, AT_FDCWD, new, RENAME_NOREPLACE);
#else
    return (int)syscall(SYS_renameat2, AT_FDCWD, old, AT_FDCWD, new, RENAME_NOREPLACE);
#endif
}

#endif
