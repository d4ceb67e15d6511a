"""``weightcast cache verify | repair``: check and fix a Hugging Face cache copied between machines.

``verify`` exits 0 when the revision loads (warnings may be listed), 2 with the list of problems
otherwise. ``repair`` exits 0 when nothing is left that needs a download, 2 otherwise. SOURCE is a
repo id (looked up in --cache-dir, else $HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub) or a snapshot path (``.../models--org--name/snapshots/<commit>``).
"""
from __future__ import annotations

import argparse
import json
import os

from weightcast.orchestrator import cache_doctor as doctor


def default_cache_dir() -> str:
    """The hub cache directory as huggingface_hub computes it, read from the environment here."""
    if os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.path.expanduser(os.environ.get("HF_HUB_CACHE") or os.environ["HUGGINGFACE_HUB_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="repo id (org/name) or a snapshot directory")
    p.add_argument("--cache-dir", default=None, help="hub cache holding the repo (default: $HF_HUB_CACHE)")
    p.add_argument("--revision", default=None, help="branch, tag or commit (default: main)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("cache", help="verify or repair a Hugging Face cache",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cache_command", metavar="ACTION")
    verify = sub.add_parser("verify", help="report per file: ok, plain copy, dangling link, ...")
    _add_source(verify)
    verify.add_argument("--hash", action="store_true", help="re-hash every blob against its name (reads all bytes)")
    verify.add_argument("--json", action="store_true", help="print one JSON object")
    verify.set_defaults(func=run_verify)
    repair = sub.add_parser("repair", help="turn copies back into links, fix refs (and modes)")
    _add_source(repair)
    repair.add_argument("--chmod", action="store_true", help="let other users read files and enter directories")
    repair.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    repair.set_defaults(func=run_repair)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _cache_dir(args: argparse.Namespace) -> str | None:
    if args.cache_dir:
        return args.cache_dir
    return None if os.path.isdir(args.source) else default_cache_dir()


def _print_report(report: doctor.CacheReport) -> None:
    print(f"repo {report.repo_id} in {report.repo_dir}")
    print(f"revision {report.revision or '(snapshot path)'} -> commit {report.commit or '(unresolved)'}")
    width = max([len(doctor.OK)] + [len(x.status) for x in (*report.files, *report.refs)])
    for ref in report.refs:
        print(f"  {ref.status:<{width}}  refs/{ref.name}" + (f"  ({ref.detail})" if ref.problems else ""))
    for f in report.files:
        print(f"  {f.status:<{width}}  {f.name}" + (f"  ({f.detail})" if f.problems else ""))
    for issue in report.issues:
        print(f"  {issue}")


def run_verify(args: argparse.Namespace) -> int:
    report = doctor.verify_cache(args.source, cache_dir=_cache_dir(args), revision=args.revision,
                                 check_hash=args.hash)
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
        return 0 if report.loadable else 2
    _print_report(report)
    if report.loadable:
        warned = sum(1 for x in (*report.files, *report.refs) if x.problems)
        print(f"loadable: yes ({len(report.files)} files" + (f", {warned} with warnings; "
              f"`weightcast cache repair` fixes most)" if warned else ")"))
        return 0
    print("loadable: no; problems:")
    for line in report.problems:
        print(f"  - {line}")
    print(f"next: `weightcast cache repair {args.source}` (add --dry-run to see what it would do)")
    return 2


def run_repair(args: argparse.Namespace) -> int:
    from weightcast.orchestrator.cache_repair import repair_cache
    actions = repair_cache(args.source, cache_dir=_cache_dir(args), revision=args.revision,
                           chmod=args.chmod, dry_run=args.dry_run)
    for line in actions or ["nothing to repair"]:
        print(line)
    return 2 if any(a.startswith(doctor.CANNOT) for a in actions) else 0
