"""The client role: the distributed model, inference sessions and training through remote spans.

Never imports ``petald.p2pnode.server``."""
