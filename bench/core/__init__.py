"""The core: datasets and their files, architectures, presets, attack matrices and
provenance. Below it lie only bench.registry, bench.validate and bench.errors."""
