"""Chunk operators: small steps over a stream of chunks, composed in one command.

One module per theme (sources, volume I/O, compute, inference, control, view);
each defines its operators with :func:`.base.operator`.  See :mod:`.base`.
"""
