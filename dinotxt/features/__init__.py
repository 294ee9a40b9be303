"""The feature-extraction stage (``extract``) and its jobs: the feature cache training reads
(``cache``); the curation embeddings are its other job (``curation/embed_pool.py``)."""
