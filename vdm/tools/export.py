"""Exports a trained denoiser (and its VAE) as a compact, self-contained model directory.

  python -m vdm.tools.export --checkpoint workdirs/quickstart --output vdm/assets/default_model \
      [--vae workdirs/vae_quickstart_decoder] [--sample guidance=3 ...] [--alignment WD]

Writes a bundle (`vdm.io.bundle`: EMA weights of the denoiser and the VAE, the config, the
latent statistics; the text encoder referenced by name) plus the training logs of both
stages (`train_log.jsonl`, `vae_train_log.jsonl`: each workdir's metrics.jsonl;
`init_train_log.jsonl` /
`vae_init_train_log.jsonl` when a stage was started from another run's weights, e.g. a denoiser
grown from the bundled one, `init_init_train_log.jsonl` for the run before that, and so on) so
the bundle carries the record of how it was made.
`sample.py --checkpoint OUT` and `vdm.load_pipeline(OUT)` load it. A Wan fine-tuning run
(stage "wan") is exported as a Diffusers-format Wan pipeline instead (`vdm.tools.export_wan`).

Everything is written into a `.export-*` staging folder beside OUT first and then moved in; a
failed or interrupted export (Ctrl-C, SIGTERM: exit 130) removes the staging folder, and the
final swap into OUT is not interrupted halfway.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import sys
import tempfile
from typing import Any

import jax
import numpy as np
from absl import logging as absl_logging

from vdm import cli, paths, provenance
from vdm import config as config_lib
from vdm.data import cache
from vdm.errors import UserError
from vdm.inference import alignment as aligner_lib
from vdm.inference import load, pipeline
from vdm.inference.settings import SamplingSettings
from vdm.io import bundle, checkpoint, manager
from vdm.tools import export_wan


def _workdir_of(path: str) -> str:
    """The training workdir of a workdir, its checkpoints/ dir, or a checkpoint step dir."""
    path = os.path.abspath(path)
    for candidate in (path, os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
        if os.path.exists(os.path.join(candidate, "metrics.jsonl")):
            return candidate
    raise FileNotFoundError(f"No metrics.jsonl in or above '{path}' (not a training workdir?).")


# An exported model keeps the training log of each run its weights came through, newest first:
# `train_log.jsonl` (the exported denoiser's run), `init_train_log.jsonl` (the run it was started
# from with `train.init_from`), `init_init_train_log.jsonl`, ...; `vae_` before each for the VAE.
_PART_PREFIX = {"denoiser": "", "vae": "vae_"}
_LOG_NAME = re.compile(r"^(vae_)?(init_)*train_log\.jsonl$")
_MAX_HOPS = 32  # a longer init_from chain is a cycle


def _log_name(part: str, hops: int) -> str:
    """The bundle's name for the log of the run `hops` init_from steps before `part`'s run."""
    return f"{_PART_PREFIX[part]}{'init_' * hops}train_log"


def _run_id(path: str) -> str:
    """A run's identity for comparing chains: the real path of its workdir (or of `path`)."""
    with contextlib.suppress(FileNotFoundError):
        path = _workdir_of(path)
    return os.path.realpath(path)


def _logs_of(path: str, part: str, hops: int = 0, chain: tuple[str, ...] = ()) -> dict[str, str]:
    """{bundle log name: source file} for the run at `path` (a training workdir or an exported
    model's `part/` weights) and every run before it in its `train.init_from` chain, `hops` being
    how many init_from steps `path` is from the model being exported and `chain` the runs (by
    `_run_id`) at hops 0 .. hops - 1.

    A bundle met along the chain contributes the logs it carries. When that bundle was itself
    exported from a run already in the chain (a model re-exported over the bundle it grew from,
    so the bundle now holds this chain's own later runs), its logs are aligned by that run.
    """
    if hops > _MAX_HOPS:
        raise ValueError(f"train.init_from chain longer than {_MAX_HOPS} runs at '{path}'.")
    part_of = bundle.part_of(path)
    if part_of is not None:  # an exported model carries its chain of logs beside its weights
        model_dir, src_part = part_of
        source = bundle.source(model_dir, src_part)
        first = 0
        if source and _run_id(source) in chain:
            first = hops - chain.index(_run_id(source))
        out = {}
        for k in range(first, _MAX_HOPS + first - hops + 1):
            log = os.path.join(model_dir, f"{_log_name(src_part, k)}.jsonl")
            if not os.path.exists(log):
                break
            out[_log_name(part, hops + k - first)] = log
        return out
    out = {_log_name(part, hops): os.path.join(_workdir_of(path), "metrics.jsonl")}
    init_from = checkpoint.load_config(path).train.init_from
    if init_from:
        out.update(_logs_of(init_from, part, hops + 1, (*chain, _run_id(path))))
    return out


