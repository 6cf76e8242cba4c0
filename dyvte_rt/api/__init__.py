"""The Python API: `DyvteModel` (load a bundle, ask, stream, batch, chat) and its results."""
