"""``neft-trl export``: a NeFT run's output folder as a PEFT LoRA adapter folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import LOADING_ERRORS, CLIError, one_line


def add_arguments(export: argparse.ArgumentParser) -> None:
    export.add_argument("run_dir", metavar="RUN_DIR", help="Output folder of a NeFT run (delta or hooks mode).")
    export.add_argument("out", metavar="OUT", help="Folder for adapter_config.json + adapter_model.safetensors.")
    export.add_argument("--format", choices=("peft",), default="peft", help="Adapter format (default: peft).")
    export.add_argument("--base_model", metavar="PATH", default=None,
                        help="The model the run started from: required for a hooks run (adapter = trained - base); "
                             "for a delta run it is checked against the deltas.")
    export.add_argument("--uniform_rank", action="store_true",
                        help="Pad every module to the largest rank instead of per-module ranks (rank_pattern), "
                             "for engines that read only the global r (llama.cpp, TGI).")


def export_command(args: argparse.Namespace) -> None:
    from ..training.delta_io import DELTA_FILENAME
    from ..training.peft_export import ADAPTER_FILENAME, export_peft_adapter

    try:
        out = export_peft_adapter(args.run_dir, args.out, args.base_model, uniform_rank=args.uniform_rank)
    except (*LOADING_ERRORS, ValueError) as err:  # a bad folder or model: the files are the input here
        raise CLIError(one_line(err)) from err
    line = f"PEFT LoRA adapter: {out} ({(out / ADAPTER_FILENAME).stat().st_size:,} bytes"
    delta = Path(args.run_dir) / DELTA_FILENAME
    print(line + (f"; the run's {DELTA_FILENAME}: {delta.stat().st_size:,} bytes)" if delta.is_file() else ")"))
