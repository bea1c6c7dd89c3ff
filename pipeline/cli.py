"""The `xmodel` command (also `python -m pipeline`). Each subcommand is the DVC stage of the same name.

Imports of torch, transformers, zarr and the stages happen inside commands, so `xmodel --help` is instant.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from pipeline.errors import UserError


# options several commands share, declared once
model_option = click.option("--model", "role", required=True, help="Model role in params.yaml (a or b).")
quiet_option = click.option("--quiet", is_flag=True, help="No progress output: only errors and warnings (for scripts and DVC).")


def force_option(what: str):
    return click.option("--force", is_flag=True, help=f"Replace {what}.")


def parse_sets(sets: tuple[str, ...]) -> dict:
    """-S KEY=VALUE overrides as {dotted key: YAML value} (also for scripts that take xmodel's -S)."""
    import yaml

    out = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected key=value, e.g. --set extract.max_tokens=64")
        out[key] = yaml.safe_load(value)
    return out


@click.group()
@click.option("--params", "overlays", multiple=True, metavar="FILE",
              help="A params file merged over ./params.yaml (repeatable: later files win; mappings merge key by "
                   "key, lists are replaced, null removes a key), e.g. --params profiles/tiny.yaml.")
@click.option("--set", "-S", "sets", multiple=True, metavar="KEY=VALUE", help="Override a parameter, e.g. -S corpus.n=64.")
@click.pass_context
def cli(ctx: click.Context, overlays: tuple[str, ...], sets: tuple[str, ...]) -> None:
    """xmodel: activation communication between two language models, as a staged, cached pipeline.

    Params are ./params.yaml (DVC's params), then each --params file over it, then each -S."""
    ctx.ensure_object(dict)
    ctx.obj["overlays"] = overlays
    ctx.obj["sets"] = sets


def _params(ctx: click.Context):
    from pipeline.config import DEFAULT_PARAMS, load_params

    if not DEFAULT_PARAMS.is_file() and not ctx.obj["overlays"]:
        # the built-in defaults are real models: a run from the wrong folder would download and fill
        # a data/ here without saying which params it ran
        raise UserError(f"no {DEFAULT_PARAMS} in {Path.cwd()}: run xmodel in the project folder (the one with "
                        "params.yaml and dvc.yaml), or name the params with --params FILE")
    return load_params(overrides=parse_sets(ctx.obj["sets"]), overlays=ctx.obj["overlays"])


@cli.command()
@model_option
@click.pass_context
def prepare(ctx: click.Context, role: str) -> None:
    """Resolve a model (hub, local dir, .gguf or offline catalog), convert and cache it."""
    from stages import prepare as stage

    click.echo(stage.run(_params(ctx), role))


@cli.command()
@click.pass_context
def inputs(ctx: click.Context) -> None:
    """Hash the local files params names (corpus, model directory or .gguf, task files) into data/inputs/."""
    from stages import inputs as stage

    for path in stage.run(_params(ctx)):
        click.echo(path)


@cli.command()
@click.argument("profiles", nargs=-1)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the result here (e.g. params.yaml, which DVC reads) instead of printing it; an existing "
                   "file is replaced only if it is a params file.")
@force_option("an --out file that is not a params file")
@click.pass_context
def profile(ctx: click.Context, profiles: tuple[str, ...], out: Path | None, force: bool) -> None:
    """./params.yaml with each PROFILE (a name in profiles/, or a file) merged over it, validated, as YAML.

    `xmodel profile tiny --out params.yaml && dvc repro` runs the pipeline on the tiny profile."""
    import yaml

    from pipeline.config import is_params_file, merged_params, params_from_dict
    from pipeline.fitting import check_aligners

    files = [*ctx.obj["overlays"], *(p if p.endswith((".yaml", ".yml")) else f"profiles/{p}.yaml" for p in profiles)]
    raw = merged_params(overrides=parse_sets(ctx.obj["sets"]), overlays=files)
    check_aligners(params_from_dict(raw).fit)  # refuse what a stage would refuse, before anything is written
    if out is not None and out.exists() and not force and not is_params_file(out):
        raise UserError(f"--out {out} exists and is not a params file (a YAML mapping of params sections): "
                        "choose another path, or add --force to replace it")
    text = yaml.safe_dump(raw, sort_keys=False)
    if out is None:
        click.echo(text, nl=False)
    else:
        from pipeline.artifacts import write_text

        write_text(out, text)


@cli.command()
@model_option
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), help="Store path (default: data/stores/<role>.zarr).")
@force_option("a store made from other inputs")
@quiet_option
@click.pass_context
def extract(ctx: click.Context, role: str, out: Path | None, force: bool, quiet: bool) -> None:
    """Run one model over the corpus into its activation store (torchrun for several GPUs)."""
    from stages import extract as stage

    if quiet:
        _silence_libraries()
    result = stage.run(_params(ctx), role, out=out, force=force, quiet=quiet)
    if result.status == "complete":
        click.echo(f"{result.path}: already complete, nothing to do")
    elif not quiet:
        rate = result.tokens / result.seconds if result.seconds else 0.0
        click.echo(f"{result.path}: wrote {result.units} units, {result.tokens} tokens, {rate:,.0f} tokens/s")


