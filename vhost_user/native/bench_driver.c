/* The benchmark's front-end hot loop: drives one split virtqueue of a vhost-user-blk backend
 * the way a guest driver does, with no VM (blkdev/bench.py sets everything up and calls in).
 *
 * Guest memory is ours (a memfd the backend maps too), so every store the backend may read
 * concurrently is a single store of its width, ordered as virtio 1.2 section 2.7.13 asks: the
 * descriptors and the avail ring entry before avail->idx (release), avail->idx before reading
 * the device's avail_event or used->flags to decide whether to kick (a full fence: 2.7.10's
 * store/load pair); used->idx read with acquire before the used elements and the status bytes
 * it publishes. The kernel calls (eventfd write) are the only system calls in the loop: the
 * used ring is busy-polled and interrupts are suppressed (used_event kept far ahead, or
 * VRING_AVAIL_F_NO_INTERRUPT without EVENT_IDX), as the measurements did.
 */
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "bench_driver.h"

#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_AVAIL_F_NO_INTERRUPT 1
#define VRING_USED_F_NO_NOTIFY 1
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct used_elem {
    uint32_t id;
    uint32_t len;
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t next_random(uint64_t *state)
{
    /* xorshift64*: cheap, and good enough to scatter offsets. */
    uint64_t x = *state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    return x * 0x2545F4914F6CDD1DULL;
}

/* vring_need_event (virtio 2.7.10.1): has new_idx passed event since old_idx? */
static int need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* Histogram bucket of a latency: 8 linear sub-buckets per power of two of nanoseconds. */
static unsigned bucket_of(uint64_t ns)
{
    if (ns < 8)
        return (unsigned)ns;
    unsigned log = 63u - (unsigned)__builtin_clzll(ns);
    unsigned sub = (unsigned)(ns >> (log - 3)) & 7u;
    unsigned b = (log - 2) * 8 + sub;
    return b < VUB_LAT_BUCKETS ? b : VUB_LAT_BUCKETS - 1;
}

int vub_bench_run(struct vub_bench *b)
{
    uint8_t *mem = b->mem;
    uint32_t qsize = b->qsize;
    if (qsize == 0 || (qsize & (qsize - 1)) || b->iodepth == 0 || b->iodepth * 3 > qsize ||
        b->iodepth > VUB_MAX_DEPTH || b->bs == 0 || b->bs % 512 || b->capacity < b->bs)
        return -1;
    uint64_t top = b->data_gpa + (uint64_t)b->iodepth * b->bs;
    if (b->desc_gpa + 16ull * qsize > b->mem_size || b->avail_gpa + 6 + 2ull * qsize > b->mem_size ||
        b->used_gpa + 6 + 8ull * qsize > b->mem_size || top > b->mem_size ||
        b->hdr_gpa + 16ull * b->iodepth > b->mem_size || b->status_gpa + b->iodepth > b->mem_size)
        return -2;

    struct desc *desc = (struct desc *)(mem + b->desc_gpa);
    uint16_t *avail_flags = (uint16_t *)(mem + b->avail_gpa);
    uint16_t *avail_idx_p = avail_flags + 1;
    uint16_t *avail_ring = avail_flags + 2;
    uint16_t *used_event = avail_ring + qsize;
    uint16_t *used_flags = (uint16_t *)(mem + b->used_gpa);
    uint16_t *used_idx_p = used_flags + 1;
    struct used_elem *used_ring = (struct used_elem *)(used_flags + 2);
    uint16_t *avail_event = (uint16_t *)(used_ring + qsize);

    int is_write = b->rw == VUB_RANDWRITE || b->rw == VUB_WRITE;
    int is_random = b->rw == VUB_RANDREAD || b->rw == VUB_RANDWRITE;
    uint64_t blocks = b->capacity / b->bs;
    uint64_t seq = 0;
    uint64_t rnd = b->seed ? b->seed : 0x9E3779B97F4A7C15ULL;
    uint64_t started[VUB_MAX_DEPTH];

    uint16_t avail_idx = __atomic_load_n(avail_idx_p, __ATOMIC_RELAXED);
    uint16_t last_used = __atomic_load_n(used_idx_p, __ATOMIC_ACQUIRE);
    uint16_t kicked_at = avail_idx;

    /* The chains never change: header, data, status, at descriptors 3i .. 3i+2. */
    for (uint32_t i = 0; i < b->iodepth; i++) {
        desc[3 * i] = (struct desc){b->hdr_gpa + 16ull * i, 16, VRING_DESC_F_NEXT, (uint16_t)(3 * i + 1)};
        desc[3 * i + 1] = (struct desc){b->data_gpa + (uint64_t)b->bs * i, b->bs,
                                        (uint16_t)(VRING_DESC_F_NEXT | (is_write ? 0 : VRING_DESC_F_WRITE)),
                                        (uint16_t)(3 * i + 2)};
        desc[3 * i + 2] = (struct desc){b->status_gpa + i, 1, VRING_DESC_F_WRITE, 0};
    }
    if (b->event_idx)
        __atomic_store_n(used_event, (uint16_t)(last_used + 0x7fff), __ATOMIC_RELAXED);
    else
        __atomic_store_n(avail_flags, VRING_AVAIL_F_NO_INTERRUPT, __ATOMIC_RELAXED);

    uint64_t t0 = now_ns();
    uint64_t deadline = t0 + (uint64_t)(b->seconds * 1e9);
    uint32_t outstanding = 0;
    int stopping = 0;
    uint32_t pending[VUB_MAX_DEPTH];
    uint32_t n_pending = 0;
    for (uint32_t i = 0; i < b->iodepth; i++)
        pending[n_pending++] = i;

    for (;;) {
        /* Submit every free slot, then publish them with one avail->idx store. */
        if (n_pending && !stopping) {
            uint64_t t = now_ns();
            for (uint32_t k = 0; k < n_pending; k++) {
                uint32_t i = pending[k];
                uint64_t block = is_random ? next_random(&rnd) % blocks : (seq++ % blocks);
                uint8_t *hdr = mem + b->hdr_gpa + 16ull * i;
                uint32_t type = is_write ? VIRTIO_BLK_T_OUT : VIRTIO_BLK_T_IN;
                uint64_t sector = block * (b->bs / 512);
                memcpy(hdr, &type, 4);
                memset(hdr + 4, 0, 4);
                memcpy(hdr + 8, &sector, 8);
                mem[b->status_gpa + i] = 0xff;
                started[i] = t;
                __atomic_store_n(&avail_ring[avail_idx % qsize], (uint16_t)(3 * i), __ATOMIC_RELAXED);
                avail_idx++;
                outstanding++;
            }
            n_pending = 0;
            __atomic_store_n(avail_idx_p, avail_idx, __ATOMIC_RELEASE);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            int kick;
            if (b->event_idx)
                kick = need_event(__atomic_load_n(avail_event, __ATOMIC_ACQUIRE), avail_idx, kicked_at);
            else
                kick = !(__atomic_load_n(used_flags, __ATOMIC_ACQUIRE) & VRING_USED_F_NO_NOTIFY);
            if (kick) {
                uint64_t one = 1;
                if (write(b->kick_fd, &one, 8) != 8)
                    return -3;
                b->kicks++;
            }
            kicked_at = avail_idx;
        }
        if (outstanding == 0)
            break;
        /* Busy-poll the used ring; look at the clock every so often. */
        uint16_t used_now;
        unsigned spins = 0;
        while ((used_now = __atomic_load_n(used_idx_p, __ATOMIC_ACQUIRE)) == last_used) {
            if (++spins == 4096) {
                spins = 0;
                uint64_t t = now_ns();
                if (t >= deadline)
                    stopping = 1;
                if (t >= deadline + 10000000000ull)
                    return -4; /* 10 s past the end with requests out: the backend hung */
            }
        }
        uint64_t t = now_ns();
        while (last_used != used_now) {
            struct used_elem e = used_ring[last_used % qsize];
            last_used++;
            uint32_t i = e.id / 3;
            if (e.id % 3 || i >= b->iodepth)
                return -5; /* the backend returned a head we never made available */
            outstanding--;
            if (mem[b->status_gpa + i] != 0)
                b->errors++;
            uint64_t lat = t - started[i];
            b->lat_hist[bucket_of(lat)]++;
            b->lat_sum_ns += lat;
            b->ops++;
            b->bytes += b->bs;
            pending[n_pending++] = i;
        }
        if (b->event_idx)
            __atomic_store_n(used_event, (uint16_t)(last_used + 0x7fff), __ATOMIC_RELAXED);
        if (t >= deadline)
            stopping = 1;
    }
    b->elapsed_ns = now_ns() - t0;
    return 0;
}
