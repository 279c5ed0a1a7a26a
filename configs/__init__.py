"""The bundled configs (YAML package data): `sofo fit --config flipflop_sofo` finds them by name."""
