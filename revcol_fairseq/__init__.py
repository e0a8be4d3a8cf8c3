"""RevCol-Transformer as a fairseq --user-dir plugin."""
