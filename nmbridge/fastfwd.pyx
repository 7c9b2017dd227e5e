# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""fastfwd -- the only hot code: move frames between two ports' netmap rings.

Per direction and batch: for each RX ring with frames and TX ring with room, take
``min(rx avail, tx room, burst)`` slots; per frame run the filter (if any) on its first slot,
then either swap ``buf_idx`` between the RX and TX slot and set ``NS_BUF_CHANGED`` on both
(ports in one memory region: zero-copy) or copy the bytes.  ``NS_MOREFRAG`` chains move whole
or not at all.  Then the rings are synced, by one of two disciplines chosen by the ports'
``poll_syncs``: when both ports are the kernel's netmap, every round ends in one poll() that
syncs every ring and sleeps only when nothing can progress (POLLIN on a source with nothing
left to read, POLLOUT on a destination that is full), as netmap's bridge.c does; otherwise
(user memory) the loop txsyncs the destination and rxsyncs the source after a batch, and
poll()s the same way, then syncs, only when nothing could move.  The loop runs without the
GIL and checks its stop flag (and an eventfd that wakes poll) once per batch; once stopped,
it drains what is inside the bridge for a bounded time (``drain``) before run() returns.

Counters are written by the forwarding thread only.  A snapshot (``snapshot()``, from any
thread) asks the loop for a copy: at the next batch boundary -- after a sync, when no frame is
half-way -- the loop copies its own counters and both ports' counters into one published
record under a sequence counter (odd while it writes), and the reader retries until it reads
an even, unchanged sequence.  So every frame is, in a snapshot, in exactly one place.
"""

from libc.errno cimport EINTR, errno
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, strerror
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from nmbridge.capring cimport (NMB_CAP_BROKEN_CHAIN, NMB_CAP_FILTERED, NMB_CAP_FORWARDED,
                               NMB_CAP_OVERSIZE, nmb_tap, nmb_tap_offer, nmb_tap_offer_v)
from nmbridge.netmap cimport (NETMAP_MAX_FRAGS, NS_BUF_CHANGED, NS_MOREFRAG, netmap_ring,
                              netmap_slot, nmb_buf, nmb_ring_empty, nmb_ring_space, nmb_rxring,
                              nmb_txring)
from nmbridge.port cimport NMB_OFFLOAD_META, Port, nmb_port

import logging

from nmbridge.errors import PortError


cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLNVAL
    int poll(pollfd *fds, unsigned long nfds, int timeout)

cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC
    int eventfd(unsigned int initval, int flags)

cdef extern from "<sys/resource.h>" nogil:
    struct rusage:
        long ru_nivcsw
    enum:
        RUSAGE_THREAD
    int getrusage(int who, rusage *usage)

cdef extern from "<sched.h>" nogil:
    ctypedef struct cpu_set_t:
        pass
    int sched_getcpu()
    int sched_getaffinity(int pid, size_t size, cpu_set_t *mask)
    int sched_setaffinity(int pid, size_t size, const cpu_set_t *mask)
    int CPU_COUNT(cpu_set_t *s)
    void CPU_CLR(int cpu, cpu_set_t *s)

cdef extern from "<unistd.h>" nogil:
    int usleep(unsigned int usec)
    long read(int fd, void *buf, size_t n)
    long write(int fd, const void *buf, size_t n)
    int close(int fd)

cdef extern from "nmb_filter.h" nogil:
    enum:
        NMB_DROP
        NMB_PASS
    struct nmb_filter:
        int (*run)(nmb_filter *self, const uint8_t *frame, uint32_t len) noexcept nogil

cdef extern from *:
    """
    #define NMB_LOAD_PTR(p) __atomic_load_n(&(p), __ATOMIC_ACQUIRE)
    #define NMB_STORE_PTR(p, v) __atomic_store_n(&(p), (v), __ATOMIC_RELEASE)
    #define NMB_LOAD_INT(p) __atomic_load_n(&(p), __ATOMIC_RELAXED)
    #define NMB_STORE_INT(p, v) __atomic_store_n(&(p), (v), __ATOMIC_RELAXED)
    #define NMB_UNLIKELY(x) __builtin_expect(!!(x), 0)
    #define NMB_PREFETCH(p) __builtin_prefetch((p), 0, 3)
    #define NMB_LOAD_U64(p) __atomic_load_n(&(p), __ATOMIC_ACQUIRE)
    #define NMB_PEEK_U64(p) __atomic_load_n(&(p), __ATOMIC_RELAXED)
    #define NMB_STORE_U64(p, v) __atomic_store_n(&(p), (v), __ATOMIC_RELEASE)
    #define NMB_ADD_U64(p, v) __atomic_add_fetch(&(p), (v), __ATOMIC_ACQ_REL)
    #define NMB_FENCE_ACQUIRE() __atomic_thread_fence(__ATOMIC_ACQUIRE)
    #define NMB_FENCE_RELEASE() __atomic_thread_fence(__ATOMIC_RELEASE)
    """
    nmb_filter *NMB_LOAD_PTR(nmb_filter *p) noexcept nogil
    nmb_tap *NMB_LOAD_TAP "NMB_LOAD_PTR"(nmb_tap *p) noexcept nogil
    void NMB_STORE_TAP "NMB_STORE_PTR"(nmb_tap *p, nmb_tap *v) noexcept nogil
    void NMB_STORE_PTR(nmb_filter *p, nmb_filter *v) noexcept nogil
    int NMB_LOAD_INT(int p) noexcept nogil
    void NMB_STORE_INT(int p, int v) noexcept nogil
    bint NMB_UNLIKELY(bint x) noexcept nogil
    void NMB_PREFETCH(const void *p) noexcept nogil
    uint64_t NMB_LOAD_U64(uint64_t p) noexcept nogil
    uint64_t NMB_PEEK_U64(uint64_t p) noexcept nogil
    void NMB_STORE_U64(uint64_t p, uint64_t v) noexcept nogil
    uint64_t NMB_ADD_U64(uint64_t p, uint64_t v) noexcept nogil
    void NMB_FENCE_ACQUIRE() noexcept nogil
    void NMB_FENCE_RELEASE() noexcept nogil


cdef struct dir_stats:
    uint64_t frames        # frames put on a TX slot (the port's txsync then sends or drops them)
    uint64_t bytes         # bytes of those frames
    uint64_t batches       # batches that moved at least one slot
    uint64_t tx_stalls     # batches that stopped with frames waiting and every TX ring full
    uint64_t oversize      # frames dropped: a slot's len exceeds the buffer size
    uint64_t broken_chain  # frames dropped: an NS_MOREFRAG chain that can never be moved
    uint64_t filtered      # frames dropped by the filter


cdef struct fwd_dir:
    nmb_port *src
    nmb_port *dst
    bint enabled
    bint zerocopy
    uint32_t burst
    nmb_filter *filter
    nmb_tap *tap           # a running capture (nmb_capring.h), or NULL: loaded once per batch
    uint64_t skipping      # bit r: RX ring r is dropping the rest of a broken chain
    bint chain_wait        # the last batch left a chain whose rest has not arrived yet
    dir_stats st


cdef enum:
    MAX_PORT_COUNTERS = 64  # uint64_t counters of one port that a snapshot copies
    MAX_SPIN_US = 1000000   # a pair's idle polling: at most a second
    DRAIN_MS = 100          # a stopped loop's drain: at most this long (see drain())
    MAX_DRAIN_MS = 10000


cdef struct published:
    uint64_t seq           # odd while the forwarding thread writes this record
    uint64_t gen           # the snapshot request this copy answers
    dir_stats st[2]
    uint64_t ctr[2 * MAX_PORT_COUNTERS]  # port a's counters, then port b's


cdef struct fwd_state:
    fwd_dir d[2]
    const uint64_t *ctr[2] # port a's and port b's live counters (NULL: the port has none)
    uint32_t nctr[2]
    uint64_t want          # snapshot requests made (by other threads)
    int active             # run() is looping (it answers requests)
    published pub
    int stop
    int stop_fd
    int poll_timeout_ms
    uint32_t spin_us       # the pair's idle polling before poll() (README "Latency"); ports may ask more
    uint64_t spin_yields   # polling spells cut short because another task shares the thread's CPU
    uint64_t cpu_moves     # ... of which the thread moved to another CPU and went on polling
    long preempts_seen     # the thread's involuntary context switches when last looked at
    uint32_t preempts_run  # preemptions within SHARED_WINDOW_US of each other, up to now
    uint64_t preempt_last_us
    uint64_t moved_us      # when the thread last moved to another CPU
    bint poll_syncs        # both ports' poll() syncs their rings (the kernel's netmap)
    uint64_t epoch         # loop iterations; a filter swap waits for it to move
    uint64_t polls
    uint64_t max_frames    # stop after this many frames (0: run until stopped)
    uint32_t drain_ms      # the drain's bound (0: none)
    uint64_t drain_us      # how long the last drain took
    uint64_t drain_moved   # RX slots it moved (forwarded or dropped by the filter)
    bint drain_complete    # it ended with nothing left inside (else: at its bound)
    char error[256]


# ---------------------------------------------------------------------------------------
# the hot path

cdef inline uint32_t min3(uint32_t a, uint32_t b, uint32_t c) noexcept nogil:
    if b < a:
        a = b
    return c if c < a else a


cdef inline uint32_t avail(uint32_t from_, uint32_t tail, uint32_t n) noexcept nogil:
    """Slots from `from_` up to `tail` (exclusive) in a ring of n slots."""
    return tail - from_ if tail >= from_ else tail + n - from_


cdef void tap_chain(nmb_tap *tap, unsigned reason, nmb_filter *filt, netmap_ring *rx,
                    uint32_t j, uint32_t n, uint32_t total) noexcept nogil:
    """A chain's verdict to the tap: the bytes of its n slots from RX slot j (at most
    NETMAP_MAX_FRAGS of them, each at most a buffer), `total` on the wire."""
    cdef const uint8_t *bufs[NETMAP_MAX_FRAGS]
    cdef uint32_t lens[NETMAP_MAX_FRAGS]
    cdef uint32_t i
    cdef netmap_slot *rs
    if n > NETMAP_MAX_FRAGS:
        n = NETMAP_MAX_FRAGS
    for i in range(n):
        rs = &rx.slot[j]
        bufs[i] = <const uint8_t *>nmb_buf(rx, rs.buf_idx)
        lens[i] = rs.len if rs.len <= rx.nr_buf_size else rx.nr_buf_size
        j = 0 if j + 1 == rx.num_slots else j + 1
    nmb_tap_offer_v(tap, reason, filt, bufs, lens, n, total)


cdef uint32_t move_chain(fwd_dir *d, nmb_filter *filt, netmap_ring *rx, netmap_ring *tx,
                         uint32_t *pj, uint32_t *pk, int *blocked, uint64_t ring_bit,
                         nmb_tap *tap) noexcept nogil:
    """Move (or drop) the NS_MOREFRAG chain starting at RX slot *pj to TX slot *pk. Returns
    RX slots consumed; 0 with *blocked = 1 (no TX room yet) or 2 (chain not complete yet)."""
    cdef uint32_t j = pj[0], e = pj[0], t = pk[0], n = 0, i, tmp, total = 0
    cdef uint32_t rx_av = avail(j, rx.tail, rx.num_slots)
    cdef bint oversize = False, complete = False
    cdef netmap_slot *rs
    cdef netmap_slot *ts
    while n < rx_av and n <= NETMAP_MAX_FRAGS:
        rs = &rx.slot[e]
        n += 1
        total += rs.len
        if rs.len > rx.nr_buf_size or rs.len > tx.nr_buf_size:
            oversize = True
        e = 0 if e + 1 == rx.num_slots else e + 1
        if not (rs.flags & NS_MOREFRAG):
            complete = True
            break
    if not complete and n < rx.num_slots - 1 and n <= NETMAP_MAX_FRAGS:
        blocked[0] = 2                  # the rest of the chain has not arrived yet
        return 0
    if not complete or n > NETMAP_MAX_FRAGS or n > tx.num_slots - 1:
        d.st.broken_chain += 1          # longer than any ring or NETMAP_MAX_FRAGS allows
        if tap != NULL:
            tap_chain(tap, NMB_CAP_BROKEN_CHAIN, filt, rx, j, n, total)
        if not complete:
            d.skipping |= ring_bit      # its remaining slots are dropped as they arrive
        pj[0] = e
        return n
    if oversize:
        d.st.oversize += 1
        if tap != NULL:
            tap_chain(tap, NMB_CAP_OVERSIZE, filt, rx, j, n, total)
        pj[0] = e
        return n
    if n > avail(t, tx.tail, tx.num_slots):
        blocked[0] = 1
        return 0
    rs = &rx.slot[j]
    if filt != NULL and filt.run(filt, <const uint8_t *>nmb_buf(rx, rs.buf_idx), rs.len) == NMB_DROP:
        d.st.filtered += 1
        if tap != NULL:
            tap_chain(tap, NMB_CAP_FILTERED, filt, rx, j, n, total)
        pj[0] = e
        return n
    if tap != NULL:
        tap_chain(tap, NMB_CAP_FORWARDED, filt, rx, j, n, total)
    for i in range(n):
        rs = &rx.slot[j]
        ts = &tx.slot[t]
        if d.zerocopy:
            tmp = ts.buf_idx
            ts.buf_idx = rs.buf_idx
            rs.buf_idx = tmp
            rs.flags = NS_BUF_CHANGED
            ts.flags = NS_BUF_CHANGED | (NS_MOREFRAG if i + 1 < n else 0)
        else:
            memcpy(nmb_buf(tx, ts.buf_idx), nmb_buf(rx, rs.buf_idx), rs.len)
            ts.flags = NS_MOREFRAG if i + 1 < n else 0
        ts.len = rs.len
        ts.ptr = rs.ptr                 # offload metadata (nmb_port.h), if any
        j = 0 if j + 1 == rx.num_slots else j + 1
        t = 0 if t + 1 == tx.num_slots else t + 1
    d.st.frames += 1
    d.st.bytes += total
    pj[0] = j
    pk[0] = t
    return n


cdef uint32_t skip_rest(fwd_dir *d, netmap_ring *rx, uint64_t ring_bit) noexcept nogil:
    """Drop what is left of a broken chain: slots up to and including its last one."""
    cdef uint32_t j = rx.head, n = 0
    cdef uint16_t fl
    while j != rx.tail:
        fl = rx.slot[j].flags
        j = 0 if j + 1 == rx.num_slots else j + 1
        n += 1
        if not (fl & NS_MOREFRAG):
            d.skipping &= ~ring_bit
            break
    rx.head = rx.cur = j
    return n


cdef inline bint filter_drops(nmb_filter *filt, netmap_ring *rx, netmap_slot *rs, uint32_t j,
                              uint32_t rx_n, uint32_t len_) noexcept nogil:
    cdef uint32_t ahead = j + 4
    if ahead >= rx_n:
        ahead -= rx_n
    NMB_PREFETCH(nmb_buf(rx, rx.slot[ahead].buf_idx))
    return filt.run(filt, <const uint8_t *>nmb_buf(rx, rs.buf_idx), len_) == NMB_DROP


cdef inline uint32_t window(fwd_dir *d, nmb_filter *filt, netmap_ring *rx, netmap_ring *tx,
                            uint32_t *pj, uint32_t *pk, uint32_t m, const bint zc,
                            const bint filtering, uint64_t *frames, uint64_t *nbytes,
                            nmb_tap *tap, const bint tapping) noexcept nogil:
    """Single-slot frames of a window of m slots that both rings own; stops at a chain.
    Returns slots consumed. The bint modes are constants at each call site (`tapping`: offer
    each verdict to `tap`; the untapped copies have no trace of it)."""
    cdef uint32_t j = pj[0], k = pk[0], i = 0, tmp, len_, dropped = 0
    cdef uint32_t max_len = rx.nr_buf_size if rx.nr_buf_size < tx.nr_buf_size else tx.nr_buf_size
    cdef uint32_t rx_n = rx.num_slots, tx_n = tx.num_slots
    cdef netmap_slot *rs
    cdef netmap_slot *ts
    while i < m:
        rs = &rx.slot[j]
        len_ = rs.len
        # one well-predicted branch for both rare cases: a chain starts, or a bad len
        if NMB_UNLIKELY((rs.flags & NS_MOREFRAG) | (len_ > max_len)):
            if rs.flags & NS_MOREFRAG:
                break
            d.st.oversize += 1
            dropped += 1
            if tapping:
                nmb_tap_offer(tap, NMB_CAP_OVERSIZE, filt, <const uint8_t *>nmb_buf(rx, rs.buf_idx),
                              len_ if len_ <= rx.nr_buf_size else rx.nr_buf_size, len_)
        elif filtering and filter_drops(filt, rx, rs, j, rx_n, len_):
            d.st.filtered += 1
            dropped += 1
            if tapping:
                nmb_tap_offer(tap, NMB_CAP_FILTERED, filt, <const uint8_t *>nmb_buf(rx, rs.buf_idx),
                              len_, len_)
        else:
            if tapping:                 # before the swap: the frame is still in rs's buffer
                nmb_tap_offer(tap, NMB_CAP_FORWARDED, filt, <const uint8_t *>nmb_buf(rx, rs.buf_idx),
                              len_, len_)
            ts = &tx.slot[k]
            if zc:
                tmp = ts.buf_idx
                ts.buf_idx = rs.buf_idx
                rs.buf_idx = tmp
                rs.flags = NS_BUF_CHANGED
                ts.flags = NS_BUF_CHANGED
            else:
                memcpy(nmb_buf(tx, ts.buf_idx), nmb_buf(rx, rs.buf_idx), len_)
                ts.flags = 0
            ts.len = <uint16_t>len_
            ts.ptr = rs.ptr             # offload metadata (nmb_port.h), if any
            k = 0 if k + 1 == tx_n else k + 1
            nbytes[0] += len_
        j = 0 if j + 1 == rx_n else j + 1
        i += 1
    frames[0] += i - dropped
    pj[0] = j
    pk[0] = k
    return i


cdef uint32_t move_ring(fwd_dir *d, nmb_filter *filt, netmap_ring *rx, netmap_ring *tx,
                        uint32_t limit, int *blocked, uint64_t ring_bit, nmb_tap *tap) noexcept nogil:
    """Move up to about `limit` RX slots of one ring pair (a chain may finish past it).
    Returns RX slots consumed; sets *blocked when TX is full or a chain must wait."""
    cdef uint32_t j = rx.head, k = tx.head, done = 0, m, i, got, rx_av, tx_av
    cdef uint32_t rx_n = rx.num_slots, tx_n = tx.num_slots
    cdef uint64_t frames = 0, nbytes = 0
    cdef bint zc = d.zerocopy
    if NMB_UNLIKELY(d.skipping & ring_bit):
        done = skip_rest(d, rx, ring_bit)
        j = rx.head
        if d.skipping & ring_bit:
            return done
    while done < limit:
        rx_av = avail(j, rx.tail, rx_n)
        if rx_av == 0:
            break
        tx_av = avail(k, tx.tail, tx_n)
        if tx_av == 0:
            blocked[0] = 1              # frames wait, this TX ring is full
            break
        m = min3(rx_av, tx_av, limit - done)
        # four copies of one window loop, each with its mode fixed at compile time, and a
        # fifth, general one for a direction with a capture running
        if NMB_UNLIKELY(tap != NULL):
            i = window(d, filt, rx, tx, &j, &k, m, zc, filt != NULL, &frames, &nbytes, tap, True)
        elif zc:
            if filt == NULL:
                i = window(d, NULL, rx, tx, &j, &k, m, True, False, &frames, &nbytes, NULL, False)
            else:
                i = window(d, filt, rx, tx, &j, &k, m, True, True, &frames, &nbytes, NULL, False)
        elif filt == NULL:
            i = window(d, NULL, rx, tx, &j, &k, m, False, False, &frames, &nbytes, NULL, False)
        else:
            i = window(d, filt, rx, tx, &j, &k, m, False, True, &frames, &nbytes, NULL, False)
        done += i
        if i < m:                       # a chain starts at slot j
            got = move_chain(d, filt, rx, tx, &j, &k, blocked, ring_bit, tap)
            if got == 0:
                break
            done += got
    rx.head = rx.cur = j
    tx.head = tx.cur = k
    d.st.frames += frames
    d.st.bytes += nbytes
    return done


cdef uint32_t move_dir(fwd_dir *d) noexcept nogil:
    """One batch of one direction: up to `burst` RX slots over all ring pairs."""
    cdef nmb_port *src = d.src
    cdef nmb_port *dst = d.dst
    cdef uint32_t si = src.rx_first, di = dst.tx_first, done = 0, got
    cdef netmap_ring *rx
    cdef int blocked
    cdef nmb_filter *filt = NMB_LOAD_PTR(d.filter)
    cdef nmb_tap *tap = NMB_LOAD_TAP(d.tap)
    d.chain_wait = False
    while si < src.rx_last and di < dst.tx_last and done < d.burst:
        rx = nmb_rxring(src.nifp, si)
        if nmb_ring_empty(rx):
            si += 1
            continue
        blocked = 0
        got = move_ring(d, filt, rx, nmb_txring(dst.nifp, di), d.burst - done, &blocked,
                        1ULL << ((si - src.rx_first) & 63), tap)
        done += got
        if blocked == 1:
            di += 1                     # this TX ring is full: try the next one
        elif blocked == 2:
            si += 1                     # an unfinished chain: the rest of it comes later
            d.chain_wait = True
    if done:
        d.st.batches += 1
    if di >= dst.tx_last:
        d.st.tx_stalls += 1             # frames wait and every TX ring is full (not a drop)
    return done


cdef bint rx_pending(nmb_port *p) noexcept nogil:
    cdef uint32_t i
    for i in range(p.rx_first, p.rx_last):
        if not nmb_ring_empty(nmb_rxring(p.nifp, i)):
            return True
    return False


cdef bint tx_idle(nmb_port *p) noexcept nogil:
    """Every TX ring of `p` is back with the user whole: all it was given went out."""
    cdef uint32_t i
    cdef netmap_ring *tx
    for i in range(p.tx_first, p.tx_last):
        tx = nmb_txring(p.nifp, i)
        if nmb_ring_space(tx) != tx.num_slots - 1:
            return False
    return True


cdef int port_failed(fwd_state *f, nmb_port *p, const char *what, int rc) noexcept nogil:
    cdef const char *msg = strerror(-rc)
    if p.error[0]:
        msg = &p.error[0]
    cdef size_t i = 0, n
    # "<what>: <msg>" without snprintf's format-truncation noise
    n = 0
    while what[n] and i < sizeof(f.error) - 1:
        f.error[i] = what[n]
        i += 1
        n += 1
    if i < sizeof(f.error) - 3:
        f.error[i] = b':'
        f.error[i + 1] = b' '
        i += 2
    n = 0
    while msg[n] and i < sizeof(f.error) - 1:
        f.error[i] = msg[n]
        i += 1
        n += 1
    f.error[i] = 0
    return -1


cdef int sync_dir(fwd_state *f, fwd_dir *d) noexcept nogil:
    """txsync the destination (push out, reclaim), rxsync the source (release, refill)."""
    cdef int rc = d.dst.txsync(d.dst)
    if rc < 0:
        return port_failed(f, d.dst, b"txsync", rc)
    rc = d.src.rxsync(d.src)
    if rc < 0:
        return port_failed(f, d.src, b"rxsync", rc)
    return 0


cdef int sync_all(fwd_state *f) noexcept nogil:
    if f.d[0].enabled and sync_dir(f, &f.d[0]) < 0:
        return -1
    if f.d[1].enabled and sync_dir(f, &f.d[1]) < 0:
        return -1
    return 0


cdef uint64_t now_us() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000 + <uint64_t>ts.tv_nsec // 1000


cdef long preempted() noexcept nogil:
    """Times the calling thread was preempted so far (involuntary context switches)."""
    cdef rusage ru
    if getrusage(RUSAGE_THREAD, &ru) != 0:
        return -1
    return ru.ru_nivcsw


# A polling thread shares its CPU when it is preempted SHARED_PREEMPTS times, each within
# SHARED_WINDOW_US of the one before.  A lone preemption (a kworker, RCU: a few a second on a
# quiet CPU) is not sharing: sleeping for it would cost the next frame a wake-up.  A task that
# does share the CPU preempts the poller at each of its wake-ups or scheduler slices (ms apart).
# A thread that moved less than MOVE_INTERVAL_US ago and still shares its CPU sleeps instead
# of moving on: every CPU it may use is busy.
cdef enum:
    SHARED_PREEMPTS = 3
    SHARED_WINDOW_US = 50000
    MOVE_INTERVAL_US = 100000


cdef bint shares_cpu(fwd_state *f) noexcept nogil:
    """Whether another task keeps taking this thread's CPU (see SHARED_PREEMPTS)."""
    cdef long p = preempted()
    cdef uint64_t t
    if p == f.preempts_seen or p < 0:
        return False
    t = now_us()
    if t - f.preempt_last_us > SHARED_WINDOW_US:
        f.preempts_run = 0
    f.preempts_run += <uint32_t>(p - f.preempts_seen)
    f.preempts_seen = p
    f.preempt_last_us = t
    if f.preempts_run < SHARED_PREEMPTS:
        return False
    f.preempts_run = 0
    return True


