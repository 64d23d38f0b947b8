"""Running petald under systemd: the unit file and readiness notification."""
