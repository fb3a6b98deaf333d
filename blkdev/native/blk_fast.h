/* The virtio-blk fast path (blk_fast.c); blkdev/native/build.py hands these to cffi. */
#include <stdint.h>

#define VUB_FAST_MAX_REGIONS 64
#define VUB_FAST_MAX_SEGS 128
#define VUB_FAST_LAT_BOUNDS 22

struct vub_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

struct vub_fast {
    /* guest memory */
    struct vub_region regions[VUB_FAST_MAX_REGIONS];
    uint32_t nregions;
    /* the ring: host addresses of its three parts, its size */
    uint8_t *desc;
    uint8_t *avail;
    uint8_t *used;
    uint32_t size;
    /* ring state, in and out (the Python queue's copy is updated from these) */
    uint16_t next_avail;
    uint16_t shadow_avail;
    uint16_t used_idx;
    /* used-buffer notifications (virtio 2.7.7.2): what the driver was last told, in and out */
    int event_idx;
    uint16_t signalled_used;
    int signalled_valid;
    uint64_t poll_ns;        /* busy-poll an emptied ring this long while busy (0: never) */
    int busy;                /* the previous call served something: poll even before serving */
    /* inflight region of the queue (vhost_user.ring.inflight), or NULL; its pop counter */
    uint8_t *inflight;
    uint64_t inflight_counter;
    /* the disk: a raw image's fd, its size in sectors, the largest request */
    int fd;
    int punt_writes;         /* read-only or write-through: writes take the Python path */
    uint64_t guard_sectors;  /* writes below this sector take the Python path (probed raw) */
    uint32_t direct_align;   /* O_DIRECT: buffers, lengths and offsets aligned to this, or 0 */
    uint64_t capacity_sectors;
    uint32_t max_bytes;
    uint32_t max_segs;
    /* statistics of the chains served, added to the queue's by the caller */
    uint64_t reads, writes, bytes_read, bytes_written, io_errors, lat_sum_ns;
    uint64_t lat_bounds_ns[VUB_FAST_LAT_BOUNDS];
    uint64_t lat_buckets[VUB_FAST_LAT_BOUNDS + 1];
};

/* Serve the available chains that are plain reads and writes; stop at the first that is not
 * (*punt = 1: nothing of it consumed), at `budget` chains, when the driver must be notified
 * (*notify = 1: the caller signals), or when the ring stays empty. Returns how many. */
int vub_fast_serve(struct vub_fast *f, uint32_t budget, int *punt, int *notify);
