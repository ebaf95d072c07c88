"""The ``probekit`` command line (its contract: README.md, "Command line").

Each verb turns its flags into the keyword arguments of a Python function (``extract``, ``audit``,
``audit_model``, ...), checks what only the command line can get wrong, and prints the result. Two
flags mean the same in every verb: ``-o/--out FILE`` names the file a verb writes (a store, a JSON
result, an HTML report) and ``--out-dir DIR`` the folder of a verb that writes several files; ``--json``
is a switch that prints JSON on stdout instead of text. Old spellings (``-o DIR`` for a folder,
``analyze --json FILE``) still work for one release, with a one-line note on stderr.

Errors a user can cause, and every failure of the file system (a full disk, a path one may not write,
a file one may not read), print one line to stderr and exit with code 2 (``--debug`` shows the
traceback instead). A reader that closes stdout early (``probekit info STORE | head -2``) ends the
command quietly, with code 141 as a shell reports for SIGPIPE.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import shlex
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from ._version import __version__
from .audit import audit, parse_threshold
from .errors import (
    NO_SPACE,
    NOT_ALLOWED,
    PATH_LIMIT,
    DataError,
    ProbekitError,
    WriteError,
    os_error_reason,
    short_path,
)
from .store import open_store
from .verdict import LEVEL, MARKS, RULES, exit_status, level_pct, parse_findings
from .vocab import CROSSED_SPLIT, OLD_CROSSED_SPLIT

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_STDOUT_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


class _HelpFormatter(argparse.HelpFormatter):
    """Shows ``(default: X)`` after every option that has a default its help text does not state."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (action.option_strings and text != argparse.SUPPRESS and "default" not in text.lower()
                and default is not None and default is not False and default is not argparse.SUPPRESS
                and default != []):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if (action.help is None and action.option_strings and action.default is not None
                and action.default is not False and action.default != []):
            action.help = "(default: %(default)s)"  # argparse shows no help line for an option without help
        return action

    def error(self, message: str) -> None:  # one line, exit 2, like every other probekit error
        raise SystemExit(f"probekit: error: {message} (see `{self.prog} --help`)") from None


def _renamed(old: str, new: str, why: str) -> None:
    """One line on stderr for an old spelling that still works (FutureWarning-style)."""
    print(f"probekit: FutureWarning: {old} is now {new} ({why}); the old spelling goes in the next release.",
          file=sys.stderr)


class _OldOutDir(argparse.Action):
    """``-o/--out DIR`` of a verb that writes a folder: sets ``--out-dir`` and says so."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS, metavar="DIR")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        _renamed(f"`{option_string} DIR`", "`--out-dir DIR`", "-o names a file in every verb")
        setattr(namespace, self.dest, values)


class _OldCrossedFlag(argparse.Action):
    """``--stress SPLIT``, the old spelling of ``--crossed SPLIT``: sets it and says so."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        kwargs.update(default=argparse.SUPPRESS, help=argparse.SUPPRESS, metavar="SPLIT")
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        _renamed(f"`{option_string} SPLIT`", "`--crossed SPLIT`", "one name for the crossed split")
        setattr(namespace, self.dest, values)


def _add_out_dir(p: argparse.ArgumentParser, *, default: str | None, help: str) -> None:
    """``--out-dir DIR`` (into ``args.out``), and the old ``-o/--out DIR``."""
    p.add_argument("--out-dir", dest="out", default=default, metavar="DIR", help=help)
    p.add_argument("-o", "--out", dest="out", action=_OldOutDir)


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.replace("x", ",").split(",") if t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected sizes like 3,224,224; got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 0.485,0.456,0.406; got {text!r}") from None


