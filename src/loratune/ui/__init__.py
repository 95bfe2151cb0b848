"""`loratune ui`: a local web dashboard over run folders (runs, curves, launch, plan, chat)."""