@cli.command()
@click.argument("name")
@force_option("an aligner or checkpoint fitted on other inputs")
@quiet_option
@click.pass_context
def fit(ctx: click.Context, name: str, force: bool, quiet: bool) -> None:
    """Fit aligner NAME (registered, or module:Class) from the stores; no model is loaded.

    Hyper-parameters come from params.yaml fit.aligners.NAME; a checkpoint is resumed."""
    from stages import fit as stage

    params = _params(ctx)
    result = stage.run(params, name, force=force, log=None if quiet else _echo_epoch)
    m = result.metrics
    if m and not quiet:
        click.echo(f"{result.directory}: {m['aligner']} {m['d_source']}->{m['d_target']} on {m['activation_kind']} "
                   f"L{m['layer_a']}->L{m['layer_b']}, {m['train_rows']} train / {m['heldout_rows']} held-out rows: "
                   f"top-1 {m['retrieval_top1']:.3f}, top-5 {m['retrieval_top5']:.3f}, MSE {m['mse']:.4g}, "
                   f"R² {m['r2']:.3f}, CKA {m['cka']:.3f}")


def _echo_epoch(entry: dict) -> None:
    held = entry.get("heldout_loss")
    click.echo(f"  epoch {entry['epoch']}: train loss {entry['train_loss']:.4g}"
               + (f", validation loss {held:.4g}" if held is not None else ""))


@cli.command()
@click.argument("variant")
@force_option("a fuser or checkpoint trained on other inputs")
@quiet_option
@click.pass_context
def fuse(ctx: click.Context, variant: str, force: bool, quiet: bool) -> None:
    """Train the learned fuser VARIANT (task | prose): A's states -> B's key/value prefix, B frozen.

    Settings come from params.yaml fuse; a checkpoint of an interrupted run is resumed."""
    from stages import fuse as stage

    if quiet:
        _silence_libraries()
    result = stage.run(_params(ctx), variant, force=force, log=None if quiet else (lambda line: click.echo(line, err=True)))
    r = result.report
    if not quiet:
        click.echo(f"{result.directory}: held-out loss {r['heldout_loss']:.4g} per target token over {r['n_heldout']} "
                   f"items (least-squares start {r['heldout_loss_init']:.4g}, B alone {r['heldout_loss_b_alone']:.4g}), "
                   f"{r['epochs_run']} epochs, best {r['best_epoch']}")


@cli.command()
def methods() -> None:
    """List the communication methods (evaluate.methods), what each needs and how it conditions B."""
    from pipeline.evaluation.methods.registry import METHODS

    for name, m in METHODS.items():
        needs = ", ".join({"answer": "A's answer", "last": "A's layer-k last state", "cache": "A's KV cache",
                           "tokens": "A's per-token states"}[n] for n in m.needs) or "nothing of A"
        click.echo(f"{name:10} [{m.family}] {m.summary}\n{'':10} needs {needs}"
                   + (f"; requires {m.requires}" if m.requires else ""))


@cli.command()
@click.argument("name", default="kvmaps")
@quiet_option
@click.pass_context
def kvmaps(ctx: click.Context, name: str, quiet: bool) -> None:
    """Fit mapped KV's per-layer maps NAME (A's per-token states → B's residual stream) from the stores."""
    from stages import kvmaps as stage

    click.echo(stage.run(_params(ctx), name, log=None if quiet else click.echo))


@cli.command()
@quiet_option
@click.pass_context
def grid(ctx: click.Context, quiet: bool) -> None:
    """CKA and mutual k-NN of every stored layer pair, and each fitted aligner's held-out scores."""
    from stages import grid as stage

    params = _params(ctx)
    result = stage.run(params, warn=lambda line: click.echo(line, err=True))
    if quiet:
        return
    click.echo(f"CKA ({result['activation_kind']}, {result['rows']} held-out texts); rows A layers, columns B layers")
    click.echo("      " + "".join(f"{'B' + str(lb):>8}" for lb in result["layers_b"]))
    for la in result["layers_a"]:
        row = result["cka"][f"a{la}"]
        click.echo(f"{'A' + str(la):>6}" + "".join(f"{row[f'b{lb}']:8.3f}" for lb in result["layers_b"]))
    for name, m in result["aligners"].items():
        click.echo(f"{name}: L{m['layer_a']}->L{m['layer_b']} top-1 {m['retrieval_top1']:.3f}, MSE {m['mse']:.4g}")
    click.echo(f"wrote {params.paths.layout.details('grid')}, {stage.metrics_path(params)} and {stage.plot_path(params)}")


