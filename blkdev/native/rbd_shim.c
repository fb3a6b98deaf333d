/* librbd for blkdev.disks.rbd: see rbd_shim.h.
 *
 * Completions never run Python on librbd's threads: each request's completion has no
 * callback, librbd queues it and writes the image's eventfd (rbd_set_image_notification), and
 * the disk's reaper thread collects them with rbd_poll_io_events (vub_rbd_reap). */
#include "rbd_shim.h"

#include <errno.h>
#include <stdint.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <rados/librados.h>
#include <rbd/librbd.h>

int vub_rbd_connect(const char *conf, const char *id, const char *const *keys,
                    const char *const *values, int n, void **cluster)
{
    rados_t c;
    int r = rados_create(&c, id);
    if (r < 0)
        return r;
    /* No file named: librados's default places, and none found is fine (as QEMU does). */
    r = rados_conf_read_file(c, conf);
    if (conf == NULL)
        r = 0;
    for (int i = 0; r >= 0 && i < n; i++)
        r = rados_conf_set(c, keys[i], values[i]);
    if (r >= 0)
        r = rados_connect(c);
    if (r < 0) {
        rados_shutdown(c);
        return r;
    }
    *cluster = c;
    return 0;
}

void vub_rbd_shutdown(void *cluster)
{
    rados_shutdown((rados_t)cluster);
}

int vub_rbd_open(void *cluster, const char *pool, const char *image, const char *snap,
                 int read_only, void **ioctx, void **rbd_image)
{
    rados_ioctx_t io;
    rbd_image_t img;
    int r = rados_ioctx_create((rados_t)cluster, pool, &io);
    if (r < 0)
        return r;
    r = read_only ? rbd_open_read_only(io, image, &img, snap) : rbd_open(io, image, &img, snap);
    if (r < 0) {
        rados_ioctx_destroy(io);
        return r;
    }
    *ioctx = io;
    *rbd_image = img;
    return 0;
}

void vub_rbd_close(void *ioctx, void *rbd_image)
{
    rbd_close((rbd_image_t)rbd_image);
    rados_ioctx_destroy((rados_ioctx_t)ioctx);
}

int vub_rbd_size(void *rbd_image, uint64_t *size)
{
    return rbd_get_size((rbd_image_t)rbd_image, size);
}

int vub_rbd_object_size(void *rbd_image, uint64_t *size)
{
    rbd_image_info_t info;
    int r = rbd_stat((rbd_image_t)rbd_image, &info, sizeof info);
    if (r >= 0)
        *size = info.obj_size;
    return r;
}

int vub_rbd_resize(void *rbd_image, uint64_t size)
{
    return rbd_resize((rbd_image_t)rbd_image, size);
}

int vub_rbd_notify_fd(void *rbd_image, int efd)
{
    return rbd_set_image_notification((rbd_image_t)rbd_image, efd, EVENT_TYPE_EVENTFD);
}

int vub_rbd_submit(void *rbd_image, int op, const struct iovec *iov, int iovcnt,
                   uint64_t offset, uint64_t length, uint64_t token)
{
    rbd_image_t img = (rbd_image_t)rbd_image;
    rbd_completion_t c;
    int r = rbd_aio_create_completion((void *)(uintptr_t)token, NULL, &c);
    if (r < 0)
        return r;
    switch (op) {
    case VUB_RBD_READ:
        r = rbd_aio_readv(img, iov, iovcnt, offset, c);
        break;
    case VUB_RBD_WRITE:
        r = rbd_aio_writev(img, iov, iovcnt, offset, c);
        break;
    case VUB_RBD_FLUSH:
        r = rbd_aio_flush(img, c);
        break;
    case VUB_RBD_DISCARD:
        r = rbd_aio_discard(img, offset, length, c);
        break;
    case VUB_RBD_WRITE_ZEROES:
        r = rbd_aio_write_zeroes(img, offset, length, c, 0, 0);
        break;
    case VUB_RBD_WRITE_ZEROES_THICK:
        r = rbd_aio_write_zeroes(img, offset, length, c, RBD_WRITE_ZEROES_FLAG_THICK_PROVISION, 0);
        break;
    default:
        r = -EINVAL;
    }
    if (r < 0)
        rbd_aio_release(c); /* never started: librbd will not queue it */
    return r;
}

int vub_rbd_reap(void *rbd_image, uint64_t *tokens, int64_t *results, int max)
{
    rbd_completion_t comps[64];
    if (max > 64)
        max = 64;
    int n = rbd_poll_io_events((rbd_image_t)rbd_image, comps, max);
    for (int i = 0; i < n; i++) {
        tokens[i] = (uint64_t)(uintptr_t)rbd_aio_get_arg(comps[i]);
        results[i] = rbd_aio_get_return_value(comps[i]);
        rbd_aio_release(comps[i]);
    }
    return n;
}

/* Runs on a librbd thread: one eventfd write, nothing else (the disk's watcher thread reads
 * the new size). A full counter (never, in practice) still leaves the fd readable. */
static void vub_rbd_changed(void *arg)
{
    int efd = (int)(intptr_t)arg;
    uint64_t one = 1;
    ssize_t w = write(efd, &one, sizeof one);
    (void)w;
}

int vub_rbd_watch(void *rbd_image, int efd, uint64_t *handle)
{
    return rbd_update_watch((rbd_image_t)rbd_image, handle, vub_rbd_changed,
                            (void *)(intptr_t)efd);
}

int vub_rbd_unwatch(void *rbd_image, uint64_t handle)
{
    return rbd_update_unwatch((rbd_image_t)rbd_image, handle);
}