cdef bint move_cpu(fwd_state *f) noexcept nogil:
    """Move the calling thread off its CPU onto another it may run on (its affinity is left
    as it was); False when it has no other, or moved within MOVE_INTERVAL_US."""
    cdef cpu_set_t allowed, others
    cdef uint64_t t = now_us()
    if f.moved_us and t - f.moved_us < MOVE_INTERVAL_US:
        return False
    if sched_getaffinity(0, sizeof(allowed), &allowed) != 0 or CPU_COUNT(&allowed) < 2:
        return False
    others = allowed
    CPU_CLR(sched_getcpu(), &others)
    if sched_setaffinity(0, sizeof(others), &others) != 0:  # migrates the thread at once
        return False
    sched_setaffinity(0, sizeof(allowed), &allowed)  # allowed again; it stays where it is
    f.moved_us = t
    f.cpu_moves += 1
    return True


cdef int spin(fwd_state *f, nmb_port *a, nmb_port *b) noexcept nogil:
    """Both sources idle: keep syncing for the longest of the pair's spin_us and its ports'
    (their busy_poll) before the loop sleeps in poll(), so a frame that comes meanwhile is
    taken without a wake-up.  A polling thread that shares its CPU with another task (see
    shares_cpu) moves to another CPU it may use and polls on there; the scheduler would not
    move it (it places a thread when it wakes, never while it runs, and the wake-up of a
    frame's receiver tends to pull it next to the sender).  Where it cannot (one CPU allowed,
    or it moved moments ago: every CPU is busy), it stops polling and sleeps, since a polling
    thread gets its CPU back only in scheduler turns while a sleeping one is woken by the next
    frame.  1: a frame came; 0: the time is up, the CPU is shared, or a stop is asked; -1: a
    sync failed."""
    cdef uint32_t us = a.spin_us if a.spin_us > b.spin_us else b.spin_us
    cdef uint64_t end
    cdef uint32_t n = 0
    if f.spin_us > us:
        us = f.spin_us
    if us == 0 or (f.d[0].enabled and rx_pending(a)) or (f.d[1].enabled and rx_pending(b)):
        return 0
    end = now_us() + us
    while not NMB_LOAD_INT(f.stop):
        if sync_all(f) < 0:
            return -1
        if (f.d[0].enabled and rx_pending(a)) or (f.d[1].enabled and rx_pending(b)):
            return 1
        if now_us() >= end:
            break
        n += 1
        if n % 64 == 0 and shares_cpu(f) and not move_cpu(f):
            f.spin_yields += 1  # sleep; the next frame's wake-up places the thread
            break
    return 0


