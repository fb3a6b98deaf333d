"""Virtqueues, device side: what a ring in guest memory means and how it is served.

``chain`` (the descriptor chains devices see), ``features`` (transport feature bits),
``virtqueue`` (the interface and the factory type that picks an implementation), ``split``
(the pure-Python split ring, virtio 1.2 §2.7). Nothing here knows vhost-user messages: a ring is
set up from guest addresses and sizes, whoever delivered them.
"""