def _same_weights(a: str, b: str) -> bool:
    """Whether two orbax param dirs hold the same tree (paths, dtypes, values)."""
    if not (os.path.isdir(a) and os.path.isdir(b)):
        return False
    try:
        ta, tb = bundle.restore_tree(a), bundle.restore_tree(b)
    except Exception:  # an unreadable old dir is simply replaced
        return False
    la, lb = jax.tree_util.tree_leaves_with_path(ta), jax.tree_util.tree_leaves_with_path(tb)
    return [(k, x.dtype) for k, x in la] == [(k, y.dtype) for k, y in lb] and all(
        np.array_equal(x, y) for (_, x), (_, y) in zip(la, lb, strict=True)
    )


def vae_source(denoiser_path: str) -> str:
    """The VAE checkpoint a denoiser checkpoint (or an exported model dir) decodes with ("" when
    it has none). A recorded VAE path is checked before it is followed.

    Raises:
      UserError: the recorded VAE does not exist or is not a VAE checkpoint (pass --vae).
    """
    if bundle.is_bundle(denoiser_path):
        return bundle.vae_source(denoiser_path)
    try:
        return checkpoint.recorded_vae(checkpoint.load_metadata(denoiser_path), denoiser_path)
    except UserError as e:
        raise UserError(f"{e} To export it, pass --vae VAE_DIR.") from None


def export(
    denoiser_path: str,
    out_dir: str,
    *,
    item: str = "ema",
    vae: str | None = None,
    sample: dict[str, Any] | None = None,
) -> str:
    """Writes a compact, self-contained model dir (EMA denoiser + EMA VAE + config + stats).

    The text encoder is referenced by name (e.g. "minilm"), not copied. `vae` replaces the
    denoiser's VAE with a decoder fine-tune of it (see `vae_swap.swap_vae`). `sample` sets
    sampling defaults the bundle records instead of the training config's (`config.sample`, e.g.
    a guidance scale chosen after training), each set like `--config.sample.KEY=VALUE` and then
    checked as `SamplingSettings`.

    Raises:
      ConfigError: an unknown sampling key or a value of the wrong type; UserError: a value out
        of range.
    """
    pipe = pipeline.load_pipeline(denoiser_path, item=item, vae=vae)
    for key, value in (sample or {}).items():  # typed and checked like a --config override
        text = value if isinstance(value, str) else repr(value)
        config_lib.apply_override(pipe.config, f"sample.{key}", text)
    SamplingSettings.from_config(pipe.config.sample)  # raises for a value out of range
    pipe.sampling_spec()  # ... and for a shift this model cannot sample with
    config = pipe.config.to_dict()
    # A bundle must not point at the trainer's local latent cache: record what it was built from.
    config["data"]["source"] = cache.underlying_source(pipe.config.data.source)
    vae_run = vae or vae_source(denoiser_path)
    return bundle.write(
        out_dir,
        config=config,
        latent_stats=pipe.latent_stats,
        text_encoder=pipe.config.text_encoder.name,
        params=pipe.params,
        vae_params=pipe.vae_params,
        source=denoiser_path,
        vae_source=vae_run,
        provenance=_provenance(denoiser_path, vae_run),
    )