cdef inline void want(fwd_dir *d, pollfd *src, pollfd *dst) noexcept nogil:
    """What one direction waits for (bridge.c's discipline): room on the destination while
    the source holds frames it can move, else new frames (and the release of the consumed
    ones) on the source -- also when all it holds is a chain whose rest has not arrived."""
    if not d.enabled:
        return
    if rx_pending(d.src) and not d.chain_wait:
        dst.events |= POLLOUT
    else:
        src.events |= POLLIN


cdef int poll_ports(fwd_state *f, pollfd *fds) noexcept nogil:
    """One poll() on both ports, for what each direction waits for, and on the stop eventfd
    (drained when it fired).  0, or -1 with the pair failed."""
    cdef nmb_port *a = f.d[0].src
    cdef uint64_t v
    cdef int rc
    fds[0].fd = a.fd
    fds[1].fd = f.d[0].dst.fd
    fds[2].fd = f.stop_fd
    fds[0].events = fds[1].events = fds[0].revents = fds[1].revents = fds[2].revents = 0
    fds[2].events = POLLIN
    want(&f.d[0], &fds[0], &fds[1])
    want(&f.d[1], &fds[1], &fds[0])
    f.polls += 1
    rc = poll(fds, 3, f.poll_timeout_ms)
    if rc < 0 and errno != EINTR:
        return port_failed(f, a, b"poll", -errno)
    if fds[2].revents & POLLIN:
        read(f.stop_fd, &v, sizeof(v))
    return 0


