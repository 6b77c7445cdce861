"""`python -m qat_runner.bench [--quick] [--out PATH] [--sections ...] [--skip-openvino] [--device cpu|cuda]`."""
from __future__ import annotations

import argparse
import logging
import shlex
import sys
import warnings

from . import report, telemetry
from .run import DEFAULT_OUT, device_unavailable, run_benchmark
from .settings import DEVICES, PEERS, PRESETS, SECTIONS, preset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m qat_runner.bench", description=__doc__.split("\n")[0])
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", dest="mode", const="quick",
                      help="fewer steps, rounds and test images: a few minutes on 2 cores")
    mode.add_argument("--mode", choices=list(PRESETS),
                      help="full (default), quick, or tiny (the test suite's smoke setting)")
    p.set_defaults(mode="full")
    p.add_argument("--out", default=str(DEFAULT_OUT), help=f"JSON path; markdown next to it (default {DEFAULT_OUT})")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), metavar="SECTION",
                   help=f"any of {', '.join(SECTIONS)} (default: all)")
    p.add_argument("--skip-openvino", action="store_true", help="leave OpenVINO out of the inference section")
    p.add_argument("--profile", action="store_true",
                   help="add torch.profiler op times of the float and our QAT step to section 1")
    p.add_argument("--threads", type=int, default=None, help="torch, onnxruntime and OpenVINO threads (default 2)")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where the models train (training cost, QAT); onnxruntime and OpenVINO stay on the CPU")
    p.add_argument("--peers", nargs="*", choices=PEERS, default=list(PEERS), metavar="PEER",
                   help=f"the optional QAT tools to compare: any of {', '.join(PEERS)} (default: both; "
                        "none with a bare --peers)")
    p.add_argument("--no-memory", action="store_true", help="leave the peak-memory subprocesses out of section 1")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    problem = device_unavailable(args.device)
    if problem is not None:  # before any work, one line
        print(problem, file=sys.stderr)
        return 2
    telemetry.disable()  # before anything imports openvino or nncf
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "onnxscript", "torch.onnx", "torch.export"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    overrides = {"sections": tuple(args.sections), "openvino": not args.skip_openvino, "device": args.device,
                 "peers": tuple(args.peers)}
    if args.no_memory:
        overrides["memory"] = False
    if args.profile:
        overrides["profile"] = True
    if args.threads is not None:
        overrides["threads"] = args.threads
    settings = preset(args.mode, **overrides)
    command = "python -m qat_runner.bench " + " ".join(shlex.quote(a) for a in argv)
    results = run_benchmark(settings, args.out, command.strip())
    print(report.markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