def _provenance(denoiser_path: str, vae_run: str) -> dict:
    """The provenance records of both parts' training runs (None where a run has none)."""
    records = provenance.of_model(denoiser_path)
    out = {"denoiser": records.get("model", records.get("denoiser"))}
    if vae_run:
        vae_records = provenance.of_model(vae_run)
        out["vae"] = vae_records.get("model", vae_records.get("vae"))
    return out


def _check_denoiser(path: str) -> None:
    """Refuses a --checkpoint that is not a denoiser's, naming it, before anything is read."""
    if bundle.is_bundle(path):
        raise UserError(
            f"--checkpoint '{path}' is already an exported model; to export it again pass its "
            f"denoiser part, '{os.path.join(path, 'denoiser')}'."
        )
    try:
        stage = checkpoint.stage_of(path)
    except FileNotFoundError as e:
        raise UserError(f"--checkpoint '{path}': {e}") from None
    if stage != "denoiser":
        raise UserError(
            f"--checkpoint '{path}' is a checkpoint of stage '{stage}', not a denoiser. Export "
            "exports a denoiser training workdir (its VAE comes with it, or pass --vae); a VAE "
            "alone cannot be exported."
        )


_INTERRUPTED = False  # set by main's SIGTERM handler


def _swap_into(staging: str, output: str) -> None:
    """Moves what `staging` holds into `output`, replacing those names (and stale logs there);
    a weights dir equal to the one already in `output` keeps its files (orbax names its files
    anew on every save, which would churn a committed bundle)."""
    os.makedirs(output, exist_ok=True)
    produced = set(os.listdir(staging))
    stale = {n for n in os.listdir(output) if _LOG_NAME.match(n)} - produced
    for name in produced | stale:
        target = os.path.join(output, name)
        weights = (*bundle.PARTS, bundle.ALIGNMENT)
        if name in weights and _same_weights(target, os.path.join(staging, name)):
            continue
        if os.path.isdir(target):
            shutil.rmtree(target)
        elif os.path.exists(target):
            os.remove(target)
        if name in produced:
            os.replace(os.path.join(staging, name), target)