cdef int wait(fwd_state *f) noexcept nogil:
    """Nothing could move (user-memory ports): busy-poll for as long as a port asks
    (spin_us), else poll() for what each direction needs, then sync: the backends play the
    NIC at sync time."""
    cdef pollfd fds[3]
    cdef int rc = spin(f, f.d[0].src, f.d[0].dst)
    if rc != 0:
        return rc if rc < 0 else 0
    if poll_ports(f, fds) < 0:
        return -1
    return sync_all(f)


cdef int poll_round(fwd_state *f) noexcept nogil:
    """Both ports are the kernel's netmap: one poll() per round, as netmap's bridge.c does.
    The kernel's netmap_poll() txsyncs every TX ring with new slots (ports are registered
    without NR_NO_TX_POLL), txsyncs all TX rings of an fd asked for POLLOUT, and rxsyncs the
    RX rings of an fd asked for POLLIN -- so the frames just moved go out, the slots just
    consumed go back, and the call sleeps only when no direction can progress: a source with
    nothing to read waits for frames, a destination that is full waits for room."""
    cdef pollfd fds[3]
    if poll_ports(f, fds) < 0:
        return -1
    # POLLERR: a sync inside poll() failed; the ioctls say why (and fail the pair if it lasts)
    if fds[0].revents & (POLLERR | POLLNVAL) or fds[1].revents & (POLLERR | POLLNVAL):
        return sync_all(f)
    return 0


