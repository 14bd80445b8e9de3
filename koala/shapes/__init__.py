"""The shapes world: a procedurally generated captioned image set, a scorer for it and a trained teacher of it.

`world` draws the pictures and writes them as webdataset shards, `score` judges a picture against its caption from
pixel statistics alone (no learned weights), `teacher` trains the SDXL-shaped teacher shipped in `koala/assets`.
"""
