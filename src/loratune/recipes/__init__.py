"""Recipes: jobs built from train, eval, export and serve, one layer under the cli.

`compare` trains several adapter variants on the same data and scores each (`loratune compare`,
`loratune tune-rank`). Nothing in the library below imports from here.
"""


def quiet_transformers() -> None:
    """transformers' info logs, progress bars and FutureWarnings off (a recipe prints its own)."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
