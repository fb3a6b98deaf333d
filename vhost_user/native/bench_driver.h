/* The benchmark front-end's hot loop (bench_driver.c); build.py hands these to cffi. */
#include <stdint.h>

#define VUB_RANDREAD 0
#define VUB_RANDWRITE 1
#define VUB_READ 2
#define VUB_WRITE 3
#define VUB_MAX_DEPTH 256
#define VUB_LAT_BUCKETS 512

struct vub_bench {
    uint8_t *mem;
    uint64_t mem_size;
    uint32_t qsize;
    uint32_t iodepth;
    uint64_t desc_gpa, avail_gpa, used_gpa;
    uint64_t hdr_gpa, status_gpa, data_gpa;
    int kick_fd;
    int event_idx;
    uint32_t bs;
    uint32_t rw;
    uint64_t capacity;
    double seconds;
    uint64_t seed;
    uint64_t ops, errors, bytes, kicks;
    uint64_t lat_sum_ns;
    uint64_t elapsed_ns;
    uint64_t lat_hist[VUB_LAT_BUCKETS];
};

int vub_bench_run(struct vub_bench *b);
