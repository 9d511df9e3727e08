"""The `code` stage: which tcrlsd modules each stage script runs, and their fingerprint (:mod:`.deps`)."""

from tcrlsd.code.deps import (BYTECODE_IGNORES, CODE_DIR, ensure_ignored, fingerprint, fingerprint_path, imports,
                              package_modules, runs)

__all__ = ["BYTECODE_IGNORES", "CODE_DIR", "ensure_ignored", "fingerprint", "fingerprint_path", "imports", "package_modules", "runs"]