cdef void publish(fwd_state *f) noexcept nogil:
    """Copy every counter into the published record (forwarding thread, batch boundary)."""
    cdef uint64_t seq = f.pub.seq
    cdef uint64_t asked = NMB_PEEK_U64(f.want)
    cdef int i
    NMB_STORE_U64(f.pub.seq, seq + 1)
    NMB_FENCE_RELEASE()
    f.pub.st[0] = f.d[0].st
    f.pub.st[1] = f.d[1].st
    for i in range(2):
        if f.ctr[i] != NULL:
            memcpy(&f.pub.ctr[i * MAX_PORT_COUNTERS], f.ctr[i], f.nctr[i] * sizeof(uint64_t))
    NMB_STORE_U64(f.pub.seq, seq + 2)
    NMB_STORE_U64(f.pub.gen, asked)


cdef void read_published(fwd_state *f, published *out) noexcept nogil:
    """A consistent copy of the published record (any thread)."""
    cdef uint64_t s1, s2
    while True:
        s1 = NMB_LOAD_U64(f.pub.seq)
        if s1 & 1:
            continue
        memcpy(out, &f.pub, sizeof(published))
        NMB_FENCE_ACQUIRE()
        s2 = NMB_PEEK_U64(f.pub.seq)
        if s1 == s2:
            return


