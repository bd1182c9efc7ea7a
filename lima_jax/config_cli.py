"""The `--config` flag that `python -m lima_jax.train`, `plan` and `demo` share: an
ml_collections config file with `--config.a.b=value` overrides, its errors as one line naming the
key, and `--show_config`.
"""

import os
import re
import sys

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from lima_jax import config
from lima_jax.cli import fail

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "configs", "toy.py")


_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=]+)")  # ml_collections' override syntax


def _config_file(argv) -> str:
  """The config file the command line names (the last --config wins, as in absl)."""
  path = DEFAULT_CONFIG
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  return path


def _unknown_part(cfg, key: str) -> str | None:
  """None when the dotted `key` names a field of `cfg`; else what is wrong ("" = no such key)."""
  node, walked = cfg, []
  for part in key.split("."):
    if not isinstance(node, ml_collections.ConfigDict):
      return f"{'.'.join(walked)} is a value, not a section"
    if part not in node:
      return ""
    node, walked = node[part], walked + [part]
  return None


def _unknown_config_key(error: Exception) -> None:
  """Names the override that matches no key, with ml_collections' "Did you mean" hint.

  The key is found by walking the config file's own keys: ml_collections words its KeyError
  differently across versions (1.1 nests it in an AttributeError), so only the hint line is
  taken from its message, and kept when there is one.
  """
  path = _config_file(sys.argv[1:])
  try:
    cfg = config.from_file(path)
  except Exception:  # pylint: disable=broad-except  # the file's own error is reported below
    cfg = None
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]  # AttributeError(KeyError(message))
  message = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  hints = [line.strip() for line in message.splitlines()[1:] if "did you mean" in line.lower()]
  for match in filter(None, map(_OVERRIDE.match, sys.argv[1:])):
    why = None if cfg is None else _unknown_part(cfg, match.group(1))
    if why is not None:
      fail(" ".join([f"--config.{match.group(1)}: no such config key"
                     f"{f': {why}' if why else ''}{'.' if hints else ''}", *hints,
                     "(--show_config lists every key)"]))
  fail(f"--config: {path}: {type(error).__name__}: {message}")


# absl's parser type names (flag_type()) of the overrides of int, float and bool keys.
_EXPECTED = {"int": "an int", "float": "a float", "bool": "a bool, true or false"}


def _override_values(argv):
  """(key, value) of each --config.KEY=VALUE or --config.KEY VALUE on the command line."""
  for i, arg in enumerate(argv):
    match = _OVERRIDE.match(arg)
    if not match or arg.startswith(("--noconfig.", "-noconfig.")):
      continue
    if "=" in arg:
      yield match.group(1), arg.split("=", 1)[1]
    elif i + 1 < len(argv):
      yield match.group(1), argv[i + 1]


def _bad_config_value(argv, error: Exception) -> None:
  """Names the override whose value does not parse as its key's type in the config file.

  ml_collections gives each --config.KEY flag absl's parser for the type of KEY's value in the
  file, and absl reports a failure as "flag --config.KEY=VALUE: <int()'s own message>". The
  culprit is found by asking each override's parser again rather than by reading that text;
  an error that is not an override's is reported as absl words it.
  """
  path = _config_file(argv[1:])
  for key, value in _override_values(argv[1:]):
    name = f"config.{key}"
    if name not in flags.FLAGS:
      continue
    parser = flags.FLAGS[name].parser
    try:
      parser.parse(value)
    except (TypeError, ValueError, OverflowError) as e:
      kind = parser.flag_type()
      why = "" if kind in _EXPECTED else f": {e}"  # a tuple's parser says what it wanted
      fail(f"--config.{key}={value}: expected {_EXPECTED.get(kind, f'a {kind}')} (the type of "
           f"{key} in {path}){why}")
  fail(f"command line: {error}")


def _define_config_flag():
  # ml_collections applies `--config.x=...` overrides of the default file while defining the
  # flag, so an unknown key surfaces here.
  try:
    return config_flags.DEFINE_config_file(
        "config", DEFAULT_CONFIG, "Config file: a Python file whose get_config() returns an "
        "ml_collections ConfigDict (configs/*.py). Override any of its keys with "
        "--config.KEY=VALUE, e.g. --config.train.epochs=3; --show_config lists the keys.",
        lock_config=True)
  except (AttributeError, KeyError) as e:
    _unknown_config_key(e)


_CONFIG = _define_config_flag()
_SHOW_CONFIG = flags.DEFINE_boolean(
    "show_config", False, "Print every key of the resolved config (the file with the "
    "--config.* overrides applied) with its value, then exit without touching the workdir.")

def command_line_keys() -> set[str]:
  """The keys set by --config.KEY=VALUE on this process's command line (none when the trainer is
  called as a library)."""
  if not flags.FLAGS.is_parsed():
    return set()
  return set(config_flags.get_override_values(flags.FLAGS["config"]))


def pinned_model_keys() -> set[str]:
  return {k.split(".", 1)[1] for k in command_line_keys() if k.startswith("model.")}


def default_workdir(config_path: str) -> str:
  return os.path.join("workdir", os.path.splitext(os.path.basename(config_path))[0])


# absl's help flags, and -h as argparse's commands (convert, generate, select) take it.
_HELP_FLAGS = {"h": True, "?": True, "help": True, "helpshort": True, "helpfull": False}


def _help(argv) -> None:
  """--help and its kin print the command's docstring and its flags (the command's own, and
  the ones it declares key, such as --config) on stdout and exit 0, as the argparse commands
  do; absl's own help flags exit 1."""
  for arg in argv[1:]:
    if arg == "--":
      return
    if arg.startswith("-") and arg.lstrip("-") in _HELP_FLAGS:
      short = _HELP_FLAGS[arg.lstrip("-")]
      app.usage(shorthelp=short, writeto_stdout=True)
      if short:
        print("Try --helpfull to get a list of all flags.")
      sys.exit(0)


def parse_flags(argv):
  """absl's parser, with bad flags reported as one line and --help exiting 0."""
  _help(argv)
  for arg in argv[1:]:
    # ml_collections loads the file while parsing overrides and fails with a page of text.
    if arg.startswith("--config=") and not os.path.isfile(arg.split("=", 1)[1]):
      fail(f"--config: {arg.split('=', 1)[1]}: no such file")
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # an override names no key of the given config file
    _unknown_config_key(e)
  except flags.IllegalFlagValueError as e:  # e.g. --config.train.epochs=abc
    _bad_config_value(argv, e)
  except flags.Error as e:
    fail(f"command line: {e}")


def load_config():
  """The config file with its overrides applied; loading is lazy, so its errors surface here.
  With --show_config: prints it, key by key, and exits 0."""
  path = config_flags.get_config_filename(flags.FLAGS["config"])
  if not os.path.isfile(path):
    fail(f"--config: {path}: no such file")
  try:
    cfg = _CONFIG.value
    cfg.to_dict()  # a file that failed to load raises on first access
  except (AttributeError, KeyError) as e:  # an override names no config key
    _unknown_config_key(e)
  except (OSError, ValueError, TypeError, SyntaxError) as e:
    fail(f"--config: {e}")
  if _SHOW_CONFIG.value:
    print(f"# {path}, with the --config.* overrides applied")
    print("\n".join(f"{key} = {value!r}" for key, value in flat_config(cfg)))
    sys.exit(0)
  return cfg


def flat_config(cfg, prefix: str = ""):
  """(dotted key, value) of every field, sorted by key (ConfigDict.items() order)."""
  for key, value in cfg.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from flat_config(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value
