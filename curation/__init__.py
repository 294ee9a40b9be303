"""dinotxt curation: filter an image-text pool with both modalities (METHOD.md section 7).

Planned stages (issue "Curation stage"), each a reader -> mapper -> writer step that writes
sharded outputs atomically and resumes: embed, image balancing (hierarchical k-means with
resampling, balanced sampling), text balancing (MetaCLIP-style), near-duplicate removal,
combine, report. Nothing is implemented yet; this package only reserves the name.
"""
