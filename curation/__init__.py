"""dinotxt curation: filter an image-text pool with both modalities (METHOD.md section 7).

Stages, each a reader -> mapper -> writer step that writes its outputs atomically, skips
finished work and resumes an interrupted run with identical results (``stages.py``):
``embed`` (frozen-backbone image embeddings, caption embeddings), ``dedup`` (near-duplicate
removal, ``dedup.py``), ``cluster_level{l}`` (hierarchical k-means with resampling,
``kmeans.py``), ``image_balance`` (balanced hierarchical sampling, ``sampling.py``),
``text_balance`` (MetaCLIP-style, ``text_balance.py``), ``combine`` and ``report``.
``pipeline.py`` wires them; ``dinotxt curate RECIPE`` runs them.
"""
