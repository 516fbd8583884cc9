"""The bottom layer: every on-disk contract between headstart's stages, in one place.

    from contracts import datasets, layout, runs, schema

`layout` names files, versions and splits; `datasets` reads and writes dataset directories
(shards, `manifest.json`, `index.json`); `schema` is the one typed record schema from which
the TFDS `FeaturesDict`, the Example encoder and every parse spec are derived; `runs` is a run
directory of stage 3; `pixels` turns a stored image into a backbone's input. Nothing here
imports Apache Beam or any stage package (tests/test_architecture.py checks it).
"""