def export_with_logs(
    checkpoint: str,
    output: str,
    vae: str | None = None,
    sample: dict | None = None,
    alignment: str | None = None,
) -> dict[str, str]:
    """Exports `checkpoint` to `output` and copies both stages' training logs beside it.

    Everything is written to a temporary directory first and then moved into `output`, so a
    model can be re-exported over the bundle its VAE (or its initial weights) came from. A
    `denoiser/` or `vae/` whose weights equal those already in `output` keeps its files (orbax
    writes the same values under new file names, which would churn a committed bundle).

    Args:
      checkpoint: a denoiser training workdir (or checkpoint step dir).
      output: the bundle directory (created; existing weights and logs in it are replaced, other
        files such as a README are kept).
      vae: a decoder fine-tune of the denoiser's VAE to bundle instead (`vae_swap.swap_vae`).
      sample: sampling defaults to record instead of the run's `config.sample` (`export`).
      alignment: an alignment model to bundle as the export's `alignment/` part (a stage
        "alignment" workdir, or an exported model with one); it must have been trained on this
        model's text encoder and VAE latents (checked before anything is replaced). Without it,
        an alignment part already in `output` is kept as it is (its use is checked the same way).

    Returns:
      {"bundle": output, "train_log": path, "vae_train_log": path} and, for a run started from
      another checkpoint (`train.init_from`), "init_train_log" / "vae_init_train_log" (and
      "init_init_train_log", ... along a longer chain).
    """
    if load.is_wan_run(checkpoint):  # a Wan fine-tune: a Diffusers-format pipeline directory
        if vae or sample or alignment:
            raise UserError(
                "--vae, --sample and --alignment apply to vdm's own models, not to a Wan fine-tune."
            )
        return export_wan.export(checkpoint, output)
    output = paths.check_output_dir(output, "--output", create=False)
    _check_denoiser(checkpoint)
    vae_run = vae or vae_source(checkpoint)
    logs = {**_logs_of(checkpoint, "denoiser"), **_logs_of(vae_run, "vae")}
    os.makedirs(os.path.dirname(output), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".export-", dir=os.path.dirname(output))
    blocked = None
    try:
        export(checkpoint, staging, vae=vae, sample=sample)
        if alignment:
            _add_alignment(staging, alignment)
        for name, source in logs.items():
            shutil.copyfile(source, os.path.join(staging, f"{name}.jsonl"))
        # Ctrl-C / SIGTERM wait until the swap is done: the bundle is never left half replaced.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        if _INTERRUPTED:  # a SIGTERM whose KeyboardInterrupt was swallowed (e.g. in a gc callback)
            raise KeyboardInterrupt
        _swap_into(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if blocked is not None:  # after the clean-up: a waiting Ctrl-C / SIGTERM lands here
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
    return {"bundle": output, **{n: os.path.join(output, f"{n}.jsonl") for n in logs}}


def _add_alignment(model_dir: str, source: str) -> None:
    """Bundles the alignment model at `source` into the exported model dir `model_dir`."""
    part, params = aligner_lib.bundle_part(source)
    facts = bundle.part_item(model_dir, "denoiser", "metadata")  # text encoder, latent stats
    aligner_lib.check_compatible(source, part, facts["text_encoder"], facts["latent_stats"])
    bundle.write_alignment(model_dir, params, part)


def _interrupted(signum, frame):
    global _INTERRUPTED
    _INTERRUPTED = True
    raise KeyboardInterrupt


def _caused_by_interrupt(e: BaseException | None) -> bool:
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return True
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m vdm.tools.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--checkpoint", required=True, help="denoiser (or stage wan) training workdir"
    )
    parser.add_argument("--output", required=True, help="bundle directory to write")
    parser.add_argument(
        "--vae",
        default=None,
        help="a decoder-only fine-tune of the denoiser's VAE to bundle instead of it "
        "(same encoder weights; e.g. configs/vae_quickstart_decoder.py)",
    )
    parser.add_argument(
        "--sample",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a sampling default the bundle records instead of the run's config.sample, e.g. "
        "--sample guidance=3 (repeatable)",
    )
    parser.add_argument(
        "--alignment",
        default=None,
        help="an alignment model to bundle with it (a configs/alignment.py workdir, or an "
        "exported model with one); trained on this model's text encoder and VAE (checked)",
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """`python -m vdm.tools.export --checkpoint WORKDIR --output DIR`."""
    parser = _parser()
    args = parser.parse_args(argv)
    bad = [kv for kv in args.sample if "=" not in kv]
    if bad:
        parser.error(f"--sample takes KEY=VALUE, got {bad}")
    sample = dict(kv.split("=", 1) for kv in args.sample)

    absl_logging.set_verbosity(absl_logging.WARNING)
    # SIGTERM unwinds like Ctrl-C, so the staging folder is removed (export_with_logs' finally).
    signal.signal(signal.SIGTERM, _interrupted)
    manager.quiet_closed_event_loop()  # an interrupted orbax read leaves late callbacks behind
    previous_hook = sys.unraisablehook

    def swallowed_interrupt(unraisable):  # our SIGTERM landed in a gc callback: handled later
        if not (_INTERRUPTED and unraisable.exc_type is KeyboardInterrupt):
            previous_hook(unraisable)

    sys.unraisablehook = swallowed_interrupt
    with cli.clear_errors():
        try:
            out = export_with_logs(
                args.checkpoint, args.output, vae=args.vae, sample=sample, alignment=args.alignment
            )
        except BaseException as e:  # orbax re-raises an interrupt in its reads as an Exception
            if not (_INTERRUPTED or _caused_by_interrupt(e)):
                raise
            sys.stderr.write(
                f"error: export interrupted; its staging folder was removed and '{args.output}' "
                "holds no part-written files (run the export again).\n"
            )
            sys.exit(130)
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(args.output) for f in fs)
    print(f"Exported {args.checkpoint} -> {out['bundle']} ({size / 2**20:.1f} MiB).")


if __name__ == "__main__":
    main(sys.argv[1:])
