"""What the `protopool-hf` command line accepts and says: its argument names and checks, and its one-line errors.

The command line checks the paths it is given (model, image, output) before any work is done, prints every error as
one line (`error_line`), and rewords the library's Python-API advice ("pass resume_from_checkpoint=True") into its own
flags ("pass --resume-from-checkpoint"), in error lines and in the library's log records alike (`cli_wording`).
Importing this module imports neither torch nor transformers.
"""

import argparse
import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path


__all__ = [
    "CLI_WORDING",
    "DATASETS",
    "MASK_RULE_NAMES",
    "check_image_file",
    "check_model_source",
    "check_output_path",
    "cli_log_wording",
    "cli_wording",
    "error_line",
    "model_load_error",
    "non_negative_int",
    "positive_int",
    "quiet_transformers_loading",
]

#: The datasets `--dataset` names (the loaders of `protopool_hf.data`).
DATASETS = ("fashion-mnist", "cub200", "cars196", "folder")
#: The mask rules `evaluate --masks` names: the keys of `protopool_hf.metrics.MASK_RULES`, written here to keep
#: `--help` free of torch.
MASK_RULE_NAMES = ("fashion-mnist",)

# Library advice (Python keyword arguments) -> the same advice in this command line's flags.
CLI_WORDING = {
    "pass resume_from_checkpoint=True": "pass --resume-from-checkpoint",
    "resume_from_checkpoint=True": "--resume-from-checkpoint",
    "make_transforms(..., skip_bad_images=True)": "--skip-bad-images",
    "pass dataset_name=": "pass --dataset-name",
    "pass root=": "pass --data-root",
    "pass overwrite=True (--overwrite)": "pass --overwrite",
    "pass overwrite=True": "pass --overwrite",
    "overwrite=True": "--overwrite",
    "output_dir '": "--output-dir '",
    "another output_dir": "another --output-dir",
    "a fresh output_dir": "a fresh --output-dir",
}
_WORDING = re.compile("|".join(re.escape(key) for key in sorted(CLI_WORDING, key=len, reverse=True)))
# A Hub repo id: "name" or "namespace/name" of letters, digits, "-", "_", "." (huggingface_hub's rule, without "--").
_REPO_ID = re.compile(r"^(?:[\w.\-]{1,96}/)?[\w.\-]{1,96}$")


def cli_wording(text: str) -> str:
    """`text` with the library's keyword-argument advice replaced by the command line's flags (`CLI_WORDING`)."""
    return _WORDING.sub(lambda match: CLI_WORDING[match.group(0)], text)


def error_line(command: str, error: BaseException) -> str:
    """The one line `protopool-hf COMMAND: error: ...` for an exception (its lines joined, advice in CLI flags).

    `ValueError`s and `OSError`s are the library's answers to bad input and print their message alone; any other
    exception is unexpected and names its type and how to see the traceback.
    """
    message = " ".join(part.strip() for part in str(error).splitlines() if part.strip()) or repr(error)
    if isinstance(error, KeyError):  # str(KeyError('x')) is "'x'"
        message = f"missing key {message}"
    if not isinstance(error, ValueError | OSError):
        message = f"{type(error).__name__}: {message} (run again with --debug for the traceback)"
    return f"protopool-hf {command}: error: {cli_wording(message)}"


@contextlib.contextmanager
def cli_log_wording() -> Iterator[None]:
    """Within the block, records of the package's loggers read in the command line's flags (`cli_wording`)."""
    previous = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if record.name.split(".")[0] == "protopool_hf" and isinstance(record.msg, str):
            record.msg = cli_wording(record.msg)
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)


@contextlib.contextmanager
def quiet_transformers_loading() -> Iterator[None]:
    """Silences transformers' warnings (its multi-line "LOAD REPORT") and its "Loading weights" bar while a model loads.

    Errors still raise: the strict loading of `ProtoPoolPreTrainedModel.from_pretrained` turns what the report would
    say into one exception. Downloads from the Hub keep their progress bars (huggingface_hub's own).
    """
    from transformers.utils import logging as transformers_logging

    verbosity = transformers_logging.get_verbosity()
    bar = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bar:
            transformers_logging.enable_progress_bar()


# ---------------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    """An argparse type: an int >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An argparse type: an int >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= {low}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be a whole number >= {low}, got {value}")
    return value


# ---------------------------------------------------------------------------- paths
def check_model_source(model: str) -> None:
    """Refuses a MODEL that is a file, a folder without config.json, or a missing path that is no Hub repo id.

    A missing path that could be a Hub repo id (`name`, `namespace/name`) is left to the loader, whose failure
    `model_load_error` rewords.

    Raises:
        FileNotFoundError: with one line naming MODEL and what to pass instead.
    """
    path = Path(model).expanduser()
    what = "pass the folder written by train, project, convert or save_pretrained (it holds config.json)"
    if path.is_file():
        raise FileNotFoundError(f"MODEL {model!r} is a file, not a model folder: {what}.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"MODEL folder {model!r} holds no config.json: {what}.")
        return
    if not _REPO_ID.match(model) or model.startswith((".", "~")) or "--" in model or model.endswith("."):
        raise FileNotFoundError(f"MODEL {model!r}: no such folder. Check the path; {what}.")


def model_load_error(model: str, error: OSError) -> OSError:
    """The error to show when MODEL, no local folder, could not be loaded as a Hub repo id."""
    if Path(model).expanduser().exists():
        return error
    offline = " (HF_HUB_OFFLINE is set: only repos already in the cache load)" if _offline() else ""
    return FileNotFoundError(
        f"MODEL {model!r}: no such folder, and no Hub repo of that id could be loaded{offline}. For a local model "
        "check the path; for a Hub repo id check the spelling (namespace/name), your network and, for a private "
        "repo, your login (hf auth login)."
    )


def check_image_file(image: Path) -> None:
    """Refuses an IMAGE that is missing or a folder, naming it."""
    if image.is_dir():
        raise IsADirectoryError(f"IMAGE {str(image)!r} is a folder, not an image file: pass one image file.")
    if not image.is_file():
        raise FileNotFoundError(f"IMAGE {str(image)!r} does not exist: check the path.")


def check_output_path(flag: str, path: Path, *, folder: bool) -> None:
    """Refuses an output path that cannot be written: one of its parents is a file, or it is of the wrong kind.

    Args:
        flag: how the command line names the path (`--out`, `--output-dir`, `OUTPUT_DIR`).
        path: the path.
        folder: whether the path is to be a folder (else a file).
    """
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(
                    f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder. Choose another path."
                )
            break
    if folder and path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{flag} {str(path)!r} is a file, not a folder: choose a folder.")
    if not folder and path.is_dir():
        raise IsADirectoryError(f"{flag} {str(path)!r} is a folder: pass a file name, e.g. {str(path / 'x.png')!r}.")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")
