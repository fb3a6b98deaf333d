"""The vhost-user protocol without I/O: message layouts, parsing and serializing.

``messages`` writes each message once (wire layouts, codes, frozen message classes, and the
table with one row per request); ``codec`` derives parsing and serializing from that table and
re-exports the messages, so the rest of the tree imports ``codec`` alone. The socket lives in
``vhost_user.transport`` and what the messages do in ``vhost_user.connection``.
"""
