"""The `jaxlmc` command: a thin layer over jaxlmc.api."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import traceback

import jax

from jaxlmc import api, ckpt, config, faults, rundir, shard, size_axes, spec_check, ui
from jaxlmc.config import ConfigError


def _add_common(sub, overrides_help: str, quiet_help: str) -> None:
    sub.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help=overrides_help)
    sub.add_argument("--quiet", action="store_true", help=quiet_help)
    sub.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                     help="import a plugin module first (it registers model kinds, datasets, label maps, optimisers "
                          "or stages); repeatable; kept in the run's config as plugins.modules")
    sub.add_argument("--distributed", action="store_true",
                     help="join a multi-host run: jax.distributed.initialize() from the cluster's environment "
                          "(SLURM, Open MPI, TPU pod slice), or from JAX_COORDINATOR_ADDRESS, JAXLMC_NUM_PROCESSES "
                          "and JAXLMC_PROCESS_ID; start the same command on every host")


def _join_cluster() -> None:
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":  # (asking JAX for its backend would start it too early)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if "JAXLMC_NUM_PROCESSES" in os.environ:  # a launch by hand (ssh, or processes on one machine)
        jax.distributed.initialize(coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAXLMC_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAXLMC_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxlmc", description="Vectorised fine-tuning ensembles and "
                                     "linear mode connectivity in JAX.")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, show the whole traceback instead of one line")
    commands = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)  # --debug also after the command (not resetting one before it)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    stages = " → ".join(api.STAGES)
    for name, text in [("study", f"the whole study, in resumable stages: {stages} (resumes at the first unfinished "
                                 "stage)"),
                       ("pretrain", "pretrain one model, saving Orbax checkpoints at pretrain.save_steps"),
                       ("finetune", "fine-tune the member grid in one compiled program (pretrains first if "
                                    "needed) and write members.csv")]:
        sub = commands.add_parser(name, help=text, description=text, parents=[debug])
        sub.add_argument("config", help="TOML config file (see configs/)")
        sub.add_argument("--out", help="run directory (default: runs/<config name>)")
        _add_common(sub, "override a config value; repeatable", "no progress bar or tables")
    text = "loss and error barriers between fine-tuned members and to their starting points; writes RUN_DIR/barriers/"
    sub = commands.add_parser("barriers", help=text, description=text, parents=[debug])
    sub.add_argument("run_dir", help="a fine-tuning run directory")
    sub.add_argument("--pairs", help='"within" (pairs inside each grid cell; the default), "ring:K" (each member '
                                     'with its next K seeds in its cell), "all", or a CSV file with columns i, j')
    sub.add_argument("--alphas", type=int, help="points on the interpolation grid, ends included (default 25)")
    _add_common(sub, "override a [barriers] or [run] value; repeatable", "no tables")
    text = "re-render RUN_DIR/report.html, figures/ and summary.csv from a finished study"
    sub = commands.add_parser("report", help=text, description=text, parents=[debug])
    sub.add_argument("run_dir", help="a study's run directory")
    text = ("which verdicts two finished studies share (a replicate: the same config with another "
            "finetune.seed_offset and pretrain.seed)")
    sub = commands.add_parser("compare", help=text, description=text, parents=[debug])
    sub.add_argument("run_a", help="a study's run directory")
    sub.add_argument("run_b", help="another study's run directory")
    text = ("from a finished (pilot) study, the seeds × pair design × test examples that reach a minimum detectable "
            "excess, and what each costs")
    sub = commands.add_parser("plan", help=text, description=text, parents=[debug])
    sub.add_argument("run_dir", help="a study's run directory (its barriers measured)")
    sub.add_argument("--mde", type=float, required=True,
                     help="the target minimum detectable excess (80 %% power), e.g. 0.005")
    sub.add_argument("--quantile", type=float, default=0.5,
                     help="over the pilot's cells, which one the design must serve (0.5: the median; 0.9: most)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. Every error a user can cause is one line on stderr (the traceback with --debug):
    exit 2 for a bad config or arguments, 1 for a fault (corrupt checkpoint, a write that failed), 75 when another
    process writes the run directory, 130/143 after SIGINT/SIGTERM (resumable), 1 for anything unexpected."""
    args = _parser().parse_args(argv)
    # After a failed write, Orbax's asyncio tasks that also failed are logged one by one when collected ("Task
    # exception was never retrieved"), long after the one line that reports the failure; the command runs no asyncio
    # code of its own. (The library leaves the process's logging alone.)
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    try:
        with faults.handle_signals(), ckpt.quiet_event_loop_noise():
            return _run(args)
    except faults.Interrupted as err:
        return _fail(args, err, str(err), err.exit_code)
    except (ConfigError, spec_check.SpecError) as err:
        return _fail(args, err, f"error: {err}", 2)
    except faults.RunFault as err:
        return _fail(args, err, f"error: {err}", err.exit_code)
    except OSError as err:
        path = faults.path_of(err)
        where = f"{path}: " if path else ""
        return _fail(args, err, f"error: {where}{err.strerror or err}", 1)
    except Exception as err:  # a bug, not the user's doing: still one line, and how to see more
        found = faults.os_error_of(err)
        if found is not None:
            return _fail(args, err, f"error: {found[0] + ': ' if found[0] else ''}{found[1]}", 1)
        first = (str(err).splitlines() or [""])[0][:300]
        return _fail(args, err, f"unexpected error: {type(err).__name__}: {first} (rerun with --debug for the "
                                "traceback, and please report it)", 1)


