"""``synthsr-models``: list, fetch, import, verify and locate model weights.

Exit codes: 0 success, 1 failure (missing/corrupt model, download error), 64 usage error.
Tables and paths go to stdout; progress and diagnostics go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from synthsr_bids import __version__
from synthsr_bids.models.fetch import ModelDownloadError, fetch_model, import_model
from synthsr_bids.models.registry import (
    DEFAULT_MODEL,
    USER_LICENSE,
    WEIGHT_SUFFIXES,
    ModelError,
    file_sha256,
    get_registry,
    model_status,
    models_cache_dir,
    resolve_model,
    user_models_dir,
)

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main"]

LOGGER = logging.getLogger("synthsr_bids.cli.models")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 64  # EX_USAGE from sysexits.h


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports usage errors with exit code 64 instead of 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", type=Path, default=None, metavar="DIR",
                        help="model cache (default: $SYNTHSR_BIDS_MODELS, else $XDG_CACHE_HOME/synthsr-bids/models, "
                             "else ~/.cache/synthsr-bids/models)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug messages")
    common.add_argument("-q", "--quiet", action="store_true", help="only errors")

    parser = _Parser(prog="synthsr-models", description="Manage the network weights used by synthsr-bids.",
                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"synthsr-bids {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    commands.add_parser("list", parents=[common], help="table of registered and imported models with their status")

    fetch = commands.add_parser("fetch", parents=[common], help="download registered models (resumable, verified)")
    fetch.add_argument("names", nargs="+", metavar="NAME", help="registered model name(s), see `list`")
    fetch.add_argument("--url", default=None, help="download from this URL instead (one NAME only); the size and "
                                                   "sha256 are still checked against the registry")
    fetch.add_argument("--retries", type=int, default=2, help="resume an interrupted transfer this many times")
    fetch.add_argument("--no-progress", action="store_true", help="no progress bar")

    imp = commands.add_parser("import", parents=[common],
                              help="copy a model file you already have (e.g. from $FREESURFER_HOME/models) into the "
                                   "cache, verified against the registry when it is a registered model")
    imp.add_argument("path", type=Path, metavar="PATH", help=f"a {' or '.join(WEIGHT_SUFFIXES)} file")
    imp.add_argument("--name", default=None, help="registered model it must match, or a name for your own model")

    verify = commands.add_parser("verify", parents=[common], help="re-check the sha256 of cached models")
    verify.add_argument("names", nargs="*", metavar="NAME", help="models to check (default: every installed one)")

    path = commands.add_parser("path", parents=[common], help="print the verified path of a model")
    path.add_argument("name", nargs="?", default=None, metavar="NAME",
                      help=f"model name or file (default: {DEFAULT_MODEL})")
    return parser


def _human_size(size: int | None) -> str:
    if size is None:
        return "-"
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _user_models(cache_dir: Path) -> list[Path]:
    directory = user_models_dir(cache_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)


def _cmd_list(args: argparse.Namespace, cache_dir: Path) -> int:
    rows = [("NAME", "VERSION", "LICENSE", "SIZE", "STATUS", "PATH")]
    for spec in get_registry().values():
        state = model_status(spec, cache_dir=cache_dir)
        name = f"{spec.name} (default)" if spec.name == DEFAULT_MODEL else spec.name
        rows.append((name, spec.version, spec.license, _human_size(spec.size), state.status, str(state.path)))
    for path in _user_models(cache_dir):
        rows.append((path.stem, "-", USER_LICENSE, _human_size(path.stat().st_size), "imported", str(path)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    print(f"\nCache: {cache_dir}")
    return EXIT_OK


def _cmd_fetch(args: argparse.Namespace, cache_dir: Path) -> int:
    if args.url is not None and len(args.names) > 1:
        raise _UsageError("--url can only be used with a single NAME")
    if args.retries < 0:
        raise _UsageError("--retries must be >= 0")
    registry = get_registry()
    unknown = [name for name in args.names if name not in registry]
    if unknown:
        raise _UsageError(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(registry)}")
    status = EXIT_OK
    for name in args.names:
        try:
            path = fetch_model(registry[name], cache_dir=cache_dir, url=args.url, progress=not args.no_progress,
                               retries=args.retries)
        except ModelError as exc:
            LOGGER.error("%s", exc)
            status = EXIT_FAILURE
            continue
        print(f"{name}: {path}")
    return status


def _cmd_import(args: argparse.Namespace, cache_dir: Path) -> int:
    try:
        resolved = import_model(args.path, name=args.name, cache_dir=cache_dir)
    except (ModelError, ValueError) as exc:
        LOGGER.error("%s", exc)
        return EXIT_FAILURE
    kind = "registered model" if resolved.spec is not None else "user model"
    print(f"Imported {args.path} as {kind} {resolved.name} (sha256 {resolved.sha256}): {resolved.path}")
    return EXIT_OK


def _cmd_verify(args: argparse.Namespace, cache_dir: Path) -> int:
    registry = get_registry()
    user = {path.stem: path for path in _user_models(cache_dir)}
    names = args.names or [*registry, *user]
    unknown = [name for name in names if name not in registry and name not in user]
    if unknown:
        raise _UsageError(f"unknown model(s) {', '.join(unknown)}; registered: {', '.join(registry)}")
    failures = 0
    for name in names:
        if name not in registry:
            digest = file_sha256(user[name], cache_dir=cache_dir, force=True)
            print(f"{name}: imported (sha256 {digest}, not registered) {user[name]}")
            continue
        state = model_status(registry[name], cache_dir=cache_dir, verify=True)
        if state.ok:
            print(f"{name}: OK ({state.status}, sha256 {state.sha256}) {state.path}")
        elif state.status == "corrupt":
            failures += 1
            print(f"{name}: CORRUPT {state.path}: {state.detail}. Run `synthsr-models fetch {name}` to replace it.")
        elif args.names:
            failures += 1
            print(f"{name}: {state.status.upper()} {state.path}: {state.detail}")
        else:
            print(f"{name}: {state.status} (not installed)")
    return EXIT_FAILURE if failures else EXIT_OK


def _cmd_path(args: argparse.Namespace, cache_dir: Path) -> int:
    try:
        resolved = resolve_model(args.name, cache_dir=cache_dir)
    except ModelError as exc:
        LOGGER.error("%s", exc)
        return EXIT_FAILURE
    print(resolved.path)
    return EXIT_OK


_COMMANDS = {"list": _cmd_list, "fetch": _cmd_fetch, "import": _cmd_import, "verify": _cmd_verify,
             "path": _cmd_path}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``synthsr-models``; returns the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help/--version (0) or a usage error (64)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    level = logging.ERROR if args.quiet else (logging.DEBUG if args.verbose else logging.INFO)
    package_logger = logging.getLogger("synthsr_bids")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    package_logger.addHandler(handler)
    previous_level = package_logger.level
    package_logger.setLevel(level)
    try:
        cache_dir = args.cache_dir if args.cache_dir is not None else models_cache_dir()
        return _COMMANDS[args.command](args, cache_dir.expanduser())
    except _UsageError as exc:
        print(f"synthsr-models {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ModelDownloadError, ModelError, ValueError) as exc:
        LOGGER.error("%s", exc)
        return EXIT_FAILURE
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(previous_level)


if __name__ == "__main__":
    sys.exit(main())