class _EvaluateCommand(click.Command):
    """`xmodel evaluate --help` lists what exists, read from the task registry only when asked for."""

    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        from pipeline.tasks.registry import ABOUT, PROBES, TASKS

        with formatter.section("Tasks (pipeline/tasks/registry.py)"):
            formatter.write_dl([(name, task.about) for name, task in TASKS.items()])
        with formatter.section("Probes"):
            formatter.write_dl([(name, ABOUT[name]) for name in (*PROBES, "sweep")])


@cli.command(cls=_EvaluateCommand)
@click.argument("task")
@quiet_option
@click.pass_context
def evaluate(ctx: click.Context, task: str, quiet: bool) -> None:
    """Reload A and B and evaluate activation communication on TASK: a registered task
    (pipeline/tasks/registry.py), the similarity probe, or the (k, j) sweep."""
    from stages import evaluate as stage

    if quiet:
        _silence_libraries()
    params = _params(ctx)
    out = stage.run(params, task, log=None if quiet else (lambda line: click.echo(line, err=True)))
    from pipeline.distributed import is_main

    quiet = quiet or not is_main()  # under torchrun rank 0 wrote the files and reports them
    if not quiet and "table" in out:
        click.echo(out["table"].read_text())
    if not quiet:
        click.echo("wrote " + ", ".join(str(p) for p in out.values()))


@cli.command()
@quiet_option
@click.option("--answer", "answer_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Instead of the report: print the 'Does AC carry the information here?' table of these data dirs "
                   "(one row per evaluated task of each; repeatable).")
@click.option("--methods", "method_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Instead of the report: one row per method of every evaluated task of these data dirs (score, "
                   "paired tests against B alone, NL and the mismatched control, gold log-likelihood, bytes sent).")
@click.option("--bandwidth", type=click.Path(dir_okay=False, path_type=Path),
              help="With --methods: also draw score against bytes sent per item into this PNG.")
@click.pass_context
def report(ctx: click.Context, quiet: bool, answer_dirs: tuple[Path, ...], method_dirs: tuple[Path, ...],
           bandwidth: Path | None) -> None:
    """One Markdown report (data/report/report.md, and .html) from the metrics and plots the stages wrote."""
    from stages import report as stage

    if method_dirs:
        from pipeline.report import method_table, plot_bandwidth, task_details

        runs = [(f"{label} [{d.name}]", m) for d in method_dirs for label, m in task_details(d)]
        if not runs:
            raise UserError(f"no evaluated task in {', '.join(map(str, method_dirs))}: run `xmodel evaluate TASK` first")
        click.echo(method_table(runs))
        if bandwidth:
            click.echo(f"wrote {plot_bandwidth(runs, bandwidth)}")
        return
    if answer_dirs:
        from pipeline.report import answer_table, task_details

        tag = (lambda d: f" [{d.name}]") if len(answer_dirs) > 1 else (lambda d: "")  # which run a row is from
        runs = [(label + tag(d), m) for d in answer_dirs for label, m in task_details(d)]
        if not runs:
            raise UserError(f"no evaluated task in {', '.join(map(str, answer_dirs))}: run `xmodel evaluate TASK` first")
        click.echo(answer_table(runs))
        return
    out = stage.run(_params(ctx))
    if not quiet:
        click.echo("wrote " + ", ".join(str(p) for p in out.values()))


def _silence_libraries() -> None:
    """--quiet: no progress bars from transformers / the hub either, so stderr holds only errors."""
    import os

    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    from transformers.utils import logging

    logging.disable_progress_bar()


@cli.group()
def store() -> None:
    """Inspect and check activation stores."""


@store.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def info(path: Path, as_json: bool) -> None:
    """Shapes, dtypes, attributes and size on disk of a store."""
    import json

    from store.verify import store_info

    data = store_info(path)
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return
    attrs = data["attrs"]
    ident = attrs.get("identity", {})
    click.echo(f"{path}  ({'complete' if data['complete'] else 'INCOMPLETE'}, {data['bytes_on_disk'] / 2**20:.1f} MiB)")
    click.echo(f"model {ident.get('model_id')}  sha {str(ident.get('model_sha'))[:12]}  layers {attrs.get('layers')} "
               f"of {attrs.get('num_layers')}  stored as {attrs.get('store_dtype')}")
    click.echo(f"{attrs.get('n_seq')} sequences, {attrs.get('n_tok')} token rows, {attrs.get('n_units')} units of {attrs.get('unit_size')}")
    for name, a in data["arrays"].items():
        click.echo(f"  {name:<16} {str(tuple(a['shape'])):<16} {a['dtype']:<8} shard {tuple(a['shards'])}  {a['bytes_on_disk'] / 2**20:8.2f} MiB")


@store.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(path: Path) -> None:
    """Completeness, chunk checksums and a NaN/inf scan; exit 1 on any problem."""
    from store.verify import verify_store

    problems = verify_store(path)
    for line in problems:
        click.echo(f"{path}: {line}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{path}: ok")


def main() -> None:
    from pipeline.threads import apply

    apply()  # before any command imports torch: OpenMP reads its wait policy once, when it loads
    try:
        cli(obj={})
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
