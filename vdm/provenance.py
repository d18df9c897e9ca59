"""What a model was trained on: the provenance record of a run, and the command that prints it.

  python -m vdm.provenance workdirs/quickstart            # a training workdir or step dir
  python -m vdm.provenance vdm/assets/default_model       # an exported model (both parts)
  python -m vdm.provenance MODEL --json                   # the raw records

Each checkpoint's metadata holds "provenance" (`run_record`): the data set's manifest hash and the
hash of the examples actually used (after exclusions), the exclusion lists in force (their
sha256), the number dropped, the config hash, the code version (git commit when available) and the
seed. A run resumed with other data (another manifest, other exclusion lists) warns and keeps the
earlier record in `history`. `vdm.tools.export` copies the records of both parts into the bundle's
model.json ("provenance": {"denoiser": ..., "vae": ...}); sample.py labels its files with them.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import subprocess
import sys
from importlib import metadata

from vdm import cli
from vdm.errors import UserError
from vdm.io import bundle, checkpoint

FIELD = "provenance"  # the key in checkpoint metadata and in model.json


def config_hash(config) -> str:
    """sha256 of a config's canonical JSON (a ConfigDict or a plain dict)."""
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.cache
def code_version() -> str:
    """The git commit of the vdm checkout ("+dirty" with uncommitted changes), else the installed
    package version."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        run = functools.partial(subprocess.run, capture_output=True, text=True, timeout=10)
        head = run(["git", "-C", root, "rev-parse", "HEAD"])
        if head.returncode == 0:
            dirty = run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"])
            return f"git:{head.stdout.strip()}" + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"vdm=={metadata.version('vdm')}"
    except metadata.PackageNotFoundError:
        return "unknown"


def run_record(config, data: dict | None) -> dict:
    """A run's provenance (what each checkpoint records).

    Args:
      config: the run config.
      data: the training loader's `provenance` (`vdm.data.provenance.Selection.summary`), or None
        for a data iterator that records none.
    """
    return {
        "data": data,
        "data_source": str(config.data.source),
        "config_hash": config_hash(config),
        "code_version": code_version(),
        "seed": int(config.seed),
        "stage": str(config.stage),
        "history": [],  # records of earlier data this run was trained on (`resumed`)
    }


def _data_key(record: dict | None) -> tuple:
    data = (record or {}).get("data") or {}
    lists = [x.get("sha256") for x in data.get("exclude_lists", [])]
    return data.get("manifest_hash"), data.get("used_hash"), tuple(lists)


def resumed(current: dict, previous: dict | None, step: int) -> tuple[dict, str | None]:
    """`current` with the history of `previous` (the record of the checkpoint resumed at `step`),
    and a warning when the two were trained on different data, else None."""
    if not previous:
        return current, None
    history = list(previous.get("history", []))
    warning = None
    if _data_key(previous) != _data_key(current):
        history.append({**{k: v for k, v in previous.items() if k != "history"}, "until": step})
        old, new = (
            ((r.get("data") or {}).get("used_hash") or "none")[:12] for r in (previous, current)
        )
        warning = (
            f"Resuming at step {step} with different training data than the checkpoint's: "
            f"examples hash {old} before, {new} now (manifest or config.data.exclude changed). "
            "Both are recorded in the checkpoint's provenance history."
        )
    return {**current, "history": history}, warning


def of_model(path: str) -> dict[str, dict | None]:
    """{part: provenance record or None} of an exported model (both parts) or a checkpoint
    ("model": its record)."""
    if bundle.is_bundle(path):
        recorded = bundle.read_meta(path).get(FIELD) or {}
        return {part: recorded.get(part) for part in bundle.PARTS}
    part = bundle.part_of(path)
    if part is not None:
        return {part[1]: (bundle.read_meta(part[0]).get(FIELD) or {}).get(part[1])}
    return {"model": checkpoint.load_metadata(path).get(FIELD)}


def _describe_data(data: dict | None) -> list[str]:
    if not data:
        return ["  data: not recorded (a data iterator without provenance)"]
    ds = data["dataset"]
    lines = [
        f"  data set: {ds.get('name')} {ds.get('version', '')} split {ds.get('split')}".rstrip(),
        f"  manifest: sha256 {data['manifest_hash']} ({data['num_examples']} examples)",
        f"  used: {data['used']} examples, sha256 {data['used_hash']}; dropped {data['dropped']} "
        f"({data['dropped_excluded']} on exclusion lists, {data['dropped_no_consent']} without "
        "consent)",
    ]
    for x in data.get("exclude_lists", []):
        lines.append(
            f"  exclusion list: {x['file']} (sha256 {x['sha256']}, {x['entries']} entries)"
        )
    return lines


def describe(record: dict | None) -> list[str]:
    """Readable lines of one provenance record."""
    if not record:
        return ["  not recorded (trained before vdm recorded provenance, or not a vdm run)"]
    lines = _describe_data(record.get("data"))
    lines.append(f"  config.data.source: {record['data_source']}; stage {record['stage']}")
    lines.append(f"  config sha256 {record['config_hash']}; seed {record['seed']}")
    lines.append(f"  code: {record['code_version']}")
    if record.get("note"):
        lines.append(f"  note: {record['note']}")
    for old in record.get("history", []):
        used = (old.get("data") or {}).get("used_hash") or "not recorded"
        lines.append(f"  until step {old['until']} trained on other data: examples sha256 {used}")
    return lines


def main(argv: list[str] | None = None) -> None:
    """`python -m vdm.provenance PATH [--json]`."""
    parser = argparse.ArgumentParser(
        prog="python -m vdm.provenance", description="Print what a model was trained on."
    )
    parser.add_argument("path", help="a training workdir / step dir, or an exported model dir")
    parser.add_argument("--json", action="store_true", help="print the raw records as JSON")
    args = parser.parse_args(argv)
    with cli.clear_errors():
        if not os.path.exists(args.path):
            raise UserError(f"'{args.path}' does not exist; give a workdir or an exported model.")
        records = of_model(args.path)
    if args.json:
        print(json.dumps(records, indent=1, sort_keys=True))
        return
    for part, record in records.items():
        print(f"{part} ({args.path}):")
        print("\n".join(describe(record)))


if __name__ == "__main__":
    main(sys.argv[1:])
