"""The one exception type of the GLUE harness."""


class GlueError(ValueError):
    """A problem with a recipe, the data or the output folder, found before (or instead of) training.

    The message says what happened, the likely cause and the fix. ``python -m glue.run`` prints it without a
    traceback and exits with status 2.
    """
