/*
 * floor: the true floor of spawn-per-connection, for `make bench`.
 *
 * Takes one listening socket the way qrexec-connect does (LISTEN_FDS=1 from
 * systemd-socket-activate, fd 3) and, for each connection, posix_spawn()s
 * the given client with the connection as its stdin and stdout, and reaps
 * each child with waitpid() from a SIGCHLD handler as it exits: reaping
 * costs the parent real time (freeing the child's task), which a daemon
 * that reports exit statuses must pay too, so the floor pays it as well
 * rather than leaving it to the kernel (SIGCHLD ignored). Nothing else: no
 * logging, no limits, no readiness notification. Whatever qrexec-connect
 * costs above this is its own overhead.
 *
 *   floor CLIENT [ARG...]        (built by bench/run.sh with the system cc)
 */
#define _GNU_SOURCE /* accept4 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

static void reap(int signo)
{
    (void)signo;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

int main(int argc, char **argv)
{
    const char *fds = getenv("LISTEN_FDS");
    if (argc < 2 || fds == NULL || strcmp(fds, "1") != 0) {
        fprintf(stderr, "usage: LISTEN_FDS=1 floor CLIENT [ARG...] (socket on fd 3)\n");
        return 2;
    }
    /* The client must not believe it was socket-activated. */
    unsetenv("LISTEN_FDS");
    unsetenv("LISTEN_PID");
    unsetenv("LISTEN_FDNAMES");
    int listener = 3;
    fcntl(listener, F_SETFD, FD_CLOEXEC);
    /* A client that closes early must not kill the acceptor. */
    signal(SIGPIPE, SIG_IGN);
    struct sigaction on_child = {.sa_handler = reap, .sa_flags = SA_RESTART | SA_NOCLDSTOP};
    sigemptyset(&on_child.sa_mask);
    sigaction(SIGCHLD, &on_child, NULL);

    posix_spawnattr_t attr;
    posix_spawnattr_init(&attr);
    sigset_t defaults;
    sigemptyset(&defaults);
    sigaddset(&defaults, SIGPIPE);
    posix_spawnattr_setsigdefault(&attr, &defaults);
    posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETSIGDEF);

    for (;;) {
        int conn = accept4(listener, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            perror("floor: accept4");
            usleep(10000); /* EMFILE and friends: do not spin */
            continue;
        }
        posix_spawn_file_actions_t actions;
        posix_spawn_file_actions_init(&actions);
        posix_spawn_file_actions_adddup2(&actions, conn, 0);
        posix_spawn_file_actions_adddup2(&actions, conn, 1);
        pid_t pid;
        int err = posix_spawn(&pid, argv[1], &actions, &attr, argv + 1, environ);
        if (err != 0)
            fprintf(stderr, "floor: posix_spawn %s: %s\n", argv[1], strerror(err));
        posix_spawn_file_actions_destroy(&actions);
        close(conn);
    }
}
