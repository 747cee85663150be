"""`coordtok import-official`: a checkpoint of the paper's public implementation -> a native
.safetensors file (model/checkpoint.py)."""
from __future__ import annotations

import argparse
from pathlib import Path

from coordtok.service.commands.common import add_command


def add_to(commands) -> None:
    importer = add_command(commands, "import-official", "convert a checkpoint of the public implementation")
    importer.add_argument("checkpoint", help="the public trainer's .pth checkpoint")
    importer.add_argument("--config", required=True, help="JSON of the reference constructor's keyword arguments")
    importer.add_argument("-o", "--output", required=True, help="output .safetensors path")
    importer.set_defaults(run=cmd_import_official)


def cmd_import_official(args: argparse.Namespace) -> int:
    from coordtok.model import load_official, save_model

    model = load_official(args.checkpoint, args.config, device="cpu")
    save_model(model, args.output, metadata={"source": Path(args.checkpoint).name})
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0
