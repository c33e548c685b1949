"""What near-duplicate signatures depend on besides the text — their parameters and the hashing
library's version —, apart from refinery.neardup, which needs numpy: every run's config hash
reads `version()`, and an unchanged re-run should not pay for importing numpy (~0.2 s)."""

from __future__ import annotations

NUM_PERM = 128
SEED = 0x5EED
SHINGLE = 3
#: LSH bands are chosen so that a pair exactly at the threshold becomes a candidate at least this
#: often (a pair more alike, more often); every candidate is checked, so more candidates cost time only
RECALL_AT_THRESHOLD = 0.95


def version() -> str:
    """What the signatures depend on besides the text (in the export's config hash)."""
    from importlib.metadata import version as installed

    import rensa

    return (f"rensa {installed('rensa')}/{rensa.RMinHash.ALGORITHM_VERSION} perm {NUM_PERM} seed {SEED} "
            f"word {SHINGLE}-grams, bands at recall {RECALL_AT_THRESHOLD}")
