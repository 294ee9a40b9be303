"""The built-in demo: a procedural captioned-image world and the end-to-end run on it."""
