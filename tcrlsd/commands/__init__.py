"""CLI commands, one module per topic (see tcrlsd.cli)."""
