"""Replay: the local model answers the system's own tasks, grounded in playbooks retrieved from
the RAG export; an A/B without retrieval; escalation of failed answers; every replay logged as a
trace for the next run. mlx and bm25s are imported only when a replay runs.
"""
