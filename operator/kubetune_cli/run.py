"""`kubetune run`: its arguments and help. The work is the command registered as
`run` (kubetune_trainer.local.main, through an entry point: see commands.py)."""

from __future__ import annotations

import argparse

from .commands import run_registered

DESCRIPTION = """\
Run a FineTuneJob on this machine with a local Ray, no cluster needed.

A FILE with several FineTuneJobs runs them all, one after another, each after
the jobs of the file it continues (spec.model.fromJob), as the operator does
after `kubectl apply -f FILE`; the order is printed first. --name runs one job,
after the in-file jobs it continues. A job already finished under the output
folder is reused, not trained again; when a job fails, the jobs that continue
it are not started.

Before Ray starts, kubetune checks what a worker would otherwise find out
minutes later: the model folder (config and weights, or the GGUF file named),
the data files (line numbers of invalid JSON), that rows fit spec.dataset.format,
that the tokenizer loads and the chat template renders, and how many examples
spec.dataset.maxSeqLength truncates.

Relative paths in the job (spec.model.uri, spec.dataset.train.uri,
spec.dataset.validation.uri, spec.output.uri) and --output are read from the
working directory, the directory you run kubetune in, not the job file's folder.

Results go to OUTPUT/NAMESPACE/NAME/local/, where OUTPUT is spec.output.uri,
else --output, else ./runs: progress.json, metrics.jsonl, checkpoints/,
adapter/ (or model/), merged/, outputs.json and loss.png.
Running the same command again resumes from the last committed checkpoint;
Ctrl-C stops the run and prints the command that resumes it.
"""

EPILOG = """\
example:
  kubetune run crds/examples/quickstart.yaml            # from the repository root
  kubetune run job.yaml --output /data/runs --no-progress > train.log
  kubetune run sft-then-dpo.yaml --name dpo             # dpo, after the sft job it continues

exit status: 0 done, 1 training failed, 2 invalid job or a failed check
(nothing ran), 3 no usable data, 130 stopped by Ctrl-C (SIGINT), 143 by SIGTERM;
for several jobs, the first failure's.
"""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run a FineTuneJob on this machine with a local Ray",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("file", metavar="FILE", help="FineTuneJob YAML (- for stdin)")
    p.add_argument(
        "--output",
        metavar="PATH|URI",
        help="where results go when spec.output.uri is unset (default: ./runs)",
    )
    p.add_argument(
        "--name",
        help="run only this FineTuneJob of FILE (after the jobs of FILE it continues)",
    )
    p.add_argument(
        "--no-progress",
        action="store_true",
        help="no progress bar: one plain line per log step (the default when output "
        "is not a terminal)",
    )
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    return run_registered(
        "run", args, "trainer extra: pip install 'kubetune[trainer]' or run scripts/setup.sh"
    )
