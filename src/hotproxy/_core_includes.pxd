# Every C declaration the compiled core uses, once: cimported by _core.pxd
# (and so visible in every part of hotproxy._core).  Standard library
# cimports (libc, posix, cpython) stay where they are used.

from libc.stdint cimport uint32_t, uint64_t, uintptr_t


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64
    cdef struct epoll_event:
        uint32_t events
        epoll_data_t data
    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)
    enum:
        EPOLL_CLOEXEC
        EPOLL_CTL_ADD
        EPOLL_CTL_DEL
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    cdef struct sockaddr:
        unsigned short sa_family
    cdef struct sockaddr_storage:
        unsigned short ss_family
    int accept4(int fd, sockaddr *addr, socklen_t *addrlen, int flags)
    int getsockname(int fd, sockaddr *addr, socklen_t *addrlen)
    int socket(int domain, int type, int protocol)
    int connect(int fd, const sockaddr *addr, socklen_t addrlen)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int shutdown(int fd, int how)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    enum:
        AF_UNIX
        SOCK_STREAM
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        MSG_NOSIGNAL
        SHUT_WR
        SOL_SOCKET
        SO_ERROR
        SO_KEEPALIVE
        AF_INET
        AF_INET6


cdef extern from "<netinet/in.h>" nogil:
    enum:
        IPPROTO_TCP
    cdef struct in_addr:
        pass
    cdef struct sockaddr_in:
        unsigned short sin_port
        in_addr sin_addr
    cdef struct in6_addr:
        pass
    cdef struct sockaddr_in6:
        unsigned short sin6_port
        unsigned int sin6_flowinfo
        in6_addr sin6_addr
        unsigned int sin6_scope_id


cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY


cdef extern from "<sys/un.h>" nogil:
    cdef struct sockaddr_un:
        char sun_path[108]


cdef extern from "<arpa/inet.h>" nogil:
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    unsigned short ntohs(unsigned short v)
    unsigned int ntohl(unsigned int v)


cdef extern from "<fcntl.h>" nogil:
    ssize_t splice(int fd_in, long long *off_in, int fd_out, long long *off_out,
                   size_t n, unsigned int flags)
    int fcntl(int fd, int cmd, ...)
    enum:
        SPLICE_F_MOVE
        SPLICE_F_NONBLOCK
        F_SETPIPE_SZ
        O_NONBLOCK
        O_CLOEXEC


cdef extern from "<unistd.h>" nogil:
    int pipe2(int *fds, int flags)


cdef extern from "<string.h>" nogil:
    size_t strnlen(const char *s, size_t maxlen)


# Atomic updates of the counters that the processes of an instance share
# (see _core_counters.pxi).
cdef extern from *:
    """
    static inline int hp_count_acquire(long long *total, long long *share, long long limit) {
        long long cur = __atomic_load_n(total, __ATOMIC_RELAXED);
        do {
            if (limit > 0 && cur >= limit)
                return 0;
        } while (!__atomic_compare_exchange_n(total, &cur, cur + 1, 1,
                                              __ATOMIC_ACQ_REL, __ATOMIC_RELAXED));
        __atomic_store_n(share, __atomic_load_n(share, __ATOMIC_RELAXED) + 1, __ATOMIC_RELAXED);
        return 1;
    }
    static inline void hp_count_release(long long *total, long long *share) {
        __atomic_store_n(share, __atomic_load_n(share, __ATOMIC_RELAXED) - 1, __ATOMIC_RELAXED);
        __atomic_sub_fetch(total, 1, __ATOMIC_ACQ_REL);
    }
    static inline long long hp_count_load(long long *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void hp_count_sub(long long *p, long long n) {
        __atomic_sub_fetch(p, n, __ATOMIC_ACQ_REL);
    }
    static inline void hp_count_store(long long *p, long long n) {
        __atomic_store_n(p, n, __ATOMIC_RELEASE);
    }
    """
    int hp_count_acquire(long long *total, long long *share, long long limit) noexcept nogil
    void hp_count_release(long long *total, long long *share) noexcept nogil
    long long hp_count_load(long long *p) noexcept nogil
    void hp_count_sub(long long *p, long long n) noexcept nogil
    void hp_count_store(long long *p, long long n) noexcept nogil
