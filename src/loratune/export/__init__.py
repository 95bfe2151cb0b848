"""After training: merge adapters into the base and write deployable files."""
