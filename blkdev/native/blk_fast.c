/* The virtio-blk fast path in C: plain reads and writes of a raw image, served on the queue's
 * worker thread with the GIL released.
 *
 * Only chains of the shape every Linux guest sends for READ and WRITE are served here: direct
 * descriptors (no INDIRECT), a 16-byte device-readable header first, one to max_segs data
 * buffers all of the request's direction, and a 1-byte device-writable status last, every
 * buffer inside one guest memory region, the range inside the disk. Anything else (FLUSH,
 * GET_ID, DISCARD, an indirect table, a fault of any kind) is left where it is, untouched, and
 * the caller pops it through the Python path, which owns every other rule and every error
 * answer. So this code never decides a guest fault: it only recognises the plainly valid.
 *
 * Ordering (virtio 1.2 section 2.7.13), with __atomic operations on the fields the driver reads
 * or writes concurrently: avail->idx loaded with acquire before the ring entry and the
 * descriptors it publishes; the descriptor read once, into locals, before being checked and
 * used; the status byte and the used element stored before used->idx (release). Inflight
 * tracking (docs/interop/vhost-user.rst, "Inflight I/O tracking"): counter then flag before
 * the I/O; last_batch_head before the used element; flag cleared and used_idx after used->idx.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>

#include "blk_fast.h"

#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define T_IN 0
#define T_OUT 1
#define S_OK 0
#define S_IOERR 1

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The host address of [gpa, gpa+len) if it lies inside one region, else NULL. */
static uint8_t *translate(const struct vub_fast *f, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < f->nregions; i++) {
        const struct vub_region *r = &f->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size && len <= r->size - (gpa - r->gpa))
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

static struct desc load_desc(const struct vub_fast *f, uint16_t index)
{
    struct desc d;
    /* One copy into locals: a driver rewriting the descriptor cannot make what we check
     * differ from what we use. */
    memcpy(&d, f->desc + 16u * index, sizeof d);
    return d;
}

/* Inflight region of one queue: 16-byte header (features, version, desc_num,
 * last_batch_head, used_idx), then 16-byte entries (inflight u8, pad, next u16, counter u64). */
static void inflight_popped(struct vub_fast *f, uint16_t head)
{
    if (!f->inflight)
        return;
    uint8_t *e = f->inflight + 16 + 16u * head;
    __atomic_store_n((uint64_t *)(e + 8), f->inflight_counter++, __ATOMIC_RELAXED);
    __atomic_store_n(e, (uint8_t)1, __ATOMIC_RELEASE);
}

static void record_latency(struct vub_fast *f, uint64_t ns)
{
    unsigned b = 0;
    while (b < VUB_FAST_LAT_BOUNDS && ns > f->lat_bounds_ns[b])
        b++;
    f->lat_buckets[b]++;
    f->lat_sum_ns += ns;
}

/* Whether to signal the driver for what was pushed since the last decision, as
 * SplitVirtqueue.should_notify decides it (virtio 2.7.7.2), updating the same state. */
