"""The summarize stage: the per-iteration table (DVC plots) and the headline metrics (DVC metrics)."""

from tcrlsd.summarize.table import (COLUMNS, HEADLINE, collect_rows, headline, iteration_row, read_table, track_rows,
                                    write_table)

__all__ = ["COLUMNS", "HEADLINE", "collect_rows", "headline", "iteration_row", "read_table", "track_rows", "write_table"]
