"""The one exception type for user mistakes (bad data, config, paths).

Entry points catch it and print its message as a single line with a non-zero exit, so users never
see a traceback for input they can fix. Messages name the culprit: a file and line, or a config key.
"""


class LimaError(Exception):
  """A problem with what the user handed us; the message says what and where."""
