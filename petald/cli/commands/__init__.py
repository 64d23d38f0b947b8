"""The click commands, one file per kind of work: serving (serve, daemon), generating (generate,
chat), the swarm view, config show, install-service, demo. ``petald.cli.main`` adds them to the group."""