static int should_notify(struct vub_fast *f)
{
    /* Full barrier: our used->idx store visible before we load used_event / avail->flags
     * (else the driver may re-enable interrupts and miss the one we decide not to send). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint16_t new_idx = f->used_idx, old_idx = f->signalled_used;
    int valid = f->signalled_valid;
    f->signalled_used = new_idx;
    f->signalled_valid = 1;
    if (!valid)
        return 1;
    uint16_t *avail = (uint16_t *)f->avail;
    if (f->event_idx) {
        uint16_t event = __atomic_load_n(&avail[2 + f->size], __ATOMIC_ACQUIRE);
        return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
    }
    if (new_idx == old_idx)
        return 0;
    return !(__atomic_load_n(&avail[0], __ATOMIC_ACQUIRE) & 1);
}

int vub_fast_serve(struct vub_fast *f, uint32_t budget, int *punt, int *notify)
{
    uint16_t *avail_idx_p = (uint16_t *)(f->avail + 2);
    uint16_t *avail_ring = (uint16_t *)(f->avail + 4);
    uint16_t *used_idx_p = (uint16_t *)(f->used + 2);
    uint32_t *used_ring = (uint32_t *)(f->used + 4);
    uint32_t mask = f->size - 1;
    int served = 0;
    int unsignalled = 0; /* pushed since the last notification decision */
    *punt = 0;
    *notify = 0;

    while ((uint32_t)served < budget) {
        if (f->next_avail == f->shadow_avail) {
            uint16_t idx = __atomic_load_n(avail_idx_p, __ATOMIC_ACQUIRE);
            uint16_t pending = (uint16_t)(idx - f->next_avail);
            if (pending == 0 && unsignalled) {
                /* Emptied: tell the driver (through the caller) before waiting for more. */
                unsignalled = 0;
                if (should_notify(f)) {
                    *notify = 1;
                    break;
                }
            }
            if (pending == 0 && (served || f->busy) && f->poll_ns) {
                /* Busy: poll a little for the driver's next request (as
                 * qemu-storage-daemon's adaptive polling), instead of a kick and a wake-up. */
                uint64_t deadline = now_ns() + f->poll_ns;
                for (unsigned spins = 1;; spins++) {
                    idx = __atomic_load_n(avail_idx_p, __ATOMIC_ACQUIRE);
                    if (idx != f->next_avail || ((spins & 63) == 0 && now_ns() >= deadline))
                        break;
#if defined(__x86_64__) || defined(__i386__)
                    __builtin_ia32_pause();
#endif
                }
                pending = (uint16_t)(idx - f->next_avail);
            }
            if (pending == 0)
                break;
            if (pending > f->size) { /* a broken ring: the Python path says so */
                *punt = 1;
                break;
            }
            f->shadow_avail = idx;
        }
        uint16_t head = __atomic_load_n(&avail_ring[f->next_avail & mask], __ATOMIC_RELAXED);
        if (head >= f->size) {
            *punt = 1;
            break;
        }
        /* Walk: header, data..., status, all direct, at most max_segs + 2 descriptors. */
        struct iovec iov[VUB_FAST_MAX_SEGS];
        uint32_t nseg = 0;
        uint64_t total = 0;
        uint8_t *hdr = NULL, *status = NULL;
        int dir = -1; /* 1: device-writable data (a read), 0: readable (a write) */
        uint16_t index = head;
        uint32_t visited = 0;
        int plain = 1;
        for (;;) {
            struct desc d = load_desc(f, index);
            visited++;
            if (d.flags & F_INDIRECT || d.len == 0 || visited > f->max_segs + 2) {
                plain = 0;
                break;
            }
            int writable = (d.flags & F_WRITE) != 0;
            int last = !(d.flags & F_NEXT);
            if (visited == 1) {
                if (writable || d.len != 16 || last || !(hdr = translate(f, d.addr, 16))) {
                    plain = 0;
                    break;
                }
            } else if (last) {
                if (!writable || d.len != 1 || !(status = translate(f, d.addr, 1))) {
                    plain = 0;
                    break;
                }
            } else {
                uint8_t *p = translate(f, d.addr, d.len);
                if (!p || (dir >= 0 && dir != writable) || nseg == VUB_FAST_MAX_SEGS) {
                    plain = 0;
                    break;
                }
                dir = writable;
                iov[nseg].iov_base = p;
                iov[nseg].iov_len = d.len;
                nseg++;
                total += d.len;
            }
            if (last)
                break;
            if (d.next >= f->size) {
                plain = 0;
                break;
            }
            index = d.next;
        }
        if (!plain || nseg == 0 || total > f->max_bytes || total % 512) {
            *punt = 1;
            break;
        }
        uint32_t type;
        uint64_t sector;
        memcpy(&type, hdr, 4);
        memcpy(&sector, hdr + 8, 8);
        uint64_t sectors = total / 512;
        if ((type == T_IN && dir != 1) ||
            (type == T_OUT && (dir != 0 || f->punt_writes || sector < f->guard_sectors)) ||
            (type != T_IN && type != T_OUT) || sector > f->capacity_sectors ||
            sectors > f->capacity_sectors - sector) {
            *punt = 1;
            break;
        }
        if (f->direct_align) {
            uint64_t a = f->direct_align - 1;
            int aligned = !((sector * 512) & a);
            for (uint32_t k = 0; k < nseg && aligned; k++)
                aligned = !((uintptr_t)iov[k].iov_base & a) && !(iov[k].iov_len & a);
            if (!aligned) { /* a bounce buffer: the Python path has one */
                *punt = 1;
                break;
            }
        }
        /* Consumed from here on: the request is ours to answer. */
        f->next_avail++;
        inflight_popped(f, head);
        uint64_t t0 = now_ns();
        uint8_t result = S_OK;
        off_t offset = (off_t)(sector * 512);
        struct iovec *v = iov;
        uint32_t left = nseg;
        while (left) {
            ssize_t n = type == T_IN ? preadv(f->fd, v, (int)left, offset)
                                     : pwritev(f->fd, v, (int)left, offset);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                result = S_IOERR;
                break;
            }
            offset += n;
            while (left && (size_t)n >= v->iov_len) {
                n -= (ssize_t)v->iov_len;
                v++;
                left--;
            }
            if (left) {
                v->iov_base = (uint8_t *)v->iov_base + n;
                v->iov_len -= (size_t)n;
            }
        }
        __atomic_store_n(status, result, __ATOMIC_RELAXED);
        uint32_t used_len = 1 + (type == T_IN && result == S_OK ? (uint32_t)total : 0);
        if (f->inflight)
            __atomic_store_n((uint16_t *)(f->inflight + 12), head, __ATOMIC_RELAXED);
        uint32_t slot = f->used_idx & mask;
        __atomic_store_n(&used_ring[2 * slot], (uint32_t)head, __ATOMIC_RELAXED);
        __atomic_store_n(&used_ring[2 * slot + 1], used_len, __ATOMIC_RELAXED);
        f->used_idx++;
        __atomic_store_n(used_idx_p, f->used_idx, __ATOMIC_RELEASE);
        if (f->inflight) {
            __atomic_store_n(f->inflight + 16 + 16u * head, (uint8_t)0, __ATOMIC_RELEASE);
            __atomic_store_n((uint16_t *)(f->inflight + 14), f->used_idx, __ATOMIC_RELEASE);
        }
        record_latency(f, now_ns() - t0);
        if (type == T_IN)
            f->reads++;
        else
            f->writes++;
        if (result != S_OK)
            f->io_errors++;
        else if (type == T_IN)
            f->bytes_read += total;
        else
            f->bytes_written += total;
        served++;
        unsignalled = 1;
    }
    if (unsignalled && !*notify && (uint32_t)served >= budget)
        *notify = should_notify(f); /* the caller decides nothing more before the next call */
    f->busy = served > 0;
    return served;
}

