/* librbd for blkdev.disks.rbd (rbd_shim.c); blkdev/native/build.py hands these to cffi.
 *
 * Every librbd and librados handle crosses into Python as a void pointer: Python never sees
 * librbd's types, and cffi's declarations stay these few lines. Errors are negative errnos,
 * as librbd returns them. */
#include <stdint.h>
#include <sys/uio.h>

#define VUB_RBD_READ 0
#define VUB_RBD_WRITE 1
#define VUB_RBD_FLUSH 2
#define VUB_RBD_DISCARD 3
#define VUB_RBD_WRITE_ZEROES 4         /* may deallocate */
#define VUB_RBD_WRITE_ZEROES_THICK 5   /* must stay allocated (no unmap) */

/* Connect to the cluster of `conf` (NULL: librados's default search) as client `id` (NULL:
 * "admin"), with `n` extra options set after the file is read. */
int vub_rbd_connect(const char *conf, const char *id, const char *const *keys,
                    const char *const *values, int n, void **cluster);
void vub_rbd_shutdown(void *cluster);
/* The last error librados or librbd logged is not kept; a message for an errno is strerror's. */
int vub_rbd_open(void *cluster, const char *pool, const char *image, const char *snap,
                 int read_only, void **ioctx, void **rbd_image);
void vub_rbd_close(void *ioctx, void *rbd_image);
int vub_rbd_size(void *rbd_image, uint64_t *size);
int vub_rbd_object_size(void *rbd_image, uint64_t *size);
int vub_rbd_resize(void *rbd_image, uint64_t size);
/* Completions are queued for vub_rbd_reap and `efd` (an eventfd) is written when one is. */
int vub_rbd_notify_fd(void *rbd_image, int efd);
/* Start one request; `token` comes back from vub_rbd_reap with its result. iov/iovcnt for
 * READ and WRITE (librbd reads into / writes from them in place: they must stay valid until
 * the completion is reaped), offset/length for DISCARD and WRITE_ZEROES. */
int vub_rbd_submit(void *rbd_image, int op, const struct iovec *iov, int iovcnt,
                   uint64_t offset, uint64_t length, uint64_t token);
/* Up to `max` finished requests: their tokens and results (bytes moved, 0, or -errno). */
int vub_rbd_reap(void *rbd_image, uint64_t *tokens, int64_t *results, int max);
/* Write `efd` whenever the image's header changes (a resize by another client). */
int vub_rbd_watch(void *rbd_image, int efd, uint64_t *handle);
int vub_rbd_unwatch(void *rbd_image, uint64_t handle);
