"""tcrlsd: RLVR for math with teacher-critique-shaped per-token advantages, every signal on disk.

The library does no I/O at import and imports no heavy framework (torch, transformers) at module
level; stages in ``stages/`` and the ``tcrlsd`` CLI call into it.
"""

__version__ = "0.1.0"
