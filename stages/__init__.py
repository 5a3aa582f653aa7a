"""DVC stages: thin command-line wiring around the minilm library (one module per stage)."""
