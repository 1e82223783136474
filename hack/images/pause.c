/*
 * pause: the process that holds a cri-py pod sandbox's namespaces open.
 *
 * It is PID 1 of the pod, so it must do three things and nothing else:
 *   - sleep forever without using CPU (pause(2) in a loop),
 *   - exit 0 on SIGTERM/SIGINT, so stopping a sandbox is quick and clean
 *     (PID 1 gets no default signal handlers from the kernel, hence the
 *     explicit ones),
 *   - reap every child that exits (orphans are reparented to PID 1 when the
 *     pod shares its PID namespace), so no zombies pile up.
 *
 * Built static so the image needs no libc:
 *   gcc -static -Os -o pause pause.c && strip pause
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define PAUSE_VERSION "cri-py-pause 1.0"

/* Exit straight from the handler: _exit() is async-signal-safe. */
static void on_term(int sig)
{
    (void)sig;
    _exit(0);
}

/* Reap all exited children; several may be pending behind one SIGCHLD. */
static void on_chld(int sig)
{
    int saved = errno;

    (void)sig;
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
    errno = saved;
}

static int install(int sig, void (*handler)(int))
{
    struct sigaction sa;

    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = handler;
    sigemptyset(&sa.sa_mask);
    /* SA_RESTART is irrelevant for pause(); NOCLDSTOP avoids wakeups on stop. */
    sa.sa_flags = (sig == SIGCHLD) ? SA_NOCLDSTOP : 0;
    return sigaction(sig, &sa, NULL);
}

int main(int argc, char **argv)
{
    if (argc > 1) {
        if (strcmp(argv[1], "-v") == 0) {
            printf("%s\n", PAUSE_VERSION);
            return 0;
        }
        fprintf(stderr, "usage: %s [-v]\n", argv[0]);
        return 2;
    }

    if (getpid() != 1)
        fprintf(stderr, "pause: warning: not running as PID 1\n");

    if (install(SIGTERM, on_term) < 0 || install(SIGINT, on_term) < 0 ||
        install(SIGCHLD, on_chld) < 0) {
        perror("pause: sigaction");
        return 1;
    }

    for (;;)
        pause();
    /* not reached */
    return 42;
}