def _add_model_args(p: argparse.ArgumentParser, *, input_shape_help: str) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="timm:NAME, torchvision:NAME, or package.module:callable returning an nn.Module "
                   "(a module in the current directory works, e.g. mymodels:net)")
    p.add_argument("--weights", metavar="FILE",
                   help="weights to load: .safetensors, or a torch state dict (loaded with weights_only=True). "
                   "For timm:/torchvision: models a classifier with another number of classes sets num_classes")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="constructor argument (repeatable), e.g. --model-arg num_classes=3 --model-arg "
                   "drop_rate=0.1; VALUE is read as a Python literal, else kept as a string")
    p.add_argument("--pretrained", action="store_true",
                   help="ask timm/torchvision for pretrained weights (from the cache, else the network; "
                   "refused in a few seconds when offline; prefer --weights)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow a pickle-only checkpoint (runs code from the file: only for files you trust)")
    p.add_argument("--image-size", type=_int_tuple, metavar="S|H,W",
                   help="input size of image folders (resize + centre crop), instead of the model's own "
                   "(timm: its data config; torchvision: 224; module:callable: the image's own size)")
    p.add_argument("--mean", type=_floats, metavar="M1,M2,M3",
                   help="normalisation mean per RGB channel for image folders (default: the model's)")
    p.add_argument("--std", type=_floats, metavar="S1,S2,S3",
                   help="normalisation std per RGB channel for image folders (default: the model's)")
    p.add_argument("--input-shape", type=_int_tuple, metavar="C,H,W", help=input_shape_help)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="probekit",
        description="Audit trained neural networks for feature contamination: record hidden activations "
        "into an HDF5 store, measure how much they depend on background factors, and report it.",
        epilog="Run `probekit VERB --help` for the options of each verb. Docs: README.md, docs/.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    parser.add_argument("--version", action="version", version=f"probekit {__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)

    p = sub.add_parser("layers", help="list hookable layers with their output shapes",
                       description="List every module of MODEL with its type, per-sample output shape and "
                       "number of calls, from one dummy forward pass. Use the names with extract --layers.")
    _add_model_args(p, input_shape_help="per-sample input shape of the dummy forward (default: the model's "
                    "preprocessed image size, e.g. timm's data config, or 3,224,224)")
    p.add_argument("--seq-len", type=int, metavar="T",
                   help="token models (a forward that takes input_ids, e.g. transformers' BERT, GPT-2): length "
                   "of the dummy input_ids (default 16, or the model's longest if shorter)")
    p.add_argument("--filter", metavar="GLOB", help="only names matching this glob (e.g. 'layer*'; "
                   "'encoder.layer.*' for direct children, 'encoder.**' for every descendant)")
    p.add_argument("--json", action="store_true", help="print JSON on stdout instead of a table")
    p.set_defaults(func=cmd_layers)

    p = sub.add_parser("extract", help="stream hidden activations of MODEL on DATA into a store",
                       description="Run MODEL on DATA and write the activations of the chosen layers into "
                       "an HDF5 store (docs/FORMAT.md), in committed batches: an interrupted run continues "
                       "with --resume. Run it again with another --name/--role (and --resume) to add a "
                       "second model (e.g. the student) on the same samples.")
    _add_model_args(p, input_shape_help="not used by extract (the inputs are the data's own); refused. Set "
                    "the size of image-folder inputs with --image-size")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="a built-in dataset name (see `probekit datasets`), an image folder, an .npz "
                   "(x, optional y, factors, factor_names, group), or package.module:callable")
    p.add_argument("-o", "--out", required=True, metavar="STORE.h5", help="the store to write")
    p.add_argument("--split", action="append", metavar="S",
                   help="split name to write (repeatable). For a built-in dataset: which of its splits "
                   "(default: all of them); otherwise the name given to the data (default: data)")
    p.add_argument("--layers", required=True, metavar="L1,L2|GLOB",
                   help="module names from `probekit layers`, comma-separated, globs allowed ('layer*'; "
                   "'encoder.layer.*' for direct children only, 'encoder.**' for every descendant); a module a "
                   "glob matched that never runs is left out with a warning")
    p.add_argument("--pool", default="avg", metavar="MODE|LAYER=MODE,...",
                   help="how to reduce each layer's output per sample: avg, max, cls, tokens_mean, last, flatten "
                   "or none for every layer, or LAYER=MODE pairs (globs allowed) with an optional bare MODE for "
                   "the rest, e.g. 'tokens_mean,blocks.11=cls,@output=avg' (default: avg). With an attention mask "
                   "(token data) avg/max/tokens_mean use the real tokens only, cls the first, last the last real "
                   "token; none also stores the mask (layer @attention_mask)")
    p.add_argument("--pad-id", type=int, metavar="ID",
                   help="token data: the id input_ids are padded with (default: the model's config.pad_token_id, "
                   "else 0)")
    p.add_argument("--padding-side", choices=["right", "left"], default=None,
                   help="token data: where items shorter than their batch are padded (default: right)")
    p.add_argument("--max-length", type=int, metavar="T",
                   help="token data: pad every batch to T tokens (needed by --pool none when the items have "
                   "several lengths); longer items are refused")
    p.add_argument("--name", default=None, help="model name in the store (default: the role, or 'model')")
    p.add_argument("--role", default="model", choices=["teacher", "student", "model"])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="float32", choices=["float16", "float32"],
                   help="storage dtype of activations")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true",
                      help="continue an interrupted extraction, or add a model/split to an existing store")
    mode.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--full-forward", action="store_true",
                   help="run every batch through the whole model (default: stop each forward pass after "
                   "the last requested layer); for models whose later modules "
                   "have side effects that must happen")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("audit", help="MODEL + a folder of your images -> verdict, store, JSON and report "
                       "(one command; for a store you extracted yourself, use analyze)",
                       description="Audit MODEL on a folder of your images (DIR/<class>/<image>) whose foreground "
                       "you give as masks, boxes or automatically. Builds the image variants (original, "
                       "only_fg, no_fg, only_bg, mixed_same/rand/next) and a crossed split (every object "
                       "on the same backgrounds, taken from other images) with the model's own preprocessing, "
                       "extracts the model's output and a few layers (and seeded initialisations as the "
                       "reference), audits them and writes OUT/acts.h5, OUT/audit.json and OUT/report.html. "
                       "A rerun continues an interrupted one.")
    _add_model_args(p, input_shape_help="not used by audit (the inputs are the images); refused. Use --image-size")
    p.add_argument("--data", required=True, metavar="DIR", help="image folder: DIR/<class>/<image>")
    fg = p.add_mutually_exclusive_group()
    fg.add_argument("--masks", metavar="DIR", help="mask folder mirroring DIR (any image format; non-zero = "
                    "foreground)")
    fg.add_argument("--foreground", choices=["auto"], help="automatic foreground: OpenCV GrabCut seeded by "
                    "--boxes, else by a centred box (approximate: the report shows how the verdict moves "
                    "when the masks are eroded and dilated)")
    p.add_argument("--boxes", metavar="CSV", help="boxes CSV (path,x0,y0,x1,y1 in pixels); alone, or as "
                   "GrabCut seeds with --foreground auto")
    p.add_argument("--factors", metavar="CSV", help="per-image background factors: path plus one numeric "
                   "column per factor (decodability, correlation)")
    p.add_argument("--teacher", metavar="MODEL", help="a teacher: MODEL is then audited as its student")
    p.add_argument("--teacher-weights", metavar="FILE")
    p.add_argument("--teacher-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--teacher-layers", metavar="L1,L2",
                   help="the teacher's layers (default: the model's when the teacher has them all, else its own "
                   "spread over its depth); the teacher also gets seeded initialisations as its reference")
    p.add_argument("--pool", default=None, metavar="MODE|LAYER=MODE,...",
                   help="pooling per layer: one mode for every layer (avg, max, cls, tokens_mean, last) or "
                   "LAYER=MODE pairs (globs allowed); default: avg for maps, CLS for token layers of models whose "
                   "head reads a class token, else the token mean; the output is never token-pooled")
    p.add_argument("--class-map", metavar="CSV",
                   help="how the model's outputs map to the folder's classes: rows folder_class,output_index (many "
                   "outputs may name one class, as for ImageNet-9). Default: outputs are the folder's classes when "
                   "the head has one unit per class (one logit for two), else read label-free")
    p.add_argument("--deploy-backgrounds", nargs="+", metavar="DIR",
                   help="folders of photos of empty scenes where the model will be deployed, one per site: every "
                   "test object is composited on them and the audit predicts accuracy at each site")
    p.add_argument("--expected-accuracy", type=float, default=None, metavar="FRACTION",
                   help="the model's own accuracy on its test data (e.g. 0.94): a warning when its accuracy on your "
                   "original images is far below it (often a preprocessing mismatch)")
    p.add_argument("--deploy-scenes", type=int, default=16, metavar="N",
                   help="scenes cut from each site's photos (cropped or tiled, never stretched)")
    p.add_argument("--layers", metavar="L1,L2", help="layers to extract besides the output (default: up to 4 "
                   "spread over the depth; timm: its feature_info stages)")
    _add_out_dir(p, default="probekit-audit", help="output folder: acts.h5, audit.json, report.html")
    p.add_argument("--name", default="model", help="the model's name in the store and report (default: model)")
    p.add_argument("--backgrounds", type=int, default=8, metavar="B",
                   help="backgrounds of the crossed split (default: 8)")
    p.add_argument("--inits", type=int, default=3, metavar="K",
                   help="seeded initialisations extracted as the representation's reference (default: 3)")
    p.add_argument("--init-objects", type=_init_objects_arg, default=None, metavar="N|all",
                   help="objects of the crossed split the inits see (a seeded subsample, all backgrounds; their "
                   "sampling variance is in the interval; default: 30, docs/METRICS.md), or all")
    p.add_argument("--test-fraction", type=float, default=0.5,
                   help="share of each class's images used as test objects (the rest fit the probes)")
    p.add_argument("--mask-check", type=int, default=3, metavar="PX",
                   help="erode / dilate approximate masks by PX pixels to show how the verdict moves (0: off)")
    p.add_argument("--mask-check-objects", choices=("near", "all"), default="near",
                   help="near (default): the mask check reruns only the objects whose stored predictions differ "
                   "across backgrounds or have a small top-2 margin, and keeps the others' predictions; all: every object")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA, then MPS, else CPU; said on stderr), cpu, cuda, cuda:1, ...")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="the forward passes' precision: auto (default: fp32 on the CPU; on CUDA bf16, or fp16 without "
                   "bf16, kept only if the first batch's top-1 predictions and activations match fp32, else fp32, "
                   "said on stderr), fp32, or bf16 / fp16 behind the same check; recorded in audit.json cost")
    p.add_argument("--memory-format", default="auto", choices=["auto", "contiguous"],
                   help="auto (default): a convolutional net's weights channels-last on the CPU and CUDA (faster "
                   "convolutions, the same values up to float rounding), kept only if the first images give the "
                   "same top-1 predictions and activations, said on stderr; contiguous: the nets as they are; "
                   "recorded in audit.json cost")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes decoding, running GrabCut and compositing beside the forward passes "
                   "(default: min(4, cores - 1), 0 on one core; GrabCut, which runs before any forward pass, "
                   "takes N + 1); the figures do not depend on it")
    p.add_argument("--objects", type=_objects_arg, default=None, metavar="N|auto",
                   help="objects of the crossed split: N (a seeded subset), or auto (grown in up to 3 looks "
                   "until background reliance's interval decides; default: all)")
    p.add_argument("--overwrite", action="store_true",
                   help="recompute a store computed from other inputs (default: refuse it, naming what differs; "
                   "a rerun with the same inputs continues)")
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, backgrounds and every resampling")
    p.add_argument("--n-boot", type=int, default=500, help=f"bootstrap resamples for {level_pct()}%% intervals")
    p.add_argument("--n-perm", type=int, default=200, help="permutations of the nulls")
    _add_gate_args(p)
    p.add_argument("--json", action="store_true", help="print the audit (audit.json) on stdout instead of text")
    _add_ci_args(p)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("compare", help="audit several checkpoints of one model on the same composites; rank them "
                       "by reliance", description="Build the counterfactuals of an image folder once (the crossed "
                       "split: every test object on the same backgrounds), run every checkpoint on them in one pass, "
                       f"and rank the checkpoints by reliance on the background with {level_pct()}%% intervals (objects and "
                       "backgrounds resampled), each against a reference checkpoint with a paired interval, over "
                       "training steps when the file names carry them (epoch=3, step_1000). Writes "
                       "OUT/compare.json and OUT/compare.html.")
    p.add_argument("model", metavar="MODEL", help="the architecture: timm:NAME, torchvision:NAME or "
                   "package.module:callable")
    p.add_argument("--checkpoints", nargs="+", required=True, metavar="CKPT",
                   help="two or more checkpoint files or quoted glob patterns ('runs/*.safetensors')")
    p.add_argument("--data", required=True, metavar="DIR", help="image folder: DIR/<class>/<image>")
    fg = p.add_mutually_exclusive_group()
    fg.add_argument("--masks", metavar="DIR", help="mask folder mirroring DIR")
    fg.add_argument("--foreground", choices=["auto"], help="automatic foreground (GrabCut)")
    p.add_argument("--boxes", metavar="CSV", help="boxes CSV (path,x0,y0,x1,y1)")
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow pickle-only checkpoints (runs code from the files: only for files you trust)")
    p.add_argument("--image-size", type=_int_tuple, metavar="S|H,W")
    p.add_argument("--mean", type=_floats, metavar="M1,M2,M3")
    p.add_argument("--std", type=_floats, metavar="S1,S2,S3")
    p.add_argument("--reference", metavar="NAME", help="the checkpoint (file stem) every other is compared with "
                   "(default: the last in training order)")
    p.add_argument("--out-dir", dest="out", default="probekit-compare", metavar="DIR",
                   help="output folder: compare.json and compare.html")
    p.add_argument("--backgrounds", type=int, default=8, metavar="B")
    p.add_argument("--test-fraction", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0, help="seed of the composites and every resampling")
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (the same for every checkpoint)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("info", help="what a store holds, rows committed per split",
                       description="Summarise a store: splits with committed rows, models with their "
                       "layers and shapes. Safe on a store whose writer was interrupted.")
    p.add_argument("store", metavar="STORE.h5")
    p.add_argument("--json", action="store_true", help="print JSON on stdout instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("analyze", help="a store you extracted -> every analysis it allows, the verdict, JSON "
                       "(for a model and a folder of images, use audit)",
                       description="Audit a store written by `probekit extract`: run every analysis its contents allow (probes need labels, "
                       "background analyses need factors, sensitivity needs a grouped split, teacher-student "
                       "needs both roles) and print the verdict. Skipped analyses are listed with the reason. "
                       "With --fail-above, exit 1 when a figure crosses its threshold (for CI gates).")
    _add_audit_args(p)
    p.add_argument("-o", "--out", metavar="OUT.json",
                   help="write the full result (docs/REPORT_SCHEMA.md) to this file")
    p.add_argument("--json", action="store_true",
                   help="print the full result on stdout instead of the verdict text")
    p.add_argument("--fail-above", action="append", default=[], metavar="METRIC[:MODEL[:LAYER]]=VALUE",
                   help="exit 1 if the figure exceeds VALUE (repeatable). Per model: flagged (0/1), flip_rate, "
                   "pull, follows_background; per layer: sensitivity, nms, gap, decodability, correlated_units; "
                   "e.g. pull:student=0.05 or sensitivity:student:rep=0.12")
    _add_gate_args(p)
    _add_ci_args(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("report", help="write a self-contained HTML report of a store",
                       description="Audit the store (or reuse an audit JSON) and write one self-contained HTML "
                       "file: summary, per-layer tables and plots. No network needed to view it.")
    _add_audit_args(p)
    p.add_argument("-o", "--out", required=True, metavar="REPORT.html")
    p.add_argument("--audit", metavar="AUDIT.json", help="use this audit result instead of recomputing it")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("demo", help="the whole pipeline on built-in data, on CPU, in a few minutes",
                       description="Part 1: write a folder of shape images with masks, train a CNN that "
                       "learns the background colour and one that learns the shape, and audit each from its "
                       "checkpoint as `probekit audit` would (DIR/own-images/). Part 2: train a "
                       "background-invariant teacher and a student distilled on in-distribution backgrounds "
                       "(background digits), extract both (and their initialisations) into DIR/acts.h5, "
                       "audit them into DIR/audit.json and write DIR/report.html.")
    _add_out_dir(p, default="probekit-demo", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-epochs", type=int, default=60)
    p.add_argument("--student-epochs", type=int, default=150)
    p.add_argument("--no-images", action="store_true",
                   help="skip part 1 (the shortcut and robust CNNs audited on a folder of images)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("experiment", help="run one of the papers' experiments (contamination, simplicity, "
                       "distillation) or the verdict's own (shortcut)",
                       description="Run a reproducible experiment of the two papers (docs/EXPERIMENTS.md): "
                       "it writes a store, a JSON of its figures with the seeds, and PNG plots into DIR.")
    p.add_argument("name", choices=["contamination", "simplicity", "distillation", "shortcut"])
    _add_out_dir(p, default=None, help="output folder (default: experiments/NAME)")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (what the tests use)")
    p.set_defaults(func=cmd_experiment)

    p = sub.add_parser("datasets", help="list the built-in datasets",
                       description="List the built-in datasets usable as --data NAME, with their splits.")
    p.set_defaults(func=cmd_datasets)
    return parser


def _add_audit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", metavar="STORE.h5")
    p.add_argument("--label", default="label", help="the label field for probes, or 'none' to skip probes")
    p.add_argument("--factors", metavar="F1,F2", help="background factors to use (default: all in the store)")
    p.add_argument("--models", metavar="M1,M2", help="only these models (default: all)")
    p.add_argument("--layers", metavar="L1,L2", help="only these layers (default: all)")
    p.add_argument("--train", default="train", metavar="SPLIT", help="split the probes are fit on")
    p.add_argument("--test-id", default="test_id", metavar="SPLIT", help="in-distribution test split")
    p.add_argument("--test-ood", default="test_ood", metavar="SPLIT",
                   help="out-of-distribution test split (ID/OOD gaps, NMS)")
    p.add_argument("--crossed", dest="crossed", default=CROSSED_SPLIT, metavar="SPLIT",
                   help="the crossed split (every object 'group' on the same 'background' ids): behaviour, "
                   f"the verdict, the two-way decomposition and background sensitivity (default: {CROSSED_SPLIT}; "
                   "an older store without one is read from its 'stress' split, with a warning)")
    p.add_argument("--stress", dest="crossed", action=_OldCrossedFlag)
    p.add_argument("--head", default="auto", choices=["auto", "output", "probe", "label_free"],
                   help="how predictions are read: auto = the stored output as class scores when it has one "
                   "unit per class (or one logit for two), else label-free in its own output space; a linear "
                   "probe only for a student whose output is a representation or a model with no output")
    p.add_argument("--variants", default="variants", metavar="SPLIT",
                   help="split of image variants (original, only_fg, no_fg, only_bg, mixed_*): accuracy per "
                   "variant, BG-gap, only-background accuracy")
    p.add_argument("--n-boot", type=int, default=500, help=f"bootstrap resamples for {level_pct()}%% intervals")
    p.add_argument("--n-perm", type=int, default=200,
                   help="permutations for the correlation null (0: Student-t null, no permutation "
                        "products; much faster on large stores, see docs/METRICS.md)")
    p.add_argument("--seed", type=int, default=0, help="seed of every resampling")
    p.add_argument("--no-progress", action="store_true")


def _add_gate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fail-on-flag", action="store_true",
                   help="for CI: exit 1 when a model is flagged (shortcut: "
                   + RULES["shortcut"].rule.split(". ")[0].replace("%", "%%") + "), 3 "
                   "when the shortcut could not be judged (no verdict never passes a gate)")
    p.add_argument("--fail-on", metavar="FINDING,...", default=None,
                   help="for CI: exit 1 when any of these findings holds for a model (shortcut, "
                   "background_sensitive, representation, or any), 3 when one could not be judged")


def _check_gate(args: argparse.Namespace) -> None:
    if args.fail_on:
        parse_findings(args.fail_on)  # a misspelt finding fails before the work


def _gate(args: argparse.Namespace, doc: dict[str, Any], failures: list[str]) -> int:
    """Print the gate's failures; the exit status (1: a gated finding or figure; 3: not judged)."""
    fail_on = parse_findings(args.fail_on) if args.fail_on else []
    code, lines = exit_status(doc["models"], fail_on_flag=args.fail_on_flag, fail_on=fail_on)
    for line in failures:
        print(f"probekit: FAIL {line}", file=sys.stderr)
    for line in lines:
        print(f"probekit: {'FAIL' if code == 1 else 'NOT JUDGED'} {line}", file=sys.stderr)
    return 1 if failures else code


def _add_ci_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--junit", metavar="FILE", help="write JUnit XML: one test case per model and finding (a finding "
                   "that holds fails with the verdict; a shortcut not judged is an error)")
    p.add_argument("--summary", metavar="FILE", help="write a Markdown summary (verdict table with intervals) for a "
                   "CI step summary or a model card; appends to $GITHUB_STEP_SUMMARY")


def _check_ci_paths(args: argparse.Namespace) -> None:
    """Refuse a --junit / --summary path whose folder does not exist before the audit's work, not after."""
    made = os.path.abspath(args.out) if args.verb == "audit" else None  # audit creates its -o folder
    for flag in ("junit", "summary"):
        path = getattr(args, flag, None)
        folder = os.path.dirname(os.path.abspath(path)) if path else ""
        if path and folder != made and not os.path.isdir(folder):
            raise DataError(f"Cannot write --{flag} {path!r}: its folder does not exist; create it or give another "
                            "path.")


def _write_ci(args: argparse.Namespace, doc: dict[str, Any]) -> None:
    from .report import write_junit, write_summary

    if getattr(args, "junit", None):
        print(f"junit:  {write_junit(doc, args.junit)}", file=sys.stderr)
    if getattr(args, "summary", None):
        print(f"summary: {write_summary(doc, args.summary)}", file=sys.stderr)


def _csv(text: str | None) -> list[str] | None:
    return [t.strip() for t in text.split(",") if t.strip()] if text else None


def _audit(args: argparse.Namespace) -> Any:
    if args.label not in ("label", "none"):
        raise DataError(f"--label must be 'label' (the store's label field) or 'none'; got {args.label!r}.")
    return audit(args.store, train=args.train if args.label != "none" else "",
                 test_id=args.test_id, test_ood=args.test_ood, crossed=args.crossed, variants=args.variants,
                 models=_csv(args.models), layers=_csv(args.layers), factors=_csv(args.factors),
                 n_boot=args.n_boot, n_perm=args.n_perm, random_state=args.seed, head=args.head,
                 progress=not args.no_progress)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        code = _main(argv)
        sys.stdout.flush()  # a reader that went away shows here, not as a traceback at exit
        return code
    except BrokenPipeError:
        return _stdout_closed()


def _stdout_closed() -> int:
    """stdout's reader went away (``| head``): send what is left to devnull and end quietly.

    As the Python docs recommend ("Note on SIGPIPE", module signal): Python flushes stdout once more
    at exit, which would raise again.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # stdout is no file (replaced in-process)
        pass
    return EXIT_STDOUT_CLOSED


def _main(argv: list[str]) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        _old_analyze_json(args, extra, argv)
    except SystemExit as e:
        if isinstance(e.code, str):
            _error_line(e.code)
            return EXIT_USAGE
        return int(e.code or 0)
    if args.verb is None:
        parser.print_help()
        return EXIT_USAGE
    formatwarning = warnings.formatwarning
    if not args.debug:  # a warning is one line on stderr, as an error is (--debug: Python's own, with its source line)
        warnings.formatwarning = _warning_line
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:
        raise  # stdout's reader went away: main() ends quietly
    except ProbekitError as e:
        if args.debug:
            raise
        text = cli_message(str(e), args.verb)
        if (isinstance(e, WriteError) and e.errno not in NOT_ALLOWED and args.verb == "extract"
                and "--resume" not in argv):
            text += f" The rerun that continues: {_command(argv, '--resume')}"
        _error_line(f"probekit: error: {text}")
        return EXIT_USAGE
    except OSError as e:  # the file system: a full disk, a path one may not write or read
        if args.debug:
            raise
        _error_line(f"probekit: error: {_os_error_line(e, args)}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.debug:
            raise
        _error_line(f"probekit: {_interrupted_message(args, argv)}")
        return EXIT_INTERRUPTED
    except Exception as e:  # anything else (often raised by the user's own model or data code): one line
        if args.debug:
            raise
        text = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        _error_line(f"probekit: error: unexpected {type(e).__name__}{': ' + cli_message(text, args.verb) if text else ''} "
                    "(run with --debug for the traceback)")
        return EXIT_USAGE
    finally:
        warnings.formatwarning = formatwarning


def _warning_line(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  line: str | None = None) -> str:
    """``warnings.formatwarning`` of the CLI: ``probekit: FutureWarning: <message>`` on one line (Python's own
    form adds the file, the line number and the source line of the library's ``warnings.warn`` call)."""
    text = " ".join(str(message).split())
    return f"probekit: {category.__name__}: {text}\n"


def _error_line(text: str) -> None:
    try:
        print(text, file=sys.stderr)
    except OSError:  # stderr went away too (`2>&1 | head`): nothing more to say
        pass


def _old_analyze_json(args: argparse.Namespace, extra: list[str], argv: list[str]) -> None:
    """``analyze STORE --json FILE`` (and ``--json -``), the old spelling: FILE is written, as by ``-o``.

    ``--json`` is a switch now; the word after it is then an argument the parser did not place.
    """
    if extra and getattr(args, "verb", None) == "analyze" and args.json and "--json" in argv:
        after = argv[argv.index("--json") + 1] if argv.index("--json") + 1 < len(argv) else None
        if after is not None and after == args.store and len(extra) == 1:  # `--json FILE STORE`
            args.store, extra = extra[0], [after]
        if after is not None and extra == [after]:
            if after == "-":
                _renamed("`analyze --json -`", "`analyze --json`", "--json is a switch in every verb")
            else:
                _renamed("`analyze --json FILE`", "`analyze -o FILE`", "--json is a switch in every verb")
                if args.out is not None:
                    raise SystemExit("probekit: error: give the result's file once: -o FILE (the old --json "
                                     "FILE was given too)")
                args.out, args.json = after, False
            extra = []
    if extra:
        verb = f" {args.verb}" if getattr(args, "verb", None) else ""
        raise SystemExit(f"probekit: error: unrecognized arguments: {' '.join(extra)} "
                         f"(see `probekit{verb} --help`)")


# -- one line per failure --------------------------------------------------------------------------

#: Python parameter names that error messages of the library use, and the flag each verb has for them
_FLAGS: dict[str, dict[str, str]] = {
    "audit": {"n_backgrounds": "--backgrounds", "n_inits": "--inits", "test_fraction": "--test-fraction",
              "mask_check": "--mask-check", "init_objects": "--init-objects", "masks": "--masks", "boxes": "--boxes",
              "foreground": "--foreground",
              "factors": "--factors", "n_boot": "--n-boot", "n_perm": "--n-perm", "batch_size": "--batch-size",
              "random_state": "--seed", "image_size": "--image-size", "model_args": "--model-arg"},
    "extract": {"max_length": "--max-length", "pad_id": "--pad-id", "padding_side": "--padding-side",
                "batch_size": "--batch-size", "num_workers": "--num-workers", "image_size": "--image-size",
                "model_args": "--model-arg"},
    "layers": {"image_size": "--image-size", "model_args": "--model-arg", "input_shape": "--input-shape"},
    "analyze": {"n_boot": "--n-boot", "n_perm": "--n-perm", "random_state": "--seed"},
    "report": {"n_boot": "--n-boot", "n_perm": "--n-perm", "random_state": "--seed"},
}
_QUOTED_PATH = re.compile(rf"'([^'\n]{{{PATH_LIMIT + 1},}})'")  # a quoted text longer than short_path allows


def cli_message(text: str, verb: str | None) -> str:
    """An error message of the library as the command line says it: the flags of ``verb`` for the
    Python parameters it names (``n_backgrounds=9`` -> ``--backgrounds 9``), long quoted paths cut to
    their tail (``short_path``).

    A parameter whose flag the message already names is left alone (it says both on purpose).
    """
    for name, flag in _FLAGS.get(verb or "", {}).items():
        if flag in text:
            continue
        # name=VALUE -> --flag VALUE (a quoted word loses its quotes); a bare name= -> --flag
        text = re.sub(rf"\b{name}=('([^']*)'|[^\s,;)]*[^\s,;).])?",
                      lambda m, flag=flag: f"{flag} {m.group(2) if m.group(2) is not None else m.group(1)}"
                      if m.group(1) else flag, text)
        if "_" in name:  # a snake_case name is no English word: the bare name is the parameter too
            text = re.sub(rf"(?<![\w.-]){name}\b(?!=)", flag, text)
    text = re.sub(r"The '(--[\w-]+)' parameter of [\w.]+ must", r"\1 must", text)  # scikit-learn's wording
    return _QUOTED_PATH.sub(lambda m: repr(short_path(m.group(1))) if os.sep in m.group(1) else m.group(0), text)


def _os_error_line(e: OSError, args: argparse.Namespace) -> str:
    """One line for a failure of the file system: what, where, and how to go on."""
    number, reason = os_error_reason(e)
    path = e.filename
    if path is None:  # h5py puts the file in its text
        found = _HDF5_NAME.search(str(e))
        path = found.group(1) if found else None
    where = f" {short_path(path)!r}" if path is not None else ""
    if number in NO_SPACE:
        target = where or (f" {short_path(args.out)!r}" if getattr(args, "out", None) else "")
        return f"writing{target} failed: {reason}; free disk space (or write elsewhere), then {_rerun_hint(args)}."
    if number in NOT_ALLOWED:
        hint = "choose a path you may write (-o FILE, --out-dir DIR) or read, or fix its permissions"
    elif number == errno.ENOENT:
        hint = "check the path"
    elif number in (errno.ELOOP, errno.ENAMETOOLONG):
        hint = "a symbolic link that points to a folder above it makes a loop: remove or fix the link"
    elif number == errno.ENOTDIR:
        hint = "a part of the path is a file, not a folder"
    elif number == errno.EISDIR:
        hint = "it is a folder: give a file"
    else:
        hint = f"check the path and the disk, then {_rerun_hint(args)}"
    return f"{reason}:{where or ' (no file named)'}; {hint}."


_HDF5_NAME = re.compile(r"\b(?:file)?name = '([^']*)'")


def _rerun_hint(args: argparse.Namespace) -> str:
    verb = getattr(args, "verb", None)
    if verb == "extract":
        return f"run the same command with --resume: it continues from the last committed row " \
               f"({_committed_rows(args)} rows committed)"
    if verb == "audit":
        return "run the same command again: it continues from the last committed row"
    return "run the same command again"


def _command(argv: list[str], add: str | None = None) -> str:
    words = list(argv) + ([add] if add and add not in argv else [])
    return "probekit " + shlex.join(words)


def _interrupted_message(args: argparse.Namespace, argv: list[str]) -> str:
    """What Ctrl-C left behind, and the command that continues (extract, audit) or redoes the work."""
    verb = getattr(args, "verb", None)
    if verb == "extract":
        return (f"interrupted; {_committed_rows(args)} rows committed; run the same command with --resume to "
                f"continue from the last committed row: {_command(argv, '--resume')}")
    if verb == "audit":
        return ("interrupted; a rerun of the same command continues from the last committed row: "
                f"{_command(argv)}")
    if verb in ("analyze", "report", "info", "layers", "datasets"):
        return f"interrupted; nothing was written. Run it again: {_command(argv)}"
    return f"interrupted. Run it again: {_command(argv)}"


def _committed_rows(args: argparse.Namespace) -> int:
    """Rows of the extracted model committed in ``args.out`` over all splits (0 when unreadable)."""
    try:
        with open_store(args.out) as store:
            name = args.name or (args.role if args.role != "model" else "model")
            return sum(store.n_rows(s, name) for s in store.splits) if name in store.models else 0
    except Exception:  # no store yet, or unreadable: nothing was committed
        return 0


# -- verbs --------------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> Any:
    from .models import load_model, parse_model_args

    return load_model(args.model, weights=args.weights, pretrained=args.pretrained,
                      allow_pickle=args.allow_pickle, model_args=parse_model_args(args.model_arg))


def _print_notes(loaded: Any) -> None:
    """What loading inferred (e.g. num_classes from the checkpoint), printed once the verb succeeded."""
    for note in loaded.notes:
        print(f"probekit: {loaded.source}: {note}", file=sys.stderr)


def _preprocessing(args: argparse.Namespace, loaded: Any) -> tuple[Any, dict[str, Any]]:
    from .models import preprocessing_for

    return preprocessing_for(loaded, image_size=args.image_size, mean=args.mean, std=args.std)


def cmd_layers(args: argparse.Namespace) -> int:
    import torch

    from .extractors import glob_match, list_layers, takes_token_ids, token_example

    loaded = _load(args)
    tokens = takes_token_ids(loaded.module) and args.input_shape is None
    if args.seq_len is not None and (not tokens or args.seq_len < 1):
        raise DataError(
            f"--seq-len sets the dummy input_ids of a token model and must be >= 1; {args.model} "
            + ("takes no input_ids: pass --input-shape C,H,W instead." if not tokens else f"got {args.seq_len}.")
        )
    if tokens:  # integer ids (id 0) and an all-ones attention mask, as keyword arguments
        cfg = getattr(loaded.module, "config", None)
        longest = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        shape = (int(args.seq_len or min(16, longest if isinstance(longest, int) and longest > 0 else 16)),)
        example: Any = token_example(shape[0])
        what, hint = f"input_ids of length {shape[0]}", "Pass the sequence length it takes with --seq-len T."
    else:
        shape = args.input_shape
        if shape is None:
            _, info = _preprocessing(args, loaded)
            shape = tuple(info["input_size"] or loaded.input_size or (3, 224, 224))
        example = torch.zeros(1, *shape)
        what, hint = f"a dummy input of shape {tuple(shape)}", "Pass the shape it expects with --input-shape C,H,W."
    try:
        infos = list_layers(loaded.module, example)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:  # the model cannot run on this input
        raise DataError(
            f"{args.model} failed on {what} ({type(e).__name__}: {str(e).splitlines()[0][:200]}). {hint}"
        ) from e
    if args.filter:
        infos = [i for i in infos if glob_match(i.name, args.filter)]
    if args.json:
        print(json.dumps([{"name": i.name, "module_type": i.module_type,
                           "output_shape": list(i.output_shape) if i.output_shape is not None else None,
                           "n_calls": i.n_calls} for i in infos], indent=1))
        return 0
    width = max((len(i.name) for i in infos), default=4)
    print(f"{'name':<{width}}  {'type':<22} {'output (per sample)':<22} calls")
    for i in infos:
        out = "x".join(map(str, i.output_shape)) if i.output_shape is not None else "-"
        print(f"{i.name:<{width}}  {i.module_type:<22} {out:<22} {i.n_calls}")
    _print_notes(loaded)
    given = f"input_ids of length {shape[0]}" if tokens else f"input {tuple(shape)}"
    print(f"\n{len(infos)} layers of {loaded.source} for {given}; pass names or globs to "
          "`probekit extract --layers`.", file=sys.stderr)
    return 0


def _extract_data(args: argparse.Namespace, split: str, transform: Any) -> Any:
    """DATA's split, with the token padding flags applied."""
    from .datasets import as_samples, load_data

    data = load_data(args.data, split, transform=transform)
    padding = {"pad_id": args.pad_id, "padding_side": args.padding_side, "max_length": args.max_length}
    if all(v is None for v in padding.values()):
        return data
    if data.input_keys is None:
        raise DataError(
            "--pad-id/--padding-side/--max-length pad token data (items that are dicts of keyword inputs "
            f"such as input_ids), and the items of {args.data!r} are not; drop these flags."
        )
    return as_samples(data, **padding)


def _per_layer_pools(args: argparse.Namespace, module: Any, layers: Any, data: Any) -> Any:
    """``--pool`` as extract takes it: the mode itself, or per layer (``LAYER=MODE,...``) resolved on the
    model with one of the data's inputs (every layer named, globs expanded)."""
    from .extractors import parse_layer_pools, resolve_pools

    pools = parse_layer_pools(args.pool)
    if list(pools) == ["*"]:
        return pools["*"]
    first = data[0]
    if not isinstance(first, dict) or "x" not in first:
        raise DataError("A per-layer --pool needs tensor inputs (items with 'x'); give one mode for every layer.")
    return resolve_pools(module, layers, args.pool, first["x"].unsqueeze(0))


def cmd_extract(args: argparse.Namespace) -> int:
    from .datasets import builtin_datasets
    from .extraction import extract
    from .extractors import parse_layer_pools
    from .models import describe_preprocessing

    parse_layer_pools(args.pool)  # a misspelt mode fails before the work

    if args.input_shape is not None:
        raise DataError(
            "--input-shape is not used by extract: the inputs are the data's own (an image folder's are "
            "resized to the model's input size). Set that size with --image-size S or H,W instead."
        )
    builtins = builtin_datasets()
    is_images = args.data not in builtins and os.path.isdir(args.data)
    if not is_images and (args.image_size or args.mean or args.std):
        raise DataError(
            f"--image-size/--mean/--std preprocess image folders, and {args.data!r} is not one; give the "
            "data already preprocessed (or an image folder)."
        )
    loaded = _load(args)
    if args.data in builtins:
        splits = list(args.split or builtins[args.data].default_splits)
        if OLD_CROSSED_SPLIT in splits:  # the crossed split's old name, written under the new one
            _renamed(f"`--split {OLD_CROSSED_SPLIT}`", f"`--split {CROSSED_SPLIT}`", "one name for the crossed split")
            splits = [CROSSED_SPLIT if sp == OLD_CROSSED_SPLIT else sp for sp in splits]
    else:
        splits = args.split or ["data"]
        if len(splits) > 1:
            raise DataError("--split can be repeated only with a built-in dataset; give one name for DATA.")
    layers = [s.strip() for s in args.layers.split(",") if s.strip()]
    name = args.name or (args.role if args.role != "model" else "model")
    mode = "resume" if args.resume else "overwrite" if args.overwrite else "create"
    transform = None
    if is_images:
        transform, info = _preprocessing(args, loaded)
        if info["input_size"] is None:  # images at their own size: they must all have one
            from torchvision.datasets import ImageFolder

            from .datasets import check_image_sizes

            try:
                check_image_sizes(ImageFolder(args.data), args.data)
            except (FileNotFoundError, RuntimeError):
                pass  # load_data names what is wrong with the folder
    else:
        info = None  # tensors as DATA gives them: no preprocessing ran, none is recorded
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun: one shard per rank, then merge
        return _extract_distributed(args, loaded, splits, layers, name, mode, transform, info)
    import warnings

    pool = None
    for k, split in enumerate(splits):
        data = _extract_data(args, split, transform)
        pool = pool or _per_layer_pools(args, loaded.module, layers, data)
        with warnings.catch_warnings(record=True) as caught:  # e.g. a glob-matched layer that never runs
            warnings.simplefilter("always", UserWarning)
            extract(loaded.module, data, layers=layers, out=args.out, split=split, pool=pool, name=name,
                    role=args.role, source=loaded.source, batch_size=args.batch_size, device=args.device,
                    dtype=args.dtype, mode=mode if k == 0 else "resume", num_workers=args.num_workers,
                    progress=not args.no_progress, stop_early=not args.full_forward, preprocessing=info)
        for text in dict.fromkeys(str(w.message) for w in caught if issubclass(w.category, UserWarning)):
            print(f"probekit: warning: {text}", file=sys.stderr)
    _print_notes(loaded)
    if is_images:
        print(f"probekit: {describe_preprocessing(info)}", file=sys.stderr)
    print(f"wrote {args.out} (model {name!r}, splits {splits}); see it with `probekit info {args.out}`",
          file=sys.stderr)
    return 0


def _extract_distributed(args: argparse.Namespace, loaded: Any, splits: list[str], layers: list[str],
                         name: str, mode: str, transform: Any, info: dict[str, Any] | None = None) -> int:
    """``torchrun --nproc-per-node K -m probekit.cli extract ...`` (docs/SCALING.md)."""
    import torch
    import torch.distributed as dist

    from .extractors import ModelSpec, extract_distributed

    device = args.device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        spec = {name: ModelSpec(loaded.module, layers, role=args.role, source=loaded.source)}
        pool = None
        for k, split in enumerate(splits):
            data = _extract_data(args, split, transform)
            # the text of --pool resolved on the model as a single process does (every rank alike)
            pool = pool or _per_layer_pools(args, loaded.module, layers, data)
            extract_distributed(spec, data, out=args.out, split=split, pool=pool,
                                batch_size=args.batch_size, device=device, dtype=args.dtype,
                                num_workers=args.num_workers, mode=mode if k == 0 else "resume",
                                progress=not args.no_progress and dist.get_rank() == 0,
                                stop_early=not args.full_forward)
        if dist.get_rank() == 0:
            if info is not None:
                from .extraction import record_preprocessing

                record_preprocessing(args.out, {name: (args.role, loaded.source)}, info)
            print(f"wrote {args.out} from {dist.get_world_size()} shards (model {name!r}, splits {splits})",
                  file=sys.stderr)
    finally:
        dist.destroy_process_group()
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    with open_store(args.store) as store:
        desc = store.describe()
    if args.json:
        print(json.dumps(desc, indent=1))
        return 0
    a = desc["attrs"]
    print(f"{desc['path']}: probekit store v{a.get('format_version')} "
          f"(written by probekit {a.get('probekit_version')}, {a.get('created')})")
    print("splits:")
    for s, info in desc["splits"].items():
        exp = info["rows_expected"]
        state = "" if exp is None or exp == info["rows_committed"] else f" of {exp} (incomplete: --resume)"
        fields = ", ".join(f for f in info["fields"] if f != "index")
        names = f" [{', '.join(info['factor_names'])}]" if info["factor_names"] else ""
        print(f"  {s}: {info['rows_committed']} rows committed{state}; {fields or 'no labels'}{names}")
    print("models:")
    for m, info in desc["models"].items():
        at = info["attrs"]
        print(f"  {m} (role {at.get('role')}, {at.get('source') or 'unknown source'}, "
              f"{at.get('param_count')} params)")
        for s, acts in info["acts"].items():
            print(f"    {s}: {acts['rows_committed']} rows")
            for layer, li in acts["layers"].items():
                print(f"      {layer}: {'x'.join(map(str, li['shape'][1:]))} {li['dtype']} pool={li['pool']}")
        if info["weights"]:
            print(f"    weights: {', '.join(f'{k} {v[0]}x{v[1]}' for k, v in info['weights'].items())}")
        if info["steps"]:
            print(f"    steps: {len(info['steps'])} ({info['steps'][0]}..{info['steps'][-1]})")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from .datasets import builtin_datasets

    entries = builtin_datasets()
    if not entries:
        print("no built-in datasets are registered")
    for name, entry in sorted(entries.items()):
        print(f"{name}: splits {', '.join(entry.splits)}\n    {entry.description}")
    return 0




def cmd_analyze(args: argparse.Namespace) -> int:
    thresholds = [parse_threshold(t) for t in args.fail_above]  # bad syntax fails before the work
    _check_gate(args)
    if args.out:
        _check_out_file(args.out)
    _check_ci_paths(args)
    result = _audit(args)
    if args.out:
        result.to_json(args.out)
    _write_ci(args, result.data)
    if args.json:
        print(json.dumps(result.data, indent=1))
    else:
        _print_summary(result.data)
        if args.out:
            print(f"\nfull result: {args.out}", file=sys.stderr)
    return _gate(args, result.data, result.check(thresholds))


def _print_summary(doc: dict[str, Any], audit_args: argparse.Namespace | None = None) -> None:
    """The verdict, the evidence where no model has one, and the skipped analyses.

    ``audit_args``: the flags of ``probekit audit``, which lists only the skips its user can act on.
    """
    models = doc.get("models", {})
    verdicts = {info.get("verdict") for info in models.values()}
    for info in models.values():
        if info.get("verdict"):
            tag = {True: "FLAGGED", False: "not flagged", None: "not judged"}[info.get("flagged")]
            if info.get("findings"):
                tag += ": " + ", ".join(info["findings"])
            print(f"[{tag}] {info['verdict']}")
    others = [line for line in doc.get("verdict", []) if line not in verdicts]
    if others:
        print()
    for line in others:
        print(f"- {line}")
    head = doc.get("headline", {})
    if head.get("rows") and not verdicts - {None}:  # evidence only where no model has a verdict
        print(f"\n{head['name']} per layer ({level_pct()}% CI; reference):")
        for r in head["rows"]:
            e = r["estimate"]
            ci = e.get("ci") or [float("nan")] * 2
            ref = f"; {r['reference']} {r['reference_value']:.3f}" if r.get("reference_value") is not None else ""
            flag = f"  <-- {MARKS['headline'].title}" if r.get("flag") else ""
            print(f"  {r['model']:<12} {r['layer']:<16} {e['value']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]{ref}{flag}")
    skipped = doc.get("skipped") or []
    if not skipped:
        return
    reasons: dict[tuple[str, str], list[str]] = {}
    for sk in skipped:
        if audit_args is None:  # a skip the audit's mode never runs (the output is not decomposed) is counted only
            reason = None if sk.get("actionable") is False else sk["reason"]
        else:
            reason = _audit_skip_hint(sk, audit_args)
        if reason is None:
            continue
        where = ".".join(x for x in (sk.get("model"), sk.get("layer")) if x) or "store"
        reasons.setdefault((sk["analysis"], reason), []).append(where)
    if audit_args is None:
        print(f"\n{len(skipped)} analyses skipped" + (" (the JSON lists each with its reason):" if reasons else
                                                       "; none that more input would run."))
    else:
        print(f"\n{len(skipped)} analyses skipped (audit.json lists each with its reason)"
              + ("; these would run with more input:" if reasons else "; none needs more input."))
    for (analysis, reason), where in reasons.items():
        at = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
        print(f"  {analysis} ({at}): {reason}")


def _audit_skip_hint(skip: dict[str, Any], args: argparse.Namespace) -> str | None:
    """What a user of ``probekit audit`` can do about a skipped analysis, or ``None`` when nothing: the
    analyses that need a split the audit never builds (an out-of-distribution test split) never run
    in this mode. A skip this function does not know is shown with its own reason."""
    analysis, reason = skip.get("analysis", ""), skip.get("reason", "")
    if skip.get("actionable") is False or "test_ood" in reason or "OOD split" in reason:
        return None
    if "background factors" in reason and not getattr(args, "factors", None):
        return "give --factors CSV (per-image background factors)"
    if analysis == "teacher-student" and not getattr(args, "teacher", None):
        return "give --teacher MODEL (with --teacher-weights FILE) to audit the model as its student"
    return reason


def _count_or(word: str, minimum: int) -> Callable[[str], int | str]:
    """An argparse type: a whole number >= ``minimum``, or ``word``."""

    def parse(text: str) -> int | str:
        if text == word:
            return word
        try:
            n = int(text)
        except ValueError:
            n = minimum - 1
        if n < minimum:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {minimum} or {word!r}, got {text!r}")
        return n

    return parse


_init_objects_arg = _count_or("all", 3)
_objects_arg = _count_or("auto", 1)


def cmd_audit(args: argparse.Namespace) -> int:
    from .extractors import parse_layer_pools
    from .model_audit import accuracy_lines, audit_model
    from .models import check_model_name, check_n_inits, parse_model_args

    _check_gate(args)
    check_model_name(args.name)  # a reserved name fails before the work, not after the extraction
    check_n_inits(args.inits)
    if args.pool:
        parse_layer_pools(args.pool)
    if args.input_shape:
        raise DataError("audit takes its inputs from the images; --input-shape is not used. Set the model's input "
                        "size with --image-size.")
    if not (args.masks or args.boxes or args.foreground):
        raise DataError("audit needs to know what is foreground in your images: give --masks DIR, --boxes CSV "
                        "or --foreground auto.")
    if args.masks and args.boxes:
        raise DataError("Give the foreground as one of --masks, --boxes or --foreground auto (with optional "
                        "--boxes seeds); --masks was given with --boxes.")
    _check_out_dir(args.out)
    _check_ci_paths(args)
    run: Any = audit_model
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: rank 0 audits, every rank runs forward passes
        from functools import partial

        from ._distributed_audit import run_distributed

        run = partial(run_distributed, audit_model)
    result = run(
        args.model, args.data, masks=args.masks, boxes=args.boxes, foreground=args.foreground,
        factors=args.factors, weights=args.weights, model_args=parse_model_args(args.model_arg),
        pretrained=args.pretrained, allow_pickle=args.allow_pickle, teacher=args.teacher,
        teacher_weights=args.teacher_weights, teacher_args=parse_model_args(args.teacher_arg),
        layers=_csv(args.layers), image_size=args.image_size, mean=args.mean, std=args.std, out=args.out,
        name=args.name, n_backgrounds=args.backgrounds, n_inits=args.inits, test_fraction=args.test_fraction,
        mask_check=args.mask_check, mask_check_objects=args.mask_check_objects, batch_size=args.batch_size,
        device=args.device, seed=args.seed,
        n_boot=args.n_boot, n_perm=args.n_perm, progress=not args.no_progress, workers=args.workers,
        objects=args.objects, overwrite=args.overwrite, pool=args.pool, teacher_layers=_csv(args.teacher_layers),
        **({} if args.init_objects is None else {"init_objects": args.init_objects}),
        class_map=args.class_map, deploy_backgrounds=args.deploy_backgrounds, n_deploy=args.deploy_scenes,
        expected_accuracy=args.expected_accuracy, precision=args.precision,
        memory_format=args.memory_format)
    if result is None:  # a rank other than 0 of a torchrun job: rank 0 reports
        return 0
    _write_ci(args, result.data)
    if args.json:
        print(json.dumps(result.data, indent=1))
    else:
        _print_summary(result.data, audit_args=args)
        for line in accuracy_lines(result.data):
            print(line)
        print(f"\nstore:  {os.path.join(args.out, 'acts.h5')}\naudit:  {os.path.join(args.out, 'audit.json')}\n"
              f"report: {os.path.join(args.out, 'report.html')}  (open it in a browser)")
    return _gate(args, result.data, [])


def _check_out_file(path: str) -> None:
    """Refuse an output file whose folder is missing or not writable before the work, not after."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DataError(f"Cannot write {short_path(path)!r}: the folder {short_path(folder)!r} does not exist; "
                        "create it or choose another path.")
    if not os.access(folder, os.W_OK):
        raise DataError(f"Cannot write {short_path(path)!r}: permission denied in {short_path(folder)!r}; "
                        "choose a folder you may write to.")


def _check_out_dir(path: str) -> None:
    """Refuse an output folder that is a file, or that cannot be written or created, before the work."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(f"The output {short_path(path)!r} is a file; give a folder with --out-dir DIR (it "
                        "receives acts.h5, audit.json and report.html).")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the folder, or the nearest one above it that exists
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing) or not os.access(existing, os.W_OK | os.X_OK):
        raise DataError(f"Cannot write the output folder {short_path(path)!r}: permission denied in "
                        f"{short_path(existing)!r}; choose a folder you may write to (--out-dir DIR).")


def _print_ranking(doc: dict[str, Any]) -> None:
    """The checkpoints of a comparison (``compare.json``), lowest reliance first, the flagged ones marked."""
    rows = doc["checkpoints"]
    print(f"reliance on the background, lowest first ({level_pct(doc.get('ci_level', LEVEL))}% CI; FLAGGED: "
          f"{RULES['shortcut'].title}):")
    for k, m in enumerate(doc["ranking"], 1):
        r = rows[m]["reliance"]
        ci = r["ci"] or [float("nan")] * 2
        val = "–" if r["value"] is None else f"{100 * r['value']:.1f} % [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
        print(f"  {k}. {m:<24} {val}{'  FLAGGED' if rows[m]['shortcut'] else ''}")


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare_checkpoints
    from .models import parse_model_args

    if not (args.masks or args.boxes or args.foreground):
        raise DataError("compare needs to know what is foreground in your images: give --masks DIR, --boxes CSV "
                        "or --foreground auto.")
    result = compare_checkpoints(
        args.model, args.checkpoints, args.data, masks=args.masks, boxes=args.boxes, foreground=args.foreground,
        model_args=parse_model_args(args.model_arg), allow_pickle=args.allow_pickle, image_size=args.image_size,
        mean=args.mean, std=args.std, out=args.out, reference=args.reference, n_backgrounds=args.backgrounds,
        test_fraction=args.test_fraction, seed=args.seed, n_boot=args.n_boot,
        batch_size=args.batch_size, device=args.device, progress=not args.no_progress)
    _print_ranking(result.data)
    print(f"\ncompare: {os.path.join(args.out, 'compare.json')}\nreport:  {os.path.join(args.out, 'compare.html')}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    _check_out_file(args.out)
    if args.audit:
        try:
            with open(args.audit) as f:
                doc = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(f"Cannot read the audit JSON {args.audit!r} ({e}).") from e
        if doc.get("schema") != "probekit.audit":
            raise DataError(f"{args.audit!r} is not a probekit audit result (no schema 'probekit.audit').")
    else:
        doc = _audit(args).data
    path = write_report(doc, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    res = run_demo(args.out, seed=args.seed, teacher_epochs=args.teacher_epochs,
                   student_epochs=args.student_epochs, images=not args.no_images, progress=not args.no_progress)
    if res.image_audits:
        print("Part 1: your own images (a folder of shapes with masks; two CNNs from their checkpoints)\n")
        for name, path in res.image_audits.items():
            with open(path) as f:
                info = json.load(f)["models"][name]
            print(f"[{'FLAGGED' if info['flagged'] else 'not flagged'}] {info['verdict']}")
            print(f"   report: {path.parent / 'report.html'}")
        print("\nPart 2: a student distilled on in-distribution backgrounds, and its teacher\n")
    with open(res.audit_json) as f:
        _print_summary(json.load(f))
    took = ", ".join(f"{k} {v:.0f}s" for k, v in res.seconds.items())
    print(f"\nstore:  {res.store}\naudit:  {res.audit_json}\nreport: {res.report}  (open it in a browser)\n"
          f"time:   {took}")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from .experiments import get_experiment

    run = get_experiment(args.name)
    out = args.out or os.path.join("experiments", args.name)
    os.makedirs(out, exist_ok=True)
    run(seeds=args.seeds, out_dir=out, quick=args.quick)
    print(f"wrote the {args.name} experiment's store, JSON and plots to {out}/", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
