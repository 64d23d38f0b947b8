"""The parts of benchmarks/swarm_simulation.py: a simulated population running petald's own
placement, routing, ban and DHT-lookup code (docs/benchmarks.md, "swarm_simulation.py")."""
