"""Programs built on the whole library (the top layer, beside the command line): the built-in demo."""
