"""The vhost-user protocol without I/O: message layouts, parsing and serializing.

``codec`` turns bytes and fds into frozen message values and back; the socket lives in
``vhost_user.transport`` and what the messages do in ``vhost_user.connection``.
"""
