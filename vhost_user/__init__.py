"""The vhost-user transport, backend side: the protocol (no I/O), the socket and its fds, one
connection's state, the virtqueues and their worker threads, and the listening server. Device
neutral: a device (``blkdev.device``) plugs in through ``vhost_user.device``. Imports only
``memory``."""
