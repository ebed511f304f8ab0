"""Data pipeline: corpora -> conversations -> rendered, masked token ids -> packed rows."""