cdef void await_published(fwd_state *f, uint64_t req, uint32_t timeout_us) noexcept nogil:
    """Until the loop has answered request `req`, stopped looping, or `timeout_us` passed."""
    cdef uint32_t waited = 0
    while NMB_LOAD_U64(f.pub.gen) < req and NMB_LOAD_INT(f.active) and waited < timeout_us:
        usleep(50)
        waited += 50


cdef int run_loop(fwd_state *f) noexcept nogil:
    cdef uint32_t moved
    f.preempts_seen = preempted()   # this thread's, from here on
    f.preempts_run = 0
    while not NMB_LOAD_INT(f.stop):
        if NMB_UNLIKELY(NMB_PEEK_U64(f.want) != f.pub.gen):
            publish(f)                  # a snapshot was asked for: here no frame is half-way
        f.epoch += 1
        moved = 0
        if f.d[0].enabled:
            moved += move_dir(&f.d[0])
        if f.d[1].enabled:
            moved += move_dir(&f.d[1])
        if moved and f.max_frames and f.d[0].st.frames + f.d[1].st.frames >= f.max_frames:
            return sync_all(f)          # push the last frames out without waiting
        if f.poll_syncs:
            if poll_round(f) < 0:       # the one system call of a round: syncs and waits
                return -1
        elif moved:
            if sync_all(f) < 0:         # user memory: the backend plays the NIC at sync time
                return -1
        elif wait(f) < 0:
            return -1
    return 0


cdef void drain(fwd_state *f) noexcept nogil:
    """After a stop, before the ports close: forward what is already inside the bridge -- the
    frames in the sources' RX rings, on the destinations' TX slots, in their kernels' TX
    rings -- for at most `drain_ms`.  The rounds are the loop's own (move_dir, then a txsync
    of each destination), without the rxsync: nothing new is taken from the kernel, so what
    is inside can only go out.  Ends when no source RX ring holds a frame and every
    destination TX ring is back whole, or at the bound (a full or dead egress, a chain whose
    rest never came) or at a failing txsync (the stop goes on: the pair does not fail at its
    end, and the port keeps its error): what is left then is the pair's ``stopped`` drops
    (nmbridge.accounting).  A round that moved nothing waits 100 µs, not poll(): some fds are
    always writable."""
    cdef uint64_t start = now_us(), bound = <uint64_t>f.drain_ms * 1000
    cdef uint32_t moved
    cdef int i
    cdef bint left = True, failed = False
    f.drain_moved = 0
    while not failed:
        if NMB_UNLIKELY(NMB_PEEK_U64(f.want) != f.pub.gen):
            publish(f)                  # snapshots are answered while draining too
        f.epoch += 1
        moved = 0
        for i in range(2):
            if f.d[i].enabled:
                moved += move_dir(&f.d[i])
        for i in range(2):
            if f.d[i].enabled and f.d[i].dst.txsync(f.d[i].dst) < 0:
                failed = True
        f.drain_moved += moved
        left = False
        for i in range(2):
            if f.d[i].enabled and (rx_pending(f.d[i].src) or not tx_idle(f.d[i].dst)):
                left = True
        if not left or now_us() - start >= bound:
            break
        if moved == 0:
            usleep(100)
    f.drain_us = now_us() - start
    f.drain_complete = not left


# ---------------------------------------------------------------------------------------
# the Python face

_DIRECTIONS = ("a_to_b", "b_to_a")


cdef dict stats_dict(dir_stats *s):
    return {"frames": s.frames, "bytes": s.bytes, "batches": s.batches, "tx_stalls": s.tx_stalls,
            "oversize": s.oversize, "broken_chain": s.broken_chain, "filtered": s.filtered}