def _fail(args, err: BaseException, line: str, code: int) -> int:
    if args.debug:
        traceback.print_exception(err)
    # One write, the newline with it: a thread's traceback printed meanwhile cannot land inside the line.
    sys.stderr.write(f"jaxlmc: {line}\n")
    sys.stderr.flush()
    return code


def _run(args) -> int:
    if getattr(args, "distributed", False):
        _join_cluster()
        args.quiet = args.quiet or jax.process_index() != 0  # one process prints
    if args.command == "barriers":
        return _barriers(args)
    if args.command == "report":
        return _report(args)
    if args.command == "plan":
        pilot, rows = api.plan_run(args.run_dir, args.mde, args.quantile)
        ui.print_plan(pilot, rows, args.mde)
        return 0
    if args.command == "compare":
        rows = api.compare_runs(args.run_a, args.run_b)
        ui.print_comparison(rows, args.run_a, args.run_b, api.config_differences(args.run_a, args.run_b))
        return 0
    try:
        config.import_plugins(args.imports)
        cfg = config.load(args.config, args.overrides)
    except ConfigError as err:
        return _fail(args, err, f"config error: {err}", 2)
    if args.imports:
        cfg = dataclasses.replace(cfg, plugins=dataclasses.replace(
            cfg.plugins, modules=list(dict.fromkeys([*cfg.plugins.modules, *args.imports]))))
    out = args.out or os.path.join("runs", os.path.splitext(os.path.basename(args.config))[0])

    progress = None if args.quiet else ui.TrainingProgress
    if args.command == "study":
        say = (lambda text: None) if args.quiet else (lambda text: ui.console.print(f"[bold]{text}[/bold]"))
        api.study(cfg, out, progress=progress, say=say)
        if not args.quiet:
            run = rundir.RunDir(out)
            scaled = bool(size_axes.given_axes(cfg))
            for name in [size_axes.directory(cfg, size) for size in size_axes.sizes(cfg)] if scaled else []:
                ui.console.print(f"[bold]{name}[/bold]")
                ui.print_study(run.size(name).root)
            if scaled:
                ui.console.print(f"scaling trend: {run.path(rundir.SCALING_PAGE)}")
            else:
                ui.print_study(out)
    elif args.command == "pretrain":
        rows = api.pretrain(cfg, out, progress=progress)
        if not args.quiet:
            run = rundir.RunDir(out)
            ui.print_pretrain(rows, run.read_csv(rundir.BASELINES) if run.exists(rundir.BASELINES) else [])
    else:
        rows = api.finetune(cfg, out, progress=progress)
        if not args.quiet:
            ui.print_members(rows)
    if not args.quiet:
        ui.console.print(f"results in {out}")
    return 0


def _report(args) -> int:
    path = api.render_report(args.run_dir)
    print(f"report in {path}")
    return 0


def _barriers(args) -> int:
    config.import_plugins(args.imports)
    overrides = list(args.overrides)
    if args.pairs is not None:
        overrides.append(f"barriers.pairs={json.dumps(args.pairs)}")
    if args.alphas is not None:
        overrides.append(f"barriers.alphas={args.alphas}")
    cfg = rundir.RunDir(args.run_dir).config(overrides, imports=args.imports)
    result = api.barriers_of_run(cfg, args.run_dir, status=None if args.quiet else ui.console.print,
                                 progress=None if args.quiet else ui.TrainingProgress)
    if not args.quiet:
        ui.print_barriers(result)
        ui.console.print(f"results in {os.path.dirname(rundir.RunDir(args.run_dir).path(rundir.PAIRS))}")
    return 0


def entry() -> int:
    """The `jaxlmc` command: `main` on every core of the CPU (`shard.use_cpu_cores`; `JAX_NUM_CPU_DEVICES=1` keeps
    one CPU device)."""
    shard.use_cpu_cores()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
