"""dinotxt curation: filter an image-text pool with both modalities (METHOD.md section 7).

Stages, each a reader -> mapper -> writer step that writes its outputs atomically, skips
finished work and resumes an interrupted run with identical results (``stages.py``):
``embed`` (frozen-backbone image embeddings, caption embeddings, ``embed.py``), ``dedup``
(near-duplicate removal, ``dedup.py``), ``cluster_level{l}`` (hierarchical k-means with
resampling, ``kmeans.py``), ``image_balance`` (balanced hierarchical sampling, ``sampling.py``),
``text_balance`` (MetaCLIP-style, ``text_balance.py``), ``combine`` (``combine.py``) and ``report``.
``pipeline.py`` wires them; ``dinotxt curate RECIPE`` runs them, on one process or on the N that
``torchrun`` / ``srun`` started: ``ranks.py`` is the only module that knows about processes, and
work is split by the data (units, a fixed grid of chunks, shards, hash buckets), so the outputs
are the same bits for any N. ``selection.py`` is the distributed "closest per cluster";
``store.py`` the memory-mapped embeddings, the grid and the per-chunk part files.
"""
