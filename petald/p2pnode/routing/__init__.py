"""Policy: which servers a step goes through (routes), which blocks a server takes (placement),
and which servers a client avoids for now (bans). Pure decisions over what the swarm says: no I/O."""