cdef class Forwarder:
    """Forward frames between ports `a` and `b`: ``direction`` is "both", "a-to-b" or "b-to-a".

    :meth:`run` blocks (without the GIL) until :meth:`stop`; call it from a thread.
    :meth:`step` does one batch and one sync, for tests.  :meth:`stats` may be read at any time.
    """

    cdef fwd_state st
    cdef readonly Port a
    cdef readonly Port b
    cdef readonly str direction
    cdef readonly bint zerocopy
    cdef readonly uint32_t burst
    cdef object _filters
    cdef object _taps
    cdef list _retired
    cdef bint _running

    def __cinit__(self):
        self.st.stop_fd = -1

    def __init__(self, Port a not None, Port b not None, *, int burst=1024, str direction="both",
                 int poll_timeout_ms=1000, zerocopy=None, int spin_us=0, int drain_ms=DRAIN_MS):
        """`zerocopy`: None swaps buffers when both ports share a memory region (else copies),
        False forces copying (benchmarks), True insists on swapping (ValueError if impossible).
        `drain_ms`: after stop(), :meth:`run` forwards what is already inside the bridge for at
        most this long before it returns (0: it returns at once; see ``drain``)."""
        if a.c == NULL or b.c == NULL:
            raise PortError("cannot forward between closed ports")
        if a is b:
            raise ValueError("a pair needs two different ports")
        if not 1 <= burst <= 8192:
            raise ValueError(f"burst {burst} outside [1, 8192]")
        if direction not in ("both", "a-to-b", "b-to-a"):
            raise ValueError(f"direction must be both, a-to-b or b-to-a, not {direction!r}")
        if poll_timeout_ms < 1:
            raise ValueError("poll_timeout_ms must be >= 1")
        if not 0 <= spin_us <= MAX_SPIN_US:
            raise ValueError(f"spin_us {spin_us} outside [0, {MAX_SPIN_US}]")
        if not 0 <= drain_ms <= MAX_DRAIN_MS:
            raise ValueError(f"drain_ms {drain_ms} outside [0, {MAX_DRAIN_MS}]")
        self.a, self.b = a, b
        self.direction = direction
        self.burst = burst
        if zerocopy and a.c.mem_key != b.c.mem_key:
            raise ValueError(f"{a.spec} and {b.spec} live in different memory regions: "
                             "zero-copy forwarding is impossible between them")
        self.zerocopy = a.c.mem_key == b.c.mem_key and zerocopy is not False
        self._filters = [None, None]
        self._taps = [None, None]
        self._retired = []
        self.st.d[0].src, self.st.d[0].dst = a.c, b.c
        self.st.d[1].src, self.st.d[1].dst = b.c, a.c
        self.st.d[0].enabled = direction in ("both", "a-to-b")
        self.st.d[1].enabled = direction in ("both", "b-to-a")
        for i in range(2):
            self.st.d[i].zerocopy = self.zerocopy
            self.st.d[i].burst = burst
            self.st.d[i].filter = NULL
            self.st.d[i].tap = NULL
        self.st.poll_timeout_ms = poll_timeout_ms
        self.st.spin_us = <uint32_t>spin_us
        self.st.drain_ms = <uint32_t>drain_ms
        self.st.poll_syncs = a.c.poll_syncs != 0 and b.c.poll_syncs != 0
        cdef size_t addr, nbytes
        for i, port in enumerate((a, b)):
            addr, nbytes = port.counters_buffer()
            if nbytes % sizeof(uint64_t) or nbytes > MAX_PORT_COUNTERS * sizeof(uint64_t):
                raise ValueError(f"{port.spec}: {nbytes} bytes of counters (at most "
                                 f"{MAX_PORT_COUNTERS} uint64_t)")
            self.st.ctr[i] = <const uint64_t *>addr
            self.st.nctr[i] = <uint32_t>(nbytes // sizeof(uint64_t)) if addr else 0
        publish(&self.st)
        # a port hands offload requests (nmb_port.h) on only to a peer that takes them
        a.c.peer_offloads = b.c.offloads if self.st.d[0].enabled else 0
        b.c.peer_offloads = a.c.offloads if self.st.d[1].enabled else 0
        for src, dst, on in ((a, b, self.st.d[0].enabled), (b, a, self.st.d[1].enabled)):
            if on and src.c.offloads & NMB_OFFLOAD_META and not dst.c.offloads & NMB_OFFLOAD_META:
                logging.getLogger("nmbridge.fastfwd").warning(
                    "gso_not_carried: %s -> %s: GSO super-frames that local stacks behind %s send "
                    "(TSO/GSO on, the Linux default) cannot be segmented by %s: they are dropped and "
                    "counted (rx_gso_dropped); turn TSO/GSO off on those hosts or bridge to an "
                    "afpacket: port", src.spec, dst.spec, src.spec, dst.spec)
        self.st.stop_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self.st.stop_fd < 0:
            raise OSError(errno, strerror(errno).decode())

    def __dealloc__(self):
        if self.st.stop_fd >= 0:
            close(self.st.stop_fd)

    def _alive(self):
        if self.a.c == NULL or self.b.c == NULL:
            raise PortError(f"{self.a.spec} <-> {self.b.spec}: a port was closed")

    def run(self, *, max_frames: int = 0) -> None:
        """Forward until stop() (or until `max_frames` frames moved). Raises PortError.
        After stop() -- even one called before run() started -- the loop ends at its next batch
        boundary, drains what is inside the bridge (at most `drain_ms`; :attr:`drained` says
        how it went) and returns."""
        self._alive()
        if self._running:
            raise RuntimeError("this forwarder is already running")
        self._running = True
        self.st.max_frames = max_frames
        self.st.error[0] = 0           # stop() is sticky: one that came before run() counts
        self.st.drain_us = self.st.drain_moved = 0
        self.st.drain_complete = False
        cdef int rc
        NMB_STORE_INT(self.st.active, 1)
        try:
            # the first batch needs frames: sync once before looping
            with nogil:
                rc = sync_all(&self.st)
                if rc == 0:
                    rc = run_loop(&self.st)
                if rc == 0 and NMB_LOAD_INT(self.st.stop) and self.st.drain_ms:
                    drain(&self.st)
                publish(&self.st)       # the final counters; snapshots read them from now on
                NMB_STORE_INT(self.st.active, 0)
        finally:
            self._running = False
        if rc != 0:
            raise PortError(f"{self.a.spec} <-> {self.b.spec}: "
                            f"{self.st.error.decode(errors='replace')}")

    def stop(self) -> None:
        """Ask the loop to return at the next batch boundary (safe from any thread)."""
        cdef uint64_t one = 1
        NMB_STORE_INT(self.st.stop, 1)
        write(self.st.stop_fd, &one, sizeof(one))

    def step(self) -> int:
        """One batch in each enabled direction, then one sync of every port; returns slots moved."""
        self._alive()
        if self._running:
            raise RuntimeError("step() while run() is forwarding")
        cdef uint32_t moved = 0
        if self.st.d[0].enabled:
            moved += move_dir(&self.st.d[0])
        if self.st.d[1].enabled:
            moved += move_dir(&self.st.d[1])
        cdef int rc = sync_all(&self.st)
        publish(&self.st)
        if rc < 0:
            raise PortError(f"{self.a.spec} <-> {self.b.spec}: "
                            f"{self.st.error.decode(errors='replace')}")
        return moved

    def stats(self) -> dict:
        """Counters per direction (only the enabled ones), plus loop totals."""
        out = {}
        for i in range(2):
            if self.st.d[i].enabled:
                out[_DIRECTIONS[i]] = stats_dict(&self.st.d[i].st)
        return out

    def ask_snapshot(self) -> int:
        """Ask a running loop for a snapshot now, without waiting (0 when it is not running):
        pass the answer to :meth:`snapshot` -- so several forwarders (one pair's workers) are
        asked at once and each copies its counters at its next batch boundary."""
        cdef uint64_t req = 0
        if NMB_LOAD_INT(self.st.active):
            req = NMB_ADD_U64(self.st.want, 1)
            self.stop_wake()
        return req

    def snapshot(self, double timeout=0.5, asked=None) -> dict:
        """Every counter of this pair at one batch boundary (safe from any thread while the
        loop runs): ``{"a_to_b": {...}, "b_to_a": {...}, "ports": {"a": {...}, "b": {...}}}``,
        the directions as :meth:`stats` (enabled ones only), the ports as their backends'
        ``decode_counters``.  A loop that does not answer within `timeout` seconds (stuck
        in a system call) gives its last published copy: older, still consistent.
        `asked`: what :meth:`ask_snapshot` returned (None: ask now)."""
        cdef uint64_t req = self.ask_snapshot() if asked is None else asked
        cdef published copy
        if req:
            with nogil:
                await_published(&self.st, req, <uint32_t>(timeout * 1e6))
        with nogil:
            read_published(&self.st, &copy)
        out = {}
        for i in range(2):
            if self.st.d[i].enabled:
                out[_DIRECTIONS[i]] = stats_dict(&copy.st[i])
        ports = {}
        for i, port in enumerate((self.a, self.b)):
            raw = (<char *>&copy.ctr[i * MAX_PORT_COUNTERS])[:self.st.nctr[i] * sizeof(uint64_t)]
            ports["ab"[i]] = port.decode_counters(raw)
        out["ports"] = ports
        return out

    @property
    def polls(self) -> int:
        return self.st.polls

    @property
    def drained(self) -> dict:
        """The last drain at stop: ``us`` it took, RX slots it ``moved``, and whether it was
        ``complete`` (nothing left inside; else it reached `drain_ms` and what was left is
        counted as ``stopped``).  Read it after :meth:`run` returned."""
        return {"us": self.st.drain_us, "moved": self.st.drain_moved, "complete": bool(self.st.drain_complete)}

    @property
    def cpu_moves(self) -> int:
        """Times the polling thread, sharing its CPU, moved to another and went on polling."""
        return self.st.cpu_moves

    @property
    def spin_yields(self) -> int:
        """Polling spells the loop cut short because another task shares its CPU and it could
        not move to another (it sleeps then: the next frame's wake-up places it)."""
        return self.st.spin_yields

    @property
    def spin_us(self) -> int:
        """µs the loop keeps polling its idle rings before it sleeps in poll() (0: it sleeps
        at once); a port's own busy_poll counts when longer."""
        return self.st.spin_us

    @spin_us.setter
    def spin_us(self, int us) -> None:
        if self._running:
            raise RuntimeError("spin_us is set before run()")
        if not 0 <= us <= MAX_SPIN_US:
            raise ValueError(f"spin_us {us} outside [0, {MAX_SPIN_US}]")
        self.st.spin_us = <uint32_t>us

    @property
    def running(self) -> bool:
        return self._running

    def _swapped(self, old) -> None:
        """After a pointer the loop reads once per batch (filter, tap) was replaced: wait until
        the loop is two epochs on, so the batch that might have held the old one has ended; a
        stuck loop may still hold `old` (if any), which is then kept alive, never freed."""
        import time
        cdef uint64_t seen = self.st.epoch
        deadline = time.monotonic() + 5.0
        while self._running and self.st.epoch < seen + 2 and time.monotonic() < deadline:
            self.stop_wake()
            time.sleep(0.0005)
        if self._running and self.st.epoch < seen + 2 and old is not None:
            self._retired.append(old)

    def set_filter(self, str direction, filt) -> None:
        """Install a compiled filter (an object with ``address``, the C ``struct nmb_filter *``)
        for "a_to_b" or "b_to_a", or None for no filter. The loop picks it up between batches;
        this returns once the old filter can no longer be in use."""
        cdef int i = _DIRECTIONS.index(direction)
        cdef size_t addr = 0 if filt is None else filt.address
        cdef object old = self._filters[i]
        self._filters[i] = filt
        NMB_STORE_PTR(self.st.d[i].filter, <nmb_filter *>addr)
        if self._running and old is not None:
            self._swapped(old)

    def set_tap(self, str direction, tap) -> None:
        """Install a capture tap (an object with ``address``, the C ``struct nmb_tap *``; see
        nmbridge.capring) for "a_to_b" or "b_to_a", or None to remove it.  The loop picks it up
        between batches; this returns once the change is in force (a new tap sees every frame
        that arrives from now on; a removed one can no longer be written to)."""
        cdef int i = _DIRECTIONS.index(direction)
        cdef size_t addr = 0 if tap is None else tap.address
        cdef object old = self._taps[i]
        self._taps[i] = tap
        NMB_STORE_TAP(self.st.d[i].tap, <nmb_tap *>addr)
        if self._running and (old is not None or tap is not None):
            self._swapped(old)

    def tap(self, str direction):
        return self._taps[_DIRECTIONS.index(direction)]

    def stop_wake(self) -> None:
        """Wake a loop sleeping in poll() without stopping it."""
        cdef uint64_t one = 1
        write(self.st.stop_fd, &one, sizeof(one))

    def filter(self, str direction):
        return self._filters[_DIRECTIONS.index(direction)]
