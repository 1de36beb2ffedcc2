/*
 * LD_PRELOAD shim for the fsync-failure test: while the file named by
 * $HOMEAGENT_FAIL_FSYNC_IF exists, fsync() and fdatasync() fail with EIO, as a
 * dying disk makes them fail. Everything else reaches the real libc.
 *
 *   cc -shared -fPIC -o failing_fsync.so failing_fsync.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

static int failing(void) {
    const char *flag = getenv("HOMEAGENT_FAIL_FSYNC_IF");
    return flag && access(flag, F_OK) == 0;
}

int fsync(int fd) {
    static int (*real)(int);
    if (failing()) { errno = EIO; return -1; }
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fsync");
    return real(fd);
}

int fdatasync(int fd) {
    static int (*real)(int);
    if (failing()) { errno = EIO; return -1; }
    if (!real) real = (int (*)(int))dlsym(RTLD_NEXT, "fdatasync");
    return real(fd);
}
