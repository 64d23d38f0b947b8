"""Swarm state: the Kademlia DHT, the records servers announce, the map a client reads from them."""
