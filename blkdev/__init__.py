"""The block layer: virtio-blk over the vhost-user transport, the disks behind it, and what runs
them (the CLI, the control socket, metrics, live resize, systemd). Imports ``vhost_user`` and
``memory``; nothing below imports it."""
