"""The server role: a span of blocks served to sessions over libp2p, announced in the DHT.

Never imports ``petald.p2pnode.client``."""
