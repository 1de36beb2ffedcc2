/*
 * seccomp_exec: run a command under the same seccomp policy systemd applies
 * for secretsd.service, where systemd itself is not PID 1 (tests, CI).
 *
 *   seccomp_exec ALLOW_FILE -- COMMAND [ARGS...]
 *
 * ALLOW_FILE lists syscall names, one a line: the expansion of the unit's
 * SystemCallFilter= lines (computed by the test with systemd-analyze). Any
 * other syscall fails with EPERM (SystemCallErrorNumber=EPERM). A second
 * filter mirrors MemoryDenyWriteExecute=yes as systemd builds it: mmap with
 * PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect adding PROT_EXEC, and shmat
 * with SHM_EXEC fail with EPERM. NoNewPrivileges=yes is set first.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/shm.h>
#include <unistd.h>

#ifndef SHM_EXEC
#define SHM_EXEC 0100000
#endif

static int allow_list(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) { perror(path); return -1; }
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ERRNO(EPERM));
    char line[128];
    int n = 0;
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\r\n")] = 0;
        if (!line[0]) continue;
        int nr = seccomp_syscall_resolve_name(line);
        if (nr == __NR_SCMP_ERROR) continue; /* not on this architecture */
        if (seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0) == 0) n++;
    }
    fclose(f);
    int rc = seccomp_load(ctx);
    seccomp_release(ctx);
    if (rc) { fprintf(stderr, "seccomp_load: %s\n", strerror(-rc)); return -1; }
    fprintf(stderr, "seccomp_exec: %d syscalls allowed\n", n);
    return 0;
}

static int deny_write_execute(void) {
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_ALLOW);
    int rc = 0;
    rc |= seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(mmap), 1,
                           SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC | PROT_WRITE, PROT_EXEC | PROT_WRITE));
    rc |= seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(mprotect), 1,
                           SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC));
    rc |= seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(pkey_mprotect), 1,
                           SCMP_A2(SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC));
    rc |= seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EPERM), SCMP_SYS(shmat), 1,
                           SCMP_A2(SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC));
    if (!rc) rc = seccomp_load(ctx);
    seccomp_release(ctx);
    if (rc) { fprintf(stderr, "W^X filter: %s\n", strerror(-rc)); return -1; }
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 4 || strcmp(argv[2], "--") != 0) {
        fprintf(stderr, "usage: %s ALLOW_FILE -- COMMAND [ARGS...]\n", argv[0]);
        return 2;
    }
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) { perror("PR_SET_NO_NEW_PRIVS"); return 1; }
    if (deny_write_execute() || allow_list(argv[1])) return 1;
    execvp(argv[3], argv + 3);
    perror(argv[3]);
    return 127;
}
