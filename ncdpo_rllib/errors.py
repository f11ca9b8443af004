"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class UserError(Exception):
    """A problem with what the user gave us (config, paths, checkpoints): no traceback."""


class ConfigError(UserError):
    """An invalid experiment configuration."""


class CheckpointError(UserError):
    """A missing, incomplete or corrupt checkpoint."""


class TrainingDiverged(UserError):
    """Parameters became NaN/inf: the message names the last good checkpoint."""


class WorkerLost(UserError):
    """A Ray process the run cannot do without died (a learner: RLlib 2.60 does not restart learners;
    the whole local Ray): the message names the last checkpoint and the --resume command."""


class TrainingInterrupted(Exception):
    """A run stopped by SIGINT/SIGTERM after its current iteration, with a checkpoint: the message
    names it and the --resume command; the CLI exits 130."""


class DatasetError(UserError):
    """A missing, malformed or corrupt demonstration dataset: the message names the file, problem and fix."""


def one_line(exc: BaseException, limit: int = 200, *, with_type: bool = False) -> str:
    """A library's error message for one of ours: its first non-empty line, whitespace collapsed,
    at most ``limit`` characters (the exception's type name when it has no message; prefixed with
    it when ``with_type``)."""
    lines = [" ".join(line.split()) for line in str(exc).splitlines()]
    text = next((line for line in lines if line), "")
    if with_type or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unknown_name(key: str, name: str, what: str, names, listed: int = 0) -> str:
    """``"<key> '<name>' is not <what>; did you mean a, b?"``: the message for a name that is not
    one of ``names``, with up to 3 close matches, else (``listed`` > 0) the first ``listed`` names."""
    import difflib

    names = list(names)
    close = difflib.get_close_matches(name, names, n=3)
    if close:
        hint = f"; did you mean {', '.join(close)}?"
    elif listed:
        hint = f"; choose one of {', '.join(names[:listed])}{', ...' if len(names) > listed else ''}"
    else:
        hint = ""
    return f"{key} {name!r} is not {what}{hint}"

