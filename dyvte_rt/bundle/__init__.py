"""A bundle on disk: its manifest, graph I/O names, where bundles are found, and a bundle opened
on a backend."""
